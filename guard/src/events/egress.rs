//! `kt egress report`: the destinations strict egress recorded (audit) or
//! refused (enforce), per cgroup, turned into a suggested allowlist.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use super::Event;
use crate::capture::egress::{EGRESS_AUDIT_RULE, EGRESS_REFUSED_RULE, parse_egress_location};

/// One destination reached (or tried) from one cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EgressDestination {
    /// `tcp` or `udp`.
    pub proto: String,
    /// The address.
    pub address: String,
    /// The port.
    pub port: u16,
    /// The host name kt resolved to this address, when it did.
    pub name: Option<String>,
    /// Times recorded in audit mode (one per process).
    pub recorded: u64,
    /// Times refused in enforce mode (one per process).
    pub refused: u64,
    /// Executables seen reaching it (file names).
    pub processes: Vec<String>,
}

/// What one cgroup (a job, a service, a container) reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EgressGroup {
    /// cgroup-v2 path, or `unknown` when the process was gone before kt looked.
    pub cgroup: String,
    /// Container id, when the cgroup path shows one.
    pub container_id: Option<String>,
    /// Every destination, sorted.
    pub destinations: Vec<EgressDestination>,
    /// Suggested `capture.egress.allow` entries (DNS left out).
    pub allow: Vec<String>,
    /// DNS servers reached on 53/853: for `capture.egress.resolvers`.
    pub resolvers: Vec<String>,
}

/// The report: per cgroup, and the union of the suggestions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EgressReport {
    /// Per cgroup, sorted by path.
    pub groups: Vec<EgressGroup>,
    /// Every group's `allow`, deduplicated and sorted.
    pub allow: Vec<String>,
    /// Every group's `resolvers`, deduplicated and sorted.
    pub resolvers: Vec<String>,
}

/// The suggested allow entry for a destination: `name:port` when kt
/// resolved the address for a name, else `address/len:port`.
fn suggestion(dst: SocketAddr, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{n}:{}", dst.port()),
        None if dst.is_ipv4() => format!("{}/32:{}", dst.ip(), dst.port()),
        None => format!("[{}]/128:{}", dst.ip(), dst.port()),
    }
}

impl EgressReport {
    /// Builds the report from events (others than egress ones are skipped).
    pub fn of(events: &[Event]) -> EgressReport {
        type Key = (String, SocketAddr);
        let mut groups: BTreeMap<String, (Option<String>, BTreeMap<Key, EgressDestination>)> =
            BTreeMap::new();
        for e in events {
            let Some(note) = e.policy.iter().find(|n| {
                n.policy == "guard"
                    && matches!(
                        n.rule_id.as_deref(),
                        Some(EGRESS_AUDIT_RULE | EGRESS_REFUSED_RULE)
                    )
            }) else {
                continue;
            };
            let Some((proto, dst, name)) = note.location.as_deref().and_then(parse_egress_location)
            else {
                continue;
            };
            let refused = note.rule_id.as_deref() == Some(EGRESS_REFUSED_RULE);
            let cgroup = e.client.cgroup.clone().unwrap_or_else(|| "unknown".into());
            let (container, dests) = groups.entry(cgroup).or_default();
            if container.is_none() {
                container.clone_from(&e.client.container_id);
            }
            let d = dests
                .entry((proto.clone(), dst))
                .or_insert_with(|| EgressDestination {
                    proto,
                    address: dst.ip().to_string(),
                    port: dst.port(),
                    name: None,
                    recorded: 0,
                    refused: 0,
                    processes: Vec::new(),
                });
            if d.name.is_none() {
                d.name = name;
            }
            if refused {
                d.refused += 1;
            } else {
                d.recorded += 1;
            }
            if let Some(exe) = e.client.exe.as_deref().and_then(|x| x.rsplit('/').next())
                && !d.processes.iter().any(|p| p == exe)
            {
                d.processes.push(exe.to_string());
            }
        }
        let mut report = EgressReport::default();
        for (cgroup, (container_id, dests)) in groups {
            let destinations: Vec<EgressDestination> = dests.into_values().collect();
            let mut allow = Vec::new();
            let mut resolvers = Vec::new();
            for d in &destinations {
                let dst = SocketAddr::new(d.address.parse().unwrap_or([0, 0, 0, 0].into()), d.port);
                if d.port == 53 || d.port == 853 {
                    resolvers.push(d.address.clone());
                } else {
                    allow.push(suggestion(dst, d.name.as_deref()));
                }
            }
            allow.sort();
            allow.dedup();
            resolvers.sort();
            resolvers.dedup();
            report.allow.extend(allow.iter().cloned());
            report.resolvers.extend(resolvers.iter().cloned());
            report.groups.push(EgressGroup {
                cgroup,
                container_id,
                destinations,
                allow,
                resolvers,
            });
        }
        report.allow.sort();
        report.allow.dedup();
        report.resolvers.sort();
        report.resolvers.dedup();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Decision, PolicyNote};

    fn event(rule: &str, location: &str, cgroup: &str, exe: &str) -> Event {
        let mut e = Event::new("r", Decision::Block);
        e.policy.push(PolicyNote {
            policy: "guard".into(),
            decision: "block".into(),
            rule_id: Some(rule.into()),
            location: Some(location.into()),
        });
        e.client.cgroup = Some(cgroup.into());
        e.client.exe = Some(exe.into());
        e
    }

    #[test]
    fn the_report_suggests_names_addresses_and_resolvers_per_cgroup() {
        let events = vec![
            event(
                EGRESS_AUDIT_RULE,
                "tcp 192.0.2.1:443",
                "/ci/job1",
                "/usr/bin/curl",
            ),
            event(
                EGRESS_AUDIT_RULE,
                "tcp 192.0.2.1:443",
                "/ci/job1",
                "/usr/bin/python3",
            ),
            event(
                EGRESS_AUDIT_RULE,
                "tcp 198.51.100.7:443 name=pypi.org",
                "/ci/job1",
                "/usr/bin/pip",
            ),
            event(
                EGRESS_AUDIT_RULE,
                "udp 10.0.0.2:53",
                "/ci/job1",
                "/usr/bin/pip",
            ),
            event(
                EGRESS_REFUSED_RULE,
                "tcp [2001:db8::1]:22",
                "/ci/job2",
                "/usr/bin/ssh",
            ),
            // Not an egress event.
            event("no-sni", "x", "/ci/job1", "/usr/bin/curl"),
        ];
        let r = EgressReport::of(&events);
        assert_eq!(r.groups.len(), 2);
        let g1 = &r.groups[0];
        assert_eq!(g1.cgroup, "/ci/job1");
        assert_eq!(g1.allow, vec!["192.0.2.1/32:443", "pypi.org:443"]);
        assert_eq!(g1.resolvers, vec!["10.0.0.2"]);
        let d = &g1.destinations[0];
        assert_eq!(d.recorded, 2);
        assert_eq!(d.processes, vec!["curl", "python3"]);
        assert_eq!(r.groups[1].allow, vec!["[2001:db8::1]/128:22"]);
        assert_eq!(r.groups[1].destinations[0].refused, 1);
        assert_eq!(r.allow.len(), 3);
    }
}
