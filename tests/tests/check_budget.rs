//! The policy check's memory and time, as a client sees them: what the DLP
//! scan allocates (a gzip body's decoded copy, the joined view) counts in
//! `gateway.max_buffered_bytes`, so bodies checked at once past it are
//! refused 503 `kt_over_budget` and recorded, the budget comes back whole
//! afterwards; and a big body is checked off the async workers, so other
//! connections are answered meanwhile.

use std::io::Write;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use guard::ca::Ca;
use guard::config::{DlpAction, DlpFilter, PolicyKind, Provider};
use guard::policy::{Chain, Policy, PolicyRequest, PolicyVerdict};
use guard::record::{MemorySink, PolicyAction, PolicyId, PolicyNote};
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::*;

const MANAGED: &str = "sk-managed-budget-test-MANAGED-7777";

fn dlp(action: DlpAction) -> DlpFilter {
    DlpFilter {
        detect_patterns: vec!["sk-[A-Za-z0-9]{20,}".into()],
        blocked_terms: vec![],
        action,
        fuzzy_matching: false,
        max_distance: 0,
        builtin_rules: true,
    }
}

/// A chat body whose content is `len` letters `a`/`b` at random (one bit
/// each: gzip gets it to about a seventh, well under the ratio cap).
fn chat_of(len: usize, extra: &str) -> Vec<u8> {
    let mut x: u32 = 7;
    let content: String = (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            if x >> 16 & 1 == 0 { 'a' } else { 'b' }
        })
        .collect();
    serde_json::json!({"model": "m", "messages": [
        {"role": "user", "content": format!("{content} {extra}")}
    ]})
    .to_string()
    .into_bytes()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn start_with(
    cfg: guard::config::Config,
    policy: Arc<dyn Policy>,
    upstream_ca: &TestCa,
) -> (Running, Arc<MemorySink>) {
    let gca = Arc::new(Ca::ephemeral().unwrap());
    let sink = Arc::new(MemorySink::new());
    let gw = builder(
        cfg,
        MapResolver::of(&[("OA", MANAGED)]),
        gca.clone(),
        upstream_ca,
    )
    .policy(policy)
    .record_sink(sink.clone())
    .build()
    .unwrap();
    (serve(gw, gca, sink.clone()).await, sink)
}

async fn post_body(addr: std::net::SocketAddr, body: Vec<u8>, gzipped: bool) -> Answer {
    let mut c = h1_plain(addr).await;
    let mut h = vec![("authorization", "Bearer sk-client-own-key-000000000000")];
    if gzipped {
        h.push(("content-encoding", "gzip"));
    }
    send(&mut c, post("/openai/v1/chat/completions", &h, body)).await
}

/// Waits until the fake upstream holds `n` requests (polled: it has no
/// notification; bounded so a regression fails rather than hangs).
async fn until_upstream_holds(up: &FakeProvider, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while up.requests().len() < n {
        assert!(
            Instant::now() < deadline,
            "the upstream never got request {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// With the budget at its floor (one largest gzip body and its check), a
/// gzip body is refused while another one is held, though the two bodies
/// alone would fit: its decoded copy and joined view are counted. One at
/// a time they pass, and the budget comes back whole (a body that needs
/// all of it passes afterwards).
#[tokio::test]
async fn gzip_bodies_checked_at_once_past_the_budget_are_refused_and_the_budget_comes_back() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "upstream", Behavior::SlowFirstByte).await;
    let body = gzip(&chat_of(1024 * 1024, "no secret here"));
    let mut cfg = config(vec![target(
        "oa",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA",
    )]);
    cfg.chain = vec![PolicyKind::DlpFilter];
    cfg.dlp = Some(dlp(DlpAction::Block));
    // Room for one body and its check; two bodies alone fit in it many
    // times over.
    cfg.gateway.max_body_bytes = body.len() as u64;
    let chain = Chain::new(&cfg, None, false).unwrap();
    let budget = body.len() + chain.working_bytes(body.len(), Some("gzip"));
    assert!(budget > 8 * body.len());
    cfg.gateway.max_buffered_bytes = budget as u64;
    let (gw, sink) = start_with(cfg, Arc::new(chain), &ca).await;

    // The first is checked and held upstream (answered once released).
    let first = tokio::spawn(post_body(gw.addr, body.clone(), true));
    until_upstream_holds(&up, 1).await;
    // Held upstream, the first counts its body only; a second needs its
    // body and its check, which do not fit beside it.
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        post_body(gw.addr, body.clone(), true),
    )
    .await
    .expect("the second body was let through to the held upstream");
    assert_eq!(second.status, 503, "{}", second.body);
    let v: serde_json::Value = serde_json::from_str(&second.body).unwrap();
    assert_eq!(v["error"]["code"], "kt_over_budget", "{}", second.body);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("gateway.max_buffered_bytes"), "{msg}");
    up.release();
    assert_eq!(first.await.unwrap().status, 200);

    // The refusal is recorded, with the note saying it was the check.
    let recs = sink.snapshot();
    let refused: Vec<_> = recs
        .iter()
        .filter(|r| r.error_code == Some("kt_over_budget"))
        .collect();
    assert_eq!(refused.len(), 1, "{recs:?}");
    assert_eq!(refused[0].status, 503);
    assert!(
        refused[0]
            .policy
            .iter()
            .any(|n| n.policy == PolicyId::Guard && n.rule == "check-budget"),
        "{:?}",
        refused[0].policy
    );

    // Nothing leaked: the same body, which needs the whole budget, passes
    // again (twice, one after the other).
    up.set_behavior(Behavior::Ok);
    for _ in 0..2 {
        let a = post_body(gw.addr, body.clone(), true).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(up.requests().len(), 3);
}

/// A redacted gzip body is forwarded decoded: the budget counts it while
/// it is held, and gives it all back afterwards.
#[tokio::test]
async fn a_redacted_gzip_body_is_forwarded_and_the_budget_comes_back() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "upstream", Behavior::Ok).await;
    let key = format!("sk-{}", "Z9".repeat(16));
    let body = gzip(&chat_of(512 * 1024, &key));
    let mut cfg = config(vec![target(
        "oa",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA",
    )]);
    cfg.chain = vec![PolicyKind::DlpFilter];
    cfg.dlp = Some(dlp(DlpAction::Redact));
    cfg.gateway.max_body_bytes = body.len() as u64;
    let chain = Chain::new(&cfg, None, false).unwrap();
    cfg.gateway.max_buffered_bytes =
        (body.len() + chain.working_bytes(body.len(), Some("gzip"))) as u64;
    let (gw, _sink) = start_with(cfg, Arc::new(chain), &ca).await;
    for _ in 0..2 {
        let a = post_body(gw.addr, body.clone(), true).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    let seen = &reqs[1].body;
    assert!(reqs[1].headers.get("content-encoding").is_none());
    let text = String::from_utf8_lossy(seen);
    assert!(!text.contains(&key), "the key reached the provider");
    assert!(text.contains("[REDACTED:"), "not redacted");
    assert!(seen.len() > 512 * 1024, "not forwarded decoded");
}

/// A compressed body whose check could never fit in the whole budget is
/// refused saying which setting to raise (not "retry"); the same body
/// uncompressed, whose check is smaller, passes.
#[tokio::test]
async fn a_gzip_body_whose_check_never_fits_is_refused_naming_the_setting() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "upstream", Behavior::Ok).await;
    let plain = chat_of(512 * 1024, "no secret here");
    let body = gzip(&plain);
    let mut cfg = config(vec![target(
        "oa",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA",
    )]);
    cfg.chain = vec![PolicyKind::DlpFilter];
    cfg.dlp = Some(dlp(DlpAction::Block));
    let chain = Chain::new(&cfg, None, false).unwrap();
    // The largest body is the uncompressed one; the budget is left at its
    // floor (that body and its check), which a gzip body's check passes.
    cfg.gateway.max_body_bytes = plain.len() as u64;
    cfg.gateway.max_buffered_bytes = 4096;
    assert!(
        body.len() + chain.working_bytes(body.len(), Some("gzip"))
            > plain.len() + chain.working_bytes(plain.len(), None)
    );
    let (gw, _sink) = start_with(cfg, Arc::new(chain), &ca).await;
    let a = post_body(gw.addr, body, true).await;
    assert_eq!(a.status, 503, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "kt_over_budget", "{}", a.body);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("raise gateway.max_buffered_bytes"), "{msg}");
    assert!(!msg.contains("retry"), "{msg}");
    let a = post_body(gw.addr, plain, false).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(up.requests().len(), 1);
}

/// Wraps the real chain: a check of a body of `gate_from` bytes or more
/// says it started, then waits for the test's go before checking.
struct Gated {
    chain: Chain,
    gate_from: usize,
    started: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    go: Mutex<mpsc::Receiver<()>>,
    /// Whether the go came (false: the wait gave up).
    went: Mutex<Option<bool>>,
}

impl Policy for Gated {
    fn check(&self, request: &PolicyRequest<'_>, notes: &mut Vec<PolicyNote>) -> PolicyVerdict {
        if request.body.len() >= self.gate_from {
            if let Some(tx) = self.started.lock().unwrap().take() {
                let _ = tx.send(());
            }
            // Bounded so that a check run on the async worker (which the
            // test's small request then cannot get past) fails the test
            // instead of hanging it.
            let went = self
                .go
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20))
                .is_ok();
            *self.went.lock().unwrap() = Some(went);
        }
        self.chain.check(request, notes)
    }

    fn working_bytes(&self, body_len: usize, content_encoding: Option<&str>) -> usize {
        self.chain.working_bytes(body_len, content_encoding)
    }
}

/// While a big body is being checked, a small request on another
/// connection is answered (on this test's single-threaded runtime it
/// could not be if the check held the worker), and the big one's verdict
/// still comes back: blocked, since it carries a key.
#[tokio::test]
async fn a_small_request_is_answered_while_a_big_body_is_checked() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "upstream", Behavior::Ok).await;
    let mut cfg = config(vec![target(
        "oa",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA",
    )]);
    cfg.chain = vec![PolicyKind::DlpFilter];
    cfg.dlp = Some(dlp(DlpAction::Block));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let gated = Arc::new(Gated {
        chain: Chain::new(&cfg, None, false).unwrap(),
        gate_from: 256 * 1024,
        started: Mutex::new(Some(started_tx)),
        go: Mutex::new(go_rx),
        went: Mutex::new(None),
    });
    let (gw, sink) = start_with(cfg, gated.clone(), &ca).await;

    let key = format!("sk-{}", "Q7".repeat(16));
    let big = chat_of(1024 * 1024, &key);
    let addr = gw.addr;
    let big = tokio::spawn(async move { post_body(addr, big, false).await });
    started_rx
        .await
        .expect("the big body's check never started");
    let small = post_body(gw.addr, chat_body(false).into_bytes(), false).await;
    assert_eq!(small.status, 200, "{}", small.body);
    assert!(
        !big.is_finished(),
        "the big body was answered before its check ended"
    );
    go_tx.send(()).unwrap();
    let big = big.await.unwrap();
    assert_eq!(big.status, 403, "{}", big.body);
    assert!(big.body.contains("kt_dlp_blocked"), "{}", big.body);
    assert_eq!(
        *gated.went.lock().unwrap(),
        Some(true),
        "the check waited out its gate: the small request was not served meanwhile"
    );
    assert_eq!(
        up.requests().len(),
        1,
        "only the small request goes upstream"
    );
    // The notes made on the blocking pool reach the record.
    let recs = sink.snapshot();
    let blocked: Vec<_> = recs.iter().filter(|r| r.status == 403).collect();
    assert_eq!(blocked.len(), 1, "{recs:?}");
    assert!(
        blocked[0]
            .policy
            .iter()
            .any(|n| n.policy == PolicyId::DlpFilter && n.action == PolicyAction::Block),
        "{:?}",
        blocked[0].policy
    );
}

/// Observe mode on the blocking path: a big gzip body carrying a key is
/// forwarded unchanged (still compressed) and recorded as would-block.
#[tokio::test]
async fn observe_mode_forwards_a_big_body_unchanged_and_records_would_block() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "upstream", Behavior::Ok).await;
    let key = format!("sk-{}", "K4".repeat(16));
    let body = gzip(&chat_of(512 * 1024, &key));
    let mut cfg = config(vec![target(
        "oa",
        Provider::OpenAi,
        &up.openai_base_url(),
        "OA",
    )]);
    cfg.chain = vec![PolicyKind::DlpFilter];
    cfg.dlp = Some(dlp(DlpAction::Block));
    cfg.gateway.mode = guard::config::GatewayMode::Observe;
    let chain = Chain::new(&cfg, None, false).unwrap();
    let (gw, sink) = start_with(cfg, Arc::new(chain), &ca).await;
    let a = post_body(gw.addr, body.clone(), true).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body, body, "the body was changed");
    let recs = sink.snapshot();
    assert!(
        recs[0]
            .policy
            .iter()
            .any(|n| n.policy == PolicyId::DlpFilter && n.action == PolicyAction::WouldBlock),
        "{:?}",
        recs[0].policy
    );
}
