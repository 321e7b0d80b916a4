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
