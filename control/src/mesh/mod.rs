//! The mesh as control knows it: pushed plugins, applied services, the
//! proxies connected (and the endpoints they registered), and the snapshot
//! each proxy should serve. Every change that concerns proxies bumps a
//! generation that the discovery streams watch.
//!
//! The store holds what must survive a restart (plugins, services, the
//! revision, registered endpoints); per-proxy status (applied version,
//! last NACK) is live state, rebuilt as proxies reconnect.

mod apply;
mod prefetch;
mod proxies;
mod snapshot;
mod top;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wasmesh_api::ServiceSpec;
use wasmesh_api::proto;

pub use self::prefetch::Announced;
pub use self::proxies::ProxyHandle;
use crate::metrics::Metrics;
use crate::store::{PluginMeta, Pushed, State, Store, StoreError};
use crate::validate::Validator;

/// Largest component accepted, in bytes.
pub const MAX_COMPONENT_BYTES: u64 = 16 << 20;

/// Why control refused a request: each maps to a gRPC status, and the CLI
/// to an exit code (2 for the caller's input, 1 otherwise).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The input is wrong: a bad component, a bad document, a plugin
    /// refusing its configuration.
    #[error("{0}")]
    Invalid(String),
    /// Nothing by that name.
    #[error("{0}")]
    NotFound(String),
    /// It exists and cannot change (a pushed version with other bytes).
    #[error("{0}")]
    Exists(String),
    /// The state forbids it (a plugin still in use).
    #[error("{0}")]
    InUse(String),
    /// Another write got there first; try again.
    #[error("{0}")]
    Conflict(String),
    /// Control itself failed (its store).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Immutable { .. } => Refusal::Exists(e.to_string()),
            StoreError::Conflict { .. } => Refusal::Conflict(e.to_string()),
            StoreError::Backend(_) => Refusal::Internal(e.to_string()),
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid(m) => tonic::Status::invalid_argument(m),
            Refusal::NotFound(m) => tonic::Status::not_found(m),
            Refusal::Exists(m) => tonic::Status::already_exists(m),
            Refusal::InUse(m) => tonic::Status::failed_precondition(m),
            Refusal::Conflict(m) => tonic::Status::aborted(m),
            Refusal::Internal(m) => tonic::Status::internal(m),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Control's view of the mesh.
pub struct Mesh {
    store: Arc<dyn Store>,
    validator: Arc<dyn Validator>,
    inner: Mutex<Inner>,
    /// The generation: bumped by every change a proxy may need to see.
    changed: watch::Sender<u64>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// How long a disconnected proxy keeps its endpoints.
    grace: Duration,
    /// Endpoint registrations not yet written to the store.
    pending: proxies::PendingEndpoints,
    /// This control replica's id (random per process): the owner of the
    /// endpoints its proxies register.
    replica: String,
    /// Other replicas share the store: follow it, publish proxy status.
    shared: bool,
    /// Pushes being validated, announced to proxies for prefetch.
    staging: prefetch::Staging,
}

struct Inner {
    state: State,
    /// The services' specs, parsed.
    specs: BTreeMap<String, ServiceSpec>,
    proxies: proxies::Proxies,
    generation: u64,
    /// When the generation last moved (for fan-out latency).
    changed_at: Instant,
    /// Snapshots made at this generation, by the proxy's own service.
    snapshots: HashMap<String, Arc<proto::Snapshot>>,
}

impl Mesh {
    /// Control's state from the store.
    pub fn open(
        store: Arc<dyn Store>,
        validator: Arc<dyn Validator>,
        metrics: Arc<Metrics>,
        grace: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let state = store.load()?;
        let mut specs = BTreeMap::new();
        for (name, record) in &state.services {
            let spec: ServiceSpec = serde_json::from_value(record.spec.clone())
                .map_err(|e| StoreError::Backend(format!("service {name} in the store: {e}")))?;
            specs.insert(name.clone(), spec);
        }
        metrics.revision.set(state.revision as i64);
        // Alone on its store, control owns every endpoint it finds there;
        // beside other replicas, those are theirs.
        let shared = store.watch().is_some();
        let proxies = proxies::Proxies::from_records(&state.endpoints, shared);
        let replica = hex::encode(fastrand::u64(..).to_be_bytes());
        Ok(Arc::new(Self {
            store,
            validator,
            inner: Mutex::new(Inner {
                state,
                specs,
                proxies,
                generation: 1,
                changed_at: Instant::now(),
                snapshots: HashMap::new(),
            }),
            changed: watch::channel(1).0,
            metrics,
            grace,
            pending: Default::default(),
            replica,
            shared,
            staging: Default::default(),
        }))
    }

    /// Follow the store's changes by other writers (other control replicas)
    /// for the life of control: each burst of changes reloads the state.
    pub async fn follow(self: Arc<Self>) {
        let Some(mut changes) = self.store.watch() else {
            return;
        };
        while changes.changed().await.is_ok() {
            // Let a burst of events (one transaction's keys) gather.
            tokio::time::sleep(Duration::from_millis(20)).await;
            changes.borrow_and_update();
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload()).await {
                Ok(Ok(true)) => tracing::debug!("state reloaded from the store"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!("could not reload the state from the store: {e}"),
                Err(e) => tracing::error!("reloading the state panicked: {e}"),
            }
        }
    }

    /// The duties one replica does for all, for the life of control: every
    /// `every`, take or keep the lead, and as leader collect the store's
    /// garbage.
    pub async fn leader_duties(self: Arc<Self>, every: Duration) {
        let mut leading = false;
        loop {
            tokio::time::sleep(every).await;
            let store = self.store.clone();
            let was = leading;
            let r = tokio::task::spawn_blocking(move || {
                if !store.lead()? {
                    return Ok((false, 0));
                }
                Ok::<_, StoreError>((true, store.collect_garbage()?))
            })
            .await;
            match r {
                Ok(Ok((lead, removed))) => {
                    leading = lead;
                    if leading != was {
                        tracing::info!(replica = %self.replica, leading, "leader duties");
                    }
                    if removed > 0 {
                        tracing::info!(removed, "removed components no plugin names");
                    }
                }
                Ok(Err(e)) => tracing::warn!("leader duties: {e}"),
                Err(e) => tracing::error!("leader duties panicked: {e}"),
            }
        }
    }

    /// Take what the store holds now: config and plugins as written (by any
    /// replica), and the endpoints other replicas registered. Whether
    /// anything changed (proxies are then sent new snapshots).
    pub fn reload(&self) -> Result<bool, StoreError> {
        // No local write interleaves with a reload.
        let _writing = self.pending.apply_lock.lock().unwrap();
        let state = self.store.load()?;
        let mut specs = BTreeMap::new();
        for (name, record) in &state.services {
            let spec: ServiceSpec = serde_json::from_value(record.spec.clone())
                .map_err(|e| StoreError::Backend(format!("service {name} in the store: {e}")))?;
            specs.insert(name.clone(), spec);
        }
        let mut inner = self.inner.lock().unwrap();
        let mut changed = false;
        if state.revision != inner.state.revision || state.services != inner.state.services {
            inner.state.revision = state.revision;
            inner.state.services = state.services;
            inner.specs = specs;
            self.metrics.revision.set(state.revision as i64);
            changed = true;
        }
        if state.plugins != inner.state.plugins {
            inner.state.plugins = state.plugins;
            changed = true;
        }
        changed |= inner.proxies.merge(&state.endpoints, &self.replica);
        if changed {
            self.bump(&mut inner);
        }
        Ok(changed)
    }

    /// A receiver that sees every generation change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Note a change proxies may need to see.
    fn bump(&self, inner: &mut Inner) {
        inner.generation += 1;
        inner.changed_at = Instant::now();
        inner.snapshots.clear();
        self.changed.send_replace(inner.generation);
    }

    /// The config revision.
    pub fn revision(&self) -> u64 {
        self.inner.lock().unwrap().state.revision
    }

    /// Push a component as `name@version`: validated (compiled as proxies
    /// compile, a `wasmesh:plugin` 0.1.x component), then stored.
    pub fn push(&self, name: &str, version: &str, component: &[u8]) -> Result<PluginMeta, Refusal> {
        if !wasmesh_api::resources::valid_name(name) {
            return Err(Refusal::Invalid(format!(
                "{name:?} is not a plugin name: 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        if !wasmesh_api::resources::valid_version(version) {
            return Err(Refusal::Invalid(format!(
                "{version:?} is not a plugin version: 1-64 letters, digits, '.', '-', '+' or '_', e.g. 1.2.0"
            )));
        }
        if component.len() as u64 > MAX_COMPONENT_BYTES {
            return Err(Refusal::Invalid(format!(
                "{name}@{version}: {} bytes is over the {MAX_COMPONENT_BYTES}-byte limit for a component",
                component.len()
            )));
        }
        let sha256 = hex::encode(Sha256::digest(component));
        let key = format!("{name}@{version}");
        if let Some(existing) = self.inner.lock().unwrap().state.plugins.get(&key)
            && existing.sha256 != sha256
        {
            return Err(StoreError::Immutable {
                key,
                existing: existing.sha256.clone(),
            }
            .into());
        }
        // Proxies running another build of this plugin fetch and compile
        // these bytes while control validates them; new bytes only.
        let known = (self.inner.lock().unwrap().state.plugins.values()).any(|m| m.sha256 == sha256);
        let _staged = (!known).then(|| self.staging.stage(name, key.clone(), &sha256, component));
        let inspected = self
            .validator
            .inspect(component)
            .map_err(|e| Refusal::Invalid(format!("{key} (sha256 {sha256}) is refused: {e}")))?;
        let meta = PluginMeta {
            name: name.to_string(),
            version: version.to_string(),
            sha256,
            size: component.len() as u64,
            hooks: inspected.hooks,
            pushed_at_ms: now_ms(),
        };
        let _writing = self.pending.apply_lock.lock().unwrap();
        let pushed = self.store.put_plugin(&meta, component)?;
        let mut inner = self.inner.lock().unwrap();
        let meta = match pushed {
            Pushed::Created => {
                inner.state.plugins.insert(key, meta.clone());
                meta
            }
            Pushed::Unchanged => inner.state.plugins.get(&key).cloned().unwrap_or(meta),
        };
        Ok(meta)
    }

    /// Every plugin, with the services using each.
    pub fn plugins(&self) -> Vec<(PluginMeta, Vec<String>)> {
        let inner = self.inner.lock().unwrap();
        inner
            .state
            .plugins
            .values()
            .map(|m| (m.clone(), users(&inner, m)))
            .collect()
    }

    /// One plugin.
    pub fn plugin(&self, key: &str) -> Result<(PluginMeta, Vec<String>), Refusal> {
        let inner = self.inner.lock().unwrap();
        let m = inner
            .state
            .plugins
            .get(key)
            .ok_or_else(|| Refusal::NotFound(format!("no plugin {key} has been pushed")))?;
        Ok((m.clone(), users(&inner, m)))
    }

    /// Delete a plugin version, unless a service uses it.
    pub fn delete_plugin(&self, key: &str) -> Result<(), Refusal> {
        let _writing = self.pending.apply_lock.lock().unwrap();
        let inner = self.inner.lock().unwrap();
        let Some(m) = inner.state.plugins.get(key) else {
            return Err(Refusal::NotFound(format!(
                "no plugin {key} has been pushed"
            )));
        };
        let users = users(&inner, m);
        if !users.is_empty() {
            return Err(Refusal::InUse(format!(
                "{key} is used by service(s) {}: change their chains first",
                users.join(", ")
            )));
        }
        drop(inner);
        self.store.delete_plugin(key)?;
        self.inner.lock().unwrap().state.plugins.remove(key);
        Ok(())
    }

    /// A component's bytes, by sha256: stored, or being pushed.
    pub fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>, Refusal> {
        if let Some(b) = self.staging.get(sha256) {
            return Ok(Some(b.to_vec()));
        }
        Ok(self.store.component(sha256)?)
    }

    /// A receiver of every push announced for prefetch from now on.
    pub fn announcements(&self) -> tokio::sync::broadcast::Receiver<Arc<Announced>> {
        self.staging.subscribe()
    }

    /// Every service: (revision, records).
    pub fn services(&self) -> (u64, Vec<crate::store::ServiceRecord>) {
        let inner = self.inner.lock().unwrap();
        (
            inner.state.revision,
            inner.state.services.values().cloned().collect(),
        )
    }

    /// Delete a service.
    pub fn delete_service(&self, name: &str) -> Result<u64, Refusal> {
        let _writing = self.pending.apply_lock.lock().unwrap();
        let expected = {
            let inner = self.inner.lock().unwrap();
            if !inner.state.services.contains_key(name) {
                return Err(Refusal::NotFound(format!("no service {name:?} is applied")));
            }
            inner.state.revision
        };
        let revision = self
            .store
            .commit_services(expected, &[], &[name.to_string()])?;
        let mut inner = self.inner.lock().unwrap();
        inner.state.revision = revision;
        inner.state.services.remove(name);
        inner.specs.remove(name);
        self.metrics.revision.set(revision as i64);
        self.bump(&mut inner);
        Ok(revision)
    }
}

/// The services whose chains use plugin `m`.
fn users(inner: &Inner, m: &PluginMeta) -> Vec<String> {
    let pushed = format!("{}@{}", m.name, m.version);
    let digest = format!("sha256:{}", m.sha256);
    inner
        .specs
        .iter()
        .filter(|(_, spec)| {
            spec.plugins
                .iter()
                .chain(&spec.inbound_plugins)
                .any(|p| p.source == pushed || p.source.eq_ignore_ascii_case(&digest))
        })
        .map(|(name, _)| name.clone())
        .collect()
}
