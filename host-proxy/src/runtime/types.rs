//! The contract's values as the proxy speaks them. What a plugin hands back
//! arrives here already checked (the host's caps, header names and values,
//! statuses, paths, bounds): nothing on the request path validates a
//! decision again, and nothing outside `runtime` names a generated type.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, StatusCode};

use crate::http::headers::HeaderEdit;

/// The protocol the downstream client spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2.
    Http2,
    /// HTTP/2 with a `content-type` of `application/grpc` (or `+suffix`).
    Grpc,
}

/// How a plugin's local reply is flagged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyFlag {
    /// `LR`.
    #[default]
    LocalReply,
    /// `UO`: an overflow (a circuit breaker's limit).
    Overflow,
    /// `RL`: rate limited.
    RateLimited,
}

/// A plugin's local reply, checked.
#[derive(Clone, Debug)]
pub struct LocalReply {
    /// 200..=599.
    pub status: StatusCode,
    /// Its headers, in order (appended).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Its body (at most 64 KiB).
    pub body: Bytes,
    /// How the plugin asked for it to be flagged.
    pub flag: ReplyFlag,
}

/// Where a plugin sends the request, checked. A `None` keeps the earlier
/// value.
#[derive(Clone, Debug, Default)]
pub struct Route {
    /// Another service of the mesh.
    pub service: Option<String>,
    /// A subset of the target service.
    pub subset: Option<String>,
    /// The path with query sent upstream.
    pub path: Option<PathAndQuery>,
    /// The authority sent upstream.
    pub authority: Option<HeaderValue>,
}

/// What one plugin decided in `on-request`, checked.
#[derive(Clone, Debug, Default)]
pub struct RequestDecision {
    /// Edits to the request headers sent upstream.
    pub request_headers: Vec<HeaderEdit>,
    /// Edits to the response headers sent back.
    pub response_headers: Vec<HeaderEdit>,
    /// Where to send the request.
    pub route: Option<Route>,
    /// Deadline for the whole request (`Some(None)`: the plugin cleared it).
    pub timeout: Option<Option<Duration>>,
    /// Deadline of each attempt (`Some(None)`: cleared).
    pub per_try_timeout: Option<Option<Duration>>,
    /// Wait before sending.
    pub delay: Option<Duration>,
    /// Answer now.
    pub reply: Option<LocalReply>,
}

/// What one plugin decided in `on-response`, checked.
#[derive(Debug, Default)]
pub struct ResponseDecision {
    /// Edits to the response headers.
    pub response_headers: Vec<HeaderEdit>,
    /// Send this instead.
    pub reply: Option<LocalReply>,
    /// Try again after this backoff.
    pub retry: Option<Duration>,
}

/// How an attempt ended, as plugins are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Response(u16),
    /// A plugin answered locally in `on-request` with this status.
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

/// One attempt, as `on-response` is told of it (borrowed from the request
/// handler's state: lowered for plugins once, see
/// [`crate::runtime::LoweredAttempt`]).
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    /// 1 for the first try.
    pub number: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// The service called.
    pub service: &'a str,
    /// The subset chosen.
    pub subset: Option<&'a str>,
    /// The endpoint called.
    pub endpoint: Option<&'a str>,
    /// How long it took.
    pub duration: Duration,
}

/// How a request ended, as `on-complete` is told.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The status sent; none when the client went away first.
    pub status: Option<u16>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Time from arrival to the end.
    pub duration: Duration,
}

/// The response an attempt ended with, as `on-response` sees it: the
/// upstream's head, a local reply's, or nothing (status 0, no headers).
#[derive(Debug, Default)]
pub struct ResponseView {
    /// Status (0: no response).
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
}
