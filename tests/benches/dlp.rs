//! DLP scan throughput (issue 5, "Benchmark"; issue 13, the larger pack
//! and the Hyperscan anchor). Plain `std::time::Instant`, prints a table;
//! not a test, asserts nothing about speed.
//!
//! Policy: the seed's `dlp-filter` (three patterns, two blocked terms, fuzzy,
//! distance 1) plus the built-in pack. Bodies: OpenAI-style JSON `messages`
//! of 1 KiB, 64 KiB and 1 MiB, a line break every ~9 words: `plain` (no
//! match, prose and code), `plain+m` (`plain` plus a made-up secret and a
//! misspelt blocked phrase every 32 KiB), `nearmiss` (no match, but ~6% of
//! words are candidates: "task-based", "OpenAI", "key", "token",
//! "production", …, each blocked-term word about once in 125 words: a stress
//! case for the prefilters) and `near+m` (`nearmiss` plus the matches).
//!
//! Columns: `kt` is `Scanner::scan` with the whole pack (decoding, JSON
//! walk, joined view, prefilters incl. base64, fuzzy terms). `old pack` is
//! the same scanner with the pack as it was before the provider catalog's
//! key formats were added (19 rules), and `cost` is the time the larger
//! pack adds (kt over old pack, minus one). Baselines in the same process:
//! - `hyperscan`: Intel Hyperscan (block mode, every regex of the policy,
//!   seed + whole pack, compiled into one database) over the raw body. The
//!   industrial anchor: kt's speed as a ratio of it (`vs hs`). kt decodes
//!   (JSON escapes, base64, the joined view) and matches fuzzy terms;
//!   Hyperscan does neither. Needs the `hyperscan` feature (`cargo xtask
//!   bench dlp` installs Debian's libhyperscan-dev and turns it on);
//!   without it the column says `-`.
//! - `regex`: every regex over the whole raw body with `find_iter`, no
//!   decoding and no term matching;
//! - `naive`: the same job done plainly: `serde_json` parse, every string
//!   value unescaped and joined, every regex over that, and each blocked
//!   term by Sellers' dynamic programme over the normalised text.
//!
//! `decode` is kt's decoding alone (`Scanner::decode_only`: the JSON walk,
//! escapes undone, the joined view built; no rule, no term), and `max` is
//! Hyperscan's time over it: the best `vs hs` kt could reach if every rule
//! and term cost nothing. `fuzzy` is the share of `kt` time spent on
//! blocked terms (`kt` minus the same scanner without terms, over `kt`).
//! Timing: see `measure_all`.
//!
//! Run: `cargo xtask bench dlp` (a few minutes; `-- quick` for kt's column
//! only).

use std::hint::black_box;
use std::time::{Duration, Instant};

use guard::config::{DlpAction, DlpFilter};
use guard::dlp::{BuiltinRule, RequestView, Scanner, builtin_rules};

/// The built-in pack before the provider catalog's key formats (Replicate,
/// Bedrock, Together, Fireworks, Azure, Mistral, Cohere, DeepSeek) came.
const OLD_PACK: &[&str] = &[
    "openai-project-key",
    "openai-service-account-key",
    "openai-admin-key",
    "openai-legacy-key",
    "anthropic-api-key",
    "anthropic-admin-key",
    "aws-access-key-id",
    "github-token",
    "github-fine-grained-token",
    "google-api-key",
    "slack-token",
    "stripe-live-key",
    "pem-private-key",
    "anthropic-oauth-token",
    "groq-api-key",
    "xai-api-key",
    "openrouter-api-key",
    "perplexity-api-key",
    "huggingface-token",
];

/// Hyperscan over the same patterns (see the module docs).
#[cfg(feature = "hyperscan")]
mod hs {
    use hyperscan::prelude::*;

    pub struct Anchor {
        db: BlockDatabase,
        scratch: Scratch,
    }

    impl Anchor {
        /// One block-mode database of every pattern; patterns Hyperscan
        /// refuses are named and left out.
        pub fn new(patterns: &[&str]) -> Option<Anchor> {
            let mut ok = Vec::new();
            for (i, p) in patterns.iter().enumerate() {
                let mut pat = Pattern::new(*p).ok()?;
                pat.id = Some(i);
                let single = Patterns(vec![pat.clone()]);
                match single.build::<hyperscan::BlockMode>() {
                    Ok(_) => ok.push(pat),
                    Err(e) => eprintln!("hyperscan refuses {p}: {e}"),
                }
            }
            let db: BlockDatabase = Patterns(ok).build().ok()?;
            let scratch = db.alloc_scratch().ok()?;
            Some(Anchor { db, scratch })
        }

        /// Matches (ends) found in `data`.
        pub fn count(&self, data: &[u8]) -> usize {
            let mut n = 0;
            let _ = self.db.scan(data, &self.scratch, |_, _, _, _| {
                n += 1;
                Matching::Continue
            });
            n
        }
    }
}

#[cfg(not(feature = "hyperscan"))]
mod hs {
    /// Stands in when the bench is built without Hyperscan: never made.
    pub enum Anchor {}
    impl Anchor {
        pub fn new(_: &[&str]) -> Option<Anchor> {
            None
        }
        pub fn count(&self, _: &[u8]) -> usize {
            match *self {}
        }
    }
}

fn seed_policy() -> DlpFilter {
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
        action: DlpAction::Block,
        fuzzy_matching: true,
        max_distance: 1,
        builtin_rules: true,
    }
}

/// Prompt-like words: ordinary prose and code, with the near-misses a real
/// prompt has ("task-based", "OpenAI", "key", "token", "production") so the
/// prefilters do see candidates on the no-match path.
const WORDS: &[&str] = &[
    "the",
    "model",
    "should",
    "answer",
    "with",
    "a",
    "short",
    "summary",
    "of",
    "this",
    "document",
    "and",
    "list",
    "the",
    "main",
    "risks",
    "for",
    "our",
    "team",
    "in",
    "plain",
    "language",
    "please",
    "explain",
    "how",
    "function",
    "returns",
    "value",
    "when",
    "input",
    "is",
    "empty",
    "we",
    "need",
    "to",
    "handle",
    "errors",
    "carefully",
    "before",
    "release",
    "notes",
    "are",
    "written",
    "by",
    "hand",
    "every",
    "week",
    "it",
    "was",
    "not",
    "clear",
    "why",
    "test",
    "failed",
    "on",
    "Linux",
    "but",
    "passed",
    "macOS",
    "can",
    "you",
    "rewrite",
    "paragraph",
    "more",
    "concise",
    "keep",
    "tone",
    "friendly",
    "professional",
    "customer",
    "asked",
    "about",
    "refund",
    "policy",
    "order",
    "number",
    "shipping",
    "address",
    "changed",
    "after",
    "payment",
    "let",
    "x",
    "=",
    "compute(input);",
    "if",
    "x.is_none()",
    "{",
    "}",
    "return",
    "Ok(())",
    "fn",
    "main()",
    "//",
    "TODO:",
    "data",
    "table",
    "rows",
    "columns",
    "query",
    "SELECT",
    "*",
    "FROM",
    "users",
    "WHERE",
    "id",
    "=",
    "42;",
    "task-based",
    "risk-free",
    "OpenAI",
    "API",
    "key",
    "token",
    "production",
    "billing",
    "Anthropic",
    "server",
    "client",
    "request",
    "response",
    "JSON",
    "HTTP",
    "status",
    "200",
    "timeout",
];

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as usize
    }
}

/// Words that make prefilter candidates: near-miss prefixes and the words
/// of the blocked terms. The "plain" bodies leave them out.
const NEAR: &[&str] = &[
    "task-based",
    "risk-free",
    "OpenAI",
    "key",
    "token",
    "production",
    "billing",
    "Anthropic",
];

/// The kinds of body measured.
#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// Ordinary prose and code, none of the `NEAR` words.
    Plain,
    /// `Plain` plus one made-up secret of each of three kinds and a fuzzy
    /// blocked term every 32 KiB (at least once).
    PlainMatches,
    /// With the `NEAR` words (each about 1 word in 125): candidates everywhere.
    NearMiss,
    /// `NearMiss` plus the matches of `PlainMatches`.
    NearMissMatches,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Plain => "plain",
            Case::PlainMatches => "plain+m",
            Case::NearMiss => "nearmiss",
            Case::NearMissMatches => "near+m",
        }
    }
}

/// A JSON chat body of about `size` bytes (see [`Case`]).
fn body(size: usize, case: Case) -> Vec<u8> {
    let matches = matches!(case, Case::PlainMatches | Case::NearMissMatches);
    let plain = matches!(case, Case::Plain | Case::PlainMatches);
    let mut rng = Lcg(7);
    let mut messages = Vec::new();
    let mut total = 0;
    let secrets: Vec<String> = [0usize, 6, 7]
        .iter()
        .map(|&i| builtin_rules()[i].sample())
        .collect();
    let every = 32 * 1024;
    let mut next_secret = size.min(every) / 2;
    let mut i = 0;
    while total < size {
        let mut text = String::new();
        let mut prev = "";
        while text.len() < 700 && total + text.len() < size {
            let mut w = WORDS[rng.next() % WORDS.len()];
            // Keep the no-match bodies free of the blocked phrases themselves.
            while matches!(
                (prev, w),
                ("OpenAI", "production") | ("Anthropic", "billing")
            ) || (plain && NEAR.contains(&w))
            {
                w = WORDS[rng.next() % WORDS.len()];
            }
            prev = w;
            text.push_str(w);
            text.push(if rng.next().is_multiple_of(9) {
                '\n'
            } else {
                ' '
            });
            if matches && total + text.len() >= next_secret {
                text.push_str(&secrets[i % 3]);
                text.push_str(" and the OpenAI prodution key ");
                i += 1;
                next_secret += every;
            }
        }
        total += text.len() + 40;
        let role = if messages.len().is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        messages.push(serde_json::json!({"role": role, "content": text}));
    }
    serde_json::to_vec(&serde_json::json!({"model": "gpt-4o", "messages": messages}))
        .unwrap_or_default()
}

/// Every string of a JSON value, in document order.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The plain implementation of the same job (see the module docs).
fn naive_full(body: &[u8], regexes: &[regex::Regex], terms: &[Vec<char>], k: usize) -> usize {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let mut all = Vec::new();
    strings(&v, &mut all);
    let joined: String = all.concat().replace(['\n', '\r'], "");
    let mut n: usize = regexes.iter().map(|re| re.find_iter(&joined).count()).sum();
    let mut norm: Vec<char> = Vec::with_capacity(joined.len());
    for c in all.join(" ").chars() {
        if c.is_alphanumeric() {
            norm.extend(c.to_lowercase());
        } else if norm.last() != Some(&' ') {
            norm.push(' ');
        }
    }
    for t in terms {
        let mut col: Vec<usize> = (0..=t.len()).collect();
        for &c in &norm {
            let mut diag = col[0];
            col[0] = 0;
            for i in 1..=t.len() {
                let up = col[i];
                col[i] = (diag + usize::from(t[i - 1] != c))
                    .min(up + 1)
                    .min(col[i - 1] + 1);
                diag = up;
            }
            if col[t.len()] <= k {
                n += 1;
            }
        }
    }
    n
}

/// Time per call of each job: the fastest of 15 interleaved rounds (each
/// round times one batch of about 20 ms of every job in turn). On a shared
/// host noise only ever adds time, so the fastest round is the steadiest
/// figure; interleaving keeps the ratios between columns fair, and taking
/// every row's jobs in each round spreads a row's rounds over the whole run,
/// so a burst of load on the host cannot spoil all of them.
fn measure_all(jobs: &mut [Box<dyn FnMut() -> usize + '_>]) -> Vec<Duration> {
    let per_batch: Vec<u32> = jobs
        .iter_mut()
        .map(|f| {
            let start = Instant::now();
            let mut n = 0u32;
            while start.elapsed() < Duration::from_millis(20) {
                black_box(f());
                n += 1;
            }
            n.max(1)
        })
        .collect();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); jobs.len()];
    for _ in 0..15 {
        for (i, f) in jobs.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..per_batch[i] {
                black_box(f());
            }
            samples[i].push(t.elapsed() / per_batch[i]);
        }
    }
    samples
        .into_iter()
        .map(|s| s.into_iter().min().unwrap_or_default())
        .collect()
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    let policy = seed_policy();
    let scanner = Scanner::new(&policy).unwrap_or_else(|e| panic!("policy: {e}"));
    let old: Vec<&BuiltinRule> = builtin_rules()
        .iter()
        .filter(|r| OLD_PACK.contains(&r.id))
        .collect();
    let old_scanner = Scanner::with_pack(&policy, &old).unwrap_or_else(|e| panic!("policy: {e}"));
    let mut no_terms_policy = policy.clone();
    no_terms_policy.blocked_terms.clear();
    let no_terms = Scanner::new(&no_terms_policy).unwrap_or_else(|e| panic!("policy: {e}"));
    let patterns: Vec<&str> = policy
        .detect_patterns
        .iter()
        .map(String::as_str)
        .chain(builtin_rules().iter().map(|r| r.regex))
        .collect();
    let naive_str: Vec<regex::Regex> = patterns
        .iter()
        .map(|p| regex::Regex::new(p).unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect();
    let terms: Vec<Vec<char>> = policy
        .blocked_terms
        .iter()
        .map(|t| t.to_lowercase().chars().collect())
        .collect();
    let naive: Vec<regex::bytes::Regex> = patterns
        .iter()
        .map(|p| regex::bytes::Regex::new(p).unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect();
    let anchor = hs::Anchor::new(&patterns);

    // `cargo bench -p guard-tests --bench dlp -- profile [CASE] [1k|64k]`: only
    // the 1 MiB (or 1 KiB, 64 KiB) scan of one case (default nearmiss), for a few
    // seconds, to look at under a profiler.
    if std::env::args().any(|a| a == "profile") {
        let case = [
            Case::Plain,
            Case::PlainMatches,
            Case::NearMiss,
            Case::NearMissMatches,
        ]
        .into_iter()
        .find(|c| std::env::args().any(|a| a == c.label()))
        .unwrap_or(Case::NearMiss);
        let size = if std::env::args().any(|a| a == "1k") {
            1024
        } else if std::env::args().any(|a| a == "64k") {
            64 * 1024
        } else {
            1024 * 1024
        };
        let b = body(size, case);
        if let Ok(path) = std::env::var("KT_BENCH_DUMP") {
            let _ = std::fs::write(path, &b);
        }
        let req = RequestView {
            path_and_query: "/",
            headers: &[],
            content_encoding: None,
            body: &b,
        };
        if let Ok(s) = scanner.scan(&req) {
            for f in &s.findings {
                println!("{f:?}");
            }
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            black_box(scanner.scan(&req).map_or(0, |s| s.findings.len()));
        }
        return;
    }
    println!(
        "policy: seed + {} built-in rules ({} in the old pack); hyperscan: {}",
        builtin_rules().len(),
        old.len(),
        if anchor.is_some() {
            "same patterns, raw body"
        } else {
            "not built (feature `hyperscan` off or libhs missing)"
        }
    );
    println!(
        "{:>6} {:>8} {:>5} {:>8} {:>8} {:>6} {:>8} {:>6} {:>7} {:>6} {:>8} {:>8} {:>6} {:>8}",
        "size",
        "case",
        "finds",
        "kt MB/s",
        "old pack",
        "cost",
        "hs MB/s",
        "vs hs",
        "decode",
        "max",
        "regex",
        "naive",
        "fuzzy",
        "kt µs"
    );
    let cases = [
        Case::Plain,
        Case::PlainMatches,
        Case::NearMiss,
        Case::NearMissMatches,
    ];
    let rows: Vec<(usize, Case, Vec<u8>)> = [1024, 64 * 1024, 1024 * 1024]
        .into_iter()
        .flat_map(|size| cases.map(|case| (size, case, body(size, case))))
        .collect();
    let headers: &[(&str, &[u8])] = &[
        ("content-type", b"application/json"),
        ("user-agent", b"bench/1.0"),
    ];
    let reqs: Vec<RequestView<'_>> = rows
        .iter()
        .map(|(_, _, b)| RequestView {
            path_and_query: "/v1/chat/completions",
            headers,
            content_encoding: None,
            body: b,
        })
        .collect();
    // `-- quick`: kt's column only (a fast check while changing the scanner).
    if std::env::args().any(|a| a == "quick") {
        let mut jobs: Vec<Box<dyn FnMut() -> usize + '_>> = Vec::new();
        for req in &reqs {
            let scanner = &scanner;
            jobs.push(Box::new(move || {
                scanner.scan(req).map_or(0, |s| s.findings.len())
            }));
        }
        let times = measure_all(&mut jobs);
        for ((size, case, b), t) in rows.iter().zip(times) {
            println!(
                "{size:>8} {:>8} {:>8.0} MB/s",
                case.label(),
                mbps(b.len(), t)
            );
        }
        return;
    }
    // Seven jobs a row, all rows measured together (see `measure_all`).
    const JOBS: usize = 7;
    let mut jobs: Vec<Box<dyn FnMut() -> usize + '_>> = Vec::new();
    for (req, (_, _, b)) in reqs.iter().zip(&rows) {
        let (scanner, old_scanner, no_terms) = (&scanner, &old_scanner, &no_terms);
        let (naive, naive_str, terms, anchor) = (&naive, &naive_str, &terms, &anchor);
        jobs.push(Box::new(move || {
            scanner.scan(req).map_or(0, |s| s.findings.len())
        }));
        jobs.push(Box::new(move || {
            old_scanner.scan(req).map_or(0, |s| s.findings.len())
        }));
        jobs.push(Box::new(move || {
            no_terms.scan(req).map_or(0, |s| s.findings.len())
        }));
        jobs.push(Box::new(move || anchor.as_ref().map_or(0, |a| a.count(b))));
        jobs.push(Box::new(move || {
            naive.iter().map(|re| re.find_iter(b).count()).sum()
        }));
        jobs.push(Box::new(move || naive_full(b, naive_str, terms, 1)));
        jobs.push(Box::new(move || scanner.decode_only(req).unwrap_or(0)));
    }
    let times = measure_all(&mut jobs);
    for (i, (size, case, b)) in rows.iter().enumerate() {
        let findings = scanner.scan(&reqs[i]).map_or(0, |s| s.findings.len());
        let t = &times[JOBS * i..JOBS * (i + 1)];
        let (kt, kt_old, kt_no_terms, hs, rx, nv, dec) = (t[0], t[1], t[2], t[3], t[4], t[5], t[6]);
        let fuzzy = (kt.as_secs_f64() - kt_no_terms.as_secs_f64()).max(0.0) / kt.as_secs_f64();
        let cost = kt.as_secs_f64() / kt_old.as_secs_f64() - 1.0;
        let (hs_col, ratio_col, ceiling_col) = if anchor.is_some() {
            (
                format!("{:.0}", mbps(b.len(), hs)),
                format!("{:.2}x", hs.as_secs_f64() / kt.as_secs_f64()),
                format!("{:.2}x", hs.as_secs_f64() / dec.as_secs_f64()),
            )
        } else {
            ("-".to_string(), "-".to_string(), "-".to_string())
        };
        println!(
            "{:>6} {:>8} {:>5} {:>8.0} {:>8.0} {:>5.0}% {:>8} {:>6} {:>7.0} {:>6} {:>8.0} {:>8.0} {:>5.1}% {:>8.1}",
            if *size >= 1024 * 1024 {
                format!("{}MiB", size >> 20)
            } else {
                format!("{}KiB", size >> 10)
            },
            case.label(),
            findings,
            mbps(b.len(), kt),
            mbps(b.len(), kt_old),
            cost * 100.0,
            hs_col,
            ratio_col,
            mbps(b.len(), dec),
            ceiling_col,
            mbps(b.len(), rx),
            mbps(b.len(), nv),
            fuzzy * 100.0,
            kt.as_secs_f64() * 1e6,
        );
    }
    if anchor.is_some() {
        println!(
            "vs hs: kt's throughput over Hyperscan's on the same raw bodies with the same \
             patterns; kt also decodes (JSON escapes, base64, split keys) and matches fuzzy \
             terms, Hyperscan does neither"
        );
        println!(
            "decode: kt's decoding alone (JSON walk, escapes, the joined view; no rule, no term) \
             in MB/s; max: Hyperscan's time over it, the best `vs hs` kt could reach if every \
             rule and term cost nothing"
        );
    }
}
