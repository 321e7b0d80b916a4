//! A fleet on one machine: three `kt gateway run` (separate data dirs,
//! ports and host identities via `KT_HOSTNAME`/`KT_HOST_ID`) share one
//! Vault-API server (OpenBao dev server on loopback) and one JSON Lines
//! event sink. A key rotated once in the server reaches all three; the
//! merged key report (`kt events --keys --from FILE`, and `kt report
//! --from`) names the one host whose legacy job still presents the old key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{chat_body, h1_plain, post, send};
use guard_tests::process::{KtChild, free_addr, text};
use guard_tests::vault::{ROOT_TOKEN, server_or_skip};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const OLD: &str = "sk-fleet-old-Rkxfm9PTERfS0VZXzIwMjZRMQ";
const NEW: &str = "sk-fleet-new-RkxFRVRfTkVXX0tFWV8yMDI2UTI";
const STRAY: &str = "sk-stray-unmanaged-U1RSQVlfS0VZXzAwMQ";

struct Host {
    name: String,
    data: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    kt: KtChild,
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool, log: impl Fn() -> String) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited 30 s for {what}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn chat(listen: SocketAddr, key: &str) -> u16 {
    let mut c = h1_plain(listen).await;
    let auth = format!("Bearer {key}");
    send(
        &mut c,
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
async fn a_rotation_reaches_three_hosts_and_the_merged_report_names_the_laggard() {
    let Some(vault) = server_or_skip(false) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_pem = dir.path().join("fake-ca.pem");
    std::fs::write(&ca_pem, &ca.pem).unwrap();
    let provider = FakeProvider::start(&ca, "openai", Behavior::Ok).await;
    let sink = dir.path().join("fleet-events.jsonl");
    vault.put("secret/kt/OPENAI_KEY", OLD);
    let last_bearer = || {
        provider
            .requests()
            .last()
            .and_then(|r| r.headers.get("authorization").cloned())
            .and_then(|v| v.to_str().ok().map(str::to_string))
            .unwrap_or_default()
    };

    let start_host = |i: usize| -> Host {
        let name = format!("runner-{i}");
        let data = dir.path().join(&name);
        let cfg = dir.path().join(format!("{name}.yaml"));
        let log = dir.path().join(format!("{name}.log"));
        let listen = free_addr();
        std::fs::write(
            &cfg,
            format!(
                "providers:\n  targets:\n    - id: openai\n      provider: openai\n      base_url: {}\n      secret_key_ref: {{store: OPENAI_KEY}}\npolicies:\n  chain: [audit-logger]\npolicy:\n  audit-logger:\n    sinks:\n      - type: file\n        path: {}\ngateway:\n  listen: {listen}\nsecrets:\n  store:\n    backend: vault\n    address: {}\n    refresh: 1s\n",
                provider.openai_base_url(),
                sink.display(),
                vault.url
            ),
        )
        .unwrap();
        let child = Command::new(KT)
            .args(["gateway", "run", "--config"])
            .arg(&cfg)
            .env("KT_DATA_DIR", &data)
            .env("SSL_CERT_FILE", &ca_pem)
            .env("VAULT_TOKEN", ROOT_TOKEN)
            .env("KT_HOSTNAME", &name)
            .env("KT_HOST_ID", format!("id-{i}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let h = Host {
            name,
            data,
            log,
            listen,
            kt: KtChild(child),
        };
        wait_for(
            "a gateway to listen",
            || {
                std::fs::read_to_string(&h.log)
                    .unwrap_or_default()
                    .contains("gateway listening on")
            },
            || std::fs::read_to_string(&h.log).unwrap_or_default(),
        );
        h
    };
    let mut hosts: Vec<Host> = (1..=3).map(start_host).collect();
    let logs = |hosts: &[Host]| {
        hosts
            .iter()
            .map(|h| {
                format!(
                    "== {}\n{}",
                    h.name,
                    std::fs::read_to_string(&h.log).unwrap_or_default()
                )
            })
            .collect::<String>()
    };

    // Before the rotation every host's job presents the current key.
    for h in &hosts {
        for _ in 0..3 {
            assert_eq!(chat(h.listen, OLD).await, 200, "{}", logs(&hosts));
        }
        assert_eq!(last_bearer(), format!("Bearer {OLD}"));
    }

    // Rotated once, in the server: every host picks it up by itself.
    vault.put("secret/kt/OPENAI_KEY", NEW);
    for h in &hosts {
        wait_for(
            &format!("{} to read the rotated key", h.name),
            || {
                std::fs::read_to_string(&h.log)
                    .unwrap_or_default()
                    .contains("secrets changed: store:OPENAI_KEY")
            },
            || logs(&hosts),
        );
        assert_eq!(chat(h.listen, NEW).await, 200);
        assert_eq!(last_bearer(), format!("Bearer {NEW}"), "{}", h.name);
    }

    // Runner 3 restarts after the rotation: it learns the old value from
    // the store's previous version (KV v2), not from having seen it change.
    {
        let h = &mut hosts[2];
        let _ = Command::new("kill")
            .args(["-TERM", &h.kt.0.id().to_string()])
            .status();
        let _ = h.kt.0.wait();
    }
    hosts[2] = start_host(3);

    // After it: runners 1 and 2 present the new key (and runner 2 a
    // stray key of its own); runner 3's legacy job still has the old one.
    for _ in 0..4 {
        assert_eq!(chat(hosts[0].listen, NEW).await, 200);
        assert_eq!(chat(hosts[1].listen, NEW).await, 200);
        assert_eq!(chat(hosts[2].listen, OLD).await, 200);
    }
    assert_eq!(chat(hosts[1].listen, STRAY).await, 200);
    // Every event reached the shared sink (flushed by a clean stop).
    for h in &mut hosts {
        let pid = h.kt.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = h.kt.0.wait();
    }
    let lines = std::fs::read_to_string(&sink).unwrap();
    assert!(!lines.contains(OLD) && !lines.contains(NEW) && !lines.contains(STRAY));

    // The merged report, from the one sink file.
    let out = Command::new(KT)
        .args(["--output", "json", "events", "--keys", "--from"])
        .arg(&sink)
        .env("KT_DATA_DIR", dir.path().join("reader"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["hosts"], 3, "{report}");
    let secret = |name: &str| {
        report["managed"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    let host_names = |s: &serde_json::Value| {
        let mut v: Vec<String> = s["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["host"]["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    // The old key after the rotation: runner-3 only, with its process.
    let old = secret("OPENAI_KEY (previous value)");
    assert_eq!(host_names(&old), vec!["runner-3"], "{report}");
    assert_eq!(old["hosts"][0]["host"]["id"], "id-3");
    assert_eq!(old["count"], 4);
    assert!(!old["hosts"][0]["processes"].as_array().unwrap().is_empty());
    // The current name: every host presented it.
    assert_eq!(
        host_names(&secret("OPENAI_KEY")),
        vec!["runner-1", "runner-2", "runner-3"]
    );
    // The stray key: unmanaged, under its provider, on runner-2.
    let unmanaged = &report["unmanaged"][0];
    assert_eq!(unmanaged["provider"], "openai", "{report}");
    assert_eq!(unmanaged["keys"][0]["host"]["name"], "runner-2");

    // The human form says the same; from stdin too.
    let mut child = Command::new(KT)
        .args(["events", "--keys", "--from", "-"])
        .env("KT_DATA_DIR", dir.path().join("reader"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut i = child.stdin.take().unwrap();
        i.write_all(lines.as_bytes()).unwrap();
        i.write_all(b"not an event\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    let block = said
        .split("  OPENAI_KEY (previous value)")
        .nth(1)
        .unwrap_or_else(|| panic!("{said}"));
    let block = block.split("\nKeys the guard").next().unwrap_or(block);
    assert!(block.contains("runner-3 (id-3)"), "{said}");
    assert!(
        !block.contains("runner-1") && !block.contains("runner-2"),
        "{said}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 line(s) were not kt events"));

    // `kt report --from` takes the same input.
    let out = Command::new(KT)
        .args(["report", "--from"])
        .arg(&sink)
        .env("KT_DATA_DIR", dir.path().join("reader"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("OPENAI_KEY (previous value)") && said.contains("runner-3"),
        "{said}"
    );
    for h in &hosts {
        assert!(!h.data.join("secrets").exists(), "{}", h.name);
    }
}
