//! Read-only views of the request and response a hook is called with.
//!
//! In a component they read from the host on demand (a plugin pays only for the
//! fields it reads); natively they read from a [`RequestSource`] (the test
//! harness's values, or a native host's).

use crate::types::{Header, Peer, Protocol};

#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmesh::plugin::types as wit;

#[cfg(not(target_arch = "wasm32"))]
/// What a plugin's [`Request`] view reads from, natively: the test
/// harness's requests, or a native host's.
pub trait RequestSource {
    /// The method.
    fn method(&self) -> String;
    /// `http` or `https`.
    fn scheme(&self) -> String;
    /// The authority the client addressed.
    fn authority(&self) -> String;
    /// Path with query.
    fn path(&self) -> String;
    /// Destination port.
    fn port(&self) -> u16;
    /// Downstream protocol.
    fn protocol(&self) -> Protocol;
    /// First value of a header (case-insensitive name).
    fn header(&self, name: &str) -> Option<String>;
    /// Every value of a header.
    fn header_all(&self, name: &str) -> Vec<String>;
    /// All headers, in order.
    fn headers(&self) -> Vec<Header>;
    /// The caller.
    fn source(&self) -> Peer;
    /// The destination service.
    fn service(&self) -> String;
    /// The request id.
    fn id(&self) -> String;
}

/// What a plugin's [`Response`] view reads from.
#[cfg(not(target_arch = "wasm32"))]
pub trait ResponseSource {
    /// Status code.
    fn status(&self) -> u16;
    /// First value of a header.
    fn header(&self, name: &str) -> Option<String>;
    /// All headers.
    fn headers(&self) -> Vec<Header>;
    /// Every value of a header.
    fn header_all(&self, name: &str) -> Vec<String>;
}

/// The request being decided on. Header edits by earlier plugins are visible.
pub struct Request<'a> {
    #[cfg(target_arch = "wasm32")]
    pub(crate) inner: &'a wit::Request,
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) inner: &'a dyn RequestSource,
}

/// An upstream (or locally produced) response.
pub struct Response<'a> {
    #[cfg(target_arch = "wasm32")]
    pub(crate) inner: &'a wit::Response,
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) inner: &'a dyn ResponseSource,
}

#[cfg(target_arch = "wasm32")]
impl Request<'_> {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> String {
        self.inner.method()
    }
    /// `http` or `https`.
    pub fn scheme(&self) -> String {
        self.inner.scheme()
    }
    /// The authority the client addressed.
    pub fn authority(&self) -> String {
        self.inner.authority()
    }
    /// Path with query.
    pub fn path(&self) -> String {
        self.inner.path()
    }
    /// Destination port.
    pub fn port(&self) -> u16 {
        self.inner.port()
    }
    /// Downstream protocol.
    pub fn protocol(&self) -> Protocol {
        match self.inner.protocol() {
            wit::Protocol::Http1 => Protocol::Http1,
            wit::Protocol::Http2 => Protocol::Http2,
            wit::Protocol::Grpc => Protocol::Grpc,
        }
    }
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner.header(name)
    }
    /// Every value of a header.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.inner.header_all(name)
    }
    /// All headers, in order.
    pub fn headers(&self) -> Vec<Header> {
        self.inner
            .headers()
            .into_iter()
            .map(|h| Header {
                name: h.name,
                value: h.value,
            })
            .collect()
    }
    /// The caller.
    pub fn source(&self) -> Peer {
        let p = self.inner.source();
        Peer {
            principal: p.principal,
            namespace: p.namespace,
            address: p.address,
        }
    }
    /// The destination service.
    pub fn service(&self) -> String {
        self.inner.service()
    }
    /// The request id.
    pub fn id(&self) -> String {
        self.inner.id()
    }
}

#[cfg(target_arch = "wasm32")]
impl Response<'_> {
    /// Status code.
    pub fn status(&self) -> u16 {
        self.inner.status()
    }
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner.header(name)
    }
    /// All headers.
    pub fn headers(&self) -> Vec<Header> {
        self.inner
            .headers()
            .into_iter()
            .map(|h| Header {
                name: h.name,
                value: h.value,
            })
            .collect()
    }
    /// Every value of a header, in order (a host serving contract 0.1.1 or
    /// later).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.inner.header_all(name)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl<'a> Request<'a> {
    /// A view of a native host's request (the proxy matching a chain
    /// entry's `match` with the stock plugins' own matchers).
    pub fn native(inner: &'a dyn RequestSource) -> Self {
        Self { inner }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Request<'_> {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> String {
        self.inner.method()
    }
    /// `http` or `https`.
    pub fn scheme(&self) -> String {
        self.inner.scheme()
    }
    /// The authority the client addressed.
    pub fn authority(&self) -> String {
        self.inner.authority()
    }
    /// Path with query.
    pub fn path(&self) -> String {
        self.inner.path()
    }
    /// Destination port.
    pub fn port(&self) -> u16 {
        self.inner.port()
    }
    /// Downstream protocol.
    pub fn protocol(&self) -> Protocol {
        self.inner.protocol()
    }
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner.header(name)
    }
    /// Every value of a header.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.inner.header_all(name)
    }
    /// All headers, in order.
    pub fn headers(&self) -> Vec<Header> {
        self.inner.headers()
    }
    /// The caller.
    pub fn source(&self) -> Peer {
        self.inner.source()
    }
    /// The destination service.
    pub fn service(&self) -> String {
        self.inner.service()
    }
    /// The request id.
    pub fn id(&self) -> String {
        self.inner.id()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Response<'_> {
    /// Status code.
    pub fn status(&self) -> u16 {
        self.inner.status()
    }
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner.header(name)
    }
    /// All headers.
    pub fn headers(&self) -> Vec<Header> {
        self.inner.headers()
    }
    /// Every value of a header, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.inner.header_all(name)
    }
}
