//! The embedded secret store: one encrypted file under the data dir.
//!
//! `store.bin` is `magic (8) | key id (8) | nonce (24) | ciphertext+tag`,
//! sealed with XChaCha20-Poly1305 (random 192-bit nonces are safe to pick
//! fresh on every write). The magic and key id are authenticated as
//! associated data. The key id (an HMAC of a constant under the key) lets a
//! wrong key be told apart from a modified file. The key lives in
//! `store.key` (32 random bytes, 0600), created with the first secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{
    EntryMeta, PutOutcome, SecretStore, SecretValue, SecretsError, Source, fsutil, validate_name,
    validate_value,
};

const MAGIC: &[u8; 8] = b"KTSTORE1";
const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN + NONCE_LEN;
/// A store larger than this is not ours (thousands of maximal secrets).
const MAX_STORE_BYTES: u64 = 64 * 1024 * 1024;

/// Name of the encrypted store file.
pub const STORE_FILE: &str = "store.bin";
/// Name of the store's key file.
pub const STORE_KEY_FILE: &str = "store.key";

/// The file-backed, encrypted secret store under `<data_dir>/secrets/`.
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
}

/// Decrypted contents. No Debug on purpose: it holds values.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Plain {
    entries: BTreeMap<String, PlainEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PlainEntry {
    value: String,
    created: u64,
    updated: u64,
}

impl PlainEntry {
    fn meta(&self, name: &str) -> EntryMeta {
        EntryMeta {
            name: name.to_string(),
            created: fsutil::from_secs(self.created),
            updated: fsutil::from_secs(self.updated),
        }
    }
}

impl FileStore {
    /// The store of `data_dir`. Touches nothing until used.
    pub fn new(data_dir: &Path) -> FileStore {
        FileStore {
            dir: crate::datadir::secrets_dir(data_dir),
        }
    }

    /// The store directory (`<data_dir>/secrets`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The encrypted store file.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// The key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(STORE_KEY_FILE)
    }

    fn cipher(key: &[u8; 32]) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&(*key).into())
    }

    fn key_id(key: &[u8; 32]) -> [u8; KEY_ID_LEN] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"kt secret store key id v1");
        let digest = mac.finalize().into_bytes();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        id
    }

    /// Reads and decrypts the store. A missing directory is an error; a
    /// directory without a store file is an empty store.
    fn load(&self) -> Result<Plain, SecretsError> {
        if !fsutil::check_dir(&self.dir)? {
            return Err(SecretsError::StoreMissing {
                path: self.dir.clone(),
            });
        }
        let store_path = self.store_path();
        let Some(bytes) = fsutil::read_private(&store_path, "secret store", MAX_STORE_BYTES)?
        else {
            return Ok(Plain::default());
        };
        let key_path = self.key_path();
        let key =
            fsutil::load_key(&key_path, "secret store key file", false)?.ok_or_else(|| {
                SecretsError::KeyMissing {
                    store: store_path.clone(),
                    key: key_path.clone(),
                }
            })?;
        self.open_sealed(&bytes, &key)
    }

    fn open_sealed(&self, bytes: &[u8], key: &[u8; 32]) -> Result<Plain, SecretsError> {
        let tampered = |detail| SecretsError::Tampered {
            path: self.store_path(),
            detail,
        };
        if bytes.len() < HEADER_LEN + TAG_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(tampered("not a kt secret store: bad header"));
        }
        let (aad, rest) = bytes.split_at(MAGIC.len() + KEY_ID_LEN);
        if aad[MAGIC.len()..] != Self::key_id(key) {
            return Err(SecretsError::WrongKey {
                store: self.store_path(),
                key: self.key_path(),
            });
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| tampered("bad nonce"))?;
        let plain = Self::cipher(key)
            .decrypt(&nonce, Payload { msg: sealed, aad })
            .map_err(|_| tampered("authentication failed"))?;
        let plain: Plain =
            serde_json::from_slice(&plain).map_err(|_| tampered("unreadable contents"))?;
        // Sealed with our key but not written by `put` (another tool, an
        // edited copy): an entry kt would refuse to store is never served.
        for (name, entry) in &plain.entries {
            validate_name(name).map_err(|_| tampered("an entry has an invalid name"))?;
            validate_value(&SecretValue::new(entry.value.as_str()))
                .map_err(|_| tampered("an entry has an empty or invalid value"))?;
        }
        Ok(plain)
    }

    fn seal(plain: &Plain, key: &[u8; 32]) -> Result<Vec<u8>, SecretsError> {
        let json = serde_json::to_vec(plain).map_err(|e| SecretsError::Io {
            op: "cannot encode",
            path: PathBuf::from(STORE_FILE),
            source: std::io::Error::other(e),
        })?;
        let nonce = XNonce::from(fsutil::random::<NONCE_LEN>("a store nonce")?);
        let mut out = Vec::with_capacity(HEADER_LEN + json.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&Self::key_id(key));
        let sealed = Self::cipher(key)
            .encrypt(
                &nonce,
                Payload {
                    msg: &json,
                    aad: &out,
                },
            )
            .map_err(|_| SecretsError::Io {
                op: "cannot encrypt",
                path: PathBuf::from(STORE_FILE),
                source: std::io::Error::other("store too large"),
            })?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Runs `change` on the decrypted store under the writers' lock and
    /// writes the result back atomically when it returns `true`.
    fn modify<T>(
        &self,
        create_dir: bool,
        change: impl FnOnce(&mut Plain) -> (T, bool),
    ) -> Result<T, SecretsError> {
        if create_dir {
            fsutil::ensure_dir(&self.dir)?;
        }
        if !fsutil::check_dir(&self.dir)? {
            return Err(SecretsError::StoreMissing {
                path: self.dir.clone(),
            });
        }
        let _lock = fsutil::lock(&self.dir)?;
        let mut plain = self.load()?;
        let (result, changed) = change(&mut plain);
        if changed {
            // Created here only when no store exists yet: load() refuses a
            // store whose key went missing, so no new key can orphan it.
            let key = fsutil::load_key(&self.key_path(), "secret store key file", true)?
                .ok_or_else(|| SecretsError::KeyMissing {
                    store: self.store_path(),
                    key: self.key_path(),
                })?;
            fsutil::write_atomic(&self.store_path(), &Self::seal(&plain, &key)?)?;
        }
        Ok(result)
    }
}

impl SecretStore for FileStore {
    fn source(&self) -> Source {
        Source::Store
    }

    fn get(&self, name: &str) -> Result<Option<SecretValue>, SecretsError> {
        Ok(self
            .load()?
            .entries
            .remove(name)
            .map(|e| SecretValue::new(e.value)))
    }

    fn put(&self, name: &str, value: &SecretValue) -> Result<PutOutcome, SecretsError> {
        validate_name(name)?;
        validate_value(value)?;
        let now = fsutil::to_secs(SystemTime::now());
        self.modify(true, |plain| {
            let outcome = match plain.entries.get_mut(name) {
                Some(entry) => {
                    entry.value = value.expose().to_string();
                    entry.updated = now;
                    PutOutcome::Replaced
                }
                None => {
                    plain.entries.insert(
                        name.to_string(),
                        PlainEntry {
                            value: value.expose().to_string(),
                            created: now,
                            updated: now,
                        },
                    );
                    PutOutcome::Created
                }
            };
            (outcome, true)
        })
    }

    fn remove(&self, name: &str) -> Result<bool, SecretsError> {
        self.modify(false, |plain| {
            let removed = plain.entries.remove(name).is_some();
            (removed, removed)
        })
    }

    fn list(&self) -> Result<Vec<EntryMeta>, SecretsError> {
        Ok(self
            .load()?
            .entries
            .iter()
            .map(|(name, e)| e.meta(name))
            .collect())
    }

    fn entries(&self) -> Result<Vec<(EntryMeta, Option<SecretValue>)>, SecretsError> {
        Ok(self
            .load()?
            .entries
            .into_iter()
            .map(|(name, e)| (e.meta(&name), Some(SecretValue::new(e.value))))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    const KNOWN: &str = "sk-proj-LEAKCHECK-4f1d2c3b";

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trip_put_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let v1 = SecretValue::new("sk-one");
        assert_eq!(store.put("A_KEY", &v1).unwrap(), PutOutcome::Created);
        assert_eq!(
            store.put("B", &SecretValue::new("sk-b")).unwrap(),
            PutOutcome::Created
        );
        assert_eq!(store.get("A_KEY").unwrap(), Some(v1));
        assert_eq!(store.get("NOPE").unwrap(), None);

        let before = store.meta("A_KEY").unwrap().unwrap();
        let v2 = SecretValue::new("sk-two");
        assert_eq!(store.put("A_KEY", &v2).unwrap(), PutOutcome::Replaced);
        assert_eq!(store.get("A_KEY").unwrap(), Some(v2));
        let after = store.meta("A_KEY").unwrap().unwrap();
        assert_eq!(after.created, before.created, "replace keeps created");
        assert!(after.updated >= before.updated);

        let names: Vec<_> = store.list().unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["A_KEY", "B"]);
        assert!(store.remove("A_KEY").unwrap());
        assert!(
            !store.remove("A_KEY").unwrap(),
            "second remove finds nothing"
        );
        assert_eq!(store.get("A_KEY").unwrap(), None);

        assert_eq!(mode(store.dir()), 0o700);
        assert_eq!(mode(&store.store_path()), 0o600);
        assert_eq!(mode(&store.key_path()), 0o600);
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert!(matches!(
            store.put("A", &SecretValue::new("")),
            Err(SecretsError::EmptyValue)
        ));
        assert!(matches!(
            store.put("9A", &SecretValue::new("x")),
            Err(SecretsError::InvalidName { .. })
        ));
        assert!(!store.dir().exists());
    }

    #[test]
    fn value_is_not_in_the_file_as_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("LEAK", &SecretValue::new(KNOWN)).unwrap();
        let bytes = fs::read(store.store_path()).unwrap();
        let needle = KNOWN.as_bytes();
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        assert!(
            !bytes.windows(4).any(|w| w == b"LEAK"),
            "names are encrypted too"
        );
    }

    #[test]
    fn a_flipped_byte_anywhere_in_the_ciphertext_is_a_tamper_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("A", &SecretValue::new("sk-a")).unwrap();
        let good = fs::read(store.store_path()).unwrap();
        for i in [HEADER_LEN - 1, HEADER_LEN, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            fs::write(store.store_path(), &bad).unwrap();
            let err = store.get("A").unwrap_err();
            assert!(
                matches!(err, SecretsError::Tampered { .. }),
                "byte {i}: {err}"
            );
            assert!(err.to_string().contains("integrity check"), "{err}");
        }
        // A truncated file too.
        fs::write(store.store_path(), &good[..10]).unwrap();
        assert!(matches!(store.get("A"), Err(SecretsError::Tampered { .. })));
    }

    /// Found by the secret_store fuzz target: contents sealed with the right
    /// key were served as they were, empty names and values included.
    #[test]
    fn a_sealed_store_with_an_entry_put_would_refuse_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("A", &SecretValue::new("sk-a")).unwrap();
        let key = fsutil::load_key(&store.key_path(), "key", false)
            .unwrap()
            .unwrap();
        for (name, value) in [("B", ""), ("", "sk-b"), ("C", "sk-\nc"), ("1D", "sk-d")] {
            let mut plain = Plain::default();
            plain.entries.insert(
                name.to_string(),
                PlainEntry {
                    value: value.to_string(),
                    created: 1,
                    updated: 1,
                },
            );
            fs::write(store.store_path(), FileStore::seal(&plain, &key).unwrap()).unwrap();
            let err = store.list().unwrap_err();
            assert!(
                matches!(err, SecretsError::Tampered { .. }),
                "{name:?}={value:?}: {err}"
            );
            assert!(store.get(name).is_err(), "{name:?}={value:?}");
        }
    }

    #[test]
    fn wrong_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("A", &SecretValue::new("sk-a")).unwrap();
        fs::write(store.key_path(), [9u8; 32]).unwrap();
        let err = store.get("A").unwrap_err();
        assert!(matches!(err, SecretsError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("different key"), "{err}");
        // And a write must not silently replace the store under the new key.
        assert!(store.put("B", &SecretValue::new("sk-b")).is_err());
    }

    #[test]
    fn missing_key_with_existing_store_is_refused_and_no_new_key_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("A", &SecretValue::new("sk-a")).unwrap();
        fs::remove_file(store.key_path()).unwrap();
        let err = store.put("B", &SecretValue::new("sk-b")).unwrap_err();
        assert!(matches!(err, SecretsError::KeyMissing { .. }), "{err}");
        assert!(!store.key_path().exists());
    }

    #[test]
    fn world_or_group_readable_store_or_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("A", &SecretValue::new("sk-a")).unwrap();
        for (path, m) in [(store.store_path(), 0o644), (store.key_path(), 0o640)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(m)).unwrap();
            let err = store.get("A").unwrap_err().to_string();
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
            assert!(store.list().is_err());
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(store.get("A").unwrap().is_some());
    }

    #[test]
    fn missing_store_directory_is_a_clear_error_and_add_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = FileStore::new(&data);
        let err = store.get("A").unwrap_err();
        assert!(matches!(err, SecretsError::StoreMissing { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&store.dir().display().to_string()), "{msg}");
        assert!(msg.contains("kt secrets add"), "{msg}");
        assert!(store.list().is_err());
        assert!(matches!(
            store.remove("A"),
            Err(SecretsError::StoreMissing { .. })
        ));
        store.put("A", &SecretValue::new("sk-a")).unwrap();
        assert_eq!(mode(store.dir()), 0o700);
        assert!(store.list().unwrap().len() == 1);
    }

    #[test]
    fn debug_of_store_and_errors_hold_no_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("A", &SecretValue::new(KNOWN)).unwrap();
        let dump = format!(
            "{store:?} {:?} {:?}",
            store.entries().unwrap(),
            store.get("A")
        );
        assert!(!dump.contains(KNOWN), "{dump}");
    }
}
