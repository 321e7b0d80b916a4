//! The operating system keychain on Linux: the kernel key retention service,
//! through the `linux-keyutils` crate (plain keyctl/add_key system calls, no
//! daemon, no D-Bus).
//!
//! Each secret is a `user` key described `kt:NAME` in the calling user's
//! user keyring (`@u`). Behaviour worth knowing:
//!
//! - **Reboots:** kernel keys live in memory only. Everything added with
//!   `--keychain` is gone after a reboot and must be added again (or kept in
//!   the file store with `--store`). `kt secrets list` still shows the name
//!   from the index, marked as missing from the keyring.
//! - **Lifetime otherwise:** since Linux 5.3 the user keyring belongs to the
//!   user namespace, so it persists across logins and sessions of that uid
//!   until reboot (or until the container's user namespace ends). Containers
//!   without their own user namespace share the host's `@u` for that uid.
//! - **Who can read it:** processes of the same uid. Keys are given
//!   possessor-all and user view/read/write/search/setattr permissions, so
//!   a service that does not possess `@u` (for example a systemd unit with
//!   a private session keyring) can still find and read them; group and
//!   others get nothing. Root can read any key.
//! - **Listing:** the keyring cannot be enumerated conveniently per
//!   application, so `<data_dir>/secrets/keychain.json` (0600) records the
//!   names and times of keys added here, never values. Lookups go to the
//!   keyring itself; the index only serves `list`.
//! - **Size:** at most 32767 bytes per key and a per-user quota (20000
//!   bytes by default for non-root users, see `/proc/sys/kernel/keys/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use linux_keyutils::{KeyError, KeyPermissionsBuilder, KeyRing, KeyRingIdentifier, Permission};

use super::{
    EntryMeta, PutOutcome, SecretStore, SecretValue, SecretsError, Source, fsutil, validate_name,
    validate_value,
};

/// Prefix of every key description kt creates.
pub const DESCRIPTION_PREFIX: &str = "kt:";
/// Name of the index file inside the secrets directory.
pub const INDEX_FILE: &str = "keychain.json";
const MAX_INDEX_BYTES: u64 = 4 * 1024 * 1024;

/// Secrets in the kernel user keyring, listed through an index in the data
/// dir. See the module docs for reboot behaviour.
#[derive(Clone, Debug)]
pub struct Keychain {
    dir: PathBuf,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Index {
    entries: BTreeMap<String, IndexEntry>,
}

#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct IndexEntry {
    created: u64,
    updated: u64,
}

fn describe(err: KeyError) -> String {
    match err {
        KeyError::AccessDenied | KeyError::PermissionDenied => {
            "permission denied (the key or keyring belongs to someone else, or a \
             seccomp/container policy forbids keyctl)"
                .to_string()
        }
        KeyError::OperationNotSupported => {
            "the kernel keyring is not available here (keyctl not supported)".to_string()
        }
        KeyError::QuotaExceeded => {
            "the user's key quota is exhausted (see /proc/sys/kernel/keys/maxbytes)".to_string()
        }
        KeyError::KeyDoesNotExist => "no such key".to_string(),
        KeyError::KeyExpired => "the key has expired".to_string(),
        KeyError::KeyRevoked => "the key was revoked".to_string(),
        KeyError::Unknown(errno) => {
            format!("{}", std::io::Error::from_raw_os_error(errno))
        }
        other => format!("{other:?}"),
    }
}

/// Keys that exist no longer, as far as a lookup is concerned.
fn is_absent(err: &KeyError) -> bool {
    matches!(
        err,
        KeyError::KeyDoesNotExist | KeyError::KeyExpired | KeyError::KeyRevoked
    )
}

impl Keychain {
    /// The keychain as seen from `data_dir` (which holds its index).
    pub fn new(data_dir: &Path) -> Keychain {
        Keychain {
            dir: crate::datadir::secrets_dir(data_dir),
        }
    }

    /// The index file (names and times only).
    pub fn index_path(&self) -> PathBuf {
        self.dir.join(INDEX_FILE)
    }

    /// The key description used for `name`.
    pub fn description(name: &str) -> String {
        format!("{DESCRIPTION_PREFIX}{name}")
    }

    /// Checks that the user keyring can be reached (for preflight checks and
    /// tests that must fail with a reason rather than skip).
    pub fn probe() -> Result<(), SecretsError> {
        Self::ring("open", "the user keyring").map(|_| ())
    }

    fn ring(op: &'static str, name: &str) -> Result<KeyRing, SecretsError> {
        KeyRing::from_special_id(KeyRingIdentifier::User, true).map_err(|e| {
            SecretsError::Keychain {
                op,
                name: name.to_string(),
                detail: describe(e),
            }
        })
    }

    fn err(op: &'static str, name: &str) -> impl FnOnce(KeyError) -> SecretsError {
        let name = name.to_string();
        move |e| SecretsError::Keychain {
            op,
            name,
            detail: describe(e),
        }
    }

    fn read_index(&self) -> Result<Index, SecretsError> {
        if !fsutil::check_dir(&self.dir)? {
            return Ok(Index::default());
        }
        let path = self.index_path();
        match fsutil::read_private(&path, "keychain index", MAX_INDEX_BYTES)? {
            None => Ok(Index::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| SecretsError::BadIndex {
                path,
                detail: e.to_string(),
            }),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), SecretsError> {
        let path = self.index_path();
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|e| SecretsError::io("cannot encode", &path, std::io::Error::other(e)))?;
        fsutil::write_atomic(&path, &bytes)
    }
}

impl SecretStore for Keychain {
    fn source(&self) -> Source {
        Source::Keychain
    }

    fn get(&self, name: &str) -> Result<Option<SecretValue>, SecretsError> {
        validate_name(name)?;
        let ring = Self::ring("lookup", name)?;
        let key = match ring.search(&Self::description(name)) {
            Ok(key) => key,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(Self::err("lookup", name)(e)),
        };
        let bytes = match key.read_to_vec() {
            Ok(bytes) => bytes,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(Self::err("read", name)(e)),
        };
        String::from_utf8(bytes)
            .map(|v| Some(SecretValue::new(v)))
            .map_err(|_| SecretsError::Keychain {
                op: "read",
                name: name.to_string(),
                detail: "the stored value is not UTF-8 (not written by kt?)".to_string(),
            })
    }

    fn put(&self, name: &str, value: &SecretValue) -> Result<PutOutcome, SecretsError> {
        validate_name(name)?;
        validate_value(value)?;
        fsutil::ensure_dir(&self.dir)?;
        fsutil::check_dir(&self.dir)?;
        let _lock = fsutil::lock(&self.dir)?;
        let mut index = self.read_index()?;
        let existed = self.get(name)?.is_some();

        let ring = Self::ring("add", name)?;
        // add_key updates an existing key of the same description in place.
        let key = ring
            .add_key(&Self::description(name), value.expose().as_bytes())
            .map_err(Self::err("add", name))?;
        let perms = KeyPermissionsBuilder::builder()
            .posessor(Permission::ALL)
            .user(
                Permission::VIEW
                    | Permission::READ
                    | Permission::WRITE
                    | Permission::SEARCH
                    | Permission::SETATTR,
            )
            .build();
        if let Err(e) = key.set_perms(perms) {
            // Still readable by processes that possess @u (the usual case),
            // so keep the key but say why a service might not see it.
            tracing::warn!(
                secret = name,
                "keychain: cannot widen permissions of the new key to the user ({}); \
                 only processes possessing the user keyring can read it",
                describe(e)
            );
        }

        let now = fsutil::to_secs(SystemTime::now());
        let entry = index.entries.entry(name.to_string()).or_insert(IndexEntry {
            created: now,
            updated: now,
        });
        entry.updated = now;
        self.write_index(&index)?;
        Ok(if existed {
            PutOutcome::Replaced
        } else {
            PutOutcome::Created
        })
    }

    fn remove(&self, name: &str) -> Result<bool, SecretsError> {
        validate_name(name)?;
        let lock = if fsutil::check_dir(&self.dir)? {
            Some(fsutil::lock(&self.dir)?)
        } else {
            None
        };
        let ring = Self::ring("remove", name)?;
        let in_keyring = match ring.search(&Self::description(name)) {
            Ok(key) => {
                key.invalidate().map_err(Self::err("remove", name))?;
                true
            }
            Err(e) if is_absent(&e) => false,
            Err(e) => return Err(Self::err("remove", name)(e)),
        };
        let mut in_index = false;
        if lock.is_some() {
            let mut index = self.read_index()?;
            in_index = index.entries.remove(name).is_some();
            if in_index {
                self.write_index(&index)?;
            }
        }
        Ok(in_keyring || in_index)
    }

    fn list(&self) -> Result<Vec<EntryMeta>, SecretsError> {
        Ok(self
            .read_index()?
            .entries
            .into_iter()
            .map(|(name, e)| EntryMeta {
                name,
                created: fsutil::from_secs(e.created),
                updated: fsutil::from_secs(e.updated),
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A name no other test run (or person) uses, removed by the guard.
    pub(crate) struct TestName(pub String, pub Keychain);

    impl TestName {
        pub(crate) fn new(data_dir: &Path, tag: &str) -> TestName {
            let nanos = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!("KT_TEST_{tag}_{}_{nanos}", std::process::id());
            TestName(name, Keychain::new(data_dir))
        }
    }

    impl Drop for TestName {
        fn drop(&mut self) {
            let _ = self.1.remove(&self.0);
        }
    }

    /// Fails (never skips) with the reason when the keyring is unusable.
    pub(crate) fn require_keyring() {
        if let Err(e) = Keychain::probe() {
            panic!(
                "the kernel user keyring is required for keychain tests and is not \
                 usable here: {e}"
            );
        }
    }

    #[test]
    fn round_trip_in_the_user_keyring() {
        require_keyring();
        let dir = tempfile::tempdir().unwrap();
        let t = TestName::new(dir.path(), "RT");
        let kc = &t.1;
        assert_eq!(kc.get(&t.0).unwrap(), None);
        let v1 = SecretValue::new("sk-keychain-one");
        assert_eq!(kc.put(&t.0, &v1).unwrap(), PutOutcome::Created);
        assert_eq!(kc.get(&t.0).unwrap(), Some(v1));
        let v2 = SecretValue::new("sk-keychain-two");
        assert_eq!(kc.put(&t.0, &v2).unwrap(), PutOutcome::Replaced);
        assert_eq!(kc.get(&t.0).unwrap(), Some(v2));

        // Visible to a fresh handle (another process would use the same @u).
        let again = Keychain::new(dir.path());
        let listed: Vec<_> = again.list().unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(listed, vec![t.0.clone()]);

        let index = std::fs::read_to_string(kc.index_path()).unwrap();
        assert!(
            !index.contains("sk-keychain"),
            "index holds a value: {index}"
        );

        assert!(kc.remove(&t.0).unwrap());
        assert_eq!(kc.get(&t.0).unwrap(), None);
        assert!(!kc.remove(&t.0).unwrap());
        assert!(kc.list().unwrap().is_empty());
    }

    #[test]
    fn a_key_lost_from_the_keyring_still_lists_and_reads_as_none() {
        require_keyring();
        let dir = tempfile::tempdir().unwrap();
        let t = TestName::new(dir.path(), "LOST");
        t.1.put(&t.0, &SecretValue::new("sk-lost")).unwrap();
        // Simulate a reboot: the key goes, the index stays.
        let ring = KeyRing::from_special_id(KeyRingIdentifier::User, false).unwrap();
        ring.search(&Keychain::description(&t.0))
            .unwrap()
            .invalidate()
            .unwrap();
        assert_eq!(t.1.list().unwrap().len(), 1);
        let entries = t.1.entries().unwrap();
        assert!(entries[0].1.is_none());
        assert!(t.1.remove(&t.0).unwrap(), "rm cleans the index entry");
        assert!(t.1.list().unwrap().is_empty());
    }
}
