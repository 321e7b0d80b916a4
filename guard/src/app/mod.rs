//! The composition root: builds everything a running guard needs from a
//! [`Config`] (secret resolver, local CA, event writer, policy chain,
//! gateway, capture), runs it, and shuts it down in order: stop accepting,
//! drain the gateway, detach capture, flush events. It prints nothing: it
//! returns typed results and reports progress as [`Notice`]s; the CLI
//! renders them.
//!
//! [`App`] holds the running set (gateway and event writer), so a later live
//! reload can build a new set from a new config and swap it in here.
#![forbid(unsafe_code)]

mod control;
mod egress;
mod reload;
mod watch;

pub use control::{ControlError, ControlSocket, Reply, request_reload, socket_path};
pub use reload::{ReloadRefused, Reloaded, Reloader, Trigger};

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::ca::{Ca, CaError};
use crate::capture::{
    self, CaptureError, CaptureSpec, ExemptionSlot, NoExemption, Programs, SocketExemption,
    Supervisor, Targets,
};
use crate::config::{Config, IpPrefix, PolicyKind, StoreFailure};
use crate::events::{EventSink, EventWriter, Sinks, WriterConfig, WriterHandle};
use crate::gateway::{CaptureLookup, Captured, Gateway, GatewayBuilder, GatewayError};
use crate::metrics::{Metrics, MetricsSink};
use crate::record::ClientInfo;
use crate::secrets::{Fingerprinter, Resolver, SecretsError};

/// Why the guard could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A required target's secret does not resolve: the gateway must not
    /// start (fail closed). The message names each secret and how to add it.
    #[error("{0}")]
    MissingSecrets(#[source] GatewayError),
    /// The central secret store (`secrets.store`) could not be set up.
    #[error("setting up the central secret store")]
    SecretStore(#[source] crate::secrets::vault::VaultError),
    /// The fingerprint key could not be opened or created.
    #[error("opening the fingerprint key")]
    Fingerprint(#[source] SecretsError),
    /// The local CA could not be opened or created.
    #[error("opening the local CA")]
    Ca(#[source] CaError),
    /// The policy chain did not compile.
    #[error("compiling the policy chain")]
    Policy(#[source] crate::policy::ChainError),
    /// The gateway could not be built or failed while serving.
    #[error("starting the gateway")]
    Gateway(#[source] GatewayError),
    /// A listener could not be bound or read.
    #[error("binding the {what} {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `capture.containers` is on and its address cannot be added.
    #[error("capture.containers")]
    ContainerAddress(#[source] capture::HostAddressError),
    /// The configured capture listener is not an IPv4 address.
    #[error("gateway.capture_listen must be an IPv4 address (got {0})")]
    CaptureListenNotV4(SocketAddr),
    /// Attaching or running capture failed.
    #[error("attaching capture to {}", cgroup.display())]
    Capture {
        /// The cgroup.
        cgroup: PathBuf,
        /// Why.
        #[source]
        source: CaptureError,
    },
    /// The cgroup2 mount could not be found.
    #[error("finding the cgroup2 mount")]
    Cgroup(#[source] capture::CgroupError),
    /// [`App::run_with_capture`] on an app built without capture: its
    /// upstream sockets would be captured by its own programs.
    #[error("the guard was built without capture: its upstream sockets cannot be exempted")]
    BuiltWithoutCapture,
    /// `--keep-attached` without a bpffs to pin on.
    #[error(
        "--keep-attached needs pinned links: mount a bpffs (mount -t bpf bpf /sys/fs/bpf) or pass --pin-dir"
    )]
    KeepAttachedWithoutPins,
}

/// Progress of a running guard, for the CLI to show.
#[derive(Clone, Debug)]
pub enum Notice {
    /// The explicit listener is bound; nothing is captured.
    Listening {
        /// The explicit clients' address.
        explicit: SocketAddr,
        /// Targets in use, in order.
        targets: Vec<String>,
    },
    /// Capture is attached and every listener is bound.
    Capturing {
        /// `capture.scope: port`: every destination on the capture ports.
        port_wide: bool,
        /// The prefixes captured at start.
        prefixes: Vec<IpPrefix>,
        /// The host names they came from.
        hosts: Vec<String>,
        /// Captured ports.
        ports: Vec<u16>,
        /// The cgroup captured.
        cgroup: PathBuf,
        /// The IPv4 capture listener.
        listen4: SocketAddrV4,
        /// The IPv6 capture listener, if bound.
        listen6: Option<SocketAddrV6>,
        /// The listeners for containers (other network namespaces), when
        /// `capture.containers` is on.
        containers: Option<capture::ForeignListen>,
        /// The explicit clients' address.
        explicit: SocketAddr,
        /// Targets in use, in order.
        targets: Vec<String>,
    },
    /// Every listener closed and in-flight requests finished (or the grace
    /// period ended): next, capture detaches.
    Drained,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopped {
    /// Capture was detached (false: not attached, kept attached on purpose,
    /// or still referenced).
    pub detached: bool,
    /// Every queued event was written before exit.
    pub events_flushed: bool,
}

/// Where and how to capture (`kt run`).
#[derive(Clone, Debug)]
pub struct CapturePlan {
    /// The cgroup-v2 directory.
    pub cgroup: PathBuf,
    /// Hosts, prefixes and ports.
    pub targets: Targets,
    /// Where the links are pinned (`None`: no bpffs).
    pub pin_dir: Option<PathBuf>,
    /// Leave the pinned links attached on exit.
    pub keep_attached: bool,
    /// Things that work but deserve attention (a capture listener on a
    /// port other users may bind first).
    pub warnings: Vec<String>,
}

impl CapturePlan {
    /// The plan for `config`: `cgroup` (else `capture.cgroup`, else the
    /// cgroup2 mount), `pin_dir` (else `<bpffs>/kt/cg-<inode>`, mounting a
    /// bpffs when none is).
    pub fn for_config(
        config: &Config,
        cgroup: Option<PathBuf>,
        pin_dir: Option<PathBuf>,
        keep_attached: bool,
    ) -> Result<CapturePlan, AppError> {
        let cgroup = match cgroup.or_else(|| config.capture.cgroup.clone()) {
            Some(c) => c,
            None => capture::cgroup2_mount().map_err(AppError::Cgroup)?,
        };
        let pin_dir = pin_dir_for(pin_dir, &cgroup);
        match &pin_dir {
            Some(d) => tracing::info!(dir = %d.display(), "capture links pinned"),
            None => tracing::warn!(
                "capture links are not pinned, so if kt dies capture is gone until it runs again (mount a bpffs: mount -t bpf bpf /sys/fs/bpf)"
            ),
        }
        let mut capture_addrs = vec![config.gateway.capture_listen];
        capture_addrs.extend(config.gateway.capture_listen6);
        if !egress::declared_proxies(config).is_empty() {
            capture_addrs.push(config.gateway.proxy_listen);
        }
        let warnings = capture::squat_warnings(&capture_addrs, capture::unprivileged_port_start());
        if keep_attached && pin_dir.is_none() {
            return Err(AppError::KeepAttachedWithoutPins);
        }
        Ok(CapturePlan {
            cgroup,
            targets: Targets {
                hosts: capture::hosts::capture_hosts(config),
                static_prefixes: config.capture.cidrs.clone(),
                ports: config.capture.ports.clone(),
            },
            pin_dir,
            keep_attached,
            warnings,
        })
    }
}

/// `--pin-dir`, else `<bpffs>/kt/cg-<inode>`, mounting a bpffs when none
/// is mounted; `None` (with a warning) when that fails.
fn pin_dir_for(pin_dir: Option<PathBuf>, cgroup: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if let Some(d) = pin_dir {
        return Some(d);
    }
    let ino = match std::fs::metadata(cgroup) {
        Ok(m) => m.ino(),
        Err(e) => {
            tracing::warn!(cgroup = %cgroup.display(), error = %e, "cannot stat the cgroup");
            return None;
        }
    };
    let bpffs = match capture::ensure_bpffs() {
        Ok((dir, true)) => {
            tracing::info!(dir = %dir.display(), "no bpffs was mounted: mounted one to pin capture links");
            dir
        }
        Ok((dir, false)) => dir,
        Err(e) => {
            tracing::warn!(error = %e, "cannot mount a bpffs");
            return None;
        }
    };
    Some(bpffs.join("kt").join(format!("cg-{ino}")))
}

/// A built guard: the gateway and what must be closed after it.
pub struct App {
    config: Arc<Config>,
    gateway: Gateway,
    events: Option<WriterHandle>,
    /// `policy.audit-logger.sinks`, closed after the store.
    sinks: Option<Sinks>,
    warnings: Vec<String>,
    /// Where capture's exemption of the gateway's upstream sockets goes
    /// once the programs are attached (`None`: built without capture).
    exemption: Option<Arc<ExemptionSlot>>,
    /// Live reloads of this guard.
    reloader: Arc<Reloader>,
    data_dir: PathBuf,
    /// The Prometheus metrics (`gateway.metrics`), when on.
    metrics: Option<Arc<Metrics>>,
    /// The secret resolver (its central store is refreshed while serving).
    resolver: Arc<Resolver>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Builds the guard for `config` over the data dir: resolver, CA,
    /// event writer, policy chain, gateway. With `capture`, the gateway's
    /// upstream sockets are exempted from the programs once
    /// [`App::run_with_capture`] attached them. Call inside the runtime (the
    /// gateway's pool and the event writer start there).
    pub fn build(config: Config, data_dir: &Path, capture: bool) -> Result<App, AppError> {
        let resolver = Resolver::for_config(&config, data_dir).map_err(AppError::SecretStore)?;
        // Connected mode: every value in memory before the first request.
        if let Some(r) = resolver.refresh(&config)
            && let Some(problem) = &r.problem
        {
            tracing::warn!("secret store: {problem}");
        }
        let fingerprinter = Fingerprinter::open(data_dir).map_err(AppError::Fingerprint)?;
        // Which managed secret a client presented: fingerprints of every
        // stored value and of every target's resolved reference.
        let known = crate::secrets::known_keys(&config, &resolver, &fingerprinter);
        for problem in &known.problems {
            tracing::warn!(%problem, "events will not recognise this secret when a client presents it");
        }
        let known = known.by_fingerprint;
        let mut warnings = Vec::new();
        let hosts = ca_hosts(&config);
        let ca = Ca::load_or_create_for(&Ca::dir_in(data_dir), &hosts).map_err(AppError::Ca)?;
        let missing = ca.not_permitted(&hosts);
        if !missing.is_empty() {
            warnings.push(format!(
                "the local CA may not issue certificates for {}; clients of those hosts will fail TLS. Replace the CA with `kt ca regenerate --config FILE`, then `kt ca install` again",
                some_names(&missing)
            ));
        }

        let audit = config.chain.contains(&PolicyKind::AuditLogger);
        let audit_cfg = config.audit.clone().unwrap_or_default();
        let (writer, handle) = if audit {
            let (w, h) = EventWriter::spawn(WriterConfig::new(
                data_dir.to_path_buf(),
                audit_cfg.max_events,
            ));
            (Some(w), Some(h))
        } else {
            (None, None)
        };
        let sinks = (audit && !audit_cfg.sinks.is_empty())
            .then(|| Sinks::spawn(&audit_cfg.sinks, writer.clone()));
        let sink_health = sinks
            .clone()
            .map(|s| Arc::new(s) as Arc<dyn crate::record::SinkHealth>);
        let refuse_without_store = audit && audit_cfg.on_store_failure == StoreFailure::Refuse;
        let health = writer
            .clone()
            .map(|w| Arc::new(w) as Arc<dyn crate::record::AuditHealth>);
        let policy = crate::policy::Chain::new(&config, health.clone(), refuse_without_store)
            .map_err(AppError::Policy)?
            .with_sinks(sink_health.clone());

        let config_path = config.source.clone();
        let config = Arc::new(config);
        // The gateway exists before the programs attach; its upstream
        // sockets are exempted through this slot once they are.
        let slot = capture.then(|| Arc::new(ExemptionSlot::new()));
        let exemption: Arc<dyn SocketExemption> = match &slot {
            Some(s) => s.clone(),
            None => Arc::new(NoExemption),
        };
        let fp = Arc::new(fingerprinter);
        let resolver = Arc::new(resolver);
        let store_resolver = Arc::clone(&resolver);
        let resolver_for_known = Arc::clone(&resolver);
        let ca = Arc::new(ca);
        let fpc = fp.clone();
        let builder = GatewayBuilder::new(config.clone(), resolver.clone(), ca.clone())
            .socket_exemption(exemption)
            .policy(Arc::new(policy))
            .fingerprint(Arc::new(move |v: &str| fpc.fingerprint(v).to_string()));
        let metrics = config
            .gateway
            .metrics
            .is_some()
            .then(|| Arc::new(Metrics::new()));
        if let Some(m) = &metrics {
            m.set_known(known.clone());
        }
        if let (Some(m), Some(s)) = (&metrics, &sinks) {
            s.set_observer(Arc::clone(m) as Arc<dyn crate::events::SinkObserver>);
        }
        let sink = writer.map(|w| {
            let s = EventSink::new(w, known).with_host(crate::events::Host::local(data_dir));
            Arc::new(match &sinks {
                Some(sinks) => s.with_sinks(sinks.clone()),
                None => s,
            })
        });
        let events: Arc<dyn crate::record::RecordSink> = match &sink {
            Some(s) => s.clone(),
            None => Arc::new(crate::record::NoopSink),
        };
        let builder = builder.record_sink(match &metrics {
            // Counted from the same records the events get.
            Some(m) => Arc::new(MetricsSink::new(Arc::clone(m), events)),
            None => events,
        });
        let gateway = builder.build().map_err(|e| match e {
            e @ GatewayError::MissingSecrets(_) => AppError::MissingSecrets(e),
            e => AppError::Gateway(e),
        })?;
        warnings.extend(gateway.warnings());
        let reloader = Arc::new(
            Reloader::new(
                Some(config_path),
                resolver,
                ca,
                health,
                gateway.clone(),
                known_refresher(
                    sink,
                    metrics.clone(),
                    Arc::clone(&resolver_for_known),
                    fp,
                    &config,
                ),
            )
            .with_sink_health(sink_health),
        );
        if let Some(m) = &metrics {
            let gw = gateway.clone();
            m.set_snapshot(Box::new(move || gw.metrics_snapshot()));
            if let Some(v) = store_resolver.vault() {
                m.set_secret_store(&v.health());
            }
        }
        Ok(App {
            resolver: store_resolver,
            metrics,
            config,
            gateway,
            events: handle,
            sinks,
            warnings,
            exemption: slot,
            reloader,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Things that work but deserve attention (optional targets skipped, a
    /// CA that cannot issue for a configured host).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Live reloads (clone it for the control socket, SIGHUP and the
    /// secret watcher).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// The running gateway (clone it to call [`Gateway::shutdown`] from a
    /// signal handler).
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Starts what keeps a serving guard current: the control socket
    /// (`kt gateway reload`), SIGHUP, and the watcher of secret files. They
    /// end when the gateway shuts down. A control socket that cannot be
    /// bound is a warning: the guard serves, reloads come by SIGHUP.
    fn start_live(&self) -> Result<(), AppError> {
        if let (Some(m), Some(addr)) = (&self.metrics, self.config.gateway.metrics) {
            let std = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(TcpListener::from_std)
                .map_err(|source| AppError::Bind {
                    what: "metrics listener",
                    addr,
                    source,
                })?;
            let (gw, m) = (self.gateway.clone(), Arc::clone(m));
            tokio::spawn(async move { gw.serve_metrics(std, m).await });
        }
        let gw = self.gateway.clone();
        let stop = move || {
            let gw = gw.clone();
            async move { gw.shutdown_requested().await }
        };
        match ControlSocket::bind(&self.data_dir) {
            Ok(sock) => {
                tokio::spawn(sock.serve(Arc::clone(&self.reloader), stop()));
            }
            Err(e) => tracing::warn!(
                "no control socket, so `kt gateway reload` cannot reach this kt (SIGHUP still reloads): {}",
                causes(&e)
            ),
        }
        let reloader = Arc::clone(&self.reloader);
        let hup_stop = stop();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with `kt gateway reload`");
                    return;
                }
            };
            tokio::pin!(hup_stop);
            loop {
                tokio::select! {
                    () = &mut hup_stop => return,
                    got = hup.recv() => if got.is_none() { return },
                }
                let _ = reloader.reload(Trigger::Signal).await;
            }
        });
        // SIGUSR1: reopen the event sinks' files (after logrotate moved
        // them). Always listened to, so the signal never ends kt.
        let sinks = self.sinks.clone();
        let usr1_stop = stop();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut usr1 = match signal(SignalKind::user_defined1()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGUSR1; event sink files are not reopened on it");
                    return;
                }
            };
            tokio::pin!(usr1_stop);
            loop {
                tokio::select! {
                    () = &mut usr1_stop => return,
                    got = usr1.recv() => if got.is_none() { return },
                }
                if let Some(s) = &sinks {
                    tracing::info!("SIGUSR1: reopening event sink files");
                    s.reopen();
                }
            }
        });
        let monitor = self.gateway.clone();
        tokio::spawn(async move { monitor.monitor().await });
        tokio::spawn(watch::watch_secrets(
            Arc::clone(&self.reloader),
            self.data_dir.clone(),
            stop(),
        ));
        if let Some(store) = &self.config.secrets.store {
            tokio::spawn(watch::watch_store(
                Arc::clone(&self.reloader),
                Arc::clone(&self.resolver),
                self.metrics.clone(),
                store.refresh,
                stop(),
            ));
        }
        Ok(())
    }

    /// Serves explicit clients on `listen` (else `gateway.listen`) until
    /// [`Gateway::shutdown`]; then drains and flushes events.
    pub async fn run_explicit(
        self,
        listen: Option<SocketAddr>,
        notify: &dyn Fn(Notice),
    ) -> Result<Stopped, AppError> {
        let result = async {
            let addr = listen.unwrap_or(self.config.gateway.listen);
            let listener = self
                .gateway
                .bind(listen)
                .await
                .map_err(|e| bind_err("listener", addr, e))?;
            let explicit = local_addr(&listener, "listener", addr)?;
            self.start_live()?;
            notify(Notice::Listening {
                explicit,
                targets: self.gateway.active_targets(),
            });
            self.gateway
                .serve_explicit(listener)
                .await
                .map_err(AppError::Gateway)?;
            notify(Notice::Drained);
            Ok(())
        }
        .await;
        let events_flushed = close_events(self.events, self.sinks);
        result.map(|()| Stopped {
            detached: false,
            events_flushed,
        })
    }

    /// Binds every listener, attaches capture with `attach`, serves until
    /// [`Gateway::shutdown`], and then, in this order: stops accepting,
    /// drains, detaches capture, flushes events. Capture is attached only
    /// after the listeners are bound and detached only after the gateway
    /// drained, so matched connections are never let through.
    pub async fn run_with_capture<P: Programs>(
        self,
        plan: CapturePlan,
        listen: Option<SocketAddr>,
        attach: impl FnOnce(&CaptureSpec) -> Result<P, CaptureError>,
        notify: &dyn Fn(Notice),
    ) -> Result<Stopped, AppError> {
        let result = self.capture_lifecycle(plan, listen, attach, notify).await;
        let events_flushed = close_events(self.events, self.sinks);
        result.map(|detached| Stopped {
            detached,
            events_flushed,
        })
    }

    async fn capture_lifecycle<P: Programs>(
        &self,
        plan: CapturePlan,
        listen: Option<SocketAddr>,
        attach: impl FnOnce(&CaptureSpec) -> Result<P, CaptureError>,
        notify: &dyn Fn(Notice),
    ) -> Result<bool, AppError> {
        let Some(slot) = &self.exemption else {
            return Err(AppError::BuiltWithoutCapture);
        };
        let gateway = &self.gateway;
        let (listen4, listen6) = (
            self.config.gateway.capture_listen,
            self.config.gateway.capture_listen6,
        );
        // Listeners first: from the moment the programs attach, matched
        // connections land here (or are refused), never on the real address.
        let explicit_addr = listen.unwrap_or(self.config.gateway.listen);
        let explicit = gateway
            .bind(listen)
            .await
            .map_err(|e| bind_err("explicit listener", explicit_addr, e))?;
        let cap4 = TcpListener::bind(listen4)
            .await
            .map_err(|source| AppError::Bind {
                what: "capture listener",
                addr: listen4,
                source,
            })?;
        let cap6 = match listen6 {
            Some(a) => match TcpListener::bind(a).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(addr = %a, error = %e, "no IPv6 capture listener: matched IPv6 connections will be refused");
                    None
                }
            },
            None => None,
        };
        let SocketAddr::V4(l4) = local_addr(&cap4, "capture listener", listen4)? else {
            return Err(AppError::CaptureListenNotV4(listen4));
        };
        let l6 = match cap6.as_ref().map(TcpListener::local_addr).transpose() {
            Ok(Some(SocketAddr::V6(a))) => Some(a),
            _ => None,
        };

        let containers = bind_containers(&self.config.capture.containers, &l4, l6).await?;
        let foreign = containers.as_ref().map(|c| c.listen);

        let CapturePlan {
            cgroup,
            targets,
            pin_dir,
            keep_attached,
            warnings: _,
        } = plan;
        let hosts = targets.hosts.clone();
        let ports = targets.ports.clone();
        let started_with = targets.clone();
        let port_wide = self.config.capture.scope == crate::config::CaptureScope::Port;
        // kt's own listeners are never captured, even port-wide.
        let own_ports = vec![local_addr(&explicit, "explicit listener", explicit_addr)?.port()];
        let mut egress_plan =
            egress::EgressPlan::prepare(&self.config)
                .await
                .map_err(|source| AppError::Bind {
                    what: "proxy listener",
                    addr: self.config.gateway.proxy_listen,
                    source,
                })?;
        let egress_spec = egress_plan.spec.clone();
        let egress_on = egress_plan.active();
        let proxy_listeners = [egress_plan.proxy4.take(), egress_plan.proxy6.take()];
        let mut attached_prefixes = Vec::new();
        let supervisor = Supervisor::start(targets, |prefixes| {
            attached_prefixes.clone_from(&prefixes);
            let spec = CaptureSpec {
                cgroup: cgroup.clone(),
                listen4: l4,
                listen6: l6,
                prefixes,
                ports: ports.clone(),
                port_wide,
                own_ports: own_ports.clone(),
                refuse_udp: true,
                refuse_other_netns: true,
                containers: foreign,
                pin_dir: pin_dir.clone(),
                keep_attached: keep_attached && pin_dir.is_some(),
            };
            let programs = attach(&spec)?;
            if egress_on {
                // Before anything is served: declared proxies and strict
                // egress apply from the first connection on.
                programs.set_egress(&egress_spec)?;
            }
            slot.install(programs.exemption());
            Ok(programs)
        })
        .await
        .map_err(|source| AppError::Capture {
            cgroup: cgroup.clone(),
            source,
        })?;
        let explicit_addr = local_addr(&explicit, "explicit listener", explicit_addr)?;
        self.start_live()?;
        if let Some(m) = &self.metrics {
            m.set_capture_attached(true);
        }
        notify(Notice::Capturing {
            port_wide,
            prefixes: attached_prefixes,
            hosts,
            ports: ports.clone(),
            cgroup: cgroup.clone(),
            listen4: l4,
            listen6: l6,
            containers: foreign,
            explicit: explicit_addr,
            targets: gateway.active_targets(),
        });

        let lookup: Arc<dyn CaptureLookup> = Arc::new(Lookup(supervisor.programs().clone()));
        if egress_on {
            tracing::info!(
                mode = egress_spec.mode.as_str(),
                proxies = egress_spec.proxies.len(),
                allowed = egress_spec.allow.len(),
                resolvers = egress_spec.resolvers.len(),
                "declared proxies and strict egress set"
            );
        }
        let proxy_tasks: Vec<_> = proxy_listeners
            .into_iter()
            .flatten()
            .map(|l| {
                let g = gateway.clone();
                let lk = lookup.clone();
                tokio::spawn(async move { g.serve_proxy_listener(l, lk).await })
            })
            .collect();
        let egress_tasks = egress::start(
            egress_plan,
            supervisor.programs().clone(),
            gateway.clone(),
            cgroup.clone(),
        );
        // Reloads retarget the attached programs in place.
        let supervisor = Arc::new(supervisor);
        let sup = Arc::downgrade(&supervisor);
        let retarget: reload::Retarget = Arc::new(move |targets| {
            let sup = sup.clone();
            Box::pin(async move {
                let Some(sup) = sup.upgrade() else {
                    return Err("capture is detaching".to_string());
                };
                match sup.retarget(targets).await {
                    Ok(r) if r.is_empty() => Ok(None),
                    Ok(r) => Ok(Some(describe_retarget(&r))),
                    Err(e) => Err(causes(&e)),
                }
            })
        });
        self.reloader.set_capture(retarget, started_with);
        let g4 = gateway.clone();
        let lk4 = lookup.clone();
        let t4 = tokio::spawn(async move { g4.serve_capture_listener(cap4, lk4).await });
        let t6 = cap6.map(|l| {
            let g = gateway.clone();
            let lk = lookup.clone();
            tokio::spawn(async move { g.serve_capture_listener(l, lk).await })
        });
        // Containers' connections: the same lookup (the record is keyed by
        // the client's address, which arrives unchanged: no NAT on the way
        // to a local address).
        let (container_listeners, container_addrs) = match containers {
            Some(c) => (c.listeners, c.addrs),
            None => (Vec::new(), Vec::new()),
        };
        let tc: Vec<_> = container_listeners
            .into_iter()
            .map(|l| {
                let g = gateway.clone();
                let lk = lookup.clone();
                tokio::spawn(async move { g.serve_capture_listener(l, lk).await })
            })
            .collect();
        let served = gateway.serve_explicit(explicit).await;
        if served.is_err() {
            // The explicit listener failed: stop the capture listeners too.
            gateway.shutdown();
        }
        let _ = t4.await;
        if let Some(t) = t6 {
            let _ = t.await;
        }
        for t in tc {
            let _ = t.await;
        }
        for t in proxy_tasks {
            let _ = t.await;
        }
        egress_tasks.stop().await;
        drop(lookup);
        notify(Notice::Drained);
        // Detach only after every listener is closed: fail closed to the end.
        self.reloader.clear_capture().await;
        if let Some(m) = &self.metrics {
            m.set_capture_attached(false);
        }
        let detached = match Arc::try_unwrap(supervisor) {
            Ok(s) => s.detach().await && !keep_attached,
            Err(_) => {
                tracing::warn!(
                    "capture still referenced at exit; programs detach when the process ends"
                );
                false
            }
        };
        // After the programs: while they were attached the address took
        // containers' connections (or refused them once the listeners
        // closed).
        drop(container_addrs);
        served.map_err(AppError::Gateway)?;
        Ok(detached)
    }
}

/// What `capture.containers` set up: the addresses kt added to `lo` (removed
/// on drop) and the listeners bound on them.
struct ContainerListen {
    listen: capture::ForeignListen,
    listeners: Vec<TcpListener>,
    addrs: Vec<capture::HostAddress>,
}

/// Adds the containers' addresses to `lo` and binds a capture listener on
/// each, on the capture listeners' ports. IPv4 must work (the setting was
/// asked for); IPv6 falls back to refusing, as the loopback IPv6 listener
/// does.
async fn bind_containers(
    c: &crate::config::Containers,
    l4: &SocketAddrV4,
    l6: Option<SocketAddrV6>,
) -> Result<Option<ContainerListen>, AppError> {
    if !c.enabled {
        return Ok(None);
    }
    let a4 = capture::HostAddress::add(c.address.into()).map_err(AppError::ContainerAddress)?;
    let at4 = SocketAddr::new(c.address.into(), l4.port());
    let cap4 = TcpListener::bind(at4)
        .await
        .map_err(|source| AppError::Bind {
            what: "container capture listener",
            addr: at4,
            source,
        })?;
    let mut listen = capture::ForeignListen {
        listen4: Some(SocketAddrV4::new(c.address, l4.port())),
        listen6: None,
    };
    let mut listeners = vec![cap4];
    let mut addrs = vec![a4];
    if let Some(a) = c.address6 {
        let port = l6.map_or(l4.port(), |l| l.port());
        match capture::HostAddress::add(a.into()) {
            Ok(host) => {
                let at6 = SocketAddr::new(a.into(), port);
                match TcpListener::bind(at6).await {
                    Ok(l) => {
                        listen.listen6 = Some(SocketAddrV6::new(a, port, 0, 0));
                        listeners.push(l);
                    }
                    Err(e) => {
                        tracing::warn!(addr = %at6, error = %e, "no IPv6 listener for containers: their matched IPv6 connections will be refused");
                    }
                }
                addrs.push(host);
            }
            Err(e) => {
                tracing::warn!(error = %causes(&e), "no IPv6 address for containers: their matched IPv6 connections will be refused");
            }
        }
    }
    Ok(Some(ContainerListen {
        listen,
        listeners,
        addrs,
    }))
}

fn bind_err(what: &'static str, addr: SocketAddr, e: GatewayError) -> AppError {
    match e {
        GatewayError::Listen { source, .. } => AppError::Bind { what, addr, source },
        e => AppError::Gateway(e),
    }
}

fn local_addr(
    l: &TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, AppError> {
    l.local_addr()
        .map_err(|source| AppError::Bind { what, addr, source })
}

/// After each reload: the events learn the fingerprints of the secrets
/// now managed, so a client presenting a rotated-in value is named.
fn known_refresher(
    sink: Option<Arc<EventSink>>,
    metrics: Option<Arc<Metrics>>,
    resolver: Arc<Resolver>,
    fp: Arc<Fingerprinter>,
    config_at_start: &Config,
) -> Box<dyn Fn(&Config) + Send + Sync> {
    // Values replaced while kt runs stay recognised, named as the previous
    // value of their secret: who still presents the old key after a
    // rotation is the question events must answer.
    let previous: std::sync::Mutex<std::collections::HashMap<String, String>> =
        std::sync::Mutex::new(
            crate::secrets::known_keys(config_at_start, &resolver, &fp).by_fingerprint,
        );
    Box::new(move |config| {
        if sink.is_none() && metrics.is_none() {
            return;
        }
        let mut known = crate::secrets::known_keys(config, &resolver, &fp);
        for problem in &known.problems {
            tracing::warn!(%problem, "events will not recognise this secret when a client presents it");
        }
        if let Ok(mut prev) = previous.lock() {
            retain_previous(&mut known.by_fingerprint, &prev);
            prev.clone_from(&known.by_fingerprint);
        }
        if let Some(m) = &metrics {
            m.set_known(known.by_fingerprint.clone());
        }
        if let Some(sink) = &sink {
            sink.set_known(known.by_fingerprint);
        }
    })
}

pub use crate::secrets::PREVIOUS_VALUE;

/// Most replaced values remembered.
const MAX_PREVIOUS: usize = 256;

/// Adds to `known` the fingerprints of `before` that are gone now, named
/// `NAME (previous value)`, at most [`MAX_PREVIOUS`] of them.
fn retain_previous(
    known: &mut std::collections::HashMap<String, String>,
    before: &std::collections::HashMap<String, String>,
) {
    let mut kept = known
        .values()
        .filter(|n| n.ends_with(PREVIOUS_VALUE))
        .count();
    for (fp, name) in before {
        if kept >= MAX_PREVIOUS {
            break;
        }
        if known.contains_key(fp) {
            continue;
        }
        let old = if name.ends_with(PREVIOUS_VALUE) {
            name.clone()
        } else {
            format!("{name}{PREVIOUS_VALUE}")
        };
        known.insert(fp.clone(), old);
        kept += 1;
    }
}

/// What a retarget changed, for the reload's log line and event.
fn describe_retarget(r: &capture::Retargeted) -> String {
    let mut parts = Vec::new();
    let list = |v: &[String]| v.join(" ");
    if !r.hosts_added.is_empty() {
        parts.push(format!("hosts +{}", list(&r.hosts_added)));
    }
    if !r.hosts_removed.is_empty() {
        parts.push(format!("hosts -{}", list(&r.hosts_removed)));
    }
    let prefixes = |v: &[IpPrefix]| {
        v.iter()
            .map(|p| format!("{}/{}", p.addr, p.len))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !r.prefixes_added.is_empty() {
        parts.push(format!("prefixes +{}", prefixes(&r.prefixes_added)));
    }
    if !r.prefixes_removed.is_empty() {
        parts.push(format!("prefixes -{}", prefixes(&r.prefixes_removed)));
    }
    let ports = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
    if !r.ports_added.is_empty() {
        parts.push(format!("ports +{}", ports(&r.ports_added)));
    }
    if !r.ports_removed.is_empty() {
        parts.push(format!("ports -{}", ports(&r.ports_removed)));
    }
    if !r.hosts_unresolved.is_empty() {
        parts.push(format!(
            "not resolved now (tried again): {}",
            list(&r.hosts_unresolved)
        ));
    }
    parts.join(", ")
}

/// An error and its causes on one line (`a: b: c`).
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Writes the events still queued (bounded) after the gateway drained,
/// to the store and then to the sinks; false when some could not be
/// written.
fn close_events(events: Option<WriterHandle>, sinks: Option<Sinks>) -> bool {
    let stored = events.is_none_or(WriterHandle::shutdown);
    let sent = sinks.is_none_or(|s| s.shutdown(Duration::from_secs(5)));
    stored && sent
}

/// Threads for blocking work: each new loopback client's process lookup in
/// /proc (which reads the whole socket table), capture lookups, file stats.
/// Tokio's default (512) let a burst of new clients start a thread per
/// lookup, tens of them, each with its stack and allocator arena, and a
/// steady trickle of lookups then kept them all alive. Past this many the
/// lookups wait their turn (each is bounded by its own timeout).
const MAX_BLOCKING_THREADS: usize = 16;

/// The multi-threaded runtime the guard serves on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
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

/// `a, b, c and N more`: a list of host names short enough for one log
/// line (the catalog has dozens: a CA made before a catalog update misses
/// them all).
pub(crate) fn some_names(names: &[String]) -> String {
    const SHOWN: usize = 8;
    if names.len() <= SHOWN {
        return names.join(", ");
    }
    format!(
        "{} and {} more",
        names[..SHOWN].join(", "),
        names.len() - SHOWN
    )
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
    // Config-defined providers' names (`*.` patterns become the subtree).
    let custom = config
        .providers
        .targets
        .iter()
        .filter(|t| matches!(t.provider, crate::provider::Provider::Custom(_)))
        .flat_map(|t| t.provider.host_patterns());
    for h in targets
        .chain(custom)
        .chain(config.capture.hosts.iter().flatten().cloned())
    {
        let h = h.trim_start_matches('[').trim_end_matches(']').to_string();
        if !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    hosts
}

/// Answers the gateway's "who is this?" from the kernel's record and /proc.
struct Lookup<P: Programs>(Arc<P>);

impl<P: Programs> CaptureLookup for Lookup<P> {
    fn strict(&self) -> bool {
        true
    }

    fn lookup(&self, peer: SocketAddr, _local: SocketAddr) -> Option<Captured> {
        let origin = self.0.take_origin(peer)?;
        let p = capture::process_info(origin.pid);
        Some(Captured {
            original: origin.original,
            provider_prefix: origin.provider_prefix,
            client: ClientInfo {
                pid: Some(origin.pid),
                uid: Some(origin.uid),
                cgroup_id: Some(origin.cgroup_id),
                context: p.context(),
                exe: p.exe,
                cmdline: p.cmdline,
                cgroup: p.cgroup,
                container_id: p.container_id,
            },
        })
    }
}

#[cfg(test)]
mod tests;
