//! The command tree of `kt` and its dispatch.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::{Global, OutputFormat, exit};

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
    Run(super::run::RunArgs),
    /// Manage provider secrets (values never on the command line).
    Secrets {
        /// What to do.
        #[command(subcommand)]
        cmd: super::secrets::SecretsCmd,
    },
    /// The local CA that signs the gateway's certificates.
    Ca {
        /// What to do.
        #[command(subcommand)]
        cmd: super::ca::CaCmd,
    },
    /// Decision events, newest last (`--keys`: who still uses which key).
    Events(super::events::EventsArgs),
    /// The gateway: check a config, or run it for explicit clients.
    Gateway {
        /// What to do.
        #[command(subcommand)]
        cmd: GatewayCmd,
    },
}

/// `kt gateway ...`.
#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Preflight: config, secrets of required targets, policy chain, kernel support, ports.
    Check(super::gateway_check::CheckArgs),
    /// Run the gateway in the foreground for explicit clients (base URL, CONNECT proxy).
    Run(super::gateway_run::GatewayRunArgs),
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> u8 {
    let cli = Cli::parse();
    let global = Global {
        output: cli.output,
        data_dir: cli.data_dir.clone().unwrap_or_else(super::default_data_dir),
    };
    let result = match cli.command {
        Command::Run(args) => super::run::run(args, &global),
        Command::Secrets { cmd } => super::secrets::run(cmd, &global),
        Command::Ca { cmd } => super::ca::run(cmd, &global),
        Command::Events(args) => super::events::run(&args, &global),
        Command::Gateway { cmd } => match cmd {
            GatewayCmd::Check(args) => super::gateway_check::run(&args, &global),
            GatewayCmd::Run(args) => super::gateway_run::run(args, &global),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::FAILED
        }
    }
}
