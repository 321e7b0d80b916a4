//! Tests that cannot do (part of) their work here say so, never silently:
//! on stderr, and as one line in the file `KT_TEST_SKIP_LOG` names, which
//! `cargo xtask test` prints at the end (libtest hides the stderr of a
//! test that passes).

use std::io::Write;

/// Records that `what` did not run, and why (what to install or set).
pub fn skipped(what: &str, why: &str) {
    eprintln!("SKIPPED {what}: {why}");
    let Some(path) = std::env::var_os("KT_TEST_SKIP_LOG") else {
        return;
    };
    // One append of one line: lines of parallel tests never interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("{what}: {why}\n").as_bytes());
    }
}

/// Whether the eBPF tests are turned off (`KT_SKIP_EBPF_TESTS=1`, for
/// machines without root or BPF); says so for `suite` when they are.
pub fn ebpf_tests_off(suite: &str) -> bool {
    let off = std::env::var_os("KT_SKIP_EBPF_TESTS").is_some_and(|v| v == "1");
    if off {
        skipped(
            &format!("{suite}: an eBPF test"),
            "KT_SKIP_EBPF_TESTS=1 is set (unset it as root to run it)",
        );
    }
    off
}
