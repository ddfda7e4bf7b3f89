//! The proxy's own HTTP/1.1 loop for a client connection's plain requests.
//!
//! Most requests a sidecar sees are HTTP/1.1 heads that frame no body
//! (`GET`, `HEAD`, `DELETE` …). This loop reads such a head, calls the
//! handler and writes its response itself: no dispatcher task state, no
//! body channel, no header-read timer, no second copy of the head, and
//! one `write` for a response whose body is at hand.
//!
//! Anything else is hyper's: the first time a connection brings a head this
//! loop does not serve — one that frames a body (`Content-Length`,
//! `Transfer-Encoding`), asks for an upgrade, `100-continue` or trailers
//! (`TE`), is `CONNECT` or HTTP/1.0, is HTTP/2's preface, does not parse, or
//! has not arrived whole in what was read — the loop hands the connection,
//! with the bytes it holds, to hyper's server for the rest of its life. So
//! every protocol error, limit and timeout on a head stays hyper's, and its
//! answers (`400`, `431`, the header-read timeout) are what they were. The
//! raw head check against smuggling ([`super::h1scan`]) starts there too: a
//! head this loop serves frames no body, so there is nothing in it to
//! check.
//!
//! The response is written by hyper's rules for an HTTP/1.1 request (see
//! `hyper::proto::h1::role::Server::encode`): the status line with a
//! custom reason phrase when the response carries one, the headers as they
//! are, `content-length` from the body's exact size or else
//! `transfer-encoding: chunked`, no body for `HEAD`, `204` and `304`, a
//! `date` when there is none, `connection: close` when the connection
//! ends after it. Between requests the connection waits without a timer:
//! the idle timeout closes it.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Finish, Handler};
use crate::http::ProxyBody;
use crate::http::body::ClientBody;
use crate::http::headers::{self, Remote, ends_with_token, lists_token, parse_length};

/// Bytes asked of each read.
const READ_SIZE: usize = 8 * 1024;

/// Header slots on the stack for a head; a head with more (or more than
/// `downstream.max-headers`) is hyper's.
const HEADER_SLOTS: usize = 128;

/// A body frame up to this size is copied behind the head (one `write`);
/// a larger one is written on its own.
const COPY_FRAME: usize = 64 * 1024;

/// How the loop left a connection.
pub(super) enum Ended {
    /// It is closed, or is to be dropped.
    Closed,
    /// A request the loop does not serve begins in these bytes: hyper serves
    /// the connection from here.
    Handoff(Bytes),
}

/// What ended the wait for a head.
enum Start {
    Bytes,
    Closed,
    Drain,
}

/// What the loop needs to serve a connection's requests.
pub(super) struct Own<H> {
    pub handler: H,
    pub peer: Arc<Remote>,
    /// `downstream.max-headers` and `max-header-bytes`: a head past either
    /// is hyper's to answer.
    pub max_headers: usize,
    pub max_head_bytes: usize,
    pub finish: Arc<Finish>,
}

/// A request head the loop serves: where its parts lie in the read buffer.
struct Parsed {
    len: usize,
    method: Method,
    target: (usize, usize),
    /// The request asked to close the connection after it.
    close: bool,
}

impl<H: Handler> Own<H> {
    /// Serve requests on `io` until the connection ends or brings a request
    /// for hyper.
    pub(super) async fn serve<S>(&self, io: &mut S) -> io::Result<Ended>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut offsets: Vec<[usize; 4]> = Vec::new();
        loop {
            if buf.is_empty() {
                match self.read_head_start(io, &mut buf).await? {
                    Start::Bytes => {}
                    Start::Closed => return Ok(Ended::Closed),
                    Start::Drain => {
                        let _ = io.shutdown().await;
                        return Ok(Ended::Closed);
                    }
                }
            }
            let parsed = parse(&buf, self.max_headers, &mut offsets)
                .filter(|p| p.len <= self.max_head_bytes);
            let Some(parsed) = parsed else {
                return Ok(Ended::Handoff(buf.split().freeze()));
            };
            let head = buf.split_to(parsed.len).freeze();
            let req = match request(&head, &parsed, &offsets) {
                Some(req) => req,
                None => {
                    // Not a request `http` takes: hyper answers it.
                    let mut all = BytesMut::from(&head[..]);
                    all.extend_from_slice(&buf);
                    return Ok(Ended::Handoff(all.freeze()));
                }
            };
            let is_head = parsed.method == Method::HEAD;
            // Pinned where it is made: the request's future is large, and
            // is not moved again.
            let call = pin!(self.handler.handle(req, self.peer.clone()));
            let Some(resp) = answer(io, &mut buf, call).await else {
                // The client went away: the request is dropped (cancelled),
                // as hyper does.
                return Ok(Ended::Closed);
            };
            let keep_alive = !parsed.close && !self.finish.asked.load(Ordering::Acquire);
            if !write_response(io, &mut out, resp, is_head, keep_alive).await? {
                let _ = io.shutdown().await;
                return Ok(Ended::Closed);
            }
            if out.capacity() > 4 * COPY_FRAME {
                out = Vec::new();
            }
        }
    }

    /// Wait for the first bytes of the next head, the client's close, or
    /// the proxy's drain.
    async fn read_head_start<S>(&self, io: &mut S, buf: &mut BytesMut) -> io::Result<Start>
    where
        S: AsyncRead + Unpin,
    {
        buf.reserve(READ_SIZE);
        poll_fn(|cx| {
            // This task's waker, for a drain to wake it (the same task
            // polls hyper's connection after a handoff).
            self.finish.waker.get_or_init(|| cx.waker().clone());
            if self.finish.asked.load(Ordering::Acquire) {
                return Poll::Ready(Ok(Start::Drain));
            }
            let read = pin!(io.read_buf(buf)).poll(cx);
            read.map_ok(|n| if n > 0 { Start::Bytes } else { Start::Closed })
        })
        .await
    }
}

/// Await the handler's response while watching the client: `None` when it
/// closed (or failed) first. Bytes it sends meanwhile (a pipelined request)
/// are kept in `buf`.
async fn answer<S, F>(
    io: &mut S,
    buf: &mut BytesMut,
    mut call: Pin<&mut F>,
) -> Option<Response<ProxyBody>>
where
    S: AsyncRead + Unpin,
    F: Future<Output = Response<ProxyBody>>,
{
    poll_fn(|cx| {
        if let Poll::Ready(resp) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        // Like hyper (without half-close), look for the client's end only
        // while nothing of a next request is held.
        if buf.is_empty() {
            // Into what is left of the buffer the request's head was cut
            // from (it is still shared with the head, which the request
            // holds): room for any byte is enough to see the client's
            // close, and asking for a full read's room would allocate a
            // new buffer for every request.
            buf.reserve(1);
            if let Poll::Ready(Ok(0) | Err(_)) = pin!(io.read_buf(buf)).poll(cx) {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await
}

/// Parse the head at the start of `buf` if this loop serves it: complete,
/// HTTP/1.1, not `CONNECT`, and no header that frames a body or asks for
/// something hyper handles (`content-length`, `transfer-encoding`,
/// `upgrade`, `expect`, `te`). `offsets` gets each header's name and value
/// ranges.
fn parse(buf: &[u8], max_headers: usize, offsets: &mut Vec<[usize; 4]>) -> Option<Parsed> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; HEADER_SLOTS];
    let mut req = httparse::Request::new(&mut []);
    let slots = &mut slots[..max_headers.min(HEADER_SLOTS)];
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if req.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let at = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let path = req.path?.as_bytes();
    let target = (at(path), at(path) + path.len());
    let mut close = false;
    offsets.clear();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let hands_off = [
            &b"content-length"[..],
            b"transfer-encoding",
            b"upgrade",
            b"expect",
            b"te",
        ]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name));
        if hands_off {
            return None;
        }
        if name.eq_ignore_ascii_case(b"connection") && lists_token(h.value, b"close") {
            close = true;
        }
        let (n, v) = (at(name), at(h.value));
        offsets.push([n, n + name.len(), v, v + h.value.len()]);
    }
    Some(Parsed {
        len,
        method,
        target,
        close,
    })
}

/// The request of a parsed head, its headers and target sharing `head`'s
/// bytes; `None` when `http` refuses a part of it.
fn request(head: &Bytes, parsed: &Parsed, offsets: &[[usize; 4]]) -> Option<Request<ClientBody>> {
    let uri = Uri::from_maybe_shared(head.slice(parsed.target.0..parsed.target.1)).ok()?;
    let mut headers = headers::header_map(offsets.len() + 4);
    for &[n0, n1, v0, v1] in offsets {
        let name = HeaderName::from_bytes(&head[n0..n1]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1)).ok()?;
        headers.append(name, value);
    }
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = parsed.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some(req)
}

/// How a response body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

/// Why the head of a response could not be written: the connection closes
/// without it (hyper does the same).
#[derive(Debug)]
struct BadHead;

/// Write `resp` to an HTTP/1.1 request (`HEAD` when `is_head`): whether
/// the connection lives on after it.
async fn write_response<S>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    is_head: bool,
    keep_alive: bool,
) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    let (mut parts, body) = resp.into_parts();
    out.clear();
    if parts.status.is_informational() {
        // hyper refuses a 1xx as a response to a request: 500, then close.
        out.extend_from_slice(
            b"HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\ncontent-length: 0\r\n",
        );
        date_line(out);
        out.extend_from_slice(b"\r\n");
        io.write_all(out).await?;
        return Ok(false);
    }
    let length = if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    };
    if !keep_alive {
        say_close(&mut parts.headers);
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    let Ok((framing, last)) = encode_head(out, &parts, reason, is_head, length) else {
        return Ok(false);
    };
    let whole = if framing == Framing::Length(0) {
        // No body to send (HEAD, 204, 304, an empty body): it is dropped
        // unread, as hyper drops it.
        io.write_all(out).await?;
        true
    } else {
        write_body(io, out, pin!(body), framing).await?
    };
    // Sent: the map is the next request's or response's (emptied here, off
    // the response's way out).
    headers::recycle(std::mem::take(&mut parts.headers));
    Ok(whole && !last && keep_alive)
}

/// `connection: close` among `headers` (added to what they say).
fn say_close(headers: &mut HeaderMap) {
    let close = HeaderValue::from_static("close");
    match headers.entry(header::CONNECTION) {
        header::Entry::Occupied(mut e) => {
            if !e.iter().any(|v| lists_token(v.as_bytes(), b"close")) {
                e.append(close);
            }
        }
        header::Entry::Vacant(e) => {
            e.insert(close);
        }
    }
}

/// Write `body` after the head in `out`, in its framing: whether it ended
/// where its framing says, so that the connection can carry another
/// response.
async fn write_body<S>(
    io: &mut S,
    out: &mut Vec<u8>,
    mut body: Pin<&mut ProxyBody>,
    framing: Framing,
) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                // Send what is ready before waiting for more.
                io.write_all(out).await?;
                out.clear();
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // hyper aborts the connection: the client sees a response
                // cut short, not a complete one.
                tracing::debug!("response body failed: {e}");
                io.write_all(out).await?;
                return Ok(false);
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if !d.is_empty() => d,
                // Empty data; trailers (the request did not say `TE:
                // trailers`, so none are sent).
                _ => continue,
            },
        };
        match framing {
            Framing::Length(_) => {
                let fits = data
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                remaining -= fits as u64;
                if fits < data.len() {
                    // More than the length said: what fits, then close.
                    tracing::debug!("response body longer than its content-length");
                    out.extend_from_slice(&data[..fits]);
                    io.write_all(out).await?;
                    return Ok(false);
                }
            }
            Framing::Chunked => chunk_size_line(out, data.len()),
            Framing::Close => {}
        }
        if data.len() <= COPY_FRAME {
            out.extend_from_slice(&data);
        } else {
            io.write_all(out).await?;
            out.clear();
            io.write_all(&data).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if !matches!(framing, Framing::Length(_)) || remaining > 0 || out.is_empty() {
            continue;
        }
        // The whole response is here: the client gets it now, and the
        // body's end (where the request's completion and metrics run, and
        // the upstream connection goes back to its pool) is polled after.
        io.write_all(out).await?;
        out.clear();
    }
    let whole = match framing {
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n\r\n");
            true
        }
        Framing::Length(_) if remaining > 0 => {
            tracing::debug!("response body shorter than its content-length");
            false
        }
        Framing::Length(_) => true,
        Framing::Close => false,
    };
    io.write_all(out).await?;
    Ok(whole)
}

/// Encode the status line and headers into `out` by hyper's rules for an
/// HTTP/1.1 request: the body's framing, and whether the response says to
/// close the connection.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    reason: Option<&hyper::ext::ReasonPhrase>,
    is_head: bool,
    length: Option<Option<u64>>,
) -> Result<(Framing, bool), BadHead> {
    status_line(out, parts, reason);
    let no_content = matches!(
        parts.status,
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    );
    let rules = Rules {
        is_head,
        no_content,
        can_chunk: !is_head && !no_content && parts.version != Version::HTTP_10,
        length,
    };
    let special = Special::gather(out, &parts.headers, rules)?;
    let framing = special.write(out, rules);
    let framing = if is_head || no_content {
        Framing::Length(0)
    } else {
        framing
    };
    if !special.wrote_date {
        date_line(out);
    }
    out.extend_from_slice(b"\r\n");
    Ok((framing, special.last))
}

fn status_line(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    reason: Option<&hyper::ext::ReasonPhrase>,
) {
    let status = parts.status;
    let version = if parts.version == Version::HTTP_10 {
        &b"HTTP/1.0 "[..]
    } else {
        b"HTTP/1.1 "
    };
    if version == b"HTTP/1.1 " && status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(version);
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match reason {
        Some(r) => out.extend_from_slice(r.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
}

/// What decides a response's framing.
#[derive(Clone, Copy)]
struct Rules {
    is_head: bool,
    /// 204 or 304.
    no_content: bool,
    can_chunk: bool,
    /// `None`: the body has ended already; else its exact size, if known.
    length: Option<Option<u64>>,
}

/// The headers hyper treats apart, found among a response's.
#[derive(Default)]
struct Special<'a> {
    /// The first `content-length` (its value parsed when the body's size
    /// is unknown).
    content_length: Option<(u64, &'a HeaderValue)>,
    transfer_encoding: Vec<&'a HeaderValue>,
    /// `connection` and `trailer`, written on one line each, values joined.
    joined: Vec<(&'a HeaderName, Vec<&'a HeaderValue>)>,
    wrote_date: bool,
    /// The response says `connection: close`.
    last: bool,
}

impl<'a> Special<'a> {
    /// Write the other headers as they are, and gather these.
    fn gather(out: &mut Vec<u8>, headers: &'a HeaderMap, rules: Rules) -> Result<Self, BadHead> {
        let mut me = Special::default();
        for (name, value) in headers {
            match *name {
                header::CONTENT_LENGTH => me.content_length(value, rules)?,
                header::TRANSFER_ENCODING => {
                    if rules.can_chunk {
                        me.transfer_encoding.push(value);
                    }
                }
                header::CONNECTION | header::TRAILER => {
                    if *name == header::CONNECTION && lists_token(value.as_bytes(), b"close") {
                        me.last = true;
                    }
                    if *name == header::TRAILER && !rules.can_chunk {
                        continue;
                    }
                    match me.joined.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, v)) => v.push(value),
                        None => me.joined.push((name, vec![value])),
                    }
                }
                _ => {
                    me.wrote_date |= *name == header::DATE;
                    line(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
        }
        Ok(me)
    }

    fn content_length(&mut self, value: &'a HeaderValue, rules: Rules) -> Result<(), BadHead> {
        match rules.length {
            // No body: a length only for HEAD.
            None if !rules.is_head => {}
            Some(Some(_)) | None => {
                self.content_length.get_or_insert((0, value));
            }
            Some(None) => {
                let n = parse_length(value.as_bytes().trim_ascii()).ok_or(BadHead)?;
                match self.content_length {
                    Some((prev, _)) if prev != n => return Err(BadHead),
                    Some(_) => {}
                    None => self.content_length = Some((n, value)),
                }
            }
        }
        Ok(())
    }

    /// Write the gathered headers, and what framing the response needs
    /// when they name none: the body's framing.
    fn write(&self, out: &mut Vec<u8>, rules: Rules) -> Framing {
        let mut framing = None;
        if let Some((n, value)) = self.content_length {
            line(out, b"content-length", value.as_bytes());
            framing = Some(match rules.length {
                Some(Some(known)) => Framing::Length(known),
                Some(None) => Framing::Length(n),
                None => Framing::Length(0),
            });
        } else if let Some(last) = self.transfer_encoding.last() {
            joined_line(out, b"transfer-encoding", &self.transfer_encoding);
            if !ends_with_token(last.as_bytes(), b"chunked") {
                // Chunked must be the last coding: added, as hyper does.
                out.truncate(out.len() - 2);
                out.extend_from_slice(b", chunked\r\n");
            }
            framing = Some(Framing::Chunked);
        }
        for (name, values) in &self.joined {
            joined_line(out, name.as_str().as_bytes(), values);
        }
        if let Some(f) = framing {
            return f;
        }
        match rules.length {
            Some(None) if !rules.can_chunk => Framing::Close,
            Some(None) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            None | Some(Some(0)) => {
                if !rules.no_content && !rules.is_head {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            Some(Some(_)) if rules.no_content => Framing::Length(0),
            Some(Some(n)) => {
                line(
                    out,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
                Framing::Length(n)
            }
        }
    }
}

/// `name: v1, v2\r\n`.
fn joined_line(out: &mut Vec<u8>, name: &[u8], values: &[&HeaderValue]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// `<size in hex>\r\n`, a chunk's first line (upper case, as hyper
/// writes it).
fn chunk_size_line(out: &mut Vec<u8>, mut n: usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `date: <IMF-fixdate>\r\n`, the text made once a second per thread.
fn date_line(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second || text.is_empty() {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn parsed(head: &[u8]) -> Option<Parsed> {
        parse(head, 100, &mut Vec::new())
    }

    #[test]
    fn the_loop_serves_complete_bodyless_http11_heads_and_hands_off_the_rest() {
        let p =
            parsed(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\nGET")
                .unwrap();
        assert_eq!(p.len, 63);
        assert!(p.close);
        assert_eq!(p.method, Method::GET);
        assert!(!parsed(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap().close);
        for other in [
            &b"GET / HTTP/1.1\r\nhost: x\r\n"[..],
            b"GET / HTTP/1.0\r\nhost: x\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nhost: x:443\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(
                parsed(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        let many: Vec<u8> = [&b"GET / HTTP/1.1\r\n"[..]]
            .into_iter()
            .chain(std::iter::repeat_n(&b"a: b\r\n"[..], 101))
            .chain([&b"\r\n"[..]])
            .flatten()
            .copied()
            .collect();
        assert!(
            parsed(&many).is_none(),
            "more headers than allowed: hyper's 431"
        );
    }

    #[test]
    fn the_request_shares_the_heads_bytes() {
        let head = Bytes::from_static(b"GET /p?q HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        let mut offsets = Vec::new();
        let p = parse(&head, 100, &mut offsets).unwrap();
        let req = request(&head, &p, &offsets).unwrap();
        assert_eq!(req.uri(), "/p?q");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "x");
        let a: Vec<_> = req.headers().get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert!(req.body().is_end_stream());
    }

    fn head_of(resp: Response<ProxyBody>, is_head: bool) -> (String, Framing, bool) {
        let (parts, body) = resp.into_parts();
        let length = if body.is_end_stream() {
            None
        } else {
            Some(body.size_hint().exact())
        };
        let mut out = Vec::new();
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
        let (framing, last) = encode_head(&mut out, &parts, reason, is_head, length)
            .unwrap_or_else(|_| panic!("a head"));
        let text = String::from_utf8(out).unwrap();
        let date = text.find("date: ").expect("a date");
        let text = format!("{}{}", &text[..date], &text[date + 37..]);
        (text, framing, last)
    }

    fn full(b: &'static str) -> ProxyBody {
        crate::http::full(b)
    }

    fn streamed() -> ProxyBody {
        let frames = futures_frames();
        StreamBody::new(tokio_stream::iter(frames)).boxed()
    }

    fn futures_frames() -> Vec<Result<http_body::Frame<Bytes>, crate::http::BoxError>> {
        vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"hello"))),
            Ok(http_body::Frame::data(Bytes::new())),
            Ok(http_body::Frame::data(Bytes::from_static(&[b'x'; 26]))),
            Ok(http_body::Frame::trailers(HeaderMap::new())),
        ]
    }

    #[test]
    fn heads_follow_hypers_rules() {
        let (h, f, last) = head_of(Response::new(full("hi")), false);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
        assert_eq!((f, last), (Framing::Length(2), false));

        // Unknown length: chunked; HEAD: the header, no body.
        let (h, f, _) = head_of(Response::new(streamed()), false);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(f, Framing::Chunked);
        let mut r = Response::new(full(""));
        r.headers_mut()
            .insert("content-length", HeaderValue::from_static("100"));
        let (h, f, _) = head_of(r, true);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n");
        assert_eq!(f, Framing::Length(0));
        let (h, f, _) = head_of(Response::new(full("")), false);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(f, Framing::Length(0));

        // 204 and 304 carry no length and no body; a reason of its own; a
        // close said by the response; its own date kept.
        let mut r = Response::new(full("x"));
        *r.status_mut() = StatusCode::NO_CONTENT;
        let (h, f, _) = head_of(r, false);
        assert_eq!(h, "HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(f, Framing::Length(0));
        let mut r = Response::new(full("ok"));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Upstream Sulks"));
        r.headers_mut()
            .append("connection", HeaderValue::from_static("x"));
        r.headers_mut()
            .append("connection", HeaderValue::from_static("close"));
        r.headers_mut().insert("a", HeaderValue::from_static("1"));
        let (h, _, last) = head_of(r, false);
        assert_eq!(
            h,
            "HTTP/1.1 502 Upstream Sulks\r\na: 1\r\nconnection: x, close\r\ncontent-length: 2\r\n\r\n"
        );
        assert!(last);

        // An HTTP/1.0 response of unknown length: until the close.
        let mut r = Response::new(streamed());
        *r.version_mut() = Version::HTTP_10;
        let (h, f, _) = head_of(r, false);
        assert_eq!(h, "HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!(f, Framing::Close);
    }

    #[derive(Clone)]
    struct Hello;

    impl Handler for Hello {
        fn handle(
            &self,
            req: Request<ClientBody>,
            _remote: Arc<Remote>,
        ) -> impl Future<Output = Response<ProxyBody>> + Send {
            let path = req.uri().path().to_string();
            async move { Response::new(crate::http::full(path)) }
        }
    }

    /// The loop serves plain heads one after the other on one connection,
    /// and hands over the bytes from the first head it does not serve.
    #[tokio::test]
    async fn the_loop_serves_until_a_head_it_hands_over_with_its_bytes() {
        let own = Own {
            handler: Hello,
            peer: Arc::new(Remote::new("127.0.0.1:1".parse().unwrap())),
            max_headers: 100,
            max_head_bytes: 200,
            finish: Arc::default(),
        };
        let big = format!("GET /big HTTP/1.1\r\nx: {}\r\n\r\n", "y".repeat(200));
        for rest in [
            "POST /p HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi".to_string(),
            big,
            "GET /partial HTTP/1.1\r\nhost".to_string(),
        ] {
            let (mut client, mut server) = tokio::io::duplex(1 << 16);
            let sent = format!("GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n{rest}");
            client.write_all(sent.as_bytes()).await.unwrap();
            let ended = own.serve(&mut server).await.unwrap();
            let Ended::Handoff(handed) = ended else {
                panic!("{rest:?} was served")
            };
            assert_eq!(handed, rest.as_bytes());
            drop(server);
            let mut got = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut client, &mut got)
                .await
                .unwrap();
            assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{got}");
            assert!(got.ends_with("\r\n\r\n/b"), "{got}");
        }
        // The client's close between requests ends the loop.
        let (client, mut server) = tokio::io::duplex(1 << 16);
        drop(client);
        assert!(matches!(
            own.serve(&mut server).await.unwrap(),
            Ended::Closed
        ));
    }

    #[tokio::test]
    async fn bodies_are_written_in_their_framing_and_the_connection_kept_as_said() {
        async fn written(resp: Response<ProxyBody>, keep_alive: bool) -> (String, bool) {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            let mut out = Vec::new();
            let kept = write_response(&mut a, &mut out, resp, false, keep_alive)
                .await
                .unwrap();
            drop(a);
            let mut got = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut b, &mut got)
                .await
                .unwrap();
            let date = got.find("date: ").expect("a date");
            (format!("{}{}", &got[..date], &got[date + 37..]), kept)
        }
        let (got, kept) = written(Response::new(streamed()), true).await;
        assert_eq!(
            got,
            format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1A\r\n{}\r\n0\r\n\r\n",
                "x".repeat(26)
            )
        );
        assert!(kept);
        let (got, kept) = written(Response::new(full("hi")), false).await;
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi"
        );
        assert!(!kept);
        // A length header the body fills: kept. A failed body, or one
        // shorter than its length, closes the connection.
        let mut r = Response::new(
            Full::new(Bytes::from_static(b"abc"))
                .map_err(|e| match e {})
                .boxed(),
        );
        r.headers_mut()
            .insert("content-length", HeaderValue::from_static("3"));
        assert!(written(r, true).await.1);
        let failing = StreamBody::new(tokio_stream::iter(vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
            Err::<http_body::Frame<Bytes>, crate::http::BoxError>("broken".into()),
        ]))
        .boxed();
        let (got, kept) = written(Response::new(failing), true).await;
        assert!(got.ends_with("\r\n\r\n4\r\npart\r\n"), "{got}");
        assert!(!kept);
        let mut r = Response::new(StreamBody::new(tokio_stream::iter(futures_frames())).boxed());
        r.headers_mut()
            .insert("content-length", HeaderValue::from_static("36"));
        let (got, kept) = written(r, true).await;
        assert!(
            got.ends_with(&format!("\r\n\r\nhello{}", "x".repeat(26))),
            "{got}"
        );
        assert!(!kept, "5 bytes short of its length");
        let mut r = Response::new(StreamBody::new(tokio_stream::iter(futures_frames())).boxed());
        r.headers_mut()
            .insert("content-length", HeaderValue::from_static("10"));
        let (got, kept) = written(r, true).await;
        assert!(got.ends_with("\r\n\r\nhelloxxxxx"), "{got}");
        assert!(!kept, "longer than its length: cut there, then closed");
        // 1xx from a handler: hyper's 500.
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::CONTINUE;
        let (got, kept) = written(r, true).await;
        assert!(
            got.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{got}"
        );
        assert!(!kept);
    }

    /// A response whose body has given all of its content-length is
    /// written before the body's end is polled (where the request's
    /// completion and metrics run), not after.
    #[tokio::test]
    async fn a_whole_length_body_is_written_before_its_end_is_polled() {
        use std::sync::Mutex;
        use std::task::Context;
        type Log = Arc<Mutex<Vec<String>>>;
        struct Whole(Option<Bytes>, Log);
        impl http_body::Body for Whole {
            type Data = Bytes;
            type Error = crate::http::BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
                Poll::Ready(match self.0.take() {
                    Some(d) => Some(Ok(http_body::Frame::data(d))),
                    None => {
                        self.1.lock().unwrap().push("end".into());
                        None
                    }
                })
            }
            fn size_hint(&self) -> http_body::SizeHint {
                http_body::SizeHint::with_exact(5)
            }
        }
        struct Wire(Vec<u8>, Log);
        impl AsyncWrite for Wire {
            fn poll_write(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.0.extend_from_slice(buf);
                let whole = self.0.ends_with(b"\r\n\r\nwhole");
                self.1
                    .lock()
                    .unwrap()
                    .push(format!("wrote, whole: {whole}"));
                Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let log = Log::default();
        let body = Whole(Some(Bytes::from_static(b"whole")), log.clone());
        let mut wire = Wire(Vec::new(), log.clone());
        let kept = write_response(
            &mut wire,
            &mut Vec::new(),
            Response::new(body.boxed()),
            false,
            true,
        )
        .await
        .unwrap();
        assert!(kept);
        assert_eq!(*log.lock().unwrap(), ["wrote, whole: true", "end"]);
    }
}
