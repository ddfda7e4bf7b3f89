//! The upstream connector: hyper-util's `HttpConnector` with a cap on open
//! connections per endpoint (`upstream.max-connections-per-endpoint`), and
//! mesh mTLS for `https` URIs (mesh endpoints, whose identity the endpoint
//! table knows). Past the cap a connect fails at once with
//! [`ConnectionLimit`], which the proxy answers `503 UO`, as Envoy's
//! circuit breaker does — never a queue.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;

use super::cluster::EndpointTable;
use super::tls::{MaybeTls, MeshTls};

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

/// `HttpConnector` with a per-endpoint connection cap, and mesh mTLS.
#[derive(Clone)]
pub struct LimitedConnector {
    inner: HttpConnector,
    limit: usize,
    /// How long a connection (TCP, then TLS to a mesh endpoint) may take.
    connect_timeout: Duration,
    open: Arc<Mutex<HashMap<String, Arc<AtomicUsize>>>>,
    tls: Option<Arc<MeshTls>>,
    table: Arc<EndpointTable>,
}

impl LimitedConnector {
    /// Wrap `inner`, allowing `limit` open connections per endpoint, each
    /// made within `connect_timeout`; mesh endpoints (`https`, identities
    /// from `table`) over `tls`.
    pub fn new(
        mut inner: HttpConnector,
        (limit, connect_timeout): (usize, Duration),
        tls: Option<Arc<MeshTls>>,
        table: Arc<EndpointTable>,
    ) -> Self {
        inner.enforce_http(false);
        Self {
            inner,
            limit,
            connect_timeout,
            open: Arc::default(),
            tls,
            table,
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
        let mesh = match (uri.scheme_str(), &self.tls) {
            (Some("https"), Some(tls)) => match self.table.identity_of(&endpoint) {
                Some(id) => Some((tls.clone(), id)),
                None => {
                    let e = format!("{endpoint} has no known mesh identity");
                    return Box::pin(async move { Err(e.into()) });
                }
            },
            _ => None,
        };
        let connecting = self.inner.call(uri);
        let limit = self.connect_timeout;
        let connect = crate::timer::timeout(limit, async move {
            let tcp = connecting.await?.into_inner();
            match mesh {
                Some((tls, id)) => Ok::<_, BoxError>(tls.connect(tcp, &id, true).await?),
                None => Ok(MaybeTls::Plain(tcp)),
            }
        });
        Box::pin(async move {
            let io = connect.await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {limit:?}"),
                )
            })??;
            Ok(Counted {
                io: TokioIo::new(io),
                _slot: slot,
            })
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
    io: TokioIo<MaybeTls>,
    _slot: Slot,
}

impl Counted {
    /// `io`, holding `slot` until it closes.
    pub(crate) fn new(io: MaybeTls, slot: Slot) -> Self {
        Self {
            io: TokioIo::new(io),
            _slot: slot,
        }
    }
}

impl Connection for Counted {
    fn connected(&self) -> Connected {
        match self.io.inner() {
            MaybeTls::Plain(s) => s.connected(),
            MaybeTls::Tls(s) => {
                let c = s.get_ref().0.connected();
                if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                    c.negotiated_h2()
                } else {
                    c
                }
            }
        }
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
