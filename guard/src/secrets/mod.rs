//! Secrets: values that must never leak, where they are stored, and how a
//! `secret_key_ref` resolves to one.

mod value;

pub use value::SecretValue;

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
}

impl Source {
    /// Lowercase name for output.
    pub fn name(self) -> &'static str {
        match self {
            Source::Env => "env",
            Source::Store => "store",
            Source::Keychain => "keychain",
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
}
