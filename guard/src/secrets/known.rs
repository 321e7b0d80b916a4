//! Which managed secret a presented key is: fingerprints of every stored
//! secret and of every target's resolved `secret_key_ref`, whatever its
//! backend, so a client presenting the value of an `env:` or `file:`
//! reference is recognised as managed too.

use std::collections::HashMap;

use super::{Fingerprinter, Resolve, Resolver, SecretsError};
use crate::config::Config;

/// Fingerprint → name of every managed secret, and what could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KnownKeys {
    /// Fingerprint (as stored in events) → the secret's name: a target's
    /// reference name (`secret_key_ref.env`/`.store`, or the path of a
    /// `.file`), else the name in the store.
    pub by_fingerprint: HashMap<String, String>,
    /// Backends or references that could not be read (never a value); the
    /// keys behind them are not recognised.
    pub problems: Vec<String>,
}

/// Fingerprints every stored secret (store, then keychain) and every
/// target's resolved reference of `config`. When one value has several
/// names, the first target (in config order) referencing it names it, so
/// events use the name `kt secrets status` shows for that target; stored
/// secrets no target references keep their store name.
pub fn known_keys(
    config: &Config,
    resolver: &Resolver,
    fingerprinter: &Fingerprinter,
) -> KnownKeys {
    let mut known = KnownKeys::default();
    for target in &config.providers.targets {
        match resolver.resolve(&target.secret_key_ref) {
            Ok(Some(resolved)) => {
                let fp = fingerprinter
                    .fingerprint(resolved.value.expose())
                    .to_string();
                known
                    .by_fingerprint
                    .entry(fp)
                    .or_insert_with(|| target.secret_key_ref.name().into_owned());
            }
            Ok(None) => {}
            Err(e) => known.problems.push(format!(
                "target {}: secret {}: {e}",
                target.id, target.secret_key_ref
            )),
        }
    }
    match resolver.known_secrets(fingerprinter) {
        Ok(list) => {
            for k in list {
                if let Some(fp) = k.fingerprint {
                    known
                        .by_fingerprint
                        .entry(fp.to_string())
                        .or_insert(k.meta.name);
                }
            }
        }
        Err(SecretsError::StoreMissing { .. }) => {}
        Err(e) => known
            .problems
            .push(format!("cannot list stored secrets: {e}")),
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretKeyRef;
    use crate::events::to_event;
    use crate::record::{Arrival, ClientInfo, RequestRecord};
    use crate::secrets::status::tests::{config, target};
    use crate::secrets::{MemoryStore, Source};

    #[test]
    fn a_key_equal_to_an_env_referenced_value_is_managed_and_named() {
        let store = MemoryStore::with_entries(
            Source::Store,
            [("Q2", "sk-q2-stored"), ("UNUSED", "sk-unused")],
        )
        .unwrap();
        let resolver = Resolver::with_stores(vec![std::sync::Arc::new(store)]);
        let fp = Fingerprinter::from_key([7; 32]);
        // PATH is set in every test environment: an `env:` target's value.
        let path_value = std::env::var("PATH").unwrap();
        let cfg = config(vec![
            target("primary", SecretKeyRef::Store("Q2".into()), true),
            target("envkey", SecretKeyRef::Env("PATH".into()), false),
            target(
                "gone",
                SecretKeyRef::Env("KT_TEST_SURELY_UNSET_VARIABLE".into()),
                false,
            ),
        ]);
        let known = known_keys(&cfg, &resolver, &fp);
        assert!(known.problems.is_empty(), "{:?}", known.problems);
        let name = |v: &str| known.by_fingerprint.get(&fp.fingerprint(v).to_string());
        assert_eq!(name(&path_value).map(String::as_str), Some("PATH"));
        assert_eq!(name("sk-q2-stored").map(String::as_str), Some("Q2"));
        assert_eq!(name("sk-unused").map(String::as_str), Some("UNUSED"));
        assert_eq!(known.by_fingerprint.len(), 3);

        // The event of a request presenting the env-referenced value.
        let mut r = RequestRecord::new(
            "req-env".into(),
            Arrival::Capture,
            None,
            ClientInfo::default(),
            "POST".into(),
        );
        r.client_key_fingerprint = Some(fp.fingerprint(&path_value).to_string());
        let e = to_event(&r, &known.by_fingerprint);
        let key = e.key.unwrap();
        assert!(key.managed);
        assert_eq!(key.matches_secret.as_deref(), Some("PATH"));
    }

    #[test]
    fn a_value_with_two_names_is_named_by_the_first_target_referencing_it() {
        let store =
            MemoryStore::with_entries(Source::Store, [("OLD_NAME", "sk-same-value")]).unwrap();
        let resolver = Resolver::with_stores(vec![std::sync::Arc::new(store)]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "sk-same-value\n").unwrap();
        let fp = Fingerprinter::from_key([7; 32]);
        let cfg = config(vec![
            target("a", SecretKeyRef::File(file.clone()), true),
            target("b", SecretKeyRef::Store("OLD_NAME".into()), true),
            target("broken", SecretKeyRef::File(dir.path().join("nope")), false),
        ]);
        let known = known_keys(&cfg, &resolver, &fp);
        assert_eq!(
            known
                .by_fingerprint
                .get(&fp.fingerprint("sk-same-value").to_string()),
            Some(&file.display().to_string())
        );
        assert_eq!(known.problems.len(), 1);
        assert!(known.problems[0].starts_with("target broken: secret file:"));
        assert!(!known.problems[0].contains("sk-same"));
    }
}
