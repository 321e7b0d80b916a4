//! `secrets:` — the central store section (kept apart from the other
//! sections' converters; same helpers, same messages).

use std::path::PathBuf;

use super::super::store::{
    DEFAULT_MAX_STALE, DEFAULT_REFRESH, DEFAULT_STORE_TIMEOUT, KvVersion, SecretsSettings,
    VaultAuth, VaultStoreConfig,
};
use super::Cx;
use crate::config::tree::Node;

impl Cx {
    pub(super) fn secrets(&mut self, node: Option<&Node>) -> SecretsSettings {
        let mut out = SecretsSettings::default();
        let Some(f) = node.and_then(|n| self.mapping(n, "secrets", &["store"])) else {
            return out;
        };
        if let Some(n) = f.get("store")
            && !super::is_null(n)
        {
            out.store = self.vault_store(n);
        }
        out
    }

    fn vault_store(&mut self, node: &Node) -> Option<VaultStoreConfig> {
        const KEYS: &[&str] = &[
            "backend",
            "address",
            "mount",
            "prefix",
            "kv_version",
            "auth",
            "ca_file",
            "namespace",
            "refresh",
            "max_stale",
            "timeout",
        ];
        let path = "secrets.store";
        let f = self.mapping(node, path, KEYS)?;
        let backend = self
            .required(&f, path, "backend", "add `backend: vault`")
            .and_then(|n| {
                let v = self.string(n, "secrets.store.backend")?;
                if v == "vault" {
                    Some(())
                } else {
                    self.error_hint(
                        n.pos,
                        format!("unknown secret store backend `{v}` in `secrets.store.backend`"),
                        "the central store speaks Vault's KV API: write `backend: vault` \
                         (OpenBao and other compatible servers work too); leave `secrets.store` \
                         out for the local store",
                    );
                    None
                }
            });
        let address = self
            .required(
                &f,
                path,
                "address",
                "add `address: https://vault.example.com:8200`",
            )
            .and_then(|n| {
                let v = self.string(n, "secrets.store.address")?;
                match vault_address(&v) {
                    Ok(a) => Some(a),
                    Err(why) => {
                        self.error_hint(
                            n.pos,
                            format!("invalid `secrets.store.address` `{v}`: {why}"),
                            "write https://HOST:PORT (http:// only for a server on loopback)",
                        );
                        None
                    }
                }
            });
        let mut mount = "secret".to_string();
        if let Some(n) = f.get("mount")
            && let Some(v) = self.string(n, "secrets.store.mount")
        {
            match vault_path(&v) {
                Some(p) if !p.is_empty() => mount = p,
                _ => self.error_hint(
                    n.pos,
                    format!("invalid `secrets.store.mount` `{v}`"),
                    "the KV engine's mount path, e.g. `secret` or `teams/ai/kv`",
                ),
            }
        }
        let mut prefix = "kt".to_string();
        if let Some(n) = f.get("prefix") {
            if super::is_null(n) {
                prefix = String::new();
            } else if let Some(v) = self.string(n, "secrets.store.prefix") {
                match vault_path(&v) {
                    Some(p) => prefix = p,
                    None => self.error_hint(
                        n.pos,
                        format!("invalid `secrets.store.prefix` `{v}`"),
                        "a path under the mount, e.g. `kt` or `ci/kt`",
                    ),
                }
            }
        }
        let mut kv_version = KvVersion::V2;
        if let Some(n) = f.get("kv_version")
            && let Some(v) = self.int_in(
                n,
                "secrets.store.kv_version",
                1,
                2,
                "1 or 2 (`vault secrets list -detailed` shows the engine's version)",
            )
        {
            kv_version = if v == 1 { KvVersion::V1 } else { KvVersion::V2 };
        }
        let auth = match f.get("auth") {
            Some(n) if !super::is_null(n) => self.vault_auth(n),
            _ => Some(VaultAuth::Token { file: None }),
        };
        let ca_file = f
            .get("ca_file")
            .and_then(|n| self.string(n, "secrets.store.ca_file"))
            .map(|p| self.base.join(p));
        let namespace = f
            .get("namespace")
            .and_then(|n| self.string(n, "secrets.store.namespace"));
        let mut refresh = DEFAULT_REFRESH;
        if let Some(d) = f
            .get("refresh")
            .and_then(|n| self.duration(n, "secrets.store.refresh", false))
        {
            refresh = d;
        }
        let mut max_stale = DEFAULT_MAX_STALE;
        if let Some(n) = f.get("max_stale")
            && let Some(d) = self.duration(n, "secrets.store.max_stale", false)
        {
            if d < refresh {
                self.error_hint(
                    n.pos,
                    "`secrets.store.max_stale` is shorter than `secrets.store.refresh`",
                    "max_stale is how long the last good value may be served while the store \
                     is unreachable: make it at least one refresh interval",
                );
            }
            max_stale = d;
        }
        let mut timeout = DEFAULT_STORE_TIMEOUT;
        if let Some(d) = f
            .get("timeout")
            .and_then(|n| self.duration(n, "secrets.store.timeout", false))
        {
            timeout = d;
        }
        backend?;
        Some(VaultStoreConfig {
            address: address?,
            mount,
            prefix,
            kv_version,
            auth: auth?,
            ca_file,
            namespace,
            refresh,
            max_stale,
            timeout,
        })
    }

    fn vault_auth(&mut self, node: &Node) -> Option<VaultAuth> {
        let path = "secrets.store.auth";
        let f = self.mapping(node, path, &["token_file", "approle"])?;
        match (f.get("token_file"), f.get("approle")) {
            (Some(_), Some(a)) => {
                self.error_hint(
                    a.pos,
                    "`secrets.store.auth` has both `token_file` and `approle`",
                    "keep one of them",
                );
                None
            }
            (Some(t), None) => {
                let file = self.string(t, "secrets.store.auth.token_file")?;
                Some(VaultAuth::Token {
                    file: Some(self.base.join(file)),
                })
            }
            (None, Some(a)) => {
                let p = "secrets.store.auth.approle";
                let g = self.mapping(a, p, &["role_id_file", "secret_id_file", "mount"])?;
                let file = |cx: &mut Cx, key: &str| -> Option<PathBuf> {
                    let n = cx.required(&g, p, key, &format!("add `{key}: PATH`"))?;
                    let v = cx.string(n, &format!("{p}.{key}"))?;
                    Some(cx.base.join(v))
                };
                let role_id_file = file(self, "role_id_file");
                let secret_id_file = file(self, "secret_id_file");
                let mut mount = "approle".to_string();
                if let Some(n) = g.get("mount")
                    && let Some(v) = self.string(n, &format!("{p}.mount"))
                {
                    match vault_path(&v) {
                        Some(m) if !m.is_empty() => mount = m,
                        _ => self.error(n.pos, format!("invalid `{p}.mount` `{v}`")),
                    }
                }
                Some(VaultAuth::AppRole {
                    role_id_file: role_id_file?,
                    secret_id_file: secret_id_file?,
                    mount,
                })
            }
            (None, None) => Some(VaultAuth::Token { file: None }),
        }
    }
}

/// The server's base address without a trailing slash. `https://` always;
/// `http://` only for a loopback address (a test server, a local agent):
/// the token and every value cross this connection.
fn vault_address(text: &str) -> Result<String, &'static str> {
    let uri: http::Uri = text.parse().map_err(|_| "not a URL")?;
    let host = uri.host().ok_or("no host")?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            let h = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err("plain http:// would send the token unencrypted; use https://");
            }
        }
        _ => return Err("the scheme must be https://"),
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err("give the server's address only (no path): kt adds /v1/...");
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// A path under the API: segments of letters, digits, `-`, `_`, `.`,
/// joined by `/`; leading and trailing slashes dropped. `None` when a
/// segment is empty, `.`/`..`, or has another character.
fn vault_path(text: &str) -> Option<String> {
    let t = text.trim_matches('/');
    if t.is_empty() {
        return Some(String::new());
    }
    t.split('/')
        .all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
        .then(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_https_unless_loopback_and_carry_no_path() {
        assert_eq!(
            vault_address("https://vault.example:8200/").unwrap(),
            "https://vault.example:8200"
        );
        assert!(vault_address("http://127.0.0.1:8200").is_ok());
        assert!(vault_address("http://[::1]:8200").is_ok());
        assert!(
            vault_address("http://vault.example:8200")
                .unwrap_err()
                .contains("unencrypted")
        );
        assert!(vault_address("https://v:8200/v1/secret").is_err());
        assert!(vault_address("ftp://v").is_err());
    }

    const TARGETS: &str = "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {store: K}\n";

    fn parse(extra: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
        crate::config::parse(
            &format!("{TARGETS}{extra}"),
            std::path::Path::new("/etc/kt/policy.yaml"),
        )
    }

    #[test]
    fn a_vault_store_loads_with_defaults_and_every_key() {
        let c = parse(
            "secrets:\n  store:\n    backend: vault\n    address: https://vault.example:8200\n",
        )
        .unwrap();
        let s = c.secrets.store.unwrap();
        assert_eq!(s.address, "https://vault.example:8200");
        assert_eq!((s.mount.as_str(), s.prefix.as_str()), ("secret", "kt"));
        assert_eq!(s.kv_version, KvVersion::V2);
        assert_eq!(s.auth, VaultAuth::Token { file: None });
        assert_eq!(
            (s.refresh, s.max_stale),
            (DEFAULT_REFRESH, DEFAULT_MAX_STALE)
        );

        let c = parse(
            "secrets:\n  store:\n    backend: vault\n    address: https://v:8200\n    mount: kv\n    \
             prefix: ci/kt\n    kv_version: 1\n    ca_file: ca.pem\n    namespace: team-a\n    \
             refresh: 10s\n    max_stale: 15m\n    timeout: 2s\n    auth:\n      approle:\n        \
             role_id_file: role\n        secret_id_file: /run/secret\n",
        )
        .unwrap();
        let s = c.secrets.store.unwrap();
        assert_eq!((s.mount.as_str(), s.prefix.as_str()), ("kv", "ci/kt"));
        assert_eq!(s.kv_version, KvVersion::V1);
        assert_eq!(
            s.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/kt/ca.pem"))
        );
        assert_eq!(s.namespace.as_deref(), Some("team-a"));
        assert_eq!(s.max_stale, std::time::Duration::from_secs(900));
        assert_eq!(
            s.auth,
            VaultAuth::AppRole {
                role_id_file: "/etc/kt/role".into(),
                secret_id_file: "/run/secret".into(),
                mount: "approle".into(),
            }
        );
        // No section: the local store, as before.
        assert_eq!(parse("").unwrap().secrets.store, None);
    }

    #[test]
    fn every_problem_of_the_section_is_reported_with_its_position() {
        let err = parse(
            "secrets:\n  store:\n    backend: consul\n    address: http://vault.example\n    \
             kv_version: 3\n    refresh: 1m\n    max_stale: 10s\n    bogus: 1\n    auth:\n      \
             token_file: t\n      approle: {role_id_file: r}\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for (line, needle) in [
            (13, "unknown key `bogus` in `secrets.store`"),
            (8, "unknown secret store backend `consul`"),
            (9, "would send the token unencrypted"),
            (10, "`secrets.store.kv_version` is 3, out of range (1 to 2)"),
            (
                12,
                "`secrets.store.max_stale` is shorter than `secrets.store.refresh`",
            ),
            (16, "has both `token_file` and `approle`"),
        ] {
            assert!(
                text.contains(&format!("/etc/kt/policy.yaml:{line}:")) && text.contains(needle),
                "line {line}, {needle}: {text}"
            );
        }
        let err = parse("secrets:\n  store:\n    backend: vault\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("missing `address` in `secrets.store`"),
            "{err}"
        );
        let err = parse("secrets:\n  vault: {}\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown key `vault` in `secrets`"),
            "{err}"
        );
    }

    #[test]
    fn paths_are_plain_segments() {
        assert_eq!(vault_path("/kt/ci/").as_deref(), Some("kt/ci"));
        assert_eq!(vault_path("").as_deref(), Some(""));
        for bad in ["a//b", "a/../b", "a b", "a?b", "."] {
            assert_eq!(vault_path(bad), None, "{bad}");
        }
    }
}
