//! How each target's `secret_key_ref` resolves, and the one message for a
//! target whose secret does not: used by the gateway builder (a required
//! target stops startup), `kt gateway check` and `kt secrets status`, so all
//! three say the same thing and give the same fix. `kt secrets status` adds
//! each target's retirement evidence from the event store
//! ([`StatusReport::add_evidence`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::{Fingerprint, Fingerprinter, Resolve, Resolved};
use crate::config::{Config, SecretKeyRef, Target};
use crate::events::{EventError, EventStore, LastProbe, ProcessUsage, RotationAlarm};

/// Why a target's secret is not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// Nothing under that name.
    NotSet,
    /// A backend failed (damaged store, keyring refused, not UTF-8).
    Unreadable(String),
    /// The central store has not confirmed the value for longer than
    /// `max_stale`: it is not used (fail closed), not kept.
    Expired(String),
}

/// A target whose managed key does not resolve. Its `Display` is the one
/// message: `target ID: secret REF is not set; add it with ...`, followed by
/// `(optional target skipped)` for optional targets. Never holds a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetProblem {
    /// The target's `id`.
    pub target: String,
    /// Its `secret_key_ref`.
    pub reference: SecretKeyRef,
    /// The target's `required` flag.
    pub required: bool,
    /// What went wrong.
    pub cause: Unresolved,
}

impl fmt::Display for TargetProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "target {}: secret {} ", self.target, self.reference)?;
        match (&self.cause, &self.reference) {
            (Unresolved::NotSet, SecretKeyRef::File(_)) => f.write_str("is empty")?,
            (Unresolved::NotSet, _) => f.write_str("is not set")?,
            (Unresolved::Unreadable(e), _) => write!(f, "cannot be read ({e})")?,
            (Unresolved::Expired(e), _) => write!(f, "is no longer served ({e})")?,
        }
        match &self.reference {
            SecretKeyRef::Store(n) => write!(f, "; add it with `kt secrets add {n} --store`")?,
            SecretKeyRef::Env(n) => write!(
                f,
                "; set {n} in the guard's environment or add it with \
                 `kt secrets add {n} --store` (and reference it as `store: {n}`)"
            )?,
            SecretKeyRef::File(p) => write!(
                f,
                "; the file must hold the key (a trailing newline is ignored), belong to \
                 kt's user or root and be writable by no one else; check what writes {}",
                p.display()
            )?,
        }
        if !self.required {
            f.write_str(" (optional target skipped)")?;
        }
        Ok(())
    }
}

impl Serialize for TargetProblem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Resolves one target's managed key.
pub fn resolve_target(target: &Target, resolver: &dyn Resolve) -> Result<Resolved, TargetProblem> {
    let cause = match resolver.resolve_checked(&target.secret_key_ref) {
        Ok(Some(resolved)) => return Ok(resolved),
        Ok(None) => Unresolved::NotSet,
        Err(e) => e,
    };
    Err(TargetProblem {
        target: target.id.clone(),
        reference: target.secret_key_ref.clone(),
        required: target.required,
        cause,
    })
}

/// How one target's secret resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// A value was found.
    Resolved,
    /// Nothing under that name.
    Missing,
    /// A backend failed (damaged store, keyring refused).
    Error,
}

/// One target of a [`StatusReport`]. Carries a fingerprint, never the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetStatus {
    /// The target's `id`.
    pub id: String,
    /// The provider's name.
    #[serde(skip)]
    pub provider: String,
    /// The reference as written, e.g. `store:OPENAI_API_KEY_2026Q2`.
    pub reference: String,
    /// The target's `required` flag.
    pub required: bool,
    /// Resolved, missing or error.
    pub state: TargetState,
    /// Where it resolved (`env`, `store`, `keychain`).
    pub source: Option<&'static str>,
    /// Fingerprint of the resolved value (`None` without a host key).
    pub fingerprint: Option<Fingerprint>,
    /// Why it did not resolve, and how to fix it.
    #[serde(rename = "reason")]
    pub problem: Option<TargetProblem>,
    /// Requests this target served in the last 24 hours (probes not
    /// counted); `None` when there is no event store.
    pub served_24h: Option<u64>,
    /// Processes that presented this target's secret in the last 7 days,
    /// most recent first: who still uses this key.
    pub presented_by: Vec<ProcessUsage>,
    /// The last rotation alarm this target was part of (it rejected its
    /// key, or served because another one did).
    pub last_rotation_alarm: Option<RotationAlarm>,
    /// Its last recorded credential probe and the result.
    pub last_verified: Option<LastProbe>,
    /// Reloads in the last 24 hours that kept serving this target's previous
    /// key because its secret could not be read (never downgraded to
    /// nothing).
    pub secret_kept_24h: Option<u64>,
}

/// How far back [`TargetStatus::served_24h`] counts.
pub const SERVED_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// How far back [`TargetStatus::presented_by`] looks: longer than a day, so
/// a weekly job still using an old key is found before the key is removed.
pub const PRESENTED_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// How every target of a config resolves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// The config file.
    pub config: PathBuf,
    /// One row per target, in config order.
    pub targets: Vec<TargetStatus>,
}

impl StatusReport {
    /// Resolves every target of `config`. `fingerprinter` is `None` when the
    /// host has no fingerprint key yet (read-only callers never create it):
    /// then no fingerprints are shown.
    pub fn build(
        config: &Config,
        resolver: &dyn Resolve,
        fingerprinter: Option<&Fingerprinter>,
    ) -> StatusReport {
        let targets = config
            .providers
            .targets
            .iter()
            .map(|target| {
                let mut row = TargetStatus {
                    id: target.id.clone(),
                    provider: target.provider.name().to_string(),
                    reference: target.secret_key_ref.to_string(),
                    required: target.required,
                    state: TargetState::Resolved,
                    source: None,
                    fingerprint: None,
                    problem: None,
                    served_24h: None,
                    presented_by: Vec::new(),
                    last_rotation_alarm: None,
                    last_verified: None,
                    secret_kept_24h: None,
                };
                match resolve_target(target, resolver) {
                    Ok(resolved) => {
                        row.source = Some(resolved.source.name());
                        row.fingerprint =
                            fingerprinter.map(|fp| fp.fingerprint(resolved.value.expose()));
                    }
                    Err(problem) => {
                        row.state = match problem.cause {
                            Unresolved::NotSet => TargetState::Missing,
                            Unresolved::Unreadable(_) | Unresolved::Expired(_) => {
                                TargetState::Error
                            }
                        };
                        row.problem = Some(problem);
                    }
                }
                row
            })
            .collect();
        StatusReport {
            config: config.source.clone(),
            targets,
        }
    }

    /// Fills each target's retirement evidence from `store`: requests
    /// served in the last [`SERVED_WINDOW`], processes that presented its
    /// secret (by the name events give it, see
    /// [`known_keys`](super::known_keys)) in the last [`PRESENTED_WINDOW`],
    /// its last rotation alarm and its last probe.
    pub fn add_evidence(&mut self, config: &Config, store: &EventStore) -> Result<(), EventError> {
        for (row, target) in self.targets.iter_mut().zip(&config.providers.targets) {
            let e = store.target_evidence(
                &target.id,
                &target.secret_key_ref.name(),
                SERVED_WINDOW,
                PRESENTED_WINDOW,
            )?;
            row.served_24h = Some(e.served);
            row.presented_by = e.presented_by;
            row.last_rotation_alarm = e.last_rotation_alarm;
            row.last_verified = e.last_verified;
            row.secret_kept_24h = Some(e.secret_kept);
        }
        Ok(())
    }

    /// True when every `required` target resolved.
    pub fn ok(&self) -> bool {
        self.targets
            .iter()
            .all(|t| !t.required || t.state == TargetState::Resolved)
    }

    /// The problems of targets that do not resolve, in config order.
    pub fn problems(&self) -> impl Iterator<Item = &TargetProblem> {
        self.targets.iter().filter_map(|t| t.problem.as_ref())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{Capture, GatewaySettings, Pack, Provider, Providers, RoutingStrategy};
    use crate::secrets::{FileStore, Resolver, SecretStore, SecretValue, Source};

    pub(crate) fn target(id: &str, reference: SecretKeyRef, required: bool) -> Target {
        Target {
            id: id.to_string(),
            provider: Provider::OpenAi,
            model: None,
            required,
            secret_key_ref: reference,
            base_url: None,
        }
    }

    pub(crate) fn config(targets: Vec<Target>) -> Config {
        Config {
            source: PathBuf::from("policy-config.yaml"),
            pack: Pack {
                name: "test".into(),
                version: "1".into(),
                enabled: true,
            },
            providers: Providers {
                strategy: RoutingStrategy::Ordered,
                fallback: true,
                targets,
            },
            chain: Vec::new(),
            dlp: None,
            audit: None,
            gateway: GatewaySettings::default(),
            capture: Capture::default(),
            secrets: Default::default(),
        }
    }

    #[test]
    fn rows_say_where_each_secret_resolved_and_how_to_fix_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("Q2", &SecretValue::new("sk-q2")).unwrap();
        let resolver = Resolver::with_stores(vec![std::sync::Arc::new(store)]);
        let fp = Fingerprinter::from_key([3; 32]);
        let cfg = config(vec![
            target("primary", SecretKeyRef::Store("Q2".into()), true),
            target("backup", SecretKeyRef::Store("Q1".into()), false),
            target(
                "envkey",
                SecretKeyRef::Env("KT_TEST_UNSET_ENV_KEY".into()),
                false,
            ),
        ]);
        let report = StatusReport::build(&cfg, &resolver, Some(&fp));
        assert!(report.ok(), "only optional targets are missing");
        let t = &report.targets;
        assert_eq!(t[0].state, TargetState::Resolved);
        assert_eq!(t[0].source, Some("store"));
        assert_eq!(t[0].fingerprint, Some(fp.fingerprint("sk-q2")));
        assert_eq!(t[0].provider, "openai");
        assert_eq!(t[1].reference, "store:Q1");
        assert_eq!(t[1].state, TargetState::Missing);
        assert_eq!(
            t[1].problem.as_ref().unwrap().to_string(),
            "target backup: secret store:Q1 is not set; add it with \
             `kt secrets add Q1 --store` (optional target skipped)"
        );
        let env = t[2].problem.as_ref().unwrap().to_string();
        assert!(
            env.starts_with("target envkey: secret env:KT_TEST_UNSET_ENV_KEY is not set; set KT_TEST_UNSET_ENV_KEY in the guard's environment"),
            "{env}"
        );
        assert_eq!(report.problems().count(), 2);

        // Without a host key: resolved, but no fingerprint.
        let report = StatusReport::build(&cfg, &resolver, None);
        assert_eq!(report.targets[0].state, TargetState::Resolved);
        assert_eq!(report.targets[0].fingerprint, None);

        let cfg = config(vec![
            target("primary", SecretKeyRef::Store("Q2".into()), true),
            target("must", SecretKeyRef::Store("Q1".into()), true),
        ]);
        let report = StatusReport::build(&cfg, &resolver, Some(&fp));
        assert!(!report.ok());
        let doc = serde_json::to_value(&report).unwrap();
        assert_eq!(doc["targets"][0]["state"], "resolved");
        assert_eq!(
            doc["targets"][0]["fingerprint"],
            fp.fingerprint("sk-q2").to_string()
        );
        assert_eq!(doc["targets"][1]["state"], "missing");
        assert_eq!(doc["targets"][1]["required"], true);
        assert_eq!(
            doc["targets"][1]["reason"],
            "target must: secret store:Q1 is not set; add it with `kt secrets add Q1 --store`"
        );
    }

    #[test]
    fn a_damaged_store_is_an_error_row_not_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.put("Q2", &SecretValue::new("sk-q2")).unwrap();
        std::fs::write(store.store_path(), b"KTSTORE1 not really").unwrap();
        let resolver = Resolver::from_data_dir(dir.path());
        let cfg = config(vec![target("p", SecretKeyRef::Store("Q2".into()), true)]);
        let report = StatusReport::build(&cfg, &resolver, Some(&Fingerprinter::from_key([0; 32])));
        assert_eq!(report.targets[0].state, TargetState::Error);
        let why = report.targets[0].problem.as_ref().unwrap().to_string();
        assert!(
            why.starts_with("target p: secret store:Q2 cannot be read ("),
            "{why}"
        );
        assert!(why.contains("integrity"), "{why}");
        assert!(!report.ok());
    }

    #[test]
    fn a_resolved_target_hands_over_its_value() {
        let resolver = Resolver::with_stores(vec![std::sync::Arc::new(
            crate::secrets::MemoryStore::with_entries(Source::Store, [("K", "sk-k")]).unwrap(),
        )]);
        let t = target("a", SecretKeyRef::Store("K".into()), true);
        let got = resolve_target(&t, &resolver).unwrap();
        assert_eq!(got.value.expose(), "sk-k");
        let t = target("b", SecretKeyRef::Store("NOPE".into()), true);
        let problem = resolve_target(&t, &resolver).unwrap_err();
        assert_eq!(problem.cause, Unresolved::NotSet);
        assert!(!format!("{problem:?}{problem}").contains("sk-k"));
    }
}
