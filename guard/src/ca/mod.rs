//! The local certificate authority: created on first use under the data dir
//! (ECDSA P-256, private key readable by the owner only), and leaf
//! certificates per server name, minted on demand and cached, served to
//! rustls through [`LeafResolver`].
//!
//! A CA created by this version is name-constrained (X.509 NameConstraints,
//! critical): it may only issue for the hosts kt terminates ([`Permitted`]),
//! so its key, if it leaks, cannot mint certificates that clients trusting
//! it accept for any other name. The permitted names are read back from the
//! stored certificate; a name outside them needs a new CA
//! ([`Ca::regenerate`]). A CA stored by an older version has no constraints
//! and keeps working ([`Ca::permitted`] is `None`).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::datadir::UnsafePath;

/// File name of the CA certificate inside the CA directory.
pub const CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory.
pub const KEY_FILE: &str = "ca.key";
/// Provider API hosts every new CA permits, whatever else it is given.
pub const DEFAULT_PERMITTED: &[&str] = &["api.openai.com", "api.anthropic.com"];
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
    /// A leaf was asked for a name the CA's name constraints do not permit.
    #[error(
        "the local CA may not issue a certificate for {name}: it is name-constrained to the \
         hosts kt terminated when it was created; regenerate it with the new names \
         (`kt ca regenerate --config FILE`) and trust the new certificate again \
         (`kt ca install`)"
    )]
    NameNotPermitted {
        /// The name asked for.
        name: String,
    },
    /// A host given for the CA's name constraints is neither a DNS name nor
    /// an IP address.
    #[error("ca name constraints: {host:?} is neither a DNS host name nor an IP address")]
    BadHost {
        /// The host as given.
        host: String,
    },
    /// The stored CA certificate's name constraints could not be read.
    #[error("ca certificate {path}: cannot read its name constraints: {message}")]
    BadCert {
        /// The certificate file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
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
    permitted: Option<Permitted>,
}

/// The names a CA may issue for: its X.509 NameConstraints permitted
/// subtrees. A DNS entry permits the host and its subdomains (as X.509 name
/// constraints match); an IP entry permits one network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permitted {
    dns: Vec<String>,
    ips: Vec<(IpAddr, u8)>,
}

impl Permitted {
    /// [`DEFAULT_PERMITTED`], then `hosts` (DNS names or IP literals, e.g.
    /// the provider catalog's API hosts, targets' `base_url` hosts and
    /// `capture.hosts`), then loopback (127.0.0.0/8, ::1) so local tests
    /// and local providers work.
    pub fn for_hosts(hosts: &[String]) -> Result<Permitted, CaError> {
        let mut p = Permitted::default();
        for host in DEFAULT_PERMITTED
            .iter()
            .copied()
            .chain(hosts.iter().map(String::as_str))
        {
            p.add(host)?;
        }
        p.add_ip(IpAddr::from([127, 0, 0, 0]), 8);
        p.add_ip(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), 128);
        Ok(p)
    }

    fn add(&mut self, host: &str) -> Result<(), CaError> {
        let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
        let h = h.strip_prefix("*.").unwrap_or(&h);
        let h = h
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(h);
        if let Ok(ip) = h.parse::<IpAddr>() {
            self.add_ip(ip, if ip.is_ipv4() { 32 } else { 128 });
            return Ok(());
        }
        let dns_ok = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !dns_ok {
            return Err(CaError::BadHost {
                host: host.to_string(),
            });
        }
        if !self.dns.iter().any(|d| d == h) {
            self.dns.push(h.to_string());
        }
        Ok(())
    }

    fn add_ip(&mut self, ip: IpAddr, len: u8) {
        if !self.ips.contains(&(ip, len)) {
            self.ips.push((ip, len));
        }
    }

    /// Whether a leaf for `name` (DNS name or IP literal) would be accepted
    /// by clients that enforce the constraints.
    pub fn allows(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.ips.iter().any(|&(net, len)| in_network(ip, net, len));
        }
        self.dns.iter().any(|d| {
            name == *d
                || name
                    .strip_suffix(d.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }

    /// The permitted DNS subtrees.
    pub fn dns_names(&self) -> &[String] {
        &self.dns
    }

    /// The permitted IP networks (address, prefix length).
    pub fn networks(&self) -> &[(IpAddr, u8)] {
        &self.ips
    }

    fn to_constraints(&self) -> NameConstraints {
        let dns = self.dns.iter().map(|d| GeneralSubtree::DnsName(d.clone()));
        let ips = self.ips.iter().map(|&(ip, len)| {
            GeneralSubtree::IpAddress(match ip {
                IpAddr::V4(a) => CidrSubnet::V4(a.octets(), mask::<4>(len)),
                IpAddr::V6(a) => CidrSubnet::V6(a.octets(), mask::<16>(len)),
            })
        });
        NameConstraints {
            permitted_subtrees: dns.chain(ips).collect(),
            excluded_subtrees: Vec::new(),
        }
    }

    /// The permitted subtrees of a certificate; `None` when it has no name
    /// constraints (a CA stored by an older kt).
    fn from_cert(der: &[u8], path: &Path) -> Result<Option<Permitted>, CaError> {
        let bad = |message: String| CaError::BadCert {
            path: path.to_path_buf(),
            message,
        };
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
        let Some(ext) = cert.name_constraints().map_err(|e| bad(e.to_string()))? else {
            return Ok(None);
        };
        let mut p = Permitted::default();
        for subtree in ext.value.permitted_subtrees.iter().flatten() {
            match subtree.base {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    p.add(d).map_err(|e| bad(e.to_string()))?;
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let (ip, m): (IpAddr, &[u8]) = match b.len() {
                        8 => (
                            IpAddr::from(<[u8; 4]>::try_from(&b[..4]).unwrap_or_default()),
                            &b[4..],
                        ),
                        32 => (
                            IpAddr::from(<[u8; 16]>::try_from(&b[..16]).unwrap_or_default()),
                            &b[16..],
                        ),
                        n => return Err(bad(format!("ip constraint of {n} bytes"))),
                    };
                    let len = m.iter().map(|x| x.count_ones()).sum::<u32>();
                    p.add_ip(ip, u8::try_from(len).unwrap_or(0));
                }
                // Kinds kt never writes: still constrained, nothing to permit.
                _ => {}
            }
        }
        Ok(Some(p))
    }
}

/// A netmask of `len` leading one bits over `N` bytes.
fn mask<const N: usize>(len: u8) -> [u8; N] {
    let mut m = [0u8; N];
    for (i, byte) in m.iter_mut().enumerate() {
        let bits = usize::from(len).saturating_sub(i * 8).min(8);
        *byte = (0xff00u16 >> bits) as u8;
    }
    m
}

fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = u32::from_be_bytes(mask::<4>(len));
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = u128::from_be_bytes(mask::<16>(len));
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
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
    crate::datadir::check_file(path, &meta)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_err(path))?;
    Ok(text)
}

/// The CA's parameters; rebuilt identically on load so leaves signed with the
/// stored key name the same issuer as the stored certificate.
fn ca_params(permitted: Option<&Permitted>) -> CertificateParams {
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
    // rcgen marks the extension critical: a client that cannot enforce it
    // must reject the CA rather than ignore the constraints.
    params.name_constraints = permitted.map(Permitted::to_constraints);
    params
}

impl Ca {
    /// The CA directory under a data dir.
    pub fn dir_in(data_dir: &Path) -> PathBuf {
        crate::datadir::ca_dir(data_dir)
    }

    /// Loads the CA from `dir` (see [`Ca::dir_in`]), creating it on first use
    /// constrained to [`DEFAULT_PERMITTED`] and loopback. Prefer
    /// [`Ca::load_or_create_for`] with the hosts kt terminates.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        Ca::load_or_create_for(dir, &[])
    }

    /// Loads the CA from `dir`, creating it on first use name-constrained to
    /// [`Permitted::for_hosts`]`(hosts)`. An existing CA keeps the names it
    /// was created with (clients already trust that certificate); see
    /// [`Ca::not_permitted`] and [`Ca::regenerate`].
    pub fn load_or_create_for(dir: &Path, hosts: &[String]) -> Result<Ca, CaError> {
        let wanted = Permitted::for_hosts(hosts)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        crate::datadir::create_private_dir(dir).map_err(io_err(dir))?;
        crate::datadir::check_dirs(dir, dir)?;
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
                let mut f =
                    crate::datadir::create_private_file(&key_path).map_err(io_err(&key_path))?;
                f.write_all(key.serialize_pem().as_bytes())
                    .map_err(io_err(&key_path))?;
                let _ = fs::remove_file(&cert_path);
                key
            }
            Err(e) => return Err(e),
        };
        let cert_pem = match read_checked(&cert_path, false) {
            Ok(pem) => pem,
            Err(CaError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
                let cert = ca_params(Some(&wanted))
                    .self_signed(&key)
                    .map_err(gen_err("kt local CA"))?;
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
        let permitted = Permitted::from_cert(&cert_der, &cert_path)?;
        Ok(Ca {
            dir: Some(dir.to_path_buf()),
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params(permitted.as_ref()), key),
            provider: crypto_provider(),
            leaves: Mutex::new(HashMap::new()),
            permitted,
        })
    }

    /// Replaces the CA in `dir` with a new one constrained to
    /// [`Permitted::for_hosts`]`(hosts)`. The old key and certificate are
    /// kept beside it as `ca.key.old` and `ca.pem.old`. Clients must trust the
    /// new certificate (`kt ca install`) before they accept its leaves.
    pub fn regenerate(dir: &Path, hosts: &[String]) -> Result<Ca, CaError> {
        Permitted::for_hosts(hosts)?;
        if dir.exists() {
            crate::datadir::check_dirs(dir, dir)?;
        }
        for file in [KEY_FILE, CERT_FILE] {
            let path = dir.join(file);
            match fs::rename(&path, dir.join(format!("{file}.old"))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ca::load_or_create_for(dir, hosts)
    }

    /// A CA that lives in memory only and issues for any name (tests,
    /// benchmarks).
    pub fn ephemeral() -> Result<Ca, CaError> {
        Ca::ephemeral_with(None)
    }

    /// A CA in memory only, name-constrained like one created on disk.
    pub fn ephemeral_for(hosts: &[String]) -> Result<Ca, CaError> {
        Ca::ephemeral_with(Some(Permitted::for_hosts(hosts)?))
    }

    fn ephemeral_with(permitted: Option<Permitted>) -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("kt local CA"))?;
        let params = ca_params(permitted.as_ref());
        let cert = params.self_signed(&key).map_err(gen_err("kt local CA"))?;
        Ok(Ca {
            dir: None,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            provider: crypto_provider(),
            leaves: Mutex::new(HashMap::new()),
            permitted,
        })
    }

    /// The names this CA may issue for; `None` for an unconstrained CA
    /// (created by an older kt, or [`Ca::ephemeral`]): `kt ca path` and
    /// `gateway check --verbose` can say so and suggest [`Ca::regenerate`].
    pub fn permitted(&self) -> Option<&Permitted> {
        self.permitted.as_ref()
    }

    /// Those of `hosts` this CA may not issue for (empty when unconstrained):
    /// a preflight can name them before a client fails its handshake.
    pub fn not_permitted(&self, hosts: &[String]) -> Vec<String> {
        match &self.permitted {
            None => Vec::new(),
            Some(p) => hosts.iter().filter(|h| !p.allows(h)).cloned().collect(),
        }
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
        if let Some(p) = &self.permitted
            && !p.allows(&name)
        {
            return Err(CaError::NameNotPermitted { name });
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
        .and_then(Result::ok)
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
    use std::os::unix::fs::OpenOptionsExt;

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

    /// What a client trusting only `ca` says of `leaf` presented for `name`:
    /// rustls's webpki verifier, as every rustls client runs it.
    fn webpki_verify(ca: &Ca, leaf: &CertifiedKey, name: &str) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crypto_provider(),
        )
        .build()
        .unwrap();
        let server_name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &[],
                &server_name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn constrained_ca_leaves_for_permitted_names_verify_with_webpki() {
        let ca = Ca::ephemeral_for(&hosts(&["llm.corp.example", "10.1.2.3"])).unwrap();
        for name in [
            "api.openai.com",
            "api.anthropic.com",
            "llm.corp.example",
            "eu.llm.corp.example",
            "10.1.2.3",
            "127.0.0.1",
            "127.77.0.10",
            "::1",
        ] {
            let leaf = ca.leaf(name).unwrap();
            webpki_verify(&ca, &leaf, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// The point of the constraints: with the CA key in hand (kt's own check
    /// bypassed), a certificate for another name is still refused by every
    /// client that trusts the CA.
    #[test]
    fn a_leaf_minted_with_the_ca_key_for_another_name_is_rejected_by_webpki() {
        let ca = Ca::ephemeral_for(&[]).unwrap();
        let forged = ca.mint("www.example.com").unwrap();
        let err = webpki_verify(&ca, &forged, "www.example.com").unwrap_err();
        assert!(
            format!("{err:?}").contains("NameConstraintViolation"),
            "{err:?}"
        );
        let forged_ip = ca.mint("192.0.2.1").unwrap();
        let err = webpki_verify(&ca, &forged_ip, "192.0.2.1").unwrap_err();
        assert!(
            format!("{err:?}").contains("NameConstraintViolation"),
            "{err:?}"
        );

        // The same forgery under an unconstrained CA verifies: the
        // constraints, not something else, make the difference.
        let open = Ca::ephemeral().unwrap();
        let leaf = open.mint("www.example.com").unwrap();
        webpki_verify(&open, &leaf, "www.example.com").unwrap();

        // And the extension is critical, so clients that cannot enforce it
        // refuse the CA instead of ignoring it.
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(cert.name_constraints().unwrap().unwrap().critical);
    }

    #[test]
    fn kt_refuses_to_mint_outside_the_constraints_and_says_to_regenerate() {
        let ca = Ca::ephemeral_for(&hosts(&["llm.corp.example"])).unwrap();
        for name in [
            "www.example.com",
            "openai.com",
            "evilapi.openai.com.example",
            "192.0.2.1",
        ] {
            let err = ca.leaf(name).unwrap_err();
            assert!(
                matches!(&err, CaError::NameNotPermitted { name: n } if n == name),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains("kt ca regenerate"), "{err}");
        }
        assert_eq!(
            ca.not_permitted(&hosts(&["api.openai.com", "new.example.org"])),
            hosts(&["new.example.org"])
        );
        assert!(matches!(
            Ca::ephemeral_for(&hosts(&["bad host/with path"])),
            Err(CaError::BadHost { .. })
        ));
    }

    #[test]
    fn constraints_are_read_back_from_disk_and_regenerate_replaces_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Ca::dir_in(tmp.path());
        let first = Ca::load_or_create_for(&dir, &hosts(&["llm.corp.example"])).unwrap();
        // Reloaded without hosts: the stored certificate says what is permitted.
        let again = Ca::load_or_create(&dir).unwrap();
        assert_eq!(again.cert_pem(), first.cert_pem());
        assert_eq!(again.permitted(), first.permitted());
        assert!(again.leaf("llm.corp.example").is_ok());
        assert!(again.not_permitted(&hosts(&["new.example.org"])).len() == 1);

        let new = Ca::regenerate(&dir, &hosts(&["new.example.org"])).unwrap();
        assert_ne!(new.cert_pem(), first.cert_pem());
        let leaf = new.leaf("new.example.org").unwrap();
        webpki_verify(&new, &leaf, "new.example.org").unwrap();
        assert!(new.leaf("llm.corp.example").is_err());
        assert_eq!(
            fs::read_to_string(dir.join("ca.pem.old")).unwrap(),
            first.cert_pem()
        );
        let old_key_mode = fs::metadata(dir.join("ca.key.old"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(old_key_mode & 0o777, 0o600);
    }

    /// A CA stored by an older kt (no constraints) keeps working, and says
    /// it is unconstrained.
    #[test]
    fn an_unconstrained_ca_on_disk_still_loads_and_reports_none() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Ca::dir_in(tmp.path());
        fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = ca_params(None).self_signed(&key).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(KEY_FILE))
            .unwrap()
            .write_all(key.serialize_pem().as_bytes())
            .unwrap();
        fs::write(dir.join(CERT_FILE), cert.pem()).unwrap();
        let ca = Ca::load_or_create_for(&dir, &hosts(&["llm.corp.example"])).unwrap();
        assert_eq!(ca.permitted(), None);
        assert!(ca.not_permitted(&hosts(&["www.example.com"])).is_empty());
        let leaf = ca.leaf("www.example.com").unwrap();
        webpki_verify(&ca, &leaf, "www.example.com").unwrap();
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
