//! The per-request record shared by the gateway (which fills it), the policy
//! chain (which adds typed notes) and the event store (which persists it).
//! It sits below all three so none of them imports another to talk about a
//! request. Values stay typed from the moment they are decided until the
//! event store turns them into its stored shape: nothing is formatted into a
//! string here to be parsed back elsewhere.
//!
//! A record carries a fingerprint of the key the client sent, never a key.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Rules of `guard` notes that readers of the event store look for.
pub mod rules {
    /// A reload kept a target's previous key: its secret could not be
    /// read (the note's location is the target id).
    pub const SECRET_KEPT: &str = "secret-kept";
    /// The central secret store could not be read: last good values served.
    pub const SECRET_STORE_DOWN: &str = "secret-store-down";
    /// Values of the central store passed `max_stale`: no longer served.
    pub const SECRET_STORE_EXPIRED: &str = "secret-store-expired";
    /// The central secret store answers again.
    pub const SECRET_STORE_UP: &str = "secret-store-up";
}

/// kt's own error codes: stable strings clients and tests can match on.
pub mod codes {
    /// Every target failed.
    pub const ALL_TARGETS_FAILED: &str = "kt_all_targets_failed";
    /// No target is configured (or resolvable) for the provider.
    pub const NO_TARGET: &str = "kt_no_target";
    /// Unknown provider path.
    pub const UNKNOWN_PROVIDER: &str = "kt_unknown_provider";
    /// Request body over `gateway.max_body_bytes`.
    pub const BODY_TOO_LARGE: &str = "kt_body_too_large";
    /// The upstream failed after the response started.
    pub const UPSTREAM_STREAM_FAILED: &str = "kt_upstream_stream_failed";
    /// A policy refused the request (no more specific code given).
    pub const POLICY_BLOCKED: &str = "kt_policy_blocked";
    /// The request could not be read or was malformed.
    pub const BAD_REQUEST: &str = "kt_bad_request";
    /// CONNECT to a host that is not a provider.
    pub const NOT_A_PROVIDER: &str = "kt_not_a_provider";
    /// The DLP filter found a secret and blocked the request.
    pub const DLP_BLOCKED: &str = "kt_dlp_blocked";
    /// The request body could not be decoded, so it could not be scanned.
    pub const UNDECODABLE_BODY: &str = "kt_undecodable_body";
    /// The kind of credential the client presented is refused
    /// (`gateway.credentials`).
    pub const CREDENTIAL_REFUSED: &str = "kt_credential_refused";
    /// The client closed the connection before its answer (recorded as
    /// status 499).
    pub const CLIENT_CLOSED: &str = "kt_client_closed";
    /// A reload was refused: the running config stays in place.
    pub const RELOAD_REFUSED: &str = "kt_reload_refused";
    /// The audit log is down and `on_store_failure: refuse` is set.
    pub const AUDIT_UNAVAILABLE: &str = "kt_audit_unavailable";
    /// The provider answered 401/403 to the managed key; its own body (which
    /// can name the key's last characters) is not passed on.
    pub const UPSTREAM_AUTH_FAILED: &str = "kt_upstream_auth_failed";
    /// Request bodies held at once reached `gateway.max_buffered_bytes`.
    pub const OVER_BUDGET: &str = "kt_over_budget";
    /// The request body did not arrive within `gateway.body_timeout`.
    pub const BODY_TIMEOUT: &str = "kt_body_timeout";
    /// The request path tries to leave the API root (`..`, encoded slashes).
    pub const PATH_REFUSED: &str = "kt_path_refused";
    /// A connection kt could not decide on safely was refused (no SNI, an
    /// unparseable or oversized hello, ECH, a non-provider name, a CONNECT
    /// target that is not allowed, a client over budget).
    pub const CONNECTION_REFUSED: &str = "kt_connection_refused";
    /// A request to the explicit listener that a web page could have made
    /// (foreign `Host`, cross-site `Origin`), or from a client not in
    /// `gateway.clients`.
    pub const CLIENT_REFUSED: &str = "kt_client_refused";
    /// Port-wide capture: a non-provider connection kt was to splice to its
    /// original destination could not be connected there.
    pub const SPLICE_FAILED: &str = "kt_splice_failed";
    /// A credential probe found the managed key not working (rejected,
    /// throttled, unreachable, another status, or not set).
    pub const PROBE_FAILED: &str = "kt_probe_failed";
    /// A request for a catalog provider this config has no target for
    /// (captured under `capture.providers: all`): refused, never sent
    /// direct with the client's own key.
    pub const PROVIDER_NOT_ROUTED: &str = "kt_provider_not_routed";
}

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
    /// Its executable path (`/proc/<pid>/exe`).
    pub exe: Option<String>,
    /// Its command line, bounded, credential-looking arguments masked.
    pub cmdline: Option<String>,
    /// Its cgroup-v2 path.
    pub cgroup: Option<String>,
    /// Its container id, when the cgroup path shows one.
    pub container_id: Option<String>,
    /// Container name and image, parent process, network namespace and CI
    /// context, where known.
    pub context: ClientContext,
}

/// More about a client process (captured connections): all optional,
/// left out of JSON when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientContext {
    /// Container name, from the runtime's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Container image, from the runtime's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    /// Parent process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<u32>,
    /// Parent's executable path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_exe: Option<String>,
    /// Network namespace inode, only when it is not kt's own (a container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    /// CI job identifiers from the process environment (a fixed list of
    /// names: `GITHUB_RUN_ID`, `CI_JOB_ID`...; never other variables).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ci: std::collections::BTreeMap<String, String>,
}

impl ClientContext {
    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self == &ClientContext::default()
    }
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

/// How a request reached the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// An explicit client in base-URL mode (`/openai/v1/...`).
    BaseUrl,
    /// Inside a CONNECT tunnel.
    Connect,
    /// A connection redirected by capture.
    Capture,
    /// Not a client's request: kt's own decision (a target's health, a
    /// reload, a probe).
    Internal,
}

impl Arrival {
    /// The stored label: `base_url`, `connect`, `capture` or `kt`.
    pub fn label(self) -> &'static str {
        match self {
            Arrival::BaseUrl => "base_url",
            Arrival::Connect => "connect",
            Arrival::Capture => "capture",
            Arrival::Internal => "kt",
        }
    }
}

/// What happened on one attempt against a target, before any response byte
/// reached the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// TCP connect failed (refused, unreachable, timed out).
    ConnectFailed,
    /// The TLS handshake failed (certificate, protocol).
    TlsFailed,
    /// No response headers within the first-byte timeout.
    FirstByteTimeout,
    /// The connection broke before response headers arrived.
    UpstreamBroken,
    /// Response headers arrived with this status.
    Status {
        /// HTTP status code.
        status: u16,
        /// `Retry-After` as given by the upstream, when present and parseable.
        retry_after: Option<Duration>,
    },
}

impl Outcome {
    /// Short lowercase label for stored events and error bodies.
    pub fn label(&self) -> String {
        match self {
            Outcome::ConnectFailed => "connect_failed".into(),
            Outcome::TlsFailed => "tls_failed".into(),
            Outcome::FirstByteTimeout => "first_byte_timeout".into(),
            Outcome::UpstreamBroken => "upstream_broken".into(),
            Outcome::Status { status, .. } => format!("status_{status}"),
        }
    }

    /// The HTTP status, when response headers arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One attempt against a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Target id.
    pub target: String,
    /// What happened.
    pub outcome: Outcome,
}

/// Which policy wrote a note.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyId {
    /// `dlp-filter`.
    DlpFilter,
    /// `audit-logger`.
    AuditLogger,
    /// kt's own connection rules (capture, CONNECT, explicit clients,
    /// budgets), which no config can turn into a pass-through.
    Guard,
}

impl PolicyId {
    /// The name used in config files and events.
    pub fn name(self) -> &'static str {
        match self {
            PolicyId::DlpFilter => "dlp-filter",
            PolicyId::AuditLogger => "audit-logger",
            PolicyId::Guard => "guard",
        }
    }
}

/// What a policy did about one finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    /// The request was refused.
    Block,
    /// The match was replaced before forwarding.
    Redact,
    /// Forwarded and recorded.
    Audit,
    /// Observe mode: would have been refused; forwarded unchanged.
    WouldBlock,
    /// Observe mode: would have been redacted; forwarded unchanged.
    WouldRedact,
}

impl PolicyAction {
    /// The stored label: `block`, `redact`, `audit`, `would-block` or
    /// `would-redact`.
    pub fn label(self) -> &'static str {
        match self {
            PolicyAction::Block => "block",
            PolicyAction::Redact => "redact",
            PolicyAction::Audit => "audit",
            PolicyAction::WouldBlock => "would-block",
            PolicyAction::WouldRedact => "would-redact",
        }
    }
}

/// One thing a policy decided, for the record (never the matched text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyNote {
    /// Which policy.
    pub policy: PolicyId,
    /// What it did.
    pub action: PolicyAction,
    /// The rule, e.g. `openai-key`, `undecodable-body`.
    pub rule: String,
    /// Where it matched, e.g. `body:$.messages[0].content[10..61]`.
    pub location: Option<String>,
}

/// One request's outcome, recorded when the response headers go out.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Unique id, also sent to the client as `x-kt-request-id`.
    pub request_id: String,
    /// When the request arrived.
    pub time: SystemTime,
    /// The client's socket address.
    pub client_addr: Option<SocketAddr>,
    /// The process behind the connection, when known.
    pub client: ClientInfo,
    /// How the request reached the gateway.
    pub arrival: Arrival,
    /// Provider name, when identified.
    pub provider: Option<String>,
    /// HTTP method.
    pub method: String,
    /// API path (credentials removed from the query).
    pub path: String,
    /// Every target tried, in order, with its outcome.
    pub attempts: Vec<Attempt>,
    /// The target whose response went to the client.
    pub chosen: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// kt's error code (see [`codes`]), when kt answered itself.
    pub error_code: Option<&'static str>,
    /// Time until the response headers went to the client.
    pub latency: Duration,
    /// Of that, the serving upstream's time from request to response
    /// headers (the rest is what kt and any failed attempts added).
    pub upstream_first_byte: Option<Duration>,
    /// Fingerprint of the credential the client sent (never the credential).
    pub client_key_fingerprint: Option<String>,
    /// The provider whose key format that credential has
    /// (`provider::keys::provider_of`); never the credential.
    pub client_key_provider: Option<String>,
    /// What the policy chain decided.
    pub policy: Vec<PolicyNote>,
    /// When set, the event's message instead of the one composed from the
    /// method, path and status (a probe's result and the provider's error
    /// code). Never a secret.
    pub note: Option<String>,
}

impl RequestRecord {
    /// An empty record that allocates nothing (left behind when a record is
    /// moved out of its holder).
    pub fn placeholder() -> RequestRecord {
        RequestRecord::new(
            String::new(),
            Arrival::Internal,
            None,
            ClientInfo::default(),
            String::new(),
        )
    }

    /// A fresh record for a request arriving now.
    pub fn new(
        request_id: String,
        arrival: Arrival,
        client_addr: Option<SocketAddr>,
        client: ClientInfo,
        method: String,
    ) -> RequestRecord {
        RequestRecord {
            request_id,
            time: SystemTime::now(),
            client_addr,
            client,
            arrival,
            provider: None,
            method,
            path: String::new(),
            attempts: Vec::new(),
            chosen: None,
            status: 0,
            error_code: None,
            latency: Duration::ZERO,
            upstream_first_byte: None,
            client_key_fingerprint: None,
            client_key_provider: None,
            policy: Vec::new(),
            note: None,
        }
    }
}

/// Why a relayed response body ended before its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CutReason {
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
pub struct StreamCut {
    /// How it was cut.
    pub reason: CutReason,
    /// Upstream body bytes handed on toward the client before the cut (the
    /// gateway's own SSE error event not counted).
    pub bytes: u64,
}

/// Receives every record. Runs on the request path: must not block for long.
pub trait RecordSink: Send + Sync {
    /// Records one request (when the response headers go out).
    fn record(&self, r: RequestRecord);

    /// The response body of a request recorded earlier was cut (a body that
    /// ends cleanly is not reported). `request_id` and `time` are that
    /// record's. Called at most once per request, from the body's poll or
    /// drop: must not block. Default: ignored.
    fn amend(&self, request_id: &str, time: SystemTime, cut: StreamCut) {
        let _ = (request_id, time, cut);
    }
}

/// Whether the audit log can take records right now (the event writer
/// answers it; the audit-logger policy asks).
pub trait AuditHealth: Send + Sync {
    /// True while records are being stored.
    fn healthy(&self) -> bool;
}

/// Whether every event sink that must not miss events can take them (the
/// sinks answer it; the audit-logger policy asks).
pub trait SinkHealth: Send + Sync {
    /// The name of a sink with `on_failure: refuse` that is down now, if any.
    fn refusing(&self) -> Option<Arc<str>>;
}

/// Drops every record.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopSink;

impl RecordSink for NoopSink {
    fn record(&self, _r: RequestRecord) {}
}

/// Keeps records (and stream cuts) in memory (tests, `kt gateway run`
/// without a store).
#[derive(Debug, Default)]
pub struct MemorySink {
    records: Mutex<Vec<RequestRecord>>,
    cuts: Mutex<Vec<(String, StreamCut)>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// A copy of everything recorded so far, oldest first.
    pub fn snapshot(&self) -> Vec<RequestRecord> {
        self.records.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The stream cuts reported so far, as (request id, cut), oldest first.
    pub fn stream_cuts(&self) -> Vec<(String, StreamCut)> {
        self.cuts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl RecordSink for MemorySink {
    fn record(&self, r: RequestRecord) {
        if let Ok(mut v) = self.records.lock() {
            v.push(r);
        }
    }

    fn amend(&self, request_id: &str, _time: SystemTime, cut: StreamCut) {
        if let Ok(mut v) = self.cuts.lock() {
            v.push((request_id.to_string(), cut));
        }
    }
}

/// Turns a client credential into a short, stable, non-reversible label.
pub type KeyFingerprint = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The unkeyed fingerprint: `sha256:` and the first 12 hex digits (the
/// gateway installs the host-keyed one from the secret store when it has it).
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
            s.record(RequestRecord::new(
                i.to_string(),
                Arrival::BaseUrl,
                None,
                ClientInfo::default(),
                "GET".into(),
            ));
        }
        let ids: Vec<_> = s.snapshot().into_iter().map(|d| d.request_id).collect();
        assert_eq!(ids, vec!["0", "1", "2"]);
    }

    #[test]
    fn outcomes_have_stable_labels() {
        let s = Outcome::Status {
            status: 429,
            retry_after: None,
        };
        assert_eq!(s.label(), "status_429");
        assert_eq!(s.status(), Some(429));
        assert_eq!(Outcome::FirstByteTimeout.label(), "first_byte_timeout");
        assert_eq!(Outcome::TlsFailed.status(), None);
    }

    #[test]
    fn redact_removes_the_presented_key_from_the_command_line() {
        let mut c = ClientInfo {
            cmdline: Some("curl -H x-api-key: abcdefgh12345 https://x".into()),
            ..ClientInfo::default()
        };
        c.redact("abcdefgh12345");
        assert_eq!(
            c.cmdline.as_deref(),
            Some("curl -H x-api-key: [redacted] https://x")
        );
        c.redact("short");
        assert!(c.cmdline.unwrap().contains("[redacted]"));
    }
}
