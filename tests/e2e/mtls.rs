//! Mesh identity and mTLS end to end: a real `wasmesh control` with its CA
//! (an operator's intermediate here, so the test can mint the certificates
//! bad clients hold), real sidecars that get certificates with join tokens,
//! and real TLS clients (`curl`, `openssl s_client`) and servers. Two
//! services talk over mTLS (a tap on the wire sees TLS, never HTTP), authz
//! decides on the caller's SPIFFE ID, every bad input is refused and
//! counted with the app seeing nothing, PERMISSIVE takes both, certificates
//! rotate under load with no failed request, and a proxy outlives control
//! on its certificate until that really expires.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const TD: &str = "cluster.local";

fn spiffe(service: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{service}")
}

/// An operator's CA: a root, and an intermediate under it that control
/// signs with (`--ca-cert/--ca-key/--ca-root`). The test keeps the keys, so
/// it can mint the certificates clients hold — good and bad.
struct OperatorCa {
    dir: tempfile::TempDir,
    mid: CertificateParams,
    mid_key: KeyPair,
    mid_pem: String,
}

impl OperatorCa {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.distinguished_name
            .push(rcgen::DnType::CommonName, "operator root");
        let root_cert = root.self_signed(&root_key).unwrap();
        let mid_key = KeyPair::generate().unwrap();
        let mut mid = CertificateParams::new(Vec::<String>::new()).unwrap();
        mid.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        mid.distinguished_name
            .push(rcgen::DnType::CommonName, "mesh intermediate");
        let mid_cert = mid
            .signed_by(&mid_key, &Issuer::new(root, &root_key))
            .unwrap();
        std::fs::write(dir.path().join("root.pem"), root_cert.pem()).unwrap();
        std::fs::write(dir.path().join("mid.pem"), mid_cert.pem()).unwrap();
        std::fs::write(dir.path().join("mid.key"), mid_key.serialize_pem()).unwrap();
        Self {
            mid_pem: mid_cert.pem(),
            dir,
            mid,
            mid_key,
        }
    }

    /// Control's flags for this CA.
    fn args(&self) -> Vec<String> {
        let p = |f: &str| self.dir.path().join(f).to_string_lossy().into_owned();
        vec![
            "--ca-cert".into(),
            p("mid.pem"),
            "--ca-key".into(),
            p("mid.key"),
            "--ca-root".into(),
            p("root.pem"),
        ]
    }

    /// A client certificate for `uri` under the intermediate (valid from
    /// `from` to `to`, years): `(leaf + intermediate PEM, key PEM)` files.
    fn leaf(&self, name: &str, uri: &str, years: Option<(i32, i32)>) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        if let Some((from, to)) = years {
            p.not_before = rcgen::date_time_ymd(from, 1, 1);
            p.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let cert = p
            .signed_by(&key, &Issuer::from_params(&self.mid, &self.mid_key))
            .unwrap();
        write_pair(
            self.dir.path(),
            name,
            &format!("{}{}", cert.pem(), self.mid_pem),
            &key,
        )
    }
}

fn write_pair(dir: &Path, name: &str, chain: &str, key: &KeyPair) -> (PathBuf, PathBuf) {
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, chain).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// A certificate for `uri` from a CA the mesh never heard of.
fn stranger(dir: &Path, uri: &str) -> (PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    let cert = p.signed_by(&key, &Issuer::new(ca, &ca_key)).unwrap();
    write_pair(
        dir,
        "stranger",
        &format!("{}{}", cert.pem(), ca_cert.pem()),
        &key,
    )
}

/// `curl` to `url` with a client certificate (or none): its exit code and
/// HTTP status ("000" when no response came).
fn curl(url: &str, cert: Option<&(PathBuf, PathBuf)>) -> (i32, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    let out = cmd.arg(url).output().expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `openssl s_client` to `addr` with no certificate, sending a request:
/// everything it printed.
fn s_client_without_cert(addr: SocketAddr) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-tls1_3",
            "-ign_eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

use std::io::Write as _;

/// A TCP relay that keeps what the client side sent: a capture of the wire
/// between two sidecars.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
}

impl Tap {
    async fn start(to: SocketAddr) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, n) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let seen = s.clone();
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let (mut ur, mut uw) = up.into_split();
                    let (mut dr, mut dw) = down.split();
                    let upward = async {
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match dr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            seen.lock().unwrap().extend_from_slice(&buf[..n]);
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = uw.shutdown().await;
                    };
                    let downward = async {
                        let _ = tokio::io::copy(&mut ur, &mut dw).await;
                        let _ = dw.shutdown().await;
                    };
                    tokio::join!(upward, downward);
                });
            }
        });
        Tap {
            addr,
            seen,
            connections,
        }
    }
}

/// Who the app was called by: the `x-forwarded-client-cert` values and
/// `x-forwarded-proto` of every request it received.
#[derive(Default)]
struct Callers {
    xfcc: Mutex<Vec<String>>,
    proto: Mutex<Vec<String>>,
}

/// An app that answers 200 and notes its callers.
async fn noting_app() -> (Upstream, Arc<Callers>) {
    let callers = Arc::new(Callers::default());
    let c = callers.clone();
    let app = Upstream::start(Arc::new(move |req| {
        let header = |n: &str| {
            req.headers()
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap_or("?").to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        };
        c.xfcc
            .lock()
            .unwrap()
            .push(header("x-forwarded-client-cert"));
        c.proto.lock().unwrap().push(header("x-forwarded-proto"));
        Response::new(Full::new(Bytes::from_static(b"ok")))
    }))
    .await;
    (app, callers)
}

/// A sidecar beside `service` with a join token, its inbound listener on a
/// fresh port in front of `app`.
async fn sidecar(control: &Control, service: &str, app: Option<SocketAddr>) -> (Proxy, SocketAddr) {
    let token = control.token(service, &[]);
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec!["--inbound".to_string(), inbound.to_string()];
    if let Some(a) = app {
        args.extend(["--app".to_string(), a.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (
        Proxy::start_mesh(control, service, &token, &args).await,
        inbound,
    )
}

/// The value of a metric line that starts with `prefix` (0 if absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Wait until `proxy`'s metric `prefix` reaches `at_least`.
async fn wait_metric(proxy: &Proxy, prefix: &str, at_least: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = proxy.metrics().await;
        if metric(&m, prefix) >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix} stayed below {at_least}:\n{m}\n{}",
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const AUTHZ_FRONTEND_ONLY: &str = r#"
      - source: builtin:authz
        config:
          rules:
            - from: [{ source: { principals: ["cluster.local/ns/default/sa/frontend"] } }]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn two_services_talk_over_mtls_and_authz_decides_on_the_callers_spiffe_id() {
    let ca = OperatorCa::new();
    let data = tempfile::tempdir().unwrap();
    let ca_args = ca.args();
    let args: Vec<&str> = ca_args.iter().map(String::as_str).collect();
    let control = Control::start_args(&data.path().join("control"), &args).await;
    let (app, callers) = noting_app().await;
    let (backend, inbound) = sidecar(&control, "backend", Some(app.addr)).await;
    // A second, static endpoint of backend: a tap in front of the same
    // inbound listener, so the test sees the bytes between the sidecars.
    let tap = Tap::start(inbound).await;
    control.apply(&format!(
        "services:\n  frontend: {{}}\n  intruder: {{}}\n  backend:\n    endpoints: {{ tap: [{{ address: \"{}\", identity: \"{}\" }}] }}\n    mtls: {{ forward-client-cert: true }}\n    inbound-plugins:{AUTHZ_FRONTEND_ONLY}",
        tap.addr,
        spiffe("backend")
    ));
    let (frontend, _) = sidecar(&control, "frontend", None).await;
    let (intruder, _) = sidecar(&control, "intruder", None).await;
    control.wait_proxies(3).await;
    control.wait_rollout();

    // Status shows each proxy's verified identity and its certificate's
    // time left; backend registered its inbound listener.
    let status = control.proxies();
    let b = status.iter().find(|p| p["service"] == "backend").unwrap();
    assert_eq!(b["identity"], spiffe("backend"), "{status:?}");
    assert_eq!(b["endpoint"], inbound.to_string(), "{status:?}");
    let left = b["cert_expires_in"].as_str().unwrap();
    assert!(left.starts_with("23h"), "a 24 h certificate: {left}");

    for i in 0..10 {
        let r = via(&frontend, "backend", &format!("/secret-path-{i}")).await;
        assert_eq!(r.status, 200, "{}\n{}", r.body_text(), frontend.log_text());
    }
    // Identity headers from outside never pass: the app sees the proxy's.
    let spoof = hyper::Request::get(format!("http://{}/spoof", frontend.listen))
        .header("host", "backend")
        .header(
            "x-forwarded-client-cert",
            "By=x;URI=spiffe://cluster.local/ns/default/sa/admin",
        )
        .body(Full::default())
        .unwrap();
    assert_eq!(send(http1(), spoof).await.unwrap().status, 200);
    let seen = callers.xfcc.lock().unwrap().clone();
    assert_eq!(seen.len(), 11);
    for x in &seen {
        assert!(
            x.starts_with(&format!("By={};Hash=", spiffe("backend")))
                && x.ends_with(&format!(";URI={}", spiffe("frontend"))),
            "{x}"
        );
    }
    assert!(callers.proto.lock().unwrap().iter().all(|p| p == "https"));
    // Istio's metrics on both sides name both principals: the caller's
    // sidecar reports the endpoint's verified identity, the callee's the
    // caller's certificate and mutual TLS.
    let (front_id, back_id) = (spiffe("frontend"), spiffe("backend"));
    let edge = [
        ("source_principal", front_id.as_str()),
        ("source_workload", "frontend"),
        ("source_workload_namespace", "default"),
        ("destination_principal", back_id.as_str()),
        ("destination_workload", "backend"),
        ("destination_service", "backend"),
        ("response_code", "200"),
    ];
    // (Two endpoints: the tap, and backend's own registration, subset v1.)
    let source = [&edge[..], &[("reporter", "source")]].concat();
    let dest = [
        &edge[..],
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
        ],
    ]
    .concat();
    frontend
        .wait_sum("istio_requests_total", &source, 11.0)
        .await;
    backend
        .wait_sample("istio_requests_total", &dest, 11.0)
        .await;

    // The intruder is a member of the mesh, but not one authz allows.
    let before = app.hits();
    let r = via(&intruder, "backend", "/secret-path").await;
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert_eq!(app.hits(), before, "a denied request reached the app");

    // On the wire between the sidecars: TLS records only.
    assert!(
        tap.connections.load(Ordering::SeqCst) >= 1,
        "no request went through the tap"
    );
    let wire = tap.seen.lock().unwrap().clone();
    assert_eq!(
        &wire[..2],
        &[0x16, 0x03],
        "the first bytes are not a TLS handshake"
    );
    for plain in [&b"secret-path"[..], b"HTTP/1.1", b"backend"] {
        assert!(
            !wire.windows(plain.len()).any(|w| w == plain),
            "{:?} visible on the wire",
            String::from_utf8_lossy(plain)
        );
    }
    drop(backend);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_client_is_refused_counted_and_the_app_sees_nothing() {
    let ca = OperatorCa::new();
    let data = tempfile::tempdir().unwrap();
    let ca_args = ca.args();
    let args: Vec<&str> = ca_args.iter().map(String::as_str).collect();
    let control = Control::start_args(&data.path().join("control"), &args).await;
    let (app, _) = noting_app().await;
    control.apply("services:\n  backend: {}\n");
    let (backend, inbound) = sidecar(&control, "backend", Some(app.addr)).await;
    control.wait_rollout();
    let url = format!("https://{inbound}/");

    // Plaintext on a STRICT port: no HTTP answer at all.
    let (code, status) = curl(&format!("http://{inbound}/"), None);
    assert!(code != 0 && status == "000", "plaintext got {status}");
    // TLS without a client certificate.
    let out = s_client_without_cert(inbound);
    assert!(out.contains("certificate required"), "{out}");
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    // A certificate from another CA, an expired one, one of another trust
    // domain.
    let dir = ca.dir.path();
    let bad = [
        ("unknown_ca", stranger(dir, &spiffe("frontend"))),
        (
            "expired",
            ca.leaf("expired", &spiffe("frontend"), Some((2020, 2021))),
        ),
        (
            "trust_domain",
            ca.leaf(
                "foreign",
                "spiffe://example.org/ns/default/sa/frontend",
                None,
            ),
        ),
    ];
    for (reason, cert) in &bad {
        let (code, status) = curl(&url, Some(cert));
        assert!(code != 0 && status == "000", "{reason}: got {status}");
    }
    assert_eq!(app.hits(), 0, "a refused client reached the app");
    let m = backend.metrics().await;
    for reason in [
        "plaintext",
        "no_client_certificate",
        "unknown_ca",
        "expired",
        "trust_domain",
    ] {
        assert_eq!(
            metric(
                &m,
                &format!(
                    "wasmesh_tls_refused_connections_total{{direction=\"inbound\",reason=\"{reason}\"}}"
                )
            ),
            1.0,
            "{reason}:\n{m}"
        );
        assert!(
            backend.log_text().contains(&format!("reason=\"{reason}\"")),
            "{reason} not logged"
        );
    }
    // The same client with a good mesh certificate gets through: the
    // refusals were about the certificates.
    let good = ca.leaf("good", &spiffe("frontend"), None);
    assert_eq!(curl(&url, Some(&good)), (0, "200".to_string()));
    assert_eq!(app.hits(), 1);
}

/// A TLS server presenting `cert`: how many bytes of requests it received.
async fn impostor(cert: &(PathBuf, PathBuf)) -> (SocketAddr, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&cert.0)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.1).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let r = received.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, r) = (acceptor.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    r.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_is_not_the_service_routed_to_gets_nothing() {
    let ca = OperatorCa::new();
    let data = tempfile::tempdir().unwrap();
    let ca_args = ca.args();
    let args: Vec<&str> = ca_args.iter().map(String::as_str).collect();
    let control = Control::start_args(&data.path().join("control"), &args).await;
    // It holds a good mesh certificate — of ratings, not of backend.
    let ratings = ca.leaf("ratings", &spiffe("ratings"), None);
    let (addr, received) = impostor(&ratings).await;
    control.apply(&format!(
        "services:\n  frontend: {{}}\n  backend:\n    endpoints: {{ v1: [{{ address: \"{addr}\", identity: \"{}\" }}] }}\n",
        spiffe("backend")
    ));
    let (frontend, _) = sidecar(&control, "frontend", None).await;
    control.wait_rollout();
    let r = via(&frontend, "backend", "/").await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert_eq!(r.header("x-wasmesh-flags"), Some("UF"));
    assert_eq!(
        received.load(Ordering::SeqCst),
        0,
        "the impostor received bytes"
    );
    let m = frontend.metrics().await;
    assert!(
        metric(
            &m,
            "wasmesh_tls_refused_connections_total{direction=\"outbound\",reason=\"wrong_identity\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(frontend.log_text().contains(&format!(
        "the peer is {}, not {}",
        spiffe("ratings"),
        spiffe("backend")
    )));

    // An endpoint whose identity is of another service is refused at
    // apply... by the proxy, which NACKs it and keeps serving.
    control.apply(&format!(
        "services:\n  frontend: {{}}\n  backend:\n    endpoints: {{ v1: [{{ address: \"{addr}\", identity: \"{}\" }}] }}\n",
        spiffe("ratings")
    ));
    let (code, out, _) = control.cli(&["status", "--wait", "--timeout", "30s"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is not an identity of service backend"),
        "{out}"
    );
}

/// Run a proxy with `token` until it exits on its own: (exit code, log).
fn proxy_exit(control: &Control, service: &str, token: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(WASMESH)
        .args([
            "proxy",
            "--control",
            &control.tls_url(),
            "--service",
            service,
        ])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .arg("--compile-cache")
        .arg(dir.path().join("cache"))
        .env("WASMESH_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_expired_used_up_for_another_service_or_mesh_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    control.apply("services:\n  frontend: {}\n  ratings: {}\n");

    let expired = control.token("frontend", &["--ttl", "1s"]);
    let issued = Instant::now();
    let once = control.token("frontend", &["--uses", "1"]);
    let (first, _) = (
        Proxy::start_mesh(&control, "frontend", &once, &[]).await,
        (),
    );
    let (code, log) = proxy_exit(&control, "frontend", &once);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("is used up (it allowed 1 proxies)"), "{log}");

    let (code, log) = proxy_exit(&control, "ratings", &control.token("frontend", &[]));
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(
            "is for service frontend in namespace default; this proxy asks to be default/ratings"
        ),
        "{log}"
    );

    // The token's one second is past once it was issued a second ago.
    let wait = Duration::from_millis(1100).saturating_sub(issued.elapsed());
    tokio::time::sleep(wait).await;
    let (code, log) = proxy_exit(&control, "frontend", &expired);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("expired at"), "{log}");

    let (code, log) = proxy_exit(&control, "frontend", "wmt1.garbage");
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("the join token is malformed"), "{log}");

    // A token of another mesh: this control's certificate is not under the
    // CA it pins, so the proxy sends it nothing.
    let other = Control::start(&data.path().join("other")).await;
    let foreign = other.token("frontend", &[]);
    let (code, log) = proxy_exit(&control, "frontend", &foreign);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("ca_pin_mismatch"), "{log}");

    let m = get(&format!("http://{}/metrics", control.admin))
        .await
        .unwrap()
        .body_text();
    assert_eq!(promtool_complaints(&m), Vec::<String>::new(), "{m}");
    for reason in ["token_used_up", "wrong_service", "token_expired"] {
        assert_eq!(
            metric(
                &m,
                &format!("wasmesh_control_certificate_refusals_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}:\n{m}"
        );
    }
    assert_eq!(
        metric(
            &m,
            "wasmesh_control_certificates_issued_total{kind=\"token\"}"
        ),
        1.0,
        "{m}"
    );
    drop(first);
}

#[tokio::test(flavor = "multi_thread")]
async fn permissive_takes_plaintext_and_mtls_on_one_port() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let (app, callers) = noting_app().await;
    control.apply(
        "services:\n  frontend: {}\n  backend:\n    mtls: { mode: PERMISSIVE, forward-client-cert: true }\n",
    );
    let (_backend, inbound) = sidecar(&control, "backend", Some(app.addr)).await;
    let (frontend, _) = sidecar(&control, "frontend", None).await;
    control.wait_rollout();
    // Plaintext, straight to the inbound listener.
    assert_eq!(
        curl(&format!("http://{inbound}/"), None),
        (0, "200".to_string())
    );
    // Mesh mTLS, from the frontend's sidecar.
    assert_eq!(via(&frontend, "backend", "/").await.status, 200);
    assert_eq!(*callers.proto.lock().unwrap(), ["http", "https"]);
    let xfcc = callers.xfcc.lock().unwrap().clone();
    assert_eq!(xfcc[0], "", "a plaintext caller has no verified identity");
    assert!(
        xfcc[1].ends_with(&format!("URI={}", spiffe("frontend"))),
        "{xfcc:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_between_sidecars_goes_over_mtls_too() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    let app = Upstream::echo("backend").await;
    control.apply(
        "services:\n  frontend: {}\n  backend:\n    protocol: h2c\n    mtls: { forward-client-cert: true }\n",
    );
    let (_backend, _) = sidecar(&control, "backend", Some(app.addr)).await;
    let (frontend, _) = sidecar(&control, "frontend", None).await;
    control.wait_rollout();
    for _ in 0..3 {
        let r = via(&frontend, "backend", "/h2").await;
        assert_eq!(r.status, 200, "{}\n{}", r.body_text(), frontend.log_text());
        let seen = r.json();
        assert_eq!(seen["version"], "HTTP/2.0");
        let xfcc = seen["headers"]["x-forwarded-client-cert"].as_str().unwrap();
        assert!(
            xfcc.ends_with(&format!("URI={}", spiffe("frontend"))),
            "{xfcc}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_every_few_seconds_under_load_with_no_failed_request() {
    let data = tempfile::tempdir().unwrap();
    let control = Control::start_args(&data.path().join("control"), &["--cert-ttl", "10s"]).await;
    let (app, callers) = noting_app().await;
    control
        .apply("services:\n  frontend: {}\n  backend:\n    mtls: { forward-client-cert: true }\n");
    let (backend, _) = sidecar(&control, "backend", Some(app.addr)).await;
    let (frontend, _) = sidecar(&control, "frontend", None).await;
    control.wait_rollout();
    let running = Load::start(&[frontend.listen], "backend", 4);
    let renewed = "wasmesh_identity_certificate_renewals_total{result=\"renewed\"}";
    wait_metric(&frontend, renewed, 3.0, Duration::from_secs(60)).await;
    wait_metric(&backend, renewed, 3.0, Duration::from_secs(60)).await;
    let (ok, failed) = running.finish().await;
    assert!(
        failed.is_empty(),
        "{ok} ok, {} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
    // The calls really went out with each new certificate: the app saw the
    // frontend's certificate change at least three times.
    let hashes: BTreeSet<String> = callers
        .xfcc
        .lock()
        .unwrap()
        .iter()
        .filter_map(|x| {
            x.split(';')
                .find_map(|p| p.strip_prefix("Hash="))
                .map(str::to_string)
        })
        .collect();
    assert!(
        hashes.len() >= 4,
        "the frontend presented {} certificates: {hashes:?}",
        hashes.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_control_away_a_proxy_serves_on_its_certificate_until_it_expires() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("control");
    let ttl = ["--cert-ttl", "12s"];
    let control = Control::start_args(&dir, &ttl).await;
    let ports = [control.listen, control.tls, control.admin];
    let (app, _) = noting_app().await;
    control.apply("services:\n  frontend: {}\n  backend: {}\n");
    let (backend, inbound) = sidecar(&control, "backend", Some(app.addr)).await;
    let (frontend, _) = sidecar(&control, "frontend", None).await;
    control.wait_rollout();
    drop(control);

    // Past the renewal point renewals fail; serving goes on, and the
    // metric counts down.
    let failed = "wasmesh_identity_certificate_renewals_total{result=\"failed\"}";
    let left = "wasmesh_identity_certificate_expiry_seconds";
    wait_metric(&frontend, failed, 1.0, Duration::from_secs(30)).await;
    wait_metric(&backend, failed, 1.0, Duration::from_secs(30)).await;
    assert!(metric(&frontend.metrics().await, left) > 0.0);
    assert_eq!(via(&frontend, "backend", "/").await.status, 200);

    // Control back before expiry: both renew, and serve on.
    let control = Control::start_with(&dir, ports, &ttl).await;
    let renewed = "wasmesh_identity_certificate_renewals_total{result=\"renewed\"}";
    wait_metric(&frontend, renewed, 1.0, Duration::from_secs(30)).await;
    wait_metric(&backend, renewed, 1.0, Duration::from_secs(30)).await;
    assert_eq!(via(&frontend, "backend", "/").await.status, 200);

    // Away for good: the certificate serves until it really expires; the
    // metric shows it, and what backend presents then is expired.
    drop(control);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&backend.metrics().await, left) > 0.0 {
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &inbound.to_string(),
            "-verify_return_error",
        ])
        .arg("-CAfile")
        .arg(
            backend
                .dir
                .path()
                .join("cache/proxies/backend.v1/identity/bundle.pem"),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("certificate has expired"), "{text}");
}

/// A mesh client of control at `url`, with the certificate a sidecar kept
/// in its cache (`None`: TLS without a client certificate, control pinned).
async fn control_channel(
    url: &str,
    identity: Option<&Path>,
    pin: [u8; 32],
) -> tonic::transport::Channel {
    use wasmesh_identity::cert;
    use wasmesh_identity::tls::{self, Credentials, Current};
    let config = match identity {
        Some(dir) => {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
            let chain = cert::certs_from_pem(&read("chain.pem"), "chain").unwrap();
            let key = cert::key_from_pem(&read("key.pem"), "key").unwrap();
            let roots = cert::certs_from_pem(&read("bundle.pem"), "bundle").unwrap();
            tls::control_client(&Credentials::new(Current::new(chain, key, &roots).unwrap()))
        }
        None => tls::bootstrap_client(pin),
    };
    wasmesh_proxy::identity::connect(url, Some(config))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_takes_a_proxys_service_from_its_certificate_not_from_what_it_says() {
    use wasmesh_api::proto;
    use wasmesh_api::proto::discovery_client::DiscoveryClient;
    use wasmesh_api::proto::identity_client::IdentityClient;
    use wasmesh_api::proto::status_client::StatusClient;
    let data = tempfile::tempdir().unwrap();
    let control = Control::start(&data.path().join("control")).await;
    control.apply("services:\n  frontend: {}\n  backend: {}\n");
    let token = control.token("frontend", &[]);
    let pin: [u8; 32] = {
        let hex = token.rsplit('.').next().unwrap();
        let mut p = [0u8; 32];
        for (i, b) in p.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        p
    };
    let frontend = Proxy::start_mesh(&control, "frontend", &token, &[]).await;
    let identity = frontend
        .dir
        .path()
        .join("cache/proxies/frontend.v1/identity");

    // With frontend's certificate, a Hello that says backend is refused.
    let channel = control_channel(&control.tls_url(), Some(&identity), pin).await;
    let hello = proto::ProxyMessage {
        message: Some(proto::proxy_message::Message::Hello(proto::Hello {
            service: "backend".into(),
            instance: "liar".into(),
            ..Default::default()
        })),
    };
    let refused = DiscoveryClient::new(channel.clone())
        .stream(tokio_stream::iter([hello]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains(&format!(
            "this proxy's certificate is {}",
            spiffe("frontend")
        )),
        "{refused:?}"
    );
    // A renewal asking for another service is refused too.
    let renewal = IdentityClient::new(channel.clone())
        .sign(proto::SignRequest {
            csr_der: wasmesh_identity::KeyAndCsr::generate().unwrap().csr,
            service: "backend".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(renewal.code(), tonic::Code::PermissionDenied, "{renewal:?}");
    // A mesh member may read status over TLS.
    assert!(
        StatusClient::new(channel)
            .proxies(proto::ProxiesRequest {})
            .await
            .is_ok()
    );

    // Over TLS without a certificate: no discovery, no reads without the
    // admin token.
    let anonymous = control_channel(&control.tls_url(), None, pin).await;
    let hello = proto::ProxyMessage {
        message: Some(proto::proxy_message::Message::Hello(proto::Hello {
            service: "frontend".into(),
            instance: "anon".into(),
            ..Default::default()
        })),
    };
    let e = DiscoveryClient::new(anonymous.clone())
        .stream(tokio_stream::iter([hello]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = StatusClient::new(anonymous)
        .proxies(proto::ProxiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // And certificates are never signed on the plaintext listener.
    let plain = tonic::transport::Endpoint::from_shared(control.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = IdentityClient::new(plain)
        .sign(proto::SignRequest {
            token: control.token("frontend", &[]),
            csr_der: wasmesh_identity::KeyAndCsr::generate().unwrap().csr,
            service: "frontend".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("only on control's TLS listener"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_join_control_at_a_name_given_with_tls_san() {
    use std::io::Write as _;
    // Control's TLS listener on another loopback address, named in its
    // certificate with --tls-san (as a Kubernetes Service's name would be).
    let data = tempfile::tempdir().unwrap();
    let port = |ip: &str| -> SocketAddr { format!("{ip}:{}", free_port()).parse().unwrap() };
    let control = Control::start_with(
        &data.path().join("control"),
        [port("127.0.0.1"), port("127.0.0.2"), port("127.0.0.1")],
        &[
            "--tls-san",
            "127.0.0.2",
            "--tls-san",
            "wasmesh-control.example",
        ],
    )
    .await;
    control.apply("services:\n  frontend: {}\n");
    let token = control.token("frontend", &[]);
    let proxy = Proxy::start_mesh(&control, "frontend", &token, &[]).await;
    control.wait_proxies(1).await;
    let status = control.proxies();
    assert_eq!(status[0]["identity"], spiffe("frontend"), "{status:?}");
    drop(proxy);
    // The certificate names what --tls-san gave, beside the defaults.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &control.tls.to_string(),
            "-showcerts",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let pem = String::from_utf8_lossy(&out.stdout);
    let first = &pem[pem.find("-----BEGIN CERTIFICATE-----").unwrap()..];
    let first = &first[..first.find("-----END CERTIFICATE-----").unwrap() + 25];
    let mut text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    text.stdin
        .take()
        .unwrap()
        .write_all(first.as_bytes())
        .unwrap();
    let sans = String::from_utf8_lossy(&text.wait_with_output().unwrap().stdout).into_owned();
    for name in [
        "DNS:localhost",
        "DNS:wasmesh-control.example",
        "IP Address:127.0.0.1",
        "IP Address:127.0.0.2",
    ] {
        assert!(sans.contains(name), "{name} missing: {sans}");
    }
}
