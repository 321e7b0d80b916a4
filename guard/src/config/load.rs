//! YAML text to a validated [`Config`]: walks the spanned tree, converts each
//! field to its model type and checks it, collecting every problem instead of
//! stopping at the first. Whatever a file leaves out gets the model's default.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ConfigError, ConfigErrors, LoadError};
use super::model::{
    AuditLogger, Capture, CaptureProviders, CaptureScope, Config, Containers, CredentialAction,
    DlpAction, DlpFilter, GatewayMode, GatewaySettings, IpPrefix, MAX_FUZZY_DISTANCE, Pack,
    PolicyKind, Provider, Providers, RoutingStrategy, SecretKeyRef, SinkConfig, SinkKind,
    StoreFailure, SyslogAddress, Target,
};
use super::tree::{self, Kind, Node, Pos};
use crate::provider::{CustomCredential, CustomProvider, ErrorShape, KeyStyle};

mod store;

const EXAMPLE_HINT: &str = "see config/provider-key-rotation.yaml for a complete example";

/// Parses and validates config text. `source` names the file in messages
/// and in [`Config::source`]; nothing is read from it. A relative
/// `secret_key_ref.file` is resolved against `source`'s directory.
pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
    let base = source.parent().unwrap_or(Path::new("")).to_path_buf();
    parse_in(text, source, base)
}

/// [`parse`] with relative `secret_key_ref.file` paths resolved against `base`.
fn parse_in(text: &str, source: &Path, base: PathBuf) -> Result<Config, ConfigErrors> {
    let root = match tree::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            return Err(ConfigErrors::single(
                source,
                1,
                1,
                "the config file is empty",
                Some(format!("add at least `providers.targets`; {EXAMPLE_HINT}")),
            ));
        }
        Err(e) => {
            return Err(ConfigErrors::single(
                source,
                e.pos.line,
                e.pos.column,
                format!("malformed YAML: {}", e.message),
                Some(
                    "fix the YAML syntax here: indent with spaces, and quote values that \
                     contain `: `, ` #` or start with a special character"
                        .into(),
                ),
            ));
        }
    };
    let mut cx = Cx {
        file: source.to_path_buf(),
        base,
        errors: Vec::new(),
        custom: HashMap::new(),
    };
    let config = cx.config(&root);
    match config {
        Some(config) if cx.errors.is_empty() => Ok(config),
        _ => Err(ConfigErrors::new(cx.errors)),
    }
}

/// Reads `path` and [`parse`]s it. The config module's only I/O.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // Relative key files are relative to the config file wherever kt runs
    // from: anchor them to an absolute directory now.
    let base = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| path.parent().unwrap_or(Path::new("")).to_path_buf());
    match String::from_utf8(bytes) {
        Ok(text) => parse_in(&text, path, base).map_err(LoadError::Invalid),
        Err(e) => {
            let valid = String::from_utf8_lossy(&e.as_bytes()[..e.utf8_error().valid_up_to()]);
            let line = valid.matches('\n').count() + 1;
            let column = valid.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            Err(LoadError::Invalid(ConfigErrors::single(
                path,
                line,
                column,
                "the file is not valid UTF-8",
                Some("save the file as UTF-8".into()),
            )))
        }
    }
}

/// The mapping of a section, checked against its allowed keys.
struct Fields<'n> {
    pos: Pos,
    entries: Vec<(&'n str, &'n Node)>,
    /// Allowed keys that an unknown key was taken for: not reported missing as well.
    suggested: Vec<&'static str>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

/// The converter's state: the file name for messages, the directory relative
/// key files are resolved against, and the problems so far.
struct Cx {
    file: PathBuf,
    base: PathBuf,
    errors: Vec<ConfigError>,
    /// `providers.custom`, by name: the definition, where it is, and
    /// whether a target uses it.
    custom: HashMap<String, (std::sync::Arc<CustomProvider>, Pos, bool)>,
}

impl Cx {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(pos, message.into(), None);
    }

    fn error_hint(&mut self, pos: Pos, message: impl Into<String>, hint: impl Into<String>) {
        self.push(pos, message.into(), Some(hint.into()));
    }

    fn push(&mut self, pos: Pos, message: String, hint: Option<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message,
            hint,
        });
    }

    // ---- sections ----

    fn config(&mut self, root: &Node) -> Option<Config> {
        const TOP: &[&str] = &[
            "pack",
            "providers",
            "policies",
            "policy",
            "gateway",
            "capture",
            "secrets",
        ];
        // Anything but a mapping at the top would only cascade into noise.
        let top = self.mapping(root, "", TOP)?;
        let default_name = self
            .file
            .file_stem()
            .map_or_else(|| "kt".to_string(), |s| s.to_string_lossy().into_owned());
        let pack = self.pack(top.get("pack"), default_name);
        let providers = self.providers(top.get("providers"), top.pos);
        let chain = self.chain(top.get("policies"));
        let (mut dlp, mut audit) = self.policy(top.get("policy"));
        // A chain entry without its `policy.<name>` section runs with defaults.
        if chain.contains(&PolicyKind::DlpFilter) && dlp.is_none() {
            dlp = Some(DlpFilter::default());
        }
        if chain.contains(&PolicyKind::AuditLogger) && audit.is_none() {
            audit = Some(AuditLogger::default());
        }
        let gateway = self.gateway(top.get("gateway"));
        let capture = self.capture(top.get("capture"));
        let secrets = self.secrets(top.get("secrets"));
        Some(Config {
            source: self.file.clone(),
            pack,
            providers,
            chain,
            dlp,
            audit,
            gateway,
            capture,
            secrets,
        })
    }

    fn pack(&mut self, node: Option<&Node>, default_name: String) -> Pack {
        let mut pack = Pack {
            name: default_name,
            version: "0.0.0".into(),
            enabled: true,
        };
        let Some(f) = node.and_then(|n| self.mapping(n, "pack", &["name", "version", "enabled"]))
        else {
            return pack;
        };
        if let Some(v) = f.get("name").and_then(|n| self.string(n, "pack.name")) {
            pack.name = v;
        }
        if let Some(v) = f
            .get("version")
            .and_then(|n| self.string(n, "pack.version"))
        {
            pack.version = v;
        }
        if let Some(n) = f.get("enabled") {
            if let Some(v) = self.boolean(n, "pack.enabled") {
                pack.enabled = v;
            }
            if !pack.enabled {
                self.error_hint(
                    n.pos,
                    format!("pack `{}` is disabled: nothing would run", pack.name),
                    "set `pack.enabled: true` to use this config",
                );
            }
        }
        pack
    }

    fn providers(&mut self, node: Option<&Node>, top: Pos) -> Providers {
        let mut out = Providers {
            strategy: RoutingStrategy::Ordered,
            fallback: true,
            targets: Vec::new(),
        };
        let no_targets = "add `targets:` under `providers` with at least one entry \
                          (id, provider, secret_key_ref)";
        let Some(node) = node else {
            self.error_hint(
                top,
                "no `providers` section: there are no targets",
                no_targets,
            );
            return out;
        };
        let Some(f) = self.mapping(
            node,
            "providers",
            &["routing", "fallback", "targets", "custom"],
        ) else {
            return out;
        };
        // Definitions first: targets name them.
        if let Some(n) = f.get("custom") {
            self.custom_providers(n);
        }

        let mut in_routing = None;
        if let Some(r) = f.get("routing")
            && let Some(rf) = self.mapping(r, "providers.routing", &["strategy", "fallback"])
        {
            if let Some(s) = rf
                .get("strategy")
                .and_then(|n| self.string(n, "providers.routing.strategy").map(|s| (n, s)))
            {
                match s.1.as_str() {
                    "ordered" => out.strategy = RoutingStrategy::Ordered,
                    other => self.error_hint(
                        s.0.pos,
                        format!(
                            "unsupported routing strategy `{other}` in `providers.routing.strategy` \
                             (supported: ordered)"
                        ),
                        "use `strategy: ordered`: targets are tried in the order written",
                    ),
                }
            }
            in_routing = rf
                .get("fallback")
                .and_then(|n| self.fallback(n, "providers.routing.fallback"));
        }
        let in_providers = f
            .get("fallback")
            .and_then(|n| self.fallback(n, "providers.fallback"));
        // The seed's published text lost its indentation, so both places mean the same.
        match (in_providers, in_routing) {
            (Some((a, pa)), Some((b, pb))) if a != b => {
                let later = if (pb.line, pb.column) > (pa.line, pa.column) {
                    pb
                } else {
                    pa
                };
                self.error_hint(
                    later,
                    format!(
                        "`providers.fallback.enabled` is {a} (line {}) but \
                         `providers.routing.fallback.enabled` is {b} (line {}); \
                         they are the same setting",
                        pa.line, pb.line
                    ),
                    "set fallback in one place only",
                );
            }
            (Some((v, _)), _) | (None, Some((v, _))) => out.fallback = v,
            (None, None) => {}
        }

        match f.get("targets") {
            None => self.error_hint(
                f.pos,
                "no targets: `providers.targets` is missing",
                no_targets,
            ),
            Some(t) => {
                if let Some(items) = self.list(t, "providers.targets") {
                    if items.is_empty() {
                        self.error_hint(
                            t.pos,
                            "no targets: `providers.targets` is empty",
                            no_targets,
                        );
                    }
                    let mut ids = HashMap::new();
                    for (i, item) in items.iter().enumerate() {
                        if let Some(target) = self.target(item, i, &mut ids) {
                            out.targets.push(target);
                        }
                    }
                }
            }
        }
        let mut unused: Vec<(String, Pos)> = self
            .custom
            .iter()
            .filter(|(_, (_, _, used))| !used)
            .map(|(name, (_, pos, _))| (name.clone(), *pos))
            .collect();
        unused.sort_by_key(|(_, p)| (p.line, p.column));
        for (name, pos) in unused {
            self.error_hint(
                pos,
                format!("provider `{name}` is defined in `providers.custom` but no target uses it"),
                format!("add a target with `provider: {name}`, or remove the definition"),
            );
        }
        out
    }

    /// `providers.custom`: providers the config defines itself.
    fn custom_providers(&mut self, node: &Node) {
        let Some(items) = self.list(node, "providers.custom") else {
            return;
        };
        for (i, item) in items.iter().enumerate() {
            let path = format!("providers.custom[{i}]");
            let Some(f) = self.mapping(
                item,
                &path,
                &["name", "hosts", "base_url", "credential", "error_shape"],
            ) else {
                continue;
            };
            let name = self
                .required(
                    &f,
                    &path,
                    "name",
                    "name the provider, e.g. `name: vllm`; targets use it as `provider: vllm`",
                )
                .and_then(|n| self.string(n, &format!("{path}.name")).map(|s| (n.pos, s)));
            let base_url = f
                .get("base_url")
                .and_then(|n| self.base_url(n, &format!("{path}.base_url")));
            let mut hosts = Vec::new();
            if let Some(list) = f
                .get("hosts")
                .and_then(|n| self.list(n, &format!("{path}.hosts")))
            {
                for (j, h) in list.iter().enumerate() {
                    let hpath = format!("{path}.hosts[{j}]");
                    let Some(host) = self.string(h, &hpath) else {
                        continue;
                    };
                    let host = host.to_ascii_lowercase();
                    if is_host_name(host.strip_prefix("*.").unwrap_or(&host)) {
                        hosts.push(host);
                    } else {
                        self.error_hint(
                            h.pos,
                            format!("invalid host name `{host}` in `{hpath}`"),
                            "write a bare host name such as llm.example.com, or `*.example.com` \
                             for every name under it (no scheme, port or path)",
                        );
                    }
                }
            }
            if f.get("hosts").is_none()
                && let Some(h) = base_url
                    .as_deref()
                    .and_then(|u| u.parse::<http::Uri>().ok())
                    .and_then(|u| u.host().map(str::to_ascii_lowercase))
            {
                hosts.push(h.trim_start_matches('[').trim_end_matches(']').to_string());
            }
            let credential = match f.get("credential") {
                None => Some(CustomCredential::Style(KeyStyle::Bearer)),
                Some(n) => self.custom_credential(n, &format!("{path}.credential")),
            };
            let error_shape = match f.get("error_shape") {
                None => Some(ErrorShape::OpenAi),
                Some(n) => {
                    let p = format!("{path}.error_shape");
                    self.string(n, &p).and_then(|v| {
                        let shape = [
                            ErrorShape::OpenAi,
                            ErrorShape::Anthropic,
                            ErrorShape::Google,
                            ErrorShape::Aws,
                        ]
                        .into_iter()
                        .find(|s| s.name() == v);
                        if shape.is_none() {
                            self.error_hint(
                                n.pos,
                                format!("unknown error shape `{v}` in `{p}` (expected openai, anthropic, google or aws)"),
                                "the JSON shape of the provider's error bodies; kt answers its own errors in it",
                            );
                        }
                        shape
                    })
                }
            };
            let Some((pos, name)) = name else { continue };
            let lower = name.to_ascii_lowercase();
            if !matches!(Provider::parse(&lower), Provider::Other(_)) {
                self.error_hint(
                    pos,
                    format!("`{lower}` in `{path}.name` is a catalog provider"),
                    format!(
                        "catalog providers need no definition ({}); pick another name",
                        crate::provider::known_names()
                    ),
                );
                continue;
            }
            if !lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                self.error_hint(
                    pos,
                    format!("`{path}.name` is not a valid provider name"),
                    "use letters, digits, `-` and `_`: it is also the base-URL path prefix (`/NAME/...`)",
                );
                continue;
            }
            if let Some((_, first, _)) = self.custom.get(&lower) {
                let line = first.line;
                self.error_hint(
                    pos,
                    format!("provider `{lower}` is defined twice in `providers.custom` (first on line {line})"),
                    "keep one definition",
                );
                continue;
            }
            if hosts.is_empty() && f.get("hosts").is_some_and(|n| !is_null(n)) {
                continue; // every host was reported above
            }
            if hosts.is_empty() {
                self.error_hint(
                    f.pos,
                    format!("`{path}` has neither `hosts` nor `base_url`"),
                    "give the host names it answers on (`hosts: [llm.example.com]`) and/or its `base_url`",
                );
                continue;
            }
            let (Some(credential), Some(error_shape)) = (credential, error_shape) else {
                continue;
            };
            let api_root = base_url
                .as_deref()
                .and_then(|u| u.parse::<http::Uri>().ok())
                .map(|u| u.path().trim_end_matches('/').to_string())
                .unwrap_or_default();
            let def = CustomProvider {
                name: lower.clone(),
                hosts,
                base_url,
                api_root,
                credential,
                error_shape,
            };
            self.custom
                .insert(lower, (std::sync::Arc::new(def), pos, false));
        }
    }

    /// `credential: bearer | x-api-key | api-key | x-goog-api-key` or
    /// `credential: {header: NAME}`.
    fn custom_credential(&mut self, node: &Node, path: &str) -> Option<CustomCredential> {
        let hint = "write `bearer`, `x-api-key`, `api-key`, `x-goog-api-key`, or `{header: NAME}` \
                    for the key alone in header NAME";
        if let Kind::Map(_) = &node.kind {
            let f = self.mapping(node, path, &["header"])?;
            let n = self.required(&f, path, "header", hint)?;
            let name = self
                .string(n, &format!("{path}.header"))?
                .to_ascii_lowercase();
            const RESERVED: &[&str] = &[
                "host",
                "content-length",
                "content-type",
                "transfer-encoding",
                "connection",
                "te",
                "upgrade",
                "cookie",
            ];
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || RESERVED.contains(&name.as_str())
            {
                self.error_hint(
                    n.pos,
                    format!("`{path}.header` is not a header kt can put a key in"),
                    "name a header such as x-llm-key",
                );
                return None;
            }
            return Some(CustomCredential::Header(name));
        }
        let v = self.string(node, path)?;
        let style = [
            KeyStyle::Bearer,
            KeyStyle::XApiKey,
            KeyStyle::ApiKey,
            KeyStyle::XGoogApiKey,
        ]
        .into_iter()
        .find(|s| s.name() == v.to_ascii_lowercase());
        if style.is_none() {
            self.error_hint(
                node.pos,
                format!("unknown credential style `{v}` in `{path}`"),
                hint,
            );
        }
        style.map(CustomCredential::Style)
    }

    /// `fallback: {enabled: bool}`; writing the section means enabled unless it says otherwise.
    fn fallback(&mut self, node: &Node, path: &str) -> Option<(bool, Pos)> {
        let f = self.mapping(node, path, &["enabled"])?;
        match f.get("enabled") {
            None => Some((true, node.pos)),
            Some(n) => self
                .boolean(n, &format!("{path}.enabled"))
                .map(|v| (v, n.pos)),
        }
    }

    fn target(&mut self, node: &Node, i: usize, ids: &mut HashMap<String, Pos>) -> Option<Target> {
        const KEYS: &[&str] = &[
            "id",
            "provider",
            "model",
            "required",
            "secret_key_ref",
            "base_url",
            "resource",
            "region",
        ];
        let path = format!("providers.targets[{i}]");
        let f = self.mapping(node, &path, KEYS)?;

        let id = self
            .required(
                &f,
                &path,
                "id",
                "give the target a unique `id`, e.g. `id: openai-main`",
            )
            .and_then(|n| self.string(n, &format!("{path}.id")).map(|s| (n.pos, s)));
        if let Some((pos, id)) = &id {
            if let Some(first) = ids.get(id) {
                self.error_hint(
                    *pos,
                    format!(
                        "duplicate target id `{id}` in `{path}` (first used on line {})",
                        first.line
                    ),
                    "give each target a unique id",
                );
            } else {
                ids.insert(id.clone(), *pos);
            }
        }

        let base_url_node = f.get("base_url");
        let base_url = base_url_node.and_then(|n| self.base_url(n, &format!("{path}.base_url")));
        let provider = self
            .required(
                &f,
                &path,
                "provider",
                "write `provider: openai`, `provider: anthropic`, or another name with a `base_url`",
            )
            .and_then(|n| self.string(n, &format!("{path}.provider")).map(|s| (n.pos, s)))
            .map(|(pos, name)| {
                let mut provider = Provider::parse(&name);
                if let Provider::Other(n) = &provider
                    && let Some((def, _, used)) = self.custom.get_mut(n)
                {
                    *used = true;
                    provider = Provider::Custom(def.clone());
                }
                let own_default = match &provider {
                    Provider::Custom(c) => c.base_url.is_some(),
                    _ => false,
                };
                if matches!(provider, Provider::Other(_)) && base_url_node.is_none() {
                    self.error_hint(
                        pos,
                        format!("unknown provider `{name}` in `{path}` has no `base_url`"),
                        format!(
                            "known providers are {}; for another (OpenAI-compatible) \
                             endpoint add `base_url: https://...`, or define it in \
                             `providers.custom`",
                            crate::provider::known_names()
                        ),
                    );
                }
                if matches!(provider, Provider::Custom(_)) && !own_default && base_url_node.is_none()
                {
                    self.error_hint(
                        pos,
                        format!("provider `{name}` in `{path}` has no `base_url`, and its definition in `providers.custom` gives none"),
                        "add `base_url: https://...` to the target or to the definition",
                    );
                }
                provider
            });
        let located = self.located_endpoint(&f, &path, provider.as_ref(), base_url_node.is_some());
        let model = f
            .get("model")
            .and_then(|n| self.string(n, &format!("{path}.model")));
        let required = f
            .get("required")
            .and_then(|n| self.boolean(n, &format!("{path}.required")))
            .unwrap_or(true);
        let secret_path = format!("{path}.secret_key_ref");
        let secret_key_ref = self
            .required(
                &f,
                &path,
                "secret_key_ref",
                "add `secret_key_ref:` with `env: NAME`, `store: NAME` or `file: PATH`",
            )
            .and_then(|n| self.secret_ref(n, &secret_path));

        let provider = provider?;
        let base_url = match base_url_node {
            Some(_) => Some(base_url?),
            None => match (located?, &provider) {
                (Some(url), _) => Some(url),
                (None, Provider::Custom(c)) => c.base_url.clone(),
                (None, _) => None,
            },
        };
        Some(Target {
            id: id?.1,
            provider,
            model,
            required,
            secret_key_ref: secret_key_ref?,
            base_url,
        })
    }

    /// A target's endpoint from `resource` (Azure OpenAI) or `region`
    /// (Bedrock): `Some(None)` when neither applies, `None` on an error.
    fn located_endpoint(
        &mut self,
        f: &Fields<'_>,
        path: &str,
        provider: Option<&Provider>,
        has_base_url: bool,
    ) -> Option<Option<String>> {
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && !s.starts_with('-')
                && !s.ends_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let mut out = Some(None);
        for (key, wants, make, example) in [
            (
                "resource",
                Provider::Azure,
                crate::provider::azure_endpoint as fn(&str) -> String,
                "resource: my-openai (for https://my-openai.openai.azure.com)",
            ),
            (
                "region",
                Provider::Bedrock,
                crate::provider::bedrock_endpoint as fn(&str) -> String,
                "region: us-east-1",
            ),
        ] {
            let Some(n) = f.get(key) else { continue };
            let p = format!("{path}.{key}");
            let Some(v) = self.string(n, &p) else {
                out = None;
                continue;
            };
            if provider.is_some_and(|pr| *pr != wants) {
                self.error_hint(
                    n.pos,
                    format!("`{p}` is only for `provider: {}`", wants.name()),
                    "remove it; other providers take a `base_url` when not the official one",
                );
                out = None;
            } else if has_base_url {
                self.error_hint(
                    n.pos,
                    format!("`{p}` and `{path}.base_url` both say where requests go"),
                    format!(
                        "keep one: `{key}` builds the official endpoint, `base_url` names any other"
                    ),
                );
                out = None;
            } else if !label_ok(&v.to_ascii_lowercase()) {
                self.error_hint(
                    n.pos,
                    format!("`{p}` is not a valid {key} name"),
                    format!("e.g. `{example}`"),
                );
                out = None;
            } else if out.is_some() {
                out = Some(Some(make(&v.to_ascii_lowercase())));
            }
        }
        if let Some(pr) = provider
            && matches!(pr, Provider::Azure | Provider::Bedrock)
            && !has_base_url
            && f.get("resource").is_none()
            && f.get("region").is_none()
        {
            let (key, example) = if *pr == Provider::Azure {
                (
                    "resource",
                    "resource: my-openai (for https://my-openai.openai.azure.com)",
                )
            } else {
                ("region", "region: us-east-1")
            };
            self.error_hint(
                f.pos,
                format!(
                    "`{path}` (provider {}) needs `{key}` or `base_url`",
                    pr.name()
                ),
                format!("there is no endpoint common to all customers; e.g. `{example}`"),
            );
            return None;
        }
        out
    }

    fn secret_ref(&mut self, node: &Node, path: &str) -> Option<SecretKeyRef> {
        let f = self.mapping(node, path, &["env", "store", "file"])?;
        let hint = "use `env: NAME` (the guard's environment), `store: NAME` (the secret \
                    store) or `file: PATH` (a file holding only the key)";
        let given: Vec<(&str, &Node)> = ["env", "store", "file"]
            .into_iter()
            .filter_map(|k| f.get(k).map(|n| (k, n)))
            .collect();
        match given.as_slice() {
            [] => {
                self.error_hint(f.pos, format!("`{path}` names no secret"), hint);
                None
            }
            [("env", n)] => self
                .secret_name(n, &format!("{path}.env"))
                .map(SecretKeyRef::Env),
            [("store", n)] => self
                .secret_name(n, &format!("{path}.store"))
                .map(SecretKeyRef::Store),
            [(_, n)] => self
                .key_file(n, &format!("{path}.file"))
                .map(SecretKeyRef::File),
            many => {
                let keys: Vec<String> = many.iter().map(|(k, _)| format!("`{k}`")).collect();
                self.error_hint(
                    f.pos,
                    format!("`{path}` sets {}; it takes exactly one", join_and(&keys)),
                    hint,
                );
                None
            }
        }
    }

    /// A key file's path; a relative one is resolved against the config
    /// file's directory. Like a name, a value that looks like a key is not
    /// echoed and is refused.
    fn key_file(&mut self, node: &Node, path: &str) -> Option<PathBuf> {
        let text = self.string(node, path)?;
        if looks_like_key(&text) {
            self.error_hint(
                node.pos,
                format!("`{path}` looks like a key itself, not the path of a file holding one"),
                "write the key to a file only kt's user (or root) can change and give its \
                 path here; rotate the key, it is now in this file",
            );
            return None;
        }
        if text.contains('\0') || text.ends_with('/') {
            self.error_hint(
                node.pos,
                format!("`{path}` is not a file path"),
                "give the path of a file holding only the key, e.g. \
                 `/run/credentials/kt.service/openai`",
            );
            return None;
        }
        let file = Path::new(&text);
        Some(if file.is_absolute() {
            file.to_path_buf()
        } else {
            self.base.join(file)
        })
    }

    /// A secret's name. The value is never echoed when it is rejected: a
    /// pasted key is the likeliest bad name.
    fn secret_name(&mut self, node: &Node, path: &str) -> Option<String> {
        let name = self.string(node, path)?;
        if looks_like_key(&name) {
            self.error_hint(
                node.pos,
                format!("`{path}` looks like a key itself, not the name of one"),
                "store the key with `kt secrets add NAME --store` (or export it) and write \
                 only NAME here; rotate the key, it is now in this file",
            );
            return None;
        }
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            self.error_hint(
                node.pos,
                format!("`{path}` is not a valid secret name"),
                "names use letters, digits and `_` and do not start with a digit, \
                 e.g. OPENAI_API_KEY",
            );
            return None;
        }
        Some(name)
    }

    fn base_url(&mut self, node: &Node, path: &str) -> Option<String> {
        let url = self.string(node, path)?;
        let hint = "e.g. `https://api.openai.com/v1` or `http://127.0.0.1:9000/v1`";
        let parsed = url.parse::<http::Uri>().ok();
        let authority = parsed.as_ref().and_then(|u| u.authority());
        // The value is not echoed: it may carry credentials.
        if authority.is_some_and(|a| a.as_str().contains('@')) {
            self.error_hint(
                node.pos,
                format!("`{path}` carries credentials"),
                "remove `user:password@`; the key comes from `secret_key_ref`",
            );
            return None;
        }
        let ok = parsed.as_ref().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        });
        if !ok {
            self.error_hint(
                node.pos,
                format!("`{path}` is not an http:// or https:// URL"),
                hint,
            );
            return None;
        }
        Some(url)
    }

    fn chain(&mut self, node: Option<&Node>) -> Vec<PolicyKind> {
        let default = vec![PolicyKind::DlpFilter, PolicyKind::AuditLogger];
        let Some(f) = node.and_then(|n| self.mapping(n, "policies", &["chain"])) else {
            return default;
        };
        let Some(list) = f.get("chain").and_then(|n| self.list(n, "policies.chain")) else {
            return default;
        };
        let mut chain = Vec::new();
        let mut seen: HashMap<PolicyKind, Pos> = HashMap::new();
        for (i, entry) in list.iter().enumerate() {
            let Some(name) = self.string(entry, &format!("policies.chain[{i}]")) else {
                continue;
            };
            let kind = match name.as_str() {
                "dlp-filter" => PolicyKind::DlpFilter,
                "audit-logger" => PolicyKind::AuditLogger,
                other => {
                    self.error_hint(
                        entry.pos,
                        format!(
                            "unknown policy `{other}` in `policies.chain` \
                             (expected one of: dlp-filter, audit-logger)"
                        ),
                        closest(other, &["dlp-filter", "audit-logger"]).map_or_else(
                            || "remove it from the chain".into(),
                            |a| format!("did you mean `{a}`?"),
                        ),
                    );
                    continue;
                }
            };
            if let Some(first) = seen.get(&kind) {
                self.error_hint(
                    entry.pos,
                    format!(
                        "policy `{name}` appears twice in `policies.chain` (first on line {})",
                        first.line
                    ),
                    "list each policy once",
                );
                continue;
            }
            seen.insert(kind, entry.pos);
            chain.push(kind);
        }
        chain
    }

    fn policy(&mut self, node: Option<&Node>) -> (Option<DlpFilter>, Option<AuditLogger>) {
        let Some(f) = node.and_then(|n| self.mapping(n, "policy", &["dlp-filter", "audit-logger"]))
        else {
            return (None, None);
        };
        let dlp = f.get("dlp-filter").map(|n| self.dlp(n));
        let audit = f.get("audit-logger").map(|n| self.audit(n));
        (dlp, audit)
    }

    fn dlp(&mut self, node: &Node) -> DlpFilter {
        const KEYS: &[&str] = &[
            "detect_patterns",
            "blocked_terms",
            "action",
            "fuzzy_matching",
            "max_distance",
            "builtin_rules",
        ];
        const P: &str = "policy.dlp-filter";
        let mut out = DlpFilter::default();
        let Some(f) = self.mapping(node, P, KEYS) else {
            return out;
        };
        if let Some(list) = f
            .get("detect_patterns")
            .and_then(|n| self.list(n, &format!("{P}.detect_patterns")))
        {
            for (i, n) in list.iter().enumerate() {
                let path = format!("{P}.detect_patterns[{i}]");
                let Some(pattern) = self.string(n, &path) else {
                    continue;
                };
                match regex::Regex::new(&pattern) {
                    Ok(_) => out.detect_patterns.push(pattern),
                    Err(e) => self.error_hint(
                        n.pos,
                        format!(
                            "invalid regex `{pattern}` in `{path}`: {}",
                            regex_reason(&e)
                        ),
                        "fix the pattern (Rust regex syntax); single-quote it in YAML so \
                         backslashes stay as written",
                    ),
                }
            }
        }
        if let Some(list) = f
            .get("blocked_terms")
            .and_then(|n| self.list(n, &format!("{P}.blocked_terms")))
        {
            for (i, n) in list.iter().enumerate() {
                let path = format!("{P}.blocked_terms[{i}]");
                let Some(term) = self.string(n, &path) else {
                    continue;
                };
                // Terms are matched on their letters and digits only: one
                // without any would match nothing (and the scanner refuses it).
                if term.chars().any(char::is_alphanumeric) {
                    out.blocked_terms.push(term);
                } else {
                    self.error_hint(
                        n.pos,
                        format!("blocked term `{term}` in `{path}` has no letters or digits"),
                        "a blocked term is matched on its words; give it at least one letter or digit",
                    );
                }
            }
        }
        if let Some(n) = f.get("action")
            && let Some(action) = self.string(n, &format!("{P}.action"))
        {
            match action.as_str() {
                "block" => out.action = DlpAction::Block,
                "redact" => out.action = DlpAction::Redact,
                "audit" => out.action = DlpAction::Audit,
                other => self.error(
                    n.pos,
                    format!(
                        "unknown action `{other}` in `{P}.action` \
                         (expected one of: block, redact, audit)"
                    ),
                ),
            }
        }
        if let Some(v) = f
            .get("fuzzy_matching")
            .and_then(|n| self.boolean(n, &format!("{P}.fuzzy_matching")))
        {
            out.fuzzy_matching = v;
        }
        if let Some(v) = f.get("max_distance").and_then(|n| {
            self.int_in(
                n,
                &format!("{P}.max_distance"),
                0,
                u64::from(MAX_FUZZY_DISTANCE),
                "0 means exact matching; larger distances match more unrelated words",
            )
        }) {
            out.max_distance = u8::try_from(v).unwrap_or(MAX_FUZZY_DISTANCE);
        }
        if let Some(v) = f
            .get("builtin_rules")
            .and_then(|n| self.boolean(n, &format!("{P}.builtin_rules")))
        {
            out.builtin_rules = v;
        }
        out
    }

    fn audit(&mut self, node: &Node) -> AuditLogger {
        const P: &str = "policy.audit-logger";
        let mut out = AuditLogger::default();
        let Some(f) = self.mapping(node, P, &["max_events", "on_store_failure", "sinks"]) else {
            return out;
        };
        if let Some(n) = f.get("sinks")
            && let Some(items) = self.list(n, &format!("{P}.sinks"))
        {
            let mut names: HashMap<String, Pos> = HashMap::new();
            for (i, item) in items.iter().enumerate() {
                let Some(sink) = self.sink(item, &format!("{P}.sinks[{i}]")) else {
                    continue;
                };
                let name = sink.name();
                if let Some(first) = names.get(&name) {
                    self.error_hint(
                        item.pos,
                        format!(
                            "`{P}.sinks[{i}]` is the same sink as the one on line {} ({name})",
                            first.line
                        ),
                        "keep one of them: two writers of one destination would interleave",
                    );
                    continue;
                }
                names.insert(name, item.pos);
                out.sinks.push(sink);
            }
        }
        if let Some(v) = f.get("max_events").and_then(|n| {
            self.int_in(
                n,
                &format!("{P}.max_events"),
                1,
                u64::MAX,
                "keep at least one event",
            )
        }) {
            out.max_events = v;
        }
        if let Some(n) = f.get("on_store_failure")
            && let Some(v) = self.failure(n, &format!("{P}.on_store_failure"))
        {
            out.on_store_failure = v;
        }
        out
    }

    /// `log` or `refuse`.
    fn failure(&mut self, node: &Node, path: &str) -> Option<StoreFailure> {
        let v = self.string(node, path)?;
        match v.as_str() {
            "log" => Some(StoreFailure::Log),
            "refuse" => Some(StoreFailure::Refuse),
            other => {
                self.error(
                    node.pos,
                    format!("unknown value `{other}` in `{path}` (expected one of: log, refuse)"),
                );
                None
            }
        }
    }

    /// One entry of `policy.audit-logger.sinks`.
    fn sink(&mut self, node: &Node, path: &str) -> Option<SinkConfig> {
        const KEYS: &[&str] = &[
            "type",
            "on_failure",
            "queue",
            "path",
            "rotate_bytes",
            "rotate_age",
            "max_files",
            "address",
            "facility",
        ];
        let f = self.mapping(node, path, KEYS)?;
        let kind_node =
            self.required(&f, path, "type", "add `type: file`, `stdout` or `syslog`")?;
        let kind = self.string(kind_node, &format!("{path}.type"))?;
        let only = |kind: &str| -> &'static [&'static str] {
            match kind {
                "file" => &["path", "rotate_bytes", "rotate_age", "max_files"],
                "syslog" => &["address", "facility"],
                _ => &[],
            }
        };
        if !matches!(kind.as_str(), "file" | "stdout" | "syslog") {
            self.error_hint(
                kind_node.pos,
                format!("unknown sink type `{kind}` in `{path}.type` (expected one of: file, stdout, syslog)"),
                closest(&kind, &["file", "stdout", "syslog"])
                    .map_or_else(|| "use file, stdout or syslog".into(), |a| format!("did you mean `{a}`?")),
            );
            return None;
        }
        for (key, n) in &f.entries {
            let common = matches!(*key, "type" | "on_failure" | "queue");
            if !common && !only(&kind).contains(key) {
                self.error_hint(
                    n.pos,
                    format!("`{path}.{key}` does not apply to a {kind} sink"),
                    "remove it",
                );
            }
        }
        let mut out = SinkConfig {
            kind: SinkKind::Stdout,
            on_failure: StoreFailure::Log,
            queue: 10_000,
        };
        if let Some(n) = f.get("on_failure")
            && let Some(v) = self.failure(n, &format!("{path}.on_failure"))
        {
            out.on_failure = v;
        }
        if let Some(v) = f.get("queue").and_then(|n| {
            self.int_in(
                n,
                &format!("{path}.queue"),
                1,
                10_000_000,
                "events held for this sink at most, e.g. 10000",
            )
        }) {
            out.queue = usize::try_from(v).unwrap_or(usize::MAX);
        }
        out.kind = match kind.as_str() {
            "file" => {
                let p = self.required(&f, path, "path", "add `path: /var/log/kt/events.jsonl`")?;
                let text = self.string(p, &format!("{path}.path"))?;
                if text.contains('\0') || text.ends_with('/') {
                    self.error_hint(
                        p.pos,
                        format!("`{path}.path` is not a file path"),
                        "give a file's path, e.g. /var/log/kt/events.jsonl",
                    );
                    return None;
                }
                let file = Path::new(&text);
                let file = if file.is_absolute() {
                    file.to_path_buf()
                } else {
                    self.base.join(file)
                };
                let rotate_bytes = f.get("rotate_bytes").and_then(|n| {
                    self.int_in(
                        n,
                        &format!("{path}.rotate_bytes"),
                        1024,
                        u64::MAX,
                        "a size in bytes, e.g. 104857600 for 100 MiB",
                    )
                });
                let rotate_age = f
                    .get("rotate_age")
                    .and_then(|n| self.duration(n, &format!("{path}.rotate_age"), false));
                let max_files = f
                    .get("max_files")
                    .and_then(|n| {
                        self.int_in(
                            n,
                            &format!("{path}.max_files"),
                            1,
                            1000,
                            "how many rotated files to keep, e.g. 5",
                        )
                    })
                    .map_or(5, |v| u32::try_from(v).unwrap_or(5));
                SinkKind::File {
                    path: file,
                    rotate_bytes,
                    rotate_age,
                    max_files,
                }
            }
            "syslog" => {
                let address = match f.get("address") {
                    None => SyslogAddress::Unix(PathBuf::from("/dev/log")),
                    Some(n) => self.syslog_address(n, &format!("{path}.address"))?,
                };
                let facility = match f.get("facility") {
                    None => 16,
                    Some(n) => self.facility(n, &format!("{path}.facility"))?,
                };
                SinkKind::Syslog { address, facility }
            }
            _ => SinkKind::Stdout,
        };
        Some(out)
    }

    fn syslog_address(&mut self, node: &Node, path: &str) -> Option<SyslogAddress> {
        let text = self.string(node, path)?;
        let hint = "write unix:///dev/log, udp://HOST:PORT or tcp://HOST:PORT";
        let hostport = |rest: &str| {
            rest.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p != 0)
            })
        };
        let addr = if let Some(rest) = text.strip_prefix("unix://") {
            rest.starts_with('/')
                .then(|| SyslogAddress::Unix(PathBuf::from(rest)))
        } else if let Some(rest) = text.strip_prefix("udp://") {
            hostport(rest).then(|| SyslogAddress::Udp(rest.to_string()))
        } else if let Some(rest) = text.strip_prefix("tcp://") {
            hostport(rest).then(|| SyslogAddress::Tcp(rest.to_string()))
        } else {
            None
        };
        if addr.is_none() {
            self.error_hint(
                node.pos,
                format!("invalid syslog address `{text}` in `{path}`"),
                hint,
            );
        }
        addr
    }

    fn facility(&mut self, node: &Node, path: &str) -> Option<u8> {
        const NAMES: [&str; 24] = [
            "kern",
            "user",
            "mail",
            "daemon",
            "auth",
            "syslog",
            "lpr",
            "news",
            "uucp",
            "cron",
            "authpriv",
            "ftp",
            "ntp",
            "security",
            "console",
            "solaris-cron",
            "local0",
            "local1",
            "local2",
            "local3",
            "local4",
            "local5",
            "local6",
            "local7",
        ];
        let text = self.string(node, path)?;
        match NAMES.iter().position(|n| *n == text) {
            Some(i) => u8::try_from(i).ok(),
            None => {
                self.error_hint(
                    node.pos,
                    format!("unknown syslog facility `{text}` in `{path}`"),
                    closest(&text, &NAMES).map_or_else(
                        || "use e.g. local0 … local7, auth, authpriv, daemon".into(),
                        |a| format!("did you mean `{a}`?"),
                    ),
                );
                None
            }
        }
    }

    fn gateway(&mut self, node: Option<&Node>) -> GatewaySettings {
        const KEYS: &[&str] = &[
            "listen",
            "capture_listen",
            "capture_listen6",
            "connect_timeout",
            "first_byte_timeout",
            "idle_timeout",
            "max_body_bytes",
            "max_retry_after",
            "splice_unknown_sni",
            "connect_allow",
            "max_connections",
            "max_connections_per_uid",
            "body_timeout",
            "max_buffered_bytes",
            "cooldown_after",
            "cooldown",
            "probe_interval",
            "clients",
            "allow_remote_clients",
            "metrics",
            "allow_remote_metrics",
            "mode",
            "credentials",
            "upstream_proxy",
            "proxy_listen",
        ];
        let mut out = GatewaySettings::default();
        let Some(f) = node.and_then(|n| self.mapping(n, "gateway", KEYS)) else {
            return out;
        };
        if let Some(v) = f.get("listen").and_then(|n| self.addr(n, "gateway.listen")) {
            out.listen = v;
        }
        if let Some(n) = f.get("capture_listen")
            && let Some(v) = self.addr(n, "gateway.capture_listen")
        {
            out.capture_listen = v;
            if v == out.listen {
                self.error_hint(
                    n.pos,
                    "`gateway.capture_listen` is the same address as `gateway.listen`",
                    "give the capture listener its own port, e.g. 127.0.0.1:709",
                );
            }
        }
        if let Some(n) = f.get("capture_listen6") {
            // null turns the IPv6 capture listener off.
            if is_null(n) {
                out.capture_listen6 = None;
            } else if let Some(v) = self.addr(n, "gateway.capture_listen6") {
                out.capture_listen6 = Some(v);
            }
        }
        let timeouts: [(&str, &mut Duration, bool); 7] = [
            ("body_timeout", &mut out.body_timeout, false),
            ("cooldown", &mut out.cooldown, false),
            ("connect_timeout", &mut out.connect_timeout, false),
            ("first_byte_timeout", &mut out.first_byte_timeout, false),
            ("idle_timeout", &mut out.idle_timeout, false),
            ("max_retry_after", &mut out.max_retry_after, true),
            ("probe_interval", &mut out.probe_interval, true),
        ];
        for (key, slot, zero_ok) in timeouts {
            if let Some(v) = f
                .get(key)
                .and_then(|n| self.duration(n, &format!("gateway.{key}"), zero_ok))
            {
                *slot = v;
            }
        }
        if let Some(v) = f.get("max_body_bytes").and_then(|n| {
            self.int_in(
                n,
                "gateway.max_body_bytes",
                1,
                u64::MAX,
                "a size in bytes, e.g. 16777216 for 16 MiB",
            )
        }) {
            out.max_body_bytes = v;
        }
        // Kept so older files load: `false` is what kt always does now.
        if let Some(n) = f.get("splice_unknown_sni")
            && self.boolean(n, "gateway.splice_unknown_sni") == Some(true)
        {
            self.error_hint(
                n.pos,
                "`gateway.splice_unknown_sni: true` is no longer supported: kt never passes a connection it has not decided on",
                "remove it; to let CONNECT clients reach other hosts, list them in `gateway.connect_allow`; \
                 `capture.scope: port` has kt splice (and record) non-provider names itself",
            );
        }
        if let Some(n) = f.get("proxy_listen")
            && let Some(v) = self.addr(n, "gateway.proxy_listen")
        {
            if v.is_ipv4() {
                out.proxy_listen = v;
            } else {
                self.error_hint(
                    n.pos,
                    "`gateway.proxy_listen` must be an IPv4 address",
                    "e.g. 127.0.0.1:710; an IPv6 listener on [::1] at the same port follows",
                );
            }
        }
        if let Some(n) = f.get("upstream_proxy")
            && !is_null(n)
            && let Some(v) = self.string(n, "gateway.upstream_proxy")
        {
            match super::egress::parse_proxy_url(&v) {
                Ok(a) => out.upstream_proxy = Some(a),
                Err(why) => self.error_hint(
                    n.pos,
                    format!("invalid `gateway.upstream_proxy`: {why}"),
                    "write http://HOST:PORT of the proxy kt must use to reach the providers",
                ),
            }
        }
        if let Some(n) = f.get("connect_allow")
            && !is_null(n)
            && let Some(list) = self.list(n, "gateway.connect_allow")
        {
            for (i, h) in list.iter().enumerate() {
                let path = format!("gateway.connect_allow[{i}]");
                let Some(host) = self.string(h, &path) else {
                    continue;
                };
                if is_host_name(host.strip_prefix("*.").unwrap_or(&host)) {
                    out.connect_allow.push(host);
                } else {
                    self.error_hint(
                        h.pos,
                        format!("invalid host name `{host}` in `{path}`"),
                        "use a DNS name such as pypi.org, or *.example.com for its subdomains",
                    );
                }
            }
        }
        if let Some(v) = f
            .get("allow_remote_clients")
            .and_then(|n| self.boolean(n, "gateway.allow_remote_clients"))
        {
            out.allow_remote_clients = v;
        }
        if let Some(n) = f.get("mode")
            && let Some(v) = self.string(n, "gateway.mode")
        {
            match v.as_str() {
                "enforce" => out.mode = GatewayMode::Enforce,
                "observe" => out.mode = GatewayMode::Observe,
                other => self.error_hint(
                    n.pos,
                    format!("unknown mode `{other}` in `gateway.mode` (expected enforce or observe)"),
                    "`observe` records who presents which key without swapping or blocking; `enforce` (the default) swaps and blocks",
                ),
            }
        }
        if let Some(n) = f.get("credentials")
            && !is_null(n)
            && let Some(c) = self.mapping(
                n,
                "gateway.credentials",
                &[
                    "api_key",
                    "oauth",
                    "none",
                    "other_provider",
                    "entra",
                    "sigv4",
                ],
            )
        {
            let slots: [(&str, &mut CredentialAction); 6] = [
                ("api_key", &mut out.credentials.api_key),
                ("oauth", &mut out.credentials.oauth),
                ("none", &mut out.credentials.none),
                ("other_provider", &mut out.credentials.other_provider),
                ("entra", &mut out.credentials.entra),
                ("sigv4", &mut out.credentials.sigv4),
            ];
            for (key, slot) in slots {
                let Some(n) = c.get(key) else { continue };
                let path = format!("gateway.credentials.{key}");
                let Some(v) = self.string(n, &path) else {
                    continue;
                };
                match (v.as_str(), key) {
                    ("pass", "none") => self.error_hint(
                        n.pos,
                        format!("`{path}` cannot be `pass`: a request without a credential has nothing to pass"),
                        "use `swap` (send the managed key) or `block`",
                    ),
                    ("swap", "entra" | "sigv4") => self.error_hint(
                        n.pos,
                        format!("`{path}` cannot be `swap`: this credential is the client's own identity (an Entra ID token, an AWS signature over the request), never replaced by a managed key"),
                        "use `pass` (forward it as sent) or `block`",
                    ),
                    ("swap", _) => *slot = CredentialAction::Swap,
                    ("pass", _) => *slot = CredentialAction::Pass,
                    ("block", _) => *slot = CredentialAction::Block,
                    (other, _) => self.error_hint(
                        n.pos,
                        format!("unknown action `{other}` in `{path}` (expected swap, pass or block)"),
                        "`swap` sends the managed key, `pass` the client's own credential, `block` refuses",
                    ),
                }
            }
        }
        if let Some(n) = f.get("metrics")
            && !is_null(n)
            && let Some(v) = self.addr(n, "gateway.metrics")
        {
            out.metrics = Some(v);
        }
        if let Some(v) = f
            .get("allow_remote_metrics")
            .and_then(|n| self.boolean(n, "gateway.allow_remote_metrics"))
        {
            out.allow_remote_metrics = v;
        }
        if let (Some(n), Some(m)) = (f.get("metrics"), out.metrics)
            && !m.ip().is_loopback()
            && !out.allow_remote_metrics
        {
            self.error_hint(
                n.pos,
                format!(
                    "`gateway.metrics` {m} is not a loopback address: metrics name targets, secrets and processes"
                ),
                "serve them on 127.0.0.1 (scrape through a local agent), or set `gateway.allow_remote_metrics: true`",
            );
        }
        for (name, addr) in [
            ("gateway.listen", Some(out.listen)),
            ("gateway.capture_listen", Some(out.capture_listen)),
            ("gateway.capture_listen6", out.capture_listen6),
        ] {
            if let (Some(n), Some(m)) = (f.get("metrics"), out.metrics)
                && addr == Some(m)
            {
                self.error_hint(
                    n.pos,
                    format!("`gateway.metrics` is the same address as `{name}`"),
                    "give the metrics endpoint its own port, e.g. 127.0.0.1:9787",
                );
            }
        }
        if let Some(n) = f.get("listen")
            && !out.listen.ip().is_loopback()
            && !out.allow_remote_clients
        {
            self.error_hint(
                n.pos,
                format!(
                    "`gateway.listen` {} is not a loopback address: anyone who reaches it could spend the managed keys",
                    out.listen
                ),
                "listen on 127.0.0.1 (or [::1]); if other hosts must reach kt, also set `gateway.allow_remote_clients: true` and list them in `gateway.clients`",
            );
        }
        if let Some(n) = f.get("clients")
            && !is_null(n)
            && let Some(c) = self.mapping(n, "gateway.clients", &["uids", "cgroups"])
        {
            let mut allow = crate::config::ClientAllow::default();
            if let Some(list) = c
                .get("uids")
                .and_then(|l| self.list(l, "gateway.clients.uids"))
            {
                for (i, u) in list.iter().enumerate() {
                    if let Some(v) = self.int_in(
                        u,
                        &format!("gateway.clients.uids[{i}]"),
                        0,
                        u64::from(u32::MAX),
                        "a numeric user id, e.g. 1001",
                    ) {
                        allow.uids.push(u32::try_from(v).unwrap_or(u32::MAX));
                    }
                }
            }
            if let Some(list) = c
                .get("cgroups")
                .and_then(|l| self.list(l, "gateway.clients.cgroups"))
            {
                for (i, g) in list.iter().enumerate() {
                    let path = format!("gateway.clients.cgroups[{i}]");
                    if let Some(v) = self.string(g, &path) {
                        if v.starts_with('/') {
                            allow.cgroups.push(v);
                        } else {
                            self.error_hint(
                                g.pos,
                                format!("`{path}` must be a cgroup path starting with `/`, found `{v}`"),
                                "as /proc/PID/cgroup shows it, e.g. /system.slice/actions.runner.service",
                            );
                        }
                    }
                }
            }
            out.clients = Some(allow);
        }
        if let Some(v) = f.get("max_connections_per_uid").and_then(|n| {
            self.int_in(
                n,
                "gateway.max_connections_per_uid",
                1,
                1 << 20,
                "a number of connections, e.g. 512",
            )
        }) {
            out.max_connections_per_uid = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = f.get("cooldown_after").and_then(|n| {
            self.int_in(
                n,
                "gateway.cooldown_after",
                0,
                1000,
                "a number of failures in a row, e.g. 3 (0 turns cool-downs off)",
            )
        }) {
            out.cooldown_after = u32::try_from(v).unwrap_or(u32::MAX);
        }
        if let Some(v) = f.get("max_buffered_bytes").and_then(|n| {
            self.int_in(
                n,
                "gateway.max_buffered_bytes",
                1024,
                u64::from(u32::MAX),
                "a size in bytes, e.g. 268435456 for 256 MiB",
            )
        }) {
            out.max_buffered_bytes = v;
        }
        if let Some(v) = f.get("max_connections").and_then(|n| {
            self.int_in(
                n,
                "gateway.max_connections",
                1,
                1 << 20,
                "a number of connections, e.g. 4096",
            )
        }) {
            out.max_connections = usize::try_from(v).unwrap_or(usize::MAX);
        }
        out
    }

    fn capture(&mut self, node: Option<&Node>) -> Capture {
        const KEYS: &[&str] = &[
            "enabled",
            "cgroup",
            "hosts",
            "cidrs",
            "ports",
            "scope",
            "containers",
            "providers",
            "proxies",
            "egress",
        ];
        let mut out = Capture::default();
        let Some(f) = node.and_then(|n| self.mapping(n, "capture", KEYS)) else {
            return out;
        };
        if let Some(v) = f
            .get("enabled")
            .and_then(|n| self.boolean(n, "capture.enabled"))
        {
            out.enabled = v;
        }
        if let Some(n) = f.get("cgroup")
            && let Some(v) = self.string(n, "capture.cgroup")
        {
            if v.starts_with('/') {
                out.cgroup = Some(PathBuf::from(v));
            } else {
                self.error_hint(
                    n.pos,
                    format!("`capture.cgroup` must be an absolute path, found `{v}`"),
                    "e.g. /sys/fs/cgroup/ci.slice; leave it out for the whole cgroup2 mount",
                );
            }
        }
        if let Some(n) = f.get("hosts")
            && !is_null(n)
            && let Some(list) = self.list(n, "capture.hosts")
        {
            let mut hosts = Vec::new();
            for (i, h) in list.iter().enumerate() {
                let path = format!("capture.hosts[{i}]");
                let Some(host) = self.string(h, &path) else {
                    continue;
                };
                if is_host_name(&host) {
                    hosts.push(host);
                } else {
                    self.error_hint(
                        h.pos,
                        format!("invalid host name `{host}` in `{path}`"),
                        "write a bare host name such as api.openai.com (no scheme, port or path)",
                    );
                }
            }
            out.hosts = Some(hosts);
        }
        if let Some(list) = f.get("cidrs").and_then(|n| self.list(n, "capture.cidrs")) {
            for (i, c) in list.iter().enumerate() {
                let path = format!("capture.cidrs[{i}]");
                let Some(text) = self.string(c, &path) else {
                    continue;
                };
                match parse_prefix(&text) {
                    Ok(p) => out.cidrs.push(p),
                    Err(why) => self.error_hint(
                        c.pos,
                        format!("invalid CIDR `{text}` in `{path}`: {why}"),
                        "write ADDRESS/LENGTH, e.g. 10.0.0.0/8 or 2001:db8::/32",
                    ),
                }
            }
        }
        if let Some(n) = f.get("ports")
            && let Some(list) = self.list(n, "capture.ports")
        {
            out.ports.clear();
            for (i, p) in list.iter().enumerate() {
                let hint = "a TCP port from 1 to 65535, e.g. 443";
                if let Some(v) = self.int_in(p, &format!("capture.ports[{i}]"), 1, 65535, hint)
                    && let Ok(port) = u16::try_from(v)
                {
                    out.ports.push(port);
                }
            }
            if list.is_empty() && out.enabled {
                self.error_hint(
                    n.pos,
                    "`capture.ports` is empty: nothing would be captured",
                    "list at least one port, e.g. `ports: [443]`, or set `capture.enabled: false`",
                );
            }
        }
        if let Some(n) = f.get("scope")
            && let Some(v) = self.string(n, "capture.scope")
        {
            match v.as_str() {
                "provider" => out.scope = CaptureScope::Provider,
                "port" => out.scope = CaptureScope::Port,
                other => self.error_hint(
                    n.pos,
                    format!("unknown capture scope `{other}` in `capture.scope` (expected provider or port)"),
                    "`provider` captures connections to provider addresses only; `port` captures every \
                     connection to the capture ports and splices non-provider names",
                ),
            }
        }
        if let Some(n) = f.get("providers")
            && let Some(v) = self.string(n, "capture.providers")
        {
            match v.as_str() {
                "routed" => out.providers = CaptureProviders::Routed,
                "all" => out.providers = CaptureProviders::All,
                other => self.error_hint(
                    n.pos,
                    format!(
                        "unknown value `{other}` in `capture.providers` (expected routed or all)"
                    ),
                    "`routed` captures the hosts of providers with a target; `all` every catalog \
                     host, so a job calling a provider without a target is refused and recorded",
                ),
            }
        }
        if let Some(list) = f
            .get("proxies")
            .and_then(|n| self.list(n, "capture.proxies"))
        {
            for (i, p) in list.iter().enumerate() {
                let path = format!("capture.proxies[{i}]");
                let Some(text) = self.string(p, &path) else {
                    continue;
                };
                match super::egress::parse_proxy_addr(&text) {
                    Ok(a) => out.proxies.push(a),
                    Err(why) => self.error_hint(
                        p.pos,
                        format!("invalid proxy in `{path}`: {why}"),
                        "write HOST:PORT of the HTTP proxy the jobs use, e.g. proxy.corp:3128",
                    ),
                }
            }
        }
        if let Some(n) = f.get("egress") {
            out.egress = self.egress(n);
        }
        if let Some(n) = f.get("containers") {
            out.containers = self.containers(n);
        }
        out
    }

    /// `capture.containers`: `true`/`false`, or a mapping with `enabled`,
    /// `address` and `address6`.
    fn containers(&mut self, node: &Node) -> Containers {
        const KEYS: &[&str] = &["enabled", "address", "address6"];
        let mut out = Containers::default();
        if let Kind::Scalar { .. } = &node.kind {
            if let Some(v) = self.boolean(node, "capture.containers") {
                out.enabled = v;
            }
            return out;
        }
        let Some(f) = self.mapping(node, "capture.containers", KEYS) else {
            return out;
        };
        // A mapping means "on" unless it says otherwise.
        out.enabled = true;
        if let Some(v) = f
            .get("enabled")
            .and_then(|n| self.boolean(n, "capture.containers.enabled"))
        {
            out.enabled = v;
        }
        let hint = "an address of this host that containers reach through their default route, \
                    never loopback; leave it out for the default";
        if let Some(n) = f.get("address")
            && let Some(v) = self.string(n, "capture.containers.address")
        {
            match v.parse::<std::net::Ipv4Addr>() {
                Ok(a) if !a.is_loopback() && !a.is_unspecified() && !a.is_multicast() => {
                    out.address = a;
                }
                _ => self.error_hint(
                    n.pos,
                    format!(
                        "`capture.containers.address` must be a usable IPv4 address, found `{v}`"
                    ),
                    hint,
                ),
            }
        }
        if let Some(n) = f.get("address6") {
            if is_null(n) {
                out.address6 = None;
            } else if let Some(v) = self.string(n, "capture.containers.address6") {
                match v.parse::<std::net::Ipv6Addr>() {
                    Ok(a) if !a.is_loopback() && !a.is_unspecified() && !a.is_multicast() => {
                        out.address6 = Some(a);
                    }
                    _ => self.error_hint(
                        n.pos,
                        format!(
                            "`capture.containers.address6` must be a usable IPv6 address, found `{v}`"
                        ),
                        hint,
                    ),
                }
            }
        }
        out
    }

    fn egress(&mut self, node: &Node) -> super::egress::Egress {
        use super::egress::{Egress, EgressMode, parse_allow};
        const KEYS: &[&str] = &["mode", "allow", "resolvers"];
        let mut out = Egress::default();
        let Some(f) = self.mapping(node, "capture.egress", KEYS) else {
            return out;
        };
        if let Some(n) = f.get("mode")
            && let Some(v) = self.string(n, "capture.egress.mode")
        {
            match v.as_str() {
                "off" => out.mode = EgressMode::Off,
                "audit" => out.mode = EgressMode::Audit,
                "enforce" => out.mode = EgressMode::Enforce,
                other => self.error_hint(
                    n.pos,
                    format!("unknown egress mode `{other}` in `capture.egress.mode` (expected off, audit or enforce)"),
                    "start with `audit`, read `kt egress report`, then `enforce` with that allowlist",
                ),
            }
        }
        if let Some(list) = f
            .get("allow")
            .and_then(|n| self.list(n, "capture.egress.allow"))
        {
            for (i, a) in list.iter().enumerate() {
                let path = format!("capture.egress.allow[{i}]");
                let Some(text) = self.string(a, &path) else {
                    continue;
                };
                match parse_allow(&text) {
                    Ok(e) => out.allow.push(e),
                    Err(why) => self.error_hint(
                        a.pos,
                        format!("invalid entry `{text}` in `{path}`: {why}"),
                        "write host, host:port, CIDR or CIDR:port, e.g. pypi.org, github.com:22, 10.0.0.0/8:5432",
                    ),
                }
            }
        }
        if let Some(n) = f.get("resolvers")
            && !is_null(n)
            && let Some(list) = self.list(n, "capture.egress.resolvers")
        {
            let mut v = Vec::new();
            for (i, r) in list.iter().enumerate() {
                let path = format!("capture.egress.resolvers[{i}]");
                let Some(text) = self.string(r, &path) else {
                    continue;
                };
                match text.parse::<IpAddr>() {
                    Ok(a) => v.push(a),
                    Err(_) => self.error_hint(
                        r.pos,
                        format!("`{text}` in `{path}` is not an IP address"),
                        "list the DNS servers' addresses, e.g. 10.0.0.2",
                    ),
                }
            }
            out.resolvers = Some(v);
        }
        out
    }

    // ---- typed values ----

    /// Checks that `node` is a mapping (null counts as empty) whose keys are
    /// all in `allowed` and unique; reports every offending key.
    fn mapping<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        allowed: &[&'static str],
    ) -> Option<Fields<'n>> {
        let pairs: &[(Node, Node)] = match &node.kind {
            Kind::Map(pairs) => pairs,
            _ if is_null(node) => &[],
            _ => {
                let what = if path.is_empty() {
                    "the top level".to_string()
                } else {
                    format!("`{path}`")
                };
                self.error_hint(
                    node.pos,
                    format!(
                        "{what} must be a mapping (key: value), found {}",
                        describe(node)
                    ),
                    format!("expected keys: {}", allowed.join(", ")),
                );
                return None;
            }
        };
        let place = if path.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in `{path}`")
        };
        let mut fields = Fields {
            pos: node.pos,
            entries: Vec::new(),
            suggested: Vec::new(),
        };
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for (k, v) in pairs {
            let Kind::Scalar { text: key, .. } = &k.kind else {
                self.error(
                    k.pos,
                    format!("keys {place} must be plain names, found {}", describe(k)),
                );
                continue;
            };
            if !allowed.contains(&key.as_str()) {
                let close = closest(key, allowed);
                fields.suggested.extend(close);
                self.error_hint(
                    k.pos,
                    format!(
                        "unknown key `{key}` {place} (expected one of: {})",
                        allowed.join(", ")
                    ),
                    close.map_or_else(|| "remove it".into(), |a| format!("did you mean `{a}`?")),
                );
                continue;
            }
            if let Some(first) = seen.get(key.as_str()) {
                self.error_hint(
                    k.pos,
                    format!(
                        "duplicate key `{key}` {place} (first on line {})",
                        first.line
                    ),
                    "keep one of them",
                );
                continue;
            }
            seen.insert(key, k.pos);
            fields.entries.push((key.as_str(), v));
        }
        Some(fields)
    }

    fn required<'n>(
        &mut self,
        f: &Fields<'n>,
        path: &str,
        key: &str,
        hint: &str,
    ) -> Option<&'n Node> {
        let node = f.get(key);
        if node.is_none() && !f.suggested.contains(&key) {
            self.error_hint(f.pos, format!("missing `{key}` in `{path}`"), hint);
        }
        node
    }

    /// A list; null counts as empty.
    fn list<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Seq(items) => Some(items),
            _ if is_null(node) => Some(&[]),
            _ => {
                self.error_hint(
                    node.pos,
                    format!("`{path}` must be a list, found {}", describe(node)),
                    "write one `- item` per line, or `[a, b]`",
                );
                None
            }
        }
    }

    /// A non-empty string. Plain numbers are taken as written (`1.10` stays
    /// `1.10`); booleans and null are type errors.
    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar { text, plain } => {
                let found = describe(node);
                if *plain && (found == "a boolean" || found == "nothing (null)") {
                    self.error_hint(
                        node.pos,
                        format!("`{path}` must be a string, found {found}"),
                        "write a value; quote it if it should be the text `true`, `false` or `null`",
                    );
                    None
                } else if text.is_empty() {
                    self.error(node.pos, format!("`{path}` is empty"));
                    None
                } else {
                    Some(text.clone())
                }
            }
            _ => {
                self.error(
                    node.pos,
                    format!("`{path}` must be a string, found {}", describe(node)),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        if let Kind::Scalar { text, plain: true } = &node.kind {
            match text.as_str() {
                "true" | "True" | "TRUE" => return Some(true),
                "false" | "False" | "FALSE" => return Some(false),
                _ => {}
            }
        }
        self.error_hint(
            node.pos,
            format!("`{path}` must be true or false, found {}", describe(node)),
            "write true or false, without quotes",
        );
        None
    }

    /// A whole number in `min..=max`.
    fn int_in(&mut self, node: &Node, path: &str, min: u64, max: u64, hint: &str) -> Option<u64> {
        let text = match &node.kind {
            Kind::Scalar { text, plain: true } if describe(node) == "an integer" => text,
            _ => {
                let hint = match &node.kind {
                    Kind::Scalar { plain: false, .. } => "write the number without quotes",
                    _ => hint,
                };
                self.error_hint(
                    node.pos,
                    format!("`{path}` must be a whole number, found {}", describe(node)),
                    hint,
                );
                return None;
            }
        };
        match text.strip_prefix('+').unwrap_or(text).parse::<u64>() {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            _ => {
                let range = if max == u64::MAX {
                    format!("at least {min}")
                } else {
                    format!("{min} to {max}")
                };
                self.error_hint(
                    node.pos,
                    format!("`{path}` is {text}, out of range ({range})"),
                    hint,
                );
                None
            }
        }
    }

    fn addr(&mut self, node: &Node, path: &str) -> Option<SocketAddr> {
        let text = self.string(node, path)?;
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error_hint(
                    node.pos,
                    format!("invalid socket address `{text}` in `{path}`"),
                    "write IP:PORT, e.g. 127.0.0.1:8787 or [::1]:8788 (no host names)",
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, path: &str, zero_ok: bool) -> Option<Duration> {
        let text = self.string(node, path)?;
        let hint = "write e.g. 5s, 250ms, 2m, or a whole number of seconds";
        match parse_duration(&text) {
            Some(d) if zero_ok || !d.is_zero() => Some(d),
            Some(_) => {
                self.error_hint(node.pos, format!("`{path}` must be longer than zero"), hint);
                None
            }
            None => {
                self.error_hint(
                    node.pos,
                    format!("invalid duration `{text}` in `{path}`"),
                    hint,
                );
                None
            }
        }
    }
}

// ---- helpers ----

fn is_null(node: &Node) -> bool {
    matches!(&node.kind, Kind::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
}

/// What a node is, for "found ..." in messages (YAML 1.2 core schema for plain scalars).
fn describe(node: &Node) -> &'static str {
    match &node.kind {
        Kind::Map(_) => "a mapping",
        Kind::Seq(_) => "a list",
        Kind::Scalar { plain: false, .. } => "a string",
        Kind::Scalar { text, plain: true } => {
            let t = text.as_str();
            let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
            if is_null(node) {
                "nothing (null)"
            } else if matches!(t, "true" | "True" | "TRUE" | "false" | "False" | "FALSE") {
                "a boolean"
            } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                "an integer"
            } else if t.parse::<f64>().is_ok() {
                "a number"
            } else {
                "a string"
            }
        }
    }
}

/// The allowed name a misspelt one was probably meant to be, if one is close.
fn closest(word: &str, allowed: &[&'static str]) -> Option<&'static str> {
    allowed
        .iter()
        .map(|a| {
            (
                strsim::damerau_levenshtein(&word.to_ascii_lowercase(), a),
                *a,
            )
        })
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

/// The regex crate's reason on one line (its message spans several, with a caret).
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("error: "))
        .map_or_else(
            || {
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            str::to_string,
        )
}

/// Well-known key formats, so a pasted key is caught instead of stored as a name.
/// "both A and B", or "A, B and C".
fn join_and(items: &[String]) -> String {
    match items {
        [a, b] => format!("both {a} and {b}"),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
        [] => String::new(),
    }
}

fn looks_like_key(s: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "sk-",
        "ghp_",
        "gho_",
        "ghs_",
        "github_pat_",
        "xoxb-",
        "xoxp-",
        "AKIA",
        "ASIA",
        "AIza",
    ];
    PREFIXES.iter().any(|p| s.starts_with(p)) && s.len() >= 16
}

pub(super) fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `5s`, `250ms`, `2m`, `1h`, or a whole number of seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// `ADDRESS/LENGTH` (or a bare address: one host) with no bits set past the prefix.
pub(super) fn parse_prefix(s: &str) -> Result<IpPrefix, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IP address"))?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("the prefix length must be 0 to {max}"))?,
    };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u32::from(a) & mask).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u128::from(a) & mask).to_be_bytes())
        }
    };
    if network != addr {
        return Err(format!(
            "bits are set past the first {len}; did you mean {network}/{len}?"
        ));
    }
    Ok(IpPrefix { addr, len })
}
