//! `add-header`: sets request headers on the way to the upstream and response
//! headers on the way back. An example of the wasmesh plugin SDK.
//!
//! Config: `{ "request": { "name": "value", ... }, "response": { "name": "value", ... } }`

use std::collections::BTreeMap;

use serde::Deserialize;
use wasmesh_plugin_sdk::{Plugin, Request, RequestDecision, export};

/// The operator's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Headers set on the request sent upstream.
    pub request: BTreeMap<String, String>,
    /// Headers set on the response sent to the client.
    pub response: BTreeMap<String, String>,
}

/// The plugin: the decision is the same for every request, so it is built once.
pub struct AddHeader {
    decision: RequestDecision,
}

impl Plugin for AddHeader {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let mut decision = RequestDecision::proceed();
        for (name, value) in &config.request {
            check("request", name, value)?;
            decision = decision.set_request_header(name, value);
        }
        for (name, value) in &config.response {
            check("response", name, value)?;
            decision = decision.set_response_header(name, value);
        }
        Ok(Self { decision })
    }

    fn on_request(&self, _req: &Request<'_>) -> Result<RequestDecision, String> {
        Ok(self.decision.clone())
    }
}

fn check(side: &str, name: &str, value: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("config.{side}.{name}: not a valid header name"));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!(
            "config.{side}.{name}: the value has control characters"
        ));
    }
    Ok(())
}

export!(AddHeader, hooks: [on_request]);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmesh_plugin_sdk::HeaderOp;
    use wasmesh_plugin_sdk::testing::{Harness, TestRequest};

    #[test]
    fn sets_both_sides() {
        let h =
            Harness::<AddHeader>::new(r#"{"request":{"x-a":"1"},"response":{"x-b":"2"}}"#).unwrap();
        let d = h.on_request(&TestRequest::get("/")).unwrap();
        assert_eq!(d.request_headers.len(), 1);
        assert!(
            matches!(&d.request_headers[0], HeaderOp::Set(h) if h.name == "x-a" && h.value == "1")
        );
        assert!(
            matches!(&d.response_headers[0], HeaderOp::Set(h) if h.name == "x-b" && h.value == "2")
        );
    }

    #[test]
    fn refuses_bad_names_and_unknown_keys() {
        let e = Harness::<AddHeader>::new(r#"{"request":{"bad name":"1"}}"#)
            .err()
            .unwrap();
        assert!(e.contains("config.request.bad name"), "{e}");
        let e = Harness::<AddHeader>::new(r#"{"requests":{}}"#)
            .err()
            .unwrap();
        assert!(e.contains("unknown field `requests`"), "{e}");
    }

    #[test]
    fn no_config_is_empty() {
        let h = Harness::<AddHeader>::new("null").unwrap();
        assert_eq!(
            h.on_request(&TestRequest::get("/")).unwrap(),
            RequestDecision::proceed()
        );
    }
}
