//! `deny-path`: answers 403 for requests whose path starts with one of the
//! configured prefixes; the upstream is never called. An example of the
//! wasmesh plugin SDK.
//!
//! Config: `{ "prefixes": ["/admin", ...] }`

use serde::Deserialize;
use wasmesh_plugin_sdk::{Level, LocalReply, Plugin, Request, RequestDecision, export, host};

/// The operator's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path prefixes to refuse.
    pub prefixes: Vec<String>,
}

/// The plugin.
pub struct DenyPath {
    prefixes: Vec<String>,
}

impl Plugin for DenyPath {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        for (i, p) in config.prefixes.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(format!("config.prefixes[{i}]: {p:?} must start with '/'"));
            }
        }
        Ok(Self {
            prefixes: config.prefixes,
        })
    }

    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        let path = req.path();
        match self.prefixes.iter().find(|p| path.starts_with(p.as_str())) {
            Some(prefix) => {
                host::log(Level::Debug, &format!("denied {path}: prefix {prefix}"));
                Ok(RequestDecision::reply(LocalReply::text(
                    403,
                    format!("denied by deny-path: {prefix}\n"),
                )))
            }
            None => Ok(RequestDecision::proceed()),
        }
    }
}

export!(DenyPath, hooks: [on_request]);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmesh_plugin_sdk::testing::{Harness, TestRequest};

    #[test]
    fn denies_matching_prefixes_only() {
        let h = Harness::<DenyPath>::new(r#"{"prefixes":["/admin"]}"#).unwrap();
        let d = h.on_request(&TestRequest::get("/admin/users")).unwrap();
        assert_eq!(d.reply.map(|r| r.status), Some(403));
        let d = h.on_request(&TestRequest::get("/public")).unwrap();
        assert!(d.reply.is_none());
    }

    #[test]
    fn refuses_bad_config() {
        let e = Harness::<DenyPath>::new(r#"{"prefixes":["admin"]}"#)
            .err()
            .unwrap();
        assert!(e.starts_with("config.prefixes[0]"), "{e}");
        let e = Harness::<DenyPath>::new("null").err().unwrap();
        assert!(e.contains("missing field `prefixes`"), "{e}");
    }
}
