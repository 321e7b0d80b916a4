//! Gateway end to end, on loopback only, against the fake TLS provider.

use std::sync::Arc;
use std::time::Duration;

use guard::ca::Ca;
use guard::config::{Provider, Target};
use guard::events::{EventSink, EventStore, EventWriter, Filter, StreamEnd, WriterConfig};
use guard::gateway::GatewayError;
use guard::policy::{Policy, PolicyRequest, PolicyVerdict, Refusal};
use guard::record::{
    Arrival, ClientInfo, CutReason, MemorySink, Outcome, PolicyAction, PolicyId, PolicyNote,
};
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa, refused_addr};
use guard_tests::gateway_fixture::*;
use guard_tests::raw_client::refusals as guard_refusals;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_KEY: &str = "sk-proj-CLIENTKEY-hardcoded-in-ci-0001";
const CLIENT_ANT_KEY: &str = "sk-ant-api03-CLIENTKEY-hardcoded-0002";
const MANAGED_OA: &str = "sk-managed-openai-MANAGEDVALUE-1111";
const MANAGED_OA2: &str = "sk-managed-openai-second-MANAGED-2222";
const MANAGED_ANT: &str = "sk-ant-managed-MANAGEDVALUE-3333";

fn secrets() -> MapResolver {
    MapResolver::of(&[
        ("OA1", MANAGED_OA),
        ("OA2", MANAGED_OA2),
        ("ANT", MANAGED_ANT),
    ])
}

fn oa(id: &str, fake: &FakeProvider, secret: &str) -> Target {
    target(id, Provider::OpenAi, &fake.openai_base_url(), secret)
}

fn oa_at(id: &str, base: &str, secret: &str) -> Target {
    target(id, Provider::OpenAi, base, secret)
}

fn header<'a>(r: &'a guard_tests::fake_provider::Recorded, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

fn all_header_text(r: &guard_tests::fake_provider::Recorded) -> String {
    r.headers
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect::<String>()
        + &r.path
}

/// Reads a response body to its end: the text, and whether it ended
/// cleanly (false when the body failed, e.g. an aborted stream).
async fn read_body(resp: http::Response<hyper::body::Incoming>) -> (String, bool) {
    let mut body = resp.into_body();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    text.push_str(&String::from_utf8_lossy(d));
                }
            }
            Err(_) => return (text, false),
        }
    }
    (text, true)
}

#[tokio::test]
async fn openai_client_key_is_replaced_by_managed_key() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            &format!("/openai/v1/chat/completions?key={CLIENT_KEY}&x=1"),
            &[
                ("authorization", &format!("Bearer {CLIENT_KEY}")),
                ("x-api-key", CLIENT_KEY),
                ("api-key", CLIENT_KEY),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("hello from first"));
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/chat/completions?x=1");
    assert_eq!(
        header(r, "authorization"),
        Some(&*format!("Bearer {MANAGED_OA}"))
    );
    assert!(header(r, "x-api-key").is_none());
    assert!(header(r, "api-key").is_none());
    assert!(header(r, "proxy-authorization").is_none());
    assert!(!all_header_text(r).contains("CLIENTKEY"));
    assert!(!String::from_utf8_lossy(&r.body).contains("CLIENTKEY"));
    let d = gw.sink.snapshot();
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].client_key_fingerprint.as_deref(),
        Some(&*guard::record::default_fingerprint(CLIENT_KEY))
    );
    assert_eq!(d[0].chosen.as_deref(), Some("oa1"));
}

#[tokio::test]
async fn anthropic_gets_x_api_key_style() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "claude", Behavior::Ok).await;
    let t = target("ant", Provider::Anthropic, &up.anthropic_base_url(), "ANT");
    let gw = start(config(vec![t]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let body = r#"{"model":"claude-3-5-haiku","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let a = send(
        &mut c,
        post(
            "/anthropic/v1/messages",
            &[
                ("x-api-key", CLIENT_ANT_KEY),
                ("anthropic-version", "2023-06-01"),
            ],
            body,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = &up.requests()[0];
    assert_eq!(r.path, "/v1/messages");
    assert_eq!(header(r, "x-api-key"), Some(MANAGED_ANT));
    assert!(header(r, "authorization").is_none());
    assert_eq!(header(r, "anthropic-version"), Some("2023-06-01"));
    assert!(!all_header_text(r).contains("CLIENTKEY"));
}

#[tokio::test]
async fn target_model_overrides_the_clients_model() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let mut t = oa("oa1", &up, "OA1");
    t.model = Some("gpt-4.1-nano".into());
    let gw = start(config(vec![t]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200);
    let sent: serde_json::Value = serde_json::from_slice(&up.requests()[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-4.1-nano");
    assert_eq!(sent["messages"][0]["content"], "hi");
}

/// First target misbehaves as given; the second answers.
async fn falls_back(first: Behavior, first_byte_timeout: Option<Duration>) {
    let ca = TestCa::new();
    let bad = FakeProvider::start(&ca, "first", first.clone()).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let first_base = if first == Behavior::Close {
        // "Refuse": nothing listens there at all.
        format!("https://{}/v1", refused_addr().await)
    } else {
        bad.openai_base_url()
    };
    let mut cfg = config(vec![
        oa_at("oa1", &first_base, "OA1"),
        oa("oa2", &good, "OA2"),
    ]);
    if let Some(t) = first_byte_timeout {
        cfg.gateway.first_byte_timeout = t;
    }
    let gw = start(cfg, secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{first:?}: {}", a.body);
    assert!(
        a.body.contains("hello from second"),
        "{first:?}: {}",
        a.body
    );
    let g = good.requests();
    assert_eq!(g.len(), 1);
    assert_eq!(
        header(&g[0], "authorization"),
        Some(&*format!("Bearer {MANAGED_OA2}"))
    );
    let d = gw.sink.snapshot();
    assert_eq!(d[0].attempts.len(), 2, "{first:?}");
    assert_eq!(d[0].attempts[0].target, "oa1");
    assert_eq!(d[0].chosen.as_deref(), Some("oa2"));
    bad.release();
}

#[tokio::test]
async fn falls_back_on_refused_connection() {
    falls_back(Behavior::Close, None).await;
}

#[tokio::test]
async fn falls_back_on_connection_closed_before_answer() {
    let ca = TestCa::new();
    let bad = FakeProvider::start(&ca, "first", Behavior::Close).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let gw = start(
        config(vec![oa("oa1", &bad, "OA1"), oa("oa2", &good, "OA2")]),
        secrets(),
        &ca,
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("hello from second"));
}

#[tokio::test]
async fn falls_back_on_503() {
    falls_back(Behavior::Status(503), None).await;
}

#[tokio::test]
async fn falls_back_on_429_with_retry_after() {
    falls_back(Behavior::RateLimited(30), None).await;
}

#[tokio::test]
async fn falls_back_on_401_revoked_key() {
    falls_back(Behavior::Status(401), None).await;
}

#[tokio::test]
async fn falls_back_on_slow_first_byte() {
    // Wide enough that the second target answers in time on a loaded runner.
    falls_back(Behavior::SlowFirstByte, Some(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn falls_back_on_tls_failure() {
    // The second fake's CA is not trusted by the gateway: TLS fails there.
    let ca = TestCa::new();
    let other_ca = TestCa::new();
    let untrusted = FakeProvider::start(&other_ca, "untrusted", Behavior::Ok).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let gw = start(
        config(vec![oa("oa1", &untrusted, "OA1"), oa("oa2", &good, "OA2")]),
        secrets(),
        &ca,
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(untrusted.requests().is_empty());
    assert_eq!(
        gw.sink.snapshot()[0].attempts[0].outcome,
        Outcome::TlsFailed
    );
}

#[tokio::test]
async fn other_4xx_stops_without_fallback() {
    let ca = TestCa::new();
    let bad = FakeProvider::start(&ca, "first", Behavior::Status(400)).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let gw = start(
        config(vec![oa("oa1", &bad, "OA1"), oa("oa2", &good, "OA2")]),
        secrets(),
        &ca,
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(a.body.contains("fake first says 400"));
    assert!(good.requests().is_empty());
}

#[tokio::test]
async fn every_target_failing_gives_provider_shaped_error_without_keys() {
    let ca = TestCa::new();
    let a1 = FakeProvider::start(&ca, "first", Behavior::Status(503)).await;
    let a2 = FakeProvider::start(&ca, "second", Behavior::Status(500)).await;
    let gw = start(
        config(vec![oa("oa1", &a1, "OA1"), oa("oa2", &a2, "OA2")]),
        secrets(),
        &ca,
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 502);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "kt_all_targets_failed");
    assert_eq!(v["error"]["targets_tried"][0]["target"], "oa1");
    assert_eq!(v["error"]["targets_tried"][0]["outcome"], "status_503");
    assert_eq!(v["error"]["targets_tried"][1]["outcome"], "status_500");
    for secret in [MANAGED_OA, MANAGED_OA2, CLIENT_KEY] {
        assert!(!a.body.contains(secret));
    }
    let decisions = format!("{:?}", gw.sink.snapshot());
    assert!(decisions.contains("oa2"));
    for secret in [MANAGED_OA, MANAGED_OA2, CLIENT_KEY, "MANAGED", "CLIENTKEY"] {
        assert!(!decisions.contains(secret), "{secret} in decision debug");
    }
    assert!(!format!("{:?}", gw.gw).contains("MANAGED"));
}

#[tokio::test]
async fn anthropic_all_failed_error_is_anthropic_shaped() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "claude", Behavior::RateLimited(60)).await;
    let t = target("ant", Provider::Anthropic, &up.anthropic_base_url(), "ANT");
    let gw = start(config(vec![t]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(&mut c, post("/anthropic/v1/messages", &[], "{}")).await;
    assert_eq!(a.status, 429);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["code"], "kt_all_targets_failed");
    assert!(!a.body.contains(MANAGED_ANT));
}

#[tokio::test]
async fn cut_mid_stream_ends_with_sse_error_and_no_fallback() {
    let ca = TestCa::new();
    let bad = FakeProvider::start(&ca, "first", Behavior::CutMidStream).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let gw = start(
        config(vec![oa("oa1", &bad, "OA1"), oa("oa2", &good, "OA2")]),
        secrets(),
        &ca,
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    let resp = c
        .send_request(post("/openai/v1/chat/completions", &[], chat_body(true)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (text, clean_end) = read_body(resp).await;
    assert!(text.contains("hello "), "first chunk arrived: {text}");
    assert!(text.contains("event: error"), "explicit SSE error: {text}");
    assert!(text.contains("kt_upstream_stream_failed"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(!clean_end, "the stream must not finish cleanly");
    assert!(
        good.requests().is_empty(),
        "no fallback after the first byte"
    );
}

#[tokio::test]
async fn cut_mid_json_body_aborts_the_response() {
    let ca = TestCa::new();
    let bad = FakeProvider::start(&ca, "first", Behavior::CutMidStream).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let gw = start(
        config(vec![oa("oa1", &bad, "OA1"), oa("oa2", &good, "OA2")]),
        secrets(),
        &ca,
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    let resp = c
        .send_request(post("/openai/v1/chat/completions", &[], chat_body(false)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.into_body().collect().await.is_err());
    assert!(good.requests().is_empty());
}

#[tokio::test]
async fn stream_arrives_incrementally() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Gated).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let resp = c
        .send_request(post("/openai/v1/chat/completions", &[], chat_body(true)))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("hello "));
    // The fake is still holding the rest: the first chunk was not buffered.
    assert!(!up.sent_last());
    up.release();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    assert!(up.sent_last());
}

#[tokio::test]
async fn connect_mode_terminates_tls_and_swaps_key() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let (status, conn) = via_connect(gw.addr, "127.0.0.1", up.addr.port(), gw.ca.cert_der()).await;
    assert_eq!(status, 200);
    let mut conn = conn.unwrap();
    let a = send(
        &mut conn,
        post(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = &up.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        header(r, "authorization"),
        Some(&*format!("Bearer {MANAGED_OA}"))
    );
    assert_eq!(gw.sink.snapshot()[0].arrival, Arrival::Connect);
}

/// CONNECT through kt, then a TLS handshake naming `sni` (trusting the
/// gateway's CA): the CONNECT status and whether the handshake succeeded.
async fn connect_with_sni(
    gw: std::net::SocketAddr,
    authority: &str,
    sni: &str,
    ca: &rustls_pki_types::CertificateDer<'static>,
) -> (u16, bool) {
    let mut tcp = tokio::net::TcpStream::connect(gw).await.unwrap();
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
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
    let status: u16 = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        return (status, false);
    }
    let tls = tokio_rustls::TlsConnector::from(client_tls(ca, false))
        .connect(
            rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap(),
            tcp,
        )
        .await;
    (status, tls.is_ok())
}

#[tokio::test]
async fn connect_to_non_provider_is_refused_and_recorded() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let (status, _) = via_connect(gw.addr, "example.com", 443, gw.ca.cert_der()).await;
    assert_eq!(status, 403);
    assert_eq!(
        guard_refusals(&gw.sink),
        vec![(
            "connect-not-allowed".to_string(),
            "example.com:443".to_string()
        )]
    );
}

/// CONNECT to an address is decided by the hello inside: another name on
/// it (a provider's address, reached with someone else's name) never goes
/// anywhere, and the server behind it never sees a byte.
#[tokio::test]
async fn connect_to_an_address_with_another_name_is_refused_not_tunnelled() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let other = FakeProvider::start(&ca, "other", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let authority = format!("127.0.0.1:{}", other.addr.port());
    let (status, tls_ok) = connect_with_sni(gw.addr, &authority, "www.example.com", &ca.der).await;
    assert_eq!(status, 200);
    assert!(!tls_ok, "the tunnel reached a TLS server");
    assert!(other.requests().is_empty());
    assert_eq!(
        guard_refusals(&gw.sink),
        vec![(
            "non-provider-name".to_string(),
            format!("{authority} (sni www.example.com)")
        )]
    );
}

/// An allowlisted name that resolves to this host (DNS rebinding, a
/// metadata endpoint) is never dialled.
#[tokio::test]
async fn connect_allowlist_never_reaches_internal_addresses() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let mut cfg = config(vec![oa("oa1", &up, "OA1")]);
    cfg.gateway.connect_allow = vec!["localhost".into()];
    let gw = start(cfg, secrets(), &ca).await;
    let (status, _) = via_connect(gw.addr, "localhost", 443, gw.ca.cert_der()).await;
    assert_eq!(status, 403);
    assert_eq!(
        guard_refusals(&gw.sink),
        vec![(
            "connect-internal-address".to_string(),
            "localhost:443".to_string()
        )]
    );
}

/// A captured connection kt cannot decide on is refused with a TLS alert
/// and an event; the original destination never sees a byte.
#[tokio::test]
async fn captured_connections_kt_cannot_decide_on_are_refused_never_spliced() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    // The "real" server at the original destination (a provider address).
    let real = FakeProvider::start(&ca, "real", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let cap = start_capture(
        &gw.gw,
        Arc::new(FixedLookup(real.addr, ClientInfo::default())),
    )
    .await;

    // Another name (trusting the real server's CA: a splice would succeed).
    let tcp = tokio::net::TcpStream::connect(cap).await.unwrap();
    let named = tokio_rustls::TlsConnector::from(client_tls(&ca.der, false))
        .connect(
            rustls_pki_types::ServerName::try_from("www.example.com").unwrap(),
            tcp,
        )
        .await;
    assert!(named.is_err(), "a non-provider name was passed through");
    // No SNI at all (an address as the name).
    let tcp = tokio::net::TcpStream::connect(cap).await.unwrap();
    let bare = tokio_rustls::TlsConnector::from(client_tls(&ca.der, false))
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await;
    assert!(bare.is_err(), "a hello without SNI was passed through");
    // A ClientHello larger than any real one (padding inside a valid record
    // stream): refused once it passes the limit, never passed on.
    let mut tcp = tokio::net::TcpStream::connect(cap).await.unwrap();
    let mut big = vec![0x16, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
    big.resize(5 + 0x4000, 0);
    for _ in 0..5 {
        big.extend_from_slice(&[0x16, 3, 1, 0x40, 0x00]);
        big.extend(std::iter::repeat_n(0u8, 0x4000));
    }
    let _ = tcp.write_all(&big).await;
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    assert_eq!(
        answer.first(),
        Some(&0x15),
        "expected a TLS alert, got {answer:?}"
    );

    assert!(real.requests().is_empty());
    assert!(up.requests().is_empty());
    let rules: Vec<String> = guard_refusals(&gw.sink).into_iter().map(|r| r.0).collect();
    assert_eq!(rules[..2], ["non-provider-name", "no-sni"]);
    // rustls already rejects a handshake message announced this large.
    assert!(
        ["oversized-hello", "unparseable-hello"].contains(&rules[2].as_str()),
        "{rules:?}"
    );
}

#[tokio::test]
async fn capture_listener_terminates_tls_by_sni_and_swaps_key() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let info = ClientInfo {
        pid: Some(4242),
        uid: Some(1000),
        cgroup_id: Some(7),
        ..ClientInfo::default()
    };
    let dst = "127.0.0.2:443".parse().unwrap();
    let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, info.clone()))).await;
    // The client believes it talks to api.openai.com (SNI); only loopback is used.
    let mut conn = h1_tls(cap, "api.openai.com", gw.ca.cert_der()).await;
    let a = send(
        &mut conn,
        post(
            "/v1/chat/completions",
            &[
                ("authorization", &format!("Bearer {CLIENT_KEY}")),
                ("host", "api.openai.com"),
            ],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = &up.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        header(r, "authorization"),
        Some(&*format!("Bearer {MANAGED_OA}"))
    );
    let d = &gw.sink.snapshot()[0];
    assert_eq!(d.arrival, Arrival::Capture);
    assert_eq!(d.client, info);
}

#[tokio::test]
async fn capture_listener_resumes_a_repeat_clients_tls_session() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let cap = start_capture(
        &gw.gw,
        Arc::new(FixedLookup(up.addr, ClientInfo::default())),
    )
    .await;
    // One client config (rustls' default in-memory session cache) for both
    // connections, as a long-lived SDK client would have.
    let client = client_tls(gw.ca.cert_der(), false);
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(cap).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(
                rustls_pki_types::ServerName::try_from("api.openai.com").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        kinds.push(tls.get_ref().1.handshake_kind());
        // A request and its answer: the client reads the session tickets
        // the gateway sent after the handshake.
        let (mut conn, c) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(c);
        let a = send(
            &mut conn,
            post(
                "/v1/chat/completions",
                &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
                chat_body(false),
            ),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}

#[tokio::test]
async fn capture_serves_plain_http_fed_directly() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let g = gw.gw.clone();
    let original = up.addr;
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        g.serve_captured(s, original, ClientInfo::default()).await;
    });
    let mut conn = h1_plain(addr).await;
    let a = send(
        &mut conn,
        post(
            "/v1/chat/completions",
            &[("x-api-key", CLIENT_KEY)],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        header(&up.requests()[0], "authorization"),
        Some(&*format!("Bearer {MANAGED_OA}"))
    );
}

#[tokio::test]
async fn required_target_with_missing_secret_stops_startup() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let cfg = config(vec![
        oa("oa1", &up, "OA1"),
        oa("oa9", &up, "OPENAI_PROD_KEY"),
    ]);
    let err = builder(cfg, secrets(), Arc::new(Ca::ephemeral().unwrap()), &ca)
        .build()
        .unwrap_err();
    assert!(matches!(err, GatewayError::MissingSecrets(_)));
    let msg = err.to_string();
    assert!(msg.contains("oa9"), "{msg}");
    assert!(msg.contains("OPENAI_PROD_KEY"), "{msg}");
    assert!(
        msg.contains("kt secrets add OPENAI_PROD_KEY --store"),
        "{msg}"
    );
    assert!(!msg.contains(MANAGED_OA));
}

#[tokio::test]
async fn optional_target_with_missing_secret_is_skipped() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let mut opt = oa("oa0", &up, "NOT_THERE");
    opt.required = false;
    let cfg = config(vec![opt, oa("oa1", &up, "OA1")]);
    let gw = builder(cfg, secrets(), Arc::new(Ca::ephemeral().unwrap()), &ca)
        .build()
        .unwrap();
    assert_eq!(gw.active_targets(), vec!["oa1"]);
    assert!(gw.warnings()[0].contains("NOT_THERE"));
}

#[tokio::test]
async fn body_over_limit_gets_413_and_nothing_is_forwarded() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let mut cfg = config(vec![oa("oa1", &up, "OA1")]);
    cfg.gateway.max_body_bytes = 1024;
    let gw = start(cfg, secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], vec![b'x'; 4096]),
    )
    .await;
    assert_eq!(a.status, 413);
    assert!(a.body.contains("kt_body_too_large"));
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn unknown_provider_path_gets_404_with_prefixes() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            "/gemini/v1beta/models",
            &[("x-goog-api-key", CLIENT_KEY)],
            "{}",
        ),
    )
    .await;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("/openai"), "{}", a.body);
    assert!(!a.body.contains(CLIENT_KEY));
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_clear_errors() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;

    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"THIS IS NOT HTTP\x00\x01\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{out:?}"
    );

    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let big = "a".repeat(200 * 1024);
    let req =
        format!("POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out[..out.len().min(100)])
    );
    assert!(up.requests().is_empty());

    // Still serving afterwards.
    let mut c = h1_plain(gw.addr).await;
    assert_eq!(
        send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(false))
        )
        .await
        .status,
        200
    );
}

struct BlockSecrets;

fn aws_note() -> PolicyNote {
    PolicyNote {
        policy: PolicyId::DlpFilter,
        action: PolicyAction::Block,
        rule: "aws-key".into(),
        location: None,
    }
}

impl Policy for BlockSecrets {
    fn check(&self, request: &PolicyRequest<'_>, notes: &mut Vec<PolicyNote>) -> PolicyVerdict {
        if String::from_utf8_lossy(request.body).contains("AKIA") {
            notes.push(aws_note());
            return PolicyVerdict::Block(Refusal {
                status: http::StatusCode::FORBIDDEN,
                code: "kt_policy_blocked",
                message: "blocked".into(),
            });
        }
        PolicyVerdict::Allow
    }
}

#[tokio::test]
async fn policy_hook_can_block_before_forwarding() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let sink = Arc::new(MemorySink::new());
    let gca = Arc::new(Ca::ephemeral().unwrap());
    let gw = builder(
        config(vec![oa("oa1", &up, "OA1")]),
        secrets(),
        gca.clone(),
        &ca,
    )
    .policy(Arc::new(BlockSecrets))
    .record_sink(sink.clone())
    .build()
    .unwrap();
    let gw = serve(gw, gca, sink).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[],
            r#"{"messages":"AKIAIOSFODNN7EXAMPLE"}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(up.requests().is_empty());
    assert_eq!(gw.sink.snapshot()[0].policy, vec![aws_note()]);
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::SlowFirstByte).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let fut = tokio::spawn(async move {
        send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(false)),
        )
        .await
    });
    while up.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.gw.shutdown();
    // New connections are no longer accepted once the loop stopped.
    up.release();
    let a = fut.await.unwrap();
    assert_eq!(a.status, 200);
    gw.task.await.unwrap();
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

#[tokio::test]
async fn last_target_retry_after_within_bound_is_retried_once() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::RateLimited(0)).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(up.requests().len(), 2, "one retry after Retry-After");
    let d = &gw.sink.snapshot()[0];
    assert_eq!(d.attempts.len(), 2);
    assert!(d.attempts.iter().all(|t| t.target == "oa1"));
}

#[tokio::test]
async fn http2_clients_are_served_through_capture_tls() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let dst = "127.0.0.2:443".parse().unwrap();
    let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, ClientInfo::default()))).await;
    let tcp = tokio::net::TcpStream::connect(cap).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(gw.ca.cert_der(), true))
        .connect(
            rustls_pki_types::ServerName::try_from("api.openai.com").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send_req, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = post(
        "https://api.openai.com/v1/chat/completions",
        &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
        chat_body(true),
    );
    let resp = send_req.send_request(req).await.unwrap();
    let a = read(resp).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("[DONE]"));
    assert_eq!(
        header(&up.requests()[0], "authorization"),
        Some(&*format!("Bearer {MANAGED_OA}"))
    );
}

#[tokio::test]
async fn idle_gap_over_timeout_ends_stream_with_error_event() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Gated).await;
    let mut cfg = config(vec![oa("oa1", &up, "OA1")]);
    cfg.gateway.idle_timeout = Duration::from_millis(500);
    let gw = start(cfg, secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let resp = c
        .send_request(post("/openai/v1/chat/completions", &[], chat_body(true)))
        .await
        .unwrap();
    let (text, clean) = read_body(resp).await;
    let errored = !clean;
    assert!(text.contains("hello "));
    assert!(text.contains("event: error"), "{text}");
    assert!(text.contains("no data for"), "{text}");
    assert!(errored);
    let cuts = gw.sink.stream_cuts();
    assert_eq!(cuts.len(), 1);
    assert_eq!(cuts[0].0, gw.sink.snapshot()[0].request_id);
    assert_eq!(
        cuts[0].1.reason,
        CutReason::IdleTimeout {
            idle: Duration::from_millis(500)
        }
    );
    assert!(cuts[0].1.bytes > 0);
    up.release();
}

/// A gateway recording into a real event store in `dir` (as `kt gateway run`
/// does with the audit logger), served on loopback.
async fn start_with_store(
    cfg: guard::config::Config,
    ca: &TestCa,
    dir: &std::path::Path,
) -> (Running, EventWriter, guard::events::WriterHandle) {
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir, 0));
    let sink = Arc::new(EventSink::new(writer.clone(), Default::default()));
    let gca = Arc::new(Ca::ephemeral().unwrap());
    let gw = builder(cfg, secrets(), gca.clone(), ca)
        .record_sink(sink)
        .build()
        .unwrap();
    // The fixture's memory sink stays empty: the store is the record here.
    let running = serve(gw, gca, Arc::new(MemorySink::new())).await;
    (running, writer, handle)
}

fn stored_events(dir: &std::path::Path) -> Vec<guard::events::Event> {
    EventStore::open_read_only(dir)
        .unwrap()
        .unwrap()
        .query(&Filter::default())
        .unwrap()
}

#[tokio::test]
async fn stream_cut_after_first_byte_is_recorded_in_that_requests_event() {
    let ca = TestCa::new();
    let bad = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, writer, handle) = start_with_store(
        config(vec![oa("oa1", &bad, "OA1"), oa("oa2", &good, "OA2")]),
        &ca,
        dir.path(),
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    // A clean request first: its event must stay unamended.
    let ok = send(
        &mut c,
        post("/openai/v1/models", &[("authorization", "Bearer x")], ""),
    )
    .await;
    assert_eq!(ok.status, 200);
    bad.set_behavior(Behavior::CutMidStream);
    let resp = c
        .send_request(post(
            "/openai/v1/chat/completions",
            &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
            chat_body(true),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-kt-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let (text, clean_end) = read_body(resp).await;
    assert!(text.contains("event: error"), "client saw the cut: {text}");
    assert!(!clean_end);

    // The amendment was queued before the client got the error event.
    assert!(writer.flush());
    let events = stored_events(dir.path());
    assert_eq!(events.len(), 2, "still one event per request: {events:?}");
    let clean = &events[0];
    assert_eq!(clean.stream, None, "{clean:?}");
    let e = &events[1];
    assert_eq!(e.request_id, request_id);
    assert_eq!(e.status, Some(200), "the status the client got");
    let stream = e.stream.as_ref().expect("the cut is in the event");
    assert_eq!(stream.end, StreamEnd::UpstreamFailed);
    assert!(!stream.reason.as_deref().unwrap_or("").is_empty());
    // The first chunk went through before the cut; the SSE error is not counted.
    let first = text.split("\n\n").next().unwrap().len() as u64 + 2;
    assert_eq!(stream.bytes, first, "{text:?}");
    let json = serde_json::to_string(&events).unwrap();
    for secret in [CLIENT_KEY, MANAGED_OA, MANAGED_OA2, "CLIENTKEY", "MANAGED"] {
        assert!(!json.contains(secret), "{secret} in stored events: {json}");
    }
    assert!(
        good.requests().is_empty(),
        "no fallback after the first byte"
    );
    assert!(handle.shutdown());
}

#[tokio::test]
async fn client_leaving_mid_stream_is_recorded_in_that_requests_event() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Gated).await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, writer, handle) =
        start_with_store(config(vec![oa("oa1", &up, "OA1")]), &ca, dir.path()).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = chat_body(true);
    let req = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("hello ") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    // The client goes away while the upstream still holds the rest.
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let stream = loop {
        assert!(writer.flush());
        let events = stored_events(dir.path());
        assert_eq!(events.len(), 1);
        if let Some(st) = events[0].stream.clone() {
            break st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client's departure was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stream.end, StreamEnd::ClientClosed);
    assert_eq!(stream.reason, None);
    assert!(stream.bytes > 0);
    up.release();
    assert!(handle.shutdown());
}

#[tokio::test]
async fn streams_that_end_cleanly_are_not_amended() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    for stream in [true, false] {
        let a = send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(stream)),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    // Bodies of declared length, which the server may drop right after
    // their last byte.
    up.set_behavior(Behavior::Sized);
    for stream in [true, false] {
        let a = send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(stream)),
        )
        .await;
        assert_eq!(a.status, 200);
        assert!(a.body.contains("from first"), "{}", a.body);
        // An event stream may get an error event appended: never a length.
        assert_eq!(
            a.headers.contains_key("content-length"),
            !stream,
            "{:?}",
            a.headers
        );
    }
    // No body at all: nothing is relayed, nothing can be cut.
    let head = http::Request::builder()
        .method("HEAD")
        .uri("/openai/v1/models")
        .header("host", "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut c, head).await.status, 200);
    // The connection is still usable after all of them.
    let a = send(&mut c, post("/openai/v1/models", &[], "")).await;
    assert_eq!(a.status, 200);
    assert_eq!(gw.sink.snapshot().len(), 6);
    let cuts = gw.sink.stream_cuts();
    assert!(cuts.is_empty(), "{cuts:?}");
}

/// Thousands of connections that never send a byte (a slowloris, or a
/// leaked pool) must not lock a real client out, on either listener, and
/// the gateway holds no more of them than its budget.
#[tokio::test]
async fn idle_connections_never_lock_out_a_new_client() {
    const IDLE: usize = 5000;
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let mut cfg = config(vec![oa("oa1", &up, "OA1")]);
    cfg.gateway.max_connections = 64;
    let gw = start(cfg, secrets(), &ca).await;
    let dst = "127.0.0.2:443".parse().unwrap();
    let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, ClientInfo::default()))).await;

    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let to = if i % 2 == 0 { cap } else { gw.addr };
        idle.push(tokio::net::TcpStream::connect(to).await.unwrap());
    }
    // A real client on each listener is still served.
    let mut conn = h1_tls(cap, "api.openai.com", gw.ca.cert_der()).await;
    let a = send(
        &mut conn,
        post(
            "/v1/chat/completions",
            &[("host", "api.openai.com")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let mut c = h1_plain(gw.addr).await;
    let b = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.body);
    // Bounded: all but the budget's worth of idle connections were closed.
    let (refused, evicted) = gw.gw.connection_budget_stats();
    assert_eq!(refused, 0);
    assert!(
        evicted >= (IDLE + 2 - 64) as u64,
        "only {evicted} idle connections were closed"
    );
    drop(idle);
}

/// A web page cannot spend the managed key: a DNS-rebinding request
/// (foreign `Host`) and a cross-site `Origin` are refused and recorded;
/// the provider sees nothing.
#[tokio::test]
async fn explicit_requests_a_web_page_could_make_are_refused() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let rebound = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("host", "attacker.example:8787")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(rebound.status, 403, "{}", rebound.body);
    assert!(
        rebound.body.contains("kt_client_refused"),
        "{}",
        rebound.body
    );
    let cross = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[
                ("host", "127.0.0.1:8787"),
                ("origin", "https://evil.example"),
            ],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(cross.status, 403, "{}", cross.body);
    let fetch = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("host", "localhost"), ("sec-fetch-site", "cross-site")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(fetch.status, 403, "{}", fetch.body);
    assert!(up.requests().is_empty());
    let rules: Vec<String> = guard_refusals(&gw.sink).into_iter().map(|r| r.0).collect();
    assert_eq!(
        rules,
        ["foreign-host", "cross-site-origin", "cross-site-origin"]
    );
    // A local SDK client (no Origin) is served.
    let ok = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("host", "localhost:8787")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
}

/// Explicit clients are named in their events (pid, uid, exe), and
/// `gateway.clients` decides who may spend the managed keys.
#[tokio::test]
async fn explicit_clients_are_attributed_and_checked_against_gateway_clients() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let curl = |addr: std::net::SocketAddr| {
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg("content-type: application/json")
            .arg("--data")
            .arg(chat_body(false))
            .arg(format!("http://{addr}/openai/v1/chat/completions"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("curl is installed by cargo xtask setup")
    };
    let child = curl(gw.addr);
    let pid = child.id();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let rec = &gw.sink.snapshot()[0];
    assert_eq!(rec.client.pid, Some(pid), "{:?}", rec.client);
    assert!(
        rec.client
            .exe
            .as_deref()
            .is_some_and(|e| e.ends_with("curl")),
        "{:?}",
        rec.client
    );
    let my_uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_eq!(rec.client.uid, Some(my_uid));

    // Now only another uid may spend keys: this client is refused.
    let mut cfg = config(vec![oa("oa1", &up, "OA1")]);
    cfg.gateway.clients = Some(guard::config::ClientAllow {
        uids: vec![my_uid.wrapping_add(4242)],
        cgroups: vec![],
    });
    let strict = start(cfg, secrets(), &ca).await;
    let child = curl(strict.addr);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    assert_eq!(
        up.requests().len(),
        1,
        "only the first, allowed request arrived"
    );
    let rules: Vec<String> = guard_refusals(&strict.sink)
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(rules, ["client-not-allowed"]);
}

/// Small leaks: an upstream 401 body (it can quote the key's last
/// characters) never reaches the client, a path with `..` is not sent
/// under the managed key, and an encoded `?%6Bey=` or a client's billing
/// headers never reach the provider.
#[tokio::test]
async fn rejected_keys_traversal_and_encoded_credentials_do_not_leak() {
    let ca = TestCa::new();
    let bad = FakeProvider::start(&ca, "first", Behavior::Status(401)).await;
    let mut cfg = config(vec![oa("oa1", &bad, "OA1")]);
    cfg.providers.fallback = false;
    let gw = start(cfg, secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 401);
    assert!(a.body.contains("kt_upstream_auth_failed"), "{}", a.body);
    assert!(!a.body.contains("from first"), "{}", a.body);

    let ca2 = TestCa::new();
    let up = FakeProvider::start(&ca2, "second", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca2).await;
    let mut c = h1_plain(gw.addr).await;
    let t = send(
        &mut c,
        post("/openai/v1/files/%2e%2e/admin", &[], chat_body(false)),
    )
    .await;
    assert_eq!(t.status, 400);
    assert!(t.body.contains("kt_path_refused"), "{}", t.body);
    assert!(up.requests().is_empty());
    let k = send(
        &mut c,
        post(
            "/openai/v1/chat/completions?%6Bey=AIzaCLIENTKEY&x=1",
            &[
                ("openai-organization", "org-attacker"),
                ("openai-project", "proj_attacker"),
                ("cookie", "session=abc"),
                ("ocp-apim-subscription-key", "apim-CLIENT"),
            ],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(k.status, 200, "{}", k.body);
    let r = &up.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions?x=1");
    for h in [
        "openai-organization",
        "openai-project",
        "cookie",
        "ocp-apim-subscription-key",
    ] {
        assert_eq!(header(r, h), None, "{h} reached the provider");
    }
}

/// Budgets: a body that never finishes arriving times out, bodies held at
/// once are bounded (a client over it gets a clear 503, others carry on),
/// and one uid cannot hold more than its share of connections.
#[tokio::test]
async fn budgets_refuse_clearly_and_keep_serving_everyone_else() {
    let ca = TestCa::new();
    let slow = FakeProvider::start(&ca, "first", Behavior::SlowFirstByte).await;
    let mut cfg = config(vec![oa("oa1", &slow, "OA1")]);
    cfg.gateway.body_timeout = Duration::from_millis(300);
    cfg.gateway.max_body_bytes = 4096;
    cfg.gateway.max_buffered_bytes = 4096;
    cfg.gateway.max_connections_per_uid = 3;
    let gw = start(cfg, secrets(), &ca).await;

    // 1. A body that stalls: 408 with kt's code, nothing forwarded.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 512];
    let n = s.read(&mut head).await.unwrap();
    let text = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    drop(s);

    // 2. One request holds 3,000 body bytes (its upstream is slow); a
    // second of 2,000 would pass the 4,096-byte budget: 503, not memory.
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(3000));
    let mut c1 = h1_plain(gw.addr).await;
    let held =
        tokio::spawn(
            async move { send(&mut c1, post("/openai/v1/chat/completions", &[], big)).await },
        );
    while slow.requests().is_empty() {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c2 = h1_plain(gw.addr).await;
    let second = format!(r#"{{"model":"m","pad":"{}"}}"#, "y".repeat(2000));
    let a = send(&mut c2, post("/openai/v1/chat/completions", &[], second)).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("kt_over_budget"), "{}", a.body);
    slow.set_behavior(Behavior::Ok);
    slow.release();
    assert_eq!(held.await.unwrap().status, 200);
    let small = send(
        &mut c2,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(small.status, 200, "{}", small.body);
    drop(c2);

    // 3. This process (one uid) may hold 3 connections; the next is refused.
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut c = h1_plain(gw.addr).await;
        let ok = send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(false)),
        )
        .await;
        assert_eq!(ok.status, 200);
        conns.push(c);
    }
    let mut extra = h1_plain(gw.addr).await;
    let over = send(
        &mut extra,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(over.status, 429, "{}", over.body);
    assert!(over.body.contains("kt_over_budget"), "{}", over.body);
    assert_eq!(gw.gw.uid_budget_refusals(), 1);
    let rules: Vec<String> = guard_refusals(&gw.sink).into_iter().map(|r| r.0).collect();
    assert_eq!(rules, ["uid-connection-budget"]);
}

/// Keep-alive connections that finished their requests are idle again:
/// a pool of them cannot hold the budget against a new client, while a
/// connection with a response still streaming is never the one closed.
#[tokio::test]
async fn idle_keep_alive_connections_make_room_but_streams_are_kept() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Gated).await;
    let mut cfg = config(vec![oa("oa1", &up, "OA1")]);
    cfg.gateway.max_connections = 3;
    let gw = start(cfg, secrets(), &ca).await;
    // One streaming response in progress (the gated fake holds its end).
    let mut streaming = h1_plain(gw.addr).await;
    streaming.ready().await.unwrap();
    let resp = streaming
        .send_request(post("/openai/v1/chat/completions", &[], chat_body(true)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    up.set_behavior(Behavior::Ok);
    // Two keep-alive connections that are done and idle.
    let mut pool = Vec::new();
    for _ in 0..2 {
        let mut c = h1_plain(gw.addr).await;
        let a = send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(false)),
        )
        .await;
        assert_eq!(a.status, 200);
        pool.push(c);
    }
    // The budget is full; new clients still get served, again and again
    // (each stays open, so each one has to push an idle one out).
    let mut newer = Vec::new();
    for _ in 0..4 {
        let mut c = h1_plain(gw.addr).await;
        let a = send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(false)),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        newer.push(c);
    }
    // The stream survived all of that.
    up.release();
    let (text, clean) = read_body(resp).await;
    assert!(clean, "the streaming response was cut: {text}");
    assert!(gw.gw.connection_budget_stats().1 >= 4);
}

/// A provider's own name as Host on the explicit listener is a local tool
/// (`curl --resolve api.openai.com:…:127.0.0.1`), never a rebinding page.
#[tokio::test]
async fn a_provider_name_as_host_on_the_explicit_listener_is_served() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let gw = start(config(vec![oa("oa1", &up, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("host", "api.openai.com")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

/// Catalog providers get the managed key in their own style: Gemini in
/// `x-goog-api-key` (never in the query, a client's `?key=` stripped),
/// Groq as a Bearer token; nothing the client sent reaches the provider.
#[tokio::test]
async fn catalog_providers_get_the_managed_key_in_their_own_style() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let root = format!("https://127.0.0.1:{}", up.addr.port());
    let cfg = config(vec![
        target("gem", Provider::Gemini, &root, "OA1"),
        target("groq", Provider::Groq, &up.openai_base_url(), "OA2"),
    ]);
    // A key of no known provider's format (an OpenAI key sent to Gemini
    // would be refused as another provider's: gateway.credentials).
    const LEGACY_KEY: &str = "legacy-ci-token-hardcoded-0001";
    let gw = start(cfg, secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let g = send(
        &mut c,
        post(
            &format!(
                "/gemini/v1beta/models/gemini-2.0-flash:generateContent?key={LEGACY_KEY}&alt=sse"
            ),
            &[("x-goog-api-key", LEGACY_KEY)],
            r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#,
        ),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.body);
    let r = &up.requests()[0];
    assert_eq!(
        r.path,
        "/v1beta/models/gemini-2.0-flash:generateContent?alt=sse"
    );
    assert_eq!(header(r, "x-goog-api-key"), Some(MANAGED_OA));
    assert_eq!(header(r, "authorization"), None);
    let q = send(
        &mut c,
        post(
            "/groq/openai/v1/chat/completions",
            &[("authorization", &format!("Bearer {LEGACY_KEY}"))],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(q.status, 200, "{}", q.body);
    let r = &up.requests()[1];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        header(r, "authorization"),
        Some(&*format!("Bearer {MANAGED_OA2}"))
    );
    for r in up.requests() {
        assert!(!format!("{:?}{}", r.headers, r.path).contains(LEGACY_KEY));
    }
}

/// A primary that keeps failing is tried `cooldown_after` times, then
/// skipped for its cool-down (requests stop paying for it); the moment is
/// recorded.
#[tokio::test]
async fn a_dead_primary_is_skipped_during_its_cool_down() {
    let ca = TestCa::new();
    let dead = FakeProvider::start(&ca, "first", Behavior::Status(503)).await;
    let good = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let mut cfg = config(vec![oa("oa1", &dead, "OA1"), oa("oa2", &good, "OA2")]);
    cfg.gateway.cooldown_after = 3;
    cfg.gateway.cooldown = Duration::from_secs(600);
    let gw = start(cfg, secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    for _ in 0..6 {
        let a = send(
            &mut c,
            post("/openai/v1/chat/completions", &[], chat_body(false)),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(
        dead.requests().len(),
        3,
        "the cooled-down primary was tried again"
    );
    assert_eq!(good.requests().len(), 6);
    let recs = gw.sink.snapshot();
    let cooled: Vec<_> = recs
        .iter()
        .filter(|r| r.policy.iter().any(|n| n.rule == "target-cooled-down"))
        .collect();
    assert_eq!(cooled.len(), 1);
    assert_eq!(cooled[0].path, "oa1");
    // Requests after the cool-down started went straight to the fallback.
    let last = recs.iter().rev().find(|r| r.method == "POST").unwrap();
    assert_eq!(last.attempts.len(), 1);
    assert_eq!(last.attempts[0].target, "oa2");
}

/// The rotation alarm: the new key is rejected (401) while the old one on
/// the fallback keeps traffic flowing; the event says so, a plain
/// fallback for an outage does not.
#[tokio::test]
async fn a_rejected_primary_key_served_by_the_fallback_raises_the_rotation_alarm() {
    let ca = TestCa::new();
    let revoked = FakeProvider::start(&ca, "first", Behavior::Status(401)).await;
    let old = FakeProvider::start(&ca, "second", Behavior::Ok).await;
    let gw = start(
        config(vec![oa("q2", &revoked, "OA1"), oa("q1", &old, "OA2")]),
        secrets(),
        &ca,
    )
    .await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    revoked.set_behavior(Behavior::Status(503));
    let b = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.body);
    let recs = gw.sink.snapshot();
    let alarm = |r: &guard::record::RequestRecord| {
        r.policy
            .iter()
            .find(|n| n.rule == "rotation-alarm")
            .and_then(|n| n.location.clone())
    };
    assert_eq!(
        alarm(&recs[0]).as_deref(),
        Some("target q2 rejected its key (401); served by q1")
    );
    assert_eq!(alarm(&recs[1]), None, "an outage is not a rotation alarm");
}

/// Active health: a probe round proves each key, records each result,
/// cools down a target that does not answer (requests then skip it
/// without paying for it), and a later good probe brings it back.
#[tokio::test]
async fn periodic_probes_record_results_and_drive_the_cool_down() {
    let ca = TestCa::new();
    let flaky = FakeProvider::start(&ca, "first", Behavior::Status(503)).await;
    let revoked = FakeProvider::start(&ca, "second", Behavior::Status(401)).await;
    let good = FakeProvider::start(&ca, "third", Behavior::Ok).await;
    let mut cfg = config(vec![
        oa("oa1", &flaky, "OA1"),
        oa("oa2", &revoked, "OA2"),
        oa("oa3", &good, "ANT"),
    ]);
    cfg.gateway.cooldown_after = 1;
    cfg.gateway.cooldown = Duration::from_secs(600);
    let gw = start(cfg, secrets(), &ca).await;

    let reports = gw.gw.probe_now().await;
    let result = |id: &str| {
        reports
            .iter()
            .find(|r| r.target == id)
            .map(|r| r.result.label())
    };
    assert_eq!(result("oa1"), Some("error"));
    assert_eq!(result("oa2"), Some("rejected"));
    assert_eq!(result("oa3"), Some("ok"));
    assert_eq!(gw.gw.last_probes().len(), 3);
    let recs = gw.sink.snapshot();
    for (id, rule) in [
        ("oa1", "probe-error"),
        ("oa2", "probe-rejected"),
        ("oa3", "probe-ok"),
    ] {
        assert!(
            recs.iter().any(|r| r.chosen.as_deref() == Some(id)
                && r.policy.iter().any(|n| n.rule == rule)),
            "no {rule} event for {id}"
        );
    }
    assert!(
        recs.iter()
            .any(|r| r.path == "oa1" && r.policy.iter().any(|n| n.rule == "target-cooled-down")),
        "the failed probe cooled oa1 down"
    );

    // A request now skips the cooled primary; the rejected key is not a
    // reason to skip (it must stay loud), so oa2 is tried and oa3 serves.
    let probes_seen = flaky.requests().len();
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        flaky.requests().len(),
        probes_seen,
        "the cooled primary was tried"
    );
    assert_eq!(
        good.requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        1
    );

    // It answers again: the next probe ends the cool-down.
    flaky.set_behavior(Behavior::Ok);
    gw.gw.probe_now().await;
    assert!(
        gw.sink
            .snapshot()
            .iter()
            .any(|r| r.path == "oa1" && r.policy.iter().any(|n| n.rule == "target-recovered"))
    );
    let a = send(
        &mut c,
        post("/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        flaky.requests().last().map(|r| r.method.as_str()),
        Some("POST"),
        "the recovered primary serves again"
    );
}

/// A client that leaves before its answer (kt waiting on a slow first
/// byte) is still recorded: the request reached the provider with the
/// managed key, so "who used which key" must count it.
#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_recorded_as_499() {
    let ca = TestCa::new();
    let slow = FakeProvider::start(&ca, "first", Behavior::SlowFirstByte).await;
    let gw = start(config(vec![oa("oa1", &slow, "OA1")]), secrets(), &ca).await;
    let mut c = h1_plain(gw.addr).await;
    c.ready().await.unwrap();
    let auth = format!("Bearer {CLIENT_KEY}");
    let pending = c.send_request(post(
        "/openai/v1/chat/completions",
        &[("authorization", auth.as_str())],
        chat_body(false),
    ));
    // Wait until the request is at the provider, then hang up.
    let start = std::time::Instant::now();
    while slow.requests().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(pending);
    drop(c);
    let start = std::time::Instant::now();
    let rec = loop {
        if let Some(r) = gw.sink.snapshot().into_iter().find(|r| r.status == 499) {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no record of the abandoned request"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    slow.release();
    assert_eq!(rec.error_code, Some("kt_client_closed"));
    assert!(
        rec.client_key_fingerprint.is_some(),
        "the key it presented is named"
    );
    assert_eq!(rec.provider.as_deref(), Some("openai"));
    let note = rec
        .policy
        .iter()
        .find(|n| n.rule == "client-closed")
        .unwrap();
    assert_eq!(
        note.location.as_deref(),
        Some("while waiting for target oa1")
    );
    assert_eq!(gw.sink.snapshot().len(), 1, "recorded once");
}

/// `kt events --keys` names each unmanaged key by the provider whose format
/// it has (a `gsk_` key is Groq's wherever it was sent; a bare 32-character
/// key sent to Mistral is Mistral's), in the table and in JSON, and never
/// shows a key.
#[tokio::test]
async fn unmanaged_keys_are_named_by_provider_in_the_key_report() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "first", Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(vec![
        oa("oa1", &up, "OA1"),
        target("mis", Provider::Mistral, &up.openai_base_url(), "OA2"),
    ]);
    let (gw, writer, handle) = start_with_store(cfg, &ca, dir.path()).await;
    // Made-up keys, assembled so no literal here looks like one.
    let groq = format!("gs{}{}", "k_", "Gq7x".repeat(13));
    let replicate = format!("r8{}{}", "_", "Rp4".repeat(12) + "z");
    let mistral = "Ms8".repeat(10) + "K2";
    let legacy = "legacy-ci-token-hardcoded-0003".to_string();
    let calls = [
        ("/openai/v1/chat/completions", &groq),
        ("/openai/v1/chat/completions", &replicate),
        ("/mistral/v1/chat/completions", &mistral),
        ("/openai/v1/chat/completions", &legacy),
    ];
    let mut c = h1_plain(gw.addr).await;
    for (path, key) in calls {
        let r = send(
            &mut c,
            post(
                path,
                &[("authorization", &format!("Bearer {key}"))],
                chat_body(false),
            ),
        )
        .await;
        // The Groq key sent to OpenAI is refused (another provider's key);
        // the others are swapped. Every one is recorded.
        assert!(r.status == 200 || r.status == 403, "{path}: {}", r.body);
    }
    assert!(writer.flush());
    let kt = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kt-under-test"))
            .args(args)
            .env("KT_DATA_DIR", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = kt(&["events", "--keys"]);
    assert!(table.contains("Keys the guard does not manage:"), "{table}");
    for name in [
        "groq key ",
        "replicate key ",
        "mistral key ",
        "unknown format ",
    ] {
        assert!(table.contains(name), "{name} missing in:\n{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&kt(&["--output", "json", "events", "--keys"])).unwrap();
    let mut providers: Vec<Option<String>> = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["provider"].as_str().map(String::from))
        .collect();
    providers.sort();
    assert_eq!(
        providers,
        [
            None,
            Some("groq".to_string()),
            Some("mistral".to_string()),
            Some("replicate".to_string())
        ]
    );
    for key in [&groq, &replicate, &mistral, &legacy] {
        assert!(!table.contains(key.as_str()) && !json.to_string().contains(key.as_str()));
    }
    assert!(handle.shutdown());
    drop(gw);
}
