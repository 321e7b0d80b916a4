//! The `kt` binary, built inside this package so suites here can run it
//! (`CARGO_BIN_EXE_*` only names a package's own binaries). It must stay
//! identical to `guard/src/main.rs`: it only calls `guard::cli::main`.

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
