//! `kt gateway run --config FILE [--listen ADDR]`: the gateway alone, in the
//! foreground, for explicit clients (base URL and CONNECT). SIGINT/SIGTERM
//! stop accepting, let in-flight requests finish (bounded), and exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::ca::Ca;
use crate::cli::{Global, exit};
use crate::config::Config;
use crate::gateway::{GatewayBuilder, GatewayError};
use crate::secrets::Resolve;

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
    run_with(config, crate::cli::resolver(global)?, args.listen, global)
}

/// Runs the gateway over an already-loaded config and a resolver until
/// SIGINT/SIGTERM. Exit 1 when a required target's secret is missing.
pub fn run_with(
    config: Config,
    resolver: Arc<dyn Resolve>,
    listen: Option<SocketAddr>,
    global: &Global,
) -> anyhow::Result<u8> {
    let ca = Ca::load_or_create(&Ca::dir_in(&global.data_dir)).context("opening the local CA")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Built inside the runtime: the pooled client may start timers.
    let built = {
        let _guard = runtime.enter();
        GatewayBuilder::new(Arc::new(config), resolver, Arc::new(ca)).build()
    };
    let gateway = match built {
        Ok(g) => g,
        Err(e @ GatewayError::MissingSecrets(_)) => {
            eprintln!("kt: {e}");
            return Ok(exit::PROBLEM);
        }
        Err(e) => return Err(e).context("starting the gateway"),
    };
    for w in gateway.warnings() {
        eprintln!("kt: warning: {w}");
    }
    runtime.block_on(async move {
        let listener = gateway.bind(listen).await.context("binding the listener")?;
        let addr = listener.local_addr().context("reading the listen address")?;
        eprintln!(
            "kt: gateway listening on http://{addr} (OPENAI_BASE_URL=http://{addr}/openai/v1, ANTHROPIC_BASE_URL=http://{addr}/anthropic, HTTPS_PROXY=http://{addr}); targets: {}",
            gateway.active_targets().join(", ")
        );
        let stopper = gateway.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            eprintln!("kt: stopping: finishing in-flight requests");
            stopper.shutdown();
        });
        gateway.serve_explicit(listener).await.context("serving")?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(exit::OK)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use crate::secrets::Resolved;

    struct Nothing;

    impl Resolve for Nothing {
        fn resolve(&self, _r: &SecretKeyRef) -> Result<Option<Resolved>, String> {
            Ok(None)
        }
    }

    #[test]
    fn missing_required_secret_exits_1_before_listening() {
        let tmp = tempfile::tempdir().unwrap();
        let global = Global {
            output: crate::cli::OutputFormat::Human,
            data_dir: tmp.path().to_path_buf(),
        };
        let config = Config {
            source: "t.yaml".into(),
            pack: Pack {
                name: "t".into(),
                version: "1".into(),
                enabled: true,
            },
            providers: Providers {
                strategy: RoutingStrategy::Ordered,
                fallback: true,
                targets: vec![Target {
                    id: "primary".into(),
                    provider: Provider::OpenAi,
                    model: None,
                    required: true,
                    secret_key_ref: SecretKeyRef::Store("OPENAI_KEY".into()),
                    base_url: None,
                }],
            },
            chain: vec![],
            dlp: None,
            audit: None,
            gateway: crate::config::Gateway::default(),
            capture: Capture::default(),
        };
        // A documentation address is never local, so binding it fails (no
        // packet is sent): reaching the listener would be an error, not 1.
        let listen = Some("192.0.2.1:8787".parse().unwrap());
        let code = run_with(config, Arc::new(Nothing), listen, &global).unwrap();
        assert_eq!(code, exit::PROBLEM);
    }
}
