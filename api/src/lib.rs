//! wasmesh's resource model: the documents an operator writes (today the
//! standalone `mesh.yaml`; the control plane's resources will join them), as
//! plain serde types, parsed with errors that name the field.
//!
//! Everything here is data. Validation that needs more than the document
//! (files, components, plugin configuration) happens in the proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The `apiVersion` this build understands.
pub const API_VERSION: &str = "wasmesh.io/v1alpha1";

/// Largest mesh file accepted, in bytes.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A standalone proxy's configuration file (`wasmesh proxy --config mesh.yaml`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MeshFile {
    /// Must be `wasmesh.io/v1alpha1` when present.
    #[serde(rename = "apiVersion")]
    pub api_version: Option<String>,
    /// Admin listener (`/ready`, `/config`, `/metrics`). Default `127.0.0.1:15000`.
    pub admin: Option<String>,
    /// Outbound listener: the local app's requests to other services. Default `127.0.0.1:15001`.
    pub listen: Option<String>,
    /// Inbound listener: peers' requests to this service. Optional.
    pub inbound: Option<String>,
    /// The service this sidecar stands beside (whose `inbound-plugins` run on
    /// the inbound listener). Required with `inbound`.
    pub local_service: Option<String>,
    /// Plugin runtime limits.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// Upstream connection settings.
    #[serde(default)]
    pub upstream: UpstreamSpec,
    /// Limits on client connections (both listeners).
    #[serde(default)]
    pub downstream: DownstreamSpec,
    /// The services of the mesh, by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
}

/// Limits that apply to every plugin call.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeSpec {
    /// Deadline of one hook call, e.g. `10ms`. Default `10ms`.
    pub hook_deadline: Option<String>,
    /// Linear-memory cap of one plugin instance, e.g. `16Mi`. Default `16Mi`.
    pub memory_limit: Option<String>,
    /// Ready instances kept per plugin. Default: twice the worker count.
    pub pool_size: Option<usize>,
    /// Longest a component may take to compile, e.g. `30s`; past it the
    /// compile is abandoned and the component refused. Default `30s`.
    pub compile_timeout: Option<String>,
    /// Quarantine a plugin version that keeps failing. Off unless given.
    pub quarantine: Option<QuarantineSpec>,
}

/// After `traps` failures (trap, deadline, memory cap) within `window`, a
/// plugin version is quarantined: the last known-good version of that
/// plugin serves instead, or, if there is none, its `on-failure` applies,
/// until a new version is deployed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QuarantineSpec {
    /// Failures that quarantine a version, e.g. `5`.
    pub traps: u32,
    /// The window they must fall in, e.g. `10s`.
    pub window: String,
}

/// How the proxy talks to upstreams.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamSpec {
    /// TCP connect timeout. Default `1s`.
    pub connect_timeout: Option<String>,
    /// Idle pooled connections are closed after this. Default `90s`.
    pub idle_timeout: Option<String>,
    /// Idle connections kept per endpoint. Default `32`.
    pub max_idle_per_endpoint: Option<usize>,
    /// Requests in flight per endpoint; more get 503 `UO`. Default `1024`.
    pub max_requests_per_endpoint: Option<usize>,
    /// Open connections per endpoint (per upstream protocol); a request that
    /// needs one more gets 503 `UO` at once. Default `1024`.
    pub max_connections_per_endpoint: Option<usize>,
}

/// Limits on downstream (client) connections, as Envoy's defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DownstreamSpec {
    /// Largest request head (request line and headers), e.g. `60Ki`. Past
    /// it: `431` (HTTP/1) or the stream is reset (HTTP/2). Default `60Ki`.
    pub max_header_bytes: Option<String>,
    /// Most headers in one request; past it: `431` / stream reset. Default `100`.
    pub max_headers: Option<usize>,
    /// Time a client has to send a whole request head. Default `10s`.
    pub header_read_timeout: Option<String>,
    /// A connection that moves no bytes for this long is closed. Default `5m`.
    pub idle_timeout: Option<String>,
    /// Open connections per listener; past it a new connection gets `503`
    /// with `Connection: close` and is closed at once. Default `10000`.
    pub max_connections: Option<usize>,
    /// Concurrent streams per HTTP/2 connection. Default `100`.
    pub max_concurrent_streams: Option<u32>,
}

/// Upstream protocol of a service.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (cleartext).
    H2c,
    /// Whatever the downstream spoke.
    #[default]
    Auto,
}

/// One service of the mesh.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceSpec {
    /// Extra host names routed to this service (the service name always is).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Upstream protocol. Default `auto`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Endpoints by subset name (`v1: ["127.0.0.1:9081"]`).
    #[serde(default)]
    pub endpoints: BTreeMap<String, Vec<String>>,
    /// The outbound chain, run by callers' sidecars, in order.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// The inbound chain, run by this service's own sidecar.
    #[serde(default)]
    pub inbound_plugins: Vec<PluginSpec>,
}

/// One entry of a chain.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginSpec {
    /// A path to a `.wasm` component (relative to the mesh file) or
    /// `builtin:<name>`.
    pub source: String,
    /// Unique in its chain. Default: the builtin's name or the file's stem.
    pub name: Option<String>,
    /// Expected sha256 (hex) of the component; refused when it differs.
    pub sha256: Option<String>,
    /// The plugin's configuration, passed to it as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// What a failure of this plugin does to the request. Default `closed`.
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// What happens to a request when its plugin traps, runs out of time or
/// memory, or returns an error.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The request gets 503 with flag `PF`.
    #[default]
    Closed,
    /// The request goes on as if the plugin were not there.
    Open,
}

/// A mesh file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{file}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit for a mesh file")]
    TooLarge {
        /// The file.
        file: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The document does not match the schema.
    #[error("{file}: {path}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Field path, e.g. `services.reviews.plugins[0].on-failure`.
        path: String,
        /// Why.
        reason: String,
    },
}

impl MeshFile {
    /// Read and parse a mesh file.
    pub fn load(file: &Path) -> Result<Self, LoadError> {
        let meta = std::fs::metadata(file).map_err(|source| LoadError::Read {
            file: file.into(),
            source,
        })?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(LoadError::TooLarge {
                file: file.into(),
                size: meta.len(),
            });
        }
        let text = std::fs::read_to_string(file).map_err(|source| LoadError::Read {
            file: file.into(),
            source,
        })?;
        Self::parse(&text).map_err(|(path, reason)| LoadError::Invalid {
            file: file.into(),
            path,
            reason,
        })
    }

    /// Parse a mesh document (YAML, or JSON, which is YAML). Errors are
    /// `(field path, reason)`.
    pub fn parse(text: &str) -> Result<Self, (String, String)> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let doc: MeshFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." || path.is_empty() {
                "(document)".into()
            } else {
                path
            };
            // The YAML error may name the path itself; say it once.
            let reason = e.into_inner().to_string();
            let reason = match reason.strip_prefix(&format!("{path}: ")) {
                Some(rest) => rest.to_string(),
                None => reason,
            };
            (path, reason)
        })?;
        if let Some(v) = &doc.api_version
            && v != API_VERSION
        {
            return Err((
                "apiVersion".into(),
                format!("unknown version {v:?}; this proxy understands {API_VERSION:?}"),
            ));
        }
        Ok(doc)
    }
}

/// Parse a duration as Istio and protobuf write them: `250ms`, `1s`, `1.5s`,
/// `2m`, `1h`, `0.25s`, `100us`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?}: missing a unit (ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?}: not a number followed by a unit"))?;
    let secs = match unit {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use us, ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{text:?}: out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Parse a size: `16Mi`, `512Ki`, `1Gi`, `1000000` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("Ki") {
        (n, 1u64 << 10)
    } else if let Some(n) = t.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("Gi") {
        (n, 1 << 30)
    } else {
        (t, 1)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected bytes or a number with Ki, Mi or Gi"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?}: out of range"))
}

#[cfg(test)]
mod tests {
    /// The fuzzer's seed and found corpus, replayed as it runs them
    /// (`fuzz/fuzz_targets/config.rs`): no panic; every error names a path.
    #[test]
    fn the_config_fuzz_corpus_replays() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/config");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let text = String::from_utf8_lossy(&data);
            let _ = super::parse_duration(&text);
            let _ = super::parse_size(&text);
            if let Err((path, reason)) = super::MeshFile::parse(&text) {
                assert!(!path.is_empty(), "an error without a path: {reason}");
            }
            n += 1;
        }
        assert!(n >= 3, "the corpus is missing ({n} files in {dir})");
        // Found by the fuzzer: an anchor (`&untime`) made the unknown-field
        // error's path empty.
        let found = std::fs::read(format!("{dir}/regression-empty-key")).unwrap();
        let (path, _) = super::MeshFile::parse(&String::from_utf8_lossy(&found)).unwrap_err();
        assert_eq!(path, "(document)");
    }

    use super::*;

    #[test]
    fn errors_name_the_field() {
        let e = MeshFile::parse(
            "services:\n  reviews:\n    plugins:\n      - source: builtin:x\n        on-failure: sideways\n",
        )
        .unwrap_err();
        assert_eq!(e.0, "services.reviews.plugins[0].on-failure");
        assert!(e.1.contains("unknown variant `sideways`"), "{}", e.1);

        let e = MeshFile::parse("listen: 1\nbogus: 2\n").unwrap_err();
        assert!(e.1.contains("unknown field `bogus`"), "{e:?}");

        let e = MeshFile::parse("apiVersion: wasmesh.io/v9\n").unwrap_err();
        assert_eq!(e.0, "apiVersion");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("0.25s").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_size("16Mi").unwrap(), 16 << 20);
        assert!(parse_size("lots").is_err());
    }
}
