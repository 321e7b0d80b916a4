//! `kt run` end to end, as root, in a child cgroup: a "legacy" curl with a
//! hard-coded old key talks to `api.openai.com` (resolved by curl itself to
//! a loopback address in the capture prefixes), the kernel sends it to the
//! gateway, the fake provider sees only the managed new key, and the event
//! names the process and the old secret its key matched.
//!
//! Only loopback: the fake providers listen on 127.77.0.x:443; no name is
//! redirected for anyone but the curl in the test cgroup (`--resolve`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guard_tests::cgroup::TestCgroup;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const Q2: &str = "sk-runtest-new-q2-TUFOQUdFRF9ORVdfS0VZXzIwMjZRMg";
/// Not key-shaped on purpose (no known prefix, one case): capture's argv
/// masking does not recognise it, so only the gateway's exact redaction
/// keeps it out of the recorded command line.
const Q1: &str = "legacy-q1-token-4f1c9e2a77d0b3";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kt(data: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut c = Command::new(KT)
        .args(args)
        .env("KT_DATA_DIR", data)
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

/// Ends the `kt run` we started (by pid) if the test fails half way.
struct Guard(Option<Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(path: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kt run did not report {needle:?}; its stderr:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn config(dir: &Path, q2: &FakeProvider, q1: &FakeProvider) -> (PathBuf, u16) {
    let capture_port = free_port();
    let yaml = format!(
        r#"pack:
  name: run-test
  version: "1.0.0"
  enabled: true
providers:
  routing:
    strategy: ordered
  fallback:
    enabled: true
  targets:
    - id: openai-2026q2
      provider: openai
      required: true
      base_url: {q2}
      secret_key_ref:
        store: OPENAI_API_KEY_2026Q2
    - id: openai-2026q1
      provider: openai
      required: false
      base_url: {q1}
      secret_key_ref:
        store: OPENAI_API_KEY_2026Q1
policies:
  chain:
    - audit-logger
gateway:
  listen: 127.0.0.1:{p1}
  capture_listen: 127.0.0.1:{p2}
  capture_listen6: "[::1]:{p3}"
capture:
  hosts: []
  cidrs: [127.77.0.0/16]
  ports: [443]
"#,
        q2 = q2.openai_base_url(),
        q1 = q1.openai_base_url(),
        p1 = free_port(),
        p2 = capture_port,
        p3 = free_port(),
    );
    let path = dir.join("kt.yaml");
    std::fs::write(&path, yaml).unwrap();
    (path, capture_port)
}

#[test]
fn kt_run_swaps_a_legacy_process_key_and_names_the_process() {
    if std::env::var_os("KT_SKIP_EBPF_TESTS").is_some_and(|v| v == "1") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new();
    let q2 = rt.block_on(FakeProvider::start_at(
        &ca,
        "fake-q2",
        Behavior::Ok,
        "127.77.0.10:443".parse().unwrap(),
    ));
    let q1 = rt.block_on(FakeProvider::start_at(
        &ca,
        "fake-q1",
        Behavior::Ok,
        "127.77.0.11:443".parse().unwrap(),
    ));

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (name, value) in [("OPENAI_API_KEY_2026Q2", Q2), ("OPENAI_API_KEY_2026Q1", Q1)] {
        let out = kt(&data, &["secrets", "add", name, "--store"], Some(value));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (cfg, capture_port) = config(dir.path(), &q2, &q1);
    let ca_pem = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_pem, &ca.pem).unwrap();

    let mut cgroup = TestCgroup::new("run").expect("child cgroup (needs root and cgroup v2)");
    let log = dir.path().join("kt.log");
    let kt_run = Command::new(KT)
        .args(["run", "--config", cfg.to_str().unwrap(), "--cgroup"])
        .arg(cgroup.path())
        .env("KT_DATA_DIR", &data)
        .env("SSL_CERT_FILE", &ca_pem)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(kt_run));
    wait_for(&log, "kt: capturing");

    // The legacy job: a hard-coded old key, no proxy settings, the real name.
    let kt_ca = data.join("ca/ca.pem");
    let mut job = Command::new("sh")
        .arg("-c")
        .arg(r#"read go; exec curl -sS --max-time 20 --resolve api.openai.com:443:127.77.0.10 --cacert "$KT_CA" -H "Authorization: Bearer $OLD_KEY" -H 'content-type: application/json' -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' https://api.openai.com/v1/chat/completions"#)
        .env("KT_CA", &kt_ca)
        .env("OLD_KEY", Q1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut go = job.stdin.take().unwrap();
    let mut stdout = job.stdout.take().unwrap();
    let mut stderr = job.stderr.take().unwrap();
    let pid = cgroup.adopt(job).unwrap();
    go.write_all(b"go\n").unwrap();
    drop(go);
    let mut body = String::new();
    stdout.read_to_string(&mut body).unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let status = cgroup.wait(pid).unwrap().status;
    assert!(
        status.success(),
        "curl failed: {err}\nkt log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        body.contains("fake-q2"),
        "answer did not come from the primary: {body}"
    );

    // The provider saw the managed new key, never the process's own.
    let seen = q2.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let auth = seen[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(auth, format!("Bearer {Q2}"));
    assert!(
        seen.iter()
            .all(|r| !format!("{:?}", r.headers).contains(Q1))
    );
    assert!(q1.requests().is_empty());

    // Dialling the capture port directly (no capture record) is closed,
    // never served or spliced back into the listener.
    let mut direct = std::net::TcpStream::connect(("127.0.0.1", capture_port)).unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = direct.write_all(b"GET / HTTP/1.1\r\nhost: api.openai.com\r\n\r\n");
    let mut buf = [0u8; 64];
    assert!(
        matches!(direct.read(&mut buf), Ok(0) | Err(_)),
        "unrecorded connection was served"
    );

    // SIGTERM: clean exit, programs detached.
    let mut child = guard.0.take().unwrap();
    // By pid, the child we started.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(exit.code(), Some(0), "{text}");
    assert!(text.contains("capture detached"), "{text}");
    assert!(
        !text.contains(Q1) && !text.contains(Q2),
        "a key reached the log:\n{text}"
    );

    // The event names the process and the old secret its key matched.
    let events = kt(&data, &["--output", "json", "events"], None);
    let out = String::from_utf8_lossy(&events.stdout).to_string();
    let line = out
        .lines()
        .find(|l| l.contains("chat/completions"))
        .unwrap_or_else(|| panic!("no event: {out}"));
    let e: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(e["client"]["pid"], pid, "{e}");
    assert!(
        e["client"]["exe"].as_str().unwrap_or("").ends_with("curl"),
        "{e}"
    );
    assert_eq!(e["key"]["matches_secret"], "OPENAI_API_KEY_2026Q1", "{e}");
    assert_eq!(e["target_chosen"], "openai-2026q2", "{e}");
    assert_eq!(e["decision"], "allow", "{e}");
    assert!(!out.contains(Q1) && !out.contains(Q2));
    // curl had the key in its argv; the event keeps the shape, not the key.
    assert!(
        e["client"]["cmdline"]
            .as_str()
            .unwrap_or("")
            .contains("Bearer [redacted]"),
        "{e}"
    );

    // The rotation question: who still uses the Q1 key?
    let keys = kt(&data, &["events", "--keys"], None);
    let report = String::from_utf8_lossy(&keys.stdout);
    assert!(
        report.contains("OPENAI_API_KEY_2026Q1") && report.contains("curl"),
        "{report}"
    );
}
