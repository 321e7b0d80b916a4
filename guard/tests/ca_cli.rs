//! `kt ca regenerate`: a config that adds a host gets a CA that may issue
//! for it; the old CA is kept aside, and the JSON names what is permitted.

use std::path::Path;
use std::process::Command;

const KT: &str = env!("CARGO_BIN_EXE_kt");

#[test]
fn regenerate_makes_a_ca_for_the_configs_hosts_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("extra.yaml");
    std::fs::write(
        &cfg,
        "providers:\n  targets:\n    - id: local\n      provider: openai\n      base_url: https://llm.internal.example/v1\n      secret_key_ref: {env: LOCAL_KEY}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(KT)
            .args(args)
            .env("KT_DATA_DIR", &data)
            .output()
            .unwrap()
    };
    let first = run(&["ca", "path"]);
    assert!(first.status.success(), "{first:?}");
    let out = run(&[
        "--output",
        "json",
        "ca",
        "regenerate",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let permitted: Vec<&str> = doc["permitted"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(permitted.contains(&"llm.internal.example"), "{doc}");
    assert!(permitted.contains(&"api.openai.com"), "{doc}");
    assert!(Path::new(&data).join("ca/ca.pem.old").exists());
    // A broken config changes nothing and says why.
    std::fs::write(&cfg, "providers: [\n").unwrap();
    let bad = run(&["ca", "regenerate", "--config", cfg.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
}
