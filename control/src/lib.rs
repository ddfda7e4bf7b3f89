//! wasmesh's control plane: `wasmesh control`. A tonic gRPC server with the
//! plugin registry, declarative config, the discovery stream each proxy
//! holds (versioned snapshots, ACK/NACK, the xDS model), proxy status, and
//! mesh identity (the CA, join tokens, certificates: [`identity`]); gRPC
//! health and reflection; an admin HTTP listener with `/metrics` and
//! `/ready`. It serves on a plaintext listener (loopback: the CLI, proxies
//! without identity) and a TLS one ([`tls`]: proxies with identities).
//! State lives in a [`store::Store`] (embedded redb by default).
//!
//! It depends on `wasmesh-api` (the resources and the gRPC API) and judges
//! plugins through a [`validate::Validator`] the binary supplies (the
//! proxy's own runtime); it never links the data plane itself.

pub mod auth;
pub mod grpc;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod store;
pub mod tls;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use wasmesh_api::proto;

use crate::auth::Auth;
use crate::grpc::Services;
use crate::identity::{IdentityOptions, IdentityService, MeshCa};
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::validate::Validator;

/// Default gRPC listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15010";
/// Default admin listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15011";
/// Default TLS listener.
pub const DEFAULT_LISTEN_TLS: &str = "127.0.0.1:15012";
/// How often a replica takes or keeps the lead and, leading, collects the
/// store's garbage.
pub const LEADER_DUTIES_EVERY: Duration = Duration::from_secs(60);
/// How long a disconnected proxy keeps its endpoints, by default.
pub const DEFAULT_ENDPOINT_GRACE: Duration = Duration::from_secs(30);

/// How to run control.
#[derive(Clone, Debug)]
pub struct Options {
    /// The gRPC listener.
    pub listen: SocketAddr,
    /// The admin HTTP listener.
    pub admin: SocketAddr,
    /// Where state lives (the embedded store, the admin token by default).
    pub data_dir: Option<PathBuf>,
    /// The store: embedded in `data_dir` (None), or `etcd://…`.
    pub store: Option<String>,
    /// With etcd: the file holding the key that seals the CA's private key
    /// (created when missing; the same for every replica).
    pub store_key_file: Option<PathBuf>,
    /// With etcd: TLS and a user to reach it.
    pub etcd: EtcdAccess,
    /// The admin token file (default `DATA_DIR/admin.token`).
    pub admin_token_file: Option<PathBuf>,
    /// Listen beyond loopback without TLS.
    pub insecure: bool,
    /// How long a disconnected proxy keeps its endpoints.
    pub endpoint_grace: Duration,
    /// The TLS listener.
    pub listen_tls: SocketAddr,
    /// The CA and certificates.
    pub identity: IdentityOptions,
}

/// How control reaches etcd beyond its address (files, as given).
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    /// The CA of the members' certificates (PEM): TLS.
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
    /// A user, with authentication on.
    pub user: Option<String>,
    /// The file holding its password.
    pub password_file: Option<PathBuf>,
}

/// Control, bound and ready to serve.
pub struct Control {
    mesh: Arc<Mesh>,
    auth: Arc<Auth>,
    ca: Arc<MeshCa>,
    grpc: TcpListener,
    grpc_tls: TcpListener,
    admin: TcpListener,
}

impl Control {
    /// Open the store, load the credential, bind the listeners.
    pub async fn start(options: Options, validator: Arc<dyn Validator>) -> anyhow::Result<Self> {
        for (what, addr) in [("--listen", options.listen), ("--admin", options.admin)] {
            anyhow::ensure!(
                addr.ip().is_loopback() || options.insecure,
                "refusing to listen on {addr} ({what}): it is not a loopback address, and whoever can reach this plaintext listener can read the mesh and, with a stolen admin token on the wire, push code to every proxy. Keep it on 127.0.0.1 and let remote proxies use the TLS listener (--listen-tls), or start with --insecure if this network is yours alone"
            );
        }
        raise_open_files();
        if let Some(dir) = &options.data_dir {
            create_private_dir(dir)?;
        }
        let token_file = options
            .admin_token_file
            .clone()
            .or_else(|| options.data_dir.as_ref().map(|d| d.join("admin.token")))
            .context("give --admin-token-file: without --data-dir there is no default place for it (every replica on one etcd is given the same file)")?;
        let auth = Arc::new(Auth::load_or_create(
            &token_file,
            !options.listen.ip().is_loopback(),
        )?);
        let store = open_store(&options)?;
        let metrics = Arc::new(Metrics::new());
        let mut identity = options.identity.clone();
        if !options.listen_tls.ip().is_unspecified() {
            identity.server_ips.push(options.listen_tls.ip());
        }
        let ca = MeshCa::open(store.clone(), identity, metrics.clone())?;
        let mesh = Mesh::open(store, validator, metrics, options.endpoint_grace)?;
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} ({what})"))
        };
        Ok(Self {
            grpc: bind(options.listen, "listen").await?,
            grpc_tls: bind(options.listen_tls, "listen-tls").await?,
            admin: bind(options.admin, "admin").await?,
            mesh,
            auth,
            ca,
        })
    }

    /// The sha256 of the mesh root's public key, which join tokens pin.
    pub fn ca_pin(&self) -> [u8; 32] {
        self.ca.pin()
    }

    /// Serve until SIGTERM or SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        self.run_until(shutdown()).await
    }

    /// Serve until `stop` completes (`wasmesh demo` embeds control and
    /// stops it itself).
    pub async fn run_until(
        self,
        stop_requested: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let services = Services {
            mesh: self.mesh.clone(),
            auth: self.auth.clone(),
        };
        let identity = IdentityService {
            ca: self.ca.clone(),
            auth: self.auth,
        };
        tokio::spawn(self.mesh.clone().write_endpoints());
        tokio::spawn(self.mesh.clone().follow());
        tokio::spawn(self.mesh.clone().leader_duties(LEADER_DUTIES_EVERY));
        let expiring = self.mesh.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                expiring.expire();
            }
        });
        tokio::spawn(self.ca.clone().renew_server());
        tokio::spawn(admin(self.admin, self.mesh.clone()));
        tracing::info!(
            addr = %self.grpc.local_addr()?,
            tls = %self.grpc_tls.local_addr()?,
            revision = self.mesh.revision(),
            "wasmesh control serving"
        );
        // TCP_NODELAY: a snapshot or a chunk must not wait for Nagle's
        // algorithm and a delayed ACK (40 ms a message on loopback).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(self.grpc),
            |s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            },
        );
        let tls_incoming = tls::incoming(
            self.grpc_tls,
            identity::tls_config(&self.ca),
            self.mesh.metrics.clone(),
        );
        let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
        let stopped = |rx: tokio::sync::broadcast::Receiver<()>| async move {
            let mut rx = rx;
            let _ = rx.recv().await;
        };
        let plain = router(&services, &identity)
            .await?
            .serve_with_incoming_shutdown(incoming, stopped(stop.subscribe()));
        let secure = router(&services, &identity)
            .await?
            .serve_with_incoming_shutdown(tls_incoming, stopped(stop.subscribe()));
        let serving = async { tokio::try_join!(plain, secure) };
        tokio::pin!(serving);
        tokio::select! {
            r = &mut serving => { r.context("serving gRPC")?; }
            () = stop_requested => {
                let _ = stop.send(());
                serving.await.context("serving gRPC")?;
            }
        }
        tracing::info!("control stopped");
        Ok(())
    }
}

/// The gRPC services, as each listener serves them.
async fn router(
    services: &Services,
    identity: &IdentityService,
) -> anyhow::Result<tonic::transport::server::Router> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::discovery_server::DiscoveryServer<Services>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health)
        .add_service(reflection)
        .add_service(
            proto::registry_server::RegistryServer::new(services.clone())
                .max_decoding_message_size(2 << 20),
        )
        .add_service(proto::config_server::ConfigServer::new(services.clone()))
        .add_service(proto::discovery_server::DiscoveryServer::new(
            services.clone(),
        ))
        .add_service(proto::status_server::StatusServer::new(services.clone()))
        .add_service(proto::identity_server::IdentityServer::new(
            identity.clone(),
        )))
}

/// The store `options` name.
fn open_store(options: &Options) -> anyhow::Result<Arc<dyn store::Store>> {
    match (&options.store, &options.data_dir) {
        (None, Some(dir)) => Ok(Arc::new(
            store::embedded::Embedded::open(dir)
                .with_context(|| format!("opening the store in {}", dir.display()))?,
        )),
        (None, None) => anyhow::bail!("give --data-dir (the embedded store) or --store etcd://…"),
        (Some(url), _) => open_etcd(url, options),
    }
}

#[cfg(feature = "etcd")]
fn open_etcd(url: &str, options: &Options) -> anyhow::Result<Arc<dyn store::Store>> {
    let parsed: store::etcd::EtcdUrl = url
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--store {e}"))?;
    let key_file = options.store_key_file.as_ref().context(
        "--store etcd://… needs --store-key-file FILE: the key sealing the CA's private key in etcd (created when missing; give every replica the same file)",
    )?;
    let key = store::etcd::SealingKey::load_or_create(key_file)?;
    let read = |f: &PathBuf, what: &str| {
        std::fs::read(f).with_context(|| format!("reading {what} {}", f.display()))
    };
    let e = &options.etcd;
    let access = store::etcd::Access {
        ca_pem: e.ca.as_ref().map(|f| read(f, "--etcd-ca")).transpose()?,
        identity_pem: match (&e.cert, &e.key) {
            (Some(c), Some(k)) => Some((read(c, "--etcd-cert")?, read(k, "--etcd-key")?)),
            _ => None,
        },
        user: match (&e.user, &e.password_file) {
            (Some(u), Some(f)) => Some((
                u.clone(),
                String::from_utf8_lossy(&read(f, "--etcd-password-file")?)
                    .trim()
                    .to_string(),
            )),
            _ => None,
        },
    };
    let store = store::etcd::Etcd::connect(&parsed, &access, key)?;
    tracing::info!(endpoints = ?parsed.endpoints, prefix = %parsed.prefix, "store: etcd");
    Ok(Arc::new(store))
}

#[cfg(not(feature = "etcd"))]
fn open_etcd(url: &str, _: &Options) -> anyhow::Result<Arc<dyn store::Store>> {
    anyhow::bail!(
        "--store {url}: this wasmesh was built without etcd support; build it with `cargo build --release --features etcd` (which needs protoc: Debian's protobuf-compiler)"
    )
}

/// Create `dir` (and parents) for control alone: mode 700, as it holds the
/// CA key.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making the data directory {} private", dir.display()))
}

/// Each connected proxy holds a connection: raise the soft limit on open
/// files to the hard one (as Go's runtime does), so that thousands of
/// proxies fit.
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!("could not raise the open-files limit: {e}");
        }
    }
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The admin listener: `GET /metrics`, `GET /ready`.
async fn admin(listener: TcpListener, mesh: Arc<Mesh>) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode};
    use wasmesh_api::exposition;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mesh = mesh.clone();
                    async move {
                        let openmetrics = exposition::wants_openmetrics(
                            req.headers()
                                .get_all(http::header::ACCEPT)
                                .iter()
                                .filter_map(|v| v.to_str().ok()),
                        );
                        let (status, ctype, body) = match req.uri().path() {
                            "/metrics" if openmetrics => (
                                StatusCode::OK,
                                exposition::OPENMETRICS_TEXT,
                                mesh.metrics.encode(),
                            ),
                            "/metrics" => (
                                StatusCode::OK,
                                exposition::PROMETHEUS_TEXT,
                                exposition::to_prometheus_text(&mesh.metrics.encode()),
                            ),
                            "/ready" => (StatusCode::OK, "text/plain", "ready\n".to_string()),
                            _ => (
                                StatusCode::NOT_FOUND,
                                "text/plain",
                                "not found; try /metrics or /ready\n".to_string(),
                            ),
                        };
                        let mut r = Response::new(Full::new(bytes::Bytes::from(body)));
                        *r.status_mut() = status;
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static(ctype),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
