//! The policy chain in the gateway, as a client sees it: the seed's
//! dlp-filter blocks a pasted key (plain, JSON-escaped, gzip, split across
//! messages) and fuzzy blocked terms with a provider-shaped 403 naming the
//! rule and never the secret; nothing reaches the provider; redact and audit
//! modes forward; every decision is recorded.

use std::io::Write;
use std::sync::Arc;

use guard::ca::Ca;
use guard::config::{DlpAction, DlpFilter, PolicyKind, Provider};
use guard::events::{EventWriter, WriterConfig};
use guard::policy::Chain;
use guard::record::{AuditHealth, MemorySink, PolicyAction, PolicyId};
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::*;

const MANAGED: &str = "sk-managed-policy-test-MANAGED-9999";

fn seed_dlp(action: DlpAction) -> DlpFilter {
    DlpFilter {
        detect_patterns: vec![
            "sk-[A-Za-z0-9]{20,}".into(),
            "AKIA[0-9A-Z]{16}".into(),
            "ghp_[0-9A-Za-z]{36}".into(),
        ],
        blocked_terms: vec![
            "openai production key".into(),
            "anthropic billing token".into(),
        ],
        action,
        fuzzy_matching: true,
        max_distance: 1,
        builtin_rules: true,
    }
}

struct Setup {
    up: FakeProvider,
    gw: Running,
}

async fn setup(action: DlpAction) -> Setup {
    setup_with(action, None, false).await
}

async fn setup_with(
    action: DlpAction,
    writer: Option<EventWriter>,
    refuse_when_unhealthy: bool,
) -> Setup {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "upstream", Behavior::Ok).await;
    let mut cfg = config(vec![target(
        "oa",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA",
    )]);
    cfg.chain = vec![PolicyKind::DlpFilter, PolicyKind::AuditLogger];
    cfg.dlp = Some(seed_dlp(action));
    let health = writer.map(|w| Arc::new(w) as Arc<dyn AuditHealth>);
    let chain = Chain::new(&cfg, health, refuse_when_unhealthy).unwrap();
    let gca = Arc::new(Ca::ephemeral().unwrap());
    let sink = Arc::new(MemorySink::new());
    let gw = builder(cfg, MapResolver::of(&[("OA", MANAGED)]), gca.clone(), &ca)
        .policy(Arc::new(chain))
        .record_sink(sink.clone())
        .build()
        .unwrap();
    Setup {
        up,
        gw: serve(gw, gca, sink).await,
    }
}

fn aws_key() -> String {
    ["AKIA", "QWERTYUIOPASDFGH"].concat()
}

fn chat(content: &str) -> String {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}]})
        .to_string()
}

async fn send_chat(s: &Setup, body: impl Into<bytes::Bytes>, headers: &[(&str, &str)]) -> Answer {
    let mut c = h1_plain(s.gw.addr).await;
    let mut h = vec![
        ("authorization", "Bearer sk-client-own-key-000000000000"),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(headers);
    send(&mut c, post("/openai/v1/chat/completions", &h, body)).await
}

fn assert_blocked(a: &Answer, rule_hint: &str, secret: &str) {
    assert_eq!(a.status, 403, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("provider-shaped JSON");
    assert_eq!(v["error"]["code"], "kt_dlp_blocked", "{}", a.body);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(rule_hint),
        "message should name the rule: {msg}"
    );
    assert!(msg.contains("body:"), "message should say where: {msg}");
    assert!(
        !a.body.contains(secret),
        "the block response repeats the secret"
    );
}

#[tokio::test]
async fn a_pasted_key_is_blocked_in_every_encoding_and_never_forwarded() {
    let s = setup(DlpAction::Block).await;
    let key = aws_key();

    let plain = send_chat(&s, chat(&format!("my key is {key} please debug")), &[]).await;
    assert_blocked(&plain, "aws-access-key-id", &key);

    // JSON \u escapes hide the key from naive scanners.
    let escaped: String = key
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    let body =
        format!(r#"{{"model":"m","messages":[{{"role":"user","content":"key {escaped} here"}}]}}"#);
    let a = send_chat(&s, body, &[]).await;
    assert_eq!(a.status, 403, "escaped: {}", a.body);

    // gzip-compressed body.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(chat(&format!("zipped {key}")).as_bytes())
        .unwrap();
    let a = send_chat(&s, gz.finish().unwrap(), &[("content-encoding", "gzip")]).await;
    assert_eq!(a.status, 403, "gzip: {}", a.body);

    // Split across two messages.
    let (a1, a2) = key.split_at(9);
    let body = serde_json::json!({"model": "m", "messages": [
        {"role": "user", "content": format!("first half {a1}")},
        {"role": "user", "content": a2},
    ]})
    .to_string();
    let a = send_chat(&s, body, &[]).await;
    assert_eq!(a.status, 403, "split: {}", a.body);

    assert!(
        s.up.requests().is_empty(),
        "a blocked request reached the provider"
    );
    let decisions = s.gw.sink.snapshot();
    assert_eq!(decisions.len(), 4);
    assert!(decisions.iter().all(|d| {
        d.policy
            .iter()
            .any(|n| n.policy == PolicyId::DlpFilter && n.action == PolicyAction::Block)
    }));
    // The event names the same code the client saw.
    assert!(
        decisions
            .iter()
            .all(|d| d.error_code == Some("kt_dlp_blocked")),
        "{decisions:?}"
    );
    assert!(!format!("{decisions:?}").contains(&key));
}

#[tokio::test]
async fn fuzzy_blocked_terms_match_typos_and_spacing_but_not_distant_phrases() {
    let s = setup(DlpAction::Block).await;
    for phrase in [
        "where is the openai prodution key?",
        "the OpenAI Production   Key leaked",
    ] {
        let a = send_chat(&s, chat(phrase), &[]).await;
        assert_eq!(a.status, 403, "{phrase}: {}", a.body);
        assert!(a.body.contains("blocked-term"), "{}", a.body);
    }
    let ok = send_chat(&s, chat("openai's product roadmap keynote"), &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(s.up.requests().len(), 1);
}

#[tokio::test]
async fn a_clean_prompt_is_forwarded_with_the_managed_key() {
    let s = setup(DlpAction::Block).await;
    let a = send_chat(&s, chat("summarise this paragraph"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = &s.up.requests()[0];
    assert_eq!(
        r.headers.get("authorization").unwrap(),
        &format!("Bearer {MANAGED}")
    );
}

#[tokio::test]
async fn redact_mode_forwards_valid_json_without_the_secret() {
    let s = setup(DlpAction::Redact).await;
    let key = aws_key();
    let a = send_chat(&s, chat(&format!("debug {key} now")), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = &s.up.requests()[0];
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains(&key), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("still valid JSON");
    assert!(
        v["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("REDACTED"),
        "{v}"
    );
    let d = &s.gw.sink.snapshot()[0];
    assert!(
        d.policy
            .iter()
            .any(|n| n.policy == PolicyId::DlpFilter && n.action == PolicyAction::Redact),
        "{:?}",
        d.policy
    );
}

#[tokio::test]
async fn audit_mode_forwards_unchanged_and_records_the_finding() {
    let s = setup(DlpAction::Audit).await;
    let key = aws_key();
    let a = send_chat(&s, chat(&format!("audit {key}")), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(String::from_utf8_lossy(&s.up.requests()[0].body).contains(&key));
    let d = &s.gw.sink.snapshot()[0];
    assert!(
        d.policy
            .iter()
            .any(|n| n.policy == PolicyId::DlpFilter && n.action == PolicyAction::Audit),
        "{:?}",
        d.policy
    );
    assert!(!format!("{d:?}").contains(&key));
}

#[tokio::test]
async fn with_the_event_store_down_traffic_follows_on_store_failure() {
    // A regular file where the data directory should be: the store cannot open.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"not a directory").unwrap();

    // on_store_failure: refuse: a 503 the client can read, nothing forwarded.
    let (writer, _handle) = EventWriter::spawn(WriterConfig::new(&data, 0));
    assert!(!writer.healthy());
    let s = setup_with(DlpAction::Block, Some(writer.clone()), true).await;
    let a = send_chat(&s, chat("summarise this paragraph"), &[]).await;
    assert_eq!(a.status, 503, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "kt_audit_unavailable", "{}", a.body);
    assert!(
        s.up.requests().is_empty(),
        "a refused request reached the provider"
    );
    let d = s.gw.sink.snapshot();
    assert_eq!(d[0].error_code, Some("kt_audit_unavailable"), "{d:?}");

    // The default (log loudly): requests still follow the policy.
    let s = setup_with(DlpAction::Block, Some(writer), false).await;
    let a = send_chat(&s, chat("summarise this paragraph"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = send_chat(&s, chat(&format!("key {}", aws_key())), &[]).await;
    assert_blocked(&a, "aws-access-key-id", &aws_key());
    assert_eq!(s.up.requests().len(), 1);
}

#[tokio::test]
async fn a_base64_wrapped_key_in_a_pasted_secret_manifest_is_blocked() {
    use base64::Engine as _;
    let s = setup(DlpAction::Block).await;
    let key = aws_key();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
    let manifest = format!("kind: Secret\ndata:\n  AWS_ACCESS_KEY_ID: {b64}\n");
    let a = send_chat(&s, chat(&manifest), &[]).await;
    assert_blocked(&a, "aws-access-key-id", &key);
    assert!(
        !a.body.contains(&b64),
        "the block response repeats the encoded key"
    );
    assert!(
        s.up.requests().is_empty(),
        "a blocked request reached the provider"
    );
}

/// A gateway with the seed's DLP (block) and `edit` applied to the config.
async fn setup_cfg(edit: impl FnOnce(&mut guard::config::Config)) -> Setup {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "upstream", Behavior::Ok).await;
    let mut cfg = config(vec![
        target("oa", Provider::OpenAi, &up.openai_base_url(), "OA"),
        target("ant", Provider::Anthropic, &up.anthropic_base_url(), "OA"),
    ]);
    cfg.chain = vec![PolicyKind::DlpFilter, PolicyKind::AuditLogger];
    cfg.dlp = Some(seed_dlp(DlpAction::Block));
    edit(&mut cfg);
    let chain = Chain::new(&cfg, None, false).unwrap();
    let gca = Arc::new(Ca::ephemeral().unwrap());
    let sink = Arc::new(MemorySink::new());
    let gw = builder(cfg, MapResolver::of(&[("OA", MANAGED)]), gca.clone(), &ca)
        .policy(Arc::new(chain))
        .record_sink(sink.clone())
        .build()
        .unwrap();
    Setup {
        up,
        gw: serve(gw, gca, sink).await,
    }
}

fn guard_note(s: &Setup, rule: &str) -> Option<guard::record::PolicyNote> {
    s.gw.sink
        .snapshot()
        .last()
        .and_then(|r| r.policy.iter().find(|n| n.rule == rule).cloned())
}

/// Claude Code on a developer machine sends its subscription's OAuth
/// token: by default it is passed as sent (never swapped onto the
/// organisation's API key), and the event says so.
#[tokio::test]
async fn an_oauth_subscription_token_is_passed_not_swapped_by_default() {
    let s = setup_cfg(|_| {}).await;
    let token = "sk-ant-oat01-claudecode-subscription-T0FVVEg";
    let mut c = h1_plain(s.gw.addr).await;
    let auth = format!("Bearer {token}");
    let a = send(
        &mut c,
        post(
            "/anthropic/v1/messages",
            &[
                ("authorization", auth.as_str()),
                ("anthropic-beta", "oauth-2025-04-20"),
                ("anthropic-version", "2023-06-01"),
            ],
            r#"{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = s.up.requests().pop().unwrap();
    assert_eq!(r.headers.get("authorization").unwrap(), auth.as_str());
    assert!(
        r.headers.get("x-api-key").is_none(),
        "the managed key was added"
    );
    assert!(!format!("{:?}", r.headers).contains(MANAGED));
    let n = guard_note(&s, "credential-oauth").expect("the event names the kind");
    assert_eq!(
        (n.action, n.location.as_deref()),
        (PolicyAction::Audit, Some("pass"))
    );
    // An ordinary key to the same provider is still swapped.
    let a = send(
        &mut c,
        post(
            "/anthropic/v1/messages",
            &[
                ("x-api-key", "sk-ant-api03-someones-own-key"),
                ("anthropic-version", "2023-06-01"),
            ],
            r#"{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = s.up.requests().pop().unwrap();
    assert_eq!(r.headers.get("x-api-key").unwrap(), MANAGED);
    assert!(guard_note(&s, "credential-api-key").is_none());
}

/// A key of another provider (a Groq key sent to OpenAI) is refused by
/// default, in the provider's shape; `other_provider: swap` lets it be
/// swapped instead.
#[tokio::test]
async fn another_providers_key_is_refused_by_default() {
    let s = setup_cfg(|_| {}).await;
    let groq = |s: &Setup| {
        let addr = s.gw.addr;
        async move {
            let mut c = h1_plain(addr).await;
            send(
                &mut c,
                post(
                    "/openai/v1/chat/completions",
                    &[("authorization", "Bearer gsk_someonesgroqkey0000000000")],
                    chat("hi"),
                ),
            )
            .await
        }
    };
    let a = groq(&s).await;
    assert_eq!(a.status, 403, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "kt_credential_refused");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("groq key sent to openai")
    );
    assert!(s.up.requests().is_empty());
    let n = guard_note(&s, "credential-other-provider").unwrap();
    assert_eq!(n.action, PolicyAction::Block);

    let s = setup_cfg(|c| {
        c.gateway.credentials.other_provider = guard::config::CredentialAction::Swap;
        c.gateway.credentials.none = guard::config::CredentialAction::Block;
    })
    .await;
    let a = groq(&s).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // No credential at all, with `none: block`.
    let mut c = h1_plain(s.gw.addr).await;
    let a = send(&mut c, post("/openai/v1/chat/completions", &[], chat("hi"))).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(guard_note(&s, "credential-none").is_some());
}

/// Observe mode: the client's own key goes upstream unchanged, a pasted
/// secret is recorded as would-block and forwarded, the key is recorded.
#[tokio::test]
async fn observe_mode_forwards_the_clients_key_and_records_would_block() {
    let s = setup_cfg(|c| c.gateway.mode = guard::config::GatewayMode::Observe).await;
    let key = aws_key();
    let a = send_chat(&s, chat(&format!("my key is {key}")), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = s.up.requests().pop().unwrap();
    assert_eq!(
        r.headers.get("authorization").unwrap(),
        "Bearer sk-client-own-key-000000000000"
    );
    assert!(
        String::from_utf8_lossy(&r.body).contains(&key),
        "forwarded unchanged"
    );
    let rec = s.gw.sink.snapshot().pop().unwrap();
    assert!(rec.client_key_fingerprint.is_some());
    assert!(
        rec.policy
            .iter()
            .any(|n| n.policy == PolicyId::DlpFilter && n.action == PolicyAction::WouldBlock),
        "{:?}",
        rec.policy
    );
    assert!(rec.policy.iter().all(|n| n.action != PolicyAction::Block));
    let n = guard_note(&s, "credential-api-key").unwrap();
    assert_eq!(n.location.as_deref(), Some("pass (observe mode)"));
}
