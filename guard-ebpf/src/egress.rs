//! Declared proxies and strict egress, for destinations that are not a
//! provider address (the capture hooks call in here before they let such a
//! connection through).
//!
//! - TCP to a declared proxy (address and port) is sent to kt's proxy
//!   listener with the same connect record as a captured connection, so
//!   kt reads the CONNECT request and decides per authority. kt's own
//!   sockets to the real proxy are let through by their registered cookie.
//! - `audit` records every outbound TCP connect and UDP destination (not
//!   loopback) in a ring buffer and changes nothing; `enforce` refuses
//!   (EPERM at connect/sendmsg, before any packet leaves) what is not on
//!   the allow tries, and records the refusal. Port 53 and 853 go only to
//!   the resolver set, whatever the allow tries say.
//!
//! No SNI here: a connect hook runs before any byte is sent.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::map,
    maps::{Array, HashMap, LpmTrie, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};
use guard_ebpf_common::{
    AF_INET, CaptureConfig, FLAG_REFUSE_OTHER_NETNS, PeerKey,
    egress::{
        EgressConfig, EgressRecord, FLAG_PROXIES, MAX_ALLOW, MAX_SMALL, MODE_AUDIT, MODE_ENFORCE,
        PROTO_TCP, PROTO_UDP, RECORD_RING_BYTES, VERDICT_PASSED, VERDICT_REFUSED,
    },
};

use super::{ALLOW, DENY, KT_EXEMPT, SOCK_STREAM, write_ip6};

#[map(name = "KT_EGRESS")]
static KT_EGRESS: Array<EgressConfig> = Array::with_max_entries(1, 0);

#[map(name = "KT_ALLOW4")]
static KT_ALLOW4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

#[map(name = "KT_ALLOW6")]
static KT_ALLOW6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

#[map(name = "KT_ALLOW4P")]
static KT_ALLOW4P: LpmTrie<[u8; 6], u32> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

#[map(name = "KT_ALLOW6P")]
static KT_ALLOW6P: LpmTrie<[u8; 18], u32> = LpmTrie::with_max_entries(MAX_ALLOW, 0);

#[map(name = "KT_RESOLVERS")]
static KT_RESOLVERS: HashMap<PeerKey, u8> = HashMap::with_max_entries(MAX_SMALL, 0);

#[map(name = "KT_PROXIES")]
static KT_PROXIES: HashMap<PeerKey, u8> = HashMap::with_max_entries(MAX_SMALL, 0);

#[map(name = "KT_EGRESS_RECORDS")]
static KT_EGRESS_RECORDS: RingBuf = RingBuf::with_byte_size(RECORD_RING_BYTES, 0);

/// A destination as the hooks see it: IPv4 (also IPv4-mapped) in word 0.
pub(crate) struct Dest {
    pub(crate) family: u32,
    pub(crate) addr_be: [u32; 4],
    pub(crate) port_be: u32,
    /// An IPv4 destination reached through an IPv6 socket.
    pub(crate) mapped: bool,
}

#[inline(always)]
fn egress_config() -> Option<&'static EgressConfig> {
    KT_EGRESS.get(0)
}

#[inline(always)]
fn key(d: &Dest, port: u32) -> PeerKey {
    PeerKey {
        family: d.family,
        port,
        addr_be: d.addr_be,
    }
}

#[inline(always)]
fn exempt(ctx: &SockAddrContext) -> bool {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is never dereferenced.
    unsafe { KT_EXEMPT.get(&cookie) }.is_some()
}

#[inline(always)]
fn local(d: &Dest) -> bool {
    if d.family == AF_INET {
        let b = d.addr_be[0].to_ne_bytes();
        return b[0] == 127 || d.addr_be[0] == 0;
    }
    let a = &d.addr_be;
    a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == 0 || u32::from_be(a[3]) == 1)
}

#[inline(always)]
fn v6_bytes(a: &[u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        bytes[i * 4] = w[0];
        bytes[i * 4 + 1] = w[1];
        bytes[i * 4 + 2] = w[2];
        bytes[i * 4 + 3] = w[3];
        i += 1;
    }
    bytes
}

/// Whether the allow tries (or, on 53/853, the resolver set) admit `d`.
#[inline(always)]
fn allowed(d: &Dest) -> bool {
    let port = u16::from_be(d.port_be as u16);
    if port == 53 || port == 853 {
        // SAFETY: read-only lookup.
        return unsafe { KT_RESOLVERS.get(&key(d, 0)) }.is_some();
    }
    let pb = (d.port_be as u16).to_ne_bytes();
    if d.family == AF_INET {
        let a = d.addr_be[0].to_ne_bytes();
        if KT_ALLOW4.get(Key::new(32, a)).is_some() {
            return true;
        }
        let k = [pb[0], pb[1], a[0], a[1], a[2], a[3]];
        return KT_ALLOW4P.get(Key::new(48, k)).is_some();
    }
    let a = v6_bytes(&d.addr_be);
    if KT_ALLOW6.get(Key::new(128, a)).is_some() {
        return true;
    }
    let mut k = [0u8; 18];
    k[0] = pb[0];
    k[1] = pb[1];
    let mut i = 0;
    while i < 16 {
        k[i + 2] = a[i];
        i += 1;
    }
    KT_ALLOW6P.get(Key::new(144, k)).is_some()
}

#[inline(always)]
fn emit(d: &Dest, proto: u32, verdict: u32) {
    let rec = EgressRecord {
        // SAFETY: plain helper calls.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        time_ns: unsafe { bpf_ktime_get_ns() },
        addr_be: d.addr_be,
        port_be: d.port_be,
        family: d.family,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        proto,
        verdict,
    };
    // A full ring loses the record, never the decision.
    let _ = KT_EGRESS_RECORDS.output::<EgressRecord>(&rec, 0);
}

/// Strict egress for one destination; `Some(DENY)` refuses it.
#[inline(always)]
fn check(ctx: &SockAddrContext, e: &EgressConfig, d: &Dest, proto: u32) -> Option<i32> {
    if (e.mode != MODE_AUDIT && e.mode != MODE_ENFORCE) || local(d) || exempt(ctx) {
        return None;
    }
    let ok = allowed(d);
    if e.mode == MODE_AUDIT {
        emit(d, proto, VERDICT_PASSED);
        return None;
    }
    if ok {
        return None;
    }
    emit(d, proto, VERDICT_REFUSED);
    Some(DENY)
}

/// `connect4/6` for a destination outside the provider prefixes: a declared
/// proxy is redirected to kt (`Some(ALLOW)`), a destination strict egress
/// refuses gets `Some(DENY)`; `None` lets the capture hook go on.
#[inline(always)]
pub(crate) fn connect(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    cfg: &CaptureConfig,
    d: &Dest,
) -> Option<i32> {
    let e = egress_config()?;
    let tcp = sa.type_ == SOCK_STREAM;
    if tcp && e.flags & FLAG_PROXIES != 0 {
        let port = u32::from(u16::from_be(d.port_be as u16));
        // SAFETY: read-only lookup.
        if unsafe { KT_PROXIES.get(&key(d, port)) }.is_some() {
            return Some(to_proxy_listener(ctx, sa, cfg, e, d));
        }
    }
    check(ctx, e, d, if tcp { PROTO_TCP } else { PROTO_UDP })
}

/// `sendmsg4/6` (unconnected UDP) outside the provider prefixes.
#[inline(always)]
pub(crate) fn sendmsg(ctx: &SockAddrContext, d: &Dest) -> i32 {
    match egress_config() {
        Some(e) => check(ctx, e, d, PROTO_UDP).unwrap_or(ALLOW),
        None => ALLOW,
    }
}

/// Sends a connection to a declared proxy to kt's proxy listener, with the
/// record the capture listener uses. Fails closed: another network
/// namespace (whose loopback is not kt's), no listener of the family, or no
/// room for the record refuses the connect.
#[inline(always)]
fn to_proxy_listener(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    cfg: &CaptureConfig,
    e: &EgressConfig,
    d: &Dest,
) -> i32 {
    if cfg.flags & FLAG_REFUSE_OTHER_NETNS != 0 && cfg.netns_cookie != 0 {
        // SAFETY: helper call on the program's own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if netns != cfg.netns_cookie {
            return DENY;
        }
    }
    if exempt(ctx) {
        // kt's own connection to the real proxy.
        return ALLOW;
    }
    if super::record(ctx, d.family, d.addr_be, d.port_be, false).is_err() {
        return DENY;
    }
    if d.family == AF_INET {
        if e.proxy4_port_be == 0 {
            return DENY;
        }
        if d.mapped {
            write_ip6(sa, [0, 0, 0xffffu32.to_be(), e.proxy4_be]);
        } else {
            sa.user_ip4 = e.proxy4_be;
        }
        sa.user_port = e.proxy4_port_be;
        return ALLOW;
    }
    if e.proxy6_port_be == 0 {
        return DENY;
    }
    write_ip6(sa, e.proxy6_be);
    sa.user_port = e.proxy6_port_be;
    ALLOW
}
