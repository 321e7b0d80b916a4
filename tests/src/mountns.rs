//! A private mount namespace for one test, kept alive by a holder process.
//!
//! `kt run` mounts a bpffs on /sys/fs/bpf when none is mounted; tests run
//! it in here so the host's mounts are never touched. Any bpffs inherited
//! from the host is unmounted inside (only inside: propagation is private),
//! so kt starts from "no bpffs", as on a fresh machine. On drop (also during
//! a panic) the pins kt left are removed, which detaches their programs,
//! the bpffs is unmounted and the holder ends; the holder also ends by
//! itself when this process dies (its stdin closes).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

/// The holder: `unshare -m` running `cat` on a pipe from this process.
pub struct PrivateMounts {
    holder: Child,
    stdin: Option<ChildStdin>,
}

const SETUP: &str = r#"for m in $(awk '$3 == "bpf" { print $2 }' /proc/self/mounts); do umount "$m" || exit 1; done; echo ready; exec cat >/dev/null"#;

impl PrivateMounts {
    /// Makes the namespace; fails if it cannot be made (needs root).
    pub fn new() -> anyhow::Result<PrivateMounts> {
        PrivateMounts::run(SETUP)
    }

    fn run(setup: &str) -> anyhow::Result<PrivateMounts> {
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", setup])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = holder.stdin.take();
        let mut line = String::new();
        if let Some(out) = holder.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let mounts = PrivateMounts { holder, stdin };
        anyhow::ensure!(
            line.trim() == "ready",
            "the private mount namespace could not be set up"
        );
        Ok(mounts)
    }

    /// As [`PrivateMounts::new`], with a tmpfs of `size` (a `mount -o
    /// size=` value such as `4m`) mounted on `dir` inside the namespace
    /// only: a small disk a test can fill.
    pub fn with_tmpfs(dir: &std::path::Path, size: &str) -> anyhow::Result<PrivateMounts> {
        let setup = SETUP.replace(
            "echo ready",
            &format!(
                "mount -t tmpfs -o size={size},mode=0700 kt-test-tmpfs '{}' || exit 1; echo ready",
                dir.display()
            ),
        );
        PrivateMounts::run(&setup)
    }

    /// As [`PrivateMounts::new`], with `hosts` bind-mounted over
    /// `/etc/hosts` inside the namespace only: the test's own resolver for
    /// every process started there (kt and its clients), the host's file
    /// untouched.
    pub fn with_hosts_file(hosts: &std::path::Path) -> anyhow::Result<PrivateMounts> {
        let setup = SETUP.replace(
            "echo ready",
            &format!(
                "mount --bind '{}' /etc/hosts || exit 1; echo ready",
                hosts.display()
            ),
        );
        PrivateMounts::run(&setup)
    }

    /// Where a process outside reaches `path` as seen inside.
    pub fn outside(&self, path: &std::path::Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(rel)
    }

    /// A command that runs `program` inside the namespace (nsenter execs
    /// it: the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "--", program]);
        c
    }

    /// Mount points of bpffs mounts inside the namespace.
    pub fn bpffs_mounts(&self) -> Vec<PathBuf> {
        let path = format!("/proc/{}/mounts", self.holder.id());
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
                (fstype == "bpf").then(|| PathBuf::from(dir))
            })
            .collect()
    }
}

impl Drop for PrivateMounts {
    fn drop(&mut self) {
        for m in self.bpffs_mounts() {
            let script = format!("rm -rf '{0}/kt'; umount '{0}'", m.display());
            let _ = self.command("sh").args(["-c", &script]).status();
        }
        drop(self.stdin.take());
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
