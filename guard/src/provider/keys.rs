//! The key formats each catalog provider issues, in one table that both
//! the DLP pack (`dlp::builtin_rules`) and the naming of unmanaged
//! presented keys (`kt events --keys`) read. Pure: no I/O.
//!
//! Two kinds of format:
//! - **prefixed**: the key starts with a prefix only that provider issues
//!   (`gsk_`, `sk-ant-api03-`, …), or carries a fixed signature (Azure's
//!   `JQQJ9`); found anywhere, and a presented key of that shape names its
//!   provider whatever host it was sent to;
//! - **context**: the key is a bare run of characters (Mistral's 32
//!   alphanumerics, Cohere's 40, DeepSeek's `sk-` + 32 hex, Azure's legacy
//!   32 hex). DLP finds it only near a context word (`mistral`,
//!   `CO_API_KEY`, …), as secret scanners do; a presented key of that shape
//!   is named by the provider it was sent to.
//!
//! Every entry cites where its format comes from (gitleaks, trufflehog,
//! kingfisher or Microsoft's security-utilities rules, or the provider).

use std::sync::OnceLock;

/// One key format of one provider.
#[derive(Debug)]
pub struct KeyFormat {
    /// Stable id: the DLP rule id (`groq-api-key`) and `[REDACTED:<id>]`.
    pub id: &'static str,
    /// The catalog name of the provider that issues it (`openai`, `azure`, `bedrock`, …).
    pub provider: &'static str,
    /// What it is, for people.
    pub description: &'static str,
    /// The DLP regex (Rust `regex` syntax). For context formats it starts
    /// with the context word.
    pub regex: &'static str,
    /// Literals the DLP prefilter searches for instead of those extracted
    /// from `regex` (empty: extracted). Context formats list the spellings
    /// of their words (lower, Title and UPPER case: a word written in mixed
    /// case otherwise is not found).
    pub literals: &'static [&'static str],
    /// Bytes between the start of a match and where a literal sits (0 for a
    /// prefix; Azure's signature sits 52 characters in).
    pub literal_offset: usize,
    /// The context words (empty for prefixed formats), for people.
    pub context: &'static [&'static str],
    /// The shape of the key alone (full match), for naming a presented key.
    pub key: &'static str,
    /// Whether the shape alone tells the provider (prefixed formats).
    pub distinctive: bool,
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

/// A context format's DLP regex: one of `words` (any case), then within 40
/// characters on the same line (trufflehog's `PrefixRegex` distance) the
/// key, starting at a word boundary.
macro_rules! context_regex {
    ($words:literal, $key:literal) => {
        concat!(
            "(?i:",
            $words,
            ")(?:[^\\r\\n]{0,40}?[^A-Za-z0-9\\r\\n])?(?-i:",
            $key,
            ")"
        )
    };
}

/// The table, in DLP rule order (see the module docs).
pub static FORMATS: &[KeyFormat] = &[
    // OpenAI: project, service-account and admin keys carry `T3BlbkFJ`
    // (base64 "OpenAI") between two url-safe runs; gitleaks `openai-api-key`
    // (`sk-(?:proj|svcacct|admin)-…T3BlbkFJ…`), newer ones without the
    // marker are long runs (trufflehog pkg/detectors/openai).
    KeyFormat {
        id: "openai-project-key",
        provider: "openai",
        description: "OpenAI project key (sk-proj-…)",
        regex: openai_scoped_regex!("proj"),
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-proj-[A-Za-z0-9_-]{40,}",
        distinctive: true,
    },
    KeyFormat {
        id: "openai-service-account-key",
        provider: "openai",
        description: "OpenAI service account key (sk-svcacct-…)",
        regex: openai_scoped_regex!("svcacct"),
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-svcacct-[A-Za-z0-9_-]{40,}",
        distinctive: true,
    },
    KeyFormat {
        id: "openai-admin-key",
        provider: "openai",
        description: "OpenAI admin key (sk-admin-…)",
        regex: openai_scoped_regex!("admin"),
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-admin-[A-Za-z0-9_-]{40,}",
        distinctive: true,
    },
    // gitleaks `openai-api-key`: `sk-[a-zA-Z0-9]{20}T3BlbkFJ[a-zA-Z0-9]{20}`.
    KeyFormat {
        id: "openai-legacy-key",
        provider: "openai",
        description: "OpenAI user key, legacy format (sk-… with the T3BlbkFJ marker)",
        regex: "sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}",
        distinctive: true,
    },
    // gitleaks `anthropic-api-key` / `anthropic-admin-api-key`:
    // `sk-ant-api03-[a-zA-Z0-9_\-]{93}AA`, `sk-ant-admin01-…{93}AA`.
    KeyFormat {
        id: "anthropic-api-key",
        provider: "anthropic",
        description: "Anthropic API key (sk-ant-api03-…)",
        regex: "sk-ant-api03-[A-Za-z0-9_-]{93}AA",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-ant-api[0-9]{2}-[A-Za-z0-9_-]{20,}",
        distinctive: true,
    },
    KeyFormat {
        id: "anthropic-admin-key",
        provider: "anthropic",
        description: "Anthropic admin key (sk-ant-admin01-…)",
        regex: "sk-ant-admin01-[A-Za-z0-9_-]{93}AA",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-ant-admin[0-9]{2}-[A-Za-z0-9_-]{20,}",
        distinctive: true,
    },
    // Google API keys (Gemini API): gitleaks `gcp-api-key` `AIza[\w-]{35}`.
    KeyFormat {
        id: "google-api-key",
        provider: "gemini",
        description: "Google API key (AIza…)",
        regex: "AIza[A-Za-z0-9_-]{35}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "AIza[A-Za-z0-9_-]{35}",
        distinctive: true,
    },
    // Claude Code's subscription OAuth tokens (access `oat01`, refresh
    // `ort01`): `sk-ant-oat01-` + 95 url-safe characters, as gitleaks'
    // `claude-code` rules match them; 80 or more here so a changed length
    // is still caught.
    KeyFormat {
        id: "anthropic-oauth-token",
        provider: "anthropic",
        description: "Anthropic OAuth token of a Claude subscription (sk-ant-oat01-/sk-ant-ort01-…)",
        regex: "sk-ant-o(?:at|rt)01-[A-Za-z0-9_-]{80,}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-ant-o(?:at|rt)[0-9]{2}-[A-Za-z0-9_-]{20,}",
        distinctive: true,
    },
    // gitleaks `groq-api-key` / kingfisher.groq.1 / trufflehog groq:
    // `gsk_[a-zA-Z0-9]{52}`.
    KeyFormat {
        id: "groq-api-key",
        provider: "groq",
        description: "Groq API key (gsk_…)",
        regex: "gsk_[A-Za-z0-9]{52}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "gsk_[A-Za-z0-9]{20,}",
        distinctive: true,
    },
    // trufflehog pkg/detectors/xai: `xai-[0-9a-zA-Z_]{80}`.
    KeyFormat {
        id: "xai-api-key",
        provider: "xai",
        description: "xAI API key (xai-…)",
        regex: "xai-[A-Za-z0-9_]{80}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "xai-[A-Za-z0-9_]{20,}",
        distinctive: true,
    },
    // gitleaks/trufflehog openrouter: `sk-or-v1-[0-9a-f]{64}`.
    KeyFormat {
        id: "openrouter-api-key",
        provider: "openrouter",
        description: "OpenRouter API key (sk-or-v1-…)",
        regex: "sk-or-v1-[0-9a-f]{64}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "sk-or-v[0-9]-[0-9a-f]{20,}",
        distinctive: true,
    },
    // gitleaks `perplexity-api-key`: `pplx-[a-zA-Z0-9]{48}`.
    KeyFormat {
        id: "perplexity-api-key",
        provider: "perplexity",
        description: "Perplexity API key (pplx-…)",
        regex: "pplx-[A-Za-z0-9]{48}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "pplx-[A-Za-z0-9]{20,}",
        distinctive: true,
    },
    // trufflehog pkg/detectors/huggingface: `(?:hf_|api_org_)[a-zA-Z0-9]{34}`
    // (gitleaks' huggingface-access-token allows letters only: a subset).
    KeyFormat {
        id: "huggingface-token",
        provider: "huggingface",
        description: "Hugging Face access or organization token (hf_/api_org_…)",
        regex: "(?:hf_|api_org_)[A-Za-z0-9]{34}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "(?:hf_|api_org_)[A-Za-z0-9]{30,}",
        distinctive: true,
    },
    // kingfisher data/rules/replicate.yml (kingfisher.replicate.1):
    // `r8_[0-9A-Za-z-_]{37}`.
    KeyFormat {
        id: "replicate-api-token",
        provider: "replicate",
        description: "Replicate API token (r8_…)",
        regex: "r8_[A-Za-z0-9_-]{37}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "r8_[A-Za-z0-9_-]{30,}",
        distinctive: true,
    },
    // gitleaks `aws-amazon-bedrock-api-key-long-lived`:
    // `ABSK[A-Za-z0-9+/]{109,269}={0,2}` (base64 of "BedrockAPIKey-…").
    KeyFormat {
        id: "aws-bedrock-api-key",
        provider: "bedrock",
        description: "Amazon Bedrock long-term API key (ABSK…)",
        regex: "ABSK[A-Za-z0-9+/]{109,269}={0,2}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "ABSK[A-Za-z0-9+/]{40,}={0,2}",
        distinctive: true,
    },
    // gitleaks `aws-amazon-bedrock-api-key-short-lived`: the prefix and the
    // base64 of "bedrock.amazonaws.com" that every such token starts with;
    // the rest of the base64 (a presigned URL) is taken too, so a redaction
    // removes the whole token. (The group keeps this line from being read
    // as a token itself.)
    KeyFormat {
        id: "aws-bedrock-short-term-key",
        provider: "bedrock",
        description: "Amazon Bedrock short-term API key (bedrock-api-key-…)",
        regex: "bedrock-api-key-(?:YmVkcm9jay5hbWF6b25hd3MuY29t)[A-Za-z0-9+/]*={0,2}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "bedrock-api-key-[A-Za-z0-9+/]{20,}={0,2}",
        distinctive: true,
    },
    // Together AI keys: `tgp_v1_` + 43 url-safe characters (the keys the
    // Together console issues; scanners such as secretlint-style rule sets
    // match `tgp_v1_[A-Za-z0-9_-]{43}`).
    KeyFormat {
        id: "together-api-key",
        provider: "together",
        description: "Together AI API key (tgp_v1_…)",
        regex: "tgp_v1_[A-Za-z0-9_-]{43}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "tgp_v[0-9]_[A-Za-z0-9_-]{20,}",
        distinctive: true,
    },
    // Fireworks AI keys: `fw_` + 24 alphanumerics (the common scanner
    // rule `\bfw_[a-zA-Z0-9]{24}\b`).
    KeyFormat {
        id: "fireworks-api-key",
        provider: "fireworks",
        description: "Fireworks AI API key (fw_…)",
        regex: "fw_[A-Za-z0-9]{24}",
        literals: &[],
        literal_offset: 0,
        context: &[],
        key: "fw_[A-Za-z0-9]{20,}",
        distinctive: true,
    },
    // Azure AI services / Azure OpenAI keys of the current format: 84
    // characters with the `JQQJ9` signature at 52, Microsoft
    // security-utilities SEC101/200 (UnclassifiedLegacyCommonAnnotatedSecurityKey):
    // `[alnum]{52}JQQJ9(?:9|D|H)[alnum][A-L][alnum]{16}[A-Za-z][alnum]{7}`.
    KeyFormat {
        id: "azure-openai-key",
        provider: "azure",
        description: "Azure OpenAI / AI services key (84 characters, JQQJ9 signature)",
        regex: "[A-Za-z0-9]{52}JQQJ9[9DH][A-Za-z0-9][A-L][A-Za-z0-9]{16}[A-Za-z][A-Za-z0-9]{7}",
        literals: &["JQQJ9"],
        literal_offset: 52,
        context: &[],
        key: "[A-Za-z0-9]{52}JQQJ9[9DH][A-Za-z0-9]{26}",
        distinctive: true,
    },
    // Azure OpenAI keys of the legacy format: 32 hex, near `azure`
    // (kingfisher.azureopenai.1: `azure … openai … key … [a-f0-9]{32}`).
    KeyFormat {
        id: "azure-openai-legacy-key",
        provider: "azure",
        description: "Azure OpenAI key, legacy format (32 hex characters near \"azure\")",
        regex: context_regex!("azure", "[a-fA-F0-9]{32}"),
        literals: &["azure", "Azure", "AZURE"],
        literal_offset: 0,
        context: &["azure"],
        key: "[a-fA-F0-9]{32}",
        distinctive: false,
    },
    // trufflehog pkg/detectors/mistral: `PrefixRegex(["mistral"])` +
    // `\b([A-Za-z0-9]{32})\b`.
    KeyFormat {
        id: "mistral-api-key",
        provider: "mistral",
        description: "Mistral AI API key (32 characters near \"mistral\")",
        regex: context_regex!("mistral", "[A-Za-z0-9]{32}"),
        literals: &["mistral", "Mistral", "MISTRAL"],
        literal_offset: 0,
        context: &["mistral"],
        key: "[A-Za-z0-9]{32}",
        distinctive: false,
    },
    // gitleaks `cohere-api-token`: keywords `cohere`, `CO_API_KEY`,
    // `[a-zA-Z0-9]{40}`.
    KeyFormat {
        id: "cohere-api-key",
        provider: "cohere",
        description: "Cohere API key (40 characters near \"cohere\" or CO_API_KEY)",
        regex: context_regex!("cohere|co_api_key", "[A-Za-z0-9]{40}"),
        literals: &["cohere", "Cohere", "COHERE", "CO_API_KEY", "co_api_key"],
        literal_offset: 0,
        context: &["cohere", "CO_API_KEY"],
        key: "[A-Za-z0-9]{40}",
        distinctive: false,
    },
    // DeepSeek keys: `sk-` + 32 lowercase hex (DeepSeek platform keys); the
    // shape is shared with other `sk-` keys, so the word `deepseek` must be
    // near, trufflehog `PrefixRegex` style.
    KeyFormat {
        id: "deepseek-api-key",
        provider: "deepseek",
        description: "DeepSeek API key (sk- and 32 hex characters near \"deepseek\")",
        regex: context_regex!("deepseek", "sk-[a-f0-9]{32}"),
        literals: &["deepseek", "DeepSeek", "Deepseek", "DEEPSEEK"],
        literal_offset: 0,
        context: &["deepseek"],
        key: "sk-[a-f0-9]{32}",
        distinctive: false,
    },
];

/// Every format, in table order.
pub fn formats() -> &'static [KeyFormat] {
    FORMATS
}

/// The format with this id.
pub fn by_id(id: &str) -> Option<&'static KeyFormat> {
    FORMATS.iter().find(|f| f.id == id)
}

/// `KeyFormat::key` compiled, full-match, in table order.
fn shapes() -> &'static [Option<regex::Regex>] {
    static SHAPES: OnceLock<Vec<Option<regex::Regex>>> = OnceLock::new();
    SHAPES.get_or_init(|| {
        FORMATS
            .iter()
            .map(|f| regex::Regex::new(&format!("^(?:{})$", f.key)).ok())
            .collect()
    })
}

/// The provider whose key format `credential` (a presented key: a header
/// value with any `Bearer `/`Basic ` scheme already removed) has: a
/// distinctive format names its provider wherever the key was sent; a
/// bare shape (Mistral's 32 characters, …) names `called` when it is that
/// provider's shape. `None`: not a format kt knows. Looks at the shape
/// only; the value is neither kept nor returned.
pub fn provider_of(credential: &str, called: Option<&str>) -> Option<&'static str> {
    let v = credential.trim();
    let v = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .unwrap_or(v)
        .trim();
    if v.is_empty() {
        return None;
    }
    let shapes = shapes();
    let fits = |i: usize| shapes[i].as_ref().is_some_and(|re| re.is_match(v));
    if let Some(i) = (0..FORMATS.len()).find(|&i| FORMATS[i].distinctive && fits(i)) {
        return Some(FORMATS[i].provider);
    }
    let called = called?;
    (0..FORMATS.len())
        .find(|&i| !FORMATS[i].distinctive && FORMATS[i].provider == called && fits(i))
        .map(|i| FORMATS[i].provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_compiles_and_ids_are_unique() {
        for (i, f) in FORMATS.iter().enumerate() {
            assert!(regex::Regex::new(f.regex).is_ok(), "{}: regex", f.id);
            assert!(shapes()[i].is_some(), "{}: key shape", f.id);
            assert_eq!(
                f.distinctive,
                f.context.is_empty(),
                "{}: context formats are the non-distinctive ones",
                f.id
            );
            assert!(
                FORMATS[..i].iter().all(|g| g.id != f.id),
                "{}: duplicate id",
                f.id
            );
        }
    }

    #[test]
    fn presented_keys_are_named_by_their_format_or_the_provider_called() {
        let groq = format!("gs{}{}", "k_", "a1".repeat(26));
        assert_eq!(provider_of(&groq, Some("openai")), Some("groq"));
        assert_eq!(provider_of(&format!("Bearer {groq}"), None), Some("groq"));
        let r8 = format!("r8{}{}", "_", "Ab3".repeat(13));
        assert_eq!(provider_of(&r8, None), Some("replicate"));
        // A bare 32-character key is Mistral's only when sent to Mistral.
        let bare = "Zx9".repeat(10) + "Q7";
        assert_eq!(provider_of(&bare, Some("mistral")), Some("mistral"));
        assert_eq!(provider_of(&bare, Some("openai")), None);
        assert_eq!(provider_of(&bare, None), None);
        assert_eq!(provider_of("legacy-token-123", Some("openai")), None);
        assert_eq!(provider_of("  ", Some("mistral")), None);
    }
}
