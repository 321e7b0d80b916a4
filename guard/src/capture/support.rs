//! What `kt gateway check --verbose` reports about kernel support for capture.

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
        bpf_permitted: std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false),
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
