//! The summary behind `kt report` (and the CI step's job summary): what
//! kt decided over a window — requests by decision and provider, DLP
//! findings by rule, fallbacks and rotation alarms, which processes used
//! which key — and the conditions a CI job may fail on.

use std::collections::BTreeMap;

use serde::Serialize;

use super::model::{Decision, Event};
use super::report::KeyUsage;

/// A condition `kt report --fail-on` checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailOn {
    /// A request was blocked by the DLP filter.
    DlpBlock,
    /// A process presented a key kt does not manage.
    UnmanagedKey,
    /// A managed key was rejected while a fallback served (a broken rotation).
    RotationAlarm,
    /// kt could not complete a request (no target answered, bad request).
    Error,
}

/// What happened over the window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Client requests (kt's own health, probe and reload records apart).
    pub requests: u64,
    /// Requests by decision (`allow`, `block`, `redact`, `error`).
    pub by_decision: BTreeMap<String, u64>,
    /// Requests by provider.
    pub by_provider: BTreeMap<String, u64>,
    /// DLP findings by rule (blocked or redacted).
    pub dlp_findings: BTreeMap<String, u64>,
    /// Requests blocked by the DLP filter.
    pub dlp_blocks: u64,
    /// Requests served by a later target than the first one tried.
    pub fallbacks: u64,
    /// Requests whose new key was rejected while a fallback served.
    pub rotation_alarms: u64,
    /// Responses cut after their headers.
    pub stream_cuts: u64,
    /// Connections and requests kt's own rules refused, by rule.
    pub refused: BTreeMap<String, u64>,
    /// Keys presented, with who presented them (from the key report).
    pub keys: Vec<KeyUsage>,
    /// Keys presented that kt does not manage.
    pub unmanaged_keys: u64,
    /// Time of the first and last event in the window (ms since the epoch).
    pub first_ms: Option<i64>,
    /// Time of the last event.
    pub last_ms: Option<i64>,
}

impl Summary {
    /// Summarises `events` (oldest first) and the key report of the same
    /// window.
    pub fn of(events: &[Event], keys: Vec<KeyUsage>) -> Summary {
        let mut s = Summary {
            first_ms: events.first().map(|e| e.time_ms),
            last_ms: events.last().map(|e| e.time_ms),
            ..Summary::default()
        };
        for e in events {
            let guard_rules: Vec<&str> = e
                .policy
                .iter()
                .filter(|n| n.policy == "guard")
                .filter_map(|n| n.rule_id.as_deref())
                .collect();
            // kt's own records (health, probes, reloads) are not requests.
            let internal = e.message.as_deref().is_some_and(|m| m.ends_with(" via kt"))
                || guard_rules.iter().any(|r| {
                    r.starts_with("probe-")
                        || matches!(
                            *r,
                            "reload" | "reload-refused" | "target-cooled-down" | "target-recovered"
                        )
                });
            if internal {
                continue;
            }
            s.requests += 1;
            *s.by_decision.entry(e.decision.as_str().into()).or_default() += 1;
            if let Some(p) = &e.provider {
                *s.by_provider.entry(p.clone()).or_default() += 1;
            }
            let mut dlp_block = false;
            for n in &e.policy {
                if n.policy == "dlp-filter" {
                    if let Some(rule) = &n.rule_id {
                        *s.dlp_findings.entry(rule.clone()).or_default() += 1;
                    }
                    dlp_block |= n.decision == "block";
                }
            }
            s.dlp_blocks += u64::from(dlp_block);
            if e.decision == Decision::Block {
                for r in &guard_rules {
                    *s.refused.entry((*r).to_string()).or_default() += 1;
                }
            }
            s.fallbacks += u64::from(e.fallback_steps.len() > 1 && e.target_chosen.is_some());
            s.rotation_alarms += u64::from(guard_rules.contains(&"rotation-alarm"));
            s.stream_cuts += u64::from(e.stream.is_some());
        }
        s.unmanaged_keys = keys.iter().filter(|k| k.matches_secret.is_none()).count() as u64;
        s.keys = keys;
        s
    }

    /// The `fail_on` conditions that hold, each with a reason.
    pub fn failures(&self, fail_on: &[FailOn]) -> Vec<String> {
        let mut out = Vec::new();
        for f in fail_on {
            let (n, what) = match f {
                FailOn::DlpBlock => (self.dlp_blocks, "request(s) blocked by the DLP filter"),
                FailOn::UnmanagedKey => (
                    self.unmanaged_keys,
                    "key(s) presented that kt does not manage",
                ),
                FailOn::RotationAlarm => (
                    self.rotation_alarms,
                    "rotation alarm(s): a managed key was rejected while a fallback served",
                ),
                FailOn::Error => (
                    self.by_decision.get("error").copied().unwrap_or(0),
                    "request(s) kt could not complete",
                ),
            };
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::model::{FallbackStep, PolicyNote};
    use crate::events::{ProcessUsage, report::KeyUsage};

    fn note(policy: &str, decision: &str, rule: &str) -> PolicyNote {
        PolicyNote {
            policy: policy.into(),
            decision: decision.into(),
            rule_id: Some(rule.into()),
            location: None,
        }
    }

    fn event(decision: Decision, notes: Vec<PolicyNote>) -> Event {
        let mut e = Event::new("r", decision);
        e.provider = Some("openai".into());
        e.policy = notes;
        e
    }

    #[test]
    fn requests_findings_fallbacks_and_keys_are_counted_and_kts_own_records_are_not() {
        let mut fell_back = event(
            Decision::Allow,
            vec![note("guard", "audit", "rotation-alarm")],
        );
        fell_back.target_chosen = Some("q1".into());
        fell_back.fallback_steps = vec![
            FallbackStep {
                target: "q2".into(),
                outcome: "status_401".into(),
            },
            FallbackStep {
                target: "q1".into(),
                outcome: "status_200".into(),
            },
        ];
        let events = vec![
            event(Decision::Allow, vec![]),
            fell_back,
            event(
                Decision::Block,
                vec![
                    note("dlp-filter", "block", "aws-access-key-id"),
                    note("dlp-filter", "block", "detect-pattern-1"),
                ],
            ),
            event(
                Decision::Block,
                vec![note("guard", "block", "non-provider-name")],
            ),
            // kt's own: a probe and a reload.
            event(Decision::Allow, vec![note("guard", "audit", "probe-ok")]),
            event(Decision::Allow, vec![note("guard", "audit", "reload")]),
        ];
        let keys = vec![
            KeyUsage {
                fingerprint: "fp:aaaaaaaaaaaa".into(),
                matches_secret: Some("OPENAI_Q1".into()),
                managed: true,
                provider: None,
                count: 2,
                first_seen_ms: 1,
                last_seen_ms: 2,
                processes: vec![ProcessUsage {
                    host: None,
                    exe: Some("/usr/bin/curl".into()),
                    pid: Some(42),
                    uid: Some(1000),
                    cgroup: Some("/ci/job-7".into()),
                    container_id: None,
                    addr: None,
                    count: 2,
                    last_seen_ms: 2,
                }],
            },
            KeyUsage {
                fingerprint: "fp:bbbbbbbbbbbb".into(),
                matches_secret: None,
                managed: false,
                provider: None,
                count: 1,
                first_seen_ms: 1,
                last_seen_ms: 1,
                processes: Vec::new(),
            },
        ];
        let s = Summary::of(&events, keys);
        assert_eq!(s.requests, 4);
        assert_eq!(s.by_decision.get("allow"), Some(&2));
        assert_eq!(s.by_decision.get("block"), Some(&2));
        assert_eq!(s.dlp_blocks, 1);
        assert_eq!(s.dlp_findings.get("aws-access-key-id"), Some(&1));
        assert_eq!(s.refused.get("non-provider-name"), Some(&1));
        assert_eq!((s.fallbacks, s.rotation_alarms), (1, 1));
        assert_eq!(s.unmanaged_keys, 1);
        assert!(s.failures(&[]).is_empty());
        assert_eq!(
            s.failures(&[FailOn::DlpBlock, FailOn::UnmanagedKey, FailOn::Error]),
            vec![
                "1 request(s) blocked by the DLP filter".to_string(),
                "1 key(s) presented that kt does not manage".to_string(),
            ]
        );
    }
}
