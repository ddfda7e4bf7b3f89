//! The store data of a plugin instance and the host functions it imports:
//! the request/response views, log, clocks, random, shared state, endpoints,
//! ejection and custom metrics — plus the small WASI set a std guest touches
//! (random seed, clocks, stderr routed into the log), with no filesystem,
//! network, environment or arguments.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmesh_plugin_sdk::{self as sdk, RequestSource};
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{wit, wit_host};
use super::convert;
use super::state::{self, Scope};
use super::types::{Protocol, ReplyFlag, ResponseView};
use crate::http::headers::lossy;
use crate::metrics::Metrics;
use crate::upstream::cluster::ClusterView;

/// The request a hook is called for, moved into the store for the call.
#[derive(Debug)]
pub struct RequestView {
    /// Method, URI, headers (with earlier plugins' edits applied).
    pub parts: http::request::Parts,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The authority the client addressed (none: it named none).
    pub authority: Option<http::uri::Authority>,
    /// The destination port.
    pub port: u16,
    /// The downstream protocol.
    pub protocol: Protocol,
    /// The caller's address.
    pub source_address: Arc<str>,
    /// The caller's verified identity, when known.
    pub source_principal: Option<Arc<str>>,
    /// The destination service.
    pub service: Arc<str>,
    /// The request id (`x-request-id`, text).
    pub id: http::HeaderValue,
    /// Counter increments held by plugins for this request
    /// (`counter-hold`), undone when this is dropped.
    pub holds: state::Holds,
}

/// Marker type of the `request` resource (a borrow of the store's current request).
pub struct RequestRes;
/// Marker type of the `response` resource.
pub struct ResponseRes;

/// Where a plugin instance belongs: what its logs, state and metrics are
/// tagged and scoped with.
pub struct PluginScope {
    /// The service whose chain the plugin is in.
    pub service: Arc<str>,
    /// The plugin's name in the chain.
    pub plugin: Arc<str>,
    /// Its version (sha256 prefix).
    pub version: Arc<str>,
    /// Its shared state.
    pub state: Arc<Scope>,
    /// The serving snapshot's endpoints.
    pub cluster: Arc<arc_swap::ArcSwap<ClusterView>>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Its log lines at info and above, this second.
    pub log_budget: LogBudget,
}

/// Largest log message kept from a plugin, in bytes.
pub(crate) const LOG_CAP: usize = 4096;

/// Log lines at info and above a plugin may write per second (in one
/// chain); past it they are dropped and counted
/// (`wasmesh_plugin_log_dropped_total`), so that a plugin logging what
/// clients send cannot flood the proxy's log.
pub const LOG_LINES_PER_SECOND: u32 = 50;

/// A plugin's log lines this second.
#[derive(Debug, Default)]
pub struct LogBudget(Mutex<LogWindow>);

#[derive(Debug, Default)]
struct LogWindow {
    started: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl LogBudget {
    /// Whether a line may be written now, and how many were dropped in
    /// the window that just ended (reported once).
    fn take(&self) -> (bool, u64) {
        let mut w = self.0.lock().unwrap();
        let now = Instant::now();
        let mut ended = 0;
        if w.started
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            ended = std::mem::take(&mut w.dropped);
            w.started = Some(now);
            w.used = 0;
        }
        if w.used < LOG_LINES_PER_SECOND {
            w.used += 1;
            (true, ended)
        } else {
            w.dropped += 1;
            (false, ended)
        }
    }
}

/// An `on-request-table` as the plugin gave it: its rules, the decision
/// when none holds, and the reply flag set before it.
pub(crate) type RequestTableGiven = (Vec<wit_host::RequestRule>, wit::RequestDecision, ReplyFlag);

/// The data of one plugin instance's store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) req: Option<Box<RequestView>>,
    pub(crate) resp: Option<ResponseView>,
    /// What the current call asked its local reply to be flagged.
    pub(crate) reply_flag: ReplyFlag,
    /// What the plugin asked `on-response` for (`on-response-for`), read
    /// after its `configure`.
    pub(crate) outcomes: Option<sdk::Outcomes>,
    /// What the plugin said its `on-request` always decides
    /// (`on-request-fixed`), with the reply flag set before it; read after
    /// its `configure`.
    pub(crate) fixed: Option<(wit::RequestDecision, ReplyFlag, Option<wit_host::FixedHold>)>,
    /// The table the plugin said its `on-request` decides by
    /// (`on-request-table`): its rules, the decision when none holds, and
    /// the reply flag set before it; read after its `configure`.
    pub(crate) request_table: Option<RequestTableGiven>,
    scope: Arc<PluginScope>,
    rng: fastrand::Rng,
    pub(crate) deadline: super::Deadline,
}

impl HostState {
    pub(crate) fn new(scope: Arc<PluginScope>, limits: StoreLimits) -> Self {
        let stderr = GuestStderr {
            scope: scope.clone(),
            line: Arc::default(),
        };
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .stdout(stderr)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits,
            req: None,
            resp: None,
            reply_flag: ReplyFlag::LocalReply,
            outcomes: None,
            fixed: None,
            request_table: None,
            scope,
            rng: fastrand::Rng::new(),
            deadline: Default::default(),
        }
    }

    /// The request of the current call. Every hook that gets a request
    /// handle runs with one, `on-complete` included; a handle a guest kept
    /// past its call (which the component model forbids for a borrow)
    /// would read an empty request, never panic the host.
    fn req(&self) -> &RequestView {
        static EMPTY: std::sync::OnceLock<RequestView> = std::sync::OnceLock::new();
        self.req.as_deref().unwrap_or_else(|| {
            EMPTY.get_or_init(|| RequestView {
                parts: http::Request::new(()).into_parts().0,
                scheme: "http",
                authority: None,
                port: 0,
                protocol: Protocol::Http1,
                source_address: "".into(),
                source_principal: None,
                service: "".into(),
                id: http::HeaderValue::from_static(""),
                holds: Default::default(),
            })
        })
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The limiter `Store::limiter` consults.
pub(crate) fn limiter(state: &mut HostState) -> &mut dyn ResourceLimiter {
    &mut state.limits
}

impl wit::Host for HostState {}

/// The request as the SDK's native view reads it: what `wit::HostRequest`
/// hands a component, and what the proxy matches a chain entry's `match`
/// against (with the stock plugins' own matchers).
impl RequestSource for RequestView {
    fn method(&self) -> String {
        self.parts.method.as_str().to_string()
    }
    fn scheme(&self) -> String {
        self.scheme.to_string()
    }
    fn authority(&self) -> String {
        self.authority
            .as_ref()
            .map_or_else(String::new, |a| a.as_str().to_string())
    }
    fn path(&self) -> String {
        self.parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn protocol(&self) -> sdk::Protocol {
        match self.protocol {
            Protocol::Http1 => sdk::Protocol::Http1,
            Protocol::Http2 => sdk::Protocol::Http2,
            Protocol::Grpc => sdk::Protocol::Grpc,
        }
    }
    fn header(&self, name: &str) -> Option<String> {
        self.parts.headers.get(name).map(lossy)
    }
    fn header_all(&self, name: &str) -> Vec<String> {
        self.parts.headers.get_all(name).iter().map(lossy).collect()
    }
    fn headers(&self) -> Vec<sdk::Header> {
        self.parts
            .headers
            .iter()
            .map(|(n, v)| sdk::Header {
                name: n.as_str().to_string(),
                value: lossy(v),
            })
            .collect()
    }
    fn source(&self) -> sdk::Peer {
        let namespace = self
            .source_principal
            .as_deref()
            .and_then(|p| p.split("/ns/").nth(1))
            .and_then(|rest| rest.split('/').next())
            .map(str::to_string);
        sdk::Peer {
            principal: self.source_principal.as_deref().map(str::to_string),
            namespace,
            address: self.source_address.to_string(),
        }
    }
    fn service(&self) -> String {
        self.service.to_string()
    }
    fn id(&self) -> String {
        self.id.to_str().unwrap_or_default().to_string()
    }
}

impl wit::HostRequest for HostState {
    fn method(&mut self, _: Resource<RequestRes>) -> String {
        self.req().method()
    }
    fn scheme(&mut self, _: Resource<RequestRes>) -> String {
        RequestSource::scheme(self.req())
    }
    fn authority(&mut self, _: Resource<RequestRes>) -> String {
        RequestSource::authority(self.req())
    }
    fn path(&mut self, _: Resource<RequestRes>) -> String {
        self.req().path()
    }
    fn port(&mut self, _: Resource<RequestRes>) -> u16 {
        self.req().port
    }
    fn protocol(&mut self, _: Resource<RequestRes>) -> wit::Protocol {
        convert::protocol(self.req().protocol)
    }
    fn header(&mut self, _: Resource<RequestRes>, name: String) -> Option<String> {
        self.req().header(&name)
    }
    fn header_all(&mut self, _: Resource<RequestRes>, name: String) -> Vec<String> {
        self.req().header_all(&name)
    }
    fn headers(&mut self, _: Resource<RequestRes>) -> Vec<wit::Header> {
        convert::headers_list(&self.req().parts.headers)
    }
    fn source(&mut self, _: Resource<RequestRes>) -> wit::Peer {
        let p = RequestSource::source(self.req());
        wit::Peer {
            principal: p.principal,
            namespace: p.namespace,
            address: p.address,
        }
    }
    fn service(&mut self, _: Resource<RequestRes>) -> String {
        RequestSource::service(self.req())
    }
    fn id(&mut self, _: Resource<RequestRes>) -> String {
        RequestSource::id(self.req())
    }
    fn drop(&mut self, _: Resource<RequestRes>) -> wasmtime::Result<()> {
        // Handles are borrows of the store's current request; nothing to free.
        Ok(())
    }
}

impl wit::HostResponse for HostState {
    fn status(&mut self, _: Resource<ResponseRes>) -> u16 {
        self.resp.as_ref().map_or(0, |r| r.status)
    }
    fn header(&mut self, _: Resource<ResponseRes>, name: String) -> Option<String> {
        self.resp
            .as_ref()
            .and_then(|r| r.headers.get(name.as_str()))
            .map(lossy)
    }
    fn headers(&mut self, _: Resource<ResponseRes>) -> Vec<wit::Header> {
        self.resp
            .as_ref()
            .map(|r| convert::headers_list(&r.headers))
            .unwrap_or_default()
    }
    fn header_all(&mut self, _: Resource<ResponseRes>, name: String) -> Vec<String> {
        self.resp
            .as_ref()
            .map(|r| r.headers.get_all(name.as_str()).iter().map(lossy).collect())
            .unwrap_or_default()
    }
    fn drop(&mut self, _: Resource<ResponseRes>) -> wasmtime::Result<()> {
        Ok(())
    }
}

fn write_options(o: wit_host::WriteOptions) -> state::WriteOptions {
    state::WriteOptions {
        ttl_ms: Some(o.ttl_ms),
        when_full: match o.when_full {
            wit_host::WhenFull::Refuse => state::WhenFull::Refuse,
            wit_host::WhenFull::EvictLeastRecentlyUsed => state::WhenFull::EvictLeastRecentlyUsed,
        },
    }
}

impl PluginScope {
    /// A write's result for the plugin; a full scope counted.
    pub(crate) fn written<T>(
        &self,
        r: Result<state::Written<T>, state::StateError>,
    ) -> Result<T, wit_host::StateError> {
        match r {
            Ok(w) => {
                if w.evicted {
                    self.metrics
                        .plugin_state_full(&self.service, &self.plugin, true);
                }
                Ok(w.value)
            }
            Err(e) => {
                if e == state::StateError::TooManyKeys {
                    self.metrics
                        .plugin_state_full(&self.service, &self.plugin, false);
                }
                Err(state_error(e))
            }
        }
    }
}

fn state_error(e: state::StateError) -> wit_host::StateError {
    match e {
        state::StateError::Conflict(v) => wit_host::StateError::Conflict(v),
        state::StateError::TooLarge => wit_host::StateError::TooLarge(state::VALUE_CAP as u32),
        state::StateError::TooManyKeys => wit_host::StateError::TooManyKeys(state::KEY_CAP as u32),
        state::StateError::BadKey => wit_host::StateError::BadKey,
    }
}

/// The start of the proxy's monotonic clock (`monotonic-ns`, and shared
/// state's expiry).
pub(crate) fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl wit_host::Host for HostState {
    fn log(&mut self, level: wit_host::LogLevel, mut message: String) {
        if message.len() > LOG_CAP {
            let mut cut = LOG_CAP;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let s = &self.scope;
        let (service, plugin, version) = (&*s.service, &*s.plugin, &*s.version);
        if !matches!(level, wit_host::LogLevel::Trace | wit_host::LogLevel::Debug) {
            let (write, dropped) = s.log_budget.take();
            if dropped > 0 {
                tracing::warn!(
                    target: "wasmesh::plugin", service, plugin, version,
                    "{dropped} log lines dropped in a second (more than {LOG_LINES_PER_SECOND} a second at info and above)"
                );
            }
            if !write {
                s.metrics.plugin_log_dropped(service, plugin);
                return;
            }
        }
        match level {
            wit_host::LogLevel::Trace => {
                tracing::trace!(target: "wasmesh::plugin", service, plugin, version, "{message}")
            }
            wit_host::LogLevel::Debug => {
                tracing::debug!(target: "wasmesh::plugin", service, plugin, version, "{message}")
            }
            wit_host::LogLevel::Info => {
                tracing::info!(target: "wasmesh::plugin", service, plugin, version, "{message}")
            }
            wit_host::LogLevel::Warn => {
                tracing::warn!(target: "wasmesh::plugin", service, plugin, version, "{message}")
            }
            wit_host::LogLevel::Error => {
                tracing::error!(target: "wasmesh::plugin", service, plugin, version, "{message}")
            }
        }
    }

    fn now_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn monotonic_ns(&mut self) -> u64 {
        process_start().elapsed().as_nanos() as u64
    }

    fn random_u64(&mut self) -> u64 {
        self.rng.u64(..)
    }

    fn state_get(&mut self, key: String) -> Option<wit_host::StateEntry> {
        self.scope
            .state
            .get(&key, state::now())
            .map(|(value, version)| wit_host::StateEntry {
                value: value.to_vec(),
                version,
            })
    }

    fn state_set(
        &mut self,
        key: String,
        value: Vec<u8>,
        expected_version: Option<u64>,
    ) -> Result<u64, wit_host::StateError> {
        let options = state::WriteOptions::default();
        let r = self
            .scope
            .state
            .set(&key, &value, expected_version, options, state::now());
        self.scope.written(r)
    }

    fn state_set_with(
        &mut self,
        key: String,
        value: Vec<u8>,
        expected_version: Option<u64>,
        options: wit_host::WriteOptions,
    ) -> Result<u64, wit_host::StateError> {
        let r = self.scope.state.set(
            &key,
            &value,
            expected_version,
            write_options(options),
            state::now(),
        );
        self.scope.written(r)
    }

    fn state_delete(&mut self, key: String) -> bool {
        self.scope.state.delete(&key, state::now())
    }

    fn state_delete_if(&mut self, key: String, version: u64) -> Result<(), wit_host::StateError> {
        self.scope
            .state
            .delete_if(&key, version, state::now())
            .map_err(state_error)
    }

    fn counter_add(&mut self, key: String, delta: i64) -> Result<i64, wit_host::StateError> {
        let options = state::WriteOptions::default();
        let r = self
            .scope
            .state
            .counter_add(&key, delta, options, state::now());
        self.scope.written(r)
    }

    fn counter_add_with(
        &mut self,
        key: String,
        delta: i64,
        options: wit_host::WriteOptions,
    ) -> Result<i64, wit_host::StateError> {
        let r = self
            .scope
            .state
            .counter_add(&key, delta, write_options(options), state::now());
        self.scope.written(r)
    }

    fn counter_get(&mut self, key: String) -> i64 {
        self.scope.state.counter_get(&key, state::now())
    }

    fn counter_hold(&mut self, key: String, delta: i64) -> Result<i64, wit_host::StateError> {
        let Some(req) = self.req.as_mut() else {
            return Err(wit_host::StateError::NoRequest);
        };
        let r = req.holds.hold(&self.scope.state, key, delta);
        self.scope.written(r.map(|value| state::Written {
            value,
            evicted: false,
        }))
    }

    fn counter_hold_within(
        &mut self,
        key: String,
        delta: i64,
        limit: i64,
    ) -> Result<Option<i64>, wit_host::StateError> {
        let Some(req) = self.req.as_mut() else {
            return Err(wit_host::StateError::NoRequest);
        };
        let r = req.holds.hold_within(&self.scope.state, key, delta, limit);
        self.scope.written(r.map(|value| state::Written {
            value,
            evicted: false,
        }))
    }

    fn set_reply_flag(&mut self, flag: wit_host::ReplyFlag) {
        self.reply_flag = convert::reply_flag(flag);
    }

    fn on_response_for(&mut self, outcomes: wit_host::OutcomeSet) {
        self.outcomes = Some(convert::outcomes(outcomes));
    }

    fn on_request_fixed(
        &mut self,
        decision: wit::RequestDecision,
        hold: Option<wit_host::FixedHold>,
    ) {
        // Only `configure` runs without a request; elsewhere it is ignored.
        if self.req.is_none() {
            self.fixed = Some((decision, self.reply_flag, hold));
        }
    }

    fn on_request_table(
        &mut self,
        rules: Vec<wit_host::RequestRule>,
        otherwise: wit::RequestDecision,
    ) {
        // Only `configure` runs without a request; elsewhere it is ignored.
        if self.req.is_none() {
            self.request_table = Some((rules, otherwise, self.reply_flag));
        }
    }

    fn endpoints(&mut self, service: Option<String>) -> Vec<wit_host::Endpoint> {
        let cluster = self.scope.cluster.load();
        let service = service.as_deref().unwrap_or(&self.scope.service);
        cluster
            .endpoints(service)
            .iter()
            .map(|e| wit_host::Endpoint {
                subset: e.subset.to_string(),
                address: e.address.to_string(),
                ejected: cluster.table.is_ejected(&e.state),
            })
            .collect()
    }

    fn eject(&mut self, endpoint: String, duration_ms: u32) -> bool {
        let cluster = self.scope.cluster.load();
        let mut found = false;
        for e in cluster.endpoints(&self.scope.service) {
            if *e.address == *endpoint {
                cluster.table.eject(&e.state, duration_ms);
                found = true;
            }
        }
        if found {
            tracing::info!(
                service = &*self.scope.service,
                plugin = &*self.scope.plugin,
                endpoint,
                duration_ms,
                "endpoint ejected"
            );
        }
        found
    }

    fn metric_add(&mut self, name: String, delta: u64) {
        let s = &self.scope;
        s.metrics
            .plugin_custom_add(&s.service, &s.plugin, &name, delta);
    }
}

/// A guest's stdout and stderr: whole lines go to the log, tagged with the
/// plugin (a panic message arrives this way).
#[derive(Clone)]
struct GuestStderr {
    scope: Arc<PluginScope>,
    line: Arc<Mutex<Vec<u8>>>,
}

impl GuestStderr {
    fn push(&self, bytes: &[u8]) {
        let mut line = self.line.lock().unwrap();
        for &b in bytes {
            if b == b'\n' || line.len() >= LOG_CAP {
                self.emit(&line);
                line.clear();
                if b == b'\n' {
                    continue;
                }
            }
            line.push(b);
        }
    }

    fn emit(&self, line: &[u8]) {
        let s = &self.scope;
        tracing::warn!(
            target: "wasmesh::plugin",
            service = &*s.service,
            plugin = &*s.plugin,
            version = &*s.version,
            "stderr: {}",
            String::from_utf8_lossy(line)
        );
    }
}

impl IsTerminal for GuestStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStderr {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestStderr {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(LOG_CAP)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestStderr {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStderr {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
