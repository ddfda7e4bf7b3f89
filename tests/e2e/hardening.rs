//! Hostile clients: oversized heads, slowloris, idle connections, a flood
//! of connections, HTTP/2 reset floods. Each is answered or cut, and the
//! proxy keeps serving everyone else.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

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

    // HTTP/2: a 70 KiB header is a stream error (or a 431), never forwarded.
    let stream = TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_header_list_size(1 << 20)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://reviews/")
        .header("x-big", "a".repeat(70 * 1024))
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    match sender.send_request(req).await {
        Err(_) => {}
        Ok(r) => assert_eq!(r.status(), 431),
    }
    assert_eq!(up.hits(), 1, "nothing oversized was forwarded over HTTP/2");
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

    // A slow body: the head, one byte of ten, then nothing. The idle
    // timeout closes it too.
    let mut body = TcpStream::connect(proxy.listen).await.unwrap();
    body.write_all(b"POST / HTTP/1.1\r\nhost: reviews\r\ncontent-length: 10\r\n\r\nx")
        .await
        .unwrap();
    let t = Instant::now();
    let (_, closed) = read_to_close(&mut body, Duration::from_secs(10)).await;
    let closed = closed.expect("a stalled body was left open for 10 s");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(5),
        "closed after {:?} (idle-timeout 1s)",
        t.elapsed()
    );
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
    proxy
        .metrics_containing("wasmesh_downstream_connections 3")
        .await;
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

/// An HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// HPACK for `GET http://reviews/`: indexed :method GET, :scheme http,
/// :path /, and :authority as a literal with an indexed name.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 7];
    b.extend_from_slice(b"reviews");
    b
}

/// Read frames until a GOAWAY or EOF (true), or `limit` passes (false).
async fn goaway_or_close(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == GOAWAY {
                return true;
            }
            buf.drain(..9 + len);
        }
    }
}

/// The first byte of the first response HEADERS block on stream 1 (0x88 is
/// HPACK's indexed `:status: 200`), or None on GOAWAY / close.
async fn response_status_byte(s: &mut TcpStream) -> Option<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            match buf[3] {
                HEADERS if buf[8] == 1 => return buf.get(9).copied(),
                GOAWAY => return None,
                _ => {}
            }
            buf.drain(..9 + len);
        }
    }
}

async fn h2_connect(proxy: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_floods_are_cut_and_other_clients_are_unaffected() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    let rss_before = proxy.rss_kib();

    // The raw frames are right: one GET on its own is answered 200.
    let mut s = h2_connect(&proxy).await;
    s.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_block()))
        .await
        .unwrap();
    assert_eq!(
        response_status_byte(&mut s).await,
        Some(0x88),
        "HPACK :status 200"
    );
    drop(s);

    // Rapid reset (CVE-2023-44487): open and cancel streams as fast as
    // possible. The connection gets GOAWAY or is closed.
    let mut s = h2_connect(&proxy).await;
    let block = get_block();
    let mut batch = Vec::new();
    let mut cut = false;
    for i in 0..20_000u32 {
        let id = 2 * i + 1;
        batch.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        if batch.len() > 32 * 1024 {
            if s.write_all(&batch).await.is_err() {
                cut = true;
                break;
            }
            batch.clear();
        }
    }
    assert!(
        cut || goaway_or_close(&mut s, Duration::from_secs(10)).await,
        "a rapid-reset connection was neither sent GOAWAY nor closed"
    );
    assert_eq!(via(&proxy, "reviews", "/").await.status, 200);

    // CONTINUATION flood: a header block that never ends.
    let mut s = h2_connect(&proxy).await;
    let mut cut = false;
    if s.write_all(&frame(HEADERS, END_STREAM, 1, &block))
        .await
        .is_err()
    {
        cut = true;
    }
    let mut lit = vec![0x00, 3];
    lit.extend_from_slice(b"x-a");
    lit.push(100);
    lit.extend_from_slice(&[b'a'; 100]);
    let cont: Vec<u8> = std::iter::repeat_n(lit, 80).flatten().collect();
    for _ in 0..10_000 {
        if cut
            || s.write_all(&frame(CONTINUATION, 0, 1, &cont))
                .await
                .is_err()
        {
            cut = true;
            break;
        }
    }
    assert!(
        cut || goaway_or_close(&mut s, Duration::from_secs(10)).await,
        "a CONTINUATION flood was neither sent GOAWAY nor closed"
    );
    assert_eq!(via(&proxy, "reviews", "/").await.status, 200);

    // PING and SETTINGS floods from a client that never reads: memory stays
    // bounded, other clients are served.
    let mut floods = Vec::new();
    for kind in [PING, SETTINGS] {
        let mut s = h2_connect(&proxy).await;
        floods.push(tokio::spawn(async move {
            let f = if kind == PING {
                frame(PING, 0, 0, &[7u8; 8])
            } else {
                frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])
            };
            let batch: Vec<u8> = std::iter::repeat_n(f, 2000).flatten().collect();
            for _ in 0..200 {
                let w = tokio::time::timeout(Duration::from_secs(2), s.write_all(&batch)).await;
                if !matches!(w, Ok(Ok(()))) {
                    break;
                }
            }
            s
        }));
    }
    for _ in 0..20 {
        assert_eq!(via(&proxy, "reviews", "/").await.status, 200);
    }
    let _held: Vec<TcpStream> = futures_join(floods).await;
    let rss_after = proxy.rss_kib();
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB under h2 floods"
    );
    assert_eq!(via(&proxy, "reviews", "/").await.status, 200);
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<TcpStream>>) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn smuggling_shapes_get_400_and_nothing_is_forwarded() {
    let up = Upstream::echo("v1").await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up.addr
    ))
    .await;
    let cases: &[(&str, &str)] = &[
        (
            "CL then TE",
            "content-length: 5\r\ntransfer-encoding: chunked\r\n",
        ),
        (
            "TE then CL",
            "transfer-encoding: chunked\r\ncontent-length: 5\r\n",
        ),
        (
            "identical duplicate CL",
            "content-length: 5\r\ncontent-length: 5\r\n",
        ),
        (
            "conflicting CL",
            "content-length: 5\r\ncontent-length: 6\r\n",
        ),
        ("CL list", "content-length: 5, 5\r\n"),
        ("signed CL", "content-length: +5\r\n"),
        ("obfuscated TE", "transfer-encoding: xchunked\r\n"),
        ("TE list", "transfer-encoding: chunked, identity\r\n"),
        (
            "TE twice",
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
        ),
        ("unknown TE", "transfer-encoding: gzip\r\n"),
        (
            "TE with a space before the colon",
            "transfer-encoding : chunked\r\n",
        ),
        ("TE folded", "transfer-encoding:\r\n chunked\r\n"),
        ("TE on HTTP/1.0", "transfer-encoding: chunked\r\n"),
    ];
    let mut failures = Vec::new();
    for (name, headers) in cases {
        let version = if *name == "TE on HTTP/1.0" {
            "1.0"
        } else {
            "1.1"
        };
        let req = format!(
            "POST / HTTP/{version}\r\nhost: reviews\r\n{headers}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: reviews\r\n\r\n"
        );
        let mut s = TcpStream::connect(proxy.listen).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let (text, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
        let status = text.get(9..12).unwrap_or("---");
        let ok = matches!(status, "400" | "501")
            && closed.is_some()
            && text.matches("HTTP/1.1 ").count() == 1;
        if !ok {
            failures.push(format!(
                "{name}: {status}, closed {closed:?}, {} responses",
                text.matches("HTTP/1.1 ").count()
            ));
        }
    }
    // The same with bare-LF line endings, which hyper accepts too.
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\nhost: reviews\ncontent-length: 5\ntransfer-encoding: chunked\n\n0\r\n\r\nGET /smuggled HTTP/1.1\nhost: reviews\n\n")
        .await
        .unwrap();
    let (text, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    if !(text.starts_with("HTTP/1.1 400") && closed.is_some()) {
        failures.push(format!("bare LF: {text}"));
    }
    assert!(failures.is_empty(), "not refused: {failures:#?}");
    assert_eq!(up.hits(), 0, "a smuggling shape was forwarded");
    assert_eq!(via(&proxy, "reviews", "/").await.status, 200);
}

/// A hostile upstream, by path: `/rst` resets before answering,
/// `/truncated` promises 100 bytes and resets after 5, `/endless` streams a
/// chunked body until its writes fail (then sets `ended`).
async fn hostile_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let ended = Arc::new(AtomicBool::new(false));
    let e = ended.clone();
    let addr = raw_upstream(move |mut s| {
        let ended = e.clone();
        async move {
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            let line = head.lines().next().unwrap_or_default();
            if line.contains("/rst") {
                let _ = s.set_zero_linger();
            } else if line.contains("/truncated") {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = s.set_zero_linger();
            } else if line.contains("/endless") {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                while s.write_all(chunk.as_bytes()).await.is_ok() {}
                ended.store(true, Ordering::SeqCst);
            }
        }
    })
    .await;
    (addr, ended)
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_faults_before_the_head_get_flagged_replies_and_after_it_cut_the_stream() {
    use http_body_util::BodyExt;
    let (addr, ended) = hostile_upstream().await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    endpoints: {{ v1: [\"{addr}\"] }}\n"
    ))
    .await;
    let rss_before = proxy.rss_kib();

    // Reset before any response: a clean 502 UR.
    let r = via(&proxy, "reviews", "/rst").await;
    assert_eq!((r.status, r.header("x-wasmesh-flags")), (502, Some("UR")));

    // Reset after the head: the client's stream is cut, never a silently
    // short body; counted as 200 UR.
    let req = http::Request::get(format!("http://{}/truncated", proxy.listen))
        .header("host", "reviews")
        .body(http_body_util::Full::default())
        .unwrap();
    match send(http1(), req).await {
        Err(_) => {}
        Ok(got) => panic!("a truncated body reached the client as complete: {got:?}"),
    }
    proxy
        .metrics_containing(r#"wasmesh_requests_total{destination_service="reviews",response_code="200",response_flags="UR"} 1"#)
        .await;

    // An endless body: the client reads 8 MiB and goes away; the proxy lets
    // go of the upstream (its writes start failing) and its memory stays flat.
    let req = http::Request::get(format!("http://{}/endless", proxy.listen))
        .header("host", "reviews")
        .body(http_body_util::Full::default())
        .unwrap();
    let resp = http1().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut read = 0usize;
    while read < 8 << 20 {
        let f = body.frame().await.unwrap().unwrap();
        read += f.data_ref().map_or(0, |d| d.len());
    }
    let rss_streaming = proxy.rss_kib();
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ended.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the upstream kept streaming to nobody"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rss_streaming < rss_before + 32 * 1024,
        "RSS {rss_streaming} KiB while streaming (started at {rss_before} KiB)"
    );
    assert_eq!(
        via(&proxy, "reviews", "/rst").await.status,
        502,
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_breaks_after_forwarding_began_aborts_the_upstream_and_gets_400() {
    use std::sync::Arc;
    use tokio::sync::watch;
    // An upstream that reads the request body to its end, and says what it
    // has seen: the first chunk, then how the connection ended.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Seen {
        Nothing,
        FirstChunk,
        Ended { complete: bool },
    }
    let (tx, mut rx) = watch::channel(Seen::Nothing);
    let tx = Arc::new(tx);
    let addr = raw_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            // The whole stream, head and body: the body is what follows the
            // head's empty line.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let body_of = |got: &[u8]| {
                let text = String::from_utf8_lossy(got).into_owned();
                text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
            };
            loop {
                match s.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
                if body_of(&got).is_some_and(|b| b.contains("hello")) {
                    tx.send_if_modified(|v| {
                        let first = *v == Seen::Nothing;
                        if first {
                            *v = Seen::FirstChunk;
                        }
                        first
                    });
                }
            }
            let complete = body_of(&got).is_some_and(|b| b.ends_with("0\r\n\r\n"));
            let _ = tx.send(Seen::Ended { complete });
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    protocol: http1\n    endpoints: {{ v1: [\"{addr}\"] }}\n"
    ))
    .await;
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: reviews\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    // The first chunk is forwarded; then the framing breaks.
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|v| *v != Seen::Nothing),
    )
    .await
    .expect("the first chunk never reached the upstream")
    .unwrap();
    s.write_all(b"ZZ\r\nbroken\r\n0\r\n\r\n").await.unwrap();
    let (text, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed.is_some());
    let ended = *tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|v| matches!(v, Seen::Ended { .. })),
    )
    .await
    .expect("the upstream request was not aborted")
    .unwrap();
    assert_eq!(
        ended,
        Seen::Ended { complete: false },
        "the upstream saw a complete body"
    );
    proxy
        .metrics_containing(r#"response_code="400",response_flags="DPE"} 1"#)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_http2_stream_is_sent_again_transparently() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // An h2c upstream that refuses every other stream unprocessed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let seen = s.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let _ = respond.send_response(http::Response::new(()), true);
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    protocol: h2c\n    endpoints: {{ v1: [\"{addr}\"] }}\n"
    ))
    .await;
    // No retry plugin: the proxy itself sends a refused stream again.
    for _ in 0..5 {
        let r = via(&proxy, "reviews", "/").await;
        assert_eq!(r.status, 200, "{:?}", r.header("x-wasmesh-flags"));
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        10,
        "each request refused once, then served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_per_endpoint_connection_cap_a_request_gets_503_uo_at_once() {
    // An upstream that takes a second to answer (without blocking this
    // test's runtime): each request in flight holds an HTTP/1 connection.
    let up = raw_upstream(|mut s| async move {
        while read_head(&mut s).await.is_some() {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "upstream: {{ max-connections-per-endpoint: 2 }}\nservices:\n  reviews:\n    protocol: http1\n    endpoints: {{ v1: [\"{}\"] }}\n",
        up
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let listen = proxy.listen;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
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
    let (mut ok, mut overflow) = (0, 0);
    for t in tasks {
        let (status, flag, took) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(flag.as_deref(), Some("UO"));
                assert!(
                    took < Duration::from_millis(900),
                    "an overflow waited {took:?}"
                );
                overflow += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, overflow), (2, 3));
    // The connections are pooled, not lost: the next requests reuse them.
    assert_eq!(via(&proxy, "reviews", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_breaks_after_the_response_began_cuts_the_client_stream_and_is_counted() {
    // An upstream that answers at once with a streaming response and then
    // keeps reading the request body.
    let addr = raw_upstream(|mut s| async move {
        if read_head(&mut s).await.is_none() {
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await;
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let proxy = Proxy::start(&format!(
        "services:\n  reviews:\n    protocol: http1\n    endpoints: {{ v1: [\"{addr}\"] }}\n"
    ))
    .await;
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: reviews\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    // The response head (and its first chunk) arrive while the body is open.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no response head while the body was open")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // Now the body's framing breaks: the client's stream is cut (no final
    // chunk), and the request is counted as the client's fault.
    s.write_all(b"ZZ\r\nbroken\r\n0\r\n\r\n").await.unwrap();
    let (rest, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the client stream was not cut");
    assert!(
        !rest.contains("0\r\n\r\n"),
        "the response was completed: {rest}"
    );
    proxy
        .metrics_containing(r#"response_code="200",response_flags="DPE"} 1"#)
        .await;
}
