//! Helpers for suites that drive the real `kt` binary as a child process:
//! a guard that ends it (by pid) if a test fails half way, a free loopback
//! address for its listeners, its output for assertion messages, and a
//! bounded poll for what it writes.

use std::net::SocketAddr;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// Ends the kt we started (by pid) when dropped, also on panic.
pub struct KtChild(pub Child);

impl Drop for KtChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback address nothing listens on right now (bound, read, released).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A command's stdout and stderr, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `f` (every 20 ms, up to 30 s) until it gives a value.
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited 30 s for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends a `kt run` we started (by pid) if the test fails half way; a test
/// that stops it itself takes the child out first.
pub struct RunGuard(pub Option<Child>);

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls the log file `path` (every 50 ms, up to 60 s) until it contains
/// `needle`; returns its text then.
pub fn wait_for_log(path: &std::path::Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "kt run did not report {needle:?}; its stderr:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
