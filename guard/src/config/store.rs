//! `secrets`: where `store:` references live. Absent, they live in the
//! local encrypted store of the data dir; `secrets.store` with
//! `backend: vault` puts them in a central Vault-compatible KV store
//! (connected mode).

use std::path::PathBuf;
use std::time::Duration;

/// `secrets` (default: no central store).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretsSettings {
    /// `secrets.store`: the central store, when set.
    pub store: Option<VaultStoreConfig>,
}

/// `secrets.store` with `backend: vault`: HashiCorp Vault's KV HTTP API
/// (version 1 or 2), also spoken by OpenBao and other compatible servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultStoreConfig {
    /// `address`: `https://vault.example:8200` (plain `http://` only on loopback).
    pub address: String,
    /// `mount`: the KV engine's mount path (default `secret`).
    pub mount: String,
    /// `prefix`: the folder under the mount holding kt's secrets (default
    /// `kt`; empty: the mount's root).
    pub prefix: String,
    /// `kv_version`: 1 or 2 (default 2, Vault's default `secret/` engine).
    pub kv_version: KvVersion,
    /// `auth`: how kt logs in (default: a token from `VAULT_TOKEN`).
    pub auth: VaultAuth,
    /// `ca_file`: PEM roots to verify the server with, on top of the system
    /// roots (and `SSL_CERT_FILE`).
    pub ca_file: Option<PathBuf>,
    /// `namespace`: sent as `X-Vault-Namespace` (Vault Enterprise, OpenBao).
    pub namespace: Option<String>,
    /// `refresh`: how often the gateway reads every value again (default 30 s).
    pub refresh: Duration,
    /// `max_stale`: how long the last good value is served while the store
    /// cannot be read (default 1 h); past it, a required target fails closed.
    pub max_stale: Duration,
    /// `timeout`: one request's connect + answer limit (default 5 s).
    pub timeout: Duration,
}

/// Default `secrets.store.refresh`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
/// Default `secrets.store.max_stale`.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(3600);
/// Default `secrets.store.timeout`.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// The KV engine's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvVersion {
    /// KV v1: `GET <mount>/<path>`, `{"data": {...}}`.
    V1,
    /// KV v2: `GET <mount>/data/<path>`, `{"data": {"data": {...}}}`, versioned.
    V2,
}

/// `secrets.store.auth`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaultAuth {
    /// `token_file: PATH` (re-read when it changes); `None`: the
    /// `VAULT_TOKEN` environment variable of the guard.
    Token {
        /// The file holding the token.
        file: Option<PathBuf>,
    },
    /// `approle: {role_id_file, secret_id_file, mount}`: logs in with the
    /// AppRole method and logs in again before the token expires.
    AppRole {
        /// File holding the role id.
        role_id_file: PathBuf,
        /// File holding the secret id.
        secret_id_file: PathBuf,
        /// The auth method's mount (default `approle`).
        mount: String,
    },
}
