//! Mesh identity in control: the CA (generated at first start and kept in
//! the store, or the operator's intermediate from files), control's own
//! TLS certificate (issued by that CA, renewed at half-life), join tokens,
//! and the `Identity` gRPC service that signs proxies' CSRs.
//!
//! What proves the service a new proxy may speak for is an [`Attestor`]:
//! [`JoinTokens`] here; a Kubernetes service-account token would be another
//! (a TokenReview in place of the store lookup), and nothing after that
//! step would change.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tonic::{Request, Response, Status};
use wasmesh_api::proto;
use wasmesh_api::{ServiceName, SpiffeId, TrustDomain};
use wasmesh_identity::ca::{Authority, CaMaterial, Csr};
use wasmesh_identity::tls::{Credentials, Current};
use wasmesh_identity::token::JoinToken;

use crate::auth::{Access, Auth};
use crate::metrics::Metrics;
use crate::store::{CaRecord, Store, TokenRecord, TokenRefusal};
use crate::tls::Transport;

/// The operator's CA, from files.
#[derive(Clone, Debug)]
pub struct CaFiles {
    /// The CA certificate (and intermediates up to the root), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The root(s) it chains to, PEM.
    pub root: PathBuf,
}

/// How control runs its CA.
#[derive(Clone, Debug)]
pub struct IdentityOptions {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The operator's CA; `None`: generate one at first start.
    pub ca_files: Option<CaFiles>,
    /// Lifetime of proxies' certificates.
    pub cert_ttl: Duration,
    /// DNS names control's certificate carries (besides its SPIFFE ID).
    pub server_names: Vec<String>,
    /// IP addresses it carries.
    pub server_ips: Vec<IpAddr>,
}

/// Default lifetime of a proxy certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a join token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of control's own certificate (renewed at half).
const SERVER_TTL: Duration = Duration::from_secs(24 * 3600);

/// A refused credential: the metric's reason label and the words for the
/// proxy.
#[derive(Debug)]
pub struct Refused {
    /// The `reason` label.
    pub reason: &'static str,
    /// What the proxy is told (and control logs).
    pub message: String,
}

/// Decides, from a credential a new proxy presents, which workload it may
/// be: (namespace, service).
pub trait Attestor: Send + Sync {
    /// The workload `credential` grants a proxy that asks to be `service`
    /// (in `namespace`, or the credential's), taking one use of it.
    fn attest(
        &self,
        credential: &str,
        service: &str,
        namespace: Option<&str>,
    ) -> Result<(String, String), Refused>;
}

/// Join tokens, kept (hashed) in the store.
pub struct JoinTokens {
    store: Arc<dyn Store>,
    pin: [u8; 32],
}

impl Attestor for JoinTokens {
    fn attest(
        &self,
        credential: &str,
        service: &str,
        namespace: Option<&str>,
    ) -> Result<(String, String), Refused> {
        let token: JoinToken = credential.parse().map_err(|e| Refused {
            reason: "malformed_token",
            message: format!("{e}"),
        })?;
        if token.pin != self.pin {
            return Err(Refused {
                reason: "other_ca",
                message: format!(
                    "the join token is for another mesh CA (sha256 {}); this control's is sha256 {}",
                    hex::encode(token.pin),
                    hex::encode(self.pin)
                ),
            });
        }
        let granted = self
            .store
            .redeem_token(
                &token.id,
                &token.secret_hash(),
                service,
                namespace,
                crate::mesh::now_ms(),
            )
            .map_err(|e| Refused {
                reason: "store",
                message: e.to_string(),
            })?;
        granted
            .map(|r| (r.namespace, r.service))
            .map_err(|refusal| Refused {
                reason: match &refusal {
                    TokenRefusal::Unknown => "unknown_token",
                    TokenRefusal::Expired { .. } => "token_expired",
                    TokenRefusal::UsedUp { .. } => "token_used_up",
                    TokenRefusal::WrongService { .. } => "wrong_service",
                },
                message: format!("token {}: {refusal}", token.id),
            })
    }
}

/// The CA and what it signs.
pub struct MeshCa {
    ca: Authority,
    attestor: Box<dyn Attestor>,
    store: Arc<dyn Store>,
    options: IdentityOptions,
    server: Arc<Credentials>,
    metrics: Arc<Metrics>,
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl MeshCa {
    /// Load the CA (from files, or the store, generating it at first
    /// start) and issue control's certificate.
    pub fn open(
        store: Arc<dyn Store>,
        options: IdentityOptions,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let td = &options.trust_domain;
        let ca = match &options.ca_files {
            Some(f) => {
                let material = CaMaterial {
                    chain_pem: read(&f.cert, "the CA certificate (--ca-cert)")?,
                    key_pem: read(&f.key, "the CA key (--ca-key)")?,
                    roots_pem: read(&f.root, "the root certificate (--ca-root)")?,
                };
                Authority::from_material(td, material).with_context(|| {
                    format!(
                        "the CA in {} (key {}, root {})",
                        f.cert.display(),
                        f.key.display(),
                        f.root.display()
                    )
                })?
            }
            None => {
                let record = match store.ca()? {
                    Some(r) => r,
                    None => {
                        let fresh = Authority::generate(td)?;
                        let m = fresh.material();
                        let stored = store.init_ca(&CaRecord {
                            trust_domain: td.to_string(),
                            chain_pem: m.chain_pem.clone(),
                            key_pem: m.key_pem.clone(),
                            roots_pem: m.roots_pem.clone(),
                        })?;
                        tracing::info!(trust_domain = %td, "generated the mesh CA");
                        stored
                    }
                };
                anyhow::ensure!(
                    record.trust_domain == td.as_str(),
                    "control's store holds a CA for trust domain {}, not {td}: start with --trust-domain {} (a new trust domain means a new CA and new identities for every proxy)",
                    record.trust_domain,
                    record.trust_domain
                );
                Authority::from_material(
                    td,
                    CaMaterial {
                        chain_pem: record.chain_pem,
                        key_pem: record.key_pem,
                        roots_pem: record.roots_pem,
                    },
                )
                .context("the CA kept in control's store")?
            }
        };
        let server = Credentials::new(server_credentials(&ca, &options)?);
        tracing::info!(
            trust_domain = %td,
            ca_sha256 = hex::encode(ca.pin()),
            "mesh CA ready"
        );
        Ok(Arc::new(Self {
            attestor: Box::new(JoinTokens {
                store: store.clone(),
                pin: ca.pin(),
            }),
            ca,
            store,
            options,
            server,
            metrics,
        }))
    }

    /// Control's own credentials (its TLS listener's certificate).
    pub fn server(&self) -> &Arc<Credentials> {
        &self.server
    }

    /// Renew control's certificate at half its life; runs for the life of
    /// control.
    pub async fn renew_server(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SERVER_TTL / 2).await;
            match server_credentials(&self.ca, &self.options) {
                Ok(c) => self.server.replace(c),
                Err(e) => tracing::error!("could not renew control's certificate: {e:#}"),
            }
        }
    }

    /// The root's public-key hash join tokens pin.
    pub fn pin(&self) -> [u8; 32] {
        self.ca.pin()
    }

    /// A new join token for `service`.
    fn create_token(
        &self,
        req: proto::CreateTokenRequest,
    ) -> Result<proto::CreateTokenResponse, Status> {
        let service = ServiceName::try_from(req.service.clone())
            .map_err(|e| Status::invalid_argument(format!("--service: {e}")))?;
        let namespace = if req.namespace.is_empty() {
            wasmesh_api::resources::DEFAULT_NAMESPACE.to_string()
        } else {
            req.namespace.clone()
        };
        let id = SpiffeId::workload(&self.options.trust_domain, &namespace, service.as_str())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = match req.ttl_ms {
            0 => DEFAULT_TOKEN_TTL,
            ms => Duration::from_millis(ms),
        };
        let uses = req.uses.max(1);
        let token = JoinToken::generate(self.ca.pin());
        let now = SystemTime::now();
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            service: service.as_str().to_string(),
            namespace,
            expires_at_ms: ms(now + ttl),
            uses,
            uses_left: uses,
            created_at_ms: ms(now),
        };
        self.store
            .put_token(&record)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(token = %token.id, %id, uses, "join token created");
        Ok(proto::CreateTokenResponse {
            token: token.reveal(),
            id: token.id.clone(),
            spiffe_id: id.to_string(),
            expires_at_ms: record.expires_at_ms,
            uses,
        })
    }

    /// Sign a proxy's CSR: for the identity of its client certificate (a
    /// renewal), or for the service its join token grants.
    fn sign(
        &self,
        req: proto::SignRequest,
        transport: &Transport,
    ) -> Result<proto::SignResponse, Status> {
        let Transport::Tls(info) = transport else {
            return Err(Status::failed_precondition(
                "certificates are signed only on control's TLS listener (--listen-tls, default 127.0.0.1:15012): start the proxy with --control https://HOST:PORT",
            ));
        };
        let csr = Csr::parse(&req.csr_der).map_err(|e| {
            self.metrics.identity_refused("bad_csr");
            Status::invalid_argument(e.to_string())
        })?;
        let (id, kind) = match (&info.peer, req.token.is_empty()) {
            (Some(peer), true) => (self.renewal(peer.id.clone(), &req)?, "renewal"),
            (_, false) => (self.redeem(&req)?, "token"),
            (None, true) => {
                self.metrics.identity_refused("no_credential");
                return Err(Status::unauthenticated(
                    "a first certificate needs a join token: start the proxy with --token-file (or WASMESH_TOKEN) holding what `wasmesh token create` printed",
                ));
            }
        };
        let issued = self
            .ca
            .issue(&csr, &id, self.options.cert_ttl)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.metrics.certificate_issued(kind);
        tracing::info!(%id, remote = %info.remote, kind, "certificate issued");
        Ok(proto::SignResponse {
            certificate_chain_pem: wasmesh_identity::cert::certs_to_pem(&issued.chain),
            trust_bundle_pem: self.ca.roots_pem().to_string(),
            spiffe_id: id.to_string(),
            expires_at_ms: ms(issued.not_after),
        })
    }

    /// A renewal: the same identity as the certificate presented.
    fn renewal(&self, id: SpiffeId, req: &proto::SignRequest) -> Result<SpiffeId, Status> {
        let Some((ns, service)) = id.workload_parts() else {
            self.metrics.identity_refused("not_a_workload");
            return Err(Status::permission_denied(format!(
                "{id} is not a workload identity"
            )));
        };
        if (!req.service.is_empty() && req.service != service)
            || (!req.namespace.is_empty() && req.namespace != ns)
        {
            self.metrics.identity_refused("wrong_service");
            return Err(Status::permission_denied(format!(
                "this proxy's certificate is {id}; it cannot ask to be {}/{}",
                req.namespace, req.service
            )));
        }
        Ok(id)
    }

    /// A first certificate: the credential must grant the service.
    fn redeem(&self, req: &proto::SignRequest) -> Result<SpiffeId, Status> {
        let namespace = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        match self.attestor.attest(&req.token, &req.service, namespace) {
            Ok((ns, service)) => SpiffeId::workload(&self.options.trust_domain, &ns, &service)
                .map_err(|e| Status::internal(e.to_string())),
            Err(Refused { reason, message }) => {
                self.metrics.identity_refused(reason);
                tracing::warn!(reason, "certificate refused: {message}");
                Err(match reason {
                    "malformed_token" => Status::invalid_argument(message),
                    "store" => Status::internal(message),
                    _ => Status::permission_denied(message),
                })
            }
        }
    }
}

/// Control's certificate: its SPIFFE ID and names.
fn server_credentials(ca: &Authority, options: &IdentityOptions) -> anyhow::Result<Current> {
    let (issued, key) = ca.issue_server(&options.server_names, &options.server_ips, SERVER_TTL)?;
    Current::new(issued.chain, key, ca.roots()).context("control's certificate")
}

/// The TLS listener's configuration: control's certificate; a client
/// certificate verified when sent.
pub fn tls_config(ca: &MeshCa) -> Arc<rustls::ServerConfig> {
    wasmesh_identity::tls::control_server(ca.server())
}

/// The `Identity` gRPC service.
#[derive(Clone)]
pub struct IdentityService {
    /// The CA.
    pub ca: Arc<MeshCa>,
    /// The admin credential.
    pub auth: Arc<Auth>,
}

#[tonic::async_trait]
impl proto::identity_server::Identity for IdentityService {
    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        self.auth.check(&req, Access::Write)?;
        let ca = self.ca.clone();
        let req = req.into_inner();
        tokio::task::spawn_blocking(move || ca.create_token(req))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
    }

    async fn sign(
        &self,
        req: Request<proto::SignRequest>,
    ) -> Result<Response<proto::SignResponse>, Status> {
        let transport = Transport::of(&req);
        let ca = self.ca.clone();
        let req = req.into_inner();
        tokio::task::spawn_blocking(move || ca.sign(req, &transport))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
    }
}
