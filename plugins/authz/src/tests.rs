use super::*;
use wasmesh_plugin_sdk::Peer;
use wasmesh_plugin_sdk::testing::{Harness, TestRequest, with_host};

fn authz(config: &str) -> Harness<Authz> {
    Harness::new(config).unwrap_or_else(|e| panic!("refused: {e}"))
}

fn allowed(h: &Harness<Authz>, req: &TestRequest) -> bool {
    h.on_request(req).unwrap().reply.is_none()
}

fn from(principal: Option<&str>, address: &str) -> Peer {
    Peer {
        principal: principal.map(str::to_string),
        namespace: principal
            .and_then(|p| p.split("/ns/").nth(1))
            .and_then(|r| r.split('/').next())
            .map(str::to_string),
        address: address.into(),
    }
}

#[test]
fn allow_matches_paths_methods_headers_and_ip_blocks() {
    let h = authz(
        r#"{"action":"ALLOW","rules":[
            {"to":[{"operation":{"methods":["GET"],"paths":["/public/*","/health"]}}]},
            {"from":[{"source":{"ipBlocks":["10.1.0.0/16"]}}]},
            {"when":[{"key":"request.headers[x-token]","values":["secret"]}]}
        ]}"#,
    );
    assert!(allowed(&h, &TestRequest::get("/public/a?x=1")));
    assert!(allowed(&h, &TestRequest::get("/health")));
    assert!(!allowed(&h, &TestRequest::get("/public/a").method("POST")));
    assert!(!allowed(&h, &TestRequest::get("/private")));
    assert!(allowed(
        &h,
        &TestRequest::get("/private").source(from(None, "10.1.2.3:5000"))
    ));
    assert!(allowed(
        &h,
        &TestRequest::get("/private").header("x-token", "secret")
    ));
    let r = h
        .on_request(&TestRequest::get("/private"))
        .unwrap()
        .reply
        .unwrap();
    assert_eq!(
        (r.status, r.body.as_slice()),
        (403, b"RBAC: access denied\n".as_slice())
    );
}

#[test]
fn principals_and_namespaces_come_from_the_verified_identity() {
    let h = authz(
        r#"{"rules":[{"from":[{"source":{"principals":["cluster.local/ns/default/sa/productpage"]}},
                               {"source":{"namespaces":["istio-system"]}}]}]}"#,
    );
    let pp = from(
        Some("spiffe://cluster.local/ns/default/sa/productpage"),
        "10.0.0.1:1",
    );
    let gw = from(
        Some("spiffe://cluster.local/ns/istio-system/sa/ingress"),
        "10.0.0.2:1",
    );
    let other = from(
        Some("spiffe://cluster.local/ns/default/sa/reviews"),
        "10.0.0.3:1",
    );
    assert!(allowed(&h, &TestRequest::get("/").source(pp)));
    assert!(allowed(&h, &TestRequest::get("/").source(gw)));
    assert!(!allowed(&h, &TestRequest::get("/").source(other)));
    assert!(
        !allowed(&h, &TestRequest::get("/")),
        "no identity, no match"
    );
}

#[test]
fn deny_wins_over_allow_and_an_unmatched_allow_denies() {
    let h = authz(
        r#"{"policies":[
            {"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]},
            {"action":"ALLOW","rules":[{"to":[{"operation":{"paths":["/admin/ok","/app*"]}}]}]}
        ]}"#,
    );
    assert!(
        !allowed(&h, &TestRequest::get("/admin/ok")),
        "DENY is evaluated first"
    );
    assert!(allowed(&h, &TestRequest::get("/app/x")));
    assert!(
        !allowed(&h, &TestRequest::get("/other")),
        "an ALLOW policy matching nothing denies"
    );
    // Only DENY policies: everything else is allowed.
    let h = authz(r#"{"action":"DENY","rules":[{"to":[{"operation":{"notMethods":["GET"]}}]}]}"#);
    assert!(allowed(&h, &TestRequest::get("/x")));
    assert!(!allowed(&h, &TestRequest::get("/x").method("DELETE")));
    // An ALLOW policy without rules allows nothing.
    assert!(!allowed(
        &authz(r#"{"action":"ALLOW"}"#),
        &TestRequest::get("/")
    ));
}

#[test]
fn dry_run_logs_and_counts_but_lets_traffic_through() {
    let h = authz(
        r#"{"action":"DENY","dryRun":true,"rules":[{"to":[{"operation":{"paths":["/blocked"]}}]}]}"#,
    );
    with_host(|h| h.metrics.clear());
    assert!(allowed(&h, &TestRequest::get("/blocked")));
    assert!(allowed(&h, &TestRequest::get("/fine")));
    assert_eq!(
        with_host(|h| h.metrics.get("dry_run_denied").copied()),
        Some(1)
    );
    assert!(with_host(|h| h
        .logs
        .iter()
        .any(|(_, l)| l.contains("would deny GET /blocked"))));
}

#[test]
fn bad_configs_name_the_field() {
    let e = |c: &str| Harness::<Authz>::new(c).err().unwrap();
    assert!(e(r#"{"action":"MAYBE"}"#).contains("config.action"));
    assert!(e(r#"{"action":"CUSTOM"}"#).contains("not supported"));
    assert!(
        e(r#"{"rules":[{"from":[{"source":{"ipBlocks":["10.0.0.0/99"]}}]}]}"#)
            .contains("config.rules[0].from[0].source.ipBlocks[0]")
    );
    assert!(
        e(r#"{"rules":[{"when":[{"key":"request.auth.claims[iss]","values":["x"]}]}]}"#)
            .contains("config.rules[0].when[0].key")
    );
    assert!(
        e(r#"{"policies":[{"rules":[{"to":[{"operation":{"ports":["http"]}}]}]}]}"#)
            .contains("config.policies[0].rules[0].to[0].operation.ports[0]")
    );
    assert!(
        e(r#"{"rules":[{"to":[{"operation":{"verbs":["GET"]}}]}]}"#)
            .contains("unknown field `verbs`")
    );
}

#[test]
fn hosts_ports_and_their_negations() {
    let h = authz(
        r#"{"rules":[{"to":[{"operation":{"hosts":["*.example.com"],"notHosts":["admin.example.com"],"ports":["8080"]}}]}]}"#,
    );
    let req = |authority: &str, port: u16| {
        let mut r = TestRequest::get("/");
        r.authority = authority.into();
        r.port = port;
        r
    };
    assert!(
        allowed(&h, &req("WWW.Example.com:8080", 8080)),
        "hosts are case-insensitive, port ignored in the host"
    );
    assert!(!allowed(&h, &req("admin.example.com", 8080)));
    assert!(!allowed(&h, &req("www.example.com", 9090)));
    assert!(!allowed(&h, &req("example.org", 8080)));
    let h = authz(r#"{"action":"DENY","rules":[{"to":[{"operation":{"notPorts":["8080"]}}]}]}"#);
    assert!(allowed(&h, &req("x", 8080)));
    assert!(!allowed(&h, &req("x", 9090)));
}

#[test]
fn when_conditions_on_source_ip_and_port() {
    let h = authz(
        r#"{"rules":[{"when":[{"key":"source.ip","values":["10.0.0.0/8"],"notValues":["10.9.0.0/16"]},
                              {"key":"destination.port","values":["80"]}]}]}"#,
    );
    assert!(allowed(
        &h,
        &TestRequest::get("/").source(from(None, "10.1.1.1:1"))
    ));
    assert!(!allowed(
        &h,
        &TestRequest::get("/").source(from(None, "10.9.1.1:1"))
    ));
    assert!(!allowed(
        &h,
        &TestRequest::get("/").source(from(None, "192.168.1.1:1"))
    ));
}

#[test]
fn audit_logs_only_and_negated_principals_and_principal_conditions() {
    let h = authz(
        r#"{"policies":[
            {"action":"AUDIT","rules":[{"to":[{"operation":{"paths":["/audited"]}}]}]},
            {"action":"ALLOW","rules":[
                {"from":[{"source":{"notPrincipals":["cluster.local/ns/default/sa/evil"],"notNamespaces":["quarantine"]}}]},
                {"when":[{"key":"source.principal","values":["cluster.local/ns/ops/sa/admin"]}]}
            ]}
        ]}"#,
    );
    with_host(|h| h.metrics.clear());
    let good = from(
        Some("spiffe://cluster.local/ns/default/sa/good"),
        "10.0.0.1:1",
    );
    let evil = from(
        Some("spiffe://cluster.local/ns/default/sa/evil"),
        "10.0.0.1:1",
    );
    let quarantined = from(
        Some("spiffe://cluster.local/ns/quarantine/sa/x"),
        "10.0.0.1:1",
    );
    assert!(allowed(&h, &TestRequest::get("/audited").source(good)));
    assert_eq!(
        with_host(|h| h.metrics.get("audit").copied()),
        Some(1),
        "AUDIT only counts"
    );
    assert!(!allowed(&h, &TestRequest::get("/").source(evil)));
    assert!(!allowed(&h, &TestRequest::get("/").source(quarantined)));
    // No identity: notPrincipals holds (nothing to exclude), as in Istio.
    assert!(allowed(&h, &TestRequest::get("/")));
}

#[test]
fn policies_on_methods_paths_and_ports_are_a_table_that_decides_as_on_request() {
    let configs = [
        // One ALLOW on methods and path prefixes (the benchmark's shape).
        r#"{"action":"ALLOW","rules":[{"to":[{"operation":{"methods":["GET","HEAD"],"paths":["/api/*","/health"]}}]}]}"#,
        // DENY before ALLOW, ports, a rule for every request.
        r#"{"policies":[
            {"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin/*"]}}]},{"to":[{"operation":{"ports":["9090"]}}]}]},
            {"action":"ALLOW","rules":[{"to":[{"operation":{"methods":["POST"]}}]}]},
            {"action":"ALLOW","rules":[{"to":[{"operation":{"paths":["*"],"methods":["GET"]}}]}]}
        ]}"#,
        // Only DENY: everything else proceeds.
        r#"{"action":"DENY","rules":[{"to":[{"operation":{"methods":["DELETE"]}}]}]}"#,
        // An ALLOW without rules allows nothing.
        r#"{"action":"ALLOW"}"#,
        // A rule without `to` matches every request.
        r#"{"action":"DENY","rules":[{}]}"#,
    ];
    let requests = [
        TestRequest::get("/api/x?y=1"),
        TestRequest::get("/api"),
        TestRequest::get("/health").method("HEAD"),
        TestRequest::get("/health").method("POST"),
        TestRequest::get("/admin/users"),
        TestRequest::get("/admin/users").method("POST"),
        TestRequest::get("/other").method("DELETE"),
        TestRequest::get("/other").method("PUT"),
    ];
    for config in configs {
        let h = authz(config);
        let table = h
            .table_on_request()
            .unwrap_or_else(|| panic!("{config} is a table"));
        for req in &requests {
            let want = h.on_request(req).unwrap();
            let got = wasmesh_istio::table_decisions(table, &Request::native(req)).unwrap();
            assert_eq!(got, vec![want], "{config}: {:?} {:?}", req.method, req.path);
        }
    }
    // A port: the table matches the destination port as the plugin does.
    let h = authz(
        r#"{"action":"DENY","rules":[{"to":[{"operation":{"ports":["9090"],"methods":["GET"]}}]}]}"#,
    );
    let table = h.table_on_request().unwrap();
    assert_eq!(
        table.rules[0].when,
        r#"[{"method":{"exact":"GET"},"port":9090}]"#
    );
    assert_eq!(table.rules[0].count.as_deref(), Some("denied"));
}

#[test]
fn policies_that_read_more_are_no_table() {
    for config in [
        r#"{"action":"ALLOW","rules":[{"from":[{"source":{"principals":["cluster.local/ns/a/sa/b"]}}]}]}"#,
        r#"{"action":"ALLOW","rules":[{"when":[{"key":"request.headers[x-token]","values":["secret"]}]}]}"#,
        r#"{"action":"ALLOW","rules":[{"to":[{"operation":{"hosts":["example.com"]}}]}]}"#,
        r#"{"action":"ALLOW","rules":[{"to":[{"operation":{"notPaths":["/x"]}}]}]}"#,
        r#"{"action":"ALLOW","rules":[{"to":[{"operation":{"paths":["*.css"]}}]}]}"#,
        r#"{"action":"AUDIT","rules":[{}]}"#,
        r#"{"action":"DENY","dryRun":true,"rules":[{}]}"#,
    ] {
        assert!(authz(config).table_on_request().is_none(), "{config}");
    }
}
