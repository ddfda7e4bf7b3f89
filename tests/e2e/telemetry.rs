//! Telemetry end to end: Istio's standard request metrics on a real scrape
//! of a real proxy after mixed traffic, checked by Prometheus's own
//! `promtool` and against the traffic sent, sample by sample.

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn istio_metrics_pass_promtool_and_count_mixed_traffic_exactly() {
    let v1 = Upstream::answering("v1", 200).await;
    let v2 = Upstream::answering("v2", 503).await;
    let logs = tempfile::tempdir().unwrap();
    let access = logs.path().join("access.log");
    let proxy = Proxy::start_with(
        &format!(
            r#"services:
  reviews:
    endpoints:
      v1: ["{}"]
      v2: ["{}"]
    plugins:
      - source: builtin:router
        config:
          http:
            - match: [{{ headers: {{ end-user: {{ exact: jason }} }} }}]
              route: [{{ destination: {{ subset: v2 }} }}]
            # Sticky (one destination: always v1) makes the router read the
            # request, so it is called for each (routes that are a table
            # are decided by the proxy without a call or a call metric).
            - route: [{{ destination: {{ subset: v1 }} }}]
              sticky: {{ header: end-user }}
"#,
            v1.addr, v2.addr
        ),
        &["--access-log", access.to_str().unwrap()],
    )
    .await;

    // 7 GETs to v1 (200), 2 POSTs of 5 bytes to v1 (200), 3 to v2 (503),
    // 2 to a host the mesh does not know (404 NR).
    for _ in 0..7 {
        assert_eq!(via(&proxy, "reviews", "/r").await.status, 200);
    }
    for _ in 0..2 {
        let req = http::Request::post(format!("http://{}/r", proxy.listen))
            .header("host", "reviews")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        assert_eq!(send(http1(), req).await.unwrap().status, 200);
    }
    for _ in 0..3 {
        let req = http::Request::get(format!("http://{}/r", proxy.listen))
            .header("host", "reviews")
            .header("end-user", "jason")
            .body(Full::default())
            .unwrap();
        assert_eq!(send(http1(), req).await.unwrap().status, 503);
    }
    for _ in 0..2 {
        assert_eq!(via(&proxy, "nowhere", "/").await.status, 404);
    }

    let v1_ok = [
        ("reporter", "source"),
        ("destination_service", "reviews"),
        ("destination_service_name", "reviews"),
        ("destination_workload", "reviews"),
        ("destination_version", "v1"),
        ("destination_canonical_revision", "v1"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("request_protocol", "http"),
        ("source_principal", "unknown"),
        ("destination_principal", "unknown"),
        ("connection_security_policy", "unknown"),
    ];
    let v2_fail = [
        ("destination_service", "reviews"),
        ("destination_version", "v2"),
        ("response_code", "503"),
    ];
    let no_route = [
        ("destination_service", "unknown"),
        ("response_code", "404"),
        ("response_flags", "NR"),
    ];
    // Recorded as each response body ends: wait for the last ones.
    proxy
        .wait_sample("istio_requests_total", &no_route, 2.0)
        .await;
    let text = proxy.wait_sample("istio_requests_total", &v1_ok, 9.0).await;
    assert_eq!(sample(&text, "istio_requests_total", &v2_fail), Some(3.0));
    for (series, n) in [(&v1_ok[..], 9.0), (&v2_fail[..], 3.0), (&no_route[..], 2.0)] {
        assert_eq!(
            sample(&text, "istio_request_duration_milliseconds_count", series),
            Some(n)
        );
        assert_eq!(sample(&text, "istio_request_bytes_count", series), Some(n));
        let mut inf = series.to_vec();
        inf.push(("le", "+Inf"));
        assert_eq!(
            sample(&text, "istio_request_duration_milliseconds_bucket", &inf),
            Some(n)
        );
    }
    // Bodies: 2 × "hello" in; 9 × "-\n" back from v1 (the upstream's own).
    assert_eq!(sample(&text, "istio_request_bytes_sum", &v1_ok), Some(10.0));
    assert_eq!(
        sample(&text, "istio_response_bytes_sum", &v1_ok),
        Some(18.0)
    );
    let mut empty = v1_ok.to_vec();
    empty.push(("le", "1.0"));
    assert_eq!(
        sample(&text, "istio_request_bytes_bucket", &empty),
        Some(7.0),
        "7 GETs had no body"
    );
    // The proxy's own counter agrees.
    assert_eq!(
        sample(
            &text,
            "wasmesh_requests_total",
            &[("destination_service", "reviews"), ("response_code", "200")]
        ),
        Some(9.0)
    );

    // The router decided a route for each of the 12 requests it saw (the 2
    // with no route never reached the chain), and each call was timed.
    let router = [
        ("service", "reviews"),
        ("plugin", "router"),
        ("hook", "on_request"),
    ];
    let route = [&router[..], &[("decision", "route")]].concat();
    assert_eq!(
        sample(&text, "wasmesh_plugin_decisions_total", &route),
        Some(12.0)
    );
    assert_eq!(
        sample(&text, "wasmesh_plugin_call_duration_seconds_count", &router),
        Some(12.0)
    );

    // Prometheus's own linter: nothing but its base-unit advice on Istio's
    // `_milliseconds` name, which Istio's dashboards need as it is.
    let complaints = promtool_complaints(&text);
    assert!(
        complaints.is_empty(),
        "promtool says:\n{complaints:#?}\non:\n{text}"
    );

    // The access log: a JSON line per request, 14 in all.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&access).unwrap_or_default();
        if text.lines().count() >= 14 || std::time::Instant::now() > deadline {
            break text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 14, "{lines:#?}");
    let with = |status: u64| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["status"] == status).collect()
    };
    let ok = with(200);
    assert_eq!(ok.len(), 9);
    for l in &ok {
        assert_eq!(l["subset"], "v1", "{l}");
        assert_eq!(l["upstream"], v1.addr.to_string(), "{l}");
        assert_eq!(l["service"], "reviews");
        assert_eq!(l["authority"], "reviews");
        assert_eq!(l["path"], "/r");
        assert_eq!(l["flags"], "-");
        assert_eq!(l["attempts"], 1);
        assert_eq!(l["listener"], "outbound");
        assert_eq!(
            l["plugins"],
            serde_json::json!([{ "plugin": "router", "hook": "on_request", "decision": "route" }])
        );
        assert!(l["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
        assert!(l["request_id"].is_string());
        assert!(l["trace_id"].is_null(), "no tracing here: {l}");
    }
    assert_eq!(
        ok.iter()
            .filter(|l| l["method"] == "POST" && l["bytes_in"] == 5)
            .count(),
        2
    );
    assert!(ok.iter().all(|l| l["bytes_out"] == 2));
    let failed = with(503);
    assert_eq!(failed.len(), 3);
    assert!(
        failed
            .iter()
            .all(|l| l["subset"] == "v2" && l["upstream"] == v2.addr.to_string())
    );
    let no_route = with(404);
    assert_eq!(no_route.len(), 2);
    assert!(
        no_route
            .iter()
            .all(|l| l["flags"] == "NR" && l["authority"] == "nowhere" && l["attempts"] == 0)
    );
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "wasmesh_access_log_dropped_total", &[]),
        Some(0.0)
    );

    // A scraper that asks for OpenMetrics gets it.
    let req = http::Request::get(format!("http://{}/metrics", proxy.admin))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .body(Full::default())
        .unwrap();
    let om = send(http1(), req).await.unwrap();
    assert!(
        om.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        om.header("content-type")
    );
    assert!(om.body_text().ends_with("# EOF\n"));
    assert!(om.body_text().contains("# TYPE istio_requests counter\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_denied_requests_moves_counters_not_the_log() {
    let up = Upstream::echo("up").await;
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: builtin:authz
        config:
          policies:
            - name: audit-all
              action: AUDIT
              rules: [{{ to: [{{ operation: {{ paths: ["/*"] }} }}] }}]
            - name: deny-admin
              action: DENY
              rules: [{{ to: [{{ operation: {{ paths: ["/admin*"] }} }}] }}]
"#,
        up.addr
    ))
    .await;
    const N: usize = 200;
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let listen = proxy.listen;
            tokio::spawn(async move {
                for _ in 0..N / 8 {
                    let req = http::Request::get(format!("http://{listen}/admin/x"))
                        .header("host", "reviews")
                        .body(Full::default())
                        .unwrap();
                    assert_eq!(send(http1(), req).await.unwrap().status, 403);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let elapsed = started.elapsed();
    let denied = [("plugin", "authz"), ("name", "denied")];
    let m = proxy
        .wait_sample("wasmesh_plugin_custom_total", &denied, N as f64)
        .await;

    // Every denial is counted; none is an info line (they are debug lines).
    let log = proxy.log_text();
    let lines = |level: &str, text: &str| {
        log.lines()
            .filter(|l| l.contains(level) && l.contains(text))
            .count()
    };
    assert_eq!(lines(" INFO ", "authz: denied"), 0, "{log}");
    assert_eq!(lines(" DEBUG ", "authz: denied GET /admin/x"), N);
    // AUDIT logs at info, capped at 50 lines a second per plugin; the rest
    // are counted, and nothing is lost between the two.
    let audited = lines(" INFO ", "authz: AUDIT audit-all");
    let dropped = sample(
        &m,
        "wasmesh_plugin_log_dropped_total",
        &[("service", "reviews"), ("plugin", "authz")],
    )
    .unwrap_or(0.0) as usize;
    assert_eq!(audited + dropped, N, "{audited} logged, {dropped} dropped");
    eprintln!("{N} requests in {elapsed:?}: {audited} AUDIT lines logged, {dropped} dropped");
    let windows = elapsed.as_secs() as usize + 2;
    assert!(
        audited <= 50 * windows,
        "{audited} info lines in {elapsed:?}"
    );
}

/// A real OTLP trace receiver: the collector's gRPC service (from
/// opentelemetry-proto), keeping every span it is sent.
mod otlp {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    pub use opentelemetry_proto::tonic::trace::v1::Span;
    use tokio::sync::Notify;

    #[derive(Clone, Default)]
    pub struct Receiver {
        pub spans: Arc<Mutex<Vec<Span>>>,
        arrived: Arc<Notify>,
    }

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.spans.lock().unwrap();
            for r in request.into_inner().resource_spans {
                for s in r.scope_spans {
                    spans.extend(s.spans);
                }
            }
            self.arrived.notify_waiters();
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    impl Receiver {
        /// Serve on a free port: the receiver and its URL.
        pub async fn start() -> (Receiver, String) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr: SocketAddr = listener.local_addr().unwrap();
            let me = Receiver::default();
            let service = TraceServiceServer::new(me.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (me, format!("http://{addr}"))
        }

        /// Wait (up to 10 s) until `done` holds for the spans received.
        pub async fn wait_for(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let arrived = self.arrived.notified();
                {
                    let spans = self.spans.lock().unwrap();
                    if done(&spans) {
                        return spans.clone();
                    }
                }
                if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                    let spans = self.spans.lock().unwrap();
                    panic!("spans never complete; got {} : {spans:#?}", spans.len());
                }
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &otlp::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const INTERNAL: i32 = 1;

/// A request to `reviews` through `proxy` carrying `traceparent`: the
/// answer, and the `traceparent` the app received.
async fn with_traceparent(proxy: &Proxy, path: &str, traceparent: &str) -> (Got, String) {
    let req = http::Request::get(format!("http://{}{path}", proxy.listen))
        .header("host", "reviews")
        .header("traceparent", traceparent)
        .body(Full::default())
        .unwrap();
    let r = send(http1(), req).await.unwrap();
    let seen = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (r, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_through_two_sidecars_is_one_trace_with_a_span_per_hook() {
    let (receiver, url) = otlp::Receiver::start().await;
    let app = Upstream::echo("app").await;
    let inbound = free_port();
    let logs = tempfile::tempdir().unwrap();
    let access = logs.path().join("front.log");
    let tracing = ["--otlp-endpoint", &url, "--trace-sampling", "1"];
    let back = Proxy::start_with(
        &format!(
            r#"inbound: 127.0.0.1:{inbound}
local-service: reviews
services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    inbound-plugins:
      # A source block makes authz read the request, so it is called (a
      # policy on methods alone is a table: no call, no hook span).
      - source: builtin:authz
        config: {{ action: ALLOW, rules: [{{ from: [{{ source: {{ ipBlocks: ["127.0.0.0/8"] }} }}], to: [{{ operation: {{ methods: [GET] }} }}] }}] }}
"#,
            app.addr
        ),
        &tracing,
    )
    .await;
    let front = Proxy::start_with(
        &format!(
            r#"services:
  reviews:
    endpoints: {{ v1: ["127.0.0.1:{inbound}"] }}
    plugins:
      - source: builtin:router
        config:
          http:
            # Sticky: the router reads the request, so it is called (a
            # table would be decided by the proxy, with no hook span).
            - route: [{{ destination: {{ subset: v1 }} }}]
              sticky: {{ header: end-user }}
"#
        ),
        &[&tracing[..], &["--access-log", access.to_str().unwrap()]].concat(),
    )
    .await;

    // A request with no trace context starts a trace.
    let r = via(&front, "reviews", "/one").await;
    assert_eq!(r.status, 200);
    let seen = r.json()["headers"]["traceparent"]
        .as_str()
        .expect("the app sees a traceparent")
        .to_string();
    let spans = receiver
        .wait_for(|s| {
            s.iter().filter(|x| x.kind == SERVER).count() == 2
                && s.iter().filter(|x| x.kind == CLIENT).count() == 2
        })
        .await;
    let trace = hex(&spans[0].trace_id);
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == trace),
        "{spans:#?}"
    );
    assert!(seen.contains(&trace), "{seen} is not of trace {trace}");
    let server = |listener: &str| {
        spans
            .iter()
            .find(|s| s.kind == SERVER && attr(s, "wasmesh.listener").as_deref() == Some(listener))
            .unwrap_or_else(|| panic!("no {listener} server span: {spans:#?}"))
    };
    let (front_server, back_server) = (server("outbound"), server("inbound"));
    let child_of = |parent: &otlp::Span, kind: i32| -> Vec<&otlp::Span> {
        spans
            .iter()
            .filter(|s| s.kind == kind && s.parent_span_id == parent.span_id)
            .collect()
    };
    assert!(front_server.parent_span_id.is_empty(), "a root span");
    let front_client = child_of(front_server, CLIENT);
    assert_eq!(front_client.len(), 1, "{spans:#?}");
    // The next sidecar's server span is the child of this one's client span.
    assert_eq!(back_server.parent_span_id, front_client[0].span_id);
    let back_client = child_of(back_server, CLIENT);
    assert_eq!(back_client.len(), 1, "{spans:#?}");
    // The app's traceparent names the back sidecar's client span.
    assert!(seen.contains(&hex(&back_client[0].span_id)), "{seen}");
    assert_eq!(
        attr(front_server, "http.response.status_code").as_deref(),
        Some("200")
    );
    // The access log line names the trace.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let line = loop {
        let text = std::fs::read_to_string(&access).unwrap_or_default();
        if let Some(l) = text.lines().next() {
            break serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no access log line");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(line["trace_id"], trace, "{line}");

    // One span per plugin hook call, under its proxy's server span, naming
    // the plugin, its version, the hook and the decision.
    let front_m = front.metrics().await;
    let back_m = back.metrics().await;
    let calls = |m: &str| {
        samples(m, "wasmesh_plugin_calls_total", &[])
            .iter()
            .sum::<f64>()
    };
    let hooks: Vec<&otlp::Span> = spans.iter().filter(|s| s.kind == INTERNAL).collect();
    assert_eq!(
        hooks.len() as f64,
        calls(&front_m) + calls(&back_m),
        "{hooks:#?}"
    );
    let router = child_of(front_server, INTERNAL);
    assert!(!router.is_empty());
    for h in &router {
        assert_eq!(attr(h, "wasmesh.plugin.name").as_deref(), Some("router"));
        assert!(attr(h, "wasmesh.plugin.version").is_some_and(|v| v.len() == 12));
    }
    let on_request = router
        .iter()
        .find(|h| attr(h, "wasmesh.plugin.hook").as_deref() == Some("on_request"))
        .unwrap();
    assert_eq!(
        attr(on_request, "wasmesh.plugin.decision").as_deref(),
        Some("route")
    );
    let authz = child_of(back_server, INTERNAL);
    assert!(
        authz.iter().any(
            |h| attr(h, "wasmesh.plugin.name").as_deref() == Some("authz")
                && attr(h, "wasmesh.plugin.decision").as_deref() == Some("proceed")
        ),
        "{authz:#?}"
    );

    // A request that arrives with W3C trace context keeps its trace id and
    // its sampling decision upstream.
    let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (r, tp) = with_traceparent(&front, "/w3c", &format!("00-{tid}-00f067aa0ba902b7-01")).await;
    assert_eq!(r.status, 200);
    assert!(
        tp.starts_with(&format!("00-{tid}-")) && tp.ends_with("-01"),
        "{tp}"
    );
    let spans = receiver
        .wait_for(|s| {
            s.iter()
                .any(|x| hex(&x.parent_span_id) == "00f067aa0ba902b7")
        })
        .await;
    let root = spans
        .iter()
        .find(|x| hex(&x.parent_span_id) == "00f067aa0ba902b7")
        .unwrap();
    assert_eq!(hex(&root.trace_id), tid);

    // One that arrives not sampled stays so: its trace id goes on with the
    // sampled flag off and this proxy's span id as the parent, and nothing
    // is recorded. (A sampled request after it is exported in a later
    // batch or the same one: once its spans are in, the unsampled one's
    // would be too.)
    let quiet = "0af7651916cd43dd8448eb211c80319c";
    let (r, tp) =
        with_traceparent(&front, "/quiet", &format!("00-{quiet}-b7ad6b7169203331-00")).await;
    assert!(
        tp.starts_with(&format!("00-{quiet}-")) && tp.ends_with("-00") && tp.len() == 55,
        "{tp}"
    );
    assert!(!tp.contains("b7ad6b7169203331"), "a new parent id: {tp}");
    assert!(
        r.json()["headers"]["tracestate"].is_null(),
        "no empty tracestate"
    );
    let marker = "11111111111111111111111111111111";
    let (r, _) = with_traceparent(
        &front,
        "/marker",
        &format!("00-{marker}-1111111111111111-01"),
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = receiver
        .wait_for(|s| {
            s.iter()
                .filter(|x| hex(&x.trace_id) == marker && x.kind == SERVER)
                .count()
                == 2
        })
        .await;
    assert!(
        spans.iter().all(|x| hex(&x.trace_id) != quiet),
        "an unsampled request was recorded"
    );

    // B3, single header and multi header, the same; the app gets it back in
    // the format it came in.
    let b3_tid = "80f198ee56343ba864fe8b2a57d3eff7";
    let req = http::Request::get(format!("http://{}/b3", front.listen))
        .header("host", "reviews")
        .header("b3", format!("{b3_tid}-e457b5a2e4d86bd1-1"))
        .body(Full::default())
        .unwrap();
    let h = send(http1(), req).await.unwrap().json()["headers"].clone();
    let b3 = h["b3"].as_str().unwrap_or_default();
    assert!(b3.starts_with(&format!("{b3_tid}-")), "{h}");
    assert!(
        !b3.contains("e457b5a2e4d86bd1"),
        "the parent is the proxy's span: {h}"
    );
    assert!(h["traceparent"].as_str().unwrap().contains(b3_tid), "{h}");
    let multi_tid = "463ac35c9f6413ad48485a3953bb6124";
    let req = http::Request::get(format!("http://{}/b3multi", front.listen))
        .header("host", "reviews")
        .header("x-b3-traceid", multi_tid)
        .header("x-b3-spanid", "a2fb4a1d1a96d312")
        .header("x-b3-sampled", "1")
        .body(Full::default())
        .unwrap();
    let h = send(http1(), req).await.unwrap().json()["headers"].clone();
    assert_eq!(h["x-b3-traceid"].as_str(), Some(multi_tid), "{h}");
    assert_ne!(h["x-b3-spanid"].as_str(), Some("a2fb4a1d1a96d312"), "{h}");
    receiver
        .wait_for(|s| {
            [b3_tid, multi_tid]
                .iter()
                .all(|t| s.iter().filter(|x| hex(&x.trace_id) == *t).count() >= 4)
        })
        .await;
    let m = front.metrics().await;
    assert!(sample(&m, "wasmesh_trace_spans_exported_total", &[]).unwrap() >= 4.0);
    assert_eq!(
        sample(&m, "wasmesh_trace_spans_dropped_total", &[]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_collector_costs_dropped_spans_never_requests() {
    let app = Upstream::echo("app").await;
    // Nothing listens there.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = Proxy::start_with(
        &format!(
            "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
            app.addr
        ),
        &["--otlp-endpoint", &dead, "--trace-sampling", "1"],
    )
    .await;
    for i in 0..50 {
        let r = via(&proxy, "reviews", &format!("/{i}")).await;
        assert_eq!(r.status, 200);
        assert!(r.json()["headers"]["traceparent"].is_string());
    }
    // Each request made a server and a client span; the batches that could
    // not be exported are counted as dropped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = proxy.metrics().await;
        let dropped = sample(&m, "wasmesh_trace_spans_dropped_total", &[]).unwrap();
        if dropped >= 1.0 {
            assert_eq!(
                sample(&m, "wasmesh_trace_spans_exported_total", &[]),
                Some(0.0)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drop counted:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(via(&proxy, "reviews", "/after").await.status, 200);
}

/// A sidecar of `service`'s `subset` with a mesh identity, its inbound
/// listener on a fresh port in front of `app` (if any).
async fn mesh_sidecar(
    control: &Control,
    service: &str,
    subset: &str,
    app: Option<std::net::SocketAddr>,
) -> (Proxy, std::net::SocketAddr) {
    let token = control.token(service, &[]);
    let inbound: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec!["--inbound".to_string(), inbound.to_string()];
    if let Some(a) = app {
        args.extend(["--app".to_string(), a.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start_mesh_as(control, service, subset, &token, &args).await;
    (proxy, inbound)
}

#[tokio::test(flavor = "multi_thread")]
async fn top_shows_who_calls_whom_with_the_split_by_subset() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    control.apply(
        r#"services:
  productpage: {}
  reviews:
    mtls: { mode: PERMISSIVE }
    plugins:
      - source: builtin:router
        config:
          http:
            - match: [{ headers: { end-user: { exact: jason } } }]
              route: [{ destination: { subset: v2 } }]
            - route: [{ destination: { subset: v1 } }]
"#,
    );
    let v1 = Upstream::answering("v1", 200).await;
    let v2 = Upstream::answering("v2", 503).await;
    let (_r1, r1_inbound) = mesh_sidecar(&control, "reviews", "v1", Some(v1.addr)).await;
    let (_r2, _) = mesh_sidecar(&control, "reviews", "v2", Some(v2.addr)).await;
    let (page, _) = mesh_sidecar(&control, "productpage", "v1", None).await;
    control.wait_proxies(3).await;
    control.wait_rollout();

    // productpage → reviews over mTLS: 6 to v1 (200), 2 as jason to v2
    // (503).
    for _ in 0..6 {
        let r = via(&page, "reviews", "/r").await;
        assert_eq!(r.status, 200, "{}\n{}", r.body_text(), page.log_text());
    }
    for _ in 0..2 {
        let req = http::Request::get(format!("http://{}/r", page.listen))
            .header("host", "reviews")
            .header("end-user", "jason")
            .body(Full::default())
            .unwrap();
        assert_eq!(send(http1(), req).await.unwrap().status, 503);
    }
    // A caller outside the mesh, in plaintext to reviews v1's sidecar: 3.
    for _ in 0..3 {
        let r = get(&format!("http://{r1_inbound}/outside")).await.unwrap();
        assert_eq!(r.status, 200);
    }

    // The proxies report every 2 s: wait for both edges to add up, the
    // first as its caller's sidecar counts it (until productpage's report
    // arrives, the reviews sidecars' count of the same 8 stands in).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let edge = |top: &serde_json::Value, source: &str, destination: &str| {
        top["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["source"] == source && e["destination"] == destination)
            .cloned()
    };
    let top = loop {
        let (code, out, err) = control.cli(&["top", "-o", "json", "--window", "60s"]);
        assert_eq!(code, 0, "{err}");
        let top: serde_json::Value = serde_json::from_str(&out).unwrap();
        let requests = |s, d| edge(&top, s, d).map(|e| e["requests"].clone());
        let reporter = edge(&top, "productpage", "reviews").map(|e| e["reporter"].clone());
        if requests("productpage", "reviews") == Some(8.into())
            && reporter == Some("source".into())
            && requests("unknown", "reviews") == Some(3.into())
        {
            break top;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edges never added up:\n{top:#}\n{}",
            control.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(top["window_s"], 60.0);
    assert_eq!(top["edges"].as_array().unwrap().len(), 2, "{top:#}");

    // Counted once, by the caller's sidecar (reviews' sidecars saw the
    // same 8), split by the subset that answered.
    let e = edge(&top, "productpage", "reviews").unwrap();
    assert_eq!(e["reporter"], "source", "{e:#}");
    assert_eq!(e["errors"], 2, "{e:#}");
    let w = &e["window"];
    assert_eq!(
        (w["requests"].clone(), w["errors"].clone()),
        (8.into(), 2.into())
    );
    assert_eq!(w["error_ratio"], 0.25);
    assert!(w["rps"].as_f64().unwrap() > 0.0, "{e:#}");
    let (p50, p99) = (w["p50_ms"].as_f64().unwrap(), w["p99_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 < 10_000.0, "{e:#}");
    let subsets = e["subsets"].as_array().unwrap();
    assert_eq!(subsets.len(), 2, "{e:#}");
    let (s1, s2) = (&subsets[0], &subsets[1]);
    assert_eq!(
        (
            s1["subset"].clone(),
            s1["requests"].clone(),
            s1["errors"].clone(),
            s1["share"].clone()
        ),
        ("v1".into(), 6.into(), 0.into(), 0.75.into())
    );
    assert_eq!(
        (
            s2["subset"].clone(),
            s2["requests"].clone(),
            s2["errors"].clone(),
            s2["share"].clone()
        ),
        ("v2".into(), 2.into(), 2.into(), 0.25.into())
    );
    assert_eq!(s2["window"]["error_ratio"], 1.0);

    // No caller's sidecar counts the outside caller: the callee's does.
    let outside = edge(&top, "unknown", "reviews").unwrap();
    assert_eq!(outside["reporter"], "destination", "{outside:#}");
    assert_eq!(outside["errors"], 0);
    assert_eq!(outside["subsets"][0]["subset"], "v1");

    // The table, once.
    let (code, out, err) = control.cli(&["top", "--once"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("productpage  reviews")
            && l.contains("25.0%")
            && l.ends_with(" 8")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().take(2).eq(["v2", "25.0%"])),
        "{out}"
    );
    // A window past what control keeps is refused, naming the flag.
    let (code, _, err) = control.cli(&["top", "--window", "5m"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--window") && err.contains("60s"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_bounds_the_queue_and_every_span_is_counted() {
    // Accepts connections and never answers: every export hangs until its
    // timeout.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let app = Upstream::echo("app").await;
    let proxy = Proxy::start_with(
        &format!(
            "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
            app.addr
        ),
        &["--otlp-endpoint", &collector, "--trace-sampling", "1"],
    )
    .await;
    // 3,000 requests, each a server and a client span: 6,000 spans, past
    // the 4,096 the proxy holds for export.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let listen = proxy.listen;
        tasks.push(tokio::spawn(async move {
            for i in (w..3000).step_by(4) {
                let req = http::Request::get(format!("http://{listen}/{i}"))
                    .header("host", "reviews")
                    .body(Full::default())
                    .unwrap();
                assert_eq!(send(http1(), req).await.unwrap().status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every span is exported, dropped or still held — and at most 4,096
    // are held, so at least 1,904 were dropped, each counted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m = proxy.metrics().await;
        let get = |name: &str| sample(&m, name, &[]).unwrap();
        let (exported, dropped, queued) = (
            get("wasmesh_trace_spans_exported_total"),
            get("wasmesh_trace_spans_dropped_total"),
            get("wasmesh_trace_spans_queued"),
        );
        assert!(queued <= 4096.0, "{queued} held:\n{m}");
        assert_eq!(exported, 0.0);
        if exported + dropped + queued == 6000.0 {
            assert!(dropped >= 1904.0, "{dropped}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "spans unaccounted for: {exported} + {dropped} + {queued} != 6000\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_is_written_out_at_shutdown() {
    let app = Upstream::echo("app").await;
    let logs = tempfile::tempdir().unwrap();
    let access = logs.path().join("access.log");
    let mut proxy = Proxy::start_with(
        &format!(
            "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
            app.addr
        ),
        &["--access-log", access.to_str().unwrap()],
    )
    .await;
    for i in 0..5 {
        assert_eq!(via(&proxy, "reviews", &format!("/{i}")).await.status, 200);
    }
    // Straight to shutdown: what the writer had not written yet is written
    // before the proxy exits.
    proxy.sigterm();
    assert!(proxy.wait_exit().success());
    let text = std::fs::read_to_string(&access).unwrap();
    let paths: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
        .collect();
    assert_eq!(
        paths,
        ["\"/0\"", "\"/1\"", "\"/2\"", "\"/3\"", "\"/4\""],
        "{text}"
    );
}
