//! Assembles a running gateway from a config: secrets, the local CA, the
//! policy chain, the event writer and the host fingerprinter. Shared by
//! `kt gateway run` and `kt run`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;

use crate::ca::Ca;
use crate::capture::SocketExemption;
use crate::cli::Global;
use crate::config::{Config, PolicyKind, StoreFailure};
use crate::events::{EventSink, EventWriter, WriterConfig, WriterHandle};
use crate::gateway::{Gateway, GatewayBuilder, GatewayError};
use crate::secrets::{Fingerprinter, Resolver};

/// A gateway ready to serve, and what must be closed after it.
pub struct Assembled {
    /// The gateway.
    pub gateway: Gateway,
    /// The event writer's handle: shut it down after the gateway drained so
    /// no event is lost.
    pub events: Option<WriterHandle>,
}

/// Builds the gateway for `config`; `exemption` exempts its upstream
/// sockets from capture. `Ok(None)` when it must not start
/// (a required secret is missing: fail closed), with the reason printed.
pub fn assemble(
    config: Config,
    global: &Global,
    exemption: Arc<dyn SocketExemption>,
) -> anyhow::Result<Option<Assembled>> {
    let resolver = Resolver::from_data_dir(&global.data_dir);
    let fingerprinter =
        Fingerprinter::open(&global.data_dir).context("opening the fingerprint key")?;
    // Which stored secret a client presented: fingerprints of every stored value.
    let known: HashMap<String, String> = match resolver.known_secrets(&fingerprinter) {
        Ok(list) => list
            .into_iter()
            .filter_map(|k| Some((k.fingerprint?.to_string(), k.meta.name)))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list stored secrets; events will not name them");
            HashMap::new()
        }
    };
    let hosts = ca_hosts(&config);
    let ca = Ca::load_or_create_for(&Ca::dir_in(&global.data_dir), &hosts)
        .context("opening the local CA")?;
    let missing = ca.not_permitted(&hosts);
    if !missing.is_empty() {
        eprintln!(
            "kt: warning: the local CA may not issue certificates for {}; clients of those hosts will fail TLS. Replace the CA with `kt ca regenerate --config FILE`, then `kt ca install` again",
            missing.join(", ")
        );
    }

    let audit = config.chain.contains(&PolicyKind::AuditLogger);
    let audit_cfg = config.audit.clone().unwrap_or_default();
    let (writer, handle) = if audit {
        let (w, h) = EventWriter::spawn(WriterConfig::new(
            global.data_dir.clone(),
            audit_cfg.max_events,
        ));
        (Some(w), Some(h))
    } else {
        (None, None)
    };
    let refuse_without_store = audit && audit_cfg.on_store_failure == StoreFailure::Refuse;
    let health = writer
        .clone()
        .map(|w| Arc::new(w) as Arc<dyn crate::record::AuditHealth>);
    let policy = crate::policy::Chain::new(&config, health, refuse_without_store)
        .context("compiling the policy chain")?;

    let fp = Arc::new(fingerprinter);
    let mut builder = GatewayBuilder::new(Arc::new(config), Arc::new(resolver), Arc::new(ca))
        .socket_exemption(exemption)
        .policy(Arc::new(policy))
        .fingerprint(Arc::new(move |v: &str| fp.fingerprint(v).to_string()));
    if let Some(w) = writer {
        builder = builder.record_sink(Arc::new(EventSink::new(w, known)));
    }
    match builder.build() {
        Ok(gateway) => {
            for w in gateway.warnings() {
                eprintln!("kt: warning: {w}");
            }
            Ok(Some(Assembled {
                gateway,
                events: handle,
            }))
        }
        Err(e @ GatewayError::MissingSecrets(_)) => {
            eprintln!("kt: {e}");
            Ok(None)
        }
        Err(e) => Err(e).context("starting the gateway"),
    }
}

/// The multi-threaded runtime both `kt gateway run` and `kt run` serve on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// On SIGINT or SIGTERM, says `message` and starts the gateway's graceful
/// shutdown. Call inside the runtime.
pub fn stop_on_signal(gateway: &Gateway, message: &'static str) {
    let stopper = gateway.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!("kt: stopping: {message}");
        stopper.shutdown();
    });
}

/// Writes the events still queued (bounded) after the gateway drained.
pub fn close_events(events: Option<WriterHandle>) {
    if let Some(h) = events
        && !h.shutdown()
    {
        eprintln!("kt: warning: some events could not be written before exit");
    }
}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Names the local CA may issue for: every catalog provider host, the
/// targets' API hosts and `capture.hosts` (the CA is name-constrained to
/// them, so a leaked CA key cannot mint certificates for other names).
pub fn ca_hosts(config: &Config) -> Vec<String> {
    let mut hosts: Vec<String> = crate::provider::official_hosts()
        .map(String::from)
        .collect();
    let targets = config
        .providers
        .targets
        .iter()
        .filter_map(|t| t.base_url.as_deref().or(t.provider.default_base_url()))
        .filter_map(|u| u.parse::<http::Uri>().ok()?.host().map(str::to_string));
    for h in targets.chain(config.capture.hosts.iter().flatten().cloned()) {
        let h = h.trim_start_matches('[').trim_end_matches(']').to_string();
        if !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    hosts
}
