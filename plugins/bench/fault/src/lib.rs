//! Benchmark plugin shaped like the stock fault injection: abort a
//! percentage of requests.

use serde::Deserialize;
use wasmesh_plugin_sdk::{LocalReply, Plugin, Request, RequestDecision, export, host};

/// Config.
#[derive(Deserialize)]
pub struct Config {
    /// Percentage aborted.
    pub abort_percent: f64,
    /// Status of an abort.
    pub status: u16,
}

/// The plugin.
pub struct Fault(Config);

impl Plugin for Fault {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        Ok(Self(c))
    }
    fn on_request(&self, _req: &Request<'_>) -> Result<RequestDecision, String> {
        if self.0.abort_percent > 0.0 && host::random_f64() * 100.0 < self.0.abort_percent {
            return Ok(RequestDecision::reply(LocalReply::text(
                self.0.status,
                "fault",
            )));
        }
        Ok(RequestDecision::proceed())
    }
}

export!(Fault, hooks: [on_request]);
