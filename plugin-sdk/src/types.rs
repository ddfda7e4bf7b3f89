//! The values plugins exchange with the host, as plain Rust types.
//!
//! They mirror the WIT records of `wasmesh:plugin` one for one; the SDK
//! converts at the boundary so that plugin code never names generated types.

/// One HTTP header (lowercase name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Lowercase name.
    pub name: String,
    /// Value.
    pub value: String,
}

impl Header {
    /// A header from a name (lowercased here) and a value.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        let mut name = name.into();
        name.make_ascii_lowercase();
        Self {
            name,
            value: value.into(),
        }
    }
}

/// The protocol the downstream client spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 (not gRPC).
    Http2,
    /// gRPC over HTTP/2.
    Grpc,
}

/// Who sent the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Verified identity (SPIFFE ID), when known.
    pub principal: Option<String>,
    /// Namespace, when known.
    pub namespace: Option<String>,
    /// `ip:port` of the caller.
    pub address: String,
}

impl Peer {
    /// The caller's IP address (v4 or v6), without its port.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.socket().map(|a| a.ip())
    }

    /// The caller's port.
    pub fn port(&self) -> Option<u16> {
        self.socket().map(|a| a.port())
    }

    fn socket(&self) -> Option<std::net::SocketAddr> {
        self.address.parse().ok()
    }
}

/// A change to a header set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderOp {
    /// Replace every value of the header.
    Set(Header),
    /// Add a value.
    Append(Header),
    /// Remove every value of the header (lowercase name).
    Remove(String),
}

/// Where a request goes. `None` fields keep what was decided before.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// Target service (default: the one addressed).
    pub service: Option<String>,
    /// Subset of the target service.
    pub subset: Option<String>,
    /// New path (with query) sent upstream.
    pub path: Option<String>,
    /// New authority sent upstream.
    pub authority: Option<String>,
}

/// How the proxy flags a local reply (`x-wasmesh-flags`, and the
/// `response_flags` label of its request metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyFlag {
    /// `LR`: a local reply.
    #[default]
    LocalReply,
    /// `UO`: an overflow, such as a circuit breaker's pending-request limit.
    Overflow,
    /// `RL`: the request was rate limited.
    RateLimited,
}

/// A response produced by the plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    /// Status code, 200..=599.
    pub status: u16,
    /// Headers.
    pub headers: Vec<Header>,
    /// Body.
    pub body: Vec<u8>,
    /// How the proxy flags it (default `LR`).
    pub flag: ReplyFlag,
}

impl LocalReply {
    /// A reply with a status and a text body (`content-type: text/plain`).
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![Header::new("content-type", "text/plain; charset=utf-8")],
            body: body.into().into_bytes(),
            flag: ReplyFlag::LocalReply,
        }
    }

    /// Add a header to the reply.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Flag the reply as something other than a plain local reply, e.g.
    /// [`ReplyFlag::Overflow`] for a circuit breaker's limit.
    pub fn flagged(mut self, flag: ReplyFlag) -> Self {
        self.flag = flag;
        self
    }
}

/// What a plugin decided in `on_request`. The default decides nothing.
/// See the WIT documentation of `request-decision` for how a chain merges them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestDecision {
    /// Edits to the request headers sent upstream.
    pub request_headers: Vec<HeaderOp>,
    /// Edits to the response headers sent to the client.
    pub response_headers: Vec<HeaderOp>,
    /// Where to send the request.
    pub route: Option<Route>,
    /// Deadline for the whole request, milliseconds.
    pub timeout_ms: Option<u32>,
    /// Deadline per attempt, milliseconds.
    pub per_try_timeout_ms: Option<u32>,
    /// Wait before calling the upstream, milliseconds.
    pub delay_ms: Option<u32>,
    /// Answer now instead of calling the upstream.
    pub reply: Option<LocalReply>,
}

impl RequestDecision {
    /// Carry on unchanged.
    pub fn proceed() -> Self {
        Self::default()
    }

    /// Answer the request with `reply`.
    pub fn reply(reply: LocalReply) -> Self {
        Self {
            reply: Some(reply),
            ..Self::default()
        }
    }

    /// Set a request header.
    pub fn set_request_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.request_headers
            .push(HeaderOp::Set(Header::new(name, value)));
        self
    }

    /// Set a response header.
    pub fn set_response_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.response_headers
            .push(HeaderOp::Set(Header::new(name, value)));
        self
    }

    /// Route to a subset of the addressed service.
    pub fn route_subset(mut self, subset: impl Into<String>) -> Self {
        self.route.get_or_insert_with(Route::default).subset = Some(subset.into());
        self
    }
}

/// What `on_request` decides for every request under a configuration that
/// makes it not depend on the request ([`crate::Plugin::fixed_on_request`]):
/// the proxy applies it without calling the plugin.
///
/// ```
/// use wasmesh_plugin_sdk::{FixedRequest, RequestDecision};
/// // A per-try timeout on every request:
/// let fixed = FixedRequest::decide(RequestDecision { per_try_timeout_ms: Some(250), ..Default::default() });
/// // A pending-request cap: hold a counter for each request; the plugin is
/// // called (to reply 503) only for a request that finds it at 100.
/// let capped = FixedRequest::decide(RequestDecision::proceed()).holding("in-flight", Some(100));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FixedRequest {
    /// The decision.
    pub decision: RequestDecision,
    /// A counter held for each request first (as `counter_hold(key, 1)`),
    /// and the most it may reach: a request that would take it past the
    /// limit holds nothing and is given to `on_request` as usual.
    pub hold: Option<FixedHold>,
}

/// The counter of a [`FixedRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedHold {
    /// The key, in this plugin's shared state (1 to 256 bytes).
    pub key: String,
    /// The most the counter may reach; `None`: no limit.
    pub limit: Option<i64>,
}

impl FixedRequest {
    /// `decision` for every request.
    pub fn decide(decision: RequestDecision) -> Self {
        Self {
            decision,
            hold: None,
        }
    }

    /// And hold the counter `key` for each request first, up to `limit`.
    pub fn holding(mut self, key: impl Into<String>, limit: Option<i64>) -> Self {
        self.hold = Some(FixedHold {
            key: key.into(),
            limit,
        });
        self
    }
}

/// The table `on_request` decides by ([`crate::Plugin::table_on_request`]):
/// the proxy evaluates it without calling the plugin.
///
/// ```
/// use wasmesh_plugin_sdk::{LocalReply, RequestDecision, RequestTable, Route, TableRule};
/// let to = |subset: &str| RequestDecision {
///     route: Some(Route { subset: Some(subset.into()), ..Default::default() }),
///     ..Default::default()
/// };
/// let table = RequestTable {
///     rules: vec![
///         // `end-user: jason` goes to v2; everyone else 90/10 to v1/v3.
///         TableRule::when(r#"[{"headers":{"end-user":{"exact":"jason"}}}]"#, to("v2")),
///         TableRule::always(to("v1")).weight(90).or(10, to("v3")),
///     ],
///     otherwise: RequestDecision::reply(LocalReply::text(404, "no route\n")),
/// };
/// assert_eq!(table.rules[1].decisions.len(), 2);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestTable {
    /// In order: the first whose `when` holds decides.
    pub rules: Vec<TableRule>,
    /// The decision when no rule holds.
    pub otherwise: RequestDecision,
}

/// One rule of a [`RequestTable`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRule {
    /// The requests it is for: a JSON list of Istio `HTTPMatchRequest`s,
    /// any of which may hold; empty (or `[]`): every request.
    pub when: String,
    /// Its decisions and their weights: one drawn per request, with
    /// probability weight / (sum of the weights). At least one weight
    /// above 0.
    pub decisions: Vec<(u32, RequestDecision)>,
    /// A plugin counter (as [`crate::host::metric_add`]) the proxy adds 1
    /// to for each request this rule decides.
    pub count: Option<String>,
    /// A line the proxy logs at debug level, as this plugin's
    /// [`crate::host::log`], for each request this rule decides, with
    /// `{method}`, `{path}` (without the query) and `{source}` (the
    /// caller's address) replaced by the request's.
    pub log: Option<String>,
}

impl TableRule {
    /// `decision` (weight 1) for the requests `when` holds for.
    pub fn when(when: impl Into<String>, decision: RequestDecision) -> Self {
        Self {
            when: when.into(),
            decisions: vec![(1, decision)],
            count: None,
            log: None,
        }
    }

    /// `decision` (weight 1) for every request.
    pub fn always(decision: RequestDecision) -> Self {
        Self::when(String::new(), decision)
    }

    /// Set the weight of the last decision added.
    pub fn weight(mut self, weight: u32) -> Self {
        if let Some(last) = self.decisions.last_mut() {
            last.0 = weight;
        }
        self
    }

    /// And `decision`, drawn with `weight`.
    pub fn or(mut self, weight: u32, decision: RequestDecision) -> Self {
        self.decisions.push((weight, decision));
        self
    }

    /// And count the requests it decides in the plugin counter `name`.
    pub fn counting(mut self, name: impl Into<String>) -> Self {
        self.count = Some(name.into());
        self
    }

    /// And log `line` at debug level for each request it decides
    /// (`{method}`, `{path}` and `{source}` filled in by the proxy).
    pub fn logging(mut self, line: impl Into<String>) -> Self {
        self.log = Some(line.into());
        self
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Response(u16),
    /// A plugin answered locally with this status.
    LocalReply(u16),
    /// No connection could be made.
    ConnectFailure,
    /// Reset before a response.
    Reset,
    /// Past a timeout.
    Timeout,
    /// No endpoint available.
    NoHealthyEndpoint,
    /// A limit was full.
    Overflow,
}

impl Outcome {
    /// The status code, for a response or local reply.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Response(s) | Outcome::LocalReply(s) => Some(*s),
            _ => None,
        }
    }
}

/// One attempt at the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first try.
    pub number: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Service called.
    pub service: String,
    /// Subset chosen.
    pub subset: Option<String>,
    /// Endpoint called.
    pub endpoint: Option<String>,
    /// Duration, microseconds.
    pub duration_us: u64,
}

/// What a plugin decided in `on_response`. The default decides nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseDecision {
    /// Edits to the response headers.
    pub response_headers: Vec<HeaderOp>,
    /// Send this instead.
    pub reply: Option<LocalReply>,
    /// Retry after this many milliseconds.
    pub retry_after_ms: Option<u32>,
}

impl ResponseDecision {
    /// Carry on.
    pub fn proceed() -> Self {
        Self::default()
    }

    /// Ask for another attempt after `backoff_ms`.
    pub fn retry(backoff_ms: u32) -> Self {
        Self {
            retry_after_ms: Some(backoff_ms),
            ..Self::default()
        }
    }
}

/// How the request ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Status sent to the client; `None` when the client went away first.
    pub status: Option<u16>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Total duration, microseconds.
    pub duration_us: u64,
}

/// Which hooks a plugin implements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    /// `on_request`.
    pub on_request: bool,
    /// `on_response`.
    pub on_response: bool,
    /// `on_complete`.
    pub on_complete: bool,
}

impl Hooks {
    /// No hook: a plugin whose configuration needs none is never called.
    pub const NONE: Hooks = Hooks {
        on_request: false,
        on_response: false,
        on_complete: false,
    };

    /// The hooks in both.
    pub const fn and(self, other: Hooks) -> Hooks {
        Hooks {
            on_request: self.on_request && other.on_request,
            on_response: self.on_response && other.on_response,
            on_complete: self.on_complete && other.on_complete,
        }
    }
}

/// Kinds of attempt outcome: which ones a plugin wants `on_response` for
/// ([`crate::Plugin::response_outcomes`]). Combine them with `|`:
/// `Outcomes::STATUS_5XX | Outcomes::CONNECT_FAILURE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcomes(u16);

impl Outcomes {
    /// No outcome: `on_response` is never called.
    pub const NONE: Outcomes = Outcomes(0);
    /// A response with a 1xx status (a protocol switch).
    pub const STATUS_1XX: Outcomes = Outcomes(1 << 0);
    /// A response with a 2xx status.
    pub const STATUS_2XX: Outcomes = Outcomes(1 << 1);
    /// A response with a 3xx status.
    pub const STATUS_3XX: Outcomes = Outcomes(1 << 2);
    /// A response with a 4xx status.
    pub const STATUS_4XX: Outcomes = Outcomes(1 << 3);
    /// A response with a 5xx status (or 600 and above).
    pub const STATUS_5XX: Outcomes = Outcomes(1 << 4);
    /// A response with a `grpc-status` header, whatever its HTTP status.
    pub const GRPC_STATUS: Outcomes = Outcomes(1 << 5);
    /// [`Outcome::LocalReply`].
    pub const LOCAL_REPLY: Outcomes = Outcomes(1 << 6);
    /// [`Outcome::ConnectFailure`].
    pub const CONNECT_FAILURE: Outcomes = Outcomes(1 << 7);
    /// [`Outcome::Reset`].
    pub const RESET: Outcomes = Outcomes(1 << 8);
    /// [`Outcome::Timeout`].
    pub const TIMEOUT: Outcomes = Outcomes(1 << 9);
    /// [`Outcome::NoHealthyEndpoint`].
    pub const NO_HEALTHY_ENDPOINT: Outcomes = Outcomes(1 << 10);
    /// [`Outcome::Overflow`].
    pub const OVERFLOW: Outcomes = Outcomes(1 << 11);
    /// On an endpoint, also the first outcome of any kind after one of the
    /// kinds asked for (and the first one on an endpoint this version of the
    /// plugin has not been called for yet): a count of consecutive failures
    /// sees the success that ends a run.
    pub const NEXT_ON_ENDPOINT: Outcomes = Outcomes(1 << 12);
    /// Every outcome (the default).
    pub const ALL: Outcomes = Outcomes((1 << 12) - 1);

    /// Every kind, in the contract's order, with its name (as `/config`
    /// shows it).
    pub const NAMED: [(Outcomes, &'static str); 13] = [
        (Self::STATUS_1XX, "1xx"),
        (Self::STATUS_2XX, "2xx"),
        (Self::STATUS_3XX, "3xx"),
        (Self::STATUS_4XX, "4xx"),
        (Self::STATUS_5XX, "5xx"),
        (Self::GRPC_STATUS, "grpc-status"),
        (Self::LOCAL_REPLY, "local-reply"),
        (Self::CONNECT_FAILURE, "connect-failure"),
        (Self::RESET, "reset"),
        (Self::TIMEOUT, "timeout"),
        (Self::NO_HEALTHY_ENDPOINT, "no-healthy-endpoint"),
        (Self::OVERFLOW, "overflow"),
        (Self::NEXT_ON_ENDPOINT, "next-on-endpoint"),
    ];

    /// The kind of a response with this status.
    pub const fn status(status: u16) -> Outcomes {
        match status {
            0..=199 => Self::STATUS_1XX,
            200..=299 => Self::STATUS_2XX,
            300..=399 => Self::STATUS_3XX,
            400..=499 => Self::STATUS_4XX,
            _ => Self::STATUS_5XX,
        }
    }

    /// The kind of `outcome` (for a response, by its status class only:
    /// add [`Outcomes::GRPC_STATUS`] when it carries `grpc-status`).
    pub const fn of(outcome: &Outcome) -> Outcomes {
        match outcome {
            Outcome::Response(s) => Self::status(*s),
            Outcome::LocalReply(_) => Self::LOCAL_REPLY,
            Outcome::ConnectFailure => Self::CONNECT_FAILURE,
            Outcome::Reset => Self::RESET,
            Outcome::Timeout => Self::TIMEOUT,
            Outcome::NoHealthyEndpoint => Self::NO_HEALTHY_ENDPOINT,
            Outcome::Overflow => Self::OVERFLOW,
        }
    }

    /// Whether every kind in `other` is in `self`.
    pub const fn contains(self, other: Outcomes) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share a kind.
    pub const fn intersects(self, other: Outcomes) -> bool {
        self.0 & other.0 != 0
    }

    /// The kinds in either.
    pub const fn union(self, other: Outcomes) -> Outcomes {
        Outcomes(self.0 | other.0)
    }

    /// Whether no outcome is asked for ([`Outcomes::NEXT_ON_ENDPOINT`]
    /// alone asks for none).
    pub const fn is_empty(self) -> bool {
        self.0 & Self::ALL.0 == 0
    }
}

impl std::ops::BitOr for Outcomes {
    type Output = Outcomes;
    fn bitor(self, other: Outcomes) -> Outcomes {
        self.union(other)
    }
}

impl std::ops::BitOrAssign for Outcomes {
    fn bitor_assign(&mut self, other: Outcomes) {
        *self = self.union(other);
    }
}

/// Log severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// An entry of shared state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateEntry {
    /// The bytes.
    pub value: Vec<u8>,
    /// Its version, for compare-and-swap.
    pub version: u64,
}

/// How a shared-state write treats expiry and a full scope
/// ([`crate::host::state::set_with`], [`crate::host::state::counter_add_with`]).
/// The default: never expire, refuse a new key in a full scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Remove the key this many ms after the write (each write with options
    /// sets it again); `None`: never.
    pub ttl_ms: Option<u64>,
    /// In a full scope (10,000 keys), evict the least recently used key to
    /// make room for a new one, instead of refusing the write.
    pub evict_least_recently_used: bool,
}

impl WriteOptions {
    /// Expire `ms` after this write.
    pub fn ttl_ms(ms: u64) -> Self {
        Self {
            ttl_ms: Some(ms),
            evict_least_recently_used: false,
        }
    }

    /// And, in a full scope, evict the least recently used key.
    pub fn evicting(mut self) -> Self {
        self.evict_least_recently_used = true;
        self
    }
}

/// A refused shared-state write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Compare-and-swap lost: the current version (0: absent).
    Conflict(u64),
    /// Value over the per-entry cap (bytes).
    TooLarge(u32),
    /// Scope full (key cap).
    TooManyKeys(u32),
    /// Empty key, or longer than 256 bytes.
    BadKey,
    /// `counter_hold` outside a request.
    NoRequest,
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::Conflict(v) => write!(f, "version conflict (current version {v})"),
            StateError::TooLarge(cap) => write!(f, "value larger than {cap} bytes"),
            StateError::TooManyKeys(cap) => write!(f, "more than {cap} keys"),
            StateError::BadKey => write!(f, "empty key or key over 256 bytes"),
            StateError::NoRequest => write!(f, "counter_hold outside a request"),
        }
    }
}

impl std::error::Error for StateError {}

/// An endpoint as the host reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Its subset.
    pub subset: String,
    /// `ip:port`.
    pub address: String,
    /// Ejected now.
    pub ejected: bool,
}
