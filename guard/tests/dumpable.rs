//! `kt` marks itself non-dumpable before it reads any key. What another
//! process can observe: for a non-dumpable process of an ordinary uid the
//! kernel hands its `/proc/PID` files (status, environ, mem, ...) to root,
//! so the process's own uid can no longer read its memory or ptrace it,
//! and no core dump is written.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const KT: &str = env!("CARGO_BIN_EXE_kt");
/// The uid `kt` runs as when the test runs as root (nobody).
const NOBODY: u32 = 65534;

/// Stops the spawned gateway even when an assertion fails.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
}

#[test]
fn a_running_kt_is_not_dumpable_so_its_proc_files_belong_to_root() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("kt.yaml");
    std::fs::write(
        &config,
        "pack: {name: dumpable, version: \"1.0.0\", enabled: true}\n\
         providers:\n  targets:\n    - id: openai-env\n      provider: openai\n      \
         required: true\n      secret_key_ref: {env: KT_TEST_DUMPABLE_KEY}\n\
         policies:\n  chain: [dlp-filter]\n",
    )
    .unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();

    // kt must run as an ordinary uid: a root process's /proc files belong
    // to root whatever its dumpable flag says.
    let as_root = rustix::process::geteuid().is_root();
    let mut cmd = Command::new(KT);
    cmd.args(["gateway", "run", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env("KT_DATA_DIR", &data)
        .env(
            "KT_TEST_DUMPABLE_KEY",
            "sk-dumpable-test-not-a-real-key-000000",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if as_root {
        chown_tree(tmp.path(), NOBODY);
        cmd.uid(NOBODY).gid(NOBODY);
    }
    let mut child = Running(cmd.spawn().expect("running kt"));
    let pid = child.0.id();

    // Wait until the gateway serves: by then main() is long past its start.
    let stderr = child.0.stderr.take().unwrap();
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("gateway listening on") {
            break;
        }
    }
    assert!(
        seen.contains("gateway listening on"),
        "kt did not start:\n{seen}"
    );

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let real_uid: u32 = uid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(
        real_uid, 0,
        "kt must run as an ordinary uid here: {uid_line}"
    );
    for file in ["status", "environ", "mem"] {
        let owner = std::fs::metadata(format!("/proc/{pid}/{file}"))
            .unwrap()
            .uid();
        assert_eq!(
            owner, 0,
            "/proc/{pid}/{file} belongs to uid {owner}: kt (uid {real_uid}) is dumpable"
        );
    }
}
