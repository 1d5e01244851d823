//! One pool's admission: place a request on a replica with room in its token
//! budget, or queue it until room frees, or refuse it.
//!
//! The queue has three strict priority bands (critical, standard, sheddable).
//! Inside a band, tenants are served by virtual token counters (VTC): the
//! backlogged tenant that has been served the fewest tokens goes next, and a
//! tenant that (re)joins starts at the least-served backlogged tenant's count,
//! so it can neither starve others nor be starved. Each waiter has a deadline.
//!
//! Wake-ups: every release of tokens (a [`Reservation`] dropped or corrected
//! downwards) hands one "turn" to the best waiter; a waiter that places itself
//! passes a turn on, one that does not fit goes back to the front of its line.
//! Capacity that appears without a release is an event too
//! ([`PoolAdmission::capacity_changed`]): the pool's membership changed or a
//! replica reported its KV capacity (the registry follows the pool), or a
//! replica came back from ejection (the outlier prober). An epoch counter
//! closes the race between "did not fit" and "room freed just now". Waiters
//! never poll: a waiter sleeps until its turn or its deadline. Nothing else
//! needs watching, because a replica without requests always fits: a request
//! waits only while every replica it may use holds requests, whose releases
//! are events.
//!
//! Refusals: a sheddable request is refused (429) at once when it cannot be
//! placed; a full queue refuses with 429; a deadline passed in the queue gives
//! 503; all with `Retry-After`. A waiter whose future is dropped (the client
//! went away) leaves the queue at once (a `Drop` guard).
//!
//! Scale from zero: a request whose plan lets it wait for a replica
//! ([`Ticket::wait_for_replica`]) is held in the same queue while the pool has
//! no ready replica (at most `queue.max_waiting_when_empty` of them; past its
//! deadline it gets 503 `no_ready_replica`). A replica that joins while
//! requests are held starts cold (`cold_start`), so the held requests go in
//! band order at the pace of its first answers. The queue's gauges (requests,
//! tokens, requests held for a replica) are the demand an autoscaler reads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::sync::oneshot;

use super::budget::{Budget, CapacityListener, Cost, PastCap, Reservation};
use super::cold_start;
use super::config::{AdmissionConfig, QueueConfig};
use super::outlier::OutlierDetector;
use super::tuning::{Derived, Knobs, Observations, Timing};
use super::{Priority, RequestClass};
use crate::pool::{Pool, Replica, RoutabilityCheck};
use crate::routing::{NoRoom, Picker, Refusal, RouteRequest};
use infergate_protocol::error::ApiError;

/// What admission needs to know about one request.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub class: RequestClass,
    pub cost: Cost,
    /// Refuse at once ([`AdmitError::WouldExceedDeadline`]) when the estimated
    /// wait is longer than the deadline (set when a fallback could serve it).
    pub predict_wait: bool,
    /// Wait (up to the deadline) while the pool has no ready replica, instead
    /// of [`AdmitError::NoReadyReplica`] at once (set by the plan when nothing
    /// else could serve the request now).
    pub wait_for_replica: bool,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("the pool is saturated and the request is sheddable")]
    Shed,
    #[error("the pool's queue is full")]
    QueueFull,
    #[error("the request's deadline passed while it waited in the queue")]
    DeadlineExceeded,
    #[error("the request would wait in the queue past its deadline")]
    WouldExceedDeadline,
    #[error("the pool has no ready replica")]
    NoReadyReplica,
}

impl AdmitError {
    pub fn as_str(self) -> &'static str {
        match self {
            AdmitError::Shed => "shed",
            AdmitError::QueueFull => "queue_full",
            AdmitError::DeadlineExceeded => "queue_deadline",
            AdmitError::WouldExceedDeadline => "would_exceed_deadline",
            AdmitError::NoReadyReplica => "no_ready_replica",
        }
    }

    /// The client's answer: 429 for shedding and a full queue, 503 otherwise,
    /// always with `Retry-After`.
    pub fn to_api_error(self, model: &str, retry_after_secs: u64) -> ApiError {
        let (status, kind) = match self {
            AdmitError::Shed | AdmitError::QueueFull => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            _ => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
        };
        ApiError::new(
            status,
            kind,
            format!("Model `{model}`: {self}. Retry later."),
        )
        .with_code(self.as_str())
        .with_retry_after(retry_after_secs.max(1))
    }
}

/// The result of one placement attempt.
#[derive(Debug)]
pub enum Placement {
    Placed(Reservation),
    /// Every ready replica is over its budget.
    Full,
    /// No replica is ready (none, all ejected, or all excluded).
    NoReplica,
}

/// A request [`PoolAdmission::try_acquire`] could not place that may wait:
/// what [`PoolAdmission::wait_queued`] continues from.
#[derive(Debug, Clone, Copy)]
#[must_use = "a request that must queue is admitted only by `wait_queued`"]
pub struct MustQueue {
    /// When admission started (the queue deadline counts from it).
    started: Instant,
    /// The queue's epoch before the placement attempt.
    epoch: u64,
    /// It found no ready replica (held for one, not queued for room).
    held: bool,
}

/// Admission state of one pool: its budget, its queue, its outlier detector.
#[derive(Debug)]
pub struct PoolAdmission {
    pub name: Arc<str>,
    pub budget: Budget,
    pub outlier: Arc<OutlierDetector>,
    queue_cfg: QueueConfig,
    shared: Arc<Shared>,
}

impl PoolAdmission {
    /// Built from the admission config of the (first) route targeting the pool.
    pub fn new(name: impl Into<Arc<str>>, cfg: &AdmissionConfig) -> Self {
        let name = name.into();
        PoolAdmission {
            budget: Budget::new(cfg.budget.clone()),
            outlier: Arc::new(OutlierDetector::new(name.clone(), cfg.outlier.clone())),
            queue_cfg: cfg.queue.clone(),
            shared: Arc::new(Shared {
                name: name.clone(),
                state: Mutex::new(State::default()),
                derived: Derived::default(),
                wake_at: AtomicU64::new(0),
                created: Instant::now(),
                gauges: OnceLock::new(),
            }),
            name,
        }
    }

    /// Rebuilt for a changed config of the same pool (a reload), keeping
    /// `previous`'s queue: a pool has one queue, so a release by a request
    /// admitted under either config gives the turn to whoever waits, under
    /// either config.
    pub(crate) fn rebuilt(previous: &PoolAdmission, cfg: &AdmissionConfig) -> Self {
        PoolAdmission {
            shared: previous.shared.clone(),
            ..PoolAdmission::new(previous.name.clone(), cfg)
        }
    }

    pub fn queue_config(&self) -> &QueueConfig {
        &self.queue_cfg
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared.lock().queued
    }

    /// Requests waiting now in each band, highest band first.
    pub fn queued_by_band(&self) -> [(Priority, usize); 3] {
        let s = self.shared.lock();
        Priority::ALL.map(|p| (p, s.bands[p.index()].waiting))
    }

    /// Requests held because the pool had no ready replica, now.
    pub fn waiting_for_replica(&self) -> usize {
        self.shared.lock().held
    }

    /// Capacity may have appeared without a release (the pool's members
    /// changed, a replica reported its KV size or came back from ejection):
    /// the best waiter gets a turn. The registry calls it on the pool's events.
    pub fn capacity_changed(&self) {
        self.shared.capacity_freed(0);
    }

    /// The pool's members changed: replicas joining while requests wait for
    /// one start cold (`cold_start`); then the queue gets a turn.
    pub fn members_changed(&self, members: &[Arc<Replica>]) {
        if self.shared.lock().held > 0 {
            cold_start::mark_joined(members);
        }
        self.capacity_changed();
    }

    /// A listener to hand to code that frees capacity (for example the
    /// outlier prober).
    pub fn listener(&self) -> Arc<dyn CapacityListener> {
        self.shared.clone()
    }

    /// One placement attempt, without queueing: a ready (not ejected, not
    /// excluded) replica with room for the ticket's cost, chosen by `picker`. A
    /// `queued` non-critical request also waits for its replica's pacing
    /// ([`super::tuning::Pace`]); when that alone may hold it back, the queue is
    /// woken when the pacing allows the next start.
    pub fn try_place(
        &self,
        pool: &Pool,
        picker: &dyn Picker,
        req: &RouteRequest<'_>,
        ticket: &Ticket,
        exclude: &[Arc<str>],
        queued: bool,
    ) -> Placement {
        let (cost, priority) = (ticket.cost, ticket.class.priority);
        let members = pool.replicas();
        let ejected = self.outlier.ejected();
        let routable = RoutabilityCheck::new(&ejected, exclude);
        if !routable.any_takes_requests(&members) {
            return Placement::NoReplica;
        }
        let scraped = pool.is_scraped();
        let knobs = self.knobs(pool, members.len());
        // Queued non-critical starts are paced; queued critical ones only
        // on a KV-bound replica (`Pace::paces_critical`) whose engines do
        // not schedule by priority: with `engine_priority` a critical
        // request ignores the KV projection (the engine preempts a lower
        // band for it), so it makes no group there, and pacing it only
        // delays it (tiny long output: critical p99 1.31x -> 4.33x).
        let critical = priority == Priority::Critical;
        let pace_critical = !knobs.engine_priority;
        let paced = |p: &super::tuning::Pace| {
            queued && (!critical || (pace_critical && p.paces_critical()))
        };
        let now = Instant::now();
        // The earliest instant a replica's pacing held this request back.
        let paced_until = std::cell::Cell::new(None::<Instant>);
        // While some replica's metrics are read, one whose last scrape failed
        // takes nothing: its cap is unknown, so it would take every request
        // the capped replicas have no room for. Looked up only when a failed
        // scrape is met (rare), not on every placement.
        let some_read = std::cell::OnceCell::new();
        let holder_pass = self.holder_pass(&knobs);
        // A replica already caching part of the prompt needs room only for
        // the rest, and may take it past its cap while the wait there is
        // shorter than the prefill the cached part saves (`HolderPass`).
        let refused = |bound| Err(Refusal { bound, queued });
        let fits = |r: &Replica, cached: u64| {
            let cost_here = cost.uncached(cached);
            if !(routable.of(r).takes_requests()
                && cold_start::admits(r, scraped)
                && (scrape_read(r)
                    || !*some_read.get_or_init(|| members.iter().any(|m| scrape_read(m)))))
            {
                return refused(NoRoom::Unavailable);
            }
            let past = match holder_pass {
                Some(p) if cached > 0 => PastCap {
                    requests: p.past_cap(self.budget.batch(r), cached),
                    prefill_tokens: cached,
                },
                _ => PastCap::default(),
            };
            if let Err(bound) = self
                .budget
                .room_past_cap(r, cost_here, priority, &knobs, past)
            {
                return refused(bound);
            }
            match self.budget.pace(r, &knobs, cost_here).filter(paced) {
                Some(pace) => {
                    let at = pace.allowed_at(&r.load.next_start);
                    if at > now {
                        paced_until.set(Some(paced_until.get().map_or(at, |t| t.min(at))));
                        return refused(NoRoom::Pacing);
                    }
                    Ok(())
                }
                None => Ok(()),
            }
        };
        // One call: the picker looks the prompt's prefix up once, asks `fits`
        // per replica, records its decision and accounts only the uncached
        // part of the prompt as prefill.
        let placed = picker.pick_fitting_and_begin(&members, req, exclude, &fits);
        if placed.is_none() {
            if let Some(at) = paced_until.get() {
                self.shared.wake_at(at);
            }
        }
        match placed {
            Some(g) => {
                if let Some(pace) = self
                    .budget
                    .pace(g.replica(), &knobs, cost.uncached(g.cached_tokens()))
                    .filter(paced)
                {
                    pace.started(&g.replica().load.next_start, now);
                }
                // A cold replica's ramp widens with each first byte.
                let wake = self.budget.caps_prefill() || g.replica().load.is_cold();
                Placement::Placed(
                    Budget::reserve_guard(g, cost, Some(self.listener()))
                        .waking_queue_on_prefill(wake),
                )
            }
            None => Placement::Full,
        }
    }

    /// The prefix holder's pass in effect now: only where self-tuning sets
    /// the caps (a hand-set `max_requests_per_replica` wins) and has learned
    /// the service time and the prefill rate, and only while a request in a
    /// replica's own queue cannot delay a critical one (no critical traffic
    /// lately, or the engines preempt for it).
    fn holder_pass(&self, knobs: &Knobs) -> Option<HolderPass> {
        let rate = self.shared.derived.prefill_rate();
        let quiet = knobs.engine_priority || !knobs.critical_seen();
        let tuned = self.budget.self_tuning() && !self.budget.cap_set_by_hand();
        (tuned && quiet && knobs.service > 0.0 && rate > 0.0).then_some(HolderPass {
            service: knobs.service,
            prefill_rate: rate,
        })
    }

    /// What self-tuning derived for this pool, per replica of `replicas`.
    pub fn knobs(&self, pool: &Pool, replicas: usize) -> Knobs {
        let d = &self.shared.derived;
        Knobs {
            critical_in_flight_per_replica: d.critical_in_flight() / replicas.max(1) as f64,
            prefill_step_tokens: d.prefill_step_tokens(),
            prefill_per_slot: d.prefill_per_slot(),
            engine_priority: pool.engine_priority(),
            service: d.service(),
        }
    }

    /// Admits a request: places it now, or queues it until it fits, or
    /// refuses it. Dropping the returned future (client gone) leaves the queue.
    /// The same as [`PoolAdmission::try_acquire`], then
    /// [`PoolAdmission::wait_queued`] when it must wait.
    pub async fn acquire(
        &self,
        pool: &Pool,
        picker: &dyn Picker,
        req: &RouteRequest<'_>,
        ticket: &Ticket,
        exclude: &[Arc<str>],
    ) -> Result<Reservation, AdmitError> {
        match self.try_acquire(pool, picker, req, ticket, exclude) {
            Ok(decided) => decided,
            Err(wait) => {
                self.wait_queued(pool, picker, req, ticket, exclude, wait)
                    .await
            }
        }
    }

    /// The part of [`PoolAdmission::acquire`] that never waits: placed or
    /// refused now, or `Err` when the request must queue (then
    /// [`PoolAdmission::wait_queued`] with that value). Lets a caller build
    /// (and box) the waiting future only when it waits: most requests are
    /// placed at once.
    pub fn try_acquire(
        &self,
        pool: &Pool,
        picker: &dyn Picker,
        req: &RouteRequest<'_>,
        ticket: &Ticket,
        exclude: &[Arc<str>],
    ) -> Result<Result<Reservation, AdmitError>, MustQueue> {
        let band = ticket.class.priority;
        let started = Instant::now();
        let (blocked, epoch) = {
            let mut st = self.shared.lock();
            if band == Priority::Critical && self.budget.self_tuning() {
                st.observed.critical_arrived(started);
                self.shared.derived.update(&st.observed, started);
            }
            (st.ahead_of(band), st.epoch)
        };
        let first = self.try_place_unless(blocked, pool, picker, req, ticket, exclude);
        let held = match first {
            Placement::Placed(r) => return Ok(Ok(r)),
            Placement::NoReplica if !ticket.wait_for_replica => {
                return Ok(Err(self.refuse(AdmitError::NoReadyReplica)))
            }
            // Scale from zero: not an overload, so even sheddable requests wait.
            Placement::NoReplica => true,
            Placement::Full if band == Priority::Sheddable && self.queue_cfg.shed_sheddable => {
                return Ok(Err(self.refuse(AdmitError::Shed)));
            }
            Placement::Full => false,
        };
        Err(MustQueue {
            started,
            epoch,
            held,
        })
    }

    /// Queues a request that [`PoolAdmission::try_acquire`] could not place
    /// (with the same arguments) until it fits, or refuses it. Dropping the
    /// future (client gone) leaves the queue.
    pub async fn wait_queued(
        &self,
        pool: &Pool,
        picker: &dyn Picker,
        req: &RouteRequest<'_>,
        ticket: &Ticket,
        exclude: &[Arc<str>],
        wait: MustQueue,
    ) -> Result<Reservation, AdmitError> {
        let band = ticket.class.priority;
        let MustQueue {
            started,
            mut epoch,
            held,
        } = wait;
        let deadline = started + ticket.class.max_wait;
        let mut waiter = {
            let mut st = self.shared.lock();
            if st.queued >= self.queue_cfg.max_requests {
                drop(st);
                return Err(self.refuse(AdmitError::QueueFull));
            }
            if held && st.held >= self.queue_cfg.max_waiting_when_empty {
                drop(st);
                return Err(self.refuse(AdmitError::NoReadyReplica));
            }
            if ticket.predict_wait && !held {
                if let Some(wait) = st.estimate_wait(band, ticket.cost.total()) {
                    if wait > ticket.class.max_wait {
                        drop(st);
                        return Err(self.refuse(AdmitError::WouldExceedDeadline));
                    }
                }
            }
            let tenant = st.tenant_line(band, &ticket.class.tenant, self.queue_cfg.max_tenants);
            let (id, rx) = st.enqueue(band, &tenant, ticket.cost.total(), false);
            st.held += usize::from(held);
            if st.epoch != epoch {
                st.grant_next();
            }
            self.shared.gauge(&st);
            Waiter {
                shared: &self.shared,
                band,
                tenant,
                cost: ticket.cost.total(),
                id,
                rx,
                phase: Phase::Queued,
                held,
            }
        };
        loop {
            match tokio::time::timeout_at(deadline.into(), &mut waiter.rx).await {
                Ok(Ok(())) => {
                    waiter.phase = Phase::Granted;
                    epoch = self.shared.lock().epoch;
                    match self.try_place(pool, picker, req, ticket, exclude, true) {
                        Placement::Placed(r) => {
                            waiter.placed();
                            metrics::histogram!("infergate_admission_queue_wait_seconds", "pool" => self.name.to_string(), "priority" => band.as_str())
                                .record(started.elapsed().as_secs_f64());
                            return Ok(r);
                        }
                        Placement::Full => waiter.requeue(epoch, false),
                        Placement::NoReplica if ticket.wait_for_replica => {
                            waiter.requeue(epoch, true)
                        }
                        Placement::NoReplica => {
                            drop(waiter);
                            return Err(self.refuse(AdmitError::NoReadyReplica));
                        }
                    }
                }
                // The timer never fires early; the check keeps the deadline exact anyway.
                Err(_) if Instant::now() < deadline => {}
                // The deadline passed. (A closed channel cannot happen: the
                // queue never drops a sender without sending.) Still no
                // replica: say so; otherwise the queue was too slow.
                Ok(Err(_)) | Err(_) => {
                    let e = if waiter.held && self.no_replica(pool, exclude) {
                        AdmitError::NoReadyReplica
                    } else {
                        AdmitError::DeadlineExceeded
                    };
                    drop(waiter);
                    return Err(self.refuse(e));
                }
            }
        }
    }

    fn try_place_unless(
        &self,
        blocked: bool,
        pool: &Pool,
        picker: &dyn Picker,
        req: &RouteRequest<'_>,
        ticket: &Ticket,
        exclude: &[Arc<str>],
    ) -> Placement {
        if !blocked {
            return self.try_place(pool, picker, req, ticket, exclude, false);
        }
        // Others of this band or higher wait: do not overtake them, but still
        // tell "no replica at all" apart from "full".
        if self.no_replica(pool, exclude) {
            Placement::NoReplica
        } else {
            Placement::Full
        }
    }

    /// Whether no member of `pool` takes requests (all ejected or excluded, or none).
    fn no_replica(&self, pool: &Pool, exclude: &[Arc<str>]) -> bool {
        let ejected = self.outlier.ejected();
        !RoutabilityCheck::new(&ejected, exclude).any_takes_requests(&pool.replicas())
    }

    fn refuse(&self, e: AdmitError) -> AdmitError {
        metrics::counter!("infergate_admission_rejected_total", "pool" => self.name.to_string(), "reason" => e.as_str())
            .increment(1);
        tracing::debug!(pool = %self.name, reason = e.as_str(), "request not admitted");
        e
    }
}

/// Locality at the cap: a replica holding part of a request's prompt in
/// its KV cache may take it past its request cap (into its engine's own
/// queue) while the expected wait there is shorter than the prefill the
/// cached part saves, and past its prefill cap by as many tokens as are
/// cached (the prefill it waits for beyond the cap is shorter than the one
/// it saves). Without it, a request finding its prefix's holder at
/// the cap left for the first replica with room and prefilled its whole
/// prompt again; under cache pressure each such move evicted another
/// prefix, capacity fell and the queue grew (one gateway: fleet hit rate
/// 0.41 against 0.74 for three, p90 TTFT 27 s against 0.4 s;
/// docs/admission.md).
#[derive(Debug, Clone, Copy)]
struct HolderPass {
    /// Service time of a request, seconds.
    service: f64,
    /// Uncached prompt tokens a replica prefills per second.
    prefill_rate: f64,
}

impl HolderPass {
    /// Requests past its cap `batch` that a replica caching `cached` tokens
    /// of the prompt may hold: the `k`-th request past the cap waits about
    /// `k` completions, one every `service / batch`, so it may go while
    /// `k × service / batch` is under `cached / prefill_rate`. At most one
    /// batch past the cap (the engine's queue stays bounded whatever the
    /// timings read).
    fn past_cap(self, batch: Option<u64>, cached: u64) -> u64 {
        let Some(batch) = batch.filter(|b| *b > 0) else {
            return 0;
        };
        let saved = cached as f64 / self.prefill_rate;
        let between = self.service / batch as f64;
        if !(saved > 0.0 && between > 0.0) {
            return 0;
        }
        // The largest k with k x between < saved.
        let k = (saved / between).ceil() - 1.0;
        (k.max(0.0) as u64).min(batch)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In the queue (or handed a turn it has not read yet).
    Queued,
    /// Read its turn; placement attempt in progress.
    Granted,
    Done,
}

/// A request waiting in the queue; leaves it when dropped.
struct Waiter<'a> {
    shared: &'a Arc<Shared>,
    band: Priority,
    tenant: Arc<str>,
    cost: u64,
    id: u64,
    rx: oneshot::Receiver<()>,
    phase: Phase,
    /// Counted in `State::held` (it found no ready replica).
    held: bool,
}

impl Waiter<'_> {
    /// Placed after a turn: charge the tenant and pass a turn on.
    fn placed(&mut self) {
        let mut st = self.shared.lock();
        let b = &mut st.bands[self.band.index()];
        b.granted -= 1;
        if let Some(t) = b.tenants.iter_mut().find(|t| t.tenant == self.tenant) {
            t.vtc += self.cost;
        }
        b.cleanup();
        st.held -= usize::from(self.held);
        st.grant_next();
        self.shared.gauge(&st);
        self.phase = Phase::Done;
    }

    /// Did not fit after a turn (`no_replica`: because the pool has no ready
    /// replica): back to the front of its line; if capacity was freed
    /// meanwhile, the best waiter gets a turn right away.
    fn requeue(&mut self, epoch: u64, no_replica: bool) {
        let mut st = self.shared.lock();
        st.bands[self.band.index()].granted -= 1;
        let (id, rx) = st.enqueue(self.band, &self.tenant, self.cost, true);
        if no_replica && !self.held {
            self.held = true;
            st.held += 1;
        }
        self.id = id;
        self.rx = rx;
        self.phase = Phase::Queued;
        if st.epoch != epoch {
            st.grant_next();
        }
        self.shared.gauge(&st);
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if self.phase != Phase::Done {
            st.held -= usize::from(self.held);
        }
        match self.phase {
            Phase::Done => return,
            Phase::Queued => {
                if !st.remove(self.band, &self.tenant, self.id) {
                    // A turn was sent but never read: pass it on.
                    st.bands[self.band.index()].granted -= 1;
                    st.bands[self.band.index()].cleanup();
                    st.grant_next();
                }
            }
            Phase::Granted => {
                st.bands[self.band.index()].granted -= 1;
                st.bands[self.band.index()].cleanup();
                st.grant_next();
            }
        }
        self.shared.gauge(&st);
    }
}

#[derive(Debug)]
struct Shared {
    name: Arc<str>,
    state: Mutex<State>,
    /// Self-tuning's results, read on the placement path without the lock.
    derived: Derived,
    /// The instant a pacing wake-up is set for (`Pace`), as nanoseconds
    /// after `created`; 0: none.
    wake_at: AtomicU64,
    created: Instant,
    /// The queue's gauges (tokens, waiting for a replica, depth), made on
    /// first use and kept: looked up by name and label on every request they
    /// were three allocations and three registry searches each time.
    gauges: OnceLock<[metrics::Gauge; 3]>,
}

impl Shared {
    /// Wakes the queue at `at`, when pacing (not a full replica) held a
    /// queued request back: no release would wake it then. One timer at a
    /// time per pool, for the earliest instant asked.
    fn wake_at(self: &Arc<Self>, at: Instant) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ns = (at.saturating_duration_since(self.created).as_nanos() as u64).max(1);
        let set = self
            .wake_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == 0 || ns < cur).then_some(ns)
            });
        if set.is_err() {
            return;
        }
        let shared = self.clone();
        rt.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            // Only the latest timer clears the mark; an earlier one set later wins.
            let _ = shared
                .wake_at
                .compare_exchange(ns, 0, Ordering::AcqRel, Ordering::Acquire);
            shared.capacity_freed(0);
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue's gauges: the demand waiting on the pool (what an
    /// autoscaler reads, e.g. to scale from zero).
    fn gauge(&self, st: &State) {
        let [tokens, held, depth] = self.gauges.get_or_init(|| {
            let pool = self.name.to_string();
            [
                metrics::gauge!("infergate_admission_queue_tokens", "pool" => pool.clone()),
                metrics::gauge!("infergate_admission_waiting_for_replica", "pool" => pool.clone()),
                metrics::gauge!("infergate_admission_queue_depth", "pool" => pool),
            ]
        });
        let queued_tokens: u64 = st.bands.iter().map(|b| b.queued_tokens).sum();
        tokens.set(queued_tokens as f64);
        held.set(st.held as f64);
        depth.set(st.queued as f64);
    }
}

impl Shared {
    fn freed(&self, st: &mut State, tokens: u64) {
        st.epoch += 1;
        st.drain.record(tokens);
        if st.queued > 0 {
            st.grant_next();
        }
    }
}

impl CapacityListener for Shared {
    fn capacity_freed(&self, tokens: u64) {
        let mut st = self.lock();
        self.freed(&mut st, tokens);
    }

    /// One lock for both: the timings go to self-tuning, the freed room to
    /// the queue.
    fn request_ended(&self, tokens: u64, timing: Option<Timing>) {
        let mut st = self.lock();
        if let Some(t) = timing {
            st.observed.ended(t);
            self.derived.update(&st.observed, Instant::now());
        }
        self.freed(&mut st, tokens);
    }
}

#[derive(Debug, Default)]
struct State {
    bands: [Band; 3],
    next_id: u64,
    queued: usize,
    /// Waiters that found no ready replica (scale from zero), still waiting.
    held: usize,
    epoch: u64,
    drain: DrainRate,
    /// What self-tuning observed of the pool's requests.
    observed: Observations,
}

impl State {
    /// Whether requests of `band` or higher are waiting or hold a turn.
    fn ahead_of(&self, band: Priority) -> bool {
        self.bands[..=band.index()]
            .iter()
            .any(|b| b.waiting > 0 || b.granted > 0)
    }

    /// The line `tenant` waits in: its own, or the shared
    /// [`OVERFLOW_TENANT`] once the band has `max_tenants` lines.
    fn tenant_line(&self, band: Priority, tenant: &Arc<str>, max_tenants: usize) -> Arc<str> {
        let lines = &self.bands[band.index()].tenants;
        if lines.len() < max_tenants.max(1) || lines.iter().any(|t| t.tenant == *tenant) {
            return tenant.clone();
        }
        lines
            .iter()
            .find(|t| &*t.tenant == OVERFLOW_TENANT)
            .map_or_else(|| OVERFLOW_TENANT.into(), |t| t.tenant.clone())
    }

    fn enqueue(
        &mut self,
        band: Priority,
        tenant: &Arc<str>,
        cost: u64,
        front: bool,
    ) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = self.next_id;
        let b = &mut self.bands[band.index()];
        let floor = b
            .tenants
            .iter()
            .filter(|t| !t.waiters.is_empty())
            .map(|t| t.vtc)
            .min();
        let i = match b.tenants.iter().position(|t| t.tenant == *tenant) {
            Some(i) => i,
            None => {
                b.tenants.push(TenantLine {
                    tenant: tenant.clone(),
                    vtc: 0,
                    waiters: VecDeque::new(),
                });
                b.tenants.len() - 1
            }
        };
        let t = &mut b.tenants[i];
        if t.waiters.is_empty() {
            // (Re)joining: start no lower than the least-served backlogged tenant.
            t.vtc = t.vtc.max(floor.unwrap_or(0));
        }
        let w = Queued { id, cost, tx };
        if front {
            t.waiters.push_front(w);
        } else {
            t.waiters.push_back(w);
        }
        b.waiting += 1;
        b.queued_tokens += cost;
        self.queued += 1;
        (id, rx)
    }

    fn remove(&mut self, band: Priority, tenant: &Arc<str>, id: u64) -> bool {
        let b = &mut self.bands[band.index()];
        let Some(t) = b.tenants.iter_mut().find(|t| t.tenant == *tenant) else {
            return false;
        };
        let Some(pos) = t.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        if let Some(w) = t.waiters.remove(pos) {
            b.waiting -= 1;
            b.queued_tokens -= w.cost;
            self.queued -= 1;
        }
        b.cleanup();
        true
    }

    /// Gives a turn to the best waiter: highest band, then least-served tenant,
    /// then first come. While a turn is out at some band, nobody at that band
    /// or below gets one: the holder retries itself if capacity moved meanwhile
    /// (the epoch), so a release during its attempt cannot go to a lower band.
    fn grant_next(&mut self) -> bool {
        for b in &mut self.bands {
            if b.granted > 0 {
                return false;
            }
            while b.waiting > 0 {
                let Some(t) = b
                    .tenants
                    .iter_mut()
                    .filter(|t| !t.waiters.is_empty())
                    .min_by_key(|t| t.vtc)
                else {
                    break;
                };
                let Some(w) = t.waiters.pop_front() else {
                    break;
                };
                b.waiting -= 1;
                b.queued_tokens -= w.cost;
                self.queued -= 1;
                if w.tx.send(()).is_ok() {
                    b.granted += 1;
                    return true;
                }
                b.cleanup();
            }
        }
        false
    }

    /// Time until `cost` more tokens at `band` would be placed, from the
    /// tokens queued at or above it and the recent release rate.
    fn estimate_wait(&self, band: Priority, cost: u64) -> Option<Duration> {
        let rate = self.drain.tokens_per_sec()?;
        let ahead: u64 = self.bands[..=band.index()]
            .iter()
            .map(|b| b.queued_tokens)
            .sum();
        Some(Duration::from_secs_f64((ahead + cost) as f64 / rate))
    }
}

#[derive(Debug, Default)]
struct Band {
    tenants: Vec<TenantLine>,
    waiting: usize,
    granted: usize,
    queued_tokens: u64,
}

impl Band {
    /// Tenant counters only matter while the band is contended.
    fn cleanup(&mut self) {
        if self.waiting == 0 && self.granted == 0 {
            self.tenants.clear();
        }
    }
}

/// The tenant whose line new tenants share once a band has `max_tenants`.
pub const OVERFLOW_TENANT: &str = "default";

#[derive(Debug)]
struct TenantLine {
    tenant: Arc<str>,
    /// Tokens served to this tenant while the band was contended.
    vtc: u64,
    waiters: VecDeque<Queued>,
}

#[derive(Debug)]
struct Queued {
    id: u64,
    cost: u64,
    tx: oneshot::Sender<()>,
}

/// Exponentially weighted rate of released tokens.
#[derive(Debug, Default)]
struct DrainRate {
    since: Option<Instant>,
    pending: u64,
    rate: f64,
}

impl DrainRate {
    const PERIOD: Duration = Duration::from_millis(100);

    fn record(&mut self, tokens: u64) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        self.pending += tokens;
        let dt = now.duration_since(since);
        if dt >= Self::PERIOD {
            let sample = self.pending as f64 / dt.as_secs_f64();
            self.rate = if self.rate == 0.0 {
                sample
            } else {
                0.7 * self.rate + 0.3 * sample
            };
            self.pending = 0;
            self.since = Some(now);
        }
    }

    fn tokens_per_sec(&self) -> Option<f64> {
        (self.rate > 0.0).then_some(self.rate)
    }
}

/// Whether `replica`'s last metrics scrape was read (no scrape yet counts
/// as read: a pool without metrics is judged by its own load).
fn scrape_read(replica: &Replica) -> bool {
    replica
        .signals
        .load()
        .as_ref()
        .is_none_or(|s| s.error.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::config::BudgetConfig;
    use crate::discovery::{Endpoint, Update};
    use crate::routing::simple::LeastRequest;

    fn setup(replicas: u16, capacity: u64) -> (Arc<Pool>, Arc<PoolAdmission>) {
        let pool = Arc::new(Pool::new("p", Default::default()));
        pool.apply(Update::Reset(
            (0..replicas)
                .map(|i| Endpoint::from_url(&format!("http://127.0.0.1:{}", 9100 + i)).unwrap())
                .collect(),
        ));
        let cfg = AdmissionConfig {
            budget: BudgetConfig {
                tokens_per_replica: Some(capacity),
                ..Default::default()
            },
            ..Default::default()
        };
        (pool, Arc::new(PoolAdmission::new("p", &cfg)))
    }

    fn req() -> RouteRequest<'static> {
        RouteRequest {
            request_id: "r",
            model: "m",
            prompt_text: "",
            prompt_tokens: 10,
            max_tokens: 10,
            lora: None,
            hashes: Default::default(),
        }
    }

    fn ticket(p: Priority, tenant: &str, tokens: u64, wait_ms: u64) -> Ticket {
        Ticket {
            class: RequestClass {
                priority: p,
                tenant: tenant.into(),
                max_wait: Duration::from_millis(wait_ms),
            },
            cost: Cost {
                prompt: tokens / 2,
                output: tokens - tokens / 2,
            },
            predict_wait: false,
            wait_for_replica: false,
        }
    }

    async fn acquire(
        pool: &Arc<Pool>,
        adm: &Arc<PoolAdmission>,
        t: Ticket,
    ) -> Result<Reservation, AdmitError> {
        adm.acquire(pool, &LeastRequest, &req(), &t, &[]).await
    }

    /// Spawns a waiter that records its label in `order` when admitted.
    fn spawn_waiter(
        pool: &Arc<Pool>,
        adm: &Arc<PoolAdmission>,
        t: Ticket,
        label: &'static str,
        order: Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Result<Reservation, AdmitError>> {
        let (pool, adm) = (pool.clone(), adm.clone());
        tokio::spawn(async move {
            let r = acquire(&pool, &adm, t).await;
            if r.is_ok() {
                order.lock().unwrap().push(label);
            }
            r
        })
    }

    async fn wait_queued(adm: &PoolAdmission, n: usize) {
        for _ in 0..200 {
            if adm.queued() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("queue never reached {n} (is {})", adm.queued());
    }

    #[tokio::test]
    async fn released_in_priority_order_and_sheddable_refused_at_once() {
        let (pool, adm) = setup(1, 100);
        let hold = acquire(&pool, &adm, ticket(Priority::Standard, "", 100, 1000))
            .await
            .unwrap();
        let t0 = Instant::now();
        assert_eq!(
            acquire(&pool, &adm, ticket(Priority::Sheddable, "", 10, 1000))
                .await
                .unwrap_err(),
            AdmitError::Shed
        );
        assert!(t0.elapsed() < Duration::from_millis(50));
        let order = Arc::new(Mutex::new(Vec::new()));
        let s = spawn_waiter(
            &pool,
            &adm,
            ticket(Priority::Standard, "", 100, 5000),
            "standard",
            order.clone(),
        );
        wait_queued(&adm, 1).await;
        let c = spawn_waiter(
            &pool,
            &adm,
            ticket(Priority::Critical, "", 100, 5000),
            "critical",
            order.clone(),
        );
        wait_queued(&adm, 2).await;
        drop(hold);
        let c = c.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["critical"]);
        assert_eq!(adm.queued(), 1);
        drop(c);
        let s = s.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["critical", "standard"]);
        drop(s);
        assert_eq!(pool.replicas()[0].load.tokens(), 0);
    }

    /// The synchronous first try decides what `acquire` would at once
    /// (placed, or refused), and a request it cannot place waits in the
    /// queue through `wait_queued` exactly as `acquire` would: pending,
    /// then woken by a release.
    #[tokio::test]
    async fn try_acquire_then_wait_queued_is_acquire() {
        let (pool, adm) = setup(1, 100);
        let std_ticket = ticket(Priority::Standard, "", 100, 5000);
        // Room: placed without a future.
        let Ok(Ok(hold)) = adm.try_acquire(&pool, &LeastRequest, &req(), &std_ticket, &[]) else {
            panic!("placed at once");
        };
        assert_eq!(pool.replicas()[0].load.tokens(), 100);
        // Full: a sheddable request is refused at once, as by `acquire`.
        let shed = ticket(Priority::Sheddable, "", 10, 5000);
        assert!(matches!(
            adm.try_acquire(&pool, &LeastRequest, &req(), &shed, &[]),
            Ok(Err(AdmitError::Shed))
        ));
        // Full: a standard one must queue; nothing is queued until it waits.
        let Err(wait) = adm.try_acquire(&pool, &LeastRequest, &req(), &std_ticket, &[]) else {
            panic!("must queue");
        };
        assert_eq!(adm.queued(), 0);
        let rr = req();
        let waiting = adm.wait_queued(&pool, &LeastRequest, &rr, &std_ticket, &[], wait);
        let mut waiting = std::pin::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        assert_eq!(adm.queued(), 1);
        drop(hold);
        let r = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the release")
            .unwrap();
        assert_eq!(adm.queued(), 0);
        assert_eq!(pool.replicas()[0].load.tokens(), 100);
        drop(r);
        assert_eq!(pool.replicas()[0].load.tokens(), 0);
    }

    #[tokio::test]
    async fn queued_sheddable_goes_last() {
        let pool = setup(1, 100).0;
        let cfg = AdmissionConfig {
            budget: BudgetConfig {
                tokens_per_replica: Some(100),
                ..Default::default()
            },
            queue: QueueConfig {
                shed_sheddable: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let adm = Arc::new(PoolAdmission::new("p", &cfg));
        let mut hold = Some(
            acquire(&pool, &adm, ticket(Priority::Standard, "", 100, 1000))
                .await
                .unwrap(),
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, (p, label)) in [
            (Priority::Sheddable, "sheddable"),
            (Priority::Standard, "standard"),
            (Priority::Critical, "critical"),
        ]
        .into_iter()
        .enumerate()
        {
            tasks.push(spawn_waiter(
                &pool,
                &adm,
                ticket(p, "", 100, 5000),
                label,
                order.clone(),
            ));
            wait_queued(&adm, i + 1).await;
        }
        for t in tasks.into_iter().rev() {
            drop(hold.take());
            hold = Some(t.await.unwrap().unwrap());
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec!["critical", "standard", "sheddable"]
        );
    }

    #[tokio::test]
    async fn deadline_in_queue_and_full_queue_and_disconnect() {
        let (pool, adm) = setup(1, 100);
        let _hold = acquire(&pool, &adm, ticket(Priority::Critical, "", 100, 1000))
            .await
            .unwrap();
        let t0 = Instant::now();
        let e = acquire(&pool, &adm, ticket(Priority::Standard, "", 10, 60))
            .await
            .unwrap_err();
        assert_eq!(e, AdmitError::DeadlineExceeded);
        assert!(t0.elapsed() >= Duration::from_millis(60));
        assert_eq!(adm.queued(), 0);
        let api = e.to_api_error("m", 2);
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.retry_after_secs, Some(2));
        assert_eq!(AdmitError::Shed.to_api_error("m", 0).status, 429);

        // A dropped waiter (client gone) leaves the queue at once.
        let order = Arc::new(Mutex::new(Vec::new()));
        let fut = spawn_waiter(
            &pool,
            &adm,
            ticket(Priority::Standard, "", 10, 5000),
            "w",
            order.clone(),
        );
        wait_queued(&adm, 1).await;
        fut.abort();
        let _ = fut.await;
        assert_eq!(adm.queued(), 0);

        let pool = setup(1, 100).0;
        let cfg = AdmissionConfig {
            budget: BudgetConfig {
                tokens_per_replica: Some(100),
                ..Default::default()
            },
            queue: QueueConfig {
                max_requests: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let adm2 = Arc::new(PoolAdmission::new("p", &cfg));
        let _h = acquire(&pool, &adm2, ticket(Priority::Standard, "", 100, 1000))
            .await
            .unwrap();
        let w = spawn_waiter(
            &pool,
            &adm2,
            ticket(Priority::Standard, "", 10, 5000),
            "w",
            order.clone(),
        );
        wait_queued(&adm2, 1).await;
        assert_eq!(
            acquire(&pool, &adm2, ticket(Priority::Critical, "", 10, 5000))
                .await
                .unwrap_err(),
            AdmitError::QueueFull
        );
        w.abort();
    }

    #[tokio::test]
    async fn no_replica_and_exclusion() {
        let (pool, adm) = setup(2, 100);
        let first = pool.replicas()[0].endpoint.key.clone();
        let r = adm
            .acquire(
                &pool,
                &LeastRequest,
                &req(),
                &ticket(Priority::Standard, "", 10, 100),
                std::slice::from_ref(&first),
            )
            .await
            .unwrap();
        assert_ne!(
            r.replica().key(),
            &*first,
            "a retry never picks the excluded replica"
        );
        let all: Vec<Arc<str>> = pool
            .replicas()
            .iter()
            .map(|r| r.endpoint.key.clone())
            .collect();
        assert_eq!(
            adm.acquire(
                &pool,
                &LeastRequest,
                &req(),
                &ticket(Priority::Critical, "", 10, 100),
                &all
            )
            .await
            .unwrap_err(),
            AdmitError::NoReadyReplica
        );
        pool.apply(Update::Reset(vec![]));
        assert_eq!(
            acquire(&pool, &adm, ticket(Priority::Critical, "", 10, 100))
                .await
                .unwrap_err(),
            AdmitError::NoReadyReplica
        );
    }

    #[tokio::test]
    async fn tenants_share_tokens_fairly_within_a_band() {
        // One replica that holds one request at a time; tenant "big" sends
        // 40-token requests, tenant "small" 10-token ones, 200 each, all queued
        // at once. While both are backlogged their served tokens stay close.
        let (pool, adm) = setup(1, 40);
        let hold = acquire(&pool, &adm, ticket(Priority::Standard, "x", 40, 1000))
            .await
            .unwrap();
        let served: Arc<Mutex<Vec<(&'static str, u64)>>> = Arc::default();
        let mut tasks = Vec::new();
        for i in 0..400 {
            let (tenant, cost) = if i % 2 == 0 {
                ("big", 40)
            } else {
                ("small", 10)
            };
            let (pool, adm, served) = (pool.clone(), adm.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let r = acquire(
                    &pool,
                    &adm,
                    ticket(Priority::Standard, tenant, cost, 20_000),
                )
                .await
                .unwrap();
                served.lock().unwrap().push((tenant, cost));
                tokio::task::yield_now().await;
                drop(r);
            }));
        }
        wait_queued(&adm, 400).await;
        drop(hold);
        for t in tasks {
            t.await.unwrap();
        }
        // Look at the prefix during which both tenants were backlogged: until
        // "big" (the slower to drain in count) or "small" ran out.
        let served = served.lock().unwrap();
        let mut tok = [0u64; 2];
        let mut counts = [0usize; 2];
        for (tenant, cost) in served.iter() {
            let i = usize::from(*tenant == "small");
            counts[i] += 1;
            tok[i] += cost;
            if counts[0] == 200 || counts[1] == 200 {
                break;
            }
        }
        let share = tok[0] as f64 / (tok[0] + tok[1]) as f64;
        assert!(
            (share - 0.5).abs() < 0.05,
            "big's token share {share} ({tok:?})"
        );
    }

    #[tokio::test]
    async fn rotating_tenant_ids_share_one_line_beyond_max_tenants() {
        // "steady" sends 60 requests under one id, a rotating client 60 under
        // 60 ids, interleaved. Unbounded, each new id would join at the
        // least-served count and overtake "steady"; with `max_tenants: 2`
        // the ids beyond the first share the `default` line, so "steady"
        // keeps half the turns and the band's list stays at three lines.
        let (pool, _) = setup(1, 10);
        let mut cfg = AdmissionConfig {
            budget: BudgetConfig {
                tokens_per_replica: Some(10),
                ..Default::default()
            },
            ..Default::default()
        };
        cfg.queue.max_tenants = 2;
        let adm = Arc::new(PoolAdmission::new("p", &cfg));
        let hold = acquire(&pool, &adm, ticket(Priority::Standard, "x", 10, 1000))
            .await
            .unwrap();
        let served: Arc<Mutex<Vec<bool>>> = Arc::default();
        let mut tasks = Vec::new();
        for i in 0..120 {
            let steady = i % 2 == 0;
            let tenant = if steady {
                "steady".to_string()
            } else {
                format!("rot-{i}")
            };
            let (pool, a, served) = (pool.clone(), adm.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let r = acquire(&pool, &a, ticket(Priority::Standard, &tenant, 10, 20_000))
                    .await
                    .unwrap();
                served.lock().unwrap().push(steady);
                tokio::task::yield_now().await;
                drop(r);
            }));
            // Arrival order is the loop's order.
            wait_queued(&adm, i + 1).await;
        }
        let lines = adm.shared.lock().bands[Priority::Standard.index()]
            .tenants
            .len();
        assert_eq!(lines, 3, "steady, the first rotating id, default");
        drop(hold);
        for t in tasks {
            t.await.unwrap();
        }
        let served = served.lock().unwrap();
        let steady_first_half = served[..60].iter().filter(|s| **s).count();
        assert!(
            (25..=35).contains(&steady_first_half),
            "steady got {steady_first_half} of the first 60 turns"
        );
    }

    #[tokio::test]
    async fn capacity_appearing_without_release_is_found() {
        let (pool, adm) = setup(1, 100);
        let _hold = acquire(&pool, &adm, ticket(Priority::Standard, "", 100, 1000))
            .await
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let w = spawn_waiter(
            &pool,
            &adm,
            ticket(Priority::Standard, "", 50, 5000),
            "w",
            order.clone(),
        );
        wait_queued(&adm, 1).await;
        pool.apply(Update::Add(vec![Endpoint::from_url(
            "http://127.0.0.1:9199",
        )
        .unwrap()]));
        adm.capacity_changed();
        let r = w.await.unwrap().unwrap();
        assert_eq!(r.replica().key(), "127.0.0.1:9199");
        assert_eq!(*order.lock().unwrap(), vec!["w"]);
    }

    #[tokio::test]
    async fn a_bunch_of_releases_is_refilled_at_the_pace_and_critical_is_not_paced() {
        let pool = Arc::new(Pool::new("p", Default::default()));
        pool.apply(Update::Reset(vec![Endpoint::from_url(
            "http://127.0.0.1:9100",
        )
        .unwrap()]));
        let cfg = AdmissionConfig {
            budget: BudgetConfig {
                max_requests_per_replica: Some(4),
                // No reserve: the critical request below would keep a slot.
                critical_reserve: Some(0.0),
                ..Default::default()
            },
            ..Default::default()
        };
        let adm = Arc::new(PoolAdmission::new("p", &cfg));
        // Requests last 400 ms: with 4 slots, queued starts come one per 80 ms.
        adm.listener().request_ended(
            0,
            Some(Timing {
                ttft: Duration::from_millis(400),
                total: Duration::from_millis(400),
                generated: 1,
                prompt: 10,
            }),
        );
        let t = |p| ticket(p, "", 20, 5000);
        let mut cohort = Vec::new();
        for _ in 0..4 {
            cohort.push(acquire(&pool, &adm, t(Priority::Standard)).await.unwrap());
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|l| spawn_waiter(&pool, &adm, t(Priority::Standard), l, order.clone()))
            .collect();
        wait_queued(&adm, 4).await;
        // The whole batch ends at once.
        let t0 = Instant::now();
        drop(cohort);
        let mut at = Vec::new();
        let mut placed = Vec::new();
        for w in waiters {
            placed.push(w.await.unwrap().unwrap());
            at.push(t0.elapsed());
            if placed.len() == 2 {
                // Two slots are still free while the pace holds the queue:
                // a critical arrival takes one at once.
                let c = tokio::time::timeout(
                    Duration::from_millis(20),
                    acquire(&pool, &adm, t(Priority::Critical)),
                )
                .await
                .expect("critical is not paced")
                .unwrap();
                drop(c);
            }
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c", "d"]);
        // Two at once (the burst), then one per 80 ms, woken by the pacing
        // timer (no request ended meanwhile).
        assert!(at[1] < Duration::from_millis(60), "{at:?}");
        assert!(at[3] >= Duration::from_millis(150), "{at:?}");
        assert!(at[3] < Duration::from_secs(2), "{at:?}");
        // A request placed without waiting is not paced.
        drop(placed);
        let free: Vec<_> = admitted_at_once(&pool, &adm, 4).await;
        assert_eq!(free.len(), 4);
    }

    #[tokio::test]
    async fn queued_critical_starts_are_paced_on_a_kv_bound_replica() {
        // One replica with a 4,096-token KV cache and a batch of 16: 64 +
        // 500-token requests are KV-bound (12 evenly spaced fit).
        let pool = Arc::new(Pool::new("p", Default::default()));
        pool.apply(Update::Reset(vec![Endpoint::from_url(
            "http://127.0.0.1:9100",
        )
        .unwrap()]));
        crate::admission::budget::tests::scraped(&pool.replicas()[0], 16, 256);
        let adm = Arc::new(PoolAdmission::new("p", &AdmissionConfig::default()));
        // Requests last 1.2 s: queued starts come one per 100 ms.
        adm.listener().request_ended(
            0,
            Some(Timing {
                ttft: Duration::from_millis(10),
                total: Duration::from_millis(1200),
                generated: 500,
                prompt: 64,
            }),
        );
        let t = || Ticket {
            cost: Cost {
                prompt: 64,
                output: 500,
            },
            ..ticket(Priority::Critical, "", 0, 5000)
        };
        // A group that started together fills the projection (7 x 36
        // blocks of 16 of 256).
        let mut group = Vec::new();
        for _ in 0..7 {
            group.push(acquire(&pool, &adm, t()).await.unwrap());
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|l| spawn_waiter(&pool, &adm, t(), l, order.clone()))
            .collect();
        wait_queued(&adm, 4).await;
        // The group ends at once: the critical requests waiting start at
        // the pace, not as the next group.
        let t0 = Instant::now();
        drop(group);
        let mut at = Vec::new();
        let mut placed = Vec::new();
        for w in waiters {
            placed.push(w.await.unwrap().unwrap());
            at.push(t0.elapsed());
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c", "d"]);
        // Two at once (the burst), then one per 100 ms.
        assert!(at[1] < Duration::from_millis(80), "{at:?}");
        assert!(at[3] >= Duration::from_millis(190), "{at:?}");
        assert!(at[3] < Duration::from_secs(2), "{at:?}");
        // A critical request that did not wait is not paced.
        let now = tokio::time::timeout(Duration::from_millis(50), acquire(&pool, &adm, t()))
            .await
            .expect("an arrival that finds room starts at once")
            .unwrap();
        drop((now, placed));
        // With engine priority a critical request ignores the projection
        // (the engine preempts for it): queued ones are not paced.
        pool.set_engine_priority(true);
        // Fill the replica: the request cap, and the critical engine queue past it.
        let mut held = Vec::new();
        while let Ok(r) =
            tokio::time::timeout(Duration::from_millis(20), acquire(&pool, &adm, t())).await
        {
            held.push(r.unwrap());
            assert!(held.len() <= 32, "the request cap holds");
        }
        let waiters: Vec<_> = ["e", "f", "g", "h"]
            .into_iter()
            .map(|l| spawn_waiter(&pool, &adm, t(), l, order.clone()))
            .collect();
        wait_queued(&adm, 4).await;
        let t0 = Instant::now();
        drop(held);
        for w in waiters {
            drop(w.await.unwrap().unwrap());
        }
        assert!(
            t0.elapsed() < Duration::from_millis(150),
            "{:?}",
            t0.elapsed()
        );
    }

    /// A picker that knows `holder` caches `cached` tokens of every prompt
    /// and prefers it whenever it fits (as the inference-aware picker's
    /// prefix affinity does), else takes the first replica that fits.
    #[derive(Debug)]
    struct Holds {
        holder: &'static str,
        cached: u64,
    }

    impl Holds {
        fn cached(&self, r: &Replica) -> u64 {
            if r.key() == self.holder {
                self.cached
            } else {
                0
            }
        }
    }

    impl Picker for Holds {
        fn pick(
            &self,
            replicas: &[Arc<Replica>],
            _req: &RouteRequest<'_>,
            _exclude: &[Arc<str>],
        ) -> Option<Arc<Replica>> {
            replicas.first().cloned()
        }

        fn pick_fitting_and_begin(
            &self,
            replicas: &[Arc<Replica>],
            req: &RouteRequest<'_>,
            _exclude: &[Arc<str>],
            fits: &crate::routing::Fits<'_>,
        ) -> Option<crate::pool::LoadGuard> {
            let r = replicas
                .iter()
                .filter(|r| fits(r, self.cached(r)).is_ok())
                .max_by_key(|r| (self.cached(r), std::cmp::Reverse(r.load.requests())))?;
            let cached = self.cached(r);
            Some(
                r.begin(
                    req.estimated_tokens(),
                    u64::from(req.prompt_tokens) - cached,
                )
                .with_cached_tokens(cached),
            )
        }
    }

    /// A standard request with a 9,000-token prompt and 30 output tokens:
    /// its ticket and what routing sees of it.
    fn standard_9000_tokens() -> (Ticket, RouteRequest<'static>) {
        let t = Ticket {
            cost: Cost {
                prompt: 9000,
                output: 30,
            },
            ..ticket(Priority::Standard, "", 0, 5000)
        };
        let req = RouteRequest {
            prompt_tokens: 9000,
            max_tokens: 30,
            ..req()
        };
        (t, req)
    }

    /// Two replicas, a prefix holder (`127.0.0.1:9100`) and a cold one,
    /// on which self-tuning (the default config) learned a batch of `batch`,
    /// and an admission that learned requests of 1 s whose prefill runs at
    /// 4,500 tokens / (0.5 s TTFT - one 50 ms step) = 10,000 tokens/s.
    fn holder_and_cold(batch: u32) -> (Arc<Pool>, Arc<Replica>, Arc<Replica>, Arc<PoolAdmission>) {
        holder_and_cold_with(batch, &AdmissionConfig::default())
    }

    /// [`holder_and_cold`] with the admission config `cfg`.
    fn holder_and_cold_with(
        batch: u32,
        cfg: &AdmissionConfig,
    ) -> (Arc<Pool>, Arc<Replica>, Arc<Replica>, Arc<PoolAdmission>) {
        let pool = Arc::new(Pool::new("p", Default::default()));
        pool.apply(Update::Reset(
            (0..2)
                .map(|i| Endpoint::from_url(&format!("http://127.0.0.1:{}", 9100 + i)).unwrap())
                .collect(),
        ));
        let (holder, cold) = (pool.replicas()[0].clone(), pool.replicas()[1].clone());
        assert_eq!(holder.key(), "127.0.0.1:9100");
        for r in [&holder, &cold] {
            crate::admission::budget::tests::scraped(r, batch, 100_000);
        }
        let adm = Arc::new(PoolAdmission::new("p", cfg));
        adm.listener().request_ended(
            0,
            Some(Timing {
                ttft: Duration::from_millis(500),
                total: Duration::from_millis(1000),
                generated: 11,
                prompt: 4500,
            }),
        );
        (pool, holder, cold, adm)
    }

    #[tokio::test]
    async fn a_request_goes_past_the_cap_to_its_prefix_holder_while_the_wait_is_shorter_than_the_prefill(
    ) {
        // A batch of 2: a completion every 0.5 s.
        let (pool, holder, cold, adm) = holder_and_cold(2);
        let holds = |cached| Holds {
            holder: "127.0.0.1:9100",
            cached,
        };
        // The holder runs its batch: it is at its cap.
        let batch: Vec<_> = (0..2)
            .map(|_| {
                Budget::reserve(
                    &holder,
                    Cost {
                        prompt: 0,
                        output: 10,
                    },
                    None,
                )
            })
            .collect();
        let (t, req) = standard_9000_tokens();
        let place = |cached| adm.try_place(&pool, &holds(cached), &req, &t, &[], false);
        // 4,000 cached tokens save 0.4 s of prefill, less than the 0.5 s
        // until a slot frees at the holder: the request goes to the cold
        // replica and prefills its whole prompt there.
        let Placement::Placed(r) = place(4000) else {
            panic!("the cold replica has room")
        };
        assert_eq!(r.replica().key(), cold.key());
        drop(r);
        // 8,000 cached tokens save 0.8 s: it waits at the holder, in its
        // engine's queue, for the first slot to free (0.5 s).
        let Placement::Placed(first) = place(8000) else {
            panic!("the holder takes it past its cap")
        };
        assert_eq!(first.replica().key(), holder.key());
        assert_eq!(holder.load.requests(), 3);
        // A second one would wait for two completions (1 s), longer than
        // the prefill it saves: it goes to the cold replica.
        let Placement::Placed(second) = place(8000) else {
            panic!("the cold replica has room")
        };
        assert_eq!(second.replica().key(), cold.key());
        drop(second);
        drop(first);
        // While critical requests arrive, a request in the engine's queue
        // would delay them (no engine priority here): no pass.
        let c = ticket(Priority::Critical, "", 20, 5000);
        drop(adm.acquire(&pool, &holds(0), &req, &c, &[]).await.unwrap());
        let Placement::Placed(r) = place(8000) else {
            panic!("the cold replica has room")
        };
        assert_eq!(r.replica().key(), cold.key());
        drop(batch);
    }

    #[tokio::test]
    async fn a_request_goes_past_the_prefill_cap_to_its_prefix_holder_while_the_wait_is_shorter_than_the_prefill(
    ) {
        // A batch of 8: the request cap does not bind here. The prefill
        // cap is set by hand: the derived one holds only while critical
        // traffic is seen, and the pass only while none is (without
        // engine priority).
        let cap = 2000;
        let cfg = AdmissionConfig {
            budget: BudgetConfig {
                max_prefill_tokens_per_replica: Some(cap),
                ..Default::default()
            },
            ..Default::default()
        };
        let (pool, holder, cold, adm) = holder_and_cold_with(8, &cfg);
        // The holder has a prompt of its cap + 500 tokens pending in prefill.
        let pending = Budget::reserve(
            &holder,
            Cost {
                prompt: cap + 500,
                output: 10,
            },
            None,
        );
        assert_eq!(holder.load.prefill_tokens(), cap + 500);
        let holds = |cached| Holds {
            holder: "127.0.0.1:9100",
            cached,
        };
        let (t, req) = standard_9000_tokens();
        let place = |cached, queued| adm.try_place(&pool, &holds(cached), &req, &t, &[], queued);
        // 1,000 cached tokens: the holder's prefill past its cap (500 + the
        // 8,000 uncached) is longer than the 1,000 it saves: the request
        // prefills its whole prompt on the cold replica.
        let Placement::Placed(r) = place(1000, false) else {
            panic!("the cold replica has room")
        };
        assert_eq!(r.replica().key(), cold.key());
        drop(r);
        // 8,000 cached: 500 + 1,000 tokens past the cap wait less than the
        // 8,000 it saves: it goes to the holder, on arrival and on a queue
        // turn alike.
        for queued in [false, true] {
            let Placement::Placed(r) = place(8000, queued) else {
                panic!("the holder takes it past its prefill cap")
            };
            assert_eq!(r.replica().key(), holder.key(), "queued: {queued}");
            drop(r);
        }
        // While critical requests arrive (no engine priority), the prefill
        // cap keeps their TTFT: no pass.
        let c = ticket(Priority::Critical, "", 20, 5000);
        drop(adm.acquire(&pool, &holds(0), &req, &c, &[]).await.unwrap());
        let Placement::Placed(r) = place(8000, false) else {
            panic!("the cold replica has room")
        };
        assert_eq!(r.replica().key(), cold.key());
        drop(pending);
    }

    /// `n` standard requests admitted at once on a pool with room for them.
    async fn admitted_at_once(
        pool: &Arc<Pool>,
        adm: &Arc<PoolAdmission>,
        n: usize,
    ) -> Vec<Reservation> {
        let mut v = Vec::new();
        for _ in 0..n {
            let r = tokio::time::timeout(
                Duration::from_millis(20),
                acquire(pool, adm, ticket(Priority::Standard, "", 20, 5000)),
            )
            .await
            .expect("placed without waiting")
            .unwrap();
            v.push(r);
        }
        v
    }

    fn held(p: Priority, wait_ms: u64) -> Ticket {
        Ticket {
            wait_for_replica: true,
            ..ticket(p, "", 10, wait_ms)
        }
    }

    #[tokio::test]
    async fn scale_from_zero_holds_requests_and_ramps_up_the_cold_replica_in_band_order() {
        let (pool, adm) = setup(0, 1000);
        // Without the plan's leave to wait: refused at once, as before.
        let t0 = Instant::now();
        assert_eq!(
            acquire(&pool, &adm, ticket(Priority::Critical, "", 10, 5000))
                .await
                .unwrap_err(),
            AdmitError::NoReadyReplica
        );
        assert!(t0.elapsed() < Duration::from_millis(50));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, (p, label)) in [
            (Priority::Sheddable, "sheddable"),
            (Priority::Standard, "standard"),
            (Priority::Critical, "critical"),
            (Priority::Sheddable, "sheddable"),
            (Priority::Standard, "standard"),
            (Priority::Critical, "critical"),
        ]
        .into_iter()
        .enumerate()
        {
            tasks.push(spawn_waiter(
                &pool,
                &adm,
                held(p, 10_000),
                label,
                order.clone(),
            ));
            wait_queued(&adm, i + 1).await;
        }
        assert_eq!(adm.waiting_for_replica(), 6);
        // The first replica joins (the registry calls this on the pool's event).
        pool.apply(Update::Add(vec![Endpoint::from_url(
            "http://127.0.0.1:9150",
        )
        .unwrap()]));
        adm.members_changed(&pool.replicas());
        let replica = pool.replicas()[0].clone();
        assert!(replica.load.is_cold());
        let mut placed = Vec::new();
        for t in tasks.drain(..2) {
            placed.push(t);
        }
        // Tasks finish in any order; collect the two that the window lets in.
        wait_queued(&adm, 4).await;
        assert_eq!(replica.load.requests(), cold_start::INITIAL_WINDOW);
        assert_eq!(*order.lock().unwrap(), vec!["critical", "critical"]);
        // Their first bytes widen the window to four: the standards go.
        let mut rest = tasks;
        rest.extend(placed);
        let mut reservations = Vec::new();
        while reservations.len() < 2 {
            let i = rest.iter().position(|t| t.is_finished());
            match i {
                Some(i) => reservations.push(rest.remove(i).await.unwrap().unwrap()),
                None => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
        for r in reservations.iter_mut() {
            r.prefill_done();
        }
        wait_queued(&adm, 2).await;
        assert_eq!(
            *order.lock().unwrap(),
            vec!["critical", "critical", "standard", "standard"]
        );
        drop(reservations);
        wait_queued(&adm, 0).await;
        assert_eq!(adm.waiting_for_replica(), 0);
        assert_eq!(
            *order.lock().unwrap(),
            vec![
                "critical",
                "critical",
                "standard",
                "standard",
                "sheddable",
                "sheddable"
            ]
        );
        for t in rest {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_held_request_past_its_deadline_gets_503_and_the_hold_is_capped() {
        let (pool, _) = setup(0, 1000);
        let cfg = AdmissionConfig {
            queue: QueueConfig {
                max_waiting_when_empty: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let adm = Arc::new(PoolAdmission::new("p", &cfg));
        let t0 = Instant::now();
        let first = spawn_waiter(
            &pool,
            &adm,
            held(Priority::Standard, 80),
            "w",
            Arc::default(),
        );
        wait_queued(&adm, 1).await;
        // The cap: one more is refused at once.
        assert_eq!(
            acquire(&pool, &adm, held(Priority::Critical, 5000))
                .await
                .unwrap_err(),
            AdmitError::NoReadyReplica
        );
        let e = first.await.unwrap().unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(80));
        assert_eq!(e, AdmitError::NoReadyReplica, "still no replica: said so");
        let api = e.to_api_error("m", 1);
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.retry_after_secs, Some(1));
        assert_eq!((adm.queued(), adm.waiting_for_replica()), (0, 0));
    }

    #[tokio::test]
    async fn predicted_wait_past_deadline_refuses_at_once() {
        let (pool, adm) = setup(1, 100);
        // Teach the drain rate: 100 tokens released per ~100 ms = ~1000 tok/s.
        for _ in 0..3 {
            let r = acquire(&pool, &adm, ticket(Priority::Standard, "", 100, 1000))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(105)).await;
            drop(r);
        }
        let _hold = acquire(&pool, &adm, ticket(Priority::Standard, "", 100, 1000))
            .await
            .unwrap();
        let mut t = ticket(Priority::Standard, "", 100, 10);
        t.predict_wait = true;
        assert_eq!(
            acquire(&pool, &adm, t).await.unwrap_err(),
            AdmitError::WouldExceedDeadline
        );
        assert_eq!(adm.queued(), 0);
    }
}
