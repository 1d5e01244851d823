//! The gateway's long-lived admission state: one [`PoolAdmission`] per pool
//! and one [`CanarySplit`] per route, kept across config reloads (by name) so
//! queues, ejections and canary verdicts survive a reload that does not change
//! them (a pool keeps its queue even when its admission config changes).
//! Locked only while a config is applied or a canary is set, never on the
//! request path (routes hold `Arc`s to what they use).
//!
//! Each pool's admission follows its pool here: the outlier prober runs, and
//! the queue gets a turn on every event that can make room without a release
//! (members changed, a capacity reported, a replica back from ejection).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::task::JoinHandle;

use super::canary::{CanarySplit, RolledBack};
use super::config::{AdmissionConfig, CanaryConfig};
use super::queue::PoolAdmission;
use crate::pool::Pool;

#[derive(Debug)]
pub struct AdmissionRegistry {
    state: Mutex<State>,
    /// Every route's canary rollbacks.
    rollbacks: tokio::sync::broadcast::Sender<RolledBack>,
}

impl Default for AdmissionRegistry {
    fn default() -> Self {
        AdmissionRegistry {
            state: Mutex::default(),
            rollbacks: tokio::sync::broadcast::Sender::new(16),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// By pool name, with the config it was built from and its tasks.
    pools: HashMap<String, PoolEntry>,
    /// By route name.
    canaries: HashMap<String, Arc<CanarySplit>>,
    /// Bumped by each config load: the first route of a load to name a pool
    /// decides its admission config.
    generation: u64,
}

#[derive(Debug)]
struct PoolEntry {
    generation: u64,
    cfg: AdmissionConfig,
    admission: Arc<PoolAdmission>,
    /// The pool object the tasks follow (a pool whose engine changed is a new one).
    pool: Arc<Pool>,
    /// The outlier prober and the queue's waker (none outside a tokio runtime).
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PoolEntry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the tasks that keep `admission` in step with `pool` (when called
/// inside a tokio runtime).
fn follow(pool: &Arc<Pool>, admission: &Arc<PoolAdmission>) -> Vec<JoinHandle<()>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Vec::new();
    }
    let back = Arc::downgrade(admission);
    let prober = admission.outlier.spawn_prober(pool.clone(), move || {
        if let Some(a) = back.upgrade() {
            a.capacity_changed();
        }
    });
    // Subscribed before returning, so no event after this call is missed.
    let waker = tokio::spawn(wake_queue_on_pool_events(
        pool.subscribe(),
        pool.watch_capacity(),
        Arc::downgrade(admission),
    ));
    vec![prober, waker]
}

/// Gives the queue a turn whenever the pool's members change or a replica
/// reports its capacity: room may have appeared without a release (or no
/// replica is left, which a waiter must hear about).
async fn wake_queue_on_pool_events(
    mut membership: tokio::sync::watch::Receiver<crate::pool::Members>,
    mut capacity: tokio::sync::watch::Receiver<u64>,
    admission: Weak<PoolAdmission>,
) {
    loop {
        let members = tokio::select! {
            r = membership.changed() => r.map(|()| Some(membership.borrow_and_update().clone())),
            r = capacity.changed() => r.map(|()| None),
        };
        // The pool (the senders' owner) is gone: nothing more to follow.
        let Ok(members) = members else { return };
        let Some(a) = admission.upgrade() else { return };
        match members {
            Some(m) => a.members_changed(&m),
            None => a.capacity_changed(),
        }
    }
}

impl AdmissionRegistry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a config load (see [`AdmissionRegistry::pool`]).
    pub fn begin_load(&self) {
        self.lock().generation += 1;
    }

    /// The admission of `pool`, built from `cfg`: the first call of a config
    /// load decides (later routes on the same pool share it), and the state
    /// is kept when the pool-level parts of `cfg` are unchanged. Starts the
    /// tasks following the pool when called inside a tokio runtime.
    pub fn pool(&self, pool: &Arc<Pool>, cfg: &AdmissionConfig) -> Arc<PoolAdmission> {
        let mut st = self.lock();
        let generation = st.generation;
        let same = |a: &AdmissionConfig| {
            a.budget == cfg.budget && a.queue == cfg.queue && a.outlier == cfg.outlier
        };
        let previous = match st.pools.get_mut(&*pool.name) {
            Some(e) if e.generation == generation || same(&e.cfg) => {
                e.generation = generation;
                if !Arc::ptr_eq(&e.pool, pool) {
                    for t in e.tasks.drain(..) {
                        t.abort();
                    }
                    e.tasks = follow(pool, &e.admission);
                    e.pool = pool.clone();
                }
                return e.admission.clone();
            }
            Some(e) => Some(e.admission.clone()),
            None => None,
        };
        let admission = Arc::new(match previous {
            Some(p) => PoolAdmission::rebuilt(&p, cfg),
            None => PoolAdmission::new(pool.name.clone(), cfg),
        });
        st.pools.insert(
            pool.name.to_string(),
            PoolEntry {
                generation,
                cfg: cfg.clone(),
                tasks: follow(pool, &admission),
                admission: admission.clone(),
                pool: pool.clone(),
            },
        );
        admission
    }

    /// The canary split of route `route`, set to `cfg` when that differs from
    /// the config applied before (so a reload of the same config keeps a
    /// rolled-back canary rolled back).
    pub fn canary(&self, route: &str, cfg: Option<CanaryConfig>) -> Arc<CanarySplit> {
        let mut st = self.lock();
        match st.canaries.get(route) {
            Some(c) => {
                c.set_from_file(cfg);
                c.clone()
            }
            None => {
                let c = Arc::new(CanarySplit::new(route, cfg).announcing(self.rollbacks.clone()));
                st.canaries.insert(route.to_string(), c.clone());
                c
            }
        }
    }

    /// Follows every route's canary rollbacks.
    pub fn rollbacks(&self) -> tokio::sync::broadcast::Receiver<RolledBack> {
        self.rollbacks.subscribe()
    }

    /// The canary split of a route, if the route exists.
    pub fn canary_of(&self, route: &str) -> Option<Arc<CanarySplit>> {
        self.lock().canaries.get(route).cloned()
    }

    /// Drops the state of pools and routes no longer configured.
    pub fn retain(&self, pools: &[&str], routes: &[&str]) {
        let mut st = self.lock();
        st.pools.retain(|k, _| pools.contains(&k.as_str()));
        st.canaries.retain(|k, _| routes.contains(&k.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::budget::Cost;
    use crate::admission::config::BudgetConfig;
    use crate::admission::queue::{AdmitError, Ticket};
    use crate::admission::{Priority, RequestClass, Reservation};
    use crate::discovery::{Endpoint, Update};
    use crate::routing::simple::LeastRequest;
    use crate::routing::RouteRequest;
    use std::time::Duration;

    fn ep(port: u16) -> Endpoint {
        Endpoint::from_url(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    /// Room for one 100-token request per replica.
    fn one_each() -> AdmissionConfig {
        AdmissionConfig {
            budget: BudgetConfig {
                tokens_per_replica: Some(100),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Admits a 100-token request within `wait_ms`, in the background.
    fn admit(
        pool: &Arc<Pool>,
        adm: &Arc<PoolAdmission>,
        wait_ms: u64,
    ) -> tokio::task::JoinHandle<Result<Reservation, AdmitError>> {
        let (pool, adm) = (pool.clone(), adm.clone());
        tokio::spawn(async move {
            let req = RouteRequest {
                request_id: "r",
                model: "m",
                prompt_text: "",
                prompt_tokens: 50,
                max_tokens: 50,
                lora: None,
                hashes: Default::default(),
            };
            let ticket = Ticket {
                class: RequestClass {
                    priority: Priority::Standard,
                    tenant: "".into(),
                    max_wait: Duration::from_millis(wait_ms),
                },
                cost: Cost {
                    prompt: 50,
                    output: 50,
                },
                predict_wait: false,
                wait_for_replica: false,
            };
            adm.acquire(&pool, &LeastRequest, &req, &ticket, &[]).await
        })
    }

    /// A registry and a pool of one replica.
    fn one_replica() -> (AdmissionRegistry, Arc<Pool>) {
        let pool = Arc::new(Pool::new("p", Default::default()));
        pool.apply(Update::Reset(vec![ep(1)]));
        (AdmissionRegistry::default(), pool)
    }

    /// What `task` returns, which must be within a second.
    async fn within_a_second<T>(task: tokio::task::JoinHandle<T>, what: &str) -> T {
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect(what)
            .unwrap()
    }

    async fn wait_queued(adm: &PoolAdmission, n: usize) {
        for _ in 0..200 {
            if adm.queued() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("queue never reached {n}");
    }

    #[tokio::test]
    async fn a_waiter_gets_a_replica_that_joins_or_reports_room() {
        let (reg, pool) = one_replica();
        let adm = reg.pool(&pool, &one_each());
        let _held = admit(&pool, &adm, 1000).await.unwrap().unwrap();
        // Far longer than the test: only the join can place it.
        let waiter = admit(&pool, &adm, 60_000);
        wait_queued(&adm, 1).await;
        pool.apply(Update::Add(vec![ep(2)]));
        let placed = within_a_second(waiter, "placed when the replica joined")
            .await
            .unwrap();
        assert_eq!(placed.replica().key(), "127.0.0.1:2");

        // Both full; a capacity report (the scraper's) gives the queue a turn.
        let waiter = admit(&pool, &adm, 60_000);
        wait_queued(&adm, 1).await;
        pool.capacity_reported();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(adm.queued(), 1, "still waiting: no room anywhere");
        // The last replica leaves: the waiter hears there is none at once.
        pool.apply(Update::Reset(vec![]));
        let refused = within_a_second(waiter, "told at once").await;
        assert_eq!(refused.unwrap_err(), AdmitError::NoReadyReplica);
    }

    #[tokio::test]
    async fn a_rebuilt_admission_keeps_the_pool_queue() {
        let (reg, pool) = one_replica();
        let old = reg.pool(&pool, &one_each());
        let held = admit(&pool, &old, 1000).await.unwrap().unwrap();
        reg.begin_load();
        let mut changed = one_each();
        changed.queue.max_requests = 7;
        let new = reg.pool(&pool, &changed);
        assert!(!Arc::ptr_eq(&old, &new));
        let waiter = admit(&pool, &new, 60_000);
        wait_queued(&new, 1).await;
        assert_eq!(old.queued(), 1, "one queue");
        // A request admitted under the old config ends: the new one's waiter goes.
        drop(held);
        let placed = within_a_second(waiter, "woken by the old admission's release").await;
        assert!(placed.is_ok());
    }

    fn canary(weight: f64) -> CanaryConfig {
        serde_yaml_ng::from_str(&format!("{{pool: v2, weight: {weight}}}")).unwrap()
    }

    #[tokio::test]
    async fn state_survives_reloads_and_runtime_canary_wins_until_the_file_changes() {
        let reg = AdmissionRegistry::default();
        let pool = Arc::new(Pool::new("p", Default::default()));
        let cfg = AdmissionConfig::default();
        let a = reg.pool(&pool, &cfg);
        assert!(Arc::ptr_eq(&a, &reg.pool(&pool, &cfg)));
        let mut other = cfg.clone();
        other.queue.max_requests = 3;
        assert!(
            Arc::ptr_eq(&a, &reg.pool(&pool, &other)),
            "same load: the first route decides"
        );
        reg.begin_load();
        assert!(Arc::ptr_eq(&a, &reg.pool(&pool, &cfg)), "unchanged: kept");
        reg.begin_load();
        assert!(
            !Arc::ptr_eq(&a, &reg.pool(&pool, &other)),
            "changed: rebuilt"
        );

        let c = reg.canary("m", Some(canary(10.0)));
        // Reload with the same file: the same split, unchanged.
        let c2 = reg.canary("m", Some(canary(10.0)));
        assert!(Arc::ptr_eq(&c, &c2));
        assert_eq!(c.effective_weight(), 10.0);
        // The file changed: it wins.
        reg.canary("m", Some(canary(5.0)));
        assert_eq!(c.effective_weight(), 5.0);
        reg.retain(&[], &[]);
        assert!(reg.canary_of("m").is_none());
    }
}
