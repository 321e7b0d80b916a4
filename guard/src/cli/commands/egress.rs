//! `kt egress report [--since D]`: what strict egress recorded (audit) or
//! refused (enforce), per cgroup, as a suggested `capture.egress.allow`.

use std::time::Duration;

use crate::cli::{ExitStatus, Global, Output, OutputFormat};
use crate::events::{EgressReport, EventStore, Filter};

/// `kt egress`.
#[derive(Debug, clap::Subcommand)]
pub enum EgressCmd {
    /// The destinations recorded or refused, per cgroup, and the allowlist
    /// that would let exactly those through (`--output json` for tools).
    Report(ReportArgs),
}

/// `kt egress report`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// Only events at most this old: 45s, 30m, 1h, 2d (default: all kept).
    #[arg(long, value_name = "DURATION", value_parser = super::events::parse_since)]
    pub since: Option<Duration>,
}

/// Runs `kt egress …`.
pub fn run(cmd: EgressCmd, global: &Global) -> anyhow::Result<ExitStatus> {
    match cmd {
        EgressCmd::Report(args) => {
            crate::cli::with_std_output(global, |out| report(&args, global, out))
        }
    }
}

fn report(args: &ReportArgs, global: &Global, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let events = match EventStore::open_read_only(&global.data_dir)? {
        Some(s) => s.query(&Filter {
            since: args.since,
            ..Filter::default()
        })?,
        None => Vec::new(),
    };
    let r = EgressReport::of(&events);
    if out.format() == OutputFormat::Json {
        serde_json::to_writer(&mut *out.out(), &r)?;
        writeln!(out.out())?;
        return Ok(ExitStatus::Success);
    }
    let w = out.out();
    if r.groups.is_empty() {
        writeln!(
            w,
            "no egress records (set capture.egress.mode: audit, run the jobs under `kt run`, then ask again)"
        )?;
        return Ok(ExitStatus::Success);
    }
    for g in &r.groups {
        let container = g
            .container_id
            .as_deref()
            .map(|c| format!(" (container {})", &c[..c.len().min(12)]))
            .unwrap_or_default();
        writeln!(w, "# cgroup {}{container}", g.cgroup)?;
        for d in &g.destinations {
            let name = d
                .name
                .as_deref()
                .map(|n| format!(" {n}"))
                .unwrap_or_default();
            let what = match (d.recorded, d.refused) {
                (r, 0) => format!("recorded {r}"),
                (0, f) => format!("REFUSED {f}"),
                (r, f) => format!("recorded {r}, REFUSED {f}"),
            };
            writeln!(
                w,
                "#   {} {}:{}{name}  {what}  by {}",
                d.proto,
                d.address,
                d.port,
                d.processes.join(", ")
            )?;
        }
    }
    writeln!(w, "capture:\n  egress:\n    mode: enforce\n    allow:")?;
    for a in &r.allow {
        writeln!(w, "      - \"{a}\"")?;
    }
    if !r.resolvers.is_empty() {
        writeln!(w, "    resolvers:")?;
        for a in &r.resolvers {
            writeln!(w, "      - \"{a}\"")?;
        }
    }
    Ok(ExitStatus::Success)
}
