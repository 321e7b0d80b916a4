//! The `kt` command line: argument parsing and dispatch. Each subcommand
//! lives in its own file; they return an exit code (0 ok, 1 the command ran
//! and found a problem, 2 the command itself failed).

use std::path::PathBuf;

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people.
    #[default]
    Human,
    /// For machines: one JSON document (or JSON Lines for streams).
    Json,
}

/// Options every subcommand gets.
#[derive(Clone, Debug)]
pub struct Global {
    /// `--output`.
    pub output: OutputFormat,
    /// `--data-dir` / `KT_DATA_DIR` / default.
    pub data_dir: PathBuf,
}

/// Exit codes of the CLI contract.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The command ran and found a problem.
    pub const PROBLEM: u8 = 1;
    /// The command itself failed (usage, I/O).
    pub const FAILED: u8 = 2;
}

/// The default data directory: `/var/lib/kt` as root, else `$XDG_DATA_HOME/kt`
/// or `~/.local/share/kt`.
pub fn default_data_dir() -> PathBuf {
    // SAFETY-free check: geteuid through std is not available; read /proc.
    if is_root() {
        return PathBuf::from("/var/lib/kt");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("kt");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/kt");
    }
    PathBuf::from(".kt")
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // The owner of /proc/self is the effective uid of this process.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

pub mod ca;
pub mod gateway_run;
