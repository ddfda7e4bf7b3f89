//! The accept loop of a client listener and what guards each connection:
//! the connection cap (past it, an immediate `503` and close, never a queue),
//! HTTP/1 head limits and the header-read timeout (hyper's), HTTP/2 stream
//! limits and reset-flood protection (h2's), the raw HTTP/1 head check
//! against request smuggling ([`h1scan`]), and an idle timeout that closes a
//! connection which moved no bytes for `downstream.idle-timeout`.
//!
//! On the inbound listener of a proxy with a mesh identity it terminates
//! mutual TLS ([`Security`]): `STRICT` takes mesh mTLS only (a plaintext
//! client or one without a mesh certificate is refused at the handshake and
//! never reaches the app); `PERMISSIVE` takes plaintext too, told apart by
//! the first byte. Each refusal is logged with its reason and counted.
//!
//! An HTTP/1.1 request without a body is read and answered by the
//! connection's own loop (`h1`); at a connection's first other request
//! hyper's server (HTTP/1 and HTTP/2) takes the connection over.
//!
//! It hands each request to a [`Handler`] and knows nothing of what the
//! handler does; it depends on [`crate::http`], [`crate::error`] and
//! [`crate::metrics`].

mod h1;
pub mod h1scan;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;

use self::h1scan::{Scanner, Violation};
use crate::error::ProxyError;
use crate::http::ProxyBody;
use crate::http::body::ClientBody;
use crate::http::headers::{Peer, Remote};
use crate::metrics::Metrics;
use std::net::SocketAddr;
use wasmesh_identity::tls::{self, Rejection};

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

/// How a listener's next connection is secured.
#[derive(Clone)]
pub enum Security {
    /// Plaintext HTTP.
    Plain,
    /// Mesh mutual TLS; `permissive`: plaintext too.
    Mtls {
        /// The TLS configuration (client certificate required).
        config: Arc<rustls::ServerConfig>,
        /// Accept plaintext as well (`PERMISSIVE`).
        permissive: bool,
    },
    /// Refuse every connection, for this reason.
    Refuse(&'static str),
}

/// What serves the requests a listener accepts.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Answer one request from `remote`.
    fn handle(
        &self,
        req: Request<ClientBody>,
        remote: Arc<Remote>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send;

    /// How the next connection is secured.
    fn security(&self) -> Security {
        Security::Plain
    }
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

/// The connections the listeners accepted, drained on shutdown: each
/// finishes the request it is serving (an HTTP/1 connection closes after
/// it; HTTP/2 sends GOAWAY), and [`Drain::drained`] resolves once none is
/// left open.
///
/// Each connection's watchdog task (see [`Conn::serve`]) holds a receiver
/// and is woken by the signal; the connection's own task is not polled for
/// it (hyper-util's `GracefulShutdown` polled a `watch` future on every
/// wake of every connection: ≈ 300 instructions a request).
pub struct Drain {
    signal: tokio::sync::watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            signal: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Drain {
    /// Tell every connection to finish, and wait until all have closed.
    pub async fn drained(&self) {
        self.signal.send_replace(true);
        self.signal.closed().await;
    }
}

/// Accept connections on `listener` until `stop` changes, serving each with
/// `handler` under `limits`; `drain` tracks them for draining.
pub async fn accept_loop<H: Handler>(
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
    handler: H,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: Arc<Drain>,
) {
    // Bound on the runtime the proxy started on; registered again with the
    // one this loop runs on, so that a connection's arrival wakes it, not
    // that one.
    let listener = match listener.into_std().and_then(TcpListener::from_std) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot serve a listener on this runtime: {e}");
            return;
        }
    };
    let builder = builder(&limits);
    let open = Arc::new(AtomicUsize::new(0));
    let refusing = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    crate::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if open.load(Ordering::Acquire) >= limits.max_connections {
            turn_away(stream, &refusing, &metrics);
            continue;
        }
        let conn = Conn {
            slot: Slot::take(&open, &metrics),
            remote,
            limits,
            metrics: metrics.clone(),
            builder: builder.clone(),
            drain: drain.signal.subscribe(),
        };
        let _ = stream.set_nodelay(true);
        match handler.security() {
            Security::Plain => conn.serve(stream, Remote::new(remote), handler.clone()),
            security => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Some((io, peer)) = secure(stream, security, &conn).await {
                        match io {
                            Secured::Plain(s) => conn.serve(s, peer, handler),
                            Secured::Tls(s) => conn.serve(*s, peer, handler),
                        }
                    }
                });
            }
        }
    }
}

/// A connection accepted, and what serving it takes.
struct Conn {
    slot: Slot,
    remote: SocketAddr,
    limits: Limits,
    metrics: Arc<Metrics>,
    builder: auto::Builder<TokioExecutor>,
    /// Turns `true` when the proxy drains.
    drain: tokio::sync::watch::Receiver<bool>,
}

/// A connection after the security check.
enum Secured {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The second (since the epoch) a refused connection was last logged at
/// info level.
static LAST_REFUSAL_LOGGED: AtomicU64 = AtomicU64::new(0);

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Apply `security` to a new connection: the stream to serve and who the
/// client is, or `None` when it was refused (logged and counted).
async fn secure(stream: TcpStream, security: Security, conn: &Conn) -> Option<(Secured, Remote)> {
    let remote = conn.remote;
    let refuse = |reason: &'static str, why: &dyn std::fmt::Display| {
        conn.metrics.tls_refused("inbound", reason);
        // A client opens as many connections as it likes: every refusal is
        // counted, at most one a second is an info line, the rest debug.
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if LAST_REFUSAL_LOGGED.swap(second, Ordering::Relaxed) != second {
            tracing::info!(%remote, reason, "refused a connection: {why} (more refusals are counted in wasmesh_tls_refused_connections_total)");
        } else {
            tracing::debug!(%remote, reason, "refused a connection: {why}");
        }
        None
    };
    let (config, permissive) = match security {
        Security::Plain => return Some((Secured::Plain(stream), Remote::new(remote))),
        Security::Refuse(why) => return refuse("no_identity", &why),
        Security::Mtls { config, permissive } => (config, permissive),
    };
    let timeout = conn.limits.header_read_timeout;
    let mut first = [0u8; 1];
    match crate::timer::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        // Closed, failed or silent before a byte: nothing to refuse.
        _ => return None,
    }
    if first[0] != TLS_HANDSHAKE {
        if permissive {
            return Some((Secured::Plain(stream), Remote::new(remote)));
        }
        return refuse(
            Rejection::Plaintext.label(),
            &"plaintext on a STRICT mTLS port (mesh mTLS only)",
        );
    }
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = match crate::timer::timeout(timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = tls::tls_error(&e).map_or(Rejection::Handshake, tls::rejection);
            return refuse(reason.label(), &e);
        }
        Err(_) => return refuse(Rejection::Handshake.label(), &"no TLS handshake in time"),
    };
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let Some(peer) = leaf.and_then(Peer::from_leaf) else {
        // The verifier requires a mesh certificate; a handshake cannot end
        // without one.
        return refuse(
            Rejection::NoSpiffeId.label(),
            &"no SPIFFE ID in the certificate",
        );
    };
    Some((Secured::Tls(Box::new(tls)), Remote::with_peer(remote, peer)))
}

impl Conn {
    /// Serve HTTP on `io` from `remote`, with the downstream limits and
    /// the raw head check, until it ends, idles out or drains.
    ///
    /// Two tasks: one serves the connection and is polled only by its own
    /// traffic; a watchdog sleeps until the connection may have idled out
    /// or the proxy drains, and then closes it (aborting the first) or asks
    /// it to finish. A `select!` of the connection and an idle timer in one
    /// task re-polled the timer on every wake (≈ 230 instructions a
    /// request).
    fn serve<S, H>(self, io: S, remote: Remote, handler: H)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Handler,
    {
        let Conn {
            slot,
            remote: addr,
            limits,
            metrics,
            builder,
            drain,
        } = self;
        let activity = Arc::new(Activity::default());
        let heads = Arc::new(h1scan::Shared::new());
        let io = Tracked::new(io, activity.clone(), heads.clone());
        let peer = Arc::new(remote);
        let finish = Arc::new(Finish::default());
        let own = h1::Own {
            handler: handler.clone(),
            peer: peer.clone(),
            max_headers: limits.max_headers,
            max_head_bytes: limits.max_header_bytes,
            finish: finish.clone(),
        };
        let svc = {
            let metrics = metrics.clone();
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
                        None => handler.handle(req.map(ClientBody::Hyper), peer).await,
                    })
                }
            })
        };
        let serving = tokio::spawn({
            let finish = finish.clone();
            async move {
                let _slot = slot;
                let mut io = io;
                // The plain HTTP/1.1 requests first; hyper takes over at the
                // first request the own loop does not serve.
                let rest = match own.serve(&mut io).await {
                    Ok(h1::Ended::Handoff(rest)) => rest,
                    Ok(h1::Ended::Closed) => return,
                    Err(e) => {
                        tracing::debug!(remote = %addr, "connection ended: {e}");
                        return;
                    }
                };
                drop(own);
                io.hand_over(rest);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                let mut conn = std::pin::pin!(conn);
                let mut finishing = false;
                let r = std::future::poll_fn(|cx| {
                    if !finishing {
                        finish.waker.get_or_init(|| cx.waker().clone());
                        if finish.asked.load(Ordering::Acquire) {
                            finishing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    conn.as_mut().poll(cx)
                })
                .await;
                if let Err(e) = r {
                    tracing::debug!(remote = %addr, "connection ended: {e}");
                }
            }
        });
        tokio::spawn(watchdog(
            serving,
            activity,
            finish,
            drain,
            limits.idle_timeout,
            (metrics, addr),
        ));
    }
}

/// A request for a connection's task to finish (drain), and how to wake
/// it.
#[derive(Default)]
struct Finish {
    asked: AtomicBool,
    /// The connection task's waker, kept from its first poll: a spawned
    /// task's waker always wakes that same task, and this future is the
    /// task's own, never moved to another.
    waker: OnceLock<Waker>,
}

/// Watch one connection: close it (abort its task) once it has moved no
/// bytes for `idle`, ask it to finish when the proxy drains, and hold the
/// drain's receiver until the connection has ended. It checks for bytes
/// moved every quarter of `idle`, so a silent connection closes between
/// `idle` and 1.25 × `idle` after its last byte.
async fn watchdog(
    mut serving: tokio::task::JoinHandle<()>,
    activity: Arc<Activity>,
    finish: Arc<Finish>,
    mut drain: tokio::sync::watch::Receiver<bool>,
    idle: Duration,
    (metrics, remote): (Arc<Metrics>, SocketAddr),
) {
    let every = (idle / 4).max(Duration::from_millis(1));
    let mut seen = activity.moved();
    let mut quiet_since = Instant::now();
    let mut draining = *drain.borrow();
    if draining {
        ask_to_finish(&finish);
    }
    loop {
        tokio::select! {
            _ = &mut serving => return,
            // A closed channel (the proxy is going away) counts as a drain.
            _ = drain.changed(), if !draining => {
                draining = true;
                ask_to_finish(&finish);
            }
            _ = crate::timer::sleep(every) => {
                let moved = activity.moved();
                if moved != seen {
                    seen = moved;
                    quiet_since = Instant::now();
                } else if quiet_since.elapsed() >= idle {
                    tracing::debug!(%remote, "closing a connection idle for {idle:?}");
                    metrics.downstream_closed("idle");
                    serving.abort();
                    let _ = serving.await;
                    return;
                }
            }
        }
    }
}

fn ask_to_finish(finish: &Finish) {
    finish.asked.store(true, Ordering::Release);
    if let Some(w) = finish.waker.get() {
        w.wake_by_ref();
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
        .timer(crate::timer::HyperTimer)
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        // The head must fit the read buffer: past it hyper answers 431.
        .max_buf_size(limits.max_header_bytes.max(8192));
    b.http2()
        .timer(crate::timer::HyperTimer)
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
    let _ = crate::timer::timeout(Duration::from_secs(1), async {
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

/// Whether a connection moves bytes: a count of the reads and writes that
/// moved some, which its watchdog compares between checks (no clock read
/// per read or write).
#[derive(Default)]
struct Activity {
    moves: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        // Only the connection's task writes it: no read-modify-write.
        let n = self.moves.load(Ordering::Relaxed);
        self.moves.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    fn moved(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }
}

/// A client connection that notes when it last moved bytes, and shows what
/// it reads (after TLS) to the raw HTTP/1 head check.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// None until hyper serves the connection, and once the scanner has
    /// given up or flagged a head.
    scanner: Option<Scanner>,
    /// Bytes the own HTTP/1.1 loop read and handed over: read again (by
    /// hyper) before the connection's next.
    rest: bytes::Bytes,
    heads: Arc<h1scan::Shared>,
}

impl<S> Tracked<S> {
    /// `inner`, its heads unchecked until hyper serves it.
    fn new(inner: S, activity: Arc<Activity>, heads: Arc<h1scan::Shared>) -> Self {
        Self {
            inner,
            activity,
            scanner: None,
            heads,
            rest: bytes::Bytes::new(),
        }
    }

    /// Hand the connection to hyper with `rest`, the bytes the own loop
    /// read (a request head begins them): they are read again first, and
    /// the heads hyper reads from here on are checked. hyper counts its
    /// requests from 0 for the check, and the scanner its heads from
    /// `rest`.
    fn hand_over(&mut self, rest: bytes::Bytes) {
        let mut scanner = Scanner::default();
        scanner.feed(&rest);
        if scanner.verdict().is_some() {
            self.heads.publish(&scanner);
        } else if !scanner.is_done() {
            self.scanner = Some(scanner);
        }
        self.rest = rest;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.rest.is_empty() {
            // Seen by the scanner already.
            let n = me.rest.len().min(buf.remaining());
            buf.put_slice(&me.rest.split_to(n));
            return Poll::Ready(Ok(()));
        }
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
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
