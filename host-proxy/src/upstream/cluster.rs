//! Services, subsets and endpoints, and the state that lives outside config
//! snapshots: per-endpoint request counts and ejections. A new snapshot looks
//! its endpoints up in [`EndpointTable`], so a swap neither forgets an
//! ejection nor loses in-flight counts.

// foldhash: these maps are looked up on every request; SipHash cost
// ≈ 1.5k instructions a request across them.
use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmesh_api::SpiffeId;

/// Live state of one endpoint of one service.
#[derive(Debug)]
pub struct EndpointState {
    /// Requests in flight to it.
    pub inflight: AtomicUsize,
    /// Ejected until this many ms after [`EndpointTable::epoch`]; 0: not ejected.
    ejected_until_ms: AtomicU64,
    /// Its HTTP/1.1 connections.
    pub h1: super::pool::H1Conns,
}

/// Every endpoint's live state, keyed by (service, address); and the
/// identity each mesh endpoint must present, by address, for the HTTP/2
/// connector (which sees only the address).
#[derive(Debug)]
pub struct EndpointTable {
    epoch: Instant,
    map: Mutex<HashMap<(String, String), Arc<EndpointState>>>,
    identities: Mutex<HashMap<String, SpiffeId>>,
}

impl Default for EndpointTable {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            map: Mutex::default(),
            identities: Mutex::default(),
        }
    }
}

impl EndpointTable {
    /// The state of (service, address), created on first use.
    pub fn get(&self, service: &str, address: &str) -> Arc<EndpointState> {
        let mut map = self.map.lock().unwrap();
        map.entry((service.to_string(), address.to_string()))
            .or_insert_with(|| {
                Arc::new(EndpointState {
                    inflight: AtomicUsize::new(0),
                    ejected_until_ms: AtomicU64::new(0),
                    h1: Default::default(),
                })
            })
            .clone()
    }

    /// Remember the identity the endpoint at `address` must present.
    pub fn note_identity(&self, address: &str, id: &SpiffeId) {
        let mut ids = self.identities.lock().unwrap();
        if ids.get(address) != Some(id) {
            ids.insert(address.to_string(), id.clone());
        }
    }

    /// The identity the endpoint at `address` must present, if it is a
    /// mesh endpoint.
    pub fn identity_of(&self, address: &str) -> Option<SpiffeId> {
        self.identities.lock().unwrap().get(address).cloned()
    }

    /// Every endpoint's state (a copy of the list, taken under the lock).
    pub fn all(&self) -> Vec<Arc<EndpointState>> {
        self.map.lock().unwrap().values().cloned().collect()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether an endpoint is ejected now.
    pub fn is_ejected(&self, ep: &EndpointState) -> bool {
        let until = ep.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > self.now_ms()
    }

    /// Eject an endpoint for `ms`.
    pub fn eject(&self, ep: &EndpointState, ms: u32) {
        ep.ejected_until_ms
            .store(self.now_ms() + u64::from(ms), Ordering::Relaxed);
    }
}

/// One endpoint of a service, as a snapshot knows it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `ip:port`.
    pub address: Arc<str>,
    /// The same, parsed once: to connect to,
    pub socket: std::net::SocketAddr,
    /// and for upstream request URIs.
    pub authority: http::uri::Authority,
    /// Its subset.
    pub subset: Arc<str>,
    /// Live state, shared across snapshots.
    pub state: Arc<EndpointState>,
    /// The SPIFFE ID it must present: reached over mesh mTLS (when this
    /// proxy has an identity). `None`: plaintext.
    pub identity: Option<Arc<SpiffeId>>,
}

/// The endpoints of every service of a snapshot, for load balancing and for
/// plugins' `endpoints` / `eject` calls.
#[derive(Debug, Default)]
pub struct ClusterView {
    /// Endpoints by service name, subsets in name order.
    pub services: HashMap<String, Arc<[Endpoint]>>,
    /// The live-state table.
    pub table: Arc<EndpointTable>,
}

impl ClusterView {
    /// Endpoints of a service.
    pub fn endpoints(&self, service: &str) -> &[Endpoint] {
        self.services.get(service).map_or(&[], |e| e)
    }
}

/// The endpoints of one service as load balancing sees them: every
/// endpoint, each subset's, and the round-robin cursor.
#[derive(Debug)]
pub struct Cluster {
    /// Endpoints, subsets in name order.
    pub endpoints: Arc<[Endpoint]>,
    /// Indexes into `endpoints` per subset.
    subsets: HashMap<Arc<str>, Vec<usize>>,
    /// Every index into `endpoints`.
    all: Vec<usize>,
    /// Round-robin cursor.
    rr: AtomicUsize,
}

impl Cluster {
    /// Balance over `endpoints`.
    pub fn new(endpoints: Arc<[Endpoint]>) -> Self {
        let mut subsets: HashMap<Arc<str>, Vec<usize>> = HashMap::default();
        for (i, e) in endpoints.iter().enumerate() {
            subsets.entry(e.subset.clone()).or_default().push(i);
        }
        Self {
            all: (0..endpoints.len()).collect(),
            subsets,
            endpoints,
            rr: AtomicUsize::new(0),
        }
    }

    /// Pick an endpoint: round robin over the subset (all endpoints without
    /// one), skipping ejected ones and, when another exists, `avoid` (the
    /// endpoint the previous attempt went to).
    pub fn pick(
        &self,
        table: &EndpointTable,
        subset: Option<&str>,
        avoid: Option<&str>,
    ) -> Option<&Endpoint> {
        let candidates: &[usize] = match subset {
            Some(s) => self.subsets.get(s).map_or(&[], |v| v.as_slice()),
            None => &self.all,
        };
        if candidates.is_empty() {
            return None;
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for k in 0..candidates.len() {
            let e = &self.endpoints[candidates[(start + k) % candidates.len()]];
            if table.is_ejected(&e.state) {
                continue;
            }
            if avoid == Some(&*e.address) {
                fallback.get_or_insert(e);
                continue;
            }
            return Some(e);
        }
        fallback
    }
}
