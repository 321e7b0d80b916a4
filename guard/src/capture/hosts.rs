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
//!
//! A host dropped from the list (a reload) releases its addresses at once,
//! unless a host still listed returned them too: retention protects against
//! stale DNS caches, not against the operator's decision to stop capturing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::capture;
use crate::config::{CaptureProviders, Config, IpPrefix};

/// How often provider host names are resolved again. getaddrinfo does not
/// expose TTLs, so this is a fixed, short interval; retention (not the
/// interval) is what keeps cached addresses captured.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(60);

/// How long an address stays captured after DNS last returned it.
pub const RETAIN: Duration = Duration::from_secs(24 * 60 * 60);

/// Most resolved addresses kept (the kernel prefix maps hold 4,096 each;
/// configured CIDRs need room too). Past this, the least recently seen go.
pub const MAX_KEPT: usize = 1024;

/// Most names learned from what clients named ([`LearnedNames`]).
pub const MAX_LEARNED: usize = 256;

/// Concrete names under a provider's wildcard host (`res2.openai.azure.com`
/// under `*.openai.azure.com`) that clients named to the gateway (CONNECT,
/// SNI): a wildcard cannot be resolved in advance, so such a name, once
/// seen, is resolved with the listed hosts from then on and its addresses
/// captured, for every other process that calls it directly. Bounded
/// ([`MAX_LEARNED`], first come; a full set learns nothing more) so a client
/// naming random subdomains cannot grow kt's resolution without limit.
#[derive(Debug, Default)]
pub struct LearnedNames {
    names: std::sync::Mutex<Vec<String>>,
}

impl LearnedNames {
    /// An empty set.
    pub const fn new() -> LearnedNames {
        LearnedNames {
            names: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Adds `name` (lower case); true when it is new and there was room.
    pub fn learn(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let Ok(mut names) = self.names.lock() else {
            return false;
        };
        if names.len() >= MAX_LEARNED || names.contains(&name) {
            return false;
        }
        names.push(name);
        true
    }

    /// Every name learned so far, in the order learned.
    pub fn snapshot(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

/// The gateway's learned names, resolved by the capture supervisor of the
/// same process.
pub static LEARNED: LearnedNames = LearnedNames::new();

/// `hosts` followed by the learned names not among them.
pub fn with_learned(hosts: &[String], learned: &[String]) -> Vec<String> {
    let mut all = hosts.to_vec();
    for l in learned {
        if !all.contains(l) {
            all.push(l.clone());
        }
    }
    all
}

/// One host's answer in a round of resolution: its addresses, empty when it
/// did not resolve.
pub type HostAddrs = (String, Vec<IpPrefix>);

/// Resolved addresses, which hosts returned each and when each host last
/// did. Pure: the caller passes the clock.
#[derive(Clone, Debug)]
pub struct SeenPrefixes {
    seen: HashMap<IpPrefix, HashMap<String, Instant>>,
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
    /// added (for the log). A round in which nothing resolved (DNS down)
    /// changes nothing, so an outage never releases addresses early.
    pub fn update(&mut self, resolved: &[HostAddrs], now: Instant) -> Vec<IpPrefix> {
        if resolved.iter().all(|(_, addrs)| addrs.is_empty()) {
            return Vec::new();
        }
        let mut added = Vec::new();
        for (host, addrs) in resolved {
            for p in addrs {
                let by_host = self.seen.entry(*p).or_default();
                if by_host.is_empty() {
                    added.push(*p);
                }
                by_host.insert(host.clone(), now);
            }
        }
        let retain = self.retain;
        self.seen.retain(|_, by_host| {
            by_host.retain(|_, last| now.saturating_duration_since(*last) <= retain);
            !by_host.is_empty()
        });
        if self.seen.len() > self.max {
            let mut by_age: Vec<(IpPrefix, Instant)> = self
                .seen
                .iter()
                .filter_map(|(p, by_host)| Some((*p, *by_host.values().max()?)))
                .collect();
            by_age.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            for (p, _) in by_age.into_iter().skip(self.max) {
                self.seen.remove(&p);
            }
        }
        added
    }

    /// Forgets what hosts not in `hosts` returned (they are no longer
    /// captured by name); an address another listed host returned stays.
    /// Returns the addresses no longer kept.
    pub fn keep_hosts(&mut self, hosts: &[String]) -> Vec<IpPrefix> {
        let mut dropped = Vec::new();
        self.seen.retain(|p, by_host| {
            by_host.retain(|h, _| hosts.contains(h));
            if by_host.is_empty() {
                dropped.push(*p);
            }
            !by_host.is_empty()
        });
        sort_prefixes(&mut dropped);
        dropped
    }

    /// Every address kept, in a stable order.
    pub fn prefixes(&self) -> Vec<IpPrefix> {
        let mut v: Vec<IpPrefix> = self.seen.keys().copied().collect();
        sort_prefixes(&mut v);
        v
    }
}

/// Sorts prefixes by address, then length (a stable order for logs, events
/// and comparisons).
pub fn sort_prefixes(v: &mut [IpPrefix]) {
    v.sort_by_key(|p| (p.addr, p.len));
}

/// Whether `host` failed to resolve for the first time in this run.
fn first_failure(host: &str) -> bool {
    static FAILED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Ok(mut failed) = FAILED.lock() else {
        return true;
    };
    if failed.iter().any(|h| h == host) {
        return false;
    }
    // Bounded like the learned names: past it, every failure is new.
    if failed.len() < 4 * MAX_LEARNED {
        failed.push(host.to_string());
    }
    true
}

/// Resolves `hosts` (A and AAAA) to host prefixes, one entry per host in
/// order; a host that does not resolve is logged and has no addresses.
/// The lookups run at once (`capture.providers: all` lists about a
/// hundred names: one after the other, a slow resolver would hold kt's
/// start for minutes); the blocking pool bounds how many are in flight.
pub async fn resolve(hosts: &[String], ports: &[u16]) -> Vec<HostAddrs> {
    let port = ports.first().copied().unwrap_or(443);
    let mut set = tokio::task::JoinSet::new();
    for (i, h) in hosts.iter().enumerate() {
        let h = h.clone();
        set.spawn(async move {
            let mut addrs_of = Vec::new();
            match tokio::net::lookup_host((h.as_str(), port)).await {
                Ok(addrs) => {
                    for a in addrs {
                        let p = capture::prefix_of(a.ip());
                        if !addrs_of.contains(&p) {
                            addrs_of.push(p);
                        }
                    }
                }
                // Once per host and run: the catalog lists names (a region
                // where a service is not offered) that may never resolve,
                // and this runs every minute.
                Err(e) if first_failure(&h) => tracing::warn!(host = %h, error = %e, "cannot resolve provider host (tried again every minute; further failures are logged at debug level)"),
                Err(e) => tracing::debug!(host = %h, error = %e, "cannot resolve provider host"),
            }
            (i, (h, addrs_of))
        });
    }
    let mut out: Vec<Option<HostAddrs>> = vec![None; hosts.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, r)) = done
            && let Some(slot) = out.get_mut(i)
        {
            *slot = Some(r);
        }
    }
    // A lookup task that panicked counts as a host that did not resolve.
    out.into_iter()
        .zip(hosts)
        .map(|(r, h)| r.unwrap_or_else(|| (h.clone(), Vec::new())))
        .collect()
}

/// Hosts whose addresses are captured: `capture.hosts`, else the hosts
/// of targets' endpoints, every catalog host of the providers in use
/// (`capture.providers: all`: of every catalog provider), and custom
/// providers' `hosts`.
///
/// Wildcard names (`*.openai.azure.com`) cannot be resolved in advance and
/// are left out here: their concrete names are captured through the
/// targets' endpoints (an Azure target's resource host), and the gateway
/// accepts any name under a wildcard when a captured connection (or a
/// CONNECT tunnel) names it; with `capture.scope: port` every connection
/// on the capture ports reaches that decision.
pub fn capture_hosts(config: &Config) -> Vec<String> {
    if let Some(h) = &config.capture.hosts {
        return h.clone();
    }
    let mut hosts = Vec::new();
    let mut push = |host: String| {
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    };
    for t in &config.providers.targets {
        let url = t
            .base_url
            .clone()
            .or_else(|| t.provider.default_base_url().map(str::to_string));
        if let Some(host) = url.as_deref().and_then(host_of) {
            push(host);
        }
    }
    let mut providers: Vec<crate::provider::Provider> = config
        .providers
        .targets
        .iter()
        .map(|t| t.provider.clone())
        .collect();
    if config.capture.providers == CaptureProviders::All {
        providers.extend(crate::provider::KNOWN.iter().cloned());
    }
    for p in providers {
        for h in p.host_patterns() {
            if !crate::provider::is_wildcard(&h) && !is_loopback_name(&h) {
                push(h.to_ascii_lowercase());
            }
        }
    }
    hosts
}

fn is_loopback_name(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "localhost"
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

    fn round(host: &str, addrs: &[&str]) -> HostAddrs {
        (host.to_string(), addrs.iter().map(|a| p(a)).collect())
    }

    #[test]
    fn an_address_dns_stops_returning_stays_captured_until_retention_ends() {
        let t0 = Instant::now();
        let mut s = SeenPrefixes::new(Duration::from_secs(100), 10);
        assert_eq!(
            s.update(&[round("h", &["192.0.2.1", "192.0.2.2"])], t0)
                .len(),
            2
        );
        // DNS rotated to .3: .1 and .2 are still captured.
        let added = s.update(&[round("h", &["192.0.2.3"])], t0 + Duration::from_secs(60));
        assert_eq!(added, vec![p("192.0.2.3")]);
        assert_eq!(s.prefixes().len(), 3);
        // Past retention, only what was seen recently remains.
        s.update(&[round("h", &["192.0.2.3"])], t0 + Duration::from_secs(150));
        assert_eq!(s.prefixes(), vec![p("192.0.2.3")]);
    }

    #[test]
    fn a_dns_outage_releases_nothing() {
        let t0 = Instant::now();
        let mut s = SeenPrefixes::new(Duration::from_secs(10), 10);
        s.update(&[round("h", &["192.0.2.1"])], t0);
        assert!(
            s.update(&[round("h", &[])], t0 + Duration::from_secs(1000))
                .is_empty()
        );
        assert_eq!(s.prefixes(), vec![p("192.0.2.1")]);
    }

    #[test]
    fn past_the_cap_the_least_recently_seen_go() {
        let t0 = Instant::now();
        let mut s = SeenPrefixes::new(Duration::from_secs(1000), 2);
        s.update(&[round("h", &["192.0.2.1"])], t0);
        s.update(&[round("h", &["192.0.2.2"])], t0 + Duration::from_secs(1));
        s.update(&[round("h", &["192.0.2.3"])], t0 + Duration::from_secs(2));
        assert_eq!(s.prefixes(), vec![p("192.0.2.2"), p("192.0.2.3")]);
    }

    #[test]
    fn a_host_no_longer_listed_releases_its_addresses_unless_another_host_returned_them() {
        let t0 = Instant::now();
        let mut s = SeenPrefixes::new(Duration::from_secs(1000), 10);
        s.update(
            &[
                round("old", &["192.0.2.1", "192.0.2.2"]),
                round("kept", &["192.0.2.2", "192.0.2.3"]),
            ],
            t0,
        );
        let dropped = s.keep_hosts(&["kept".to_string()]);
        assert_eq!(dropped, vec![p("192.0.2.1")]);
        assert_eq!(s.prefixes(), vec![p("192.0.2.2"), p("192.0.2.3")]);
        // The shared address now belongs to the kept host alone.
        assert_eq!(s.keep_hosts(&[]), vec![p("192.0.2.2"), p("192.0.2.3")]);
        assert!(s.prefixes().is_empty());
    }

    /// Addresses only (no DNS query leaves the machine): the answers come
    /// back in the order asked, each with its own address.
    #[tokio::test]
    async fn hosts_are_resolved_at_once_and_answered_in_order() {
        let hosts: Vec<String> = (2..40).map(|i| format!("127.0.0.{i}")).collect();
        let got = resolve(&hosts, &[443]).await;
        assert_eq!(got.len(), hosts.len());
        for ((h, addrs), want) in got.iter().zip(&hosts) {
            assert_eq!(h, want);
            assert_eq!(addrs, &vec![p(want)]);
        }
    }

    #[test]
    fn learned_names_are_bounded_and_deduplicated() {
        let l = LearnedNames::new();
        assert!(l.learn("Res2.OpenAI.Azure.com."));
        assert!(!l.learn("res2.openai.azure.com"));
        for i in 1..MAX_LEARNED {
            assert!(l.learn(&format!("r{i}.openai.azure.com")));
        }
        assert!(!l.learn("one-too-many.openai.azure.com"));
        assert_eq!(l.snapshot().len(), MAX_LEARNED);
        assert_eq!(l.snapshot()[0], "res2.openai.azure.com");
        assert_eq!(
            with_learned(&["a".into()], &["a".into(), "b".into()]),
            vec!["a", "b"]
        );
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

    #[test]
    fn every_catalog_host_is_captured_under_providers_all_but_no_wildcard_is_resolved() {
        let text = "providers:\n  targets:\n    - id: az\n      provider: azure\n      resource: myres\n      secret_key_ref: {env: A}\n    - id: t\n      provider: together\n      secret_key_ref: {env: B}\n";
        let mut c = crate::config::parse(text, std::path::Path::new("t.yaml")).unwrap();
        // Routed only: the Azure resource's own host, and both Together hosts.
        assert_eq!(
            capture_hosts(&c),
            vec![
                "myres.openai.azure.com",
                "api.together.xyz",
                "api.together.ai"
            ]
        );
        c.capture.providers = CaptureProviders::All;
        let all = capture_hosts(&c);
        for h in [
            "api.groq.com",
            "generativelanguage.googleapis.com",
            "api-inference.huggingface.co",
            "bedrock-runtime.us-east-1.amazonaws.com",
        ] {
            assert!(all.iter().any(|a| a == h), "{h} missing from {all:?}");
        }
        assert!(all.iter().all(|h| !h.contains('*')), "{all:?}");
    }
}
