//! `circuit-breaker`: the circuit-breaking half of an Istio DestinationRule's
//! `trafficPolicy` — `outlierDetection` (eject an endpoint after consecutive
//! errors, for `baseEjectionTime` × the number of its ejections, within
//! `maxEjectionPercent` and `minHealthPercent`) and `connectionPool.http`
//! (a cap on requests in flight, answered `503 UO` at once past it).
//!
//! All state lives in the host's shared state scoped to (service, plugin):
//! every instance sees it, each service has its own, and it survives an
//! upgrade of the plugin. The host does the ejecting; the plugin decides.

use serde::Deserialize;
use wasmesh_istio::duration_ms;
use wasmesh_plugin_sdk::host::{self, state};
use wasmesh_plugin_sdk::{
    Attempt, FixedRequest, Hooks, Level, LocalReply, Outcome, Outcomes, Plugin, ReplyFlag, Request,
    RequestDecision, Response, ResponseDecision, export,
};

/// The plugin's configuration: a DestinationRule `trafficPolicy` subset.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Ejection of misbehaving endpoints.
    pub outlier_detection: Option<OutlierDetection>,
    /// Request limits.
    pub connection_pool: Option<ConnectionPool>,
}

/// Istio `OutlierDetection`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx (and connect failures, resets, timeouts) before an ejection (Istio default 5).
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 (and connect failures, resets, timeouts) before an ejection (off by default).
    pub consecutive_gateway_errors: Option<u32>,
    /// Accepted for compatibility (Envoy's sweep interval); ejections here happen at once.
    pub interval: Option<String>,
    /// Ejection time, multiplied by how many times the endpoint was ejected (default 30s).
    pub base_ejection_time: Option<String>,
    /// Most endpoints of the service ejected at once, percent (default 10; at least one endpoint may always be ejected).
    pub max_ejection_percent: Option<u32>,
    /// No ejection while fewer than this percent of endpoints are healthy (default 0).
    pub min_health_percent: Option<u32>,
}

/// Istio `ConnectionPoolSettings` (its `http` part).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPool {
    /// HTTP limits.
    pub http: Option<HttpPool>,
    /// Accepted for compatibility; TCP limits are the host's (`upstream.*`).
    pub tcp: Option<serde::de::IgnoredAny>,
}

/// Istio `ConnectionPoolSettings.HTTPSettings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPool {
    /// Requests in flight (pending) allowed for HTTP/1.1.
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight allowed for HTTP/2.
    pub http2_max_requests: Option<u32>,
}

/// The plugin.
pub struct CircuitBreaker {
    consecutive_5xx: Option<i64>,
    consecutive_gateway: Option<i64>,
    base_ejection_ms: u32,
    max_ejection_percent: u32,
    min_health_percent: u32,
    max_in_flight: Option<i64>,
}

const IN_FLIGHT: &str = "in-flight";

impl Plugin for CircuitBreaker {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let od = c.outlier_detection.as_ref();
        if let Some(i) = od.and_then(|o| o.interval.as_deref()) {
            duration_ms(i, "config.outlierDetection.interval")?;
        }
        let pct = |v: Option<u32>, f: &str, d: u32| -> Result<u32, String> {
            let v = v.unwrap_or(d);
            if v > 100 {
                return Err(format!(
                    "config.outlierDetection.{f}: {v} is not a percentage (0 to 100)"
                ));
            }
            Ok(v)
        };
        let http = c.connection_pool.as_ref().and_then(|p| p.http.as_ref());
        let limits = [
            http.and_then(|h| h.http1_max_pending_requests),
            http.and_then(|h| h.http2_max_requests),
        ];
        if limits.contains(&Some(0)) {
            return Err(
                "config.connectionPool.http: a limit of 0 would refuse every request".into(),
            );
        }
        Ok(Self {
            consecutive_5xx: od
                .map(|o| i64::from(o.consecutive_5xx_errors.unwrap_or(5)))
                .filter(|n| *n > 0),
            consecutive_gateway: od
                .and_then(|o| o.consecutive_gateway_errors)
                .map(i64::from)
                .filter(|n| *n > 0),
            base_ejection_ms: match od.and_then(|o| o.base_ejection_time.as_deref()) {
                Some(t) => duration_ms(t, "config.outlierDetection.baseEjectionTime")?,
                None => 30_000,
            },
            max_ejection_percent: pct(
                od.and_then(|o| o.max_ejection_percent),
                "maxEjectionPercent",
                10,
            )?,
            min_health_percent: pct(od.and_then(|o| o.min_health_percent), "minHealthPercent", 0)?,
            max_in_flight: limits.iter().flatten().min().map(|m| i64::from(*m)),
        })
    }

    /// `on_request` enforces the in-flight limit, `on_response` counts
    /// errors for ejection: each only when configured.
    fn active_hooks(&self, declared: Hooks) -> Hooks {
        declared.and(Hooks {
            on_request: self.max_in_flight.is_some(),
            on_response: self.consecutive_5xx.is_some() || self.consecutive_gateway.is_some(),
            on_complete: true,
        })
    }

    /// The errors it counts, and the outcome after one on the same
    /// endpoint (the success that ends a run of consecutive errors).
    fn response_outcomes(&self) -> Outcomes {
        Outcomes::STATUS_5XX
            | Outcomes::CONNECT_FAILURE
            | Outcomes::RESET
            | Outcomes::TIMEOUT
            | Outcomes::NEXT_ON_ENDPOINT
    }

    /// Under the pending-request cap, its `on_request` only holds the
    /// in-flight count: the proxy does that hold itself and calls the
    /// plugin only for a request that finds the cap full.
    fn fixed_on_request(&self) -> Option<FixedRequest> {
        let max = self.max_in_flight?;
        Some(FixedRequest::decide(RequestDecision::proceed()).holding(IN_FLIGHT, Some(max)))
    }

    fn on_request(&self, _req: &Request<'_>) -> Result<RequestDecision, String> {
        // Counted for every request that reached the plugin, refused or not;
        // the host takes it back off when the request ends.
        let n = state::counter_hold(IN_FLIGHT, 1).map_err(|e| e.to_string())?;
        if let Some(max) = self.max_in_flight
            && n > max
        {
            host::metric_add("overflow", 1);
            return Ok(RequestDecision::reply(
                LocalReply::text(
                    503,
                    "upstream overflow: too many requests in flight (circuit breaker)\n",
                )
                .flagged(ReplyFlag::Overflow),
            ));
        }
        Ok(RequestDecision::proceed())
    }

    fn on_response(
        &self,
        _req: &Request<'_>,
        _resp: &Response<'_>,
        a: &Attempt,
    ) -> Result<ResponseDecision, String> {
        let Some(ep) = a.endpoint.as_deref() else {
            return Ok(ResponseDecision::proceed());
        };
        let (is_5xx, is_gateway) = match a.outcome {
            Outcome::Response(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout => (true, true),
            _ => return Ok(ResponseDecision::proceed()),
        };
        let mut trip = false;
        for (limit, failed, kind) in [
            (self.consecutive_5xx, is_5xx, "5xx"),
            (self.consecutive_gateway, is_gateway, "gw"),
        ] {
            let Some(limit) = limit else { continue };
            let key = format!("{kind}/{ep}");
            if failed {
                let n = state::counter_add(&key, 1).map_err(|e| e.to_string())?;
                trip |= n >= limit;
            } else {
                let n = state::counter_get(&key);
                if n != 0 {
                    state::counter_add(&key, -n).map_err(|e| e.to_string())?;
                }
            }
        }
        if trip {
            self.eject(ep)?;
        }
        Ok(ResponseDecision::proceed())
    }
}

impl CircuitBreaker {
    fn eject(&self, ep: &str) -> Result<(), String> {
        let all = host::endpoints(None);
        let total = all.len() as u32;
        let ejected = all.iter().filter(|e| e.ejected).count() as u32;
        if all.iter().any(|e| e.address == ep && e.ejected) {
            return Ok(());
        }
        // maxEjectionPercent, rounded down, but one endpoint may always go
        // (as in Envoy): 3 endpoints at 10% → 1 may be ejected; at 34% → 1; at 67% → 2.
        let within_max = ejected == 0 || (ejected + 1) * 100 <= total * self.max_ejection_percent;
        let healthy_pct = ((total - ejected) * 100).checked_div(total).unwrap_or(0);
        if !within_max || healthy_pct < self.min_health_percent {
            host::metric_add("ejection_skipped", 1);
            return Ok(());
        }
        let times = state::counter_add(&format!("ejections/{ep}"), 1).map_err(|e| e.to_string())?;
        let ms = self
            .base_ejection_ms
            .saturating_mul(times.clamp(1, 1000) as u32);
        if host::eject(ep, ms) {
            host::metric_add("ejections", 1);
            host::log(
                Level::Info,
                &format!("ejected {ep} for {ms} ms (ejection #{times})"),
            );
        }
        for kind in ["5xx", "gw"] {
            let key = format!("{kind}/{ep}");
            let n = state::counter_get(&key);
            if n != 0 {
                state::counter_add(&key, -n).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

export!(CircuitBreaker, hooks: [on_request, on_response]);

#[cfg(test)]
mod tests;
