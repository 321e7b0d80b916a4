//! Declared proxies and strict egress on the attached programs: fills the
//! allow tries, the resolver and proxy sets and the egress config, and
//! reads the ring buffer of destinations the hooks saw.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::Path;
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, RingBuf};
use guard_ebpf_common::egress::{
    EgressConfig, EgressRecord, FLAG_PROXIES, MAX_ALLOW, MAX_SMALL, MODE_AUDIT, MODE_ENFORCE,
    MODE_OFF, PROTO_UDP, VERDICT_REFUSED, map,
};
use guard_ebpf_common::{AF_INET, AF_INET6, PeerKey};
use tokio::io::unix::AsyncFd;

use super::loader::{Capture, peer_key};
use super::{CaptureError, MapFault};
use crate::config::{EgressMode, IpPrefix};

/// What the egress hooks enforce and where proxy connections go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressSpec {
    /// Off, audit or enforce.
    pub mode: EgressMode,
    /// Allowed prefixes, each on every port (`None`) or one port.
    pub allow: Vec<(IpPrefix, Option<u16>)>,
    /// The only addresses reachable on 53/853 (enforce).
    pub resolvers: Vec<IpAddr>,
    /// Declared proxies: TCP to these goes to the proxy listener.
    pub proxies: Vec<SocketAddr>,
    /// kt's IPv4 proxy listener (IPv4 proxies are refused without it).
    pub proxy_listen4: Option<SocketAddrV4>,
    /// kt's IPv6 proxy listener (IPv6 proxies are refused without it).
    pub proxy_listen6: Option<SocketAddrV6>,
}

/// One destination the egress hooks saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EgressSeen {
    /// Where the process connected or sent to.
    pub dst: SocketAddr,
    /// UDP (else TCP).
    pub udp: bool,
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// cgroup id.
    pub cgroup_id: u64,
    /// Refused (enforce); else only recorded.
    pub refused: bool,
}

impl EgressSeen {
    /// `tcp` or `udp`.
    pub fn proto(&self) -> &'static str {
        if self.udp { "udp" } else { "tcp" }
    }
}

/// The egress maps of one loaded object.
pub(super) struct EgressMaps {
    config: Mutex<Array<MapData, EgressConfig>>,
    allow4: Mutex<LpmTrie<MapData, [u8; 4], u32>>,
    allow6: Mutex<LpmTrie<MapData, [u8; 16], u32>>,
    allow4p: Mutex<LpmTrie<MapData, [u8; 6], u32>>,
    allow6p: Mutex<LpmTrie<MapData, [u8; 18], u32>>,
    resolvers: Mutex<HashMap<MapData, PeerKey, u8>>,
    proxies: Mutex<HashMap<MapData, PeerKey, u8>>,
    records: Mutex<Option<RingBuf<MapData>>>,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |e| CaptureError::Map {
        name,
        source: MapFault::Kernel(e),
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::Map {
        name,
        source: MapFault::Missing,
    })
}

fn poisoned(name: &'static str) -> CaptureError {
    CaptureError::Map {
        name,
        source: MapFault::Poisoned,
    }
}

impl EgressMaps {
    /// Takes the egress maps out of a loaded object (the config stays
    /// zero, that is off, until [`Capture::set_egress`]).
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<EgressMaps, CaptureError> {
        Ok(EgressMaps {
            config: Mutex::new(
                Array::try_from(take(ebpf, map::CONFIG)?).map_err(map_err(map::CONFIG))?,
            ),
            allow4: Mutex::new(
                LpmTrie::try_from(take(ebpf, map::ALLOW4)?).map_err(map_err(map::ALLOW4))?,
            ),
            allow6: Mutex::new(
                LpmTrie::try_from(take(ebpf, map::ALLOW6)?).map_err(map_err(map::ALLOW6))?,
            ),
            allow4p: Mutex::new(
                LpmTrie::try_from(take(ebpf, map::ALLOW4P)?).map_err(map_err(map::ALLOW4P))?,
            ),
            allow6p: Mutex::new(
                LpmTrie::try_from(take(ebpf, map::ALLOW6P)?).map_err(map_err(map::ALLOW6P))?,
            ),
            resolvers: Mutex::new(
                HashMap::try_from(take(ebpf, map::RESOLVERS)?).map_err(map_err(map::RESOLVERS))?,
            ),
            proxies: Mutex::new(
                HashMap::try_from(take(ebpf, map::PROXIES)?).map_err(map_err(map::PROXIES))?,
            ),
            records: Mutex::new(Some(
                RingBuf::try_from(take(ebpf, map::RECORDS)?).map_err(map_err(map::RECORDS))?,
            )),
        })
    }
}

/// Trie entries for the allow list: (any port v4, any port v6, one port v4, one port v6).
type AllowKeys = (
    Vec<([u8; 4], u32)>,
    Vec<([u8; 16], u32)>,
    Vec<([u8; 6], u32)>,
    Vec<([u8; 18], u32)>,
);

fn allow_keys(allow: &[(IpPrefix, Option<u16>)]) -> Result<AllowKeys, CaptureError> {
    let (mut a4, mut a6, mut p4, mut p6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (prefix, port) in allow {
        let (v4, v6) = super::prefix::split(std::slice::from_ref(prefix))
            .map_err(|e| CaptureError::Spec(e.to_string()))?;
        for (addr, len) in v4 {
            match port {
                None => a4.push((addr, len)),
                Some(p) => {
                    let b = p.to_be_bytes();
                    p4.push(([b[0], b[1], addr[0], addr[1], addr[2], addr[3]], 16 + len));
                }
            }
        }
        for (addr, len) in v6 {
            match port {
                None => a6.push((addr, len)),
                Some(p) => {
                    let mut k = [0u8; 18];
                    k[..2].copy_from_slice(&p.to_be_bytes());
                    k[2..].copy_from_slice(&addr);
                    p6.push((k, 16 + len));
                }
            }
        }
    }
    for n in [a4.len(), a6.len(), p4.len(), p6.len()] {
        if n > MAX_ALLOW as usize {
            return Err(CaptureError::Spec(format!(
                "{n} entries in capture.egress.allow (resolved); at most {MAX_ALLOW} fit"
            )));
        }
    }
    Ok((a4, a6, p4, p6))
}

/// Inserts `entries`, then removes what is not among them: an entry in both
/// sets stays throughout.
fn replace_trie<const N: usize>(
    trie: &Mutex<LpmTrie<MapData, [u8; N], u32>>,
    name: &'static str,
    entries: &[([u8; N], u32)],
) -> Result<Vec<Key<[u8; N]>>, CaptureError> {
    let mut trie = trie.lock().map_err(|_| poisoned(name))?;
    let old: Vec<Key<[u8; N]>> = trie.keys().filter_map(Result::ok).collect();
    for (addr, len) in entries {
        trie.insert(&Key::new(*len, *addr), 1, 0)
            .map_err(map_err(name))?;
    }
    Ok(old
        .into_iter()
        .filter(|k| {
            !entries
                .iter()
                .any(|(a, l)| *a == k.data() && *l == k.prefix_len())
        })
        .collect())
}

fn remove_keys<const N: usize>(
    trie: &Mutex<LpmTrie<MapData, [u8; N], u32>>,
    stale: &[Key<[u8; N]>],
) {
    if let Ok(mut t) = trie.lock() {
        for k in stale {
            let _ = t.remove(k);
        }
    }
}

fn replace_set(
    set: &Mutex<HashMap<MapData, PeerKey, u8>>,
    name: &'static str,
    keys: &[PeerKey],
) -> Result<Vec<PeerKey>, CaptureError> {
    if keys.len() > MAX_SMALL as usize {
        return Err(CaptureError::Spec(format!(
            "{} entries for {name}; at most {MAX_SMALL} fit",
            keys.len()
        )));
    }
    let mut set = set.lock().map_err(|_| poisoned(name))?;
    let old: Vec<PeerKey> = set.keys().filter_map(Result::ok).collect();
    for k in keys {
        set.insert(k, 1, 0).map_err(map_err(name))?;
    }
    Ok(old.into_iter().filter(|k| !keys.contains(k)).collect())
}

fn remove_set(set: &Mutex<HashMap<MapData, PeerKey, u8>>, stale: &[PeerKey]) {
    if let Ok(mut s) = set.lock() {
        for k in stale {
            let _ = s.remove(k);
        }
    }
}

fn words(octets: [u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, chunk) in octets.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    w
}

fn egress_config(spec: &EgressSpec) -> EgressConfig {
    let mode = match spec.mode {
        EgressMode::Off => MODE_OFF,
        EgressMode::Audit => MODE_AUDIT,
        EgressMode::Enforce => MODE_ENFORCE,
    };
    let mut c = EgressConfig {
        mode,
        ..EgressConfig::default()
    };
    if !spec.proxies.is_empty() {
        c.flags |= FLAG_PROXIES;
    }
    if let Some(a) = spec.proxy_listen4 {
        c.proxy4_be = u32::from_ne_bytes(a.ip().octets());
        c.proxy4_port_be = u32::from(a.port().to_be());
    }
    if let Some(a) = spec.proxy_listen6 {
        c.proxy6_be = words(a.ip().octets());
        c.proxy6_port_be = u32::from(a.port().to_be());
    }
    c
}

impl Capture {
    /// Replaces the egress setup in place: new allow entries, resolvers and
    /// proxies go in first, then the mode, then stale entries come out, so
    /// nothing allowed before and after is ever refused in between.
    pub fn set_egress(&self, spec: &EgressSpec) -> Result<(), CaptureError> {
        let m = &self.egress;
        let (a4, a6, p4, p6) = allow_keys(&spec.allow)?;
        let resolvers: Vec<PeerKey> = spec
            .resolvers
            .iter()
            .map(|ip| peer_key(SocketAddr::new(*ip, 0)))
            .collect();
        let proxies: Vec<PeerKey> = spec.proxies.iter().map(|a| peer_key(*a)).collect();
        let s4 = replace_trie(&m.allow4, map::ALLOW4, &a4)?;
        let s6 = replace_trie(&m.allow6, map::ALLOW6, &a6)?;
        let s4p = replace_trie(&m.allow4p, map::ALLOW4P, &p4)?;
        let s6p = replace_trie(&m.allow6p, map::ALLOW6P, &p6)?;
        let sr = replace_set(&m.resolvers, map::RESOLVERS, &resolvers)?;
        let sp = replace_set(&m.proxies, map::PROXIES, &proxies)?;
        m.config
            .lock()
            .map_err(|_| poisoned(map::CONFIG))?
            .set(0, egress_config(spec), 0)
            .map_err(map_err(map::CONFIG))?;
        remove_keys(&m.allow4, &s4);
        remove_keys(&m.allow6, &s6);
        remove_keys(&m.allow4p, &s4p);
        remove_keys(&m.allow6p, &s6p);
        remove_set(&m.resolvers, &sr);
        remove_set(&m.proxies, &sp);
        Ok(())
    }

    /// The reader of the destinations the egress hooks record (once: the
    /// first call takes it). Call inside the tokio runtime.
    pub fn egress_records(&self) -> Option<EgressRecords> {
        let ring = self.egress.records.lock().ok()?.take()?;
        // SAFETY: the ring buffer owns its map fd and keeps it open, the
        // same one, until it is dropped with the AsyncFd.
        match unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
            Ok(fd) => Some(EgressRecords { fd }),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the egress record ring");
                None
            }
        }
    }
}

/// Reads [`EgressSeen`] records as the hooks write them.
pub struct EgressRecords {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for EgressRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressRecords").finish_non_exhaustive()
    }
}

impl EgressRecords {
    /// Waits for records and returns what is there (at least one).
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<EgressSeen>> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(seen) = decode(&item) {
                    out.push(seen);
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

fn decode(bytes: &[u8]) -> Option<EgressSeen> {
    if bytes.len() < size_of::<EgressRecord>() {
        return None;
    }
    // SAFETY: the length is checked; EgressRecord is plain integers, any bit
    // pattern is valid, and read_unaligned copes with the ring's alignment.
    let r: EgressRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let port = u16::from_be(r.port_be as u16);
    let ip = match r.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(r.addr_be[0].to_ne_bytes())),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in r.addr_be.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(EgressSeen {
        dst: SocketAddr::new(ip, port),
        udp: r.proto == PROTO_UDP,
        pid: r.tgid,
        uid: r.uid,
        cgroup_id: r.cgroup_id,
        refused: r.verdict == VERDICT_REFUSED,
    })
}

/// The nameservers of a resolv.conf text.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    let mut v = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver")
            && let Some(a) = words.next()
            // A zone suffix (fe80::1%eth0) cannot be matched by address.
            && let Ok(ip) = a.split('%').next().unwrap_or(a).parse::<IpAddr>()
            && !v.contains(&ip)
        {
            v.push(ip);
        }
    }
    v
}

/// The resolvers of this host: /etc/resolv.conf, and systemd-resolved's
/// upstream servers when it runs (its stub on 127.0.0.53 is loopback, and
/// the servers it asks must stay reachable for it).
pub fn system_resolvers() -> Vec<IpAddr> {
    let mut v = Vec::new();
    for f in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            for ip in nameservers(&text) {
                if !v.contains(&ip) {
                    v.push(ip);
                }
            }
        }
    }
    v
}

/// The cgroup-v2 path (as `/proc/<pid>/cgroup` shows it) of the cgroup
/// whose id (inode) is `id`, found under `mount`/`within`; for records of
/// processes that exited before kt looked. Bounded walk.
pub fn cgroup_path_of_id(mount: &Path, within: &Path, id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut stack = vec![within.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > 10_000 {
            return None;
        }
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            let rel = dir.strip_prefix(mount).ok()?;
            return Some(format!("/{}", rel.display()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    None
}

/// Rule of an egress event recorded in `audit` mode.
pub const EGRESS_AUDIT_RULE: &str = "egress-audit";
/// Rule of an egress event refused in `enforce` mode.
pub const EGRESS_REFUSED_RULE: &str = "egress-refused";

/// How an egress event's policy note locates the destination:
/// `tcp 192.0.2.1:443`, with ` name=HOST` when kt resolved that address
/// for a host name.
pub fn egress_location(seen: &EgressSeen, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{} {} name={n}", seen.proto(), seen.dst),
        None => format!("{} {}", seen.proto(), seen.dst),
    }
}

/// Reads [`egress_location`] back: protocol, destination, host name.
pub fn parse_egress_location(s: &str) -> Option<(String, SocketAddr, Option<String>)> {
    let mut words = s.split_whitespace();
    let proto = words.next()?.to_string();
    let dst = words.next()?.parse().ok()?;
    let name = words
        .next()
        .and_then(|w| w.strip_prefix("name="))
        .map(str::to_string);
    Some((proto, dst, name))
}

/// Drops repeats of the same destination by the same process (a job
/// connecting in a loop would otherwise write an event per connect).
/// Bounded: forgets everything past `max` keys.
#[derive(Debug)]
pub struct Dedup {
    seen: HashSet<EgressSeen>,
    max: usize,
}

impl Dedup {
    /// Remembers at most `max` destinations.
    pub fn new(max: usize) -> Dedup {
        Dedup {
            seen: HashSet::new(),
            max,
        }
    }

    /// Whether `s` is new.
    pub fn first(&mut self, s: &EgressSeen) -> bool {
        if self.seen.len() >= self.max {
            self.seen.clear();
        }
        self.seen.insert(*s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_with_a_port_put_the_port_first() {
        let p = IpPrefix {
            addr: "10.0.0.0".parse().unwrap(),
            len: 8,
        };
        let (a4, _, p4, _) = allow_keys(&[(p, None), (p, Some(443))]).unwrap();
        assert_eq!(a4, vec![([10, 0, 0, 0], 8)]);
        assert_eq!(p4, vec![([1, 187, 10, 0, 0, 0], 24)]);
    }

    #[test]
    fn resolv_conf_nameservers_are_read_once_each() {
        let text =
            "# c\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch x\nnameserver 10.0.0.2\n";
        assert_eq!(
            nameservers(text),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn records_decode_in_network_order() {
        let r = EgressRecord {
            addr_be: [u32::from_ne_bytes([192, 0, 2, 1]), 0, 0, 0],
            port_be: u32::from(443u16.to_be()),
            family: AF_INET,
            tgid: 7,
            proto: PROTO_UDP,
            verdict: VERDICT_REFUSED,
            ..EgressRecord::default()
        };
        // SAFETY: a plain struct viewed as bytes for the test.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&r as *const EgressRecord).cast::<u8>(),
                size_of::<EgressRecord>(),
            )
        };
        let s = decode(bytes).unwrap();
        assert_eq!(s.dst, "192.0.2.1:443".parse().unwrap());
        assert!(s.udp && s.refused);
        assert_eq!(s.pid, 7);
    }
}
