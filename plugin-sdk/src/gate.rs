//! Which attempts a plugin's `on_response` is called for, decided the same
//! way by every host of plugins: the proxy and the test harness
//! ([`crate::testing::Harness`]).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use crate::types::Outcomes;

/// Endpoints remembered for [`Outcomes::NEXT_ON_ENDPOINT`] before the
/// memory is cleared (clearing only makes the next outcome on each endpoint
/// be passed on once more).
const MAX_ENDPOINTS: usize = 4096;

/// A plugin's answer to [`crate::Plugin::response_outcomes`], applied to
/// each attempt. One gate serves every instance of one configured plugin.
#[derive(Debug)]
pub struct OutcomeGate {
    wanted: Outcomes,
    /// With [`Outcomes::NEXT_ON_ENDPOINT`]: endpoints whose last outcome
    /// was passed on though not asked for, so the next one is held back
    /// unless asked for. An endpoint not here gets its next outcome passed.
    quiet: Mutex<HashSet<Box<str>>>,
}

impl OutcomeGate {
    /// A gate passing the outcomes in `wanted`.
    pub fn new(wanted: Outcomes) -> Self {
        Self {
            wanted,
            quiet: Mutex::default(),
        }
    }

    /// What it passes.
    pub fn wanted(&self) -> Outcomes {
        self.wanted
    }

    /// Whether it passes every outcome (no check needed).
    pub fn passes_all(&self) -> bool {
        self.wanted.contains(Outcomes::ALL)
    }

    /// Whether `on_response` is called for an attempt that ended with an
    /// outcome of kind `kind` on `endpoint` (when one was picked). With
    /// [`Outcomes::NEXT_ON_ENDPOINT`] this also remembers the endpoint's
    /// outcome, so call it once per attempt.
    pub fn passes(&self, kind: Outcomes, endpoint: Option<&str>) -> bool {
        let hit = self.wanted.intersects(kind);
        let Some(endpoint) = endpoint.filter(|_| self.wanted.contains(Outcomes::NEXT_ON_ENDPOINT))
        else {
            return hit;
        };
        let mut quiet = self.quiet.lock().unwrap_or_else(PoisonError::into_inner);
        if hit {
            quiet.remove(endpoint);
            true
        } else if quiet.contains(endpoint) {
            false
        } else {
            if quiet.len() >= MAX_ENDPOINTS {
                quiet.clear();
            }
            quiet.insert(endpoint.into());
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_passes_the_kinds_asked_for() {
        let g = OutcomeGate::new(Outcomes::STATUS_5XX | Outcomes::RESET);
        assert!(g.passes(Outcomes::status(503), Some("a:1")));
        assert!(g.passes(Outcomes::status(600), Some("a:1")));
        assert!(g.passes(Outcomes::RESET, None));
        assert!(!g.passes(Outcomes::status(200), Some("a:1")));
        assert!(!g.passes(Outcomes::status(404), None));
        assert!(!g.passes(Outcomes::TIMEOUT, Some("a:1")));
        assert!(OutcomeGate::new(Outcomes::ALL).passes_all());
        assert!(!g.passes_all());
    }

    #[test]
    fn next_on_endpoint_passes_the_outcome_after_a_wanted_one_on_that_endpoint() {
        let g = OutcomeGate::new(Outcomes::STATUS_5XX | Outcomes::NEXT_ON_ENDPOINT);
        let ok = Outcomes::status(200);
        let err = Outcomes::status(500);
        // The first outcome on an endpoint not seen yet is passed, then
        // successes are held back.
        assert!(g.passes(ok, Some("a:1")));
        assert!(!g.passes(ok, Some("a:1")));
        // A failure, then the success that ends the run, then quiet again.
        assert!(g.passes(err, Some("a:1")));
        assert!(g.passes(err, Some("a:1")));
        assert!(g.passes(ok, Some("a:1")));
        assert!(!g.passes(ok, Some("a:1")));
        // Per endpoint: b's failure does not pass a's next success.
        assert!(g.passes(ok, Some("b:1")));
        assert!(g.passes(err, Some("b:1")));
        assert!(!g.passes(ok, Some("a:1")));
        assert!(g.passes(ok, Some("b:1")));
        // No endpoint: only what was asked for.
        assert!(!g.passes(ok, None));
        assert!(g.passes(err, None));
    }
}
