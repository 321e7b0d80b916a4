//! The `kt` command line: argument parsing and dispatch. Each subcommand
//! lives in its own file; they return an exit code (0 ok, 1 the command ran
//! and found a problem, 2 the command itself failed).
#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod secrets;

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

/// The default data directory (see [`crate::datadir::default_dir`]).
pub fn default_data_dir() -> PathBuf {
    crate::datadir::default_dir()
}

mod app;
pub mod events;
pub mod gateway_check;

pub use app::{Cli, main};

use std::sync::Arc;

/// Loads a config for a command. Invalid files are reported (every problem,
/// with file, line and column) and give `Err(exit::PROBLEM)`; unreadable
/// files are an error of the command itself.
pub fn load_config(
    path: &std::path::Path,
    global: &Global,
) -> anyhow::Result<Result<crate::config::Config, u8>> {
    match crate::config::load(path) {
        Ok(c) => Ok(Ok(c)),
        Err(crate::config::LoadError::Invalid(errors)) => {
            match global.output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "config": path.display().to_string(),
                        "valid": false,
                        "errors": errors,
                    }))?
                ),
                OutputFormat::Human => {
                    eprintln!("{errors}");
                    eprintln!("{} problem(s) in {}", errors.len(), path.display());
                }
            }
            Ok(Err(exit::PROBLEM))
        }
        Err(e) => Err(anyhow::Error::new(e)),
    }
}

/// The resolver for `secret_key_ref`s: env, then the store, then the keychain.
pub fn resolver(global: &Global) -> anyhow::Result<Arc<dyn crate::secrets::Resolve>> {
    Ok(Arc::new(crate::secrets::Resolver::from_data_dir(
        &global.data_dir,
    )))
}

pub mod ca;
pub mod gateway_run;
pub mod hosts;
pub mod run;
pub mod serve;
