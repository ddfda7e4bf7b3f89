//! A native test harness for plugin logic: a fake host (a clock you advance,
//! seeded random numbers, in-memory shared state, recorded logs, metrics and
//! ejections) and a [`Harness`] that configures a plugin from JSON and calls
//! its declared hooks the way the proxy would.
//!
//! For plugin unit tests only: what crosses the real boundary is tested end to
//! end against the proxy.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::types::*;
use crate::view::{Request, RequestSource, Response, ResponseSource};
use crate::{Declared, Plugin, parse_config};

/// Per-entry cap on shared-state values in the fake host, as in the proxy's
/// default.
pub const STATE_VALUE_CAP: usize = 64 * 1024;
/// Key cap per scope in the fake host, as in the proxy's default.
pub const STATE_KEY_CAP: usize = 10_000;

/// The fake host a test's plugin calls go to.
#[derive(Default)]
pub struct TestHost {
    /// Current wall-clock time, ms since the epoch; advance it with [`TestHost::advance`].
    pub clock_ms: u64,
    /// Monotonic time, ns.
    pub mono_ns: u64,
    /// The random generator's state (splitmix64).
    pub seed: u64,
    /// Shared state entries.
    pub state: HashMap<String, StateEntry>,
    /// Shared counters.
    pub counters: HashMap<String, i64>,
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
            .field("counters", &self.counters)
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

    fn check_key(&self, key: &str, exists: bool) -> Result<(), StateError> {
        if key.is_empty() || key.len() > 256 {
            return Err(StateError::BadKey);
        }
        if !exists && self.state.len() + self.counters.len() >= STATE_KEY_CAP {
            return Err(StateError::TooManyKeys(STATE_KEY_CAP as u32));
        }
        Ok(())
    }

    pub(crate) fn state_get(&self, key: &str) -> Option<StateEntry> {
        self.state.get(key).cloned()
    }

    pub(crate) fn state_set(
        &mut self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
    ) -> Result<u64, StateError> {
        self.writing();
        let current = self.state.get(key).map_or(0, |e| e.version);
        self.check_key(key, current != 0)?;
        if value.len() > STATE_VALUE_CAP {
            return Err(StateError::TooLarge(STATE_VALUE_CAP as u32));
        }
        if let Some(v) = expected
            && v != current
        {
            return Err(StateError::Conflict(current));
        }
        let version = current + 1;
        self.state.insert(
            key.to_string(),
            StateEntry {
                value: value.to_vec(),
                version,
            },
        );
        Ok(version)
    }

    pub(crate) fn state_delete(&mut self, key: &str) -> bool {
        self.writing();
        self.state.remove(key).is_some()
    }

    pub(crate) fn counter_add(&mut self, key: &str, delta: i64) -> Result<i64, StateError> {
        self.writing();
        self.check_key(key, self.counters.contains_key(key))?;
        let c = self.counters.entry(key.to_string()).or_insert(0);
        *c = c.saturating_add(delta);
        Ok(*c)
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
        self.check_key(key, self.counters.contains_key(key))?;
        let current = self.counters.get(key).copied().unwrap_or(0);
        let new = current.saturating_add(delta);
        if new > limit {
            return Ok(None);
        }
        self.counters.insert(key.to_string(), new);
        self.holds.push((id, key.to_string(), delta));
        Ok(Some(new))
    }

    /// Undo the holds of request `id`, as the proxy does when it ends.
    pub fn release_holds(&mut self, id: &str) {
        let (mine, rest) = std::mem::take(&mut self.holds)
            .into_iter()
            .partition(|(r, _, _)| r == id);
        self.holds = rest;
        for (_, key, delta) in mine {
            *self.counters.entry(key).or_insert(0) -= delta;
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
/// did not declare is not called (the default decision is returned).
pub struct Harness<P> {
    plugin: P,
}

impl<P: Plugin + Declared> Harness<P> {
    /// Configure the plugin from JSON text, as the proxy does.
    pub fn new(config_json: &str) -> Result<Self, String> {
        Ok(Self {
            plugin: P::new(parse_config(config_json)?)?,
        })
    }

    /// The plugin.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    /// Call `on_request`.
    pub fn on_request(&self, req: &TestRequest) -> Result<RequestDecision, String> {
        if !P::HOOKS.on_request {
            return Ok(RequestDecision::default());
        }
        in_request(req, || self.plugin.on_request(&Request { inner: req }))
    }

    /// Call `on_response` with an upstream response for attempt `number`.
    pub fn on_response(
        &self,
        req: &TestRequest,
        resp: &TestResponse,
        attempt: &Attempt,
    ) -> Result<ResponseDecision, String> {
        if !P::HOOKS.on_response {
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
        if P::HOOKS.on_complete {
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
