//! `kt gateway run --config FILE [--listen ADDR]`: the gateway alone, in the
//! foreground, for explicit clients (base URL and CONNECT). SIGINT/SIGTERM
//! stop accepting, let in-flight requests finish (bounded), and exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::cli::serve::{self, Assembled};
use crate::cli::{Global, exit};
use crate::config::Config;

/// Arguments of `kt gateway run`.
#[derive(Clone, Debug, clap::Args)]
pub struct GatewayRunArgs {
    /// The configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Listen address for explicit clients (overrides `gateway.listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

/// Runs `kt gateway run`.
pub fn run(args: GatewayRunArgs, global: &Global) -> anyhow::Result<u8> {
    let config = match crate::cli::load_config(&args.config, global)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    run_with(config, args.listen, global)
}

/// Runs the gateway over an already-loaded config until SIGINT/SIGTERM.
/// Exit 1 when a required target's secret is missing (fail closed).
pub fn run_with(config: Config, listen: Option<SocketAddr>, global: &Global) -> anyhow::Result<u8> {
    let runtime = serve::runtime()?;
    // The gateway's pool and the event writer start inside the runtime.
    let _guard = runtime.enter();
    let Assembled { gateway, events } = match serve::assemble(
        config,
        global,
        std::sync::Arc::new(crate::capture::NoExemption),
    )? {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };
    let result = runtime.block_on(async move {
        let listener = gateway.bind(listen).await.context("binding the listener")?;
        let addr = listener.local_addr().context("reading the listen address")?;
        eprintln!(
            "kt: gateway listening on http://{addr} (OPENAI_BASE_URL=http://{addr}/openai/v1, ANTHROPIC_BASE_URL=http://{addr}/anthropic, HTTPS_PROXY=http://{addr}); targets: {}",
            gateway.active_targets().join(", ")
        );
        serve::stop_on_signal(&gateway, "finishing in-flight requests");
        gateway.serve_explicit(listener).await.context("serving")?;
        Ok::<_, anyhow::Error>(())
    });
    serve::close_events(events);
    result?;
    Ok(exit::OK)
}
