//! A secret value that never shows itself.

use std::fmt;
use std::sync::Arc;

/// A secret string. Debug and Display print `[redacted]`; the bytes are only
/// reachable through `expose`, which makes every use easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Arc<str>);

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> SecretValue {
        SecretValue(Arc::from(value.into()))
    }

    /// The secret itself. Call only where it must leave the process (an
    /// upstream header) or be hashed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([redacted])")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let v = SecretValue::new("sk-test-DO-NOT-PRINT-123");
        assert!(!format!("{v:?}").contains("DO-NOT-PRINT"));
        assert!(!format!("{v}").contains("DO-NOT-PRINT"));
        assert_eq!(v.expose(), "sk-test-DO-NOT-PRINT-123");
    }
}
