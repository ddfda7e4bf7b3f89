//! Test support: a real `wasmesh proxy` process, real upstream servers on
//! 127.0.0.1, real HTTP/1.1 and h2c clients.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The `wasmesh` binary under test.
pub const WASMESH: &str = env!("CARGO_BIN_EXE_wasmesh");

/// A port that was free a moment ago, for a proxy to listen on.
///
/// Taken below Linux's ephemeral range (32768–60999), so that no outgoing
/// connection of a concurrent test can take it between this check and the
/// proxy's bind (with port 0 it could, and did, under load). Ports are
/// handed out in turn from a per-process starting point; each is checked
/// free before it is given.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
    let start = (std::process::id() * 97) % SPAN;
    let _ = NEXT.compare_exchange(
        usize::MAX,
        start as usize,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) as u32;
        let port = (LOW + n % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running proxy process, killed on drop.
pub struct Proxy {
    child: Child,
    /// Outbound listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Directory holding the config (and anything the test puts there).
    pub dir: tempfile::TempDir,
    /// The proxy's stderr log.
    pub log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mesh file header for these ports; the test appends `services:`.
pub fn header(listen: SocketAddr, admin: SocketAddr) -> String {
    format!("admin: {admin}\nlisten: {listen}\n")
}

impl Proxy {
    /// Write `services_yaml` (everything after the listener lines) to a mesh
    /// file and start a proxy on fresh ports; waits for `/ready`.
    pub async fn start(services_yaml: &str) -> Proxy {
        Self::start_with(services_yaml, &[]).await
    }

    /// Like [`Proxy::start`], with extra CLI arguments (e.g. `--watch`).
    pub async fn start_with(services_yaml: &str, args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, services_yaml, args).await
    }

    /// Start in a prepared directory.
    pub async fn start_in(dir: tempfile::TempDir, services_yaml: &str, args: &[&str]) -> Proxy {
        Self::start_binary(Path::new(WASMESH), dir, services_yaml, args).await
    }

    /// Start `binary` (a copy of the one under test) in a prepared directory.
    pub async fn start_binary(
        binary: &Path,
        dir: tempfile::TempDir,
        services_yaml: &str,
        args: &[&str],
    ) -> Proxy {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("mesh.yaml");
        std::fs::write(
            &config,
            format!("{}{}", header(listen, admin), services_yaml),
        )
        .unwrap();
        let log = dir.path().join("proxy.log");
        // Two workers (tokio's multi-threaded scheduler) unless a test asks
        // for one (its current-thread scheduler, what benches/compare runs).
        let workers: &[&str] = if args.contains(&"--workers") {
            &[]
        } else {
            &["--workers", "2"]
        };
        let child = Command::new(binary)
            .args(["proxy", "--config"])
            .arg(&config)
            .args(workers)
            .args(args)
            .env("RUST_LOG", "info,wasmesh=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Proxy {
            child,
            listen,
            admin,
            dir,
            log,
        };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("proxy exited with {status}:\n{}", self.log_text());
            }
            if let Ok(r) = get(&format!("http://{}/ready", self.admin)).await
                && r.status == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("proxy not ready after 60s:\n{}", self.log_text());
    }

    /// The mesh file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    /// Rewrite the mesh file (services part), atomically.
    pub fn rewrite(&self, services_yaml: &str) {
        let tmp = self.dir.path().join(".mesh.yaml.tmp");
        std::fs::write(
            &tmp,
            format!("{}{}", header(self.listen, self.admin), services_yaml),
        )
        .unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    /// The proxy's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /config`, parsed.
    pub async fn config(&self) -> serde_json::Value {
        let r = get(&format!("http://{}/config", self.admin)).await.unwrap();
        serde_json::from_slice(&r.body).unwrap()
    }

    /// The service `name` in `GET /config`, when there is one.
    pub async fn service_config(&self, name: &str) -> Option<serde_json::Value> {
        let cfg = self.config().await;
        cfg["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let r = get(&format!("http://{}/metrics", self.admin))
            .await
            .unwrap();
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// Wait (up to 5 s) until `/metrics` contains `line`, and return the text.
    /// Request metrics are recorded when the response body ends, which can be
    /// a moment after the client has read it.
    pub async fn metrics_containing(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics().await;
            if m.contains(line) {
                return m;
            }
            if Instant::now() > deadline {
                panic!("/metrics never contained {line}:\n{m}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait (up to 5 s) until the sample of `name` with `labels` is
    /// `value`, and return the scrape; panics with what it last was.
    pub async fn wait_sample(&self, name: &str, labels: &[(&str, &str)], value: f64) -> String {
        self.wait_sample_within(name, labels, value, Duration::from_secs(5))
            .await
    }

    /// [`Proxy::wait_sample`], waiting up to `within`.
    pub async fn wait_sample_within(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        value: f64,
        within: Duration,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let m = self.metrics().await;
            let got = sample(&m, name, labels);
            if got == Some(value) {
                return m;
            }
            if Instant::now() > deadline {
                panic!("{name}{labels:?} is {got:?}, not {value}:\n{m}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait (up to 5 s) until the samples of `name` with `labels` add up
    /// to `value` (several series may match).
    pub async fn wait_sum(&self, name: &str, labels: &[(&str, &str)], value: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics().await;
            let got = samples(&m, name, labels).iter().sum::<f64>();
            if got == value {
                return m;
            }
            if Instant::now() > deadline {
                panic!("{name}{labels:?} adds up to {got}, not {value}:\n{m}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size of the proxy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }

    /// Send SIGTERM and return at once.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    /// Wait until `/config` reports `version`.
    pub async fn wait_version(&self, version: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.config().await["version"] == version {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "config version {version} never came: {}\n{}",
            self.config().await,
            self.log_text()
        );
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Got {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Got {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn client(h2: bool) -> Client<HttpConnector, Full<Bytes>> {
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2);
    b.build_http()
}

/// A shared HTTP/1.1 client.
pub fn http1() -> &'static Client<HttpConnector, Full<Bytes>> {
    static C: std::sync::OnceLock<Client<HttpConnector, Full<Bytes>>> = std::sync::OnceLock::new();
    C.get_or_init(|| client(false))
}

/// Send a request and read the response whole.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Got, String> {
    let r = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok(Got {
        status,
        headers,
        body,
    })
}

/// `GET url`.
pub async fn get(url: &str) -> Result<Got, String> {
    send(http1(), Request::get(url).body(Full::default()).unwrap()).await
}

/// `GET http://{proxy}{path}` with `Host: host` (HTTP/1.1).
pub async fn via(proxy: &Proxy, host: &str, path: &str) -> Got {
    let req = Request::get(format!("http://{}{path}", proxy.listen))
        .header("host", host)
        .body(Full::default())
        .unwrap();
    send(http1(), req).await.unwrap()
}

/// What an upstream does with a request.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// A real HTTP server (HTTP/1.1 and h2c on one port) on 127.0.0.1.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Requests it received.
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// An upstream that answers 200 with its `name` in `x-upstream` and the
    /// request's headers as a JSON object.
    pub async fn echo(name: &str) -> Upstream {
        let name = name.to_string();
        Self::start(Arc::new(move |req| {
            let headers: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            let body = serde_json::json!({
                "upstream": name,
                "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            Response::builder()
                .header("x-upstream", name.as_str())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        }))
        .await
    }

    /// An upstream that answers with `handler`.
    pub async fn start(handler: Handler) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (handler, hits) = (handler.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let resp = handler(&req);
                        async move {
                            // Read the body so the connection stays reusable.
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // Above the proxy's own limits, so that the proxy's are what a test meets.
                    b.http1().max_headers(1000).max_buf_size(1 << 20);
                    let _ = b
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, hits, task }
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A raw TCP upstream on 127.0.0.1, for behaviour no well-behaved server
/// shows: every accepted connection is handed to `serve`.
pub async fn raw_upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s));
            }
        }
    });
    addr
}

/// Read one request head (through its empty line) from `s`; `None` when the
/// connection ends first. Bytes after the head are dropped.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Copy a file into a directory under a new name.
pub fn copy_into(src: &str, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// Write bytes to a file atomically (write a temp file, rename over).
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Read until EOF (or `limit`), returning what came and when it ended.
pub async fn read_to_close(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (String, Option<Duration>) {
    use tokio::io::AsyncReadExt;
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
pub async fn raw(proxy: &Proxy, request: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(request).await.unwrap();
    read_to_close(&mut s, Duration::from_secs(10)).await.0
}

impl Upstream {
    /// An upstream that always answers `code`, naming itself in `x-upstream`.
    pub async fn answering(name: &'static str, code: u16) -> Upstream {
        Upstream::start(Arc::new(move |_req| {
            Response::builder()
                .status(code)
                .header("x-upstream", name)
                .body(Full::new(Bytes::from_static(b"-\n")))
                .unwrap()
        }))
        .await
    }

    /// An upstream that fails every other request with 503.
    pub async fn flaky() -> Upstream {
        let n = Arc::new(AtomicUsize::new(0));
        Upstream::start(Arc::new(move |_req| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            let code = if i.is_multiple_of(2) { 503 } else { 200 };
            Response::builder()
                .status(code)
                .body(Full::new(Bytes::from_static(b"flaky\n")))
                .unwrap()
        }))
        .await
    }
}

/// A raw HTTP/1.1 upstream that answers each request `200 slow` only after
/// `delay`, and counts the request heads it has received: a test waits on
/// [`Slow::wait_arrived`] to know a request is in flight.
pub struct Slow {
    /// Its address.
    pub addr: SocketAddr,
    arrived: Arc<(AtomicUsize, tokio::sync::Notify)>,
}

impl Slow {
    /// Start one.
    pub async fn start(delay: Duration) -> Slow {
        let arrived = Arc::new((AtomicUsize::new(0), tokio::sync::Notify::new()));
        let a = arrived.clone();
        let addr = raw_upstream(move |mut s| {
            let a = a.clone();
            async move {
                use tokio::io::AsyncWriteExt;
                while read_head(&mut s).await.is_some() {
                    a.0.fetch_add(1, Ordering::SeqCst);
                    a.1.notify_waiters();
                    tokio::time::sleep(delay).await;
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nslow\n";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            }
        })
        .await;
        Slow { addr, arrived }
    }

    /// Request heads received so far.
    pub fn arrived(&self) -> usize {
        self.arrived.0.load(Ordering::SeqCst)
    }

    /// Wait (up to 10 s) until `n` request heads have arrived.
    pub async fn wait_arrived(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.arrived.1.notified();
            if self.arrived() >= n {
                return;
            }
            assert!(
                tokio::time::timeout_at(deadline.into(), notified)
                    .await
                    .is_ok(),
                "only {} of {n} requests reached the upstream",
                self.arrived()
            );
        }
    }
}

/// Start sending `GET http://{proxy}{path}` (Host `host`) and give up after
/// `after`: the client goes away with the request in flight. Returns when it
/// has given up.
pub async fn abandon(proxy: &Proxy, host: &str, path: &str, after: Duration) {
    let req = Request::get(format!("http://{}{path}", proxy.listen))
        .header("host", host)
        .body(Full::default())
        .unwrap();
    // A client of its own, so that giving up closes its connection.
    let client = client(false);
    let r = tokio::time::timeout(after, send(&client, req)).await;
    assert!(
        r.is_err(),
        "the request was answered before {after:?}: {r:?}"
    );
}

/// The log lines a proxy wrote from `offset` on (an offset taken with
/// `proxy.log_text().len()` before the step under test).
pub fn log_since(proxy: &Proxy, offset: usize) -> String {
    proxy
        .log_text()
        .get(offset..)
        .unwrap_or_default()
        .to_string()
}

/// Send an h2c request over a connection to `addr`, whatever its URI says.
pub async fn send_h2_to(addr: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let r = sender.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body,
    }
}

/// A running `wasmesh control`, killed on drop.
pub struct Control {
    child: Child,
    /// gRPC listener.
    pub listen: SocketAddr,
    /// gRPC TLS listener.
    pub tls: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Its data directory (kept across restarts).
    pub data: PathBuf,
    /// Its log (appended to across restarts).
    pub log: PathBuf,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Control {
    /// Start control on fresh ports with its data in `data` (created).
    pub async fn start(data: &Path) -> Control {
        let listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_on(data, listen, admin).await
    }

    /// Start control on these ports (a fresh one for TLS).
    pub async fn start_on(data: &Path, listen: SocketAddr, admin: SocketAddr) -> Control {
        let tls = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_with(data, [listen, tls, admin], &[]).await
    }

    /// Start control on fresh ports with extra flags (`--cert-ttl` ...).
    pub async fn start_args(data: &Path, args: &[&str]) -> Control {
        let port = || format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_with(data, [port(), port(), port()], args).await
    }

    /// Start control on `[listen, tls, admin]` with extra flags.
    pub async fn start_with(data: &Path, ports: [SocketAddr; 3], args: &[&str]) -> Control {
        let [listen, tls, admin] = ports;
        let log = data.with_extension("log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(WASMESH)
            .args(["control", "--listen", &listen.to_string()])
            .args(["--admin", &admin.to_string(), "--data-dir"])
            .arg(data)
            .args(["--endpoint-grace", "60s"])
            .args(["--listen-tls", &tls.to_string()])
            .args(args)
            .env("RUST_LOG", "info,wasmesh=debug")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut c = Control {
            child,
            listen,
            tls,
            admin,
            data: data.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.child.try_wait().unwrap() {
                panic!("control exited with {status}:\n{}", c.log_text());
            }
            if let Ok(r) = get(&format!("http://{admin}/ready")).await
                && r.status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "control not ready:\n{}",
                c.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c
    }

    /// `http://LISTEN`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// `https://TLS`: where proxies with join tokens reach it.
    pub fn tls_url(&self) -> String {
        format!("https://{}", self.tls)
    }

    /// `wasmesh token create --service SERVICE ARGS...`: the token.
    pub fn token(&self, service: &str, args: &[&str]) -> String {
        let mut all = vec!["token", "create", "--service", service];
        all.extend_from_slice(args);
        let (code, out, err) = self.cli(&all);
        assert_eq!(code, 0, "token create: {out}{err}");
        assert_eq!(out.lines().count(), 1, "the token alone on stdout: {out:?}");
        out.trim().to_string()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Run the CLI against this control, with its admin token: (exit code,
    /// stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli_with(
            &self.url(),
            Some(&self.data.join("admin.token")),
            args,
            None,
        )
    }

    /// Like [`Control::cli`], with `stdin` fed to the command.
    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        cli_with(
            &self.url(),
            Some(&self.data.join("admin.token")),
            args,
            Some(stdin),
        )
    }

    /// `wasmesh push FILE --name NAME --version VERSION`; panics unless it
    /// succeeds.
    pub fn push(&self, file: &str, name: &str, version: &str) {
        let (code, out, err) = self.cli(&["push", file, "--name", name, "--version", version]);
        assert_eq!(code, 0, "push: {out}{err}");
        assert!(out.starts_with(&format!("{name}@{version} ")), "{out}");
    }

    /// `wasmesh apply -f -` of `yaml`; panics unless it succeeds.
    pub fn apply(&self, yaml: &str) {
        let (code, out, err) = self.cli_stdin(&["apply", "-f", "-"], yaml);
        assert_eq!(code, 0, "apply failed: {out}{err}\n{yaml}");
    }

    /// `wasmesh status --wait`; panics unless every proxy ACKed.
    pub fn wait_rollout(&self) {
        let (code, out, err) = self.cli(&["status", "--wait", "--timeout", "60s"]);
        assert_eq!(code, 0, "status --wait: {out}{err}\n{}", self.log_text());
    }

    /// `get proxies -o json`, parsed.
    pub fn proxies(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.cli(&["get", "proxies", "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    /// Wait until `n` proxies are connected.
    pub async fn wait_proxies(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = self.proxies();
            if p.len() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {} proxies connected: {p:?}",
                p.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Run the CLI against `control` with `token` (if any).
pub fn cli_with(
    control: &str,
    token: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> (i32, String, String) {
    let mut cmd = Command::new(WASMESH);
    cmd.args(args)
        .env("WASMESH_CONTROL", control)
        .env_remove("WASMESH_ADMIN_TOKEN_FILE")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = token {
        cmd.env("WASMESH_ADMIN_TOKEN_FILE", t);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Proxy {
    /// Start a sidecar of the control plane at `control` for `service` and
    /// its `subset`, on fresh ports; `args` adds flags (`--app`,
    /// `--compile-cache` ...). Waits for `/ready`.
    pub async fn start_control(control: &str, service: &str, subset: &str, args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        Self::start_control_in(dir, control, service, subset, args).await
    }

    /// A sidecar with a mesh identity: `token` in a file of its directory,
    /// control's TLS listener, its compile cache (and identity) in
    /// `DIR/cache`.
    pub async fn start_mesh(control: &Control, service: &str, token: &str, args: &[&str]) -> Proxy {
        Self::start_mesh_as(control, service, "v1", token, args).await
    }

    /// [`Proxy::start_mesh`] for the subset `subset`.
    pub async fn start_mesh_as(
        control: &Control,
        service: &str,
        subset: &str,
        token: &str,
        args: &[&str],
    ) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, token).unwrap();
        let cache = dir.path().join("cache");
        let mut all = vec![
            "--token-file".to_string(),
            file.to_string_lossy().into_owned(),
            "--compile-cache".to_string(),
            cache.to_string_lossy().into_owned(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Self::start_control_in(dir, &control.tls_url(), service, subset, &all).await
    }

    /// [`Proxy::start_control`] in a prepared directory (its log goes there).
    pub async fn start_control_in(
        dir: tempfile::TempDir,
        control: &str,
        service: &str,
        subset: &str,
        args: &[&str],
    ) -> Proxy {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.path().join(format!("proxy-{}.log", listen.port()));
        let child = Command::new(WASMESH)
            .args(["proxy", "--control", control, "--service", service])
            .args([
                "--subset",
                subset,
                "--instance",
                &format!("{service}-{}", listen.port()),
            ])
            .args([
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .args(["--workers", "1"])
            .args(args)
            .env("RUST_LOG", "info,wasmesh=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Proxy {
            child,
            listen,
            admin,
            dir,
            log,
        };
        p.wait_ready().await;
        p
    }
}

/// The value of the one sample of `name` whose labels include every one of
/// `labels` in a Prometheus text scrape; `None` when there is none, a panic
/// when several match (the test must name the series exactly).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found = samples(text, name, labels);
    assert!(
        found.len() <= 1,
        "{name}{labels:?} matches {} series:\n{text}",
        found.len()
    );
    found.first().copied()
}

/// The values of every sample of `name` whose labels include `labels`.
pub fn samples(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels.iter().all(|(k, v)| {
                ["{", ","]
                    .iter()
                    .any(|b| l.contains(&format!("{b}{k}=\"{v}\"")))
            })
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// What `promtool check metrics` (Debian's prometheus package; `.ci/run`
/// installs it) says of a scrape, but for its base-unit advice on Istio's
/// `istio_request_duration_milliseconds`, which Istio's dashboards need as
/// it is.
pub fn promtool_complaints(text: &str) -> Vec<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let complaints: Vec<String> = said
        .lines()
        .filter(|l| {
            !(l.starts_with("istio_request_duration_milliseconds")
                && l.contains("use base unit \"seconds\""))
        })
        .map(str::to_string)
        .collect();
    assert!(
        out.status.success() || !complaints.is_empty() || said.contains("base unit"),
        "promtool failed with nothing to say: {said}"
    );
    complaints
}

/// Continuous load: `GET /` with `Host: host` through each of `targets`,
/// `per_target` requests at a time, until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Start it.
    pub fn start(targets: &[SocketAddr], host: &'static str, per_target: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for &target in targets.iter().cycle().take(targets.len() * per_target) {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let req = Request::get(format!("http://{target}/"))
                        .header("host", host)
                        .body(Full::default())
                        .unwrap();
                    match send(http1(), req).await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            failed
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", r.status, r.body_text()))
                        }
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Wait until `n` more requests were answered 200 (the load is flowing).
    pub async fn wait_more(&self, n: usize) {
        let before = self.ok();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ok() < before + n {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop it: (answered 200, every failure).
    pub async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failed)
    }
}
