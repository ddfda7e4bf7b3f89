use super::*;
use wasmesh_plugin_sdk::testing::{Harness, TestRequest};

fn router(config: &str) -> Harness<Router> {
    Harness::new(config).unwrap_or_else(|e| panic!("config refused: {e}"))
}

fn subset(d: &RequestDecision) -> Option<&str> {
    d.route.as_ref().and_then(|r| r.subset.as_deref())
}

#[test]
fn first_matching_route_wins_and_a_header_match_routes_to_its_subset() {
    let h = router(
        r#"{"http":[
            {"match":[{"headers":{"end-user":{"exact":"jason"}}}],"route":[{"destination":{"subset":"v2"}}]},
            {"route":[{"destination":{"subset":"v1"}}]}
        ]}"#,
    );
    let d = h
        .on_request(&TestRequest::get("/").header("end-user", "jason"))
        .unwrap();
    assert_eq!(subset(&d), Some("v2"));
    let d = h
        .on_request(&TestRequest::get("/").header("end-user", "bob"))
        .unwrap();
    assert_eq!(subset(&d), Some("v1"));
}

#[test]
fn weights_split_close_to_their_ratio() {
    let h = router(
        r#"{"http":[{"route":[
            {"destination":{"subset":"v1"},"weight":90},
            {"destination":{"subset":"v2"},"weight":10}
        ]}]}"#,
    );
    let n = 10_000;
    let v2 = (0..n)
        .filter(|_| subset(&h.on_request(&TestRequest::get("/")).unwrap()) == Some("v2"))
        .count();
    let share = v2 as f64 / n as f64;
    assert!((0.08..0.12).contains(&share), "v2 share {share}");
}

#[test]
fn sticky_keeps_each_user_on_one_subset() {
    let h = router(
        r#"{"http":[{"sticky":{"header":"end-user"},"route":[
            {"destination":{"subset":"v1"},"weight":50},
            {"destination":{"subset":"v2"},"weight":50}
        ]}]}"#,
    );
    let mut seen = std::collections::HashMap::new();
    for round in 0..5 {
        for user in 0..200 {
            let req = TestRequest::get("/").header("end-user", &format!("user-{user}"));
            let s = subset(&h.on_request(&req).unwrap()).unwrap().to_string();
            let first = seen.entry(user).or_insert_with(|| s.clone());
            assert_eq!(*first, s, "user-{user} moved in round {round}");
        }
    }
    let v2 = seen.values().filter(|s| *s == "v2").count();
    assert!(
        (60..140).contains(&v2),
        "users are spread: {v2} of 200 on v2"
    );
}

#[test]
fn uri_method_query_and_without_headers_match_as_istio_does() {
    let h = router(
        r#"{"http":[
            {"match":[{"uri":{"prefix":"/api"},"method":{"exact":"POST"}}],"route":[{"destination":{"subset":"post"}}]},
            {"match":[{"uri":{"regex":"/items/[0-9]+"}}],"route":[{"destination":{"subset":"item"}}]},
            {"match":[{"queryParams":{"debug":{"exact":"1"}}}],"route":[{"destination":{"subset":"debug"}}]},
            {"match":[{"uri":{"exact":"/CASE"},"ignoreUriCase":true}],"route":[{"destination":{"subset":"case"}}]},
            {"match":[{"withoutHeaders":{"x-canary":{}}}],"route":[{"destination":{"subset":"stable"}}]},
            {"route":[{"destination":{"subset":"canary"}}]}
        ]}"#,
    );
    let s = |r: TestRequest| subset(&h.on_request(&r).unwrap()).map(str::to_string);
    assert_eq!(
        s(TestRequest::get("/api/x").method("POST")).as_deref(),
        Some("post")
    );
    assert_eq!(s(TestRequest::get("/items/42")).as_deref(), Some("item"));
    assert_eq!(
        s(TestRequest::get("/items/42/x")).as_deref(),
        Some("stable"),
        "regex matches the whole path"
    );
    assert_eq!(
        s(TestRequest::get("/x?a=2&debug=1")).as_deref(),
        Some("debug")
    );
    assert_eq!(s(TestRequest::get("/case")).as_deref(), Some("case"));
    assert_eq!(s(TestRequest::get("/other")).as_deref(), Some("stable"));
    assert_eq!(
        s(TestRequest::get("/other").header("x-canary", "1")).as_deref(),
        Some("canary")
    );
}

#[test]
fn rewrite_headers_and_timeout_come_with_the_route() {
    let h = router(
        r#"{"http":[{
            "match":[{"uri":{"prefix":"/old"}}],
            "rewrite":{"uri":"/new","authority":"backend"},
            "headers":{"request":{"set":{"x-a":"1"},"remove":["x-b"]},"response":{"add":{"x-c":"2"}}},
            "timeout":"1.5s",
            "route":[{"destination":{"host":"reviews","subset":"v1"},
                      "headers":{"request":{"set":{"x-dest":"v1"}}}}]
        }]}"#,
    );
    let d = h.on_request(&TestRequest::get("/old/page?q=1")).unwrap();
    let r = d.route.as_ref().unwrap();
    assert_eq!(r.path.as_deref(), Some("/new/page?q=1"));
    assert_eq!(r.authority.as_deref(), Some("backend"));
    assert_eq!(r.service.as_deref(), Some("reviews"));
    assert_eq!(d.timeout_ms, Some(1500));
    assert_eq!(
        d.request_headers,
        vec![
            HeaderOp::Set(Header::new("x-a", "1")),
            HeaderOp::Remove("x-b".into()),
            HeaderOp::Set(Header::new("x-dest", "v1")),
        ]
    );
    assert_eq!(
        d.response_headers,
        vec![HeaderOp::Append(Header::new("x-c", "2"))]
    );
}

#[test]
fn redirect_and_direct_response_reply_locally() {
    let h = router(
        r#"{"http":[
            {"match":[{"uri":{"exact":"/moved"}}],"redirect":{"uri":"/here","redirectCode":302}},
            {"match":[{"uri":{"exact":"/health"}}],"directResponse":{"status":200,"body":{"string":"ok"}}}
        ]}"#,
    );
    let d = h.on_request(&TestRequest::get("/moved")).unwrap();
    let r = d.reply.unwrap();
    assert_eq!(r.status, 302);
    assert_eq!(
        r.headers,
        vec![Header::new("location", "http://reviews/here")]
    );
    let r = h
        .on_request(&TestRequest::get("/health"))
        .unwrap()
        .reply
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
    let r = h
        .on_request(&TestRequest::get("/nothing"))
        .unwrap()
        .reply
        .unwrap();
    assert_eq!(r.status, 404, "no rule matched");
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let refused = |c: &str| Harness::<Router>::new(c).err().expect("refused");
    let e = refused(
        r#"{"http":[{"retries":{"attempts":3},"route":[{"destination":{"subset":"v1"}}]}]}"#,
    );
    assert!(
        e.contains("config.http[0].retries") && e.contains("builtin:retry"),
        "{e}"
    );
    let e = refused(r#"{"http":[{"fault":{},"route":[{"destination":{"subset":"v1"}}]}]}"#);
    assert!(e.contains("builtin:fault-injection"), "{e}");
    let e = refused(r#"{"http":[{"match":[{"uri":{"regex":"("}}],"route":[{"destination":{}}]}]}"#);
    assert!(e.starts_with("config.http[0].match[0].uri.regex"), "{e}");
    let e = refused(
        r#"{"http":[{"match":[{"uri":{"exact":"/","prefix":"/"}}],"route":[{"destination":{}}]}]}"#,
    );
    assert!(e.contains("give one of exact, prefix, regex"), "{e}");
    let e = refused(r#"{"http":[{"route":[{"destination":{"subset":"a"},"weight":0}]}]}"#);
    assert!(e.contains("config.http[0].route"), "{e}");
    let e = refused(r#"{"http":[{"timeout":"2","route":[{"destination":{}}]}]}"#);
    assert!(e.contains("config.http[0].timeout"), "{e}");
    let e = refused(r#"{"http":[{}]}"#);
    assert!(
        e.contains("give one of route, redirect, directResponse"),
        "{e}"
    );
    let e = refused(r#"{"http":[{"route":[{"destination":{}}],"bogus":1}]}"#);
    assert!(
        e.contains("config.http[0]") && e.contains("unknown field `bogus`"),
        "{e}"
    );
    let e = refused(r#"{"http":[{"redirect":{"redirectCode":200}}]}"#);
    assert!(e.contains("redirectCode"), "{e}");
}

#[test]
fn scheme_authority_and_port_match_and_redirect_keeps_what_it_leaves_out() {
    let h = router(
        r#"{"http":[
            {"match":[{"authority":{"prefix":"api."},"port":8080,"scheme":{"exact":"http"}}],"route":[{"destination":{"subset":"api"}}]},
            {"match":[{"uri":{"prefix":"/go"}}],"redirect":{"authority":"new.example","scheme":"https"}},
            {"route":[{"destination":{"subset":"rest"}}]}
        ]}"#,
    );
    let mut r = TestRequest::get("/x");
    r.authority = "api.example".into();
    r.port = 8080;
    assert_eq!(subset(&h.on_request(&r).unwrap()), Some("api"));
    r.port = 80;
    assert_eq!(
        subset(&h.on_request(&r).unwrap()),
        Some("rest"),
        "port must match too"
    );
    let reply = h
        .on_request(&TestRequest::get("/go/there?q=1"))
        .unwrap()
        .reply
        .unwrap();
    assert_eq!(reply.status, 301, "Istio's default redirect code");
    assert_eq!(
        reply.headers,
        vec![Header::new("location", "https://new.example/go/there?q=1")]
    );
}

fn table_decisions(table: &RequestTable, req: &TestRequest) -> Vec<RequestDecision> {
    wasmesh_istio::table_decisions(table, &Request::native(req)).unwrap()
}

#[test]
fn matching_and_weighted_routes_are_a_table_that_decides_as_on_request() {
    let h = router(
        r#"{"http":[
            {"match":[{"headers":{"end-user":{"exact":"jason"}}},{"uri":{"prefix":"/canary"},"method":{"exact":"POST"}}],
             "route":[{"destination":{"subset":"v2"},"headers":{"request":{"set":{"x-canary":"1"}}}}],
             "timeout":"2s"},
            {"match":[{"uri":{"exact":"/gone"}}],"directResponse":{"status":410,"body":{"string":"gone\n"}}},
            {"match":[{"uri":{"regex":"/api/v[0-9]+/.*"},"ignoreUriCase":true}],
             "route":[{"destination":{"subset":"v1"},"weight":90},{"destination":{"host":"reviews","subset":"v3"},"weight":10},{"destination":{"subset":"v9"},"weight":0}],
             "rewrite":{"authority":"reviews.internal"},
             "headers":{"response":{"add":{"x-route":"api"}}}}
        ]}"#,
    );
    let table = h.table_on_request().expect("these routes are a table");
    assert_eq!(table.rules.len(), 3);
    let requests = [
        TestRequest::get("/").header("end-user", "jason"),
        TestRequest::get("/canary/x").method("POST"),
        TestRequest::get("/canary/x"),
        TestRequest::get("/gone"),
        TestRequest::get("/gone?x=1"),
        TestRequest::get("/API/V2/items?page=3"),
        TestRequest::get("/elsewhere"),
    ];
    for req in &requests {
        let possible = table_decisions(table, req);
        for _ in 0..50 {
            let d = h.on_request(req).unwrap();
            assert!(
                possible.contains(&d),
                "on_request decided {d:?}, the table one of {possible:?}"
            );
        }
    }
    // The weighted rule offers exactly its two drawable destinations.
    let api = table_decisions(table, &TestRequest::get("/api/v1/x"));
    let subsets: Vec<_> = api.iter().map(subset).collect();
    assert_eq!(subsets, [Some("v1"), Some("v3")]);
    assert_eq!(table.rules[2].decisions[0].0, 90);
    assert_eq!(table.rules[2].decisions[1].0, 10);
    assert_eq!(
        table_decisions(table, &TestRequest::get("/elsewhere"))[0]
            .reply
            .as_ref()
            .map(|r| r.status),
        Some(404)
    );
}

#[test]
fn routes_that_read_more_than_their_match_are_no_table() {
    for config in [
        // A prefix rewrite reads the path.
        r#"{"http":[{"match":[{"uri":{"prefix":"/v1"}}],"rewrite":{"uri":"/v2"},"route":[{"destination":{"subset":"v1"}}]}]}"#,
        // A redirect keeps what the request had.
        r#"{"http":[{"redirect":{"uri":"/new"}}]}"#,
        // A sticky split hashes a header.
        r#"{"http":[{"sticky":{"header":"end-user"},"route":[{"destination":{"subset":"v1"},"weight":50},{"destination":{"subset":"v2"},"weight":50}]}]}"#,
    ] {
        assert!(router(config).table_on_request().is_none(), "{config}");
    }
}
