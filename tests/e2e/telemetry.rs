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
    let proxy = Proxy::start(&format!(
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
            - route: [{{ destination: {{ subset: v1 }} }}]
"#,
        v1.addr, v2.addr
    ))
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
