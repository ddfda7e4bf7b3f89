//! Plugins' shared state: entries with versions (for compare-and-swap) and
//! atomic counters, scoped to (service, plugin name). Lives outside config
//! snapshots, so every instance sees it and it survives a plugin upgrade.

// foldhash: these maps are looked up on every request; SipHash cost
// ≈ 1.5k instructions a request across them.
use foldhash::HashMap;
use std::sync::{Arc, Mutex};

/// Largest value of one entry, in bytes.
pub const VALUE_CAP: usize = 64 * 1024;
/// Most keys (entries plus counters) in one scope.
pub const KEY_CAP: usize = 10_000;
/// Longest key, in bytes.
pub const KEY_LEN_CAP: usize = 256;

/// A refused write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// Compare-and-swap lost; the current version.
    Conflict(u64),
    /// Value over [`VALUE_CAP`].
    TooLarge,
    /// Scope full.
    TooManyKeys,
    /// Empty or over-long key.
    BadKey,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, (Arc<[u8]>, u64)>,
    counters: HashMap<String, i64>,
}

/// One (service, plugin) scope.
#[derive(Debug, Default)]
pub struct Scope {
    inner: Mutex<Inner>,
}

impl Scope {
    fn check_key(inner: &Inner, key: &str, exists: bool) -> Result<(), StateError> {
        if key.is_empty() || key.len() > KEY_LEN_CAP {
            return Err(StateError::BadKey);
        }
        if !exists && inner.entries.len() + inner.counters.len() >= KEY_CAP {
            return Err(StateError::TooManyKeys);
        }
        Ok(())
    }

    /// Read an entry: its value and version.
    pub fn get(&self, key: &str) -> Option<(Arc<[u8]>, u64)> {
        self.inner.lock().unwrap().entries.get(key).cloned()
    }

    /// Write an entry, optionally only if its version is `expected`.
    pub fn set(&self, key: &str, value: &[u8], expected: Option<u64>) -> Result<u64, StateError> {
        if value.len() > VALUE_CAP {
            return Err(StateError::TooLarge);
        }
        let mut inner = self.inner.lock().unwrap();
        let current = inner.entries.get(key).map_or(0, |e| e.1);
        Self::check_key(&inner, key, current != 0)?;
        if let Some(v) = expected
            && v != current
        {
            return Err(StateError::Conflict(current));
        }
        let version = current + 1;
        inner
            .entries
            .insert(key.to_string(), (Arc::from(value), version));
        Ok(version)
    }

    /// Remove an entry.
    pub fn delete(&self, key: &str) -> bool {
        self.inner.lock().unwrap().entries.remove(key).is_some()
    }

    /// Add to a counter.
    pub fn counter_add(&self, key: &str, delta: i64) -> Result<i64, StateError> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(c) = inner.counters.get_mut(key) {
            *c = c.saturating_add(delta);
            return Ok(*c);
        }
        Self::check_key(&inner, key, false)?;
        inner.counters.insert(key.to_string(), delta);
        Ok(delta)
    }

    /// Add to a counter only if its new value stays at most `limit`, as one
    /// step under the scope's lock: `Some(new value)`, or `None` (nothing
    /// added) past the limit.
    pub fn counter_add_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError> {
        let mut inner = self.inner.lock().unwrap();
        let current = match inner.counters.get(key) {
            Some(c) => *c,
            None => {
                Self::check_key(&inner, key, false)?;
                0
            }
        };
        let new = current.saturating_add(delta);
        if new > limit {
            return Ok(None);
        }
        inner.counters.insert(key.to_string(), new);
        Ok(Some(new))
    }

    /// Read a counter.
    pub fn counter_get(&self, key: &str) -> i64 {
        self.inner
            .lock()
            .unwrap()
            .counters
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// Counter increments a request holds (`counter-hold`): undone when the
/// request's data is dropped, which is after every `on-complete` hook — or
/// whenever the request ends, however it ends.
#[derive(Debug, Default)]
pub struct Holds(Vec<(Arc<Scope>, Box<str>, i64)>);

impl Holds {
    /// Add `delta` to `key` in `scope` until the request ends.
    pub fn hold(&mut self, scope: &Arc<Scope>, key: &str, delta: i64) -> Result<i64, StateError> {
        let n = scope.counter_add(key, delta)?;
        self.0.push((scope.clone(), key.into(), delta));
        Ok(n)
    }

    /// Add `delta` to `key` in `scope` until the request ends, only if the
    /// counter stays at most `limit` ([`Scope::counter_add_within`]).
    pub fn hold_within(
        &mut self,
        scope: &Arc<Scope>,
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError> {
        let n = scope.counter_add_within(key, delta, limit)?;
        if n.is_some() {
            self.0.push((scope.clone(), key.into(), delta));
        }
        Ok(n)
    }

    /// Undo every held increment now.
    pub fn release(&mut self) {
        for (scope, key, delta) in self.0.drain(..) {
            let _ = scope.counter_add(&key, -delta);
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
    fn compare_and_swap_and_caps() {
        let s = Scope::default();
        assert_eq!(s.set("k", b"a", Some(0)), Ok(1));
        assert_eq!(s.set("k", b"b", Some(0)), Err(StateError::Conflict(1)));
        assert_eq!(s.set("k", b"b", Some(1)), Ok(2));
        assert_eq!(s.get("k").unwrap().1, 2);
        assert_eq!(
            s.set("big", &vec![0; VALUE_CAP + 1], None),
            Err(StateError::TooLarge)
        );
        assert_eq!(s.set("", b"", None), Err(StateError::BadKey));
        assert_eq!(s.counter_add("c", 2), Ok(2));
        assert_eq!(s.counter_add("c", -3), Ok(-1));
        assert_eq!(s.counter_get("c"), -1);
        assert!(s.delete("k"));
        assert!(!s.delete("k"));
    }

    #[test]
    fn holds_are_undone_when_dropped() {
        let s = Arc::new(Scope::default());
        let mut holds = Holds::default();
        assert_eq!(holds.hold(&s, "pending", 1), Ok(1));
        assert_eq!(holds.hold(&s, "pending", 2), Ok(3));
        s.counter_add("pending", 10).unwrap();
        drop(holds);
        assert_eq!(s.counter_get("pending"), 10);
        let mut holds = Holds::default();
        assert_eq!(holds.hold(&s, "", 1), Err(StateError::BadKey));
        holds.release();
        assert_eq!(s.counter_get("pending"), 10);
    }

    #[test]
    fn a_hold_within_a_limit_is_refused_past_it_and_undone_when_dropped() {
        let s = Arc::new(Scope::default());
        let mut a = Holds::default();
        let mut b = Holds::default();
        assert_eq!(a.hold_within(&s, "retries", 1, 2), Ok(Some(1)));
        assert_eq!(b.hold_within(&s, "retries", 1, 2), Ok(Some(2)));
        assert_eq!(b.hold_within(&s, "retries", 1, 2), Ok(None));
        assert_eq!(s.counter_get("retries"), 2);
        drop(a);
        assert_eq!(s.counter_get("retries"), 1);
        drop(b);
        assert_eq!(s.counter_get("retries"), 0);
    }
}
