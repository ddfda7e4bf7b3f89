//! The embedded store: one redb file in the data directory. redb because it
//! is a transactional key-value store in pure Rust with no server to run,
//! whose commits are durable when they return (copy-on-write pages and a
//! checksummed commit record: a crash mid-commit leaves the previous
//! commit), which is exactly what a control plane on a laptop or a small
//! cluster needs; SQLite would do as well, at the price of a C library and
//! SQL for five tables.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    CaRecord, EndpointRecord, PluginMeta, Pushed, ServiceRecord, State, Store, StoreError,
    TokenRecord, TokenRefusal,
};

/// `NAME@VERSION` → [`PluginMeta`] (JSON).
const PLUGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("plugins");
/// sha256 → component bytes.
const COMPONENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("components");
/// Service name → [`ServiceRecord`] (JSON).
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
/// `SERVICE/INSTANCE` → [`EndpointRecord`] (JSON).
const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
/// `ca` → [`CaRecord`] (JSON).
const CA: TableDefinition<&str, &[u8]> = TableDefinition::new("ca");
/// Token id → [`TokenRecord`] (JSON).
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// `revision` → the config revision.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The store in `DIR/control.redb`.
pub struct Embedded {
    db: Database,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records serialize")
}

impl Embedded {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Database::create(dir.join("control.redb")).map_err(backend)?;
        // Create the tables, so that reads never meet a missing one.
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(PLUGINS).map_err(backend)?;
        tx.open_table(COMPONENTS).map_err(backend)?;
        tx.open_table(SERVICES).map_err(backend)?;
        tx.open_table(ENDPOINTS).map_err(backend)?;
        tx.open_table(META).map_err(backend)?;
        tx.open_table(CA).map_err(backend)?;
        tx.open_table(TOKENS).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(Self { db })
    }
}

impl Store for Embedded {
    fn load(&self) -> Result<State, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let mut state = State {
            revision: tx
                .open_table(META)
                .map_err(backend)?
                .get("revision")
                .map_err(backend)?
                .map_or(0, |v| v.value()),
            ..State::default()
        };
        for entry in tx
            .open_table(PLUGINS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = entry.map_err(backend)?;
            let meta: PluginMeta = serde_json::from_slice(v.value()).map_err(backend)?;
            state.plugins.insert(k.value().to_string(), meta);
        }
        for entry in tx
            .open_table(SERVICES)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = entry.map_err(backend)?;
            let record: ServiceRecord = serde_json::from_slice(v.value()).map_err(backend)?;
            state.services.insert(k.value().to_string(), record);
        }
        for entry in tx
            .open_table(ENDPOINTS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, v) = entry.map_err(backend)?;
            let record: EndpointRecord = serde_json::from_slice(v.value()).map_err(backend)?;
            state.endpoints.insert(k.value().to_string(), record);
        }
        Ok(state)
    }

    fn put_plugin(&self, meta: &PluginMeta, component: &[u8]) -> Result<Pushed, StoreError> {
        let key = meta.key();
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut plugins = tx.open_table(PLUGINS).map_err(backend)?;
            if let Some(existing) = plugins.get(key.as_str()).map_err(backend)? {
                let existing: PluginMeta =
                    serde_json::from_slice(existing.value()).map_err(backend)?;
                return if existing.sha256 == meta.sha256 {
                    Ok(Pushed::Unchanged)
                } else {
                    Err(StoreError::Immutable {
                        key,
                        existing: existing.sha256,
                    })
                };
            }
            plugins
                .insert(key.as_str(), json(meta).as_slice())
                .map_err(backend)?;
            let mut components = tx.open_table(COMPONENTS).map_err(backend)?;
            if components
                .get(meta.sha256.as_str())
                .map_err(backend)?
                .is_none()
            {
                components
                    .insert(meta.sha256.as_str(), component)
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)?;
        Ok(Pushed::Created)
    }

    fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(COMPONENTS).map_err(backend)?;
        Ok(table
            .get(sha256)
            .map_err(backend)?
            .map(|v| v.value().to_vec()))
    }

    fn delete_plugin(&self, key: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut plugins = tx.open_table(PLUGINS).map_err(backend)?;
            let removed: PluginMeta = match plugins.remove(key).map_err(backend)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(backend)?,
                None => return Ok(false),
            };
            // The component goes too, unless another version has the same
            // bytes.
            let mut shared = false;
            for entry in plugins.iter().map_err(backend)? {
                let (_, v) = entry.map_err(backend)?;
                let other: PluginMeta = serde_json::from_slice(v.value()).map_err(backend)?;
                shared |= other.sha256 == removed.sha256;
            }
            if !shared {
                let mut components = tx.open_table(COMPONENTS).map_err(backend)?;
                components
                    .remove(removed.sha256.as_str())
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)?;
        Ok(true)
    }

    fn commit_services(
        &self,
        expected: u64,
        upserts: &[ServiceRecord],
        deletes: &[String],
    ) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let revision = {
            let mut meta = tx.open_table(META).map_err(backend)?;
            let actual = meta
                .get("revision")
                .map_err(backend)?
                .map_or(0, |v| v.value());
            if actual != expected {
                return Err(StoreError::Conflict { expected, actual });
            }
            let revision = actual + 1;
            meta.insert("revision", revision).map_err(backend)?;
            let mut services = tx.open_table(SERVICES).map_err(backend)?;
            for r in upserts {
                let r = ServiceRecord {
                    revision,
                    ..r.clone()
                };
                services
                    .insert(r.name.as_str(), json(&r).as_slice())
                    .map_err(backend)?;
            }
            for name in deletes {
                services.remove(name.as_str()).map_err(backend)?;
            }
            revision
        };
        tx.commit().map_err(backend)?;
        Ok(revision)
    }

    fn commit_endpoints(
        &self,
        upserts: &[EndpointRecord],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut table = tx.open_table(ENDPOINTS).map_err(backend)?;
            for r in upserts {
                table
                    .insert(r.key().as_str(), json(r).as_slice())
                    .map_err(backend)?;
            }
            for k in deletes {
                table.remove(k.as_str()).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn ca(&self) -> Result<Option<CaRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(CA).map_err(backend)?;
        table
            .get("ca")
            .map_err(backend)?
            .map(|v| serde_json::from_slice(v.value()).map_err(backend))
            .transpose()
    }

    fn init_ca(&self, ca: &CaRecord) -> Result<CaRecord, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let stored = {
            let mut table = tx.open_table(CA).map_err(backend)?;
            let existing = table
                .get("ca")
                .map_err(backend)?
                .map(|v| serde_json::from_slice::<CaRecord>(v.value()).map_err(backend))
                .transpose()?;
            match existing {
                Some(e) => e,
                None => {
                    table.insert("ca", json(ca).as_slice()).map_err(backend)?;
                    ca.clone()
                }
            }
        };
        tx.commit().map_err(backend)?;
        Ok(stored)
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        tx.open_table(TOKENS)
            .map_err(backend)?
            .insert(token.id.as_str(), json(token).as_slice())
            .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    fn redeem_token(
        &self,
        id: &str,
        secret_sha256: &str,
        service: &str,
        namespace: Option<&str>,
        now_ms: i64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let granted = {
            let mut table = tx.open_table(TOKENS).map_err(backend)?;
            let record = table
                .get(id)
                .map_err(backend)?
                .map(|v| serde_json::from_slice::<TokenRecord>(v.value()).map_err(backend))
                .transpose()?;
            let Some(mut record) = record else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            if let Err(refusal) = record.admit(secret_sha256, service, namespace, now_ms) {
                return Ok(Err(refusal));
            }
            record.uses_left -= 1;
            table
                .insert(id, json(&record).as_slice())
                .map_err(backend)?;
            record
        };
        tx.commit().map_err(backend)?;
        Ok(Ok(granted))
    }
}
