//! The same tests for every [`Store`]: the embedded one, and (with the
//! `etcd` feature) etcd — a real etcd server each test starts on loopback.

use std::sync::Arc;

use super::embedded::Embedded;
use super::*;

fn meta(version: &str, sha: &str) -> PluginMeta {
    PluginMeta {
        name: "router".into(),
        version: version.into(),
        sha256: sha.into(),
        size: 3,
        hooks: vec!["on-request".into()],
        pushed_at_ms: 1,
    }
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A store to test, and how to open it again on the same state.
trait Backend {
    fn open(&self) -> Arc<dyn Store>;
}

/// One file has one writer: "opening it again" while a handle lives gives
/// that handle (two writers race through it); once all are dropped, the
/// file is opened anew.
struct EmbeddedBackend(
    tempfile::TempDir,
    std::sync::Mutex<std::sync::Weak<Embedded>>,
);

impl Backend for EmbeddedBackend {
    fn open(&self) -> Arc<dyn Store> {
        let mut live = self.1.lock().unwrap();
        if let Some(s) = live.upgrade() {
            return s;
        }
        let s = Arc::new(Embedded::open(self.0.path()).unwrap());
        *live = Arc::downgrade(&s);
        s
    }
}

fn embedded() -> EmbeddedBackend {
    EmbeddedBackend(tempfile::tempdir().unwrap(), Default::default())
}

fn plugins_are_immutable_and_components_shared_and_collected(b: &dyn Backend) {
    let s = b.open();
    let (one, two) = (b"one".to_vec(), b"two".to_vec());
    // Bigger than one etcd chunk (1 MiB), so that chunks are put together.
    let big: Vec<u8> = (0..(2 << 20) + 7).map(|i| (i % 251) as u8).collect();
    let (a, bb, c) = (sha(&one), sha(&two), sha(&big));
    assert_eq!(s.put_plugin(&meta("1", &a), &one).unwrap(), Pushed::Created);
    assert_eq!(
        s.put_plugin(&meta("1", &a), &one).unwrap(),
        Pushed::Unchanged
    );
    assert!(matches!(
        s.put_plugin(&meta("1", &bb), &two),
        Err(StoreError::Immutable { .. })
    ));
    s.put_plugin(&meta("2", &a), &one).unwrap();
    assert!(s.delete_plugin("router@1").unwrap());
    assert_eq!(s.component(&a).unwrap().as_deref(), Some(&b"one"[..]));
    assert!(s.delete_plugin("router@2").unwrap());
    assert_eq!(s.component(&a).unwrap(), None);
    assert!(!s.delete_plugin("router@2").unwrap());
    s.put_plugin(&meta("3", &c), &big).unwrap();
    assert_eq!(s.component(&c).unwrap().as_deref(), Some(&big[..]));
    let state = b.open().load().unwrap();
    assert_eq!(state.plugins.keys().collect::<Vec<_>>(), ["router@3"]);
}

fn tokens_are_used_up_atomically_and_refused_with_the_reason(b: &dyn Backend) {
    let s = b.open();
    let t = TokenRecord {
        id: "abc".into(),
        secret_sha256: "11".repeat(32),
        service: "reviews".into(),
        namespace: "default".into(),
        expires_at_ms: 10_000,
        uses: 2,
        uses_left: 2,
        created_at_ms: 0,
    };
    s.put_token(&t).unwrap();
    let redeem = |secret: &str, service: &str, now: i64| {
        s.redeem_token("abc", secret, service, None, now).unwrap()
    };
    let good = "11".repeat(32);
    assert_eq!(
        redeem(&"22".repeat(32), "reviews", 1),
        Err(TokenRefusal::Unknown)
    );
    assert!(matches!(
        redeem(&good, "ratings", 1),
        Err(TokenRefusal::WrongService { .. })
    ));
    assert!(matches!(
        redeem(&good, "reviews", 10_000),
        Err(TokenRefusal::Expired { .. })
    ));
    assert_eq!(redeem(&good, "reviews", 1).unwrap().uses_left, 1);
    assert_eq!(redeem(&good, "reviews", 2).unwrap().uses_left, 0);
    assert!(matches!(
        redeem(&good, "reviews", 3),
        Err(TokenRefusal::UsedUp { .. })
    ));
    assert_eq!(
        s.redeem_token("nope", &good, "reviews", None, 1).unwrap(),
        Err(TokenRefusal::Unknown)
    );
}

fn the_first_ca_stored_wins(b: &dyn Backend) {
    let s = b.open();
    assert_eq!(s.ca().unwrap(), None);
    let ca = |k: &str| CaRecord {
        trust_domain: "cluster.local".into(),
        chain_pem: "c".into(),
        key_pem: k.into(),
        roots_pem: "r".into(),
    };
    assert_eq!(s.init_ca(&ca("first")).unwrap().key_pem, "first");
    assert_eq!(s.init_ca(&ca("second")).unwrap().key_pem, "first");
    assert_eq!(b.open().ca().unwrap().unwrap().key_pem, "first");
}

fn services_commit_atomically_against_a_revision_and_survive_reopening(b: &dyn Backend) {
    let record = |name: &str| ServiceRecord {
        name: name.into(),
        namespace: "default".into(),
        spec: serde_json::json!({ "hosts": [name] }),
        revision: 0,
    };
    {
        let s = b.open();
        assert_eq!(
            s.commit_services(0, &[record("a"), record("b")], &[])
                .unwrap(),
            1
        );
        assert!(matches!(
            s.commit_services(0, &[record("c")], &[]),
            Err(StoreError::Conflict {
                expected: 0,
                actual: 1
            })
        ));
        assert_eq!(s.commit_services(1, &[], &["a".into()]).unwrap(), 2);
        let endpoint = |i: &str| EndpointRecord {
            service: "b".into(),
            subset: "v1".into(),
            instance: i.into(),
            address: "127.0.0.1:1".into(),
            identity: String::new(),
            owner: "r1".into(),
        };
        s.commit_endpoints(&[endpoint("x"), endpoint("y")], &[])
            .unwrap();
        s.commit_endpoints(&[], &["b/x".into()]).unwrap();
        // (Registered endpoints are live state: on etcd they go with the
        // replica that wrote them, so they are read before it stops.)
        let state = b.open().load().unwrap();
        assert_eq!(state.endpoints.keys().collect::<Vec<_>>(), ["b/y"]);
        assert_eq!(state.endpoints["b/y"].owner, "r1");
    }
    let state = b.open().load().unwrap();
    assert_eq!(state.revision, 2);
    assert_eq!(state.services.keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(state.services["b"].revision, 1);
}

/// Two writers racing on one revision: exactly one lands.
fn racing_commits_land_once(b: &dyn Backend) {
    let record = |name: &str| ServiceRecord {
        name: name.into(),
        namespace: "default".into(),
        spec: serde_json::json!({}),
        revision: 0,
    };
    let (s1, s2) = (b.open(), b.open());
    let t1 = std::thread::spawn(move || s1.commit_services(0, &[record("left")], &[]));
    let t2 = std::thread::spawn(move || s2.commit_services(0, &[record("right")], &[]));
    let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
    assert_eq!(
        [r1.is_ok(), r2.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{r1:?} {r2:?}"
    );
    let state = b.open().load().unwrap();
    assert_eq!(state.revision, 1);
    assert_eq!(state.services.len(), 1);
}

macro_rules! conformance {
    ($backend:expr) => {
        #[test]
        fn plugins_are_immutable_and_components_shared_and_collected() {
            super::plugins_are_immutable_and_components_shared_and_collected(&$backend);
        }
        #[test]
        fn tokens_are_used_up_atomically_and_refused_with_the_reason() {
            super::tokens_are_used_up_atomically_and_refused_with_the_reason(&$backend);
        }
        #[test]
        fn the_first_ca_stored_wins() {
            super::the_first_ca_stored_wins(&$backend);
        }
        #[test]
        fn services_commit_atomically_against_a_revision_and_survive_reopening() {
            super::services_commit_atomically_against_a_revision_and_survive_reopening(&$backend);
        }
        #[test]
        fn racing_commits_land_once() {
            super::racing_commits_land_once(&$backend);
        }
    };
}

mod embedded_store {
    conformance!(super::embedded());
}

#[cfg(feature = "etcd")]
mod etcd_store {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::etcd::{Etcd, EtcdUrl, SealingKey};
    use super::super::{CaRecord, EndpointRecord, Store, StoreError};
    use super::Backend;

    /// A real etcd on loopback, its data in a temporary directory, killed
    /// when dropped.
    pub struct EtcdServer {
        child: Child,
        pub client: String,
        dir: tempfile::TempDir,
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    impl EtcdServer {
        pub fn start() -> EtcdServer {
            let dir = tempfile::tempdir().unwrap();
            let (client, peer) = (free_port(), free_port());
            let client = format!("127.0.0.1:{client}");
            let peer = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("t={peer}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("etcd.log")).unwrap())
                .spawn()
                .expect("etcd must be installed (Debian: etcd-server) to test the etcd store");
            let s = EtcdServer { child, client, dir };
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(&s.client).is_err() {
                assert!(Instant::now() < deadline, "etcd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            s
        }

        fn key_file(&self) -> PathBuf {
            self.dir.path().join("store.key")
        }
    }

    impl Backend for EtcdServer {
        fn open(&self) -> Arc<dyn Store> {
            let url: EtcdUrl = format!("etcd://{}/test", self.client).parse().unwrap();
            let key = SealingKey::load_or_create(&self.key_file()).unwrap();
            Arc::new(Etcd::connect(&url, &Default::default(), key).unwrap())
        }
    }

    conformance!(EtcdServer::start());

    #[test]
    fn urls_name_members_and_a_prefix() {
        let u: EtcdUrl = "etcd://a:1,b:2/mesh/one/".parse().unwrap();
        assert_eq!(u.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(u.prefix, "/mesh/one");
        let u: EtcdUrl = "etcd://a:1".parse().unwrap();
        assert_eq!(u.prefix, "/wasmesh");
        for bad in [
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:x",
            "etcd://a:1/",
        ] {
            assert!(bad.parse::<EtcdUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ca_key_in_etcd_is_sealed_and_opens_only_with_its_key() {
        let server = EtcdServer::start();
        let s = server.open();
        let ca = CaRecord {
            trust_domain: "cluster.local".into(),
            chain_pem: "c".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----secret".into(),
            roots_pem: "r".into(),
        };
        s.init_ca(&ca).unwrap();
        // What etcd holds: no key in the clear.
        let out = Command::new("etcdctl")
            .args([
                "--endpoints",
                &server.client,
                "get",
                "/test/ca",
                "--print-value-only",
            ])
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        let stored = String::from_utf8_lossy(&out.stdout);
        assert!(stored.contains("sealed:aes-256-gcm:"), "{stored}");
        assert!(!stored.contains("secret"), "{stored}");
        // Another replica with another key cannot open it.
        let other = server.dir.path().join("other.key");
        let url: EtcdUrl = format!("etcd://{}/test", server.client).parse().unwrap();
        let s2 = Etcd::connect(
            &url,
            &Default::default(),
            SealingKey::load_or_create(&other).unwrap(),
        )
        .unwrap();
        let e = s2.ca().unwrap_err().to_string();
        assert!(e.contains("--store-key-file"), "{e}");
        assert_eq!(server.open().ca().unwrap().unwrap(), ca);
    }

    #[test]
    fn a_replicas_endpoints_and_status_go_when_it_stops() {
        let server = EtcdServer::start();
        let (a, b) = (server.open(), server.open());
        let endpoint = EndpointRecord {
            service: "s".into(),
            subset: "v1".into(),
            instance: "i".into(),
            address: "127.0.0.1:1".into(),
            identity: String::new(),
            owner: "a".into(),
        };
        a.commit_endpoints(&[endpoint], &[]).unwrap();
        a.commit_statuses(&[("s/i".into(), b"status".to_vec())], &[])
            .unwrap();
        assert_eq!(b.load().unwrap().endpoints.len(), 1);
        assert_eq!(
            b.statuses().unwrap(),
            [("s/i".to_string(), b"status".to_vec())]
        );
        drop(a);
        assert!(b.load().unwrap().endpoints.is_empty());
        assert!(b.statuses().unwrap().is_empty());
    }

    #[test]
    fn one_replica_leads_until_it_stops_then_another() {
        let server = EtcdServer::start();
        let (a, b) = (server.open(), server.open());
        assert!(a.lead().unwrap());
        assert!(!b.lead().unwrap());
        assert!(a.lead().unwrap(), "the leader keeps the lead");
        drop(a);
        assert!(b.lead().unwrap(), "the lead passes when the leader stops");
    }

    #[test]
    fn garbage_collection_removes_only_bytes_no_plugin_names_twice_in_a_row() {
        let server = EtcdServer::start();
        let s = server.open();
        let named = b"named".to_vec();
        s.put_plugin(&super::meta("1", &super::sha(&named)), &named)
            .unwrap();
        // Bytes a push left without its entry.
        let orphan = super::sha(b"orphan");
        let put = Command::new("etcdctl")
            .args(["--endpoints", &server.client, "put"])
            .arg(format!("/test/components/{orphan}/0000"))
            .arg("orphan")
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        assert!(put.status.success(), "{put:?}");
        assert_eq!(
            s.collect_garbage().unwrap(),
            0,
            "suspected only, the first time"
        );
        assert!(s.component(&orphan).unwrap().is_some());
        assert_eq!(s.collect_garbage().unwrap(), 1);
        assert_eq!(s.component(&orphan).unwrap(), None);
        assert_eq!(s.component(&super::sha(&named)).unwrap(), Some(named));
        assert_eq!(s.collect_garbage().unwrap(), 0);
    }

    #[test]
    fn with_etcd_down_calls_fail_fast_with_the_reason() {
        let server = EtcdServer::start();
        let s = server.open();
        drop(server);
        let started = Instant::now();
        let e = s.load().unwrap_err();
        assert!(matches!(e, StoreError::Backend(_)), "{e}");
        assert!(e.to_string().starts_with("the store failed: etcd: "), "{e}");
        // Within the request deadline (5 s), with room.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
}
