//! Fuzz harnesses, one function per target (not part of kt's API).
//!
//! Each function takes the raw input bytes, drives one parser that sees
//! untrusted bytes, and asserts properties of the result (panics on a
//! violation). The same functions run in two places:
//! - `tests/fuzz/fuzz_targets/<target>.rs` (cargo-fuzz, libFuzzer; `cargo
//!   xtask fuzz`), and
//! - the stable test `tests/tests/fuzz_replay.rs`, which feeds them every
//!   file under `tests/fuzz/corpus/<target>/` and
//!   `tests/fuzz/regressions/<target>/` (part of `cargo xtask test`).
//!
//! Kept in the library, behind no feature, so both see the crate-private
//! parsers without widening their visibility; it costs a few kilobytes.
//! [`TARGETS`] lists them by name.
#![forbid(unsafe_code)]
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a harness reports a property violation by panicking"
)]

mod config;
mod connect;
mod dlp;
mod hello;
mod relay;
mod stores;

pub use config::config;
pub use connect::connect;
pub use dlp::dlp;
pub use hello::client_hello;
pub use relay::relay;
pub use stores::{event_store, secret_store};

/// A harness: takes one input, panics when a property does not hold.
pub type Harness = fn(&[u8]);

/// Every target: its name (the directory of its corpus) and its harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("config", config),
    ("dlp", dlp),
    ("client_hello", client_hello),
    ("connect", connect),
    ("relay", relay),
    ("event_store", event_store),
    ("secret_store", secret_store),
];

/// Splits `data` at the first `sep`: (before, after); all of it and an
/// empty rest when `sep` does not occur.
fn split_once(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Polls a future that never waits on anything outside itself (all the
/// harnesses' I/O is in memory) to completion.
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // Every `Pending` the in-memory I/O returns is after a self-wake; a
    // bound catches a future that would wait forever.
    for _ in 0..1_000_000 {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future did not complete: it waits on something that never comes");
}
