//! The `dlp-filter` policy: finds secrets and blocked terms in what a request
//! carries. Pure: no I/O, no async; the gateway hands in a [`RequestView`]
//! and acts on the findings (`block`, `redact`, `audit`).
//!
//! # What is scanned
//! - The body, decoded first: `Content-Encoding` (gzip, deflate, br, zstd;
//!   comma-separated lists too) is undone under a size cap and a ratio cap
//!   ([`DecodeLimits`]). A JSON body is walked and every string (values and
//!   object keys) is unescaped, so `\u` escapes cannot hide a key. Any other
//!   body is scanned as bytes (UTF-8 where it is valid), and, when it holds
//!   JSON escapes (a body a lenient parser may still read as JSON), once
//!   more with them decoded, matches mapped back to the raw bytes.
//! - The URL (`path_and_query`), percent-decoded.
//! - Every header except the credential headers the gateway replaces anyway
//!   (the provider catalog's `CREDENTIAL_HEADERS`).
//!
//! # The joined view
//! A key split over several lines, or over several messages of a
//! `messages` array, is found in a second view of the body: the JSON string
//! values in document order, concatenated, with line breaks (`\r`, `\n`)
//! removed. Values of structural keys (`role`, `type`, `model`, `id`,
//! `name`, `object`, `media_type`, `tool_call_id`, `tool_use_id`) and object
//! keys are left out of it, so `"role": "user"` does not sit between two
//! halves of a key. A text body is joined the same way (line breaks
//! removed). Only line breaks are removed, never spaces: gluing the words of
//! ordinary prose together would make patterns such as `sk-[A-Za-z0-9]{20,}`
//! fire on text like "risk-free approach". A match found inside one value is
//! reported at that value; a match that needed the joining is reported with
//! the JSON paths of the first and last value it spans. A match that runs to
//! the end of a line is extended across the line break when the rule keeps
//! matching there (for open-ended patterns such as `sk-[A-Za-z0-9]{20,}` a
//! word at the start of the next line may be included: for redaction, the
//! safer side).
//!
//! # Speed
//! Every rule's required literal prefixes (`sk-`, `AKIA`, `ghp_`,
//! `-----BEGIN`, …) are extracted from its regex (or given by the rule:
//! Azure's signature inside the key) and searched for in one pass with
//! aho-corasick's packed SIMD searcher (two searches under the hood: 3-byte
//! heads apart from longer ones, see the `literals` module); their base64
//! spellings have a second pass (see the `b64` module), which runs only
//! inside base64 runs long enough to hold an encoded match (found 16 bytes
//! at a time: prose and code have next to none), and the blocked terms and
//! the context words of context rules (`mistral`, `cohere`, …: any case)
//! a third, case-insensitive one (see the `terms` module). A rule's regex then runs
//! only at a candidate, anchored there: for rules with no look-around that
//! cannot match a line break (all built-in rules but the PEM one), one
//! anchored search in the joined view settles a candidate. A user pattern
//! with no literal prefix of at least 3 bytes cannot be prefiltered: those
//! patterns go through one `RegexSet` pass over each view and, where the set
//! matches, a full search (`coverage_warnings` points them out). Large
//! working buffers are reused per thread. `cargo xtask bench dlp` prints the
//! figures.
//!
//! # Findings
//! A [`Finding`] names the rule and the place, never the matched text.

#![forbid(unsafe_code)]

mod b64;
mod decode;
mod literals;
mod rules;
mod scratch;
mod terms;
#[cfg(test)]
mod tests;

use std::cell::OnceCell;
use std::collections::HashSet;
use std::hash::{Hash as _, Hasher as _};

use regex_automata::{Anchored, Input, meta};
use regex_syntax::hir::literal::{ExtractKind, Extractor};

use crate::config::{DlpAction, DlpFilter};
use decode::Segment;
use literals::LiteralSet;

pub use rules::{BuiltinRule, builtin_rules};

/// Errors of the DLP scanner.
#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    /// A `detect_patterns` entry does not compile.
    #[error("dlp pattern {id} does not compile: {reason}")]
    Pattern {
        /// The rule id (`detect-pattern-N`, N counting from 0).
        id: String,
        /// What the regex compiler said.
        reason: String,
    },
    /// A `blocked_terms` entry has no letters or digits.
    #[error("dlp blocked term {index} has no letters or digits")]
    EmptyTerm {
        /// Position in `blocked_terms`, from 0.
        index: usize,
    },
    /// The body's `Content-Encoding` is not one the scanner can undo.
    #[error("request body content-encoding {0:?} is not supported")]
    UnsupportedEncoding(String),
    /// The body does not decode under its `Content-Encoding`.
    #[error("request body is not valid {encoding} data")]
    Corrupt {
        /// The content-coding that failed.
        encoding: &'static str,
    },
    /// The decompressed body passed [`DecodeLimits::max_decoded_bytes`].
    #[error("request body decompresses to more than {limit} bytes")]
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The decompressed body passed [`DecodeLimits::max_ratio`] times its
    /// compressed size (a decompression bomb).
    #[error("request body expands more than {ratio} times when decompressed")]
    RatioExceeded {
        /// The cap.
        ratio: u32,
    },
}

impl DlpError {
    /// The HTTP status the gateway should answer with: 413 for the caps,
    /// 415 for an unknown encoding, 400 for a corrupt body, 500 for
    /// configuration errors.
    pub fn http_status(&self) -> u16 {
        match self {
            DlpError::TooLarge { .. } | DlpError::RatioExceeded { .. } => 413,
            DlpError::UnsupportedEncoding(_) => 415,
            DlpError::Corrupt { .. } => 400,
            DlpError::Pattern { .. } | DlpError::EmptyTerm { .. } => 500,
        }
    }
}

/// Caps on decompressing a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest decompressed body, in bytes (default 32 MiB).
    pub max_decoded_bytes: usize,
    /// Largest decompressed/compressed size ratio (default 100).
    pub max_ratio: u32,
    /// The ratio is only enforced once the output passes this many bytes
    /// (default 1 MiB), so small, very repetitive bodies still pass.
    pub ratio_floor: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_decoded_bytes: 32 * 1024 * 1024,
            max_ratio: 100,
            ratio_floor: 1024 * 1024,
        }
    }
}

/// What the scanner sees of a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The request target, e.g. `/v1/chat/completions?x=1`.
    pub path_and_query: &'a str,
    /// Header names and raw values.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The `Content-Encoding` header value, if any.
    pub content_encoding: Option<&'a str>,
    /// The body as received (still encoded).
    pub body: &'a [u8],
}

/// Where a finding is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// In the body. For a JSON body, `json_path` names the string
    /// (`$.messages[1].content`; `.{key}` for an object key, whose text is
    /// never shown) and `start..end` are byte offsets in its unescaped
    /// value; a match that spans values (see the joined view in the module
    /// docs) has `json_path` `"<first> + <last>"`, `start` in the first and
    /// `end` in the last. For any other body, `json_path` is `None` and the
    /// offsets are in the decoded (decompressed) body.
    Body {
        /// JSON path of the string, for JSON bodies.
        json_path: Option<String>,
        /// Start byte offset (see above).
        start: usize,
        /// End byte offset, exclusive.
        end: usize,
    },
    /// In a header value.
    Header {
        /// The header name as received.
        name: String,
    },
    /// In the URL: byte offsets in `path_and_query` as received (the match
    /// itself is found after percent-decoding).
    Url {
        /// Start byte offset.
        start: usize,
        /// End byte offset, exclusive.
        end: usize,
    },
}

/// One match. Never holds the matched text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The rule: a built-in rule id (`openai-project-key`),
    /// `detect-pattern-N` for `detect_patterns[N]`, or
    /// `blocked-term:<normalised term>`.
    pub rule_id: String,
    /// Where it matched.
    pub location: Location,
}

/// What the body turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    Empty,
    /// One JSON document; its strings were scanned unescaped.
    Json,
    /// Anything else, scanned as text.
    Text,
}

/// The result of [`Scanner::scan`].
#[derive(Clone, Debug)]
pub struct Scan {
    /// Every finding, in the order body, URL, headers (deduplicated by rule
    /// and location).
    pub findings: Vec<Finding>,
    /// What the body was.
    pub body_kind: BodyKind,
    /// Size of the body after undoing `Content-Encoding`.
    pub decoded_len: usize,
}

/// The result of [`Scanner::redact`]: what to forward instead.
#[derive(Clone, Debug)]
pub struct Redacted {
    /// The findings that were redacted.
    pub findings: Vec<Finding>,
    /// The new body, when anything in it changed; `None`: forward the body
    /// as received. The new body is never compressed: when the request had a
    /// `Content-Encoding`, the caller must drop that header and set
    /// `Content-Length` to this body's length. JSON bodies stay valid JSON:
    /// each match is replaced inside its string value, which is re-escaped.
    pub body: Option<Vec<u8>>,
    /// The new `path_and_query`, when anything in it changed (markers are
    /// percent-encoded there).
    pub path_and_query: Option<String>,
    /// New values for headers that held a match: index into
    /// [`RequestView::headers`] and the value to send.
    pub headers: Vec<(usize, Vec<u8>)>,
}

/// A compiled rule.
struct Rule {
    id: String,
    regex: meta::Regex,
    /// No look-around and nothing that matches `\r` or `\n` (see `line_bound`).
    line_bound: bool,
    /// Bytes from a match's start to where its prefilter literal sits.
    back: usize,
}

/// What a prefilter literal stands for.
#[derive(Clone, Copy)]
enum Lit {
    /// A prefix of rule `.0`, as written.
    Plain(usize),
    /// A base64 spelling of a prefix of rule `.0` (see the `b64` module).
    Base64(usize, b64::Spelling),
}

/// Which rule a hit belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RuleRef {
    Pattern(usize),
    Term(usize),
}

/// A compiled `dlp-filter` policy. Build once per config, share freely
/// (`Send + Sync`), call [`Scanner::scan`] per request.
pub struct Scanner {
    rules: Vec<Rule>,
    /// One literal search for every rule prefix.
    prefilter: Option<LiteralSet<Lit>>,
    /// A second one for their base64 spellings (kept apart: one search with
    /// both sets of literals is slower than two).
    base64_prefilter: Option<LiteralSet<Lit>>,
    /// Whether base64 is searched at group starts only (too many prefixes
    /// to search for at every alignment quickly).
    base64_group_starts_only: bool,
    /// Shortest base64 run that can hold an encoded match of any rule
    /// with base64 spellings (see `b64::long_runs`).
    base64_min_run: usize,
    fallback: Vec<usize>,
    fallback_set: Option<regex::bytes::RegexSet>,
    terms: terms::Terms,
    action: DlpAction,
    limits: DecodeLimits,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.id).collect::<Vec<_>>(),
            )
            .field("fallback", &self.fallback.len())
            .field("action", &self.action)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A rule as [`Scanner::with_pack`] compiles it.
struct RuleSource<'a> {
    id: String,
    pattern: &'a str,
    /// Base64 spellings at every alignment, not only at group starts.
    every_alignment: bool,
    /// Literals given by the rule (empty: extracted from the pattern).
    given: &'a [&'a str],
    /// Bytes from a match's start to its literal.
    back: usize,
    /// The given literals are the case spellings of a case-insensitive word.
    folded: bool,
}

/// Whether a raw line break sits inside a JSON string token: invalid JSON
/// that a lenient parser may still accept. The joined view breaks lines
/// only at `\n` escapes there, so a key split by a raw break would be
/// missed (and found once redaction re-escaped it: found by the dlp fuzz
/// target); such a body is scanned as text instead. `sources` are the
/// body's strings in document order.
fn raw_break_in_string(body: &[u8], sources: &[Source<'_>]) -> bool {
    let mut strings = sources
        .iter()
        .filter_map(|s| match s.origin {
            Origin::Json {
                raw_start, raw_end, ..
            } => Some((raw_start, raw_end)),
            _ => None,
        })
        .peekable();
    for at in memchr::memchr2_iter(b'\n', b'\r', body) {
        while strings.peek().is_some_and(|&(_, end)| end <= at) {
            strings.next();
        }
        if strings.peek().is_some_and(|&(start, _)| start < at) {
            return true;
        }
    }
    false
}

/// How a redaction marker (`[REDACTED:<rule id>]`) starts.
const MARKER_START: &str = "[REDACTED:";

/// Shortest line or value a joined match may cover whole (see `Buffer::interior_ok`).
const MIN_INTERIOR: usize = 16;

/// Bytes looked at each way for the extent of a base64 run holding a
/// secret (what redaction replaces).
const BASE64_RUN_LIMIT: usize = 64 * 1024;

/// Shortest literal prefix worth prefiltering on.
const MIN_LITERAL: usize = 3;

/// The literal prefixes every match of `pattern` starts with, when there
/// is a small set of them, each at least `MIN_LITERAL` bytes long.
fn prefix_literals(pattern: &str) -> Option<Vec<Vec<u8>>> {
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let usable = |seq: &regex_syntax::hir::literal::Seq| {
        let lits = seq.literals()?;
        (!lits.is_empty()
            && lits.len() <= MAX_PREFIXES
            && lits.iter().all(|l| l.as_bytes().len() >= MIN_LITERAL))
        .then(|| lits.iter().map(|l| l.as_bytes().to_vec()).collect())
    };
    // The extractor's own trimming favours a few short literals, which suits
    // a single regex's prefilter but not ours: it turns AKIA|ASIA|… into "A"
    // and gh[pousr]_ into "gh". Trim only when the raw set is unusable.
    usable(&seq).or_else(|| {
        let mut seq = seq;
        seq.optimize_for_prefix_by_preference();
        usable(&seq)
    })
}

/// Most literal prefixes taken from one rule (the shared search stays fast
/// up to a few dozen literals in all).
const MAX_PREFIXES: usize = 16;

impl Scanner {
    /// Compiles a policy: `detect_patterns` (rule ids `detect-pattern-N`),
    /// the built-in pack when `builtin_rules` is on, and `blocked_terms`.
    pub fn new(cfg: &DlpFilter) -> Result<Scanner, DlpError> {
        let pack: Vec<&BuiltinRule> = if cfg.builtin_rules {
            builtin_rules().iter().collect()
        } else {
            Vec::new()
        };
        Scanner::with_pack(cfg, &pack)
    }

    /// As [`Scanner::new`] with `pack` in place of the whole built-in pack
    /// (whatever `builtin_rules` says). For benchmarks that compare packs.
    #[doc(hidden)]
    pub fn with_pack(cfg: &DlpFilter, pack: &[&BuiltinRule]) -> Result<Scanner, DlpError> {
        let mut sources: Vec<RuleSource<'_>> = cfg
            .detect_patterns
            .iter()
            .enumerate()
            .map(|(i, p)| RuleSource {
                id: format!("detect-pattern-{i}"),
                pattern: p,
                every_alignment: true,
                given: &[],
                back: 0,
                folded: false,
            })
            .collect();
        sources.extend(pack.iter().map(|r| RuleSource {
            id: r.id.to_string(),
            pattern: r.regex,
            every_alignment: r.base64_every_alignment,
            given: r.literals,
            back: r.literal_offset,
            folded: r.folded_literals(),
        }));
        let mut rules = Vec::new();
        let mut lits = Vec::new();
        let mut b64_lits = Vec::new();
        let mut fallback = Vec::new();
        let mut base64_min_run = usize::MAX;
        let mut words: Vec<(Vec<u8>, usize)> = Vec::new();
        for (idx, src) in sources.into_iter().enumerate() {
            let RuleSource {
                id,
                pattern,
                every_alignment,
                given,
                back,
                folded,
            } = src;
            let regex = meta::Regex::new(pattern).map_err(|e| DlpError::Pattern {
                id: id.clone(),
                reason: e.to_string(),
            })?;
            let literals = if given.is_empty() {
                prefix_literals(pattern)
            } else {
                Some(given.iter().map(|l| l.as_bytes().to_vec()).collect())
            };
            let hir = regex_syntax::Parser::new().parse(pattern).ok();
            let line_bound = hir.as_ref().is_some_and(line_bound);
            // The encoding of n bytes holds at least 4n/3 - 2 whole base64
            // characters, whatever its alignment.
            let min_len = hir.as_ref().and_then(|h| h.properties().minimum_len());
            let need = min_len.map_or(b64::MIN_RUN, |n| {
                (4 * n / 3).saturating_sub(2).max(b64::MIN_RUN)
            });
            // Rules whose encoded matches can be short are searched for in
            // all the text (few: Slack's); the others only inside runs long
            // enough, which the run search finds fastest when that is long.
            let long = need >= b64::LONG_RUN;
            match literals {
                Some(ls) => {
                    for l in ls {
                        for (spelled, at) in b64::spellings(&l) {
                            // "Group start" is the key's: a literal `back`
                            // bytes into the key sits at alignment back % 3.
                            if every_alignment || at.byte_offset == back % 3 {
                                let lit = (spelled, Lit::Base64(idx, at));
                                if long {
                                    b64_lits.push(lit);
                                } else {
                                    // Encoded matches that may be shorter
                                    // than `b64::LONG_RUN` (few: Slack's)
                                    // are searched for in all the text, in
                                    // the plain pass (one search fewer).
                                    lits.push(lit);
                                }
                            }
                        }
                        if folded {
                            // A context word: found in any case by the
                            // case-folded pass the blocked terms use (see
                            // `terms`), which keeps the exact-case pass
                            // within the packed searcher's fast form.
                            let word = l.to_ascii_lowercase();
                            if !words.iter().any(|(w, r)| *w == word && *r == idx) {
                                words.push((word, idx));
                            }
                        } else {
                            lits.push((l, Lit::Plain(idx)));
                        }
                    }
                    if long {
                        base64_min_run = base64_min_run.min(need);
                    }
                }
                None => fallback.push(idx),
            }
            rules.push((
                Rule {
                    id,
                    regex,
                    line_bound,
                    back,
                },
                pattern,
            ));
        }
        // Past the packed searcher's limit (64 literals) the pass gets several
        // times slower: then only keys at the start of encoded data are found.
        let (base64_prefilter, base64_group_starts_only) = match LiteralSet::with_heads(
            b64_lits.clone(),
            b64::HEAD,
        ) {
            Some(set) if !set.is_packed() => {
                b64_lits
                        .retain(|(_, l)| matches!(l, Lit::Base64(i, at) if at.byte_offset == rules[*i].0.back % 3));
                (LiteralSet::with_heads(b64_lits, b64::HEAD), true)
            }
            set => (set, false),
        };
        let fallback_set = if fallback.is_empty() {
            None
        } else {
            let pats = fallback.iter().map(|&i| rules[i].1);
            Some(
                regex::bytes::RegexSet::new(pats).map_err(|e| DlpError::Pattern {
                    id: "detect-patterns".into(),
                    reason: e.to_string(),
                })?,
            )
        };
        let terms = terms::Terms::new(
            &cfg.blocked_terms,
            cfg.fuzzy_matching,
            cfg.max_distance,
            words,
        )?;
        Ok(Scanner {
            rules: rules.into_iter().map(|(r, _)| r).collect(),
            prefilter: LiteralSet::new(lits),
            base64_prefilter,
            base64_group_starts_only,
            base64_min_run,
            fallback,
            fallback_set,
            terms,
            action: cfg.action,
            limits: DecodeLimits::default(),
        })
    }

    /// Replaces the decompression caps.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Scanner {
        self.limits = limits;
        self
    }

    /// The policy's `action`.
    pub fn action(&self) -> DlpAction {
        self.action
    }

    /// About how many bytes checking a `body_len`-byte body with this
    /// `Content-Encoding` may allocate beyond the body itself, known before
    /// any is allocated: the caller counts them against its memory budget.
    ///
    /// Counted: the decoded copy of an encoded body (each copy at most
    /// [`DecodeLimits::max_decoded_bytes`], or [`DecodeLimits::max_ratio`]
    /// times `body_len` past the ratio floor: the decoder never grows its
    /// buffer beyond that), the joined view (at most the decoded size),
    /// and with `action: redact` the rewritten body. So an identity body
    /// needs `body_len` more (twice with redact), an encoded one two decoded
    /// copies (three with redact): undoing two codings holds two copies at
    /// once, scanning holds the copy and the joined view. Per-string
    /// bookkeeping is not counted (small next to the text for chat bodies),
    /// nor the extra decoded copy made of a non-JSON body that holds JSON
    /// escapes.
    pub fn working_bytes(&self, body_len: usize, content_encoding: Option<&str>) -> usize {
        let copies = match self.action {
            DlpAction::Redact => 3,
            DlpAction::Block | DlpAction::Audit => 2,
        };
        if decode::coding_layers(content_encoding) == 0 {
            // The body is scanned in place: the joined view (and the
            // rewritten body) only.
            body_len.saturating_mul(copies - 1)
        } else {
            decode::decoded_cap(body_len, &self.limits).saturating_mul(copies)
        }
    }

    /// Scans a request. Errors only when the body cannot be decoded within
    /// the caps (see [`DlpError::http_status`]).
    pub fn scan(&self, req: &RequestView<'_>) -> Result<Scan, DlpError> {
        let body = decode::decompress(req.body, req.content_encoding, &self.limits)?;
        let (url, url_map) = decode::percent_decode(req.path_and_query);
        let mut escapes = scratch::take(&scratch::OFFSETS);
        let a = self.analyse(req, &body, &url, &mut escapes, true);
        scratch::give(&scratch::OFFSETS, escapes);
        let findings = self.findings(&a, &body, &url_map, req);
        Ok(Scan {
            findings,
            body_kind: a.body_kind,
            decoded_len: body.len(),
        })
    }

    /// The part of [`Scanner::scan`] that runs no rule: undoing
    /// `Content-Encoding`, the JSON walk, the joined view. Returns how many
    /// texts there are. For `cargo xtask bench dlp`'s breakdown only.
    #[doc(hidden)]
    pub fn decode_only(&self, req: &RequestView<'_>) -> Result<usize, DlpError> {
        let body = decode::decompress(req.body, req.content_encoding, &self.limits)?;
        let (url, _) = decode::percent_decode(req.path_and_query);
        let mut escapes = scratch::take(&scratch::OFFSETS);
        let a = self.analyse(req, &body, &url, &mut escapes, false);
        scratch::give(&scratch::OFFSETS, escapes);
        Ok(a.sources.len())
    }

    /// Scans a request and returns it with every match replaced by
    /// `[REDACTED:<rule_id>]` (for `action: redact`); see [`Redacted`] for
    /// what changes and what the caller must do about `Content-Encoding`.
    pub fn redact(&self, req: &RequestView<'_>) -> Result<Redacted, DlpError> {
        let body = decode::decompress(req.body, req.content_encoding, &self.limits)?;
        let (url, url_map) = decode::percent_decode(req.path_and_query);
        let mut escapes = scratch::take(&scratch::OFFSETS);
        let a = self.analyse(req, &body, &url, &mut escapes, true);
        scratch::give(&scratch::OFFSETS, escapes);
        let findings = self.findings(&a, &body, &url_map, req);

        // Ranges to replace, per source, in that source's coordinates.
        let mut edits: Vec<Vec<(usize, usize, &str)>> = vec![Vec::new(); a.sources.len()];
        for hit in &a.hits {
            let id = self.id(hit.rule);
            for s in &hit.spans {
                let (src, start, end) = a.raw_span(s);
                edits[src].push((start, end, id));
            }
        }
        let mut out = Redacted {
            findings,
            body: None,
            path_and_query: None,
            headers: Vec::new(),
        };
        let mut json_splices: Vec<(std::ops::Range<usize>, Vec<u8>)> = Vec::new();
        for (i, src) in a.sources.iter().enumerate() {
            if edits[i].is_empty() {
                continue;
            }
            let ranges = merge(std::mem::take(&mut edits[i]));
            match src.origin {
                Origin::Json {
                    raw_start, raw_end, ..
                } => {
                    let text = apply(src.text(), &ranges, |id| format!("[REDACTED:{id}]"));
                    let quoted = serde_json::to_string(&String::from_utf8_lossy(&text))
                        .unwrap_or_else(|_| "\"\"".to_string());
                    json_splices.push((raw_start..raw_end, quoted.into_bytes()));
                }
                Origin::Text => {
                    out.body = Some(apply(src.text(), &ranges, |id| format!("[REDACTED:{id}]")));
                }
                // Its edits were moved to the text body (see `raw_span`).
                Origin::TextDecoded => {}
                Origin::Url => {
                    let raw: Vec<(usize, usize, &str)> = ranges
                        .iter()
                        .map(|&(s, e, id)| {
                            (
                                decode::url_offset(&url_map, s),
                                decode::url_offset(&url_map, e),
                                id,
                            )
                        })
                        .collect();
                    let new = apply(req.path_and_query.as_bytes(), &raw, |id| {
                        percent_encode(&format!("[REDACTED:{id}]"))
                    });
                    out.path_and_query = Some(String::from_utf8_lossy(&new).into_owned());
                }
                Origin::Header(h) => {
                    out.headers.push((
                        h,
                        apply(src.text(), &ranges, |id| format!("[REDACTED:{id}]")),
                    ));
                }
            }
        }
        if !json_splices.is_empty() {
            json_splices.sort_by_key(|(r, _)| r.start);
            let mut new = Vec::with_capacity(body.len());
            let mut at = 0;
            for (r, bytes) in json_splices {
                new.extend_from_slice(&body[at..r.start]);
                new.extend_from_slice(&bytes);
                at = r.end;
            }
            new.extend_from_slice(&body[at..]);
            out.body = Some(new);
        }
        Ok(out)
    }

    fn id(&self, r: RuleRef) -> &str {
        match r {
            RuleRef::Pattern(i) => &self.rules[i].id,
            RuleRef::Term(i) => self.terms.id(i),
        }
    }

    /// Collects the texts and, with `rules`, runs every rule over them.
    fn analyse<'b>(
        &self,
        req: &RequestView<'b>,
        body: &'b [u8],
        url: &'b [u8],
        escapes: &mut Vec<usize>,
        rules: bool,
    ) -> Analysis<'b> {
        // Room for a typical chat body's strings without regrowing.
        let mut sources: Vec<Source<'b>> = Vec::with_capacity(32);
        let mut body_kind = BodyKind::Empty;
        let mut text_map = Vec::new();
        let mut joined = Buffer::new(true);
        if !body.is_empty() {
            joined.data.reserve(body.len());
            let json = decode::json_strings(body, escapes, |s, esc| {
                let src = Source {
                    origin: Origin::Json {
                        raw_start: s.raw.start,
                        raw_end: s.raw.end,
                        is_key: s.is_key,
                    },
                    joinable: !s.is_key && !s.structural,
                    raw: &body[s.raw.start + 1..s.raw.end - 1],
                    escaped: s.escaped,
                    json_start: Some(s.raw.start + 1),
                    decoded: OnceCell::new(),
                };
                if src.joinable {
                    joined.append(sources.len(), &src, body, esc);
                }
                sources.push(src);
            });
            if json.is_some() && !raw_break_in_string(body, &sources) {
                body_kind = BodyKind::Json;
            } else {
                body_kind = BodyKind::Text;
                sources.clear();
                joined.clear();
                let src = Source::plain(Origin::Text, true, body);
                joined.append(0, &src, body, &[]);
                sources.push(src);
                // JSON escapes in a body that is not one JSON document (a
                // lenient parser may still read it): `\u0073k-…` is `sk-…`
                // there, so the text is also scanned with them decoded.
                if let Some((decoded, map)) = decode::json_escapes(body) {
                    let src = Source {
                        origin: Origin::TextDecoded,
                        joinable: false,
                        raw: body,
                        escaped: true,
                        json_start: None,
                        decoded: OnceCell::from(decoded),
                    };
                    sources.push(src);
                    text_map = map;
                }
            }
        }
        if !url.is_empty() {
            sources.push(Source::plain(Origin::Url, false, url));
        }
        for (i, (name, value)) in req.headers.iter().enumerate() {
            if crate::provider::is_credential_header(name) {
                continue;
            }
            sources.push(Source::plain(Origin::Header(i), false, value));
        }
        let others = Buffer::separate(&sources);
        let mut hits = Vec::new();
        if rules {
            self.scan_buffer(&joined, &sources, &mut hits);
            self.scan_buffer(&others, &sources, &mut hits);
        }
        // Document order: body strings, then the URL, then headers.
        hits.sort_by_key(|h| h.spans.first().map(|s| (s.src, s.start)));
        Analysis {
            sources,
            hits,
            body_kind,
            text_map,
        }
    }

    /// Checks rule `r` at prefilter candidate `p` of `buf`.
    fn rule_hit(
        &self,
        buf: &Buffer,
        sources: &[Source<'_>],
        r: usize,
        p: usize,
        last_end: &mut [usize],
        hits: &mut Vec<Hit>,
    ) {
        let data = &buf.data[..];
        let Some(pc) = buf.piece_at(p) else {
            return;
        };
        let rule = &self.rules[r];
        let src = &sources[pc.src];
        let off = pc.src_off + (p - pc.at);
        let piece_end = pc.at + pc.len;
        let joined_hit = |m: &regex_automata::Match| Hit {
            rule: RuleRef::Pattern(r),
            spans: buf.spans(m.start(), m.end()),
        };
        let value_hit = |m: &regex_automata::Match| Hit {
            rule: RuleRef::Pattern(r),
            spans: vec![Span {
                src: pc.src,
                start: m.start(),
                end: m.end(),
            }],
        };
        if buf.spanning && rule.line_bound {
            // One search on the no-match path: with no look-around and
            // no line breaks in the rule, no joined match means no
            // match in the value either.
            let Some(m) = anchored(&rule.regex, data, p) else {
                return;
            };
            if m.end() <= piece_end {
                last_end[r] = m.end();
                hits.push(joined_hit(&m));
                return;
            }
            let vm = anchored(&rule.regex, src.text(), off);
            match vm {
                Some(v) if v.end() < pc.src_off + pc.len || !buf.interior_ok(&m) => {
                    last_end[r] = p + v.len();
                    hits.push(value_hit(&v));
                }
                None if !buf.interior_ok(&m) => {}
                _ => {
                    last_end[r] = m.end();
                    hits.push(joined_hit(&m));
                }
            }
            return;
        }
        // The value itself first: reported at the value, with its own context.
        let value_match = anchored(&rule.regex, src.text(), off);
        // A match that runs to the end of its line or value may go on
        // in the next one: then the joined view decides.
        let try_joined = buf.spanning
            && value_match
                .as_ref()
                .is_none_or(|m| m.end() == pc.src_off + pc.len);
        if try_joined
            && let Some(m) = anchored(&rule.regex, data, p)
            && (value_match.is_none() || m.end() > piece_end)
            && buf.interior_ok(&m)
        {
            last_end[r] = m.end();
            hits.push(joined_hit(&m));
            return;
        }
        if let Some(m) = value_match {
            last_end[r] = p + (m.end() - m.start()).min(piece_end - p);
            hits.push(value_hit(&m));
        }
    }

    /// Checks rule `r` at a base64 spelling of its prefix at `p` of `buf`:
    /// decodes a window there and runs the rule over it. A match reports
    /// the whole base64 run (it is the secret's container).
    fn base64_hit(
        &self,
        buf: &Buffer,
        r: usize,
        p: usize,
        at: b64::Spelling,
        last_end: &mut [usize],
        hits: &mut Vec<Hit>,
    ) {
        let data = &buf.data[..];
        let Some(pc) = buf.piece_at(p) else {
            return;
        };
        // A literal that sits `back` bytes into its match: decode from
        // enough whole groups earlier to hold them.
        let back = self.rules[r].back;
        let groups = back.saturating_sub(at.byte_offset).div_ceil(3);
        let at = b64::Spelling {
            group_back: at.group_back + 4 * groups,
            byte_offset: at.byte_offset + 3 * groups,
        };
        let from = at.byte_offset - back;
        // The line first (a value at a line end must not run on into the
        // next line's words); across lines only in the joined view, for
        // base64 wrapped over several lines.
        let line = &data[..pc.at + pc.len];
        let mut found = None;
        for hay in [line, data] {
            if let Some((_, decoded)) = b64::decode_at(hay, p, at)
                && anchored(&self.rules[r].regex, &decoded, from).is_some()
            {
                found = Some(hay.len());
                break;
            }
            if !buf.spanning {
                return;
            }
        }
        let Some(hay_len) = found else {
            return;
        };
        let (start, end) = b64::run_around(&data[..hay_len], p, BASE64_RUN_LIMIT);
        let spans = buf.spans(start, end);
        if spans.is_empty() || spans.len() > 1 && !buf.spanning {
            return;
        }
        last_end[r] = end;
        hits.push(Hit {
            rule: RuleRef::Pattern(r),
            spans,
        });
    }

    /// Runs every rule and term over one buffer.
    fn scan_buffer(&self, buf: &Buffer, sources: &[Source<'_>], hits: &mut Vec<Hit>) {
        let data = &buf.data[..];
        if data.is_empty() {
            return;
        }
        for (pass, pre) in [&self.prefilter, &self.base64_prefilter]
            .into_iter()
            .enumerate()
        {
            let Some(pre) = pre else {
                continue;
            };
            // Per rule: where its last match in this pass ended, so a hit
            // inside it is not re-reported (allocated on the first candidate).
            let mut last_end: Vec<usize> = Vec::new();
            let mut on_hit = |&lit: &Lit, p: usize| {
                if last_end.is_empty() {
                    last_end.resize(self.rules.len(), 0);
                }
                match lit {
                    Lit::Plain(rule) => {
                        let Some(start) = p.checked_sub(self.rules[rule].back) else {
                            return;
                        };
                        if start >= last_end[rule] {
                            self.rule_hit(buf, sources, rule, start, &mut last_end, hits);
                        }
                    }
                    Lit::Base64(rule, at) if p >= last_end[rule] => {
                        self.base64_hit(buf, rule, p, at, &mut last_end, hits);
                    }
                    _ => {}
                }
            };
            if pass == 1 {
                // Base64 spellings only inside base64 runs long enough to
                // hold an encoded match: on prose and code there are next
                // to none, so the (large) spelling search rarely runs.
                b64::long_runs(data, self.base64_min_run, |s, e| {
                    pre.for_each_in(data, s, e, &mut on_hit);
                });
            } else {
                pre.for_each(data, data.len(), &mut on_hit);
            }
        }
        if let Some(set) = &self.fallback_set {
            for set_idx in &set.matches(data) {
                let r = self.fallback[set_idx];
                for m in self.rules[r].regex.find_iter(data) {
                    let spans = buf.spans(m.start(), m.end());
                    if spans.len() > 1 && !(buf.spanning && buf.interior_ok(&m)) || spans.is_empty()
                    {
                        continue;
                    }
                    hits.push(Hit {
                        rule: RuleRef::Pattern(r),
                        spans,
                    });
                }
            }
        }
        if self.terms.is_empty() {
            return;
        }
        let mut term_hits = Vec::new();
        let mut words = Vec::new();
        self.terms
            .scan(data, &buf.bounds, &mut term_hits, &mut words);
        if !words.is_empty() {
            let mut last_end = vec![0; self.rules.len()];
            for w in words {
                // A context word that is the rule id in one of kt's own
                // redaction markers (`[REDACTED:mistral-api-key]`) is not
                // context: else redacting a key could turn a nearby token
                // into a new match. (No new way around the rule: without
                // its word, a bare key is not flagged anyway.)
                if data[..w.at].ends_with(MARKER_START.as_bytes()) {
                    continue;
                }
                if let Some(start) = w.at.checked_sub(self.rules[w.rule].back)
                    && start >= last_end[w.rule]
                {
                    self.rule_hit(buf, sources, w.rule, start, &mut last_end, hits);
                }
            }
        }
        for t in term_hits {
            let spans = buf.spans(t.start, t.end);
            if spans.len() > 1 && !buf.spanning || spans.is_empty() {
                continue;
            }
            hits.push(Hit {
                rule: RuleRef::Term(t.term),
                spans,
            });
        }
    }

    /// Turns hits into public findings (paths resolved, deduplicated).
    fn findings(
        &self,
        a: &Analysis<'_>,
        body: &[u8],
        url_map: &[usize],
        req: &RequestView<'_>,
    ) -> Vec<Finding> {
        let json_starts = |hit: &Hit| -> Vec<usize> {
            hit.spans
                .iter()
                .filter_map(|s| match a.sources[s.src].origin {
                    Origin::Json { raw_start, .. } => Some(raw_start),
                    _ => None,
                })
                .collect()
        };
        // Object keys holding a match are never spelled out in a path.
        let masked: Vec<usize> = a
            .hits
            .iter()
            .flat_map(|h| h.spans.iter())
            .filter_map(|s| match a.sources[s.src].origin {
                Origin::Json {
                    raw_start,
                    is_key: true,
                    ..
                } => Some(raw_start),
                _ => None,
            })
            .collect();
        let mut wanted: Vec<usize> = a.hits.iter().flat_map(json_starts).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let paths = if wanted.is_empty() {
            Default::default()
        } else {
            decode::json_paths(body, &wanted, &masked)
        };
        let path = |start: usize| {
            paths
                .get(&start)
                .cloned()
                .unwrap_or_else(|| "$".to_string())
        };

        let mut seen: HashSet<u64> = HashSet::new();
        let mut out: Vec<Finding> = Vec::new();
        for hit in &a.hits {
            let (Some(first), Some(last)) = (hit.spans.first(), hit.spans.last()) else {
                continue;
            };
            let location = match a.sources[first.src].origin {
                Origin::Json { raw_start, .. } => {
                    let mut p = path(raw_start);
                    if let Origin::Json {
                        raw_start: end_start,
                        ..
                    } = a.sources[last.src].origin
                        && end_start != raw_start
                    {
                        p.push_str(" + ");
                        p.push_str(&path(end_start));
                    }
                    Location::Body {
                        json_path: Some(p),
                        start: first.start,
                        end: last.end,
                    }
                }
                Origin::Text => Location::Body {
                    json_path: None,
                    start: first.start,
                    end: last.end,
                },
                Origin::TextDecoded => {
                    let (_, start, _) = a.raw_span(first);
                    let (_, _, end) = a.raw_span(last);
                    Location::Body {
                        json_path: None,
                        start,
                        end,
                    }
                }
                Origin::Url => Location::Url {
                    start: decode::url_offset(url_map, first.start),
                    end: decode::url_offset(url_map, last.end),
                },
                Origin::Header(h) => Location::Header {
                    name: req.headers[h].0.to_string(),
                },
            };
            // Deduplicate: by comparison while there are few findings (the
            // usual case: no hashing, no set), then on a hash of (rule,
            // location) confirmed against the findings only when the hash was
            // seen, so a body with thousands of findings is not quadratic.
            let rule_id = self.id(hit.rule);
            let same = |f: &Finding| f.rule_id == rule_id && f.location == location;
            let dup = if out.len() < FEW_FINDINGS {
                out.iter().any(same)
            } else {
                if seen.is_empty() {
                    seen.extend(out.iter().map(|f| finding_hash(&f.rule_id, &f.location)));
                }
                !seen.insert(finding_hash(rule_id, &location)) && out.iter().any(same)
            };
            if !dup {
                out.push(Finding {
                    rule_id: rule_id.to_string(),
                    location,
                });
            }
        }
        out
    }
}

/// Findings deduplicated by plain comparison, before a hash set is used.
const FEW_FINDINGS: usize = 16;

fn finding_hash(rule_id: &str, location: &Location) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (rule_id, location).hash(&mut h);
    h.finish()
}

/// Whether a regex has no look-around assertions and can match neither `\r`
/// nor `\n`: then its matches never depend on what follows a line break.
fn line_bound(h: &regex_syntax::hir::Hir) -> bool {
    use regex_syntax::hir::{Class, HirKind};
    let breaks = |lo: u32, hi: u32| (lo..=hi).contains(&10) || (lo..=hi).contains(&13);
    match h.kind() {
        HirKind::Empty => true,
        HirKind::Literal(l) => !l.0.iter().any(|b| *b == b'\n' || *b == b'\r'),
        HirKind::Class(Class::Unicode(c)) => !c
            .ranges()
            .iter()
            .any(|r| breaks(r.start() as u32, r.end() as u32)),
        HirKind::Class(Class::Bytes(c)) => !c
            .ranges()
            .iter()
            .any(|r| breaks(u32::from(r.start()), u32::from(r.end()))),
        HirKind::Look(_) => false,
        HirKind::Repetition(r) => line_bound(&r.sub),
        HirKind::Capture(c) => line_bound(&c.sub),
        HirKind::Concat(v) | HirKind::Alternation(v) => v.iter().all(line_bound),
    }
}

/// An anchored search for `re` starting exactly at `at`.
fn anchored(re: &meta::Regex, hay: &[u8], at: usize) -> Option<regex_automata::Match> {
    re.search(&Input::new(hay).range(at..).anchored(Anchored::Yes))
}

/// Sorts ranges and merges overlapping ones (the first rule names the merge).
fn merge(mut ranges: Vec<(usize, usize, &str)>) -> Vec<(usize, usize, &str)> {
    ranges.sort_by_key(|r| (r.0, std::cmp::Reverse(r.1)));
    let mut out: Vec<(usize, usize, &str)> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.0 < last.1 => last.1 = last.1.max(r.1),
            _ => out.push(r),
        }
    }
    out
}

/// Copies `text` with each (sorted, disjoint) range replaced by `marker(rule_id)`.
fn apply(text: &[u8], ranges: &[(usize, usize, &str)], marker: impl Fn(&str) -> String) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    for &(s, e, id) in ranges {
        out.extend_from_slice(&text[at..s]);
        out.extend_from_slice(marker(id).as_bytes());
        at = e;
    }
    out.extend_from_slice(&text[at..]);
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a scanned text came from.
#[derive(Clone, Copy)]
enum Origin {
    /// A string of a JSON body: its token's byte range in the body.
    Json {
        raw_start: usize,
        raw_end: usize,
        is_key: bool,
    },
    /// A non-JSON body.
    Text,
    /// The same body with JSON escapes decoded (offsets map back through
    /// `Analysis::text_map`).
    TextDecoded,
    /// The percent-decoded URL.
    Url,
    /// A header value (index into the request's headers).
    Header(usize),
}

/// One text the rules run over.
struct Source<'a> {
    origin: Origin,
    /// Part of the joined view (see the module docs).
    joinable: bool,
    /// The text as it sits in the request (for a JSON string: between the quotes).
    raw: &'a [u8],
    /// A JSON string with escapes: `raw` must be decoded to get the value.
    escaped: bool,
    /// For a JSON string: where `raw` starts in the body.
    json_start: Option<usize>,
    /// The decoded value, made on first use (only where a rule may match).
    decoded: OnceCell<Vec<u8>>,
}

impl<'a> Source<'a> {
    fn plain(origin: Origin, joinable: bool, raw: &'a [u8]) -> Source<'a> {
        Source {
            origin,
            joinable,
            raw,
            escaped: false,
            json_start: None,
            decoded: OnceCell::new(),
        }
    }

    /// The value the rules see (unescaped).
    fn text(&self) -> &[u8] {
        if !self.escaped {
            return self.raw;
        }
        self.decoded
            .get_or_init(|| decode::string_value(self.raw, true).into_owned())
    }
}

thread_local! {
    static PIECES: std::cell::RefCell<Vec<Vec<Piece>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A part of a buffer copied from one source.
struct Piece {
    /// Offset in the buffer.
    at: usize,
    /// Index of the source.
    src: usize,
    /// Offset in the source.
    src_off: usize,
    len: usize,
}

/// Matched bytes of one source.
struct Span {
    src: usize,
    start: usize,
    end: usize,
}

/// A rule that matched, before it becomes a [`Finding`].
struct Hit {
    rule: RuleRef,
    spans: Vec<Span>,
}

/// Everything found in one request.
struct Analysis<'a> {
    sources: Vec<Source<'a>>,
    hits: Vec<Hit>,
    body_kind: BodyKind,
    /// For the `TextDecoded` source: the body offset of each decoded byte
    /// (and one past the end).
    text_map: Vec<usize>,
}

impl Analysis<'_> {
    /// A span in its own source's coordinates, or, for the decoded text
    /// view, in the text body's (source 0).
    fn raw_span(&self, s: &Span) -> (usize, usize, usize) {
        match self.sources[s.src].origin {
            Origin::TextDecoded => {
                let at = |i: usize| self.text_map.get(i).copied().unwrap_or(i);
                (0, at(s.start), at(s.end))
            }
            _ => (s.src, s.start, s.end),
        }
    }
}

/// Sources laid out in one buffer so a single prefilter pass covers them.
struct Buffer {
    data: Vec<u8>,
    pieces: Vec<Piece>,
    /// Offsets where a piece starts right after another (a join).
    bounds: Vec<usize>,
    /// Matches may span pieces (the joined view); otherwise pieces are
    /// separated by a newline and a match across them is dropped.
    spanning: bool,
    /// The piece `piece_at` found last: candidates come in order of
    /// position, so the next one is usually at or just after it.
    hint: std::cell::Cell<usize>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        scratch::give(&scratch::BYTES, std::mem::take(&mut self.data));
        scratch::give(&PIECES, std::mem::take(&mut self.pieces));
        scratch::give(&scratch::OFFSETS, std::mem::take(&mut self.bounds));
    }
}

impl Buffer {
    /// An empty buffer on reused allocations.
    fn new(spanning: bool) -> Buffer {
        Buffer {
            data: scratch::take(&scratch::BYTES),
            pieces: scratch::take(&PIECES),
            bounds: scratch::take(&scratch::OFFSETS),
            spanning,
            hint: std::cell::Cell::new(0),
        }
    }

    /// Empties the buffer, keeping its allocations.
    fn clear(&mut self) {
        self.data.clear();
        self.pieces.clear();
        self.bounds.clear();
    }

    /// Appends source `i` to the joined view: decoded, line breaks removed
    /// (each line becomes a piece). `escapes` are the body offsets of the
    /// backslashes of a JSON string source.
    fn append(&mut self, i: usize, s: &Source<'_>, body: &[u8], escapes: &[usize]) {
        // (buffer offset, source offset) where the open piece started.
        let mut open: Option<(usize, usize)> = None;
        match s.json_start {
            Some(start) if s.escaped => {
                self.append_json(i, body, start..start + s.raw.len(), escapes);
                return;
            }
            // Valid JSON strings hold no raw line breaks: copy in one go.
            Some(_) => self.push_bytes(&mut open, 0, s.raw),
            None => {
                let mut src_off = 0;
                decode::segments(s.raw, false, |seg| match seg {
                    Segment::Bytes(bytes) => {
                        self.push_bytes(&mut open, src_off, bytes);
                        src_off += bytes.len();
                    }
                    Segment::Break(_) => {
                        self.close_piece(i, &mut open);
                        src_off += 1;
                    }
                });
            }
        }
        self.close_piece(i, &mut open);
    }

    /// [`Buffer::append`] for a JSON string with escapes (`inner`: between
    /// its quotes; `escapes`: the body offsets of its backslashes, from
    /// the walk, so nothing is searched again). The common escapes (line
    /// breaks, quotes, backslashes) are handled inline: a chat body has one
    /// every line or so, which makes this the no-match path's hottest loop.
    fn append_json(
        &mut self,
        i: usize,
        body: &[u8],
        inner: std::ops::Range<usize>,
        escapes: &[usize],
    ) {
        let mut open: Option<(usize, usize)> = None;
        let mut src_off = 0;
        let mut r = inner.start;
        for &e in escapes {
            if e < r {
                continue; // the low half of a surrogate pair, already decoded
            }
            if e > r {
                self.push_bytes(&mut open, src_off, &body[r..e]);
                src_off += e - r;
            }
            match body.get(e + 1) {
                Some(b'n' | b'r') => {
                    self.close_piece(i, &mut open);
                    src_off += 1;
                    r = (e + 2).min(inner.end);
                }
                Some(&c @ (b'"' | b'\\' | b'/')) => {
                    self.push_bytes(&mut open, src_off, &[c]);
                    src_off += 1;
                    r = (e + 2).min(inner.end);
                }
                _ => match decode::unescape_one(body, e + 1) {
                    Some((next, bytes, len)) => {
                        let decoded = &bytes[..len];
                        if matches!(decoded, [b'\n' | b'\r']) {
                            self.close_piece(i, &mut open);
                        } else {
                            self.push_bytes(&mut open, src_off, decoded);
                        }
                        src_off += len;
                        r = next.min(inner.end);
                    }
                    None => {
                        let end = (e + 2).min(inner.end);
                        self.push_bytes(&mut open, src_off, &body[e..end]);
                        src_off += end - e;
                        r = end;
                    }
                },
            }
        }
        if inner.end > r {
            self.push_bytes(&mut open, src_off, &body[r..inner.end]);
        }
        self.close_piece(i, &mut open);
    }

    /// Appends decoded bytes of the source being appended, opening a piece
    /// (at source offset `src_off`) when none is open.
    fn push_bytes(&mut self, open: &mut Option<(usize, usize)>, src_off: usize, b: &[u8]) {
        if open.is_none() {
            if !self.data.is_empty() {
                self.bounds.push(self.data.len());
            }
            *open = Some((self.data.len(), src_off));
        }
        self.data.extend_from_slice(b);
    }

    /// Ends the open piece of source `i`, if any.
    fn close_piece(&mut self, i: usize, open: &mut Option<(usize, usize)>) {
        if let Some((at, src_off)) = open.take() {
            self.pieces.push(Piece {
                at,
                src: i,
                src_off,
                len: self.data.len() - at,
            });
        }
    }

    /// Everything else, one piece per source, newline-separated.
    fn separate(sources: &[Source<'_>]) -> Buffer {
        let mut b = Buffer::new(false);
        for (i, s) in sources.iter().enumerate().filter(|(_, s)| !s.joinable) {
            let text = s.text();
            if text.is_empty() {
                continue;
            }
            b.pieces.push(Piece {
                at: b.data.len(),
                src: i,
                src_off: 0,
                len: text.len(),
            });
            b.data.extend_from_slice(text);
            b.data.push(b'\n');
        }
        b
    }

    /// Whether a match across pieces is plausible as one split secret: every
    /// line it covers whole inside one value (not the first or last piece it
    /// touches, and not a piece at the edge of a value) must be at least
    /// `MIN_INTERIOR` bytes. Otherwise it is more likely short words on
    /// separate lines glued together ("sk-" / "the" / "model" / …).
    fn interior_ok(&self, m: &regex_automata::Match) -> bool {
        let first = self
            .pieces
            .partition_point(|pc| pc.at + pc.len <= m.start());
        let last = self.pieces.partition_point(|pc| pc.at < m.end());
        (first + 1..last.saturating_sub(1)).all(|i| {
            let pc = &self.pieces[i];
            pc.len >= MIN_INTERIOR
                || self.pieces[i - 1].src != pc.src
                || self.pieces[i + 1].src != pc.src
        })
    }

    /// The piece holding buffer offset `p`, if any.
    fn piece_at(&self, p: usize) -> Option<&Piece> {
        // Gallop forward from the last piece found (a megabyte body has
        // tens of thousands of pieces: a search over all of them per
        // candidate missed the cache at every step), else search them all.
        let pieces = &self.pieces[..];
        let h = self.hint.get();
        let i = if pieces.get(h).is_some_and(|pc| pc.at <= p) {
            let mut step = 1;
            let mut lo = h;
            while pieces.get(lo + step).is_some_and(|pc| pc.at <= p) {
                lo += step;
                step *= 2;
            }
            let hi = (lo + step).min(pieces.len());
            lo + pieces[lo..hi].partition_point(|pc| pc.at <= p) - 1
        } else {
            pieces.partition_point(|pc| pc.at <= p).checked_sub(1)?
        };
        self.hint.set(i);
        let pc = &pieces[i];
        (p < pc.at + pc.len).then_some(pc)
    }

    /// Maps buffer range `s..e` to source ranges; consecutive pieces of one
    /// source merge into one span (covering the line breaks between them).
    fn spans(&self, s: usize, e: usize) -> Vec<Span> {
        let mut out: Vec<Span> = Vec::new();
        let first = self.pieces.partition_point(|pc| pc.at + pc.len <= s);
        for pc in self.pieces[first..].iter().take_while(|pc| pc.at < e) {
            let a = s.max(pc.at) - pc.at + pc.src_off;
            let b = e.min(pc.at + pc.len) - pc.at + pc.src_off;
            match out.last_mut() {
                Some(last) if last.src == pc.src => last.end = b,
                _ => out.push(Span {
                    src: pc.src,
                    start: a,
                    end: b,
                }),
            }
        }
        out
    }
}

/// Warnings for `kt gateway check --verbose`: configured patterns that miss
/// a current key format the built-in pack catches (found by running each
/// pattern over each built-in rule's made-up sample whose prefix the pattern
/// targets), formats nothing catches when the pack is off, and patterns that
/// cannot be prefiltered.
pub fn coverage_warnings(cfg: &DlpFilter) -> Vec<String> {
    let mut out = Vec::new();
    let mut compiled = Vec::new();
    for (i, pat) in cfg.detect_patterns.iter().enumerate() {
        let Ok(re) = regex::Regex::new(pat) else {
            out.push(format!("detect_patterns[{i}] '{pat}' does not compile"));
            continue;
        };
        let lits = prefix_literals(pat);
        if lits.is_none() {
            out.push(format!(
                "detect_patterns[{i}] '{pat}' has no literal prefix of {MIN_LITERAL} or more \
                 characters, so it runs over the whole text of every request (slower)"
            ));
        }
        for rule in builtin_rules() {
            let sample = rule.sample();
            let Some(lit) = lits
                .iter()
                .flatten()
                .find(|l| sample.as_bytes().starts_with(l))
            else {
                continue;
            };
            if re.is_match(&sample) {
                continue;
            }
            let (head, tail) = sample.split_at(lit.len());
            let widened = format!("{head}{}", tail.replace(['-', '_'], "x"));
            let why = if re.is_match(&widened) {
                "those keys contain '-' or '_' characters, which the pattern does not allow"
            } else {
                "those keys have a length or alphabet the pattern does not allow"
            };
            let then = if cfg.builtin_rules {
                format!("the built-in rule '{}' still catches them", rule.id)
            } else {
                "builtin_rules is off, so such keys pass: widen the pattern or turn builtin_rules on"
                    .to_string()
            };
            out.push(format!(
                "detect_patterns[{i}] '{pat}' does not match {}: {why}; {then}",
                rule.description
            ));
        }
        compiled.push(re);
    }
    if Scanner::new(cfg).is_ok_and(|s| s.base64_group_starts_only) {
        out.push(String::from(
            "the detect patterns have too many literal prefixes to search for base64-encoded keys \
             at every position quickly: only keys at the start of encoded data are found",
        ));
    }
    if !cfg.builtin_rules {
        for rule in builtin_rules() {
            let sample = rule.sample();
            if !compiled.iter().any(|re| re.is_match(&sample)) {
                out.push(format!(
                    "no detect pattern catches {} and builtin_rules is off",
                    rule.description
                ));
            }
        }
    }
    out
}
