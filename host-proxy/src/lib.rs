//! wasmesh's data plane: the sidecar proxy. Native mechanism (listeners,
//! HTTP/1.1 and HTTP/2 forwarding, load balancing, connection pools, metrics)
//! around a WebAssembly plugin runtime that runs the policy chains.
//!
//! It depends on `wasmesh-api` for the configuration documents and on the
//! `wit/` contract (through wasmtime's `bindgen!`); it never depends on a
//! plugin crate, only on `.wasm` bytes.
//!
//! Layers, in the order a request meets them: the listener (accept, TCP
//! options) → hyper's auto HTTP/1.1 + HTTP/2 connection → [`proxy::handle`]
//! (routing, the plugin chain, the upstream attempts) → the pooled upstream
//! clients.

pub mod admin;
pub mod cluster;
pub mod connector;
pub mod h1scan;
mod listener;
mod memory;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod runtime;
pub mod snapshot;
pub mod state;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;

use crate::cluster::{ClusterView, EndpointTable};
use crate::connector::LimitedConnector;
use crate::metrics::Metrics;
use crate::proxy::{ProxyBody, Side};
use crate::runtime::Runtime;
use crate::snapshot::{BuildCtx, BuildError, Snapshot, UpstreamSettings};
use crate::state::StateStore;

/// How to run a proxy.
#[derive(Clone, Debug)]
pub struct Options {
    /// The mesh file.
    pub config: PathBuf,
    /// Reload when the file or a referenced component changes.
    pub watch: bool,
    /// Worker threads.
    pub workers: usize,
    /// The `builtin:` plugins.
    pub builtins: &'static [(&'static str, &'static [u8])],
    /// Keep compiled components here across runs.
    pub compile_cache: Option<PathBuf>,
    /// Where components are compiled.
    pub compiler: runtime::Compiler,
}

/// Pooled upstream clients, one per protocol.
pub struct Clients {
    /// HTTP/1.1: connections pooled in each endpoint's live state.
    pub http1: pool::H1Pool,
    /// HTTP/2 with prior knowledge (hyper-util's pool, keyed by endpoint).
    pub h2c: Client<LimitedConnector, ProxyBody>,
}

impl Clients {
    fn new(s: &UpstreamSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(s.connect_timeout));
        connector.set_nodelay(true);
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(s.idle_timeout)
            .pool_max_idle_per_host(s.max_idle_per_endpoint)
            .retry_canceled_requests(true)
            .set_host(false);
        b.http2_only(true);
        let h2c = b.build(LimitedConnector::new(
            connector,
            s.max_connections_per_endpoint,
        ));
        Self {
            http1: pool::H1Pool::new(s),
            h2c,
        }
    }
}

/// What every request and the admin listener share: runtime handles and the
/// state that outlives config snapshots.
pub struct Shared {
    /// The plugin runtime.
    pub runtime: Arc<Runtime>,
    /// The serving snapshot.
    pub snapshot: ArcSwap<Snapshot>,
    /// The serving snapshot's endpoints, as plugins see them.
    pub cluster: Arc<ArcSwap<ClusterView>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Plugins' shared state.
    pub state: Arc<StateStore>,
    /// Endpoints' live state.
    pub endpoints: Arc<EndpointTable>,
    /// Upstream clients.
    pub clients: Clients,
    /// Set on shutdown: `/ready` answers 503.
    pub draining: AtomicBool,
    /// The last refused reload, if the last reload was refused.
    pub last_error: Mutex<Option<BuildError>>,
    options: Options,
}

impl Shared {
    fn build_ctx<'a>(&'a self, previous: Option<&'a Snapshot>) -> BuildCtx<'a> {
        BuildCtx {
            runtime: &self.runtime,
            state: &self.state,
            endpoints: &self.endpoints,
            metrics: &self.metrics,
            builtins: self.options.builtins,
            previous,
            workers: self.options.workers,
            cluster: &self.cluster,
        }
    }

    fn install(&self, snap: Snapshot) {
        self.metrics.config_version.set(snap.version as i64);
        self.cluster.store(snap.cluster.clone());
        self.snapshot.store(Arc::new(snap));
    }

    /// Rebuild from the mesh file and swap the new snapshot in, or keep the
    /// serving one and record why not.
    pub fn reload(&self) -> Result<u64, BuildError> {
        let current = self.snapshot.load_full();
        let built = snapshot::build(&self.options.config, &self.build_ctx(Some(&current)));
        memory::release_after_build(self.options.builtins);
        match built {
            Ok(snap) => {
                let version = snap.version;
                self.install(snap);
                snapshot::settle(&self.snapshot.load());
                *self.last_error.lock().unwrap() = None;
                self.metrics.reload(true);
                tracing::info!(version, "configuration reloaded");
                Ok(version)
            }
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(
                    source = %e.source,
                    path = %e.path,
                    "configuration refused, the previous one keeps serving: {}",
                    e.reason
                );
                *self.last_error.lock().unwrap() = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid (exit code 2).
    #[error("{0}")]
    Config(#[from] BuildError),
    /// Anything else: a port in use, ... (exit code 1).
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

/// A proxy whose configuration was accepted and whose listeners are bound.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, Side)>,
    admin: TcpListener,
}

impl Proxy {
    /// Build the first snapshot and bind the listeners.
    pub async fn start(options: Options) -> Result<Self, StartError> {
        let runtime =
            Runtime::with_options(options.compile_cache.as_deref(), options.compiler.clone())?;
        let metrics = Arc::new(Metrics::new());
        let state = Arc::new(StateStore::default());
        let endpoints = Arc::new(EndpointTable::default());
        let cluster = Arc::new(ArcSwap::from_pointee(ClusterView::default()));
        let first = {
            let options = options.clone();
            let (runtime, state, endpoints, metrics, cluster) = (
                runtime.clone(),
                state.clone(),
                endpoints.clone(),
                metrics.clone(),
                cluster.clone(),
            );
            let built = tokio::task::spawn_blocking(move || {
                snapshot::build(
                    &options.config,
                    &BuildCtx {
                        runtime: &runtime,
                        state: &state,
                        endpoints: &endpoints,
                        metrics: &metrics,
                        builtins: options.builtins,
                        previous: None,
                        workers: options.workers,
                        cluster: &cluster,
                    },
                )
            })
            .await
            .map_err(|e| anyhow::anyhow!("building the configuration panicked: {e}"))?;
            memory::release_after_build(options.builtins);
            built?
        };
        let clients = Clients::new(&first.upstream);
        let l = first.listeners.clone();
        metrics.config_version.set(first.version as i64);
        cluster.store(first.cluster.clone());
        let shared = Arc::new(Shared {
            runtime,
            snapshot: ArcSwap::from_pointee(first),
            cluster,
            metrics,
            state,
            endpoints,
            clients,
            draining: AtomicBool::new(false),
            last_error: Mutex::new(None),
            options,
        });
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
        };
        let mut listeners = vec![(bind(l.listen, "listen").await?, Side::Outbound)];
        if let Some(a) = l.inbound {
            listeners.push((bind(a, "inbound").await?, Side::Inbound));
        }
        let admin = bind(l.admin, "admin").await?;
        Ok(Self {
            shared,
            listeners,
            admin,
        })
    }

    /// The shared state (for tests and the admin API).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serve until SIGTERM or SIGINT, then drain: `/ready` turns 503, the
    /// listeners stop accepting, in-flight requests get up to `drain` to
    /// finish.
    pub async fn run(self, drain: Duration) -> anyhow::Result<()> {
        let shared = self.shared;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
        let mut tasks = Vec::new();
        for (listener, side) in self.listeners {
            tasks.push(tokio::spawn(listener::accept_loop(
                listener,
                shared.clone(),
                side,
                stop_rx.clone(),
                graceful.clone(),
            )));
        }
        tokio::spawn(admin::serve(self.admin, shared.clone()));
        tokio::spawn(sweep_upstream_pools(shared.clone()));
        if shared.options.watch {
            watch::spawn(shared.clone());
        }
        tracing::info!(
            listen = %shared.snapshot.load().listeners.listen,
            admin = %shared.snapshot.load().listeners.admin,
            version = shared.snapshot.load().version,
            "wasmesh proxy serving"
        );

        shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        shared
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        let graceful =
            Arc::try_unwrap(graceful).map_err(|_| anyhow::anyhow!("listener still running"))?;
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline passed with requests still in flight");
        }
        Ok(())
    }
}

/// Close HTTP/1.1 upstream connections idle past `upstream.idle-timeout`.
async fn sweep_upstream_pools(shared: Arc<Shared>) {
    let every = shared.clients.http1.sweep_every();
    loop {
        tokio::time::sleep(every).await;
        for ep in shared.endpoints.all() {
            shared.clients.http1.sweep(&ep.h1);
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
