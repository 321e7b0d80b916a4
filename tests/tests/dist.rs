//! The release artefacts of `cargo xtask dist`: the musl binary is static
//! and runs (`kt --version`, `kt gateway check`), the tarball holds the
//! binary, README, man pages and completions, and the .deb installs the
//! files a newcomer relies on with the right modes, the policy as a
//! conffile that configures nothing, and a postinst that makes the data dir
//! root's alone.
//!
//! A musl build of the standard library takes long, so these run only when
//! the artefacts exist (checked as they are) or `KT_TEST_DIST=1` (built
//! first); otherwise each prints SKIPPED with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `<target dir>/dist`: this test runs from `<target dir>/debug/deps/`.
fn dist_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().join("dist")
}

fn bin_name() -> String {
    format!("kt-{VERSION}-x86_64-linux-musl")
}

fn deb_name() -> String {
    format!("kt_{VERSION}_amd64.deb")
}

/// Says why a test does not run, past the harness's output capture.
fn skipped(why: &str) {
    guard_tests::skipped("dist", why);
}

/// The dist dir when the artefacts are there (built first under
/// `KT_TEST_DIST=1`), else `None` after printing why.
fn artefacts(test: &str) -> Option<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = dist_dir();
    if std::env::var_os("KT_TEST_DIST").is_some_and(|v| v == "1") {
        let built = BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["xtask", "dist"])
                .current_dir(repo())
                .env("CARGO_TARGET_DIR", dir.parent().unwrap())
                .status()
                .map_err(|e| e.to_string())?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("cargo xtask dist failed ({status})"))
            }
        });
        if let Err(e) = built {
            panic!("KT_TEST_DIST=1 but the artefacts could not be built: {e}");
        }
    }
    for name in [bin_name(), format!("{}.tar.gz", bin_name()), deb_name()] {
        if !dir.join(&name).exists() {
            skipped(&format!(
                "dist {test}: no {} (run `cargo xtask dist`, or set KT_TEST_DIST=1 to build it here)",
                dir.join(name).display()
            ));
            return None;
        }
    }
    Some(dir)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    out
}

/// Whether a 64-bit ELF file has a `PT_INTERP` (a dynamic loader).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "not a 64-bit LE ELF file");
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn musl_binary_is_static_and_runs() {
    let Some(dir) = artefacts("musl_binary_is_static_and_runs") else {
        return;
    };
    let bin = dir.join(bin_name());
    let elf = std::fs::read(&bin).unwrap();
    assert!(
        !has_interpreter(&elf),
        "{} has an ELF interpreter",
        bin.display()
    );
    match Command::new("file").arg(&bin).output() {
        Ok(o) => {
            let desc = text(&o.stdout);
            assert!(
                desc.contains("statically linked") || desc.contains("static-pie linked"),
                "file says: {desc}"
            );
        }
        Err(e) => skipped(&format!("dist `file` check: `file` cannot run ({e})")),
    }
    let out = run(Command::new(&bin).arg("--version"));
    assert_eq!(text(&out.stdout).trim(), format!("kt {VERSION}"));

    // The check runs to a verdict (0 valid, 1 a problem such as a secret
    // that does not resolve here), never a crash or a usage error.
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(&bin)
        .args(["gateway", "check", "--config"])
        .arg(repo().join("config/provider-key-rotation.yaml"))
        .env("KT_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "kt gateway check ended with {}: {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn tarball_holds_binary_readme_man_pages_and_completions() {
    let Some(dir) = artefacts("tarball_holds_binary_readme_man_pages_and_completions") else {
        return;
    };
    let tarball = dir.join(format!("{}.tar.gz", bin_name()));
    let out = run(Command::new("tar").arg("-tvzf").arg(&tarball));
    let listing = text(&out.stdout);
    let top = bin_name();
    for (path, mode) in [
        (format!("{top}/kt"), "-rwxr-xr-x"),
        (format!("{top}/README.md"), "-rw-r--r--"),
        (format!("{top}/man/kt.1"), "-rw-r--r--"),
        (format!("{top}/man/kt-service.1"), "-rw-r--r--"),
        (format!("{top}/completions/kt.bash"), "-rw-r--r--"),
        (format!("{top}/completions/_kt"), "-rw-r--r--"),
        (format!("{top}/completions/kt.fish"), "-rw-r--r--"),
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} missing from the tarball:\n{listing}"));
        assert!(line.starts_with(mode), "{line}");
        assert!(line.contains(" 0/0 "), "not owned by root: {line}");
    }
}

/// `dpkg-deb -c` lines as (mode, owner, path without the leading `.`).
fn deb_listing(deb: &Path) -> Vec<(String, String, String)> {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    text(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f[5].trim_start_matches('.').to_string();
            (f[0].to_string(), f[1].to_string(), path)
        })
        .collect()
}

#[test]
fn deb_installs_binary_unit_policy_man_pages_and_completions() {
    let Some(dir) = artefacts("deb_installs_binary_unit_policy_man_pages_and_completions") else {
        return;
    };
    let deb = dir.join(deb_name());
    let listing = deb_listing(&deb);
    let mode_of = |p: &str| {
        listing.iter().find(|(_, _, path)| path == p).map_or_else(
            || panic!("{p} missing from the .deb: {listing:#?}"),
            |(m, o, _)| (m.as_str(), o.as_str()),
        )
    };
    for (path, mode) in [
        ("/usr/bin/kt", "-rwxr-xr-x"),
        ("/lib/systemd/system/kt.service", "-rw-r--r--"),
        ("/etc/kt/policy.yaml", "-rw-r--r--"),
        ("/usr/share/man/man1/kt.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/kt-service.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/kt-run.1.gz", "-rw-r--r--"),
        ("/usr/share/bash-completion/completions/kt", "-rw-r--r--"),
        ("/usr/share/zsh/vendor-completions/_kt", "-rw-r--r--"),
        ("/usr/share/fish/vendor_completions.d/kt.fish", "-rw-r--r--"),
        ("/usr/share/doc/kt/copyright", "-rw-r--r--"),
    ] {
        assert_eq!(mode_of(path), (mode, "root/root"), "{path}");
    }
    for (mode, owner, path) in &listing {
        assert_eq!(owner, "root/root", "{path}");
        assert!(
            !mode[4..].contains('w'),
            "{path} is group/other-writable: {mode}"
        );
    }

    let info = text(&run(Command::new("dpkg-deb").arg("-I").arg(&deb)).stdout);
    assert!(info.contains(" Package: kt\n"), "{info}");
    assert!(info.contains(&format!(" Version: {VERSION}\n")), "{info}");
    assert!(info.contains(" Architecture: amd64\n"), "{info}");
    let field = |name: &str| run(Command::new("dpkg-deb").arg("-I").arg(&deb).arg(name)).stdout;
    assert_eq!(text(&field("conffiles")).trim(), "/etc/kt/policy.yaml");
    let postinst = text(&field("postinst"));
    assert!(
        postinst.contains("install -d -m 0700 -o root -g root /var/lib/kt"),
        "{postinst}"
    );
    let commands: Vec<&str> = postinst
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !commands
            .iter()
            .any(|l| l.contains("enable") || l.contains("start")),
        "the package must not start capture before a policy exists:\n{postinst}"
    );
    assert!(text(&field("prerm")).contains("kt service uninstall"));

    // The files as installed: the policy configures nothing, the unit is
    // the one `kt service unit` prints, for /usr/bin/kt.
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root.path()));
    let policy = std::fs::read_to_string(root.path().join("etc/kt/policy.yaml")).unwrap();
    assert!(
        policy.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "a live line in the default policy:\n{policy}"
    );
    let bin = root.path().join("usr/bin/kt");
    let data = tempfile::tempdir().unwrap();
    let check = Command::new(&bin)
        .args(["gateway", "check", "--config"])
        .arg(root.path().join("etc/kt/policy.yaml"))
        .env("KT_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(1),
        "the commented-out policy must not be a runnable config: {}",
        text(&check.stderr)
    );
    let unit = std::fs::read_to_string(root.path().join("lib/systemd/system/kt.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/kt run --keep-attached --config /etc/kt/policy.yaml\n"),
        "{unit}"
    );
    let printed = run(Command::new(&bin).args(["service", "unit"]));
    assert_eq!(text(&printed.stdout), unit);
}
