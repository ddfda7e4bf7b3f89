//! One request, end to end. [`handle`] reads top to bottom as the steps a
//! request goes through:
//!
//! 1. **admit**: refuse what the proxy never forwards (`CONNECT`) and find
//!    the service the request is for (by host outbound; the local service
//!    inbound), or `404 NR`;
//! 2. **prepare**: hop-by-hop headers out, forwarding headers and the
//!    request id in; the request view plugins see;
//! 3. **on-request**: the chain decides, in order ([`crate::chain`]); a
//!    local reply or a plugin failure ends the request here;
//! 4. **route**: the service and subset the chain chose;
//! 5. **send with attempts**: pick an endpoint, send within the route's
//!    timeouts ([`crate::upstream`]), run `on-response` for the outcome,
//!    retry when a plugin asks and the host allows;
//! 6. **respond**: the chain's response edits, the request id; the
//!    completion guard travels with the response body.
//!
//! `on-complete` and the request metric run in one place: when the
//! [`CompletionGuard`] made in step 2 drops, at the end of the response
//! body or as soon as the client goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;

use crate::access_log::AccessLog;
use crate::chain::{CompletionGuard, Plan, Reply, SeenResponse};
use crate::config::{Live, Service, Snapshot};
use crate::error::ProxyError;
use crate::flags::ResponseFlag;
use crate::http::body::{self, BodyWatch, ClientBody, ReqBody};
use crate::http::headers::{self, Remote, X_REQUEST_ID};
use crate::http::{ProxyBody, full};
use crate::listener::Security;
use crate::metrics::Metrics;
use crate::metrics::istio::{Exchange, Reporter};
use crate::runtime::RequestView;
use crate::runtime::types::{Attempt, Outcome, Protocol};
use crate::trace::{RequestTrace, Tracing};
use crate::upstream::{self, Clients, Outgoing, UpBody, UpstreamFailure};
use opentelemetry::KeyValue;
use wasmesh_api::MtlsMode;

/// Most attempts the host makes for one request, whatever plugins ask.
pub const MAX_ATTEMPTS: u32 = 16;

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// From the local app to a service of the mesh: the service's
    /// outbound chain runs.
    Outbound,
    /// From a peer to the local service: its inbound chain runs.
    Inbound,
}

/// What every request shares: the serving configuration, the upstream
/// clients, the metrics.
pub struct Shared {
    /// The serving snapshot.
    pub live: Arc<Live>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Upstream clients.
    pub clients: Arc<Clients>,
    /// The inbound listener's mesh mTLS, when this proxy has an identity.
    pub inbound_tls: Option<InboundTls>,
    /// Distributed tracing, with `--otlp-endpoint`.
    pub tracing: Option<Arc<Tracing>>,
    /// The JSON access log, with `--access-log`.
    pub access_log: Option<Arc<AccessLog>>,
}

/// What the inbound listener needs for mesh mTLS.
pub struct InboundTls {
    /// Its TLS configuration (client certificate required).
    pub config: Arc<rustls::ServerConfig>,
    /// The proxy's credentials (its own ID is `By=` in
    /// `x-forwarded-client-cert`).
    pub credentials: Arc<wasmesh_identity::tls::Credentials>,
}

/// The handler a listener serves with: [`handle`] for one side.
#[derive(Clone)]
pub struct Handler {
    /// What requests share.
    pub shared: Arc<Shared>,
    /// Which side it serves.
    pub side: Side,
}

impl crate::listener::Handler for Handler {
    fn handle(
        &self,
        req: Request<ClientBody>,
        remote: Arc<Remote>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        handle(self.shared.clone(), self.side, remote, req)
    }

    /// Plaintext outbound. Inbound: mesh mTLS when this proxy has an
    /// identity (`STRICT` unless the service says `PERMISSIVE`);
    /// plaintext without one — unless the service demands `STRICT`, which
    /// this proxy then cannot serve.
    fn security(&self) -> Security {
        if self.side == Side::Outbound {
            return Security::Plain;
        }
        let mode = self
            .shared
            .live
            .load()
            .local_service
            .as_ref()
            .and_then(|s| s.mtls.mode);
        match (&self.shared.inbound_tls, mode) {
            (Some(tls), mode) => Security::Mtls {
                config: tls.config.clone(),
                permissive: mode == Some(MtlsMode::Permissive),
            },
            (None, Some(MtlsMode::Strict)) => Security::Refuse(
                "the service's mtls.mode is STRICT but this proxy has no identity: start it with a join token (--token-file)",
            ),
            (None, _) => Security::Plain,
        }
    }
}

/// A response decided, with its flag.
struct Answer {
    response: Response<AnswerBody>,
    flag: Option<ResponseFlag>,
}

impl From<ProxyError> for Answer {
    fn from(e: ProxyError) -> Self {
        Self {
            flag: e.flag(),
            response: e.into_response().map(AnswerBody::Made),
        }
    }
}

impl From<Reply> for Answer {
    fn from(r: Reply) -> Self {
        Self {
            response: r.response.map(AnswerBody::Made),
            flag: Some(r.flag),
        }
    }
}

/// An answer's body: the upstream's as it came (boxed once, with the
/// completion guard around it, not also on its own), or one made here.
enum AnswerBody {
    Upstream(UpBody),
    Made(ProxyBody),
}

impl http_body::Body for AnswerBody {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Upstream(b) => std::pin::Pin::new(b).poll_frame(cx),
            Self::Made(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(b) => b.is_end_stream(),
            Self::Made(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Upstream(b) => b.size_hint(),
            Self::Made(b) => b.size_hint(),
        }
    }
}

/// What the handler keeps of a request besides the view plugins see: what
/// forwarding needs, and the request id for the response.
struct Rest {
    incoming: BodyParts,
    request_id: HeaderValue,
}

/// What forwarding needs of the request besides its view.
struct BodyParts {
    body: ClientBody,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    client_h2: bool,
    started: Instant,
}

/// The proxy's request handler.
pub async fn handle(
    shared: Arc<Shared>,
    side: Side,
    remote: Arc<Remote>,
    req: Request<ClientBody>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let snapshot = shared.live.load();
    let (service, authority) = match admit(&snapshot, side, &req) {
        Ok(admitted) => admitted,
        Err(e) => return refuse(&shared, side, &snapshot, (&remote, &req), started, e),
    };
    let trace = shared
        .tracing
        .as_ref()
        .map(|t| start_trace(t, &req, side, &service, &remote));
    let (
        mut view,
        Rest {
            incoming,
            request_id,
        },
    ) = prepare(req, &remote, &service, authority, started);
    if side == Side::Inbound
        && service.mtls.forward_client_cert
        && let (Some(peer), Some(tls)) = (&remote.peer, &shared.inbound_tls)
    {
        forward_client_cert(&mut view.parts.headers, peer, tls);
    }
    let chain = match side {
        Side::Outbound => service.outbound.clone(),
        Side::Inbound => service.inbound.clone(),
    };
    // From here the request ends when `guard` drops: on-complete, then the
    // request metric.
    let mut guard = CompletionGuard::begin(
        shared.metrics.clone(),
        service.name.clone(),
        chain,
        view,
        started,
    );
    guard.trace = trace;
    guard.access_log = shared.access_log.clone();
    guard.exchange = Exchange {
        reporter: match side {
            Side::Outbound => Reporter::Source,
            Side::Inbound => Reporter::Destination,
        },
        local: snapshot.local_service.as_ref().map(|s| s.name.clone()),
        peer: remote.peer.as_ref().map(|p| p.principal.clone()),
        destination: Some(service.name.clone()),
        grpc: guard.request().protocol == Protocol::Grpc,
        ..Exchange::default()
    };
    let mut plan = Plan::default();
    let answer = match guard.run_on_request(&mut plan) {
        Some(reply) => reply_locally(&mut guard, &plan, &service, reply).await,
        None => forward(&shared, &snapshot, &service, &mut guard, &plan, incoming).await,
    };
    respond(guard, answer, request_id)
}

/// The request's server span, a child of the caller's (from its headers).
fn start_trace(
    t: &Arc<Tracing>,
    req: &Request<ClientBody>,
    side: Side,
    service: &Service,
    remote: &Remote,
) -> RequestTrace {
    t.request(req.headers(), || {
        let attributes = vec![
            KeyValue::new("http.request.method", req.method().to_string()),
            KeyValue::new("url.path", req.uri().path().to_string()),
            KeyValue::new("wasmesh.service", service.name.clone()),
            KeyValue::new(
                "wasmesh.listener",
                match side {
                    Side::Outbound => "outbound",
                    Side::Inbound => "inbound",
                },
            ),
            KeyValue::new("client.address", remote.address.to_string()),
        ];
        (format!("{} {}", req.method(), service.name), attributes)
    })
}

/// Refuse a request before any plugin sees it.
fn refuse(
    shared: &Shared,
    side: Side,
    snapshot: &Snapshot,
    (remote, req): (&Remote, &Request<ClientBody>),
    started: Instant,
    e: ProxyError,
) -> Response<ProxyBody> {
    let metrics = &shared.metrics;
    let code = e.status().as_u16();
    metrics.request("-", code, e.flag());
    let exchange = Exchange {
        reporter: match side {
            Side::Outbound => Reporter::Source,
            Side::Inbound => Reporter::Destination,
        },
        local: snapshot.local_service.as_ref().map(|s| s.name.clone()),
        peer: remote.peer.as_ref().map(|p| p.principal.clone()),
        ..Exchange::default()
    };
    let millis = started.elapsed().as_secs_f64() * 1000.0;
    metrics.istio.record(&exchange, code, e.flag(), millis);
    if let Some(log) = &shared.access_log {
        log.write(&crate::access_log::Line {
            time: crate::access_log::now(),
            listener: match side {
                Side::Outbound => "outbound",
                Side::Inbound => "inbound",
            },
            method: req.method().as_str(),
            authority: req.uri().authority().map(|a| a.as_str()).or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            }),
            path: req.uri().path_and_query().map(|p| p.as_str()),
            protocol: crate::access_log::protocol(req.version()),
            client: &remote.address,
            status: code,
            flags: ResponseFlag::label(e.flag()),
            duration_ms: (millis * 1000.0).round() / 1000.0,
            ..Default::default()
        });
    }
    e.into_response()
}

/// Step 1: what the proxy refuses outright, and the service a request is
/// for.
fn admit(
    snapshot: &Snapshot,
    side: Side,
    req: &Request<ClientBody>,
) -> Result<(Arc<Service>, Option<Authority>), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectUnsupported);
    }
    // `Host` found by comparing names (a tag compare for a standard one),
    // not by hashing it: a request has a few headers.
    let authority = req.uri().authority().cloned().or_else(|| {
        req.headers()
            .iter()
            .find_map(|(n, v)| (n == header::HOST).then_some(v))
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
    });
    let service = match side {
        Side::Outbound => authority
            .as_ref()
            .and_then(|a| snapshot.service_for_host(headers::authority_host(a))),
        Side::Inbound => snapshot.local_service.as_ref(),
    };
    match service {
        Some(s) => Ok((s.clone(), authority)),
        None => Err(ProxyError::NoRoute {
            host: authority.map(|a| a.to_string()).unwrap_or_default(),
        }),
    }
}

/// Step 2: the request as plugins see it (hop-by-hop headers removed,
/// forwarding headers and the request id added), and the rest.
fn prepare(
    mut req: Request<ClientBody>,
    remote: &Remote,
    service: &Service,
    authority: Option<Authority>,
    started: Instant,
) -> (RequestView, Rest) {
    let upgrade = headers::is_upgrade(&req);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let client_h2 = req.version() == Version::HTTP_2;
    let protocol = match client_h2 {
        false => Protocol::Http1,
        true if is_grpc(&req) => Protocol::Grpc,
        true => Protocol::Http2,
    };
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let host = authority.as_ref().map_or("", |a| a.as_str());
    let request_id = headers::add_forwarding(&mut parts.headers, remote, host);
    let view = RequestView {
        scheme: if remote.peer.is_some() {
            "https"
        } else {
            "http"
        },
        port: authority
            .as_ref()
            .and_then(headers::authority_port)
            .unwrap_or(80),
        authority,
        protocol,
        source_address: remote.address.clone(),
        source_principal: remote.peer.as_ref().map(|p| p.principal.clone()),
        service: service.name.clone(),
        id: request_id.clone(),
        holds: Default::default(),
        parts,
    };
    let rest = Rest {
        incoming: BodyParts {
            body,
            on_upgrade,
            client_h2,
            started,
        },
        request_id,
    };
    (view, rest)
}

/// Hand the verified caller to the app, in Envoy's format:
/// `By=<this proxy>;Hash=<sha256 of the caller's certificate>;URI=<caller>`.
fn forward_client_cert(h: &mut http::HeaderMap, peer: &headers::Peer, tls: &InboundTls) {
    let by = tls.credentials.current().id.to_string();
    let value = format!("By={by};Hash={};URI={}", peer.cert_sha256, peer.principal);
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(headers::X_FORWARDED_CLIENT_CERT, v);
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Step 3's early end: a plugin replied locally (or failed closed). A delay
/// decided before a local reply still applies (Istio delays, then aborts),
/// and the plugins before the one that replied see the reply as attempt 1
/// in `on-response`.
async fn reply_locally(
    guard: &mut CompletionGuard,
    plan: &Plan,
    service: &Service,
    reply: Reply,
) -> Answer {
    if reply.flag == ResponseFlag::PluginFailure {
        return reply.into();
    }
    if let Some(d) = plan.delay {
        crate::timer::sleep(d).await;
    }
    let status = reply.response.status().as_u16();
    let seen = SeenResponse {
        status,
        headers: Some(reply.response.headers()),
    };
    let attempt = Attempt {
        number: 1,
        outcome: Outcome::LocalReply(status),
        service: &service.name,
        subset: None,
        endpoint: None,
        duration: Duration::ZERO,
    };
    let replier = guard.reached() - 1;
    let verdict = guard.run_on_response(Some(replier), seen, &attempt);
    verdict.reply.unwrap_or(reply).into()
}

/// Steps 4 and 5: route as the plan says, read the body (whole, when a
/// retry may replay it), and send with attempts.
async fn forward(
    shared: &Shared,
    snapshot: &Snapshot,
    service: &Arc<Service>,
    guard: &mut CompletionGuard,
    plan: &Plan,
    incoming: BodyParts,
) -> Answer {
    if let Some(d) = plan.delay {
        crate::timer::sleep(d).await;
    }
    let target = match &plan.service {
        None => service.clone(),
        Some(s) => match snapshot.services.get(s) {
            Some(t) => t.clone(),
            None => return ProxyError::UnknownService { service: s.clone() }.into(),
        },
    };
    guard.exchange.destination = Some(target.name.clone());
    let broken = BodyWatch::of(&incoming.body);
    guard.watch_body(broken.clone());
    let replay = guard.chain().any_on_response;
    let body = match body::read(incoming.body, replay, &broken).await {
        Ok(b) => b,
        Err(e) => return ProxyError::BadRequestBody(e.to_string()).into(),
    };
    let mut attempts = Attempts {
        shared,
        snapshot,
        target: &target,
        plan,
        body,
        h2: target.protocol.h2(
            incoming.client_h2,
            guard.request().protocol == Protocol::Grpc,
        ),
        upgrade: incoming.on_upgrade.is_some(),
        deadline: plan.timeout.map(|t| incoming.started + t),
    };
    // The upstream's response is made here, where it stays until it is
    // answered with: returned, it was moved through every await between
    // the upstream's head and this function.
    let mut resp = None;
    let last = attempts.run(guard, &mut resp).await;
    attempts.finish((last, resp), incoming.on_upgrade, &broken, &guard.exchange)
}

/// The attempts at one request's target.
struct Attempts<'a> {
    shared: &'a Shared,
    snapshot: &'a Snapshot,
    target: &'a Service,
    plan: &'a Plan,
    body: ReqBody,
    /// HTTP/2 upstream, else HTTP/1.1.
    h2: bool,
    /// The client asked to switch protocols.
    upgrade: bool,
    /// The request's own deadline (`timeout-ms`).
    deadline: Option<Instant>,
}

/// How the last attempt ended: the upstream's response (in the slot the
/// attempts were given), a reply instead of it, or a failure.
enum Last {
    Response,
    Reply(Reply),
    Failed(UpstreamFailure),
}

impl Attempts<'_> {
    /// Step 5: attempt until an attempt stands — the first, unless a plugin
    /// asks for a retry that the host allows (a replayable body, fewer than
    /// [`MAX_ATTEMPTS`], time left) — and return how the last one ended,
    /// its response (if it got one) in `resp`.
    async fn run(
        &mut self,
        guard: &mut CompletionGuard,
        resp: &mut Option<Response<UpBody>>,
    ) -> Last {
        let mut avoid: Option<Arc<str>> = None;
        loop {
            let number = guard.count_attempt();
            let t0 = Instant::now();
            let target = self.target;
            let ep = target.cluster.pick(
                &self.snapshot.cluster.table,
                self.plan.subset.as_deref(),
                avoid.as_deref(),
            );
            let result = match ep {
                None => Err(UpstreamFailure::NoHealthyEndpoint),
                Some(ep) => {
                    guard.exchange.endpoint = Some(ep.address.clone());
                    guard.exchange.subset = Some(ep.subset.clone());
                    guard.exchange.upstream = ep.identity.clone();
                    let span = guard.trace.as_ref().map(|t| {
                        t.attempt(|| {
                            let attributes = vec![
                                KeyValue::new("server.address", ep.address.clone()),
                                KeyValue::new("wasmesh.subset", ep.subset.clone()),
                                KeyValue::new("wasmesh.attempt", i64::from(number)),
                            ];
                            let method = &guard.request().parts.method;
                            (format!("{method} {}", target.name), attributes)
                        })
                    });
                    if let (Some(t), Some(span)) = (&guard.trace, &span) {
                        // The attempt's trace context goes into the request
                        // itself (a retry's replaces its predecessor's): the
                        // copy each attempt sends then has room for it (a
                        // copy of the map is exactly full, and adding a name
                        // to it moved every entry: ≈ 850 instructions a
                        // request, measured), and later hooks see the
                        // context that went upstream.
                        let headers = t.headers(span);
                        let req = guard.request_mut();
                        headers.apply(&mut req.parts.headers);
                    }
                    let sent = self.send(guard.request(), ep, t0, resp).await;
                    // Sent: the response is in `resp`.
                    let result = sent.and_then(|()| resp.as_ref().ok_or(UpstreamFailure::Reset));
                    if let Some(span) = span {
                        span.end(match &result {
                            Ok(r) => Ok(r.status().as_u16()),
                            Err(f) => Err(ResponseFlag::label(Some(f.flag()))),
                        });
                    }
                    result
                }
            };
            if !guard.chain().any_on_response {
                return result.map_or_else(Last::Failed, |_| Last::Response);
            }
            let attempt = Attempt {
                number,
                outcome: outcome(&result),
                service: &self.target.name,
                subset: self.plan.subset.as_deref(),
                endpoint: ep.map(|e| &*e.address),
                duration: t0.elapsed(),
            };
            let verdict = guard.run_on_response(None, seen(&result), &attempt);
            let last = result.map_or_else(Last::Failed, |_| Last::Response);
            if let Some(reply) = verdict.reply {
                return Last::Reply(reply);
            }
            match verdict.retry {
                Some(backoff) if self.may_retry(number) => {
                    // This attempt's response is discarded (its connection
                    // is not reused mid-body).
                    *resp = None;
                    let wait = match self.deadline {
                        Some(d) => backoff.min(d.saturating_duration_since(Instant::now())),
                        None => backoff,
                    };
                    crate::timer::sleep(wait).await;
                    avoid = ep.map(|e| e.address.clone());
                }
                _ => return last,
            }
        }
    }

    fn may_retry(&self, number: u32) -> bool {
        self.body.is_replayable()
            && number < MAX_ATTEMPTS
            && self.deadline.is_none_or(|d| Instant::now() < d)
    }

    /// One attempt at `ep`, within the per-try timeout and what is left of
    /// the request's.
    async fn send(
        &mut self,
        req: &RequestView,
        ep: &upstream::cluster::Endpoint,
        now: Instant,
        resp: &mut Option<Response<UpBody>>,
    ) -> Result<(), UpstreamFailure> {
        let remaining = self.deadline.map(|d| d.saturating_duration_since(now));
        let limit = match (self.plan.per_try_timeout, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let out = Outgoing {
            parts: &req.parts,
            path: self.plan.path.as_ref(),
            authority: self.plan.authority.as_ref(),
            h2: self.h2,
            upgrade: self.upgrade,
        };
        let max = self.snapshot.upstream.max_requests_per_endpoint;
        upstream::send(
            &self.shared.clients,
            ep,
            max,
            &out,
            &mut self.body,
            (now, limit),
            resp,
        )
        .await
    }

    /// Step 5's end: the answer from how the last attempt ended (and the
    /// response it got, if any).
    fn finish(
        &self,
        last: (Last, Option<Response<UpBody>>),
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        broken: &BodyWatch,
        exchange: &Exchange,
    ) -> Answer {
        match last {
            (Last::Reply(reply), _) => reply.into(),
            (Last::Response, Some(mut resp)) => {
                if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) = (on_upgrade, resp.status()) {
                    let up = hyper::upgrade::on(&mut resp);
                    let counters = self.shared.metrics.istio.tunnel(exchange);
                    tokio::spawn(upstream::tunnel(down, up, counters));
                    let (parts, _) = resp.into_parts();
                    return Answer {
                        response: Response::from_parts(parts, AnswerBody::Made(full(Bytes::new()))),
                        flag: None,
                    };
                }
                let (mut parts, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers, false);
                Answer {
                    response: Response::from_parts(parts, AnswerBody::Upstream(body)),
                    flag: None,
                }
            }
            // The client's body broke after forwarding began: the upstream
            // request was aborted; the fault is the client's.
            (Last::Failed(_), _) if broken.is_broken() => {
                ProxyError::BodyBrokeAfterForwarding.into()
            }
            (Last::Failed(failure), _) => ProxyError::Upstream {
                failure,
                service: self.target.name.clone(),
                subset: self.plan.subset.clone(),
            }
            .into(),
            // Not made: `Response` comes with the response it names.
            (Last::Response, None) => ProxyError::Upstream {
                failure: UpstreamFailure::Reset,
                service: self.target.name.clone(),
                subset: self.plan.subset.clone(),
            }
            .into(),
        }
    }
}

/// An attempt's response, as `on-response` sees it.
fn seen<'a>(result: &Result<&'a Response<UpBody>, UpstreamFailure>) -> SeenResponse<'a> {
    match result {
        Ok(r) => SeenResponse {
            status: r.status().as_u16(),
            headers: Some(r.headers()),
        },
        Err(_) => SeenResponse::default(),
    }
}

/// How an attempt ended, as plugins are told.
fn outcome(result: &Result<&Response<UpBody>, UpstreamFailure>) -> Outcome {
    match result {
        Ok(r) => Outcome::Response(r.status().as_u16()),
        Err(UpstreamFailure::NoHealthyEndpoint) => Outcome::NoHealthyEndpoint,
        Err(UpstreamFailure::ConnectFailure) => Outcome::ConnectFailure,
        Err(UpstreamFailure::Reset) => Outcome::Reset,
        Err(UpstreamFailure::Timeout) => Outcome::Timeout,
        Err(UpstreamFailure::Overflow) => Outcome::Overflow,
    }
}

/// Step 6: the chain's response edits and the request id on the response;
/// the completion guard goes with its body.
fn respond(
    mut guard: CompletionGuard,
    answer: Answer,
    request_id: HeaderValue,
) -> Response<ProxyBody> {
    let mut resp = answer.response;
    // The client's protocol, not the upstream's: an HTTP/1.0 upstream's
    // answer goes to an HTTP/1.1 client as HTTP/1.1, keeping its
    // connection alive (hyper itself answers an HTTP/1.0 client in 1.0,
    // and HTTP/2 ignores the field).
    *resp.version_mut() = Version::HTTP_11;
    headers::apply(resp.headers_mut(), &guard.take_response_edits());
    resp.headers_mut().insert(X_REQUEST_ID, request_id);
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = guard.respond(status, &parts.headers, answer.flag, body);
    Response::from_parts(parts, body.boxed())
}
