//! Request bodies as the attempt loop sees them: read whole up to the
//! replay buffer (so a retry can send them again), or streamed once after a
//! first frame read ahead (so a body broken from its first bytes is refused
//! before anything is forwarded).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{BoxError, ProxyBody, full};

/// Largest request body buffered so that it can be replayed for a retry.
pub const RETRY_BUFFER: usize = 64 * 1024;

/// How long the proxy waits for a request body's first frame before it
/// calls the upstream anyway (a client may hold its body until it sees the
/// response head).
const FIRST_FRAME_WAIT: Duration = Duration::from_millis(250);

/// A client's request body: none (a head that frames no body, read by the
/// listener's own HTTP/1.1 loop), or hyper's.
pub enum ClientBody {
    /// No body.
    Empty,
    /// The body hyper reads.
    Hyper(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// The request body as the attempt loop sees it.
pub enum ReqBody {
    /// Read whole (at most [`RETRY_BUFFER`]): can be sent again.
    Replayable(Bytes),
    /// Streamed: can be sent once.
    Once(Option<ProxyBody>),
}

impl ReqBody {
    /// The body for the next attempt (a streamed body is empty after its
    /// first).
    pub fn take(&mut self) -> ProxyBody {
        match self {
            ReqBody::Replayable(b) => full(b.clone()),
            ReqBody::Once(b) => b.take().unwrap_or_else(|| full(Bytes::new())),
        }
    }

    /// Whether it is empty (a request without a body).
    pub fn is_empty(&self) -> bool {
        matches!(self, ReqBody::Replayable(b) if b.is_empty())
    }

    /// Whether it can be sent again.
    pub fn is_replayable(&self) -> bool {
        matches!(self, ReqBody::Replayable(_))
    }
}

/// What became of the client's body: whether it failed (bad framing, a
/// reset) after forwarding began, so the failure is answered as the
/// client's; and how many bytes of it were read (`istio_request_bytes`).
/// A request without a body has nothing to watch (and allocates nothing).
#[derive(Clone)]
pub struct BodyWatch(Option<Arc<Watched>>);

#[derive(Default)]
struct Watched {
    broken: AtomicBool,
    bytes: AtomicU64,
}

impl BodyWatch {
    /// A watch on `body` (none when it has ended already: no body).
    pub fn of(body: &ClientBody) -> Self {
        Self((!body.is_end_stream()).then(Arc::default))
    }

    /// Whether it broke.
    pub fn is_broken(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|w| w.broken.load(Ordering::Acquire))
    }

    /// Bytes of it read from the client so far.
    pub fn bytes(&self) -> u64 {
        self.0
            .as_ref()
            .map_or(0, |w| w.bytes.load(Ordering::Relaxed))
    }

    fn read(&self, frame: &Frame<Bytes>) {
        if let (Some(w), Some(d)) = (&self.0, frame.data_ref()) {
            w.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
    }

    fn broke(&self) {
        if let Some(w) = &self.0 {
            w.broken.store(true, Ordering::Release);
        }
    }
}

/// A request body whose first frames were read ahead (up to the retry
/// buffer), followed by the rest of the stream.
struct PrefixedBody {
    prefix: VecDeque<Frame<Bytes>>,
    rest: ClientBody,
    broken: BodyWatch,
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        let r = Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map_err(BoxError::from);
        match &r {
            Poll::Ready(Some(Err(_))) => self.broken.broke(),
            Poll::Ready(Some(Ok(f))) => self.broken.read(f),
            _ => {}
        }
        r
    }
}

fn streamed(prefix: VecDeque<Frame<Bytes>>, rest: ClientBody, broken: &BodyWatch) -> ReqBody {
    ReqBody::Once(Some(
        PrefixedBody {
            prefix,
            rest,
            broken: broken.clone(),
        }
        .boxed(),
    ))
}

/// Read the body ahead up to [`RETRY_BUFFER`] when it may have to be sent
/// again (`replay`); otherwise only its first frame, so that a body broken
/// from its first bytes is refused before anything is forwarded. The rest
/// streams.
pub async fn read(
    body: ClientBody,
    replay: bool,
    broken: &BodyWatch,
) -> Result<ReqBody, hyper::Error> {
    if replay {
        buffer(body, broken).await
    } else {
        first_frame(body, broken).await
    }
}

async fn first_frame(mut body: ClientBody, broken: &BodyWatch) -> Result<ReqBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(ReqBody::Replayable(Bytes::new()));
    }
    let prefix = match crate::timer::timeout(FIRST_FRAME_WAIT, body.frame()).await {
        Err(_) => VecDeque::new(),
        Ok(None) => return Ok(ReqBody::Replayable(Bytes::new())),
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(frame))) => {
            broken.read(&frame);
            [frame].into()
        }
    };
    Ok(streamed(prefix, body, broken))
}

async fn buffer(mut body: ClientBody, broken: &BodyWatch) -> Result<ReqBody, hyper::Error> {
    let mut data = bytes::BytesMut::new();
    let mut size = 0usize;
    loop {
        match body.frame().await {
            None => return Ok(ReqBody::Replayable(data.freeze())),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                broken.read(&frame);
                if let Some(d) = frame.data_ref() {
                    size += d.len();
                    if size <= RETRY_BUFFER {
                        data.extend_from_slice(d);
                        continue;
                    }
                }
                // Too large, or trailers: stream it, once.
                let mut prefix = VecDeque::new();
                if !data.is_empty() {
                    prefix.push_back(Frame::data(data.freeze()));
                }
                prefix.push_back(frame);
                return Ok(streamed(prefix, body, broken));
            }
        }
    }
}
