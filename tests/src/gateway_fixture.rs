//! Fixtures for the gateway suites and bench: hand-built configs, a
//! map-backed secret resolver, a running gateway on loopback, and clients
//! for base-URL, CONNECT and captured (TLS) modes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use guard::ca::Ca;
use guard::config::{
    Capture, Config, GatewaySettings as GatewaySection, Pack, Provider, Providers, RoutingStrategy,
    SecretKeyRef, Target,
};
use guard::gateway::{CaptureLookup, Captured, Gateway, GatewayBuilder};
use guard::record::{ClientInfo, MemorySink};
use guard::secrets::{Resolve, Resolved, SecretValue, Source};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fake_provider::TestCa;

/// Resolves `secret_key_ref`s from a map (name → value).
#[derive(Default)]
pub struct MapResolver(pub HashMap<String, String>);

impl MapResolver {
    /// From pairs.
    pub fn of(pairs: &[(&str, &str)]) -> MapResolver {
        MapResolver(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl Resolve for MapResolver {
    fn resolve(&self, reference: &SecretKeyRef) -> Result<Option<Resolved>, String> {
        Ok(self.0.get(&*reference.name()).map(|v| Resolved {
            value: SecretValue::new(v.clone()),
            source: Source::Store,
        }))
    }
}

/// A target.
pub fn target(id: &str, provider: Provider, base_url: &str, secret: &str) -> Target {
    Target {
        id: id.into(),
        provider,
        model: None,
        required: true,
        secret_key_ref: SecretKeyRef::Store(secret.into()),
        base_url: Some(base_url.into()),
    }
}

/// A config with these targets, fallback on, short timeouts for tests.
pub fn config(targets: Vec<Target>) -> Config {
    Config {
        source: "test.yaml".into(),
        pack: Pack {
            name: "test".into(),
            version: "1".into(),
            enabled: true,
        },
        providers: Providers {
            strategy: RoutingStrategy::Ordered,
            fallback: true,
            targets,
        },
        chain: vec![],
        dlp: None,
        audit: None,
        gateway: GatewaySection {
            listen: "127.0.0.1:0".parse().unwrap(),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            ..GatewaySection::default()
        },
        capture: Capture::default(),
        secrets: Default::default(),
    }
}

/// A gateway serving on a loopback port.
pub struct Running {
    /// The gateway.
    pub gw: Gateway,
    /// Explicit listener address.
    pub addr: SocketAddr,
    /// Decisions recorded.
    pub sink: Arc<MemorySink>,
    /// The gateway's CA (clients trust it).
    pub ca: Arc<Ca>,
    /// The serve task; finishes after shutdown.
    pub task: tokio::task::JoinHandle<()>,
}

/// Builds and starts a gateway trusting `upstream_ca` for upstreams.
pub async fn start(config: Config, resolver: MapResolver, upstream_ca: &TestCa) -> Running {
    let ca = Arc::new(Ca::ephemeral().unwrap());
    let sink = Arc::new(MemorySink::new());
    let gw = builder(config, resolver, ca.clone(), upstream_ca)
        .record_sink(sink.clone())
        .build()
        .unwrap();
    serve(gw, ca, sink).await
}

/// A builder with test defaults (no system roots, the fake CA as extra root).
pub fn builder(
    config: Config,
    resolver: MapResolver,
    ca: Arc<Ca>,
    upstream_ca: &TestCa,
) -> GatewayBuilder {
    GatewayBuilder::new(Arc::new(config), Arc::new(resolver), ca)
        .system_roots(false)
        .extra_root(upstream_ca.der.clone())
        .shutdown_grace(Duration::from_secs(10))
}

/// Serves an already-built gateway on a loopback port.
pub async fn serve(gw: Gateway, ca: Arc<Ca>, sink: Arc<MemorySink>) -> Running {
    let listener = gw.bind(None).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let g = gw.clone();
    let task = tokio::spawn(async move {
        g.serve_explicit(listener).await.unwrap();
    });
    Running {
        gw,
        addr,
        sink,
        ca,
        task,
    }
}

/// A capture lookup that reports one fixed original destination, inside
/// the provider prefixes.
pub struct FixedLookup(pub SocketAddr, pub ClientInfo);

impl CaptureLookup for FixedLookup {
    fn lookup(&self, _peer: SocketAddr, _local: SocketAddr) -> Option<Captured> {
        Some(Captured {
            original: self.0,
            client: self.1.clone(),
            provider_prefix: true,
        })
    }
}

/// Starts the capture listener of `gw` on a loopback port.
pub async fn start_capture(gw: &Gateway, lookup: Arc<dyn CaptureLookup>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let g = gw.clone();
    tokio::spawn(async move { g.serve_capture_listener(l, lookup).await });
    addr
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body text.
    pub body: String,
}

/// An HTTP/1.1 connection over plain TCP.
pub async fn h1_plain(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    handshake(TokioIo::new(tcp)).await
}

async fn handshake<I>(io: I) -> SendRequest<Full<Bytes>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    send
}

/// A rustls client config trusting only `ca`.
pub fn client_tls(ca: &CertificateDer<'static>, alpn_h2: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = if alpn_h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Arc::new(cfg)
}

/// An HTTP/1.1 connection over TLS to `addr`, verifying `name` against `ca`.
pub async fn h1_tls(
    addr: SocketAddr,
    name: &str,
    ca: &CertificateDer<'static>,
) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(ca, false))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    handshake(TokioIo::new(tls)).await
}

/// Proxy mode: `CONNECT host:port` through the gateway, then TLS to the
/// gateway's leaf for `host`, then HTTP/1.1. Returns the CONNECT status
/// line's code and, on 200, the connection.
pub async fn via_connect(
    gw: SocketAddr,
    host: &str,
    port: u16,
    ca: &CertificateDer<'static>,
) -> (u16, Option<SendRequest<Full<Bytes>>>) {
    let mut tcp = TcpStream::connect(gw).await.unwrap();
    tcp.write_all(
        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        return (status, None);
    }
    let tls = tokio_rustls::TlsConnector::from(client_tls(ca, false))
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    (status, Some(handshake(TokioIo::new(tls)).await))
}

/// A POST request with a JSON body and extra headers.
pub fn post(uri: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut b = Request::post(uri).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

/// Sends and reads the whole answer.
pub async fn send(conn: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Answer {
    conn.ready().await.unwrap();
    let resp = conn.send_request(req).await.unwrap();
    read(resp).await
}

/// Reads a response whole (panics when the body errors).
pub async fn read(resp: http::Response<Incoming>) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

/// The OpenAI chat body used in the suites.
pub fn chat_body(stream: bool) -> String {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string()
}
