//! One HTTP request: identify the provider, strip the client's credentials,
//! run the policy hook, then try the targets in order with the managed key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{
    CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::Inner;
use super::decision::{ClientInfo, Decision};
use super::policy::{BlockCode, PolicyRequest, PolicyVerdict};
use super::relay::{Amend, BoxError, Relay};
use super::upstream::{ConnectError, find_connect_error};
use crate::routing::{self, Outcome, Tried, Verdict, codes};

/// The body type every gateway response has.
pub type GwBody = BoxBody<Bytes, BoxError>;

/// How a connection reached the gateway.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Explicit client in base-URL mode (`/openai/v1/...`).
    BaseUrl,
    /// Inside a CONNECT tunnel to `host:port`.
    Connect {
        /// CONNECT host.
        host: String,
        /// CONNECT port.
        port: u16,
    },
    /// A redirected connection: SNI (or the original address) names the host.
    Capture {
        /// SNI or the original destination address.
        host: String,
        /// Original destination port.
        port: u16,
    },
}

impl Mode {
    fn label(&self) -> &'static str {
        match self {
            Mode::BaseUrl => "base_url",
            Mode::Connect { .. } => "connect",
            Mode::Capture { .. } => "capture",
        }
    }
}

/// Per-connection facts.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    /// How the connection arrived.
    pub mode: Mode,
    /// Client socket address.
    pub peer: Option<SocketAddr>,
    /// Process facts from capture.
    pub client: ClientInfo,
}

/// Hop-by-hop headers never forwarded in either direction.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    // The gateway has the whole body already; upstream never sees the handshake.
    "expect",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

pub(crate) fn full(b: impl Into<Bytes>) -> GwBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, body: Vec<u8>, request_id: &str) -> Response<GwBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("x-kt-request-id", v);
    }
    r
}

struct Record {
    decision: Decision,
    started: Instant,
}

impl Record {
    fn finish(mut self, inner: &Inner, status: StatusCode) {
        self.decision.status = status.as_u16();
        self.decision.latency = self.started.elapsed();
        inner.sink.record(self.decision);
    }
}

/// Handles one request; never fails (errors become responses).
pub async fn handle(
    inner: Arc<Inner>,
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<GwBody>, std::convert::Infallible> {
    let n = inner.counter.fetch_add(1, Ordering::Relaxed);
    let request_id = format!("{}-{n:x}", inner.id_prefix);
    let mut rec = Record {
        decision: Decision {
            request_id: request_id.clone(),
            time: SystemTime::now(),
            client_addr: ctx.peer,
            client: ctx.client.clone(),
            mode: ctx.mode.label(),
            provider: None,
            method: req.method().to_string(),
            path: String::new(),
            tried: Vec::new(),
            chosen: None,
            status: 0,
            error_code: None,
            latency: Duration::ZERO,
            client_key_fingerprint: None,
            policy: Vec::new(),
        },
        started: Instant::now(),
    };
    let (mut parts, body) = req.into_parts();

    // Credentials go first, before anything can log or forward them.
    let header_key = routing::strip_credential_headers(&mut parts.headers);
    let raw_pq = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let (clean_pq, query_key) = routing::strip_credential_query(&raw_pq);
    if let Some(k) = header_key.or(query_key) {
        rec.decision.client_key_fingerprint = Some((inner.fingerprint)(&k));
        rec.decision.client.redact(&k);
    }

    let matched = match &ctx.mode {
        // An absolute-form target (`POST http://api.openai.com/v1/...`) is a
        // plain-HTTP proxy request: route it by host like a tunnel.
        // HTTP/2 requests always carry an authority, so the path prefix wins.
        Mode::BaseUrl => inner.router.match_path(&clean_pq).or_else(|| {
            let h = parts.uri.host()?;
            let provider = inner.router.match_host(h, parts.uri.port_u16())?;
            Some(routing::Matched {
                api_path: inner.router.api_path_for_host(&provider, h, &clean_pq),
                provider,
            })
        }),
        Mode::Connect { host, port } | Mode::Capture { host, port } => {
            let host_header = parts
                .headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h).to_string());
            let candidates = [
                Some(host.clone()),
                host_header,
                parts.uri.host().map(String::from),
            ];
            candidates.into_iter().flatten().find_map(|h| {
                inner
                    .router
                    .match_host(&h, Some(*port))
                    .map(|provider| routing::Matched {
                        api_path: inner.router.api_path_for_host(&provider, &h, &clean_pq),
                        provider,
                    })
            })
        }
    };
    let Some(matched) = matched else {
        let prefixes = inner.router.known_prefixes();
        let msg = format!(
            "no provider for path {}; known prefixes: {}",
            clean_pq.split('?').next().unwrap_or(""),
            prefixes.join(", ")
        );
        rec.decision.path = clean_pq;
        rec.decision.error_code = Some(codes::UNKNOWN_PROVIDER);
        let body = routing::error_body(
            None,
            StatusCode::NOT_FOUND,
            codes::UNKNOWN_PROVIDER,
            &msg,
            &[],
        );
        rec.finish(&inner, StatusCode::NOT_FOUND);
        return Ok(json_response(StatusCode::NOT_FOUND, body, &request_id));
    };
    let provider = matched.provider.clone();
    rec.decision.provider = Some(provider.name().to_string());
    rec.decision.path = matched.api_path.clone();
    let gw_error =
        |rec: Record, status: StatusCode, code: &'static str, msg: &str, tried: &[Tried]| {
            let mut rec = rec;
            rec.decision.error_code = Some(code);
            let body = routing::error_body(Some(&provider), status, code, msg, tried);
            rec.finish(&inner, status);
            Ok(json_response(status, body, &request_id))
        };

    // Body: bounded, read whole (fallback may resend it; policies see it all).
    let limit = inner.config.gateway.max_body_bytes;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || format!("request body over the {limit}-byte limit (gateway.max_body_bytes)");
    if declared.is_some_and(|d| d > limit) {
        return gw_error(
            rec,
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::BODY_TOO_LARGE,
            &too_large(),
            &[],
        );
    }
    let body = match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return gw_error(
                rec,
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::BODY_TOO_LARGE,
                &too_large(),
                &[],
            );
        }
        Err(_) => {
            return gw_error(
                rec,
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST,
                "request body could not be read",
                &[],
            );
        }
    };

    // Policy hook.
    let mut notes = Vec::new();
    let verdict = inner.policy.check(
        &PolicyRequest {
            parts: &parts,
            provider: &provider,
            api_path: &matched.api_path,
            body: &body,
            client: &ctx.client,
        },
        &mut notes,
    );
    rec.decision.policy = notes;
    let body = match verdict {
        PolicyVerdict::Allow => body,
        PolicyVerdict::Rewrite(b) => {
            // Redacted bodies come back decoded.
            parts.headers.remove(http::header::CONTENT_ENCODING);
            b
        }
        PolicyVerdict::Block(resp) => {
            let (mut p, b) = resp.into_parts();
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                p.headers.insert("x-kt-request-id", v);
            }
            let code = p.extensions.get::<BlockCode>().map(|c| c.0);
            rec.decision.error_code = Some(code.unwrap_or(codes::POLICY_BLOCKED));
            rec.finish(&inner, p.status);
            return Ok(Response::from_parts(p, full(b)));
        }
    };

    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.headers.remove(CONTENT_LENGTH);

    let routes: Vec<_> = inner
        .router
        .targets_for(&provider)
        .filter_map(|r| inner.keys.get(&r.target.id).map(|k| (r, k)))
        .collect();
    if routes.is_empty() {
        let msg = format!("no usable target for provider {}", provider.name());
        return gw_error(rec, StatusCode::BAD_GATEWAY, codes::NO_TARGET, &msg, &[]);
    }

    let mut tried: Vec<Tried> = Vec::new();
    let mut last_outcome = None;
    let mut i = 0;
    let mut retried_last = false;
    while i < routes.len() {
        let (route, key) = routes[i];
        let uri = match inner.router.upstream_uri(route, &matched.api_path) {
            Ok(u) => u,
            Err(e) => {
                return gw_error(
                    rec,
                    StatusCode::BAD_REQUEST,
                    codes::BAD_REQUEST,
                    &e.to_string(),
                    &tried,
                );
            }
        };
        let send_body = match &route.target.model {
            Some(m) => routing::override_model(&body, m)
                .map(Bytes::from)
                .unwrap_or_else(|| body.clone()),
            None => body.clone(),
        };
        let mut up = Request::new(Full::new(send_body.clone()));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = parts.headers.clone();
        if !send_body.is_empty() || parts.method == Method::POST || parts.method == Method::PUT {
            up.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(send_body.len()));
        }
        match routing::managed_key_header(&route.target, key.expose()) {
            Ok((name, value)) => {
                up.headers_mut().insert(name, value);
            }
            Err(e) => {
                return gw_error(
                    rec,
                    StatusCode::BAD_GATEWAY,
                    codes::NO_TARGET,
                    &e.to_string(),
                    &tried,
                );
            }
        }
        let outcome = match tokio::time::timeout(
            inner.config.gateway.first_byte_timeout,
            inner.client.request(up),
        )
        .await
        {
            Err(_) => Err(Outcome::FirstByteTimeout),
            Ok(Err(e)) => Err(match find_connect_error(&e) {
                Some(ConnectError::Tls { .. }) => Outcome::TlsFailed,
                Some(_) => Outcome::ConnectFailed,
                None if e.is_connect() => Outcome::ConnectFailed,
                None => Outcome::UpstreamBroken,
            }),
            Ok(Ok(resp)) => Ok(resp),
        };
        let outcome_value = match &outcome {
            Err(o) => o.clone(),
            Ok(resp) => Outcome::Status {
                status: resp.status().as_u16(),
                retry_after: resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(routing::parse_retry_after),
            },
        };
        tried.push(Tried {
            target: route.target.id.clone(),
            outcome: outcome_value.label(),
        });
        match (inner.router.classify(&outcome_value), outcome) {
            (Verdict::Deliver, Ok(resp)) => {
                rec.decision.tried = tried;
                rec.decision.chosen = Some(route.target.id.clone());
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    rp.headers.insert("x-kt-request-id", v);
                }
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
                    request_id: request_id.clone(),
                    time: rec.decision.time,
                });
                rec.finish(&inner, rp.status);
                let relay = Relay::new(
                    rb,
                    sse,
                    route.target.id.clone(),
                    inner.config.gateway.idle_timeout,
                    amend,
                );
                return Ok(Response::from_parts(rp, BodyExt::boxed(relay)));
            }
            (Verdict::Fallback { retry_after }, _) => {
                tracing::info!(target_id = %route.target.id, outcome = %outcome_value.label(), "target failed, falling back");
                last_outcome = Some(outcome_value);
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
            (_, _) => {
                last_outcome = Some(outcome_value);
                break;
            }
        }
    }
    let all_429 = !tried.is_empty() && tried.iter().all(|t| t.outcome == "status_429");
    let status = if all_429 {
        StatusCode::TOO_MANY_REQUESTS
    } else if matches!(last_outcome, Some(Outcome::FirstByteTimeout)) {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let summary: Vec<String> = tried
        .iter()
        .map(|t| format!("{} ({})", t.target, t.outcome))
        .collect();
    let msg = format!(
        "every target for {} failed: {}",
        provider.name(),
        summary.join(", ")
    );
    rec.decision.tried = tried.clone();
    gw_error(rec, status, codes::ALL_TARGETS_FAILED, &msg, &tried)
}
