//! Benchmark plugin shaped like the stock router: a header match, then a
//! weighted split between two subsets.

use serde::Deserialize;
use wasmesh_plugin_sdk::{Plugin, Request, RequestDecision, export, host};

/// Config.
#[derive(Deserialize)]
pub struct Config {
    /// Requests with `end-user: <this>` go to `v2`.
    pub user: String,
    /// Percentage of the rest that goes to `v2`.
    pub weight_v2: f64,
}

/// The plugin.
pub struct Router(Config);

impl Plugin for Router {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        Ok(Self(c))
    }
    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        if req.header("end-user").as_deref() == Some(self.0.user.as_str()) {
            return Ok(RequestDecision::proceed().route_subset("v2"));
        }
        let subset = if host::random_f64() * 100.0 < self.0.weight_v2 {
            "v2"
        } else {
            "v1"
        };
        Ok(RequestDecision::proceed().route_subset(subset))
    }
}

export!(Router, hooks: [on_request]);
