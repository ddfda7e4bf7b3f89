//! The control plane's resources: the documents `wasmesh apply` takes. Each
//! has a `services:` map with exactly the standalone mesh file's per-service
//! keys (endpoints, protocol, plugins, inbound-plugins, hosts) and an
//! optional namespace; a plugin's `source` names a pushed component
//! (`NAME@VERSION`), a component by digest (`sha256:HEX`) or a stock plugin
//! (`builtin:NAME`) — never a file, which would be the control host's.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::values::ServiceName;
use crate::{API_VERSION, ServiceSpec};

/// The namespace of a document that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One document of an apply.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigDocument {
    /// Must be `wasmesh.io/v1alpha1` when present.
    #[serde(rename = "apiVersion")]
    pub api_version: Option<String>,
    /// The services' namespace (their identities' `ns/`). Default `default`.
    pub namespace: Option<ServiceName>,
    /// The services, by name.
    #[serde(default)]
    pub services: BTreeMap<ServiceName, ServiceSpec>,
}

/// A document that does not parse: which one, where in it, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentError {
    /// Index of the document (0 for the first).
    pub document: usize,
    /// Field path, e.g. `services.reviews.plugins[0].source`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "document {}: {}: {}",
            self.document + 1,
            self.path,
            self.reason
        )
    }
}

/// Parse YAML documents (`---` between them; JSON is YAML too). Empty
/// documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<ConfigDocument>, DocumentError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value: serde_yaml_ng::Value =
            serde::Deserialize::deserialize(de).map_err(|e| DocumentError {
                document: i,
                path: "(document)".into(),
                reason: e.to_string(),
            })?;
        if value.is_null() {
            continue;
        }
        let doc: ConfigDocument =
            serde_path_to_error::deserialize(value).map_err(|e| DocumentError {
                document: i,
                path: match e.path().to_string() {
                    p if p == "." || p.is_empty() => "(document)".into(),
                    p => p,
                },
                reason: e.into_inner().to_string(),
            })?;
        if let Some(v) = &doc.api_version
            && v != API_VERSION
        {
            return Err(DocumentError {
                document: i,
                path: "apiVersion".into(),
                reason: format!(
                    "unknown version {v:?}; this control plane understands {API_VERSION:?}"
                ),
            });
        }
        docs.push(doc);
    }
    Ok(docs)
}

/// Where a plugin of a control-plane resource comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginSource {
    /// A stock plugin, `builtin:NAME`.
    Builtin(String),
    /// A pushed component, `NAME@VERSION`.
    Pushed {
        /// Its name.
        name: String,
        /// Its version.
        version: String,
    },
    /// A component by its digest, `sha256:HEX`.
    Digest(String),
}

impl PluginSource {
    /// Read a `source` value.
    pub fn parse(source: &str) -> Result<Self, String> {
        if let Some(b) = source.strip_prefix("builtin:") {
            return Ok(Self::Builtin(b.to_string()));
        }
        if let Some(hex) = source.strip_prefix("sha256:") {
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{source:?}: a digest is sha256: and 64 hex digits"));
            }
            return Ok(Self::Digest(hex.to_ascii_lowercase()));
        }
        match source.split_once('@') {
            Some((name, version)) if valid_name(name) && valid_version(version) => {
                Ok(Self::Pushed {
                    name: name.to_string(),
                    version: version.to_string(),
                })
            }
            _ => Err(format!(
                "{source:?} is not a plugin source here: write NAME@VERSION (a pushed plugin), sha256:HEX or builtin:NAME"
            )),
        }
    }

    /// The plugin's default name in a chain: `NAME` without the version, so
    /// its shared state survives upgrades.
    pub fn default_name(&self) -> String {
        match self {
            Self::Builtin(n) | Self::Pushed { name: n, .. } => n.clone(),
            Self::Digest(hex) => format!("sha256-{}", &hex[..12]),
        }
    }
}

/// A pushed plugin's name: letters, digits, `-`, `_`, `.` (1 to 64).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A pushed plugin's version: letters, digits, `.`, `-`, `+`, `_` (1 to 64),
/// e.g. `1.2.0` or `2024-05-01`.
pub fn valid_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 64
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-+_".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_parse_and_errors_name_document_and_field() {
        let docs = parse_documents(
            "namespace: shop\nservices:\n  reviews:\n    plugins: [{ source: router@1.0.0 }]\n---\n---\nservices:\n  ratings: {}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].namespace.as_deref(), Some("shop"));
        let e = parse_documents("services: {}\n---\nservices:\n  r:\n    bogus: 1\n").unwrap_err();
        assert_eq!((e.document, e.path.as_str()), (1, "services.r.bogus"));
        assert!(e.reason.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn plugin_sources() {
        assert_eq!(
            PluginSource::parse("router@1.2.0").unwrap(),
            PluginSource::Pushed {
                name: "router".into(),
                version: "1.2.0".into()
            }
        );
        assert_eq!(
            PluginSource::parse("builtin:retry").unwrap(),
            PluginSource::Builtin("retry".into())
        );
        let d = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(
            PluginSource::parse(&d).unwrap(),
            PluginSource::Digest("ab".repeat(32))
        );
        assert!(PluginSource::parse("./plugin.wasm").is_err());
        assert!(PluginSource::parse("sha256:00").is_err());
        assert_eq!(
            PluginSource::parse("router@1.2.0").unwrap().default_name(),
            "router"
        );
    }
}
