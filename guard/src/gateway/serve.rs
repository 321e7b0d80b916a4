//! Accept loops. The loop only accepts and admits (the connection budget);
//! everything that can wait — the capture record lookup with its `/proc`
//! reads, the hello peek, the TLS handshake — runs in the connection's own
//! task, so one slow client never holds up the next.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::connect::splice_with_idle;
use super::handler::{self, ConnCtx, Mode};
use super::limit::Slot;
use super::proxy_head::{BadHead, Listener};
use super::tls::{HANDSHAKE_TIMEOUT, Hello, HelloError, Prefixed, read_client_hello};
use super::{Gateway, GatewayError, stopped};
use crate::config::CaptureScope;
use crate::provider;
use crate::record::{Arrival, ClientInfo, PolicyAction, codes};

/// A connection kt refuses before any request: what the event says.
pub(crate) struct Refusal {
    pub(crate) arrival: Arrival,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) client: ClientInfo,
    /// `host:port` the client wanted.
    pub(crate) target: String,
    /// Why (`no-sni`, `ech`, …).
    pub(crate) rule: &'static str,
}

/// Where a port-wide splice goes and for whom.
struct Splice {
    dst: SocketAddr,
    /// The name the client asked for (SNI).
    host: String,
    peer: Option<SocketAddr>,
    client: ClientInfo,
}

/// A fatal TLS `access_denied` alert, so the client's TLS library reports
/// a refusal instead of a bare reset.
pub(crate) const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

async fn send_alert<IO: AsyncWrite + Unpin>(io: &mut IO) {
    use tokio::io::AsyncWriteExt as _;
    let _ = io.write_all(&ACCESS_DENIED_ALERT).await;
    let _ = io.shutdown().await;
}

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A response body that keeps its connection counted busy until it ends.
struct Held {
    inner: handler::GwBody,
    _in_flight: super::limit::InFlight,
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = super::relay::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/2 streams served at once on one client connection.
const MAX_H2_STREAMS: u32 = 32;

/// Longest wait for the capture record of a connection (a map lookup and a
/// few `/proc` reads, off the accept loop).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// What the capture record says about a redirected connection.
#[derive(Clone, Debug)]
pub struct Captured {
    /// The destination the client asked for.
    pub original: SocketAddr,
    /// The process behind it.
    pub client: ClientInfo,
    /// Whether `original` is inside the provider prefixes. Only a
    /// connection outside them (port-wide capture) may ever be spliced.
    pub provider_prefix: bool,
}

/// Looks up a redirected connection's original destination and process
/// (the capture module's records). `None` when unknown.
pub trait CaptureLookup: Send + Sync {
    /// `peer`: the client's address as accepted; `local`: the listener side.
    /// May block briefly (it reads `/proc`); the gateway calls it off the
    /// async workers.
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<Captured>;

    /// Whether connections without a record are refused (true for real
    /// capture; tests feed plain connections with no record).
    fn strict(&self) -> bool {
        false
    }
}

/// The process behind a connection to the explicit listener, from the
/// kernel's socket table (loopback clients only; empty when not found).
pub(crate) async fn explicit_client(peer: SocketAddr, local: SocketAddr) -> ClientInfo {
    if !peer.ip().is_loopback() && peer.ip() != local.ip() {
        return ClientInfo::default();
    }
    let found = tokio::time::timeout(
        LOOKUP_TIMEOUT,
        tokio::task::spawn_blocking(move || crate::capture::peer_process(peer, local)),
    )
    .await;
    let Ok(Ok(Some(p))) = found else {
        return ClientInfo::default();
    };
    let info = p.info.unwrap_or_default();
    let context = info.context();
    ClientInfo {
        pid: p.pid,
        uid: Some(p.uid),
        cgroup_id: None,
        exe: info.exe,
        cmdline: info.cmdline,
        context,
        cgroup: info.cgroup,
        container_id: info.container_id,
    }
}

/// Counts a connection against its uid (`gateway.max_connections_per_uid`);
/// over budget it is refused and recorded. Connections of unknown uid
/// are only bounded by the global budget.
pub(crate) fn admit_uid(
    inner: &Arc<super::Inner>,
    arrival: Arrival,
    peer: SocketAddr,
    client: &ClientInfo,
) -> Option<Option<super::limit::UidSlot>> {
    let Some(uid) = client.uid else {
        return Some(None);
    };
    match inner.per_uid.admit(uid) {
        Some(slot) => Some(Some(slot)),
        None => {
            Gateway::pinned(Arc::clone(inner)).refuse_connection(Refusal {
                arrival,
                peer: Some(peer),
                client: client.clone(),
                target: "-".into(),
                rule: "uid-connection-budget",
            });
            None
        }
    }
}

impl Gateway {
    /// Accept loop for explicit clients (base-URL mode and CONNECT proxy
    /// mode) until [`Gateway::shutdown`]; then drains in-flight requests.
    pub async fn serve_explicit(&self, listener: TcpListener) -> Result<(), GatewayError> {
        self.accept_loop(listener, |gw, mut stream, peer, slot| async move {
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(peer);
            // The first head is kt's to check (hostile or odd bytes get a
            // status, a text and an event); hyper serves the rest.
            let Some(head) = gw.explicit_head(&mut stream, peer, local, &slot).await else {
                return;
            };
            let ctx = Arc::new(ConnCtx {
                mode: Mode::BaseUrl,
                peer: Some(peer),
                client: ClientInfo::default(),
                explicit: Some(handler::ExplicitPeer::new(local)),
            });
            let io = Prefixed::new(head, stream);
            gw.serve_http(TokioIo::new(io), ctx, true, slot).await;
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
        self.accept_loop(listener, move |gw, stream, peer, slot| {
            let lookup = Arc::clone(&lookup);
            async move {
                let local = stream.local_addr().unwrap_or(peer);
                let strict = lookup.strict();
                let found = tokio::time::timeout(
                    LOOKUP_TIMEOUT,
                    tokio::task::spawn_blocking(move || lookup.lookup(peer, local)),
                )
                .await;
                let found = match found {
                    Ok(Ok(Some(found))) => found,
                    // Not redirected by our programs: someone dialled the capture
                    // port directly. Splicing it "back" to the listener would loop.
                    _ if strict => {
                        tracing::warn!(%peer, "connection to the capture listener without a capture record: closed");
                        return;
                    }
                    _ => Captured {
                        original: local,
                        client: ClientInfo::default(),
                        provider_prefix: true,
                    },
                };
                let Some(_uid_slot) = admit_uid(&gw.inner(), Arrival::Capture, peer, &found.client)
                else {
                    return;
                };
                gw.serve_captured_slot(stream, found, slot).await;
            }
        })
        .await
    }

    /// Accepts until shutdown, admitting each connection into the budget
    /// and running `handle` in its own task; then closes the listener and
    /// drains in-flight requests.
    pub(super) async fn accept_loop<F, Fut>(
        &self,
        listener: TcpListener,
        handle: F,
    ) -> Result<(), GatewayError>
    where
        F: Fn(Gateway, TcpStream, SocketAddr, Arc<Slot>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
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
                () = stopped(&mut stop) => break,
            };
            let Some(slot) = self.inner().limit.admit().await else {
                tracing::warn!(%peer, "connection refused: every slot of gateway.max_connections is serving a request");
                continue;
            };
            tokio::spawn(handle(self.clone(), stream, peer, Arc::new(slot)));
        }
        drop(listener);
        self.drain().await;
        Ok(())
    }

    /// Serves one redirected connection to completion (tests and callers
    /// that accept themselves; counted in the connection budget). The
    /// destination counts as a provider address: never spliced.
    pub async fn serve_captured(
        &self,
        stream: TcpStream,
        original_dst: SocketAddr,
        client: ClientInfo,
    ) {
        let Some(slot) = self.inner().limit.admit().await else {
            return;
        };
        let found = Captured {
            original: original_dst,
            client,
            provider_prefix: true,
        };
        self.serve_captured_slot(stream, found, Arc::new(slot))
            .await;
    }

    /// Decides a redirected connection by what the client says, and
    /// either terminates it, refuses it, or (port-wide capture only)
    /// splices it: a TLS ClientHello naming a provider host is terminated
    /// with a leaf for that name; plain HTTP is served (the request's
    /// `Host` must then name a provider); another name is spliced to its
    /// original destination when capture is port-wide and that destination
    /// is outside the provider prefixes; everything else — no SNI, an
    /// unparseable or oversized hello, ECH, another name on a provider
    /// address — is refused with a TLS alert and an event. Nothing reaches
    /// a provider address undecided.
    async fn serve_captured_slot(&self, mut stream: TcpStream, found: Captured, slot: Arc<Slot>) {
        let Captured {
            original: original_dst,
            client,
            provider_prefix,
        } = found;
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let port = original_dst.port();
        let mut buf = Vec::new();
        let hello = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_client_hello(&mut stream, &mut buf)) => r,
            () = slot.evicted() => return,
        };
        let refuse = |rule: &'static str, host: Option<String>| Refusal {
            arrival: Arrival::Capture,
            peer,
            client: client.clone(),
            target: format!(
                "{}:{port}",
                host.unwrap_or_else(|| original_dst.ip().to_string())
            ),
            rule,
        };
        let hello = match hello {
            Ok(Ok(h)) => h,
            Ok(Err(HelloError::Closed(e))) => {
                tracing::debug!(error = %e, "captured connection closed before a request");
                return;
            }
            Ok(Err(e)) => {
                self.refuse_connection(refuse(e.rule(), None));
                send_alert(&mut stream).await;
                return;
            }
            Err(_) => {
                self.refuse_connection(refuse("hello-timeout", None));
                return;
            }
        };
        match hello {
            Hello::Plain => {
                let ctx = Arc::new(ConnCtx {
                    mode: Mode::Capture {
                        host: original_dst.ip().to_string(),
                        port,
                    },
                    peer,
                    client,
                    explicit: None,
                });
                let io = Prefixed::new(buf, stream);
                self.serve_http(TokioIo::new(io), ctx, false, slot).await;
            }
            Hello::Tls { ech: true, sni } => {
                self.refuse_connection(refuse("ech", sni));
                send_alert(&mut stream).await;
            }
            Hello::Tls { sni: None, .. } => {
                let dst = original_dst.ip().to_string();
                if self.inner().router.is_target_endpoint(&dst, port) {
                    let ctx = ConnCtx {
                        mode: Mode::Capture { host: dst, port },
                        peer,
                        client,
                        explicit: None,
                    };
                    self.terminate(Prefixed::new(buf, stream), ctx, slot).await;
                    return;
                }
                self.refuse_connection(refuse("no-sni", None));
                send_alert(&mut stream).await;
            }
            Hello::Tls {
                sni: Some(host), ..
            } => {
                if self.inner().router.match_host(&host, Some(port)).is_some() {
                    let ctx = ConnCtx {
                        mode: Mode::Capture { host, port },
                        peer,
                        client,
                        explicit: None,
                    };
                    self.terminate(Prefixed::new(buf, stream), ctx, slot).await;
                    return;
                }
                if self.inner().config.capture.scope == CaptureScope::Port && !provider_prefix {
                    let to = Splice {
                        dst: original_dst,
                        host,
                        peer,
                        client,
                    };
                    self.splice_non_provider(stream, buf, to, slot).await;
                    return;
                }
                self.refuse_connection(refuse("non-provider-name", Some(host)));
                send_alert(&mut stream).await;
            }
        }
    }

    /// Port-wide capture: passes a connection that names no provider on to
    /// the address it was going to, through a socket kt makes (exempted from
    /// capture like kt's upstream sockets), the hello bytes already read
    /// first, until both sides end or it is idle for `gateway.idle_timeout`.
    /// Recorded as a `guard` audit event.
    async fn splice_non_provider(
        &self,
        client_io: TcpStream,
        hello: Vec<u8>,
        to: Splice,
        slot: Arc<Slot>,
    ) {
        use tokio::io::AsyncWriteExt as _;
        // A decided connection: no longer idle, not evicted to make room.
        slot.busy();
        let started = std::time::Instant::now();
        let gw = &self.inner().config.gateway;
        let ip = to.dst.ip().to_string();
        let upstream = tokio::time::timeout(
            gw.connect_timeout,
            super::connect_tcp(&ip, to.dst.port(), &*self.inner().exemption),
        )
        .await;
        let upstream = match upstream {
            Ok(Ok(mut up)) => match up.write_all(&hello).await {
                Ok(()) => Ok(up),
                Err(e) => Err(e.to_string()),
            },
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".to_string()),
        };
        let mut rec = self.inner().guard_record(
            Arrival::Capture,
            to.peer,
            to.client,
            "TLS",
            PolicyAction::Audit,
            "spliced-non-provider",
        );
        rec.path = format!("{}:{} ({})", to.host, to.dst.port(), to.dst);
        rec.latency = started.elapsed();
        let up = match upstream {
            Ok(up) => up,
            Err(e) => {
                tracing::info!(host = %to.host, dst = %to.dst, error = %e, "non-provider splice: destination unreachable");
                rec.error_code = Some(codes::SPLICE_FAILED);
                self.inner().sink.record(rec);
                return;
            }
        };
        tracing::info!(host = %to.host, dst = %to.dst, "non-provider connection spliced (port-wide capture)");
        self.inner().sink.record(rec);
        splice_with_idle(client_io, up, gw.idle_timeout).await;
        drop(slot);
    }

    /// Records a connection refused before any request, as a `guard` block.
    pub(crate) fn refuse_connection(&self, r: Refusal) {
        tracing::info!(target_addr = %r.target, rule = r.rule, "connection refused");
        let mut rec = self.inner().guard_record(
            r.arrival,
            r.peer,
            r.client,
            "TLS",
            PolicyAction::Block,
            r.rule,
        );
        rec.path = r.target;
        rec.error_code = Some(codes::CONNECTION_REFUSED);
        self.inner().sink.record(rec);
    }

    /// The one TLS accept path (captured connections and CONNECT tunnels):
    /// a leaf for the connection's provider name, then HTTP.
    pub(crate) async fn terminate<IO>(&self, io: IO, ctx: ConnCtx, slot: Arc<Slot>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let host = match &ctx.mode {
            Mode::Capture { host, .. } | Mode::Connect { host, .. } => host.clone(),
            Mode::BaseUrl => return,
        };
        let inner = self.inner();
        let tls = tokio::select! {
            r = inner.certs.accept(io, &host) => r,
            () = slot.evicted() => return,
        };
        match tls {
            Ok(tls) => {
                self.serve_http(TokioIo::new(tls), Arc::new(ctx), false, slot)
                    .await;
            }
            Err(e) if super::tls::client_rejected_ca(&e) => {
                // "My job now fails TLS": the client does not trust kt's CA
                // (a container without it, a runtime with its own roots).
                tracing::info!(host = %host, error = %e, "client rejected kt's certificate: it does not trust kt's CA");
                let port = match &ctx.mode {
                    Mode::Capture { port, .. } | Mode::Connect { port, .. } => *port,
                    Mode::BaseUrl => 0,
                };
                let mut rec = inner.guard_record(
                    ctx.mode.arrival(),
                    ctx.peer,
                    ctx.client.clone(),
                    "TLS",
                    PolicyAction::Audit,
                    super::tls::CLIENT_REJECTED_CA,
                );
                rec.path = format!("{host}:{port}");
                rec.note = Some(format!(
                    "client rejected kt's certificate for {host}: it does not trust kt's CA (`kt ca export`)"
                ));
                inner.sink.record(rec);
            }
            Err(e) => tracing::debug!(error = %e, host = %host, "client tls failed"),
        }
    }

    /// Serves HTTP/1.1 and HTTP/2 on one connection, watched for graceful
    /// shutdown. The connection stops being idle (closable to make room)
    /// at its first request.
    pub(crate) async fn serve_http<I>(
        &self,
        io: TokioIo<I>,
        ctx: Arc<ConnCtx>,
        allow_connect: bool,
        slot: Arc<Slot>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gw = self.clone();
        let svc_slot = Arc::clone(&slot);
        let conn_ctx = Arc::clone(&ctx);
        let svc = service_fn(move |req: Request<Incoming>| {
            let gw = gw.clone();
            let ctx = Arc::clone(&ctx);
            // Busy from here until the response body is done.
            let in_flight = svc_slot.begin();
            let tunnel_slot = Arc::clone(&svc_slot);
            async move {
                if allow_connect
                    && req.method() != Method::CONNECT
                    && req.method().as_str().eq_ignore_ascii_case("CONNECT")
                {
                    let bad = BadHead::bad_method(req.method(), Listener::Explicit);
                    let client = handler::resolve_client(&gw.inner(), &ctx)
                        .await
                        .unwrap_or_default();
                    let r = Refusal {
                        arrival: Arrival::Connect,
                        peer: ctx.peer,
                        client,
                        target: bad.target.clone(),
                        rule: bad.rule,
                    };
                    gw.record_bad_head(r, "CONNECT", &bad);
                    return Ok(bad.response());
                }
                if req.method() == Method::CONNECT {
                    if allow_connect {
                        // Over its uid's budget: refused (recorded by the
                        // budget), never a tunnel for an unnamed client.
                        let Some(client) = handler::resolve_client(&gw.inner(), &ctx).await else {
                            let bad = BadHead::new(
                                StatusCode::TOO_MANY_REQUESTS,
                                "uid-connection-budget",
                                "kt: this user has too many connections open to kt (gateway.max_connections_per_uid)".into(),
                                "-".into(),
                            );
                            return Ok(bad.response());
                        };
                        return Ok(gw.connect(req, Arc::clone(&ctx), client, tunnel_slot).await);
                    }
                    let body = provider::error_body(
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
                let resp = handler::handle(Arc::clone(&gw.inner()), ctx, req).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|b| {
                    http_body_util::BodyExt::boxed(Held {
                        inner: b,
                        _in_flight: in_flight,
                    })
                }))
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
            .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
            // Each stream may buffer a whole body: bound them per connection.
            .max_concurrent_streams(MAX_H2_STREAMS);
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        let watched = match self.inner().graceful.lock() {
            Ok(g) => g
                .as_ref()
                .map(hyper_util::server::graceful::GracefulShutdown::watcher),
            Err(_) => None,
        };
        let served = async move {
            match watched {
                Some(w) => w.watch(conn).await,
                // Already draining: serve this last connection unwatched.
                None => conn.await,
            }
        };
        tokio::select! {
            r = served => {
                if let Err(e) = r {
                    let refused = allow_connect
                        .then(|| e.downcast_ref::<hyper::Error>())
                        .flatten()
                        .and_then(|e| {
                            if e.is_parse_too_large() {
                                Some(BadHead::later(
                                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                                    "explicit-head-too-large",
                                ))
                            } else if e.is_parse() {
                                Some(BadHead::later(StatusCode::BAD_REQUEST, "explicit-not-http"))
                            } else {
                                None
                            }
                        });
                    match refused {
                        // A later head on an explicit connection that hyper
                        // refused itself (its bare 400 or 431): recorded as
                        // the first head's refusals are.
                        Some(bad) => {
                            let client = handler::resolve_client(&self.inner(), &conn_ctx)
                                .await
                                .unwrap_or_default();
                            let r = Refusal {
                                arrival: Arrival::BaseUrl,
                                peer: conn_ctx.peer,
                                client,
                                target: bad.target.clone(),
                                rule: bad.rule,
                            };
                            self.record_bad_head(r, "HTTP", &bad);
                        }
                        None => tracing::debug!(error = %e, "client connection ended with an error"),
                    }
                }
            }
            () = slot.evicted() => {
                tracing::debug!("idle connection closed to make room for a new one");
            }
        }
    }
}
