//! Benchmark plugin shaped like the stock retry: a per-try timeout, and a
//! retry of 5xx responses with a backoff, up to `attempts` retries.

use serde::Deserialize;
use wasmesh_plugin_sdk::{
    Attempt, Plugin, Request, RequestDecision, Response, ResponseDecision, export,
};

/// Config.
#[derive(Deserialize)]
pub struct Config {
    /// Retries.
    pub attempts: u32,
    /// Per-try timeout, ms.
    pub per_try_ms: u32,
}

/// The plugin.
pub struct Retry(Config);

impl Plugin for Retry {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        Ok(Self(c))
    }
    fn on_request(&self, _req: &Request<'_>) -> Result<RequestDecision, String> {
        Ok(RequestDecision {
            per_try_timeout_ms: Some(self.0.per_try_ms),
            ..RequestDecision::default()
        })
    }
    fn on_response(
        &self,
        _req: &Request<'_>,
        _resp: &Response<'_>,
        a: &Attempt,
    ) -> Result<ResponseDecision, String> {
        let failed = a.outcome.status().is_none_or(|s| s >= 500);
        if failed && a.number <= self.0.attempts {
            return Ok(ResponseDecision::retry(25 << (a.number - 1).min(4)));
        }
        Ok(ResponseDecision::proceed())
    }
}

export!(Retry, hooks: [on_request, on_response]);
