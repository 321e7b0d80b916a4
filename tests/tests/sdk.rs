//! The real provider SDKs (Python `openai`, `anthropic`, `google-genai`,
//! `groq`, `mistralai`, `cohere`, `huggingface_hub` and `boto3`, pinned,
//! from the venv `cargo xtask setup` makes) with their default settings —
//! only the API key in the environment — through kt:
//!
//! * base URL: the SDK's base-URL variable or documented argument points
//!   at kt's explicit listener (`/openai/v1`, `/anthropic`, `/gemini`,
//!   `/groq`, `/mistral`, `/cohere`, `/huggingface/v1`; `/bedrock` only
//!   for the SigV4 refusal, as botocore sends a Bedrock API key over
//!   HTTPS only);
//! * CONNECT: `HTTPS_PROXY` names kt's explicit listener, kt's CA is
//!   trusted (`SSL_CERT_FILE`, botocore's `AWS_CA_BUNDLE`);
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
//! `ClientError`, `ForbiddenError`, `AccessDeniedException`, …), and
//! Bedrock's SigV4 requests (plain AWS access keys) are refused as
//! `AccessDeniedException`. Without the venv the tests say why (the reason setup
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
/// The Bearer providers added to the catalog's SDK coverage: (SDK run
/// by drive.py, secret name, managed key, the job's own key, its key
/// variable).
const BEARER: [(&str, &str, &str, &str, &str); 5] = [
    (
        "groq",
        "GROQ",
        "gsk_sdkmanagedgroqMANAGEDVALUE5",
        "gsk_jobownGROQKEY0005",
        "GROQ_API_KEY",
    ),
    (
        "mistral",
        "MIS",
        "mistral-sdk-managed-MANAGEDVALUE-6",
        "legacy-mistral-JOBKEY-0006",
        "MISTRAL_API_KEY",
    ),
    (
        "cohere",
        "CO",
        "cohere-sdk-managed-MANAGEDVALUE-7",
        "legacy-cohere-JOBKEY-0007",
        "CO_API_KEY",
    ),
    // The router's auto provider needs an `hf_` token on the client side.
    (
        "huggingface",
        "HF",
        "hf_sdkmanagedMANAGEDVALUE8",
        "hf_jobownHFKEY0008",
        "HF_TOKEN",
    ),
    (
        "bedrock",
        "BR",
        "ABSKsdkmanagedbedrockMANAGEDVALUE9",
        "ABSKjobownBEDROCKKEY0009",
        "AWS_BEARER_TOKEN_BEDROCK",
    ),
];
const SDKS: [&str; 9] = [
    "openai",
    "anthropic",
    "gemini",
    "azure",
    "groq",
    "mistral",
    "cohere",
    "huggingface",
    "bedrock",
];
const ANSWERS: [(&str, &str); 9] = [
    ("openai", "fake-openai"),
    ("anthropic", "fake-anthropic"),
    ("gemini", "fake-gemini"),
    ("azure", "fake-azure"),
    ("groq", "fake-groq"),
    ("mistral", "fake-mistral"),
    ("cohere", "fake-cohere"),
    ("huggingface", "fake-huggingface"),
    ("bedrock", "fake-bedrock"),
];
/// The packages drive.py imports, as `cargo xtask setup` pins them (its
/// `kt-packages.txt` in the venv lists them).
const VENV_PACKAGES: [&str; 8] = [
    "openai",
    "anthropic",
    "google-genai",
    "groq",
    "mistralai",
    "cohere",
    "huggingface_hub",
    "boto3",
];
/// Plain AWS access keys (fake values): botocore signs with SigV4.
const AWS_KEY_ID: &str = "AKIAKTSDKTESTEXAMPLE";
const AWS_SECRET: &str = "kt/sdk/test/secret/EXAMPLEKEY0000000000000";

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
        // A venv made before an SDK was added lacks it: say so, rather
        // than fail on an import error.
        let pinned = std::fs::read_to_string(dir.join("kt-packages.txt")).unwrap_or_default();
        let missing: Vec<&str> = VENV_PACKAGES
            .iter()
            .copied()
            .filter(|p| !pinned.lines().any(|l| l.starts_with(&format!("{p}=="))))
            .collect();
        assert!(
            missing.is_empty(),
            "the SDK venv at {} lacks {missing:?}: run `cargo xtask setup` again",
            dir.display()
        );
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
             pinned provider SDKs there)",
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
fn assert_keys(
    oa: &FakeProvider,
    ant: &FakeProvider,
    gem: &FakeProvider,
    az: &FakeProvider,
    bearer: &[FakeProvider],
) {
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
    for (f, (sdk, _, managed, _, _)) in bearer.iter().zip(BEARER) {
        assert!(!f.requests().is_empty(), "{sdk}: no request arrived");
        for r in f.requests() {
            assert_eq!(
                header(&r, "authorization"),
                Some(&*format!("Bearer {managed}")),
                "{sdk} {}",
                r.path
            );
            // Each SDK's default paths, as kt forwarded them.
            let want = match sdk {
                "groq" => "/openai/v1/chat/completions",
                "mistral" => "/v1/chat/completions",
                "cohere" => "/v2/chat",
                "huggingface" => "/v1/chat/completions",
                // botocore percent-encodes the model id's colon.
                _ => "/model/amazon.nova-micro-v1%3A0/converse",
            };
            assert!(r.path.starts_with(want), "{sdk}: {}", r.path);
        }
    }
    let owns: Vec<&str> = [OWN_OA, OWN_ANT, OWN_GEM, OWN_AZ, AWS_KEY_ID]
        .into_iter()
        .chain(BEARER.iter().map(|b| b.3))
        .collect();
    for f in [oa, ant, gem, az].into_iter().chain(bearer) {
        assert!(!f.requests().is_empty());
        for r in f.requests() {
            let seen = format!("{:?}{}", r.headers, r.path);
            for own in &owns {
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
    let groq = find(rs, "groq", false);
    assert_eq!(groq["error"], "PermissionDeniedError", "{groq}");
    assert!(
        groq["message"]
            .as_str()
            .unwrap_or("")
            .contains("an anthropic key sent to groq"),
        "{groq}"
    );
    // groq's errors carry the body, not OpenAI's `code` attribute.
    assert_eq!(
        groq["body"]["error"]["code"], "kt_credential_refused",
        "{groq}"
    );
    let mistral = find(rs, "mistral", false);
    assert_eq!(mistral["status"], 403, "{mistral}");
    assert!(
        mistral["body"]
            .as_str()
            .unwrap_or("")
            .contains("kt_credential_refused"),
        "{mistral}"
    );
    let cohere = find(rs, "cohere", false);
    assert_eq!(cohere["error"], "ForbiddenError", "{cohere}");
    assert_eq!(
        cohere["body"]["error"]["code"], "kt_credential_refused",
        "{cohere}"
    );
    if rs.iter().any(|r| r["sdk"] == "bedrock") {
        for stream in [false, true] {
            let br = find(rs, "bedrock", stream);
            assert_eq!(br["error"], "AccessDeniedException", "{br}");
            assert_eq!(br["status"], 403, "{br}");
        }
    }
    // SigV4 (plain AWS access keys): nothing kt could swap, refused.
    let sig = find(rs, "bedrock-sigv4", false);
    assert_eq!(sig["error"], "AccessDeniedException", "{sig}");
    assert!(
        sig["message"].as_str().unwrap_or("").contains("SigV4")
            || sig["message"].as_str().unwrap_or("").contains("sigv4"),
        "{sig}"
    );
}

/// Hugging Face's router: with a base URL, the SDK sends any key and kt
/// refuses another provider's; with its default auto-router it refuses a
/// key without `hf_` itself, before sending anything.
fn assert_hf_refusal(rs: &[serde_json::Value], base_url: bool) {
    let hf = find(rs, "huggingface", false);
    if base_url {
        assert_eq!(hf["error"], "HfHubHTTPError", "{hf}");
        assert_eq!(hf["status"], 403, "{hf}");
        assert!(
            hf["message"]
                .as_str()
                .unwrap_or("")
                .contains("kt_credential_refused"),
            "{hf}"
        );
    } else {
        assert_eq!(hf["error"], "ValueError", "{hf}");
    }
}

fn secrets() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("OA", MANAGED_OA),
        ("ANT", MANAGED_ANT),
        ("GEM", MANAGED_GEM),
        ("AZ", MANAGED_AZ),
    ];
    v.extend(BEARER.iter().map(|b| (b.1, b.2)));
    v
}

fn keys() -> MapResolver {
    MapResolver::of(&secrets())
}

/// The SDKs a run drives, and with another provider's keys the SigV4
/// client too (last: it drops the Bedrock key from its env). No Bedrock
/// API key through a base URL: botocore sends a bearer token only over
/// HTTPS (`InvalidEndpointConfigurationError` otherwise) and kt's
/// explicit listener is plain HTTP; CONNECT and capture cover it.
fn sdks(foreign: bool, base_url: bool) -> Vec<&'static str> {
    let mut v: Vec<&str> = SDKS
        .into_iter()
        .filter(|s| !(base_url && *s == "bedrock"))
        .collect();
    if foreign {
        v.push("bedrock-sigv4");
    }
    v
}

/// The answers a run must read (see [`sdks`]).
fn answers(base_url: bool) -> Vec<(&'static str, &'static str)> {
    ANSWERS
        .into_iter()
        .filter(|(s, _)| !(base_url && *s == "bedrock"))
        .collect()
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
        .env("OPENAI_API_VERSION", "2024-10-21")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        // No instance-metadata lookups (a link-local address, never ours).
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        // huggingface_hub fetches an "agent harnesses" list from the Hub
        // (`{HF_ENDPOINT}/api/agent-harnesses`, not the inference router)
        // before its first request: a closed loopback port instead, so
        // nothing leaves the machine (it then detects no agent).
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (sdk, _, _, own, var) in BEARER {
        // Groq's own prefix would not be foreign to Groq: an Anthropic key.
        let other = if sdk == "groq" {
            "sk-ant-api03-FOREIGNKEY000000000000000000"
        } else {
            foreign_key
        };
        cmd.env(var, if foreign { other } else { own });
    }
}

/// The fakes of the Bearer providers, in [`BEARER`]'s order.
async fn bearer_fakes(ca: &TestCa) -> Vec<FakeProvider> {
    let mut v = Vec::new();
    for (sdk, ..) in BEARER {
        v.push(FakeProvider::start(ca, &format!("fake-{sdk}"), Behavior::Ok).await);
    }
    v
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
    let bearer = bearer_fakes(&ca).await;
    let mut targets = vec![
        target("oa", Provider::OpenAi, &oa.openai_base_url(), "OA"),
        target("ant", Provider::Anthropic, &ant.anthropic_base_url(), "ANT"),
        target("gem", Provider::Gemini, &gem.anthropic_base_url(), "GEM"),
        target("az", Provider::Azure, &az.anthropic_base_url(), "AZ"),
    ];
    for (f, (sdk, secret, ..)) in bearer.iter().zip(BEARER) {
        // The target's path is the provider's API root (requests are
        // re-rooted on it).
        let root = match sdk {
            "groq" => "/openai/v1",
            "mistral" => "/v1",
            _ => "",
        };
        let base = format!("{}{root}", f.anthropic_base_url());
        targets.push(target(sdk, Provider::parse(sdk), &base, secret));
    }
    let cfg = config(targets);
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
            cmd.arg(&script).args(sdks(foreign, mode == "base-url"));
            if mode == "base-url" {
                cmd.env("OPENAI_BASE_URL", format!("{base}/openai/v1"))
                    .env("ANTHROPIC_BASE_URL", format!("{base}/anthropic"))
                    .env("KT_TEST_GEMINI_BASE_URL", format!("{base}/gemini"))
                    .env("AZURE_OPENAI_ENDPOINT", format!("{base}/azure"))
                    .env("GROQ_BASE_URL", format!("{base}/groq"))
                    // mistralai has no base-URL variable: drive.py passes
                    // this as its documented `server_url` argument.
                    .env("KT_TEST_MISTRAL_BASE_URL", format!("{base}/mistral"))
                    .env("CO_API_URL", format!("{base}/cohere"))
                    // InferenceClient's documented `base_url` argument
                    // (it appends `/chat/completions`).
                    .env("KT_TEST_HF_BASE_URL", format!("{base}/huggingface/v1"))
                    .env(
                        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
                        format!("{base}/bedrock"),
                    );
            } else {
                // The SDKs' own hosts, through kt as an HTTPS proxy: kt
                // answers CONNECT for provider names (no DNS by the client).
                // botocore trusts certifi's roots unless told otherwise.
                cmd.env("HTTPS_PROXY", &base)
                    .env("SSL_CERT_FILE", &kt_ca)
                    .env("AWS_CA_BUNDLE", &kt_ca)
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
        assert_answers(&runs[0].0, &answers(mode == "base-url"), &runs[0].1);
        assert_refusals(&runs[1].0);
        assert_hf_refusal(&runs[1].0, mode == "base-url");
    }
    assert_keys(&oa, &ant, &gem, &az, &bearer);
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
    // The Bearer providers' targets name only their provider (Bedrock its
    // region): kt calls their official hosts, which the test's /etc/hosts
    // points at these fakes; a job reaching one directly would show its
    // own key there.
    let hosts_of = |sdk: &str| match sdk {
        "groq" => "api.groq.com",
        "mistral" => "api.mistral.ai",
        "cohere" => "api.cohere.com",
        "huggingface" => "router.huggingface.co",
        _ => "bedrock-runtime.us-east-1.amazonaws.com",
    };
    let bearer: Vec<FakeProvider> = BEARER
        .iter()
        .enumerate()
        .map(|(i, (sdk, ..))| {
            rt.block_on(FakeProvider::start_named(
                &ca,
                &format!("fake-{sdk}"),
                Behavior::Ok,
                format!("127.77.93.{}:443", 14 + i).parse().unwrap(),
                &[hosts_of(sdk)],
            ))
        })
        .collect();
    // Where the SDKs' default hosts point (captured; must never be reached).
    let direct = at("direct", "127.77.93.20:443");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (name, value) in secrets() {
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
    - id: groq
      provider: groq
      secret_key_ref: {{store: GROQ}}
    - id: mistral
      provider: mistral
      secret_key_ref: {{store: MIS}}
    - id: cohere
      provider: cohere
      secret_key_ref: {{store: CO}}
    - id: hf
      provider: huggingface
      secret_key_ref: {{store: HF}}
    - id: br
      provider: bedrock
      region: us-east-1
      secret_key_ref: {{store: BR}}
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
    let mut etc_hosts = "127.0.0.1 localhost\n::1 localhost\n127.77.93.20 api.openai.com\n127.77.93.20 api.anthropic.com\n127.77.93.20 generativelanguage.googleapis.com\n127.77.93.13 myres.openai.azure.com\n".to_string();
    for (f, (sdk, ..)) in bearer.iter().zip(BEARER) {
        etc_hosts.push_str(&format!("{} {}\n", f.addr.ip(), hosts_of(sdk)));
    }
    std::fs::write(&hosts, etc_hosts).unwrap();
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
            .args(sdks(foreign, false))
            .env("AZURE_OPENAI_ENDPOINT", "https://myres.openai.azure.com")
            .env("SSL_CERT_FILE", &kt_ca)
            .env("REQUESTS_CA_BUNDLE", &kt_ca)
            .env("AWS_CA_BUNDLE", &kt_ca)
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
    assert_keys(&oa, &ant, &gem, &az, &bearer);
    assert_refusals(&runs[1].0);
    assert_hf_refusal(&runs[1].0, false);
    assert!(
        direct.requests().is_empty(),
        "an SDK reached its provider directly"
    );
}
