//! Pool capacity and idle cost: each replica's load, as its own `/metrics`
//! last said (the routing scrape: running sequences, KV-cache use), sampled
//! every `accounting.pool_sample_interval` and integrated over time per
//! minute, against the pool's batch limit and GPU-hour price (`pricing.pools`).
//!
//! A sample's busy fraction is `max(running / batch limit, KV-cache use)`,
//! capped at 1: a replica is full when its batch slots are taken or its cache
//! is. The batch limit is `pricing.pools.NAME.max_num_seqs`, else the limit
//! the scrape observed (running requests while a queue showed). A replica
//! whose load is unknown (not scraped, scrape failed or older than
//! [`FRESH`]) still costs money: that time is reported as unmeasured, neither
//! busy nor idle. From these: utilisation (busy / measured time), cost (every
//! replica-second at the GPU-hour price), idle cost (idle replica-seconds at
//! that price), tokens served per GPU-hour and cost per 1,000 output tokens
//! (tokens from the ledger).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infergate_core::cost::PoolPrice;
use infergate_core::pool::Pool;
use serde::Serialize;

use super::ledger::push_label_value;

/// A scrape older than this does not count as the replica's load.
pub(crate) const FRESH: Duration = Duration::from_secs(2);

/// One replica's integrals over a minute (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Integrals {
    /// Time the replica was a member of its pool.
    pub seconds: f64,
    /// Of it, time its load was known.
    pub measured: f64,
    /// ∫ busy fraction dt over measured time.
    pub busy: f64,
    /// ∫ running sequences dt and ∫ KV-cache use dt over measured time.
    pub running: f64,
    pub kv: f64,
}

impl Integrals {
    fn add(&mut self, o: &Integrals) {
        self.seconds += o.seconds;
        self.measured += o.measured;
        self.busy += o.busy;
        self.running += o.running;
        self.kv += o.kv;
    }
}

/// What one replica's last scrape says, for one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    pub running: f64,
    pub kv_usage: Option<f64>,
    /// The batch limit to measure `running` against, when known.
    pub batch_limit: Option<f64>,
}

impl Load {
    /// The busy fraction, when it can be told.
    pub(crate) fn busy(&self) -> Option<f64> {
        let slots = self
            .batch_limit
            .filter(|l| *l > 0.0)
            .map(|l| self.running / l);
        let b = match (slots, self.kv_usage) {
            (Some(s), Some(k)) => s.max(k),
            (Some(s), None) => s,
            (None, Some(k)) => k,
            (None, None) => return None,
        };
        Some(b.clamp(0.0, 1.0))
    }
}

type ReplicaKey = (Arc<str>, Arc<str>);

struct State {
    minutes: VecDeque<(u64, HashMap<ReplicaKey, Integrals>)>,
    retention_minutes: u64,
    last: Option<Instant>,
    /// Per pool, since start: integrals and cost (dollars).
    lifetime: BTreeMap<Arc<str>, (Integrals, f64, f64)>,
    /// Per pool: the mean busy fraction of the last sample's measured replicas.
    current: BTreeMap<Arc<str>, f64>,
}

/// The capacity meter of one gateway.
pub(crate) struct Capacity {
    state: Mutex<State>,
}

impl Capacity {
    pub(crate) fn new(retention_minutes: u64) -> Capacity {
        Capacity {
            state: Mutex::new(State {
                minutes: VecDeque::new(),
                retention_minutes: retention_minutes.max(1),
                last: None,
                lifetime: BTreeMap::new(),
                current: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn configure(&self, retention_minutes: u64) {
        self.lock().retention_minutes = retention_minutes.max(1);
    }

    /// Samples every replica of `pools` at `now` (`minute`: minutes since the
    /// epoch). The first call only sets the clock; later ones credit the
    /// whole time since the previous one at this sample's load (a late
    /// sample, the gateway short of CPU, still counts every replica-second:
    /// the replicas cost money all along).
    pub(crate) fn sample(
        &self,
        now: Instant,
        minute: u64,
        pools: &[Arc<Pool>],
        price: impl Fn(&str) -> Option<PoolPrice>,
    ) {
        let mut loads: Vec<(ReplicaKey, Option<Load>)> = Vec::new();
        for pool in pools {
            let limit = price(&pool.name)
                .and_then(|p| p.max_num_seqs)
                .map(f64::from);
            for r in pool.replicas().iter() {
                let sig = r.signals.load();
                let load = sig
                    .as_deref()
                    .filter(|s| s.is_fresh(now, FRESH))
                    .map(|s| Load {
                        running: s.running,
                        kv_usage: s.kv_usage,
                        batch_limit: limit.or(s.batch_limit),
                    });
                loads.push(((pool.name.clone(), r.endpoint.key.clone()), load));
            }
        }
        let mut s = self.lock();
        let dt = s
            .last
            .map(|l| now.saturating_duration_since(l).as_secs_f64());
        s.last = Some(now);
        self.record(&mut s, minute, dt, &loads, &price);
    }

    fn record(
        &self,
        s: &mut State,
        minute: u64,
        dt: Option<f64>,
        loads: &[(ReplicaKey, Option<Load>)],
        price: &impl Fn(&str) -> Option<PoolPrice>,
    ) {
        let mut current: BTreeMap<Arc<str>, (f64, u32)> = BTreeMap::new();
        for ((pool, _), load) in loads {
            let e = current.entry(pool.clone()).or_default();
            if let Some(b) = load.and_then(|l| l.busy()) {
                e.0 += b;
                e.1 += 1;
            }
        }
        s.current = current
            .into_iter()
            .map(|(p, (sum, n))| (p, if n > 0 { sum / f64::from(n) } else { 0.0 }))
            .collect();
        let Some(dt) = dt.filter(|d| *d > 0.0) else {
            return;
        };
        if s.minutes.back().is_none_or(|m| m.0 < minute) {
            s.minutes.push_back((minute, HashMap::new()));
            let keep_from = minute.saturating_sub(s.retention_minutes - 1);
            while s.minutes.front().is_some_and(|m| m.0 < keep_from) {
                s.minutes.pop_front();
            }
        }
        let mut per_pool: Vec<(Arc<str>, Integrals)> = Vec::new();
        if let Some((_, rows)) = s.minutes.back_mut() {
            for (key, load) in loads {
                let mut i = Integrals {
                    seconds: dt,
                    ..Default::default()
                };
                if let Some((l, b)) = load.and_then(|l| l.busy().map(|b| (l, b))) {
                    i.measured = dt;
                    i.busy = b * dt;
                    i.running = l.running * dt;
                    i.kv = l.kv_usage.unwrap_or(0.0) * dt;
                }
                rows.entry(key.clone()).or_default().add(&i);
                per_pool.push((key.0.clone(), i));
            }
        }
        for (pool, i) in per_pool {
            let hour = price(&pool).map_or(0.0, |p| p.replica_hour_dollars());
            let e = s.lifetime.entry(pool).or_default();
            e.0.add(&i);
            e.1 += i.seconds / 3600.0 * hour;
            e.2 += (i.measured - i.busy) / 3600.0 * hour;
        }
    }

    /// Per (pool, replica) and per minute integrals in `[from, to)`.
    pub(crate) fn integrals(&self, from: u64, to: u64) -> Vec<(u64, ReplicaKey, Integrals)> {
        let s = self.lock();
        let mut out = Vec::new();
        for (at, rows) in s.minutes.iter().filter(|m| m.0 >= from && m.0 < to) {
            for (k, i) in rows {
                out.push((*at, k.clone(), *i));
            }
        }
        out
    }

    /// Appends the pool counters and gauges in Prometheus text.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        let s = self.lock();
        let families: [(&str, &str, &str); 5] = [
            (
                "infergate_pool_replica_seconds_total",
                "counter",
                "Replica-seconds the pool's replicas existed.",
            ),
            (
                "infergate_pool_measured_replica_seconds_total",
                "counter",
                "Replica-seconds whose load was known from a fresh scrape.",
            ),
            (
                "infergate_pool_busy_replica_seconds_total",
                "counter",
                "Busy replica-seconds: the integral of max(running / batch limit, KV-cache use).",
            ),
            (
                "infergate_pool_cost_dollars_total",
                "counter",
                "Capacity cost at pricing.pools GPU-hour prices.",
            ),
            (
                "infergate_pool_idle_cost_dollars_total",
                "counter",
                "Cost of measured idle capacity (1 - busy fraction).",
            ),
        ];
        for (i, (name, ty, help)) in families.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
            for (pool, (ints, cost, idle)) in &s.lifetime {
                let v = [ints.seconds, ints.measured, ints.busy, *cost, *idle][i];
                out.push_str(name);
                out.push_str("{pool=\"");
                push_label_value(out, pool);
                let _ = writeln!(out, "\"}} {v}");
            }
        }
        out.push_str("# HELP infergate_pool_utilization_ratio Mean busy fraction of the pool's measured replicas at the last sample.\n# TYPE infergate_pool_utilization_ratio gauge\n");
        for (pool, u) in &s.current {
            out.push_str("infergate_pool_utilization_ratio{pool=\"");
            push_label_value(out, pool);
            let _ = writeln!(out, "\"}} {u}");
        }
    }
}

/// One pool's report over a range.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PoolReport {
    pub pool: String,
    /// Dollars per GPU-hour and GPUs per replica, when priced.
    pub gpu_hour_price: Option<f64>,
    pub gpus_per_replica: Option<u32>,
    pub replica_seconds: f64,
    pub measured_seconds: f64,
    pub gpu_hours: f64,
    /// Busy / measured time (`null` when nothing was measured).
    pub utilization: Option<f64>,
    pub mean_running: Option<f64>,
    pub mean_kv_usage: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub requests: u64,
    pub cost: Option<f64>,
    pub idle_cost: Option<f64>,
    /// Cost of time whose load was unknown.
    pub unmeasured_cost: Option<f64>,
    pub output_tokens_per_gpu_hour: Option<f64>,
    pub cost_per_1k_output_tokens: Option<f64>,
    pub replicas: Vec<ReplicaReport>,
    /// Per minute: utilisation, cost, idle cost, output tokens.
    pub minutes: Vec<MinuteReport>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplicaReport {
    pub replica: String,
    pub seconds: f64,
    pub measured_seconds: f64,
    pub utilization: Option<f64>,
    pub mean_running: Option<f64>,
    pub cost: Option<f64>,
    pub idle_cost: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct MinuteReport {
    /// Unix seconds of the minute's start.
    pub at: u64,
    pub replicas: f64,
    pub utilization: Option<f64>,
    pub output_tokens: u64,
    pub cost: Option<f64>,
    pub idle_cost: Option<f64>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// Builds the report of each pool from the meter's integrals and the
/// ledger's tokens (`tokens`: per pool (requests, input, output);
/// `minute_tokens`: per (pool, minute) output tokens).
pub(crate) fn report(
    pool_names: &[Arc<str>],
    integrals: &[(u64, ReplicaKey, Integrals)],
    tokens: &HashMap<Arc<str>, (u64, u64, u64)>,
    minute_tokens: &HashMap<(Arc<str>, u64), u64>,
    price: impl Fn(&str) -> Option<PoolPrice>,
) -> Vec<PoolReport> {
    let mut names: Vec<Arc<str>> = pool_names.to_vec();
    for (_, (p, _), _) in integrals {
        if !names.contains(p) {
            names.push(p.clone());
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|pool| {
            let pp = price(&pool);
            let hour = pp.map(|p| p.replica_hour_dollars());
            let dollars = |secs: f64| hour.map(|h| secs / 3600.0 * h);
            let mut total = Integrals::default();
            let mut per_replica: BTreeMap<Arc<str>, Integrals> = BTreeMap::new();
            let mut per_minute: BTreeMap<u64, Integrals> = BTreeMap::new();
            for (at, (p, r), i) in integrals.iter().filter(|x| x.1 .0 == pool) {
                let _ = p;
                total.add(i);
                per_replica.entry(r.clone()).or_default().add(i);
                per_minute.entry(*at).or_default().add(i);
            }
            let (requests, input, output) = tokens.get(&pool).copied().unwrap_or_default();
            let gpu_hours =
                total.seconds / 3600.0 * f64::from(pp.map_or(1, |p| p.gpus_per_replica));
            let cost = dollars(total.seconds);
            PoolReport {
                pool: pool.to_string(),
                gpu_hour_price: pp.map(|p| p.gpu_hour.dollars()),
                gpus_per_replica: pp.map(|p| p.gpus_per_replica),
                replica_seconds: total.seconds,
                measured_seconds: total.measured,
                gpu_hours,
                utilization: ratio(total.busy, total.measured),
                mean_running: ratio(total.running, total.measured),
                mean_kv_usage: ratio(total.kv, total.measured),
                input_tokens: input,
                output_tokens: output,
                requests,
                cost,
                idle_cost: dollars(total.measured - total.busy),
                unmeasured_cost: dollars(total.seconds - total.measured),
                output_tokens_per_gpu_hour: ratio(output as f64, gpu_hours),
                cost_per_1k_output_tokens: cost.and_then(|c| ratio(c * 1000.0, output as f64)),
                replicas: per_replica
                    .into_iter()
                    .map(|(r, i)| ReplicaReport {
                        replica: r.to_string(),
                        seconds: i.seconds,
                        measured_seconds: i.measured,
                        utilization: ratio(i.busy, i.measured),
                        mean_running: ratio(i.running, i.measured),
                        cost: dollars(i.seconds),
                        idle_cost: dollars(i.measured - i.busy),
                    })
                    .collect(),
                minutes: per_minute
                    .into_iter()
                    .map(|(at, i)| MinuteReport {
                        at: at * 60,
                        replicas: i.seconds / 60.0,
                        utilization: ratio(i.busy, i.measured),
                        output_tokens: minute_tokens.get(&(pool.clone(), at)).copied().unwrap_or(0),
                        cost: dollars(i.seconds),
                        idle_cost: dollars(i.measured - i.busy),
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_core::cost::Rate;

    fn price(_: &str) -> Option<PoolPrice> {
        Some(PoolPrice {
            gpu_hour: Rate(3_600_000), // $3.60 per GPU-hour: $0.001 per GPU-second
            gpus_per_replica: 2,
            max_num_seqs: Some(4),
        })
    }

    #[test]
    fn busy_is_the_fuller_of_batch_slots_and_cache() {
        let l = |running, kv, limit| Load {
            running,
            kv_usage: kv,
            batch_limit: limit,
        };
        assert_eq!(l(2.0, Some(0.1), Some(4.0)).busy(), Some(0.5));
        assert_eq!(l(1.0, Some(0.9), Some(4.0)).busy(), Some(0.9));
        assert_eq!(l(9.0, None, Some(4.0)).busy(), Some(1.0));
        assert_eq!(l(3.0, Some(0.2), None).busy(), Some(0.2));
        assert_eq!(l(3.0, None, None).busy(), None);
    }

    #[test]
    fn integrates_cost_idle_and_unmeasured_time() {
        let c = Capacity::new(60);
        let key = |r: &str| -> ReplicaKey { ("p".into(), r.into()) };
        let full = Some(Load {
            running: 4.0,
            kv_usage: Some(0.3),
            batch_limit: Some(4.0),
        });
        let idle = Some(Load {
            running: 0.0,
            kv_usage: Some(0.0),
            batch_limit: Some(4.0),
        });
        let loads = vec![(key("a"), full), (key("b"), idle), (key("c"), None)];
        {
            let mut s = c.lock();
            // 30 seconds in minute 7, 30 in minute 8.
            c.record(&mut s, 7, Some(30.0), &loads, &price);
            c.record(&mut s, 8, Some(30.0), &loads, &price);
        }
        let ints = c.integrals(0, 100);
        let mut tokens = HashMap::new();
        tokens.insert(Arc::from("p"), (10, 5000, 3000));
        let mut mt = HashMap::new();
        mt.insert((Arc::from("p"), 8), 3000);
        let r = &report(&[Arc::from("p")], &ints, &tokens, &mt, price)[0];
        // Three replicas for 60 s: 180 replica-seconds, 2 GPUs each.
        assert_eq!(r.replica_seconds, 180.0);
        assert_eq!(r.gpu_hours, 0.1);
        let approx = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-9;
        // $0.002 per replica-second.
        assert!(approx(r.cost, 0.36));
        // One busy and one idle measured replica: utilisation 0.5.
        assert!(approx(r.utilization, 0.5));
        assert!(approx(r.idle_cost, 0.12));
        assert!(approx(r.unmeasured_cost, 0.12));
        assert!(approx(r.output_tokens_per_gpu_hour, 30_000.0));
        assert!(approx(r.cost_per_1k_output_tokens, 0.12));
        assert_eq!(r.replicas.len(), 3);
        assert!(approx(r.replicas[0].utilization, 1.0));
        assert!(r.replicas[2].utilization.is_none());
        assert_eq!(r.minutes.len(), 2);
        assert_eq!(r.minutes[1].output_tokens, 3000);
        assert_eq!(r.minutes[0].at, 420);
        let mut m = String::new();
        c.render_metrics(&mut m);
        assert!(
            m.contains("infergate_pool_utilization_ratio{pool=\"p\"} 0.5"),
            "{m}"
        );
        assert!(
            m.contains("infergate_pool_replica_seconds_total{pool=\"p\"} 180"),
            "{m}"
        );
    }
}
