//! Gateway benchmark (not a test: prints figures, asserts nothing).
//!
//! The same keep-alive client load (1 KiB and 64 KiB JSON bodies) goes
//! straight to the fake TLS provider and through the gateway's capture
//! listener (client TLS → gateway → upstream TLS), in one run. Prints added
//! latency p50/p99, the throughput ratio, full TLS handshakes per second on
//! the capture listener, and memory per idle client connection. Bounded to
//! well under a minute. Run: `cargo bench -p guard-tests --bench gateway`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use guard::ca::Ca;
use guard::config::Provider;
use guard::record::ClientInfo;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

const LATENCY_REQUESTS: usize = 2000;
const WARMUP: usize = 200;
const THROUGHPUT_CONNS: usize = 8;
const THROUGHPUT_SECS: u64 = 3;
const HANDSHAKE_SECS: u64 = 3;
const IDLE_CONNS: usize = 500;

fn body_of(size: usize) -> Bytes {
    let filler = "x".repeat(size.saturating_sub(80));
    Bytes::from(
        serde_json::json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":filler}]})
            .to_string(),
    )
}

fn tls_config(ca: &CertificateDer<'static>, resume: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(cfg)
}

async fn conn(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let (send, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(c);
    send
}

async fn one(c: &mut SendRequest<Full<Bytes>>, body: &Bytes) {
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "api.openai.com")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-client-bench")
        .body(Full::new(body.clone()))
        .unwrap();
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn latencies(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
    body: &Bytes,
) -> (Duration, Duration) {
    let mut c = conn(addr, name, cfg).await;
    for _ in 0..WARMUP {
        one(&mut c, body).await;
    }
    let mut v = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        let t = Instant::now();
        one(&mut c, body).await;
        v.push(t.elapsed());
    }
    v.sort();
    (pct(&v, 0.5), pct(&v, 0.99))
}

async fn throughput(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
    body: &Bytes,
) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(THROUGHPUT_SECS);
    let mut tasks = Vec::new();
    for _ in 0..THROUGHPUT_CONNS {
        let mut c = conn(addr, name, cfg).await;
        let body = body.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                one(&mut c, &body).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / THROUGHPUT_SECS as f64
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Process CPU time (user + system) so far, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

const CLIENT_ENV: &str = "KT_BENCH_HANDSHAKE_CLIENT";
const CLIENT_CA_ENV: &str = "KT_BENCH_HANDSHAKE_CA";

/// Child process: full handshakes against the capture listener for
/// HANDSHAKE_SECS; prints the count.
async fn handshake_client(addr: SocketAddr, ca_pem: &str) {
    let der = guard::ca::pem_to_der(ca_pem).unwrap();
    let cfg = tls_config(&der, false);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(HANDSHAKE_SECS);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cfg = cfg.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let Ok(tcp) = TcpStream::connect(addr).await else {
                    continue;
                };
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(ServerName::try_from("api.openai.com").unwrap(), tcp)
                    .await;
                if tls.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!("{}", done.load(Ordering::Relaxed));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let (Ok(addr), Ok(ca)) = (std::env::var(CLIENT_ENV), std::env::var(CLIENT_CA_ENV)) {
        let pem = std::fs::read_to_string(ca).unwrap();
        handshake_client(addr.parse().unwrap(), &pem).await;
        return;
    }
    let started = Instant::now();
    let upstream_ca = TestCa::new();
    let fake = FakeProvider::start(&upstream_ca, "bench", Behavior::Ok).await;
    let gca = Arc::new(Ca::ephemeral().unwrap());
    let gw = builder(
        config(vec![target(
            "oa1",
            Provider::OpenAi,
            &fake.openai_base_url(),
            "OA1",
        )]),
        MapResolver::of(&[("OA1", "sk-managed-bench")]),
        gca.clone(),
        &upstream_ca,
    )
    .build()
    .unwrap();
    let cap = start_capture(&gw, Arc::new(FixedLookup(fake.addr, ClientInfo::default()))).await;
    let direct_cfg = tls_config(&upstream_ca.der, true);
    let gw_cfg = tls_config(gca.cert_der(), true);

    println!("gateway bench (capture listener, TLS both sides, HTTP/1.1 keep-alive)");
    for size in [1024usize, 64 * 1024] {
        let body = body_of(size);
        let (d50, d99) = latencies(fake.addr, "127.0.0.1", &direct_cfg, &body).await;
        let (g50, g99) = latencies(cap, "api.openai.com", &gw_cfg, &body).await;
        let dt = throughput(fake.addr, "127.0.0.1", &direct_cfg, &body).await;
        let gt = throughput(cap, "api.openai.com", &gw_cfg, &body).await;
        println!(
            "body {:>5} B: direct p50 {:.3} ms p99 {:.3} ms | via gateway p50 {:.3} ms p99 {:.3} ms | added p50 {:.3} ms p99 {:.3} ms | throughput direct {:.0}/s gateway {:.0}/s ratio {:.2}",
            body.len(),
            ms(d50),
            ms(d99),
            ms(g50),
            ms(g99),
            ms(g50.saturating_sub(d50)),
            ms(g99.saturating_sub(d99)),
            dt,
            gt,
            gt / dt
        );
    }

    // Full handshakes (no resumption) on the capture listener, from a child
    // process so the gateway's own CPU time can be read apart.
    let dir = std::env::temp_dir().join(format!("kt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, gca.cert_pem()).unwrap();
    let cpu_before = cpu_seconds();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(CLIENT_ENV, format!("{cap}"))
        .env(CLIENT_CA_ENV, &ca_file)
        .output()
        .unwrap();
    let cpu = cpu_seconds() - cpu_before;
    let _ = std::fs::remove_dir_all(&dir);
    let n: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    println!(
        "full TLS handshakes on the capture listener: {:.0}/s wall with the client in another process on the same 2 cores; gateway CPU {:.0} us per handshake -> {:.0}/s per core",
        n / HANDSHAKE_SECS as f64,
        cpu / n.max(1.0) * 1e6,
        n.max(1.0) / cpu.max(1e-9)
    );

    // Idle connections: RSS growth per connection, client side included.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut idle = Vec::with_capacity(IDLE_CONNS);
    for _ in 0..IDLE_CONNS {
        let mut c = conn(cap, "api.openai.com", &gw_cfg).await;
        one(&mut c, &body_of(256)).await;
        idle.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    println!(
        "idle keep-alive connections: {} KiB RSS each (upper bound: includes the client side in this process)",
        (after.saturating_sub(before)) / IDLE_CONNS as u64
    );
    drop(idle);
    println!("bench took {:.1} s", started.elapsed().as_secs_f64());
}
