//! What the host offers a plugin: logging, clocks, randomness, shared state,
//! endpoint ejection and custom metrics.
//!
//! In a component these call the proxy; natively they act on the thread's
//! [`crate::native::NativeHost`] when one is set, else on the
//! [`crate::testing::TestHost`] of the current thread. None of them panics.

use crate::types::{Endpoint, Level, StateEntry, StateError, WriteOptions};

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::*;
    use crate::bindings::wasmesh::plugin::host as h;

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => h::LogLevel::Trace,
            Level::Debug => h::LogLevel::Debug,
            Level::Info => h::LogLevel::Info,
            Level::Warn => h::LogLevel::Warn,
            Level::Error => h::LogLevel::Error,
        };
        h::log(level, message)
    }
    pub fn now_ms() -> u64 {
        h::now_ms()
    }
    pub fn monotonic_ns() -> u64 {
        h::monotonic_ns()
    }
    /// Drawn in the instance (wyrand, the generator `fastrand` uses),
    /// seeded once from the host's `random-u64`: a draw is no host call.
    pub fn random_u64() -> u64 {
        use std::cell::Cell;
        thread_local! {
            static STATE: Cell<u64> = const { Cell::new(0) };
        }
        STATE.with(|s| {
            let mut x = s.get();
            if x == 0 {
                x = h::random_u64() | 1;
            }
            x = x.wrapping_add(0xa076_1d64_78bd_642f);
            s.set(x);
            let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
            (t >> 64) as u64 ^ t as u64
        })
    }
    fn state_error(e: h::StateError) -> StateError {
        match e {
            h::StateError::Conflict(v) => StateError::Conflict(v),
            h::StateError::TooLarge(c) => StateError::TooLarge(c),
            h::StateError::TooManyKeys(c) => StateError::TooManyKeys(c),
            h::StateError::BadKey => StateError::BadKey,
            h::StateError::NoRequest => StateError::NoRequest,
        }
    }
    pub fn state_get(key: &str) -> Option<StateEntry> {
        h::state_get(key).map(|e| StateEntry {
            value: e.value,
            version: e.version,
        })
    }
    pub fn state_set(key: &str, value: &[u8], expected: Option<u64>) -> Result<u64, StateError> {
        h::state_set(key, value, expected).map_err(state_error)
    }
    fn write_options(o: WriteOptions) -> h::WriteOptions {
        h::WriteOptions {
            ttl_ms: o.ttl_ms,
            when_full: if o.evict_least_recently_used {
                h::WhenFull::EvictLeastRecentlyUsed
            } else {
                h::WhenFull::Refuse
            },
        }
    }
    pub fn state_set_with(
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        options: WriteOptions,
    ) -> Result<u64, StateError> {
        h::state_set_with(key, value, expected, write_options(options)).map_err(state_error)
    }
    pub fn state_delete(key: &str) -> bool {
        h::state_delete(key)
    }
    pub fn state_delete_if(key: &str, version: u64) -> Result<(), StateError> {
        h::state_delete_if(key, version).map_err(state_error)
    }
    pub fn counter_add(key: &str, delta: i64) -> Result<i64, StateError> {
        h::counter_add(key, delta).map_err(state_error)
    }
    pub fn counter_add_with(
        key: &str,
        delta: i64,
        options: WriteOptions,
    ) -> Result<i64, StateError> {
        h::counter_add_with(key, delta, write_options(options)).map_err(state_error)
    }
    pub fn counter_get(key: &str) -> i64 {
        h::counter_get(key)
    }
    pub fn counter_hold(key: &str, delta: i64) -> Result<i64, StateError> {
        h::counter_hold(key, delta).map_err(state_error)
    }
    pub fn counter_hold_within(
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError> {
        h::counter_hold_within(key, delta, limit).map_err(state_error)
    }
    pub fn endpoints(service: Option<&str>) -> Vec<Endpoint> {
        h::endpoints(service)
            .into_iter()
            .map(|e| Endpoint {
                subset: e.subset,
                address: e.address,
                ejected: e.ejected,
            })
            .collect()
    }
    pub fn eject(endpoint: &str, duration_ms: u32) -> bool {
        h::eject(endpoint, duration_ms)
    }
    pub fn metric_add(name: &str, delta: u64) {
        h::metric_add(name, delta)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::*;

    /// Call `native` on this thread's native host, or `test` on the
    /// harness's fake host when there is none.
    fn dispatch<R>(
        native: impl FnOnce(&dyn crate::native::NativeHost) -> R,
        test: impl FnOnce(&mut crate::testing::TestHost) -> R,
    ) -> R {
        match crate::native::with_current(|host| host.map(native)) {
            Some(r) => r,
            None => crate::testing::with_host(test),
        }
    }

    pub fn log(level: Level, message: &str) {
        dispatch(
            |n| n.log(level, message),
            |h| h.logs.push((level, message.to_string())),
        )
    }
    pub fn now_ms() -> u64 {
        dispatch(|n| n.now_ms(), |h| h.now_ms())
    }
    pub fn monotonic_ns() -> u64 {
        dispatch(|n| n.monotonic_ns(), |h| h.monotonic_ns())
    }
    pub fn random_u64() -> u64 {
        dispatch(|n| n.random_u64(), |h| h.next_random())
    }
    pub fn state_get(key: &str) -> Option<StateEntry> {
        dispatch(|n| n.state_get(key), |h| h.state_get(key))
    }
    pub fn state_set(key: &str, value: &[u8], expected: Option<u64>) -> Result<u64, StateError> {
        dispatch(
            |n| n.state_set(key, value, expected),
            |h| h.state_set(key, value, expected),
        )
    }
    pub fn state_set_with(
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        options: WriteOptions,
    ) -> Result<u64, StateError> {
        dispatch(
            |n| n.state_set_with(key, value, expected, options),
            |h| h.state_set_with(key, value, expected, options),
        )
    }
    pub fn state_delete(key: &str) -> bool {
        dispatch(|n| n.state_delete(key), |h| h.state_delete(key))
    }
    pub fn state_delete_if(key: &str, version: u64) -> Result<(), StateError> {
        dispatch(
            |n| n.state_delete_if(key, version),
            |h| h.state_delete_if(key, version),
        )
    }
    pub fn counter_add(key: &str, delta: i64) -> Result<i64, StateError> {
        dispatch(|n| n.counter_add(key, delta), |h| h.counter_add(key, delta))
    }
    pub fn counter_add_with(
        key: &str,
        delta: i64,
        options: WriteOptions,
    ) -> Result<i64, StateError> {
        dispatch(
            |n| n.counter_add_with(key, delta, options),
            |h| h.counter_add_with(key, delta, options),
        )
    }
    pub fn counter_get(key: &str) -> i64 {
        dispatch(|n| n.counter_get(key), |h| h.counter(key))
    }
    pub fn counter_hold(key: &str, delta: i64) -> Result<i64, StateError> {
        dispatch(
            |n| n.counter_hold(key, delta),
            |h| h.counter_hold(key, delta),
        )
    }
    pub fn counter_hold_within(
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError> {
        dispatch(
            |n| n.counter_hold_within(key, delta, limit),
            |h| h.counter_hold_within(key, delta, limit),
        )
    }
    pub fn endpoints(service: Option<&str>) -> Vec<Endpoint> {
        dispatch(|n| n.endpoints(service), |h| h.endpoints_of(service))
    }
    pub fn eject(endpoint: &str, duration_ms: u32) -> bool {
        dispatch(
            |n| n.eject(endpoint, duration_ms),
            |h| h.eject(endpoint, duration_ms),
        )
    }
    pub fn metric_add(name: &str, delta: u64) {
        dispatch(
            |n| n.metric_add(name, delta),
            |h| *h.metrics.entry(name.to_string()).or_insert(0) += delta,
        )
    }
}

/// Write a line to the proxy's log.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    imp::now_ms()
}

/// Monotonic nanoseconds, for intervals.
pub fn monotonic_ns() -> u64 {
    imp::monotonic_ns()
}

/// A random number (not for cryptography). In a component it comes from a
/// generator in the instance, seeded from the host once, so drawing costs
/// no call to the host.
pub fn random_u64() -> u64 {
    imp::random_u64()
}

/// A uniformly distributed number in `0.0..1.0`.
pub fn random_f64() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Shared state, scoped to (service, plugin name) and surviving upgrades:
/// every instance of the plugin in a proxy (each worker's, the next
/// version's) sees the same keys. At most 10,000 keys (entries and counters
/// together) and 64 KiB a value. Keys that pile up (one per client) want a
/// time to live ([`set_with`], [`update`]); there is no key listing.
///
/// Versions never repeat for a key, even across a delete or an expiry: a
/// compare-and-set holding a version read before either always loses.
pub mod state {
    use super::*;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// Most reads and compare-and-sets [`update`] makes before it gives up
    /// to contention.
    pub const UPDATE_TRIES: u32 = 8;

    /// Why [`update`] did not write.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum UpdateError {
        /// Other instances wrote the key between each of `tries` reads and
        /// compare-and-sets: give up (or decide as if the key were hot).
        Contention {
            /// The key.
            key: String,
            /// Tries made.
            tries: u32,
        },
        /// The host refused the write (the key cap, a bad key, a value too
        /// large).
        State(StateError),
        /// The stored bytes are not a `T` (JSON): what serde said. Nothing
        /// was written.
        Decode(String),
        /// The new value does not serialize as JSON: what serde said.
        Encode(String),
    }

    impl std::fmt::Display for UpdateError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                UpdateError::Contention { key, tries } => write!(
                    f,
                    "state key {key:?}: other instances won {tries} compare-and-sets in a row"
                ),
                UpdateError::State(e) => write!(f, "{e}"),
                UpdateError::Decode(e) => write!(f, "the stored value does not decode: {e}"),
                UpdateError::Encode(e) => write!(f, "the new value does not encode: {e}"),
            }
        }
    }

    impl std::error::Error for UpdateError {}

    /// Read `key` as a `T` (JSON), let `f` compute the new value from it
    /// (`None` when absent or expired), write it back with `options` if
    /// nobody wrote in between — else read and call `f` again, at most
    /// [`UPDATE_TRIES`] times. Returns what `f` returned with the value
    /// that was written. `f` may run several times: keep it free of side
    /// effects.
    ///
    /// ```no_run
    /// use wasmesh_plugin_sdk::{WriteOptions, host::state};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Seen { count: u64 }
    /// let (seen, first) = state::update("client-1", WriteOptions::ttl_ms(60_000), |old: Option<Seen>| {
    ///     let count = old.map_or(0, |s| s.count) + 1;
    ///     (Seen { count }, count == 1)
    /// })?;
    /// # Ok::<(), state::UpdateError>(())
    /// ```
    pub fn update<T, R>(
        key: &str,
        options: WriteOptions,
        mut f: impl FnMut(Option<T>) -> (T, R),
    ) -> Result<(T, R), UpdateError>
    where
        T: Serialize + DeserializeOwned,
    {
        compare_and_set_loop(key, options, |old| {
            let old = match old {
                Some(bytes) => Some(
                    serde_json::from_slice::<T>(&bytes)
                        .map_err(|e| UpdateError::Decode(e.to_string()))?,
                ),
                None => None,
            };
            let (new, out) = f(old);
            let bytes = serde_json::to_vec(&new).map_err(|e| UpdateError::Encode(e.to_string()))?;
            Ok((bytes, (new, out)))
        })
    }

    /// Read `key`, compute what to write from it, write it with a
    /// compare-and-set; read again when another instance wrote in between,
    /// at most [`UPDATE_TRIES`] times.
    fn compare_and_set_loop<X>(
        key: &str,
        options: WriteOptions,
        mut next: impl FnMut(Option<Vec<u8>>) -> Result<(Vec<u8>, X), UpdateError>,
    ) -> Result<X, UpdateError> {
        for _ in 0..UPDATE_TRIES {
            let (old, version) = match imp::state_get(key) {
                Some(e) => (Some(e.value), e.version),
                None => (None, 0),
            };
            let (bytes, out) = next(old)?;
            match imp::state_set_with(key, &bytes, Some(version), options) {
                Ok(_) => return Ok(out),
                Err(StateError::Conflict(_)) => continue,
                Err(e) => return Err(UpdateError::State(e)),
            }
        }
        Err(UpdateError::Contention {
            key: key.to_string(),
            tries: UPDATE_TRIES,
        })
    }

    /// [`update`] on raw bytes: `f` gets the stored bytes (`None` when
    /// absent) and returns the new ones; returns what was written.
    pub fn update_bytes(
        key: &str,
        options: WriteOptions,
        mut f: impl FnMut(Option<&[u8]>) -> Vec<u8>,
    ) -> Result<Vec<u8>, UpdateError> {
        compare_and_set_loop(key, options, |old| {
            let new = f(old.as_deref());
            Ok((new.clone(), new))
        })
    }

    /// Write an entry with a time to live and a policy for a full scope,
    /// only if its version is `expected` when given (0: must not exist).
    pub fn set_with(
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        options: WriteOptions,
    ) -> Result<u64, StateError> {
        imp::state_set_with(key, value, expected, options)
    }

    /// Remove an entry only if its version is still `version`
    /// ([`StateError::Conflict`] with the current one otherwise).
    pub fn delete_if(key: &str, version: u64) -> Result<(), StateError> {
        imp::state_delete_if(key, version)
    }

    /// Add to a counter with a time to live and a policy for a full scope.
    pub fn counter_add_with(
        key: &str,
        delta: i64,
        options: WriteOptions,
    ) -> Result<i64, StateError> {
        imp::counter_add_with(key, delta, options)
    }

    /// Read an entry.
    pub fn get(key: &str) -> Option<StateEntry> {
        imp::state_get(key)
    }

    /// Write an entry unconditionally; returns its new version.
    pub fn set(key: &str, value: &[u8]) -> Result<u64, StateError> {
        imp::state_set(key, value, None)
    }

    /// Write an entry if its version is still `expected` (0: must not exist).
    pub fn compare_and_set(key: &str, value: &[u8], expected: u64) -> Result<u64, StateError> {
        imp::state_set(key, value, Some(expected))
    }

    /// Remove an entry; true if it existed.
    pub fn delete(key: &str) -> bool {
        imp::state_delete(key)
    }

    /// Atomically add to a counter and return the new value.
    pub fn counter_add(key: &str, delta: i64) -> Result<i64, StateError> {
        imp::counter_add(key, delta)
    }

    /// Read a counter (0 when missing).
    pub fn counter_get(key: &str) -> i64 {
        imp::counter_get(key)
    }

    /// Add to a counter for the rest of the current request: the host takes
    /// `delta` back off when the request ends, however it ends (after every
    /// `on_complete`). Use it for in-flight counts, so that they cannot leak
    /// and the plugin needs no `on_complete` hook for them. Outside a request
    /// (in `Plugin::new`) it is refused with [`StateError::NoRequest`].
    pub fn counter_hold(key: &str, delta: i64) -> Result<i64, StateError> {
        imp::counter_hold(key, delta)
    }

    /// [`counter_hold`] only if the counter stays at most `limit`, checked
    /// and added as one step in the host: `Some(new value)` when held,
    /// `None` (nothing added) when `limit` would be passed. For a budget
    /// that concurrent requests share, where reading the counter and then
    /// holding it would let two requests take the last slot.
    pub fn counter_hold_within(
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError> {
        imp::counter_hold_within(key, delta, limit)
    }
}

/// The endpoints of a service (`None`: this plugin's service).
pub fn endpoints(service: Option<&str>) -> Vec<Endpoint> {
    imp::endpoints(service)
}

/// Eject an endpoint of this plugin's service for `duration_ms`.
pub fn eject(endpoint: &str, duration_ms: u32) -> bool {
    imp::eject(endpoint, duration_ms)
}

/// Add to a custom counter metric.
pub fn metric_add(name: &str, delta: u64) {
    imp::metric_add(name, delta)
}
