//! Records the gateway's decisions as events: the audit-logger end of the
//! policy chain. Runs on the request path, so it only converts and queues;
//! the writer thread does the I/O.

use std::collections::HashMap;

use std::time::SystemTime;

use super::{
    Amendment, Client, Decision, Event, EventWriter, FallbackStep, PolicyNote, PresentedKey,
    StreamEnd, StreamOutcome,
};
use crate::gateway::{self, DecisionSink, StreamCut};

/// Longest stream cut reason kept, in bytes (the HTTP library's text is short;
/// this only bounds the unexpected).
const MAX_REASON: usize = 200;

/// A [`DecisionSink`] that queues one [`Event`] per decision.
pub struct EventSink {
    writer: EventWriter,
    /// Fingerprint → name of the stored secrets, to say which one a client
    /// presented.
    known: HashMap<String, String>,
}

impl EventSink {
    /// A sink writing through `writer`; `known` maps fingerprints of stored
    /// secrets to their names.
    pub fn new(writer: EventWriter, known: HashMap<String, String>) -> EventSink {
        EventSink { writer, known }
    }
}

impl DecisionSink for EventSink {
    fn record(&self, d: gateway::Decision) {
        self.writer.record(to_event(&d, &self.known));
    }

    fn amend(&self, request_id: &str, time: SystemTime, outcome: gateway::StreamOutcome) {
        self.writer.amend(Amendment {
            request_id: request_id.to_string(),
            time_ms: event_time_ms(time),
            stream: to_stream_outcome(&outcome),
        });
    }
}

/// An event's `time_ms` for a decision's `time`: the same value for its
/// insert and any later amendment, which finds the event by it.
fn event_time_ms(time: SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Converts a gateway stream cut into the stored outcome.
pub fn to_stream_outcome(o: &gateway::StreamOutcome) -> StreamOutcome {
    let (end, reason) = match &o.cut {
        StreamCut::UpstreamFailed { message } => {
            (StreamEnd::UpstreamFailed, Some(bounded(message)))
        }
        StreamCut::IdleTimeout { idle } => (
            StreamEnd::IdleTimeout,
            Some(format!("no data for {}", humantime::format_duration(*idle))),
        ),
        StreamCut::ClientClosed => (StreamEnd::ClientClosed, None),
    };
    StreamOutcome {
        end,
        reason,
        bytes: o.bytes,
    }
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_REASON {
        return s.to_string();
    }
    let mut end = MAX_REASON;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Converts a gateway decision into an event.
pub fn to_event(d: &gateway::Decision, known: &HashMap<String, String>) -> Event {
    let policy: Vec<PolicyNote> = d.policy.iter().map(|n| parse_note(n)).collect();
    let decision = if policy.iter().any(|p| p.decision == "block") {
        Decision::Block
    } else if policy.iter().any(|p| p.decision == "redact") {
        Decision::Redact
    } else if d.error_code.is_some() || d.status >= 500 {
        Decision::Error
    } else {
        Decision::Allow
    };
    let mut e = Event::new(d.request_id.clone(), decision);
    e.time_ms = event_time_ms(d.time);
    e.provider = d.provider.clone();
    e.target_tried = d.tried.iter().map(|t| t.target.clone()).collect();
    e.target_chosen = d.chosen.clone();
    e.fallback_steps = d
        .tried
        .iter()
        .map(|t| FallbackStep {
            target: t.target.clone(),
            outcome: t.outcome.clone(),
        })
        .collect();
    e.status = Some(d.status);
    e.latency_ms = Some(d.latency.as_millis() as u64);
    e.policy = policy;
    e.client = Client {
        addr: d.client_addr.map(|a| a.to_string()),
        pid: d.client.pid,
        uid: d.client.uid,
        exe: d.client.exe.clone().or_else(|| d.client.comm.clone()),
        cmdline: d.client.cmdline.clone(),
        cgroup: d.client.cgroup.clone(),
        container_id: d.client.container_id.clone(),
    };
    e.key = d.client_key_fingerprint.as_ref().map(|fp| {
        let matches_secret = known.get(fp).cloned();
        PresentedKey {
            fingerprint: fp.clone(),
            managed: matches_secret.is_some(),
            matches_secret,
        }
    });
    e.message = Some(match d.error_code {
        Some(code) => format!(
            "{} {} -> {} ({code}) via {}",
            d.method, d.path, d.status, d.mode
        ),
        None => format!("{} {} via {}", d.method, d.path, d.mode),
    });
    e
}

/// `dlp-filter: block rule=openai-key at=body:$.messages[0].content` →
/// a structured note. Unknown shapes keep the whole text as the decision.
fn parse_note(note: &str) -> PolicyNote {
    let (policy, rest) = note.split_once(':').unwrap_or(("policy", note));
    let mut words = rest.split_whitespace();
    let decision = words.next().unwrap_or("").to_string();
    let mut rule_id = None;
    let mut location = None;
    for w in words {
        if let Some(r) = w.strip_prefix("rule=") {
            rule_id = Some(r.to_string());
        } else if let Some(l) = w.strip_prefix("at=") {
            location = Some(l.to_string());
        }
    }
    PolicyNote {
        policy: policy.trim().to_string(),
        decision,
        rule_id,
        location,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::ClientInfo;
    use crate::routing::Tried;
    use std::time::{Duration, SystemTime};

    fn decision(policy: Vec<String>, status: u16, fp: Option<&str>) -> gateway::Decision {
        gateway::Decision {
            request_id: "req-1".into(),
            time: SystemTime::now(),
            client_addr: Some("127.0.0.1:5000".parse().unwrap()),
            client: ClientInfo {
                pid: Some(42),
                exe: Some("/usr/bin/python3".into()),
                ..ClientInfo::default()
            },
            mode: "capture",
            provider: Some("openai".into()),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            tried: vec![
                Tried {
                    target: "q2".into(),
                    outcome: "503".into(),
                },
                Tried {
                    target: "q1".into(),
                    outcome: "200".into(),
                },
            ],
            chosen: Some("q1".into()),
            status,
            error_code: None,
            latency: Duration::from_millis(12),
            client_key_fingerprint: fp.map(str::to_string),
            policy,
        }
    }

    #[test]
    fn decisions_become_events_naming_the_process_and_the_key() {
        let known = HashMap::from([("fp:aaa".to_string(), "OPENAI_API_KEY_2026Q1".to_string())]);
        let e = to_event(&decision(vec![], 200, Some("fp:aaa")), &known);
        assert_eq!(e.decision, Decision::Allow);
        assert_eq!(e.target_tried, vec!["q2", "q1"]);
        assert_eq!(e.target_chosen.as_deref(), Some("q1"));
        assert_eq!(e.fallback_steps[0].outcome, "503");
        assert_eq!(e.client.pid, Some(42));
        assert_eq!(e.client.exe.as_deref(), Some("/usr/bin/python3"));
        let key = e.key.unwrap();
        assert_eq!(key.matches_secret.as_deref(), Some("OPENAI_API_KEY_2026Q1"));
        assert!(key.managed);

        let unknown = to_event(&decision(vec![], 200, Some("fp:zzz")), &known);
        assert_eq!(unknown.key.unwrap().matches_secret, None);
    }

    #[test]
    fn policy_notes_decide_block_and_redact() {
        let notes =
            vec!["dlp-filter: block rule=aws-access-key at=body:$.messages[0].content".to_string()];
        let e = to_event(&decision(notes, 403, None), &HashMap::new());
        assert_eq!(e.decision, Decision::Block);
        assert_eq!(e.policy[0].policy, "dlp-filter");
        assert_eq!(e.policy[0].rule_id.as_deref(), Some("aws-access-key"));
        assert_eq!(
            e.policy[0].location.as_deref(),
            Some("body:$.messages[0].content")
        );
        let r = to_event(
            &decision(vec!["dlp-filter: redact rule=x".into()], 200, None),
            &HashMap::new(),
        );
        assert_eq!(r.decision, Decision::Redact);
        let err = to_event(&decision(vec![], 502, None), &HashMap::new());
        assert_eq!(err.decision, Decision::Error);
    }
}
