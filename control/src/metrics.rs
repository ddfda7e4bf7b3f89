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
        Self {
            registry,
            connected,
            pushes,
            applies,
            acks,
            nacks,
            revision,
            fanout,
        }
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
