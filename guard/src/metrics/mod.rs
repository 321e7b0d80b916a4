//! Prometheus metrics of a running guard, fed by the same request records
//! the event store gets (a [`RecordSink`] in front of it), so a number and
//! an event never disagree about what happened. Exposed by the gateway on
//! `gateway.metrics` (off by default) in the OpenMetrics text format.
//!
//! Labels have bounded values only: providers, target ids, decisions,
//! status codes, rule ids, managed secret names (or `unmanaged`). Never a
//! key, a fingerprint, a path or a client.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::record::{CutReason, PolicyAction, PolicyId, RecordSink, RequestRecord, StreamCut};

type Labels<const N: usize> = [(&'static str, String); N];

/// What the metrics read from the running gateway when scraped (budgets
/// and per-target health live there, not in records).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Connections refused because `gateway.max_connections` was reached.
    pub budget_refused: u64,
    /// Idle connections closed to make room.
    pub budget_evicted: u64,
    /// Connections refused by `gateway.max_connections_per_uid`.
    pub uid_budget_refused: u64,
    /// Per target: id, whether it is in a cool-down, last probe result.
    pub targets: Vec<TargetHealth>,
    /// The running config's generation (1 at start, +1 per reload).
    pub generation: u64,
}

/// One target's health for the gauges.
#[derive(Clone, Debug, Default)]
pub struct TargetHealth {
    /// The target's id.
    pub target: String,
    /// Skipped for its cool-down now.
    pub cooling: bool,
    /// The last periodic probe's result label (`ok`, `rejected`, …).
    pub probe: Option<&'static str>,
}

/// Every metric kt exposes.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels<4>, Counter>,
    fallbacks: Family<Labels<3>, Counter>,
    dlp: Family<Labels<2>, Counter>,
    keys: Family<Labels<2>, Counter>,
    guard: Family<Labels<1>, Counter>,
    reloads: Family<Labels<1>, Counter>,
    stream_cuts: Family<Labels<1>, Counter>,
    added_latency: Histogram,
    upstream_latency: Family<Labels<1>, Histogram>,
    capture_attached: Gauge,
    target_up: Family<Labels<1>, Gauge>,
    target_probe: Family<Labels<2>, Gauge>,
    generation: Gauge,
    budget: Family<Labels<1>, Counter>,
    sink_dropped: Family<Labels<2>, Counter>,
    sink_up: Family<Labels<1>, Gauge>,
    /// The central secret store (`secrets.store`), when configured.
    store: Family<Labels<1>, Gauge>,
    budget_seen: Mutex<[u64; 3]>,
    /// Fingerprint → managed secret name, refreshed on reload.
    known: RwLock<Arc<HashMap<String, String>>>,
    snapshot: RwLock<Option<Box<dyn Fn() -> Snapshot + Send + Sync>>>,
    recorded: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("recorded", &self.recorded.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 0.5 ms to ~16 s.
    exponential_buckets(0.000_5, 2.0, 16)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kt");
        let requests = Family::<Labels<4>, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by provider, target that served, decision and status",
            requests.clone(),
        );
        let fallbacks = Family::<Labels<3>, Counter>::default();
        registry.register(
            "fallbacks",
            "Moves from one target to the next, by from, to and the first target's outcome",
            fallbacks.clone(),
        );
        let dlp = Family::<Labels<2>, Counter>::default();
        registry.register(
            "dlp_findings",
            "DLP findings, by rule and action",
            dlp.clone(),
        );
        let keys = Family::<Labels<2>, Counter>::default();
        registry.register(
            "presented_keys",
            "Requests by the key the client presented: the managed secret it equals, or unmanaged",
            keys.clone(),
        );
        let guard = Family::<Labels<1>, Counter>::default();
        registry.register(
            "guard_decisions",
            "Decisions of kt's own rules (connections refused, budgets, health, probes, rotation alarms), by rule",
            guard.clone(),
        );
        let reloads = Family::<Labels<1>, Counter>::default();
        registry.register(
            "reloads",
            "Reloads, by result (applied or refused)",
            reloads.clone(),
        );
        let stream_cuts = Family::<Labels<1>, Counter>::default();
        registry.register(
            "stream_cuts",
            "Responses cut after their headers went out, by reason",
            stream_cuts.clone(),
        );
        let added_latency = Histogram::new(latency_buckets());
        registry.register_with_unit(
            "added_latency",
            "Time kt added before the response headers: total minus the serving upstream's time to first byte",
            Unit::Seconds,
            added_latency.clone(),
        );
        let upstream_latency = Family::<Labels<1>, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register_with_unit(
            "upstream_first_byte",
            "Time from sending a request upstream to its response headers, by provider",
            Unit::Seconds,
            upstream_latency.clone(),
        );
        let capture_attached = Gauge::default();
        registry.register(
            "capture_attached",
            "1 while the eBPF capture programs are attached",
            capture_attached.clone(),
        );
        let target_up = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "target_up",
            "0 while a target is skipped for its cool-down, else 1",
            target_up.clone(),
        );
        let target_probe = Family::<Labels<2>, Gauge>::default();
        registry.register(
            "target_probe",
            "1 for the result of a target's last periodic probe",
            target_probe.clone(),
        );
        let generation = Gauge::default();
        registry.register(
            "config_generation",
            "The running config's generation: 1 at start, +1 per applied reload",
            generation.clone(),
        );
        let budget = Family::<Labels<1>, Counter>::default();
        registry.register(
            "connection_budget",
            "Connections refused or closed by a budget, by which",
            budget.clone(),
        );
        let sink_dropped = Family::<Labels<2>, Counter>::default();
        registry.register(
            "event_sink_dropped",
            "Events that did not reach an event sink, by sink and reason (queue_full, sink_down)",
            sink_dropped.clone(),
        );
        let sink_up = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "event_sink_up",
            "1 while an event sink takes events, 0 while it is down",
            sink_up.clone(),
        );
        let store = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "secret_store",
            "The central secret store (secrets.store): up (1/0), stale_secrets (served past a failed refresh), \
             expired_secrets (past max_stale, not served), last_success_seconds (Unix time), failed_refreshes",
            store.clone(),
        );
        Metrics {
            store,
            registry,
            requests,
            fallbacks,
            dlp,
            keys,
            guard,
            reloads,
            stream_cuts,
            added_latency,
            upstream_latency,
            capture_attached,
            target_up,
            target_probe,
            generation,
            budget,
            sink_dropped,
            sink_up,
            budget_seen: Mutex::new([0; 3]),
            known: RwLock::new(Arc::new(HashMap::new())),
            snapshot: RwLock::new(None),
            recorded: AtomicU64::new(0),
        }
    }

    /// The central secret store's health after a refresh.
    pub fn set_secret_store(&self, h: &crate::secrets::vault::StoreHealth) {
        let gauge = |what: &str, v: i64| {
            self.store
                .get_or_create(&[("what", what.to_string())])
                .set(v);
        };
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        gauge("up", i64::from(h.up));
        gauge("stale_secrets", n(h.stale.len()));
        gauge("expired_secrets", n(h.expired.len()));
        gauge(
            "last_success_seconds",
            h.last_success_ms.map_or(0, |ms| ms / 1000),
        );
        gauge(
            "failed_refreshes",
            i64::try_from(h.failed_refreshes).unwrap_or(i64::MAX),
        );
    }

    /// Which managed secret a presented key's fingerprint is (refreshed
    /// after every reload).
    pub fn set_known(&self, known: HashMap<String, String>) {
        if let Ok(mut k) = self.known.write() {
            *k = Arc::new(known);
        }
    }

    /// Where the scrape-time gauges come from (the running gateway).
    pub fn set_snapshot(&self, f: Box<dyn Fn() -> Snapshot + Send + Sync>) {
        if let Ok(mut s) = self.snapshot.write() {
            *s = Some(f);
        }
    }

    /// Capture attached (true) or detached.
    pub fn set_capture_attached(&self, attached: bool) {
        self.capture_attached.set(i64::from(attached));
    }

    /// Records counted so far (for tests and the benchmark).
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Counts one request record.
    pub fn observe(&self, r: &RequestRecord) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        for note in &r.policy {
            match note.policy {
                PolicyId::DlpFilter => {
                    self.dlp
                        .get_or_create(&[
                            ("rule", note.rule.clone()),
                            ("action", note.action.label().to_string()),
                        ])
                        .inc();
                }
                PolicyId::Guard => {
                    self.guard
                        .get_or_create(&[("rule", note.rule.clone())])
                        .inc();
                    match note.rule.as_str() {
                        "reload" => self
                            .reloads
                            .get_or_create(&[("result", "applied".to_string())])
                            .inc(),
                        "reload-refused" => self
                            .reloads
                            .get_or_create(&[("result", "refused".to_string())])
                            .inc(),
                        _ => 0,
                    };
                }
                PolicyId::AuditLogger => {}
            }
        }
        if r.arrival == crate::record::Arrival::Internal {
            // Health, probe and reload records are kt's own, not requests.
            return;
        }
        let decision = if r.policy.iter().any(|n| n.action == PolicyAction::Block) {
            "block"
        } else if r.policy.iter().any(|n| n.action == PolicyAction::Redact) {
            "redact"
        } else if r.error_code.is_some() || r.status >= 500 {
            "error"
        } else {
            "allow"
        };
        let provider = r.provider.clone().unwrap_or_else(|| "-".into());
        self.requests
            .get_or_create(&[
                ("provider", provider.clone()),
                ("target", r.chosen.clone().unwrap_or_else(|| "-".into())),
                ("decision", decision.to_string()),
                ("status", r.status.to_string()),
            ])
            .inc();
        for pair in r.attempts.windows(2) {
            self.fallbacks
                .get_or_create(&[
                    ("from", pair[0].target.clone()),
                    ("to", pair[1].target.clone()),
                    ("reason", pair[0].outcome.label()),
                ])
                .inc();
        }
        if let Some(fp) = &r.client_key_fingerprint {
            let name = self
                .known
                .read()
                .ok()
                .and_then(|k| k.get(fp).cloned())
                .unwrap_or_else(|| "unmanaged".into());
            self.keys
                .get_or_create(&[("secret", name), ("provider", provider.clone())])
                .inc();
        }
        if let Some(up) = r.upstream_first_byte {
            self.upstream_latency
                .get_or_create(&[("provider", provider)])
                .observe(up.as_secs_f64());
            self.added_latency
                .observe(r.latency.saturating_sub(up).as_secs_f64());
        }
    }

    fn refresh(&self) {
        let snap = match self.snapshot.read() {
            Ok(s) => s.as_ref().map(|f| f()),
            Err(_) => None,
        };
        let Some(snap) = snap else {
            return;
        };
        self.generation
            .set(i64::try_from(snap.generation).unwrap_or(i64::MAX));
        if let Ok(mut seen) = self.budget_seen.lock() {
            let now = [
                snap.budget_refused,
                snap.budget_evicted,
                snap.uid_budget_refused,
            ];
            for (i, which) in ["connections_refused", "idle_evicted", "uid_refused"]
                .into_iter()
                .enumerate()
            {
                let delta = now[i].saturating_sub(seen[i]);
                self.budget
                    .get_or_create(&[("which", which.to_string())])
                    .inc_by(delta);
            }
            *seen = now;
        }
        self.target_up.clear();
        self.target_probe.clear();
        for t in snap.targets {
            self.target_up
                .get_or_create(&[("target", t.target.clone())])
                .set(i64::from(!t.cooling));
            if let Some(p) = t.probe {
                self.target_probe
                    .get_or_create(&[("target", t.target), ("result", p.to_string())])
                    .set(1);
            }
        }
    }

    /// The exposition in the OpenMetrics text format, current as of now.
    pub fn encode(&self) -> String {
        self.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The exposition in the Prometheus text format 0.0.4 (for scrapers and
    /// tools that do not ask for OpenMetrics, such as `promtool`).
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }
}

/// OpenMetrics text → Prometheus text 0.0.4: counter families are named
/// with their `_total` suffix in `HELP`/`TYPE`, and the `UNIT` and `EOF`
/// lines go (the samples are the same).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn cut_label(r: &CutReason) -> &'static str {
    match r {
        CutReason::UpstreamFailed { .. } => "upstream_failed",
        CutReason::IdleTimeout { .. } => "idle_timeout",
        CutReason::ClientClosed => "client_closed",
    }
}

/// Counts every record, then hands it on.
pub struct MetricsSink {
    metrics: Arc<Metrics>,
    next: Arc<dyn RecordSink>,
}

impl MetricsSink {
    /// Counts into `metrics`, then records into `next`.
    pub fn new(metrics: Arc<Metrics>, next: Arc<dyn RecordSink>) -> MetricsSink {
        MetricsSink { metrics, next }
    }
}

impl RecordSink for MetricsSink {
    fn record(&self, r: RequestRecord) {
        self.metrics.observe(&r);
        self.next.record(r);
    }

    fn amend(&self, request_id: &str, time: SystemTime, cut: StreamCut) {
        self.metrics
            .stream_cuts
            .get_or_create(&[("reason", cut_label(&cut.reason).to_string())])
            .inc();
        self.next.amend(request_id, time, cut);
    }
}

/// Event sinks count their losses here (`kt_event_sink_dropped_total`) and
/// say whether they are up (`kt_event_sink_up`). Sink names come from the
/// config, so the label values are bounded.
impl crate::events::SinkObserver for Metrics {
    fn dropped(&self, sink: &str, reason: &'static str, n: u64) {
        self.sink_dropped
            .get_or_create(&[("sink", sink.to_string()), ("reason", reason.to_string())])
            .inc_by(n);
    }

    fn up(&self, sink: &str, up: bool) {
        self.sink_up
            .get_or_create(&[("sink", sink.to_string())])
            .set(i64::from(up));
    }
}
