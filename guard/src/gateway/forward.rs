//! Forwarding: the provider's targets in order, each with its managed key,
//! falling back before the first response byte reached the client; then the
//! chosen response relayed, or kt's own error naming every target tried.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::Inner;
use super::handler::{Exchange, GwBody, set_request_id, strip_hop_by_hop};
use super::health::Transition;
use super::relay::{Amend, Relay};
use super::upstream::{ConnectError, find_connect_error};
use crate::policy::Refusal;
use crate::provider;
use crate::record::{
    Arrival, Attempt, ClientInfo, Outcome, PolicyAction, PolicyId, PolicyNote, codes,
};
use crate::routing::{self, Matched, Route, Verdict};
use crate::secrets::SecretValue;

/// Tries the targets of the matched provider and answers the client.
pub(crate) async fn forward(
    inner: &Inner,
    mut ex: Exchange,
    parts: &http::request::Parts,
    matched: &Matched,
    body: Bytes,
    direct: Option<Route>,
) -> Response<GwBody> {
    // `direct` (observe mode, a provider without a target): the one route
    // to where the client was going, with its own credential.
    let direct: Vec<Route> = direct.into_iter().collect();
    let targets: Vec<&Route> = if direct.is_empty() {
        inner.router.targets_for(&matched.provider).collect()
    } else {
        direct.iter().collect()
    };
    // `pass`: the client's own credential goes to every target of the
    // provider (managed key or not); otherwise each target's managed key.
    let passed = ex.pass.then(|| ex.presented.take()).flatten();
    let all: Vec<(&Route, Option<&SecretValue>)> = if ex.pass {
        targets.iter().map(|r| (*r, passed.as_ref())).collect()
    } else {
        targets
            .iter()
            .filter_map(|r| inner.keys.get(&r.target.id).map(|k| (*r, Some(k))))
            .collect()
    };
    ex.presented = None;
    // Targets in their cool-down are skipped while another one is left.
    let live: Vec<(&Route, Option<&SecretValue>)> = all
        .iter()
        .copied()
        .filter(|(r, _)| !inner.health.cooling(&r.target.id))
        .collect();
    let routes = if live.is_empty() { all } else { live };
    if routes.is_empty() {
        let msg = format!("no usable target for provider {}", matched.provider.name());
        return ex.fail(
            inner,
            &refuse(StatusCode::BAD_GATEWAY, codes::NO_TARGET, msg),
            &[],
        );
    }
    let mut tried: Vec<Attempt> = Vec::new();
    let mut i = 0;
    let mut retried_last = false;
    while i < routes.len() {
        let (route, key) = routes[i];
        let up = match upstream_request(inner, route, key, parts, matched, &body) {
            Ok(mut up) => {
                if ex.pass && !ex.presented_headers.is_empty() {
                    // The client's own credential, as it sent it (an OAuth
                    // token stays `Authorization: Bearer`).
                    for name in provider::CREDENTIAL_HEADERS {
                        up.headers_mut().remove(*name);
                    }
                    for name in inner.router.custom_credential_headers() {
                        up.headers_mut().remove(name.as_str());
                    }
                    for (n, v) in &ex.presented_headers {
                        up.headers_mut().append(n.clone(), v.clone());
                    }
                }
                up
            }
            Err(r) => return ex.fail(inner, &r, &tried),
        };
        // If the client leaves now, its record says how far it got.
        ex.rec.attempts.clone_from(&tried);
        ex.in_flight = Some(route.target.id.clone());
        let sent = std::time::Instant::now();
        let (outcome, response) = attempt(inner, up).await;
        ex.in_flight = None;
        let upstream_time = sent.elapsed();
        if let Some(t) = inner.health.record(&route.target.id, &outcome) {
            health_event(inner, &route.target.id, t, &outcome);
        }
        tried.push(Attempt {
            target: route.target.id.clone(),
            outcome: outcome.clone(),
        });
        match (inner.router.classify(&outcome), response) {
            (Verdict::Deliver, Some(resp)) => {
                ex.rec.chosen = Some(route.target.id.clone());
                ex.rec.upstream_first_byte = Some(upstream_time);
                if matches!(resp.status().as_u16(), 401 | 403) {
                    // The provider's own body can quote the key's last
                    // characters: answer with kt's own, in its shape.
                    ex.rec.attempts.clone_from(&tried);
                    let msg = format!(
                        "kt: the provider rejected the managed key of target {} ({}); run `kt secrets status` to check it. The provider's answer is not passed on because it can name part of the key.",
                        route.target.id,
                        resp.status().as_u16()
                    );
                    let r = refuse(resp.status(), codes::UPSTREAM_AUTH_FAILED, msg);
                    return ex.fail(inner, &r, &tried);
                }
                if !ex.pass {
                    rotation_alarm(&mut ex, &tried, &route.target.id);
                }
                ex.rec.attempts = tried;
                return deliver(inner, ex, parts, route, resp);
            }
            (Verdict::Fallback { retry_after }, _) => {
                tracing::info!(target_id = %route.target.id, outcome = %outcome.label(), "target failed, falling back");
                if i + 1 == routes.len()
                    && !retried_last
                    && let Some(wait) = retry_after
                {
                    // Last target asked to wait a bounded time: honour it once.
                    retried_last = true;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                i += 1;
            }
            _ => break,
        }
    }
    all_failed(inner, ex, matched, tried)
}

/// Seconds since the Unix epoch of the last rotation-alarm warning (the log
/// gets at most one a minute; every event carries the alarm).
static LAST_ALARM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fallback served a request because an earlier target rejected its key
/// (401/403): the rotation is broken while the old key keeps traffic
/// flowing. Make it loud: a note on the event, and a (rate-limited) warning.
fn rotation_alarm(ex: &mut Exchange, tried: &[Attempt], served_by: &str) {
    let Some(rejected) = tried
        .iter()
        .find(|a| matches!(a.outcome.status(), Some(401 | 403)))
    else {
        return;
    };
    if rejected.target == served_by {
        return;
    }
    let status = rejected.outcome.status().unwrap_or(0);
    ex.rec.policy.push(PolicyNote {
        policy: PolicyId::Guard,
        action: PolicyAction::Audit,
        rule: "rotation-alarm".into(),
        location: Some(format!(
            "target {} rejected its key ({status}); served by {served_by}",
            rejected.target
        )),
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_ALARM.load(std::sync::atomic::Ordering::Relaxed);
    if now >= last + 60
        && LAST_ALARM
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(
            rejected = %rejected.target,
            status,
            served_by,
            "rotation alarm: a target's managed key is rejected and a fallback keeps traffic flowing; check it with `kt secrets verify`"
        );
    }
}

/// A target went into or came out of its cool-down: logged and recorded.
pub(super) fn health_event(inner: &Inner, target: &str, t: Transition, outcome: &Outcome) {
    let rule = match t {
        Transition::CooledDown => {
            tracing::warn!(target_id = %target, outcome = %outcome.label(), cooldown = ?inner.config.gateway.cooldown, "target failed repeatedly: skipped for its cool-down");
            "target-cooled-down"
        }
        Transition::Recovered => {
            tracing::info!(target_id = %target, "target answers again");
            "target-recovered"
        }
    };
    let mut rec = inner.guard_record(
        Arrival::Internal,
        None,
        ClientInfo::default(),
        "HEALTH",
        PolicyAction::Audit,
        rule,
    );
    rec.path = target.to_string();
    rec.attempts.push(Attempt {
        target: target.to_string(),
        outcome: outcome.clone(),
    });
    inner.sink.record(rec);
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> Refusal {
    Refusal {
        status,
        code,
        message,
    }
}

/// The request for one target: its URI, the model override, the managed key.
fn upstream_request(
    inner: &Inner,
    route: &Route,
    key: Option<&SecretValue>,
    parts: &http::request::Parts,
    matched: &Matched,
    body: &Bytes,
) -> Result<Request<Full<Bytes>>, Refusal> {
    let uri = inner
        .router
        .upstream_uri(route, &matched.api_path)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.to_string()))?;
    let send_body = match &route.target.model {
        Some(m) => routing::override_model(body, m).map_or_else(|| body.clone(), Bytes::from),
        None => body.clone(),
    };
    let send_len = send_body.len();
    let mut up = Request::new(Full::new(send_body));
    *up.method_mut() = parts.method.clone();
    *up.uri_mut() = uri;
    *up.headers_mut() = parts.headers.clone();
    if send_len > 0 || parts.method == Method::POST || parts.method == Method::PUT {
        up.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(send_len));
    }
    if let Some(key) = key {
        let (name, value) =
            routing::managed_key_header_for(&route.target, &matched.api_path, key.expose())
                .map_err(|e| refuse(StatusCode::BAD_GATEWAY, codes::NO_TARGET, e.to_string()))?;
        up.headers_mut().insert(name, value);
    }
    Ok(up)
}

/// Sends one attempt; the response comes back only when headers arrived.
async fn attempt(inner: &Inner, up: Request<Full<Bytes>>) -> (Outcome, Option<Response<Incoming>>) {
    match tokio::time::timeout(
        inner.config.gateway.first_byte_timeout,
        inner.client.request(up),
    )
    .await
    {
        Err(_) => (Outcome::FirstByteTimeout, None),
        Ok(Err(e)) => (
            match find_connect_error(&e) {
                Some(ConnectError::Tls { .. }) => Outcome::TlsFailed,
                Some(_) => Outcome::ConnectFailed,
                None if e.is_connect() => Outcome::ConnectFailed,
                None => Outcome::UpstreamBroken,
            },
            None,
        ),
        Ok(Ok(resp)) => {
            let outcome = Outcome::Status {
                status: resp.status().as_u16(),
                retry_after: resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(routing::parse_retry_after),
            };
            (outcome, Some(resp))
        }
    }
}

/// Passes the chosen response on; its body is relayed with an idle bound
/// and a cut reported as an amendment of the record.
fn deliver(
    inner: &Inner,
    ex: Exchange,
    parts: &http::request::Parts,
    route: &Route,
    resp: Response<Incoming>,
) -> Response<GwBody> {
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    set_request_id(&mut rp.headers, &ex.rec.request_id);
    let sse = rp
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse {
        // The SSE error event may be appended: the length would lie.
        rp.headers.remove(CONTENT_LENGTH);
    }
    // The server never sends (nor polls) these bodies.
    let bodyless = parts.method == Method::HEAD
        || rp.status.is_informational()
        || rp.status == StatusCode::NO_CONTENT
        || rp.status == StatusCode::NOT_MODIFIED;
    let amend = (!bodyless).then(|| Amend {
        sink: inner.sink.clone(),
        request_id: ex.rec.request_id.clone(),
        time: ex.rec.time,
    });
    ex.finish(inner, rp.status);
    let relay = Relay::new(
        rb,
        sse,
        route.target.id.clone(),
        inner.config.gateway.idle_timeout,
        amend,
    );
    Response::from_parts(rp, BodyExt::boxed(relay))
}

/// Every target failed (or one failed with fallback off): kt's own error.
fn all_failed(
    inner: &Inner,
    mut ex: Exchange,
    matched: &Matched,
    tried: Vec<Attempt>,
) -> Response<GwBody> {
    let all_429 = !tried.is_empty() && tried.iter().all(|t| t.outcome.status() == Some(429));
    let status = if all_429 {
        StatusCode::TOO_MANY_REQUESTS
    } else if tried
        .last()
        .is_some_and(|t| t.outcome == Outcome::FirstByteTimeout)
    {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let summary: Vec<String> = tried
        .iter()
        .map(|t| format!("{} ({})", t.target, t.outcome.label()))
        .collect();
    let msg = format!(
        "every target for {} failed: {}",
        matched.provider.name(),
        summary.join(", ")
    );
    ex.rec.attempts.clone_from(&tried);
    ex.fail(
        inner,
        &refuse(status, codes::ALL_TARGETS_FAILED, msg),
        &tried,
    )
}
