//! One HTTP request, as a short sequence of named steps: strip the client's
//! credentials, identify the provider, read the body, run the policy chain,
//! forward (see [`super::forward`]). Every step that refuses answers in the
//! provider's error shape and finishes the record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::Inner;
use super::relay::BoxError;
use crate::config::{CredentialAction, GatewayMode};
use crate::policy::{PolicyRequest, PolicyVerdict, Refusal};
use crate::provider::{self, Provider};
use crate::record::{
    Arrival, Attempt, ClientInfo, PolicyAction, PolicyId, PolicyNote, RequestRecord, codes,
};
use crate::routing::{self, Matched};
use crate::secrets::SecretValue;

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
    pub(crate) fn arrival(&self) -> Arrival {
        match self {
            Mode::BaseUrl => Arrival::BaseUrl,
            Mode::Connect { .. } => Arrival::Connect,
            Mode::Capture { .. } => Arrival::Capture,
        }
    }
}

/// Per-connection facts.
#[derive(Debug)]
pub struct ConnCtx {
    /// How the connection arrived.
    pub mode: Mode,
    /// Client socket address.
    pub peer: Option<SocketAddr>,
    /// Process facts from capture (explicit clients: see `explicit`).
    pub client: ClientInfo,
    /// For explicit clients: the process is looked up at the first request
    /// (a connection that never sends one costs no lookup).
    pub(crate) explicit: Option<ExplicitPeer>,
}

/// The lazily resolved process of an explicit client connection.
#[derive(Debug)]
pub(crate) struct ExplicitPeer {
    /// kt's end of the connection.
    pub(crate) local: SocketAddr,
    resolved: tokio::sync::OnceCell<Option<(ClientInfo, Option<super::limit::UidSlot>)>>,
}

impl ExplicitPeer {
    pub(crate) fn new(local: SocketAddr) -> ExplicitPeer {
        ExplicitPeer {
            local,
            resolved: tokio::sync::OnceCell::new(),
        }
    }
}

/// The process behind a connection: known from capture, or looked up
/// once for an explicit client and counted against its uid. `None` when
/// that uid is over `gateway.max_connections_per_uid` (recorded).
pub(crate) async fn resolve_client(inner: &Arc<Inner>, ctx: &ConnCtx) -> Option<ClientInfo> {
    let (Some(ex), Some(peer)) = (&ctx.explicit, ctx.peer) else {
        return Some(ctx.client.clone());
    };
    let resolved = ex
        .resolved
        .get_or_init(|| async {
            let client = super::serve::explicit_client(peer, ex.local).await;
            let slot = super::serve::admit_uid(inner, Arrival::BaseUrl, peer, &client)?;
            Some((client, slot))
        })
        .await;
    resolved.as_ref().map(|(c, _)| c.clone())
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

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// A JSON response carrying the request id.
pub(crate) fn json_response(
    status: StatusCode,
    body: Vec<u8>,
    request_id: &str,
) -> Response<GwBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    set_request_id(r.headers_mut(), request_id);
    r
}

pub(crate) fn set_request_id(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-kt-request-id", v);
    }
}

/// A request in flight: its record, and the provider once known (which
/// decides the shape of kt's own error bodies).
pub(crate) struct Exchange {
    pub(crate) rec: RequestRecord,
    pub(crate) started: Instant,
    pub(crate) provider: Option<Provider>,
    /// The credential the client sent, held only until the request is
    /// sent (for `pass`); never logged or recorded.
    pub(crate) presented: Option<SecretValue>,
    /// Send the client's own credential instead of the managed key.
    pub(crate) pass: bool,
    /// The client's credential headers as sent (marked sensitive), put
    /// back unchanged when its credential is passed.
    pub(crate) presented_headers: Vec<(HeaderName, HeaderValue)>,
    /// The target a request is in flight to (for the record of a client
    /// that leaves before the answer).
    pub(crate) in_flight: Option<String>,
    /// Where the record goes if the exchange is dropped unfinished.
    sink: Arc<dyn crate::record::RecordSink>,
    /// The record went to the sink.
    done: bool,
}

impl Drop for Exchange {
    /// A client that leaves before its answer (kt waiting on a slow first
    /// byte, a fallback or a Retry-After) drops the request's future: the
    /// request may already have reached the provider with the managed key,
    /// so it is recorded all the same, as 499 `kt_client_closed`.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut rec = std::mem::replace(&mut self.rec, RequestRecord::placeholder());
        rec.status = 499;
        rec.error_code = Some(codes::CLIENT_CLOSED);
        rec.latency = self.started.elapsed();
        rec.policy.push(PolicyNote {
            policy: PolicyId::Guard,
            action: PolicyAction::Audit,
            rule: "client-closed".into(),
            location: self
                .in_flight
                .as_ref()
                .map(|t| format!("while waiting for target {t}")),
        });
        self.sink.record(rec);
    }
}

impl Exchange {
    /// Records the response status and hands the record to the sink.
    pub(crate) fn finish(mut self, inner: &Inner, status: StatusCode) {
        self.rec.status = status.as_u16();
        self.rec.latency = self.started.elapsed();
        self.done = true;
        let rec = std::mem::replace(&mut self.rec, RequestRecord::placeholder());
        inner.sink.record(rec);
    }

    /// Answers with kt's own error, in the provider's shape, and records it.
    pub(crate) fn fail(
        mut self,
        inner: &Inner,
        refusal: &Refusal,
        tried: &[Attempt],
    ) -> Response<GwBody> {
        self.rec.error_code = Some(refusal.code);
        let body = provider::error_body(
            self.provider.as_ref(),
            refusal.status,
            refusal.code,
            &refusal.message,
            tried,
        );
        let id = self.rec.request_id.clone();
        self.finish(inner, refusal.status);
        json_response(refusal.status, body, &id)
    }
}

fn refusal(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

/// Handles one request; never fails (errors become responses).
pub async fn handle(
    inner: Arc<Inner>,
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<GwBody>, std::convert::Infallible> {
    let Some(client) = resolve_client(&inner, &ctx).await else {
        let r = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            codes::OVER_BUDGET,
            "kt: this user has too many connections open to kt (gateway.max_connections_per_uid)",
        );
        let ex = begin(&inner, &ctx, ClientInfo::default(), &req);
        return Ok(ex.fail(&inner, &r, &[]));
    };
    let mut ex = begin(&inner, &ctx, client, &req);
    let (mut parts, body) = req.into_parts();
    if let Err(r) = check_client(&inner, &ctx, &ex.rec.client, &parts) {
        // Strip first anyway, so the record gets the key's fingerprint only.
        let clean = strip_credentials(&inner, &mut ex, &mut parts);
        ex.rec.path = clean;
        ex.rec.policy.push(PolicyNote {
            policy: PolicyId::Guard,
            action: PolicyAction::Block,
            rule: r.1.into(),
            location: None,
        });
        return Ok(ex.fail(&inner, &r.0, &[]));
    }
    let path_and_query = strip_credentials(&inner, &mut ex, &mut parts);
    let Some(matched) = identify(&inner, &ctx, &parts, &path_and_query) else {
        return Ok(unknown_provider(&inner, ex, path_and_query));
    };
    ex.provider = Some(matched.provider.clone());
    ex.rec.provider = Some(matched.provider.name().to_string());
    if ex.rec.client_key_provider.is_none()
        && let Some(k) = &ex.presented
    {
        ex.rec.client_key_provider =
            provider::keys::provider_of(k.expose(), Some(matched.provider.name()))
                .map(String::from);
    }
    ex.rec.path.clone_from(&matched.api_path);
    learn_wildcard_name(&inner, &ctx);
    let mut direct = None;
    if !inner.router.is_routed(&matched.provider) {
        // Observe mode blocks nothing: the job goes on to where it was
        // going, with its own credential, and is recorded.
        match observe_direct(&inner, &mut ex, &ctx, &matched.provider) {
            Some(route) => direct = Some(route),
            None => return Ok(not_routed(&inner, ex, &ctx, &matched.provider)),
        }
    }
    if let Err(r) = decide_credential(&inner, &mut ex, &matched) {
        return Ok(ex.fail(&inner, &r, &[]));
    }
    if routing::escapes_root(&matched.api_path) {
        let r = refusal(
            StatusCode::BAD_REQUEST,
            codes::PATH_REFUSED,
            "kt: the request path leaves the API root (a `..` or `.` segment, or an encoded slash); it is not sent under the managed key",
        );
        return Ok(ex.fail(&inner, &r, &[]));
    }
    // The permit keeps the body counted until the request is done with it.
    let (body, held) = match read_body(&inner, &parts, body).await {
        Ok(b) => b,
        Err(r) => return Ok(ex.fail(&inner, &r, &[])),
    };
    let (body, _held) = match run_policy(&inner, &mut ex, &mut parts, &matched, body, held).await {
        Ok(b) => b,
        Err(r) => return Ok(ex.fail(&inner, &r, &[])),
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(HOST);
    parts.headers.remove(CONTENT_LENGTH);
    Ok(super::forward::forward(&inner, ex, &parts, &matched, body, direct).await)
}

/// Who may spend managed keys: explicit requests must come from this host
/// (a `Host` kt answers to, no cross-site `Origin`: a web page using DNS
/// rebinding looks exactly like that), and every request from a process
/// `gateway.clients` allows, when set.
fn check_client(
    inner: &Inner,
    ctx: &ConnCtx,
    client: &ClientInfo,
    parts: &http::request::Parts,
) -> Result<(), (Refusal, &'static str)> {
    let deny = |rule: &'static str, message: String| {
        Err((
            refusal(StatusCode::FORBIDDEN, codes::CLIENT_REFUSED, message),
            rule,
        ))
    };
    if matches!(ctx.mode, Mode::BaseUrl) {
        // An absolute-form request (`POST http://api.openai.com/...`) is a
        // proxy request: its Host is the provider's.
        let proxied = parts
            .uri
            .host()
            .is_some_and(|h| inner.router.match_host(h, parts.uri.port_u16()).is_some());
        let host = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()));
        let host: Option<String> = host;
        // No Host at all is no browser (they always send one): not
        // rebinding. A provider's own name is not either: a page cannot make
        // a browser send it to this address (`curl --resolve` can).
        let provider_name = |h: &str| {
            let name = h.rsplit_once(':').map_or(h, |(n, _)| n);
            inner.router.match_host(name, None).is_some()
        };
        if !proxied
            && host
                .as_deref()
                .is_some_and(|h| !is_local_name(h, inner) && !provider_name(h))
        {
            return deny(
                "foreign-host",
                format!(
                    "kt: Host {} is not this gateway; requests must name localhost or the listen address (a web page cannot reach kt through DNS rebinding)",
                    host.as_deref().unwrap_or("(none)")
                ),
            );
        }
        let origin = parts.headers.get("origin").and_then(|h| h.to_str().ok());
        if let Some(o) = origin
            && o != "null"
            && !o
                .split_once("://")
                .is_some_and(|(_, rest)| is_local_name(rest.trim_end_matches('/'), inner))
        {
            return deny(
                "cross-site-origin",
                format!("kt: requests from web pages ({o}) may not use the managed keys"),
            );
        }
        let site = parts
            .headers
            .get("sec-fetch-site")
            .and_then(|h| h.to_str().ok());
        if site.is_some_and(|s| {
            s.eq_ignore_ascii_case("cross-site") || s.eq_ignore_ascii_case("same-site")
        }) {
            return deny(
                "cross-site-origin",
                "kt: cross-site browser requests may not use the managed keys".into(),
            );
        }
    }
    if let Some(allow) = &inner.config.gateway.clients
        && !allow.allows(client.uid, client.cgroup.as_deref())
    {
        return deny(
            "client-not-allowed",
            format!(
                "kt: this process (uid {}, cgroup {}) is not in gateway.clients",
                client
                    .uid
                    .map_or_else(|| "unknown".into(), |u| u.to_string()),
                client.cgroup.as_deref().unwrap_or("unknown")
            ),
        );
    }
    Ok(())
}

/// Whether `host[:port]` names this gateway: loopback, `localhost`, or the
/// explicit listen address.
fn is_local_name(host_port: &str, inner: &Inner) -> bool {
    let host = match host_port.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback() || ip == inner.config.gateway.listen.ip())
}

/// Opens the record of a request arriving now.
fn begin(inner: &Inner, ctx: &ConnCtx, client: ClientInfo, req: &Request<Incoming>) -> Exchange {
    Exchange {
        rec: RequestRecord::new(
            inner.next_request_id(),
            ctx.mode.arrival(),
            ctx.peer,
            client,
            req.method().to_string(),
        ),
        started: Instant::now(),
        provider: None,
        presented: None,
        pass: false,
        presented_headers: Vec::new(),
        in_flight: None,
        sink: Arc::clone(&inner.sink),
        done: false,
    }
}

/// Removes every credential the client sent (headers and query keys),
/// before anything can log or forward them; keeps only a fingerprint.
/// Returns the cleaned `path?query`.
fn strip_credentials(inner: &Inner, ex: &mut Exchange, parts: &mut http::request::Parts) -> String {
    for name in provider::CREDENTIAL_HEADERS
        .iter()
        .chain(provider::BILLING_SCOPE_HEADERS)
    {
        for v in parts.headers.get_all(*name) {
            let mut v = v.clone();
            v.set_sensitive(true);
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                ex.presented_headers.push((n, v));
            }
        }
    }
    let mut header_key = routing::strip_credential_headers(&mut parts.headers);
    for name in inner.router.custom_credential_headers() {
        for v in parts.headers.get_all(name.as_str()) {
            let mut v = v.clone();
            if header_key.is_none() {
                header_key = v
                    .to_str()
                    .ok()
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_string);
            }
            v.set_sensitive(true);
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                ex.presented_headers.push((n, v));
            }
        }
        parts.headers.remove(name.as_str());
    }
    let raw_pq = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string());
    let (clean_pq, query_key) = routing::strip_credential_query(&raw_pq);
    if let Some(k) = header_key.or(query_key) {
        ex.rec.client_key_fingerprint = Some((inner.fingerprint)(&k));
        // Its format's provider (a distinctive prefix); refined by the
        // provider called once it is known. Only the name is kept.
        ex.rec.client_key_provider = provider::keys::provider_of(&k, None).map(String::from);
        ex.rec.client.redact(&k);
        ex.presented = Some(SecretValue::new(k));
    }
    clean_pq
}

/// What to do with the credential the client presented, by its kind
/// (`gateway.credentials`; in observe mode always its own). Anything but
/// an API key (or no credential) swapped for the managed key is noted in
/// the record (`credential-<kind>`).
fn decide_credential(inner: &Inner, ex: &mut Exchange, matched: &Matched) -> Result<(), Refusal> {
    let kind = provider::classify_credential(
        ex.presented.as_ref().map(SecretValue::expose),
        &matched.provider,
    );
    let policy = &inner.config.gateway.credentials;
    let observe = inner.config.gateway.mode == GatewayMode::Observe;
    let action = if observe {
        CredentialAction::Pass
    } else {
        match kind {
            provider::CredentialKind::None => policy.none,
            provider::CredentialKind::ApiKey => policy.api_key,
            provider::CredentialKind::OAuth => policy.oauth,
            provider::CredentialKind::OtherProvider(_) => policy.other_provider,
            provider::CredentialKind::Entra => policy.entra,
            provider::CredentialKind::SigV4 => policy.sigv4,
        }
    };
    ex.pass = action == CredentialAction::Pass;
    let ordinary = matches!(
        kind,
        provider::CredentialKind::ApiKey | provider::CredentialKind::None
    ) && action == CredentialAction::Swap;
    if !ordinary || observe {
        let mut location = action.label().to_string();
        if let provider::CredentialKind::OtherProvider(p) = &kind {
            location = format!("{location}: a {} key", p.name());
        }
        if observe {
            location.push_str(" (observe mode)");
        }
        ex.rec.policy.push(PolicyNote {
            policy: PolicyId::Guard,
            action: if action == CredentialAction::Block {
                PolicyAction::Block
            } else {
                PolicyAction::Audit
            },
            rule: format!("credential-{}", kind.label()),
            location: Some(location),
        });
    }
    if action != CredentialAction::Block {
        return Ok(());
    }
    let what = match &kind {
        provider::CredentialKind::None => "a request without a credential".to_string(),
        provider::CredentialKind::ApiKey => "an API key".to_string(),
        provider::CredentialKind::OAuth => {
            "an OAuth/subscription token (it is not swapped for the organisation's API key)"
                .to_string()
        }
        provider::CredentialKind::OtherProvider(p) => {
            let article = if p.name().starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!(
                "{article} {} key sent to {}",
                p.name(),
                matched.provider.name()
            )
        }
        provider::CredentialKind::Entra => {
            "a Microsoft Entra ID token (it is not swapped for the managed key)".to_string()
        }
        provider::CredentialKind::SigV4 => {
            "an AWS SigV4-signed request (a signature made with the job's own IAM credentials cannot be swapped for a managed key; use a Bedrock API key, or set gateway.credentials.sigv4: pass to let signed requests through)".to_string()
        }
    };
    Err(refusal(
        StatusCode::FORBIDDEN,
        codes::CREDENTIAL_REFUSED,
        format!("kt: {what} is refused here (gateway.credentials)"),
    ))
}

/// Which provider the request is for, and its API path.
fn identify(
    inner: &Inner,
    ctx: &ConnCtx,
    parts: &http::request::Parts,
    clean_pq: &str,
) -> Option<Matched> {
    let router = &inner.router;
    match &ctx.mode {
        // An absolute-form target (`POST http://api.openai.com/v1/...`) is a
        // plain-HTTP proxy request: route it by host like a tunnel.
        // HTTP/2 requests always carry an authority, so the path prefix wins.
        Mode::BaseUrl => router.match_path(clean_pq).or_else(|| {
            let h = parts.uri.host()?;
            let provider = router.match_host(h, parts.uri.port_u16())?;
            Some(Matched {
                api_path: router.api_path_for_host(&provider, h, clean_pq),
                provider,
            })
        }),
        Mode::Connect { host, port } | Mode::Capture { host, port } => {
            let host_header = parts
                .headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h).to_string());
            let candidates = [
                Some(host.clone()),
                host_header,
                parts.uri.host().map(String::from),
            ];
            candidates.into_iter().flatten().find_map(|h| {
                router.match_host(&h, Some(*port)).map(|provider| Matched {
                    api_path: router.api_path_for_host(&provider, &h, clean_pq),
                    provider,
                })
            })
        }
    }
}

/// A name a client reached a provider by only through a wildcard host
/// (`res2.openai.azure.com`): remembered for capture, which resolves it
/// from then on (see `capture::hosts::LearnedNames`).
fn learn_wildcard_name(inner: &Inner, ctx: &ConnCtx) {
    let (Mode::Connect { host, .. } | Mode::Capture { host, .. }) = &ctx.mode else {
        return;
    };
    if inner.router.learnable(host) && crate::capture::hosts::LEARNED.learn(host) {
        tracing::info!(%host, "a name under a provider's wildcard host: resolved and captured from now on");
    }
}

/// Observe mode, a provider without a target, reached by name (CONNECT or
/// SNI): the route to where the client was going — the provider's official
/// endpoint when the name is one of its listed hosts, else that name on
/// its port — noted as `provider-not-routed` (audit). `None` outside
/// observe mode or without a name.
fn observe_direct(
    inner: &Inner,
    ex: &mut Exchange,
    ctx: &ConnCtx,
    provider: &Provider,
) -> Option<routing::Route> {
    if inner.config.gateway.mode != GatewayMode::Observe {
        return None;
    }
    let (Mode::Connect { host, port } | Mode::Capture { host, port }) = &ctx.mode else {
        return None;
    };
    let url = routing::direct_url(provider, host, *port)?;
    let endpoint = routing::Endpoint::parse(&url)?;
    ex.rec.policy.push(PolicyNote {
        policy: PolicyId::Guard,
        action: PolicyAction::Audit,
        rule: "provider-not-routed".into(),
        location: Some(format!(
            "{} ({host}): observe mode, sent on as the client sent it",
            provider.name()
        )),
    });
    Some(routing::Route {
        target: crate::config::Target {
            id: format!("{}-direct", provider.name()),
            provider: provider.clone(),
            model: None,
            required: false,
            secret_key_ref: crate::config::SecretKeyRef::Store(String::new()),
            base_url: Some(url),
        },
        endpoint,
    })
}

/// A catalog provider this config routes nowhere (its hosts captured by
/// `capture.providers: all`): refused in that provider's shape and
/// recorded with its name, so the job is found rather than let through
/// with whatever key it carries.
fn not_routed(
    inner: &Inner,
    mut ex: Exchange,
    ctx: &ConnCtx,
    provider: &Provider,
) -> Response<GwBody> {
    let host = match &ctx.mode {
        Mode::Connect { host, .. } | Mode::Capture { host, .. } => host.clone(),
        Mode::BaseUrl => String::new(),
    };
    let location = if host.is_empty() {
        provider.name().to_string()
    } else {
        format!("{} ({host})", provider.name())
    };
    ex.rec.policy.push(PolicyNote {
        policy: PolicyId::Guard,
        action: PolicyAction::Block,
        rule: "provider-not-routed".into(),
        location: Some(location),
    });
    let msg = format!(
        "kt: this config has no target for provider {}; the request is refused, not sent with the key it carried. Add a target for {} (providers.targets) to serve it with a managed key",
        provider.name(),
        provider.name()
    );
    ex.fail(
        inner,
        &refusal(StatusCode::FORBIDDEN, codes::PROVIDER_NOT_ROUTED, msg),
        &[],
    )
}

fn unknown_provider(inner: &Inner, mut ex: Exchange, clean_pq: String) -> Response<GwBody> {
    let msg = format!(
        "no provider for path {}; known prefixes: {}",
        clean_pq.split('?').next().unwrap_or(""),
        inner.router.known_prefixes().join(", ")
    );
    ex.rec.path = clean_pq;
    ex.fail(
        inner,
        &refusal(StatusCode::NOT_FOUND, codes::UNKNOWN_PROVIDER, msg),
        &[],
    )
}

/// Reads the whole body, bounded by `gateway.max_body_bytes` and
/// `gateway.body_timeout` (fallback may resend it; policies see all of it).
/// Its bytes count against `gateway.max_buffered_bytes` until the request
/// is done (the returned permit).
async fn read_body(
    inner: &Inner,
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), Refusal> {
    let limit = inner.config.gateway.max_body_bytes;
    let too_large = || {
        refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::BODY_TOO_LARGE,
            format!("request body over the {limit}-byte limit (gateway.max_body_bytes)"),
        )
    };
    let over_budget = || {
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::OVER_BUDGET,
            "kt: too many request bodies are being held at once (gateway.max_buffered_bytes); retry shortly",
        )
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|d| d > limit) {
        return Err(too_large());
    }
    // The budget counts the buffer's capacity, not only the bytes read: a
    // declared length is reserved (and counted) up front, so the buffer is
    // allocated once at its final size; without one it grows by doubling,
    // at most to the body limit, and every growth is counted before it
    // happens.
    let budget = Arc::clone(&inner.body_budget);
    let first = declared.unwrap_or(0);
    let mut permit = Arc::clone(&budget)
        .try_acquire_many_owned(u32::try_from(first).map_err(|_| too_large())?)
        .map_err(|_| over_budget())?;
    let mut held = first;
    let mut buf: Vec<u8> = Vec::new();
    buf.try_reserve_exact(usize::try_from(first).map_err(|_| too_large())?)
        .map_err(|_| over_budget())?;
    let mut body = body;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                refusal(
                    StatusCode::BAD_REQUEST,
                    codes::BAD_REQUEST,
                    "request body could not be read",
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let need = (buf.len() + data.len()) as u64;
            if need > limit {
                return Err(too_large());
            }
            if need > held {
                let grown = need.max(held.saturating_mul(2)).min(limit);
                let n = u32::try_from(grown - held).map_err(|_| too_large())?;
                let more = Arc::clone(&budget)
                    .try_acquire_many_owned(n)
                    .map_err(|_| over_budget())?;
                permit.merge(more);
                held = grown;
                let extra = usize::try_from(grown).map_err(|_| too_large())? - buf.len();
                buf.try_reserve_exact(extra).map_err(|_| over_budget())?;
            }
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(inner.config.gateway.body_timeout, read).await {
        Ok(Ok(())) => Ok((Bytes::from(buf), permit)),
        Ok(Err(r)) => Err(r),
        Err(_) => Err(refusal(
            StatusCode::REQUEST_TIMEOUT,
            codes::BODY_TIMEOUT,
            format!(
                "kt: the request body did not arrive within {} (gateway.body_timeout)",
                humantime::format_duration(inner.config.gateway.body_timeout)
            ),
        )),
    }
}

/// Bodies from this size on, and every encoded body (it may decode to
/// [`crate::dlp::DecodeLimits::max_decoded_bytes`]), are checked on the
/// blocking pool: the scan runs at about 1 GB/s, so a big body would hold
/// an async worker (and every connection on it) for milliseconds to tens
/// of milliseconds. Smaller ones are checked inline: handing off costs
/// more than scanning them.
const INLINE_CHECK_MAX: usize = 256 * 1024;

/// Runs the policy chain; returns the body to forward (redacted bodies come
/// back decoded, so their `Content-Encoding` goes) and the permit that
/// keeps it counted in `gateway.max_buffered_bytes`.
///
/// What the check allocates (see [`crate::policy::Policy::working_bytes`])
/// is counted too, before it is allocated: when it does not fit the
/// request is refused 503 `kt_over_budget`, never waited for. It is given
/// back when the check ends, except what a rewritten body forwarded
/// instead needs beyond the original.
async fn run_policy(
    inner: &Inner,
    ex: &mut Exchange,
    parts: &mut http::request::Parts,
    matched: &Matched,
    body: Bytes,
    mut held: tokio::sync::OwnedSemaphorePermit,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), Refusal> {
    // As the DLP step reads it (a value that is not text is not undone).
    let encoding = parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let work = inner.policy.working_bytes(body.len(), encoding.as_deref());
    // What the read buffer holds (its capacity, as `read_body` counted it).
    let read = held.num_permits();
    if work > 0 {
        let Some(permit) = u32::try_from(work).ok().and_then(|n| {
            Arc::clone(&inner.body_budget)
                .try_acquire_many_owned(n)
                .ok()
        }) else {
            ex.rec.policy.push(PolicyNote {
                policy: PolicyId::Guard,
                action: PolicyAction::Block,
                rule: "check-budget".into(),
                location: Some(format!("{work} bytes to check the body")),
            });
            let mib = |b: usize| b.div_ceil(1024 * 1024);
            let message = if work.saturating_add(read) > inner.body_budget_size {
                format!(
                    "kt: checking this request body for secrets needs about {} MiB with the body, more than gateway.max_buffered_bytes ({} MiB) holds at all; raise gateway.max_buffered_bytes, or send the body uncompressed",
                    mib(work.saturating_add(read)),
                    mib(inner.body_budget_size)
                )
            } else {
                format!(
                    "kt: no room to check this request body for secrets: it needs about {} MiB while other requests' bodies are held (gateway.max_buffered_bytes counts bodies and their checks); retry shortly, or raise gateway.max_buffered_bytes",
                    mib(work)
                )
            };
            return Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::OVER_BUDGET,
                message,
            ));
        };
        held.merge(permit);
    }
    let (verdict, held) = if encoding.is_some() || body.len() >= INLINE_CHECK_MAX {
        // spawn_blocking rather than block_in_place: the latter panics on a
        // current-thread runtime (embedders' and the tests'), and it would
        // still stall the other tasks queued on this worker. The task owns
        // what the check reads, and the permits: a client that leaves
        // mid-check drops this future, not the scan, which stays counted
        // until it ends. (The scanner's per-thread scratch buffers, at most
        // 8 MiB each, go with a blocking thread when it idles out.)
        let Ok(slot) = Arc::clone(&inner.check_slots).acquire_owned().await else {
            return Err(shutting_down());
        };
        let policy = Arc::clone(&inner.policy);
        let placeholder = Request::new(()).into_parts().0;
        let owned_parts = std::mem::replace(parts, placeholder);
        let provider = matched.provider.clone();
        let api_path = matched.api_path.clone();
        let client = ex.rec.client.clone();
        let mut notes = std::mem::take(&mut ex.rec.policy);
        let checked = body.clone();
        let task = tokio::task::spawn_blocking(move || {
            let verdict = policy.check(
                &PolicyRequest {
                    parts: &owned_parts,
                    provider: &provider,
                    api_path: &api_path,
                    body: &checked,
                    client: &client,
                },
                &mut notes,
            );
            drop(slot);
            (verdict, notes, owned_parts, held)
        });
        match task.await {
            Ok((verdict, notes, owned_parts, held)) => {
                ex.rec.policy = notes;
                *parts = owned_parts;
                (verdict, held)
            }
            // A panic in a check surfaces here as it would inline.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(shutting_down()),
        }
    } else {
        let verdict = inner.policy.check(
            &PolicyRequest {
                parts,
                provider: &matched.provider,
                api_path: &matched.api_path,
                body: &body,
                client: &ex.rec.client,
            },
            &mut ex.rec.policy,
        );
        (verdict, held)
    };
    let unaudited =
        matches!(&verdict, PolicyVerdict::Block(r) if r.code == codes::AUDIT_UNAVAILABLE);
    if inner.config.gateway.mode == GatewayMode::Observe && !unaudited {
        // Record what enforcement would have done; change nothing. (A
        // request that cannot be recorded is still refused: observing is
        // recording.)
        for n in &mut ex.rec.policy {
            if n.policy == PolicyId::DlpFilter {
                n.action = match n.action {
                    PolicyAction::Block => PolicyAction::WouldBlock,
                    PolicyAction::Redact => PolicyAction::WouldRedact,
                    a => a,
                };
            }
        }
        return Ok((body, keep(inner, held, read)?));
    }
    match verdict {
        PolicyVerdict::Allow => Ok((body, keep(inner, held, read)?)),
        PolicyVerdict::Rewrite(b) => {
            parts.headers.remove(http::header::CONTENT_ENCODING);
            // The original goes once this returns; the rewritten body (the
            // decoded size, plus markers) is what stays held, counted at
            // no less than the original was.
            let held = keep(inner, held, b.len().max(read))?;
            Ok((b, held))
        }
        PolicyVerdict::Block(r) => Err(r),
    }
}

fn shutting_down() -> Refusal {
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        codes::POLICY_BLOCKED,
        "kt: the gateway is shutting down; the request body was not checked",
    )
}

/// Trims `held` to `bytes` (the body kept for forwarding), giving the rest
/// back; takes more when it holds less (a rewritten body larger than the
/// check was counted for).
fn keep(
    inner: &Inner,
    mut held: tokio::sync::OwnedSemaphorePermit,
    bytes: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
    let have = held.num_permits();
    if bytes < have {
        drop(held.split(have - bytes));
    } else if bytes > have {
        let more = u32::try_from(bytes - have)
            .ok()
            .and_then(|n| Arc::clone(&inner.body_budget).try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::OVER_BUDGET,
                    "kt: no room to hold the redacted request body (gateway.max_buffered_bytes); retry shortly, or raise gateway.max_buffered_bytes",
                )
            })?;
        held.merge(more);
    }
    Ok(held)
}
