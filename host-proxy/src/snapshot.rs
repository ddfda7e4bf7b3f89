//! A configuration snapshot: everything a request needs, immutable, built
//! completely off the request path (files read, components compiled, plugins
//! configured) and then swapped in behind an atomic pointer. Requests keep the
//! snapshot they started with to their end.

use std::collections::HashSet;

// foldhash: hosts and subsets are looked up on every request.
use foldhash::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use wasmesh_api::{MeshFile, OnFailure, PluginSpec, Protocol, parse_duration, parse_size};

use crate::cluster::{ClusterView, Endpoint, EndpointTable};
use crate::metrics::Metrics;
use crate::runtime::{ConfiguredPlugin, Limits, PluginFailure, PluginScope, Runtime};
use crate::state::StateStore;

/// Most plugins in one chain.
pub const MAX_CHAIN: usize = 32;

/// A refused configuration: which file (or plugin), which field, why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildError {
    /// The file, or `plugin NAME (sha256 …) from FILE`.
    pub source: String,
    /// Field path, e.g. `services.reviews.plugins[0].config`.
    pub path: String,
    /// What is wrong and what to do.
    pub reason: String,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.path, self.reason)
    }
}

impl std::error::Error for BuildError {}

/// The listeners and their connection limits; fixed for the life of the
/// process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    /// Admin.
    pub admin: SocketAddr,
    /// Outbound.
    pub listen: SocketAddr,
    /// Inbound.
    pub inbound: Option<SocketAddr>,
    /// Limits on client connections.
    pub downstream: Downstream,
}

/// Limits on client connections (see [`wasmesh_api::DownstreamSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downstream {
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Most headers per request.
    pub max_headers: usize,
    /// Time to send a whole request head.
    pub header_read_timeout: Duration,
    /// A connection moving no bytes this long is closed.
    pub idle_timeout: Duration,
    /// Open connections per listener.
    pub max_connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

impl Default for Downstream {
    fn default() -> Self {
        Self {
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            max_concurrent_streams: 100,
        }
    }
}

fn downstream(file: &Path, d: &wasmesh_api::DownstreamSpec) -> Result<Downstream, BuildError> {
    let def = Downstream::default();
    let max_header_bytes = match &d.max_header_bytes {
        None => def.max_header_bytes as u64,
        Some(t) => parse_size(t).map_err(|e| field_err(file, "downstream.max-header-bytes", e))?,
    };
    if !(8 << 10..=1 << 20).contains(&max_header_bytes) {
        return Err(field_err(
            file,
            "downstream.max-header-bytes",
            "must be between 8Ki and 1Mi",
        ));
    }
    let out = Downstream {
        max_header_bytes: max_header_bytes as usize,
        max_headers: d.max_headers.unwrap_or(def.max_headers),
        header_read_timeout: duration(
            file,
            "downstream.header-read-timeout",
            d.header_read_timeout.as_deref(),
            def.header_read_timeout,
        )?,
        idle_timeout: duration(
            file,
            "downstream.idle-timeout",
            d.idle_timeout.as_deref(),
            def.idle_timeout,
        )?,
        max_connections: d.max_connections.unwrap_or(def.max_connections),
        max_concurrent_streams: d
            .max_concurrent_streams
            .unwrap_or(def.max_concurrent_streams),
    };
    for (ok, path, what) in [
        (
            (1..=1000).contains(&out.max_headers),
            "downstream.max-headers",
            "must be between 1 and 1000",
        ),
        (
            out.header_read_timeout >= Duration::from_millis(100),
            "downstream.header-read-timeout",
            "must be at least 100ms",
        ),
        (
            out.idle_timeout >= Duration::from_secs(1),
            "downstream.idle-timeout",
            "must be at least 1s",
        ),
        (
            out.max_connections >= 1,
            "downstream.max-connections",
            "must be at least 1",
        ),
        (
            out.max_concurrent_streams >= 1,
            "downstream.max-concurrent-streams",
            "must be at least 1",
        ),
    ] {
        if !ok {
            return Err(field_err(file, path, what));
        }
    }
    Ok(out)
}

/// Upstream connection settings; fixed for the life of the process, except
/// the per-endpoint request limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connections close after this.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Requests in flight per endpoint.
    pub max_requests_per_endpoint: usize,
    /// Open connections per endpoint (per upstream protocol).
    pub max_connections_per_endpoint: usize,
}

/// An ordered list of configured plugins.
#[derive(Default)]
pub struct Chain {
    /// In chain order.
    pub plugins: Vec<Arc<ConfiguredPlugin>>,
    /// Some plugin implements `on-response` (so bodies are buffered for retries).
    pub any_on_response: bool,
}

impl Chain {
    fn new(plugins: Vec<Arc<ConfiguredPlugin>>) -> Self {
        let any_on_response = plugins.iter().any(|p| p.hooks.on_response);
        Self {
            plugins,
            any_on_response,
        }
    }
}

/// One service.
pub struct Service {
    /// Name.
    pub name: Arc<str>,
    /// Upstream protocol.
    pub protocol: Protocol,
    /// Endpoints, subsets in name order.
    pub endpoints: Arc<[Endpoint]>,
    /// Indexes into `endpoints` per subset.
    pub subsets: HashMap<String, Vec<usize>>,
    /// Every index into `endpoints`.
    pub all: Vec<usize>,
    /// Round-robin cursor.
    pub rr: AtomicUsize,
    /// Run by callers' sidecars.
    pub outbound: Chain,
    /// Run by this service's own sidecar.
    pub inbound: Chain,
}

/// The configuration serving now.
pub struct Snapshot {
    /// +1 per accepted snapshot.
    pub version: u64,
    /// The mesh file it came from.
    pub file: PathBuf,
    /// Listener addresses.
    pub listeners: Listeners,
    /// Upstream settings.
    pub upstream: UpstreamSettings,
    /// Services by name.
    pub services: HashMap<String, Arc<Service>>,
    /// Services by lowercase host name.
    hosts: HashMap<String, Arc<Service>>,
    /// The service this sidecar stands beside.
    pub local_service: Option<Arc<Service>>,
    /// Files whose change triggers a reload (with `--watch`).
    pub watched: Vec<PathBuf>,
    /// The runtime limits.
    pub limits: Limits,
    /// Every service's endpoints (published to plugins when swapped in).
    pub cluster: Arc<ClusterView>,
}

impl Snapshot {
    /// The service for a `Host` / `:authority` value (case-insensitive, port
    /// ignored).
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        let host = strip_port(host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&host.to_ascii_lowercase())
        } else {
            self.hosts.get(host)
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split(']').next().map_or(host, |h| &h[1..]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The handles a snapshot build needs from the running proxy.
pub struct BuildCtx<'a> {
    /// The plugin runtime.
    pub runtime: &'a Arc<Runtime>,
    /// Plugins' shared state.
    pub state: &'a Arc<StateStore>,
    /// Endpoints' live state.
    pub endpoints: &'a Arc<EndpointTable>,
    /// Metrics.
    pub metrics: &'a Arc<Metrics>,
    /// `builtin:` plugins.
    pub builtins: &'a [(&'static str, &'static [u8])],
    /// The snapshot serving now, if any: its unchanged plugins are reused.
    pub previous: Option<&'a Snapshot>,
    /// Worker threads (sizes the instance pools).
    pub workers: usize,
    /// The endpoints plugins see: the serving snapshot's.
    pub cluster: &'a Arc<arc_swap::ArcSwap<ClusterView>>,
}

fn field_err(file: &Path, path: impl Into<String>, reason: impl Into<String>) -> BuildError {
    BuildError {
        source: file.display().to_string(),
        path: path.into(),
        reason: reason.into(),
    }
}

fn addr(file: &Path, path: &str, v: Option<&str>, default: &str) -> Result<SocketAddr, BuildError> {
    let text = v.unwrap_or(default);
    text.parse().map_err(|_| {
        field_err(
            file,
            path,
            format!("{text:?} is not an address; write ip:port, e.g. 127.0.0.1:15001"),
        )
    })
}

fn duration(
    file: &Path,
    path: &str,
    v: Option<&str>,
    default: Duration,
) -> Result<Duration, BuildError> {
    match v {
        None => Ok(default),
        Some(t) => parse_duration(t).map_err(|e| field_err(file, path, e)),
    }
}

/// Read, validate and build a snapshot from a mesh file.
pub fn build(file: &Path, ctx: &BuildCtx<'_>) -> Result<Snapshot, BuildError> {
    let doc = MeshFile::load(file).map_err(|e| match e {
        wasmesh_api::LoadError::Invalid { path, reason, .. } => field_err(file, path, reason),
        other => field_err(file, "(file)", other.to_string()),
    })?;
    let base = file.parent().unwrap_or(Path::new("."));

    let listeners = Listeners {
        admin: addr(file, "admin", doc.admin.as_deref(), "127.0.0.1:15000")?,
        listen: addr(file, "listen", doc.listen.as_deref(), "127.0.0.1:15001")?,
        inbound: match &doc.inbound {
            Some(a) => Some(addr(file, "inbound", Some(a), "")?),
            None => None,
        },
        downstream: downstream(file, &doc.downstream)?,
    };
    if let Some(prev) = ctx.previous
        && prev.listeners != listeners
    {
        let path = if prev.listeners.downstream != listeners.downstream {
            "downstream"
        } else {
            "admin/listen/inbound"
        };
        return Err(field_err(
            file,
            path,
            "listener addresses and downstream limits cannot change while the proxy runs; restart the proxy to apply them",
        ));
    }

    let rt = &doc.runtime;
    let deadline = duration(
        file,
        "runtime.hook-deadline",
        rt.hook_deadline.as_deref(),
        crate::runtime::DEFAULT_DEADLINE,
    )?;
    if deadline < Duration::from_millis(1) || deadline > Duration::from_secs(10) {
        return Err(field_err(
            file,
            "runtime.hook-deadline",
            "must be between 1ms and 10s",
        ));
    }
    let memory = match &rt.memory_limit {
        None => crate::runtime::DEFAULT_MEMORY_LIMIT as u64,
        Some(t) => parse_size(t).map_err(|e| field_err(file, "runtime.memory-limit", e))?,
    };
    if !(1 << 20..=crate::runtime::MAX_MEMORY_LIMIT as u64).contains(&memory) {
        return Err(field_err(
            file,
            "runtime.memory-limit",
            "must be between 1Mi and 4Gi",
        ));
    }
    let pool_size = rt.pool_size.unwrap_or(2 * ctx.workers.max(1));
    if !(1..=1024).contains(&pool_size) {
        return Err(field_err(
            file,
            "runtime.pool-size",
            "must be between 1 and 1024",
        ));
    }
    let compile_timeout = duration(
        file,
        "runtime.compile-timeout",
        rt.compile_timeout.as_deref(),
        crate::runtime::DEFAULT_COMPILE_TIMEOUT,
    )?;
    if compile_timeout.is_zero() || compile_timeout > Duration::from_secs(600) {
        return Err(field_err(
            file,
            "runtime.compile-timeout",
            "must be longer than 0s and at most 10m",
        ));
    }
    let quarantine = match &rt.quarantine {
        None => None,
        Some(q) => {
            let window = parse_duration(&q.window)
                .map_err(|e| field_err(file, "runtime.quarantine.window", e))?;
            if q.traps == 0 {
                return Err(field_err(
                    file,
                    "runtime.quarantine.traps",
                    "must be at least 1",
                ));
            }
            if window.is_zero() {
                return Err(field_err(
                    file,
                    "runtime.quarantine.window",
                    "must be longer than 0s",
                ));
            }
            Some(crate::runtime::Quarantine {
                traps: q.traps,
                window,
            })
        }
    };
    let limits = Limits {
        deadline,
        memory: memory as usize,
        pool_size,
        quarantine,
    };

    let up = &doc.upstream;
    let upstream = UpstreamSettings {
        connect_timeout: duration(
            file,
            "upstream.connect-timeout",
            up.connect_timeout.as_deref(),
            Duration::from_secs(1),
        )?,
        idle_timeout: duration(
            file,
            "upstream.idle-timeout",
            up.idle_timeout.as_deref(),
            Duration::from_secs(90),
        )?,
        max_idle_per_endpoint: up.max_idle_per_endpoint.unwrap_or(32),
        max_requests_per_endpoint: up.max_requests_per_endpoint.unwrap_or(1024),
        max_connections_per_endpoint: up.max_connections_per_endpoint.unwrap_or(1024),
    };
    if upstream.max_connections_per_endpoint == 0 {
        return Err(field_err(
            file,
            "upstream.max-connections-per-endpoint",
            "must be at least 1",
        ));
    }
    if upstream.max_requests_per_endpoint == 0 {
        return Err(field_err(
            file,
            "upstream.max-requests-per-endpoint",
            "must be at least 1",
        ));
    }
    if let Some(prev) = ctx.previous {
        let fixed = |u: &UpstreamSettings| {
            (
                u.connect_timeout,
                u.idle_timeout,
                u.max_idle_per_endpoint,
                u.max_connections_per_endpoint,
            )
        };
        if fixed(&prev.upstream) != fixed(&upstream) {
            return Err(field_err(
                file,
                "upstream",
                "connect-timeout, idle-timeout, max-idle-per-endpoint and max-connections-per-endpoint cannot change while the proxy runs; restart the proxy to apply them",
            ));
        }
    }

    // Endpoints first: plugins see the whole cluster through their scope.
    let mut cluster = ClusterView {
        services: HashMap::default(),
        table: ctx.endpoints.clone(),
    };
    for (name, svc) in &doc.services {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(field_err(
                file,
                format!("services.{name}"),
                "a service name is letters, digits, '-', '.' or '_'",
            ));
        }
        let mut eps = Vec::new();
        for (subset, addrs) in &svc.endpoints {
            let subset: Arc<str> = subset.as_str().into();
            for (i, a) in addrs.iter().enumerate() {
                let parsed = a
                    .parse::<SocketAddr>()
                    .ok()
                    .zip(a.parse::<http::uri::Authority>().ok());
                let Some((socket, authority)) = parsed else {
                    return Err(field_err(
                        file,
                        format!("services.{name}.endpoints.{subset}[{i}]"),
                        format!("{a:?} is not an endpoint; write ip:port, e.g. 127.0.0.1:9081"),
                    ));
                };
                eps.push(Endpoint {
                    address: a.as_str().into(),
                    socket,
                    authority,
                    subset: subset.clone(),
                    state: ctx.endpoints.get(name, a),
                });
            }
        }
        cluster.services.insert(name.clone(), eps.into());
    }
    let cluster = Arc::new(cluster);

    let mut watched = vec![file.to_path_buf()];
    let mut services = HashMap::default();
    let mut hosts: HashMap<String, Arc<Service>> = HashMap::default();
    let mut host_owner: HashMap<String, String> = HashMap::default();
    for (name, svc) in &doc.services {
        let prev_svc = ctx.previous.and_then(|p| p.services.get(name));
        let mut chain = |specs: &[PluginSpec], key: &str, prev: Option<&Chain>| {
            build_chain(
                file,
                base,
                name,
                key,
                specs,
                prev,
                (limits, compile_timeout),
                ctx,
                &mut watched,
            )
        };
        let outbound = chain(&svc.plugins, "plugins", prev_svc.map(|s| &s.outbound))?;
        let inbound = chain(
            &svc.inbound_plugins,
            "inbound-plugins",
            prev_svc.map(|s| &s.inbound),
        )?;
        let endpoints = cluster.services[name].clone();
        let mut subsets: HashMap<String, Vec<usize>> = HashMap::default();
        for (i, e) in endpoints.iter().enumerate() {
            subsets.entry(e.subset.to_string()).or_default().push(i);
        }
        let service = Arc::new(Service {
            name: name.as_str().into(),
            protocol: svc.protocol,
            all: (0..endpoints.len()).collect(),
            subsets,
            endpoints,
            rr: AtomicUsize::new(0),
            outbound,
            inbound,
        });
        let mut names = vec![name.to_ascii_lowercase()];
        for (i, h) in svc.hosts.iter().enumerate() {
            if h.is_empty() || h.contains(['/', ' ']) {
                return Err(field_err(
                    file,
                    format!("services.{name}.hosts[{i}]"),
                    format!("{h:?} is not a host name"),
                ));
            }
            names.push(strip_port(h).to_ascii_lowercase());
        }
        for (i, h) in names.into_iter().enumerate() {
            if let Some(other) = host_owner.get(&h)
                && other != name
            {
                return Err(field_err(
                    file,
                    format!("services.{name}.hosts[{}]", i.saturating_sub(1)),
                    format!("host {h:?} already routes to service {other:?}"),
                ));
            }
            host_owner.insert(h.clone(), name.clone());
            hosts.insert(h, service.clone());
        }
        services.insert(name.clone(), service);
    }

    let local_service = match (&doc.local_service, &listeners.inbound) {
        (Some(s), _) => Some(services.get(s).cloned().ok_or_else(|| {
            field_err(
                file,
                "local-service",
                format!("no service named {s:?} in `services`"),
            )
        })?),
        (None, Some(_)) => {
            return Err(field_err(
                file,
                "local-service",
                "`inbound` needs `local-service`: the service whose requests the inbound listener receives",
            ));
        }
        (None, None) => None,
    };

    Ok(Snapshot {
        version: ctx.previous.map_or(1, |p| p.version + 1),
        file: file.to_path_buf(),
        listeners,
        upstream,
        services,
        hosts,
        local_service,
        watched,
        limits,
        cluster,
    })
}

/// Benchmark builds (feature `native-chain`): `native:<name>` names a
/// natively linked plugin, whose identity is `builtin:<name>`'s.
#[cfg(feature = "native-chain")]
fn native_name(source: &str) -> Option<&str> {
    source.strip_prefix("native:")
}

#[cfg(not(feature = "native-chain"))]
fn native_name(_: &str) -> Option<&str> {
    None
}

#[cfg(feature = "native-chain")]
fn with_native(
    plugin: ConfiguredPlugin,
    source: &str,
) -> Result<ConfiguredPlugin, crate::runtime::PluginFailure> {
    let Some(name) = native_name(source) else {
        return Ok(plugin);
    };
    let factory = crate::runtime::native::factory(name).ok_or_else(|| {
        crate::runtime::PluginFailure::Error(format!(
            "no native plugin {name:?} in this build; registered: {}",
            crate::runtime::native::registered().join(", ")
        ))
    })?;
    plugin.with_native(factory)
}

#[cfg(not(feature = "native-chain"))]
fn with_native(
    plugin: ConfiguredPlugin,
    _: &str,
) -> Result<ConfiguredPlugin, crate::runtime::PluginFailure> {
    Ok(plugin)
}

#[allow(clippy::too_many_arguments, reason = "internal helper of `build`")]
fn build_chain(
    file: &Path,
    base: &Path,
    service: &str,
    key: &str,
    specs: &[PluginSpec],
    previous: Option<&Chain>,
    (limits, compile_timeout): (Limits, Duration),
    ctx: &BuildCtx<'_>,
    watched: &mut Vec<PathBuf>,
) -> Result<Chain, BuildError> {
    if specs.len() > MAX_CHAIN {
        return Err(field_err(
            file,
            format!("services.{service}.{key}"),
            format!("at most {MAX_CHAIN} plugins per chain"),
        ));
    }
    let mut seen = HashSet::new();
    let mut plugins = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let path = format!("services.{service}.{key}[{i}]");
        let (bytes, default_name, origin): (std::borrow::Cow<'static, [u8]>, String, String) =
            if let Some(b) = spec
                .source
                .strip_prefix("builtin:")
                .or_else(|| native_name(&spec.source))
            {
                let Some((_, bytes)) = ctx.builtins.iter().find(|(n, _)| *n == b) else {
                    let known: Vec<_> = ctx
                        .builtins
                        .iter()
                        .map(|(n, _)| format!("builtin:{n}"))
                        .collect();
                    return Err(field_err(
                        file,
                        format!("{path}.source"),
                        format!("unknown builtin {b:?}; known: {}", known.join(", ")),
                    ));
                };
                (
                    std::borrow::Cow::Borrowed(*bytes),
                    b.to_string(),
                    spec.source.clone(),
                )
            } else {
                let wasm = base.join(&spec.source);
                watched.push(wasm.clone());
                let meta = std::fs::metadata(&wasm).map_err(|e| {
                    field_err(
                        file,
                        format!("{path}.source"),
                        format!("cannot read {}: {e}", wasm.display()),
                    )
                })?;
                if meta.len() > crate::runtime::MAX_COMPONENT_BYTES as u64 {
                    return Err(field_err(
                        file,
                        format!("{path}.source"),
                        format!(
                            "{} is {} bytes, over the {}-byte component limit",
                            wasm.display(),
                            meta.len(),
                            crate::runtime::MAX_COMPONENT_BYTES
                        ),
                    ));
                }
                let bytes = std::fs::read(&wasm).map_err(|e| {
                    field_err(
                        file,
                        format!("{path}.source"),
                        format!("cannot read {}: {e}", wasm.display()),
                    )
                })?;
                let stem = wasm
                    .file_stem()
                    .map(|s| s.to_string_lossy().replace('_', "-"))
                    .unwrap_or_default();
                (
                    std::borrow::Cow::Owned(bytes),
                    stem,
                    wasm.display().to_string(),
                )
            };
        let name = spec.name.clone().unwrap_or(default_name);
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(field_err(
                file,
                format!("{path}.name"),
                format!("{name:?}: a plugin name is 1-64 letters, digits, '-', '_' or '.'"),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(field_err(
                file,
                format!("{path}.name"),
                format!(
                    "a plugin named {name:?} is already in this chain; give one of them another `name`"
                ),
            ));
        }
        let sha256 = Runtime::sha256(&bytes);
        if let Some(expected) = &spec.sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(field_err(
                file,
                format!("{path}.sha256"),
                format!(
                    "{origin} has sha256 {sha256}, not the {expected} this entry expects; fix the entry or the file"
                ),
            ));
        }
        let config_json = spec.config.to_string();
        let on_failure: OnFailure = spec.on_failure;
        let plugin_source = format!("plugin {name} ({}) from {origin}", &sha256[..12]);

        // An unchanged plugin keeps its warm instances.
        if let Some(prev) = previous.and_then(|c| c.plugins.iter().find(|p| *p.name == *name))
            && prev.same_as(&sha256, &config_json, on_failure, limits, &origin)
        {
            plugins.push(prev.clone());
            continue;
        }

        let component = ctx
            .runtime
            .load_within(&bytes, compile_timeout)
            .map_err(|e| BuildError {
                source: plugin_source.clone(),
                path: format!("{path}.source"),
                reason: e.to_string(),
            })?;
        let scope = Arc::new(PluginScope {
            service: service.into(),
            plugin: name.as_str().into(),
            version: sha256[..12].into(),
            state: ctx.state.scope(service, &name),
            cluster: ctx.cluster.clone(),
            metrics: ctx.metrics.clone(),
        });
        let configured = ConfiguredPlugin::new(
            ctx.runtime,
            component,
            scope,
            origin,
            on_failure,
            config_json,
            limits,
        )
        .and_then(|p| with_native(p, &spec.source))
        .map_err(|e| BuildError {
            source: plugin_source.clone(),
            path: format!("{path}.config"),
            reason: match e {
                PluginFailure::Error(e) => format!("the plugin refused its configuration: {e}"),
                PluginFailure::Memory(cap) => format!(
                    "the plugin needs more memory than runtime.memory-limit ({cap} bytes) to start; raise runtime.memory-limit or make the plugin smaller"
                ),
                other => format!("the plugin failed while being configured: {other}"),
            },
        })?;
        // With quarantine on, the version this one replaces stays ready as
        // its last known-good fallback (if it was itself quarantined, the
        // one before it).
        if limits.quarantine.is_some()
            && let Some(prev) = previous.and_then(|c| c.plugins.iter().find(|p| *p.name == *name))
        {
            configured.set_fallback(if prev.is_quarantined() {
                prev.fallback()
            } else {
                Some(prev.clone())
            });
        }
        plugins.push(Arc::new(configured));
    }
    Ok(Chain::new(plugins))
}

/// Once `snap` serves: the versions its plugins fall back to keep no
/// fallbacks of their own, so at most one earlier version stays loaded.
pub fn settle(snap: &Snapshot) {
    for s in snap.services.values() {
        for p in s.outbound.plugins.iter().chain(&s.inbound.plugins) {
            if let Some(fb) = p.fallback() {
                fb.set_fallback(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn host_ports_are_ignored() {
        assert_eq!(strip_port("reviews:9080"), "reviews");
        assert_eq!(strip_port("reviews"), "reviews");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
