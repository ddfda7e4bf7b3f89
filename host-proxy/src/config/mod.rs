//! Configuration snapshots: everything a request needs, immutable, built
//! completely off the request path (files read, components compiled,
//! plugins configured) and then swapped in behind an atomic pointer
//! ([`Live`]). Requests keep the snapshot they started with to their end; a
//! refused build leaves the serving snapshot as it was and says why
//! ([`BuildError`]: source, field path, reason).
//!
//! Snapshots come from the mesh file ([`build_file`]) or from the control
//! plane (its client, [`crate::xds`], hands [`Live::apply`] a mesh document
//! made from the snapshot it received); both go through the same
//! [`build`].
//!
//! Depends on [`crate::chain`], [`crate::runtime`], [`crate::upstream`],
//! [`crate::listener`] (for its limits) and [`crate::metrics`]; nothing on
//! the request path depends on how a snapshot was built.

mod build;
pub mod components;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
// foldhash: hosts are looked up on every request.
use foldhash::HashMap;

pub use self::build::{MAX_CHAIN, build, build_file};
pub use self::components::Components;
use crate::chain::Chain;
use crate::listener::Limits as Downstream;
use crate::metrics::Metrics;
use crate::runtime::state::StateStore;
use crate::runtime::{Limits, Runtime};
use crate::upstream::cluster::{Cluster, ClusterView, EndpointTable};
use crate::upstream::{UpstreamProtocol, UpstreamSettings};

/// A refused configuration: which file (or plugin), which field, why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildError {
    /// The file, or `plugin NAME (sha256 …) from FILE`.
    pub source: String,
    /// Field path, e.g. `services.reviews.plugins[0].config`.
    pub path: String,
    /// What is wrong and what to do.
    pub reason: String,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.path, self.reason)
    }
}

impl std::error::Error for BuildError {}

/// Where a snapshot came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A mesh file.
    File(PathBuf),
    /// The control plane: a snapshot it sent, by version.
    Control {
        /// The snapshot's version.
        version: String,
        /// Read back from the compile cache (control was unreachable at
        /// start).
        cached: bool,
    },
    /// Nothing yet: a control-plane sidecar before its first snapshot.
    Empty,
}

impl Origin {
    /// The mesh file, for a snapshot built from one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Origin::File(f) => Some(f),
            _ => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Control {
                version,
                cached: false,
            } => write!(f, "control snapshot {version}"),
            Origin::Control {
                version,
                cached: true,
            } => write!(f, "control snapshot {version} (from the compile cache)"),
            Origin::Empty => write!(f, "(no snapshot yet)"),
        }
    }
}

/// Settings given on the command line; each overrides the mesh file's key
/// (and the default), and is all a control-plane sidecar has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--admin`.
    pub admin: Option<SocketAddr>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--inbound`.
    pub inbound: Option<SocketAddr>,
    /// `--memory-limit`: `runtime.memory-limit`.
    pub memory_limit: Option<usize>,
}

/// A control-plane sidecar's own service: the inbound listener sends to its
/// app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// `--service`.
    pub service: String,
    /// `--subset`.
    pub subset: String,
    /// `--app`.
    pub app: Option<SocketAddr>,
}

/// The listeners and their connection limits; fixed for the life of the
/// process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    /// Admin.
    pub admin: SocketAddr,
    /// Outbound.
    pub listen: SocketAddr,
    /// Inbound.
    pub inbound: Option<SocketAddr>,
    /// Limits on client connections.
    pub downstream: Downstream,
}

/// One service.
pub struct Service {
    /// Name.
    pub name: Arc<str>,
    /// How its endpoints are spoken to.
    pub protocol: UpstreamProtocol,
    /// Its endpoints, for load balancing.
    pub cluster: Cluster,
    /// Run by callers' sidecars.
    pub outbound: Arc<Chain>,
    /// Run by this service's own sidecar.
    pub inbound: Arc<Chain>,
    /// Mesh mTLS on its inbound listeners.
    pub mtls: wasmesh_api::MtlsSpec,
}

/// The configuration serving now.
pub struct Snapshot {
    /// +1 per accepted snapshot.
    pub version: u64,
    /// Where it came from.
    pub origin: Origin,
    /// Listener addresses.
    pub listeners: Listeners,
    /// Upstream settings.
    pub upstream: UpstreamSettings,
    /// Services by name.
    pub services: HashMap<String, Arc<Service>>,
    /// Services by lowercase host name.
    hosts: HashMap<String, Arc<Service>>,
    /// The service this sidecar stands beside.
    pub local_service: Option<Arc<Service>>,
    /// Files whose change triggers a reload (with `--watch`).
    pub watched: Vec<PathBuf>,
    /// The runtime limits.
    pub limits: Limits,
    /// Every service's endpoints (published to plugins when swapped in).
    pub cluster: Arc<ClusterView>,
}

impl Snapshot {
    /// The service for a host name (already without its port; matched
    /// case-insensitively).
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&host.to_ascii_lowercase())
        } else {
            self.hosts.get(host)
        }
    }

    /// Every configured plugin, outbound and inbound chains.
    fn plugins(&self) -> impl Iterator<Item = &Arc<crate::runtime::ConfiguredPlugin>> {
        self.services
            .values()
            .flat_map(|s| s.outbound.plugins.iter().chain(&s.inbound.plugins))
    }
}

/// What building a snapshot needs from the running proxy: the runtime and
/// the state that outlives snapshots.
pub struct Builder {
    /// The plugin runtime.
    pub runtime: Arc<Runtime>,
    /// Plugins' shared state.
    pub state: Arc<StateStore>,
    /// Endpoints' live state.
    pub endpoints: Arc<EndpointTable>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `builtin:` plugins.
    pub builtins: &'static [(&'static str, &'static [u8])],
    /// Worker threads (sizes the instance pools).
    pub workers: usize,
    /// The endpoints plugins see: the serving snapshot's.
    pub cluster: Arc<ArcSwap<ClusterView>>,
    /// Settings from the command line.
    pub overrides: Overrides,
    /// A control-plane sidecar's own service.
    pub local: Option<Local>,
    /// Components fetched from the control plane, by sha256.
    pub components: Arc<Components>,
}

/// The serving snapshot, and how the last attempt to replace it went.
pub struct Live {
    builder: Builder,
    file: Option<PathBuf>,
    snapshot: ArcSwap<Snapshot>,
    last_error: Mutex<Option<BuildError>>,
}

impl Live {
    /// Build the first snapshot: from `file`, or from `doc` (a control
    /// plane's, from `origin`). Slow (compiles components): call off the
    /// async runtime.
    pub fn start(
        builder: Builder,
        file: Option<PathBuf>,
        doc: &wasmesh_api::MeshFile,
        origin: &Origin,
    ) -> Result<Self, BuildError> {
        let first = match &file {
            Some(f) => build_file(f, &builder, None),
            None => build(doc, origin, &builder, None),
        };
        crate::runtime::memory::release_after_build(builder.builtins);
        let first = first?;
        builder.metrics.config_version.set(first.version as i64);
        builder.cluster.store(first.cluster.clone());
        Ok(Self {
            builder,
            file,
            snapshot: ArcSwap::from_pointee(first),
            last_error: Mutex::new(None),
        })
    }

    /// The components fetched from control.
    pub fn components(&self) -> &Arc<Components> {
        &self.builder.components
    }

    /// Fetched ahead of the snapshot that may name it (control's prefetch):
    /// keep the component and compile it, off the request path. Nothing
    /// runs it until a snapshot names it. Slow: call off the async runtime.
    pub fn prefetch(&self, sha256: &str, bytes: Vec<u8>) -> Result<(), String> {
        self.builder.components.insert(sha256, bytes)?;
        let bytes = self
            .builder
            .components
            .get(sha256)
            .ok_or("the component vanished")?;
        self.builder
            .runtime
            .load(&bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Build a snapshot from a control plane's document and swap it in, or
    /// keep the serving one and record why not. Slow: call off the async
    /// runtime.
    pub fn apply(&self, doc: &wasmesh_api::MeshFile, origin: &Origin) -> Result<u64, BuildError> {
        let current = self.snapshot.load_full();
        let built = build(doc, origin, &self.builder, Some(&current));
        self.swap(built)
    }

    /// The serving snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The serving snapshot and the last refused reload (if the last
    /// reload was refused), read together: a reload that succeeds swaps the
    /// snapshot and clears the error under the same lock, so no reader sees
    /// the new version beside the error of the attempt before it.
    pub fn state(&self) -> (Arc<Snapshot>, Option<BuildError>) {
        let error = self.last_error.lock().unwrap();
        (self.snapshot.load_full(), error.clone())
    }

    /// Rebuild from the mesh file and swap the new snapshot in, or keep the
    /// serving one and record why not. Slow: call off the async runtime.
    pub fn reload(&self) -> Result<u64, BuildError> {
        let Some(file) = &self.file else {
            return Ok(self.snapshot.load().version);
        };
        let current = self.snapshot.load_full();
        let built = build_file(file, &self.builder, Some(&current));
        self.swap(built)
    }

    fn swap(&self, built: Result<Snapshot, BuildError>) -> Result<u64, BuildError> {
        crate::runtime::memory::release_after_build(self.builder.builtins);
        let metrics = &self.builder.metrics;
        match built {
            Ok(snap) => {
                let version = snap.version;
                metrics.config_version.set(version as i64);
                self.builder.cluster.store(snap.cluster.clone());
                {
                    let mut error = self.last_error.lock().unwrap();
                    self.snapshot.store(Arc::new(snap));
                    *error = None;
                }
                let serving = self.snapshot.load();
                settle(&serving);
                // What earlier snapshots loaded and this one does not use
                // goes (a version still finishing requests, next time).
                let used: std::collections::HashSet<&str> =
                    serving.plugins().map(|p| p.sha256()).collect();
                self.builder.components.retain(|sha| used.contains(sha));
                self.builder.runtime.forget_unused();
                metrics.reload(true);
                tracing::info!(version, "configuration reloaded");
                Ok(version)
            }
            Err(e) => {
                metrics.reload(false);
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

/// Once `snap` serves: the versions its plugins fall back to keep no
/// fallbacks of their own, so at most one earlier version stays loaded.
fn settle(snap: &Snapshot) {
    for p in snap.plugins() {
        if let Some(fb) = p.fallback() {
            fb.set_fallback(None);
        }
    }
}
