//! The gateway: a TLS-terminating HTTP proxy that throws away the key a
//! client sent, puts the managed key in, and tries the provider's targets in
//! order. Async (tokio + hyper); the routing rules themselves are in
//! [`crate::routing`], the policy chain in [`crate::policy`].
//!
//! Entry points: [`GatewayBuilder`] → [`Gateway`]; then
//! [`Gateway::serve_explicit`] (base-URL and CONNECT clients),
//! [`Gateway::serve_capture_listener`] (redirected connections), and
//! [`Gateway::shutdown`].
//!
//! Inside: `serve` (accept loops, the connection budget of `limit`, one
//! task per connection), `tls` (hello peek, certificate cache, the accept
//! path), `connect` (CONNECT tunnels), `handler` (one request as named
//! steps), `forward` (targets and fallback), `relay` (response bodies),
//! `upstream` (connections to providers).
#![forbid(unsafe_code)]

pub(crate) mod connect;
mod egress;
mod exposition;
mod forward;
mod generation;
mod handler;
mod health;
mod limit;
mod monitor;
mod probe;
mod proxy;
mod proxy_head;
pub(crate) mod relay;
mod serve;
pub(crate) mod tls;
mod upstream;
mod upstream_proxy;

pub use egress::{EGRESS_AUDIT_RULE, EGRESS_REFUSED_RULE};
pub use generation::{ReloadDiff, Staged};
pub use handler::{GwBody, Mode};
pub use probe::{
    PROBE_PATH, PROBE_RULE_PREFIX, ProbeReport, ProbeResult, Prober, all_required_pass,
    probe_record,
};
pub use relay::sse_error_event;
pub use serve::{CaptureLookup, Captured};
pub use upstream::{ConnectError, client_tls_config, connect_tcp};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::Ca;
use crate::capture::{NoExemption, SocketExemption};
use crate::config::Config;
use crate::policy::{AllowAll, Policy};
use crate::record::{KeyFingerprint, NoopSink, RecordSink, default_fingerprint};
use crate::routing::{Router, RoutingError};
use crate::secrets::{Resolve, SecretValue, resolve_target};

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Gateway errors.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The config's targets cannot be routed.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// Required targets whose managed key is missing.
    #[error("{}", .0.join("; "))]
    MissingSecrets(Vec<String>),
    /// Upstream TLS setup failed.
    #[error("upstream tls setup")]
    Tls(#[source] rustls::Error),
    /// The extra root bundle does not parse.
    #[error("extra root bundle")]
    Roots(#[source] rustls_pki_types::pem::Error),
    /// The extra root bundle has no certificate.
    #[error("extra root bundle: no certificate in it")]
    NoRoots,
    /// The local CA failed.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// A listener could not be bound or accepted on.
    #[error("listener {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Configures and builds a [`Gateway`].
pub struct GatewayBuilder {
    config: Arc<Config>,
    resolver: Arc<dyn Resolve>,
    ca: Arc<Ca>,
    extra_roots: Vec<CertificateDer<'static>>,
    system_roots: bool,
    exemption: Arc<dyn SocketExemption>,
    policy: Arc<dyn Policy>,
    sink: Arc<dyn RecordSink>,
    fingerprint: KeyFingerprint,
    shutdown_grace: Duration,
}

impl GatewayBuilder {
    /// Starts a builder over a loaded config, a secret resolver and the CA.
    pub fn new(config: Arc<Config>, resolver: Arc<dyn Resolve>, ca: Arc<Ca>) -> GatewayBuilder {
        GatewayBuilder {
            config,
            resolver,
            ca,
            extra_roots: Vec::new(),
            system_roots: true,
            exemption: Arc::new(NoExemption),
            policy: Arc::new(AllowAll),
            sink: Arc::new(NoopSink),
            fingerprint: Arc::new(default_fingerprint),
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// Adds upstream roots from a PEM bundle (on top of system roots and `SSL_CERT_FILE`).
    pub fn extra_roots_pem(mut self, pem: &[u8]) -> Result<GatewayBuilder, GatewayError> {
        use rustls_pki_types::pem::PemObject;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(GatewayError::Roots)?;
        if certs.is_empty() {
            return Err(GatewayError::NoRoots);
        }
        self.extra_roots.extend(certs);
        Ok(self)
    }

    /// Adds one upstream root.
    pub fn extra_root(mut self, der: CertificateDer<'static>) -> GatewayBuilder {
        self.extra_roots.push(der);
        self
    }

    /// Whether system roots (and `SSL_CERT_FILE`) are trusted upstream (default true).
    pub fn system_roots(mut self, on: bool) -> GatewayBuilder {
        self.system_roots = on;
        self
    }

    /// Exempts every upstream socket from capture before it connects, so
    /// the hooks let the gateway's own traffic through (default: none, for
    /// a gateway without capture).
    pub fn socket_exemption(mut self, exemption: Arc<dyn SocketExemption>) -> GatewayBuilder {
        self.exemption = exemption;
        self
    }

    /// The policy (chain) run on every request before forwarding.
    pub fn policy(mut self, policy: Arc<dyn Policy>) -> GatewayBuilder {
        self.policy = policy;
        self
    }

    /// Where request records go.
    pub fn record_sink(mut self, sink: Arc<dyn RecordSink>) -> GatewayBuilder {
        self.sink = sink;
        self
    }

    /// How client credentials are fingerprinted (default [`default_fingerprint`]).
    pub fn fingerprint(mut self, f: KeyFingerprint) -> GatewayBuilder {
        self.fingerprint = f;
        self
    }

    /// Longest wait for in-flight requests on shutdown (default 10 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> GatewayBuilder {
        self.shutdown_grace = grace;
        self
    }

    fn upstream_client(&self) -> Result<UpstreamClient, GatewayError> {
        upstream_client(
            &self.config,
            self.system_roots,
            &self.extra_roots,
            Arc::clone(&self.exemption),
        )
    }

    /// A prober with this builder's upstream path (roots, exemption,
    /// timeouts), without resolving any key or starting a gateway: for
    /// `kt secrets verify` and `kt gateway check --probe`. Call inside the
    /// runtime.
    pub fn prober(&self) -> Result<Prober, GatewayError> {
        let router = Router::new(&self.config)?;
        Ok(Prober::new(router, self.upstream_client()?, &self.config))
    }

    /// Resolves every target's managed key and builds the gateway. A
    /// required target whose key does not resolve is an error naming the
    /// secret and how to add it; an optional one is skipped with a warning
    /// (see [`Gateway::warnings`]).
    pub fn build(self) -> Result<Gateway, GatewayError> {
        let router = Router::new(&self.config)?;
        let keys = resolve_keys(&router, self.resolver.as_ref(), None)?;
        let client = self.upstream_client()?;
        let (shutdown_tx, _) = watch::channel(false);
        let id_prefix = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros())
        );
        let limit = limit::ConnLimit::new(self.config.gateway.max_connections);
        let per_uid = limit::UidBudget::new(self.config.gateway.max_connections_per_uid);
        let health = health::Health::new(
            self.config.gateway.cooldown_after,
            self.config.gateway.cooldown,
        );
        // A single largest body, and checking it (see `Policy::working_bytes`),
        // must always fit: a lone request refused for the budget would be
        // refused on every retry. Uncompressed only: a compressed body's
        // check may need its decoded size twice over (64 MiB by default),
        // which would raise a small budget far past what was set; one that
        // can never fit is refused saying so.
        let max_body = self.config.gateway.max_body_bytes;
        let check = self
            .policy
            .working_bytes(usize::try_from(max_body).unwrap_or(usize::MAX), None);
        let buffered = self
            .config
            .gateway
            .max_buffered_bytes
            .max(max_body.saturating_add(u64::try_from(check).unwrap_or(u64::MAX)));
        let body_budget_size = usize::try_from(buffered)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let body_budget = Arc::new(tokio::sync::Semaphore::new(body_budget_size));
        let shared = Arc::new(Shared {
            client,
            sink: self.sink,
            fingerprint: self.fingerprint,
            counter: AtomicU64::new(0),
            id_prefix,
            shutdown: shutdown_tx,
            graceful: Mutex::new(Some(GracefulShutdown::new())),
            shutdown_grace: self.shutdown_grace,
            certs: tls::CertCache::new(self.ca),
            limit,
            per_uid,
            body_budget,
            body_budget_size,
            check_slots: Arc::new(tokio::sync::Semaphore::new(check_slots())),
            exemption: self.exemption,
            last_probe: Mutex::new(HashMap::new()),
        });
        let inner = Inner {
            shared,
            config: self.config,
            router,
            keys: keys.keys,
            policy: self.policy,
            warnings: keys.warnings,
            health,
            generation: 1,
        };
        Ok(Gateway {
            current: Arc::new(RwLock::new(Arc::new(inner))),
        })
    }
}

/// The managed keys of a generation, and what was said about them.
struct ResolvedKeys {
    keys: HashMap<String, SecretValue>,
    warnings: Vec<String>,
    /// Targets whose secret no longer resolved cleanly, served with the
    /// value they had (never downgraded to nothing).
    kept: Vec<String>,
}

/// Resolves every target's managed key. A required target whose key does
/// not resolve is an error; an optional one is skipped with a warning.
/// With `previous` (a reload), a secret that now fails to read — a damaged
/// store, an empty or unreadable `file:` — keeps the value the target had
/// under the same reference, with a warning: a rotation hiccup must never
/// turn into an empty key or a dropped target.
fn resolve_keys(
    router: &Router,
    resolver: &dyn Resolve,
    previous: Option<&Inner>,
) -> Result<ResolvedKeys, GatewayError> {
    let mut out = ResolvedKeys {
        keys: HashMap::new(),
        warnings: Vec::new(),
        kept: Vec::new(),
    };
    let mut missing = Vec::new();
    for route in router.routes() {
        let problem = match resolve_target(&route.target, resolver) {
            Ok(resolved) => {
                out.keys.insert(route.target.id.clone(), resolved.value);
                continue;
            }
            Err(problem) => problem,
        };
        // Past the central store's max_stale: the value is not used any
        // more, neither kept nor a reason to refuse the reload (which would
        // keep serving it): the target fails closed until the store answers.
        if matches!(
            problem.cause,
            crate::secrets::status::Unresolved::Expired(_)
        ) {
            let w = if problem.required {
                format!("{problem}; requests for this target fail closed until the store answers")
            } else {
                problem.to_string()
            };
            tracing::error!("{w}");
            out.warnings.push(w);
            continue;
        }
        // A store entry removed on purpose is a change; an unreadable
        // backend or an emptied file is a fault, where the old value stays.
        let fault = matches!(
            problem.cause,
            crate::secrets::status::Unresolved::Unreadable(_)
        ) || !matches!(problem.reference, crate::config::SecretKeyRef::Store(_));
        let old = previous.filter(|_| fault).and_then(|p| {
            let same_ref = p.router.routes().iter().any(|r| {
                r.target.id == route.target.id
                    && r.target.secret_key_ref == route.target.secret_key_ref
            });
            same_ref.then(|| p.keys.get(&route.target.id)).flatten()
        });
        if let Some(old) = old {
            let w = format!("{problem}; keeping the value kt already had");
            tracing::warn!("{w}");
            out.warnings.push(w);
            out.kept.push(route.target.id.clone());
            out.keys.insert(route.target.id.clone(), old.clone());
        } else if problem.required {
            missing.push(problem.to_string());
        } else {
            tracing::warn!("{problem}");
            out.warnings.push(problem.to_string());
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(GatewayError::MissingSecrets(missing))
    }
}

type UpstreamClient = Client<upstream::UpstreamConnector, Full<Bytes>>;

/// The upstream client every request (and probe) goes through: system
/// roots (with `SSL_CERT_FILE`) when asked, the extra roots, the capture
/// exemption, `gateway.connect_timeout`.
fn upstream_client(
    config: &Config,
    system_roots: bool,
    extra_roots: &[CertificateDer<'static>],
    exemption: Arc<dyn SocketExemption>,
) -> Result<UpstreamClient, GatewayError> {
    let tls = client_tls_config(system_roots, extra_roots).map_err(GatewayError::Tls)?;
    let connector =
        upstream::UpstreamConnector::new(Arc::new(tls), exemption, config.gateway.connect_timeout)
            .with_proxy(upstream_proxy::proxy_for(config));
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector))
}

impl Prober {
    /// A prober for `config` with the upstream path of a gateway built with
    /// [`GatewayBuilder`]'s defaults (system roots and `SSL_CERT_FILE`, no
    /// capture exemption), as `kt run` and `kt gateway run` build theirs;
    /// resolves no key and needs no CA. Call inside the runtime.
    pub fn for_config(config: &Config) -> Result<Prober, GatewayError> {
        let router = Router::new(config)?;
        let client = upstream_client(config, true, &[], Arc::new(NoExemption))?;
        Ok(Prober::new(router, client, config))
    }
}

/// How many big policy checks run on the blocking pool at once: one per
/// core (more buys no throughput), at most 8, so they never take all of
/// the pool the `/proc` lookups of new clients run on (16 threads in
/// `kt`'s runtime); the rest wait their turn, their memory already
/// counted.
fn check_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

/// What every generation of a running gateway shares: the upstream pool,
/// where records go, the listeners' budgets and shutdown, the certificate
/// cache. A reload never replaces these.
pub(crate) struct Shared {
    client: UpstreamClient,
    sink: Arc<dyn RecordSink>,
    fingerprint: KeyFingerprint,
    counter: AtomicU64,
    id_prefix: String,
    shutdown: watch::Sender<bool>,
    graceful: Mutex<Option<GracefulShutdown>>,
    shutdown_grace: Duration,
    certs: tls::CertCache,
    limit: Arc<limit::ConnLimit>,
    per_uid: Arc<limit::UidBudget>,
    /// Bytes of request bodies held at once (`gateway.max_buffered_bytes`).
    body_budget: Arc<tokio::sync::Semaphore>,
    /// The permits `body_budget` was made with.
    body_budget_size: usize,
    /// Policy checks running on the blocking pool at once (see
    /// [`check_slots`]).
    check_slots: Arc<tokio::sync::Semaphore>,
    /// Exempts the sockets of port-wide splices from capture, as upstream
    /// sockets are.
    exemption: Arc<dyn SocketExemption>,
    /// The last periodic probe of each target.
    last_probe: Mutex<HashMap<String, ProbeReport>>,
}

/// One generation of a running gateway: the config, routes, managed keys
/// and policy chain a request is served with. A reload builds a new one
/// and swaps it in; a request keeps the generation it started with to its
/// end. Derefs to [`Shared`] for what outlives generations.
pub(crate) struct Inner {
    shared: Arc<Shared>,
    config: Arc<Config>,
    router: Router,
    keys: HashMap<String, SecretValue>,
    policy: Arc<dyn Policy>,
    warnings: Vec<String>,
    /// Targets that failed in a row and are skipped for a while (state
    /// shared across generations, settings from this one's config).
    health: health::Health,
    /// 1 at start, +1 per reload.
    generation: u64,
}

impl std::ops::Deref for Inner {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Inner {
    /// A new request id, also sent to the client as `x-kt-request-id`.
    pub(crate) fn next_request_id(&self) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n:x}", self.id_prefix)
    }

    /// A record of something kt's own rules decided outside any HTTP
    /// exchange (a refused or spliced connection, a target's health): one
    /// `guard` note with `action` and `rule`; the caller sets the path.
    pub(crate) fn guard_record(
        &self,
        arrival: crate::record::Arrival,
        peer: Option<SocketAddr>,
        client: crate::record::ClientInfo,
        what: &str,
        action: crate::record::PolicyAction,
        rule: &str,
    ) -> crate::record::RequestRecord {
        let mut rec = crate::record::RequestRecord::new(
            self.next_request_id(),
            arrival,
            peer,
            client,
            what.to_string(),
        );
        rec.policy.push(crate::record::PolicyNote {
            policy: crate::record::PolicyId::Guard,
            action,
            rule: rule.to_string(),
            location: None,
        });
        rec
    }
}

/// A built gateway; cheap to clone (all clones share state, including the
/// current generation).
#[derive(Clone)]
pub struct Gateway {
    current: Arc<RwLock<Arc<Inner>>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("targets", &self.inner().keys.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// The generation new requests are served with.
    pub(crate) fn inner(&self) -> Arc<Inner> {
        // A poisoned lock still holds a complete generation: swaps replace
        // the Arc in one assignment.
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Warnings of the current generation (optional targets skipped,
    /// secrets kept from before a reload).
    pub fn warnings(&self) -> Vec<String> {
        self.inner().warnings.clone()
    }

    /// The current config.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.inner().config)
    }

    /// A prober over this gateway's own upstream client (its pool, roots
    /// and exemption) and the current routes.
    pub fn prober(&self) -> Prober {
        let inner = self.inner();
        Prober::new(inner.router.clone(), inner.client.clone(), &inner.config)
    }

    /// The ids of the targets that will be used, in order.
    pub fn active_targets(&self) -> Vec<String> {
        let inner = self.inner();
        inner
            .router
            .routes()
            .iter()
            .filter(|r| inner.keys.contains_key(&r.target.id))
            .map(|r| r.target.id.clone())
            .collect()
    }

    /// Binds `addr` (or `gateway.listen` when `None`).
    pub async fn bind(&self, addr: Option<SocketAddr>) -> Result<TcpListener, GatewayError> {
        let addr = addr.unwrap_or(self.inner().config.gateway.listen);
        TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Listen {
                addr: addr.to_string(),
                source,
            })
    }

    /// Starts a graceful shutdown: listeners stop accepting, in-flight
    /// requests get up to the grace period, then the serve calls return.
    pub fn shutdown(&self) {
        // send_replace: `send` drops the value while nobody subscribed yet,
        // and a shutdown asked for before the listeners start must hold.
        self.inner().shutdown.send_replace(true);
    }

    /// Resolves once [`Gateway::shutdown`] was called.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutting_down();
        stopped(&mut rx).await;
    }

    fn shutting_down(&self) -> watch::Receiver<bool> {
        self.inner().shutdown.subscribe()
    }

    /// Waits until every connection watched for graceful shutdown has ended
    /// (bounded by the grace period). Call after [`Gateway::shutdown`] when
    /// driving listeners yourself; the `serve_*` loops call it.
    pub async fn drain(&self) {
        let inner = self.inner();
        let g = inner.graceful.lock().ok().and_then(|mut g| g.take());
        if let Some(g) = g
            && tokio::time::timeout(inner.shutdown_grace, g.shutdown())
                .await
                .is_err()
        {
            tracing::warn!("shutdown grace period over; dropping in-flight connections");
        }
    }

    /// Connections refused because every slot of `gateway.max_connections`
    /// was busy, and idle connections closed to make room.
    pub fn connection_budget_stats(&self) -> (u64, u64) {
        let inner = self.inner();
        (inner.limit.refused(), inner.limit.evicted())
    }

    /// Connections refused because their uid held
    /// `gateway.max_connections_per_uid` already.
    pub fn uid_budget_refusals(&self) -> u64 {
        self.inner().per_uid.refused()
    }
}

/// Resolves once shutdown was asked for (the watch guard is not Send, so
/// it is dropped here rather than held across the select).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
