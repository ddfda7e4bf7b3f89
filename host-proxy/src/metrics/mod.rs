//! The proxy's Prometheus metrics, exposed as text on the admin listener's
//! `/metrics`. Label names follow Istio's where a meaning is shared
//! (`destination_service`, `response_code`, `response_flags`), so existing
//! dashboards read them.
//!
//! Depends only on [`crate::flags`]; every other module records into it.

pub mod istio;

// foldhash: these maps are looked up on every request; SipHash cost
// ≈ 1.5k instructions a request across them.
use foldhash::HashMap;
use std::cell::RefCell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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
    /// Plugin hook call durations.
    plugin_durations: Family<Labels, Histogram, fn() -> Histogram>,
    /// Plugin decisions, by kind.
    plugin_decisions: Family<Labels, Counter>,
    /// Plugin failures skipped (`on-failure: open`).
    plugin_fail_open: Family<Labels, Counter>,
    /// Plugin log lines dropped past their rate.
    plugin_log_dropped: Family<Labels, Counter>,
    /// Shared-state writes that met a full scope, by outcome.
    plugin_state_full: Family<Labels, Counter>,
    /// Config reloads by result.
    pub reloads: Family<Labels, Counter>,
    /// Components prefetched ahead of an apply, by result.
    pub prefetches: Family<Labels, Counter>,
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
    /// Mesh TLS handshakes refused, by direction and reason.
    pub tls_refused: Family<Labels, Counter>,
    /// Certificate renewals, by result.
    pub identity_renewals: Family<Labels, Counter>,
    /// When the proxy's certificate expires, seconds since the epoch.
    pub identity_expiry: Gauge<f64, AtomicU64>,
    /// Seconds until it expires (negative once expired), as of the scrape.
    identity_ttl: Gauge<f64, AtomicU64>,
    custom_names: Mutex<HashMap<(String, String), usize>>,
    /// `requests` counters already looked up, by service, then (code,
    /// flags): counting a request then builds no label strings.
    request_counters: RequestCounters,
    /// Which instance this is, for [`LAST_REQUEST`].
    id: u64,
    /// Istio's standard request metrics.
    pub istio: istio::Istio,
    /// Spans exported, and dropped.
    pub trace_spans: TraceSpans,
    /// Access log lines dropped (the writer could not keep up).
    pub access_log_dropped: Counter,
}

/// What became of trace spans.
#[derive(Debug, Default)]
pub struct TraceSpans {
    /// Exported to the collector.
    pub exported: Counter,
    /// Dropped: the collector failed them (or was not there), or more
    /// than the export queue's bound were waiting.
    pub dropped: Counter,
    /// Waiting for export or being exported now.
    pub queued: Gauge,
}

/// Registers metrics and hands them back.
struct Registrar<'a>(&'a mut Registry);

impl Registrar<'_> {
    fn add<M: prometheus_client::registry::Metric + Clone + Default>(
        &mut self,
        name: &str,
        help: &str,
    ) -> M {
        let m = M::default();
        self.0.register(name, help, m.clone());
        m
    }
}

type RequestCounters =
    std::sync::RwLock<HashMap<Box<str>, HashMap<(u16, Option<ResponseFlag>), Counter>>>;

/// Where [`Metrics`]' ids come from.
static IDS: AtomicU64 = AtomicU64::new(1);

/// The `requests` counter a thread incremented last, and for what.
struct LastRequest {
    metrics: u64,
    service: Box<str>,
    code: u16,
    flag: Option<ResponseFlag>,
    counter: Counter,
}

thread_local! {
    /// A worker's consecutive requests mostly count into one counter: a
    /// hit skips both maps' hashes and their lock.
    static LAST_REQUEST: RefCell<Option<LastRequest>> = const { RefCell::new(None) };
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
        let mut reg = Registrar(&mut registry);
        Self {
            requests: reg.add(
                "wasmesh_requests",
                "Requests handled, by destination service, response code and response flags",
            ),
            plugin_calls: reg.add(
                "wasmesh_plugin_calls",
                "Plugin hook calls, by service, plugin, version and hook",
            ),
            plugin_failures: reg.add(
                "wasmesh_plugin_failures",
                "Plugin failures (trap, timeout, memory, error), by service, plugin and version",
            ),
            plugin_durations: Family::new_with_constructor(plugin_buckets),
            plugin_decisions: reg.add(
                "wasmesh_plugin_decisions",
                "Plugin decisions, by service, plugin, version, hook and decision (proceed, reply, route, delay, retry)",
            ),
            plugin_fail_open: reg.add(
                "wasmesh_plugin_fail_open",
                "Plugin failures skipped because the plugin is on-failure: open, by service, plugin, version and hook",
            ),
            plugin_log_dropped: reg.add(
                "wasmesh_plugin_log_dropped",
                "Plugin log lines at info and above dropped past 50 a second, by service and plugin",
            ),
            plugin_state_full: reg.add(
                "wasmesh_plugin_state_full",
                "Shared-state writes of a new key into a full scope (10,000 keys), by service, plugin and outcome (refused, or evicted: the least recently used key made room)",
            ),
            reloads: reg.add(
                "wasmesh_config_reloads",
                "Configuration reloads, by result (accepted, refused)",
            ),
            config_version: reg.add(
                "wasmesh_config_version",
                "Version of the configuration snapshot serving",
            ),
            plugin_quarantined: reg.add(
                "wasmesh_plugin_quarantined",
                "1 while a plugin version is quarantined (runtime.quarantine), by service, plugin and version",
            ),
            downstream_connections: reg.add(
                "wasmesh_downstream_connections",
                "Open client connections, all listeners",
            ),
            downstream_closed: reg.add(
                "wasmesh_downstream_closed",
                "Client connections closed by the proxy, by reason (overflow: past downstream.max-connections; idle: downstream.idle-timeout)",
            ),
            plugin_custom: reg.add(
                "wasmesh_plugin_custom",
                "Counters defined by plugins, by service, plugin and name",
            ),
            tls_refused: reg.add(
                "wasmesh_tls_refused_connections",
                "Mesh TLS connections refused, by direction (inbound: a client of this sidecar; outbound: a peer it called) and reason",
            ),
            identity_renewals: Family::default(),
            identity_expiry: Gauge::default(),
            identity_ttl: Gauge::default(),
            istio: istio::Istio::default(),
            trace_spans: TraceSpans::default(),
            access_log_dropped: Counter::default(),
            prefetches: Family::default(),
            registry,
            custom_names: Mutex::default(),
            request_counters: RequestCounters::default(),
            id: IDS.fetch_add(1, Ordering::Relaxed),
        }
        .with_istio()
        .with_identity_and_control()
    }

    fn with_identity_and_control(mut self) -> Self {
        self.registry.register(
            "wasmesh_identity_certificate_renewals",
            "Certificate renewals, by result (renewed, failed)",
            self.identity_renewals.clone(),
        );
        self.registry.register(
            "wasmesh_identity_certificate_expiration_timestamp_seconds",
            "When this proxy's mesh certificate expires, seconds since the Unix epoch",
            self.identity_expiry.clone(),
        );
        self.registry.register(
            "wasmesh_identity_certificate_expiry_seconds",
            "Seconds until this proxy's mesh certificate expires (negative once it has)",
            self.identity_ttl.clone(),
        );
        self.registry.register(
            "wasmesh_control_prefetches",
            "Components control announced while validating their push, fetched and compiled ahead of the apply that names them, by result (compiled, failed)",
            self.prefetches.clone(),
        );
        self
    }

    fn with_istio(mut self) -> Self {
        self.registry.register(
            "wasmesh_plugin_call_duration_seconds",
            "Plugin hook call durations (failed calls included), by service, plugin, version and hook",
            self.plugin_durations.clone(),
        );
        self.istio.register(&mut self.registry);
        self.registry.register(
            "wasmesh_trace_spans_exported",
            "Trace spans the OTLP collector accepted",
            self.trace_spans.exported.clone(),
        );
        self.registry.register(
            "wasmesh_access_log_dropped",
            "Access log lines dropped because the writer could not keep up",
            self.access_log_dropped.clone(),
        );
        self.registry.register(
            "wasmesh_trace_spans_queued",
            "Trace spans waiting for export or being exported (at most 4,096)",
            self.trace_spans.queued.clone(),
        );
        self.registry.register(
            "wasmesh_trace_spans_dropped",
            "Trace spans dropped because the OTLP collector failed them or could not be reached, or because 4,096 were already waiting",
            self.trace_spans.dropped.clone(),
        );
        self
    }

    /// The metrics of one plugin version in one service's chain, looked
    /// up once when it is configured.
    pub fn plugin(&self, service: &str, plugin: &str, version: &str) -> PluginMetrics {
        let labels = |hook: &str, more: Option<(&'static str, &str)>| {
            let mut l = vec![
                ("service", service.to_string()),
                ("plugin", plugin.to_string()),
                ("version", version.to_string()),
                ("hook", hook.to_string()),
            ];
            l.extend(more.map(|(k, v)| (k, v.to_string())));
            l
        };
        let per_hook = HOOKS.map(|h| labels(h, None));
        PluginMetrics {
            calls: per_hook
                .clone()
                .map(|l| self.plugin_calls.get_or_create(&l).clone()),
            durations: per_hook
                .clone()
                .map(|l| self.plugin_durations.get_or_create(&l).clone()),
            fail_open: per_hook.map(|l| self.plugin_fail_open.get_or_create(&l).clone()),
            decisions: HOOKS.map(|h| {
                Decision::ALL.map(|d| {
                    d.possible_in(h).then(|| {
                        self.plugin_decisions
                            .get_or_create(&labels(h, Some(("decision", d.label()))))
                            .clone()
                    })
                })
            }),
        }
    }

    /// The Prometheus text format 0.0.4 (what `promtool check metrics`
    /// and a plain `curl` read): the OpenMetrics exposition with each
    /// counter's `# HELP` and `# TYPE` naming its `_total` samples, no
    /// `# UNIT` and no `# EOF`. (prometheus-client writes OpenMetrics
    /// only.)
    pub fn encode_prometheus(&self) -> String {
        wasmesh_api::exposition::to_prometheus_text(&self.encode())
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let expiry = self.identity_expiry.get();
        if expiry > 0.0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.identity_ttl.set(expiry - now);
        }
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

    /// Count a mesh TLS connection refused.
    pub fn tls_refused(&self, direction: &'static str, reason: &'static str) {
        self.tls_refused
            .get_or_create(&vec![
                ("direction", direction.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// Count a finished request.
    pub fn request(&self, service: &str, code: u16, flag: Option<ResponseFlag>) {
        let hit = LAST_REQUEST.with_borrow(|last| match last {
            Some(l)
                if l.metrics == self.id
                    && l.code == code
                    && l.flag == flag
                    && *l.service == *service =>
            {
                l.counter.inc();
                true
            }
            _ => false,
        });
        if hit {
            return;
        }
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
        LAST_REQUEST.set(Some(LastRequest {
            metrics: self.id,
            service: service.into(),
            code,
            flag,
            counter,
        }));
    }

    /// Count a plugin log line dropped past its rate.
    pub fn plugin_log_dropped(&self, service: &str, plugin: &str) {
        self.plugin_log_dropped
            .get_or_create(&vec![
                ("service", service.to_string()),
                ("plugin", plugin.to_string()),
            ])
            .inc();
    }

    /// Count a shared-state write that met a full scope: `evicted` a key
    /// to make room, or was refused.
    pub fn plugin_state_full(&self, service: &str, plugin: &str, evicted: bool) {
        self.plugin_state_full
            .get_or_create(&vec![
                ("service", service.to_string()),
                ("plugin", plugin.to_string()),
                (
                    "outcome",
                    if evicted { "evicted" } else { "refused" }.to_string(),
                ),
            ])
            .inc();
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
        if !valid_custom_name(name) {
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

/// Whether `name` may name a plugin's own counter (`metric-add`): 1 to 64
/// lowercase letters, digits or `_`.
pub fn valid_custom_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The hooks, in the order of [`PluginMetrics`]' arrays.
pub const HOOKS: [&str; 3] = ["on_request", "on_response", "on_complete"];

/// Plugin call durations: 1 µs to ≈ 1 s.
fn plugin_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1e-6, 4.0, 11))
}

/// What a plugin decided in one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing but header edits: go on.
    Proceed = 0,
    /// A local reply.
    Reply = 1,
    /// A route (service, subset, rewrites).
    Route = 2,
    /// A delay.
    Delay = 3,
    /// A retry.
    Retry = 4,
}

impl Decision {
    const ALL: [Decision; 5] = [
        Decision::Proceed,
        Decision::Reply,
        Decision::Route,
        Decision::Delay,
        Decision::Retry,
    ];

    /// Its label value.
    pub fn label(self) -> &'static str {
        ["proceed", "reply", "route", "delay", "retry"][self as usize]
    }

    /// Whether a plugin can decide it in `hook`.
    fn possible_in(self, hook: &str) -> bool {
        match hook {
            "on_request" => self != Decision::Retry,
            "on_response" => matches!(self, Decision::Proceed | Decision::Reply | Decision::Retry),
            _ => false,
        }
    }
}

/// One plugin version's metrics in one chain, per hook (indexed as
/// [`HOOKS`]).
#[derive(Clone, Debug)]
pub struct PluginMetrics {
    /// Calls.
    pub calls: [Counter; 3],
    /// Call durations, in seconds.
    pub durations: [Histogram; 3],
    /// Failures skipped (`on-failure: open`).
    pub fail_open: [Counter; 3],
    /// Decisions, by [`Decision`] (`None` where a hook cannot make one).
    pub decisions: [[Option<Counter>; 5]; 3],
}

impl PluginMetrics {
    /// Count `d`, decided in `hook`.
    pub fn decided(&self, hook: usize, d: Decision) {
        if let Some(c) = &self.decisions[hook][d as usize] {
            c.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let m = Metrics::new();
        m.request("reviews", 200, None);
        m.istio.record(&istio::Exchange::default(), 200, None, 3.0);
        let text = m.encode_prometheus();
        assert!(text.contains("# HELP wasmesh_requests_total Requests handled"));
        assert!(text.contains("# TYPE wasmesh_requests_total counter\n"));
        assert!(text.contains("# TYPE istio_requests_total counter\n"));
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram\n"));
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# TYPE wasmesh_requests counter"));
    }

    /// The `istio_requests_total` samples of `m` whose labels contain
    /// every one of `labels`, summed.
    fn istio_requests(m: &Metrics, labels: &[&str]) -> f64 {
        m.encode_prometheus()
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    #[test]
    fn request_counters_cached_per_thread_count_where_they_belong() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.request("reviews", 200, None);
        b.request("reviews", 200, None);
        a.request("reviews", 200, None);
        a.request("ratings", 200, None);
        a.request("reviews", 503, Some(ResponseFlag::UpstreamOverflow));
        a.request("reviews", 200, None);
        let count = |m: &Metrics, labels: &str| -> f64 {
            m.encode_prometheus()
                .lines()
                .find_map(|l| l.strip_prefix(&format!("wasmesh_requests_total{{{labels}}} ")))
                .map_or(0.0, |v| v.parse().unwrap())
        };
        let ok = |s: &str| {
            format!("destination_service=\"{s}\",response_code=\"200\",response_flags=\"-\"")
        };
        assert_eq!(count(&a, &ok("reviews")), 3.0);
        assert_eq!(count(&a, &ok("ratings")), 1.0);
        assert_eq!(count(&b, &ok("reviews")), 1.0);
        assert_eq!(
            count(
                &a,
                "destination_service=\"reviews\",response_code=\"503\",response_flags=\"UO\""
            ),
            1.0
        );
    }

    #[test]
    fn istio_series_cached_per_thread_count_where_they_belong() {
        let reviews: std::sync::Arc<str> = "reviews".into();
        let x = istio::Exchange {
            destination: Some(reviews.clone()),
            ..Default::default()
        };
        // Two instances on one thread: each counts its own requests.
        let (a, b) = (Metrics::new(), Metrics::new());
        a.istio.record(&x, 200, None, 1.0);
        b.istio.record(&x, 200, None, 1.0);
        a.istio.record(&x, 200, None, 1.0);
        assert_eq!(istio_requests(&a, &["response_code=\"200\""]), 2.0);
        assert_eq!(istio_requests(&b, &["response_code=\"200\""]), 1.0);
        // Alternating label sets (another code, another name with the
        // same text) land in their own series.
        let same_text = istio::Exchange {
            destination: Some("reviews".into()),
            ..Default::default()
        };
        a.istio.record(&x, 503, None, 1.0);
        a.istio.record(&same_text, 200, None, 1.0);
        a.istio.record(&x, 503, None, 1.0);
        assert_eq!(istio_requests(&a, &["response_code=\"200\""]), 3.0);
        assert_eq!(istio_requests(&a, &["response_code=\"503\""]), 2.0);
        // A new workload drops the series: the next request counts under
        // the new labels, not into the series this thread used last.
        a.istio.set_workload(istio::Workload {
            service: Some("productpage".into()),
            ..Default::default()
        });
        a.istio.record(&x, 503, None, 1.0);
        assert_eq!(
            istio_requests(
                &a,
                &["source_workload=\"productpage\"", "response_code=\"503\""]
            ),
            1.0
        );
    }
}
