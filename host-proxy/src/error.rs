//! The proxy's own failures: each knows whose fault it is, the status it
//! answers with and its response flag, and says in its text what happened
//! and where.

use std::sync::Arc;

use http::{Response, StatusCode};

use crate::flags::ResponseFlag;
use crate::http::{ProxyBody, local};
use crate::runtime::PluginFailure;
use crate::upstream::UpstreamFailure;

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `CONNECT`: tunnels are not proxied (501, the client's fault).
    #[error(
        "CONNECT tunnels are not supported by wasmesh; send plain HTTP requests (HTTP_PROXY) instead"
    )]
    ConnectUnsupported,
    /// No service of the mesh answers to the host (404 `NR`).
    #[error("no route: no service of the mesh answers to host {host:?}")]
    NoRoute {
        /// The host asked for.
        host: String,
    },
    /// A plugin routed to a service the mesh lacks (404 `NR`).
    #[error("no route: a plugin routed to service {service:?}, which the mesh does not have")]
    UnknownService {
        /// The service it named.
        service: String,
    },
    /// The last attempt at the upstream failed (`UH`, `UF`, `UR`, `UT`,
    /// `UO`).
    #[error("{}: service {service}{}", failure.describe(), subset.as_deref().map(|s| format!(" subset {s}")).unwrap_or_default())]
    Upstream {
        /// How.
        failure: UpstreamFailure,
        /// The service called.
        service: Arc<str>,
        /// The subset chosen.
        subset: Option<String>,
    },
    /// A plugin failed and its `on-failure` is `closed` (503 `PF`).
    #[error("plugin {plugin} (version {version}) failed: {failure}")]
    Plugin {
        /// Its name in the chain.
        plugin: Arc<str>,
        /// Its version.
        version: Arc<str>,
        /// What went wrong.
        failure: PluginFailure,
    },
    /// The client's body could not be read before forwarding (400 `DPE`).
    #[error("could not read the request body: {0}")]
    BadRequestBody(String),
    /// The client's body broke after forwarding began: the upstream request
    /// was aborted (400 `DPE`).
    #[error(
        "the request body broke after forwarding began (bad framing or a reset); the upstream request was aborted"
    )]
    BodyBrokeAfterForwarding,
    /// The raw HTTP/1 head check refused the request (400 `DPE`).
    #[error("bad request framing: {0}; refused (request smuggling protection)")]
    BadFraming(&'static str),
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::ConnectUnsupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoRoute { .. } | ProxyError::UnknownService { .. } => StatusCode::NOT_FOUND,
            ProxyError::Upstream { failure, .. } => match failure {
                UpstreamFailure::Reset => StatusCode::BAD_GATEWAY,
                UpstreamFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
                UpstreamFailure::NoHealthyEndpoint
                | UpstreamFailure::ConnectFailure
                | UpstreamFailure::Overflow => StatusCode::SERVICE_UNAVAILABLE,
            },
            ProxyError::Plugin { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequestBody(_)
            | ProxyError::BodyBrokeAfterForwarding
            | ProxyError::BadFraming(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Its response flag.
    pub fn flag(&self) -> Option<ResponseFlag> {
        match self {
            ProxyError::ConnectUnsupported => None,
            ProxyError::NoRoute { .. } | ProxyError::UnknownService { .. } => {
                Some(ResponseFlag::NoRoute)
            }
            ProxyError::Upstream { failure, .. } => Some(failure.flag()),
            ProxyError::Plugin { .. } => Some(ResponseFlag::PluginFailure),
            ProxyError::BadRequestBody(_)
            | ProxyError::BodyBrokeAfterForwarding
            | ProxyError::BadFraming(_) => Some(ResponseFlag::DownstreamProtocolError),
        }
    }

    /// The response: its status, flag and text.
    pub fn into_response(self) -> Response<ProxyBody> {
        local(self.status(), self.flag(), format!("{self}\n"))
    }
}
