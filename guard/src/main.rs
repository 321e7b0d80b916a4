//! The `kt` binary: logs to stderr, data to stdout, exit codes per the CLI
//! contract (0 ok, 1 problem found, 2 the command failed).
#![forbid(unsafe_code)]

use rustix::process::{DumpableBehavior, set_dumpable_behavior};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // Before any key is read: a non-dumpable process writes no core dump, and
    // other processes of the same uid can neither ptrace it nor read its
    // memory or environment under /proc (the kernel hands those files to
    // root); only root with CAP_SYS_PTRACE still can.
    let dumpable = set_dumpable_behavior(DumpableBehavior::NotDumpable);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_env("KT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = dumpable {
        tracing::warn!(error = %e, "cannot mark the process non-dumpable; a core dump could hold keys");
    }
    std::process::ExitCode::from(guard::cli::main())
}
