//! What refreshing a central secret store costs the traffic (not a test:
//! prints figures, asserts nothing).
//!
//! Two `kt gateway run` side by side, each with 50 targets and a JSON
//! Lines event sink: the baseline reads its 50 keys from its environment
//! (nothing refreshed), the other from a Vault-API server (OpenBao dev
//! server on loopback, `cargo xtask setup` installs it) with
//! `refresh: 1s`, so it reads 50 values (plus one listing) every second.
//! Rounds interleave the two so load elsewhere on the machine falls on
//! both alike. Prints, for each and as ratios: request latency p50/p99 over
//! keep-alive, throughput at 8 connections, kt's CPU while idle (the
//! refresh alone) and under load, and the measured size of one event line
//! (for the README's bytes/day figure).
//!
//! About a minute. Run: `cargo xtask bench store_refresh`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{h1_plain, post};
use guard_tests::process::{KtChild, free_addr};
use guard_tests::vault::{ROOT_TOKEN, VaultServer, find_server};
use http_body_util::{BodyExt as _, Full};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const SECRETS: usize = 50;
const ROUNDS: usize = 4;
const LATENCY_REQUESTS: usize = 1000;
const WARMUP: usize = 100;
const CONNS: usize = 8;
const LOAD_SECS: u64 = 3;
const IDLE_SECS: u64 = 5;

/// CPU seconds (user + system) of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

struct Gw {
    name: &'static str,
    listen: SocketAddr,
    sink: PathBuf,
    kt: KtChild,
    lat_p50: Vec<f64>,
    lat_p99: Vec<f64>,
    rps: Vec<f64>,
    idle_cpu: Vec<f64>,
    load_cpu: Vec<f64>,
}

fn config(
    dir: &Path,
    name: &str,
    provider: &FakeProvider,
    vault: Option<&str>,
) -> (PathBuf, SocketAddr, PathBuf) {
    let listen = free_addr();
    let sink = dir.join(format!("{name}.jsonl"));
    let mut targets = String::new();
    for i in 0..SECRETS {
        let r = if vault.is_some() {
            format!("{{store: KEY_{i:02}}}")
        } else {
            format!("{{env: KEY_{i:02}}}")
        };
        targets.push_str(&format!(
            "    - id: t{i:02}\n      provider: openai\n      base_url: {}\n      secret_key_ref: {r}\n",
            provider.openai_base_url()
        ));
    }
    let store = vault
        .map(|a| {
            format!("secrets:\n  store:\n    backend: vault\n    address: {a}\n    refresh: 1s\n")
        })
        .unwrap_or_default();
    let text = format!(
        "providers:\n  targets:\n{targets}policies:\n  chain: [dlp-filter, audit-logger]\npolicy:\n  audit-logger:\n    sinks:\n      - type: file\n        path: {}\ngateway:\n  listen: {listen}\n{store}",
        sink.display()
    );
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, text).unwrap();
    (cfg, listen, sink)
}

fn start(
    name: &'static str,
    dir: &Path,
    cfg: &Path,
    listen: SocketAddr,
    sink: PathBuf,
    ca: &Path,
) -> Gw {
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(KT);
    cmd.args(["gateway", "run", "--config"])
        .arg(cfg)
        .env("KT_DATA_DIR", dir.join(name))
        .env("SSL_CERT_FILE", ca)
        .env("VAULT_TOKEN", ROOT_TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for i in 0..SECRETS {
        cmd.env(
            format!("KEY_{i:02}"),
            format!("sk-bench-{i:02}-QkVOQ0hfS0VZX1ZBTFVF"),
        );
    }
    let kt = KtChild(cmd.spawn().unwrap());
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("gateway listening on")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Gw {
        name,
        listen,
        sink,
        kt,
        lat_p50: Vec::new(),
        lat_p99: Vec::new(),
        rps: Vec::new(),
        idle_cpu: Vec::new(),
        load_cpu: Vec::new(),
    }
}

fn request() -> http::Request<Full<Bytes>> {
    post(
        "/openai/v1/chat/completions",
        &[("authorization", "Bearer sk-client-key-Q0xJRU5UX0tFWQ")],
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#,
    )
}

async fn one(c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) {
    c.ready().await.unwrap();
    let r = c.send_request(request()).await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.into_body().collect().await.unwrap();
}

async fn measure(g: &mut Gw) {
    let pid = g.kt.0.id();
    // Idle: only the refresh (and the gateway's own timers) run.
    let c0 = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(IDLE_SECS)).await;
    g.idle_cpu.push((cpu_seconds(pid) - c0) / IDLE_SECS as f64);
    // Latency over one keep-alive connection.
    let listen = g.listen;
    let mut v = tokio::spawn(async move {
        let mut c = h1_plain(listen).await;
        for _ in 0..WARMUP {
            one(&mut c).await;
        }
        let mut v = Vec::with_capacity(LATENCY_REQUESTS);
        for _ in 0..LATENCY_REQUESTS {
            let t = Instant::now();
            one(&mut c).await;
            v.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        v
    })
    .await
    .unwrap();
    v.sort_by(f64::total_cmp);
    g.lat_p50.push(v[v.len() / 2]);
    g.lat_p99.push(v[(v.len() * 99) / 100]);
    // Throughput at CONNS connections.
    let c0 = cpu_seconds(pid);
    let until = Instant::now() + Duration::from_secs(LOAD_SECS);
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        tasks.push(tokio::spawn(async move {
            let mut c = h1_plain(listen).await;
            let mut n = 0u64;
            while Instant::now() < until {
                one(&mut c).await;
                n += 1;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    g.rps.push(n as f64 / LOAD_SECS as f64);
    g.load_cpu.push((cpu_seconds(pid) - c0) / LOAD_SECS as f64);
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bin = match find_server() {
        Ok(b) => b,
        Err(why) => {
            println!("store_refresh: NOT RUN: {why}");
            return;
        }
    };
    let vault = VaultServer::start(&bin, false).expect("the Vault-API server starts");
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, &ca.pem).unwrap();
    let provider = FakeProvider::start(&ca, "openai", Behavior::Ok).await;
    for i in 0..SECRETS {
        vault.put(
            &format!("secret/kt/KEY_{i:02}"),
            &format!("sk-bench-{i:02}-QkVOQ0hfS0VZX1ZBTFVF"),
        );
    }
    let (cfg_a, l_a, s_a) = config(dir.path(), "baseline", &provider, None);
    let (cfg_b, l_b, s_b) = config(dir.path(), "refresh", &provider, Some(&vault.url));
    let mut gws = [
        start("baseline", dir.path(), &cfg_a, l_a, s_a, &ca_pem),
        start("refresh", dir.path(), &cfg_b, l_b, s_b, &ca_pem),
    ];
    for round in 0..ROUNDS {
        // Alternate which goes first.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            measure(&mut gws[i]).await;
        }
    }
    // The server's side: reads it answered per second for one gateway.
    println!(
        "store_refresh: {SECRETS} secrets, refresh every 1 s ({} reads/s: 1 list + {SECRETS} reads), {ROUNDS} interleaved rounds, medians",
        SECRETS + 1
    );
    println!(
        "{:<10} {:>9} {:>9} {:>10} {:>14} {:>14}",
        "gateway", "p50 ms", "p99 ms", "req/s", "idle CPU %", "load CPU %"
    );
    for g in &gws {
        println!(
            "{:<10} {:>9.3} {:>9.3} {:>10.0} {:>14.2} {:>14.1}",
            g.name,
            median(&g.lat_p50),
            median(&g.lat_p99),
            median(&g.rps),
            median(&g.idle_cpu) * 100.0,
            median(&g.load_cpu) * 100.0
        );
    }
    let (a, b) = (&gws[0], &gws[1]);
    println!(
        "ratio refresh/baseline: p50 {:.3}, p99 {:.3}, req/s {:.3}, idle CPU +{:.2} points of one core, CPU per request {:.3}",
        median(&b.lat_p50) / median(&a.lat_p50),
        median(&b.lat_p99) / median(&a.lat_p99),
        median(&b.rps) / median(&a.rps),
        (median(&b.idle_cpu) - median(&a.idle_cpu)) * 100.0,
        (median(&b.load_cpu) / median(&b.rps)) / (median(&a.load_cpu) / median(&a.rps)),
    );
    // Stop both so the sinks are flushed, then size one event line.
    for g in &mut gws {
        let _ = Command::new("kill")
            .args(["-TERM", &g.kt.0.id().to_string()])
            .status();
        let _ = g.kt.0.wait();
    }
    let text = std::fs::read_to_string(&gws[1].sink).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"request_id\""))
        .collect();
    if !lines.is_empty() {
        let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
        let per = bytes as f64 / lines.len() as f64;
        println!(
            "event line (JSON Lines sink, with host): {per:.0} bytes on average over {} events; at 1 request/s that is {:.1} MB/day per host",
            lines.len(),
            per * 86_400.0 / 1e6
        );
    }
}
