//! The `kt` binary: logs to stderr, data to stdout, exit codes per the CLI
//! contract (0 ok, 1 problem found, 2 the command failed).

use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_env("KT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    std::process::ExitCode::from(guard::cli::main())
}
