//! A fake AI provider on loopback, over TLS from its own test CA, shaped like
//! OpenAI (`/v1/chat/completions`, JSON and `stream: true` SSE) and
//! Anthropic (`/v1/messages`). A switch decides how it misbehaves; every
//! request it receives is recorded for assertions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

/// A throwaway CA for fake upstreams (distinct from the gateway's CA).
pub struct TestCa {
    /// CA certificate, PEM.
    pub pem: String,
    /// CA certificate, DER.
    pub der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// Makes a new CA.
    pub fn new() -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "fake provider test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A rustls server config for 127.0.0.1 / localhost, offering h2 and http/1.1.
    pub fn server_config(&self) -> rustls::ServerConfig {
        self.server_config_for("127.0.0.1".parse().unwrap())
    }

    /// As [`TestCa::server_config`], valid for `ip` too.
    pub fn server_config_for(&self, ip: std::net::IpAddr) -> rustls::ServerConfig {
        self.server_config_named(ip, &[])
    }

    /// As [`TestCa::server_config_for`], valid for the DNS `names` too.
    pub fn server_config_named(
        &self,
        ip: std::net::IpAddr,
        names: &[&str],
    ) -> rustls::ServerConfig {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut all = vec!["localhost".to_string()];
        all.extend(names.iter().map(ToString::to_string));
        let mut params = CertificateParams::new(all).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        if ip != std::net::IpAddr::from([127, 0, 0, 1]) {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        cfg
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// How the fake answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Behavior {
    /// A normal answer (JSON, or SSE when the request asks `stream: true`).
    Ok,
    /// This status with a provider-shaped error body.
    Status(u16),
    /// 429 with `Retry-After: secs`.
    RateLimited(u64),
    /// Accept the TCP connection, then close it without a word.
    Close,
    /// Hold the response headers until [`FakeProvider::release`].
    SlowFirstByte,
    /// Send headers and the first chunk, then break the connection.
    CutMidStream,
    /// Send headers and the first chunk, then wait for
    /// [`FakeProvider::release`] before sending the rest.
    Gated,
    /// A normal answer sent whole, with a `Content-Length`.
    Sized,
    /// A normal answer whose headers leave after this many milliseconds
    /// (injected latency, a slow first byte without a gate).
    Delay(u64),
    /// An event stream of `chunks` deltas, `every_ms` apart, then its
    /// proper end (a long stream when there are many); a JSON answer for
    /// a request without `stream: true`.
    Drip {
        /// Deltas before the end.
        chunks: u32,
        /// Milliseconds between two deltas.
        every_ms: u64,
    },
}

impl Behavior {
    /// Parses `ok`, `sized`, `close`, `cut`, `gated`, `slow`, an HTTP
    /// status (`503`), `ratelimit:SECS`, `delay:MS` or `drip:CHUNKS:MS`.
    pub fn parse(s: &str) -> Result<Behavior, String> {
        let bad = || format!("bad behavior {s:?}");
        let num = |v: &str| v.parse::<u64>().map_err(|_| bad());
        let mut parts = s.split(':');
        let head = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        Ok(match (head, rest.as_slice()) {
            ("ok", []) => Behavior::Ok,
            ("sized", []) => Behavior::Sized,
            ("close", []) => Behavior::Close,
            ("cut", []) => Behavior::CutMidStream,
            ("gated", []) => Behavior::Gated,
            ("slow", []) => Behavior::SlowFirstByte,
            ("ratelimit", [secs]) => Behavior::RateLimited(num(secs)?),
            ("delay", [ms]) => Behavior::Delay(num(ms)?),
            ("drip", [n, ms]) => Behavior::Drip {
                chunks: u32::try_from(num(n)?).map_err(|_| bad())?,
                every_ms: num(ms)?,
            },
            (status, []) => Behavior::Status(
                status
                    .parse()
                    .ok()
                    .filter(|s| (100..600).contains(s))
                    .ok_or_else(bad)?,
            ),
            _ => return Err(bad()),
        })
    }
}

/// A request header that overrides the behaviour of the fake named NAME
/// for this one request: `x-fake-NAME: BEHAVIOR` (see [`Behavior::parse`]).
/// It goes through kt like any other header, so one client can steer each
/// target of a fallback chain on its own.
pub const OVERRIDE_PREFIX: &str = "x-fake-";

/// A request header whose value keys the fake's own handling time (see
/// [`FakeProvider::take_timing`]).
pub const TIMING_HEADER: &str = "x-soak-id";

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// The address the connection came from.
    pub peer: SocketAddr,
}

struct State {
    /// Simulated round-trip time (benchmarks): new connections pay two
    /// (TCP and TLS handshakes), every request one.
    rtt_ms: std::sync::atomic::AtomicU64,
    name: String,
    behavior: Mutex<Behavior>,
    requests: Mutex<Vec<Recorded>>,
    gate: Semaphore,
    sent_last: std::sync::atomic::AtomicBool,
    /// Whether requests are kept for [`FakeProvider::requests`] (a long soak
    /// turns it off and looks at the counters below instead).
    keep: std::sync::atomic::AtomicBool,
    /// How long the fake itself took to answer, by [`TIMING_HEADER`].
    timings: Mutex<std::collections::HashMap<String, Duration>>,
    /// Requests per credential header value (`authorization` or
    /// `x-api-key`; "" when there was none).
    keys: Mutex<std::collections::HashMap<String, u64>>,
    /// Text that must never arrive, and how often it did.
    needle: Mutex<Option<String>>,
    sightings: std::sync::atomic::AtomicU64,
    /// The whole body of the last answer, as sent (streams included).
    last_body: Mutex<Vec<u8>>,
}

/// A running fake provider. Stops when dropped.
pub struct FakeProvider {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port where nothing listens (connections are refused).
pub async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

type FakeBody = BoxBody<Bytes, std::io::Error>;

impl FakeProvider {
    /// Starts a fake named `name` (it says its name in every answer).
    pub async fn start(ca: &TestCa, name: &str, behavior: Behavior) -> FakeProvider {
        FakeProvider::start_at(ca, name, behavior, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a fake on a given loopback address (its certificate covers it).
    pub async fn start_at(
        ca: &TestCa,
        name: &str,
        behavior: Behavior,
        bind: SocketAddr,
    ) -> FakeProvider {
        FakeProvider::start_named(ca, name, behavior, bind, &[]).await
    }

    /// As [`FakeProvider::start_at`], its certificate valid for the DNS
    /// `names` too (a non-provider site: any HTTPS server).
    pub async fn start_named(
        ca: &TestCa,
        name: &str,
        behavior: Behavior,
        bind: SocketAddr,
        names: &[&str],
    ) -> FakeProvider {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            rtt_ms: std::sync::atomic::AtomicU64::new(0),
            name: name.to_string(),
            behavior: Mutex::new(behavior),
            requests: Mutex::new(Vec::new()),
            gate: Semaphore::new(0),
            sent_last: std::sync::atomic::AtomicBool::new(false),
            keep: std::sync::atomic::AtomicBool::new(true),
            timings: Mutex::default(),
            keys: Mutex::default(),
            needle: Mutex::new(None),
            sightings: std::sync::atomic::AtomicU64::new(0),
            last_body: Mutex::default(),
        });
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config_named(addr.ip(), names)));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let rtt = st.rtt_ms.load(std::sync::atomic::Ordering::Relaxed);
                    if rtt > 0 {
                        tokio::time::sleep(Duration::from_millis(2 * rtt)).await;
                    }
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(answer(st, req, peer).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        FakeProvider { addr, state, task }
    }

    /// `https://127.0.0.1:PORT/v1` (an OpenAI-style base URL), or the
    /// address it was started at.
    pub fn openai_base_url(&self) -> String {
        format!("https://{}/v1", self.addr)
    }

    /// `https://127.0.0.1:PORT` (an Anthropic-style base URL).
    pub fn anthropic_base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Simulates a round-trip time to this provider (see `State::rtt_ms`).
    pub fn set_rtt(&self, rtt: Duration) {
        self.state
            .rtt_ms
            .store(rtt.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes the behaviour for the next requests.
    pub fn set_behavior(&self, b: Behavior) {
        *self.state.behavior.lock().unwrap() = b;
    }

    /// Lets one gated or slow response go on.
    pub fn release(&self) {
        self.state.gate.add_permits(1);
    }

    /// Whether a gated stream has sent its last chunk.
    pub fn sent_last(&self) -> bool {
        self.state
            .sent_last
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Stops keeping requests for [`FakeProvider::requests`] (the counters
    /// still count).
    pub fn stop_recording(&self) {
        self.state
            .keep
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The fake's own time for the request that carried [`TIMING_HEADER`]
    /// `id`: from its head arriving to the answer's headers leaving (for
    /// a JSON answer the whole body is ready then). Taken once.
    pub fn take_timing(&self, id: &str) -> Option<Duration> {
        self.state.timings.lock().unwrap().remove(id)
    }

    /// Requests per credential value received (`""`: none).
    pub fn keys_seen(&self) -> std::collections::HashMap<String, u64> {
        self.state.keys.lock().unwrap().clone()
    }

    /// Counts requests whose body contains `needle` from now on.
    pub fn watch_for(&self, needle: &str) {
        *self.state.needle.lock().unwrap() = Some(needle.to_string());
    }

    /// The whole body of the last normal answer, byte for byte as the fake
    /// sent it (an event stream's frames included).
    pub fn last_body(&self) -> Vec<u8> {
        self.state.last_body.lock().unwrap().clone()
    }

    /// Requests whose body contained the needle of [`FakeProvider::watch_for`].
    pub fn sightings(&self) -> u64 {
        self.state
            .sightings
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn full(b: impl Into<Bytes>) -> FakeBody {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body fed from a channel, so a task can write chunks (or an error) later.
struct ChanBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

async fn answer(st: Arc<State>, req: Request<Incoming>, peer: SocketAddr) -> Response<FakeBody> {
    let started = std::time::Instant::now();
    let timing = req
        .headers()
        .get(TIMING_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = answer_inner(st.clone(), req, peer).await;
    if let Some(id) = timing {
        st.timings.lock().unwrap().insert(id, started.elapsed());
    }
    resp
}

async fn answer_inner(
    st: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<FakeBody> {
    let rtt = st.rtt_ms.load(std::sync::atomic::Ordering::Relaxed);
    if rtt > 0 {
        tokio::time::sleep(Duration::from_millis(rtt)).await;
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let key = parts
        .headers
        .get("authorization")
        .or_else(|| parts.headers.get("x-api-key"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    *st.keys.lock().unwrap().entry(key).or_default() += 1;
    if let Some(n) = st.needle.lock().unwrap().as_deref()
        && String::from_utf8_lossy(&body).contains(n)
    {
        st.sightings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if st.keep.load(std::sync::atomic::Ordering::Relaxed) {
        st.requests.lock().unwrap().push(Recorded {
            method: parts.method.to_string(),
            path: path.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
            peer,
        });
    }
    let overridden = parts
        .headers
        .get(format!("{OVERRIDE_PREFIX}{}", st.name))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Behavior::parse(v).ok());
    let behavior = overridden.unwrap_or_else(|| st.behavior.lock().unwrap().clone());
    let anthropic = path.starts_with("/v1/messages");
    let route = path.split('?').next().unwrap_or_default();
    // Gemini's native streaming method, and Bedrock's streaming operations
    // (AWS event-stream frames, not SSE).
    let gemini_stream = route.ends_with(":streamGenerateContent");
    let bedrock_stream =
        route.ends_with("/converse-stream") || route.ends_with("/invoke-with-response-stream");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let stream = json["stream"].as_bool().unwrap_or(false) || gemini_stream || bedrock_stream;
    let model = json["model"].as_str().unwrap_or("none").to_string();
    let error = |status: u16, retry: Option<u64>| {
        let mut r = Response::new(full(
            serde_json::json!({"error": {"message": format!("fake {} says {status}", st.name), "type": "fake"}}).to_string(),
        ));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(s) = retry {
            r.headers_mut().insert("retry-after", s.into());
        }
        r
    };
    match behavior {
        Behavior::Status(s) => return error(s, None),
        Behavior::RateLimited(secs) => return error(429, Some(secs)),
        Behavior::Close => {
            // An error body before any frame makes hyper drop the connection.
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Err(std::io::Error::other("closed by fake")));
            return Response::new(ChanBody(rx).boxed());
        }
        Behavior::SlowFirstByte => {
            let _ = st
                .gate
                .acquire()
                .await
                .map(tokio::sync::SemaphorePermit::forget);
        }
        Behavior::Delay(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        _ => {}
    }
    let mut chunks: Vec<Vec<u8>> = if bedrock_stream {
        [
            // Each payload is the event's member shape, named by the
            // `:event-type` header (as botocore's ConverseStream parses it).
            r#"{"role":"assistant"}"#.to_string(),
            format!(
                r#"{{"delta":{{"text":"hello from {}"}},"contentBlockIndex":0}}"#,
                st.name
            ),
            r#"{"stopReason":"end_turn"}"#.to_string(),
        ]
        .iter()
        .zip(["messageStart", "contentBlockDelta", "messageStop"])
        .map(|(payload, event)| event_stream_frame(event, payload.as_bytes()))
        .collect()
    } else if stream && route.ends_with("/v2/chat") {
        // Cohere's v2 stream: SSE events typed in their JSON.
        [
            r#"{"type":"message-start","id":"fake","delta":{"message":{"role":"assistant"}}}"#
                .to_string(),
            format!(
                r#"{{"type":"content-delta","index":0,"delta":{{"message":{{"content":{{"text":"hello from {}"}}}}}}}}"#,
                st.name
            ),
            r#"{"type":"message-end","delta":{"finish_reason":"COMPLETE"}}"#.to_string(),
        ]
        .iter()
        .map(|d| {
            let event = serde_json::from_str::<serde_json::Value>(d).unwrap_or_default()["type"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            format!("event: {event}\ndata: {d}\n\n").into_bytes()
        })
        .collect()
    } else if gemini_stream {
        vec![
            b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"hello \"}],\"role\":\"model\"}}]}\r\n\r\n".to_vec(),
            format!(
                "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"from {}\"}}],\"role\":\"model\"}},\"finishReason\":\"STOP\"}}]}}\r\n\r\n",
                st.name
            )
            .into_bytes(),
        ]
    } else if stream {
        let v: Vec<String> = if anthropic {
            vec![
                format!(
                    "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"model\":\"{model}\"}}}}\n\n"
                ),
                format!(
                    "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"type\":\"text_delta\",\"text\":\"hello from {}\"}}}}\n\n",
                    st.name
                ),
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string(),
            ]
        } else {
            // The fields strict SDKs (mistralai's models) require of a
            // chunk: id, model, choices[index, delta, finish_reason].
            let head = format!(
                "\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\""
            );
            vec![
                format!(
                    "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"hello \"}},\"finish_reason\":null}}]}}\n\n"
                ),
                format!(
                    "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"from {}\"}},\"finish_reason\":\"stop\"}}]}}\n\n",
                    st.name
                ),
                "data: [DONE]\n\n".to_string(),
            ]
        };
        v.into_iter().map(String::into_bytes).collect()
    } else {
        let text = format!("hello from {}", st.name);
        let v = if anthropic {
            serde_json::json!({"type":"message","model":model,"content":[{"type":"text","text":text}]})
        } else if route.ends_with(":generateContent") {
            // Gemini's GenerateContentResponse.
            serde_json::json!({"candidates":[{"content":{"parts":[{"text":text}],"role":"model"},"finishReason":"STOP","index":0}],"modelVersion":"fake"})
        } else if route.ends_with("/v2/chat") {
            // Cohere's v2 ChatResponse.
            serde_json::json!({"id":"fake","finish_reason":"COMPLETE","message":{"role":"assistant","content":[{"type":"text","text":text}]},"usage":{"tokens":{"input_tokens":1,"output_tokens":3}}})
        } else if route.ends_with("/converse") {
            // Bedrock's ConverseResponse.
            serde_json::json!({"output":{"message":{"role":"assistant","content":[{"text":text}]}},"stopReason":"end_turn","usage":{"inputTokens":1,"outputTokens":3,"totalTokens":4}})
        } else {
            // With the fields strict SDKs require (mistralai: id, created,
            // usage, choices[index, finish_reason]).
            serde_json::json!({"id":"chatcmpl-fake","object":"chat.completion","created":1,"model":model,"choices":[{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}})
        };
        // Split the JSON in two so cut/gated behaviours have a middle.
        let s = v.to_string();
        let mid = s.len() / 2;
        vec![s.as_bytes()[..mid].to_vec(), s.as_bytes()[mid..].to_vec()]
    };
    let content_type = if bedrock_stream {
        "application/vnd.amazon.eventstream"
    } else if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut every = Duration::ZERO;
    if let (
        Behavior::Drip {
            chunks: n,
            every_ms,
        },
        true,
    ) = (&behavior, stream)
    {
        // The first chunk (the start), `n` deltas, then the proper end.
        let delta = chunks[1].clone();
        let end = chunks[chunks.len() - 1].clone();
        chunks.truncate(1);
        chunks.extend(std::iter::repeat_n(delta, *n as usize));
        chunks.push(end);
        every = Duration::from_millis(*every_ms);
    }
    *st.last_body.lock().unwrap() = chunks.concat();
    if behavior == Behavior::Sized {
        let mut r = Response::new(full(chunks.concat()));
        r.headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        return r;
    }
    let (tx, rx) = mpsc::channel(8);
    let st2 = st.clone();
    tokio::spawn(async move {
        let _ = tx.send(Ok(Bytes::from(chunks[0].clone()))).await;
        match behavior {
            Behavior::CutMidStream => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(Err(std::io::Error::other("cut by fake"))).await;
                return;
            }
            Behavior::Gated => {
                let _ = st2
                    .gate
                    .acquire()
                    .await
                    .map(tokio::sync::SemaphorePermit::forget);
            }
            _ => {}
        }
        for c in &chunks[1..] {
            if !every.is_zero() {
                tokio::time::sleep(every).await;
            }
            if tx.send(Ok(Bytes::from(c.clone()))).await.is_err() {
                // The reader went away (kt relayed a client's close).
                return;
            }
        }
        st2.sent_last
            .store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mut r = Response::new(ChanBody(rx).boxed());
    r.headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    r
}

/// CRC-32 (IEEE), as AWS event-stream frames carry it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One AWS event-stream message (`vnd.amazon.eventstream`): prelude (total
/// and header lengths, their CRC), string headers `:event-type`,
/// `:content-type`, `:message-type`, the payload, the message CRC.
pub fn event_stream_frame(event: &str, payload: &[u8]) -> Vec<u8> {
    let mut headers = Vec::new();
    for (name, value) in [
        (":event-type", event),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ] {
        headers.push(name.len() as u8);
        headers.extend_from_slice(name.as_bytes());
        headers.push(7); // string
        headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
        headers.extend_from_slice(value.as_bytes());
    }
    let total = 12 + headers.len() + payload.len() + 4;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    let prelude_crc = crc32(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(payload);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Splits AWS event-stream bytes into `(event type, payload)` messages,
/// checking both CRCs of each; `Err` names what is wrong.
pub fn parse_event_stream(mut b: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let be = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 16 {
            return Err(format!("{} trailing bytes", b.len()));
        }
        let total = be(&b[0..4]) as usize;
        let hlen = be(&b[4..8]) as usize;
        if total > b.len() || total < 16 + hlen {
            return Err(format!("frame of {total} bytes, {} left", b.len()));
        }
        if crc32(&b[..8]) != be(&b[8..12]) {
            return Err("prelude crc".into());
        }
        if crc32(&b[..total - 4]) != be(&b[total - 4..total]) {
            return Err("message crc".into());
        }
        let mut h = &b[12..12 + hlen];
        let mut event = String::new();
        while !h.is_empty() {
            let n = h[0] as usize;
            let name = String::from_utf8_lossy(&h[1..1 + n]).to_string();
            let len = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
            let value = String::from_utf8_lossy(&h[4 + n..4 + n + len]).to_string();
            if name == ":event-type" {
                event = value;
            }
            h = &h[4 + n + len..];
        }
        out.push((event, b[12 + hlen..total - 4].to_vec()));
        b = &b[total..];
    }
    Ok(out)
}
