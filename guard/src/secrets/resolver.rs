//! The resolver the gateway and `kt secrets status` use: `env:` references
//! read the guard's own environment; `store:` references try each store in
//! order (the file store, then the keychain).

use std::path::Path;
use std::sync::Arc;

use super::{
    FileStore, Fingerprinter, Keychain, KnownSecret, Resolve, Resolved, SecretStore, SecretValue,
    SecretsError, Source, known_secrets,
};
use crate::config::SecretKeyRef;

/// Resolves `secret_key_ref`s against the environment and a list of stores.
#[derive(Clone)]
pub struct Resolver {
    stores: Vec<Arc<dyn SecretStore>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.stores.iter().map(|s| s.source().name()).collect();
        f.debug_struct("Resolver").field("stores", &names).finish()
    }
}

impl Resolver {
    /// The standard resolver of a data dir: its [`FileStore`], then the
    /// [`Keychain`]. Touches nothing until used.
    pub fn from_data_dir(data_dir: &Path) -> Resolver {
        Resolver::with_stores(vec![
            Arc::new(FileStore::new(data_dir)),
            Arc::new(Keychain::new(data_dir)),
        ])
    }

    /// A resolver over any stores, tried in the order given.
    pub fn with_stores(stores: Vec<Arc<dyn SecretStore>>) -> Resolver {
        Resolver { stores }
    }

    /// The stores, in lookup order.
    pub fn stores(&self) -> &[Arc<dyn SecretStore>] {
        &self.stores
    }

    /// Every stored secret with its fingerprint, for matching a key a client
    /// presented against the stored ones.
    pub fn known_secrets(
        &self,
        fingerprinter: &Fingerprinter,
    ) -> Result<Vec<KnownSecret>, SecretsError> {
        let stores: Vec<&dyn SecretStore> = self.stores.iter().map(AsRef::as_ref).collect();
        known_secrets(&stores, fingerprinter)
    }

    fn from_env(name: &str) -> Result<Option<Resolved>, String> {
        match std::env::var_os(name) {
            None => Ok(None),
            Some(v) => match v.into_string() {
                Ok(v) if v.is_empty() => Ok(None),
                Ok(v) => Ok(Some(Resolved {
                    value: SecretValue::new(v),
                    source: Source::Env,
                })),
                Err(_) => Err(format!("environment variable {name} is not valid UTF-8")),
            },
        }
    }
}

impl Resolve for Resolver {
    fn resolve(&self, reference: &SecretKeyRef) -> Result<Option<Resolved>, String> {
        let name = match reference {
            SecretKeyRef::Env(name) => return Self::from_env(name),
            SecretKeyRef::Store(name) => name,
        };
        for store in &self.stores {
            match store.get(name) {
                Ok(Some(value)) => {
                    return Ok(Some(Resolved {
                        value,
                        source: store.source(),
                    }));
                }
                // A store not created yet simply holds nothing.
                Ok(None) | Err(SecretsError::StoreMissing { .. }) => {}
                // A damaged or unreadable store stops resolution: falling
                // through to another backend could hide tampering.
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::keychain::tests::{TestName, require_keyring};

    #[test]
    fn store_first_then_keychain_then_not_found() {
        require_keyring();
        let dir = tempfile::tempdir().unwrap();
        let r = Resolver::from_data_dir(dir.path());
        let both = TestName::new(dir.path(), "BOTH");
        let only_kc = TestName::new(dir.path(), "KC");
        let store = FileStore::new(dir.path());
        let missing = SecretKeyRef::Store("KT_TEST_NOT_ANYWHERE".into());

        // Before anything exists: not found.
        assert!(r.resolve(&missing).unwrap().is_none());

        both.1
            .put(&both.0, &SecretValue::new("sk-from-keychain"))
            .unwrap();
        store
            .put(&both.0, &SecretValue::new("sk-from-store"))
            .unwrap();
        only_kc
            .1
            .put(&only_kc.0, &SecretValue::new("sk-kc-only"))
            .unwrap();

        let got = r
            .resolve(&SecretKeyRef::Store(both.0.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.value.expose(), got.source),
            ("sk-from-store", Source::Store)
        );
        let got = r
            .resolve(&SecretKeyRef::Store(only_kc.0.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.value.expose(), got.source),
            ("sk-kc-only", Source::Keychain)
        );
        assert!(r.resolve(&missing).unwrap().is_none());

        let fp = Fingerprinter::from_key([1; 32]);
        let known = r.known_secrets(&fp).unwrap();
        let kc_entry = known
            .iter()
            .find(|k| k.meta.name == only_kc.0)
            .expect("keychain entry listed");
        assert_eq!(kc_entry.source, Source::Keychain);
        assert_eq!(kc_entry.fingerprint, Some(fp.fingerprint("sk-kc-only")));
    }

    #[test]
    fn a_damaged_store_is_an_error_not_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("A", &SecretValue::new("sk-a")).unwrap();
        let mut bytes = std::fs::read(store.store_path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        std::fs::write(store.store_path(), bytes).unwrap();
        let r = Resolver::from_data_dir(dir.path());
        let err = r.resolve(&SecretKeyRef::Store("A".into())).unwrap_err();
        assert!(err.contains("integrity check"), "{err}");
    }

    #[test]
    fn env_references_read_the_environment() {
        let r = Resolver::with_stores(Vec::new());
        // PATH is set in every test environment; an unlikely name is not.
        let got = r
            .resolve(&SecretKeyRef::Env("PATH".into()))
            .unwrap()
            .unwrap();
        assert_eq!(got.source, Source::Env);
        assert_eq!(got.value.expose(), std::env::var("PATH").unwrap());
        let unset = SecretKeyRef::Env("KT_TEST_SURELY_UNSET_VARIABLE".into());
        assert!(r.resolve(&unset).unwrap().is_none());
    }
}
