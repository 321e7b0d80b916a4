//! `kt run --config FILE [--cgroup DIR]`: the gateway plus transparent
//! capture. Every provider-bound connection from a process in the cgroup
//! (default: the whole host, the cgroup2 mount) goes through the gateway.
//! Foreground and systemd-friendly: logs on stderr; SIGINT/SIGTERM stop
//! accepting, finish in-flight requests, detach the programs, exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::app::{self, CapturePlan};
use crate::capture::Capture;
use crate::cli::{ExitStatus, Global};
use crate::config::IpPrefix;

/// Arguments of `kt run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// The policy config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// cgroup-v2 directory to capture (default: `capture.cgroup`, else the
    /// cgroup2 mount, i.e. the whole host).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Listen address for explicit clients (overrides `gateway.listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Directory on a bpffs to pin the capture links in [default: the first
    /// bpffs mount + `/kt/cg-<cgroup inode>`; with no bpffs mounted, kt
    /// mounts one on /sys/fs/bpf first, as systemd does]. Pinned links
    /// outlive a crash of kt (matched connections are then refused, never
    /// let through) and are replaced without a gap by the next `kt run`.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// On SIGINT/SIGTERM leave the pinned programs attached, so a planned
    /// restart stays fail-closed (provider connections are refused until kt
    /// runs again).
    #[arg(long)]
    pub keep_attached: bool,
    /// Observe only (overrides `gateway.mode`, also across reloads): record
    /// who presents which key, forward each client's own credential, block
    /// nothing (DLP findings recorded as would-block).
    #[arg(long)]
    pub observe: bool,
}

/// Runs `kt run`.
pub fn run(args: RunArgs, global: &Global) -> anyhow::Result<ExitStatus> {
    let Some(mut config) =
        crate::cli::with_std_output(global, |out| crate::cli::load_config(&args.config, out))?
    else {
        return Ok(ExitStatus::Failure);
    };
    if args.observe {
        config.gateway.mode = crate::config::GatewayMode::Observe;
    }
    if !config.capture.enabled {
        eprintln!("kt: capture.enabled is false: serving explicit clients only");
        return super::gateway::serve_explicit(config, args.listen, global);
    }
    let plan = CapturePlan::for_config(
        &config,
        args.cgroup.clone(),
        args.pin_dir.clone(),
        args.keep_attached,
    )?;
    for w in &plan.warnings {
        eprintln!("kt: warning: {w}");
    }

    let runtime = app::runtime().context("starting the async runtime")?;
    let _guard = runtime.enter();
    let Some(app) = super::gateway::build(config, global, true)? else {
        return Ok(ExitStatus::Failure);
    };
    super::gateway::stop_on_signal(
        app.gateway(),
        "finishing in-flight requests, then detaching capture",
    );
    let stopped = runtime.block_on(app.run_with_capture(
        plan,
        args.listen,
        Capture::attach,
        &super::gateway::render_notice,
    ))?;
    if !stopped.events_flushed {
        eprintln!("kt: warning: some events could not be written before exit");
    }
    if args.keep_attached {
        eprintln!("kt: stopped; capture left attached (fail closed until kt runs again)");
    } else {
        eprintln!("kt: stopped; capture detached");
    }
    Ok(ExitStatus::Success)
}

/// The captured prefixes for a log line: the first few, then a count.
pub(crate) fn describe(prefixes: &[IpPrefix], hosts: &[String]) -> String {
    let list: Vec<String> = prefixes
        .iter()
        .take(6)
        .map(|p| format!("{}/{}", p.addr, p.len))
        .collect();
    let more = prefixes.len().saturating_sub(6);
    format!(
        "{}{}{}",
        list.join(" "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
        if hosts.is_empty() {
            String::new()
        } else {
            format!(" ({})", hosts.join(", "))
        }
    )
}
