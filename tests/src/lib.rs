//! Shared fixtures for kt's end-to-end suites.

pub mod cgroup;
