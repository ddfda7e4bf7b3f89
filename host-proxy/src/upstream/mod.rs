//! The upstream side: services' endpoints and their live state (in-flight
//! counts, ejections), load balancing, pooled connections (HTTP/1.1 in each
//! endpoint's own pool, HTTP/2 through hyper-util's client), and one attempt
//! at an endpoint with its limits and timeout. HTTP/1.1 requests without a
//! body go out on the proxy's own exchange ([`h1`]); the rest on hyper's
//! client.
//!
//! Mesh endpoints (with identities) are reached over mutual TLS
//! ([`tls`]) when this proxy has an identity.
//!
//! Depends on [`crate::http`], [`crate::flags`] and [`crate::metrics`]; it
//! knows nothing of plugins or configuration files: the request handler
//! decides where a request goes and this module sends it there.

pub mod cluster;
pub mod connector;
pub mod h1;
pub mod pool;
pub mod tls;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use self::cluster::Endpoint;
use self::connector::LimitedConnector;
use self::pool::UpstreamError;
use crate::flags::ResponseFlag;
use crate::http::body::ReqBody;
use crate::http::{BoxError, ProxyBody};

/// Upstream connection settings; fixed for the life of the process, except
/// the per-endpoint request limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connections close after this.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Requests in flight per endpoint.
    pub max_requests_per_endpoint: usize,
    /// Open connections per endpoint (per upstream protocol).
    pub max_connections_per_endpoint: usize,
}

/// Which protocol a service's endpoints are spoken to in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, except gRPC, which needs HTTP/2: the default.
    #[default]
    Http1UnlessGrpc,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 with prior knowledge.
    H2c,
    /// Whatever the client spoke.
    Auto,
}

impl UpstreamProtocol {
    /// Whether a request goes out as HTTP/2.
    pub fn h2(self, client_h2: bool, grpc: bool) -> bool {
        match self {
            UpstreamProtocol::Http1UnlessGrpc => grpc,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::H2c => true,
            UpstreamProtocol::Auto => client_h2,
        }
    }
}

/// Pooled upstream clients, one per protocol.
pub struct Clients {
    /// HTTP/1.1: connections pooled in each endpoint's live state.
    pub http1: pool::H1Pool,
    /// HTTP/2 with prior knowledge (hyper-util's pool, keyed by endpoint).
    h2c: Client<LimitedConnector, ProxyBody>,
    /// Mesh mTLS, when this proxy has an identity.
    mesh: bool,
}

impl Clients {
    /// Clients with the proxy's `upstream` settings; mesh endpoints over
    /// `tls` (their identities from `table`).
    pub fn new(
        s: &UpstreamSettings,
        tls: Option<Arc<tls::MeshTls>>,
        table: Arc<cluster::EndpointTable>,
    ) -> Self {
        // Its connect timeout and Happy Eyeballs' fallback delay are the
        // connector's own (`LimitedConnector`): HttpConnector makes them
        // with `tokio::time`, which the worker runtime does not have.
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(None);
        connector.set_happy_eyeballs_timeout(None);
        connector.set_nodelay(true);
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(crate::timer::HyperTimer)
            .pool_timer(crate::timer::HyperTimer)
            .pool_idle_timeout(s.idle_timeout)
            .pool_max_idle_per_host(s.max_idle_per_endpoint)
            .retry_canceled_requests(true)
            .set_host(false);
        b.http2_only(true);
        let h2c = b.build(LimitedConnector::new(
            connector,
            (s.max_connections_per_endpoint, s.connect_timeout),
            tls.clone(),
            table,
        ));
        Self {
            mesh: tls.is_some(),
            http1: pool::H1Pool::new(s, tls),
            h2c,
        }
    }
}

/// Why an attempt got no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No endpoint of the chosen subset is available (none, or all ejected).
    NoHealthyEndpoint,
    /// No connection could be made.
    ConnectFailure,
    /// The connection or stream was reset before a response.
    Reset,
    /// The attempt ran past its timeout.
    Timeout,
    /// A connection or request limit was full.
    Overflow,
}

impl UpstreamFailure {
    /// Its response flag.
    pub fn flag(self) -> ResponseFlag {
        match self {
            UpstreamFailure::NoHealthyEndpoint => ResponseFlag::NoHealthyUpstream,
            UpstreamFailure::ConnectFailure => ResponseFlag::UpstreamConnectionFailure,
            UpstreamFailure::Reset => ResponseFlag::UpstreamReset,
            UpstreamFailure::Timeout => ResponseFlag::UpstreamRequestTimeout,
            UpstreamFailure::Overflow => ResponseFlag::UpstreamOverflow,
        }
    }

    /// What it says to a client.
    pub fn describe(self) -> &'static str {
        match self {
            UpstreamFailure::NoHealthyEndpoint => "no healthy endpoint",
            UpstreamFailure::ConnectFailure => "upstream connect failure",
            UpstreamFailure::Reset => "upstream reset before a response",
            UpstreamFailure::Timeout => "upstream request timeout",
            UpstreamFailure::Overflow => "upstream overflow: too many requests in flight",
        }
    }
}

/// What goes upstream on an attempt: the request's head (with plugins'
/// edits applied) and where the route changed it.
pub struct Outgoing<'a> {
    /// Method, URI and headers.
    pub parts: &'a http::request::Parts,
    /// The path (with query) the route asked for, if it changed it.
    pub path: Option<&'a PathAndQuery>,
    /// The authority the route asked for, if it changed it.
    pub authority: Option<&'a HeaderValue>,
    /// HTTP/2 with prior knowledge, else HTTP/1.1.
    pub h2: bool,
    /// The client asked to switch protocols (`Upgrade`).
    pub upgrade: bool,
}

/// An upstream response's body: from hyper's client, or from the proxy's
/// own HTTP/1.1 exchange ([`h1`]).
pub enum UpBody {
    /// From hyper's HTTP/1.1 or HTTP/2 client.
    Hyper(Incoming),
    /// From the proxy's own HTTP/1.1 exchange.
    Own(h1::H1Body),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            UpBody::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Hyper(b) => b.is_end_stream(),
            UpBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Hyper(b) => b.size_hint(),
            UpBody::Own(b) => b.size_hint(),
        }
    }
}

impl From<h1::H1Body> for UpBody {
    fn from(b: h1::H1Body) -> Self {
        UpBody::Own(b)
    }
}

/// One attempt, begun at `now`: send to `ep` within `limit`, counted
/// against the endpoint's `max_requests` while in flight; its response is
/// made in `resp` (where the attempt loop keeps it, rather than moved
/// back through every await on the way).
pub async fn send(
    clients: &Clients,
    ep: &Endpoint,
    max_requests: usize,
    out: &Outgoing<'_>,
    body: &mut ReqBody,
    (now, limit): (Instant, Option<Duration>),
    resp: &mut Option<Response<UpBody>>,
) -> Result<(), UpstreamFailure> {
    if ep.state.inflight.fetch_add(1, Ordering::Relaxed) >= max_requests {
        ep.state.inflight.fetch_sub(1, Ordering::Relaxed);
        return Err(UpstreamFailure::Overflow);
    }
    let _inflight = Inflight(ep);
    let deadline = limit.map(|l| now + l);
    let slash = PathAndQuery::from_static("/");
    let path = out
        .path
        .or(out.parts.uri.path_and_query())
        .unwrap_or(&slash);
    // The common request (no body, no upgrade, HTTP/1.1) goes out on the
    // proxy's own exchange, its head written from the request as it is;
    // the rest as a request for hyper's clients, in origin form on our
    // HTTP/1.1 connections and in absolute form for hyper-util's HTTP/2
    // client, which picks its connection by authority.
    let own = !out.h2 && !out.upgrade && out.parts.method != Method::CONNECT && body.is_empty();
    let head = own.then_some(h1::Head {
        method: &out.parts.method,
        path,
        headers: &out.parts.headers,
        authority: out.authority,
    });
    let uri = if own {
        Uri::default()
    } else if out.h2 {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(if clients.mesh && ep.identity.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        parts.authority = Some(ep.authority.clone());
        parts.path_and_query = Some(path.clone());
        Uri::from_parts(parts).map_err(|_| UpstreamFailure::Reset)?
    } else {
        Uri::from(path.clone())
    };
    // A request the upstream refused unprocessed (HTTP/2 REFUSED_STREAM)
    // provably never reached it, and an idempotent one lost to a keep-alive
    // connection the upstream was closing may be sent again (RFC 9112
    // §9.3.1): either goes out again at once, whatever the plugins say, if
    // its body can be replayed. (The HTTP/1.1 pool itself re-sends a request
    // that a closed pooled connection never wrote.)
    let mut resends = 0;
    loop {
        let via = match &head {
            Some(head) => Via::Own(head),
            None if out.h2 => Via::H2(request(out, uri.clone(), body.take())),
            None => Via::Http1(request(out, uri.clone(), body.take())),
        };
        match send_once(clients, ep, via, (now, deadline), resp).await {
            Err(SendError::Unprocessed) if resends < 2 && body.is_replayable() => {
                resends += 1;
                tracing::debug!(
                    endpoint = &*ep.address,
                    "the upstream did not process the request; sending it again"
                );
            }
            Err(SendError::Unprocessed) => return Err(UpstreamFailure::Reset),
            Err(SendError::Failed(f)) => return Err(f),
            Ok(()) => return Ok(()),
        }
    }
}

/// Counts a request in flight to an endpoint for as long as it lives.
struct Inflight<'a>(&'a Endpoint);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.state.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn request(out: &Outgoing<'_>, uri: Uri, body: ProxyBody) -> Request<ProxyBody> {
    let mut up = Request::new(body);
    *up.method_mut() = out.parts.method.clone();
    *up.uri_mut() = uri;
    *up.headers_mut() = out.parts.headers.clone();
    if let Some(a) = out.authority {
        up.headers_mut().insert(header::HOST, a.clone());
    }
    if out.h2 {
        *up.version_mut() = Version::HTTP_2;
        up.headers_mut().remove(header::HOST);
    } else {
        *up.version_mut() = Version::HTTP_11;
    }
    up
}

enum SendError {
    /// The upstream did not process the request (HTTP/2 REFUSED_STREAM), or
    /// an idempotent one was lost to a keep-alive connection it closed.
    Unprocessed,
    Failed(UpstreamFailure),
}

/// The first error of type `E` in `e`'s chain of sources.
fn cause<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    std::iter::successors(Some(e), |err| err.source()).find_map(|err| err.downcast_ref::<E>())
}

/// Which client an attempt goes out on.
enum Via<'a> {
    /// hyper-util's HTTP/2 client.
    H2(Request<ProxyBody>),
    /// hyper's HTTP/1.1 client on this proxy's pool.
    Http1(Request<ProxyBody>),
    /// The proxy's own HTTP/1.1 exchange on the same pool.
    Own(&'a h1::Head<'a>),
}

async fn send_once(
    clients: &Clients,
    ep: &Endpoint,
    via: Via<'_>,
    (now, deadline): (Instant, Option<Instant>),
    resp: &mut Option<Response<UpBody>>,
) -> Result<(), SendError> {
    // Each branch awaits its future where it is made (`timeout!`): handed
    // to a helper, it was stored twice in this future (the argument, then
    // the timeout holding it), and every request's future moved the copy.
    macro_rules! timeout {
        ($fut:expr) => {
            match deadline {
                Some(d) => crate::timer::timeout_at(d, $fut)
                    .await
                    .map_err(|_| SendError::Failed(UpstreamFailure::Timeout))?,
                None => $fut.await,
            }
        };
    }
    let up = match via {
        Via::H2(up) => up,
        Via::Http1(up) => {
            let idempotent = up.method().is_idempotent();
            let sent = timeout!(clients.http1.send(ep, up, now));
            let sent = sent.map(|r| {
                *resp = Some(r.map(UpBody::Hyper));
            });
            return h1_result(ep, sent, idempotent);
        }
        Via::Own(head) => {
            let sent = timeout!(clients.http1.send_own(ep, head, now, resp));
            return h1_result(ep, sent, head.method.is_idempotent());
        }
    };
    match timeout!(clients.h2c.request(up)) {
        Ok(r) => {
            *resp = Some(r.map(UpBody::Hyper));
            Ok(())
        }
        Err(e) if cause::<connector::ConnectionLimit>(&e).is_some() => {
            Err(SendError::Failed(UpstreamFailure::Overflow))
        }
        Err(e) if e.is_connect() => Err(SendError::Failed(UpstreamFailure::ConnectFailure)),
        Err(e)
            if cause::<h2::Error>(&e)
                .is_some_and(|h2| h2.reason() == Some(h2::Reason::REFUSED_STREAM)) =>
        {
            Err(SendError::Unprocessed)
        }
        Err(e) => {
            tracing::debug!(endpoint = &*ep.address, "upstream error: {e:?}");
            Err(SendError::Failed(UpstreamFailure::Reset))
        }
    }
}

/// An HTTP/1.1 attempt's result, its errors as the attempt loop sees them.
fn h1_result(
    ep: &Endpoint,
    sent: Result<(), UpstreamError>,
    idempotent: bool,
) -> Result<(), SendError> {
    match sent {
        Ok(()) => Ok(()),
        Err(UpstreamError::Limit(_)) => Err(SendError::Failed(UpstreamFailure::Overflow)),
        Err(UpstreamError::Connect(e)) => {
            tracing::debug!(endpoint = &*ep.address, "upstream connect failed: {e}");
            Err(SendError::Failed(UpstreamFailure::ConnectFailure))
        }
        // Lost on a keep-alive connection the upstream was closing:
        // RFC 9112 §9.3.1 lets a client send an idempotent request again.
        Err(UpstreamError::Http {
            reused: true,
            error,
        }) if idempotent => {
            tracing::debug!(
                endpoint = &*ep.address,
                "upstream closed a kept-alive connection: {error}"
            );
            Err(SendError::Unprocessed)
        }
        Err(UpstreamError::Http { error, .. }) => {
            tracing::debug!(endpoint = &*ep.address, "upstream error: {error:?}");
            Err(SendError::Failed(UpstreamFailure::Reset))
        }
    }
}

/// Copy bytes both ways between an upgraded client connection and an
/// upgraded upstream connection (WebSocket and other `Upgrade`s).
pub async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    counters: crate::metrics::istio::Tunnel,
) {
    let (Ok(down), Ok(up)) = (down.await, up.await) else {
        counters.closed.inc();
        return;
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    if let Ok((received, sent)) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        counters.received.inc_by(received);
        counters.sent.inc_by(sent);
    }
    counters.closed.inc();
}

/// Close HTTP/1.1 upstream connections idle past `upstream.idle-timeout`;
/// runs for the life of the proxy.
pub async fn sweep_idle(
    clients: std::sync::Arc<Clients>,
    table: std::sync::Arc<cluster::EndpointTable>,
) {
    let every = clients.http1.sweep_every();
    loop {
        crate::timer::sleep(every).await;
        for ep in table.all() {
            clients.http1.sweep(&ep.h1);
        }
    }
}
