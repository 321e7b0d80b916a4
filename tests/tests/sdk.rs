//! The real provider SDKs (Python `openai`, `anthropic`, `google-genai`,
//! pinned, from the venv `cargo xtask setup` makes) with their default
//! settings — only the API key in the environment — through kt:
//!
//! * base URL: the SDK's base-URL variable points at kt's explicit
//!   listener (`/openai/v1`, `/anthropic`, `/gemini`);
//! * capture (root, eBPF): nothing but the key is set; the SDK resolves
//!   `api.openai.com` & co. through the test's own `/etc/hosts` (a private
//!   mount namespace: loopback addresses, the host's file untouched), the
//!   kernel sends its connections to kt, and the SDK trusts kt's CA
//!   through `SSL_CERT_FILE` / `REQUESTS_CA_BUNDLE`.
//!
//! Each SDK makes a plain call and a streamed one and must read the fake
//! provider's answer; the fakes must see only the managed keys, each in
//! its provider's style; a key of another provider is refused by kt with
//! an error the SDK raises as its own (`PermissionDeniedError`,
//! `ClientError`). Without the venv the tests say why (the reason setup
//! recorded) instead of passing in silence.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use guard::config::Provider;
use guard_tests::cgroup::TestCgroup;
use guard_tests::fake_provider::{Behavior, FakeProvider, Recorded, TestCa};
use guard_tests::gateway_fixture::{MapResolver, config, start, target};
use guard_tests::mountns::PrivateMounts;
use guard_tests::process::{RunGuard, wait_for_log};

const DRIVE: &str = include_str!("../sdk/drive.py");
const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");

const MANAGED_OA: &str = "sk-sdk-managed-openai-MANAGEDVALUE-1";
const MANAGED_ANT: &str = "sk-ant-sdk-managed-MANAGEDVALUE-2";
const MANAGED_GEM: &str = "gemini-sdk-managed-MANAGEDVALUE-3";
const MANAGED_AZ: &str = "azure-sdk-managed-MANAGEDVALUE-4";
/// The jobs' own keys: of no known format, so kt swaps them.
const OWN_OA: &str = "legacy-openai-JOBKEY-0001";
const OWN_ANT: &str = "legacy-anthropic-JOBKEY-0002";
const OWN_GEM: &str = "legacy-gemini-JOBKEY-0003";
const OWN_AZ: &str = "0123456789abcdef0123456789abcdef";
const SDKS: [&str; 4] = ["openai", "anthropic", "gemini", "azure"];
const ANSWERS: [(&str, &str); 4] = [
    ("openai", "fake-openai"),
    ("anthropic", "fake-anthropic"),
    ("gemini", "fake-gemini"),
    ("azure", "fake-azure"),
];

/// The venv's python, or why there is none. Panics when setup never ran
/// (no venv and no recorded reason): that is a broken setup, not a skip.
fn sdk_python() -> Option<PathBuf> {
    let dir = std::env::var_os("KT_SDK_VENV").map_or_else(
        || {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cache/kt/sdk-venv")
        },
        PathBuf::from,
    );
    let python = dir.join("bin/python");
    if python.exists() {
        return Some(python);
    }
    match std::fs::read_to_string(dir.with_extension("unavailable")) {
        Ok(why) => {
            guard_tests::skipped(
                "sdk: the real provider SDKs",
                &format!(
                    "no SDK venv at {}: `cargo xtask setup` could not make it: {}",
                    dir.display(),
                    why.trim()
                ),
            );
            None
        }
        Err(_) => panic!(
            "no SDK venv at {} and no recorded reason: run `cargo xtask setup` (it installs the \
             pinned openai, anthropic and google-genai SDKs there)",
            dir.display()
        ),
    }
}

fn header<'a>(r: &'a Recorded, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

/// One JSON line per SDK call, by (sdk, stream).
fn results(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn find<'a>(rs: &'a [serde_json::Value], sdk: &str, stream: bool) -> &'a serde_json::Value {
    rs.iter()
        .find(|r| r["sdk"] == sdk && r["stream"] == stream)
        .unwrap_or_else(|| panic!("no result for {sdk} stream={stream} in {rs:?}"))
}

/// Every SDK read its fake's answer, plain and streamed.
fn assert_answers(rs: &[serde_json::Value], fakes: &[(&str, &str)], log: &str) {
    for (sdk, fake) in fakes {
        for stream in [false, true] {
            let r = find(rs, sdk, stream);
            let text = r["text"].as_str().unwrap_or_default();
            assert!(
                text.contains(&format!("from {fake}")),
                "{sdk} stream={stream}: {r}\n{log}"
            );
        }
    }
}

/// The fakes saw only the managed keys, each in its provider's style.
fn assert_keys(oa: &FakeProvider, ant: &FakeProvider, gem: &FakeProvider, az: &FakeProvider) {
    for r in az.requests() {
        assert_eq!(header(&r, "api-key"), Some(MANAGED_AZ));
        assert!(
            r.path
                .starts_with("/openai/deployments/gpt-4o/chat/completions?api-version="),
            "{}",
            r.path
        );
    }
    for r in oa.requests() {
        assert_eq!(
            header(&r, "authorization"),
            Some(&*format!("Bearer {MANAGED_OA}"))
        );
    }
    for r in ant.requests() {
        assert_eq!(header(&r, "x-api-key"), Some(MANAGED_ANT));
        assert_eq!(header(&r, "authorization"), None);
    }
    for r in gem.requests() {
        assert_eq!(header(&r, "x-goog-api-key"), Some(MANAGED_GEM));
        assert!(!r.path.contains("key="), "{}", r.path);
    }
    for f in [oa, ant, gem, az] {
        assert!(!f.requests().is_empty());
        for r in f.requests() {
            let seen = format!("{:?}{}", r.headers, r.path);
            for own in [OWN_OA, OWN_ANT, OWN_GEM, OWN_AZ] {
                assert!(!seen.contains(own), "a job's own key reached a provider");
            }
        }
    }
}

/// A key of another provider: kt refuses it, the SDK raises its own
/// permission error carrying kt's code.
fn assert_refusals(rs: &[serde_json::Value]) {
    let oa = find(rs, "openai", false);
    assert_eq!(oa["error"], "PermissionDeniedError", "{oa}");
    assert_eq!(oa["code"], "kt_credential_refused", "{oa}");
    let ant = find(rs, "anthropic", false);
    assert_eq!(ant["error"], "PermissionDeniedError", "{ant}");
    assert!(
        ant["message"]
            .as_str()
            .unwrap_or("")
            .contains("kt_credential_refused"),
        "{ant}"
    );
    let az = find(rs, "azure", false);
    assert_eq!(az["error"], "PermissionDeniedError", "{az}");
    assert_eq!(az["code"], "kt_credential_refused", "{az}");
    let gem = find(rs, "gemini", false);
    assert_eq!(gem["error"], "ClientError", "{gem}");
    assert_eq!(gem["status"], 403, "{gem}");
    assert!(
        gem["message"]
            .as_str()
            .unwrap_or("")
            .contains("PERMISSION_DENIED"),
        "{gem}"
    );
}

fn keys() -> MapResolver {
    MapResolver::of(&[
        ("OA", MANAGED_OA),
        ("ANT", MANAGED_ANT),
        ("GEM", MANAGED_GEM),
        ("AZ", MANAGED_AZ),
    ])
}

/// The SDKs' environment: their key variables (own keys, or another
/// provider's when `foreign`) and nothing else of ours.
fn key_env(cmd: &mut Command, foreign: bool) {
    let foreign_key = "gsk_FOREIGNKEY0000000000000000000000000";
    let (oa, ant, gem, az) = if foreign {
        (foreign_key, foreign_key, foreign_key, foreign_key)
    } else {
        (OWN_OA, OWN_ANT, OWN_GEM, OWN_AZ)
    };
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("OPENAI_API_KEY", oa)
        .env("ANTHROPIC_API_KEY", ant)
        .env("GEMINI_API_KEY", gem)
        .env("AZURE_OPENAI_API_KEY", az)
        // The Azure client needs its API version (no default in the SDK).
        .env("OPENAI_API_VERSION", "2024-10-21");
}

/// Base URL, then CONNECT (`HTTPS_PROXY`, kt's CA trusted): the SDKs'
/// own defaults otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sdks_with_default_settings_through_base_url_and_connect() {
    let Some(python) = sdk_python() else { return };
    let ca = TestCa::new();
    let oa = FakeProvider::start(&ca, "fake-openai", Behavior::Ok).await;
    let ant = FakeProvider::start(&ca, "fake-anthropic", Behavior::Ok).await;
    let gem = FakeProvider::start(&ca, "fake-gemini", Behavior::Ok).await;
    let az = FakeProvider::start(&ca, "fake-azure", Behavior::Ok).await;
    let cfg = config(vec![
        target("oa", Provider::OpenAi, &oa.openai_base_url(), "OA"),
        target("ant", Provider::Anthropic, &ant.anthropic_base_url(), "ANT"),
        target("gem", Provider::Gemini, &gem.anthropic_base_url(), "GEM"),
        target("az", Provider::Azure, &az.anthropic_base_url(), "AZ"),
    ]);
    let gw = start(cfg, keys(), &ca).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("drive.py");
    std::fs::write(&script, DRIVE).unwrap();
    let kt_ca = dir.path().join("kt-ca.pem");
    std::fs::write(&kt_ca, gw.ca.cert_pem()).unwrap();
    let base = format!("http://{}", gw.addr);
    for mode in ["base-url", "connect"] {
        let mut runs = Vec::new();
        for foreign in [false, true] {
            let mut cmd = Command::new(&python);
            key_env(&mut cmd, foreign);
            cmd.arg(&script).args(SDKS);
            if mode == "base-url" {
                cmd.env("OPENAI_BASE_URL", format!("{base}/openai/v1"))
                    .env("ANTHROPIC_BASE_URL", format!("{base}/anthropic"))
                    .env("KT_TEST_GEMINI_BASE_URL", format!("{base}/gemini"))
                    .env("AZURE_OPENAI_ENDPOINT", format!("{base}/azure"));
            } else {
                // The SDKs' own hosts, through kt as an HTTPS proxy: kt
                // answers CONNECT for provider names (no DNS by the client).
                cmd.env("HTTPS_PROXY", &base)
                    .env("SSL_CERT_FILE", &kt_ca)
                    .env("AZURE_OPENAI_ENDPOINT", "https://myres.openai.azure.com");
            }
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(out.status.success(), "{mode}: {stdout}\n{stderr}");
            runs.push((results(&stdout), format!("{mode}: {stdout}\n{stderr}")));
        }
        assert_answers(&runs[0].0, &ANSWERS, &runs[0].1);
        assert_refusals(&runs[1].0);
    }
    assert_keys(&oa, &ant, &gem, &az);
    let arrivals: Vec<String> = gw
        .sink
        .snapshot()
        .iter()
        .map(|r| format!("{:?}", r.arrival))
        .collect();
    assert!(arrivals.iter().any(|a| a == "BaseUrl"), "{arrivals:?}");
    assert!(arrivals.iter().any(|a| a == "Connect"), "{arrivals:?}");
}

fn skip_ebpf() -> bool {
    guard_tests::ebpf_tests_off("sdk")
}

fn free_port() -> u16 {
    guard_tests::process::free_addr().port()
}

fn kt_cli(data: &Path, args: &[&str], stdin: &str) {
    let mut c = Command::new(KT)
        .args(args)
        .env("KT_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn real_sdks_with_default_settings_through_capture() {
    if skip_ebpf() {
        eprintln!("KT_SKIP_EBPF_TESTS=1: skipped (needs root, cgroup v2 and eBPF)");
        return;
    }
    let Some(python) = sdk_python() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new();
    let at = |name: &str, addr: &str| {
        rt.block_on(FakeProvider::start_at(
            &ca,
            name,
            Behavior::Ok,
            addr.parse().unwrap(),
        ))
    };
    let oa = at("fake-openai", "127.77.93.10:443");
    let ant = at("fake-anthropic", "127.77.93.11:443");
    let gem = at("fake-gemini", "127.77.93.12:443");
    // The Azure target names only its resource: kt calls
    // myres.openai.azure.com, which the test's /etc/hosts points here.
    let az = rt.block_on(FakeProvider::start_named(
        &ca,
        "fake-azure",
        Behavior::Ok,
        "127.77.93.13:443".parse().unwrap(),
        &["myres.openai.azure.com"],
    ));
    // Where the SDKs' default hosts point (captured; must never be reached).
    let direct = at("direct", "127.77.93.20:443");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (name, value) in [
        ("OA", MANAGED_OA),
        ("ANT", MANAGED_ANT),
        ("GEM", MANAGED_GEM),
        ("AZ", MANAGED_AZ),
    ] {
        kt_cli(&data, &["secrets", "add", name, "--store"], value);
    }
    let cfg = dir.path().join("kt.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"providers:
  targets:
    - id: oa
      provider: openai
      base_url: https://127.77.93.10/v1
      secret_key_ref: {{store: OA}}
    - id: ant
      provider: anthropic
      base_url: https://127.77.93.11
      secret_key_ref: {{store: ANT}}
    - id: gem
      provider: gemini
      base_url: https://127.77.93.12
      secret_key_ref: {{store: GEM}}
    - id: az
      provider: azure
      resource: myres
      secret_key_ref: {{store: AZ}}
policies:
  chain: [audit-logger]
gateway:
  listen: 127.0.0.1:{}
  capture_listen: 127.0.0.1:{}
  capture_listen6: "[::1]:{}"
capture:
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
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n::1 localhost\n127.77.93.20 api.openai.com\n127.77.93.20 api.anthropic.com\n127.77.93.20 generativelanguage.googleapis.com\n127.77.93.13 myres.openai.azure.com\n",
    )
    .unwrap();
    let mounts = PrivateMounts::with_hosts_file(&hosts)
        .expect("a private mount namespace with its own /etc/hosts (needs root)");
    let mut cgroup = TestCgroup::new("sdk").expect("child cgroup (needs root and cgroup v2)");
    let log = dir.path().join("kt.log");
    let child = mounts
        .command(KT)
        .args(["run", "--config", cfg.to_str().unwrap(), "--cgroup"])
        .arg(cgroup.path())
        .env("KT_DATA_DIR", &data)
        .env("SSL_CERT_FILE", &ca_pem)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _kt = RunGuard(Some(child));
    cgroup.enter(pid).unwrap();
    wait_for_log(&log, "kt: capturing");
    let kt_ca = data.join("ca/ca.pem");
    let script = dir.path().join("drive.py");
    std::fs::write(&script, DRIVE).unwrap();

    let mut runs = Vec::new();
    for foreign in [false, true] {
        // Inside the namespace (its /etc/hosts), started stopped so it is
        // in the cgroup before its first connect.
        let mut cmd = mounts.command("sh");
        key_env(&mut cmd, foreign);
        cmd.args(["-c", r#"read go; exec "$@""#, "sh"])
            .arg(&python)
            .arg(&script)
            .args(SDKS)
            .env("AZURE_OPENAI_ENDPOINT", "https://myres.openai.azure.com")
            .env("SSL_CERT_FILE", &kt_ca)
            .env("REQUESTS_CA_BUNDLE", &kt_ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut job = cmd.spawn().unwrap();
        let mut go = job.stdin.take().unwrap();
        let stdout = job.stdout.take().unwrap();
        let stderr = job.stderr.take().unwrap();
        let job_pid = cgroup.adopt(job).unwrap();
        go.write_all(b"go\n").unwrap();
        drop(go);
        let read_err =
            std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        let out = std::io::read_to_string(stdout).unwrap_or_default();
        let err = read_err.join().unwrap_or_default();
        let _ = cgroup.wait(job_pid);
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        runs.push((results(&out), format!("{out}\n{err}\nkt log:\n{log_text}")));
    }
    assert_answers(&runs[0].0, &ANSWERS, &runs[0].1);
    assert_keys(&oa, &ant, &gem, &az);
    assert_refusals(&runs[1].0);
    assert!(
        direct.requests().is_empty(),
        "an SDK reached its provider directly"
    );
}
