//! Gateway benchmark (not a test: prints figures, asserts nothing).
//!
//! 1. The same keep-alive client load (1 KiB and 64 KiB JSON bodies) goes
//!    straight to the fake TLS provider and through the gateway's capture
//!    listener (client TLS → gateway → upstream TLS): added latency p50/p99
//!    and the throughput ratio.
//! 2. A reverse proxy as the yardstick: 1 KiB POSTs over keep-alive, plain
//!    HTTP in and TLS out to the same fake provider, through nginx (one
//!    worker, from a temp config on loopback) and through `kt gateway run`
//!    (base-URL mode, DLP and events on), rounds interleaved so load on the
//!    machine falls on both alike. Prints both added latencies, throughput
//!    at 1 and 32 connections, the kt/nginx ratios and whether the targets
//!    are met (never fails on them). Skipped when no `nginx` is found
//!    (`cargo xtask bench gateway` installs `nginx-light` on Debian).
//! 3. TLS handshakes on the capture listener, full and resumed, per core of
//!    gateway CPU; memory per idle client connection.
//!
//! About a minute. Run: `cargo xtask bench gateway`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
/// Reverse-proxy comparison: rounds, each measuring every endpoint in a
/// rotated order; latency figures the median over rounds (a burst of load
/// from elsewhere on the host spoils a round, not the figure), throughput
/// the best round.
const PROXY_ROUNDS: usize = 5;
const METRICS_ROUNDS: usize = 6;
const PROXY_LATENCY_REQUESTS: usize = 1000;
const PROXY_WINDOW: Duration = Duration::from_secs(1);
const PROXY_CONNS: [usize; 2] = [1, 32];
const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");

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

/// Where a load goes: an address, TLS (SNI and client config) or plain
/// HTTP, and the request path (base-URL mode prefixes the provider).
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    tls: Option<(String, Arc<rustls::ClientConfig>)>,
    path: &'static str,
}

impl Endpoint {
    fn tls(addr: SocketAddr, name: &str, cfg: &Arc<rustls::ClientConfig>) -> Endpoint {
        Endpoint {
            addr,
            tls: Some((name.to_string(), cfg.clone())),
            path: "/v1/chat/completions",
        }
    }

    fn plain(addr: SocketAddr, path: &'static str) -> Endpoint {
        Endpoint {
            addr,
            tls: None,
            path,
        }
    }
}

/// One keep-alive HTTP/1.1 connection and the path its requests go to.
struct Conn {
    send: SendRequest<Full<Bytes>>,
    path: &'static str,
}

async fn conn(ep: &Endpoint) -> Conn {
    let tcp = TcpStream::connect(ep.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let send = match &ep.tls {
        Some((name, cfg)) => {
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(ServerName::try_from(name.clone()).unwrap(), tcp)
                .await
                .unwrap();
            let (send, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(c);
            send
        }
        None => {
            let (send, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(c);
            send
        }
    };
    Conn {
        send,
        path: ep.path,
    }
}

async fn one(c: &mut Conn, body: &Bytes) {
    let req = http::Request::post(c.path)
        .header("host", "api.openai.com")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-client-bench")
        .body(Full::new(body.clone()))
        .unwrap();
    c.send.ready().await.unwrap();
    let resp = c.send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", c.path);
    resp.into_body().collect().await.unwrap();
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Request latencies over one keep-alive connection, after a warm-up.
async fn latency_samples(ep: &Endpoint, body: &Bytes, n: usize) -> Vec<Duration> {
    let (ep, body) = (ep.clone(), body.clone());
    // On a runtime worker, as the throughput loops are: `main` runs on the
    // thread that called `block_on`, and every request would add a wake-up
    // across threads to the figure.
    tokio::spawn(async move {
        let mut c = conn(&ep).await;
        for _ in 0..WARMUP {
            one(&mut c, &body).await;
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            one(&mut c, &body).await;
            v.push(t.elapsed());
        }
        v
    })
    .await
    .unwrap()
}

async fn latencies(ep: &Endpoint, body: &Bytes) -> (Duration, Duration) {
    let mut v = latency_samples(ep, body, LATENCY_REQUESTS).await;
    v.sort();
    (pct(&v, 0.5), pct(&v, 0.99))
}

async fn throughput(ep: &Endpoint, body: &Bytes) -> f64 {
    throughput_with(
        ep,
        body,
        THROUGHPUT_CONNS,
        Duration::from_secs(THROUGHPUT_SECS),
    )
    .await
}

/// Requests per second over `conns` keep-alive connections for `window`.
async fn throughput_with(ep: &Endpoint, body: &Bytes, conns: usize, window: Duration) -> f64 {
    let mut ready = Vec::with_capacity(conns);
    for _ in 0..conns {
        ready.push(conn(ep).await);
    }
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for mut c in ready {
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
    count.load(Ordering::Relaxed) as f64 / window.as_secs_f64()
}

fn rss_kib() -> u64 {
    rss_of(std::process::id())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time (user + system) so far of this process or of `pid`, all
/// threads, from /proc/PID/stat.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// A free loopback port (bound, read, released: the proxy binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process stopped (SIGTERM, then waited for) when dropped, also
/// when the bench panics.
struct Stopped {
    child: Child,
    name: &'static str,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // Our own child, by pid.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts connections or `child` exits.
async fn await_listening(p: &mut Stopped, addr: SocketAddr, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "{} exited ({status}): {}",
                p.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{} did not start", p.name);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// nginx from `KT_BENCH_NGINX`, `PATH` or /usr/sbin.
fn find_nginx() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KT_BENCH_NGINX") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// nginx as a TLS re-encrypting reverse proxy: plain HTTP on a loopback
/// port, TLS with a keep-alive pool to `upstream`, one worker, everything it
/// writes under `dir`.
async fn start_nginx(
    nginx: &Path,
    dir: &Path,
    upstream: SocketAddr,
    ca_pem: &Path,
) -> (Stopped, SocketAddr) {
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream fake {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass https://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#,
        ca = ca_pem.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let log = dir.join("nginx-stderr.log");
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut p = Stopped {
        child,
        name: "nginx",
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    await_listening(&mut p, addr, &log).await;
    (p, addr)
}

/// `kt gateway run` (base-URL mode, default policy chain: DLP filter and
/// audit logger writing events to SQLite) in front of `upstream`.
async fn start_kt(dir: &Path, upstream: &FakeProvider, ca_pem: &Path) -> (Stopped, SocketAddr) {
    let data = dir.join("kt-data");
    let mut add = Command::new(KT)
        .args(["secrets", "add", "BENCH_KEY", "--store"])
        .env("KT_DATA_DIR", &data)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(b"sk-bench-managed-key-000000000000")
        .unwrap();
    assert!(add.wait().unwrap().success(), "kt secrets add failed");
    let port = free_port();
    let cfg = dir.join("kt.yaml");
    std::fs::write(
        &cfg,
        format!(
            "providers:\n  targets:\n    - id: bench\n      provider: openai\n      base_url: {}\n      secret_key_ref: {{store: BENCH_KEY}}\npolicies:\n  chain: [dlp-filter, audit-logger]\ngateway:\n  listen: 127.0.0.1:{port}\n",
            upstream.openai_base_url()
        ),
    )
    .unwrap();
    let log = dir.join("kt-stderr.log");
    let child = Command::new(KT)
        .args(["gateway", "run", "--config"])
        .arg(&cfg)
        .env("KT_DATA_DIR", &data)
        .env("SSL_CERT_FILE", ca_pem)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut p = Stopped {
        child,
        name: "kt gateway run",
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    await_listening(&mut p, addr, &log).await;
    (p, addr)
}

/// RSS of process `pid`, KiB.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// 5,000 connections that never send a byte against `kt gateway run` with
/// its default budget (4,096): kt's memory stays bounded and a new client is
/// still served.
async fn idle_flood(upstream: &FakeProvider, upstream_ca: &TestCa) {
    const FLOOD: usize = 5000;
    let dir = std::env::temp_dir().join(format!("kt-bench-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_pem = dir.join("upstream-ca.pem");
    std::fs::write(&ca_pem, &upstream_ca.pem).unwrap();
    let (kt, addr) = start_kt(&dir, upstream, &ca_pem).await;
    let pid = kt.child.id();
    let ep = Endpoint::plain(addr, "/openai/v1/chat/completions");
    let body = body_of(1024);
    let mut warm = conn(&ep).await;
    one(&mut warm, &body).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_of(pid);
    let mut idle = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        match TcpStream::connect(addr).await {
            Ok(s) => idle.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let mut c = conn(&ep).await;
    one(&mut c, &body).await;
    let served_in = t0.elapsed();
    let after = rss_of(pid);
    println!(
        "idle flood: {} connections that send nothing against kt gateway run (max_connections 4096): kt RSS {} -> {} KiB (+{} KiB); a new client was served in {:.1} ms",
        idle.len(),
        before,
        after,
        after.saturating_sub(before),
        served_in.as_secs_f64() * 1e3
    );
    drop(idle);
    drop(kt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One endpoint's figures over all rounds of the proxy comparison.
#[derive(Default)]
struct ProxyFigures {
    /// p50 and p99 of each round.
    rounds: Vec<(Duration, Duration)>,
    /// Best requests/s per entry of PROXY_CONNS.
    rps: [f64; PROXY_CONNS.len()],
    /// The proxy's CPU per request at the widest load (best round), µs.
    cpu_us: Option<f64>,
}

/// The median of per-round values.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// nginx and `kt gateway run` side by side over the same upstream and load.
async fn proxy_comparison(
    fake: &FakeProvider,
    upstream_ca: &TestCa,
    direct_cfg: &Arc<rustls::ClientConfig>,
) -> Option<f64> {
    let body = body_of(1024);
    println!();
    println!(
        "reverse proxy comparison: {} B POSTs over keep-alive, plain HTTP in, TLS to the same fake provider",
        body.len()
    );
    let Some(nginx) = find_nginx() else {
        println!(
            "  skipped: no nginx found (`cargo xtask bench gateway` installs nginx-light; or set KT_BENCH_NGINX)"
        );
        return None;
    };
    let dir = std::env::temp_dir().join(format!("kt-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_pem = dir.join("upstream-ca.pem");
    std::fs::write(&ca_pem, &upstream_ca.pem).unwrap();
    let (nginx_proc, nginx_addr) = start_nginx(&nginx, &dir, fake.addr, &ca_pem).await;
    let (kt_proc, kt_addr) = start_kt(&dir, fake, &ca_pem).await;
    let endpoints = [
        (
            "direct (TLS to the provider)",
            Endpoint::tls(fake.addr, "127.0.0.1", direct_cfg),
            None,
        ),
        (
            "nginx, 1 worker",
            Endpoint::plain(nginx_addr, "/v1/chat/completions"),
            Some(nginx_proc.child.id()),
        ),
        (
            "kt gateway run, DLP + events",
            Endpoint::plain(kt_addr, "/openai/v1/chat/completions"),
            Some(kt_proc.child.id()),
        ),
    ];
    let mut figs: Vec<ProxyFigures> = endpoints.iter().map(|_| ProxyFigures::default()).collect();
    for round in 0..PROXY_ROUNDS {
        for k in 0..endpoints.len() {
            // Rotate who goes first so no one always meets the same load.
            let i = (k + round) % endpoints.len();
            let (_, ep, pid) = &endpoints[i];
            let f = &mut figs[i];
            let mut v = latency_samples(ep, &body, PROXY_LATENCY_REQUESTS).await;
            v.sort();
            f.rounds.push((pct(&v, 0.5), pct(&v, 0.99)));
            for (j, &n) in PROXY_CONNS.iter().enumerate() {
                let cpu0 = pid.map(|p| cpu_seconds(Some(p)));
                let rps = throughput_with(ep, &body, n, PROXY_WINDOW).await;
                if rps > f.rps[j] {
                    f.rps[j] = rps;
                    if j == PROXY_CONNS.len() - 1
                        && let (Some(p), Some(c0)) = (pid, cpu0)
                    {
                        let requests = rps * PROXY_WINDOW.as_secs_f64();
                        f.cpu_us = Some((cpu_seconds(Some(*p)) - c0) / requests.max(1.0) * 1e6);
                    }
                }
            }
        }
    }
    drop(kt_proc);
    drop(nginx_proc);
    let _ = std::fs::remove_dir_all(&dir);

    let direct = &figs[0].rounds;
    println!(
        "  {:<30} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "", "p50 ms", "p99 ms", "added p50", "added p99", "1 conn/s", "32 conn/s", "CPU us/req"
    );
    let mut added = Vec::new();
    let mut spread = Vec::new();
    for (i, (name, _, _)) in endpoints.iter().enumerate() {
        let r = &figs[i].rounds;
        let p50 = median(r.iter().map(|x| x.0).collect());
        let p99 = median(r.iter().map(|x| x.1).collect());
        // Added latency against direct in the same round (close in time).
        let mut a50s: Vec<Duration> = r
            .iter()
            .zip(direct)
            .map(|(x, d)| x.0.saturating_sub(d.0))
            .collect();
        let a50 = median(a50s.clone());
        let a99 = median(
            r.iter()
                .zip(direct)
                .map(|(x, d)| x.1.saturating_sub(d.1))
                .collect(),
        );
        a50s.sort();
        spread.push((a50s[0], a50s[a50s.len() - 1]));
        added.push(a50);
        println!(
            "  {:<30} {:>9.3} {:>9.3} {:>10} {:>10} {:>10.0} {:>10.0} {:>12}",
            name,
            ms(p50),
            ms(p99),
            if i == 0 {
                "-".into()
            } else {
                format!("{:.3}", ms(a50))
            },
            if i == 0 {
                "-".into()
            } else {
                format!("{:.3}", ms(a99))
            },
            figs[i].rps[0],
            figs[i].rps[1],
            figs[i].cpu_us.map_or("-".into(), |c| format!("{c:.0}")),
        );
    }
    println!(
        "  added p50 over the {PROXY_ROUNDS} rounds: nginx {:.3}-{:.3} ms, kt {:.3}-{:.3} ms",
        ms(spread[1].0),
        ms(spread[1].1),
        ms(spread[2].0),
        ms(spread[2].1)
    );
    let (n, k) = (&figs[1], &figs[2]);
    let lat_ratio = ms(added[2]) / ms(added[1]).max(1e-6);
    println!(
        "  kt/nginx: added p50 {:.2}x (target <= 2.0x: {}); throughput 1 conn {:.2}x, 32 conns {:.2}x (target >= 1.0x: {})",
        lat_ratio,
        met(lat_ratio <= 2.0),
        k.rps[0] / n.rps[0].max(1e-9),
        k.rps[1] / n.rps[1].max(1e-9),
        met(k.rps[1] >= n.rps[1]),
    );
    println!(
        "  (client, fake provider and proxy share the same 2 cores; {PROXY_ROUNDS} interleaved rounds: latency medians of the rounds, throughput best round of {:.1} s; kt runs its default multi-threaded runtime)",
        PROXY_WINDOW.as_secs_f64()
    );
    figs[2].cpu_us
}

/// The request path with metrics on (a `MetricsSink` counting every
/// record) against the same gateway without, interleaved rounds in one
/// run: throughput ratio (target >= 0.98).
async fn metrics_cost(
    fake: &FakeProvider,
    upstream_ca: &TestCa,
    off: &Endpoint,
    kt_cpu_us: Option<f64>,
) {
    use guard::metrics::{Metrics, MetricsSink};
    let gca = Arc::new(Ca::ephemeral().unwrap());
    let metrics = Arc::new(Metrics::new());
    let gw = builder(
        config(vec![target(
            "oa1",
            Provider::OpenAi,
            &fake.openai_base_url(),
            "OA1",
        )]),
        MapResolver::of(&[("OA1", "sk-managed-bench")]),
        gca.clone(),
        upstream_ca,
    )
    .record_sink(Arc::new(MetricsSink::new(
        metrics.clone(),
        Arc::new(guard::record::NoopSink),
    )))
    .build()
    .unwrap();
    let cap = start_capture(&gw, Arc::new(FixedLookup(fake.addr, ClientInfo::default()))).await;
    let cfg = tls_config(gca.cert_der(), true);
    let on = Endpoint::tls(cap, "api.openai.com", &cfg);
    let body = body_of(1024);
    let (mut ratios, mut best) = (Vec::new(), (0.0f64, 0.0f64));
    for round in 0..METRICS_ROUNDS {
        let (a, b) = if round % 2 == 0 {
            let a = throughput(off, &body).await;
            (a, throughput(&on, &body).await)
        } else {
            let b = throughput(&on, &body).await;
            (throughput(off, &body).await, b)
        };
        ratios.push(b / a.max(1e-9));
        best = (best.0.max(a), best.1.max(b));
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "metrics on vs off ({} B, {THROUGHPUT_CONNS} conns, {METRICS_ROUNDS} interleaved rounds): best {:.0}/s vs {:.0}/s, median ratio {:.3} (rounds {:.3}-{:.3}; target >= 0.98: {}); {} records counted",
        body.len(),
        best.1,
        best.0,
        median,
        ratios[0],
        ratios[ratios.len() - 1],
        met(median >= 0.98),
        metrics.recorded(),
    );
    // The same cost without the noise of shared cores: what counting one
    // typical record takes, against kt's CPU per request (measured above,
    // `kt gateway run` with DLP and events).
    let rec = typical_record();
    let n = 200_000u32;
    let t = Instant::now();
    for _ in 0..n {
        metrics.observe(std::hint::black_box(&rec));
    }
    let per = t.elapsed().as_secs_f64() * 1e9 / f64::from(n);
    match kt_cpu_us {
        Some(cpu) => println!(
            "metrics: {per:.0} ns to count one request = {:.2}% of kt's {cpu:.0} us CPU per request (target < 2%: {})",
            per / (cpu * 1e3) * 100.0,
            met(per / (cpu * 1e3) < 0.02)
        ),
        None => println!(
            "metrics: {per:.0} ns to count one request (kt's CPU per request not measured: no nginx run)"
        ),
    }
}

/// A request record as the gateway makes one: provider, target, status,
/// a presented key, an upstream latency, one attempt.
fn typical_record() -> guard::record::RequestRecord {
    use guard::record::{Arrival, Attempt, Outcome, RequestRecord};
    let mut r = RequestRecord::new(
        "bench-1".into(),
        Arrival::Capture,
        None,
        ClientInfo::default(),
        "POST".into(),
    );
    r.provider = Some("openai".into());
    r.path = "/chat/completions".into();
    r.chosen = Some("oa1".into());
    r.status = 200;
    r.latency = Duration::from_millis(12);
    r.upstream_first_byte = Some(Duration::from_millis(11));
    r.client_key_fingerprint = Some("fp:0123456789ab".into());
    r.attempts.push(Attempt {
        target: "oa1".into(),
        outcome: Outcome::Status {
            status: 200,
            retry_after: None,
        },
    });
    r
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

const CLIENT_ENV: &str = "KT_BENCH_HANDSHAKE_CLIENT";
const CLIENT_CA_ENV: &str = "KT_BENCH_HANDSHAKE_CA";
const CLIENT_RESUME_ENV: &str = "KT_BENCH_HANDSHAKE_RESUME";

/// Child process: TLS handshakes against the capture listener for
/// HANDSHAKE_SECS from 8 concurrent clients, each connection closed
/// cleanly (close_notify, then read to the end, which also takes in the
/// session tickets). `resume`: one client config whose default in-memory
/// session cache offers the tickets back; else a new config (no cache)
/// per connection. Prints `full resumed`.
async fn handshake_client(addr: SocketAddr, ca_pem: &str, resume: bool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let der = guard::ca::pem_to_der(ca_pem).unwrap();
    let shared = tls_config(&der, true);
    let full = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(HANDSHAKE_SECS);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let shared = shared.clone();
        let der = der.clone();
        let (full, resumed) = (full.clone(), resumed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let cfg = if resume {
                    shared.clone()
                } else {
                    tls_config(&der, false)
                };
                let Ok(tcp) = TcpStream::connect(addr).await else {
                    continue;
                };
                let Ok(mut tls) = tokio_rustls::TlsConnector::from(cfg)
                    .connect(ServerName::try_from("api.openai.com").unwrap(), tcp)
                    .await
                else {
                    continue;
                };
                match tls.get_ref().1.handshake_kind() {
                    Some(rustls::HandshakeKind::Resumed) => resumed.fetch_add(1, Ordering::Relaxed),
                    _ => full.fetch_add(1, Ordering::Relaxed),
                };
                let _ = tls.shutdown().await;
                let mut sink = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), tls.read_to_end(&mut sink)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{} {}",
        full.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed)
    );
}

/// Runs the handshake client in a child process (so this process's CPU time
/// is the gateway's) and prints the rate per core of gateway CPU.
fn handshakes(cap: SocketAddr, ca_file: &Path, resume: bool) {
    let cpu_before = cpu_seconds(None);
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CLIENT_ENV, format!("{cap}"))
        .env(CLIENT_CA_ENV, ca_file)
        .env(CLIENT_RESUME_ENV, if resume { "1" } else { "0" })
        .output()
        .unwrap();
    let cpu = cpu_seconds(None) - cpu_before;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut counts = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0));
    let (full, resumed) = (counts.next().unwrap_or(0.0), counts.next().unwrap_or(0.0));
    let n = full + resumed;
    let what = if resume {
        format!(
            "resumed TLS handshakes ({:.1}% resumed)",
            100.0 * resumed / n.max(1.0)
        )
    } else {
        "full TLS handshakes (no resumption)".to_string()
    };
    println!(
        "{what} on the capture listener: {:.0}/s wall, client in another process on the same 2 cores; gateway CPU {:.0} us per handshake -> {:.0}/s per core",
        n / HANDSHAKE_SECS as f64,
        cpu / n.max(1.0) * 1e6,
        n.max(1.0) / cpu.max(1e-9)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let (Ok(addr), Ok(ca)) = (std::env::var(CLIENT_ENV), std::env::var(CLIENT_CA_ENV)) {
        let pem = std::fs::read_to_string(ca).unwrap();
        let resume = std::env::var(CLIENT_RESUME_ENV).is_ok_and(|v| v == "1");
        handshake_client(addr.parse().unwrap(), &pem, resume).await;
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
    let direct = Endpoint::tls(fake.addr, "127.0.0.1", &direct_cfg);
    let via_gw = Endpoint::tls(cap, "api.openai.com", &gw_cfg);

    println!(
        "gateway bench (capture listener, TLS both sides, HTTP/1.1 keep-alive, no policy chain)"
    );
    for size in [1024usize, 64 * 1024] {
        let body = body_of(size);
        let (d50, d99) = latencies(&direct, &body).await;
        let (g50, g99) = latencies(&via_gw, &body).await;
        let dt = throughput(&direct, &body).await;
        let gt = throughput(&via_gw, &body).await;
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

    let kt_cpu_us = proxy_comparison(&fake, &upstream_ca, &direct_cfg).await;
    metrics_cost(&fake, &upstream_ca, &via_gw, kt_cpu_us).await;
    idle_flood(&fake, &upstream_ca).await;
    println!();

    // Handshakes on the capture listener, from a child process so the
    // gateway's own CPU time can be read apart.
    let dir = std::env::temp_dir().join(format!("kt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, gca.cert_pem()).unwrap();
    handshakes(cap, &ca_file, false);
    handshakes(cap, &ca_file, true);
    let _ = std::fs::remove_dir_all(&dir);

    // Idle connections: RSS growth per connection, client side included.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut idle = Vec::with_capacity(IDLE_CONNS);
    for _ in 0..IDLE_CONNS {
        let mut c = conn(&via_gw).await;
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
