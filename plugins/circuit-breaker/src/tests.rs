use super::*;
use wasmesh_plugin_sdk::Completion;
use wasmesh_plugin_sdk::Endpoint;
use wasmesh_plugin_sdk::testing::{Harness, TestRequest, TestResponse, attempt, with_host};

fn setup(endpoints: &[&str]) {
    with_host(|h| {
        h.ejections.clear();
        h.clear_state();
        h.endpoints.insert(
            String::new(),
            endpoints
                .iter()
                .map(|a| Endpoint {
                    subset: "v1".into(),
                    address: a.to_string(),
                    ejected: false,
                })
                .collect(),
        );
    });
}

fn outcome(h: &Harness<CircuitBreaker>, ep: &str, o: Outcome) {
    let req = TestRequest::get("/");
    h.on_response(
        &req,
        &TestResponse::status(o.status().unwrap_or(0)),
        &attempt(1, o, ep),
    )
    .unwrap();
}

fn ejected(ep: &str) -> bool {
    with_host(|h| h.endpoints[""].iter().any(|e| e.address == ep && e.ejected))
}

#[test]
fn consecutive_errors_eject_for_base_time_times_ejections() {
    setup(&["a", "b", "c"]);
    let h = Harness::<CircuitBreaker>::new(
        r#"{"outlierDetection":{"consecutive5xxErrors":3,"baseEjectionTime":"1s","maxEjectionPercent":100}}"#,
    )
    .unwrap();
    outcome(&h, "a", Outcome::Response(500));
    outcome(&h, "a", Outcome::Response(500));
    outcome(&h, "a", Outcome::Response(200)); // a success resets the run
    outcome(&h, "a", Outcome::Response(500));
    outcome(&h, "a", Outcome::Response(500));
    assert!(!ejected("a"));
    outcome(&h, "a", Outcome::ConnectFailure);
    assert!(ejected("a"));
    assert_eq!(
        with_host(|h| h.ejections.last().cloned()).unwrap().1 - with_host(|h| h.clock_ms),
        1000
    );
    with_host(|h| h.advance(1001));
    assert!(!ejected("a"), "back after the ejection time");
    for _ in 0..3 {
        outcome(&h, "a", Outcome::Response(503));
    }
    let until = with_host(|h| h.ejections.last().cloned()).unwrap().1 - with_host(|h| h.clock_ms);
    assert_eq!(until, 2000, "the second ejection lasts twice as long");
}

#[test]
fn max_ejection_percent_is_honoured_but_one_may_always_go() {
    setup(&["a", "b", "c"]);
    let h = Harness::<CircuitBreaker>::new(
        r#"{"outlierDetection":{"consecutive5xxErrors":1,"maxEjectionPercent":34}}"#,
    )
    .unwrap();
    outcome(&h, "a", Outcome::Response(500));
    outcome(&h, "b", Outcome::Response(500));
    assert!(ejected("a"));
    assert!(!ejected("b"), "34% of 3 allows one ejection");
    setup(&["a", "b", "c"]);
    let h = Harness::<CircuitBreaker>::new(
        r#"{"outlierDetection":{"consecutive5xxErrors":1,"maxEjectionPercent":10}}"#,
    )
    .unwrap();
    outcome(&h, "a", Outcome::Response(500));
    assert!(ejected("a"), "at least one endpoint may be ejected");
}

#[test]
fn gateway_errors_count_only_gateway_failures() {
    setup(&["a", "b"]);
    let h = Harness::<CircuitBreaker>::new(
        r#"{"outlierDetection":{"consecutive5xxErrors":100,"consecutiveGatewayErrors":2,"maxEjectionPercent":100}}"#,
    )
    .unwrap();
    outcome(&h, "a", Outcome::Response(500));
    outcome(&h, "a", Outcome::Response(500));
    assert!(!ejected("a"), "500 is not a gateway error");
    outcome(&h, "a", Outcome::Response(502));
    outcome(&h, "a", Outcome::Timeout);
    assert!(ejected("a"));
}

#[test]
fn in_flight_limit_overflows_fast_and_is_released_when_a_request_ends() {
    setup(&["a"]);
    let h = Harness::<CircuitBreaker>::new(
        r#"{"connectionPool":{"http":{"http1MaxPendingRequests":2}}}"#,
    )
    .unwrap();
    let req = |id: &str| {
        let mut r = TestRequest::get("/");
        r.id = id.into();
        r
    };
    let (a, b, c) = (req("a"), req("b"), req("c"));
    assert!(h.on_request(&a).unwrap().reply.is_none());
    assert!(h.on_request(&b).unwrap().reply.is_none());
    // Under the cap the proxy holds the count itself: no call.
    assert_eq!(h.on_request_calls(), 0);
    let r = h.on_request(&c).unwrap().reply.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.flag, wasmesh_plugin_sdk::ReplyFlag::Overflow);
    // The request that found the cap full is the plugin's to refuse.
    assert_eq!(h.on_request_calls(), 1);
    assert_eq!(h.host(|host| host.metrics["overflow"]), 1);
    let done = Completion {
        status: Some(200),
        attempts: 1,
        duration_us: 1,
    };
    // The refused request ends: a and b still hold both slots.
    h.on_complete(&c, &done);
    let d = req("d");
    assert!(h.on_request(&d).unwrap().reply.is_some(), "still full");
    h.on_complete(&d, &done);
    // a ends: its slot is free (the plugin has no on_complete; the host
    // releases the hold).
    h.on_complete(&a, &done);
    let req = req("e");
    assert!(h.on_request(&req).unwrap().reply.is_none(), "released");
    assert_eq!(
        h.on_request_calls(),
        2,
        "d was refused by the plugin, e was not a call"
    );
    assert_eq!(h.host(|host| host.counter("in-flight")), 2, "b and e hold");
}

#[test]
fn bad_configs_name_the_field() {
    let e = |c: &str| Harness::<CircuitBreaker>::new(c).err().unwrap();
    assert!(
        e(r#"{"outlierDetection":{"maxEjectionPercent":150}}"#)
            .contains("config.outlierDetection.maxEjectionPercent")
    );
    assert!(
        e(r#"{"outlierDetection":{"baseEjectionTime":"long"}}"#)
            .contains("config.outlierDetection.baseEjectionTime")
    );
    assert!(
        e(r#"{"connectionPool":{"http":{"http2MaxRequests":0}}}"#)
            .contains("config.connectionPool.http")
    );
    assert!(
        e(r#"{"outlierDetection":{"consecutiveErrors":5}}"#)
            .contains("unknown field `consecutiveErrors`")
    );
}

#[test]
fn min_health_percent_stops_ejections_when_too_few_are_healthy() {
    setup(&["a", "b", "c", "d"]);
    let h = Harness::<CircuitBreaker>::new(
        r#"{"outlierDetection":{"consecutive5xxErrors":1,"maxEjectionPercent":100,"minHealthPercent":60}}"#,
    )
    .unwrap();
    outcome(&h, "a", Outcome::Response(500));
    assert!(ejected("a"), "4 of 4 healthy: 100% ≥ 60%");
    outcome(&h, "b", Outcome::Response(500));
    assert!(ejected("b"), "3 of 4 healthy: 75% ≥ 60%");
    outcome(&h, "c", Outcome::Response(500));
    assert!(
        !ejected("c"),
        "2 of 4 healthy: 50% < 60%, outlier detection pauses"
    );
}

#[test]
fn hooks_a_configuration_does_not_need_are_not_called() {
    use wasmesh_plugin_sdk::Hooks;
    let hooks = |config: &str| Harness::<CircuitBreaker>::new(config).unwrap().hooks();
    let on = |req, resp| Hooks {
        on_request: req,
        on_response: resp,
        on_complete: false,
    };
    assert_eq!(hooks("{}"), on(false, false));
    assert_eq!(hooks(r#"{"outlierDetection":{}}"#), on(false, true));
    assert_eq!(
        hooks(r#"{"outlierDetection":{"consecutive5xxErrors":0}}"#),
        on(false, false)
    );
    assert_eq!(
        hooks(r#"{"connectionPool":{"http":{"http1MaxPendingRequests":10}}}"#),
        on(true, false)
    );
}

#[test]
fn on_response_is_asked_for_errors_and_the_success_that_ends_a_run() {
    setup(&["a", "b"]);
    let h = Harness::<CircuitBreaker>::new(
        r#"{"outlierDetection":{"consecutive5xxErrors":2,"baseEjectionTime":"1s","maxEjectionPercent":100}}"#,
    )
    .unwrap();
    let asked = h.response_outcomes();
    assert!(asked.contains(Outcomes::STATUS_5XX | Outcomes::NEXT_ON_ENDPOINT));
    assert!(!asked.intersects(Outcomes::STATUS_2XX));
    // Runs on two endpoints interleaved: b's error run does not let a's
    // success be missed, nor a's success end b's run.
    outcome(&h, "a", Outcome::Response(200));
    outcome(&h, "a", Outcome::Response(500));
    outcome(&h, "b", Outcome::Response(500));
    outcome(&h, "a", Outcome::Response(200));
    outcome(&h, "b", Outcome::Response(200));
    outcome(&h, "a", Outcome::Response(200));
    outcome(&h, "a", Outcome::Response(500));
    outcome(&h, "b", Outcome::Response(500));
    assert!(!ejected("a") && !ejected("b"), "no run reached 2");
    outcome(&h, "b", Outcome::Reset);
    assert!(ejected("b") && !ejected("a"));
}
