//! A pool: the replicas serving one model target, their live accounting, and
//! whether each can take a request.
//!
//! Membership changes arrive as [`Update`]s from discovery and are applied by
//! swapping an immutable snapshot (arc-swap), so the request path reads the
//! member list without a lock. A [`Replica`] object survives updates that keep
//! its key, so its counters are never reset while requests are in flight; a
//! removed replica stays alive through the `Arc`s its in-flight requests hold.
//! Every update that changes the members is also published on a watch channel
//! (`Pool::subscribe`): the scrape loops, the outlier prober and the admission
//! queue follow the pool through it instead of polling it, and a second
//! channel (`Pool::capacity_reported`) tells the queue when a replica's
//! reported KV capacity changed.
//!
//! The accounting is the gateway's own view of load, always current: requests in
//! flight, estimated tokens in flight and prefill tokens not yet answered. It is
//! changed only through [`LoadGuard`], which is released on every path (success,
//! error, timeout, client disconnect, panic unwinding) because it is a `Drop`.
//!
//! Whether a replica can take a request is decided here, in one place
//! (`RoutabilityCheck::of`), from what three checks found, all sent through
//! the pool's one HTTP client ([`Pool::client`]):
//! - discovery's gate (`discovery::gate`) admits an endpoint into the pool only
//!   once its first probe answered, so every member passed it;
//! - outlier detection (`admission::outlier`) ejects a failing replica until a
//!   health probe brings it back (`Routability::Ejected`);
//! - routing's scrape loops (`routing::scrape`) store its load signals, and
//!   signals that are missing or stale make its load unknown
//!   (`Routability::LoadUnknown`): it still takes requests, but pickers treat
//!   it as saturated.
//!
//! Admission places a request only on a replica that takes requests (not
//! ejected, not already tried by the request); the picker, among those,
//! prefers replicas whose load is known.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;

use infergate_protocol::EngineKind;

use crate::discovery::{Endpoint, ReplicaClient, Update};
use crate::routing::signals::Signals;

/// The gateway's own load counters for one replica.
#[derive(Debug, Default)]
pub struct ReplicaLoad {
    requests: AtomicU64,
    tokens: AtomicU64,
    prefill_tokens: AtomicU64,
    /// Requests ever started (monotonic): with `requests`, bounds how many of
    /// ours the engine can have counted during a scrape.
    started: AtomicU64,
    /// Requests that produced a first byte (monotonic).
    answered: AtomicU64,
    /// Joined a pool that had requests waiting for a replica: admission ramps
    /// it up slowly (`admission::cold_start`).
    cold: AtomicBool,
    /// Admission's pacing of queued non-critical starts
    /// (`admission::tuning::Pace`): when the next may start.
    pub(crate) next_start: AtomicU64,
    /// What each stream in flight holds in the engine's KV cache and may
    /// still add: admission projects the replica's KV peak from them
    /// (`admission::budget::kv_peak_within`). Locked only to add, remove or read
    /// the list, never across an await.
    streams: Mutex<Vec<Arc<StreamKv>>>,
}

/// One stream's share of its replica's KV cache, kept current by admission's
/// reservation as the stream reports tokens.
#[derive(Debug, Default)]
pub struct StreamKv {
    /// KV tokens held now: the uncached prompt plus the output so far.
    pub held: AtomicU64,
    /// Output tokens it may still add: `max_tokens` less the output so far.
    pub left: AtomicU64,
}

impl StreamKv {
    /// A stream holding `held` KV tokens that may add `left` more.
    pub fn new(held: u64, left: u64) -> Self {
        Self {
            held: AtomicU64::new(held),
            left: AtomicU64::new(left),
        }
    }

    /// The stream now holds `held` and may add `left` more.
    pub fn set(&self, held: u64, left: u64) {
        self.held.store(held, Ordering::Relaxed);
        self.left.store(left, Ordering::Relaxed);
    }
}

impl ReplicaLoad {
    /// Requests ever started on the replica.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
    /// Requests in flight.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Estimated tokens (prompt + expected output) of requests in flight.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }
    /// Uncached prompt tokens of requests that have not produced a first byte yet.
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Relaxed)
    }
    /// Requests that produced a first byte on the replica.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
    /// Whether the replica started cold (see `admission::cold_start`).
    pub fn is_cold(&self) -> bool {
        self.cold.load(Ordering::Relaxed)
    }
    /// Marks the replica cold (it joined while requests waited for one) or
    /// warm again.
    pub(crate) fn set_cold(&self, cold: bool) {
        self.cold.store(cold, Ordering::Relaxed);
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, Vec<Arc<StreamKv>>> {
        // A panic while holding the lock leaves the list whole (push and
        // swap_remove do not unwind half-way), so a poisoned lock is used as is.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream started on the replica.
    pub fn add_stream(&self, stream: Arc<StreamKv>) {
        self.streams().push(stream);
    }

    /// A stream ended.
    pub fn remove_stream(&self, stream: &Arc<StreamKv>) {
        let mut list = self.streams();
        if let Some(i) = list.iter().position(|s| Arc::ptr_eq(s, stream)) {
            list.swap_remove(i);
        }
    }

    /// Calls `f` with each stream's `(held, left)` tokens, under the list's lock.
    pub fn each_stream(&self, mut f: impl FnMut(u64, u64)) {
        for s in self.streams().iter() {
            f(
                s.held.load(Ordering::Relaxed),
                s.left.load(Ordering::Relaxed),
            );
        }
    }
}

/// One replica of a pool.
#[derive(Debug)]
pub struct Replica {
    pub endpoint: Endpoint,
    pub load: ReplicaLoad,
    /// The last scrape of the replica's `/metrics` (routing's scrape loop writes
    /// it; `None` until the first scrape: unknown, treated as saturated).
    pub signals: ArcSwapOption<Signals>,
    /// How long the replica took to become useful after it joined the pool.
    pub warmup: Warmup,
}

impl Replica {
    pub fn new(endpoint: Endpoint) -> Self {
        Replica {
            endpoint,
            load: ReplicaLoad::default(),
            signals: ArcSwapOption::empty(),
            warmup: Warmup::default(),
        }
    }

    pub fn key(&self) -> &str {
        &self.endpoint.key
    }

    /// Starts accounting one request: `tokens` is its estimated total cost,
    /// `prefill_tokens` the part of the prompt expected to be computed (not cached).
    pub fn begin(self: &Arc<Self>, tokens: u64, prefill_tokens: u64) -> LoadGuard {
        self.load.requests.fetch_add(1, Ordering::Relaxed);
        self.load.started.fetch_add(1, Ordering::Relaxed);
        self.load.tokens.fetch_add(tokens, Ordering::Relaxed);
        self.load
            .prefill_tokens
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        LoadGuard {
            replica: self.clone(),
            tokens,
            prefill_tokens,
            cached_tokens: 0,
            answered: false,
        }
    }
}

/// Holds one request's share of a replica's load; released on drop.
#[derive(Debug)]
pub struct LoadGuard {
    replica: Arc<Replica>,
    tokens: u64,
    prefill_tokens: u64,
    cached_tokens: u64,
    /// The first byte arrived.
    answered: bool,
}

impl LoadGuard {
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Prefill tokens this request still holds (0 once its first byte came).
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens
    }

    /// The first byte arrived: the prefill is done, release its share.
    /// Returns whether this was the first call (the request's first answer).
    pub fn prefill_done(&mut self) -> bool {
        if std::mem::replace(&mut self.answered, true) {
            return false;
        }
        self.replica.load.answered.fetch_add(1, Ordering::Relaxed);
        let p = std::mem::take(&mut self.prefill_tokens);
        if p > 0 {
            self.replica
                .load
                .prefill_tokens
                .fetch_sub(p, Ordering::Relaxed);
        }
        true
    }

    /// Replaces the estimate with a better one (for example once the stream
    /// reports usage, or when it grew past the estimate).
    pub fn set_tokens(&mut self, tokens: u64) {
        let load = &self.replica.load.tokens;
        if tokens > self.tokens {
            load.fetch_add(tokens - self.tokens, Ordering::Relaxed);
        } else {
            load.fetch_sub(self.tokens - tokens, Ordering::Relaxed);
        }
        self.tokens = tokens;
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Prompt tokens the picker expects the replica to have cached already
    /// (shared with other requests, so not new KV for this one).
    pub fn cached_tokens(&self) -> u64 {
        self.cached_tokens
    }

    /// Sets [`cached_tokens`](Self::cached_tokens) (prefix-aware pickers).
    pub fn with_cached_tokens(mut self, tokens: u64) -> Self {
        self.cached_tokens = tokens;
        self
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let load = &self.replica.load;
        load.requests.fetch_sub(1, Ordering::Relaxed);
        load.tokens.fetch_sub(self.tokens, Ordering::Relaxed);
        load.prefill_tokens
            .fetch_sub(self.prefill_tokens, Ordering::Relaxed);
    }
}

/// Model loading and warm-up as the gateway sees it: from the replica joining
/// the pool (its endpoint appeared, or passed the discovery gate) to its first
/// successful `/metrics` scrape and to the first token it served. Each is set
/// once; later scrapes and tokens cost one atomic load.
#[derive(Debug)]
pub struct Warmup {
    appeared: Instant,
    first_scrape: OnceLock<Duration>,
    first_token: OnceLock<Duration>,
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup {
            appeared: Instant::now(),
            first_scrape: OnceLock::new(),
            first_token: OnceLock::new(),
        }
    }
}

impl Warmup {
    /// A scrape succeeded (the first one sets the figure).
    pub fn scraped(&self) {
        if self.first_scrape.get().is_none() {
            let _ = self.first_scrape.set(self.appeared.elapsed());
        }
    }

    /// A first token came back from the replica.
    pub fn token_served(&self) {
        if self.first_token.get().is_none() {
            let _ = self.first_token.set(self.appeared.elapsed());
        }
    }

    /// Time since the replica joined the pool.
    pub fn age(&self) -> Duration {
        self.appeared.elapsed()
    }

    /// From joining to the first successful scrape, once it happened.
    pub fn first_scrape(&self) -> Option<Duration> {
        self.first_scrape.get().copied()
    }

    /// From joining to the first token served, once it happened.
    pub fn first_token(&self) -> Option<Duration> {
        self.first_token.get().copied()
    }
}

/// Whether a replica can take a new request, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routability {
    /// Takes requests, and its load is known (fresh signals, or load is not
    /// judged).
    Routable,
    /// Takes requests, but its load is unknown (never scraped, or its last
    /// good scrape is stale): pickers treat it as saturated.
    LoadUnknown,
    /// Ejected by outlier detection until a health probe brings it back.
    Ejected,
    /// Already tried by this request: a retry never goes back to it.
    Excluded,
}

impl Routability {
    /// Whether a request may be placed on the replica.
    pub(crate) fn takes_requests(self) -> bool {
        matches!(self, Routability::Routable | Routability::LoadUnknown)
    }
}

/// What one routing decision judges a pool's members against: the pool's
/// ejected replicas, the replicas the request already tried and, when load
/// is judged, how old signals may be. The one place routability is decided.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoutabilityCheck<'a> {
    ejected: &'a [Arc<str>],
    exclude: &'a [Arc<str>],
    /// `(now, stale_after)` when signals are judged.
    freshness: Option<(Instant, Duration)>,
}

impl<'a> RoutabilityCheck<'a> {
    /// Judges ejection (the keys outlier detection ejected) and exclusion.
    pub(crate) fn new(ejected: &'a [Arc<str>], exclude: &'a [Arc<str>]) -> Self {
        RoutabilityCheck {
            ejected,
            exclude,
            freshness: None,
        }
    }

    /// Also judges load signals: older than `stale_after` at `now` (or
    /// missing, or failed) is [`Routability::LoadUnknown`]. For a pool whose
    /// replicas are scraped.
    pub(crate) fn judging_signals(self, now: Instant, stale_after: Duration) -> Self {
        RoutabilityCheck {
            freshness: Some((now, stale_after)),
            ..self
        }
    }

    /// The routability of `replica`.
    pub(crate) fn of(&self, replica: &Replica) -> Routability {
        match self.freshness {
            None => self.of_with_signals(replica, None),
            Some(_) => self.of_with_signals(replica, replica.signals.load().as_deref()),
        }
    }

    /// [`of`](Self::of), with the replica's signals already loaded (a picker
    /// reads them anyway).
    pub(crate) fn of_with_signals(
        &self,
        replica: &Replica,
        signals: Option<&Signals>,
    ) -> Routability {
        let key = replica.key();
        if self.exclude.iter().any(|e| **e == *key) {
            return Routability::Excluded;
        }
        if self.ejected.iter().any(|e| **e == *key) {
            return Routability::Ejected;
        }
        match self.freshness {
            Some((now, stale_after)) if !signals.is_some_and(|s| s.is_fresh(now, stale_after)) => {
                Routability::LoadUnknown
            }
            _ => Routability::Routable,
        }
    }

    /// Whether any of `replicas` takes requests.
    pub(crate) fn any_takes_requests(&self, replicas: &[Arc<Replica>]) -> bool {
        replicas.iter().any(|r| self.of(r).takes_requests())
    }
}

/// A pool's members: one immutable snapshot, shared by the request path and
/// the pool's followers.
pub type Members = Arc<Vec<Arc<Replica>>>;

/// The replicas of one target.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub engine: EngineKind,
    /// Read by the request path (lock-free); written only inside `membership`'s
    /// send, which serialises updates and keeps both the same snapshot.
    members: ArcSwap<Vec<Arc<Replica>>>,
    /// The members, published to followers on every change.
    membership: watch::Sender<Members>,
    /// Counts changes of a replica's reported KV capacity (and first scrapes).
    capacity: watch::Sender<u64>,
    /// Scrape supervisors running for the pool (while one runs, a new
    /// member's load is unknown until its first scrape).
    scrapers: AtomicU32,
    /// The engines schedule by the request's priority (`engine_priority` in
    /// the pool's config; set on each config load).
    engine_priority: AtomicBool,
    client: ReplicaClient,
    /// Replicas that left the pool (discovery removed them: terminating, not
    /// ready, gone) while they may still serve requests: [`Pool::draining`].
    /// Locked on membership changes and status reads, never per request.
    departed: Mutex<Vec<Weak<Replica>>>,
}

impl Pool {
    pub fn new(name: impl Into<Arc<str>>, engine: EngineKind) -> Self {
        Pool {
            name: name.into(),
            engine,
            members: ArcSwap::from_pointee(Vec::new()),
            membership: watch::Sender::new(Members::default()),
            capacity: watch::Sender::new(0),
            scrapers: AtomicU32::new(0),
            engine_priority: AtomicBool::new(false),
            client: ReplicaClient::default(),
            departed: Mutex::new(Vec::new()),
        }
    }

    /// The current members (a cheap snapshot; never blocks).
    pub fn replicas(&self) -> Members {
        self.members.load_full()
    }

    /// Follows the members: the receiver sees every update that changed them.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Members> {
        self.membership.subscribe()
    }

    /// The client the pool's replica checks (gate, scrape, health probes) share.
    pub fn client(&self) -> &ReplicaClient {
        &self.client
    }

    /// A replica's reported KV capacity changed (the scraper calls this):
    /// admission's budget may have room it did not have.
    pub(crate) fn capacity_reported(&self) {
        self.capacity.send_modify(|n| *n += 1);
    }

    /// Whether the members' `/metrics` are scraped (set by the scrape supervisor).
    pub fn is_scraped(&self) -> bool {
        self.scrapers.load(Ordering::Relaxed) > 0
    }

    /// Whether the engines schedule by priority and preempt for a higher
    /// band (admission then lets critical requests into their queues).
    pub fn engine_priority(&self) -> bool {
        self.engine_priority.load(Ordering::Relaxed)
    }

    /// Sets [`Pool::engine_priority`] from the pool's config.
    pub fn set_engine_priority(&self, on: bool) {
        self.engine_priority.store(on, Ordering::Relaxed);
    }

    /// A scrape supervisor started (`true`) or stopped (`false`).
    pub(crate) fn scraper_running(&self, running: bool) {
        if running {
            self.scrapers.fetch_add(1, Ordering::Relaxed);
        } else {
            self.scrapers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Follows capacity reports (see [`Pool::capacity_reported`]).
    pub(crate) fn watch_capacity(&self) -> watch::Receiver<u64> {
        self.capacity.subscribe()
    }

    /// Applies a discovery update and publishes the members when they
    /// changed. Replicas whose key is kept keep their state.
    pub fn apply(&self, update: Update) {
        self.membership.send_if_modified(|published| {
            let next = next_members(published, &update);
            let unchanged = next.len() == published.len()
                && next
                    .iter()
                    .zip(published.iter())
                    .all(|(a, b)| Arc::ptr_eq(a, b));
            if unchanged {
                return false;
            }
            let gone = published
                .iter()
                .filter(|r| !next.iter().any(|n| Arc::ptr_eq(n, r)))
                .map(Arc::downgrade);
            self.lock_departed().extend(gone);
            let next = Arc::new(next);
            self.members.store(next.clone());
            *published = next;
            true
        });
    }

    /// Replicas no longer in the pool that still serve requests they took
    /// before they left (the status page shows them as draining). Each is
    /// forgotten once its last request ended.
    pub fn draining(&self) -> Vec<Arc<Replica>> {
        let mut departed = self.lock_departed();
        let mut draining = Vec::new();
        departed.retain(|w| match w.upgrade() {
            Some(r) if r.load.requests() > 0 => {
                draining.push(r);
                true
            }
            _ => false,
        });
        draining
    }

    fn lock_departed(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Replica>>> {
        self.departed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The members after `update` is applied to `current`.
fn next_members(current: &[Arc<Replica>], update: &Update) -> Vec<Arc<Replica>> {
    let by_key: HashMap<&str, &Arc<Replica>> = current.iter().map(|r| (r.key(), r)).collect();
    let keep_or_new = |e: &Endpoint| match by_key.get(&*e.key) {
        Some(r) if r.endpoint == *e => Arc::clone(r),
        _ => Arc::new(Replica::new(e.clone())),
    };
    match update {
        Update::Reset(eps) => {
            let mut seen = HashSet::new();
            eps.iter()
                .filter(|e| seen.insert(e.key.clone()))
                .map(keep_or_new)
                .collect()
        }
        Update::Add(eps) => {
            let mut next: Vec<Arc<Replica>> = current.to_vec();
            for e in eps {
                match next.iter().position(|r| r.key() == &*e.key) {
                    Some(i) if next[i].endpoint == *e => {}
                    Some(i) => next[i] = Arc::new(Replica::new(e.clone())),
                    None => next.push(Arc::new(Replica::new(e.clone()))),
                }
            }
            next
        }
        Update::Remove(keys) => current
            .iter()
            .filter(|r| !keys.iter().any(|k| **k == *r.key()))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::from_url(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    #[test]
    fn updates_keep_replica_state() {
        let pool = Pool::new("p", EngineKind::Vllm);
        pool.apply(Update::Reset(vec![ep(1), ep(2), ep(2)]));
        assert_eq!(pool.replicas().len(), 2);
        let r1 = pool.replicas()[0].clone();
        let guard = r1.begin(100, 40);
        pool.apply(Update::Add(vec![ep(3), ep(1)]));
        assert_eq!(pool.replicas().len(), 3);
        assert!(Arc::ptr_eq(&pool.replicas()[0], &r1));
        assert_eq!(pool.replicas()[0].load.requests(), 1);
        pool.apply(Update::Remove(vec![r1.endpoint.key.clone()]));
        assert_eq!(pool.replicas().len(), 2);
        // The removed replica is still accounted until its request ends,
        // and draining meanwhile.
        assert_eq!(r1.load.tokens(), 100);
        let draining = pool.draining();
        assert_eq!(draining.len(), 1);
        assert!(Arc::ptr_eq(&draining[0], &r1));
        drop(draining);
        drop(guard);
        assert_eq!(r1.load.tokens(), 0);
        assert!(pool.draining().is_empty());
        // A replica removed idle is not draining.
        pool.apply(Update::Remove(vec![pool.replicas()[0]
            .endpoint
            .key
            .clone()]));
        assert!(pool.draining().is_empty());
        pool.apply(Update::Reset(vec![ep(2)]));
        assert_eq!(pool.replicas().len(), 1);
    }

    #[test]
    fn changes_are_published_and_no_ops_are_not() {
        let pool = Pool::new("p", EngineKind::Vllm);
        let mut rx = pool.subscribe();
        pool.apply(Update::Reset(vec![ep(1), ep(2)]));
        assert!(rx.has_changed().unwrap());
        let m = rx.borrow_and_update().clone();
        assert!(Arc::ptr_eq(&m, &pool.replicas()), "one snapshot");
        // Reordered: a change. The same members again (a relist, a reload of
        // the same file): silent.
        pool.apply(Update::Reset(vec![ep(2), ep(1)]));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        pool.apply(Update::Reset(vec![ep(2), ep(1)]));
        pool.apply(Update::Add(vec![ep(1)]));
        pool.apply(Update::Remove(vec!["127.0.0.1:9".into()]));
        assert!(!rx.has_changed().unwrap());
        pool.apply(Update::Remove(vec![ep(1).key]));
        assert_eq!(rx.borrow_and_update().len(), 1);

        let cap = pool.watch_capacity();
        assert!(!cap.has_changed().unwrap());
        pool.capacity_reported();
        assert!(cap.has_changed().unwrap());
    }

    #[test]
    fn routability_is_decided_in_one_place() {
        let (a, b, c) = (
            Replica::new(ep(1)),
            Replica::new(ep(2)),
            Replica::new(ep(3)),
        );
        let now = Instant::now();
        c.signals
            .store(Some(Arc::new(Signals::failed(now, "down".to_string()))));
        let ejected = [b.endpoint.key.clone()];
        let exclude = [a.endpoint.key.clone()];
        let check = RoutabilityCheck::new(&ejected, &exclude);
        assert_eq!(check.of(&a), Routability::Excluded);
        assert_eq!(check.of(&b), Routability::Ejected);
        assert_eq!(check.of(&c), Routability::Routable, "load not judged");
        let judged = RoutabilityCheck::new(&[], &[]).judging_signals(now, Duration::from_secs(1));
        assert_eq!(judged.of(&a), Routability::LoadUnknown, "never scraped");
        assert_eq!(judged.of(&c), Routability::LoadUnknown, "failed scrape");
        let fresh = crate::routing::signals::parse(
            EngineKind::Vllm,
            "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.1\n",
            now,
        );
        assert_eq!(
            judged.of_with_signals(&c, Some(&fresh)),
            Routability::Routable
        );
        assert!(Routability::LoadUnknown.takes_requests());
        assert!(!Routability::Ejected.takes_requests() && !Routability::Excluded.takes_requests());
        let members = [Arc::new(a), Arc::new(b)];
        assert!(!check.any_takes_requests(&members));
        assert!(RoutabilityCheck::new(&ejected, &[]).any_takes_requests(&members));
    }

    #[test]
    fn guard_releases_on_every_path() {
        let r = Arc::new(Replica::new(ep(1)));
        {
            let mut g = r.begin(10, 8);
            assert_eq!(r.load.prefill_tokens(), 8);
            g.prefill_done();
            assert_eq!(r.load.prefill_tokens(), 0);
            g.set_tokens(25);
            assert_eq!(r.load.tokens(), 25);
            g.set_tokens(5);
            assert_eq!(r.load.tokens(), 5);
        }
        assert_eq!(
            (r.load.requests(), r.load.tokens(), r.load.prefill_tokens()),
            (0, 0, 0)
        );
        let r2 = r.clone();
        let res = std::panic::catch_unwind(move || {
            let _g = r2.begin(7, 7);
            panic!("boom");
        });
        assert!(res.is_err());
        assert_eq!((r.load.requests(), r.load.tokens()), (0, 0));
    }
}
