//! The scrape loops: one task per replica polls its `/metrics` on its own
//! interval with its own timeout (through the pool's shared replica client) and
//! stores the parsed [`Signals`] in the replica (lock-free, arc-swap). A failed
//! scrape keeps the last good signals until they are older than
//! `stale_after_ms`, then stores the failure (the replica's load is then
//! unknown, see `pool::Routability`). A change of a replica's reported KV
//! capacity (or its first scrape) is told to the pool
//! (`Pool::capacity_reported`), so admission's queue can use it. A supervisor follows the pool's membership channel: on
//! each change it starts a loop for each new replica, stops the loops of
//! removed ones and tells the pickers to forget them. Dropping the
//! [`ScrapeHandle`] stops everything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::config::ScrapeConfig;
use super::kv_events::{self, KvEventsHandle, PreciseIndex};
use super::signals::{self, Signals};
use super::Picker;

use crate::discovery::probe::{BodyUse, ReplicaClient};
use crate::pool::{Pool, Replica};

/// Largest `/metrics` body read (a vLLM body is a few tens of kB).
const MAX_BODY: usize = 4 << 20;

/// The pickers routing over a pool (told when replicas leave); replaced on reload.
pub(crate) type PickerSet = Arc<ArcSwap<Vec<Arc<dyn Picker>>>>;

/// Stops the pool's scrape loops when dropped.
#[derive(Debug)]
pub(crate) struct ScrapeHandle {
    supervisor: JoinHandle<()>,
    pool: Arc<Pool>,
}

impl Drop for ScrapeHandle {
    fn drop(&mut self) {
        self.supervisor.abort();
        self.pool.scraper_running(false);
    }
}

/// Starts scraping `pool`'s replicas (must be called inside a tokio runtime).
/// Returns `None` when scraping is disabled.
pub(crate) fn spawn(
    pool: Arc<Pool>,
    cfg: ScrapeConfig,
    pickers: PickerSet,
) -> Option<ScrapeHandle> {
    if !cfg.enabled {
        return None;
    }
    pool.scraper_running(true);
    let supervisor = tokio::spawn(supervise(pool.clone(), cfg, pickers));
    Some(ScrapeHandle { supervisor, pool })
}

/// A pool to scrape, its scrape config and the pickers routing over it.
pub(crate) type PoolScrape = (Arc<Pool>, ScrapeConfig, Vec<Arc<dyn Picker>>);

/// The scrape loops of every pool of a gateway, kept across config reloads.
#[derive(Debug, Default)]
pub struct Scrapers {
    by_pool: HashMap<Arc<str>, PoolScraper>,
}

#[derive(Debug)]
struct PoolScraper {
    pool: Arc<Pool>,
    cfg: ScrapeConfig,
    pickers: PickerSet,
    _handle: Option<ScrapeHandle>,
    /// The KV-event subscribers feeding each picker's precise index.
    kv: Vec<(Arc<PreciseIndex>, KvEventsHandle)>,
}

impl Scrapers {
    /// Makes the running scrapers match `pools` (each with its scrape config and
    /// the pickers routing over it): starts new ones, restarts changed ones, stops
    /// removed ones. Without a tokio runtime nothing is started (replicas then
    /// stay unknown and routing falls back to the gateway's own accounting).
    pub fn sync(&mut self, pools: Vec<PoolScrape>) {
        let runtime = tokio::runtime::Handle::try_current().is_ok();
        let mut next = HashMap::new();
        for (pool, cfg, pickers) in pools {
            let name = pool.name.clone();
            match self.by_pool.remove(&name) {
                Some(mut s) if Arc::ptr_eq(&s.pool, &pool) && s.cfg == cfg => {
                    s.kv = sync_kv_events(&pool, &pickers, std::mem::take(&mut s.kv), runtime);
                    s.pickers.store(Arc::new(pickers));
                    next.insert(name, s);
                }
                _ => {
                    let set: PickerSet = Arc::new(ArcSwap::from_pointee(pickers));
                    let handle = if runtime {
                        spawn(pool.clone(), cfg.clone(), set.clone())
                    } else {
                        None
                    };
                    let kv = sync_kv_events(&pool, &set.load(), Vec::new(), runtime);
                    next.insert(
                        name,
                        PoolScraper {
                            pool,
                            cfg,
                            pickers: set,
                            _handle: handle,
                            kv,
                        },
                    );
                }
            }
        }
        self.by_pool = next;
    }
}

/// The KV-event subscribers for `pickers`' precise indexes: the running ones
/// kept (same index object), new ones started, the others stopped.
fn sync_kv_events(
    pool: &Arc<Pool>,
    pickers: &[Arc<dyn Picker>],
    mut running: Vec<(Arc<PreciseIndex>, KvEventsHandle)>,
    runtime: bool,
) -> Vec<(Arc<PreciseIndex>, KvEventsHandle)> {
    let mut next = Vec::new();
    for (index, cfg) in pickers.iter().filter_map(|p| p.kv_events()) {
        match running.iter().position(|(i, _)| Arc::ptr_eq(i, &index)) {
            Some(at) => next.push(running.swap_remove(at)),
            None if runtime => {
                let handle = kv_events::follow_pool(pool.clone(), index.clone(), cfg);
                next.push((index, handle));
            }
            None => {}
        }
    }
    next
}

/// Aborts the replica loops it owns when the supervisor itself is aborted.
struct Loops(HashMap<Arc<str>, (Arc<Replica>, JoinHandle<()>)>);

impl Drop for Loops {
    fn drop(&mut self) {
        for (_, (_, h)) in self.0.drain() {
            h.abort();
        }
    }
}

async fn supervise(pool: Arc<Pool>, cfg: ScrapeConfig, pickers: PickerSet) {
    let mut loops = Loops(HashMap::new());
    let mut membership = pool.subscribe();
    loop {
        let current = membership.borrow_and_update().clone();
        // Stop loops of replicas that left (or were replaced by a new object).
        loops.0.retain(|key, (r, h)| {
            let kept = current
                .iter()
                .any(|c| Arc::ptr_eq(c, r) && c.key() == &**key);
            if !kept {
                h.abort();
            }
            kept
        });
        for r in current.iter() {
            if !loops.0.contains_key(r.key()) {
                let h = tokio::spawn(scrape_loop(r.clone(), pool.clone(), cfg.clone()));
                loops.0.insert(r.endpoint.key.clone(), (r.clone(), h));
            }
        }
        for p in pickers.load().iter() {
            p.forget_absent(&current);
        }
        // The pool owns the sender, and this task holds the pool: it never closes.
        if membership.changed().await.is_err() {
            return;
        }
    }
}

async fn scrape_loop(replica: Arc<Replica>, pool: Arc<Pool>, cfg: ScrapeConfig) {
    let Some(uri) = ReplicaClient::uri(&replica.endpoint, &cfg.path) else {
        replica.signals.store(Some(Arc::new(Signals::failed(
            Instant::now(),
            format!("bad metrics URL {}{}", replica.endpoint.base_url, cfg.path),
        ))));
        return;
    };
    let client = pool.client();
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let stale_after = Duration::from_millis(cfg.stale_after_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        // Ours the engine can count in this scrape: in flight now, plus any
        // started while the scrape is on its way.
        let (in_flight, begun) = (replica.load.requests(), replica.load.started());
        let signals = match fetch(client, uri.clone(), timeout).await {
            Ok(body) => signals::parse(pool.engine, &body, started),
            Err(e) => Signals::failed(started, e),
        };
        let previous = replica.signals.load_full();
        if let Some(e) = &signals.error {
            tracing::debug!(replica = %replica.key(), error = %e, "metrics scrape failed");
            // One slow or failed scrape does not flip routing: the last good
            // signals stand until they are stale (then the replica is unknown).
            if previous
                .as_ref()
                .is_some_and(|p| p.is_fresh(started, stale_after))
            {
                continue;
            }
        }
        let ours_at_most = in_flight + replica.load.started().saturating_sub(begun);
        let signals =
            signals.with_context(replica.load.requests(), ours_at_most, previous.as_deref());
        // A first scrape counts as a change: a replica held back until its
        // first scrape (admission::cold_start) may take requests now.
        let capacity_changed = previous.is_none()
            || previous.as_ref().and_then(|p| p.cache_tokens()) != signals.cache_tokens();
        if signals.error.is_none() {
            replica.warmup.scraped();
        }
        replica.signals.store(Some(Arc::new(signals)));
        if capacity_changed {
            pool.capacity_reported();
        }
    }
}

/// One scrape: the body of a successful answer, or why there is none.
async fn fetch(
    client: &ReplicaClient,
    uri: http::Uri,
    timeout: Duration,
) -> Result<String, String> {
    let reply = client
        .get(uri, timeout, BodyUse::Keep { limit: MAX_BODY })
        .await
        .map_err(|e| e.to_string())?;
    if !reply.status.is_success() {
        return Err(format!("status {}", reply.status));
    }
    String::from_utf8(reply.body.to_vec()).map_err(|_| "body is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Endpoint, Update};
    use crate::routing::{build_picker, RoutingConfig};
    use infergate_protocol::EngineKind;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tiny /metrics server: answers `body()` (or hangs when it returns None).
    async fn metrics_server(
        body: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> (Endpoint, Arc<AtomicU32>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicU32::new(0));
        let h2 = hits.clone();
        let body = Arc::new(body);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let body = body.clone();
                let hits = h2.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        hits.fetch_add(1, Ordering::Relaxed);
                        let Some(b) = body() else {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        };
                        let resp =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}", b.len());
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (Endpoint::from_url(&format!("http://{addr}")).unwrap(), hits)
    }

    const OK: &str =
        "vllm:num_requests_waiting 3\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.25\n";

    async fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_failed_scrape_keeps_good_signals_until_stale() {
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        // Answers twice, then hangs.
        let (ep, _) = metrics_server(move || {
            (n2.fetch_add(1, Ordering::Relaxed) < 2).then(|| OK.to_string())
        })
        .await;
        let pool = Arc::new(Pool::new("p", EngineKind::Vllm));
        pool.apply(Update::Reset(vec![ep]));
        let cfg = ScrapeConfig {
            interval_ms: 20,
            timeout_ms: 30,
            stale_after_ms: 400,
            ..ScrapeConfig::default()
        };
        let _h = spawn(pool.clone(), cfg, Arc::new(ArcSwap::from_pointee(vec![]))).unwrap();
        let r = pool.replicas()[0].clone();
        assert!(wait_for(|| n.load(Ordering::Relaxed) >= 3).await);
        // Failing now, but the last good scrape is younger than 400 ms.
        assert!(r.signals.load().as_ref().is_some_and(|s| s.error.is_none()));
        // Once stale, the failure is stored: unknown.
        assert!(wait_for(|| r.signals.load().as_ref().is_some_and(|s| s.error.is_some())).await);
    }

    #[tokio::test]
    async fn a_changed_kv_capacity_is_reported_to_the_pool() {
        let blocks = Arc::new(AtomicU32::new(100));
        let b2 = blocks.clone();
        let (ep, hits) = metrics_server(move || {
            Some(format!(
                "{OK}vllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"{}\"}} 1\n",
                b2.load(Ordering::Relaxed)
            ))
        })
        .await;
        let pool = Arc::new(Pool::new("p", EngineKind::Vllm));
        let mut reports = pool.watch_capacity();
        pool.apply(Update::Reset(vec![ep]));
        let cfg = ScrapeConfig {
            interval_ms: 10,
            ..ScrapeConfig::default()
        };
        let _h = spawn(pool.clone(), cfg, Arc::new(ArcSwap::from_pointee(vec![]))).unwrap();
        assert!(wait_for(|| *reports.borrow() == 1).await, "first geometry");
        reports.mark_unchanged();
        let seen = hits.load(Ordering::Relaxed);
        assert!(wait_for(|| hits.load(Ordering::Relaxed) >= seen + 3).await);
        assert!(!reports.has_changed().unwrap(), "same geometry: no report");
        blocks.store(200, Ordering::Relaxed);
        assert!(wait_for(|| *reports.borrow() == 2).await, "grown");
    }

    #[tokio::test]
    async fn scrapes_follow_membership_and_failures_read_as_unknown() {
        let (good, hits) = metrics_server(|| Some(OK.to_string())).await;
        let (hang, _) = metrics_server(|| None).await;
        let pool = Arc::new(Pool::new("p", EngineKind::Vllm));
        pool.apply(Update::Reset(vec![good.clone(), hang.clone()]));
        let cfg = RoutingConfig::default();
        let aware = Arc::new(crate::routing::aware::InferenceAware::new(cfg.clone()));
        let picker: PickerSet =
            Arc::new(ArcSwap::from_pointee(
                vec![aware.clone() as Arc<dyn Picker>],
            ));
        let mut sc = cfg.scrape.clone();
        sc.interval_ms = 20;
        sc.timeout_ms = 50;
        let handle = spawn(pool.clone(), sc, picker).unwrap();
        let reps = pool.replicas();
        let g = reps.iter().find(|r| r.endpoint == good).unwrap().clone();
        let h = reps.iter().find(|r| r.endpoint == hang).unwrap().clone();
        assert!(
            wait_for(|| g
                .signals
                .load()
                .as_ref()
                .is_some_and(|s| s.error.is_none() && s.waiting == 3.0))
            .await
        );
        assert!(
            wait_for(|| h.signals.load().as_ref().is_some_and(|s| s
                .error
                .as_deref()
                .unwrap_or("")
                .contains("timed out")))
            .await
        );
        // Removing the replica stops its loop and the picker forgets it.
        aware.index().record(&good.key, &[1, 2, 3], 10);
        assert_eq!(aware.index().replica_blocks(&good.key), 3);
        pool.apply(Update::Remove(vec![good.key.clone()]));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = hits.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(hits.load(Ordering::Relaxed), before);
        assert_eq!(aware.index().replica_blocks(&good.key), 0);
        // Dropping the handle stops the rest; a dead port reads as a failure.
        drop(handle);
        let dead = Endpoint::from_url("http://127.0.0.1:1").unwrap();
        pool.apply(Update::Reset(vec![dead]));
        let _handle = spawn(
            pool.clone(),
            {
                let mut s = cfg.scrape.clone();
                s.interval_ms = 20;
                s
            },
            Arc::new(ArcSwap::from_pointee(vec![build_picker(&cfg)])),
        )
        .unwrap();
        let d = pool.replicas()[0].clone();
        assert!(wait_for(|| d.signals.load().as_ref().is_some_and(|s| s.error.is_some())).await);
    }
}
