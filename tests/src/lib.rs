//! End-to-end fixtures for kt: the fake TLS provider and gateway helpers.

pub mod fake_provider;
pub mod gateway_fixture;
