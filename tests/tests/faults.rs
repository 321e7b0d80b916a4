//! Faults injected on purpose, each asserting what a user would notice.
//!
//! Most run the real `kt gateway run` on loopback with a temp data dir and
//! fake TLS providers trusted through `SSL_CERT_FILE` (as reload.rs does);
//! the upstream-misbehaviour test drives an in-process gateway against a raw
//! TLS server that breaks each stage of a response on purpose. The full-disk
//! tests mount a small tmpfs in a private mount namespace (root only; the
//! host's mounts are never touched) and run kt inside it.
//!
//! Clock steps are not injected: the system clock of a shared machine is
//! not ours to change, and libfaketime is not installed. What is tested
//! instead is where kt's correctness depends on time: cool-downs use the
//! monotonic clock (`std::time::Instant`, unit-tested in the gateway's
//! health module and not affected by `settimeofday`), and the event store
//! orders by insertion and filters `--since` by the stored wall time, which
//! [`events_out_of_wall_clock_order_list_in_insertion_order_and_since_uses_stored_times`]
//! checks on a store whose times go backwards and forwards.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use guard::events::{EventStore, Filter};
use guard_tests::fake_provider::{Behavior, FakeProvider, TestCa};
use guard_tests::gateway_fixture::{chat_body, h1_plain, post, send};
use guard_tests::mountns::PrivateMounts;
use guard_tests::process::{KtChild, free_addr, text, wait_until};
use http_body_util::BodyExt as _;

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const MANAGED: &str = "sk-faults-managed-TUFOQUdFRF9LRVlfMDE";
const NEW_MANAGED: &str = "sk-faults-rotated-Uk9UQVRFRF9LRVlfMDI";
/// What the client sends: never reaches a provider.
const HARDCODED: &str = "sk-faults-hardcoded-in-the-job-SEFSRA";

/// A data dir, config and log for one `kt gateway run`, optionally inside
/// a private mount namespace.
struct Setup {
    dir: tempfile::TempDir,
    /// The data dir as kt sees it.
    data: PathBuf,
    ca_pem: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    ns: Option<PrivateMounts>,
}

impl Setup {
    fn new(ca: &TestCa) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        Setup::in_dir(dir, ca, None, None)
    }

    /// `data`: where the data dir is (inside `ns` when given).
    fn in_dir(
        dir: tempfile::TempDir,
        ca: &TestCa,
        data: Option<PathBuf>,
        ns: Option<PrivateMounts>,
    ) -> Setup {
        let ca_pem = dir.path().join("fake-ca.pem");
        std::fs::write(&ca_pem, &ca.pem).unwrap();
        Setup {
            data: data.unwrap_or_else(|| dir.path().join("data")),
            ca_pem,
            cfg: dir.path().join("policy.yaml"),
            log: dir.path().join("kt.log"),
            listen: free_addr(),
            ns,
            dir,
        }
    }

    /// Where this process reaches a path kt sees (through the namespace's
    /// root when kt runs in one).
    fn outside(&self, p: &Path) -> PathBuf {
        match &self.ns {
            Some(ns) => ns.outside(p),
            None => p.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut c = match &self.ns {
            Some(ns) => ns.command(KT),
            None => Command::new(KT),
        };
        c.env("KT_DATA_DIR", &self.data)
            .env("SSL_CERT_FILE", &self.ca_pem);
        c
    }

    fn kt(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = self
            .command()
            .args(args)
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

    fn add_secret(&self, name: &str, value: &str, replace: bool) {
        let mut args = vec!["secrets", "add", name, "--store"];
        if replace {
            args.push("--replace");
        }
        let out = self.kt(&args, Some(value));
        assert!(out.status.success(), "{}", text(&out));
    }

    /// One OpenAI target `primary` on `up`, the DLP filter and the audit
    /// logger; `policy` (the lines under `policy:`, the audit logger's
    /// defaults when empty) and `gateway` (extra lines) for those sections.
    fn write_config(&self, up: &FakeProvider, policy: &str, gateway: &str) {
        let policy = if policy.is_empty() {
            "  audit-logger: {}\n"
        } else {
            policy
        };
        let text = format!(
            "providers:\n  targets:\n    - id: primary\n      provider: openai\n      base_url: {}\n      secret_key_ref:\n        store: OPENAI_PRIMARY\npolicies:\n  chain: [dlp-filter, audit-logger]\npolicy:\n{policy}gateway:\n  listen: {}\n{gateway}",
            up.openai_base_url(),
            self.listen,
        );
        std::fs::write(&self.cfg, text).unwrap();
    }

    fn start(&self) -> KtChild {
        let _ = std::fs::remove_file(&self.log);
        let child = self
            .command()
            .args(["gateway", "run", "--config"])
            .arg(&self.cfg)
            .env("KT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap();
        let kt = KtChild(child);
        self.wait_log("gateway listening on");
        kt
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) -> String {
        wait_until(&format!("kt's log to say {needle:?}"), || {
            let t = self.log();
            t.contains(needle).then_some(t)
        })
    }

    /// Every event in the store, oldest first. Inside a namespace through
    /// `kt events` (SQLite resolves the `/proc/PID/root` link to the host's
    /// path, so the file cannot be opened from outside).
    fn events(&self) -> Vec<guard::events::Event> {
        if self.ns.is_some() {
            let out = self.kt(&["events", "--output", "json", "--limit", "0"], None);
            return String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        }
        EventStore::open_read_only(&self.data)
            .ok()
            .flatten()
            .and_then(|s| s.query(&Filter::default()).ok())
            .unwrap_or_default()
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
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
) -> guard_tests::gateway_fixture::Answer {
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
}

fn request_id(h: &http::HeaderMap) -> String {
    h.get("x-kt-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// kt SIGKILLed while it relays a stream: the client's body ends with an
/// error (the chunked body never gets its last chunk), never a clean end.
/// The request's event was committed when its headers went out (the test
/// waits for that commit, so what it checks does not depend on timing); it
/// stays in the store with its 200 and no stream outcome: a killed kt
/// cannot record its own death, so `kt events` shows the request as
/// started, not as finished whole or cut. Events still queued in memory
/// at the kill (not yet committed, normally for a few milliseconds) are
/// lost. The next start serves again on the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kt_killed_mid_stream_the_client_sees_an_error_and_the_event_stays() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "primary", Behavior::Gated).await;
    let s = Setup::new(&ca);
    s.add_secret("OPENAI_PRIMARY", MANAGED, false);
    s.write_config(&up, "", "");
    let mut kt = s.start();

    let mut conn = h1_plain(s.listen).await;
    conn.ready().await.unwrap();
    let auth = format!("Bearer {HARDCODED}");
    let resp = conn
        .send_request(post(
            "/openai/v1/chat/completions",
            &[("authorization", auth.as_str())],
            chat_body(true),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(resp.headers());
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    wait_until("the stream's event to be committed", || {
        s.events().iter().any(|e| e.request_id == id).then_some(())
    });

    kt.0.kill().unwrap();
    kt.0.wait().unwrap();
    let mut rest = Vec::new();
    let ended = loop {
        match body.frame().await {
            None => break "a clean end",
            Some(Ok(f)) => rest.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            Some(Err(_)) => break "an error",
        }
    };
    assert_eq!(
        ended,
        "an error",
        "after {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));

    let events = s.events();
    let e = events.iter().find(|e| e.request_id == id).unwrap();
    assert_eq!(e.status, Some(200));
    assert_eq!(e.stream, None, "a killed kt recorded an outcome: {e:?}");

    // A new kt on the same data dir serves, and the store kept the event.
    up.set_behavior(Behavior::Ok);
    let _kt = s.start();
    let mut conn = h1_plain(s.listen).await;
    let a = chat(&mut conn).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let after = s.events();
    assert!(after.iter().any(|e| e.request_id == id));
    let again = request_id(&a.headers);
    wait_until("the new request's event", || {
        s.events()
            .iter()
            .any(|e| e.request_id == again)
            .then_some(())
    });
}

/// The secret store file damaged in place (bytes flipped), then replaced
/// by a well-formed file that belongs to another uid, while kt serves: kt
/// keeps the value it had and says why in its log; the provider only ever
/// sees that value (never an empty or the client's key). Put right again,
/// a rotation reaches the provider without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_foreign_secret_store_keeps_the_value_kt_has() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "primary", Behavior::Ok).await;
    let s = Setup::new(&ca);
    s.add_secret("OPENAI_PRIMARY", MANAGED, false);
    s.write_config(&up, "", "");
    let _kt = s.start();
    let mut conn = h1_plain(s.listen).await;
    assert_eq!(chat(&mut conn).await.status, 200);

    let store = s.data.join("secrets").join("store.bin");
    let good = std::fs::read(&store).unwrap();
    // Flip bytes of the sealed part, in place (same inode, same size).
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 4] {
        *b ^= 0x5a;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .unwrap()
        .write_all(&bad)
        .unwrap();
    let log = s.wait_log("keeping the value kt already had");
    assert!(log.contains("OPENAI_PRIMARY"), "{log}");
    assert!(
        log.contains("modified or damaged"),
        "the log says what is wrong: {log}"
    );
    for _ in 0..5 {
        let a = chat(&mut conn).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }

    let root = rustix_is_root();
    if root {
        // A well-formed store, owned by someone else, renamed over it.
        let seen_before = s.log().len();
        let foreign = s.dir.path().join("store.foreign");
        std::fs::write(&foreign, &good).unwrap();
        std::fs::set_permissions(
            &foreign,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        std::fs::rename(&foreign, &store).unwrap();
        let log = wait_until("kt to refuse the foreign store", || {
            let t = s.log()[seen_before..].to_string();
            t.contains("keeping the value kt already had").then_some(t)
        });
        assert!(log.contains("65534"), "the log names the owner: {log}");
        for _ in 0..5 {
            let a = chat(&mut conn).await;
            assert_eq!(a.status, 200, "{}", a.body);
        }
    } else {
        guard_tests::skipped(
            "faults: the secret store replaced by another uid's file",
            "not root",
        );
    }

    let seen: Vec<String> = up.requests().iter().map(bearer).collect();
    assert!(seen.len() >= 6);
    assert!(
        seen.iter().all(|b| *b == format!("Bearer {MANAGED}")),
        "{seen:?}"
    );

    // Put right (the good file back, ours), then rotate: no restart needed.
    let fixed = s.dir.path().join("store.fixed");
    std::fs::write(&fixed, &good).unwrap();
    std::fs::set_permissions(&fixed, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::rename(&fixed, &store).unwrap();
    s.add_secret("OPENAI_PRIMARY", NEW_MANAGED, true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.requests().last().map(bearer) != Some(format!("Bearer {NEW_MANAGED}")) {
        assert!(Instant::now() < deadline, "the rotated value never arrived");
        let a = chat(&mut conn).await;
        assert_eq!(a.status, 200, "{}", a.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = s.log();
    for v in [MANAGED, NEW_MANAGED, HARDCODED] {
        assert!(!log.contains(v), "a key in kt's log");
    }
}

fn rustix_is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Many large bodies at once: kt holds at most `gateway.max_buffered_bytes`
/// of request bodies and answers the rest 503 `kt_over_budget` in the
/// provider's shape at once; its resident memory during the burst stays
/// within the budget plus a stated margin over what it used before. The
/// bodies it accepted are answered whole once the upstream answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_bodies_at_once_are_refused_before_kt_passes_its_budget() {
    const BUDGET: u64 = 32 * 1024 * 1024;
    const BODY: usize = 4 * 1024 * 1024;
    const CLIENTS: usize = 40;
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "primary", Behavior::Ok).await;
    let s = Setup::new(&ca);
    s.add_secret("OPENAI_PRIMARY", MANAGED, false);
    s.write_config(
        &up,
        "",
        &format!(
            "  max_buffered_bytes: {BUDGET}\n  max_body_bytes: {}\n",
            8 * 1024 * 1024
        ),
    );
    let kt = s.start();
    let pid = kt.0.id();
    let mut warm = h1_plain(s.listen).await;
    for _ in 0..3 {
        assert_eq!(chat(&mut warm).await.status, 200);
    }
    let before = rss_kib(pid);

    // The upstream holds its answers: accepted bodies stay held.
    up.set_behavior(Behavior::SlowFirstByte);
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let (peak, sampling) = (peak.clone(), sampling.clone());
        move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    let filler = "x".repeat(BODY);
    let body = Bytes::from(
        serde_json::json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":filler}]})
            .to_string(),
    );
    let mut clients = tokio::task::JoinSet::new();
    let auth = format!("Bearer {HARDCODED}");
    for _ in 0..CLIENTS {
        let (body, auth, addr) = (body.clone(), auth.clone(), s.listen);
        clients.spawn(async move {
            let mut c = h1_plain(addr).await;
            send(
                &mut c,
                post(
                    "/openai/v1/chat/completions",
                    &[("authorization", auth.as_str())],
                    body,
                ),
            )
            .await
        });
    }
    // Every body is either refused or held by the upstream.
    let mut answers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while answers.len() + up.requests().len() - 3 < CLIENTS {
        assert!(Instant::now() < deadline, "bodies neither refused nor held");
        if let Ok(Some(r)) =
            tokio::time::timeout(Duration::from_millis(50), clients.join_next()).await
        {
            answers.push(r.unwrap());
        }
    }
    let held = up.requests().len() - 3;
    let peak_during = peak.load(Ordering::Relaxed);
    for _ in 0..held {
        up.release();
    }
    while let Some(r) = clients.join_next().await {
        answers.push(r.unwrap());
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_all = peak.load(Ordering::Relaxed);

    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(ok + refused.len(), CLIENTS, "{answers:?}");
    assert_eq!(ok, held);
    assert!(ok >= 1, "nothing was accepted");
    assert!(
        (ok * body.len()) as u64 <= BUDGET,
        "{ok} bodies of {} held at once",
        body.len()
    );
    assert!(!refused.is_empty(), "nothing was refused");
    for r in &refused {
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "kt_over_budget", "{}", r.body);
        assert!(v["error"]["message"].is_string());
    }
    // What kt holds beyond the bytes it counts: the DLP scan's decoded copy
    // of a body it checks and the allocator's free lists (the read buffer
    // itself is counted at its capacity: allocated once at the declared
    // length). Measured about 1.25 times the budget (1.6-3.2 times before
    // the buffer's capacity was counted); without the budget 40 bodies
    // would take over 300 MiB.
    let margin = BUDGET;
    let grew = peak_all.saturating_sub(before) * 1024;
    eprintln!(
        "RSS before {before} KiB, peak while held {peak_during} KiB, peak overall {peak_all} KiB; {ok} held, {} refused",
        refused.len()
    );
    assert!(
        grew <= BUDGET + margin,
        "kt grew {} MiB over a budget of {} MiB (+{} MiB margin)",
        grew >> 20,
        BUDGET >> 20,
        margin >> 20
    );
}

/// A data dir on a 4 MiB tmpfs of the test's own, in a private mount
/// namespace; kt runs inside it. The store has `held` events when this
/// returns, committed.
async fn on_a_small_disk(
    ca: &TestCa,
    up: &FakeProvider,
    on_store_failure: &str,
) -> Option<(Setup, KtChild, Vec<String>)> {
    if !rustix_is_root() {
        eprintln!("not root: cannot mount a tmpfs; skipped");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let ns = PrivateMounts::with_tmpfs(&disk, "4m").expect("a private tmpfs");
    let s = Setup::in_dir(dir, ca, Some(disk.join("data")), Some(ns));
    s.add_secret("OPENAI_PRIMARY", MANAGED, false);
    s.write_config(
        up,
        &format!("  audit-logger:\n    on_store_failure: {on_store_failure}\n"),
        "",
    );
    let kt = s.start();
    let mut conn = h1_plain(s.listen).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let a = chat(&mut conn).await;
        assert_eq!(a.status, 200, "{}", a.body);
        ids.push(request_id(&a.headers));
    }
    wait_until("the first events to be committed", || {
        let ev = s.events();
        ids.iter()
            .all(|id| ev.iter().any(|e| e.request_id == *id))
            .then_some(())
    });
    Some((s, kt, ids))
}

/// Fills the tmpfs to the last byte; the file to remove gives the space back.
fn fill(s: &Setup) -> PathBuf {
    let filler = s.outside(&s.data.parent().unwrap().join("filler"));
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut small = vec![0u8; 512];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // The tail of the space, to the byte.
    while f.write_all(&small).is_ok() {}
    small.truncate(1);
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    filler
}

/// `on_store_failure: log`: the disk under the event store fills up; kt
/// keeps serving, says events are being lost and counts them; space back,
/// writing resumes without a restart and nothing written before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_with_log_keeps_serving_counts_the_loss_and_resumes() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "primary", Behavior::Ok).await;
    let Some((s, _kt, first)) = on_a_small_disk(&ca, &up, "log").await else {
        return;
    };
    let filler = fill(&s);
    let mut conn = h1_plain(s.listen).await;
    for _ in 0..60 {
        let a = chat(&mut conn).await;
        assert_eq!(a.status, 200, "kt kept serving: {}", a.body);
    }
    let log = s.wait_log("event store unavailable: decision events are being lost");
    let lost: u64 = log
        .lines()
        .filter_map(|l| l.split("lost_total=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(lost >= 1, "the loss is counted: {log}");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed = loop {
        assert!(
            Instant::now() < deadline,
            "writing never resumed: {}",
            s.log()
        );
        let a = chat(&mut conn).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let id = request_id(&a.headers);
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.events().iter().any(|e| e.request_id == id) {
            break id;
        }
    };
    assert!(s.log().contains("event store healthy again"), "{}", s.log());
    let events = s.events();
    for id in &first {
        assert!(
            events.iter().any(|e| e.request_id == *id),
            "an event written before the disk filled is gone"
        );
    }
    assert!(events.iter().any(|e| e.request_id == resumed));
}

/// `on_store_failure: refuse`: once the event store cannot write, clients
/// get 503 `kt_audit_unavailable` in the provider's shape; space back, kt
/// serves again without a restart and the events written before remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_with_refuse_answers_503_then_recovers_without_restart() {
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "primary", Behavior::Ok).await;
    let Some((s, _kt, first)) = on_a_small_disk(&ca, &up, "refuse").await else {
        return;
    };
    let filler = fill(&s);
    let mut conn = h1_plain(s.listen).await;
    // Requests pass until a write fails; from then on they are refused.
    let mut refused = None;
    for _ in 0..200 {
        let a = chat(&mut conn).await;
        if a.status != 200 {
            refused = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("a full event store never refused a request");
    assert_eq!(refused.status, 503, "{}", refused.body);
    for a in [refused, chat(&mut conn).await, chat(&mut conn).await] {
        assert_eq!(a.status, 503, "{}", a.body);
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["error"]["code"], "kt_audit_unavailable", "{}", a.body);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("audit log")
        );
    }
    let served = up.requests().len();
    let _ = chat(&mut conn).await;
    assert_eq!(up.requests().len(), served, "a refused request went out");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        assert!(Instant::now() < deadline, "never served again: {}", s.log());
        let a = chat(&mut conn).await;
        if a.status == 200 {
            break request_id(&a.headers);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_until("the event of the first request served again", || {
        s.events()
            .iter()
            .any(|e| e.request_id == back)
            .then_some(())
    });
    let events = s.events();
    for id in &first {
        assert!(events.iter().any(|e| e.request_id == *id));
    }
}

/// How the raw upstream misbehaves, chosen per request by `x-scenario`.
/// `None` of a body: the answer is whole and the client must get it whole.
const SCENARIOS: &[(&str, &str)] = &[
    // Before any response byte.
    ("reset-before-headers", ""),
    ("close-notify-before-headers", ""),
    ("stall-before-headers", ""),
    ("garbage-instead-of-http", "SSH-2.0-not-http\r\n\r\n"),
    // In the headers.
    ("cut-in-headers", "HTTP/1.1 200 OK\r\nContent-Type: appl"),
    (
        "invalid-header-line",
        "HTTP/1.1 200 OK\r\nthis is not a header\r\n\r\n{}",
    ),
    ("invalid-status", "HTTP/1.1 2x0 OK\r\n\r\n"),
    // Mid-body, sized.
    (
        "short-sized-body-close-notify",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"choices\":[",
    ),
    (
        "short-sized-body-reset",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"choices\":[",
    ),
    // Mid-body, chunked: in a chunk, between chunks, a garbage size.
    (
        "cut-mid-chunk",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n{\"choices\":[",
    ),
    (
        "cut-between-chunks",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{\"choices\":[\r\n",
    ),
    (
        "garbage-chunk-size",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{\"choices\":[\r\nzz\r\n",
    ),
    (
        "stall-mid-body",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{\"choices\":[\r\n",
    ),
    // The same for event streams.
    (
        "sse-cut-mid-chunk",
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n40\r\ndata: {\"choices\":[{\"delta\":",
    ),
    (
        "sse-cut-between-chunks",
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nf\r\ndata: {\"a\":1}\n\n\r\n",
    ),
    (
        "sse-stall-mid-body",
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nf\r\ndata: {\"a\":1}\n\n\r\n",
    ),
    (
        "sse-close-delimited-then-reset",
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: {\"a\":1}\n\n",
    ),
];

/// Whole answers, to show the same path delivers them whole.
const WHOLE_JSON: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"choices\":[],\"whole\":true}";
const WHOLE_SSE: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nf\r\ndata: {\"a\":1}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";

/// Reads one HTTP/1.1 request (head and `Content-Length` body); the value
/// of `x-scenario`, or None when the peer closed.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut b).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut b).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
    header("x-scenario")
}

/// A TLS server (HTTP/1.1 only, so its bytes are what kt parses) that
/// answers each request as its `x-scenario` says.
async fn raw_upstream(ca: &TestCa) -> SocketAddr {
    use tokio::io::AsyncWriteExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ca.server_config();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                while let Some(scenario) = read_request(&mut tls).await {
                    let reply = match scenario.as_str() {
                        "whole-json" => WHOLE_JSON,
                        "whole-sse" => WHOLE_SSE,
                        s => SCENARIOS
                            .iter()
                            .find(|(n, _)| *n == s)
                            .map_or("", |(_, r)| *r),
                    };
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.flush().await;
                    match scenario.as_str() {
                        "whole-json" | "whole-sse" => continue,
                        s if s.starts_with("stall") || s.ends_with("stall-mid-body") => {
                            // Hold the connection open, silent, for longer
                            // than kt's timeouts.
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        s if s.contains("reset") => {
                            let _ = socket2::SockRef::from(tls.get_ref().0)
                                .set_linger(Some(Duration::ZERO));
                        }
                        _ => {
                            tls.get_mut().1.send_close_notify();
                            let _ = tls.flush().await;
                        }
                    }
                    return;
                }
            });
        }
    });
    addr
}

/// A TCP server that answers any ClientHello with a fatal TLS alert
/// (handshake_failure), as a broken or hostile upstream may.
async fn alert_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                let _ = tcp.read(&mut b).await;
                let _ = tcp
                    .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
                    .await;
            });
        }
    });
    addr
}

/// What the client made of one answer.
#[derive(Debug)]
#[expect(dead_code, reason = "the texts are for failure messages (Debug)")]
enum Seen {
    /// kt's own error in the provider's shape (`error.code` = kt_…).
    ProviderError(u16, String),
    /// The body ended with an error (a reset, an incomplete message).
    BodyError(u16, String),
    /// An event stream that ended with kt's `event: error`.
    SseError(String),
    /// The connection closed without an answer.
    NoAnswer(String),
    /// A clean end: the whole body as received.
    Clean(u16, String),
}

async fn ask(gw: SocketAddr, scenario: &str, stream: bool) -> Seen {
    let mut conn = h1_plain(gw).await;
    let auth = format!("Bearer {HARDCODED}");
    if let Err(e) = conn.ready().await {
        return Seen::NoAnswer(e.to_string());
    }
    let resp = match conn
        .send_request(post(
            "/openai/v1/chat/completions",
            &[("authorization", auth.as_str()), ("x-scenario", scenario)],
            chat_body(stream),
        ))
        .await
    {
        Ok(r) => r,
        Err(e) => return Seen::NoAnswer(e.to_string()),
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(f)) => got.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            Some(Err(e)) => {
                return Seen::BodyError(
                    status,
                    format!("{e} after {:?}", String::from_utf8_lossy(&got)),
                );
            }
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    if status != 200 {
        let code = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
        if let Some(code) = code.filter(|c| c.starts_with("kt_")) {
            return Seen::ProviderError(status, code);
        }
    }
    if text.contains("event: error") {
        return Seen::SseError(text);
    }
    Seen::Clean(status, text)
}

/// The upstream resets, stalls or sends garbage before, in and after the
/// response headers, mid-body, mid-chunk, in JSON answers and in event
/// streams, or refuses TLS with an alert: the client always gets kt's
/// provider-shaped error, an SSE `event: error`, or a body that fails;
/// never a clean end of a truncated answer. Whole answers from the same
/// server arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_upstream_never_looks_like_a_clean_truncated_answer() {
    let ca = TestCa::new();
    let raw = raw_upstream(&ca).await;
    let alert = alert_upstream().await;
    let base = |a: SocketAddr| format!("https://{a}/v1");
    let mk = |addr: SocketAddr| {
        let mut cfg =
            guard_tests::gateway_fixture::config(vec![guard_tests::gateway_fixture::target(
                "up",
                guard::config::Provider::OpenAi,
                &base(addr),
                "K",
            )]);
        cfg.gateway.first_byte_timeout = Duration::from_secs(1);
        cfg.gateway.idle_timeout = Duration::from_secs(1);
        cfg
    };
    let secrets = || guard_tests::gateway_fixture::MapResolver::of(&[("K", MANAGED)]);
    let gw = guard_tests::gateway_fixture::start(mk(raw), secrets(), &ca).await;
    let gw_alert = guard_tests::gateway_fixture::start(mk(alert), secrets(), &ca).await;

    for stream in [false, true] {
        match ask(gw.addr, "whole-json", stream).await {
            Seen::Clean(200, b) if b.contains("\"whole\":true") => {}
            other => panic!("a whole JSON answer: {other:?}"),
        }
        match ask(gw.addr, "whole-sse", stream).await {
            Seen::Clean(200, b) if b.ends_with("data: [DONE]\n\n") => {}
            other => panic!("a whole event stream: {other:?}"),
        }
    }
    let mut cases: Vec<(SocketAddr, &str, bool)> = Vec::new();
    for (name, _) in SCENARIOS {
        for stream in [false, true] {
            cases.push((gw.addr, name, stream));
        }
    }
    cases.push((gw_alert.addr, "tls-alert", false));
    cases.push((gw_alert.addr, "tls-alert", true));
    let mut bad = Vec::new();
    for (addr, name, stream) in cases {
        let seen = ask(addr, name, stream).await;
        eprintln!("{name} (stream {stream}): {seen:?}");
        let before_headers = name.contains("before-headers")
            || name.starts_with("garbage-instead")
            || name.contains("in-headers")
            || name.starts_with("invalid")
            || name == "tls-alert";
        let ok = match &seen {
            // Before any byte reached the client kt answers with its own
            // error (a reset can also swallow what was sent before it).
            Seen::ProviderError(s, code) => *s >= 500 && code.starts_with("kt_"),
            // After the headers: the body fails, or the stream says so.
            Seen::BodyError(s, _) => *s == 200 && !before_headers,
            Seen::SseError(text) => !before_headers && !text.contains("[DONE]"),
            Seen::NoAnswer(_) | Seen::Clean(..) => false,
        };
        if !ok {
            bad.push(format!("{name} (stream {stream}): {seen:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The wall clock stepped back and forth while kt recorded: events carry
/// the wall time of their moment, so their times are out of order. `kt
/// events` lists in insertion order whatever the times say, and `--since`
/// selects by the stored time: an event stamped while the clock was an
/// hour ahead still counts as recent, one stamped while it was behind
/// counts as old, consistently for the table and JSON.
#[test]
fn events_out_of_wall_clock_order_list_in_insertion_order_and_since_uses_stored_times() {
    use guard::events::{Decision, Event};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let min = 60_000;
    // (request id, offset from now): as recorded, in this order.
    let recorded = [
        ("r1-two-hours-ago", -120 * min),
        ("r2-clock-an-hour-ahead", 60 * min),
        ("r3-half-a-minute-ago", -min / 2),
        ("r4-clock-stepped-back-3h", -180 * min),
        ("r5-ten-seconds-ago", -min / 6),
    ];
    let mut store = EventStore::open(&data, 0).unwrap();
    let mut events: Vec<Event> = recorded
        .iter()
        .map(|(id, off)| {
            let mut e = Event::new(*id, Decision::Allow);
            e.time_ms = now + off;
            e.provider = Some("openai".into());
            e.message = Some("POST /v1/chat/completions via explicit".into());
            e
        })
        .collect();
    store.insert(&mut events).unwrap();
    drop(store);

    let listed = |args: &[&str]| -> Vec<String> {
        let out = Command::new(KT)
            .args(["events", "--output", "json", "--limit", "0"])
            .args(args)
            .env("KT_DATA_DIR", &data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["request_id"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let all = listed(&[]);
    assert_eq!(
        all,
        recorded
            .iter()
            .map(|(id, _)| id.to_string())
            .collect::<Vec<_>>(),
        "insertion order, whatever the times"
    );
    assert_eq!(
        listed(&["--since", "1m"]),
        [
            "r2-clock-an-hour-ahead",
            "r3-half-a-minute-ago",
            "r5-ten-seconds-ago"
        ]
    );
    assert_eq!(
        listed(&["--since", "150m"]),
        [
            "r1-two-hours-ago",
            "r2-clock-an-hour-ahead",
            "r3-half-a-minute-ago",
            "r5-ten-seconds-ago"
        ]
    );
    // The table shows the same rows as JSON.
    let table = Command::new(KT)
        .args(["events", "--since", "1m", "--limit", "0"])
        .env("KT_DATA_DIR", &data)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let rows = table.lines().filter(|l| l.contains("/v1/chat")).count();
    assert_eq!(rows, 3, "{table}");
}

fn threads_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A burst of new loopback clients at once: kt looks each one's process up
/// in /proc off its async threads. The lookups wait their turn on a bounded
/// set of threads instead of starting one each (threads that a steady
/// trickle of lookups then keeps alive, each with its own stack and
/// allocator arena), and every client is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_clients_does_not_multiply_kt_threads() {
    const CLIENTS: usize = 300;
    let ca = TestCa::new();
    let up = FakeProvider::start(&ca, "primary", Behavior::Ok).await;
    up.stop_recording();
    let s = Setup::new(&ca);
    s.add_secret("OPENAI_PRIMARY", MANAGED, false);
    s.write_config(&up, "", "");
    let kt = s.start();
    let pid = kt.0.id();
    let mut warm = h1_plain(s.listen).await;
    assert_eq!(chat(&mut warm).await.status, 200);
    let before = threads_of(pid);

    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let (peak, sampling) = (peak.clone(), sampling.clone());
        move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(threads_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let addr = s.listen;
        clients.spawn(async move {
            let mut c = h1_plain(addr).await;
            chat(&mut c).await.status
        });
    }
    let mut statuses = Vec::new();
    while let Some(r) = clients.join_next().await {
        statuses.push(r.unwrap());
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!("kt threads: {before} before, {peak} at most during the burst");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        peak <= before + 16,
        "kt went from {before} to {peak} threads for a burst of {CLIENTS} clients"
    );
}
