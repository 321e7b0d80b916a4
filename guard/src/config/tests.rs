//! Loader tests: the seed and example files, every validation rule, and
//! inputs that must never panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const CONFIG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
const SEED: &str = include_str!("../../../config/provider-key-rotation.yaml");

fn ok(text: &str) -> Config {
    match parse(text, Path::new("t.yaml")) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn errs(text: &str) -> ConfigErrors {
    match parse(text, Path::new("t.yaml")) {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(e) => e,
    }
}

/// A valid config with `extra` appended (top-level sections).
fn with(extra: &str) -> String {
    format!(
        "providers:\n  targets:\n    - id: main\n      provider: openai\n      \
         secret_key_ref:\n        env: OPENAI_API_KEY\n{extra}"
    )
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

/// Every file under `config/` loads; those under `config/invalid/` fail with
/// exactly the text in their `.expected` sibling. `KT_BLESS=1` rewrites those.
#[test]
fn every_file_in_config_dir() {
    let root = Path::new(CONFIG_DIR);
    let mut files = Vec::new();
    yaml_files(root, &mut files);
    files.sort();
    let bless = std::env::var_os("KT_BLESS").is_some();
    let (mut valid, mut invalid) = (0, 0);
    for path in &files {
        let rel = path.strip_prefix(root).unwrap();
        // Stable names in messages, whatever the checkout's location.
        let shown = Path::new("config").join(rel);
        let text = std::fs::read_to_string(path).unwrap();
        let parsed = parse(&text, &shown);
        let loaded = load(path);
        if rel.starts_with("invalid") {
            invalid += 1;
            let rendered = match parsed {
                Ok(_) => panic!("{} should be invalid", rel.display()),
                Err(e) => e.to_string(),
            };
            assert!(
                matches!(loaded, Err(LoadError::Invalid(_))),
                "{}: load() disagrees with parse()",
                rel.display()
            );
            let expected_path = path.with_extension("expected");
            if bless {
                std::fs::write(&expected_path, format!("{rendered}\n")).unwrap();
            }
            let expected = std::fs::read_to_string(&expected_path)
                .unwrap_or_else(|_| panic!("missing {}", expected_path.display()));
            assert_eq!(
                rendered,
                expected.trim_end_matches('\n'),
                "{}",
                rel.display()
            );
        } else {
            valid += 1;
            if let Err(e) = parsed {
                panic!("{} should load:\n{e}", rel.display());
            }
            let config = loaded.unwrap();
            assert_eq!(config.source, *path);
        }
    }
    assert!(
        valid >= 4,
        "found only {valid} valid configs in {CONFIG_DIR}"
    );
    assert!(invalid >= 15, "found only {invalid} invalid configs");
}

#[test]
fn seed_loads_as_written() {
    let c = parse(SEED, Path::new("config/provider-key-rotation.yaml")).unwrap();
    assert_eq!(c.pack.name, "provider-key-rotation");
    assert_eq!(c.pack.version, "1.0.0");
    assert!(c.pack.enabled);
    assert_eq!(c.providers.strategy, RoutingStrategy::Ordered);
    assert!(c.providers.fallback);
    let t = &c.providers.targets;
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].id, "openai-2026q2");
    assert_eq!(t[0].provider, Provider::OpenAi);
    assert_eq!(t[0].model.as_deref(), Some("gpt-5.4-mini-mini"));
    assert!(t[0].required);
    assert_eq!(
        t[0].secret_key_ref,
        SecretKeyRef::Store("OPENAI_API_KEY_2026Q2".into())
    );
    assert_eq!(t[1].id, "openai-2026q1");
    assert!(!t[1].required);
    assert_eq!(
        t[1].secret_key_ref,
        SecretKeyRef::Store("OPENAI_API_KEY_2026Q1".into())
    );
    assert_eq!(t[1].base_url, None);
    assert_eq!(
        c.chain,
        vec![PolicyKind::DlpFilter, PolicyKind::AuditLogger]
    );
    let dlp = c.dlp.unwrap();
    assert_eq!(
        dlp.detect_patterns,
        vec![
            "sk-[A-Za-z0-9]{20,}",
            "AKIA[0-9A-Z]{16}",
            "ghp_[0-9A-Za-z]{36}"
        ]
    );
    assert_eq!(
        dlp.blocked_terms,
        vec!["openai production key", "anthropic billing token"]
    );
    assert_eq!(dlp.action, DlpAction::Block);
    assert!(dlp.fuzzy_matching);
    assert_eq!(dlp.max_distance, 1);
    assert!(dlp.builtin_rules);
    assert_eq!(c.audit, Some(AuditLogger::default()));
    assert_eq!(c.gateway, GatewaySettings::default());
    assert_eq!(c.capture, Capture::default());
}

#[test]
fn seed_with_published_indentation_of_fallback_loads() {
    // The published text lost its indentation: read as fallback under routing.
    let text = SEED.replace(
        "  fallback:\n    enabled: true\n",
        "    fallback:\n      enabled: true\n",
    );
    assert_ne!(text, SEED);
    let c = ok(&text);
    assert!(c.providers.fallback);
    assert_eq!(c.providers.targets.len(), 2);
}

#[test]
fn fallback_in_either_place_is_one_setting() {
    let base = "  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {env: K}\n";
    let under_providers = format!("providers:\n  fallback:\n    enabled: false\n{base}");
    assert!(!ok(&under_providers).providers.fallback);
    let under_routing =
        format!("providers:\n  routing:\n    fallback:\n      enabled: false\n{base}");
    assert!(!ok(&under_routing).providers.fallback);
    let both_agree = format!(
        "providers:\n  routing:\n    fallback: {{enabled: false}}\n  fallback: {{enabled: false}}\n{base}"
    );
    assert!(!ok(&both_agree).providers.fallback);
    let neither = format!("providers:\n{base}");
    assert!(ok(&neither).providers.fallback, "fallback defaults to on");

    let disagree = format!(
        "providers:\n  routing:\n    fallback: {{enabled: false}}\n  fallback: {{enabled: true}}\n{base}"
    );
    let e = errs(&disagree);
    assert_eq!(e.len(), 1);
    let e = &e.as_slice()[0];
    assert!(
        e.message
            .contains("`providers.fallback.enabled` is true (line 4)"),
        "{e}"
    );
    assert!(
        e.message
            .contains("`providers.routing.fallback.enabled` is false (line 3)"),
        "{e}"
    );
    // Points at the later of the two.
    assert_eq!((e.line, e.column), (4, 23));
}

#[test]
fn defaults_fill_everything_the_file_leaves_out() {
    let c = ok(&with(""));
    assert_eq!(c.pack.name, "t");
    assert!(c.pack.enabled);
    assert!(c.providers.fallback);
    assert!(c.providers.targets[0].required, "required defaults to true");
    assert_eq!(
        c.chain,
        vec![PolicyKind::DlpFilter, PolicyKind::AuditLogger]
    );
    assert_eq!(c.dlp, Some(DlpFilter::default()));
    assert_eq!(c.audit, Some(AuditLogger::default()));
    assert_eq!(
        c.gateway.listen,
        "127.0.0.1:8787".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.gateway.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.capture.ports, vec![443]);
}

#[test]
fn chain_entry_without_section_runs_with_defaults() {
    let c = ok(&with("policies:\n  chain: [dlp-filter]\n"));
    assert_eq!(c.chain, vec![PolicyKind::DlpFilter]);
    let dlp = c.dlp.unwrap();
    assert_eq!(dlp.action, DlpAction::Block);
    assert!(!dlp.fuzzy_matching);
    assert_eq!(dlp.max_distance, 1);
    assert!(dlp.builtin_rules);
    assert!(dlp.detect_patterns.is_empty());
    assert_eq!(c.audit, None, "not in the chain, no section");

    let empty = ok(&with("policies:\n  chain: []\n"));
    assert!(empty.chain.is_empty());
    let null_section = ok(&with("policy:\n  audit-logger:\n"));
    assert_eq!(null_section.audit, Some(AuditLogger::default()));
}

#[test]
fn full_example_sets_every_optional_section() {
    let c = load(&Path::new(CONFIG_DIR).join("full.yaml")).unwrap();
    assert!(!c.providers.fallback);
    let t = &c.providers.targets;
    assert_eq!(
        t[0].secret_key_ref,
        SecretKeyRef::Env("OPENAI_API_KEY".into())
    );
    assert_eq!(t[0].base_url.as_deref(), Some("https://api.openai.com/v1"));
    assert_eq!(t[1].provider, Provider::Anthropic);
    assert_eq!(
        t[1].secret_key_ref,
        SecretKeyRef::Store("ANTHROPIC_API_KEY_2026Q2".into())
    );
    assert_eq!(
        c.chain,
        vec![PolicyKind::AuditLogger, PolicyKind::DlpFilter]
    );
    let dlp = c.dlp.unwrap();
    assert_eq!(dlp.action, DlpAction::Audit);
    assert_eq!(dlp.max_distance, 2);
    assert!(!dlp.builtin_rules);
    assert_eq!(dlp.detect_patterns[1], r"\bxox[bp]-[0-9A-Za-z-]{10,}");
    let audit = c.audit.unwrap();
    assert_eq!(audit.max_events, 50_000);
    assert_eq!(audit.on_store_failure, StoreFailure::Refuse);
    let sinks: Vec<String> = audit.sinks.iter().map(SinkConfig::name).collect();
    assert_eq!(
        sinks,
        [
            "file:/var/log/kt/events.jsonl",
            "stdout",
            "syslog:udp://127.0.0.1:514"
        ]
    );
    assert_eq!(audit.sinks[0].queue, 20_000);
    let g = &c.gateway;
    assert_eq!(g.listen, "127.0.0.1:9787".parse::<SocketAddr>().unwrap());
    assert_eq!(
        g.capture_listen,
        "127.0.0.1:9788".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(g.capture_listen6, Some("[::1]:9788".parse().unwrap()));
    assert_eq!(g.connect_timeout, Duration::from_millis(250));
    assert_eq!(g.first_byte_timeout, Duration::from_secs(120));
    assert_eq!(g.idle_timeout, Duration::from_secs(90));
    assert_eq!(g.max_body_bytes, 1_048_576);
    assert_eq!(g.max_retry_after, Duration::ZERO);
    assert!(g.connect_allow.is_empty());
    let cap = &c.capture;
    assert_eq!(
        cap.cgroup.as_deref(),
        Some(Path::new("/sys/fs/cgroup/ci.slice"))
    );
    assert_eq!(
        cap.hosts.as_deref(),
        Some(
            &[
                "api.openai.com".to_string(),
                "api.anthropic.com".to_string()
            ][..]
        )
    );
    assert_eq!(
        cap.cidrs,
        vec![
            IpPrefix {
                addr: "10.20.0.0".parse().unwrap(),
                len: 16
            },
            IpPrefix {
                addr: "2001:db8::".parse().unwrap(),
                len: 32
            },
        ]
    );
    assert_eq!(cap.ports, vec![443, 8443]);
    assert_eq!(cap.scope, CaptureScope::Port);
    assert!(cap.containers.enabled);
    assert_eq!(cap.containers.address, Containers::ADDRESS);
    assert_eq!(cap.providers, CaptureProviders::All);
    assert_eq!(
        t[2].base_url.as_deref(),
        Some("https://contoso-eu.openai.azure.com")
    );
    assert_eq!(
        t[3].base_url.as_deref(),
        Some("https://bedrock-runtime.eu-west-1.amazonaws.com")
    );
    assert_eq!(t[4].provider.name(), "vllm");
    assert_eq!(t[4].base_url.as_deref(), Some("https://llm.internal/v1"));
    let proxies: Vec<String> = cap.proxies.iter().map(ToString::to_string).collect();
    assert_eq!(proxies, ["proxy.corp.example:3128", "10.0.0.8:8080"]);
    assert_eq!(
        g.upstream_proxy
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("proxy.corp.example:3128")
    );
    assert_eq!(
        g.proxy_listen,
        "127.0.0.1:9710".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(cap.egress.mode, EgressMode::Audit);
    assert_eq!(cap.egress.allow.len(), 4);
    assert_eq!(cap.egress.allow[1].port, Some(22));
    assert_eq!(
        cap.egress.resolvers,
        Some(vec!["10.0.0.2".parse().unwrap()])
    );
}

#[test]
fn egress_and_proxy_errors_name_the_entry() {
    let e = errs(&with(
        "capture:\n  proxies: [proxy.corp]\n  egress:\n    mode: strict\n    allow: [\"10.0.0.1/8\"]\n    resolvers: [dns.corp]\n",
    ));
    let text = e.to_string();
    for needle in [
        "capture.proxies[0]",
        "unknown egress mode `strict`",
        "capture.egress.allow[0]",
        "capture.egress.resolvers[0]",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

#[test]
fn unknown_provider_with_base_url_is_accepted() {
    let c = load(&Path::new(CONFIG_DIR).join("anthropic-with-base-url.yaml")).unwrap();
    assert_eq!(
        c.providers.targets[1].provider,
        Provider::Other("vllm".into())
    );
    assert_eq!(
        c.providers.targets[1].base_url.as_deref(),
        Some("http://127.0.0.1:9000/v1")
    );
}

#[test]
fn malformed_yaml_gives_position() {
    let e = errs("providers:\n  targets:\n    - id: a\n   bad: [\n");
    assert_eq!(e.len(), 1);
    let e = &e.as_slice()[0];
    assert!(e.message.starts_with("malformed YAML: "), "{e}");
    assert_eq!(e.line, 4, "{e}");
    assert!(e.column >= 1);
    assert!(e.hint.is_some());

    let tab = errs("providers:\n\ttargets: []\n");
    assert_eq!(tab.as_slice()[0].line, 2, "{tab}");
}

#[test]
fn wrong_type_names_key_and_found_type() {
    let e = errs(&with(
        "gateway:\n  splice_unknown_sni: \"no\"\n  max_body_bytes: [1]\n",
    ));
    assert_eq!(
        e.to_string(),
        "t.yaml:8:23: `gateway.splice_unknown_sni` must be true or false, found a string\n  \
         hint: write true or false, without quotes\n\
         t.yaml:9:19: `gateway.max_body_bytes` must be a whole number, found a list\n  \
         hint: a size in bytes, e.g. 16777216 for 16 MiB"
    );
    let quoted = errs(&with("policy:\n  dlp-filter:\n    max_distance: \"1\"\n"));
    assert_eq!(
        quoted.as_slice()[0].hint.as_deref(),
        Some("write the number without quotes")
    );
}

#[test]
fn unknown_key_lists_expected_and_suggests() {
    let e = errs(&with("gateway:\n  listn: 127.0.0.1:8787\n"));
    assert_eq!(
        e.to_string(),
        "t.yaml:8:3: unknown key `listn` in `gateway` (expected one of: listen, capture_listen, \
         capture_listen6, connect_timeout, first_byte_timeout, idle_timeout, max_body_bytes, \
         max_retry_after, splice_unknown_sni, connect_allow, max_connections, max_connections_per_uid, body_timeout, max_buffered_bytes, cooldown_after, cooldown, probe_interval, clients, allow_remote_clients, metrics, allow_remote_metrics, mode, credentials, upstream_proxy, proxy_listen)\n  hint: did you mean `listen`?"
    );
    let top = errs(&with("gatway: {}\n"));
    assert!(
        top.to_string()
            .contains("unknown key `gatway` at the top level"),
        "{top}"
    );
    assert!(top.to_string().contains("did you mean `gateway`?"), "{top}");
}

#[test]
fn duplicate_mapping_keys_are_errors() {
    let e = errs(&with(
        "gateway:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:2\n",
    ));
    assert_eq!(e.len(), 1);
    let e = &e.as_slice()[0];
    assert_eq!((e.line, e.column), (9, 3));
    assert_eq!(
        e.message,
        "duplicate key `listen` in `gateway` (first on line 8)"
    );
}

#[test]
fn duplicate_target_ids_point_at_second() {
    let text = "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {env: A}\n    - id: a\n      provider: openai\n      secret_key_ref: {env: B}\n";
    let e = errs(text);
    assert_eq!(e.len(), 1);
    let e = &e.as_slice()[0];
    assert_eq!((e.line, e.column), (6, 11));
    assert!(e.message.contains("duplicate target id `a`"));
    assert!(e.message.contains("first used on line 3"));
}

#[test]
fn secret_key_ref_needs_exactly_one_valid_name() {
    let target = |r: &str| {
        format!(
            "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {r}\n"
        )
    };
    let both = errs(&target("{env: A, store: B}"));
    assert!(
        both.to_string().contains("sets both `env` and `store`"),
        "{both}"
    );
    let neither = errs(&target("{}"));
    assert!(neither.to_string().contains("names no secret"), "{neither}");
    let null = errs(&target(""));
    assert!(null.to_string().contains("names no secret"), "{null}");
    for bad in ["1KEY", "MY-KEY", "MY KEY", "'é'"] {
        let e = errs(&target(&format!("{{env: {bad}}}")));
        assert!(
            e.to_string().contains("is not a valid secret name"),
            "{bad}: {e}"
        );
    }
    for good in ["_K", "OPENAI_API_KEY_2026Q2", "k"] {
        let c = ok(&target(&format!("{{store: {good}}}")));
        assert_eq!(c.providers.targets[0].secret_key_ref.name(), good);
    }
}

#[test]
fn secret_key_ref_file_takes_a_path_relative_to_the_config_file() {
    let target = |r: &str| {
        format!(
            "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {r}\n"
        )
    };
    let parse_at = |text: &str, at: &str| parse(text, Path::new(at)).unwrap();
    let abs = parse_at(
        &target("{file: /run/credentials/kt.service/openai}"),
        "t.yaml",
    );
    let r = &abs.providers.targets[0].secret_key_ref;
    assert_eq!(
        *r,
        SecretKeyRef::File("/run/credentials/kt.service/openai".into())
    );
    assert_eq!(r.kind(), "file");
    assert_eq!(r.to_string(), "file:/run/credentials/kt.service/openai");
    assert_eq!(r.name(), "/run/credentials/kt.service/openai");
    let rel = parse_at(&target("{file: keys/openai}"), "/etc/kt/policy.yaml");
    assert_eq!(
        rel.providers.targets[0].secret_key_ref,
        SecretKeyRef::File("/etc/kt/keys/openai".into())
    );

    let two = errs(&target("{env: A, file: /k}"));
    assert!(
        two.to_string().contains("sets both `env` and `file`"),
        "{two}"
    );
    let three = errs(&target("{env: A, store: B, file: /k}"));
    assert!(
        three.to_string().contains("sets `env`, `store` and `file`"),
        "{three}"
    );
    let e = errs(&target("{file: ''}"));
    assert!(e.to_string().contains("is empty"), "{e}");
    let e = errs(&target("{file: /run/keys/}"));
    assert!(e.to_string().contains("is not a file path"), "{e}");
    let pasted = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";
    let e = errs(&target(&format!("{{file: {pasted}}}")));
    assert!(e.to_string().contains("looks like a key itself"), "{e}");
    assert!(!e.to_string().contains(pasted), "{e}");
    // Unknown keys stay errors, with the position.
    let e = errs(&target("{file: /k, mode: 0600}"));
    let first = e.iter().next().unwrap();
    assert!(first.message.contains("mode"), "{e}");
    assert_eq!(first.line, 5);
}

#[test]
fn secret_values_never_appear_in_errors() {
    let key = "sk-proj-Zq8Xr2Lm4Nn6Pp0Tt1Vv3Ww5Yy7Aa9";
    let password = "hunter2-not-shown";
    let text = format!(
        "providers:\n  targets:\n    - id: a\n      provider: openai\n      \
         base_url: https://me:{password}@api.openai.com/v1\n      secret_key_ref: {{env: {key}}}\n"
    );
    let e = errs(&text);
    assert_eq!(e.len(), 2, "{e}");
    let shown = format!("{e}\n{e:?}\n{}", serde_json::to_string(&e).unwrap());
    assert!(!shown.contains(key), "{shown}");
    assert!(!shown.contains("Zq8Xr2"), "{shown}");
    assert!(!shown.contains(password), "{shown}");
    assert!(shown.contains("looks like a key itself"), "{shown}");
    assert!(shown.contains("carries credentials"), "{shown}");
}

#[test]
fn invalid_regex_names_pattern_and_reason() {
    let e = errs(&with(
        "policy:\n  dlp-filter:\n    detect_patterns: ['ok', 'a[b', 'c(']\n",
    ));
    let text = e.to_string();
    assert_eq!(e.len(), 2, "{text}");
    assert!(text.contains("invalid regex `a[b` in `policy.dlp-filter.detect_patterns[1]`: unclosed character class"), "{text}");
    assert!(
        text.contains(
            "invalid regex `c(` in `policy.dlp-filter.detect_patterns[2]`: unclosed group"
        ),
        "{text}"
    );
    // One line per problem plus its hint line.
    assert_eq!(text.lines().count(), 4, "{text}");
}

/// Found by the config fuzz target: the loader took such a term and the
/// DLP scanner then refused it at start-up, with no position.
#[test]
fn blocked_term_without_letters_or_digits_is_refused_with_its_position() {
    let e = errs(&with(
        "policy:\n  dlp-filter:\n    blocked_terms: ['billing token', '!!! ...']\n",
    ));
    let text = e.to_string();
    assert_eq!(e.len(), 1, "{text}");
    assert!(
        text.contains(
            "blocked term `!!! ...` in `policy.dlp-filter.blocked_terms[1]` has no letters or digits"
        ),
        "{text}"
    );
    let lines = with("policy:\n  dlp-filter:\n    blocked_terms: ['billing token', '!!! ...']\n");
    let line = lines
        .lines()
        .position(|l| l.contains("blocked_terms"))
        .unwrap()
        + 1;
    assert_eq!(e.iter().next().unwrap().line, line, "{text}");
}

#[test]
fn chain_names_must_be_known_and_unique() {
    let e = errs(&with(
        "policies:\n  chain: [dlp-filter, audit-loger, dlp-filter]\n",
    ));
    let text = e.to_string();
    assert!(text.contains("t.yaml:8:23: unknown policy `audit-loger` in `policies.chain` (expected one of: dlp-filter, audit-logger)"), "{text}");
    assert!(text.contains("did you mean `audit-logger`?"), "{text}");
    assert!(
        text.contains("t.yaml:8:36: policy `dlp-filter` appears twice"),
        "{text}"
    );
}

#[test]
fn unknown_provider_needs_base_url_and_base_url_is_http() {
    let target = |extra: &str| {
        format!(
            "providers:\n  targets:\n    - id: a\n      provider: Acme\n      secret_key_ref: {{env: K}}\n{extra}"
        )
    };
    let e = errs(&target(""));
    assert_eq!(
        e.to_string(),
        "t.yaml:4:17: unknown provider `Acme` in `providers.targets[0]` has no `base_url`\n  \
         hint: known providers are openai, anthropic, mistral, groq, deepseek, xai, openrouter, \
         together, fireworks, perplexity, cohere, huggingface, gemini, azure, bedrock; for another \
         (OpenAI-compatible) endpoint add `base_url: https://...`, or define it in `providers.custom`"
    );
    let c = ok(&target("      base_url: https://llm.acme.example/v1\n"));
    assert_eq!(
        c.providers.targets[0].provider,
        Provider::Other("acme".into())
    );
    for bad in ["ftp://x/v1", "api.mistral.ai/v1", "https://", "http://a b"] {
        let e = errs(&target(&format!("      base_url: \"{bad}\"\n")));
        assert!(
            e.to_string().contains("is not an http:// or https:// URL"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn max_distance_range() {
    for (d, good) in [(0, true), (3, true), (4, false), (255, false), (256, false)] {
        let text = with(&format!("policy:\n  dlp-filter:\n    max_distance: {d}\n"));
        match parse(&text, Path::new("t.yaml")) {
            Ok(c) => {
                assert!(good, "{d} accepted");
                assert_eq!(u64::from(c.dlp.unwrap().max_distance), d);
            }
            Err(e) => {
                assert!(!good, "{d} rejected: {e}");
                assert!(e.to_string().contains(&format!(
                    "`policy.dlp-filter.max_distance` is {d}, out of range (0 to {MAX_FUZZY_DISTANCE})"
                )));
            }
        }
    }
    let negative = errs(&with("policy:\n  dlp-filter:\n    max_distance: -1\n"));
    assert!(negative.to_string().contains("out of range"), "{negative}");
}

#[test]
fn no_targets_and_strategy_and_disabled_pack() {
    let none = errs("providers:\n  targets: []\n");
    assert!(
        none.to_string()
            .contains("no targets: `providers.targets` is empty"),
        "{none}"
    );
    let missing = errs("pack: {name: x}\n");
    assert!(
        missing.to_string().contains("no `providers` section"),
        "{missing}"
    );
    let strategy = errs(&with("").replace(
        "providers:\n",
        "providers:\n  routing: {strategy: weighted}\n",
    ));
    assert!(
        strategy
            .to_string()
            .contains("unsupported routing strategy `weighted`"),
        "{strategy}"
    );
    let disabled = errs(&with("pack:\n  name: p\n  enabled: false\n"));
    assert_eq!(
        disabled.as_slice()[0].message,
        "pack `p` is disabled: nothing would run"
    );
    assert_eq!(
        (disabled.as_slice()[0].line, disabled.as_slice()[0].column),
        (9, 12)
    );
}

#[test]
fn addresses_durations_cidrs_ports() {
    let c = ok(&with(
        "gateway:\n  listen: \"[::1]:1\"\n  capture_listen6: null\n  idle_timeout: 2m\n  connect_timeout: 7\ncapture:\n  cidrs: [\"192.0.2.7\", \"::/0\", 0.0.0.0/0]\n  ports: [1, 65535]\n",
    ));
    assert_eq!(c.gateway.listen, "[::1]:1".parse::<SocketAddr>().unwrap());
    assert_eq!(c.gateway.capture_listen6, None);
    assert_eq!(c.gateway.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.gateway.connect_timeout, Duration::from_secs(7));
    assert_eq!(c.capture.cidrs[0].len, 32);
    assert_eq!(c.capture.cidrs[1].len, 0);
    assert_eq!(c.capture.ports, vec![1, 65535]);
    assert_eq!(c.capture.scope, CaptureScope::Provider);
    let port_wide = ok(&with("capture:\n  scope: port\n"));
    assert_eq!(port_wide.capture.scope, CaptureScope::Port);

    // Containers: off by default; a boolean or a mapping (which means on).
    assert!(!c.capture.containers.enabled);
    let on = ok(&with("capture:\n  containers: true\n"))
        .capture
        .containers;
    assert!(on.enabled);
    assert_eq!(on.address, Containers::ADDRESS);
    assert_eq!(on.address6, Some(Containers::ADDRESS6));
    let chosen = ok(&with(
        "capture:\n  containers:\n    address: 169.254.9.9\n    address6: null\n",
    ))
    .capture
    .containers;
    assert!(chosen.enabled);
    assert_eq!(chosen.address.to_string(), "169.254.9.9");
    assert_eq!(chosen.address6, None);
    let off = ok(&with("capture:\n  containers:\n    enabled: false\n"))
        .capture
        .containers;
    assert!(!off.enabled);

    let bad = [
        (
            "gateway:\n  listen: 127.0.0.1\n",
            "invalid socket address `127.0.0.1`",
        ),
        (
            "gateway:\n  connect_timeout: 5 sec\n",
            "invalid duration `5 sec`",
        ),
        (
            "gateway:\n  connect_timeout: 1.5s\n",
            "invalid duration `1.5s`",
        ),
        (
            "gateway:\n  idle_timeout: 0ms\n",
            "`gateway.idle_timeout` must be longer than zero",
        ),
        (
            "capture:\n  cidrs: [10.1.2.3/8]\n",
            "did you mean 10.0.0.0/8?",
        ),
        (
            "capture:\n  cidrs: ['::1/129']\n",
            "the prefix length must be 0 to 128",
        ),
        (
            "capture:\n  ports: [0]\n",
            "`capture.ports[0]` is 0, out of range (1 to 65535)",
        ),
        ("capture:\n  ports: [65536]\n", "out of range (1 to 65535)"),
        ("capture:\n  ports: []\n", "`capture.ports` is empty"),
        (
            "capture:\n  hosts: ['api.openai.com:443']\n",
            "invalid host name",
        ),
        (
            "capture:\n  scope: everything\n",
            "unknown capture scope `everything` in `capture.scope` (expected provider or port)",
        ),
        ("capture:\n  scope: 443\n", "capture.scope"),
        (
            "capture:\n  containers: yes please\n",
            "`capture.containers` must be true or false",
        ),
        (
            "capture:\n  containers:\n    address: 127.0.0.2\n",
            "`capture.containers.address` must be a usable IPv4 address",
        ),
        (
            "capture:\n  containers:\n    address6: '::1'\n",
            "`capture.containers.address6` must be a usable IPv6 address",
        ),
        ("capture:\n  containers:\n    bridge: docker0\n", "bridge"),
    ];
    for (extra, want) in bad {
        let e = errs(&with(extra));
        assert!(e.to_string().contains(want), "{extra}: {e}");
    }
}

#[test]
fn every_problem_is_reported_together_in_file_order() {
    let text = "pack:\n  enabled: false\nproviders:\n  routing: {strategy: random}\n  targets:\n    - id: a\n      provider: acme\n      secret_key_ref: {store: OPENAI-KEY}\npolicy:\n  dlp-filter:\n    max_distance: 9\ngateway:\n  listn: x\n";
    let e = errs(text);
    let at: Vec<(usize, &str)> = e
        .iter()
        .map(|e| (e.line, e.message.split(' ').next().unwrap_or("")))
        .collect();
    assert_eq!(
        at,
        vec![
            (2, "pack"),
            (4, "unsupported"),
            (7, "unknown"),
            (8, "`providers.targets[0].secret_key_ref.store`"),
            (11, "`policy.dlp-filter.max_distance`"),
            (13, "unknown"),
        ]
    );
}

#[test]
fn empty_and_non_mapping_documents() {
    for text in ["", "# nothing\n", "---\n", "~\n"] {
        let e = errs(text);
        assert_eq!(e.len(), 1, "{text:?}: {e}");
    }
    let list = errs("- a\n- b\n");
    assert!(
        list.to_string()
            .contains("the top level must be a mapping (key: value), found a list"),
        "{list}"
    );
    let two = errs(&format!("{}---\na: 1\n", with("")));
    assert!(two.to_string().contains("a second YAML document"), "{two}");
}

#[test]
fn anchors_and_aliases_resolve() {
    let text = "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: &ref {env: K}\n    - id: b\n      provider: openai\n      secret_key_ref: *ref\n";
    let c = ok(text);
    assert_eq!(
        c.providers.targets[1].secret_key_ref,
        SecretKeyRef::Env("K".into())
    );
}

#[test]
fn hostile_documents_are_refused_without_panic() {
    let deep = format!("a: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    let e = errs(&deep);
    assert_eq!(e.len(), 1, "{e}");
    assert_eq!(e.as_slice()[0].line, 1);
    let flow = format!("a: {}{}", "[".repeat(70), "]".repeat(70));
    assert!(
        errs(&flow)
            .to_string()
            .contains("nesting deeper than 64 levels")
    );
    let block: String = (0..2000)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    let e = errs(&block);
    assert!(
        e.to_string().contains("nesting deeper than 64 levels"),
        "{e}"
    );
    // Each level doubles: 2^30 nodes if expanded naively.
    let mut laughs = String::from("a: &a0 [x, x]\n");
    for i in 1..30 {
        laughs.push_str(&format!("b{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
    }
    let e = errs(&laughs);
    assert!(e.to_string().contains("expands to more than"), "{e}");
    let tagged = errs(&with("pack: !custom {name: x}\n"));
    assert!(
        tagged.to_string().contains("unsupported YAML tag"),
        "{tagged}"
    );
}

#[test]
fn prefixes_and_line_deletions_of_seed_never_panic() {
    let mut checked = 0;
    for (i, _) in SEED.char_indices() {
        let _ = parse(&SEED[..i], Path::new("t.yaml"));
        checked += 1;
    }
    let lines: Vec<&str> = SEED.lines().collect();
    for skip in 0..lines.len() {
        let text: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| *l)
            .collect();
        let _ = parse(&text.join("\n"), Path::new("t.yaml"));
        checked += 1;
    }
    assert!(checked > SEED.len());
    // A short prefix is a config with problems, not a panic and not a success.
    assert!(parse(&SEED[..40], Path::new("t.yaml")).is_err());
}

#[test]
fn mutated_examples_never_panic() {
    const FULL: &str = include_str!("../../../config/full.yaml");
    const BITS: &[&str] = &[
        ":", "- ", " ", "\n", "[", "]", "{", "}", "'", "\"", "&a ", "*a", "!x ", "#", "\t", "? ",
        "|", ">", "%", ",", "`", "é", "---\n", "~", "0x", "-1", "\\",
    ];
    // A fixed linear congruential generator: reproducible, no extra crate.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from(state >> 33).unwrap() % n
    };
    let (mut accepted, mut rejected) = (0, 0);
    for round in 0..600 {
        let mut text = if round % 2 == 0 { SEED } else { FULL }.to_string();
        for _ in 0..=next(3) {
            let mut at = next(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let bit = BITS[next(BITS.len())];
            if next(2) == 0 {
                text.insert_str(at, bit);
            } else {
                let end = text[at..].chars().next().map_or(at, |c| at + c.len_utf8());
                text.replace_range(at..end, bit);
            }
        }
        match parse(&text, Path::new("t.yaml")) {
            Ok(_) => accepted += 1,
            Err(e) => {
                rejected += 1;
                for problem in &e {
                    assert!(problem.line >= 1 && problem.column >= 1, "{problem}");
                }
            }
        }
    }
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn display_and_json_forms() {
    let e = ConfigErrors::new(vec![
        ConfigError {
            file: "b.yaml".into(),
            line: 3,
            column: 1,
            message: "second".into(),
            hint: None,
        },
        ConfigError {
            file: "b.yaml".into(),
            line: 1,
            column: 2,
            message: "first".into(),
            hint: Some("do this".into()),
        },
    ]);
    assert_eq!(
        e.to_string(),
        "b.yaml:1:2: first\n  hint: do this\nb.yaml:3:1: second"
    );
    let json: serde_json::Value = serde_json::to_value(&e).unwrap();
    assert_eq!(json[0]["line"], 1);
    assert_eq!(json[0]["column"], 2);
    assert_eq!(json[0]["file"], "b.yaml");
    assert_eq!(json[0]["hint"], "do this");
    assert_eq!(json[1]["hint"], serde_json::Value::Null);
    assert_eq!(e.iter().count(), 2);
}

#[test]
fn load_reports_io_and_encoding_problems() {
    let missing = Path::new(CONFIG_DIR).join("does-not-exist.yaml");
    match load(&missing) {
        Err(LoadError::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    let dir = std::env::temp_dir().join(format!("kt-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("latin1.yaml");
    std::fs::write(&file, b"pack:\n  name: caf\xe9\n").unwrap();
    let result = load(&file);
    std::fs::remove_dir_all(&dir).unwrap();
    match result {
        Err(LoadError::Invalid(e)) => {
            let e = &e.as_slice()[0];
            assert_eq!((e.line, e.column), (2, 12));
            assert_eq!(e.message, "the file is not valid UTF-8");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn byte_order_mark_and_crlf_line_ends_load() {
    let crlf = SEED.replace('\n', "\r\n");
    assert_eq!(ok(&crlf).providers.targets.len(), 2);
    let bom = format!("\u{feff}{SEED}");
    assert_eq!(ok(&bom).providers.targets.len(), 2);
    // Positions still count lines, not carriage returns.
    let e = errs(&with("gateway:\n  listn: x\n").replace('\n', "\r\n"));
    assert_eq!((e.as_slice()[0].line, e.as_slice()[0].column), (8, 3));
}

#[test]
fn the_guard_rules_load_and_refuse_unsafe_values() {
    let e = errs(&with(
        "gateway:\n  listen: 0.0.0.0:8787\n  splice_unknown_sni: true\n  connect_allow: [\"not a host\"]\n",
    ));
    let text = e.to_string();
    assert!(
        text.contains("t.yaml:8:11: `gateway.listen` 0.0.0.0:8787 is not a loopback address"),
        "{text}"
    );
    assert!(text.contains("allow_remote_clients: true"), "{text}");
    assert!(
        text.contains("t.yaml:9:23: `gateway.splice_unknown_sni: true` is no longer supported"),
        "{text}"
    );
    assert!(
        text.contains("invalid host name `not a host` in `gateway.connect_allow[0]`"),
        "{text}"
    );
    let c = parse(
        &with("gateway:\n  listen: 10.0.0.5:8787\n  allow_remote_clients: true\n  clients: {uids: [1001], cgroups: [/ci.slice]}\n  connect_allow: [pypi.org, \"*.github.com\"]\n  body_timeout: 5s\n  max_connections_per_uid: 8\n  splice_unknown_sni: false\n"),
        Path::new("t.yaml"),
    )
    .unwrap();
    let g = &c.gateway;
    assert!(g.allow_remote_clients);
    assert_eq!(g.connect_allow, ["pypi.org", "*.github.com"]);
    assert_eq!(g.body_timeout, Duration::from_secs(5));
    assert_eq!(g.max_connections_per_uid, 8);
    let allow = g.clients.as_ref().unwrap();
    assert!(allow.allows(Some(1001), None));
    assert!(allow.allows(Some(0), Some("/ci.slice/job-1.scope")));
    assert!(!allow.allows(Some(0), Some("/ci.slicer")));
    assert!(!allow.allows(None, None));
}

#[test]
fn a_catalog_provider_needs_no_base_url() {
    let c = ok(
        "providers:\n  targets:\n    - id: g\n      provider: Groq\n      secret_key_ref: {env: GROQ_API_KEY}\n    - id: h\n      provider: huggingface\n      secret_key_ref: {env: HF_TOKEN}\n",
    );
    assert_eq!(c.providers.targets[0].provider, Provider::Groq);
    assert_eq!(c.providers.targets[0].base_url, None);
    assert_eq!(c.providers.targets[1].provider, Provider::HuggingFace);
}

#[test]
fn event_sinks_take_file_stdout_and_syslog_with_their_options() {
    let c = ok(&with(
        "policy:\n  audit-logger:\n    sinks:\n      - type: file\n        path: events.jsonl\n        \
         rotate_bytes: 1048576\n        rotate_age: 24h\n        max_files: 3\n        on_failure: refuse\n      \
         - type: stdout\n        queue: 50\n      - type: syslog\n        address: tcp://127.0.0.1:6514\n        \
         facility: authpriv\n      - type: syslog\n",
    ));
    let sinks = c.audit.unwrap().sinks;
    assert_eq!(sinks.len(), 4);
    assert_eq!(
        sinks[0].kind,
        SinkKind::File {
            path: PathBuf::from("events.jsonl"),
            rotate_bytes: Some(1_048_576),
            rotate_age: Some(Duration::from_secs(86_400)),
            max_files: 3,
        }
    );
    assert_eq!(sinks[0].on_failure, StoreFailure::Refuse);
    assert_eq!(
        (sinks[1].kind.clone(), sinks[1].queue),
        (SinkKind::Stdout, 50)
    );
    assert_eq!(sinks[1].on_failure, StoreFailure::Log);
    assert_eq!(
        sinks[2].kind,
        SinkKind::Syslog {
            address: SyslogAddress::Tcp("127.0.0.1:6514".into()),
            facility: 10,
        }
    );
    assert_eq!(sinks[3].name(), "syslog:unix:///dev/log");
}

#[test]
fn event_sink_mistakes_are_errors_with_their_position() {
    let e = errs(&with(
        "policy:\n  audit-logger:\n    sinks:\n      - type: fiel\n      - type: stdout\n        path: x\n      \
         - type: syslog\n        address: udp://collector\n      - type: file\n      \
         - type: stdout\n        on_failure: block\n      - type: stdout\n",
    ));
    let text = e.to_string();
    assert!(
        text.contains(
            "t.yaml:10:15: unknown sink type `fiel` in `policy.audit-logger.sinks[0].type`"
        ),
        "{text}"
    );
    assert!(text.contains("did you mean `file`?"), "{text}");
    assert!(
        text.contains(
            "t.yaml:12:15: `policy.audit-logger.sinks[1].path` does not apply to a stdout sink"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "invalid syslog address `udp://collector` in `policy.audit-logger.sinks[2].address`"
        ),
        "{text}"
    );
    assert!(
        text.contains("missing `path` in `policy.audit-logger.sinks[3]`"),
        "{text}"
    );
    assert!(
        text.contains("unknown value `block` in `policy.audit-logger.sinks[4].on_failure`"),
        "{text}"
    );
    assert!(
        text.contains("sinks[5]` is the same sink as the one on line 11 (stdout)"),
        "{text}"
    );
}

/// A target of a catalog provider needs no `base_url`: Azure takes its
/// `resource`, Bedrock its `region`; everything else has one endpoint.
#[test]
fn catalog_targets_need_no_base_url_azure_and_bedrock_name_where() {
    let mut text = String::from("providers:\n  targets:\n");
    for p in crate::provider::KNOWN {
        let place = match p {
            Provider::Azure => "      resource: myres\n",
            Provider::Bedrock => "      region: eu-west-1\n",
            _ => "",
        };
        text.push_str(&format!(
            "    - id: {n}\n      provider: {n}\n{place}      secret_key_ref: {{env: K}}\n",
            n = p.name()
        ));
    }
    let c = ok(&text);
    let router = crate::routing::Router::new(&c).unwrap();
    for r in router.routes() {
        assert_eq!(r.endpoint.scheme, "https", "{}", r.target.id);
    }
    let host = |id: &str| {
        router
            .routes()
            .iter()
            .find(|r| r.target.id == id)
            .unwrap()
            .endpoint
            .host
            .clone()
    };
    assert_eq!(host("azure"), "myres.openai.azure.com");
    assert_eq!(host("bedrock"), "bedrock-runtime.eu-west-1.amazonaws.com");
    assert_eq!(host("gemini"), "generativelanguage.googleapis.com");

    let t = |extra: &str| {
        format!("providers:\n  targets:\n    - id: a\n      secret_key_ref: {{env: K}}\n{extra}")
    };
    let e = errs(&t("      provider: azure\n")).to_string();
    assert!(
        e.starts_with(
            "t.yaml:3:7: `providers.targets[0]` (provider azure) needs `resource` or `base_url`"
        ),
        "{e}"
    );
    let e = errs(&t("      provider: bedrock\n")).to_string();
    assert!(
        e.contains("(provider bedrock) needs `region` or `base_url`"),
        "{e}"
    );
    let e = errs(&t("      provider: openai\n      region: us-east-1\n")).to_string();
    assert!(
        e.starts_with("t.yaml:6:15: `providers.targets[0].region` is only for `provider: bedrock`"),
        "{e}"
    );
    let e = errs(&t(
        "      provider: azure\n      resource: a\n      base_url: https://x.example\n",
    ))
    .to_string();
    assert!(e.contains("both say where requests go"), "{e}");
    let e = errs(&t("      provider: azure\n      resource: \"my res\"\n")).to_string();
    assert!(e.contains("is not a valid resource name"), "{e}");
    // An Azure target behind a gateway of its own keeps its base_url.
    let c = ok(&t(
        "      provider: azure\n      base_url: https://apim.example/openai-proxy\n",
    ));
    assert_eq!(
        c.providers.targets[0].base_url.as_deref(),
        Some("https://apim.example/openai-proxy")
    );
}

/// `providers.custom`: a provider the config defines (hosts with
/// wildcards, base URL, credential style, error shape); unknown keys and
/// bad values are errors with line and column.
#[test]
fn config_defined_providers() {
    let c = ok(
        "providers:\n  custom:\n    - name: VLLM\n      hosts: [llm.internal, \"*.llm.example\"]\n      base_url: https://llm.internal/v1\n      credential: {header: X-LLM-Key}\n      error_shape: anthropic\n  targets:\n    - id: a\n      provider: vllm\n      secret_key_ref: {env: K}\n",
    );
    let t = &c.providers.targets[0];
    let Provider::Custom(def) = &t.provider else {
        panic!("{:?}", t.provider)
    };
    assert_eq!(def.name, "vllm");
    assert_eq!(def.hosts, vec!["llm.internal", "*.llm.example"]);
    assert_eq!(
        def.credential,
        crate::provider::CustomCredential::Header("x-llm-key".into())
    );
    assert_eq!(def.error_shape, crate::provider::ErrorShape::Anthropic);
    assert_eq!(t.base_url.as_deref(), Some("https://llm.internal/v1"));
    let router = crate::routing::Router::new(&c).unwrap();
    assert_eq!(
        router.match_host("gpu1.llm.example", Some(443)),
        Some(t.provider.clone())
    );
    assert_eq!(
        router.match_host("llm.internal", None),
        Some(t.provider.clone())
    );
    assert_eq!(router.custom_credential_headers(), vec!["x-llm-key"]);

    // Hosts default to the base URL's; the credential to Bearer.
    let c = ok(
        "providers:\n  custom:\n    - name: local\n      base_url: https://gpu.lan:8443/api\n  targets:\n    - id: a\n      provider: local\n      secret_key_ref: {env: K}\n",
    );
    let Provider::Custom(def) = &c.providers.targets[0].provider else {
        panic!()
    };
    assert_eq!(def.hosts, vec!["gpu.lan"]);
    assert_eq!(
        def.credential,
        crate::provider::CustomCredential::Style(crate::provider::KeyStyle::Bearer)
    );

    let e = errs("providers:\n  custom:\n    - name: x\n      hosts: [a.example]\n      credentail: bearer\n      credential: basic\n      error_shape: xml\n    - name: openai\n      hosts: [b.example]\n    - name: y\n      hosts: [\"bad host\"]\n    - name: z\n  targets:\n    - id: a\n      provider: x\n      secret_key_ref: {env: K}\n").to_string();
    for want in [
        "t.yaml:5:7: unknown key `credentail` in `providers.custom[0]`",
        "t.yaml:6:19: unknown credential style `basic` in `providers.custom[0].credential`",
        "t.yaml:7:20: unknown error shape `xml` in `providers.custom[0].error_shape`",
        "t.yaml:8:13: `openai` in `providers.custom[1].name` is a catalog provider",
        "t.yaml:11:15: invalid host name `bad host` in `providers.custom[2].hosts[0]`",
        "t.yaml:12:7: `providers.custom[3]` has neither `hosts` nor `base_url`",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    // Defined but never used, and a custom provider without any endpoint.
    let e = errs("providers:\n  custom:\n    - name: x\n      hosts: [a.example]\n    - name: unused\n      hosts: [b.example]\n  targets:\n    - id: a\n      provider: x\n      secret_key_ref: {env: K}\n").to_string();
    assert!(
        e.contains("t.yaml:9:17: provider `x` in `providers.targets[0]` has no `base_url`"),
        "{e}"
    );
    assert!(
        e.contains(
            "t.yaml:5:13: provider `unused` is defined in `providers.custom` but no target uses it"
        ),
        "{e}"
    );
}

#[test]
fn capture_providers_and_the_azure_and_bedrock_credential_kinds() {
    let c = ok(&with(
        "capture:\n  providers: all\ngateway:\n  credentials:\n    entra: block\n    sigv4: pass\n",
    ));
    assert_eq!(c.capture.providers, CaptureProviders::All);
    assert_eq!(c.gateway.credentials.entra, CredentialAction::Block);
    assert_eq!(c.gateway.credentials.sigv4, CredentialAction::Pass);
    let d = ok(&with(""));
    assert_eq!(d.capture.providers, CaptureProviders::Routed);
    assert_eq!(d.gateway.credentials.entra, CredentialAction::Pass);
    assert_eq!(d.gateway.credentials.sigv4, CredentialAction::Block);
    let e = errs(&with(
        "capture:\n  providers: some\ngateway:\n  credentials:\n    sigv4: swap\n",
    ))
    .to_string();
    assert!(
        e.contains(
            "t.yaml:8:14: unknown value `some` in `capture.providers` (expected routed or all)"
        ),
        "{e}"
    );
    assert!(
        e.contains("t.yaml:11:12: `gateway.credentials.sigv4` cannot be `swap`"),
        "{e}"
    );
}
