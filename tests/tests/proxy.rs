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
