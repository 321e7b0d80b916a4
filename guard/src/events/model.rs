//! The event model: one decision per request.

use serde::{Deserialize, Serialize};

use super::EventError;

/// What the guard did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Forwarded (possibly after fallback), including `audit` policy hits.
    Allow,
    /// Refused by a policy; nothing left the host.
    Block,
    /// Forwarded after a policy replaced matches.
    Redact,
    /// The guard could not complete the request (no target answered, bad request...).
    Error,
}

impl Decision {
    /// Every decision, in display order.
    pub const ALL: [Decision; 4] = [
        Decision::Allow,
        Decision::Block,
        Decision::Redact,
        Decision::Error,
    ];

    /// The lowercase name used in the store, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Block => "block",
            Decision::Redact => "redact",
            Decision::Error => "error",
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Decision {
    type Err = EventError;

    fn from_str(s: &str) -> Result<Decision, EventError> {
        Decision::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| EventError::UnknownDecision(s.to_string()))
    }
}

/// One step of the fallback walk: a target that was tried and what happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackStep {
    /// The target id.
    pub target: String,
    /// What happened (`status 503`, `connect timeout`, `ok`...).
    pub outcome: String,
}

/// One policy's verdict. Never holds matched text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyNote {
    /// The policy name (`dlp-filter`, `audit-logger`).
    pub policy: String,
    /// What it decided (`block`, `redact`, `audit`, `pass`).
    pub decision: String,
    /// The rule that matched, if any.
    pub rule_id: Option<String>,
    /// Where it matched (JSON path or header name, offsets), if any.
    pub location: Option<String>,
}

/// Who sent the request. Address for every client; the process fields are
/// filled when the connection was captured by the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// Peer address (`127.0.0.1:53422`).
    pub addr: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// User id.
    pub uid: Option<u32>,
    /// Executable path.
    pub exe: Option<String>,
    /// Command line (bounded by the capture side).
    pub cmdline: Option<String>,
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// Container id, when the cgroup path shows one.
    pub container_id: Option<String>,
    /// Container name and image, parent process, network namespace, CI
    /// context (each field left out when unknown).
    #[serde(flatten, default)]
    pub context: crate::record::ClientContext,
}

/// The key the client presented (and the guard threw away).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentedKey {
    /// Short fingerprint of the presented value; never the value.
    pub fingerprint: String,
    /// Name of the managed secret the presented key equals, if any: a
    /// stored secret's name, or a target's reference name (`env`/`store`
    /// name, `file` path). An old, rotated key still hard-coded somewhere
    /// shows up here.
    pub matches_secret: Option<String>,
    /// Whether the guard manages this key (as decided by the gateway).
    pub managed: bool,
    /// The provider whose key format the presented key has
    /// (`provider::keys`): its prefix (`gsk_` is Groq's wherever it was
    /// sent), or, for a bare shape (Mistral's 32 characters), the provider
    /// it was sent to. `None`: a format kt does not know. Only the name is
    /// kept, never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// How a relayed response body ended, when it did not end cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEnd {
    /// The upstream connection failed after the response started.
    UpstreamFailed,
    /// The upstream sent nothing for longer than `gateway.idle_timeout`.
    IdleTimeout,
    /// The body was dropped before its end: the client went away (or the
    /// gateway stopped before the stream finished).
    ClientClosed,
}

impl StreamEnd {
    /// The snake_case name used in JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::UpstreamFailed => "upstream_failed",
            StreamEnd::IdleTimeout => "idle_timeout",
            StreamEnd::ClientClosed => "client_closed",
        }
    }
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A response body cut after its headers went out (and the event was
/// written). Recorded by amending the request's event; a body that ended
/// cleanly leaves [`Event::stream`] empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOutcome {
    /// How it ended.
    pub end: StreamEnd,
    /// Why, when known: the HTTP library's error text or the idle gap.
    /// Never a header value or a key.
    pub reason: Option<String>,
    /// Upstream body bytes handed on toward the client before the cut (the
    /// gateway's own SSE error event not counted).
    pub bytes: u64,
}

/// A late change to an already recorded event, found by request id and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Amendment {
    /// The event's request id.
    pub request_id: String,
    /// The event's `time_ms` (indexed, so the lookup stays cheap).
    pub time_ms: i64,
    /// How its response body ended.
    pub stream: StreamOutcome,
}

/// The version of the events' JSON shape: the `schema` field of every
/// event `kt events --output json` prints and every sink writes. Raised
/// when a field is renamed or removed or changes meaning (added fields do
/// not raise it).
pub const SCHEMA_VERSION: u32 = 1;

/// An event as JSON: `{"schema": 1, ...the event's fields}`, the one shape
/// of `kt events --output json` and of every sink.
#[derive(Debug, Serialize)]
pub struct EventJson<'a> {
    schema: u32,
    #[serde(flatten)]
    event: &'a Event,
}

/// One decision event: what happened to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Store row id; 0 before insert. Increases with insertion order.
    pub id: i64,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The gateway's request id.
    pub request_id: String,
    /// What the guard did.
    pub decision: Decision,
    /// The provider the request was for.
    pub provider: Option<String>,
    /// Target ids tried, in order.
    pub target_tried: Vec<String>,
    /// The target that answered.
    pub target_chosen: Option<String>,
    /// The fallback walk, in order.
    pub fallback_steps: Vec<FallbackStep>,
    /// The HTTP status returned to the client.
    pub status: Option<u16>,
    /// Time to the response, in milliseconds.
    pub latency_ms: Option<u64>,
    /// The policy chain's verdicts, in chain order.
    pub policy: Vec<PolicyNote>,
    /// Who sent it.
    pub client: Client,
    /// Which key the client presented.
    pub key: Option<PresentedKey>,
    /// A short human note (error reason). Never a secret.
    pub message: Option<String>,
    /// Set when the response body was cut after the headers went out
    /// (upstream failure, idle timeout, client gone); `None` when it ended
    /// cleanly, when there was no relayed body, or when kt stopped first.
    #[serde(default)]
    pub stream: Option<StreamOutcome>,
    /// The host that made the decision (`{"name", "id"}`), so the events of
    /// many hosts can be merged; absent in events written before kt named
    /// hosts. Added field: the schema version stays 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<super::Host>,
}

impl Event {
    /// This event in its versioned JSON shape (see [`SCHEMA_VERSION`]).
    pub fn json(&self) -> EventJson<'_> {
        EventJson {
            schema: SCHEMA_VERSION,
            event: self,
        }
    }

    /// An event stamped now, with every optional field empty.
    pub fn new(request_id: impl Into<String>, decision: Decision) -> Event {
        Event {
            id: 0,
            time_ms: super::now_ms(),
            request_id: request_id.into(),
            decision,
            provider: None,
            target_tried: Vec::new(),
            target_chosen: None,
            fallback_steps: Vec::new(),
            status: None,
            latency_ms: None,
            policy: Vec::new(),
            client: Client::default(),
            key: None,
            message: None,
            stream: None,
            host: None,
        }
    }

    /// Replaces every occurrence of `secret` in the free-text fields (the
    /// client's command line, the message, the stream cut reason) with
    /// `[redacted]`, for events built outside the gateway (the gateway
    /// already removes the presented key from the command line, see
    /// `gateway::ClientInfo::redact`). A key passed on a command line
    /// (`curl -H "Authorization: Bearer sk-..."`) must not reach the store.
    pub fn redact(&mut self, secret: &crate::secrets::SecretValue) {
        let value = secret.expose();
        // A very short value would blank out ordinary words.
        if value.len() < 8 {
            return;
        }
        let reason = self.stream.as_mut().and_then(|s| s.reason.as_mut());
        for field in [self.client.cmdline.as_mut(), self.message.as_mut(), reason]
            .into_iter()
            .flatten()
        {
            if field.contains(value) {
                *field = field.replace(value, "[redacted]");
            }
        }
    }
}
