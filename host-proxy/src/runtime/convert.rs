//! Between the generated bindings and the proxy's own types: what a guest
//! returns is checked against the host's caps and HTTP's rules on its way
//! in (past them the decision is refused as a plugin failure, nothing of it
//! applied); what the host hands a guest is lowered on its way out.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use super::PluginFailure;
use super::bindings::{wit, wit_host};
use super::types::{
    Attempt, Completion, LocalReply, Outcome, Protocol, ReplyFlag, RequestDecision,
    ResponseDecision, Route,
};
use crate::flags::FLAGS_HEADER;
use crate::http::headers::{HeaderEdit, lossy, parse_name, parse_value};
use wasmesh_plugin_sdk as sdk;

/// Most header operations one decision may carry (each side).
pub const MAX_HEADER_OPS: usize = 1_000;
/// Most bytes of header names and values one decision may carry.
pub const MAX_DECISION_HEADER_BYTES: usize = 256 << 10;
/// Largest local-reply body a plugin may return.
pub const MAX_REPLY_BODY: usize = 64 << 10;
/// Longest `delay-ms` or retry `backoff-ms` a plugin may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The host's caps on what a plugin may hand back. Guest memory caps bound
/// what can be lifted in the first place.
pub(crate) fn check_caps(
    ops: [&[wit::HeaderOp]; 2],
    reply: Option<&wit::LocalReply>,
    other_bytes: usize,
) -> Result<(), PluginFailure> {
    let mut bytes = other_bytes;
    for side in ops {
        if side.len() > MAX_HEADER_OPS {
            return Err(PluginFailure::TooLarge(format!(
                "{} header operations (at most {MAX_HEADER_OPS})",
                side.len()
            )));
        }
        for op in side {
            bytes += match op {
                wit::HeaderOp::Set(h) | wit::HeaderOp::Append(h) => h.name.len() + h.value.len(),
                wit::HeaderOp::Remove(n) => n.len(),
            };
        }
    }
    if let Some(r) = reply {
        if r.body.len() > MAX_REPLY_BODY {
            return Err(PluginFailure::TooLarge(format!(
                "a local-reply body of {} bytes (at most {MAX_REPLY_BODY})",
                r.body.len()
            )));
        }
        if r.headers.len() > MAX_HEADER_OPS {
            return Err(PluginFailure::TooLarge(format!(
                "{} local-reply headers (at most {MAX_HEADER_OPS})",
                r.headers.len()
            )));
        }
        bytes += r
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum::<usize>();
    }
    if bytes > MAX_DECISION_HEADER_BYTES {
        return Err(PluginFailure::TooLarge(format!(
            "{bytes} bytes of headers and routes (at most {MAX_DECISION_HEADER_BYTES})"
        )));
    }
    Ok(())
}

fn edits(ops: Vec<wit::HeaderOp>) -> Result<Vec<HeaderEdit>, String> {
    ops.into_iter()
        .map(|op| {
            Ok(match op {
                wit::HeaderOp::Set(h) => {
                    HeaderEdit::Set(parse_name(&h.name)?, parse_value(&h.name, &h.value)?)
                }
                wit::HeaderOp::Append(h) => {
                    HeaderEdit::Append(parse_name(&h.name)?, parse_value(&h.name, &h.value)?)
                }
                wit::HeaderOp::Remove(n) => HeaderEdit::Remove(parse_name(&n)?),
            })
        })
        .collect()
}

fn reply(r: wit::LocalReply, mut flag: ReplyFlag) -> Result<LocalReply, String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("local reply status {} is not in 200..=599", r.status))?;
    let mut headers = Vec::with_capacity(r.headers.len());
    for h in r.headers {
        let name = parse_name(&h.name)?;
        // 0.1.0's way of asking for `UO`: the flag header in the reply. The
        // proxy writes the flag header itself.
        if name == FLAGS_HEADER {
            if flag == ReplyFlag::LocalReply && h.value.trim() == "UO" {
                flag = ReplyFlag::Overflow;
            }
            continue;
        }
        let value = parse_value(&h.name, &h.value)?;
        headers.push((name, value));
    }
    Ok(LocalReply {
        status,
        headers,
        body: Bytes::from(r.body),
        flag,
    })
}

fn wait(what: &str, ms: u32) -> Result<Duration, String> {
    let d = Duration::from_millis(u64::from(ms));
    if d > MAX_WAIT {
        return Err(format!(
            "{what} of {ms} ms is over the {} ms the host allows",
            MAX_WAIT.as_millis()
        ));
    }
    Ok(d)
}

fn timeout(ms: Option<u32>) -> Option<Option<Duration>> {
    ms.map(|ms| (ms > 0).then(|| Duration::from_millis(u64::from(ms))))
}

fn route(r: wit::Route) -> Result<Route, String> {
    let path = match r.path {
        None => None,
        Some(p) if !p.starts_with('/') => {
            return Err(format!("route path {p:?} must start with '/'"));
        }
        Some(p) => Some(
            p.parse::<http::uri::PathAndQuery>()
                .map_err(|_| format!("route path {p:?} is not a valid path"))?,
        ),
    };
    let authority = match r.authority {
        None => None,
        Some(a) => Some(
            http::HeaderValue::from_str(&a)
                .map_err(|_| format!("route authority {a:?} is not valid"))?,
        ),
    };
    Ok(Route {
        service: r.service,
        subset: r.subset,
        path,
        authority,
    })
}

/// An `on-request` decision, checked. `flag` is what the plugin asked for
/// with `set-reply-flag` during the call.
pub(crate) fn request_decision(
    d: wit::RequestDecision,
    flag: ReplyFlag,
) -> Result<RequestDecision, PluginFailure> {
    let route_bytes: usize = d
        .route
        .iter()
        .flat_map(|r| {
            [&r.service, &r.subset, &r.path, &r.authority]
                .into_iter()
                .flatten()
                .map(String::len)
        })
        .sum();
    check_caps(
        [&d.request_headers, &d.response_headers],
        d.reply.as_ref(),
        route_bytes,
    )?;
    let invalid = PluginFailure::Invalid;
    Ok(RequestDecision {
        request_headers: edits(d.request_headers).map_err(invalid)?,
        response_headers: edits(d.response_headers).map_err(invalid)?,
        route: d.route.map(route).transpose().map_err(invalid)?,
        timeout: timeout(d.timeout_ms),
        per_try_timeout: timeout(d.per_try_timeout_ms),
        delay: d
            .delay_ms
            .map(|ms| wait("delay-ms", ms))
            .transpose()
            .map_err(invalid)?,
        reply: d
            .reply
            .map(|r| reply(r, flag))
            .transpose()
            .map_err(invalid)?,
    })
}

/// An `on-response` decision, checked.
pub(crate) fn response_decision(
    d: wit::ResponseDecision,
    flag: ReplyFlag,
) -> Result<ResponseDecision, PluginFailure> {
    check_caps([&d.response_headers, &[]], d.reply.as_ref(), 0)?;
    let invalid = PluginFailure::Invalid;
    Ok(ResponseDecision {
        response_headers: edits(d.response_headers).map_err(invalid)?,
        reply: d
            .reply
            .map(|r| reply(r, flag))
            .transpose()
            .map_err(invalid)?,
        retry: d
            .retry
            .map(|r| wait("a retry's backoff-ms", r.backoff_ms))
            .transpose()
            .map_err(invalid)?,
    })
}

pub(crate) fn protocol(p: Protocol) -> wit::Protocol {
    match p {
        Protocol::Http1 => wit::Protocol::Http1,
        Protocol::Http2 => wit::Protocol::Http2,
        Protocol::Grpc => wit::Protocol::Grpc,
    }
}

pub(crate) fn attempt(a: &Attempt<'_>) -> wit::Attempt {
    wit::Attempt {
        number: a.number,
        outcome: match a.outcome {
            Outcome::Response(s) => wit::Outcome::Response(s),
            Outcome::LocalReply(s) => wit::Outcome::LocalReply(s),
            Outcome::ConnectFailure => wit::Outcome::ConnectFailure,
            Outcome::Reset => wit::Outcome::Reset,
            Outcome::Timeout => wit::Outcome::Timeout,
            Outcome::NoHealthyEndpoint => wit::Outcome::NoHealthyEndpoint,
            Outcome::Overflow => wit::Outcome::Overflow,
        },
        service: a.service.to_string(),
        subset: a.subset.map(str::to_string),
        endpoint: a.endpoint.map(str::to_string),
        duration_us: a.duration.as_micros() as u64,
    }
}

pub(crate) fn completion(c: Completion) -> wit::Completion {
    wit::Completion {
        status: c.status,
        attempts: c.attempts,
        duration_us: c.duration.as_micros() as u64,
    }
}

/// A header map as plugins see it.
pub(crate) fn headers_list(map: &http::HeaderMap) -> Vec<wit::Header> {
    map.iter()
        .map(|(n, v)| wit::Header {
            name: n.as_str().to_string(),
            value: lossy(v),
        })
        .collect()
}

pub(crate) fn reply_flag(f: super::bindings::wit_host::ReplyFlag) -> ReplyFlag {
    use super::bindings::wit_host::ReplyFlag as W;
    match f {
        W::LocalReply => ReplyFlag::LocalReply,
        W::Overflow => ReplyFlag::Overflow,
        W::RateLimited => ReplyFlag::RateLimited,
    }
}

/// The outcomes a plugin asked `on-response` for.
pub(crate) fn outcomes(set: wit_host::OutcomeSet) -> sdk::Outcomes {
    use wit_host::OutcomeSet as W;
    let flags = [
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
    ];
    sdk::Outcomes::NAMED
        .iter()
        .zip(flags)
        .filter(|(_, flag)| set.contains(*flag))
        .fold(sdk::Outcomes::NONE, |all, ((kind, _), _)| all | *kind)
}
