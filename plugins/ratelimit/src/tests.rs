use wasmesh_plugin_sdk::testing::{Harness, TestRequest};
use wasmesh_plugin_sdk::{Peer, RequestDecision};

use super::*;

fn limiter(config: &str) -> Harness<RateLimit> {
    Harness::new(config).unwrap()
}

const TEN_A_SECOND: &str =
    r#"{ "requestsPerSecond": 10, "burst": 20, "key": { "header": "x-user" } }"#;

fn from(user: &str) -> TestRequest {
    TestRequest::get("/").header("x-user", user)
}

fn limited(d: &RequestDecision) -> bool {
    d.reply.as_ref().is_some_and(|r| r.status == 429)
}

fn header<'a>(d: &'a RequestDecision, name: &str) -> Option<&'a str> {
    let from_reply = d
        .reply
        .as_ref()
        .and_then(|r| r.headers.iter().find(|h| h.name == name));
    let from_ops = d.response_headers.iter().find_map(|op| match op {
        wasmesh_plugin_sdk::HeaderOp::Set(h) if h.name == name => Some(h),
        _ => None,
    });
    from_reply.or(from_ops).map(|h| h.value.as_str())
}

/// Requests from `user` let through out of `n`.
fn let_through(h: &Harness<RateLimit>, user: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| !limited(&h.on_request(&from(user)).unwrap()))
        .count()
}

#[test]
fn a_burst_goes_through_then_the_rate_refills_it() {
    let h = limiter(TEN_A_SECOND);
    let first = h.on_request(&from("alice")).unwrap();
    assert!(!limited(&first));
    assert_eq!(header(&first, "ratelimit-limit"), Some("20"));
    assert_eq!(header(&first, "ratelimit-remaining"), Some("19"));
    assert_eq!(header(&first, "ratelimit-reset"), Some("1"));
    assert_eq!(let_through(&h, "alice", 30), 19);
    let refused = h.on_request(&from("alice")).unwrap();
    let reply = refused.reply.as_ref().unwrap();
    assert_eq!(reply.status, 429);
    assert_eq!(reply.flag, ReplyFlag::RateLimited);
    assert_eq!(header(&refused, "retry-after"), Some("1"));
    assert_eq!(header(&refused, "ratelimit-remaining"), Some("0"));
    assert_eq!(header(&refused, "ratelimit-reset"), Some("2"));
    // 100 ms at 10 a second: one token.
    h.advance(100);
    assert_eq!(let_through(&h, "alice", 5), 1);
    // 250 ms more: two and a half; the half waits.
    h.advance(250);
    assert_eq!(let_through(&h, "alice", 5), 2);
    h.advance(50);
    assert_eq!(let_through(&h, "alice", 5), 1);
    // Two seconds refill it all, never past the burst.
    h.advance(10_000);
    assert_eq!(let_through(&h, "alice", 30), 20);
    h.host(|host| assert_eq!(host.metrics["limited"], 11 + 1 + 4 + 3 + 4 + 10));
}

#[test]
fn each_client_has_its_own_bucket_and_no_header_means_the_ip() {
    let h = limiter(r#"{ "requestsPerSecond": 1, "burst": 2, "key": { "header": "x-user" } }"#);
    assert_eq!(let_through(&h, "alice", 5), 2);
    assert_eq!(let_through(&h, "bob", 5), 2);
    let anonymous = |port: u16, ip: &str| {
        TestRequest::get("/").source(Peer {
            address: format!("{ip}:{port}"),
            ..Peer::default()
        })
    };
    // The same IP from two ports is one client; another IP another.
    assert!(!limited(
        &h.on_request(&anonymous(1000, "10.0.0.1")).unwrap()
    ));
    assert!(!limited(
        &h.on_request(&anonymous(2000, "10.0.0.1")).unwrap()
    ));
    assert!(limited(
        &h.on_request(&anonymous(3000, "10.0.0.1")).unwrap()
    ));
    assert!(!limited(&h.on_request(&anonymous(1000, "[::1]")).unwrap()));
    h.host(|host| {
        assert!(host.entry("ip:10.0.0.1").is_some());
        assert!(host.entry("ip:::1").is_some());
    });
}

#[test]
fn a_spend_by_another_instance_between_read_and_write_is_respected() {
    let h = limiter(r#"{ "requestsPerSecond": 1, "burst": 3, "key": { "header": "x-user" } }"#);
    assert_eq!(let_through(&h, "alice", 1), 1);
    // Another worker takes alice's last two tokens while this request is
    // between its read and its compare-and-set: this one loses, reads
    // again, finds the bucket empty.
    h.before_next_write(|other| {
        let mut b: Bucket = serde_json::from_slice(&other.entry("h:alice").unwrap().value).unwrap();
        b.tokens -= 2.0;
        other
            .set("h:alice", &serde_json::to_vec(&b).unwrap())
            .unwrap();
    });
    assert!(limited(&h.on_request(&from("alice")).unwrap()));
}

#[test]
fn a_bucket_left_alone_for_a_full_refill_expires() {
    let h = limiter(TEN_A_SECOND);
    assert_eq!(let_through(&h, "alice", 1), 1);
    assert_eq!(let_through(&h, "bob", 1), 1);
    h.host(|host| assert_eq!(host.keys(), 2));
    // 20 tokens at 10 a second: two seconds, then the entry is gone (a
    // missing bucket is a full one).
    h.advance(1_999);
    h.host(|host| assert_eq!(host.keys(), 2));
    h.advance(1);
    h.host(|host| assert_eq!(host.keys(), 0));
    assert_eq!(let_through(&h, "alice", 30), 20);
}

#[test]
fn with_the_scope_full_the_least_recently_used_bucket_makes_room() {
    let h = limiter(r#"{ "requestsPerSecond": 1, "burst": 1 }"#);
    h.host(|host| {
        for i in 0..wasmesh_plugin_sdk::testing::STATE_KEY_CAP {
            host.add(&format!("other-{i}"), 1).unwrap();
        }
    });
    let newcomer = TestRequest::get("/").source(Peer {
        address: "192.0.2.9:1".into(),
        ..Peer::default()
    });
    assert!(!limited(&h.on_request(&newcomer).unwrap()));
    assert!(limited(&h.on_request(&newcomer).unwrap()));
    h.host(|host| {
        assert_eq!(host.keys(), wasmesh_plugin_sdk::testing::STATE_KEY_CAP);
        assert_eq!(host.counter("other-0"), 0, "evicted");
    });
}

#[test]
fn a_new_rate_keeps_the_buckets() {
    let slow = limiter(r#"{ "requestsPerSecond": 1, "burst": 5 }"#);
    let req = TestRequest::get("/");
    for _ in 0..5 {
        assert!(!limited(&slow.on_request(&req).unwrap()));
    }
    // The reloaded plugin is another instance on the same state.
    let fast = limiter(r#"{ "requestsPerSecond": 10, "burst": 5 }"#);
    assert!(limited(&fast.on_request(&req).unwrap()));
    fast.advance(100);
    assert!(!limited(&fast.on_request(&req).unwrap()));
}

#[test]
fn dry_run_counts_and_limits_nothing() {
    let h = limiter(r#"{ "requestsPerSecond": 1, "burst": 2, "dryRun": true }"#);
    for _ in 0..5 {
        let d = h.on_request(&TestRequest::get("/")).unwrap();
        assert_eq!(d, RequestDecision::proceed());
    }
    h.host(|host| {
        assert_eq!(host.metrics["dry_run_limited"], 3);
        assert!(!host.metrics.contains_key("limited"));
    });
}

#[test]
fn only_matching_requests_are_limited() {
    let h = limiter(
        r#"{ "requestsPerSecond": 1, "burst": 1, "match": [{ "uri": { "prefix": "/api" } }] }"#,
    );
    assert!(!limited(
        &h.on_request(&TestRequest::get("/api/a")).unwrap()
    ));
    assert!(limited(&h.on_request(&TestRequest::get("/api/b")).unwrap()));
    for _ in 0..5 {
        assert_eq!(
            h.on_request(&TestRequest::get("/static")).unwrap(),
            RequestDecision::proceed()
        );
    }
}

#[test]
fn the_principal_keys_mesh_callers_and_the_ip_the_rest() {
    let h = limiter(r#"{ "requestsPerSecond": 1, "burst": 1, "key": { "principal": {} } }"#);
    let caller = |p: Option<&str>| {
        TestRequest::get("/").source(Peer {
            principal: p.map(String::from),
            address: "10.0.0.7:4000".into(),
            ..Peer::default()
        })
    };
    let front = Some("spiffe://cluster.local/ns/default/sa/frontend");
    assert!(!limited(&h.on_request(&caller(front)).unwrap()));
    assert!(limited(&h.on_request(&caller(front)).unwrap()));
    assert!(!limited(&h.on_request(&caller(None)).unwrap()));
    h.host(|host| {
        assert!(
            host.entry("p:spiffe://cluster.local/ns/default/sa/frontend")
                .is_some()
        );
        assert!(host.entry("ip:10.0.0.7").is_some());
    });
}

#[test]
fn a_long_client_id_is_hashed_into_a_key() {
    let h = limiter(r#"{ "requestsPerSecond": 1, "burst": 1, "key": { "header": "x-user" } }"#);
    let long = "u".repeat(5_000);
    assert!(!limited(&h.on_request(&from(&long)).unwrap()));
    assert!(limited(&h.on_request(&from(&long)).unwrap()));
    h.host(|host| assert_eq!(host.keys(), 1));
}

#[test]
fn bad_configurations_name_the_field() {
    for (config, says) in [
        (r#"{ "requestsPerSecond": 0 }"#, "config.requestsPerSecond"),
        (r#"{ "requestsPerSecond": -1 }"#, "config.requestsPerSecond"),
        (r#"{ "requestsPerSecond": 1, "burst": 0 }"#, "config.burst"),
        (
            r#"{ "requestsPerSecond": 1, "key": { "header": "X-User" } }"#,
            "config.key.header",
        ),
        (
            r#"{ "requestsPerSecond": 1, "key": { "header": "x", "ip": {} } }"#,
            "key",
        ),
        (r#"{ "requestsPerSecond": 1, "keys": {} }"#, "keys"),
        (r#"{ "burst": 3 }"#, "requestsPerSecond"),
        (
            r#"{ "requestsPerSecond": 1, "match": [{ "uri": { "exact": "/", "prefix": "/" } }] }"#,
            "config.match[0].uri",
        ),
    ] {
        let e = Harness::<RateLimit>::new(config).err().unwrap();
        assert!(e.contains(says), "{config}: {e}");
    }
}
