//! Control's metrics, on its admin listener's `/metrics`: connected
//! proxies, pushes, applies, ACKs and NACKs, the config revision, and
//! fan-out latency (from a change to each proxy's ACK of it).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set: a small list of (name, value).
pub type Labels = Vec<(&'static str, String)>;

/// Every metric of control.
pub struct Metrics {
    registry: Registry,
    /// Proxies with an open discovery stream.
    pub connected: Gauge,
    /// Pushes, by result.
    pub pushes: Family<Labels, Counter>,
    /// Applies, by result.
    pub applies: Family<Labels, Counter>,
    /// Snapshots ACKed by proxies.
    pub acks: Counter,
    /// Snapshots NACKed by proxies.
    pub nacks: Counter,
    /// The config revision.
    pub revision: Gauge,
    /// Seconds from a change to a proxy's ACK of the snapshot it made.
    pub fanout: Histogram,
    /// Certificates issued, by kind (token, renewal).
    pub certificates: Family<Labels, Counter>,
    /// Certificate requests refused, by reason.
    pub identity_refusals: Family<Labels, Counter>,
    /// TLS clients refused at the handshake, by reason.
    pub tls_refusals: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connected = Gauge::default();
        registry.register(
            "wasmesh_control_connected_proxies",
            "Proxies with an open discovery stream",
            connected.clone(),
        );
        let pushes = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_control_pushes",
            "Plugin pushes, by result (accepted, refused)",
            pushes.clone(),
        );
        let applies = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_control_applies",
            "Config applies, by result (accepted, refused)",
            applies.clone(),
        );
        let acks = Counter::default();
        registry.register(
            "wasmesh_control_acks",
            "Snapshots proxies ACKed",
            acks.clone(),
        );
        let nacks = Counter::default();
        registry.register(
            "wasmesh_control_nacks",
            "Snapshots proxies NACKed (refused, keeping their previous one)",
            nacks.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "wasmesh_control_config_revision",
            "The config revision",
            revision.clone(),
        );
        let fanout = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "wasmesh_control_fanout_seconds",
            "Time from a change to a proxy's ACK of the snapshot it made",
            fanout.clone(),
        );
        let certificates = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_control_certificates_issued",
            "Proxy certificates issued, by kind (token: a first one; renewal)",
            certificates.clone(),
        );
        let identity_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_control_certificate_refusals",
            "Certificate requests refused, by reason",
            identity_refusals.clone(),
        );
        let tls_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_control_tls_refused_connections",
            "Clients of the TLS listener refused at the handshake, by reason",
            tls_refusals.clone(),
        );
        Self {
            registry,
            connected,
            pushes,
            applies,
            acks,
            nacks,
            revision,
            fanout,
            certificates,
            identity_refusals,
            tls_refusals,
        }
    }

    /// Count a certificate issued.
    pub fn certificate_issued(&self, kind: &'static str) {
        self.certificates
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
    }

    /// Count a certificate request refused.
    pub fn identity_refused(&self, reason: &'static str) {
        self.identity_refusals
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// Count a TLS client refused.
    pub fn tls_refused(&self, reason: wasmesh_identity::tls::Rejection) {
        self.tls_refusals
            .get_or_create(&vec![("reason", reason.label().to_string())])
            .inc();
    }

    /// Count a push or an apply.
    pub fn count(family: &Family<Labels, Counter>, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        family
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
