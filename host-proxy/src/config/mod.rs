//! Configuration snapshots: everything a request needs, immutable, built
//! completely off the request path (files read, components compiled,
//! plugins configured) and then swapped in behind an atomic pointer
//! ([`Live`]). Requests keep the snapshot they started with to their end; a
//! refused build leaves the serving snapshot as it was and says why
//! ([`BuildError`]: source, field path, reason).
//!
//! Today snapshots come from the mesh file ([`build`]); the control plane's
//! client will be a second source feeding the same [`Live`].
//!
//! Depends on [`crate::chain`], [`crate::runtime`], [`crate::upstream`],
//! [`crate::listener`] (for its limits) and [`crate::metrics`]; nothing on
//! the request path depends on how a snapshot was built.

mod build;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
// foldhash: hosts are looked up on every request.
use foldhash::HashMap;

pub use self::build::{MAX_CHAIN, build};
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
}

/// The configuration serving now.
pub struct Snapshot {
    /// +1 per accepted snapshot.
    pub version: u64,
    /// The mesh file it came from.
    pub file: PathBuf,
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
}

/// The serving snapshot, and how the last attempt to replace it went.
pub struct Live {
    builder: Builder,
    file: PathBuf,
    snapshot: ArcSwap<Snapshot>,
    last_error: Mutex<Option<BuildError>>,
}

impl Live {
    /// Build the first snapshot from `file`. Slow (compiles components):
    /// call off the async runtime.
    pub fn start(builder: Builder, file: PathBuf) -> Result<Self, BuildError> {
        let first = build(&file, &builder, None);
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

    /// The serving snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The last refused reload, if the last reload was refused.
    pub fn last_error(&self) -> Option<BuildError> {
        self.last_error.lock().unwrap().clone()
    }

    /// Rebuild from the mesh file and swap the new snapshot in, or keep the
    /// serving one and record why not. Slow: call off the async runtime.
    pub fn reload(&self) -> Result<u64, BuildError> {
        let current = self.snapshot.load_full();
        let built = build(&self.file, &self.builder, Some(&current));
        crate::runtime::memory::release_after_build(self.builder.builtins);
        let metrics = &self.builder.metrics;
        match built {
            Ok(snap) => {
                let version = snap.version;
                metrics.config_version.set(version as i64);
                self.builder.cluster.store(snap.cluster.clone());
                self.snapshot.store(Arc::new(snap));
                settle(&self.snapshot.load());
                *self.last_error.lock().unwrap() = None;
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
