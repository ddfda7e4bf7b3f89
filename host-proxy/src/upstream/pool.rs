//! HTTP/1.1 upstream connections, pooled per endpoint in the endpoint's live
//! state ([`super::cluster::EndpointState`]).
//!
//! hyper-util's pooled client keys one shared pool by (scheme, authority),
//! hashing that key twice a request and boxing its futures; here the
//! request already knows its endpoint, so a checkout is a short scan of
//! that endpoint's own list. HTTP/2 upstreams keep hyper-util's client
//! (one multiplexed connection needs no such list).
//!
//! The rules are the ones the proxy had with hyper-util: at most
//! `upstream.max-connections-per-endpoint` open connections (past it a
//! request fails at once, `503 UO`), at most `max-idle-per-endpoint` kept,
//! idle ones closed after `idle-timeout`, and a request that a pooled
//! connection closed before sending is sent again on another one. (One it
//! wrote just as the upstream closed that connection is reported as
//! `reused`; the proxy sends it again when its method is idempotent.)
//!
//! A mesh (mTLS) connection is not reused once this proxy's certificate
//! has been renewed: the next request opens a connection that presents the
//! new one, and the old connection closes when its response is done.
//!
//! A request without a body that asks for no upgrade goes out on the
//! proxy's own HTTP/1.1 exchange ([`super::h1`]) instead of hyper's
//! client: the same pool holds both kinds of connection, under the same
//! limits, and each request takes a connection of its own kind.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::UpstreamSettings;
use super::cluster::Endpoint;
use super::connector::{ConnectionLimit, Counted, Slot, take_slot};
use super::h1::{ExchangeError, H1Body, H1Conn, Head, Home};
use super::tls::{MaybeTls, MeshTls};
use crate::http::{BoxError, ProxyBody};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};

/// One endpoint's HTTP/1.1 connections.
#[derive(Default)]
pub struct H1Conns {
    /// Connections handed back after a response head, each with the time it
    /// was and the credentials' generation it was made under (0:
    /// plaintext); a connection still streaming that response is not ready
    /// yet.
    idle: Mutex<Vec<Pooled>>,
    /// Open connections, idle or not.
    open: Arc<AtomicUsize>,
}

impl fmt::Debug for H1Conns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Conns")
            .field("pooled", &self.idle.lock().map(|v| v.len()).unwrap_or(0))
            .field("open", &self.open)
            .finish()
    }
}

/// A pooled connection, with since when it is idle: hyper's (its sender
/// and the credentials' generation it was made under), or the proxy's own
/// (which knows its generation).
enum Pooled {
    Hyper(SendRequest<ProxyBody>, Instant, u64),
    Own(Box<H1Conn>, Instant),
}

impl H1Conns {
    /// Keep a connection whose response has been read, idle since `since`,
    /// unless `max_idle` are kept already (then it closes).
    pub(crate) fn put_conn(&self, conn: Box<H1Conn>, since: Instant, max_idle: usize) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < max_idle {
            idle.push(Pooled::Own(conn, since));
        }
    }

    /// One of the proxy's own connections, made under `generation`, not
    /// expired by `now` and not closed by the upstream; closed, expired and
    /// superseded ones are dropped on the way.
    fn take_conn(
        &self,
        generation: u64,
        now: Instant,
        idle_timeout: Duration,
    ) -> Option<Box<H1Conn>> {
        let mut idle = self.idle.lock().unwrap();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let Pooled::Own(conn, since) = &mut idle[i] else {
                continue;
            };
            if now.duration_since(*since) > idle_timeout
                || conn.generation != generation
                || conn.is_closed()
            {
                idle.swap_remove(i);
            } else if let Pooled::Own(conn, _) = idle.swap_remove(i) {
                return Some(conn);
            }
        }
        None
    }
}

/// Why an upstream request got no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// The endpoint has its maximum of open connections.
    Limit(ConnectionLimit),
    /// No connection could be made.
    Connect(std::io::Error),
    /// The connection failed before a response head came back.
    Http {
        /// What failed.
        error: BoxError,
        /// The connection had served requests before: it may have been one
        /// the upstream was closing as the request went out.
        reused: bool,
    },
}

/// The pool's settings, fixed at start like hyper-util's client was.
pub struct H1Pool {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    max_open: usize,
    /// Mesh mTLS to endpoints with identities.
    tls: Option<Arc<MeshTls>>,
}

impl H1Pool {
    /// A pool with the proxy's `upstream` settings; mesh endpoints over
    /// `tls`.
    pub fn new(s: &UpstreamSettings, tls: Option<Arc<MeshTls>>) -> Self {
        Self {
            connect_timeout: s.connect_timeout,
            idle_timeout: s.idle_timeout,
            max_idle: s.max_idle_per_endpoint,
            max_open: s.max_connections_per_endpoint,
            tls,
        }
    }

    /// Send `req` (origin-form URI) to `ep` on a pooled connection or a new
    /// one. `now` is when the attempt began (read once per attempt by the
    /// caller): idle connections are judged by it, and the one that carries
    /// this request counts as idle since then when it goes back to the
    /// pool — earlier than its response, so it expires no later than it
    /// should.
    pub async fn send(
        &self,
        ep: &Endpoint,
        mut req: Request<ProxyBody>,
        now: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let conns = &ep.state.h1;
        let generation = match (&ep.identity, &self.tls) {
            (Some(_), Some(tls)) => tls.generation(),
            _ => 0,
        };
        let mut resent = 0;
        loop {
            let (mut tx, pooled) = match self.take(conns, generation, now) {
                Some(tx) => (tx, true),
                // Boxed: the connect future (TCP, then TLS for mesh
                // endpoints) is large and rarely needed; inline, its size
                // was moved with every request's future.
                None => (Box::pin(self.connect(ep)).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    self.put(conns, tx, generation, now);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Never written: a pooled connection the upstream had
                    // closed meanwhile. Another connection gets it.
                    Some(back) if pooled && resent < 3 => {
                        resent += 1;
                        req = back;
                    }
                    _ => {
                        return Err(UpstreamError::Http {
                            error: e.into_error().into(),
                            reused: pooled,
                        });
                    }
                },
            }
        }
    }

    /// Send a request without a body on one of the proxy's own connections
    /// to `ep` ([`super::h1`]), pooled or new, its response made in `out`;
    /// `now` as for [`H1Pool::send`]. The response's body puts its
    /// connection back.
    pub async fn send_own<B: From<H1Body>>(
        &self,
        ep: &Endpoint,
        req: &Head<'_>,
        now: Instant,
        out: &mut Option<Response<B>>,
    ) -> Result<(), UpstreamError> {
        let conns = &ep.state.h1;
        let generation = match (&ep.identity, &self.tls) {
            (Some(_), Some(tls)) => tls.generation(),
            _ => 0,
        };
        let mut resent = 0;
        loop {
            let (conn, pooled) = match conns.take_conn(generation, now, self.idle_timeout) {
                Some(conn) => (conn, true),
                None => {
                    let (io, slot) = Box::pin(self.open(ep)).await?;
                    (Box::new(H1Conn::new(io, slot, generation)), false)
                }
            };
            let home = Home {
                state: ep.state.clone(),
                max_idle: self.max_idle,
                since: now,
            };
            match conn.exchange(req, home, out).await {
                Ok(()) => return Ok(()),
                // Not written whole: a pooled connection the upstream had
                // closed meanwhile. Another connection gets it.
                Err(ExchangeError::Unwritten(_)) if pooled && resent < 3 => resent += 1,
                Err(e) => {
                    return Err(UpstreamError::Http {
                        error: e.to_string().into(),
                        reused: pooled,
                    });
                }
            }
        }
    }

    /// Close the idle connections that have been idle past `idle-timeout`
    /// and forget closed ones (run periodically, so an endpoint that gets no
    /// more requests does not keep upstream sockets open).
    pub fn sweep(&self, conns: &H1Conns) {
        let now = Instant::now();
        conns.idle.lock().unwrap().retain_mut(|p| match p {
            Pooled::Hyper(tx, since, _) => {
                !(tx.is_closed() || tx.is_ready() && now.duration_since(*since) > self.idle_timeout)
            }
            Pooled::Own(conn, since) => {
                !(conn.is_closed() || now.duration_since(*since) > self.idle_timeout)
            }
        });
    }

    /// How often [`H1Pool::sweep`] should run.
    pub fn sweep_every(&self) -> Duration {
        (self.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// A pooled connection ready for a request, if any; closed, expired
    /// and superseded (made under an older `generation` of credentials)
    /// ones are dropped on the way.
    fn take(
        &self,
        conns: &H1Conns,
        generation: u64,
        now: Instant,
    ) -> Option<SendRequest<ProxyBody>> {
        let mut idle = conns.idle.lock().unwrap();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let Pooled::Hyper(tx, since, made) = &idle[i] else {
                continue;
            };
            if tx.is_closed()
                || now.duration_since(*since) > self.idle_timeout
                || *made != generation
            {
                idle.swap_remove(i);
            } else if tx.is_ready()
                && let Pooled::Hyper(tx, ..) = idle.swap_remove(i)
            {
                return Some(tx);
            }
        }
        None
    }

    /// Keep a connection for later requests (it becomes ready once the
    /// response it carries has been read); past `max_idle`, it closes once
    /// that response is done.
    fn put(&self, conns: &H1Conns, tx: SendRequest<ProxyBody>, generation: u64, since: Instant) {
        if tx.is_closed() {
            return;
        }
        let mut idle = conns.idle.lock().unwrap();
        if idle.len() < self.max_idle {
            idle.push(Pooled::Hyper(tx, since, generation));
        }
    }

    async fn connect(&self, ep: &Endpoint) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let (stream, slot) = self.open(ep).await?;
        let (tx, conn) = http1::handshake(Counted::new(stream, slot))
            .await
            .map_err(|error| UpstreamError::Http {
                error: error.into(),
                reused: false,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(tx)
    }

    /// A new connection to `ep` (TCP, then mesh TLS if it has an
    /// identity), counted against its open connections.
    async fn open(&self, ep: &Endpoint) -> Result<(MaybeTls, Slot), UpstreamError> {
        let slot = take_slot(&ep.state.h1.open, self.max_open, &ep.address)
            .map_err(UpstreamError::Limit)?;
        let connect = async {
            let stream = tokio::net::TcpStream::connect(ep.socket).await?;
            let _ = stream.set_nodelay(true);
            match (&ep.identity, &self.tls) {
                (Some(id), Some(tls)) => tls.connect(stream, id, false).await,
                _ => Ok(MaybeTls::Plain(stream)),
            }
        };
        let stream = crate::timer::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                UpstreamError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                ))
            })?
            .map_err(UpstreamError::Connect)?;
        Ok((stream, slot))
    }
}
