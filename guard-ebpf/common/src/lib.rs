//! `#[repr(C)]` types and map/program names shared by the eBPF programs in
//! `guard-ebpf` and the loader in `guard::capture`.
//!
//! Rules: no implicit padding (explicit `_pad` fields, sizes asserted at
//! compile time), `_be` for network byte order, names as constants so both
//! sides agree.
#![no_std]

/// `AF_INET`, as the kernel reports it in socket contexts.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as the kernel reports it in socket contexts.
pub const AF_INET6: u32 = 10;

/// Program names (the Rust function names in `guard-ebpf`).
pub mod prog {
    /// `cgroup/connect4`: redirect matched IPv4 TCP, refuse matched UDP.
    pub const CONNECT4: &str = "kt_connect4";
    /// `cgroup/connect6`: the same for IPv6, including IPv4-mapped addresses.
    pub const CONNECT6: &str = "kt_connect6";
    /// `cgroup/sendmsg4`: refuse unconnected UDP to matched prefixes (QUIC).
    pub const SENDMSG4: &str = "kt_sendmsg4";
    /// `cgroup/sendmsg6`: the same for IPv6.
    pub const SENDMSG6: &str = "kt_sendmsg6";
    /// `cgroup/getpeername4`: show the process its original peer.
    pub const GETPEERNAME4: &str = "kt_getpeername4";
    /// `cgroup/getpeername6`: the same for IPv6 sockets.
    pub const GETPEERNAME6: &str = "kt_getpeername6";
    /// `sockops`: re-key the connect record by the client's address once established.
    pub const SOCK_OPS: &str = "kt_sock_ops";
    /// Every program, in attach order.
    pub const ALL: [&str; 7] = [
        SOCK_OPS,
        GETPEERNAME4,
        GETPEERNAME6,
        SENDMSG4,
        SENDMSG6,
        CONNECT4,
        CONNECT6,
    ];
}

/// Map names (the static names in `guard-ebpf`).
pub mod map {
    /// `Array<CaptureConfig>` with one entry.
    pub const CONFIG: &str = "KT_CONFIG";
    /// `LpmTrie<[u8; 4], u32>`: captured IPv4 prefixes.
    pub const PREFIX4: &str = "KT_PREFIX4";
    /// `LpmTrie<[u8; 16], u32>`: captured IPv6 prefixes.
    pub const PREFIX6: &str = "KT_PREFIX6";
    /// `HashMap<u16, u8>`: captured destination ports, host byte order.
    pub const PORTS: &str = "KT_PORTS";
    /// `LruHashMap<u64, Origin>`: connect records by socket cookie.
    pub const BY_COOKIE: &str = "KT_BY_COOKIE";
    /// `LruHashMap<PeerKey, Origin>`: the same records by the client's address.
    pub const BY_PEER: &str = "KT_BY_PEER";
    /// `LruHashMap<u64, u8>`: socket cookies of kt's own upstream sockets,
    /// written by kt before `connect()`; the only sockets never redirected.
    pub const EXEMPT: &str = "KT_EXEMPT";
    /// `HashMap<u16, u8>`: ports kt itself listens on (host byte order).
    /// With port-wide capture, a loopback destination on one of these is
    /// kt's own listener and is left alone.
    pub const OWN_PORTS: &str = "KT_OWN_PORTS";
}

/// Entries in the per-connection maps; LRU so a guard that stops reading
/// cannot exhaust kernel memory.
pub const MAX_RECORDS: u32 = 65_536;
/// Entries in the exempt-cookie map; LRU, and cookies are never reused, so
/// entries of closed sockets simply age out.
pub const MAX_EXEMPT: u32 = 16_384;
/// Entries in each prefix trie.
pub const MAX_PREFIXES: u32 = 4_096;
/// Entries in the port set.
pub const MAX_PORTS: u32 = 64;
/// Entries in the set of kt's own listening ports.
pub const MAX_OWN_PORTS: u32 = 8;

/// `CaptureConfig::flags`: capture is on.
pub const FLAG_ENABLED: u32 = 1;
/// `CaptureConfig::flags`: refuse UDP (any port) to captured prefixes.
pub const FLAG_REFUSE_UDP: u32 = 1 << 1;
/// `CaptureConfig::flags`: refuse matched connections from other network
/// namespaces, where a rewrite to loopback would land in the wrong place.
pub const FLAG_REFUSE_OTHER_NETNS: u32 = 1 << 2;
/// `CaptureConfig::flags`: port-wide scope. TCP to a captured port is
/// captured whatever the destination (not only the provider prefixes),
/// except loopback destinations on kt's own listening ports.
pub const FLAG_PORT_SCOPE: u32 = 1 << 3;
/// `CaptureConfig::flags`: capture matched connections from other network
/// namespaces (containers on bridges) too, to the `foreign*` listener: an
/// address of the host that a container reaches through its default
/// route. Without this flag (or without a foreign listener of the
/// family) they are refused.
pub const FLAG_CAPTURE_OTHER_NETNS: u32 = 1 << 4;

/// `Origin::flags`: the destination was inside the provider prefixes.
pub const ORIGIN_PROVIDER_PREFIX: u32 = 1;

/// Where matched connections go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// IPv4 capture listener address.
    pub listen4_be: u32,
    /// IPv4 capture listener port, network byte order in the low 16 bits
    /// (the layout of `bpf_sock_addr::user_port`).
    pub listen4_port_be: u32,
    /// IPv6 capture listener address.
    pub listen6_be: [u32; 4],
    /// IPv6 capture listener port, as `listen4_port_be`.
    pub listen6_port_be: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Network namespace cookie of the guard; 0 when unknown.
    pub netns_cookie: u64,
    /// IPv4 listener for connections from other network namespaces
    /// (`FLAG_CAPTURE_OTHER_NETNS`); 0 port: none.
    pub foreign4_be: u32,
    /// Its port, as `listen4_port_be`.
    pub foreign4_port_be: u32,
    /// IPv6 listener for connections from other network namespaces.
    pub foreign6_be: [u32; 4],
    /// Its port, as `listen4_port_be`; 0: none (matched IPv6 from other
    /// namespaces is refused).
    pub foreign6_port_be: u32,
    /// Keeps the size a multiple of 8 with no implicit padding.
    pub _pad: u32,
}

/// What the connect hook saw: the original destination and who connected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// `bpf_get_current_cgroup_id()` of the connecting task.
    pub cgroup_id: u64,
    /// Network namespace cookie of the socket.
    pub netns_cookie: u64,
    /// `bpf_ktime_get_ns()` at connect.
    pub time_ns: u64,
    /// Original destination; IPv4 in word 0, network byte order.
    pub addr_be: [u32; 4],
    /// Original destination port, network byte order in the low 16 bits.
    pub port_be: u32,
    /// `AF_INET` or `AF_INET6` of the original destination (IPv4-mapped
    /// destinations are reported as `AF_INET`).
    pub family: u32,
    /// Process id (thread group id) of the connecting task.
    pub tgid: u32,
    /// User id of the connecting task.
    pub uid: u32,
    /// `ORIGIN_*` bits.
    pub flags: u32,
    /// Keeps the size a multiple of 8 with no implicit padding.
    pub _pad: u32,
}

/// A client's socket address as the capture listener sees it as peer.
/// IPv4-mapped IPv6 addresses are stored as `AF_INET`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Client port, host byte order.
    pub port: u32,
    /// Client address; IPv4 in word 0, network byte order.
    pub addr_be: [u32; 4],
}

/// Strict egress and declared proxies (see `guard-ebpf/src/egress.rs`).
pub mod egress {
    /// Map names.
    pub mod map {
        /// `Array<EgressConfig>` with one entry.
        pub const CONFIG: &str = "KT_EGRESS";
        /// `LpmTrie<[u8; 4], u32>`: allowed IPv4 prefixes, any port.
        pub const ALLOW4: &str = "KT_ALLOW4";
        /// `LpmTrie<[u8; 16], u32>`: allowed IPv6 prefixes, any port.
        pub const ALLOW6: &str = "KT_ALLOW6";
        /// `LpmTrie<[u8; 6], u32>`: allowed IPv4 prefixes on one port; the
        /// key is the port (network order) then the address, the prefix
        /// length 16 + the address prefix length.
        pub const ALLOW4P: &str = "KT_ALLOW4P";
        /// `LpmTrie<[u8; 18], u32>`: the same for IPv6.
        pub const ALLOW6P: &str = "KT_ALLOW6P";
        /// `HashMap<PeerKey, u8>` (port 0): resolvers reachable on 53/853.
        pub const RESOLVERS: &str = "KT_RESOLVERS";
        /// `HashMap<PeerKey, u8>`: declared proxies (address and port).
        pub const PROXIES: &str = "KT_PROXIES";
        /// `RingBuf` of [`super::EgressRecord`].
        pub const RECORDS: &str = "KT_EGRESS_RECORDS";
    }

    /// `EgressConfig::mode`: nothing checked.
    pub const MODE_OFF: u32 = 0;
    /// `EgressConfig::mode`: every outbound destination recorded, nothing refused.
    pub const MODE_AUDIT: u32 = 1;
    /// `EgressConfig::mode`: destinations not allowed are refused (and recorded).
    pub const MODE_ENFORCE: u32 = 2;
    /// `EgressConfig::flags`: `PROXIES` holds entries.
    pub const FLAG_PROXIES: u32 = 1;
    /// Entries in each allow trie.
    pub const MAX_ALLOW: u32 = 4_096;
    /// Entries in the resolver and proxy sets.
    pub const MAX_SMALL: u32 = 64;
    /// Size of the record ring buffer in bytes.
    pub const RECORD_RING_BYTES: u32 = 256 * 1024;
    /// `EgressRecord::verdict`: let through (audit, or allowed).
    pub const VERDICT_PASSED: u32 = 0;
    /// `EgressRecord::verdict`: refused (enforce).
    pub const VERDICT_REFUSED: u32 = 1;
    /// `EgressRecord::proto`: TCP.
    pub const PROTO_TCP: u32 = 6;
    /// `EgressRecord::proto`: UDP.
    pub const PROTO_UDP: u32 = 17;

    /// The strict-egress mode and where declared-proxy connections go.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct EgressConfig {
        /// `MODE_*`.
        pub mode: u32,
        /// `FLAG_*`.
        pub flags: u32,
        /// IPv4 proxy listener address.
        pub proxy4_be: u32,
        /// Its port, network order in the low 16 bits.
        pub proxy4_port_be: u32,
        /// IPv6 proxy listener address.
        pub proxy6_be: [u32; 4],
        /// Its port as above; 0: IPv6 proxy connections are refused.
        pub proxy6_port_be: u32,
        /// Keeps the size a multiple of 8.
        pub _pad: u32,
    }

    /// One outbound destination seen by the egress hooks.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct EgressRecord {
        /// cgroup id of the task.
        pub cgroup_id: u64,
        /// `bpf_ktime_get_ns()`.
        pub time_ns: u64,
        /// Destination; IPv4 in word 0, network byte order.
        pub addr_be: [u32; 4],
        /// Destination port, network order in the low 16 bits.
        pub port_be: u32,
        /// `AF_INET` or `AF_INET6` (IPv4-mapped reported as `AF_INET`).
        pub family: u32,
        /// Thread group id.
        pub tgid: u32,
        /// User id.
        pub uid: u32,
        /// `PROTO_*`.
        pub proto: u32,
        /// `VERDICT_*`.
        pub verdict: u32,
    }

    const _: () = assert!(size_of::<EgressConfig>() == 40);
    const _: () = assert!(size_of::<EgressRecord>() == 56);

    #[cfg(feature = "user")]
    mod pod {
        // SAFETY: plain #[repr(C)] integers with no padding (sizes asserted above).
        unsafe impl aya::Pod for super::EgressConfig {}
        // SAFETY: as above.
        unsafe impl aya::Pod for super::EgressRecord {}
    }
}

const _: () = assert!(size_of::<CaptureConfig>() == 72);
const _: () = assert!(size_of::<Origin>() == 64);
const _: () = assert!(size_of::<PeerKey>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with no padding (sizes asserted above).
    unsafe impl aya::Pod for super::CaptureConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
}
