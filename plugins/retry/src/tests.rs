use super::*;
use wasmesh_plugin_sdk::Completion;
use wasmesh_plugin_sdk::testing::{Harness, TestRequest, TestResponse, attempt};

fn retry(config: &str) -> Harness<Retry> {
    Harness::new(config).unwrap_or_else(|e| panic!("refused: {e}"))
}

fn decide(h: &Harness<Retry>, req: &TestRequest, n: u32, outcome: Outcome) -> Option<u32> {
    let resp = TestResponse::status(outcome.status().unwrap_or(0));
    h.on_response(req, &resp, &attempt(n, outcome, "10.0.0.1:80"))
        .unwrap()
        .retry_after_ms
}

#[test]
fn retries_5xx_up_to_attempts_with_a_bounded_jittered_backoff() {
    let h = retry(
        r#"{"attempts":3,"perTryTimeout":"2s","retryOn":"5xx","backoff":{"baseInterval":"10ms","maxInterval":"40ms"}}"#,
    );
    let req = TestRequest::get("/");
    assert_eq!(h.on_request(&req).unwrap().per_try_timeout_ms, Some(2000));
    for n in 1..=3 {
        let b = decide(&h, &req, n, Outcome::Response(503)).expect("retried");
        let cap = (10 << (n - 1)).min(40);
        assert!(b <= cap, "attempt {n}: backoff {b} over {cap}");
    }
    assert_eq!(
        decide(&h, &req, 4, Outcome::Response(503)),
        None,
        "attempts 3 = up to 4 tries"
    );
    assert_eq!(decide(&h, &req, 1, Outcome::Response(200)), None);
    assert_eq!(decide(&h, &req, 1, Outcome::Response(404)), None);
}

#[test]
fn retry_on_conditions_follow_envoy() {
    let req = TestRequest::get("/");
    let h = retry(r#"{"retryOn":"gateway-error"}"#);
    assert!(decide(&h, &req, 1, Outcome::Response(502)).is_some());
    assert!(decide(&h, &req, 1, Outcome::Response(500)).is_none());
    assert!(decide(&h, &req, 1, Outcome::Timeout).is_some());
    let h = retry(r#"{"retryOn":"connect-failure"}"#);
    assert!(decide(&h, &req, 1, Outcome::ConnectFailure).is_some());
    assert!(decide(&h, &req, 1, Outcome::Reset).is_none());
    let h = retry(r#"{"retryOn":"retriable-status-codes,418"}"#);
    assert!(decide(&h, &req, 1, Outcome::Response(418)).is_some());
    let h = retry(r#"{"retryOn":"unavailable"}"#);
    let grpc = TestResponse {
        status: 200,
        headers: vec![wasmesh_plugin_sdk::Header::new("grpc-status", "14")],
    };
    let d = h
        .on_response(&req, &grpc, &attempt(1, Outcome::Response(200), "a"))
        .unwrap();
    assert!(d.retry_after_ms.is_some(), "gRPC UNAVAILABLE is retried");
}

#[test]
fn post_is_not_retried_unless_it_never_reached_the_upstream() {
    let h = retry(r#"{"attempts":2,"retryOn":"5xx"}"#);
    let post = TestRequest::get("/").method("POST");
    assert_eq!(decide(&h, &post, 1, Outcome::Response(503)), None);
    assert!(decide(&h, &post, 1, Outcome::ConnectFailure).is_some());
    let h = retry(r#"{"attempts":2,"retryOn":"5xx","retryNonIdempotent":true}"#);
    assert!(decide(&h, &post, 1, Outcome::Response(503)).is_some());
}

#[test]
fn the_budget_caps_retries_in_flight_and_releases_them() {
    let h = retry(
        r#"{"attempts":5,"retryOn":"5xx","retryBudget":{"percent":20,"minRetryConcurrency":2}}"#,
    );
    // 10 requests in flight, each failing: the budget allows max(2, 20% of 10) = 2 retries.
    let reqs: Vec<TestRequest> = (0..10)
        .map(|i| {
            let mut r = TestRequest::get("/");
            r.id = format!("req-{i}");
            r
        })
        .collect();
    for r in &reqs {
        h.on_request(r).unwrap();
    }
    // The proxy held the active count for each: no call.
    assert_eq!(h.on_request_calls(), 0);
    let granted = reqs
        .iter()
        .filter(|r| decide(&h, r, 1, Outcome::Response(503)).is_some())
        .count();
    assert_eq!(granted, 2);
    // Those requests finish: their grants are released and retries flow again.
    for r in &reqs[..5] {
        h.on_complete(
            r,
            &Completion {
                status: Some(503),
                attempts: 2,
                duration_us: 1,
            },
        );
    }
    let fresh = {
        let mut r = TestRequest::get("/");
        r.id = "fresh".into();
        r
    };
    h.on_request(&fresh).unwrap();
    assert!(decide(&h, &fresh, 1, Outcome::Response(503)).is_some());
}

#[test]
fn bad_configs_name_the_field() {
    let e = |c: &str| Harness::<Retry>::new(c).err().unwrap();
    assert!(e(r#"{"retryOn":"sometimes"}"#).contains("config.retryOn"));
    assert!(e(r#"{"perTryTimeout":"fast"}"#).contains("config.perTryTimeout"));
    assert!(e(r#"{"attempts":50}"#).contains("config.attempts"));
    assert!(e(r#"{"retryBudget":{"percent":200}}"#).contains("config.retryBudget.percent"));
    assert!(
        e(r#"{"backoff":{"baseInterval":"1s","maxInterval":"10ms"}}"#)
            .contains("config.backoff.maxInterval")
    );
    assert!(e(r#"{"attempts":2,"retries":1}"#).contains("unknown field `retries`"));
}

/// The budget's last slot goes to one request only: another instance taking
/// it between this request's look at the budget and its hold (here, just
/// before the plugin's next shared-state write) wins, and this request is
/// not retried.
#[test]
fn a_concurrent_request_taking_the_last_retry_slot_is_not_overshot() {
    let h = retry(r#"{"retryOn":"5xx","retryBudget":{"percent":0,"minRetryConcurrency":1}}"#);
    let req = TestRequest::get("/");
    h.on_request(&req).unwrap();
    wasmesh_plugin_sdk::testing::with_host(|host| {
        host.before_next_write(|other| {
            other.add(RETRIES, 1).unwrap();
        })
    });
    assert_eq!(decide(&h, &req, 1, Outcome::Response(503)), None);
    wasmesh_plugin_sdk::testing::with_host(|host| {
        assert_eq!(host.counter(RETRIES), 1, "one retry in flight, the other's");
        assert_eq!(host.metrics["retry_budget_exhausted"], 1);
    });
}

#[test]
fn hooks_a_configuration_does_not_need_are_not_called() {
    use wasmesh_plugin_sdk::Hooks;
    let on = |req, resp| Hooks {
        on_request: req,
        on_response: resp,
        on_complete: false,
    };
    // Istio's default conditions, no per-try timeout, no budget.
    assert_eq!(retry("{}").hooks(), on(false, true));
    assert_eq!(retry(r#"{"perTryTimeout":"1s"}"#).hooks(), on(true, true));
    assert_eq!(retry(r#"{"retryBudget":{}}"#).hooks(), on(true, true));
    assert_eq!(retry(r#"{"attempts":0}"#).hooks(), on(false, false));
    assert_eq!(retry(r#"{"retryOn":""}"#).hooks(), on(false, false));
}

#[test]
fn on_response_is_asked_for_every_outcome_a_retry_may_be_made_for() {
    let outcomes = [101, 200, 302, 404, 409, 418, 500, 502, 503, 504]
        .map(Outcome::Response)
        .into_iter()
        .chain([
            Outcome::LocalReply(503),
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::NoHealthyEndpoint,
            Outcome::Overflow,
        ]);
    let outcomes: Vec<Outcome> = outcomes.collect();
    for text in [
        "",
        "5xx",
        "gateway-error",
        "connect-failure",
        "reset",
        "refused-stream",
        "retriable-4xx",
        "retriable-status-codes,418,302",
        "unavailable,cancelled",
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    ] {
        let on = RetryOn::parse(text).unwrap();
        let asked = on.outcomes();
        for o in &outcomes {
            for grpc in [None, Some(14), Some(1), Some(0)] {
                let mut kind = Outcomes::of(o);
                if grpc.is_some() && matches!(o, Outcome::Response(_)) {
                    kind |= Outcomes::GRPC_STATUS;
                }
                if on.wants(o, grpc).0 {
                    assert!(
                        asked.intersects(kind),
                        "retryOn {text:?}: {o:?} (grpc-status {grpc:?}) is retried but not asked for"
                    );
                }
            }
        }
    }
    // And nothing that goes well is.
    let h = retry("{}");
    assert!(!h.response_outcomes().intersects(Outcomes::STATUS_2XX));
    assert!(
        !retry(r#"{"retryOn":"5xx,retriable-4xx"}"#)
            .response_outcomes()
            .intersects(Outcomes::STATUS_2XX | Outcomes::STATUS_3XX)
    );
}

#[test]
fn the_per_try_timeout_is_given_once_not_asked_for_on_each_request() {
    let h = retry(r#"{"attempts":2,"perTryTimeout":"250ms"}"#);
    let fixed = h.fixed_on_request().expect("a fixed decision");
    assert_eq!(fixed.hold, None);
    for _ in 0..3 {
        let d = h.on_request(&TestRequest::get("/")).unwrap();
        assert_eq!(d.per_try_timeout_ms, Some(250));
    }
    assert_eq!(h.on_request_calls(), 0);
    // With nothing to decide there is no fixed decision (and no call).
    let h = retry(r#"{"attempts":2}"#);
    assert!(h.fixed_on_request().is_none());
}
