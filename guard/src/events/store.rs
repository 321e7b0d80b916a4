//! The embedded SQLite store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};

use super::{Amendment, Client, Decision, Event, EventError, PresentedKey};

// Lists (targets tried, fallback steps, policy notes) are JSON columns; the
// targets tried and chosen are also spread into `event_targets`, the index
// behind `--target` (so `target_chosen` needs none of its own).
// AUTOINCREMENT keeps ids increasing across pruning: `--follow` relies on it.
// `stream` (JSON, NULL unless the response body was cut) came with schema
// version 2: older files get it from `migrate`. Each amendment also appends
// to `event_amendments`, whose increasing `seq` lets `--follow` print an
// event again when it changes (rare: cuts only, so the log stays small).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    decision TEXT NOT NULL,
    provider TEXT,
    target_tried TEXT NOT NULL,
    target_chosen TEXT,
    fallback_steps TEXT NOT NULL,
    status INTEGER,
    latency_ms INTEGER,
    policy TEXT NOT NULL,
    client_addr TEXT,
    client_pid INTEGER,
    client_uid INTEGER,
    client_exe TEXT,
    client_cmdline TEXT,
    client_cgroup TEXT,
    client_container_id TEXT,
    key_fingerprint TEXT,
    key_matches_secret TEXT,
    key_managed INTEGER,
    message TEXT,
    stream TEXT,
    client_context TEXT,
    key_provider TEXT
);
CREATE INDEX IF NOT EXISTS events_time ON events(time_ms);
CREATE INDEX IF NOT EXISTS events_decision ON events(decision);
CREATE INDEX IF NOT EXISTS events_provider ON events(provider);
CREATE INDEX IF NOT EXISTS events_client ON events(client_exe, client_pid);
CREATE INDEX IF NOT EXISTS events_key ON events(key_fingerprint);
CREATE TABLE IF NOT EXISTS event_targets (
    event_id INTEGER NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (event_id, target)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_targets_target ON event_targets(target, event_id);
CREATE TABLE IF NOT EXISTS event_amendments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL
);
";

/// The schema version this code writes (`PRAGMA user_version`). Version 3
/// added `client_context` and `key_provider` (the provider whose key format a presented key has).
const SCHEMA_VERSION: i64 = 3;

const COLUMNS: &str = "id, time_ms, request_id, decision, provider, target_tried, target_chosen, \
    fallback_steps, status, latency_ms, policy, client_addr, client_pid, client_uid, client_exe, \
    client_cmdline, client_cgroup, client_container_id, key_fingerprint, key_matches_secret, \
    key_managed, message, stream, client_context, key_provider";

// `time_ms` first: the time index finds the row, the request id confirms it.
const FIND_EVENT: &str = "SELECT id FROM events WHERE time_ms = ?1 AND request_id = ?2";

const INSERT: &str = "INSERT INTO events (time_ms, request_id, decision, provider, target_tried, \
    target_chosen, fallback_steps, status, latency_ms, policy, client_addr, client_pid, client_uid, \
    client_exe, client_cmdline, client_cgroup, client_container_id, key_fingerprint, \
    key_matches_secret, key_managed, message, stream, client_context, key_provider) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)";

/// Which events to list. The default lists everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only events at most this old.
    pub since: Option<Duration>,
    /// Only this decision.
    pub decision: Option<Decision>,
    /// Only events that tried or chose this target id.
    pub target: Option<String>,
    /// Only this provider.
    pub provider: Option<String>,
    /// Only the most recent N matches (still returned oldest first).
    pub limit: Option<usize>,
    /// Only events with a larger id (for following).
    pub after_id: Option<i64>,
    /// Only events whose response stream was cut after the headers.
    pub stream_cut: bool,
}

/// Where a follower is: the newest event and the newest amendment it saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The largest event id seen.
    pub event_id: i64,
    /// The largest amendment sequence number seen.
    pub amendment: i64,
}

/// What changed in the store after a [`Cursor`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Events inserted after the cursor (with any amendment already applied).
    pub new: Vec<Event>,
    /// Events at or before the cursor that were amended after it, as they
    /// are now.
    pub amended: Vec<Event>,
    /// The cursor to pass next time.
    pub cursor: Cursor,
}

/// The event store: `<data_dir>/events.db`, SQLite in WAL mode, so readers
/// (`kt events`) never block the writer.
pub struct EventStore {
    pub(super) conn: Connection,
    path: PathBuf,
    max_events: u64,
    /// Rows in `events`, tracked so pruning needs no count per batch.
    rows: u64,
    /// False for a read-only store whose writer has not created the schema yet.
    has_schema: bool,
    /// False for a version-1 file opened read-only (no `stream` column
    /// yet); checked again on each query until a writer has migrated it.
    has_stream: std::cell::Cell<bool>,
    /// The same for `key_provider` (version 2 files).
    has_key_provider: std::cell::Cell<bool>,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("path", &self.path)
            .field("max_events", &self.max_events)
            .finish_non_exhaustive()
    }
}

impl EventStore {
    /// Opens (creating if needed) the store in `data_dir` for writing. Keeps
    /// at most `max_events` events, pruning the oldest first; 0 means no bound.
    pub fn open(data_dir: &Path, max_events: u64) -> Result<EventStore, EventError> {
        create_private_dir(data_dir)?;
        let path = crate::datadir::events_db(data_dir);
        create_private_file(&path)?;
        let open_err = |source| EventError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "event store is not in WAL mode");
        }
        // WAL + NORMAL: a power cut may lose the last batches, never corrupts.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        // Inserts touch the newest end of each index and pruning the oldest:
        // a 16 MiB page cache keeps both ends of all of them warm.
        conn.pragma_update(None, "cache_size", -16_384)
            .map_err(open_err)?;
        // One transaction: a reader opening the file meanwhile (`kt events
        // --follow` started first) sees the whole schema or none of it.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(open_err)?;
        tx.execute_batch(SCHEMA).map_err(open_err)?;
        migrate(&tx).map_err(open_err)?;
        tx.commit().map_err(open_err)?;
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .map_err(open_err)?;
        Ok(EventStore {
            conn,
            path,
            max_events,
            rows: u64::try_from(rows).unwrap_or(0),
            has_schema: true,
            has_stream: std::cell::Cell::new(true),
            has_key_provider: std::cell::Cell::new(true),
        })
    }

    /// Opens the store in `data_dir` for reading only; `Ok(None)` when there
    /// is no store yet (no events were ever recorded there).
    pub fn open_read_only(data_dir: &Path) -> Result<Option<EventStore>, EventError> {
        let path = crate::datadir::events_db(data_dir);
        if !path.exists() {
            return Ok(None);
        }
        let open_err = |source| EventError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let mut store = EventStore {
            conn,
            path,
            max_events: 0,
            rows: 0,
            has_schema: false,
            has_stream: std::cell::Cell::new(false),
            has_key_provider: std::cell::Cell::new(false),
        };
        store.has_schema = store.schema_present()?;
        Ok(Some(store))
    }

    fn schema_present(&self) -> Result<bool, EventError> {
        self.conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
                [],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(EventError::sql("schema check"))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inserts `events` in one transaction, setting their `id`s, then prunes
    /// the oldest events above `max_events` in the same transaction.
    pub fn insert(&mut self, events: &mut [Event]) -> Result<(), EventError> {
        let tx = self.conn.transaction().map_err(EventError::sql("begin"))?;
        {
            let mut ins = tx
                .prepare_cached(INSERT)
                .map_err(EventError::sql("insert"))?;
            let mut ins_target = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO event_targets (event_id, target) VALUES (?1, ?2)",
                )
                .map_err(EventError::sql("insert"))?;
            for e in events.iter_mut() {
                let key = e.key.as_ref();
                ins.execute(params![
                    e.time_ms,
                    e.request_id,
                    e.decision.as_str(),
                    e.provider,
                    to_json(&e.target_tried),
                    e.target_chosen,
                    to_json(&e.fallback_steps),
                    e.status,
                    e.latency_ms.map(|l| i64::try_from(l).unwrap_or(i64::MAX)),
                    to_json(&e.policy),
                    e.client.addr,
                    e.client.pid,
                    e.client.uid,
                    e.client.exe,
                    e.client.cmdline,
                    e.client.cgroup,
                    e.client.container_id,
                    key.map(|k| k.fingerprint.as_str()),
                    key.and_then(|k| k.matches_secret.as_deref()),
                    key.map(|k| k.managed),
                    e.message,
                    e.stream.as_ref().map(to_json),
                    (!e.client.context.is_empty()).then(|| to_json(&e.client.context)),
                    key.and_then(|k| k.provider.as_deref()),
                ])
                .map_err(EventError::sql("insert"))?;
                e.id = tx.last_insert_rowid();
                for t in e.target_tried.iter().chain(e.target_chosen.iter()) {
                    ins_target
                        .execute(params![e.id, t])
                        .map_err(EventError::sql("insert"))?;
                }
            }
        }
        let mut rows = self.rows + events.len() as u64;
        if self.max_events > 0 && rows > self.max_events {
            // Deletes exactly the excess, so the cost per event stays constant.
            let excess = rows - self.max_events;
            let cutoff: Option<i64> = tx
                .query_row(
                    "SELECT id FROM events ORDER BY id LIMIT 1 OFFSET ?1",
                    params![i64::try_from(excess - 1).unwrap_or(i64::MAX)],
                    |r| r.get(0),
                )
                .optional()
                .map_err(EventError::sql("prune"))?;
            if let Some(cutoff) = cutoff {
                let deleted = tx
                    .execute("DELETE FROM events WHERE id <= ?1", params![cutoff])
                    .map_err(EventError::sql("prune"))?;
                tx.execute(
                    "DELETE FROM event_targets WHERE event_id <= ?1",
                    params![cutoff],
                )
                .map_err(EventError::sql("prune"))?;
                tx.execute(
                    "DELETE FROM event_amendments WHERE event_id <= ?1",
                    params![cutoff],
                )
                .map_err(EventError::sql("prune"))?;
                rows = rows.saturating_sub(deleted as u64);
            }
        }
        tx.commit().map_err(EventError::sql("commit"))?;
        self.rows = rows;
        Ok(())
    }

    /// Applies `amendments` in one transaction: each sets the stream outcome
    /// of the event with its request id and time. Returns how many events
    /// were changed; an amendment whose event is not stored (pruned, or its
    /// insert was lost) changes nothing.
    pub fn amend(&mut self, amendments: &[Amendment]) -> Result<usize, EventError> {
        let tx = self.conn.transaction().map_err(EventError::sql("begin"))?;
        let mut changed = 0;
        {
            let sql = EventError::sql("amend");
            let mut find = tx.prepare_cached(FIND_EVENT).map_err(sql)?;
            let mut upd = tx
                .prepare_cached("UPDATE events SET stream = ?2 WHERE id = ?1")
                .map_err(EventError::sql("amend"))?;
            let mut log = tx
                .prepare_cached("INSERT INTO event_amendments (event_id) VALUES (?1)")
                .map_err(EventError::sql("amend"))?;
            for a in amendments {
                let ids = find
                    .query_map(params![a.time_ms, a.request_id], |r| r.get::<_, i64>(0))
                    .map_err(EventError::sql("amend"))?
                    .collect::<Result<Vec<i64>, _>>()
                    .map_err(EventError::sql("amend"))?;
                let stream = to_json(&a.stream);
                for id in ids {
                    upd.execute(params![id, stream])
                        .map_err(EventError::sql("amend"))?;
                    log.execute(params![id]).map_err(EventError::sql("amend"))?;
                    changed += 1;
                }
            }
        }
        tx.commit().map_err(EventError::sql("commit"))?;
        Ok(changed)
    }

    /// The cursor at the store's current end.
    pub fn cursor(&self) -> Result<Cursor, EventError> {
        Ok(Cursor {
            event_id: self.max_id()?,
            amendment: self.max_amendment()?,
        })
    }

    fn max_amendment(&self) -> Result<i64, EventError> {
        if !self.has_schema || !self.stream_column()? {
            return Ok(0);
        }
        self.conn
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM event_amendments",
                [],
                |r| r.get(0),
            )
            .map_err(EventError::sql("query"))
    }

    /// Everything matching `filter` (its `after_id` and `limit` aside) that
    /// changed after `cursor`, read in one snapshot: new events, and older
    /// ones that were amended. An event is in at most one of the two lists.
    pub fn changes_since(&self, filter: &Filter, cursor: Cursor) -> Result<Changes, EventError> {
        // One read transaction: the cursor, the new and the amended rows all
        // come from the same snapshot, so nothing is missed or shown twice.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(EventError::sql("begin"))?;
        let now = self.cursor()?;
        let filter = Filter {
            after_id: Some(cursor.event_id),
            limit: None,
            ..filter.clone()
        };
        let new = self.select(&filter, None)?;
        let amended = if now.amendment > cursor.amendment {
            let older = Filter {
                after_id: None,
                ..filter.clone()
            };
            self.select(
                &older,
                Some((cursor.event_id, cursor.amendment, now.amendment)),
            )?
        } else {
            Vec::new()
        };
        tx.commit().map_err(EventError::sql("commit"))?;
        Ok(Changes {
            new,
            amended,
            cursor: Cursor {
                event_id: now.event_id.max(cursor.event_id),
                amendment: now.amendment.max(cursor.amendment),
            },
        })
    }

    /// Whether the file has the `stream` column (a version-1 file read
    /// before any new writer migrated it has not).
    fn stream_column(&self) -> Result<bool, EventError> {
        if !self.has_stream.get() {
            let has = has_column(&self.conn, "events", "stream")
                .map_err(EventError::sql("schema check"))?;
            self.has_stream.set(has);
        }
        Ok(self.has_stream.get())
    }

    /// Whether the file has the `key_provider` column (a version-1 or -2
    /// file read before any new writer migrated it has not).
    pub(super) fn key_provider_column(&self) -> Result<bool, EventError> {
        if !self.has_key_provider.get() {
            let has = has_column(&self.conn, "events", "key_provider")
                .map_err(EventError::sql("schema check"))?;
            self.has_key_provider.set(has);
        }
        Ok(self.has_key_provider.get())
    }

    /// Events matching `filter`, oldest first (newest last).
    pub fn query(&self, filter: &Filter) -> Result<Vec<Event>, EventError> {
        self.select(filter, None)
    }

    /// `amended`: only events with an id up to `.0` amended with a sequence
    /// number in `(.1, .2]`.
    fn select(
        &self,
        filter: &Filter,
        amended: Option<(i64, i64, i64)>,
    ) -> Result<Vec<Event>, EventError> {
        if !self.has_schema {
            return Ok(Vec::new());
        }
        // A file opened read-only that no writer of this version migrated yet
        // lacks the newer columns: they read as NULL.
        let has_stream = self.stream_column()?;
        let mut listed = COLUMNS.to_string();
        for (column, present) in [
            ("stream", has_stream),
            (
                "client_context",
                has_column(&self.conn, "events", "client_context")
                    .map_err(EventError::sql("schema check"))?,
            ),
            ("key_provider", self.key_provider_column()?),
        ] {
            if !present {
                listed = listed.replace(&format!(", {column}"), &format!(", NULL AS {column}"));
            }
        }
        let mut sql = format!("SELECT {listed} FROM events WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        // When following, the new rows are a short range at the end of the
        // table, and amended ones a handful: `+column` keeps SQLite from
        // walking a column index instead.
        let plus = if filter.after_id.is_some() || amended.is_some() {
            "+"
        } else {
            ""
        };
        if let Some((upto, after_seq, upto_seq)) = amended {
            sql.push_str(
                " AND id <= ? AND id IN (SELECT event_id FROM event_amendments \
                 WHERE seq > ? AND seq <= ?)",
            );
            args.extend([upto.into(), after_seq.into(), upto_seq.into()]);
        }
        if let Some(since) = filter.since {
            sql.push_str(&format!(" AND {plus}time_ms >= ?"));
            args.push(since_cutoff_ms(since).into());
        }
        if let Some(d) = filter.decision {
            sql.push_str(&format!(" AND {plus}decision = ?"));
            args.push(d.as_str().to_string().into());
        }
        if filter.stream_cut {
            // A store from before cuts were recorded has none to show.
            if !has_stream {
                return Ok(Vec::new());
            }
            sql.push_str(&format!(" AND {plus}stream IS NOT NULL"));
        }
        if let Some(p) = &filter.provider {
            sql.push_str(&format!(" AND {plus}provider = ?"));
            args.push(p.clone().into());
        }
        if let Some(t) = &filter.target {
            sql.push_str(" AND id IN (SELECT event_id FROM event_targets WHERE target = ?");
            args.push(t.clone().into());
            if let Some(after) = filter.after_id {
                sql.push_str(" AND event_id > ?");
                args.push(after.into());
            }
            sql.push(')');
        }
        if let Some(after) = filter.after_id {
            sql.push_str(" AND id > ?");
            args.push(after.into());
        }
        sql.push_str(" ORDER BY id DESC");
        if let Some(limit) = filter.limit {
            sql.push_str(" LIMIT ?");
            args.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
        }
        let mut stmt = self
            .conn
            .prepare_cached(&sql)
            .map_err(EventError::sql("query"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), read_row)
            .map_err(EventError::sql("query"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(EventError::sql("query"))??);
        }
        out.reverse();
        Ok(out)
    }

    /// The largest event id stored (0 when empty).
    pub fn max_id(&self) -> Result<i64, EventError> {
        if !self.has_schema {
            return Ok(0);
        }
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))
            .map_err(EventError::sql("query"))
    }

    /// Number of events stored.
    pub fn count(&self) -> Result<u64, EventError> {
        if !self.has_schema {
            return Ok(0);
        }
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .map_err(EventError::sql("count"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Whether the schema existed when the store was opened (a read-only
    /// store opened before the writer's first open has none: reopen it).
    pub fn has_schema(&self) -> bool {
        self.has_schema
    }
}

/// Brings a file written by an older kt up to [`SCHEMA_VERSION`]. Only adds
/// (a column), so older readers keep working on the file. Runs inside the
/// open's immediate transaction, so two writers cannot both add the column.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    if !has_column(conn, "events", "stream")? {
        conn.execute_batch("ALTER TABLE events ADD COLUMN stream TEXT")?;
    }
    if !has_column(conn, "events", "client_context")? {
        conn.execute_batch("ALTER TABLE events ADD COLUMN client_context TEXT")?;
    }
    if !has_column(conn, "events", "key_provider")? {
        conn.execute_batch("ALTER TABLE events ADD COLUMN key_provider TEXT")?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
    for name in names {
        if name? == column {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The earliest `time_ms` inside a `since` window.
pub(super) fn since_cutoff_ms(since: Duration) -> i64 {
    let ago = i64::try_from(since.as_millis()).unwrap_or(i64::MAX);
    super::now_ms().saturating_sub(ago)
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serializing plain strings and vectors cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "[]".to_string())
}

fn from_json<T: serde::de::DeserializeOwned>(
    id: i64,
    column: &str,
    text: &str,
) -> Result<T, EventError> {
    serde_json::from_str(text).map_err(|e| EventError::Corrupt {
        id,
        reason: format!("column {column}: {e}"),
    })
}

fn read_row(r: &Row<'_>) -> rusqlite::Result<Result<Event, EventError>> {
    let id: i64 = r.get(0)?;
    let decision: String = r.get(3)?;
    let tried: String = r.get(5)?;
    let fallback: String = r.get(7)?;
    let policy: String = r.get(10)?;
    let latency: Option<i64> = r.get(9)?;
    let fingerprint: Option<String> = r.get(18)?;
    let matches_secret: Option<String> = r.get(19)?;
    let managed: Option<bool> = r.get(20)?;
    let time_ms: i64 = r.get(1)?;
    let request_id: String = r.get(2)?;
    let provider: Option<String> = r.get(4)?;
    let target_chosen: Option<String> = r.get(6)?;
    let status: Option<u16> = r.get(8)?;
    let client = Client {
        addr: r.get(11)?,
        pid: r.get(12)?,
        uid: r.get(13)?,
        exe: r.get(14)?,
        cmdline: r.get(15)?,
        cgroup: r.get(16)?,
        container_id: r.get(17)?,
        context: crate::record::ClientContext::default(),
    };
    let context: Option<String> = r.get(23)?;
    let message: Option<String> = r.get(21)?;
    let stream: Option<String> = r.get(22)?;
    let key_provider: Option<String> = r.get(24)?;
    Ok((|| {
        Ok(Event {
            id,
            time_ms,
            request_id,
            decision: decision
                .parse()
                .map_err(|e: EventError| EventError::Corrupt {
                    id,
                    reason: e.to_string(),
                })?,
            provider,
            target_tried: from_json(id, "target_tried", &tried)?,
            target_chosen,
            fallback_steps: from_json(id, "fallback_steps", &fallback)?,
            status,
            latency_ms: latency.map(|l| u64::try_from(l).unwrap_or(0)),
            policy: from_json(id, "policy", &policy)?,
            client: Client {
                // Extra attribution; an unreadable one is not worth losing
                // the event over.
                context: context
                    .and_then(|c| serde_json::from_str(&c).ok())
                    .unwrap_or_default(),
                ..client
            },
            key: fingerprint.map(|fingerprint| PresentedKey {
                fingerprint,
                matches_secret,
                managed: managed.unwrap_or(false),
                provider: key_provider,
            }),
            message,
            stream: stream.map(|s| from_json(id, "stream", &s)).transpose()?,
            host: None,
        })
    })())
}

fn create_private_dir(dir: &Path) -> Result<(), EventError> {
    // The store names processes and command lines: keep it to the owner.
    crate::datadir::create_private_dir(dir).map_err(|source| EventError::Io {
        what: "create event store directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn create_private_file(path: &Path) -> Result<(), EventError> {
    // SQLite gives its -wal and -shm files the database file's mode.
    crate::datadir::ensure_private_file(path).map_err(|source| EventError::Io {
        what: "create event store",
        path: path.to_path_buf(),
        source,
    })
}
