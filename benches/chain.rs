//! In-process cost of the plugin boundary: one hook call, and the 5 stock
//! plugins as one chain (router 90/10, retry, circuit breaker, fault
//! injection at 0%, authz allow; each implementing only the hooks it needs:
//! 5 × on-request, 2 × on-response = 7 guest calls per request; in-flight
//! counts are host-held, so no on-complete) — as wasm components under the real runtime (deadlines and memory
//! caps on, pooled instances), beside the same plugin code compiled natively
//! and called through the SDK's native path, in the same run.
//!
//! `cargo bench --bench chain` prints criterion's medians, then a
//! per-iteration histogram (p50 / p99 / p99.9) for each arm.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::Criterion;
use wasmesh_plugin_sdk::testing::{Harness, TestRequest, TestResponse, attempt};
use wasmesh_plugin_sdk::{Completion, Outcome};
use wasmesh_proxy::metrics::Metrics;
use wasmesh_proxy::runtime::state::StateStore;
use wasmesh_proxy::runtime::types::{
    Attempt as HostAttempt, Completion as HostCompletion, Outcome as HostOutcome, Protocol,
    ResponseView,
};
use wasmesh_proxy::runtime::{
    ConfiguredPlugin, Limits, LoweredAttempt, OnFailure, PluginScope, RequestView, Runtime,
};
use wasmesh_proxy::upstream::cluster::ClusterView;

const CONFIGS: [(&str, &str, &str); 5] = [
    (
        "router",
        wasmesh_artifacts::ROUTER,
        r#"{"http":[{"match":[{"headers":{"end-user":{"exact":"jason"}}}],"route":[{"destination":{"subset":"v2"}}]},
                   {"route":[{"destination":{"subset":"v1"},"weight":90},{"destination":{"subset":"v2"},"weight":10}]}]}"#,
    ),
    (
        "retry",
        wasmesh_artifacts::RETRY,
        r#"{"attempts":3,"perTryTimeout":"1s","retryOn":"5xx"}"#,
    ),
    (
        "circuit-breaker",
        wasmesh_artifacts::CIRCUIT_BREAKER,
        r#"{"outlierDetection":{"consecutive5xxErrors":5,"baseEjectionTime":"30s"},
            "connectionPool":{"http":{"http1MaxPendingRequests":1000000}}}"#,
    ),
    (
        "fault-injection",
        wasmesh_artifacts::FAULT_INJECTION,
        r#"{"abort":{"httpStatus":503,"percentage":{"value":0}}}"#,
    ),
    (
        "authz",
        wasmesh_artifacts::AUTHZ,
        r#"{"action":"ALLOW","rules":[{"to":[{"operation":{"methods":["GET","POST"],"paths":["/reviews/*","/api/*"]}}]}]}"#,
    ),
];

const HEADERS: [(&str, &str); 10] = [
    ("host", "reviews"),
    ("user-agent", "bench/1.0"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip"),
    ("x-request-id", "0123456789abcdef0123456789abcdef"),
    ("x-forwarded-for", "127.0.0.1"),
    ("x-forwarded-proto", "http"),
    (
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ),
    ("end-user", "someone"),
    ("content-type", "application/json"),
];

fn wasm_chain(runtime: &Arc<Runtime>) -> Vec<Arc<ConfiguredPlugin>> {
    let metrics = Arc::new(Metrics::new());
    let state = StateStore::default();
    let cluster = Arc::new(ArcSwap::from_pointee(ClusterView::default()));
    CONFIGS
        .iter()
        .map(|(name, path, config)| {
            let bytes = std::fs::read(path).unwrap();
            let component = runtime.load(&bytes).unwrap();
            let scope = Arc::new(PluginScope {
                service: "reviews".into(),
                plugin: (*name).into(),
                version: component.sha256[..12].into(),
                state: state.scope("reviews", name),
                cluster: cluster.clone(),
                metrics: metrics.clone(),
                log_budget: Default::default(),
            });
            Arc::new(
                ConfiguredPlugin::new(
                    runtime,
                    component,
                    scope,
                    path.to_string(),
                    OnFailure::Closed,
                    config.to_string(),
                    Limits::default(),
                )
                .unwrap(),
            )
        })
        .collect()
}

fn req_data() -> RequestView {
    let mut b = http::Request::builder().method("GET").uri("/reviews/1?x=y");
    for (k, v) in HEADERS {
        b = b.header(k, v);
    }
    let (parts, ()) = b.body(()).unwrap().into_parts();
    RequestView {
        parts,
        scheme: "http",
        authority: Some(http::uri::Authority::from_static("reviews")),
        port: 80,
        protocol: Protocol::Http1,
        source_address: "127.0.0.1:50000".into(),
        source_principal: None,
        service: "reviews".into(),
        id: http::HeaderValue::from_static("0123456789abcdef0123456789abcdef"),
        holds: Default::default(),
    }
}

/// A first attempt answered 200 by the upstream.
fn ok_attempt() -> HostAttempt<'static> {
    HostAttempt {
        number: 1,
        outcome: HostOutcome::Response(200),
        service: "reviews",
        subset: Some("v1"),
        endpoint: Some("127.0.0.1:9081"),
        duration: Duration::from_micros(800),
    }
}

/// One request through the wasm chain: on-request in order, on-response in
/// reverse for an upstream 200, on-complete.
fn run_wasm(
    chain: &[Arc<ConfiguredPlugin>],
    req: &mut Option<Box<RequestView>>,
    resp: &mut Option<ResponseView>,
) {
    for p in chain {
        if p.hooks.on_request {
            black_box(p.on_request(req).unwrap());
        }
    }
    let a = LoweredAttempt::new(&ok_attempt());
    for p in chain.iter().rev() {
        if p.hooks.on_response {
            black_box(p.on_response(req, resp, &a).unwrap());
        }
    }
    let done = HostCompletion {
        status: Some(200),
        attempts: 1,
        duration: Duration::from_micros(900),
    };
    for p in chain {
        if p.hooks.on_complete {
            p.on_complete(req, done).unwrap();
        }
    }
    // The request ends: the proxy drops its data, releasing counter holds.
    req.as_mut().unwrap().holds.release();
}

struct NativeChain {
    router: Harness<router::Router>,
    retry: Harness<retry::Retry>,
    breaker: Harness<circuit_breaker::CircuitBreaker>,
    fault: Harness<fault_injection::FaultInjection>,
    authz: Harness<authz::Authz>,
}

fn native_chain() -> NativeChain {
    NativeChain {
        router: Harness::new(CONFIGS[0].2).unwrap(),
        retry: Harness::new(CONFIGS[1].2).unwrap(),
        breaker: Harness::new(CONFIGS[2].2).unwrap(),
        fault: Harness::new(CONFIGS[3].2).unwrap(),
        authz: Harness::new(CONFIGS[4].2).unwrap(),
    }
}

fn test_request() -> TestRequest {
    let mut r = TestRequest::get("/reviews/1?x=y");
    for (k, v) in HEADERS {
        r = r.header(k, v);
    }
    r
}

/// The same request through the same logic compiled natively.
fn run_native(c: &NativeChain, req: &TestRequest, resp: &TestResponse) {
    black_box(c.router.on_request(req).unwrap());
    black_box(c.retry.on_request(req).unwrap());
    black_box(c.breaker.on_request(req).unwrap());
    black_box(c.fault.on_request(req).unwrap());
    black_box(c.authz.on_request(req).unwrap());
    let a = attempt(1, Outcome::Response(200), "127.0.0.1:9081");
    black_box(c.breaker.on_response(req, resp, &a).unwrap());
    black_box(c.retry.on_response(req, resp, &a).unwrap());
    let done = Completion {
        status: Some(200),
        attempts: 1,
        duration_us: 900,
    };
    c.breaker.on_complete(req, &done);
    c.retry.on_complete(req, &done);
}

fn percentiles(name: &str, mut f: impl FnMut()) -> Duration {
    const N: usize = 100_000;
    for _ in 0..10_000 {
        f();
    }
    let mut samples = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    let p = |q: f64| samples[((N as f64) * q) as usize];
    println!(
        "{name:<28} p50 {:>9.3?}  p99 {:>9.3?}  p99.9 {:>9.3?}  ({N} iterations)",
        p(0.50),
        p(0.99),
        p(0.999)
    );
    p(0.50)
}

/// A test fixture, configured with `{}` under the default limits.
fn fixture(runtime: &Arc<Runtime>, path: &str, name: &str) -> ConfiguredPlugin {
    let bytes = std::fs::read(path).unwrap();
    let component = runtime.load(&bytes).unwrap();
    let scope = Arc::new(PluginScope {
        service: "bench".into(),
        plugin: name.into(),
        version: component.sha256[..12].into(),
        state: Arc::default(),
        cluster: Arc::new(ArcSwap::from_pointee(ClusterView::default())),
        metrics: Arc::new(Metrics::new()),
        log_budget: Default::default(),
    });
    ConfiguredPlugin::new(
        runtime,
        component,
        scope,
        name.into(),
        OnFailure::Closed,
        "{}".into(),
        Limits::default(),
    )
    .unwrap()
}

fn main() {
    let runtime = Runtime::new().unwrap();
    let chain = wasm_chain(&runtime);
    let native = native_chain();
    let mut req = Some(Box::new(req_data()));
    let mut resp = Some(ResponseView {
        status: 200,
        headers: http::HeaderMap::new(),
    });
    let treq = test_request();
    let tresp = TestResponse::status(200);
    let fault = chain[3].clone();
    let calls: usize = chain
        .iter()
        .map(|p| {
            usize::from(p.hooks.on_request)
                + usize::from(p.hooks.on_response)
                + usize::from(p.hooks.on_complete)
        })
        .sum();
    let nop = fixture(&runtime, wasmesh_artifacts::NOP, "nop");

    let mut c = Criterion::default().configure_from_args();
    c.bench_function("boundary/nop on-request (the floor)", |b| {
        b.iter(|| black_box(nop.on_request(&mut req).unwrap()))
    });
    let a = LoweredAttempt::new(&ok_attempt());
    c.bench_function("boundary/nop on-response (the floor)", |b| {
        b.iter(|| black_box(nop.on_response(&mut req, &mut resp, &a).unwrap()))
    });
    c.bench_function("boundary/one-call (fault on-request)", |b| {
        b.iter(|| black_box(fault.on_request(&mut req).unwrap()))
    });
    c.bench_function(&format!("chain/wasm ({calls} guest calls)"), |b| {
        b.iter(|| run_wasm(&chain, &mut req, &mut resp))
    });
    c.bench_function("chain/native", |b| {
        b.iter(|| run_native(&native, &treq, &tresp))
    });
    c.final_summary();

    println!("\nper-iteration histogram:");
    percentiles("boundary/nop on-request", || {
        black_box(nop.on_request(&mut req).unwrap());
    });
    percentiles("boundary/nop on-response", || {
        black_box(nop.on_response(&mut req, &mut resp, &a).unwrap());
    });
    percentiles("boundary/one-call", || {
        black_box(fault.on_request(&mut req).unwrap());
    });
    for p in &chain {
        if p.hooks.on_request {
            percentiles(&format!("{}/on-request", p.name), || {
                black_box(p.on_request(&mut req).unwrap());
            });
        }
        if p.hooks.on_response {
            percentiles(&format!("{}/on-response", p.name), || {
                black_box(p.on_response(&mut req, &mut resp, &a).unwrap());
            });
        }
    }
    let wasm = percentiles("chain/wasm", || run_wasm(&chain, &mut req, &mut resp));
    let nat = percentiles("chain/native", || run_native(&native, &treq, &tresp));

    // How long a runaway plugin holds a worker: a looping on-request under
    // the default 10 ms deadline (never cut before it; after it, about a tick
    // plus what the epoch ticker's sleeps overran).
    let looper = fixture(&runtime, wasmesh_artifacts::LOOPER, "looper");
    let mut cut: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            assert!(looper.on_request(&mut req).is_err());
            t.elapsed()
        })
        .collect();
    cut.sort();
    println!(
        "runaway loop cut after      p50 {:>9.3?}  max {:>9.3?}  (deadline {:?}, tick {:?}, 50 loops)",
        cut[25],
        cut[49],
        Limits::default().deadline,
        wasmesh_proxy::runtime::EPOCH_TICK
    );
    println!(
        "\nRESULT chain_added_p50={:.3?} (budget 2µs) guest_calls_per_request={calls}",
        wasm.saturating_sub(nat)
    );
}
