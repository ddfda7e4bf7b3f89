//! Benchmark plugin shaped like the stock authz: allow listed methods on
//! listed path prefixes, deny the rest.

use serde::Deserialize;
use wasmesh_plugin_sdk::{LocalReply, Plugin, Request, RequestDecision, export};

/// Config.
#[derive(Deserialize)]
pub struct Config {
    /// Allowed methods.
    pub methods: Vec<String>,
    /// Allowed path prefixes.
    pub paths: Vec<String>,
}

/// The plugin.
pub struct Authz(Config);

impl Plugin for Authz {
    type Config = Config;
    fn new(c: Config) -> Result<Self, String> {
        Ok(Self(c))
    }
    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        let method = req.method();
        let path = req.path();
        let allowed = self.0.methods.contains(&method)
            && self.0.paths.iter().any(|p| path.starts_with(p.as_str()));
        if allowed {
            Ok(RequestDecision::proceed())
        } else {
            Ok(RequestDecision::reply(LocalReply::text(
                403,
                "RBAC: access denied",
            )))
        }
    }
}

export!(Authz, hooks: [on_request]);
