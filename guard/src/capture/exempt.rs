//! Which sockets the connect hooks let through untouched: kt's own upstream
//! sockets, named by their socket cookie in `KT_EXEMPT`. A cookie is
//! assigned by the kernel, never reused while the system runs, and only kt
//! (holding the map) can write one in, so no client can claim an exemption
//! the way it could set a mark.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, OnceLock};

use aya::maps::{HashMap, MapData};
use guard_ebpf_common::map;

use super::CaptureError;

/// Exempts a socket from capture. The gateway calls it on every upstream
/// socket after creating it and before `connect()`; an error means the
/// socket must not be connected (it would be captured back into kt).
pub trait SocketExemption: Send + Sync {
    /// Registers `socket` so the connect hooks let it through.
    fn exempt(&self, socket: &socket2::Socket) -> Result<(), CaptureError>;
}

/// Capture is off: nothing to exempt from.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoExemption;

impl SocketExemption for NoExemption {
    fn exempt(&self, _socket: &socket2::Socket) -> Result<(), CaptureError> {
        Ok(())
    }
}

/// The exempt-cookie map of an attached [`Capture`](super::Capture).
#[derive(Clone)]
pub struct CaptureExemption {
    pub(super) map: Arc<Mutex<HashMap<MapData, u64, u8>>>,
}

impl std::fmt::Debug for CaptureExemption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureExemption").finish_non_exhaustive()
    }
}

impl SocketExemption for CaptureExemption {
    fn exempt(&self, socket: &socket2::Socket) -> Result<(), CaptureError> {
        let cookie = socket_cookie(socket).map_err(CaptureError::Cookie)?;
        let mut map = self.map.lock().map_err(|_| CaptureError::Map {
            name: map::EXEMPT,
            source: super::MapFault::Poisoned,
        })?;
        map.insert(cookie, 1, 0).map_err(|e| CaptureError::Map {
            name: map::EXEMPT,
            source: super::MapFault::Kernel(e),
        })
    }
}

/// An exemption installed after the gateway is built (the gateway exists
/// before the programs attach); until then every socket is refused an
/// exemption, so nothing is connected that capture would take back.
#[derive(Default)]
pub struct ExemptionSlot(OnceLock<Arc<dyn SocketExemption>>);

impl std::fmt::Debug for ExemptionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExemptionSlot")
            .field("installed", &self.0.get().is_some())
            .finish()
    }
}

impl ExemptionSlot {
    /// An empty slot.
    pub fn new() -> ExemptionSlot {
        ExemptionSlot::default()
    }

    /// Installs the exemption; later calls are ignored (the first one stays).
    pub fn install(&self, exemption: Arc<dyn SocketExemption>) {
        let _ = self.0.set(exemption);
    }
}

impl SocketExemption for ExemptionSlot {
    fn exempt(&self, socket: &socket2::Socket) -> Result<(), CaptureError> {
        match self.0.get() {
            Some(e) => e.exempt(socket),
            None => Err(CaptureError::NotAttached),
        }
    }
}

/// The kernel's cookie of a socket (`SO_COOKIE`), the key the eBPF
/// programs see through `bpf_get_socket_cookie`.
pub fn socket_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd for the duration of the call, an out-pointer to a
    // u64 and its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_COOKIE returned an unexpected length",
        ));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_distinct_and_stable_per_socket() {
        let a = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let b = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let ca = socket_cookie(&a).unwrap();
        assert_ne!(ca, 0);
        assert_eq!(socket_cookie(&a).unwrap(), ca);
        assert_ne!(socket_cookie(&b).unwrap(), ca);
    }

    #[test]
    fn an_empty_slot_refuses_and_an_installed_one_forwards() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let slot = ExemptionSlot::new();
        assert!(matches!(slot.exempt(&s), Err(CaptureError::NotAttached)));
        slot.install(Arc::new(NoExemption));
        assert!(slot.exempt(&s).is_ok());
    }
}
