//! The stock plugins end to end, judged statistically (≥ 2,000 requests where
//! a ratio is judged).

use std::collections::HashMap;

use crate::support::*;

/// Send `n` requests (4 at a time) and count responses by `x-upstream`.
async fn split(
    proxy: &Proxy,
    n: usize,
    header: Option<(&'static str, String)>,
) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for w in 0..4 {
        let listen = proxy.listen;
        let header = header.clone();
        tasks.push(tokio::spawn(async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in (w..n).step_by(4) {
                let mut req = http::Request::get(format!("http://{listen}/reviews/1"))
                    .header("host", "reviews");
                if let Some((k, v)) = &header {
                    req = req.header(*k, v.as_str());
                }
                let r = send(http1(), req.body(http_body_util::Full::default()).unwrap())
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{:?}", r.body);
                *counts
                    .entry(r.header("x-upstream").unwrap().to_string())
                    .or_default() += 1;
            }
            counts
        }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

fn share(counts: &HashMap<String, usize>, key: &str) -> f64 {
    let n: usize = counts.values().sum();
    *counts.get(key).unwrap_or(&0) as f64 / n as f64
}

fn reviews(v1: &Upstream, v2: &Upstream, http: &str) -> String {
    format!(
        r#"services:
  reviews:
    endpoints:
      v1: ["{}"]
      v2: ["{}"]
    plugins:
      - source: builtin:router
        config:
          http:
{http}"#,
        v1.addr, v2.addr
    )
}

fn weights(v1: u32, v2: u32) -> String {
    format!(
        "            - route:\n                - {{ destination: {{ subset: v1 }}, weight: {v1} }}\n                - {{ destination: {{ subset: v2 }}, weight: {v2} }}\n"
    )
}

/// 2,000 requests split 90/10 between v1 and v2 (±3 points), and `jason`
/// more with `end-user: jason` all on v2.
async fn split_90_10_and_jason_on_v2(proxy: &Proxy, jason: usize) {
    let counts = split(proxy, 2000, None).await;
    let s = share(&counts, "v2");
    assert!(
        (0.07..=0.13).contains(&s),
        "90/10 split gave v2 {s:.3} ({counts:?}); tolerance ±3 points"
    );
    let counts = split(proxy, jason, Some(("end-user", "jason".into()))).await;
    assert_eq!(share(&counts, "v2"), 1.0, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn router_splits_matches_and_sticks_as_configured() {
    let (v1, v2) = (Upstream::echo("v1").await, Upstream::echo("v2").await);
    let http = format!(
        "            - match: [{{ headers: {{ end-user: {{ exact: jason }} }} }}]\n              route: [{{ destination: {{ subset: v2 }} }}]\n            - sticky: {{ header: x-user }}\n              match: [{{ headers: {{ x-user: {{}} }} }}]\n              route:\n                - {{ destination: {{ subset: v1 }}, weight: 50 }}\n                - {{ destination: {{ subset: v2 }}, weight: 50 }}\n{}",
        weights(90, 10)
    );
    let proxy = Proxy::start(&reviews(&v1, &v2, &http)).await;

    split_90_10_and_jason_on_v2(&proxy, 2000).await;

    // Sticky: every user stays on one subset across repeated requests.
    let mut placed: HashMap<usize, String> = HashMap::new();
    for round in 0..4 {
        for user in 0..100 {
            let req = http::Request::get(format!("http://{}/", proxy.listen))
                .header("host", "reviews")
                .header("x-user", format!("user-{user}"))
                .body(http_body_util::Full::default())
                .unwrap();
            let r = send(http1(), req).await.unwrap();
            let got = r.header("x-upstream").unwrap().to_string();
            let first = placed.entry(user).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "user-{user} moved in round {round}");
        }
    }
    let on_v2 = placed.values().filter(|v| *v == "v2").count();
    assert!(
        (25..=75).contains(&on_v2),
        "users spread over both subsets: {on_v2}/100 on v2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_router_whose_routes_are_a_table_routes_without_being_called() {
    // Header match, a direct response and a weighted split read nothing of
    // the request but their match: the router gives them as its
    // `on-request-table` and the proxy decides for it.
    let (v1, v2) = (Upstream::echo("v1").await, Upstream::echo("v2").await);
    let http = format!(
        "            - match: [{{ headers: {{ end-user: {{ exact: jason }} }} }}]\n              route: [{{ destination: {{ subset: v2 }} }}]\n              headers: {{ response: {{ set: {{ x-route: jason }} }} }}\n            - match: [{{ uri: {{ exact: /gone }} }}]\n              directResponse: {{ status: 410, body: {{ string: \"gone for good\" }} }}\n            - match: [{{ uri: {{ prefix: /reviews }} }}]\n{}",
        weights(90, 10).replacen("            - route:", "              route:", 1)
    );
    let proxy = Proxy::start(&reviews(&v1, &v2, &http)).await;

    split_90_10_and_jason_on_v2(&proxy, 400).await;
    let r = via(&proxy, "reviews", "/gone").await;
    assert_eq!(
        (r.status, &r.body[..], r.header("x-wasmesh-flags")),
        (410, &b"gone for good"[..], Some("LR"))
    );
    // No route matched: the router's own 404.
    let r = via(&proxy, "reviews", "/elsewhere").await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(r.body.starts_with(b"no route"), "{:?}", r.body);
    assert_eq!(v1.hits() + v2.hits(), 2400);

    // The router was never called for a request, and says so.
    let m = proxy.metrics().await;
    let labels = [("plugin", "router"), ("hook", "on_request")];
    assert_eq!(
        sample(&m, "wasmesh_plugin_calls_total", &labels).unwrap_or(0.0),
        0.0,
        "{m}"
    );
    let cfg = proxy.service_config("reviews").await.unwrap();
    let table = &cfg["plugins"][0]["on_request_table"];
    assert_eq!(table["rules"].as_array().map(Vec::len), Some(3), "{cfg}");
    assert_eq!(
        table["rules"][0]["when"],
        serde_json::json!([{"headers": {"end-user": {"exact": "jason"}}}]),
        "{cfg}"
    );
    assert_eq!(
        table["rules"][2]["decisions"],
        serde_json::json!([
            {"weight": 90, "decision": {"route": {"service": null, "subset": "v1"}}},
            {"weight": 10, "decision": {"route": {"service": null, "subset": "v2"}}},
        ]),
        "{cfg}"
    );
    assert_eq!(
        table["otherwise"],
        serde_json::json!({"reply": 404}),
        "{cfg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_rolls_forward_and_back_by_reapplying_config() {
    let (v1, v2) = (Upstream::echo("v1").await, Upstream::echo("v2").await);
    let proxy = Proxy::start_with(&reviews(&v1, &v2, &weights(100, 0)), &["--watch"]).await;
    let steps = [(100, 0), (90, 10), (70, 30), (0, 100), (100, 0)];
    let mut version = 1;
    for (i, (w1, w2)) in steps.into_iter().enumerate() {
        if i > 0 {
            proxy.rewrite(&reviews(&v1, &v2, &weights(w1, w2)));
            version += 1;
            proxy.wait_version(version).await;
        }
        let counts = split(&proxy, 2000, None).await;
        let got = share(&counts, "v2");
        let want = f64::from(w2) / 100.0;
        println!(
            "canary step {i}: v1 {w1}% / v2 {w2}% -> measured v2 {:.1}%",
            got * 100.0
        );
        assert!(
            (got - want).abs() <= 0.03,
            "step {i}: want v2 {want}, measured {got:.3} ({counts:?})\n{}",
            proxy.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_injection_aborts_and_delays_the_configured_share() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{a}"] }}
    plugins:
      - source: builtin:fault-injection
        config:
          abort: {{ httpStatus: 503, percentage: {{ value: 50 }} }}
  ratings:
    endpoints: {{ v1: ["{a}"] }}
    plugins:
      - source: builtin:fault-injection
        config:
          match: [{{ headers: {{ end-user: {{ exact: jason }} }} }}]
          delay: {{ fixedDelay: 200ms, percentage: {{ value: 100 }} }}
"#,
        a = up.addr
    ))
    .await;

    let n = 2000;
    let mut aborted = 0;
    for _ in 0..n {
        let r = via(&proxy, "reviews", "/").await;
        match r.status {
            503 => {
                assert_eq!(r.header("x-wasmesh-flags"), Some("LR"));
                aborted += 1;
            }
            200 => {}
            s => panic!("unexpected {s}"),
        }
    }
    let share = f64::from(aborted) / f64::from(n);
    assert!(
        (0.46..=0.54).contains(&share),
        "abort 50% gave {share:.3}; tolerance ±4 points"
    );

    let mut took = Vec::new();
    for _ in 0..21 {
        let req = http::Request::get(format!("http://{}/", proxy.listen))
            .header("host", "ratings")
            .header("end-user", "jason")
            .body(http_body_util::Full::default())
            .unwrap();
        let t = std::time::Instant::now();
        assert_eq!(send(http1(), req).await.unwrap().status, 200);
        took.push(t.elapsed());
    }
    took.sort();
    assert!(
        took[10] >= std::time::Duration::from_millis(200),
        "p50 {:?}",
        took[10]
    );
    // Another user is not delayed.
    let t = std::time::Instant::now();
    assert_eq!(via(&proxy, "ratings", "/").await.status, 200);
    assert!(t.elapsed() < std::time::Duration::from_millis(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_its_configuration_does_not_need_is_never_called() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{a}"] }}
    plugins:
      - source: builtin:fault-injection
        config: {{ abort: {{ httpStatus: 503, percentage: {{ value: 0 }} }} }}
      - source: builtin:retry
        config: {{ attempts: 2, retryOn: 5xx }}
      - source: builtin:circuit-breaker
        config: {{ connectionPool: {{ http: {{ http1MaxPendingRequests: 100 }} }} }}
  ratings:
    endpoints: {{ v1: ["{a}"] }}
    plugins:
      - source: builtin:fault-injection
        config: {{ abort: {{ httpStatus: 503, percentage: {{ value: 100 }} }} }}
"#,
        a = up.addr
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(via(&proxy, "reviews", "/").await.status, 200);
        assert_eq!(via(&proxy, "ratings", "/").await.status, 503);
    }
    let m = proxy
        .metrics_containing(r#"wasmesh_requests_total{destination_service="ratings",response_code="503",response_flags="LR"} 10"#)
        .await;
    let calls = |service: &str, plugin: &str, hook: &str| {
        let labels = [("service", service), ("plugin", plugin), ("hook", hook)];
        sample(&m, "wasmesh_plugin_calls_total", &labels).unwrap_or(0.0)
    };
    // A fault at 0% is never called; at 100% on every request.
    assert_eq!(
        calls("reviews", "fault-injection", "on_request"),
        0.0,
        "{m}"
    );
    assert_eq!(
        calls("ratings", "fault-injection", "on_request"),
        10.0,
        "{m}"
    );
    // Retry without a per-try timeout or budget: only its on-response,
    // and that only for the failures it retries (none here).
    assert_eq!(calls("reviews", "retry", "on_request"), 0.0, "{m}");
    assert_eq!(calls("reviews", "retry", "on_response"), 0.0, "{m}");
    // A breaker with a pending limit and no outlier detection: the host
    // holds the in-flight count (`on-request-fixed`); the plugin would be
    // called only for a request finding the cap (100) full.
    assert_eq!(
        calls("reviews", "circuit-breaker", "on_request"),
        0.0,
        "{m}"
    );
    assert_eq!(
        calls("reviews", "circuit-breaker", "on_response"),
        0.0,
        "{m}"
    );
    // /config shows the hooks the chain calls.
    let reviews = proxy.service_config("reviews").await.unwrap();
    let hooks = |i: usize| reviews["plugins"][i]["hooks"].clone();
    assert_eq!(
        hooks(0),
        serde_json::json!({"on_request": false, "on_response": false, "on_complete": false})
    );
    assert_eq!(
        hooks(1),
        serde_json::json!({"on_request": false, "on_response": true, "on_complete": false})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_with_a_match_runs_only_for_the_requests_it_matches() {
    let up = Upstream::echo("v1").await;
    // add-header marks /beta requests; the fault entry matches /api/…,
    // user jason, or what add-header marked (the request as the plugins
    // before the entry left it).
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{a}"] }}
    plugins:
      - source: builtin:add-header
        match: [{{ uri: {{ prefix: /beta }} }}]
        config: {{ request: {{ x-canary: "1" }} }}
      - source: builtin:fault-injection
        match:
          - uri: {{ prefix: /api/ }}
          - headers: {{ end-user: {{ exact: jason }} }}
          - headers: {{ x-canary: {{ exact: "1" }} }}
        config: {{ abort: {{ httpStatus: 503, percentage: {{ value: 100 }} }} }}
"#,
        a = up.addr
    ))
    .await;
    let get = |path: &'static str, user: Option<&'static str>| {
        let proxy = &proxy;
        async move {
            let mut req = http::Request::get(format!("http://{}{path}", proxy.listen))
                .header("host", "reviews");
            if let Some(u) = user {
                req = req.header("end-user", u);
            }
            send(http1(), req.body(http_body_util::Full::default()).unwrap())
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(get("/api/ratings", None).await, 503);
    assert_eq!(get("/reviews/1", Some("jason")).await, 503);
    assert_eq!(get("/beta/x", None).await, 503);
    assert_eq!(get("/reviews/1", None).await, 200);
    assert_eq!(get("/apix", None).await, 200);
    assert_eq!(get("/reviews/1", Some("mary")).await, 200);
    let m = proxy
        .metrics_containing(r#"wasmesh_requests_total{destination_service="reviews",response_code="200",response_flags="-"} 3"#)
        .await;
    let calls = |plugin: &str| {
        let labels = [("plugin", plugin), ("hook", "on_request")];
        sample(&m, "wasmesh_plugin_calls_total", &labels).unwrap_or(0.0)
    };
    // Called only for the requests in scope.
    assert_eq!(calls("add-header"), 1.0, "{m}");
    assert_eq!(calls("fault-injection"), 3.0, "{m}");
    let cfg = proxy.config().await;
    assert_eq!(
        cfg["services"][0]["plugins"][0]["match"],
        serde_json::json!([{"uri": {"prefix": "/beta"}}]),
        "{cfg}"
    );
    assert!(
        cfg["services"][0]["plugins"][1]["match"].is_array(),
        "{cfg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_response_runs_only_for_the_outcomes_a_plugin_asked_for() {
    // Every other answer is 503; consecutive runs of errors never reach 2.
    let flaky = Upstream::flaky().await;
    let steady = Upstream::answering("steady", 200).await;
    let breaker = "{ outlierDetection: { consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 100 } }";
    let proxy = Proxy::start(&format!(
        r#"services:
  flaky:
    endpoints: {{ v1: ["{f}"] }}
    plugins:
      - source: builtin:circuit-breaker
        config: {breaker}
  steady:
    endpoints: {{ v1: ["{s}"] }}
    plugins:
      - source: builtin:retry
        config: {{ attempts: 2, retryOn: 5xx }}
      - source: builtin:circuit-breaker
        config: {breaker}
"#,
        f = flaky.addr,
        s = steady.addr
    ))
    .await;
    let mut codes = Vec::new();
    for _ in 0..20 {
        codes.push(via(&proxy, "flaky", "/").await.status);
        assert_eq!(via(&proxy, "steady", "/").await.status, 200);
    }
    // 503, 200, 503, ...: each success ends a run of one error, so the
    // endpoint, the only one, is never ejected (which would answer 503 UH).
    assert_eq!(codes, [503, 200].repeat(10));
    let m = proxy
        .metrics_containing(
            r#"wasmesh_requests_total{destination_service="steady",response_code="200",response_flags="-"} 20"#,
        )
        .await;
    let calls = |service: &str, plugin: &str| {
        let labels = [
            ("service", service),
            ("plugin", plugin),
            ("hook", "on_response"),
        ];
        sample(&m, "wasmesh_plugin_calls_total", &labels).unwrap_or(0.0)
    };
    // The breaker sees every error and the success after each: all 20.
    assert_eq!(calls("flaky", "circuit-breaker"), 20.0, "{m}");
    // On a steady endpoint only its first outcome (one it had not been
    // told of); retry none (it retries only failures).
    assert_eq!(calls("steady", "circuit-breaker"), 1.0, "{m}");
    assert_eq!(calls("steady", "retry"), 0.0, "{m}");
    assert!(!m.contains(r#"name="ejections""#), "{m}");
    let steady = proxy.service_config("steady").await.unwrap();
    assert_eq!(
        steady["plugins"][0]["on_response_for"],
        serde_json::json!(["5xx", "connect-failure", "reset", "timeout", "overflow"])
    );
    assert_eq!(
        steady["plugins"][1]["on_response_for"],
        serde_json::json!([
            "5xx",
            "connect-failure",
            "reset",
            "timeout",
            "next-on-endpoint"
        ])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_recovers_half_failing_upstreams_but_not_posts() {
    let up = Upstream::flaky().await;
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: builtin:retry
        config: {{ attempts: 3, perTryTimeout: 2s, retryOn: "5xx", backoff: {{ baseInterval: 1ms }} }}
"#,
        up.addr
    ))
    .await;
    let n = 2000;
    let mut ok = 0;
    for _ in 0..n {
        if via(&proxy, "reviews", "/").await.status == 200 {
            ok += 1;
        }
    }
    let success = f64::from(ok) / f64::from(n);
    assert!(success >= 0.99, "success {success:.4} with attempts=3");

    let mut post_ok = 0;
    for _ in 0..200 {
        let req = http::Request::post(format!("http://{}/", proxy.listen))
            .header("host", "reviews")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        if send(http1(), req).await.unwrap().status == 200 {
            post_ok += 1;
        }
    }
    assert!(
        (60..=140).contains(&post_ok),
        "POST is not retried: {post_ok}/200 succeeded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_budget_caps_the_load_on_a_failing_upstream() {
    let failing = Upstream::start(std::sync::Arc::new(|_req| {
        http::Response::builder()
            .status(503)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"down\n",
            )))
            .unwrap()
    }))
    .await;
    let run = |budget: &'static str| {
        let addr = failing.addr;
        async move {
            let proxy = Proxy::start(&format!(
                r#"services:
  reviews:
    endpoints: {{ v1: ["{addr}"] }}
    plugins:
      - source: builtin:retry
        config: {{ attempts: 3, retryOn: "5xx", backoff: {{ baseInterval: 2ms }} {budget} }}
"#
            ))
            .await;
            let clients = 8 * 50;
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let listen = proxy.listen;
                tasks.push(tokio::spawn(async move {
                    for _ in 0..50 {
                        let req = http::Request::get(format!("http://{listen}/"))
                            .header("host", "reviews")
                            .body(http_body_util::Full::default())
                            .unwrap();
                        assert_eq!(send(http1(), req).await.unwrap().status, 503);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            clients
        }
    };
    let before = failing.hits();
    let clients = run("").await;
    let unbudgeted = (failing.hits() - before) as f64 / clients as f64;
    let before = failing.hits();
    let clients = run(", retryBudget: { percent: 20, minRetryConcurrency: 1 }").await;
    let budgeted = (failing.hits() - before) as f64 / clients as f64;
    println!("retry budget: upstream load {unbudgeted:.2}x without, {budgeted:.2}x with");
    assert!(
        unbudgeted > 3.9,
        "without a budget every request tries 4 times: {unbudgeted:.2}"
    );
    assert!(
        budgeted < 1.6,
        "the budget caps retries: upstream saw {budgeted:.2}x the client load"
    );
}

fn breaker_mesh(endpoints: &[&Upstream], config: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [{}] }}\n    plugins:\n      - source: builtin:circuit-breaker\n        config: {config}\n",
        eps.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_ejects_a_failing_endpoint_and_lets_it_back() {
    let (a, b, bad) = (
        Upstream::answering("a", 200).await,
        Upstream::answering("b", 200).await,
        Upstream::answering("bad", 500).await,
    );
    let proxy = Proxy::start(&breaker_mesh(
        &[&a, &b, &bad],
        "{ outlierDetection: { consecutive5xxErrors: 3, baseEjectionTime: 3s, maxEjectionPercent: 100 } }",
    ))
    .await;
    let mut failures = 0;
    for _ in 0..30 {
        if via(&proxy, "reviews", "/").await.status != 200 {
            failures += 1;
        }
    }
    let ejected = std::time::Instant::now();
    assert_eq!(
        failures, 3,
        "ejected after exactly the configured consecutive errors"
    );
    // While it is ejected (judged well inside the 3 s, however slow this
    // machine is today), every request succeeds.
    let (mut sent, mut ok) = (0, 0);
    while sent < 1000 && ejected.elapsed() < std::time::Duration::from_millis(1500) {
        sent += 1;
        if via(&proxy, "reviews", "/").await.status == 200 {
            ok += 1;
        }
    }
    assert!(sent > 0 && ok == sent, "success while ejected: {ok}/{sent}");
    tokio::time::sleep(std::time::Duration::from_millis(3300).saturating_sub(ejected.elapsed()))
        .await;
    let mut back = false;
    for _ in 0..10 {
        if via(&proxy, "reviews", "/").await.header("x-upstream") == Some("bad") {
            back = true;
        }
    }
    assert!(back, "the endpoint is back after its ejection time");
    // Round robin gave it 3 or 4 of those 10 requests: ejected a second time.
    proxy.metrics_containing(r#"wasmesh_plugin_custom_total{service="reviews",plugin="circuit-breaker",name="ejections"} 2"#).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_ejection_percent_keeps_endpoints_in_the_pool() {
    let (good, bad1, bad2) = (
        Upstream::answering("good", 200).await,
        Upstream::answering("bad1", 500).await,
        Upstream::answering("bad2", 500).await,
    );
    let proxy = Proxy::start(&breaker_mesh(
        &[&good, &bad1, &bad2],
        "{ outlierDetection: { consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 34 } }",
    ))
    .await;
    for _ in 0..30 {
        via(&proxy, "reviews", "/").await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..60 {
        seen.insert(
            via(&proxy, "reviews", "/")
                .await
                .header("x-upstream")
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        seen.len(),
        2,
        "one bad endpoint ejected, the other kept by maxEjectionPercent: {seen:?}"
    );
    assert!(seen.contains("good"));
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_request_overflow_is_answered_at_once() {
    // An upstream that answers after 2 s.
    let addr = raw_upstream(|mut s| async move {
        use tokio::io::AsyncWriteExt;
        if read_head(&mut s).await.is_some() {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                .await;
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{addr}\"] }}\n    plugins:\n      - source: builtin:circuit-breaker\n        config: {{ connectionPool: {{ http: {{ http1MaxPendingRequests: 2 }} }} }}\n"
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let listen = proxy.listen;
        tasks.push(tokio::spawn(async move {
            let t = std::time::Instant::now();
            let req = http::Request::get(format!("http://{listen}/"))
                .header("host", "reviews")
                .body(http_body_util::Full::default())
                .unwrap();
            let r = send(http1(), req).await.unwrap();
            (
                r.status,
                r.header("x-wasmesh-flags").map(str::to_string),
                t.elapsed(),
            )
        }));
    }
    let mut ok = 0;
    let mut overflow = 0;
    for t in tasks {
        let (status, flag, took) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(flag.as_deref(), Some("UO"));
                // The upstream takes 2 s; an overflow does not wait for a slot.
                assert!(
                    took < std::time::Duration::from_secs(1),
                    "overflow took {took:?}"
                );
                overflow += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, overflow), (2, 8));
    let m = proxy.metrics_containing(r#"wasmesh_requests_total{destination_service="reviews",response_code="503",response_flags="UO"} 8"#).await;
    // The host held the count for the two that fit (the breaker's
    // `on-request-fixed`); the plugin was called for the 8 that found the
    // cap full, and refused and counted each.
    let labels = [("plugin", "circuit-breaker"), ("hook", "on_request")];
    assert_eq!(
        sample(&m, "wasmesh_plugin_calls_total", &labels),
        Some(8.0),
        "{m}"
    );
    let overflows = [("plugin", "circuit-breaker"), ("name", "overflow")];
    assert_eq!(
        sample(&m, "wasmesh_plugin_custom_total", &overflows),
        Some(8.0),
        "{m}"
    );
    let cfg = proxy.config().await;
    assert_eq!(
        cfg["services"][0]["plugins"][0]["on_request_fixed"],
        serde_json::json!({"decision": "proceed", "hold": {"key": "in-flight", "limit": 2}}),
        "{cfg}"
    );
    // Every one of the 10 requests released its in-flight count when it
    // ended (the host undoes the plugin's holds): 2 more fit at once.
    let (a, b) = tokio::join!(via(&proxy, "reviews", "/"), via(&proxy, "reviews", "/"));
    for r in [a, b] {
        assert_eq!(r.status, 200, "{:?}", r.header("x-wasmesh-flags"));
    }
}

/// A sidecar for `reviews` whose inbound listener (on a free port) runs
/// `builtin:authz` with these `policies` (YAML list items, indented for
/// the config) in front of `up`; and the inbound port.
async fn inbound_authz(up: &Upstream, policies: &str) -> (Proxy, u16) {
    let inbound = free_port();
    let proxy = Proxy::start(&format!(
        "inbound: 127.0.0.1:{inbound}\nlocal-service: reviews\nservices:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    inbound-plugins:\n      - source: builtin:authz\n        config:\n          policies:\n{policies}",
        up.addr
    ))
    .await;
    (proxy, inbound)
}

/// `method path` to the inbound listener on `port`, with `x-token` when
/// given.
async fn call_inbound(port: u16, method: &str, path: &str, token: Option<&str>) -> Got {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("host", "reviews");
    if let Some(t) = token {
        req = req.header("x-token", t);
    }
    send(http1(), req.body(http_body_util::Full::default()).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn authz_on_the_inbound_side_allows_denies_and_dry_runs_as_istio() {
    let up = Upstream::echo("local").await;
    let (proxy, inbound) = inbound_authz(
        &up,
        r#"            - name: deny-admin
              action: DENY
              rules: [{ to: [{ operation: { paths: ["/admin*"] } }] }]
            - name: would-deny-debug
              action: DENY
              dryRun: true
              rules: [{ to: [{ operation: { paths: ["/debug"] } }] }]
            - name: allow-app
              action: ALLOW
              rules:
                - to: [{ operation: { methods: ["GET"], paths: ["/app/*", "/debug"] } }]
                - when: [{ key: "request.headers[x-token]", values: ["let-me-in"] }]
                - from: [{ source: { ipBlocks: ["127.0.0.0/8"] } }]
                  to: [{ operation: { paths: ["/local-only"] } }]
"#,
    )
    .await;
    let call = |method, path, token| call_inbound(inbound, method, path, token);
    assert_eq!(
        call("GET", "/app/page", None).await.status,
        200,
        "path + method"
    );
    assert_eq!(
        call("POST", "/app/page", None).await.status,
        403,
        "method not allowed"
    );
    assert_eq!(
        call("POST", "/other", Some("let-me-in")).await.status,
        200,
        "header condition"
    );
    assert_eq!(
        call("GET", "/local-only", None).await.status,
        200,
        "ipBlocks"
    );
    let r = call("GET", "/other", None).await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (403, Some("LR")));
    assert_eq!(String::from_utf8_lossy(&r.body), "RBAC: access denied\n");
    assert_eq!(
        call("GET", "/admin/x", Some("let-me-in")).await.status,
        403,
        "DENY before ALLOW"
    );
    assert_eq!(
        call("GET", "/debug", None).await.status,
        200,
        "dry run lets it through"
    );

    let log = proxy.log_text();
    assert!(log.contains("denied GET /admin/x from 127.0.0.1"), "{log}");
    assert!(
        log.contains("by DENY deny-admin rules[0]"),
        "the matching rule is named: {log}"
    );
    assert!(
        log.contains("would deny GET /debug from 127.0.0.1:")
            && log.contains("by would-deny-debug rules[0]"),
        "{log}"
    );
    let m = proxy
        .metrics_containing(r#"plugin="authz",name="dry_run_denied"} 1"#)
        .await;
    assert!(m.contains(r#"plugin="authz",name="denied"} 3"#), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn authz_on_methods_and_paths_is_a_table_that_denies_counts_and_logs_without_a_call() {
    // Policies naming only methods, paths and ports: the plugin gives them
    // as its on-request-table; the proxy denies, counts and logs for it.
    let up = Upstream::echo("local").await;
    let (proxy, inbound) = inbound_authz(
        &up,
        r#"            - name: deny-admin
              action: DENY
              rules: [{ to: [{ operation: { paths: ["/app/admin*"] } }] }]
            - name: allow-app
              action: ALLOW
              rules:
                - to: [{ operation: { methods: ["GET", "HEAD"], paths: ["/app/*", "/health"] } }]
"#,
    )
    .await;
    let call = |method, path| call_inbound(inbound, method, path, None);
    assert_eq!(call("GET", "/app/page?x=1").await.status, 200);
    assert_eq!(call("HEAD", "/health").await.status, 200);
    let r = call("POST", "/app/page").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (403, Some("LR")));
    assert_eq!(String::from_utf8_lossy(&r.body), "RBAC: access denied\n");
    assert_eq!(call("GET", "/app/admin/users").await.status, 403);
    assert_eq!(call("GET", "/elsewhere").await.status, 403);
    assert_eq!(up.hits(), 2, "only the allowed requests reach the app");

    let m = proxy
        .metrics_containing(r#"plugin="authz",name="denied"} 3"#)
        .await;
    let labels = [("plugin", "authz"), ("hook", "on_request")];
    assert_eq!(
        sample(&m, "wasmesh_plugin_calls_total", &labels).unwrap_or(0.0),
        0.0,
        "{m}"
    );
    let log = proxy.log_text();
    for line in [
        "authz: denied POST /app/page from 127.0.0.1:",
        "authz: denied GET /app/admin/users from 127.0.0.1:",
        "by DENY deny-admin rules[0]",
        "authz: denied GET /elsewhere from 127.0.0.1:",
        ": no ALLOW policy matched",
    ] {
        assert!(log.contains(line), "{line:?} not logged: {log}");
    }
    let cfg = proxy.service_config("reviews").await.unwrap();
    let table = &cfg["inbound_plugins"][0]["on_request_table"];
    assert_eq!(table["rules"].as_array().map(Vec::len), Some(3), "{cfg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_state_and_ejections_survive_a_plugin_upgrade() {
    let (a, bad) = (
        Upstream::answering("a", 200).await,
        Upstream::answering("bad", 500).await,
    );
    let config = |ms: u32| {
        breaker_mesh(
            &[&a, &bad],
            &format!(
                "{{ outlierDetection: {{ consecutive5xxErrors: 4, baseEjectionTime: {ms}ms, maxEjectionPercent: 100 }} }}"
            ),
        )
    };
    let proxy = Proxy::start_with(&config(60_000), &["--watch"]).await;
    let failures = |n: usize| {
        let proxy = &proxy;
        async move {
            let mut f = 0;
            for _ in 0..n {
                if via(proxy, "reviews", "/").await.status != 200 {
                    f += 1;
                }
            }
            f
        }
    };
    assert_eq!(
        failures(4).await,
        2,
        "two of four consecutive errors counted"
    );
    // Upgrade the plugin (new config → new plugin instances, same scope).
    proxy.rewrite(&config(61_000));
    proxy.wait_version(2).await;
    assert_eq!(
        failures(20).await,
        2,
        "the count went on from 2: two more errors ejected it"
    );
    // The ejection survives another swap.
    proxy.rewrite(&config(62_000));
    proxy.wait_version(3).await;
    assert_eq!(failures(20).await, 0, "still ejected after the swap");
}

/// The five stock plugins compile in a child process, so the sidecar that
/// serves them does not keep Cranelift's heap and code resident: compiled in
/// process, this chain left a release proxy at ≈ 85 MB RSS; out of process,
/// ≈ 31 MB. The bound is generous (debug builds, other tests running).
#[tokio::test(flavor = "multi_thread")]
async fn the_stock_chain_is_compiled_out_of_process_and_the_proxy_stays_small() {
    let (v1, v2) = (Upstream::echo("v1").await, Upstream::echo("v2").await);
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"], v2: ["{}"] }}
    plugins:
      - source: builtin:router
        config: {{ http: [{{ route: [{{ destination: {{ subset: v1 }}, weight: 90 }}, {{ destination: {{ subset: v2 }}, weight: 10 }}] }}] }}
      - source: builtin:retry
        config: {{ attempts: 3, perTryTimeout: 1s, retryOn: 5xx }}
      - source: builtin:circuit-breaker
        config: {{ outlierDetection: {{ consecutive5xxErrors: 5, baseEjectionTime: 30s }} }}
      - source: builtin:fault-injection
        config: {{ abort: {{ httpStatus: 503, percentage: {{ value: 0 }} }} }}
      - source: builtin:authz
        config: {{ action: ALLOW, rules: [{{ to: [{{ operation: {{ methods: [GET] }} }}] }}] }}
"#,
        v1.addr, v2.addr
    ))
    .await;
    for _ in 0..50 {
        assert_eq!(via(&proxy, "reviews", "/").await.status, 200);
    }
    let rss = proxy.rss_kib();
    eprintln!("proxy RSS with the stock chain: {rss} KiB");
    assert!(
        rss < 64 * 1024,
        "proxy RSS {rss} KiB: is the compiler running in the proxy again?"
    );
}

fn ratelimited(upstream: &Upstream, config: &str) -> String {
    format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - source: builtin:ratelimit\n        config: {config}\n",
        upstream.addr
    )
}

/// `n` requests from 4 concurrent clients, each with `x-user: user(i)`:
/// (status counts, the 429s' `retry-after` values, seconds from the first
/// send to the last answer).
async fn burst(
    proxy: &Proxy,
    n: usize,
    user: impl Fn(usize) -> String + Clone + Send + 'static,
) -> (HashMap<u16, usize>, Vec<String>, f64) {
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let listen = proxy.listen;
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes: HashMap<u16, usize> = HashMap::new();
            let mut retry_after = Vec::new();
            for i in (w..n).step_by(4) {
                let req = http::Request::get(format!("http://{listen}/r"))
                    .header("host", "reviews")
                    .header("x-user", user(i))
                    .body(http_body_util::Full::default())
                    .unwrap();
                let r = send(http1(), req).await.unwrap();
                if r.status == 429 {
                    retry_after.push(r.header("retry-after").unwrap_or("").to_string());
                    assert_eq!(r.header("x-wasmesh-flags"), Some("RL"));
                }
                *codes.entry(r.status).or_default() += 1;
            }
            (codes, retry_after)
        }));
    }
    let mut codes: HashMap<u16, usize> = HashMap::new();
    let mut retry_after = Vec::new();
    for t in tasks {
        let (c, r) = t.await.unwrap();
        for (k, v) in c {
            *codes.entry(k).or_default() += v;
        }
        retry_after.extend(r);
    }
    (codes, retry_after, started.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread")]
async fn ratelimit_lets_a_burst_and_the_rate_through_on_one_worker_or_two() {
    let up = Upstream::echo("v1").await;
    let config = r#"{ requestsPerSecond: 10, burst: 20, key: { header: x-user } }"#;
    for workers in ["1", "2"] {
        let proxy = Proxy::start_with(&ratelimited(&up, config), &["--workers", workers]).await;
        // 400 requests, 4 clients, one key: 20 at once, then 10 a second.
        let (codes, retry_after, elapsed) = burst(&proxy, 400, |_| "shared".into()).await;
        let ok = codes.get(&200).copied().unwrap_or(0);
        let most = 20 + (10.0 * elapsed).ceil() as usize + 1;
        assert!(
            (20..=most).contains(&ok),
            "{workers} worker(s): {ok} let through in {elapsed:.2}s (20 to {most}): {codes:?}"
        );
        assert_eq!(ok + codes.get(&429).copied().unwrap_or(0), 400, "{codes:?}");
        assert!(
            retry_after.iter().all(|r| r == "1"),
            "every 429 says when to come back: {retry_after:?}"
        );
        // Counted: the plugin's own metric, and Istio's RL flag.
        // (A request is counted just after its response is written, and
        // the admin server answers from another thread: waited for.)
        let limited = 400 - ok;
        proxy
            .wait_sample(
                "wasmesh_plugin_custom_total",
                &[("plugin", "ratelimit"), ("name", "limited")],
                limited as f64,
            )
            .await;
        proxy
            .wait_sample(
                "istio_requests_total",
                &[("response_code", "429"), ("response_flags", "RL")],
                limited as f64,
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ratelimit_gives_each_of_20000_new_clients_its_burst_and_never_fills_the_scope() {
    let up = Upstream::echo("v1").await;
    // A bucket refills in 10 ms and lives that long: keys come and go.
    let config = r#"{ requestsPerSecond: 100, burst: 1, key: { header: x-user } }"#;
    let proxy = Proxy::start(&ratelimited(&up, config)).await;
    let (codes, _, _) = burst(&proxy, 20_000, |i| format!("client-{i}")).await;
    assert_eq!(codes.get(&200), Some(&20_000), "{codes:?}");
    let m = proxy.metrics().await;
    assert!(
        samples(&m, "wasmesh_plugin_state_full_total", &[]).is_empty(),
        "the scope never filled:\n{m}"
    );
    // The same client again at once: limited.
    let (codes, _, _) = burst(&proxy, 4, |_| "client-7".into()).await;
    assert!(codes.get(&429).copied().unwrap_or(0) >= 3, "{codes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ratelimit_keeps_its_buckets_across_a_reload_that_changes_the_rate() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start_with(
        &ratelimited(&up, r#"{ requestsPerSecond: 0.1, burst: 5 }"#),
        &["--watch"],
    )
    .await;
    let (codes, _, _) = burst(&proxy, 8, |_| String::new()).await;
    assert_eq!(codes.get(&200), Some(&5), "{codes:?}");
    let version = proxy.config().await["version"].as_u64().unwrap();
    proxy.rewrite(&ratelimited(&up, r#"{ requestsPerSecond: 0.2, burst: 5 }"#));
    proxy.wait_version(version + 1).await;
    // The bucket is still empty: a new rate is not a new burst.
    let (codes, _, _) = burst(&proxy, 4, |_| String::new()).await;
    assert_eq!(codes.get(&429), Some(&4), "{codes:?}");
}
