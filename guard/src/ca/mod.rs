//! The local certificate authority: created on first use under the data dir
//! (ECDSA P-256, private key readable by the owner only), and leaf
//! certificates per server name, minted on demand and cached, served to
//! rustls through [`LeafResolver`].
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::secrets::UnsafePath;

/// File name of the CA certificate inside the CA directory.
pub const CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory.
pub const KEY_FILE: &str = "ca.key";
/// Leaves kept in memory before the cache is emptied (bounds memory when
/// clients send many distinct names).
const LEAF_CACHE_MAX: usize = 4096;

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file or directory could not be read or written.
    #[error("ca file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The stored CA key could not be parsed.
    #[error("ca key {path}: not a valid pem private key")]
    BadKey {
        /// The key file.
        path: PathBuf,
    },
    /// Certificate generation failed.
    #[error("ca certificate for {name}: {message}")]
    Generate {
        /// The name the certificate was for.
        name: String,
        /// What rcgen or rustls said.
        message: String,
    },
    /// A CA file, or a directory above it, that another user could replace
    /// (wrong owner, or writable by others).
    #[error(transparent)]
    Untrusted(#[from] UnsafePath),
    /// The stored CA key file is readable by others.
    #[error("ca key {path}: mode {mode:o} lets others read it; fix it with `chmod 600 {path}`")]
    KeyMode {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// The local CA.
pub struct Ca {
    dir: Option<PathBuf>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The rustls crypto provider used everywhere in the guard (explicit, so a
/// second provider compiled into the process never makes rustls guess).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn gen_err(name: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |e| CaError::Generate {
        name: name.to_string(),
        message: e.to_string(),
    }
}

/// Reads a CA file after checking, on the open handle, that only kt's uid
/// or root owns it and that others cannot write it (nor read it when
/// `private`): a swapped certificate would be exported and installed as the
/// trust anchor.
fn read_checked(path: &Path, private: bool) -> Result<String, CaError> {
    use std::io::Read;
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    let mode = meta.permissions().mode();
    if private && mode & 0o077 != 0 {
        return Err(CaError::KeyMode {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    crate::secrets::check_file(path, &meta)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_err(path))?;
    Ok(text)
}

/// The CA's parameters; rebuilt identically on load so leaves signed with the
/// stored key name the same issuer as the stored certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kt local CA");
    dn.push(DnType::OrganizationName, "kt egress guard");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

impl Ca {
    /// The CA directory under a data dir.
    pub fn dir_in(data_dir: &Path) -> PathBuf {
        data_dir.join("ca")
    }

    /// Loads the CA from `dir` (see [`Ca::dir_in`]), creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        crate::secrets::check_dirs(dir, dir)?;
        let key = match read_checked(&key_path, true) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(|_| CaError::BadKey {
                path: key_path.clone(),
            })?,
            Err(CaError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                    .map_err(gen_err("kt local CA"))?;
                // create_new + 0600 from the start: the key is never briefly
                // world-readable, and a concurrent creator loses cleanly.
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(io_err(&key_path))?;
                f.write_all(key.serialize_pem().as_bytes())
                    .map_err(io_err(&key_path))?;
                let _ = fs::remove_file(&cert_path);
                key
            }
            Err(e) => return Err(e),
        };
        let params = ca_params();
        let cert_pem = match read_checked(&cert_path, false) {
            Ok(pem) => pem,
            Err(CaError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
                let cert = params.self_signed(&key).map_err(gen_err("kt local CA"))?;
                let pem = cert.pem();
                fs::write(&cert_path, &pem).map_err(io_err(&cert_path))?;
                pem
            }
            Err(e) => return Err(e),
        };
        let cert_der = pem_to_der(&cert_pem).ok_or_else(|| CaError::Generate {
            name: cert_path.display().to_string(),
            message: "no certificate in file".into(),
        })?;
        Ok(Ca {
            dir: Some(dir.to_path_buf()),
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
            provider: crypto_provider(),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// A CA that lives in memory only (tests, benchmarks).
    pub fn ephemeral() -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("kt local CA"))?;
        let params = ca_params();
        let cert = params.self_signed(&key).map_err(gen_err("kt local CA"))?;
        Ok(Ca {
            dir: None,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            provider: crypto_provider(),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// Where the CA certificate is stored (None for an ephemeral CA).
    pub fn cert_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(CERT_FILE))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A leaf for `name` (a DNS name or an IP address), from the cache or
    /// freshly minted.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(cache) = self.leaves.lock()
            && let Some(k) = cache.get(&name)
        {
            return Ok(k.clone());
        }
        let minted = Arc::new(self.mint(&name)?);
        if let Ok(mut cache) = self.leaves.lock() {
            if cache.len() >= LEAF_CACHE_MAX {
                cache.clear();
            }
            cache.insert(name, minted.clone());
        }
        Ok(minted)
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err(name))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.try_into().map_err(gen_err(name))?),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(90);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(name))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = self
            .provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| CaError::Generate {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
    }

    /// A rustls server config that answers every name with a leaf from this
    /// CA; `fallback_name` is used when the client sends no SNI.
    pub fn server_config(
        self: &Arc<Self>,
        fallback_name: Option<String>,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, CaError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Generate {
                name: "server config".into(),
                message: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver {
                ca: self.clone(),
                fallback_name,
            }));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }
}

/// Parses the first certificate of a PEM text.
pub fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(|r| r.ok())
}

/// Picks the leaf by SNI (or the fallback name), minting it when needed.
#[derive(Debug)]
pub struct LeafResolver {
    ca: Arc<Ca>,
    fallback_name: Option<String>,
}

impl LeafResolver {
    /// A resolver over `ca`.
    pub fn new(ca: Arc<Ca>, fallback_name: Option<String>) -> LeafResolver {
        LeafResolver { ca, fallback_name }
    }
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = client_hello
            .server_name()
            .map(str::to_string)
            .or_else(|| self.fallback_name.clone())?;
        match self.ca.leaf(&name) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "cannot mint leaf certificate");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_private_key_0600_and_reloaded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Ca::dir_in(tmp.path());
        let a = Ca::load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Ca::load_or_create(&dir).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert_eq!(a.cert_path(), Some(dir.join(CERT_FILE)));
        assert!(a.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn world_readable_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Ca::dir_in(tmp.path());
        Ca::load_or_create(&dir).unwrap();
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Ca::load_or_create(&dir),
            Err(CaError::KeyMode { .. })
        ));
    }

    #[test]
    fn ca_files_another_user_could_replace_are_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("data");
        let dir = Ca::dir_in(&parent);
        Ca::load_or_create(&dir).unwrap();

        fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Ca::load_or_create(&dir).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("`chmod go-w {}`", parent.display())),
            "{text}"
        );
        assert!(
            matches!(err, CaError::Untrusted(UnsafePath::WritableDir { .. })),
            "{err:?}"
        );
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();

        // The certificate is what `kt ca install` trusts: writable by
        // others, it could be swapped for someone else's CA.
        let cert = dir.join(CERT_FILE);
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o666)).unwrap();
        let text = Ca::load_or_create(&dir).unwrap_err().to_string();
        assert!(
            text.contains(&format!("`chmod go-w {}`", cert.display())),
            "{text}"
        );
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o644)).unwrap();
        Ca::load_or_create(&dir).unwrap();

        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: skipping the part that chowns the key to another uid");
            return;
        }
        let key = dir.join(KEY_FILE);
        std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
        let text = Ca::load_or_create(&dir).unwrap_err().to_string();
        assert!(
            text.contains(&format!("`chown 0 {}`", key.display())),
            "{text}"
        );
    }

    #[test]
    fn leaves_are_cached_per_name() {
        let ca = Ca::ephemeral().unwrap();
        let a = ca.leaf("api.openai.com").unwrap();
        let b = ca.leaf("API.openai.com.").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = ca.leaf("127.0.0.1").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
    }

    /// A leaf minted by a reloaded CA verifies against the stored CA
    /// certificate: a real rustls client completes a handshake in memory.
    #[test]
    fn reloaded_ca_leaf_verifies_with_rustls_client() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Ca::dir_in(tmp.path());
        let first = Ca::load_or_create(&dir).unwrap();
        let ca = Arc::new(Ca::load_or_create(&dir).unwrap());
        let server_cfg = Arc::new(ca.server_config(None, &[b"http/1.1"]).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(first.cert_der().clone()).unwrap();
        let client_cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let name = rustls_pki_types::ServerName::try_from("api.anthropic.com").unwrap();
        let mut client = rustls::ClientConnection::new(client_cfg, name).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
            }
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
            }
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking());
        assert_eq!(server.server_name(), Some("api.anthropic.com"));
    }
}
