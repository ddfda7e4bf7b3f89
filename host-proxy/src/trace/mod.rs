//! Distributed tracing: W3C `traceparent`/`tracestate` and B3 (single and
//! multi header) taken from each request and carried upstream; spans
//! exported over OTLP (gRPC) to `--otlp-endpoint` with the OpenTelemetry
//! SDK, encoded by [`otlp`] (`opentelemetry-otlp`'s exporter measured
//! dearer than the request it describes).
//!
//! Per request, on each proxy: a server span for the request as received
//! (its parent: the caller's span, from the headers), a client span per
//! upstream attempt (its context is what goes upstream, so the next
//! sidecar's server span is its child), and an internal span per plugin
//! hook call carrying the plugin's name, version, hook and decision.
//! Sampling is parent-based: a request that arrives sampled (or not) stays
//! so; a new trace is sampled at `--trace-sampling` (a ratio). Spans are
//! exported in batches, at most [`MAX_QUEUE`] queued or in flight
//! (`wasmesh_trace_spans_queued`): a dead or slow collector costs dropped
//! spans, every one counted in `wasmesh_trace_spans_dropped_total`, never
//! requests or memory.
//!
//! Without `--otlp-endpoint` nothing here runs: trace headers pass through
//! untouched.
//!
//! Reads [`crate::metrics`]; [`crate::serve`] and [`crate::chain`] call
//! it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_propagator_b3::{B3Encoding, Propagator as B3};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanProcessor,
};

use crate::metrics::Metrics;

mod otlp;

/// Spans held for export at most; past it new spans are dropped.
pub const MAX_QUEUE: usize = 4096;

/// What tracing needs from the command line.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// The share of new traces sampled (0.0 to 1.0).
    pub sampling: f64,
    /// The service name spans are reported under.
    pub service: String,
}

/// The proxy's tracer.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// The share of new traces recorded.
    sampling: f64,
    w3c: TraceContextPropagator,
    b3_in: B3,
    b3_single: B3,
    b3_multi: B3,
}

/// Which formats a request's trace context came in, so that the context
/// goes upstream in the same ones (W3C always).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum B3Format {
    #[default]
    None,
    Single,
    Multi,
}

/// One request's trace: its server span, and what goes upstream.
pub struct RequestTrace {
    tracing: Arc<Tracing>,
    kind: Kind,
    b3: B3Format,
}

/// A recorded request, or one that is not: most requests (99% at the
/// default sampling) are not, and cost no SDK span, only ids to pass on.
enum Kind {
    /// Sampled: its server span, in the SDK.
    Sampled(Context),
    /// Not sampled: the trace it belongs to and the id of its (unrecorded)
    /// span, passed upstream as the parent with the sampled flag off.
    Unsampled {
        trace_id: TraceId,
        span_id: SpanId,
        state: TraceState,
    },
}

/// An upstream attempt's client span (none when the request is not
/// sampled: its context goes upstream as the request's own).
pub struct AttemptSpan {
    cx: Option<Context>,
}

/// A hook call's span, started when the call starts (none when the
/// request is not sampled).
pub struct HookSpan {
    cx: Option<Context>,
}

impl Tracing {
    /// A tracer exporting to `opts.endpoint`. Must run inside the proxy's
    /// tokio runtime (the gRPC channel's task is spawned on it).
    pub fn start(opts: &TraceOptions, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        if !(0.0..=1.0).contains(&opts.sampling) {
            anyhow::bail!(
                "--trace-sampling {}: give a ratio from 0 to 1 (0.01 samples 1% of new traces)",
                opts.sampling
            );
        }
        let exporter =
            otlp::Exporter::new(&opts.endpoint, Duration::from_secs(5), metrics.clone())?;
        // The bound is ours (`Bounded`, counting what it drops); the SDK's
        // queue is sized past it so that it never drops silently.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUE + 64)
            .with_scheduled_delay(Duration::from_millis(500))
            .build();
        let processor = Bounded {
            inner: BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
            metrics: metrics.clone(),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            // New traces are sampled (at `sampling`) before the SDK sees
            // them: it is asked only for spans that record.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(opts.service.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("wasmesh");
        Ok(Arc::new(Self {
            provider,
            tracer,
            sampling: opts.sampling,
            w3c: TraceContextPropagator::new(),
            b3_in: B3::with_encoding(B3Encoding::SingleAndMultiHeader),
            b3_single: B3::with_encoding(B3Encoding::SingleHeader),
            b3_multi: B3::with_encoding(B3Encoding::MultipleHeader),
        }))
    }

    /// Export what is queued and stop (at shutdown).
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }

    /// Start the server span of a request with `headers` (its parent: the
    /// caller's context, W3C first, then B3).
    /// `describe` gives the span's name and attributes; it is called only
    /// when the span is sampled (most are not: they cost no strings).
    pub fn request(
        self: &Arc<Self>,
        headers: &HeaderMap,
        describe: impl FnOnce() -> (String, Vec<KeyValue>),
    ) -> RequestTrace {
        // One pass over the names, compared with constants (three lookups
        // by `&str` parsed and hashed each name: ≈ 1.4k instructions a
        // request, measured). W3C wins over B3 when both came.
        let mut found = B3Format::None;
        let mut w3c = false;
        for name in headers.keys() {
            if *name == TRACEPARENT {
                w3c = true;
                break;
            } else if *name == B3_SINGLE {
                found = B3Format::Single;
            } else if *name == B3_TRACE_ID && found == B3Format::None {
                found = B3Format::Multi;
            }
        }
        let (parent, b3) = if w3c {
            (self.w3c.extract(&HeaderExtractor(headers)), B3Format::None)
        } else if found != B3Format::None {
            (self.b3_in.extract(&HeaderExtractor(headers)), found)
        } else {
            (Context::new(), B3Format::None)
        };
        let parent_span = parent.span();
        let remote = parent_span.span_context();
        let sampled = if remote.is_valid() {
            remote.is_sampled()
        } else {
            self.sampling >= 1.0 || fastrand::f64() < self.sampling
        };
        if !sampled {
            let trace_id = if remote.is_valid() {
                remote.trace_id()
            } else {
                TraceId::from_bytes(fastrand::u128(1..).to_be_bytes())
            };
            let kind = Kind::Unsampled {
                trace_id,
                span_id: SpanId::from_bytes(fastrand::u64(1..).to_be_bytes()),
                state: remote.trace_state().clone(),
            };
            return RequestTrace {
                tracing: self.clone(),
                kind,
                b3,
            };
        }
        let mut span = self
            .tracer
            .span_builder("request")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        let (name, attributes) = describe();
        span.update_name(name);
        span.set_attributes(attributes);
        RequestTrace {
            tracing: self.clone(),
            kind: Kind::Sampled(parent.with_span(span)),
            b3,
        }
    }
}

impl RequestTrace {
    /// Whether this request is sampled (its spans are recorded).
    pub fn sampled(&self) -> bool {
        matches!(self.kind, Kind::Sampled(_))
    }

    /// The trace id, as 32 hex digits.
    pub fn trace_id(&self) -> String {
        match &self.kind {
            Kind::Sampled(cx) => cx.span().span_context().trace_id().to_string(),
            Kind::Unsampled { trace_id, .. } => trace_id.to_string(),
        }
    }

    /// Start an upstream attempt's client span; `describe` (its name and
    /// attributes) is called only when it is sampled.
    pub fn attempt(&self, describe: impl FnOnce() -> (String, Vec<KeyValue>)) -> AttemptSpan {
        let Kind::Sampled(cx) = &self.kind else {
            // Nothing records it: no span, no ids, no strings.
            return AttemptSpan { cx: None };
        };
        let t = &self.tracing.tracer;
        let mut span = t
            .span_builder("attempt")
            .with_kind(SpanKind::Client)
            .start_with_context(t, cx);
        if span.is_recording() {
            let (name, attributes) = describe();
            span.update_name(name);
            span.set_attributes(attributes);
        }
        AttemptSpan {
            cx: Some(cx.with_span(span)),
        }
    }

    /// The headers that carry `attempt`'s context upstream: W3C, and B3 in
    /// the format the request came with.
    pub fn headers(&self, attempt: &AttemptSpan) -> TraceHeaders {
        let recorded = attempt.cx.as_ref().or(match &self.kind {
            Kind::Sampled(cx) => Some(cx),
            Kind::Unsampled { .. } => None,
        });
        let owned;
        let sc = match (recorded, &self.kind) {
            (Some(cx), _) => {
                owned = cx.span().span_context().clone();
                &owned
            }
            (
                None,
                Kind::Unsampled {
                    trace_id,
                    span_id,
                    state,
                },
            ) => {
                owned = SpanContext::new(
                    *trace_id,
                    *span_id,
                    TraceFlags::default(),
                    true,
                    state.clone(),
                );
                &owned
            }
            (None, Kind::Sampled(_)) => unreachable!("a sampled request has its context"),
        };
        // Most requests carry no tracestate and no B3: `rest` stays empty
        // (no allocation).
        let mut h = Headers(Vec::new());
        if !sc.trace_state().header().is_empty()
            && let Ok(v) = HeaderValue::try_from(sc.trace_state().header())
        {
            h.0.push((TRACESTATE, v));
        }
        if self.b3 != B3Format::None {
            let cx = Context::new().with_remote_span_context(sc.clone());
            let t = &self.tracing;
            match self.b3 {
                B3Format::Single => t.b3_single.inject_context(&cx, &mut h),
                _ => t.b3_multi.inject_context(&cx, &mut h),
            }
        }
        TraceHeaders {
            traceparent: traceparent(sc),
            rest: h.0,
        }
    }

    /// Start a plugin hook call's span.
    pub fn hook(&self, plugin: &Arc<str>, version: &Arc<str>, hook: &'static str) -> HookSpan {
        let Kind::Sampled(cx) = &self.kind else {
            return HookSpan { cx: None };
        };
        let t = &self.tracing.tracer;
        // "{plugin} {hook}" without the formatter; the attributes share the
        // plugin's strings.
        let mut name = String::with_capacity(plugin.len() + 1 + hook.len());
        name.push_str(plugin);
        name.push(' ');
        name.push_str(hook);
        let span = t
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_attributes([
                KeyValue::new("wasmesh.plugin.name", plugin.clone()),
                KeyValue::new("wasmesh.plugin.version", version.clone()),
                KeyValue::new("wasmesh.plugin.hook", hook),
            ])
            .start_with_context(t, cx);
        HookSpan {
            cx: Some(cx.with_span(span)),
        }
    }

    /// End the server span with the response's status and flag.
    pub fn end(&self, status: u16, flag: &'static str, attributes: Vec<KeyValue>) {
        let Kind::Sampled(cx) = &self.kind else {
            return;
        };
        let span = cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        span.set_attribute(KeyValue::new("wasmesh.response_flags", flag));
        for a in attributes {
            span.set_attribute(a);
        }
        if status >= 500 || status == 0 {
            span.set_status(Status::error(Cow::Borrowed(flag)));
        }
        span.end();
    }
}

impl AttemptSpan {
    /// End it with what the attempt got: a status, or a failure.
    pub fn end(self, outcome: Result<u16, &'static str>) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        match outcome {
            Ok(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 500 {
                    span.set_status(Status::error(""));
                }
            }
            Err(why) => {
                span.set_attribute(KeyValue::new("error.type", why));
                span.set_status(Status::error(why));
            }
        }
        span.end();
    }
}

impl HookSpan {
    /// End it with the plugin's decision (or its failure).
    pub fn end(self, decision: Result<&'static str, &'static str>) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        match decision {
            Ok(d) => span.set_attribute(KeyValue::new("wasmesh.plugin.decision", d)),
            Err(kind) => {
                span.set_attribute(KeyValue::new("wasmesh.plugin.failure", kind));
                span.set_status(Status::error(kind));
            }
        }
        span.end_with_timestamp(SystemTime::now());
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3_SINGLE: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");

/// The trace context headers of one upstream attempt (they replace the
/// client's).
pub struct TraceHeaders {
    /// W3C `traceparent`, always.
    traceparent: HeaderValue,
    /// `tracestate` and the B3 headers, when the request came with them.
    rest: Vec<(HeaderName, HeaderValue)>,
}

impl TraceHeaders {
    /// Put them in `headers`, replacing the client's.
    pub fn apply(self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent);
        for (name, value) in self.rest {
            headers.insert(name, value);
        }
    }
}

/// `traceparent` for `sc`, written straight into its 55 bytes (W3C
/// version 00): no formatter, no string.
fn traceparent(sc: &SpanContext) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    /// Hex digits of `bytes` into `out` from `at`.
    fn put(out: &mut [u8; 55], at: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            out[at + 2 * i] = HEX[usize::from(b >> 4)];
            out[at + 2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    }
    let mut out = [b'-'; 55];
    put(&mut out, 0, &[0]);
    put(&mut out, 3, &sc.trace_id().to_bytes());
    put(&mut out, 36, &sc.span_id().to_bytes());
    put(&mut out, 53, &[sc.trace_flags().to_u8()]);
    // Owned by a reference-counted box: cloning it for the upstream request
    // is a count, not a copy (a `Vec`-backed value allocates when cloned).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .expect("hex digits and dashes are a header value")
}

/// Trace headers for the upstream request, collected as they are
/// injected (no map on the way).
struct Headers(Vec<(HeaderName, HeaderValue)>);

impl opentelemetry::propagation::Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        // The W3C propagator sets `tracestate` even when it is empty: an
        // empty list is sent as no header.
        if value.is_empty() {
            return;
        }
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::try_from(value),
        ) {
            self.0.push((k, v));
        }
    }
}

/// The batch processor behind a bound: a finished span is admitted only
/// while fewer than [`MAX_QUEUE`] are queued or being exported; past it,
/// it is dropped here and counted.
struct Bounded {
    inner: BatchSpanProcessor,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded")
            .field("inner", &self.inner)
            .finish()
    }
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let spans = &self.metrics.trace_spans;
        if spans.queued.inc() >= MAX_QUEUE as i64 {
            spans.queued.dec();
            spans.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_what_the_w3c_propagator_writes() {
        for flags in [TraceFlags::SAMPLED, TraceFlags::default()] {
            let sc = SpanContext::new(
                TraceId::from_bytes(
                    *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36",
                ),
                SpanId::from_bytes(*b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7"),
                flags,
                true,
                TraceState::default(),
            );
            let cx = Context::new().with_remote_span_context(sc.clone());
            let mut h = Headers(Vec::new());
            TraceContextPropagator::new().inject_context(&cx, &mut h);
            assert_eq!(h.0[0].1, traceparent(&sc));
        }
        let sc = SpanContext::new(
            TraceId::from_bytes([0xab; 16]),
            SpanId::from_bytes([1; 8]),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        assert_eq!(
            traceparent(&sc),
            "00-abababababababababababababababab-0101010101010101-01"
        );
    }
}
