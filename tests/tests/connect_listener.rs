//! The explicit listener (`gateway.listen`: base URL, and CONNECT for
//! clients with `HTTPS_PROXY=http://127.0.0.1:<port>`) against hostile and
//! odd input, over real sockets, no root needed: a gateway in the test
//! process with one OpenAI target on a fake provider.
//!
//! Each refusal is a status, a text saying what to do and a `guard` event:
//! garbage, TLS sent straight to the port, malformed header lines, heads
//! over the cap or never finished, CONNECT authorities that are not
//! `host:port`. Provider names in odd spellings stay the provider's;
//! tunnels that carry no TLS or another name are refused; silent tunnels
//! are idle (closed to make room) and count in their user's budget.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use guard::config::Provider;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{MapResolver, Running, config, start, target};
use guard_tests::kt_run::JOB_KEY;
use guard_tests::raw_client::{
    HANG_GUARD, Tunnel, blocking, client_hello, drip, exchange, read_answer, read_until_close,
    refusal, refusals, status_of, tunnel,
};

const MANAGED: &str = "sk-managed-openai-CONNECTLISTENER-4242";
/// Proxy credentials a client may send to kt (never recorded).
const PROXY_AUTH: &str = "Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n";

/// A gateway with one OpenAI target on a fake provider; `gw.addr` is its
/// explicit listener.
struct Explicit {
    gw: Running,
    up: FakeProvider,
    _ca: TestCa,
}

impl Explicit {
    fn at(&self) -> SocketAddr {
        self.gw.addr
    }
}

async fn explicit(tune: impl FnOnce(&mut guard::config::Config)) -> Explicit {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "fake-provider", Behavior::Ok).await;
    let mut cfg = config(vec![target(
        "oa1",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA1",
    )]);
    tune(&mut cfg);
    let gw = start(cfg, MapResolver::of(&[("OA1", MANAGED)]), &ca).await;
    Explicit { gw, up, _ca: ca }
}

/// Asserts call `n` (1-based) went through kt to the fake provider with
/// the managed key, not the job's.
fn assert_kts(e: &Explicit, t: &Tunnel, n: usize) {
    let answer = t.call.as_ref().unwrap_or_else(|err| panic!("{t:?}: {err}"));
    assert_eq!(status_of(answer), 200, "{t:?}");
    let seen = e.up.requests();
    assert_eq!(seen.len(), n, "{seen:?}");
    let auth = seen[n - 1].headers.get("authorization").unwrap();
    assert_eq!(auth, &format!("Bearer {MANAGED}"));
    assert_ne!(auth, &format!("Bearer {JOB_KEY}"));
}

/// `CONNECT authority` with nothing after it; the answer head and the
/// connection (kept open by the caller).
fn silent_tunnel(at: SocketAddr, authority: &str) -> (String, TcpStream) {
    let mut t = TcpStream::connect(at).unwrap();
    t.set_read_timeout(Some(HANG_GUARD)).unwrap();
    t.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .unwrap();
    (read_answer(&mut t), t)
}

#[tokio::test]
async fn bytes_that_are_not_an_http_request_are_refused_with_a_reason_and_an_event() {
    let e = explicit(|_| {}).await;
    let hello = client_hello(e.gw.ca.cert_der(), "api.openai.com");
    let cases: [(&str, Vec<u8>, &str, &str); 4] = [
        (
            "binary",
            vec![0x00, 0xff, 0x13, 0x37, 0x0d, 0x0a, 0x0d, 0x0a],
            "explicit-not-http",
            "CONNECT host:port HTTP/1.1",
        ),
        (
            "TLS ClientHello (an https:// base URL or proxy URL)",
            hello,
            "explicit-tls-to-http",
            "not https://",
        ),
        (
            "a malformed header line",
            b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost api.openai.com\r\n\r\n".to_vec(),
            "explicit-bad-header",
            "Name: value",
        ),
        (
            "request line with a bad version",
            b"CONNECT api.openai.com:443 HTTX/9\r\n\r\n".to_vec(),
            "explicit-not-http",
            "base URL",
        ),
    ];
    for (what, bytes, rule, hint) in cases {
        let at = e.at();
        let answer = blocking(move || exchange(at, &bytes)).await;
        assert_eq!(status_of(&answer), 400, "{what}: {answer:?}");
        assert!(answer.contains("text/plain"), "{what}: {answer:?}");
        assert!(answer.contains(hint), "{what}: {answer:?}");
        refusal(&e.gw.sink, rule).await;
    }
    assert!(e.up.requests().is_empty());
}

#[tokio::test]
async fn a_head_too_large_gets_431_and_a_head_that_never_ends_408() {
    let e = explicit(|_| {}).await;
    let at = e.at();
    let mut big = b"CONNECT api.openai.com:443 HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        big.extend_from_slice(format!("x-pad-{i}: {}\r\n", "a".repeat(700)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let answer = blocking(move || exchange(at, &big)).await;
    assert_eq!(status_of(&answer), 431, "{answer:?}");
    refusal(&e.gw.sink, "explicit-head-too-large").await;

    // A head that stops half way, one dripped a byte at a time, and a
    // provider tunnel silent after kt's 200: answered or closed with an
    // event once their deadline passes, never a hang.
    let stalled = blocking(move || {
        exchange(
            at,
            b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n",
        )
    });
    let dripping = blocking(move || drip(at, b"CONNECT api.openai.com:443 HTTP/1.1\r\nX-Slow: "));
    let silent = blocking(move || {
        let (answer, mut t) = silent_tunnel(at, "api.openai.com:443");
        (answer, read_until_close(&mut t))
    });
    let (stalled, dripping, silent) = tokio::join!(stalled, dripping, silent);
    for answer in [stalled, dripping] {
        assert_eq!(status_of(&answer), 408, "{answer:?}");
        assert!(answer.contains("no complete request head"), "{answer:?}");
    }
    refusal(&e.gw.sink, "explicit-head-timeout").await;
    assert_eq!(status_of(&silent.0), 200, "{silent:?}");
    assert_eq!(
        refusal(&e.gw.sink, "hello-timeout").await,
        "api.openai.com:443"
    );
    assert!(e.up.requests().is_empty());
}

#[tokio::test]
async fn odd_connect_authorities_are_refused_without_echoing_credentials() {
    let e = explicit(|_| {}).await;
    let cases = [
        ("api.openai.com", "has no port"),
        (":443", "names no host"),
        ("api.openai.com:0", "1 to 65535"),
        ("api.openai.com:70000", "1 to 65535"),
        ("alice:s3cret@api.openai.com:443", "Proxy-Authorization"),
        ("::1:443", "IPv6 address in brackets"),
        ("2130706433:443", "dotted-decimal"),
        ("0x7f.1:443", "dotted-decimal"),
        ("api..openai.com:443", "not a host name"),
    ];
    for (authority, hint) in cases {
        let at = e.at();
        let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{PROXY_AUTH}\r\n");
        let answer = blocking(move || exchange(at, head.as_bytes())).await;
        assert_eq!(status_of(&answer), 400, "{authority}: {answer:?}");
        assert!(answer.contains(hint), "{authority}: {answer:?}");
        assert!(!answer.contains("s3cret"), "{authority}: {answer:?}");
    }
    // `connect` in another case is no tunnel request.
    let at = e.at();
    let answer = blocking(move || {
        exchange(
            at,
            b"connect api.openai.com:443 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    })
    .await;
    assert_eq!(status_of(&answer), 405, "{answer:?}");
    refusal(&e.gw.sink, "connect-bad-method").await;
    let rules = refusals(&e.gw.sink);
    let bad = rules
        .iter()
        .filter(|(r, _)| r == "connect-bad-authority")
        .count();
    assert_eq!(bad, cases.len(), "{rules:?}");
    let recorded = format!("{:?}", e.gw.sink.snapshot());
    for secret in ["s3cret", "YWxpY2U6czNjcmV0"] {
        assert!(!recorded.contains(secret), "{secret} in events: {recorded}");
    }
    assert!(e.up.requests().is_empty());
}

/// A later CONNECT on a kept connection (after a 403) gets the same
/// checks as the first, and later garbage an event besides hyper's 400.
#[tokio::test]
async fn a_later_connect_on_a_kept_connection_gets_the_same_checks() {
    let e = explicit(|_| {}).await;
    let at = e.at();
    let answers = blocking(move || {
        let mut tcp = TcpStream::connect(at).unwrap();
        tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut answers = Vec::new();
        for head in [
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "CONNECT api.openai.com HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
        ] {
            tcp.write_all(head.as_bytes()).unwrap();
            answers.push(read_answer(&mut tcp));
        }
        let _ = tcp.write_all(b"\x00\x01\x02 garbage\r\n\r\n");
        answers.push(read_until_close(&mut tcp));
        answers
    })
    .await;
    assert_eq!(status_of(&answers[0]), 403, "{answers:?}");
    assert_eq!(status_of(&answers[1]), 400, "{answers:?}");
    assert!(answers[1].contains("has no port"), "{answers:?}");
    assert_eq!(status_of(&answers[2]), 400, "{answers:?}");
    refusal(&e.gw.sink, "explicit-not-http").await;
    let rules: Vec<String> = refusals(&e.gw.sink).into_iter().map(|r| r.0).collect();
    assert_eq!(
        rules,
        [
            "connect-not-allowed",
            "connect-bad-authority",
            "explicit-not-http"
        ]
    );
}

/// A provider's name in another case or with a trailing dot is the
/// provider (terminated, managed key), never "another host" refused or
/// let through `gateway.connect_allow`.
#[tokio::test]
async fn provider_authorities_in_odd_spellings_stay_the_providers() {
    let e = explicit(|c| c.gateway.connect_allow = vec!["localhost".into()]).await;
    let ca = e.gw.ca.cert_der().clone();
    let up_port = e.up.addr.port();
    let authorities = [
        "API.OPENAI.COM:443".to_string(),
        "api.openai.com.:443".to_string(),
        "Api.OpenAI.com.:443".to_string(),
        format!("127.0.0.1.:{up_port}"),
        "[::1]:443".to_string(),
    ];
    for (i, authority) in authorities.into_iter().enumerate() {
        let (at, c) = (e.at(), ca.clone());
        let t = blocking(move || tunnel(at, &authority, "", "api.openai.com", &c, false)).await;
        assert_kts(&e, &t, i + 1);
    }
    // The allowlist judges the name as spelled for DNS: an allowed name in
    // odd case is still checked for internal addresses; another is 403.
    for (authority, rule) in [
        ("LOCALHOST.:443", "connect-internal-address"),
        ("Example.COM.:443", "connect-not-allowed"),
    ] {
        let at = e.at();
        let (answer, _t) = blocking(move || silent_tunnel(at, authority)).await;
        assert_eq!(status_of(&answer), 403, "{authority}: {answer:?}");
        refusal(&e.gw.sink, rule).await;
    }
}

#[tokio::test]
async fn a_provider_tunnel_without_tls_or_naming_another_host_is_refused() {
    let e = explicit(|_| {}).await;
    let at = e.at();
    let answer = blocking(move || {
        exchange(
            at,
            b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
        )
    })
    .await;
    let second = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(status_of(&answer), 200, "{answer:?}");
    assert_eq!(status_of(second), 400, "{answer:?}");
    assert!(answer.contains("must carry TLS"), "{answer:?}");
    assert_eq!(refusal(&e.gw.sink, "not-tls").await, "api.openai.com:443");

    let ca = e.gw.ca.cert_der().clone();
    let t =
        blocking(move || tunnel(at, "api.openai.com:443", "", "www.example.com", &ca, false)).await;
    assert_eq!(status_of(&t.connect), 200, "{t:?}");
    assert!(t.call.is_err(), "{t:?}");
    assert_eq!(
        refusal(&e.gw.sink, "non-provider-name").await,
        "api.openai.com:443 (sni www.example.com)"
    );
    assert!(e.up.requests().is_empty());
}

/// A ClientHello sent in the same write as the CONNECT head is kept.
#[tokio::test]
async fn a_client_hello_pipelined_with_the_connect_head_is_kept() {
    let e = explicit(|_| {}).await;
    let ca = e.gw.ca.cert_der().clone();
    let up_port = e.up.addr.port();
    for (i, authority) in [
        "api.openai.com:443".to_string(),
        format!("127.0.0.1:{up_port}"),
        "127.0.0.9:443".to_string(),
    ]
    .into_iter()
    .enumerate()
    {
        let (at, c) = (e.at(), ca.clone());
        let t =
            blocking(move || tunnel(at, &authority, PROXY_AUTH, "api.openai.com", &c, true)).await;
        assert_kts(&e, &t, i + 1);
    }
}

/// Silent tunnels (to a name, to an address) and connections that send
/// nothing take slots of the budget but are closed to make room: a real
/// client still gets through.
#[tokio::test]
async fn silent_tunnels_cannot_lock_the_listener_out() {
    for authority in ["api.openai.com:443", "127.0.0.9:443"] {
        let e = explicit(|c| c.gateway.max_connections = 4).await;
        let at = e.at();
        let silent = blocking(move || {
            (0..4)
                .map(|_| {
                    let (answer, t) = silent_tunnel(at, authority);
                    assert_eq!(status_of(&answer), 200, "{answer:?}");
                    t
                })
                .collect::<Vec<TcpStream>>()
        })
        .await;
        let ca = e.gw.ca.cert_der().clone();
        let t =
            blocking(move || tunnel(at, "api.openai.com:443", "", "api.openai.com", &ca, false))
                .await;
        assert_kts(&e, &t, 1);
        // The oldest silent tunnel was closed to make room, without a word.
        let mut first = silent.into_iter().next().unwrap();
        let answer = blocking(move || read_until_close(&mut first)).await;
        assert_eq!(answer, "", "{authority}");
    }

    let e = explicit(|c| c.gateway.max_connections = 4).await;
    let at = e.at();
    let _idle: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(at).unwrap()).collect();
    let ca = e.gw.ca.cert_der().clone();
    let t =
        blocking(move || tunnel(at, "api.openai.com:443", "", "api.openai.com", &ca, false)).await;
    assert_kts(&e, &t, 1);
}

/// `gateway.max_connections_per_uid` holds for tunnels: each keeps its
/// client's slot while it lives, and a CONNECT over the budget is refused
/// (it never becomes a tunnel of an unnamed client).
#[tokio::test]
async fn tunnels_count_in_their_users_connection_budget() {
    let e = explicit(|c| c.gateway.max_connections_per_uid = 2).await;
    let at = e.at();
    let (first, second, third) = blocking(move || {
        let a = silent_tunnel(at, "api.openai.com:443");
        let b = silent_tunnel(at, "127.0.0.9:443");
        let c = silent_tunnel(at, "api.openai.com:443");
        (a, b, c)
    })
    .await;
    assert_eq!(status_of(&first.0), 200, "{first:?}");
    assert_eq!(status_of(&second.0), 200, "{second:?}");
    assert_eq!(status_of(&third.0), 429, "{third:?}");
    assert!(third.0.contains("max_connections_per_uid"), "{third:?}");
    refusal(&e.gw.sink, "uid-connection-budget").await;
    assert_eq!(e.gw.gw.uid_budget_refusals(), 1);
}

/// HTTP/2 with prior knowledge is a base-URL client's to use (served as
/// before); a CONNECT stream on it gets the same authority checks.
#[tokio::test]
async fn http2_prior_knowledge_is_served_and_its_connect_streams_are_checked() {
    use http_body_util::{BodyExt as _, Empty};
    let e = explicit(|_| {}).await;
    let tcp = tokio::net::TcpStream::connect(e.at()).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/openai/v1/chat/completions", e.at()))
        .header("authorization", format!("Bearer {JOB_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            guard_tests::gateway_fixture::chat_body(false),
        )))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(e.up.requests().len(), 1);

    let tcp = tokio::net::TcpStream::connect(e.at()).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::connect("api.openai.com")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("has no port"),
        "{body:?}"
    );
    refusal(&e.gw.sink, "connect-bad-authority").await;
}
