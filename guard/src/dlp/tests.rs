//! Behaviour tests for the DLP scanner. Every key here is made up, built at
//! run time from a prefix and generated filler.

use std::io::Write;
use std::sync::Arc;

use super::rules::{ALNUM, BASE32, URLSAFE, filler};
use super::*;
use crate::config::{DlpAction, DlpFilter};

fn seed_policy(builtin: bool) -> DlpFilter {
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
        builtin_rules: builtin,
    }
}

fn builtin_only() -> DlpFilter {
    DlpFilter {
        detect_patterns: vec![],
        blocked_terms: vec![],
        action: DlpAction::Block,
        fuzzy_matching: false,
        max_distance: 1,
        builtin_rules: true,
    }
}

/// Made-up keys for the seed's three patterns: (rule id, key).
fn seed_keys() -> Vec<(&'static str, String)> {
    vec![
        ("detect-pattern-0", format!("sk-{}", filler(32, ALNUM, 1))),
        (
            "detect-pattern-1",
            format!(
                "AK{}{}",
                "IA",
                filler(16, b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", 2)
            ),
        ),
        (
            "detect-pattern-2",
            format!("gh{}{}", "p_", filler(36, ALNUM, 3)),
        ),
    ]
}

/// Every case: (scanner policy, rule id, key).
fn all_cases() -> Vec<(DlpFilter, String, String)> {
    let mut v: Vec<_> = seed_keys()
        .into_iter()
        .map(|(id, k)| (seed_policy(false), id.to_string(), k))
        .collect();
    v.extend(
        builtin_rules()
            .iter()
            .map(|r| (builtin_only(), r.id.to_string(), r.sample())),
    );
    v
}

fn messages(contents: &[&str]) -> Vec<u8> {
    let msgs: Vec<serde_json::Value> = contents
        .iter()
        .map(|c| serde_json::json!({"role": "user", "content": c}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"model": "gpt-4o", "messages": msgs})).unwrap()
}

fn view<'a>(body: &'a [u8], enc: Option<&'a str>) -> RequestView<'a> {
    RequestView {
        path_and_query: "/v1/chat/completions",
        headers: &[],
        content_encoding: enc,
        body,
    }
}

fn scan(cfg: &DlpFilter, req: &RequestView<'_>) -> Scan {
    Scanner::new(cfg).unwrap().scan(req).unwrap()
}

/// Asserts `rule` was found and that nothing about the scan reveals the key.
fn assert_found(s: &Scan, rule: &str, key: &str, how: &str) {
    assert!(
        s.findings.iter().any(|f| f.rule_id == rule),
        "{rule} not found ({how}): {:?}",
        s.findings
    );
    assert_no_leak(s, key);
}

/// The `content` strings of a `messages` body (e.g. a redacted one).
fn contents(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that no 8-byte stretch of `key` is left in `text` (line breaks
/// ignored in both, so a half left on its own line is caught too).
fn assert_key_gone(text: &str, key: &str, how: &str) {
    let flat = |s: &str| s.replace(['\n', '\r'], "");
    let (mut text, key) = (flat(text), flat(key));
    // A marker names the rule (`[REDACTED:aws-bedrock-short-term-key]`),
    // which may share a word with the key: not key material.
    while let Some(at) = text.find("[REDACTED:") {
        let end = text[at..].find(']').map_or(text.len(), |e| at + e + 1);
        text.replace_range(at..end, " ");
    }
    for w in key.as_bytes().windows(8) {
        let w = String::from_utf8_lossy(w);
        assert!(!text.contains(w.as_ref()), "{how}: {w:?} left in {text:?}");
    }
}

fn assert_no_leak(s: &Scan, key: &str) {
    let debug = format!("{s:?}");
    // Any 12-character stretch of the key would be a leak, not only all of it.
    let k = key.as_bytes();
    for w in k.windows(12.min(k.len())) {
        let w = String::from_utf8_lossy(w);
        assert!(
            !debug.contains(w.as_ref()),
            "scan output leaks part of the key: {w}"
        );
    }
}

#[test]
fn every_rule_found_in_a_plain_prompt() {
    for (cfg, rule, key) in all_cases() {
        let body = messages(&[&format!("please deploy with {key} today")]);
        let s = scan(&cfg, &view(&body, None));
        assert_found(&s, &rule, &key, "plain");
        let f = s.findings.iter().find(|f| f.rule_id == rule).unwrap();
        match &f.location {
            Location::Body {
                json_path: Some(p),
                start,
                end,
            } => {
                assert_eq!(p, "$.messages[0].content");
                assert_eq!((*start, *end - *start), (19, key.len()), "{rule}");
            }
            other => panic!("{rule}: unexpected location {other:?}"),
        }
    }
}

/// JSON text with every third character of `key` written as a `\u` escape.
fn escaped_body(key: &str) -> Vec<u8> {
    let mut esc = String::new();
    for (i, c) in key.chars().enumerate() {
        match c {
            '\n' => esc.push_str("\\n"),
            c if i % 3 == 0 => esc.push_str(&format!("\\u{:04x}", c as u32)),
            c => esc.push(c),
        }
    }
    format!(r#"{{"messages":[{{"role":"user","content":"key: {esc} ok"}}]}}"#).into_bytes()
}

#[test]
fn every_rule_found_through_unicode_escapes() {
    for (cfg, rule, key) in all_cases() {
        let body = escaped_body(&key);
        assert!(
            !body.windows(4).any(|w| w == &key.as_bytes()[..4]),
            "escape did not split the prefix"
        );
        let s = scan(&cfg, &view(&body, None));
        assert_eq!(s.body_kind, BodyKind::Json);
        assert_found(&s, &rule, &key, "escaped");
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn every_rule_found_in_a_gzip_body() {
    for (cfg, rule, key) in all_cases() {
        let body = gzip(&messages(&[&format!("use {key}")]));
        let s = scan(&cfg, &view(&body, Some("gzip")));
        assert_found(&s, &rule, &key, "gzip");
    }
}

#[test]
fn deflate_br_and_zstd_bodies_are_decoded() {
    let key = builtin_rules()[0].sample();
    let plain = messages(&[&format!("use {key}")]);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&plain).unwrap();
    let zlib = z.finish().unwrap();
    let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    d.write_all(&plain).unwrap();
    let raw_deflate = d.finish().unwrap();
    let mut br = Vec::new();
    brotli::BrotliCompress(&mut &plain[..], &mut br, &Default::default()).unwrap();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    let gz_then_br = {
        let mut out = Vec::new();
        brotli::BrotliCompress(&mut &gzip(&plain)[..], &mut out, &Default::default()).unwrap();
        out
    };
    for (body, enc) in [
        (zlib, "deflate"),
        (raw_deflate, "deflate"),
        (br, "br"),
        (zst, "zstd"),
        (gz_then_br, "gzip, br"),
    ] {
        let s = scan(&builtin_only(), &view(&body, Some(enc)));
        assert_found(&s, "openai-project-key", &key, enc);
        assert_eq!(s.decoded_len, plain.len());
    }
}

#[test]
fn every_rule_found_when_split_across_two_messages() {
    for (cfg, rule, key) in all_cases() {
        let (a, b) = key.split_at(key.len() / 2);
        let body = messages(&[&format!("my key is {a}"), &format!("{b} thanks")]);
        let s = scan(&cfg, &view(&body, None));
        assert_found(&s, &rule, &key, "split across messages");
        // One finding for the whole key: from its first byte in the first
        // message to its last byte in the second, not one per half.
        let found: Vec<&Finding> = s.findings.iter().filter(|f| f.rule_id == rule).collect();
        assert_eq!(
            found.iter().map(|f| &f.location).collect::<Vec<_>>(),
            vec![&Location::Body {
                json_path: Some("$.messages[0].content + $.messages[1].content".into()),
                start: "my key is ".len(),
                end: b.len(),
            }],
            "{rule}"
        );
        // Redaction takes out both halves, and only them.
        let red = Scanner::new(&cfg)
            .unwrap()
            .redact(&view(&body, None))
            .unwrap();
        let marker = format!("[REDACTED:{rule}]");
        assert_eq!(
            contents(&red.body.unwrap()),
            vec![format!("my key is {marker}"), format!("{marker} thanks")],
            "{rule}"
        );
    }
}

#[test]
fn every_rule_found_when_split_by_a_newline() {
    for (cfg, rule, key) in all_cases() {
        let (a, b) = key.split_at(key.len() / 2);
        let content = format!("key:\n{a}\n{b}\nend");
        let body = messages(&[&content]);
        let s = scan(&cfg, &view(&body, None));
        assert_found(&s, &rule, &key, "split by newline");
        // One finding from the key's first byte over both lines (an
        // open-ended pattern may also take the word on the next line).
        let key_end = "key:\n".len() + a.len() + 1 + b.len();
        let found: Vec<&Finding> = s.findings.iter().filter(|f| f.rule_id == rule).collect();
        assert_eq!(found.len(), 1, "{rule}: {found:?}");
        match &found[0].location {
            Location::Body {
                json_path: Some(p),
                start,
                end,
            } => {
                assert_eq!(p, "$.messages[0].content", "{rule}");
                assert_eq!(*start, "key:\n".len(), "{rule}");
                assert!((key_end..=content.len()).contains(end), "{rule}: {end}");
            }
            other => panic!("{rule}: unexpected location {other:?}"),
        }
        let red = Scanner::new(&cfg)
            .unwrap()
            .redact(&view(&body, None))
            .unwrap();
        let redacted = contents(&red.body.unwrap()).remove(0);
        assert!(
            redacted.starts_with(&format!("key:\n[REDACTED:{rule}]")),
            "{redacted:?}"
        );
        assert_key_gone(&redacted, &key, &rule);
        // A plain-text body joins lines the same way.
        let text = format!("key:\r\n{a}\r\n{b}\r\nend");
        let s = scan(&cfg, &view(text.as_bytes(), None));
        assert_eq!(s.body_kind, BodyKind::Text);
        assert_found(&s, &rule, &key, "text split by newline");
        let found: Vec<&Finding> = s.findings.iter().filter(|f| f.rule_id == rule).collect();
        assert_eq!(found.len(), 1, "{rule}: {found:?}");
        let key_end = "key:\r\n".len() + a.len() + 2 + b.len();
        match &found[0].location {
            Location::Body {
                json_path: None,
                start,
                end,
            } => {
                assert_eq!(*start, "key:\r\n".len(), "{rule}");
                assert!((key_end..=text.len()).contains(end), "{rule}: {end}");
            }
            other => panic!("{rule}: unexpected location {other:?}"),
        }
        let red = Scanner::new(&cfg)
            .unwrap()
            .redact(&view(text.as_bytes(), None))
            .unwrap();
        let redacted = String::from_utf8(red.body.unwrap()).unwrap();
        assert!(
            redacted.starts_with(&format!("key:\r\n[REDACTED:{rule}]")),
            "{redacted:?}"
        );
        assert_key_gone(&redacted, &key, &rule);
    }
}

#[test]
fn near_misses_are_not_found() {
    let dashes = "-".repeat(5);
    let builtin_misses = vec![
        format!("sk-proj-{}", filler(12, ALNUM, 9)),
        format!(
            "sk-{}T3BlbkFI{}",
            filler(20, ALNUM, 9),
            filler(20, ALNUM, 10)
        ),
        format!("sk-ant-api03-{}AA", filler(92, URLSAFE, 9)),
        format!("sk-ant-api03-{}", filler(95, b"abc", 9)),
        format!("AKIA{}", filler(15, BASE32, 9)),
        "AKIA1234567890ABCDEF".to_string(),
        format!("ASIA{}", filler(16, b"abcdefgh", 9)),
        format!("ghp_{}", filler(35, ALNUM, 9)),
        format!("ghx_{}", filler(36, ALNUM, 9)),
        format!("github_pat_{}", filler(81, ALNUM, 9)),
        format!("AIza{}", filler(34, ALNUM, 9)),
        "xoxb-not-a-token".to_string(),
        format!("sk_test_{}", filler(30, ALNUM, 9)),
        format!("pk_live_{}", filler(30, ALNUM, 9)),
        format!("{dashes}BEGIN PUBLIC KEY{dashes}"),
        "the risk-free approach to task-based software engineering".to_string(),
    ];
    for miss in &builtin_misses {
        let body = messages(&[&format!("x {miss} y")]);
        let s = scan(&builtin_only(), &view(&body, None));
        assert!(s.findings.is_empty(), "{miss}: {:?}", s.findings);
    }
    let seed_misses = [
        format!("sk-{}", filler(19, ALNUM, 9)),
        format!("AKIA{}", filler(15, BASE32, 9)),
        format!("ghp_{}", filler(35, ALNUM, 9)),
        "the risk-free approach to task-based software".to_string(),
    ];
    for miss in &seed_misses {
        let body = messages(&[&format!("x {miss} y")]);
        let s = scan(&seed_policy(false), &view(&body, None));
        assert!(s.findings.is_empty(), "{miss}: {:?}", s.findings);
    }
}

#[test]
fn same_secret_twice_is_two_findings_at_its_two_places() {
    let rule = builtin_rules()[6].id;
    let key = builtin_rules()[6].sample();
    let other = format!("AKIA{}", filler(16, BASE32, 77));
    let second = format!("b {key} c {other}");
    let body = messages(&[&format!("a {key}"), &second]);
    let s = scan(&builtin_only(), &view(&body, None));
    let at = |msg: usize, start: usize, len: usize| Finding {
        rule_id: rule.to_string(),
        location: Location::Body {
            json_path: Some(format!("$.messages[{msg}].content")),
            start,
            end: start + len,
        },
    };
    let other_at = second.find(&other).unwrap();
    assert_eq!(
        s.findings,
        vec![
            at(0, 2, key.len()),
            at(1, 2, key.len()),
            at(1, other_at, other.len()),
        ]
    );
}

#[test]
fn credential_headers_are_skipped_and_others_scanned() {
    let key = builtin_rules()[0].sample();
    let bearer = format!("Bearer {key}");
    let headers: Vec<(&str, &[u8])> = vec![
        ("Authorization", bearer.as_bytes()),
        ("x-api-key", key.as_bytes()),
        ("Api-Key", key.as_bytes()),
        ("Proxy-Authorization", bearer.as_bytes()),
        ("X-Debug-Note", bearer.as_bytes()),
    ];
    let req = RequestView {
        path_and_query: "/v1/models",
        headers: &headers,
        content_encoding: None,
        body: b"",
    };
    let s = scan(&builtin_only(), &req);
    assert_eq!(s.body_kind, BodyKind::Empty);
    let locs: Vec<&Location> = s.findings.iter().map(|f| &f.location).collect();
    assert_eq!(
        locs,
        vec![&Location::Header {
            name: "X-Debug-Note".into()
        }]
    );
    assert_no_leak(&s, &key);
}

#[test]
fn findings_are_one_per_rule_and_place_however_many_there_are() {
    // Two keys in each of 40 headers: one finding per header, in order,
    // past the point where deduplication switches to hashing.
    let key = builtin_rules()[0].sample();
    let value = format!("{key} and again {key}");
    let names: Vec<String> = (0..40).map(|i| format!("x-note-{i:02}")).collect();
    let headers: Vec<(&str, &[u8])> = names
        .iter()
        .map(|n| (n.as_str(), value.as_bytes()))
        .collect();
    let req = RequestView {
        path_and_query: "/v1/models",
        headers: &headers,
        content_encoding: None,
        body: b"",
    };
    let s = scan(&builtin_only(), &req);
    let got: Vec<&Location> = s.findings.iter().map(|f| &f.location).collect();
    let want: Vec<Location> = names
        .iter()
        .map(|n| Location::Header { name: n.clone() })
        .collect();
    assert_eq!(got, want.iter().collect::<Vec<_>>());
}

#[test]
fn url_is_percent_decoded_and_offsets_are_raw() {
    let key = format!("AKIA{}", filler(16, BASE32, 5));
    // Percent-encode the prefix so only the decoded URL shows it.
    let enc: String = key.bytes().take(4).map(|b| format!("%{b:02X}")).collect();
    let path = format!("/v1/files?note={enc}{}&x=1", &key[4..]);
    let req = RequestView {
        path_and_query: &path,
        headers: &[],
        content_encoding: None,
        body: b"",
    };
    let s = scan(&builtin_only(), &req);
    assert_eq!(
        s.findings[0].location,
        Location::Url {
            start: 15,
            end: 15 + 12 + 16
        }
    );
    let red = Scanner::new(&builtin_only()).unwrap().redact(&req).unwrap();
    assert_eq!(
        red.path_and_query.as_deref(),
        Some("/v1/files?note=%5BREDACTED%3Aaws-access-key-id%5D&x=1")
    );
}

#[test]
fn text_body_offsets_point_at_the_match() {
    let key = builtin_rules()[7].sample();
    let body = format!("line one\nsome text {key} more");
    let s = scan(&builtin_only(), &view(body.as_bytes(), None));
    assert_eq!(s.body_kind, BodyKind::Text);
    match s.findings[0].location {
        Location::Body {
            json_path: None,
            start,
            end,
        } => assert_eq!(&body[start..end], key),
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn a_key_used_as_json_object_key_is_not_spelled_out_in_paths() {
    let key = builtin_rules()[9].sample();
    let inner = format!("AKIA{}", filler(16, BASE32, 6));
    let body = serde_json::to_vec(&serde_json::json!({ "meta": { key.clone(): { "v": inner } } }))
        .unwrap();
    let s = scan(&builtin_only(), &view(&body, None));
    let paths: Vec<String> = s
        .findings
        .iter()
        .map(|f| match &f.location {
            Location::Body {
                json_path: Some(p), ..
            } => p.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(paths, vec!["$.meta.{key}", "$.meta.{key}.v"]);
    assert_no_leak(&s, &key);
    assert_no_leak(&s, &inner);
}

#[test]
fn redact_replaces_inside_json_strings_and_keeps_json_valid() {
    let key = builtin_rules()[0].sample();
    let aws = format!("AKIA{}", filler(16, BASE32, 8));
    let (a, b) = aws.split_at(9);
    let body = messages(&[
        &format!("first \"quoted\" {key} end\nnext"),
        &format!("tail {a}"),
        &format!("{b} done"),
    ]);
    let red = Scanner::new(&builtin_only())
        .unwrap()
        .redact(&view(&body, None))
        .unwrap();
    let new = red.body.expect("body changed");
    let v: serde_json::Value = serde_json::from_slice(&new).expect("still valid JSON");
    assert_eq!(
        v["messages"][0]["content"],
        "first \"quoted\" [REDACTED:openai-project-key] end\nnext"
    );
    assert_eq!(
        v["messages"][1]["content"],
        "tail [REDACTED:aws-access-key-id]"
    );
    assert_eq!(
        v["messages"][2]["content"],
        "[REDACTED:aws-access-key-id] done"
    );
    assert_eq!(v["model"], "gpt-4o");
    let text = String::from_utf8(new).unwrap();
    assert!(!text.contains(&key[..20]) && !text.contains(a) && !text.contains(b));
    assert_eq!(red.findings.len(), 2);
}

#[test]
fn redact_of_an_escaped_key_and_a_compressed_body() {
    let key = builtin_rules()[4].sample();
    let body = gzip(&escaped_body(&key));
    let red = Scanner::new(&builtin_only())
        .unwrap()
        .redact(&view(&body, Some("gzip")))
        .unwrap();
    // Returned decompressed: the caller drops Content-Encoding.
    let v: serde_json::Value = serde_json::from_slice(&red.body.unwrap()).unwrap();
    assert_eq!(
        v["messages"][0]["content"],
        "key: [REDACTED:anthropic-api-key] ok"
    );
}

#[test]
fn redact_leaves_clean_requests_alone() {
    let body = messages(&["nothing to see"]);
    let red = Scanner::new(&seed_policy(true))
        .unwrap()
        .redact(&view(&body, None))
        .unwrap();
    assert!(red.body.is_none() && red.path_and_query.is_none() && red.headers.is_empty());
    assert!(red.findings.is_empty());
}

#[test]
fn decompression_bombs_are_refused() {
    let zeros = vec![0u8; 4 * 1024 * 1024];
    let gz = gzip(&zeros);
    let mut br = Vec::new();
    brotli::BrotliCompress(&mut &zeros[..], &mut br, &Default::default()).unwrap();
    let zst = zstd::encode_all(&zeros[..], 3).unwrap();
    let scanner = Scanner::new(&builtin_only()).unwrap();
    for (body, enc) in [(gz, "gzip"), (br, "br"), (zst, "zstd")] {
        let err = scanner.scan(&view(&body, Some(enc))).unwrap_err();
        assert!(
            matches!(err, DlpError::RatioExceeded { ratio: 100 }),
            "{enc}: {err}"
        );
        assert_eq!(err.http_status(), 413);
        assert!(scanner.redact(&view(&body, Some(enc))).is_err());
    }
    // The size cap applies even at a modest ratio.
    let small = Scanner::new(&builtin_only())
        .unwrap()
        .with_limits(DecodeLimits {
            max_decoded_bytes: 1000,
            ..DecodeLimits::default()
        });
    let body = gzip(&messages(&[&"x".repeat(2000)]));
    let err = small.scan(&view(&body, Some("gzip"))).unwrap_err();
    assert!(matches!(err, DlpError::TooLarge { limit: 1000 }), "{err}");
}

#[test]
fn bad_encodings_are_errors() {
    let scanner = Scanner::new(&builtin_only()).unwrap();
    let err = scanner.scan(&view(b"not gzip", Some("gzip"))).unwrap_err();
    assert_eq!(err.http_status(), 400);
    let err = scanner.scan(&view(b"x", Some("compress"))).unwrap_err();
    assert_eq!(err.http_status(), 415);
    assert_eq!(
        err.to_string(),
        "request body content-encoding \"compress\" is not supported"
    );
}

fn term_findings(cfg: &DlpFilter, text: &str) -> Vec<Finding> {
    let body = messages(&[text]);
    scan(cfg, &view(&body, None))
        .findings
        .into_iter()
        .filter(|f| f.rule_id.starts_with("blocked-term:"))
        .collect()
}

#[test]
fn blocked_terms_match_fuzzily_within_max_distance() {
    let cfg = seed_policy(true);
    for text in [
        "please rotate the openai prodution key tonight",
        "please rotate the OpenAI Production   Key tonight",
        "OpenAI-production_key!",
        "the openai production keys are here",
        "see: Anthropic billing-token.",
        "openai production\nkey",
    ] {
        let f = term_findings(&cfg, text);
        assert_eq!(f.len(), 1, "{text}: {f:?}");
    }
    let f = term_findings(&cfg, "x OpenAI Production   Key y");
    assert_eq!(f[0].rule_id, "blocked-term:openai production key");
    assert_eq!(
        f[0].location,
        Location::Body {
            json_path: Some("$.messages[0].content".into()),
            start: 2,
            end: 25
        }
    );
    for text in [
        "openai product roadmap",
        "the anthropic billing team",
        "open a production key",
        "openai prdutin key",
    ] {
        assert!(term_findings(&cfg, text).is_empty(), "{text}");
    }
}

#[test]
fn blocked_terms_ignore_case_and_survive_a_typo_in_a_searched_stretch() {
    let cfg = seed_policy(false);
    // Any ASCII case mix is found, not just lower, Title and UPPER case.
    assert_eq!(term_findings(&cfg, "the oPeNaI pRoDuCtIoN kEY").len(), 1);
    // "prodction" breaks the stretch searched for "production" ("duc") and
    // "oxenai" the one for "openai" ("pen"), "xilling" the one for "billing"
    // ("bil"): the other piece still finds them.
    assert_eq!(
        term_findings(&cfg, "rotate the openai prodction key").len(),
        1
    );
    assert_eq!(
        term_findings(&cfg, "rotate the oxenai production key").len(),
        1
    );
    assert_eq!(term_findings(&cfg, "anthropic xilling token").len(), 1);
    // Both searched pieces broken: two edits, too far.
    assert!(term_findings(&cfg, "rotate the oxenai prodction key").is_empty());
}

#[test]
fn exact_blocked_terms_still_normalise() {
    let mut cfg = seed_policy(false);
    cfg.fuzzy_matching = false;
    assert_eq!(term_findings(&cfg, "OpenAI -- Production\tKey").len(), 1);
    assert_eq!(term_findings(&cfg, "openai production\nkey").len(), 1);
    assert!(term_findings(&cfg, "openai prodution key").is_empty());
}

#[test]
fn terms_that_cannot_be_prefiltered_still_match() {
    let cfg = DlpFilter {
        detect_patterns: vec![],
        blocked_terms: vec!["Geheimer Schlüssel".into(), "ab cd".into()],
        action: DlpAction::Block,
        fuzzy_matching: true,
        max_distance: 1,
        builtin_rules: false,
    };
    assert_eq!(term_findings(&cfg, "der GEHEIMER SCHLÜSEL ist").len(), 1);
    assert_eq!(term_findings(&cfg, "xx AB-CD yy").len(), 1);
    assert!(term_findings(&cfg, "ganz anders").is_empty());
}

#[test]
fn patterns_without_a_literal_prefix_use_the_whole_text_pass() {
    let cfg = DlpFilter {
        detect_patterns: vec![r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b".into()],
        blocked_terms: vec![],
        action: DlpAction::Audit,
        fuzzy_matching: false,
        max_distance: 1,
        builtin_rules: false,
    };
    let s = scan(&cfg, &view(&messages(&["ssn 123-45-6789 here"]), None));
    assert_eq!(s.findings.len(), 1);
    assert_eq!(s.findings[0].rule_id, "detect-pattern-0");
    assert!(
        coverage_warnings(&cfg)
            .iter()
            .any(|w| w.contains("no literal prefix"))
    );
}

#[test]
fn coverage_warnings_name_the_seed_pattern_and_the_sk_proj_format() {
    let w = coverage_warnings(&seed_policy(true));
    let proj: Vec<&String> = w.iter().filter(|w| w.contains("sk-proj-")).collect();
    assert_eq!(proj.len(), 1, "{w:#?}");
    assert!(proj[0].contains("'sk-[A-Za-z0-9]{20,}'"), "{}", proj[0]);
    assert!(proj[0].contains("'-' or '_'"), "{}", proj[0]);
    assert!(proj[0].contains("openai-project-key"), "{}", proj[0]);
    // The AKIA and ghp_ patterns cover their formats.
    assert!(
        !w.iter()
            .any(|w| w.contains("detect_patterns[1]") || w.contains("detect_patterns[2]"))
    );
    let off = coverage_warnings(&seed_policy(false));
    assert!(
        off.iter()
            .any(|w| w.contains("sk-proj-") && w.contains("builtin_rules is off"))
    );
    assert!(
        off.iter()
            .any(|w| w.starts_with("no detect pattern catches Google API key"))
    );
}

#[test]
fn samples_match_their_own_rule_only_where_expected() {
    let scanner = Scanner::new(&builtin_only()).unwrap();
    for rule in builtin_rules() {
        let sample = rule.sample();
        let s = scanner.scan(&view(sample.as_bytes(), None)).unwrap();
        let ids: Vec<&str> = s.findings.iter().map(|f| f.rule_id.as_str()).collect();
        assert_eq!(ids, vec![rule.id], "{}", rule.id);
    }
}

#[test]
fn invalid_patterns_and_empty_terms_are_config_errors() {
    let mut cfg = seed_policy(true);
    cfg.detect_patterns.push("sk-[".into());
    let err = Scanner::new(&cfg).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("dlp pattern detect-pattern-3 does not compile")
    );
    let mut cfg = seed_policy(true);
    cfg.blocked_terms.push(" -- ".into());
    assert_eq!(
        Scanner::new(&cfg).unwrap_err().to_string(),
        "dlp blocked term 2 has no letters or digits"
    );
}

#[test]
fn big_bodies_with_many_messages_are_scanned_everywhere() {
    let key = builtin_rules()[9].sample();
    let filler_text = "lorem ipsum dolor sit amet, task-based risk-free text. ".repeat(20);
    let mut contents: Vec<String> = (0..300).map(|_| filler_text.clone()).collect();
    contents[150] = format!("{filler_text} {key}");
    contents[299] = format!("{filler_text} the OpenAI production key");
    let refs: Vec<&str> = contents.iter().map(String::as_str).collect();
    let s = scan(&seed_policy(true), &view(&messages(&refs), None));
    let got: Vec<(&str, &Location)> = s
        .findings
        .iter()
        .map(|f| (f.rule_id.as_str(), &f.location))
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        matches!(got[0].1, Location::Body { json_path: Some(p), .. } if p == "$.messages[150].content")
    );
    assert_eq!(got[1].0, "blocked-term:openai production key");
}

#[test]
fn short_lines_are_not_glued_into_a_key() {
    let text = "we ask-\nthe\nmodel\nshould\nanswer\nwith\nsummary\nAKIA\nAPI\nJSON\nOK";
    let s = scan(&seed_policy(true), &view(&messages(&[text]), None));
    assert!(s.findings.is_empty(), "{:?}", s.findings);
}

#[test]
fn term_pieces_must_be_close_and_separator_runs_collapse() {
    let cfg = seed_policy(false);
    let far = format!("openai {} production key", "words in between ".repeat(5));
    assert!(term_findings(&cfg, &far).is_empty());
    let padded = format!("openai{}production\n\n\tkey", " ".repeat(300));
    assert_eq!(term_findings(&cfg, &padded).len(), 1);
    // Split over two messages, joined with a separator.
    let body = messages(&["tell me the OpenAI", "production key"]);
    let s = scan(&cfg, &view(&body, None));
    assert!(
        s.findings
            .iter()
            .any(|f| f.rule_id == "blocked-term:openai production key")
    );
}

#[test]
fn short_terms_keep_at_least_half_their_letters() {
    let cfg = DlpFilter {
        detect_patterns: vec![],
        blocked_terms: vec!["tok".into(), "ab".into()],
        action: DlpAction::Block,
        fuzzy_matching: true,
        max_distance: 3,
        builtin_rules: false,
    };
    // With 3 edits allowed outright, "tok" and "ab" would match any text.
    assert!(term_findings(&cfg, "nothing related here at all").is_empty());
    assert_eq!(term_findings(&cfg, "a tek b").len(), 1);
    assert_eq!(term_findings(&cfg, "x AB y").len(), 1);
}

#[test]
fn scanner_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Scanner>();
    let scanner = Arc::new(Scanner::new(&seed_policy(true)).unwrap());
    let key = builtin_rules()[6].sample();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let scanner = Arc::clone(&scanner);
            let body = messages(&[&key]);
            std::thread::spawn(move || scanner.scan(&view(&body, None)).unwrap().findings.len())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 2);
    }
}

#[test]
fn arbitrary_bodies_never_panic() {
    // Deterministic fuzzing: fragments that stress the JSON walker, escapes,
    // joins, prefilter candidates and term windows.
    let frags: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b"\\",
        b"\\u",
        b"d83d",
        b"\\ud83d",
        b"\\n",
        b":",
        b",",
        b"sk-",
        b"AKIA",
        b"-----BEGIN",
        b" PRIVATE KEY-----",
        b"openai",
        b" production ",
        b"key",
        b"\n",
        b"\r",
        b" ",
        b"\xff",
        b"\xc3",
        b"\xa9",
        b"ghp_",
        b"0123456789abcdef",
        b"ABCDEFGHIJKLMNOP",
        b"role",
        b"content",
        b"x",
        b"\xe2\x80\x94",
    ];
    let scanner = Scanner::new(&seed_policy(true)).unwrap();
    let mut state = 12345u64;
    for _ in 0..3000 {
        let mut body = Vec::new();
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = (state >> 40) as usize % 40;
        for _ in 0..n {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            body.extend_from_slice(frags[(state >> 33) as usize % frags.len()]);
        }
        let path = String::from_utf8_lossy(&body).replace(['\n', '\r'], "");
        let headers: Vec<(&str, &[u8])> = vec![("x-note", &body)];
        let req = RequestView {
            path_and_query: &path,
            headers: &headers,
            content_encoding: None,
            body: &body,
        };
        let s = scanner.scan(&req).unwrap();
        let r = scanner.redact(&req).unwrap();
        assert_eq!(s.findings, r.findings);
        if s.body_kind == BodyKind::Json
            && let Some(b) = &r.body
        {
            // A redacted JSON body is still JSON when the input was valid JSON.
            if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
                serde_json::from_slice::<serde_json::Value>(b).unwrap();
            }
        }
    }
}

#[test]
fn every_builtin_rule_has_a_literal_prefix() {
    // A rule without one runs over the whole text of every request.
    for r in builtin_rules() {
        let lits = if r.literals.is_empty() {
            prefix_literals(r.regex).unwrap_or_default()
        } else {
            r.literals.iter().map(|l| l.as_bytes().to_vec()).collect()
        };
        assert!(!lits.is_empty(), "{} has no literal prefix", r.id);
        assert!(lits.iter().all(|l| l.len() >= 3), "{}: {lits:?}", r.id);
        // And each is searched for in base64 at every byte alignment.
        if !SHORT_PREFIX.contains(&r.id) {
            for l in &lits {
                let n = b64::spellings(l).len();
                assert_eq!(n, 3, "{}: {:?}", r.id, String::from_utf8_lossy(l));
            }
        }
    }
}

/// A small deterministic generator (no dependency needed); the `terms`
/// unit tests use it too.
pub(super) struct Lcg(pub(super) u64);
impl Lcg {
    pub(super) fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// Mutated request bodies (broken escapes, lone surrogates, stray quotes,
/// truncation, invalid UTF-8, deep nesting) never make the scanner panic,
/// and redaction of a valid JSON body always yields valid JSON without the
/// key. The gateway runs this code on every request body it receives.
#[test]
fn mangled_bodies_never_panic_and_redaction_keeps_json_valid() {
    let mut cfg = seed_policy(true);
    cfg.action = DlpAction::Redact;
    let scanner = Scanner::new(&cfg).unwrap();
    let key = builtin_rules()[0].sample();
    const PIECES: &[&str] = &[
        "\\",
        "\\u",
        "\\ud800",
        "\\udc00",
        "\\ud83d\\ude00",
        "\\n",
        "\"",
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "sk-",
        "AKIA",
        "-----BEGIN",
        "openai",
        "production key",
        "\u{feff}",
        "é",
        "\\u00",
        "\\x",
        "\r\n",
        "%",
        "%4",
        "%41",
    ];
    let mut rng = Lcg(5);
    for round in 0..3000 {
        let base = messages(&[
            &format!("rotate the openai prodution key {key} now"),
            "second\nline",
        ]);
        let mut body = base.clone();
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(body.len() + 1);
            match rng.below(4) {
                0 => {
                    let p = PIECES[rng.below(PIECES.len())].as_bytes();
                    body.splice(at..at, p.iter().copied());
                }
                1 if at < body.len() => {
                    body.remove(at);
                }
                2 => body.insert(at, rng.below(256) as u8),
                _ => body.truncate(at.max(1)),
            }
        }
        if round % 100 == 0 {
            body = b"[".repeat(10_000);
        }
        let path = format!("/v1/x?q={}", PIECES[rng.below(PIECES.len())]);
        let headers: [(&str, &[u8]); 1] = [("x-note", &body[..body.len().min(40)])];
        let req = RequestView {
            path_and_query: &path,
            headers: &headers,
            content_encoding: None,
            body: &body,
        };
        let scan = scanner.scan(&req).unwrap();
        let red = scanner.redact(&req).unwrap();
        assert_eq!(scan.findings.len(), red.findings.len());
        let valid = serde_json::from_slice::<serde_json::Value>(&body).is_ok();
        if valid && String::from_utf8_lossy(&body).contains(&key) {
            assert!(
                red.body.is_some(),
                "an intact key was not redacted in {:?}",
                String::from_utf8_lossy(&body)
            );
        }
        if valid && let Some(new) = &red.body {
            assert!(
                serde_json::from_slice::<serde_json::Value>(new).is_ok(),
                "redaction broke the JSON of {:?}",
                String::from_utf8_lossy(&body)
            );
            assert!(!String::from_utf8_lossy(new).contains(&key));
        }
    }
    // Unmangled, the key and the phrase are both found and redacted.
    let body = messages(&[&format!("rotate the openai prodution key {key} now")]);
    let red = scanner.redact(&view(&body, None)).unwrap();
    assert_eq!(red.findings.len(), 2, "{:?}", red.findings);
}

/// What `kubectl get secret -o yaml` prints: values base64-encoded.
fn k8s_secret(value: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(value);
    format!(
        "why does this fail?\napiVersion: v1\nkind: Secret\ndata:\n  api-key: {b64}\ntype: Opaque\n"
    )
}

#[test]
fn a_base64_wrapped_key_is_found_over_its_whole_base64_run() {
    use base64::Engine as _;
    for (cfg, rule, key) in all_cases() {
        let content = k8s_secret(&key);
        let body = messages(&[&content]);
        let s = scan(&cfg, &view(&body, None));
        assert_found(&s, &rule, &key, "base64 in a Kubernetes Secret");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
        assert!(
            !format!("{s:?}").contains(&b64),
            "{rule}: the encoded key leaked"
        );
        // The finding is the whole encoded value, padding included.
        let start = content.find(&b64).unwrap();
        let found: Vec<&Location> = s
            .findings
            .iter()
            .filter(|f| f.rule_id == rule)
            .map(|f| &f.location)
            .collect();
        assert_eq!(
            found,
            vec![&Location::Body {
                json_path: Some("$.messages[0].content".into()),
                start,
                end: start + b64.len(),
            }],
            "{rule}"
        );
        let red = Scanner::new(&cfg)
            .unwrap()
            .redact(&view(&body, None))
            .unwrap();
        assert_eq!(
            contents(&red.body.unwrap()),
            vec![content.replace(&b64, &format!("[REDACTED:{rule}]"))],
            "{rule}"
        );
    }
}

/// Rules whose 3-byte prefix has no base64 spelling off a group start
/// (see the `b64` module docs).
const SHORT_PREFIX: &[&str] = &[
    "openai-legacy-key",
    "slack-token",
    "huggingface-token",
    "replicate-api-token",
    "fireworks-api-key",
];

#[test]
fn a_key_anywhere_in_base64_data_is_found() {
    use base64::Engine as _;
    let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for r in builtin_rules() {
        if SHORT_PREFIX.contains(&r.id) || !r.base64_every_alignment {
            continue;
        }
        let key = r.sample();
        // User names of 3..=5 bytes put the key at each byte of a group.
        for user in ["bot", "ci-u", "build"] {
            // A Docker `config.json` and a `.env` file, each base64 whole.
            let docker = format!(
                r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#,
                enc(&format!("{user}:{key}"))
            );
            let env = format!(
                "cat .env.b64\n{}",
                enc(&format!("# {user}\nAPI_KEY={key}\n"))
            );
            for (how, text) in [("docker auth", docker), (".env", env)] {
                let body = messages(&[&text]);
                let s = scan(&builtin_only(), &view(&body, None));
                let how = format!("{how} after {user:?}");
                assert_found(&s, r.id, &key, &how);
                // One finding, over the whole encoded run (it may start
                // earlier: base64 letters just before a line break, here
                // the `b64` of `.env.b64`, count as part of a wrapped run).
                let run = text.rsplit(['"', '\n']).find(|t| t.len() > 20).unwrap();
                let run_start = text.find(run).unwrap();
                let found: Vec<&Finding> =
                    s.findings.iter().filter(|f| f.rule_id == r.id).collect();
                assert_eq!(found.len(), 1, "{}: {how}: {found:?}", r.id);
                match &found[0].location {
                    Location::Body {
                        json_path: Some(p),
                        start,
                        end,
                    } => {
                        assert_eq!(p, "$.messages[0].content", "{}: {how}", r.id);
                        let before = text.as_bytes().get(*start..run_start);
                        assert!(
                            before.is_some_and(|b| b
                                .iter()
                                .all(|c| c.is_ascii_alphanumeric() || b"+/\n".contains(c))),
                            "{}: {how}: starts at {start}",
                            r.id
                        );
                        assert_eq!(*end, run_start + run.len(), "{}: {how}", r.id);
                    }
                    other => panic!("{}: {how}: unexpected location {other:?}", r.id),
                }
            }
        }
    }
}

#[test]
fn too_many_prefixes_keep_base64_to_group_starts_and_say_so() {
    use base64::Engine as _;
    // The seed policy with the pack stays under the limit: every alignment.
    let seed = Scanner::new(&seed_policy(true)).unwrap();
    assert!(!seed.base64_group_starts_only);
    assert!(
        !coverage_warnings(&seed_policy(true))
            .iter()
            .any(|w| w.contains("base64"))
    );
    // Twenty-six more prefixed patterns do not fit: keys at a group start are
    // still found, and `kt gateway check --verbose` says what is not.
    let mut cfg = seed_policy(true);
    // (Distinct first letters: spellings sharing their first characters
    // share a searched head, so `tok00_`, `tok01_`, … would still fit.)
    cfg.detect_patterns
        .extend((0..26u8).map(|i| format!("{}q{i:02}_[a-z0-9]{{24}}", char::from(b'a' + i))));
    let many = Scanner::new(&cfg).unwrap();
    assert!(many.base64_group_starts_only);
    let key = builtin_rules()[0].sample();
    let body = messages(&[&k8s_secret(&key)]);
    let s = many.scan(&view(&body, None)).unwrap();
    assert!(s.findings.iter().any(|f| f.rule_id == "openai-project-key"));
    let docker = base64::engine::general_purpose::STANDARD.encode(format!("bot:{key}"));
    let s = many.scan(&view(&messages(&[&docker]), None)).unwrap();
    assert!(s.findings.is_empty(), "{:?}", s.findings);
    let w = coverage_warnings(&cfg);
    assert!(
        w.iter()
            .any(|w| w.contains("only keys at the start of encoded data")),
        "{w:?}"
    );
}

#[test]
fn a_base64_wrapped_key_is_redacted_whole() {
    use base64::Engine as _;
    let key = builtin_rules()[0].sample();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
    let mut cfg = builtin_only();
    cfg.action = DlpAction::Redact;
    let body = messages(&[&k8s_secret(&key)]);
    let red = Scanner::new(&cfg)
        .unwrap()
        .redact(&view(&body, None))
        .unwrap();
    let new = String::from_utf8(red.body.expect("redacted")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&new).expect("still JSON");
    let content = v["messages"][0]["content"].as_str().unwrap();
    assert!(!content.contains(&b64[..20]), "{content}");
    assert!(
        content.contains("api-key: [REDACTED:openai-project-key]\n"),
        "{content}"
    );
}

#[test]
fn random_base64_data_is_not_a_finding() {
    use base64::Engine as _;
    // An inline image: a long run of base64 that contains prefix spellings
    // by chance only.
    let mut rng = Lcg(9);
    let bytes: Vec<u8> = (0..256 * 1024).map(|_| rng.below(256) as u8).collect();
    let img = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    let s = scan(&seed_policy(true), &view(&messages(&[&img]), None));
    assert!(s.findings.is_empty(), "{:?}", s.findings);
}

#[test]
fn provider_keys_of_the_catalog_are_found_pasted_and_in_base64() {
    use base64::Engine as _;
    let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let ids = [
        "groq-api-key",
        "xai-api-key",
        "openrouter-api-key",
        "perplexity-api-key",
        "huggingface-token",
        "anthropic-oauth-token",
    ];
    for id in ids {
        let r = builtin_rules().iter().find(|r| r.id == id).unwrap();
        let key = r.sample();
        // Pasted into a JSON prompt.
        let body = messages(&[&format!("here is my key {key} please debug")]);
        let s = scan(&builtin_only(), &view(&body, None));
        assert_found(&s, id, &key, "pasted");
        // Base64 with the key at a 3-byte group start: alone, after a
        // 3-byte user name (`Basic` style), and after `TOKEN=` (6 bytes).
        for text in [
            enc(&key),
            enc(&format!("ci:{key}")),
            enc(&format!("TOKEN={key}")),
        ] {
            let body = messages(&[&format!("decode this: {text}")]);
            let s = scan(&builtin_only(), &view(&body, None));
            assert_found(&s, id, &key, "base64");
        }
        // A near miss (one character short) is not this rule's.
        let short = &key[..key.len() - 1];
        if !id.starts_with("anthropic") {
            let body = messages(&[short]);
            let s = scan(&builtin_only(), &view(&body, None));
            assert!(!s.findings.iter().any(|f| f.rule_id == id), "{id}: {short}");
        }
    }
}

#[test]
fn the_whole_pack_keeps_both_literal_passes_on_the_packed_searcher() {
    // Every rule at every base64 alignment still fits the SIMD searcher
    // (shared 4-character heads; see `b64::HEAD`), so no key in base64 is
    // left to group starts only.
    let s = Scanner::new(&seed_policy(true)).unwrap();
    let (plain, b64) = (
        s.prefilter.as_ref().unwrap(),
        s.base64_prefilter.as_ref().unwrap(),
    );
    assert!(plain.is_packed(), "{} prefix literals", plain.heads());
    assert!(b64.is_packed(), "{} base64 heads", b64.heads());
    assert!(!s.base64_group_starts_only);
    // Far fewer heads than spellings: three alignments of ~30 rules.
    assert!(b64.heads() <= 128, "{}", b64.heads());
}

/// The key formats the provider catalog added (issue 13).
const CATALOG_FORMATS: &[&str] = &[
    "replicate-api-token",
    "aws-bedrock-api-key",
    "aws-bedrock-short-term-key",
    "together-api-key",
    "fireworks-api-key",
    "azure-openai-key",
    "azure-openai-legacy-key",
    "mistral-api-key",
    "cohere-api-key",
    "deepseek-api-key",
    "groq-api-key",
    "xai-api-key",
    "openrouter-api-key",
    "perplexity-api-key",
    "huggingface-token",
    "anthropic-oauth-token",
    "google-api-key",
];

#[test]
fn a_pasted_key_of_every_catalog_format_is_blocked_plain_encoded_and_escaped() {
    use base64::Engine as _;
    let cfg = builtin_only();
    let scanner = Scanner::new(&cfg).unwrap();
    for id in CATALOG_FORMATS {
        let rule = builtin_rules()
            .iter()
            .find(|r| r.id == *id)
            .unwrap_or_else(|| panic!("{id} is in the pack"));
        assert!(rule.provider.is_some(), "{id} names its provider");
        let key = rule.sample();
        let prompt =
            format!("Why does my client fail? I set it up like this: {key} and it says 401.");
        let found = |body: &[u8], enc: Option<&str>, how: &str| {
            let s = scanner.scan(&view(body, enc)).unwrap();
            assert!(
                s.findings.iter().any(|f| f.rule_id == *id),
                "{id} not found ({how}): {:?}",
                s.findings
            );
            assert_no_leak(&s, &key);
        };
        found(&messages(&[&prompt]), None, "pasted");
        // Base64: a `.env` line encoded whole, after a prefix of 0, 1 and 2 bytes.
        for pad in ["", "#", "# "] {
            // A 3-byte prefix has a long enough spelling at a group start only.
            if SHORT_PREFIX.contains(id) && !pad.is_empty() {
                continue;
            }
            let enc = base64::engine::general_purpose::STANDARD.encode(format!("{pad}{key}\n"));
            found(
                &messages(&[&format!("decode this: {enc}")]),
                None,
                "in base64",
            );
        }
        // JSON `\u` escapes for every character of the key.
        let escaped: String = key
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{escaped}"}}]}}"#);
        found(body.as_bytes(), None, "u-escaped");
        // Compressed.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&messages(&[&prompt])).unwrap();
        found(&gz.finish().unwrap(), Some("gzip"), "gzip");
        // And the block answer is what the policy says.
        assert_eq!(scanner.action(), DlpAction::Block);
    }
}

#[test]
fn context_formats_need_their_context_word_nearby() {
    let scanner = Scanner::new(&builtin_only()).unwrap();
    let ids = |text: &str| -> Vec<String> {
        scanner
            .scan(&view(&messages(&[text]), None))
            .unwrap()
            .findings
            .into_iter()
            .map(|f| f.rule_id)
            .collect()
    };
    for r in builtin_rules().iter().filter(|r| !r.context.is_empty()) {
        let sample = r.sample();
        // The sample is `<CONTEXT>_…=<key>`: the bare key is after the `=`.
        let bare = &sample[sample.find('=').map_or(0, |i| i + 1)..];
        assert!(
            ids(&sample).iter().any(|i| i == r.id),
            "{}: with context",
            r.id
        );
        let near_miss = format!("the build id is {bare} for this run");
        assert!(
            !ids(&near_miss).iter().any(|i| i == r.id),
            "{}: found without its context word",
            r.id
        );
        // The word further away than 40 characters on the line does not count.
        let far = format!(
            "{} is what we use; unrelated notes follow here at length: {bare}",
            r.context[0]
        );
        assert!(
            !ids(&far).iter().any(|i| i == r.id),
            "{}: found with its word far away",
            r.id
        );
        // Any case of the word, as written in code and config files.
        let mixed: String = r.context[0]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        for word in [
            r.context[0].to_lowercase(),
            r.context[0].to_uppercase(),
            mixed,
        ] {
            let t = format!("{word} api key: {bare}");
            assert!(ids(&t).iter().any(|i| i == r.id), "{}: {word}", r.id);
        }
    }
}

#[test]
fn a_text_body_with_json_escapes_is_scanned_decoded() {
    // Not one JSON document (a `:` inside an array), so scanned as text; the
    // key's first letter is written `\u0073`.
    let key = builtin_rules()[0].sample();
    let escaped = format!("\\u0073{}", &key[1..]);
    let body = format!(r#"{{"a":"{escaped}","b":["x":1]}}"#);
    let scanner = Scanner::new(&builtin_only()).unwrap();
    let s = scanner.scan(&view(body.as_bytes(), None)).unwrap();
    assert_eq!(s.body_kind, BodyKind::Text);
    let at = body.find(&escaped).unwrap();
    let found: Vec<&Finding> = s
        .findings
        .iter()
        .filter(|f| f.rule_id == "openai-project-key")
        .collect();
    // Reported where it sits in the raw body, escape included.
    assert_eq!(
        found.iter().map(|f| &f.location).collect::<Vec<_>>(),
        vec![&Location::Body {
            json_path: None,
            start: at,
            end: at + escaped.len(),
        }]
    );
    let red = scanner.redact(&view(body.as_bytes(), None)).unwrap();
    let out = String::from_utf8(red.body.unwrap()).unwrap();
    assert_eq!(
        out,
        body.replace(&escaped, "[REDACTED:openai-project-key]"),
        "the escaped key is replaced as written"
    );
    // A text body without escapes is scanned once, as before.
    let plain = format!("note: {key} end");
    let s = scanner.scan(&view(plain.as_bytes(), None)).unwrap();
    assert_eq!(s.findings.len(), 1, "{:?}", s.findings);
}

#[test]
fn working_bytes_counts_the_joined_view_the_decoded_copies_and_the_rewrite() {
    let limits = DecodeLimits {
        max_decoded_bytes: 4 * 1024 * 1024,
        max_ratio: 100,
        ratio_floor: 1024 * 1024,
    };
    let block = Scanner::new(&seed_policy(false))
        .unwrap()
        .with_limits(limits);
    let mut cfg = seed_policy(false);
    cfg.action = DlpAction::Redact;
    let redact = Scanner::new(&cfg).unwrap().with_limits(limits);
    // Identity: the joined view (and the rewritten body).
    for enc in [None, Some("identity"), Some(" identity , ")] {
        assert_eq!(block.working_bytes(1000, enc), 1000, "{enc:?}");
        assert_eq!(redact.working_bytes(1000, enc), 2000, "{enc:?}");
    }
    let chunk = 64 * 1024;
    // Small encoded bodies: the ratio floor; larger: the ratio; then the cap.
    assert_eq!(
        block.working_bytes(1000, Some("gzip")),
        2 * (1024 * 1024 + chunk)
    );
    assert_eq!(
        block.working_bytes(20_000, Some("br")),
        2 * (2_000_000 + chunk)
    );
    assert_eq!(
        block.working_bytes(1_000_000, Some("gzip, zstd")),
        2 * (4 * 1024 * 1024 + chunk)
    );
    assert_eq!(
        redact.working_bytes(1_000_000, Some("deflate")),
        3 * (4 * 1024 * 1024 + chunk)
    );
    assert_eq!(block.working_bytes(usize::MAX, None), usize::MAX);
}

#[test]
fn a_decoded_copy_never_grows_past_what_working_bytes_counted() {
    // About 3 MiB of two letters at random (a ratio well under 100), with a
    // size cap of 3.5 MiB: plain doubling would reach 4 MiB.
    let mut text = Vec::new();
    let mut x: u32 = 1;
    while text.len() < 3 * 1024 * 1024 + 12_345 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        text.push(if x >> 16 & 1 == 0 { b'a' } else { b'b' });
    }
    let body = gzip(&text);
    let limits = DecodeLimits {
        max_decoded_bytes: 3 * 1024 * 1024 + 512 * 1024,
        ..DecodeLimits::default()
    };
    let decoded = decode::decompress(&body, Some("gzip"), &limits).unwrap();
    assert_eq!(decoded.len(), text.len());
    let cap = decode::decoded_cap(body.len(), &limits);
    match decoded {
        std::borrow::Cow::Owned(v) => assert!(v.capacity() <= cap, "{} > {cap}", v.capacity()),
        std::borrow::Cow::Borrowed(_) => panic!("an encoded body came back borrowed"),
    }
    // Doubling alone would have passed it: the cap is what bounds it.
    assert!(text.len().next_power_of_two() > cap);
}

#[test]
fn a_redaction_marker_is_not_the_context_of_a_new_match() {
    // `[REDACTED:mistral-api-key]` holds the word `mistral`: a key-shaped
    // token just after a redacted key must not become a match once the
    // marker stands there (found by the dlp fuzz target).
    let mut cfg = builtin_only();
    cfg.action = DlpAction::Redact;
    let scanner = Scanner::new(&cfg).unwrap();
    for r in builtin_rules().iter().filter(|r| !r.context.is_empty()) {
        let sample = r.sample();
        let bare = &sample[sample.find('=').map_or(0, |i| i + 1)..];
        // Too far from the word in the request, near the marker after redaction.
        let text = format!("{sample} here: {bare}");
        let req = view(text.as_bytes(), None);
        let red = scanner.redact(&req).unwrap();
        assert!(red.findings.iter().any(|f| f.rule_id == r.id), "{}", r.id);
        let out = red.body.unwrap();
        let again = scanner.scan(&view(&out, None)).unwrap();
        assert!(
            !again.findings.iter().any(|f| f.rule_id == r.id),
            "{}: {:?} in {}",
            r.id,
            again.findings,
            String::from_utf8_lossy(&out)
        );
    }
}

#[test]
fn a_body_that_only_looks_like_json_is_scanned_as_text() {
    // A walker that took any run of letters and digits after a digit for a
    // number read these as JSON documents with no string in them, and
    // scanned nothing (found by the dlp fuzz target).
    let mut cfg = builtin_only();
    cfg.detect_patterns =
        vec!["[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}".into()];
    let scanner = Scanner::new(&cfg).unwrap();
    let key = builtin_rules()[0].sample();
    for (body, rule) in [
        (
            " 3f2a9c1e-7b4d-4e8a-9c2f-0d1e2f3a4b5c ".to_string(),
            "detect-pattern-0",
        ),
        (format!("1{key}"), "openai-project-key"),
        (format!(r#"{{"a": [1, 0{key}]}}"#), "openai-project-key"),
    ] {
        let s = scanner.scan(&view(body.as_bytes(), None)).unwrap();
        assert_eq!(s.body_kind, BodyKind::Text, "{body}");
        assert!(
            s.findings.iter().any(|f| f.rule_id == rule),
            "{body}: {:?}",
            s.findings
        );
    }
    // Real numbers still make JSON.
    let s = scanner
        .scan(&view(
            br#"{"a": [1, -2.5e3, 0, true, null], "b": "x"}"#,
            None,
        ))
        .unwrap();
    assert_eq!(s.body_kind, BodyKind::Json);
}

#[test]
fn a_raw_line_break_inside_a_json_string_makes_the_body_text() {
    // Invalid JSON a lenient parser may accept: a key split by a raw line
    // break inside a string is found as it is in text (found by the dlp
    // fuzz target: it was found only after redaction re-escaped the break).
    let scanner = Scanner::new(&builtin_only()).unwrap();
    let key = builtin_rules()[0].sample();
    let (a, b) = key.split_at(key.len() / 2);
    let body = format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"{a}\n{b}\"}}]}}");
    let s = scanner.scan(&view(body.as_bytes(), None)).unwrap();
    assert_eq!(s.body_kind, BodyKind::Text);
    assert!(
        s.findings.iter().any(|f| f.rule_id == "openai-project-key"),
        "{:?}",
        s.findings
    );
    // Line breaks between tokens (pretty-printed JSON) are fine.
    let pretty = format!("{{\n  \"messages\": [\n    {{\"content\": \"{key}\"}}\n  ]\n}}\n");
    let s = scanner.scan(&view(pretty.as_bytes(), None)).unwrap();
    assert_eq!(s.body_kind, BodyKind::Json);
    assert!(s.findings.iter().any(|f| f.rule_id == "openai-project-key"));
}
