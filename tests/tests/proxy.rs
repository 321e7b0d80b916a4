//! Declared proxies under `kt run`, as root, in a child cgroup: a fake HTTP
//! proxy on loopback (started here, outside the cgroup) records every
//! request head it gets; jobs in the cgroup use it through `HTTPS_PROXY`.
//!
//! - a provider name through the proxy reaches the fake provider with the
//!   managed key, and the proxy never sees that CONNECT;
//! - another authority reaches the proxy exactly as the job sent it
//!   (Proxy-Authorization included), and the job gets the proxy's answer
//!   (407, or 200);
//! - kt's own upstream goes through `gateway.upstream_proxy` (the proxy sees
//!   kt's CONNECT to the provider target).
//!
//! Only loopback: the proxy tunnels to 127.0.0.0/8 only and answers 502
//! for anything else.
//!
//! The second half needs no root: a gateway in the test process serves its
//! proxy listener on loopback (the listener kt runs, fed by a fixed capture
//! record naming the fake proxy), and clients send it what hostile or odd
//! clients send — garbage, TLS or HTTP/2 straight to the proxy port, heads
//! too large or never finished, odd CONNECT authorities, tunnels without
//! TLS — over real sockets. Each gets a status, a text saying what to do
//! and an event, and nothing odd reaches the proxy.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};

use guard_tests::kt_run::{JOB_KEY, KtRun, MANAGED_KEY, guard_rule};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
/// Basic base64 of `alice:s3cret`.
const PROXY_AUTH: &str = "Basic YWxpY2U6czNjcmV0";

fn skip() -> bool {
    guard_tests::ebpf_tests_off("proxy")
}

/// One request head the fake proxy received.
#[derive(Clone, Debug)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A small CONNECT proxy: `deny.test` gets 407, `site.test` gets 200 and
/// a closed tunnel, loopback authorities are tunnelled, the rest 502.
struct FakeProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn read_head(r: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Some(Seen {
        line: line.trim_end().to_string(),
        headers,
    })
}

fn splice(a: TcpStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (mut a, mut b) = (a, b);
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut b, &mut a);
    let _ = a.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

fn serve(stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    while let Some(head) = read_head(&mut r) {
        seen.lock().unwrap().push(head.clone());
        let authority = head
            .line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        if authority.contains("deny.test") {
            let body = "proxy says no";
            let _ = write!(
                w,
                "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"fake\"\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            continue;
        }
        if authority.contains("site.test") {
            let _ = w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            return;
        }
        let target: Option<SocketAddr> = authority.parse().ok();
        match target.filter(|t| t.ip().is_loopback()) {
            Some(t) => match TcpStream::connect(t) {
                Ok(up) => {
                    let _ = w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                    // Bytes the client sent after the head are in `r`'s buffer.
                    let buffered = r.buffer().to_vec();
                    let mut up2 = up.try_clone().unwrap();
                    let _ = up2.write_all(&buffered);
                    splice(w, up);
                    return;
                }
                Err(_) => {
                    let _ = w.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
                }
            },
            None => {
                let _ = w.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
            }
        }
    }
}

impl FakeProxy {
    fn start() -> FakeProxy {
        FakeProxy::start_at("127.0.0.1:0")
    }

    fn start_at(addr: &str) -> FakeProxy {
        let l = TcpListener::bind(addr).unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for stream in l.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(stream, s));
            }
        });
        FakeProxy { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// curl in the cgroup through `HTTPS_PROXY=http://proxy`, printing the
/// proxy's CONNECT answer code (`%{http_connect}`) and the body.
fn curl_via(proxy: SocketAddr, ca: &std::path::Path, url: &str, extra: &str) -> Command {
    let script = format!(
        r#"read go; exec curl -sS --max-time 20 --cacert "{ca}" {extra} -w '\nconnect=%{{http_connect}}\n' {url}"#,
        ca = ca.display()
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script])
        .env("HTTPS_PROXY", format!("http://{proxy}"))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    c
}

#[test]
fn a_proxied_provider_call_is_kts_and_every_other_authority_reaches_the_proxy_unchanged() {
    if skip() {
        return;
    }
    let proxy = FakeProxy::start();
    let mut s = KtRun::start(
        KT,
        "proxy",
        44,
        &format!("  upstream_proxy: http://{}\n", proxy.addr),
        &format!("  proxies: [\"{}\"]\n", proxy.addr),
    );
    let kt_ca = s.kt_ca.clone();

    // (a) A provider through the proxy: kt's, with the managed key.
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let extra = format!(
        "-H 'Authorization: Bearer {JOB_KEY}' -H 'content-type: application/json' -d '{body}'"
    );
    let call = s.job(&mut curl_via(
        proxy.addr,
        &kt_ca,
        "https://api.openai.com/v1/chat/completions",
        &extra,
    ));
    assert!(call.status.success(), "{call:?}\nkt log:\n{}", s.log());
    assert!(call.stdout.contains("fake-provider"), "{call:?}");
    let seen = s.provider.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {MANAGED_KEY}")
    );
    let heads = proxy.seen();
    assert!(
        heads.iter().all(|h| !h.line.contains("api.openai.com")),
        "the proxy saw the provider CONNECT: {heads:?}"
    );
    // kt's own upstream went through the upstream proxy, by CONNECT, to
    // the provider target.
    let target = format!("CONNECT {}:443 HTTP/1.1", s.provider_ip);
    assert!(
        heads
            .iter()
            .any(|h| h.line == target && h.header("proxy-authorization").is_none()),
        "kt's upstream did not use the proxy: {heads:?}"
    );

    // (a2) The provider's address as the authority, its name in the hello:
    // kt's too (decided by the hello, never passed to the proxy).
    let by_ip = s.job(&mut curl_via(
        proxy.addr,
        &kt_ca,
        "https://api.openai.com/v1/chat/completions",
        &format!(
            "{extra} --connect-to api.openai.com:443:{}:443",
            s.provider_ip
        ),
    ));
    assert!(by_ip.status.success(), "{by_ip:?}\nkt log:\n{}", s.log());
    let seen = s.provider.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[1].headers.get("authorization").unwrap(),
        &format!("Bearer {MANAGED_KEY}")
    );
    assert!(
        proxy
            .seen()
            .iter()
            .all(|h| h.header("user-agent").is_none()),
        "a job's CONNECT reached the proxy: {:?}",
        proxy.seen()
    );
    // Another name on an address: replayed to the proxy (which cannot
    // reach it and answers 502; the job then sees the connection close).
    let other_ip = s.job(&mut curl_via(
        proxy.addr,
        &kt_ca,
        "https://site.test/",
        "--proxy-user alice:s3cret --connect-to site.test:443:127.0.0.9:443",
    ));
    assert!(!other_ip.status.success(), "{other_ip:?}");
    let heads = proxy.seen();
    let h = heads
        .iter()
        .find(|h| h.line == "CONNECT 127.0.0.9:443 HTTP/1.1")
        .unwrap_or_else(|| panic!("the proxy never saw the address CONNECT: {heads:?}"));
    assert_eq!(h.header("Proxy-Authorization"), Some(PROXY_AUTH), "{h:?}");

    // (b) Another authority: the proxy's own answer, a 407.
    let denied = s.job(&mut curl_via(
        proxy.addr,
        &kt_ca,
        "https://deny.test/",
        "--proxy-user alice:s3cret",
    ));
    assert!(denied.stdout.contains("connect=407"), "{denied:?}");
    // And a 200: the tunnel is the proxy's (it closes it at once, so TLS fails).
    let tunnelled = s.job(&mut curl_via(
        proxy.addr,
        &kt_ca,
        "https://site.test/",
        "--proxy-user alice:s3cret",
    ));
    assert!(tunnelled.stdout.contains("connect=200"), "{tunnelled:?}");
    let heads = proxy.seen();
    for authority in ["deny.test:443", "site.test:443"] {
        let h = heads
            .iter()
            .find(|h| h.line == format!("CONNECT {authority} HTTP/1.1"))
            .unwrap_or_else(|| panic!("the proxy never saw CONNECT {authority}: {heads:?}"));
        // As the job sent it: its credentials and its own headers, with
        // their case.
        assert_eq!(h.header("Proxy-Authorization"), Some(PROXY_AUTH), "{h:?}");
        assert!(
            h.headers
                .iter()
                .any(|(k, v)| k == "User-Agent" && v.starts_with("curl/")),
            "{h:?}"
        );
        assert_eq!(h.header("Host"), Some(authority), "{h:?}");
    }

    // Events name the authority, never the proxy credentials.
    let e = s.wait_event(KT, "the forwarded CONNECT event", |e| {
        guard_rule(e) == Some("proxy-forwarded")
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("deny.test:443"))
    });
    assert_eq!(e["client"]["pid"], denied.pid, "{e}");
    let provider_event = s.wait_event(KT, "the provider call event", |e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("chat/completions"))
    });
    assert_eq!(
        provider_event["client"]["pid"], call.pid,
        "{provider_event}"
    );
    let all = serde_json::to_string(&s.events(KT)).unwrap();
    let log = s.log();
    for secret in ["YWxpY2U6czNjcmV0", "s3cret", JOB_KEY, MANAGED_KEY] {
        assert!(!all.contains(secret), "{secret} in the events: {all}");
        assert!(!log.contains(secret), "{secret} in kt's log: {log}");
    }
}

/// A plain-HTTP proxy request for a provider would carry its key in clear
/// text to the proxy: refused. One for another host goes to the proxy as is.
#[test]
fn plain_http_through_the_proxy_is_forwarded_except_to_a_provider() {
    if skip() {
        return;
    }
    let proxy = FakeProxy::start();
    let mut s = KtRun::start(
        KT,
        "proxy-plain",
        45,
        "",
        &format!("  proxies: [\"{}\"]\n", proxy.addr),
    );
    let plain = |url: &str| {
        let script = format!(
            r#"read go; exec curl -sS --max-time 20 -o /dev/null -w 'status=%{{http_code}}\n' -H 'Authorization: Bearer {JOB_KEY}' {url}"#
        );
        let mut c = Command::new("sh");
        c.args(["-c", &script])
            .env("http_proxy", format!("http://{}", proxy.addr))
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        c
    };
    let refused = s.job(&mut plain("http://api.openai.com/v1/models"));
    assert_eq!(refused.field("status"), Some("403"), "{refused:?}");
    let forwarded = s.job(&mut plain("http://deny.test/page"));
    // The fake proxy answers 407 to that host.
    assert_eq!(forwarded.field("status"), Some("407"), "{forwarded:?}");
    let heads = proxy.seen();
    assert!(
        heads
            .iter()
            .any(|h| h.line == "GET http://deny.test/page HTTP/1.1"),
        "{heads:?}"
    );
    assert!(
        heads.iter().all(|h| !h.line.contains("api.openai.com")),
        "{heads:?}"
    );
}

/// `kt gateway check --verbose` warns about a proxy variable of its
/// environment while no proxy is declared, without the credentials.
#[test]
fn gateway_check_warns_about_an_undeclared_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/provider-key-rotation.yaml"
    ))
    .unwrap();
    let plain = dir.path().join("plain.yaml");
    std::fs::write(&plain, &seed).unwrap();
    let declared = dir.path().join("declared.yaml");
    std::fs::write(
        &declared,
        format!("{seed}\ncapture:\n  proxies: [\"proxy.corp.example:3128\"]\n"),
    )
    .unwrap();
    let check = |cfg: &std::path::Path| {
        let out = Command::new(KT)
            .args(["gateway", "check", "--verbose", "--config"])
            .arg(cfg)
            .env("KT_DATA_DIR", dir.path().join("data"))
            .env("HTTPS_PROXY", "http://alice:s3cret@proxy.corp.example:3128")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let warned = check(&plain);
    assert!(
        warned.contains("HTTPS_PROXY is set in the environment (proxy.corp.example:3128)")
            && warned.contains("capture.proxies is empty"),
        "{warned}"
    );
    assert!(!warned.contains("s3cret"), "{warned}");
    let quiet = check(&declared);
    assert!(!quiet.contains("capture.proxies is empty"), "{quiet}");
}

/// A proxy on an IPv6 address: the job's connection goes to kt's IPv6
/// proxy listener; a provider CONNECT is kt's, another reaches the proxy.
#[test]
fn an_ipv6_proxy_is_captured_too() {
    if skip() {
        return;
    }
    let proxy = FakeProxy::start_at("[::1]:0");
    let mut s = KtRun::start(
        KT,
        "proxy-v6",
        47,
        "",
        &format!("  proxies: [\"{}\"]\n", proxy.addr),
    );
    let kt_ca = s.kt_ca.clone();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let extra = format!(
        "-H 'Authorization: Bearer {JOB_KEY}' -H 'content-type: application/json' -d '{body}'"
    );
    let call = s.job(&mut curl_via(
        proxy.addr,
        &kt_ca,
        "https://api.openai.com/v1/chat/completions",
        &extra,
    ));
    assert!(call.status.success(), "{call:?}\nkt log:\n{}", s.log());
    let seen = s.provider.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {MANAGED_KEY}")
    );
    let denied = s.job(&mut curl_via(
        proxy.addr,
        &kt_ca,
        "https://deny.test/",
        "--proxy-user alice:s3cret",
    ));
    assert!(denied.stdout.contains("connect=407"), "{denied:?}");
    let heads = proxy.seen();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_eq!(heads[0].line, "CONNECT deny.test:443 HTTP/1.1");
}

// ---------------------------------------------------------------------
// The proxy listener against hostile and odd input (no root needed).

use std::io::Read;

use guard::config::Provider;
use guard::record::ClientInfo;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{FixedLookup, MapResolver, Running, config, start, target};
use guard_tests::raw_client::{
    self, HANG_GUARD, Tunnel, blocking, client_hello, drip, exchange, read_answer,
    read_until_close, refusal, refusals, status_of,
};
use rustls_pki_types::CertificateDer;
const MANAGED: &str = "sk-managed-openai-PROXYLISTENER-7777";

/// A gateway with one OpenAI target on a fake provider, its proxy listener
/// on loopback, and the fake proxy the "captured" connections were for.
struct Listener {
    gw: Running,
    up: FakeProvider,
    proxy: FakeProxy,
    at: SocketAddr,
    _ca: TestCa,
}

async fn listener(max_connections: Option<usize>) -> Listener {
    listener_for(max_connections, None, ClientInfo::default()).await
}

/// As [`listener`], with a per-uid budget and the process capture names.
async fn listener_for(
    max_connections: Option<usize>,
    per_uid: Option<usize>,
    client: ClientInfo,
) -> Listener {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "fake-provider", Behavior::Ok).await;
    let mut cfg = config(vec![target(
        "oa1",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA1",
    )]);
    // The fake provider's port counts as a capture port, as 443 does for
    // a real one: a CONNECT to its address is decided by the hello.
    cfg.capture.ports = vec![443, up.addr.port()];
    if let Some(n) = max_connections {
        cfg.gateway.max_connections = n;
    }
    if let Some(n) = per_uid {
        cfg.gateway.max_connections_per_uid = n;
    }
    let gw = start(cfg, MapResolver::of(&[("OA1", MANAGED)]), &ca).await;
    let proxy = FakeProxy::start();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let g = gw.gw.clone();
    let lookup = Arc::new(FixedLookup(proxy.addr, client));
    tokio::spawn(async move { g.serve_proxy_listener(l, lookup).await });
    Listener {
        gw,
        up,
        proxy,
        at,
        _ca: ca,
    }
}

/// `CONNECT authority` (with proxy credentials), then TLS naming `sni`
/// and a chat request with a hard-coded key (see [`raw_client::tunnel`]).
fn tunnel(
    at: SocketAddr,
    authority: &str,
    sni: &str,
    ca: &CertificateDer<'static>,
    pipelined: bool,
) -> Tunnel {
    let auth = format!("Proxy-Authorization: {PROXY_AUTH}\r\n");
    raw_client::tunnel(at, authority, &auth, sni, ca, pipelined)
}

/// Asserts a call went through kt to the fake provider with the managed key.
fn assert_kts(l: &Listener, t: &Tunnel, calls: usize) {
    let answer = t.call.as_ref().unwrap_or_else(|e| panic!("{t:?}: {e}"));
    assert_eq!(status_of(answer), 200, "{t:?}");
    let seen = l.up.requests();
    assert_eq!(seen.len(), calls, "{seen:?}");
    assert_eq!(
        seen[calls - 1].headers.get("authorization").unwrap(),
        &format!("Bearer {MANAGED}")
    );
}

#[tokio::test]
async fn bytes_that_are_not_an_http_request_are_refused_with_a_reason_and_an_event() {
    let l = listener(None).await;
    let hello = client_hello(l.gw.ca.cert_der(), "api.openai.com");
    let cases: [(&str, Vec<u8>, &str, &str); 6] = [
        (
            "binary",
            vec![0x00, 0xff, 0x13, 0x37, 0x0d, 0x0a, 0x0d, 0x0a],
            "proxy-not-http",
            "CONNECT host:port HTTP/1.1",
        ),
        (
            "TLS ClientHello",
            hello,
            "proxy-tls-to-http-proxy",
            "HTTPS_PROXY=http://",
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            "proxy-http2",
            "HTTP/1.1",
        ),
        (
            "a malformed header line",
            b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost api.openai.com\r\n\r\n".to_vec(),
            "proxy-bad-header",
            "Name: value",
        ),
        (
            "a request that is not a proxy request",
            b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n"
                .to_vec(),
            "proxy-no-target",
            "must name its target",
        ),
        (
            "request line with a bad version",
            b"CONNECT api.openai.com:443 HTTX/9\r\n\r\n".to_vec(),
            "proxy-not-http",
            "CONNECT host:port HTTP/1.1",
        ),
    ];
    for (what, bytes, rule, hint) in cases {
        let at = l.at;
        let answer = blocking(move || exchange(at, &bytes)).await;
        assert_eq!(status_of(&answer), 400, "{what}: {answer:?}");
        assert!(answer.contains("text/plain"), "{what}: {answer:?}");
        assert!(answer.contains(hint), "{what}: {answer:?}");
        refusal(&l.gw.sink, rule).await;
    }
    assert!(l.proxy.seen().is_empty(), "{:?}", l.proxy.seen());
    assert!(l.up.requests().is_empty());
}

#[tokio::test]
async fn a_head_too_large_gets_431_and_a_head_that_never_ends_408() {
    let l = listener(None).await;
    // Over the 64 KiB cap, one header at a time.
    let mut big = b"CONNECT api.openai.com:443 HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        big.extend_from_slice(format!("x-pad-{i}: {}\r\n", "a".repeat(700)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let at = l.at;
    let answer = blocking(move || exchange(at, &big)).await;
    assert_eq!(status_of(&answer), 431, "{answer:?}");
    refusal(&l.gw.sink, "proxy-head-too-large").await;

    // A head that stops half way, and one sent a byte at a time without
    // end: both get 408 once the head deadline passes, never a hang.
    let stalled = blocking(move || {
        exchange(
            at,
            b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n",
        )
    });
    let dripping = blocking(move || drip(at, b"CONNECT api.openai.com:443 HTTP/1.1\r\nX-Slow: "));
    // And a provider tunnel that stays silent after kt's 200.
    let silent = blocking(move || {
        let mut tcp = TcpStream::connect(at).unwrap();
        tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
        tcp.write_all(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
            .unwrap();
        read_until_close(&mut tcp)
    });
    let (stalled, dripping, silent) = tokio::join!(stalled, dripping, silent);
    for answer in [stalled, dripping] {
        assert_eq!(status_of(&answer), 408, "{answer:?}");
        assert!(answer.contains("no complete request head"), "{answer:?}");
    }
    refusal(&l.gw.sink, "proxy-head-timeout").await;
    assert_eq!(status_of(&silent), 200, "{silent:?}");
    assert_eq!(
        refusal(&l.gw.sink, "hello-timeout").await,
        "api.openai.com:443"
    );
    assert!(l.proxy.seen().is_empty(), "{:?}", l.proxy.seen());
}

#[tokio::test]
async fn odd_connect_authorities_are_refused_and_never_reach_the_proxy() {
    let l = listener(None).await;
    let cases = [
        ("api.openai.com", "has no port"),
        (":443", "names no host"),
        ("api.openai.com:0", "1 to 65535"),
        ("api.openai.com:70000", "1 to 65535"),
        ("alice:s3cret@api.openai.com:443", "Proxy-Authorization"),
        ("alice:s3cret@site.test:443", "Proxy-Authorization"),
        ("::1:443", "IPv6 address in brackets"),
        // Numeric names a resolver may read as an address (127.0.0.1).
        ("2130706433:443", "dotted-decimal"),
        ("0x7f.1:443", "dotted-decimal"),
        ("api..openai.com:443", "not a host name"),
    ];
    for (authority, hint) in cases {
        let at = l.at;
        let head = format!(
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {PROXY_AUTH}\r\n\r\n"
        );
        let answer = blocking(move || exchange(at, head.as_bytes())).await;
        assert_eq!(status_of(&answer), 400, "{authority}: {answer:?}");
        assert!(answer.contains(hint), "{authority}: {answer:?}");
        assert!(!answer.contains("s3cret"), "{authority}: {answer:?}");
    }
    // Requests that a lenient proxy could still take for a tunnel.
    for (head, status, rule) in [
        ("connect 127.0.0.9:443 HTTP/1.1", 405, "proxy-bad-method"),
        ("GET site.test:443 HTTP/1.1", 400, "proxy-no-target"),
        ("GET 127.0.0.9:443 HTTP/1.1", 400, "proxy-no-target"),
    ] {
        let at = l.at;
        let bytes = format!("{head}\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = blocking(move || exchange(at, bytes.as_bytes())).await;
        assert_eq!(status_of(&answer), status, "{head}: {answer:?}");
        refusal(&l.gw.sink, rule).await;
    }
    let rules = refusals(&l.gw.sink);
    assert_eq!(rules.len(), cases.len() + 3, "{rules:?}");
    assert_eq!(
        rules
            .iter()
            .filter(|(r, _)| r == "proxy-bad-authority")
            .count(),
        cases.len(),
        "{rules:?}"
    );
    // The event says what the client was told.
    let notes: Vec<String> =
        l.gw.sink
            .snapshot()
            .into_iter()
            .filter_map(|r| r.note)
            .collect();
    assert!(
        notes.iter().any(|n| n
            == "proxy request refused (400): CONNECT api.openai.com has no port: write host:port (CONNECT api.openai.com:443)"),
        "{notes:?}"
    );
    let recorded = format!("{:?}", l.gw.sink.snapshot());
    for secret in ["s3cret", "YWxpY2U6czNjcmV0"] {
        assert!(!recorded.contains(secret), "{secret} in events: {recorded}");
    }
    assert!(l.proxy.seen().is_empty(), "{:?}", l.proxy.seen());
}

/// A provider's name spelled otherwise is still the provider: captured by
/// kt, never replayed to the proxy (which would carry the job's key out
/// around the guard). Same for the provider's address with a trailing dot.
#[tokio::test]
async fn provider_authorities_in_odd_spellings_stay_kts() {
    let l = listener(None).await;
    let ca = l.gw.ca.cert_der().clone();
    let up_port = l.up.addr.port();
    let authorities = [
        "API.OPENAI.COM:443".to_string(),
        "api.openai.com.:443".to_string(),
        "Api.OpenAI.com.:443".to_string(),
        format!("127.0.0.1.:{up_port}"),
        "[::1]:443".to_string(),
        // An address that is no target's, with a trailing dot: still an
        // address, decided by the hello (was replayed to the proxy).
        "127.0.0.9.:443".to_string(),
    ];
    for (i, authority) in authorities.into_iter().enumerate() {
        let (at, c) = (l.at, ca.clone());
        let t = blocking(move || tunnel(at, &authority, "api.openai.com", &c, false)).await;
        assert_kts(&l, &t, i + 1);
    }
    assert!(l.proxy.seen().is_empty(), "{:?}", l.proxy.seen());

    // An address authority with another name inside: the proxy's, replayed
    // exactly as sent (brackets, trailing dot and credentials included).
    for authority in ["[::1]:443", "127.0.0.9.:443"] {
        let (at, c) = (l.at, ca.clone());
        let t = blocking(move || tunnel(at, authority, "site.test", &c, false)).await;
        assert!(t.call.is_err(), "{t:?}");
        let heads = l.proxy.seen();
        let h = heads
            .iter()
            .find(|h| h.line == format!("CONNECT {authority} HTTP/1.1"))
            .unwrap_or_else(|| panic!("the proxy never saw CONNECT {authority}: {heads:?}"));
        assert_eq!(h.header("Proxy-Authorization"), Some(PROXY_AUTH), "{h:?}");
    }
    assert_eq!(l.up.requests().len(), 6);
}

#[tokio::test]
async fn a_provider_tunnel_without_tls_or_naming_another_host_is_refused() {
    let l = listener(None).await;
    let at = l.at;
    // Plain HTTP inside the tunnel: a readable 400 after the 200.
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
    assert_eq!(
        refusal(&l.gw.sink, "not-tls").await,
        "api.openai.com:443",
        "{:?}",
        refusals(&l.gw.sink)
    );

    // TLS naming another host: an alert, and the event names that host.
    let ca = l.gw.ca.cert_der().clone();
    let t = blocking(move || tunnel(at, "api.openai.com:443", "www.example.com", &ca, false)).await;
    assert_eq!(status_of(&t.connect), 200, "{t:?}");
    assert!(t.call.is_err(), "{t:?}");
    assert_eq!(
        refusal(&l.gw.sink, "non-provider-name").await,
        "api.openai.com:443 (sni www.example.com)"
    );
    assert!(l.up.requests().is_empty());
    assert!(l.proxy.seen().is_empty(), "{:?}", l.proxy.seen());
}

/// A client that sends its ClientHello in the same write as the CONNECT
/// head: the hello is not lost, the call is kt's.
#[tokio::test]
async fn a_client_hello_pipelined_with_the_connect_head_is_kept() {
    let l = listener(None).await;
    let ca = l.gw.ca.cert_der().clone();
    let up_port = l.up.addr.port();
    // A name, a target's address, another address (decided by the hello).
    for (i, authority) in [
        "api.openai.com:443".to_string(),
        format!("127.0.0.1:{up_port}"),
        "127.0.0.9:443".to_string(),
    ]
    .into_iter()
    .enumerate()
    {
        let (at, c) = (l.at, ca.clone());
        let t = blocking(move || tunnel(at, &authority, "api.openai.com", &c, true)).await;
        assert_kts(&l, &t, i + 1);
    }
    assert!(l.proxy.seen().is_empty(), "{:?}", l.proxy.seen());

    // Another authority: the bytes after the head follow the proxy's 200
    // into its tunnel, to the end server.
    let end = TcpListener::bind("127.0.0.1:0").unwrap();
    let end_addr = end.local_addr().unwrap();
    let hello = client_hello(&ca, "site.test");
    let want = hello.len();
    let got = std::thread::spawn(move || {
        let (mut s, _) = end.accept().unwrap();
        s.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut got = vec![0u8; want];
        s.read_exact(&mut got).map(|()| got)
    });
    let at = l.at;
    let sent = hello.clone();
    let connect = blocking(move || {
        let mut tcp = TcpStream::connect(at).unwrap();
        tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut first =
            format!("CONNECT {end_addr} HTTP/1.1\r\nHost: {end_addr}\r\n\r\n").into_bytes();
        first.extend_from_slice(&sent);
        tcp.write_all(&first).unwrap();
        let answer = read_answer(&mut tcp);
        (answer, tcp)
    })
    .await;
    assert_eq!(status_of(&connect.0), 200, "{:?}", connect.0);
    let got = got
        .join()
        .unwrap()
        .expect("the end server got the pipelined hello");
    assert_eq!(got, hello);
    let heads = l.proxy.seen();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_eq!(heads[0].line, format!("CONNECT {end_addr} HTTP/1.1"));
}

/// Idle connections (connected, nothing sent; or a provider CONNECT
/// answered and then silence) take slots of the shared budget but are
/// closed to make room: a real client still gets through.
#[tokio::test]
async fn idle_connections_cannot_lock_the_proxy_listener_out() {
    // As many silent tunnels as there are slots, on a fresh listener each
    // time: to a provider name, and to an address (decided by a hello
    // that never comes).
    for authority in ["api.openai.com:443", "127.0.0.9:443"] {
        let l = listener(Some(4)).await;
        let at = l.at;
        let silent = blocking(move || {
            (0..4)
                .map(|_| {
                    let mut t = TcpStream::connect(at).unwrap();
                    t.set_read_timeout(Some(HANG_GUARD)).unwrap();
                    t.write_all(
                        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
                            .as_bytes(),
                    )
                    .unwrap();
                    let answer = read_answer(&mut t);
                    assert_eq!(status_of(&answer), 200, "{answer:?}");
                    t
                })
                .collect::<Vec<TcpStream>>()
        })
        .await;
        let ca = l.gw.ca.cert_der().clone();
        let t =
            blocking(move || tunnel(at, "api.openai.com:443", "api.openai.com", &ca, false)).await;
        assert_kts(&l, &t, 1);
        // The oldest silent tunnel was closed to make room, without a word.
        let mut first = silent.into_iter().next().unwrap();
        let answer = blocking(move || read_until_close(&mut first)).await;
        assert_eq!(answer, "", "{authority}");
    }

    // Connections that send nothing at all.
    let l = listener(Some(4)).await;
    let at = l.at;
    let idle: Vec<TcpStream> = (0..32)
        .map(|_| {
            let t = TcpStream::connect(at).unwrap();
            t.set_read_timeout(Some(HANG_GUARD)).unwrap();
            t
        })
        .collect();
    let ca = l.gw.ca.cert_der().clone();
    let t = blocking(move || tunnel(at, "api.openai.com:443", "api.openai.com", &ca, false)).await;
    assert_kts(&l, &t, 1);
    // The oldest idle connection was closed without an answer.
    let mut first = idle.into_iter().next().unwrap();
    let answer = blocking(move || read_until_close(&mut first)).await;
    assert_eq!(answer, "");
}

/// After a `407` the connection stays open for the client's next request:
/// that one gets the same checks (an odd authority is refused, never
/// replayed), and bytes that are not HTTP get a 400 and an event.
#[tokio::test]
async fn later_requests_on_a_kept_connection_get_the_same_checks() {
    let l = listener(None).await;
    let at = l.at;
    let answers = blocking(move || {
        let mut tcp = TcpStream::connect(at).unwrap();
        tcp.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut answers = Vec::new();
        for head in [
            "CONNECT deny.test:443 HTTP/1.1\r\nHost: deny.test:443\r\n\r\n".to_string(),
            "CONNECT api.openai.com HTTP/1.1\r\nHost: api.openai.com\r\n\r\n".to_string(),
            format!(
                "CONNECT alice:s3cret@site.test:443 HTTP/1.1\r\nHost: site.test:443\r\nProxy-Authorization: {PROXY_AUTH}\r\n\r\n"
            ),
        ] {
            tcp.write_all(head.as_bytes()).unwrap();
            answers.push(read_answer(&mut tcp));
        }
        let _ = tcp.write_all(b"\x00\x01\x02 garbage\r\n\r\n");
        answers.push(read_until_close(&mut tcp));
        answers
    })
    .await;
    assert_eq!(status_of(&answers[0]), 407, "{answers:?}");
    assert_eq!(status_of(&answers[1]), 400, "{answers:?}");
    assert!(answers[1].contains("has no port"), "{answers:?}");
    assert_eq!(status_of(&answers[2]), 400, "{answers:?}");
    assert!(
        answers[2].contains("Proxy-Authorization") && !answers[2].contains("s3cret"),
        "{answers:?}"
    );
    assert_eq!(status_of(&answers[3]), 400, "{answers:?}");
    refusal(&l.gw.sink, "proxy-not-http").await;
    let rules: Vec<String> = refusals(&l.gw.sink).into_iter().map(|r| r.0).collect();
    assert_eq!(
        rules,
        [
            "proxy-forwarded",
            "proxy-bad-authority",
            "proxy-bad-authority",
            "proxy-not-http"
        ],
        "{:?}",
        refusals(&l.gw.sink)
    );
    // Only the first reached the proxy.
    let heads: Vec<String> = l.proxy.seen().into_iter().map(|h| h.line).collect();
    assert_eq!(heads, ["CONNECT deny.test:443 HTTP/1.1"]);
    assert!(!format!("{:?}", l.gw.sink.snapshot()).contains("s3cret"));
}

/// `gateway.max_connections_per_uid` holds on the proxy listener too: one
/// user's connections beyond it are closed, with an event.
#[tokio::test]
async fn one_users_connections_beyond_the_per_uid_budget_are_closed() {
    let client = ClientInfo {
        uid: Some(4242),
        ..ClientInfo::default()
    };
    let l = listener_for(None, Some(2), client).await;
    let at = l.at;
    let conns: Vec<TcpStream> = (0..3)
        .map(|_| {
            let t = TcpStream::connect(at).unwrap();
            t.set_read_timeout(Some(HANG_GUARD)).unwrap();
            t
        })
        .collect();
    refusal(&l.gw.sink, "uid-connection-budget").await;
    let statuses = blocking(move || {
        conns
            .into_iter()
            .map(|mut t| {
                let _ =
                    t.write_all(b"CONNECT deny.test:443 HTTP/1.1\r\nHost: deny.test:443\r\n\r\n");
                status_of(&read_answer(&mut t))
            })
            .collect::<Vec<u16>>()
    })
    .await;
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    // Two served (the fake proxy's 407), one closed without an answer.
    assert_eq!(sorted, [0, 407, 407], "{statuses:?}");
}
