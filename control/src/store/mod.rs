//! Control's durable state behind one narrow interface, [`Store`]: pushed
//! plugins (metadata, and component bytes stored once per sha256), the
//! services applied, and the config revision. The embedded implementation
//! ([`embedded::Embedded`], on redb) is the default; a replicated one (etcd)
//! implements the same trait.
//!
//! Every write is one transaction: it happens whole or not at all, and once
//! a method returns `Ok` the write survives a crash of the process
//! (`kill -9`) or of the machine.

#[cfg(test)]
mod conformance;
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;

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
    /// The SPIFFE ID its proxy presents (reached over mesh mTLS); empty:
    /// plaintext.
    #[serde(default)]
    pub identity: String,
    /// The control replica its proxy is connected to, which alone expires
    /// it (empty: written before replicas were told apart).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
}

impl EndpointRecord {
    /// Its key: `SERVICE/INSTANCE`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.service, self.instance)
    }
}

/// The mesh CA as stored: its trust domain and PEM material. (The key is
/// as secret as the store: control's data directory is its own, mode 700.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    /// The trust domain it issues for.
    pub trust_domain: String,
    /// The CA certificate and any intermediates, PEM.
    pub chain_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The trust anchors, PEM.
    pub roots_pem: String,
}

/// A join token as control keeps it: never the secret, only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its public id.
    pub id: String,
    /// Hex sha256 of its secret.
    pub secret_sha256: String,
    /// The service it lets a proxy speak for.
    pub service: String,
    /// The service's namespace.
    pub namespace: String,
    /// Unusable from then, ms since the Unix epoch.
    pub expires_at_ms: i64,
    /// Proxies it was made for.
    pub uses: u32,
    /// Proxies that may still use it.
    pub uses_left: u32,
    /// When it was made, ms since the Unix epoch.
    pub created_at_ms: i64,
}

/// Why a join token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No such token (or its secret is wrong: the two look the same).
    #[error("the join token is not known to this control (wrong, deleted, or of another mesh)")]
    Unknown,
    /// Past its expiry.
    #[error("the join token {id} expired at {at}; create a new one with `wasmesh token create`")]
    Expired {
        /// The token's id.
        id: String,
        /// When, RFC 3339.
        at: String,
    },
    /// Every use taken.
    #[error(
        "the join token {id} is used up (it allowed {uses} proxies); create a new one, with --uses for several replicas"
    )]
    UsedUp {
        /// The token's id.
        id: String,
        /// The uses it had.
        uses: u32,
    },
    /// A proxy asked for another service than the token's.
    #[error(
        "the join token {id} is for service {service} in namespace {namespace}; this proxy asks to be {asked}"
    )]
    WrongService {
        /// The token's id.
        id: String,
        /// The token's service.
        service: String,
        /// The token's namespace.
        namespace: String,
        /// What the proxy asked for, `NAMESPACE/SERVICE`.
        asked: String,
    },
}

impl TokenRecord {
    /// Whether a proxy holding a token with secret hash `secret_sha256` may
    /// be `service` in `namespace` (None: the token's) at `now_ms`.
    pub fn admit(
        &self,
        secret_sha256: &str,
        service: &str,
        namespace: Option<&str>,
        now_ms: i64,
    ) -> Result<(), TokenRefusal> {
        let same = secret_sha256.len() == self.secret_sha256.len()
            && secret_sha256
                .bytes()
                .zip(self.secret_sha256.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(TokenRefusal::Unknown);
        }
        if now_ms >= self.expires_at_ms {
            return Err(TokenRefusal::Expired {
                id: self.id.clone(),
                at: rfc3339(self.expires_at_ms),
            });
        }
        if self.uses_left == 0 {
            return Err(TokenRefusal::UsedUp {
                id: self.id.clone(),
                uses: self.uses,
            });
        }
        if service != self.service || namespace.is_some_and(|n| n != self.namespace) {
            return Err(TokenRefusal::WrongService {
                id: self.id.clone(),
                service: self.service.clone(),
                namespace: self.namespace.clone(),
                asked: format!("{}/{service}", namespace.unwrap_or(&self.namespace)),
            });
        }
        Ok(())
    }
}

/// A time in ms since the epoch, as RFC 3339 (UTC, seconds).
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms since the epoch"))
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

    /// The mesh CA, if one was stored.
    fn ca(&self) -> Result<Option<CaRecord>, StoreError>;

    /// Store `ca` unless one is stored already; returns the stored one
    /// (so that of two controls starting at once, both use the first).
    fn init_ca(&self, ca: &CaRecord) -> Result<CaRecord, StoreError>;

    /// Keep a new join token.
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// A receiver whose value moves whenever another writer may have
    /// changed the store (another control replica); `None` for a store only
    /// this process writes.
    fn watch(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Publish this replica's proxies' status (each encoded, by
    /// `SERVICE/INSTANCE`) for the other replicas to show, for as long as
    /// this replica lives; a store no other replica reads keeps nothing.
    fn commit_statuses(
        &self,
        upserts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        let _ = (upserts, deletes);
        Ok(())
    }

    /// Every replica's published proxy status, by `SERVICE/INSTANCE`.
    fn statuses(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(Vec::new())
    }

    /// Take or keep the lead among the replicas sharing this store (for
    /// duties one replica does for all); alone on its store, control always
    /// leads.
    fn lead(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Remove component bytes that no plugin version names (left by a push
    /// interrupted between its bytes and its entry): how many components'
    /// bytes went. The leader's duty; a store whose pushes are single
    /// transactions has none to remove.
    fn collect_garbage(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Use a join token once, atomically: it must [`TokenRecord::admit`]
    /// the proxy; then one use is taken.
    fn redeem_token(
        &self,
        id: &str,
        secret_sha256: &str,
        service: &str,
        namespace: Option<&str>,
        now_ms: i64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError>;
}
