//! The accept loop of a client listener and what guards each connection:
//! the connection cap (past it, an immediate `503` and close, never a queue),
//! HTTP/1 head limits and the header-read timeout (hyper's), HTTP/2 stream
//! limits and reset-flood protection (h2's), the raw HTTP/1 head check
//! against request smuggling ([`h1scan`]), and an idle timeout that closes a
//! connection which moved no bytes for `downstream.idle-timeout`.
//!
//! It hands each request to a [`Handler`] and knows nothing of what the
//! handler does; it depends on [`crate::http`], [`crate::error`] and
//! [`crate::metrics`]. TLS termination for the inbound listener lands here.

pub mod h1scan;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;

use self::h1scan::{Scanner, Violation};
use crate::error::ProxyError;
use crate::http::ProxyBody;
use crate::http::headers::Remote;
use crate::metrics::Metrics;

/// Limits on client connections (the mesh file's `downstream` block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Most headers per request.
    pub max_headers: usize,
    /// Time to send a whole request head.
    pub header_read_timeout: Duration,
    /// A connection moving no bytes this long is closed.
    pub idle_timeout: Duration,
    /// Open connections per listener.
    pub max_connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            max_concurrent_streams: 100,
        }
    }
}

/// What serves the requests a listener accepts.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Answer one request from `remote`.
    fn handle(
        &self,
        req: Request<Incoming>,
        remote: Arc<Remote>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send;
}

/// Connections being turned away at once, at most; past it an overflowing
/// connection is simply closed.
const MAX_REFUSING: usize = 256;

/// The answer to a connection past `downstream.max-connections`.
fn overflow_reply() -> Vec<u8> {
    let body = "upstream overflow: this proxy has reached downstream.max-connections\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
         x-wasmesh-flags: UO\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answer a connection past `downstream.max-connections` with a 503, at most
/// [`MAX_REFUSING`] at once; past that it is simply closed.
fn turn_away(stream: TcpStream, refusing: &Arc<AtomicUsize>, metrics: &Metrics) {
    metrics.downstream_closed("overflow");
    if refusing.fetch_add(1, Ordering::AcqRel) < MAX_REFUSING {
        let refusing = refusing.clone();
        tokio::spawn(async move {
            refuse(stream).await;
            refusing.fetch_sub(1, Ordering::AcqRel);
        });
    } else {
        refusing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accept connections on `listener` until `stop` changes, serving each with
/// `handler` under `limits`; `graceful` tracks them for draining.
pub async fn accept_loop<H: Handler>(
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
    handler: H,
    mut stop: tokio::sync::watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
) {
    let builder = builder(&limits);
    let open = Arc::new(AtomicUsize::new(0));
    let refusing = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if open.load(Ordering::Acquire) >= limits.max_connections {
            turn_away(stream, &refusing, &metrics);
            continue;
        }
        let slot = Slot::take(&open, &metrics);
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let heads = Arc::new(h1scan::Shared::new());
        let io = Tracked {
            inner: stream,
            activity: activity.clone(),
            scanner: Some(Scanner::default()),
            heads: heads.clone(),
        };
        let svc = {
            let (handler, metrics) = (handler.clone(), metrics.clone());
            let peer = Arc::new(Remote::new(remote));
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let bad = if req.version() < Version::HTTP_2 {
                    heads.next_request()
                } else {
                    None
                };
                let (handler, metrics, peer) = (handler.clone(), metrics.clone(), peer.clone());
                async move {
                    Ok::<_, Infallible>(match bad {
                        Some(why) => refuse_head(&metrics, why),
                        None => handler.handle(req, peer).await,
                    })
                }
            })
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        let conn = graceful.watch(conn.into_owned());
        let idle = limits.idle_timeout;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            loop {
                let wait = idle.saturating_sub(activity.idle_for());
                if wait.is_zero() {
                    tracing::debug!(%remote, "closing a connection idle for {idle:?}");
                    metrics.downstream_closed("idle");
                    return;
                }
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(%remote, "connection ended: {e}");
                        }
                        return;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
    }
}

/// The answer to a request head the raw check refused: 400, and the
/// connection closes after it; nothing is forwarded.
fn refuse_head(metrics: &Metrics, why: Violation) -> Response<ProxyBody> {
    metrics.downstream_closed("bad_framing");
    let mut r = ProxyError::BadFraming(why.describe()).into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// hyper's connection builder with the downstream limits applied.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        // The head must fit the read buffer: past it hyper answers 431.
        .max_buf_size(limits.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Rapid reset (CVE-2023-44487): streams reset by the client before
        // they were accepted; past this the connection gets GOAWAY.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024);
    b
}

/// Turn away a connection past the cap: a 503 with `Connection: close`,
/// then close, reading (and dropping) what the client sent so that the
/// close is a FIN, not a reset that could destroy the reply. Bounded by 1 s.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&overflow_reply()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < 64 * 1024 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        io::Result::Ok(())
    })
    .await;
}

/// One open connection, counted while it lives.
struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Slot {
    fn take(open: &Arc<AtomicUsize>, metrics: &Arc<Metrics>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        metrics.downstream_connections.inc();
        Self {
            open: open.clone(),
            metrics: metrics.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.downstream_connections.dec();
    }
}

/// When a connection last moved bytes.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A client socket that notes when it last moved bytes, and shows what it
/// reads to the raw HTTP/1 head check.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// None once the scanner has given up or flagged a head.
    scanner: Option<Scanner>,
    heads: Arc<h1scan::Shared>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            me.activity.touch();
            if let Some(scanner) = &mut me.scanner {
                scanner.feed(&buf.filled()[before..]);
                if scanner.verdict().is_some() {
                    me.heads.publish(scanner);
                    me.scanner = None;
                } else if scanner.is_done() {
                    me.scanner = None;
                }
            }
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
