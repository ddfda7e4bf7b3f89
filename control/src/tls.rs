//! Control's TLS listener (`--listen-tls`): the same gRPC services as the
//! plaintext one, for proxies with identities. A connection that presents
//! a mesh certificate is a proxy of the service it names (control takes a
//! proxy's identity from here, never from what it says); one without may
//! only ask for its first certificate with a join token, or use the admin
//! credential.
//!
//! Handshakes run off the accept loop, each bounded, so a client that
//! stalls holds nothing but its own task.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use wasmesh_identity::SpiffeId;
use wasmesh_identity::tls::{self, Rejection};

use crate::metrics::Metrics;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A verified client certificate.
#[derive(Clone, Debug)]
pub struct PeerCert {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Its end of validity.
    pub not_after: SystemTime,
}

/// What a request on the TLS listener carries about its connection.
#[derive(Clone, Debug)]
pub struct TlsInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// Its certificate, when it sent one (verified against the mesh CA).
    pub peer: Option<PeerCert>,
}

/// How a request reached control.
#[derive(Clone, Debug)]
pub enum Transport {
    /// The plaintext listener (loopback unless `--insecure`).
    Plain,
    /// The TLS listener.
    Tls(TlsInfo),
}

impl Transport {
    /// The transport of `req`.
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        match req.extensions().get::<TlsInfo>() {
            Some(info) => Transport::Tls(info.clone()),
            None => Transport::Plain,
        }
    }

    /// The verified client certificate, if any.
    pub fn peer(&self) -> Option<&PeerCert> {
        match self {
            Transport::Tls(info) => info.peer.as_ref(),
            Transport::Plain => None,
        }
    }
}

/// One accepted TLS connection.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: TlsInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TlsInfo;
    fn connect_info(&self) -> TlsInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accept TLS connections on `listener` for as long as the returned
/// stream is read.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Arc<Metrics>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("control TLS accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let reason =
                            tls::tls_error(&e).map_or(Rejection::Handshake, tls::rejection);
                        metrics.tls_refused(reason);
                        tracing::info!(%remote, reason = reason.label(), "refused a TLS client: {e}");
                        return;
                    }
                    Err(_) => {
                        metrics.tls_refused(Rejection::Handshake);
                        tracing::info!(%remote, "refused a TLS client: no handshake within {HANDSHAKE_TIMEOUT:?}");
                        return;
                    }
                };
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|leaf| wasmesh_identity::cert::info(leaf).ok())
                    .and_then(|info| {
                        Some(PeerCert {
                            id: info.id?,
                            not_after: info.not_after,
                        })
                    });
                let _ = tx
                    .send(Ok(TlsConn {
                        stream,
                        info: TlsInfo { remote, peer },
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
