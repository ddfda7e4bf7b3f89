//! wasmesh's resource model and control API: the documents an operator
//! writes (the standalone `mesh.yaml`, and the control plane's resources in
//! [`resources`]) as plain serde types, parsed with errors that name the
//! field; and the control plane's gRPC API ([`proto`], from
//! `proto/wasmesh/control/v1/control.proto`), shared by control, the proxies
//! and the CLI.
//!
//! Everything here is data. Validation that needs more than the document
//! (files, components, plugin configuration) happens in the proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod edges;
pub mod exposition;
pub mod proto;
pub mod resources;
pub mod spiffe;
pub mod values;

pub use spiffe::{SpiffeId, TrustDomain};
pub use values::{
    Address, BoundedDuration, BoundedSize, Count, HostName, PluginName, ServiceName, Sha256,
    SubsetName,
};
pub use wasmesh_units::{parse_duration, parse_size};

/// The `apiVersion` this build understands.
pub const API_VERSION: &str = "wasmesh.io/v1alpha1";

/// Largest mesh file accepted, in bytes.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Deadline of one hook call: 1ms to 10s.
pub type HookDeadline = BoundedDuration<1, 10_000>;
/// Linear-memory cap of a plugin instance: 1Mi to 4Gi.
pub type MemoryLimit = BoundedSize<{ 1 << 20 }, { 4 << 30 }>;
/// Ready instances kept per plugin: 1 to 1024.
pub type PoolSize = Count<1, 1024>;
/// Longest compile of one component: 1ms to 10m.
pub type CompileTimeout = BoundedDuration<1, 600_000>;
/// A positive duration (at least 1ms).
pub type PositiveDuration = BoundedDuration<1, { u64::MAX }>;
/// A duration, zero or more.
pub type AnyDuration = BoundedDuration<0, { u64::MAX }>;
/// At least one.
pub type AtLeastOne = Count<1, { u64::MAX }>;
/// Any count.
pub type AnyCount = Count<0, { u64::MAX }>;
/// Largest request head: 8Ki to 1Mi.
pub type HeadBytes = BoundedSize<{ 8 << 10 }, { 1 << 20 }>;
/// Most headers in one request: 1 to 1000.
pub type HeaderCount = Count<1, 1000>;
/// Time to send a request head: at least 100ms.
pub type HeadTimeout = BoundedDuration<100, { u64::MAX }>;
/// A connection's idle timeout: at least 1s.
pub type IdleTimeout = BoundedDuration<1000, { u64::MAX }>;
/// Concurrent streams per HTTP/2 connection: 1 to 2^31.
pub type StreamCount = Count<1, { 1 << 31 }>;

/// A standalone proxy's configuration file (`wasmesh proxy --config mesh.yaml`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MeshFile {
    /// Must be `wasmesh.io/v1alpha1` when present.
    #[serde(rename = "apiVersion")]
    pub api_version: Option<String>,
    /// Admin listener (`/ready`, `/config`, `/metrics`). Default `127.0.0.1:15000`.
    pub admin: Option<Address>,
    /// Outbound listener: the local app's requests to other services. Default `127.0.0.1:15001`.
    pub listen: Option<Address>,
    /// Inbound listener: peers' requests to this service. Optional.
    pub inbound: Option<Address>,
    /// The service this sidecar stands beside (whose `inbound-plugins` run on
    /// the inbound listener). Required with `inbound`.
    pub local_service: Option<ServiceName>,
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
    pub services: BTreeMap<ServiceName, ServiceSpec>,
}

/// Limits that apply to every plugin call.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeSpec {
    /// Deadline of one hook call, e.g. `10ms` (1ms to 10s). Default `10ms`.
    pub hook_deadline: Option<HookDeadline>,
    /// Linear-memory cap of one plugin instance, e.g. `16Mi` (1Mi to 4Gi).
    /// Default `16Mi`.
    pub memory_limit: Option<MemoryLimit>,
    /// Ready instances kept per plugin (1 to 1024). Default: twice the
    /// worker count.
    pub pool_size: Option<PoolSize>,
    /// Longest a component may take to compile, e.g. `30s` (up to 10m);
    /// past it the compile is abandoned and the component refused. Default
    /// `30s`.
    pub compile_timeout: Option<CompileTimeout>,
    /// Quarantine a plugin version that keeps failing. Off unless given.
    pub quarantine: Option<QuarantineSpec>,
}

/// After `traps` failures (trap, deadline, memory cap) within `window`, a
/// plugin version is quarantined: the last known-good version of that
/// plugin serves instead, or, if there is none, its `on-failure` applies,
/// until a new version is deployed.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QuarantineSpec {
    /// Failures that quarantine a version, e.g. `5` (at least 1).
    pub traps: Count<1, { u32::MAX as u64 }>,
    /// The window they must fall in, e.g. `10s`.
    pub window: PositiveDuration,
}

/// How the proxy talks to upstreams.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamSpec {
    /// TCP connect timeout. Default `1s`.
    pub connect_timeout: Option<PositiveDuration>,
    /// Idle pooled connections are closed after this. Default `90s`.
    pub idle_timeout: Option<PositiveDuration>,
    /// Idle connections kept per endpoint. Default `32`.
    pub max_idle_per_endpoint: Option<AnyCount>,
    /// Requests in flight per endpoint; more get 503 `UO`. Default `1024`.
    pub max_requests_per_endpoint: Option<AtLeastOne>,
    /// Open connections per endpoint (per upstream protocol); a request that
    /// needs one more gets 503 `UO` at once. Default `1024`.
    pub max_connections_per_endpoint: Option<AtLeastOne>,
}

/// Limits on downstream (client) connections, as Envoy's defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DownstreamSpec {
    /// Largest request head (request line and headers), e.g. `60Ki` (8Ki to
    /// 1Mi). Past it: `431` (HTTP/1) or the stream is reset (HTTP/2).
    /// Default `60Ki`.
    pub max_header_bytes: Option<HeadBytes>,
    /// Most headers in one request (1 to 1000); past it: `431` / stream
    /// reset. Default `100`.
    pub max_headers: Option<HeaderCount>,
    /// Time a client has to send a whole request head (at least 100ms).
    /// Default `10s`.
    pub header_read_timeout: Option<HeadTimeout>,
    /// A connection that moves no bytes for this long is closed (at least
    /// 1s). Default `5m`.
    pub idle_timeout: Option<IdleTimeout>,
    /// Open connections per listener; past it a new connection gets `503`
    /// with `Connection: close` and is closed at once. Default `10000`.
    pub max_connections: Option<AtLeastOne>,
    /// Concurrent streams per HTTP/2 connection. Default `100`.
    pub max_concurrent_streams: Option<StreamCount>,
}

/// Upstream protocol of a service.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, always.
    Http1,
    /// HTTP/2 with prior knowledge (cleartext), always.
    H2c,
    /// Whatever the downstream client spoke.
    Auto,
}

/// One service of the mesh.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceSpec {
    /// Extra host names routed to this service (the service name always is).
    #[serde(default)]
    pub hosts: Vec<HostName>,
    /// Upstream protocol. Default: HTTP/1.1, and HTTP/2 (h2c) for gRPC
    /// requests.
    pub protocol: Option<Protocol>,
    /// Endpoints by subset name (`v1: ["127.0.0.1:9081"]`): plaintext
    /// `ip:port`, or `{ address: ip:port, identity: spiffe://… }` for a
    /// sidecar reached over mesh mTLS.
    #[serde(default)]
    pub endpoints: BTreeMap<SubsetName, Vec<EndpointSpec>>,
    /// The outbound chain, run by callers' sidecars, in order.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// The inbound chain, run by this service's own sidecar.
    #[serde(default)]
    pub inbound_plugins: Vec<PluginSpec>,
    /// Mesh mTLS on this service's inbound listeners.
    pub mtls: Option<MtlsSpec>,
}

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// `ip:port`.
    pub address: Address,
    /// The SPIFFE ID it must present: spoken to over mesh mTLS. `None`:
    /// plaintext.
    pub identity: Option<SpiffeId>,
}

/// The map form of an endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeshEndpointSpec {
    address: Address,
    identity: SpiffeId,
}

impl<'de> Deserialize<'de> for EndpointSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EndpointSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("ip:port, or { address: ip:port, identity: spiffe://… }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EndpointSpec, E> {
                Ok(EndpointSpec {
                    address: Address::try_from(v.to_string()).map_err(E::custom)?,
                    identity: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<EndpointSpec, A::Error> {
                let m = MeshEndpointSpec::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(EndpointSpec {
                    address: m.address,
                    identity: Some(m.identity),
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A service's inbound mTLS, as Istio's PeerAuthentication.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MtlsSpec {
    /// `STRICT` (mesh mTLS only) or `PERMISSIVE` (mTLS or plaintext on the
    /// same port). Default: `STRICT` on sidecars with an identity.
    pub mode: Option<MtlsMode>,
    /// Hand the verified caller to the app in `x-forwarded-client-cert`
    /// (Envoy's format: `By=…;Hash=…;URI=…`). Default `false`. Whatever the
    /// setting, the header never passes in from a client.
    #[serde(default)]
    pub forward_client_cert: bool,
}

/// Inbound mTLS mode.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mesh mTLS only.
    Strict,
    /// mTLS or plaintext, told apart by the first byte.
    Permissive,
}

impl MtlsMode {
    /// As written.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
        }
    }
}

/// One entry of a chain.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginSpec {
    /// A path to a `.wasm` component (relative to the mesh file) or
    /// `builtin:<name>`.
    pub source: String,
    /// Unique in its chain. Default: the builtin's name or the file's stem.
    pub name: Option<PluginName>,
    /// Expected sha256 (hex) of the component; refused when it differs.
    pub sha256: Option<Sha256>,
    /// The plugin's configuration, passed to it as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// What a failure of this plugin does to the request. Default `closed`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Which requests the plugin runs for: a list of Istio
    /// `HTTPMatchRequest`s, any of which may match (none given: every
    /// request). The proxy checks it before calling the plugin; a request
    /// outside it never reaches the plugin (no hook runs for it). Kept as
    /// JSON here; the proxy and control compile it, naming the field of any
    /// error.
    #[serde(default, rename = "match")]
    pub matches: Option<serde_json::Value>,
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
            // The YAML error may start with the path (or its parent's) by
            // itself; say it once, in full, before the reason.
            let reason = e.into_inner().to_string();
            let reason = match reason.split_once(": ") {
                Some((head, rest)) if path.starts_with(head) => rest.to_string(),
                _ => reason,
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

        let e = MeshFile::parse("listen: 127.0.0.1:1\nbogus: 2\n").unwrap_err();
        assert!(e.1.contains("unknown field `bogus`"), "{e:?}");

        let e = MeshFile::parse("apiVersion: wasmesh.io/v9\n").unwrap_err();
        assert_eq!(e.0, "apiVersion");
    }

    #[test]
    fn endpoints_are_addresses_or_mesh_endpoints_with_an_identity() {
        let doc = MeshFile::parse(
            "services:\n  r:\n    endpoints: { v1: [\"127.0.0.1:1\", { address: \"127.0.0.1:2\", identity: \"spiffe://cluster.local/ns/default/sa/r\" }] }\n    mtls: { mode: PERMISSIVE, forward-client-cert: true }\n",
        )
        .unwrap();
        let r = &doc.services[&ServiceName::try_from("r".to_string()).unwrap()];
        let v1 = r.endpoints.values().next().unwrap();
        assert_eq!(v1[0].identity, None);
        assert_eq!(
            v1[1].identity.as_ref().unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/r"
        );
        let mtls = r.mtls.as_ref().unwrap();
        assert_eq!(mtls.mode, Some(MtlsMode::Permissive));
        assert!(mtls.forward_client_cert);

        let e = MeshFile::parse(
            "services:\n  r:\n    endpoints: { v1: [{ address: \"127.0.0.1:2\", identity: \"http://x\" }] }\n",
        )
        .unwrap_err();
        assert!(e.0.starts_with("services.r.endpoints.v1[0]"), "{e:?}");
        assert!(e.1.contains("must start with spiffe://"), "{e:?}");
        let e = MeshFile::parse("services:\n  r:\n    mtls: { mode: strict }\n").unwrap_err();
        assert_eq!(e.0, "services.r.mtls.mode");
    }

    #[test]
    fn values_are_checked_where_they_are_read() {
        let e = MeshFile::parse("runtime: { hook-deadline: 20s }\n").unwrap_err();
        assert_eq!(e.0, "runtime.hook-deadline");
        assert_eq!(
            e.1,
            "must be between 1ms and 10s, not \"20s\" at line 1 column 10"
        );
        let e = MeshFile::parse(
            "services:\n  reviews:\n    endpoints: { v1: [\"127.0.0.1:1\", \"nowhere\"] }\n",
        )
        .unwrap_err();
        assert_eq!(e.0, "services.reviews.endpoints.v1[1]");
        assert!(e.1.contains("\"nowhere\" is not an address"), "{}", e.1);
        let e =
            MeshFile::parse("services:\n  reviews:\n    plugins: [{ source: x, name: \"a b\" }]\n")
                .unwrap_err();
        assert_eq!(e.0, "services.reviews.plugins[0].name");
        let e = MeshFile::parse("downstream: { max-connections: 0 }\n").unwrap_err();
        assert_eq!(e.0, "downstream.max-connections");
        assert!(e.1.starts_with("must be at least 1, not 0"), "{}", e.1);
        let e = MeshFile::parse("services:\n  \"re views\": {}\n").unwrap_err();
        assert!(e.1.contains("a service name is"), "{e:?}");
    }
}
