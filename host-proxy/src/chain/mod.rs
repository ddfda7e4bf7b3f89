//! Running a chain: `on-request` in chain order into a [`Plan`],
//! `on-response` in reverse order for every attempt's outcome, and
//! `on-complete` exactly once per request from the [`CompletionGuard`],
//! whatever happens to the request (the guard also records the request's
//! metric, so both live in one place).
//!
//! The merge rules are the contract's (`wit/plugin.wit`); a plugin that
//! fails gets no further call for the request, and its `on-failure` decides
//! whether the request goes on without it or ends with `503 PF`.
//!
//! Depends on [`crate::runtime`] (the configured plugins it calls),
//! [`crate::http`] and [`crate::metrics`]; it neither routes nor sends.

pub mod completion;
pub mod plan;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::Response;

pub use self::completion::CompletionGuard;
pub use self::plan::Plan;
use crate::error::ProxyError;
use crate::flags::{FLAGS_HEADER, ResponseFlag};
use crate::http::headers::HeaderEdit;
use crate::http::{ProxyBody, full};
use crate::metrics::{Decision, PluginMetrics};
use crate::runtime::types::{
    Attempt, LocalReply, Outcome, ReplyFlag, RequestDecision, ResponseView,
};
use crate::runtime::{
    ConfiguredPlugin, LoweredAttempt, OnFailure, Outcomes, PluginFailure, RequestView,
};
use crate::trace::{HookSpan, RequestTrace};

/// An ordered list of configured plugins.
#[derive(Default)]
pub struct Chain {
    /// In chain order.
    pub plugins: Vec<Arc<ConfiguredPlugin>>,
    /// Each plugin's `match`, when it has one (same order).
    pub matches: Vec<Option<EntryMatch>>,
    /// Some plugin implements `on-response` (so bodies are buffered for
    /// retries).
    pub any_on_response: bool,
    /// Some plugin asked for `on-response` on responses with a
    /// `grpc-status` header.
    pub any_grpc_status: bool,
}

impl Chain {
    /// A chain of these plugins, in this order, each with its `match`.
    pub fn new(entries: Vec<(Arc<ConfiguredPlugin>, Option<EntryMatch>)>) -> Self {
        let any_on_response = entries.iter().any(|(p, _)| p.hooks.on_response);
        let any_grpc_status = entries
            .iter()
            .any(|(p, _)| p.outcomes.wanted().contains(Outcomes::GRPC_STATUS));
        let (plugins, matches) = entries.into_iter().unzip();
        Self {
            plugins,
            matches,
            any_on_response,
            any_grpc_status,
        }
    }
}

/// A chain entry's `match`: the requests its plugin runs for — Istio
/// `HTTPMatchRequest`s, any of which may hold, compiled by the stock
/// plugins' own matcher (`wasmesh_istio`).
pub struct EntryMatch {
    conditions: Vec<wasmesh_istio::Condition>,
    /// As configured, for `/config`.
    pub json: serde_json::Value,
}

impl EntryMatch {
    /// Compile `json`; an error is `(field path, reason)`, the path under
    /// `at` (`services.reviews.plugins[0].match[1].uri`).
    pub fn new(json: &serde_json::Value, at: &str) -> Result<Self, (String, String)> {
        let conditions =
            wasmesh_istio::parse_matches(json, at).map_err(|e| match e.split_once(": ") {
                Some((path, reason)) => (path.to_string(), reason.to_string()),
                None => (at.to_string(), e),
            })?;
        Ok(Self {
            conditions,
            json: json.clone(),
        })
    }

    /// Whether `req` (as it reaches the entry: earlier plugins' edits
    /// applied) is one the plugin runs for.
    pub fn admits(&self, req: &RequestView) -> bool {
        wasmesh_istio::in_scope(&self.conditions, &wasmesh_plugin_sdk::Request::native(req))
    }
}

/// A response the chain made instead of the upstream's, and its flag.
pub struct Reply {
    /// The response.
    pub response: Response<ProxyBody>,
    /// Its flag: `LR`, `UO`, `RL` as the plugin asked, or `PF`.
    pub flag: ResponseFlag,
}

impl Reply {
    /// A plugin's local reply.
    fn local(r: LocalReply) -> Self {
        let flag = match r.flag {
            ReplyFlag::LocalReply => ResponseFlag::LocalReply,
            ReplyFlag::Overflow => ResponseFlag::UpstreamOverflow,
            ReplyFlag::RateLimited => ResponseFlag::RateLimited,
        };
        let mut response = Response::new(full(r.body));
        *response.status_mut() = r.status;
        let h = response.headers_mut();
        for (n, v) in r.headers {
            h.append(n, v);
        }
        h.insert(FLAGS_HEADER, flag.header_value());
        Self { response, flag }
    }

    /// The answer to a plugin that failed with `on-failure: closed`.
    fn failed(p: &ConfiguredPlugin, failure: PluginFailure) -> Self {
        let e = ProxyError::Plugin {
            plugin: p.name.clone(),
            version: p.version().into(),
            failure,
        };
        Self {
            flag: ResponseFlag::PluginFailure,
            response: e.into_response(),
        }
    }
}

/// The kind of an attempt's outcome, as plugins' `on-response-for` name
/// it. `grpc-status` is looked for in the response's headers only when a
/// plugin of the chain asked for it.
fn outcome_kind(chain: &Chain, attempt: &Attempt<'_>, resp: SeenResponse<'_>) -> Outcomes {
    match attempt.outcome {
        Outcome::Response(s) => {
            let kind = Outcomes::status(s);
            if chain.any_grpc_status && resp.headers.is_some_and(|h| h.contains_key("grpc-status"))
            {
                kind | Outcomes::GRPC_STATUS
            } else {
                kind
            }
        }
        Outcome::LocalReply(_) => Outcomes::LOCAL_REPLY,
        Outcome::ConnectFailure => Outcomes::CONNECT_FAILURE,
        Outcome::Reset => Outcomes::RESET,
        Outcome::Timeout => Outcomes::TIMEOUT,
        Outcome::NoHealthyEndpoint => Outcomes::NO_HEALTHY_ENDPOINT,
        Outcome::Overflow => Outcomes::OVERFLOW,
    }
}

/// The response an attempt ended with, borrowed: copied into the
/// [`ResponseView`] plugins read only when one is called (most outcomes
/// call none: plugins ask for the outcomes they act on).
#[derive(Clone, Copy, Default)]
pub struct SeenResponse<'a> {
    /// The status (0: there was no response).
    pub status: u16,
    /// Its headers, when there was a response.
    pub headers: Option<&'a http::HeaderMap>,
}

impl SeenResponse<'_> {
    fn view(self) -> ResponseView {
        ResponseView {
            status: self.status,
            headers: self.headers.cloned().unwrap_or_default(),
        }
    }
}

/// What `on-response` decided for one attempt, merged.
#[derive(Default)]
pub struct ResponseVerdict {
    /// The first reply (a failure with `on-failure: closed` counts as one).
    pub reply: Option<Reply>,
    /// The longest backoff asked for, if any plugin asked for a retry and
    /// the outcome may be retried.
    pub retry: Option<Duration>,
}

impl CompletionGuard {
    /// Run `on-request` over the chain, merging into `plan`. Returns the
    /// reply that ended the pass: a plugin's local reply, or `PF` for a
    /// plugin that failed closed.
    pub fn run_on_request(&mut self, plan: &mut Plan) -> Option<Reply> {
        let chain = self.chain.clone();
        for (i, p) in chain.plugins.iter().enumerate() {
            self.reached = i + 1;
            if let Some(m) = &chain.matches[i]
                && !m.admits(self.request())
            {
                // Outside its `match`: the request never reaches it.
                self.skipped |= 1 << i;
                continue;
            }
            // A decision the plugin gave once for every request
            // (`on-request-fixed`), or by its table (`on-request-table`),
            // is applied without a call.
            let given = match p.fixed_decision(self.request_mut()) {
                None => p.table_decision(self.request()),
                fixed => fixed,
            };
            let (result, span) = match &given {
                Some(d) => (Ok(Cow::Borrowed(&**d)), None),
                None if !p.hooks.on_request => continue,
                None => {
                    let span = hook_span(self.trace.as_ref(), p, "on_request");
                    (p.on_request(&mut self.req).map(Cow::Owned), span)
                }
            };
            let decided = result
                .as_ref()
                .map(|d| decision_word(d))
                .map_err(|f| f.kind());
            if let Some(span) = span {
                span.end(decided);
            }
            if self.access_log.is_some() {
                let d = decided.unwrap_or_else(|kind| kind);
                self.decisions.push((p.name.clone(), "on_request", d));
            }
            match result {
                Ok(d) => {
                    count_request_decision(&p.metrics, &d);
                    let req = self.req.as_mut().expect("the request is back after a call");
                    if let Some(r) = plan.merge(req, &mut self.response_edits, d) {
                        return Some(Reply::local(r));
                    }
                }
                Err(f) => {
                    self.failed |= 1 << i;
                    if p.on_failure == OnFailure::Closed {
                        return Some(Reply::failed(p, f));
                    }
                    p.metrics.fail_open[0].inc();
                }
            }
        }
        None
    }

    /// Run `on-response` for `attempt` over the plugins `on-request`
    /// reached before `upto` (all reached ones when `None`), in reverse
    /// order.
    pub fn run_on_response(
        &mut self,
        upto: Option<usize>,
        seen: SeenResponse<'_>,
        attempt: &Attempt<'_>,
    ) -> ResponseVerdict {
        let upto = upto.unwrap_or(self.reached);
        let chain = self.chain.clone();
        let kind = outcome_kind(&chain, attempt, seen);
        // Copied and lowered once, for the first plugin called.
        let mut resp = None;
        let mut lowered = None;
        let mut verdict = ResponseVerdict::default();
        for i in (0..upto).rev() {
            let p = &chain.plugins[i];
            if !p.hooks.on_response
                || (self.failed | self.skipped) & (1 << i) != 0
                || !(p.outcomes.passes_all() || p.outcomes.passes(kind, attempt.endpoint))
            {
                continue;
            }
            let span = hook_span(self.trace.as_ref(), p, "on_response");
            let lowered = lowered.get_or_insert_with(|| {
                resp = Some(seen.view());
                LoweredAttempt::new(attempt)
            });
            let result = p.on_response(&mut self.req, &mut resp, lowered);
            let decided = result.as_ref().ok().map(|d| match (&d.reply, d.retry) {
                (Some(_), _) => Decision::Reply,
                (None, Some(_)) => Decision::Retry,
                (None, None) => Decision::Proceed,
            });
            let label = match (&result, decided) {
                (Err(f), _) => Err(f.kind()),
                (Ok(_), d) => Ok(d.unwrap_or(Decision::Proceed).label()),
            };
            if let Some(span) = span {
                span.end(label);
            }
            if self.access_log.is_some() {
                let d = label.unwrap_or_else(|kind| kind);
                self.decisions.push((p.name.clone(), "on_response", d));
            }
            match result {
                Ok(d) => {
                    if let Some(decision) = decided {
                        p.metrics.decided(1, decision);
                    }
                    self.response_edits.extend(d.response_headers);
                    if verdict.reply.is_none() {
                        verdict.reply = d.reply.map(Reply::local);
                    }
                    if let Some(b) = d.retry {
                        verdict.retry = Some(verdict.retry.map_or(b, |x| x.max(b)));
                    }
                }
                Err(f) => {
                    self.failed |= 1 << i;
                    if p.on_failure == OnFailure::Open {
                        p.metrics.fail_open[1].inc();
                    } else if verdict.reply.is_none() {
                        verdict.reply = Some(Reply::failed(p, f));
                    }
                }
            }
        }
        if matches!(attempt.outcome, Outcome::LocalReply(_)) {
            verdict.retry = None;
        }
        verdict
    }

    /// The response edits the chain asked for so far.
    pub fn take_response_edits(&mut self) -> Vec<HeaderEdit> {
        std::mem::take(&mut self.response_edits)
    }
}

/// Count what a plugin decided in `on-request`: a reply; else its route
/// and its delay; else proceed.
fn count_request_decision(m: &PluginMetrics, d: &RequestDecision) {
    if d.reply.is_some() {
        return m.decided(0, Decision::Reply);
    }
    if d.route.is_some() {
        m.decided(0, Decision::Route);
    }
    if d.delay.is_some() {
        m.decided(0, Decision::Delay);
    }
    if d.route.is_none() && d.delay.is_none() {
        m.decided(0, Decision::Proceed);
    }
}

/// What a plugin decided in `on-request`, in one word (for its span): a
/// reply, else a route, else a delay, else proceed.
pub(crate) fn decision_word(d: &RequestDecision) -> &'static str {
    match (&d.reply, &d.route, &d.delay) {
        (Some(_), _, _) => Decision::Reply.label(),
        (None, Some(_), _) => Decision::Route.label(),
        (None, None, Some(_)) => Decision::Delay.label(),
        (None, None, None) => Decision::Proceed.label(),
    }
}

/// A span for `p`'s `hook` call, when the request is traced and sampled.
pub(crate) fn hook_span(
    trace: Option<&RequestTrace>,
    p: &ConfiguredPlugin,
    hook: &'static str,
) -> Option<HookSpan> {
    trace
        .filter(|t| t.sampled())
        .map(|t| t.hook(&p.name, p.version_shared(), hook))
}
