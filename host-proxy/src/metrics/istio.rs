//! Istio's standard request metrics, with Istio's names, label set and
//! buckets, so that Istio's Grafana dashboards and Kiali's queries read a
//! wasmesh mesh unchanged: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and
//! `istio_response_bytes`.
//!
//! Each sidecar reports the requests it handles from its own side:
//! `reporter="source"` on its outbound listener (the local app calling a
//! service), `reporter="destination"` on its inbound listener (a peer
//! calling the local service). The proxy's own side comes from its
//! workload (its service, subset and SPIFFE ID); the other side from what
//! the request showed: the peer's verified certificate inbound, the
//! endpoint routed to (its service, subset and identity) outbound. A label
//! with no value is `unknown`, as Istio writes it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use foldhash::HashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::Histogram;
use wasmesh_api::SpiffeId;

use crate::flags::ResponseFlag;

/// Most distinct label sets kept; requests past it are counted in
/// `wasmesh_metric_series_overflow_total` instead.
pub const MAX_SERIES: usize = 10_000;

const UNKNOWN: &str = "unknown";

/// Istio's default buckets for request durations, in milliseconds.
const DURATION_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's default buckets for body sizes, in bytes.
const BYTES: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Which side of a request this proxy reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The caller's sidecar (outbound).
    #[default]
    Source,
    /// The callee's sidecar (inbound).
    Destination,
}

/// Who this proxy is: its side's labels.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    /// Its service (`--service`, or the mesh file's local service).
    pub service: Option<String>,
    /// Its subset (`--subset`).
    pub subset: Option<String>,
    /// Its SPIFFE ID, when it has an identity.
    pub principal: Option<SpiffeId>,
}

/// What one request showed, gathered on its way for its metrics.
#[derive(Clone, Debug, Default)]
pub struct Exchange {
    /// The side reporting.
    pub reporter: Reporter,
    /// The local service (inbound: the destination).
    pub local: Option<Arc<str>>,
    /// Inbound: the caller's verified SPIFFE ID (mTLS), else none.
    pub peer: Option<Arc<str>>,
    /// Outbound: the service the request was routed to.
    pub destination: Option<Arc<str>>,
    /// Outbound: the subset of the endpoint that answered last.
    pub subset: Option<Arc<str>>,
    /// The endpoint tried last (`ip:port`; not a label: for the access
    /// log).
    pub endpoint: Option<Arc<str>>,
    /// Outbound: that endpoint's SPIFFE ID (mesh mTLS), else none.
    pub upstream: Option<Arc<SpiffeId>>,
    /// A gRPC request.
    pub grpc: bool,
    /// The response's `grpc-status` (headers or trailers).
    pub grpc_status: Option<u32>,
    /// Request body bytes forwarded.
    pub request_bytes: u64,
    /// Response body bytes sent back.
    pub response_bytes: u64,
}

/// The cache key of a label set: what varies between requests (the
/// workload does not).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    reporter: Reporter,
    local: Option<Arc<str>>,
    peer: Option<Arc<str>>,
    destination: Option<Arc<str>>,
    subset: Option<Arc<str>>,
    upstream: Option<Arc<SpiffeId>>,
    grpc: bool,
    grpc_status: Option<u32>,
    code: u16,
    flag: Option<ResponseFlag>,
}

impl Key {
    fn of(x: &Exchange, code: u16, flag: Option<ResponseFlag>) -> Self {
        Self {
            reporter: x.reporter,
            local: x.local.clone(),
            peer: x.peer.clone(),
            destination: x.destination.clone(),
            subset: x.subset.clone(),
            upstream: x.upstream.clone(),
            grpc: x.grpc,
            grpc_status: x.grpc_status,
            code,
            flag,
        }
    }

    /// Whether a request that showed `x` and ended with `code` and `flag`
    /// has this key, compared without building its key (the names are
    /// mostly the same `Arc`s, compared by address first).
    fn is(&self, x: &Exchange, code: u16, flag: Option<ResponseFlag>) -> bool {
        self.code == code
            && self.flag == flag
            && self.reporter == x.reporter
            && self.grpc == x.grpc
            && self.grpc_status == x.grpc_status
            && self.destination == x.destination
            && self.subset == x.subset
            && self.local == x.local
            && self.peer == x.peer
            && self.upstream == x.upstream
    }
}

/// Where [`Istio::epoch`]s come from: unique across instances, so a
/// thread's cached series is never taken for another instance's.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The series this thread recorded last, with the epoch of the
    /// [`Istio`] it came from. A worker's consecutive requests mostly share
    /// one label set; a hit skips the key's clones, its hash and the
    /// series map's lock.
    static LAST: RefCell<Option<(u64, Key, Arc<Series>)>> = const { RefCell::new(None) };
}

/// Istio's standard label set: the TCP one, and what an HTTP request
/// adds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels {
    #[prometheus(flatten)]
    common: TcpLabels,
    request_protocol: &'static str,
    response_code: String,
    grpc_response_status: String,
}

impl Labels {
    /// The edge this label set counts on: the reporter, the two workloads
    /// and the subset that answered (the callee's version).
    fn edge(&self) -> EdgeKey {
        let c = &self.common;
        let subset = match c.destination_version.as_str() {
            UNKNOWN => String::new(),
            v => v.to_string(),
        };
        EdgeKey {
            reporter: c.reporter,
            source: c.source_workload.clone(),
            destination: c.destination_service.clone(),
            subset,
        }
    }
}

/// Istio's label set for TCP metrics (and the part of the request
/// metrics' set they share).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// One tunnel's TCP counters (a connection upgraded through the proxy).
pub struct Tunnel {
    /// Bytes from the upstream to the client.
    pub sent: Counter,
    /// Bytes from the client to the upstream.
    pub received: Counter,
    /// Counted when the tunnel closes.
    pub closed: Counter,
}

/// One side of a request, as labels: workload, namespace, principal,
/// version.
struct Party {
    workload: String,
    namespace: String,
    principal: String,
    version: Option<String>,
}

impl Party {
    fn of_id(id: Option<&SpiffeId>, service: Option<&str>, version: Option<&str>) -> Self {
        let service = service.or_else(|| id.and_then(SpiffeId::service));
        Self {
            workload: service.unwrap_or(UNKNOWN).to_string(),
            namespace: id
                .and_then(SpiffeId::namespace)
                .unwrap_or(UNKNOWN)
                .to_string(),
            principal: id.map_or_else(|| UNKNOWN.to_string(), ToString::to_string),
            version: version.map(str::to_string),
        }
    }
}

#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// One label set's metrics.
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    /// The edge it belongs to (many label sets share one).
    edge: Arc<EdgeCounters>,
}

impl Series {
    fn observe(&self, x: &Exchange, code: u16, millis: f64) {
        self.requests.inc();
        self.duration.observe(millis);
        self.request_bytes.observe(x.request_bytes as f64);
        self.response_bytes.observe(x.response_bytes as f64);
        self.edge.observe(code, millis);
    }
}

/// A service edge as this proxy sees it: who called whom, and the subset
/// that answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    /// `source` or `destination`: the side reporting.
    pub reporter: &'static str,
    /// The calling service.
    pub source: String,
    /// The service called.
    pub destination: String,
    /// The subset that answered (`""` when unknown).
    pub subset: String,
}

/// One edge's counters, cumulative since the proxy started, for `wasmesh
/// top` (reported to control over the discovery stream).
pub struct EdgeCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Per bucket of [`wasmesh_api::edges::bounds_ms`], then +Inf.
    buckets: Box<[AtomicU64]>,
}

impl EdgeCounters {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: (0..=wasmesh_api::edges::bounds_ms().len())
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn observe(&self, code: u16, millis: f64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if code >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.buckets[wasmesh_api::edges::bucket(millis)].fetch_add(1, Ordering::Relaxed);
    }
}

/// One edge's counters as read at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeSample {
    /// Which edge.
    pub key: EdgeKey,
    /// Requests.
    pub requests: u64,
    /// Requests answered 5xx.
    pub errors: u64,
    /// Requests per duration bucket.
    pub buckets: Vec<u64>,
}

/// Istio's four request metrics.
pub struct Istio {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, Buckets>,
    request_bytes: Family<Labels, Histogram, Buckets>,
    response_bytes: Family<Labels, Histogram, Buckets>,
    overflow: Counter,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    workload: RwLock<Workload>,
    series: RwLock<HashMap<Key, Arc<Series>>>,
    /// Edges, bounded by the series (each series has one).
    edges: Mutex<HashMap<EdgeKey, Arc<EdgeCounters>>>,
    /// When the counters started.
    started: Instant,
    /// This instance's series as they are now: a new value from
    /// [`EPOCHS`] whenever the series are dropped.
    epoch: AtomicU64,
}

impl Default for Istio {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(Buckets(&DURATION_MS)),
            request_bytes: Family::new_with_constructor(Buckets(&BYTES)),
            response_bytes: Family::new_with_constructor(Buckets(&BYTES)),
            overflow: Counter::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            workload: RwLock::default(),
            series: RwLock::default(),
            edges: Mutex::default(),
            started: Instant::now(),
            epoch: AtomicU64::new(EPOCHS.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

impl Istio {
    /// Register the metrics in `r`.
    pub(super) fn register(&self, r: &mut prometheus_client::registry::Registry) {
        let i = self;
        r.register(
            "istio_requests",
            "Requests, by Istio's standard labels (reporter: source on the outbound listener, destination on the inbound)",
            i.requests.clone(),
        );
        r.register(
            "istio_request_duration_milliseconds",
            "Request durations in milliseconds, until the response's last byte",
            i.duration.clone(),
        );
        r.register(
            "istio_request_bytes",
            "Request body sizes in bytes",
            i.request_bytes.clone(),
        );
        r.register(
            "istio_response_bytes",
            "Response body sizes in bytes",
            i.response_bytes.clone(),
        );
        r.register(
            "istio_tcp_connections_opened",
            "Tunnels opened (connections upgraded through the proxy)",
            i.tcp_opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "Tunnels closed",
            i.tcp_closed.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client through tunnels (the response direction)",
            i.tcp_sent.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client through tunnels (the request direction)",
            i.tcp_received.clone(),
        );
        r.register(
            "wasmesh_metric_series_overflow",
            "Requests not recorded in istio_* metrics because their label sets passed the cap (10,000)",
            i.overflow.clone(),
        );
    }

    /// A tunnel opened for a request that upgraded (`101`): counted
    /// opened now; its bytes and its close go to the counters returned.
    pub fn tunnel(&self, x: &Exchange) -> Tunnel {
        let key = Key {
            grpc: false,
            grpc_status: None,
            ..Key::of(x, 101, None)
        };
        let labels = self.labels(&key).common;
        self.tcp_opened.get_or_create(&labels).inc();
        Tunnel {
            sent: self.tcp_sent.get_or_create(&labels).clone(),
            received: self.tcp_received.get_or_create(&labels).clone(),
            closed: self.tcp_closed.get_or_create(&labels).clone(),
        }
    }

    /// Say who this proxy is (its labels change from then on).
    pub fn set_workload(&self, w: Workload) {
        *self.workload.write().unwrap() = w;
        self.series.write().unwrap().clear();
        self.edges.lock().unwrap().clear();
        // After the clear: a series found before it is cached under the
        // old epoch, and missed from now on.
        self.epoch
            .store(EPOCHS.fetch_add(1, Ordering::Relaxed), Ordering::Release);
    }

    /// Record one finished request.
    pub fn record(&self, x: &Exchange, code: u16, flag: Option<ResponseFlag>, millis: f64) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let hit = LAST.with_borrow(|last| match last {
            Some((e, key, series)) if *e == epoch && key.is(x, code, flag) => {
                series.observe(x, code, millis);
                true
            }
            _ => false,
        });
        if hit {
            return;
        }
        let key = Key::of(x, code, flag);
        let known = self.series.read().unwrap().get(&key).cloned();
        let series = match known {
            Some(s) => s,
            None => {
                let mut all = self.series.write().unwrap();
                if all.len() >= MAX_SERIES && !all.contains_key(&key) {
                    self.overflow.inc();
                    return;
                }
                let labels = self.labels(&key);
                let edge = self
                    .edges
                    .lock()
                    .unwrap()
                    .entry(labels.edge())
                    .or_insert_with(|| Arc::new(EdgeCounters::new()))
                    .clone();
                let s = Arc::new(Series {
                    requests: self.requests.get_or_create(&labels).clone(),
                    duration: self.duration.get_or_create(&labels).clone(),
                    request_bytes: self.request_bytes.get_or_create(&labels).clone(),
                    response_bytes: self.response_bytes.get_or_create(&labels).clone(),
                    edge,
                });
                all.entry(key.clone()).or_insert(s).clone()
            }
        };
        series.observe(x, code, millis);
        LAST.set(Some((epoch, key, series)));
    }

    /// How long the counters have been counting.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Every edge's counters now, by edge.
    pub fn edges(&self) -> Vec<EdgeSample> {
        let mut out: Vec<EdgeSample> = self
            .edges
            .lock()
            .unwrap()
            .iter()
            .map(|(k, c)| EdgeSample {
                key: k.clone(),
                requests: c.requests.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                buckets: c
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn labels(&self, k: &Key) -> Labels {
        let w = self.workload.read().unwrap();
        let local_service = w.service.as_deref().or(k.local.as_deref());
        let me = Party::of_id(w.principal.as_ref(), local_service, w.subset.as_deref());
        let (source, destination, service, mtls) = match k.reporter {
            Reporter::Source => {
                let service = k.destination.as_deref();
                let them = Party::of_id(k.upstream.as_deref(), service, k.subset.as_deref());
                (me, them, service, "unknown")
            }
            Reporter::Destination => {
                let peer: Option<SpiffeId> = k.peer.as_deref().and_then(|p| p.parse().ok());
                let them = Party::of_id(peer.as_ref(), None, None);
                let policy = if k.peer.is_some() {
                    "mutual_tls"
                } else {
                    "none"
                };
                (them, me, local_service, policy)
            }
        };
        let service = service.unwrap_or(UNKNOWN).to_string();
        Labels {
            common: TcpLabels {
                reporter: match k.reporter {
                    Reporter::Source => "source",
                    Reporter::Destination => "destination",
                },
                source_app: source.workload.clone(),
                source_canonical_service: source.workload.clone(),
                source_version: source.version.clone().unwrap_or_else(|| UNKNOWN.into()),
                source_canonical_revision: source.version.unwrap_or_else(|| "latest".into()),
                source_workload: source.workload,
                source_workload_namespace: source.namespace,
                source_principal: source.principal,
                destination_app: destination.workload.clone(),
                destination_canonical_service: destination.workload.clone(),
                destination_version: destination
                    .version
                    .clone()
                    .unwrap_or_else(|| UNKNOWN.into()),
                destination_canonical_revision: destination
                    .version
                    .unwrap_or_else(|| "latest".into()),
                destination_workload: destination.workload,
                destination_service_namespace: destination.namespace.clone(),
                destination_workload_namespace: destination.namespace,
                destination_principal: destination.principal,
                destination_service_name: service.clone(),
                destination_service: service,
                response_flags: ResponseFlag::label(k.flag),
                connection_security_policy: mtls,
            },
            request_protocol: if k.grpc { "grpc" } else { "http" },
            response_code: k.code.to_string(),
            grpc_response_status: k.grpc_status.map_or_else(String::new, |s| s.to_string()),
        }
    }
}
