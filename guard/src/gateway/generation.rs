//! Live reload of a running gateway: the next generation (config, routes,
//! managed keys, policy chain) is built beside the current one, compared
//! with it, and swapped in with one assignment. Requests already running
//! keep the generation they started with; the listeners, budgets, upstream
//! pool and certificate cache are shared by all generations.

use std::sync::Arc;

use serde::Serialize;

use super::{Gateway, GatewayError, Inner, resolve_keys};
use crate::config::Config;
use crate::policy::Policy;
use crate::record::{Arrival, ClientInfo, PolicyAction};
use crate::routing::Router;
use crate::secrets::Resolve;

/// A generation built and checked, not yet serving.
pub struct Staged {
    inner: Inner,
    diff: ReloadDiff,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("diff", &self.diff)
            .finish_non_exhaustive()
    }
}

impl Staged {
    /// What serving it would change.
    pub fn diff(&self) -> &ReloadDiff {
        &self.diff
    }

    /// Its warnings (optional targets skipped, secrets kept).
    pub fn warnings(&self) -> &[String] {
        &self.inner.warnings
    }
}

/// The generation a swap replaced, to put back when a later step of the
/// same reload fails.
pub struct Previous(Arc<Inner>);

impl std::fmt::Debug for Previous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Previous").field(&self.0.generation).finish()
    }
}

/// What a reload changed. Names and fingerprints' changes only, never a
/// value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReloadDiff {
    /// The generation number being installed (1 is the start).
    pub generation: u64,
    /// Target ids served now and not before.
    pub targets_added: Vec<String>,
    /// Target ids served before and not now.
    pub targets_removed: Vec<String>,
    /// The targets both generations serve are in another order.
    pub reordered: bool,
    /// References (`store:NAME`, `env:NAME`, …) whose value changed, by
    /// fingerprint.
    pub secrets_changed: Vec<String>,
    /// For each of `secrets_changed`, in order: `fp:OLD -> fp:NEW`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fingerprint_changes: Vec<String>,
    /// Targets whose secret could not be read and that keep serving the
    /// value they had.
    pub secrets_kept: Vec<String>,
    /// A setting other than the targets changed (policy, timeouts, capture).
    pub config_changed: bool,
}

impl ReloadDiff {
    /// Nothing a request would notice changed.
    pub fn is_empty(&self) -> bool {
        self.targets_added.is_empty()
            && self.targets_removed.is_empty()
            && !self.reordered
            && self.secrets_changed.is_empty()
            && self.secrets_kept.is_empty()
            && !self.config_changed
    }

    /// One line for logs and events, e.g. `targets +b -a; secrets changed:
    /// store:K`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.targets_added.is_empty() || !self.targets_removed.is_empty() {
            let mut t: Vec<String> = self.targets_added.iter().map(|a| format!("+{a}")).collect();
            t.extend(self.targets_removed.iter().map(|r| format!("-{r}")));
            parts.push(format!("targets {}", t.join(" ")));
        }
        if self.reordered {
            parts.push("targets reordered".to_string());
        }
        if !self.secrets_changed.is_empty() {
            let named: Vec<String> = self
                .secrets_changed
                .iter()
                .enumerate()
                .map(|(i, r)| match self.fingerprint_changes.get(i) {
                    Some(fp) => format!("{r} ({fp})"),
                    None => r.clone(),
                })
                .collect();
            parts.push(format!("secrets changed: {}", named.join(", ")));
        }
        if !self.secrets_kept.is_empty() {
            parts.push(format!(
                "secrets kept from before (unreadable now): {}",
                self.secrets_kept.join(", ")
            ));
        }
        if self.config_changed {
            parts.push("settings changed".to_string());
        }
        if parts.is_empty() {
            "no change".to_string()
        } else {
            parts.join("; ")
        }
    }
}

impl Gateway {
    /// Builds the next generation for `config`: routes, managed keys
    /// (a required secret that does not resolve is an error; one that
    /// fails to read keeps the value it had), `policy`. Nothing changes
    /// until [`Gateway::install`].
    pub fn stage(
        &self,
        config: Arc<Config>,
        resolver: &dyn Resolve,
        policy: Arc<dyn Policy>,
    ) -> Result<Staged, GatewayError> {
        let cur = self.inner();
        let router = Router::new(&config)?;
        let keys = resolve_keys(&router, resolver, Some(&cur))?;
        let health = cur
            .health
            .with_settings(config.gateway.cooldown_after, config.gateway.cooldown);
        let inner = Inner {
            shared: Arc::clone(&cur.shared),
            config,
            router,
            keys: keys.keys,
            policy,
            warnings: keys.warnings,
            health,
            generation: cur.generation + 1,
        };
        let mut diff = diff(&cur, &inner);
        diff.secrets_kept = keys.kept;
        Ok(Staged { inner, diff })
    }

    /// Serves `staged` from the next request on; returns the generation it
    /// replaced.
    pub fn install(&self, staged: Staged) -> Previous {
        self.swap(Arc::new(staged.inner))
    }

    /// Puts back a generation [`Gateway::install`] replaced.
    pub fn restore(&self, previous: Previous) {
        let _ = self.swap(previous.0);
    }

    /// The current generation's number (1 at start, +1 per reload).
    pub fn generation(&self) -> u64 {
        self.inner().generation
    }

    /// Records a reload as an event: who asked (`caller`: uid and pid
    /// when known), whether it was applied, and `summary` (what changed, or
    /// why nothing did). Names only, never a value.
    pub fn record_reload(
        &self,
        caller: ClientInfo,
        applied: bool,
        summary: &str,
        secrets_kept: &[String],
    ) {
        let inner = self.inner();
        let (action, rule) = if applied {
            (PolicyAction::Audit, "reload")
        } else {
            (PolicyAction::Block, "reload-refused")
        };
        let mut rec = inner.guard_record(Arrival::Internal, None, caller, "RELOAD", action, rule);
        rec.path = summary.to_string();
        // One note per target that kept its previous key, for `kt secrets status`.
        for target in secrets_kept {
            rec.policy.push(crate::record::PolicyNote {
                policy: crate::record::PolicyId::Guard,
                action: PolicyAction::Audit,
                rule: crate::record::rules::SECRET_KEPT.to_string(),
                location: Some(target.clone()),
            });
        }
        if !applied {
            rec.error_code = Some(crate::record::codes::RELOAD_REFUSED);
        }
        inner.sink.record(rec);
    }

    /// Records a change in the central secret store's health as an event
    /// (`rule`: one of the `secret-store-*` rules; `summary`: the server and
    /// the problem, never a value).
    pub fn record_secret_store(&self, rule: &str, summary: &str) {
        let inner = self.inner();
        let mut rec = inner.guard_record(
            Arrival::Internal,
            None,
            ClientInfo::default(),
            "SECRET_STORE",
            PolicyAction::Audit,
            rule,
        );
        rec.path = summary.to_string();
        inner.sink.record(rec);
    }

    /// A handle that serves `inner` only (for acting on behalf of a
    /// request's own generation).
    pub(crate) fn pinned(inner: Arc<Inner>) -> Gateway {
        Gateway {
            current: Arc::new(std::sync::RwLock::new(inner)),
        }
    }

    fn swap(&self, next: Arc<Inner>) -> Previous {
        let mut slot = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        Previous(std::mem::replace(&mut *slot, next))
    }
}

/// Whether anything but the targets differs (those are reported one by one).
fn settings_differ(a: &Config, b: &Config) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    a.providers.targets.clear();
    b.providers.targets.clear();
    a != b
}

fn active(inner: &Inner) -> Vec<&str> {
    inner
        .router
        .routes()
        .iter()
        .filter(|r| inner.keys.contains_key(&r.target.id))
        .map(|r| r.target.id.as_str())
        .collect()
}

fn diff(old: &Inner, new: &Inner) -> ReloadDiff {
    let (a, b) = (active(old), active(new));
    let kept_old: Vec<&str> = a.iter().copied().filter(|t| b.contains(t)).collect();
    let kept_new: Vec<&str> = b.iter().copied().filter(|t| a.contains(t)).collect();
    let fp = |inner: &Inner, id: &str| inner.keys.get(id).map(|k| (old.fingerprint)(k.expose()));
    let mut secrets_changed = Vec::new();
    let mut fingerprint_changes = Vec::new();
    for route in new.router.routes() {
        let id = route.target.id.as_str();
        let reference = route.target.secret_key_ref.to_string();
        let (was, now) = (fp(old, id), fp(new, id));
        if a.contains(&id) && was != now && !secrets_changed.contains(&reference) {
            secrets_changed.push(reference);
            let show = |f: Option<String>| f.unwrap_or_else(|| "none".to_string());
            fingerprint_changes.push(format!("{} -> {}", show(was), show(now)));
        }
    }
    ReloadDiff {
        generation: new.generation,
        targets_added: b
            .iter()
            .filter(|t| !a.contains(t))
            .map(ToString::to_string)
            .collect(),
        targets_removed: a
            .iter()
            .filter(|t| !b.contains(t))
            .map(ToString::to_string)
            .collect(),
        reordered: kept_old != kept_new,
        secrets_changed,
        fingerprint_changes,
        secrets_kept: Vec::new(),
        config_changed: settings_differ(&old.config, &new.config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_diff_says_so_and_a_full_one_names_everything() {
        assert_eq!(ReloadDiff::default().summary(), "no change");
        assert!(ReloadDiff::default().is_empty());
        let d = ReloadDiff {
            generation: 2,
            targets_added: vec!["b".into()],
            targets_removed: vec!["a".into()],
            reordered: true,
            secrets_changed: vec!["store:K".into()],
            fingerprint_changes: Vec::new(),
            secrets_kept: vec!["c".into()],
            config_changed: true,
        };
        assert_eq!(
            d.summary(),
            "targets +b -a; targets reordered; secrets changed: store:K; secrets kept from before (unreadable now): c; settings changed"
        );
        assert!(!d.is_empty());
    }
}
