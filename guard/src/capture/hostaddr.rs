//! A kt-owned address on the host's loopback interface: where connections
//! captured in other network namespaces (containers on bridges) are sent.
//!
//! Why one address of kt's own rather than each bridge's gateway address:
//! a container reaches every local address of the host through its default
//! route (the packet arrives on its bridge and is delivered locally, with
//! its source address untouched: masquerade applies only to packets leaving
//! the host), so one address serves docker0, every user-defined Docker
//! network, podman and CNI bridges alike, including bridges made after kt
//! started (GitLab's network per job), and the connect hook needs no table
//! from namespace to bridge. Added with netlink (no `ip` binary needed),
//! removed when this is dropped.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Errors adding or removing the address.
#[derive(Debug, thiserror::Error)]
pub enum HostAddressError {
    /// The loopback interface was not found.
    #[error("no loopback interface `lo` in kt's network namespace")]
    NoLoopback,
    /// The kernel refused (needs root or CAP_NET_ADMIN).
    #[error("cannot add {addr} to the loopback interface (needs root or CAP_NET_ADMIN)")]
    Netlink {
        /// The address.
        addr: IpAddr,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The address is one a container would reach in its own namespace.
    #[error(
        "{0} cannot take containers' connections: a loopback, unspecified or multicast address is the container's own"
    )]
    Unusable(IpAddr),
}

/// An address kt added to `lo`; removed again on drop.
#[derive(Debug)]
pub struct HostAddress {
    addr: IpAddr,
    ifindex: u32,
}

impl HostAddress {
    /// Adds `addr` (/32 or /128) to `lo`. An address already there (left by
    /// a kt that was killed) is taken over: it is kt's by configuration,
    /// and removed when this is dropped.
    pub fn add(addr: IpAddr) -> Result<HostAddress, HostAddressError> {
        if addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
            return Err(HostAddressError::Unusable(addr));
        }
        // SAFETY: a NUL-terminated constant string.
        let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        if ifindex == 0 {
            return Err(HostAddressError::NoLoopback);
        }
        match change(libc::RTM_NEWADDR, addr, ifindex) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                tracing::info!(%addr, "container address already on lo (left by an earlier run): taken over");
            }
            Err(source) => return Err(HostAddressError::Netlink { addr, source }),
        }
        Ok(HostAddress { addr, ifindex })
    }

    /// The address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        match change(libc::RTM_DELADDR, self.addr, self.ifindex) {
            Ok(()) => tracing::debug!(addr = %self.addr, "container address removed from lo"),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            Err(e) => {
                tracing::warn!(addr = %self.addr, error = %e, "cannot remove the container address from lo");
            }
        }
    }
}

/// `IFA_F_NODAD`: no duplicate address detection (the address is ours alone).
const IFA_F_NODAD: u32 = 0x02;
const IFA_FLAGS: u16 = 8;

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// The RTM_NEWADDR/RTM_DELADDR request for `addr` on `ifindex`.
fn request(kind: u16, addr: IpAddr, ifindex: u32) -> Vec<u8> {
    let (family, prefix, octets): (u8, u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, 32, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, a.octets().to_vec()),
    };
    let mut flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    if kind == libc::RTM_NEWADDR {
        flags |= (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    }
    let mut msg = Vec::with_capacity(64);
    // nlmsghdr: length (patched below), type, flags, sequence, port id.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // ifaddrmsg: family, prefix length, flags, scope (universe), index.
    msg.extend_from_slice(&[family, prefix, 0, 0]);
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    attr(&mut msg, libc::IFA_LOCAL, &octets);
    attr(&mut msg, libc::IFA_ADDRESS, &octets);
    attr(&mut msg, IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// Sends one address request and waits for the kernel's acknowledgement.
fn change(kind: u16, addr: IpAddr, ifindex: u32) -> io::Result<()> {
    // SAFETY: plain socket call; the result is checked and owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let msg = request(kind, addr, ifindex);
    // SAFETY: a zeroed sockaddr_nl addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid buffer and address with their lengths.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: valid buffer with its length.
    let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_ack(&buf[..got as usize])
}

/// The kernel's NLMSG_ERROR answer: 0 is the acknowledgement, otherwise a
/// negative errno.
fn parse_ack(buf: &[u8]) -> io::Result<()> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected netlink answer");
    let kind = u16::from_ne_bytes(
        buf.get(4..6)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    if kind != libc::NLMSG_ERROR as u16 {
        return Err(bad());
    }
    let code = i32::from_ne_bytes(
        buf.get(16..20)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_address_and_nodad() {
        let m = request(libc::RTM_NEWADDR, "169.254.107.116".parse().unwrap(), 1);
        assert_eq!(
            u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 32);
        // IFA_LOCAL's data right after its header.
        assert_eq!(&m[28..32], &[169, 254, 107, 116]);
        let m6 = request(libc::RTM_DELADDR, "fd6b:7400::1".parse().unwrap(), 1);
        assert_eq!(m6[17], 128);
        let flags = u16::from_ne_bytes(m6[6..8].try_into().unwrap());
        assert_eq!(flags & libc::NLM_F_CREATE as u16, 0);
    }

    #[test]
    fn acks_and_errors_are_told_apart() {
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        assert!(parse_ack(&ack).is_ok());
        ack[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(
            parse_ack(&ack).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert!(parse_ack(&[0; 3]).is_err());
        assert!(HostAddress::add("127.0.0.9".parse().unwrap()).is_err());
    }
}
