//! The central secret store, end to end against a real Vault-API server
//! (OpenBao in dev mode on loopback, see `guard_tests::vault`): `kt secrets
//! add/list/rm --store` write to it and leave nothing of the secret in the
//! data dir; a running `kt gateway run` reads it, follows a value rotated
//! in the server while traffic flows (no failed request), serves the last
//! good value while the server is unreachable and fails closed past
//! `max_stale`, follows a token rotated on disk, and keeps its good value
//! when the server denies permission or holds a malformed entry. KV v1 and
//! v2 both run against the server (OpenBao speaks both); TLS with
//! `ca_file`, AppRole and the `VAULT_TOKEN` convention are exercised too.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{chat_body, h1_plain, post, send};
use guard_tests::process::{KtChild, free_addr, text};
use guard_tests::vault::{ROOT_TOKEN, VaultServer, server_or_skip};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const V1: &str = "sk-vault-first-VkFVTFRfRklSU1RfVkFMVUU";
const V2: &str = "sk-vault-second-VkFVTFRfU0VDT05EX1ZBTA";
const HARDCODED: &str = "sk-hardcoded-in-the-job-SEFSRENPREVE";
/// Lets a token read and list kt's entries (KV v2 at `secret/`).
const READ_POLICY: &str = r#"
path "secret/data/kt/*" { capabilities = ["read"] }
path "secret/metadata/kt/*" { capabilities = ["read", "list"] }
path "secret/metadata/kt" { capabilities = ["list"] }
"#;

struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
    ca_pem: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    provider: FakeProvider,
    vault: VaultServer,
}

impl Setup {
    async fn new(tls: bool) -> Option<Setup> {
        let vault = server_or_skip(tls)?;
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let ca_pem = dir.path().join("fake-ca.pem");
        std::fs::write(&ca_pem, &ca.pem).unwrap();
        Some(Setup {
            data: dir.path().join("data"),
            ca_pem,
            cfg: dir.path().join("policy.yaml"),
            log: dir.path().join("kt.log"),
            listen: free_addr(),
            provider: FakeProvider::start(&ca, "primary", Behavior::Ok).await,
            vault,
            dir,
        })
    }

    /// One OpenAI target reading `store: OPENAI_KEY`; `store` is the body
    /// of `secrets.store` (indented by 4).
    fn write_config(&self, store: &str) {
        let ca = self
            .vault
            .ca_pem
            .as_ref()
            .map(|p| format!("    ca_file: {}\n", p.display()))
            .unwrap_or_default();
        let text = format!(
            "providers:\n  targets:\n    - id: primary\n      provider: openai\n      base_url: {}\n      secret_key_ref: {{store: OPENAI_KEY}}\npolicies:\n  chain: [audit-logger]\ngateway:\n  listen: {}\n  metrics: {}\nsecrets:\n  store:\n    backend: vault\n    address: {}\n{ca}{store}",
            self.provider.openai_base_url(),
            self.listen,
            free_addr(),
            self.vault.url,
        );
        std::fs::write(&self.cfg, text).unwrap();
    }

    fn kt(&self, args: &[&str], stdin: Option<&str>, token: Option<&str>) -> Output {
        let mut cmd = Command::new(KT);
        cmd.args(args)
            .env("KT_DATA_DIR", &self.data)
            .env("SSL_CERT_FILE", &self.ca_pem)
            .env_remove("VAULT_TOKEN")
            .env_remove("KT_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            cmd.env("VAULT_TOKEN", t);
        }
        let mut c = cmd.spawn().unwrap();
        let mut i = c.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
        drop(i);
        c.wait_with_output().unwrap()
    }

    fn start_gateway(&self, token: Option<&str>) -> KtChild {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = Command::new(KT);
        cmd.args(["gateway", "run", "--config"])
            .arg(&self.cfg)
            .env("KT_DATA_DIR", &self.data)
            .env("SSL_CERT_FILE", &self.ca_pem)
            .env("RUST_LOG", "info")
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = token {
            cmd.env("VAULT_TOKEN", t);
        }
        let kt = KtChild(cmd.spawn().unwrap());
        self.wait_log("gateway listening on");
        kt
    }

    fn wait_log(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let t = std::fs::read_to_string(&self.log).unwrap_or_default();
            if t.contains(needle) {
                return t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "waited 30 s for kt's log to say {needle:?}; it says:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Bearer values the provider received, in order.
    fn seen(&self) -> Vec<String> {
        self.provider
            .requests()
            .iter()
            .map(|r| {
                r.headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .trim_start_matches("Bearer ")
                    .to_string()
            })
            .collect()
    }

    fn files_in_data_dir(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.data.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.display().to_string());
                }
            }
        }
        out
    }

    /// Every byte under the data dir: nothing of a value may be there.
    fn data_dir_holds(&self, value: &str) -> bool {
        self.files_in_data_dir().iter().any(|f| {
            std::fs::read(f).is_ok_and(|b| b.windows(value.len()).any(|w| w == value.as_bytes()))
        })
    }
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
async fn kt_secrets_write_to_the_server_over_tls_and_nothing_lands_in_the_data_dir() {
    let Some(s) = Setup::new(true).await else {
        return;
    };
    s.write_config("    kv_version: 2\n");
    let cfg = s.cfg.display().to_string();

    // Written through kt, read back with the server's own CLI.
    let out = s.kt(
        &["secrets", "add", "OPENAI_KEY", "--store", "--config", &cfg],
        Some(V1),
        Some(ROOT_TOKEN),
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("added OPENAI_KEY in the vault at https://"),
        "{said}"
    );
    assert!(!said.contains(V1) && !String::from_utf8_lossy(&out.stderr).contains(V1));
    assert_eq!(s.vault.get("secret/kt/OPENAI_KEY").as_deref(), Some(V1));

    // Replacing needs --replace without a terminal; KT_CONFIG finds the store.
    let mut c = Command::new(KT);
    c.args(["secrets", "add", "OPENAI_KEY", "--store"])
        .env("KT_DATA_DIR", &s.data)
        .env("KT_CONFIG", &s.cfg)
        .env("VAULT_TOKEN", ROOT_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(V2.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --replace"));
    let out = s.kt(
        &[
            "secrets",
            "add",
            "OPENAI_KEY",
            "--store",
            "--replace",
            "--config",
            &cfg,
        ],
        Some(V2),
        Some(ROOT_TOKEN),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.vault.get("secret/kt/OPENAI_KEY").as_deref(), Some(V2));

    // list and status read the server (KV v2 has times).
    let out = s.kt(
        &["--output", "json", "secrets", "list", "--config", &cfg],
        None,
        Some(ROOT_TOKEN),
    );
    assert!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["secrets"][0]["name"], "OPENAI_KEY");
    assert_eq!(doc["secrets"][0]["backend"], "vault");
    assert_ne!(doc["secrets"][0]["created"], "1970-01-01T00:00:00Z");
    let out = s.kt(
        &["--output", "json", "secrets", "status", "--config", &cfg],
        None,
        Some(ROOT_TOKEN),
    );
    assert!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["targets"][0]["source"], "vault");

    // Nothing of the secret in the data dir: no store file, no value.
    assert!(
        !s.files_in_data_dir()
            .iter()
            .any(|f| f.contains("/secrets/")),
        "{:?}",
        s.files_in_data_dir()
    );
    assert!(!s.data_dir_holds(V1) && !s.data_dir_holds(V2));

    // Without `ca_file` the server's certificate is not trusted: refused.
    let untrusted = s.dir.path().join("untrusted.yaml");
    let cfg_text = std::fs::read_to_string(&s.cfg).unwrap();
    let without_ca: String = cfg_text
        .lines()
        .filter(|l| !l.contains("ca_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&untrusted, without_ca).unwrap();
    let out = s.kt(
        &[
            "secrets",
            "list",
            "--config",
            &untrusted.display().to_string(),
        ],
        None,
        Some(ROOT_TOKEN),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is unreachable") && err.contains("UnknownIssuer"),
        "{err}"
    );

    // Without a token: a clear error, exit 1, nothing printed of a value.
    let out = s.kt(&["secrets", "list", "--config", &cfg], None, None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("VAULT_TOKEN"),
        "{}",
        text(&out)
    );

    // A namespace: the header takes kt's requests there, and only there.
    s.vault.must(&["namespace", "create", "team-a"]);
    s.vault
        .must(&["secrets", "enable", "-ns=team-a", "-path=secret", "kv-v2"]);
    let ns_cfg = s.dir.path().join("ns.yaml");
    std::fs::write(
        &ns_cfg,
        format!(
            "{}    namespace: team-a\n",
            std::fs::read_to_string(&s.cfg).unwrap()
        ),
    )
    .unwrap();
    let out = s.kt(
        &[
            "secrets",
            "add",
            "NS_KEY",
            "--store",
            "--config",
            &ns_cfg.display().to_string(),
        ],
        Some(V1),
        Some(ROOT_TOKEN),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        s.vault
            .cli(&[
                "kv",
                "get",
                "-ns=team-a",
                "-field=value",
                "secret/kt/NS_KEY"
            ])
            .ok()
            .as_deref(),
        Some(V1)
    );
    assert_eq!(s.vault.get("secret/kt/NS_KEY"), None);

    // rm deletes it in the server; a second rm is exit 1.
    let out = s.kt(
        &["secrets", "rm", "OPENAI_KEY", "--config", &cfg],
        None,
        Some(ROOT_TOKEN),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.vault.get("secret/kt/OPENAI_KEY"), None);
    let out = s.kt(
        &["secrets", "rm", "OPENAI_KEY", "--config", &cfg],
        None,
        Some(ROOT_TOKEN),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_version_1_reads_and_writes_with_an_approle_login() {
    let Some(s) = Setup::new(false).await else {
        return;
    };
    s.vault
        .must(&["secrets", "enable", "-path=kv1", "-version=1", "kv"]);
    s.vault.must(&["auth", "enable", "approle"]);
    let policy = r#"path "kv1/team/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "kv1/team" { capabilities = ["list"] }
"#;
    let file = s.dir.path().join("kv1.hcl");
    std::fs::write(&file, policy).unwrap();
    s.vault
        .must(&["policy", "write", "kt-kv1", &file.display().to_string()]);
    s.vault.must(&[
        "write",
        "auth/approle/role/kt",
        "token_policies=kt-kv1",
        "token_ttl=1h",
    ]);
    let role_id = s
        .vault
        .must(&["read", "-field=role_id", "auth/approle/role/kt/role-id"]);
    let secret_id = s.vault.must(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/kt/secret-id",
    ]);
    let creds = s.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    for (f, v) in [("role-id", &role_id), ("secret-id", &secret_id)] {
        std::fs::write(creds.join(f), v).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(creds.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    s.write_config(&format!(
        "    mount: kv1\n    prefix: team\n    kv_version: 1\n    auth:\n      approle:\n        role_id_file: {}\n        secret_id_file: {}\n",
        creds.join("role-id").display(),
        creds.join("secret-id").display()
    ));
    let cfg = s.cfg.display().to_string();
    let out = s.kt(
        &["secrets", "add", "OPENAI_KEY", "--store", "--config", &cfg],
        Some(V1),
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.vault.get("kv1/team/OPENAI_KEY").as_deref(), Some(V1));

    // The gateway logs in the same way and serves the value.
    let _kt = s.start_gateway(None);
    let mut conn = h1_plain(s.listen).await;
    assert_eq!(chat(&mut conn).await, 200, "{}", s.log());
    assert_eq!(s.seen(), vec![V1.to_string()]);
    let out = s.kt(&["secrets", "list", "--config", &cfg], None, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OPENAI_KEY  vault"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_rotated_in_the_server_is_used_within_a_refresh_without_a_failed_request() {
    let Some(s) = Setup::new(false).await else {
        return;
    };
    s.vault.put("secret/kt/OPENAI_KEY", V1);
    s.write_config("    refresh: 1s\n    max_stale: 1m\n");
    let _kt = s.start_gateway(Some(ROOT_TOKEN));
    let mut conn = h1_plain(s.listen).await;
    let mut statuses = Vec::new();
    for _ in 0..50 {
        statuses.push(chat(&mut conn).await);
    }
    s.vault.put("secret/kt/OPENAI_KEY", V2);
    let rotated = Instant::now();
    while !s.seen().iter().any(|b| b == V2) {
        statuses.push(chat(&mut conn).await);
        assert!(rotated.elapsed() < Duration::from_secs(30), "{}", s.log());
    }
    let took = rotated.elapsed();
    for _ in 0..50 {
        statuses.push(chat(&mut conn).await);
    }
    let failed = statuses.iter().filter(|c| **c != 200).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed\n{}",
        statuses.len(),
        s.log()
    );
    let seen = s.seen();
    let first_new = seen.iter().position(|b| b == V2).unwrap();
    assert!(seen[..first_new].iter().all(|b| b == V1));
    assert!(seen[first_new..].iter().all(|b| b == V2));
    eprintln!("the rotated value reached the provider {took:?} after the write (refresh 1 s)");

    // The change is an event naming the secret and both fingerprints,
    // never a value.
    let log = s.wait_log("secrets changed: store:OPENAI_KEY (fp:");
    assert!(!log.contains(V1) && !log.contains(V2));
    let out = s.kt(&["--output", "json", "events"], None, None);
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events.contains("secrets changed: store:OPENAI_KEY (fp:") && events.contains(" -> fp:"),
        "{events}"
    );
    assert!(!events.contains(V1) && !events.contains(V2));
    assert!(!s.data_dir_holds(V1) && !s.data_dir_holds(V2));

    // `kt gateway reload` reads the server at once.
    s.vault.put("secret/kt/OPENAI_KEY", V1);
    let out = s.kt(&["gateway", "reload"], None, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("secrets changed: store:OPENAI_KEY"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_serves_the_last_value_then_fails_closed_past_max_stale() {
    let Some(s) = Setup::new(false).await else {
        return;
    };
    s.vault.put("secret/kt/OPENAI_KEY", V1);
    // Generous against a loaded machine: a healthy read never nears 1 s.
    s.write_config("    refresh: 1s\n    max_stale: 6s\n    timeout: 1s\n");
    let _kt = s.start_gateway(Some(ROOT_TOKEN));
    let metrics_addr = {
        let cfg = std::fs::read_to_string(&s.cfg).unwrap();
        cfg.lines()
            .find_map(|l| l.trim().strip_prefix("metrics: "))
            .unwrap()
            .to_string()
    };
    let mut conn = h1_plain(s.listen).await;
    assert_eq!(chat(&mut conn).await, 200);

    s.vault.pause(true);
    // The refresh fails: the log says so and the last good value is served.
    s.wait_log("secret store refresh failed, serving the last good values");
    assert_eq!(chat(&mut conn).await, 200, "{}", s.log());
    let metrics = scrape(&metrics_addr).await;
    assert!(
        metrics.contains("kt_secret_store{what=\"up\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kt_secret_store{what=\"stale_secrets\"} 1"),
        "{metrics}"
    );

    // Past max_stale: the required target fails closed with a clear error.
    s.wait_log("is no longer served");
    let mut c2 = h1_plain(s.listen).await;
    let r = send(
        &mut c2,
        post(
            "/openai/v1/chat/completions",
            &[("authorization", "Bearer sk-whatever")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("no usable target"), "{}", r.body);
    let before = s.seen().len();
    // The events and `kt secrets status` say so too.
    let out = s.kt(
        &[
            "secrets",
            "status",
            "--config",
            &s.cfg.display().to_string(),
        ],
        None,
        Some(ROOT_TOKEN),
    );
    let said = text(&out);
    assert!(
        said.contains("does NOT answer")
            && said.contains("the gateway's last word on the central store: secret-store-expired"),
        "{said}"
    );
    let out = s.kt(&["events", "--limit", "0"], None, None);
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events.contains("secret-store-down") && events.contains("secret-store-expired"),
        "{events}"
    );

    // Back: served again, without a restart.
    s.vault.pause(false);
    s.wait_log("secret store reachable again");
    wait_until_async(|| async {
        let mut c = h1_plain(s.listen).await;
        (chat(&mut c).await == 200).then_some(())
    })
    .await;
    assert!(s.seen().len() > before);
    assert!(s.seen().iter().all(|b| b == V1));
}

/// `wait_until` for async checks (every 100 ms, up to 30 s).
async fn wait_until_async<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<()>>,
{
    let start = Instant::now();
    loop {
        if f().await.is_some() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "waited 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scrape(addr: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut c = h1_plain(addr).await;
    let r = send(
        &mut c,
        http::Request::get("/metrics")
            .header("host", "localhost")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_on_disk_is_picked_up_and_permission_denied_keeps_the_good_value() {
    let Some(s) = Setup::new(false).await else {
        return;
    };
    s.vault.put("secret/kt/OPENAI_KEY", V1);
    let first = s.vault.token_with_policy("kt-read", READ_POLICY);
    let token_file = s.dir.path().join("token");
    let write_token = |t: &str| {
        // Replaced whole, as Vault Agent does.
        let tmp = s.dir.path().join("token.tmp");
        std::fs::write(&tmp, t).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, &token_file).unwrap();
    };
    write_token(&first);
    s.write_config(&format!(
        "    refresh: 1s\n    max_stale: 1h\n    auth:\n      token_file: {}\n",
        token_file.display()
    ));
    let _kt = s.start_gateway(None);
    let mut conn = h1_plain(s.listen).await;
    assert_eq!(chat(&mut conn).await, 200, "{}", s.log());

    // The old token is revoked and a new one written to the file: the
    // next refresh reads the file again and sees the rotated value.
    let second = s.vault.token_with_policy("kt-read", READ_POLICY);
    s.vault.must(&["token", "revoke", &first]);
    write_token(&second);
    s.vault.put("secret/kt/OPENAI_KEY", V2);
    wait_until_async(|| async {
        let mut c = h1_plain(s.listen).await;
        assert_eq!(chat(&mut c).await, 200, "{}", s.log());
        s.seen().iter().any(|b| b == V2).then_some(())
    })
    .await;

    // Permission denied: the policy no longer allows reading. The good
    // value stays, the log says why.
    let none = "path \"secret/data/other/*\" { capabilities = [\"read\"] }\n";
    let file = s.dir.path().join("deny.hcl");
    std::fs::write(&file, none).unwrap();
    s.vault
        .must(&["policy", "write", "kt-read", &file.display().to_string()]);
    s.wait_log("denied permission");
    let before = s.seen().len();
    for _ in 0..5 {
        assert_eq!(chat(&mut conn).await, 200, "{}", s.log());
    }
    assert!(s.seen()[before..].iter().all(|b| b == V2));

    // Reading allowed again, but the entry is malformed (no `value`
    // field) or empty: never replaces the good value.
    let file = s.dir.path().join("read.hcl");
    std::fs::write(&file, READ_POLICY).unwrap();
    s.vault
        .must(&["policy", "write", "kt-read", &file.display().to_string()]);
    s.vault.must(&[
        "kv",
        "put",
        "secret/kt/OPENAI_KEY",
        "other=sk-not-the-field",
    ]);
    s.wait_log("holds no usable value: it has no `value` field");
    s.vault.put("secret/kt/OPENAI_KEY", "");
    s.wait_log("holds no usable value: its value is empty");
    let before = s.seen().len();
    for _ in 0..5 {
        assert_eq!(chat(&mut conn).await, 200, "{}", s.log());
    }
    assert!(s.seen()[before..].iter().all(|b| b == V2), "{}", s.log());
    assert!(!s.log().contains("sk-not-the-field"));
}

#[test]
fn a_gateway_whose_store_cannot_be_read_at_start_refuses_to_start_and_says_why() {
    // No server at all: nothing to start, so this runs everywhere.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("policy.yaml");
    std::fs::write(
        &cfg,
        format!(
            "providers:\n  targets:\n    - id: primary\n      provider: openai\n      secret_key_ref: {{store: OPENAI_KEY}}\ngateway:\n  listen: {}\nsecrets:\n  store:\n    backend: vault\n    address: http://{}\n    timeout: 1s\n",
            free_addr(),
            free_addr()
        ),
    )
    .unwrap();
    let out = Command::new(KT)
        .args(["gateway", "run", "--config"])
        .arg(&cfg)
        .env("KT_DATA_DIR", dir.path().join("data"))
        .env("VAULT_TOKEN", "kt-test-token")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target primary: secret store:OPENAI_KEY cannot be read")
            && err.contains("is unreachable")
            && err.contains("kt secrets add OPENAI_KEY --store"),
        "{err}"
    );
    // Nothing of a secret store was created locally.
    assert!(!dir.path().join("data/secrets").exists());
}
