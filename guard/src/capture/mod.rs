//! Transparent capture: loads the embedded eBPF object, attaches it to a
//! cgroup-v2 directory, fills its maps, and answers "where was this accepted
//! connection going, and who opened it?", and exempts kt's own upstream
//! sockets by cookie. Every `aya` call and all `unsafe`
//! of the guard live in this module. Dropping a [`Capture`] detaches
//! everything.

mod cgroup;
pub mod egress;
mod exempt;
mod hostaddr;
pub mod hosts;
mod loader;
mod peer;
mod prefix;
mod process;
pub mod supervisor;
mod support;

pub use cgroup::{
    BPFFS_DEFAULT, CgroupError, bpffs_mount, cgroup2_mount, cgroup2_mount_in, ensure_bpffs,
};
pub use egress::{EgressRecords, EgressSeen, EgressSpec};
pub use exempt::{CaptureExemption, ExemptionSlot, NoExemption, SocketExemption, socket_cookie};
pub use hostaddr::{HostAddress, HostAddressError};
pub use loader::{Capture, CaptureSpec, ClientOrigin, ForeignListen, remove_pinned_capture};
pub use peer::{PeerProcess, find_socket, peer_process, peer_process_in};
pub use prefix::{PrefixError, prefix_of};
pub use process::{
    MAX_CMDLINE, ProcessInfo, cgroup_v2_path, container_id, format_cmdline, process_info,
    process_info_in,
};
pub use supervisor::{Programs, Retargeted, Supervisor, Targets};
pub use support::{
    KernelSupport, kernel_support, loaded_capture_programs, squat_warnings, unprivileged_port_start,
};

/// A boxed cause from aya (its program, object and link errors differ in type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong with an eBPF map.
#[derive(Debug, thiserror::Error)]
pub enum MapFault {
    /// The object has no map of that name.
    #[error("missing from the eBPF object")]
    Missing,
    /// A thread panicked while holding the map.
    #[error("its lock was poisoned by a panic")]
    Poisoned,
    /// The kernel refused an operation on it.
    #[error(transparent)]
    Kernel(#[from] aya::maps::MapError),
}

/// Errors from loading, attaching and reading the capture programs.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel refused to load the object or a program.
    #[error(
        "cannot load eBPF program {name} (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with cgroup-v2 BPF hooks)"
    )]
    Load {
        /// Program or object name.
        name: String,
        /// The loader's error.
        #[source]
        source: BoxError,
    },
    /// Attaching a program to the cgroup failed.
    #[error("cannot attach eBPF program {name} to {cgroup}")]
    Attach {
        /// Program name.
        name: String,
        /// The cgroup directory.
        cgroup: std::path::PathBuf,
        /// The loader's error.
        #[source]
        source: BoxError,
    },
    /// A map was missing from the object or could not be updated.
    #[error("eBPF map {name}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: MapFault,
    },
    /// A socket's cookie could not be read, so it cannot be exempted.
    #[error("cannot read the socket cookie (SO_COOKIE): {0}")]
    Cookie(#[source] std::io::Error),
    /// A socket was to be exempted before the capture programs were attached.
    #[error("capture is not attached yet: upstream sockets cannot be exempted")]
    NotAttached,
    /// The capture spec cannot work as given.
    #[error("invalid capture setup: {0}")]
    Spec(String),
}
