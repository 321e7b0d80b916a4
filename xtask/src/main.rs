//! Project tasks: `cargo xtask setup | test | demo | bench NAME | dist | fuzz [TARGET] | soak`.
//!
//! xtask does not depend on `guard`, so it builds on a fresh machine before
//! the eBPF toolchain exists.

mod demo;
mod dist;
mod fuzz;
mod sdk;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "kt project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the eBPF object needs (skips what is present).
    Setup,
    /// Setup, then the whole test suite (the README's test command).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole story offline: capture, key swap, fallback, DLP block, events.
    Demo {
        /// Keep the secrets in a Vault-API server (an OpenBao dev server on
        /// loopback, which `cargo xtask setup` installs) instead of the
        /// local store: connected mode.
        #[arg(long)]
        vault: bool,
    },
    /// Benchmarks that print figures and ratios (dlp, gateway, events, capture,
    /// store_refresh); `dlp` installs Debian's libhyperscan-dev for its anchor.
    Bench {
        /// Which benchmark.
        #[arg(value_parser = ["dlp", "gateway", "events", "capture", "store_refresh"])]
        name: String,
    },
    /// Release artefacts in target/dist: a static musl `kt`, a tarball
    /// (binary, README, man pages, completions) and a .deb.
    Dist,
    /// Runs the fuzz targets of tests/fuzz (cargo-fuzz, libFuzzer) and
    /// prints executions and coverage; new crashes go to tests/fuzz/regressions.
    Fuzz {
        /// One target (default: all, one after the other).
        #[arg(value_parser = fuzz::TARGETS.map(|(n, _)| n))]
        target: Option<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// The real kt under steady mixed traffic against misbehaving fake
    /// providers (loopback only); prints memory, fds, threads, events vs
    /// requests and added latency per minute; exits 1 on a failed criterion.
    Soak {
        /// How long the traffic runs.
        #[arg(long, default_value_t = 3.0)]
        minutes: f64,
        /// Requests started per second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => {
            setup::run()?;
            dist_test_notice();
            // libtest hides a passing test's stderr, so tests that could not do
            // (part of) their work also write why into this file, printed at
            // the end: a skip is never silent.
            let skips =
                std::env::temp_dir().join(format!("kt-test-skips-{}.log", std::process::id()));
            let _ = std::fs::remove_file(&skips);
            // Default members: everything but guard-ebpf, which only builds for BPF.
            let result = cargo_env(
                &[&["test", "--locked"], &as_strs(&args)[..]].concat(),
                &[("KT_TEST_SKIP_LOG", skips.as_os_str())],
            );
            report_skips(&skips);
            result
        }
        Cmd::Dist => dist::run(),
        Cmd::Demo { vault } => {
            setup::run()?;
            demo::run(vault)
        }
        Cmd::Fuzz { target, seconds } => {
            setup::run()?;
            fuzz::run(target.as_deref(), seconds)
        }
        Cmd::Bench { name } => {
            setup::run()?;
            // Each bench lives with the package it measures.
            let package = match name.as_str() {
                "events" => "guard",
                "dlp" | "gateway" | "capture" | "store_refresh" => "guard-tests",
                other => bail!("unknown benchmark {other}"),
            };
            if name == "gateway" {
                // The yardstick the gateway bench measures kt against.
                setup::nginx();
            }
            // The DLP bench's yardstick: Hyperscan, a bench-only feature
            // (the normal build never needs the C library).
            let features: &[&str] = if name == "dlp" && setup::hyperscan() {
                &["--features", "hyperscan"]
            } else {
                &[]
            };
            cargo(
                &[
                    &["bench", "--locked", "-p", package, "--bench", &name][..],
                    features,
                ]
                .concat(),
            )
        }
        Cmd::Soak { minutes, rate } => {
            setup::run()?;
            // Release build (the bench profile), as kt is deployed.
            cargo(&[
                "bench",
                "--locked",
                "-p",
                "guard-tests",
                "--bench",
                "soak",
                "--",
                "--minutes",
                &minutes.to_string(),
                "--rate",
                &rate.to_string(),
            ])
        }
    }
}

/// The dist tests (guard-tests `--test dist`) check the release artefacts
/// only when they exist or `KT_TEST_DIST=1` asks for a build (a musl build
/// of the standard library takes long); say so here, where it is seen.
fn dist_test_notice() {
    let (bin, _, deb) = dist::names();
    let dir = dist::dist_dir(&dist::workspace_root());
    if std::env::var_os("KT_TEST_DIST").is_some_and(|v| v == "1") {
        println!(
            "test: dist         KT_TEST_DIST=1: the dist tests build the artefacts (cargo xtask dist)"
        );
    } else if !dir.join(&bin).exists() || !dir.join(&deb).exists() {
        println!(
            "test: dist         SKIPPED: no {bin} / {deb} in {}; run `cargo xtask dist` first or set KT_TEST_DIST=1",
            dir.display()
        );
    }
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Prints what the tests said they skipped (see `guard_tests::skipped`).
fn report_skips(path: &std::path::Path) {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            println!(
                "test: skipped      {} part(s) of tests could not run here:",
                lines.len()
            );
            for l in lines {
                println!("  SKIPPED {l}");
            }
        }
        _ => println!("test: skipped      nothing: every test ran in full"),
    }
    let _ = std::fs::remove_file(path);
}

pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_env(args, &[])
}

/// [`cargo`] with extra environment variables for the child.
pub(crate) fn cargo_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    command.envs(env.iter().copied());
    // `cargo xtask` runs us with xtask's own package variables set; build
    // scripts that watch them (ring's do) would see them change against a
    // plain `cargo build` and rebuild every crate above them each time.
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("CARGO_PKG_")
            || n.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&&*n)
        {
            command.env_remove(&name);
        }
    }
    let status = command
        .args(args)
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
