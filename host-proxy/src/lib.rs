//! wasmesh's data plane: the sidecar proxy. Native mechanism (listeners,
//! HTTP/1.1 and HTTP/2 forwarding, load balancing, connection pools,
//! metrics) around a WebAssembly plugin runtime that runs the policy chains.
//!
//! It depends on `wasmesh-api` for the configuration documents and on the
//! `wit/` contract (through wasmtime's `bindgen!`); it never depends on a
//! plugin crate, only on `.wasm` bytes.
//!
//! A request meets the modules in this order: [`listener`] (accept,
//! connection limits, the raw HTTP/1 head check) → [`serve`] (one request,
//! top to bottom) → [`chain`] (the plugins' hooks, run by [`runtime`]) →
//! [`upstream`] (load balancing, pools, one attempt). [`config`] builds the
//! snapshots they read; [`admin`] and [`metrics`] show what happens.
//!
//! Modules depend downwards only, never in a circle (a test checks it):
//!
//! ```text
//! xds                               the control plane's client
//! identity                          the proxy's certificate from control
//! serve, admin                      the request handler; the admin listener
//! config                            snapshots: building, swapping, watching
//! listener  chain                   accepting; running a chain
//! error                             the proxy's own failures
//! runtime                           wasm: engine, instances, host imports, state
//! upstream                          endpoints, balancing, pools, sending
//! http  metrics                     HTTP mechanics; the metrics registry
//! flags                             response flags
//! ```

#![warn(clippy::too_many_lines)]

pub mod access_log;
pub mod admin;
pub mod chain;
pub mod config;
pub mod error;
pub mod flags;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod runtime;
pub mod serve;
pub mod timer;
pub mod trace;
pub mod upstream;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::config::{BuildError, Builder, Components, Live, Local, Origin, Overrides};
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::runtime::state::StateStore;
use crate::serve::{Handler, Shared, Side};
use crate::upstream::Clients;
use crate::upstream::cluster::{ClusterView, EndpointTable};

/// How to run a proxy.
#[derive(Clone, Debug)]
pub struct Options {
    /// The mesh file (standalone mode).
    pub config: Option<PathBuf>,
    /// The control plane (control mode).
    pub control: Option<xds::ControlOptions>,
    /// A mesh identity from control (with `control`): mTLS on the inbound
    /// listener and to mesh peers.
    pub identity: Option<identity::IdentityOptions>,
    /// Settings from the command line (listeners, memory limit).
    pub overrides: Overrides,
    /// Reload when the file or a referenced component changes.
    pub watch: bool,
    /// Worker threads.
    pub workers: usize,
    /// The runtime the listeners and their requests run on, when it is not
    /// the one the proxy starts on: the proxy's own binary serves on a
    /// runtime without a time driver (see [`timer`]) and runs the rest
    /// (control client, identity renewal, admin server, the timers) on the
    /// runtime it starts on.
    pub worker: Option<tokio::runtime::Handle>,
    /// The `builtin:` plugins.
    pub builtins: &'static [(&'static str, &'static [u8])],
    /// Keep compiled components here across runs.
    pub compile_cache: Option<PathBuf>,
    /// Where components are compiled.
    pub compiler: runtime::Compiler,
    /// Distributed tracing over OTLP (`--otlp-endpoint`).
    pub trace: Option<trace::TraceOptions>,
    /// The JSON access log's file, or `-` for stdout.
    pub access_log: Option<String>,
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

/// Telemetry: who this proxy is in Istio's metrics, its tracer and its
/// access log.
type Telemetry = (
    Option<Arc<trace::Tracing>>,
    Option<Arc<access_log::AccessLog>>,
);

fn telemetry(
    options: &Options,
    identity: Option<&identity::Identity>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Telemetry> {
    let control = options.control.as_ref();
    metrics.istio.set_workload(metrics::istio::Workload {
        service: control.map(|c| c.service.clone()),
        subset: control.map(|c| c.subset.clone()).filter(|s| !s.is_empty()),
        principal: identity.map(|i| i.credentials().current().id.clone()),
    });
    let tracing = match &options.trace {
        Some(t) => Some(trace::Tracing::start(t, metrics.clone())?),
        None => None,
    };
    let access_log = match &options.access_log {
        Some(target) => Some(access_log::AccessLog::open(target, metrics.clone())?),
        None => None,
    };
    Ok((tracing, access_log))
}

/// Bind the listeners; in control mode, note the inbound address peers
/// reach this sidecar at (control registers it as the service's endpoint).
async fn bind_listeners(
    l: &config::Listeners,
    mut control: Option<xds::ControlOptions>,
) -> Result<
    (
        Vec<(TcpListener, Side)>,
        TcpListener,
        Option<xds::ControlOptions>,
    ),
    StartError,
> {
    if let (Some(_), Some(a)) = (&control, l.inbound)
        && a.ip().is_unspecified()
    {
        return Err(StartError::Runtime(anyhow::anyhow!(
            "--inbound {a}: give the address peers reach this sidecar at (it is registered with control as its service's endpoint), not {}",
            a.ip()
        )));
    }
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
    if let Some(c) = &mut control {
        c.inbound = match l.inbound {
            Some(_) => Some(listeners[1].0.local_addr().map_err(anyhow::Error::from)?),
            None => None,
        };
    }
    Ok((listeners, admin, control))
}

/// A proxy whose configuration was accepted and whose listeners are bound.
pub struct Proxy {
    shared: Arc<Shared>,
    endpoints: Arc<EndpointTable>,
    watch: bool,
    control: Option<xds::ControlOptions>,
    identity: Option<Arc<identity::Identity>>,
    listeners: Vec<(TcpListener, Side)>,
    admin: TcpListener,
    worker: Option<tokio::runtime::Handle>,
}

impl Proxy {
    /// Build the first snapshot and bind the listeners.
    pub async fn start(options: Options) -> Result<Self, StartError> {
        let runtime =
            Runtime::with_options(options.compile_cache.as_deref(), options.compiler.clone())?;
        let metrics = Arc::new(Metrics::new());
        let endpoints = Arc::new(EndpointTable::default());
        // An identity first: without it a proxy with a join token cannot
        // reach control, nor serve its inbound listener.
        let identity = match (&options.control, &options.identity) {
            (Some(c), Some(i)) => {
                Some(identity::Identity::obtain(i, &c.url, &c.service, metrics.clone()).await?)
            }
            _ => None,
        };
        let (tracing, access_log) = telemetry(&options, identity.as_deref(), &metrics)?;
        let cache = options.compile_cache.clone();
        let builder = Builder {
            runtime,
            state: Arc::new(StateStore::default()),
            endpoints: endpoints.clone(),
            metrics: metrics.clone(),
            builtins: options.builtins,
            workers: options.workers,
            cluster: Arc::new(ArcSwap::from_pointee(ClusterView::default())),
            overrides: options.overrides.clone(),
            local: options.control.as_ref().map(|c| Local {
                service: c.service.clone(),
                subset: c.subset.clone(),
                app: c.app,
            }),
            components: Arc::new(Components::new(
                cache.as_ref().map(|d| d.join("components")),
            )),
        };
        let (doc, origin) = first_document(&options)?;
        let file = options.config.clone();
        let live = tokio::task::spawn_blocking(move || Live::start(builder, file, &doc, &origin))
            .await
            .map_err(|e| anyhow::anyhow!("building the configuration panicked: {e}"))??;
        let first = live.load();
        let mesh_tls = identity.as_ref().map(|i| {
            Arc::new(upstream::tls::MeshTls::new(
                i.credentials().clone(),
                metrics.clone(),
            ))
        });
        let clients = Arc::new(Clients::new(&first.upstream, mesh_tls, endpoints.clone()));
        let (listeners, admin, control) = bind_listeners(&first.listeners, options.control).await?;
        let inbound_tls = identity.as_ref().map(|i| serve::InboundTls {
            config: wasmesh_identity::tls::inbound_server(i.credentials()),
            credentials: i.credentials().clone(),
        });
        Ok(Self {
            shared: Arc::new(Shared {
                live: Arc::new(live),
                metrics,
                clients,
                inbound_tls,
                tracing,
                access_log,
            }),
            endpoints,
            watch: options.watch,
            worker: options.worker.clone(),
            control,
            identity,
            listeners,
            admin,
        })
    }

    /// The serving configuration (for tests and embedding).
    pub fn live(&self) -> &Arc<Live> {
        &self.shared.live
    }

    /// Serve until SIGTERM or SIGINT, then drain: `/ready` turns 503, the
    /// listeners stop accepting, in-flight requests get up to `drain` to
    /// finish.
    pub async fn run(self, drain: Duration) -> anyhow::Result<()> {
        let shared = self.shared;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let drain_all = Arc::new(listener::Drain::default());
        let limits = shared.live.load().listeners.downstream;
        let mut tasks = Vec::new();
        let worker = self
            .worker
            .clone()
            .unwrap_or_else(tokio::runtime::Handle::current);
        for (listener, side) in self.listeners {
            let handler = Handler {
                shared: shared.clone(),
                side,
            };
            tasks.push(worker.spawn(listener::accept_loop(
                listener,
                limits,
                shared.metrics.clone(),
                handler,
                stop_rx.clone(),
                drain_all.clone(),
            )));
        }
        // Before the admin server: `/ready` means changes are watched.
        if self.watch {
            config::watch::spawn(shared.live.clone());
        }
        let draining = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(admin::Admin {
            live: shared.live.clone(),
            metrics: shared.metrics.clone(),
            draining: draining.clone(),
        });
        tokio::spawn(admin::serve(self.admin, admin));
        tokio::spawn(upstream::sweep_idle(
            shared.clients.clone(),
            self.endpoints.clone(),
        ));
        if let Some(identity) = &self.identity {
            tokio::spawn(identity.clone().renew());
        }
        if let Some(control) = self.control {
            tokio::spawn(xds::run(
                shared.live.clone(),
                control,
                self.identity.clone(),
                shared.metrics.clone(),
            ));
        }
        let snap = shared.live.load();
        tracing::info!(
            listen = %snap.listeners.listen,
            admin = %snap.listeners.admin,
            version = snap.version,
            "wasmesh proxy serving"
        );
        drop(snap);
        // What starting up ran is not run again: only what serves stays
        // resident.
        runtime::memory::release_code();

        shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        draining.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        if crate::timer::timeout(drain, drain_all.drained())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline passed with requests still in flight");
        }
        flush_telemetry(&shared).await;
        Ok(())
    }
}

/// Flush the spans and access log lines still buffered (blocking on the
/// export: off the runtime's threads).
async fn flush_telemetry(shared: &Shared) {
    if let Some(t) = &shared.tracing {
        let t = t.clone();
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    if let Some(log) = &shared.access_log {
        let log = log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
}

/// What a proxy serves before any file or control has spoken: nothing
/// (standalone mode reads its file in `Live::start`), or, in control mode,
/// the last snapshot it ACKed, kept in the compile cache.
fn first_document(options: &Options) -> anyhow::Result<(wasmesh_api::MeshFile, Origin)> {
    let empty = || wasmesh_api::MeshFile::parse("{}").expect("an empty mesh document parses");
    let Some(control) = &options.control else {
        return Ok((empty(), Origin::Empty));
    };
    if let Some(cached) = xds::cached_snapshot(control.cache.as_ref()) {
        match xds::document(&cached, &control.service) {
            Ok(doc) => {
                tracing::warn!(
                    version = %cached.version,
                    "serving the last snapshot ACKed, from the compile cache, until control answers"
                );
                return Ok((
                    doc,
                    Origin::Control {
                        version: cached.version,
                        cached: true,
                    },
                ));
            }
            Err(e) => tracing::warn!("the cached control snapshot is unusable: {e}"),
        }
    }
    Ok((empty(), Origin::Empty))
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
