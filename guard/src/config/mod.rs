//! Configuration: the typed model and its YAML loader. Pure: no I/O beyond
//! [`load`] reading the one file it is given.
//!
//! `tree` turns YAML into a small tree that remembers positions, `load`
//! converts and validates it into the model, collecting every problem, and
//! `error` renders those problems as `file:line:column: message` lines.
#![forbid(unsafe_code)]

mod egress;
mod error;
mod load;
mod model;
mod store;
#[cfg(test)]
mod tests;
mod tree;

pub use egress::{
    AllowDest, AllowEntry, Egress, EgressMode, PROXY_VARS, ProxyAddr, environment_file_vars,
    no_proxy_matches, parse_allow, parse_proxy_addr, parse_proxy_url, undeclared_proxy_warnings,
    upstream_proxy_for,
};
pub use error::{ConfigError, ConfigErrors, LoadError};
pub use load::{load, parse};
pub use model::*;
pub use store::*;
