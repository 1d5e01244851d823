//! The gateway's long-lived admission state: one [`PoolAdmission`] per pool
//! and one [`CanarySplit`] per route, kept across config reloads (by name) so
//! queues, ejections and canary verdicts survive a reload that does not change
//! them. Locked only while a config is applied or a canary is set, never on
//! the request path (routes hold `Arc`s to what they use).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::canary::CanarySplit;
use super::config::{AdmissionConfig, CanaryConfig};
use super::queue::PoolAdmission;
use crate::pool::Pool;

#[derive(Debug, Default)]
pub struct AdmissionRegistry {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By pool name, with the config it was built from and its prober.
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
    prober: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for PoolEntry {
    fn drop(&mut self) {
        if let Some(p) = &self.prober {
            p.abort();
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
    /// pool's health prober when called inside a tokio runtime.
    pub fn pool(&self, pool: &Arc<Pool>, cfg: &AdmissionConfig) -> Arc<PoolAdmission> {
        let mut st = self.lock();
        let generation = st.generation;
        let same = |a: &AdmissionConfig| {
            a.budget == cfg.budget && a.queue == cfg.queue && a.outlier == cfg.outlier
        };
        if let Some(e) = st.pools.get_mut(&*pool.name) {
            if e.generation == generation || same(&e.cfg) {
                e.generation = generation;
                return e.admission.clone();
            }
        }
        let admission = Arc::new(PoolAdmission::new(pool.name.clone(), cfg));
        let prober = tokio::runtime::Handle::try_current().ok().map(|_| {
            let listener = admission.listener();
            admission
                .outlier
                .spawn_prober(pool.clone(), move || listener.capacity_freed(0))
        });
        st.pools.insert(
            pool.name.to_string(),
            PoolEntry {
                generation,
                cfg: cfg.clone(),
                admission: admission.clone(),
                prober,
            },
        );
        admission
    }

    /// The canary split of route `route`, set to `cfg` from the config file
    /// when that differs from what the file said before (a canary set at run
    /// time through [`AdmissionRegistry::set_canary`] stays otherwise).
    pub fn canary(&self, route: &str, cfg: Option<CanaryConfig>) -> Arc<CanarySplit> {
        let mut st = self.lock();
        match st.canaries.get(route) {
            Some(c) => {
                c.set_from_file(cfg);
                c.clone()
            }
            None => {
                let c = Arc::new(CanarySplit::new(route, cfg));
                st.canaries.insert(route.to_string(), c.clone());
                c
            }
        }
    }

    /// Sets a route's canary at run time (for example from a Kubernetes
    /// Service annotation). Returns false when the route is unknown.
    pub fn set_canary(&self, route: &str, cfg: Option<CanaryConfig>) -> bool {
        match self.lock().canaries.get(route) {
            Some(c) => {
                c.set(cfg);
                true
            }
            None => false,
        }
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
        assert!(reg.set_canary("m", Some(canary(30.0))));
        assert!(!reg.set_canary("nope", None));
        // Reload with the same file: the run-time value stays.
        let c2 = reg.canary("m", Some(canary(10.0)));
        assert!(Arc::ptr_eq(&c, &c2));
        assert_eq!(c.effective_weight(), 30.0);
        // The file changed: it wins.
        reg.canary("m", Some(canary(5.0)));
        assert_eq!(c.effective_weight(), 5.0);
        reg.retain(&[], &[]);
        assert!(reg.canary_of("m").is_none());
    }
}
