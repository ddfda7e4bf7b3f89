//! Response flags: why a response is what it is, in Envoy's and Istio's
//! vocabulary (`UF`, `UO`, `NR`, ...). Every response the proxy did not get
//! whole from an upstream carries one, in the `x-wasmesh-flags` header and
//! in the request metric's `response_flags` label.
//!
//! A leaf: it depends on nothing else in the crate.

use http::HeaderValue;

/// The response header carrying the flag.
pub const FLAGS_HEADER: http::HeaderName = http::HeaderName::from_static("x-wasmesh-flags");

/// One response flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// `NR`: no route, no service answers to the host (404).
    NoRoute,
    /// `UH`: no healthy endpoint in the chosen subset (503).
    NoHealthyUpstream,
    /// `UF`: the upstream could not be connected to (503).
    UpstreamConnectionFailure,
    /// `UR`: the upstream reset the request before or during its response (502).
    UpstreamReset,
    /// `UT`: the request or an attempt ran past its timeout (504).
    UpstreamRequestTimeout,
    /// `UO`: a limit was full: connections, requests in flight, a circuit
    /// breaker's (503).
    UpstreamOverflow,
    /// `PF`: a plugin failed with `on-failure: closed` (503).
    PluginFailure,
    /// `LR`: a plugin answered locally.
    LocalReply,
    /// `RL`: a plugin answered locally because the request was rate limited.
    RateLimited,
    /// `DPE`: the client's request was malformed (400).
    DownstreamProtocolError,
    /// `DC`: the client went away before the response was complete.
    DownstreamConnectionTermination,
}

impl ResponseFlag {
    /// The flag as Envoy writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamReset => "UR",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::PluginFailure => "PF",
            ResponseFlag::LocalReply => "LR",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::DownstreamConnectionTermination => "DC",
        }
    }

    /// The flag as a header value.
    pub const fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }

    /// The `response_flags` label of a request that had `flag`: `-` for none,
    /// as Istio writes it.
    pub const fn label(flag: Option<ResponseFlag>) -> &'static str {
        match flag {
            Some(f) => f.as_str(),
            None => "-",
        }
    }
}

impl std::fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
