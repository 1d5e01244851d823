//! The live quota state and the two calls a request makes: [`QuotaStore::reserve`]
//! before admission (its estimated tokens and cost, one request, one slot)
//! and [`Grant::settle`] when it ends (the usage the engine reported, or the
//! tokens counted; a request that ends without settling is settled for
//! nothing generated). The table is swapped whole on config reload (arc-swap);
//! the shared backend, when configured, is asked once per request, bounded
//! by its timeout; while it is down each limit fails open on this replica's
//! own counters (scaled by `local_share`) or fails closed.
//!
//! Both calls are timed into [`DECISION_SECONDS`] (by mode and path: local
//! counters, a Redis lease, a Redis round trip, the fallback), so the time
//! quotas add to a request is read from the gateway itself: every Redis
//! round trip and fallback decision, and one in [`SAMPLE_EVERY`] of the
//! in-memory ones (a histogram sample costs ~500 instructions with its
//! upkeep; sampled, quotas' timing stays under ~100 per request).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderMap, HeaderValue, StatusCode};
use infergate_protocol::error::ApiError;

use super::config::{GovernanceConfig, QuotasConfig, RedisConfig, WhenDown};
use super::counters::{CounterOp, LocalCounters, SharedCounters, Verdict};
use super::rules::{Demand, Dim, Limit, QuotaTable, Rules, ScopeKind};
use super::window::Window;
use crate::admission::Priority;
use crate::cost::{PricingConfig, TokenPrice, TokenUsage};

/// Where a reservation was counted (and so where it is settled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shared backend (Redis).
    Shared,
    /// This replica's counters: local mode (no shared backend configured).
    Local,
    /// This replica's fallback counters while the shared backend is down.
    Fallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Shared => "redis",
            Source::Local => "local",
            Source::Fallback => "fallback",
        }
    }
}

#[derive(Debug)]
struct Snapshot {
    table: QuotaTable,
    redis: Option<RedisConfig>,
    /// Prices, when some limit counts money.
    pricing: Option<PricingConfig>,
}

#[derive(Debug, Default)]
struct Inner {
    local: LocalCounters,
    fallback: LocalCounters,
    backend: ArcSwapOption<Box<dyn SharedCounters>>,
    /// Whether the last decision that needed the backend found it down.
    degraded: AtomicBool,
}

/// Quotas of a gateway: the table in force, the counters.
#[derive(Debug)]
pub struct QuotaStore {
    current: ArcSwap<Snapshot>,
    inner: Arc<Inner>,
}

impl Default for QuotaStore {
    fn default() -> Self {
        QuotaStore {
            current: ArcSwap::from_pointee(Snapshot {
                table: QuotaTable::default(),
                redis: None,
                pricing: None,
            }),
            inner: Arc::default(),
        }
    }
}

/// What `/readyz` and the status say about the shared counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// No shared backend configured.
    Local,
    Up,
    Down {
        required_for_ready: bool,
    },
}

impl QuotaStore {
    /// Swaps in the limits of a new config (counters are kept: a changed
    /// limit applies to what was already counted in the window).
    /// Money budgets count with `pricing` (part of the same config).
    pub fn apply(
        &self,
        quotas: &QuotasConfig,
        governance: &GovernanceConfig,
        pricing: &PricingConfig,
    ) {
        let when_down = governance
            .redis
            .as_ref()
            .map(RedisConfig::when_down)
            .unwrap_or_default();
        let table = QuotaTable::new(quotas, when_down);
        table.carry_from(&self.current.load().table);
        let pricing = table.counts_money().then(|| pricing.clone());
        self.current.store(Arc::new(Snapshot {
            table,
            redis: governance.redis.clone(),
            pricing,
        }));
    }

    /// Installs the shared backend (the binary builds it from
    /// `governance.redis`).
    pub fn set_backend(&self, backend: Box<dyn SharedCounters>) {
        self.inner.backend.store(Some(Arc::new(backend)));
    }

    pub fn backend_state(&self) -> BackendState {
        let snap = self.current.load();
        match (&snap.redis, &*self.inner.backend.load()) {
            (Some(r), Some(b)) if !b.is_up() => BackendState::Down {
                required_for_ready: r.required_for_ready,
            },
            (Some(_), Some(_)) => BackendState::Up,
            _ => BackendState::Local,
        }
    }

    /// Reserves `demand` for a caller of `team` (key id `key`) in `band`,
    /// on a model called `model_names` (the first with a price sets the
    /// cost of money budgets). No limit applies: an empty grant, without
    /// allocating. The same as [`QuotaStore::try_reserve`], then
    /// [`AskBackend::ask`] when the shared backend must be asked.
    pub async fn reserve<'n>(
        &self,
        team: &str,
        key: Option<&str>,
        band: Priority,
        demand: Demand,
        model_names: impl IntoIterator<Item = &'n str>,
    ) -> Result<Grant, Refusal> {
        match self.try_reserve(team, key, band, demand, model_names) {
            Ok(decided) => decided,
            Err(ask) => ask.ask().await,
        }
    }

    /// The part of [`QuotaStore::reserve`] that never waits: decided now
    /// (no limit, local counters, a Redis lease, Redis known down), or `Err`
    /// when the shared backend must be asked (then [`AskBackend::ask`]).
    /// Lets a caller build (and box) the waiting future only when it waits.
    pub fn try_reserve<'n>(
        &self,
        team: &str,
        key: Option<&str>,
        band: Priority,
        demand: Demand,
        model_names: impl IntoIterator<Item = &'n str>,
    ) -> Result<Result<Grant, Refusal>, Box<AskBackend>> {
        let snap = self.current.load();
        if snap.table.is_empty() {
            return Ok(Ok(Grant::default()));
        }
        let started = Instant::now();
        let mut path = Path::Local;
        let decided = self.decide(
            &snap,
            team,
            key,
            band,
            demand,
            model_names,
            started,
            &mut path,
        );
        if decided.is_ok() {
            record_reserve_time(path, started);
        }
        decided
    }

    /// [`QuotaStore::try_reserve`] once the table has limits; `path` says
    /// how it was decided (for the timing).
    #[allow(clippy::too_many_arguments)]
    fn decide<'n>(
        &self,
        snap: &Snapshot,
        team: &str,
        key: Option<&str>,
        band: Priority,
        mut demand: Demand,
        model_names: impl IntoIterator<Item = &'n str>,
        started: Instant,
        path: &mut Path,
    ) -> Result<Result<Grant, Refusal>, Box<AskBackend>> {
        let applicable = snap.table.lookup(team, key);
        if applicable.scopes.iter().all(Option::is_none) {
            *path = Path::Unlimited;
            return Ok(Ok(Grant::default()));
        }
        let price = snap
            .pricing
            .as_ref()
            .and_then(|p| p.model_price(model_names));
        demand.cost_micros = cost_micros(price, &demand);
        let now = now_ms();
        let mut ops = Vec::with_capacity(8);
        let mut owners: Vec<&Arc<Rules>> = Vec::with_capacity(8);
        let local_mode = snap.redis.is_none();
        for (scope, rules) in applicable.scopes.iter().flatten() {
            for (i, limit) in rules.limits.iter().enumerate() {
                let (window_id, expires_at_ms) = limit.window.at(now);
                ops.push(CounterOp {
                    scope: scope.clone(),
                    dim: limit.dim,
                    window: limit.window,
                    window_id,
                    expires_at_ms,
                    limit: rules.limit_for(limit, band),
                    add: demand.amount(limit.dim),
                    local: if local_mode { rules.slot(i) } else { None },
                });
                owners.push(rules);
            }
        }
        let backend = match &snap.redis {
            Some(r) => self.inner.backend.load_full().map(|b| (b, r.timeout)),
            None => None,
        };
        let asked = Asked {
            inner: &self.inner,
            ops,
            price,
            demand,
            now,
        };
        let (verdict, source) = match backend {
            None => (
                self.inner.local.reserve_local(&asked.ops, now),
                Source::Local,
            ),
            Some((b, timeout)) => match b.try_local(&asked.ops, now) {
                // From this replica's leased allowance: no round trip.
                Some(values) => {
                    *path = Path::Lease;
                    (Verdict::Admitted(values), Source::Shared)
                }
                // Known down: the fallback decides at once.
                None if !b.is_up() => {
                    *path = Path::Fallback;
                    return Ok(asked.fallback(&owners));
                }
                // Boxed: this path waits for a round trip anyway, and the
                // decided path's result stays small.
                None => {
                    return Err(Box::new(AskBackend {
                        inner: self.inner.clone(),
                        ops: asked.ops,
                        owners: owners.into_iter().cloned().collect(),
                        price,
                        demand,
                        now,
                        backend: b,
                        timeout,
                        started,
                    }))
                }
            },
        };
        Ok(asked.conclude(verdict, source, &owners))
    }

    /// At shutdown, after the drain: the shared backend gives back what this
    /// replica holds (its unused slices), so the other replicas may use it
    /// at once instead of when the window ends.
    pub async fn release(&self) {
        if let Some(b) = self.inner.backend.load_full() {
            b.release().await;
        }
    }

    /// The local counter of a team's limit in the current window (tests).
    pub fn local_value(&self, scope: &str, dim: Dim, window: Window) -> i64 {
        let (window_id, expires_at_ms) = window.at(now_ms());
        let snap = self.current.load();
        let local = match &snap.redis {
            Some(_) => None,
            None => snap.table.slot_of(scope, dim, window),
        };
        let op = CounterOp {
            scope: scope.into(),
            dim,
            window,
            window_id,
            expires_at_ms,
            limit: 0,
            add: 0,
            local,
        };
        self.inner.local.value_local(&op) + self.inner.fallback.value(&op)
    }
}

/// Times a reservation into [`DECISION_SECONDS`]: every round trip and
/// fallback decision, one in [`SAMPLE_EVERY`] of the in-memory ones.
fn record_reserve_time(path: Path, started: Instant) {
    let record = match path {
        Path::Unlimited => false,
        Path::Call | Path::Fallback => true,
        Path::Local | Path::Lease => sampled(),
    };
    if record {
        metrics().reserve[path as usize].record(started.elapsed().as_secs_f64());
    }
}

/// A reservation's counter operations, and what its grant or refusal is
/// built from once the counters answered.
struct Asked<'a> {
    inner: &'a Arc<Inner>,
    ops: Vec<CounterOp>,
    price: Option<TokenPrice>,
    demand: Demand,
    now: u64,
}

impl Asked<'_> {
    /// The shared backend is down: a fail-closed limit refuses (503),
    /// otherwise this replica's fallback counters decide, each limit
    /// scaled by its `local_share`.
    fn fallback(self, owners: &[&Arc<Rules>]) -> Result<Grant, Refusal> {
        self.inner.degraded.store(true, Ordering::Relaxed);
        if let Some(rules) = owners.iter().find(|r| r.when_down == WhenDown::FailClosed) {
            metrics().closed.increment(1);
            return Err(Refusal::unavailable(rules));
        }
        let share = |i: usize| match owners[i].when_down {
            WhenDown::FailOpen { local_share } => local_share,
            WhenDown::FailClosed => 0.0,
        };
        let verdict = self.inner.fallback.reserve(&self.ops, share, self.now);
        self.conclude(verdict, Source::Fallback, owners)
    }

    /// The grant of an admitted reservation, or the refusal naming the
    /// limit (`owners[i]` holds op `i`'s limit).
    fn conclude(
        self,
        verdict: Verdict,
        source: Source,
        owners: &[&Arc<Rules>],
    ) -> Result<Grant, Refusal> {
        let Asked {
            inner,
            ops,
            price,
            demand,
            now,
        } = self;
        let m = metrics();
        match verdict {
            Verdict::Admitted(values) => {
                m.by_source[source as usize].increment(1);
                let rates = RateSnapshot::of(&ops, &values, now);
                Ok(Grant(Some(Box::new(Reserved {
                    inner: inner.clone(),
                    ops,
                    price,
                    reserved: demand,
                    source,
                    rates,
                    settled: false,
                }))))
            }
            Verdict::Refused { index, values } => {
                let rules = owners[index];
                let limit = rules
                    .limits
                    .iter()
                    .find(|l| l.dim == ops[index].dim && l.window == ops[index].window)
                    .copied();
                let op = &ops[index];
                metrics::counter!("infergate_quota_refused_total",
                    "quota" => rules.entry.to_string(),
                    "limit" => limit.map_or("unknown", |l| l.label()))
                .increment(1);
                Err(Refusal::Limit(Box::new(LimitRefusal {
                    kind: rules.kind,
                    entry: rules.entry.clone(),
                    limit: limit.unwrap_or(Limit {
                        dim: op.dim,
                        window: op.window,
                        amount: op.limit,
                    }),
                    band_limit: op.limit,
                    used: values[index].max(0) as u64,
                    requested: op.add,
                    reset_ms: reset_ms(op, now),
                    rates: RateSnapshot::of(&ops, &values, now),
                })))
            }
        }
    }
}

/// A reservation [`QuotaStore::try_reserve`] could not decide without a
/// round trip to the shared backend: [`AskBackend::ask`] makes it.
#[must_use = "the reservation is decided only by `ask`"]
pub struct AskBackend {
    inner: Arc<Inner>,
    ops: Vec<CounterOp>,
    /// The rules of each op's limit.
    owners: Vec<Arc<Rules>>,
    price: Option<TokenPrice>,
    demand: Demand,
    now: u64,
    backend: Arc<Box<dyn SharedCounters>>,
    timeout: Duration,
    /// When the reservation started (for its timing).
    started: Instant,
}

impl std::fmt::Debug for AskBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskBackend")
            .field("ops", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl AskBackend {
    /// Asks the shared backend, bounded by its timeout; when it is down or
    /// does not answer in time, the fallback decides (see
    /// [`Asked::fallback`]).
    pub async fn ask(self: Box<Self>) -> Result<Grant, Refusal> {
        let AskBackend {
            inner,
            ops,
            owners,
            price,
            demand,
            now,
            backend,
            timeout,
            started,
        } = *self;
        let owners: Vec<&Arc<Rules>> = owners.iter().collect();
        let answer = shared(&**backend, &ops, timeout).await;
        let asked = Asked {
            inner: &inner,
            ops,
            price,
            demand,
            now,
        };
        let (decided, path) = match answer {
            Some(v) => {
                if inner.degraded.load(Ordering::Relaxed) {
                    inner.degraded.store(false, Ordering::Relaxed);
                }
                (asked.conclude(v, Source::Shared, &owners), Path::Call)
            }
            None => (asked.fallback(&owners), Path::Fallback),
        };
        record_reserve_time(path, started);
        decided
    }
}

/// Asks the backend, bounded by `timeout`; `None` when it is down or did
/// not answer in time.
async fn shared(b: &dyn SharedCounters, ops: &[CounterOp], timeout: Duration) -> Option<Verdict> {
    if !b.is_up() {
        return None;
    }
    match tokio::time::timeout(timeout, b.reserve(ops)).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::debug!(error = %e.0, "quota backend failed");
            None
        }
        Err(_) => {
            b.mark_down();
            tracing::warn!(
                ?timeout,
                "quota backend did not answer in time: marked down"
            );
            None
        }
    }
}

/// Money of `d`'s tokens at `price`, in whole micro-units rounded up (a
/// budget never undercounts); zero for a model without a price.
fn cost_micros(price: Option<TokenPrice>, d: &Demand) -> u64 {
    price.map_or(0, |p| {
        p.cost(TokenUsage::new(d.input_tokens, 0, d.output_tokens))
            .micros_ceil()
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn reset_ms(op: &CounterOp, now: u64) -> u64 {
    match op.window {
        // A slot frees when some request ends: retry soon.
        Window::None => 1000,
        _ => op.expires_at_ms.saturating_sub(now),
    }
}

/// The OpenAI rate-limit headers' values: the requests-per-minute and
/// tokens-per-minute limits of the narrowest scope (key before team).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateSnapshot {
    /// (limit, remaining, reset in ms)
    pub requests: Option<(u64, u64, u64)>,
    pub tokens: Option<(u64, u64, u64)>,
}

impl RateSnapshot {
    fn of(ops: &[CounterOp], values: &[i64], now: u64) -> RateSnapshot {
        let find = |dims: &[Dim]| {
            dims.iter().find_map(|d| {
                ops.iter()
                    .zip(values)
                    .find(|(o, _)| o.dim == *d && o.window == Window::Minute)
                    .map(|(o, v)| {
                        let used = (*v).max(0) as u64;
                        (o.limit, o.limit.saturating_sub(used), reset_ms(o, now))
                    })
            })
        };
        RateSnapshot {
            requests: find(&[Dim::Requests]),
            tokens: find(&[Dim::Tokens, Dim::InputTokens, Dim::OutputTokens]),
        }
    }

    /// Writes `x-ratelimit-*` headers (those whose limit is configured).
    pub fn write(&self, h: &mut HeaderMap) {
        use http::HeaderName as N;
        const LIMIT_REQUESTS: N = N::from_static("x-ratelimit-limit-requests");
        const REMAINING_REQUESTS: N = N::from_static("x-ratelimit-remaining-requests");
        const RESET_REQUESTS: N = N::from_static("x-ratelimit-reset-requests");
        const LIMIT_TOKENS: N = N::from_static("x-ratelimit-limit-tokens");
        const REMAINING_TOKENS: N = N::from_static("x-ratelimit-remaining-tokens");
        const RESET_TOKENS: N = N::from_static("x-ratelimit-reset-tokens");
        // One growth of the map for all six, not one per insert.
        h.reserve(6);
        HEADER_CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if let Some((limit, remaining, reset)) = self.requests {
                h.insert(LIMIT_REQUESTS, c.limit(0, limit));
                h.insert(REMAINING_REQUESTS, HeaderValue::from(remaining));
                h.insert(RESET_REQUESTS, c.reset(reset));
            }
            if let Some((limit, remaining, reset)) = self.tokens {
                h.insert(LIMIT_TOKENS, c.limit(1, limit));
                h.insert(REMAINING_TOKENS, HeaderValue::from(remaining));
                h.insert(RESET_TOKENS, c.reset(reset));
            }
        });
    }
}

thread_local! {
    static HEADER_CACHE: std::cell::RefCell<HeaderCache> =
        std::cell::RefCell::new(HeaderCache::default());
}

/// The header values that repeat from request to request, per serving
/// thread: the two limits (from the config) and the reset (its text
/// changes once a second). A hit clones a shared value (a reference
/// count) instead of formatting and allocating a new one.
#[derive(Default)]
struct HeaderCache {
    limits: [Option<(u64, HeaderValue)>; 2],
    /// (the reset's text key, its value).
    reset: Option<(u64, HeaderValue)>,
}

impl HeaderCache {
    fn limit(&mut self, i: usize, limit: u64) -> HeaderValue {
        match &self.limits[i] {
            Some((l, v)) if *l == limit => v.clone(),
            _ => {
                let v = HeaderValue::from(limit);
                self.limits[i] = Some((limit, v.clone()));
                v
            }
        }
    }

    fn reset(&mut self, ms: u64) -> HeaderValue {
        // Values that print the same share a key: milliseconds under one
        // second, else whole seconds rounded up.
        let key = if ms < 1000 {
            ms
        } else {
            ms.div_ceil(1000) << 10
        };
        match &self.reset {
            Some((k, v)) if *k == key => v.clone(),
            _ => {
                let v = reset_value(ms);
                self.reset = Some((key, v.clone()));
                v
            }
        }
    }
}

/// A reset in OpenAI's format: `850ms`, `12s`, `1m30s`, `3h5m0s`, written
/// digit by digit into a stack buffer (no formatter, no intermediate string).
fn reset_value(ms: u64) -> HeaderValue {
    let mut out = Digits::default();
    if ms < 1000 {
        out.int(ms).text(b"ms");
    } else {
        let secs = ms.div_ceil(1000);
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            out.int(h).text(b"h").int(m).text(b"m");
        } else if m > 0 {
            out.int(m).text(b"m");
        }
        out.int(s).text(b"s");
    }
    HeaderValue::from_bytes(out.as_bytes()).unwrap_or(HeaderValue::from_static("1s"))
}

/// A short ASCII text built on the stack: a reset is at most 20 bytes
/// (`u64::MAX` ms is `5124095576030h25m52s`); longer input is cut at 32.
#[derive(Default)]
struct Digits {
    buf: [u8; 32],
    len: usize,
}

impl Digits {
    fn int(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.text(&tmp[i..])
    }

    fn text(&mut self, t: &[u8]) -> &mut Self {
        let end = (self.len + t.len()).min(self.buf.len());
        self.buf[self.len..end].copy_from_slice(&t[..end - self.len]);
        self.len = end;
        self
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A request refused by its quotas.
#[derive(Debug)]
pub enum Refusal {
    /// A limit has no room for this request.
    Limit(Box<LimitRefusal>),
    /// The shared counters are down and a limit fails closed.
    Unavailable { entry: Arc<str> },
}

#[derive(Debug)]
pub struct LimitRefusal {
    pub kind: ScopeKind,
    pub entry: Arc<str>,
    pub limit: Limit,
    /// The limit as seen by the request's band.
    pub band_limit: u64,
    pub used: u64,
    pub requested: u64,
    pub reset_ms: u64,
    pub rates: RateSnapshot,
}

impl Refusal {
    fn unavailable(rules: &Rules) -> Refusal {
        Refusal::Unavailable {
            entry: rules.entry.clone(),
        }
    }

    /// The OpenAI-style error: 429 naming the limit (`rate_limit_exceeded`,
    /// or `insufficient_quota` for a day or month budget), or 503 while a
    /// fail-closed limit cannot be checked.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            Refusal::Unavailable { entry } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("Quota `{entry}` cannot be checked right now (its shared counters are unreachable and it fails closed). Please retry."),
            )
            .with_code("quota_unavailable")
            .with_retry_after(1),
            Refusal::Limit(r) => {
                let what = r.limit.label();
                let reserved = if r.band_limit < r.limit.amount {
                    format!(" ({} of it for this priority band)", r.band_limit)
                } else {
                    String::new()
                };
                let amount = |v: u64| match r.limit.dim {
                    Dim::Cost => format!("{:.6}", v as f64 / super::rules::MICROS),
                    _ => v.to_string(),
                };
                let message = format!(
                    "Limit `{what}` of {} `{}` reached: limit {}{reserved}, used {}, requested {}. Please try again in {}.",
                    r.kind.as_str(),
                    r.entry,
                    amount(r.limit.amount),
                    amount(r.used),
                    amount(r.requested),
                    reset_value(r.reset_ms).to_str().unwrap_or("1s"),
                );
                let (kind, code) = if r.limit.is_budget() {
                    ("insufficient_quota", "insufficient_quota")
                } else if r.limit.dim == Dim::Requests || r.limit.dim == Dim::Concurrent {
                    ("requests", "rate_limit_exceeded")
                } else {
                    ("tokens", "rate_limit_exceeded")
                };
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, kind, message)
                    .with_code(code)
                    .with_retry_after(r.reset_ms.div_ceil(1000).max(1))
            }
        }
    }

    pub fn rates(&self) -> RateSnapshot {
        match self {
            Refusal::Limit(r) => r.rates,
            Refusal::Unavailable { .. } => RateSnapshot::default(),
        }
    }
}

/// A request's reservation; settle it with what the request used. Dropped
/// unsettled, it is settled for nothing generated.
#[derive(Debug, Default)]
pub struct Grant(Option<Box<Reserved>>);

#[derive(Debug)]
struct Reserved {
    inner: Arc<Inner>,
    ops: Vec<CounterOp>,
    price: Option<TokenPrice>,
    reserved: Demand,
    source: Source,
    rates: RateSnapshot,
    settled: bool,
}

impl Grant {
    /// Whether any limit applied.
    pub fn is_limited(&self) -> bool {
        self.0.is_some()
    }

    pub fn rates(&self) -> Option<RateSnapshot> {
        self.0.as_ref().map(|r| r.rates)
    }

    pub fn source(&self) -> Option<Source> {
        self.0.as_ref().map(|r| r.source)
    }

    /// Corrects every counter from the reservation to `used` (up or down;
    /// its cost is computed here from the tokens) and frees the request's
    /// slot. Once; later calls do nothing.
    pub fn settle(&mut self, used: Demand) {
        if let Some(r) = self.0.as_mut() {
            r.settle(used);
        }
    }
}

impl Reserved {
    fn settle(&mut self, used: Demand) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if !sampled() {
            return self.apply(used);
        }
        let started = Instant::now();
        self.apply(used);
        metrics().settle[self.source as usize].record(started.elapsed().as_secs_f64());
    }

    fn apply(&self, mut used: Demand) {
        used.cost_micros = cost_micros(self.price, &used);
        let backend = match self.source {
            Source::Shared => self.inner.backend.load_full(),
            _ => None,
        };
        for op in &self.ops {
            let delta = match op.dim {
                Dim::Concurrent => -1,
                Dim::Requests => 0,
                d => used.amount(d) as i64 - self.reserved.amount(d) as i64,
            };
            if delta == 0 {
                continue;
            }
            match (self.source, &backend) {
                (Source::Shared, Some(b)) => b.settle(op, delta),
                (Source::Shared, None) => {}
                (Source::Local, _) => self.inner.local.settle_local(op, delta),
                (Source::Fallback, _) => self.inner.fallback.settle(op, delta),
            }
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.settle(Demand::default());
    }
}

/// How a reservation was decided, for [`DECISION_SECONDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Local mode: this replica's counters.
    Local = 0,
    /// Redis mode, admitted from this replica's leased slices (no wait).
    Lease = 1,
    /// Redis mode, a round trip (no slice, a slice ran dry, a refusal).
    Call = 2,
    /// Redis mode while Redis is down: fallback counters or fail closed.
    Fallback = 3,
    /// No limit applied to the caller (not timed).
    Unlimited = 4,
}

/// In-memory quota decisions (local counters, a Redis lease) and
/// settlements are timed for one in this many, per serving thread.
const SAMPLE_EVERY: u32 = 16;

/// Whether this in-memory decision is one of the timed ones.
fn sampled() -> bool {
    thread_local!(static SEEN: Cell<u32> = const { Cell::new(0) });
    SEEN.with(|n| {
        let v = n.get().wrapping_add(1);
        n.set(v);
        v % SAMPLE_EVERY == 0
    })
}

/// `infergate_quota_decision_seconds{mode, stage, path}`: time spent in
/// quotas by a request, on its own path: `stage="reserve"` (before
/// admission; `mode="local"` `path="local"`, or `mode="redis"` and
/// `path` `lease`, `call` or `fallback`) and `stage="settle"` (when it ends).
pub const DECISION_SECONDS: &str = "infergate_quota_decision_seconds";

struct Metrics {
    by_source: [metrics::Counter; 3],
    closed: metrics::Counter,
    /// By [`Path`] (without `Unlimited`).
    reserve: [metrics::Histogram; 4],
    /// By [`Source`].
    settle: [metrics::Histogram; 3],
}

/// Handles registered once (no label lookup per request).
fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let c =
            |s: &'static str| metrics::counter!("infergate_quota_decisions_total", "source" => s);
        let h = |mode: &'static str, stage: &'static str, path: &'static str| {
            metrics::histogram!(DECISION_SECONDS, "mode" => mode, "stage" => stage, "path" => path)
        };
        Metrics {
            by_source: [
                c(Source::Shared.as_str()),
                c(Source::Local.as_str()),
                c(Source::Fallback.as_str()),
            ],
            closed: c("closed"),
            reserve: [
                h("local", "reserve", "local"),
                h("redis", "reserve", "lease"),
                h("redis", "reserve", "call"),
                h("redis", "reserve", "fallback"),
            ],
            settle: [
                h("redis", "settle", "redis"),
                h("local", "settle", "local"),
                h("redis", "settle", "fallback"),
            ],
        }
    })
}

#[cfg(test)]
mod tests;
