//! A pool: the replicas serving one model target, and their live accounting.
//!
//! Membership changes arrive as [`Update`]s from discovery and are applied by
//! swapping an immutable snapshot (arc-swap), so the request path reads the
//! member list without a lock. A [`Replica`] object survives updates that keep
//! its key, so its counters are never reset while requests are in flight; a
//! removed replica stays alive through the `Arc`s its in-flight requests hold.
//!
//! The accounting is the gateway's own view of load, always current: requests in
//! flight, estimated tokens in flight and prefill tokens not yet answered. It is
//! changed only through [`LoadGuard`], which is released on every path (success,
//! error, timeout, client disconnect, panic unwinding) because it is a `Drop`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use infergate_protocol::EngineKind;

use crate::discovery::{Endpoint, Update};
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
}

/// One replica of a pool.
#[derive(Debug)]
pub struct Replica {
    pub endpoint: Endpoint,
    pub load: ReplicaLoad,
    /// The last scrape of the replica's `/metrics` (routing's scrape loop writes
    /// it; `None` until the first scrape: unknown, treated as saturated).
    pub signals: ArcSwapOption<Signals>,
}

impl Replica {
    pub fn new(endpoint: Endpoint) -> Self {
        Replica {
            endpoint,
            load: ReplicaLoad::default(),
            signals: ArcSwapOption::empty(),
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
    pub fn prefill_done(&mut self) {
        let p = std::mem::take(&mut self.prefill_tokens);
        if p > 0 {
            self.replica
                .load
                .prefill_tokens
                .fetch_sub(p, Ordering::Relaxed);
        }
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

/// The replicas of one target.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub engine: EngineKind,
    members: ArcSwap<Vec<Arc<Replica>>>,
}

impl Pool {
    pub fn new(name: impl Into<Arc<str>>, engine: EngineKind) -> Self {
        Pool {
            name: name.into(),
            engine,
            members: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// The current members (a cheap snapshot; never blocks).
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.members.load_full()
    }

    /// Applies a discovery update. Replicas whose key is kept keep their state.
    pub fn apply(&self, update: Update) {
        self.members.rcu(|current| {
            let by_key: HashMap<&str, &Arc<Replica>> =
                current.iter().map(|r| (r.key(), r)).collect();
            let keep_or_new = |e: &Endpoint| match by_key.get(&*e.key) {
                Some(r) if r.endpoint == *e => Arc::clone(r),
                _ => Arc::new(Replica::new(e.clone())),
            };
            match &update {
                Update::Reset(eps) => {
                    let mut seen = std::collections::HashSet::new();
                    eps.iter()
                        .filter(|e| seen.insert(e.key.clone()))
                        .map(keep_or_new)
                        .collect::<Vec<_>>()
                }
                Update::Add(eps) => {
                    let mut next: Vec<Arc<Replica>> = current.iter().cloned().collect();
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
        });
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
        // The removed replica is still accounted until its request ends.
        assert_eq!(r1.load.tokens(), 100);
        drop(guard);
        assert_eq!(r1.load.tokens(), 0);
        pool.apply(Update::Reset(vec![ep(2)]));
        assert_eq!(pool.replicas().len(), 1);
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
