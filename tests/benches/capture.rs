//! `cargo xtask bench capture` (root, cgroup v2): what capture costs.
//!
//! 1. connect() rate from a process in a child cgroup to a loopback address
//!    that is NOT captured, without and with the programs attached, run
//!    alternately; the ratio should stay at or above 0.9.
//!
//!    The strict-egress hook on connects it allows: the same loop to an
//!    allowlisted TEST-NET address that exists only inside the client's own
//!    network namespace (nothing leaves the host), with the programs
//!    attached and `capture.egress.mode` off versus enforce, alternately;
//!    the ratio should stay at or above 0.9.
//! 2. A cold CLI client (a new curl per request) straight to the fake
//!    provider versus through `kt run` capture, with 20 ms of simulated
//!    round-trip time on the provider: the guard pools upstream connections,
//!    so it should be no slower.
//! 3. The splice path of `capture.scope: port`: a non-provider HTTPS site
//!    on loopback, reached by a new curl per request either straight (on a
//!    port that is not captured) or through kt's port-wide capture (on the
//!    captured port: kt reads the hello, connects itself and splices),
//!    alternately in the same run: time to first byte of a small answer
//!    (the added latency) and the rate of 1 MiB and 64 MiB downloads.
//!
//! Prints figures and ratios; asserts nothing about speed.
//! `KT_BENCH_SPLICE_ONLY=1` runs part 3 alone, `KT_BENCH_CONNECT_ONLY=1`
//! parts 1 and 1b.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guard::capture::{Capture, CaptureSpec};
use guard::config::IpPrefix;
use guard_tests::cgroup::TestCgroup;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};

const CLIENT: &str = env!("CARGO_BIN_EXE_kt-test-client");
const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const CONNECTS: u32 = 10_000;
const ROUNDS: usize = 4;
const COLD_REQUESTS: usize = 10;
/// Requests of each kind on the splice path, straight and through kt.
const SPLICE_RUNS: usize = 15;

fn main() {
    let mut cg = TestCgroup::new("bench").expect("needs root and cgroup v2");
    if std::env::var_os("KT_BENCH_SPLICE_ONLY").is_none() {
        connect_rate(&mut cg);
        egress_rate(&mut cg);
        if std::env::var_os("KT_BENCH_CONNECT_ONLY").is_some() {
            return;
        }
        cold_client(&mut cg);
    }
    splice_path(&mut cg);
}

fn run_in(
    cg: &mut TestCgroup,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (String, Duration) {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"read go; exec "$@""#)
        .arg("sh")
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let mut go = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let pid = cg.adopt(child).unwrap();
    let start = Instant::now();
    go.write_all(b"go\n").unwrap();
    drop(go);
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    let o = cg.wait(pid).unwrap();
    let took = start.elapsed();
    assert!(
        o.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (text, took)
}

fn ns_per_connect(cg: &mut TestCgroup, target: &str) -> f64 {
    let (out, _) = run_in(
        cg,
        CLIENT,
        &["connect-loop", target, &CONNECTS.to_string()],
        &[],
    );
    out.lines()
        .find_map(|l| l.strip_prefix("ns_per_connect="))
        .and_then(|v| v.parse().ok())
        .expect("client output")
}

fn connect_rate(cg: &mut TestCgroup) {
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = sink.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in sink.incoming() {
            drop(s);
        }
    });
    let capture_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(l4) = capture_listener.local_addr().unwrap() else {
        unreachable!()
    };
    let spec = CaptureSpec {
        cgroup: cg.path().to_path_buf(),
        listen4: l4,
        listen6: None,
        prefixes: vec![IpPrefix {
            addr: "127.77.0.0".parse().unwrap(),
            len: 16,
        }],
        ports: vec![443],
        port_wide: false,
        own_ports: vec![],
        refuse_udp: true,
        refuse_other_netns: true,
        containers: None,
        pin_dir: None,
        keep_attached: false,
    };
    let (mut without, mut with) = (f64::MAX, f64::MAX);
    // Alternate which goes first so neither always runs on a warmer machine.
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            without = without.min(ns_per_connect(cg, &target));
        }
        let capture = Capture::attach(&spec).unwrap();
        with = with.min(ns_per_connect(cg, &target));
        drop(capture);
        if round % 2 == 1 {
            without = without.min(ns_per_connect(cg, &target));
        }
    }
    println!(
        "connect() to an address that is not captured ({CONNECTS} per run, best of {ROUNDS}):"
    );
    println!(
        "  without programs  {:>8.0} ns/connect  {:>8.0} connects/s",
        without,
        1e9 / without
    );
    println!(
        "  with programs     {:>8.0} ns/connect  {:>8.0} connects/s",
        with,
        1e9 / with
    );
    println!(
        "  rate ratio with/without: {:.3} (target >= 0.9); hook cost ~{:.0} ns",
        without / with,
        with - without
    );
}

/// The loop in a namespace of its own where 198.51.100.1 is a local address.
fn ns_per_isolated_connect(cg: &mut TestCgroup) -> f64 {
    let script = format!(
        "ip link set lo up && ip addr add 198.51.100.1/32 dev lo && exec \"$0\" connect-loop 198.51.100.1:9000 {CONNECTS} --listen"
    );
    let (out, _) = run_in(cg, "unshare", &["-n", "sh", "-c", &script, CLIENT], &[]);
    out.lines()
        .find_map(|l| l.strip_prefix("ns_per_connect="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("client output: {out}"))
}

fn egress_rate(cg: &mut TestCgroup) {
    use guard::capture::EgressSpec;
    use guard::config::EgressMode;
    let capture_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(l4) = capture_listener.local_addr().unwrap() else {
        unreachable!()
    };
    let spec = CaptureSpec {
        cgroup: cg.path().to_path_buf(),
        listen4: l4,
        listen6: None,
        prefixes: vec![IpPrefix {
            addr: "127.77.0.0".parse().unwrap(),
            len: 16,
        }],
        ports: vec![443],
        port_wide: false,
        own_ports: vec![],
        refuse_udp: true,
        refuse_other_netns: true,
        containers: None,
        pin_dir: None,
        keep_attached: false,
    };
    let capture = Capture::attach(&spec).unwrap();
    let off = EgressSpec::default();
    let enforce = EgressSpec {
        mode: EgressMode::Enforce,
        // A realistic list: the allowed prefix among a few hundred others.
        allow: (0..=255u8)
            .map(|i| {
                (
                    IpPrefix {
                        addr: std::net::IpAddr::from([10, i, 0, 0]),
                        len: 16,
                    },
                    Some(443),
                )
            })
            .chain([(
                IpPrefix {
                    addr: "198.51.100.0".parse().unwrap(),
                    len: 24,
                },
                None,
            )])
            .collect(),
        resolvers: vec!["192.0.2.53".parse().unwrap()],
        ..EgressSpec::default()
    };
    let (mut without, mut with) = (f64::MAX, f64::MAX);
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            capture.set_egress(&off).unwrap();
            without = without.min(ns_per_isolated_connect(cg));
        }
        capture.set_egress(&enforce).unwrap();
        with = with.min(ns_per_isolated_connect(cg));
        if round % 2 == 1 {
            capture.set_egress(&off).unwrap();
            without = without.min(ns_per_isolated_connect(cg));
        }
    }
    drop(capture);
    println!(
        "connect() to an allowlisted address, strict egress off vs enforce ({CONNECTS} per run, best of {ROUNDS}):"
    );
    println!(
        "  egress off        {:>8.0} ns/connect  {:>8.0} connects/s",
        without,
        1e9 / without
    );
    println!(
        "  egress enforce    {:>8.0} ns/connect  {:>8.0} connects/s",
        with,
        1e9 / with
    );
    println!(
        "  rate ratio enforce/off: {:.3} (target >= 0.9); egress hook cost ~{:.0} ns",
        without / with,
        with - without
    );
}

fn cold_client(cg: &mut TestCgroup) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new();
    let fake = rt.block_on(FakeProvider::start_at(
        &ca,
        "bench",
        Behavior::Ok,
        "127.77.0.30:443".parse().unwrap(),
    ));
    fake.set_rtt(Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca_pem = dir.path().join("fake-ca.pem");
    std::fs::write(&ca_pem, &ca.pem).unwrap();
    let mut add = Command::new(KT)
        .args(["secrets", "add", "BENCH_KEY", "--store"])
        .env("KT_DATA_DIR", &data)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(b"sk-bench-managed-key-000000000000")
        .unwrap();
    assert!(add.wait().unwrap().success());
    let port = |_: ()| {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let cfg = dir.path().join("kt.yaml");
    std::fs::write(
        &cfg,
        format!(
            "providers:\n  targets:\n    - id: bench\n      provider: openai\n      base_url: https://127.77.0.30:443/v1\n      secret_key_ref: {{store: BENCH_KEY}}\npolicies:\n  chain: [dlp-filter, audit-logger]\ngateway:\n  listen: 127.0.0.1:{}\n  capture_listen: 127.0.0.1:{}\n  capture_listen6: \"[::1]:{}\"\ncapture:\n  hosts: []\n  cidrs: [127.77.0.31/32]\n",
            port(()),
            port(()),
            port(())
        ),
    )
    .unwrap();
    let log = dir.path().join("kt.log");
    // In a private mount namespace: the bpffs kt mounts to pin its links
    // goes away with it, the host's mounts are never touched.
    let mut kt = Command::new("unshare")
        .args(["-m", "--propagation", "private", "--", KT])
        .args(["run", "--config", cfg.to_str().unwrap(), "--cgroup"])
        .arg(cg.path())
        .env("KT_DATA_DIR", &data)
        .env("SSL_CERT_FILE", &ca_pem)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("kt: capturing")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kt run did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let curl = |cg: &mut TestCgroup, url: &str, cacert: &Path, resolve: &str| -> Duration {
        let (out, took) = run_in(
            cg,
            "curl",
            &[
                "-sS",
                "--resolve",
                resolve,
                "--cacert",
                cacert.to_str().unwrap(),
                "-H",
                "content-type: application/json",
                "-d",
                body,
                url,
            ],
            &[],
        );
        assert!(out.contains("hello"), "{out}");
        took
    };
    let kt_ca = data.join("ca/ca.pem");
    let mut direct = Vec::new();
    let mut through = Vec::new();
    // The first request through kt opens the pooled connection; report it apart.
    let first = curl(
        cg,
        "https://api.openai.com/v1/chat/completions",
        &kt_ca,
        "api.openai.com:443:127.77.0.31",
    );
    for _ in 0..COLD_REQUESTS {
        direct.push(curl(
            cg,
            "https://127.77.0.30/v1/chat/completions",
            &ca_pem,
            "x:1:127.0.0.1",
        ));
        through.push(curl(
            cg,
            "https://api.openai.com/v1/chat/completions",
            &kt_ca,
            "api.openai.com:443:127.77.0.31",
        ));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &kt.id().to_string()])
        .status();
    let _ = kt.wait();
    direct.sort();
    through.sort();
    let med = |v: &[Duration]| v[v.len() / 2].as_secs_f64() * 1e3;
    println!(
        "cold CLI client (new curl process per request, 20 ms simulated RTT to the provider, {COLD_REQUESTS} each):"
    );
    println!(
        "  straight to the provider   median {:>6.1} ms",
        med(&direct)
    );
    println!(
        "  through kt run capture     median {:>6.1} ms  (first request, opening the pool: {:.1} ms)",
        med(&through),
        first.as_secs_f64() * 1e3
    );
    println!(
        "  ratio through/straight: {:.2} (below 1.0: the guard is faster thanks to pooled upstream connections)",
        med(&through) / med(&direct)
    );
}

/// A plain HTTPS site for the splice bench: answers `GET /<bytes>` with
/// that many bytes (HTTP/1.1, then closes). Its certificate names
/// `site.kt-test` and is signed by `ca`, which kt does not hold.
async fn serve_site(listener: tokio::net::TcpListener, cfg: std::sync::Arc<rustls::ServerConfig>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let chunk = vec![b'x'; 256 * 1024];
    let chunk = std::sync::Arc::new(chunk);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&head);
            let size: usize = line
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.trim_start_matches('/').parse().ok())
                .unwrap_or(0);
            let hdr =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n");
            if tls.write_all(hdr.as_bytes()).await.is_err() {
                return;
            }
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len());
                if tls.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            let _ = tls.shutdown().await;
        });
    }
}

/// One curl in the cgroup: (time to first byte, total time, bytes).
fn curl_site(cg: &mut TestCgroup, port: u16, size: usize, ca: &Path) -> (f64, f64, f64) {
    let (out, _) = run_in(
        cg,
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{time_starttransfer} %{time_total} %{size_download}",
            "--resolve",
            &format!("site.kt-test:{port}:127.78.0.40"),
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://site.kt-test:{port}/{size}"),
        ],
        &[],
    );
    let v: Vec<f64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(v.len(), 3, "{out}");
    assert_eq!(v[2] as usize, size, "short download: {out}");
    (v[0], v[1], v[2])
}

fn splice_path(cg: &mut TestCgroup) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new();
    // The same site on the captured port (443) and on one that is not.
    let captured = rt
        .block_on(tokio::net::TcpListener::bind("127.78.0.40:443"))
        .unwrap();
    let straight = rt
        .block_on(tokio::net::TcpListener::bind("127.78.0.40:0"))
        .unwrap();
    let straight_port = straight.local_addr().unwrap().port();
    let mut cfg = ca.server_config_named("127.78.0.40".parse().unwrap(), &["site.kt-test"]);
    // The site speaks HTTP/1.1 only.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = std::sync::Arc::new(cfg);
    rt.spawn(serve_site(captured, cfg.clone()));
    rt.spawn(serve_site(straight, cfg));
    // kt needs one provider target to start; it is never called here.
    let provider = rt.block_on(FakeProvider::start_at(
        &ca,
        "bench",
        Behavior::Ok,
        "127.77.0.32:443".parse().unwrap(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = dir.path().join("site-ca.pem");
    std::fs::write(&ca_pem, &ca.pem).unwrap();
    let mut kt = KtRun::start(
        cg,
        dir.path(),
        &ca_pem,
        &format!(
            "capture:\n  hosts: []\n  cidrs: [{}/32]\n  scope: port\n",
            provider.addr.ip()
        ),
        &provider.openai_base_url(),
    );
    const SIZES: [(usize, &str); 2] = [(1 << 20, "1 MiB"), (64 << 20, "64 MiB")];
    let mut ttfb = (Vec::new(), Vec::new());
    let mut rate: Vec<(Vec<f64>, Vec<f64>)> =
        SIZES.iter().map(|_| (Vec::new(), Vec::new())).collect();
    // Warm both paths once (kt's first connection, page cache of curl).
    curl_site(cg, 443, 0, &ca_pem);
    curl_site(cg, straight_port, 0, &ca_pem);
    for round in 0..SPLICE_RUNS {
        // Alternate which goes first.
        let order = if round % 2 == 0 {
            [straight_port, 443]
        } else {
            [443, straight_port]
        };
        for port in order {
            let through = port == 443;
            let (first, _, _) = curl_site(cg, port, 0, &ca_pem);
            if through { &mut ttfb.1 } else { &mut ttfb.0 }.push(first * 1e3);
            for (i, (size, _)) in SIZES.iter().enumerate() {
                let (first, total, bytes) = curl_site(cg, port, *size, &ca_pem);
                // Transfer rate after the first byte, in MiB/s.
                let mibs = bytes / f64::from(1 << 20) / (total - first).max(1e-6);
                if through {
                    &mut rate[i].1
                } else {
                    &mut rate[i].0
                }
                .push(mibs);
            }
        }
    }
    let spliced = kt.stop();
    drop(kt);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "non-provider HTTPS site, port-wide capture (kt splices) vs straight, new curl per request, {SPLICE_RUNS} each:"
    );
    let (d, t) = (med(&mut ttfb.0), med(&mut ttfb.1));
    println!(
        "  time to first byte     straight {d:>7.2} ms   through kt {t:>7.2} ms   added {:>6.2} ms  ratio {:.2}",
        t - d,
        t / d
    );
    for (i, (_, label)) in SIZES.iter().enumerate() {
        let (d, t) = (med(&mut rate[i].0), med(&mut rate[i].1));
        println!(
            "  {label:<6} download rate  straight {d:>7.0} MiB/s through kt {t:>7.0} MiB/s ratio {:.2}",
            t / d
        );
    }
    println!("  splices recorded by kt: {spliced}");
    drop(provider);
}

/// A `kt run` over the bench cgroup in a private mount namespace, with a
/// managed key for one target at `base_url` and the `capture` section given.
struct KtRun {
    child: std::process::Child,
    data: std::path::PathBuf,
}

impl Drop for KtRun {
    /// A bench that fails half way still ends the kt it started (by pid).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl KtRun {
    fn start(cg: &TestCgroup, dir: &Path, ca_pem: &Path, capture: &str, base_url: &str) -> KtRun {
        let data = dir.join("data");
        let mut add = Command::new(KT)
            .args(["secrets", "add", "BENCH_KEY", "--store"])
            .env("KT_DATA_DIR", &data)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        add.stdin
            .take()
            .unwrap()
            .write_all(b"sk-bench-managed-key-000000000000")
            .unwrap();
        assert!(add.wait().unwrap().success());
        let port = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let cfg = dir.join("kt.yaml");
        std::fs::write(
            &cfg,
            format!(
                "providers:\n  targets:\n    - id: bench\n      provider: openai\n      base_url: {base_url}\n      secret_key_ref: {{store: BENCH_KEY}}\npolicies:\n  chain: [dlp-filter, audit-logger]\ngateway:\n  listen: 127.0.0.1:{}\n  capture_listen: 127.0.0.1:{}\n  capture_listen6: \"[::1]:{}\"\n{capture}",
                port(),
                port(),
                port()
            ),
        )
        .unwrap();
        let log = dir.join("kt.log");
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", KT])
            .args(["run", "--config", cfg.to_str().unwrap(), "--cgroup"])
            .arg(cg.path())
            .env("KT_DATA_DIR", &data)
            .env("SSL_CERT_FILE", ca_pem)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("kt: capturing")
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "kt run did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        KtRun { child, data }
    }

    /// SIGTERM, wait, and count the splice events kt recorded.
    fn stop(&mut self) -> usize {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let out = Command::new(KT)
            .args(["--output", "json", "events", "--limit", "0"])
            .env("KT_DATA_DIR", &self.data)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("spliced-non-provider"))
            .count()
    }
}
