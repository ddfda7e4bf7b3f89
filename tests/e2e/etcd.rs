//! Control on etcd (`--store etcd://…`, a build with `--features etcd`):
//! a real etcd on loopback, the state in it and nowhere else — another
//! control on another data directory (or none) serves every push, apply,
//! join token and the CA itself; a replica given another sealing key
//! cannot open the CA and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{Control, Load, Proxy, Upstream, WASMESH, cli_with, free_port, get, via};

/// An etcd cluster on loopback (its members' data in one temporary
/// directory), killed when dropped.
struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    /// Clients reach the members over TLS and must show a certificate.
    tls: bool,
}

struct Member {
    child: Option<Child>,
    client: String,
    peer: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}

impl Etcd {
    /// One member.
    async fn start() -> Etcd {
        Self::cluster(1).await
    }

    /// One member whose clients speak TLS and show a certificate of its CA:
    /// `ca.pem` and the client's `client.pem`, `client.key` in [`Etcd::file`].
    async fn with_tls() -> Etcd {
        Self::start_with(1, true).await
    }

    /// `n` members, started together.
    async fn cluster(n: usize) -> Etcd {
        Self::start_with(n, false).await
    }

    /// A file of its directory.
    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A CA, the members' certificate (127.0.0.1) and a client's.
    fn write_certificates(dir: &Path) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "etcd ca");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        for (name, sans) in [
            ("server", vec!["127.0.0.1".to_string(), "localhost".into()]),
            ("client", vec!["wasmesh-control".into()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(sans).unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
    }

    async fn start_with(n: usize, tls: bool) -> Etcd {
        let mut e = Etcd {
            tls,
            members: (0..n)
                .map(|_| Member {
                    child: None,
                    client: format!("127.0.0.1:{}", free_port()),
                    peer: format!("http://127.0.0.1:{}", free_port()),
                })
                .collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        if tls {
            Self::write_certificates(e.dir.path());
        }
        for i in 0..n {
            e.spawn(i);
        }
        for i in 0..n {
            e.wait(i).await;
        }
        e
    }

    /// Kill member `i` (-9).
    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data and ports.
    async fn resume(&mut self, i: usize) {
        self.spawn(i);
        self.wait(i).await;
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .map(|(j, m)| format!("m{j}={}", m.peer))
            .collect();
        let m = &self.members[i];
        let scheme = if self.tls { "https" } else { "http" };
        let mut cmd = Command::new("etcd");
        if self.tls {
            cmd.args(["--cert-file", &self.file("server.pem")])
                .args(["--key-file", &self.file("server.key")])
                .args(["--trusted-ca-file", &self.file("ca.pem")])
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &format!("m{i}"), "--data-dir"])
            .arg(self.dir.path().join(format!("m{i}")))
            .args(["--listen-client-urls", &format!("{scheme}://{}", m.client)])
            .args([
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
            ])
            .args(["--listen-peer-urls", &m.peer])
            .args(["--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (Debian: etcd-server)");
        self.members[i].child = Some(child);
    }

    async fn wait(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&self.members[i].client)
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "etcd member {i} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        let clients: Vec<&str> = self.members.iter().map(|m| m.client.as_str()).collect();
        format!("etcd://{}/mesh", clients.join(","))
    }
}

/// The flags of a control on `etcd`, its admin token in `data` (copied
/// there from `shared`, as each replica is given the same file) and the
/// shared sealing key.
fn replica_args(etcd: &Etcd, data: &Path, shared: &Path) -> Vec<String> {
    std::fs::create_dir_all(data).unwrap();
    let token = shared.join("admin.token");
    if token.exists() {
        std::fs::copy(&token, data.join("admin.token")).unwrap();
    }
    vec![
        "--store".into(),
        etcd.url(),
        "--admin-token-file".into(),
        data.join("admin.token").display().to_string(),
        "--store-key-file".into(),
        shared.join("store.key").display().to_string(),
    ]
}

/// Start control with `args`, which must make it stop at once (exit 1):
/// what it said.
fn refused(args: &[String]) -> String {
    let out = Command::new(WASMESH)
        .args(["control", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .args(["--listen-tls", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// Start a replica on `etcd`, its data in `root/name`; the first replica
/// under `root` leaves its admin token in `root/shared` for the others.
async fn replica(etcd: &Etcd, root: &Path, name: &str) -> Control {
    let shared = root.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let dir = root.join(name);
    let control = Control::start_args(&dir, &strs(&replica_args(etcd, &dir, &shared))).await;
    if !shared.join("admin.token").exists() {
        std::fs::copy(dir.join("admin.token"), shared.join("admin.token")).unwrap();
    }
    control
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_on_etcd_keeps_its_state_there_for_any_replica() {
    let etcd = Etcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    let mut a = replica(&etcd, tmp.path(), "a").await;

    let up = Upstream::echo("reviews").await;
    push_tagger(&a, 1);
    a.apply(&tagged(&up, 1));
    let token = a.token("frontend", &["--uses", "2"]);
    let plain = Proxy::start_control(&a.url(), "frontend", "v1", &[]).await;
    a.wait_rollout();
    let r = via(&plain, "reviews", "/").await;
    assert_eq!(r.json()["headers"]["x-v"], "1", "{}", r.body_text());

    // Replica A dies; B, on its own (empty) data directory and A's ports,
    // finds everything in etcd.
    let (listen, admin) = (a.listen, a.admin);
    a.kill();
    let b_dir = tmp.path().join("b");
    let args = replica_args(&etcd, &b_dir, &shared);
    let b = Control::start_with(
        &b_dir,
        [
            listen,
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            admin,
        ],
        &strs(&args),
    )
    .await;
    let (_, out, _) = b.cli(&["get", "plugins", "-o", "json"]);
    assert!(out.contains("\"tagger\""), "{out}");
    let (_, out, _) = b.cli(&["get", "services", "-o", "json"]);
    assert!(out.contains("\"reviews\""), "{out}");
    // A's join token and A's CA: a proxy joins through B over TLS.
    let mesh = Proxy::start_mesh(&b, "frontend", &token, &[]).await;
    b.wait_proxies(2).await;
    b.wait_rollout();
    let r = via(&mesh, "reviews", "/").await;
    assert_eq!(r.json()["headers"]["x-v"], "1", "{}", r.body_text());
    push_tagger(&b, 2);
    b.apply(&tagged(&up, 2));
    b.wait_rollout();
    for p in [&plain, &mesh] {
        let r = via(p, "reviews", "/").await;
        assert_eq!(r.json()["headers"]["x-v"], "2", "{}", r.body_text());
    }
    let (_, out, _) = b.cli(&["get", "proxies", "-o", "json"]);
    assert!(
        out.contains("spiffe://cluster.local/ns/default/sa/frontend"),
        "{out}"
    );

    // A third replica with no data directory at all reads the same state.
    let (c_listen, c_admin) = (free_port(), free_port());
    let c_dir = tmp.path().join("c");
    let args = replica_args(&etcd, &c_dir, &shared);
    let mut c = Command::new(WASMESH)
        .args(["control", "--listen", &format!("127.0.0.1:{c_listen}")])
        .args(["--admin", &format!("127.0.0.1:{c_admin}")])
        .args(["--listen-tls", &format!("127.0.0.1:{}", free_port())])
        .args(&args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("c.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get(&format!("http://127.0.0.1:{c_admin}/ready"))
        .await
        .is_ok_and(|r| r.status == 200)
    {
        assert!(
            c.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(tmp.path().join("c.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token_file: PathBuf = c_dir.join("admin.token");
    let (code, out, err) = cli_with(
        &format!("http://127.0.0.1:{c_listen}"),
        Some(&token_file),
        &["get", "plugins", "-o", "json"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"2\""), "tagger@2 pushed through B: {out}");
    let _ = c.kill();
    let _ = c.wait();

    // A replica given another sealing key cannot open the CA: it stops,
    // saying what to do.
    let d_dir = tmp.path().join("d");
    let mut args = replica_args(&etcd, &d_dir, &shared);
    let wrong = tmp.path().join("wrong.key");
    *args.last_mut().unwrap() = wrong.display().to_string();
    let stderr = refused(&args);
    assert!(
        stderr.contains(
            "does not open with this sealing key: give every replica the same --store-key-file"
        ),
        "{stderr}"
    );
}

/// Push the add-header component as `tagger@VERSION` through `control`.
fn push_tagger(control: &Control, version: u32) {
    control.push(
        wasmesh_artifacts::ADD_HEADER,
        "tagger",
        &version.to_string(),
    );
}

/// `reviews` at `up`, tagged by `tagger@VERSION`.
fn tagged(up: &Upstream, version: u32) -> String {
    format!(
        "services:\n  frontend: {{}}\n  reviews:\n    endpoints: {{ v1: [\"{}\"] }}\n    plugins:\n      - source: tagger@{version}\n        config: {{ request: {{ x-v: \"{version}\" }} }}\n",
        up.addr
    )
}

/// Wait until `control` knows `tagger@VERSION` (pushed through another
/// replica: it learns it from etcd's watch).
async fn wait_plugin(control: &Control, version: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let version = version.to_string();
    loop {
        let (_, out, _) = control.cli(&["get", "plugins", "-o", "json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        if list
            .iter()
            .any(|p| p["name"] == "tagger" && p["version"] == version.as_str())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tagger@{version} never reached it: {out}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The x-v tag `proxy` gets from reviews.
async fn tag(proxy: &Proxy) -> String {
    let r = via(proxy, "reviews", "/").await;
    r.json()["headers"]["x-v"]
        .as_str()
        .unwrap_or("-")
        .to_string()
}

/// Two replicas on one etcd: what one is pushed and applied reaches the
/// proxies of the other; an endpoint registered on one is served by the
/// other's proxies; a proxy given both moves to the survivor when its
/// replica is killed (-9) under load, failing no request, and takes the
/// survivor's next change.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_the_mesh_and_proxies_fail_over() {
    let etcd = Etcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut a = replica(&etcd, tmp.path(), "a").await;
    let mut b = replica(&etcd, tmp.path(), "b").await;

    // Pushed through A, applied through B.
    let up = Upstream::echo("reviews").await;
    push_tagger(&a, 1);
    wait_plugin(&b, 1).await;
    b.apply(&tagged(&up, 1));
    // A proxy on A alone; its backend's endpoint registered on B alone.
    let backend_app = Upstream::echo("backend").await;
    let backend = Proxy::start_control(
        &b.url(),
        "backend",
        "v1",
        &["--app", &backend_app.addr.to_string()],
    )
    .await;
    b.apply("services:\n  backend: {}\n");
    let on_a = Proxy::start_control(&a.url(), "frontend", "v1", &[]).await;
    let both = format!("{},{}", a.url(), b.url());
    let mover = Proxy::start_control(&both, "frontend", "v1", &[]).await;
    // Every replica shows every proxy, wherever it is connected, and waits
    // for all of them.
    for c in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.proxies().len() < 3 {
            assert!(Instant::now() < deadline, "{:?}", c.proxies());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut services: Vec<String> = c
            .proxies()
            .iter()
            .map(|p| p["service"].as_str().unwrap().to_string())
            .collect();
        services.sort();
        assert_eq!(services, ["backend", "frontend", "frontend"]);
        c.wait_rollout();
    }
    assert_eq!(tag(&on_a).await, "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = via(&on_a, "backend", "/").await;
        if r.status == 200 {
            assert_eq!(r.json()["upstream"], "backend", "{}", r.body_text());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend's endpoint never reached A: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Kill the replica the mover is on, under load through the mover.
    let mover_on_a = a.proxies().iter().any(|p| {
        p["service"] == "frontend"
            && p["instance"]
                .as_str()
                .unwrap()
                .ends_with(&mover.listen.port().to_string())
    });
    let load = Load::start(&[mover.listen], "reviews", 1);
    let survivor = if mover_on_a {
        a.kill();
        &b
    } else {
        b.kill();
        &a
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !survivor.proxies().iter().any(|p| {
        p["instance"]
            .as_str()
            .unwrap()
            .ends_with(&mover.listen.port().to_string())
    }) {
        assert!(
            Instant::now() < deadline,
            "the mover never reached the survivor"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    push_tagger(survivor, 2);
    survivor.apply(&tagged(&up, 2));
    survivor.wait_rollout();
    assert_eq!(tag(&mover).await, "2");
    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty() && ok > 0,
        "{ok} ok, {} failed: {failed:?}",
        failed.len()
    );
    drop(backend);
}

/// etcd down: control keeps serving its proxies what they have, refuses
/// writes at once with the store's reason, and takes writes again (and what
/// was written meanwhile, here nothing) once etcd is back.
#[tokio::test(flavor = "multi_thread")]
async fn with_etcd_down_control_refuses_writes_keeps_serving_and_resyncs() {
    let mut etcd = Etcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let control = Control::start_args(&dir, &strs(&replica_args(&etcd, &dir, tmp.path()))).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    let proxy = Proxy::start_control(&control.url(), "frontend", "v1", &[]).await;
    control.wait_rollout();
    assert_eq!(tag(&proxy).await, "1");

    etcd.stop(0);
    let started = Instant::now();
    let (code, out, err) = control.cli_stdin(
        &["apply", "-f", "-"],
        &tagged(&up, 1).replace("frontend: {}", "frontend: { }\n  extra: {}"),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("the store failed: etcd: "), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // Reads and the proxies go on.
    let (code, out, _) = control.cli(&["get", "services", "-o", "json"]);
    assert_eq!(code, 0);
    assert!(!out.contains("extra"), "{out}");
    assert_eq!(tag(&proxy).await, "1");

    etcd.resume(0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _, err) = control.cli(&[
            "push",
            wasmesh_artifacts::ADD_HEADER,
            "--name",
            "tagger",
            "--version",
            "2",
        ]);
        if code == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcd back, writes still refused: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    control.apply(&tagged(&up, 2));
    control.wait_rollout();
    assert_eq!(tag(&proxy).await, "2");
}

/// Push `tagger@VERSION` and apply it through `control`, again until
/// acknowledged (a write may be refused while an etcd member or a replica
/// is down): the revision it was acknowledged at.
async fn push_and_apply(control: &Control, up: &Upstream, version: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for step in [&["push"][..], &["apply"][..]] {
        loop {
            let (code, out, err) = if step[0] == "push" {
                control.cli(&[
                    "push",
                    wasmesh_artifacts::ADD_HEADER,
                    "--name",
                    "tagger",
                    "--version",
                    &version.to_string(),
                ])
            } else {
                control.cli_stdin(&["apply", "-f", "-"], &tagged(up, version))
            };
            if code == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {version} never acknowledged: {out}{err}",
                step[0]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The whole scene: three replicas on a three-member etcd, six
/// proxies spread over them under continuous load; one replica killed (-9),
/// then one etcd member, then both restarted, pushing and applying all the
/// while: no client request fails, every acknowledged push and apply is on
/// every replica, every proxy ends on the latest version.
#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_on_three_members_lose_nothing_through_kills() {
    let mut etcd = Etcd::cluster(3).await;
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(replica(&etcd, tmp.path(), name).await);
    }
    let up = Upstream::echo("reviews").await;
    push_and_apply(&replicas[0], &up, 1).await;
    let urls: Vec<String> = replicas.iter().map(Control::url).collect();
    let all = urls.join(",");
    let mut proxies = Vec::new();
    for _ in 0..6 {
        proxies.push(Proxy::start_control(&all, "frontend", "v1", &[]).await);
    }
    for c in &replicas {
        c.wait_proxies(6).await;
        c.wait_rollout();
    }
    let listens: Vec<_> = proxies.iter().map(|p| p.listen).collect();
    let load = Load::start(&listens, "reviews", 1);

    let (a_listen, a_admin, a_tls) = (replicas[0].listen, replicas[0].admin, replicas[0].tls);
    replicas[0].kill();
    push_and_apply(&replicas[1], &up, 2).await;
    etcd.stop(1);
    push_and_apply(&replicas[2], &up, 3).await;
    let a_dir = tmp.path().join("a");
    let args = replica_args(&etcd, &a_dir, &shared);
    replicas[0] = Control::start_with(&a_dir, [a_listen, a_tls, a_admin], &strs(&args)).await;
    etcd.resume(1).await;
    push_and_apply(&replicas[0], &up, 4).await;

    for c in &replicas {
        c.wait_proxies(6).await;
        c.wait_rollout();
        let (_, out, _) = c.cli(&["get", "plugins", "-o", "json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let mut versions: Vec<&str> = list
            .iter()
            .map(|p| p["version"].as_str().unwrap())
            .collect();
        versions.sort();
        assert_eq!(versions, ["1", "2", "3", "4"], "{out}");
    }
    for p in &proxies {
        assert_eq!(tag(p).await, "4");
    }
    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty() && ok > 0,
        "{ok} ok, {} failed: {failed:?}",
        failed.len()
    );
}

/// Applies racing on two replicas: each lands whole (the replica that lost
/// the race to the store applies again on what is there) or is refused with
/// a conflict, never half; afterwards both replicas hold exactly the
/// services of the applies they acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn applies_racing_on_two_replicas_land_whole_or_are_refused() {
    let etcd = Etcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&etcd, tmp.path(), "a").await;
    let b = replica(&etcd, tmp.path(), "b").await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    // Each apply writes two services at once: `left-N` and `right-N`
    // through A, `up-N` and `down-N` through B.
    let race = |c: Arc<Control>, names: [&'static str; 2]| {
        std::thread::spawn(move || {
            (0..15)
                .map(|n| {
                    let yaml = format!(
                        "services:\n  {0}-{n}: {{}}\n  {1}-{n}: {{}}\n",
                        names[0], names[1]
                    );
                    let (code, out, err) = c.cli_stdin(&["apply", "-f", "-"], &yaml);
                    (n, code, format!("{out}{err}"))
                })
                .collect::<Vec<_>>()
        })
    };
    let (ta, tb) = (
        race(a.clone(), ["left", "right"]),
        race(b.clone(), ["up", "down"]),
    );
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    let mut expected = std::collections::BTreeSet::new();
    let mut refused = 0;
    for (results, names) in [(&ra, ["left", "right"]), (&rb, ["up", "down"])] {
        for (n, code, out) in results.iter() {
            if *code == 0 {
                expected.insert(format!("{}-{n}", names[0]));
                expected.insert(format!("{}-{n}", names[1]));
            } else {
                assert!(
                    out.contains("conflict") && out.contains("apply again"),
                    "{out}"
                );
                refused += 1;
            }
        }
    }
    // A replica that lost the race looks at the store again and applies on
    // what is there: applies of different services all land (a refusal,
    // after several lost races in a row, is the exception).
    assert!(expected.len() >= 50, "{refused} of 30 applies refused");
    // Both replicas converge on exactly the acknowledged services.
    for c in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, out, _) = c.cli(&["get", "services", "-o", "json"]);
            let got: std::collections::BTreeSet<String> =
                serde_json::from_str::<Vec<serde_json::Value>>(&out)
                    .unwrap()
                    .iter()
                    .map(|s| s["name"].as_str().unwrap().to_string())
                    .collect();
            if got == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} vs {} acknowledged",
                got.len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// etcd with TLS and client certificates: control given etcd's CA and a
/// client certificate keeps its state there; without the certificate it
/// cannot, and says so.
#[tokio::test(flavor = "multi_thread")]
async fn control_reaches_etcd_over_mutual_tls() {
    let etcd = Etcd::with_tls().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut args = replica_args(&etcd, &dir, tmp.path());
    args.extend(["--etcd-ca".into(), etcd.file("ca.pem")]);
    let mut with_cert = args.clone();
    with_cert.extend([
        "--etcd-cert".into(),
        etcd.file("client.pem"),
        "--etcd-key".into(),
        etcd.file("client.key"),
    ]);
    let control = Control::start_args(&dir, &strs(&with_cert)).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    let (_, out, _) = control.cli(&["get", "services", "-o", "json"]);
    assert!(out.contains("\"reviews\""), "{out}");

    let stderr = refused(&args);
    assert!(stderr.contains("the store failed: etcd: "), "{stderr}");
    assert!(
        stderr.contains("if etcd asks for client certificates (--client-cert-auth), give --etcd-cert and --etcd-key"),
        "{stderr}"
    );
}

/// etcd with authentication on: control given a user and its password
/// keeps its state there (its lease and watch included); without them it
/// cannot, and says so.
#[tokio::test(flavor = "multi_thread")]
async fn control_reaches_etcd_with_a_user() {
    let etcd = Etcd::start().await;
    let ctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .args(["--endpoints", &etcd.members[0].client])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    };
    ctl(&["user", "add", "root:s3cret"]);
    ctl(&["auth", "enable"]);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("password"), "s3cret\n").unwrap();
    let dir = tmp.path().join("a");
    let args = replica_args(&etcd, &dir, tmp.path());
    let mut with_user = args.clone();
    with_user.extend([
        "--etcd-user".into(),
        "root".into(),
        "--etcd-password-file".into(),
        tmp.path().join("password").display().to_string(),
    ]);
    let control = Control::start_args(&dir, &strs(&with_user)).await;
    let up = Upstream::echo("reviews").await;
    push_tagger(&control, 1);
    control.apply(&tagged(&up, 1));
    let proxy = Proxy::start_control(&control.url(), "frontend", "v1", &[]).await;
    control.wait_rollout();
    assert_eq!(tag(&proxy).await, "1");

    let stderr = refused(&args);
    assert!(
        stderr.contains("etcd has authentication on: give --etcd-user and --etcd-password-file"),
        "{stderr}"
    );
    assert!(stderr.contains("the store failed: etcd: "), "{stderr}");
}
