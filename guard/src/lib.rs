//! kt: an eBPF-assisted egress guard for AI provider keys.
//!
//! # Layout
//! Modules sit on floors; a module only imports modules on its own floor or
//! below, never above.
//!
//! | floor | module | job |
//! |---|---|---|
//! | 1 | [`provider`] | the provider catalog: hosts, endpoints, credential style, error shapes, key formats (`provider::keys`, shared by DLP and the key report) |
//! | 1 | [`record`] | the per-request record shared by gateway, policy and events (typed) |
//! | 1 | [`config`] | YAML → typed model, every problem with file:line:column (pure) |
//! | 1 | [`ca`] | the local CA and per-name leaves |
//! | 1 | [`datadir`] | the data dir's paths; private (0600/0700) file and directory creation |
//! | 2 | [`dlp`] | secret scanning and redaction of request bodies (pure) |
//! | 2 | [`routing`] | which provider, which targets in what order, when to fall back (pure) |
//! | 2 | [`secrets`] | secret backends (file store, keychain, env, file, central Vault KV store), their resolver, the one target-resolution report |
//! | 2 | [`metrics`] | Prometheus metrics counted from request records, plus gauges read at scrape |
//! | 2 | [`capture`] | every `aya` call and all `unsafe`: eBPF programs, maps, records; provider host tracking and the capture supervisor |
//! | 3 | [`policy`] | the policy chain (dlp-filter, audit-logger) with typed verdicts |
//! | 3 | [`gateway`] | listeners, TLS, request steps, upstream, relay (async) |
//! | 3 | [`events`] | event store, writer, record sink, key report, host identity, fleet-wide key report |
//! | 3 | [`preflight`] | the checks behind `kt gateway check` |
//! | 4 | [`app`] | the composition root: build from a config, run, reload (control socket, SIGHUP, secret watcher), shut down in order (prints nothing) |
//! | 5 | [`cli`] | the `kt` command line: parse, call, render |
//!
//! Pure cores (`config`, `dlp`, `routing`, `provider`, `record`) do no I/O;
//! `gateway` is the async part; every `aya` call and all `unsafe` live in
//! `capture`.

// Input from users, files, the network and the kernel never panics the guard.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod app;
pub mod ca;
pub mod capture;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod dlp;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod metrics;
pub mod policy;
pub mod preflight;
pub mod provider;
pub mod record;
pub mod routing;
pub mod secrets;
