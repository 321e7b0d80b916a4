//! `kt ca path|export|install`: the local CA and trust-store helpers.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::ca::Ca;
use crate::cli::{Global, OutputFormat, exit};

/// `kt ca` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum CaCmd {
    /// Print where the CA certificate is (created on first use).
    Path,
    /// Print the CA certificate (PEM) to stdout.
    Export,
    /// Copy the CA certificate into the system trust store (needs root) and
    /// print the variables for runtimes that do not read it.
    Install,
}

/// System stores this knows how to update: (anchor directory, refresh command).
const SYSTEM_STORES: &[(&str, &str)] = &[
    ("/usr/local/share/ca-certificates", "update-ca-certificates"),
    ("/etc/pki/ca-trust/source/anchors", "update-ca-trust"),
    ("/etc/ca-certificates/trust-source/anchors", "trust"),
];

/// System-wide PEM bundles, as refreshed by the commands above.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Runs a `kt ca` subcommand.
pub fn run(cmd: CaCmd, global: &Global) -> anyhow::Result<u8> {
    let dir = Ca::dir_in(&global.data_dir);
    let ca = Ca::load_or_create(&dir).context("opening the local CA")?;
    let cert_path = ca
        .cert_path()
        .unwrap_or_else(|| dir.join(crate::ca::CERT_FILE));
    match cmd {
        CaCmd::Path => {
            match global.output {
                OutputFormat::Human => println!("{}", cert_path.display()),
                OutputFormat::Json => println!("{}", serde_json::json!({ "path": cert_path })),
            }
            Ok(exit::OK)
        }
        CaCmd::Export => {
            match global.output {
                OutputFormat::Human => print!("{}", ca.cert_pem()),
                OutputFormat::Json => {
                    println!(
                        "{}",
                        serde_json::json!({ "path": cert_path, "pem": ca.cert_pem() })
                    )
                }
            }
            Ok(exit::OK)
        }
        CaCmd::Install => install(&ca, &cert_path, global),
    }
}

fn install(ca: &Ca, cert_path: &Path, global: &Global) -> anyhow::Result<u8> {
    let Some((anchor_dir, refresh)) = SYSTEM_STORES
        .iter()
        .find(|(d, _)| Path::new(d).is_dir())
        .map(|(d, c)| (PathBuf::from(d), *c))
    else {
        eprintln!(
            "no known system trust store directory found; trust {} by hand",
            cert_path.display()
        );
        print_env_hints(cert_path, false, global);
        return Ok(exit::PROBLEM);
    };
    let dest = anchor_dir.join("kt-local-ca.crt");
    std::fs::write(&dest, ca.cert_pem())
        .with_context(|| format!("writing {} (run as root)", dest.display()))?;
    let mut command = Command::new(refresh);
    if refresh == "trust" {
        command.args(["extract-compat"]);
    }
    let status = command
        .status()
        .with_context(|| format!("running {refresh}"))?;
    if !status.success() {
        eprintln!(
            "{refresh} failed ({status}); the certificate is at {}",
            dest.display()
        );
        return Ok(exit::PROBLEM);
    }
    eprintln!("installed {} into the system trust store", dest.display());
    print_env_hints(cert_path, true, global);
    Ok(exit::OK)
}

/// Python (requests/certifi) and Node ship their own roots and ignore the
/// system store: print what to set for them.
/// `REQUESTS_CA_BUNDLE`/`SSL_CERT_FILE` replace the whole bundle, so they
/// point at the system bundle (which now holds the kt CA) when there is one;
/// `NODE_EXTRA_CA_CERTS` adds to Node's roots, so it names the kt CA alone.
fn print_env_hints(cert_path: &Path, installed: bool, global: &Global) {
    let p = cert_path.display().to_string();
    let bundle = SYSTEM_BUNDLES
        .iter()
        .find(|b| installed && Path::new(b).is_file())
        .map(|b| b.to_string())
        .unwrap_or_else(|| p.clone());
    match global.output {
        OutputFormat::Human => {
            println!("# Python (requests, httpx via certifi) and curl/OpenSSL-based tools:");
            println!("export REQUESTS_CA_BUNDLE={bundle}");
            println!("export SSL_CERT_FILE={bundle}");
            println!("# Node.js:");
            println!("export NODE_EXTRA_CA_CERTS={p}");
        }
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "path": p,
                "env": {
                    "REQUESTS_CA_BUNDLE": bundle,
                    "SSL_CERT_FILE": bundle,
                    "NODE_EXTRA_CA_CERTS": p,
                }
            })
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn path_and_export_create_the_ca_once() {
        let tmp = tempfile::tempdir().unwrap();
        let global = Global {
            output: OutputFormat::Json,
            data_dir: tmp.path().to_path_buf(),
        };
        assert_eq!(run(CaCmd::Path, &global).unwrap(), exit::OK);
        let cert = tmp.path().join("ca").join(crate::ca::CERT_FILE);
        let key = tmp.path().join("ca").join(crate::ca::KEY_FILE);
        let pem = std::fs::read_to_string(&cert).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(run(CaCmd::Export, &global).unwrap(), exit::OK);
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), pem);
    }
}
