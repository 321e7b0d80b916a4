//! The `kt` command line: parse, call the library, render. The command tree
//! and dispatch are here; each command group lives in [`commands`], all
//! printing goes through [`output`], and every command ends in one
//! [`ExitStatus`] (0 ok, 1 the command ran and found a problem, 2 the
//! command itself failed).
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod commands;
pub mod output;

pub use output::{Output, OutputFormat};

/// How a command ended; the process exit code per the CLI contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It did what was asked (exit 0).
    Success,
    /// It ran and found a problem: a check failed, a secret does not
    /// resolve, the config is invalid (exit 1).
    Failure,
    /// The command itself failed: usage, I/O (exit 2).
    Error,
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(status: ExitStatus) -> std::process::ExitCode {
        std::process::ExitCode::from(match status {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Error => 2,
        })
    }
}

/// Options every subcommand gets.
#[derive(Clone, Debug)]
pub struct Global {
    /// `--output`.
    pub output: OutputFormat,
    /// `--data-dir` / `KT_DATA_DIR` / default.
    pub data_dir: PathBuf,
}

/// kt: an eBPF-assisted egress guard for AI provider keys.
#[derive(Debug, Parser)]
#[command(name = "kt", version, about, long_about = None)]
pub struct Cli {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Data directory (secret store, CA, events) [default: /var/lib/kt as root, else the XDG data dir].
    #[arg(long, global = true, env = "KT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Gateway plus eBPF capture of every provider-bound connection in a cgroup (foreground).
    Run(commands::run::RunArgs),
    /// Manage provider secrets (values never on the command line).
    Secrets {
        /// What to do.
        #[command(subcommand)]
        cmd: commands::secrets::SecretsCmd,
    },
    /// The local CA that signs the gateway's certificates.
    Ca {
        /// What to do.
        #[command(subcommand)]
        cmd: commands::ca::CaCmd,
    },
    /// Decision events, newest last (`--keys`: who still uses which key).
    Events(commands::events::EventsArgs),
    /// The gateway: check a config, run it for explicit clients, reload the running one.
    Gateway {
        /// What to do.
        #[command(subcommand)]
        cmd: commands::gateway::GatewayCmd,
    },
    /// kt as a systemd service: install (enable, start) or uninstall the unit.
    Service {
        /// What to do.
        #[command(subcommand)]
        cmd: commands::service::ServiceCmd,
    },
    /// Strict egress: what jobs reached, as a suggested allowlist (`kt egress report`).
    Egress {
        /// What to do.
        #[command(subcommand)]
        cmd: commands::egress::EgressCmd,
    },
    /// A summary of what kt decided (a CI job summary with `--format markdown`).
    Report(commands::report::ReportArgs),
    /// Print a shell completion script: `kt completions bash > /etc/bash_completion.d/kt`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `kt man | man -l -`; with `--dir`,
    /// write kt.1 and one page per subcommand there.
    Man {
        /// Write the pages into this directory instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Parses the command line, runs it, and returns how it ended.
pub fn main() -> ExitStatus {
    let cli = Cli::parse();
    let global = Global {
        output: cli.output,
        data_dir: cli
            .data_dir
            .clone()
            .unwrap_or_else(crate::datadir::default_dir),
    };
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args, &global),
        Command::Secrets { cmd } => commands::secrets::run(cmd, &global),
        Command::Ca { cmd } => commands::ca::run(cmd, &global),
        Command::Events(args) => commands::events::run(&args, &global),
        Command::Gateway { cmd } => commands::gateway::run(cmd, &global),
        Command::Service { cmd } => commands::service::run(cmd, &global),
        Command::Egress { cmd } => commands::egress::run(cmd, &global),
        Command::Report(args) => {
            with_std_output(&global, |out| commands::report::run(&args, &global, out))
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kt", &mut std::io::stdout());
            Ok(ExitStatus::Success)
        }
        Command::Man { dir } => man(dir.as_deref()),
    };
    finish(result, &mut std::io::stderr())
}

/// `kt man`: the page on stdout, or every page into `dir`.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<ExitStatus> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", d.display()))?;
            clap_mangen::generate_to(cmd, d)
                .map_err(|e| anyhow::anyhow!("writing the pages into {}: {e}", d.display()))?;
        }
    }
    Ok(ExitStatus::Success)
}

/// The one place a command's result becomes its exit status: a closed
/// stdout (`kt events | head`) is success, any other error is printed to
/// `err` and is [`ExitStatus::Error`].
pub fn finish(result: anyhow::Result<ExitStatus>, err: &mut dyn Write) -> ExitStatus {
    match result {
        Ok(status) => status,
        Err(e) if output::is_broken_pipe(&e) => ExitStatus::Success,
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            ExitStatus::Error
        }
    }
}

/// A config file that does not load: every problem, with file, line and
/// column.
#[derive(serde::Serialize)]
struct InvalidConfig<'a> {
    config: String,
    valid: bool,
    errors: &'a crate::config::ConfigErrors,
}

/// Loads a config for a command. `Ok(None)` when it is invalid: every
/// problem has been reported (JSON on stdout, or text on stderr) and the
/// command ends with [`ExitStatus::Failure`]. An unreadable file is an error
/// of the command itself.
pub fn load_config(
    path: &std::path::Path,
    out: &mut Output<'_>,
) -> anyhow::Result<Option<crate::config::Config>> {
    match crate::config::load(path) {
        Ok(c) => Ok(Some(c)),
        Err(crate::config::LoadError::Invalid(errors)) => {
            let doc = InvalidConfig {
                config: path.display().to_string(),
                valid: false,
                errors: &errors,
            };
            match out.format() {
                OutputFormat::Json => out.data(&doc, |_| Ok(()))?,
                OutputFormat::Human => {
                    out.note(&errors)?;
                    out.note(format!("{} problem(s) in {}", errors.len(), path.display()))?;
                }
            }
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e)),
    }
}

/// Runs `f` with an [`Output`] over the process's stdout and stderr.
pub fn with_std_output<T>(global: &Global, f: impl FnOnce(&mut Output<'_>) -> T) -> T {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    f(&mut Output::new(global.output, &mut out, &mut err))
}
