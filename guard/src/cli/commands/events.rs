//! `kt events`: list decision events (newest last), follow them live, or
//! print the key report (who presented which key).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;

use crate::cli::{ExitStatus, Global, Output, OutputFormat};
use crate::events::{Cursor, Decision, Event, EventStore, Filter, KeyUsage, ProcessUsage};

/// The `--since` forms, for error messages and help.
const SINCE_FORMS: &str = "a number and a unit: 45s, 30m, 1h, 2d (or combined: 1h30m)";

/// How often `--follow` looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// `kt events`.
#[derive(Clone, Debug, clap::Args)]
pub struct EventsArgs {
    /// Only events at most this old: 45s, 30m, 1h, 2d (or combined: 1h30m).
    #[arg(long, value_name = "DURATION", value_parser = parse_since)]
    pub since: Option<Duration>,
    /// Only events with this decision.
    #[arg(long, value_enum)]
    pub decision: Option<DecisionArg>,
    /// Only events that tried or chose this target id.
    #[arg(long, value_name = "ID")]
    pub target: Option<String>,
    /// Only events for this provider.
    #[arg(long, value_name = "NAME")]
    pub provider: Option<String>,
    /// Only requests whose response was cut after its headers went out
    /// (upstream failure, idle timeout, client gone): shown as `200*`.
    #[arg(long)]
    pub cut: bool,
    /// Show the most recent N matching events (0: all).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// Keep printing new events as they arrive (until interrupted); an event
    /// whose response stream is cut later is printed again, marked `*`.
    #[arg(long, conflicts_with = "keys")]
    pub follow: bool,
    /// Print the key report instead: per presented key, which processes used it and when.
    #[arg(long)]
    pub keys: bool,
    /// With `--keys`: the fleet-wide report from these JSON Lines files
    /// (the event sinks of many hosts; `-` for standard input) instead of
    /// this host's store: per managed secret, the hosts and processes that
    /// presented it and when last; then unmanaged keys by provider.
    #[arg(long, value_name = "FILE", num_args = 1.., requires = "keys")]
    pub from: Vec<PathBuf>,
}

/// `--decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecisionArg {
    /// Forwarded.
    Allow,
    /// Refused by a policy.
    Block,
    /// Forwarded after redaction.
    Redact,
    /// The guard could not complete the request.
    Error,
}

impl From<DecisionArg> for Decision {
    fn from(d: DecisionArg) -> Decision {
        match d {
            DecisionArg::Allow => Decision::Allow,
            DecisionArg::Block => Decision::Block,
            DecisionArg::Redact => Decision::Redact,
            DecisionArg::Error => Decision::Error,
        }
    }
}

/// Parses `--since`: `45s`, `30m`, `1h`, `2d`, or combinations (`1h30m`).
pub fn parse_since(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    // humantime also reads `1hour`; a bare number has no unit and is refused.
    if s.is_empty() || s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("invalid duration {s:?}: use {SINCE_FORMS}"));
    }
    humantime::parse_duration(s).map_err(|_| format!("invalid duration {s:?}: use {SINCE_FORMS}"))
}

/// Runs `kt events` on stdout and stderr until done (or interrupted, for
/// `--follow`).
pub fn run(args: &EventsArgs, global: &Global) -> anyhow::Result<ExitStatus> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run_with(
        args,
        global,
        &mut stdout.lock(),
        &mut stderr.lock(),
        &AtomicBool::new(false),
    )
}

/// Runs `kt events`, printing data to `out` and notices to `err`. `--follow`
/// stops when `stop` is set or `out` is closed (an error that
/// [`crate::cli::finish`] turns into success).
pub fn run_with(
    args: &EventsArgs,
    global: &Global,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: &AtomicBool,
) -> anyhow::Result<ExitStatus> {
    let out = &mut Output::new(global.output, out, err);
    if !args.from.is_empty() {
        return print_fleet_keys(args, out);
    }
    let path = crate::datadir::events_db(&global.data_dir);
    let mut store = EventStore::open_read_only(&global.data_dir)
        .with_context(|| format!("reading events from {}", path.display()))?;
    if args.keys {
        return print_keys(args, global, store.as_ref(), out);
    }
    let mut filter = Filter {
        since: args.since,
        decision: args.decision.map(Decision::from),
        target: args.target.clone(),
        provider: args.provider.clone(),
        limit: (args.limit > 0).then_some(args.limit),
        after_id: None,
        stream_cut: args.cut,
    };
    let mut printer = Printer {
        header_done: false,
        widths: [0; 8],
    };
    // Taken before the listing: following starts after whichever is newer,
    // so an event written in between is neither lost nor printed twice.
    let before = match &store {
        Some(s) => s.cursor()?,
        None => Cursor::default(),
    };
    let events = match &store {
        Some(s) => s.query(&filter)?,
        None => Vec::new(),
    };
    if events.is_empty() {
        let filtered = filter.since.is_some()
            || filter.decision.is_some()
            || filter.target.is_some()
            || filter.provider.is_some()
            || filter.stream_cut;
        let total = match &store {
            Some(s) => s.count()?,
            None => 0,
        };
        if store.is_none() {
            out.note(format_args!(
                "no events yet: no event store at {} (the gateway creates it on its first request)",
                path.display()
            ))?;
        } else if total == 0 || !filtered {
            out.note(format_args!("no events yet in {}", path.display()))?;
        } else {
            out.note(format_args!(
                "no events match the filters ({total} event(s) in {})",
                path.display()
            ))?;
        }
    }
    printer.print(out, &events)?;
    out.out().flush()?;
    if !args.follow {
        return Ok(ExitStatus::Success);
    }
    // Follow: new events in full, and events already listed again when
    // their stream is cut later (marked `*`).
    filter.limit = None;
    let mut cursor = Cursor {
        event_id: events
            .last()
            .map_or(before.event_id, |e| e.id.max(before.event_id)),
        amendment: before.amendment,
    };
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(FOLLOW_POLL);
        if store.is_none() {
            store = EventStore::open_read_only(&global.data_dir)
                .with_context(|| format!("reading events from {}", path.display()))?;
        }
        let Some(s) = &mut store else { continue };
        if !s.has_schema() {
            // Opened before the writer created the schema: look again.
            store = None;
            continue;
        }
        let changes = s.changes_since(&filter, cursor)?;
        cursor = changes.cursor;
        printer.print(out, &changes.amended)?;
        printer.print(out, &changes.new)?;
        out.out().flush()?;
    }
    Ok(ExitStatus::Success)
}

struct Printer {
    header_done: bool,
    /// Column widths, set from the header and the first batch (a live tail
    /// keeps them, so its lines stay aligned with the header).
    widths: [usize; 8],
}

impl Printer {
    fn print(&mut self, out: &mut Output<'_>, events: &[Event]) -> std::io::Result<()> {
        match out.format() {
            OutputFormat::Json => {
                for e in events {
                    out.json_line(&e.json())?;
                }
            }
            OutputFormat::Human => {
                if events.is_empty() {
                    return Ok(());
                }
                let rows: Vec<[String; 9]> = events.iter().map(human_row).collect();
                let w = out.out();
                if !self.header_done {
                    self.header_done = true;
                    self.widths = widths(HEADER, &rows);
                    writeln!(w, "{}", render(&HEADER.map(String::from), &self.widths))?;
                }
                for r in &rows {
                    writeln!(w, "{}", clean(&render(r, &self.widths)))?;
                }
            }
        }
        Ok(())
    }
}

/// The table's columns.
const HEADER: [&str; 9] = [
    "TIME", "DECISION", "PROVIDER", "TARGET", "STATUS", "LATENCY", "CLIENT", "KEY", "POLICY",
];

/// Width of each column but the last (which is never padded): the widest
/// of the header and `rows`.
fn widths(header: [&str; 9], rows: &[[String; 9]]) -> [usize; 8] {
    let mut w = [0usize; 8];
    for (i, width) in w.iter_mut().enumerate() {
        *width = rows
            .iter()
            .map(|r| r[i].chars().count())
            .chain(std::iter::once(header[i].len()))
            .max()
            .unwrap_or(0);
    }
    w
}

/// One table line: columns padded to `widths`, latency right-aligned.
fn render(cols: &[String; 9], widths: &[usize; 8]) -> String {
    let mut out = String::new();
    for (i, c) in cols.iter().enumerate() {
        if i > 0 {
            out.push_str("  ");
        }
        match widths.get(i) {
            Some(&w) if i == 5 => out.push_str(&format!("{c:>w$}")),
            Some(&w) => out.push_str(&format!("{c:<w$}")),
            None => out.push_str(c),
        }
    }
    out.trim_end().to_string()
}

/// The table cells of one event (not yet made safe for a terminal).
fn human_row(e: &Event) -> [String; 9] {
    let dash = || "-".to_string();
    let mut status = e.status.map_or_else(dash, |s| s.to_string());
    // The status went out before the body was cut: mark it, say why below.
    if e.stream.is_some() {
        status.push('*');
    }
    let latency = e.latency_ms.map_or_else(dash, |l| format!("{l}ms"));
    let key = e
        .key
        .as_ref()
        .map_or_else(dash, |k| match (&k.matches_secret, k.managed) {
            (Some(name), _) => format!("{} ({name})", k.fingerprint),
            (None, true) => k.fingerprint.clone(),
            (None, false) => match &k.provider {
                Some(p) => format!("{} (unmanaged {p} key)", k.fingerprint),
                None => format!("{} (unmanaged)", k.fingerprint),
            },
        });
    let rules: Vec<String> = e
        .policy
        .iter()
        .filter_map(|p| {
            p.rule_id.as_ref().map(|r| match &p.location {
                Some(loc) => format!("{}:{r}@{loc}", p.policy),
                None => format!("{}:{r}", p.policy),
            })
        })
        .collect();
    let mut policy = if rules.is_empty() {
        "-".to_string()
    } else {
        rules.join(",")
    };
    if let Some(m) = &e.message {
        policy.push_str(&format!("  \"{m}\""));
    }
    if let Some(st) = &e.stream {
        policy.push_str(&format!("  *stream {} after {} bytes", st.end, st.bytes));
        if let Some(r) = &st.reason {
            policy.push_str(&format!(": {r}"));
        }
    }
    // Fallback is the point of staged rotation: show the failed steps
    // before the target that answered (`openai-2026q2:503>openai-2026q1`).
    let mut target: Vec<String> = e
        .fallback_steps
        .iter()
        .filter(|s| Some(&s.target) != e.target_chosen.as_ref())
        .map(|s| format!("{}:{}", s.target, s.outcome))
        .collect();
    target.push(e.target_chosen.clone().unwrap_or_else(dash));
    [
        format_time(e.time_ms),
        e.decision.as_str().to_string(),
        e.provider.clone().unwrap_or_else(dash),
        target.join(">"),
        status,
        latency,
        client_label(
            e.client.exe.as_deref(),
            e.client.pid,
            e.client.addr.as_deref(),
        ) + &client_where(&e.client),
        key,
        policy,
    ]
}

/// Text from processes and the network, made safe for a terminal: control
/// characters (escape sequences, newlines) are shown escaped.
pub(super) fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Where a captured client ran, when not simply on the host: ` ctr:NAME`
/// (or the container id's first 12 digits, or ` netns:INODE` for another
/// network namespace without a container id), then CI job identifiers
/// (` ci:GITHUB_RUN_ID=…,GITHUB_JOB=…`).
fn client_where(c: &crate::events::Client) -> String {
    let mut out = String::new();
    let ctx = &c.context;
    match (&ctx.container_name, &c.container_id, ctx.netns) {
        (Some(n), _, _) => out.push_str(&format!(" ctr:{n}")),
        (None, Some(id), _) => out.push_str(&format!(" ctr:{}", id.get(..12).unwrap_or(id))),
        (None, None, Some(ns)) => out.push_str(&format!(" netns:{ns}")),
        (None, None, None) => {}
    }
    if let Some(i) = &ctx.container_image {
        out.push_str(&format!("({i})"));
    }
    if !ctx.ci.is_empty() {
        let vars: Vec<String> = ctx.ci.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(" ci:{}", vars.join(",")));
    }
    clean(&out)
}

/// `python3[4242]`, or the address for clients that were not captured.
fn client_label(exe: Option<&str>, pid: Option<u32>, addr: Option<&str>) -> String {
    let name = exe.map(|x| x.rsplit('/').next().unwrap_or(x));
    match (name, pid) {
        (Some(n), Some(p)) => format!("{n}[{p}]"),
        (Some(n), None) => n.to_string(),
        (None, Some(p)) => format!("[{p}]"),
        (None, None) => addr.unwrap_or("-").to_string(),
    }
}

/// ISO 8601 UTC with milliseconds.
fn format_time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// Reads every `--from` file (`-`: standard input) as JSON Lines events.
pub(crate) fn load_from(files: &[PathBuf]) -> anyhow::Result<crate::events::Loaded> {
    let mut loaded = crate::events::Loaded::default();
    for f in files {
        if f.as_os_str() == "-" {
            crate::events::read_json_lines(std::io::stdin().lock(), &mut loaded)
                .context("reading events from standard input")?;
        } else {
            let file =
                std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
            crate::events::read_json_lines(std::io::BufReader::new(file), &mut loaded)
                .with_context(|| format!("reading events from {}", f.display()))?;
        }
    }
    Ok(loaded)
}

fn host_label(h: Option<&crate::events::Host>) -> String {
    match h {
        Some(h) => format!("{} ({})", h.name, h.id),
        None => "host not named".to_string(),
    }
}

/// `kt events --keys --from FILE…`.
fn print_fleet_keys(args: &EventsArgs, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let loaded = load_from(&args.from)?;
    let since = args
        .since
        .map(|d| crate::events::now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let report = crate::events::fleet_keys(&loaded.events, since);
    if loaded.skipped > 0 {
        out.note(format_args!(
            "note: {} line(s) were not kt events and were skipped",
            loaded.skipped
        ))?;
    }
    if out.format() == OutputFormat::Json {
        out.data(&report, |_| Ok(()))?;
        return Ok(ExitStatus::Success);
    }
    let w = out.out();
    writeln!(
        w,
        "{} event(s) from {} host(s)",
        report.events, report.hosts
    )?;
    if report.managed.is_empty() && report.unmanaged.is_empty() {
        writeln!(w, "no presented keys recorded")?;
        return Ok(ExitStatus::Success);
    }
    if !report.managed.is_empty() {
        writeln!(w, "\nManaged secrets: who presented each, per host")?;
        for s in &report.managed {
            writeln!(
                w,
                "  {}  {} request(s) on {} host(s), last seen {}",
                clean(&s.name),
                s.count,
                s.hosts.len(),
                format_time(s.last_seen_ms)
            )?;
            for h in &s.hosts {
                writeln!(
                    w,
                    "    {}  {} request(s), last seen {}",
                    clean(&host_label(h.host.as_ref())),
                    h.count,
                    format_time(h.last_seen_ms)
                )?;
                for p in &h.processes {
                    writeln!(w, "      {}", clean(&process_line(p)))?;
                }
            }
        }
    }
    if !report.unmanaged.is_empty() {
        writeln!(w, "\nKeys the guard does not manage, by provider")?;
        for p in &report.unmanaged {
            writeln!(w, "  {}", clean(&p.provider))?;
            for k in &p.keys {
                writeln!(
                    w,
                    "    {} {}  {} request(s), last seen {}",
                    clean(&host_label(k.host.as_ref())),
                    k.fingerprint,
                    k.count,
                    format_time(k.last_seen_ms)
                )?;
                for pr in &k.processes {
                    writeln!(w, "      {}", clean(&process_line(pr)))?;
                }
            }
        }
    }
    Ok(ExitStatus::Success)
}

/// `kt events --keys --output json`.
#[derive(serde::Serialize)]
struct KeyReport<'a> {
    keys: &'a [KeyUsage],
}

fn print_keys(
    args: &EventsArgs,
    global: &Global,
    store: Option<&EventStore>,
    out: &mut Output<'_>,
) -> anyhow::Result<ExitStatus> {
    let keys = match store {
        Some(s) => s.key_report(args.since)?,
        None => Vec::new(),
    };
    if out.format() == OutputFormat::Json {
        out.data(&KeyReport { keys: &keys }, |_| Ok(()))?;
        return Ok(ExitStatus::Success);
    }
    if keys.is_empty() {
        out.note(format_args!(
            "no presented keys recorded{} in {}",
            args.since
                .map(|d| format!(" in the last {}", humantime::format_duration(d)))
                .unwrap_or_default(),
            crate::datadir::events_db(&global.data_dir).display()
        ))?;
        return Ok(ExitStatus::Success);
    }
    let out = out.out();
    let (matched, unmanaged): (Vec<&KeyUsage>, Vec<&KeyUsage>) =
        keys.iter().partition(|k| k.matches_secret.is_some());
    if !matched.is_empty() {
        writeln!(out, "Keys matching a stored secret:")?;
        for k in &matched {
            print_key(out, k)?;
        }
    }
    if !unmanaged.is_empty() {
        if !matched.is_empty() {
            writeln!(out)?;
        }
        writeln!(out, "Keys the guard does not manage:")?;
        for k in &unmanaged {
            print_key(out, k)?;
        }
    }
    Ok(ExitStatus::Success)
}

fn print_key(out: &mut dyn Write, k: &KeyUsage) -> anyhow::Result<()> {
    // An unmanaged key is named by the provider whose format it has.
    let name = match (&k.matches_secret, &k.provider) {
        (Some(n), _) => format!("{n} {}", k.fingerprint),
        (None, Some(p)) => format!("{p} key {}", k.fingerprint),
        (None, None) => format!("unknown format {}", k.fingerprint),
    };
    writeln!(
        out,
        "  {}  {} request(s), last seen {}",
        clean(&name),
        k.count,
        format_time(k.last_seen_ms)
    )?;
    for p in &k.processes {
        writeln!(out, "    {}", clean(&process_line(p)))?;
    }
    Ok(())
}

/// One process of a key report (`kt events --keys`, `kt secrets status`).
pub(super) fn process_line(p: &ProcessUsage) -> String {
    let mut s = match (&p.exe, p.pid) {
        (Some(exe), Some(pid)) => format!("{exe}[{pid}]"),
        (Some(exe), None) => exe.clone(),
        (None, Some(pid)) => format!("[{pid}]"),
        (None, None) => p.addr.clone().unwrap_or_else(|| "unknown client".into()),
    };
    if let Some(uid) = p.uid {
        s.push_str(&format!(" uid {uid}"));
    }
    if let Some(c) = &p.container_id {
        s.push_str(&format!(" container {c}"));
    } else if let Some(c) = &p.cgroup {
        s.push_str(&format!(" cgroup {c}"));
    }
    format!(
        "{s:<48}  {:>6} request(s)  last seen {}",
        p.count,
        format_time(p.last_seen_ms)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{StreamEnd, StreamOutcome};

    fn printed(format: OutputFormat, events: &[Event]) -> String {
        let mut out = Vec::new();
        Printer {
            header_done: false,
            widths: [0; 8],
        }
        .print(
            &mut Output::new(format, &mut out, &mut std::io::sink()),
            events,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// A writer the follow thread owns and the test reads.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<serde_json::Value> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    #[test]
    fn follow_prints_an_event_again_when_its_stream_is_cut_later() {
        use crate::events::Amendment;
        let dir = tempfile::tempdir().unwrap();
        let mut store = EventStore::open(dir.path(), 0).unwrap();
        let mut listed = vec![Event::new("listed", Decision::Allow)];
        store.insert(&mut listed).unwrap();
        let args = EventsArgs {
            since: None,
            decision: None,
            target: None,
            provider: None,
            cut: false,
            limit: 100,
            follow: true,
            keys: false,
            from: Vec::new(),
        };
        let global = Global {
            output: OutputFormat::Json,
            data_dir: dir.path().to_path_buf(),
        };
        let out = Shared::default();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let follower = {
            let (mut out, stop) = (out.clone(), stop.clone());
            std::thread::spawn(move || {
                run_with(&args, &global, &mut out, &mut std::io::sink(), &stop).unwrap()
            })
        };
        let wait_for = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while out.lines().len() < n {
                assert!(std::time::Instant::now() < deadline, "{:?}", out.lines());
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_for(1);
        store
            .amend(&[Amendment {
                request_id: "listed".into(),
                time_ms: listed[0].time_ms,
                stream: StreamOutcome {
                    end: StreamEnd::IdleTimeout,
                    reason: Some("no data for 2m".into()),
                    bytes: 12,
                },
            }])
            .unwrap();
        let mut fresh = vec![Event::new("fresh", Decision::Allow)];
        store.insert(&mut fresh).unwrap();
        wait_for(3);
        stop.store(true, Ordering::SeqCst);
        follower.join().unwrap();
        let lines = out.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["request_id"], "listed");
        assert!(lines[0]["stream"].is_null());
        assert_eq!(lines[1]["request_id"], "listed");
        assert_eq!(lines[1]["id"], lines[0]["id"], "the same event, again");
        assert_eq!(lines[1]["stream"]["end"], "idle_timeout");
        assert_eq!(lines[2]["request_id"], "fresh");
    }

    #[test]
    fn a_cut_stream_is_marked_in_the_table_and_carried_in_json() {
        let mut clean = Event::new("clean", Decision::Allow);
        clean.status = Some(200);
        let mut cut = Event::new("cut", Decision::Allow);
        cut.status = Some(200);
        cut.stream = Some(StreamOutcome {
            end: StreamEnd::UpstreamFailed,
            reason: Some("error reading a body from connection".into()),
            bytes: 87,
        });
        let table = printed(OutputFormat::Human, &[clean.clone(), cut.clone()]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(!lines[1].contains("200*") && !lines[1].contains("stream"));
        assert!(lines[2].contains("200* "), "{table}");
        assert!(
            lines[2].contains(
                "*stream upstream_failed after 87 bytes: error reading a body from connection"
            ),
            "{table}"
        );

        let json = printed(OutputFormat::Json, &[clean, cut]);
        let rows: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(rows[0]["stream"].is_null());
        assert_eq!(rows[1]["stream"]["end"], "upstream_failed");
        assert_eq!(rows[1]["stream"]["bytes"], 87);
        assert_eq!(rows[1]["status"], 200);
    }

    #[test]
    fn table_columns_line_up_when_a_fallback_makes_a_target_long() {
        use crate::events::FallbackStep;
        let mut direct = Event::new("a", Decision::Allow);
        direct.target_chosen = Some("oa".into());
        direct.status = Some(200);
        let mut fell_back = Event::new("b", Decision::Allow);
        fell_back.target_chosen = Some("openai-2026q1".into());
        fell_back.fallback_steps = vec![FallbackStep {
            target: "openai-2026q2".into(),
            outcome: "status_503".into(),
        }];
        fell_back.status = Some(200);
        let table = printed(OutputFormat::Human, &[direct, fell_back]);
        let col = |l: &str| l.find("200").unwrap_or(usize::MAX);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[2].contains("openai-2026q2:status_503>openai-2026q1"),
            "{table}"
        );
        assert_eq!(col(lines[1]), col(lines[2]), "{table}");
        assert_eq!(lines[0].find("STATUS"), Some(col(lines[1])), "{table}");
    }
}
