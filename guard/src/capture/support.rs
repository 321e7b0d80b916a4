//! What `kt gateway check --verbose` reports about kernel support for capture.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Kernel facts that decide whether capture can work here.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelSupport {
    /// The cgroup-v2 mount, when there is one.
    pub cgroup2: Option<PathBuf>,
    /// Whether this process may load BPF programs (root; CAP_BPF is not probed).
    pub bpf_permitted: bool,
    /// Whether the kernel exposes BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: bool,
    /// `uname -r`.
    pub kernel_release: Option<String>,
}

impl KernelSupport {
    /// Whether capture can be attached.
    pub fn capture_possible(&self) -> bool {
        self.cgroup2.is_some() && self.bpf_permitted
    }
}

/// Probes the running kernel without changing anything.
pub fn kernel_support() -> KernelSupport {
    use std::os::unix::fs::MetadataExt;
    KernelSupport {
        cgroup2: super::cgroup2_mount().ok(),
        bpf_permitted: std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
    }
}

/// Names of kt capture programs currently loaded in the kernel (by any
/// process): how `kt gateway check --verbose` tells whether capture is live.
/// Kernel program names are cut to 15 bytes, so prefixes are compared.
pub fn loaded_capture_programs() -> Vec<String> {
    let mut names: Vec<String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| {
            guard_ebpf_common::prog::ALL
                .iter()
                .any(|full| full.starts_with(n.as_str()) && !n.is_empty())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Where the kernel says which ports need privilege to bind.
const UNPRIVILEGED_PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";

/// The lowest port any user may bind in this network namespace
/// (`net.ipv4.ip_unprivileged_port_start`); `None` when unreadable.
pub fn unprivileged_port_start() -> Option<u16> {
    std::fs::read_to_string(UNPRIVILEGED_PORT_START)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Warnings for capture listeners another local user could bind while kt
/// is down (pinned programs still send matched connections to them, keys
/// included). `unprivileged_start`: from [`unprivileged_port_start`]; the
/// kernel default 1024 when unknown.
pub fn squat_warnings(listeners: &[SocketAddr], unprivileged_start: Option<u16>) -> Vec<String> {
    let start = unprivileged_start.unwrap_or(1024);
    listeners
        .iter()
        .filter(|a| a.port() == 0 || a.port() >= start)
        .map(|a| {
            if a.port() == 0 || a.port() >= 1024 {
                format!(
                    "capture listener {a} is on an unprivileged port: while kt is down any local user can bind it and receive the captured connections, keys included; use a port below 1024 (default 127.0.0.1:709)"
                )
            } else {
                format!(
                    "net.ipv4.ip_unprivileged_port_start is {start}, so any local user can bind capture listener {a} while kt is down and receive the captured connections, keys included; raise it (sysctl -w net.ipv4.ip_unprivileged_port_start=1024)"
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squattable_capture_ports_are_named() {
        let low: SocketAddr = "127.0.0.1:709".parse().unwrap();
        let high: SocketAddr = "127.0.0.1:8788".parse().unwrap();
        assert!(squat_warnings(&[low], Some(1024)).is_empty());
        assert!(squat_warnings(&[low], None).is_empty());
        let w = squat_warnings(&[low, high], Some(1024));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("8788") && w[0].contains("below 1024"),
            "{w:?}"
        );
        // A lowered sysctl (as container runtimes set it) opens the low port too.
        let w = squat_warnings(&[low], Some(0));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("ip_unprivileged_port_start is 0"), "{w:?}");
    }
}
