//! `kt gateway check`: would this config start, and what would run? Reads
//! the environment, the secret stores (through a resolver), the kernel and
//! the listen ports; changes nothing.
#![forbid(unsafe_code)]

use std::net::TcpListener;

use serde::Serialize;

use crate::config::Config;
use crate::secrets::status::{StatusReport, TargetState};
use crate::secrets::{Fingerprinter, Resolve};

/// The result of a preflight check.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The config file checked.
    pub config: String,
    /// Whether the gateway would start with this config.
    pub would_start: bool,
    /// One entry per target, in order.
    pub targets: Vec<TargetCheck>,
    /// The compiled policy chain, in order.
    pub chain: Vec<PolicyCheck>,
    /// Reasons the gateway would not start.
    pub problems: Vec<String>,
    /// Things that work but deserve attention.
    pub warnings: Vec<String>,
    /// Kernel support for capture (with `--verbose`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::capture::KernelSupport>,
    /// kt capture programs loaded in the kernel right now (with `--verbose`):
    /// non-empty means `kt run` is capturing somewhere on this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_programs: Option<Vec<String>>,
    /// Whether the listen addresses are free (with `--verbose`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerCheck>,
    /// Credential probes, one per target (with `--probe`; filled by the
    /// caller, as they need the network).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Vec<crate::gateway::ProbeReport>>,
}

/// Secret resolution for one target.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    /// Target id.
    pub id: String,
    /// Provider name.
    pub provider: String,
    /// `env:NAME` or `store:NAME`.
    pub reference: String,
    /// `required` from the config.
    pub required: bool,
    /// Where the secret was found (`env`, `store`, `keychain`, `file`), if it was.
    pub source: Option<String>,
    /// Fingerprint of the resolved value.
    pub fingerprint: Option<String>,
    /// Whether the target is usable.
    pub usable: bool,
    /// Why not, with what to do.
    pub problem: Option<String>,
}

/// One policy of the chain as it would run.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyCheck {
    /// Policy name.
    pub name: String,
    /// What it was compiled to.
    pub detail: String,
}

/// Whether a listen address can be bound.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerCheck {
    /// What the listener is for.
    pub role: String,
    /// The address.
    pub address: String,
    /// Whether binding it works right now.
    pub free: bool,
    /// The error otherwise.
    pub error: Option<String>,
}

/// Options of a check.
pub struct Options<'a> {
    /// Also probe the kernel and listen ports.
    pub verbose: bool,
    /// Fingerprints resolved values (never shows the value); `None` when
    /// the host has no fingerprint key yet (a check creates nothing).
    pub fingerprinter: Option<&'a Fingerprinter>,
}

/// Shown instead of a fingerprint before the host key exists.
const NO_HOST_KEY: &str = "fp:(no host key yet)";

/// Runs the check.
pub fn check(config: &Config, resolver: &dyn Resolve, opts: &Options<'_>) -> Report {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let status = StatusReport::build(config, resolver, opts.fingerprinter);
    let targets: Vec<TargetCheck> = status
        .targets
        .into_iter()
        .map(|t| {
            let usable = t.state == TargetState::Resolved;
            if let Some(p) = &t.problem {
                if t.required {
                    problems.push(p.to_string());
                } else {
                    warnings.push(p.to_string());
                }
            }
            TargetCheck {
                id: t.id,
                provider: t.provider,
                reference: t.reference,
                required: t.required,
                source: t.source.map(str::to_string),
                fingerprint: usable.then(|| {
                    t.fingerprint
                        .map_or_else(|| NO_HOST_KEY.to_string(), |f| f.to_string())
                }),
                usable,
                problem: t.problem.map(|p| p.to_string()),
            }
        })
        .collect();
    if !targets.iter().any(|t| t.usable) && problems.is_empty() {
        problems.push("no target has a resolvable secret: nothing could be forwarded".into());
    }

    let chain = config
        .chain
        .iter()
        .map(|p| PolicyCheck {
            name: p.name().to_string(),
            detail: policy_detail(config, *p),
        })
        .collect();

    if !config.gateway.listen.ip().is_loopback() {
        warnings.push(format!(
            "gateway.listen {} is reachable from other hosts (gateway.allow_remote_clients): anyone who reaches it can spend the managed keys unless gateway.clients limits who{}",
            config.gateway.listen,
            if config.gateway.clients.is_some() {
                " (it is set)"
            } else {
                "; it is not set"
            }
        ));
    }
    let capture_programs = opts.verbose.then(crate::capture::loaded_capture_programs);
    let (kernel, listeners) = if opts.verbose {
        let k = crate::capture::kernel_support();
        if config.capture.enabled && !k.capture_possible() {
            warnings.push(
                "capture is enabled but this kernel/user cannot attach it (see kernel); `kt gateway run` still serves explicit clients"
                    .into(),
            );
        }
        let mut l = vec![listener("explicit clients", config.gateway.listen)];
        l.push(listener("capture", config.gateway.capture_listen));
        if let Some(a) = config.gateway.capture_listen6 {
            l.push(listener("capture (IPv6)", a));
        }
        if let Some(a) = config.gateway.metrics {
            l.push(listener("metrics", a));
        }
        for x in l.iter().filter(|x| !x.free) {
            warnings.push(format!(
                "{} address {} is not free: {}",
                x.role,
                x.address,
                x.error.as_deref().unwrap_or("in use")
            ));
        }
        if config.capture.enabled {
            let mut capture = vec![config.gateway.capture_listen];
            capture.extend(config.gateway.capture_listen6);
            warnings.extend(crate::capture::squat_warnings(
                &capture,
                crate::capture::unprivileged_port_start(),
            ));
        }
        (Some(k), l)
    } else {
        (None, Vec::new())
    };

    Report {
        config: config.source.display().to_string(),
        would_start: problems.is_empty(),
        targets,
        chain,
        problems,
        warnings,
        kernel,
        capture_programs,
        listeners,
        probe: None,
    }
}

fn policy_detail(config: &Config, p: crate::config::PolicyKind) -> String {
    use crate::config::PolicyKind;
    match p {
        PolicyKind::DlpFilter => {
            let d = config.dlp.clone().unwrap_or_default();
            format!(
                "{} pattern(s), {} blocked term(s) ({}), action {:?}, built-in rules {}",
                d.detect_patterns.len(),
                d.blocked_terms.len(),
                if d.fuzzy_matching {
                    format!("fuzzy, max distance {}", d.max_distance)
                } else {
                    "exact".to_string()
                },
                d.action,
                if d.builtin_rules { "on" } else { "off" }
            )
            .to_lowercase()
        }
        PolicyKind::AuditLogger => {
            let a = config.audit.clone().unwrap_or_default();
            format!(
                "events kept up to {}, on store failure: {:?}",
                a.max_events, a.on_store_failure
            )
            .to_lowercase()
        }
    }
}

fn listener(role: &str, addr: std::net::SocketAddr) -> ListenerCheck {
    match TcpListener::bind(addr) {
        Ok(_) => ListenerCheck {
            role: role.into(),
            address: addr.to_string(),
            free: true,
            error: None,
        },
        Err(e) => ListenerCheck {
            role: role.into(),
            address: addr.to_string(),
            free: false,
            error: Some(e.to_string()),
        },
    }
}
