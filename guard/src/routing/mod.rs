//! Routing: which provider a request is for, which targets serve it and in
//! what order, how credentials are swapped, and when to fall back. Pure: no
//! I/O and no async, so every rule here is tested without a network.
#![forbid(unsafe_code)]

use std::time::Duration;

use http::Uri;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, Target};
use crate::provider::{self, CREDENTIAL_HEADERS, CREDENTIAL_QUERY_KEYS, Provider};
use crate::record::Outcome;

/// Everything that can go wrong while routing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    /// A target's `base_url` is not an absolute http(s) URL.
    #[error("target {target}: base_url {url:?} is not an absolute http or https url")]
    BadBaseUrl {
        /// Target id.
        target: String,
        /// The offending URL.
        url: String,
    },
    /// A target has neither a `base_url` nor a known provider default.
    #[error("target {target}: provider {provider} has no default endpoint, set base_url")]
    NoEndpoint {
        /// Target id.
        target: String,
        /// Provider name.
        provider: String,
    },
    /// The managed key cannot be sent as an HTTP header value.
    #[error("target {target}")]
    BadKey {
        /// Target id.
        target: String,
        /// What is wrong with it.
        #[source]
        source: provider::BadKey,
    },
    /// The upstream path built for a request is not a valid URI.
    #[error("target {target}: cannot build upstream uri for path {path:?}")]
    BadPath {
        /// Target id.
        target: String,
        /// Path that was asked for.
        path: String,
    },
}

/// An upstream endpoint split into the parts routing needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `https` or `http`.
    pub scheme: String,
    /// Host name or address (no brackets for IPv6).
    pub host: String,
    /// Port (explicit or the scheme default).
    pub port: u16,
    /// Path prefix without trailing slash ("" for none).
    pub path: String,
}

impl Endpoint {
    /// Parses an absolute http(s) URL.
    pub fn parse(url: &str) -> Option<Endpoint> {
        let uri: Uri = url.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return None,
        };
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some(Endpoint {
            scheme,
            host: host.to_ascii_lowercase(),
            port: uri.port_u16().unwrap_or(default_port),
            path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// `host[:port]` as used in a URI authority and `Host` header (IPv6
    /// bracketed, the scheme's default port left out).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.is_https() { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Whether TLS is spoken to this endpoint.
    pub fn is_https(&self) -> bool {
        self.scheme == "https"
    }
}

/// One target with its endpoint worked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The configured target.
    pub target: Target,
    /// Where its requests go.
    pub endpoint: Endpoint,
}

/// A request matched to a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched {
    /// The provider family.
    pub provider: Provider,
    /// The path relative to the provider's API root (starts with `/`), with
    /// the query string kept.
    pub api_path: String,
}

/// The routing table built once from the configuration.
#[derive(Clone, Debug)]
pub struct Router {
    routes: Vec<Route>,
    fallback: bool,
    max_retry_after: Duration,
}

impl Router {
    /// Builds the table; every target must have a usable endpoint.
    pub fn new(config: &Config) -> Result<Router, RoutingError> {
        let mut routes = Vec::with_capacity(config.providers.targets.len());
        for target in &config.providers.targets {
            let url = match (&target.base_url, target.provider.default_base_url()) {
                (Some(url), _) => url.as_str(),
                (None, Some(url)) => url,
                (None, None) => {
                    return Err(RoutingError::NoEndpoint {
                        target: target.id.clone(),
                        provider: target.provider.name().to_string(),
                    });
                }
            };
            let endpoint = Endpoint::parse(url).ok_or_else(|| RoutingError::BadBaseUrl {
                target: target.id.clone(),
                url: url.to_string(),
            })?;
            routes.push(Route {
                target: target.clone(),
                endpoint,
            });
        }
        Ok(Router {
            routes,
            fallback: config.providers.fallback,
            max_retry_after: config.gateway.max_retry_after,
        })
    }

    /// Every route in configuration order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The providers that have at least one target, in first-seen order.
    pub fn providers(&self) -> Vec<Provider> {
        let mut out: Vec<Provider> = Vec::new();
        for r in &self.routes {
            if !out.contains(&r.target.provider) {
                out.push(r.target.provider.clone());
            }
        }
        out
    }

    /// Path prefixes understood in base-URL mode (`/openai`, `/anthropic`, ...).
    pub fn known_prefixes(&self) -> Vec<String> {
        self.providers()
            .iter()
            .map(|p| format!("/{}", p.name()))
            .collect()
    }

    /// The targets for a provider, in order.
    pub fn targets_for<'a>(&'a self, provider: &'a Provider) -> impl Iterator<Item = &'a Route> {
        self.routes
            .iter()
            .filter(move |r| &r.target.provider == provider)
    }

    /// Base-URL mode: `/openai/v1/chat/completions?x=1` → OpenAI, `/chat/completions?x=1`.
    /// `path_and_query` is the request target as received.
    pub fn match_path(&self, path_and_query: &str) -> Option<Matched> {
        let rest = path_and_query.strip_prefix('/')?;
        let (segment, tail) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let provider = self
            .providers()
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(segment))?;
        let tail = if tail.starts_with('?') || tail.is_empty() {
            format!("/{tail}")
        } else {
            tail.to_string()
        };
        let api_path = strip_root(&tail, provider.api_root());
        Some(Matched { provider, api_path })
    }

    /// CONNECT host, SNI or captured destination: the provider whose official
    /// host or one of whose targets' `base_url` host this is. With a `port`,
    /// a target host matches only on that port (official hosts on any).
    pub fn match_host(&self, host: &str, port: Option<u16>) -> Option<Provider> {
        let host = host
            .trim_end_matches('.')
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if let Some(port) = port
            && let Some(r) = self
                .routes
                .iter()
                .find(|r| r.endpoint.host == host && r.endpoint.port == port)
        {
            return Some(r.target.provider.clone());
        }
        if let Some(p) = provider::for_official_host(&host) {
            return Some(p);
        }
        if let Some(p) = self.custom_providers().into_iter().find(|p| {
            p.host_patterns()
                .iter()
                .any(|h| provider::host_matches(h, &host))
        }) {
            return Some(p);
        }
        if port.is_some() {
            // A known port must match exactly: a shared host (loopback) on
            // another port is some other service.
            return None;
        }
        self.routes
            .iter()
            .find(|r| r.endpoint.host == host)
            .map(|r| r.target.provider.clone())
    }

    /// The config-defined providers that have a target.
    pub fn custom_providers(&self) -> Vec<Provider> {
        self.providers()
            .into_iter()
            .filter(|p| matches!(p, Provider::Custom(_)))
            .collect()
    }

    /// Headers config-defined providers take their key in (`credential:
    /// {header: NAME}`): credentials like the catalog's, stripped from
    /// every request and never forwarded under a managed key.
    pub fn custom_credential_headers(&self) -> Vec<String> {
        self.custom_providers()
            .iter()
            .filter_map(|p| match p {
                Provider::Custom(c) => match &c.credential {
                    provider::CustomCredential::Header(h) => Some(h.clone()),
                    provider::CustomCredential::Style(_) => None,
                },
                _ => None,
            })
            .collect()
    }

    /// Whether `host` is a provider's only through a wildcard
    /// (`res2.openai.azure.com` under `*.openai.azure.com`): not a listed
    /// host, not a target's endpoint. Such a name, once a client names it,
    /// is worth resolving for capture (it could not be in advance).
    pub fn learnable(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.parse::<std::net::IpAddr>().is_ok()
            || self.routes.iter().any(|r| r.endpoint.host == host)
        {
            return false;
        }
        // Per request: no allocation for the catalog's (long) host list.
        let custom: Vec<String> = self
            .custom_providers()
            .iter()
            .flat_map(Provider::host_patterns)
            .collect();
        let (mut wild, mut exact) = (false, false);
        let catalog = provider::official_hosts().map(|h| -> &str { h });
        for h in catalog.chain(custom.iter().map(String::as_str)) {
            if provider::is_wildcard(h) {
                wild |= provider::host_matches(h, &host);
            } else {
                exact |= h.eq_ignore_ascii_case(&host);
            }
        }
        wild && !exact
    }

    /// Whether `provider` has at least one target.
    pub fn is_routed(&self, provider: &Provider) -> bool {
        self.targets_for(provider).next().is_some()
    }

    /// Whether `host:port` is exactly the endpoint of a configured target
    /// (a `base_url` that is an address has no TLS name, so a client
    /// reaching it sends no SNI: that is not ambiguous).
    pub fn is_target_endpoint(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.routes
            .iter()
            .any(|r| r.endpoint.host == host && r.endpoint.port == port)
    }

    /// Host mode: the API path of a request sent straight to `host`. The
    /// official root (`/v1` for OpenAI) or the matching target's base path is
    /// removed so the path can be re-rooted on any target.
    pub fn api_path_for_host(
        &self,
        provider: &Provider,
        host: &str,
        path_and_query: &str,
    ) -> String {
        let host = host.to_ascii_lowercase();
        if let Some(r) = self
            .targets_for(provider)
            .find(|r| r.endpoint.host == host && !r.endpoint.path.is_empty())
        {
            return strip_root(path_and_query, &r.endpoint.path);
        }
        // A legacy host folded into the official endpoint under a prefix
        // (Hugging Face's api-inference host: `/hf-inference/...`).
        let prefix = provider.host_path_prefix(&host);
        if !prefix.is_empty() && !self.targets_for(provider).any(|r| r.endpoint.host == host) {
            return format!(
                "{prefix}{}",
                strip_root(path_and_query, provider.api_root())
            );
        }
        strip_root(path_and_query, provider.api_root())
    }

    /// The absolute upstream URI for `api_path` on a route.
    pub fn upstream_uri(&self, route: &Route, api_path: &str) -> Result<Uri, RoutingError> {
        let e = &route.endpoint;
        let s = format!("{}://{}{}{}", e.scheme, e.authority(), e.path, api_path);
        s.parse().map_err(|_| RoutingError::BadPath {
            target: route.target.id.clone(),
            path: api_path.to_string(),
        })
    }

    /// What to do after an attempt (see [`classify`]).
    pub fn classify(&self, outcome: &Outcome) -> Verdict {
        classify(outcome, self.fallback, self.max_retry_after)
    }
}

/// Where a request for `provider` named `host:port` goes when no target
/// serves it (observe mode): the official endpoint when `host` is one of
/// the provider's listed names (requests are re-rooted on it, as on a
/// target), else that name itself under the provider's API root. `None`
/// for an address: only a name says where a client meant to go.
pub fn direct_url(provider: &Provider, host: &str, port: u16) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let listed = provider
        .hosts()
        .iter()
        .any(|h| !provider::is_wildcard(h) && h.eq_ignore_ascii_case(host));
    Some(match provider.default_base_url() {
        Some(official) if listed => official.to_string(),
        _ => format!("https://{host}:{port}{}", provider.api_root()),
    })
}

/// Removes `root` from the front of `path` when it is a whole segment prefix.
fn strip_root(path: &str, root: &str) -> String {
    if root.is_empty() {
        return path.to_string();
    }
    match path.strip_prefix(root) {
        Some("") => "/".to_string(),
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        Some(rest) if rest.starts_with('?') => format!("/{rest}"),
        _ => path.to_string(),
    }
}

/// Removes every credential header; returns the first credential found (with
/// any `Bearer ` scheme removed) so a fingerprint of it can be recorded.
pub fn strip_credential_headers(headers: &mut HeaderMap) -> Option<String> {
    let mut found = None;
    for name in provider::BILLING_SCOPE_HEADERS {
        headers.remove(*name);
    }
    for name in CREDENTIAL_HEADERS {
        for value in headers.get_all(*name) {
            if found.is_none()
                && let Ok(v) = value.to_str()
            {
                let v = v.trim();
                let v = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .unwrap_or(v)
                    .trim();
                if !v.is_empty() {
                    found = Some(v.to_string());
                }
            }
        }
        headers.remove(*name);
    }
    found
}

/// Removes credential keys from a `path?query` string; returns the cleaned
/// string and the first credential value found.
pub fn strip_credential_query(path_and_query: &str) -> (String, Option<String>) {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return (path_and_query.to_string(), None);
    };
    let mut found = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            if pair.is_empty() {
                return false;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // `?%6Bey=` is `?key=` to the server: compare decoded names.
            let k = percent_decode(k);
            let is_cred = CREDENTIAL_QUERY_KEYS
                .iter()
                .any(|c| c.eq_ignore_ascii_case(k.trim()));
            if is_cred && found.is_none() && !v.is_empty() {
                found = Some(v.to_string());
            }
            !is_cred
        })
        .collect();
    if kept.is_empty() {
        (path.to_string(), found)
    } else {
        (format!("{path}?{}", kept.join("&")), found)
    }
}

/// `%XX` sequences decoded (`+` too, as form encoding has it); invalid
/// sequences are kept as written.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an API path tries to leave its root: a `.` or `..` segment,
/// also percent-encoded, or a backslash or encoded slash that a server
/// might treat as a separator. Such a path is refused before the managed
/// key is attached.
pub fn escapes_root(path_and_query: &str) -> bool {
    let path = path_and_query.split('?').next().unwrap_or("");
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return true;
    }
    percent_decode(path)
        .split('/')
        .any(|seg| seg == "." || seg == "..")
}

/// The header carrying `key` for `target`, in its provider's style.
pub fn managed_key_header(
    target: &Target,
    key: &str,
) -> Result<(HeaderName, HeaderValue), RoutingError> {
    managed_key_header_for(target, "", key)
}

/// As [`managed_key_header`], for a request on `api_path` (a provider
/// may take its key differently on one of its paths: Gemini's
/// OpenAI-compatible one takes a Bearer token).
pub fn managed_key_header_for(
    target: &Target,
    api_path: &str,
    key: &str,
) -> Result<(HeaderName, HeaderValue), RoutingError> {
    provider::managed_key_header_for(&target.provider, api_path, key).map_err(|source| {
        RoutingError::BadKey {
            target: target.id.clone(),
            source,
        }
    })
}

/// Replaces the `model` field of a JSON object body with `model`. Returns
/// `None` when nothing changes (not JSON, not an object, no `model` field, or
/// already that model), so the original bytes are forwarded untouched.
pub fn override_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = value.as_object_mut()?;
    let current = obj.get_mut("model")?;
    if current.as_str() == Some(model) {
        return None;
    }
    *current = serde_json::Value::String(model.to_string());
    serde_json::to_vec(&value).ok()
}

/// What the gateway does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the response to the client (success, or a 4xx the client must see).
    Deliver,
    /// Try the next target. `retry_after` is the upstream's wait, when given
    /// and within `gateway.max_retry_after`: the gateway may wait that long
    /// and retry the same target once when no other target is left.
    Fallback {
        /// The bounded wait the upstream asked for.
        retry_after: Option<Duration>,
    },
    /// The attempt failed and fallback is disabled: answer with a gateway error.
    Fail,
}

/// Statuses that move on to the next target: rate limits, server errors, and
/// a rejected key (the rotation case).
pub const FALLBACK_STATUSES: &[u16] = &[401, 403, 429, 500, 502, 503, 504];

/// The fallback rule.
pub fn classify(outcome: &Outcome, fallback_enabled: bool, max_retry_after: Duration) -> Verdict {
    match outcome {
        Outcome::Status {
            status,
            retry_after,
        } => {
            if fallback_enabled && FALLBACK_STATUSES.contains(status) {
                Verdict::Fallback {
                    retry_after: retry_after.filter(|d| *d <= max_retry_after),
                }
            } else {
                Verdict::Deliver
            }
        }
        _ if fallback_enabled => Verdict::Fallback { retry_after: None },
        _ => Verdict::Fail,
    }
}

/// Parses a `Retry-After` header given in seconds (the HTTP-date form is
/// ignored: providers send seconds, and a date would need the clock).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    fn target(id: &str, provider: Provider, base: Option<&str>, model: Option<&str>) -> Target {
        Target {
            id: id.into(),
            provider,
            model: model.map(String::from),
            required: true,
            secret_key_ref: SecretKeyRef::Env(format!("{}_KEY", id.to_uppercase())),
            base_url: base.map(String::from),
        }
    }

    fn config(targets: Vec<Target>) -> Config {
        Config {
            source: "test.yaml".into(),
            pack: Pack {
                name: "t".into(),
                version: "1".into(),
                enabled: true,
            },
            providers: Providers {
                strategy: RoutingStrategy::Ordered,
                fallback: true,
                targets,
            },
            chain: vec![],
            dlp: None,
            audit: None,
            gateway: GatewaySettings::default(),
            capture: Capture::default(),
            secrets: Default::default(),
        }
    }

    fn router() -> Router {
        Router::new(&config(vec![
            target("oa1", Provider::OpenAi, None, Some("gpt-4o-mini")),
            target("an1", Provider::Anthropic, None, None),
            target(
                "oa2",
                Provider::OpenAi,
                Some("https://proxy.example:8443/v1"),
                None,
            ),
            target(
                "loc",
                Provider::Other("local".into()),
                Some("http://127.0.0.1:9000/api"),
                None,
            ),
        ]))
        .unwrap()
    }

    #[test]
    fn direct_urls_go_where_the_client_meant() {
        assert_eq!(
            direct_url(&Provider::Groq, "API.groq.com", 443).as_deref(),
            Some("https://api.groq.com/openai/v1")
        );
        // The legacy host's paths are re-rooted on the router.
        assert_eq!(
            direct_url(&Provider::HuggingFace, "api-inference.huggingface.co", 443).as_deref(),
            Some("https://router.huggingface.co")
        );
        // No common endpoint: the name itself.
        assert_eq!(
            direct_url(&Provider::Azure, "res9.openai.azure.com", 443).as_deref(),
            Some("https://res9.openai.azure.com:443")
        );
        assert_eq!(
            direct_url(
                &Provider::Bedrock,
                "bedrock-runtime.eu-west-1.amazonaws.com",
                443
            )
            .as_deref(),
            Some("https://bedrock-runtime.eu-west-1.amazonaws.com:443")
        );
        assert_eq!(direct_url(&Provider::Groq, "203.0.113.9", 443), None);
    }

    #[test]
    fn only_names_under_a_wildcard_are_learnable() {
        let mut t = target(
            "az",
            Provider::Azure,
            Some("https://res1.openai.azure.com"),
            None,
        );
        t.secret_key_ref = SecretKeyRef::Env("A".into());
        let r = Router::new(&config(vec![t])).unwrap();
        assert!(r.learnable("Res2.openai.azure.com."));
        assert!(r.learnable("x.cognitiveservices.azure.com"));
        // The target's own host is resolved anyway; listed hosts too.
        assert!(!r.learnable("res1.openai.azure.com"));
        assert!(!r.learnable("api.openai.com"));
        assert!(!r.learnable("example.com"));
        assert!(!r.learnable("127.0.0.1"));
    }

    #[test]
    fn path_prefix_picks_provider_and_reroots_path() {
        let r = router();
        let m = r
            .match_path("/openai/v1/chat/completions?stream=1")
            .unwrap();
        assert_eq!(m.provider, Provider::OpenAi);
        assert_eq!(m.api_path, "/chat/completions?stream=1");
        let m = r.match_path("/anthropic/v1/messages").unwrap();
        assert_eq!(m.provider, Provider::Anthropic);
        assert_eq!(m.api_path, "/v1/messages");
        let m = r.match_path("/local/chat").unwrap();
        assert_eq!(m.provider, Provider::Other("local".into()));
        assert_eq!(m.api_path, "/chat");
        assert_eq!(r.match_path("/openai").unwrap().api_path, "/");
        assert!(r.match_path("/gemini/v1/models").is_none());
        assert!(r.match_path("/openaiX/v1").is_none());
        assert!(r.match_path("no-slash").is_none());
        assert_eq!(r.known_prefixes(), vec!["/openai", "/anthropic", "/local"]);
    }

    #[test]
    fn hosts_identify_providers() {
        let r = router();
        assert_eq!(
            r.match_host("api.openai.com", Some(443)),
            Some(Provider::OpenAi)
        );
        assert_eq!(
            r.match_host("API.Anthropic.com.", None),
            Some(Provider::Anthropic)
        );
        assert_eq!(r.match_host("proxy.example", None), Some(Provider::OpenAi));
        assert_eq!(
            r.match_host("127.0.0.1", Some(9000)),
            Some(Provider::Other("local".into()))
        );
        assert_eq!(r.match_host("example.com", Some(443)), None);
        assert_eq!(r.match_host("127.0.0.1", Some(9001)), None);
        assert_eq!(r.match_host("proxy.example", Some(443)), None);
    }

    #[test]
    fn host_mode_paths_are_rerooted_on_every_target() {
        let r = router();
        let p = r.api_path_for_host(&Provider::OpenAi, "api.openai.com", "/v1/chat/completions");
        assert_eq!(p, "/chat/completions");
        let routes: Vec<_> = r.targets_for(&Provider::OpenAi).collect();
        assert_eq!(
            r.upstream_uri(routes[0], &p).unwrap().to_string(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            r.upstream_uri(routes[1], &p).unwrap().to_string(),
            "https://proxy.example:8443/v1/chat/completions"
        );
        let p = r.api_path_for_host(&Provider::Anthropic, "api.anthropic.com", "/v1/messages");
        assert_eq!(p, "/v1/messages");
    }

    #[test]
    fn a_catalog_target_without_base_url_goes_to_its_official_endpoint() {
        let r = Router::new(&config(vec![
            target("g", Provider::Groq, None, None),
            target("f", Provider::Fireworks, None, None),
        ]))
        .unwrap();
        assert_eq!(
            r.match_host("API.GROQ.COM", Some(443)),
            Some(Provider::Groq)
        );
        let p = r.api_path_for_host(
            &Provider::Groq,
            "api.groq.com",
            "/openai/v1/chat/completions",
        );
        assert_eq!(p, "/chat/completions");
        let route = r.targets_for(&Provider::Groq).next().unwrap();
        assert_eq!(
            r.upstream_uri(route, &p).unwrap().to_string(),
            "https://api.groq.com/openai/v1/chat/completions"
        );
        let m = r.match_path("/fireworks/inference/v1/completions").unwrap();
        assert_eq!(m.provider, Provider::Fireworks);
        assert_eq!(m.api_path, "/completions");
    }

    #[test]
    fn targets_keep_config_order_per_provider() {
        let r = router();
        let ids: Vec<_> = r
            .targets_for(&Provider::OpenAi)
            .map(|r| r.target.id.as_str())
            .collect();
        assert_eq!(ids, vec!["oa1", "oa2"]);
    }

    #[test]
    fn bad_base_url_and_missing_endpoint_are_errors() {
        let e = Router::new(&config(vec![target(
            "x",
            Provider::OpenAi,
            Some("ftp://a"),
            None,
        )]));
        assert!(matches!(e, Err(RoutingError::BadBaseUrl { .. })));
        let e = Router::new(&config(vec![target(
            "y",
            Provider::Other("z".into()),
            None,
            None,
        )]));
        assert!(matches!(e, Err(RoutingError::NoEndpoint { .. })));
    }

    #[test]
    fn every_client_credential_is_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer sk-client-1"),
        );
        h.insert("x-api-key", HeaderValue::from_static("sk-ant-client"));
        h.insert("api-key", HeaderValue::from_static("azure-client"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic abc"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let found = strip_credential_headers(&mut h);
        assert_eq!(found.as_deref(), Some("sk-client-1"));
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));

        let (q, found) =
            strip_credential_query("/v1/models?key=AIza123&limit=2&api_key=x&api-key=y");
        assert_eq!(q, "/v1/models?limit=2");
        assert_eq!(found.as_deref(), Some("AIza123"));
        assert_eq!(strip_credential_query("/v1/m?key=a").0, "/v1/m");
        assert_eq!(strip_credential_query("/v1/m").0, "/v1/m");
    }

    #[test]
    fn managed_key_uses_provider_style() {
        let oa = target("a", Provider::OpenAi, None, None);
        let (n, v) = managed_key_header(&oa, "sk-managed").unwrap();
        assert_eq!(n, http::header::AUTHORIZATION);
        assert_eq!(v, "Bearer sk-managed");
        assert!(v.is_sensitive());
        let an = target("b", Provider::Anthropic, None, None);
        let (n, v) = managed_key_header(&an, "sk-ant-managed").unwrap();
        assert_eq!(n.as_str(), "x-api-key");
        assert_eq!(v, "sk-ant-managed");
        let err = managed_key_header(&an, "bad\nkey-SECRET").unwrap_err();
        assert!(!err.to_string().contains("SECRET"));
    }

    #[test]
    fn encoded_credential_names_and_billing_headers_are_stripped() {
        let (q, found) = strip_credential_query("/v1/models?%6Bey=AIzaSECRET&%61pi_key=x&limit=2");
        assert_eq!(q, "/v1/models?limit=2");
        assert_eq!(found.as_deref(), Some("AIzaSECRET"));
        let mut h = HeaderMap::new();
        h.insert(
            "ocp-apim-subscription-key",
            HeaderValue::from_static("apimSECRET"),
        );
        h.insert("cookie", HeaderValue::from_static("session=SECRET"));
        h.insert(
            "openai-organization",
            HeaderValue::from_static("org-attacker"),
        );
        h.insert("openai-project", HeaderValue::from_static("proj_attacker"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let found = strip_credential_headers(&mut h);
        assert!(found.is_some());
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn paths_that_leave_their_root_are_recognised() {
        for p in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2e/x?y=1",
            "/v1/./x",
            "/v1/a%2fb",
            "/v1/a\\..\\b",
        ] {
            assert!(escapes_root(p), "{p}");
        }
        for p in [
            "/v1/chat/completions",
            "/v1/files/file-..abc",
            "/v1/x?q=../y",
        ] {
            assert!(!escapes_root(p), "{p}");
        }
        assert_eq!(percent_decode("a%20b+c%zz%"), "a b c%zz%");
    }

    #[test]
    fn model_override_rewrites_only_json_with_model() {
        let out = override_model(br#"{"model":"gpt-4","messages":[]}"#, "gpt-4o-mini").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["messages"], serde_json::json!([]));
        assert!(override_model(br#"{"model":"m"}"#, "m").is_none());
        assert!(override_model(b"not json", "m").is_none());
        assert!(override_model(br#"{"input":"x"}"#, "m").is_none());
        assert!(override_model(br#"[1]"#, "m").is_none());
    }

    #[test]
    fn fallback_triggers_and_stops() {
        let max = Duration::from_secs(10);
        for outcome in [
            Outcome::ConnectFailed,
            Outcome::TlsFailed,
            Outcome::FirstByteTimeout,
            Outcome::UpstreamBroken,
        ] {
            assert_eq!(
                classify(&outcome, true, max),
                Verdict::Fallback { retry_after: None }
            );
            assert_eq!(classify(&outcome, false, max), Verdict::Fail);
        }
        for s in [401, 403, 429, 500, 502, 503, 504] {
            let o = Outcome::Status {
                status: s,
                retry_after: None,
            };
            assert_eq!(
                classify(&o, true, max),
                Verdict::Fallback { retry_after: None }
            );
            assert_eq!(classify(&o, false, max), Verdict::Deliver);
        }
        for s in [200, 201, 400, 404, 409, 413, 422] {
            let o = Outcome::Status {
                status: s,
                retry_after: None,
            };
            assert_eq!(classify(&o, true, max), Verdict::Deliver, "status {s}");
        }
    }

    #[test]
    fn retry_after_is_bounded() {
        let max = Duration::from_secs(10);
        let o = |secs| Outcome::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            classify(&o(3), true, max),
            Verdict::Fallback {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            classify(&o(60), true, max),
            Verdict::Fallback { retry_after: None }
        );
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
