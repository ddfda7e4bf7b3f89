//! The plan: what a chain's `on-request` decisions add up to, merged by the
//! contract's rules (header edits accumulate; a later route, timeout or
//! delay overrides an earlier one, a route field by field; the first reply
//! ends the pass).

use std::borrow::Cow;
use std::time::Duration;

use http::HeaderValue;
use http::uri::PathAndQuery;

use crate::http::headers::{self, HeaderEdit};
use crate::runtime::RequestView;
use crate::runtime::types::{LocalReply, RequestDecision};

/// Where and how the request goes, as the chain decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// Another service than the one addressed.
    pub service: Option<String>,
    /// The subset to balance over.
    pub subset: Option<String>,
    /// The path (with query) sent upstream.
    pub path: Option<PathAndQuery>,
    /// The authority sent upstream.
    pub authority: Option<HeaderValue>,
    /// Deadline of the whole request.
    pub timeout: Option<Duration>,
    /// Deadline of each attempt.
    pub per_try_timeout: Option<Duration>,
    /// Wait before sending (or before a local reply made in the same pass).
    pub delay: Option<Duration>,
}

impl Plan {
    /// Merge one plugin's checked decision: its request edits are applied to
    /// `req` at once (later plugins see them), its response edits are kept
    /// for the final response. Returns the plugin's local reply, if any.
    pub fn merge(
        &mut self,
        req: &mut RequestView,
        response_edits: &mut Vec<HeaderEdit>,
        d: Cow<'_, RequestDecision>,
    ) -> Option<LocalReply> {
        headers::apply(&mut req.parts.headers, &d.request_headers);
        if let Some(t) = d.timeout {
            self.timeout = t;
        }
        if let Some(t) = d.per_try_timeout {
            self.per_try_timeout = t;
        }
        if let Some(t) = d.delay {
            self.delay = Some(t);
        }
        // A decision given once for every request (`on-request-fixed`,
        // `on-request-table`) is shared: only what it sets is copied.
        let (response_headers, route, reply) = match d {
            Cow::Owned(d) => (d.response_headers, d.route, d.reply),
            Cow::Borrowed(d) => (d.response_headers.clone(), d.route.clone(), d.reply.clone()),
        };
        response_edits.extend(response_headers);
        if let Some(r) = route {
            if r.service.is_some() {
                self.service = r.service;
            }
            if r.subset.is_some() {
                self.subset = r.subset;
            }
            if r.path.is_some() {
                self.path = r.path;
            }
            if r.authority.is_some() {
                self.authority = r.authority;
            }
        }
        reply
    }
}
