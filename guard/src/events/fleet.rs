//! The fleet-wide key report: events of many hosts (the JSON Lines their
//! sinks write, collected in one place) merged into one answer to "which
//! hosts and processes still present which key?".
//!
//! Managed secrets are grouped by name: the names come from the shared
//! store, the same on every host. Keys kt does not manage are grouped by
//! provider, then host and fingerprint: fingerprints are keyed per host
//! (`fingerprint.key`), so equal keys on two hosts have two fingerprints
//! and only the host can say which process holds one.

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::Serialize;

use super::{Event, Host, ProcessUsage};

/// Events read from JSON Lines, and how many lines were not events.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The events, in the order read.
    pub events: Vec<Event>,
    /// Lines that did not parse as an event (blank lines not counted).
    pub skipped: u64,
}

/// Reads JSON Lines events (the `schema`-versioned shape of the sinks and
/// `kt events --output json`). Lines that are not events are counted and
/// skipped: a collector may interleave other records. Events without a
/// `host` (written before kt named hosts) keep `None`.
pub fn read_json_lines(reader: impl BufRead, into: &mut Loaded) -> std::io::Result<()> {
    for line in reader.lines() {
        let line = line?;
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(t) {
            Ok(e) => into.events.push(e),
            Err(_) => into.skipped += 1,
        }
    }
    Ok(())
}

/// Who presented one managed secret on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostUsage {
    /// The host (`None`: events that did not name one).
    pub host: Option<Host>,
    /// Requests.
    pub count: u64,
    /// The last one (ms since the epoch).
    pub last_seen_ms: i64,
    /// Its processes, most recent first.
    pub processes: Vec<ProcessUsage>,
}

/// One managed secret across the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FleetSecret {
    /// The secret's name (`NAME (previous value)` for a value replaced
    /// while kt ran: the old key after a rotation).
    pub name: String,
    /// Requests, all hosts.
    pub count: u64,
    /// The last one.
    pub last_seen_ms: i64,
    /// Per host, most recent first.
    pub hosts: Vec<HostUsage>,
}

/// One unmanaged key on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnmanagedKey {
    /// The host.
    pub host: Option<Host>,
    /// Its fingerprint (keyed per host).
    pub fingerprint: String,
    /// Requests.
    pub count: u64,
    /// The last one.
    pub last_seen_ms: i64,
    /// Its processes, most recent first.
    pub processes: Vec<ProcessUsage>,
}

/// Unmanaged keys of one provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProviderKeys {
    /// The provider whose key format the keys have, else the one they were
    /// sent to (`unknown` when neither is known).
    pub provider: String,
    /// Keys, most recent first.
    pub keys: Vec<UnmanagedKey>,
}

/// The fleet-wide key report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FleetKeys {
    /// Distinct hosts seen.
    pub hosts: usize,
    /// Events read.
    pub events: usize,
    /// Managed secrets by name.
    pub managed: Vec<FleetSecret>,
    /// Unmanaged keys by provider.
    pub unmanaged: Vec<ProviderKeys>,
}

type ProcKey = (
    Option<String>,
    Option<u32>,
    Option<u32>,
    Option<String>,
    Option<String>,
    Option<String>,
);

#[derive(Default)]
struct Acc {
    count: u64,
    first: i64,
    last: i64,
    procs: BTreeMap<ProcKey, ProcessUsage>,
}

impl Acc {
    fn add(&mut self, e: &Event) {
        self.first = if self.count == 0 {
            e.time_ms
        } else {
            self.first.min(e.time_ms)
        };
        self.count += 1;
        self.last = self.last.max(e.time_ms);
        let c = &e.client;
        // Captured clients are told apart by process; others by address.
        let addr = c.pid.is_none().then(|| c.addr.clone()).flatten();
        let key = (
            c.exe.clone(),
            c.pid,
            c.uid,
            c.cgroup.clone(),
            c.container_id.clone(),
            addr.clone(),
        );
        let p = self.procs.entry(key).or_insert_with(|| ProcessUsage {
            host: None,
            exe: c.exe.clone(),
            pid: c.pid,
            uid: c.uid,
            cgroup: c.cgroup.clone(),
            container_id: c.container_id.clone(),
            addr,
            count: 0,
            last_seen_ms: 0,
        });
        p.count += 1;
        p.last_seen_ms = p.last_seen_ms.max(e.time_ms);
    }

    fn processes(self) -> Vec<ProcessUsage> {
        let mut v: Vec<ProcessUsage> = self.procs.into_values().collect();
        v.sort_by_key(|b| std::cmp::Reverse(b.last_seen_ms));
        v
    }
}

/// Builds the report from `events` at least as new as `since_ms`.
pub fn fleet_keys(events: &[Event], since_ms: Option<i64>) -> FleetKeys {
    let mut managed: BTreeMap<String, BTreeMap<Option<Host>, Acc>> = BTreeMap::new();
    let mut unmanaged: BTreeMap<String, BTreeMap<(Option<Host>, String), Acc>> = BTreeMap::new();
    let mut hosts = std::collections::BTreeSet::new();
    let mut n = 0;
    for e in events {
        if since_ms.is_some_and(|s| e.time_ms < s) {
            continue;
        }
        n += 1;
        hosts.insert(e.host.clone());
        let Some(key) = &e.key else { continue };
        match &key.matches_secret {
            Some(name) => managed
                .entry(name.clone())
                .or_default()
                .entry(e.host.clone())
                .or_default()
                .add(e),
            // The provider whose key format it has; else the one it was sent to.
            None => unmanaged
                .entry(
                    key.provider
                        .clone()
                        .or_else(|| e.provider.clone())
                        .unwrap_or_else(|| "unknown".into()),
                )
                .or_default()
                .entry((e.host.clone(), key.fingerprint.clone()))
                .or_default()
                .add(e),
        }
    }
    let managed = managed
        .into_iter()
        .map(|(name, by_host)| {
            let mut hosts: Vec<HostUsage> = by_host
                .into_iter()
                .map(|(host, acc)| HostUsage {
                    host,
                    count: acc.count,
                    last_seen_ms: acc.last,
                    processes: acc.processes(),
                })
                .collect();
            hosts.sort_by_key(|b| std::cmp::Reverse(b.last_seen_ms));
            FleetSecret {
                name,
                count: hosts.iter().map(|h| h.count).sum(),
                last_seen_ms: hosts.iter().map(|h| h.last_seen_ms).max().unwrap_or(0),
                hosts,
            }
        })
        .collect();
    let unmanaged = unmanaged
        .into_iter()
        .map(|(provider, keys)| {
            let mut keys: Vec<UnmanagedKey> = keys
                .into_iter()
                .map(|((host, fingerprint), acc)| UnmanagedKey {
                    host,
                    fingerprint,
                    count: acc.count,
                    last_seen_ms: acc.last,
                    processes: acc.processes(),
                })
                .collect();
            keys.sort_by_key(|b| std::cmp::Reverse(b.last_seen_ms));
            ProviderKeys { provider, keys }
        })
        .collect();
    FleetKeys {
        hosts: hosts.len(),
        events: n,
        managed,
        unmanaged,
    }
}

/// The per-host key usage of merged events, in the shape of the local key
/// report (`kt report --from`): one row per host and fingerprint.
pub fn key_usage(events: &[Event], since_ms: Option<i64>) -> Vec<super::KeyUsage> {
    // The accumulator, whether any request marked the key managed, and the
    // provider whose key format it has.
    type Slot = (Acc, bool, Option<String>);
    let mut by: BTreeMap<(Option<Host>, String, Option<String>), Slot> = BTreeMap::new();
    for e in events {
        if since_ms.is_some_and(|s| e.time_ms < s) {
            continue;
        }
        let Some(key) = &e.key else { continue };
        let slot = by
            .entry((
                e.host.clone(),
                key.fingerprint.clone(),
                key.matches_secret.clone(),
            ))
            .or_insert_with(|| (Acc::default(), false, None));
        slot.0.add(e);
        slot.1 |= key.managed;
        if slot.2.is_none() {
            slot.2.clone_from(&key.provider);
        }
    }
    let mut out: Vec<super::KeyUsage> = by
        .into_iter()
        .map(
            |((host, fingerprint, matches_secret), (acc, managed, provider))| {
                let (count, first, last) = (acc.count, acc.first, acc.last);
                let mut processes = acc.processes();
                for p in &mut processes {
                    p.host = host.as_ref().map(|h| h.name.clone());
                }
                super::KeyUsage {
                    fingerprint,
                    matches_secret,
                    managed,
                    provider,
                    count,
                    first_seen_ms: first,
                    last_seen_ms: last,
                    processes,
                }
            },
        )
        .collect();
    out.sort_by_key(|b| std::cmp::Reverse(b.last_seen_ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Decision, PresentedKey};

    fn event(host: &str, t: i64, secret: Option<&str>, fp: &str, pid: u32) -> Event {
        let mut e = Event::new(format!("r{t}"), Decision::Allow);
        e.time_ms = t;
        e.provider = Some("openai".into());
        e.client.pid = Some(pid);
        e.client.exe = Some("/usr/bin/job".into());
        e.key = Some(PresentedKey {
            fingerprint: fp.into(),
            matches_secret: secret.map(str::to_string),
            managed: secret.is_some(),
            provider: None,
        });
        e.host = Some(Host {
            name: host.into(),
            id: format!("id-{host}"),
        });
        e
    }

    #[test]
    fn lines_of_many_hosts_merge_into_one_answer_per_secret() {
        let mut lines = String::new();
        for e in [
            event("a", 10, Some("K"), "fp:1", 1),
            event("b", 20, Some("K"), "fp:2", 2),
            event("b", 30, Some("K (previous value)"), "fp:3", 3),
            event("a", 40, None, "fp:9", 4),
            event("a", 41, None, "fp:9", 4),
        ] {
            lines.push_str(&serde_json::to_string(&e.json()).unwrap());
            lines.push('\n');
        }
        lines.push_str("<14>1 2026-01-01T00:00:00Z host kt - - - syslog line\n\n");
        let mut loaded = Loaded::default();
        read_json_lines(lines.as_bytes(), &mut loaded).unwrap();
        assert_eq!((loaded.events.len(), loaded.skipped), (5, 1));
        let r = fleet_keys(&loaded.events, None);
        assert_eq!((r.hosts, r.events), (2, 5));
        assert_eq!(r.managed.len(), 2);
        let k = &r.managed[0];
        assert_eq!((k.name.as_str(), k.count, k.last_seen_ms), ("K", 2, 20));
        assert_eq!(
            k.hosts[0].host.as_ref().unwrap().name,
            "b",
            "most recent first"
        );
        let old = &r.managed[1];
        assert_eq!(old.hosts.len(), 1);
        assert_eq!(old.hosts[0].host.as_ref().unwrap().id, "id-b");
        assert_eq!(old.hosts[0].processes[0].pid, Some(3));
        assert_eq!(r.unmanaged[0].provider, "openai");
        assert_eq!(r.unmanaged[0].keys[0].count, 2);
        // A window leaves older events out.
        assert_eq!(fleet_keys(&loaded.events, Some(25)).events, 3);
        let usage = key_usage(&loaded.events, None);
        assert_eq!(usage.len(), 4);
        assert!(usage.iter().all(|u| u.processes[0].host.is_some()));
    }
}
