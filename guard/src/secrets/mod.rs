//! Secrets: values that must never leak, where they are stored, and how a
//! `secret_key_ref` resolves to one.
//!
//! Layout under the data dir (all files mode 0600, directories 0700):
//!
//! ```text
//! <data_dir>/fingerprint.key        per-host HMAC key for fingerprints
//! <data_dir>/secrets/store.bin      the encrypted file store (FileStore)
//! <data_dir>/secrets/store.key      its encryption key
//! <data_dir>/secrets/keychain.json  names and times of keychain entries (no values)
//! <data_dir>/secrets/.lock          serialises writers
//! ```
//!
//! Every key and store file, and every directory above it, must belong to
//! kt's uid or root, and no directory on the way may be writable by others
//! unless sticky: otherwise another user could swap a file for their own
//! ([`UnsafePath`] says which path and the `chown`/`chmod` that fixes it).
//!
//! Callers talk to backends through [`SecretStore`]; with `secrets.store` in
//! the config the central store ([`vault::VaultStore`], Vault's KV API)
//! takes the file store's place and nothing of a secret is written to the
//! data dir. [`Resolver`] turns a `secret_key_ref` into a value: `env` from
//! the guard's environment, `store` from the store (file or central) first
//! and then the keychain, `file` from a file only kt's uid or root can
//! change.
#![forbid(unsafe_code)]

mod file;
mod fingerprint;
mod fsutil;
mod keychain;
mod known;
mod memory;
mod resolver;
pub mod status;
mod value;
pub mod vault;

pub use crate::datadir::UnsafePath;
pub use file::FileStore;
pub use fingerprint::{Fingerprint, Fingerprinter};
pub use keychain::Keychain;
pub use known::{KnownKeys, known_keys};
pub use memory::MemoryStore;
pub use resolver::{Resolver, read_key_file};
pub use status::{StatusReport, TargetProblem, resolve_target};
pub use value::SecretValue;

/// Keyring helpers shared with other modules' tests.
#[cfg(test)]
pub(crate) use keychain::tests as keychain_test;

use std::path::PathBuf;
use std::time::SystemTime;

use crate::config::SecretKeyRef;

/// Where a reference resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The guard's own environment.
    Env,
    /// The guard's secret store.
    Store,
    /// The operating system keychain.
    Keychain,
    /// A file named by `secret_key_ref.file`.
    File,
    /// The central store (`secrets.store`, Vault's KV API).
    Vault,
}

impl Source {
    /// Lowercase name for output.
    pub fn name(self) -> &'static str {
        match self {
            Source::Env => "env",
            Source::Store => "store",
            Source::Keychain => "keychain",
            Source::File => "file",
            Source::Vault => "vault",
        }
    }
}

/// A resolved managed key and where it came from.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The key itself (redacted in Debug).
    pub value: SecretValue,
    /// Where it was found.
    pub source: Source,
}

/// Resolves `secret_key_ref`s. The gateway holds one of these; tests use a
/// map-backed one.
pub trait Resolve: Send + Sync {
    /// Looks a reference up; `Ok(None)` when it is simply not there.
    fn resolve(&self, reference: &SecretKeyRef) -> Result<Option<Resolved>, String>;

    /// [`Resolve::resolve`] telling a value that may no longer be used (a
    /// central store unreachable past `max_stale`: fail closed, never keep
    /// it) from one that cannot be read now.
    fn resolve_checked(
        &self,
        reference: &SecretKeyRef,
    ) -> Result<Option<Resolved>, status::Unresolved> {
        self.resolve(reference)
            .map_err(status::Unresolved::Unreadable)
    }
}

/// Metadata of one stored secret (never its value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// The secret's name.
    pub name: String,
    /// When it was first added.
    pub created: SystemTime,
    /// When its value was last set.
    pub updated: SystemTime,
}

/// What [`SecretStore::put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The name was new.
    Created,
    /// An existing value was replaced.
    Replaced,
}

/// A place secrets are kept. Small on purpose: a centralized backend only
/// has to implement these to replace the file store.
pub trait SecretStore: Send + Sync {
    /// Which backend this is, for output and [`Resolved::source`].
    fn source(&self) -> Source;

    /// The value stored under `name`; `Ok(None)` when there is none.
    fn get(&self, name: &str) -> Result<Option<SecretValue>, SecretsError>;

    /// Stores `value` under `name`, replacing any existing value. Checks the
    /// name ([`validate_name`]) and the value ([`validate_value`]).
    fn put(&self, name: &str, value: &SecretValue) -> Result<PutOutcome, SecretsError>;

    /// Removes `name`; `Ok(false)` when it was not there.
    fn remove(&self, name: &str) -> Result<bool, SecretsError>;

    /// Metadata of every entry, sorted by name.
    fn list(&self) -> Result<Vec<EntryMeta>, SecretsError>;

    /// Metadata of one entry.
    fn meta(&self, name: &str) -> Result<Option<EntryMeta>, SecretsError> {
        Ok(self.list()?.into_iter().find(|m| m.name == name))
    }

    /// Every entry with its value (`None` when the backend lists a name whose
    /// value is gone, e.g. a keychain entry after a reboot). Backends that
    /// can read everything at once override this.
    fn entries(&self) -> Result<Vec<(EntryMeta, Option<SecretValue>)>, SecretsError> {
        self.list()?
            .into_iter()
            .map(|meta| {
                let value = self.get(&meta.name)?;
                Ok((meta, value))
            })
            .collect()
    }
}

/// One stored secret as shown by `kt secrets list` and used by the gateway
/// to tell which stored secret a client presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownSecret {
    /// Name, dates.
    pub meta: EntryMeta,
    /// Backend it lives in.
    pub source: Source,
    /// Keyed fingerprint of its value; `None` when the value is gone.
    pub fingerprint: Option<Fingerprint>,
}

/// Lists every secret of `stores` with its fingerprint, in the order given
/// (store first, then keychain, by convention).
pub fn known_secrets(
    stores: &[&dyn SecretStore],
    fingerprinter: &Fingerprinter,
) -> Result<Vec<KnownSecret>, SecretsError> {
    let mut out = Vec::new();
    for store in stores {
        for (meta, value) in store.entries()? {
            out.push(KnownSecret {
                meta,
                source: store.source(),
                fingerprint: value.map(|v| fingerprinter.fingerprint(v.expose())),
            });
        }
    }
    Ok(out)
}

/// Suffix of the name events give a managed secret's replaced value
/// (`OPENAI_KEY (previous value)`): who still presents the old key after a
/// rotation.
pub const PREVIOUS_VALUE: &str = " (previous value)";

/// Longest accepted secret name.
pub const MAX_NAME_LEN: usize = 128;

/// Longest accepted secret value in bytes (the kernel keyring takes at most
/// 32767 bytes per key; every backend uses the same limit).
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// Checks a secret name: `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_NAME_LEN`].
pub fn validate_name(name: &str) -> Result<(), SecretsError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if first_ok && rest_ok && name.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(SecretsError::InvalidName {
            name: name.escape_default().to_string(),
        })
    }
}

/// Checks a secret value: not empty, at most [`MAX_VALUE_LEN`] bytes, and no
/// control characters (it must fit in an HTTP header). Errors never include
/// the value.
pub fn validate_value(value: &SecretValue) -> Result<(), SecretsError> {
    let v = value.expose();
    if v.is_empty() {
        return Err(SecretsError::EmptyValue);
    }
    if v.len() > MAX_VALUE_LEN {
        return Err(SecretsError::ValueTooLong {
            len: v.len(),
            max: MAX_VALUE_LEN,
        });
    }
    if v.chars().any(char::is_control) {
        return Err(SecretsError::ValueHasControl);
    }
    Ok(())
}

/// Everything that can go wrong with secrets. Messages name the object and
/// never contain a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// A name outside `[A-Za-z_][A-Za-z0-9_]*`.
    #[error(
        "invalid secret name '{name}': use letters, digits and underscores, \
         not starting with a digit, at most 128 characters"
    )]
    InvalidName {
        /// The name, escaped.
        name: String,
    },
    /// An empty value.
    #[error("empty secret value: nothing to store")]
    EmptyValue,
    /// A value over the size limit.
    #[error("secret value is too long ({len} bytes, at most {max})")]
    ValueTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value with a line break or other control character inside.
    #[error(
        "secret value contains a line break or another control character \
         (only one trailing newline is stripped)"
    )]
    ValueHasControl,
    /// The store directory does not exist.
    #[error(
        "secret store directory {path} does not exist; \
         add a secret with `kt secrets add NAME --store` to create it, \
         or check --data-dir / KT_DATA_DIR"
    )]
    StoreMissing {
        /// The directory.
        path: PathBuf,
    },
    /// The store file exists but its key file does not.
    #[error(
        "secret store {store} exists but its key file {key} is missing; \
         restore the key file from a backup (the store cannot be read without it)"
    )]
    KeyMissing {
        /// The store file.
        store: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A key or store file other users can read or write.
    #[error(
        "{what} {path} is accessible by other users (mode {mode:04o}); \
         refusing to use it: fix it with `chmod {fix} {path}`"
    )]
    InsecurePermissions {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The mode to set (`600` for files, `700` for directories).
        fix: &'static str,
    },
    /// A key or store file (or a directory above it) that another user
    /// could replace: wrong owner, or a directory writable by others.
    #[error(transparent)]
    Untrusted(#[from] UnsafePath),
    /// A key file of the wrong size.
    #[error("key file {path} is damaged (expected 32 bytes, found {len})")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The store was written with another key.
    #[error(
        "secret store {store} was written with a different key than {key} \
         (wrong key file, or the store header was damaged)"
    )]
    WrongKey {
        /// The store file.
        store: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The store failed authentication: modified or damaged.
    #[error(
        "secret store {path} failed its integrity check ({detail}): the file was \
         modified or damaged; restore it from a backup, or move it away and add \
         the secrets again"
    )]
    Tampered {
        /// The store file.
        path: PathBuf,
        /// What was wrong.
        detail: &'static str,
    },
    /// A metadata file (keychain index) that does not parse.
    #[error("{path} is damaged ({detail}); move it away to start a new one")]
    BadIndex {
        /// The file.
        path: PathBuf,
        /// The parser's message (no secret values live in this file).
        detail: String,
    },
    /// Random bytes could not be had from the kernel.
    #[error("cannot get random bytes for {what}: {detail}")]
    Random {
        /// What they were for.
        what: &'static str,
        /// The OS error.
        detail: String,
    },
    /// The kernel keyring refused an operation.
    #[error("keychain (kernel user keyring) {op} for {name} failed: {detail}")]
    Keychain {
        /// The operation.
        op: &'static str,
        /// The secret's name.
        name: String,
        /// The kernel's answer.
        detail: String,
    },
    /// A `secret_key_ref.file` whose content is not a usable key.
    #[error("key file {path} {problem}")]
    KeyFileContent {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (never its content).
        problem: &'static str,
    },
    /// The central store failed.
    #[error(transparent)]
    Vault(#[from] vault::VaultError),
    /// A file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation, e.g. "cannot read".
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl SecretsError {
    /// Builds an [`SecretsError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SecretsError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_identifier_rule() {
        for good in ["A", "_", "OPENAI_API_KEY_2026Q2", "a1", "_x_9"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "A.B", "ä", "A\n", "$X"] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("invalid secret name"), "{bad}: {err}");
        }
        assert!(validate_name(&"A".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate_name(&"A".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn values_must_be_non_empty_single_line_and_bounded() {
        assert!(matches!(
            validate_value(&SecretValue::new("")),
            Err(SecretsError::EmptyValue)
        ));
        assert!(matches!(
            validate_value(&SecretValue::new("sk-a\nb")),
            Err(SecretsError::ValueHasControl)
        ));
        assert!(matches!(
            validate_value(&SecretValue::new("x".repeat(MAX_VALUE_LEN + 1))),
            Err(SecretsError::ValueTooLong { .. })
        ));
        assert!(validate_value(&SecretValue::new("sk-proj-abc123")).is_ok());
    }
}
