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
            .map(|sub| (sub.name.clone(), json!(sub.addresses)))
            .collect();
        spec.insert("endpoints".into(), Value::Object(endpoints));
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
            Ok(json!({
                "source": e.source,
                "name": e.name,
                "config": config,
                "on-failure": e.on_failure,
            }))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Value::Array)
}
