//! The retirement evidence: per target, what the events say about whether
//! its key is still needed ("is it safe to remove the fallback?"): requests
//! it served, who still presents its key, the last rotation alarm it was part
//! of, and its last credential probe.

use std::time::Duration;

use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use super::store::since_cutoff_ms;
use super::{EventError, EventStore, PolicyNote, ProcessUsage};

/// A policy note's rule, as it appears in the stored `policy` JSON, for a
/// cheap `LIKE` before the notes are decoded.
const PROBE_RULE_LIKE: &str = "%\"rule_id\":\"probe-%";
const ALARM_RULE: &str = "rotation-alarm";
use crate::record::rules::SECRET_KEPT as SECRET_KEPT_RULE;
const ALARM_RULE_LIKE: &str = "%\"rule_id\":\"rotation-alarm\"%";
/// Most processes listed per target (most recent first).
const MAX_PRESENTERS: usize = 20;

/// One event handed to a [`EventStore::newest_noted`] callback.
struct Noted {
    time_ms: i64,
    status: Option<u16>,
    latency_ms: Option<u64>,
    notes: Vec<PolicyNote>,
    message: Option<String>,
}

/// The last rotation alarm a target was part of: a request a fallback
/// served because an earlier target rejected its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationAlarm {
    /// When, in ms since the Unix epoch.
    pub time_ms: i64,
    /// The target that rejected its key.
    pub rejected: String,
    /// What it answered (401 or 403), when known.
    pub status: Option<u16>,
    /// The target that served the request instead.
    pub served_by: Option<String>,
}

/// A target's last credential probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastProbe {
    /// When, in ms since the Unix epoch.
    pub time_ms: i64,
    /// `ok`, `rejected`, `rate_limited`, `unreachable`, `error`, `missing`
    /// or `not_probed`.
    pub result: String,
    /// The provider's HTTP status, when one came back.
    pub status: Option<u16>,
    /// Latency in milliseconds.
    pub latency_ms: Option<u64>,
    /// The probe's message (result, provider code, why). Never a key.
    pub message: Option<String>,
}

/// What the event store says about one target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetEvidence {
    /// Requests the target answered (it was the chosen target) in the
    /// served window; probes not counted.
    pub served: u64,
    /// Processes that presented the target's secret (their events name it
    /// in `matches_secret`) in the presented window, most recent first.
    pub presented_by: Vec<ProcessUsage>,
    /// The last rotation alarm the target was part of (as the target that
    /// rejected, or the one that served instead), at any time.
    pub last_rotation_alarm: Option<RotationAlarm>,
    /// The target's last recorded probe, at any time.
    pub last_verified: Option<LastProbe>,
    /// Reloads in the served window that kept serving the target's previous
    /// key because its secret could not be read (an emptied or unreadable
    /// `file:`, a damaged store), and the last time one did.
    pub secret_kept: u64,
    /// When a reload last kept the previous key (ms since the epoch).
    pub secret_kept_last_ms: Option<i64>,
}

impl EventStore {
    /// The evidence for `target` whose secret is named `secret` in events:
    /// requests served in the last `served_since`, processes that presented
    /// the secret in the last `presented_since`, its last rotation alarm and
    /// its last probe. An empty store gives empty evidence.
    pub fn target_evidence(
        &self,
        target: &str,
        secret: &str,
        served_since: Duration,
        presented_since: Duration,
    ) -> Result<TargetEvidence, EventError> {
        if !self.has_schema() {
            return Ok(TargetEvidence::default());
        }
        let kept = self.kept(target, served_since)?;
        Ok(TargetEvidence {
            served: self.served(target, served_since)?,
            presented_by: self.presented_by(secret, presented_since)?,
            last_rotation_alarm: self.last_alarm(target)?,
            last_verified: self.last_probe(target)?,
            secret_kept: kept.0,
            secret_kept_last_ms: kept.1,
        })
    }

    /// The newest event about the central secret store's health (a
    /// `secret-store-*` rule): when, which rule, its message.
    pub fn last_secret_store_event(&self) -> Result<Option<(i64, String, String)>, EventError> {
        if !self.has_schema() {
            return Ok(None);
        }
        let row = self
            .conn
            .query_row(
                "SELECT time_ms, policy, COALESCE(message, '') FROM events
                 WHERE policy LIKE '%\"rule_id\":\"secret-store-%' ORDER BY id DESC LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(EventError::sql("secret store query"))?;
        Ok(row.map(|(t, policy, message)| {
            let rule = serde_json::from_str::<Vec<PolicyNote>>(&policy)
                .ok()
                .and_then(|notes| notes.into_iter().find_map(|n| n.rule_id))
                .unwrap_or_default();
            (t, rule, message)
        }))
    }

    /// Reload events since `since` whose `secret-kept` note names `target`.
    fn kept(&self, target: &str, since: Duration) -> Result<(u64, Option<i64>), EventError> {
        let like = format!(
            "%\"rule_id\":\"{SECRET_KEPT_RULE}\",\"location\":{}%",
            serde_json::Value::String(target.to_string())
        );
        let (n, last): (i64, Option<i64>) = self
            .conn
            .query_row(
                "SELECT COUNT(*), MAX(time_ms) FROM events WHERE time_ms >= ?1 AND policy LIKE ?2",
                params![since_cutoff_ms(since), like],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(EventError::sql("evidence query"))?;
        Ok((u64::try_from(n).unwrap_or(0), last))
    }

    fn served(&self, target: &str, since: Duration) -> Result<u64, EventError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM events
                 WHERE id IN (SELECT event_id FROM event_targets WHERE target = ?1)
                   AND target_chosen = ?1 AND time_ms >= ?2 AND policy NOT LIKE ?3",
                params![target, since_cutoff_ms(since), PROBE_RULE_LIKE],
                |r| r.get(0),
            )
            .map_err(EventError::sql("served count"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn presented_by(&self, secret: &str, since: Duration) -> Result<Vec<ProcessUsage>, EventError> {
        // Grouped as in the key report: uncaptured clients by address.
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT client_exe, client_pid, client_uid, client_cgroup, client_container_id,
                        CASE WHEN client_pid IS NULL THEN client_addr END,
                        COUNT(*), MAX(time_ms) AS last
                 FROM events
                 WHERE key_matches_secret = ?1 AND time_ms >= ?2
                 GROUP BY client_exe, client_pid, client_uid, client_cgroup, client_container_id,
                          CASE WHEN client_pid IS NULL THEN client_addr END
                 ORDER BY last DESC, client_pid
                 LIMIT ?3",
            )
            .map_err(EventError::sql("presented-by query"))?;
        let rows = stmt
            .query_map(
                params![
                    secret,
                    since_cutoff_ms(since),
                    i64::try_from(MAX_PRESENTERS).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok(ProcessUsage {
                        host: None,
                        exe: r.get(0)?,
                        pid: r.get(1)?,
                        uid: r.get(2)?,
                        cgroup: r.get(3)?,
                        container_id: r.get(4)?,
                        addr: r.get(5)?,
                        count: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                        last_seen_ms: r.get(7)?,
                    })
                },
            )
            .map_err(EventError::sql("presented-by query"))?;
        rows.collect::<Result<_, _>>()
            .map_err(EventError::sql("presented-by query"))
    }

    /// Hands the events that tried `target` and whose notes match `like` to
    /// `each`, newest first, until it returns true.
    fn newest_noted(
        &self,
        target: &str,
        like: &str,
        mut each: impl FnMut(Noted) -> bool,
    ) -> Result<(), EventError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, time_ms, status, latency_ms, policy, message FROM events
                 WHERE id IN (SELECT event_id FROM event_targets WHERE target = ?1)
                   AND policy LIKE ?2
                 ORDER BY id DESC",
            )
            .map_err(EventError::sql("evidence query"))?;
        let mut rows = stmt
            .query(params![target, like])
            .map_err(EventError::sql("evidence query"))?;
        while let Some(r) = rows.next().map_err(EventError::sql("evidence query"))? {
            let id: i64 = r.get(0).map_err(EventError::sql("evidence query"))?;
            let policy: String = r.get(4).map_err(EventError::sql("evidence query"))?;
            let notes: Vec<PolicyNote> =
                serde_json::from_str(&policy).map_err(|e| EventError::Corrupt {
                    id,
                    reason: format!("column policy: {e}"),
                })?;
            let sql = EventError::sql("evidence query");
            let row = (|| {
                Ok::<_, rusqlite::Error>(Noted {
                    time_ms: r.get(1)?,
                    status: r.get(2)?,
                    latency_ms: r
                        .get::<_, Option<i64>>(3)?
                        .map(|l| u64::try_from(l).unwrap_or(0)),
                    notes,
                    message: r.get(5)?,
                })
            })()
            .map_err(sql)?;
            if each(row) {
                break;
            }
        }
        Ok(())
    }

    fn last_alarm(&self, target: &str) -> Result<Option<RotationAlarm>, EventError> {
        let mut found = None;
        self.newest_noted(target, ALARM_RULE_LIKE, |row| {
            found = row
                .notes
                .iter()
                .filter(|n| n.policy == "guard" && n.rule_id.as_deref() == Some(ALARM_RULE))
                .filter_map(|n| parse_alarm(n.location.as_deref()?, row.time_ms))
                .find(|a| a.rejected == target || a.served_by.as_deref() == Some(target));
            found.is_some()
        })?;
        Ok(found)
    }

    fn last_probe(&self, target: &str) -> Result<Option<LastProbe>, EventError> {
        let mut found = None;
        self.newest_noted(target, PROBE_RULE_LIKE, |row| {
            found = row
                .notes
                .iter()
                .filter(|n| n.policy == "guard")
                .find_map(|n| n.rule_id.as_deref()?.strip_prefix("probe-"))
                .map(|result| LastProbe {
                    time_ms: row.time_ms,
                    result: result.to_string(),
                    status: row.status,
                    latency_ms: row.latency_ms,
                    message: row.message.clone(),
                });
            found.is_some()
        })?;
        Ok(found)
    }
}

/// Reads the gateway's alarm location: `target A rejected its key (401);
/// served by B`.
fn parse_alarm(location: &str, time_ms: i64) -> Option<RotationAlarm> {
    let rest = location.strip_prefix("target ")?;
    let (rejected, rest) = rest.split_once(" rejected its key")?;
    let status = rest
        .strip_prefix(" (")
        .and_then(|r| r.split_once(')'))
        .and_then(|(s, _)| s.parse().ok());
    let served_by = rest
        .split_once("served by ")
        .map(|(_, s)| s.trim().to_string());
    Some(RotationAlarm {
        time_ms,
        rejected: rejected.to_string(),
        status,
        served_by,
    })
}
