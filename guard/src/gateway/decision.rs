//! Decision records: one per request, handed to a [`DecisionSink`] (the
//! events store implements it). They carry a fingerprint of the key the
//! client sent, never a key.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::routing::Tried;

/// What is known about the process behind a connection (filled by capture;
/// empty for explicit clients).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Process id (thread-group id) that connected.
    pub pid: Option<u32>,
    /// Its user id.
    pub uid: Option<u32>,
    /// Its cgroup id.
    pub cgroup_id: Option<u64>,
    /// Its command name, when known.
    pub comm: Option<String>,
    /// Its executable path (`/proc/<pid>/exe`).
    pub exe: Option<String>,
    /// Its command line, bounded, credential-looking arguments masked.
    pub cmdline: Option<String>,
    /// Its cgroup-v2 path.
    pub cgroup: Option<String>,
    /// Its container id, when the cgroup path shows one.
    pub container_id: Option<String>,
}

impl ClientInfo {
    /// Replaces every occurrence of `key` in the command line with
    /// `[redacted]`. Capture masks key-shaped arguments, but a key of another
    /// shape passed in argv (`curl -H "Authorization: Bearer …"`) would pass
    /// that; the gateway knows the exact key the client presented.
    pub fn redact(&mut self, key: &str) {
        // A very short value would blank out ordinary words.
        if key.len() < 8 {
            return;
        }
        if let Some(line) = self.cmdline.as_mut()
            && line.contains(key)
        {
            *line = line.replace(key, "[redacted]");
        }
    }
}

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Unique id, also sent to the client as `x-kt-request-id`.
    pub request_id: String,
    /// When the request arrived.
    pub time: SystemTime,
    /// The client's socket address.
    pub client_addr: Option<SocketAddr>,
    /// The process behind the connection, when captured.
    pub client: ClientInfo,
    /// How the request reached the gateway: `base_url`, `connect` or `capture`.
    pub mode: &'static str,
    /// Provider name, when identified.
    pub provider: Option<String>,
    /// HTTP method.
    pub method: String,
    /// API path (credentials removed from the query).
    pub path: String,
    /// Every target tried, in order, with its outcome.
    pub tried: Vec<Tried>,
    /// The target whose response went to the client.
    pub chosen: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// Gateway error code, when the gateway answered itself.
    pub error_code: Option<&'static str>,
    /// Time until the response headers went to the client.
    pub latency: Duration,
    /// Fingerprint of the credential the client sent (never the credential).
    pub client_key_fingerprint: Option<String>,
    /// Notes from the policy chain (`dlp-filter: block rule=...`).
    pub policy: Vec<String>,
}

/// How a relayed response body was cut after its headers (and the
/// decision) went out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamCut {
    /// The upstream connection failed mid-body.
    UpstreamFailed {
        /// What broke: the HTTP library's error text (never a header or key).
        message: String,
    },
    /// The upstream sent nothing for longer than `gateway.idle_timeout`.
    IdleTimeout {
        /// The configured gap.
        idle: Duration,
    },
    /// The body was dropped before its end: the client went away, or the
    /// gateway stopped before the stream finished.
    ClientClosed,
}

/// A recorded request's response body that did not end cleanly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOutcome {
    /// How it was cut.
    pub cut: StreamCut,
    /// Upstream body bytes handed on toward the client before the cut (the
    /// gateway's own SSE error event not counted).
    pub bytes: u64,
}

/// Receives every decision. Must not block for long: it runs on the request path.
pub trait DecisionSink: Send + Sync {
    /// Records one decision (when the response headers go out).
    fn record(&self, d: Decision);

    /// The response body of a decision recorded earlier was cut (a body that
    /// ends cleanly is not reported). `request_id` and `time` are that
    /// decision's. Called at most once per request, from the body's poll or
    /// drop: must not block. Default: ignored.
    fn amend(&self, request_id: &str, time: SystemTime, outcome: StreamOutcome) {
        let _ = (request_id, time, outcome);
    }
}

/// Drops every decision.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopSink;

impl DecisionSink for NoopSink {
    fn record(&self, _d: Decision) {}
}

/// Keeps decisions (and stream cuts) in memory (tests, `kt gateway run`
/// without a store).
#[derive(Debug, Default)]
pub struct MemorySink {
    decisions: Mutex<Vec<Decision>>,
    cuts: Mutex<Vec<(String, StreamOutcome)>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// A copy of everything recorded so far, oldest first.
    pub fn snapshot(&self) -> Vec<Decision> {
        self.decisions.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The stream cuts reported so far, as (request id, outcome), oldest first.
    pub fn stream_cuts(&self) -> Vec<(String, StreamOutcome)> {
        self.cuts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl DecisionSink for MemorySink {
    fn record(&self, d: Decision) {
        if let Ok(mut v) = self.decisions.lock() {
            v.push(d);
        }
    }

    fn amend(&self, request_id: &str, _time: SystemTime, outcome: StreamOutcome) {
        if let Ok(mut v) = self.cuts.lock() {
            v.push((request_id.to_string(), outcome));
        }
    }
}

/// Turns a client credential into a short, stable, non-reversible label.
pub type Fingerprinter = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The default fingerprint: `sha256:` and the first 12 hex digits.
pub fn default_fingerprint(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_short_stable_and_hides_the_key() {
        let a = default_fingerprint("sk-proj-SECRETSECRET");
        assert_eq!(a, default_fingerprint("sk-proj-SECRETSECRET"));
        assert_ne!(a, default_fingerprint("sk-proj-OTHER"));
        assert!(a.starts_with("sha256:") && a.len() == 19);
        assert!(!a.contains("SECRET"));
    }

    #[test]
    fn memory_sink_keeps_order() {
        let s = MemorySink::new();
        for i in 0..3 {
            s.record(Decision {
                request_id: i.to_string(),
                time: SystemTime::now(),
                client_addr: None,
                client: ClientInfo::default(),
                mode: "base_url",
                provider: None,
                method: "GET".into(),
                path: "/".into(),
                tried: vec![],
                chosen: None,
                status: 200,
                error_code: None,
                latency: Duration::ZERO,
                client_key_fingerprint: None,
                policy: vec![],
            });
        }
        let ids: Vec<_> = s.snapshot().into_iter().map(|d| d.request_id).collect();
        assert_eq!(ids, vec!["0", "1", "2"]);
    }
}
