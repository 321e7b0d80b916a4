//! Decision events: the audit logger's record of every request, the embedded
//! SQLite store they live in (`<data_dir>/events.db`, WAL mode), the
//! off-request-path writer that fills it, and the key report that answers the
//! rotation question ("who still uses the old key?").
//!
//! An event is written when the response headers go out. When the response
//! body is cut later (upstream failure, idle gap, client gone), the same
//! event is amended through the same queue: [`Event::stream`] says how, and
//! `kt events --follow` prints it again.
//!
//! Events never carry a secret: the presented key is a fingerprint plus the
//! name of the stored secret it matches, and policy notes name rules and
//! locations, never the matched text.

#![forbid(unsafe_code)]

mod egress;
mod fleet;
mod host;
mod model;
mod report;
mod retirement;
mod sink;
mod sinks;
mod store;
mod summary;
mod writer;

pub use egress::{EgressDestination, EgressGroup, EgressReport};
pub use fleet::{
    FleetKeys, FleetSecret, HostUsage, Loaded, ProviderKeys, UnmanagedKey, fleet_keys, key_usage,
    read_json_lines,
};
pub use host::Host;
pub use model::{
    Amendment, Client, Decision, Event, EventJson, FallbackStep, PolicyNote, PresentedKey,
    SCHEMA_VERSION, StreamEnd, StreamOutcome,
};
pub use report::{KeyUsage, ProcessUsage};
pub use retirement::{LastProbe, RotationAlarm, TargetEvidence};
pub use sink::{EventSink, to_event, to_stream_outcome};
pub use sinks::{SINK_DROPPED, SinkObserver, SinkStats, Sinks};
pub use store::{Changes, Cursor, EventStore, Filter};
pub use summary::{FailOn, Summary};
pub use writer::{EventWriter, WriterConfig, WriterHandle, WriterStats};

use std::path::PathBuf;

/// Everything that can go wrong with the event store.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The data directory or the database file could not be created.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done (`create event store directory`...).
        what: &'static str,
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database file could not be opened or set up.
    #[error("cannot open event store {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// A statement against the store failed.
    #[error("event store {what} failed: {source}")]
    Sql {
        /// What was being done (`insert`, `query`, `prune`...).
        what: &'static str,
        /// Why.
        source: rusqlite::Error,
    },
    /// A stored row could not be decoded.
    #[error("event {id} in the store is corrupt: {reason}")]
    Corrupt {
        /// The row id.
        id: i64,
        /// What was wrong with it.
        reason: String,
    },
    /// A decision name that is not `allow`, `block`, `redact` or `error`.
    #[error("unknown decision {0:?} (expected allow, block, redact or error)")]
    UnknownDecision(String),
}

impl EventError {
    fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> EventError {
        move |source| EventError::Sql { what, source }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
pub(crate) mod tests;
