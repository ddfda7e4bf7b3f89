//! Misbehaving plugins are contained: a loop, a memory bomb, a trap; and
//! ordinary Rust works inside a plugin.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

fn fixture_service(
    name: &str,
    upstream: &Upstream,
    wasm: &str,
    config: &str,
    on_failure: &str,
) -> String {
    format!(
        r#"  {name}:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: {wasm}
        config: {config}
        on-failure: {on_failure}
"#,
        upstream.addr
    )
}

/// Hammer `healthy` from 4 tasks until `stop`; returns (ok, failed).
fn background_load(
    proxy: &Proxy,
    host: &'static str,
    stop: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    let listen = proxy.listen;
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut bad) = (0, 0);
                while stop.load(Ordering::SeqCst) == 0 {
                    let req = http::Request::get(format!("http://{listen}/"))
                        .header("host", host)
                        .body(http_body_util::Full::default())
                        .unwrap();
                    match send(http1(), req).await {
                        Ok(r) if r.status == 200 => ok += 1,
                        _ => bad += 1,
                    }
                }
                (ok, bad)
            }));
        }
        let mut total = (0, 0);
        for t in tasks {
            let (o, b) = t.await.unwrap();
            total.0 += o;
            total.1 += b;
        }
        total
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_looping_plugin_is_cut_at_its_deadline_and_others_see_no_failure() {
    let up = Upstream::echo("up").await;
    let looper = format!("{:?}", wasmesh_artifacts::LOOPER);
    let mut yaml = String::from("runtime: { hook-deadline: 10ms }\nservices:\n");
    yaml += &fixture_service("closed", &up, &looper, "{}", "closed");
    yaml += &fixture_service("hostcalls", &up, &looper, "{ host_calls: true }", "closed");
    yaml += &fixture_service("open", &up, &looper, "{}", "open");
    yaml += &format!("  healthy:\n    endpoints: {{ v1: [\"{}\"] }}\n", up.addr);
    // One worker thread: a looping plugin holds the only thread the proxy
    // serves on until its deadline, and the others must still all pass.
    let proxy = Proxy::start_with(&yaml, &["--workers", "1"]).await;

    let stop = Arc::new(AtomicUsize::new(0));
    let load = background_load(&proxy, "healthy", stop.clone());

    for host in ["closed", "hostcalls"] {
        for _ in 0..5 {
            let t = Instant::now();
            let r = via(&proxy, host, "/").await;
            let took = t.elapsed();
            assert_eq!(r.status, 503, "{host}");
            assert_eq!(r.header("x-wasmesh-flags"), Some("PF"));
            let body = String::from_utf8_lossy(&r.body);
            assert!(body.contains("plugin fixture-looper (version "), "{body}");
            assert!(body.contains("deadline"), "{body}");
            // The deadline is 10ms; 1s is the generous bound (a benchmark
            // measures the real figure).
            assert!(took < Duration::from_secs(1), "{host} took {took:?}");
        }
    }
    let r = via(&proxy, "open", "/").await;
    assert_eq!(r.status, 200, "on-failure: open skips the plugin");
    assert_eq!(r.header("x-upstream"), Some("up"));

    stop.store(1, Ordering::SeqCst);
    let (ok, bad) = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(bad, 0, "concurrent requests to another service failed");

    let m = proxy
        .metrics_containing(
            r#"wasmesh_plugin_failures_total{service="closed",plugin="fixture-looper""#,
        )
        .await;
    assert!(m.contains(r#"kind="timeout"} 5"#), "{m}");
    // Each of those calls was timed, and ran at least to its 10 ms deadline.
    let closed = [
        ("service", "closed"),
        ("plugin", "fixture-looper"),
        ("hook", "on_request"),
    ];
    let count = sample(&m, "wasmesh_plugin_call_duration_seconds_count", &closed);
    let sum = sample(&m, "wasmesh_plugin_call_duration_seconds_sum", &closed).unwrap();
    assert_eq!(count, Some(5.0), "{m}");
    assert!(sum >= 0.05, "5 calls cut at 10 ms took {sum} s in all");
    let open = [
        ("service", "open"),
        ("plugin", "fixture-looper"),
        ("hook", "on_request"),
    ];
    assert_eq!(
        sample(&m, "wasmesh_plugin_fail_open_total", &open),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_is_stopped_at_its_cap_and_rss_stays_bounded() {
    let up = Upstream::echo("up").await;
    let bomb = format!("{:?}", wasmesh_artifacts::MEMBOMB);
    let mut yaml =
        String::from("runtime: { memory-limit: 16Mi, hook-deadline: 500ms }\nservices:\n");
    yaml += &fixture_service("bomb", &up, &bomb, "{}", "closed");
    yaml += &fixture_service("bomb-open", &up, &bomb, "{}", "open");
    yaml += &format!("  healthy:\n    endpoints: {{ v1: [\"{}\"] }}\n", up.addr);
    let proxy = Proxy::start(&yaml).await;
    let baseline = proxy.rss_kib();

    let stop = Arc::new(AtomicUsize::new(0));
    let load = background_load(&proxy, "healthy", stop.clone());
    let mut peak = baseline;
    for i in 0..60 {
        let host = if i % 2 == 0 { "bomb" } else { "bomb-open" };
        let r = via(&proxy, host, "/").await;
        if host == "bomb" {
            assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("PF")));
            assert!(
                String::from_utf8_lossy(&r.body).contains("memory cap"),
                "{:?}",
                r.body
            );
        } else {
            assert_eq!(r.status, 200);
        }
        peak = peak.max(proxy.rss_kib());
    }
    stop.store(1, Ordering::SeqCst);
    let (_, bad) = load.await.unwrap();
    assert_eq!(bad, 0);
    // The stated bound: each bomb holds at most its 16 MiB cap while it runs
    // and gives it back when its instance is dropped; allow 4 at once (two
    // workers, two bombs) on top of where the proxy started.
    let bound = baseline + 4 * 16 * 1024 + 32 * 1024;
    assert!(
        peak < bound,
        "peak RSS {peak} KiB over the bound {bound} KiB (baseline {baseline} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_after_header_edits_leaves_no_partial_edit() {
    let up = Upstream::echo("up").await;
    let trapper = format!("{:?}", wasmesh_artifacts::TRAPPER);
    let mut yaml = String::from("services:\n");
    yaml += &fixture_service("closed", &up, &trapper, "{}", "closed");
    yaml += &fixture_service("open", &up, &trapper, "{}", "open");
    let proxy = Proxy::start(&yaml).await;

    // Without the trap trigger the plugin's edit goes through.
    let r = via(&proxy, "open", "/fine").await;
    assert_eq!(r.json()["headers"]["x-partial"], "1");

    let hits = up.hits();
    let r = via(&proxy, "closed", "/trap").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("PF")));
    assert!(String::from_utf8_lossy(&r.body).contains("trapped"));
    assert_eq!(up.hits(), hits, "nothing forwarded");

    let r = via(&proxy, "open", "/trap").await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["headers"].get("x-partial").is_none(),
        "a partial edit leaked"
    );
    // The panic message went to the log through the guest's stderr.
    assert!(
        proxy.log_text().contains("trapper: asked to trap"),
        "{}",
        proxy.log_text()
    );
    // And the next request gets a fresh, working instance.
    assert_eq!(via(&proxy, "closed", "/fine").await.status, 200);

    // Per-plugin metrics moved: one trap each, one of them skipped fail-open;
    // every call timed; the successful calls' decisions counted.
    let plugin = |service| {
        [
            ("service", service),
            ("plugin", "fixture-trapper"),
            ("hook", "on_request"),
        ]
    };
    let m = proxy.metrics().await;
    let trap = [("service", "closed"), ("kind", "trap")];
    assert_eq!(
        sample(&m, "wasmesh_plugin_failures_total", &trap),
        Some(1.0)
    );
    let trap = [("service", "open"), ("kind", "trap")];
    assert_eq!(
        sample(&m, "wasmesh_plugin_failures_total", &trap),
        Some(1.0)
    );
    let skipped = "wasmesh_plugin_fail_open_total";
    assert_eq!(sample(&m, skipped, &plugin("open")), Some(1.0));
    assert_eq!(sample(&m, skipped, &plugin("closed")), Some(0.0));
    let timed = "wasmesh_plugin_call_duration_seconds_count";
    assert_eq!(sample(&m, timed, &plugin("open")), Some(2.0));
    assert_eq!(sample(&m, timed, &plugin("closed")), Some(2.0));
    let proceed = [&plugin("closed")[..], &[("decision", "proceed")]].concat();
    assert_eq!(
        sample(&m, "wasmesh_plugin_decisions_total", &proceed),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ordinary_rust_works_inside_a_plugin() {
    let up = Upstream::echo("up").await;
    let stdlib = format!("{:?}", wasmesh_artifacts::STDLIB);
    let yaml = format!(
        "services:\n{}",
        fixture_service("std", &up, &stdlib, "{}", "closed")
    );
    let proxy = Proxy::start(&yaml).await;
    let req = http::Request::get(format!("http://{}/", proxy.listen))
        .header("host", "std")
        .header("a", "1")
        .header("b", "2")
        .body(http_body_util::Full::default())
        .unwrap();
    let r = send(http1(), req).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let h = &r.json()["headers"];
    // host, a, b, x-forwarded-for, x-forwarded-proto, x-request-id
    assert_eq!(h["x-header-names"], "6", "{h}");
    assert_eq!(h["x-elapsed-ok"], "true");
    assert!(
        proxy
            .log_text()
            .contains("stdlib fixture: 6 distinct header names")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_that_keeps_trapping_is_quarantined_and_the_last_good_one_serves() {
    let up = Upstream::echo("up").await;
    let trapper = format!("{:?}", wasmesh_artifacts::TRAPPER);
    let head = "runtime: { quarantine: { traps: 3, window: 10s } }\nservices:\n";
    let good = format!(
        "{head}  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - {{ source: builtin:add-header, name: guard, config: {{ request: {{ x-guard: good }} }} }}\n",
        up.addr
    );
    let proxy = Proxy::start_with(&good, &["--watch"]).await;
    let r = via(&proxy, "reviews", "/trap").await;
    assert_eq!(r.json()["headers"]["x-guard"], "good");
    let good_version = proxy.config().await["services"][0]["plugins"][0]["version"].clone();

    // A bad upgrade of the same plugin: it traps on /trap.
    proxy.rewrite(&format!(
        "{head}  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - {{ source: {trapper}, name: guard }}\n",
        up.addr
    ));
    proxy.wait_version(2).await;
    assert_eq!(via(&proxy, "reviews", "/fine").await.status, 200);
    for _ in 0..3 {
        let r = via(&proxy, "reviews", "/trap").await;
        assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("PF")));
    }
    // Quarantined: the good version serves, even the requests that trapped.
    for _ in 0..5 {
        let r = via(&proxy, "reviews", "/trap").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["headers"]["x-guard"], "good");
    }
    let plugin = &proxy.config().await["services"][0]["plugins"][0];
    assert_eq!(plugin["quarantined"], true, "{plugin}");
    assert_eq!(plugin["serving"], good_version, "{plugin}");
    let bad_version = plugin["version"].as_str().unwrap().to_string();
    proxy
        .metrics_containing(&format!(
            r#"wasmesh_plugin_quarantined{{service="reviews",plugin="guard",version="{bad_version}"}} 1"#
        ))
        .await;
    assert!(
        proxy
            .log_text()
            .contains("plugin quarantined after 3 failures")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_good_version_a_quarantined_plugin_gets_its_on_failure() {
    let up = Upstream::echo("up").await;
    let trapper = format!("{:?}", wasmesh_artifacts::TRAPPER);
    let mut yaml = String::from("runtime: { quarantine: { traps: 2, window: 10s } }\nservices:\n");
    yaml += &fixture_service("closed", &up, &trapper, "{}", "closed");
    yaml += &fixture_service("open", &up, &trapper, "{}", "open");
    let proxy = Proxy::start(&yaml).await;
    for service in ["closed", "open"] {
        assert_eq!(via(&proxy, service, "/fine").await.status, 200);
        for _ in 0..2 {
            via(&proxy, service, "/trap").await;
        }
    }
    // Requests that would have passed now meet on-failure, without a call.
    let hits = up.hits();
    let r = via(&proxy, "closed", "/fine").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("PF")));
    assert!(
        String::from_utf8_lossy(&r.body).contains("quarantined"),
        "{:?}",
        r.body
    );
    assert_eq!(up.hits(), hits);
    let r = via(&proxy, "open", "/fine").await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("x-partial").is_none(), "skipped");
    let config = proxy.config().await;
    for s in config["services"].as_array().unwrap() {
        assert_eq!(s["plugins"][0]["quarantined"], true, "{s}");
        assert_eq!(s["plugins"][0]["serving"], serde_json::Value::Null, "{s}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_recursion_and_huge_returns_are_contained() {
    let up = Upstream::echo("up").await;
    let hostile = format!("{:?}", wasmesh_artifacts::HOSTILE);
    let modes = [
        ("recurse", "trapped"),
        (
            "many-headers",
            "returned too much: 100000 header operations",
        ),
        ("huge-header", "returned too much: 4194"),
        (
            "huge-reply",
            "returned too much: a local-reply body of 4194",
        ),
        ("huge-state", "the host refused a 1 MiB value"),
    ];
    // Building 100,000 header edits takes the guest longer than the default
    // 10 ms deadline; the point here is what the host does with them.
    let mut yaml = String::from("runtime: { hook-deadline: 5s }\nservices:\n");
    for (mode, _) in modes.iter().chain([&("huge-log", "")]) {
        yaml += &fixture_service(
            mode,
            &up,
            &hostile,
            &format!("{{ mode: {mode} }}"),
            "closed",
        );
    }
    let proxy = Proxy::start(&yaml).await;
    let baseline = proxy.rss_kib();
    for round in 0..3 {
        for (mode, why) in modes {
            // This request's own log lines: the log only grows.
            let offset = proxy.log_text().len();
            let r = via(&proxy, mode, "/").await;
            assert_eq!(
                (r.status, r.header("x-wasmesh-flags")),
                (503, Some("PF")),
                "{mode}"
            );
            let body = String::from_utf8_lossy(&r.body);
            let log = log_since(&proxy, offset);
            assert!(
                body.contains(why) || log.contains(why),
                "{mode} (round {round}): {body}"
            );
        }
        let r = via(&proxy, "huge-log", "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["headers"]["x-logged"], "yes");
    }
    assert_eq!(up.hits(), 3, "only the huge-log requests were forwarded");
    let log_len = proxy.log_text().len();
    assert!(
        log_len < 1 << 20,
        "a 4 MiB log line reached the log ({log_len} bytes)"
    );
    // Bound: each service's pool may keep an instance grown to the 16 MiB
    // cap, plus the host's copies of what it refused while refusing it.
    let rss = proxy.rss_kib();
    let bound = baseline + 6 * 16 * 1024 + 32 * 1024;
    assert!(
        rss < bound,
        "RSS {rss} KiB over {bound} KiB (baseline {baseline} KiB)"
    );
    let m = proxy.metrics_containing(r#"kind="too_large"} 3"#).await;
    assert_eq!(
        m.lines()
            .filter(|l| l.ends_with(r#"kind="too_large"} 3"#))
            .count(),
        3,
        "many-headers, huge-header and huge-reply, 3 each:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_memory_bombs_leave_the_proxy_as_it_was() {
    let up = Upstream::echo("up").await;
    let bomb = format!("{:?}", wasmesh_artifacts::MEMBOMB);
    // A small cap keeps each bomb quick; the path is the same at any cap.
    let mut yaml = String::from("runtime: { memory-limit: 2Mi }\nservices:\n");
    yaml += &fixture_service("bomb", &up, &bomb, "{}", "closed");
    yaml += &format!("  healthy:\n    endpoints: {{ v1: [\"{}\"] }}\n", up.addr);
    let proxy = Proxy::start(&yaml).await;
    // `each` bombs from each of 4 clients at once: how many answered 503
    // at the memory cap.
    let bombs = |each: usize| {
        let listen = proxy.listen;
        async move {
            let mut clients = Vec::new();
            for _ in 0..4 {
                clients.push(tokio::spawn(async move {
                    let mut ok = 0;
                    for _ in 0..each {
                        let req = http::Request::get(format!("http://{listen}/"))
                            .header("host", "bomb")
                            .body(http_body_util::Full::default())
                            .unwrap();
                        let r = send(http1(), req).await.unwrap();
                        if r.status == 503
                            && String::from_utf8_lossy(&r.body).contains("memory cap")
                        {
                            ok += 1;
                        }
                    }
                    ok
                }));
            }
            let mut ok = 0;
            for c in clients {
                ok += c.await.unwrap();
            }
            ok
        }
    };
    assert_eq!(via(&proxy, "healthy", "/").await.status, 200);
    // The proxy drops its startup code from memory once serving, so the
    // code a bomb runs through is faulted back in by the first bombs: the
    // baseline is taken once 100 of them have run, and the 10,000 after
    // must add nothing.
    assert_eq!(bombs(25).await, 100);
    let start = proxy.rss_kib();
    let t = Instant::now();
    assert_eq!(
        bombs(2_500).await,
        10_000,
        "every bomb answered 503 PF at its cap"
    );
    assert_eq!(via(&proxy, "healthy", "/").await.status, 200);
    let end = proxy.rss_kib();
    println!(
        "10,000 bombs in {:?}; RSS {start} KiB → {end} KiB",
        t.elapsed()
    );
    assert!(
        end * 10 <= start * 11,
        "RSS {end} KiB after 10,000 bombs, over 110% of the {start} KiB it started at"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_with_a_large_initial_memory_runs_under_a_cap_that_fits_it() {
    // 32 MiB of initial memory: refused under the default 16Mi cap (see the
    // CLI tests), served under 64Mi.
    let up = Upstream::echo("up").await;
    let big = format!("{:?}", wasmesh_artifacts::BIGMEM);
    let yaml = format!(
        "runtime: {{ memory-limit: 64Mi }}\nservices:\n{}",
        fixture_service("big", &up, &big, "{}", "closed")
    );
    let proxy = Proxy::start(&yaml).await;
    assert_eq!(via(&proxy, "big", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_guest_call_after_a_trap_and_only_on_complete_after_a_reply() {
    let up = Upstream::echo("up").await;
    let hostile = format!("{:?}", wasmesh_artifacts::HOSTILE);
    let mut yaml = String::from("services:\n");
    yaml += &fixture_service("trap", &up, &hostile, "{ mode: trap }", "open");
    yaml += &fixture_service("reply", &up, &hostile, "{ mode: reply }", "closed");
    let proxy = Proxy::start(&yaml).await;
    for _ in 0..5 {
        assert_eq!(via(&proxy, "trap", "/").await.status, 200, "skipped (open)");
        assert_eq!(via(&proxy, "reply", "/").await.status, 418);
    }
    let m = proxy
        .metrics_containing(r#"wasmesh_requests_total{destination_service="reply",response_code="418",response_flags="LR"} 5"#)
        .await;
    let calls = |service: &str, hook: &str| {
        sample(
            &m,
            "wasmesh_plugin_calls_total",
            &[("service", service), ("hook", hook)],
        )
        .unwrap_or(0.0)
    };
    // A trapped plugin is never called again for that request.
    assert_eq!(calls("trap", "on_request"), 5.0, "{m}");
    assert_eq!(calls("trap", "on_response"), 0.0, "{m}");
    assert_eq!(calls("trap", "on_complete"), 0.0, "{m}");
    // A plugin that replied gets on-complete, never on-response.
    assert_eq!(calls("reply", "on_request"), 5.0, "{m}");
    assert_eq!(calls("reply", "on_response"), 0.0, "{m}");
    assert_eq!(calls("reply", "on_complete"), 5.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_growth_bomb_is_trapped_at_the_table_cap() {
    let up = Upstream::echo("up").await;
    let bomb = format!("{:?}", wasmesh_artifacts::TABLE_BOMB);
    let mut yaml = String::from("services:\n");
    yaml += &fixture_service("bomb", &up, &bomb, "{}", "closed");
    yaml += &format!("  healthy:\n    endpoints: {{ v1: [\"{}\"] }}\n", up.addr);
    let proxy = Proxy::start(&yaml).await;
    let start = proxy.rss_kib();
    for _ in 0..200 {
        let r = via(&proxy, "bomb", "/").await;
        assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("PF")));
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains("table"), "{body}");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(via(&proxy, "healthy", "/").await.status, 200);
    let end = proxy.rss_kib();
    // Each bomb's table is capped at 100,000 elements (≈ 1.6 MB) and freed
    // with its instance.
    assert!(
        end < start + 16 * 1024,
        "RSS {start} KiB → {end} KiB after 200 table bombs"
    );
}

/// A plugin built against contract 0.1.0 (a frozen copy of that WIT, with
/// wit-bindgen directly) loads and runs on this 0.1.x host: its reads,
/// state, edits, its `on-response`, and its 0.1.0 way of flagging `UO`.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_built_against_contract_0_1_0_keeps_working() {
    let up = Upstream::echo("up").await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - source: {:?}\n",
        up.addr,
        wasmesh_artifacts::CONTRACT_0_1_0
    ))
    .await;
    let req = http::Request::get(format!("http://{}/", proxy.listen))
        .header("host", "reviews")
        .header("end-user", "jason")
        .body(http_body_util::Full::default())
        .unwrap();
    let r = send(http1(), req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-contract"], "0.1.0 jason 1");
    assert_eq!(r.header("x-contract-status"), Some("200"));
    let r = via(&proxy, "reviews", "/overflow").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("UO")));
    assert_eq!(
        r.header("x-contract-status"),
        None,
        "the replier's own on-response is not called"
    );
    proxy
        .metrics_containing(r#"wasmesh_requests_total{destination_service="reviews",response_code="503",response_flags="UO"} 1"#)
        .await;
}

/// What 0.1.1 added, through the SDK: a response's every value of a header,
/// and a local reply flagged by the plugin (the circuit breaker's `UO` is
/// tested with the stock plugins).
#[tokio::test(flavor = "multi_thread")]
async fn contract_0_1_1_additions_reach_plugins() {
    let up = Upstream::start(std::sync::Arc::new(|_req| {
        http::Response::builder()
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
            .unwrap()
    }))
    .await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - {{ source: {:?}, config: {{ mode: observe }} }}\n",
        up.addr,
        wasmesh_artifacts::PROBE
    ))
    .await;
    let r = via(&proxy, "reviews", "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-response-multi"), Some("a|b"));
}
