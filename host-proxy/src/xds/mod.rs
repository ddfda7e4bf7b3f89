//! The control plane's client: one long-lived discovery stream. The proxy
//! says who it is, receives the snapshot that concerns it, fetches the
//! components it lacks (by sha256), builds the snapshot off the request path
//! and swaps it in — then ACKs it, or NACKs it with the reason and keeps
//! serving the previous one. When control is unreachable the proxy keeps
//! serving and reconnects with jittered exponential backoff (100 ms, doubling
//! to 5 s); with a compile cache it also keeps its last ACKed snapshot there,
//! so a restart while control is away serves what it served before.
//!
//! Every [`EDGE_REPORT_INTERVAL`] while they change, the proxy sends its
//! per-edge request counters on the stream (what `wasmesh top` shows).
//!
//! A proxy with a mesh identity holds the stream over mutual TLS with its
//! certificate ([`crate::identity`]), and reports each renewal on it.
//!
//! Depends on [`crate::config`] (what it feeds), [`crate::identity`] and
//! the control API in `wasmesh-api`; nothing in the request path depends
//! on it.

mod document;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_stream::StreamExt;
use wasmesh_api::proto;
use wasmesh_api::proto::discovery_client::DiscoveryClient;
use wasmesh_api::proto::registry_client::RegistryClient;

pub use self::document::document;
use crate::config::{Live, Origin};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::metrics::istio::EdgeSample;

/// The contract versions this proxy serves.
pub const WIT_VERSIONS: &[&str] = &["wasmesh:plugin@0.1.5"];

/// How to reach control, and who this proxy is.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// Control's gRPC address, `http://HOST:PORT`.
    pub url: String,
    /// The service this sidecar stands beside.
    pub service: String,
    /// Its subset.
    pub subset: String,
    /// Its instance id.
    pub instance: String,
    /// Its app's address, registered as an endpoint when it has no
    /// inbound listener.
    pub app: Option<SocketAddr>,
    /// Its inbound listener, registered as its service's endpoint (set from
    /// the listeners at start).
    pub inbound: Option<SocketAddr>,
    /// Where the last ACKed snapshot is kept (the compile cache).
    pub cache: Option<PathBuf>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// The proxy's own version.
    pub proxy_version: String,
}

/// How often the proxy reports its edge counters while they change.
pub const EDGE_REPORT_INTERVAL: Duration = Duration::from_secs(2);

const SNAPSHOT_FILE: &str = "control-snapshot.pb";

/// The last ACKed snapshot kept in the cache, if any.
pub fn cached_snapshot(cache: Option<&PathBuf>) -> Option<proto::Snapshot> {
    let bytes = std::fs::read(cache?.join(SNAPSHOT_FILE)).ok()?;
    proto::Snapshot::decode(bytes.as_slice()).ok()
}

fn keep_snapshot(cache: Option<&PathBuf>, s: &proto::Snapshot) {
    let Some(dir) = cache else {
        return;
    };
    let tmp = dir.join(format!(".{SNAPSHOT_FILE}.{}.tmp", std::process::id()));
    use std::os::unix::fs::DirBuilderExt as _;
    let written = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::write(&tmp, s.encode_to_vec()))
        .and_then(|()| std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE)));
    if let Err(e) = written {
        tracing::warn!("could not keep the snapshot in the compile cache: {e}");
    }
}

/// Hold the discovery stream for the life of the proxy.
pub async fn run(
    live: Arc<Live>,
    options: ControlOptions,
    identity: Option<Arc<Identity>>,
    metrics: Arc<Metrics>,
) {
    let mut delay = options.backoff_min;
    loop {
        match session(&live, &options, identity.as_ref(), &metrics, &mut delay).await {
            Ok(()) => tracing::warn!(url = %options.url, "control closed the stream; reconnecting"),
            Err(e) => {
                tracing::warn!(url = %options.url, "control unreachable: {e:#}; serving the last snapshot")
            }
        }
        // Full jitter: a fleet of proxies does not reconnect in step.
        let wait = delay.mul_f64(0.5 + fastrand::f64() * 0.5);
        crate::timer::sleep(wait).await;
        delay = (delay * 2).min(options.backoff_max);
    }
}

/// One connection: Hello, then a snapshot at a time, each ACKed or NACKed.
async fn session(
    live: &Arc<Live>,
    options: &ControlOptions,
    identity: Option<&Arc<Identity>>,
    metrics: &Arc<Metrics>,
    delay: &mut Duration,
) -> anyhow::Result<()> {
    let tls = identity.map(|i| wasmesh_identity::tls::control_client(i.credentials()));
    let channel = crate::identity::connect(&options.url, tls).await?;
    let mut renewals = identity.map(|i| i.subscribe());
    let mut discovery = DiscoveryClient::new(channel.clone());
    let mut registry = RegistryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let applied = match &live.load().origin {
        Origin::Control { version, .. } => version.clone(),
        _ => String::new(),
    };
    tx.send(message(proto::proxy_message::Message::Hello(hello(
        options, identity, applied,
    ))))
    .await?;
    let mut inbound = discovery
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(url = %options.url, "connected to control");
    *delay = options.backoff_min;
    let mut report = crate::timer::interval(EDGE_REPORT_INTERVAL);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What control has of the counters on this connection.
    let mut reported = None;
    loop {
        let m = tokio::select! {
            m = inbound.next() => m,
            _ = report.tick() => {
                let edges = metrics.istio.edges();
                if reported.as_ref() != Some(&edges) {
                    let r = edge_report(metrics.istio.uptime(), &edges);
                    tx.send(message(proto::proxy_message::Message::Edges(r))).await?;
                    reported = Some(edges);
                }
                continue;
            }
            Ok(()) = async { match renewals.as_mut() {
                Some(r) => r.changed().await,
                None => std::future::pending().await,
            } } => {
                let c = renewals.as_mut().map(|r| r.borrow_and_update().clone());
                if let Some(c) = c {
                    tx.send(message(proto::proxy_message::Message::Certificate(c))).await?;
                }
                continue;
            }
        };
        let Some(m) = m else { break };
        let m = m?;
        if let Some(p) = m.prefetch {
            tokio::spawn(prefetch(live.clone(), registry.clone(), p, metrics.clone()));
        }
        let Some(snapshot) = m.snapshot else {
            continue;
        };
        let ack = answer(live, &mut registry, &snapshot, options).await;
        tx.send(message(proto::proxy_message::Message::Ack(ack)))
            .await?;
    }
    Ok(())
}

/// Apply a snapshot (kept in the compile cache once applied): its ACK, or
/// its NACK with the reason.
async fn answer(
    live: &Arc<Live>,
    registry: &mut RegistryClient<tonic::transport::Channel>,
    snapshot: &proto::Snapshot,
    options: &ControlOptions,
) -> proto::Ack {
    let version = snapshot.version.clone();
    let error = match apply(live, registry, snapshot, options).await {
        Ok(()) => {
            keep_snapshot(options.cache.as_ref(), snapshot);
            tracing::info!(
                version,
                revision = snapshot.revision,
                "control snapshot applied"
            );
            String::new()
        }
        Err(e) => {
            tracing::error!(
                version,
                "control snapshot refused, the previous one keeps serving: {e}"
            );
            e
        }
    };
    proto::Ack { version, error }
}

/// Who this proxy is, and what it serves now.
fn hello(
    options: &ControlOptions,
    identity: Option<&Arc<Identity>>,
    applied: String,
) -> proto::Hello {
    proto::Hello {
        service: options.service.clone(),
        subset: options.subset.clone(),
        instance: options.instance.clone(),
        app_address: options.app.map(|a| a.to_string()).unwrap_or_default(),
        proxy_version: options.proxy_version.clone(),
        wit_versions: WIT_VERSIONS.iter().map(|s| s.to_string()).collect(),
        applied_version: applied,
        inbound_address: options.inbound.map(|a| a.to_string()).unwrap_or_default(),
        certificate: identity.map(|i| i.status()),
    }
}

/// The counters as control takes them.
fn edge_report(uptime: Duration, edges: &[EdgeSample]) -> proto::EdgeReport {
    proto::EdgeReport {
        uptime_ms: uptime.as_millis() as u64,
        bounds_ms: wasmesh_api::edges::bounds_ms().to_vec(),
        edges: edges
            .iter()
            .map(|e| proto::EdgeCounters {
                reporter: e.key.reporter.to_string(),
                source: e.key.source.clone(),
                destination: e.key.destination.clone(),
                subset: e.key.subset.clone(),
                requests: e.requests,
                errors: e.errors,
                buckets: e.buckets.clone(),
            })
            .collect(),
    }
}

fn message(m: proto::proxy_message::Message) -> proto::ProxyMessage {
    proto::ProxyMessage { message: Some(m) }
}

/// Fetch what the snapshot needs, build it and swap it in.
async fn apply(
    live: &Arc<Live>,
    registry: &mut RegistryClient<tonic::transport::Channel>,
    snapshot: &proto::Snapshot,
    options: &ControlOptions,
) -> Result<(), String> {
    // (sha256, origin) of every component the snapshot names and this
    // proxy lacks.
    let missing: Vec<(String, String)> = snapshot
        .services
        .iter()
        .flat_map(|s| s.plugins.iter().chain(&s.inbound_plugins))
        .filter_map(|e| {
            let sha = e.source.strip_prefix("sha256:")?;
            (!live.components().has(sha)).then(|| (sha.to_string(), e.origin.clone()))
        })
        .collect();
    for (sha, origin) in missing {
        if live.components().has(&sha) {
            continue;
        }
        let bytes = fetch(registry, &sha)
            .await
            .map_err(|e| format!("fetching {origin} (sha256 {sha}): {e}"))?;
        live.components().insert(&sha, bytes)?;
    }
    let doc = document(snapshot, &options.service).map_err(|e| e.to_string())?;
    let origin = Origin::Control {
        version: snapshot.version.clone(),
        cached: false,
    };
    let live = live.clone();
    tokio::task::spawn_blocking(move || live.apply(&doc, &origin))
        .await
        .map_err(|e| format!("building the snapshot failed: {e}"))?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Fetch and compile a component control is validating, so that the apply
/// naming it (if control accepts it) finds it compiled. A failure costs
/// only the head start: the apply fetches and compiles as usual, or never
/// names it.
async fn prefetch(
    live: Arc<Live>,
    mut registry: RegistryClient<tonic::transport::Channel>,
    p: proto::Prefetch,
    metrics: Arc<Metrics>,
) {
    let sha = p.sha256.to_ascii_lowercase();
    if live.components().has(&sha) {
        return;
    }
    let result = match fetch(&mut registry, &sha).await {
        Ok(bytes) => {
            let s = sha.clone();
            tokio::task::spawn_blocking(move || live.prefetch(&s, bytes))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
        Err(e) => Err(e.message().to_string()),
    };
    let label = match &result {
        Ok(()) => {
            tracing::info!(plugin = %p.origin, sha256 = %sha, "prefetched a pushed component");
            "compiled"
        }
        Err(e) => {
            tracing::debug!(plugin = %p.origin, sha256 = %sha, "prefetch failed: {e}");
            "failed"
        }
    };
    metrics
        .prefetches
        .get_or_create(&vec![("result", label.to_string())])
        .inc();
}

async fn fetch(
    registry: &mut RegistryClient<tonic::transport::Channel>,
    sha256: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = registry
        .fetch(proto::FetchRequest {
            sha256: sha256.to_string(),
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk?.data);
        if bytes.len() > crate::runtime::MAX_COMPONENT_BYTES {
            return Err(tonic::Status::out_of_range("the component is over 16 MiB"));
        }
    }
    Ok(bytes)
}
