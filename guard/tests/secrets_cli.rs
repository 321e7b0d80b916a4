//! The seed's secrets workflow through the public API only, as the CLI and
//! the gateway use it:
//!
//! ```text
//! kt secrets add OPENAI_API_KEY_2026Q2 --store
//! kt secrets add OPENAI_API_KEY_2026Q1 --keychain
//! kt secrets status --config policy-config.yaml
//! ```
//!
//! Once the `kt` binary is wired, the same steps run end to end through
//! `env!("CARGO_BIN_EXE_kt")`.

use std::path::PathBuf;
use std::time::SystemTime;

use guard::config::{
    Capture, Config, GatewaySettings, Pack, Provider, Providers, RoutingStrategy, SecretKeyRef,
    Target,
};
use guard::secrets::status::{StatusReport, TargetState};
use guard::secrets::{
    FileStore, Fingerprinter, Keychain, Resolve, Resolver, SecretStore, SecretValue, Source,
};

fn target(id: &str, name: &str, required: bool) -> Target {
    Target {
        id: id.to_string(),
        provider: Provider::OpenAi,
        model: Some("gpt-5.4-mini-mini".to_string()),
        required,
        secret_key_ref: SecretKeyRef::Store(name.to_string()),
        base_url: None,
    }
}

fn seed_config(q2: &str, q1: &str) -> Config {
    Config {
        source: PathBuf::from("policy-config.yaml"),
        pack: Pack {
            name: "provider-key-rotation".into(),
            version: "1.0.0".into(),
            enabled: true,
        },
        providers: Providers {
            strategy: RoutingStrategy::Ordered,
            fallback: true,
            targets: vec![
                target("openai-2026q2", q2, true),
                target("openai-2026q1", q1, false),
            ],
        },
        chain: Vec::new(),
        dlp: None,
        audit: None,
        gateway: GatewaySettings::default(),
        capture: Capture::default(),
        secrets: Default::default(),
    }
}

/// Removes the keychain entry even when an assertion fails.
struct KeychainCleanup(Keychain, String);

impl Drop for KeychainCleanup {
    fn drop(&mut self) {
        let _ = self.0.remove(&self.1);
    }
}

#[test]
fn seed_workflow_store_then_keychain_then_status() {
    if let Err(e) = Keychain::probe() {
        panic!("the kernel user keyring is required for this test and is not usable: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    // Unique per run: the user keyring is shared by every process of the uid.
    let q1 = format!("KT_IT_OPENAI_API_KEY_2026Q1_{}_{nanos}", std::process::id());
    let q2 = "OPENAI_API_KEY_2026Q2";
    let config = seed_config(q2, &q1);
    let resolver = Resolver::from_data_dir(data);
    let fp = Fingerprinter::open(data).unwrap();

    // Before anything is added: the required target fails closed.
    let report = StatusReport::build(&config, &resolver, Some(&fp));
    assert!(!report.ok());
    assert_eq!(report.targets[0].state, TargetState::Missing);
    let reason = report.targets[0].problem.as_ref().unwrap().to_string();
    assert!(
        reason.contains("kt secrets add OPENAI_API_KEY_2026Q2 --store"),
        "{reason}"
    );

    FileStore::new(data)
        .put(q2, &SecretValue::new("sk-seed-q2-value"))
        .unwrap();
    let keychain = Keychain::new(data);
    let _cleanup = KeychainCleanup(keychain.clone(), q1.clone());
    keychain
        .put(&q1, &SecretValue::new("sk-seed-q1-value"))
        .unwrap();

    let report = StatusReport::build(&config, &resolver, Some(&fp));
    assert!(report.ok());
    assert_eq!(report.targets[0].source, Some("store"));
    assert_eq!(report.targets[1].source, Some("keychain"));
    assert_eq!(
        report.targets[0].fingerprint,
        Some(fp.fingerprint("sk-seed-q2-value"))
    );

    // The gateway's view: resolve, and match a presented key by fingerprint.
    let resolved = resolver
        .resolve(&SecretKeyRef::Store(q1.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(resolved.source, Source::Keychain);
    let presented = fp.fingerprint("sk-seed-q1-value");
    let known = resolver.known_secrets(&fp).unwrap();
    let matched: Vec<_> = known
        .iter()
        .filter(|k| k.fingerprint == Some(presented))
        .map(|k| k.meta.name.as_str())
        .collect();
    assert_eq!(matched, [q1.as_str()]);

    // Another process (new handles, same data dir) gets the same fingerprints.
    let fp_again = Fingerprinter::open(data).unwrap();
    assert_eq!(
        Some(fp_again.fingerprint("sk-seed-q2-value")),
        report.targets[0].fingerprint
    );
}
