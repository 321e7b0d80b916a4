//! Live rotation without a restart, end to end: the real `kt gateway run`
//! on loopback with a temp data dir, fake TLS providers (trusted through
//! `SSL_CERT_FILE`), a client making steady requests with its own
//! hard-coded key. The secret of the primary is rotated with
//! `kt secrets add --replace` (the running kt notices the store changed)
//! and the config is edited and reloaded with `kt gateway reload`: no
//! request fails, the provider sees the old managed value before and the
//! new one after, and a stream opened before the reload ends whole. A bad
//! reload (invalid file, missing required secret, a setting that needs a
//! restart) exits 1 with every problem and changes nothing.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{chat_body, h1_plain, post, send};
use guard_tests::process::{KtChild, free_addr, text, wait_until};
use http_body_util::BodyExt as _;

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const OLD: &str = "sk-reload-old-T0xEX01BTkFHRURfS0VZXzAx";
const NEW: &str = "sk-reload-new-TkVXX01BTkFHRURfS0VZXzAy";
const FALLBACK: &str = "sk-reload-fallback-RkFMTEJBQ0tfS0VZ";
const CLAUDE: &str = "sk-ant-reload-claude-Q0xBVURFX0tFWQ";
/// What the client sends: never reaches a provider.
const HARDCODED: &str = "sk-hardcoded-in-the-job-SEFSRENPREVE";

struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
    ca_pem: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    primary: FakeProvider,
    fallback: FakeProvider,
    claude: FakeProvider,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let ca = TestCa::new();
        let ca_pem = dir.path().join("fake-ca.pem");
        std::fs::write(&ca_pem, &ca.pem).unwrap();
        let s = Setup {
            data,
            ca_pem,
            cfg: dir.path().join("policy.yaml"),
            log: dir.path().join("kt.log"),
            listen: free_addr(),
            primary: FakeProvider::start(&ca, "primary", Behavior::Ok).await,
            fallback: FakeProvider::start(&ca, "fallback", Behavior::Ok).await,
            claude: FakeProvider::start(&ca, "claude", Behavior::Gated).await,
            dir,
        };
        s.write_config(true, "");
        for (name, value) in [
            ("OPENAI_PRIMARY", OLD),
            ("OPENAI_FALLBACK", FALLBACK),
            ("ANTHROPIC_KEY", CLAUDE),
        ] {
            let out = s.kt(&["secrets", "add", name, "--store"], Some(value));
            assert!(out.status.success(), "{}", text(&out));
        }
        s
    }

    /// The primary, the fallback (when `with_fallback`), an Anthropic
    /// target; `extra` is appended (a `gateway:` section).
    fn write_config(&self, with_fallback: bool, extra: &str) {
        let fallback = if with_fallback {
            format!(
                "    - id: fallback\n      provider: openai\n      required: false\n      base_url: {}\n      secret_key_ref:\n        store: OPENAI_FALLBACK\n",
                self.fallback.openai_base_url()
            )
        } else {
            String::new()
        };
        let text = format!(
            r#"pack:
  name: reload-test
  version: "1.0.0"
  enabled: true
providers:
  targets:
    - id: primary
      provider: openai
      required: true
      base_url: {primary}
      secret_key_ref:
        store: OPENAI_PRIMARY
{fallback}    - id: claude
      provider: anthropic
      base_url: {claude}
      secret_key_ref:
        store: ANTHROPIC_KEY
policies:
  chain:
    - audit-logger
gateway:
  listen: {listen}
{extra}"#,
            primary = self.primary.openai_base_url(),
            claude = self.claude.anthropic_base_url(),
            listen = self.listen,
        );
        // Written whole then renamed, as editors and config managers do.
        let tmp = self.dir.path().join("policy.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.cfg).unwrap();
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

    fn start_gateway(&self) -> KtChild {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(KT)
            .args(["gateway", "run", "--config"])
            .arg(&self.cfg)
            .env("KT_DATA_DIR", &self.data)
            .env("SSL_CERT_FILE", &self.ca_pem)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let kt = KtChild(child);
        self.wait_log("gateway listening on");
        kt
    }

    fn wait_log(&self, needle: &str) -> String {
        wait_until("kt's log to say it", || {
            let t = std::fs::read_to_string(&self.log).unwrap_or_default();
            t.contains(needle).then_some(t)
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn bearer(r: &guard_tests::fake_provider::Recorded) -> String {
    r.headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn chat(
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
) -> u16 {
    let auth = format!("Bearer {HARDCODED}");
    send(
        conn,
        post(
            "/openai/v1/chat/completions",
            &[("authorization", auth.as_str())],
            chat_body(false),
        ),
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_and_reload_under_steady_traffic_without_a_failed_request() {
    let s = Setup::new().await;
    let _kt = s.start_gateway();

    // A long stream opened before anything changes; its target is
    // removed by the reload below and it must still end whole.
    let mut stream_conn = h1_plain(s.listen).await;
    stream_conn.ready().await.unwrap();
    let resp = stream_conn
        .send_request(post(
            "/anthropic/v1/messages",
            &[("x-api-key", HARDCODED), ("anthropic-version", "2023-06-01")],
            r#"{"model":"claude-x","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream_body = resp.into_body();
    let first = stream_body.frame().await.unwrap().unwrap();
    assert!(first.is_data(), "the stream's first chunk arrives");

    let mut conn = h1_plain(s.listen).await;
    let mut statuses = Vec::new();
    for _ in 0..100 {
        statuses.push(chat(&mut conn).await);
    }

    // Rotate the primary's value in place; the running kt notices.
    let out = s.kt(
        &["secrets", "add", "OPENAI_PRIMARY", "--store", "--replace"],
        Some(NEW),
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut sent_after_rotation = 0;
    while !s
        .primary
        .requests()
        .iter()
        .any(|r| bearer(r) == format!("Bearer {NEW}"))
    {
        statuses.push(chat(&mut conn).await);
        sent_after_rotation += 1;
        assert!(
            sent_after_rotation < 2000,
            "the new value never reached the provider"
        );
    }

    // Drop the fallback (the rotation is done) and the Anthropic target.
    s.write_config(false, "");
    let cfg_text = std::fs::read_to_string(&s.cfg).unwrap();
    let without_claude = cfg_text.replace(
        &format!(
            "    - id: claude\n      provider: anthropic\n      base_url: {}\n      secret_key_ref:\n        store: ANTHROPIC_KEY\n",
            s.claude.anthropic_base_url()
        ),
        "",
    );
    assert_ne!(cfg_text, without_claude);
    std::fs::write(&s.cfg, without_claude).unwrap();
    let reload = tokio::task::spawn_blocking({
        let data = s.data.clone();
        let ca = s.ca_pem.clone();
        move || {
            Command::new(KT)
                .args(["gateway", "reload"])
                .env("KT_DATA_DIR", data)
                .env("SSL_CERT_FILE", ca)
                .output()
                .unwrap()
        }
    });
    while !reload.is_finished() {
        statuses.push(chat(&mut conn).await);
    }
    let out = reload.await.unwrap();
    assert!(out.status.success(), "{}\nkt log:\n{}", text(&out), s.log());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("reloaded (generation")
            && said.contains("-fallback")
            && said.contains("-claude"),
        "{said}"
    );
    while statuses.len() < 300 {
        statuses.push(chat(&mut conn).await);
    }

    // The stream opened before the reload finishes on what it started with.
    s.claude.release();
    let rest = stream_body
        .collect()
        .await
        .expect("the stream ends whole")
        .to_bytes();
    assert!(
        String::from_utf8_lossy(&rest).contains("message_stop")
            || String::from_utf8_lossy(&rest).contains("[DONE]"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    // Removed by the reload: new requests for it find no target.
    let mut c2 = h1_plain(s.listen).await;
    let gone = send(
        &mut c2,
        post(
            "/anthropic/v1/messages",
            &[
                ("x-api-key", HARDCODED),
                ("anthropic-version", "2023-06-01"),
            ],
            r#"{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_ne!(gone.status, 200, "{}", gone.body);

    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    assert!(statuses.len() >= 300);

    // The provider saw the old value, then only the new one; never the
    // client's own key.
    let seen: Vec<String> = s.primary.requests().iter().map(bearer).collect();
    let first_new = seen
        .iter()
        .position(|b| *b == format!("Bearer {NEW}"))
        .unwrap();
    assert!(
        seen[..first_new]
            .iter()
            .all(|b| *b == format!("Bearer {OLD}"))
    );
    assert!(
        seen[first_new..]
            .iter()
            .all(|b| *b == format!("Bearer {NEW}")),
        "an old value after the new one"
    );
    assert!(first_new >= 100);
    assert!(s.fallback.requests().is_empty(), "the primary never failed");
    assert!(!seen.iter().any(|b| b.contains(HARDCODED)));

    // Both reloads are events naming what changed, never a value.
    let ev = s.kt(&["events", "--output", "json"], None);
    let events = String::from_utf8_lossy(&ev.stdout);
    assert!(
        events.contains("secrets changed: store:OPENAI_PRIMARY"),
        "{events}"
    );
    assert!(events.contains("-fallback"), "{events}");
    assert!(
        events.contains(&format!("\"uid\":{}", rustix_uid())),
        "the caller's uid: {events}"
    );
    for v in [OLD, NEW, FALLBACK, CLAUDE, HARDCODED] {
        assert!(!events.contains(v));
        assert!(!s.log().contains(v));
    }
}

fn rustix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_changes_nothing_and_says_every_problem() {
    let s = Setup::new().await;
    let _kt = s.start_gateway();
    let mut conn = h1_plain(s.listen).await;
    assert_eq!(chat(&mut conn).await, 200);
    let good = std::fs::read_to_string(&s.cfg).unwrap();
    let reload = |s: &Setup| {
        let out = s.kt(&["gateway", "reload"], None);
        (out.status.code(), text(&out))
    };

    // An invalid file: exit 1, each problem with its position.
    std::fs::write(
        &s.cfg,
        good.replace("required: true", "required: maybe") + "bogus: 1\n",
    )
    .unwrap();
    let (code, said) = reload(&s);
    assert_eq!(code, Some(1), "{said}");
    let cfg = s.cfg.display().to_string();
    assert!(said.contains(&format!("{cfg}:")), "{said}");
    assert!(
        said.contains("bogus") && said.contains("required"),
        "{said}"
    );
    assert!(said.contains("the running config stays in place"), "{said}");

    // A required secret that does not resolve.
    std::fs::write(
        &s.cfg,
        good.replace("store: OPENAI_PRIMARY", "store: NOT_ADDED_YET"),
    )
    .unwrap();
    let (code, said) = reload(&s);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("NOT_ADDED_YET"), "{said}");

    // A setting that needs a restart.
    std::fs::write(&s.cfg, good.replace(&s.listen.to_string(), "127.0.0.1:1")).unwrap();
    let (code, said) = reload(&s);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("gateway.listen changed") && said.contains("restart"),
        "{said}"
    );

    // Still serving the old config: the same key reaches the primary.
    assert_eq!(chat(&mut conn).await, 200);
    let last = s.primary.requests().last().map(bearer).unwrap();
    assert_eq!(last, format!("Bearer {OLD}"));
    assert!(s.log().contains("reload refused"), "{}", s.log());

    // JSON for machines.
    let out = s.kt(&["--output", "json", "gateway", "reload"], None);
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(doc["result"], "refused");
    assert!(doc["problems"].as_array().is_some_and(|p| !p.is_empty()));

    // Put the file back: the reload applies and says there is no change.
    std::fs::write(&s.cfg, &good).unwrap();
    let (code, said) = reload(&s);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("no change"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_no_kt_running_is_a_clear_error() {
    let s = Setup::new().await;
    let out = s.kt(&["gateway", "reload"], None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no running kt answers on"),
        "{}",
        text(&out)
    );

    let mut kt = s.start_gateway();
    s.write_config(false, "");
    let pid = kt.0.id();
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    s.wait_log("-fallback");
    let mut conn = h1_plain(s.listen).await;
    assert_eq!(chat(&mut conn).await, 200);
    assert!(
        kt.0.try_wait().unwrap().is_none(),
        "SIGHUP must not stop kt"
    );
}

/// `secret_key_ref.file` (Vault Agent, a Kubernetes secret volume): a new
/// value written to the file is used within a second or two, without a
/// reload command; a file that becomes empty never downgrades the key —
/// kt keeps the value it had, warns, and `kt secrets status` counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_secret_rotates_live_and_is_never_downgraded_to_empty() {
    let s = Setup::new().await;
    let key_file = s.dir.path().join("openai.key");
    let write_key = |v: &str| {
        // As Vault Agent and kubelet do: a new file renamed over the old.
        let tmp = s.dir.path().join("openai.key.tmp");
        std::fs::write(&tmp, v).unwrap();
        std::fs::rename(&tmp, &key_file).unwrap();
    };
    write_key(&format!("{OLD}\n"));
    let cfg = std::fs::read_to_string(&s.cfg).unwrap().replace(
        "store: OPENAI_PRIMARY",
        &format!("file: {}", key_file.display()),
    );
    std::fs::write(&s.cfg, cfg).unwrap();
    let _kt = s.start_gateway();
    let mut conn = h1_plain(s.listen).await;
    assert_eq!(chat(&mut conn).await, 200);
    assert_eq!(
        s.primary.requests().last().map(bearer),
        Some(format!("Bearer {OLD}")),
        "the trailing newline is not part of the key"
    );

    write_key(NEW);
    let mut sent = 0;
    loop {
        assert_eq!(chat(&mut conn).await, 200);
        if s.primary.requests().last().map(bearer) == Some(format!("Bearer {NEW}")) {
            break;
        }
        sent += 1;
        assert!(
            sent < 5000,
            "the new file value was never used\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Emptied (a half-done rotation): the key stays, loudly.
    write_key("");
    s.wait_log("keeping the value kt already had");
    for _ in 0..20 {
        assert_eq!(chat(&mut conn).await, 200);
    }
    assert!(
        s.primary
            .requests()
            .iter()
            .rev()
            .take(20)
            .all(|r| bearer(r) == format!("Bearer {NEW}")),
        "an emptied file must not change the key"
    );
    let out = s.kt(
        &["secrets", "status", "--config", s.cfg.to_str().unwrap()],
        None,
    );
    let said = text(&out);
    assert!(
        said.contains("primary: its secret could not be read at 1 reload(s)"),
        "{said}"
    );
    assert!(said.contains("is empty"), "{said}");
    for v in [OLD, NEW] {
        assert!(!s.log().contains(v));
        assert!(!said.contains(v));
    }
}
