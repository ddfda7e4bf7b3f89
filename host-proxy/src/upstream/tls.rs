//! Mesh mTLS to peers: an endpoint with an identity (a sidecar registered
//! with control by a proxy holding a certificate) is spoken to over TLS 1.3
//! with this proxy's certificate, and must present exactly the SPIFFE ID
//! the snapshot names for it — which is an identity of the service the
//! request was routed to. A refusal fails the connect (`503 UF`) and is
//! counted with its reason.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use foldhash::HashMap;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use wasmesh_api::SpiffeId;
use wasmesh_identity::tls::{self, Credentials, Rejection};

use crate::metrics::Metrics;

/// A client configuration and the credentials' generation it was made
/// under.
type Generational = (u64, Arc<ClientConfig>);

/// This proxy's side of mesh mTLS to peers.
pub struct MeshTls {
    creds: Arc<Credentials>,
    /// Client configurations by (peer identity, HTTP/2), with the
    /// credentials' generation they were made under. Each keeps its own
    /// TLS session cache, so reconnecting to a peer resumes — but never
    /// across a renewal: a resumed TLS 1.3 session carries the client
    /// certificate of the session it resumes, so a renewed proxy starts new
    /// sessions, which present its new certificate.
    configs: Mutex<HashMap<(SpiffeId, bool), Generational>>,
    metrics: Arc<Metrics>,
}

impl MeshTls {
    /// Connect to peers with `creds`.
    pub fn new(creds: Arc<Credentials>, metrics: Arc<Metrics>) -> Self {
        Self {
            creds,
            configs: Mutex::default(),
            metrics,
        }
    }

    /// The credentials' generation: connections made under an older one
    /// are not reused.
    pub fn generation(&self) -> u64 {
        self.creds.generation()
    }

    fn config(&self, peer: &SpiffeId, h2: bool) -> Arc<ClientConfig> {
        let generation = self.creds.generation();
        let key = (peer.clone(), h2);
        let mut configs = self.configs.lock().unwrap();
        if let Some((made, c)) = configs.get(&key)
            && *made == generation
        {
            return c.clone();
        }
        let mut c = (*tls::peer_client(&self.creds, peer.clone())).clone();
        c.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let c = Arc::new(c);
        configs.insert(key, (generation, c.clone()));
        c
    }

    /// The TLS handshake on a connected `stream` to a peer that must be
    /// `peer`, offering `h2` or `http/1.1`.
    pub async fn connect(
        &self,
        stream: TcpStream,
        peer: &SpiffeId,
        h2: bool,
    ) -> io::Result<MaybeTls> {
        let ip = stream.peer_addr()?.ip();
        let connector = tokio_rustls::TlsConnector::from(self.config(peer, h2));
        match connector
            .connect(ServerName::IpAddress(ip.into()), stream)
            .await
        {
            Ok(s) => Ok(MaybeTls::Tls(Box::new(s))),
            Err(e) => {
                let reason = tls::tls_error(&e).map_or(Rejection::Handshake, tls::rejection);
                self.metrics.tls_refused("outbound", reason.label());
                tracing::info!(%peer, reason = reason.label(), "mesh TLS to a peer failed: {e}");
                Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("mesh TLS to {peer} failed ({}): {e}", reason.label()),
                ))
            }
        }
    }
}

/// An upstream stream: plaintext, or mesh TLS.
pub enum MaybeTls {
    /// Plaintext.
    Plain(TcpStream),
    /// Mesh mTLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
