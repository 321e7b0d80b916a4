//! `kt gateway check|run`: preflight a config, or run the gateway alone in
//! the foreground for explicit clients (base URL and CONNECT).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::app::{self, App, AppError, Notice};
use crate::cli::{ExitStatus, Global, Output};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::preflight::{self, Report};
use crate::secrets::{Fingerprinter, Resolver};

/// `kt gateway ...`.
#[derive(Debug, clap::Subcommand)]
pub enum GatewayCmd {
    /// Preflight: config, secrets of required targets, policy chain, kernel support, ports.
    Check(CheckArgs),
    /// Run the gateway in the foreground for explicit clients (base URL, CONNECT proxy).
    Run(GatewayRunArgs),
    /// Ask the running kt (same --data-dir) to re-read its config file and
    /// every secret, and switch to them without dropping a connection. On
    /// any problem nothing changes: exit 1 with every problem. SIGHUP does
    /// the same.
    Reload,
}

/// Arguments of `kt gateway check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The policy config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Also report kernel support for capture and whether ports are free.
    #[arg(long, short)]
    pub verbose: bool,
    /// Also prove each target's key works: one unbilled request per target
    /// (as `kt secrets verify`); exit 1 when a required target is not ok.
    #[arg(long)]
    pub probe: bool,
}

/// Arguments of `kt gateway run`.
#[derive(Clone, Debug, clap::Args)]
pub struct GatewayRunArgs {
    /// The configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Listen address for explicit clients (overrides `gateway.listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Observe only (overrides `gateway.mode`, also across reloads).
    #[arg(long)]
    pub observe: bool,
}

/// Runs a `kt gateway` command.
pub fn run(cmd: GatewayCmd, global: &Global) -> anyhow::Result<ExitStatus> {
    match cmd {
        GatewayCmd::Check(args) => {
            crate::cli::with_std_output(global, |out| check(&args, global, out))
        }
        GatewayCmd::Run(args) => {
            let Some(mut config) = crate::cli::with_std_output(global, |out| {
                crate::cli::load_config(&args.config, out)
            })?
            else {
                return Ok(ExitStatus::Failure);
            };
            if args.observe {
                config.gateway.mode = crate::config::GatewayMode::Observe;
            }
            serve_explicit(config, args.listen, global)
        }
        GatewayCmd::Reload => crate::cli::with_std_output(global, |out| reload(global, out)),
    }
}

/// `kt gateway reload`: success when applied, failure when refused (the
/// running config stays), `Err` when no kt answers.
pub fn reload(global: &Global, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let reply = app::request_reload(&global.data_dir)?;
    let applied = matches!(reply, app::Reply::Reloaded { .. });
    out.data(&reply, |w| match &reply {
        app::Reply::Reloaded {
            generation,
            summary,
            warnings,
            ..
        } => {
            writeln!(w, "reloaded (generation {generation}): {summary}")?;
            for warning in warnings {
                writeln!(w, "warning: {warning}")?;
            }
            Ok(())
        }
        app::Reply::Refused { problems } => {
            for p in problems {
                writeln!(w, "{p}")?;
            }
            writeln!(
                w,
                "reload refused: {} problem(s); the running config stays in place",
                problems.len()
            )
        }
        app::Reply::Error { message } => writeln!(w, "{message}"),
    })?;
    Ok(if applied {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

/// Runs the check; success when the gateway would start, failure when not.
pub fn check(
    args: &CheckArgs,
    global: &Global,
    out: &mut Output<'_>,
) -> anyhow::Result<ExitStatus> {
    let Some(config) = crate::cli::load_config(&args.config, out)? else {
        return Ok(ExitStatus::Failure);
    };
    let resolver = Resolver::live_for_config(&config, &global.data_dir)
        .context("cannot set up the central secret store")?;
    // Read-only: a check never creates the host's fingerprint key.
    let fp = Fingerprinter::open_existing(&global.data_dir)?;
    let mut report = preflight::check(
        &config,
        &resolver,
        &preflight::Options {
            verbose: args.verbose,
            fingerprinter: fp.as_ref(),
        },
    );
    if args.verbose
        && let Some(dlp) = config.dlp.as_ref()
    {
        report.warnings.extend(crate::dlp::coverage_warnings(dlp));
    }
    if args.verbose
        && config.capture.enabled
        && !config.capture.containers.enabled
        && let Some(bridges) = host_bridges(Path::new("/sys/class/net"))
    {
        report.warnings.push(format!(
            "container bridges on this host ({bridges}) and `capture.containers` is off: provider connections from containers on them are refused; set `capture.containers: true` and give the jobs kt's CA (`kt ca export --bundle`, `kt ca export --env PATH`)"
        ));
    }
    if args.verbose {
        report.warnings.extend(proxy_warnings(&config));
    }
    if args.probe {
        let probes = super::probe::run(&config, global, &|_| true)?;
        if let Err(e) = super::probe::record(&config, global, &probes) {
            report
                .warnings
                .push(format!("the probe results were not recorded: {e}"));
        }
        report.probe = Some(probes);
    }
    out.data(&report, |w| print_human(w, &report, args.verbose))?;
    let probes_pass = report
        .probe
        .as_deref()
        .is_none_or(crate::gateway::all_required_pass);
    Ok(if report.would_start && probes_pass {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

/// Runs the gateway over an already-loaded config until SIGINT/SIGTERM:
/// stop accepting, let in-flight requests finish (bounded), exit 0.
/// Failure when a required target's secret is missing (fail closed).
pub fn serve_explicit(
    config: Config,
    listen: Option<SocketAddr>,
    global: &Global,
) -> anyhow::Result<ExitStatus> {
    let runtime = app::runtime().context("starting the async runtime")?;
    // The gateway's pool and the event writer start inside the runtime.
    let _guard = runtime.enter();
    let Some(app) = build(config, global, false)? else {
        return Ok(ExitStatus::Failure);
    };
    stop_on_signal(app.gateway(), "finishing in-flight requests");
    let stopped = runtime.block_on(app.run_explicit(listen, &render_notice))?;
    if !stopped.events_flushed {
        eprintln!("kt: warning: some events could not be written before exit");
    }
    Ok(ExitStatus::Success)
}

/// Builds the guard and shows its warnings. `Ok(None)` when it must not
/// start (a required secret is missing: fail closed), with the reason shown.
pub(crate) fn build(config: Config, global: &Global, capture: bool) -> anyhow::Result<Option<App>> {
    match App::build(config, &global.data_dir, capture) {
        Ok(app) => {
            for w in app.warnings() {
                eprintln!("kt: warning: {w}");
            }
            Ok(Some(app))
        }
        Err(AppError::MissingSecrets(e)) => {
            eprintln!("kt: {e}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// On SIGINT or SIGTERM, says `message` and starts the gateway's graceful
/// shutdown. Call inside the runtime.
pub(crate) fn stop_on_signal(gateway: &Gateway, message: &'static str) {
    let stopper = gateway.clone();
    tokio::spawn(async move {
        app::wait_for_signal().await;
        eprintln!("kt: stopping: {message}");
        stopper.shutdown();
    });
}

/// Linux bridges on the host (the shape of docker0, Docker networks,
/// podman and CNI), by name; `None` when there are none.
fn host_bridges(sys_class_net: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_class_net)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().join("bridge").is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    (!names.is_empty()).then(|| names.join(", "))
}

/// Shows the guard's progress on stderr.
pub(crate) fn render_notice(notice: Notice) {
    match notice {
        Notice::Listening { explicit, targets } => eprintln!(
            "kt: gateway listening on http://{explicit} (OPENAI_BASE_URL=http://{explicit}/openai/v1, ANTHROPIC_BASE_URL=http://{explicit}/anthropic, HTTPS_PROXY=http://{explicit}); targets: {}",
            targets.join(", ")
        ),
        Notice::Capturing {
            port_wide,
            prefixes,
            hosts,
            ports,
            cgroup,
            listen4,
            listen6,
            containers,
            explicit,
            targets,
        } => eprintln!(
            "kt: capturing {} port(s) {:?} for {} (capture listener {listen4}{}){}; explicit clients on http://{explicit}; targets: {}",
            if port_wide {
                format!(
                    "every destination (port-wide; provider prefixes {})",
                    super::run::describe(&prefixes, &hosts)
                )
            } else {
                super::run::describe(&prefixes, &hosts)
            },
            ports,
            cgroup.display(),
            listen6.map(|a| format!(", {a}")).unwrap_or_default(),
            match containers {
                Some(c) => format!(
                    "; containers: {}{}",
                    c.listen4.map(|a| a.to_string()).unwrap_or_default(),
                    c.listen6.map(|a| format!(", {a}")).unwrap_or_default()
                ),
                None => "; other network namespaces refused".to_string(),
            },
            targets.join(", ")
        ),
        Notice::Drained => {}
    }
}

fn print_human(w: &mut dyn Write, r: &Report, verbose: bool) -> io::Result<()> {
    writeln!(w, "config   {}", r.config)?;
    writeln!(w, "targets")?;
    for t in &r.targets {
        let state = if t.usable {
            "ok"
        } else if t.required {
            "MISSING"
        } else {
            "skipped"
        };
        writeln!(
            w,
            "  {:<8} {:<20} {:<10} {:<32} {}{}",
            state,
            t.id,
            t.provider,
            t.reference,
            if t.required { "required" } else { "optional" },
            match (&t.source, &t.fingerprint) {
                (Some(s), Some(f)) => format!("  from {s} {f}"),
                _ => String::new(),
            }
        )?;
        if let Some(p) = &t.problem {
            writeln!(w, "           {p}")?;
        }
    }
    writeln!(w, "policy chain")?;
    for (i, p) in r.chain.iter().enumerate() {
        writeln!(w, "  {}. {:<13} {}", i + 1, p.name, p.detail)?;
    }
    if verbose {
        if let Some(k) = &r.kernel {
            writeln!(w, "capture support")?;
            writeln!(
                w,
                "  cgroup2   {}",
                k.cgroup2
                    .as_ref()
                    .map_or_else(|| "not mounted".into(), |p| p.display().to_string())
            )?;
            writeln!(
                w,
                "  bpf       {}",
                if k.bpf_permitted {
                    "permitted (root)"
                } else {
                    "not permitted (run as root)"
                }
            )?;
            writeln!(
                w,
                "  btf       {}",
                if k.btf { "present" } else { "absent" }
            )?;
            if let Some(rel) = &k.kernel_release {
                writeln!(w, "  kernel    {rel}")?;
            }
        }
        if let Some(p) = &r.capture_programs {
            if p.is_empty() {
                writeln!(
                    w,
                    "  attached  no (no kt capture programs loaded; start `kt run`)"
                )?;
            } else {
                writeln!(w, "  attached  yes ({} loaded)", p.join(", "))?;
            }
        }
        if !r.listeners.is_empty() {
            writeln!(w, "listeners")?;
            for l in &r.listeners {
                writeln!(
                    w,
                    "  {:<17} {:<22} {}",
                    l.role,
                    l.address,
                    if l.free { "free" } else { "IN USE" }
                )?;
            }
        }
    }
    if let Some(probes) = &r.probe {
        writeln!(w, "probe")?;
        let mut table = Vec::new();
        super::probe::write(&mut table, probes)?;
        for line in String::from_utf8_lossy(&table).lines() {
            writeln!(w, "  {line}")?;
        }
        for line in super::probe::details(probes) {
            writeln!(w, "  {line}")?;
        }
    }
    for warning in &r.warnings {
        writeln!(w, "warning: {warning}")?;
    }
    for p in &r.problems {
        writeln!(w, "problem: {p}")?;
    }
    if r.would_start {
        writeln!(w, "result   the gateway would start")?;
    } else {
        writeln!(
            w,
            "result   the gateway would NOT start ({} problem(s))",
            r.problems.len()
        )?;
    }
    if let Some(probes) = &r.probe {
        if crate::gateway::all_required_pass(probes) {
            writeln!(w, "probe    every required target's key works")?;
        } else {
            writeln!(w, "probe    a required target's key is NOT ok")?;
        }
    }
    Ok(())
}

/// Proxy variables set system-wide (/etc/environment) or in this
/// environment while no proxy is declared.
fn proxy_warnings(config: &Config) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/environment") {
        for (k, v) in crate::config::environment_file_vars(&text) {
            found.push(("/etc/environment".to_string(), k, v));
        }
    }
    for var in crate::config::PROXY_VARS {
        if let Ok(v) = std::env::var(var) {
            found.push(("the environment".to_string(), var.to_string(), v));
        }
    }
    crate::config::undeclared_proxy_warnings(&config.capture.proxies, &found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridges_are_the_interfaces_with_a_bridge_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(host_bridges(dir.path()), None);
        std::fs::create_dir_all(dir.path().join("eth0")).unwrap();
        assert_eq!(host_bridges(dir.path()), None);
        for br in ["docker0", "br-1a2b3c"] {
            std::fs::create_dir_all(dir.path().join(br).join("bridge")).unwrap();
        }
        assert_eq!(
            host_bridges(dir.path()).as_deref(),
            Some("br-1a2b3c, docker0")
        );
        assert_eq!(host_bridges(&dir.path().join("missing")), None);
    }
}
