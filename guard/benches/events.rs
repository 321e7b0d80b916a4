//! Event writer and file sink throughput: `cargo bench -p guard --bench events`.
//!
//! Prints figures, asserts nothing about speed (shared, noisy machines).
//! Target (issue 5): 50,000 events/s sustained without slowing requests.

use std::time::{Duration, Instant};

use guard::config::{SinkConfig, SinkKind, StoreFailure};
use guard::events::{
    Client, Decision, Event, EventStore, EventWriter, FallbackStep, PolicyNote, PresentedKey,
    Sinks, WriterConfig,
};

const N: usize = 200_000;

fn event(i: usize) -> Event {
    let mut e = Event::new(format!("req-{i:08}"), Decision::Allow);
    e.provider = Some("openai".into());
    e.target_tried = vec!["openai-primary".into()];
    e.target_chosen = Some("openai-primary".into());
    if i.is_multiple_of(10) {
        // Some fall back, some are blocked: realistic row sizes.
        e.target_tried.push("openai-backup".into());
        e.target_chosen = Some("openai-backup".into());
        e.fallback_steps = vec![
            FallbackStep {
                target: "openai-primary".into(),
                outcome: "status 503".into(),
            },
            FallbackStep {
                target: "openai-backup".into(),
                outcome: "ok".into(),
            },
        ];
    }
    if i.is_multiple_of(50) {
        e.decision = Decision::Block;
        e.target_chosen = None;
        e.policy = vec![PolicyNote {
            policy: "dlp-filter".into(),
            decision: "block".into(),
            rule_id: Some("openai-project-key".into()),
            location: Some("body.messages[0].content@10..174".into()),
        }];
    }
    e.status = Some(200);
    e.latency_ms = Some(180 + (i % 40) as u64);
    e.client = Client {
        addr: Some(format!("127.0.0.1:{}", 40_000 + i % 20_000)),
        pid: Some(1_000 + (i % 37) as u32),
        uid: Some(1000),
        exe: Some("/usr/bin/python3".into()),
        cmdline: Some("python3 scripts/legacy_eval.py --model gpt-4o --batch 64".into()),
        cgroup: Some("/system.slice/ci-runner.service/job-1234".into()),
        container_id: None,
        context: Default::default(),
    };
    e.key = Some(PresentedKey {
        fingerprint: format!("fp:{:08x}", i % 3),
        matches_secret: (i % 3 != 2).then(|| "openai-q1".to_string()),
        managed: false,
        provider: None,
    });
    e
}

fn config(dir: &std::path::Path, max_events: u64, capacity: usize) -> WriterConfig {
    let mut c = WriterConfig::new(dir, max_events);
    c.capacity = capacity;
    c.shutdown_timeout = Duration::from_secs(300);
    c
}

fn main() {
    // Burst: every event queued as fast as one thread can, queue large enough
    // to hold them all; sustained rate = events / (first record .. flushed).
    let dir = tempfile::tempdir().expect("temp dir");
    let events: Vec<Event> = (0..N).map(event).collect();
    let (writer, handle) = EventWriter::spawn(config(dir.path(), 1_000_000, N));
    let start = Instant::now();
    for e in events {
        writer.record(e);
    }
    let queued = start.elapsed();
    assert!(writer.flush(), "flush timed out");
    let total = start.elapsed();
    let s = writer.stats();
    drop(handle);
    println!(
        "burst: {N} events, record() {:.0} ns/call (caller side), written in {:.2} s = {:.0} events/s sustained (written {}, dropped {}, failed {})",
        queued.as_nanos() as f64 / N as f64,
        total.as_secs_f64(),
        N as f64 / total.as_secs_f64(),
        s.written,
        s.dropped,
        s.failed,
    );

    // Burst with pruning: the store is already at its bound, every batch prunes.
    let dir2 = tempfile::tempdir().expect("temp dir");
    let bound = 50_000u64;
    let events: Vec<Event> = (0..N).map(event).collect();
    let (writer, handle) = EventWriter::spawn(config(dir2.path(), bound, N));
    let start = Instant::now();
    for e in events {
        writer.record(e);
    }
    assert!(writer.flush(), "flush timed out");
    let total = start.elapsed();
    drop(handle);
    let kept = EventStore::open(dir2.path(), bound)
        .and_then(|s| s.count())
        .unwrap_or(0);
    println!(
        "burst with pruning (max_events {bound}): {:.0} events/s sustained, {kept} kept",
        N as f64 / total.as_secs_f64(),
    );

    // Paced at the target rate with the default queue: does anything drop,
    // and what does record() cost while the writer thread is busy?
    let dir3 = tempfile::tempdir().expect("temp dir");
    let rate = 50_000usize;
    let events: Vec<Event> = (0..N / 2).map(event).collect();
    let (writer, handle) = EventWriter::spawn(config(
        dir3.path(),
        1_000_000,
        WriterConfig::new(dir3.path(), 0).capacity,
    ));
    let start = Instant::now();
    let mut in_record = Duration::ZERO;
    let per_ms = rate / 1000;
    let mut it = events.into_iter();
    let mut tick = 0u64;
    loop {
        let t = Instant::now();
        let mut sent = 0;
        for e in it.by_ref().take(per_ms) {
            writer.record(e);
            sent += 1;
        }
        in_record += t.elapsed();
        if sent == 0 {
            break;
        }
        tick += 1;
        let due = start + Duration::from_millis(tick);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    assert!(writer.flush(), "flush timed out");
    let s = writer.stats();
    drop(handle);
    println!(
        "paced at {rate} events/s for {} events: record() {:.0} ns/call, dropped {}, written {}, offered over {:.2} s",
        N / 2,
        in_record.as_nanos() as f64 / (N / 2) as f64,
        s.dropped,
        s.written,
        start.elapsed().as_secs_f64(),
    );

    // A JSON Lines file sink rotating every 100 MiB, queue large enough for
    // the burst: what record() costs the request path (one clone and one
    // queue push per sink) and how fast its thread writes.
    let dir4 = tempfile::tempdir().expect("temp dir");
    let sink = SinkConfig {
        kind: SinkKind::File {
            path: dir4.path().join("events.jsonl"),
            rotate_bytes: Some(100 << 20),
            rotate_age: None,
            max_files: 5,
        },
        on_failure: StoreFailure::Log,
        queue: N,
    };
    let sinks = Sinks::spawn(&[sink], None);
    let events: Vec<Event> = (0..N).map(event).collect();
    let start = Instant::now();
    for e in &events {
        sinks.record(e);
    }
    let queued = start.elapsed();
    assert!(sinks.flush(Duration::from_secs(300)), "flush timed out");
    let total = start.elapsed();
    let s = &sinks.stats()[0];
    println!(
        "file sink burst: {N} events, record() {:.0} ns/call (caller side), written in {:.2} s = {:.0} events/s (written {}, dropped {}, failed {})",
        queued.as_nanos() as f64 / N as f64,
        total.as_secs_f64(),
        N as f64 / total.as_secs_f64(),
        s.written,
        s.queue_full,
        s.failed,
    );
    sinks.shutdown(Duration::from_secs(30));
}
