//! `kt gateway check --config FILE [--verbose]`.

use std::path::PathBuf;

use crate::cli::{Global, OutputFormat, exit};
use crate::preflight::{self, Report};

/// Arguments of `kt gateway check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The policy config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Also report kernel support for capture and whether ports are free.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Runs the check; exit 0 when the gateway would start, 1 when not.
pub fn run(args: &CheckArgs, global: &Global) -> anyhow::Result<u8> {
    let config = match super::load_config(&args.config, global)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let resolver = super::resolver(global)?;
    // Read-only: a check never creates the host's fingerprint key.
    let fp = crate::secrets::Fingerprinter::open_existing(&global.data_dir)?;
    let mut report = preflight::check(
        &config,
        resolver.as_ref(),
        &preflight::Options {
            verbose: args.verbose,
            fingerprinter: fp.as_ref(),
        },
    );
    if args.verbose
        && let Some(dlp) = config.dlp.as_ref()
    {
        report.warnings.extend(crate::dlp::coverage_warnings(dlp));
    }
    match global.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Human => print_human(&report, args.verbose),
    }
    Ok(if report.would_start {
        exit::OK
    } else {
        exit::PROBLEM
    })
}

fn print_human(r: &Report, verbose: bool) {
    println!("config   {}", r.config);
    println!("targets");
    for t in &r.targets {
        let state = if t.usable {
            "ok"
        } else if t.required {
            "MISSING"
        } else {
            "skipped"
        };
        println!(
            "  {:<8} {:<20} {:<10} {:<32} {}{}",
            state,
            t.id,
            t.provider,
            t.reference,
            if t.required { "required" } else { "optional" },
            match (&t.source, &t.fingerprint) {
                (Some(s), Some(f)) => format!("  from {s} {f}"),
                _ => String::new(),
            }
        );
        if let Some(p) = &t.problem {
            println!("           {p}");
        }
    }
    println!("policy chain");
    for (i, p) in r.chain.iter().enumerate() {
        println!("  {}. {:<13} {}", i + 1, p.name, p.detail);
    }
    if verbose {
        if let Some(k) = &r.kernel {
            println!("capture support");
            println!(
                "  cgroup2   {}",
                k.cgroup2
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "not mounted".into())
            );
            println!(
                "  bpf       {}",
                if k.bpf_permitted {
                    "permitted (root)"
                } else {
                    "not permitted (run as root)"
                }
            );
            println!("  btf       {}", if k.btf { "present" } else { "absent" });
            if let Some(rel) = &k.kernel_release {
                println!("  kernel    {rel}");
            }
        }
        if let Some(p) = &r.capture_programs {
            if p.is_empty() {
                println!("  attached  no (no kt capture programs loaded; start `kt run`)");
            } else {
                println!("  attached  yes ({} loaded)", p.join(", "));
            }
        }
        if !r.listeners.is_empty() {
            println!("listeners");
            for l in &r.listeners {
                println!(
                    "  {:<17} {:<22} {}",
                    l.role,
                    l.address,
                    if l.free { "free" } else { "IN USE" }
                );
            }
        }
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
    if r.would_start {
        println!("result   the gateway would start");
    } else {
        println!(
            "result   the gateway would NOT start ({} problem(s))",
            r.problems.len()
        );
    }
}
