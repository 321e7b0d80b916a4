//! Event sinks besides the SQLite store (`policy.audit-logger.sinks`): a
//! JSON Lines file with rotation, stdout, and syslog (RFC 5424 over the
//! local socket, UDP or TCP). Every sink writes the one versioned event
//! shape ([`Event::json`]).
//!
//! The request path only clones the event into each sink's bounded queue
//! (never waits): each sink has its own thread that serialises and writes.
//! A full queue drops the event and counts it; a sink that fails counts
//! what it could not deliver and retries every second. When it has caught
//! up again it writes one `sink-dropped` event saying how many it missed
//! (to itself and to the store) and logs it. A sink with
//! `on_failure: refuse` makes the audit-logger refuse requests while it is
//! down ([`crate::record::SinkHealth`]).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::{Decision, Event, EventWriter, PolicyNote};
use crate::config::{SinkConfig, SinkKind, StoreFailure, SyslogAddress};

/// How often a sink that is down tries again, and the longest an idle sink
/// waits before looking at reopen requests.
const RETRY: Duration = Duration::from_secs(1);
/// Connecting to and writing to a syslog collector give up after this.
const NET_TIMEOUT: Duration = Duration::from_secs(5);
/// A down sink logs its error again at most this often.
const FAIL_LOG_EVERY: Duration = Duration::from_secs(30);
/// Most events written before the buffered output is flushed.
const BATCH: usize = 1024;

/// Told about each sink's losses and state (the metrics implement it).
pub trait SinkObserver: Send + Sync {
    /// `n` events did not reach `sink`: `reason` is `queue_full` or
    /// `sink_down`.
    fn dropped(&self, sink: &str, reason: &'static str, n: u64);
    /// `sink` is up (taking events) or down.
    fn up(&self, sink: &str, up: bool);
}

/// Counters of one sink since kt started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// The sink's name (`file:PATH`, `stdout`, `syslog:ADDRESS`).
    pub name: String,
    /// Whether it is taking events now.
    pub up: bool,
    /// Events written.
    pub written: u64,
    /// Events dropped because its queue was full.
    pub queue_full: u64,
    /// Events not delivered because it was down or a write failed.
    pub failed: u64,
}

enum Msg {
    Event(Arc<Event>),
    Flush(SyncSender<()>),
    Stop,
}

struct Shared {
    name: Arc<str>,
    refuse: bool,
    up: AtomicBool,
    written: AtomicU64,
    queue_full: AtomicU64,
    failed: AtomicU64,
    /// Losses not yet reported by a `sink-dropped` event.
    unreported_full: AtomicU64,
    reopen: AtomicBool,
    observer: RwLock<Option<Arc<dyn SinkObserver>>>,
}

impl Shared {
    fn observe(&self, f: impl FnOnce(&dyn SinkObserver)) {
        if let Ok(o) = self.observer.read()
            && let Some(o) = o.as_ref()
        {
            f(o.as_ref());
        }
    }
}

struct Sink {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

struct Inner {
    sinks: Vec<Sink>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The configured sinks: cheap to clone; [`Sinks::shutdown`] writes what is
/// queued and stops their threads.
#[derive(Clone)]
pub struct Sinks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Sinks {
    /// Opens every sink (a sink that cannot open now starts down and keeps
    /// trying) and starts its thread. `store` also receives the
    /// `sink-dropped` events.
    pub fn spawn(configs: &[SinkConfig], store: Option<EventWriter>) -> Sinks {
        let mut sinks = Vec::new();
        let mut threads = Vec::new();
        for config in configs {
            let shared = Arc::new(Shared {
                name: config.name().into(),
                refuse: config.on_failure == StoreFailure::Refuse,
                up: AtomicBool::new(false),
                written: AtomicU64::new(0),
                queue_full: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                unreported_full: AtomicU64::new(0),
                reopen: AtomicBool::new(false),
                observer: RwLock::new(None),
            });
            let (tx, rx) = mpsc::sync_channel(config.queue.max(1));
            let mut worker = Worker {
                rx,
                out: output(&config.kind),
                shared: Arc::clone(&shared),
                store: store.clone(),
                last_attempt: None,
                last_fail_log: None,
                failed_unreported: 0,
            };
            // Opened here, so a refusing sink that cannot open refuses from
            // the first request.
            worker.try_open();
            match std::thread::Builder::new()
                .name("kt-sink".into())
                .spawn(move || worker.run())
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.up.store(false, Ordering::SeqCst);
                    tracing::error!(sink = %shared.name, error = %e, "cannot start the event sink's thread: it receives nothing");
                }
            }
            sinks.push(Sink { tx, shared });
        }
        Sinks {
            inner: Arc::new(Inner {
                sinks,
                threads: Mutex::new(threads),
            }),
        }
    }

    /// Reports drops and up/down changes to `observer` from now on (and the
    /// current state right away).
    pub fn set_observer(&self, observer: Arc<dyn SinkObserver>) {
        for s in &self.inner.sinks {
            observer.up(&s.shared.name, s.shared.up.load(Ordering::SeqCst));
            if let Ok(mut o) = s.shared.observer.write() {
                *o = Some(Arc::clone(&observer));
            }
        }
    }

    /// Queues `event` for every sink. Never blocks: a full queue drops it
    /// for that sink and counts it.
    pub fn record(&self, event: &Event) {
        if self.inner.sinks.is_empty() {
            return;
        }
        let event = Arc::new(event.clone());
        for s in &self.inner.sinks {
            match s.tx.try_send(Msg::Event(Arc::clone(&event))) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    s.shared.queue_full.fetch_add(1, Ordering::Relaxed);
                    s.shared.unreported_full.fetch_add(1, Ordering::Relaxed);
                    s.shared
                        .observe(|o| o.dropped(&s.shared.name, "queue_full", 1));
                }
            }
        }
    }

    /// Asks every file sink to reopen its file before its next write (after
    /// logrotate moved it: SIGUSR1).
    pub fn reopen(&self) {
        for s in &self.inner.sinks {
            s.shared.reopen.store(true, Ordering::SeqCst);
        }
    }

    /// Per-sink counters.
    pub fn stats(&self) -> Vec<SinkStats> {
        self.inner
            .sinks
            .iter()
            .map(|s| SinkStats {
                name: s.shared.name.to_string(),
                up: s.shared.up.load(Ordering::SeqCst),
                written: s.shared.written.load(Ordering::Relaxed),
                queue_full: s.shared.queue_full.load(Ordering::Relaxed),
                failed: s.shared.failed.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Waits until every event queued before this call was handled
    /// (written or counted), at most `timeout`. False on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut acks = Vec::new();
        for s in &self.inner.sinks {
            let (ack_tx, ack_rx) = mpsc::sync_channel(1);
            if !send_until(&s.tx, Msg::Flush(ack_tx), deadline) {
                return false;
            }
            acks.push(ack_rx);
        }
        acks.iter().all(|a| {
            a.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_ok()
        })
    }

    /// Writes what is queued and stops every sink's thread, waiting at most
    /// `timeout`. True when every thread finished.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for s in &self.inner.sinks {
            send_until(&s.tx, Msg::Stop, deadline);
        }
        let threads = match self.inner.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return false,
        };
        let mut all = true;
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                all &= t.join().is_ok();
            } else {
                all = false;
            }
        }
        if !all {
            tracing::error!("event sinks did not finish in time; queued events are lost");
        }
        all
    }
}

impl crate::record::SinkHealth for Sinks {
    fn refusing(&self) -> Option<Arc<str>> {
        self.inner
            .sinks
            .iter()
            .find(|s| s.shared.refuse && !s.shared.up.load(Ordering::SeqCst))
            .map(|s| Arc::clone(&s.shared.name))
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

struct Worker {
    rx: Receiver<Msg>,
    out: Box<dyn Output>,
    shared: Arc<Shared>,
    store: Option<EventWriter>,
    last_attempt: Option<Instant>,
    last_fail_log: Option<Instant>,
    failed_unreported: u64,
}

impl Worker {
    fn run(mut self) {
        let mut acks: Vec<SyncSender<()>> = Vec::new();
        loop {
            let first = match self.rx.recv_timeout(RETRY) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut stopping = false;
            let mut n = 0;
            let mut next = first;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => {
                        self.write(&e);
                        n += 1;
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::Stop => stopping = true,
                }
                if n >= BATCH {
                    self.flush();
                    n = 0;
                }
                // After a stop, events queued by other clones still count.
                next = self.rx.try_recv().ok();
            }
            if self.shared.reopen.swap(false, Ordering::SeqCst) {
                self.flush();
                self.out.close();
                self.try_open();
            } else if !self.shared.up.load(Ordering::SeqCst) {
                self.retry();
            }
            self.flush();
            // The queue is empty: caught up. Say what was missed.
            self.report_losses();
            self.flush();
            for ack in acks.drain(..) {
                let _ = ack.try_send(());
            }
            if stopping {
                break;
            }
        }
        self.flush();
        self.out.close();
    }

    fn write(&mut self, e: &Event) {
        if self.shared.reopen.swap(false, Ordering::SeqCst) {
            self.flush();
            self.out.close();
            self.try_open();
        }
        if !self.shared.up.load(Ordering::SeqCst) {
            self.retry();
        }
        if !self.shared.up.load(Ordering::SeqCst) {
            self.lost(1);
            return;
        }
        match self.out.write(e) {
            Ok(()) => {
                self.shared.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                self.lost(1);
                self.down(&err);
            }
        }
    }

    fn flush(&mut self) {
        if self.shared.up.load(Ordering::SeqCst)
            && let Err(err) = self.out.flush()
        {
            // What was buffered is lost; how many is not known exactly.
            self.down(&err);
        }
    }

    fn lost(&mut self, n: u64) {
        self.shared.failed.fetch_add(n, Ordering::Relaxed);
        self.failed_unreported += n;
        self.shared
            .observe(|o| o.dropped(&self.shared.name, "sink_down", n));
    }

    /// Opens again when the last attempt is a retry interval ago.
    fn retry(&mut self) {
        if self.last_attempt.is_some_and(|t| t.elapsed() < RETRY) {
            return;
        }
        self.try_open();
    }

    fn try_open(&mut self) {
        self.last_attempt = Some(Instant::now());
        match self.out.open() {
            Ok(()) => {
                if !self.shared.up.swap(true, Ordering::SeqCst) {
                    if self.last_fail_log.is_some() {
                        tracing::warn!(sink = %self.shared.name, "event sink available again");
                    }
                    self.shared.observe(|o| o.up(&self.shared.name, true));
                }
            }
            Err(err) => self.down(&err),
        }
    }

    fn down(&mut self, err: &io::Error) {
        self.out.close();
        let was_up = self.shared.up.swap(false, Ordering::SeqCst);
        if was_up {
            self.shared.observe(|o| o.up(&self.shared.name, false));
        }
        let due = self
            .last_fail_log
            .is_none_or(|t| t.elapsed() >= FAIL_LOG_EVERY);
        if was_up || due {
            self.last_fail_log = Some(Instant::now());
            let refusing = if self.shared.refuse {
                "; requests are refused until it recovers (on_failure: refuse)"
            } else {
                ""
            };
            tracing::error!(
                sink = %self.shared.name,
                error = %err,
                "event sink unavailable: events are not reaching it{refusing}"
            );
        }
    }

    /// When the sink is up and missed events, writes one `sink-dropped`
    /// event (to it and to the store) and logs it.
    fn report_losses(&mut self) {
        if !self.shared.up.load(Ordering::SeqCst) {
            return;
        }
        let full = self.shared.unreported_full.swap(0, Ordering::Relaxed);
        let failed = std::mem::take(&mut self.failed_unreported);
        if full + failed == 0 {
            return;
        }
        tracing::warn!(
            sink = %self.shared.name,
            queue_full = full,
            sink_down = failed,
            "event sink missed events"
        );
        let e = loss_event(&self.shared.name, full, failed);
        if let Some(store) = &self.store {
            store.record(e.clone());
        }
        match self.out.write(&e) {
            Ok(()) => {
                self.shared.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                // Reported again once it is back.
                self.shared
                    .unreported_full
                    .fetch_add(full, Ordering::Relaxed);
                self.failed_unreported += failed;
                self.down(&err);
            }
        }
    }
}

/// The rule of the event a sink writes after it missed events.
pub const SINK_DROPPED: &str = "sink-dropped";

/// The event saying `sink` missed `full + failed` events.
fn loss_event(sink: &str, full: u64, failed: u64) -> Event {
    let now = super::now_ms();
    let mut e = Event::new(format!("kt-sink-{now}"), Decision::Error);
    e.policy.push(PolicyNote {
        policy: "audit-logger".into(),
        decision: "audit".into(),
        rule_id: Some(SINK_DROPPED.into()),
        location: Some(sink.to_string()),
    });
    e.message = Some(format!(
        "{} events did not reach event sink {sink}: {full} dropped (queue full), {failed} lost while it was down",
        full + failed
    ));
    e
}

/// One sink's destination. Runs on the sink's thread only.
trait Output: Send {
    /// Opens (or reconnects); closes first when open.
    fn open(&mut self) -> io::Result<()>;
    /// Writes one event (possibly buffered).
    fn write(&mut self, e: &Event) -> io::Result<()>;
    /// Pushes out what is buffered.
    fn flush(&mut self) -> io::Result<()>;
    /// Lets go of the file or connection.
    fn close(&mut self);
}

fn output(kind: &SinkKind) -> Box<dyn Output> {
    match kind {
        SinkKind::File {
            path,
            rotate_bytes,
            rotate_age,
            max_files,
        } => Box::new(FileOut {
            path: path.clone(),
            rotate_bytes: *rotate_bytes,
            rotate_age: *rotate_age,
            max_files: *max_files,
            file: None,
            size: 0,
            opened: Instant::now(),
            line: Vec::new(),
        }),
        SinkKind::Stdout => Box::new(StdoutOut { line: Vec::new() }),
        SinkKind::Syslog { address, facility } => Box::new(SyslogOut {
            address: address.clone(),
            facility: *facility,
            conn: None,
            hostname: hostname(),
            msg: Vec::new(),
        }),
    }
}

/// `event` as one JSON line (with its newline) into `buf`.
fn json_line(buf: &mut Vec<u8>, e: &Event) -> io::Result<()> {
    buf.clear();
    serde_json::to_writer(&mut *buf, &e.json()).map_err(io::Error::from)?;
    buf.push(b'\n');
    Ok(())
}

/// A JSON Lines file rotated by size and age: `PATH` is written, `PATH.1`
/// is the newest rotated file, `PATH.<max_files>` the oldest kept.
struct FileOut {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    rotate_age: Option<Duration>,
    max_files: u32,
    file: Option<BufWriter<File>>,
    size: u64,
    opened: Instant,
    line: Vec<u8>,
}

impl FileOut {
    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        for i in (1..self.max_files).rev() {
            match std::fs::rename(numbered(&self.path, i), numbered(&self.path, i + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::rename(&self.path, numbered(&self.path, 1)) {
            // Moved away already (logrotate before SIGUSR1): start anew.
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.open()
    }
}

/// `PATH.n`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Output for FileOut {
    fn open(&mut self) -> io::Result<()> {
        self.file = None;
        // Appends; never follows a symlink put in its place; 0600 from
        // the start (the directory is the operator's: it is not created).
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            // Events name processes and keys' owners: not for other users.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        self.size = meta.len();
        self.opened = Instant::now();
        self.file = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    fn write(&mut self, e: &Event) -> io::Result<()> {
        let mut line = std::mem::take(&mut self.line);
        json_line(&mut line, e)?;
        let len = line.len() as u64;
        let full = self
            .rotate_bytes
            .is_some_and(|max| self.size > 0 && self.size + len > max);
        let old = self
            .rotate_age
            .is_some_and(|age| self.opened.elapsed() >= age);
        if full || old {
            self.rotate()?;
        }
        let result = match self.file.as_mut() {
            Some(f) => f.write_all(&line),
            None => Err(io::Error::other("file is not open")),
        };
        self.line = line;
        result?;
        self.size += len;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }

    fn close(&mut self) {
        if let Some(mut f) = self.file.take() {
            let _ = f.flush();
        }
    }
}

/// JSON Lines on kt's standard output (kt logs to stderr).
struct StdoutOut {
    line: Vec<u8>,
}

impl Output for StdoutOut {
    fn open(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn write(&mut self, e: &Event) -> io::Result<()> {
        json_line(&mut self.line, e)?;
        io::stdout().lock().write_all(&self.line)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }

    fn close(&mut self) {}
}

enum Conn {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    Tcp(BufWriter<TcpStream>),
}

/// RFC 5424 messages, the event's JSON as MSG.
struct SyslogOut {
    address: SyslogAddress,
    facility: u8,
    conn: Option<Conn>,
    hostname: String,
    msg: Vec<u8>,
}

impl Output for SyslogOut {
    fn open(&mut self) -> io::Result<()> {
        self.conn = None;
        self.conn = Some(match &self.address {
            SyslogAddress::Unix(path) => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                Conn::Unix(s)
            }
            SyslogAddress::Udp(hostport) => {
                let addr = resolve(hostport)?;
                let local: std::net::SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(local)?;
                // Connected: a collector that is not listening shows up as
                // an error on a later send (ICMP port unreachable).
                s.connect(addr)?;
                Conn::Udp(s)
            }
            SyslogAddress::Tcp(hostport) => {
                let addr = resolve(hostport)?;
                let s = TcpStream::connect_timeout(&addr, NET_TIMEOUT)?;
                s.set_write_timeout(Some(NET_TIMEOUT))?;
                s.set_nodelay(true)?;
                Conn::Tcp(BufWriter::with_capacity(64 * 1024, s))
            }
        });
        Ok(())
    }

    fn write(&mut self, e: &Event) -> io::Result<()> {
        let mut msg = std::mem::take(&mut self.msg);
        rfc5424(&mut msg, e, self.facility, &self.hostname)?;
        let result = match self.conn.as_mut() {
            None => Err(io::Error::other("not connected")),
            Some(Conn::Unix(s)) => s.send(&msg).map(drop),
            Some(Conn::Udp(s)) => s.send(&msg).map(drop),
            // RFC 6587 octet counting: "LEN SP MSG".
            Some(Conn::Tcp(s)) => s
                .write_all(format!("{} ", msg.len()).as_bytes())
                .and_then(|()| s.write_all(&msg)),
        };
        self.msg = msg;
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.conn.as_mut() {
            Some(Conn::Tcp(s)) => s.flush(),
            _ => Ok(()),
        }
    }

    fn close(&mut self) {
        if let Some(Conn::Tcp(mut s)) = self.conn.take() {
            let _ = s.flush();
        }
    }
}

fn resolve(hostport: &str) -> io::Result<std::net::SocketAddr> {
    hostport
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{hostport} resolves to no address")))
}

/// This host's name for the HOSTNAME field (`-` when unknown).
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(255)
        .collect();
    if name.is_empty() { "-".into() } else { name }
}

/// The RFC 5424 message for `e`:
/// `<PRI>1 TIMESTAMP HOSTNAME kt PROCID MSGID - JSON`, MSGID the decision,
/// severity by decision (allow info, redact notice, block warning, error err).
fn rfc5424(buf: &mut Vec<u8>, e: &Event, facility: u8, hostname: &str) -> io::Result<()> {
    let severity = match e.decision {
        Decision::Allow => 6,
        Decision::Redact => 5,
        Decision::Block => 4,
        Decision::Error => 3,
    };
    let pri = u32::from(facility) * 8 + severity;
    let time = SystemTime::UNIX_EPOCH
        + Duration::from_millis(u64::try_from(e.time_ms).unwrap_or_default());
    buf.clear();
    write!(
        buf,
        "<{pri}>1 {} {hostname} kt {} {} - ",
        humantime::format_rfc3339_millis(time),
        std::process::id(),
        e.decision.as_str()
    )?;
    serde_json::to_writer(&mut *buf, &e.json()).map_err(io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SinkHealth;

    fn event(id: &str) -> Event {
        let mut e = Event::new(id, Decision::Allow);
        e.provider = Some("openai".into());
        e.status = Some(200);
        e
    }

    fn file_sink(path: &Path, on_failure: StoreFailure, queue: usize) -> SinkConfig {
        SinkConfig {
            kind: SinkKind::File {
                path: path.to_path_buf(),
                rotate_bytes: None,
                rotate_age: None,
                max_files: 5,
            },
            on_failure,
            queue,
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<(String, &'static str, u64)>>);

    impl SinkObserver for Seen {
        fn dropped(&self, sink: &str, reason: &'static str, n: u64) {
            self.0.lock().unwrap().push((sink.to_string(), reason, n));
        }
        fn up(&self, _sink: &str, _up: bool) {}
    }

    #[test]
    fn file_sink_writes_versioned_json_lines_private_to_kt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let sinks = Sinks::spawn(&[file_sink(&path, StoreFailure::Log, 100)], None);
        sinks.record(&event("r1"));
        sinks.record(&event("r2"));
        assert!(sinks.flush(Duration::from_secs(5)));
        let got = lines(&path);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["schema"], 1);
        assert_eq!(got[0]["request_id"], "r1");
        assert_eq!(got[1]["decision"], "allow");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(sinks.shutdown(Duration::from_secs(5)));
    }

    #[test]
    fn a_refusing_sink_that_is_down_refuses_until_it_recovers_and_reports_the_loss() {
        let dir = tempfile::tempdir().unwrap();
        // The directory does not exist yet: the sink cannot open.
        let path = dir.path().join("later").join("events.jsonl");
        let sinks = Sinks::spawn(&[file_sink(&path, StoreFailure::Refuse, 100)], None);
        let seen = Arc::new(Seen::default());
        sinks.set_observer(seen.clone());
        assert_eq!(
            sinks.refusing().as_deref(),
            Some(format!("file:{}", path.display()).as_str())
        );
        sinks.record(&event("lost"));
        assert!(sinks.flush(Duration::from_secs(5)));
        assert_eq!(sinks.stats()[0].failed, 1);
        assert_eq!(seen.0.lock().unwrap()[0].1, "sink_down");

        std::fs::create_dir(dir.path().join("later")).unwrap();
        // Retried within a second, without traffic.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sinks.refusing().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(sinks.refusing(), None);
        sinks.record(&event("kept"));
        assert!(sinks.flush(Duration::from_secs(5)));
        let got = lines(&path);
        let loss = got
            .iter()
            .find(|l| l["policy"][0]["rule_id"] == SINK_DROPPED)
            .expect("a sink-dropped event");
        assert!(
            loss["message"]
                .as_str()
                .unwrap()
                .contains("1 lost while it was down"),
            "{loss}"
        );
        assert!(got.iter().any(|l| l["request_id"] == "kept"));
        assert!(!got.iter().any(|l| l["request_id"] == "lost"));
    }

    #[test]
    fn a_logging_sink_that_is_down_never_refuses_and_counts_its_losses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("events.jsonl");
        let sinks = Sinks::spawn(&[file_sink(&path, StoreFailure::Log, 100)], None);
        assert_eq!(sinks.refusing(), None);
        for i in 0..3 {
            sinks.record(&event(&format!("r{i}")));
        }
        assert!(sinks.flush(Duration::from_secs(5)));
        let s = &sinks.stats()[0];
        assert!(!s.up);
        assert_eq!((s.written, s.failed), (0, 3));
    }

    #[test]
    fn a_full_queue_drops_without_blocking_and_counts() {
        // A unix datagram socket nobody reads: the sink's sends block once
        // the socket's buffer is full, so its queue fills.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("log");
        let _server = UnixDatagram::bind(&sock).unwrap();
        let config = SinkConfig {
            kind: SinkKind::Syslog {
                address: SyslogAddress::Unix(sock),
                facility: 16,
            },
            on_failure: StoreFailure::Log,
            queue: 4,
        };
        let sinks = Sinks::spawn(&[config], None);
        let seen = Arc::new(Seen::default());
        sinks.set_observer(seen.clone());
        // Returns although the sink's thread is stuck in a send.
        for i in 0..20_000 {
            sinks.record(&event(&format!("r{i}")));
        }
        let s = &sinks.stats()[0];
        assert!(s.queue_full > 0, "{s:?}");
        assert!(
            seen.0
                .lock()
                .unwrap()
                .iter()
                .any(|(_, reason, _)| *reason == "queue_full")
        );
    }

    #[test]
    fn syslog_messages_are_rfc5424_with_the_json_event() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("log");
        let server = UnixDatagram::bind(&sock).unwrap();
        let config = SinkConfig {
            kind: SinkKind::Syslog {
                address: SyslogAddress::Unix(sock),
                facility: 16,
            },
            on_failure: StoreFailure::Log,
            queue: 10,
        };
        let sinks = Sinks::spawn(&[config], None);
        let mut e = event("r1");
        e.decision = Decision::Block;
        e.time_ms = 1_700_000_000_123;
        sinks.record(&e);
        let mut buf = vec![0u8; 65536];
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = server.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        // local0 (16) * 8 + warning (4).
        let head = format!(
            "<132>1 2023-11-14T22:13:20.123Z {} kt {} block - {{",
            hostname(),
            std::process::id()
        );
        assert!(msg.starts_with(&head), "{msg}");
        let json: serde_json::Value = serde_json::from_str(&msg[head.len() - 1..]).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["request_id"], "r1");
    }

    #[test]
    fn the_file_rotates_by_size_and_reopens_after_a_move() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut config = file_sink(&path, StoreFailure::Log, 10_000);
        if let SinkKind::File {
            rotate_bytes,
            max_files,
            ..
        } = &mut config.kind
        {
            *rotate_bytes = Some(2048);
            *max_files = 100;
        }
        let sinks = Sinks::spawn(&[config], None);
        for i in 0..200 {
            sinks.record(&event(&format!("r{i}")));
        }
        assert!(sinks.flush(Duration::from_secs(5)));
        let mut ids = Vec::new();
        let mut files = 0;
        for n in 0..=100 {
            let p = if n == 0 {
                path.clone()
            } else {
                numbered(&path, n)
            };
            if !p.exists() {
                continue;
            }
            files += 1;
            assert!(std::fs::metadata(&p).unwrap().len() <= 2048);
            ids.extend(lines(&p).into_iter().map(|l| l["request_id"].clone()));
        }
        assert!(files > 2, "{files}");
        ids.sort_by_key(|v| v.as_str().unwrap()[1..].parse::<u32>().unwrap());
        let want: Vec<_> = (0..200)
            .map(|i| serde_json::json!(format!("r{i}")))
            .collect();
        assert_eq!(ids, want);

        // logrotate's move, then SIGUSR1's reopen.
        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).unwrap();
        sinks.reopen();
        sinks.record(&event("after"));
        assert!(sinks.flush(Duration::from_secs(5)));
        assert_eq!(lines(&path).len(), 1);
        assert!(!lines(&moved).iter().any(|l| l["request_id"] == "after"));
    }
}
