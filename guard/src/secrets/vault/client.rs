//! The HTTP side of the Vault KV API: one blocking request at a time
//! (`ureq` over rustls with ring, as the gateway's upstream TLS), server
//! verified against the system roots (and `SSL_CERT_FILE`) plus
//! `secrets.store.ca_file`. No proxy: `HTTPS_PROXY` in kt's environment
//! may well point at kt itself.
//!
//! Each secret is one KV entry `<mount>/<prefix>/<NAME>` with one field,
//! `value` (`{"value": "sk-..."}`), so `vault kv get -field=value` and
//! `vault kv put ... value=-` work on the same entries.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::VaultError;
use super::auth::Auth;
use crate::config::{KvVersion, VaultStoreConfig};
use crate::secrets::{EntryMeta, SecretValue};

/// Largest answer read from the server (a LIST of many names fits easily).
const MAX_BODY: u64 = 4 * 1024 * 1024;

/// The field every entry keeps its value in.
pub const VALUE_FIELD: &str = "value";

/// A KV client for one mount and prefix.
pub struct Client {
    agent: ureq::Agent,
    address: String,
    namespace: Option<String>,
    mount: String,
    prefix: String,
    kv: KvVersion,
    auth: Auth,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address)
            .field("mount", &self.mount)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// One answer: status and parsed JSON body (`Null` when empty).
pub(super) struct Answer {
    status: u16,
    body: Value,
}

/// What a read found.
pub enum Read {
    /// A usable value.
    Value(SecretValue),
    /// No entry by that name (404, or a KV v2 entry deleted or destroyed).
    Absent,
}

impl Client {
    /// A client for `cfg`. Reads the CA file now (a missing or bad file is
    /// an error here, not at the first refresh).
    pub fn new(cfg: &VaultStoreConfig) -> Result<Client, VaultError> {
        let mut roots: Vec<ureq::tls::Certificate<'static>> =
            rustls_native_certs::load_native_certs()
                .certs
                .iter()
                .map(|der| ureq::tls::Certificate::from_der(der).to_owned())
                .collect();
        if let Some(ca) = &cfg.ca_file {
            use rustls_pki_types::pem::PemObject;
            let pem = std::fs::read(ca).map_err(|e| VaultError::CaFile {
                path: ca.clone(),
                detail: e.to_string(),
            })?;
            let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| VaultError::CaFile {
                    path: ca.clone(),
                    detail: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(VaultError::CaFile {
                    path: ca.clone(),
                    detail: "no PEM certificate in it".into(),
                });
            }
            roots.extend(
                certs
                    .iter()
                    .map(|der| ureq::tls::Certificate::from_der(der).to_owned()),
            );
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .unversioned_rustls_crypto_provider(crate::ca::crypto_provider())
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(None)
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(cfg.timeout))
            .user_agent(concat!("kt/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Client {
            agent,
            address: cfg.address.clone(),
            namespace: cfg.namespace.clone(),
            mount: cfg.mount.clone(),
            prefix: cfg.prefix.clone(),
            kv: cfg.kv_version,
            auth: Auth::new(&cfg.auth),
        })
    }

    /// The server's address, for messages.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `<mount>/<prefix>/NAME` as written in `vault kv` commands.
    pub fn entry_path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            format!("{}/{name}", self.mount)
        } else {
            format!("{}/{}/{name}", self.mount, self.prefix)
        }
    }

    fn api_path(&self, kind: &str, name: &str) -> String {
        let tail = if self.prefix.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            format!("{}/", self.prefix)
        } else {
            format!("{}/{name}", self.prefix)
        };
        match self.kv {
            KvVersion::V1 => format!("/v1/{}/{tail}", self.mount),
            KvVersion::V2 => format!("/v1/{}/{kind}/{tail}", self.mount),
        }
    }

    /// Reads `NAME`. An entry without a usable `value` field (missing,
    /// empty, not text, several lines) is an error, never a value.
    pub fn read(&self, name: &str) -> Result<Read, VaultError> {
        self.read_version(name, None).map(|(r, _)| r)
    }

    /// [`Client::read`] of one version (KV v2; `None`: the current one),
    /// with the version read (KV v2 only).
    pub fn read_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<(Read, Option<u64>), VaultError> {
        let mut path = self.api_path("data", name);
        if let Some(v) = version.filter(|_| self.kv == KvVersion::V2) {
            path.push_str(&format!("?version={v}"));
        }
        let a = self.call("GET", &path, None)?;
        let read_version = a
            .body
            .get("data")
            .and_then(|d| d.get("metadata"))
            .and_then(|m| m.get("version"))
            .and_then(Value::as_u64);
        self.parse_read(name, &path, &a).map(|r| (r, read_version))
    }

    /// Whether entries keep earlier versions (KV v2).
    pub fn versioned(&self) -> bool {
        self.kv == KvVersion::V2
    }

    fn parse_read(&self, name: &str, path: &str, a: &Answer) -> Result<Read, VaultError> {
        match a.status {
            200 => {}
            404 => return Ok(Read::Absent),
            s => return Err(self.status_error("read", path, s, &a.body)),
        }
        let data = match self.kv {
            KvVersion::V1 => a.body.get("data"),
            KvVersion::V2 => a.body.get("data").and_then(|d| d.get("data")),
        };
        let malformed = |problem: &'static str| VaultError::Malformed {
            address: self.address.clone(),
            entry: self.entry_path(name),
            problem,
        };
        let Some(data) = data.filter(|d| !d.is_null()) else {
            // KV v2 keeps a deleted version's metadata: absent on purpose.
            return Ok(Read::Absent);
        };
        let Some(field) = data.get(VALUE_FIELD) else {
            return Err(malformed("it has no `value` field"));
        };
        let Some(text) = field.as_str() else {
            return Err(malformed("its `value` field is not text"));
        };
        let value = SecretValue::new(text);
        match crate::secrets::validate_value(&value) {
            Ok(()) => Ok(Read::Value(value)),
            Err(crate::secrets::SecretsError::EmptyValue) => Err(malformed("its value is empty")),
            Err(crate::secrets::SecretsError::ValueTooLong { .. }) => {
                Err(malformed("its value is over 16 KiB"))
            }
            Err(_) => Err(malformed(
                "its value has a line break or another control character",
            )),
        }
    }

    /// Writes `NAME` (creating or replacing it).
    pub fn write(&self, name: &str, value: &SecretValue) -> Result<(), VaultError> {
        let path = self.api_path("data", name);
        let fields = serde_json::json!({ VALUE_FIELD: value.expose() });
        let body = match self.kv {
            KvVersion::V1 => fields,
            KvVersion::V2 => serde_json::json!({ "data": fields }),
        };
        let a = self.call("POST", &path, Some(body.to_string()))?;
        match a.status {
            200 | 204 => Ok(()),
            s => Err(self.status_error("write", &path, s, &a.body)),
        }
    }

    /// Deletes `NAME` with every version (KV v2: its metadata).
    pub fn delete(&self, name: &str) -> Result<(), VaultError> {
        let path = self.api_path("metadata", name);
        let a = self.call("DELETE", &path, None)?;
        match a.status {
            200 | 204 | 404 => Ok(()),
            s => Err(self.status_error("delete", &path, s, &a.body)),
        }
    }

    /// The names under the prefix (folders left out).
    pub fn list(&self) -> Result<Vec<String>, VaultError> {
        let path = format!("{}?list=true", self.api_path("metadata", ""));
        let a = self.call("GET", &path, None)?;
        match a.status {
            200 => {}
            404 => return Ok(Vec::new()),
            s => return Err(self.status_error("list", &path, s, &a.body)),
        }
        let keys = a
            .body
            .get("data")
            .and_then(|d| d.get("keys"))
            .and_then(Value::as_array)
            .ok_or_else(|| VaultError::Malformed {
                address: self.address.clone(),
                entry: self.entry_path(""),
                problem: "the listing has no `data.keys`",
            })?;
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(Value::as_str)
            .filter(|k| !k.ends_with('/') && crate::secrets::validate_name(k).is_ok())
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Created and updated times of `NAME` (KV v2 metadata; KV v1 keeps
    /// none: `None`).
    pub fn meta(&self, name: &str) -> Result<Option<EntryMeta>, VaultError> {
        if self.kv == KvVersion::V1 {
            return Ok(None);
        }
        let path = self.api_path("metadata", name);
        let a = self.call("GET", &path, None)?;
        match a.status {
            200 => {}
            404 => return Ok(None),
            s => return Err(self.status_error("read metadata of", &path, s, &a.body)),
        }
        let d = a.body.get("data");
        let time = |key: &str| {
            d.and_then(|d| d.get(key))
                .and_then(Value::as_str)
                .and_then(|t| humantime::parse_rfc3339_weak(t.get(..19)?).ok())
        };
        Ok(Some(EntryMeta {
            name: name.to_string(),
            created: time("created_time").unwrap_or(SystemTime::UNIX_EPOCH),
            updated: time("updated_time").unwrap_or(SystemTime::UNIX_EPOCH),
        }))
    }

    /// One request with the current token; on 403 the token is read (or
    /// logged in) again once, since it may have been rotated meanwhile.
    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<Answer, VaultError> {
        let token = self.auth.token(self)?;
        let a = self.send(method, path, body.as_deref(), Some(&token))?;
        if a.status == 403 && self.auth.renew_after_denial(&token) {
            let fresh = self.auth.token(self)?;
            return self.send(method, path, body.as_deref(), Some(&fresh));
        }
        Ok(a)
    }

    /// One request; `token` `None` for logins.
    pub(super) fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&SecretValue>,
    ) -> Result<Answer, VaultError> {
        let url = format!("{}{path}", self.address);
        let unreachable = |e: ureq::Error| VaultError::Unreachable {
            address: self.address.clone(),
            detail: e.to_string(),
        };
        let mut response = match (method, body) {
            ("GET", _) => self.with_headers(self.agent.get(&url), token).call(),
            ("DELETE", _) => self.with_headers(self.agent.delete(&url), token).call(),
            (_, b) => self
                .with_headers(self.agent.post(&url), token)
                .header("Content-Type", "application/json")
                .send(b.unwrap_or("{}")),
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(unreachable)?;
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|_| VaultError::Malformed {
                address: self.address.clone(),
                entry: path.to_string(),
                problem: "the answer is not JSON",
            })?
        };
        Ok(Answer { status, body })
    }

    fn with_headers<B>(
        &self,
        mut req: ureq::RequestBuilder<B>,
        token: Option<&SecretValue>,
    ) -> ureq::RequestBuilder<B> {
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t.expose());
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        req.header("X-Vault-Request", "true")
    }

    fn status_error(&self, op: &'static str, path: &str, status: u16, body: &Value) -> VaultError {
        // Vault's own messages name paths and policies, never values; bounded anyway.
        let mut errors: String = body
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        if errors.len() > 300 {
            let mut end = 300;
            while !errors.is_char_boundary(end) {
                end -= 1;
            }
            errors.truncate(end);
        }
        let path = path.split('?').next().unwrap_or(path).to_string();
        if status == 403 {
            VaultError::PermissionDenied {
                address: self.address.clone(),
                op,
                path,
            }
        } else {
            VaultError::Status {
                address: self.address.clone(),
                op,
                path,
                status,
                errors,
            }
        }
    }
}

impl Answer {
    pub(super) fn status(&self) -> u16 {
        self.status
    }
    pub(super) fn body(&self) -> &Value {
        &self.body
    }
}

/// How long a token from a login may be used: its lease, less a margin
/// so a refresh never races its expiry.
pub(super) fn usable_for(lease_seconds: u64) -> Duration {
    let lease = Duration::from_secs(lease_seconds);
    lease.saturating_sub(lease / 10)
}
