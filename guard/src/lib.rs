//! kt: an eBPF-assisted egress guard for AI provider keys.
//!
//! Pure cores (`config`, `dlp`, `routing`) do no I/O; `gateway` is the async
//! part; every `aya` call and all `unsafe` live in `capture`.

// Input from users, files, the network and the kernel never panics the guard.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod ca;
pub mod capture;
pub mod cli;
pub mod config;
pub mod dlp;
pub mod events;
pub mod gateway;
pub mod preflight;
pub mod routing;
pub mod secrets;
