//! The completion guard: the one place a request ends. It owns the request
//! view from the moment the chain first sees it, so `on-complete` always
//! has the request, however early the request ends; when dropped — at the
//! end of the response body, or earlier when the client goes away — it
//! runs `on-complete` for the plugins the request reached, then releases
//! the counters they held, then counts the request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::Chain;
use crate::access_log::{self, AccessLog, Decisions, Line};
use crate::flags::ResponseFlag;
use crate::http::body::BodyWatch;
use crate::http::headers::{self, HeaderEdit};
use crate::http::{BoxError, ProxyBody};
use crate::metrics::Metrics;
use crate::metrics::istio::{Exchange, Reporter};
use crate::runtime::types::Completion;
use crate::runtime::{OnFailure, RequestView};
use crate::trace::RequestTrace;

/// One request's passage through a chain, and how it ended.
pub struct CompletionGuard {
    metrics: Arc<Metrics>,
    /// The service the request addressed (its metric label).
    service: Arc<str>,
    pub(super) chain: Arc<Chain>,
    /// Plugins `0..reached` were reached.
    pub(super) reached: usize,
    /// Bit i: plugin i failed on this request; it gets no further calls.
    pub(super) failed: u64,
    /// Bit i: the request is outside plugin i's `match`; it gets no calls.
    pub(super) skipped: u64,
    /// The request. Always here between hook calls (each call moves it
    /// into the plugin's store and back).
    pub(super) req: Option<Box<RequestView>>,
    /// Response header edits asked for so far.
    pub(super) response_edits: Vec<HeaderEdit>,
    status: Option<u16>,
    flag: Option<ResponseFlag>,
    attempts: u32,
    started: Instant,
    /// The client's body, once forwarding began.
    body_broken: Option<BodyWatch>,
    /// What the request showed, for Istio's metrics.
    pub exchange: Exchange,
    /// Its trace, when the proxy traces.
    pub trace: Option<RequestTrace>,
    /// The access log, when the proxy keeps one.
    pub access_log: Option<Arc<AccessLog>>,
    /// What each plugin decided (plugin, hook, decision), for the access
    /// log (kept only when there is one).
    pub decisions: Vec<(Arc<str>, &'static str, &'static str)>,
}

impl CompletionGuard {
    /// Start `req`'s passage through `chain`.
    pub fn begin(
        metrics: Arc<Metrics>,
        service: Arc<str>,
        chain: Arc<Chain>,
        req: RequestView,
        started: Instant,
    ) -> Self {
        Self {
            metrics,
            service,
            chain,
            reached: 0,
            failed: 0,
            skipped: 0,
            req: Some(Box::new(req)),
            response_edits: Vec::new(),
            status: None,
            flag: None,
            attempts: 0,
            started,
            body_broken: None,
            exchange: Exchange::default(),
            trace: None,
            access_log: None,
            decisions: Vec::new(),
        }
    }

    /// The request, with the edits plugins made so far.
    pub fn request(&self) -> &RequestView {
        self.req
            .as_ref()
            .expect("the request is here between calls")
    }

    /// The request, to change what every later attempt sends.
    pub fn request_mut(&mut self) -> &mut RequestView {
        self.req
            .as_mut()
            .expect("the request is here between calls")
    }

    /// How many plugins `on-request` reached so far.
    pub fn reached(&self) -> usize {
        self.reached
    }

    /// The chain it runs.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Note another upstream attempt.
    pub fn count_attempt(&mut self) -> u32 {
        self.attempts += 1;
        self.attempts
    }

    /// Watch the client's body: if it breaks after forwarding began, the
    /// request is the client's fault (`DPE`).
    pub fn watch_body(&mut self, broken: BodyWatch) {
        self.body_broken = Some(broken);
    }

    fn client_body_broke(&self) -> bool {
        self.body_broken.as_ref().is_some_and(BodyWatch::is_broken)
    }

    /// The response head is going out with `status` and `headers`, flagged
    /// `flag`; the guard now travels with its body.
    pub fn respond<B>(
        mut self,
        status: u16,
        headers: &http::HeaderMap,
        flag: Option<ResponseFlag>,
        body: B,
    ) -> GuardedBody<B> {
        self.status = Some(status);
        if self.exchange.grpc {
            self.exchange.grpc_status = grpc_status(headers);
        }
        self.flag = flag;
        GuardedBody {
            inner: body,
            guard: self,
        }
    }
}

impl Drop for CompletionGuard {
    fn drop(&mut self) {
        let done = Completion {
            status: self.status,
            attempts: self.attempts,
            duration: self.started.elapsed(),
        };
        if self.status.is_none() {
            // Dropped before a response head: the client went away.
            self.flag = Some(ResponseFlag::DownstreamConnectionTermination);
        } else if self.flag.is_none() && self.client_body_broke() {
            // A client body that broke after the response began is the
            // client's fault (hyper cut its stream).
            self.flag = Some(ResponseFlag::DownstreamProtocolError);
        }
        let chain = self.chain.clone();
        for (i, p) in chain.plugins.iter().enumerate().take(self.reached) {
            if !p.hooks.on_complete || (self.failed | self.skipped) & (1 << i) != 0 {
                continue;
            }
            let span = super::hook_span(self.trace.as_ref(), p, "on_complete");
            let result = p.on_complete(&mut self.req, done);
            if let Some(span) = span {
                span.end(result.as_ref().map(|()| "proceed").map_err(|f| f.kind()));
            }
            if result.is_err() && p.on_failure == OnFailure::Open {
                p.metrics.fail_open[2].inc();
            }
        }
        let code = self.status.unwrap_or(0);
        if let Some(body) = &self.body_broken {
            self.exchange.request_bytes = body.bytes();
        }
        if let (Some(log), Some(req)) = (&self.access_log, &self.req) {
            log.write(&self.access_log_line(req, code, done));
        }
        // Counters the request held are released after every on-complete;
        // its header map is the next request's or response's.
        if let Some(mut req) = self.req.take() {
            headers::recycle(std::mem::take(&mut req.parts.headers));
        }
        self.metrics.request(&self.service, code, self.flag);
        if let Some(t) = &self.trace {
            t.end(code, ResponseFlag::label(self.flag), Vec::new());
        }
        let millis = done.duration.as_secs_f64() * 1000.0;
        self.metrics
            .istio
            .record(&self.exchange, code, self.flag, millis);
    }
}

impl CompletionGuard {
    /// The access log line of a finished request.
    fn access_log_line<'a>(
        &'a self,
        req: &'a RequestView,
        code: u16,
        done: Completion,
    ) -> Line<'a> {
        let x = &self.exchange;
        Line {
            time: access_log::now(),
            listener: match x.reporter {
                Reporter::Source => "outbound",
                Reporter::Destination => "inbound",
            },
            method: req.parts.method.as_str(),
            authority: req.authority.as_ref().map(|a| a.as_str()),
            path: req.parts.uri.path_and_query().map(|p| p.as_str()),
            protocol: access_log::protocol(req.parts.version),
            client: &req.source_address,
            principal: req.source_principal.as_deref(),
            request_id: req.id.to_str().ok(),
            service: x.destination.as_deref(),
            status: code,
            flags: ResponseFlag::label(self.flag),
            duration_ms: (done.duration.as_secs_f64() * 1e6).round() / 1e3,
            upstream: x.endpoint.as_deref(),
            subset: x.subset.as_deref(),
            attempts: self.attempts,
            bytes_in: x.request_bytes,
            bytes_out: x.response_bytes,
            plugins: Decisions(&self.decisions),
            trace_id: self.trace.as_ref().map(RequestTrace::trace_id),
        }
    }
}

/// A response body that carries the request's [`CompletionGuard`].
pub struct GuardedBody<B = ProxyBody> {
    inner: B,
    guard: CompletionGuard,
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r {
            let x = &mut self.guard.exchange;
            if let Some(d) = frame.data_ref() {
                x.response_bytes += d.len() as u64;
            } else if let Some(t) = frame.trailers_ref() {
                x.grpc_status = grpc_status(t).or(x.grpc_status);
            }
        }
        if let Poll::Ready(Some(Err(e))) = &r {
            // The upstream failed after the response head went out: the
            // client's stream is cut (hyper closes the HTTP/1 connection or
            // resets the HTTP/2 stream); the request is counted with `UR`,
            // or `DPE` when it was the client's body that broke.
            tracing::debug!(
                service = &*self.guard.service,
                "upstream response body failed after its head: {e}"
            );
            self.guard.flag = Some(if self.guard.client_body_broke() {
                ResponseFlag::DownstreamProtocolError
            } else {
                ResponseFlag::UpstreamReset
            });
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

/// A `grpc-status` (response headers of a trailers-only response, or
/// trailers).
fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}
