//! Connections a captured process made to a declared HTTP proxy
//! (`capture.proxies`, or kt's own `HTTPS_PROXY`), redirected by capture to
//! kt's proxy listener. kt reads each request on the connection:
//!
//! - `CONNECT` to a provider authority: kt answers `200` itself and handles
//!   the tunnel as any captured provider connection (hello → provider name →
//!   local TLS → policy chain → key swap → events). The proxy never sees it.
//! - `CONNECT` to anything else: replayed to the real proxy as the client
//!   sent it (Proxy-Authorization included), and the proxy's own answer goes
//!   back (a 407 too); on `2xx` both sides are spliced. kt's socket to the
//!   proxy is exempted from capture; one proxy connection serves one client
//!   connection, so connection-bound proxy auth (NTLM, Negotiate) works.
//! - `CONNECT` to an IP literal on a capture port (which may be a
//!   provider's address): kt answers `200` and reads the ClientHello; a
//!   provider name (or exactly a target's address without a name) is
//!   handled as above, anything else is replayed to the real proxy and
//!   spliced after the hello (a refusal by the proxy then closes the
//!   connection: its answer cannot follow the `200`).
//! - Plain-HTTP proxy requests (`GET http://host/...`) to a non-provider
//!   host are forwarded the same way. To a provider host they are refused:
//!   the key would cross the network in clear text, and kt terminates
//!   provider traffic only as TLS.
//!
//! Before any of that, kt reads the first request head itself (see
//! `proxy_head`): TLS or HTTP/2 sent straight to the proxy port, binary
//! bytes, a head over [`MAX_HEADER_BYTES`] or unfinished after
//! [`HEAD_TIMEOUT`], and a CONNECT authority that is not `host:port` are
//! refused with a status, a short text and an event; nothing odd reaches
//! the real proxy.
//!
//! Request headers (Proxy-Authorization above all) are never logged nor put
//! in events; events name the authority only.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use super::connect::{authority, connect_target, refuse_in_tunnel, splice_with_idle};
use super::handler::{self, ConnCtx, GwBody, Mode};
use super::limit::Slot;
use super::proxy_head::{
    BadHead, HEAD_TIMEOUT, HeadRead, KEEPALIVE_HEAD_TIMEOUT, Listener, check_connect_authority,
    read_head,
};
use super::serve::{CaptureLookup, Captured, MAX_HEADER_BYTES, Refusal, admit_uid};
use super::tls::{HANDSHAKE_TIMEOUT, Hello, Prefixed, read_client_hello};
use super::{Gateway, GatewayError};
use crate::provider;
use crate::record::{Arrival, ClientInfo, PolicyAction, codes};

/// Largest proxy answer body kt holds to pass on (a 407 page).
const MAX_PROXY_BODY: usize = 64 * 1024;

type ProxySender = hyper::client::conn::http1::SendRequest<GwBody>;

/// A request body as the gateway's body type (to replay it to the proxy).
fn boxed(req: Request<Incoming>) -> Request<GwBody> {
    req.map(|b| b.map_err(|e| Box::new(e) as super::relay::BoxError).boxed())
}

/// One client connection to a declared proxy.
struct ProxyConn {
    /// The real proxy (the client's original destination).
    proxy: SocketAddr,
    peer: Option<SocketAddr>,
    client: ClientInfo,
    /// The connection to the real proxy, reused while it stays open.
    upstream: Mutex<Option<ProxySender>>,
}

impl Gateway {
    /// Accept loop for connections capture redirected from a declared proxy,
    /// until [`Gateway::shutdown`]. Connections without a capture record are
    /// closed when `lookup` is strict.
    pub async fn serve_proxy_listener(
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
                    std::time::Duration::from_secs(2),
                    tokio::task::spawn_blocking(move || lookup.lookup(peer, local)),
                )
                .await;
                let found = match found {
                    Ok(Ok(Some(f))) => f,
                    _ if strict => {
                        tracing::warn!(%peer, "connection to the proxy listener without a capture record: closed");
                        return;
                    }
                    _ => Captured {
                        original: local,
                        client: ClientInfo::default(),
                        provider_prefix: false,
                    },
                };
                // The per-uid budget, as on the capture listener.
                let Some(_uid_slot) = admit_uid(&gw.inner(), Arrival::Capture, peer, &found.client)
                else {
                    return;
                };
                gw.serve_proxied(stream, found, slot).await;
            }
        })
        .await
    }

    /// Serves one client connection to a declared proxy: its first request
    /// head is read and checked here, then hyper serves the connection
    /// (later heads get hyper's own checks: the same cap, a bare `400` or
    /// `431`, and a close after [`KEEPALIVE_HEAD_TIMEOUT`]).
    pub(crate) async fn serve_proxied(
        &self,
        mut stream: TcpStream,
        found: Captured,
        slot: Arc<Slot>,
    ) {
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ProxyConn {
            proxy: found.original,
            peer: stream.peer_addr().ok(),
            client: found.client,
            upstream: Mutex::new(None),
        });
        let mut head = Vec::new();
        let read = tokio::select! {
            r = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut head, MAX_HEADER_BYTES, Listener::Proxy)) => {
                r.unwrap_or_else(|_| HeadRead::Bad(BadHead::timeout(Listener::Proxy)))
            }
            () = slot.evicted() => {
                tracing::debug!("idle proxy client connection closed to make room for a new one");
                return;
            }
        };
        match read {
            HeadRead::Complete => {}
            HeadRead::Closed => {
                tracing::debug!("proxy client closed before a whole request head");
                return;
            }
            HeadRead::Bad(bad) => {
                self.refuse_request(&conn, &bad);
                bad.answer(&mut stream).await;
                return;
            }
        }
        let gw = self.clone();
        let svc_slot = Arc::clone(&slot);
        let svc_conn = Arc::clone(&conn);
        let svc = service_fn(move |req: Request<Incoming>| {
            let gw = gw.clone();
            let conn = Arc::clone(&svc_conn);
            let slot = Arc::clone(&svc_slot);
            async move { Ok::<_, std::convert::Infallible>(gw.proxy_request(req, conn, slot).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .preserve_header_case(true)
            .max_buf_size(MAX_HEADER_BYTES)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(KEEPALIVE_HEAD_TIMEOUT)
            .serve_connection(TokioIo::new(Prefixed::new(head, stream)), svc)
            .with_upgrades();
        tokio::select! {
            r = served => if let Err(e) = r {
                // A later head on the connection that hyper refused (400,
                // 431): the event says so. A timeout there is an idle
                // keep-alive connection closed, not a refusal.
                let refused = if e.is_parse_too_large() {
                    Some(BadHead::later(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "proxy-head-too-large"))
                } else if e.is_parse() {
                    Some(BadHead::later(StatusCode::BAD_REQUEST, "proxy-not-http"))
                } else {
                    None
                };
                match refused {
                    Some(bad) => self.refuse_request(&conn, &bad),
                    None => tracing::debug!(error = %e, "proxy client connection ended with an error"),
                }
            },
            () = slot.evicted() => {},
        }
    }

    /// Records a request refused on the proxy listener, as a `guard` block
    /// naming the authority (never a header).
    fn refuse_request(&self, conn: &ProxyConn, bad: &BadHead) {
        tracing::info!(
            target_addr = %bad.target,
            rule = bad.rule,
            status = bad.status.as_u16(),
            "proxy request refused"
        );
        let r = Refusal {
            arrival: Arrival::Capture,
            peer: conn.peer,
            client: conn.client.clone(),
            target: format!("{} (proxy {})", bad.target, conn.proxy),
            rule: bad.rule,
        };
        self.record_bad_head(r, "PROXY", bad);
    }

    async fn proxy_request(
        &self,
        req: Request<Incoming>,
        conn: Arc<ProxyConn>,
        slot: Arc<Slot>,
    ) -> Response<GwBody> {
        let connect = req.method() == Method::CONNECT;
        if !connect && req.method().as_str().eq_ignore_ascii_case("CONNECT") {
            // A proxy that reads methods without case would open a tunnel
            // kt never decided on.
            let bad = BadHead::bad_method(req.method(), Listener::Proxy);
            self.refuse_request(&conn, &bad);
            return bad.response();
        }
        if connect {
            // Every CONNECT on the connection, not only the first head.
            let authority = req
                .uri()
                .authority()
                .map_or("", http::uri::Authority::as_str);
            if let Err(bad) = check_connect_authority(authority, Listener::Proxy) {
                self.refuse_request(&conn, &bad);
                return bad.response();
            }
        }
        let absolute = matches!(req.uri().scheme_str(), Some("http" | "https"));
        let target = if connect {
            connect_target(req.uri())
        } else if !absolute {
            // Only CONNECT names a bare host:port (RFC 9112, 3.2): other
            // requests to a proxy carry an absolute URL.
            None
        } else {
            req.uri().host().map(|h| {
                let https = req.uri().scheme_str() == Some("https");
                (
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_ascii_lowercase(),
                    req.uri().port_u16().unwrap_or(if https { 443 } else { 80 }),
                )
            })
        };
        let Some((host, port)) = target else {
            let bad = BadHead::new(
                StatusCode::BAD_REQUEST,
                "proxy-no-target",
                "kt: a request to a proxy must name its target (CONNECT host:port or an absolute URL)".into(),
                "-".into(),
            );
            self.refuse_request(&conn, &bad);
            return bad.response();
        };
        // `api.openai.com.` is `api.openai.com`, `127.0.0.1.` an address:
        // decided as such (the request still goes on as sent).
        let host = host.trim_end_matches('.').to_string();
        let provider = self.inner().router.match_host(&host, Some(port)).is_some();
        if provider && connect {
            let in_flight = slot.begin();
            let gw = self.clone();
            tokio::spawn(async move {
                let upgraded = hyper::upgrade::on(req).await;
                // From here the tunnel is a captured connection: idle
                // (closable to make room) until its first request inside,
                // as on the capture listener, so silent tunnels cannot
                // hold the budget.
                drop(in_flight);
                match upgraded {
                    Ok(u) => {
                        gw.provider_tunnel(TokioIo::new(u), host, port, &conn, slot)
                            .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "proxy CONNECT upgrade failed"),
                }
            });
            return Response::new(handler::full(Bytes::new()));
        }
        let ip_literal = host.parse::<std::net::IpAddr>().is_ok();
        if connect && ip_literal && self.inner().config.capture.ports.contains(&port) {
            let mut req = req;
            let on_client = hyper::upgrade::on(&mut req);
            let (parts, _) = req.into_parts();
            let replay = Request::from_parts(parts, handler::full(Bytes::new()));
            let in_flight = slot.begin();
            let gw = self.clone();
            tokio::spawn(async move {
                let upgraded = on_client.await;
                // Idle until decided, as a provider tunnel.
                drop(in_flight);
                match upgraded {
                    Ok(u) => {
                        gw.hello_then_decide(TokioIo::new(u), replay, host, port, &conn, slot)
                            .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "proxy CONNECT upgrade failed"),
                }
            });
            return Response::new(handler::full(Bytes::new()));
        }
        if provider {
            self.refuse_connection(Refusal {
                arrival: Arrival::Capture,
                peer: conn.peer,
                client: conn.client.clone(),
                target: authority(&host, port),
                rule: "proxy-plain-http-provider",
            });
            return status_response(
                StatusCode::FORBIDDEN,
                &format!(
                    "kt: plain-HTTP request for provider host {host} through a proxy refused: its key would cross the network in clear text; use https://"
                ),
            );
        }
        self.forward_to_proxy(req, &conn, &slot, host, port, connect)
            .await
    }

    /// A provider CONNECT: decide by the hello inside, as for a captured
    /// connection.
    async fn provider_tunnel<IO>(
        &self,
        mut io: IO,
        host: String,
        port: u16,
        conn: &ProxyConn,
        slot: Arc<Slot>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf = Vec::new();
        let hello = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_client_hello(&mut io, &mut buf)) => r,
            () = slot.evicted() => {
                tracing::debug!("silent proxy tunnel closed to make room for a new connection");
                return;
            }
        };
        let mut target = authority(&host, port);
        let rule = match hello {
            Ok(Ok(Hello::Tls {
                sni: Some(sni),
                ech: false,
            })) if self.inner().router.match_host(&sni, Some(port)).is_some() => {
                let ctx = ConnCtx {
                    mode: Mode::Connect { host: sni, port },
                    peer: conn.peer,
                    client: conn.client.clone(),
                    explicit: None,
                };
                self.terminate(Prefixed::new(buf, io), ctx, slot).await;
                return;
            }
            Ok(Ok(Hello::Tls { ech: true, .. })) => "ech",
            Ok(Ok(Hello::Tls { sni: None, .. })) => "no-sni",
            Ok(Ok(Hello::Tls { sni: Some(sni), .. })) => {
                // The event names the other host.
                target = format!("{target} (sni {sni})");
                "non-provider-name"
            }
            Ok(Ok(Hello::Plain)) => "not-tls",
            Ok(Err(e)) => e.rule(),
            Err(_) => "hello-timeout",
        };
        self.refuse_connection(Refusal {
            arrival: Arrival::Capture,
            peer: conn.peer,
            client: conn.client.clone(),
            target,
            rule,
        });
        refuse_in_tunnel(&mut io, rule, &authority(&host, port)).await;
    }

    /// A CONNECT to an IP literal, already answered `200`: a provider name
    /// in the hello is kt's; anything else goes to the real proxy with the
    /// hello bytes after its `2xx`.
    async fn hello_then_decide<IO>(
        &self,
        mut io: IO,
        replay: Request<GwBody>,
        authority: String,
        port: u16,
        conn: &ProxyConn,
        slot: Arc<Slot>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf = Vec::new();
        let hello = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_client_hello(&mut io, &mut buf)) => r,
            () = slot.evicted() => {
                tracing::debug!("silent proxy tunnel closed to make room for a new connection");
                return;
            }
        };
        let router = &self.inner().router;
        let name = match &hello {
            Ok(Ok(Hello::Tls {
                sni: Some(sni),
                ech: false,
            })) if router.match_host(sni, Some(port)).is_some() => Some(sni.clone()),
            Ok(Ok(Hello::Tls { sni: None, .. })) if router.is_target_endpoint(&authority, port) => {
                Some(authority.clone())
            }
            _ => None,
        };
        if let Some(host) = name {
            let ctx = ConnCtx {
                mode: Mode::Connect { host, port },
                peer: conn.peer,
                client: conn.client.clone(),
                explicit: None,
            };
            self.terminate(Prefixed::new(buf, io), ctx, slot).await;
            return;
        }
        if let Ok(Err(e)) = &hello {
            tracing::debug!(error = %e, "no hello inside a CONNECT to an address; passed to the proxy");
        }
        // Passed to the proxy: busy for as long as the splice lives.
        let _in_flight = slot.begin();
        let mut rec = self.inner().guard_record(
            Arrival::Capture,
            conn.peer,
            conn.client.clone(),
            "CONNECT",
            PolicyAction::Audit,
            "proxy-forwarded",
        );
        rec.path = format!(
            "{} (proxy {})",
            self::authority(&authority, port),
            conn.proxy
        );
        let mut sender = match self.dial_proxy(conn.proxy).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(proxy = %conn.proxy, error = %e, "declared proxy unreachable");
                rec.error_code = Some(codes::SPLICE_FAILED);
                self.inner().sink.record(rec);
                return;
            }
        };
        let resp = match sender.send_request(replay).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(proxy = %conn.proxy, error = %e, "declared proxy failed the request");
                rec.error_code = Some(codes::SPLICE_FAILED);
                self.inner().sink.record(rec);
                return;
            }
        };
        rec.status = resp.status().as_u16();
        self.inner().sink.record(rec);
        if !resp.status().is_success() {
            // The client was told 200 already: all it can get is a close.
            let _ = io.shutdown().await;
            return;
        }
        let Ok(up) = hyper::upgrade::on(resp).await else {
            return;
        };
        let mut up = TokioIo::new(up);
        if up.write_all(&buf).await.is_err() {
            return;
        }
        splice_with_idle(io, up, self.inner().config.gateway.idle_timeout).await;
    }

    /// Replays a non-provider request to the real proxy and passes its
    /// answer back; a `2xx` answer to CONNECT splices both sides.
    async fn forward_to_proxy(
        &self,
        req: Request<Incoming>,
        conn: &Arc<ProxyConn>,
        slot: &Arc<Slot>,
        host: String,
        port: u16,
        connect: bool,
    ) -> Response<GwBody> {
        let gw = &self.inner().config.gateway;
        let mut guard = conn.upstream.lock().await;
        if guard.as_ref().is_some_and(ProxySender::is_closed) {
            *guard = None;
        }
        let mut sender = match guard.take() {
            Some(s) => s,
            None => match self.dial_proxy(conn.proxy).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(proxy = %conn.proxy, error = %e, "declared proxy unreachable");
                    return status_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("kt: the proxy {} is unreachable", conn.proxy),
                    );
                }
            },
        };
        if sender.ready().await.is_err() {
            return status_response(
                StatusCode::BAD_GATEWAY,
                "kt: the proxy closed the connection",
            );
        }
        let mut rec = self.inner().guard_record(
            Arrival::Capture,
            conn.peer,
            conn.client.clone(),
            if connect { "CONNECT" } else { "HTTP" },
            PolicyAction::Audit,
            "proxy-forwarded",
        );
        rec.path = format!("{} (proxy {})", authority(&host, port), conn.proxy);
        let mut client_req = req;
        let on_client = connect.then(|| hyper::upgrade::on(&mut client_req));
        let client_req = boxed(client_req);
        let mut resp = match sender.send_request(client_req).await {
            Ok(r) => r,
            Err(e) => {
                rec.error_code = Some(codes::SPLICE_FAILED);
                self.inner().sink.record(rec);
                tracing::info!(proxy = %conn.proxy, error = %e, "declared proxy failed the request");
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    "kt: the proxy failed the request",
                );
            }
        };
        rec.status = resp.status().as_u16();
        self.inner().sink.record(rec);
        let status = resp.status();
        if connect && status.is_success() {
            // The proxy's tunnel is up: splice it to the client's. It
            // keeps its connection's slot in the budget while it lives.
            let idle = gw.idle_timeout;
            let on_proxy = hyper::upgrade::on(&mut resp);
            let (parts, _) = resp.into_parts();
            let in_flight = slot.begin();
            tokio::spawn(async move {
                let _in_flight = in_flight;
                let (Some(on_client), Ok(up)) = (on_client, on_proxy.await) else {
                    return;
                };
                if let Ok(down) = on_client.await {
                    splice_with_idle(TokioIo::new(down), TokioIo::new(up), idle).await;
                }
            });
            return Response::from_parts(parts, handler::full(Bytes::new()));
        }
        // Kept for the client's next request (a 407 challenge is answered on
        // the same connection by connection-bound schemes).
        *guard = Some(sender);
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, MAX_PROXY_BODY)
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        Response::from_parts(parts, handler::full(body))
    }

    /// A connection to the real proxy, exempted from capture (it is the
    /// address capture sends to kt).
    async fn dial_proxy(&self, proxy: SocketAddr) -> Result<ProxySender, String> {
        let timeout = self.inner().config.gateway.connect_timeout;
        let tcp = tokio::time::timeout(
            timeout,
            super::connect_tcp(
                &proxy.ip().to_string(),
                proxy.port(),
                &*self.inner().exemption,
            ),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "proxy connection ended with an error");
            }
        });
        Ok(sender)
    }
}

fn status_response(status: StatusCode, msg: &str) -> Response<GwBody> {
    let body = provider::error_body(None, status, codes::NOT_A_PROVIDER, msg, &[]);
    let mut r = Response::new(handler::full(body));
    *r.status_mut() = status;
    r
}
