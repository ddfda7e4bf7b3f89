//! The request path end to end, as the README promises it: route timeouts
//! and per-try timeouts, rerouting and rewrites, where a retry goes, which
//! bodies are replayed, the attempt cap, per-endpoint limits, host aliases,
//! draining; and what plugins see when a client leaves mid-request, when a
//! value is not ASCII, or when no upstream answered.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

fn probe(mode: &str) -> String {
    format!(
        "{{ source: {:?}, name: {mode}, config: {{ mode: {mode} }} }}",
        wasmesh_artifacts::PROBE
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_timeout_and_a_per_try_timeout_answer_504_ut() {
    let slow = Slow::start(Duration::from_secs(30)).await;
    let proxy = Proxy::start(&format!(
        r#"services:
  timed:
    endpoints: {{ v1: ["{a}"] }}
    plugins:
      - source: builtin:router
        config: {{ http: [{{ route: [{{ destination: {{ subset: v1 }} }}], timeout: 300ms }}] }}
  tried:
    endpoints: {{ v1: ["{a}"] }}
    plugins:
      - source: builtin:retry
        config: {{ attempts: 1, perTryTimeout: 300ms, retryOn: 5xx }}
"#,
        a = slow.addr
    ))
    .await;
    let t = Instant::now();
    let r = via(&proxy, "timed", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (504, Some("UT")));
    // 300 ms asked for; the bound is generous for a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(slow.arrived(), 1);

    // Two tries of 300 ms each: both reach the upstream, both are cut.
    let t = Instant::now();
    let r = via(&proxy, "tried", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (504, Some("UT")));
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!(slow.arrived(), 3, "one try for `timed`, two for `tried`");
    // Retry's per-try timeout is its `on-request-fixed` decision: applied
    // with no call into the plugin.
    let m = proxy.metrics().await;
    let labels = [("plugin", "retry"), ("hook", "on_request")];
    assert_eq!(
        sample(&m, "wasmesh_plugin_calls_total", &labels).unwrap_or(0.0),
        0.0,
        "{m}"
    );
    let tried = proxy.service_config("tried").await.unwrap();
    assert_eq!(
        tried["plugins"][0]["on_request_fixed"],
        serde_json::json!({"decision": "proceed", "hold": null}),
        "{tried}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_can_send_to_another_service_and_rewrite_path_and_authority() {
    let (reviews, ratings) = (
        Upstream::echo("reviews").await,
        Upstream::echo("ratings").await,
    );
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: builtin:router
        config:
          http:
            - match: [{{ uri: {{ prefix: /old }} }}]
              rewrite: {{ uri: /new, authority: ratings.example }}
              route: [{{ destination: {{ host: ratings }} }}]
            - route: [{{ destination: {{ subset: v1 }} }}]
  ratings:
    endpoints: {{ v1: ["{}"] }}
"#,
        reviews.addr, ratings.addr
    ))
    .await;
    let r = via(&proxy, "reviews", "/old/x?q=1").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["upstream"], "ratings");
    assert_eq!(v["path"], "/new/x?q=1");
    assert_eq!(v["headers"]["host"], "ratings.example");
    let r = via(&proxy, "reviews", "/other").await;
    let v = r.json();
    assert_eq!(
        (v["upstream"].as_str(), v["path"].as_str()),
        (Some("reviews"), Some("/other"))
    );
    assert_eq!(v["headers"]["host"], "reviews");
    assert_eq!((reviews.hits(), ratings.hits()), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_goes_to_another_endpoint() {
    let (good, bad) = (
        Upstream::answering("good", 200).await,
        Upstream::answering("bad", 503).await,
    );
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}", "{}"] }}
    plugins:
      - source: builtin:retry
        config: {{ attempts: 1, retryOn: 5xx }}
"#,
        good.addr, bad.addr
    ))
    .await;
    // One retry allowed: had it gone back to `bad`, the client would see 503.
    for i in 0..20 {
        let r = via(&proxy, "reviews", "/").await;
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("good")),
            "request {i}"
        );
    }
    assert!(
        bad.hits() >= 5,
        "round robin sent first tries to bad: {}",
        bad.hits()
    );
    assert_eq!(good.hits(), 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_64_kib_is_never_retried() {
    let bad = Upstream::answering("bad", 503).await;
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - source: builtin:retry
        config: {{ attempts: 2, retryOn: 5xx }}
"#,
        bad.addr
    ))
    .await;
    let put = |size: usize| {
        http::Request::put(format!("http://{}/", proxy.listen))
            .header("host", "reviews")
            .body(Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap()
    };
    let r = send(http1(), put(100 * 1024)).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(bad.hits(), 1, "a streamed body is sent once");
    let r = send(http1(), put(1024)).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(bad.hits(), 4, "a buffered body is replayed: 1 + 3 tries");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_makes_at_most_16_attempts_whatever_a_plugin_asks() {
    let bad = Upstream::answering("bad", 503).await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins: [{}]\n",
        bad.addr,
        probe("retry-forever")
    ))
    .await;
    let r = via(&proxy, "reviews", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(bad.hits(), 16);
}

#[tokio::test(flavor = "multi_thread")]
async fn past_max_requests_per_endpoint_a_request_gets_503_uo() {
    let slow = Slow::start(Duration::from_secs(2)).await;
    let proxy = Proxy::start(&format!(
        "upstream: {{ max-requests-per-endpoint: 2 }}\nservices:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        slow.addr
    ))
    .await;
    let listen = proxy.listen;
    let get = move || async move {
        let req = http::Request::get(format!("http://{listen}/"))
            .header("host", "reviews")
            .body(Full::default())
            .unwrap();
        send(http1(), req).await.unwrap()
    };
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(get())).collect();
    slow.wait_arrived(2).await;
    for _ in 0..3 {
        let t = Instant::now();
        let r = get().await;
        assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("UO")));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    assert_eq!(slow.arrived(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn extra_host_names_route_to_their_service() {
    let up = Upstream::echo("reviews").await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    hosts: [reviews.example.com, \"r.local:8080\"]\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    for host in [
        "reviews",
        "reviews.example.com:9080",
        "REVIEWS.Example.com",
        "r.local",
    ] {
        let r = via(&proxy, host, "/").await;
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("reviews")),
            "{host}"
        );
    }
    let r = via(&proxy, "ratings.example.com", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (404, Some("NR")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_deadline_ends_the_proxy_with_a_request_still_in_flight() {
    let slow = Slow::start(Duration::from_secs(60)).await;
    let mut proxy = Proxy::start_with(
        &format!(
            "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
            slow.addr
        ),
        &["--drain", "500ms"],
    )
    .await;
    let listen = proxy.listen;
    let in_flight = tokio::spawn(async move {
        let req = http::Request::get(format!("http://{listen}/"))
            .header("host", "reviews")
            .body(Full::default())
            .unwrap();
        send(http1(), req).await
    });
    slow.wait_arrived(1).await;
    let t = Instant::now();
    proxy.sigterm();
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.wait_exit();
        (s, proxy)
    });
    let (status, proxy) = tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("the proxy outlived its 500ms drain by 10 s")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    let r = in_flight.await.unwrap();
    assert!(r.is_err(), "the request in flight was answered: {r:?}");
    assert!(
        proxy.log_text().contains("drain deadline passed"),
        "{}",
        proxy.log_text()
    );
}

/// `on-complete` always sees the request, and the counters a request held
/// are released, however early the client leaves: during a plugin's delay,
/// or while the upstream has not answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_mid_request_still_gets_on_complete_with_the_request() {
    let echo = Upstream::echo("up").await;
    let slow = Slow::start(Duration::from_secs(30)).await;
    let proxy = Proxy::start(&format!(
        r#"services:
  delayed:
    endpoints: {{ v1: ["{}"] }}
    plugins:
      - {}
      - source: builtin:fault-injection
        config: {{ delay: {{ fixedDelay: 5s, percentage: {{ value: 100 }} }} }}
  waiting:
    endpoints: {{ v1: ["{}"] }}
    plugins: [{}]
"#,
        echo.addr,
        probe("complete-reader"),
        slow.addr,
        probe("complete-reader"),
    ))
    .await;
    for _ in 0..3 {
        abandon(&proxy, "delayed", "/a", Duration::from_millis(300)).await;
        abandon(&proxy, "waiting", "/b", Duration::from_millis(300)).await;
    }
    slow.wait_arrived(3).await;
    for service in ["delayed", "waiting"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = via(&proxy, service, "/stats").await;
            assert_eq!(r.status, 200, "{service}: {:?}", r.body);
            // The `/stats` request holds one in-flight count itself.
            if r.json() == serde_json::json!({ "inflight": 1, "completed": 3 }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{service}: {} (3 abandoned requests should be completed and released)\n{}",
                r.json(),
                proxy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        echo.hits(),
        0,
        "the delayed requests never reached the upstream"
    );
    assert!(
        !proxy.log_text().contains("panicked"),
        "{}",
        proxy.log_text()
    );
}

/// A raw upstream that answers each request with its request head as the
/// body, so a test sees the exact bytes that were forwarded.
async fn head_echo() -> std::net::SocketAddr {
    raw_upstream(|mut s| async move {
        use tokio::io::AsyncWriteExt;
        while let Some(head) = read_raw_head(&mut s).await {
            let mut out =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len()).into_bytes();
            out.extend_from_slice(&head);
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Read one request head as bytes; `None` when the connection ends first.
async fn read_raw_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn header_values_http_allows_round_trip_through_a_plugin() {
    let up = head_echo().await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{up}\"] }}\n    plugins:\n      - {{ source: {:?}, config: {{ mode: copy-header, from: x-from, to: x-to }} }}\n",
        wasmesh_artifacts::PROBE
    ))
    .await;
    // UTF-8 beyond ASCII (obs-text bytes to HTTP), copied by the plugin; and
    // a Latin-1 value that is not UTF-8, which no plugin edits.
    let mut req = b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\nx-from: caf\xc3\xa9 \xe2\x9c\x93\r\n".to_vec();
    req.extend_from_slice(b"x-latin: \xe9t\xe9\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &req)
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        contains(&got, b"x-to: caf\xc3\xa9 \xe2\x9c\x93\r\n"),
        "{text}"
    );
    assert!(
        contains(&got, b"x-from: caf\xc3\xa9 \xe2\x9c\x93\r\n"),
        "{text}"
    );
    assert!(contains(&got, b"x-latin: \xe9t\xe9\r\n"), "{text}");
}

/// What `on-response` is told when no upstream answered: a local reply is
/// attempt 1 and its response handle shows the reply; an outcome without a
/// response shows status 0 and no headers.
#[tokio::test(flavor = "multi_thread")]
async fn on_response_sees_attempt_1_and_the_documented_response_for_local_outcomes() {
    let proxy = Proxy::start(&format!(
        r#"services:
  replied:
    plugins:
      - {}
      - {}
  empty:
    plugins: [{}]
"#,
        probe("observe"),
        probe("reply"),
        probe("observe"),
    ))
    .await;
    let r = via(&proxy, "replied", "/").await;
    assert_eq!(r.status, 418);
    assert_eq!(r.header("x-attempt-number"), Some("1"));
    assert_eq!(r.header("x-outcome"), Some("LocalReply(418)"));
    assert_eq!(r.header("x-response-status"), Some("418"));
    let r = via(&proxy, "empty", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("UH")));
    assert_eq!(r.header("x-attempt-number"), Some("1"));
    assert_eq!(r.header("x-outcome"), Some("NoHealthyEndpoint"));
    assert_eq!(r.header("x-response-status"), Some("0"));
    assert_eq!(r.header("x-response-headers"), Some("0"));
}

/// With no `protocol` given, an HTTP/2 client's request to an HTTP/1-only
/// service goes out as HTTP/1.1.
#[tokio::test(flavor = "multi_thread")]
async fn by_default_an_h2c_client_reaches_an_http1_only_service() {
    let up = head_echo().await;
    let proxy = Proxy::start(&format!(
        "services:\n  legacy:\n    endpoints: {{ v1: [\"{up}\"] }}\n"
    ))
    .await;
    let req = http::Request::get("http://legacy/p")
        .body(Full::default())
        .unwrap();
    let r = send_h2_to(proxy.listen, req).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.body.starts_with(b"GET /p HTTP/1.1\r\n"), "{:?}", r.body);
}

/// The contract's bound on `delay-ms` (a minute) is enforced: a plugin
/// asking for more fails (`503 PF`, counted as an invalid decision), and
/// one within it is obeyed.
#[tokio::test(flavor = "multi_thread")]
async fn a_delay_over_the_contracts_bound_is_a_plugin_failure() {
    let up = Upstream::echo("up").await;
    let proxy = Proxy::start(&format!(
        "services:\n  long:\n    endpoints: {{ v1: [\"{a}\"] }}\n    plugins: [{{ source: {p:?}, name: slow, config: {{ mode: delay, ms: 120000 }} }}]\n  short:\n    endpoints: {{ v1: [\"{a}\"] }}\n    plugins: [{{ source: {p:?}, name: slow, config: {{ mode: delay, ms: 200 }} }}]\n",
        a = up.addr,
        p = wasmesh_artifacts::PROBE,
    ))
    .await;
    let t = Instant::now();
    let r = via(&proxy, "long", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("PF")));
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.contains("delay-ms of 120000 ms is over the 60000 ms"),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let m = proxy.metrics_containing(r#"kind="invalid"} 1"#).await;
    assert!(
        m.lines().any(|l| l
            .starts_with(r#"wasmesh_plugin_failures_total{service="long",plugin="slow","#)
            && l.ends_with(r#"kind="invalid"} 1"#)),
        "{m}"
    );
    let t = Instant::now();
    assert_eq!(via(&proxy, "short", "/").await.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(up.hits(), 1);
}
