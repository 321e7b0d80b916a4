//! Logging in to Vault: a token from a file (read again whenever the file
//! changes, so a token rotated on disk by an agent is picked up), from
//! `VAULT_TOKEN`, or from an AppRole login (role id and secret id from
//! files), renewed by logging in again before the lease ends.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use super::VaultError;
use super::client::{Client, usable_for};
use crate::config::VaultAuth;
use crate::secrets::SecretValue;

/// The token source and the token in use.
pub struct Auth {
    method: VaultAuth,
    current: Mutex<Option<Held>>,
}

struct Held {
    token: SecretValue,
    /// Token file: its stamp when read. AppRole: when to log in again.
    stamp: Option<Stamp>,
    until: Option<Instant>,
}

#[derive(Clone, PartialEq, Eq)]
struct Stamp(u64, u64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp(m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// Reads a credential file (token, role id, secret id): owned by kt's uid
/// or root, writable by no one else, one line.
fn read_credential(path: &Path, what: &'static str) -> Result<SecretValue, VaultError> {
    match crate::secrets::read_key_file(path) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(VaultError::Credential {
            what,
            path: path.to_path_buf(),
            detail: "the file is empty".into(),
        }),
        Err(e) => Err(VaultError::Credential {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

impl Auth {
    pub(super) fn new(method: &VaultAuth) -> Auth {
        Auth {
            method: method.clone(),
            current: Mutex::new(None),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        match self.current.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The token to send now.
    pub(super) fn token(&self, client: &Client) -> Result<SecretValue, VaultError> {
        let mut held = self.held();
        match &self.method {
            VaultAuth::Token { file: None } => match std::env::var("VAULT_TOKEN") {
                Ok(t) if !t.trim().is_empty() => Ok(SecretValue::new(t.trim())),
                _ => Err(VaultError::NoToken),
            },
            VaultAuth::Token { file: Some(path) } => {
                let now = stamp(path);
                if let Some(h) = held.as_ref()
                    && h.stamp.is_some()
                    && h.stamp == now
                {
                    return Ok(h.token.clone());
                }
                let token = read_credential(path, "token file")?;
                *held = Some(Held {
                    token: token.clone(),
                    stamp: now,
                    until: None,
                });
                Ok(token)
            }
            VaultAuth::AppRole {
                role_id_file,
                secret_id_file,
                mount,
            } => {
                if let Some(h) = held.as_ref()
                    && h.until.is_none_or(|u| Instant::now() < u)
                {
                    return Ok(h.token.clone());
                }
                let fresh = approle_login(client, mount, role_id_file, secret_id_file)?;
                let token = fresh.token.clone();
                *held = Some(fresh);
                Ok(token)
            }
        }
    }

    /// After a 403 with `used`: forget it if another one may be had (a
    /// changed token file, a new login); true when a retry makes sense.
    pub(super) fn renew_after_denial(&self, used: &SecretValue) -> bool {
        let mut held = self.held();
        match &self.method {
            VaultAuth::Token { file: None } => {
                std::env::var("VAULT_TOKEN").is_ok_and(|t| t.trim() != used.expose())
            }
            VaultAuth::Token { file: Some(_) } | VaultAuth::AppRole { .. } => {
                let was = held.as_ref().is_some_and(|h| h.token == *used);
                if was {
                    *held = None;
                }
                // A token file: a retry only helps when its content changed.
                match &self.method {
                    VaultAuth::Token { file: Some(p) } => {
                        read_credential(p, "token file").is_ok_and(|t| t != *used)
                    }
                    _ => was,
                }
            }
        }
    }
}

fn approle_login(
    client: &Client,
    mount: &str,
    role_id_file: &Path,
    secret_id_file: &Path,
) -> Result<Held, VaultError> {
    let role_id = read_credential(role_id_file, "AppRole role id file")?;
    let secret_id = read_credential(secret_id_file, "AppRole secret id file")?;
    let body = serde_json::json!({
        "role_id": role_id.expose(),
        "secret_id": secret_id.expose(),
    })
    .to_string();
    let path = format!("/v1/auth/{mount}/login");
    let a = client.send("POST", &path, Some(&body), None)?;
    if a.status() != 200 {
        return Err(VaultError::Login {
            address: client.address().to_string(),
            mount: mount.to_string(),
            status: a.status(),
        });
    }
    let auth = a.body().get("auth");
    let token = auth
        .and_then(|x| x.get("client_token"))
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| VaultError::Login {
            address: client.address().to_string(),
            mount: mount.to_string(),
            status: a.status(),
        })?;
    let lease = auth
        .and_then(|x| x.get("lease_duration"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    Ok(Held {
        token: SecretValue::new(token),
        stamp: None,
        // 0: a token that does not expire.
        until: (lease > 0).then(|| Instant::now() + usable_for(lease)),
    })
}
