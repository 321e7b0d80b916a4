//! preflight.
