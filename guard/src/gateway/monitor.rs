//! Active health: every `gateway.probe_interval` (off when 0) the running
//! gateway proves each target's managed key with its provider's unbilled
//! probe, through its own upstream pool. A probe counts like a request for
//! the target's cool-down (an unreachable target is skipped sooner, an
//! answer ends a cool-down), each result is an event (`probe-ok`,
//! `probe-rejected`, …), and the last result per target is kept for
//! `kt secrets status`.

use std::time::Duration;

use super::forward::health_event;
use super::probe::{ProbeReport, ProbeResult, Prober};
use super::{Gateway, Inner};
use crate::record::{Attempt, Outcome};

/// How often a gateway with probes off looks whether a reload turned them on.
const IDLE_CHECK: Duration = Duration::from_secs(5);

impl Gateway {
    /// Probes every target each `gateway.probe_interval` (read again after
    /// each round, so a reload changes it), until shutdown.
    pub async fn monitor(&self) {
        loop {
            let interval = self.inner().config.gateway.probe_interval;
            if !interval.is_zero() {
                self.probe_now().await;
            }
            let wait = if interval.is_zero() {
                IDLE_CHECK
            } else {
                interval
            };
            tokio::select! {
                () = self.shutdown_requested() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Probes every target that has a key once, now; records and returns
    /// the results.
    pub async fn probe_now(&self) -> Vec<ProbeReport> {
        let inner = self.inner();
        let prober = Prober::new(inner.router.clone(), inner.client.clone(), &inner.config);
        let mut set = tokio::task::JoinSet::new();
        for route in inner.router.routes() {
            let Some(key) = inner.keys.get(&route.target.id) else {
                continue;
            };
            let (prober, route, key) = (prober.clone(), route.clone(), key.clone());
            set.spawn(async move { prober.probe(&route, &key).await });
        }
        let mut reports = Vec::new();
        while let Some(done) = set.join_next().await {
            if let Ok(report) = done {
                record_probe(&inner, &report);
                reports.push(report);
            }
        }
        if let Ok(mut last) = inner.last_probe.lock() {
            for r in &reports {
                last.insert(r.target.clone(), r.clone());
            }
        }
        reports
    }

    /// The last probe result per target (empty while probes are off).
    pub fn last_probes(&self) -> Vec<ProbeReport> {
        let inner = self.inner();
        let last = match inner.last_probe.lock() {
            Ok(l) => l.clone(),
            Err(_) => return Vec::new(),
        };
        inner
            .router
            .routes()
            .iter()
            .filter_map(|r| last.get(&r.target.id).cloned())
            .collect()
    }
}

/// What a probe means for the target's cool-down (`None`: nothing sent).
fn outcome(report: &ProbeReport) -> Option<Outcome> {
    let status = |s: u16| Outcome::Status {
        status: s,
        retry_after: None,
    };
    Some(match report.result {
        ProbeResult::Ok => status(report.status.unwrap_or(200)),
        ProbeResult::Rejected => status(report.status.unwrap_or(401)),
        ProbeResult::RateLimited => status(429),
        ProbeResult::Unreachable => Outcome::ConnectFailed,
        ProbeResult::Error => report.status.map_or(Outcome::UpstreamBroken, status),
        ProbeResult::Missing | ProbeResult::NotProbed => return None,
    })
}

/// Feeds the probe into the target's health and records it as an event.
fn record_probe(inner: &Inner, report: &ProbeReport) {
    let Some(outcome) = outcome(report) else {
        return;
    };
    if let Some(t) = inner.health.record(&report.target, &outcome) {
        health_event(inner, &report.target, t, &outcome);
    }
    if report.result != ProbeResult::Ok {
        tracing::warn!(
            target_id = %report.target,
            result = report.result.label(),
            code = report.provider_code.as_deref().unwrap_or("-"),
            "probe of a target's key did not pass"
        );
    }
    let mut rec = super::probe::probe_record(report);
    rec.request_id = inner.next_request_id();
    rec.attempts.push(Attempt {
        target: report.target.clone(),
        outcome,
    });
    inner.sink.record(rec);
}
