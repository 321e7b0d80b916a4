//! The provider catalog end to end, one fake TLS provider per catalog
//! entry on loopback: a captured client names the provider's real host
//! (SNI), kt terminates it with a leaf from its CA, swaps the client's key
//! for the managed one in that provider's own style, passes streams
//! through in their own format (SSE; Bedrock's AWS event-stream frames
//! byte for byte) and answers its own errors in the provider's shape.
//! Then the parts only some providers have: Azure's paths and Entra
//! tokens, Bedrock's SigV4 refusal, Gemini's OpenAI-compatible path,
//! Hugging Face's legacy host, config-defined providers, and a provider
//! the config does not route.

use std::sync::Arc;

use bytes::Bytes;
use guard::config::{Provider, Target};
use guard::provider::{CREDENTIAL_HEADERS, ErrorShape, KNOWN};
use guard::record::{ClientInfo, PolicyAction, PolicyId, RequestRecord};
use guard_tests::fake_provider::{Behavior, FakeProvider, Recorded, TestCa, parse_event_stream};
use guard_tests::gateway_fixture::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;

/// What a client of one catalog provider sends, and what the provider
/// must see.
struct Case {
    provider: Provider,
    /// The name the client connects to (SNI and Host).
    host: &'static str,
    /// The target's API root on the fake (its official base URL's path).
    root: &'static str,
    /// A non-streaming request's path, as the client sends it.
    path: &'static str,
    /// A streaming request's path (the body asks to stream too).
    stream_path: &'static str,
    /// Header the managed key must arrive in, and whether as `Bearer`.
    key_header: &'static str,
    bearer: bool,
}

const fn case(
    provider: Provider,
    host: &'static str,
    root: &'static str,
    path: &'static str,
    stream_path: &'static str,
    key_header: &'static str,
    bearer: bool,
) -> Case {
    Case {
        provider,
        host,
        root,
        path,
        stream_path,
        key_header,
        bearer,
    }
}

fn cases() -> Vec<Case> {
    const CHAT: &str = "/v1/chat/completions";
    let auth = "authorization";
    vec![
        case(
            Provider::OpenAi,
            "api.openai.com",
            "/v1",
            CHAT,
            CHAT,
            auth,
            true,
        ),
        case(
            Provider::Anthropic,
            "api.anthropic.com",
            "",
            "/v1/messages",
            "/v1/messages",
            "x-api-key",
            false,
        ),
        case(
            Provider::Mistral,
            "api.mistral.ai",
            "/v1",
            CHAT,
            CHAT,
            auth,
            true,
        ),
        case(
            Provider::Groq,
            "api.groq.com",
            "/openai/v1",
            "/openai/v1/chat/completions",
            "/openai/v1/chat/completions",
            auth,
            true,
        ),
        case(
            Provider::DeepSeek,
            "api.deepseek.com",
            "",
            "/chat/completions",
            "/chat/completions",
            auth,
            true,
        ),
        case(Provider::XAi, "api.x.ai", "/v1", CHAT, CHAT, auth, true),
        case(
            Provider::OpenRouter,
            "openrouter.ai",
            "/api/v1",
            "/api/v1/chat/completions",
            "/api/v1/chat/completions",
            auth,
            true,
        ),
        case(
            Provider::Together,
            "api.together.ai",
            "/v1",
            CHAT,
            CHAT,
            auth,
            true,
        ),
        case(
            Provider::Fireworks,
            "api.fireworks.ai",
            "/inference/v1",
            "/inference/v1/chat/completions",
            "/inference/v1/chat/completions",
            auth,
            true,
        ),
        case(
            Provider::Perplexity,
            "api.perplexity.ai",
            "",
            "/chat/completions",
            "/chat/completions",
            auth,
            true,
        ),
        case(
            Provider::Cohere,
            "api.cohere.com",
            "",
            "/v2/chat",
            "/v2/chat",
            auth,
            true,
        ),
        case(
            Provider::HuggingFace,
            "router.huggingface.co",
            "",
            CHAT,
            CHAT,
            auth,
            true,
        ),
        case(
            Provider::Gemini,
            "generativelanguage.googleapis.com",
            "",
            "/v1beta/models/gemini-2.0-flash:generateContent",
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            "x-goog-api-key",
            false,
        ),
        case(
            Provider::Azure,
            "myres.openai.azure.com",
            "",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "api-key",
            false,
        ),
        case(
            Provider::Bedrock,
            "bedrock-runtime.us-east-1.amazonaws.com",
            "",
            "/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse",
            "/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse-stream",
            auth,
            true,
        ),
    ]
}

/// A key of no catalog format (a legacy key hard-coded in a job).
fn legacy(p: &Provider) -> String {
    format!("legacy-{}-hardcoded-CLIENTKEY-0001", p.name())
}

fn managed(p: &Provider) -> String {
    format!("managed-{}-MANAGEDVALUE-9999", p.name())
}

fn secret_name(p: &Provider) -> String {
    format!("KEY_{}", p.name().to_ascii_uppercase())
}

/// The client's own credential in the provider's style.
fn client_key_header(c: &Case, key: &str) -> (&'static str, String) {
    if c.bearer {
        ("authorization", format!("Bearer {key}"))
    } else {
        (c.key_header, key.to_string())
    }
}

fn body_for(c: &Case, stream: bool) -> String {
    match c.provider {
        Provider::Gemini => r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#.into(),
        Provider::Bedrock => r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#.into(),
        Provider::Anthropic => serde_json::json!({
            "model": "claude-3-5-haiku-latest", "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        })
        .to_string(),
        _ => chat_body(stream),
    }
}

fn header<'a>(r: &'a Recorded, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

/// A request sent whole; the answer's status, headers and raw body bytes.
async fn exchange(
    conn: &mut SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    conn.ready().await.unwrap();
    let resp = conn.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

/// Whether `body` is kt's error `code` in `shape`.
fn assert_shape(shape: ErrorShape, body: &[u8], code: &str, who: &str) {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{who}: error body is not JSON ({e}): {body:?}"));
    match shape {
        ErrorShape::OpenAi => {
            assert!(v["error"]["message"].is_string(), "{who}: {v}");
            assert!(v["error"]["type"].is_string(), "{who}: {v}");
            assert_eq!(v["error"]["code"], code, "{who}: {v}");
        }
        ErrorShape::Anthropic => {
            assert_eq!(v["type"], "error", "{who}: {v}");
            assert!(v["error"]["type"].is_string(), "{who}: {v}");
            assert_eq!(v["error"]["code"], code, "{who}: {v}");
        }
        ErrorShape::Google => {
            assert!(v["error"]["code"].is_u64(), "{who}: {v}");
            assert!(v["error"]["status"].is_string(), "{who}: {v}");
            assert_eq!(v["error"]["reason"], code, "{who}: {v}");
        }
        ErrorShape::Aws => {
            assert!(
                v["__type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("Exception")),
                "{who}: {v}"
            );
            assert!(v["message"].is_string(), "{who}: {v}");
            assert_eq!(v["reason"], code, "{who}: {v}");
        }
    }
}

/// Every catalog provider, through capture (SNI = its real host): the
/// managed key arrives in its style and only there, the client's own key
/// nowhere; streams pass through byte for byte in its format; kt's own
/// errors have its shape.
#[tokio::test]
async fn every_catalog_provider_gets_its_key_style_stream_format_and_error_shape() {
    let ca = TestCa::new();
    let cases = cases();
    assert_eq!(
        cases.len(),
        KNOWN.len(),
        "a catalog provider has no case in this table"
    );
    let mut fakes = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    let mut secrets = Vec::new();
    for c in &cases {
        let fake = FakeProvider::start(&ca, c.provider.name(), Behavior::Ok).await;
        let base = format!("https://127.0.0.1:{}{}", fake.addr.port(), c.root);
        targets.push(target(
            c.provider.name(),
            c.provider.clone(),
            &base,
            &secret_name(&c.provider),
        ));
        secrets.push((secret_name(&c.provider), managed(&c.provider)));
        fakes.push(fake);
    }
    let pairs: Vec<(&str, &str)> = secrets
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let gw = start(config(targets), MapResolver::of(&pairs), &ca).await;
    let dst = "127.0.0.2:443".parse().unwrap();
    let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, ClientInfo::default()))).await;

    for (c, fake) in cases.iter().zip(&fakes) {
        let who = c.provider.name();
        let own = legacy(&c.provider);
        let (kh, kv) = client_key_header(c, &own);
        // 1. A plain request: the managed key in the provider's style.
        let mut conn = h1_tls(cap, c.host, gw.ca.cert_der()).await;
        let (status, _, body) = exchange(
            &mut conn,
            post(c.path, &[(kh, &kv), ("host", c.host)], body_for(c, false)),
        )
        .await;
        assert_eq!(status, 200, "{who}: {}", String::from_utf8_lossy(&body));
        let r = fake.requests().pop().expect("the fake got the request");
        let want_path = format!("{}{}", c.root, c.path.strip_prefix(c.root).unwrap());
        assert_eq!(r.path, want_path, "{who}");
        let want = if c.bearer {
            format!("Bearer {}", managed(&c.provider))
        } else {
            managed(&c.provider)
        };
        assert_eq!(header(&r, c.key_header), Some(want.as_str()), "{who}");
        for h in CREDENTIAL_HEADERS {
            if *h != c.key_header {
                assert_eq!(header(&r, h), None, "{who}: {h} was forwarded");
            }
        }
        let seen = format!(
            "{:?}{}{}",
            r.headers,
            r.path,
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            !seen.contains(&own),
            "{who}: the client's key reached the provider"
        );

        // 2. A stream: through unchanged, in the provider's format.
        let (status, headers, body) = exchange(
            &mut conn,
            post(
                c.stream_path,
                &[(kh, &kv), ("host", c.host)],
                body_for(c, true),
            ),
        )
        .await;
        assert_eq!(status, 200, "{who}: {}", String::from_utf8_lossy(&body));
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert_eq!(body, fake.last_body(), "{who}: the stream was changed");
        match c.provider.stream_format() {
            guard::provider::StreamFormat::AwsEventStream => {
                assert_eq!(ct, "application/vnd.amazon.eventstream", "{who}");
                let frames = parse_event_stream(&body).unwrap();
                let events: Vec<&str> = frames.iter().map(|(e, _)| e.as_str()).collect();
                assert_eq!(
                    events,
                    ["messageStart", "contentBlockDelta", "messageStop"],
                    "{who}"
                );
            }
            guard::provider::StreamFormat::Sse => {
                assert_eq!(ct, "text/event-stream", "{who}");
                assert!(
                    body.starts_with(b"data: ") || body.starts_with(b"event: "),
                    "{who}"
                );
            }
        }

        // 3. kt's own error (a key of another provider is refused): in
        // the provider's shape.
        let foreign = if c.provider == Provider::Groq {
            "xai-FOREIGNKEY-0000000000000000"
        } else {
            "gsk_FOREIGNKEY000000000000000000"
        };
        let (fh, fv) = client_key_header(c, foreign);
        let before = fake.requests().len();
        let (status, _, body) = exchange(
            &mut conn,
            post(c.path, &[(fh, &fv), ("host", c.host)], body_for(c, false)),
        )
        .await;
        assert_eq!(status, 403, "{who}: {}", String::from_utf8_lossy(&body));
        assert_shape(
            c.provider.error_shape(),
            &body,
            "kt_credential_refused",
            who,
        );
        assert_eq!(
            fake.requests().len(),
            before,
            "{who}: a refused request reached it"
        );
    }
    // Every exchange is recorded under its provider's name.
    let recs = gw.sink.snapshot();
    for c in &cases {
        let n = recs
            .iter()
            .filter(|r| r.provider.as_deref() == Some(c.provider.name()))
            .count();
        assert_eq!(n, 3, "{}", c.provider.name());
    }
}

fn one(provider: Provider, fake: &FakeProvider, root: &str) -> (Target, MapResolver) {
    let base = format!("https://127.0.0.1:{}{root}", fake.addr.port());
    (
        target(provider.name(), provider.clone(), &base, "K"),
        MapResolver::of(&[("K", "managed-MANAGEDVALUE-4242")]),
    )
}

fn guard_notes(rec: &RequestRecord) -> Vec<(String, PolicyAction, Option<String>)> {
    rec.policy
        .iter()
        .filter(|n| n.policy == PolicyId::Guard)
        .map(|n| (n.rule.clone(), n.action, n.location.clone()))
        .collect()
}

/// Azure OpenAI: `api-version` stays in the query while a client's
/// `api-key` query key goes; the deployments and v1 paths pass through
/// unchanged, in base-URL mode too (`/azure/...`); a Microsoft Entra ID
/// token is passed as sent, never swapped; the CONNECT tunnel to another
/// resource host (a wildcard name) is terminated with a leaf for that name.
#[tokio::test]
async fn azure_keeps_api_version_passes_entra_tokens_and_terminates_any_resource_host() {
    let ca = TestCa::new();
    let fake = FakeProvider::start(&ca, "azure", Behavior::Ok).await;
    let (t, keys) = one(Provider::Azure, &fake, "");
    let gw = start(config(vec![t]), keys, &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            "/azure/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&api-key=legacy-azure-CLIENTKEY",
            &[("api-key", "legacy-azure-CLIENTKEY")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = fake.requests().pop().unwrap();
    assert_eq!(
        r.path,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(header(&r, "api-key"), Some("managed-MANAGEDVALUE-4242"));
    assert_eq!(header(&r, "authorization"), None);

    let a = send(
        &mut c,
        post("/azure/openai/v1/chat/completions", &[], chat_body(false)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        fake.requests().pop().unwrap().path,
        "/openai/v1/chat/completions"
    );

    // An Entra ID token (a JWT): forwarded as the client sent it.
    let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2NvZ25pdGl2ZXNlcnZpY2VzLmF6dXJlLmNvbSJ9.c2lnbmF0dXJlLWJ5LWVudHJh";
    let a = send(
        &mut c,
        post(
            "/azure/openai/v1/chat/completions",
            &[("authorization", &format!("Bearer {jwt}"))],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = fake.requests().pop().unwrap();
    assert_eq!(header(&r, "authorization"), Some(&*format!("Bearer {jwt}")));
    assert_eq!(
        header(&r, "api-key"),
        None,
        "an Entra request got the managed key"
    );
    let rec = gw.sink.snapshot().pop().unwrap();
    assert_eq!(
        guard_notes(&rec),
        [(
            "credential-entra".to_string(),
            PolicyAction::Audit,
            Some("pass".to_string())
        )]
    );

    // Any resource host under the wildcard: CONNECT, TLS for that name.
    let (status, conn) =
        via_connect(gw.addr, "other-res.openai.azure.com", 443, gw.ca.cert_der()).await;
    assert_eq!(status, 200);
    let mut conn = conn.unwrap();
    let a = send(
        &mut conn,
        post(
            "/openai/deployments/d/chat/completions?api-version=2024-06-01",
            &[("api-key", "legacy-azure-CLIENTKEY")],
            chat_body(true),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = fake.requests().pop().unwrap();
    assert_eq!(
        r.path,
        "/openai/deployments/d/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(header(&r, "api-key"), Some("managed-MANAGEDVALUE-4242"));
    // A name seen only through the wildcard is learned: capture resolves
    // it from now on.
    let learned = guard::capture::hosts::LEARNED.snapshot();
    assert!(
        learned.iter().any(|n| n == "other-res.openai.azure.com"),
        "{learned:?}"
    );
    // Not a name under it: refused before TLS.
    let (status, _) = via_connect(
        gw.addr,
        "openai.azure.com.evil.example",
        443,
        gw.ca.cert_der(),
    )
    .await;
    assert_eq!(status, 403);
}

/// Bedrock: a SigV4-signed request is refused with a reason the AWS SDK
/// shows (AccessDeniedException), recorded as `credential-sigv4`, and
/// never reaches the provider; with `gateway.credentials.sigv4: pass` it
/// goes upstream exactly as signed (Authorization, x-amz-date,
/// x-amz-security-token), without the managed key.
#[tokio::test]
async fn bedrock_sigv4_requests_are_refused_with_a_reason_unless_passed() {
    let ca = TestCa::new();
    let fake = FakeProvider::start(&ca, "bedrock", Behavior::Ok).await;
    let sig = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
    let signed = [
        ("authorization", sig),
        ("x-amz-date", "20260101T000000Z"),
        (
            "x-amz-security-token",
            "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN",
        ),
        ("host", "bedrock-runtime.us-east-1.amazonaws.com"),
    ];
    let path = "/model/amazon.nova-micro-v1:0/converse";
    let body = r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#;
    for pass in [false, true] {
        let (t, keys) = one(Provider::Bedrock, &fake, "");
        let mut cfg = config(vec![t]);
        if pass {
            cfg.gateway.credentials.sigv4 = guard::config::CredentialAction::Pass;
        }
        let gw = start(cfg, keys, &ca).await;
        let dst = "127.0.0.2:443".parse().unwrap();
        let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, ClientInfo::default()))).await;
        let mut conn = h1_tls(
            cap,
            "bedrock-runtime.us-east-1.amazonaws.com",
            gw.ca.cert_der(),
        )
        .await;
        let before = fake.requests().len();
        let (status, _, answer) = exchange(&mut conn, post(path, &signed, body)).await;
        let rec = gw.sink.snapshot().pop().unwrap();
        if pass {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
            let r = fake.requests().pop().unwrap();
            assert_eq!(header(&r, "authorization"), Some(sig));
            assert_eq!(header(&r, "x-amz-date"), Some("20260101T000000Z"));
            assert_eq!(
                header(&r, "x-amz-security-token"),
                Some("IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN")
            );
            assert!(!format!("{:?}", r.headers).contains("MANAGEDVALUE"));
            assert_eq!(
                guard_notes(&rec),
                [(
                    "credential-sigv4".to_string(),
                    PolicyAction::Audit,
                    Some("pass".to_string())
                )]
            );
        } else {
            assert_eq!(status, 403, "{}", String::from_utf8_lossy(&answer));
            assert_shape(ErrorShape::Aws, &answer, "kt_credential_refused", "bedrock");
            let v: serde_json::Value = serde_json::from_slice(&answer).unwrap();
            assert_eq!(v["__type"], "AccessDeniedException");
            let msg = v["message"].as_str().unwrap();
            assert!(msg.contains("SigV4"), "{msg}");
            assert!(msg.contains("gateway.credentials.sigv4"), "{msg}");
            assert_eq!(
                fake.requests().len(),
                before,
                "a signed request reached Bedrock"
            );
            assert_eq!(rec.error_code, Some("kt_credential_refused"));
            assert_eq!(
                guard_notes(&rec),
                [(
                    "credential-sigv4".to_string(),
                    PolicyAction::Block,
                    Some("block".to_string())
                )]
            );
        }
    }
}

/// Gemini's OpenAI-compatible path takes the key as a Bearer token (the
/// OpenAI SDK's style), its native paths as `x-goog-api-key`; both pass
/// through unchanged.
#[tokio::test]
async fn gemini_openai_compatible_path_gets_a_bearer_key() {
    let ca = TestCa::new();
    let fake = FakeProvider::start(&ca, "gemini", Behavior::Ok).await;
    let (t, keys) = one(Provider::Gemini, &fake, "");
    let gw = start(config(vec![t]), keys, &ca).await;
    let mut c = h1_plain(gw.addr).await;
    let a = send(
        &mut c,
        post(
            "/gemini/v1beta/openai/chat/completions",
            &[("authorization", "Bearer legacy-gemini-CLIENTKEY")],
            chat_body(true),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.ends_with("data: [DONE]\n\n"), "{}", a.body);
    let r = fake.requests().pop().unwrap();
    assert_eq!(r.path, "/v1beta/openai/chat/completions");
    assert_eq!(
        header(&r, "authorization"),
        Some("Bearer managed-MANAGEDVALUE-4242")
    );
    assert_eq!(header(&r, "x-goog-api-key"), None);
}

/// Hugging Face's legacy serverless host is captured too, and its paths
/// land under `/hf-inference` on the router.
#[tokio::test]
async fn hugging_face_legacy_inference_host_is_rerooted_on_the_router() {
    let ca = TestCa::new();
    let fake = FakeProvider::start(&ca, "hf", Behavior::Ok).await;
    let (t, keys) = one(Provider::HuggingFace, &fake, "");
    let gw = start(config(vec![t]), keys, &ca).await;
    let dst = "127.0.0.2:443".parse().unwrap();
    let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, ClientInfo::default()))).await;
    let mut conn = h1_tls(cap, "api-inference.huggingface.co", gw.ca.cert_der()).await;
    let a = send(
        &mut conn,
        post(
            "/models/openai-community/gpt2",
            &[("authorization", "Bearer hf_legacyCLIENTKEY0000000000000000")],
            r#"{"inputs":"hi"}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = fake.requests().pop().unwrap();
    assert_eq!(r.path, "/hf-inference/models/openai-community/gpt2");
    assert_eq!(
        header(&r, "authorization"),
        Some("Bearer managed-MANAGEDVALUE-4242")
    );
}

/// A provider defined in the config: its wildcard hosts are terminated,
/// the managed key goes in its own header (the client's copy of that
/// header is stripped), and kt's errors have the shape it names.
#[tokio::test]
async fn a_config_defined_provider_gets_its_header_and_error_shape() {
    let ca = TestCa::new();
    let fake = FakeProvider::start(&ca, "vllm", Behavior::Ok).await;
    let text = format!(
        "providers:\n  custom:\n    - name: vllm\n      hosts: [\"*.llm.example\"]\n      base_url: https://127.0.0.1:{}/v1\n      credential: {{header: x-llm-key}}\n      error_shape: anthropic\n  targets:\n    - id: v\n      provider: vllm\n      secret_key_ref: {{store: K}}\n",
        fake.addr.port()
    );
    let parsed = guard::config::parse(&text, std::path::Path::new("t.yaml")).unwrap();
    let cfg = config(parsed.providers.targets);
    let gw = start(
        cfg,
        MapResolver::of(&[("K", "managed-MANAGEDVALUE-4242")]),
        &ca,
    )
    .await;
    let dst = "127.0.0.2:443".parse().unwrap();
    let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, ClientInfo::default()))).await;
    let mut conn = h1_tls(cap, "gpu7.llm.example", gw.ca.cert_der()).await;
    let a = send(
        &mut conn,
        post(
            "/v1/chat/completions",
            &[("x-llm-key", "legacy-vllm-CLIENTKEY")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = fake.requests().pop().unwrap();
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(header(&r, "x-llm-key"), Some("managed-MANAGEDVALUE-4242"));
    assert!(!format!("{:?}", r.headers).contains("CLIENTKEY"));
    let (status, _, body) = exchange(
        &mut conn,
        post(
            "/v1/chat/completions",
            &[("x-llm-key", "gsk_FOREIGNKEY000000000000000000")],
            chat_body(false),
        ),
    )
    .await;
    assert_eq!(status, 403);
    assert_shape(
        ErrorShape::Anthropic,
        &body,
        "kt_credential_refused",
        "vllm",
    );
}

/// A catalog provider the config routes nowhere (its host captured by
/// `capture.providers: all`): refused in its own shape, recorded with its
/// name, nothing sent anywhere.
#[tokio::test]
async fn a_provider_without_a_target_is_refused_and_named() {
    let ca = TestCa::new();
    let fake = FakeProvider::start(&ca, "openai", Behavior::Ok).await;
    let (t, keys) = one(Provider::OpenAi, &fake, "/v1");
    let gw = start(config(vec![t]), keys, &ca).await;
    let dst = "127.0.0.2:443".parse().unwrap();
    let cap = start_capture(&gw.gw, Arc::new(FixedLookup(dst, ClientInfo::default()))).await;
    for (host, path, shape) in [
        (
            "api.groq.com",
            "/openai/v1/chat/completions",
            ErrorShape::OpenAi,
        ),
        (
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "/model/m/converse",
            ErrorShape::Aws,
        ),
        (
            "generativelanguage.googleapis.com",
            "/v1beta/models/m:generateContent",
            ErrorShape::Google,
        ),
    ] {
        let mut conn = h1_tls(cap, host, gw.ca.cert_der()).await;
        let (status, _, body) = exchange(
            &mut conn,
            post(
                path,
                &[("authorization", "Bearer gsk_own0000000000000000")],
                "{}",
            ),
        )
        .await;
        assert_eq!(status, 403, "{host}: {}", String::from_utf8_lossy(&body));
        assert_shape(shape, &body, "kt_provider_not_routed", host);
        let rec = gw.sink.snapshot().pop().unwrap();
        let provider = guard::provider::for_official_host(host).unwrap();
        assert_eq!(rec.provider.as_deref(), Some(provider.name()));
        assert_eq!(rec.error_code, Some("kt_provider_not_routed"));
        assert_eq!(
            guard_notes(&rec),
            [(
                "provider-not-routed".to_string(),
                PolicyAction::Block,
                Some(format!("{} ({host})", provider.name()))
            )]
        );
    }
    assert!(fake.requests().is_empty());
}
