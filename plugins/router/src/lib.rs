//! `router`: Istio VirtualService HTTP routing as a wasmesh plugin. Its
//! config is the `http` list of a VirtualService — ordered routes, the first
//! whose `match` holds wins — with Istio's field names. Beyond Istio, a route
//! may split by a header's hash (`sticky`), so one user stays on one subset.
//! See this crate's README for the schema.

use std::collections::BTreeMap;

use serde::Deserialize;
use wasmesh_istio::{Condition, MatchRequest, duration_ms};
use wasmesh_plugin_sdk::{
    Header, HeaderOp, LocalReply, Plugin, Request, RequestDecision, RequestTable, Route, TableRule,
    export, host,
};

/// The plugin's configuration: a VirtualService's `http` routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Ordered routes; the first that matches wins.
    pub http: Vec<HttpRoute>,
}

/// One route (Istio `HTTPRoute`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    /// A name, for logs.
    pub name: Option<String>,
    /// Conditions, OR-ed; none means always.
    #[serde(rename = "match", default)]
    pub matches: Vec<MatchRequest>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    /// Answer with a redirect.
    pub redirect: Option<Redirect>,
    /// Answer with a fixed response.
    pub direct_response: Option<DirectResponse>,
    /// Rewrite the path and/or authority.
    pub rewrite: Option<Rewrite>,
    /// Header edits.
    pub headers: Option<Headers>,
    /// Request timeout (`2s`, `250ms`, `0.5s`).
    pub timeout: Option<String>,
    /// Beyond Istio: split by the hash of a header instead of at random.
    pub sticky: Option<Sticky>,
    /// Belongs to `builtin:retry`; refused here.
    pub retries: Option<serde_json::Value>,
    /// Belongs to `builtin:fault-injection`; refused here.
    pub fault: Option<serde_json::Value>,
    /// Not supported (mirroring); refused.
    pub mirror: Option<serde_json::Value>,
    /// Not supported; refused.
    pub mirror_percentage: Option<serde_json::Value>,
    /// Not supported; refused.
    pub cors_policy: Option<serde_json::Value>,
}

/// Istio `HTTPRouteDestination`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDestination {
    /// Where.
    pub destination: Destination,
    /// Relative weight (default 100 for a single destination).
    pub weight: Option<u32>,
    /// Header edits when this destination is chosen.
    pub headers: Option<Headers>,
}

/// Istio `Destination`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// The service (default: the one addressed).
    pub host: Option<String>,
    /// The subset.
    pub subset: Option<String>,
    /// Accepted for compatibility; the mesh routes by service, not port.
    pub port: Option<serde_json::Value>,
}

/// Istio `HTTPRedirect`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Redirect {
    /// New path.
    pub uri: Option<String>,
    /// New authority.
    pub authority: Option<String>,
    /// New scheme.
    pub scheme: Option<String>,
    /// Status (default 301).
    pub redirect_code: Option<u16>,
}

/// Istio `HTTPDirectResponse`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    /// Status.
    pub status: u16,
    /// Body.
    pub body: Option<DirectBody>,
}

/// A direct response's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectBody {
    /// Text.
    pub string: Option<String>,
}

/// Istio `HTTPRewrite`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// New path, or new prefix when the route matched a `uri.prefix`.
    pub uri: Option<String>,
    /// New authority.
    pub authority: Option<String>,
}

/// Istio `Headers`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Headers {
    /// Request header edits.
    pub request: Option<HeaderOperations>,
    /// Response header edits.
    pub response: Option<HeaderOperations>,
}

/// Istio `HeaderOperations`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOperations {
    /// Replace.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Beyond Istio: pick the weighted destination by the hash of a header, so
/// requests carrying the same value always land on the same destination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    /// The header to hash (e.g. `end-user`). Requests without it split at random.
    pub header: String,
}

struct Target {
    weight: u32,
    route: Route,
    request_headers: Vec<HeaderOp>,
    response_headers: Vec<HeaderOp>,
}

enum Action {
    Forward {
        targets: Vec<Target>,
        total: u32,
        sticky: Option<String>,
    },
    Reply(LocalReply),
    Redirect {
        code: u16,
        uri: Option<String>,
        authority: Option<String>,
        scheme: Option<String>,
    },
}

struct CompiledRoute {
    conditions: Vec<Condition>,
    /// Its `match` as JSON, for the proxy to evaluate (`on-request-table`).
    when: String,
    action: Action,
    rewrite_uri: Option<String>,
    rewrite_authority: Option<String>,
    request_headers: Vec<HeaderOp>,
    response_headers: Vec<HeaderOp>,
    timeout_ms: Option<u32>,
}

/// The plugin.
pub struct Router {
    routes: Vec<CompiledRoute>,
}

fn header_ops(h: Option<&HeaderOperations>, path: &str) -> Result<Vec<HeaderOp>, String> {
    let Some(h) = h else { return Ok(Vec::new()) };
    let mut ops = Vec::new();
    let valid = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    for (n, v) in &h.set {
        if !valid(n) {
            return Err(format!("{path}.set.{n}: not a valid header name"));
        }
        ops.push(HeaderOp::Set(Header::new(n, v)));
    }
    for (n, v) in &h.add {
        if !valid(n) {
            return Err(format!("{path}.add.{n}: not a valid header name"));
        }
        ops.push(HeaderOp::Append(Header::new(n, v)));
    }
    for n in &h.remove {
        ops.push(HeaderOp::Remove(n.to_ascii_lowercase()));
    }
    Ok(ops)
}

fn compile(i: usize, r: &HttpRoute) -> Result<CompiledRoute, String> {
    let at = format!("config.http[{i}]");
    let elsewhere = [
        (r.retries.is_some(), "retries", "builtin:retry"),
        (r.fault.is_some(), "fault", "builtin:fault-injection"),
        (
            r.mirror.is_some() || r.mirror_percentage.is_some(),
            "mirror",
            "nothing yet: mirroring is not supported",
        ),
        (
            r.cors_policy.is_some(),
            "corsPolicy",
            "nothing yet: CORS is not supported",
        ),
    ];
    for (present, field, use_instead) in elsewhere {
        if present {
            return Err(format!(
                "{at}.{field}: not handled by the router; use {use_instead}"
            ));
        }
    }
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    match actions.iter().filter(|a| **a).count() {
        0 => return Err(format!("{at}: give one of route, redirect, directResponse")),
        1 => {}
        _ => {
            return Err(format!(
                "{at}: route, redirect and directResponse exclude each other"
            ));
        }
    }
    let conditions = wasmesh_istio::conditions(&r.matches, &format!("{at}.match"))?;
    let action = if let Some(d) = &r.direct_response {
        if !(200..=599).contains(&d.status) {
            return Err(format!(
                "{at}.directResponse.status: {} is not in 200..=599",
                d.status
            ));
        }
        let body = d
            .body
            .as_ref()
            .and_then(|b| b.string.clone())
            .unwrap_or_default();
        Action::Reply(LocalReply::text(d.status, body))
    } else if let Some(rd) = &r.redirect {
        let code = rd.redirect_code.unwrap_or(301);
        if !(300..=399).contains(&code) {
            return Err(format!(
                "{at}.redirect.redirectCode: {code} is not a 3xx status"
            ));
        }
        Action::Redirect {
            code,
            uri: rd.uri.clone(),
            authority: rd.authority.clone(),
            scheme: rd.scheme.clone(),
        }
    } else {
        let mut targets = Vec::new();
        for (k, d) in r.route.iter().enumerate() {
            let weight = match (d.weight, r.route.len()) {
                (Some(w), _) => w,
                (None, 1) => 100,
                (None, _) => 0,
            };
            let service = d.destination.host.clone();
            targets.push(Target {
                weight,
                route: Route {
                    service,
                    subset: d.destination.subset.clone(),
                    path: None,
                    authority: None,
                },
                request_headers: header_ops(
                    d.headers.as_ref().and_then(|h| h.request.as_ref()),
                    &format!("{at}.route[{k}].headers.request"),
                )?,
                response_headers: header_ops(
                    d.headers.as_ref().and_then(|h| h.response.as_ref()),
                    &format!("{at}.route[{k}].headers.response"),
                )?,
            });
        }
        let total: u32 = targets.iter().map(|t| t.weight).sum();
        if total == 0 {
            return Err(format!(
                "{at}.route: the weights add up to 0; give each destination a weight"
            ));
        }
        Action::Forward {
            targets,
            total,
            sticky: r.sticky.as_ref().map(|s| s.header.to_ascii_lowercase()),
        }
    };
    Ok(CompiledRoute {
        conditions,
        when: serde_json::to_string(&r.matches).map_err(|e| format!("{at}.match: {e}"))?,
        action,
        rewrite_uri: r.rewrite.as_ref().and_then(|w| w.uri.clone()),
        rewrite_authority: r.rewrite.as_ref().and_then(|w| w.authority.clone()),
        request_headers: header_ops(
            r.headers.as_ref().and_then(|h| h.request.as_ref()),
            &format!("{at}.headers.request"),
        )?,
        response_headers: header_ops(
            r.headers.as_ref().and_then(|h| h.response.as_ref()),
            &format!("{at}.headers.response"),
        )?,
        timeout_ms: r
            .timeout
            .as_deref()
            .map(|t| duration_ms(t, &format!("{at}.timeout")))
            .transpose()?,
    })
}

/// FNV-1a: a stable hash for sticky splits (the same on every instance and
/// every version).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Plugin for Router {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let routes = config
            .http
            .iter()
            .enumerate()
            .map(|(i, r)| compile(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { routes })
    }

    /// Routes that need nothing of the request but their `match` (no
    /// prefix rewrite, redirect or sticky split) are a table the proxy
    /// evaluates itself: the router is then not called for requests.
    fn table_on_request(&self) -> Option<RequestTable> {
        let mut rules = Vec::with_capacity(self.routes.len());
        for route in &self.routes {
            if route.rewrite_uri.is_some() {
                return None;
            }
            let decisions = match &route.action {
                Action::Redirect { .. }
                | Action::Forward {
                    sticky: Some(_), ..
                } => return None,
                Action::Reply(r) => vec![(1, Self::reply(route, r))],
                Action::Forward { targets, .. } => targets
                    .iter()
                    .map(|t| (t.weight, Self::forward(route, t, None)))
                    .collect(),
            };
            rules.push(TableRule {
                when: route.when.clone(),
                decisions,
                count: None,
                log: None,
            });
        }
        Some(RequestTable {
            rules,
            otherwise: no_route(),
        })
    }

    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        let full = req.path();
        let (path, query) = match full.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (full.as_str(), None),
        };
        for route in &self.routes {
            let hit = wasmesh_istio::first_match(&route.conditions, req, path)
                .map(|j| j.and_then(|j| route.conditions[j].uri_prefix()));
            let Some(prefix) = hit else { continue };
            return Ok(self.apply(route, req, path, query, prefix));
        }
        Ok(no_route())
    }
}

/// The answer when no route matches.
fn no_route() -> RequestDecision {
    RequestDecision::reply(LocalReply::text(
        404,
        "no route: no router rule matched this request\n",
    ))
}

impl Router {
    /// What every decision of `route` carries: its header edits and
    /// timeout.
    fn base(route: &CompiledRoute) -> RequestDecision {
        RequestDecision {
            request_headers: route.request_headers.clone(),
            response_headers: route.response_headers.clone(),
            timeout_ms: route.timeout_ms,
            ..RequestDecision::default()
        }
    }

    /// `route`'s direct response.
    fn reply(route: &CompiledRoute, r: &LocalReply) -> RequestDecision {
        RequestDecision {
            reply: Some(r.clone()),
            ..Self::base(route)
        }
    }

    /// `route` forwarding to `target`, with the path rewritten to
    /// `new_path` when given.
    fn forward(
        route: &CompiledRoute,
        target: &Target,
        new_path: Option<String>,
    ) -> RequestDecision {
        let mut d = Self::base(route);
        let mut r = target.route.clone();
        r.path = new_path;
        r.authority = route.rewrite_authority.clone();
        d.route = Some(r);
        d.request_headers
            .extend(target.request_headers.iter().cloned());
        d.response_headers
            .extend(target.response_headers.iter().cloned());
        d
    }

    fn apply(
        &self,
        route: &CompiledRoute,
        req: &Request<'_>,
        path: &str,
        query: Option<&str>,
        matched_prefix: Option<&str>,
    ) -> RequestDecision {
        let new_path = route.rewrite_uri.as_ref().map(|uri| {
            let rest = matched_prefix.and_then(|p| path.strip_prefix(p));
            let base = match rest {
                Some(rest) => format!("{uri}{rest}"),
                None => uri.clone(),
            };
            match query {
                Some(q) => format!("{base}?{q}"),
                None => base,
            }
        });
        match &route.action {
            Action::Redirect {
                code,
                uri,
                authority,
                scheme,
            } => {
                // What the redirect leaves out stays as the request had it.
                let scheme = scheme.clone().unwrap_or_else(|| req.scheme());
                let authority = authority.clone().unwrap_or_else(|| req.authority());
                let uri = uri.clone().unwrap_or_else(|| req.path());
                RequestDecision {
                    reply: Some(
                        LocalReply {
                            status: *code,
                            headers: Vec::new(),
                            body: Vec::new(),
                            flag: Default::default(),
                        }
                        .with_header("location", format!("{scheme}://{authority}{uri}")),
                    ),
                    ..Self::base(route)
                }
            }
            Action::Reply(r) => Self::reply(route, r),
            Action::Forward {
                targets,
                total,
                sticky,
            } => {
                let point = match sticky.as_ref().and_then(|h| req.header(h)) {
                    Some(v) => fnv1a(&v) % u64::from(*total),
                    None => (host::random_f64() * f64::from(*total)) as u64,
                };
                let mut acc = 0u64;
                let target = targets
                    .iter()
                    .find(|t| {
                        acc += u64::from(t.weight);
                        point < acc
                    })
                    .unwrap_or(&targets[targets.len() - 1]);
                Self::forward(route, target, new_path)
            }
        }
    }
}

export!(Router, hooks: [on_request]);

#[cfg(test)]
mod tests;
