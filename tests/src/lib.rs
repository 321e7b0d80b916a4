//! End-to-end fixtures for kt: child cgroups, private mount namespaces,
//! the fake TLS provider and gateway helpers.

pub mod cgroup;
pub mod fake_provider;
pub mod gateway_fixture;
pub mod kt_run;
pub mod mountns;
pub mod process;
pub mod raw_client;
pub mod skip;
pub mod vault;
pub use skip::{ebpf_tests_off, skipped};
