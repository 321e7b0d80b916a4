//! Credential health probes: per target, one unbilled request with its
//! managed key (the provider's [`crate::provider::Probe`]), sent through the
//! same upstream client as traffic (same roots, connector and timeouts), so
//! "ok" means the gateway's own requests would get through.
//!
//! A result carries the status, the latency and the provider's error
//! code or type, never the key nor the body: providers quote the key's last
//! characters in their messages.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use serde::Serialize;

use super::upstream::{ConnectError, UpstreamConnector, find_connect_error};
use crate::config::{Config, Target};
use crate::record::{
    Arrival, ClientInfo, PolicyAction, PolicyId, PolicyNote, RequestRecord, codes,
};
use crate::routing::{self, Route, Router};
use crate::secrets::{Resolve, SecretValue, resolve_target};

/// Most of an error body read to find the provider's error code.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeResult {
    /// 2xx: the key works.
    Ok,
    /// 401/403: the key is revoked, wrong, or lacks the permission.
    Rejected,
    /// 429: the key is known but throttled (or out of quota).
    RateLimited,
    /// No answer: connect, TLS or a timeout.
    Unreachable,
    /// Another status, or the connection broke mid-answer.
    Error,
    /// The target's secret does not resolve, so nothing was sent.
    Missing,
    /// The provider has no unbilled probe, so nothing was sent.
    NotProbed,
}

impl ProbeResult {
    /// The label used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            ProbeResult::Ok => "ok",
            ProbeResult::Rejected => "rejected",
            ProbeResult::RateLimited => "rate_limited",
            ProbeResult::Unreachable => "unreachable",
            ProbeResult::Error => "error",
            ProbeResult::Missing => "missing",
            ProbeResult::NotProbed => "not_probed",
        }
    }
}

/// The probe of one target. Never holds the key or a response body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    /// The target's `id`.
    pub target: String,
    /// The provider's name.
    pub provider: String,
    /// The secret reference, e.g. `store:OPENAI_API_KEY_2026Q2`.
    pub reference: String,
    /// The target's `required` flag.
    pub required: bool,
    /// What the probe found.
    pub result: ProbeResult,
    /// The HTTP status, when one came back.
    pub status: Option<u16>,
    /// Time from sending to the response head (or to the failure).
    pub latency_ms: Option<u64>,
    /// The provider's error code or type from its body (`invalid_api_key`,
    /// `authentication_error`, `UNAUTHENTICATED`), when it gave one.
    pub provider_code: Option<String>,
    /// Why it is not ok, in words (never the key).
    pub detail: Option<String>,
}

impl ProbeReport {
    /// Whether this target passes: ok, or not probed (kt cannot tell).
    pub fn passes(&self) -> bool {
        matches!(self.result, ProbeResult::Ok | ProbeResult::NotProbed)
    }
}

/// True when every required target passed its probe.
pub fn all_required_pass(reports: &[ProbeReport]) -> bool {
    reports.iter().all(|r| !r.required || r.passes())
}

/// Runs probes through an upstream client.
#[derive(Clone)]
pub struct Prober {
    router: Router,
    client: Client<UpstreamConnector, Full<Bytes>>,
    first_byte_timeout: Duration,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober").finish_non_exhaustive()
    }
}

impl Prober {
    pub(super) fn new(
        router: Router,
        client: Client<UpstreamConnector, Full<Bytes>>,
        config: &Config,
    ) -> Prober {
        Prober {
            router,
            client,
            first_byte_timeout: config.gateway.first_byte_timeout,
        }
    }

    /// Probes every target `select` picks, resolving its key with
    /// `resolver`; all at once, results in config order.
    pub async fn probe_targets(
        &self,
        resolver: &dyn Resolve,
        select: &dyn Fn(&Target) -> bool,
    ) -> Vec<ProbeReport> {
        let mut set = tokio::task::JoinSet::new();
        let mut reports: Vec<Option<ProbeReport>> = Vec::new();
        for route in self.router.routes() {
            if !select(&route.target) {
                continue;
            }
            let i = reports.len();
            match resolve_target(&route.target, resolver) {
                Ok(resolved) => {
                    reports.push(None);
                    let this = self.clone();
                    let route = route.clone();
                    set.spawn(async move { (i, this.probe(&route, &resolved.value).await) });
                }
                Err(problem) => {
                    let mut r = blank(&route.target, ProbeResult::Missing);
                    r.detail = Some(problem.to_string());
                    reports.push(Some(r));
                }
            }
        }
        while let Some(done) = set.join_next().await {
            if let Ok((i, r)) = done {
                reports[i] = Some(r);
            }
        }
        reports.into_iter().flatten().collect()
    }

    /// Probes one target with `key`.
    pub async fn probe(&self, route: &Route, key: &SecretValue) -> ProbeReport {
        let target = &route.target;
        let Some(probe) = target.provider.probe() else {
            let mut r = blank(target, ProbeResult::NotProbed);
            r.detail = Some(format!(
                "no unbilled probe is known for provider {}",
                target.provider
            ));
            return r;
        };
        let mut report = blank(target, ProbeResult::Error);
        let request = match self.request(route, probe, key) {
            Ok(req) => req,
            Err(e) => {
                report.detail = Some(e);
                return report;
            }
        };
        let started = Instant::now();
        let sent =
            tokio::time::timeout(self.first_byte_timeout, self.client.request(request)).await;
        report.latency_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        let response = match sent {
            Err(_) => {
                report.result = ProbeResult::Unreachable;
                report.detail = Some(format!(
                    "no answer within {}",
                    humantime::format_duration(self.first_byte_timeout)
                ));
                return report;
            }
            Ok(Err(e)) => {
                let (result, detail) = match find_connect_error(&e) {
                    Some(c) => (ProbeResult::Unreachable, connect_detail(c)),
                    None if e.is_connect() => (ProbeResult::Unreachable, "connect failed".into()),
                    None => (
                        ProbeResult::Error,
                        "the connection broke before an answer".into(),
                    ),
                };
                report.result = result;
                report.detail = Some(detail);
                return report;
            }
            Ok(Ok(resp)) => resp,
        };
        let status = response.status().as_u16();
        report.status = Some(status);
        report.result = match status {
            200..=299 => ProbeResult::Ok,
            401 | 403 => ProbeResult::Rejected,
            429 => ProbeResult::RateLimited,
            _ => ProbeResult::Error,
        };
        if report.result == ProbeResult::Ok {
            return report;
        }
        // Bounded in size and time; only a code is kept from it.
        let body = tokio::time::timeout(
            self.first_byte_timeout,
            Limited::new(response.into_body(), MAX_ERROR_BODY).collect(),
        )
        .await;
        if let Ok(Ok(collected)) = body {
            report.provider_code = provider_code(&collected.to_bytes(), key.expose());
        }
        report.detail = Some(match report.result {
            ProbeResult::Rejected => format!(
                "the provider rejected the key ({status}): revoked, wrong, or without permission"
            ),
            ProbeResult::RateLimited => "the provider is throttling this key (429)".into(),
            _ => format!("the provider answered {status}"),
        });
        report
    }

    fn request(
        &self,
        route: &Route,
        probe: crate::provider::Probe,
        key: &SecretValue,
    ) -> Result<Request<Full<Bytes>>, String> {
        let uri = self
            .router
            .upstream_uri(route, probe.path)
            .map_err(|e| e.to_string())?;
        let method = Method::from_bytes(probe.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let (name, value) =
            routing::managed_key_header(&route.target, key.expose()).map_err(|e| e.to_string())?;
        let headers = req.headers_mut();
        for (n, v) in probe.headers {
            headers.insert(
                http::HeaderName::from_static(n),
                http::HeaderValue::from_static(v),
            );
        }
        headers.insert(name, value);
        Ok(req)
    }
}

/// The path of a probe's record (and event).
pub const PROBE_PATH: &str = "probe";

/// The rule of the guard note on a probe's record: `probe-` and the
/// result's label (`probe-ok`, `probe-rejected`, `probe-rate_limited`,
/// `probe-unreachable`, `probe-error`, `probe-missing`, `probe-not_probed`).
pub const PROBE_RULE_PREFIX: &str = "probe-";

/// The record of one probe, in the shape every probe is stored in (`kt
/// secrets verify`, `kt gateway check --probe`, the running gateway's
/// periodic probes), so `kt secrets status` finds the last one: path
/// [`PROBE_PATH`], method `PROBE`, `chosen` the target id, one `guard` note
/// whose rule is [`PROBE_RULE_PREFIX`] and the result, the status and
/// latency, and a message with the result, the provider's error code and
/// why. A probe that does not pass carries [`codes::PROBE_FAILED`], so its
/// event's decision is `error`. Never the key: a report holds none.
///
/// [`codes::PROBE_FAILED`]: crate::record::codes::PROBE_FAILED
pub fn probe_record(report: &ProbeReport) -> RequestRecord {
    let mut rec = RequestRecord::new(
        format!("probe-{:x}-{}", crate::events::now_ms(), report.target),
        Arrival::Internal,
        None,
        ClientInfo::default(),
        "PROBE".into(),
    );
    rec.provider = Some(report.provider.clone());
    rec.path = PROBE_PATH.into();
    rec.chosen = Some(report.target.clone());
    rec.status = report.status.unwrap_or(0);
    rec.latency = Duration::from_millis(report.latency_ms.unwrap_or(0));
    if !report.passes() {
        rec.error_code = Some(codes::PROBE_FAILED);
    }
    rec.policy.push(PolicyNote {
        policy: PolicyId::Guard,
        action: PolicyAction::Audit,
        rule: format!("{PROBE_RULE_PREFIX}{}", report.result.label()),
        location: None,
    });
    let mut note = format!(
        "probe of target {}: {}",
        report.target,
        report.result.label()
    );
    if let Some(status) = report.status {
        note.push_str(&format!(" ({status})"));
    }
    if let Some(code) = &report.provider_code {
        note.push_str(&format!(", provider code {code}"));
    }
    if let Some(detail) = &report.detail {
        note.push_str(&format!("; {detail}"));
    }
    rec.note = Some(note);
    rec
}

fn blank(target: &Target, result: ProbeResult) -> ProbeReport {
    ProbeReport {
        target: target.id.clone(),
        provider: target.provider.name().to_string(),
        reference: target.secret_key_ref.to_string(),
        required: target.required,
        result,
        status: None,
        latency_ms: None,
        provider_code: None,
        detail: None,
    }
}

fn connect_detail(e: &ConnectError) -> String {
    match e {
        ConnectError::Timeout(host) => format!("connect to {host}: timed out"),
        other => {
            // The whole chain: rustls says why a certificate was refused.
            let mut s = other.to_string();
            let mut cur = std::error::Error::source(other);
            while let Some(c) = cur {
                let part = c.to_string();
                if !s.contains(&part) {
                    s.push_str(": ");
                    s.push_str(&part);
                }
                cur = c.source();
            }
            s
        }
    }
}

/// The provider's error code from a JSON error body: `error.code` (OpenAI),
/// `error.type` (OpenAI, Anthropic), `error.status` (Google). Only short
/// identifier-like strings are kept, and never one containing the key, so
/// no message text (which can quote the key) gets through.
fn provider_code(body: &[u8], key: &str) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let err = doc.get("error")?;
    ["code", "type", "status"]
        .iter()
        .filter_map(|f| err.get(f).and_then(serde_json::Value::as_str))
        .find(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
                && (key.is_empty() || !c.contains(key))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_code_is_kept_and_its_message_is_not() {
        let openai = br#"{"error":{"message":"Incorrect API key provided: sk-abc...wxyz","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        assert_eq!(
            provider_code(openai, "sk-abc-wxyz").as_deref(),
            Some("invalid_api_key")
        );
        let anthropic = br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
        assert_eq!(
            provider_code(anthropic, "k").as_deref(),
            Some("authentication_error")
        );
        let google =
            br#"{"error":{"code":400,"message":"API key not valid","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(
            provider_code(google, "k").as_deref(),
            Some("INVALID_ARGUMENT")
        );
        // A "code" that is prose, or that carries the key, is dropped.
        let odd = br#"{"error":{"code":"your key sk-live-1 is bad","type":"sk-live-1"}}"#;
        assert_eq!(provider_code(odd, "sk-live-1"), None);
        assert_eq!(provider_code(b"<html>401</html>", "k"), None);
    }

    #[test]
    fn a_probe_record_names_the_target_result_and_code_never_the_key() {
        let report = ProbeReport {
            target: "primary".into(),
            provider: "openai".into(),
            reference: "store:Q2".into(),
            required: true,
            result: ProbeResult::Rejected,
            status: Some(401),
            latency_ms: Some(42),
            provider_code: Some("invalid_api_key".into()),
            detail: Some("the provider rejected the key (401)".into()),
        };
        let e = crate::events::to_event(&probe_record(&report), &Default::default());
        assert_eq!(e.target_chosen.as_deref(), Some("primary"));
        assert_eq!(e.provider.as_deref(), Some("openai"));
        assert_eq!(e.status, Some(401));
        assert_eq!(e.latency_ms, Some(42));
        assert_eq!(e.decision, crate::events::Decision::Error);
        assert_eq!(e.policy.len(), 1);
        assert_eq!(e.policy[0].policy, "guard");
        assert_eq!(e.policy[0].rule_id.as_deref(), Some("probe-rejected"));
        assert_eq!(
            e.message.as_deref(),
            Some(
                "probe of target primary: rejected (401), provider code invalid_api_key; \
                 the provider rejected the key (401)"
            )
        );
        assert!(e.key.is_none());

        let ok = ProbeReport {
            result: ProbeResult::Ok,
            status: Some(200),
            provider_code: None,
            detail: None,
            ..report
        };
        let e = crate::events::to_event(&probe_record(&ok), &Default::default());
        assert_eq!(e.decision, crate::events::Decision::Allow);
        assert_eq!(e.policy[0].rule_id.as_deref(), Some("probe-ok"));
        assert_eq!(
            e.message.as_deref(),
            Some("probe of target primary: ok (200)")
        );
    }

    #[test]
    fn missing_and_not_probed_targets_are_judged_by_required() {
        let t = |required, result| ProbeReport {
            required,
            ..blank(
                &Target {
                    id: "a".into(),
                    provider: crate::config::Provider::OpenAi,
                    model: None,
                    required,
                    secret_key_ref: crate::config::SecretKeyRef::Store("A".into()),
                    base_url: None,
                },
                result,
            )
        };
        assert!(all_required_pass(&[
            t(true, ProbeResult::Ok),
            t(true, ProbeResult::NotProbed),
            t(false, ProbeResult::Rejected),
        ]));
        assert!(!all_required_pass(&[t(true, ProbeResult::Missing)]));
        assert!(!all_required_pass(&[t(true, ProbeResult::Unreachable)]));
    }
}
