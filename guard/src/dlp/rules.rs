//! The built-in rule pack: provider and platform secrets, on by default
//! (`builtin_rules: true`).
//!
//! Every rule comes with a made-up sample of the right shape, used by
//! `coverage_warnings` and the tests. The samples are assembled at run time
//! from a prefix and generated filler so this source file holds nothing that a
//! secret scanner would take for a live key.

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
    /// Builds the made-up sample key (see [`BuiltinRule::sample`]).
    make_sample: fn() -> String,
}

impl BuiltinRule {
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

/// The tail shared by the scoped OpenAI keys: either the `T3BlbkFJ` marker
/// between two url-safe runs, or (formats without the marker) a long run.
macro_rules! openai_scoped_regex {
    ($scope:literal) => {
        concat!(
            "sk-",
            $scope,
            "-(?:[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}|[A-Za-z0-9_-]{80,})"
        )
    };
}

static RULES: &[BuiltinRule] = &[
    BuiltinRule {
        id: "openai-project-key",
        description: "OpenAI project key (sk-proj-…)",
        regex: openai_scoped_regex!("proj"),
        base64_every_alignment: true,
        make_sample: sample_openai_project,
    },
    BuiltinRule {
        id: "openai-service-account-key",
        description: "OpenAI service account key (sk-svcacct-…)",
        regex: openai_scoped_regex!("svcacct"),
        base64_every_alignment: true,
        make_sample: sample_openai_svcacct,
    },
    BuiltinRule {
        id: "openai-admin-key",
        description: "OpenAI admin key (sk-admin-…)",
        regex: openai_scoped_regex!("admin"),
        base64_every_alignment: true,
        make_sample: sample_openai_admin,
    },
    BuiltinRule {
        id: "openai-legacy-key",
        description: "OpenAI user key, legacy format (sk-… with the T3BlbkFJ marker)",
        regex: "sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}",
        base64_every_alignment: true,
        make_sample: sample_openai_legacy,
    },
    BuiltinRule {
        id: "anthropic-api-key",
        description: "Anthropic API key (sk-ant-api03-…)",
        regex: "sk-ant-api03-[A-Za-z0-9_-]{93}AA",
        base64_every_alignment: true,
        make_sample: sample_anthropic_api,
    },
    BuiltinRule {
        id: "anthropic-admin-key",
        description: "Anthropic admin key (sk-ant-admin01-…)",
        regex: "sk-ant-admin01-[A-Za-z0-9_-]{93}AA",
        base64_every_alignment: true,
        make_sample: sample_anthropic_admin,
    },
    BuiltinRule {
        id: "aws-access-key-id",
        description: "AWS access key id (AKIA/ASIA/ABIA/ACCA…)",
        regex: "(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}",
        base64_every_alignment: true,
        make_sample: sample_aws,
    },
    BuiltinRule {
        id: "github-token",
        description: "GitHub token (ghp_/gho_/ghu_/ghs_/ghr_…)",
        regex: "gh[pousr]_[A-Za-z0-9]{36}",
        base64_every_alignment: true,
        make_sample: sample_github_classic,
    },
    BuiltinRule {
        id: "github-fine-grained-token",
        description: "GitHub fine-grained token (github_pat_…)",
        regex: "github_pat_[A-Za-z0-9_]{82}",
        base64_every_alignment: true,
        make_sample: sample_github_fine,
    },
    BuiltinRule {
        id: "google-api-key",
        description: "Google API key (AIza…)",
        regex: "AIza[A-Za-z0-9_-]{35}",
        base64_every_alignment: true,
        make_sample: sample_google,
    },
    BuiltinRule {
        id: "slack-token",
        description: "Slack token (xoxb-/xoxp-/xoxa-/xoxr-/xoxs-…)",
        regex: "xox[bpars]-(?:[0-9]{1,16}-){1,4}[A-Za-z0-9]{10,64}",
        base64_every_alignment: true,
        make_sample: sample_slack,
    },
    BuiltinRule {
        id: "stripe-live-key",
        description: "Stripe live secret or restricted key (sk_live_/rk_live_…)",
        regex: "(?:sk|rk)_live_[A-Za-z0-9]{24,}",
        base64_every_alignment: true,
        make_sample: sample_stripe,
    },
    BuiltinRule {
        id: "pem-private-key",
        description: "PEM private key (-----BEGIN … PRIVATE KEY-----)",
        // Through the END line when there is one, so a finding (and a redaction) covers the whole key.
        regex: r"-----BEGIN[ A-Z0-9]{0,40} PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,.()-]*?-----END[ A-Z0-9]{0,40} PRIVATE KEY(?: BLOCK)?-----)?",
        base64_every_alignment: true,
        make_sample: sample_pem,
    },
    // Claude Code's subscription OAuth tokens (access `oat01`, refresh
    // `ort01`): `sk-ant-oat01-` + 95 url-safe characters, as picket's gitleaks
    // rules and Claude Code tooling match them; 80 or more here so a changed
    // length is still caught.
    BuiltinRule {
        id: "anthropic-oauth-token",
        description: "Anthropic OAuth token of a Claude subscription (sk-ant-oat01-/sk-ant-ort01-…)",
        regex: "sk-ant-o(?:at|rt)01-[A-Za-z0-9_-]{80,}",
        base64_every_alignment: false,
        make_sample: sample_anthropic_oauth,
    },
    // Formats below as trufflehog's detectors and gitleaks' rules have them:
    // kingfisher.groq.1 / trufflehog pkg/detectors/groq `gsk_[a-zA-Z0-9]{52}`.
    BuiltinRule {
        id: "groq-api-key",
        description: "Groq API key (gsk_…)",
        regex: "gsk_[A-Za-z0-9]{52}",
        base64_every_alignment: false,
        make_sample: sample_groq,
    },
    // trufflehog pkg/detectors/xai: `xai-[0-9a-zA-Z_]{80}`.
    BuiltinRule {
        id: "xai-api-key",
        description: "xAI API key (xai-…)",
        regex: "xai-[A-Za-z0-9_]{80}",
        base64_every_alignment: false,
        make_sample: sample_xai,
    },
    // gitleaks/trufflehog openrouter: `sk-or-v1-[0-9a-f]{64}`.
    BuiltinRule {
        id: "openrouter-api-key",
        description: "OpenRouter API key (sk-or-v1-…)",
        regex: "sk-or-v1-[0-9a-f]{64}",
        base64_every_alignment: false,
        make_sample: sample_openrouter,
    },
    // gitleaks perplexity-api-key: `pplx-[a-zA-Z0-9]{48}`.
    BuiltinRule {
        id: "perplexity-api-key",
        description: "Perplexity API key (pplx-…)",
        regex: "pplx-[A-Za-z0-9]{48}",
        base64_every_alignment: false,
        make_sample: sample_perplexity,
    },
    // trufflehog pkg/detectors/huggingface: `(?:hf_|api_org_)[a-zA-Z0-9]{34}`
    // (gitleaks' huggingface-access-token allows letters only: a subset).
    BuiltinRule {
        id: "huggingface-token",
        description: "Hugging Face access or organization token (hf_/api_org_…)",
        regex: "(?:hf_|api_org_)[A-Za-z0-9]{34}",
        base64_every_alignment: false,
        make_sample: sample_huggingface,
    },
];

/// The built-in rule pack, in a stable order.
pub fn builtin_rules() -> &'static [BuiltinRule] {
    RULES
}
