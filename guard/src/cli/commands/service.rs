//! `kt service install|uninstall`: kt as a systemd service.
//!
//! The unit text lives only here ([`unit_text`]); the .deb ships the output
//! of the hidden `kt service unit` so package and command never drift.
//!
//! Ordering before CI runners: `Before=` takes unit names, not globs, so
//! the fixed names of common runners are listed, and each GitHub runner
//! unit found at install time (`actions.runner.<owner>-<repo>.<name>.service`,
//! one per registered runner) is named too and gets a drop-in
//! (`<unit>.d/kt.conf`: `After=kt.service`, `Wants=kt.service`), so starting
//! the runner starts kt first. Runners registered later are covered by
//! running `kt service install` again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::cli::{ExitStatus, Global, Output};

/// The unit's name.
pub const UNIT: &str = "kt.service";
/// Where an installed kt reads its policy by default (the .deb ships it
/// commented out).
pub const DEFAULT_CONFIG: &str = "/etc/kt/policy.yaml";
/// Where `kt service install` writes the unit (under `--root`).
const UNIT_DIR: &str = "etc/systemd/system";
/// CI runner services kt starts before, by their fixed names.
const RUNNERS: &[&str] = &["gitlab-runner.service", "buildkite-agent.service"];
/// The GitHub Actions runner units: `actions.runner.<owner>-<repo>.<name>.service`.
const GITHUB_RUNNER_PREFIX: &str = "actions.runner.";
/// The drop-in kt writes for each GitHub runner unit.
const DROP_IN: &str = "kt.conf";

/// `kt service` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum ServiceCmd {
    /// Write the systemd unit (/etc/systemd/system/kt.service), enable it
    /// and start it; ordered before CI runner services.
    Install(InstallArgs),
    /// Stop and disable the unit, remove it, and detach capture (remove the
    /// pinned programs kt leaves attached across restarts).
    Uninstall(UninstallArgs),
    /// Print the unit text (what the .deb ships).
    #[command(hide = true)]
    Unit {
        /// The policy config the unit runs with.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The kt binary the unit runs.
        #[arg(long, default_value = "/usr/bin/kt")]
        exec: PathBuf,
    },
}

/// Arguments of `kt service install`.
#[derive(Clone, Debug, clap::Args)]
pub struct InstallArgs {
    /// The policy config the service runs with (checked first).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Enable the unit but do not start it now.
    #[arg(long)]
    pub no_start: bool,
    /// Print what would be written and run; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write under this directory instead of / and run no systemctl (tests).
    #[arg(long, hide = true)]
    pub root: Option<PathBuf>,
}

/// Arguments of `kt service uninstall`.
#[derive(Clone, Debug, clap::Args)]
pub struct UninstallArgs {
    /// Print what would be removed and run; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove under this directory instead of /, run no systemctl and leave
    /// capture alone (tests).
    #[arg(long, hide = true)]
    pub root: Option<PathBuf>,
}

/// Runs a `kt service` subcommand.
pub fn run(cmd: ServiceCmd, global: &Global) -> anyhow::Result<ExitStatus> {
    crate::cli::with_std_output(global, |out| match cmd {
        ServiceCmd::Install(args) => install(&args, out),
        ServiceCmd::Uninstall(args) => uninstall(&args, out),
        ServiceCmd::Unit { config, exec } => {
            write!(out.out(), "{}", unit_text(&exec, &config, &[]))?;
            Ok(ExitStatus::Success)
        }
    })
}

/// The systemd unit that runs `exec run --keep-attached --config config`,
/// ordered before the CI runners (plus `extra_before`, the GitHub runner
/// units found on the host).
pub fn unit_text(exec: &Path, config: &Path, extra_before: &[String]) -> String {
    let mut before: Vec<&str> = RUNNERS.to_vec();
    before.extend(extra_before.iter().map(String::as_str));
    format!(
        "\
# kt: written by `kt service install` (the kt package ships the same text).
# Edit the policy, not this file: {config_comment}
[Unit]
Description=kt egress guard for AI provider keys
Documentation=man:kt(1) man:kt-run(1) man:kt-service(1)
Wants=network-online.target
After=network-online.target
# Capture is attached before CI jobs start. systemd takes no globs here:
# GitHub runner units (actions.runner.*.service) present at install time are
# named and get a drop-in; run `kt service install` again after adding one.
Before={before}

[Service]
Type=simple
ExecStart={exec} run --keep-attached --config {config}
# kt reloads its policy and secrets on SIGHUP.
ExecReload=/bin/kill -HUP $MAINPID
# On SIGTERM kt finishes in-flight requests; --keep-attached leaves the
# pinned programs attached, so a restart is fail-closed, never open.
Restart=always
RestartSec=2s
TimeoutStopSec=30s
Environment=KT_DATA_DIR=/var/lib/kt
StateDirectory=kt
StateDirectoryMode=0700
UMask=0077
# What capture needs: load BPF programs and maps (CAP_BPF, CAP_PERFMON;
# CAP_SYS_ADMIN on kernels before 5.8 and to mount a bpffs), attach them to
# a cgroup (CAP_NET_ADMIN), read the processes behind connections
# (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH), lock map memory on older kernels.
CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_ADMIN CAP_NET_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_SYS_RESOURCE CAP_NET_BIND_SERVICE
LimitMEMLOCK=infinity
NoNewPrivileges=yes
# Read-only system; /sys stays writable (pins on /sys/fs/bpf), so no
# ProtectKernelTunables=; ProtectControlGroups= is left off for capture's
# cgroup; no SystemCallFilter=: bpf() and mount() are outside @system-service.
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
",
        config_comment = config.display(),
        before = before.join(" "),
        exec = exec_arg(exec),
        config = exec_arg(config),
    )
}

/// The drop-in for a GitHub runner unit: start kt first, and with it.
fn drop_in_text() -> String {
    format!(
        "# kt: written by `kt service install`; removed by `kt service uninstall`.\n\
         [Unit]\nWants={UNIT}\nAfter={UNIT}\n"
    )
}

/// A path as one `ExecStart=` word: `%` and `$` escaped, quoted when it
/// holds anything but plain path characters.
fn exec_arg(p: &Path) -> String {
    let s = p.to_string_lossy().replace('%', "%%").replace('$', "$$");
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+@:%$".contains(c))
    {
        s
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// What install or uninstall runs, writes, removes and runs, in that order.
#[derive(Debug, Default, serde::Serialize)]
struct Plan {
    /// Before any file changes (uninstall: stop, disable); a failure here
    /// is reported and uninstall goes on (the unit may not be loaded).
    run_first: Vec<Vec<String>>,
    write: Vec<Written>,
    remove: Vec<PathBuf>,
    /// After the files (daemon-reload, enable, start).
    run_after: Vec<Vec<String>>,
    /// Pin directory of capture links to detach (uninstall).
    detach: Option<PathBuf>,
    dry_run: bool,
}

#[derive(Debug, serde::Serialize)]
struct Written {
    path: PathBuf,
    mode: String,
    text: String,
}

fn systemctl(args: &[&str]) -> Vec<String> {
    std::iter::once("systemctl")
        .chain(args.iter().copied())
        .map(String::from)
        .collect()
}

/// GitHub runner units in the unit directory (sorted, so the unit is stable).
fn github_runners(unit_dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(unit_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(GITHUB_RUNNER_PREFIX) && n.ends_with(".service"))
        .collect();
    found.sort();
    found
}

/// Drop-ins kt wrote earlier (uninstall removes them even if the runner is gone).
fn our_drop_ins(unit_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(unit_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(GITHUB_RUNNER_PREFIX) && n.ends_with(".service.d"))
        })
        .map(|e| e.path().join(DROP_IN))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
}

fn root_of(root: Option<&Path>) -> PathBuf {
    root.map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

fn install(args: &InstallArgs, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let config = std::path::absolute(&args.config)
        .with_context(|| format!("resolving {}", args.config.display()))?;
    if config.to_string_lossy().contains('\n') {
        anyhow::bail!("a config path with a line break cannot go into a unit file");
    }
    // A unit that cannot start only restarts in a loop: check first.
    if crate::cli::load_config(&config, out)?.is_none() {
        out.note(format!(
            "not installing: fix {} first (`kt gateway check --config {}`)",
            config.display(),
            config.display()
        ))?;
        return Ok(ExitStatus::Failure);
    }
    let exec = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .context("finding the kt binary")?;
    let unit_dir = root_of(args.root.as_deref()).join(UNIT_DIR);
    let runners = github_runners(&unit_dir);
    let mut plan = Plan {
        dry_run: args.dry_run,
        ..Plan::default()
    };
    plan.write.push(Written {
        path: unit_dir.join(UNIT),
        mode: "0644".into(),
        text: unit_text(&exec, &config, &runners),
    });
    for r in &runners {
        plan.write.push(Written {
            path: unit_dir.join(format!("{r}.d")).join(DROP_IN),
            mode: "0644".into(),
            text: drop_in_text(),
        });
    }
    if args.root.is_none() {
        plan.run_after.push(systemctl(&["daemon-reload"]));
        plan.run_after.push(systemctl(&["enable", UNIT]));
        if !args.no_start {
            // Starts it, or restarts a running kt onto the new unit.
            plan.run_after.push(systemctl(&["restart", UNIT]));
        }
    }
    execute(&plan, out)
}

fn uninstall(args: &UninstallArgs, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let unit_dir = root_of(args.root.as_deref()).join(UNIT_DIR);
    let mut plan = Plan {
        dry_run: args.dry_run,
        ..Plan::default()
    };
    if args.root.is_none() {
        plan.run_first.push(systemctl(&["stop", UNIT]));
        plan.run_first.push(systemctl(&["disable", UNIT]));
    }
    let unit = unit_dir.join(UNIT);
    if unit.exists() {
        plan.remove.push(unit);
    }
    plan.remove.extend(our_drop_ins(&unit_dir));
    if args.root.is_none() {
        plan.run_after.push(systemctl(&["daemon-reload"]));
        // kt stopped with --keep-attached left its programs pinned (fail
        // closed); uninstalling means capture goes too.
        plan.detach = crate::capture::bpffs_mount().map(|b| b.join("kt"));
        if plan.detach.is_none() {
            out.note("no bpffs is mounted here, so no capture links are pinned to detach")?;
        }
    }
    execute(&plan, out)
}

/// Carries out (or, dry, prints) a plan.
fn execute(plan: &Plan, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    if plan.dry_run {
        out.data(plan, |w| {
            writeln!(w, "dry run: nothing is changed")?;
            for cmd in &plan.run_first {
                writeln!(w, "would run: {}", cmd.join(" "))?;
            }
            for f in &plan.write {
                writeln!(w, "would write {} (mode {}):", f.path.display(), f.mode)?;
                for line in f.text.lines() {
                    writeln!(w, "    {line}")?;
                }
            }
            for p in &plan.remove {
                writeln!(w, "would remove {}", p.display())?;
            }
            for cmd in &plan.run_after {
                writeln!(w, "would run: {}", cmd.join(" "))?;
            }
            if let Some(d) = &plan.detach {
                writeln!(
                    w,
                    "would detach the capture links pinned under {}",
                    d.display()
                )?;
            }
            Ok(())
        })?;
        return Ok(ExitStatus::Success);
    }
    // Stopping a unit that is not loaded fails; uninstall goes on (idempotent).
    for cmd in &plan.run_first {
        run_cmd(cmd, out)?;
    }
    for f in &plan.write {
        write_file(&f.path, &f.text)?;
        out.note(format!("wrote {}", f.path.display()))?;
    }
    for p in &plan.remove {
        std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        if let Some(dir) = p
            .parent()
            .filter(|d| d.extension().is_some_and(|e| e == "d"))
        {
            // The drop-in directory, if kt's file was all it held.
            let _ = std::fs::remove_dir(dir);
        }
        out.note(format!("removed {}", p.display()))?;
    }
    for cmd in &plan.run_after {
        if !run_cmd(cmd, out)? {
            return Ok(ExitStatus::Failure);
        }
    }
    if let Some(dir) = &plan.detach {
        let n = crate::capture::remove_pinned_capture(dir);
        out.note(format!(
            "detached {n} capture link(s) pinned under {}",
            dir.display()
        ))?;
    }
    Ok(ExitStatus::Success)
}

/// Runs one command, inheriting stdio; false (reported) when it failed.
fn run_cmd(cmd: &[String], out: &mut Output<'_>) -> anyhow::Result<bool> {
    let Some((program, args)) = cmd.split_first() else {
        return Ok(true);
    };
    out.note(format!("running: {}", cmd.join(" ")))?;
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program} (is systemd the service manager here?)"))?;
    if status.success() {
        return Ok(true);
    }
    out.note(format!("`{}` failed ({status})", cmd.join(" ")))?;
    Ok(false)
}

/// Writes a unit file (0644) whole: to a temporary name, then renamed.
fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.kt-tmp", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_arg_quotes_and_escapes() {
        assert_eq!(exec_arg(Path::new("/usr/bin/kt")), "/usr/bin/kt");
        assert_eq!(
            exec_arg(Path::new("/opt/my kt/kt")),
            "\"/opt/my kt/kt\"",
            "a space needs quotes"
        );
        assert_eq!(exec_arg(Path::new("/a%b$c")), "/a%%b$$c");
    }

    #[test]
    fn unit_names_the_runners_and_the_config() {
        let unit = unit_text(
            Path::new("/usr/bin/kt"),
            Path::new("/etc/kt/policy.yaml"),
            &["actions.runner.o-r.h.service".into()],
        );
        assert!(unit.contains(
            "\nBefore=gitlab-runner.service buildkite-agent.service actions.runner.o-r.h.service\n"
        ));
        assert!(unit.contains(
            "\nExecStart=/usr/bin/kt run --keep-attached --config /etc/kt/policy.yaml\n"
        ));
        assert!(unit.contains("\nExecReload=/bin/kill -HUP $MAINPID\n"));
    }
}
