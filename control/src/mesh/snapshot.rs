//! The snapshot a proxy serves: every service's endpoints (the documents'
//! and the registered ones) and outbound chain, and the inbound chain of
//! the proxy's own service only. Its version is a digest of its content, so
//! it changes exactly when the snapshot does — and a restarted control
//! computes the same version for the same mesh, so a proxy that already
//! serves it is not sent it again.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use sha2::{Digest, Sha256};
use wasmesh_api::resources::{DEFAULT_NAMESPACE, PluginSource};
use wasmesh_api::{OnFailure, PluginSpec, Protocol, ServiceSpec, proto};

use super::{Inner, Mesh};
use crate::store::PluginMeta;

impl Mesh {
    /// The snapshot for a proxy of `service`, at the current generation.
    pub fn snapshot(&self, service: &str) -> Arc<proto::Snapshot> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(s) = inner.snapshots.get(service) {
            return s.clone();
        }
        let s = Arc::new(build(&inner, service));
        inner.snapshots.insert(service.to_string(), s.clone());
        s
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.inner.lock().unwrap().generation
    }
}

fn build(inner: &Inner, own: &str) -> proto::Snapshot {
    let services = inner
        .specs
        .iter()
        .map(|(name, spec)| {
            let namespace = inner
                .state
                .services
                .get(name)
                .map_or(DEFAULT_NAMESPACE, |r| r.namespace.as_str());
            service(inner, name, namespace, spec, name == own)
        })
        .collect();
    let mut snapshot = proto::Snapshot {
        version: String::new(),
        revision: inner.state.revision,
        services,
    };
    snapshot.version = hex::encode(&Sha256::digest(snapshot.encode_to_vec())[..8]);
    snapshot
}

fn service(
    inner: &Inner,
    name: &str,
    namespace: &str,
    spec: &ServiceSpec,
    own: bool,
) -> proto::Service {
    // Per subset: plaintext addresses, and mesh endpoints (address, ID).
    let mut subsets: BTreeMap<String, (Vec<String>, Vec<proto::MeshEndpoint>)> = BTreeMap::new();
    let mut add = |subset: String, address: String, identity: String| {
        let (plain, mesh) = subsets.entry(subset).or_default();
        if plain.contains(&address) || mesh.iter().any(|m| m.address == address) {
            return;
        }
        if identity.is_empty() {
            plain.push(address);
        } else {
            mesh.push(proto::MeshEndpoint {
                address,
                spiffe_id: identity,
            });
        }
    };
    for (subset, eps) in &spec.endpoints {
        for ep in eps {
            let id = ep
                .identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default();
            add(subset.to_string(), ep.address.to_string(), id);
        }
    }
    for r in inner.proxies.registered(name) {
        add(r.subset, r.address, r.identity);
    }
    let chain = |plugins: &[PluginSpec]| {
        plugins
            .iter()
            .filter_map(|p| entry(&inner.state.plugins, p))
            .collect()
    };
    proto::Service {
        name: name.to_string(),
        namespace: namespace.to_string(),
        hosts: spec.hosts.iter().map(|h| h.to_string()).collect(),
        protocol: match spec.protocol {
            None => String::new(),
            Some(Protocol::Http1) => "http1".into(),
            Some(Protocol::H2c) => "h2c".into(),
            Some(Protocol::Auto) => "auto".into(),
        },
        subsets: subsets
            .into_iter()
            .map(|(name, (addresses, mesh_endpoints))| proto::Subset {
                name,
                addresses,
                mesh_endpoints,
            })
            .collect(),
        plugins: chain(&spec.plugins),
        inbound_plugins: if own {
            chain(&spec.inbound_plugins)
        } else {
            Vec::new()
        },
        mtls_mode: spec
            .mtls
            .as_ref()
            .and_then(|m| m.mode)
            .map_or_else(String::new, |m| m.as_str().to_string()),
        forward_client_cert: spec.mtls.as_ref().is_some_and(|m| m.forward_client_cert),
    }
}

/// A chain entry as proxies get it: by digest (or builtin), named.
fn entry(plugins: &BTreeMap<String, PluginMeta>, p: &PluginSpec) -> Option<proto::PluginEntry> {
    // An apply resolved every source; a source that no longer resolves
    // cannot be in a snapshot (a plugin in use cannot be deleted).
    let source = PluginSource::parse(&p.source).ok()?;
    let (source_text, origin) = match &source {
        PluginSource::Builtin(_) => (p.source.clone(), p.source.clone()),
        PluginSource::Pushed { name, version } => {
            let key = format!("{name}@{version}");
            (format!("sha256:{}", plugins.get(&key)?.sha256), key)
        }
        PluginSource::Digest(hex) => (format!("sha256:{hex}"), format!("sha256:{hex}")),
    };
    Some(proto::PluginEntry {
        name: p
            .name
            .as_ref()
            .map_or_else(|| source.default_name(), |n| n.to_string()),
        source: source_text,
        origin,
        config_json: p.config.to_string(),
        on_failure: match p.on_failure {
            OnFailure::Closed => "closed".into(),
            OnFailure::Open => "open".into(),
        },
        match_json: p
            .matches
            .as_ref()
            .map_or_else(String::new, ToString::to_string),
    })
}
