//! A check of raw HTTP/1 request heads, stricter than hyper's parser, as
//! Envoy is: hyper quietly drops a `Content-Length` that comes with
//! `Transfer-Encoding` and an identical duplicate `Content-Length` before
//! the proxy sees the header map, and accepts a repeated
//! `Transfer-Encoding: chunked`. Shapes like these are how requests are
//! smuggled past a proxy to an upstream that frames them differently.
//!
//! The [`Scanner`] sees every byte a client connection reads, in order. It
//! follows HTTP/1 framing (heads, `Content-Length` bodies, chunked bodies)
//! to find each request head, and records the index of the first head that
//! breaks a rule. It only observes: bytes pass to hyper unchanged. When it
//! cannot follow the stream (HTTP/2, a tunnel, input hyper will refuse
//! anyway) it stops, and flags nothing more.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Why a request head was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndChunked,
    /// More than one `Content-Length` (equal or not), or a list.
    DuplicateLength,
    /// A `Content-Length` that is not plain digits.
    BadLength,
    /// More than one `Transfer-Encoding`, or a coding other than a single
    /// `chunked`.
    BadTransferEncoding,
}

impl Violation {
    /// Text for the 400 body.
    pub fn describe(self) -> &'static str {
        match self {
            Violation::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            Violation::DuplicateLength => "more than one Content-Length",
            Violation::BadLength => "a Content-Length that is not a plain number",
            Violation::BadTransferEncoding => {
                "a Transfer-Encoding other than one `chunked` (repeated, listed or unknown)"
            }
        }
    }
}

/// Largest head the scanner buffers; past it hyper answers 431 anyway.
const HEAD_CAP: usize = 1 << 20;

#[derive(Debug)]
enum State {
    /// Reading a head (bytes so far).
    Head(Vec<u8>),
    /// Skipping a body of this many bytes.
    Fixed(u64),
    /// Reading a chunk-size line (bytes so far).
    ChunkSize(Vec<u8>),
    /// Skipping chunk data, then its CRLF (2 more bytes).
    ChunkData(u64),
    /// Reading trailer lines; the current line so far.
    Trailers(Vec<u8>),
    /// Not following the stream any more.
    Done,
}

/// Per-connection scanner: feed it what the socket read.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Heads seen so far.
    heads: usize,
    verdict: Option<(usize, Violation)>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            state: State::Head(Vec::new()),
            heads: 0,
            verdict: None,
        }
    }
}

impl Scanner {
    /// The first bad head: its index (0-based, in connection order) and why.
    pub fn verdict(&self) -> Option<(usize, Violation)> {
        self.verdict
    }

    /// Whether the scanner has stopped following the stream.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Follow `bytes`, the next bytes read from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Head(_) => match self.feed_head(bytes) {
                    Some(rest) => bytes = rest,
                    None => return,
                },
                State::Fixed(n) => {
                    let take = (*n).min(bytes.len() as u64);
                    *n -= take;
                    bytes = &bytes[take as usize..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let Some(i) = bytes.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(bytes);
                        if line.len() > 4096 {
                            self.state = State::Done;
                        }
                        return;
                    };
                    line.extend_from_slice(&bytes[..i]);
                    bytes = &bytes[i + 1..];
                    let text = line.strip_suffix(b"\r").unwrap_or(line);
                    let size = text.split(|b| *b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .map(str::trim)
                        .and_then(|s| u64::from_str_radix(s, 16).ok());
                    self.state = match size {
                        None => State::Done,
                        Some(0) => State::Trailers(Vec::new()),
                        Some(n) => State::ChunkData(n.saturating_add(2)),
                    };
                }
                State::ChunkData(n) => {
                    let take = (*n).min(bytes.len() as u64);
                    *n -= take;
                    bytes = &bytes[take as usize..];
                    if *n == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(line) => {
                    let Some(i) = bytes.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(bytes);
                        if line.len() > HEAD_CAP {
                            self.state = State::Done;
                        }
                        return;
                    };
                    line.extend_from_slice(&bytes[..i]);
                    bytes = &bytes[i + 1..];
                    let empty = line.is_empty() || line.as_slice() == b"\r";
                    line.clear();
                    if empty {
                        self.state = State::Head(Vec::new());
                    }
                }
            }
        }
    }

    /// Follow the bytes of a head being read: the bytes after it once it is
    /// complete and judged, `None` when all of them were taken (the head
    /// goes on in the next read, or the scan stopped).
    fn feed_head<'a>(&mut self, mut bytes: &'a [u8]) -> Option<&'a [u8]> {
        let State::Head(buf) = &mut self.state else {
            return Some(bytes);
        };
        // A head starts at the first non-CRLF byte (RFC 9112 §2.2 allows
        // empty lines before a request line).
        if buf.is_empty() {
            let skip = bytes.iter().take_while(|b| **b == b'\r' || **b == b'\n');
            bytes = &bytes[skip.count()..];
            if bytes.is_empty() {
                return None;
            }
            // (The HTTP/2 preface reads as a head with version 2.0, which
            // httparse refuses: the scan stops there.) The usual case, a
            // whole head in one read, is judged where it lies, without a
            // copy.
            if let Some(end) = head_end(bytes, 0) {
                self.state = self.head(&bytes[..end]);
                return Some(&bytes[end..]);
            }
        }
        let start = buf.len().saturating_sub(2);
        buf.extend_from_slice(bytes);
        let Some(end) = head_end(buf, start) else {
            if buf.len() > HEAD_CAP {
                self.state = State::Done;
            }
            return None;
        };
        let rest = buf.len() - end;
        let head = std::mem::take(buf);
        self.state = self.head(&head[..end]);
        Some(&bytes[bytes.len() - rest..])
    }

    /// Judge one complete head; the state that follows it.
    fn head(&mut self, head: &[u8]) -> State {
        let index = self.heads;
        self.heads += 1;
        // The usual head, an HTTP/1 request without a body, needs no parse:
        // with no line that could name `Content-Length` or
        // `Transfer-Encoding`, nothing in it can be flagged and no body
        // follows (a malformed one is refused by hyper, which closes the
        // connection). Parsing it whole was ≈ 0.8 k instructions a request.
        if is_http1(head) && !may_frame(head) {
            return State::Head(Vec::new());
        }
        // Left uninitialised: httparse writes the entries it parses (a
        // zeroed array was 4 KiB written for every request).
        let mut few = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut many;
        let mut req = httparse::Request::new(&mut []);
        let mut parsed = req.parse_with_uninit_headers(head, &mut few);
        if parsed == Err(httparse::Error::TooManyHeaders) {
            many = vec![httparse::EMPTY_HEADER; 1024];
            req = httparse::Request::new(&mut many);
            parsed = req.parse(head);
        }
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            // hyper refuses what httparse refuses; nothing to follow.
            return State::Done;
        }
        let mut lengths = 0;
        let mut length: Option<u64> = None;
        let mut codings = 0;
        let mut chunked = false;
        let mut bad = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                let v = h.value.trim_ascii();
                if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                    bad.get_or_insert(if v.contains(&b',') {
                        Violation::DuplicateLength
                    } else {
                        Violation::BadLength
                    });
                }
                length = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                codings += 1;
                chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    bad.get_or_insert(Violation::BadTransferEncoding);
                }
            }
        }
        if lengths > 1 {
            bad.get_or_insert(Violation::DuplicateLength);
        }
        if codings > 1 {
            bad.get_or_insert(Violation::BadTransferEncoding);
        }
        if lengths > 0 && codings > 0 {
            bad.get_or_insert(Violation::LengthAndChunked);
        }
        if let Some(v) = bad {
            self.verdict.get_or_insert((index, v));
            // The connection closes after this request; stop here.
            return State::Done;
        }
        if chunked {
            State::ChunkSize(Vec::new())
        } else {
            match length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => State::Head(Vec::new()),
            }
        }
    }
}

/// Whether a head's request line ends in an HTTP/1 version (anything else,
/// such as HTTP/2's preface, is left to the parser, which refuses it).
fn is_http1(head: &[u8]) -> bool {
    let line = match memchr::memchr(b'\n', head) {
        Some(end) => &head[..end],
        None => head,
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0")
}

/// Whether any header line of a head starts with a framing header's name
/// (in any case): only then is the head parsed and judged.
fn may_frame(head: &[u8]) -> bool {
    let starts = |line: &[u8], name: &[u8]| {
        line.get(..name.len())
            .is_some_and(|l| l.eq_ignore_ascii_case(name))
    };
    memchr::memchr_iter(b'\n', head).any(|i| {
        let line = &head[i + 1..];
        // Most lines are ruled out by their first byte alone.
        match line.first().map(u8::to_ascii_lowercase) {
            Some(b'c') => starts(line, b"content-length"),
            Some(b't') => starts(line, b"transfer-encoding"),
            _ => false,
        }
    })
}

/// The end of a head (just past its empty line), searching from `from`.
/// Lines may end in CRLF or, as httparse (and so hyper) also accepts, a bare
/// LF: the empty line is `\n\n` or `\n\r\n`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf.get(from..)?)
        .map(|i| from + i)
        .find_map(|i| match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        })
}

/// A scanner's verdict shared between the socket (which feeds it) and the
/// connection's request handler (which counts heads).
#[derive(Debug, Default)]
pub struct Shared {
    /// Index of the first bad head, `usize::MAX` while none.
    bad_from: AtomicUsize,
    why: std::sync::OnceLock<Violation>,
    served: AtomicUsize,
}

impl Shared {
    /// A fresh shared verdict (no bad head).
    pub fn new() -> Self {
        Self {
            bad_from: AtomicUsize::new(usize::MAX),
            why: std::sync::OnceLock::new(),
            served: AtomicUsize::new(0),
        }
    }

    /// Record the scanner's verdict.
    pub fn publish(&self, scanner: &Scanner) {
        if let Some((i, v)) = scanner.verdict() {
            let _ = self.why.set(v);
            self.bad_from.fetch_min(i, Ordering::AcqRel);
        }
    }

    /// Called once per HTTP/1 request, in order: whether this one is at or
    /// past the first bad head.
    pub fn next_request(&self) -> Option<Violation> {
        let i = self.served.fetch_add(1, Ordering::AcqRel);
        if i >= self.bad_from.load(Ordering::Acquire) {
            self.why.get().copied()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(input: &[u8]) -> Option<(usize, Violation)> {
        // Every split point gives the same answer as one read.
        let mut whole = Scanner::default();
        whole.feed(input);
        for cut in 1..input.len() {
            let mut s = Scanner::default();
            s.feed(&input[..cut]);
            s.feed(&input[cut..]);
            assert_eq!(s.verdict(), whole.verdict(), "split at {cut}");
        }
        whole.verdict()
    }

    /// The fuzzer's seed and found corpus, replayed as the target runs them
    /// (`fuzz/fuzz_targets/h1_head.rs`: the first byte picks a split point).
    #[test]
    fn the_h1_head_fuzz_corpus_replays() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/h1_head");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let Some((&cut, bytes)) = data.split_first() else {
                continue;
            };
            let mut whole = Scanner::default();
            whole.feed(bytes);
            let cut = usize::from(cut) * bytes.len() / 256;
            let mut split = Scanner::default();
            split.feed(&bytes[..cut]);
            split.feed(&bytes[cut..]);
            assert_eq!(whole.verdict(), split.verdict());
            n += 1;
        }
        assert!(n >= 3, "the corpus is missing ({n} files in {dir})");
    }

    #[test]
    fn clean_keep_alive_streams_pass() {
        let input = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\ntrailer: x\r\n\r\n\
            GET /z HTTP/1.1\r\nhost: a\r\n\r\n";
        assert_eq!(verdict(input), None);
    }

    #[test]
    fn smuggling_shapes_are_flagged_at_their_request() {
        let first = b"GET / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc".to_vec();
        for (headers, why) in [
            (
                "content-length: 5\r\ntransfer-encoding: chunked",
                Violation::LengthAndChunked,
            ),
            (
                "transfer-encoding: chunked\r\ncontent-length: 5",
                Violation::LengthAndChunked,
            ),
            (
                "content-length: 5\r\ncontent-length: 5",
                Violation::DuplicateLength,
            ),
            ("content-length: 5, 5", Violation::DuplicateLength),
            ("content-length: +5", Violation::BadLength),
            (
                "transfer-encoding: chunked\r\ntransfer-encoding: chunked",
                Violation::BadTransferEncoding,
            ),
            (
                "transfer-encoding: chunked, identity",
                Violation::BadTransferEncoding,
            ),
            (
                "transfer-encoding: xchunked",
                Violation::BadTransferEncoding,
            ),
        ] {
            let mut input = first.clone();
            input.extend_from_slice(
                format!("POST / HTTP/1.1\r\nhost: a\r\n{headers}\r\n\r\n0\r\n\r\n").as_bytes(),
            );
            assert_eq!(verdict(&input), Some((1, why)), "{headers}");
        }
    }

    #[test]
    fn bare_lf_heads_are_judged_too() {
        // httparse (and so hyper) accepts LF line endings: no way around the check.
        let input = b"GET / HTTP/1.1\nhost: a\n\nPOST / HTTP/1.1\nhost: a\ncontent-length: 5\ntransfer-encoding: chunked\n\n0\r\n\r\n";
        assert_eq!(verdict(input), Some((1, Violation::LengthAndChunked)));
    }

    #[test]
    fn only_heads_that_may_frame_a_body_are_parsed() {
        assert!(is_http1(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"));
        assert!(is_http1(b"GET / HTTP/1.0\nhost: a\n\n"));
        assert!(!is_http1(b"PRI * HTTP/2.0\r\n\r\n"));
        assert!(!may_frame(
            b"GET / HTTP/1.1\r\nhost: a\r\ncontent-type: x\r\n\r\n"
        ));
        assert!(may_frame(
            b"GET / HTTP/1.1\r\nhost: a\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(may_frame(b"GET / HTTP/1.1\nTRANSFER-ENCODING: chunked\n\n"));
        // A body-less head followed by one that smuggles: the second is
        // still flagged, whatever the case of its names.
        let input = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n\
            GET / HTTP/1.1\r\nCONTENT-LENGTH: 1\r\nContent-length: 1\r\n\r\nx";
        assert_eq!(verdict(input), Some((1, Violation::DuplicateLength)));
    }

    #[test]
    fn http2_and_garbage_stop_the_scan() {
        assert_eq!(
            verdict(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"),
            None
        );
        let mut s = Scanner::default();
        s.feed(b"NOT HTTP AT ALL\r\n\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n");
        assert_eq!(s.verdict(), None);
    }

    #[test]
    fn shared_verdict_refuses_from_the_bad_request_on() {
        let mut s = Scanner::default();
        s.feed(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx");
        let shared = Shared::new();
        shared.publish(&s);
        assert_eq!(shared.next_request(), None);
        assert_eq!(shared.next_request(), Some(Violation::DuplicateLength));
    }
}
