//! `kt gateway check` as a user runs it: exit codes, messages, JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KT: &str = env!("CARGO_BIN_EXE_kt");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn kt(args: &[&str], envs: &[(&str, &str)], data_dir: &Path) -> Output {
    let mut cmd = Command::new(KT);
    cmd.args(args)
        .env("KT_DATA_DIR", data_dir)
        .env_remove("OPENAI_API_KEY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("running kt")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kt-cli-check-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn seed_config_without_the_required_secret_exits_1_naming_it() {
    let data = temp_dir("seed");
    let seed = repo("config/provider-key-rotation.yaml");
    let out = kt(
        &["gateway", "check", "--config", seed.to_str().unwrap()],
        &[],
        &data,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("OPENAI_API_KEY_2026Q2"), "{t}");
    assert!(
        t.contains("kt secrets add OPENAI_API_KEY_2026Q2 --store"),
        "{t}"
    );
    assert!(t.contains("would NOT start"), "{t}");
}

#[test]
fn required_env_reference_that_is_set_exits_0_without_showing_the_value() {
    let data = temp_dir("env");
    let cfg = repo("config/env-reference.yaml");
    let secret = "sk-test-value-that-must-never-print-123456";
    let out = kt(
        &[
            "gateway",
            "check",
            "--verbose",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[("OPENAI_API_KEY", secret)],
        &data,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains(secret));
    assert!(text(&out).contains("would start"));

    let json = kt(
        &[
            "--output",
            "json",
            "gateway",
            "check",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[("OPENAI_API_KEY", secret)],
        &data,
    );
    assert_eq!(json.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one JSON document");
    assert_eq!(v["would_start"], true);
    assert_eq!(v["targets"][0]["source"], "env");
    assert!(!text(&json).contains(secret));
}

fn check_file(name: &str, yaml: &str) -> Output {
    let dir = temp_dir(name);
    let path = dir.join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    kt(
        &["gateway", "check", "--config", path.to_str().unwrap()],
        &[],
        &dir,
    )
}

#[test]
fn malformed_yaml_wrong_type_and_unknown_key_exit_1_with_line_and_column() {
    let cases = [
        ("malformed", "providers:\n  targets: [\n", "bad.yaml:"),
        ("wrongtype", "providers:\n  targets: 5\n", "bad.yaml:2:12"),
        (
            "unknown",
            "providers:\n  targets:\n    - id: a\n      provider: openai\n      secret_key_ref: {env: A}\n      colour: red\n",
            "bad.yaml:6:7",
        ),
    ];
    for (name, yaml, position) in cases {
        let out = check_file(name, yaml);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {t}");
        assert!(t.contains(position), "{name}: expected {position} in:\n{t}");
        assert!(!t.contains("panicked"), "{name}: {t}");
        assert!(t.lines().count() < 25, "{name}: not one screen:\n{t}");
    }
}

#[test]
fn a_missing_config_file_is_a_command_failure_exit_2() {
    let data = temp_dir("missing");
    let out = kt(
        &["gateway", "check", "--config", "/nonexistent/kt.yaml"],
        &[],
        &data,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("/nonexistent/kt.yaml"));
}

/// `kt ... | head` closes stdout before kt is done writing: every command
/// ends with exit 0 and no error, never a panic.
#[test]
fn a_closed_stdout_is_success_for_every_command() {
    let data = temp_dir("closed-stdout");
    let seed = repo("config/provider-key-rotation.yaml");
    let commands: [&[&str]; 5] = [
        &["ca", "path"],
        &["ca", "export"],
        &["secrets", "list"],
        &["--output", "json", "secrets", "list"],
        &["gateway", "check", "--config", seed.to_str().unwrap()],
    ];
    for args in commands {
        let mut child = Command::new(KT)
            .args(args)
            .env("KT_DATA_DIR", &data)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running kt");
        // The reader is gone before kt writes a byte.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("error") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
