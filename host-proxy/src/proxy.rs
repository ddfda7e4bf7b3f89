//! One request, end to end: route by host, run the chain's `on-request`,
//! pick an endpoint, send (with the route's timeouts), run `on-response` for
//! every attempt's outcome (retrying when a plugin asks), answer, and run
//! `on-complete` once whatever happens (the guard travels with the response
//! body, so a client that goes away still completes the request).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;

use crate::Shared;
use crate::cluster::Endpoint;
use crate::pool::UpstreamError;
use crate::runtime::contract as wit;
use crate::runtime::{OnFailure, PluginFailure, ReqData, RespData};
use crate::snapshot::{Chain, Service, Snapshot};

/// Boxed error of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Largest request body buffered so that it can be replayed for a retry.
pub const RETRY_BUFFER: usize = 64 * 1024;
/// Most attempts the host makes for one request, whatever plugins ask.
pub const MAX_ATTEMPTS: u32 = 16;
/// The response header carrying Envoy-style response flags.
pub const FLAGS_HEADER: &str = "x-wasmesh-flags";

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// From the local app to a service of the mesh.
    Outbound,
    /// From a peer to the local service.
    Inbound,
}

fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A response the proxy makes itself, with its flag and a short text body.
pub(crate) fn local(status: StatusCode, flag: &str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(flag) {
        h.insert(FLAGS_HEADER, v);
    }
    r
}

/// Hop-by-hop headers, removed in both directions (RFC 9110 §7.6.1), plus
/// the ones `Connection` names. `te: trailers` survives (gRPC needs it); an
/// upgrade keeps `upgrade` and `connection: upgrade`.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names instead of
    // seven hashed removals.
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::PROXY_AUTHORIZATION
            || n == header::UPGRADE
            || n == header::TE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    };
    if !upgrade && !h.keys().any(hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    h.remove(header::CONNECTION);
    h.remove(KEEP_ALIVE);
    h.remove(PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::PROXY_AUTHORIZATION);
    if !upgrade {
        h.remove(header::UPGRADE);
    }
    let te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

fn request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (half, word) in id
        .chunks_mut(16)
        .zip([fastrand::u64(..), fastrand::u64(..)])
    {
        for (i, digit) in half.iter_mut().enumerate() {
            *digit = HEX[(word >> (60 - 4 * i)) as usize & 0xf];
        }
    }
    String::from_utf8(id.to_vec()).expect("hex digits are ASCII")
}

/// The client end of a downstream connection, formatted once per
/// connection rather than once per request.
pub struct Remote {
    /// Its IP, as `x-forwarded-for` carries it.
    ip: HeaderValue,
    /// `ip:port`, as plugins see it.
    address: Box<str>,
}

impl Remote {
    /// Format `addr` for the requests of its connection.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            ip: HeaderValue::from_str(&addr.ip().to_string()).expect("an IP is a header value"),
            address: addr.to_string().into(),
        }
    }
}

/// Header edits a plugin asked for, validated before any is applied.
enum Op {
    Set(HeaderName, HeaderValue),
    Append(HeaderName, HeaderValue),
    Remove(HeaderName),
}

fn header_pair(h: &wit::Header) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(h.name.as_bytes())
        .map_err(|_| format!("invalid header name {:?}", h.name))?;
    let value = HeaderValue::from_str(&h.value)
        .map_err(|_| format!("invalid value for header {:?}", h.name))?;
    Ok((name, value))
}

fn convert_ops(ops: &[wit::HeaderOp]) -> Result<Vec<Op>, String> {
    ops.iter()
        .map(|op| {
            Ok(match op {
                wit::HeaderOp::Set(h) => {
                    let (n, v) = header_pair(h)?;
                    Op::Set(n, v)
                }
                wit::HeaderOp::Append(h) => {
                    let (n, v) = header_pair(h)?;
                    Op::Append(n, v)
                }
                wit::HeaderOp::Remove(n) => Op::Remove(
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| format!("invalid header name {n:?}"))?,
                ),
            })
        })
        .collect()
}

fn apply_ops(h: &mut HeaderMap, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Set(n, v) => {
                h.insert(n.clone(), v.clone());
            }
            Op::Append(n, v) => {
                h.append(n.clone(), v.clone());
            }
            Op::Remove(n) => {
                h.remove(n);
            }
        }
    }
}

fn reply_response(r: &wit::LocalReply) -> Result<Response<ProxyBody>, String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("local reply status {} is not in 200..=599", r.status))?;
    // Its size was capped by the runtime (MAX_REPLY_BODY) when it was lifted.
    let mut resp = Response::new(full(r.body.clone()));
    *resp.status_mut() = status;
    for h in &r.headers {
        let (n, v) = header_pair(h)?;
        resp.headers_mut().append(n, v);
    }
    // A plugin may flag its reply as an overflow (a circuit breaker's limit);
    // every other local reply is `LR`.
    let flag = reply_flag(&resp);
    resp.headers_mut()
        .insert(FLAGS_HEADER, HeaderValue::from_static(flag));
    Ok(resp)
}

/// The response flag of a plugin's local reply: `UO` when the plugin said
/// so, else `LR`.
fn reply_flag(resp: &Response<ProxyBody>) -> &'static str {
    match resp.headers().get(FLAGS_HEADER) {
        Some(v) if v == "UO" => "UO",
        _ => "LR",
    }
}

/// What the chain decided in `on-request`, merged.
#[derive(Default)]
struct Plan {
    service: Option<String>,
    subset: Option<String>,
    path: Option<String>,
    authority: Option<String>,
    timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    delay: Option<Duration>,
    response_ops: Vec<Op>,
}

/// Runs `on-complete` for the plugins a request reached, exactly once, when
/// dropped: at the end of the response body, or earlier if the client goes.
/// Also counts the request.
struct Completion {
    shared: Arc<Shared>,
    _snapshot: Arc<Snapshot>,
    service: Arc<Service>,
    side: Side,
    /// Plugins `0..reached` were reached.
    reached: usize,
    /// Bit i: plugin i failed on this request; it gets no further calls.
    failed: u64,
    req: Option<ReqData>,
    status: Option<u16>,
    flags: &'static str,
    attempts: u32,
    started: Instant,
    /// Set when the client's body broke after forwarding began.
    body_broken: Option<Arc<AtomicBool>>,
}

impl Completion {
    /// Whether the client's body broke after forwarding began.
    fn client_body_broke(&self) -> bool {
        self.body_broken
            .as_ref()
            .is_some_and(|b| b.load(Ordering::Acquire))
    }

    fn chain(&self) -> &Chain {
        match self.side {
            Side::Outbound => &self.service.outbound,
            Side::Inbound => &self.service.inbound,
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let done = wit::Completion {
            status: self.status,
            attempts: self.attempts,
            duration_us: self.started.elapsed().as_micros() as u64,
        };
        // A client body that broke after the response began is counted as
        // the client's fault (its stream was cut by hyper).
        if self.flags.is_empty() && self.client_body_broke() {
            self.flags = "DPE";
        }
        let mut req = self.req.take();
        let (reached, failed) = (self.reached, self.failed);
        for (i, p) in self.chain().plugins.iter().enumerate().take(reached) {
            if p.hooks.on_complete && failed & (1 << i) == 0 {
                let _ = p.on_complete(&mut req, done);
            }
        }
        self.shared
            .metrics
            .request(&self.service.name, self.status.unwrap_or(0), self.flags);
    }
}

/// A response body that carries the request's [`Completion`].
struct GuardedBody {
    inner: ProxyBody,
    guard: Completion,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &r {
            // The upstream failed after the response head went out: the
            // client's stream is cut (hyper closes the HTTP/1 connection or
            // resets the HTTP/2 stream); the request is counted with `UR`.
            tracing::debug!(
                service = &*self.guard.service.name,
                "upstream response body failed after its head: {e}"
            );
            self.guard.flags = if self.guard.client_body_broke() {
                "DPE"
            } else {
                "UR"
            };
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body whose first frames were read ahead (up to the retry
/// buffer), followed by the rest of the stream.
struct PrefixedBody {
    prefix: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    /// Set when the client's body fails (bad framing, a reset) after
    /// forwarding began, so the failure is answered as the client's.
    broken: Arc<AtomicBool>,
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        let r = match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx).map_err(BoxError::from),
            None => return Poll::Ready(None),
        };
        if let Poll::Ready(Some(Err(_))) = &r {
            self.broken.store(true, Ordering::Release);
        }
        r
    }
}

/// The request body as the attempt loop sees it.
enum ReqBody {
    /// Read whole (at most [`RETRY_BUFFER`]): can be sent again.
    Replayable(Bytes),
    /// Streamed: can be sent once.
    Once(Option<ProxyBody>),
}

impl ReqBody {
    fn take(&mut self) -> ProxyBody {
        match self {
            ReqBody::Replayable(b) => full(b.clone()),
            ReqBody::Once(b) => b.take().unwrap_or_else(|| full(Bytes::new())),
        }
    }
}

/// How long the proxy waits for a request body's first frame before it
/// calls the upstream anyway (a client may hold its body until it sees the
/// response head).
const FIRST_FRAME_WAIT: Duration = Duration::from_millis(250);

/// Read the first frame of the body before the upstream is called, so that a
/// body that is broken from its first bytes is refused before anything is
/// forwarded; the rest streams.
async fn first_frame(
    mut body: Incoming,
    broken: &Arc<AtomicBool>,
) -> Result<ReqBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(ReqBody::Replayable(Bytes::new()));
    }
    let prefix = match tokio::time::timeout(FIRST_FRAME_WAIT, body.frame()).await {
        Err(_) => Default::default(),
        Ok(None) => return Ok(ReqBody::Replayable(Bytes::new())),
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(frame))) => [frame].into(),
    };
    Ok(ReqBody::Once(Some(
        PrefixedBody {
            prefix,
            rest: Some(body),
            broken: broken.clone(),
        }
        .boxed(),
    )))
}

/// Read the body ahead up to [`RETRY_BUFFER`] so that a retry can replay it.
async fn buffer_body(
    mut body: Incoming,
    broken: &Arc<AtomicBool>,
) -> Result<ReqBody, hyper::Error> {
    let mut prefix = std::collections::VecDeque::new();
    let mut data = bytes::BytesMut::new();
    let mut size = 0usize;
    loop {
        match body.frame().await {
            None => return Ok(ReqBody::Replayable(data.freeze())),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                let is_data = frame.is_data();
                if let Some(d) = frame.data_ref() {
                    size += d.len();
                }
                if is_data && size <= RETRY_BUFFER && prefix.is_empty() {
                    data.extend_from_slice(frame.data_ref().expect("data frame"));
                    continue;
                }
                // Too large, or trailers: stream it, once.
                if !data.is_empty() {
                    prefix.push_back(Frame::data(std::mem::take(&mut data).freeze()));
                }
                prefix.push_back(frame);
                return Ok(ReqBody::Once(Some(
                    PrefixedBody {
                        prefix,
                        rest: Some(body),
                        broken: broken.clone(),
                    }
                    .boxed(),
                )));
            }
        }
    }
}

/// Merge one plugin's `on-request` decision into the plan. Validates every
/// edit before applying any, so a bad decision changes nothing. Returns the
/// plugin's local reply, if it made one.
fn merge_request(
    plan: &mut Plan,
    req: &mut ReqData,
    d: wit::RequestDecision,
) -> Result<Option<Response<ProxyBody>>, String> {
    let req_ops = convert_ops(&d.request_headers)?;
    let resp_ops = convert_ops(&d.response_headers)?;
    let reply = d.reply.as_ref().map(reply_response).transpose()?;
    if let Some(r) = &d.route {
        if let Some(p) = &r.path
            && !p.starts_with('/')
        {
            return Err(format!("route path {p:?} must start with '/'"));
        }
        if let Some(p) = &r.path
            && p.parse::<http::uri::PathAndQuery>().is_err()
        {
            return Err(format!("route path {p:?} is not a valid path"));
        }
        if let Some(a) = &r.authority
            && HeaderValue::from_str(a).is_err()
        {
            return Err(format!("route authority {a:?} is not valid"));
        }
    }
    apply_ops(&mut req.parts.headers, &req_ops);
    plan.response_ops.extend(resp_ops);
    if let Some(r) = d.route {
        if r.service.is_some() {
            plan.service = r.service;
        }
        if r.subset.is_some() {
            plan.subset = r.subset;
        }
        if r.path.is_some() {
            plan.path = r.path;
        }
        if r.authority.is_some() {
            plan.authority = r.authority;
        }
    }
    let ms = |v: u32| Duration::from_millis(u64::from(v));
    if let Some(t) = d.timeout_ms {
        plan.timeout = Some(ms(t));
    }
    if let Some(t) = d.per_try_timeout_ms {
        plan.per_try_timeout = Some(ms(t));
    }
    if let Some(t) = d.delay_ms {
        plan.delay = Some(ms(t));
    }
    Ok(reply)
}

fn plugin_failed(p: &crate::runtime::ConfiguredPlugin, f: &PluginFailure) -> Response<ProxyBody> {
    local(
        StatusCode::SERVICE_UNAVAILABLE,
        "PF",
        format!("plugin {} (version {}) failed: {f}\n", p.name, p.version()),
    )
}

/// Pick an endpoint: round robin over the subset (all endpoints without
/// one), skipping ejected ones and, when another exists, `avoid`.
fn pick<'a>(
    shared: &Shared,
    svc: &'a Service,
    subset: Option<&str>,
    avoid: Option<&str>,
) -> Option<&'a Endpoint> {
    let eps = &svc.endpoints;
    if eps.is_empty() {
        return None;
    }
    let candidates: &[usize] = match subset {
        Some(s) => svc.subsets.get(s).map_or(&[], |v| v.as_slice()),
        None => &svc.all,
    };
    if candidates.is_empty() {
        return None;
    }
    let start = svc.rr.fetch_add(1, Ordering::Relaxed);
    let mut fallback = None;
    for k in 0..candidates.len() {
        let e = &eps[candidates[(start + k) % candidates.len()]];
        if shared.endpoints.is_ejected(&e.state) {
            continue;
        }
        if avoid == Some(&*e.address) {
            fallback.get_or_insert(e);
            continue;
        }
        return Some(e);
    }
    fallback
}

/// Counts a request in flight to an endpoint for as long as it lives.
struct Inflight<'a>(&'a Endpoint);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.state.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The proxy's request handler.
pub async fn handle(
    shared: Arc<Shared>,
    side: Side,
    remote: &Remote,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let snapshot = shared.snapshot.load_full();
    Ok(serve(shared, snapshot, side, remote, req, started).await)
}

async fn serve(
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    side: Side,
    remote: &Remote,
    mut req: Request<Incoming>,
    started: Instant,
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        shared.metrics.request("-", 501, "");
        return local(
            StatusCode::NOT_IMPLEMENTED,
            "",
            "CONNECT tunnels are not supported by wasmesh; send plain HTTP requests (HTTP_PROXY) instead\n".into(),
        );
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let service = match side {
        Side::Outbound => snapshot.service_for_host(&host).cloned(),
        Side::Inbound => snapshot.local_service.clone(),
    };
    let Some(service) = service else {
        shared.metrics.request("-", 404, "NR");
        return local(
            StatusCode::NOT_FOUND,
            "NR",
            format!("no route: no service of the mesh answers to host {host:?}\n"),
        );
    };

    let upgrade = is_upgrade(&req);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let protocol = if req.version() == Version::HTTP_2 {
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        if grpc {
            wit::Protocol::Grpc
        } else {
            wit::Protocol::Http2
        }
    } else {
        wit::Protocol::Http1
    };
    let downstream_h2 = req.version() == Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);

    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => HeaderValue::from_str(&format!(
            "{prev}, {}",
            remote.ip.to_str().unwrap_or_default()
        ))
        .ok(),
        None => Some(remote.ip.clone()),
    };
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    parts
        .headers
        .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let id = match parts
        .headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            let id = request_id();
            parts
                .headers
                .insert(X_REQUEST_ID, HeaderValue::from_str(&id).expect("hex id"));
            id
        }
    };
    if !parts.headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&host)
    {
        parts.headers.insert(header::HOST, v);
    }
    let port = host
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(80);

    let mut req_data = Some(ReqData {
        parts,
        scheme: "http",
        authority: host,
        port,
        protocol,
        source_address: remote.address.to_string(),
        source_principal: None,
        service: service.name.clone(),
        id: id.clone(),
        holds: Default::default(),
    });

    let mut guard = Completion {
        shared: shared.clone(),
        _snapshot: snapshot.clone(),
        service: service.clone(),
        side,
        reached: 0,
        failed: 0,
        req: None,
        status: None,
        flags: "",
        attempts: 0,
        started,
        body_broken: None,
    };
    let chain = match side {
        Side::Outbound => &service.outbound,
        Side::Inbound => &service.inbound,
    };

    // on-request, in chain order.
    let mut plan = Plan::default();
    let mut early: Option<(Response<ProxyBody>, &'static str)> = None;
    for (i, p) in chain.plugins.iter().enumerate() {
        guard.reached = i + 1;
        if !p.hooks.on_request {
            continue;
        }
        let result = p.on_request(&mut req_data).and_then(|d| {
            let req = req_data.as_mut().expect("request returned by the call");
            merge_request(&mut plan, req, d).map_err(PluginFailure::Error)
        });
        match result {
            Ok(None) => {}
            Ok(Some(reply)) => {
                let flag = reply_flag(&reply);
                early = Some((reply, flag));
                break;
            }
            Err(f) => {
                guard.failed |= 1 << i;
                if p.on_failure == OnFailure::Closed {
                    early = Some((plugin_failed(p, &f), "PF"));
                    break;
                }
            }
        }
    }

    let mut response_ops: Vec<Op> = std::mem::take(&mut plan.response_ops);
    let mut attempts = 0u32;
    let final_response: Response<ProxyBody> = if let Some((mut resp, flag)) = early {
        guard.flags = flag;
        // A delay decided before the reply still applies (Istio delays, then aborts).
        if let (Some(d), "LR" | "UO") = (plan.delay, flag) {
            tokio::time::sleep(d).await;
        }
        if flag != "PF" {
            // on-response for the plugins before the one that replied, in
            // reverse order, with the local reply as the outcome.
            let replier = guard.reached - 1;
            let status = resp.status().as_u16();
            let mut resp_data = Some(RespData {
                status,
                headers: resp.headers().clone(),
            });
            let attempt = wit::Attempt {
                number: 0,
                outcome: wit::Outcome::LocalReply(status),
                service: service.name.to_string(),
                subset: None,
                endpoint: None,
                duration_us: 0,
            };
            let (reply, _retry) = run_on_response(
                chain,
                replier,
                &mut guard.failed,
                &mut req_data,
                &mut resp_data,
                &attempt,
                &mut response_ops,
            );
            if let Some(r) = reply {
                resp = r;
            }
        }
        resp
    } else {
        if let Some(d) = plan.delay {
            tokio::time::sleep(d).await;
        }
        let target = match &plan.service {
            None => Some(service.clone()),
            Some(s) => snapshot.services.get(s).cloned(),
        };
        match target {
            None => {
                guard.flags = "NR";
                local(
                    StatusCode::NOT_FOUND,
                    "NR",
                    format!(
                        "no route: a plugin routed to service {:?}, which the mesh does not have\n",
                        plan.service.as_deref().unwrap_or_default()
                    ),
                )
            }
            Some(target) => {
                let body_broken = Arc::new(AtomicBool::new(false));
                guard.body_broken = Some(body_broken.clone());
                let read = if chain.any_on_response {
                    buffer_body(body, &body_broken).await
                } else {
                    first_frame(body, &body_broken).await
                };
                let mut body = {
                    match read {
                        Ok(b) => b,
                        Err(e) => {
                            guard.flags = "DPE";
                            guard.req = req_data;
                            guard.status = Some(400);
                            return local(
                                StatusCode::BAD_REQUEST,
                                "DPE",
                                format!("could not read the request body: {e}\n"),
                            );
                        }
                    }
                };
                let deadline = plan.timeout.map(|t| started + t);
                let mut avoid: Option<Arc<str>> = None;
                loop {
                    attempts += 1;
                    guard.attempts = attempts;
                    let ep = pick(&shared, &target, plan.subset.as_deref(), avoid.as_deref());
                    let t0 = Instant::now();
                    let remaining = deadline.map(|d| d.saturating_duration_since(t0));
                    let limit = match (plan.per_try_timeout, remaining) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let result = match ep {
                        None => Err((wit::Outcome::NoHealthyEndpoint, "UH")),
                        Some(ep) => {
                            let req = req_data.as_ref().expect("request data");
                            send(
                                &shared,
                                &snapshot,
                                &target,
                                ep,
                                req,
                                &plan,
                                &mut body,
                                downstream_h2,
                                limit,
                            )
                            .await
                        }
                    };
                    let (outcome, mut upstream) = match result {
                        Ok(r) => (wit::Outcome::Response(r.status().as_u16()), Some(r)),
                        Err((o, _)) => (o, None),
                    };
                    let mut retry = None;
                    let mut reply = None;
                    if chain.any_on_response {
                        let mut resp_data = Some(match &upstream {
                            Some(r) => RespData {
                                status: r.status().as_u16(),
                                headers: r.headers().clone(),
                            },
                            None => RespData::default(),
                        });
                        let attempt = wit::Attempt {
                            number: attempts,
                            outcome,
                            service: target.name.to_string(),
                            subset: plan.subset.clone(),
                            endpoint: ep.map(|e| e.address.to_string()),
                            duration_us: t0.elapsed().as_micros() as u64,
                        };
                        (reply, retry) = run_on_response(
                            chain,
                            guard.reached,
                            &mut guard.failed,
                            &mut req_data,
                            &mut resp_data,
                            &attempt,
                            &mut response_ops,
                        );
                    }
                    if let Some(r) = reply {
                        guard.flags = if r.headers().get(FLAGS_HEADER).is_some_and(|f| f == "PF") {
                            "PF"
                        } else {
                            reply_flag(&r)
                        };
                        break r;
                    }
                    let can_retry = matches!(body, ReqBody::Replayable(_))
                        && attempts < MAX_ATTEMPTS
                        && deadline.is_none_or(|d| Instant::now() < d);
                    if let Some(backoff) = retry
                        && can_retry
                    {
                        // This attempt's response head is discarded (its
                        // connection is not reused mid-body).
                        drop(upstream.take());
                        let mut wait = backoff;
                        if let Some(d) = deadline {
                            wait = wait.min(d.saturating_duration_since(Instant::now()));
                        }
                        tokio::time::sleep(wait).await;
                        avoid = ep.map(|e| e.address.clone());
                        continue;
                    }
                    break match upstream {
                        Some(mut resp) => {
                            if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) =
                                (on_upgrade, resp.status())
                            {
                                let up = hyper::upgrade::on(&mut resp);
                                tokio::spawn(tunnel(down, up));
                                let (parts, _) = resp.into_parts();
                                break Response::from_parts(parts, full(Bytes::new()));
                            }
                            let (mut parts, body) = resp.into_parts();
                            strip_hop_by_hop(&mut parts.headers, false);
                            Response::from_parts(parts, body.map_err(Into::into).boxed())
                        }
                        None if body_broken.load(Ordering::Acquire) => {
                            // The client's body broke after forwarding began:
                            // the upstream request was aborted; the fault is
                            // the client's.
                            guard.flags = "DPE";
                            local(
                                StatusCode::BAD_REQUEST,
                                "DPE",
                                "the request body broke after forwarding began (bad framing or a reset); the upstream request was aborted\n".to_string(),
                            )
                        }
                        None => {
                            let (status, flag, what) = match outcome {
                                wit::Outcome::NoHealthyEndpoint => {
                                    (StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy endpoint")
                                }
                                wit::Outcome::ConnectFailure => (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "UF",
                                    "upstream connect failure",
                                ),
                                wit::Outcome::Timeout => (
                                    StatusCode::GATEWAY_TIMEOUT,
                                    "UT",
                                    "upstream request timeout",
                                ),
                                wit::Outcome::Overflow => (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "UO",
                                    "upstream overflow: too many requests in flight",
                                ),
                                _ => (
                                    StatusCode::BAD_GATEWAY,
                                    "UR",
                                    "upstream reset before a response",
                                ),
                            };
                            guard.flags = flag;
                            let subset = plan
                                .subset
                                .as_deref()
                                .map(|s| format!(" subset {s}"))
                                .unwrap_or_default();
                            local(
                                status,
                                flag,
                                format!("{what}: service {}{subset}\n", target.name),
                            )
                        }
                    };
                }
            }
        }
    };

    let mut resp = final_response;
    apply_ops(resp.headers_mut(), &response_ops);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    guard.status = Some(resp.status().as_u16());
    guard.req = req_data;
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, GuardedBody { inner: body, guard }.boxed())
}

/// Run `on-response` over plugins `0..upto` in reverse order. Returns the
/// first reply (a failure with `on-failure: closed` counts as one) and the
/// longest backoff asked for.
fn run_on_response(
    chain: &Chain,
    upto: usize,
    failed: &mut u64,
    req: &mut Option<ReqData>,
    resp: &mut Option<RespData>,
    attempt: &wit::Attempt,
    response_ops: &mut Vec<Op>,
) -> (Option<Response<ProxyBody>>, Option<Duration>) {
    let mut reply = None;
    let mut retry: Option<Duration> = None;
    for i in (0..upto).rev() {
        let p = &chain.plugins[i];
        if !p.hooks.on_response || *failed & (1 << i) != 0 {
            continue;
        }
        let result = p.on_response(req, resp, attempt).and_then(|d| {
            let ops = convert_ops(&d.response_headers).map_err(PluginFailure::Error)?;
            let r = d
                .reply
                .as_ref()
                .map(reply_response)
                .transpose()
                .map_err(PluginFailure::Error)?;
            Ok((ops, r, d.retry))
        });
        match result {
            Ok((ops, r, rt)) => {
                response_ops.extend(ops);
                if reply.is_none() {
                    reply = r;
                }
                if let Some(rt) = rt {
                    let b = Duration::from_millis(u64::from(rt.backoff_ms));
                    retry = Some(retry.map_or(b, |x| x.max(b)));
                }
            }
            Err(f) => {
                *failed |= 1 << i;
                if p.on_failure == OnFailure::Closed && reply.is_none() {
                    reply = Some(plugin_failed(p, &f));
                }
            }
        }
    }
    if matches!(attempt.outcome, wit::Outcome::LocalReply(_)) {
        retry = None;
    }
    (reply, retry)
}

/// One attempt: send to `ep`, within `limit`.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, all of it per-attempt state"
)]
async fn send(
    shared: &Shared,
    snapshot: &Snapshot,
    target: &Service,
    ep: &Endpoint,
    req: &ReqData,
    plan: &Plan,
    body: &mut ReqBody,
    downstream_h2: bool,
    limit: Option<Duration>,
) -> Result<Response<Incoming>, (wit::Outcome, &'static str)> {
    let max = snapshot.upstream.max_requests_per_endpoint;
    if ep.state.inflight.fetch_add(1, Ordering::Relaxed) >= max {
        ep.state.inflight.fetch_sub(1, Ordering::Relaxed);
        return Err((wit::Outcome::Overflow, "UO"));
    }
    let _inflight = Inflight(ep);

    let path_and_query = match plan.path.as_deref() {
        Some(p) => p.parse().map_err(|_| (wit::Outcome::Reset, "UR"))?,
        None => req
            .parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    };
    let h2 = match target.protocol {
        wasmesh_api::Protocol::Http1 => false,
        wasmesh_api::Protocol::H2c => true,
        wasmesh_api::Protocol::Auto => downstream_h2,
    };
    // Origin form on our own HTTP/1.1 connections; absolute form for
    // hyper-util's HTTP/2 client, which picks its connection by authority.
    let uri = if h2 {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(ep.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|_| (wit::Outcome::Reset, "UR"))?
    } else {
        Uri::from(path_and_query)
    };
    let limit = limit.map(|l| Instant::now() + l);
    // A request the upstream refused unprocessed (HTTP/2 REFUSED_STREAM)
    // provably never reached it, and an idempotent one lost to a keep-alive
    // connection the upstream was closing may be sent again (RFC 9112
    // §9.3.1): either goes out again at once, whatever the plugins say, if
    // its body can be replayed. (The HTTP/1.1 pool itself re-sends a request
    // that a closed pooled connection never wrote.)
    let mut resends = 0;
    loop {
        let result = send_once(
            shared,
            target,
            ep,
            req,
            plan,
            uri.clone(),
            body.take(),
            h2,
            limit,
        )
        .await;
        match result {
            Err(SendError::Unprocessed)
                if resends < 2 && matches!(body, ReqBody::Replayable(_)) =>
            {
                resends += 1;
                tracing::debug!(
                    endpoint = &*ep.address,
                    "the upstream did not process the request; sending it again"
                );
            }
            Err(SendError::Unprocessed) => return Err((wit::Outcome::Reset, "UR")),
            Err(SendError::Other(o, f)) => return Err((o, f)),
            Ok(r) => return Ok(r),
        }
    }
}

enum SendError {
    /// The upstream did not process the request (HTTP/2 REFUSED_STREAM), or
    /// an idempotent one was lost to a keep-alive connection it closed.
    Unprocessed,
    Other(wit::Outcome, &'static str),
}

/// The first error of type `E` in `e`'s chain of sources.
fn cause<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    std::iter::successors(Some(e), |err| err.source()).find_map(|err| err.downcast_ref::<E>())
}

/// Whether an upstream error is the connector's per-endpoint cap.
fn connection_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    cause::<crate::connector::ConnectionLimit>(e).is_some()
}

/// Whether an upstream error is an HTTP/2 REFUSED_STREAM.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    cause::<h2::Error>(e).is_some_and(|h2| h2.reason() == Some(h2::Reason::REFUSED_STREAM))
}

#[allow(clippy::too_many_arguments, reason = "internal helper of `send`")]
async fn send_once(
    shared: &Shared,
    target: &Service,
    ep: &Endpoint,
    req: &ReqData,
    plan: &Plan,
    uri: Uri,
    body: ProxyBody,
    h2: bool,
    deadline: Option<Instant>,
) -> Result<Response<Incoming>, SendError> {
    let mut up = Request::new(body);
    *up.method_mut() = req.parts.method.clone();
    *up.uri_mut() = uri;
    *up.headers_mut() = req.parts.headers.clone();
    if let Some(a) = &plan.authority
        && let Ok(v) = HeaderValue::from_str(a)
    {
        up.headers_mut().insert(header::HOST, v);
    }
    if h2 {
        *up.version_mut() = Version::HTTP_2;
        up.headers_mut().remove(header::HOST);
        return match within(deadline, shared.clients.h2c.request(up)).await? {
            Ok(r) => Ok(r),
            Err(e) if connection_limit(&e) => Err(SendError::Other(wit::Outcome::Overflow, "UO")),
            Err(e) if e.is_connect() => Err(SendError::Other(wit::Outcome::ConnectFailure, "UF")),
            Err(e) if refused_stream(&e) => Err(SendError::Unprocessed),
            Err(e) => {
                tracing::debug!(service = &*target.name, "upstream error: {e:?}");
                Err(SendError::Other(wit::Outcome::Reset, "UR"))
            }
        };
    }
    *up.version_mut() = Version::HTTP_11;
    match within(deadline, shared.clients.http1.send(ep, up)).await? {
        Ok(r) => Ok(r),
        Err(UpstreamError::Limit(_)) => Err(SendError::Other(wit::Outcome::Overflow, "UO")),
        Err(UpstreamError::Connect(e)) => {
            tracing::debug!(service = &*target.name, "upstream connect failed: {e}");
            Err(SendError::Other(wit::Outcome::ConnectFailure, "UF"))
        }
        // Lost on a keep-alive connection the upstream was closing:
        // RFC 9112 §9.3.1 lets a client send an idempotent request again.
        Err(UpstreamError::Http {
            reused: true,
            error,
        }) if req.parts.method.is_idempotent() => {
            tracing::debug!(
                service = &*target.name,
                "upstream closed a kept-alive connection: {error}"
            );
            Err(SendError::Unprocessed)
        }
        Err(UpstreamError::Http { error, .. }) => {
            tracing::debug!(service = &*target.name, "upstream error: {error:?}");
            Err(SendError::Other(wit::Outcome::Reset, "UR"))
        }
    }
}

/// `fut`, or `UT` once `deadline` passes.
async fn within<T>(
    deadline: Option<Instant>,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, SendError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), fut)
            .await
            .map_err(|_| SendError::Other(wit::Outcome::Timeout, "UT")),
        None => Ok(fut.await),
    }
}

/// Copy bytes both ways between an upgraded client connection and an
/// upgraded upstream connection (WebSocket and other `Upgrade`s).
async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (down.await, up.await) else {
        return;
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
}

/// Entry points for the fuzz targets under `fuzz/` (feature `fuzzing`): the
/// checks every guest-supplied decision and every request view go through,
/// on arbitrary values.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing {
    use super::*;

    /// Read a decision from fuzz bytes: a byte picks each next field, a
    /// length byte and that many bytes (lossy UTF-8) make each string.
    pub fn decision_from_bytes(mut data: &[u8]) -> wit::RequestDecision {
        let take = |data: &mut &[u8]| -> String {
            let Some((&n, rest)) = data.split_first() else {
                return String::new();
            };
            let n = usize::from(n).min(rest.len());
            let (s, rest) = rest.split_at(n);
            *data = rest;
            String::from_utf8_lossy(s).into_owned()
        };
        let mut d = empty_decision();
        while let Some((&kind, rest)) = data.split_first() {
            data = rest;
            let header = |data: &mut &[u8]| wit::Header {
                name: take(data),
                value: take(data),
            };
            match kind % 8 {
                0 => d
                    .request_headers
                    .push(wit::HeaderOp::Set(header(&mut data))),
                1 => d
                    .request_headers
                    .push(wit::HeaderOp::Append(header(&mut data))),
                2 => d
                    .request_headers
                    .push(wit::HeaderOp::Remove(take(&mut data))),
                3 => d
                    .response_headers
                    .push(wit::HeaderOp::Set(header(&mut data))),
                4 => {
                    let s = |v: String| (!v.is_empty()).then_some(v);
                    d.route = Some(wit::Route {
                        service: s(take(&mut data)),
                        subset: s(take(&mut data)),
                        path: s(take(&mut data)),
                        authority: s(take(&mut data)),
                    });
                }
                5 => {
                    let status = take(&mut data)
                        .bytes()
                        .fold(0u16, |a, b| a.wrapping_mul(31).wrapping_add(u16::from(b)));
                    let headers = vec![header(&mut data)];
                    d.reply = Some(wit::LocalReply {
                        status,
                        headers,
                        body: take(&mut data).into_bytes(),
                    });
                }
                6 => d.timeout_ms = Some(u32::from(kind) * 7),
                _ => d.delay_ms = Some(u32::from(kind)),
            }
        }
        d
    }

    fn empty_decision() -> wit::RequestDecision {
        wit::RequestDecision {
            request_headers: Vec::new(),
            response_headers: Vec::new(),
            route: None,
            timeout_ms: None,
            per_try_timeout_ms: None,
            delay_ms: None,
            reply: None,
        }
    }

    fn plain_request(parts: http::request::Parts) -> ReqData {
        ReqData {
            parts,
            scheme: "http",
            authority: "reviews".into(),
            port: 80,
            protocol: wit::Protocol::Http1,
            source_address: "127.0.0.1:50000".into(),
            source_principal: None,
            service: "reviews".into(),
            id: "fuzz".into(),
            holds: Default::default(),
        }
    }

    /// Apply a guest's `on-request` decision to a plain GET, as the proxy
    /// does: the host's size caps, then validation, then the merge. Never
    /// panics; what it accepts is valid HTTP.
    pub fn request_decision(d: wit::RequestDecision) {
        if crate::runtime::check_decision(
            [&d.request_headers, &d.response_headers],
            d.reply.as_ref(),
            0,
        )
        .is_err()
        {
            return;
        }
        let (parts, ()) = Request::get("/").body(()).unwrap().into_parts();
        let mut req = plain_request(parts);
        let mut plan = Plan::default();
        if let Ok(reply) = merge_request(&mut plan, &mut req, d) {
            if let Some(p) = &plan.path {
                assert!(p.parse::<http::uri::PathAndQuery>().is_ok(), "{p:?}");
            }
            if let Some(r) = reply {
                assert!((200..=599).contains(&r.status().as_u16()));
            }
        }
    }

    /// A request head (as hyper would accept it) → the host's view of its
    /// headers (what `headers()` hands a guest) → a decision that sets them
    /// all back on an empty request: the same headers come out, in order,
    /// for every value that is UTF-8.
    pub fn head_roundtrip(head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let mut b = Request::builder()
            .method(parsed.method.unwrap_or("GET"))
            .uri(parsed.path.unwrap_or("/"));
        for h in parsed.headers.iter() {
            b = b.header(h.name, h.value);
        }
        let Ok(req) = b.body(()) else {
            return;
        };
        let (parts, ()) = req.into_parts();
        let original = parts.headers.clone();
        let view = crate::runtime::host::headers_list(&original);
        assert_eq!(view.len(), original.len());
        let mut ops = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for h in view {
            ops.push(if seen.insert(h.name.clone()) {
                wit::HeaderOp::Set(h)
            } else {
                wit::HeaderOp::Append(h)
            });
        }
        let d = wit::RequestDecision {
            request_headers: ops,
            ..empty_decision()
        };
        let (empty, ()) = Request::get("/").body(()).unwrap().into_parts();
        let mut rebuilt = plain_request(empty);
        let merged = merge_request(&mut Plan::default(), &mut rebuilt, d);
        let utf8 = original.values().all(|v| v.to_str().is_ok());
        if utf8 {
            merged.expect("headers the host showed a guest are valid to set back");
            assert_eq!(rebuilt.parts.headers, original);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_request_id_is_32_lowercase_hex_digits_and_fresh_each_time() {
        let (a, b) = (super::request_id(), super::request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        assert_ne!(a, b);
    }

    /// The fuzzers' seed and found corpora, replayed as the targets run them
    /// (`fuzz/fuzz_targets/decision.rs`, `head_roundtrip.rs`).
    #[test]
    fn the_decision_and_head_fuzz_corpora_replay() {
        for (target, run) in [
            (
                "decision",
                (|d: &[u8]| {
                    super::fuzzing::request_decision(super::fuzzing::decision_from_bytes(d))
                }) as fn(&[u8]),
            ),
            ("head_roundtrip", super::fuzzing::head_roundtrip),
        ] {
            let dir = format!("{}/../fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                run(&std::fs::read(entry.unwrap().path()).unwrap());
                n += 1;
            }
            assert!(n >= 2, "the corpus is missing ({n} files in {dir})");
        }
    }
}
