//! HTTP/1.1 to upstreams without hyper's client, for the common request:
//! one without a body (or with an empty one) that asks for no upgrade.
//!
//! hyper's client runs each connection as a task of its own and hands it
//! every request through a channel, and the response back through another;
//! the head is encoded from a copy of the request's headers. Here the
//! request's own task writes the head straight from the request it holds,
//! reads the response head and hands the response's body the connection:
//! the client's connection task reads that body as it writes it to the
//! client, and the body puts the connection back in its endpoint's pool
//! once the response has been read to its end. (Measured in
//! `benches/RESULTS.md`: about a fifth of the plugin-free path's
//! instructions.)
//!
//! Requests with a body, upgrades and `CONNECT` keep hyper's client
//! (`super::pool`), which reads a response while it still writes the body.
//!
//! What a response may be follows RFC 9112 as hyper's client reads it:
//! `1xx` heads other than `101` are skipped; `HEAD` and `204`/`304` answers
//! have no body; `Transfer-Encoding` ending in `chunked` is chunked (an
//! HTTP/1.0 response must not have one); otherwise `Content-Length` (every
//! value the same) frames the body, and without either it runs to the
//! connection's close. A connection is kept for another request only when
//! both sides said keep-alive (HTTP/1.1 unless `Connection: close`;
//! HTTP/1.0 only with `Connection: keep-alive`) and the response ended
//! exactly where its framing said.

use std::future::Future as _;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::cluster::EndpointState;
use super::connector::Slot;
use super::tls::MaybeTls;
use crate::http::BoxError;
use crate::http::headers::{self, ends_with_token, lists_token, parse_length};

/// Most header lines a response head may have (hyper's default).
const MAX_HEADERS: usize = 100;
/// Largest response head (status line and headers) read: hyper's client's
/// read buffer limit, so that no head it took is refused here.
const MAX_HEAD: usize = 8 * 1024 + 4096 * 100;
/// Largest chunk-size line or trailer section in a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;

/// One HTTP/1.1 connection to an upstream endpoint.
pub struct H1Conn {
    io: MaybeTls,
    /// Counts it against `upstream.max-connections-per-endpoint`.
    _slot: Slot,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The request head being written (kept: its allocation serves every
    /// request on the connection).
    head: Vec<u8>,
    /// Where each response header's name and value are in the head
    /// (kept, as `head`).
    offsets: Vec<[usize; 4]>,
    /// The credentials' generation it was made under (0: plaintext).
    pub(crate) generation: u64,
}

/// Why an exchange got no response head.
#[derive(Debug)]
pub enum ExchangeError {
    /// The request head could not be written whole: the upstream never
    /// saw a complete request.
    Unwritten(io::Error),
    /// Written, and then no (valid) response head came back.
    Failed(BoxError),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Unwritten(e) => write!(f, "request not written: {e}"),
            ExchangeError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Where a connection goes back when its response has been read: its
/// endpoint's pool, as idle since `since`.
pub struct Home {
    pub(crate) state: Arc<EndpointState>,
    pub(crate) max_idle: usize,
    pub(crate) since: Instant,
}

/// What the proxy sends on this path: the request's head, with the route's
/// path and authority in place of the client's.
pub struct Head<'a> {
    /// The request's method.
    pub method: &'a Method,
    /// The path (with query) to ask for.
    pub path: &'a PathAndQuery,
    /// The headers to send (hop-by-hop ones already removed).
    pub headers: &'a HeaderMap,
    /// The route's authority, sent as `host` in place of the client's.
    pub authority: Option<&'a HeaderValue>,
}

impl H1Conn {
    /// A new connection over `io`.
    pub(crate) fn new(io: MaybeTls, slot: Slot, generation: u64) -> Self {
        Self {
            io,
            _slot: slot,
            buf: BytesMut::new(),
            head: Vec::new(),
            offsets: Vec::new(),
            generation,
        }
    }

    /// Whether the upstream has closed it (or sent something unasked)
    /// while it sat idle: looked at without waiting.
    pub(crate) fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        if let MaybeTls::Plain(tcp) = &self.io {
            // A look at the socket's readiness, and a read only if it is
            // readable: no waker, no task budget.
            let mut byte = [0];
            return !matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [MaybeUninit::uninit()];
        let mut rb = ReadBuf::uninit(&mut byte);
        // Ready: the end of the stream, bytes nobody asked for, or an error.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_ready()
    }

    /// Write `req`, read the response head into `out`, and hand the
    /// connection to the response's body, which sends it `home` when the
    /// response ends (if both sides keep it alive).
    ///
    /// The response is made where the caller keeps it (`out`), not
    /// returned: returned, it was copied at every await between here and
    /// the attempt loop (`benches/compare/critical-path`: ≈ 14.6 k → 14.0 k
    /// instructions on a request's critical path, its response leg's
    /// `memcpy` 965 → 414).
    pub async fn exchange<B: From<H1Body>>(
        mut self: Box<Self>,
        req: &Head<'_>,
        home: Home,
        out: &mut Option<Response<B>>,
    ) -> Result<(), ExchangeError> {
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        let keep_alive_asked = encode(req, &mut head);
        let written = async {
            self.io.write_all(&head).await?;
            self.io.flush().await
        }
        .await;
        self.head = head;
        written.map_err(ExchangeError::Unwritten)?;
        let (framing, keep_alive) = self
            .read_head(req.method, out)
            .await
            .map_err(ExchangeError::Failed)?;
        let home = (keep_alive && keep_alive_asked).then_some(home);
        let mut body = H1Body {
            conn: Some(self),
            framing,
            home,
            trailers: None,
        };
        if let Framing::Length(0) = body.framing {
            body.finish();
        }
        if let Some(resp) = out {
            *resp.body_mut() = B::from(body);
        }
        Ok(())
    }

    /// Read until a final response head, made into `out` (its body still
    /// here): how its body is framed, and whether the upstream keeps the
    /// connection alive.
    async fn read_head<B: From<H1Body>>(
        &mut self,
        method: &Method,
        out: &mut Option<Response<B>>,
    ) -> Result<(Framing, bool), BoxError> {
        loop {
            if !self.buf.is_empty()
                && let Some(parsed) = parse_head(&mut self.buf, method, &mut self.offsets, out)?
            {
                return Ok(parsed);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(format!("response head larger than {MAX_HEAD} bytes").into());
            }
            self.buf.reserve(READ_SIZE);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    "connection closed before a response".into()
                } else {
                    "connection closed within a response head".into()
                });
            }
        }
    }
}

/// Write the request head: request line, the headers as they are (the
/// route's authority as `host`), no `transfer-encoding` (there is no body).
/// Whether the request lets the connection live on (no `Connection:
/// close` among its headers).
fn encode(req: &Head<'_>, dst: &mut Vec<u8>) -> bool {
    let mut keep_alive = true;
    dst.extend_from_slice(req.method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(req.path.as_str().as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = req.authority;
    for (name, value) in req.headers {
        let value = if name == header::HOST {
            match req.authority {
                // The route's authority, once, where the client's was.
                Some(_) => match host.take() {
                    Some(a) => a,
                    None => continue,
                },
                None => value,
            }
        } else if name == header::TRANSFER_ENCODING {
            continue;
        } else {
            if name == header::CONNECTION && lists_token(value.as_bytes(), b"close") {
                keep_alive = false;
            }
            value
        };
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    if let Some(a) = host {
        dst.extend_from_slice(b"host: ");
        dst.extend_from_slice(a.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    keep_alive
}

/// How a response body is framed.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes left.
    Length(u64),
    /// Chunked, at this point of its grammar.
    Chunked(Chunk),
    /// Until the connection closes.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Within a chunk's data: this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one, this many
    /// bytes of them read.
    Trailers(usize),
}

/// Parse a response head from the front of `buf`, consuming it (and any
/// `1xx` heads before it), with `at` as room for its headers' offsets, and
/// make it the response in `out` (with an empty body): how its body is
/// framed and whether the connection may be kept. `None`: incomplete, read
/// more.
fn parse_head<B: From<H1Body>>(
    buf: &mut BytesMut,
    method: &Method,
    at: &mut Vec<[usize; 4]>,
    out: &mut Option<Response<B>>,
) -> Result<Option<(Framing, bool)>, BoxError> {
    loop {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        at.clear();
        let (len, code, version, count, reason) = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut headers)
        {
            Ok(httparse::Status::Complete(len)) => {
                let base = buf.as_ptr() as usize;
                at.extend(res.headers.iter().map(|h| {
                    let name = h.name.as_ptr() as usize - base;
                    let value = h.value.as_ptr() as usize - base;
                    [name, name + h.name.len(), value, value + h.value.len()]
                }));
                let code = res.code.unwrap_or_default();
                let reason = res.reason.unwrap_or_default();
                let status = StatusCode::from_u16(code)?;
                // hyper's client keeps a reason phrase that is not the
                // status's own, and its server writes it to the client.
                let reason = (Some(reason) != status.canonical_reason())
                    .then(|| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok())
                    .flatten();
                (len, status, res.version, res.headers.len(), reason)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid response head: {e}").into()),
        };
        let head = buf.split_to(len).freeze();
        if code.is_informational() && code != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints…: the final head follows.
            continue;
        }
        let version = if version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // Room for what the proxy adds to the response (its request id,
        // the chain's edits) without growing the map.
        let mut map = headers::header_map(count + 4);
        let mut keep_alive = version == Version::HTTP_11;
        let mut close = false;
        for &[n0, n1, v0, v1] in &at[..count] {
            let name = HeaderName::from_bytes(&head[n0..n1])?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))?;
            if name == header::CONNECTION {
                // Once any line asks to close, a later keep-alive does not
                // undo it.
                if close || lists_token(value.as_bytes(), b"close") {
                    close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = lists_token(value.as_bytes(), b"keep-alive");
                }
            }
            map.append(name, value);
        }
        let (framing, both) = framing(code, method, version, &map)?;
        if framing == Framing::Close || code == StatusCode::SWITCHING_PROTOCOLS {
            keep_alive = false;
        }
        if both {
            // Transfer-Encoding and Content-Length: the coding wins, and
            // the connection is not trusted with another request.
            keep_alive = false;
        }
        let resp = out.insert(Response::new(B::from(H1Body::empty())));
        *resp.status_mut() = code;
        *resp.version_mut() = version;
        *resp.headers_mut() = map;
        if let Some(r) = reason {
            resp.extensions_mut().insert(r);
        }
        return Ok(Some((framing, keep_alive)));
    }
}

/// A final response's body framing (RFC 9112 §6.3), and whether it
/// carries both Transfer-Encoding and Content-Length. One pass over the
/// headers, comparing names (a tag compare for these), not a hashed
/// lookup for each.
fn framing(
    code: StatusCode,
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<(Framing, bool), BoxError> {
    let mut coding = None;
    let mut has_length = false;
    let mut length: Result<Option<u64>, &'static str> = Ok(None);
    for (name, v) in headers {
        if name == header::TRANSFER_ENCODING {
            coding = Some(v);
        } else if name == header::CONTENT_LENGTH {
            has_length = true;
            for part in v.as_bytes().split(|&b| b == b',') {
                length = length.and_then(|l| {
                    let n = parse_length(part.trim_ascii()).ok_or("invalid Content-Length")?;
                    match l {
                        Some(l) if l != n => Err("differing Content-Length values"),
                        _ => Ok(Some(n)),
                    }
                });
            }
        }
    }
    let both = coding.is_some() && has_length;
    if code == StatusCode::SWITCHING_PROTOCOLS
        || code == StatusCode::NO_CONTENT
        || code == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
    {
        return Ok((Framing::Length(0), both));
    }
    if let Some(last) = coding {
        if version == Version::HTTP_10 {
            return Err("an HTTP/1.0 response with Transfer-Encoding".into());
        }
        let framing = if ends_with_token(last.as_bytes(), b"chunked") {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        };
        return Ok((framing, both));
    }
    Ok((length?.map_or(Framing::Close, Framing::Length), both))
}

/// A response body read from its connection as the client's side asks for
/// it; the connection goes back to its pool at the body's end.
pub struct H1Body {
    /// Boxed (once, when it was opened): the body is moved with the
    /// response, and the connection is most of its size.
    conn: Option<Box<H1Conn>>,
    framing: Framing,
    /// The pool to go back to, if the connection may be reused.
    home: Option<Home>,
    /// A chunked body's trailers, to yield after its data.
    trailers: Option<Box<HeaderMap>>,
}

impl H1Body {
    fn empty() -> Self {
        Self {
            conn: None,
            framing: Framing::Length(0),
            home: None,
            trailers: None,
        }
    }

    /// The response has been read to its end: the connection goes home if
    /// it may, else it closes.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        self.framing = Framing::Length(0);
        if let Some(home) = self.home.take()
            && conn.buf.is_empty()
        {
            home.state.h1.put_conn(conn, home.since, home.max_idle);
        }
    }

    /// The next frame from what has been read, if there is one.
    fn decode(&mut self) -> Result<Option<Frame<Bytes>>, BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        match &mut self.framing {
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (*left).min(buf.len() as u64);
                let data = buf.split_to(n as usize).freeze();
                *left -= n;
                if *left == 0 {
                    self.finish();
                }
                Ok(Some(Frame::data(data)))
            }
            Framing::Close => Ok((!buf.is_empty()).then(|| Frame::data(buf.split().freeze()))),
            Framing::Chunked(chunk) => match decode_chunked(chunk, buf, &mut self.trailers)? {
                Decoded::Data(d) => Ok(Some(Frame::data(d))),
                Decoded::More => Ok(None),
                Decoded::End => {
                    self.finish();
                    Ok(self.trailers.take().map(|t| Frame::trailers(*t)))
                }
            },
        }
    }
}

enum Decoded {
    Data(Bytes),
    /// Needs more bytes.
    More,
    /// The last chunk and the trailer section have been read.
    End,
}

/// One step of a chunked body (RFC 9112 §7.1) over what `buf` holds.
fn decode_chunked(
    chunk: &mut Chunk,
    buf: &mut BytesMut,
    trailers: &mut Option<Box<HeaderMap>>,
) -> Result<Decoded, BoxError> {
    loop {
        match chunk {
            Chunk::Size => {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err("chunk-size line too long".into());
                    }
                    return Ok(Decoded::More);
                };
                let line = buf[..end]
                    .strip_suffix(b"\r")
                    .ok_or("chunk-size line without CRLF")?;
                let digits = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if digits.is_empty() || digits.len() > 15 {
                    return Err("invalid chunk size".into());
                }
                let size = digits.iter().try_fold(0u64, |n, &d| {
                    let v = (d as char).to_digit(16).ok_or("invalid chunk size")?;
                    Ok::<_, &str>(n * 16 + u64::from(v))
                })?;
                buf.advance(end + 1);
                *chunk = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = (*left).min(buf.len() as u64);
                let data = buf.split_to(n as usize).freeze();
                *left -= n;
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
                buf.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers(read) => {
                let Some(end) = memchr::memchr(b'\n', buf) else {
                    if *read + buf.len() > MAX_TRAILERS {
                        return Err("trailer section too large".into());
                    }
                    return Ok(Decoded::More);
                };
                let line = buf[..end]
                    .strip_suffix(b"\r")
                    .ok_or("trailer line without CRLF")?;
                if line.is_empty() {
                    buf.advance(end + 1);
                    return Ok(Decoded::End);
                }
                let colon = memchr::memchr(b':', line).ok_or("trailer line without a colon")?;
                let name = HeaderName::from_bytes(&line[..colon])?;
                let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())?;
                trailers.get_or_insert_default().append(name, value);
                *read += end + 1;
                if *read > MAX_TRAILERS {
                    return Err("trailer section too large".into());
                }
                buf.advance(end + 1);
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.decode() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(*t))));
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.buf.reserve(READ_SIZE);
            let read = pin!(conn.io.read_buf(&mut conn.buf)).poll(cx);
            match ready!(read) {
                Ok(0) if this.framing == Framing::Close => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(
                        "upstream closed the connection within a response body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.framing) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Framing::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(
        bytes: &[u8],
        method: Method,
    ) -> Result<Option<(Response<H1Body>, Framing, bool)>, BoxError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = None;
        let parsed = parse_head(&mut buf, &method, &mut Vec::new(), &mut out)?;
        Ok(parsed.map(|(f, ka)| (out.expect("a parsed head is made"), f, ka)))
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (r, f, ka) = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.status(), f, ka),
            (StatusCode::OK, Framing::Length(5), true)
        );
        let (_, f, ka) = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((f, ka), (Framing::Chunked(Chunk::Size), true));
        // Both: the coding wins (a bad length beside it is not read), and
        // the connection is not kept.
        let (_, f, ka) = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 7\r\ntransfer-encoding: chunked\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((f, ka), (Framing::Chunked(Chunk::Size), false));
        // Repeated equal lengths, in one line or several, are one length.
        let (_, f, ka) = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((f, ka), (Framing::Length(5), true));
        // The last coding decides: not chunked, the body runs to the close.
        let (_, f, ka) = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((f, ka), (Framing::Close, false));
        let (_, f, ka) = head(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!((f, ka), (Framing::Close, false));
        let (_, f, _) = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(f, Framing::Length(0));
        let (_, f, _) = head(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(f, Framing::Length(0));
        // HTTP/1.0 keeps the connection only when it says so.
        let (_, _, ka) = head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert!(!ka);
        let (_, _, ka) = head(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(ka);
        let (_, _, ka) = head(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!ka);
    }

    #[test]
    fn bad_heads_are_errors_and_partial_ones_wait() {
        assert!(
            head(b"HTTP/1.1 200 OK\r\ncontent-le", Method::GET)
                .unwrap()
                .is_none()
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(
                head(bad, Method::GET).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn informational_heads_are_skipped_and_reasons_kept() {
        let (r, f, _) = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Made It\r\ncontent-length: 0\r\n\r\n",
            Method::POST,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status(), f), (StatusCode::CREATED, Framing::Length(0)));
        let reason = r.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), b"Made It");
    }

    #[test]
    fn chunked_bodies_decode_across_reads_with_trailers() {
        let wire = b"5;ext=1\r\nhello\r\nb\r\n, world!!!!\r\n0\r\nx-sum: 42\r\n\r\n";
        // Fed one byte at a time, as the slowest upstream would send it.
        let mut chunk = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut trailers = None;
        let mut data = Vec::new();
        let mut ended = false;
        for &b in wire {
            buf.extend_from_slice(&[b]);
            loop {
                match decode_chunked(&mut chunk, &mut buf, &mut trailers).unwrap() {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::More => break,
                    Decoded::End => {
                        ended = true;
                        break;
                    }
                }
            }
        }
        assert!(ended);
        assert_eq!(data, b"hello, world!!!!");
        assert_eq!(trailers.unwrap()["x-sum"], "42");
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"5\nhello\r\n"] {
            let (mut chunk, mut buf) = (Chunk::Size, BytesMut::from(bad));
            let r = (0..3)
                .try_for_each(|_| decode_chunked(&mut chunk, &mut buf, &mut None).map(|_| ()));
            assert!(r.is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_head_is_written_from_the_request_with_the_routes_authority() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("client.example"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let path = PathAndQuery::from_static("/p?q=1");
        let authority = HeaderValue::from_static("svc:80");
        let mut dst = Vec::new();
        let keep_alive = encode(
            &Head {
                method: &Method::GET,
                path: &path,
                headers: &headers,
                authority: Some(&authority),
            },
            &mut dst,
        );
        assert_eq!(
            String::from_utf8(dst).unwrap(),
            "GET /p?q=1 HTTP/1.1\r\nhost: svc:80\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        assert!(keep_alive);
        let mut dst = Vec::new();
        headers.remove(header::HOST);
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let keep_alive = encode(
            &Head {
                method: &Method::DELETE,
                path: &path,
                headers: &headers,
                authority: Some(&authority),
            },
            &mut dst,
        );
        assert_eq!(
            String::from_utf8(dst).unwrap(),
            "DELETE /p?q=1 HTTP/1.1\r\nx-a: 1\r\nx-a: 2\r\nconnection: close\r\nhost: svc:80\r\n\r\n"
        );
        assert!(!keep_alive, "the request asked to close");
    }
}
