//! One simulated replica at run time: its engine behind a mutex (never held
//! across an await; steps are paced by `clock.rs`), fault state, the lifecycle
//! signals its listener and connections follow (`serve.rs`), and the
//! statistics tests read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use http::HeaderMap;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use super::config::{Faults, FleetConfig};
use super::engine::{Counters, Engine, EngineSnapshot};
use super::events::{CacheEvent, EventSink};

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lifecycle signals seen by the accept loop, connections and the scheduler.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Control {
    pub refuse: bool,
    pub crashed: bool,
    /// Bumped to cut every open connection (crash).
    pub kill_epoch: u64,
    pub shutdown: bool,
}

#[derive(Debug)]
pub(crate) struct FaultState {
    pub faults: Faults,
    /// `/health` is 503 and generation 503 until then (model load).
    pub ready_at: Instant,
    /// Generation requests since `crash_after` was set.
    pub counted: u64,
}

/// What a fault decision says about one generation request.
#[derive(Debug, PartialEq)]
pub(crate) enum FaultVerdict {
    Proceed { stall: bool },
    Loading,
    Error(u16),
    RateLimited,
    Crash,
}

/// A point-in-time view of a replica, for tests and the admin endpoint.
#[derive(Debug, Clone)]
pub struct ReplicaStats {
    pub index: usize,
    pub url: String,
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: u32,
    pub kv_blocks_total: u32,
    /// Blocks holding a cached prefix (in use or free).
    pub kv_blocks_cached: usize,
    /// Prompt tokens served from the prefix cache.
    pub prefix_cache_hits: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Generation requests that reached the engine.
    pub requests_received: u64,
    /// Generation requests that arrived at all (including faulted ones).
    pub generation_requests: u64,
    /// Every HTTP request, any endpoint.
    pub http_requests: u64,
    /// Sequences removed because their client went away.
    pub requests_aborted: u64,
    /// When each of those aborts happened.
    pub aborted_at: Vec<Instant>,
    /// Headers of the last generation request (e.g. `x-request-id`).
    pub last_request_headers: Option<HeaderMap>,
    pub resident_loras: Vec<String>,
    pub crashed: bool,
    pub counters: Counters,
}

/// One replica's shared state.
pub(crate) struct Replica {
    pub index: usize,
    pub addr: SocketAddr,
    pub cfg: Arc<FleetConfig>,
    pub engine: Mutex<Engine>,
    /// The fleet's step clock thread, unparked when work arrives.
    pub(crate) clock: OnceLock<std::thread::Thread>,
    pub(crate) faults: Mutex<FaultState>,
    pub(crate) control: watch::Sender<Control>,
    pub(crate) last_headers: Mutex<Option<HeaderMap>>,
    rng: Mutex<SmallRng>,
    next_id: AtomicU64,
    pub(crate) http_requests: AtomicU64,
    pub(crate) generation_requests: AtomicU64,
    pub created_unix: u64,
    /// Where the engine's cache changes go (KV events on).
    kv_sink: EventSink,
    /// KV-event batches to number and buffer but not send (a lossy link).
    pub(crate) kv_drop_next: AtomicU32,
    /// The KV-event publisher sends nothing and answers no replay.
    pub(crate) kv_silent: AtomicBool,
    /// Bound KV-event ports (publish, replay), once bound.
    pub(crate) kv_ports: OnceLock<(u16, Option<u16>)>,
}

impl Replica {
    pub(crate) fn new(
        index: usize,
        addr: SocketAddr,
        cfg: Arc<FleetConfig>,
        kv_sink: EventSink,
    ) -> Self {
        let faults = cfg.faults.clone();
        let ready_at = Instant::now() + cfg.wall_ms(faults.load_delay_ms);
        let control = Control {
            refuse: faults.refuse_connections,
            ..Control::default()
        };
        Replica {
            index,
            addr,
            engine: Mutex::new(Engine::with_events(
                cfg.params.clone(),
                kv_sink.clone(),
                cfg.lora_adapters.clone(),
            )),
            clock: OnceLock::new(),
            faults: Mutex::new(FaultState {
                faults,
                ready_at,
                counted: 0,
            }),
            control: watch::channel(control).0,
            last_headers: Mutex::new(None),
            rng: Mutex::new(SmallRng::seed_from_u64(
                cfg.seed ^ (index as u64).wrapping_mul(0x9e37_79b9),
            )),
            next_id: AtomicU64::new(1),
            http_requests: AtomicU64::new(0),
            generation_requests: AtomicU64::new(0),
            created_unix: unix_now(),
            kv_sink,
            kv_drop_next: AtomicU32::new(0),
            kv_silent: AtomicBool::new(false),
            kv_ports: OnceLock::new(),
            cfg,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tells the step clock there is work.
    pub(crate) fn poke(&self) {
        if let Some(t) = self.clock.get() {
            t.unpark();
        }
    }

    pub(crate) fn next_seq_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Still loading the model?
    pub(crate) fn loading(&self) -> bool {
        Instant::now() < lock(&self.faults).ready_at
    }

    /// Rolls the fault dice for one generation request.
    pub(crate) fn fault_verdict(&self, streaming: bool) -> FaultVerdict {
        let mut fs = lock(&self.faults);
        if let Some(n) = fs.faults.crash_after {
            fs.counted += 1;
            if fs.counted >= n {
                return FaultVerdict::Crash;
            }
        }
        if Instant::now() < fs.ready_at {
            return FaultVerdict::Loading;
        }
        let f = &fs.faults;
        if f.error_rate <= 0.0 && f.rate_limit_rate <= 0.0 && f.stall_rate <= 0.0 {
            return FaultVerdict::Proceed { stall: false };
        }
        let mut rng = lock(&self.rng);
        if f.error_rate > 0.0 && rng.random::<f64>() < f.error_rate {
            return FaultVerdict::Error(f.error_status.unwrap_or(500));
        }
        if f.rate_limit_rate > 0.0 && rng.random::<f64>() < f.rate_limit_rate {
            return FaultVerdict::RateLimited;
        }
        let stall = streaming && f.stall_rate > 0.0 && rng.random::<f64>() < f.stall_rate;
        FaultVerdict::Proceed { stall }
    }

    pub(crate) fn faults(&self) -> Faults {
        lock(&self.faults).faults.clone()
    }

    /// Replaces the fault settings (same as `POST /admin/faults`). A non-zero
    /// `load_delay_ms` starts a model load now; `crash_after` counts from now.
    pub(crate) fn set_faults(&self, faults: Faults) {
        {
            let mut fs = lock(&self.faults);
            fs.ready_at = Instant::now() + self.cfg.wall_ms(faults.load_delay_ms);
            fs.counted = 0;
            fs.faults = faults;
        }
        let refuse = lock(&self.faults).faults.refuse_connections;
        self.control.send_if_modified(|c| {
            let changed = c.refuse != refuse;
            c.refuse = refuse;
            changed
        });
    }

    /// Crashes the replica: every sequence fails, every connection is cut and the
    /// listener closes until [`Self::restart`].
    pub(crate) fn crash(&self) {
        // Cut connections first: a stream must end cut, not with an error event.
        self.control.send_modify(|c| {
            c.crashed = true;
            c.kill_epoch += 1;
        });
        lock(&self.engine).fail_all();
    }

    /// Brings a crashed replica back (empty cache, model load delay applies).
    pub(crate) fn restart(&self) {
        {
            let mut fs = lock(&self.faults);
            fs.faults.crash_after = None;
            fs.counted = 0;
            fs.ready_at = Instant::now() + self.cfg.wall_ms(fs.faults.load_delay_ms);
        }
        {
            let mut engine = lock(&self.engine);
            // The old cache's last events must not be numbered after the restart.
            if let Some(tx) = &self.kv_sink {
                let _ = tx.send(CacheEvent::Restarted);
            }
            *engine = Engine::with_events(
                self.cfg.params.clone(),
                self.kv_sink.clone(),
                self.cfg.lora_adapters.clone(),
            );
        }
        self.control.send_modify(|c| c.crashed = false);
    }

    pub(crate) fn is_crashed(&self) -> bool {
        self.control.borrow().crashed
    }

    /// Removes a sequence whose client disconnected.
    pub(crate) fn abort(&self, id: u64) {
        if lock(&self.engine).abort(id, Instant::now()) {
            tracing::debug!(
                replica = self.index,
                seq = id,
                "client went away: sequence aborted"
            );
        }
    }

    /// Every prefix hash the engine's cache holds.
    pub(crate) fn cached_hashes(&self) -> Vec<u64> {
        lock(&self.engine).cached_hashes()
    }

    pub(crate) fn snapshot(&self) -> EngineSnapshot {
        lock(&self.engine).snapshot()
    }

    pub(crate) fn stats(&self) -> ReplicaStats {
        let (s, aborted_at) = {
            let e = lock(&self.engine);
            (e.snapshot(), e.aborted_at.clone())
        };
        let c = s.counters;
        ReplicaStats {
            index: self.index,
            url: self.url(),
            running: s.running,
            waiting: s.waiting,
            kv_blocks_used: s.kv_blocks_used,
            kv_blocks_total: s.kv_blocks_total,
            kv_blocks_cached: s.kv_blocks_cached,
            prefix_cache_hits: c.prefix_cache_hits,
            prefix_cache_queries: c.prefix_cache_queries,
            requests_received: c.requests_received,
            generation_requests: self.generation_requests.load(Ordering::Relaxed),
            http_requests: self.http_requests.load(Ordering::Relaxed),
            requests_aborted: c.requests_aborted,
            aborted_at,
            last_request_headers: lock(&self.last_headers).clone(),
            resident_loras: s
                .resident_loras
                .iter()
                .filter_map(|i| self.cfg.lora_adapters.get(usize::from(*i)).cloned())
                .collect(),
            crashed: self.is_crashed(),
            counters: c,
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
