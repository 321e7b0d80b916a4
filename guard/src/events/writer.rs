//! The background writer: events leave the request path through a bounded
//! queue and a thread writes them in batches, one transaction per batch.
//! Amendments (a stream cut after the event was recorded) take the same
//! queue, so each is applied after its event's insert.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Amendment, Event, EventStore};

/// How the writer is set up.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// The data directory; the store is `<data_dir>/events.db`.
    pub data_dir: PathBuf,
    /// Keep at most this many events (oldest pruned first); 0: no bound.
    pub max_events: u64,
    /// Queue length between callers and the thread; when full, events are
    /// dropped (and counted) rather than slowing requests.
    pub capacity: usize,
    /// Most events written in one transaction.
    pub batch_max: usize,
    /// How long `flush` and shutdown wait for pending events at most.
    pub shutdown_timeout: Duration,
}

impl WriterConfig {
    /// Defaults: a 65,536-event queue, batches of up to 4,096, 5 s shutdown.
    pub fn new(data_dir: impl Into<PathBuf>, max_events: u64) -> WriterConfig {
        WriterConfig {
            data_dir: data_dir.into(),
            max_events,
            capacity: 65_536,
            batch_max: 4_096,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters of what happened to recorded events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Events accepted into the queue.
    pub accepted: u64,
    /// Events committed to the store.
    pub written: u64,
    /// Events refused because the queue was full or the writer had stopped.
    pub dropped: u64,
    /// Events lost because the store was unavailable or a write failed.
    pub failed: u64,
    /// Amendments applied to a stored event.
    pub amended: u64,
    /// Amendments not applied: dropped (queue full, writer stopped), lost
    /// to an unavailable store, or whose event was not stored.
    pub amend_lost: u64,
}

enum Msg {
    // Boxed so the preallocated queue stays small.
    Event(Box<Event>),
    Amend(Box<Amendment>),
    Flush(SyncSender<()>),
    Stop,
}

#[derive(Default)]
struct Shared {
    healthy: AtomicBool,
    accepted: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    amended: AtomicU64,
    amend_lost: AtomicU64,
    /// Drops not yet reported in a log line.
    dropped_unlogged: AtomicU64,
    last_drop_log_ms: AtomicI64,
}

/// The sending side, cheap to clone into every request handler.
#[derive(Clone)]
pub struct EventWriter {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    timeout: Duration,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("healthy", &self.healthy())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Owns the writer thread. Dropping it (or calling [`WriterHandle::shutdown`])
/// writes every event recorded so far, waiting at most the configured
/// shutdown timeout, then stops the thread.
pub struct WriterHandle {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
    done: Receiver<()>,
    shared: Arc<Shared>,
    timeout: Duration,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterHandle")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl EventWriter {
    /// Opens the store and starts the writer thread. Never fails: if the
    /// store cannot be opened, the writer reports `healthy() == false`, logs
    /// the failure, counts lost events, and keeps retrying in the background.
    pub fn spawn(config: WriterConfig) -> (EventWriter, WriterHandle) {
        let shared = Arc::new(Shared::default());
        let store = match EventStore::open(&config.data_dir, config.max_events) {
            Ok(s) => {
                shared.healthy.store(true, Ordering::SeqCst);
                Some(s)
            }
            Err(e) => {
                tracing::error!(error = %e, "event store unavailable: decision events will not be recorded until it opens");
                None
            }
        };
        let (tx, rx) = mpsc::sync_channel(config.capacity.max(1));
        let (done_tx, done) = mpsc::channel();
        let timeout = config.shutdown_timeout;
        let worker = Worker {
            rx,
            store,
            config,
            shared: shared.clone(),
            last_open_attempt: Instant::now(),
            last_fail_log: None,
        };
        let thread = std::thread::Builder::new()
            .name("kt-events".into())
            .spawn(move || {
                worker.run();
                drop(done_tx);
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                shared.healthy.store(false, Ordering::SeqCst);
                tracing::error!(error = %e, "cannot start the event writer thread: decision events will not be recorded");
                None
            }
        };
        let writer = EventWriter {
            tx: tx.clone(),
            shared: shared.clone(),
            timeout,
        };
        let handle = WriterHandle {
            tx,
            thread,
            done,
            shared,
            timeout,
        };
        (writer, handle)
    }

    /// Queues an event for writing. Never blocks: when the queue is full the
    /// event is dropped, counted, and reported (at most once a second).
    pub fn record(&self, event: Event) {
        match self.tx.try_send(Msg::Event(Box::new(event))) {
            Ok(()) => {
                self.shared.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => self.dropped("event queue full"),
            Err(TrySendError::Disconnected(_)) => self.dropped("event writer stopped"),
        }
    }

    /// Queues an amendment to an event recorded earlier through this writer
    /// (or a clone): it is applied after that event's insert. Never blocks;
    /// when the queue is full it is dropped, counted and reported like an
    /// event.
    pub fn amend(&self, amendment: Amendment) {
        match self.tx.try_send(Msg::Amend(Box::new(amendment))) {
            Ok(()) => {}
            Err(e) => {
                self.shared.amend_lost.fetch_add(1, Ordering::Relaxed);
                self.log_drop(match e {
                    TrySendError::Full(_) => "event queue full (stream amendment)",
                    TrySendError::Disconnected(_) => "event writer stopped (stream amendment)",
                });
            }
        }
    }

    fn dropped(&self, reason: &'static str) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        self.log_drop(reason);
    }

    fn log_drop(&self, reason: &'static str) {
        self.shared.dropped_unlogged.fetch_add(1, Ordering::Relaxed);
        let now = super::now_ms();
        let last = self.shared.last_drop_log_ms.load(Ordering::Relaxed);
        if now - last >= 1_000
            && self
                .shared
                .last_drop_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let since_last = self.shared.dropped_unlogged.swap(0, Ordering::Relaxed);
            tracing::error!(
                reason,
                dropped = since_last,
                dropped_total = self.shared.dropped.load(Ordering::Relaxed),
                "decision events dropped: the event store is not keeping up"
            );
        }
    }

    /// Whether the store is open and the last write succeeded. The gateway
    /// refuses traffic while this is false when configured to.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }

    /// Counters since the writer started.
    pub fn stats(&self) -> WriterStats {
        stats(&self.shared)
    }

    /// Waits until every event recorded before this call has been handled
    /// (written, or counted as failed when the store is unavailable), for at
    /// most the configured shutdown timeout. False on timeout or when the
    /// writer has stopped.
    pub fn flush(&self) -> bool {
        let deadline = Instant::now() + self.timeout;
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if !send_until(&self.tx, Msg::Flush(ack_tx), deadline) {
            return false;
        }
        ack_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

impl crate::record::AuditHealth for EventWriter {
    fn healthy(&self) -> bool {
        EventWriter::healthy(self)
    }
}

impl WriterHandle {
    /// Writes everything recorded so far and stops the thread (bounded by the
    /// shutdown timeout). True when nothing was left behind.
    pub fn shutdown(mut self) -> bool {
        self.stop()
    }

    /// Whether the store is open and the last write succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }

    /// Counters since the writer started.
    pub fn stats(&self) -> WriterStats {
        stats(&self.shared)
    }

    fn stop(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let deadline = Instant::now() + self.timeout;
        let finished = send_until(&self.tx, Msg::Stop, deadline)
            && matches!(
                self.done
                    .recv_timeout(deadline.saturating_duration_since(Instant::now())),
                Err(RecvTimeoutError::Disconnected)
            );
        if finished {
            if thread.join().is_err() {
                tracing::error!("event writer thread panicked");
                return false;
            }
            let s = stats(&self.shared);
            if s.dropped + s.failed > 0 {
                tracing::error!(
                    dropped = s.dropped,
                    failed = s.failed,
                    "event writer stopped; some decision events were not recorded"
                );
            }
            true
        } else {
            let s = stats(&self.shared);
            tracing::error!(
                pending = s.accepted.saturating_sub(s.written + s.failed),
                "event writer did not finish in time; pending decision events are lost"
            );
            false
        }
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stats(shared: &Shared) -> WriterStats {
    WriterStats {
        accepted: shared.accepted.load(Ordering::Relaxed),
        written: shared.written.load(Ordering::Relaxed),
        dropped: shared.dropped.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        amended: shared.amended.load(Ordering::Relaxed),
        amend_lost: shared.amend_lost.load(Ordering::Relaxed),
    }
}

/// Sends without blocking forever: retries a full queue until `deadline`.
fn send_until(tx: &SyncSender<Msg>, msg: Msg, deadline: Instant) -> bool {
    let mut msg = msg;
    loop {
        match tx.try_send(msg) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(m)) => {
                if Instant::now() >= deadline {
                    return false;
                }
                msg = m;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

const RETRY_OPEN: Duration = Duration::from_secs(1);
const FAIL_LOG_EVERY: Duration = Duration::from_secs(5);

struct Worker {
    rx: Receiver<Msg>,
    store: Option<EventStore>,
    config: WriterConfig,
    shared: Arc<Shared>,
    last_open_attempt: Instant,
    last_fail_log: Option<Instant>,
}

impl Worker {
    fn run(mut self) {
        let mut batch: Vec<Event> = Vec::with_capacity(self.config.batch_max.max(1));
        // Applied after `batch`: every amendment's event was queued before it,
        // so it is in this batch or an earlier one.
        let mut amends: Vec<Amendment> = Vec::new();
        let mut acks: Vec<SyncSender<()>> = Vec::new();
        let mut stopping = false;
        loop {
            // Wake up now and then without traffic, to retry a failed store.
            let first = match self.rx.recv_timeout(RETRY_OPEN) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut next = first;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => batch.push(*e),
                    Msg::Amend(a) => amends.push(*a),
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Stop => stopping = true,
                }
                if batch.len() + amends.len() >= self.config.batch_max.max(1) {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            if batch.is_empty()
                && amends.is_empty()
                && self.store.is_none()
                && let Err(e) = self.reopen()
            {
                self.fail_log(&e);
            }
            if !batch.is_empty() {
                self.write(&mut batch);
            }
            if !amends.is_empty() {
                self.amend(&mut amends);
            }
            for ack in acks.drain(..) {
                let _ = ack.try_send(());
            }
            if stopping {
                // Events queued after the stop (by other clones) still count.
                while let Ok(msg) = self.rx.try_recv() {
                    match msg {
                        Msg::Event(e) => batch.push(*e),
                        Msg::Amend(a) => amends.push(*a),
                        Msg::Flush(ack) => acks.push(ack),
                        Msg::Stop => {}
                    }
                    if batch.len() >= self.config.batch_max.max(1) {
                        self.write(&mut batch);
                    }
                }
                if !batch.is_empty() {
                    self.write(&mut batch);
                }
                if !amends.is_empty() {
                    self.amend(&mut amends);
                }
                for ack in acks.drain(..) {
                    let _ = ack.try_send(());
                }
                break;
            }
        }
    }

    /// Opens the store again, at most once per [`RETRY_OPEN`]; an error only
    /// when an attempt failed (the caller logs it, after counting what it
    /// lost, so the log line's total includes it).
    fn reopen(&mut self) -> Result<(), String> {
        if self.last_open_attempt.elapsed() < RETRY_OPEN {
            return Ok(());
        }
        self.last_open_attempt = Instant::now();
        let s = EventStore::open(&self.config.data_dir, self.config.max_events)
            .map_err(|e| e.to_string())?;
        self.store = Some(s);
        tracing::warn!("event store available again");
        Ok(())
    }

    /// Runs `op` on the store, reopening it first if it is closed. On
    /// success the store is marked healthy; on failure it is closed (the
    /// file may have been replaced: reopen before the next batch) and the
    /// error returned for the caller to count and log.
    fn with_store<T>(
        &mut self,
        op: impl FnOnce(&mut EventStore) -> Result<T, super::EventError>,
    ) -> Result<T, String> {
        if self.store.is_none() {
            self.reopen()?;
        }
        let result = match self.store.as_mut() {
            Some(store) => op(store).map_err(|e| e.to_string()),
            None => Err("event store is not open".to_string()),
        };
        match result {
            Ok(v) => {
                if !self.shared.healthy.swap(true, Ordering::SeqCst) {
                    tracing::warn!("event store healthy again");
                }
                Ok(v)
            }
            Err(e) => {
                self.store = None;
                Err(e)
            }
        }
    }

    fn write(&mut self, batch: &mut Vec<Event>) {
        let n = batch.len() as u64;
        let written = self.with_store(|store| store.insert(batch));
        batch.clear();
        match written {
            Ok(()) => {
                self.shared.written.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                // Counted before the log line, which reports the total.
                self.shared.failed.fetch_add(n, Ordering::Relaxed);
                self.fail_log(&e);
            }
        }
    }

    fn amend(&mut self, amends: &mut Vec<Amendment>) {
        let n = amends.len() as u64;
        let changed = self.with_store(|store| store.amend(amends));
        amends.clear();
        // A failed store lost them all.
        let changed = match changed {
            Ok(c) => c as u64,
            Err(e) => {
                self.fail_log(&e);
                0
            }
        };
        self.shared.amended.fetch_add(changed, Ordering::Relaxed);
        self.shared
            .amend_lost
            .fetch_add(n - changed, Ordering::Relaxed);
        if changed < n && self.store.is_some() {
            // Its event was pruned, or its insert was dropped or lost.
            tracing::warn!(
                missing = n - changed,
                "stream outcome not recorded: its event is not in the store"
            );
        }
    }

    fn fail_log(&mut self, error: &str) {
        let was_healthy = self.shared.healthy.swap(false, Ordering::SeqCst);
        let due = self
            .last_fail_log
            .is_none_or(|t| t.elapsed() >= FAIL_LOG_EVERY);
        if was_healthy || due {
            self.last_fail_log = Some(Instant::now());
            tracing::error!(
                error,
                lost_total = self.shared.failed.load(Ordering::Relaxed),
                "event store unavailable: decision events are being lost"
            );
        }
    }
}
