//! Header hygiene: hop-by-hop headers removed both ways, the forwarding
//! headers and request id the proxy adds, and header edits (what plugins
//! ask for, validated before any is applied).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

/// `keep-alive`, hop-by-hop.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `proxy-connection`, hop-by-hop.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Set to the client's address chain.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Set to the scheme the client used.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The request id, generated when absent and echoed on the response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An authority's host, as [`http::uri::Authority::host`] gives it, with
/// byte searches instead of its string splitting (≈ 310 instructions a
/// request, measured; this is a few dozen).
pub fn authority_host(a: &http::uri::Authority) -> &str {
    // Plain loops: an authority is a few bytes, under what `memchr`'s
    // dispatch costs (≈ 70 instructions a call, three a request).
    let s = a.as_str();
    let host_port = s
        .bytes()
        .rposition(|b| b == b'@')
        .map_or(s, |i| &s[i + 1..]);
    let end = if host_port.starts_with('[') {
        host_port.bytes().position(|b| b == b']').map(|i| i + 1)
    } else {
        host_port.bytes().position(|b| b == b':')
    };
    end.map_or(host_port, |i| &host_port[..i])
}

/// An authority's port, as [`http::uri::Authority::port_u16`] gives it.
pub fn authority_port(a: &http::uri::Authority) -> Option<u16> {
    let s = a.as_str();
    s.bytes()
        .rposition(|b| b == b':')
        .and_then(|i| s[i + 1..].parse().ok())
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), plus the ones `Connection`
/// names. `te: trailers` survives (gRPC needs it); an upgrade keeps
/// `upgrade` and `connection: upgrade`.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names instead of
    // seven hashed removals.
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::PROXY_AUTHORIZATION
            || n == header::UPGRADE
            || n == header::TE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    };
    if !upgrade && !h.keys().any(hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    h.remove(header::CONNECTION);
    h.remove(KEEP_ALIVE);
    h.remove(PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::PROXY_AUTHORIZATION);
    if !upgrade {
        h.remove(header::UPGRADE);
    }
    let te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a request asks to switch protocols (WebSocket and other
/// HTTP/1.1 `Upgrade`s).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    // Names compared in a pass (for most a tag compare), not hashed: a
    // request's few headers are quicker to walk than to hash a lookup.
    req.version() == Version::HTTP_11
        && req.headers().keys().any(|n| n == header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Whether a comma-separated header value (`Connection`,
/// `Transfer-Encoding`) lists `token`, in any case.
pub fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether the last token of a comma-separated header value is `token`, in
/// any case (`chunked` must be a `Transfer-Encoding`'s last coding).
pub fn ends_with_token(value: &[u8], token: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value: digits only (no sign, no spaces), at most 19.
pub fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Most spare header maps a thread keeps.
const SPARE_MAPS: usize = 32;

/// Maps that held more than this many headers are not kept.
const SPARE_MAP_CAPACITY: usize = 64;

thread_local! {
    /// Header maps of requests and responses that are done, emptied, for
    /// the next ones: a map's two allocations (its index and its entries)
    /// are made once, not for each request and response.
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `capacity` headers: a spare one when
/// this thread has one.
pub fn header_map(capacity: usize) -> HeaderMap {
    match SPARE.with_borrow_mut(Vec::pop) {
        Some(mut map) => {
            map.reserve(capacity);
            map
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Done with `map`: emptied and kept for [`header_map`], unless it is large
/// or this thread keeps enough.
pub fn recycle(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > SPARE_MAP_CAPACITY {
        return;
    }
    map.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_MAPS {
            spare.push(map);
        }
    });
}

/// Request ids made at once, into one buffer.
const IDS_AT_ONCE: usize = 64;

/// Two lowercase hex digits for each byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    pairs
};

thread_local! {
    /// Fresh ids not given out yet, back to back in one shared buffer:
    /// each id is a slice of it (a count, not an allocation, per
    /// request; the buffer goes when its last id does).
    static FRESH_IDS: RefCell<Bytes> = const { RefCell::new(Bytes::new()) };
}

/// A fresh request id: 32 lowercase hex digits (128 random bits).
pub fn request_id() -> HeaderValue {
    let id = FRESH_IDS.with_borrow_mut(|fresh| {
        if fresh.is_empty() {
            let mut digits = vec![0; 32 * IDS_AT_ONCE];
            for half in digits.chunks_exact_mut(16) {
                let word = fastrand::u64(..).to_le_bytes();
                for (pair, byte) in half.chunks_exact_mut(2).zip(word) {
                    pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
                }
            }
            *fresh = Bytes::from(digits);
        }
        fresh.split_to(32)
    });
    HeaderValue::from_maybe_shared(id).expect("hex digits are a header value")
}

/// The client end of a downstream connection, formatted once per
/// connection rather than once per request.
pub struct Remote {
    /// Its IP, as `x-forwarded-for` carries it.
    pub ip: HeaderValue,
    /// `ip:port`, as plugins see it.
    pub address: Arc<str>,
    /// The mesh peer, verified by mutual TLS; `None` on plaintext.
    pub peer: Option<Peer>,
}

impl Remote {
    /// Format `addr` for the requests of its connection.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            ip: HeaderValue::from_str(&addr.ip().to_string()).expect("an IP is a header value"),
            address: addr.to_string().into(),
            peer: None,
        }
    }

    /// A client that proved its identity with a mesh certificate.
    pub fn with_peer(addr: SocketAddr, peer: Peer) -> Self {
        Self {
            peer: Some(peer),
            ..Self::new(addr)
        }
    }
}

/// A verified mesh client: its SPIFFE ID and certificate.
pub struct Peer {
    /// Its SPIFFE ID, as plugins see it (`principal`).
    pub principal: Arc<str>,
    /// The hex sha256 of its certificate (`Hash=` in
    /// `x-forwarded-client-cert`).
    pub cert_sha256: String,
}

impl Peer {
    /// The peer of a verified leaf certificate, if it has a SPIFFE ID.
    pub fn from_leaf(leaf: &rustls::pki_types::CertificateDer<'_>) -> Option<Self> {
        let id = wasmesh_identity::cert::spiffe_id(leaf).ok()?;
        Some(Self {
            principal: id.to_string().into(),
            cert_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(leaf.as_ref())),
        })
    }
}

/// Envoy's header for the verified client certificate; never taken from a
/// client, set by the inbound sidecar when the service asks for it.
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Add the headers a proxy adds on the way in: `x-forwarded-for` (the
/// client appended), `x-forwarded-proto` (`https` on mesh mTLS),
/// `x-request-id` (when absent) and `host` (when an HTTP/2 request named
/// its authority only); and remove `x-forwarded-client-cert`, which only
/// the proxy itself may set. Returns the request id (text, so it is a
/// `str` too).
pub fn add_forwarding(h: &mut HeaderMap, remote: &Remote, host: &str) -> HeaderValue {
    // One lookup per name (`entry`), not a look then a write.
    match h.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut e) => {
            let chained = e.get().to_str().ok().and_then(|prev| {
                let ip = remote.ip.to_str().unwrap_or_default();
                HeaderValue::from_str(&format!("{prev}, {ip}")).ok()
            });
            if let Some(v) = chained {
                e.insert(v);
            }
        }
        Entry::Vacant(e) => {
            e.insert(remote.ip.clone());
        }
    }
    let proto = if remote.peer.is_some() {
        "https"
    } else {
        "http"
    };
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // Identity comes from the connection, never from a header. (Looked
    // for by comparing names, which for most is a tag compare, before the
    // hashed removal: ≈ 230 instructions a request saved, measured.)
    if h.keys().any(|n| n == X_FORWARDED_CLIENT_CERT) {
        h.remove(X_FORWARDED_CLIENT_CERT);
    }
    let id = match h.entry(X_REQUEST_ID) {
        Entry::Occupied(e) if !e.get().is_empty() && e.get().to_str().is_ok() => e.get().clone(),
        Entry::Occupied(mut e) => {
            let id = request_id();
            e.insert(id.clone());
            id
        }
        Entry::Vacant(e) => e.insert(request_id()).clone(),
    };
    // HTTP/1.1 requests carry `Host`: looked for in a pass, inserted
    // (hashed) only when missing.
    if !h.keys().any(|n| n == header::HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        h.insert(header::HOST, v);
    }
    id
}

/// One header edit, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replace every value of the header with this one.
    Set(HeaderName, HeaderValue),
    /// Add one more value.
    Append(HeaderName, HeaderValue),
    /// Remove every value.
    Remove(HeaderName),
}

/// A header name a plugin gave: a token (lowercased by the parser).
pub fn parse_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))
}

/// A header value a plugin gave: any bytes HTTP allows in a field value
/// (visible ASCII, space, tab, and obs-text: bytes 0x80–0xFF, so UTF-8
/// beyond ASCII passes as its bytes); no control characters (CR, LF, NUL,
/// DEL ...).
pub fn parse_value(name: &str, value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_bytes(value.as_bytes()).map_err(|_| {
        format!("invalid value for header {name:?}: control characters (CR, LF, NUL ...) are not allowed in a header value")
    })
}

/// Apply edits in order.
pub fn apply(h: &mut HeaderMap, edits: &[HeaderEdit]) {
    for e in edits {
        match e {
            HeaderEdit::Set(n, v) => {
                h.insert(n.clone(), v.clone());
            }
            HeaderEdit::Append(n, v) => {
                h.append(n.clone(), v.clone());
            }
            HeaderEdit::Remove(n) => {
                h.remove(n);
            }
        }
    }
}

/// A header value as a plugin sees it: the text, or, for bytes that are not
/// UTF-8, the text with U+FFFD replacements.
pub fn lossy(v: &HeaderValue) -> String {
    match v.to_str() {
        Ok(s) => s.to_string(),
        Err(_) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_chain_keep_and_fill_in() {
        let remote = Remote::new("10.0.0.7:5555".parse().unwrap());
        let v = |s: &'static str| HeaderValue::from_static(s);

        // A bare request: each header added once.
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_CLIENT_CERT, v("By=forged"));
        let id = add_forwarding(&mut h, &remote, "reviews:9080");
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_REQUEST_ID], id);
        assert_eq!(id.len(), 32);
        assert_eq!(h[header::HOST], "reviews:9080");
        assert!(!h.contains_key(X_FORWARDED_CLIENT_CERT));

        // What the client sent: its chain extended (every earlier value
        // replaced by the one line), its request id and host kept.
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, v("1.1.1.1"));
        h.append(X_FORWARDED_FOR, v("2.2.2.2"));
        h.insert(X_REQUEST_ID, v("client-id"));
        h.insert(header::HOST, v("ratings"));
        let id = add_forwarding(&mut h, &remote, "reviews");
        let xff: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(xff, ["1.1.1.1, 10.0.0.7"]);
        assert_eq!(id, "client-id");
        assert_eq!(h[&X_REQUEST_ID], "client-id");
        assert_eq!(h[header::HOST], "ratings");

        // An empty request id is replaced.
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, v(""));
        let id = add_forwarding(&mut h, &remote, "reviews");
        assert_eq!(id.len(), 32);
        assert_eq!(h.get_all(&X_REQUEST_ID).iter().count(), 1);
        assert_eq!(h[&X_REQUEST_ID], id);
    }

    #[test]
    fn authority_host_and_port_agree_with_the_http_crate() {
        for text in [
            "reviews",
            "reviews:9080",
            "reviews.default.svc.cluster.local:80",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8443",
            "[fe80::1%25eth0]:1",
            "user@host",
            "user:pw@host:77",
            "a@b@c:5",
            "host:",
            "host:99999",
            "h:0",
        ] {
            let Ok(a) = text.parse::<http::uri::Authority>() else {
                continue;
            };
            assert_eq!(authority_host(&a), a.host(), "{text}");
            assert_eq!(authority_port(&a), a.port_u16(), "{text}");
        }
    }

    #[test]
    fn spare_header_maps_come_back_empty_and_large_ones_are_not_kept() {
        // Drain what this test thread may hold.
        while SPARE.with_borrow_mut(Vec::pop).is_some() {}
        let mut m = header_map(4);
        m.insert(header::HOST, HeaderValue::from_static("a"));
        m.append(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        m.append(X_FORWARDED_FOR, HeaderValue::from_static("5.6.7.8"));
        let room = m.capacity();
        recycle(m);
        let again = header_map(2);
        assert!(again.is_empty());
        assert_eq!(again.get(X_FORWARDED_FOR), None);
        assert_eq!(again.capacity(), room, "the same map, its room kept");
        // Asked for more room than a spare has: it grows.
        recycle(again);
        assert!(header_map(40).capacity() >= 40);
        // A map past the cap is dropped, not kept.
        let mut big = HeaderMap::with_capacity(SPARE_MAP_CAPACITY + 1);
        big.insert(header::HOST, HeaderValue::from_static("a"));
        recycle(big);
        assert_eq!(SPARE.with_borrow(Vec::len), 0);
        // At most SPARE_MAPS are kept.
        for _ in 0..SPARE_MAPS + 3 {
            recycle(HeaderMap::with_capacity(4));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_MAPS);
    }

    #[test]
    fn request_ids_are_32_lowercase_hex_digits_and_fresh_across_their_buffers() {
        // Three buffers' worth: every id distinct and well formed, and
        // each outlives the buffer it was cut from.
        let ids: Vec<HeaderValue> = (0..3 * IDS_AT_ONCE + 1).map(|_| request_id()).collect();
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|i| i.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            assert_eq!(id.len(), 32, "{id:?}");
            assert!(
                id.as_bytes()
                    .iter()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{id:?}"
            );
        }
        assert_eq!(HEX_PAIRS[0x0f], *b"0f");
        assert_eq!(HEX_PAIRS[0xa5], *b"a5");
    }

    #[test]
    fn values_beyond_ascii_are_accepted_and_control_characters_refused() {
        assert_eq!(
            parse_value("x", "café ✓").unwrap().as_bytes(),
            "café ✓".as_bytes()
        );
        assert_eq!(parse_value("x", "a\tb").unwrap().as_bytes(), b"a\tb");
        for bad in ["a\r\nb: c", "nul\0", "del\x7f"] {
            assert!(parse_value("x", bad).is_err(), "{bad:?}");
        }
        let latin1 = HeaderValue::from_bytes(b"\xe9t\xe9").unwrap();
        assert_eq!(lossy(&latin1), "\u{fffd}t\u{fffd}");
    }
}
