//! `fault-injection`: Istio `HTTPFaultInjection` as a wasmesh plugin — delay
//! and/or abort a percentage of requests, optionally only those a `match`
//! selects (the router's vocabulary), as bookinfo does for one user.
//! See this crate's README for the schema.

use serde::Deserialize;
use wasmesh_istio::{Condition, MatchRequest, Percent, duration_ms};
use wasmesh_plugin_sdk::{Header, Hooks, LocalReply, Plugin, Request, RequestDecision, export};

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Only requests matching one of these (default: all).
    #[serde(rename = "match", default)]
    pub matches: Vec<MatchRequest>,
    /// Delay some requests.
    pub delay: Option<Delay>,
    /// Abort some requests.
    pub abort: Option<Abort>,
}

/// Istio `HTTPFaultInjection.Delay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Delay {
    /// How long (`5s`, `250ms`).
    pub fixed_delay: String,
    /// Which share of requests (default 100%).
    pub percentage: Option<Percent>,
}

/// Istio `HTTPFaultInjection.Abort`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Abort {
    /// Answer with this HTTP status.
    pub http_status: Option<u16>,
    /// Or with this gRPC status (a name such as `UNAVAILABLE`, or a number).
    pub grpc_status: Option<serde_json::Value>,
    /// Which share of requests (default 100%).
    pub percentage: Option<Percent>,
}

enum AbortWith {
    Http(u16),
    Grpc(u32),
}

/// The plugin.
pub struct FaultInjection {
    conditions: Vec<Condition>,
    delay: Option<(u32, Percent)>,
    abort: Option<(AbortWith, Percent)>,
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn grpc_code(v: &serde_json::Value) -> Result<u32, String> {
    let code = match v {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        serde_json::Value::String(s) => GRPC_CODES
            .iter()
            .position(|c| c.eq_ignore_ascii_case(s))
            .map(|i| i as u32)
            .or_else(|| s.parse().ok()),
        _ => None,
    };
    code.filter(|c| *c <= 16)
        .ok_or_else(|| format!("config.abort.grpcStatus: {v} is not a gRPC status (a name such as UNAVAILABLE, or 0 to 16)"))
}

const FULL: Percent = Percent { value: 100.0 };

/// Longest delay the host accepts from a plugin (`delay-ms`).
const MAX_DELAY_MS: u32 = 60_000;

impl Plugin for FaultInjection {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.delay.is_none() && c.abort.is_none() {
            return Err("config: give `delay`, `abort` or both".into());
        }
        let delay = match &c.delay {
            None => None,
            Some(d) => {
                let p = d.percentage.unwrap_or(FULL);
                p.check("config.delay.percentage")?;
                let ms = duration_ms(&d.fixed_delay, "config.delay.fixedDelay")?;
                // The host refuses a delay over a minute (the contract's
                // bound): say so here, not on every request.
                if ms > MAX_DELAY_MS {
                    return Err(format!(
                        "config.delay.fixedDelay: {:?} is over the one minute (60s) the proxy allows",
                        d.fixed_delay
                    ));
                }
                Some((ms, p))
            }
        };
        let abort = match &c.abort {
            None => None,
            Some(a) => {
                let p = a.percentage.unwrap_or(FULL);
                p.check("config.abort.percentage")?;
                let with = match (a.http_status, &a.grpc_status) {
                    (Some(s), None) if (200..=599).contains(&s) => AbortWith::Http(s),
                    (Some(s), None) => {
                        return Err(format!("config.abort.httpStatus: {s} is not in 200..=599"));
                    }
                    (None, Some(g)) => AbortWith::Grpc(grpc_code(g)?),
                    _ => return Err("config.abort: give one of httpStatus, grpcStatus".into()),
                };
                Some((with, p))
            }
        };
        Ok(Self {
            conditions: wasmesh_istio::conditions(&c.matches, "config.match")?,
            delay,
            abort,
        })
    }

    /// A fault at 0% (the way a fault is kept configured but switched off)
    /// never fires: the proxy need not call the plugin at all.
    fn active_hooks(&self, declared: Hooks) -> Hooks {
        let fires = |p: &Percent| p.value > 0.0;
        let delays = self.delay.as_ref().is_some_and(|(_, p)| fires(p));
        let aborts = self.abort.as_ref().is_some_and(|(_, p)| fires(p));
        if delays || aborts {
            declared
        } else {
            Hooks::NONE
        }
    }

    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        if !wasmesh_istio::in_scope(&self.conditions, req) {
            return Ok(RequestDecision::proceed());
        }
        let mut d = RequestDecision::proceed();
        if let Some((ms, p)) = &self.delay
            && p.hit()
        {
            d.delay_ms = Some(*ms);
        }
        if let Some((with, p)) = &self.abort
            && p.hit()
        {
            d.reply = Some(match with {
                AbortWith::Http(s) => LocalReply::text(*s, "fault filter abort\n"),
                AbortWith::Grpc(code) => LocalReply {
                    status: 200,
                    headers: vec![
                        Header::new("content-type", "application/grpc"),
                        Header::new("grpc-status", code.to_string()),
                        Header::new("grpc-message", "fault filter abort"),
                    ],
                    body: Vec::new(),
                    flag: Default::default(),
                },
            });
        }
        Ok(d)
    }
}

export!(FaultInjection, hooks: [on_request]);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmesh_plugin_sdk::testing::{Harness, TestRequest};

    #[test]
    fn abort_percentage_is_honoured() {
        let h = Harness::<FaultInjection>::new(
            r#"{"abort":{"httpStatus":503,"percentage":{"value":50}}}"#,
        )
        .unwrap();
        let n = 10_000;
        let aborted = (0..n)
            .filter(|_| {
                h.on_request(&TestRequest::get("/"))
                    .unwrap()
                    .reply
                    .is_some_and(|r| r.status == 503)
            })
            .count();
        let share = aborted as f64 / n as f64;
        assert!((0.47..0.53).contains(&share), "{share}");
    }

    #[test]
    fn delay_applies_to_matched_requests_only() {
        let h = Harness::<FaultInjection>::new(
            r#"{"match":[{"headers":{"end-user":{"exact":"jason"}}}],"delay":{"fixedDelay":"7s","percentage":{"value":100}}}"#,
        )
        .unwrap();
        let d = h
            .on_request(&TestRequest::get("/").header("end-user", "jason"))
            .unwrap();
        assert_eq!(d.delay_ms, Some(7000));
        let d = h
            .on_request(&TestRequest::get("/").header("end-user", "bob"))
            .unwrap();
        assert_eq!(d, RequestDecision::proceed());
    }

    #[test]
    fn grpc_abort_is_a_trailers_only_grpc_response() {
        let h =
            Harness::<FaultInjection>::new(r#"{"abort":{"grpcStatus":"UNAVAILABLE"}}"#).unwrap();
        let r = h.on_request(&TestRequest::get("/")).unwrap().reply.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.headers.contains(&Header::new("grpc-status", "14")));
    }

    #[test]
    fn zero_percent_never_fires_and_is_never_called() {
        let h = Harness::<FaultInjection>::new(
            r#"{"abort":{"httpStatus":500,"percentage":{"value":0}}}"#,
        )
        .unwrap();
        assert_eq!(h.hooks(), Hooks::NONE);
        let some = Harness::<FaultInjection>::new(
            r#"{"delay":{"fixedDelay":"1s","percentage":{"value":0}},"abort":{"httpStatus":500,"percentage":{"value":0.1}}}"#,
        )
        .unwrap();
        assert!(some.hooks().on_request);
        assert!((0..1000).all(|_| {
            h.on_request(&TestRequest::get("/"))
                .unwrap()
                .reply
                .is_none()
        }));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = |c: &str| Harness::<FaultInjection>::new(c).err().unwrap();
        assert!(e("{}").contains("give `delay`, `abort`"));
        assert!(e(r#"{"abort":{"httpStatus":700}}"#).contains("config.abort.httpStatus"));
        assert!(e(r#"{"abort":{"grpcStatus":"NOPE"}}"#).contains("config.abort.grpcStatus"));
        assert!(e(r#"{"delay":{"fixedDelay":"soon"}}"#).contains("config.delay.fixedDelay"));
        assert!(e(r#"{"delay":{"fixedDelay":"2m"}}"#).contains("over the one minute"));
        assert!(
            e(r#"{"delay":{"fixedDelay":"1s","percentage":{"value":150}}}"#)
                .contains("config.delay.percentage.value")
        );
        assert!(
            e(r#"{"abort":{"httpStatus":500,"percent":5}}"#).contains("unknown field `percent`")
        );
    }
}
