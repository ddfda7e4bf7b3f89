//! Forwarding: headers, protocols, routing and local replies.

use std::io::{Read, Write};

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

fn services(upstream: &Upstream) -> String {
    format!(
        r#"services:
  reviews:
    endpoints:
      v1: ["{}"]
    plugins:
      - source: builtin:add-header
        config: {{ request: {{ x-added: "yes" }}, response: {{ x-resp: "yes" }} }}
      - source: builtin:deny-path
        config: {{ prefixes: ["/admin"] }}
"#,
        upstream.addr
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn add_header_reaches_upstream_and_client_and_deny_path_replies_locally() {
    let up = Upstream::echo("reviews-v1").await;
    let proxy = Proxy::start(&services(&up)).await;

    let r = via(&proxy, "reviews", "/hello?x=1").await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(
        body["headers"]["x-added"], "yes",
        "request header at the upstream"
    );
    assert_eq!(body["path"], "/hello?x=1");
    assert_eq!(
        r.header("x-resp"),
        Some("yes"),
        "response header at the client"
    );
    let id = r.header("x-request-id").expect("x-request-id echoed");
    assert_eq!(
        body["headers"]["x-request-id"], id,
        "the upstream saw the same id"
    );
    assert_eq!(body["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(body["headers"]["x-forwarded-proto"], "http");
    assert_eq!(r.header("x-wasmesh-flags"), None);

    // Case-insensitive host with a port still routes.
    assert_eq!(via(&proxy, "ReViEwS:9080", "/").await.status, 200);

    let hits = up.hits();
    let r = via(&proxy, "reviews", "/admin/users").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-wasmesh-flags"), Some("LR"));
    assert_eq!(
        r.header("x-resp"),
        Some("yes"),
        "earlier plugins' response edits still apply"
    );
    assert!(String::from_utf8_lossy(&r.body).contains("deny-path"));
    assert_eq!(up.hits(), hits, "the upstream was never called");

    proxy.metrics_containing(r#"wasmesh_requests_total{destination_service="reviews",response_code="403",response_flags="LR"} 1"#).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let up = Upstream::start(std::sync::Arc::new(|req| {
        let seen: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
        let te = req
            .headers()
            .get("te")
            .map(|v| v.to_str().unwrap().to_string());
        http::Response::builder()
            .header("connection", "x-hop-resp")
            .header("x-hop-resp", "1")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "1")
            .body(Full::new(Bytes::from(
                serde_json::json!({"seen": seen, "te": te}).to_string(),
            )))
            .unwrap()
    }))
    .await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    protocol: http1\n    endpoints:\n      v1: [\"{}\"]\n",
        up.addr
    ))
    .await;
    // Raw HTTP/1.1 so that the client sends exactly these headers.
    let mut s = std::net::TcpStream::connect(proxy.listen).unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: x-custom, close\r\nX-Custom: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers, deflate\r\nUpgrade: h2c\r\nX-Kept: 1\r\n\r\n",
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(!head.contains("x-hop-resp"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    assert!(head.contains("x-end-to-end: 1"), "{head}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let seen: Vec<&str> = v["seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    for gone in ["x-custom", "keep-alive", "proxy-connection", "upgrade"] {
        assert!(
            !seen.contains(&gone),
            "{gone} reached the upstream: {seen:?}"
        );
    }
    assert!(seen.contains(&"x-kept"), "{seen:?}");
    assert_eq!(v["te"], "trailers", "only `te: trailers` survives");
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_and_h2c_pass_through_with_the_configured_upstream_protocol() {
    let up = Upstream::echo("any").await;
    let proxy = Proxy::start(&format!(
        r#"services:
  default:
    endpoints: {{ v1: ["{a}"] }}
  auto:
    protocol: auto
    endpoints: {{ v1: ["{a}"] }}
  one:
    protocol: http1
    endpoints: {{ v1: ["{a}"] }}
  two:
    protocol: h2c
    endpoints: {{ v1: ["{a}"] }}
"#,
        a = up.addr
    ))
    .await;
    // With no protocol given: HTTP/1.1 whatever the client spoke (gRPC
    // aside, tests/e2e/grpc.rs); `auto`: the client's.
    let cases = [
        (false, "default", "HTTP/1.1"),
        (true, "default", "HTTP/1.1"),
        (false, "auto", "HTTP/1.1"),
        (true, "auto", "HTTP/2.0"),
        (true, "one", "HTTP/1.1"),
        (false, "two", "HTTP/2.0"),
    ];
    for (h2, host, upstream_version) in cases {
        let r = if h2 {
            // h2 names the service in :authority; connect to the proxy.
            let req = http::Request::get(format!("http://{host}/p"))
                .body(Full::default())
                .unwrap();
            send_h2_to(proxy.listen, req).await
        } else {
            via(&proxy, host, "/p").await
        };
        assert_eq!(
            r.status,
            200,
            "{host} h2={h2}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["version"], upstream_version, "{host} h2={h2}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_mode_unknown_hosts_connect_and_upstream_failures_get_flagged_local_replies() {
    let up = Upstream::echo("reviews").await;
    let dead = free_port();
    let proxy = Proxy::start(&format!(
        r#"services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
  empty: {{}}
  dead:
    endpoints: {{ v1: ["127.0.0.1:{dead}"] }}
"#,
        up.addr
    ))
    .await;

    // Absolute-form target, as an HTTP_PROXY client sends it.
    let mut s = std::net::TcpStream::connect(proxy.listen).unwrap();
    s.write_all(
        b"GET http://reviews/via-proxy HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"path\":\"/via-proxy\""), "{resp}");

    let r = via(&proxy, "nobody", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (404, Some("NR")));
    let r = via(&proxy, "empty", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("UH")));
    let r = via(&proxy, "dead", "/").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (503, Some("UF")));
    assert!(String::from_utf8_lossy(&r.body).contains("connect failure"));

    let mut s = std::net::TcpStream::connect(proxy.listen).unwrap();
    s.write_all(b"CONNECT reviews:443 HTTP/1.1\r\nHost: reviews:443\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 501"), "{resp}");
    assert!(resp.contains("CONNECT"), "{resp}");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_turns_ready_off_and_exits_zero() {
    // An upstream that answers after 1.5 s, so a request is in flight when
    // SIGTERM comes.
    let slow = Slow::start(std::time::Duration::from_millis(1500)).await;
    let addr = slow.addr;
    // One worker (the current-thread scheduler): draining and exiting must
    // not depend on a second thread.
    let mut proxy = Proxy::start_with(
        &format!(
            "services:\n  reviews:\n    protocol: http1\n    endpoints: {{ v1: [\"{addr}\"] }}\n"
        ),
        &["--workers", "1"],
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
    let t = std::time::Instant::now();
    proxy.sigterm();
    // Draining: /ready says 503 and the listener takes no new connections.
    let mut ready_503 = false;
    let mut refused = false;
    while t.elapsed() < std::time::Duration::from_millis(1000) && !(ready_503 && refused) {
        if let Ok(r) = get(&format!("http://{}/ready", proxy.admin)).await {
            ready_503 |= r.status == 503;
        }
        refused |= tokio::net::TcpStream::connect(proxy.listen).await.is_err();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready_503, "/ready never turned 503 while draining");
    assert!(
        refused,
        "the listener still accepted connections while draining"
    );
    // The request in flight finishes.
    let r = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was cut");
    assert_eq!((r.status, &r.body[..]), (200, &b"slow\n"[..]));
    let status = proxy.wait_exit();
    assert!(status.success(), "{status}: {}", proxy.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inbound_listener_runs_the_local_services_inbound_chain() {
    let up = Upstream::echo("local-app").await;
    let inbound = free_port();
    let proxy = Proxy::start(&format!(
        r#"inbound: 127.0.0.1:{inbound}
local-service: reviews
services:
  reviews:
    endpoints: {{ v1: ["{}"] }}
    inbound-plugins:
      - source: builtin:deny-path
        config: {{ prefixes: ["/internal"] }}
"#,
        up.addr
    ))
    .await;
    let get_inbound = |path: &'static str| async move {
        let req = http::Request::get(format!("http://127.0.0.1:{inbound}{path}"))
            .header("host", "anything-at-all")
            .body(Full::default())
            .unwrap();
        send(http1(), req).await.unwrap()
    };
    let r = get_inbound("/public").await;
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("local-app")));
    let r = get_inbound("/internal/x").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (403, Some("LR")));
    // The outbound listener does not run the inbound chain.
    assert_eq!(via(&proxy, "reviews", "/internal/x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrades_are_tunnelled_after_on_request() {
    // An upstream that accepts any upgrade and echoes bytes back.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: http::Request<hyper::body::Incoming>| async move {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = on.await {
                                let mut io = hyper_util::rt::TokioIo::new(up);
                                let (mut r, mut w) = tokio::io::split(&mut io);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .body(Full::<Bytes>::default())
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    let proxy = Proxy::start(&format!(
        r#"services:
  ws:
    protocol: http1
    endpoints: {{ v1: ["{addr}"] }}
    plugins:
      - source: builtin:deny-path
        config: {{ prefixes: ["/denied"] }}
"#
    ))
    .await;
    let upgrade = |path: &str| {
        let mut s = std::net::TcpStream::connect(proxy.listen).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        (String::from_utf8(head).unwrap(), s)
    };
    let (head, _) = upgrade("/denied");
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "on-request ran first: {head}"
    );
    let (head, mut s) = upgrade("/chat");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    s.write_all(b"ping through the tunnel").unwrap();
    let mut buf = [0u8; 23];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping through the tunnel");
    s.write_all(b"and back").unwrap();
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).unwrap();
    drop(s);

    // Istio's TCP metrics count the tunnel: opened, closed, and its bytes
    // each way (31 echoed back).
    let ws = [("destination_service", "ws"), ("reporter", "source")];
    proxy
        .wait_sample("istio_tcp_connections_closed_total", &ws, 1.0)
        .await;
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "istio_tcp_connections_opened_total", &ws),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "istio_tcp_received_bytes_total", &ws),
        Some(31.0)
    );
    assert_eq!(sample(&m, "istio_tcp_sent_bytes_total", &ws), Some(31.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_broken_from_its_first_bytes_is_refused_before_anything_is_forwarded() {
    let up = Upstream::echo("reviews").await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    protocol: http1\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    let raw = |request: &[u8]| {
        let mut s = std::net::TcpStream::connect(proxy.listen).unwrap();
        s.write_all(request).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    };
    let resp = raw(b"POST /ok HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let hits = up.hits();
    let resp = raw(b"POST /bad HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(up.hits(), hits, "nothing was forwarded");
}

/// HTTP/1.1 upstream connections are pooled per endpoint: sequential
/// requests share one keep-alive connection, and an upstream that closes
/// its connections after every response (without saying so) costs no
/// request: the closed connection is dropped, or the request, never
/// written, goes out again on a new one.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_reused_and_ones_the_upstream_closed_cost_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let serve = |close_after_one: bool, accepted: Arc<AtomicUsize>| {
        move |mut s: tokio::net::TcpStream| {
            accepted.fetch_add(1, Ordering::SeqCst);
            async move {
                while read_head(&mut s).await.is_some() {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                    if s.write_all(ok).await.is_err() || close_after_one {
                        return;
                    }
                }
            }
        }
    };
    let (kept, closing) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let keep_alive = raw_upstream(serve(false, kept.clone())).await;
    let one_shot = raw_upstream(serve(true, closing.clone())).await;
    let proxy = Proxy::start_with(
        &format!(
            "services:\n  kept:\n    protocol: http1\n    endpoints: {{ v1: [\"{keep_alive}\"] }}\n  closing:\n    protocol: http1\n    endpoints: {{ v1: [\"{one_shot}\"] }}\n"
        ),
        &["--workers", "1"],
    )
    .await;
    for host in ["kept", "closing"] {
        for i in 0..40 {
            let req = http::Request::get(format!("http://{}/{i}", proxy.listen))
                .header("host", host)
                .body(Full::default())
                .unwrap();
            let got = send(http1(), req).await.unwrap();
            assert_eq!(got.status, 200, "{host} request {i}: {:?}", got.body);
            if i % 2 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }
    assert_eq!(
        kept.load(Ordering::SeqCst),
        1,
        "40 sequential requests, one connection"
    );
    assert_eq!(
        closing.load(Ordering::SeqCst),
        40,
        "a connection per request"
    );
}

/// A pooled upstream connection idle past `upstream.idle-timeout` is closed
/// even when no further request comes for its endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_upstream_connection_is_closed_after_the_idle_timeout() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    let up = raw_upstream(move |mut s| {
        let c = c.clone();
        async move {
            while read_head(&mut s).await.is_some() {
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                if s.write_all(ok).await.is_err() {
                    break;
                }
            }
            c.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "upstream: {{ idle-timeout: 1s }}\nservices:\n  reviews:\n    protocol: http1\n    endpoints: {{ v1: [\"{up}\"] }}\n"
    ))
    .await;
    let req = http::Request::get(format!("http://{}/", proxy.listen))
        .header("host", "reviews")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(http1(), req).await.unwrap().status, 200);
    assert_eq!(
        closed.load(Ordering::SeqCst),
        0,
        "kept for the next request"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while closed.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still open 10 s later"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `python3 -m http.server`: a real HTTP/1.0 server, killed on drop.
struct PythonHttp {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for PythonHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PythonHttp {
    async fn serving(file: &str, text: &str) -> PythonHttp {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file), text).unwrap();
        let port = free_port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "http.server never listened"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        PythonHttp {
            child,
            addr,
            _dir: dir,
        }
    }
}

/// One response from `s`: its head, and its body of `content-length`.
async fn read_response(s: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    // Never read past this response: with pipelining, the next one may
    // already be on the wire behind it.
    let head = read_response_head_only(s).await;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut body))
        .await
        .expect("a response body within 10 s")
        .unwrap_or_else(|e| panic!("the proxy closed the connection after: {head}: {e}"));
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http10_upstream_answers_an_http11_client_in_http11_on_one_kept_connection() {
    use tokio::io::AsyncWriteExt;
    let files = PythonHttp::serving("hello.txt", "hi\n").await;
    let proxy = Proxy::start(&format!(
        "services:\n  files:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        files.addr
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /hello.txt HTTP/1.1\r\nHost: files\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, "hi\n");
    }
    // An HTTP/1.0 client still gets HTTP/1.0.
    let r = raw(&proxy, b"GET /hello.txt HTTP/1.0\r\nHost: files\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.0 200"), "{r}");
}

/// Requests without a body go out on the proxy's own HTTP/1.1 exchange:
/// whatever framing the upstream answers in reaches a real client (`curl`)
/// whole — chunked with its trailers, after an informational head, with a
/// reason phrase of its own, to `HEAD`, or until the upstream closes — and
/// the connection is kept exactly when the response allows it. A
/// malformed answer is refused, never passed on.
#[tokio::test(flavor = "multi_thread")]
async fn every_response_framing_reaches_the_client_whole_on_kept_connections() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    let up = raw_upstream(move |mut s| {
        a.fetch_add(1, Ordering::SeqCst);
        async move {
            while let Some(head) = read_head(&mut s).await {
                let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                let resp: &[u8] = match path.as_str() {
                    "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
                    "/early" => b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 Fine Thanks\r\ncontent-length: 2\r\n\r\nok",
                    "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
                    "/eof" => b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
                    _ => b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxx",
                };
                if s.write_all(resp).await.is_err() || path == "/eof" {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start_with(
        &format!(
            "services:\n  reviews:\n    protocol: http1\n    endpoints: {{ v1: [\"{up}\"] }}\n"
        ),
        &["--workers", "1"],
    )
    .await;
    let curl = |args: &[&str], path: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "-i",
                "--raw",
                "--max-time",
                "10",
                "-H",
                "host: reviews",
            ])
            .args(args)
            .arg(format!("http://{}{path}", proxy.listen))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "curl {path}: {out:?}");
        String::from_utf8(out.stdout).unwrap().replace("\r\n", "\n")
    };
    let got = curl(&["-H", "te: trailers"], "/chunked");
    assert!(got.starts_with("HTTP/1.1 200 OK\n"), "{got}");
    assert!(
        got.ends_with("\n\n5\nhello\n6\n world\n0\nx-sum: 11\n\n"),
        "chunked, with its trailer: {got}"
    );
    let got = curl(&[], "/early");
    assert!(got.starts_with("HTTP/1.1 200 Fine Thanks\n"), "{got}");
    assert!(got.ends_with("\n\nok"), "{got}");
    let got = curl(&["-I"], "/head");
    assert!(got.starts_with("HTTP/1.1 200 OK\n"), "{got}");
    assert!(got.contains("\ncontent-length: 100\n"), "{got}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one kept connection so far"
    );
    let got = curl(&[], "/eof");
    assert!(
        got.ends_with("\n\nD\nuntil the end\n0\n\n"),
        "read to the upstream's close, sent on chunked: {got}"
    );
    let got = curl(&[], "/early");
    assert!(got.ends_with("\n\nok"), "{got}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a response read to the connection's close leaves it closed"
    );
    let got = curl(&[], "/two-lengths");
    assert!(
        got.starts_with("HTTP/1.1 502") && got.contains("\nx-wasmesh-flags: UR\n"),
        "differing Content-Length refused: {got}"
    );
    assert!(!got.contains("xx"), "{got}");
}

/// The proxy serves plain HTTP/1.1 requests (no body, no upgrade) on its
/// own loop and hands a connection to hyper at its first other request:
/// one kept connection carries pipelined GETs, then a POST with a body,
/// then GETs again, each answered in order and whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_connection_serves_plain_requests_then_bodies_then_plain_again_in_order() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&services(&up)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    // Two requests in one write: both answered, in order.
    s.write_all(
        b"GET /one HTTP/1.1\r\nhost: reviews\r\n\r\nHEAD /two HTTP/1.1\r\nhost: reviews\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(body.contains(r#""path":"/one""#), "{body}");
    // HEAD: the length of the body a GET would get, and no body (the next
    // response starts right after the head).
    let head = read_response_head_only(&mut s).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: "), "{head}");
    // A body: hyper's from here on, on the same connection.
    s.write_all(b"POST /three HTTP/1.1\r\nhost: reviews\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(body.contains(r#""path":"/three""#), "{body}");
    s.write_all(b"GET /four HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(body.contains(r#""path":"/four""#), "{body}");
    assert_eq!(up.hits(), 4);

    // `Connection: close` on the own loop: answered with it, then closed.
    let r = raw(
        &proxy,
        b"GET /five HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("\r\nconnection: close\r\n"), "{r}");
    assert!(r.contains(r#""path":"/five""#), "{r}");
}

/// One response head from `s` (a response to `HEAD`: no body follows).
async fn read_response_head_only(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(n > 0, "the proxy closed the connection after: {got:?}");
        got.push(byte[0]);
    }
    String::from_utf8_lossy(&got).to_lowercase()
}
