//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs the cargo-fuzz targets
//! of `tests/fuzz/` (libFuzzer) one after the other, prints executions and
//! coverage per target, and copies new crashes into
//! `tests/fuzz/regressions/<target>/`, which the stable replay test
//! (`tests/tests/fuzz_replay.rs`) runs from then on.
//!
//! libFuzzer needs nightly compiler flags: the toolchain is the one `cargo
//! xtask setup` provides for the eBPF build (Debian's Rust as the rustup
//! toolchain `debian`, with `RUSTC_BOOTSTRAP=1`), or a rustup nightly.
//! Debian's Rust ships no sanitizer runtimes, so targets are built with
//! `--sanitizer none`: the code under test forbids
//! `unsafe`, so what is sought is panics, overflows, hangs and broken
//! properties, not memory errors.
//!
//! The corpus each run grows is kept under the target directory; only
//! the small seed corpus and the regressions live in the repository (add an
//! input found here to `tests/fuzz/corpus/` by hand when it is worth it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::setup;

/// Every target (`tests/fuzz/fuzz_targets/<name>.rs`) and its `-max_len`.
pub const TARGETS: [(&str, usize); 7] = [
    ("config", 16 * 1024),
    ("dlp", 8 * 1024),
    ("client_hello", 4 * 1024),
    ("connect", 512),
    ("relay", 1024),
    ("event_store", 32 * 1024),
    ("secret_store", 2 * 1024),
];

/// What one run did.
struct Summary {
    target: &'static str,
    execs: Option<u64>,
    start: Option<(u64, u64)>,
    end: Option<(u64, u64)>,
    crashes: Vec<PathBuf>,
}

pub fn run(only: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    let root = repo_root()?;
    let fuzz_dir = root.join("tests/fuzz");
    let targets: Vec<(&'static str, usize)> = match only {
        None => TARGETS.to_vec(),
        Some(t) => match TARGETS.iter().find(|(n, _)| *n == t) {
            Some(&x) => vec![x],
            None => bail!(
                "unknown fuzz target {t}; one of: {}",
                TARGETS.map(|(n, _)| n).join(", ")
            ),
        },
    };
    let toolchain = setup::fuzz_toolchain()?;
    setup::cargo_fuzz()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("fuzz");

    let mut build = fuzz_cmd(&toolchain, &target_dir);
    build
        .args(["build", "--fuzz-dir"])
        .arg(&fuzz_dir)
        .args(FLAGS);
    run_status(build, "cargo fuzz build")?;

    let mut summaries = Vec::new();
    for (target, max_len) in targets {
        let work = target_dir.join("corpus").join(target);
        let artifacts = target_dir.join("artifacts").join(target);
        for d in [&work, &artifacts] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let before = listing(&artifacts);
        let regressions = fuzz_dir.join("regressions").join(target);
        let mut cmd = fuzz_cmd(&toolchain, &target_dir);
        cmd.args(["run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .args(FLAGS)
            .arg(target)
            .arg(&work)
            .arg(fuzz_dir.join("corpus").join(target));
        if regressions.is_dir() {
            cmd.arg(&regressions);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={max_len}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .stderr(Stdio::piped());
        println!("fuzz: {target} for {seconds} s");
        let out = cmd
            .output()
            .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        std::fs::write(target_dir.join(format!("{target}.log")), log.as_bytes())?;
        let mut crashes = Vec::new();
        for f in listing(&artifacts) {
            if before.contains(&f) {
                continue;
            }
            let name = f.file_name().map(PathBuf::from).unwrap_or_default();
            std::fs::create_dir_all(&regressions)?;
            let dest = regressions.join(&name);
            std::fs::copy(&f, &dest).with_context(|| format!("copy {}", f.display()))?;
            crashes.push(dest);
        }
        summaries.push(Summary {
            target,
            execs: stat(&log, "stat::number_of_executed_units:"),
            start: cov_line(&log, "INITED"),
            end: last_cov(&log),
            crashes,
        });
    }

    println!(
        "\n{:<14} {:>12} {:>16} {:>16}  crashes",
        "target", "executions", "cov/ft at start", "cov/ft at end"
    );
    let pair = |p: Option<(u64, u64)>| p.map_or("-".into(), |(c, f)| format!("{c}/{f}"));
    for s in &summaries {
        println!(
            "{:<14} {:>12} {:>16} {:>16}  {}",
            s.target,
            s.execs.map_or("-".into(), |n| n.to_string()),
            pair(s.start),
            pair(s.end),
            s.crashes.len()
        );
        for c in &s.crashes {
            println!("  new regression input: {}", c.display());
        }
    }
    if summaries.iter().any(|s| !s.crashes.is_empty()) {
        bail!(
            "fuzzing found crashes: replay them with `cargo test -p guard-tests --test fuzz_replay`"
        );
    }
    Ok(())
}

/// Release build; no sanitizer (see the module docs).
const FLAGS: [&str; 3] = ["--sanitizer", "none", "-O"];

fn fuzz_cmd(toolchain: &setup::FuzzToolchain, target_dir: &Path) -> Command {
    // rustup's `cargo` proxy picks the toolchain named after `+`; what
    // cargo set for xtask's own toolchain must not leak in.
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{}", toolchain.name))
        .arg("fuzz")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .env("CARGO_TARGET_DIR", target_dir);
    if toolchain.bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd
}

fn run_status(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn repo_root() -> anyhow::Result<PathBuf> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("run through `cargo xtask`")?;
    Path::new(&manifest)
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// `stat::number_of_executed_units: 12345`.
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// `cov: N ft: M` of the first line containing `marker`.
fn cov_line(log: &str, marker: &str) -> Option<(u64, u64)> {
    log.lines().find(|l| l.contains(marker)).and_then(cov_of)
}

/// `cov: N ft: M` of the last status line.
fn last_cov(log: &str) -> Option<(u64, u64)> {
    log.lines().rev().find_map(cov_of)
}

fn cov_of(line: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        let at = line.find(name)? + name.len();
        line[at..].split_whitespace().next()?.parse().ok()
    };
    Some((field("cov: ")?, field("ft: ")?))
}
