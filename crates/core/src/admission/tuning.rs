//! Self-tuning: what admission learns about a pool's replicas, and the
//! protection knobs it derives from that when the config leaves them unset.
//!
//! Learned, per pool, from the gateway's own observations of the requests it
//! placed (the relay's timings, recorded when a reservation ends):
//! - the critical arrival rate (requests per second, exponentially weighted);
//! - the service time of a request (placement to end);
//! - the step time (inter-token time of streamed answers);
//! - the prefill rate (uncached prompt tokens over time to first token, less
//!   the step the request had to wait for).
//!
//! Learned per replica from its engine's `/metrics` (`routing::signals`): the
//! batch limit, `Signals::saturated_batch` (the running count the engine held
//! while its queue stayed non-empty over consecutive scrapes with room in its
//! KV cache; a queue behind a full cache is the cache's, and the KV
//! projection bounds that replica instead).
//!
//! Derived (see [`reserve_slots`], [`prefill_cap`] and docs/admission.md):
//! - the request cap per replica = its learned batch limit, so the engine's
//!   own queue stays empty and waiting happens in the gateway's queue, which
//!   is ordered by band;
//! - a reserve of slots only critical requests may fill, sized by Little's
//!   law so that a critical arrival finds a free slot with 99% probability,
//!   but at most 1/16 of the batch (an idle slot costs throughput), and one
//!   critical request in the engine's queue;
//! - the same on pools whose engines schedule by priority: vLLM V1 does not
//!   preempt for a slot, so critical requests are better off in the
//!   gateway's queue (the first slot that frees on any replica) than in
//!   one engine's;
//! - before the batch limit is learned, a slow-start cap
//!   ([`slow_start_cap`]) that doubles with each scrape while the engine
//!   keeps up;
//! - while critical traffic is seen, the prompt tokens of non-critical
//!   requests awaiting their first token per replica = what the replica
//!   prefills in one step, so a burst of admissions never makes the long
//!   prefill steps a critical arrival would sit through;
//! - queued non-critical requests start on a replica at most one per
//!   `service / (1.25 × batch)` ([`Pace`]): requests that start together end
//!   together (same length, same steps), and a batch that frees its slots in
//!   bunches leaves critical arrivals between the bunches no slot at all.
//!
//! Hand-set values in `budget:` always win.

use crate::rate::DecayingRate;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Probability that a critical arrival finds no reserved slot free, at most.
const RESERVE_MISS: f64 = 0.01;
/// Critical requests not seen for this long: no reserve is kept.
const CRITICAL_IDLE: Duration = Duration::from_secs(10);
/// Time constant of the arrival-rate average.
const RATE_TAU: Duration = Duration::from_secs(5);
/// Weight of a new sample in the timing averages.
const ALPHA: f64 = 0.05;

/// Slots kept for critical requests on a replica that runs `batch`
/// sequences at once, when `critical_in_flight` critical requests (Little's
/// law: arrival rate × service time) are in flight on it on average.
///
/// A reserved slot taken by a critical arrival is given back when any of the
/// replica's `batch` requests ends, on average every `service / batch`; the
/// critical arrivals in that time are about Poisson with mean
/// `m = critical_in_flight / batch`. The reserve is the smallest `r` with
/// P(N ≥ r) ≤ 1%, at least 1 while critical traffic is seen, at most a
/// quarter of the batch (beyond, the reserve would cost more throughput than
/// it saves latency; engine priority is then the tool).
pub fn reserve_slots(batch: u64, critical_in_flight: f64) -> u64 {
    if batch == 0 || critical_in_flight.is_nan() || critical_in_flight <= 0.0 {
        return 0;
    }
    let max = (batch / 4).max(1);
    let m = critical_in_flight / batch as f64;
    // P(N >= r) = 1 - sum_{k<r} e^-m m^k / k!
    let mut term = (-m).exp();
    let mut below = 0.0;
    for r in 0..max {
        below += term;
        if 1.0 - below <= RESERVE_MISS {
            return (r + 1).max(1);
        }
        term *= m / (r + 1) as f64;
    }
    max
}

/// The request cap of a replica whose batch limit is not known yet.
const SLOW_START: u64 = 4;

/// The request cap of a replica while its batch limit is being learned, at
/// a scrape (TCP's slow start): [`SLOW_START`] at first, doubled at each
/// scrape at which the gateway had the whole cap in flight there
/// (`ours_at_most`: its requests the engine may have counted) and the engine
/// kept up (`queued`: no queue of 2 or more), held while the engine queues,
/// and never below twice what the engine runs. So a flood reaches the engine
/// in steps: by the time the engine shows a queue at its limit `B`, at most
/// `B` more wait in it, instead of the whole flood (the queue is then learned
/// as the batch limit, `Signals::saturated_batch`, within three scrapes).
/// Doubling on the gateway's own count, not only on the engine's `running`,
/// matters for engines that answer faster than the scrape interval: their
/// `running` reads near 0 at any load, and a cap of twice that would hold a
/// fast replica to a handful of requests at once for good.
pub fn slow_start_cap(previous: Option<u64>, running: f64, ours_at_most: u64, queued: bool) -> u64 {
    let running = if running.is_finite() {
        running.max(0.0)
    } else {
        0.0
    };
    let grown = match previous {
        Some(cap) if !queued && ours_at_most >= cap => cap.saturating_mul(2),
        Some(cap) => cap,
        None => SLOW_START,
    };
    grown
        .max((2.0 * running).ceil() as u64)
        .clamp(SLOW_START, SLOW_START_MAX)
}

/// The slow-start cap goes no higher: past it the engine's batch is learned
/// or the replica is fast enough that a cap does not matter.
const SLOW_START_MAX: u64 = 1 << 16;

/// How much faster than a full batch's completions queued starts may come:
/// at exactly that rate a pause in them would cost throughput for good.
const PACE_HEADROOM: f64 = 1.25;

/// Pacing of queued non-critical starts on one replica, a GCRA (virtual
/// scheduling) with a burst of two: a start is allowed when the replica's
/// theoretical next start is at most one interval ahead, and moves it one
/// interval on. The interval is the time between completions of a full
/// batch (`service / batch`) ÷ [`PACE_HEADROOM`], so in steady state every
/// completion is refilled at once, while a bunch of completions (a cohort
/// of requests that started together, with the same length) is refilled
/// one by one: the cohort spreads over one lifetime, and completions come
/// evenly from then on. Critical requests are paced only on a KV-bound
/// replica ([`Pace::kv_bound`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    interval_ns: u64,
    /// Set by [`Pace::kv_bound`]: queued critical starts are paced too.
    kv_bound: bool,
}

impl Pace {
    /// The pacing of a replica of batch `batch` whose requests last
    /// `service` seconds; `None` when either is unknown (or one slot: its
    /// completions cannot bunch).
    pub fn new(service: f64, batch: u64) -> Option<Pace> {
        Self::spread(service, batch, PACE_HEADROOM, false)
    }

    /// One start per `service / (slots × headroom)`; `None` when the
    /// service time is unknown or there is one slot.
    fn spread(service: f64, slots: u64, headroom: f64, kv_bound: bool) -> Option<Pace> {
        (service > 0.0 && service.is_finite() && slots >= 2).then(|| Pace {
            interval_ns: (service * 1e9 / (slots as f64 * headroom)).max(1.0) as u64,
            kv_bound,
        })
    }

    /// The pacing of a replica whose KV cache, not its batch, limits it to
    /// `slots` streams like the one being placed (`slots` counted at evenly
    /// spaced starts, `admission::budget`): one start per `service / slots`,
    /// without [`PACE_HEADROOM`]. The projection holds `slots` streams only
    /// when their starts are spread over a whole lifetime; starts closer
    /// than that (a batch's headroom) make a group whose projected peak fills
    /// the cache before the lifetime is covered, and the gap after it
    /// repeats for good, because each end is refilled by one start. Measured
    /// on 64 + 500-token streams and a 4,096-token cache: 7 starts 0.28 s
    /// apart, then none for 2.4 s, KV use 0.26 to 0.92 and back, 5.4 in
    /// flight on average where evenly spaced starts hold 12.
    ///
    /// Queued critical requests are paced too on such a replica
    /// ([`Pace::paces_critical`]): critical traffic above what the replica
    /// frees waits in the queue, and when a group ends the waiting critical
    /// requests all start at once and make the next group themselves
    /// (measured: KV use 0.3 to 1.0 in lockstep with 7 to 8 in flight after
    /// the headroom was gone, critical p99 at the 2 s deadline). Paced, a
    /// critical request waits at most one interval more for a start that
    /// lets the cache hold more of them. Not on pools with
    /// `engine_priority`, where a critical request ignores the projection.
    pub fn kv_bound(service: f64, slots: u64) -> Option<Pace> {
        Self::spread(service, slots, 1.0, true)
    }

    /// Whether queued critical starts are paced too (a KV-bound replica).
    pub fn paces_critical(&self) -> bool {
        self.kv_bound
    }

    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// When a start on the replica whose next-start slot is `next` is
    /// allowed (now or earlier: allowed now).
    pub fn allowed_at(&self, next: &AtomicU64) -> Instant {
        at_ns(
            next.load(Ordering::Relaxed)
                .saturating_sub(self.interval_ns),
        )
    }

    /// A start at `now` happened: the next one moves an interval on, but
    /// never more than one interval past `now`'s allowance. A paced start
    /// never reaches that bound; a start past the pacing (a prefix holder's,
    /// `routing::aware`) would otherwise push every later start further out.
    pub fn started(&self, next: &AtomicU64, now: Instant) {
        let now = ns_at(now);
        let furthest = now + 2 * self.interval_ns;
        let _ = next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            Some((t.max(now) + self.interval_ns).min(furthest))
        });
    }
}

/// The process's time base for [`Pace`]'s atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

fn at_ns(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

/// Prompt tokens one replica prefills in one step (`step` seconds at
/// `prefill_tokens_per_s`), at least 1.
pub fn prefill_cap(prefill_tokens_per_s: f64, step: f64) -> u64 {
    (prefill_tokens_per_s * step).max(1.0).round() as u64
}

/// Headroom of the prefill cap over the prompt tokens a full batch keeps in
/// prefill on average.
const PREFILL_HEADROOM: f64 = 1.5;

/// The prefill cap of a replica running `batch` requests at once: one
/// step's prefill (`step_tokens`), but never less than the prompt tokens
/// the batch needs in prefill to stay full. By Little's law that is the
/// admission rate (`batch / service`) × the time a prompt spends in prefill
/// (`ttft`) × the prompt, here `batch × prefill_per_slot` (× headroom):
/// with long prompts, one prompt at a time would starve the batch.
pub fn prefill_cap_for(step_tokens: u64, prefill_per_slot: f64, batch: u64) -> u64 {
    let floor = (PREFILL_HEADROOM * prefill_per_slot * batch as f64).ceil();
    step_tokens.max(floor as u64)
}

/// The prefill rate from averages: `prompt` uncached tokens reached their
/// first token `ttft` seconds after placement, on engines whose step takes
/// `step` seconds. A request waits for the step in progress (about one
/// step) before its own prefill starts; the rest is its prefill. The floor
/// of half a step keeps a short prompt (whose TTFT is all waiting) from
/// reading as infinitely fast.
pub fn prefill_rate(prompt: f64, ttft: f64, step: f64) -> Option<f64> {
    if !(prompt > 0.0 && ttft > 0.0 && step > 0.0) {
        return None;
    }
    Some(prompt / (ttft - step).max(step / 2.0))
}

/// One ended request's timings as the relay saw them.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Placement to first response byte.
    pub ttft: Duration,
    /// Placement to end.
    pub total: Duration,
    /// Output tokens streamed.
    pub generated: u64,
    /// Uncached prompt tokens (what the engine computed).
    pub prompt: u64,
}

/// An exponentially weighted average; `None` before the first sample.
#[derive(Debug, Default, Clone, Copy)]
struct Ewma(Option<f64>);

impl Ewma {
    fn add(&mut self, x: f64) {
        self.0 = Some(match self.0 {
            Some(v) => v + ALPHA * (x - v),
            None => x,
        });
    }
}

/// What the gateway observed on one pool.
#[derive(Debug, Default)]
pub(crate) struct Observations {
    /// Critical arrivals per second, over `RATE_TAU`.
    critical: DecayingRate,
    service: Ewma,
    ttft: Ewma,
    prompt: Ewma,
    step: Ewma,
}

impl Observations {
    pub(crate) fn critical_arrived(&mut self, now: Instant) {
        self.critical.add(1.0, now, RATE_TAU);
    }

    /// Critical arrivals per second, or 0 when none was seen lately.
    pub(crate) fn critical_rate(&self, now: Instant) -> f64 {
        match self.critical.last() {
            Some(at) if now.saturating_duration_since(at) <= CRITICAL_IDLE => {
                self.critical.per_second(now, RATE_TAU)
            }
            _ => 0.0,
        }
    }

    /// A request placed on the pool ended. Only streamed answers (two output
    /// tokens or more, ending after their first byte) tell the step time and
    /// the prefill apart; every request tells the service time.
    pub(crate) fn ended(&mut self, t: Timing) {
        let total = t.total.as_secs_f64();
        self.service.add(total);
        let ttft = t.ttft.as_secs_f64();
        if t.generated >= 2 && total > ttft {
            self.step.add((total - ttft) / (t.generated - 1) as f64);
            self.ttft.add(ttft);
            self.prompt.add(t.prompt as f64);
        }
    }

    /// Critical requests in flight on the whole pool (Little's law), when
    /// the service time is known; 1 while only arrivals were seen.
    pub(crate) fn critical_in_flight(&self, now: Instant) -> f64 {
        let rate = self.critical_rate(now);
        if rate == 0.0 {
            return 0.0;
        }
        match self.service.0 {
            Some(s) => rate * s,
            None => 1.0,
        }
    }

    /// What a replica prefills in one step, when the timings are known.
    pub(crate) fn prefill_step_tokens(&self) -> Option<u64> {
        Some(prefill_cap(self.prefill_rate()?, self.step.0?))
    }

    /// Uncached prompt tokens a replica prefills per second, when the
    /// timings are known ([`prefill_rate`]).
    pub(crate) fn prefill_rate(&self) -> Option<f64> {
        prefill_rate(self.prompt.0?, self.ttft.0?, self.step.0?)
    }

    /// Prompt tokens in prefill per batch slot that keep the batch full:
    /// prompt × TTFT / service time (Little's law per slot).
    pub(crate) fn prefill_per_slot(&self) -> f64 {
        match (self.prompt.0, self.ttft.0, self.service.0) {
            (Some(p), Some(t), Some(s)) if s > 0.0 => p * t / s,
            _ => 0.0,
        }
    }
}

/// The derived values, readable without a lock on the placement path.
#[derive(Debug, Default)]
pub(crate) struct Derived {
    /// Critical requests in flight on the pool (f64 bits).
    critical_in_flight: AtomicU64,
    /// One step's prefill per replica, tokens; 0: not known yet.
    prefill_step_tokens: AtomicU64,
    /// [`Observations::prefill_per_slot`] (f64 bits).
    prefill_per_slot: AtomicU64,
    /// Service time of a request, seconds (f64 bits); 0: not known yet.
    service: AtomicU64,
    /// [`Observations::prefill_rate`], tokens/s (f64 bits); 0: not known yet.
    prefill_rate: AtomicU64,
}

impl Derived {
    pub(crate) fn update(&self, obs: &Observations, now: Instant) {
        self.critical_in_flight
            .store(obs.critical_in_flight(now).to_bits(), Ordering::Relaxed);
        self.prefill_step_tokens
            .store(obs.prefill_step_tokens().unwrap_or(0), Ordering::Relaxed);
        self.prefill_per_slot
            .store(obs.prefill_per_slot().to_bits(), Ordering::Relaxed);
        self.service
            .store(obs.service.0.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
        self.prefill_rate.store(
            obs.prefill_rate().unwrap_or(0.0).to_bits(),
            Ordering::Relaxed,
        );
    }

    /// Uncached prompt tokens a replica prefills per second; 0: not known yet.
    pub(crate) fn prefill_rate(&self) -> f64 {
        f64::from_bits(self.prefill_rate.load(Ordering::Relaxed))
    }

    pub(crate) fn service(&self) -> f64 {
        f64::from_bits(self.service.load(Ordering::Relaxed))
    }

    pub(crate) fn critical_in_flight(&self) -> f64 {
        f64::from_bits(self.critical_in_flight.load(Ordering::Relaxed))
    }

    pub(crate) fn prefill_step_tokens(&self) -> Option<u64> {
        Some(self.prefill_step_tokens.load(Ordering::Relaxed)).filter(|c| *c > 0)
    }

    pub(crate) fn prefill_per_slot(&self) -> f64 {
        f64::from_bits(self.prefill_per_slot.load(Ordering::Relaxed))
    }
}

/// The knobs in effect for one placement attempt on one pool: hand-set
/// values, else derived ones (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Knobs {
    /// Critical requests in flight per replica (Little's law), for the reserve.
    pub critical_in_flight_per_replica: f64,
    /// One step's prefill per replica, tokens (when learned).
    pub prefill_step_tokens: Option<u64>,
    /// Prompt tokens in prefill per batch slot that keep the batch full.
    pub prefill_per_slot: f64,
    /// The pool's engines schedule by priority (and preempt a lower band
    /// for KV room: a critical request ignores the token budget).
    pub engine_priority: bool,
    /// Service time of a request, seconds (0: not known yet), for [`Pace`].
    pub service: f64,
}

impl Knobs {
    /// Whether critical requests arrived lately (what the reserve, the
    /// critical engine queue and the derived prefill cap are for).
    pub fn critical_seen(&self) -> bool {
        self.critical_in_flight_per_replica > 0.0
    }

    /// The prompt-token cap for non-critical requests on a replica of batch
    /// `batch` ([`prefill_cap_for`]); `None` until the timings are learned.
    /// Admission applies it only while critical traffic is seen
    /// ([`Knobs::critical_seen`]).
    pub fn prefill_cap(&self, batch: u64) -> Option<u64> {
        self.prefill_step_tokens
            .map(|t| prefill_cap_for(t, self.prefill_per_slot, batch))
    }

    /// `(reserve, engine_queue)` slots on a replica of batch `batch`: a
    /// reserve below the cap, and one critical request past it, into the
    /// engine's own queue.
    ///
    /// The same with engine priority: vLLM V1's priority scheduling never
    /// preempts a running sequence for a batch slot (only for KV room), so
    /// a critical request sent past the cap waits for a completion on *that*
    /// replica, where from the gateway's queue it takes the first slot that
    /// frees on *any*. A whole batch past the cap (the rule for an engine
    /// that preempts for a slot, such as SGLang; `critical_engine_queue`
    /// sets it by hand) measured 5.9× unloaded on vLLM V1's scheduler
    /// against 3.0× with one (docs/benchmarks/2026-12-06-engine-priority-v1.md).
    pub fn critical_slots(&self, batch: u64) -> (u64, u64) {
        let r = reserve_slots(batch, self.critical_in_flight_per_replica);
        // An idle reserved slot costs 1/batch of the throughput, so the
        // reserve stays under 1/16 of the batch (at least 1): without
        // preemption, latency is bought with throughput, and goodput must
        // stay near capacity. The one critical request in the engine's
        // queue starts in the step a sequence ends (first there with
        // engine priority, alone there without: the other bands are held
        // at the gateway while the replica is at its cap).
        (r.min((batch / 16).max(1)), u64::from(r > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_follows_littles_law_with_a_floor_and_a_ceiling() {
        assert_eq!(reserve_slots(16, 0.0), 0, "no critical traffic: none");
        assert_eq!(reserve_slots(0, 3.0), 0, "no batch known: none");
        // Rare critical traffic still finds one slot.
        assert_eq!(reserve_slots(16, 0.01), 1);
        // m = 0.1: P(N >= 2) = 0.0047.
        assert_eq!(reserve_slots(16, 1.6), 2);
        // m = 0.6 (critical is 60% of the batch): P(N >= 4) = 0.0034, P(N >= 3) = 0.023.
        assert_eq!(reserve_slots(16, 9.6), 4);
        // Never more than a quarter of the batch.
        assert_eq!(reserve_slots(8, 7.0), 2);
        assert_eq!(reserve_slots(2, 2.0), 1);
        // Monotone in the critical load.
        let mut last = 0;
        for i in 0..100 {
            let r = reserve_slots(64, i as f64 * 0.5);
            assert!(r >= last);
            last = r;
        }
    }

    #[test]
    fn pacing_spreads_a_cohort_over_one_lifetime_and_lets_steady_refills_through() {
        assert_eq!(Pace::new(0.0, 8), None, "service time unknown");
        assert_eq!(Pace::new(0.4, 1), None, "one slot cannot bunch");
        // 8 slots, 400 ms requests: a completion every 50 ms, starts every 40 ms.
        let pace = Pace::new(0.4, 8).unwrap();
        assert_eq!(pace.interval(), Duration::from_millis(40));
        let next = AtomicU64::new(0);
        let _ = epoch();
        let t0 = Instant::now();
        // A cohort of 8 completions at t0: two start at once (the burst),
        // then one per interval.
        let mut starts = Vec::new();
        let mut t = t0;
        while starts.len() < 8 {
            let at = pace.allowed_at(&next);
            if at <= t {
                pace.started(&next, t);
                starts.push(t - t0);
            } else {
                t = at;
            }
        }
        let ms: Vec<u128> = starts.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 0, 40, 80, 120, 160, 200, 240]);
        // Steady state: one completion every 50 ms is refilled at once.
        let later = t + Duration::from_secs(1);
        for i in 0..20 {
            let t = later + Duration::from_millis(50 * i);
            assert!(pace.allowed_at(&next) <= t, "refill {i} held back");
            pace.started(&next, t);
        }
        // Starts past the pacing (a prefix holder's, at once): the next
        // allowed start stays one interval out, however many went past.
        let t = later + Duration::from_secs(5);
        for _ in 0..10 {
            pace.started(&next, t);
        }
        assert_eq!(pace.allowed_at(&next), t + Duration::from_millis(40));
    }

    #[test]
    fn slow_start_doubles_while_the_cap_is_full_and_the_engine_keeps_up() {
        assert_eq!(slow_start_cap(None, 0.0, 0, false), 4, "an idle replica: 4");
        assert_eq!(slow_start_cap(Some(4), 0.0, 2, false), 4, "not full: held");
        assert_eq!(slow_start_cap(Some(4), 4.0, 4, false), 8, "full, kept up");
        assert_eq!(slow_start_cap(Some(8), 8.0, 8, true), 16, "twice running");
        assert_eq!(slow_start_cap(Some(16), 8.0, 16, true), 16, "queued: held");
        assert_eq!(slow_start_cap(Some(4), 100.0, 0, false), 200);
        assert_eq!(slow_start_cap(Some(4), f64::NAN, 0, false), 4);
        // An engine that answers between scrapes reads `running` 0 while the
        // gateway keeps its cap full: the cap still doubles, from 4 to 256
        // in six scrapes (it used to stay at 4: twice a `running` of 0).
        let (mut cap, mut scrapes) = (slow_start_cap(None, 0.0, 0, false), 0);
        while cap < 256 {
            cap = slow_start_cap(Some(cap), 0.0, cap, false);
            scrapes += 1;
        }
        assert_eq!(scrapes, 6);
        assert_eq!(
            slow_start_cap(Some(SLOW_START_MAX), 0.0, SLOW_START_MAX, false),
            SLOW_START_MAX
        );
    }

    #[test]
    fn prefill_cap_is_one_step_of_prefill() {
        // 20 us per token, 2.8 ms steps: 140 tokens.
        assert_eq!(prefill_cap(50_000.0, 0.0028), 140);
        assert_eq!(prefill_cap(10.0, 0.001), 1, "at least one token");
        // A short prompt whose TTFT is about two steps: one prompt per step.
        let rate = prefill_rate(64.0, 0.0056, 0.0028).unwrap();
        assert_eq!(prefill_cap(rate, 0.0028), 64);
        // A long prompt: 2,000 tokens in 41 ms plus one 1 ms step.
        let rate = prefill_rate(2000.0, 0.042, 0.001).unwrap();
        assert!((rate - 48_780.0).abs() < 1.0);
        assert_eq!(prefill_cap(rate, 0.001), 49);
        // Long prompts, a long TTFT against the service time: the batch
        // needs more than one prompt in prefill to stay full.
        // 8 slots x 2,000 tokens x 130 ms / 520 ms = 4,000 tokens, x 1.5.
        assert_eq!(prefill_cap_for(213, 2000.0 * 0.13 / 0.52, 8), 6000);
        // Short chat: one step's prefill is more than the batch needs.
        assert_eq!(prefill_cap_for(64, 64.0 * 0.022 / 0.36, 16), 94);
        assert_eq!(prefill_cap_for(140, 64.0 * 0.022 / 0.36, 16), 140);
        // TTFT below a step (a cached prompt): half a step is the floor.
        assert_eq!(prefill_rate(10.0, 0.001, 0.004), Some(5000.0));
        assert_eq!(prefill_rate(0.0, 0.01, 0.01), None);
    }

    #[test]
    fn observations_learn_rates_and_timings() {
        let t0 = Instant::now();
        let mut o = Observations::default();
        assert_eq!(o.critical_rate(t0), 0.0);
        assert_eq!(o.prefill_step_tokens(), None);
        // 20 critical arrivals per second for 10 s.
        for i in 0..200 {
            o.critical_arrived(t0 + Duration::from_millis(50 * i));
        }
        let now = t0 + Duration::from_secs(10);
        let rate = o.critical_rate(now);
        assert!((rate - 20.0).abs() < 3.0, "{rate}");
        assert_eq!(o.critical_in_flight(now), 1.0, "no service time yet");
        // 64-token prompts, first token after 10 ms, 32 tokens at 5 ms each.
        for _ in 0..100 {
            o.ended(Timing {
                ttft: Duration::from_millis(10),
                total: Duration::from_millis(10 + 31 * 5),
                generated: 32,
                prompt: 64,
            });
        }
        let l = o.critical_in_flight(now);
        assert!((l - rate * 0.165).abs() < 1e-9, "Little's law: {l}");
        // Rate 64 / (10 - 5) ms = 12,800 tokens/s; one 5 ms step: 64 tokens.
        assert_eq!(o.prefill_step_tokens(), Some(64));
        // 64 tokens x 10 ms / 165 ms per slot.
        assert!((o.prefill_per_slot() - 64.0 * 10.0 / 165.0).abs() < 1e-9);
        // A non-streamed answer (first byte at the end) does not count as a step.
        o.ended(Timing {
            ttft: Duration::from_millis(500),
            total: Duration::from_millis(500),
            generated: 32,
            prompt: 64,
        });
        assert_eq!(o.prefill_step_tokens(), Some(64));
        // Critical traffic gone: no reserve after the idle time.
        assert_eq!(o.critical_rate(now + CRITICAL_IDLE * 2), 0.0);
        let d = Derived::default();
        d.update(&o, now);
        assert_eq!(d.prefill_step_tokens(), Some(64));
        assert!(d.critical_in_flight() > 0.0);
    }

    #[test]
    fn engine_priority_keeps_the_reserve_and_one_engine_queue_slot() {
        let k = Knobs {
            critical_in_flight_per_replica: 9.6,
            prefill_step_tokens: None,
            prefill_per_slot: 0.0,
            engine_priority: false,
            service: 0.0,
        };
        assert_eq!(k.critical_slots(16), (1, 1), "at most 1/16 of the batch");
        assert_eq!(k.critical_slots(128), (2, 1), "m = 0.075: 2 slots");
        // vLLM V1 does not preempt for a slot: engine priority changes
        // nothing (it used to be no reserve and a whole batch past the cap).
        let k = Knobs {
            engine_priority: true,
            ..k
        };
        assert_eq!(k.critical_slots(16), (1, 1));
        assert_eq!(k.critical_slots(128), (2, 1));
        assert_eq!(Knobs::default().critical_slots(16), (0, 0));
    }
}
