//! The gateway: a TLS-terminating HTTP proxy that throws away the key a
//! client sent, puts the managed key in, and tries the provider's targets in
//! order. Async (tokio + hyper); the routing rules themselves are in
//! [`crate::routing`].
//!
//! Entry points: [`GatewayBuilder`] → [`Gateway`]; then
//! [`Gateway::serve_explicit`] (base-URL and CONNECT clients),
//! [`Gateway::serve_captured`] / [`Gateway::serve_capture_listener`]
//! (redirected connections), and [`Gateway::shutdown`].
#![forbid(unsafe_code)]

pub mod chain;
mod decision;
mod handler;
mod policy;
mod relay;
mod upstream;

pub use decision::{
    ClientInfo, Decision, DecisionSink, Fingerprinter, MemorySink, NoopSink, StreamCut,
    StreamOutcome, default_fingerprint,
};
pub use handler::{ConnCtx, GwBody, Mode};
pub use policy::{AllowAll, BlockCode, Policy, PolicyRequest, PolicyVerdict};
pub use relay::sse_error_event;
pub use upstream::{ConnectError, client_tls_config, connect_tcp};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::ca::Ca;
use crate::capture::{NoExemption, SocketExemption};
use crate::config::Config;
use crate::routing::{self, Router, RoutingError, codes};
use crate::secrets::{Resolve, SecretValue};

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Longest wait for a client's TLS ClientHello or handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    sink: Arc<dyn DecisionSink>,
    fingerprint: Fingerprinter,
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

    /// Where decision records go.
    pub fn decision_sink(mut self, sink: Arc<dyn DecisionSink>) -> GatewayBuilder {
        self.sink = sink;
        self
    }

    /// How client credentials are fingerprinted (default [`default_fingerprint`]).
    pub fn fingerprint(mut self, f: Fingerprinter) -> GatewayBuilder {
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
            self.exemption.clone(),
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
        Ok(Gateway {
            inner: Arc::new(Inner {
                config: self.config,
                router,
                keys,
                ca: self.ca,
                client,
                policy: self.policy,
                sink: self.sink,
                fingerprint: self.fingerprint,
                exemption: self.exemption,
                warnings,
                counter: AtomicU64::new(0),
                id_prefix,
                shutdown: shutdown_tx,
                graceful: Mutex::new(Some(GracefulShutdown::new())),
                shutdown_grace: self.shutdown_grace,
                server_configs: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// Shared state of a running gateway.
pub(crate) struct Inner {
    config: Arc<Config>,
    router: Router,
    keys: HashMap<String, SecretValue>,
    ca: Arc<Ca>,
    client: Client<upstream::UpstreamConnector, Full<Bytes>>,
    policy: Arc<dyn Policy>,
    sink: Arc<dyn DecisionSink>,
    fingerprint: Fingerprinter,
    exemption: Arc<dyn SocketExemption>,
    warnings: Vec<String>,
    counter: AtomicU64,
    id_prefix: String,
    shutdown: watch::Sender<bool>,
    graceful: Mutex<Option<GracefulShutdown>>,
    shutdown_grace: Duration,
    server_configs: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
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

/// Looks up a redirected connection's original destination and process
/// (the capture module's sock_ops map). `None` when unknown.
pub trait CaptureLookup: Send + Sync {
    /// `peer`: the client's address as accepted; `local`: the listener side.
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<(SocketAddr, ClientInfo)>;

    /// Whether connections without a record are refused (true for real
    /// capture; tests feed plain connections with no record).
    fn strict(&self) -> bool {
        false
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

    /// Accept loop for explicit clients (base-URL mode and CONNECT proxy
    /// mode) until [`Gateway::shutdown`]; then drains in-flight requests.
    pub async fn serve_explicit(&self, listener: TcpListener) -> Result<(), GatewayError> {
        self.accept_loop(listener, |gw, stream, peer| {
            let _ = stream.set_nodelay(true);
            let ctx = Arc::new(ConnCtx {
                mode: Mode::BaseUrl,
                peer: Some(peer),
                client: ClientInfo::default(),
            });
            gw.spawn_http(TokioIo::new(stream), ctx, true);
        })
        .await
    }

    /// Accept loop for redirected connections until [`Gateway::shutdown`].
    /// `lookup` gives each connection's original destination and process.
    /// Without a record, a strict lookup (see [`CaptureLookup::strict`])
    /// drops the connection; otherwise the listener's own address stands in
    /// (tests feeding plain connections).
    pub async fn serve_capture_listener(
        &self,
        listener: TcpListener,
        lookup: Arc<dyn CaptureLookup>,
    ) -> Result<(), GatewayError> {
        self.accept_loop(listener, move |gw, stream, peer| {
            let local = stream.local_addr().unwrap_or(peer);
            let (dst, info) = match lookup.lookup(peer, local) {
                Some(found) => found,
                // Not redirected by our programs: someone dialled the capture
                // port directly. Splicing it "back" to the listener would loop.
                None if lookup.strict() => {
                    tracing::warn!(%peer, "connection to the capture listener without a capture record: closed");
                    return;
                }
                None => (local, ClientInfo::default()),
            };
            let gw = gw.clone();
            tokio::spawn(async move { gw.serve_captured(stream, dst, info).await });
        })
        .await
    }

    /// Accepts until shutdown, handing each connection to `handle`; then
    /// closes the listener and drains in-flight requests.
    async fn accept_loop(
        &self,
        listener: TcpListener,
        handle: impl Fn(&Gateway, TcpStream, SocketAddr),
    ) -> Result<(), GatewayError> {
        let mut stop = self.shutting_down();
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped(&mut stop) => break,
            };
            handle(self, stream, peer);
        }
        drop(listener);
        self.drain().await;
        Ok(())
    }

    /// Serves one redirected connection to completion. TLS is terminated
    /// with a leaf for the SNI (or the original address when there is none);
    /// a connection whose first byte is not a TLS handshake is served as
    /// plain HTTP. A non-provider name is spliced to `original_dst` untouched
    /// when `gateway.splice_unknown`, else closed.
    pub async fn serve_captured(
        &self,
        stream: TcpStream,
        original_dst: SocketAddr,
        client: ClientInfo,
    ) {
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, peek_client_hello(&stream)).await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "captured connection closed before a request");
                return;
            }
            Err(_) => return,
        };
        let dst_host = original_dst.ip().to_string();
        let port = original_dst.port();
        match hello {
            Peeked::Plain => {
                let ctx = Arc::new(ConnCtx {
                    mode: Mode::Capture {
                        host: dst_host,
                        port,
                    },
                    peer,
                    client,
                });
                self.spawn_http(TokioIo::new(stream), ctx, false);
            }
            Peeked::Tls { sni } => {
                let host = sni.clone().unwrap_or(dst_host);
                if self.inner.router.match_host(&host, Some(port)).is_none() {
                    if self.inner.config.gateway.splice_unknown {
                        self.splice(stream, &original_dst.ip().to_string(), port)
                            .await;
                    } else {
                        tracing::info!(host = %host, "captured connection to a non-provider name refused");
                    }
                    return;
                }
                let cfg = match self.server_config(&host) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "no server config");
                        return;
                    }
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "client tls handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let ctx = Arc::new(ConnCtx {
                    mode: Mode::Capture { host, port },
                    peer,
                    client,
                });
                self.spawn_http(TokioIo::new(tls), ctx, false);
            }
        }
    }

    /// Copies bytes both ways between a client and `host:port` (exempt socket).
    async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: S,
        host: &str,
        port: u16,
    ) {
        match tokio::time::timeout(
            self.inner.config.gateway.connect_timeout,
            connect_tcp(host, port, self.inner.exemption.as_ref()),
        )
        .await
        {
            Ok(Ok(mut up)) => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            }
            Ok(Err(e)) => tracing::info!(error = %e, "splice connect failed"),
            Err(_) => tracing::info!(host, "splice connect timed out"),
        }
    }

    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
        let key = host.to_ascii_lowercase();
        if let Ok(m) = self.inner.server_configs.lock()
            && let Some(c) = m.get(&key)
        {
            return Ok(c.clone());
        }
        let cfg = Arc::new(
            self.inner
                .ca
                .server_config(Some(key.clone()), &[b"h2", b"http/1.1"])?,
        );
        if let Ok(mut m) = self.inner.server_configs.lock() {
            if m.len() > 4096 {
                m.clear();
            }
            m.insert(key, cfg.clone());
        }
        Ok(cfg)
    }

    /// Serves HTTP/1.1 and HTTP/2 on one connection, watched for graceful shutdown.
    fn spawn_http<I>(&self, io: TokioIo<I>, ctx: Arc<ConnCtx>, allow_connect: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gw = self.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let gw = gw.clone();
            let ctx = ctx.clone();
            async move {
                if req.method() == Method::CONNECT {
                    if allow_connect {
                        return Ok(gw.connect(req, ctx.peer));
                    }
                    let body = routing::error_body(
                        None,
                        StatusCode::METHOD_NOT_ALLOWED,
                        codes::BAD_REQUEST,
                        "CONNECT inside a tunnel is not supported",
                        &[],
                    );
                    let mut r = Response::new(handler::full(body));
                    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                    return Ok(r);
                }
                handler::handle(gw.inner.clone(), ctx, req).await
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .max_buf_size(MAX_HEADER_BYTES)
            .header_read_timeout(Duration::from_secs(30));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        let watched = match self.inner.graceful.lock() {
            Ok(g) => g.as_ref().map(|g| g.watcher()),
            Err(_) => None,
        };
        tokio::spawn(async move {
            let r = match watched {
                Some(w) => w.watch(conn).await,
                // Already draining: serve this last connection unwatched.
                None => conn.await,
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }

    /// Answers a CONNECT: provider hosts are terminated with a leaf from the
    /// CA; others are spliced or refused per `gateway.splice_unknown`.
    fn connect(&self, req: Request<Incoming>, peer: Option<SocketAddr>) -> Response<GwBody> {
        let Some(authority) = req.uri().authority().cloned() else {
            let mut r = Response::new(handler::full(Bytes::new()));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        let is_provider = self.inner.router.match_host(&host, Some(port)).is_some();
        if !is_provider && !self.inner.config.gateway.splice_unknown {
            let msg = format!(
                "{host} is not a configured provider host; known: {}",
                self.known_hosts().join(", ")
            );
            let body = routing::error_body(
                None,
                StatusCode::FORBIDDEN,
                codes::NOT_A_PROVIDER,
                &msg,
                &[],
            );
            let mut r = Response::new(handler::full(body));
            *r.status_mut() = StatusCode::FORBIDDEN;
            return r;
        }
        let gw = self.clone();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => TokioIo::new(u),
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT upgrade failed");
                    return;
                }
            };
            if !is_provider {
                gw.splice(upgraded, &host, port).await;
                return;
            }
            let cfg = match gw.server_config(&host) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "no server config");
                    return;
                }
            };
            let tls = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsAcceptor::from(cfg).accept(upgraded),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "tls in CONNECT tunnel failed");
                    return;
                }
                Err(_) => return,
            };
            let ctx = Arc::new(ConnCtx {
                mode: Mode::Connect { host, port },
                peer,
                client: ClientInfo::default(),
            });
            gw.spawn_http(TokioIo::new(tls), ctx, false);
        });
        Response::new(handler::full(Bytes::new()))
    }

    fn known_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = vec!["api.openai.com".into(), "api.anthropic.com".into()];
        for r in self.inner.router.routes() {
            if !hosts.contains(&r.endpoint.host) {
                hosts.push(r.endpoint.host.clone());
            }
        }
        hosts
    }
}

/// Resolves once shutdown was asked for (the watch guard is not Send, so
/// it is dropped here rather than held across the select).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

enum Peeked {
    Plain,
    Tls { sni: Option<String> },
}

/// Looks at the ClientHello without consuming it, so the connection can
/// still be spliced untouched.
async fn peek_client_hello(stream: &TcpStream) -> std::io::Result<Peeked> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_len = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[0] != 0x16 {
            return Ok(Peeked::Plain);
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd).is_err() {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_string);
                return Ok(Peeked::Tls { sni });
            }
            // Not a valid hello: let the real handshake fail with an alert.
            Err(_) => return Ok(Peeked::Tls { sni: None }),
            Ok(None) if n == buf.len() => return Ok(Peeked::Tls { sni: None }),
            Ok(None) => {
                // Partial hello: peek does not consume, so wait a little for more.
                if n == last_len {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                last_len = n;
            }
        }
    }
}
