//! CONNECT: the request target (authority form, as hyper hands it over),
//! kt's host/port extraction, the allowlist and the internal-address check.

use std::net::{IpAddr, Ipv6Addr};

use crate::gateway::connect::{allowed, connect_target, is_internal};

/// Allowlist the harness checks names against.
const ALLOW: [&str; 3] = ["example.com", "*.example.org", "API.Example.NET."];

/// The host is lower case without brackets or a trailing dot; an
/// allowlisted host is exactly an entry or a true subdomain of a `*.`
/// entry; an IPv4 address and its IPv4-mapped IPv6 form are judged alike.
pub fn connect(data: &[u8]) {
    let Ok(uri) = http::Uri::try_from(data) else {
        return;
    };
    let Some((host, port)) = connect_target(&uri) else {
        assert!(uri.authority().is_none());
        return;
    };
    assert!(!host.starts_with('[') && !host.ends_with(']'), "{host}");
    // `api.openai.com.` is `api.openai.com`: a trailing dot never makes
    // a provider name another host.
    assert!(!host.ends_with('.'), "{host}");
    assert_eq!(host, host.to_ascii_lowercase());
    if let Some(p) = uri.port_u16() {
        assert_eq!(port, p);
    } else {
        assert_eq!(port, 443);
    }

    let list: Vec<String> = ALLOW.iter().map(|s| (*s).to_string()).collect();
    if allowed(&list, &host) {
        assert!(
            host == "example.com" || host == "api.example.net" || host.ends_with(".example.org"),
            "{host} passed the allowlist"
        );
    }

    if let Ok(ip) = host.parse::<IpAddr>() {
        let internal = is_internal(ip);
        if let IpAddr::V4(v4) = ip {
            let mapped: Ipv6Addr = v4.to_ipv6_mapped();
            assert_eq!(
                internal,
                is_internal(IpAddr::V6(mapped)),
                "{ip} vs {mapped}"
            );
        }
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            assert!(internal, "{ip} must count as internal");
        }
    }
}
