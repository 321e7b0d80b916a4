//! kt's eBPF programs.
//!
//! `connect4`/`connect6` look at connections whose destination is in the
//! provider prefix tries, and with port-wide scope also at TCP to a
//! captured port whatever its destination (except loopback addresses on
//! kt's own listening ports); the record says which of the two it was, so
//! kt refuses a non-provider name only on a provider address. In order: a
//! socket from another network namespace is refused, unless kt captures
//! containers too: then TCP to a captured port goes to the foreign
//! listener, an address of the host the container reaches through its
//! default route (its own loopback destinations are left alone there); a
//! socket whose cookie kt wrote into `KT_EXEMPT` before connecting (kt's
//! own upstream sockets; nothing a client sets can put it there) is let
//! through; TCP to a captured port is sent to the capture
//! listener, recording the original destination and the caller by socket
//! cookie; anything else to a provider address (another port, UDP) is
//! refused. `sendmsg4/6` refuse unconnected UDP to provider addresses.
//! `sock_ops` re-keys the record by the client's address once the
//! connection is up, so the listener can read it after `accept()`.
//! `getpeername4/6` show the process its original peer. Destinations
//! outside the provider prefixes pass through `egress` first: TCP to a
//! declared proxy goes to kt's proxy listener, and strict egress records
//! (audit) or refuses (enforce) what is not allowlisted. Programs never
//! panic: every hook goes through a `try_` function, and a matched
//! connection that cannot be handled is refused (fail closed); unmatched
//! traffic is never touched.
#![no_std]
#![no_main]

mod egress;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext},
};
use guard_ebpf_common::{
    AF_INET, AF_INET6, CaptureConfig, FLAG_CAPTURE_OTHER_NETNS, FLAG_ENABLED, FLAG_PORT_SCOPE,
    FLAG_REFUSE_OTHER_NETNS, FLAG_REFUSE_UDP, MAX_EXEMPT, MAX_OWN_PORTS, MAX_PORTS, MAX_PREFIXES,
    MAX_RECORDS, ORIGIN_PROVIDER_PREFIX, Origin, PeerKey,
};

/// Let the operation proceed.
const ALLOW: i32 = 1;
/// Refuse it (the caller sees EPERM at once).
const DENY: i32 = 0;

const SOCK_STREAM: u32 = 1;

#[map(name = "KT_CONFIG")]
static KT_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

#[map(name = "KT_PREFIX4")]
static KT_PREFIX4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);

#[map(name = "KT_PREFIX6")]
static KT_PREFIX6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);

#[map(name = "KT_PORTS")]
static KT_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);

#[map(name = "KT_BY_COOKIE")]
static KT_BY_COOKIE: LruHashMap<u64, Origin> = LruHashMap::with_max_entries(MAX_RECORDS, 0);

#[map(name = "KT_BY_PEER")]
static KT_BY_PEER: LruHashMap<PeerKey, Origin> = LruHashMap::with_max_entries(MAX_RECORDS, 0);

#[map(name = "KT_EXEMPT")]
static KT_EXEMPT: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_EXEMPT, 0);

#[map(name = "KT_OWN_PORTS")]
static KT_OWN_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_OWN_PORTS, 0);

/// What a hook decided about a destination.
enum Verdict {
    /// Not ours: leave it alone.
    Pass,
    /// Ours, TCP: redirect.
    Capture,
    /// Ours, TCP, from another network namespace: redirect to the foreign
    /// listener (the container's loopback is not kt's).
    CaptureForeign,
    /// Ours, but must not go out (another port, UDP, foreign netns, no
    /// listener).
    Refuse,
}

#[inline(always)]
fn config() -> Option<&'static CaptureConfig> {
    let cfg = KT_CONFIG.get(0)?;
    if cfg.flags & FLAG_ENABLED == 0 {
        return None;
    }
    Some(cfg)
}

#[inline(always)]
fn port_matches(port_be: u32) -> bool {
    let port = u16::from_be(port_be as u16);
    // SAFETY: the value is a plain u8 read by the helper; never written through.
    unsafe { KT_PORTS.get(&port) }.is_some()
}

/// With port-wide scope: whether a destination outside the provider
/// prefixes is captured too (TCP to a captured port, and not a loopback
/// address on one of kt's own listening ports, which would loop).
#[inline(always)]
fn port_wide(cfg: &CaptureConfig, sa: &bpf_sock_addr, port_be: u32, loopback: bool) -> bool {
    if cfg.flags & FLAG_PORT_SCOPE == 0 || sa.type_ != SOCK_STREAM || !port_matches(port_be) {
        return false;
    }
    if loopback {
        let port = u16::from_be(port_be as u16);
        // SAFETY: as in port_matches.
        if unsafe { KT_OWN_PORTS.get(&port) }.is_some() {
            return false;
        }
    }
    true
}

#[inline(always)]
fn v4_loopback(addr_be: u32) -> bool {
    addr_be.to_ne_bytes()[0] == 127
}

#[inline(always)]
fn v4_matches(addr_be: u32) -> bool {
    KT_PREFIX4
        .get(Key::new(32, addr_be.to_ne_bytes()))
        .is_some()
}

#[inline(always)]
fn v6_matches(addr_be: &[u32; 4]) -> bool {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = addr_be[i].to_ne_bytes();
        bytes[i * 4] = w[0];
        bytes[i * 4 + 1] = w[1];
        bytes[i * 4 + 2] = w[2];
        bytes[i * 4 + 3] = w[3];
        i += 1;
    }
    KT_PREFIX6.get(Key::new(128, bytes)).is_some()
}

/// Reads `user_ip6` one 32-bit word at a time: the verifier rejects the
/// byte-wise copies the compiler would otherwise emit for context fields.
#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    // SAFETY: in-bounds reads of the kernel-provided context.
    unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` word by word, for the same reason as `read_ip6`.
#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, w: [u32; 4]) {
    // SAFETY: in-bounds writes of the kernel-provided context.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], w[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], w[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], w[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], w[3]);
    }
}

/// `::ffff:a.b.c.d` → `Some(a.b.c.d)`.
#[inline(always)]
fn v4_mapped(addr_be: &[u32; 4]) -> Option<u32> {
    if addr_be[0] == 0 && addr_be[1] == 0 && u32::from_be(addr_be[2]) == 0xffff {
        Some(addr_be[3])
    } else {
        None
    }
}

/// Decides for a destination in the provider prefixes (or, port-wide, on a
/// captured port). The network
/// namespace comes first, so no exemption ever applies across it; then kt's
/// own sockets (by cookie, registered by kt before connect); then only TCP
/// to a captured port is captured and everything else is refused.
/// `provider`/`loopback` describe the destination: from another namespace
/// a loopback destination outside the provider prefixes is that
/// namespace's own (port-wide scope) and is left alone.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    sa: &bpf_sock_addr,
    cfg: &CaptureConfig,
    port_be: u32,
    provider: bool,
    loopback: bool,
) -> Verdict {
    if cfg.flags & FLAG_REFUSE_OTHER_NETNS != 0 && cfg.netns_cookie != 0 {
        // SAFETY: helper call on the program's own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if netns != cfg.netns_cookie {
            return foreign(sa, cfg, port_be, provider, loopback);
        }
    }
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is never dereferenced.
    if unsafe { KT_EXEMPT.get(&cookie) }.is_some() {
        return Verdict::Pass;
    }
    match sa.type_ {
        SOCK_STREAM if port_matches(port_be) => Verdict::Capture,
        SOCK_STREAM => Verdict::Refuse,
        _ if cfg.flags & FLAG_REFUSE_UDP != 0 => Verdict::Refuse,
        _ => Verdict::Pass,
    }
}

/// A destination matched from another network namespace: captured to the
/// foreign listener when kt captures containers (TCP to a captured port),
/// else refused.
#[inline(always)]
fn foreign(
    sa: &bpf_sock_addr,
    cfg: &CaptureConfig,
    port_be: u32,
    provider: bool,
    loopback: bool,
) -> Verdict {
    if cfg.flags & FLAG_CAPTURE_OTHER_NETNS == 0 {
        return Verdict::Refuse;
    }
    if loopback && !provider {
        return Verdict::Pass;
    }
    match sa.type_ {
        SOCK_STREAM if port_matches(port_be) => Verdict::CaptureForeign,
        SOCK_STREAM => Verdict::Refuse,
        _ if cfg.flags & FLAG_REFUSE_UDP != 0 => Verdict::Refuse,
        _ => Verdict::Pass,
    }
}

#[inline(always)]
fn record(
    ctx: &SockAddrContext,
    family: u32,
    addr_be: [u32; 4],
    port_be: u32,
    provider: bool,
) -> Result<(), i32> {
    // SAFETY: helper calls on the program's own context.
    let (cookie, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let origin = Origin {
        // SAFETY: plain helper calls.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: netns,
        time_ns: unsafe { bpf_ktime_get_ns() },
        addr_be,
        port_be,
        family,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        flags: if provider { ORIGIN_PROVIDER_PREFIX } else { 0 },
        _pad: 0,
    };
    KT_BY_COOKIE.insert(&cookie, &origin, 0)
}

#[cgroup_sock_addr(connect4)]
pub fn kt_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(DENY)
}

/// Err means a matched connection could not be recorded: refuse it rather
/// than let it out or leave the gateway blind.
fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(cfg) = config() else {
        return Ok(ALLOW);
    };
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's life.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (addr, port) = (sa.user_ip4, sa.user_port);
    let provider = v4_matches(addr);
    let loopback = v4_loopback(addr);
    if !provider {
        let d = egress::Dest {
            family: AF_INET,
            addr_be: [addr, 0, 0, 0],
            port_be: port,
            mapped: false,
        };
        if let Some(v) = egress::connect(ctx, sa, cfg, &d) {
            return Ok(v);
        }
    }
    if !provider && !port_wide(cfg, sa, port, loopback) {
        return Ok(ALLOW);
    }
    let (ip, to_port) = match decide(ctx, sa, cfg, port, provider, loopback) {
        Verdict::Pass => return Ok(ALLOW),
        Verdict::Refuse => return Ok(DENY),
        Verdict::Capture => (cfg.listen4_be, cfg.listen4_port_be),
        Verdict::CaptureForeign if cfg.foreign4_port_be != 0 => {
            (cfg.foreign4_be, cfg.foreign4_port_be)
        }
        Verdict::CaptureForeign => return Ok(DENY),
    };
    record(ctx, AF_INET, [addr, 0, 0, 0], port, provider).map_err(|_| DENY)?;
    sa.user_ip4 = ip;
    sa.user_port = to_port;
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn kt_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(DENY)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(cfg) = config() else {
        return Ok(ALLOW);
    };
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = sa.user_port;
    let addr = read_ip6(sa);
    if let Some(v4) = v4_mapped(&addr) {
        // A dual-stack socket reaching an IPv4 address.
        let provider = v4_matches(v4);
        let loopback = v4_loopback(v4);
        if !provider {
            let d = egress::Dest {
                family: AF_INET,
                addr_be: [v4, 0, 0, 0],
                port_be: port,
                mapped: true,
            };
            if let Some(v) = egress::connect(ctx, sa, cfg, &d) {
                return Ok(v);
            }
        }
        if !provider && !port_wide(cfg, sa, port, loopback) {
            return Ok(ALLOW);
        }
        let (ip, to_port) = match decide(ctx, sa, cfg, port, provider, loopback) {
            Verdict::Pass => return Ok(ALLOW),
            Verdict::Refuse => return Ok(DENY),
            Verdict::Capture => (cfg.listen4_be, cfg.listen4_port_be),
            Verdict::CaptureForeign if cfg.foreign4_port_be != 0 => {
                (cfg.foreign4_be, cfg.foreign4_port_be)
            }
            Verdict::CaptureForeign => return Ok(DENY),
        };
        record(ctx, AF_INET, [v4, 0, 0, 0], port, provider).map_err(|_| DENY)?;
        write_ip6(sa, [0, 0, 0xffffu32.to_be(), ip]);
        sa.user_port = to_port;
        return Ok(ALLOW);
    }
    let provider = v6_matches(&addr);
    if !provider {
        let d = egress::Dest {
            family: AF_INET6,
            addr_be: addr,
            port_be: port,
            mapped: false,
        };
        if let Some(v) = egress::connect(ctx, sa, cfg, &d) {
            return Ok(v);
        }
    }
    let loopback = addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && u32::from_be(addr[3]) == 1;
    if !provider && !port_wide(cfg, sa, port, loopback) {
        return Ok(ALLOW);
    }
    let (ip, to_port) = match decide(ctx, sa, cfg, port, provider, loopback) {
        Verdict::Pass => return Ok(ALLOW),
        Verdict::Refuse => return Ok(DENY),
        Verdict::Capture => (cfg.listen6_be, cfg.listen6_port_be),
        Verdict::CaptureForeign => (cfg.foreign6_be, cfg.foreign6_port_be),
    };
    if to_port == 0 {
        // No IPv6 listener of that kind: fail closed.
        return Ok(DENY);
    }
    record(ctx, AF_INET6, addr, port, provider).map_err(|_| DENY)?;
    write_ip6(sa, ip);
    sa.user_port = to_port;
    Ok(ALLOW)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kt_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    // Any port: a provider address is reached through kt over TCP only.
    if cfg.flags & FLAG_REFUSE_UDP != 0 && v4_matches(sa.user_ip4) {
        return DENY;
    }
    egress::sendmsg(
        &ctx,
        &egress::Dest {
            family: AF_INET,
            addr_be: [sa.user_ip4, 0, 0, 0],
            port_be: sa.user_port,
            mapped: false,
        },
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kt_sendmsg6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = read_ip6(sa);
    let (d, matched) = match v4_mapped(&addr) {
        Some(v4) => (
            egress::Dest {
                family: AF_INET,
                addr_be: [v4, 0, 0, 0],
                port_be: sa.user_port,
                mapped: true,
            },
            v4_matches(v4),
        ),
        None => (
            egress::Dest {
                family: AF_INET6,
                addr_be: addr,
                port_be: sa.user_port,
                mapped: false,
            },
            v6_matches(&addr),
        ),
    };
    if matched {
        if cfg.flags & FLAG_REFUSE_UDP != 0 {
            return DENY;
        }
        return ALLOW;
    }
    egress::sendmsg(&ctx, &d)
}

#[cgroup_sock_addr(getpeername4)]
pub fn kt_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy out of the map value.
    if let Some(origin) = unsafe { KT_BY_COOKIE.get(&cookie) } {
        if origin.family == AF_INET {
            // SAFETY: as in connect4.
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = origin.addr_be[0];
            sa.user_port = origin.port_be;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn kt_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy out of the map value.
    if let Some(origin) = unsafe { KT_BY_COOKIE.get(&cookie) } {
        // SAFETY: as in connect4.
        let sa = unsafe { &mut *ctx.sock_addr };
        if origin.family == AF_INET {
            write_ip6(sa, [0, 0, 0xffffu32.to_be(), origin.addr_be[0]]);
        } else {
            write_ip6(sa, origin.addr_be);
        }
        sa.user_port = origin.port_be;
    }
    ALLOW
}

#[sock_ops]
pub fn kt_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // Nothing to do on failure: the gateway then sees no record and
        // refuses the connection itself.
        let _ = try_sock_ops(&ctx);
    }
    0
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i32> {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy out of the map value.
    let Some(origin) = (unsafe { KT_BY_COOKIE.get(&cookie) }) else {
        return Ok(());
    };
    let origin = *origin;
    let mut key = PeerKey {
        family: ctx.family(),
        port: ctx.local_port(),
        addr_be: [0; 4],
    };
    if key.family == AF_INET {
        key.addr_be[0] = ctx.local_ip4();
    } else {
        let ip6 = ctx.local_ip6();
        match v4_mapped(&ip6) {
            Some(v4) => {
                key.family = AF_INET;
                key.addr_be[0] = v4;
            }
            None => key.addr_be = ip6,
        }
    }
    KT_BY_PEER.insert(&key, &origin, 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
