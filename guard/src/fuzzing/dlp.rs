//! The DLP pipeline: decode → scan → redact on arbitrary bodies, headers,
//! URLs and content encodings.
//!
//! Input: a flags byte, then the URL, a header value and the body separated
//! by `0xff`. Anywhere in them, `0xfe k` stands for made-up key number `k`
//! (every built-in rule's sample and the seed patterns' keys), put in with a
//! space on each side so it is a word of its own. Flags: bits 0-2 pick the
//! content encoding (the body is really compressed for gzip, deflate, br and
//! zstd; 5 claims gzip for raw bytes, 6 stacks `identity, gzip`, 7 is an
//! unknown coding); bit 3 adds user patterns and fuzzy blocked terms to the
//! built-in pack.

use std::io::Write as _;
use std::sync::OnceLock;

use crate::config::{DlpAction, DlpFilter};
use crate::dlp::{BuiltinRule, DecodeLimits, RequestView, Scanner, builtin_rules};

/// The header the harness puts the fuzzed value in (not a credential
/// header, which the scanner skips on purpose).
const HEADER: &str = "x-note";

struct Fixture {
    builtin: Scanner,
    seeded: Scanner,
    /// The built-in rules' samples first, then the seed patterns' keys
    /// (only the seeded policy has rules for those).
    keys: Vec<String>,
    builtin_keys: usize,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let limits = DecodeLimits {
            max_decoded_bytes: 256 * 1024,
            max_ratio: 100,
            ratio_floor: 64 * 1024,
        };
        let builtin = DlpFilter {
            action: DlpAction::Redact,
            ..DlpFilter::default()
        };
        let seeded = DlpFilter {
            detect_patterns: vec![
                "sk-[A-Za-z0-9]{20,}".into(),
                "ghp_[0-9A-Za-z]{36}".into(),
                // No literal prefix: goes through the RegexSet fallback.
                "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}".into(),
            ],
            blocked_terms: vec!["openai production key".into(), "billing token".into()],
            action: DlpAction::Redact,
            fuzzy_matching: true,
            max_distance: 1,
            builtin_rules: true,
        };
        let mut keys: Vec<String> = builtin_rules().iter().map(BuiltinRule::sample).collect();
        let builtin_keys = keys.len();
        keys.push(format!("sk-{}", "Zq8RtY2wLmN4vB6xC1dE3fG5"));
        keys.push(format!(
            "gh{}_{}",
            "p", "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
        ));
        keys.push("3f2a9c1e-7b4d-4e8a-9c2f-0d1e2f3a4b5c".into());
        Fixture {
            builtin: Scanner::new(&builtin)
                .expect("built-in policy")
                .with_limits(limits),
            seeded: Scanner::new(&seeded)
                .expect("seed policy")
                .with_limits(limits),
            keys,
            builtin_keys,
        }
    })
}

/// Replaces every `0xfe k` by ` <key k> `; returns the text and the keys put in.
fn expand(part: &[u8], keys: &[String], used: &mut Vec<String>) -> Vec<u8> {
    let mut out = Vec::with_capacity(part.len());
    let mut it = part.iter();
    while let Some(&b) = it.next() {
        if b == 0xfe
            && let Some(&k) = it.next()
        {
            let key = &keys[usize::from(k) % keys.len()];
            out.push(b' ');
            out.extend_from_slice(key.as_bytes());
            out.push(b' ');
            used.push(key.clone());
        } else {
            out.push(b);
        }
    }
    out
}

fn encode(body: &[u8], flags: u8) -> (Vec<u8>, Option<&'static str>) {
    match flags & 7 {
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("gzip in memory");
            (e.finish().expect("gzip in memory"), Some("gzip"))
        }
        2 => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("zlib in memory");
            (e.finish().expect("zlib in memory"), Some("deflate"))
        }
        3 => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 1, 18);
                w.write_all(body).expect("brotli in memory");
            }
            (out, Some("br"))
        }
        4 => (
            zstd::stream::encode_all(body, 1).expect("zstd in memory"),
            Some("zstd"),
        ),
        5 => (body.to_vec(), Some("gzip")),
        6 => {
            let (b, _) = encode(body, 1);
            (b, Some("identity, gzip"))
        }
        7 => (body.to_vec(), Some("compress")),
        _ => (body.to_vec(), None),
    }
}

/// Scan and redact agree; redaction keeps valid JSON valid; no key that
/// went in comes out whole; what redaction forwards scans clean.
pub fn dlp(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let (scanner, keys) = if flags & 8 == 0 {
        (&f.builtin, &f.keys[..f.builtin_keys])
    } else {
        (&f.seeded, &f.keys[..])
    };
    let (url, rest) = super::split_once(rest, 0xff);
    let (header, body) = super::split_once(rest, 0xff);
    let mut used = Vec::new();
    let url = String::from_utf8_lossy(&expand(url, keys, &mut used)).into_owned();
    let header = expand(header, keys, &mut used);
    let plain_body = expand(body, keys, &mut used);
    let (body, encoding) = encode(&plain_body, flags);
    let headers: [(&str, &[u8]); 1] = [(HEADER, &header)];
    let req = RequestView {
        path_and_query: &url,
        headers: &headers,
        content_encoding: encoding,
        body: &body,
    };

    let scan = scanner.scan(&req);
    let redacted = scanner.redact(&req);
    let (scan, redacted) = match (scan, redacted) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string(), "scan and redact fail alike");
            // A body kt really compressed never fails to decode (it is small).
            assert!(
                !(1..=4).contains(&(flags & 7)) && (flags & 7) != 6,
                "a well-formed {encoding:?} body failed to decode: {a}"
            );
            return;
        }
        (s, r) => panic!("scan and redact disagree: {:?} vs {:?}", s.err(), r.err()),
    };
    assert_eq!(
        scan.findings, redacted.findings,
        "scan and redact find the same"
    );
    if matches!(flags & 7, 0..=4 | 6) {
        assert_eq!(
            scan.decoded_len,
            plain_body.len(),
            "decoding gives the body back"
        );
    }

    let out_body = redacted.body.clone().unwrap_or_else(|| plain_body.clone());
    if serde_json::from_slice::<serde::de::IgnoredAny>(&plain_body).is_ok() {
        assert!(
            serde_json::from_slice::<serde::de::IgnoredAny>(&out_body).is_ok(),
            "redaction broke a valid JSON body: {}",
            String::from_utf8_lossy(&out_body)
        );
    }
    let out_url = redacted
        .path_and_query
        .clone()
        .unwrap_or_else(|| url.clone());
    let out_header = redacted
        .headers
        .iter()
        .find(|(i, _)| *i == 0)
        .map_or_else(|| header.clone(), |(_, v)| v.clone());
    for key in &used {
        let k = key.as_bytes();
        assert!(!contains(&out_body, k), "a key went through in the body");
        assert!(
            !contains(out_url.as_bytes(), k),
            "a key went through in the URL"
        );
        assert!(
            !contains(&out_header, k),
            "a key went through in the header"
        );
    }

    // What is forwarded, scanned again, holds no pattern match (blocked terms
    // aside: their markers name the term).
    let headers: [(&str, &[u8]); 1] = [(HEADER, &out_header)];
    let again = scanner
        .scan(&RequestView {
            path_and_query: &out_url,
            headers: &headers,
            content_encoding: None,
            body: &out_body,
        })
        .expect("an uncompressed body always scans");
    let left: Vec<_> = again
        .findings
        .iter()
        .filter(|f| !f.rule_id.starts_with("blocked-term:"))
        .collect();
    assert!(left.is_empty(), "redacted output still matches: {left:?}");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}
