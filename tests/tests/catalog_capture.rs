//! `capture.providers: all` end to end, as root, in a child cgroup: kt
//! resolves every catalog host (through the test's own `/etc/hosts`,
//! bind-mounted in a private mount namespace: every name goes to a
//! loopback address, the host's file is never touched), a job calling a
//! provider the config has no target for is captured, refused in that
//! provider's shape and recorded with the provider named, and the
//! address it called never sees a byte; a routed provider's host is
//! served with the managed key.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use guard_tests::cgroup::TestCgroup;
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::mountns::PrivateMounts;
use guard_tests::process::{RunGuard, wait_for_log};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const MANAGED: &str = "sk-catalog-managed-MANAGEDVALUE-7777";
/// Where every catalog name points in the test's /etc/hosts: a "direct"
/// server that must never be reached.
const DIRECT: &str = "127.77.91.20";
/// The routed target (an address: it is not captured by name).
const ROUTED: &str = "127.77.91.10";

fn skip() -> bool {
    guard_tests::ebpf_tests_off("catalog_capture")
}

fn free_port() -> u16 {
    guard_tests::process::free_addr().port()
}

fn kt(data: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    guard_tests::kt_run::kt_cmd(KT, data, args, stdin)
}

/// A test `/etc/hosts`: every catalog host that can be resolved (not the
/// wildcards) at [`DIRECT`].
fn hosts_file(dir: &Path) -> PathBuf {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
    for h in guard::provider::official_hosts() {
        if !guard::provider::is_wildcard(h) {
            text.push_str(&format!("{DIRECT} {h}\n"));
        }
    }
    let path = dir.join("hosts");
    std::fs::write(&path, text).unwrap();
    path
}

/// curl inside the namespace (so it uses the test's /etc/hosts) and in
/// the cgroup, trusting kt's CA; returns (HTTP status, body, stderr).
fn curl(
    mounts: &PrivateMounts,
    cgroup: &mut TestCgroup,
    kt_ca: &Path,
    url: &str,
    key_header: &str,
) -> (u16, String, String) {
    let script = format!(
        r#"read go; exec curl -sS --max-time 20 --cacert "$KT_CA" -H "$KEY_HEADER" -H 'content-type: application/json' -d '{{"model":"m","messages":[{{"role":"user","content":"hi"}}]}}' -w '\n%{{http_code}}' {url}"#
    );
    let mut job = mounts
        .command("sh")
        .arg("-c")
        .arg(script)
        .env("KT_CA", kt_ca)
        .env("KEY_HEADER", key_header)
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
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let _ = cgroup.wait(pid);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string(), err)
}

#[test]
fn a_job_calling_a_provider_without_a_target_is_refused_and_named_under_capture_all() {
    if skip() {
        eprintln!("KT_SKIP_EBPF_TESTS=1: skipped (needs root, cgroup v2 and eBPF)");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new();
    let routed = rt.block_on(FakeProvider::start_at(
        &ca,
        "routed",
        Behavior::Ok,
        format!("{ROUTED}:443").parse().unwrap(),
    ));
    // Valid for the names the jobs call: only observe mode may reach it.
    let direct = rt.block_on(FakeProvider::start_named(
        &ca,
        "direct",
        Behavior::Ok,
        format!("{DIRECT}:443").parse().unwrap(),
        &["api.groq.com"],
    ));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = kt(
        &data,
        &["secrets", "add", "OPENAI_KEY", "--store"],
        Some(MANAGED),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = dir.path().join("kt.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"providers:
  targets:
    - id: openai
      provider: openai
      base_url: https://{ROUTED}/v1
      secret_key_ref: {{store: OPENAI_KEY}}
policies:
  chain: [audit-logger]
gateway:
  listen: 127.0.0.1:{}
  capture_listen: 127.0.0.1:{}
  capture_listen6: "[::1]:{}"
capture:
  providers: all
  ports: [443]
"#,
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let ca_pem = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_pem, &ca.pem).unwrap();
    let hosts = hosts_file(dir.path());
    let mounts = PrivateMounts::with_hosts_file(&hosts)
        .expect("a private mount namespace with its own /etc/hosts (needs root)");
    let mut cgroup = TestCgroup::new("catalog").expect("child cgroup (needs root and cgroup v2)");
    let log = dir.path().join("kt.log");
    let start_kt = |cgroup: &TestCgroup, extra: &[&str]| {
        let child = mounts
            .command(KT)
            .args(["run", "--config", cfg.to_str().unwrap()])
            .args(extra)
            .arg("--cgroup")
            .arg(cgroup.path())
            .env("KT_DATA_DIR", &data)
            .env("SSL_CERT_FILE", &ca_pem)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        cgroup.enter(child.id()).unwrap();
        wait_for_log(&log, "kt: capturing");
        RunGuard(Some(child))
    };
    let mut kt_run = start_kt(&cgroup, &[]);
    let kt_ca = data.join("ca/ca.pem");

    // Providers with no target: refused in their own shape, named.
    for (url, key, shape_field, provider) in [
        (
            "https://api.groq.com/openai/v1/chat/completions",
            "Authorization: Bearer gsk_JOBOWNKEY00000000000000000000000000",
            "\"error\":{",
            "groq",
        ),
        (
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/amazon.nova-micro-v1:0/converse",
            "Authorization: Bearer ABSKJOBOWNKEY0000000000000000000000",
            "\"__type\":\"AccessDeniedException\"",
            "bedrock",
        ),
        (
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
            "x-goog-api-key: AIzaJOBOWNKEY000000000000000000000000",
            "\"status\":\"PERMISSION_DENIED\"",
            "gemini",
        ),
    ] {
        let (status, body, err) = curl(&mounts, &mut cgroup, &kt_ca, url, key);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status, 403, "{url}: {body} {err}\nkt log:\n{text}");
        assert!(body.contains("kt_provider_not_routed"), "{url}: {body}");
        assert!(body.contains(shape_field), "{url}: {body}");
        assert!(body.contains(provider), "{url}: {body}");
    }
    // A routed provider's catalog host: served with the managed key.
    let (status, body, err) = curl(
        &mounts,
        &mut cgroup,
        &kt_ca,
        "https://api.openai.com/v1/chat/completions",
        "Authorization: Bearer legacy-job-key-0001",
    );
    assert_eq!(status, 200, "{body} {err}");
    assert!(body.contains("hello from routed"), "{body}");
    let seen = routed.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {MANAGED}")
    );
    // Nothing went direct.
    assert!(direct.requests().is_empty(), "{:?}", direct.requests());

    let events = kt(&data, &["--output", "json", "events"], None);
    let out = String::from_utf8_lossy(&events.stdout).to_string();
    for provider in ["groq", "bedrock", "gemini"] {
        let line = out
            .lines()
            .find(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|e| e["provider"] == provider)
            })
            .unwrap_or_else(|| panic!("no {provider} event in:\n{out}"));
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(e["status"], 403, "{e}");
        assert!(line.contains("provider-not-routed"), "{e}");
        assert!(
            e["client"]["exe"].as_str().unwrap_or("").ends_with("curl"),
            "{e}"
        );
    }
    stop(&mut kt_run);

    // Observe mode blocks nothing: the job's request goes on to where it
    // was going, with its own key, and is recorded with the provider.
    let _observe = start_kt(&cgroup, &["--observe"]);
    let own = "gsk_JOBOWNKEY00000000000000000000000000";
    let (status, body, err) = curl(
        &mounts,
        &mut cgroup,
        &kt_ca,
        "https://api.groq.com/openai/v1/chat/completions",
        &format!("Authorization: Bearer {own}"),
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status, 200, "{body} {err}\nkt log:\n{text}");
    assert!(body.contains("hello from direct"), "{body}");
    let seen = direct.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/openai/v1/chat/completions");
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {own}")
    );
    let events = kt(&data, &["--output", "json", "events"], None);
    let out = String::from_utf8_lossy(&events.stdout).to_string();
    let observed = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["provider"] == "groq" && e["status"] == 200)
        .unwrap_or_else(|| panic!("no observed groq event in:\n{out}"));
    let notes = observed["policy"].to_string();
    assert!(notes.contains("provider-not-routed"), "{observed}");
    assert!(notes.contains("observe mode"), "{observed}");
}

/// SIGTERM to the `kt run` we started, and wait for it.
fn stop(kt_run: &mut RunGuard) {
    if let Some(mut child) = kt_run.0.take() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}
