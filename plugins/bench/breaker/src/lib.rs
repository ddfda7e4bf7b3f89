//! Benchmark plugin shaped like the stock circuit breaker: a pending-request
//! limit kept in shared state, consecutive 5xx counted per endpoint, and an
//! ejection past the threshold.

use serde::Deserialize;
use wasmesh_plugin_sdk::{
    Attempt, Completion, LocalReply, Plugin, Request, RequestDecision, Response, ResponseDecision,
    export,
    host::{self, state},
};

/// Config.
#[derive(Deserialize)]
pub struct Config {
    /// Most pending requests.
    pub max_pending: i64,
    /// Consecutive 5xx before ejection.
    pub consecutive_5xx: i64,
    /// Ejection time, ms.
    pub ejection_ms: u32,
}

/// The plugin.
pub struct Breaker(Config);

impl Plugin for Breaker {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        Ok(Self(c))
    }
    fn on_request(&self, _req: &Request<'_>) -> Result<RequestDecision, String> {
        let pending = state::counter_add("pending", 1).map_err(|e| e.to_string())?;
        if pending > self.0.max_pending {
            return Ok(RequestDecision::reply(LocalReply::text(503, "overflow")));
        }
        Ok(RequestDecision::proceed())
    }
    fn on_response(
        &self,
        _req: &Request<'_>,
        _resp: &Response<'_>,
        a: &Attempt,
    ) -> Result<ResponseDecision, String> {
        let Some(ep) = &a.endpoint else {
            return Ok(ResponseDecision::proceed());
        };
        let key = format!("5xx/{ep}");
        if a.outcome.status().is_some_and(|s| s >= 500) {
            let n = state::counter_add(&key, 1).map_err(|e| e.to_string())?;
            if n >= self.0.consecutive_5xx {
                host::eject(ep, self.0.ejection_ms);
                state::counter_add(&key, -n).map_err(|e| e.to_string())?;
            }
        } else if state::counter_get(&key) != 0 {
            state::counter_add(&key, -state::counter_get(&key)).map_err(|e| e.to_string())?;
        }
        Ok(ResponseDecision::proceed())
    }
    fn on_complete(&self, _req: &Request<'_>, _done: &Completion) {
        let _ = state::counter_add("pending", -1);
    }
}

export!(Breaker, hooks: [on_request, on_response, on_complete]);
