//! `kt secrets verify` and `kt gateway check --probe` against fake TLS
//! providers on loopback: the real `kt` binary, a temp data dir, the fakes'
//! CA trusted through `SSL_CERT_FILE` (as the gateway's own upstream path
//! trusts it). A good key is ok, a key the provider answers 401 to is
//! rejected, a closed port is unreachable; exit codes follow the required
//! targets; the keys never appear in the output.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa, refused_addr};
use guard_tests::process::text;

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const GOOD: &str = "sk-probe-good-UHJvYmVHb29kS2V5XzIwMjY";
const BAD: &str = "sk-ant-probe-revoked-UmV2b2tlZEtleQ";
const DEAD: &str = "sk-probe-dead-RGVhZEtleV8yMDI2";

struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
    ca_pem: PathBuf,
    cfg: PathBuf,
    good: FakeProvider,
    bad: FakeProvider,
}

impl Setup {
    /// Three targets: `good` (required, answers 200), `bad` (an Anthropic
    /// target whose provider answers 401; required as given), `dead`
    /// (optional, a closed port).
    async fn new(bad_required: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let ca = TestCa::new();
        let ca_pem = dir.path().join("fake-ca.pem");
        std::fs::write(&ca_pem, &ca.pem).unwrap();
        let good = FakeProvider::start(&ca, "good", Behavior::Ok).await;
        let bad = FakeProvider::start(&ca, "bad", Behavior::Status(401)).await;
        let dead = refused_addr().await;
        let cfg = dir.path().join("policy.yaml");
        std::fs::write(
            &cfg,
            format!(
                r#"pack:
  name: probe-test
  version: "1.0.0"
  enabled: true
providers:
  targets:
    - id: good
      provider: openai
      required: true
      base_url: {good}
      secret_key_ref:
        store: GOOD_KEY
    - id: bad
      provider: anthropic
      required: {bad_required}
      base_url: {bad}
      secret_key_ref:
        store: BAD_KEY
    - id: dead
      provider: openai
      required: false
      base_url: https://{dead}/v1
      secret_key_ref:
        store: DEAD_KEY
policies:
  chain:
    - audit-logger
"#,
                good = good.openai_base_url(),
                bad = bad.anthropic_base_url(),
            ),
        )
        .unwrap();
        let s = Setup {
            _dir: dir,
            data,
            ca_pem,
            cfg,
            good,
            bad,
        };
        for (name, value) in [("GOOD_KEY", GOOD), ("BAD_KEY", BAD), ("DEAD_KEY", DEAD)] {
            let out = s.kt(&["secrets", "add", name, "--store"], Some(value));
            assert!(out.status.success(), "{}", text(&out));
        }
        s
    }

    fn kt(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = Command::new(KT)
            .args(args)
            .env("KT_DATA_DIR", &self.data)
            .env("SSL_CERT_FILE", &self.ca_pem)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut i = c.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
        drop(i);
        c.wait_with_output().unwrap()
    }

    fn cfg(&self) -> &str {
        self.cfg.to_str().unwrap()
    }
}

fn assert_no_key(out: &Output) {
    let all = text(out);
    for key in [GOOD, BAD, DEAD] {
        assert!(!all.contains(key), "a key leaked:\n{all}");
        // Nor its tail, which providers quote in their messages.
        assert!(
            !all.contains(&key[key.len() - 8..]),
            "a key's tail leaked:\n{all}"
        );
    }
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

fn row<'a>(doc: &'a serde_json::Value, key: &str, id: &str) -> &'a serde_json::Value {
    doc[key]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == id)
        .unwrap_or_else(|| panic!("no row for {id} in {doc}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_tells_a_good_key_from_a_rejected_one_and_a_dead_endpoint() {
    let s = Setup::new(false).await;
    let out = s.kt(
        &["secrets", "verify", "--config", s.cfg(), "--output", "json"],
        None,
    );
    assert_no_key(&out);
    // The only required target is ok.
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc = json(&out);
    assert_eq!(doc["ok"], true);
    let good = row(&doc, "targets", "good");
    assert_eq!(good["result"], "ok");
    assert_eq!(good["status"], 200);
    assert!(good["latency_ms"].is_u64(), "{good}");
    let bad = row(&doc, "targets", "bad");
    assert_eq!(bad["result"], "rejected");
    assert_eq!(bad["status"], 401);
    // The provider's error type, not its message.
    assert_eq!(bad["provider_code"], "fake");
    assert!(!doc.to_string().contains("fake bad says"), "{doc}");
    let dead = row(&doc, "targets", "dead");
    assert_eq!(dead["result"], "unreachable");
    assert_eq!(dead["status"], serde_json::Value::Null);

    // One unbilled request each, with the managed key in the provider's style.
    let g = s.good.requests();
    assert_eq!(g.len(), 1);
    assert_eq!(
        (g[0].method.as_str(), g[0].path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(g[0].headers["authorization"], format!("Bearer {GOOD}"));
    let b = s.bad.requests();
    assert_eq!(b.len(), 1);
    assert_eq!(
        (b[0].method.as_str(), b[0].path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(b[0].headers["x-api-key"], BAD);
    assert_eq!(b[0].headers["anthropic-version"], "2023-06-01");

    // Human output: a table with every verdict.
    let out = s.kt(&["secrets", "verify", "--config", s.cfg()], None);
    assert_no_key(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("TARGET"), "{stdout}");
    for word in ["REJECTED", "UNREACHABLE", " ok "] {
        assert!(stdout.contains(word), "{word} missing:\n{stdout}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: target bad: the provider rejected the key (401)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_probe_is_recorded_and_secrets_status_shows_the_last_one() {
    let s = Setup::new(false).await;
    let status = |s: &Setup| {
        let out = s.kt(
            &["secrets", "status", "--config", s.cfg(), "--output", "json"],
            None,
        );
        assert_no_key(&out);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        json(&out)
    };
    let by_id = |doc: &serde_json::Value, id: &str| {
        doc["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {id} in {doc}"))
    };
    // Nothing verified yet.
    let before = status(&s);
    assert_eq!(
        by_id(&before, "good")["last_verified"],
        serde_json::Value::Null
    );

    let out = s.kt(&["secrets", "verify", "--config", s.cfg()], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = status(&s);
    let good = by_id(&after, "good");
    assert_eq!(good["last_verified"]["result"], "ok");
    assert_eq!(good["last_verified"]["status"], 200);
    assert!(good["last_verified"]["latency_ms"].is_u64(), "{good}");
    // A probe is not a request the target served.
    assert_eq!(good["served_24h"], 0);
    let bad = by_id(&after, "bad");
    assert_eq!(bad["last_verified"]["result"], "rejected");
    assert_eq!(bad["last_verified"]["status"], 401);
    let message = bad["last_verified"]["message"].as_str().unwrap();
    assert!(message.contains("provider code fake"), "{message}");
    assert_eq!(
        by_id(&after, "dead")["last_verified"]["result"],
        "unreachable"
    );

    // Human output: the last verdict in the table, the failed probe below.
    let out = s.kt(&["secrets", "status", "--config", s.cfg()], None);
    assert_no_key(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().next().unwrap().contains("LAST VERIFIED"),
        "{stdout}"
    );
    let bad_row = stdout
        .lines()
        .find(|l| l.starts_with("bad "))
        .unwrap_or_else(|| panic!("no bad row:\n{stdout}"));
    assert!(
        bad_row.contains(" rejected ") && bad_row.ends_with(" ago"),
        "{stdout}"
    );
    assert!(stdout.contains("bad: last probe "), "{stdout}");

    // The store holds no key, nor a key's tail.
    let db = std::fs::read(s.data.join("events.db")).unwrap();
    let wal = std::fs::read(s.data.join("events.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        let all = String::from_utf8_lossy(&bytes);
        for key in [GOOD, BAD, DEAD] {
            assert!(
                !all.contains(&key[key.len() - 8..]),
                "a key reached the store"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_required_key_fails_verify_and_the_probe_check() {
    let s = Setup::new(true).await;
    let out = s.kt(&["secrets", "verify", "--config", s.cfg()], None);
    assert_no_key(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error: target bad: the provider rejected"),
        "{}",
        text(&out)
    );

    // Names pick targets by their secret: the good one alone passes, and
    // only its provider is asked.
    let before = s.bad.requests().len();
    let out = s.kt(
        &[
            "secrets",
            "verify",
            "GOOD_KEY",
            "--config",
            s.cfg(),
            "--output",
            "json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc = json(&out);
    assert_eq!(doc["targets"].as_array().unwrap().len(), 1);
    assert_eq!(s.bad.requests().len(), before);
    let out = s.kt(&["secrets", "verify", "BAD_KEY", "--config", s.cfg()], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // A name no target uses is an error, not an empty success.
    let out = s.kt(
        &["secrets", "verify", "NOPE_KEY", "--config", s.cfg()],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no target of"),
        "{}",
        text(&out)
    );

    // `gateway check` sends nothing without --probe, and would start.
    let (g, b) = (s.good.requests().len(), s.bad.requests().len());
    let out = s.kt(&["gateway", "check", "--config", s.cfg()], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!((s.good.requests().len(), s.bad.requests().len()), (g, b));
    // With --probe the rejected required key makes it fail.
    let out = s.kt(
        &[
            "gateway",
            "check",
            "--probe",
            "--config",
            s.cfg(),
            "--output",
            "json",
        ],
        None,
    );
    assert_no_key(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json(&out);
    assert_eq!(doc["would_start"], true);
    assert_eq!(row(&doc, "probe", "good")["result"], "ok");
    assert_eq!(row(&doc, "probe", "bad")["result"], "rejected");
    assert_eq!(row(&doc, "probe", "dead")["result"], "unreachable");
    let out = s.kt(&["gateway", "check", "--probe", "--config", s.cfg()], None);
    assert_no_key(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("probe    a required target's key is NOT ok"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_upstream_certificate_is_unreachable_not_ok() {
    let s = Setup::new(false).await;
    // Without the fakes' CA the probe must fail as traffic would.
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), TestCa::new().pem).unwrap();
    let out = Command::new(KT)
        .args([
            "secrets",
            "verify",
            "GOOD_KEY",
            "--config",
            s.cfg(),
            "--output",
            "json",
        ])
        .env("KT_DATA_DIR", &s.data)
        .env("SSL_CERT_FILE", other.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_no_key(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json(&out);
    let good = row(&doc, "targets", "good");
    assert_eq!(good["result"], "unreachable");
    assert!(good["detail"].as_str().unwrap().contains("tls"), "{good}");
    assert!(s.good.requests().is_empty());
}

/// A provider that rate-limits the probe is neither ok nor a revoked key:
/// `rate_limited`, and a required target in that state fails the check.
#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_probe_is_reported_as_such() {
    let s = Setup::new(false).await;
    s.good.set_behavior(Behavior::RateLimited(1));
    let out = s.kt(
        &["secrets", "verify", "--config", s.cfg(), "--output", "json"],
        None,
    );
    assert_no_key(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json(&out);
    let good = row(&doc, "targets", "good");
    assert_eq!(good["result"], "rate_limited", "{good}");
    assert_eq!(good["status"], 429);
}
