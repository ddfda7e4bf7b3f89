//! The proxy's mesh identity: a certificate from control's CA for
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
//!
//! The first one is asked for with a join token, over TLS to control whose
//! certificate must chain to the root the token pins (so the proxy sends
//! nothing to an impostor); the private key is made here and never leaves
//! the proxy (control gets a CSR). Renewals go over mutual TLS with the
//! current certificate, at a random point between 50% and 70% of its
//! remaining life, retried with backoff while control is away — the proxy
//! keeps serving on its current certificate until it really expires. With
//! a cache directory the certificate and key are kept there (key mode 600),
//! so a restart while control is away still has an identity.
//!
//! Depends on [`crate::metrics`] and the `wasmesh-identity` crate; the
//! listeners and upstream clients read the [`Credentials`] it keeps current.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use wasmesh_api::proto;
use wasmesh_api::proto::identity_client::IdentityClient;
use wasmesh_identity::KeyAndCsr;
use wasmesh_identity::cert;
use wasmesh_identity::tls::{self, Credentials, Current, Rejection};
use wasmesh_identity::token::JoinToken;

use crate::metrics::Metrics;

/// Connect to control at one of `urls` (comma-separated): plaintext, or
/// TLS with `tls`.
pub async fn connect(
    urls: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Channel, tonic::transport::Error> {
    // Control's replicas, `--control URL[,URL…]`: a proxy starts at a random
    // one (a fleet spreads over them), stays on the one that answers, and
    // moves on to the next when it does not.
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PREFERRED: AtomicUsize = AtomicUsize::new(usize::MAX);
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let n = list.len().max(1);
    let _ = PREFERRED.compare_exchange(
        usize::MAX,
        fastrand::usize(..n),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let start = PREFERRED.load(Ordering::Relaxed) % n;
    let mut last = None;
    for i in 0..n {
        let at = (start + i) % n;
        match connect_one(list.get(at).copied().unwrap_or(urls), tls.clone()).await {
            Ok(c) => {
                PREFERRED.store(at, Ordering::Relaxed);
                return Ok(c);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

async fn connect_one(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Channel, tonic::transport::Error> {
    // With our own TLS below, tonic is given the address as http://: its own
    // TLS (compiled in when another crate of the tree asks for it) would
    // otherwise take an https:// address for one it must secure itself.
    let address = match (&tls, url.strip_prefix("https://")) {
        (Some(_), Some(rest)) => format!("http://{rest}"),
        _ => url.to_string(),
    };
    let endpoint = Endpoint::from_shared(address)?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let Some(config) = tls else {
        return endpoint.connect().await;
    };
    let connector = tower::service_fn(move |uri: Uri| {
        let config = config.clone();
        async move {
            let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    endpoint.connect_with_connector(connector).await
}

/// Why a TLS connection to control failed, if it was refused at the
/// handshake.
pub fn rejection(e: &(dyn std::error::Error + 'static)) -> Option<Rejection> {
    std::iter::successors(Some(e), |err| err.source()).find_map(|err| {
        err.downcast_ref::<rustls::Error>()
            .map(tls::rejection)
            .or_else(|| {
                err.downcast_ref::<io::Error>()
                    .and_then(tls::tls_error)
                    .map(tls::rejection)
            })
    })
}

/// Where the proxy's identity comes from.
#[derive(Clone, Debug)]
pub struct IdentityOptions {
    /// The join token's text (from `--token-file` or `WASMESH_TOKEN`).
    pub token: Option<String>,
    /// Keep the certificate and key here (`DIR/identity`).
    pub cache: Option<PathBuf>,
}

/// The proxy's certificate, kept current.
pub struct Identity {
    creds: Arc<Credentials>,
    /// The join token, for a new certificate should this one expire.
    token: Option<JoinToken>,
    url: String,
    service: String,
    cache: Option<PathBuf>,
    metrics: Arc<Metrics>,
    changed: tokio::sync::watch::Sender<proto::CertificateStatus>,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn status(c: &Current) -> proto::CertificateStatus {
    proto::CertificateStatus {
        spiffe_id: c.id.to_string(),
        expires_at_ms: ms(c.leaf.not_after),
    }
}

impl Identity {
    /// The proxy's identity: the cached certificate if it is still good
    /// and for `service`, else a new one for the join token, asked of
    /// control at `url` (waiting for control while it is unreachable; a
    /// refusal is final).
    pub async fn obtain(
        options: &IdentityOptions,
        url: &str,
        service: &str,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(
            url.starts_with("https://"),
            "--control {url}: a proxy with a join token reaches control over TLS: give its TLS listener, https://HOST:PORT (default port 15012)"
        );
        let cache = options.cache.as_ref().map(|d| d.join("identity"));
        let token: Option<JoinToken> = options.token.as_deref().map(str::parse).transpose()?;
        let current = match cache.as_deref().and_then(|d| cached(d, service)) {
            Some(c) => c,
            None => {
                let token = token.as_ref().context(
                    "this proxy has no certificate yet: give it a join token with --token-file FILE or WASMESH_TOKEN (`wasmesh token create --service SERVICE` prints one)",
                )?;
                let c = first_certificate(url, service, token).await?;
                let (chain, key, roots) = c;
                if let Some(d) = &cache {
                    keep(d, &chain, &key, &roots);
                }
                Current::new(chain, key, &roots)?
            }
        };
        tracing::info!(
            id = %current.id,
            expires_in_s = current.leaf.expires_in(SystemTime::now()).as_secs(),
            "mesh identity ready"
        );
        let (changed, _) = tokio::sync::watch::channel(status(&current));
        let me = Arc::new(Self {
            creds: Credentials::new(current),
            token,
            url: url.to_string(),
            service: service.to_string(),
            cache,
            metrics,
            changed,
        });
        me.publish();
        Ok(me)
    }

    /// The credentials listeners and clients present.
    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.creds
    }

    /// The certificate now, as control's status shows it.
    pub fn status(&self) -> proto::CertificateStatus {
        status(&self.creds.current())
    }

    /// Changes with every renewal.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<proto::CertificateStatus> {
        self.changed.subscribe()
    }

    fn publish(&self) {
        let current = self.creds.current();
        let expiry = current
            .leaf
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.identity_expiry.set(expiry);
        self.changed.send_replace(status(&current));
    }

    /// Renew before expiry, for the life of the proxy.
    pub async fn renew(self: Arc<Self>) {
        loop {
            let current = self.creds.current();
            let left = current.leaf.expires_in(SystemTime::now());
            // Between 50% and 70% of what is left: a fleet does not renew
            // in step, and a failed attempt leaves time for retries.
            let wait = left.mul_f64(0.5 + fastrand::f64() * 0.2);
            crate::timer::sleep(wait).await;
            let mut backoff = Duration::from_millis(500);
            loop {
                match self.renew_once().await {
                    Ok((chain, key, roots)) => {
                        if let Some(d) = &self.cache {
                            keep(d, &chain, &key, &roots);
                        }
                        let Ok(current) = Current::new(chain, key, &roots) else {
                            tracing::error!("control sent a certificate that does not fit the key");
                            continue;
                        };
                        tracing::info!(
                            id = %current.id,
                            expires_in_s = current.leaf.expires_in(SystemTime::now()).as_secs(),
                            "certificate renewed"
                        );
                        self.creds.replace(current);
                        self.metrics
                            .identity_renewals
                            .get_or_create(&vec![("result", "renewed".to_string())])
                            .inc();
                        self.publish();
                        break;
                    }
                    Err(e) => {
                        self.metrics
                            .identity_renewals
                            .get_or_create(&vec![("result", "failed".to_string())])
                            .inc();
                        let left = self.creds.current().leaf.expires_in(SystemTime::now());
                        tracing::warn!(
                            "certificate renewal failed: {e:#}; serving on the current certificate, which expires in {}s",
                            left.as_secs()
                        );
                        let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                        crate::timer::sleep(pause).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    }

    /// One renewal: over mutual TLS with the current certificate; once
    /// that has expired (control no longer accepts it), with the join
    /// token again, if the proxy has one.
    async fn renew_once(&self) -> anyhow::Result<Material> {
        let expired = self
            .creds
            .current()
            .leaf
            .expires_in(SystemTime::now())
            .is_zero();
        if !expired {
            let config = tls::control_client(&self.creds);
            return sign_once(&self.url, config, None, &self.service)
                .await
                .map_err(Into::into);
        }
        let Some(token) = &self.token else {
            anyhow::bail!(
                "the certificate has expired, so control no longer renews it: restart the proxy with a new join token"
            );
        };
        let config = tls::bootstrap_client(token.pin);
        sign_once(&self.url, config, Some(token), &self.service)
            .await
            .map_err(Into::into)
    }
}

/// Why a signing request failed.
#[derive(Debug, thiserror::Error)]
enum SignError {
    /// Control could not be reached (or went away): worth retrying.
    #[error("control is unreachable: {0}")]
    Unreachable(String),
    /// The TLS handshake refused control's certificate.
    #[error("refusing control ({reason}): {why}; check that the join token comes from this control", reason = .0.label(), why = .1)]
    NotControl(Rejection, String),
    /// Control refused.
    #[error("control refused a certificate: {0}")]
    Refused(String),
    /// Control's answer is unusable.
    #[error("{0}")]
    Bad(String),
}

/// Ask control at `url` (TLS per `config`) to sign a fresh key's CSR: with
/// `token` for a first certificate, or as a renewal for the client
/// certificate `config` presents.
async fn sign_once(
    url: &str,
    config: Arc<rustls::ClientConfig>,
    token: Option<&JoinToken>,
    service: &str,
) -> Result<Material, SignError> {
    let channel = connect(url, Some(config))
        .await
        .map_err(|e| match rejection(&e) {
            Some(
                r @ (Rejection::PinMismatch | Rejection::WrongIdentity | Rejection::UnknownCa),
            ) => SignError::NotControl(r, format!("{e:#}")),
            _ => SignError::Unreachable(format!("{e:#}")),
        })?;
    let kc = KeyAndCsr::generate().map_err(|e| SignError::Bad(format!("generating a key: {e}")))?;
    let reply = IdentityClient::new(channel)
        .sign(proto::SignRequest {
            token: token.map(JoinToken::reveal).unwrap_or_default(),
            csr_der: kc.csr.clone(),
            service: service.to_string(),
            namespace: String::new(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable => SignError::Unreachable(s.message().to_string()),
            _ => SignError::Refused(s.message().to_string()),
        })?
        .into_inner();
    let (chain, roots) = parse_reply(&reply).map_err(|e| SignError::Bad(format!("{e:#}")))?;
    Ok((chain, kc.key, roots))
}

type Material = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
);

fn parse_reply(
    reply: &proto::SignResponse,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
)> {
    let chain = cert::certs_from_pem(&reply.certificate_chain_pem, "control's certificate")?;
    let roots = cert::certs_from_pem(&reply.trust_bundle_pem, "control's trust bundle")?;
    Ok((chain, roots))
}

/// Ask control for a first certificate with `token`, waiting (with
/// backoff) while control is unreachable. A refusal — by control, or of
/// control's certificate — is final.
async fn first_certificate(
    url: &str,
    service: &str,
    token: &JoinToken,
) -> anyhow::Result<Material> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match sign_once(url, tls::bootstrap_client(token.pin), Some(token), service).await {
            Ok(m) => return Ok(m),
            Err(SignError::Unreachable(e)) => {
                tracing::warn!(%url, "control is unreachable: {e}; trying again");
            }
            Err(e) => anyhow::bail!("{url}: {e}"),
        }
        crate::timer::sleep(backoff.mul_f64(0.5 + fastrand::f64() * 0.5)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

const CHAIN: &str = "chain.pem";
const KEY: &str = "key.pem";
const BUNDLE: &str = "bundle.pem";

/// The cached certificate, if it is still valid and for `service`.
fn cached(dir: &Path, service: &str) -> Option<Current> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let chain = cert::certs_from_pem(&read(CHAIN)?, "the cached certificate").ok()?;
    let key = cert::key_from_pem(&read(KEY)?, "the cached key").ok()?;
    let roots = cert::certs_from_pem(&read(BUNDLE)?, "the cached bundle").ok()?;
    let current = match Current::new(chain, key, &roots) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "the cached certificate is unusable: {e}");
            return None;
        }
    };
    if current.id.service() != Some(service) {
        tracing::warn!(id = %current.id, "the cached certificate is for another service; asking for a new one");
        return None;
    }
    if current.leaf.expires_in(SystemTime::now()).is_zero() {
        tracing::info!(id = %current.id, "the cached certificate has expired; asking for a new one");
        return None;
    }
    Some(current)
}

/// Keep the certificate, key (mode 600) and bundle in `dir`.
fn keep(
    dir: &Path,
    chain: &[rustls::pki_types::CertificateDer<'_>],
    key: &rustls::pki_types::PrivateKeyDer<'_>,
    roots: &[rustls::pki_types::CertificateDer<'_>],
) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let write = |name: &str, text: &str, mode: u32| -> io::Result<()> {
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, dir.join(name))
    };
    let kept = std::fs::create_dir_all(dir)
        .and_then(|()| {
            write(
                KEY,
                &cert::pem_block("PRIVATE KEY", key.secret_der()),
                0o600,
            )
        })
        .and_then(|()| write(CHAIN, &cert::certs_to_pem(chain), 0o644))
        .and_then(|()| write(BUNDLE, &cert::certs_to_pem(roots), 0o644));
    if let Err(e) = kept {
        tracing::warn!(dir = %dir.display(), "could not keep the certificate: {e}");
    }
}
