//! Loading, attaching and reading the capture programs.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, SockOps};
use guard_ebpf_common::{
    AF_INET, AF_INET6, CaptureConfig, FLAG_CAPTURE_OTHER_NETNS, FLAG_ENABLED, FLAG_PORT_SCOPE,
    FLAG_REFUSE_OTHER_NETNS, FLAG_REFUSE_UDP, MAX_OWN_PORTS, MAX_PORTS, ORIGIN_PROVIDER_PREFIX,
    Origin, PeerKey, map, prog,
};

use super::exempt::CaptureExemption;
use super::prefix::split;
use super::{BoxError, CaptureError, MapFault};
use crate::config::IpPrefix;

/// The eBPF object built by `build.rs` from `guard-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard-ebpf"));

/// What to capture and where to send it.
#[derive(Clone, Debug)]
pub struct CaptureSpec {
    /// cgroup-v2 directory to attach to (never the root on shared machines).
    pub cgroup: PathBuf,
    /// IPv4 capture listener; IPv4 and IPv4-mapped destinations go here.
    pub listen4: SocketAddrV4,
    /// IPv6 capture listener; without one, matched IPv6 connections are refused.
    pub listen6: Option<SocketAddrV6>,
    /// Destination prefixes to capture.
    pub prefixes: Vec<IpPrefix>,
    /// Destination ports to capture; TCP to other ports of the prefixes is
    /// refused.
    pub ports: Vec<u16>,
    /// Port-wide scope: TCP to `ports` is captured whatever the destination,
    /// not only the prefixes (the record says which it was).
    pub port_wide: bool,
    /// Ports kt itself listens on besides the capture listeners (the
    /// explicit listener): with `port_wide`, loopback connections to them
    /// are left alone.
    pub own_ports: Vec<u16>,
    /// Refuse UDP (any port) to captured prefixes (QUIC), so clients use TCP.
    pub refuse_udp: bool,
    /// Refuse matched connections from other network namespaces (unless
    /// `containers` captures them).
    pub refuse_other_netns: bool,
    /// Capture matched connections from other network namespaces
    /// (containers on bridges) to these listeners instead of refusing them;
    /// needs `refuse_other_netns` (which tells kt's own namespace apart).
    pub containers: Option<ForeignListen>,
    /// A directory on a bpffs where the links are pinned, so the programs
    /// outlive a crash of this process (matched connections are then
    /// refused, never let through) and a restart replaces them without a
    /// gap. `None`: links live and die with this process.
    pub pin_dir: Option<PathBuf>,
    /// Leave the pinned links in place when this is dropped (a planned
    /// restart stays fail-closed); only meaningful with `pin_dir`.
    pub keep_attached: bool,
}

/// Listeners for connections from other network namespaces: addresses of
/// the host that a container reaches through its default route (never
/// loopback: that would be the container's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForeignListen {
    /// IPv4 (and IPv4-mapped) destinations go here; `None`: refused.
    pub listen4: Option<SocketAddrV4>,
    /// IPv6 destinations go here; `None`: refused.
    pub listen6: Option<SocketAddrV6>,
}

/// Who opened a captured connection and where it was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientOrigin {
    /// The destination the process asked for.
    pub original: SocketAddr,
    /// Its process id (thread group id).
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Its cgroup id (the inode number of its cgroup-v2 directory).
    pub cgroup_id: u64,
    /// Its network namespace cookie.
    pub netns_cookie: u64,
    /// Whether `original` was inside the provider prefixes (always true
    /// unless capture is port-wide).
    pub provider_prefix: bool,
}

type PeerMap = HashMap<MapData, PeerKey, Origin>;
type PortMap = HashMap<MapData, u16, u8>;

/// Attached capture programs. Dropping this detaches them.
pub struct Capture {
    // Field order matters: maps and links go before the object they came from.
    links: Vec<Link>,
    pins: Option<PinSet>,
    by_peer: Mutex<PeerMap>,
    exempt: CaptureExemption,
    prefix4: Mutex<LpmTrie<MapData, [u8; 4], u32>>,
    prefix6: Mutex<LpmTrie<MapData, [u8; 16], u32>>,
    ports: Mutex<PortMap>,
    /// Declared proxies and strict egress (see `egress.rs`).
    pub(super) egress: super::egress::EgressMaps,
    cgroup: PathBuf,
    ebpf: Ebpf,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |e| CaptureError::Map {
        name,
        source: MapFault::Kernel(e),
    }
}

impl Capture {
    /// Loads the programs, fills the maps and attaches to `spec.cgroup`.
    pub fn attach(spec: &CaptureSpec) -> Result<Capture, CaptureError> {
        if spec.ports.is_empty() {
            return Err(CaptureError::Spec("no ports to capture".into()));
        }
        let cgroup = File::open(&spec.cgroup).map_err(|source| CaptureError::Cgroup {
            path: spec.cgroup.clone(),
            source,
        })?;
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| CaptureError::Load {
            name: "guard-ebpf".into(),
            source: Box::new(e),
        })?;

        // Maps first, so no program ever runs with an empty config.
        let config = capture_config(spec);
        let mut cfg_map: Array<_, CaptureConfig> = Array::try_from(
            ebpf.map_mut(map::CONFIG)
                .ok_or_else(|| missing(map::CONFIG))?,
        )
        .map_err(map_err(map::CONFIG))?;
        cfg_map.set(0, config, 0).map_err(map_err(map::CONFIG))?;
        let own = own_ports(spec);
        if own.len() > MAX_OWN_PORTS as usize {
            return Err(CaptureError::Spec(format!(
                "kt listens on {} ports; at most {MAX_OWN_PORTS} can be told apart",
                own.len()
            )));
        }
        let mut own_map: HashMap<_, u16, u8> = HashMap::try_from(
            ebpf.map_mut(map::OWN_PORTS)
                .ok_or_else(|| missing(map::OWN_PORTS))?,
        )
        .map_err(map_err(map::OWN_PORTS))?;
        for port in &own {
            own_map
                .insert(port, 1, 0)
                .map_err(map_err(map::OWN_PORTS))?;
        }

        let prefix4 =
            LpmTrie::try_from(take(&mut ebpf, map::PREFIX4)?).map_err(map_err(map::PREFIX4))?;
        let prefix6 =
            LpmTrie::try_from(take(&mut ebpf, map::PREFIX6)?).map_err(map_err(map::PREFIX6))?;
        let ports = HashMap::try_from(take(&mut ebpf, map::PORTS)?).map_err(map_err(map::PORTS))?;
        let by_peer =
            HashMap::try_from(take(&mut ebpf, map::BY_PEER)?).map_err(map_err(map::BY_PEER))?;
        let exempt =
            HashMap::try_from(take(&mut ebpf, map::EXEMPT)?).map_err(map_err(map::EXEMPT))?;
        let egress = super::egress::EgressMaps::take(&mut ebpf)?;

        let capture = Capture {
            links: Vec::new(),
            pins: None,
            by_peer: Mutex::new(by_peer),
            exempt: CaptureExemption {
                map: Arc::new(Mutex::new(exempt)),
            },
            prefix4: Mutex::new(prefix4),
            prefix6: Mutex::new(prefix6),
            ports: Mutex::new(ports),
            egress,
            cgroup: spec.cgroup.clone(),
            ebpf,
        };
        capture.set_ports(&spec.ports)?;
        capture.set_prefixes(&spec.prefixes)?;
        let mut capture = capture;
        // Links left pinned by an earlier run (a crash, or keep_attached)
        // stay until ours are attached: no moment without capture.
        let stale = match &spec.pin_dir {
            Some(dir) => earlier_pins(dir),
            None => Vec::new(),
        };
        capture.attach_all(&cgroup, spec)?;
        for dir in stale {
            remove_pins(&dir);
        }
        tracing::info!(cgroup = %spec.cgroup.display(), "capture programs attached");
        Ok(capture)
    }

    fn attach_all(&mut self, cgroup: &File, spec: &CaptureSpec) -> Result<(), CaptureError> {
        let load_err = |name: &str, e: BoxError| CaptureError::Load {
            name: name.to_string(),
            source: e,
        };
        let cgroup_path = self.cgroup.clone();
        let attach_err = |name: &str, e: BoxError| CaptureError::Attach {
            name: name.to_string(),
            cgroup: cgroup_path.clone(),
            source: e,
        };
        let pin_dir = match &spec.pin_dir {
            Some(d) => {
                // Unique per attach, so a new run (even one reusing a pid)
                // never collides with the pins it is about to replace.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_nanos());
                let own = d.join(format!("{}-{nanos}", std::process::id()));
                std::fs::create_dir_all(&own).map_err(|e| {
                    CaptureError::Spec(format!(
                        "cannot create pin directory {}: {e}",
                        own.display()
                    ))
                })?;
                self.pins = Some(PinSet {
                    dir: own.clone(),
                    keep: spec.keep_attached,
                });
                Some(own)
            }
            None => None,
        };
        for name in prog::ALL {
            let Some(program) = self.ebpf.program_mut(name) else {
                return Err(load_err(name, "missing from the object".into()));
            };
            // On kernels with BPF links (5.7+, what aya uses there) the kernel
            // requires flags 0 and link attachments always coexist with other
            // tools' programs; `Single` is the variant that passes 0.
            let mode = CgroupAttachMode::Single;
            let fd_link: FdLink = if name == prog::SOCK_OPS {
                let p: &mut SockOps = program
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| load_err(name, e.into()))?;
                p.load().map_err(|e| load_err(name, e.into()))?;
                let id = p
                    .attach(cgroup, mode)
                    .map_err(|e| attach_err(name, e.into()))?;
                let link = p.take_link(id).map_err(|e| attach_err(name, e.into()))?;
                FdLink::try_from(link).map_err(|e| attach_err(name, e.into()))?
            } else {
                let p: &mut CgroupSockAddr = program
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| load_err(name, e.into()))?;
                p.load().map_err(|e| load_err(name, e.into()))?;
                let id = p
                    .attach(cgroup, mode)
                    .map_err(|e| attach_err(name, e.into()))?;
                let link = p.take_link(id).map_err(|e| attach_err(name, e.into()))?;
                FdLink::try_from(link).map_err(|e| attach_err(name, e.into()))?
            };
            // An early return drops `self`, and with it every link attached
            // so far (and its pin, see Drop).
            let link = match &pin_dir {
                Some(dir) => Link::Pinned(
                    fd_link
                        .pin(dir.join(name))
                        .map_err(|e| attach_err(name, e.into()))?,
                ),
                None => Link::Fd(fd_link),
            };
            self.links.push(link);
        }
        Ok(())
    }

    /// Replaces the captured prefixes in place, on the attached programs
    /// (when provider hosts re-resolve, and on reload). New entries go in
    /// before stale ones come out, so an address in both sets is never let
    /// through.
    pub fn set_prefixes(&self, prefixes: &[IpPrefix]) -> Result<(), CaptureError> {
        let (v4, v6) = split(prefixes).map_err(|e| CaptureError::Spec(e.to_string()))?;
        replace_trie(&self.prefix4, map::PREFIX4, &v4)?;
        replace_trie(&self.prefix6, map::PREFIX6, &v6)?;
        Ok(())
    }

    /// Replaces the captured ports in place, on the attached programs (on
    /// reload). A port in both sets is never removed, so its connections are
    /// captured throughout.
    pub fn set_ports(&self, ports: &[u16]) -> Result<(), CaptureError> {
        let mut wanted = ports.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Err(CaptureError::Spec("no ports to capture".into()));
        }
        if wanted.len() > MAX_PORTS as usize {
            return Err(CaptureError::Spec(format!(
                "{} ports to capture; at most {MAX_PORTS} fit",
                wanted.len()
            )));
        }
        let mut map = self.ports.lock().map_err(|_| CaptureError::Map {
            name: map::PORTS,
            source: MapFault::Poisoned,
        })?;
        let old: Vec<u16> = map.keys().filter_map(Result::ok).collect();
        let stale: Vec<u16> = old
            .iter()
            .copied()
            .filter(|p| !wanted.contains(p))
            .collect();
        let fresh: Vec<u16> = wanted
            .iter()
            .copied()
            .filter(|p| !old.contains(p))
            .collect();
        // New ports first, as for prefixes. If old and new together do not
        // fit the map, the stale ones go first: kept ports are untouched
        // either way, and a port on its way out is only let go earlier.
        let room = old.len() + fresh.len() <= MAX_PORTS as usize;
        if !room {
            remove_ports(&mut map, &stale);
        }
        for port in &fresh {
            map.insert(port, 1, 0).map_err(map_err(map::PORTS))?;
        }
        if room {
            remove_ports(&mut map, &stale);
        }
        Ok(())
    }

    /// The exemption for kt's own upstream sockets (their cookies go into
    /// this capture's map before they connect). It keeps the map open, not
    /// the programs: after this is dropped it exempts into a map nothing reads.
    pub fn exemption(&self) -> CaptureExemption {
        self.exempt.clone()
    }

    /// The cgroup this is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Takes the record for an accepted connection whose peer (the client's
    /// own address) is `peer`. `None` when the connection was not redirected
    /// by these programs.
    pub fn take_origin(&self, peer: SocketAddr) -> Option<ClientOrigin> {
        let key = peer_key(peer);
        let mut map = self.by_peer.lock().ok()?;
        let origin = map.get(&key, 0).ok()?;
        // Best effort: LRU eviction reclaims it anyway.
        let _ = map.remove(&key);
        decode_origin(&origin)
    }
}

/// An attached program's link: dropping an `Fd` detaches it; a `Pinned`
/// one is unpinned first unless the capture keeps its pins.
enum Link {
    Fd(
        #[allow(
            dead_code,
            reason = "held only so the link stays attached until dropped"
        )]
        FdLink,
    ),
    Pinned(PinnedLink),
}

/// This process's pin directory.
struct PinSet {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let keep = self.pins.as_ref().is_some_and(|p| p.keep);
        for link in self.links.drain(..) {
            match link {
                Link::Fd(l) => drop(l),
                Link::Pinned(p) if keep => drop(p),
                Link::Pinned(p) => {
                    if let Err(e) = p.unpin() {
                        tracing::warn!(error = %e, "cannot unpin a capture link");
                    }
                }
            }
        }
        if let Some(p) = &self.pins
            && !p.keep
        {
            let _ = std::fs::remove_dir(&p.dir);
        }
    }
}

/// Pin directories of earlier runs under `dir` (taken before this run
/// creates its own).
fn earlier_pins(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

/// Detaches every capture link pinned under `root` (the `kt` directory on
/// a bpffs: `<root>/cg-<cgroup inode>/<pid>-<nanos>/<program>`, the layout
/// `kt run` pins in) and removes the directories. What `kt service
/// uninstall` runs after stopping kt, whose `--keep-attached` left the links
/// in place. Returns how many links were detached; a missing `root` is zero.
pub fn remove_pinned_capture(root: &Path) -> usize {
    let mut detached = 0;
    for cgroup_dir in earlier_pins(root) {
        for run_dir in earlier_pins(&cgroup_dir) {
            detached += remove_pins(&run_dir);
        }
        if let Err(e) = std::fs::remove_dir(&cgroup_dir) {
            tracing::warn!(dir = %cgroup_dir.display(), error = %e, "cannot remove a pin directory");
        }
    }
    // Already gone, or something else lives there: either way not ours to force.
    let _ = std::fs::remove_dir(root);
    detached
}

/// Detaches and removes the links pinned in `dir`; how many.
fn remove_pins(dir: &Path) -> usize {
    let mut detached = 0;
    for entry in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        match PinnedLink::from_pin(entry.path()) {
            Ok(link) => match link.unpin() {
                Ok(fd) => {
                    detached += 1;
                    drop(fd);
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot unpin a stale capture link");
                }
            },
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "not a capture link; left alone");
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "replaced capture links left by an earlier run");
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an old pin directory");
        }
    }
    detached
}

fn remove_ports(map: &mut PortMap, ports: &[u16]) {
    for port in ports {
        // Already gone is what was wanted.
        let _ = map.remove(port);
    }
}

fn missing(name: &'static str) -> CaptureError {
    CaptureError::Map {
        name,
        source: MapFault::Missing,
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or_else(|| missing(name))
}

fn replace_trie<const N: usize>(
    trie: &Mutex<LpmTrie<MapData, [u8; N], u32>>,
    name: &'static str,
    entries: &[([u8; N], u32)],
) -> Result<(), CaptureError> {
    let mut trie = trie.lock().map_err(|_| CaptureError::Map {
        name,
        source: MapFault::Poisoned,
    })?;
    let old: Vec<Key<[u8; N]>> = trie.keys().filter_map(Result::ok).collect();
    // Insert the new set before removing stale keys so no address that stays
    // captured is ever briefly let through.
    for (addr, len) in entries {
        trie.insert(&Key::new(*len, *addr), 1, 0)
            .map_err(map_err(name))?;
    }
    for key in old {
        let (len, addr) = (key.prefix_len(), key.data());
        if !entries.iter().any(|(a, l)| *a == addr && *l == len) {
            let _ = trie.remove(&key);
        }
    }
    Ok(())
}

/// Every port kt listens on: the capture listeners' and `own_ports`.
fn own_ports(spec: &CaptureSpec) -> Vec<u16> {
    let mut v = vec![spec.listen4.port()];
    v.extend(spec.listen6.map(|a| a.port()));
    if let Some(c) = &spec.containers {
        v.extend(c.listen4.map(|a| a.port()));
        v.extend(c.listen6.map(|a| a.port()));
    }
    v.extend(&spec.own_ports);
    v.sort_unstable();
    v.dedup();
    v
}

fn capture_config(spec: &CaptureSpec) -> CaptureConfig {
    let (listen6_be, listen6_port_be) = match spec.listen6 {
        Some(a) => (words(a.ip().octets()), u32::from(a.port().to_be())),
        None => ([0; 4], 0),
    };
    let mut flags = FLAG_ENABLED;
    if spec.refuse_udp {
        flags |= FLAG_REFUSE_UDP;
    }
    if spec.port_wide {
        flags |= FLAG_PORT_SCOPE;
    }
    let netns_cookie = if spec.refuse_other_netns {
        own_netns_cookie()
    } else {
        0
    };
    if netns_cookie != 0 {
        flags |= FLAG_REFUSE_OTHER_NETNS;
    }
    let foreign = spec.containers.unwrap_or_default();
    if netns_cookie != 0 && spec.containers.is_some() {
        flags |= FLAG_CAPTURE_OTHER_NETNS;
    }
    let (foreign4_be, foreign4_port_be) = match foreign.listen4 {
        Some(a) => (
            u32::from_ne_bytes(a.ip().octets()),
            u32::from(a.port().to_be()),
        ),
        None => (0, 0),
    };
    let (foreign6_be, foreign6_port_be) = match foreign.listen6 {
        Some(a) => (words(a.ip().octets()), u32::from(a.port().to_be())),
        None => ([0; 4], 0),
    };
    CaptureConfig {
        listen4_be: u32::from_ne_bytes(spec.listen4.ip().octets()),
        listen4_port_be: u32::from(spec.listen4.port().to_be()),
        listen6_be,
        listen6_port_be,
        flags,
        netns_cookie,
        foreign4_be,
        foreign4_port_be,
        foreign6_be,
        foreign6_port_be,
        _pad: 0,
    }
}

/// The network namespace cookie of this process (0 when the kernel cannot say).
fn own_netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return 0;
    };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer to a u64 and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 { cookie } else { 0 }
}

fn words(octets: [u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, chunk) in octets.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    w
}

fn octets(words: [u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

pub(crate) fn peer_key(peer: SocketAddr) -> PeerKey {
    let v4 = match peer.ip() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    match (v4, peer.ip()) {
        (Some(a), _) => PeerKey {
            family: AF_INET,
            port: u32::from(peer.port()),
            addr_be: [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        },
        (None, IpAddr::V6(a)) => PeerKey {
            family: AF_INET6,
            port: u32::from(peer.port()),
            addr_be: words(a.octets()),
        },
        (None, IpAddr::V4(_)) => PeerKey::default(),
    }
}

fn decode_origin(o: &Origin) -> Option<ClientOrigin> {
    let port = u16::from_be(o.port_be as u16);
    let ip = match o.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(o.addr_be[0].to_ne_bytes())),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(octets(o.addr_be))),
        _ => return None,
    };
    Some(ClientOrigin {
        original: SocketAddr::new(ip, port),
        pid: o.tgid,
        uid: o.uid,
        cgroup_id: o.cgroup_id,
        netns_cookie: o.netns_cookie,
        provider_prefix: o.flags & ORIGIN_PROVIDER_PREFIX != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_fold_v4_mapped_into_v4() {
        let v4 = peer_key("127.0.0.1:4000".parse().unwrap());
        let mapped = peer_key("[::ffff:127.0.0.1]:4000".parse().unwrap());
        assert_eq!(v4, mapped);
        assert_eq!(v4.family, AF_INET);
        assert_eq!(v4.addr_be[0].to_ne_bytes(), [127, 0, 0, 1]);
        let v6 = peer_key("[::1]:4000".parse().unwrap());
        assert_eq!(v6.family, AF_INET6);
        assert_eq!(octets(v6.addr_be), Ipv6Addr::LOCALHOST.octets());
    }

    #[test]
    fn origins_decode_in_network_order() {
        let o = Origin {
            addr_be: [u32::from_ne_bytes([127, 77, 0, 1]), 0, 0, 0],
            port_be: u32::from(9443u16.to_be()),
            family: AF_INET,
            tgid: 42,
            flags: ORIGIN_PROVIDER_PREFIX,
            ..Origin::default()
        };
        let d = decode_origin(&o).unwrap();
        assert_eq!(d.original, "127.77.0.1:9443".parse().unwrap());
        assert_eq!(d.pid, 42);
        assert!(d.provider_prefix);
        let other = decode_origin(&Origin { flags: 0, ..o }).unwrap();
        assert!(!other.provider_prefix);
    }

    #[test]
    fn config_puts_ports_in_network_order() {
        let spec = CaptureSpec {
            cgroup: PathBuf::from("/nonexistent"),
            listen4: "127.0.0.1:8788".parse().unwrap(),
            listen6: None,
            prefixes: vec![],
            ports: vec![443],
            port_wide: false,
            own_ports: vec![8787, 8788],
            refuse_udp: true,
            refuse_other_netns: false,
            containers: None,
            pin_dir: None,
            keep_attached: false,
        };
        let c = capture_config(&spec);
        assert_eq!(u16::from_be(c.listen4_port_be as u16), 8788);
        assert_eq!(c.listen4_be.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(c.flags, FLAG_ENABLED | FLAG_REFUSE_UDP);
        assert_eq!(c.listen6_port_be, 0);
        assert_eq!(own_ports(&spec), vec![8787, 8788]);
        let wide = capture_config(&CaptureSpec {
            port_wide: true,
            ..spec
        });
        assert_eq!(wide.flags, FLAG_ENABLED | FLAG_REFUSE_UDP | FLAG_PORT_SCOPE);
    }

    #[test]
    fn containers_get_their_listeners_only_where_namespaces_are_told_apart() {
        let spec = CaptureSpec {
            cgroup: PathBuf::from("/nonexistent"),
            listen4: "127.0.0.1:709".parse().unwrap(),
            listen6: None,
            prefixes: vec![],
            ports: vec![443],
            port_wide: false,
            own_ports: vec![],
            refuse_udp: true,
            refuse_other_netns: true,
            containers: Some(ForeignListen {
                listen4: Some("169.254.107.116:709".parse().unwrap()),
                listen6: Some("[fd6b:7400:6b74::1]:709".parse().unwrap()),
            }),
            pin_dir: None,
            keep_attached: false,
        };
        let c = capture_config(&spec);
        // This process has a network namespace cookie on any kernel kt runs on.
        assert_ne!(c.netns_cookie, 0);
        assert_ne!(c.flags & FLAG_REFUSE_OTHER_NETNS, 0);
        assert_ne!(c.flags & FLAG_CAPTURE_OTHER_NETNS, 0);
        assert_eq!(c.foreign4_be.to_ne_bytes(), [169, 254, 107, 116]);
        assert_eq!(u16::from_be(c.foreign4_port_be as u16), 709);
        assert_eq!(
            Ipv6Addr::from(octets(c.foreign6_be)),
            "fd6b:7400:6b74::1".parse::<Ipv6Addr>().unwrap()
        );
        // Without telling namespaces apart there is nothing to send anywhere.
        let blind = capture_config(&CaptureSpec {
            refuse_other_netns: false,
            ..spec.clone()
        });
        assert_eq!(blind.flags & FLAG_CAPTURE_OTHER_NETNS, 0);
        let off = capture_config(&CaptureSpec {
            containers: None,
            ..spec
        });
        assert_eq!(off.flags & FLAG_CAPTURE_OTHER_NETNS, 0);
        assert_eq!(off.foreign4_port_be, 0);
    }
}
