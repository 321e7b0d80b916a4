//! The real provider SDKs the tests drive kt with (`tests/tests/sdk.rs`):
//! a Python venv with `openai`, `anthropic`, `google-genai`, `groq`,
//! `mistralai`, `cohere`, `huggingface_hub` and `boto3` (Bedrock API keys
//! need botocore ≥ 1.39) at pinned versions, made once and cached under `~/.cache/kt/sdk-venv` (or
//! `$KT_SDK_VENV`). When it cannot be made (no Python, no PyPI), setup goes
//! on and writes the reason next to the venv: the SDK tests print it and
//! skip, instead of passing in silence.

use std::path::PathBuf;
use std::process::Command;

use super::setup::step;

/// The SDKs, pinned: a new release must not change what the tests prove
/// without a commit saying so.
pub const PACKAGES: [&str; 9] = [
    "openai==3.51.0",
    "anthropic==2.10.0",
    "google-genai==3.3.0",
    "groq==1.7.0",
    "mistralai==3.7.0",
    "cohere==7.3.1",
    "huggingface_hub==2.4.0",
    "boto3==1.44.5",
    "botocore==1.44.5",
];

/// Where the venv is (`$KT_SDK_VENV`, else `~/.cache/kt/sdk-venv`); the
/// tests look in the same place.
pub fn venv_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KT_SDK_VENV") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/kt/sdk-venv")
}

/// The file holding why the venv could not be made.
fn reason_file() -> PathBuf {
    venv_dir().with_extension("unavailable")
}

/// Makes (or checks) the venv. Never fails setup.
pub fn venv() {
    let dir = venv_dir();
    let python = dir.join("bin/python");
    let marker = dir.join("kt-packages.txt");
    let wanted = PACKAGES.join("\n");
    let have = std::fs::read_to_string(&marker).unwrap_or_default();
    if python.exists() && have == wanted {
        step("sdk venv", &format!("{} present", dir.display()));
        return;
    }
    step(
        "sdk venv",
        &format!("making {} ({})", dir.display(), PACKAGES.join(" ")),
    );
    let made = (|| -> Result<(), String> {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(3).collect();
                Err(format!("{what} failed: {}", tail.join(" / ")))
            }
        };
        if !python.exists() {
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&dir),
                "python3 -m venv (needs python3 and its venv module, Debian: python3-venv)",
            )?;
        }
        let mut pip = Command::new(dir.join("bin/pip"));
        pip.args(["install", "-q", "--disable-pip-version-check"])
            .args(PACKAGES);
        run(&mut pip, "pip install")?;
        std::fs::write(&marker, &wanted).map_err(|e| format!("{}: {e}", marker.display()))?;
        Ok(())
    })();
    match made {
        Ok(()) => {
            let _ = std::fs::remove_file(reason_file());
            step("sdk venv", "ready");
        }
        Err(why) => {
            step(
                "sdk venv",
                &format!("NOT made ({why}); the SDK tests will say so and skip"),
            );
            let _ = std::fs::write(reason_file(), &why);
        }
    }
}
