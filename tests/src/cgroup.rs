//! A child cgroup of the cgroup-v2 mount for one test.
//!
//! Safety on shared machines: programs are only ever attached to this child,
//! only the test's own client processes are moved in, and on drop (also
//! during a panic) those processes are killed by pid and the directory is
//! removed.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A child cgroup that removes itself on drop.
pub struct TestCgroup {
    path: PathBuf,
    children: Vec<Child>,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/kt-test-<pid>-<n>-<label>`.
    pub fn new(label: &str) -> anyhow::Result<TestCgroup> {
        let mount = guard::capture::cgroup2_mount()?;
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = mount.join(format!("kt-test-{}-{n}-{label}", std::process::id()));
        std::fs::create_dir(&path)
            .map_err(|e| anyhow::anyhow!("cannot create test cgroup {}: {e}", path.display()))?;
        Ok(TestCgroup {
            path,
            children: Vec::new(),
        })
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves a process this test started into the cgroup and keeps it, so
    /// drop can end it.
    pub fn adopt(&mut self, child: Child) -> anyhow::Result<u32> {
        let pid = child.id();
        let result = std::fs::write(self.path.join("cgroup.procs"), pid.to_string());
        self.children.push(child);
        result.map_err(|e| {
            anyhow::anyhow!("cannot move pid {pid} into {}: {e}", self.path.display())
        })?;
        Ok(pid)
    }

    /// Moves a process this test started (and ends itself) into the cgroup,
    /// without taking it over; it must be gone before this is dropped.
    pub fn enter(&self, pid: u32) -> anyhow::Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .map_err(|e| anyhow::anyhow!("cannot move pid {pid} into {}: {e}", self.path.display()))
    }

    /// Waits for an adopted child by pid and returns its output streams.
    pub fn wait(&mut self, pid: u32) -> anyhow::Result<std::process::Output> {
        let idx = self
            .children
            .iter()
            .position(|c| c.id() == pid)
            .ok_or_else(|| anyhow::anyhow!("pid {pid} was not adopted"))?;
        let child = self.children.remove(idx);
        Ok(child.wait_with_output()?)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The kernel may need a moment to drop exited tasks from the cgroup.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        eprintln!(
            "warning: could not remove test cgroup {}",
            self.path.display()
        );
    }
}
