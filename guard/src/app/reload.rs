//! Live reload: re-read the config file (on `kt gateway reload` or
//! SIGHUP) or only re-resolve the secrets (when the secret store or a
//! `file:` secret changed), build the next generation beside the running
//! one, and swap it in together with the capture targets. A reload that
//! fails at any step changes nothing and says every problem.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::capture::Targets;
use crate::config::{Config, PolicyKind, StoreFailure};
use crate::gateway::{Gateway, GatewayError, ReloadDiff};
use crate::record::{AuditHealth, ClientInfo};
use crate::secrets::Resolver;

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Trigger {
    /// `kt gateway reload` over the control socket, by this uid and pid.
    Command {
        /// The caller's uid.
        uid: u32,
        /// The caller's pid, when the kernel said.
        pid: Option<u32>,
    },
    /// SIGHUP.
    Signal,
    /// The secret store or a `file:` secret changed on disk: secrets are
    /// re-resolved, the config file is not re-read.
    SecretsChanged,
    /// A refresh of the central secret store (`secrets.store`) found a
    /// value changed, gone, or past `max_stale`: secrets are re-resolved
    /// from memory, the config file is not re-read.
    StoreChanged,
}

impl Trigger {
    /// Whether the config file is read again (secret changes keep the
    /// config being served, even if its file was edited meanwhile).
    fn rereads_config(self) -> bool {
        !matches!(self, Trigger::SecretsChanged | Trigger::StoreChanged)
    }

    fn caller(self) -> ClientInfo {
        match self {
            Trigger::Command { uid, pid } => {
                // Who ran `kt gateway reload`: its exe and cgroup too.
                let p = pid.map(crate::capture::process_info).unwrap_or_default();
                ClientInfo {
                    uid: Some(uid),
                    pid,
                    context: p.context(),
                    exe: p.exe,
                    cmdline: p.cmdline,
                    cgroup: p.cgroup,
                    container_id: p.container_id,
                    ..ClientInfo::default()
                }
            }
            Trigger::Signal | Trigger::SecretsChanged | Trigger::StoreChanged => {
                ClientInfo::default()
            }
        }
    }

    fn label(self) -> String {
        match self {
            Trigger::Command { uid, pid } => match pid {
                Some(p) => format!("kt gateway reload (uid {uid}, pid {p})"),
                None => format!("kt gateway reload (uid {uid})"),
            },
            Trigger::Signal => "SIGHUP".to_string(),
            Trigger::SecretsChanged => "a secret changed on disk".to_string(),
            Trigger::StoreChanged => "a secret changed in the central store".to_string(),
        }
    }
}

/// A reload that was applied.
#[derive(Clone, Debug, Serialize)]
pub struct Reloaded {
    /// What changed for requests.
    pub diff: ReloadDiff,
    /// What changed in capture (`None`: capture not attached or unchanged).
    pub capture: Option<String>,
    /// Things that work but deserve attention.
    pub warnings: Vec<String>,
}

/// A reload that changed nothing: every problem found, each on its own
/// line (config errors as `file:line:column: message`).
#[derive(Clone, Debug, thiserror::Error, Serialize)]
#[error("{}", problems.join("\n"))]
pub struct ReloadRefused {
    /// What is wrong.
    pub problems: Vec<String>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Changes what the attached programs capture, in place; `Ok` describes
/// the change (`None`: nothing changed).
pub(crate) type Retarget =
    Arc<dyn Fn(Targets) -> BoxFuture<Result<Option<String>, String>> + Send + Sync>;

/// Everything a reload needs of a running guard. One reload runs at a time.
pub struct Reloader {
    /// The config file to re-read (`None`: built from a config in memory).
    config_path: Option<PathBuf>,
    resolver: Arc<Resolver>,
    ca: Arc<crate::ca::Ca>,
    audit_health: Option<Arc<dyn AuditHealth>>,
    /// The event sinks (restart-only), asked by every reloaded chain.
    sink_health: Option<Arc<dyn crate::record::SinkHealth>>,
    gateway: Gateway,
    /// Refreshes the events' fingerprint → secret name map.
    on_installed: Box<dyn Fn(&Config) + Send + Sync>,
    capture: Mutex<Option<(Retarget, Targets)>>,
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Started in observe mode by the command line: reloads keep it.
    observe_pinned: bool,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub(crate) fn new(
        config_path: Option<PathBuf>,
        resolver: Arc<Resolver>,
        ca: Arc<crate::ca::Ca>,
        audit_health: Option<Arc<dyn AuditHealth>>,
        gateway: Gateway,
        on_installed: Box<dyn Fn(&Config) + Send + Sync>,
    ) -> Reloader {
        let observe_pinned = {
            let started = gateway.config();
            started.gateway.mode == crate::config::GatewayMode::Observe
                && crate::config::load(&started.source)
                    .is_ok_and(|f| f.gateway.mode != crate::config::GatewayMode::Observe)
        };
        Reloader {
            observe_pinned,
            config_path,
            resolver,
            ca,
            audit_health,
            sink_health: None,
            gateway,
            on_installed,
            capture: Mutex::new(None),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Reloaded chains refuse while a refusing event sink is down.
    pub(crate) fn with_sink_health(
        mut self,
        sinks: Option<Arc<dyn crate::record::SinkHealth>>,
    ) -> Reloader {
        self.sink_health = sinks;
        self
    }

    /// From now on reloads also retarget capture (`current`: what is
    /// captured now).
    pub(crate) fn set_capture(&self, retarget: Retarget, current: Targets) {
        if let Ok(mut c) = self.capture.lock() {
            *c = Some((retarget, current));
        }
    }

    /// Capture is detaching: reloads no longer touch it. Waits for a
    /// reload in progress.
    pub(crate) async fn clear_capture(&self) {
        let _one = self.one_at_a_time.lock().await;
        if let Ok(mut c) = self.capture.lock() {
            *c = None;
        }
    }

    /// The files the current config's secrets are read from
    /// (`secret_key_ref.file`).
    pub fn secret_files(&self) -> Vec<PathBuf> {
        let config = self.gateway.config();
        let mut files: Vec<PathBuf> = config
            .providers
            .targets
            .iter()
            .filter_map(|t| match &t.secret_key_ref {
                crate::config::SecretKeyRef::File(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        files.sort();
        files.dedup();
        files
    }

    /// Records a change in the central secret store's health as an event.
    pub(crate) fn record_secret_store(&self, rule: &str, summary: &str) {
        self.gateway.record_secret_store(rule, summary);
    }

    /// The config being served.
    pub fn config(&self) -> Arc<Config> {
        self.gateway.config()
    }

    /// Reloads: reads the config file again (unless `trigger` is a secret
    /// change), re-resolves every secret, rebuilds the policy chain, swaps
    /// the new set in and retargets capture. On any problem nothing
    /// changes. Either way the outcome is logged and recorded as an event.
    pub async fn reload(&self, trigger: Trigger) -> Result<Reloaded, ReloadRefused> {
        let _one = self.one_at_a_time.lock().await;
        let result = self.reload_locked(trigger).await;
        match &result {
            Ok(r) => {
                let mut summary = r.diff.summary();
                if let Some(c) = &r.capture {
                    summary.push_str("; capture: ");
                    summary.push_str(c);
                }
                tracing::info!(by = %trigger.label(), generation = r.diff.generation, "reloaded: {summary}");
                for w in &r.warnings {
                    tracing::warn!("{w}");
                }
                self.gateway
                    .record_reload(trigger.caller(), true, &summary, &r.diff.secrets_kept);
            }
            Err(refused) => {
                tracing::error!(
                    by = %trigger.label(),
                    "reload refused, the running config stays in place:\n{refused}"
                );
                self.gateway.record_reload(
                    trigger.caller(),
                    false,
                    &refused.problems.join("; "),
                    &[],
                );
            }
        }
        result
    }

    async fn reload_locked(&self, trigger: Trigger) -> Result<Reloaded, ReloadRefused> {
        let current = self.gateway.config();
        let config = match (&self.config_path, trigger.rereads_config()) {
            (Some(path), true) => {
                let mut c = read_config(path)?;
                // `--observe` on the command line outlives the file.
                if self.observe_pinned {
                    c.gateway.mode = crate::config::GatewayMode::Observe;
                }
                Arc::new(c)
            }
            _ => Arc::clone(&current),
        };
        let problems = needs_restart(&current, &config);
        if !problems.is_empty() {
            return Err(ReloadRefused { problems });
        }
        // `kt gateway reload` and SIGHUP read the central store again
        // first (off the async workers: its client blocks).
        if trigger.rereads_config() && self.resolver.vault().is_some() {
            let (r, c) = (Arc::clone(&self.resolver), Arc::clone(&config));
            if let Ok(Some(refreshed)) = tokio::task::spawn_blocking(move || r.refresh(&c)).await
                && let Some(problem) = refreshed.problem
            {
                tracing::warn!(
                    "secret store refresh failed, serving the last good values until max_stale: {problem}"
                );
            }
        }
        let audit = config.chain.contains(&PolicyKind::AuditLogger);
        let refuse_without_store = audit
            && config
                .audit
                .as_ref()
                .is_some_and(|a| a.on_store_failure == StoreFailure::Refuse);
        let health = if audit {
            self.audit_health.clone()
        } else {
            None
        };
        let policy = crate::policy::Chain::new(&config, health, refuse_without_store)
            .map_err(|e| {
                refused(format!(
                    "{}: {}",
                    config.source.display(),
                    super::causes(&e)
                ))
            })?
            .with_sinks(self.sink_health.clone());
        let staged = self
            .gateway
            .stage(
                Arc::clone(&config),
                self.resolver.as_ref(),
                Arc::new(policy),
            )
            .map_err(|e| match e {
                GatewayError::MissingSecrets(list) => ReloadRefused { problems: list },
                e => refused(format!("{}: {e}", config.source.display())),
            })?;
        let mut warnings: Vec<String> = staged.warnings().to_vec();
        let ca_missing = self.ca.not_permitted(&super::ca_hosts(&config));
        if !ca_missing.is_empty() {
            warnings.push(format!(
                "the local CA may not issue certificates for {}; clients of those hosts will fail TLS until `kt ca regenerate --config FILE` and a restart",
                super::some_names(&ca_missing)
            ));
        }
        let diff = staged.diff().clone();

        // New routes first, then capture: a connection newly captured finds
        // its route; if capture cannot follow, the old routes come back.
        let previous = self.gateway.install(staged);
        let capture = match self.retarget(&config).await {
            Ok(c) => c,
            Err(problem) => {
                self.gateway.restore(previous);
                return Err(refused(format!("capture: {problem}")));
            }
        };
        (self.on_installed)(&config);
        Ok(Reloaded {
            diff,
            capture,
            warnings,
        })
    }

    async fn retarget(&self, config: &Config) -> Result<Option<String>, String> {
        let hook = match self.capture.lock() {
            Ok(c) => c.clone(),
            Err(_) => None,
        };
        let Some((retarget, old)) = hook else {
            return Ok(None);
        };
        let new = Targets {
            hosts: crate::capture::hosts::capture_hosts(config),
            static_prefixes: config.capture.cidrs.clone(),
            ports: config.capture.ports.clone(),
        };
        if new.hosts == old.hosts
            && new.static_prefixes == old.static_prefixes
            && new.ports == old.ports
        {
            return Ok(None);
        }
        let change = retarget(new.clone()).await?;
        if let Ok(mut c) = self.capture.lock()
            && let Some((_, current)) = c.as_mut()
        {
            *current = new;
        }
        Ok(change)
    }
}

fn refused(problem: String) -> ReloadRefused {
    ReloadRefused {
        problems: vec![problem],
    }
}

/// Reads and validates the config file; every problem as a line.
fn read_config(path: &std::path::Path) -> Result<Config, ReloadRefused> {
    match crate::config::load(path) {
        Ok(c) => Ok(c),
        Err(crate::config::LoadError::Invalid(errors)) => Err(ReloadRefused {
            problems: errors.iter().map(ToString::to_string).collect(),
        }),
        Err(e @ crate::config::LoadError::Io { .. }) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            Err(refused(match cause {
                Some(c) => format!("{e}: {c}"),
                None => e.to_string(),
            }))
        }
    }
}

/// Settings a running kt cannot change in place: its listeners are bound
/// and named in the capture programs, its budgets and event store sized.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let file = new.source.display();
    let mut check = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!(
                "{file}: {name} changed ({a} -> {b}): this setting is applied at start only; restart kt to change it, or put the old value back to reload the rest"
            ));
        }
    };
    let (g, h) = (&old.gateway, &new.gateway);
    check("gateway.listen", g.listen.to_string(), h.listen.to_string());
    check(
        "gateway.capture_listen",
        g.capture_listen.to_string(),
        h.capture_listen.to_string(),
    );
    check(
        "gateway.capture_listen6",
        format!("{:?}", g.capture_listen6),
        format!("{:?}", h.capture_listen6),
    );
    check(
        "gateway.max_connections",
        g.max_connections.to_string(),
        h.max_connections.to_string(),
    );
    check(
        "gateway.max_connections_per_uid",
        g.max_connections_per_uid.to_string(),
        h.max_connections_per_uid.to_string(),
    );
    check(
        "gateway.max_buffered_bytes",
        g.max_buffered_bytes.to_string(),
        h.max_buffered_bytes.to_string(),
    );
    check(
        "gateway.connect_timeout",
        humantime::format_duration(g.connect_timeout).to_string(),
        humantime::format_duration(h.connect_timeout).to_string(),
    );
    check(
        "gateway.metrics",
        format!("{:?}", g.metrics),
        format!("{:?}", h.metrics),
    );
    let (c, d) = (&old.capture, &new.capture);
    check(
        "capture.enabled",
        c.enabled.to_string(),
        d.enabled.to_string(),
    );
    check(
        "capture.scope",
        format!("{:?}", c.scope).to_lowercase(),
        format!("{:?}", d.scope).to_lowercase(),
    );
    check(
        "capture.cgroup",
        format!("{:?}", c.cgroup),
        format!("{:?}", d.cgroup),
    );
    check(
        "capture.containers",
        format!("{:?}", c.containers),
        format!("{:?}", d.containers),
    );
    // Proxies and strict egress are set into the programs at start.
    let proxies = |c: &Config| {
        c.capture
            .proxies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    check("capture.proxies", proxies(old), proxies(new));
    check(
        "capture.egress",
        format!("{:?}", c.egress),
        format!("{:?}", d.egress),
    );
    check(
        "gateway.upstream_proxy",
        format!("{:?}", g.upstream_proxy.as_ref().map(ToString::to_string)),
        format!("{:?}", h.upstream_proxy.as_ref().map(ToString::to_string)),
    );
    check(
        "gateway.proxy_listen",
        g.proxy_listen.to_string(),
        h.proxy_listen.to_string(),
    );
    let audit = |c: &Config| c.chain.contains(&PolicyKind::AuditLogger);
    check(
        "policies.chain (audit-logger)",
        audit(old).to_string(),
        audit(new).to_string(),
    );
    check(
        "policy.audit-logger.max_events",
        format!("{:?}", old.audit.as_ref().map(|a| a.max_events)),
        format!("{:?}", new.audit.as_ref().map(|a| a.max_events)),
    );
    // Each sink owns a thread, a file or a connection opened at start.
    let sinks = |c: &Config| {
        let list: Vec<String> = c
            .audit
            .iter()
            .flat_map(|a| &a.sinks)
            .map(|s| format!("{s:?}"))
            .collect();
        format!("[{}]", list.join(", "))
    };
    check("policy.audit-logger.sinks", sinks(old), sinks(new));
    // The central store's client (address, auth, TLS) is built at start.
    if old.secrets.store != new.secrets.store {
        // Named by where it points; auth, TLS and timings are compared too.
        let short = |c: &Config| {
            c.secrets
                .store
                .as_ref()
                .map_or_else(|| "none".to_string(), |s| format!("vault at {}", s.address))
        };
        let (a, b) = (short(old), short(new));
        if a == b {
            check("secrets.store", a, format!("{b}, other settings"));
        } else {
            check("secrets.store", a, b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {{env: KT_TEST_A}}\n{extra}"
        );
        crate::config::parse(&text, std::path::Path::new("/etc/kt/policy.yaml"))
            .expect("test config parses")
    }

    #[test]
    fn listener_and_budget_changes_need_a_restart_and_say_so() {
        let old = config("");
        assert!(needs_restart(&old, &old).is_empty());
        let new = config("gateway:\n  listen: 127.0.0.1:9999\n  max_connections: 7\n");
        let problems = needs_restart(&old, &new);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("/etc/kt/policy.yaml: gateway.listen changed (127.0.0.1:")
                && problems[0].contains("-> 127.0.0.1:9999)")
                && problems[0].contains("restart kt"),
            "{problems:?}"
        );
        assert!(problems[1].contains("gateway.max_connections changed"));
        // Timeouts, cool-downs, DLP and targets apply live.
        let live = config("gateway:\n  first_byte_timeout: 3s\n  cooldown_after: 2\n");
        assert!(needs_restart(&old, &live).is_empty());
        // The container address is added and listened on at start.
        let containers = config("capture:\n  containers: true\n");
        let problems = needs_restart(&old, &containers);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("capture.containers changed"));
    }

    #[test]
    fn proxy_and_egress_changes_need_a_restart_and_say_so() {
        let old = config("");
        let new = config(
            "gateway:\n  upstream_proxy: http://10.0.0.8:3128\ncapture:\n  proxies: [\"10.0.0.8:3128\"]\n  egress:\n    mode: audit\n",
        );
        let problems = needs_restart(&old, &new).join("\n");
        for key in [
            "capture.proxies",
            "capture.egress",
            "gateway.upstream_proxy",
        ] {
            assert!(
                problems.contains(&format!("{key} changed")),
                "{key}: {problems}"
            );
        }
    }

    #[test]
    fn an_invalid_file_gives_every_problem_with_its_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, "providers:\n  targets: 3\nbogus: 1\n").expect("write");
        let err = read_config(&path).expect_err("invalid");
        assert!(err.problems.len() >= 2, "{err:?}");
        for p in &err.problems {
            assert!(p.starts_with(&format!("{}:", path.display())), "{p}");
        }
        let gone = read_config(&dir.path().join("absent.yaml")).expect_err("absent");
        assert!(
            gone.problems[0].contains("cannot read config file")
                && gone.problems[0].contains("absent.yaml"),
            "{gone:?}"
        );
    }
}
