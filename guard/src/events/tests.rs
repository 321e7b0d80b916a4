//! Store, writer and key report tests (temp dirs only).

use std::collections::HashMap;
use std::time::Duration;

use super::*;

fn full_event(request_id: &str) -> Event {
    Event {
        id: 0,
        time_ms: now_ms(),
        request_id: request_id.to_string(),
        decision: Decision::Redact,
        provider: Some("openai".into()),
        target_tried: vec!["openai-primary".into(), "openai-backup".into()],
        target_chosen: Some("openai-backup".into()),
        fallback_steps: vec![
            FallbackStep {
                target: "openai-primary".into(),
                outcome: "status 503".into(),
            },
            FallbackStep {
                target: "openai-backup".into(),
                outcome: "ok".into(),
            },
        ],
        status: Some(200),
        latency_ms: Some(1234),
        policy: vec![
            PolicyNote {
                policy: "dlp-filter".into(),
                decision: "redact".into(),
                rule_id: Some("openai-project-key".into()),
                location: Some("body.messages[0].content@12..176".into()),
            },
            PolicyNote {
                policy: "audit-logger".into(),
                decision: "pass".into(),
                rule_id: None,
                location: None,
            },
        ],
        client: Client {
            addr: Some("127.0.0.1:53422".into()),
            pid: Some(4242),
            uid: Some(1000),
            exe: Some("/usr/bin/python3".into()),
            cmdline: Some("python3 legacy.py --model gpt".into()),
            cgroup: Some("/system.slice/ci-job-7.scope".into()),
            container_id: Some("c0ffee".into()),
            context: crate::record::ClientContext {
                container_name: Some("ci-job-7".into()),
                container_image: Some("python:3.12".into()),
                ppid: Some(4200),
                parent_exe: Some("/bin/sh".into()),
                netns: Some(4026532999),
                ci: [("GITHUB_RUN_ID".to_string(), "4242".to_string())].into(),
            },
        },
        key: Some(PresentedKey {
            fingerprint: "fp:1a2b3c4d".into(),
            matches_secret: Some("openai-q1".into()),
            managed: false,
            provider: None,
        }),
        message: Some("primary failed, fallback answered".into()),
        stream: Some(StreamOutcome {
            end: StreamEnd::UpstreamFailed,
            reason: Some("error reading a body from connection".into()),
            bytes: 87,
        }),
        host: None,
    }
}

fn simple(request_id: &str, decision: Decision, provider: &str, target: &str) -> Event {
    let mut e = Event::new(request_id, decision);
    e.provider = Some(provider.into());
    e.target_tried = vec![target.into()];
    e.target_chosen = Some(target.into());
    e
}

fn ids(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.request_id.as_str()).collect()
}

#[test]
fn every_field_survives_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let mut minimal = Event::new("r2", Decision::Error);
    minimal.time_ms = 5;
    let mut batch = vec![full_event("r1"), minimal];
    store.insert(&mut batch).unwrap();
    assert!(
        batch[0].id > 0 && batch[1].id > batch[0].id,
        "ids assigned in order"
    );
    let got = store.query(&Filter::default()).unwrap();
    assert_eq!(got, batch);
    assert!(dir.path().join("events.db").exists());
}

#[test]
fn decisions_serialize_lowercase_and_round_trip_through_json() {
    let e = full_event("r1");
    let json = serde_json::to_string(&e).unwrap();
    assert!(json.contains(r#""decision":"redact""#), "{json}");
    let back: Event = serde_json::from_str(&json).unwrap();
    assert_eq!(back, e);
    for d in Decision::ALL {
        assert_eq!(d.as_str().parse::<Decision>().unwrap(), d);
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
    }
    assert!("Block".parse::<Decision>().is_err());
}

#[test]
fn store_is_in_wal_mode_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kt");
    let store = EventStore::open(&data, 0).unwrap();
    let mode: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let meta = std::fs::metadata(data.join("events.db")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o077, 0, "no access for others");
    let meta = std::fs::metadata(&data).unwrap();
    assert_eq!(meta.permissions().mode() & 0o077, 0, "no access for others");
}

#[test]
fn filters_select_by_time_decision_target_and_provider() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let now = now_ms();
    let mut old = simple("old", Decision::Allow, "openai", "openai-primary");
    old.time_ms = now - 2 * 3600 * 1000;
    let mut recent = simple("recent", Decision::Block, "openai", "openai-primary");
    recent.time_ms = now - 10 * 60 * 1000;
    // Tried openai-primary, fell back to openai-backup.
    let mut fell_back = simple("fell-back", Decision::Allow, "openai", "openai-backup");
    fell_back.target_tried = vec!["openai-primary".into(), "openai-backup".into()];
    let claude = simple("claude", Decision::Block, "anthropic", "claude-main");
    let mut batch = vec![old, recent, fell_back, claude];
    store.insert(&mut batch).unwrap();

    let q = |f: Filter| ids(&store.query(&f).unwrap()).join(",");
    assert_eq!(q(Filter::default()), "old,recent,fell-back,claude");
    let hour = Some(Duration::from_secs(3600));
    assert_eq!(
        q(Filter {
            since: hour,
            ..Filter::default()
        }),
        "recent,fell-back,claude"
    );
    assert_eq!(
        q(Filter {
            decision: Some(Decision::Block),
            ..Filter::default()
        }),
        "recent,claude"
    );
    assert_eq!(
        q(Filter {
            target: Some("openai-primary".into()),
            ..Filter::default()
        }),
        "old,recent,fell-back",
        "tried counts, not only chosen"
    );
    assert_eq!(
        q(Filter {
            target: Some("openai-backup".into()),
            ..Filter::default()
        }),
        "fell-back"
    );
    assert_eq!(
        q(Filter {
            provider: Some("anthropic".into()),
            ..Filter::default()
        }),
        "claude"
    );
    assert_eq!(
        q(Filter {
            provider: Some("openai".into()),
            decision: Some(Decision::Allow),
            since: hour,
            ..Filter::default()
        }),
        "fell-back"
    );
    assert_eq!(
        q(Filter {
            target: Some("nope".into()),
            ..Filter::default()
        }),
        ""
    );
}

#[test]
fn limit_keeps_the_newest_and_returns_them_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let mut batch: Vec<Event> = (0..10)
        .map(|i| simple(&format!("r{i}"), Decision::Allow, "openai", "t"))
        .collect();
    store.insert(&mut batch).unwrap();
    let got = store
        .query(&Filter {
            limit: Some(3),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(ids(&got), ["r7", "r8", "r9"]);
    let after = store
        .query(&Filter {
            after_id: Some(batch[7].id),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(ids(&after), ["r8", "r9"]);
}

#[test]
fn pruning_keeps_the_newest_max_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 10).unwrap();
    for chunk in 0..5 {
        let mut batch: Vec<Event> = (0..7)
            .map(|i| {
                simple(
                    &format!("r{}", chunk * 7 + i),
                    Decision::Allow,
                    "openai",
                    &format!("t{}", chunk * 7 + i),
                )
            })
            .collect();
        store.insert(&mut batch).unwrap();
        assert!(store.count().unwrap() <= 10);
    }
    let got = store.query(&Filter::default()).unwrap();
    let want: Vec<String> = (25..35).map(|i| format!("r{i}")).collect();
    assert_eq!(ids(&got), want);
    // The target index forgot pruned events too.
    let pruned = Filter {
        target: Some("t3".into()),
        ..Filter::default()
    };
    assert!(store.query(&pruned).unwrap().is_empty());
    let leftover: i64 = store
        .conn
        .query_row("SELECT COUNT(*) FROM event_targets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(leftover, 10);
    drop(store);

    // A smaller bound on reopen applies at the next write; ids keep growing.
    let mut store = EventStore::open(dir.path(), 4).unwrap();
    let mut batch = vec![simple("r35", Decision::Allow, "openai", "t")];
    store.insert(&mut batch).unwrap();
    assert!(batch[0].id > got.last().unwrap().id);
    assert_eq!(
        ids(&store.query(&Filter::default()).unwrap()),
        ["r32", "r33", "r34", "r35"]
    );
}

#[test]
fn read_only_open_of_a_missing_store_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert!(EventStore::open_read_only(dir.path()).unwrap().is_none());
    assert!(!dir.path().join("events.db").exists());
}

#[test]
fn writer_writes_everything_before_shutdown_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir.path(), 0));
    assert!(writer.healthy());
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let w = writer.clone();
            std::thread::spawn(move || {
                for i in 0..2_500 {
                    w.record(simple(&format!("t{t}-{i}"), Decision::Allow, "openai", "x"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = writer.stats();
    drop(writer);
    drop(handle);
    assert_eq!(stats.dropped, 0, "a 65k queue holds 5k events");
    let store = EventStore::open(dir.path(), 0).unwrap();
    assert_eq!(store.count().unwrap(), 5_000);
    // Each thread's events keep their order.
    let all = store.query(&Filter::default()).unwrap();
    let t0: Vec<&str> = all
        .iter()
        .map(|e| e.request_id.as_str())
        .filter(|r| r.starts_with("t0-"))
        .collect();
    let want: Vec<String> = (0..2_500).map(|i| format!("t0-{i}")).collect();
    assert_eq!(t0, want);
}

#[test]
fn flush_makes_recorded_events_visible_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir.path(), 0));
    for i in 0..10 {
        writer.record(simple(&format!("r{i}"), Decision::Block, "openai", "x"));
    }
    assert!(writer.flush());
    let reader = EventStore::open_read_only(dir.path()).unwrap().unwrap();
    assert_eq!(reader.count().unwrap(), 10);
    assert_eq!(writer.stats().written, 10);
    assert!(handle.shutdown());
    // After shutdown, recording is a counted drop, not a hang or a panic.
    writer.record(simple("late", Decision::Allow, "openai", "x"));
    assert_eq!(writer.stats().dropped, 1);
    assert!(!writer.flush());
}

#[test]
fn writer_survives_an_unwritable_store_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the data directory should be: unwritable even as root.
    let data = dir.path().join("data");
    std::fs::write(&data, b"not a directory").unwrap();
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(&data, 0));
    assert!(!writer.healthy());
    for i in 0..3 {
        writer.record(simple(&format!("lost{i}"), Decision::Allow, "openai", "x"));
    }
    assert!(writer.flush(), "flush returns once the events were handled");
    let stats = writer.stats();
    assert_eq!((stats.accepted, stats.written, stats.failed), (3, 0, 3));
    assert!(!writer.healthy());

    // The store becomes available: the writer reopens it by itself.
    std::fs::remove_file(&data).unwrap();
    std::fs::create_dir(&data).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !writer.healthy() && std::time::Instant::now() < deadline {
        writer.record(simple("probe", Decision::Allow, "openai", "x"));
        writer.flush();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(writer.healthy(), "writer reopened the store");
    writer.record(simple("kept", Decision::Allow, "openai", "x"));
    drop(handle);
    let store = EventStore::open(&data, 0).unwrap();
    let all = store.query(&Filter::default()).unwrap();
    assert_eq!(all.last().unwrap().request_id, "kept");
    assert!(all.iter().all(|e| !e.request_id.starts_with("lost")));
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = WriterConfig::new(dir.path(), 0);
    config.capacity = 4;
    config.batch_max = 1;
    let (writer, handle) = EventWriter::spawn(config);
    // Hold the write lock so the writer thread is stuck in its first batch.
    let blocker = rusqlite::Connection::open(dir.path().join("events.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    for i in 0..100 {
        writer.record(simple(&format!("r{i}"), Decision::Allow, "openai", "x"));
    }
    let stats = writer.stats();
    assert_eq!(stats.accepted + stats.dropped, 100);
    assert!(stats.dropped >= 90, "{stats:?}");
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    assert!(handle.shutdown());
    let stats = writer.stats();
    assert_eq!(stats.written + stats.failed, stats.accepted);
    let store = EventStore::open(dir.path(), 0).unwrap();
    assert_eq!(store.count().unwrap(), stats.written);
}

fn keyed(
    request_id: &str,
    age_ms: i64,
    fingerprint: &str,
    secret: Option<&str>,
    managed: bool,
    exe: &str,
    pid: u32,
) -> Event {
    let mut e = simple(request_id, Decision::Allow, "openai", "openai-primary");
    e.time_ms = now_ms() - age_ms;
    e.client.exe = Some(exe.into());
    e.client.pid = Some(pid);
    e.client.uid = Some(1000);
    e.client.cgroup = Some(format!("/ci/job-{pid}"));
    e.key = Some(PresentedKey {
        fingerprint: fingerprint.into(),
        matches_secret: secret.map(Into::into),
        managed,
        provider: None,
    });
    e
}

#[test]
fn key_report_groups_processes_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let old = Some("openai-q1");
    let mut batch = vec![
        keyed("a1", 5_000, "fp:old", old, false, "/usr/bin/python3", 100),
        keyed("a2", 4_000, "fp:old", old, false, "/usr/bin/python3", 100),
        keyed("a3", 3_000, "fp:old", old, false, "/usr/bin/python3", 100),
        keyed("b1", 2_000, "fp:old", old, false, "/usr/bin/curl", 200),
        keyed(
            "m1",
            1_000,
            "fp:cur",
            Some("openai-prod"),
            true,
            "/srv/app",
            300,
        ),
        keyed("u1", 9_000, "fp:rogue", None, false, "/opt/tool", 400),
        keyed("u2", 8_000, "fp:rogue", None, false, "/opt/tool", 400),
        // Outside a 1 h window.
        keyed("x1", 7_200_000, "fp:ancient", None, false, "/bin/old", 500),
        simple("nokey", Decision::Allow, "openai", "openai-primary"),
    ];
    batch[3].client.container_id = Some("c0ffee".into());
    store.insert(&mut batch).unwrap();

    let report = store.key_report(Some(Duration::from_secs(3600))).unwrap();
    let names: Vec<(Option<&str>, &str)> = report
        .iter()
        .map(|k| (k.matches_secret.as_deref(), k.fingerprint.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            (Some("openai-prod"), "fp:cur"),
            (Some("openai-q1"), "fp:old"),
            (None, "fp:rogue")
        ]
    );
    let q1 = &report[1];
    assert_eq!(q1.count, 4);
    assert!(!q1.managed);
    assert_eq!(q1.last_seen_ms, batch[3].time_ms);
    assert_eq!(q1.first_seen_ms, batch[0].time_ms);
    let procs: Vec<(Option<&str>, Option<u32>, u64)> = q1
        .processes
        .iter()
        .map(|p| (p.exe.as_deref(), p.pid, p.count))
        .collect();
    assert_eq!(
        procs,
        [
            (Some("/usr/bin/curl"), Some(200), 1),
            (Some("/usr/bin/python3"), Some(100), 3)
        ],
        "most recent first"
    );
    assert_eq!(q1.processes[0].container_id.as_deref(), Some("c0ffee"));
    assert_eq!(q1.processes[1].last_seen_ms, batch[2].time_ms);
    assert!(report[0].managed);
    let rogue = &report[2];
    assert_eq!(rogue.count, 2);
    assert_eq!(rogue.processes.len(), 1);
    assert_eq!(rogue.processes[0].cgroup.as_deref(), Some("/ci/job-400"));

    let all = store.key_report(None).unwrap();
    assert_eq!(all.len(), 4, "the old unmanaged key shows without --since");
    assert_eq!(all[3].fingerprint, "fp:ancient");
}

#[test]
fn errors_name_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let e = EventStore::open(&file, 0).unwrap_err().to_string();
    assert!(e.contains("cannot create event store directory"), "{e}");
    assert!(e.contains(&file.display().to_string()), "{e}");
    let e = "nope".parse::<Decision>().unwrap_err().to_string();
    assert_eq!(
        e,
        "unknown decision \"nope\" (expected allow, block, redact or error)"
    );
}

#[test]
fn following_filters_combine_with_after_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let mut batch: Vec<Event> = (0..6)
        .map(|i| {
            let d = if i % 2 == 0 {
                Decision::Block
            } else {
                Decision::Allow
            };
            simple(&format!("r{i}"), d, "openai", if i < 3 { "a" } else { "b" })
        })
        .collect();
    store.insert(&mut batch).unwrap();
    assert_eq!(store.max_id().unwrap(), batch[5].id);
    let got = store
        .query(&Filter {
            after_id: Some(batch[1].id),
            decision: Some(Decision::Block),
            target: Some("b".into()),
            provider: Some("openai".into()),
            since: Some(Duration::from_secs(60)),
            limit: None,
            stream_cut: false,
        })
        .unwrap();
    assert_eq!(ids(&got), ["r4"]);
}

#[test]
fn redact_removes_the_presented_key_from_free_text() {
    let key = crate::secrets::SecretValue::new("sk-proj-AbCdEfGh0123456789AbCdEfGh");
    let mut e = full_event("r1");
    e.client.cmdline = Some(format!(
        "curl -H Authorization: Bearer {} https://api.openai.com",
        key.expose()
    ));
    e.message = Some(format!("upstream rejected {}", key.expose()));
    e.stream = Some(cut(
        StreamEnd::UpstreamFailed,
        Some(&format!("stream failed near {}", key.expose())),
        1,
    ));
    e.redact(&key);
    let json = serde_json::to_string(&e).unwrap();
    assert!(!json.contains(key.expose()), "{json}");
    assert_eq!(
        e.client.cmdline.as_deref(),
        Some("curl -H Authorization: Bearer [redacted] https://api.openai.com")
    );
    assert_eq!(e.message.as_deref(), Some("upstream rejected [redacted]"));
    assert_eq!(
        e.stream.unwrap().reason.as_deref(),
        Some("stream failed near [redacted]")
    );
    // Too short to be a key: left alone rather than blanking words.
    let mut e2 = full_event("r2");
    e2.redact(&crate::secrets::SecretValue::new("python"));
    assert_eq!(e2.client.cmdline, full_event("r2").client.cmdline);
}

/// The schema as kt wrote it before `stream` existed (version 1).
const V1_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    decision TEXT NOT NULL,
    provider TEXT,
    target_tried TEXT NOT NULL,
    target_chosen TEXT,
    fallback_steps TEXT NOT NULL,
    status INTEGER,
    latency_ms INTEGER,
    policy TEXT NOT NULL,
    client_addr TEXT,
    client_pid INTEGER,
    client_uid INTEGER,
    client_exe TEXT,
    client_cmdline TEXT,
    client_cgroup TEXT,
    client_container_id TEXT,
    key_fingerprint TEXT,
    key_matches_secret TEXT,
    key_managed INTEGER,
    message TEXT
);
CREATE INDEX IF NOT EXISTS events_time ON events(time_ms);
CREATE INDEX IF NOT EXISTS events_decision ON events(decision);
CREATE INDEX IF NOT EXISTS events_provider ON events(provider);
CREATE INDEX IF NOT EXISTS events_client ON events(client_exe, client_pid);
CREATE INDEX IF NOT EXISTS events_key ON events(key_fingerprint);
CREATE TABLE IF NOT EXISTS event_targets (
    event_id INTEGER NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (event_id, target)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_targets_target ON event_targets(target, event_id);
PRAGMA user_version = 1;
";

fn cut(end: StreamEnd, reason: Option<&str>, bytes: u64) -> StreamOutcome {
    StreamOutcome {
        end,
        reason: reason.map(Into::into),
        bytes,
    }
}

fn amendment(e: &Event, stream: StreamOutcome) -> Amendment {
    Amendment {
        request_id: e.request_id.clone(),
        time_ms: e.time_ms,
        stream,
    }
}

#[test]
fn amend_sets_the_stream_outcome_of_that_request_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    // Same millisecond: the request id must pick the row.
    let mut batch: Vec<Event> = (0..3)
        .map(|i| {
            let mut e = simple(&format!("r{i}"), Decision::Allow, "openai", "x");
            e.time_ms = 1_000;
            e
        })
        .collect();
    store.insert(&mut batch).unwrap();
    let up = cut(StreamEnd::UpstreamFailed, Some("connection reset"), 42);
    let changed = store
        .amend(&[
            amendment(&batch[1], up.clone()),
            // Not stored (pruned, or its insert was lost): changes nothing.
            Amendment {
                request_id: "gone".into(),
                time_ms: 1_000,
                stream: up.clone(),
            },
            // Right id, wrong time: not that event.
            Amendment {
                request_id: "r2".into(),
                time_ms: 999,
                stream: up.clone(),
            },
        ])
        .unwrap();
    assert_eq!(changed, 1);
    let got = store.query(&Filter::default()).unwrap();
    assert_eq!(ids(&got), ["r0", "r1", "r2"], "still one row per request");
    assert_eq!(got[0].stream, None);
    assert_eq!(got[1].stream, Some(up));
    assert_eq!(got[2].stream, None);
    // `kt events --cut` lists only the cut one.
    let only_cut = store
        .query(&Filter {
            stream_cut: true,
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(ids(&only_cut), ["r1"]);
    // Everything else about the amended event is unchanged.
    let mut unamended = got[1].clone();
    unamended.stream = None;
    assert_eq!(unamended, batch[1]);
}

#[test]
fn stream_outcomes_serialize_snake_case_and_default_to_none() {
    let e = full_event("r1");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["stream"]["end"], "upstream_failed");
    assert_eq!(json["stream"]["bytes"], 87);
    for end in [
        StreamEnd::UpstreamFailed,
        StreamEnd::IdleTimeout,
        StreamEnd::ClientClosed,
    ] {
        assert_eq!(
            serde_json::to_string(&end).unwrap(),
            format!("\"{}\"", end.as_str())
        );
    }
    // JSON written before the field existed still reads.
    let mut old = serde_json::to_value(Event::new("r2", Decision::Allow)).unwrap();
    old.as_object_mut().unwrap().remove("stream");
    let back: Event = serde_json::from_value(old).unwrap();
    assert_eq!(back.stream, None);
}

#[test]
fn a_store_written_before_stream_outcomes_opens_and_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::datadir::events_db(dir.path());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(V1_SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO events (time_ms, request_id, decision, target_tried, fallback_steps, \
             policy, status) VALUES (7, 'old-1', 'allow', '[]', '[]', '[]', 200)",
            [],
        )
        .unwrap();
    }
    // `kt events` on the old file, before any new writer touched it.
    let reader = EventStore::open_read_only(dir.path()).unwrap().unwrap();
    let got = reader.query(&Filter::default()).unwrap();
    assert_eq!(ids(&got), ["old-1"]);
    assert_eq!(got[0].stream, None);

    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let version: i64 = store
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    // Version 2 added `stream`, 3 `client_context` and `key_provider`: both added to a v1 file.
    assert_eq!(version, 3);
    let idle = cut(StreamEnd::IdleTimeout, Some("no data for 30s"), 10);
    assert_eq!(store.amend(&[amendment(&got[0], idle.clone())]).unwrap(), 1);
    let mut fresh = vec![simple("new-1", Decision::Allow, "openai", "x")];
    store.insert(&mut fresh).unwrap();

    let all = store.query(&Filter::default()).unwrap();
    assert_eq!(ids(&all), ["old-1", "new-1"]);
    assert_eq!(all[0].stream, Some(idle.clone()));
    // The reader opened before the migration sees the new column too.
    assert_eq!(
        reader.query(&Filter::default()).unwrap()[0].stream,
        Some(idle)
    );
    drop(store);
    // Opening a migrated file again is a no-op.
    let again = EventStore::open(dir.path(), 0).unwrap();
    assert_eq!(again.count().unwrap(), 2);
}

#[test]
fn a_store_written_before_client_context_opens_and_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = EventStore::open(dir.path(), 0).unwrap();
        store
            .insert(&mut [simple("v2-1", Decision::Allow, "openai", "x")])
            .unwrap();
        // What a version-2 kt wrote: no client_context column.
        store
            .conn
            .execute_batch(
                "ALTER TABLE events DROP COLUMN client_context; PRAGMA user_version = 2;",
            )
            .unwrap();
    }
    let reader = EventStore::open_read_only(dir.path()).unwrap().unwrap();
    let got = reader.query(&Filter::default()).unwrap();
    assert_eq!(ids(&got), ["v2-1"]);
    assert!(got[0].client.context.is_empty());
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let mut e = simple("v3-1", Decision::Allow, "openai", "x");
    e.client.context.netns = Some(4026532001);
    e.client.context.ci.insert("CI_JOB_ID".into(), "99".into());
    store.insert(&mut [e]).unwrap();
    let all = reader.query(&Filter::default()).unwrap();
    assert_eq!(ids(&all), ["v2-1", "v3-1"]);
    assert_eq!(all[1].client.context.netns, Some(4026532001));
    assert_eq!(all[1].client.context.ci["CI_JOB_ID"], "99");
    let json = serde_json::to_value(all[1].json()).unwrap();
    assert_eq!(json["client"]["netns"], 4026532001u64);
    assert_eq!(json["client"]["ci"]["CI_JOB_ID"], "99");
    assert!(json["client"].get("container_name").is_none());
}

#[test]
fn writer_applies_amendments_after_their_insert() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir.path(), 0));
    let e = simple("streamed", Decision::Allow, "openai", "x");
    let closed = cut(StreamEnd::ClientClosed, None, 5);
    // Queued back to back: both land in one batch, amendment second.
    writer.record(e.clone());
    writer.amend(amendment(&e, closed.clone()));
    writer.amend(Amendment {
        request_id: "never-recorded".into(),
        time_ms: e.time_ms,
        stream: closed.clone(),
    });
    assert!(writer.flush());
    let s = writer.stats();
    assert_eq!((s.written, s.amended, s.amend_lost), (1, 1, 1));
    let reader = EventStore::open_read_only(dir.path()).unwrap().unwrap();
    let got = reader.query(&Filter::default()).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].stream, Some(closed.clone()));
    assert!(handle.shutdown());
    // After shutdown an amendment is a counted loss, not a hang.
    writer.amend(amendment(&e, closed));
    assert_eq!(writer.stats().amend_lost, 2);
}

#[test]
fn amendments_to_an_unavailable_store_are_counted_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"not a directory").unwrap();
    let (writer, _handle) = EventWriter::spawn(WriterConfig::new(&data, 0));
    let e = simple("r", Decision::Allow, "openai", "x");
    writer.record(e.clone());
    writer.amend(amendment(&e, cut(StreamEnd::ClientClosed, None, 0)));
    assert!(writer.flush());
    let s = writer.stats();
    assert_eq!((s.failed, s.amended, s.amend_lost), (1, 0, 1));
    assert!(!writer.healthy());
}

#[test]
fn event_sink_amends_the_event_it_recorded() {
    use crate::record::{Arrival, ClientInfo, CutReason, RecordSink, RequestRecord, StreamCut};
    use std::time::SystemTime;
    let dir = tempfile::tempdir().unwrap();
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir.path(), 0));
    let sink = EventSink::new(writer.clone(), Default::default());
    let decision = |id: &str| {
        let mut r = RequestRecord::new(
            id.into(),
            Arrival::BaseUrl,
            None,
            ClientInfo::default(),
            "POST".into(),
        );
        // Not now: the amendment must find the event by the record's time.
        r.time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        r.provider = Some("openai".into());
        r.path = "/v1/chat/completions".into();
        r.chosen = Some("oa1".into());
        r.status = 200;
        r.latency = Duration::from_millis(3);
        r.client_key_fingerprint = Some("sha256:0123456789ab".into());
        r
    };
    let a = decision("a");
    sink.record(a.clone());
    sink.record(decision("b"));
    sink.amend(
        "a",
        a.time,
        StreamCut {
            reason: CutReason::UpstreamFailed {
                message: "error reading a body from connection".into(),
            },
            bytes: 120,
        },
    );
    assert!(writer.flush());
    let got = EventStore::open_read_only(dir.path())
        .unwrap()
        .unwrap()
        .query(&Filter::default())
        .unwrap();
    assert_eq!(ids(&got), ["a", "b"]);
    assert_eq!(got[0].status, Some(200), "the status stays what was sent");
    assert_eq!(
        got[0].stream,
        Some(cut(
            StreamEnd::UpstreamFailed,
            Some("error reading a body from connection"),
            120
        ))
    );
    assert_eq!(got[1].stream, None);
    assert!(handle.shutdown());
}

#[test]
fn event_sink_names_keys_by_the_map_it_was_last_given() {
    use crate::record::{Arrival, ClientInfo, RecordSink, RequestRecord};
    let dir = tempfile::tempdir().unwrap();
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir.path(), 0));
    let sink = EventSink::new(
        writer.clone(),
        [("fp:000000000001".to_string(), "Q1".to_string())].into(),
    );
    let presenting = |id: &str, fp: &str| {
        let mut r = RequestRecord::new(
            id.into(),
            Arrival::Capture,
            None,
            ClientInfo::default(),
            "POST".into(),
        );
        r.client_key_fingerprint = Some(fp.into());
        r
    };
    sink.record(presenting("before", "fp:000000000002"));
    // The secrets changed (a reload): Q2 is managed now.
    sink.set_known([("fp:000000000002".to_string(), "Q2".to_string())].into());
    sink.record(presenting("after", "fp:000000000002"));
    sink.record(presenting("old", "fp:000000000001"));
    assert!(writer.flush());
    let got = EventStore::open_read_only(dir.path())
        .unwrap()
        .unwrap()
        .query(&Filter::default())
        .unwrap();
    let keys: Vec<_> = got
        .iter()
        .map(|e| {
            let k = e.key.as_ref().unwrap();
            (
                e.request_id.as_str(),
                k.matches_secret.as_deref(),
                k.managed,
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("before", None, false),
            ("after", Some("Q2"), true),
            ("old", None, false)
        ]
    );
    assert!(handle.shutdown());
}

#[test]
fn stream_cuts_convert_with_a_bounded_reason() {
    use crate::record::{CutReason, StreamCut};
    let idle = to_stream_outcome(&StreamCut {
        reason: CutReason::IdleTimeout {
            idle: Duration::from_secs(30),
        },
        bytes: 9,
    });
    assert_eq!(
        idle,
        cut(StreamEnd::IdleTimeout, Some("no data for 30s"), 9)
    );
    let closed = to_stream_outcome(&StreamCut {
        reason: CutReason::ClientClosed,
        bytes: 0,
    });
    assert_eq!(closed, cut(StreamEnd::ClientClosed, None, 0));
    let long = to_stream_outcome(&StreamCut {
        reason: CutReason::UpstreamFailed {
            message: "é".repeat(500),
        },
        bytes: 0,
    });
    let reason = long.reason.unwrap();
    assert!(reason.len() <= 203 && reason.ends_with("..."), "{reason}");
}

#[test]
fn changes_since_a_cursor_show_new_events_and_later_amendments_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    let mut first = vec![
        simple("r0", Decision::Allow, "openai", "x"),
        simple("r1", Decision::Block, "openai", "x"),
    ];
    store.insert(&mut first).unwrap();
    let reader = EventStore::open_read_only(dir.path()).unwrap().unwrap();
    let cursor = reader.cursor().unwrap();
    assert_eq!(cursor.event_id, first[1].id);

    let cut0 = cut(StreamEnd::ClientClosed, None, 3);
    store.amend(&[amendment(&first[0], cut0.clone())]).unwrap();
    let mut second = vec![simple("r2", Decision::Allow, "openai", "x")];
    store.insert(&mut second).unwrap();
    // Inserted and amended between two looks: shown once, as new.
    let cut2 = cut(StreamEnd::UpstreamFailed, Some("reset"), 9);
    store.amend(&[amendment(&second[0], cut2.clone())]).unwrap();

    let ch = reader.changes_since(&Filter::default(), cursor).unwrap();
    assert_eq!(ids(&ch.new), ["r2"]);
    assert_eq!(ch.new[0].stream, Some(cut2));
    assert_eq!(ids(&ch.amended), ["r0"]);
    assert_eq!(ch.amended[0].stream, Some(cut0));
    assert_eq!(ch.cursor, reader.cursor().unwrap());
    // Nothing changed since: nothing again.
    let again = reader.changes_since(&Filter::default(), ch.cursor).unwrap();
    assert!(
        again.new.is_empty() && again.amended.is_empty(),
        "{again:?}"
    );

    // Filters apply to amended events too.
    let blocked = Filter {
        decision: Some(Decision::Block),
        ..Filter::default()
    };
    let ch = reader.changes_since(&blocked, cursor).unwrap();
    assert!(ch.new.is_empty() && ch.amended.is_empty(), "{ch:?}");
}

#[test]
fn pruning_drops_the_amendment_log_with_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 2).unwrap();
    let mut batch = vec![simple("old", Decision::Allow, "openai", "x")];
    store.insert(&mut batch).unwrap();
    store
        .amend(&[amendment(&batch[0], cut(StreamEnd::ClientClosed, None, 0))])
        .unwrap();
    let logged = |s: &EventStore| -> i64 {
        s.conn
            .query_row("SELECT COUNT(*) FROM event_amendments", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(logged(&store), 1);
    let mut more: Vec<Event> = (0..2)
        .map(|i| simple(&format!("new{i}"), Decision::Allow, "openai", "x"))
        .collect();
    store.insert(&mut more).unwrap();
    assert_eq!(logged(&store), 0);
    // The sequence keeps increasing after pruning: followers miss nothing.
    let before = store.cursor().unwrap().amendment;
    assert_eq!(before, 0, "no amendment of a stored event is left");
    store
        .amend(&[amendment(&more[1], cut(StreamEnd::ClientClosed, None, 0))])
        .unwrap();
    assert_eq!(store.cursor().unwrap().amendment, 2);
}

#[test]
fn a_reader_never_sees_a_half_created_store() {
    // `kt events --follow` may open the file while the gateway's first open
    // is creating the schema; it must see all of it or none of it.
    for _ in 0..200 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let created = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let created = created.clone();
            std::thread::spawn(move || {
                loop {
                    // Read before looking: once creation is done, this round's
                    // open must see the whole store.
                    let done = created.load(std::sync::atomic::Ordering::SeqCst);
                    if let Some(s) = EventStore::open_read_only(&path).unwrap()
                        && s.has_schema()
                    {
                        s.cursor().unwrap();
                        s.changes_since(&Filter::default(), Cursor::default())
                            .unwrap();
                        return true;
                    }
                    if done {
                        return false;
                    }
                    std::thread::yield_now();
                }
            })
        };
        let _store = EventStore::open(dir.path(), 0).unwrap();
        created.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            reader.join().unwrap(),
            "the reader never saw the finished store"
        );
    }
}

/// An event of `target` serving a request at `ago` before now.
fn served_at(id: &str, target: &str, ago: Duration) -> Event {
    let mut e = simple(id, Decision::Allow, "openai", target);
    e.time_ms = now_ms() - i64::try_from(ago.as_millis()).unwrap();
    e
}

fn guard_note(rule: &str, location: Option<&str>) -> PolicyNote {
    PolicyNote {
        policy: "guard".into(),
        decision: "audit".into(),
        rule_id: Some(rule.into()),
        location: location.map(String::from),
    }
}

/// A fixture store for the retirement evidence: `q2` is the new primary,
/// `q1` the old fallback whose key two processes still present.
pub(crate) fn retirement_fixture(data_dir: &std::path::Path) {
    let mut store = EventStore::open(data_dir, 0).unwrap();
    let hour = Duration::from_secs(3600);
    let mut events = Vec::new();
    // q2 served three requests today, q1 one; one q1 request is two days old.
    for i in 0..3 {
        events.push(served_at(&format!("q2-{i}"), "q2", hour));
    }
    events.push(served_at("q1-today", "q1", 2 * hour));
    events.push(served_at("q1-old", "q1", 48 * hour));
    // A legacy job presents the old key (Q1), twice; a container once, three
    // days ago; someone presented Q1 ten days ago (outside the window).
    for (id, pid, ago) in [("p1", 4242, hour), ("p2", 4242, 3 * hour)] {
        let mut e = served_at(id, "q2", ago);
        e.client.pid = Some(pid);
        e.client.uid = Some(1000);
        e.client.exe = Some("/usr/bin/python3".into());
        e.key = Some(PresentedKey {
            fingerprint: "fp:0000000000q1".into(),
            matches_secret: Some("Q1".into()),
            managed: true,
            provider: None,
        });
        events.push(e);
    }
    let mut c = served_at("p3", "q2", 72 * hour);
    c.client.pid = Some(77);
    c.client.container_id = Some("c0ffee".into());
    c.key = Some(PresentedKey {
        fingerprint: "fp:0000000000q1".into(),
        matches_secret: Some("Q1".into()),
        managed: true,
        provider: None,
    });
    events.push(c);
    let mut ancient = served_at("p4", "q2", 240 * hour);
    ancient.client.pid = Some(1);
    ancient.key = c_key("Q1");
    events.push(ancient);
    // q2 rejected its key once (a rotation alarm), q1 served instead.
    let mut alarm = served_at("alarm", "q1", 5 * hour);
    alarm.target_tried = vec!["q2".into(), "q1".into()];
    alarm.policy = vec![guard_note(
        "rotation-alarm",
        Some("target q2 rejected its key (401); served by q1"),
    )];
    events.push(alarm);
    // Probes: q2 ok (newest), q1 rejected before that and ok even earlier.
    for (id, target, rule, status, ago) in [
        ("probe-a", "q1", "probe-ok", 200, 30 * hour),
        ("probe-b", "q1", "probe-rejected", 401, 20 * hour),
        ("probe-c", "q2", "probe-ok", 200, hour / 2),
    ] {
        let mut p = served_at(id, target, ago);
        p.status = Some(status);
        p.latency_ms = Some(40);
        p.policy = vec![guard_note(rule, None)];
        p.message = Some(format!("probe of target {target}: {rule}"));
        events.push(p);
    }
    // Inserted oldest first, as the writer would.
    events.sort_by_key(|e| e.time_ms);
    store.insert(&mut events).unwrap();
}

fn c_key(secret: &str) -> Option<PresentedKey> {
    Some(PresentedKey {
        fingerprint: "fp:000000000000".into(),
        matches_secret: Some(secret.into()),
        managed: true,
        provider: None,
    })
}

#[test]
fn target_evidence_answers_whether_a_key_can_be_retired() {
    let dir = tempfile::tempdir().unwrap();
    retirement_fixture(dir.path());
    let store = EventStore::open_read_only(dir.path()).unwrap().unwrap();
    let day = Duration::from_secs(24 * 3600);
    let week = 7 * day;

    let q1 = store.target_evidence("q1", "Q1", day, week).unwrap();
    // The request served today and the alarm's; not the old one, not probes.
    assert_eq!(q1.served, 2);
    let who: Vec<_> = q1
        .presented_by
        .iter()
        .map(|p| (p.pid, p.count, p.container_id.as_deref()))
        .collect();
    assert_eq!(who, [(Some(4242), 2, None), (Some(77), 1, Some("c0ffee"))]);
    assert_eq!(q1.presented_by[0].exe.as_deref(), Some("/usr/bin/python3"));
    let alarm = q1.last_rotation_alarm.as_ref().unwrap();
    assert_eq!(
        (
            alarm.rejected.as_str(),
            alarm.status,
            alarm.served_by.as_deref()
        ),
        ("q2", Some(401), Some("q1"))
    );
    let probe = q1.last_verified.as_ref().unwrap();
    assert_eq!(
        (probe.result.as_str(), probe.status),
        ("rejected", Some(401))
    );

    let q2 = store.target_evidence("q2", "Q2", day, week).unwrap();
    // Three requests plus the two legacy ones; the 3-day-old one is out.
    assert_eq!(q2.served, 5);
    assert!(q2.presented_by.is_empty());
    assert_eq!(q2.last_rotation_alarm.as_ref().unwrap().rejected, "q2");
    let probe = q2.last_verified.as_ref().unwrap();
    assert_eq!((probe.result.as_str(), probe.latency_ms), ("ok", Some(40)));

    // A target nothing is known about.
    let none = store.target_evidence("q3", "Q3", day, week).unwrap();
    assert_eq!(none, TargetEvidence::default());
}

#[test]
fn unmanaged_keys_are_named_by_the_provider_of_their_format() {
    use crate::provider::keys::provider_of;
    use crate::record::{Arrival, ClientInfo, RequestRecord};
    // Made-up keys of several formats, assembled here so no literal looks
    // like a key; each presented to a host as the gateway sees it.
    let groq = format!("gs{}{}", "k_", "a1B2".repeat(13));
    let replicate = format!("r8{}{}", "_", "Zq7".repeat(12) + "x");
    let together = format!("tgp{}{}", "_v1_", "Ab3_".repeat(10) + "Cd3");
    let mistral = "Mn4".repeat(10) + "Q8";
    let unknown = "legacy-token-0042".to_string();
    let presented = [
        (&groq, "openai", "/opt/groq-job", 10),
        (&replicate, "openai", "/opt/replicate-job", 11),
        (&together, "together", "/opt/together-job", 12),
        (&mistral, "mistral", "/opt/mistral-job", 13),
        (&unknown, "openai", "/opt/legacy-job", 14),
    ];
    let fp = crate::secrets::Fingerprinter::from_key([9; 32]);
    let mut events = Vec::new();
    for (i, (key, called, exe, pid)) in presented.iter().enumerate() {
        let mut r = RequestRecord::new(
            format!("req-{i}"),
            Arrival::Capture,
            None,
            ClientInfo {
                pid: Some(*pid),
                exe: Some((*exe).into()),
                ..ClientInfo::default()
            },
            "POST".into(),
        );
        r.provider = Some((*called).into());
        r.client_key_fingerprint = Some(fp.fingerprint(key).to_string());
        r.client_key_provider = provider_of(key, Some(called)).map(String::from);
        events.push(to_event(&r, &HashMap::new()));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(dir.path(), 0).unwrap();
    store.insert(&mut events).unwrap();
    let report = store.key_report(None).unwrap();
    let named: HashMap<&str, Option<&str>> = report
        .iter()
        .map(|k| {
            (
                k.processes[0].exe.as_deref().unwrap_or_default(),
                k.provider.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        named["/opt/groq-job"],
        Some("groq"),
        "a gsk_ key sent to OpenAI is Groq's"
    );
    assert_eq!(named["/opt/replicate-job"], Some("replicate"));
    assert_eq!(named["/opt/together-job"], Some("together"));
    assert_eq!(named["/opt/mistral-job"], Some("mistral"));
    assert_eq!(named["/opt/legacy-job"], None);
    assert!(report.iter().all(|k| k.matches_secret.is_none()));
    // The events and the report carry names and fingerprints, never a key.
    let json = serde_json::to_string(&report).unwrap()
        + &serde_json::to_string(&store.query(&Filter::default()).unwrap()).unwrap();
    for (key, ..) in &presented {
        assert!(!json.contains(key.as_str()), "a presented key leaked");
    }
    assert!(json.contains(r#""provider":"groq""#), "{json}");
}
