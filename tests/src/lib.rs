//! End-to-end fixtures for kt: child cgroups, the fake TLS provider and
//! gateway helpers.

pub mod cgroup;
pub mod fake_provider;
pub mod gateway_fixture;
