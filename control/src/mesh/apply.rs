//! Applying documents: parsed, every plugin resolved and configured in
//! control (under the proxies' limits, with an empty scratch state and the
//! endpoints the documents give), then written in one transaction — all of
//! them or none. A refusal names the origin, the document, the field path
//! and the reason.

use std::collections::{BTreeMap, BTreeSet};

use wasmesh_api::resources::{ConfigDocument, DEFAULT_NAMESPACE, PluginSource, parse_documents};
use wasmesh_api::{PluginSpec, ServiceSpec};

use super::{Mesh, Refusal};
use crate::store::{EndpointRecord, ServiceRecord};

/// One service of an apply, where it came from.
struct Applied {
    name: String,
    namespace: String,
    spec: ServiceSpec,
    raw: serde_json::Value,
    /// `origin: document N`, for errors.
    at: String,
}

/// What configuring one plugin in control needs.
struct Check {
    at: String,
    service: String,
    plugin: String,
    label: String,
    component: Vec<u8>,
    config_json: String,
    endpoints: Vec<(String, String)>,
}

impl Mesh {
    /// Apply YAML documents, given as (origin, text) pairs: every document
    /// or none. Returns the new revision and the services written.
    pub fn apply(&self, sources: &[(String, String)]) -> Result<(u64, Vec<String>), Refusal> {
        // Beside other replicas, a write of theirs since this replica last
        // looked makes the store refuse (the revision moved): look again and
        // apply again on what is there now — judged afresh — a few times.
        let mut tries = 0;
        loop {
            match self.apply_once(sources) {
                Err(Refusal::Conflict(_)) if self.shared && tries < 4 => {
                    tries += 1;
                    self.reload()?;
                }
                r => return r,
            }
        }
    }

    fn apply_once(&self, sources: &[(String, String)]) -> Result<(u64, Vec<String>), Refusal> {
        let applied = parse(sources)?;
        let checks = self.resolve(&applied)?;
        for c in &checks {
            self.validator
                .configure(
                    &c.component,
                    &c.service,
                    &c.plugin,
                    &c.config_json,
                    &c.endpoints,
                )
                .map_err(|e| {
                    Refusal::Invalid(format!(
                        "{}: the plugin {} refused its configuration: {e}",
                        c.at, c.label
                    ))
                })?;
        }
        // One writer at a time; the store checks the revision too (another
        // control replica may write).
        let _writing = self.pending.apply_lock.lock().unwrap();
        let expected = self.inner.lock().unwrap().state.revision;
        let records: Vec<ServiceRecord> = applied
            .iter()
            .map(|a| ServiceRecord {
                name: a.name.clone(),
                namespace: a.namespace.clone(),
                spec: a.raw.clone(),
                revision: 0,
            })
            .collect();
        let revision = self.store.commit_services(expected, &records, &[])?;
        let mut inner = self.inner.lock().unwrap();
        inner.state.revision = revision;
        let mut names = Vec::new();
        for (a, mut r) in applied.into_iter().zip(records) {
            r.revision = revision;
            inner.state.services.insert(a.name.clone(), r);
            inner.specs.insert(a.name.clone(), a.spec);
            names.push(a.name);
        }
        self.metrics.revision.set(revision as i64);
        self.bump(&mut inner);
        Ok((revision, names))
    }

    /// Resolve every plugin of the apply to its component, and what to
    /// configure it with.
    fn resolve(&self, applied: &[Applied]) -> Result<Vec<Check>, Refusal> {
        let inner = self.inner.lock().unwrap();
        let mut checks = Vec::new();
        for a in applied {
            let endpoints = endpoints_of(a, &inner.proxies.registered(&a.name));
            for (key, chain) in [
                ("plugins", &a.spec.plugins),
                ("inbound-plugins", &a.spec.inbound_plugins),
            ] {
                let mut names = BTreeSet::new();
                for (i, p) in chain.iter().enumerate() {
                    let at = format!("{}: services.{}.{key}[{i}]", a.at, a.name);
                    let (name, label, sha256) =
                        self.plugin_identity(&inner.state.plugins, p, &at)?;
                    if !names.insert(name.clone()) {
                        return Err(Refusal::Invalid(format!(
                            "{at}.name: a plugin named {name:?} is already in this chain; give one of them another `name`"
                        )));
                    }
                    if let Some(expected) = &p.sha256
                        && let Some(sha) = &sha256
                        && expected.as_str() != sha
                    {
                        return Err(Refusal::Invalid(format!(
                            "{at}.sha256: {label} has sha256 {sha}, not the {} this entry expects",
                            expected.as_str()
                        )));
                    }
                    if let Some(m) = &p.matches {
                        wasmesh_istio::parse_matches(m, &format!("{at}.match"))
                            .map_err(Refusal::Invalid)?;
                    }
                    let component = self.bytes_of(p, sha256.as_deref(), &at)?;
                    checks.push(Check {
                        at: format!("{at}.config"),
                        service: a.name.clone(),
                        plugin: name,
                        label,
                        component,
                        config_json: p.config.to_string(),
                        endpoints: endpoints.clone(),
                    });
                }
            }
        }
        Ok(checks)
    }

    /// A plugin entry's name in its chain, its label for errors, and its
    /// component's sha256 (none for a builtin).
    fn plugin_identity(
        &self,
        plugins: &BTreeMap<String, crate::store::PluginMeta>,
        p: &PluginSpec,
        at: &str,
    ) -> Result<(String, String, Option<String>), Refusal> {
        let source = PluginSource::parse(&p.source)
            .map_err(|e| Refusal::Invalid(format!("{at}.source: {e}")))?;
        let name = p
            .name
            .as_ref()
            .map_or_else(|| source.default_name(), |n| n.to_string());
        let (label, sha256) = match &source {
            PluginSource::Builtin(b) => {
                if self.validator.builtin(b).is_none() {
                    return Err(Refusal::Invalid(format!(
                        "{at}.source: unknown builtin {b:?}; known: {}",
                        self.validator
                            .builtins()
                            .iter()
                            .map(|n| format!("builtin:{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                (p.source.clone(), None)
            }
            PluginSource::Pushed { name: n, version } => {
                let key = format!("{n}@{version}");
                let meta = plugins.get(&key).ok_or_else(|| {
                    Refusal::Invalid(format!(
                        "{at}.source: no plugin {key} has been pushed; push it first (wasmesh push FILE.wasm --name {n} --version {version})"
                    ))
                })?;
                (key, Some(meta.sha256.clone()))
            }
            PluginSource::Digest(hex) => (format!("sha256:{}", &hex[..12]), Some(hex.clone())),
        };
        Ok((name, label, sha256))
    }

    fn bytes_of(&self, p: &PluginSpec, sha256: Option<&str>, at: &str) -> Result<Vec<u8>, Refusal> {
        match sha256 {
            None => {
                let b = p.source.strip_prefix("builtin:").unwrap_or_default();
                Ok(self.validator.builtin(b).unwrap_or_default().to_vec())
            }
            Some(sha) => self.store.component(sha)?.ok_or_else(|| {
                Refusal::Invalid(format!(
                    "{at}.source: no pushed component has sha256 {sha}; push it first"
                ))
            }),
        }
    }
}

/// The endpoints a plugin of `a` sees while it is configured: the
/// documents' own, and those proxies registered.
fn endpoints_of(a: &Applied, registered: &[EndpointRecord]) -> Vec<(String, String)> {
    let mut eps: Vec<(String, String)> = a
        .spec
        .endpoints
        .iter()
        .flat_map(|(subset, addrs)| {
            addrs
                .iter()
                .map(move |ep| (subset.to_string(), ep.address.to_string()))
        })
        .collect();
    eps.extend(
        registered
            .iter()
            .map(|r| (r.subset.clone(), r.address.clone())),
    );
    eps
}

/// Parse the documents of an apply; a service may appear once.
fn parse(sources: &[(String, String)]) -> Result<Vec<Applied>, Refusal> {
    let mut out: Vec<Applied> = Vec::new();
    for (origin, text) in sources {
        parse_source(origin, text, &mut out)?;
    }
    if out.is_empty() {
        return Err(Refusal::Invalid(
            "no service to apply: give documents with a `services:` map".into(),
        ));
    }
    Ok(out)
}

fn parse_source(origin: &str, text: &str, out: &mut Vec<Applied>) -> Result<(), Refusal> {
    let docs = parse_documents(text).map_err(|e| Refusal::Invalid(format!("{origin}: {e}")))?;
    let raw_docs = raw_documents(text);
    for (i, doc) in docs.into_iter().enumerate() {
        let at = format!("{origin}: document {}", i + 1);
        let ConfigDocument {
            namespace,
            services,
            ..
        } = doc;
        for (name, spec) in services {
            if let Some(prev) = out.iter().find(|a| a.name == *name) {
                return Err(Refusal::Invalid(format!(
                    "{at}: services.{name}: service {name:?} is already in {}; give it once",
                    prev.at
                )));
            }
            let raw = raw_docs
                .get(i)
                .and_then(|d| d.get("services"))
                .and_then(|s| s.get(name.as_str()))
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            out.push(Applied {
                name: name.to_string(),
                namespace: namespace
                    .as_deref()
                    .unwrap_or(DEFAULT_NAMESPACE)
                    .to_string(),
                spec,
                raw,
                at: at.clone(),
            });
        }
    }
    Ok(())
}

/// The non-empty documents of `text` as JSON values (what the store keeps
/// of each service: its spec as written).
fn raw_documents(text: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|de| serde_yaml_ng::Value::deserialize(de).ok())
        .filter(|v| !v.is_null())
        .filter_map(|v| serde_json::to_value(v).ok())
        .collect()
}

use serde::Deserialize as _;
