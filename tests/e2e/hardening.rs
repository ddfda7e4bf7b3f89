//! Hostile clients: oversized heads, slowloris, idle connections, a flood
//! of connections, HTTP/2 reset floods. Each is answered or cut, and the
//! proxy keeps serving everyone else.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Read until EOF (or `limit`), returning what came and when it ended.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&got).into(), Some(t.elapsed()));
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), None),
        }
    }
}

/// Send a raw HTTP/1.1 request and return the first response's text (head
/// and whatever body came with it).
async fn raw(proxy: &Proxy, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(request).await.unwrap();
    read_to_close(&mut s, Duration::from_secs(10)).await.0
}

fn get_with_headers(n: usize, each: usize) -> Vec<u8> {
    let mut r = b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n".to_vec();
    for i in 0..n {
        r.extend_from_slice(format!("x-h{i}: {}\r\n", "a".repeat(each)).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_get_431_and_never_reach_the_upstream() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    // Defaults: 100 headers, 60 KiB of head. host + connection + 98 = 100.
    let ok = raw(&proxy, &get_with_headers(98, 10)).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(up.hits(), 1);
    let many = raw(&proxy, &get_with_headers(99, 10)).await;
    assert!(many.starts_with("HTTP/1.1 431"), "{many}");
    let big = raw(&proxy, &get_with_headers(1, 70 * 1024)).await;
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    assert_eq!(up.hits(), 1, "nothing oversized was forwarded");
    // The proxy still serves.
    assert_eq!(via(&proxy, "reviews", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_and_idle_connections_are_closed_by_their_timeouts() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&format!(
        "downstream: {{ header-read-timeout: 500ms, idle-timeout: 1s }}\nservices:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    // Slowloris: half a head, then nothing. Closed after the header-read
    // timeout (bounded here at 10× it).
    let mut slow = TcpStream::connect(proxy.listen).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: revi")
        .await
        .unwrap();
    let (_, closed) = read_to_close(&mut slow, Duration::from_secs(10)).await;
    let closed = closed.expect("a slowloris connection was left open for 10 s");
    assert!(
        closed >= Duration::from_millis(400) && closed < Duration::from_secs(5),
        "closed after {closed:?} (header-read-timeout 500ms)"
    );
    // Slow head trickled byte by byte: the timeout bounds the whole head,
    // not the gap between bytes.
    let mut trickle = TcpStream::connect(proxy.listen).await.unwrap();
    let t = Instant::now();
    let head = b"GET / HTTP/1.1\r\nhost: reviews\r\nx-slow: yes\r\n\r\n";
    let mut cut = false;
    for b in head {
        if trickle.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (text, closed) = read_to_close(&mut trickle, Duration::from_secs(10)).await;
    assert!(
        cut || closed.is_some() && !text.starts_with("HTTP/1.1 200"),
        "a head trickled over {:?} was served: {text}",
        t.elapsed()
    );
    assert_eq!(up.hits(), 0);

    // Idle keep-alive connection: one request, then silence. This proxy's
    // header-read timeout (500ms) would also close it; the idle timeout is
    // shown alone below.
    let proxy = Proxy::start(&format!(
        "downstream: {{ idle-timeout: 1s }}\nservices:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    let mut idle = TcpStream::connect(proxy.listen).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let (text, closed) = read_to_close(&mut idle, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let closed = closed.expect("an idle connection was left open for 10 s");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(5),
        "closed after {:?} (idle-timeout 1s)",
        t.elapsed()
    );
    proxy
        .metrics_containing(r#"wasmesh_downstream_closed_total{reason="idle"} 1"#)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_connection_cap_a_client_gets_503_at_once_and_the_slot_comes_back() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&format!(
        "downstream: {{ max-connections: 3 }}\nservices:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(proxy.listen).await.unwrap());
    }
    // The three are accepted (and counted) before the fourth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let mut fourth = TcpStream::connect(proxy.listen).await.unwrap();
    let _ = fourth
        .write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await;
    let (text, closed) = read_to_close(&mut fourth, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains("x-wasmesh-flags: UO"), "{text}");
    assert!(closed.is_some(), "the refused connection was not closed");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        t.elapsed()
    );
    assert_eq!(up.hits(), 0);
    proxy
        .metrics_containing(r#"wasmesh_downstream_closed_total{reason="overflow"} 1"#)
        .await;
    // One held connection goes away: its slot is free again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = raw(
            &proxy,
            b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n",
        )
        .await;
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy
        .metrics_containing("wasmesh_downstream_connections 2")
        .await;
}
