//! The key report: who presented which key, for the rotation question.

use std::time::Duration;

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::store::since_cutoff_ms;
use super::{EventError, EventStore};

/// One process (as far as it was identified) that presented a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// The host's name, in a fleet report merged from many hosts' events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Executable path.
    pub exe: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// User id.
    pub uid: Option<u32>,
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// Container id.
    pub container_id: Option<String>,
    /// Client address, for clients that were not captured (no pid).
    pub addr: Option<String>,
    /// Requests it made with this key.
    pub count: u64,
    /// Its last request with this key, in ms since the Unix epoch.
    pub last_seen_ms: i64,
}

/// One presented key fingerprint and everyone who presented it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// Fingerprint of the presented key.
    pub fingerprint: String,
    /// The stored secret it matches; `None`: a key the guard does not manage.
    pub matches_secret: Option<String>,
    /// Whether the gateway marked the key as managed (on any request).
    pub managed: bool,
    /// The provider whose key format it has (see
    /// [`PresentedKey::provider`](super::PresentedKey::provider)); `None`: a
    /// format kt does not know. Never the key.
    #[serde(default)]
    pub provider: Option<String>,
    /// Requests that presented it.
    pub count: u64,
    /// The first request, in ms since the Unix epoch.
    pub first_seen_ms: i64,
    /// The last request, in ms since the Unix epoch.
    pub last_seen_ms: i64,
    /// Who presented it, most recent first.
    pub processes: Vec<ProcessUsage>,
}

impl EventStore {
    /// Per presented key fingerprint (and the stored secret it matches), the
    /// processes that used it, how often and when last. Keys matching a
    /// stored secret come first (by secret name), then keys the guard does not
    /// manage (`matches_secret == None`), most recently seen first.
    pub fn key_report(&self, since: Option<Duration>) -> Result<Vec<KeyUsage>, EventError> {
        if !self.has_schema() {
            return Ok(Vec::new());
        }
        let cutoff = since.map_or(i64::MIN, since_cutoff_ms);
        // Uncaptured clients have no pid: fall back to the address so that
        // two such clients are not merged into one anonymous row.
        // Files from before key_provider (read-only, not migrated yet): none known.
        let key_provider = if self.key_provider_column()? {
            "MAX(key_provider)"
        } else {
            "NULL"
        };
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT key_fingerprint, key_matches_secret, MAX(COALESCE(key_managed, 0)),
                        client_exe, client_pid, client_uid, client_cgroup, client_container_id,
                        CASE WHEN client_pid IS NULL THEN client_addr END,
                        COUNT(*), MIN(time_ms), MAX(time_ms), {key_provider}
                 FROM events
                 WHERE key_fingerprint IS NOT NULL AND time_ms >= ?1
                 GROUP BY key_fingerprint, key_matches_secret, client_exe, client_pid, client_uid,
                          client_cgroup, client_container_id,
                          CASE WHEN client_pid IS NULL THEN client_addr END"
            ))
            .map_err(EventError::sql("key report"))?;
        let rows = stmt
            .query_map(params![cutoff], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, Option<String>>(12)?,
                    ProcessUsage {
                        host: None,
                        exe: r.get(3)?,
                        pid: r.get(4)?,
                        uid: r.get(5)?,
                        cgroup: r.get(6)?,
                        container_id: r.get(7)?,
                        addr: r.get(8)?,
                        count: u64::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
                        last_seen_ms: r.get(11)?,
                    },
                ))
            })
            .map_err(EventError::sql("key report"))?;
        let mut keys: Vec<KeyUsage> = Vec::new();
        for row in rows {
            let (fingerprint, matches_secret, managed, first_seen, provider, process) =
                row.map_err(EventError::sql("key report"))?;
            let idx = match keys
                .iter()
                .position(|k| k.fingerprint == fingerprint && k.matches_secret == matches_secret)
            {
                Some(i) => i,
                None => {
                    keys.push(KeyUsage {
                        fingerprint,
                        matches_secret,
                        managed: false,
                        provider: None,
                        count: 0,
                        first_seen_ms: first_seen,
                        last_seen_ms: process.last_seen_ms,
                        processes: Vec::new(),
                    });
                    keys.len() - 1
                }
            };
            let key = &mut keys[idx];
            key.managed |= managed;
            if key.provider.is_none() {
                key.provider = provider;
            }
            key.count += process.count;
            key.first_seen_ms = key.first_seen_ms.min(first_seen);
            key.last_seen_ms = key.last_seen_ms.max(process.last_seen_ms);
            key.processes.push(process);
        }
        for k in &mut keys {
            k.processes
                .sort_by(|a, b| b.last_seen_ms.cmp(&a.last_seen_ms).then(a.pid.cmp(&b.pid)));
        }
        keys.sort_by(|a, b| {
            // Matched secrets first, by name; then unmanaged keys.
            a.matches_secret
                .is_none()
                .cmp(&b.matches_secret.is_none())
                .then_with(|| a.matches_secret.cmp(&b.matches_secret))
                .then_with(|| b.last_seen_ms.cmp(&a.last_seen_ms))
                .then_with(|| a.fingerprint.cmp(&b.fingerprint))
        });
        Ok(keys)
    }
}
