//! The upstream connector: hyper-util's `HttpConnector` with a cap on open
//! connections per endpoint (`upstream.max-connections-per-endpoint`).
//! Past the cap a connect fails at once with [`ConnectionLimit`], which the
//! proxy answers `503 UO`, as Envoy's circuit breaker does — never a queue.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A connect refused because the endpoint has its maximum of open
/// connections.
#[derive(Debug, thiserror::Error)]
#[error(
    "{endpoint} has {limit} open connections, the most upstream.max-connections-per-endpoint allows"
)]
pub struct ConnectionLimit {
    endpoint: String,
    limit: usize,
}

/// `HttpConnector` with a per-endpoint connection cap.
#[derive(Clone)]
pub struct LimitedConnector {
    inner: HttpConnector,
    limit: usize,
    open: Arc<Mutex<HashMap<String, Arc<AtomicUsize>>>>,
}

impl LimitedConnector {
    /// Wrap `inner`, allowing `limit` open connections per endpoint.
    pub fn new(inner: HttpConnector, limit: usize) -> Self {
        Self {
            inner,
            limit,
            open: Arc::default(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for LimitedConnector {
    type Response = Counted;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Counted, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let endpoint = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let count = self
            .open
            .lock()
            .unwrap()
            .entry(endpoint.clone())
            .or_default()
            .clone();
        let slot = match take_slot(&count, self.limit, &endpoint) {
            Ok(slot) => slot,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(Counted { io, _slot: slot })
        })
    }
}

/// One open connection's place under the cap.
pub(crate) struct Slot(Arc<AtomicUsize>);

/// Take a place under `limit` in `count` before connecting (so concurrent
/// connects cannot overshoot the cap), or say why not.
pub(crate) fn take_slot(
    count: &Arc<AtomicUsize>,
    limit: usize,
    endpoint: &str,
) -> Result<Slot, ConnectionLimit> {
    if count.fetch_add(1, Ordering::AcqRel) >= limit {
        count.fetch_sub(1, Ordering::AcqRel);
        return Err(ConnectionLimit {
            endpoint: endpoint.to_string(),
            limit,
        });
    }
    Ok(Slot(count.clone()))
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upstream connection, counted until it closes.
pub struct Counted {
    io: TokioIo<TcpStream>,
    _slot: Slot,
}

impl Counted {
    /// `io`, holding `slot` until it closes.
    pub(crate) fn new(io: TokioIo<TcpStream>, slot: Slot) -> Self {
        Self { io, _slot: slot }
    }
}

impl Connection for Counted {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
