//! Fingerprints: a keyed hash (HMAC-SHA256 with a per-host key) that names a
//! secret value without revealing it. Stable for a value on one host, so the
//! gateway can tell which stored secret a client presented; useless for
//! guessing the value elsewhere, because the key never leaves the host.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{SecretsError, fsutil};

/// Bytes of the HMAC kept in a fingerprint (12 hex characters).
const FP_BYTES: usize = 6;

/// A short keyed hash of a secret value, shown as `fp:` and 12 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; FP_BYTES]);

impl Fingerprint {
    /// The hex digits without the `fp:` prefix.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fp:{}", self.hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Computes fingerprints with this host's key.
#[derive(Clone)]
pub struct Fingerprinter {
    key: [u8; 32],
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter([key redacted])")
    }
}

impl Fingerprinter {
    /// Loads `<data_dir>/fingerprint.key`, creating it (mode 0600, and the
    /// data dir with 0700) on first use.
    pub fn open(data_dir: &Path) -> Result<Fingerprinter, SecretsError> {
        let path = Self::key_path(data_dir);
        fsutil::ensure_dir(data_dir)?;
        let key = fsutil::load_key(&path, "fingerprint key file", true)?.ok_or_else(|| {
            SecretsError::io(
                "cannot create",
                &path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        Ok(Fingerprinter { key })
    }

    /// Loads the key if this host has one, creating nothing: for read-only
    /// commands, which show no fingerprints before the first secret is added.
    pub fn open_existing(data_dir: &Path) -> Result<Option<Fingerprinter>, SecretsError> {
        let key = fsutil::load_key(&Self::key_path(data_dir), "fingerprint key file", false)?;
        Ok(key.map(|key| Fingerprinter { key }))
    }

    /// Where [`Fingerprinter::open`] keeps the key.
    pub fn key_path(data_dir: &Path) -> PathBuf {
        crate::datadir::fingerprint_key(data_dir)
    }

    /// A fingerprinter with a given key (tests, or a key held elsewhere).
    pub fn from_key(key: [u8; 32]) -> Fingerprinter {
        Fingerprinter { key }
    }

    /// The fingerprint of `value` on this host.
    pub fn fingerprint(&self, value: &str) -> Fingerprint {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = [0u8; FP_BYTES];
        out.copy_from_slice(&digest[..FP_BYTES]);
        Fingerprint(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_per_host_different_per_value_and_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let a = Fingerprinter::open(dir.path()).unwrap();
        let b = Fingerprinter::open(dir.path()).unwrap();
        let v = "sk-proj-abcdef0123456789";
        assert_eq!(a.fingerprint(v), b.fingerprint(v), "same host, same value");
        assert_ne!(a.fingerprint(v), a.fingerprint("sk-proj-abcdef012345678A"));

        let other = tempfile::tempdir().unwrap();
        let c = Fingerprinter::open(other.path()).unwrap();
        assert_ne!(a.fingerprint(v), c.fingerprint(v), "keys differ per host");
    }

    #[test]
    fn shape_is_fp_and_twelve_hex_digits_never_the_value() {
        let fp = Fingerprinter::from_key([7; 32]).fingerprint("abcdef");
        let s = fp.to_string();
        assert_eq!(s.len(), 15);
        assert!(s.starts_with("fp:"));
        assert!(s[3..].chars().all(|c| c.is_ascii_hexdigit()));
        // Hex of the value itself ("abcdef" is also valid hex) must not show.
        assert!(!s.contains("abcdef"));
        assert!(!format!("{:?}", Fingerprinter::from_key([7; 32])).contains("07"));
    }

    #[test]
    fn open_existing_creates_nothing_and_then_reads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("fresh");
        assert!(Fingerprinter::open_existing(&data).unwrap().is_none());
        assert!(
            !data.exists(),
            "a read-only open must not create the data dir"
        );
        let created = Fingerprinter::open(&data).unwrap();
        let read = Fingerprinter::open_existing(&data).unwrap().unwrap();
        assert_eq!(created.fingerprint("sk-x"), read.fingerprint("sk-x"));
    }

    #[test]
    fn key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("not-yet");
        Fingerprinter::open(&data).unwrap();
        let mode = std::fs::metadata(Fingerprinter::key_path(&data))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
    }
}
