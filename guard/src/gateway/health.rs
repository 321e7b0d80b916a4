//! Passive target health: a target that failed `gateway.cooldown_after`
//! times in a row (connect, TLS, timeout, a broken connection, 500/502/503/504)
//! is skipped for `gateway.cooldown`, so requests stop paying for a dead
//! primary before falling back; then it is tried again. A rejected key
//! (401/403) or a rate limit does not cool a target down: those say
//! something about the key, not the endpoint, and stay visible.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::record::Outcome;

/// A target moved in or out of its cool-down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Failed too often: skipped until the cool-down ends.
    CooledDown,
    /// Answered again after a cool-down.
    Recovered,
}

/// Consecutive failures and cool-downs per target id. The state outlives a
/// reload (a target cooled down stays cooled down); the settings are the
/// generation's.
pub(crate) struct Health {
    after: u32,
    cooldown: Duration,
    state: Arc<Mutex<HashMap<String, State>>>,
}

#[derive(Default)]
struct State {
    failures: u32,
    until: Option<Instant>,
    cooled: bool,
}

impl Health {
    /// `after` consecutive failures start a cool-down of `cooldown`; 0 turns
    /// cool-downs off.
    pub(crate) fn new(after: u32, cooldown: Duration) -> Health {
        Health {
            after,
            cooldown,
            state: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The same per-target state under new settings (a reloaded config).
    pub(crate) fn with_settings(&self, after: u32, cooldown: Duration) -> Health {
        Health {
            after,
            cooldown,
            state: Arc::clone(&self.state),
        }
    }

    /// Whether `target` is in its cool-down now.
    pub(crate) fn cooling(&self, target: &str) -> bool {
        self.after > 0
            && self.state.lock().is_ok_and(|m| {
                m.get(target)
                    .and_then(|s| s.until)
                    .is_some_and(|u| Instant::now() < u)
            })
    }

    /// Records an attempt's outcome; says when the target changed state.
    pub(crate) fn record(&self, target: &str, outcome: &Outcome) -> Option<Transition> {
        if self.after == 0 {
            return None;
        }
        let failed = match outcome {
            Outcome::ConnectFailed
            | Outcome::TlsFailed
            | Outcome::FirstByteTimeout
            | Outcome::UpstreamBroken => true,
            Outcome::Status { status, .. } => matches!(status, 500 | 502 | 503 | 504),
        };
        let mut m = self.state.lock().ok()?;
        let s = m.entry(target.to_string()).or_default();
        if failed {
            s.failures = s.failures.saturating_add(1);
            if s.failures >= self.after {
                s.until = Some(Instant::now() + self.cooldown);
                s.failures = 0;
                if !s.cooled {
                    s.cooled = true;
                    return Some(Transition::CooledDown);
                }
            }
            None
        } else {
            s.failures = 0;
            s.until = None;
            std::mem::take(&mut s.cooled).then_some(Transition::Recovered)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Outcome {
        Outcome::Status {
            status: s,
            retry_after: None,
        }
    }

    #[test]
    fn failures_in_a_row_cool_a_target_down_and_an_answer_brings_it_back() {
        let h = Health::new(2, Duration::from_secs(60));
        assert_eq!(h.record("a", &status(503)), None);
        assert!(!h.cooling("a"));
        assert_eq!(
            h.record("a", &Outcome::ConnectFailed),
            Some(Transition::CooledDown)
        );
        assert!(h.cooling("a"));
        assert!(!h.cooling("b"));
        assert_eq!(h.record("a", &status(200)), Some(Transition::Recovered));
        assert!(!h.cooling("a"));
    }

    #[test]
    fn rejected_keys_rate_limits_and_a_success_between_do_not_count() {
        let h = Health::new(2, Duration::from_secs(60));
        for o in [
            status(401),
            status(403),
            status(429),
            status(503),
            status(200),
            status(503),
        ] {
            assert_eq!(h.record("a", &o), None);
        }
        assert!(!h.cooling("a"));
        let off = Health::new(0, Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(off.record("a", &Outcome::TlsFailed), None);
        }
        assert!(!off.cooling("a"));
    }

    #[test]
    fn a_cool_down_ends_by_itself() {
        let h = Health::new(1, Duration::ZERO);
        assert_eq!(
            h.record("a", &Outcome::TlsFailed),
            Some(Transition::CooledDown)
        );
        assert!(!h.cooling("a"));
    }
}
