//! The proxy's Prometheus metrics, exposed as text on the admin listener's
//! `/metrics`. Label names follow Istio's where a meaning is shared
//! (`destination_service`, `response_code`, `response_flags`), so existing
//! dashboards read them.
//!
//! Depends only on [`crate::flags`]; every other module records into it.

// foldhash: these maps are looked up on every request; SipHash cost
// ≈ 1.5k instructions a request across them.
use foldhash::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::flags::ResponseFlag;

/// Label set: a small list of (name, value).
pub type Labels = Vec<(&'static str, String)>;

/// Most distinct custom metric names one (service, plugin) may create.
const CUSTOM_NAMES_CAP: usize = 100;

/// Every metric of the proxy.
pub struct Metrics {
    registry: Registry,
    /// Requests by service, code and flags.
    pub requests: Family<Labels, Counter>,
    /// Plugin hook calls.
    pub plugin_calls: Family<Labels, Counter>,
    /// Plugin failures by kind (trap, timeout, memory, error).
    pub plugin_failures: Family<Labels, Counter>,
    /// Config reloads by result.
    pub reloads: Family<Labels, Counter>,
    /// Current config version.
    pub config_version: Gauge,
    /// Custom plugin counters.
    pub plugin_custom: Family<Labels, Counter>,
    /// Quarantined plugin versions (1 while quarantined).
    pub plugin_quarantined: Family<Labels, Gauge>,
    /// Open client connections, all listeners.
    pub downstream_connections: Gauge,
    /// Client connections the proxy closed, by reason.
    pub downstream_closed: Family<Labels, Counter>,
    custom_names: Mutex<HashMap<(String, String), usize>>,
    /// `requests` counters already looked up, by service, then (code,
    /// flags): counting a request then builds no label strings.
    request_counters: RequestCounters,
}

type RequestCounters =
    std::sync::RwLock<HashMap<Box<str>, HashMap<(u16, Option<ResponseFlag>), Counter>>>;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_requests",
            "Requests handled, by destination service, response code and response flags",
            requests.clone(),
        );
        let plugin_calls = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_plugin_calls",
            "Plugin hook calls, by service, plugin, version and hook",
            plugin_calls.clone(),
        );
        let plugin_failures = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_plugin_failures",
            "Plugin failures (trap, timeout, memory, error), by service, plugin and version",
            plugin_failures.clone(),
        );
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_config_reloads",
            "Configuration reloads, by result (accepted, refused)",
            reloads.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "wasmesh_config_version",
            "Version of the configuration snapshot serving",
            config_version.clone(),
        );
        let plugin_quarantined = Family::<Labels, Gauge>::default();
        registry.register(
            "wasmesh_plugin_quarantined",
            "1 while a plugin version is quarantined (runtime.quarantine), by service, plugin and version",
            plugin_quarantined.clone(),
        );
        let downstream_connections = Gauge::default();
        registry.register(
            "wasmesh_downstream_connections",
            "Open client connections, all listeners",
            downstream_connections.clone(),
        );
        let downstream_closed = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_downstream_closed",
            "Client connections closed by the proxy, by reason (overflow: past downstream.max-connections; idle: downstream.idle-timeout)",
            downstream_closed.clone(),
        );
        let plugin_custom = Family::<Labels, Counter>::default();
        registry.register(
            "wasmesh_plugin_custom",
            "Counters defined by plugins, by service, plugin and name",
            plugin_custom.clone(),
        );
        Self {
            registry,
            requests,
            plugin_calls,
            plugin_failures,
            reloads,
            config_version,
            plugin_custom,
            plugin_quarantined,
            downstream_connections,
            downstream_closed,
            custom_names: Mutex::default(),
            request_counters: RequestCounters::default(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Count a client connection the proxy closed.
    pub fn downstream_closed(&self, reason: &'static str) {
        self.downstream_closed
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// Count a finished request.
    pub fn request(&self, service: &str, code: u16, flag: Option<ResponseFlag>) {
        let known = self
            .request_counters
            .read()
            .unwrap()
            .get(service)
            .and_then(|m| m.get(&(code, flag)).cloned());
        let counter = match known {
            Some(c) => c,
            None => {
                let c = self
                    .requests
                    .get_or_create(&vec![
                        ("destination_service", service.to_string()),
                        ("response_code", code.to_string()),
                        ("response_flags", ResponseFlag::label(flag).to_string()),
                    ])
                    .clone();
                self.request_counters
                    .write()
                    .unwrap()
                    .entry(service.into())
                    .or_default()
                    .insert((code, flag), c.clone());
                c
            }
        };
        counter.inc();
    }

    /// Count a reload.
    pub fn reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.reloads
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// Add to a plugin's custom counter; names outside `[a-z0-9_]{1,64}` or
    /// past the per-plugin cap are dropped.
    pub fn plugin_custom_add(&self, service: &str, plugin: &str, name: &str, delta: u64) {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return;
        }
        let labels = vec![
            ("service", service.to_string()),
            ("plugin", plugin.to_string()),
            ("name", name.to_string()),
        ];
        // Bound the label cardinality a plugin can create.
        if self.plugin_custom.get(&labels).is_none() {
            let mut names = self.custom_names.lock().unwrap();
            let count = names
                .entry((service.to_string(), plugin.to_string()))
                .or_insert(0);
            if *count >= CUSTOM_NAMES_CAP {
                return;
            }
            *count += 1;
        }
        self.plugin_custom.get_or_create(&labels).inc_by(delta);
    }
}
