//! Every transition of the request plan, without sockets: routes are plain
//! structs over pools with loopback addresses nobody listens on, and the
//! executor's reports are fed by hand.

use super::*;
use crate::admission::config::CanaryConfig;
use crate::discovery::{Endpoint, Update};
use http::HeaderValue;
use infergate_protocol::EngineKind;

#[derive(Debug)]
struct TestRoute {
    name: Arc<str>,
    config: RouteConfig,
    canary: Arc<CanarySplit>,
    canary_side: Option<Arc<TestRoute>>,
    pool: Pool,
}

impl PlanRoute for TestRoute {
    fn name(&self) -> &Arc<str> {
        &self.name
    }
    fn config(&self) -> &RouteConfig {
        &self.config
    }
    fn canary(&self) -> &Arc<CanarySplit> {
        &self.canary
    }
    fn canary_side(&self) -> Option<&Arc<Self>> {
        self.canary_side.as_ref()
    }
    fn pool(&self) -> &Pool {
        &self.pool
    }
    fn retry_after_secs(&self) -> u64 {
        2
    }
}

fn config(yaml: &str) -> RouteConfig {
    serde_yaml_ng::from_str(yaml).expect("route config")
}

fn pool(name: &str, replicas: &[u16]) -> Pool {
    let p = Pool::new(name, EngineKind::Vllm);
    let eps = replicas
        .iter()
        .map(|port| Endpoint::from_url(&format!("http://127.0.0.1:{port}")).expect("endpoint"))
        .collect();
    p.apply(Update::Reset(eps));
    p
}

fn route(yaml: &str, pool_name: &str, replicas: &[u16]) -> Arc<TestRoute> {
    let config = config(yaml);
    Arc::new(TestRoute {
        name: config.model.as_str().into(),
        canary: Arc::new(CanarySplit::new(config.model.as_str(), None)),
        config,
        canary_side: None,
        pool: pool(pool_name, replicas),
    })
}

/// A route `m` on pool `stable` with a canary side on pool `canary`,
/// `weight` percent of users to the canary.
fn canary_route(weight: f64, extra: &str) -> Arc<TestRoute> {
    let base = format!("model: m\npool: stable\n{extra}");
    let canary_cfg = CanaryConfig::new("canary", weight);
    let split = Arc::new(CanarySplit::new("m", Some(canary_cfg)));
    let side = Arc::new(TestRoute {
        name: "m".into(),
        config: config(&base),
        canary: split.clone(),
        canary_side: None,
        pool: pool("canary", &[9101]),
    });
    Arc::new(TestRoute {
        name: "m".into(),
        config: config(&base),
        canary: split,
        canary_side: Some(side),
        pool: pool("stable", &[9001, 9002]),
    })
}

fn plan(
    r: &Arc<TestRoute>,
    fallbacks: Vec<Arc<TestRoute>>,
    headers: &HeaderMap,
) -> RequestPlan<TestRoute> {
    RequestPlan::new(
        r,
        fallbacks,
        headers,
        "m",
        Some("alice"),
        Cost::estimate(100, Some(10), 0),
        &Entitlements::unrestricted(),
    )
}

/// Route `m` on pool `big` (one replica) falling back to `small` on `little`.
fn big_with_small_fallback() -> (Arc<TestRoute>, Arc<TestRoute>) {
    let r = route(
        "model: m\npool: big\nadmission: {fallback: {models: [small]}}\n",
        "big",
        &[9001],
    );
    let small = route("model: small\npool: little\n", "little", &[9201]);
    (r, small)
}

fn key(s: &str) -> Arc<str> {
    Arc::from(s)
}

#[track_caller]
fn expect_admit(step: Step<TestRoute>, pool: &str) -> Option<RetryReason> {
    match step {
        Step::Admit { route, retry } => {
            assert_eq!(&*route.pool.name, pool, "admitted on the wrong pool");
            retry
        }
        other => panic!("expected Admit on {pool}, got {other:?}"),
    }
}

#[track_caller]
fn expect_send(step: Step<TestRoute>, pool: &str, attempt: u32) {
    match step {
        Step::Send { route, attempt: a } => {
            assert_eq!(&*route.pool.name, pool);
            assert_eq!(a, attempt);
        }
        other => panic!("expected Send on {pool}, got {other:?}"),
    }
}

#[track_caller]
fn expect_fail(step: Step<TestRoute>) -> Failure {
    match step {
        Step::Fail(f) => f,
        other => panic!("expected Fail, got {other:?}"),
    }
}

/// Admits on `pool` at `now` and checks the send that follows.
#[track_caller]
fn admit_and_send(
    p: &mut RequestPlan<TestRoute>,
    replica: &str,
    pool: &str,
    attempt: u32,
    now: Instant,
) {
    let step = p.on(
        Event::Admitted {
            replica: key(replica),
        },
        now,
    );
    expect_send(step, pool, attempt);
}

/// Reports response headers with `status` at `now`.
fn answered(p: &mut RequestPlan<TestRoute>, status: StatusCode, now: Instant) -> Step<TestRoute> {
    p.on(Event::Answered { status }, now)
}

fn forced(side: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "x-infergate-canary",
        HeaderValue::from_str(side).expect("header"),
    );
    h
}

#[test]
fn canary_side_chosen() {
    let r = canary_route(100.0, "");
    let mut p = plan(&r, vec![], &HeaderMap::new());
    expect_admit(p.start(), "canary");
    assert_eq!(p.canary().map(|(_, s)| *s), Some(CanarySide::Canary));
    admit_and_send(&mut p, "127.0.0.1:9101", "canary", 1, Instant::now());
    assert!(matches!(
        answered(&mut p, StatusCode::OK, Instant::now()),
        Step::Respond
    ));
}

#[test]
fn forced_stable_side_never_touches_the_canary() {
    let r = canary_route(100.0, "");
    let mut p = plan(&r, vec![], &forced("stable"));
    expect_admit(p.start(), "stable");
    assert_eq!(p.canary().map(|(_, s)| *s), Some(CanarySide::Stable));
}

#[test]
fn stable_after_canary_has_no_ready_replica() {
    let r = canary_route(100.0, "");
    let mut p = plan(&r, vec![], &HeaderMap::new());
    expect_admit(p.start(), "canary");
    let step = p.on(
        Event::NotAdmitted(AdmitError::NoReadyReplica),
        Instant::now(),
    );
    expect_admit(step, "stable");
    assert_eq!(p.canary().map(|(_, s)| *s), Some(CanarySide::Stable));
    assert_eq!(
        p.fallback(),
        None,
        "stable is the route itself, not a fallback"
    );
    admit_and_send(&mut p, "127.0.0.1:9001", "stable", 1, Instant::now());
}

#[test]
fn fallback_after_stable_fails_upstream() {
    let fb = "admission: {fallback: {models: [small]}}\n";
    let r = route(
        &format!("model: m\npool: big\n{fb}retries: {{attempts: 1}}\n"),
        "big",
        &[9001],
    );
    let small = route("model: small\npool: little\n", "little", &[9201]);
    let mut p = plan(&r, vec![small], &HeaderMap::new());
    expect_admit(p.start(), "big");
    let t0 = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "big", 1, t0);
    // The only replica answers 503: nothing to retry on, so the side failed.
    let step = answered(&mut p, StatusCode::SERVICE_UNAVAILABLE, t0);
    expect_admit(step, "little");
    assert_eq!(p.fallback(), Some(FallbackReason::UpstreamFailure));
    assert_eq!(
        p.upstream_model(),
        "small",
        "a fallback is sent its own model name"
    );
    assert!(
        p.excluded().is_empty(),
        "the fallback's replicas were never tried"
    );
    admit_and_send(&mut p, "127.0.0.1:9201", "little", 1, t0);
    assert!(matches!(
        answered(&mut p, StatusCode::OK, t0),
        Step::Respond
    ));
}

#[test]
fn no_fallback_after_the_first_byte_deadline() {
    let r = route(
        "model: m\npool: big\nadmission: {fallback: {models: [small]}}\ntimeouts: {first_byte: 1s}\nretries: {attempts: 1}\n",
        "big",
        &[9001],
    );
    let small = route("model: small\npool: little\n", "little", &[9201]);
    let mut p = plan(&r, vec![small], &HeaderMap::new());
    p.start();
    let t0 = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "big", 1, t0);
    let late = t0 + Duration::from_secs(2);
    // A 5xx answer past the deadline goes to the client as it is.
    assert!(matches!(
        answered(&mut p, StatusCode::INTERNAL_SERVER_ERROR, late),
        Step::Respond
    ));
}

#[test]
fn retry_on_a_different_replica() {
    let r = route("model: m\npool: p\n", "p", &[9001, 9002, 9003]);
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    let now = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    assert!(p.is_retryable(StatusCode::SERVICE_UNAVAILABLE));
    assert!(
        !p.is_retryable(StatusCode::BAD_REQUEST),
        "a 4xx is the client's answer"
    );
    let step = answered(&mut p, StatusCode::SERVICE_UNAVAILABLE, now);
    assert_eq!(expect_admit(step, "p"), Some(RetryReason::Status));
    assert_eq!(
        p.excluded(),
        &[key("127.0.0.1:9001")],
        "the retry excludes the replica tried"
    );
    admit_and_send(&mut p, "127.0.0.1:9002", "p", 2, now);
    let step = p.on(Event::ConnectFailed, now);
    assert_eq!(expect_admit(step, "p"), Some(RetryReason::Connect));
    assert_eq!(
        p.excluded(),
        &[key("127.0.0.1:9001"), key("127.0.0.1:9002")]
    );
    admit_and_send(&mut p, "127.0.0.1:9003", "p", 3, now);
    assert!(matches!(
        answered(&mut p, StatusCode::OK, now),
        Step::Respond
    ));
}

#[test]
fn retries_stop_at_the_configured_attempts() {
    let r = route(
        "model: m\npool: p\nretries: {attempts: 2}\n",
        "p",
        &[9001, 9002, 9003],
    );
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    let now = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    expect_admit(p.on(Event::ConnectFailed, now), "p");
    admit_and_send(&mut p, "127.0.0.1:9002", "p", 2, now);
    let f = expect_fail(p.on(Event::ConnectFailed, now));
    assert_eq!(f.error.status, StatusCode::BAD_GATEWAY);
    assert_eq!(f.attempts, 2);
    assert_eq!(f.replica.as_deref(), Some("127.0.0.1:9002"));
    assert!(!f.rejected);
}

#[test]
fn a_retryable_status_with_no_other_replica_goes_to_the_client() {
    let r = route("model: m\npool: p\n", "p", &[9001]);
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    let now = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    assert!(!p.is_retryable(StatusCode::SERVICE_UNAVAILABLE));
    assert!(matches!(
        answered(&mut p, StatusCode::SERVICE_UNAVAILABLE, now),
        Step::Respond
    ));
}

#[test]
fn no_retry_after_the_first_byte() {
    let r = route("model: m\npool: p\n", "p", &[9001, 9002]);
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    let now = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    assert!(matches!(
        answered(&mut p, StatusCode::OK, now),
        Step::Respond
    ));
    // Whatever happens to the stream afterwards, the plan is over.
    assert!(matches!(p.on(Event::ConnectFailed, now), Step::Abandon));
    assert!(matches!(
        p.on(Event::Admitted { replica: key("x") }, now),
        Step::Abandon
    ));
}

#[test]
fn no_retry_and_no_fallback_after_a_first_byte_timeout() {
    let r = route(
        "model: m\npool: p\nadmission: {fallback: {models: [small]}}\n",
        "p",
        &[9001, 9002],
    );
    let small = route("model: small\npool: little\n", "little", &[9201]);
    let mut p = plan(&r, vec![small], &HeaderMap::new());
    p.start();
    let now = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    let f = expect_fail(p.on(Event::FirstByteTimeout, now));
    assert_eq!(f.error.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(f.attempts, 1);
    assert_eq!(f.replica.as_deref(), Some("127.0.0.1:9001"));
}

#[test]
fn a_failure_after_sending_is_not_retried_but_may_fall_back() {
    let r = route("model: m\npool: p\n", "p", &[9001, 9002]);
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    let now = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    let f = expect_fail(p.on(
        Event::SendFailed {
            detail: "connection reset".into(),
        },
        now,
    ));
    assert_eq!(f.error.status, StatusCode::BAD_GATEWAY);
    assert_eq!(f.attempts, 1);
}

#[test]
fn queue_deadline_to_fallback() {
    let (r, small) = big_with_small_fallback();
    let mut p = plan(&r, vec![small], &HeaderMap::new());
    assert!(
        p.ticket().predict_wait,
        "a fallback could serve it: predict the wait"
    );
    expect_admit(p.start(), "big");
    let step = p.on(
        Event::NotAdmitted(AdmitError::DeadlineExceeded),
        Instant::now(),
    );
    expect_admit(step, "little");
    assert_eq!(p.fallback(), Some(FallbackReason::QueueDeadline));
    assert!(!p.ticket().predict_wait, "no fallback left");
    admit_and_send(&mut p, "127.0.0.1:9201", "little", 1, Instant::now());
}

#[test]
fn queue_deadline_without_fallback_is_a_503_rejection() {
    let r = route("model: m\npool: p\n", "p", &[9001]);
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    let f = expect_fail(p.on(
        Event::NotAdmitted(AdmitError::DeadlineExceeded),
        Instant::now(),
    ));
    assert_eq!(f.error.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(f.rejected);
    assert_eq!(f.attempts, 0);
}

#[test]
fn shedding_is_answered_never_a_fallback() {
    let (r, small) = big_with_small_fallback();
    let mut p = plan(&r, vec![small], &HeaderMap::new());
    p.start();
    let f = expect_fail(p.on(Event::NotAdmitted(AdmitError::Shed), Instant::now()));
    assert_eq!(f.error.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(f.rejected);
}

#[test]
fn the_client_may_forbid_fallback() {
    let (r, small) = big_with_small_fallback();
    let mut h = HeaderMap::new();
    h.insert("x-infergate-no-fallback", HeaderValue::from_static("true"));
    let mut p = plan(&r, vec![small], &h);
    p.start();
    let f = expect_fail(p.on(
        Event::NotAdmitted(AdmitError::NoReadyReplica),
        Instant::now(),
    ));
    assert_eq!(f.error.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn a_refused_fallback_after_upstream_failure_moves_down_the_list() {
    let r = route(
        "model: m\npool: big\nretries: {attempts: 1}\nadmission: {fallback: {models: [a, b]}}\n",
        "big",
        &[9001],
    );
    let a = route("model: a\npool: pa\n", "pa", &[9301]);
    let b = route("model: b\npool: pb\n", "pb", &[9401]);
    let mut p = plan(&r, vec![a, b], &HeaderMap::new());
    p.start();
    let now = Instant::now();
    admit_and_send(&mut p, "127.0.0.1:9001", "big", 1, now);
    expect_admit(p.on(Event::ConnectFailed, now), "pa");
    expect_admit(p.on(Event::NotAdmitted(AdmitError::QueueFull), now), "pb");
    let f = expect_fail(p.on(Event::NotAdmitted(AdmitError::NoReadyReplica), now));
    assert_eq!(f.error.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!f.rejected, "an upstream failure, not an admission refusal");
}

#[test]
fn client_disconnect_abandons_in_every_phase() {
    let r = route("model: m\npool: p\n", "p", &[9001, 9002]);
    let now = Instant::now();
    // While queued.
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    assert!(matches!(p.on(Event::ClientGone, now), Step::Abandon));
    assert!(matches!(
        p.on(Event::Admitted { replica: key("x") }, now),
        Step::Abandon
    ));
    // While waiting for the first byte.
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    assert!(matches!(p.on(Event::ClientGone, now), Step::Abandon));
    // While a retry waits for admission.
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, now);
    expect_admit(p.on(Event::ConnectFailed, now), "p");
    assert!(matches!(p.on(Event::ClientGone, now), Step::Abandon));
}

#[test]
fn an_event_out_of_order_ends_the_request_with_an_error() {
    let r = route("model: m\npool: p\n", "p", &[9001]);
    let mut p = plan(&r, vec![], &HeaderMap::new());
    p.start();
    let f = expect_fail(answered(&mut p, StatusCode::OK, Instant::now()));
    assert_eq!(f.error.status, StatusCode::BAD_GATEWAY);
}

#[test]
fn target_model_names_the_upstream_model() {
    let r = route("model: m\npool: p\ntarget_model: big-v2\n", "p", &[9001]);
    let p = plan(&r, vec![], &HeaderMap::new());
    assert_eq!(p.upstream_model(), "big-v2");
    let plain = route("model: m\npool: p\n", "p", &[9001]);
    assert_eq!(
        plan(&plain, vec![], &HeaderMap::new()).upstream_model(),
        "m"
    );
}

#[test]
fn an_alias_is_rewritten_to_the_canonical_model_unless_forwarded() {
    let r = route("model: canonical\naliases: [m]\npool: p\n", "p", &[9001]);
    // `plan` asks for "m", the alias.
    assert_eq!(
        plan(&r, vec![], &HeaderMap::new()).upstream_model(),
        "canonical"
    );
    let fwd = route(
        "model: canonical\naliases: [m]\npool: p\nforward_alias: true\n",
        "p",
        &[9001],
    );
    assert_eq!(plan(&fwd, vec![], &HeaderMap::new()).upstream_model(), "m");
    let target = route(
        "model: canonical\naliases: [m]\npool: p\ntarget_model: engine-name\nforward_alias: true\n",
        "p",
        &[9001],
    );
    assert_eq!(
        plan(&target, vec![], &HeaderMap::new()).upstream_model(),
        "engine-name"
    );
}

#[test]
fn waits_for_a_replica_only_when_nothing_else_could_serve() {
    // Its own side, no fallback: wait (scale from zero).
    let r = route("model: m\npool: p\n", "p", &[9001]);
    let mut p = plan(&r, vec![], &HeaderMap::new());
    expect_admit(p.start(), "p");
    assert!(p.ticket().wait_for_replica);
    // A retry excludes the replicas tried: never waits.
    admit_and_send(&mut p, "127.0.0.1:9001", "p", 1, Instant::now());
    expect_admit(p.on(Event::ConnectFailed, Instant::now()), "p");
    assert!(!p.ticket().wait_for_replica, "a retry does not wait");

    // A fallback that takes over on "no ready replica": go there at once.
    let (r, small) = big_with_small_fallback();
    let mut p = plan(&r, vec![small], &HeaderMap::new());
    expect_admit(p.start(), "big");
    assert!(!p.ticket().wait_for_replica);
    let step = p.on(
        Event::NotAdmitted(AdmitError::NoReadyReplica),
        Instant::now(),
    );
    expect_admit(step, "little");
    assert!(p.ticket().wait_for_replica, "the last fallback waits");
    // The same route with the trigger off: waits on its own side.
    let r = route(
        "model: m\npool: big\nadmission: {fallback: {models: [small], on_no_ready_replica: false}}\n",
        "big",
        &[9001],
    );
    let small = route("model: small\npool: little\n", "little", &[9201]);
    let mut p = plan(&r, vec![small], &HeaderMap::new());
    expect_admit(p.start(), "big");
    assert!(p.ticket().wait_for_replica);

    // The canary side does not wait: stable serves.
    let r = canary_route(100.0, "");
    let mut p = plan(&r, vec![], &HeaderMap::new());
    expect_admit(p.start(), "canary");
    assert!(!p.ticket().wait_for_replica);
    let step = p.on(
        Event::NotAdmitted(AdmitError::NoReadyReplica),
        Instant::now(),
    );
    expect_admit(step, "stable");
    assert!(p.ticket().wait_for_replica);
}
