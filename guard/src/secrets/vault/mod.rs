//! The central store: secrets in a Vault-compatible KV engine (HashiCorp
//! Vault, OpenBao; KV version 1 or 2), `secrets.store` with
//! `backend: vault`.
//!
//! - `client`: the KV HTTP API (read, write, delete, list, metadata).
//! - `auth`: the token (file, `VAULT_TOKEN`) or an AppRole login.
//! - this file: [`VaultStore`], a [`SecretStore`] in two modes. `live` (the
//!   `kt secrets` commands) asks the server every time. `cached` (the
//!   gateway) answers from memory only and is filled by
//!   [`VaultStore::refresh`], which the gateway runs every
//!   `secrets.store.refresh` and on `kt gateway reload`: values are held in
//!   memory, never written to disk by kt.
//!
//! A refresh that cannot read a value (server down, permission denied, an
//! empty or malformed entry) keeps the last good value and says so; once
//! no read has confirmed it for longer than `max_stale`, the value is
//! [expired](VaultError::Expired): a required target fails closed and an
//! optional one is skipped, until a read succeeds again.

mod auth;
mod client;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub use client::VALUE_FIELD;
use client::{Client, Read};

use super::{EntryMeta, PutOutcome, SecretStore, SecretValue, SecretsError, Source};
use crate::config::VaultStoreConfig;

/// What went wrong talking to the central store. Never holds a value or
/// a token.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// No answer: connection refused, TLS failure, timeout.
    #[error("secret store (vault) at {address} is unreachable: {detail}")]
    Unreachable {
        /// The server.
        address: String,
        /// The transport's error.
        detail: String,
    },
    /// 403: the token may not do this.
    #[error(
        "secret store (vault) at {address} denied permission to {op} {path} (403): \
         the token's policy must allow it, or the token expired"
    )]
    PermissionDenied {
        /// The server.
        address: String,
        /// What kt tried.
        op: &'static str,
        /// The API path.
        path: String,
    },
    /// Another unexpected status.
    #[error("secret store (vault) at {address}: {op} {path} answered HTTP {status}: {errors}")]
    Status {
        /// The server.
        address: String,
        /// What kt tried.
        op: &'static str,
        /// The API path.
        path: String,
        /// The status.
        status: u16,
        /// Vault's `errors` (paths and policy names, never values).
        errors: String,
    },
    /// An answer without a usable value.
    #[error("secret store (vault) at {address}: {entry} holds no usable value: {problem}")]
    Malformed {
        /// The server.
        address: String,
        /// The entry (`mount/prefix/NAME`).
        entry: String,
        /// What is wrong (never the content).
        problem: &'static str,
    },
    /// No token: `auth` not set and `VAULT_TOKEN` empty.
    #[error(
        "no token for the secret store (vault): set VAULT_TOKEN in kt's environment, or \
         `secrets.store.auth.token_file` / `approle` in the config"
    )]
    NoToken,
    /// A token, role id or secret id file that cannot be used.
    #[error("secret store (vault) {what} {}: {detail}", path.display())]
    Credential {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why (never its content).
        detail: String,
    },
    /// An AppRole login that failed.
    #[error(
        "secret store (vault) at {address}: AppRole login at auth/{mount} failed (HTTP {status}); \
         check the role id and secret id files"
    )]
    Login {
        /// The server.
        address: String,
        /// The auth mount.
        mount: String,
        /// The status.
        status: u16,
    },
    /// `ca_file` cannot be used.
    #[error("secret store (vault) ca_file {}: {detail}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A name the gateway has no value of yet, because reads fail.
    #[error("{problem}")]
    NeverRead {
        /// The secret's name.
        name: String,
        /// The latest failure.
        problem: String,
    },
    /// The last good value has not been confirmed for longer than `max_stale`.
    #[error(
        "secret store (vault) at {address} has not confirmed {name} for {} (max_stale {}): \
         the last good value is no longer used; last problem: {last_problem}",
        humantime::format_duration(*unconfirmed),
        humantime::format_duration(*max_stale)
    )]
    Expired {
        /// The server.
        address: String,
        /// The secret's name.
        name: String,
        /// Since the last successful read.
        unconfirmed: Duration,
        /// The limit.
        max_stale: Duration,
        /// The latest failure.
        last_problem: String,
    },
}

/// One cached secret.
#[derive(Clone)]
struct Entry {
    /// The last good value (`None`: the server said there is none).
    value: Option<SecretValue>,
    /// When a read last confirmed `value`.
    confirmed: Instant,
    /// The latest read's problem, while reads fail.
    problem: Option<String>,
    /// Since when reads fail.
    failing_since: Option<SystemTime>,
    /// Past `max_stale` as of the last refresh (expiry is reported once,
    /// when it begins and when it ends).
    expired: bool,
}

/// What one refresh found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Names whose value changed, appeared or went away.
    pub changed: Vec<String>,
    /// Names whose last good value just passed `max_stale`, or came back.
    pub expiry_changed: Vec<String>,
    /// Names that could not be read this time (the old value kept).
    pub failed: Vec<String>,
    /// The first problem, for the log.
    pub problem: Option<String>,
}

impl Refreshed {
    /// Whether the gateway must rebuild its keys.
    pub fn needs_reload(&self) -> bool {
        !self.changed.is_empty() || !self.expiry_changed.is_empty()
    }
}

/// The store's health, for `kt secrets status`, metrics and the log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoreHealth {
    /// The server.
    pub address: String,
    /// The last refresh read everything.
    pub up: bool,
    /// When a refresh last read everything (ms since the epoch).
    pub last_success_ms: Option<i64>,
    /// Names served from a value no read confirmed lately.
    pub stale: Vec<String>,
    /// Names past `max_stale` (not served).
    pub expired: Vec<String>,
    /// Refreshes that failed since start.
    pub failed_refreshes: u64,
    /// The latest problem.
    pub last_problem: Option<String>,
}

#[derive(Default)]
struct Counters {
    last_success: Option<SystemTime>,
    failed_refreshes: u64,
    last_problem: Option<String>,
    up: bool,
}

/// Secrets in Vault's KV engine. See the module docs for the two modes.
pub struct VaultStore {
    client: Client,
    cached: bool,
    max_stale: Duration,
    entries: Mutex<BTreeMap<String, Entry>>,
    counters: Mutex<Counters>,
    /// Names seen in the last listing (`entries()` in cached mode).
    listed: Mutex<BTreeSet<String>>,
    /// Cached mode: the value each name had before its current one (KV v2
    /// keeps it as the previous version; a change seen while running
    /// remembers it), so events still recognise an old key after a
    /// rotation, also after a restart.
    previous: Mutex<BTreeMap<String, SecretValue>>,
}

impl std::fmt::Debug for VaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultStore")
            .field("client", &self.client)
            .field("cached", &self.cached)
            .finish_non_exhaustive()
    }
}

fn ms_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl VaultStore {
    /// A store asking the server on every call (the `kt secrets` commands).
    pub fn live(cfg: &VaultStoreConfig) -> Result<VaultStore, VaultError> {
        Self::new(cfg, false)
    }

    /// A store answering from memory, filled by [`VaultStore::refresh`]
    /// (the gateway). A name asked for before any refresh read it is read
    /// then.
    pub fn cached(cfg: &VaultStoreConfig) -> Result<VaultStore, VaultError> {
        Self::new(cfg, true)
    }

    fn new(cfg: &VaultStoreConfig, cached: bool) -> Result<VaultStore, VaultError> {
        Ok(VaultStore {
            client: Client::new(cfg)?,
            cached,
            max_stale: cfg.max_stale,
            entries: Mutex::new(BTreeMap::new()),
            counters: Mutex::new(Counters::default()),
            listed: Mutex::new(BTreeSet::new()),
            previous: Mutex::new(BTreeMap::new()),
        })
    }

    /// The server's address.
    pub fn address(&self) -> &str {
        self.client.address()
    }

    /// Where `name` lives, as `vault kv` writes it (`secret/kt/NAME`).
    pub fn entry_path(&self, name: &str) -> String {
        self.client.entry_path(name)
    }

    /// Reads every name under the prefix and every name in `wanted` (the
    /// references of the config being served) into memory. Blocking: run
    /// it off the async workers.
    pub fn refresh(&self, wanted: &[String]) -> Refreshed {
        let mut out = Refreshed::default();
        let mut names: BTreeSet<String> = wanted.iter().cloned().collect();
        let listing = self.client.list();
        match &listing {
            Ok(listed) => {
                names.extend(listed.iter().cloned());
                *lock(&self.listed) = listed.iter().cloned().collect();
            }
            Err(e) => {
                out.problem = Some(e.to_string());
                // Keep refreshing what is known.
                names.extend(lock(&self.entries).keys().cloned());
            }
        }
        for name in &names {
            let known = lock(&self.entries).get(name).and_then(|e| e.value.clone());
            let read = self.client.read_version(name, None);
            let version = read.as_ref().ok().and_then(|(_, v)| *v);
            let read = read.map(|(r, _)| r);
            let now = match &read {
                Ok(Read::Value(v)) => Some(v.clone()),
                _ => None,
            };
            self.apply(name, read, &mut out);
            if !self.cached {
                continue;
            }
            match (known, now) {
                // Seen to change: the value before is the previous one.
                (Some(old), Some(new)) if old != new => {
                    lock(&self.previous).insert(name.clone(), old);
                }
                // First read: ask the engine for the version before (KV v2).
                (None, Some(_))
                    if self.client.versioned() && !lock(&self.previous).contains_key(name) =>
                {
                    if let Some(v) = version.filter(|v| *v > 1)
                        && let Ok((Read::Value(old), _)) =
                            self.client.read_version(name, Some(v - 1))
                    {
                        lock(&self.previous).insert(name.clone(), old);
                    }
                }
                _ => {}
            }
        }
        let mut c = lock(&self.counters);
        c.up = out.failed.is_empty() && listing.is_ok();
        if c.up {
            c.last_success = Some(SystemTime::now());
            c.last_problem = None;
        } else {
            c.failed_refreshes += 1;
            c.last_problem.clone_from(&out.problem);
        }
        out
    }

    fn apply(&self, name: &str, read: Result<Read, VaultError>, out: &mut Refreshed) {
        let mut entries = lock(&self.entries);
        let now = Instant::now();
        let before = entries.get(name).cloned();
        let was_expired = before.as_ref().is_some_and(|e| e.expired);
        match read {
            Ok(r) => {
                let value = match r {
                    Read::Value(v) => Some(v),
                    Read::Absent => None,
                };
                if before.as_ref().map(|e| &e.value) != Some(&value)
                    && (before.is_some() || value.is_some())
                {
                    out.changed.push(name.to_string());
                }
                if was_expired {
                    out.expiry_changed.push(name.to_string());
                }
                entries.insert(
                    name.to_string(),
                    Entry {
                        value,
                        confirmed: now,
                        problem: None,
                        failing_since: None,
                        expired: false,
                    },
                );
            }
            Err(e) => {
                let text = e.to_string();
                out.failed.push(name.to_string());
                if out.problem.is_none() {
                    out.problem = Some(text.clone());
                }
                let entry = entries.entry(name.to_string()).or_insert_with(|| Entry {
                    value: None,
                    // Never read: nothing to serve, nothing stale.
                    confirmed: now,
                    problem: None,
                    failing_since: None,
                    expired: false,
                });
                entry.problem = Some(text);
                entry.failing_since.get_or_insert_with(SystemTime::now);
                let now_expired = self.expired(entry);
                if now_expired != was_expired {
                    entry.expired = now_expired;
                    out.expiry_changed.push(name.to_string());
                }
            }
        }
    }

    fn expired(&self, e: &Entry) -> bool {
        e.value.is_some() && e.problem.is_some() && e.confirmed.elapsed() > self.max_stale
    }

    /// How the store is doing.
    pub fn health(&self) -> StoreHealth {
        let entries = lock(&self.entries);
        let c = lock(&self.counters);
        let mut stale = Vec::new();
        let mut expired = Vec::new();
        for (name, e) in entries.iter() {
            if e.value.is_some() && e.problem.is_some() {
                if self.expired(e) {
                    expired.push(name.clone());
                } else {
                    stale.push(name.clone());
                }
            }
        }
        StoreHealth {
            address: self.address().to_string(),
            up: c.up,
            last_success_ms: c.last_success.map(ms_since_epoch),
            stale,
            expired,
            failed_refreshes: c.failed_refreshes,
            last_problem: c.last_problem.clone(),
        }
    }

    /// The cached answer for `name`, reading it now when it was never read.
    fn cached_get(&self, name: &str) -> Result<Option<SecretValue>, VaultError> {
        let known = lock(&self.entries).get(name).cloned();
        let entry = match known {
            Some(e) => e,
            None => {
                let mut out = Refreshed::default();
                let read = self.client.read(name);
                self.apply(name, read, &mut out);
                match lock(&self.entries).get(name).cloned() {
                    Some(e) => e,
                    None => return Ok(None),
                }
            }
        };
        match (&entry.value, &entry.problem) {
            (Some(_), Some(problem)) if self.expired(&entry) => Err(VaultError::Expired {
                address: self.address().to_string(),
                name: name.to_string(),
                unconfirmed: entry.confirmed.elapsed(),
                max_stale: self.max_stale,
                last_problem: problem.clone(),
            }),
            (Some(v), _) => Ok(Some(v.clone())),
            // Never read successfully: the problem is the answer.
            (None, Some(problem)) => Err(VaultError::NeverRead {
                name: name.to_string(),
                problem: problem.clone(),
            }),
            (None, None) => Ok(None),
        }
    }
}

impl SecretStore for VaultStore {
    /// Cached mode adds each name's previous value as `NAME (previous
    /// value)` (see [`super::PREVIOUS_VALUE`]), so the events name an old
    /// key presented after a rotation; live mode lists the store as it is.
    fn entries(&self) -> Result<Vec<(EntryMeta, Option<SecretValue>)>, SecretsError> {
        let mut out: Vec<(EntryMeta, Option<SecretValue>)> = self
            .list()?
            .into_iter()
            .map(|meta| {
                // Cached: one unusable name must not hide the others.
                let value = if self.cached {
                    self.get(&meta.name).ok().flatten()
                } else {
                    self.get(&meta.name)?
                };
                Ok((meta, value))
            })
            .collect::<Result<_, SecretsError>>()?;
        if self.cached {
            for (name, value) in lock(&self.previous).iter() {
                out.push((
                    EntryMeta {
                        name: format!("{name}{}", super::PREVIOUS_VALUE),
                        created: SystemTime::UNIX_EPOCH,
                        updated: SystemTime::UNIX_EPOCH,
                    },
                    Some(value.clone()),
                ));
            }
        }
        Ok(out)
    }

    fn source(&self) -> Source {
        Source::Vault
    }

    fn get(&self, name: &str) -> Result<Option<SecretValue>, SecretsError> {
        if self.cached {
            return self.cached_get(name).map_err(SecretsError::from);
        }
        match self.client.read(name)? {
            Read::Value(v) => Ok(Some(v)),
            Read::Absent => Ok(None),
        }
    }

    fn put(&self, name: &str, value: &SecretValue) -> Result<PutOutcome, SecretsError> {
        super::validate_name(name)?;
        super::validate_value(value)?;
        let existed = matches!(self.client.read(name), Ok(Read::Value(_)));
        self.client.write(name, value)?;
        Ok(if existed {
            PutOutcome::Replaced
        } else {
            PutOutcome::Created
        })
    }

    fn remove(&self, name: &str) -> Result<bool, SecretsError> {
        super::validate_name(name)?;
        let existed = !matches!(self.client.read(name)?, Read::Absent);
        if existed {
            self.client.delete(name)?;
        }
        Ok(existed)
    }

    fn list(&self) -> Result<Vec<EntryMeta>, SecretsError> {
        let names: Vec<String> = if self.cached {
            let listed = lock(&self.listed);
            let entries = lock(&self.entries);
            listed
                .iter()
                .filter(|n| entries.get(*n).is_some_and(|e| e.value.is_some()))
                .cloned()
                .collect()
        } else {
            self.client.list()?
        };
        names
            .into_iter()
            .map(|name| {
                let meta = if self.cached {
                    None
                } else {
                    self.client.meta(&name)?
                };
                Ok(meta.unwrap_or(EntryMeta {
                    name,
                    created: SystemTime::UNIX_EPOCH,
                    updated: SystemTime::UNIX_EPOCH,
                }))
            })
            .collect()
    }
}
