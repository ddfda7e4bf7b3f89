//! `retry`: Istio `HTTPRetry` as a wasmesh plugin — `attempts` retries (so
//! `attempts: 3` means up to 4 tries), `perTryTimeout`, `retryOn` — with an
//! exponential, fully jittered backoff and an optional retry budget (as in
//! newer DestinationRules). The host replays the buffered body (≤ 64 KiB;
//! larger bodies are never retried) and sends a retry to another endpoint
//! when one exists. See this crate's README for the schema.

use serde::Deserialize;
use wasmesh_istio::duration_ms;
use wasmesh_plugin_sdk::host::{self, state};
use wasmesh_plugin_sdk::{
    Attempt, FixedRequest, Hooks, Level, Outcome, Outcomes, Plugin, Request, RequestDecision,
    Response, ResponseDecision, export,
};

/// The plugin's configuration (Istio `HTTPRetry`, extended).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Retries allowed (Istio's default: 2).
    pub attempts: Option<u32>,
    /// Timeout of each try (`2s`, `250ms`).
    pub per_try_timeout: Option<String>,
    /// Comma-separated conditions (Istio's default:
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`).
    pub retry_on: Option<String>,
    /// Accepted for compatibility with Istio; ignored (no localities yet).
    pub retry_remote_localities: Option<bool>,
    /// Beyond Istio: exponential backoff bounds.
    pub backoff: Option<Backoff>,
    /// Beyond Istio's HTTPRetry (as in newer DestinationRules): cap retries
    /// to a share of the requests in flight.
    pub retry_budget: Option<RetryBudget>,
    /// Beyond Istio: retry non-idempotent methods (POST, PATCH) too.
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// Backoff bounds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    /// First backoff's upper bound (default `25ms`).
    pub base_interval: Option<String>,
    /// Largest backoff (default 10 × base).
    pub max_interval: Option<String>,
}

/// A retry budget.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries in flight may be at most this share of requests in flight (default 20).
    pub percent: Option<f64>,
    /// ...but at least this many (default 3).
    pub min_retry_concurrency: Option<u32>,
}

#[derive(Debug, Default)]
struct RetryOn {
    any_5xx: bool,
    gateway: bool,
    connect_failure: bool,
    reset: bool,
    /// Status codes listed in `retryOn`: retried (Istio hands them to
    /// Envoy as `retriable_status_codes`).
    codes: Vec<u16>,
    retriable_4xx: bool,
    grpc: Vec<u32>,
}

impl RetryOn {
    fn parse(text: &str) -> Result<Self, String> {
        let mut r = RetryOn::default();
        for t in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match t {
                "5xx" => r.any_5xx = true,
                "gateway-error" => r.gateway = true,
                "connect-failure" => r.connect_failure = true,
                "reset" | "refused-stream" => r.reset = true,
                // Istio's default lists it with no codes: it only says the
                // codes listed beside it are retried, which they always are.
                "retriable-status-codes" => {}
                "retriable-4xx" => r.retriable_4xx = true,
                "cancelled" => r.grpc.push(1),
                "deadline-exceeded" => r.grpc.push(4),
                "resource-exhausted" => r.grpc.push(8),
                "internal" => r.grpc.push(13),
                "unavailable" => r.grpc.push(14),
                code => match code.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => r.codes.push(c),
                    _ => {
                        return Err(format!(
                            "config.retryOn: unknown condition {code:?}; use 5xx, gateway-error, connect-failure, reset, refused-stream, retriable-status-codes, retriable-4xx, a gRPC name (cancelled, deadline-exceeded, resource-exhausted, internal, unavailable) or a status code"
                        ));
                    }
                },
            }
        }
        Ok(r)
    }

    /// Whether no outcome is retriable.
    fn is_empty(&self) -> bool {
        !(self.any_5xx || self.gateway || self.connect_failure || self.reset || self.retriable_4xx)
            && self.codes.is_empty()
            && self.grpc.is_empty()
    }

    /// The kinds of outcome `wants` may say yes to: `on_response` is called
    /// for no other.
    fn outcomes(&self) -> Outcomes {
        let mut o = Outcomes::NONE;
        if self.connect_failure || self.any_5xx || self.gateway || self.reset {
            o |= Outcomes::CONNECT_FAILURE | Outcomes::OVERFLOW;
        }
        if self.reset || self.any_5xx || self.gateway {
            o |= Outcomes::RESET | Outcomes::TIMEOUT;
        }
        if self.any_5xx || self.gateway {
            o |= Outcomes::STATUS_5XX;
        }
        if self.retriable_4xx {
            o |= Outcomes::STATUS_4XX;
        }
        for code in &self.codes {
            o |= Outcomes::status(*code);
        }
        if !self.grpc.is_empty() {
            o |= Outcomes::GRPC_STATUS;
        }
        o
    }

    /// Whether this outcome is retriable, and whether it provably never
    /// reached the upstream (then any method may be retried).
    fn wants(&self, outcome: &Outcome, grpc_status: Option<u32>) -> (bool, bool) {
        match outcome {
            Outcome::ConnectFailure | Outcome::Overflow => (
                self.connect_failure || self.any_5xx || self.gateway || self.reset,
                true,
            ),
            Outcome::Reset | Outcome::Timeout => {
                (self.reset || self.any_5xx || self.gateway, false)
            }
            Outcome::Response(s) => {
                let s = *s;
                let listed = self.codes.contains(&s);
                let hit = (self.any_5xx && s >= 500)
                    || (self.gateway && matches!(s, 502..=504))
                    || (self.retriable_4xx && s == 409)
                    || listed
                    || grpc_status.is_some_and(|g| self.grpc.contains(&g));
                (hit, false)
            }
            Outcome::LocalReply(_) | Outcome::NoHealthyEndpoint => (false, false),
        }
    }
}

/// The plugin.
pub struct Retry {
    attempts: u32,
    per_try_ms: Option<u32>,
    retry_on: RetryOn,
    base_ms: u32,
    max_ms: u32,
    budget: Option<(f64, i64)>,
    non_idempotent: bool,
}

const ACTIVE: &str = "active";
const RETRIES: &str = "retries";

impl Plugin for Retry {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let base_ms = match c.backoff.as_ref().and_then(|b| b.base_interval.as_deref()) {
            Some(t) => duration_ms(t, "config.backoff.baseInterval")?.max(1),
            None => 25,
        };
        let max_ms = match c.backoff.as_ref().and_then(|b| b.max_interval.as_deref()) {
            Some(t) => duration_ms(t, "config.backoff.maxInterval")?,
            None => base_ms.saturating_mul(10),
        };
        if max_ms < base_ms {
            return Err("config.backoff.maxInterval: must not be below baseInterval".into());
        }
        let budget = match &c.retry_budget {
            None => None,
            Some(b) => {
                let percent = b.percent.unwrap_or(20.0);
                if !(0.0..=100.0).contains(&percent) {
                    return Err(format!(
                        "config.retryBudget.percent: {percent} is not in 0..=100"
                    ));
                }
                Some((percent, i64::from(b.min_retry_concurrency.unwrap_or(3))))
            }
        };
        let attempts = c.attempts.unwrap_or(2);
        if attempts > 10 {
            return Err(format!(
                "config.attempts: {attempts} retries is more than the 10 allowed"
            ));
        }
        Ok(Self {
            attempts,
            per_try_ms: c
                .per_try_timeout
                .as_deref()
                .map(|t| duration_ms(t, "config.perTryTimeout"))
                .transpose()?,
            retry_on: RetryOn::parse(c.retry_on.as_deref().unwrap_or(
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            ))?,
            base_ms,
            max_ms,
            budget,
            non_idempotent: c.retry_non_idempotent,
        })
    }

    /// `on_request` sets the per-try timeout and counts requests for the
    /// budget: without either it is not needed; `on_response` is not
    /// without a retry to make.
    fn active_hooks(&self, declared: Hooks) -> Hooks {
        declared.and(Hooks {
            on_request: self.per_try_ms.is_some() || self.budget.is_some(),
            on_response: self.attempts > 0 && !self.retry_on.is_empty(),
            on_complete: true,
        })
    }

    /// Only the failures it may retry: a request that goes well costs no
    /// `on_response` call.
    fn response_outcomes(&self) -> Outcomes {
        self.retry_on.outcomes()
    }

    /// Its `on_request` reads nothing of the request: the proxy applies
    /// the per-try timeout (and holds the active count, with a budget)
    /// without calling it.
    fn fixed_on_request(&self) -> Option<FixedRequest> {
        if self.per_try_ms.is_none() && self.budget.is_none() {
            return None;
        }
        let fixed = FixedRequest::decide(RequestDecision {
            per_try_timeout_ms: self.per_try_ms,
            ..RequestDecision::default()
        });
        Some(match self.budget {
            Some(_) => fixed.holding(ACTIVE, None),
            None => fixed,
        })
    }

    fn on_request(&self, _req: &Request<'_>) -> Result<RequestDecision, String> {
        if self.budget.is_some() {
            state::counter_hold(ACTIVE, 1).map_err(|e| e.to_string())?;
        }
        Ok(RequestDecision {
            per_try_timeout_ms: self.per_try_ms,
            ..RequestDecision::default()
        })
    }

    fn on_response(
        &self,
        req: &Request<'_>,
        resp: &Response<'_>,
        a: &Attempt,
    ) -> Result<ResponseDecision, String> {
        if a.number > self.attempts {
            return Ok(ResponseDecision::proceed());
        }
        // The grpc-status header is read (a host call) only when a gRPC
        // status is among the retry conditions.
        let grpc = match a.outcome {
            Outcome::Response(_) if !self.retry_on.grpc.is_empty() => {
                resp.header("grpc-status").and_then(|g| g.parse().ok())
            }
            _ => None,
        };
        let (wanted, never_reached) = self.retry_on.wants(&a.outcome, grpc);
        if !wanted {
            return Ok(ResponseDecision::proceed());
        }
        if !never_reached && !self.non_idempotent {
            let method = req.method();
            if !matches!(
                method.as_str(),
                "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
            ) {
                return Ok(ResponseDecision::proceed());
            }
        }
        if let Some((percent, min)) = self.budget {
            let active = state::counter_get(ACTIVE);
            let allowed = (((active as f64) * percent / 100.0).floor() as i64).max(min);
            // Checked and taken in one step in the host, so that concurrent
            // requests cannot both take the last slot; held until this
            // request ends.
            let held =
                state::counter_hold_within(RETRIES, 1, allowed).map_err(|e| e.to_string())?;
            if held.is_none() {
                host::metric_add("retry_budget_exhausted", 1);
                host::log(Level::Debug, "retry budget exhausted");
                return Ok(ResponseDecision::proceed());
            }
        }
        host::metric_add("retries", 1);
        // Fully jittered exponential backoff.
        let cap = self
            .base_ms
            .saturating_mul(1 << (a.number - 1).min(16))
            .min(self.max_ms);
        let backoff = (host::random_f64() * f64::from(cap)) as u32;
        Ok(ResponseDecision::retry(backoff))
    }
}

export!(Retry, hooks: [on_request, on_response]);

#[cfg(test)]
mod tests;
