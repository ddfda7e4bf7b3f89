//! Benchmark-only (feature `native-chain`): a plugin's logic linked into the
//! proxy and called without the WebAssembly boundary, to measure what that
//! boundary costs. A chain entry `source: native:<name>` runs the plugin the
//! binary registered under `<name>` (its identity and hooks come from
//! `builtin:<name>`); everything else — the host functions, the request and
//! response views, the decision checks and merge — is the same code the
//! component path runs. Production builds don't have this module.

use std::sync::{Arc, Mutex, OnceLock};

use wasmesh_plugin_sdk as sdk;
use wasmesh_plugin_sdk::native::{NativeFilter, NativeHost};
use wasmesh_plugin_sdk::{RequestSource, ResponseSource};
use wasmtime::StoreLimits;
use wasmtime::component::Resource;

use super::bindings::{wit, wit_host};
use super::host::{HostState, PluginScope, RequestView};
use super::types::{ReplyFlag, ResponseView};

/// Builds a configured native plugin from its JSON configuration.
pub type Factory = fn(&str) -> Result<Box<dyn NativeFilter>, String>;

static REGISTRY: OnceLock<Vec<(&'static str, Factory)>> = OnceLock::new();

/// Register the native plugins `native:<name>` may name (once, at start).
pub fn register(plugins: Vec<(&'static str, Factory)>) {
    let _ = REGISTRY.set(plugins);
}

/// The registered plugin `name`.
pub(crate) fn factory(name: &str) -> Option<Factory> {
    REGISTRY
        .get()?
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
}

/// The names registered.
pub(crate) fn registered() -> Vec<&'static str> {
    REGISTRY
        .get()
        .map(|r| r.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default()
}

/// A configured native plugin and a pool of host states (one per concurrent
/// call, as the component path pools instances).
pub(crate) struct NativePlugin {
    filter: Box<dyn NativeFilter>,
    scope: Arc<PluginScope>,
    pool: Mutex<Vec<Arc<Host>>>,
}

/// One host state, serving the SDK's host functions and views for one call.
struct Host(Mutex<HostState>);

impl Host {
    fn with<R>(&self, f: impl FnOnce(&mut HostState) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
}

impl NativePlugin {
    pub(crate) fn new(
        factory: Factory,
        config_json: &str,
        scope: Arc<PluginScope>,
    ) -> Result<Self, String> {
        Ok(Self {
            filter: factory(config_json)?,
            scope,
            pool: Mutex::default(),
        })
    }

    /// Run `f` with the request (and response) moved into a pooled host
    /// state, as the component path moves them into a store.
    fn call<R>(
        &self,
        req: &mut Option<Box<RequestView>>,
        resp: Option<&mut Option<ResponseView>>,
        f: impl FnOnce(&Host) -> R,
    ) -> R {
        let host = self.pool.lock().unwrap().pop().unwrap_or_else(|| {
            Arc::new(Host(Mutex::new(HostState::new(
                self.scope.clone(),
                StoreLimits::default(),
            ))))
        });
        let mut resp = resp;
        host.with(|s| {
            s.req = req.take();
            if let Some(r) = resp.as_deref_mut() {
                s.resp = r.take();
            }
        });
        let dyn_host: Arc<dyn NativeHost + Send + Sync> = host.clone();
        let result = sdk::native::with_host(&dyn_host, || f(&host));
        host.with(|s| {
            *req = s.req.take();
            if let Some(r) = resp {
                *r = s.resp.take();
            }
        });
        self.pool.lock().unwrap().push(host);
        result
    }

    pub(crate) fn on_request(
        &self,
        req: &mut Option<Box<RequestView>>,
    ) -> Result<(wit::RequestDecision, ReplyFlag), String> {
        let d = self.call(req, None, |h| self.filter.on_request(h));
        d.map(|d| {
            let flag = reply_flag(d.reply.as_ref());
            (request_decision(d), flag)
        })
    }

    pub(crate) fn on_response(
        &self,
        req: &mut Option<Box<RequestView>>,
        resp: &mut Option<ResponseView>,
        attempt: &wit::Attempt,
    ) -> Result<(wit::ResponseDecision, ReplyFlag), String> {
        let attempt = sdk::Attempt {
            number: attempt.number,
            outcome: match attempt.outcome {
                wit::Outcome::Response(s) => sdk::Outcome::Response(s),
                wit::Outcome::LocalReply(s) => sdk::Outcome::LocalReply(s),
                wit::Outcome::ConnectFailure => sdk::Outcome::ConnectFailure,
                wit::Outcome::Reset => sdk::Outcome::Reset,
                wit::Outcome::Timeout => sdk::Outcome::Timeout,
                wit::Outcome::NoHealthyEndpoint => sdk::Outcome::NoHealthyEndpoint,
                wit::Outcome::Overflow => sdk::Outcome::Overflow,
            },
            service: attempt.service.clone(),
            subset: attempt.subset.clone(),
            endpoint: attempt.endpoint.clone(),
            duration_us: attempt.duration_us,
        };
        let d = self.call(req, Some(resp), |h| self.filter.on_response(h, h, &attempt));
        d.map(|d| {
            let flag = reply_flag(d.reply.as_ref());
            let d = wit::ResponseDecision {
                response_headers: header_ops(d.response_headers),
                reply: d.reply.map(local_reply),
                retry: d.retry_after_ms.map(|backoff_ms| wit::Retry { backoff_ms }),
            };
            (d, flag)
        })
    }

    pub(crate) fn on_complete(&self, req: &mut Option<Box<RequestView>>, done: wit::Completion) {
        let done = sdk::Completion {
            status: done.status,
            attempts: done.attempts,
            duration_us: done.duration_us,
        };
        self.call(req, None, |h| self.filter.on_complete(h, &done))
    }
}

/// The flag an SDK plugin gave its reply (a component tells the host with
/// `set-reply-flag` instead).
fn reply_flag(r: Option<&sdk::LocalReply>) -> ReplyFlag {
    match r.map(|r| r.flag) {
        Some(sdk::ReplyFlag::Overflow) => ReplyFlag::Overflow,
        Some(sdk::ReplyFlag::RateLimited) => ReplyFlag::RateLimited,
        _ => ReplyFlag::LocalReply,
    }
}

fn borrow<T: 'static>() -> Resource<T> {
    Resource::new_borrow(0)
}

fn header(h: wit::Header) -> sdk::Header {
    sdk::Header {
        name: h.name,
        value: h.value,
    }
}

impl RequestSource for Host {
    fn method(&self) -> String {
        self.with(|s| wit::HostRequest::method(s, borrow()))
    }
    fn scheme(&self) -> String {
        self.with(|s| wit::HostRequest::scheme(s, borrow()))
    }
    fn authority(&self) -> String {
        self.with(|s| wit::HostRequest::authority(s, borrow()))
    }
    fn path(&self) -> String {
        self.with(|s| wit::HostRequest::path(s, borrow()))
    }
    fn port(&self) -> u16 {
        self.with(|s| wit::HostRequest::port(s, borrow()))
    }
    fn protocol(&self) -> sdk::Protocol {
        match self.with(|s| wit::HostRequest::protocol(s, borrow())) {
            wit::Protocol::Http1 => sdk::Protocol::Http1,
            wit::Protocol::Http2 => sdk::Protocol::Http2,
            wit::Protocol::Grpc => sdk::Protocol::Grpc,
        }
    }
    fn header(&self, name: &str) -> Option<String> {
        self.with(|s| wit::HostRequest::header(s, borrow(), name.to_string()))
    }
    fn header_all(&self, name: &str) -> Vec<String> {
        self.with(|s| wit::HostRequest::header_all(s, borrow(), name.to_string()))
    }
    fn headers(&self) -> Vec<sdk::Header> {
        let list = self.with(|s| wit::HostRequest::headers(s, borrow()));
        list.into_iter().map(header).collect()
    }
    fn source(&self) -> sdk::Peer {
        let p = self.with(|s| wit::HostRequest::source(s, borrow()));
        sdk::Peer {
            principal: p.principal,
            namespace: p.namespace,
            address: p.address,
        }
    }
    fn service(&self) -> String {
        self.with(|s| wit::HostRequest::service(s, borrow()))
    }
    fn id(&self) -> String {
        self.with(|s| wit::HostRequest::id(s, borrow()))
    }
}

impl ResponseSource for Host {
    fn status(&self) -> u16 {
        self.with(|s| wit::HostResponse::status(s, borrow()))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.with(|s| wit::HostResponse::header(s, borrow(), name.to_string()))
    }
    fn headers(&self) -> Vec<sdk::Header> {
        let list = self.with(|s| wit::HostResponse::headers(s, borrow()));
        list.into_iter().map(header).collect()
    }
    fn header_all(&self, name: &str) -> Vec<String> {
        self.with(|s| wit::HostResponse::header_all(s, borrow(), name.to_string()))
    }
}

fn write_options(o: sdk::WriteOptions) -> wit_host::WriteOptions {
    wit_host::WriteOptions {
        ttl_ms: o.ttl_ms,
        when_full: if o.evict_least_recently_used {
            wit_host::WhenFull::EvictLeastRecentlyUsed
        } else {
            wit_host::WhenFull::Refuse
        },
    }
}

fn state_error(e: wit_host::StateError) -> sdk::StateError {
    match e {
        wit_host::StateError::Conflict(v) => sdk::StateError::Conflict(v),
        wit_host::StateError::TooLarge(c) => sdk::StateError::TooLarge(c),
        wit_host::StateError::TooManyKeys(c) => sdk::StateError::TooManyKeys(c),
        wit_host::StateError::BadKey => sdk::StateError::BadKey,
        wit_host::StateError::NoRequest => sdk::StateError::NoRequest,
    }
}

impl NativeHost for Host {
    fn log(&self, level: sdk::Level, message: &str) {
        let level = match level {
            sdk::Level::Trace => wit_host::LogLevel::Trace,
            sdk::Level::Debug => wit_host::LogLevel::Debug,
            sdk::Level::Info => wit_host::LogLevel::Info,
            sdk::Level::Warn => wit_host::LogLevel::Warn,
            sdk::Level::Error => wit_host::LogLevel::Error,
        };
        self.with(|s| wit_host::Host::log(s, level, message.to_string()))
    }
    fn now_ms(&self) -> u64 {
        self.with(wit_host::Host::now_ms)
    }
    fn monotonic_ns(&self) -> u64 {
        self.with(wit_host::Host::monotonic_ns)
    }
    fn random_u64(&self) -> u64 {
        self.with(wit_host::Host::random_u64)
    }
    fn state_get(&self, key: &str) -> Option<sdk::StateEntry> {
        self.with(|s| wit_host::Host::state_get(s, key.to_string()))
            .map(|e| sdk::StateEntry {
                value: e.value,
                version: e.version,
            })
    }
    fn state_set(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
    ) -> Result<u64, sdk::StateError> {
        self.with(|s| wit_host::Host::state_set(s, key.to_string(), value.to_vec(), expected))
            .map_err(state_error)
    }
    fn state_set_with(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        options: sdk::WriteOptions,
    ) -> Result<u64, sdk::StateError> {
        self.with(|s| {
            wit_host::Host::state_set_with(
                s,
                key.to_string(),
                value.to_vec(),
                expected,
                write_options(options),
            )
        })
        .map_err(state_error)
    }
    fn state_delete(&self, key: &str) -> bool {
        self.with(|s| wit_host::Host::state_delete(s, key.to_string()))
    }
    fn state_delete_if(&self, key: &str, version: u64) -> Result<(), sdk::StateError> {
        self.with(|s| wit_host::Host::state_delete_if(s, key.to_string(), version))
            .map_err(state_error)
    }
    fn counter_add(&self, key: &str, delta: i64) -> Result<i64, sdk::StateError> {
        self.with(|s| wit_host::Host::counter_add(s, key.to_string(), delta))
            .map_err(state_error)
    }
    fn counter_add_with(
        &self,
        key: &str,
        delta: i64,
        options: sdk::WriteOptions,
    ) -> Result<i64, sdk::StateError> {
        self.with(|s| {
            wit_host::Host::counter_add_with(s, key.to_string(), delta, write_options(options))
        })
        .map_err(state_error)
    }
    fn counter_get(&self, key: &str) -> i64 {
        self.with(|s| wit_host::Host::counter_get(s, key.to_string()))
    }
    fn counter_hold(&self, key: &str, delta: i64) -> Result<i64, sdk::StateError> {
        self.with(|s| wit_host::Host::counter_hold(s, key.to_string(), delta))
            .map_err(state_error)
    }
    fn counter_hold_within(
        &self,
        key: &str,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, sdk::StateError> {
        self.with(|s| wit_host::Host::counter_hold_within(s, key.to_string(), delta, limit))
            .map_err(state_error)
    }
    fn endpoints(&self, service: Option<&str>) -> Vec<sdk::Endpoint> {
        self.with(|s| wit_host::Host::endpoints(s, service.map(str::to_string)))
            .into_iter()
            .map(|e| sdk::Endpoint {
                subset: e.subset,
                address: e.address,
                ejected: e.ejected,
            })
            .collect()
    }
    fn eject(&self, endpoint: &str, duration_ms: u32) -> bool {
        self.with(|s| wit_host::Host::eject(s, endpoint.to_string(), duration_ms))
    }
    fn metric_add(&self, name: &str, delta: u64) {
        self.with(|s| wit_host::Host::metric_add(s, name.to_string(), delta))
    }
}

fn wit_header(h: sdk::Header) -> wit::Header {
    wit::Header {
        name: h.name,
        value: h.value,
    }
}

fn header_ops(ops: Vec<sdk::HeaderOp>) -> Vec<wit::HeaderOp> {
    ops.into_iter()
        .map(|op| match op {
            sdk::HeaderOp::Set(h) => wit::HeaderOp::Set(wit_header(h)),
            sdk::HeaderOp::Append(h) => wit::HeaderOp::Append(wit_header(h)),
            sdk::HeaderOp::Remove(n) => wit::HeaderOp::Remove(n),
        })
        .collect()
}

fn local_reply(r: sdk::LocalReply) -> wit::LocalReply {
    wit::LocalReply {
        status: r.status,
        headers: r.headers.into_iter().map(wit_header).collect(),
        body: r.body,
    }
}

fn request_decision(d: sdk::RequestDecision) -> wit::RequestDecision {
    wit::RequestDecision {
        request_headers: header_ops(d.request_headers),
        response_headers: header_ops(d.response_headers),
        route: d.route.map(|r| wit::Route {
            service: r.service,
            subset: r.subset,
            path: r.path,
            authority: r.authority,
        }),
        timeout_ms: d.timeout_ms,
        per_try_timeout_ms: d.per_try_timeout_ms,
        delay_ms: d.delay_ms,
        reply: d.reply.map(local_reply),
    }
}
