//! The resolver the gateway and `kt secrets status` use: `env:` references
//! read the guard's own environment; `store:` references try each store in
//! order (the file store, then the keychain); `file:` references read a file
//! that only kt's uid or root can change.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::status::Unresolved;
use super::vault::{Refreshed, VaultError, VaultStore};
use super::{
    FileStore, Fingerprinter, Keychain, KnownSecret, MAX_VALUE_LEN, Resolve, Resolved, SecretStore,
    SecretValue, SecretsError, Source, known_secrets,
};
use crate::config::{Config, SecretKeyRef};
use crate::datadir::{check_dirs, check_file};

/// Room for trailing whitespace after a key of the longest accepted length.
const KEY_FILE_SLACK: usize = 4096;

/// Reads the key held in `path` (a `secret_key_ref.file`): the whole file,
/// trailing ASCII whitespace stripped (`echo` adds a newline, Kubernetes
/// files have none). `Ok(None)` when nothing is left: an empty file.
///
/// Refuses a file, or a directory on the way to it (symlinks followed), that
/// another user could change: owned by a uid other than kt's or root's, or
/// writable by group or others (directories: unless sticky). Whoever can
/// swap this file can send every client's prompts to their own account.
/// Errors name the path and the cause, never the content.
pub fn read_key_file(path: &Path) -> Result<Option<SecretValue>, SecretsError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    check_dirs(dir.unwrap_or(Path::new(".")), path)?;
    // A Kubernetes secret volume links the file into a versioned directory:
    // the directory the content really lives in must be safe too.
    let real = std::fs::canonicalize(path)
        .map_err(|e| SecretsError::io("cannot read key file", path, e))?;
    if let Some(real_dir) = real.parent()
        && Some(real_dir) != dir
    {
        check_dirs(real_dir, path)?;
    }
    let file = File::open(path).map_err(|e| SecretsError::io("cannot read key file", path, e))?;
    // Checked on the open handle: what is read is what was checked.
    let meta = file
        .metadata()
        .map_err(|e| SecretsError::io("cannot inspect key file", path, e))?;
    if !meta.is_file() {
        return Err(SecretsError::KeyFileContent {
            path: path.to_path_buf(),
            problem: "is not a regular file",
        });
    }
    check_file(path, &meta)?;
    let mut bytes = Vec::new();
    file.take((MAX_VALUE_LEN + KEY_FILE_SLACK + 1) as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| SecretsError::io("cannot read key file", path, e))?;
    let bad = |problem| SecretsError::KeyFileContent {
        path: path.to_path_buf(),
        problem,
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("is not valid UTF-8"))?;
    let key = text.trim_end_matches(|c: char| c.is_ascii_whitespace());
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_VALUE_LEN {
        return Err(bad("holds more than a key (over 16 KiB)"));
    }
    if key.chars().any(char::is_control) {
        return Err(bad(
            "holds more than one line (or another control character): it must hold only the key",
        ));
    }
    Ok(Some(SecretValue::new(key)))
}

/// Resolves `secret_key_ref`s against the environment and a list of stores.
#[derive(Clone)]
pub struct Resolver {
    stores: Vec<Arc<dyn SecretStore>>,
    /// The central store among `stores`, when the config has one.
    vault: Option<Arc<VaultStore>>,
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

    /// The resolver of a running gateway for `config`: with a central store
    /// (`secrets.store`), `store:` references read it (from memory, see
    /// [`VaultStore::cached`]) and then the keychain, and the data dir's
    /// file store is not used; without one, [`Resolver::from_data_dir`].
    pub fn for_config(config: &Config, data_dir: &Path) -> Result<Resolver, VaultError> {
        let Some(cfg) = &config.secrets.store else {
            return Ok(Resolver::from_data_dir(data_dir));
        };
        let vault = Arc::new(VaultStore::cached(cfg)?);
        Ok(Resolver {
            stores: vec![
                Arc::clone(&vault) as Arc<dyn SecretStore>,
                Arc::new(Keychain::new(data_dir)),
            ],
            vault: Some(vault),
        })
    }

    /// [`Resolver::for_config`] for one-shot commands (`kt secrets status`,
    /// `kt gateway check`): the central store is asked on every lookup.
    pub fn live_for_config(config: &Config, data_dir: &Path) -> Result<Resolver, VaultError> {
        let Some(cfg) = &config.secrets.store else {
            return Ok(Resolver::from_data_dir(data_dir));
        };
        let vault = Arc::new(VaultStore::live(cfg)?);
        Ok(Resolver {
            stores: vec![
                Arc::clone(&vault) as Arc<dyn SecretStore>,
                Arc::new(Keychain::new(data_dir)),
            ],
            vault: Some(vault),
        })
    }

    /// A resolver over any stores, tried in the order given.
    pub fn with_stores(stores: Vec<Arc<dyn SecretStore>>) -> Resolver {
        Resolver {
            stores,
            vault: None,
        }
    }

    /// The central store, when the config has one.
    pub fn vault(&self) -> Option<&Arc<VaultStore>> {
        self.vault.as_ref()
    }

    /// Reads the central store again (blocking; nothing without one):
    /// every name under its prefix and every `store:` reference of
    /// `config`.
    pub fn refresh(&self, config: &Config) -> Option<Refreshed> {
        let vault = self.vault.as_ref()?;
        let wanted: Vec<String> = config
            .providers
            .targets
            .iter()
            .filter_map(|t| match &t.secret_key_ref {
                SecretKeyRef::Store(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        Some(vault.refresh(&wanted))
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
    fn resolve_checked(&self, reference: &SecretKeyRef) -> Result<Option<Resolved>, Unresolved> {
        if let SecretKeyRef::Store(name) = reference
            && let Some(vault) = &self.vault
        {
            match vault.get(name) {
                Ok(Some(value)) => {
                    return Ok(Some(Resolved {
                        value,
                        source: Source::Vault,
                    }));
                }
                Err(SecretsError::Vault(e @ VaultError::Expired { .. })) => {
                    return Err(Unresolved::Expired(e.to_string()));
                }
                // Not there, or unreadable: the usual order decides.
                _ => {}
            }
        }
        self.resolve(reference).map_err(Unresolved::Unreadable)
    }

    fn resolve(&self, reference: &SecretKeyRef) -> Result<Option<Resolved>, String> {
        let name = match reference {
            SecretKeyRef::Env(name) => return Self::from_env(name),
            SecretKeyRef::File(path) => {
                return read_key_file(path)
                    .map(|v| {
                        v.map(|value| Resolved {
                            value,
                            source: Source::File,
                        })
                    })
                    .map_err(|e| e.to_string());
            }
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

    mod key_files {
        use super::*;
        use crate::secrets::status::{TargetState, tests as status_tests};
        use crate::secrets::{StatusReport, resolve_target};
        use std::os::unix::fs::PermissionsExt;

        fn file_ref(path: &Path) -> SecretKeyRef {
            SecretKeyRef::File(path.to_path_buf())
        }

        fn resolve(path: &Path) -> Result<Option<Resolved>, String> {
            Resolver::with_stores(Vec::new()).resolve(&file_ref(path))
        }

        fn write(path: &Path, bytes: &[u8], mode: u32) {
            std::fs::write(path, bytes).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }

        #[test]
        fn a_file_resolves_with_its_trailing_newline_stripped() {
            let dir = tempfile::tempdir().unwrap();
            let k8s = dir.path().join("k8s");
            write(&k8s, b"sk-file-key-1", 0o644);
            let got = resolve(&k8s).unwrap().unwrap();
            assert_eq!(
                (got.value.expose(), got.source),
                ("sk-file-key-1", Source::File)
            );
            assert_eq!(Source::File.name(), "file");

            // `echo sk-... > file` adds a newline; editors may add more.
            let echoed = dir.path().join("echoed");
            write(&echoed, b"sk-file-key-2\n", 0o600);
            assert_eq!(
                resolve(&echoed).unwrap().unwrap().value.expose(),
                "sk-file-key-2"
            );
            write(&echoed, b"sk-file-key-2 \r\n\n\t", 0o600);
            assert_eq!(
                resolve(&echoed).unwrap().unwrap().value.expose(),
                "sk-file-key-2"
            );

            // Two lines are not one key: refused, and neither line is quoted.
            write(&echoed, b"sk-line-one\nsk-line-two\n", 0o600);
            let err = resolve(&echoed).unwrap_err();
            assert!(err.contains("more than one line"), "{err}");
            assert!(!err.contains("sk-line"), "{err}");
        }

        #[test]
        fn an_empty_file_is_not_resolved_and_the_problem_says_so() {
            let dir = tempfile::tempdir().unwrap();
            let empty = dir.path().join("openai");
            write(&empty, b"\n", 0o600);
            assert!(resolve(&empty).unwrap().is_none());
            let t = status_tests::target("a", file_ref(&empty), true);
            let problem = resolve_target(&t, &Resolver::with_stores(Vec::new())).unwrap_err();
            let text = problem.to_string();
            assert!(
                text.starts_with(&format!(
                    "target a: secret file:{} is empty;",
                    empty.display()
                )),
                "{text}"
            );
            let report = StatusReport::build(
                &status_tests::config(vec![t]),
                &Resolver::with_stores(Vec::new()),
                None,
            );
            assert_eq!(report.targets[0].state, TargetState::Missing);
            assert!(!report.ok());
        }

        #[test]
        fn an_unreadable_file_is_an_error_naming_the_path_and_the_cause() {
            let dir = tempfile::tempdir().unwrap();
            let missing = dir.path().join("not-written-yet");
            let err = resolve(&missing).unwrap_err();
            assert!(err.contains(&missing.display().to_string()), "{err}");
            assert!(err.contains("No such file or directory"), "{err}");

            let t = status_tests::target("a", file_ref(&missing), false);
            let report = StatusReport::build(
                &status_tests::config(vec![t]),
                &Resolver::with_stores(Vec::new()),
                None,
            );
            assert_eq!(report.targets[0].state, TargetState::Error);

            // Without root's override, a file kt may not read.
            if rustix::process::geteuid().as_raw() != 0 {
                let locked = dir.path().join("locked");
                write(&locked, b"sk-locked-secret-value", 0o000);
                let err = resolve(&locked).unwrap_err();
                assert!(err.contains("Permission denied"), "{err}");
                assert!(!err.contains("sk-locked"), "{err}");
            }
        }

        #[test]
        fn a_file_others_could_change_is_refused() {
            let dir = tempfile::tempdir().unwrap();
            let key = dir.path().join("key");
            for mode in [0o666, 0o620, 0o602] {
                write(&key, b"sk-swappable-key-value", mode);
                let err = resolve(&key).unwrap_err();
                assert!(err.contains("writable by other users"), "{mode:o}: {err}");
                assert!(err.contains("chmod go-w"), "{err}");
                assert!(!err.contains("sk-swappable"), "{err}");
            }
            write(&key, b"sk-swappable-key-value", 0o644);
            assert!(resolve(&key).unwrap().is_some());

            // A directory on the way that others can write to (not sticky):
            // they could rename the file away and put their own there.
            let open_dir = dir.path().join("shared");
            std::fs::create_dir(&open_dir).unwrap();
            let inside = open_dir.join("key");
            write(&inside, b"sk-swappable-key-value", 0o600);
            std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            let err = resolve(&inside).unwrap_err();
            assert!(err.contains("writable by other users"), "{err}");
            assert!(err.contains(&open_dir.display().to_string()), "{err}");

            // A link into such a directory (how Kubernetes lays out secret
            // volumes) is judged by where the content really is.
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&inside, &link).unwrap();
            let err = resolve(&link).unwrap_err();
            assert!(err.contains("writable by other users"), "{err}");
            std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            assert!(resolve(&link).unwrap().is_some());

            // Owned by another user: only root can hand a file away.
            if rustix::process::geteuid().as_raw() == 0 {
                write(&key, b"sk-swappable-key-value", 0o600);
                std::os::unix::fs::chown(&key, Some(54321), None).unwrap();
                let err = resolve(&key).unwrap_err();
                assert!(err.contains("belongs to uid 54321"), "{err}");
            }
        }

        #[test]
        fn a_relative_path_in_the_config_is_relative_to_the_config_file() {
            let dir = tempfile::tempdir().unwrap();
            let cfg = dir.path().join("policy.yaml");
            std::fs::write(
                &cfg,
                "providers:\n  targets:\n    - id: a\n      provider: openai\n      \
                 secret_key_ref: {file: keys/openai}\n",
            )
            .unwrap();
            std::fs::create_dir(dir.path().join("keys")).unwrap();
            write(&dir.path().join("keys/openai"), b"sk-relative-key\n", 0o600);
            let config = crate::config::load(&cfg).unwrap();
            let reference = &config.providers.targets[0].secret_key_ref;
            assert_eq!(*reference, file_ref(&dir.path().join("keys/openai")));
            let got = Resolver::with_stores(Vec::new())
                .resolve(reference)
                .unwrap()
                .unwrap();
            assert_eq!(got.value.expose(), "sk-relative-key");
        }
    }
}
