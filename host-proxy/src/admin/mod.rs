//! The admin listener: `GET /ready` (503 while draining), `GET /config` (the
//! serving snapshot and the last refused reload, as JSON), `GET /metrics`
//! (Prometheus text).
//!
//! Reads [`crate::config`] and [`crate::metrics`]; nothing depends on it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::chain::Chain;
use crate::config::{Live, Snapshot};
use crate::metrics::Metrics;
use wasmesh_api::exposition;

/// What the admin listener reads.
pub struct Admin {
    /// The serving configuration.
    pub live: Arc<Live>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Set on shutdown: `/ready` answers 503.
    pub draining: Arc<AtomicBool>,
}

/// Accept admin connections until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Admin>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn route(shared: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n");
    }
    match req.uri().path() {
        "/ready" => {
            if shared.draining.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                text(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        "/config" => {
            let (snap, last_error) = shared.live.state();
            let body = config_json(&snap, last_error.map(|e| json!(e)).unwrap_or(Value::Null));
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        "/metrics" if wants_openmetrics(&req) => text(
            StatusCode::OK,
            exposition::OPENMETRICS_TEXT,
            shared.metrics.encode(),
        ),
        "/metrics" => text(
            StatusCode::OK,
            exposition::PROMETHEUS_TEXT,
            shared.metrics.encode_prometheus(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready, /config or /metrics\n",
        ),
    }
}

/// `["all"]`, or the kinds named as in the contract (`5xx`,
/// `connect-failure`, `next-on-endpoint` ...).
fn outcome_names(wanted: crate::runtime::Outcomes) -> Vec<&'static str> {
    if wanted.contains(crate::runtime::Outcomes::ALL) {
        return vec!["all"];
    }
    crate::runtime::Outcomes::NAMED
        .iter()
        .filter(|(kind, _)| wanted.contains(*kind))
        .map(|(_, name)| *name)
        .collect()
}

fn chain_json(chain: &Chain) -> Value {
    chain
        .plugins
        .iter()
        .zip(&chain.matches)
        .map(|(p, m)| {
            json!({
                "match": m.as_ref().map(|m| &m.json),
                "name": &*p.name,
                "source": p.source,
                "sha256": p.sha256(),
                "on_failure": match p.on_failure { wasmesh_api::OnFailure::Closed => "closed", wasmesh_api::OnFailure::Open => "open" },
                "hooks": {
                    "on_request": p.hooks.on_request,
                    "on_response": p.hooks.on_response,
                    "on_complete": p.hooks.on_complete,
                },
                // The outcomes its on-response is called for, when it is.
                "on_response_for": outcome_names(p.outcomes.wanted()),
                // What its on-request decides for every request without a
                // call (`on-request-fixed`), and the counter it holds first.
                "on_request_fixed": p.fixed.as_ref().map(|f| json!({
                    "decision": crate::chain::decision_word(&f.decision),
                    "hold": f.hold.as_ref().map(|(key, limit)| json!({"key": &**key, "limit": limit})),
                })),
                // The table its on-request decides by without a call
                // (`on-request-table`): each rule's match and weighted
                // decisions, and the decision when none holds.
                "on_request_table": p.table.as_ref().map(|t| &t.json),
                "version": p.version(),
                "quarantined": p.is_quarantined(),
                // What serves this plugin's hooks now: itself, its last
                // known-good version, or nobody (on-failure applies).
                "serving": if !p.is_quarantined() {
                    json!(p.version())
                } else {
                    match p.fallback() {
                        Some(f) => json!(f.version()),
                        None => Value::Null,
                    }
                },
            })
        })
        .collect()
}

fn config_json(snap: &Snapshot, last_error: Value) -> Value {
    let mut names: Vec<_> = snap.services.keys().collect();
    names.sort();
    let services: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let s = &snap.services[name];
            let endpoints: Vec<Value> = s
                .cluster
                .endpoints
                .iter()
                .map(|e| json!({ "subset": &*e.subset, "address": &*e.address }))
                .collect();
            json!({
                "name": name,
                "endpoints": endpoints,
                "plugins": chain_json(&s.outbound),
                "inbound_plugins": chain_json(&s.inbound),
            })
        })
        .collect();
    json!({
        "version": snap.version,
        "file": snap.origin.file().map(|f| f.display().to_string()),
        "source": snap.origin.to_string(),
        "last_error": last_error,
        "services": services,
    })
}

/// Whether the scraper asks for OpenMetrics (Prometheus does, first); else
/// the Prometheus text format 0.0.4.
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    exposition::wants_openmetrics(
        req.headers()
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}
