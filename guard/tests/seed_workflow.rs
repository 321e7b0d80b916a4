//! The seed document's commands, run in order through the `kt` binary as a
//! user would, against the seed's example config as written:
//!
//! ```text
//! kt secrets add OPENAI_API_KEY_2026Q2 --store
//! kt secrets add OPENAI_API_KEY_2026Q1 --keychain
//! kt secrets status --config policy-config.yaml
//! kt gateway check --config policy-config.yaml --verbose
//! ```
//!
//! The keychain is the kernel user keyring, shared by every process of this
//! uid: the test removes its entry before and after.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const KT: &str = env!("CARGO_BIN_EXE_kt");
const Q2: &str = "sk-seedtest-q2-Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4";
const Q1: &str = "sk-seedtest-q1-YmF6cXV4Zm9vYmFyMTIzNDU2Nzg5MDEy";

fn seed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/provider-key-rotation.yaml")
}

fn kt(data: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(KT)
        .args(args)
        .env("KT_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kt");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn all(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct KeyringEntry(PathBuf);
impl Drop for KeyringEntry {
    fn drop(&mut self) {
        let _ = kt(&self.0, &["secrets", "rm", "OPENAI_API_KEY_2026Q1"], None);
    }
}

#[test]
fn the_seed_commands_work_in_order_and_never_print_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let seed = seed();
    let seed = seed.to_str().unwrap();
    let _ = kt(&data, &["secrets", "rm", "OPENAI_API_KEY_2026Q1"], None);
    let _cleanup = KeyringEntry(data.clone());
    let mut transcript = String::new();

    // Before anything is added the preflight fails closed, naming the secret.
    let before = kt(&data, &["gateway", "check", "--config", seed], None);
    transcript += &all(&before);
    assert_eq!(before.status.code(), Some(1), "{}", all(&before));
    assert!(all(&before).contains("OPENAI_API_KEY_2026Q2"));

    let add2 = kt(
        &data,
        &["secrets", "add", "OPENAI_API_KEY_2026Q2", "--store"],
        Some(&format!("{Q2}\n")),
    );
    transcript += &all(&add2);
    assert_eq!(add2.status.code(), Some(0), "{}", all(&add2));
    assert!(all(&add2).contains("fp:"), "{}", all(&add2));

    // Only the required secret: check passes (the optional one is skipped).
    let mid = kt(&data, &["gateway", "check", "--config", seed], None);
    transcript += &all(&mid);
    assert_eq!(mid.status.code(), Some(0), "{}", all(&mid));

    let add1 = kt(
        &data,
        &["secrets", "add", "OPENAI_API_KEY_2026Q1", "--keychain"],
        Some(Q1),
    );
    transcript += &all(&add1);
    assert_eq!(add1.status.code(), Some(0), "{}", all(&add1));

    let status = kt(&data, &["secrets", "status", "--config", seed], None);
    transcript += &all(&status);
    assert_eq!(status.status.code(), Some(0), "{}", all(&status));
    let s = all(&status);
    assert!(s.contains("openai-2026q2") && s.contains("store"), "{s}");
    assert!(s.contains("openai-2026q1") && s.contains("keychain"), "{s}");

    let json = kt(
        &data,
        &["--output", "json", "secrets", "status", "--config", seed],
        None,
    );
    transcript += &all(&json);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status JSON");
    assert!(v.to_string().contains("keychain"), "{v}");

    let check = kt(
        &data,
        &["gateway", "check", "--config", seed, "--verbose"],
        None,
    );
    transcript += &all(&check);
    assert_eq!(check.status.code(), Some(0), "{}", all(&check));
    assert!(all(&check).contains("would start"));

    let list = kt(&data, &["secrets", "list"], None);
    transcript += &all(&list);
    assert_eq!(list.status.code(), Some(0));

    for secret in [Q1, Q2] {
        assert!(
            !transcript.contains(secret),
            "a secret value was printed:\n{transcript}"
        );
        assert!(
            !transcript.contains(&secret[..20]),
            "a secret prefix was printed"
        );
    }
    // Nor is it anywhere on disk in plain text.
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap();
        for secret in [Q1, Q2] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a value in plain text",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
