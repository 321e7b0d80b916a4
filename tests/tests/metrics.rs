//! The Prometheus endpoint of a running `kt gateway run` (`gateway.metrics`):
//! after an allowed request, a DLP block, a fallback and a presented
//! managed key, the exposition counts each with bounded labels, passes
//! `promtool check metrics`, and carries no key or fingerprint.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{chat_body, h1_plain, post, send};
use guard_tests::process::{KtChild, free_addr};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const PRIMARY: &str = "sk-metrics-primary-UFJJTUFSWV9LRVlfMDE";
const BACKUP: &str = "sk-metrics-backup-QkFDS1VQX0tFWV8wMg";
const UNMANAGED: &str = "sk-metrics-unmanaged-VU5NQU5BR0VEXzAz";

/// `GET path` over plain HTTP/1.0: status line and body.
fn get(addr: SocketAddr, path: &str, accept: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, head.to_string(), body.to_string())
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_what_happened_and_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, &ca.pem).unwrap();
    let dead = FakeProvider::start(&ca, "dead", Behavior::Status(503)).await;
    let backup = FakeProvider::start(&ca, "backup", Behavior::Ok).await;
    let (listen, metrics) = (free_addr(), free_addr());
    let cfg = dir.path().join("policy.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"providers:
  targets:
    - id: primary
      provider: openai
      base_url: {dead}
      secret_key_ref: {{env: KT_METRICS_PRIMARY}}
    - id: backup
      provider: openai
      required: false
      base_url: {backup}
      secret_key_ref: {{env: KT_METRICS_BACKUP}}
policies:
  chain: [dlp-filter, audit-logger]
policy:
  dlp-filter:
    action: block
gateway:
  listen: {listen}
  metrics: {metrics}
  cooldown_after: 0
"#,
            dead = dead.openai_base_url(),
            backup = backup.openai_base_url(),
        ),
    )
    .unwrap();
    let log = dir.path().join("kt.log");
    let kt = KtChild(
        Command::new(KT)
            .args(["gateway", "run", "--config"])
            .arg(&cfg)
            .env("KT_DATA_DIR", dir.path().join("data"))
            .env("SSL_CERT_FILE", &ca_pem)
            .env("KT_METRICS_PRIMARY", PRIMARY)
            .env("KT_METRICS_BACKUP", BACKUP)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("gateway listening")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kt did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut c = h1_plain(listen).await;
    // Served by the backup after the primary's 503; the client presents
    // the primary's managed value (a job that was given the key).
    let auth = format!("Bearer {PRIMARY}");
    let a = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("authorization", auth.as_str())],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // An unmanaged key, and a leaked AWS key in the prompt: blocked.
    let auth = format!("Bearer {UNMANAGED}");
    let body = chat_body(false).replace("hi", "why does AKIADEMODEMODEMODEMO fail");
    let a = send(
        &mut c,
        post(
            "/openai/v1/chat/completions",
            &[("authorization", auth.as_str())],
            body,
        ),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);

    // What Prometheus asks for.
    let (status, head, text) = get(
        metrics,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(status.contains("200"), "{status}");
    assert!(
        head.to_ascii_lowercase()
            .contains("application/openmetrics-text")
    );
    let req = |labels: &[(&str, &str)]| sample(&text, "kt_requests_total", labels);
    assert_eq!(
        req(&[
            ("target", "backup"),
            ("decision", "allow"),
            ("status", "200")
        ]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        req(&[("decision", "block"), ("status", "403")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "kt_fallbacks_total",
            &[
                ("from", "primary"),
                ("to", "backup"),
                ("reason", "status_503")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "kt_dlp_findings_total",
            &[("rule", "aws-access-key-id"), ("action", "block")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "kt_presented_keys_total",
            &[("secret", "KT_METRICS_PRIMARY")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kt_presented_keys_total", &[("secret", "unmanaged")]),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "kt_added_latency_seconds_count", &[]).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kt_target_up", &[("target", "primary")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kt_config_generation", &[]),
        Some(1.0),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"));
    for secret in [PRIMARY, BACKUP, UNMANAGED, "fp:", "AKIA"] {
        assert!(!text.contains(secret), "{secret} in the exposition");
    }
    let (status, _, _) = get(metrics, "/other", "*/*");
    assert!(status.contains("404"), "{status}");

    // Anyone else gets the Prometheus text format, which promtool checks.
    let (_, head, text) = get(metrics, "/metrics", "*/*");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(text.contains("# TYPE kt_requests_total counter"), "{text}");

    // promtool, as Prometheus' own check of the exposition format.
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut p) => {
            p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => guard_tests::skipped(
            "metrics: the promtool check",
            &format!(
                "promtool is not installed ({e}); `cargo xtask setup` installs it (Debian package prometheus)"
            ),
        ),
    }
    drop(kt);
}
