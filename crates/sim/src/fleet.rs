//! Starting and stopping a fleet of replicas in-process: the library API used
//! by `infergate sim`, `infergate quickstart` and tests.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::clock::Clock;
use super::config::{Faults, FleetConfig};
use super::error::SimError;
use super::publish;
use super::replica::{Replica, ReplicaStats};
use super::serve::accept_loop;

/// A running fleet. Dropping it without [`Fleet::shutdown`] also stops it
/// (its tasks end when they see the control channels close).
pub struct Fleet {
    replicas: Vec<ReplicaHandle>,
    clock: Clock,
    tasks: Vec<JoinHandle<()>>,
}

/// Control and inspection of one replica.
#[derive(Clone)]
pub struct ReplicaHandle {
    inner: Arc<Replica>,
}

impl std::fmt::Debug for ReplicaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHandle")
            .field("index", &self.inner.index)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl ReplicaHandle {
    pub fn index(&self) -> usize {
        self.inner.index
    }
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.inner.url()
    }
    pub fn stats(&self) -> ReplicaStats {
        self.inner.stats()
    }
    pub fn faults(&self) -> Faults {
        self.inner.faults()
    }
    /// Same as `POST /admin/faults`.
    pub fn set_faults(&self, faults: Faults) {
        self.inner.set_faults(faults)
    }
    /// Crashes now: in-flight requests fail, connections are cut, the port refuses.
    pub fn crash(&self) {
        self.inner.crash()
    }
    /// Restarts after a crash (empty cache; the model load delay applies).
    pub fn restart(&self) {
        self.inner.restart()
    }
    /// The bound KV-event ports (publish, replay) when events are on.
    pub fn kv_event_ports(&self) -> Option<(u16, Option<u16>)> {
        self.inner.kv_ports.get().copied()
    }
    /// Every prefix hash the replica's cache holds (what its KV events describe).
    pub fn cached_block_hashes(&self) -> Vec<u64> {
        self.inner.cached_hashes()
    }
    /// Numbers and buffers the next `n` KV-event batches without sending
    /// them (a lossy link: the subscriber sees a gap and must replay).
    pub fn drop_next_kv_events(&self, n: u32) {
        self.inner
            .kv_drop_next
            .store(n, std::sync::atomic::Ordering::Release);
    }
    /// While true the KV-event publisher sends nothing and answers no replay
    /// (events are still numbered and buffered, as behind a partition).
    pub fn set_kv_events_silent(&self, silent: bool) {
        self.inner
            .kv_silent
            .store(silent, std::sync::atomic::Ordering::Release);
    }
}

impl Fleet {
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(ReplicaHandle::url).collect()
    }
    pub fn len(&self) -> usize {
        self.replicas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }
    /// Replica `i`. Panics if out of range, like slice indexing.
    pub fn replica(&self, i: usize) -> &ReplicaHandle {
        &self.replicas[i]
    }
    pub fn replicas(&self) -> &[ReplicaHandle] {
        &self.replicas
    }

    /// Stops every replica and waits for their tasks.
    pub async fn shutdown(mut self) {
        for r in &self.replicas {
            r.inner.control.send_modify(|c| c.shutdown = true);
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.clock.stop_and_join();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for r in &self.replicas {
            r.inner.control.send_modify(|c| c.shutdown = true);
        }
        self.clock.stop();
    }
}

/// Validates a config before anything is bound.
fn validate(cfg: &FleetConfig) -> Result<(), SimError> {
    let p = &cfg.params;
    let bad = |m: &str| Err(SimError::Config(m.to_owned()));
    if cfg.replicas == 0 {
        return bad("replicas must be at least 1");
    }
    if !(cfg.time_scale > 0.0 && cfg.time_scale.is_finite()) {
        return bad("time scale must be a positive number");
    }
    if p.block_size == 0
        || p.num_gpu_blocks == 0
        || p.max_num_seqs == 0
        || p.max_num_batched_tokens == 0
    {
        return bad(
            "block_size, num_gpu_blocks, max_num_seqs and max_num_batched_tokens must be positive",
        );
    }
    if p.max_model_len < 2 {
        return bad("max_model_len must be at least 2");
    }
    if cfg.lora_adapters.len() > usize::from(u16::MAX) {
        return bad("too many LoRA adapters");
    }
    if cfg.base_port != 0 && usize::from(cfg.base_port) + cfg.replicas > 65_536 {
        return bad("base port + replicas exceeds 65535");
    }
    Ok(())
}

/// Starts `cfg.replicas` replicas, each with its own listener and state.
pub async fn start_fleet(cfg: FleetConfig) -> Result<Fleet, SimError> {
    validate(&cfg)?;
    let cfg = Arc::new(cfg);
    let mut replicas = Vec::with_capacity(cfg.replicas);
    let mut tasks = Vec::with_capacity(cfg.replicas * 2);
    for i in 0..cfg.replicas {
        let port = if cfg.base_port == 0 {
            0
        } else {
            cfg.base_port + i as u16
        };
        let want = SocketAddr::new(cfg.host, port);
        let listener = TcpListener::bind(want)
            .await
            .map_err(|source| SimError::Bind { addr: want, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SimError::Bind { addr: want, source })?;
        let (sink, events) = match &cfg.kv_events {
            Some(ev) => {
                let sockets = publish::bind(ev, cfg.host, i)
                    .await
                    .map_err(|e| SimError::Config(format!("kv events: {e}")))?;
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some((ev.clone(), sockets, rx)))
            }
            None => (None, None),
        };
        let rep = Arc::new(Replica::new(i, addr, cfg.clone(), sink));
        if let Some((ev, sockets, rx)) = events {
            let _ = rep.kv_ports.set((sockets.port, sockets.replay_port));
            tasks.push(tokio::spawn(publish::run(rep.clone(), ev, sockets, rx)));
        }
        tasks.push(tokio::spawn(accept_loop(rep.clone(), listener)));
        replicas.push(ReplicaHandle { inner: rep });
    }
    let clock = Clock::start(replicas.iter().map(|r| r.inner.clone()).collect())
        .map_err(|e| SimError::Config(format!("cannot start the step clock thread: {e}")))?;
    for r in &replicas {
        let _ = r.inner.clock.set(clock.thread());
    }
    Ok(Fleet {
        replicas,
        clock,
        tasks,
    })
}
