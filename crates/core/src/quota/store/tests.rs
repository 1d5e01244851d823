use std::sync::atomic::AtomicU32;
use std::sync::Mutex;

use super::*;
use crate::cost::PricingConfig;

fn store(yaml: &str, redis: Option<&str>) -> QuotaStore {
    store_priced(yaml, redis, "")
}

fn store_priced(yaml: &str, redis: Option<&str>, pricing: &str) -> QuotaStore {
    let q: QuotasConfig = serde_yaml_ng::from_str(yaml).unwrap();
    let g: GovernanceConfig = match redis {
        Some(r) => serde_yaml_ng::from_str(r).unwrap(),
        None => GovernanceConfig::default(),
    };
    q.check(&g).unwrap();
    let p: PricingConfig = if pricing.is_empty() {
        PricingConfig::default()
    } else {
        serde_yaml_ng::from_str(pricing).unwrap()
    };
    let s = QuotaStore::default();
    s.apply(&q, &g, &p);
    s
}

impl QuotaStore {
    async fn reserve_m(
        &self,
        team: &str,
        key: Option<&str>,
        band: Priority,
        d: Demand,
    ) -> Result<Grant, Refusal> {
        self.reserve(team, key, band, d, ["m"]).await
    }
}

fn tokens(input: u64, output: u64) -> Demand {
    Demand {
        input_tokens: input,
        output_tokens: output,
        cost_micros: 0,
    }
}

fn tpm(s: &QuotaStore, scope: &str) -> i64 {
    s.local_value(scope, Dim::Tokens, Window::Minute)
}

#[tokio::test]
async fn local_mode_reserves_refuses_and_settles_both_ways() {
    let s = store(
        "teams: {search: {tokens_per_minute: 1000, requests_per_minute: 5}}",
        None,
    );
    let mut a = s
        .reserve_m("search", None, Priority::Standard, tokens(100, 500))
        .await
        .unwrap();
    assert_eq!(a.source(), Some(Source::Local));
    let r = a.rates().unwrap();
    assert_eq!(r.tokens.map(|t| (t.0, t.1)), Some((1000, 400)));
    assert_eq!(r.requests.map(|t| (t.0, t.1)), Some((5, 4)));
    // Down: the engine generated less than reserved.
    a.settle(tokens(100, 50));
    assert_eq!(tpm(&s, "t:search"), 150);
    a.settle(tokens(100, 900));
    assert_eq!(tpm(&s, "t:search"), 150, "settled once");
    // Up: more than reserved (no max_tokens, the default estimate was low).
    let mut b = s
        .reserve_m("search", None, Priority::Standard, tokens(100, 100))
        .await
        .unwrap();
    b.settle(tokens(100, 600));
    assert_eq!(tpm(&s, "t:search"), 850);
    let e = s
        .reserve_m("search", None, Priority::Standard, tokens(100, 100))
        .await
        .unwrap_err();
    let api = e.to_api_error();
    assert_eq!(api.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(api.code, Some("rate_limit_exceeded"));
    assert_eq!(api.kind, "tokens");
    assert!(
        api.message.contains("`tokens_per_minute` of team `search`"),
        "{}",
        api.message
    );
    assert!(api.retry_after_secs.unwrap() >= 1);
    let mut h = HeaderMap::new();
    e.rates().write(&mut h);
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "150");
    assert_eq!(h["x-ratelimit-remaining-requests"], "3");
    assert!(h.contains_key("x-ratelimit-reset-tokens"));
    // Other teams are not limited (no default_team).
    let g = s
        .reserve_m("ads", None, Priority::Standard, tokens(1, 1))
        .await
        .unwrap();
    assert!(!g.is_limited());
}

#[tokio::test]
async fn a_reload_changes_limits_and_keeps_the_counts() {
    let s = store("teams: {search: {requests_per_minute: 1}}", None);
    let _a = s
        .reserve_m("search", None, Priority::Standard, tokens(1, 1))
        .await
        .unwrap();
    assert!(s
        .reserve_m("search", None, Priority::Standard, tokens(1, 1))
        .await
        .is_err());
    let q: QuotasConfig =
        serde_yaml_ng::from_str("teams: {search: {requests_per_minute: 2}}").unwrap();
    s.apply(&q, &GovernanceConfig::default(), &PricingConfig::default());
    let _b = s
        .reserve_m("search", None, Priority::Standard, tokens(1, 1))
        .await
        .unwrap();
    assert!(
        s.reserve_m("search", None, Priority::Standard, tokens(1, 1))
            .await
            .is_err(),
        "the first request still counts"
    );
    s.apply(
        &QuotasConfig::default(),
        &GovernanceConfig::default(),
        &PricingConfig::default(),
    );
    assert!(!s
        .reserve_m("search", None, Priority::Standard, tokens(1, 1))
        .await
        .unwrap()
        .is_limited());
}

#[tokio::test]
async fn a_dropped_grant_frees_its_slot_and_counts_nothing_generated() {
    let s = store(
        "keys: {k1: {concurrent_requests: 1, output_tokens_per_minute: 100}}",
        None,
    );
    let g = s
        .reserve_m("t", Some("k1"), Priority::Standard, tokens(10, 80))
        .await
        .unwrap();
    let e = s
        .reserve_m("t", Some("k1"), Priority::Standard, tokens(10, 10))
        .await
        .unwrap_err();
    assert!(e
        .to_api_error()
        .message
        .contains("`concurrent_requests` of key `k1`"));
    drop(g);
    assert_eq!(s.local_value("k:k1", Dim::OutputTokens, Window::Minute), 0);
    assert_eq!(s.local_value("k:k1", Dim::Concurrent, Window::None), 0);
    s.reserve_m("t", Some("k1"), Priority::Standard, tokens(10, 10))
        .await
        .unwrap();
}

#[tokio::test]
async fn critical_traffic_keeps_its_headroom_from_its_own_batch_jobs() {
    let s = store(
        "teams: {search: {tokens_per_minute: 1000, bands: {sheddable: 0.5}}}",
        None,
    );
    let batch = |n| s.reserve_m("search", None, Priority::Sheddable, tokens(n, 0));
    let _a = batch(400).await.unwrap();
    let e = batch(200).await.unwrap_err();
    assert!(e
        .to_api_error()
        .message
        .contains("500 of it for this priority band"));
    let _c = s
        .reserve_m("search", None, Priority::Critical, tokens(500, 0))
        .await
        .unwrap();
}

#[tokio::test]
async fn money_budgets_count_the_price_of_the_tokens() {
    // $10 per million output tokens: 1,000 tokens cost $0.01.
    let s = store_priced(
        "teams: {search: {cost_per_day: 0.015}}",
        None,
        "models: {m: {input: 1, output: 10}}",
    );
    let mut g = s
        .reserve_m("search", None, Priority::Critical, tokens(0, 1000))
        .await
        .unwrap();
    assert_eq!(s.local_value("t:search", Dim::Cost, Window::Day), 10_000);
    let e = s
        .reserve_m("search", None, Priority::Critical, tokens(0, 1000))
        .await
        .unwrap_err();
    let api = e.to_api_error();
    assert_eq!(
        (api.code, api.kind),
        (Some("insufficient_quota"), "insufficient_quota")
    );
    assert!(api.message.contains("`cost_per_day` of team `search` reached: limit 0.015000, used 0.010000, requested 0.010000"), "{}", api.message);
    // Settled from the tokens generated: 100 output tokens cost $0.001.
    g.settle(tokens(0, 100));
    assert_eq!(s.local_value("t:search", Dim::Cost, Window::Day), 1_000);
    s.reserve_m("search", None, Priority::Critical, tokens(0, 1000))
        .await
        .unwrap();
    // A model without a price costs nothing.
    s.reserve(
        "search",
        None,
        Priority::Critical,
        tokens(0, 1_000_000),
        ["unpriced"],
    )
    .await
    .unwrap();
}

/// A shared backend double: counts like Redis would, can be down or stall.
#[derive(Debug, Default)]
struct Fake {
    counters: LocalCounters,
    settled: Mutex<Vec<i64>>,
    down: AtomicBool,
    stall: AtomicBool,
    calls: AtomicU32,
}

impl SharedCounters for Arc<Fake> {
    fn reserve<'a>(&'a self, ops: &'a [CounterOp]) -> super::super::counters::ReserveFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.stall.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(self.counters.reserve(ops, |_| 1.0, 0))
        })
    }
    fn settle(&self, op: &CounterOp, delta: i64) {
        self.settled.lock().unwrap().push(delta);
        self.counters.settle(op, delta);
    }
    fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }
    fn mark_down(&self) {
        self.down.store(true, Ordering::Relaxed);
    }
}

const REDIS: &str =
    "redis: {url: 'redis://127.0.0.1:1', timeout: 20ms, when_down: fail_open, local_share: 0.5}";

#[tokio::test]
async fn shared_counters_decide_and_a_stall_costs_one_timeout() {
    let s = store(
        "teams:\n  search: {tokens_per_minute: 1000}\n  secure: {requests_per_minute: 100, when_redis_down: fail_closed}\n",
        Some(REDIS),
    );
    let fake = Arc::new(Fake::default());
    s.set_backend(Box::new(fake.clone()));
    assert_eq!(s.backend_state(), BackendState::Up);
    let mut g = s
        .reserve_m("search", None, Priority::Standard, tokens(100, 300))
        .await
        .unwrap();
    assert_eq!(g.source(), Some(Source::Shared));
    g.settle(tokens(100, 20));
    assert_eq!(*fake.settled.lock().unwrap(), vec![-280]);

    // Redis stalls: one request waits the timeout, then the backend is down
    // and requests decide locally at once.
    fake.stall.store(true, Ordering::Relaxed);
    let t = tokio::time::Instant::now();
    let g = s
        .reserve_m("search", None, Priority::Standard, tokens(100, 100))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "bounded by the timeout"
    );
    assert_eq!(g.source(), Some(Source::Fallback));
    assert!(matches!(s.backend_state(), BackendState::Down { .. }));
    let calls = fake.calls.load(Ordering::Relaxed);
    // Fail open at half the limit on this replica.
    let _h = s
        .reserve_m("search", None, Priority::Standard, tokens(200, 100))
        .await
        .unwrap();
    let e = s
        .reserve_m("search", None, Priority::Standard, tokens(200, 100))
        .await
        .unwrap_err();
    assert!(matches!(e, Refusal::Limit(_)));
    assert_eq!(
        fake.calls.load(Ordering::Relaxed),
        calls,
        "no call while down"
    );
    // Fail closed: 503.
    let e = s
        .reserve_m("secure", None, Priority::Standard, tokens(1, 1))
        .await
        .unwrap_err();
    let api = e.to_api_error();
    assert_eq!(
        (api.status, api.code),
        (StatusCode::SERVICE_UNAVAILABLE, Some("quota_unavailable"))
    );

    // Back: shared counting resumes.
    fake.stall.store(false, Ordering::Relaxed);
    fake.down.store(false, Ordering::Relaxed);
    let g = s
        .reserve_m("secure", None, Priority::Standard, tokens(1, 1))
        .await
        .unwrap();
    assert_eq!(g.source(), Some(Source::Shared));
    assert_eq!(s.backend_state(), BackendState::Up);
}

/// A shared backend that answers only when let through (`open`).
#[derive(Debug, Default)]
struct Gated {
    counters: LocalCounters,
    open: tokio::sync::Notify,
    calls: AtomicU32,
}

impl SharedCounters for Arc<Gated> {
    fn reserve<'a>(&'a self, ops: &'a [CounterOp]) -> super::super::counters::ReserveFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.open.notified().await;
            Ok(self.counters.reserve(ops, |_| 1.0, 0))
        })
    }
    fn settle(&self, op: &CounterOp, delta: i64) {
        self.counters.settle(op, delta);
    }
    fn is_up(&self) -> bool {
        true
    }
    fn mark_down(&self) {}
}

/// The synchronous first try decides what `reserve` would without a
/// round trip (no limit, local counters, a refusal), and asks the shared
/// backend only through `AskBackend::ask`: pending until it answers.
#[tokio::test]
async fn try_reserve_decides_at_once_and_asks_redis_only_when_it_must() {
    let names = || ["m"];
    // No limit: an empty grant at once.
    let none = store("teams: {}", None);
    let Ok(Ok(g)) = none.try_reserve("search", None, Priority::Standard, tokens(1, 1), names())
    else {
        panic!("decided at once");
    };
    assert!(!g.is_limited());
    // Local mode: counted at once, refused at once, as by `reserve`.
    let s = store("teams: {search: {tokens_per_minute: 1000}}", None);
    let Ok(Ok(g)) = s.try_reserve(
        "search",
        None,
        Priority::Standard,
        tokens(100, 500),
        names(),
    ) else {
        panic!("decided at once");
    };
    assert_eq!(g.source(), Some(Source::Local));
    assert_eq!(tpm(&s, "t:search"), 600);
    let refused = s.try_reserve(
        "search",
        None,
        Priority::Standard,
        tokens(100, 500),
        names(),
    );
    assert!(matches!(refused, Ok(Err(Refusal::Limit(_)))));
    let e = s
        .reserve_m("search", None, Priority::Standard, tokens(100, 500))
        .await
        .unwrap_err();
    assert!(matches!(e, Refusal::Limit(_)));
    assert_eq!(tpm(&s, "t:search"), 600);
    drop(g);

    // Redis mode: the backend must be asked; nothing is counted before.
    let s = store(
        "teams: {search: {tokens_per_minute: 1000}}",
        Some("redis: {url: 'redis://127.0.0.1:1', timeout: 5s}"),
    );
    let gated = Arc::new(Gated::default());
    s.set_backend(Box::new(gated.clone()));
    let Err(ask) = s.try_reserve(
        "search",
        None,
        Priority::Standard,
        tokens(100, 300),
        names(),
    ) else {
        panic!("the backend must be asked");
    };
    assert_eq!(gated.calls.load(Ordering::Relaxed), 0);
    let mut asking = std::pin::pin!(ask.ask());
    assert!(futures::poll!(asking.as_mut()).is_pending());
    assert_eq!(gated.calls.load(Ordering::Relaxed), 1);
    gated.open.notify_one();
    let g = asking.await.unwrap();
    assert_eq!(g.source(), Some(Source::Shared));
    assert_eq!(
        g.rates().and_then(|r| r.tokens).map(|t| (t.0, t.1)),
        Some((1000, 600))
    );
    // The same through `reserve`, which makes the same round trip.
    gated.open.notify_one();
    let g2 = s
        .reserve_m("search", None, Priority::Standard, tokens(100, 300))
        .await
        .unwrap();
    assert_eq!(g2.source(), Some(Source::Shared));
    assert_eq!(gated.calls.load(Ordering::Relaxed), 2);
}

#[test]
fn resets_in_openai_format_and_headers_share_one_reset() {
    for (ms, text) in [
        (850, "850ms"),
        (12_000, "12s"),
        (11_500, "12s"),
        (90_000, "1m30s"),
        (11_100_000, "3h5m0s"),
        (0, "0ms"),
        (1000, "1s"),
        (3_600_000, "1h0m0s"),
        (u64::MAX, "5124095576030h25m52s"),
    ] {
        assert_eq!(reset_value(ms), text);
    }
    let mut h = HeaderMap::new();
    RateSnapshot {
        requests: Some((50, 49, 30_000)),
        tokens: Some((1000, 877, 30_000)),
    }
    .write(&mut h);
    assert_eq!(h["x-ratelimit-limit-requests"], "50");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "877");
    assert_eq!(h["x-ratelimit-reset-requests"], "30s");
    assert_eq!(h["x-ratelimit-reset-tokens"], "30s");
    assert_eq!(h.len(), 6);
    // The per-thread cache of repeated values follows changes: a new limit
    // (config reload), a reset that prints differently, ms under a second.
    for (limit, reset, text) in [
        (50, 30_000, "30s"),
        (60, 29_001, "30s"),
        (60, 29_000, "29s"),
        (60, 999, "999ms"),
        (70, 998, "998ms"),
        (70, 1_000, "1s"),
    ] {
        let mut h = HeaderMap::new();
        RateSnapshot {
            requests: Some((limit, 1, reset)),
            tokens: Some((limit * 10, 2, reset)),
        }
        .write(&mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], limit.to_string().as_str());
        assert_eq!(
            h["x-ratelimit-limit-tokens"],
            (limit * 10).to_string().as_str()
        );
        assert_eq!(h["x-ratelimit-reset-requests"], text);
        assert_eq!(h["x-ratelimit-reset-tokens"], text);
    }
}

#[test]
fn in_memory_decisions_are_timed_one_in_sample_every() {
    let timed = (0..SAMPLE_EVERY * 4).filter(|_| sampled()).count();
    assert_eq!(timed, 4);
}

proptest::proptest! {
    /// The digit-by-digit reset text equals the formatter's.
    #[test]
    fn reset_text_matches_the_formatter(ms in proptest::prelude::any::<u64>()) {
        let want = if ms < 1000 {
            format!("{ms}ms")
        } else {
            let secs = ms.div_ceil(1000);
            let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
            match (h, m) {
                (0, 0) => format!("{s}s"),
                (0, _) => format!("{m}m{s}s"),
                _ => format!("{h}h{m}m{s}s"),
            }
        };
        let got = reset_value(ms);
        proptest::prop_assert_eq!(got.to_str().unwrap(), want.as_str());
    }
}
