//! Records the gateway's decisions as events: the audit-logger end of the
//! policy chain. Runs on the request path, so it only converts and queues;
//! the writer thread does the I/O.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use super::{
    Amendment, Client, Decision, Event, EventWriter, FallbackStep, PolicyNote, PresentedKey, Sinks,
    StreamEnd, StreamOutcome,
};
use crate::record::{self, CutReason, PolicyAction, RecordSink, RequestRecord};

/// Longest stream cut reason kept, in bytes (the HTTP library's text is short;
/// this only bounds the unexpected).
const MAX_REASON: usize = 200;

/// A [`RecordSink`] that queues one [`Event`] per request record.
pub struct EventSink {
    writer: EventWriter,
    /// Fingerprint → name of the managed secrets, to say which one a client
    /// presented. Replaced whole when secrets change (a reload, a rotated
    /// store value); requests read a snapshot.
    known: RwLock<Arc<HashMap<String, String>>>,
    /// `policy.audit-logger.sinks`, when any.
    sinks: Option<Sinks>,
    /// This host, stamped on every event.
    host: Option<super::Host>,
}

impl EventSink {
    /// A sink writing through `writer`; `known` maps fingerprints of managed
    /// secrets to their names (see [`crate::secrets::known_keys`]).
    pub fn new(writer: EventWriter, known: HashMap<String, String>) -> EventSink {
        EventSink {
            writer,
            known: RwLock::new(Arc::new(known)),
            sinks: None,
            host: None,
        }
    }

    /// Stamps every event with `host` (see [`super::Host::local`]).
    pub fn with_host(mut self, host: super::Host) -> EventSink {
        self.host = Some(host);
        self
    }

    /// Also hands every event to `sinks` (stream cuts stay in the store).
    pub fn with_sinks(mut self, sinks: Sinks) -> EventSink {
        self.sinks = Some(sinks);
        self
    }

    /// Replaces the fingerprint → name map: records from now on are matched
    /// against `known`.
    pub fn set_known(&self, known: HashMap<String, String>) {
        let known = Arc::new(known);
        match self.known.write() {
            Ok(mut k) => *k = known,
            // A panic elsewhere cannot leave a half-written Arc: take it over.
            Err(poisoned) => *poisoned.into_inner() = known,
        }
    }

    fn known(&self) -> Arc<HashMap<String, String>> {
        match self.known.read() {
            Ok(k) => Arc::clone(&k),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl RecordSink for EventSink {
    fn record(&self, r: RequestRecord) {
        let mut event = to_event(&r, &self.known());
        event.host.clone_from(&self.host);
        if let Some(sinks) = &self.sinks {
            sinks.record(&event);
        }
        self.writer.record(event);
    }

    fn amend(&self, request_id: &str, time: SystemTime, cut: record::StreamCut) {
        self.writer.amend(Amendment {
            request_id: request_id.to_string(),
            time_ms: event_time_ms(time),
            stream: to_stream_outcome(&cut),
        });
    }
}

/// An event's `time_ms` for a decision's `time`: the same value for its
/// insert and any later amendment, which finds the event by it.
fn event_time_ms(time: SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
}

/// Converts a stream cut into the stored outcome.
pub fn to_stream_outcome(o: &record::StreamCut) -> StreamOutcome {
    let (end, reason) = match &o.reason {
        CutReason::UpstreamFailed { message } => {
            (StreamEnd::UpstreamFailed, Some(bounded(message)))
        }
        CutReason::IdleTimeout { idle } => (
            StreamEnd::IdleTimeout,
            Some(format!("no data for {}", humantime::format_duration(*idle))),
        ),
        CutReason::ClientClosed => (StreamEnd::ClientClosed, None),
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

/// Converts a request record into an event.
pub fn to_event(d: &RequestRecord, known: &HashMap<String, String>) -> Event {
    let decision = if d.policy.iter().any(|p| p.action == PolicyAction::Block) {
        Decision::Block
    } else if d.policy.iter().any(|p| p.action == PolicyAction::Redact) {
        Decision::Redact
    } else if d.error_code.is_some() || d.status >= 500 {
        Decision::Error
    } else {
        Decision::Allow
    };
    let mut e = Event::new(d.request_id.clone(), decision);
    e.time_ms = event_time_ms(d.time);
    e.provider.clone_from(&d.provider);
    e.target_tried = d.attempts.iter().map(|t| t.target.clone()).collect();
    e.target_chosen.clone_from(&d.chosen);
    e.fallback_steps = d
        .attempts
        .iter()
        .map(|t| FallbackStep {
            target: t.target.clone(),
            outcome: t.outcome.label(),
        })
        .collect();
    // 0: no HTTP status (a connection refused before any request).
    e.status = (d.status != 0).then_some(d.status);
    e.latency_ms = Some(u64::try_from(d.latency.as_millis()).unwrap_or(u64::MAX));
    e.policy = d
        .policy
        .iter()
        .map(|n| PolicyNote {
            policy: n.policy.name().to_string(),
            decision: n.action.label().to_string(),
            rule_id: Some(n.rule.clone()),
            location: n.location.clone(),
        })
        .collect();
    e.client = Client {
        addr: d.client_addr.map(|a| a.to_string()),
        pid: d.client.pid,
        uid: d.client.uid,
        exe: d.client.exe.clone(),
        cmdline: d.client.cmdline.clone(),
        cgroup: d.client.cgroup.clone(),
        container_id: d.client.container_id.clone(),
        context: d.client.context.clone(),
    };
    e.key = d.client_key_fingerprint.as_ref().map(|fp| {
        let matches_secret = known.get(fp).cloned();
        PresentedKey {
            fingerprint: fp.clone(),
            managed: matches_secret.is_some(),
            matches_secret,
            provider: d.client_key_provider.clone(),
        }
    });
    e.message = Some(match (&d.note, d.error_code, d.status) {
        (Some(note), _, _) => note.clone(),
        // Refused before any HTTP exchange: there is no status to show.
        (None, Some(code), 0) => format!(
            "{} {} refused ({code}) via {}",
            d.method,
            d.path,
            d.arrival.label()
        ),
        (None, Some(code), status) => format!(
            "{} {} -> {status} ({code}) via {}",
            d.method,
            d.path,
            d.arrival.label()
        ),
        (None, None, _) => format!("{} {} via {}", d.method, d.path, d.arrival.label()),
    });
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Arrival, Attempt, ClientInfo, Outcome, PolicyId};
    use std::time::Duration;

    fn record(policy: Vec<record::PolicyNote>, status: u16, fp: Option<&str>) -> RequestRecord {
        let mut r = RequestRecord::new(
            "req-1".into(),
            Arrival::Capture,
            Some("127.0.0.1:5000".parse().unwrap()),
            ClientInfo {
                pid: Some(42),
                exe: Some("/usr/bin/python3".into()),
                ..ClientInfo::default()
            },
            "POST".into(),
        );
        r.provider = Some("openai".into());
        r.path = "/v1/chat/completions".into();
        r.attempts = vec![
            Attempt {
                target: "q2".into(),
                outcome: Outcome::Status {
                    status: 503,
                    retry_after: None,
                },
            },
            Attempt {
                target: "q1".into(),
                outcome: Outcome::Status {
                    status: 200,
                    retry_after: None,
                },
            },
        ];
        r.chosen = Some("q1".into());
        r.status = status;
        r.latency = Duration::from_millis(12);
        r.client_key_fingerprint = fp.map(str::to_string);
        r.policy = policy;
        r
    }

    fn note(action: PolicyAction, rule: &str, at: Option<&str>) -> record::PolicyNote {
        record::PolicyNote {
            policy: PolicyId::DlpFilter,
            action,
            rule: rule.into(),
            location: at.map(String::from),
        }
    }

    #[test]
    fn records_become_events_naming_the_process_and_the_key() {
        let known = HashMap::from([("fp:aaa".to_string(), "OPENAI_API_KEY_2026Q1".to_string())]);
        let e = to_event(&record(vec![], 200, Some("fp:aaa")), &known);
        assert_eq!(e.decision, Decision::Allow);
        assert_eq!(e.target_tried, vec!["q2", "q1"]);
        assert_eq!(e.target_chosen.as_deref(), Some("q1"));
        assert_eq!(e.fallback_steps[0].outcome, "status_503");
        assert_eq!(e.client.pid, Some(42));
        assert_eq!(e.client.exe.as_deref(), Some("/usr/bin/python3"));
        let key = e.key.unwrap();
        assert_eq!(key.matches_secret.as_deref(), Some("OPENAI_API_KEY_2026Q1"));
        assert!(key.managed);

        let unknown = to_event(&record(vec![], 200, Some("fp:zzz")), &known);
        assert_eq!(unknown.key.unwrap().matches_secret, None);
    }

    #[test]
    fn policy_notes_decide_block_and_redact() {
        let notes = vec![note(
            PolicyAction::Block,
            "aws-access-key",
            Some("body:$.messages[0].content"),
        )];
        let e = to_event(&record(notes, 403, None), &HashMap::new());
        assert_eq!(e.decision, Decision::Block);
        assert_eq!(e.policy[0].policy, "dlp-filter");
        assert_eq!(e.policy[0].decision, "block");
        assert_eq!(e.policy[0].rule_id.as_deref(), Some("aws-access-key"));
        assert_eq!(
            e.policy[0].location.as_deref(),
            Some("body:$.messages[0].content")
        );
        let r = to_event(
            &record(vec![note(PolicyAction::Redact, "x", None)], 200, None),
            &HashMap::new(),
        );
        assert_eq!(r.decision, Decision::Redact);
        let a = to_event(
            &record(vec![note(PolicyAction::Audit, "x", None)], 200, None),
            &HashMap::new(),
        );
        assert_eq!(a.decision, Decision::Allow);
        let err = to_event(&record(vec![], 502, None), &HashMap::new());
        assert_eq!(err.decision, Decision::Error);
    }
}
