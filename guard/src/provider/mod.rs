//! The provider catalog: every fact kt knows about an AI provider, in one
//! place. Which names a provider answers on, where its API lives, how the
//! managed key goes on the wire, which client headers and query keys may
//! carry a credential, and what its error bodies look like (so kt's own
//! errors read as native to the client's SDK).
//!
//! Routing, the gateway, DLP, capture and the CLI ask this module; none of
//! them spells a provider host or header name itself. Pure: no I/O.
#![forbid(unsafe_code)]

pub mod keys;

use std::sync::Arc;

use http::StatusCode;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};

use crate::record::Attempt;

/// A provider family; decides the credential style, hosts and error shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    /// OpenAI (`Authorization: Bearer`).
    OpenAi,
    /// Anthropic (`x-api-key`).
    Anthropic,
    /// Mistral AI (Bearer).
    Mistral,
    /// Groq (Bearer, OpenAI-compatible under `/openai/v1`).
    Groq,
    /// DeepSeek (Bearer).
    DeepSeek,
    /// xAI (Bearer).
    XAi,
    /// OpenRouter (Bearer).
    OpenRouter,
    /// Together AI (Bearer).
    Together,
    /// Fireworks AI (Bearer).
    Fireworks,
    /// Perplexity (Bearer).
    Perplexity,
    /// Cohere (Bearer; its own `/v1` and `/v2` paths).
    Cohere,
    /// Hugging Face Inference Providers router (Bearer).
    HuggingFace,
    /// Google Gemini API (`x-goog-api-key`).
    Gemini,
    /// Azure OpenAI (`api-key`; resource hosts `*.openai.azure.com`).
    Azure,
    /// Amazon Bedrock with Bedrock API keys (Bearer; AWS event-stream
    /// frames when streaming).
    Bedrock,
    /// A provider defined in the config (`providers.custom`).
    Custom(Arc<CustomProvider>),
    /// Another name; needs a `base_url`, spoken to OpenAI-style.
    Other(String),
}

/// A provider the config defines itself (`providers.custom`): a
/// self-hosted or new endpoint with its own hosts and credential style.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CustomProvider {
    /// `name` (lower case; not a catalog name).
    pub name: String,
    /// `hosts`: TLS names it answers on (`*.example.com` for subdomains).
    pub hosts: Vec<String>,
    /// `base_url`: the default endpoint of its targets.
    pub base_url: Option<String>,
    /// The path of `base_url` ("" without one): removed from requests sent
    /// to its hosts so they can be re-rooted on any target.
    pub api_root: String,
    /// `credential`: how the managed key goes on the wire.
    pub credential: CustomCredential,
    /// `error_shape` (default OpenAI's).
    pub error_shape: ErrorShape,
}

/// How a config-defined provider takes its key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CustomCredential {
    /// One of the catalog's styles.
    Style(KeyStyle),
    /// `header: NAME`: the key alone in header NAME (lower case).
    Header(String),
}

/// How the managed key is put on an upstream request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyStyle {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `x-api-key: <key>`.
    XApiKey,
    /// `x-goog-api-key: <key>` (Google APIs). Never `?key=`: a query string
    /// ends up in access logs and proxies' caches.
    XGoogApiKey,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

impl KeyStyle {
    /// The name written in config files (`bearer`, `x-api-key`, ...).
    pub fn name(self) -> &'static str {
        match self {
            KeyStyle::Bearer => "bearer",
            KeyStyle::XApiKey => "x-api-key",
            KeyStyle::XGoogApiKey => "x-goog-api-key",
            KeyStyle::ApiKey => "api-key",
        }
    }
}

/// Which JSON shape a provider's error bodies have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorShape {
    /// `{"error":{"message","type","code"}}`.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`.
    Anthropic,
    /// Google's `{"error":{"code":<http status>,"message","status"}}`.
    Google,
    /// AWS REST-JSON: `{"message", "__type"}` (the SDKs read the exception
    /// name from `__type` when there is no `x-amzn-ErrorType` header).
    Aws,
}

impl ErrorShape {
    /// The name written in config files.
    pub fn name(self) -> &'static str {
        match self {
            ErrorShape::OpenAi => "openai",
            ErrorShape::Anthropic => "anthropic",
            ErrorShape::Google => "google",
            ErrorShape::Aws => "aws",
        }
    }
}

/// Static facts about one known provider.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Official API host names (TLS names kt terminates for it). A name
    /// starting with `*.` stands for every name under it (Azure's resource
    /// hosts): matched when a client names it (SNI, CONNECT, Host), never
    /// resolved in advance.
    pub hosts: &'static [&'static str],
    /// The official endpoint, including its API root path ("": there is
    /// none common to all customers; a target names its own, e.g. Azure's
    /// `resource` or Bedrock's `region`).
    pub base_url: &'static str,
    /// The API root path in that endpoint (`/v1` for OpenAI), removed from
    /// paths so a request can be re-rooted on any target.
    pub api_root: &'static str,
    /// How the managed key is sent.
    pub key_style: KeyStyle,
    /// The shape of its error bodies.
    pub error_shape: ErrorShape,
    /// An unbilled request that proves a key works (`None`: no such
    /// endpoint is documented, or it would not check the key).
    pub probe: Option<Probe>,
    /// How its streamed answers are framed (for the README and tests;
    /// kt relays every format byte for byte).
    pub stream: StreamFormat,
    /// Hosts whose paths live under a prefix on the official endpoint
    /// (a legacy host folded into a newer one): `(host, prefix)`.
    pub host_paths: &'static [(&'static str, &'static str)],
}

/// How a provider frames a streamed answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFormat {
    /// Server-sent events (`text/event-stream`).
    Sse,
    /// AWS event-stream binary frames (`application/vnd.amazon.eventstream`).
    AwsEventStream,
}

/// An unbilled health request for a provider: one request with the managed
/// key that answers 2xx for a good key and 401/403 for a bad one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// HTTP method (`GET`).
    pub method: &'static str,
    /// Path relative to the target's base URL (after its API root), as
    /// requests are re-rooted on a target.
    pub path: &'static str,
    /// Extra headers the endpoint needs (never a credential).
    pub headers: &'static [(&'static str, &'static str)],
}

/// `GET path`, no extra headers: the list-models call of most APIs.
const fn get(path: &'static str) -> Option<Probe> {
    Some(Probe {
        method: "GET",
        path,
        headers: &[],
    })
}

/// The probe of providers kt does not know: the OpenAI-compatible
/// list-models call under the target's base URL.
pub const OPENAI_COMPATIBLE_PROBE: Probe = Probe {
    method: "GET",
    path: "/models",
    headers: &[],
};

// OpenAI: https://platform.openai.com/docs/api-reference/authentication
// (Bearer; base https://api.openai.com/v1).
const OPENAI: Spec = Spec {
    hosts: &["api.openai.com"],
    base_url: "https://api.openai.com/v1",
    api_root: "/v1",
    key_style: KeyStyle::Bearer,
    error_shape: ErrorShape::OpenAi,
    // https://platform.openai.com/docs/api-reference/models/list
    probe: get("/models"),
    stream: StreamFormat::Sse,
    host_paths: &[],
};

// Anthropic: https://docs.anthropic.com/en/api/overview (x-api-key header;
// paths already carry /v1, so the root is empty).
const ANTHROPIC: Spec = Spec {
    hosts: &["api.anthropic.com"],
    base_url: "https://api.anthropic.com",
    api_root: "",
    key_style: KeyStyle::XApiKey,
    error_shape: ErrorShape::Anthropic,
    // https://docs.anthropic.com/en/api/models-list (`GET /v1/models`, needs
    // the `anthropic-version` header like every call).
    probe: Some(Probe {
        method: "GET",
        path: "/v1/models",
        headers: &[("anthropic-version", "2023-06-01")],
    }),
    stream: StreamFormat::Sse,
    host_paths: &[],
};

// The OpenAI-compatible Bearer providers below differ only in where their
// API lives; their error bodies are OpenAI-shaped.
const fn bearer(
    hosts: &'static [&'static str],
    base_url: &'static str,
    api_root: &'static str,
    probe: Option<Probe>,
) -> Spec {
    Spec {
        hosts,
        base_url,
        api_root,
        key_style: KeyStyle::Bearer,
        error_shape: ErrorShape::OpenAi,
        probe,
        stream: StreamFormat::Sse,
        host_paths: &[],
    }
}

// Mistral: https://docs.mistral.ai/api/ and the @ai-sdk/mistral default
// (https://tessl.io/registry/tessl/npm-ai-sdk--mistral/2.0.0/files/docs/provider-configuration.md:
// "The default prefix is `https://api.mistral.ai/v1`", key in `Authorization`).
// Probe: `GET /v1/models` (https://docs.mistral.ai/api/#tag/models).
const MISTRAL: Spec = bearer(
    &["api.mistral.ai"],
    "https://api.mistral.ai/v1",
    "/v1",
    get("/models"),
);

// Groq: https://console.groq.com/docs/openai ("change the base_url to
// https://api.groq.com/openai/v1").
// Probe: `GET /openai/v1/models` (https://console.groq.com/docs/api-reference#models-list).
const GROQ: Spec = bearer(
    &["api.groq.com"],
    "https://api.groq.com/openai/v1",
    "/openai/v1",
    get("/models"),
);

// DeepSeek: https://api-docs.deepseek.com/ (base_url https://api.deepseek.com,
// `Authorization: Bearer`; `/v1` is also accepted and "has nothing to do with
// the model version", so the root is empty and both path forms pass through).
// Probe: `GET /models` (https://api-docs.deepseek.com/api/list-models).
const DEEPSEEK: Spec = bearer(
    &["api.deepseek.com"],
    "https://api.deepseek.com",
    "",
    get("/models"),
);

// xAI: https://docs.x.ai/developers/rest-api-reference ("The base for all
// routes is at https://api.x.ai ... Authorization: Bearer"); OpenAI-style
// routes under /v1 (langchain-xai default https://api.x.ai/v1/).
// Probe: `GET /v1/models` (https://docs.x.ai/docs/api-reference#list-models).
const XAI: Spec = bearer(&["api.x.ai"], "https://api.x.ai/v1", "/v1", get("/models"));

// OpenRouter: https://docs.boundaryml.com/ref/llm-client-providers/openai-generic-open-router
// (base_url https://openrouter.ai/api/v1, Bearer `sk-or-v1-` keys).
// Probe: `GET /api/v1/key`, the current key's details
// (https://openrouter.ai/docs/api/api-reference/api-keys/get-current-key);
// its `/models` answers without a key, so it would prove nothing.
const OPENROUTER: Spec = bearer(
    &["openrouter.ai"],
    "https://openrouter.ai/api/v1",
    "/api/v1",
    get("/key"),
);

// Together: https://docs.together.ai/docs/inference/openai-compatibility
// (base_url https://api.together.ai/v1); its SDKs' long-standing default is
// https://api.together.xyz/v1 (e.g. https://docs.pipecat.ai/server/services/llm/together).
// Probe: `GET /v1/models` (https://docs.together.ai/reference/models-1).
const TOGETHER: Spec = bearer(
    &["api.together.xyz", "api.together.ai"],
    "https://api.together.xyz/v1",
    "/v1",
    get("/models"),
);

// Fireworks: https://strandsagents.com/docs/community/model-providers/fireworksai/
// ("base_url: https://api.fireworks.ai/inference/v1", OpenAI SDK, Bearer).
// No probe: its documented model list lives under
// `/v1/accounts/{account}/models`, which needs the account id.
const FIREWORKS: Spec = bearer(
    &["api.fireworks.ai"],
    "https://api.fireworks.ai/inference/v1",
    "/inference/v1",
    None,
);

// Perplexity: https://rdrr.io/cran/ellmer/man/chat_perplexity.html (base_url
// https://api.perplexity.ai/, OpenAI-style `/chat/completions` at the root).
// No probe: no unbilled endpoint that checks the key is documented.
const PERPLEXITY: Spec = bearer(
    &["api.perplexity.ai"],
    "https://api.perplexity.ai",
    "",
    None,
);

// Cohere: https://docs.cohere.com/docs/migrating-v1-to-v2 (native /v1 and /v2
// paths, so the root is empty); `POST https://api.cohere.com/v2/chat` with
// `Authorization: Bearer` (https://rdrr.io/cran/gptstudio/man/request_base_cohere.html).
// Probe: `GET /v1/models` (https://docs.cohere.com/reference/list-models).
const COHERE: Spec = bearer(
    &["api.cohere.com"],
    "https://api.cohere.com",
    "",
    get("/v1/models"),
);

// Hugging Face Inference Providers: https://huggingface.co/changelog/inference-providers-openai-compatible
// ("point to router.huggingface.co/v1"), HF token as Bearer. The router
// also serves the per-provider task APIs (`/hf-inference/models/{id}`,
// `/{provider}/...`, as huggingface.js builds them), so the root is empty
// and every path passes through. The legacy serverless host
// api-inference.huggingface.co (`/models/{id}`) moved to
// `router.huggingface.co/hf-inference/models/{id}` (its deprecation:
// https://github.com/huggingface/transformers/issues/42169 and the
// migration commits it cites): a job still calling it is captured and its
// paths re-rooted there.
// No probe: it is not documented whether the router's `/v1/models` checks
// the token.
const HUGGINGFACE: Spec = Spec {
    hosts: &["router.huggingface.co", "api-inference.huggingface.co"],
    base_url: "https://router.huggingface.co",
    api_root: "",
    key_style: KeyStyle::Bearer,
    error_shape: ErrorShape::OpenAi,
    probe: None,
    stream: StreamFormat::Sse,
    host_paths: &[("api-inference.huggingface.co", "/hf-inference")],
};

// Gemini API: https://ai.google.dev/api (REST calls on
// https://generativelanguage.googleapis.com/v1beta/models/...:generateContent,
// streaming `:streamGenerateContent?alt=sse`) and `x-goog-api-key` as the
// header form of the key (e.g. the Elixir client
// https://hexdocs.pm/gemini_ex/0.9.0/Gemini.Auth.GeminiStrategy.html). Its
// paths carry their version (`/v1beta/...`, `/v1/...`, and the
// OpenAI-compatible `/v1beta/openai/...`), so, as for Anthropic, the root is
// empty and every form passes through unchanged. The OpenAI-compatible
// path (base URL `https://generativelanguage.googleapis.com/v1beta/openai/`,
// e.g. https://docs.rs/aptu-core/0.2.4/aptu_core/ai/constant.GEMINI_API_URL.html
// and https://pub.dev/documentation/phoenixdb/4.1.0/ai/OpenAICompatibleChatModel/OpenAICompatibleChatModel.gemini.html)
// is used with the OpenAI SDKs, which send the key as `Authorization:
// Bearer`, so kt sends it that way there ([`Provider::key_style_for`]).
const GEMINI: Spec = Spec {
    hosts: &["generativelanguage.googleapis.com"],
    base_url: "https://generativelanguage.googleapis.com",
    api_root: "",
    key_style: KeyStyle::XGoogApiKey,
    error_shape: ErrorShape::Google,
    // https://ai.google.dev/api/models#method:-models.list
    probe: get("/v1beta/models"),
    stream: StreamFormat::Sse,
    host_paths: &[],
};

/// The OpenAI-compatible path of the Gemini API (Bearer there).
const GEMINI_OPENAI_ROOT: &str = "/v1beta/openai/";

// Azure OpenAI: resource endpoints `https://{resource}.openai.azure.com`
// (and `https://{resource}.cognitiveservices.azure.com` for resources made
// as Azure AI services / Foundry), the key in the `api-key` header
// (https://learn.microsoft.com/en-us/rest/api/azureopenai/models/list:
// "api-key ... Provide your Cognitive Services Azure OpenAI account key
// here", endpoint "https://aoairesource.openai.azure.com"; BAML's provider
// reference https://www.mintlify.com/BoundaryML/baml/reference/providers/azure:
// "Injected via the API-KEY header", base URL
// `https://${resource_name}.openai.azure.com/openai/deployments/${deployment_id}`),
// or a Microsoft Entra ID token as `Authorization: Bearer` (scope
// `https://cognitiveservices.azure.com/.default`; recognised as the `entra`
// credential kind: passed, never swapped). Paths:
// `/openai/deployments/{deployment}/chat/completions?api-version=...` and
// the v1 API under `{endpoint}/openai/v1`
// (https://learn.microsoft.com/en-us/rest/api/microsoft-foundry/azureopenai/models:
// "Server: {endpoint}/openai/v1", key in `api-key` or `authorization`).
// Both carry their own root, so the root is empty and `api-version` stays
// in the query. There is no common endpoint: a target names its
// `resource` (or a `base_url`). SSE streams, OpenAI-shaped errors.
// `*.cognitiveservices.azure.com` also names other Azure AI services'
// resources (Speech, Vision): a connection kt terminates there is still
// routed to the Azure OpenAI target, so do not capture those jobs' names.
// Probe: `GET /openai/models?api-version=2024-10-21`, the data-plane model
// list (the Models - List page above).
const AZURE: Spec = Spec {
    hosts: &["*.openai.azure.com", "*.cognitiveservices.azure.com"],
    base_url: "",
    api_root: "",
    key_style: KeyStyle::ApiKey,
    error_shape: ErrorShape::OpenAi,
    probe: get("/openai/models?api-version=2024-10-21"),
    stream: StreamFormat::Sse,
    host_paths: &[],
};

/// `bedrock-runtime.{region}.amazonaws.com` and `bedrock.{region}...` for
/// every region listed.
macro_rules! bedrock_hosts {
    ($($r:literal),* $(,)?) => {
        &[
            $(concat!("bedrock-runtime.", $r, ".amazonaws.com"),)*
            $(concat!("bedrock.", $r, ".amazonaws.com"),)*
            "bedrock-runtime-fips.us-east-1.amazonaws.com",
            "bedrock-runtime-fips.us-east-2.amazonaws.com",
            "bedrock-runtime-fips.us-west-2.amazonaws.com",
            "bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
            "bedrock-runtime-fips.us-gov-east-1.amazonaws.com",
            "bedrock-fips.us-east-1.amazonaws.com",
            "bedrock-fips.us-east-2.amazonaws.com",
            "bedrock-fips.us-west-1.amazonaws.com",
            "bedrock-fips.us-west-2.amazonaws.com",
            "bedrock-fips.us-gov-west-1.amazonaws.com",
            "bedrock-fips.us-gov-east-1.amazonaws.com",
        ]
    };
}

// Amazon Bedrock: regional endpoints `bedrock-runtime.{region}.amazonaws.com`
// (inference: `/model/{modelId}/converse`, `/converse-stream`, `/invoke`,
// `/invoke-with-response-stream`, and the OpenAI-compatible
// `/openai/v1/chat/completions`) and `bedrock.{region}.amazonaws.com`
// (control plane), FIPS variants in the US regions
// (https://docs.aws.amazon.com/general/latest/gr/bedrock.html; the regions:
// https://docs.aws.amazon.com/bedrock/latest/userguide/endpoints-region-availability.html,
// "The bedrock-runtime endpoint is available in every AWS Region where
// Amazon Bedrock is offered"). The OpenAI-compatible `bedrock-mantle`
// endpoint is not in the catalog yet. Every name
// is listed (no wildcard: `*.amazonaws.com` would make kt's CA able to
// issue for all of AWS). Bedrock API keys go as `Authorization: Bearer`
// ("Authorization: Bearer $AWS_BEARER_TOKEN_BEDROCK",
// https://docs.aws.amazon.com/bedrock/latest/userguide/api-keys-use.html);
// SigV4-signed requests (`AWS4-HMAC-SHA256`) are another credential kind,
// refused unless `gateway.credentials.sigv4: pass`. Streams
// (`converse-stream`, `invoke-with-response-stream`) are AWS event-stream
// frames whose events are `messageStart`, `contentBlockDelta`,
// `messageStop`, ... (https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_ConverseStreamOutput.html;
// aws-sdk-bedrockruntime decodes them in `shape_converse_stream.rs`);
// errors are REST-JSON `{"message"}` with the exception name. There is no common endpoint: a target names its `region`.
// No probe: the unbilled `ListFoundationModels` lives on the control-plane
// host, not on the runtime endpoint requests are re-rooted on.
const BEDROCK: Spec = Spec {
    hosts: bedrock_hosts!(
        "us-east-1",
        "us-east-2",
        "us-west-1",
        "us-west-2",
        "us-gov-east-1",
        "us-gov-west-1",
        "ca-central-1",
        "ca-west-1",
        "mx-central-1",
        "sa-east-1",
        "eu-central-1",
        "eu-central-2",
        "eu-west-1",
        "eu-west-2",
        "eu-west-3",
        "eu-north-1",
        "eu-south-1",
        "eu-south-2",
        "ap-south-1",
        "ap-south-2",
        "ap-east-2",
        "ap-northeast-1",
        "ap-northeast-2",
        "ap-northeast-3",
        "ap-southeast-1",
        "ap-southeast-2",
        "ap-southeast-3",
        "ap-southeast-4",
        "ap-southeast-5",
        "ap-southeast-6",
        "ap-southeast-7",
        "me-central-1",
        "me-south-1",
        "il-central-1",
        "af-south-1",
    ),
    base_url: "",
    api_root: "",
    key_style: KeyStyle::Bearer,
    error_shape: ErrorShape::Aws,
    probe: None,
    stream: StreamFormat::AwsEventStream,
    host_paths: &[],
};

/// Azure's resource endpoint for `resource` (a target's `resource:`).
pub fn azure_endpoint(resource: &str) -> String {
    format!("https://{resource}.openai.azure.com")
}

/// Bedrock's runtime endpoint in `region` (a target's `region:`).
pub fn bedrock_endpoint(region: &str) -> String {
    format!("https://bedrock-runtime.{region}.amazonaws.com")
}

/// The providers kt knows by name, in catalog order.
pub const KNOWN: &[Provider] = &[
    Provider::OpenAi,
    Provider::Anthropic,
    Provider::Mistral,
    Provider::Groq,
    Provider::DeepSeek,
    Provider::XAi,
    Provider::OpenRouter,
    Provider::Together,
    Provider::Fireworks,
    Provider::Perplexity,
    Provider::Cohere,
    Provider::HuggingFace,
    Provider::Gemini,
    Provider::Azure,
    Provider::Bedrock,
];

/// The names of every known provider, for messages ("openai, anthropic, ...").
pub fn known_names() -> String {
    KNOWN
        .iter()
        .map(Provider::name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Provider {
    /// The name as written in config files and shown to users.
    pub fn name(&self) -> &str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Mistral => "mistral",
            Provider::Groq => "groq",
            Provider::DeepSeek => "deepseek",
            Provider::XAi => "xai",
            Provider::OpenRouter => "openrouter",
            Provider::Together => "together",
            Provider::Fireworks => "fireworks",
            Provider::Perplexity => "perplexity",
            Provider::Cohere => "cohere",
            Provider::HuggingFace => "huggingface",
            Provider::Gemini => "gemini",
            Provider::Azure => "azure",
            Provider::Bedrock => "bedrock",
            Provider::Custom(c) => &c.name,
            Provider::Other(name) => name,
        }
    }

    /// Parses a provider name (case-insensitive).
    pub fn parse(name: &str) -> Provider {
        let lower = name.to_ascii_lowercase();
        KNOWN
            .iter()
            .find(|p| p.name() == lower)
            .cloned()
            .unwrap_or(Provider::Other(lower))
    }

    /// The catalog entry, when this is a known provider.
    pub fn spec(&self) -> Option<&'static Spec> {
        match self {
            Provider::OpenAi => Some(&OPENAI),
            Provider::Anthropic => Some(&ANTHROPIC),
            Provider::Mistral => Some(&MISTRAL),
            Provider::Groq => Some(&GROQ),
            Provider::DeepSeek => Some(&DEEPSEEK),
            Provider::XAi => Some(&XAI),
            Provider::OpenRouter => Some(&OPENROUTER),
            Provider::Together => Some(&TOGETHER),
            Provider::Fireworks => Some(&FIREWORKS),
            Provider::Perplexity => Some(&PERPLEXITY),
            Provider::Cohere => Some(&COHERE),
            Provider::HuggingFace => Some(&HUGGINGFACE),
            Provider::Gemini => Some(&GEMINI),
            Provider::Azure => Some(&AZURE),
            Provider::Bedrock => Some(&BEDROCK),
            Provider::Custom(_) | Provider::Other(_) => None,
        }
    }

    /// The official API endpoint, when this is a known provider with one
    /// common to all customers (not Azure, not Bedrock: a target names its
    /// resource or region).
    pub fn default_base_url(&self) -> Option<&'static str> {
        self.spec().map(|s| s.base_url).filter(|u| !u.is_empty())
    }

    /// The official API root path (`/v1` for OpenAI; "" when unknown; a
    /// custom provider's `base_url` path).
    pub fn api_root(&self) -> &str {
        match self {
            Provider::Custom(c) => &c.api_root,
            _ => self.spec().map_or("", |s| s.api_root),
        }
    }

    /// Official API host names ("" for none).
    pub fn hosts(&self) -> &'static [&'static str] {
        self.spec().map_or(&[], |s| s.hosts)
    }

    /// How the managed key is sent (unknown providers: OpenAI-style Bearer;
    /// a custom header is [`CustomCredential::Header`]).
    pub fn key_style(&self) -> KeyStyle {
        match self {
            Provider::Custom(c) => match c.credential {
                CustomCredential::Style(s) => s,
                CustomCredential::Header(_) => KeyStyle::Bearer,
            },
            _ => self.spec().map_or(KeyStyle::Bearer, |s| s.key_style),
        }
    }

    /// How the managed key is sent on a request for `api_path`: Gemini's
    /// OpenAI-compatible path takes a Bearer token, its native paths
    /// `x-goog-api-key`.
    pub fn key_style_for(&self, api_path: &str) -> KeyStyle {
        if *self == Provider::Gemini && api_path.starts_with(GEMINI_OPENAI_ROOT) {
            return KeyStyle::Bearer;
        }
        self.key_style()
    }

    /// How streamed answers are framed.
    pub fn stream_format(&self) -> StreamFormat {
        self.spec().map_or(StreamFormat::Sse, |s| s.stream)
    }

    /// Every host name pattern this provider answers on: the catalog's,
    /// or a custom provider's `hosts`.
    pub fn host_patterns(&self) -> Vec<String> {
        match self {
            Provider::Custom(c) => c.hosts.clone(),
            _ => self.hosts().iter().map(|h| (*h).to_string()).collect(),
        }
    }

    /// The path prefix requests sent to `host` have on the official
    /// endpoint ("" for most; `/hf-inference` for Hugging Face's legacy
    /// api-inference host).
    pub fn host_path_prefix(&self, host: &str) -> &'static str {
        self.spec()
            .and_then(|s| {
                s.host_paths
                    .iter()
                    .find(|(h, _)| h.eq_ignore_ascii_case(host.trim_end_matches('.')))
            })
            .map_or("", |(_, p)| *p)
    }

    /// The unbilled health probe (unknown providers: the OpenAI-compatible
    /// `GET /models`; `None`: a known provider without one).
    pub fn probe(&self) -> Option<Probe> {
        match self.spec() {
            Some(s) => s.probe,
            None => Some(OPENAI_COMPATIBLE_PROBE),
        }
    }

    /// The error-body shape (unknown providers: OpenAI's).
    pub fn error_shape(&self) -> ErrorShape {
        match self {
            Provider::Custom(c) => c.error_shape,
            _ => self.spec().map_or(ErrorShape::OpenAi, |s| s.error_shape),
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The known provider whose official host `host` is (case and a trailing
/// dot ignored; `*.` patterns match any name under them).
pub fn for_official_host(host: &str) -> Option<Provider> {
    KNOWN
        .iter()
        .find(|p| p.hosts().iter().any(|h| host_matches(h, host)))
        .cloned()
}

/// Whether `host` is named by `pattern`: equal (any case, a trailing dot
/// ignored), or under it when the pattern is `*.suffix` (one or more
/// labels in front: `res.openai.azure.com` is under `*.openai.azure.com`,
/// `openai.azure.com` itself is not).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let pattern = pattern.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .to_ascii_lowercase()
            .strip_suffix(&suffix.to_ascii_lowercase())
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Whether a host pattern is a wildcard (cannot be resolved in advance).
pub fn is_wildcard(pattern: &str) -> bool {
    pattern.starts_with("*.")
}

/// Every official host of every known provider (patterns included).
pub fn official_hosts() -> impl Iterator<Item = &'static str> {
    KNOWN.iter().flat_map(|p| p.hosts().iter().copied())
}

/// What kind of credential a client presented, as kt decides what to do
/// with it (`gateway.credentials`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// No credential at all.
    None,
    /// An API key of the provider called, or one kt does not recognise
    /// (a legacy key).
    ApiKey,
    /// An Anthropic OAuth/subscription token (`sk-ant-oat01-…`,
    /// `sk-ant-ort01-…`): Claude Code on a developer machine.
    OAuth,
    /// A key whose format belongs to another provider.
    OtherProvider(Provider),
    /// A Microsoft Entra ID access token (a JWT as `Authorization:
    /// Bearer`) sent to Azure OpenAI: a person's or workload's identity,
    /// never swapped.
    Entra,
    /// An AWS Signature Version 4 request (`Authorization:
    /// AWS4-HMAC-SHA256 ...`): signed with IAM credentials over the
    /// request itself, so there is nothing kt could swap in its place.
    SigV4,
}

impl CredentialKind {
    /// `none`, `api-key`, `oauth` or `other-provider`, for events.
    pub fn label(&self) -> &'static str {
        match self {
            CredentialKind::None => "none",
            CredentialKind::ApiKey => "api-key",
            CredentialKind::OAuth => "oauth",
            CredentialKind::OtherProvider(_) => "other-provider",
            CredentialKind::Entra => "entra",
            CredentialKind::SigV4 => "sigv4",
        }
    }
}

/// Prefixes only one provider issues (from the providers' documentation and
/// the gitleaks/trufflehog rules the DLP pack cites): enough to tell a key
/// of another provider apart. Shared `sk-` keys (DeepSeek, Mistral, …)
/// are not distinctive and stay [`CredentialKind::ApiKey`].
const DISTINCT_PREFIXES: &[(&str, Provider)] = &[
    ("sk-proj-", Provider::OpenAi),
    ("sk-svcacct-", Provider::OpenAi),
    ("sk-admin-", Provider::OpenAi),
    ("sk-ant-api", Provider::Anthropic),
    ("sk-ant-admin", Provider::Anthropic),
    ("gsk_", Provider::Groq),
    ("xai-", Provider::XAi),
    ("sk-or-", Provider::OpenRouter),
    ("pplx-", Provider::Perplexity),
    ("hf_", Provider::HuggingFace),
    ("api_org_", Provider::HuggingFace),
    ("AIza", Provider::Gemini),
    // Bedrock API keys, long-term and short-term (see `keys.rs`).
    ("ABSK", Provider::Bedrock),
    ("bedrock-api-key-", Provider::Bedrock),
    // Together (`tgp_v1_`) and Fireworks (`fw_`) keys (see `keys.rs`).
    ("tgp_v1_", Provider::Together),
    ("fw_", Provider::Fireworks),
];

/// Classifies the credential a client sent to `called` (`None`: it sent
/// none). Pure: looks at the value's shape only, never stores it.
pub fn classify_credential(value: Option<&str>, called: &Provider) -> CredentialKind {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return CredentialKind::None;
    };
    if v.starts_with("sk-ant-oat") || v.starts_with("sk-ant-ort") {
        return CredentialKind::OAuth;
    }
    // https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-signing-elements.html
    // (`Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`).
    if v.starts_with("AWS4-HMAC-SHA256") {
        return CredentialKind::SigV4;
    }
    if *called == Provider::Azure && is_jwt(v) {
        return CredentialKind::Entra;
    }
    match DISTINCT_PREFIXES.iter().find(|(p, _)| v.starts_with(p)) {
        Some((_, owner)) if owner != called => CredentialKind::OtherProvider(owner.clone()),
        _ => CredentialKind::ApiKey,
    }
}

/// Whether `v` has a JWT's shape (`eyJ<header>.<payload>.<signature>`,
/// base64url): what Microsoft Entra ID issues as access tokens.
fn is_jwt(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && v.starts_with("eyJ")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        })
}

/// Headers a client may carry a credential in. All are removed before a
/// request is forwarded, and DLP does not scan them (their content is
/// replaced by the managed key, and only its fingerprint is kept).
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "openai-api-key",
    "anthropic-api-key",
    // Azure API Management's key header, used in front of Azure OpenAI.
    "ocp-apim-subscription-key",
    // The session token of temporary AWS credentials (SigV4): never
    // forwarded under a managed key, put back only when a SigV4 request is
    // passed.
    "x-amz-security-token",
    // Browser and SDK sessions: never forwarded under the managed key.
    "cookie",
];

/// Client headers that choose which organisation or project the managed
/// key bills; a client never gets to pick, so they are dropped.
pub const BILLING_SCOPE_HEADERS: &[&str] = &["openai-organization", "openai-project"];

/// Query-string keys that carry credentials; all are removed before forwarding.
pub const CREDENTIAL_QUERY_KEYS: &[&str] = &[
    "key",
    "api_key",
    "api-key",
    "apikey",
    "access_token",
    "token",
];

/// Whether `name` (any case) is a credential header.
pub fn is_credential_header(name: &str) -> bool {
    CREDENTIAL_HEADERS
        .iter()
        .any(|c| c.eq_ignore_ascii_case(name))
}

/// The managed key does not fit in an HTTP header value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the managed key contains characters not allowed in a header")]
pub struct BadKey;

/// The header carrying the managed key in the provider's own style, marked
/// sensitive so HTTP/2 never indexes it.
pub fn managed_key_header(
    provider: &Provider,
    key: &str,
) -> Result<(HeaderName, HeaderValue), BadKey> {
    managed_key_header_for(provider, "", key)
}

/// As [`managed_key_header`], for a request on `api_path` (Gemini's
/// OpenAI-compatible path takes a Bearer token).
pub fn managed_key_header_for(
    provider: &Provider,
    api_path: &str,
    key: &str,
) -> Result<(HeaderName, HeaderValue), BadKey> {
    if let Provider::Custom(c) = provider
        && let CustomCredential::Header(name) = &c.credential
    {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| BadKey)?;
        let mut value = HeaderValue::from_str(key).map_err(|_| BadKey)?;
        value.set_sensitive(true);
        return Ok((name, value));
    }
    let (name, mut value) = match provider.key_style_for(api_path) {
        KeyStyle::ApiKey => (
            HeaderName::from_static("api-key"),
            HeaderValue::from_str(key).map_err(|_| BadKey)?,
        ),
        KeyStyle::XApiKey => (
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_str(key).map_err(|_| BadKey)?,
        ),
        KeyStyle::XGoogApiKey => (
            HeaderName::from_static("x-goog-api-key"),
            HeaderValue::from_str(key).map_err(|_| BadKey)?,
        ),
        KeyStyle::Bearer => (
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| BadKey)?,
        ),
    };
    value.set_sensitive(true);
    Ok((name, value))
}

/// A provider-shaped JSON error body (`None`: OpenAI's shape, the one most
/// clients understand). Never put a key in `message`.
pub fn error_body(
    provider: Option<&Provider>,
    status: StatusCode,
    code: &str,
    message: &str,
    tried: &[Attempt],
) -> Vec<u8> {
    let tried: Vec<serde_json::Value> = tried
        .iter()
        .map(|a| serde_json::json!({"target": a.target, "outcome": a.outcome.label()}))
        .collect();
    let shape = provider.map_or(ErrorShape::OpenAi, Provider::error_shape);
    let value = match shape {
        ErrorShape::Anthropic => serde_json::json!({
            "type": "error",
            "error": {
                "type": anthropic_error_type(status),
                "message": message,
                "code": code,
                "targets_tried": tried,
            }
        }),
        ErrorShape::OpenAi => serde_json::json!({
            "error": {
                "message": message,
                "type": openai_error_type(status),
                "code": code,
                "targets_tried": tried,
            }
        }),
        // Google's SDKs read `code` as the HTTP status and `status` as the
        // canonical code name, so kt's own code goes in `reason`.
        ErrorShape::Google => serde_json::json!({
            "error": {
                "code": status.as_u16(),
                "message": message,
                "status": google_status(status),
                "reason": code,
                "targets_tried": tried,
            }
        }),
        // botocore and the other AWS SDKs read the exception name from
        // `__type` (after the `x-amzn-ErrorType` header, which kt does not
        // send) and the text from `message`.
        ErrorShape::Aws => serde_json::json!({
            "__type": aws_error_type(status),
            "message": message,
            "reason": code,
            "targets_tried": tried,
        }),
    };
    serde_json::to_vec(&value).unwrap_or_else(|_| b"{}".to_vec())
}

fn openai_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 404 | 413 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        _ => "gateway_error",
    }
}

fn google_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// Bedrock's exception names by status (the runtime's errors and their
/// statuses: https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_ResponseStream.html
/// and API_runtime_ConverseStreamOutput.html: validationException 400,
/// modelTimeoutException 408, throttlingException 429,
/// serviceUnavailableException 503, internalServerException 500; access
/// refusals are AccessDeniedException, 403).
fn aws_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 => "ValidationException",
        401 | 403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        408 | 504 => "ModelTimeoutException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        _ => "InternalServerException",
    }
}

fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 404 => "invalid_request_error",
        413 => "request_too_large",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;

    #[test]
    fn credentials_are_told_apart_by_their_shape() {
        use CredentialKind as K;
        let oa = Provider::OpenAi;
        assert_eq!(classify_credential(None, &oa), K::None);
        assert_eq!(classify_credential(Some("  "), &oa), K::None);
        assert_eq!(classify_credential(Some("sk-proj-abc"), &oa), K::ApiKey);
        assert_eq!(
            classify_credential(Some("legacy-token-123"), &oa),
            K::ApiKey
        );
        assert_eq!(
            classify_credential(Some("sk-ant-oat01-xyz"), &Provider::Anthropic),
            K::OAuth
        );
        assert_eq!(
            classify_credential(Some("sk-ant-api03-xyz"), &Provider::Anthropic),
            K::ApiKey
        );
        assert_eq!(
            classify_credential(Some("gsk_abc"), &oa),
            K::OtherProvider(Provider::Groq)
        );
        assert_eq!(
            classify_credential(Some("gsk_abc"), &Provider::Groq),
            K::ApiKey
        );
        // Shared `sk-` shapes are not another provider's.
        assert_eq!(
            classify_credential(Some("sk-0123abcd"), &Provider::DeepSeek),
            K::ApiKey
        );
        // Bedrock, Together and Fireworks keys sent elsewhere are refused by
        // default; sent to their own provider they are its API keys.
        for (key, owner) in [
            ("ABSKQmVkcm9ja0FQSUtleS1hYmM", Provider::Bedrock),
            ("bedrock-api-key-YmVkcm9jaw", Provider::Bedrock),
            ("tgp_v1_abc", Provider::Together),
            ("fw_abc", Provider::Fireworks),
        ] {
            assert_eq!(
                classify_credential(Some(key), &oa),
                K::OtherProvider(owner.clone())
            );
            assert_eq!(classify_credential(Some(key), &owner), K::ApiKey);
        }
    }

    #[test]
    fn official_hosts_name_their_provider() {
        assert_eq!(for_official_host("API.OpenAI.com."), Some(Provider::OpenAi));
        assert_eq!(
            for_official_host("api.anthropic.com"),
            Some(Provider::Anthropic)
        );
        assert_eq!(for_official_host("api.openai.com.evil"), None);
        assert_eq!(for_official_host("api.groq.com"), Some(Provider::Groq));
        assert_eq!(
            for_official_host("api.together.ai"),
            Some(Provider::Together)
        );
        assert_eq!(
            official_hosts().take(3).collect::<Vec<_>>(),
            vec!["api.openai.com", "api.anthropic.com", "api.mistral.ai"]
        );
    }

    #[test]
    fn every_catalog_provider_parses_by_name_and_has_an_endpoint() {
        for p in KNOWN {
            assert_eq!(&Provider::parse(&p.name().to_ascii_uppercase()), p);
            let spec = p.spec().expect("known providers have a spec");
            if matches!(p, Provider::Azure | Provider::Bedrock) {
                // Per customer: a target names its resource or region.
                assert_eq!(p.default_base_url(), None);
                continue;
            }
            let base: http::Uri = spec.base_url.parse().unwrap();
            assert_eq!(base.scheme_str(), Some("https"), "{p}");
            assert!(spec.hosts.contains(&base.host().unwrap()), "{p}");
            assert_eq!(base.path().trim_end_matches('/'), spec.api_root, "{p}");
        }
        assert_eq!(Provider::parse("vllm"), Provider::Other("vllm".into()));
        assert_eq!(
            Provider::Groq.default_base_url(),
            Some("https://api.groq.com/openai/v1")
        );
        assert!(known_names().starts_with("openai, anthropic, mistral, groq"));
    }

    #[test]
    fn probes_are_unbilled_reads_and_unknown_providers_get_the_openai_one() {
        let p = Provider::OpenAi.probe().unwrap();
        assert_eq!((p.method, p.path), ("GET", "/models"));
        let p = Provider::Anthropic.probe().unwrap();
        assert_eq!((p.method, p.path), ("GET", "/v1/models"));
        assert_eq!(p.headers, &[("anthropic-version", "2023-06-01")]);
        assert_eq!(Provider::OpenRouter.probe().unwrap().path, "/key");
        assert_eq!(Provider::Gemini.probe().unwrap().path, "/v1beta/models");
        assert_eq!(Provider::Fireworks.probe(), None);
        assert_eq!(
            Provider::Other("vllm".into()).probe(),
            Some(OPENAI_COMPATIBLE_PROBE)
        );
        for p in KNOWN {
            if let Some(probe) = p.probe() {
                assert_eq!(probe.method, "GET", "{p}: a probe must not create anything");
                assert!(probe.path.starts_with('/'), "{p}");
            }
        }
    }

    #[test]
    fn the_managed_key_goes_in_the_providers_style() {
        let (n, v) = managed_key_header(&Provider::Anthropic, "k1").unwrap();
        assert_eq!((n.as_str(), v.to_str().unwrap()), ("x-api-key", "k1"));
        assert!(v.is_sensitive());
        let (n, v) = managed_key_header(&Provider::Other("x".into()), "k2").unwrap();
        assert_eq!(
            (n.as_str(), v.to_str().unwrap()),
            ("authorization", "Bearer k2")
        );
        let (n, v) = managed_key_header(&Provider::Gemini, "k3").unwrap();
        assert_eq!((n.as_str(), v.to_str().unwrap()), ("x-goog-api-key", "k3"));
        assert!(v.is_sensitive());
        let (n, _) = managed_key_header(&Provider::Groq, "k4").unwrap();
        assert_eq!(n.as_str(), "authorization");
        assert_eq!(managed_key_header(&Provider::OpenAi, "a\nb"), Err(BadKey));
    }

    #[test]
    fn error_bodies_have_the_providers_shape() {
        let tried = [Attempt {
            target: "q2".into(),
            outcome: Outcome::Status {
                status: 503,
                retry_after: None,
            },
        }];
        let a: serde_json::Value = serde_json::from_slice(&error_body(
            Some(&Provider::Anthropic),
            StatusCode::SERVICE_UNAVAILABLE,
            "kt_x",
            "m",
            &tried,
        ))
        .unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "overloaded_error");
        assert_eq!(a["error"]["targets_tried"][0]["outcome"], "status_503");
        let o: serde_json::Value =
            serde_json::from_slice(&error_body(None, StatusCode::FORBIDDEN, "kt_x", "m", &[]))
                .unwrap();
        assert_eq!(o["error"]["type"], "authentication_error");
        assert_eq!(o["error"]["code"], "kt_x");
        let g: serde_json::Value = serde_json::from_slice(&error_body(
            Some(&Provider::Gemini),
            StatusCode::TOO_MANY_REQUESTS,
            "kt_x",
            "m",
            &[],
        ))
        .unwrap();
        assert_eq!(g["error"]["code"], 429);
        assert_eq!(g["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(g["error"]["reason"], "kt_x");
    }

    #[test]
    fn wildcard_hosts_name_every_resource_under_them_and_nothing_else() {
        assert_eq!(
            for_official_host("myres.openai.azure.com"),
            Some(Provider::Azure)
        );
        assert_eq!(
            for_official_host("MyRes.CognitiveServices.Azure.com."),
            Some(Provider::Azure)
        );
        assert_eq!(for_official_host("openai.azure.com"), None);
        assert_eq!(for_official_host("myres.openai.azure.com.evil"), None);
        assert_eq!(for_official_host("evilopenai.azure.com"), None);
        assert_eq!(
            for_official_host("bedrock-runtime.eu-west-1.amazonaws.com"),
            Some(Provider::Bedrock)
        );
        assert_eq!(
            for_official_host("bedrock-runtime-fips.us-east-1.amazonaws.com"),
            Some(Provider::Bedrock)
        );
        assert_eq!(for_official_host("s3.eu-west-1.amazonaws.com"), None);
        assert_eq!(
            for_official_host("api-inference.huggingface.co"),
            Some(Provider::HuggingFace)
        );
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
        // Only leading wildcards exist in the catalog: the CA's name
        // constraints can express them.
        for h in official_hosts() {
            assert!(!h.trim_start_matches("*.").contains('*'), "{h}");
        }
    }

    #[test]
    fn azure_and_bedrock_credentials_are_their_own_kinds() {
        use CredentialKind as K;
        let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2NvZ25pdGl2ZXNlcnZpY2VzLmF6dXJlLmNvbSJ9.c2lnbmF0dXJl";
        assert_eq!(classify_credential(Some(jwt), &Provider::Azure), K::Entra);
        // The same shape elsewhere is just a key kt does not know.
        assert_eq!(classify_credential(Some(jwt), &Provider::OpenAi), K::ApiKey);
        assert_eq!(
            classify_credential(Some("0123456789abcdef0123456789abcdef"), &Provider::Azure),
            K::ApiKey
        );
        let sig = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc";
        assert_eq!(classify_credential(Some(sig), &Provider::Bedrock), K::SigV4);
        assert_eq!(
            classify_credential(Some("ABSKQmVkcm9ja0FQSUtleQ=="), &Provider::Bedrock),
            K::ApiKey
        );
        assert_eq!(K::SigV4.label(), "sigv4");
        assert_eq!(K::Entra.label(), "entra");
    }

    #[test]
    fn each_style_puts_the_key_in_its_own_header() {
        let (n, v) = managed_key_header(&Provider::Azure, "k").unwrap();
        assert_eq!((n.as_str(), v.to_str().unwrap()), ("api-key", "k"));
        let (n, v) = managed_key_header(&Provider::Bedrock, "k").unwrap();
        assert_eq!(
            (n.as_str(), v.to_str().unwrap()),
            ("authorization", "Bearer k")
        );
        // Gemini: native paths x-goog-api-key, the OpenAI-compatible one Bearer.
        let (n, _) =
            managed_key_header_for(&Provider::Gemini, "/v1beta/models/m:generateContent", "k")
                .unwrap();
        assert_eq!(n.as_str(), "x-goog-api-key");
        let (n, v) =
            managed_key_header_for(&Provider::Gemini, "/v1beta/openai/chat/completions", "k")
                .unwrap();
        assert_eq!(
            (n.as_str(), v.to_str().unwrap()),
            ("authorization", "Bearer k")
        );
        let custom = Provider::Custom(Arc::new(CustomProvider {
            name: "vllm".into(),
            hosts: vec!["llm.internal".into()],
            base_url: None,
            api_root: String::new(),
            credential: CustomCredential::Header("x-llm-key".into()),
            error_shape: ErrorShape::Anthropic,
        }));
        let (n, v) = managed_key_header(&custom, "k").unwrap();
        assert_eq!((n.as_str(), v.to_str().unwrap()), ("x-llm-key", "k"));
        assert!(v.is_sensitive());
        assert_eq!(custom.error_shape(), ErrorShape::Anthropic);
        assert_eq!(custom.host_patterns(), vec!["llm.internal"]);
    }

    #[test]
    fn bedrock_errors_have_the_aws_shape() {
        let b: serde_json::Value = serde_json::from_slice(&error_body(
            Some(&Provider::Bedrock),
            StatusCode::FORBIDDEN,
            "kt_credential_refused",
            "m",
            &[],
        ))
        .unwrap();
        assert_eq!(b["__type"], "AccessDeniedException");
        assert_eq!(b["message"], "m");
        assert_eq!(b["reason"], "kt_credential_refused");
        assert_eq!(
            Provider::Bedrock.stream_format(),
            StreamFormat::AwsEventStream
        );
        assert_eq!(Provider::Azure.stream_format(), StreamFormat::Sse);
        assert_eq!(
            Provider::HuggingFace.host_path_prefix("API-Inference.huggingface.co"),
            "/hf-inference"
        );
        assert_eq!(
            Provider::HuggingFace.host_path_prefix("router.huggingface.co"),
            ""
        );
    }

    #[test]
    fn credential_headers_are_recognised_in_any_case() {
        assert!(is_credential_header("X-Api-Key"));
        assert!(is_credential_header("authorization"));
        assert!(!is_credential_header("content-type"));
    }
}
