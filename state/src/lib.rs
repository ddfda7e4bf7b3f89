//! Plugins' shared state, one scope per (service, plugin name): entries
//! with versions (for compare-and-set) and atomic counters, each able to
//! expire, under one cap on keys. The proxy keeps one [`Scope`] per scope
//! for every instance of the plugin; the plugin SDK's test host keeps one
//! per harness, so that a plugin's unit tests see what the proxy does.
//!
//! - **Versions never repeat for a key.** Every entry write takes the next
//!   number of a scope-wide clock, so a version read before a delete (or
//!   an expiry) can never match the entry written after it: a
//!   compare-and-set holding it loses (no ABA).
//! - **Expiry.** A write may give a time to live; each such write sets it
//!   again. Expired keys are gone for everyone and free their slot at the
//!   scope's next operation. A write without a time to live keeps the
//!   key's expiry as it is (as Redis's `INCR` does).
//! - **The cap.** At [`KEY_CAP`] keys (entries and counters together) a
//!   new key is refused, or — when the write asks for it — the least
//!   recently used key (read or written) is evicted to make room.
//!
//! Time is the caller's: every operation takes `now`, milliseconds on a
//! monotonic clock the caller owns (the proxy's, or the test host's fake
//! one).

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::{Arc, Mutex};

/// Largest value of one entry, in bytes.
pub const VALUE_CAP: usize = 64 * 1024;
/// Most keys (entries plus counters) in one scope.
pub const KEY_CAP: usize = 10_000;
/// Longest key, in bytes.
pub const KEY_LEN_CAP: usize = 256;

/// A refused operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// Compare-and-set lost; the current version (0: no entry).
    Conflict(u64),
    /// Value over [`VALUE_CAP`].
    TooLarge,
    /// Scope full ([`KEY_CAP`]) and the write asked not to evict.
    TooManyKeys,
    /// Empty or over-long key.
    BadKey,
}

/// What a write does at the key cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse it ([`StateError::TooManyKeys`]).
    #[default]
    Refuse,
    /// Evict the least recently used key, then write.
    EvictLeastRecentlyUsed,
}

/// How a write treats expiry and the cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// `None`: keep the key's expiry as it is (a new key never expires).
    /// `Some(None)`: never expire. `Some(Some(ms))`: expire `ms` after
    /// this write.
    pub ttl_ms: Option<Option<u64>>,
    /// At the cap.
    pub when_full: WhenFull,
}

impl WriteOptions {
    /// Expire `ms` after this write; evict the least recently used key at
    /// the cap when `evict`.
    pub fn ttl(ms: u64, evict: bool) -> Self {
        Self {
            ttl_ms: Some(Some(ms)),
            when_full: if evict {
                WhenFull::EvictLeastRecentlyUsed
            } else {
                WhenFull::Refuse
            },
        }
    }
}

/// A write's result, and whether it evicted a key to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written<T> {
    /// The new version (entries) or value (counters).
    pub value: T,
    /// A key was evicted for this write.
    pub evicted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Entry,
    Counter,
}

#[derive(Debug)]
struct Slot<T> {
    value: T,
    /// Entries: the version. Counters: unused.
    version: u64,
    /// When it expires, ms (the caller's clock).
    expires: Option<u64>,
    /// Its node in the recency list.
    node: u32,
}

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Node {
    prev: u32,
    next: u32,
    kind: Kind,
    key: Arc<str>,
}

/// Every key from least to most recently used: a doubly linked list over a
/// slab, so that a use moves a key to the end in a few stores, with no
/// allocation.
#[derive(Debug)]
struct Recency {
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
}

impl Default for Recency {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

impl Recency {
    /// A new key, most recently used.
    fn push(&mut self, kind: Kind, key: Arc<str>) -> u32 {
        let node = Node {
            prev: self.tail,
            next: NIL,
            kind,
            key,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.link_tail(i);
        i
    }

    fn link_tail(&mut self, i: u32) {
        self.nodes[i as usize].prev = self.tail;
        self.nodes[i as usize].next = NIL;
        match self.tail {
            NIL => self.head = i,
            t => self.nodes[t as usize].next = i,
        }
        self.tail = i;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = (self.nodes[i as usize].prev, self.nodes[i as usize].next);
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    /// Make `i` the most recently used.
    fn touch(&mut self, i: u32) {
        if self.tail != i {
            self.unlink(i);
            self.link_tail(i);
        }
    }

    /// Forget `i`.
    fn remove(&mut self, i: u32) {
        self.unlink(i);
        self.free.push(i);
    }

    /// The least recently used key.
    fn oldest(&self) -> Option<(Kind, Arc<str>)> {
        (self.head != NIL).then(|| {
            let n = &self.nodes[self.head as usize];
            (n.kind, n.key.clone())
        })
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Arc<str>, Slot<Arc<[u8]>>>,
    counters: HashMap<Arc<str>, Slot<i64>>,
    /// The last version handed out, scope-wide.
    clock: u64,
    /// Keys with an expiry, soonest first.
    expiry: BTreeMap<(u64, Kind, Arc<str>), ()>,
    recency: Recency,
}

impl Inner {
    fn len(&self) -> usize {
        self.entries.len() + self.counters.len()
    }

    /// Drop what expired by `now`.
    fn expire(&mut self, now: u64) {
        while let Some(((at, kind, key), ())) = self.expiry.first_key_value() {
            if *at > now {
                break;
            }
            let (kind, key) = (*kind, key.clone());
            self.remove(kind, &key);
        }
    }

    fn remove(&mut self, kind: Kind, key: &str) -> bool {
        let (k, expires, node) = match kind {
            Kind::Entry => match self.entries.remove_entry(key) {
                Some((k, s)) => (k, s.expires, s.node),
                None => return false,
            },
            Kind::Counter => match self.counters.remove_entry(key) {
                Some((k, s)) => (k, s.expires, s.node),
                None => return false,
            },
        };
        self.recency.remove(node);
        if let Some(at) = expires {
            self.expiry.remove(&(at, kind, k));
        }
        true
    }

    /// Make room for one new key, or say why not.
    fn room(&mut self, key: &str, when_full: WhenFull) -> Result<bool, StateError> {
        if key.is_empty() || key.len() > KEY_LEN_CAP {
            return Err(StateError::BadKey);
        }
        if self.len() < KEY_CAP {
            return Ok(false);
        }
        match when_full {
            WhenFull::Refuse => Err(StateError::TooManyKeys),
            WhenFull::EvictLeastRecentlyUsed => {
                let Some((kind, victim)) = self.recency.oldest() else {
                    return Err(StateError::TooManyKeys);
                };
                self.remove(kind, &victim);
                Ok(true)
            }
        }
    }
}

/// Move a slot to the most recent place, and set its expiry.
fn touch<T>(
    recency: &mut Recency,
    expiry: &mut BTreeMap<(u64, Kind, Arc<str>), ()>,
    kind: Kind,
    key: &Arc<str>,
    slot: &mut Slot<T>,
    expires: Option<Option<u64>>,
) {
    recency.touch(slot.node);
    if let Some(new) = expires
        && new != slot.expires
    {
        if let Some(old) = slot.expires {
            expiry.remove(&(old, kind, key.clone()));
        }
        if let Some(at) = new {
            expiry.insert((at, kind, key.clone()), ());
        }
        slot.expires = new;
    }
}

/// One (service, plugin) scope.
#[derive(Debug, Default)]
pub struct Scope {
    inner: Mutex<Inner>,
}

impl Scope {
    /// Read an entry: its value and version.
    pub fn get(&self, key: &str, now: u64) -> Option<(Arc<[u8]>, u64)> {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        let Inner {
            entries, recency, ..
        } = &mut *inner;
        let slot = entries.get(key)?;
        recency.touch(slot.node);
        Some((slot.value.clone(), slot.version))
    }

    /// Write an entry, only if its version is `expected` when given (0: it
    /// must not exist); returns its new version.
    pub fn set(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        options: WriteOptions,
        now: u64,
    ) -> Result<Written<u64>, StateError> {
        if value.len() > VALUE_CAP {
            return Err(StateError::TooLarge);
        }
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        let current = inner.entries.get(key).map_or(0, |e| e.version);
        if let Some(v) = expected
            && v != current
        {
            return Err(StateError::Conflict(current));
        }
        let evicted = if current == 0 {
            inner.room(key, options.when_full)?
        } else {
            false
        };
        inner.clock += 1;
        let version = inner.clock;
        let expires = options.ttl_ms.map(|t| t.map(|ms| now.saturating_add(ms)));
        let Inner {
            entries,
            recency,
            expiry,
            ..
        } = &mut *inner;
        match entries.get_key_value(key).map(|(k, _)| k.clone()) {
            Some(k) => {
                let slot = entries.get_mut(key).expect("just found");
                slot.value = Arc::from(value);
                slot.version = version;
                touch(recency, expiry, Kind::Entry, &k, slot, expires);
            }
            None => {
                let k: Arc<str> = Arc::from(key);
                let node = recency.push(Kind::Entry, k.clone());
                let mut slot = Slot {
                    value: Arc::from(value),
                    version,
                    expires: None,
                    node,
                };
                touch(recency, expiry, Kind::Entry, &k, &mut slot, expires);
                entries.insert(k, slot);
            }
        }
        Ok(Written {
            value: version,
            evicted,
        })
    }

    /// Remove an entry; true if it existed.
    pub fn delete(&self, key: &str, now: u64) -> bool {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        inner.remove(Kind::Entry, key)
    }

    /// Remove an entry only if its version is `expected`; otherwise
    /// [`StateError::Conflict`] with the current one (0: none).
    pub fn delete_if(&self, key: &str, expected: u64, now: u64) -> Result<(), StateError> {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        let current = inner.entries.get(key).map_or(0, |e| e.version);
        if current == 0 || current != expected {
            return Err(StateError::Conflict(current));
        }
        inner.remove(Kind::Entry, key);
        Ok(())
    }

    /// Add to a counter (a missing one is 0); returns the new value.
    pub fn counter_add(
        &self,
        key: &str,
        delta: i64,
        options: WriteOptions,
        now: u64,
    ) -> Result<Written<i64>, StateError> {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        self.add(&mut inner, key, delta, options, now)
    }

    fn add(
        &self,
        inner: &mut Inner,
        key: &str,
        delta: i64,
        options: WriteOptions,
        now: u64,
    ) -> Result<Written<i64>, StateError> {
        let evicted = if inner.counters.contains_key(key) {
            false
        } else {
            inner.room(key, options.when_full)?
        };
        let expires = options.ttl_ms.map(|t| t.map(|ms| now.saturating_add(ms)));
        let Inner {
            counters,
            recency,
            expiry,
            ..
        } = inner;
        let value = match counters.get_key_value(key).map(|(k, _)| k.clone()) {
            Some(k) => {
                let slot = counters.get_mut(key).expect("just found");
                slot.value = slot.value.saturating_add(delta);
                touch(recency, expiry, Kind::Counter, &k, slot, expires);
                slot.value
            }
            None => {
                let k: Arc<str> = Arc::from(key);
                let node = recency.push(Kind::Counter, k.clone());
                let mut slot = Slot {
                    value: delta,
                    version: 0,
                    expires: None,
                    node,
                };
                touch(recency, expiry, Kind::Counter, &k, &mut slot, expires);
                counters.insert(k, slot);
                delta
            }
        };
        Ok(Written { value, evicted })
    }

    /// Add to a counter only if its new value stays at most `limit`, as one
    /// step: `Some(new value)`, or `None` (nothing added) past the limit.
    pub fn counter_add_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
        now: u64,
    ) -> Result<Option<i64>, StateError> {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        let current = inner.counters.get(key).map_or(0, |c| c.value);
        if current.saturating_add(delta) > limit {
            if !inner.counters.contains_key(key) {
                inner.room(key, WhenFull::Refuse)?;
            }
            return Ok(None);
        }
        self.add(&mut inner, key, delta, WriteOptions::default(), now)
            .map(|w| Some(w.value))
    }

    /// Take back a held increment: only while the counter exists (one
    /// that expired or was evicted meanwhile is not brought back).
    pub fn counter_release(&self, key: &str, delta: i64, now: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        if let Some(c) = inner.counters.get_mut(key) {
            c.value = c.value.saturating_sub(delta);
        }
    }

    /// Read a counter (0 when missing).
    pub fn counter_get(&self, key: &str, now: u64) -> i64 {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        let Inner {
            counters, recency, ..
        } = &mut *inner;
        match counters.get(key) {
            Some(slot) => {
                recency.touch(slot.node);
                slot.value
            }
            None => 0,
        }
    }

    /// Keys held now (entries and counters), after dropping what expired.
    pub fn len(&self, now: u64) -> usize {
        let mut inner = self.inner.lock().unwrap();
        inner.expire(now);
        inner.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self, now: u64) -> bool {
        self.len(now) == 0
    }
}

#[cfg(test)]
mod tests;
