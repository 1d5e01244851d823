//! Prometheus metrics of the data plane, labelled by route, model and replica.
//!
//! The recorder is process-wide (the `metrics` facade); [`handle`] installs it
//! once and renders it for the admin listener's `/metrics`. Per-replica load
//! gauges are not updated on the hot path: [`render`] reads them from the pools'
//! own counters at scrape time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::thread::LocalKey;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use infergate_core::pool::Pool;

pub(crate) const REQUESTS: &str = "infergate_requests_total";
pub(crate) const TTFT: &str = "infergate_time_to_first_token_seconds";
pub(crate) const ITL: &str = "infergate_inter_token_latency_seconds";
pub(crate) const DURATION: &str = "infergate_request_duration_seconds";
pub(crate) const OVERHEAD: &str = "infergate_gateway_overhead_seconds";
pub(crate) const PROMPT_TOKENS: &str = "infergate_prompt_tokens_total";
pub(crate) const COMPLETION_TOKENS: &str = "infergate_completion_tokens_total";
pub(crate) const CACHED_TOKENS: &str = "infergate_cached_prompt_tokens_total";
pub(crate) const RETRIES: &str = "infergate_upstream_retries_total";
pub(crate) const IN_FLIGHT: &str = "infergate_replica_requests_in_flight";
pub(crate) const TOKENS_IN_FLIGHT: &str = "infergate_replica_tokens_in_flight";
pub(crate) const REPLICAS: &str = "infergate_pool_replicas";
pub(crate) const WARMUP: &str = "infergate_replica_warmup_seconds";
// The OpenTelemetry GenAI semantic conventions' metrics, as Prometheus names
// them (dots to underscores, unit suffix), labelled `gen_ai_request_model`
// (the route) and `gen_ai_operation_name`.
pub(crate) const GENAI_TTFT: &str = "gen_ai_server_time_to_first_token_seconds";
pub(crate) const GENAI_DURATION: &str = "gen_ai_server_request_duration_seconds";
pub(crate) const GENAI_TOKENS: &str = "gen_ai_client_token_usage";
pub(crate) const GENAI_TPOT: &str = "gen_ai_server_time_per_output_token_seconds";

/// How often buffered histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];
/// The conventions' advisory buckets for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
];

/// Time quotas take per request (`core::quota::DECISION_SECONDS`): a few
/// microseconds from memory, a round trip when Redis is asked.
const QUOTA_BUCKETS: &[f64] = &[
    0.000001, 0.000002, 0.000005, 0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002,
    0.005, 0.01, 0.05,
];

/// The process-wide Prometheus handle (installs the recorder on first use).
pub(crate) fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(TTFT.into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(DURATION.into()), LATENCY_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(ITL.into()), ITL_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(OVERHEAD.into()), OVERHEAD_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(GENAI_TTFT.into()), LATENCY_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(GENAI_DURATION.into()), LATENCY_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(GENAI_TOKENS.into()), TOKEN_BUCKETS)
            })
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(GENAI_TPOT.into()), ITL_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(infergate_core::quota::DECISION_SECONDS.into()),
                    QUOTA_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Histogram samples are buffered until drained: without a drain
        // between scrapes they would grow without bound (one per token).
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("infergate-metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
        // Another recorder may already be installed (an embedding program, a
        // test): then our handle renders only what it saw, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// `infergate_quota_redis_up`: 1 when the shared quota counters answer, 0
/// while they are down (limits fail open or closed); absent in local mode.
pub(crate) fn quota_backend(state: infergate_core::quota::BackendState) {
    use infergate_core::quota::BackendState;
    let up = match state {
        BackendState::Local => return,
        BackendState::Up => 1.0,
        BackendState::Down { .. } => 0.0,
    };
    let _ = handle();
    gauge!("infergate_quota_redis_up").set(up);
}

/// Renders all metrics, refreshing the per-replica load gauges first.
pub(crate) fn render<'a>(pools: impl IntoIterator<Item = &'a std::sync::Arc<Pool>>) -> String {
    let h = handle();
    for pool in pools {
        let replicas = pool.replicas();
        gauge!(REPLICAS, "pool" => pool.name.to_string()).set(replicas.len() as f64);
        for r in replicas.iter() {
            let labels = [
                ("pool", pool.name.to_string()),
                ("replica", r.key().to_string()),
            ];
            gauge!(IN_FLIGHT, &labels).set(r.load.requests() as f64);
            gauge!(TOKENS_IN_FLIGHT, &labels).set(r.load.tokens() as f64);
            let stages = [
                ("first_scrape", r.warmup.first_scrape()),
                ("first_token", r.warmup.first_token()),
            ];
            for (stage, took) in stages {
                if let Some(d) = took {
                    gauge!(WARMUP, "pool" => pool.name.to_string(), "replica" => r.key().to_string(), "stage" => stage)
                        .set(d.as_secs_f64());
                }
            }
        }
    }
    h.render()
}

/// Metric handles of one (route, replica) pair, resolved once and cached, so a
/// request's metrics cost no registry lookup and no label allocation.
pub(crate) struct PairMetrics {
    pub itl: Histogram,
    duration: Histogram,
    ttft: Histogram,
    overhead: Histogram,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    cached_tokens: Counter,
    /// `infergate_requests_total` of this pair, by (model, status, outcome):
    /// a few entries, searched without allocating.
    requests: RwLock<Vec<RequestsEntry>>,
}

impl PairMetrics {
    fn new(route: &str, replica: &str) -> Self {
        let labels = [
            ("route", route.to_string()),
            ("replica", replica.to_string()),
        ];
        PairMetrics {
            itl: histogram!(ITL, &labels),
            duration: histogram!(DURATION, &labels),
            ttft: histogram!(TTFT, &labels),
            overhead: histogram!(OVERHEAD, "route" => route.to_string()),
            prompt_tokens: counter!(PROMPT_TOKENS, &labels),
            completion_tokens: counter!(COMPLETION_TOKENS, &labels),
            cached_tokens: counter!(CACHED_TOKENS, &labels),
            requests: RwLock::new(Vec::new()),
        }
    }

    fn requests(&self, f: &Finished<'_>) -> Counter {
        let find = |v: &[RequestsEntry]| {
            v.iter()
                .find(|(m, s, o, _)| **m == *f.model && *s == f.status && *o == f.outcome)
                .map(|e| e.3.clone())
        };
        if let Some(c) = find(&self.requests.read().unwrap_or_else(|p| p.into_inner())) {
            return c;
        }
        let mut v = self.requests.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = find(&v) {
            return c;
        }
        let c = counter!(REQUESTS,
            "route" => f.route.to_string(), "model" => f.model.to_string(),
            "replica" => f.replica.to_string(), "status" => status_label(f.status),
            "outcome" => f.outcome);
        v.push((f.model.into(), f.status, f.outcome, c.clone()));
        c
    }
}

type PairKey = (Arc<str>, Arc<str>);

/// The GenAI-convention handles of one (route, operation).
struct GenAi {
    ttft: Histogram,
    duration: Histogram,
    per_output_token: Histogram,
    input_tokens: Histogram,
    output_tokens: Histogram,
}

impl GenAi {
    fn new(route: &str, operation: &'static str) -> Self {
        let m = || {
            [
                ("gen_ai_request_model", route.to_string()),
                ("gen_ai_operation_name", operation.to_string()),
            ]
        };
        let tokens = |kind: &'static str| {
            let [a, b] = m();
            histogram!(
                GENAI_TOKENS,
                &[a, b, ("gen_ai_token_type", kind.to_string())]
            )
        };
        GenAi {
            ttft: histogram!(GENAI_TTFT, &m()),
            duration: histogram!(GENAI_DURATION, &m()),
            per_output_token: histogram!(GENAI_TPOT, &m()),
            input_tokens: tokens("input"),
            output_tokens: tokens("output"),
        }
    }
}

type GenAiKey = (Arc<str>, &'static str);

/// The cached GenAI handles of `(route, operation)`.
fn genai(route: &Arc<str>, operation: &'static str) -> Arc<GenAi> {
    recent(
        &RECENT_GENAI,
        |(r, o)| Arc::ptr_eq(r, route) && *o == operation,
        || {
            let m = cached(&cache().genai, (route.clone(), operation), || {
                GenAi::new(route, operation)
            });
            ((route.clone(), operation), m)
        },
    )
}

/// The value of `key` in `map`, made by `make` the first time (a read lock
/// on every later call: no registry lookup, no label allocation).
fn cached<K: Eq + std::hash::Hash, V>(
    map: &RwLock<FnvMap<K, Arc<V>>>,
    key: K,
    make: impl FnOnce() -> V,
) -> Arc<V> {
    if let Some(m) = map.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return m.clone();
    }
    let m = Arc::new(make());
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert(m)
        .clone()
}

/// (model, status, outcome) and its `infergate_requests_total` counter.
type RequestsEntry = (Box<str>, u16, &'static str, Counter);

/// FNV-1a: the cache keys are a few short names from config (never client
/// input, so no flooding to defend against), looked up twice per request,
/// where SipHash cost more than the lookup itself.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

#[derive(Default)]
struct Cache {
    pairs: RwLock<FnvMap<PairKey, Arc<PairMetrics>>>,
    genai: RwLock<FnvMap<GenAiKey, Arc<GenAi>>>,
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

/// The cached handles of `(route, replica)`.
pub(crate) fn pair(route: &Arc<str>, replica: &Arc<str>) -> Arc<PairMetrics> {
    let _ = handle();
    recent(
        &RECENT_PAIRS,
        |(r, p)| Arc::ptr_eq(r, route) && Arc::ptr_eq(p, replica),
        || {
            let key = (route.clone(), replica.clone());
            let m = cached(&cache().pairs, key.clone(), || {
                PairMetrics::new(route, replica)
            });
            (key, m)
        },
    )
}

/// How many handles each worker thread keeps at hand (a pool's replicas
/// behind one route, typically).
const RECENT: usize = 8;

/// A thread's recently used handles and their keys.
type Slots<K, V> = RefCell<Vec<(K, Arc<V>)>>;

thread_local! {
    static RECENT_PAIRS: Slots<PairKey, PairMetrics> = const { RefCell::new(Vec::new()) };
    static RECENT_GENAI: Slots<GenAiKey, GenAi> = const { RefCell::new(Vec::new()) };
}

/// The handles this thread used last, found by the identity of their key's
/// names (the route's and replica's `Arc<str>`, shared by every request):
/// a hit costs a pointer comparison, where the shared map takes its lock,
/// hashes both names and compares them. A miss (another route or replica,
/// or a name made anew by a reload) asks the shared map, so the handles
/// are the same either way.
fn recent<K, V>(
    slots: &'static LocalKey<Slots<K, V>>,
    same: impl Fn(&K) -> bool,
    miss: impl FnOnce() -> (K, Arc<V>),
) -> Arc<V> {
    slots.with_borrow_mut(|v| {
        if let Some((_, m)) = v.iter().find(|(k, _)| same(k)) {
            return m.clone();
        }
        let (k, m) = miss();
        if v.len() == RECENT {
            v.remove(0);
        }
        v.push((k, m.clone()));
        m
    })
}

/// What one finished request contributes to the metrics.
pub(crate) struct Finished<'a> {
    pub route: &'a Arc<str>,
    /// Set once the route was resolved (the GenAI metrics need it).
    pub operation: Option<&'static str>,
    pub model: &'a str,
    pub replica: &'a Arc<str>,
    pub status: u16,
    pub outcome: &'static str,
    pub duration: Duration,
    pub ttft: Option<Duration>,
    pub overhead: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

pub(crate) fn record_finished(f: &Finished<'_>) {
    // Install the recorder before any handle is made and cached.
    let _ = handle();
    let m = pair(f.route, f.replica);
    m.requests(f).increment(1);
    m.duration.record(f.duration.as_secs_f64());
    if let Some(t) = f.ttft {
        m.ttft.record(t.as_secs_f64());
    }
    if let Some(o) = f.overhead {
        m.overhead.record(o.as_secs_f64());
    }
    if f.prompt_tokens > 0 {
        m.prompt_tokens.increment(f.prompt_tokens);
    }
    if f.completion_tokens > 0 {
        m.completion_tokens.increment(f.completion_tokens);
    }
    if f.cached_tokens > 0 {
        m.cached_tokens.increment(f.cached_tokens);
    }
    if let Some(op) = f.operation {
        let g = genai(f.route, op);
        g.duration.record(f.duration.as_secs_f64());
        if let Some(t) = f.ttft {
            g.ttft.record(t.as_secs_f64());
        }
        if f.prompt_tokens > 0 {
            g.input_tokens.record(f.prompt_tokens as f64);
        }
        if f.completion_tokens > 0 {
            g.output_tokens.record(f.completion_tokens as f64);
        }
        if let Some(tpot) = time_per_output_token(f.duration, f.ttft, f.completion_tokens) {
            g.per_output_token.record(tpot);
        }
    }
}

/// The conventions' time per output token: the time after the first token
/// over the tokens after it (none for fewer than two tokens).
fn time_per_output_token(duration: Duration, ttft: Option<Duration>, tokens: u64) -> Option<f64> {
    let after_first = duration.checked_sub(ttft?)?;
    (tokens > 1).then(|| after_first.as_secs_f64() / (tokens - 1) as f64)
}

pub(crate) fn record_retry(route: &str, replica: &str, reason: &'static str) {
    let _ = handle();
    counter!(RETRIES, "route" => route.to_string(), "replica" => replica.to_string(), "reason" => reason)
        .increment(1);
}

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        404 => "404",
        413 => "413",
        415 => "415",
        429 => "429",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_per_output_token_is_the_time_after_the_first_over_the_rest() {
        let ms = Duration::from_millis;
        assert_eq!(
            time_per_output_token(ms(1100), Some(ms(100)), 11),
            Some(0.1)
        );
        // One token, no first token, or a TTFT past the end: none.
        assert_eq!(time_per_output_token(ms(500), Some(ms(100)), 1), None);
        assert_eq!(time_per_output_token(ms(500), None, 10), None);
        assert_eq!(time_per_output_token(ms(50), Some(ms(100)), 10), None);
    }

    /// A thread's recent handles are the shared map's: found again past
    /// the thread's slots, by names made anew (a reload), and from
    /// another thread, the handle is the same one.
    #[test]
    fn recent_handles_are_the_shared_ones() {
        let route: Arc<str> = Arc::from("recent-route");
        let replicas: Vec<Arc<str>> = (0..RECENT + 3)
            .map(|i| Arc::from(format!("10.0.0.{i}:8000")))
            .collect();
        let first: Vec<_> = replicas.iter().map(|r| pair(&route, r)).collect();
        for (r, m) in replicas.iter().zip(&first) {
            assert!(Arc::ptr_eq(&pair(&route, r), m));
            let (route2, r2): (Arc<str>, Arc<str>) = (Arc::from(&*route), Arc::from(&**r));
            assert!(Arc::ptr_eq(&pair(&route2, &r2), m));
        }
        assert!(!Arc::ptr_eq(&first[0], &first[1]));
        let (route3, r0) = (route.clone(), replicas[0].clone());
        let other = std::thread::spawn(move || pair(&route3, &r0))
            .join()
            .unwrap();
        assert!(Arc::ptr_eq(&other, &first[0]));

        let g = genai(&route, "chat");
        assert!(Arc::ptr_eq(&genai(&Arc::from("recent-route"), "chat"), &g));
        assert!(!Arc::ptr_eq(&genai(&route, "embeddings"), &g));
        assert!(Arc::ptr_eq(&genai(&route, "chat"), &g));
    }
}
