//! `kt run` over a test cgroup with one fake OpenAI-style provider on
//! `127.77.<net>.10:443`, for the proxy and egress suites. kt runs in a
//! private mount namespace (its own bpffs) and in the test cgroup; jobs are
//! started outside, moved in, then let go. Only loopback addresses, and
//! addresses inside network namespaces the tests make, are ever reached.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

use crate::cgroup::TestCgroup;
use crate::fake_provider::{Behavior, FakeProvider, TestCa};
use crate::mountns::PrivateMounts;
use crate::process::{KtChild, free_addr, wait_until};

/// The managed key kt sends upstream.
pub const MANAGED_KEY: &str = "sk-kt-run-managed-TUFOQUdFRF9LRVlfRUdSRVNT";
/// The key jobs hard-code (never to reach a provider).
pub const JOB_KEY: &str = "sk-job-hardcoded-SE9PRUQ0X0pPQl9LRVk";

/// What a job printed and how it ended.
#[derive(Debug)]
pub struct Job {
    /// Exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Its pid.
    pub pid: u32,
}

impl Job {
    /// A `key=value` line of its stdout.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A running `kt run`. Field order is drop order: kt ends before its cgroup
/// is removed and before its mount namespace goes.
pub struct KtRun {
    _kt: Option<KtChild>,
    /// The cgroup kt captures (and runs in).
    pub cgroup: TestCgroup,
    _mounts: PrivateMounts,
    /// The fake provider.
    pub provider: FakeProvider,
    /// `127.77.<net>.10`.
    pub provider_ip: String,
    /// kt's data dir.
    pub data: PathBuf,
    /// kt's CA (for jobs to trust).
    pub kt_ca: PathBuf,
    log: PathBuf,
    _rt: tokio::runtime::Runtime,
    _dir: TempDir,
}

/// A directory removed on drop (the fixture is a library: no dev-dependency).
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("kt-run-{}-{label}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the kt binary `kt` with `args` on `data`.
pub fn kt_cmd(kt: &str, data: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(kt)
        .args(args)
        .env("KT_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = c.stdin.take().unwrap();
    if let Some(s) = stdin {
        i.write_all(s.as_bytes()).unwrap();
    }
    drop(i);
    c.wait_with_output().unwrap()
}

impl KtRun {
    /// Starts `kt` (the binary path) with the provider on net `net`;
    /// `gateway` and `capture` are extra YAML lines (two-space indented)
    /// for those sections. Waits until kt captures.
    pub fn start(kt: &str, label: &str, net: u8, gateway: &str, capture: &str) -> KtRun {
        KtRun::start_with_hosts(kt, label, net, gateway, capture, "")
    }

    /// As [`KtRun::start`], kt resolving names through `hosts` (lines of
    /// an /etc/hosts file, bind-mounted over /etc/hosts in kt's private
    /// mount namespace only).
    pub fn start_with_hosts(
        kt: &str,
        label: &str,
        net: u8,
        gateway: &str,
        capture: &str,
        hosts: &str,
    ) -> KtRun {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ca = TestCa::new();
        let provider_ip = format!("127.77.{net}.10");
        let provider = rt.block_on(FakeProvider::start_at(
            &ca,
            "fake-provider",
            Behavior::Ok,
            format!("{provider_ip}:443").parse().unwrap(),
        ));
        let dir = TempDir::new(label);
        let data = dir.path().join("data");
        let out = kt_cmd(
            kt,
            &data,
            &["secrets", "add", "OPENAI_API_KEY", "--store"],
            Some(MANAGED_KEY),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = format!(
            r#"pack:
  name: {label}
  version: "1.0.0"
  enabled: true
providers:
  routing:
    strategy: ordered
  fallback:
    enabled: false
  targets:
    - id: openai-main
      provider: openai
      required: true
      base_url: {base}
      secret_key_ref:
        store: OPENAI_API_KEY
policies:
  chain:
    - audit-logger
gateway:
  listen: {listen}
  capture_listen: {cap4}
  capture_listen6: "[::1]:{cap6}"
  proxy_listen: {proxy}
{gateway}capture:
  hosts: []
  cidrs: [127.77.{net}.0/24]
  ports: [443]
{capture}"#,
            base = provider.openai_base_url(),
            listen = free_addr(),
            cap4 = free_addr(),
            cap6 = free_addr().port(),
            proxy = free_addr(),
        );
        let cfg = dir.path().join("kt.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let ca_pem = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_pem, &ca.pem).unwrap();
        let mounts = PrivateMounts::new().expect("a private mount namespace (needs root)");
        if !hosts.is_empty() {
            let file = dir.path().join("hosts");
            std::fs::write(&file, format!("127.0.0.1 localhost\n{hosts}")).unwrap();
            let bound = mounts
                .command("mount")
                .arg("--bind")
                .arg(&file)
                .arg("/etc/hosts")
                .status()
                .unwrap();
            assert!(bound.success(), "bind-mounting a private /etc/hosts failed");
        }
        let cgroup = TestCgroup::new(label).expect("child cgroup (needs root and cgroup v2)");
        let log = dir.path().join("kt.log");
        let mut command = mounts.command(kt);
        command
            .args(["run", "--config", cfg.to_str().unwrap(), "--cgroup"])
            .arg(cgroup.path())
            .env("KT_DATA_DIR", &data)
            .env("SSL_CERT_FILE", &ca_pem);
        // kt adds its own proxy variables to the declared proxies: only
        // what the test configures counts.
        for v in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            command.env_remove(v);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        let kt_child = KtChild(child);
        cgroup.enter(pid).unwrap();
        let run = KtRun {
            _kt: Some(kt_child),
            cgroup,
            _mounts: mounts,
            provider,
            provider_ip,
            kt_ca: data.join("ca/ca.pem"),
            data,
            log,
            _rt: rt,
            _dir: dir,
        };
        wait_until("kt run to capture", || {
            let text = run.log();
            assert!(
                !text.starts_with("error:") && !text.contains("\nerror:"),
                "kt run failed to start:\n{text}"
            );
            text.contains("kt: capturing").then_some(())
        });
        run
    }

    /// kt's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `command` as a job in the cgroup: started outside, moved in, then
    /// sent a line on stdin (a shell job starts with `read go`).
    pub fn job(&mut self, command: &mut Command) -> Job {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut go = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let pid = self.cgroup.adopt(child).unwrap();
        go.write_all(b"go\n").unwrap();
        drop(go);
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        stderr.read_to_string(&mut err).unwrap();
        let status = self.cgroup.wait(pid).unwrap().status;
        Job {
            status,
            stdout: out,
            stderr: err,
            pid,
        }
    }

    /// `kt ARGS` on this run's data dir.
    pub fn kt(&self, kt: &str, args: &[&str]) -> Output {
        kt_cmd(kt, &self.data, args, None)
    }

    /// Every event, as JSON.
    pub fn events(&self, kt: &str) -> Vec<serde_json::Value> {
        let out = self.kt(kt, &["--output", "json", "events", "--limit", "0"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for an event `pred` accepts (the writer is asynchronous).
    pub fn wait_event(
        &self,
        kt: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_until(what, || self.events(kt).into_iter().find(|e| pred(e)))
    }
}

/// The guard rule of an event (`egress-refused`, `proxy-forwarded`, …).
pub fn guard_rule(e: &serde_json::Value) -> Option<&str> {
    e["policy"]
        .as_array()?
        .iter()
        .find(|p| p["policy"] == "guard")?["rule_id"]
        .as_str()
}

/// The guard note's location (`tcp 192.0.2.1:443`).
pub fn guard_location(e: &serde_json::Value) -> Option<&str> {
    e["policy"]
        .as_array()?
        .iter()
        .find(|p| p["policy"] == "guard")?["location"]
        .as_str()
}
