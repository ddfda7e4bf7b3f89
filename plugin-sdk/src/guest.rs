//! The component side: the glue the `export!` macro expands to, between
//! the generated bindings ([`crate::bindings`]) and the plugin's own types.

use crate::types::{self as t, Hooks};
use crate::view::{Request, Response};
use crate::{Plugin, parse_config};

pub use crate::bindings::exports::wasmesh::plugin::filter::{Guest, HookSet as WitHooks};
use crate::bindings::wasmesh::plugin::types as wit;
pub use wit::{
    Attempt as WitAttempt, Completion as WitCompletion, Request as WitRequest,
    RequestDecision as WitRequestDecision, Response as WitResponse,
    ResponseDecision as WitResponseDecision,
};

/// The hook flags for the host.
pub fn hooks(h: Hooks) -> WitHooks {
    let mut f = WitHooks::empty();
    if h.on_request {
        f |= WitHooks::ON_REQUEST;
    }
    if h.on_response {
        f |= WitHooks::ON_RESPONSE;
    }
    if h.on_complete {
        f |= WitHooks::ON_COMPLETE;
    }
    f
}

/// Parse the configuration and build the plugin; tell the host which
/// outcomes it wants `on_response` for, when not all of them, and what its
/// `on_request` always decides, when it said.
pub fn configure<P: Plugin>(config: &str) -> Result<P, String> {
    let plugin = P::new(parse_config::<P::Config>(config)?)?;
    let wanted = plugin.response_outcomes();
    if wanted != t::Outcomes::ALL {
        use crate::bindings::wasmesh::plugin::host::{OutcomeSet as W, on_response_for};
        let mut set = W::empty();
        for (kind, flag) in t::Outcomes::NAMED.iter().zip([
            W::STATUS_1XX,
            W::STATUS_2XX,
            W::STATUS_3XX,
            W::STATUS_4XX,
            W::STATUS_5XX,
            W::GRPC_STATUS,
            W::LOCAL_REPLY,
            W::CONNECT_FAILURE,
            W::RESET,
            W::TIMEOUT,
            W::NO_HEALTHY_ENDPOINT,
            W::OVERFLOW,
            W::NEXT_ON_ENDPOINT,
        ]) {
            if wanted.contains(kind.0) {
                set |= flag;
            }
        }
        on_response_for(set);
    }
    if let Some(fixed) = plugin.fixed_on_request() {
        use crate::bindings::wasmesh::plugin::host::{FixedHold, on_request_fixed};
        on_request_fixed(
            &request_decision(fixed.decision),
            fixed
                .hold
                .as_ref()
                .map(|h| FixedHold {
                    key: h.key.clone(),
                    limit: h.limit,
                })
                .as_ref(),
        );
    }
    if let Some(table) = plugin.table_on_request() {
        use crate::bindings::wasmesh::plugin::host::{
            RequestRule, WeightedDecision, on_request_table,
        };
        let rules: Vec<RequestRule> = table
            .rules
            .into_iter()
            .map(|r| RequestRule {
                when: r.when,
                decisions: r
                    .decisions
                    .into_iter()
                    .map(|(weight, d)| WeightedDecision {
                        weight,
                        decision: request_decision(d),
                    })
                    .collect(),
                count: r.count,
                log: r.log,
            })
            .collect();
        on_request_table(&rules, &request_decision(table.otherwise));
    }
    Ok(plugin)
}

/// Run `on_request` and convert its decision.
pub fn on_request<P: Plugin>(p: &P, req: &WitRequest) -> Result<WitRequestDecision, String> {
    p.on_request(&Request { inner: req }).map(request_decision)
}

/// Run `on_response` and convert its decision.
pub fn on_response<P: Plugin>(
    p: &P,
    req: &WitRequest,
    resp: &WitResponse,
    attempt: WitAttempt,
) -> Result<WitResponseDecision, String> {
    let attempt = t::Attempt {
        number: attempt.number,
        outcome: match attempt.outcome {
            wit::Outcome::Response(s) => t::Outcome::Response(s),
            wit::Outcome::LocalReply(s) => t::Outcome::LocalReply(s),
            wit::Outcome::ConnectFailure => t::Outcome::ConnectFailure,
            wit::Outcome::Reset => t::Outcome::Reset,
            wit::Outcome::Timeout => t::Outcome::Timeout,
            wit::Outcome::NoHealthyEndpoint => t::Outcome::NoHealthyEndpoint,
            wit::Outcome::Overflow => t::Outcome::Overflow,
        },
        service: attempt.service,
        subset: attempt.subset,
        endpoint: attempt.endpoint,
        duration_us: attempt.duration_us,
    };
    p.on_response(&Request { inner: req }, &Response { inner: resp }, &attempt)
        .map(|d| WitResponseDecision {
            response_headers: header_ops(d.response_headers),
            reply: d.reply.map(local_reply),
            retry: d.retry_after_ms.map(|backoff_ms| wit::Retry { backoff_ms }),
        })
}

/// Run `on_complete`.
pub fn on_complete<P: Plugin>(p: &P, req: &WitRequest, done: WitCompletion) {
    p.on_complete(
        &Request { inner: req },
        &t::Completion {
            status: done.status,
            attempts: done.attempts,
            duration_us: done.duration_us,
        },
    )
}

fn header(h: t::Header) -> wit::Header {
    wit::Header {
        name: h.name,
        value: h.value,
    }
}

fn header_ops(ops: Vec<t::HeaderOp>) -> Vec<wit::HeaderOp> {
    ops.into_iter()
        .map(|op| match op {
            t::HeaderOp::Set(h) => wit::HeaderOp::Set(header(h)),
            t::HeaderOp::Append(h) => wit::HeaderOp::Append(header(h)),
            t::HeaderOp::Remove(n) => wit::HeaderOp::Remove(n),
        })
        .collect()
}

/// The reply, and its flag told to the host (during the hook call, as the
/// contract asks).
fn local_reply(r: t::LocalReply) -> wit::LocalReply {
    use crate::bindings::wasmesh::plugin::host as h;
    match r.flag {
        t::ReplyFlag::LocalReply => {}
        t::ReplyFlag::Overflow => h::set_reply_flag(h::ReplyFlag::Overflow),
        t::ReplyFlag::RateLimited => h::set_reply_flag(h::ReplyFlag::RateLimited),
    }
    wit::LocalReply {
        status: r.status,
        headers: r.headers.into_iter().map(header).collect(),
        body: r.body,
    }
}

fn request_decision(d: t::RequestDecision) -> WitRequestDecision {
    WitRequestDecision {
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
