//! Control's durable state behind one narrow interface, [`Store`]: pushed
//! plugins (metadata, and component bytes stored once per sha256), the
//! services applied, and the config revision. The embedded implementation
//! ([`embedded::Embedded`], on redb) is the default; a replicated one (etcd)
//! implements the same trait.
//!
//! Every write is one transaction: it happens whole or not at all, and once
//! a method returns `Ok` the write survives a crash of the process
//! (`kill -9`) or of the machine.

pub mod embedded;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A pushed plugin version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginMeta {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Hex sha256 of its component.
    pub sha256: String,
    /// The component's size.
    pub size: u64,
    /// The hooks it implements.
    pub hooks: Vec<String>,
    /// When it was pushed, ms since the Unix epoch.
    pub pushed_at_ms: i64,
}

impl PluginMeta {
    /// `NAME@VERSION`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// A service as applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its spec as written (the mesh file's per-service keys), as JSON.
    pub spec: serde_json::Value,
    /// The revision that last changed it.
    pub revision: u64,
}

/// An endpoint a proxy registered: its app's address, as an endpoint of its
/// service and subset. Kept across control restarts, so that a restarted
/// control serves every endpoint it knew while proxies reconnect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The service.
    pub service: String,
    /// The subset.
    pub subset: String,
    /// The proxy instance that registered it.
    pub instance: String,
    /// `ip:port`.
    pub address: String,
}

impl EndpointRecord {
    /// Its key: `SERVICE/INSTANCE`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.service, self.instance)
    }
}

/// Everything the store holds but component bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// The config revision: +1 per accepted apply or delete.
    pub revision: u64,
    /// Services by name.
    pub services: BTreeMap<String, ServiceRecord>,
    /// Plugins by `NAME@VERSION`.
    pub plugins: BTreeMap<String, PluginMeta>,
    /// Registered endpoints by `SERVICE/INSTANCE`.
    pub endpoints: BTreeMap<String, EndpointRecord>,
}

/// What pushing a plugin did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored.
    Created,
    /// The same bytes were already stored under this `NAME@VERSION`.
    Unchanged,
}

/// Why a store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `NAME@VERSION` exists with other bytes: pushed versions are
    /// immutable.
    #[error(
        "{key} is already pushed with other bytes (sha256 {existing}); a pushed version never changes: push it as a new version"
    )]
    Immutable {
        /// `NAME@VERSION`.
        key: String,
        /// The sha256 stored.
        existing: String,
    },
    /// The revision moved since it was read (another writer got there
    /// first).
    #[error("the config changed meanwhile (revision {actual}, expected {expected}); apply again")]
    Conflict {
        /// What the writer read.
        expected: u64,
        /// What the store holds.
        actual: u64,
    },
    /// The store itself failed (disk, corruption, connection).
    #[error("the store failed: {0}")]
    Backend(String),
}

/// Control's durable state.
pub trait Store: Send + Sync + 'static {
    /// Everything but component bytes.
    fn load(&self) -> Result<State, StoreError>;

    /// Store a plugin version and its component (once per sha256).
    fn put_plugin(&self, meta: &PluginMeta, component: &[u8]) -> Result<Pushed, StoreError>;

    /// A component's bytes, by hex sha256.
    fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Remove a plugin version (its component too when no other version
    /// uses it). Returns whether it existed.
    fn delete_plugin(&self, key: &str) -> Result<bool, StoreError>;

    /// Write services and remove others in one transaction, if the
    /// revision is still `expected`; returns the new revision
    /// (`expected + 1`), which each written record carries.
    fn commit_services(
        &self,
        expected: u64,
        upserts: &[ServiceRecord],
        deletes: &[String],
    ) -> Result<u64, StoreError>;

    /// Record and forget registered endpoints (by `SERVICE/INSTANCE`), in
    /// one transaction. They are not config: the revision does not move.
    fn commit_endpoints(
        &self,
        upserts: &[EndpointRecord],
        deletes: &[String],
    ) -> Result<(), StoreError>;
}
