//! `kt ca path|export|install|regenerate`: the local CA and trust-store helpers.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::ca::Ca;
use crate::cli::{ExitStatus, Global, Output};

/// `kt ca` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum CaCmd {
    /// Print where the CA certificate is (created on first use).
    Path,
    /// Print the CA certificate (PEM) to stdout; for containers, a bundle
    /// with the host's roots, or the variables that point a job at it.
    Export {
        /// Print the host's system roots followed by kt's CA: one file to
        /// mount into containers, which replaces their own bundle (so the
        /// job still reaches every other HTTPS site).
        #[arg(long, conflicts_with = "env")]
        bundle: bool,
        /// Print `NAME=PATH` lines (a `docker run --env-file`, GitLab
        /// `environment`) pointing OpenSSL, curl, Python, Node and git at
        /// PATH, where the job's container mounts the file (`--bundle`).
        #[arg(long, value_name = "PATH")]
        env: Option<PathBuf>,
    },
    /// Copy the CA certificate into the system trust store (needs root) and
    /// print the variables for runtimes that do not read it.
    Install,
    /// Replace the CA with a new one name-constrained to the provider hosts,
    /// the config's target hosts and `capture.hosts` (the old files are kept
    /// as `*.old`); trust it again with `kt ca install` afterwards.
    Regenerate {
        /// The config whose hosts the new CA may issue for.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// `kt ca regenerate`.
#[derive(serde::Serialize)]
struct Regenerated<'a> {
    path: &'a Path,
    permitted: Vec<String>,
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

/// `kt ca path`.
#[derive(serde::Serialize)]
struct CaPath<'a> {
    path: &'a Path,
}

/// `kt ca export`.
#[derive(serde::Serialize)]
struct CaExport<'a> {
    path: &'a Path,
    pem: &'a str,
}

/// `kt ca export --bundle`.
#[derive(serde::Serialize)]
struct CaBundle<'a> {
    path: &'a Path,
    system: &'a Path,
    pem: &'a str,
}

/// Variables that make a job's TLS libraries trust the bundle mounted at
/// `path`: OpenSSL (and Go, Ruby, PHP through it) `SSL_CERT_FILE`, Python
/// requests `REQUESTS_CA_BUNDLE`, Node `NODE_EXTRA_CA_CERTS` (adds to its
/// roots), curl `CURL_CA_BUNDLE`, git `GIT_SSL_CAINFO`.
pub(crate) fn container_env(path: &Path) -> std::collections::BTreeMap<&'static str, String> {
    let p = path.display().to_string();
    [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ]
    .into_iter()
    .map(|k| (k, p.clone()))
    .collect()
}

/// The system roots and kt's CA, each ending in a newline.
fn bundle_pem(roots: &str, ca: &str) -> String {
    let mut pem = roots.to_string();
    if !pem.is_empty() && !pem.ends_with('\n') {
        pem.push('\n');
    }
    pem.push_str("# kt local CA\n");
    pem.push_str(ca);
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    pem
}

/// The variables runtimes with their own roots need (`kt ca install`).
#[derive(serde::Serialize)]
struct EnvHints {
    path: String,
    env: EnvVars,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
struct EnvVars {
    requests_ca_bundle: String,
    ssl_cert_file: String,
    node_extra_ca_certs: String,
}

/// Runs a `kt ca` subcommand.
pub fn run(cmd: CaCmd, global: &Global) -> anyhow::Result<ExitStatus> {
    crate::cli::with_std_output(global, |out| run_with(cmd, global, out))
}

fn run_with(cmd: CaCmd, global: &Global, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let dir = Ca::dir_in(&global.data_dir);
    if let CaCmd::Regenerate { config } = &cmd {
        let mut hosts: Vec<String> = crate::provider::official_hosts()
            .map(String::from)
            .collect();
        if let Some(path) = config {
            let Some(c) = crate::cli::load_config(path, out)? else {
                return Ok(ExitStatus::Failure);
            };
            hosts = crate::app::ca_hosts(&c);
        }
        let ca = Ca::regenerate(&dir, &hosts).context("regenerating the local CA")?;
        let path = ca
            .cert_path()
            .unwrap_or_else(|| dir.join(crate::ca::CERT_FILE));
        let doc = Regenerated {
            path: &path,
            permitted: hosts.clone(),
        };
        out.data(&doc, |w| {
            writeln!(
                w,
                "new local CA {} (may issue for: {}); trust it again with `kt ca install`",
                path.display(),
                hosts.join(", ")
            )
        })?;
        return Ok(ExitStatus::Success);
    }
    let ca = Ca::load_or_create(&dir).context("opening the local CA")?;
    if ca.permitted().is_none() {
        out.note(
            "the local CA has no name constraints (made by an older kt); `kt ca regenerate --config FILE` replaces it",
        )?;
    }
    let cert_path = ca
        .cert_path()
        .unwrap_or_else(|| dir.join(crate::ca::CERT_FILE));
    match cmd {
        CaCmd::Path => {
            out.data(&CaPath { path: &cert_path }, |w| {
                writeln!(w, "{}", cert_path.display())
            })?;
            Ok(ExitStatus::Success)
        }
        CaCmd::Export {
            env: Some(mounted), ..
        } => {
            let vars = container_env(&mounted);
            out.data(&vars, |w| {
                for (k, v) in &vars {
                    writeln!(w, "{k}={v}")?;
                }
                Ok(())
            })?;
            Ok(ExitStatus::Success)
        }
        CaCmd::Export { bundle: true, .. } => {
            let Some((system, roots)) = SYSTEM_BUNDLES
                .iter()
                .find_map(|b| Some((*b, std::fs::read_to_string(b).ok()?)))
            else {
                out.note(format!(
                    "no system CA bundle found ({}); a bundle of kt's CA alone would cut the job off every other HTTPS site",
                    SYSTEM_BUNDLES.join(", ")
                ))?;
                return Ok(ExitStatus::Failure);
            };
            let pem = bundle_pem(&roots, ca.cert_pem());
            let doc = CaBundle {
                path: &cert_path,
                system: Path::new(system),
                pem: &pem,
            };
            out.data(&doc, |w| write!(w, "{pem}"))?;
            Ok(ExitStatus::Success)
        }
        CaCmd::Export { .. } => {
            let doc = CaExport {
                path: &cert_path,
                pem: ca.cert_pem(),
            };
            out.data(&doc, |w| write!(w, "{}", ca.cert_pem()))?;
            Ok(ExitStatus::Success)
        }
        CaCmd::Install => install(&ca, &cert_path, out),
        // Handled above, before an existing CA is opened.
        CaCmd::Regenerate { .. } => Ok(ExitStatus::Success),
    }
}

fn install(ca: &Ca, cert_path: &Path, out: &mut Output<'_>) -> anyhow::Result<ExitStatus> {
    let Some((anchor_dir, refresh)) = SYSTEM_STORES
        .iter()
        .find(|(d, _)| Path::new(d).is_dir())
        .map(|(d, c)| (PathBuf::from(d), *c))
    else {
        out.note(format!(
            "no known system trust store directory found; trust {} by hand",
            cert_path.display()
        ))?;
        print_env_hints(cert_path, false, out)?;
        return Ok(ExitStatus::Failure);
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
        out.note(format!(
            "{refresh} failed ({status}); the certificate is at {}",
            dest.display()
        ))?;
        return Ok(ExitStatus::Failure);
    }
    out.note(format!(
        "installed {} into the system trust store",
        dest.display()
    ))?;
    print_env_hints(cert_path, true, out)?;
    Ok(ExitStatus::Success)
}

/// Python (requests/certifi) and Node ship their own roots and ignore the
/// system store: print what to set for them.
/// `REQUESTS_CA_BUNDLE`/`SSL_CERT_FILE` replace the whole bundle, so they
/// point at the system bundle (which now holds the kt CA) when there is one;
/// `NODE_EXTRA_CA_CERTS` adds to Node's roots, so it names the kt CA alone.
fn print_env_hints(cert_path: &Path, installed: bool, out: &mut Output<'_>) -> io::Result<()> {
    let p = cert_path.display().to_string();
    let bundle = SYSTEM_BUNDLES
        .iter()
        .find(|b| installed && Path::new(b).is_file())
        .map_or_else(|| p.clone(), ToString::to_string);
    let hints = EnvHints {
        path: p.clone(),
        env: EnvVars {
            requests_ca_bundle: bundle.clone(),
            ssl_cert_file: bundle.clone(),
            node_extra_ca_certs: p.clone(),
        },
    };
    out.data(&hints, |w| {
        writeln!(
            w,
            "# Python (requests, httpx via certifi) and curl/OpenSSL-based tools:"
        )?;
        writeln!(w, "export REQUESTS_CA_BUNDLE={bundle}")?;
        writeln!(w, "export SSL_CERT_FILE={bundle}")?;
        writeln!(w, "# Node.js:")?;
        writeln!(w, "export NODE_EXTRA_CA_CERTS={p}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::OutputFormat;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn path_and_export_create_the_ca_once() {
        let tmp = tempfile::tempdir().unwrap();
        let global = Global {
            output: OutputFormat::Json,
            data_dir: tmp.path().to_path_buf(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut o = Output::new(OutputFormat::Json, &mut out, &mut err);
        assert_eq!(
            run_with(CaCmd::Path, &global, &mut o).unwrap(),
            ExitStatus::Success
        );
        let cert = tmp.path().join("ca").join(crate::ca::CERT_FILE);
        let key = tmp.path().join("ca").join(crate::ca::KEY_FILE);
        let pem = std::fs::read_to_string(&cert).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            run_with(
                CaCmd::Export {
                    bundle: false,
                    env: None
                },
                &global,
                &mut o
            )
            .unwrap(),
            ExitStatus::Success
        );
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), pem);
        let text = String::from_utf8(out).unwrap();
        let mut docs = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
        let path = docs.next().unwrap().unwrap();
        assert_eq!(path["path"], cert.display().to_string());
        assert_eq!(docs.next().unwrap().unwrap()["pem"], pem);
    }

    #[test]
    fn containers_get_a_bundle_and_the_variables_pointing_at_it() {
        let tmp = tempfile::tempdir().unwrap();
        let global = Global {
            output: OutputFormat::Human,
            data_dir: tmp.path().to_path_buf(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut o = Output::new(OutputFormat::Human, &mut out, &mut err);
        let export = CaCmd::Export {
            bundle: false,
            env: Some(PathBuf::from("/etc/kt/ca-bundle.pem")),
        };
        assert_eq!(
            run_with(export, &global, &mut o).unwrap(),
            ExitStatus::Success
        );
        let text = String::from_utf8(out).unwrap();
        for var in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
        ] {
            assert!(
                text.lines()
                    .any(|l| l == format!("{var}=/etc/kt/ca-bundle.pem")),
                "{text}"
            );
        }
        let b = bundle_pem("-----ROOT-----", "-----KT-----\n");
        assert_eq!(b, "-----ROOT-----\n# kt local CA\n-----KT-----\n");
    }
}
