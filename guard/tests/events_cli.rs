//! `kt events` end to end: events written with the library into a temp data
//! dir, then listed through `guard::cli::commands::events::run_with`.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use guard::cli::commands::events::{EventsArgs, run_with};
use guard::cli::{ExitStatus, Global, OutputFormat};
use guard::events::{
    Client, Decision, Event, EventStore, EventWriter, PolicyNote, PresentedKey, WriterConfig,
};

/// `kt events ...` as the command tree will parse it.
#[derive(Debug, Parser)]
struct Cmd {
    #[command(flatten)]
    args: EventsArgs,
}

fn args(argv: &[&str]) -> EventsArgs {
    let mut full = vec!["events"];
    full.extend_from_slice(argv);
    Cmd::try_parse_from(full).unwrap().args
}

fn global(dir: &Path, output: OutputFormat) -> Global {
    Global {
        output,
        data_dir: dir.to_path_buf(),
    }
}

/// Runs the command; returns (exit code, stdout, stderr).
fn kt_events(dir: &Path, output: OutputFormat, argv: &[&str]) -> (ExitStatus, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with(
        &args(argv),
        &global(dir, output),
        &mut out,
        &mut err,
        &AtomicBool::new(false),
    )
    .unwrap();
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

// Made-up key of the right shape: must never show anywhere.
const OLD_KEY: &str = "sk-proj-Q1oldKEYoldKEYoldKEYoldKEYoldKEYoldKEY0123456789";

fn fingerprint(_key: &str) -> String {
    // Stand-in for the gateway's fingerprint: a short, one-way label.
    "fp:7e3a91c0".to_string()
}

fn event(request_id: &str, decision: Decision, target: &str, pid: u32) -> Event {
    let mut e = Event::new(request_id, decision);
    e.provider = Some(if target.starts_with("claude") {
        "anthropic".into()
    } else {
        "openai".into()
    });
    e.target_tried = vec![target.into()];
    e.target_chosen = (decision != Decision::Block).then(|| target.into());
    e.status = Some(if decision == Decision::Block {
        400
    } else {
        200
    });
    e.latency_ms = Some(42);
    e.client = Client {
        addr: Some("127.0.0.1:50000".into()),
        pid: Some(pid),
        uid: Some(1000),
        exe: Some("/usr/bin/python3".into()),
        cmdline: Some("python3 legacy.py".into()),
        cgroup: Some("/ci/job".into()),
        container_id: None,
        context: Default::default(),
    };
    e.key = Some(PresentedKey {
        fingerprint: fingerprint(OLD_KEY),
        matches_secret: Some("openai-q1".into()),
        managed: false,
        provider: Some("openai".into()),
    });
    if decision == Decision::Block {
        e.policy = vec![PolicyNote {
            policy: "dlp-filter".into(),
            decision: "block".into(),
            rule_id: Some("openai-project-key".into()),
            location: Some("body.messages[0].content".into()),
        }];
    }
    e
}

fn write_events(dir: &Path, events: Vec<Event>) {
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir, 0));
    for e in events {
        writer.record(e);
    }
    assert!(handle.shutdown());
}

fn sample(dir: &Path) {
    write_events(
        dir,
        vec![
            event("r1", Decision::Allow, "openai-primary", 101),
            event("r2", Decision::Block, "openai-primary", 102),
            event("r3", Decision::Allow, "claude-main", 103),
            event("r4", Decision::Redact, "openai-backup", 104),
        ],
    );
}

#[test]
fn json_output_is_one_event_per_line_newest_last() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let (code, out, err) = kt_events(dir.path(), OutputFormat::Json, &[]);
    assert_eq!(code, ExitStatus::Success, "{err}");
    let events: Vec<Event> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2", "r3", "r4"]);
    assert_eq!(events[1].decision, Decision::Block);
    assert_eq!(
        events[1].policy[0].rule_id.as_deref(),
        Some("openai-project-key")
    );
    assert_eq!(events[0].client.pid, Some(101));
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["decision"], "allow");
    assert_eq!(first["key"]["matches_secret"], "openai-q1");
}

#[test]
fn filters_and_limit_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let ids = |argv: &[&str]| {
        let (code, out, _) = kt_events(dir.path(), OutputFormat::Json, argv);
        assert_eq!(code, ExitStatus::Success);
        out.lines()
            .map(|l| serde_json::from_str::<Event>(l).unwrap().request_id)
            .collect::<Vec<_>>()
            .join(",")
    };
    assert_eq!(ids(&["--decision", "block"]), "r2");
    assert_eq!(ids(&["--target", "openai-primary"]), "r1,r2");
    assert_eq!(ids(&["--provider", "anthropic"]), "r3");
    assert_eq!(ids(&["--limit", "2"]), "r3,r4");
    assert_eq!(ids(&["--since", "1h", "--decision", "redact"]), "r4");
}

#[test]
fn human_output_is_one_readable_line_per_event() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let (code, out, _) = kt_events(dir.path(), OutputFormat::Human, &[]);
    assert_eq!(code, ExitStatus::Success);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "header + 4 events:\n{out}");
    assert!(lines[0].starts_with("TIME"));
    let blocked = lines[2];
    for want in [
        "block",
        "openai",
        "400",
        "42ms",
        "python3[102]",
        "fp:7e3a91c0 (openai-q1)",
        "dlp-filter:openai-project-key@body.messages[0].content",
    ] {
        assert!(blocked.contains(want), "{want:?} missing in {blocked:?}");
    }
    // ISO 8601 UTC time first.
    let time = blocked.split_whitespace().next().unwrap();
    assert!(time.ends_with('Z') && time.contains('T'), "{time}");
    // Columns line up: the decision starts at the same offset on every line.
    let col = lines[0].find("DECISION").unwrap();
    for l in &lines[1..] {
        assert!(
            ["allow", "block", "redact"]
                .iter()
                .any(|d| l[col..].starts_with(d)),
            "{l}"
        );
    }
}

#[test]
fn human_output_escapes_control_characters_from_processes() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = event("r1", Decision::Allow, "openai-primary", 7);
    e.client.exe = Some("/tmp/\u{1b}[2Jevil\nline".into());
    write_events(dir.path(), vec![e]);
    for argv in [&[][..], &["--keys"][..]] {
        let (code, out, _) = kt_events(dir.path(), OutputFormat::Human, argv);
        assert_eq!(code, ExitStatus::Success);
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(out.contains("\\u{1b}[2Jevil\\nline"), "{out}");
    }
}

#[test]
fn a_missing_store_is_no_events_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    for output in [OutputFormat::Human, OutputFormat::Json] {
        let (code, out, err) = kt_events(dir.path(), output, &[]);
        assert_eq!(code, ExitStatus::Success);
        assert_eq!(out, "");
        assert!(err.contains("no events yet"), "{err}");
    }
    assert!(
        !dir.path().join("events.db").exists(),
        "reading creates nothing"
    );
    let (code, _, err) = kt_events(dir.path(), OutputFormat::Human, &["--keys"]);
    assert_eq!(code, ExitStatus::Success);
    assert!(err.contains("no presented keys"), "{err}");
}

#[test]
fn an_empty_result_says_whether_filters_excluded_everything() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let (code, out, err) = kt_events(dir.path(), OutputFormat::Human, &["--target", "nope"]);
    assert_eq!(code, ExitStatus::Success);
    assert_eq!(out, "");
    assert!(
        err.contains("no events match the filters (4 event(s)"),
        "{err}"
    );
}

#[test]
fn a_bad_since_is_a_usage_error_naming_the_accepted_forms() {
    for bad in ["1x", "yesterday", "10", ""] {
        let e = Cmd::try_parse_from(["events", "--since", bad]).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{bad:?}");
        let msg = e.to_string();
        assert!(msg.contains("45s, 30m, 1h, 2d"), "{msg}");
    }
    for good in ["45s", "30m", "1h", "2d", "1h30m"] {
        assert!(
            Cmd::try_parse_from(["events", "--since", good]).is_ok(),
            "{good}"
        );
    }
    let e = Cmd::try_parse_from(["events", "--decision", "maybe"]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn key_report_lists_processes_per_secret_and_unmanaged_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut rogue = event("r9", Decision::Allow, "openai-primary", 900);
    rogue.client.exe = Some("/opt/tool/bin/agent".into());
    rogue.key = Some(PresentedKey {
        fingerprint: "fp:00ff00ff".into(),
        matches_secret: None,
        managed: false,
        // An unmanaged key is named by the provider whose format it has.
        provider: Some("groq".into()),
    });
    write_events(
        dir.path(),
        vec![
            event("r1", Decision::Allow, "openai-primary", 101),
            event("r2", Decision::Allow, "openai-primary", 102),
            event("r3", Decision::Allow, "openai-primary", 102),
            rogue,
        ],
    );
    let (code, out, _) = kt_events(dir.path(), OutputFormat::Human, &["--keys"]);
    assert_eq!(code, ExitStatus::Success);
    let (managed, unmanaged) = out.split_once("Keys the guard does not manage:").unwrap();
    assert!(
        managed.contains("openai-q1 fp:7e3a91c0  3 request(s)"),
        "{out}"
    );
    assert!(managed.contains("/usr/bin/python3[101]"), "{out}");
    assert!(managed.contains("/usr/bin/python3[102]"), "{out}");
    assert!(
        unmanaged.contains("groq key fp:00ff00ff  1 request(s)"),
        "{out}"
    );
    assert!(unmanaged.contains("/opt/tool/bin/agent[900]"), "{out}");

    let (code, out, _) = kt_events(dir.path(), OutputFormat::Json, &["--keys"]);
    assert_eq!(code, ExitStatus::Success);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["keys"][0]["matches_secret"], "openai-q1");
    assert_eq!(v["keys"][0]["processes"].as_array().unwrap().len(), 2);
    assert_eq!(v["keys"][1]["matches_secret"], serde_json::Value::Null);
    assert_eq!(v["keys"][1]["provider"], "groq");
}

#[test]
fn no_key_value_appears_in_the_store_or_any_output() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let mut seen = String::new();
    for output in [OutputFormat::Human, OutputFormat::Json] {
        for argv in [&[][..], &["--keys"][..]] {
            let (_, out, err) = kt_events(dir.path(), output, argv);
            seen.push_str(&out);
            seen.push_str(&err);
        }
    }
    let store = EventStore::open_read_only(dir.path()).unwrap().unwrap();
    seen.push_str(&format!("{:?}", store.query(&Default::default()).unwrap()));
    assert!(seen.contains("fp:7e3a91c0"), "the fingerprint is shown");
    assert!(!seen.contains(OLD_KEY));
    assert!(!seen.contains("oldKEY"));
    drop(store);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(6).any(|w| w == b"oldKEY"),
            "no key bytes on disk"
        );
    }
}

/// A writer the test can read while `run_with` holds it.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[test]
fn follow_prints_new_events_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    // Start before the store exists: follow waits for it.
    let out = SharedBuf::default();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (mut out, stop) = (out.clone(), stop.clone());
        let g = global(dir.path(), OutputFormat::Json);
        let a = args(&["--follow", "--decision", "block"]);
        std::thread::spawn(move || run_with(&a, &g, &mut out, &mut std::io::sink(), &stop))
    };
    let (writer, handle) = EventWriter::spawn(WriterConfig::new(dir.path(), 0));
    writer.record(event("f1", Decision::Block, "openai-primary", 1));
    writer.record(event("f2", Decision::Allow, "openai-primary", 2));
    writer.record(event("f3", Decision::Block, "openai-primary", 3));
    assert!(writer.flush());
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.text().lines().count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(runner.join().unwrap().unwrap(), ExitStatus::Success);
    drop(handle);
    let ids: Vec<String> = out
        .text()
        .lines()
        .map(|l| serde_json::from_str::<Event>(l).unwrap().request_id)
        .collect();
    assert_eq!(ids, ["f1", "f3"], "each new matching event once, in order");
}

#[test]
fn a_closed_pipe_ends_the_listing_quietly() {
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let result = run_with(
        &args(&["--follow"]),
        &global(dir.path(), OutputFormat::Human),
        &mut Closed,
        &mut std::io::sink(),
        &AtomicBool::new(false),
    );
    let mut err = Vec::new();
    assert_eq!(guard::cli::finish(result, &mut err), ExitStatus::Success);
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
}
