//! Plugins' shared state: entries with versions (for compare-and-swap) and
//! atomic counters that may expire, scoped to (service, plugin name)
//! ([`wasmesh_state`], shared with the SDK's test host). Lives outside
//! config snapshots, so every instance sees it and it survives a plugin
//! upgrade. Here: the scopes, the clock they run on, and the counter
//! increments a request holds.

// foldhash: the scope map is looked up on every plugin instance build.
use foldhash::HashMap;
use std::sync::{Arc, Mutex};

pub use wasmesh_state::{
    KEY_CAP, KEY_LEN_CAP, Scope, StateError, VALUE_CAP, WhenFull, WriteOptions, Written,
};

/// The clock shared state runs on: ms on the proxy's monotonic clock (the
/// one `monotonic-ns` reads), the same for every instance.
pub fn now() -> u64 {
    super::host::process_start().elapsed().as_millis() as u64
}

/// Counter increments a request holds (`counter-hold`): undone when the
/// request's data is dropped, which is after every `on-complete` hook — or
/// whenever the request ends, however it ends.
#[derive(Debug, Default)]
pub struct Holds(Vec<(Arc<Scope>, Arc<str>, i64)>);

impl Holds {
    /// Add `delta` to `key` in `scope` until the request ends.
    /// (A key given as `Arc<str>` is kept without a copy.)
    pub fn hold<K: AsRef<str> + Into<Arc<str>>>(
        &mut self,
        scope: &Arc<Scope>,
        key: K,
        delta: i64,
    ) -> Result<i64, StateError> {
        let n = scope.counter_add(key.as_ref(), delta, WriteOptions::default(), now())?;
        self.0.push((scope.clone(), key.into(), delta));
        Ok(n.value)
    }

    /// Add `delta` to `key` in `scope` until the request ends, only if the
    /// counter stays at most `limit` ([`Scope::counter_add_within`]).
    pub fn hold_within<K: AsRef<str> + Into<Arc<str>>>(
        &mut self,
        scope: &Arc<Scope>,
        key: K,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError> {
        let n = scope.counter_add_within(key.as_ref(), delta, limit, now())?;
        if n.is_some() {
            self.0.push((scope.clone(), key.into(), delta));
        }
        Ok(n)
    }

    /// Undo every held increment now.
    pub fn release(&mut self) {
        if self.0.is_empty() {
            // Most requests hold nothing: no clock read.
            return;
        }
        let now = now();
        for (scope, key, delta) in self.0.drain(..) {
            scope.counter_release(&key, delta, now);
        }
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        self.release();
    }
}

/// All scopes.
#[derive(Debug, Default)]
pub struct StateStore {
    scopes: Mutex<HashMap<(String, String), Arc<Scope>>>,
}

impl StateStore {
    /// The scope of (service, plugin name), created on first use.
    pub fn scope(&self, service: &str, plugin: &str) -> Arc<Scope> {
        self.scopes
            .lock()
            .unwrap()
            .entry((service.to_string(), plugin.to_string()))
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_undone_when_dropped() {
        let s = Arc::new(Scope::default());
        let mut holds = Holds::default();
        assert_eq!(holds.hold(&s, "pending", 1), Ok(1));
        assert_eq!(holds.hold(&s, "pending", 2), Ok(3));
        s.counter_add("pending", 10, WriteOptions::default(), now())
            .unwrap();
        drop(holds);
        assert_eq!(s.counter_get("pending", now()), 10);
        let mut holds = Holds::default();
        assert_eq!(holds.hold(&s, "", 1), Err(StateError::BadKey));
        holds.release();
        assert_eq!(s.counter_get("pending", now()), 10);
    }

    #[test]
    fn a_hold_within_a_limit_is_refused_past_it_and_undone_when_dropped() {
        let s = Arc::new(Scope::default());
        let mut a = Holds::default();
        let mut b = Holds::default();
        assert_eq!(a.hold_within(&s, "retries", 1, 2), Ok(Some(1)));
        assert_eq!(b.hold_within(&s, "retries", 1, 2), Ok(Some(2)));
        assert_eq!(b.hold_within(&s, "retries", 1, 2), Ok(None));
        assert_eq!(s.counter_get("retries", now()), 2);
        drop(a);
        assert_eq!(s.counter_get("retries", now()), 1);
        drop(b);
        assert_eq!(s.counter_get("retries", now()), 0);
    }
}
