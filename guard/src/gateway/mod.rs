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

mod connect;
mod forward;
mod handler;
mod limit;
mod relay;
mod serve;
mod tls;
mod upstream;

pub use handler::{ConnCtx, GwBody, Mode};
pub use relay::sse_error_event;
pub use serve::{CaptureLookup, Captured};
pub use upstream::{ConnectError, client_tls_config, connect_tcp};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
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
use crate::secrets::{Resolve, SecretValue};

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
    #[error("upstream tls setup: {0}")]
    Tls(String),
    /// The extra root bundle has no usable certificate.
    #[error("extra root bundle: {0}")]
    Roots(String),
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
            .map_err(|e| GatewayError::Roots(e.to_string()))?;
        if certs.is_empty() {
            return Err(GatewayError::Roots("no certificate in bundle".into()));
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

    /// Resolves every target's managed key and builds the gateway. A
    /// required target whose key does not resolve is an error naming the
    /// secret and how to add it; an optional one is skipped with a warning
    /// (see [`Gateway::warnings`]).
    pub fn build(self) -> Result<Gateway, GatewayError> {
        let router = Router::new(&self.config)?;
        let mut keys = HashMap::new();
        let mut missing = Vec::new();
        let mut warnings = Vec::new();
        for route in router.routes() {
            let t = &route.target;
            let r = &t.secret_key_ref;
            let why = match self.resolver.resolve(r) {
                Ok(Some(resolved)) => {
                    keys.insert(t.id.clone(), resolved.value);
                    continue;
                }
                Ok(None) => "is not set".to_string(),
                Err(e) => format!("cannot be read ({e})"),
            };
            let how = match r {
                crate::config::SecretKeyRef::Store(n) => {
                    format!("add it with `kt secrets add {n} --store`")
                }
                crate::config::SecretKeyRef::Env(n) => {
                    format!(
                        "set {n} in the guard's environment or add it with `kt secrets add {n} --store`"
                    )
                }
            };
            let line = format!("target {}: secret {} {why}; {how}", t.id, r);
            if t.required {
                missing.push(line);
            } else {
                tracing::warn!("{line} (optional target skipped)");
                warnings.push(format!("{line} (optional target skipped)"));
            }
        }
        if !missing.is_empty() {
            return Err(GatewayError::MissingSecrets(missing));
        }
        let tls = client_tls_config(self.system_roots, &self.extra_roots)
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
        let connector = upstream::UpstreamConnector::new(
            Arc::new(tls),
            Arc::clone(&self.exemption),
            self.config.gateway.connect_timeout,
        );
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let (shutdown_tx, _) = watch::channel(false);
        let id_prefix = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0)
        );
        let limit = limit::ConnLimit::new(self.config.gateway.max_connections);
        Ok(Gateway {
            inner: Arc::new(Inner {
                config: self.config,
                router,
                keys,
                client,
                policy: self.policy,
                sink: self.sink,
                fingerprint: self.fingerprint,
                warnings,
                counter: AtomicU64::new(0),
                id_prefix,
                shutdown: shutdown_tx,
                graceful: Mutex::new(Some(GracefulShutdown::new())),
                shutdown_grace: self.shutdown_grace,
                certs: tls::CertCache::new(self.ca),
                limit,
                exemption: self.exemption,
            }),
        })
    }
}

/// Shared state of a running gateway.
pub(crate) struct Inner {
    config: Arc<Config>,
    router: Router,
    keys: HashMap<String, SecretValue>,
    client: Client<upstream::UpstreamConnector, Full<Bytes>>,
    policy: Arc<dyn Policy>,
    sink: Arc<dyn RecordSink>,
    fingerprint: KeyFingerprint,
    warnings: Vec<String>,
    counter: AtomicU64,
    id_prefix: String,
    shutdown: watch::Sender<bool>,
    graceful: Mutex<Option<GracefulShutdown>>,
    shutdown_grace: Duration,
    certs: tls::CertCache,
    limit: Arc<limit::ConnLimit>,
    /// Exempts the sockets of port-wide splices from capture, as upstream
    /// sockets are.
    exemption: Arc<dyn SocketExemption>,
}

/// A built gateway; cheap to clone (all clones share state).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("targets", &self.inner.keys.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Warnings from startup (optional targets skipped).
    pub fn warnings(&self) -> &[String] {
        &self.inner.warnings
    }

    /// The ids of the targets that will be used, in order.
    pub fn active_targets(&self) -> Vec<String> {
        self.inner
            .router
            .routes()
            .iter()
            .filter(|r| self.inner.keys.contains_key(&r.target.id))
            .map(|r| r.target.id.clone())
            .collect()
    }

    /// Binds `addr` (or `gateway.listen` when `None`).
    pub async fn bind(&self, addr: Option<SocketAddr>) -> Result<TcpListener, GatewayError> {
        let addr = addr.unwrap_or(self.inner.config.gateway.listen);
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
        let _ = self.inner.shutdown.send(true);
    }

    fn shutting_down(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Waits until every connection watched for graceful shutdown has ended
    /// (bounded by the grace period). Call after [`Gateway::shutdown`] when
    /// driving listeners yourself; the `serve_*` loops call it.
    pub async fn drain(&self) {
        let g = self.inner.graceful.lock().ok().and_then(|mut g| g.take());
        if let Some(g) = g
            && tokio::time::timeout(self.inner.shutdown_grace, g.shutdown())
                .await
                .is_err()
        {
            tracing::warn!("shutdown grace period over; dropping in-flight connections");
        }
    }

    /// Connections refused because every slot of `gateway.max_connections`
    /// was busy, and idle connections closed to make room.
    pub fn connection_budget_stats(&self) -> (u64, u64) {
        (self.inner.limit.refused(), self.inner.limit.evicted())
    }
}

/// Resolves once shutdown was asked for (the watch guard is not Send, so
/// it is dropped here rather than held across the select).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
