//! Building a snapshot from a mesh file. Values are checked as the file is
//! parsed (`wasmesh_api`'s validating types, with the field path of every
//! refusal); what is checked here needs more than one field or more than
//! the document: unique host names and plugin names, the local service,
//! the files and components plugins name, and each plugin's own
//! `configure`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use wasmesh_api::{MeshFile, PluginSpec, ServiceSpec};

use super::{BuildError, Builder, Listeners, Origin, Overrides, Service, Snapshot};
use crate::chain::{Chain, EntryMatch};
use crate::listener::Limits as Downstream;
use crate::runtime::{ConfiguredPlugin, Limits, PluginFailure, PluginScope, Quarantine, Runtime};
use crate::upstream::UpstreamProtocol;
use crate::upstream::UpstreamSettings;
use crate::upstream::cluster::{Cluster, ClusterView, Endpoint};

/// Most plugins in one chain.
pub const MAX_CHAIN: usize = 32;

fn field_err(origin: &Origin, path: impl Into<String>, reason: impl Into<String>) -> BuildError {
    BuildError {
        source: origin.to_string(),
        path: path.into(),
        reason: reason.into(),
    }
}

/// Read, validate and build a snapshot from a mesh file; `previous` is the
/// snapshot serving now, whose unchanged plugins are kept warm.
pub fn build_file(
    file: &Path,
    builder: &Builder,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, BuildError> {
    let origin = Origin::File(file.to_path_buf());
    let doc = MeshFile::load(file).map_err(|e| match e {
        wasmesh_api::LoadError::Invalid { path, reason, .. } => field_err(&origin, path, reason),
        other => field_err(&origin, "(file)", other.to_string()),
    })?;
    build(&doc, &origin, builder, previous)
}

/// Validate and build a snapshot from a mesh document that came from
/// `origin`; `previous` is the snapshot serving now, whose unchanged
/// plugins are kept warm.
pub fn build(
    doc: &MeshFile,
    origin: &Origin,
    builder: &Builder,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, BuildError> {
    let listeners = listeners(origin, doc, previous, &builder.overrides)?;
    let (mut limits, compile_timeout) = runtime_limits(doc, builder.workers);
    if let Some(m) = builder.overrides.memory_limit {
        limits.memory = m;
    }
    let upstream = upstream(origin, doc, previous)?;
    // Endpoints first: plugins see the whole cluster through their scope.
    let cluster = Arc::new(cluster(origin, doc, builder)?);
    let mut ctx = ChainCtx {
        origin,
        builder,
        limits,
        compile_timeout,
        watched: origin.file().map(Path::to_path_buf).into_iter().collect(),
    };
    let mut services = HashMap::default();
    let mut hosts = HashMap::default();
    for (name, spec) in &doc.services {
        let prev = previous.and_then(|p| p.services.get(name.as_str()));
        let service = Arc::new(service(&mut ctx, name, spec, prev, &cluster)?);
        add_hosts(origin, &mut hosts, name, spec, &service)?;
        services.insert(name.to_string(), service);
    }
    let local_service = local_service(origin, doc, &listeners, &services, builder)?;
    Ok(Snapshot {
        version: previous.map_or(1, |p| p.version + 1),
        origin: origin.clone(),
        listeners,
        upstream,
        services,
        hosts,
        local_service,
        watched: ctx.watched,
        limits,
        cluster,
    })
}

fn listeners(
    origin: &Origin,
    doc: &MeshFile,
    previous: Option<&Snapshot>,
    overrides: &Overrides,
) -> Result<Listeners, BuildError> {
    let d = &doc.downstream;
    let def = Downstream::default();
    let listeners = Listeners {
        admin: overrides
            .admin
            .or(doc.admin.map(|a| a.0))
            .unwrap_or(([127, 0, 0, 1], 15000).into()),
        listen: overrides
            .listen
            .or(doc.listen.map(|a| a.0))
            .unwrap_or(([127, 0, 0, 1], 15001).into()),
        inbound: overrides.inbound.or(doc.inbound.map(|a| a.0)),
        downstream: Downstream {
            max_header_bytes: d
                .max_header_bytes
                .map_or(def.max_header_bytes, |v| v.get() as usize),
            max_headers: d.max_headers.map_or(def.max_headers, |v| v.get()),
            header_read_timeout: d
                .header_read_timeout
                .map_or(def.header_read_timeout, |v| v.get()),
            idle_timeout: d.idle_timeout.map_or(def.idle_timeout, |v| v.get()),
            max_connections: d.max_connections.map_or(def.max_connections, |v| v.get()),
            max_concurrent_streams: d
                .max_concurrent_streams
                .map_or(def.max_concurrent_streams, |v| v.get() as u32),
        },
    };
    if let Some(prev) = previous
        && prev.listeners != listeners
    {
        let path = if prev.listeners.downstream != listeners.downstream {
            "downstream"
        } else {
            "admin/listen/inbound"
        };
        return Err(field_err(
            origin,
            path,
            "listener addresses and downstream limits cannot change while the proxy runs; restart the proxy to apply them",
        ));
    }
    Ok(listeners)
}

fn runtime_limits(doc: &MeshFile, workers: usize) -> (Limits, Duration) {
    let rt = &doc.runtime;
    let limits = Limits {
        deadline: rt
            .hook_deadline
            .map_or(crate::runtime::DEFAULT_DEADLINE, |d| d.get()),
        memory: rt
            .memory_limit
            .map_or(crate::runtime::DEFAULT_MEMORY_LIMIT, |m| m.get() as usize),
        pool_size: rt.pool_size.map_or(2 * workers.max(1), |p| p.get()),
        quarantine: rt.quarantine.map(|q| Quarantine {
            traps: q.traps.get() as u32,
            window: q.window.get(),
        }),
    };
    let compile_timeout = rt
        .compile_timeout
        .map_or(crate::runtime::DEFAULT_COMPILE_TIMEOUT, |d| d.get());
    (limits, compile_timeout)
}

fn upstream(
    origin: &Origin,
    doc: &MeshFile,
    previous: Option<&Snapshot>,
) -> Result<UpstreamSettings, BuildError> {
    let up = &doc.upstream;
    let upstream = UpstreamSettings {
        connect_timeout: up
            .connect_timeout
            .map_or(Duration::from_secs(1), |d| d.get()),
        idle_timeout: up.idle_timeout.map_or(Duration::from_secs(90), |d| d.get()),
        max_idle_per_endpoint: up.max_idle_per_endpoint.map_or(32, |n| n.get()),
        max_requests_per_endpoint: up.max_requests_per_endpoint.map_or(1024, |n| n.get()),
        max_connections_per_endpoint: up.max_connections_per_endpoint.map_or(1024, |n| n.get()),
    };
    if let Some(prev) = previous {
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
                origin,
                "upstream",
                "connect-timeout, idle-timeout, max-idle-per-endpoint and max-connections-per-endpoint cannot change while the proxy runs; restart the proxy to apply them",
            ));
        }
    }
    Ok(upstream)
}

/// Every service's endpoints, with their live state from the table. An
/// endpoint reached over mesh mTLS must present an identity of its own
/// service: that is what the caller checks it against.
fn cluster(origin: &Origin, doc: &MeshFile, builder: &Builder) -> Result<ClusterView, BuildError> {
    let mut view = ClusterView {
        services: HashMap::default(),
        table: builder.endpoints.clone(),
    };
    for (name, svc) in &doc.services {
        let mut eps = Vec::new();
        for (subset, addrs) in &svc.endpoints {
            let subset: Arc<str> = subset.as_str().into();
            for (i, a) in addrs.iter().enumerate() {
                let address = a.address.to_string();
                if let Some(id) = &a.identity
                    && id.service() != Some(name.as_str())
                {
                    return Err(field_err(
                        origin,
                        format!("services.{name}.endpoints.{subset}[{i}].identity"),
                        format!(
                            "{id} is not an identity of service {name} (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/{name}): a caller checks the endpoint against the service it routed to"
                        ),
                    ));
                }
                if let Some(id) = &a.identity {
                    builder.endpoints.note_identity(&address, id);
                }
                eps.push(Endpoint {
                    state: builder.endpoints.get(name, &address),
                    authority: address.parse().expect("a socket address is an authority"),
                    address: address.into(),
                    socket: a.address.0,
                    subset: subset.clone(),
                    identity: a.identity.clone().map(Arc::new),
                });
            }
        }
        view.services.insert(name.to_string(), eps.into());
    }
    Ok(view)
}

fn service(
    ctx: &mut ChainCtx<'_>,
    name: &str,
    spec: &ServiceSpec,
    prev: Option<&Arc<Service>>,
    cluster: &ClusterView,
) -> Result<Service, BuildError> {
    let outbound = ctx.chain(name, "plugins", &spec.plugins, prev.map(|s| &*s.outbound))?;
    let inbound = ctx.chain(
        name,
        "inbound-plugins",
        &spec.inbound_plugins,
        prev.map(|s| &*s.inbound),
    )?;
    Ok(Service {
        name: name.into(),
        protocol: match spec.protocol {
            None => UpstreamProtocol::Http1UnlessGrpc,
            Some(wasmesh_api::Protocol::Http1) => UpstreamProtocol::Http1,
            Some(wasmesh_api::Protocol::H2c) => UpstreamProtocol::H2c,
            Some(wasmesh_api::Protocol::Auto) => UpstreamProtocol::Auto,
        },
        cluster: Cluster::new(cluster.services[name].clone()),
        outbound: Arc::new(outbound),
        inbound: Arc::new(inbound),
        mtls: spec.mtls.clone().unwrap_or_default(),
    })
}

/// Route the service's name and its extra host names (ports ignored,
/// case-insensitive) to it; a host already routed elsewhere is refused.
fn add_hosts(
    origin: &Origin,
    hosts: &mut HashMap<String, Arc<Service>>,
    name: &str,
    spec: &ServiceSpec,
    service: &Arc<Service>,
) -> Result<(), BuildError> {
    let own = std::iter::once((format!("services.{name}"), name));
    let extra = spec
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("services.{name}.hosts[{i}]"), h.as_str()));
    for (path, h) in own.chain(extra) {
        // A name checked by `HostName` (or a service name) is an authority.
        let host = h
            .parse::<http::uri::Authority>()
            .map_err(|_| field_err(origin, &path, format!("{h:?} is not a host name")))?
            .host()
            .to_ascii_lowercase();
        match hosts.get(&host) {
            Some(other) if *other.name != *name => {
                return Err(field_err(
                    origin,
                    path,
                    format!("host {host:?} already routes to service {:?}", other.name),
                ));
            }
            _ => {
                hosts.insert(host, service.clone());
            }
        }
    }
    Ok(())
}

fn local_service(
    origin: &Origin,
    doc: &MeshFile,
    listeners: &Listeners,
    services: &HashMap<String, Arc<Service>>,
    builder: &Builder,
) -> Result<Option<Arc<Service>>, BuildError> {
    if let Some(local) = &builder.local {
        return Ok(Some(Arc::new(local_app(
            local,
            services,
            &builder.endpoints,
        ))));
    }
    match (&doc.local_service, &listeners.inbound) {
        (Some(s), _) => Ok(Some(services.get(s.as_str()).cloned().ok_or_else(
            || {
                field_err(
                    origin,
                    "local-service",
                    format!("no service named {s:?} in `services`"),
                )
            },
        )?)),
        (None, Some(_)) => Err(field_err(
            origin,
            "local-service",
            "`inbound` needs `local-service`: the service whose requests the inbound listener receives",
        )),
        (None, None) => Ok(None),
    }
}

/// A sidecar of the control plane: its inbound listener sends to its own
/// app (`--app`), through its service's inbound chain (none until the
/// service is applied).
fn local_app(
    local: &super::Local,
    services: &HashMap<String, Arc<Service>>,
    table: &Arc<crate::upstream::cluster::EndpointTable>,
) -> Service {
    let known = services.get(&local.service);
    let endpoints: Vec<Endpoint> = local
        .app
        .iter()
        .map(|a| {
            let address = a.to_string();
            Endpoint {
                state: table.get(&format!("{} (local app)", local.service), &address),
                authority: address.parse().expect("a socket address is an authority"),
                address: address.into(),
                socket: *a,
                subset: local.subset.as_str().into(),
                identity: None,
            }
        })
        .collect();
    Service {
        name: local.service.as_str().into(),
        protocol: known.map_or_else(Default::default, |s| s.protocol),
        cluster: Cluster::new(endpoints.into()),
        outbound: Arc::default(),
        inbound: known.map_or_else(Arc::default, |s| s.inbound.clone()),
        mtls: known.map_or_else(Default::default, |s| s.mtls.clone()),
    }
}

/// What building the chains of one snapshot shares.
struct ChainCtx<'a> {
    origin: &'a Origin,
    builder: &'a Builder,
    limits: Limits,
    compile_timeout: Duration,
    /// Files whose change triggers a reload.
    watched: Vec<PathBuf>,
}

/// A plugin's bytes, the name it gets by default, and where it came from.
struct Source {
    bytes: Cow<'static, [u8]>,
    default_name: String,
    origin: String,
}

impl ChainCtx<'_> {
    fn chain(
        &mut self,
        service: &str,
        key: &str,
        specs: &[PluginSpec],
        previous: Option<&Chain>,
    ) -> Result<Chain, BuildError> {
        if specs.len() > MAX_CHAIN {
            return Err(field_err(
                self.origin,
                format!("services.{service}.{key}"),
                format!("at most {MAX_CHAIN} plugins per chain"),
            ));
        }
        let mut seen = HashSet::new();
        let mut plugins = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let path = format!("services.{service}.{key}[{i}]");
            let source = self.source(&path, spec)?;
            let name = spec
                .name
                .as_ref()
                .map_or_else(|| source.default_name.clone(), |n| n.to_string());
            if !seen.insert(name.clone()) {
                return Err(field_err(
                    self.origin,
                    format!("{path}.name"),
                    format!(
                        "a plugin named {name:?} is already in this chain; give one of them another `name`"
                    ),
                ));
            }
            let scope = spec
                .matches
                .as_ref()
                .map(|m| EntryMatch::new(m, &format!("{path}.match")))
                .transpose()
                .map_err(|(at, reason)| field_err(self.origin, at, reason))?;
            let prev = previous.and_then(|c| c.plugins.iter().find(|p| *p.name == *name));
            plugins.push((
                self.plugin(service, &path, &name, spec, source, prev)?,
                scope,
            ));
        }
        Ok(Chain::new(plugins))
    }

    fn source(&mut self, path: &str, spec: &PluginSpec) -> Result<Source, BuildError> {
        if let Some(b) = spec
            .source
            .strip_prefix("builtin:")
            .or_else(|| native_name(&spec.source))
        {
            let builtins = self.builder.builtins;
            let Some((_, bytes)) = builtins.iter().find(|(n, _)| *n == b) else {
                let known: Vec<_> = builtins
                    .iter()
                    .map(|(n, _)| format!("builtin:{n}"))
                    .collect();
                return Err(field_err(
                    self.origin,
                    format!("{path}.source"),
                    format!("unknown builtin {b:?}; known: {}", known.join(", ")),
                ));
            };
            return Ok(Source {
                bytes: Cow::Borrowed(*bytes),
                default_name: b.to_string(),
                origin: spec.source.clone(),
            });
        }
        if let Some(hex) = spec.source.strip_prefix("sha256:") {
            let bytes = self.builder.components.get(hex).ok_or_else(|| {
                field_err(
                    self.origin,
                    format!("{path}.source"),
                    format!("component sha256:{hex} is not here (it was not fetched from control)"),
                )
            })?;
            return Ok(Source {
                bytes: Cow::Owned(bytes.to_vec()),
                default_name: format!("sha256-{}", &hex[..hex.len().min(12)]),
                origin: spec.source.clone(),
            });
        }
        let Some(base) = self
            .origin
            .file()
            .map(|f| f.parent().unwrap_or(Path::new(".")))
        else {
            return Err(field_err(
                self.origin,
                format!("{path}.source"),
                format!(
                    "{:?}: a control-plane snapshot names components by sha256: or builtin:",
                    spec.source
                ),
            ));
        };
        let wasm = base.join(&spec.source);
        self.watched.push(wasm.clone());
        let unreadable = |e: &dyn std::fmt::Display| {
            field_err(
                self.origin,
                format!("{path}.source"),
                format!("cannot read {}: {e}", wasm.display()),
            )
        };
        let meta = std::fs::metadata(&wasm).map_err(|e| unreadable(&e))?;
        let max = crate::runtime::MAX_COMPONENT_BYTES;
        if meta.len() > max as u64 {
            return Err(unreadable(&format!(
                "{} bytes is over the {max}-byte component limit",
                meta.len()
            )));
        }
        let bytes = std::fs::read(&wasm).map_err(|e| unreadable(&e))?;
        let stem = wasm
            .file_stem()
            .map(|s| s.to_string_lossy().replace('_', "-"))
            .unwrap_or_default();
        Ok(Source {
            bytes: Cow::Owned(bytes),
            default_name: stem,
            origin: wasm.display().to_string(),
        })
    }

    fn plugin(
        &self,
        service: &str,
        path: &str,
        name: &str,
        spec: &PluginSpec,
        source: Source,
        prev: Option<&Arc<ConfiguredPlugin>>,
    ) -> Result<Arc<ConfiguredPlugin>, BuildError> {
        let sha256 = Runtime::sha256(&source.bytes);
        if let Some(expected) = &spec.sha256
            && expected.as_str() != sha256
        {
            return Err(field_err(
                self.origin,
                format!("{path}.sha256"),
                format!(
                    "{} has sha256 {sha256}, not the {} this entry expects; fix the entry or the file",
                    source.origin,
                    expected.as_str()
                ),
            ));
        }
        let config_json = spec.config.to_string();
        // An unchanged plugin keeps its warm instances.
        if let Some(prev) = prev
            && prev.same_as(
                &sha256,
                &config_json,
                spec.on_failure,
                self.limits,
                &source.origin,
            )
        {
            return Ok(prev.clone());
        }
        // Named against the operator's file and field; the plugin, its
        // version and where it came from in the reason.
        let label = format!("{name} ({}, {})", &sha256[..12], source.origin);
        let plugin_error = |path: String, reason: String| {
            field_err(self.origin, path, format!("the plugin {label} {reason}"))
        };
        let component = self
            .builder
            .runtime
            .load_within(&source.bytes, self.compile_timeout)
            .map_err(|e| {
                plugin_error(format!("{path}.source"), format!("cannot be loaded: {e}"))
            })?;
        let scope = Arc::new(PluginScope {
            service: service.into(),
            plugin: name.into(),
            version: sha256[..12].into(),
            state: self.builder.state.scope(service, name),
            cluster: self.builder.cluster.clone(),
            metrics: self.builder.metrics.clone(),
            log_budget: Default::default(),
        });
        let configured = ConfiguredPlugin::new(
            &self.builder.runtime,
            component,
            scope,
            source.origin.clone(),
            spec.on_failure,
            config_json,
            self.limits,
        )
        .and_then(|p| with_native(p, &spec.source))
        .map_err(|e| plugin_error(format!("{path}.config"), refusal(e)))?;
        // With quarantine on, the version this one replaces stays ready as
        // its last known-good fallback (if it was itself quarantined, the
        // one before it).
        if self.limits.quarantine.is_some()
            && let Some(prev) = prev
        {
            configured.set_fallback(if prev.is_quarantined() {
                prev.fallback()
            } else {
                Some(prev.clone())
            });
        }
        Ok(Arc::new(configured))
    }
}

/// Why a plugin could not be configured, for the operator.
fn refusal(e: PluginFailure) -> String {
    match e {
        PluginFailure::Error(e) => format!("refused its configuration: {e}"),
        PluginFailure::Memory(cap) => format!(
            "needs more memory than runtime.memory-limit ({cap} bytes) to start; raise runtime.memory-limit or make the plugin smaller"
        ),
        other => format!("failed while being configured: {other}"),
    }
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
fn with_native(plugin: ConfiguredPlugin, source: &str) -> Result<ConfiguredPlugin, PluginFailure> {
    let Some(name) = native_name(source) else {
        return Ok(plugin);
    };
    let factory = crate::runtime::native::factory(name).ok_or_else(|| {
        PluginFailure::Error(format!(
            "no native plugin {name:?} in this build; registered: {}",
            crate::runtime::native::registered().join(", ")
        ))
    })?;
    plugin.with_native(factory)
}

#[cfg(not(feature = "native-chain"))]
fn with_native(plugin: ConfiguredPlugin, _: &str) -> Result<ConfiguredPlugin, PluginFailure> {
    Ok(plugin)
}
