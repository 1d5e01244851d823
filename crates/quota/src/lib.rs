//! Quota counters shared by every gateway replica, in Redis: the
//! `core::quota::SharedCounters` implementation, and the only crate that
//! links a Redis client.
//!
//! Algorithm: fixed windows on the UTC clock (a counter per scope,
//! dimension and window id, e.g. `infergate:t:search:tok:m29609592`). Every
//! windowed counter (requests, tokens, money) is consumed through
//! **leases**: one Lua script call ([`SCRIPT`], atomic in Redis) checks the
//! request's counters against their limits and, only if all have room, adds
//! the request's need *plus a slice of allowance* to each. The replica then
//! admits later requests from its slices in memory (atomics, no round
//! trip). Calls are made ahead, off the request path: a refill that tops
//! the slice up once less than half of it is left or half `lease_max_age`
//! passed since the last grant, and the next window's lease in the last
//! half `lease_max_age` of a window. A slice holds at least four *refill
//! lead times* of traffic at the replica's rate (lead: twice the recent
//! slow call, a decaying maximum of call times, plus 10 ms), so a refill
//! lands before the slice runs dry however slow Redis is (within the
//! timeout) and whatever the rate. A slice past its age still admits while
//! its refill is in flight: Redis counted it when it granted it. A request
//! asks Redis only when no lease has room (the first requests of a counter,
//! a slice run dry, near the limit), and then at most one call per counter
//! is in flight: the others wait on it (single flight, at most half the
//! timeout) and take from its grant. A slice is the smaller of a fair share
//! of what the window has left (`free / (4 x replicas seen in the last 10
//! s)`) and what this replica takes at its rate (since the last grant, or
//! its recent peak) in one `lease_max_age` or four lead times; where the
//! fair share is under one request's need (near the limit) no slice is
//! given and each request asks Redis. Since Redis counts every slice when
//! it is granted and never grants past the limit, replicas together can
//! only pass a limit by settlements that correct an estimate upward, as
//! without leases.
//!
//! Pauses: a slice unused for `lease_idle` goes back (a `DECRBY` riding on
//! the next call) but a **reserve**: two lead times at the recent peak
//! rate, kept only far from the limit (at most 1 % of it per replica and a
//! quarter of the fair share), also carried into the next window ahead of
//! the roll. So the first requests after a pause of up to `lease_keep`
//! take from memory while the refill they start is in flight; after
//! `lease_keep`, near the limit, and when Redis is found down, everything
//! goes back. A crashed replica's slices stay counted until their window
//! ends.
//!
//! Requests in flight (a gauge) are not leased: a slot must come back when
//! its request ends, and slots parked in an idle replica would refuse work
//! another replica could take. Each such request makes one call, and each
//! replica's slots live in its own field of a hash that expires
//! `governance.redis.slot_ttl` (30 s) after the replica last renewed it
//! (every third of it), so a crashed replica's slots come back within that.
//! At a graceful shutdown ([`SharedCounters::release`], after the drain)
//! every slice goes back and pending settlements are sent.
//!
//! Settlements (estimate to actual) are summed per counter in memory and
//! sent with the next call or every `flush_interval`; they apply only to
//! counters that still exist, so a window that ended or a restarted Redis
//! is never driven negative.
//!
//! Failure: a call that fails on the connection, or a request's own call
//! that outlives `governance.redis.timeout`, marks Redis down; leases are
//! dropped, requests decide locally at once (core's fail-open or
//! fail-closed) and a probe reconnects every `probe_interval`. A refill
//! that outlives the timeout does not (its slices are counted allowance):
//! it is tried again. A request admitted from its slice never waits on
//! Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use infergate_core::quota::{
    CounterOp, Dim, RedisConfig, ReleaseFuture, ReserveFuture, SharedCounters, Unavailable,
    Verdict, Window,
};
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

/// The check-and-lease. KEYS[1]: the registry of replicas (a sorted set by
/// last call); then the request's counters; then the settled ones. ARGV:
/// the number of request counters, this replica's id, now (Unix ms), the
/// gauges' time to live (ms); per request counter its limit, its need, the
/// most extra to lease, when it expires (Unix ms) and whether it is a gauge
/// (1: a hash of per-replica fields `ID` = slots and `ID:e` = when they
/// expire unless renewed); per settled counter its delta (a settled gauge
/// is named `KEY|g`; a zero delta renews this replica's slots). Returns
/// `{1, replicas, value_1, extra_1, ...}` (values after adding; replicas
/// that called in the last 10 s) or `{0, refused counter (1-based),
/// value_1, ...}` (values seen).
pub const SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
local rid = ARGV[2]
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local a = 5 + 5 * n
for j = n + 2, #KEYS do
  local k = KEYS[j]
  if string.sub(k, -2) == '|g' then
    k = string.sub(k, 1, -3)
    if redis.call('HEXISTS', k, rid) == 1 then
      redis.call('HINCRBY', k, rid, ARGV[a])
      redis.call('HSET', k, rid .. ':e', now + ttl)
      redis.call('PEXPIRE', k, ttl)
    end
  elseif redis.call('EXISTS', k) == 1 then
    redis.call('INCRBY', k, ARGV[a])
  end
  a = a + 1
end
if n == 0 then
  return {1, 0}
end
redis.call('ZADD', KEYS[1], now, rid)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10000)
redis.call('PEXPIRE', KEYS[1], 60000)
local replicas = redis.call('ZCARD', KEYS[1])
-- a gauge's value: the slots of replicas that renewed in time
local function gauge(k)
  local f = redis.call('HGETALL', k)
  local sum = 0
  for i = 1, #f, 2 do
    local name = f[i]
    if string.sub(name, -2) == ':e' then
      if tonumber(f[i + 1]) < now then
        local r = string.sub(name, 1, -3)
        redis.call('HDEL', k, name, r)
      end
    end
  end
  f = redis.call('HGETALL', k)
  for i = 1, #f, 2 do
    if string.sub(f[i], -2) ~= ':e' then
      sum = sum + tonumber(f[i + 1])
    end
  end
  return sum
end
local out = {1, 0}
local cur = {}
for i = 1, n do
  local b = 5 + 5 * (i - 1)
  if ARGV[b + 4] == '1' then
    cur[i] = gauge(KEYS[i + 1])
  else
    cur[i] = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  end
  local need = tonumber(ARGV[b + 1])
  if out[2] == 0 and need > 0 and cur[i] + need > tonumber(ARGV[b]) then
    out[1] = 0
    out[2] = i
  end
end
if out[1] == 0 then
  for i = 1, n do
    out[i + 2] = cur[i]
  end
  return out
end
out[2] = replicas
for i = 1, n do
  local b = 5 + 5 * (i - 1)
  local k = KEYS[i + 1]
  local need = tonumber(ARGV[b + 1])
  local cap = tonumber(ARGV[b + 2])
  local free = tonumber(ARGV[b]) - cur[i] - need
  local extra = 0
  if cap > 0 and free > 0 then
    extra = math.min(math.floor(free / (4 * replicas)), cap)
    if extra < need then
      extra = 0
    end
  end
  if ARGV[b + 4] == '1' then
    redis.call('HINCRBY', k, rid, need)
    redis.call('HSET', k, rid .. ':e', now + ttl)
    redis.call('PEXPIRE', k, ttl)
    out[2 * i + 1] = cur[i] + need
  else
    out[2 * i + 1] = redis.call('INCRBY', k, string.format('%d', need + extra))
    redis.call('PEXPIREAT', k, ARGV[b + 3])
  end
  out[2 * i + 2] = extra
end
return out
"#;

/// A counter outlives its window by this much (replicas' clocks differ a little).
const EXPIRY_SLACK_MS: u64 = 120_000;
/// Settlements held while Redis does not answer; beyond, they are dropped
/// (counted in `infergate_quota_settlements_dropped_total`).
const MAX_PENDING: usize = 65_536;
/// A first slice lasts this many requests of the size that asked for it.
const FIRST_SLICE_REQUESTS: u64 = 64;
/// A grant's rate counts towards a lease's peak only over at least this
/// long.
const MIN_RATE_SPAN_MS: u64 = 50;

/// Redis-backed shared counters. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisCounters {
    shared: Arc<Shared>,
}

/// A lease's counter: scope, dimension, window, window id.
type LeaseKey = (Arc<str>, Dim, Window, u64);

struct Shared {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    /// Settlements of counters without a lease, not yet sent: (key, delta).
    pending: Mutex<Vec<(String, i64)>>,
    /// Slices of allowance this replica holds, per counter.
    /// (foldhash, seeded: two lookups per counter and request, where std's
    /// SipHash cost more than the rest of the take.)
    leases: RwLock<HashMap<LeaseKey, Arc<Lease>, foldhash::fast::RandomState>>,
    /// The runtime `start` ran on (the control plane's): refills and
    /// next-window openings a request starts run there, not on the serving
    /// thread that noticed the need (whose requests would wait behind them).
    rt: tokio::runtime::Handle,
    /// Gauges this replica holds slots in (key -> slots), renewed by the
    /// flush task.
    gauges: Mutex<HashMap<String, i64>>,
    /// When a call last carried the pending settlements (Unix ms).
    last_carry: AtomicU64,
    /// When the gauges were last renewed (Unix ms).
    last_renew: AtomicU64,
    /// This replica's name in Redis (the registry, gauge fields).
    id: String,
    prefix: String,
    registry: String,
    script: redis::Script,
    timeout: Duration,
    /// A replica's slots in a gauge (requests in flight) expire this long
    /// after it last renewed them; it renews every third of it.
    gauge_ttl_ms: u64,
    /// 0: leases off.
    lease_max_age_ms: u64,
    lease_idle_ms: u64,
    lease_keep_ms: u64,
    /// How long a call takes, a decaying maximum (us, about the p99 of the
    /// last second's calls): refills start this far ahead of need.
    slow_us: AtomicU64,
    /// `infergate_quota_redis_calls_total`: round trips, to compare with requests.
    calls: metrics::Counter,
    /// By [`Why`].
    waits: [metrics::Counter; 5],
    /// `infergate_quota_redis_joined_total`: requests that waited on a call
    /// already in flight and were admitted from its grant.
    joined: metrics::Counter,
}

/// One counter's slice held by this replica. `remaining` is taken with a
/// compare-and-swap per request; grants, refills and the return take
/// `retired`'s lock (off the request path).
struct Lease {
    /// The counter as the request that opened the lease saw it.
    op: CounterOp,
    key: String,
    /// Allowance left to admit from.
    remaining: AtomicI64,
    /// The counter's value in Redis at the last grant (slices included):
    /// `base - remaining` estimates what is reserved, for the headers.
    base: AtomicI64,
    granted_at: AtomicU64,
    last_used: AtomicU64,
    /// Taken since the last grant (sizes the next slice).
    taken: AtomicU64,
    /// The last request's need (sizes a slice without history).
    unit: AtomicU64,
    /// The rate this replica took at over recent grants (units per second;
    /// halved at each grant it is not met again): sizes the first refill
    /// and the reserve kept over a pause, when the rate since the last
    /// grant says nothing.
    peak: AtomicU64,
    /// Replicas that called Redis in the last 10 s, as of the last grant.
    replicas: AtomicU64,
    /// A grant landed: before it, a request that finds no room is a cold
    /// start (`first`), not a slice run dry.
    opened: AtomicBool,
    /// Settlement deltas not yet sent.
    settle: AtomicI64,
    /// A call that grants to this lease is in flight (a refill, the
    /// next window's opening, or a request's own call): requests that
    /// find the slice short wait on it (`done`) instead of calling too.
    refilling: AtomicBool,
    done: Notify,
    /// The next window's lease was asked for (ahead of the roll).
    next_opened: AtomicBool,
    /// The last grant had no slice (near the limit): no refills ahead,
    /// every request asks Redis.
    starved: AtomicBool,
    retired: Mutex<bool>,
}

impl Lease {
    /// Takes `add` if the slice has it and the estimated counter stays
    /// within `limit` (a band's share of the limit).
    fn take(&self, add: u64, limit: u64) -> bool {
        let add = add as i64;
        let base = self.base.load(Ordering::Relaxed);
        let mut r = self.remaining.load(Ordering::Relaxed);
        loop {
            if r < add || base - r + add > limit as i64 {
                return false;
            }
            match self.remaining.compare_exchange_weak(
                r,
                r - add,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => r = now,
            }
        }
    }

    /// Units taken per second since the last grant (over at least
    /// `MIN_RATE_SPAN_MS`: a burst right after a grant is not a rate).
    fn rate_since_grant(&self, now: u64) -> u64 {
        let elapsed = now
            .saturating_sub(self.granted_at.load(Ordering::Relaxed))
            .max(MIN_RATE_SPAN_MS);
        self.taken.load(Ordering::Relaxed).saturating_mul(1000) / elapsed
    }

    /// The rate to plan for (units per second): since the last grant, or
    /// the recent peak when higher (after a pause the first says nothing).
    fn rate(&self, now: u64) -> u64 {
        self.rate_since_grant(now)
            .max(self.peak.load(Ordering::Relaxed))
    }

    /// The most extra to ask for: what this replica takes at its
    /// [`rate`](Self::rate) in one `max_age` and in four refill lead times
    /// (a slow Redis), or a first guess of 64 requests.
    fn cap(&self, now: u64, max_age_ms: u64, lead_ms: u64, need: u64) -> u64 {
        let unit = self.unit.load(Ordering::Relaxed).max(need).max(1);
        (self.rate(now).saturating_mul(max_age_ms.max(4 * lead_ms)) / 1000)
            .max(unit.saturating_mul(FIRST_SLICE_REQUESTS))
    }

    /// What to keep of the slice over a pause (used within `lease_keep`,
    /// not within `lease_idle`), so the first requests after it take from
    /// memory while their refill is in flight: two refill lead times at the
    /// recent peak rate (at least one request), and only far from the
    /// limit: at most 1 % of it per replica and a quarter of this replica's
    /// fair share of what the window had left at the last grant. 0: keep
    /// nothing (near the limit, or under one request).
    fn reserve(&self, lead_ms: u64) -> i64 {
        let peak = self.peak.load(Ordering::Relaxed);
        // No rate measured yet (a counter used once or twice): nothing to plan for.
        if peak == 0 || self.starved.load(Ordering::Relaxed) {
            return 0;
        }
        let unit = self.unit.load(Ordering::Relaxed).max(1);
        let replicas = self.replicas.load(Ordering::Relaxed).max(1);
        let limit = self.op.limit;
        let free = limit.saturating_sub(self.base.load(Ordering::Relaxed).max(0) as u64);
        let want = (peak.saturating_mul(2 * lead_ms) / 1000).max(unit);
        let keep = want
            .min(limit / (100 * replicas))
            .min(free / (4 * replicas));
        if keep < unit {
            0
        } else {
            keep.min(i64::MAX as u64) as i64
        }
    }

    /// Gives back what the slice holds beyond `keep`: the amount returned
    /// (the caller sends it to Redis).
    fn trim(&self, keep: i64) -> i64 {
        let mut r = self.remaining.load(Ordering::Relaxed);
        loop {
            if r <= keep {
                return 0;
            }
            match self
                .remaining
                .compare_exchange_weak(r, keep, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.base.fetch_sub(r - keep, Ordering::Relaxed);
                    return r - keep;
                }
                Err(now) => r = now,
            }
        }
    }

    /// Adds a grant from Redis (`value` after it, `extra` for the slice;
    /// `replicas` that called lately); false when the lease was returned
    /// meanwhile (the caller gives `extra` back).
    fn grant(&self, value: i64, extra: i64, replicas: i64, now: u64) -> bool {
        let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if *retired {
            return false;
        }
        // The rate over the grant that ends here, if it lasted long enough
        // to say something (a burst over a few ms would overstate it).
        let lasted = now.saturating_sub(self.granted_at.load(Ordering::Relaxed));
        if self.opened.swap(true, Ordering::Relaxed) && lasted >= MIN_RATE_SPAN_MS {
            let measured = self.rate_since_grant(now);
            let peak = self.peak.load(Ordering::Relaxed);
            self.peak.store(measured.max(peak / 2), Ordering::Relaxed);
        }
        self.remaining.fetch_add(extra, Ordering::AcqRel);
        self.base.store(value, Ordering::Relaxed);
        self.granted_at.store(now, Ordering::Relaxed);
        self.taken.store(0, Ordering::Relaxed);
        self.replicas
            .store(replicas.max(1) as u64, Ordering::Relaxed);
        self.starved.store(extra <= 0, Ordering::Relaxed);
        true
    }

    /// The call in flight for this lease ended (granted or not): the
    /// requests waiting on it look at the slice again.
    fn end_flight(&self) {
        self.refilling.store(false, Ordering::Release);
        self.done.notify_waiters();
    }

    /// Waits until the call in flight for this lease ends, or `deadline`;
    /// false on the deadline.
    async fn wait_flight(&self, deadline: tokio::time::Instant) -> bool {
        let notified = self.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.refilling.load(Ordering::Acquire) {
            return true;
        }
        tokio::time::timeout_at(deadline, notified).await.is_ok()
    }

    /// Ends the lease: what goes back to Redis (unused allowance returned,
    /// settlements sent).
    fn retire(&self) -> i64 {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        *retired = true;
        let unused = self.remaining.swap(0, Ordering::AcqRel);
        self.settle.swap(0, Ordering::AcqRel) - unused
    }
}

fn lease_key(op: &CounterOp) -> LeaseKey {
    (op.scope.clone(), op.dim, op.window, op.window_id)
}

impl std::fmt::Debug for RedisCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCounters")
            .field("prefix", &self.shared.prefix)
            .field("up", &self.shared.up.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisCounters {
    /// Connects (waiting at most `cfg.timeout`; an unreachable Redis starts
    /// down and is probed) and starts the probe and flush tasks, which end
    /// when the last clone is dropped. Needs a Tokio runtime.
    pub async fn start(cfg: &RedisConfig) -> Result<RedisCounters, String> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| format!("governance.redis.url: {e}"))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let shared = Arc::new(Shared {
            client,
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            leases: RwLock::new(HashMap::default()),
            rt: tokio::runtime::Handle::current(),
            gauges: Mutex::new(HashMap::new()),
            last_carry: AtomicU64::new(0),
            last_renew: AtomicU64::new(0),
            id: format!("{:x}-{nanos:x}", std::process::id()),
            prefix: cfg.key_prefix.clone(),
            registry: format!("{}:replicas", cfg.key_prefix),
            script: redis::Script::new(SCRIPT),
            timeout: cfg.timeout,
            gauge_ttl_ms: cfg.slot_ttl.as_millis().max(1) as u64,
            lease_max_age_ms: cfg.lease_max_age.as_millis() as u64,
            lease_idle_ms: cfg.lease_idle.as_millis().max(1) as u64,
            lease_keep_ms: cfg.lease_keep.max(cfg.lease_idle).as_millis().max(1) as u64,
            slow_us: AtomicU64::new(0),
            calls: metrics::counter!("infergate_quota_redis_calls_total"),
            waits: WHY
                .map(|r| metrics::counter!("infergate_quota_redis_waits_total", "reason" => r)),
            joined: metrics::counter!("infergate_quota_redis_joined_total"),
        });
        shared.connect().await;
        tokio::spawn(probe_loop(Arc::downgrade(&shared), cfg.probe_interval));
        tokio::spawn(flush_loop(Arc::downgrade(&shared), cfg.flush_interval));
        Ok(RedisCounters { shared })
    }
}

/// The calls in flight a request's own call stands for; ended (waiters
/// woken) when it is done, also when the request is cancelled.
struct Flights(Vec<Arc<Lease>>);

impl Drop for Flights {
    fn drop(&mut self) {
        for l in &self.0 {
            l.end_flight();
        }
    }
}

/// Why a request could not be admitted from this replica's slices (and so
/// asks Redis): `infergate_quota_redis_waits_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// No slice of the counter yet (its first requests, or after
    /// `lease_keep` unused or a pause near the limit).
    First = 0,
    /// The window rolled and the new window's lease was not open.
    Rolled = 1,
    /// The slice ran dry before its refill landed.
    Short = 2,
    /// Near the limit: the last grant had no slice.
    Starved = 3,
    /// A requests-in-flight counter: one call per request, by design.
    Gauge = 4,
}

const WHY: [&str; 5] = ["first", "rolled", "short", "starved", "gauge"];

/// One counter of a call: the op, what it needs now, the most extra to lease.
struct Ask<'a> {
    op: &'a CounterOp,
    need: u64,
    cap: u64,
}

impl Shared {
    fn conn(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_up(&self, conn: Option<MultiplexedConnection>) {
        let up = conn.is_some();
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
        if !up {
            // Slices are not admitted from while Redis cannot confirm them;
            // what they held goes back when it answers again.
            self.retire_leases(|_| true, now_ms());
        }
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("quota counters: Redis answers again");
            } else {
                tracing::warn!(
                    "quota counters: Redis is down; limits fail open or closed as configured"
                );
            }
        }
    }

    /// (Re)connects and pings, within the timeout.
    async fn connect(&self) -> bool {
        let attempt = async {
            let mut c = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut c).await?;
            Ok::<_, redis::RedisError>(c)
        };
        match tokio::time::timeout(self.timeout.max(Duration::from_millis(200)), attempt).await {
            Ok(Ok(c)) => {
                self.set_up(Some(c));
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "quota counters: Redis connect failed");
                false
            }
            Err(_) => false,
        }
    }

    fn push_pending(&self, key: String, delta: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() >= MAX_PENDING {
            metrics::counter!("infergate_quota_settlements_dropped_total").increment(1);
            return;
        }
        p.push((key, delta));
    }

    /// Returns the leases `which` picks: unused allowance and settlements
    /// go to the pending list (windows that ended are dropped).
    fn retire_leases(&self, which: impl Fn(&Lease) -> bool, now: u64) {
        let mut gone = Vec::new();
        // Most passes pick none: look under the read lock first, so the
        // requests' takes are not held up by the write lock for nothing.
        if !self
            .leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|l| which(l))
        {
            return;
        }
        {
            let mut leases = self.leases.write().unwrap_or_else(|p| p.into_inner());
            leases.retain(|_, l| {
                let pick = which(l);
                if pick {
                    gone.push(l.clone());
                }
                !pick
            });
        }
        for l in gone {
            let delta = l.retire();
            if delta != 0 && l.op.expires_at_ms > now {
                self.push_pending(l.key.clone(), delta);
            }
        }
    }

    /// Every settlement not yet sent: the pending list and the leases'.
    fn take_pending(&self) -> Vec<(String, i64)> {
        self.last_carry.store(now_ms(), Ordering::Relaxed);
        let mut out = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *p)
        };
        let leases = self.leases.read().unwrap_or_else(|p| p.into_inner());
        for l in leases.values() {
            let d = l.settle.swap(0, Ordering::AcqRel);
            if d != 0 {
                out.push((l.key.clone(), d));
            }
        }
        out
    }

    /// A gauge's hash (`:h`: not the plain counter older versions kept
    /// under the bare key), as named in a settlement (`|g`).
    fn gauge_key(&self, op: &CounterOp) -> String {
        format!("{}:h|g", op.key(&self.prefix))
    }

    /// One script call: `asks` to check and lease, `settle` to apply first.
    async fn call(
        &self,
        asks: &[Ask<'_>],
        settle: &[(String, i64)],
    ) -> Result<Vec<i64>, Unavailable> {
        let Some(mut conn) = self.conn() else {
            return Err(Unavailable("not connected".into()));
        };
        let now = now_ms();
        let mut inv = self.script.prepare_invoke();
        inv.key(self.registry.as_str());
        for a in asks {
            match a.op.window {
                Window::None => inv.key(format!("{}:h", a.op.key(&self.prefix))),
                _ => inv.key(a.op.key(&self.prefix)),
            };
        }
        for (k, _) in settle {
            inv.key(k.as_str());
        }
        inv.arg(asks.len())
            .arg(self.id.as_str())
            .arg(now)
            .arg(self.gauge_ttl_ms);
        for a in asks {
            let gauge = a.op.window == Window::None;
            let expire = if gauge {
                now + self.gauge_ttl_ms
            } else {
                a.op.expires_at_ms.saturating_add(EXPIRY_SLACK_MS)
            };
            inv.arg(a.op.limit)
                .arg(a.need)
                .arg(a.cap)
                .arg(expire)
                .arg(u8::from(gauge));
        }
        for (_, d) in settle {
            inv.arg(*d);
        }
        self.calls.increment(1);
        let started = std::time::Instant::now();
        let answer = inv.invoke_async::<Vec<i64>>(&mut conn).await;
        self.took(started.elapsed());
        match answer {
            Ok(v) => Ok(v),
            Err(e) => {
                metrics::counter!("infergate_quota_redis_errors_total").increment(1);
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                {
                    self.set_up(None);
                }
                Err(Unavailable(e.to_string()))
            }
        }
    }

    /// Folds a call's duration into `slow_us` (a maximum that decays by
    /// 1/64 per call: at the usual ~50 calls per second, about the p99 of
    /// the last second).
    fn took(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let prev = self.slow_us.load(Ordering::Relaxed);
        self.slow_us
            .store(us.max(prev - prev / 64), Ordering::Relaxed);
    }

    /// How far ahead of need a refill starts (ms): twice the recent slow
    /// call, plus 10 ms for the scheduler.
    fn lead_ms(&self) -> u64 {
        (2 * self.slow_us.load(Ordering::Relaxed)).div_ceil(1000) + 10
    }

    /// The lease of `op`'s counter, opened if absent.
    fn lease(&self, op: &CounterOp, now: u64) -> Arc<Lease> {
        let key = lease_key(op);
        if let Some(l) = self
            .leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return l.clone();
        }
        let mut leases = self.leases.write().unwrap_or_else(|p| p.into_inner());
        leases
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Lease {
                    op: CounterOp {
                        add: 0,
                        ..op.clone()
                    },
                    key: op.key(&self.prefix),
                    remaining: AtomicI64::new(0),
                    base: AtomicI64::new(0),
                    granted_at: AtomicU64::new(now),
                    last_used: AtomicU64::new(now),
                    taken: AtomicU64::new(0),
                    unit: AtomicU64::new(op.add),
                    peak: AtomicU64::new(0),
                    replicas: AtomicU64::new(1),
                    opened: AtomicBool::new(false),
                    settle: AtomicI64::new(0),
                    refilling: AtomicBool::new(false),
                    done: Notify::new(),
                    next_opened: AtomicBool::new(false),
                    starved: AtomicBool::new(false),
                    retired: Mutex::new(false),
                })
            })
            .clone()
    }

    /// Adds the extra of a granted call to the counter's lease.
    fn grant(&self, op: &CounterOp, value: i64, extra: i64, replicas: i64, now: u64) {
        let lease = self.lease(op, now);
        if !lease.grant(value, extra, replicas, now) && extra > 0 {
            self.push_pending(lease.key.clone(), -extra);
        }
    }

    fn leases_on(&self) -> bool {
        self.lease_max_age_ms > 0
    }

    /// Admits `ops` from this replica's slices (all or none): the
    /// estimated values after adding, or why a call is needed. Starts the
    /// refills and next-window openings the takes call for (tasks).
    fn take_all(self: &Arc<Self>, ops: &[CounterOp], now: u64) -> Result<Vec<i64>, Why> {
        let leases = self.leases.read().unwrap_or_else(|p| p.into_inner());
        let mut held: [Option<&Arc<Lease>>; 16] = Default::default();
        if ops.len() > held.len() {
            return Err(Why::Gauge);
        }
        let mut why = None;
        for (i, op) in ops.iter().enumerate() {
            if op.window == Window::None {
                why = Some(Why::Gauge);
                break;
            }
            let Some(lease) = leases.get(&lease_key(op)) else {
                let before = (
                    op.scope.clone(),
                    op.dim,
                    op.window,
                    op.window_id.wrapping_sub(1),
                );
                why = Some(if leases.contains_key(&before) {
                    Why::Rolled
                } else {
                    Why::First
                });
                break;
            };
            // A slice past `lease_max_age` still admits: Redis counted it
            // when it was granted, and its refill starts below.
            if !lease.take(op.add, op.limit) {
                why = Some(if lease.starved.load(Ordering::Relaxed) {
                    Why::Starved
                } else if !lease.opened.load(Ordering::Relaxed) {
                    Why::First
                } else {
                    Why::Short
                });
                break;
            }
            held[i] = Some(lease);
        }
        if let Some(why) = why {
            for (op, l) in ops.iter().zip(held.iter()) {
                if let Some(l) = l {
                    l.remaining.fetch_add(op.add as i64, Ordering::AcqRel);
                }
            }
            return Err(why);
        }
        let mut values = Vec::with_capacity(ops.len());
        let lead_ms = self.lead_ms();
        for (op, l) in ops.iter().zip(held.iter().flatten()) {
            let remaining = l.remaining.load(Ordering::Relaxed);
            values.push(l.base.load(Ordering::Relaxed) - remaining);
            l.taken.fetch_add(op.add, Ordering::Relaxed);
            if l.last_used.load(Ordering::Relaxed) != now {
                l.last_used.store(now, Ordering::Relaxed);
            }
            if l.starved.load(Ordering::Relaxed) {
                continue;
            }
            // Refill ahead, once less than half a slice is left: a slice
            // holds at least four refill lead times at the rate, so the
            // refill lands before it runs dry. Or renew it once half
            // `lease_max_age` passed (a slow taker's slice is confirmed,
            // and a Redis gone is noticed); it admits meanwhile.
            let low = l.cap(now, self.lease_max_age_ms, lead_ms, op.add) / 2;
            let half_old = now.saturating_sub(l.granted_at.load(Ordering::Relaxed))
                > self.lease_max_age_ms / 2;
            if ((remaining as u64) < low || half_old) && !l.refilling.swap(true, Ordering::AcqRel) {
                self.rt.spawn(self.clone().refill((*l).clone()));
            }
            // The next window's slice, asked for in the last half
            // `lease_max_age` of this one: no request waits at the roll.
            if op.expires_at_ms.saturating_sub(now) <= self.lease_max_age_ms / 2
                && !l.next_opened.swap(true, Ordering::AcqRel)
            {
                self.rt
                    .spawn(self.clone().open_next((*l).clone(), now, false));
            }
        }
        Ok(values)
    }

    /// Opens the lease of the window after `lease`'s (a task, off the
    /// request path), with a slice sized by `lease`'s rate, or, for a lease
    /// kept over a pause (`kept`), as large as its reserve. Requests of the
    /// new window that come before its grant wait on this call.
    async fn open_next(self: Arc<Self>, lease: Arc<Lease>, now: u64, kept: bool) {
        let (window_id, expires_at_ms) = lease.op.window.at(lease.op.expires_at_ms);
        let op = CounterOp {
            window_id,
            expires_at_ms,
            ..lease.op.clone()
        };
        let next = self.lease(&op, now);
        next.unit
            .store(lease.unit.load(Ordering::Relaxed), Ordering::Relaxed);
        next.peak
            .store(lease.peak.load(Ordering::Relaxed), Ordering::Relaxed);
        // Not idle before its window starts; a kept lease's pause goes on
        // (it goes back `lease_keep` after its last use, as the old one).
        let used = if kept {
            lease.last_used.load(Ordering::Relaxed)
        } else {
            lease.op.expires_at_ms.max(now)
        };
        next.last_used.store(used, Ordering::Relaxed);
        if next.refilling.swap(true, Ordering::AcqRel) {
            return; // a call for it is in flight already
        }
        let cap = if kept {
            lease.remaining.load(Ordering::Relaxed).max(1) as u64
        } else {
            lease.cap(now, self.lease_max_age_ms, self.lead_ms(), 0)
        };
        self.grant_ahead(&next, cap, now).await;
    }

    /// Over a pause: a lease unused for `lease_idle` gives back its slice
    /// but its reserve (the flush task; leases with none were returned
    /// already), and a kept lease opens the next window's ahead of the
    /// roll, so the first requests after a pause of up to `lease_keep`
    /// take from memory while their refill is in flight.
    fn keep_idle(self: &Arc<Self>, now: u64) {
        let lead_ms = self.lead_ms();
        let leases = self.leases.read().unwrap_or_else(|p| p.into_inner());
        for l in leases.values() {
            if now.saturating_sub(l.last_used.load(Ordering::Relaxed)) < self.lease_idle_ms {
                continue;
            }
            let back = l.trim(l.reserve(lead_ms));
            if back > 0 {
                self.push_pending(l.key.clone(), -back);
            }
            if l.op.expires_at_ms.saturating_sub(now) <= self.lease_max_age_ms / 2
                && l.remaining.load(Ordering::Relaxed) > 0
                && !l.next_opened.swap(true, Ordering::AcqRel)
            {
                self.rt.spawn(self.clone().open_next(l.clone(), now, true));
            }
        }
    }

    /// Tops `lease`'s slice up to a full one ahead of need (a task, off the
    /// request path).
    async fn refill(self: Arc<Self>, lease: Arc<Lease>) {
        let now = now_ms();
        let cap = lease.cap(now, self.lease_max_age_ms, self.lead_ms(), 0);
        let left = lease.remaining.load(Ordering::Relaxed).max(0) as u64;
        self.grant_ahead(&lease, cap.saturating_sub(left).max(1), now)
            .await;
    }

    /// One call that asks for up to `cap` of `lease`'s counter with no
    /// request's need in it (a refill or the next window's opening), grants
    /// it to the lease, and ends the lease's flight so the requests waiting
    /// on it look again.
    async fn grant_ahead(&self, lease: &Lease, cap: u64, now: u64) {
        let ask = Ask {
            op: &lease.op,
            need: 0,
            cap,
        };
        let settle = self.take_pending();
        let answer = tokio::time::timeout(self.timeout, self.call(&[ask], &settle)).await;
        if let Ok(Ok(v)) = answer {
            if let [1, replicas, value, extra] = v.as_slice() {
                if !lease.grant(*value, *extra, *replicas, now) && *extra > 0 {
                    self.push_pending(lease.key.clone(), -*extra);
                }
            }
        } else if answer.is_err() {
            // Slow, not gone (a lost connection fails in `call`, which
            // marks Redis down): the slices held are counted allowance and
            // keep admitting; the next take starts another refill, and a
            // request that finds its slice dry asks itself, within the
            // timeout, whose expiry marks Redis down. Dropping every lease
            // here turned a 50 ms stall into refusals (fail closed) until
            // the probe reconnected.
            metrics::counter!("infergate_quota_redis_errors_total").increment(1);
        }
        lease.end_flight();
    }
}

impl SharedCounters for RedisCounters {
    fn try_local(&self, ops: &[CounterOp], now: u64) -> Option<Vec<i64>> {
        let s = &self.shared;
        if !s.leases_on() || !s.up.load(Ordering::Relaxed) {
            return None;
        }
        match s.take_all(ops, now) {
            Ok(values) => Some(values),
            Err(why) => {
                s.waits[why as usize].increment(1);
                None
            }
        }
    }

    fn reserve<'a>(&'a self, ops: &'a [CounterOp]) -> ReserveFuture<'a> {
        Box::pin(async move {
            let s = &self.shared;
            let now = now_ms();
            // Single flight per counter: a request whose slice is short
            // while a call that grants to it is in flight waits for that
            // call (at most half the timeout) and takes from its grant;
            // otherwise its own call is the one the next requests wait on.
            let mut owned = Flights(Vec::new());
            if s.leases_on() && s.up.load(Ordering::Relaxed) {
                let deadline = tokio::time::Instant::now() + s.timeout / 2;
                let mut waited = false;
                for op in ops.iter().filter(|o| o.window != Window::None) {
                    let lease = s.lease(op, now);
                    if lease.starved.load(Ordering::Relaxed) {
                        continue; // near the limit: every request asks
                    }
                    if !lease.refilling.swap(true, Ordering::AcqRel) {
                        owned.0.push(lease);
                    } else if lease.wait_flight(deadline).await {
                        waited = true;
                    }
                }
                if waited {
                    if let Ok(values) = s.take_all(ops, now_ms()) {
                        s.joined.increment(1);
                        return Ok(Verdict::Admitted(values));
                    }
                }
            }
            let asks: Vec<Ask> = ops
                .iter()
                .map(|op| {
                    let cap = if op.window == Window::None || !s.leases_on() {
                        0
                    } else {
                        match s
                            .leases
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&lease_key(op))
                        {
                            Some(l) => l.cap(now, s.lease_max_age_ms, s.lead_ms(), op.add),
                            None => op.add.max(1).saturating_mul(FIRST_SLICE_REQUESTS),
                        }
                    };
                    Ask {
                        op,
                        need: op.add,
                        cap,
                    }
                })
                .collect();
            let settle = s.take_pending();
            let v = s.call(&asks, &settle).await?;
            match v.as_slice() {
                [1, replicas, rest @ ..] if rest.len() == 2 * ops.len() => {
                    let mut values = Vec::with_capacity(ops.len());
                    for (op, pair) in ops.iter().zip(rest.chunks_exact(2)) {
                        let (value, extra) = (pair[0], pair[1]);
                        values.push(value - extra);
                        if op.window == Window::None {
                            let mut g = s.gauges.lock().unwrap_or_else(|p| p.into_inner());
                            *g.entry(s.gauge_key(op)).or_insert(0) += op.add as i64;
                        } else if s.leases_on() {
                            s.grant(op, value, extra, *replicas, now);
                        }
                    }
                    drop(owned); // after the grants: waiters take from them
                    Ok(Verdict::Admitted(values))
                }
                [0, i, values @ ..] if values.len() == ops.len() && *i >= 1 => {
                    // At the limit: no slice to wait for; each request asks
                    // until a grant gives a slice again.
                    for l in &owned.0 {
                        l.starved.store(true, Ordering::Relaxed);
                    }
                    Ok(Verdict::Refused {
                        index: (*i - 1) as usize,
                        values: values.to_vec(),
                    })
                }
                _ => Err(Unavailable(format!("unexpected script answer {v:?}"))),
            }
        })
    }

    fn settle(&self, op: &CounterOp, delta: i64) {
        let s = &self.shared;
        if op.window == Window::None {
            let key = s.gauge_key(op);
            let mut g = s.gauges.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = g.get_mut(&key) {
                *n += delta;
                if *n <= 0 {
                    g.remove(&key);
                }
            }
            drop(g);
            s.push_pending(key, delta);
            return;
        }
        if op.expires_at_ms <= now_ms() {
            return; // the window ended: nothing left to correct
        }
        if let Some(l) = s
            .leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lease_key(op))
        {
            // Summed in the lease (sent with the next call); the read lock
            // keeps a return from missing it.
            l.settle.fetch_add(delta, Ordering::AcqRel);
            return;
        }
        s.push_pending(op.key(&s.prefix), delta);
    }

    fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    fn mark_down(&self) {
        metrics::counter!("infergate_quota_redis_errors_total").increment(1);
        self.shared.set_up(None);
    }

    fn release(&self) -> ReleaseFuture<'_> {
        Box::pin(async move {
            let s = &self.shared;
            if !s.up.load(Ordering::Relaxed) {
                return; // down: the slices were dropped already
            }
            s.retire_leases(|_| true, now_ms());
            let settle = s.take_pending();
            if !settle.is_empty()
                && tokio::time::timeout(s.timeout, s.call(&[], &settle))
                    .await
                    .is_err()
            {
                tracing::warn!("quota counters: slices not returned at shutdown (Redis did not answer in time); they stay counted until their window ends");
            }
        })
    }
}

/// While Redis is down: reconnect every `every`.
async fn probe_loop(shared: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = shared.upgrade() else { return };
        if !s.up.load(Ordering::Relaxed) {
            s.connect().await;
        }
    }
}

/// Every `every`: returns leases of a window that ended, unused for
/// `lease_keep`, or unused for `lease_idle` with no reserve to keep (near
/// the limit); trims the other idle ones to their reserve
/// ([`Shared::keep_idle`]); renews this replica's gauge slots; and sends
/// the settlements no reservation carried.
async fn flush_loop(shared: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = shared.upgrade() else { return };
        if !s.up.load(Ordering::Relaxed) {
            continue;
        }
        let now = now_ms();
        let lead_ms = s.lead_ms();
        s.retire_leases(
            |l| {
                let idle = now.saturating_sub(l.last_used.load(Ordering::Relaxed));
                l.op.expires_at_ms <= now
                    // A lease whose call is in flight is kept for its grant.
                    || (!l.refilling.load(Ordering::Acquire)
                        && (idle >= s.lease_keep_ms
                            || (idle >= s.lease_idle_ms && l.reserve(lead_ms) == 0)))
            },
            now,
        );
        s.keep_idle(now);
        if now.saturating_sub(s.last_renew.load(Ordering::Relaxed)) >= s.gauge_ttl_ms / 3 {
            s.last_renew.store(now, Ordering::Relaxed);
            let held: Vec<String> = s
                .gauges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            for k in held {
                s.push_pending(k, 0);
            }
        }
        let quiet =
            now.saturating_sub(s.last_carry.load(Ordering::Relaxed)) >= every.as_millis() as u64;
        if !quiet {
            continue;
        }
        let settle = s.take_pending();
        if !settle.is_empty() {
            let _ = tokio::time::timeout(s.timeout, s.call(&[], &settle)).await;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
