//! HTTP mechanics shared by both sides of the proxy: the body type, header
//! hygiene (hop-by-hop headers, forwarding headers, the request id, header
//! edits), request bodies and the replay buffer, and the proxy's own short
//! text responses.
//!
//! Depends only on [`crate::flags`]; everything above it (the chain, the
//! upstream side, the request handler) uses it.

pub mod body;
pub mod headers;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

use crate::flags::{FLAGS_HEADER, ResponseFlag};

/// Boxed error of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body of these bytes. An empty one is boxed without an allocation
/// (most requests have no body, and each attempt sends one).
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    let b = b.into();
    if b.is_empty() {
        return Empty::new().map_err(|e| match e {}).boxed();
    }
    Full::new(b).map_err(|e| match e {}).boxed()
}

/// A response the proxy makes itself: a status, its flag (if any) and a
/// short text body saying what happened.
pub fn local(status: StatusCode, flag: Option<ResponseFlag>, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(flag) = flag {
        h.insert(FLAGS_HEADER, flag.header_value());
    }
    r
}
