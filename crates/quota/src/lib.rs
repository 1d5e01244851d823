//! Quota counters shared by every gateway replica, in Redis: the
//! `core::quota::SharedCounters` implementation, and the only crate that
//! links a Redis client.
//!
//! Algorithm: fixed windows on the UTC clock (a counter per scope,
//! dimension and window id, e.g. `infergate:t:search:tok:m29609592`). One
//! Lua script ([`SCRIPT`], run atomically by Redis) first applies the
//! settlements queued since the last call, then checks every counter of the
//! request against its limit and, only if all have room, adds the request's
//! reservation to all of them: a request is admitted or not as a whole, and
//! concurrent replicas can never jointly pass a limit with reservations.
//! Settlements ride on the next reservation (so a busy replica makes one
//! round trip per request); a quiet one flushes them every
//! `flush_interval`. Settlements apply only to counters that still exist,
//! so a window that ended or a restarted Redis is never driven negative.
//!
//! Failure: a call that errors or outlives `governance.redis.timeout` marks
//! Redis down; requests then decide locally at once (core's fail-open or
//! fail-closed) and a probe reconnects every `probe_interval`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use infergate_core::quota::{
    CounterOp, RedisConfig, ReserveFuture, SharedCounters, Unavailable, Verdict, Window,
};
use redis::aio::MultiplexedConnection;

/// The check-and-add. KEYS: the request's counters, then the settled ones.
/// ARGV: the number of request counters; per request counter its limit,
/// what it adds and when it expires (Unix ms); per settled counter its
/// delta. Returns `{admitted (1|0), refused counter (1-based, 0), values...}`.
pub const SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
local a = 2 + 3 * n
for j = n + 1, #KEYS do
  if redis.call('EXISTS', KEYS[j]) == 1 then
    redis.call('INCRBY', KEYS[j], ARGV[a])
  end
  a = a + 1
end
local out = {1, 0}
for i = 1, n do
  local b = 3 * i - 1
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  local add = tonumber(ARGV[b + 1])
  out[i + 2] = cur
  if out[2] == 0 and add > 0 and cur + add > tonumber(ARGV[b]) then
    out[1] = 0
    out[2] = i
  end
end
if out[1] == 0 then
  return out
end
for i = 1, n do
  local b = 3 * i - 1
  out[i + 2] = redis.call('INCRBY', KEYS[i], ARGV[b + 1])
  redis.call('PEXPIREAT', KEYS[i], ARGV[b + 2])
end
return out
"#;

/// A counter outlives its window by this much (replicas' clocks differ a little).
const EXPIRY_SLACK_MS: u64 = 120_000;
/// Requests in flight are counted in a key with no window: it expires after
/// an hour without a request, so a crashed replica's slots do not leak forever.
const GAUGE_TTL_MS: u64 = 3_600_000;
/// Settlements held while Redis does not answer; beyond, they are dropped
/// (counted in `infergate_quota_settlements_dropped_total`).
const MAX_PENDING: usize = 65_536;

/// Redis-backed shared counters. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisCounters {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    /// Settlements not yet sent: (key, delta).
    pending: Mutex<Vec<(String, i64)>>,
    /// When a call last carried the pending settlements (Unix ms).
    last_carry: AtomicU64,
    prefix: String,
    script: redis::Script,
    timeout: Duration,
    /// `infergate_quota_redis_calls_total`: round trips, to compare with requests.
    calls: metrics::Counter,
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
        let shared = Arc::new(Shared {
            client,
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            last_carry: AtomicU64::new(0),
            prefix: cfg.key_prefix.clone(),
            script: redis::Script::new(SCRIPT),
            timeout: cfg.timeout,
            calls: metrics::counter!("infergate_quota_redis_calls_total"),
        });
        shared.connect().await;
        tokio::spawn(probe_loop(Arc::downgrade(&shared), cfg.probe_interval));
        tokio::spawn(flush_loop(Arc::downgrade(&shared), cfg.flush_interval));
        Ok(RedisCounters { shared })
    }
}

impl Shared {
    fn conn(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_up(&self, conn: Option<MultiplexedConnection>) {
        let up = conn.is_some();
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
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

    fn take_pending(&self) -> Vec<(String, i64)> {
        self.last_carry.store(now_ms(), Ordering::Relaxed);
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *p)
    }

    /// One script call: `ops` to reserve, `settle` to apply first.
    async fn call(
        &self,
        ops: &[CounterOp],
        settle: &[(String, i64)],
    ) -> Result<Vec<i64>, Unavailable> {
        let Some(mut conn) = self.conn() else {
            return Err(Unavailable("not connected".into()));
        };
        let now = now_ms();
        let mut inv = self.script.prepare_invoke();
        for op in ops {
            inv.key(op.key(&self.prefix));
        }
        for (k, _) in settle {
            inv.key(k.as_str());
        }
        inv.arg(ops.len());
        for op in ops {
            let expire = match op.window {
                Window::None => now + GAUGE_TTL_MS,
                _ => op.expires_at_ms.saturating_add(EXPIRY_SLACK_MS),
            };
            inv.arg(op.limit).arg(op.add).arg(expire);
        }
        for (_, d) in settle {
            inv.arg(*d);
        }
        self.calls.increment(1);
        match inv.invoke_async::<Vec<i64>>(&mut conn).await {
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
}

impl SharedCounters for RedisCounters {
    fn reserve<'a>(&'a self, ops: &'a [CounterOp]) -> ReserveFuture<'a> {
        Box::pin(async move {
            let settle = self.shared.take_pending();
            let v = self.shared.call(ops, &settle).await?;
            match v.as_slice() {
                [1, _, values @ ..] if values.len() == ops.len() => {
                    Ok(Verdict::Admitted(values.to_vec()))
                }
                [0, i, values @ ..] if values.len() == ops.len() && *i >= 1 => {
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
        if op.window != Window::None && op.expires_at_ms <= now_ms() {
            return; // the window ended: nothing left to correct
        }
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if p.len() >= MAX_PENDING {
            metrics::counter!("infergate_quota_settlements_dropped_total").increment(1);
            return;
        }
        p.push((op.key(&self.shared.prefix), delta));
    }

    fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    fn mark_down(&self) {
        metrics::counter!("infergate_quota_redis_errors_total").increment(1);
        self.shared.set_up(None);
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

/// Sends settlements no reservation carried within `every`.
async fn flush_loop(shared: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = shared.upgrade() else { return };
        let quiet = now_ms().saturating_sub(s.last_carry.load(Ordering::Relaxed))
            >= every.as_millis() as u64;
        if !s.up.load(Ordering::Relaxed) || !quiet {
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
