//! `cargo xtask bench capture` (root, cgroup v2): what capture costs.
//!
//! 1. connect() rate from a process in a child cgroup to a loopback address
//!    that is NOT captured, without and with the programs attached, run
//!    alternately; the ratio should stay at or above 0.9.
//! 2. A cold CLI client (a new curl per request) straight to the fake
//!    provider versus through `kt run` capture, with 20 ms of simulated
//!    round-trip time on the provider: the guard pools upstream connections,
//!    so it should be no slower.
//!
//! Prints figures and ratios; asserts nothing about speed.

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

fn main() {
    let mut cg = TestCgroup::new("bench").expect("needs root and cgroup v2");
    connect_rate(&mut cg);
    cold_client(&mut cg);
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
