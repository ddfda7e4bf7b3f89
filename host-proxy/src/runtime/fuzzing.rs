//! Entry points for the fuzz targets under `fuzz/` (feature `fuzzing`):
//! guest decisions made from arbitrary bytes, checked the way every decision
//! a plugin returns is checked; and the header view a guest is shown.

use super::PluginFailure;
use super::bindings::wit;
use super::convert;
use super::types::{ReplyFlag, RequestDecision};

/// Read a decision from fuzz bytes (a byte picks each next field, a length
/// byte and that many bytes, lossy UTF-8, make each string) and check it.
pub fn decision(mut data: &[u8]) -> Result<RequestDecision, PluginFailure> {
    let take = |data: &mut &[u8]| -> String {
        let Some((&n, rest)) = data.split_first() else {
            return String::new();
        };
        let n = usize::from(n).min(rest.len());
        let (s, rest) = rest.split_at(n);
        *data = rest;
        String::from_utf8_lossy(s).into_owned()
    };
    let mut d = empty();
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
            _ => d.delay_ms = Some(u32::from(kind) * 1000),
        }
    }
    convert::request_decision(d, ReplyFlag::LocalReply)
}

fn empty() -> wit::RequestDecision {
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

/// The headers of `map` as a guest sees them, (name, value).
pub fn view(map: &http::HeaderMap) -> Vec<(String, String)> {
    convert::headers_list(map)
        .into_iter()
        .map(|h| (h.name, h.value))
        .collect()
}

/// A decision that sets `headers` on the request in order (`set` for a
/// name's first value, `append` for the next), checked.
pub fn set_all(headers: Vec<(String, String)>) -> Result<RequestDecision, PluginFailure> {
    let mut seen = std::collections::HashSet::new();
    let ops = headers
        .into_iter()
        .map(|(name, value)| {
            let first = seen.insert(name.clone());
            let h = wit::Header { name, value };
            if first {
                wit::HeaderOp::Set(h)
            } else {
                wit::HeaderOp::Append(h)
            }
        })
        .collect();
    convert::request_decision(
        wit::RequestDecision {
            request_headers: ops,
            ..empty()
        },
        ReplyFlag::LocalReply,
    )
}
