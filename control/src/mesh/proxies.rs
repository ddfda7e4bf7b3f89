//! Connected proxies: who they are, what they applied, what they refused,
//! and the endpoints they registered (their apps' addresses). A proxy that
//! disconnects keeps its endpoint for the grace period, then loses it;
//! endpoints are written to the store (in batches) so that a restarted
//! control serves them while proxies reconnect.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use wasmesh_api::proto;

use super::{Inner, Mesh, now_ms};
use crate::store::EndpointRecord;
use crate::tls::PeerCert;

fn ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One proxy, connected or gone within the grace period.
pub(super) struct Entry {
    /// The connection that owns the entry now.
    conn: u64,
    pub(super) hello: proto::Hello,
    connected_at_ms: i64,
    last_reply_at_ms: i64,
    applied: String,
    nack: Option<(String, String)>,
    /// When its stream ended; `None` while connected.
    gone_since: Option<Instant>,
    /// Its SPIFFE ID, verified by its TLS client certificate.
    identity: Option<String>,
    /// When its certificate expires, ms since the epoch (0: none known).
    cert_expires_at_ms: i64,
    /// The endpoint it registered.
    endpoint: String,
    /// Its recent edge counters.
    pub(super) reports: super::top::Reports,
}

/// Proxies by (service, instance), and endpoints registered.
#[derive(Default)]
pub(super) struct Proxies {
    entries: BTreeMap<(String, String), Entry>,
    /// Registered endpoints by `SERVICE/INSTANCE`, with when their proxy
    /// went away (`None`: connected). Records loaded from the store start as
    /// gone since control started.
    endpoints: BTreeMap<String, (EndpointRecord, Option<Instant>)>,
    next_conn: u64,
}

impl Proxies {
    /// The endpoints the store remembers: alone on the store (`shared`
    /// false), control owns them all, gone since now (they expire unless
    /// their proxies come back); on a store other replicas share, they are
    /// theirs, kept while the store holds them.
    pub(super) fn from_records(records: &BTreeMap<String, EndpointRecord>, shared: bool) -> Self {
        let now = Instant::now();
        let gone = (!shared).then_some(now);
        Self {
            endpoints: records
                .iter()
                .map(|(k, r)| (k.clone(), (r.clone(), gone)))
                .collect(),
            ..Self::default()
        }
    }

    /// Take the endpoints other replicas registered, as the store holds
    /// them now (`me` is this replica): new and changed ones in; removed
    /// ones expire after the grace period. An endpoint of this replica's
    /// that another replica now holds (its proxy moved there) becomes that
    /// replica's. Whether any changed now.
    pub(super) fn merge(&mut self, stored: &BTreeMap<String, EndpointRecord>, me: &str) -> bool {
        let mut changed = false;
        for (k, r) in stored.iter().filter(|(_, r)| r.owner != me) {
            let take = match self.endpoints.get(k) {
                None => true,
                Some((known, _)) if known == r => false,
                // Ours while our proxy is connected; once it is gone, the
                // other replica's registration wins.
                Some((known, gone)) => known.owner != me || gone.is_some(),
            };
            if take {
                self.endpoints.insert(k.clone(), (r.clone(), None));
                changed = true;
            }
        }
        // Another replica's endpoint the store no longer holds (its proxy
        // went away, or the replica itself and its lease did): kept for the
        // grace period, as a proxy that loses its control keeps its own.
        let now = Instant::now();
        for (k, (r, gone)) in &mut self.endpoints {
            if r.owner != me && gone.is_none() && !stored.contains_key(k) {
                *gone = Some(now);
            }
        }
        changed
    }

    /// The proxies connected now (not those gone within the grace
    /// period).
    pub(super) fn live(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().filter(|e| e.gone_since.is_none())
    }

    /// The entry `h` owns (not one a newer connection of the same proxy
    /// took over).
    pub(super) fn owned(&mut self, h: &ProxyHandle) -> Option<&mut Entry> {
        self.entries.get_mut(&h.key).filter(|e| e.conn == h.conn)
    }

    /// Registered endpoints of `service`.
    pub(super) fn registered(&self, service: &str) -> Vec<EndpointRecord> {
        self.endpoints
            .values()
            .filter(|(r, _)| r.service == service)
            .map(|(r, _)| r.clone())
            .collect()
    }
}

/// A connected proxy's place in [`Mesh`]; given back on every reply and
/// when the stream ends.
#[derive(Clone, Debug)]
pub struct ProxyHandle {
    pub(super) key: (String, String),
    conn: u64,
    /// Its own service.
    pub service: String,
}

/// Endpoint writes waiting for the batch writer, and the lock that orders
/// config writes.
#[derive(Default)]
pub(super) struct PendingEndpoints {
    writes: Mutex<BTreeMap<String, Option<EndpointRecord>>>,
    /// Proxy status for the other replicas (encoded), by
    /// `SERVICE/INSTANCE`; `None`: gone.
    statuses: Mutex<BTreeMap<String, Option<Vec<u8>>>>,
    wake: tokio::sync::Notify,
    /// Held by an apply or a delete from its revision read to its commit.
    pub(super) apply_lock: Mutex<()>,
}

impl Mesh {
    /// A proxy connected and said who it is; `peer` is its verified
    /// certificate, when it came over TLS with one. It registers its inbound
    /// listener as its service's endpoint (over mesh mTLS when it has an
    /// identity), or without one its app's address.
    pub fn connect(&self, hello: proto::Hello, peer: Option<&PeerCert>) -> ProxyHandle {
        let mut inner = self.inner.lock().unwrap();
        inner.proxies.next_conn += 1;
        let conn = inner.proxies.next_conn;
        let key = (hello.service.clone(), hello.instance.clone());
        let (address, identity) = if hello.inbound_address.is_empty() {
            (hello.app_address.clone(), String::new())
        } else {
            let id = peer.map(|p| p.id.to_string()).unwrap_or_default();
            (hello.inbound_address.clone(), id)
        };
        let endpoint = (!address.is_empty()).then(|| EndpointRecord {
            service: hello.service.clone(),
            subset: hello.subset.clone(),
            instance: hello.instance.clone(),
            address: address.clone(),
            identity,
            owner: self.replica.clone(),
        });
        let cert_expires_at_ms = match peer {
            Some(p) => ms(p.not_after),
            None => hello.certificate.as_ref().map_or(0, |c| c.expires_at_ms),
        };
        let handle = ProxyHandle {
            key: key.clone(),
            conn,
            service: hello.service.clone(),
        };
        inner.proxies.entries.insert(
            key,
            Entry {
                conn,
                applied: hello.applied_version.clone(),
                hello,
                connected_at_ms: now_ms(),
                last_reply_at_ms: 0,
                nack: None,
                gone_since: None,
                identity: peer.map(|p| p.id.to_string()),
                cert_expires_at_ms,
                endpoint: address,
                reports: Default::default(),
            },
        );
        self.metrics.connected.set(connected(&inner) as i64);
        if let Some(e) = inner.proxies.entries.get(&handle.key) {
            self.publish(e);
        }
        if let Some(r) = endpoint {
            let k = r.key();
            let known = inner.proxies.endpoints.get(&k).map(|(e, _)| e.clone());
            inner.proxies.endpoints.insert(k.clone(), (r.clone(), None));
            if known.as_ref() != Some(&r) {
                self.write_endpoint(k, Some(r));
                self.bump(&mut inner);
            }
        }
        handle
    }

    /// A proxy ACKed (`error` empty) or NACKed a version.
    pub fn reply(&self, h: &ProxyHandle, version: &str, error: &str) {
        let mut inner = self.inner.lock().unwrap();
        let Inner {
            proxies,
            changed_at,
            ..
        } = &mut *inner;
        let Some(e) = proxies.owned(h) else {
            return;
        };
        e.last_reply_at_ms = now_ms();
        if error.is_empty() {
            e.applied = version.to_string();
            e.nack = None;
            self.metrics.acks.inc();
            self.metrics
                .fanout
                .observe(changed_at.elapsed().as_secs_f64());
        } else {
            e.nack = Some((version.to_string(), error.to_string()));
            self.metrics.nacks.inc();
            tracing::warn!(
                service = %h.key.0,
                instance = %h.key.1,
                version,
                "proxy refused the snapshot: {error}"
            );
        }
        self.publish(e);
    }

    /// A proxy renewed its certificate. Over mutual TLS only a report for
    /// the identity it connected with counts.
    pub fn certificate(&self, h: &ProxyHandle, c: &proto::CertificateStatus) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(e) = inner.proxies.owned(h)
            && e.identity.as_ref().is_none_or(|id| *id == c.spiffe_id)
        {
            e.cert_expires_at_ms = c.expires_at_ms;
            self.publish(e);
        }
    }

    /// A proxy's stream ended.
    pub fn disconnect(&self, h: &ProxyHandle) {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        if let Some(e) = inner.proxies.owned(h) {
            e.gone_since = Some(now);
        }
        let k = format!("{}/{}", h.key.0, h.key.1);
        let owned = inner
            .proxies
            .entries
            .get(&h.key)
            .is_some_and(|e| e.conn == h.conn);
        if owned && let Some((_, gone)) = inner.proxies.endpoints.get_mut(&k) {
            *gone = Some(now);
        }
        if owned && self.shared {
            self.pending.statuses.lock().unwrap().insert(k, None);
            self.pending.wake.notify_one();
        }
        self.metrics.connected.set(connected(&inner) as i64);
    }

    /// Forget proxies and endpoints gone longer than the grace period.
    pub fn expire(&self) {
        let mut inner = self.inner.lock().unwrap();
        let grace = self.grace;
        let expired: Vec<String> = inner
            .proxies
            .endpoints
            .iter()
            .filter(|(_, (_, gone))| gone.is_some_and(|g| g.elapsed() >= grace))
            .map(|(k, _)| k.clone())
            .collect();
        inner
            .proxies
            .entries
            .retain(|_, e| e.gone_since.is_none_or(|g| g.elapsed() < grace));
        if expired.is_empty() {
            return;
        }
        for k in expired {
            // Another replica's is already gone from the store.
            let own = inner
                .proxies
                .endpoints
                .remove(&k)
                .is_some_and(|(r, _)| r.owner == self.replica);
            if own || !self.shared {
                self.write_endpoint(k, None);
            }
        }
        self.bump(&mut inner);
    }

    /// Publish `e`'s status for the other replicas (on a shared store).
    fn publish(&self, e: &Entry) {
        if !self.shared {
            return;
        }
        let key = format!("{}/{}", e.hello.service, e.hello.instance);
        let bytes = prost::Message::encode_to_vec(&status_of(e));
        self.pending
            .statuses
            .lock()
            .unwrap()
            .insert(key, Some(bytes));
        self.pending.wake.notify_one();
    }

    fn write_endpoint(&self, key: String, record: Option<EndpointRecord>) {
        self.pending.writes.lock().unwrap().insert(key, record);
        self.pending.wake.notify_one();
    }

    /// Write registered endpoints to the store in batches; runs for the
    /// life of control.
    pub async fn write_endpoints(self: std::sync::Arc<Self>) {
        loop {
            self.pending.wake.notified().await;
            // Let a burst of connects gather into one transaction.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let batch = std::mem::take(&mut *self.pending.writes.lock().unwrap());
            let (upserts, deletes): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|(_, r)| r.is_some());
            let upserts: Vec<EndpointRecord> = upserts.into_iter().filter_map(|(_, r)| r).collect();
            let deletes: Vec<String> = deletes.into_iter().map(|(k, _)| k).collect();
            let statuses = std::mem::take(&mut *self.pending.statuses.lock().unwrap());
            let (published, gone): (Vec<_>, Vec<_>) =
                statuses.into_iter().partition(|(_, s)| s.is_some());
            let published: Vec<(String, Vec<u8>)> = published
                .into_iter()
                .filter_map(|(k, s)| Some((k, s?)))
                .collect();
            let gone: Vec<String> = gone.into_iter().map(|(k, _)| k).collect();
            let store = self.store.clone();
            let r = tokio::task::spawn_blocking(move || {
                if !(upserts.is_empty() && deletes.is_empty()) {
                    store.commit_endpoints(&upserts, &deletes)?;
                }
                if !(published.is_empty() && gone.is_empty()) {
                    store.commit_statuses(&published, &gone)?;
                }
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::error!("could not record registered endpoints and proxy status: {e}");
            }
        }
    }

    /// The status of every proxy known (connected, or gone within the grace
    /// period), and the revision.
    pub fn status(&self) -> proto::ProxiesResponse {
        let mut out = Vec::new();
        let services: Vec<String> = {
            let inner = self.inner.lock().unwrap();
            inner
                .proxies
                .live()
                .map(|e| e.hello.service.clone())
                .collect()
        };
        let latest: BTreeMap<String, String> = services
            .into_iter()
            .map(|s| {
                let v = self.snapshot(&s).version.clone();
                (s, v)
            })
            .collect();
        let inner = self.inner.lock().unwrap();
        for e in inner.proxies.live() {
            out.push(proto::ProxyStatus {
                latest_version: latest.get(&e.hello.service).cloned().unwrap_or_default(),
                ..status_of(e)
            });
        }
        let revision = inner.state.revision;
        drop(inner);
        // Beside other replicas: their proxies too, as they published them.
        if self.shared {
            let mine: std::collections::BTreeSet<(String, String)> = out
                .iter()
                .map(|p| (p.service.clone(), p.instance.clone()))
                .collect();
            match self.store.statuses() {
                Ok(published) => {
                    for (_, bytes) in published {
                        let Ok(mut p) =
                            <proto::ProxyStatus as prost::Message>::decode(bytes.as_slice())
                        else {
                            continue;
                        };
                        if mine.contains(&(p.service.clone(), p.instance.clone())) {
                            continue;
                        }
                        p.latest_version = self.snapshot(&p.service).version.clone();
                        out.push(p);
                    }
                }
                Err(e) => tracing::warn!("could not read the other replicas' proxies: {e}"),
            }
            out.sort_by(|a, b| (&a.service, &a.instance).cmp(&(&b.service, &b.instance)));
        }
        proto::ProxiesResponse {
            revision,
            proxies: out,
        }
    }
}

/// What control shows of a proxy (its latest version aside: that is the
/// reader's to compute).
fn status_of(e: &Entry) -> proto::ProxyStatus {
    let (nacked_version, nack_reason) = e.nack.clone().unwrap_or_default();
    proto::ProxyStatus {
        service: e.hello.service.clone(),
        subset: e.hello.subset.clone(),
        instance: e.hello.instance.clone(),
        app_address: e.hello.app_address.clone(),
        proxy_version: e.hello.proxy_version.clone(),
        latest_version: String::new(),
        applied_version: e.applied.clone(),
        nacked_version,
        nack_reason,
        connected_at_ms: e.connected_at_ms,
        last_reply_at_ms: e.last_reply_at_ms,
        spiffe_id: e.identity.clone().unwrap_or_default(),
        certificate_expires_at_ms: e.cert_expires_at_ms,
        endpoint: e.endpoint.clone(),
    }
}

fn connected(inner: &Inner) -> usize {
    inner.proxies.live().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(instance: &str, owner: &str, address: &str) -> EndpointRecord {
        EndpointRecord {
            service: "reviews".into(),
            subset: "v1".into(),
            instance: instance.into(),
            address: address.into(),
            identity: String::new(),
            owner: owner.into(),
        }
    }

    fn stored(records: &[EndpointRecord]) -> BTreeMap<String, EndpointRecord> {
        records.iter().map(|r| (r.key(), r.clone())).collect()
    }

    #[test]
    fn other_replicas_endpoints_come_change_and_expire_and_ours_stay_ours() {
        let mut p = Proxies::default();
        // Ours: a connected proxy's, and one whose proxy went away.
        p.endpoints.insert(
            "reviews/mine".into(),
            (record("mine", "me", "10.0.0.1:1"), None),
        );
        let left = Instant::now();
        p.endpoints.insert(
            "reviews/moved".into(),
            (record("moved", "me", "10.0.0.2:1"), Some(left)),
        );

        let theirs = record("theirs", "r2", "10.0.0.3:1");
        // The moved proxy is on r2 now; r2 also claims "mine", which is
        // connected here: ours wins until it goes away.
        let moved = record("moved", "r2", "10.0.0.2:1");
        let contested = record("mine", "r2", "10.0.0.9:1");
        assert!(p.merge(&stored(&[theirs.clone(), moved.clone(), contested]), "me"));
        assert_eq!(p.endpoints["reviews/theirs"], (theirs.clone(), None));
        assert_eq!(p.endpoints["reviews/moved"], (moved.clone(), None));
        assert_eq!(p.endpoints["reviews/mine"].0.owner, "me");
        // Nothing new: nothing changed.
        let same = stored(&[theirs.clone(), moved.clone()]);
        assert!(!p.merge(&same, "me"));
        // r2's registration changes address; then leaves the store: kept,
        // gone since now (it expires after the grace period).
        let changed = record("theirs", "r2", "10.0.0.4:1");
        assert!(p.merge(&stored(&[changed.clone(), moved.clone()]), "me"));
        assert_eq!(p.endpoints["reviews/theirs"].0, changed);
        p.merge(&stored(&[moved]), "me");
        let (r, gone) = &p.endpoints["reviews/theirs"];
        assert_eq!(r, &changed);
        assert!(gone.is_some());
        assert!(p.endpoints["reviews/mine"].1.is_none());
    }
}
