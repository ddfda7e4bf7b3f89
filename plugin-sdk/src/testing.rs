//! A native test harness for plugin logic: a fake host (a clock you advance,
//! seeded random numbers, shared state, recorded logs, metrics and
//! ejections) and a [`Harness`] that configures a plugin from JSON and calls
//! its declared hooks the way the proxy would.
//!
//! Shared state is the proxy's own implementation (the `wasmesh-state`
//! crate): versions that never repeat, expiry on the fake monotonic clock,
//! the 10,000-key cap and least-recently-used eviction behave as they do in
//! the proxy.
//!
//! **One fake host per thread.** Every [`Harness`] on a test's thread calls
//! the same [`TestHost`]: two harnesses of one plugin are two instances of
//! it in one proxy (two workers) sharing its state, clock and metrics. Rust
//! runs each test on its own thread, so tests never share a host.
//!
//! For plugin unit tests only: what crosses the real boundary is tested end to
//! end against the proxy.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::types::*;
use crate::view::{Request, RequestSource, Response, ResponseSource};
use crate::{Declared, Plugin, parse_config};

/// Per-entry cap on shared-state values, as in the proxy.
pub const STATE_VALUE_CAP: usize = wasmesh_state::VALUE_CAP;
/// Key cap per scope, as in the proxy.
pub const STATE_KEY_CAP: usize = wasmesh_state::KEY_CAP;

/// The fake host a test's plugin calls go to.
#[derive(Default)]
pub struct TestHost {
    /// Current wall-clock time, ms since the epoch; advance it with [`TestHost::advance`].
    pub clock_ms: u64,
    /// Monotonic time, ns.
    pub mono_ns: u64,
    /// The random generator's state (splitmix64).
    pub seed: u64,
    /// Shared state: entries and counters (read and write them as another
    /// instance would with [`TestHost::set`], [`TestHost::add`],
    /// [`TestHost::entry`], [`TestHost::counter`]).
    pub state: wasmesh_state::Scope,
    /// Endpoints by service; `""` is the plugin's own service.
    pub endpoints: HashMap<String, Vec<Endpoint>>,
    /// Ejections made: (endpoint, until-ms).
    pub ejections: Vec<(String, u64)>,
    /// Log lines.
    pub logs: Vec<(Level, String)>,
    /// Custom metrics.
    pub metrics: HashMap<String, u64>,
    /// The id of the request whose hook is running (set by [`Harness`]).
    pub current_request: Option<String>,
    /// Counter holds: (request id, key, delta), undone by
    /// [`Harness::on_complete`] for that request.
    pub holds: Vec<(String, String, i64)>,
    /// Run on this host just before the plugin's next shared-state write
    /// (set, delete, a counter add or hold): what another instance of the
    /// plugin did meanwhile. See [`TestHost::before_next_write`].
    #[allow(clippy::type_complexity, reason = "a one-shot closure")]
    interleave: Option<Box<dyn FnOnce(&mut TestHost)>>,
}

impl std::fmt::Debug for TestHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHost")
            .field("clock_ms", &self.clock_ms)
            .field("state", &self.state)
            .field("holds", &self.holds)
            .finish_non_exhaustive()
    }
}

impl TestHost {
    /// Advance both clocks.
    pub fn advance(&mut self, ms: u64) {
        self.clock_ms += ms;
        self.mono_ns += ms * 1_000_000;
        let now = self.clock_ms;
        for ep in self.endpoints.values_mut().flatten() {
            ep.ejected = self
                .ejections
                .iter()
                .any(|(a, until)| *a == ep.address && *until > now);
        }
    }

    /// Simulate another instance of the plugin (another worker, another
    /// request) writing shared state between this plugin's read and its
    /// next write: `f` runs on this host just before that write. A
    /// compare-and-set that read a version before `f` then loses, as it
    /// would in the proxy.
    pub fn before_next_write(&mut self, f: impl FnOnce(&mut TestHost) + 'static) {
        self.interleave = Some(Box::new(f));
    }

    /// Run what [`TestHost::before_next_write`] asked for, once.
    fn writing(&mut self) {
        if let Some(f) = self.interleave.take() {
            f(self);
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.clock_ms
    }

    pub(crate) fn monotonic_ns(&self) -> u64 {
        self.mono_ns
    }

    pub(crate) fn next_random(&mut self) -> u64 {
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Shared state's clock: the fake monotonic one, in ms.
    fn now(&self) -> u64 {
        self.mono_ns / 1_000_000
    }

    /// An entry, as another instance reads it.
    pub fn entry(&self, key: &str) -> Option<StateEntry> {
        self.state
            .get(key, self.now())
            .map(|(value, version)| StateEntry {
                value: value.to_vec(),
                version,
            })
    }

    /// Write an entry as another instance of the plugin would (no
    /// [`TestHost::before_next_write`] runs); its new version.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<u64, StateError> {
        let options = wasmesh_state::WriteOptions::default();
        written(self.state.set(key, value, None, options, self.now()))
    }

    /// Remove an entry as another instance would.
    pub fn delete(&mut self, key: &str) -> bool {
        self.state.delete(key, self.now())
    }

    /// A counter (0 when missing).
    pub fn counter(&self, key: &str) -> i64 {
        self.state.counter_get(key, self.now())
    }

    /// Add to a counter as another instance would.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, StateError> {
        let options = wasmesh_state::WriteOptions::default();
        written(self.state.counter_add(key, delta, options, self.now()))
    }

    /// Keys held now (entries and counters), expired ones gone.
    pub fn keys(&self) -> usize {
        self.state.len(self.now())
    }

    /// Forget all shared state.
    pub fn clear_state(&mut self) {
        self.state = wasmesh_state::Scope::default();
    }

    pub(crate) fn state_get(&self, key: &str) -> Option<StateEntry> {
        self.entry(key)
    }

    pub(crate) fn state_set(
        &mut self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
    ) -> Result<u64, StateError> {
        self.writing();
        let options = wasmesh_state::WriteOptions::default();
        written(self.state.set(key, value, expected, options, self.now()))
    }

    pub(crate) fn state_set_with(
        &mut self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        options: WriteOptions,
    ) -> Result<u64, StateError> {
        self.writing();
        let options = write_options(options);
        written(self.state.set(key, value, expected, options, self.now()))
    }

    pub(crate) fn state_delete(&mut self, key: &str) -> bool {
        self.writing();
        self.state.delete(key, self.now())
    }

    pub(crate) fn state_delete_if(&mut self, key: &str, version: u64) -> Result<(), StateError> {
        self.writing();
        self.state
            .delete_if(key, version, self.now())
            .map_err(state_error)
    }

    pub(crate) fn counter_add(&mut self, key: &str, delta: i64) -> Result<i64, StateError> {
        self.writing();
        self.add(key, delta)
    }

    pub(crate) fn counter_add_with(
        &mut self,
        key: &str,
        delta: i64,
        options: WriteOptions,
    ) -> Result<i64, StateError> {
        self.writing();
        let options = write_options(options);
        written(self.state.counter_add(key, delta, options, self.now()))
    }

    pub(crate) fn counter_hold(&mut self, key: &str, delta: i64) -> Result<i64, StateError> {
        let Some(id) = self.current_request.clone() else {
            return Err(StateError::NoRequest);
        };
        let n = self.counter_add(key, delta)?;
        self.holds.push((id, key.to_string(), delta));
        Ok(n)
    }

    pub(crate) fn counter_hold_within(
        &mut self,
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, StateError> {
        let Some(id) = self.current_request.clone() else {
            return Err(StateError::NoRequest);
        };
        self.writing();
        let n = self
            .state
            .counter_add_within(key, delta, limit, self.now())
            .map_err(state_error)?;
        if n.is_some() {
            self.holds.push((id, key.to_string(), delta));
        }
        Ok(n)
    }

    /// Undo the holds of request `id`, as the proxy does when it ends.
    pub fn release_holds(&mut self, id: &str) {
        let (mine, rest) = std::mem::take(&mut self.holds)
            .into_iter()
            .partition(|(r, _, _)| r == id);
        self.holds = rest;
        let now = self.now();
        for (_, key, delta) in mine {
            self.state.counter_release(&key, delta, now);
        }
    }

    pub(crate) fn endpoints_of(&self, service: Option<&str>) -> Vec<Endpoint> {
        self.endpoints
            .get(service.unwrap_or(""))
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn eject(&mut self, endpoint: &str, duration_ms: u32) -> bool {
        let until = self.clock_ms + u64::from(duration_ms);
        let mut found = false;
        for ep in self.endpoints.values_mut().flatten() {
            if ep.address == endpoint {
                ep.ejected = true;
                found = true;
            }
        }
        if found {
            self.ejections.push((endpoint.to_string(), until));
        }
        found
    }
}

fn write_options(o: WriteOptions) -> wasmesh_state::WriteOptions {
    wasmesh_state::WriteOptions {
        ttl_ms: Some(o.ttl_ms),
        when_full: if o.evict_least_recently_used {
            wasmesh_state::WhenFull::EvictLeastRecentlyUsed
        } else {
            wasmesh_state::WhenFull::Refuse
        },
    }
}

fn state_error(e: wasmesh_state::StateError) -> StateError {
    match e {
        wasmesh_state::StateError::Conflict(v) => StateError::Conflict(v),
        wasmesh_state::StateError::TooLarge => {
            StateError::TooLarge(wasmesh_state::VALUE_CAP as u32)
        }
        wasmesh_state::StateError::TooManyKeys => {
            StateError::TooManyKeys(wasmesh_state::KEY_CAP as u32)
        }
        wasmesh_state::StateError::BadKey => StateError::BadKey,
    }
}

fn written<T>(
    r: Result<wasmesh_state::Written<T>, wasmesh_state::StateError>,
) -> Result<T, StateError> {
    r.map(|w| w.value).map_err(state_error)
}

thread_local! {
    static HOST: RefCell<TestHost> = RefCell::new(TestHost { seed: 42, clock_ms: 1_700_000_000_000, ..TestHost::default() });
}

/// Run `f` on this thread's fake host.
pub fn with_host<R>(f: impl FnOnce(&mut TestHost) -> R) -> R {
    HOST.with(|h| f(&mut h.borrow_mut()))
}

/// A request as a test builds it.
#[derive(Clone, Debug)]
pub struct TestRequest {
    /// Method.
    pub method: String,
    /// Scheme.
    pub scheme: String,
    /// Authority.
    pub authority: String,
    /// Path with query.
    pub path: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Headers.
    pub headers: Vec<Header>,
    /// Caller.
    pub source: Peer,
    /// Destination service.
    pub service: String,
    /// Request id.
    pub id: String,
}

impl TestRequest {
    /// `GET http://reviews/<path>` from 127.0.0.1.
    pub fn get(path: &str) -> Self {
        Self {
            method: "GET".into(),
            scheme: "http".into(),
            authority: "reviews".into(),
            path: path.into(),
            port: 80,
            protocol: Protocol::Http1,
            headers: Vec::new(),
            source: Peer {
                principal: None,
                namespace: None,
                address: "127.0.0.1:50000".into(),
            },
            service: "reviews".into(),
            id: "test-request".into(),
        }
    }

    /// Set the method.
    pub fn method(mut self, m: &str) -> Self {
        self.method = m.into();
        self
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Set the caller.
    pub fn source(mut self, source: Peer) -> Self {
        self.source = source;
        self
    }
}

/// A response as a test builds it.
#[derive(Clone, Debug)]
pub struct TestResponse {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<Header>,
}

impl TestResponse {
    /// A response with this status and no headers.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
        }
    }
}

impl RequestSource for TestRequest {
    fn method(&self) -> String {
        self.method.clone()
    }
    fn scheme(&self) -> String {
        self.scheme.clone()
    }
    fn authority(&self) -> String {
        self.authority.clone()
    }
    fn path(&self) -> String {
        self.path.clone()
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn protocol(&self) -> Protocol {
        self.protocol
    }
    fn header(&self, name: &str) -> Option<String> {
        first(&self.headers, name)
    }
    fn header_all(&self, name: &str) -> Vec<String> {
        all(&self.headers, name)
    }
    fn headers(&self) -> Vec<Header> {
        self.headers.clone()
    }
    fn source(&self) -> Peer {
        self.source.clone()
    }
    fn service(&self) -> String {
        self.service.clone()
    }
    fn id(&self) -> String {
        self.id.clone()
    }
}

impl ResponseSource for TestResponse {
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, name: &str) -> Option<String> {
        first(&self.headers, name)
    }
    fn headers(&self) -> Vec<Header> {
        self.headers.clone()
    }
    fn header_all(&self, name: &str) -> Vec<String> {
        all(&self.headers, name)
    }
}

fn all(headers: &[Header], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.clone())
        .collect()
}

fn first(headers: &[Header], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.clone())
}

/// A configured plugin, called as the proxy would call it: a hook the plugin
/// did not declare, or that its configuration does not need
/// ([`Plugin::active_hooks`]), is not called (the default decision is
/// returned).
///
/// `on_response` likewise runs only for the outcomes the plugin asked for
/// ([`Plugin::response_outcomes`]), decided as the proxy decides, and
/// `on_request` not at all where [`Plugin::fixed_on_request`] decides.
pub struct Harness<P> {
    plugin: P,
    hooks: Hooks,
    outcomes: crate::gate::OutcomeGate,
    fixed: Option<crate::FixedRequest>,
    table: Option<crate::RequestTable>,
    on_request_calls: std::cell::Cell<u64>,
}

impl<P: Plugin + Declared> Harness<P> {
    /// Configure the plugin from JSON text, as the proxy does.
    pub fn new(config_json: &str) -> Result<Self, String> {
        let plugin = P::new(parse_config(config_json)?)?;
        let mut hooks = P::HOOKS.and(plugin.active_hooks(P::HOOKS));
        let wanted = plugin.response_outcomes();
        if wanted.is_empty() {
            hooks.on_response = false;
        }
        let fixed = plugin.fixed_on_request();
        if let Some(h) = fixed.as_ref().and_then(|f| f.hold.as_ref())
            && (h.key.is_empty() || h.key.len() > wasmesh_state::KEY_LEN_CAP)
        {
            return Err(format!(
                "on-request-fixed: hold key {:?}: expected 1 to 256 bytes, got {}",
                h.key,
                h.key.len()
            ));
        }
        let table = plugin.table_on_request();
        Ok(Self {
            plugin,
            hooks,
            outcomes: crate::gate::OutcomeGate::new(wanted),
            fixed,
            table,
            on_request_calls: Default::default(),
        })
    }

    /// What the plugin said its `on_request` decides for every request
    /// ([`Plugin::fixed_on_request`]).
    pub fn fixed_on_request(&self) -> Option<&crate::FixedRequest> {
        self.fixed.as_ref()
    }

    /// The table the plugin said its `on_request` decides by
    /// ([`Plugin::table_on_request`]). The harness does not evaluate it
    /// (it cannot read Istio matches): `on_request` is called as before.
    pub fn table_on_request(&self) -> Option<&crate::RequestTable> {
        self.table.as_ref()
    }

    /// How many times `on_request` was called (requests the fixed decision
    /// took are not calls).
    pub fn on_request_calls(&self) -> u64 {
        self.on_request_calls.get()
    }

    /// The hooks the proxy would call for this configuration.
    pub fn hooks(&self) -> Hooks {
        self.hooks
    }

    /// The outcomes the proxy would call `on_response` for.
    pub fn response_outcomes(&self) -> Outcomes {
        self.outcomes.wanted()
    }

    /// The plugin.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    /// Advance the fake clocks (wall and monotonic) by `ms`: shared state
    /// expires, ejections end.
    pub fn advance(&self, ms: u64) {
        with_host(|h| h.advance(ms));
    }

    /// Run `f` — what another instance of the plugin does — just before
    /// this plugin's next shared-state write, between its read and its
    /// write: a compare-and-set after a read then loses, as it would in
    /// the proxy. See [`TestHost::before_next_write`].
    pub fn before_next_write(&self, f: impl FnOnce(&mut TestHost) + 'static) {
        with_host(|h| h.before_next_write(f));
    }

    /// Run `f` on the fake host: read or write shared state as another
    /// instance would, read metrics and logs.
    pub fn host<R>(&self, f: impl FnOnce(&mut TestHost) -> R) -> R {
        with_host(f)
    }

    /// Decide for `req` as the proxy does: the fixed decision (taking its
    /// hold) when the plugin gave one and the hold fits, else `on_request`.
    pub fn on_request(&self, req: &TestRequest) -> Result<RequestDecision, String> {
        if let Some(fixed) = &self.fixed {
            let held = match &fixed.hold {
                None => true,
                Some(h) => in_request(req, || {
                    with_host(|host| match h.limit {
                        Some(limit) => {
                            matches!(host.counter_hold_within(&h.key, 1, limit), Ok(Some(_)))
                        }
                        None => host.counter_hold(&h.key, 1).is_ok(),
                    })
                }),
            };
            if held {
                return Ok(fixed.decision.clone());
            }
        }
        if !self.hooks.on_request {
            return Ok(RequestDecision::default());
        }
        self.on_request_calls.set(self.on_request_calls.get() + 1);
        in_request(req, || self.plugin.on_request(&Request { inner: req }))
    }

    /// Call `on_response` with an upstream response for attempt `number`
    /// (when the plugin asked for this outcome).
    pub fn on_response(
        &self,
        req: &TestRequest,
        resp: &TestResponse,
        attempt: &Attempt,
    ) -> Result<ResponseDecision, String> {
        if !self.hooks.on_response {
            return Ok(ResponseDecision::default());
        }
        let mut kind = Outcomes::of(&attempt.outcome);
        if matches!(attempt.outcome, Outcome::Response(_))
            && first(&resp.headers, "grpc-status").is_some()
        {
            kind |= Outcomes::GRPC_STATUS;
        }
        if !self.outcomes.passes(kind, attempt.endpoint.as_deref()) {
            return Ok(ResponseDecision::default());
        }
        in_request(req, || {
            self.plugin
                .on_response(&Request { inner: req }, &Response { inner: resp }, attempt)
        })
    }

    /// End the request: call `on_complete` (if declared), then undo the
    /// request's counter holds, as the proxy does.
    pub fn on_complete(&self, req: &TestRequest, done: &Completion) {
        if self.hooks.on_complete {
            in_request(req, || {
                self.plugin.on_complete(&Request { inner: req }, done)
            });
        }
        with_host(|h| h.release_holds(&req.id));
    }
}

/// Run a hook with `req` as the host's current request.
fn in_request<R>(req: &TestRequest, f: impl FnOnce() -> R) -> R {
    with_host(|h| h.current_request = Some(req.id.clone()));
    let r = f();
    with_host(|h| h.current_request = None);
    r
}

/// An attempt record for tests: attempt `number` ended with `outcome` at `endpoint`.
pub fn attempt(number: u32, outcome: Outcome, endpoint: &str) -> Attempt {
    Attempt {
        number,
        outcome,
        service: "reviews".into(),
        subset: None,
        endpoint: Some(endpoint.into()),
        duration_us: 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::state::{self, UPDATE_TRIES, UpdateError};

    fn json(n: u64) -> Vec<u8> {
        serde_json::to_vec(&n).unwrap()
    }

    #[test]
    fn update_reads_again_after_a_lost_compare_and_set() {
        with_host(|h| {
            h.set("hits", &json(5)).unwrap();
            h.before_next_write(|other| {
                other.set("hits", &json(10)).unwrap();
            });
        });
        let mut calls = 0;
        let (new, seen) = state::update("hits", WriteOptions::default(), |old: Option<u64>| {
            calls += 1;
            (old.unwrap_or(0) + 1, old)
        })
        .unwrap();
        assert_eq!((new, seen, calls), (11, Some(10), 2));
        assert_eq!(with_host(|h| h.entry("hits")).unwrap().value, json(11));
    }

    #[test]
    fn contention_that_always_wins_is_an_error_after_the_tries() {
        fn another_instance(h: &mut TestHost) {
            h.add("writes", 1).unwrap();
            h.set("hot", b"1").unwrap();
            h.before_next_write(another_instance);
        }
        with_host(|h| h.before_next_write(another_instance));
        let r = state::update_bytes("hot", WriteOptions::default(), |_| b"mine".to_vec());
        assert_eq!(
            r,
            Err(UpdateError::Contention {
                key: "hot".into(),
                tries: UPDATE_TRIES
            })
        );
        with_host(|h| {
            assert_eq!(h.counter("writes"), i64::from(UPDATE_TRIES));
            assert_eq!(h.entry("hot").unwrap().value, b"1");
        });
    }

    #[test]
    fn entries_expire_on_the_fake_clock() {
        let ttl = WriteOptions::ttl_ms(1_000);
        state::update("bucket", ttl, |_: Option<u64>| (1, ())).unwrap();
        with_host(|h| h.advance(999));
        assert!(state::get("bucket").is_some());
        // A write with a time to live sets it again.
        state::update("bucket", ttl, |old: Option<u64>| (old.unwrap() + 1, ())).unwrap();
        with_host(|h| h.advance(999));
        assert_eq!(state::get("bucket").unwrap().value, json(2));
        with_host(|h| h.advance(1));
        assert_eq!(state::get("bucket"), None);
        assert_eq!(with_host(|h| h.keys()), 0);
    }

    #[test]
    fn a_stored_value_that_does_not_decode_is_left_as_it_is() {
        with_host(|h| h.set("k", b"not json").unwrap());
        let r = state::update("k", WriteOptions::default(), |_: Option<u64>| (1, ()));
        assert!(matches!(r, Err(UpdateError::Decode(_))), "{r:?}");
        assert_eq!(state::get("k").unwrap().value, b"not json");
    }

    #[test]
    fn a_full_scope_refuses_a_new_key_unless_the_write_evicts() {
        with_host(|h| {
            for i in 0..STATE_KEY_CAP {
                h.add(&format!("client-{i}"), 1).unwrap();
            }
        });
        let new = |options| state::update("newcomer", options, |_: Option<u64>| (1, ()));
        assert_eq!(
            new(WriteOptions::ttl_ms(10)),
            Err(UpdateError::State(StateError::TooManyKeys(
                STATE_KEY_CAP as u32
            )))
        );
        assert!(new(WriteOptions::ttl_ms(10).evicting()).is_ok());
        with_host(|h| {
            assert_eq!(h.keys(), STATE_KEY_CAP);
            assert_eq!(h.counter("client-0"), 0, "the least recently used went");
        });
    }

    #[test]
    fn a_version_read_before_a_delete_never_wins() {
        let stale = state::set("k", b"old").unwrap();
        assert!(state::delete("k"));
        let fresh = state::set("k", b"new").unwrap();
        assert_eq!(
            state::compare_and_set("k", b"lost", stale),
            Err(StateError::Conflict(fresh))
        );
        assert_eq!(
            state::delete_if("k", stale),
            Err(StateError::Conflict(fresh))
        );
        assert_eq!(state::delete_if("k", fresh), Ok(()));
    }
}

#[cfg(test)]
mod peer_tests {
    use crate::Peer;

    #[test]
    fn a_peer_gives_its_ip_apart_from_its_port() {
        let v6 = Peer {
            address: "[2001:db8::7]:443".into(),
            ..Peer::default()
        };
        assert_eq!(v6.ip(), Some("2001:db8::7".parse().unwrap()));
        assert_eq!(v6.port(), Some(443));
        let v4 = Peer {
            address: "10.0.0.1:5000".into(),
            ..Peer::default()
        };
        assert_eq!(v4.ip().unwrap().to_string(), "10.0.0.1");
        assert_eq!(Peer::default().ip(), None);
    }
}
