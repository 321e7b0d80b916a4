//! An in-memory [`SecretStore`] for tests (gateway, preflight) and for
//! embedding: nothing touches the disk or the kernel.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{
    EntryMeta, PutOutcome, SecretStore, SecretValue, SecretsError, Source, validate_name,
    validate_value,
};

/// Secrets held in memory, reported as `source`.
#[derive(Debug)]
pub struct MemoryStore {
    source: Source,
    entries: Mutex<BTreeMap<String, (EntryMeta, SecretValue)>>,
}

impl MemoryStore {
    /// An empty store reporting itself as `source`.
    pub fn new(source: Source) -> MemoryStore {
        MemoryStore {
            source,
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    /// A store with the given `(name, value)` pairs; names and values are
    /// checked as in [`SecretStore::put`].
    pub fn with_entries<'a>(
        source: Source,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<MemoryStore, SecretsError> {
        let store = MemoryStore::new(source);
        for (name, value) in entries {
            store.put(name, &SecretValue::new(value))?;
        }
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (EntryMeta, SecretValue)>> {
        // A panic while holding the lock cannot leave a map half-written.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl SecretStore for MemoryStore {
    fn source(&self) -> Source {
        self.source
    }

    fn get(&self, name: &str) -> Result<Option<SecretValue>, SecretsError> {
        Ok(self.lock().get(name).map(|(_, v)| v.clone()))
    }

    fn put(&self, name: &str, value: &SecretValue) -> Result<PutOutcome, SecretsError> {
        validate_name(name)?;
        validate_value(value)?;
        let now = SystemTime::now();
        let mut map = self.lock();
        match map.get_mut(name) {
            Some((meta, v)) => {
                meta.updated = now;
                *v = value.clone();
                Ok(PutOutcome::Replaced)
            }
            None => {
                let meta = EntryMeta {
                    name: name.to_string(),
                    created: now,
                    updated: now,
                };
                map.insert(name.to_string(), (meta, value.clone()));
                Ok(PutOutcome::Created)
            }
        }
    }

    fn remove(&self, name: &str) -> Result<bool, SecretsError> {
        Ok(self.lock().remove(name).is_some())
    }

    fn list(&self) -> Result<Vec<EntryMeta>, SecretsError> {
        Ok(self.lock().values().map(|(m, _)| m.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretKeyRef;
    use crate::secrets::{Resolve, Resolver};
    use std::sync::Arc;

    #[test]
    fn memory_stores_plug_into_the_resolver_in_order() {
        let store = MemoryStore::with_entries(Source::Store, [("A", "sk-a")]).unwrap();
        let kc =
            MemoryStore::with_entries(Source::Keychain, [("A", "sk-k"), ("B", "sk-b")]).unwrap();
        let r = Resolver::with_stores(vec![Arc::new(store), Arc::new(kc)]);
        let a = r
            .resolve(&SecretKeyRef::Store("A".into()))
            .unwrap()
            .unwrap();
        assert_eq!((a.value.expose(), a.source), ("sk-a", Source::Store));
        let b = r
            .resolve(&SecretKeyRef::Store("B".into()))
            .unwrap()
            .unwrap();
        assert_eq!((b.value.expose(), b.source), ("sk-b", Source::Keychain));
        assert!(
            r.resolve(&SecretKeyRef::Store("C".into()))
                .unwrap()
                .is_none()
        );
        assert!(MemoryStore::with_entries(Source::Store, [("A", "")]).is_err());
    }
}
