//! The rustls side of mesh identity: the credentials a process holds (its
//! certificate chain, key and trust anchors, swapped whole on renewal), and
//! the TLS configurations built on them — TLS 1.3 only, the ring provider
//! only, ALPN `h2` and `http/1.1`:
//!
//! - [`inbound_server`]: a sidecar's inbound listener, which requires a
//!   client certificate of the mesh and of its trust domain;
//! - [`peer_client`]: a sidecar calling a peer, which accepts only the
//!   peer's expected SPIFFE ID (names and addresses are not checked: the
//!   identity is);
//! - [`bootstrap_client`]: a new proxy reaching control with only its join
//!   token, which accepts control's certificate only under the root the
//!   token pins;
//! - [`control_server`]: control's TLS listener, which asks for a client
//!   certificate but lets a proxy without one call for its first.
//!
//! Every refusal carries a [`Rejection`] reason, for logs and metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::cert::{self, CertInfo};
use crate::spiffe::{SpiffeId, TrustDomain};

/// The process's one crypto provider: ring.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// ALPN the mesh offers and accepts.
pub fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// Why a handshake was refused: the label of the refusal metric and the
/// words of its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Plaintext on a port that takes only mTLS.
    Plaintext,
    /// A TLS client that sent no certificate.
    NoCertificate,
    /// A certificate not issued by the mesh CA.
    UnknownCa,
    /// Expired (or not yet valid).
    Expired,
    /// A certificate of another trust domain.
    TrustDomain,
    /// A peer whose SPIFFE ID is not the one expected.
    WrongIdentity,
    /// A certificate without a (single, valid) SPIFFE ID.
    NoSpiffeId,
    /// A control certificate not under the root the join token pins.
    PinMismatch,
    /// Anything else (protocol errors, a client that went away).
    Handshake,
}

impl Rejection {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Plaintext => "plaintext",
            Rejection::NoCertificate => "no_client_certificate",
            Rejection::UnknownCa => "unknown_ca",
            Rejection::Expired => "expired",
            Rejection::TrustDomain => "trust_domain",
            Rejection::WrongIdentity => "wrong_identity",
            Rejection::NoSpiffeId => "no_spiffe_id",
            Rejection::PinMismatch => "ca_pin_mismatch",
            Rejection::Handshake => "handshake",
        }
    }

    /// Every reason, for metrics that show zeros.
    pub const ALL: [Rejection; 9] = [
        Rejection::Plaintext,
        Rejection::NoCertificate,
        Rejection::UnknownCa,
        Rejection::Expired,
        Rejection::TrustDomain,
        Rejection::WrongIdentity,
        Rejection::NoSpiffeId,
        Rejection::PinMismatch,
        Rejection::Handshake,
    ];
}

/// A refusal of ours, carried through rustls as `CertificateError::Other`.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
struct Refused {
    kind: Rejection,
    why: String,
}

fn refuse(kind: Rejection, why: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused {
        kind,
        why,
    }))))
}

/// Classify a failed handshake.
pub fn rejection(e: &Error) -> Rejection {
    match e {
        Error::NoCertificatesPresented => Rejection::NoCertificate,
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                Rejection::UnknownCa
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => Rejection::Expired,
            CertificateError::Other(OtherError(o)) => o
                .downcast_ref::<Refused>()
                .map_or(Rejection::Handshake, |r| r.kind),
            _ => Rejection::Handshake,
        },
        Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
            Rejection::NoCertificate
        }
        Error::AlertReceived(
            rustls::AlertDescription::UnknownCA | rustls::AlertDescription::BadCertificate,
        ) => Rejection::UnknownCa,
        Error::AlertReceived(rustls::AlertDescription::CertificateExpired) => Rejection::Expired,
        _ => Rejection::Handshake,
    }
}

/// The rustls error inside an I/O error from a handshake, if any.
pub fn tls_error(e: &std::io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

/// What a process presents and trusts now.
#[derive(Debug)]
pub struct Current {
    /// Its certificate chain and key.
    pub certified: Arc<CertifiedKey>,
    /// Its leaf certificate, read.
    pub leaf: CertInfo,
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Trust anchors.
    pub roots: Arc<RootCertStore>,
    /// Verifies mesh clients against `roots` (client certificate required).
    required: Arc<dyn ClientCertVerifier>,
    /// The same, client certificate optional.
    optional: Arc<dyn ClientCertVerifier>,
}

/// Why credentials could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A certificate that could not be read.
    #[error(transparent)]
    Cert(#[from] cert::CertError),
    /// rustls refused the key or the roots.
    #[error("{0}")]
    Tls(String),
}

impl Current {
    /// Credentials from a chain (leaf first), its key and the trust anchors.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, CredentialsError> {
        let leaf = cert::info(chain.first().ok_or(cert::CertError::SpiffeIds(0))?)?;
        let id = leaf.id.clone().ok_or(cert::CertError::SpiffeIds(0))?;
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
            CredentialsError::Tls(format!("the key does not fit the certificate: {e}"))
        })?;
        let mut store = RootCertStore::empty();
        for r in roots {
            store
                .add(r.clone())
                .map_err(|e| CredentialsError::Tls(format!("a trust anchor is not usable: {e}")))?;
        }
        let roots = Arc::new(store);
        let build = |optional: bool| {
            let b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
            let b = if optional {
                b.allow_unauthenticated()
            } else {
                b
            };
            b.build()
                .map_err(|e| CredentialsError::Tls(format!("the trust anchors: {e}")))
        };
        Ok(Self {
            certified: Arc::new(certified),
            leaf,
            id,
            required: build(false)?,
            optional: build(true)?,
            roots,
        })
    }
}

/// A process's credentials, swapped whole on renewal: connections made
/// after a swap present the new certificate; open ones keep theirs.
#[derive(Debug)]
pub struct Credentials {
    current: ArcSwap<Current>,
    generation: AtomicU64,
}

impl Credentials {
    /// Credentials starting with `current`.
    pub fn new(current: Current) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(current),
            generation: AtomicU64::new(1),
        })
    }

    /// What it holds now.
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Install renewed credentials.
    pub fn replace(&self, current: Current) {
        self.current.store(Arc::new(current));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// +1 per renewal: a pooled connection made under an older generation
    /// presented a certificate that has since been replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Its trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        self.current.load().id.trust_domain().clone()
    }
}

/// Presents the current certificate, as server or client.
#[derive(Debug)]
struct Presenter(Arc<Credentials>);

impl rustls::server::ResolvesServerCert for Presenter {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for Presenter {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies clients against the current roots, then their SPIFFE ID's
/// trust domain.
#[derive(Debug)]
struct MeshClients {
    creds: Arc<Credentials>,
    mandatory: bool,
}

impl MeshClients {
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let current = self.creds.current.load();
        if self.mandatory {
            current.required.clone()
        } else {
            current.optional.clone()
        }
    }
}

/// A client's certificate must carry one SPIFFE ID, of `td`.
fn check_trust_domain(end_entity: &[u8], td: &TrustDomain) -> Result<SpiffeId, Error> {
    let id =
        cert::spiffe_id(end_entity).map_err(|e| refuse(Rejection::NoSpiffeId, e.to_string()))?;
    if id.trust_domain() != td {
        return Err(refuse(
            Rejection::TrustDomain,
            format!("{id} is of trust domain {}, not {td}", id.trust_domain()),
        ));
    }
    Ok(id)
}

impl ClientCertVerifier for MeshClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The peers of a mesh hold one certificate each; no hints needed.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)?;
        check_trust_domain(end_entity, &self.creds.trust_domain())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Who a server must be.
#[derive(Debug, Clone)]
enum Expect {
    /// Exactly this SPIFFE ID, under the current roots.
    Id(Arc<Credentials>, SpiffeId),
    /// Control (`spiffe://*/wasmesh/control`), under a root whose public
    /// key hashes to this pin, which the server must send in its chain.
    Pinned([u8; 32]),
}

#[derive(Debug)]
struct MeshServer(Expect);

fn parsed<'a>(der: &'a CertificateDer<'a>) -> Result<ParsedCertificate<'a>, Error> {
    ParsedCertificate::try_from(der)
}

impl ServerCertVerifier for MeshServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ee = parsed(end_entity)?;
        match &self.0 {
            Expect::Id(creds, expected) => {
                let roots = creds.current.load().roots.clone();
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &ee,
                    &roots,
                    intermediates,
                    now,
                    algorithms().all,
                )?;
                let id = cert::spiffe_id(end_entity)
                    .map_err(|e| refuse(Rejection::NoSpiffeId, e.to_string()))?;
                if &id != expected {
                    return Err(refuse(
                        Rejection::WrongIdentity,
                        format!("the peer is {id}, not {expected}"),
                    ));
                }
            }
            Expect::Pinned(pin) => {
                let anchor = intermediates
                    .iter()
                    .position(|c| cert::info(c).is_ok_and(|i| &i.spki_sha256 == pin))
                    .ok_or_else(|| {
                        refuse(
                            Rejection::PinMismatch,
                            format!(
                                "control's certificate is not under the CA the join token names (sha256 {}): a token of another mesh, or not control",
                                hex::encode(pin)
                            ),
                        )
                    })?;
                let mut roots = RootCertStore::empty();
                roots.add(intermediates[anchor].clone())?;
                let rest: Vec<CertificateDer<'_>> = intermediates
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != anchor)
                    .map(|(_, c)| c.clone())
                    .collect();
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &ee,
                    &roots,
                    &rest,
                    now,
                    algorithms().all,
                )?;
                let id = cert::spiffe_id(end_entity)
                    .map_err(|e| refuse(Rejection::NoSpiffeId, e.to_string()))?;
                if id != SpiffeId::control(id.trust_domain()) {
                    return Err(refuse(
                        Rejection::WrongIdentity,
                        format!("the server is {id}, not control"),
                    ));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn server_builder() -> rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier> {
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
}

fn client_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
}

/// A sidecar's inbound listener: mesh clients only (certificate required,
/// of this trust domain).
pub fn inbound_server(creds: &Arc<Credentials>) -> Arc<ServerConfig> {
    let mut c = server_builder()
        .with_client_cert_verifier(Arc::new(MeshClients {
            creds: creds.clone(),
            mandatory: true,
        }))
        .with_cert_resolver(Arc::new(Presenter(creds.clone())));
    c.alpn_protocols = alpn();
    Arc::new(c)
}

/// Control's TLS listener: presents control's certificate; a client
/// certificate is verified when sent (a proxy renewing, or streaming
/// discovery), not required (a proxy asking for its first).
pub fn control_server(creds: &Arc<Credentials>) -> Arc<ServerConfig> {
    let mut c = server_builder()
        .with_client_cert_verifier(Arc::new(MeshClients {
            creds: creds.clone(),
            mandatory: false,
        }))
        .with_cert_resolver(Arc::new(Presenter(creds.clone())));
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

/// A sidecar calling a peer that must be `expected`, presenting its own
/// certificate.
pub fn peer_client(creds: &Arc<Credentials>, expected: SpiffeId) -> Arc<ClientConfig> {
    let mut c = client_builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServer(Expect::Id(creds.clone(), expected))))
        .with_client_cert_resolver(Arc::new(Presenter(creds.clone())));
    c.alpn_protocols = alpn();
    Arc::new(c)
}

/// A proxy with credentials reaching control (mutual TLS).
pub fn control_client(creds: &Arc<Credentials>) -> Arc<ClientConfig> {
    let control = SpiffeId::control(&creds.trust_domain());
    let mut c = (*peer_client(creds, control)).clone();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

/// A new proxy reaching control with a join token: control must be under
/// the root the token pins; no client certificate yet.
pub fn bootstrap_client(pin: [u8; 32]) -> Arc<ClientConfig> {
    let mut c = client_builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServer(Expect::Pinned(pin))))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

/// The SPIFFE ID of a verified peer's leaf certificate.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    cert::spiffe_id(certs?.first()?).ok()
}

/// Seconds until `info` expires, negative once it has.
pub fn seconds_left(info: &CertInfo, now: SystemTime) -> f64 {
    match info.not_after.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
