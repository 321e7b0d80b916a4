//! `kt service install|uninstall`: the dry run prints the unit and the
//! systemctl commands and changes nothing; under a test root the unit and
//! the GitHub runner drop-ins are written, `systemd-analyze verify` accepts
//! the unit, and uninstall removes exactly what install wrote. Nothing here
//! touches /etc/systemd or runs systemctl: this machine is shared.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KT: &str = env!("CARGO_BIN_EXE_kt-under-test");
const SYSTEM_UNIT: &str = "/etc/systemd/system/kt.service";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn config() -> PathBuf {
    repo().join("config/provider-key-rotation.yaml")
}

fn kt(args: &[&str]) -> Output {
    Command::new(KT)
        .args(args)
        .env("KT_LOG", "warn")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The state of the real unit path, to show a dry run left it alone.
fn system_unit_state() -> Option<(u64, std::time::SystemTime)> {
    std::fs::metadata(SYSTEM_UNIT)
        .ok()
        .map(|m| (m.len(), m.modified().unwrap()))
}

#[test]
fn dry_run_install_prints_the_unit_and_the_commands_and_changes_nothing() {
    let before = system_unit_state();
    let config = config();
    let out = kt(&[
        "service",
        "install",
        "--dry-run",
        "--config",
        config.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let exe = std::fs::canonicalize(KT).unwrap();
    for want in [
        "dry run: nothing is changed".to_string(),
        format!("would write {SYSTEM_UNIT} (mode 0644):"),
        format!(
            "    ExecStart={} run --keep-attached --config {}",
            exe.display(),
            config.display()
        ),
        "    Before=gitlab-runner.service buildkite-agent.service".into(),
        "    After=network-online.target".into(),
        "    ExecReload=/bin/kill -HUP $MAINPID".into(),
        "    Restart=always".into(),
        "would run: systemctl daemon-reload".into(),
        "would run: systemctl enable kt.service".into(),
        "would run: systemctl restart kt.service".into(),
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&want)),
            "missing {want:?} in:\n{stdout}"
        );
    }
    assert_eq!(system_unit_state(), before, "a dry run wrote the unit");

    let out = kt(&[
        "service",
        "install",
        "--dry-run",
        "--no-start",
        "--config",
        config.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("would run: systemctl enable kt.service"));
    assert!(
        !stdout.contains("systemctl restart"),
        "--no-start still starts:\n{stdout}"
    );
}

#[test]
fn dry_run_uninstall_stops_before_removing_and_changes_nothing() {
    let before = system_unit_state();
    let out = kt(&["service", "uninstall", "--dry-run"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let pos = |s: &str| {
        stdout
            .find(s)
            .unwrap_or_else(|| panic!("missing {s:?} in:\n{stdout}"))
    };
    assert!(pos("would run: systemctl stop kt.service") < pos("would run: systemctl disable"));
    assert!(pos("would run: systemctl disable kt.service") < pos("systemctl daemon-reload"));
    assert_eq!(system_unit_state(), before);
}

#[test]
fn dry_run_json_is_the_plan() {
    let config = config();
    let out = kt(&[
        "--output",
        "json",
        "service",
        "install",
        "--dry-run",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["write"][0]["path"], SYSTEM_UNIT);
    assert!(
        plan["write"][0]["text"]
            .as_str()
            .unwrap()
            .contains("[Install]\nWantedBy=multi-user.target\n")
    );
    assert_eq!(
        plan["run_after"][1],
        serde_json::json!(["systemctl", "enable", "kt.service"])
    );
}

#[test]
fn install_under_a_root_orders_kt_before_runners_and_uninstall_removes_it() {
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    // A registered GitHub runner, as its svc.sh names it.
    let runner = "actions.runner.acme-app.ci-1.service";
    std::fs::write(
        units.join(runner),
        "[Unit]\nDescription=runner\n[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    let config = config();
    let out = kt(&[
        "service",
        "install",
        "--no-start",
        "--root",
        root.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let unit_path = units.join("kt.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let mode = std::fs::metadata(&unit_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    assert!(
        unit.contains(&format!(
            "\nBefore=gitlab-runner.service buildkite-agent.service {runner}\n"
        )),
        "{unit}"
    );
    let drop_in = units.join(format!("{runner}.d/kt.conf"));
    let drop_in_text = std::fs::read_to_string(&drop_in).unwrap();
    assert!(
        drop_in_text.contains("\nAfter=kt.service\n"),
        "{drop_in_text}"
    );
    assert!(
        drop_in_text.contains("\nWants=kt.service\n"),
        "{drop_in_text}"
    );

    verify(&unit_path);

    let out = kt(&[
        "service",
        "uninstall",
        "--root",
        root.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!unit_path.exists(), "the unit is still there");
    assert!(!drop_in.exists(), "the drop-in is still there");
    assert!(
        !drop_in.parent().unwrap().exists(),
        "the emptied drop-in directory is still there"
    );
    assert!(
        units.join(runner).exists(),
        "uninstall removed the runner's unit"
    );
}

/// `systemd-analyze verify` on the unit, when systemd-analyze exists.
fn verify(unit: &Path) {
    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            guard_tests::skipped(
                "service: systemd-analyze verify",
                &format!("systemd-analyze cannot run ({e}); install systemd"),
            );
            return;
        }
    };
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify rejects the unit:\n{stderr}\n{}",
        std::fs::read_to_string(unit).unwrap()
    );
    // verify exits 0 on some complaints (unknown keys): none allowed.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("kt.service"))
        .collect();
    assert!(complaints.is_empty(), "{stderr}");
}

#[test]
fn install_refuses_a_policy_that_is_all_comments() {
    let root = tempfile::tempdir().unwrap();
    // The default the .deb installs.
    let policy = repo().join("xtask/deb/policy.yaml");
    let out = kt(&[
        "service",
        "install",
        "--no-start",
        "--root",
        root.path().to_str().unwrap(),
        "--config",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not installing"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !root.path().join("etc/systemd/system/kt.service").exists(),
        "a unit was written for a policy that cannot run"
    );
}

#[test]
fn the_default_policy_is_all_comments_and_its_example_is_valid() {
    let text = std::fs::read_to_string(repo().join("xtask/deb/policy.yaml")).unwrap();
    assert!(
        text.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "a line of the default policy is live: installing the package would configure kt"
    );
    // The commented example, uncommented, is a policy kt accepts.
    let example: String = text
        .lines()
        .skip_while(|l| *l != "# pack:")
        .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or("")))
        .collect();
    assert!(example.starts_with("pack:\n"), "{example}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, &example).unwrap();
    if let Err(e) = guard::config::load(&path) {
        panic!("the example policy does not load: {e}\n{example}");
    }
}
