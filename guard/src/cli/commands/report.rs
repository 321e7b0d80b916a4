//! `kt report [--since D] [--format markdown|json|text] [--fail-on C]…`:
//! what kt decided over a window, as a summary a person (or a CI job
//! summary) reads at a glance: requests by decision and provider, DLP
//! findings, fallbacks and rotation alarms, which processes used which key.
//! With `--fail-on`, exit 1 when a condition holds (a CI step failing the
//! job on any DLP block or unmanaged key).

use std::io::Write;
use std::time::Duration;

use crate::cli::{ExitStatus, Global, Output};
use crate::events::{EventStore, FailOn, Filter, KeyUsage, Summary};

/// `kt report`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// Only events at most this old: 45s, 30m, 1h, 2d (default: all kept).
    #[arg(long, value_name = "DURATION", value_parser = super::events::parse_since)]
    pub since: Option<Duration>,
    /// `markdown` (a CI job summary), `json`, or `text` [default: text, or
    /// json with `--output json`].
    #[arg(long, value_enum)]
    pub format: Option<ReportFormat>,
    /// Exit 1 when this holds (repeatable): `dlp-block`, `unmanaged-key`,
    /// `rotation-alarm`, `error`.
    #[arg(long, value_enum, value_name = "CONDITION")]
    pub fail_on: Vec<FailOnArg>,
    /// Report on these JSON Lines files (the event sinks of many hosts;
    /// `-` for standard input) instead of this host's store.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub from: Vec<std::path::PathBuf>,
}

/// How the report is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// For a terminal.
    Text,
    /// GitHub-flavoured Markdown (`$GITHUB_STEP_SUMMARY`).
    Markdown,
    /// One JSON document.
    Json,
}

/// `--fail-on` conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailOnArg {
    /// A request was blocked by the DLP filter.
    DlpBlock,
    /// A process presented a key kt does not manage.
    UnmanagedKey,
    /// A managed key was rejected while a fallback served.
    RotationAlarm,
    /// kt could not complete a request.
    Error,
}

impl From<FailOnArg> for FailOn {
    fn from(f: FailOnArg) -> FailOn {
        match f {
            FailOnArg::DlpBlock => FailOn::DlpBlock,
            FailOnArg::UnmanagedKey => FailOn::UnmanagedKey,
            FailOnArg::RotationAlarm => FailOn::RotationAlarm,
            FailOnArg::Error => FailOn::Error,
        }
    }
}

#[derive(serde::Serialize)]
struct Doc<'a> {
    since_seconds: Option<u64>,
    #[serde(flatten)]
    summary: &'a Summary,
    failed: &'a [String],
}

/// Runs `kt report`.
pub fn run(args: &ReportArgs, global: &Global, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let store = if args.from.is_empty() {
        EventStore::open_read_only(&global.data_dir)?
    } else {
        None
    };
    let (events, keys) = match &store {
        None if !args.from.is_empty() => {
            let loaded = super::events::load_from(&args.from)?;
            let since = args.since.map(|d| {
                crate::events::now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            });
            let keys = crate::events::key_usage(&loaded.events, since);
            let events: Vec<_> = loaded
                .events
                .into_iter()
                .filter(|e| since.is_none_or(|s| e.time_ms >= s))
                .collect();
            (events, keys)
        }
        Some(s) => (
            s.query(&Filter {
                since: args.since,
                ..Filter::default()
            })?,
            s.key_report(args.since)?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let summary = Summary::of(&events, keys);
    let fail_on: Vec<FailOn> = args.fail_on.iter().copied().map(FailOn::from).collect();
    let failed = summary.failures(&fail_on);
    let format = args.format.unwrap_or(match out.format() {
        crate::cli::OutputFormat::Json => ReportFormat::Json,
        crate::cli::OutputFormat::Human => ReportFormat::Text,
    });
    let doc = Doc {
        since_seconds: args.since.map(|d| d.as_secs()),
        summary: &summary,
        failed: &failed,
    };
    match format {
        ReportFormat::Json => {
            serde_json::to_writer(&mut *out.out(), &doc)?;
            writeln!(out.out())?;
        }
        ReportFormat::Markdown => markdown(out.out(), &summary, &failed, args.since)?,
        ReportFormat::Text => text(out.out(), &summary, &failed)?,
    }
    Ok(if failed.is_empty() {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

fn window(since: Option<Duration>) -> String {
    since.map_or_else(
        || "all events kept".to_string(),
        |d| format!("the last {}", humantime::format_duration(d)),
    )
}

fn who(k: &KeyUsage) -> Vec<String> {
    k.processes
        .iter()
        .map(|p| {
            let exe = p
                .exe
                .as_deref()
                .and_then(|e| e.rsplit('/').next())
                .unwrap_or("?");
            let pid = p.pid.map(|x| format!("[{x}]")).unwrap_or_default();
            let host = p
                .host
                .as_deref()
                .map(|h| format!("{h}: "))
                .unwrap_or_default();
            let place = p
                .container_id
                .as_deref()
                .map(|c| format!(" container {}", &c[..c.len().min(12)]))
                .or_else(|| p.cgroup.as_deref().map(|c| format!(" {c}")))
                .or_else(|| p.addr.as_deref().map(|a| format!(" {a}")))
                .unwrap_or_default();
            format!("{host}{exe}{pid}{place} ×{}", p.count)
        })
        .collect()
}

/// Markdown for a CI job summary: a headline, a table, the keys.
pub fn markdown(
    w: &mut dyn Write,
    s: &Summary,
    failed: &[String],
    since: Option<Duration>,
) -> std::io::Result<()> {
    let n = |k: &str| s.by_decision.get(k).copied().unwrap_or(0);
    writeln!(w, "### kt: AI provider calls ({})", window(since))?;
    writeln!(w)?;
    if failed.is_empty() {
        writeln!(w, "✅ {} request(s) guarded.", s.requests)?;
    } else {
        writeln!(w, "❌ {}", failed.join("; "))?;
    }
    writeln!(w)?;
    writeln!(
        w,
        "| requests | allowed | blocked | redacted | errors | fallbacks | rotation alarms | streams cut |"
    )?;
    writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    writeln!(
        w,
        "| {} | {} | {} | {} | {} | {} | {} | {} |",
        s.requests,
        n("allow"),
        n("block"),
        n("redact"),
        n("error"),
        s.fallbacks,
        s.rotation_alarms,
        s.stream_cuts
    )?;
    if !s.by_provider.is_empty() {
        writeln!(w)?;
        let list: Vec<String> = s
            .by_provider
            .iter()
            .map(|(p, c)| format!("{p} {c}"))
            .collect();
        writeln!(w, "By provider: {}", list.join(", "))?;
    }
    if !s.dlp_findings.is_empty() {
        writeln!(w)?;
        writeln!(w, "**DLP findings** (the text is never recorded):")?;
        writeln!(w)?;
        for (rule, c) in &s.dlp_findings {
            writeln!(w, "- `{rule}`: {c}")?;
        }
    }
    if !s.refused.is_empty() {
        writeln!(w)?;
        writeln!(w, "**Refused by kt's own rules:**")?;
        writeln!(w)?;
        for (rule, c) in &s.refused {
            writeln!(w, "- `{rule}`: {c}")?;
        }
    }
    if !s.keys.is_empty() {
        writeln!(w)?;
        writeln!(
            w,
            "**Keys presented by processes** (kt sent its managed key instead):"
        )?;
        writeln!(w)?;
        writeln!(w, "| key | requests | processes |")?;
        writeln!(w, "|---|---:|---|")?;
        for k in &s.keys {
            let name = k.matches_secret.as_deref().map_or_else(
                || match &k.provider {
                    Some(p) => format!("unmanaged {p} key `{}`", k.fingerprint),
                    None => format!("unmanaged `{}`", k.fingerprint),
                },
                |n| format!("`{n}`"),
            );
            writeln!(w, "| {name} | {} | {} |", k.count, who(k).join("<br>"))?;
        }
    }
    Ok(())
}

fn text(w: &mut dyn Write, s: &Summary, failed: &[String]) -> std::io::Result<()> {
    let n = |k: &str| s.by_decision.get(k).copied().unwrap_or(0);
    writeln!(
        w,
        "requests {}: allowed {}, blocked {}, redacted {}, errors {}; fallbacks {}, rotation alarms {}, streams cut {}",
        s.requests,
        n("allow"),
        n("block"),
        n("redact"),
        n("error"),
        s.fallbacks,
        s.rotation_alarms,
        s.stream_cuts
    )?;
    for (rule, c) in &s.dlp_findings {
        writeln!(w, "dlp {rule}: {c}")?;
    }
    for (rule, c) in &s.refused {
        writeln!(w, "refused {rule}: {c}")?;
    }
    for k in &s.keys {
        let name = k
            .matches_secret
            .clone()
            .unwrap_or_else(|| match &k.provider {
                Some(p) => format!("unmanaged {p} key {}", k.fingerprint),
                None => format!("unmanaged {}", k.fingerprint),
            });
        writeln!(
            w,
            "key {name}: {} request(s) by {}",
            k.count,
            who(k).join(", ")
        )?;
    }
    for f in failed {
        writeln!(w, "FAIL: {f}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_markdown_summary_names_failures_findings_and_who_used_which_key() {
        let mut s = Summary {
            requests: 3,
            dlp_blocks: 1,
            ..Summary::default()
        };
        s.by_decision.insert("allow".into(), 2);
        s.by_decision.insert("block".into(), 1);
        s.dlp_findings.insert("aws-access-key-id".into(), 1);
        s.keys.push(KeyUsage {
            fingerprint: "fp:aaaaaaaaaaaa".into(),
            matches_secret: Some("OPENAI_Q1".into()),
            managed: true,
            provider: None,
            count: 2,
            first_seen_ms: 1,
            last_seen_ms: 2,
            processes: vec![crate::events::ProcessUsage {
                host: None,
                exe: Some("/usr/bin/python3".into()),
                pid: Some(7),
                uid: Some(1001),
                cgroup: Some("/actions_job/abc".into()),
                container_id: None,
                addr: None,
                count: 2,
                last_seen_ms: 2,
            }],
        });
        let failed = s.failures(&[FailOn::DlpBlock]);
        let mut out = Vec::new();
        markdown(&mut out, &s, &failed, Some(Duration::from_secs(3600))).unwrap();
        let md = String::from_utf8(out).unwrap();
        assert!(
            md.starts_with("### kt: AI provider calls (the last 1h)"),
            "{md}"
        );
        assert!(
            md.contains("❌ 1 request(s) blocked by the DLP filter"),
            "{md}"
        );
        assert!(md.contains("| 3 | 2 | 1 | 0 | 0 | 0 | 0 | 0 |"), "{md}");
        assert!(md.contains("- `aws-access-key-id`: 1"), "{md}");
        assert!(
            md.contains("| `OPENAI_Q1` | 2 | python3[7] /actions_job/abc ×2 |"),
            "{md}"
        );
    }
}
