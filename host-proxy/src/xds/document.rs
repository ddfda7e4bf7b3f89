//! A control snapshot as a mesh document: the services it lists, in the
//! standalone mesh file's own schema, so that a snapshot from control is
//! checked and built exactly as a mesh file is.

use serde_json::{Map, Value, json};
use wasmesh_api::{MeshFile, proto};

/// The mesh document of `snapshot`, for a proxy of `own` (whose inbound
/// chain it carries).
pub fn document(snapshot: &proto::Snapshot, own: &str) -> Result<MeshFile, String> {
    let mut services = Map::new();
    for s in &snapshot.services {
        let mut spec = Map::new();
        spec.insert("hosts".into(), json!(s.hosts));
        if !s.protocol.is_empty() {
            spec.insert("protocol".into(), json!(s.protocol));
        }
        let endpoints: Map<String, Value> = s
            .subsets
            .iter()
            .map(|sub| {
                let plain = sub.addresses.iter().map(|a| json!(a));
                let mesh = sub
                    .mesh_endpoints
                    .iter()
                    .map(|m| json!({ "address": m.address, "identity": m.spiffe_id }));
                (sub.name.clone(), Value::Array(plain.chain(mesh).collect()))
            })
            .collect();
        spec.insert("endpoints".into(), Value::Object(endpoints));
        if s.name == own && (!s.mtls_mode.is_empty() || s.forward_client_cert) {
            let mut mtls = Map::new();
            if !s.mtls_mode.is_empty() {
                mtls.insert("mode".into(), json!(s.mtls_mode));
            }
            mtls.insert("forward-client-cert".into(), json!(s.forward_client_cert));
            spec.insert("mtls".into(), Value::Object(mtls));
        }
        spec.insert("plugins".into(), chain(&s.plugins)?);
        if s.name == own {
            spec.insert("inbound-plugins".into(), chain(&s.inbound_plugins)?);
        }
        services.insert(s.name.clone(), Value::Object(spec));
    }
    let doc = json!({ "services": services }).to_string();
    MeshFile::parse(&doc).map_err(|(path, reason)| {
        format!("control snapshot {}: {path}: {reason}", snapshot.version)
    })
}

fn chain(entries: &[proto::PluginEntry]) -> Result<Value, String> {
    entries
        .iter()
        .map(|e| {
            let config: Value = serde_json::from_str(&e.config_json).map_err(|err| {
                format!("plugin {}: its configuration is not JSON: {err}", e.name)
            })?;
            let mut entry = json!({
                "source": e.source,
                "name": e.name,
                "config": config,
                "on-failure": e.on_failure,
            });
            if !e.match_json.is_empty() {
                entry["match"] = serde_json::from_str(&e.match_json)
                    .map_err(|err| format!("plugin {}: its match is not JSON: {err}", e.name))?;
            }
            Ok(entry)
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Value::Array)
}
