//! The built-in rule pack: provider and platform secrets, on by default
//! (`builtin_rules: true`).
//!
//! Every rule comes with a made-up sample of the right shape, used by
//! `coverage_warnings` and the tests. The samples are assembled at run time
//! from a prefix and generated filler so this source file holds nothing that a
//! secret scanner would take for a live key.

use std::sync::OnceLock;

use crate::provider::keys::{self, KeyFormat};

/// One rule of the built-in pack.
#[derive(Debug)]
pub struct BuiltinRule {
    /// Stable id, used in findings and in `[REDACTED:<id>]` markers.
    pub id: &'static str,
    /// What the rule catches, for people (`kt gateway check --verbose`).
    pub description: &'static str,
    /// The regex (Rust `regex` syntax).
    pub regex: &'static str,
    /// Whether the base64 prefilter looks for the prefix at every byte
    /// alignment, or only where it starts a 3-byte group (the packed search
    /// holds 64 literals: the later rules' spellings do not all fit).
    pub base64_every_alignment: bool,
    /// Prefilter literals given by the rule (empty: extracted from `regex`).
    pub literals: &'static [&'static str],
    /// Bytes from the start of a match to where a literal sits.
    pub literal_offset: usize,
    /// The catalog provider whose key this is (`None`: a platform secret
    /// such as a GitHub token or a PEM key).
    pub provider: Option<&'static str>,
    /// Words that must be near the key (context rules), for people.
    pub context: &'static [&'static str],
    /// Builds the made-up sample key (see [`BuiltinRule::sample`]).
    make_sample: fn() -> String,
}

impl BuiltinRule {
    /// Whether the given literals are the case spellings of a word the
    /// regex matches in any case (a context rule's `(?i:word)`): then the
    /// scanner looks for the word case-insensitively instead, so a word in
    /// mixed case (`DeepSeeK`) is found too.
    pub(crate) fn folded_literals(&self) -> bool {
        !self.context.is_empty() && !self.literals.is_empty() && self.regex.starts_with("(?i:")
    }

    /// A made-up key of this rule's shape: it matches `regex` but was never
    /// issued by anybody. Built at run time, never stored in the source.
    pub fn sample(&self) -> String {
        (self.make_sample)()
    }
}

/// The OpenAI key marker (base64 of "OpenAI"), split so that no long
/// key-looking literal sits in this file.
const OPENAI_MARK: [&str; 2] = ["T3Blbk", "FJ"];

/// Deterministic filler over `alphabet` (a small LCG: reproducible samples
/// without a random-number dependency).
pub(crate) fn filler(len: usize, alphabet: &[u8], seed: u64) -> String {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let i = (state >> 33) as usize % alphabet.len();
            char::from(alphabet[i])
        })
        .collect()
}

/// `[A-Za-z0-9]`.
pub(crate) const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// `[A-Za-z0-9_-]`, with the separators placed so they always show up in a sample.
pub(crate) const URLSAFE: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-abcdefghijklmnopqrstuvwxyz_0123456789";
/// `[A-Z2-7]` (base32, AWS key ids).
pub(crate) const BASE32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// `URLSAFE` filler that is sure to contain both `-` and `_` (the characters
/// narrow `sk-[A-Za-z0-9]+` patterns miss).
fn urlsafe(len: usize, seed: u64) -> String {
    let mut s = filler(len, URLSAFE, seed);
    if len >= 8 {
        s.replace_range(3..4, "-");
        s.replace_range(6..7, "_");
    }
    s
}

fn openai_scoped(scope: &str, seed: u64) -> String {
    let mut s = String::from("sk-");
    s.push_str(scope);
    s.push('-');
    s.push_str(&urlsafe(74, seed));
    s.push_str(OPENAI_MARK[0]);
    s.push_str(OPENAI_MARK[1]);
    s.push_str(&urlsafe(74, seed + 1));
    s
}

fn sample_openai_project() -> String {
    openai_scoped("proj", 11)
}
fn sample_openai_svcacct() -> String {
    openai_scoped("svcacct", 12)
}
fn sample_openai_admin() -> String {
    openai_scoped("admin", 13)
}
fn sample_openai_legacy() -> String {
    let mut s = String::from("sk-");
    s.push_str(&filler(20, ALNUM, 14));
    s.push_str(OPENAI_MARK[0]);
    s.push_str(OPENAI_MARK[1]);
    s.push_str(&filler(20, ALNUM, 15));
    s
}
fn anthropic(kind: &str, seed: u64) -> String {
    let mut s = String::from("sk-ant-");
    s.push_str(kind);
    s.push('-');
    s.push_str(&urlsafe(93, seed));
    s.push_str("AA");
    s
}
fn sample_anthropic_api() -> String {
    anthropic("api03", 21)
}
fn sample_anthropic_admin() -> String {
    anthropic("admin01", 22)
}
fn sample_anthropic_oauth() -> String {
    let mut s = String::from("sk-ant-");
    s.push_str("oat01-");
    s.push_str(&urlsafe(93, 23));
    s.push_str("AA");
    s
}
fn sample_groq() -> String {
    let mut s = String::from("gs");
    s.push_str("k_");
    s.push_str(&filler(52, ALNUM, 91));
    s
}
fn sample_xai() -> String {
    let mut s = String::from("xa");
    s.push_str("i-");
    s.push_str(&filler(80, ALNUM, 92));
    s
}
fn sample_openrouter() -> String {
    let mut s = String::from("sk-or");
    s.push_str("-v1-");
    s.push_str(&filler(64, b"0123456789abcdef", 93));
    s
}
fn sample_perplexity() -> String {
    let mut s = String::from("pp");
    s.push_str("lx-");
    s.push_str(&filler(48, ALNUM, 94));
    s
}
fn sample_huggingface() -> String {
    let mut s = String::from("h");
    s.push_str("f_");
    s.push_str(&filler(34, ALNUM, 95));
    s
}
fn sample_replicate() -> String {
    let mut s = String::from("r8");
    s.push('_');
    s.push_str(&urlsafe(37, 96));
    s
}
/// `[A-Za-z0-9+/]` (standard base64).
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
fn sample_bedrock() -> String {
    let mut s = String::from("AB");
    s.push_str("SK");
    s.push_str(&filler(132, B64, 97));
    s
}
fn sample_bedrock_short() -> String {
    let mut s = String::from("bedrock-api-key-");
    // base64 of "bedrock.amazonaws.com", split so no token-like literal sits here.
    s.push_str("YmVkcm9jay5h");
    s.push_str("bWF6b25hd3MuY29t");
    s.push_str(&filler(240, B64, 98));
    s
}
fn sample_together() -> String {
    let mut s = String::from("tgp");
    s.push_str("_v1_");
    s.push_str(&urlsafe(43, 99));
    s
}
fn sample_fireworks() -> String {
    let mut s = String::from("fw");
    s.push('_');
    s.push_str(&filler(24, ALNUM, 100));
    s
}
fn sample_azure() -> String {
    let mut s = filler(52, ALNUM, 101);
    s.push_str("JQQ");
    s.push_str("J99");
    s.push_str("BA");
    s.push_str(&filler(16, ALNUM, 102));
    s.push('Q');
    s.push_str(&filler(7, ALNUM, 103));
    s
}
fn sample_azure_legacy() -> String {
    let mut s = String::from("AZURE_OPENAI_API_KEY=");
    s.push_str(&filler(32, b"0123456789abcdef", 104));
    s
}
fn sample_mistral() -> String {
    let mut s = String::from("MISTRAL_API_KEY=");
    s.push_str(&filler(32, ALNUM, 105));
    s
}
fn sample_cohere() -> String {
    let mut s = String::from("CO_API_KEY=");
    s.push_str(&filler(40, ALNUM, 106));
    s
}
fn sample_deepseek() -> String {
    let mut s = String::from("DEEPSEEK_API_KEY=sk");
    s.push('-');
    s.push_str(&filler(32, b"0123456789abcdef", 107));
    s
}
fn sample_aws() -> String {
    let mut s = String::from("AK");
    s.push_str("IA");
    s.push_str(&filler(16, BASE32, 31));
    s
}
fn sample_github_classic() -> String {
    let mut s = String::from("gh");
    s.push_str("p_");
    s.push_str(&filler(36, ALNUM, 41));
    s
}
fn sample_github_fine() -> String {
    let mut s = String::from("github");
    s.push_str("_pat_");
    s.push_str(&filler(22, ALNUM, 42));
    s.push('_');
    s.push_str(&filler(59, ALNUM, 43));
    s
}
fn sample_google() -> String {
    let mut s = String::from("AI");
    s.push_str("za");
    s.push_str(&urlsafe(35, 51));
    s
}
fn sample_slack() -> String {
    let mut s = String::from("xox");
    s.push_str("b-");
    s.push_str(&filler(11, b"0123456789", 61));
    s.push('-');
    s.push_str(&filler(12, b"0123456789", 62));
    s.push('-');
    s.push_str(&filler(24, ALNUM, 63));
    s
}
fn sample_stripe() -> String {
    let mut s = String::from("sk");
    s.push_str("_live_");
    s.push_str(&filler(99, ALNUM, 71));
    s
}
fn sample_pem() -> String {
    let dashes = "-".repeat(5);
    let mut s = format!("{dashes}BEGIN RSA PRIVATE KEY{dashes}\n");
    for line in 0..4 {
        s.push_str(&filler(
            64,
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
            80 + line,
        ));
        s.push('\n');
    }
    s.push_str(&format!("{dashes}END RSA PRIVATE KEY{dashes}"));
    s
}

/// Platform secrets (not an AI provider's key), each as gitleaks has it.
fn platform(
    id: &'static str,
    description: &'static str,
    regex: &'static str,
    make_sample: fn() -> String,
) -> BuiltinRule {
    BuiltinRule {
        id,
        description,
        regex,
        base64_every_alignment: true,
        literals: &[],
        literal_offset: 0,
        provider: None,
        context: &[],
        make_sample,
    }
}

/// The sample of a provider key format, by id.
fn provider_sample(id: &str) -> fn() -> String {
    match id {
        "openai-project-key" => sample_openai_project,
        "openai-service-account-key" => sample_openai_svcacct,
        "openai-admin-key" => sample_openai_admin,
        "openai-legacy-key" => sample_openai_legacy,
        "anthropic-api-key" => sample_anthropic_api,
        "anthropic-admin-key" => sample_anthropic_admin,
        "google-api-key" => sample_google,
        "anthropic-oauth-token" => sample_anthropic_oauth,
        "groq-api-key" => sample_groq,
        "xai-api-key" => sample_xai,
        "openrouter-api-key" => sample_openrouter,
        "perplexity-api-key" => sample_perplexity,
        "huggingface-token" => sample_huggingface,
        "replicate-api-token" => sample_replicate,
        "aws-bedrock-api-key" => sample_bedrock,
        "aws-bedrock-short-term-key" => sample_bedrock_short,
        "together-api-key" => sample_together,
        "fireworks-api-key" => sample_fireworks,
        "azure-openai-key" => sample_azure,
        "azure-openai-legacy-key" => sample_azure_legacy,
        "mistral-api-key" => sample_mistral,
        "cohere-api-key" => sample_cohere,
        "deepseek-api-key" => sample_deepseek,
        _ => sample_none,
    }
}

fn sample_none() -> String {
    String::new()
}

fn from_format(f: &'static KeyFormat) -> BuiltinRule {
    BuiltinRule {
        id: f.id,
        description: f.description,
        regex: f.regex,
        base64_every_alignment: true,
        literals: f.literals,
        literal_offset: f.literal_offset,
        provider: Some(f.provider),
        context: f.context,
        make_sample: provider_sample(f.id),
    }
}

/// The pack: the provider key formats of the catalog
/// (`provider::keys::FORMATS`) and the platform secrets, in a stable order
/// (the rules that came first keep their places).
fn build() -> Vec<BuiltinRule> {
    let fmt = |id: &str| keys::by_id(id).map(from_format);
    let mut out: Vec<BuiltinRule> = [
        "openai-project-key",
        "openai-service-account-key",
        "openai-admin-key",
        "openai-legacy-key",
        "anthropic-api-key",
        "anthropic-admin-key",
    ]
    .into_iter()
    .filter_map(fmt)
    .collect();
    out.push(platform(
        "aws-access-key-id",
        "AWS access key id (AKIA/ASIA/ABIA/ACCA…)",
        // gitleaks `aws-access-token`.
        "(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}",
        sample_aws,
    ));
    out.push(platform(
        "github-token",
        "GitHub token (ghp_/gho_/ghu_/ghs_/ghr_…)",
        // gitleaks `github-pat`, `github-oauth`, `github-app-token`, `github-refresh-token`.
        "gh[pousr]_[A-Za-z0-9]{36}",
        sample_github_classic,
    ));
    out.push(platform(
        "github-fine-grained-token",
        "GitHub fine-grained token (github_pat_…)",
        // gitleaks `github-fine-grained-pat`.
        "github_pat_[A-Za-z0-9_]{82}",
        sample_github_fine,
    ));
    out.extend(fmt("google-api-key"));
    out.push(platform(
        "slack-token",
        "Slack token (xoxb-/xoxp-/xoxa-/xoxr-/xoxs-…)",
        // gitleaks `slack-bot-token` / `slack-user-token`, widened.
        "xox[bpars]-(?:[0-9]{1,16}-){1,4}[A-Za-z0-9]{10,64}",
        sample_slack,
    ));
    out.push(platform(
        "stripe-live-key",
        "Stripe live secret or restricted key (sk_live_/rk_live_…)",
        // gitleaks `stripe-access-token`, live keys only.
        "(?:sk|rk)_live_[A-Za-z0-9]{24,}",
        sample_stripe,
    ));
    out.push(platform(
        "pem-private-key",
        "PEM private key (-----BEGIN … PRIVATE KEY-----)",
        // Through the END line when there is one, so a finding (and a redaction) covers the whole key.
        r"-----BEGIN[ A-Z0-9]{0,40} PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,.()-]*?-----END[ A-Z0-9]{0,40} PRIVATE KEY(?: BLOCK)?-----)?",
        sample_pem,
    ));
    for f in keys::formats() {
        if !out.iter().any(|r| r.id == f.id) {
            out.push(from_format(f));
        }
    }
    out
}

/// The built-in rule pack, in a stable order.
pub fn builtin_rules() -> &'static [BuiltinRule] {
    static RULES: OnceLock<Vec<BuiltinRule>> = OnceLock::new();
    RULES.get_or_init(build)
}
