//! Credential probes as `kt secrets verify` and `kt gateway check --probe`
//! show them: run the gateway's probes for a config, render a table.

use std::io::{self, Write};

use anyhow::Context;

use crate::app;
use crate::cli::Global;
use crate::cli::output::write_table;
use crate::config::{Config, PolicyKind, Target};
use crate::events::EventStore;
use crate::gateway::{ProbeReport, ProbeResult, Prober, probe_record};
use crate::secrets::Resolver;

/// Probes the targets of `config` that `select` picks, with their managed
/// keys from the data dir.
pub(crate) fn run(
    config: &Config,
    global: &Global,
    select: &dyn Fn(&Target) -> bool,
) -> anyhow::Result<Vec<ProbeReport>> {
    let runtime = app::runtime().context("starting the async runtime")?;
    let resolver = Resolver::live_for_config(config, &global.data_dir)
        .context("cannot set up the central secret store")?;
    runtime.block_on(async {
        let prober = Prober::for_config(config).context("setting up the upstream client")?;
        Ok(prober.probe_targets(&resolver, select).await)
    })
}

/// Stores one event per probe in the data dir's event store (created if
/// needed), so `kt secrets status` can say when each target was last
/// verified. Only when the config's chain has the audit-logger: without it
/// the gateway keeps no events either. Returns how many were written.
pub(crate) fn record(
    config: &Config,
    global: &Global,
    reports: &[ProbeReport],
) -> Result<usize, crate::events::EventError> {
    if reports.is_empty() || !config.chain.contains(&PolicyKind::AuditLogger) {
        return Ok(0);
    }
    let max_events = config.audit.clone().unwrap_or_default().max_events;
    let mut store = EventStore::open(&global.data_dir, max_events)?;
    let none = std::collections::HashMap::new();
    let mut events: Vec<_> = reports
        .iter()
        .map(|r| crate::events::to_event(&probe_record(r), &none))
        .collect();
    store.insert(&mut events)?;
    Ok(events.len())
}

/// The probe table: one row per target.
pub(crate) fn write(w: &mut dyn Write, reports: &[ProbeReport]) -> io::Result<()> {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.target.clone(),
                r.reference.clone(),
                if r.required { "yes" } else { "no" }.to_string(),
                match r.result {
                    ProbeResult::Ok => "ok".to_string(),
                    other => other.label().to_ascii_uppercase(),
                },
                r.status.map_or_else(|| "-".into(), |s| s.to_string()),
                r.latency_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                r.provider_code.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    write_table(
        w,
        &[
            "TARGET",
            "REFERENCE",
            "REQUIRED",
            "PROBE",
            "STATUS",
            "LATENCY",
            "CODE",
        ],
        &rows,
    )
}

/// One line per target that is not ok, saying why.
pub(crate) fn details(reports: &[ProbeReport]) -> impl Iterator<Item = String> + '_ {
    reports
        .iter()
        .filter(|r| r.result != ProbeResult::Ok)
        .filter_map(|r| {
            let level = if r.required && !r.passes() {
                "error"
            } else {
                "warning"
            };
            r.detail
                .as_ref()
                .map(|d| format!("{level}: target {}: {d}", r.target))
        })
}
