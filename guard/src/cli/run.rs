//! `kt run --config FILE [--cgroup DIR]`: the gateway plus transparent
//! capture. Every provider-bound connection from a process in the cgroup
//! (default: the whole host, the cgroup2 mount) goes through the gateway.
//! Foreground and systemd-friendly: logs on stderr; SIGINT/SIGTERM stop
//! accepting, finish in-flight requests, detach the programs, exit 0.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;

use crate::capture::{self, Capture, CaptureSpec, ExemptionSlot};
use crate::cli::hosts::{self as provider_hosts, SeenPrefixes};
use crate::cli::serve::{self, Assembled};
use crate::cli::{Global, exit};
use crate::config::{CaptureScope, Config, IpPrefix};
use crate::gateway::{CaptureLookup, Captured};
use crate::record::ClientInfo;

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
}

/// Runs `kt run`.
pub fn run(args: RunArgs, global: &Global) -> anyhow::Result<u8> {
    let config = match crate::cli::load_config(&args.config, global)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if !config.capture.enabled {
        eprintln!("kt: capture.enabled is false: serving explicit clients only");
        return crate::cli::gateway_run::run_with(config, args.listen, global);
    }
    let cgroup = match args
        .cgroup
        .clone()
        .or_else(|| config.capture.cgroup.clone())
    {
        Some(c) => c,
        None => capture::cgroup2_mount().context("finding the cgroup2 mount")?,
    };
    let static_prefixes = config.capture.cidrs.clone();
    let hosts = capture_hosts(&config);
    let ports = config.capture.ports.clone();
    let scope = config.capture.scope;
    let (listen4, listen6) = (
        config.gateway.capture_listen,
        config.gateway.capture_listen6,
    );

    let pin_dir = pin_dir_for(&args, &cgroup);
    match &pin_dir {
        Some(d) => tracing::info!(dir = %d.display(), "capture links pinned"),
        None => tracing::warn!(
            "capture links are not pinned, so if kt dies capture is gone until it runs again (mount a bpffs: mount -t bpf bpf /sys/fs/bpf)"
        ),
    }
    let mut capture_addrs = vec![listen4];
    capture_addrs.extend(listen6);
    for w in capture::squat_warnings(&capture_addrs, capture::unprivileged_port_start()) {
        eprintln!("kt: warning: {w}");
    }
    if args.keep_attached && pin_dir.is_none() {
        bail!(
            "--keep-attached needs pinned links: mount a bpffs (mount -t bpf bpf /sys/fs/bpf) or pass --pin-dir"
        );
    }

    let runtime = serve::runtime()?;
    let _guard = runtime.enter();
    // The gateway exists before the programs attach; its upstream sockets
    // are exempted through this slot once they are.
    let exemption = Arc::new(ExemptionSlot::new());
    let Assembled { gateway, events } = match serve::assemble(config, global, exemption.clone())? {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };

    let result = runtime.block_on(async {
        // Listeners first: from the moment the programs attach, matched
        // connections land here (or are refused), never on the real address.
        let explicit = gateway.bind(args.listen).await.context("binding the explicit listener")?;
        let cap4 = TcpListener::bind(listen4)
            .await
            .with_context(|| format!("binding the capture listener {listen4}"))?;
        let cap6 = match listen6 {
            Some(a) => match TcpListener::bind(a).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(addr = %a, error = %e, "no IPv6 capture listener: matched IPv6 connections will be refused");
                    None
                }
            },
            None => None,
        };
        let SocketAddr::V4(l4) = cap4.local_addr()? else {
            bail!("gateway.capture_listen must be an IPv4 address (got {listen4})");
        };
        let l6 = match cap6.as_ref().map(TcpListener::local_addr).transpose()? {
            Some(SocketAddr::V6(a)) => Some(a),
            _ => None,
        };

        let mut seen = SeenPrefixes::new(provider_hosts::RETAIN, provider_hosts::MAX_KEPT);
        seen.update(&provider_hosts::resolve(&hosts, &ports).await, Instant::now());
        let mut prefixes = static_prefixes.clone();
        prefixes.extend(seen.prefixes());
        if prefixes.is_empty() {
            bail!("nothing to capture: capture.hosts did not resolve and capture.cidrs is empty");
        }
        let spec = CaptureSpec {
            cgroup: cgroup.clone(),
            listen4: l4,
            listen6: l6,
            prefixes,
            ports: ports.clone(),
            port_wide: scope == CaptureScope::Port,
            own_ports: vec![explicit.local_addr()?.port()],
            refuse_udp: true,
            refuse_other_netns: true,
            pin_dir: pin_dir.clone(),
            keep_attached: args.keep_attached && pin_dir.is_some(),
        };
        let capture = Arc::new(
            Capture::attach(&spec)
                .with_context(|| format!("attaching capture to {}", cgroup.display()))?,
        );
        exemption.install(Arc::new(capture.exemption()));
        let explicit_addr = explicit.local_addr()?;
        let what = match scope {
            CaptureScope::Provider => describe(&spec.prefixes, &hosts),
            CaptureScope::Port => format!(
                "every destination (port-wide; provider prefixes {})",
                describe(&spec.prefixes, &hosts)
            ),
        };
        eprintln!(
            "kt: capturing {what} port(s) {:?} for {} (capture listener {l4}{}); explicit clients on http://{explicit_addr}; targets: {}",
            ports,
            cgroup.display(),
            l6.map(|a| format!(", {a}")).unwrap_or_default(),
            gateway.active_targets().join(", ")
        );

        // Provider addresses move; keep the tries current.
        let refresher = {
            let capture = capture.clone();
            let hosts = hosts.clone();
            let ports = ports.clone();
            tokio::spawn(async move {
                if hosts.is_empty() {
                    return;
                }
                loop {
                    tokio::time::sleep(provider_hosts::RESOLVE_EVERY).await;
                    let resolved = provider_hosts::resolve(&hosts, &ports).await;
                    if resolved.is_empty() {
                        tracing::warn!("provider hosts did not resolve; keeping the previous addresses");
                        continue;
                    }
                    let added = seen.update(&resolved, Instant::now());
                    for p in &added {
                        tracing::info!(addr = %p.addr, "provider address added to capture");
                    }
                    let mut p = static_prefixes.clone();
                    p.extend(seen.prefixes());
                    if let Err(e) = capture.set_prefixes(&p) {
                        tracing::error!(error = %e, "could not update captured prefixes");
                    }
                }
            })
        };

        serve::stop_on_signal(
            &gateway,
            "finishing in-flight requests, then detaching capture",
        );
        let lookup: Arc<dyn CaptureLookup> = Arc::new(Lookup(capture.clone()));
        let g4 = gateway.clone();
        let lk4 = lookup.clone();
        let t4 = tokio::spawn(async move { g4.serve_capture_listener(cap4, lk4).await });
        let t6 = cap6.map(|l| {
            let g = gateway.clone();
            let lk = lookup.clone();
            tokio::spawn(async move { g.serve_capture_listener(l, lk).await })
        });
        gateway.serve_explicit(explicit).await.context("serving explicit clients")?;
        let _ = t4.await;
        if let Some(t) = t6 {
            let _ = t.await;
        }
        refresher.abort();
        // Wait until the aborted task has dropped its handle on the capture.
        let _ = refresher.await;
        drop(lookup);
        // Detach only after every listener is closed: fail closed to the end.
        match Arc::try_unwrap(capture) {
            Ok(c) => drop(c),
            Err(_) => tracing::warn!("capture still referenced at exit; programs detach when the process ends"),
        }
        Ok::<_, anyhow::Error>(())
    });
    serve::close_events(events);
    result?;
    if args.keep_attached {
        eprintln!("kt: stopped; capture left attached (fail closed until kt runs again)");
    } else {
        eprintln!("kt: stopped; capture detached");
    }
    Ok(exit::OK)
}

/// `--pin-dir`, else `<bpffs>/kt/cg-<inode>`, mounting a bpffs when none
/// is mounted; `None` (with a warning) when that fails.
fn pin_dir_for(args: &RunArgs, cgroup: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if let Some(d) = &args.pin_dir {
        return Some(d.clone());
    }
    let ino = match std::fs::metadata(cgroup) {
        Ok(m) => m.ino(),
        Err(e) => {
            tracing::warn!(cgroup = %cgroup.display(), error = %e, "cannot stat the cgroup");
            return None;
        }
    };
    let bpffs = match capture::ensure_bpffs() {
        Ok((dir, true)) => {
            tracing::info!(dir = %dir.display(), "no bpffs was mounted: mounted one to pin capture links");
            dir
        }
        Ok((dir, false)) => dir,
        Err(e) => {
            tracing::warn!(error = %e, "cannot mount a bpffs");
            return None;
        }
    };
    Some(bpffs.join("kt").join(format!("cg-{ino}")))
}

/// Hosts whose addresses are captured: `capture.hosts`, else the official
/// hosts of the providers in use and the hosts of targets' `base_url`s.
pub fn capture_hosts(config: &Config) -> Vec<String> {
    if let Some(h) = &config.capture.hosts {
        return h.clone();
    }
    let mut hosts = Vec::new();
    for t in &config.providers.targets {
        let url = t
            .base_url
            .clone()
            .or_else(|| t.provider.default_base_url().map(str::to_string));
        if let Some(host) = url.as_deref().and_then(host_of)
            && !hosts.contains(&host)
        {
            hosts.push(host);
        }
    }
    hosts
}

fn host_of(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    // Loopback targets (tests, local models) are never captured by name.
    if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "localhost" {
        return None;
    }
    Some(host.to_string())
}

fn describe(prefixes: &[IpPrefix], hosts: &[String]) -> String {
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

/// Answers the gateway's "who is this?" from the kernel's record and /proc.
struct Lookup(Arc<Capture>);

impl CaptureLookup for Lookup {
    fn strict(&self) -> bool {
        true
    }

    fn lookup(&self, peer: SocketAddr, _local: SocketAddr) -> Option<Captured> {
        let origin = self.0.take_origin(peer)?;
        let p = capture::process_info(origin.pid);
        Some(Captured {
            original: origin.original,
            provider_prefix: origin.provider_prefix,
            client: ClientInfo {
                pid: Some(origin.pid),
                uid: Some(origin.uid),
                cgroup_id: Some(origin.cgroup_id),
                exe: p.exe,
                cmdline: p.cmdline,
                cgroup: p.cgroup,
                container_id: p.container_id,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_capture_hosts_are_provider_hosts_not_loopback() {
        let mut c = crate::config::parse(
            "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {env: A}\n    - id: b\n      provider: anthropic\n      secret_key_ref: {env: B}\n    - id: c\n      provider: openai\n      base_url: https://127.0.0.1:9999/v1\n      secret_key_ref: {env: C}\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        assert_eq!(
            capture_hosts(&c),
            vec!["api.openai.com", "api.anthropic.com"]
        );
        c.capture.hosts = Some(vec![]);
        assert!(capture_hosts(&c).is_empty());
    }
}
