//! Provider host addresses for capture: resolved at start and again every
//! [`RESOLVE_EVERY`], and kept for [`RETAIN`] after they were last seen.
//!
//! Why keep old addresses: provider front ends rotate addresses, but many
//! processes cache a DNS answer for far longer than its TTL (the JVM, some
//! HTTP client pools, long-lived daemons: the legacy processes kt exists to
//! find). If an address left the capture set the moment DNS stopped
//! returning it, such a process would connect to it directly, with its own
//! key, unseen. A process that caches an address for longer than `RETAIN`
//! still escapes; `capture.cidrs` with the provider's published ranges
//! closes that too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::capture;
use crate::config::{Config, IpPrefix};

/// How often provider host names are resolved again. getaddrinfo does not
/// expose TTLs, so this is a fixed, short interval; retention (not the
/// interval) is what keeps cached addresses captured.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(60);

/// How long an address stays captured after DNS last returned it.
pub const RETAIN: Duration = Duration::from_secs(24 * 60 * 60);

/// Most resolved addresses kept (the kernel prefix maps hold 4,096 each;
/// configured CIDRs need room too). Past this, the least recently seen go.
pub const MAX_KEPT: usize = 1024;

/// Resolved addresses and when each was last seen. Pure: the caller passes
/// the clock.
#[derive(Debug)]
pub struct SeenPrefixes {
    seen: HashMap<IpPrefix, Instant>,
    retain: Duration,
    max: usize,
}

impl SeenPrefixes {
    /// An empty set keeping addresses for `retain`, at most `max` of them.
    pub fn new(retain: Duration, max: usize) -> SeenPrefixes {
        SeenPrefixes {
            seen: HashMap::new(),
            retain,
            max,
        }
    }

    /// Records one round of resolution at `now`; returns the addresses newly
    /// added (for the log). An empty round (DNS down) changes nothing, so an
    /// outage never releases addresses early.
    pub fn update(&mut self, resolved: &[IpPrefix], now: Instant) -> Vec<IpPrefix> {
        if resolved.is_empty() {
            return Vec::new();
        }
        let mut added = Vec::new();
        for p in resolved {
            if self.seen.insert(*p, now).is_none() {
                added.push(*p);
            }
        }
        let retain = self.retain;
        self.seen
            .retain(|_, last| now.saturating_duration_since(*last) <= retain);
        if self.seen.len() > self.max {
            let mut by_age: Vec<(IpPrefix, Instant)> =
                self.seen.iter().map(|(p, t)| (*p, *t)).collect();
            by_age.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            self.seen = by_age.into_iter().take(self.max).collect();
        }
        added
    }

    /// Every address kept, in a stable order.
    pub fn prefixes(&self) -> Vec<IpPrefix> {
        let mut v: Vec<IpPrefix> = self.seen.keys().copied().collect();
        v.sort_by_key(|p| (p.addr, p.len));
        v
    }
}

/// Resolves `hosts` (A and AAAA) to host prefixes; failures are logged and
/// skipped.
pub async fn resolve(hosts: &[String], ports: &[u16]) -> Vec<IpPrefix> {
    let port = ports.first().copied().unwrap_or(443);
    let mut out = Vec::new();
    for h in hosts {
        match tokio::net::lookup_host((h.as_str(), port)).await {
            Ok(addrs) => {
                for a in addrs {
                    let p = capture::prefix_of(a.ip());
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
            Err(e) => tracing::warn!(host = %h, error = %e, "cannot resolve provider host"),
        }
    }
    out
}

/// Hosts whose addresses are captured: `capture.hosts`, else the official
/// hosts of the providers in use and the hosts of targets' `base_url`s.
pub fn capture_hosts(config: &Config) -> Vec<String> {
    if let Some(h) = &config.capture.hosts {
        return h.clone();
    }
    let mut hosts = Vec::new();
    for t in &config.providers.targets {
        let url = t
            .base_url
            .clone()
            .or_else(|| t.provider.default_base_url().map(str::to_string));
        if let Some(host) = url.as_deref().and_then(host_of)
            && !hosts.contains(&host)
        {
            hosts.push(host);
        }
    }
    hosts
}

fn host_of(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    // Loopback targets (tests, local models) are never captured by name.
    if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "localhost" {
        return None;
    }
    Some(host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        IpPrefix {
            addr: s.parse().unwrap(),
            len: 32,
        }
    }

    #[test]
    fn an_address_dns_stops_returning_stays_captured_until_retention_ends() {
        let t0 = Instant::now();
        let mut s = SeenPrefixes::new(Duration::from_secs(100), 10);
        assert_eq!(s.update(&[p("192.0.2.1"), p("192.0.2.2")], t0).len(), 2);
        // DNS rotated to .3: .1 and .2 are still captured.
        let added = s.update(&[p("192.0.2.3")], t0 + Duration::from_secs(60));
        assert_eq!(added, vec![p("192.0.2.3")]);
        assert_eq!(s.prefixes().len(), 3);
        // Past retention, only what was seen recently remains.
        s.update(&[p("192.0.2.3")], t0 + Duration::from_secs(150));
        assert_eq!(s.prefixes(), vec![p("192.0.2.3")]);
    }

    #[test]
    fn a_dns_outage_releases_nothing() {
        let t0 = Instant::now();
        let mut s = SeenPrefixes::new(Duration::from_secs(10), 10);
        s.update(&[p("192.0.2.1")], t0);
        assert!(s.update(&[], t0 + Duration::from_secs(1000)).is_empty());
        assert_eq!(s.prefixes(), vec![p("192.0.2.1")]);
    }

    #[test]
    fn past_the_cap_the_least_recently_seen_go() {
        let t0 = Instant::now();
        let mut s = SeenPrefixes::new(Duration::from_secs(1000), 2);
        s.update(&[p("192.0.2.1")], t0);
        s.update(&[p("192.0.2.2")], t0 + Duration::from_secs(1));
        s.update(&[p("192.0.2.3")], t0 + Duration::from_secs(2));
        assert_eq!(s.prefixes(), vec![p("192.0.2.2"), p("192.0.2.3")]);
    }

    #[test]
    fn default_capture_hosts_are_provider_hosts_not_loopback() {
        let mut c = crate::config::parse(
            "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {env: A}\n    - id: b\n      provider: anthropic\n      secret_key_ref: {env: B}\n    - id: c\n      provider: openai\n      base_url: https://127.0.0.1:9999/v1\n      secret_key_ref: {env: C}\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        assert_eq!(
            capture_hosts(&c),
            vec!["api.openai.com", "api.anthropic.com"]
        );
        c.capture.hosts = Some(vec![]);
        assert!(capture_hosts(&c).is_empty());
    }
}
