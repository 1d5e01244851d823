//! The gateway's runtime state: the route table snapshot and the long-lived pools.
//!
//! [`Gateway::apply_config`] builds a new [`RouteTable`] and swaps it in
//! atomically (arc-swap); a request keeps the snapshot it started with. Pools
//! are keyed by name and reused across reloads, so their replicas' accounting
//! survives; a static `endpoints:` list is applied as one `Update::Reset`, while
//! pools with a `service:` are fed by discovery (see [`Gateway::pool`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;

use super::body::BodyBudget;
use super::upstream::UpstreamClient;
use crate::governance::Governance;
use crate::telemetry::live::History;
use crate::telemetry::trace::Tracing;
use infergate_core::admission::{
    AdmissionRegistry, CanarySplit, EnginePriority, PoolAdmission, RolledBack,
};
use infergate_core::config::{Config, ConfigError, Limits, PoolSource, RouteConfig};
use infergate_core::cost::{PricingConfig, TokenPrice};
use infergate_core::discovery::{Endpoint, Update};
use infergate_core::identity::{IdentityStore, Policy};
use infergate_core::plan::PlanRoute;
use infergate_core::pool::Pool;
use infergate_core::quota::QuotaStore;
use infergate_core::routing::{build_picker, Picker, PolicyName, RoutingConfig, Scrapers};

/// One model route, resolved against its pool.
#[derive(Debug)]
pub struct Route {
    /// The route's primary model name (its metrics label).
    pub name: Arc<str>,
    pub pool: Arc<Pool>,
    pub picker: Arc<dyn Picker>,
    pub client: UpstreamClient,
    pub config: RouteConfig,
    /// The admission (token budget, queue, outlier ejection) of `pool`.
    pub admission: Arc<PoolAdmission>,
    /// The route's canary split (no canary: always stable).
    pub canary: Arc<CanarySplit>,
    /// The canary side: this route's config over the canary pool (its
    /// `target_model` is the canary's model when set).
    pub canary_side: Option<Arc<Route>>,
    /// The pool's engines take the band as the body's `priority`.
    pub engine_priority: Option<EnginePriority>,
    /// The model this side serves, for usage and metric labels: its
    /// `target_model` (the canary's model on a canary side), else its name.
    pub model_label: Arc<str>,
    /// `model_label` as the `x-infergate-served-model` value (none when it
    /// is not a valid header value): cloned per response, not rebuilt.
    pub model_header: Option<HeaderValue>,
    /// This side's token prices (`pricing.models` of its served model, else
    /// of its name or an alias).
    pub price: Option<TokenPrice>,
}

impl PlanRoute for Route {
    fn name(&self) -> &Arc<str> {
        &self.name
    }
    fn config(&self) -> &RouteConfig {
        &self.config
    }
    fn canary(&self) -> &Arc<CanarySplit> {
        &self.canary
    }
    fn canary_side(&self) -> Option<&Arc<Self>> {
        self.canary_side.as_ref()
    }
    fn pool(&self) -> &Pool {
        &self.pool
    }
    fn retry_after_secs(&self) -> u64 {
        self.admission.queue_config().retry_after_secs
    }
}

/// An immutable snapshot of the routes, swapped as a whole on reload.
#[derive(Debug)]
pub struct RouteTable {
    /// Hashed with foldhash: looked up on every request (SipHash, std's
    /// default, was ~190 instructions of it).
    by_model: HashMap<String, Arc<Route>, foldhash::fast::RandomState>,
    pub routes: Vec<Arc<Route>>,
    /// Body limit of a route that sets none.
    pub max_body_bytes: u64,
    /// Limit applied while reading a body (before the route is known): the
    /// largest any route accepts.
    pub max_read_body_bytes: u64,
    pub limits: Limits,
    /// Whether responses name the replica (`x-infergate-replica`).
    pub expose_replica_header: bool,
    /// The `GET /v1/models` answer, rendered once.
    pub models_body: Bytes,
}

impl RouteTable {
    /// The route serving `model` (its name or an alias).
    pub fn resolve(&self, model: &str) -> Option<&Arc<Route>> {
        self.by_model.get(model)
    }
}

/// The data plane's shared state.
pub struct Gateway {
    table: ArcSwap<RouteTable>,
    config: tokio::sync::watch::Sender<Arc<Config>>,
    /// Pools by name, and the pickers by route model (kept when their config is
    /// unchanged so their state, e.g. a prefix index, survives reloads).
    /// Locked only while a config is applied, never on the request path.
    state: Mutex<ReloadState>,
    ready: AtomicBool,
    /// Queues, ejections and canary verdicts, kept across reloads.
    admissions: AdmissionRegistry,
    /// Request-body bytes held by all requests (bounded by `limits`).
    pub(crate) body_budget: Arc<BodyBudget>,
    /// The status page's chart samples.
    history: History,
    /// Who callers are (`auth:` and the key file).
    identity: IdentityStore,
    /// Usage ledger, pool capacity and the audit log.
    governance: Arc<Governance>,
    /// OpenTelemetry traces (`telemetry.otlp`), built at start.
    tracing: Option<Tracing>,
    /// Limits and budgets per team and key, and their counters.
    quotas: QuotaStore,
}

#[derive(Default)]
struct ReloadState {
    pools: HashMap<String, Arc<Pool>>,
    pickers: HashMap<String, (RoutingConfig, Arc<dyn Picker>)>,
    clients: HashMap<Duration, UpstreamClient>,
    /// Each pool's `/metrics` scrape loops (routing signals).
    scrapers: Scrapers,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.table.load().routes.len())
            .finish()
    }
}

impl Gateway {
    /// Builds a gateway serving `config`.
    pub fn new(config: Config) -> Result<Arc<Gateway>, ConfigError> {
        config.validate()?;
        // The recorder goes in first: metric handles cached on the request
        // path (quota decisions) must not bind to the no-op recorder.
        let _ = crate::telemetry::metrics::handle();
        let tracing = config
            .telemetry
            .otlp
            .as_ref()
            .map(Tracing::new)
            .transpose()
            .map_err(|message| ConfigError::Invalid {
                file: "<config>".into(),
                line: None,
                message: format!("telemetry.otlp: {message}"),
            })?;
        let (tx, _) = tokio::sync::watch::channel(Arc::new(config.clone()));
        let gw = Gateway {
            table: ArcSwap::from_pointee(RouteTable {
                by_model: HashMap::default(),
                routes: Vec::new(),
                max_body_bytes: config.max_body_bytes,
                max_read_body_bytes: config.max_read_body_bytes(),
                limits: config.limits.clone(),
                expose_replica_header: config.expose_replica_header,
                models_body: Bytes::new(),
            }),
            body_budget: Arc::default(),
            config: tx,
            state: Mutex::new(ReloadState::default()),
            ready: AtomicBool::new(true),
            admissions: AdmissionRegistry::default(),
            history: History::default(),
            identity: IdentityStore::default(),
            governance: Arc::new(Governance::new(&config)),
            tracing,
            quotas: QuotaStore::default(),
        };
        gw.apply_config(config)?;
        Ok(Arc::new(gw))
    }

    /// The current route table (a cheap snapshot).
    pub fn routes(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// The config currently applied.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Notifies on every applied config (for discovery to start or stop watches).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Config>> {
        self.config.subscribe()
    }

    /// The pool named `name`, as currently configured. Discovery feeds it with
    /// `pool.apply(update)`.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.lock_state().pools.get(name).cloned()
    }

    /// All pools currently configured.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.lock_state().pools.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Whether `/readyz` answers ready (off while draining).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The tracer, when `telemetry.otlp` is set.
    pub fn tracing(&self) -> Option<&Tracing> {
        self.tracing.as_ref()
    }

    /// The status page's chart samples.
    pub(crate) fn history(&self) -> &History {
        &self.history
    }

    /// The admission state of each pool that a route (or its canary side)
    /// targets, one per pool, by pool name.
    pub(crate) fn pool_admissions(&self) -> Vec<Arc<PoolAdmission>> {
        let table = self.routes();
        let mut out: Vec<Arc<PoolAdmission>> = Vec::new();
        let sides = table
            .routes
            .iter()
            .flat_map(|r| std::iter::once(r).chain(r.canary_side.iter()));
        for r in sides {
            if !out.iter().any(|a| a.name == r.admission.name) {
                out.push(r.admission.clone());
            }
        }
        out
    }

    /// Requests waiting in every pool's admission queue.
    pub(crate) fn queue_depth(&self) -> usize {
        self.pool_admissions().iter().map(|a| a.queued()).sum()
    }

    /// Authentication: the per-request snapshot, and the key file's watch
    /// target (`IdentityStore::apply_keys_text`).
    pub fn identity(&self) -> &IdentityStore {
        &self.identity
    }

    /// Usage, capacity and audit state.
    pub(crate) fn governance(&self) -> &Arc<Governance> {
        &self.governance
    }

    /// Applies a new text of the key file (its watch calls this) and writes
    /// the change to the audit log: key ids added and removed, never keys.
    pub fn apply_keys_text(
        &self,
        text: &str,
        origin: &str,
    ) -> Result<(), infergate_core::reload::Rejected> {
        let before = self.identity.key_ids();
        let r = self.identity.apply_keys_text(text, origin);
        let after = self.identity.key_ids();
        let fields = match &r {
            Ok(()) => serde_json::json!({
                "result": "applied", "origin": origin, "keys": after.len(),
                "added": after.iter().filter(|k| !before.contains(k)).collect::<Vec<_>>(),
                "removed": before.iter().filter(|k| !after.contains(k)).collect::<Vec<_>>(),
            }),
            Err(e) => serde_json::json!({"result": "rejected", "origin": origin, "error": e.0}),
        };
        if r.is_err() || before != after {
            self.governance.audit.admin("key_file_change", fields);
        }
        r
    }

    /// Quotas: the per-request reservation, and where the binary installs
    /// the shared counters (`QuotaStore::set_backend`).
    pub fn quotas(&self) -> &QuotaStore {
        &self.quotas
    }

    /// Follows every route's canary rollbacks (for Kubernetes Events).
    pub fn canary_rollbacks(&self) -> tokio::sync::broadcast::Receiver<RolledBack> {
        self.admissions.rollbacks()
    }

    /// The canary split of a route (its weight, rollback state).
    pub fn canary(&self, route: &str) -> Option<Arc<CanarySplit>> {
        self.admissions.canary_of(route)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, ReloadState> {
        // A panic while applying a config leaves the maps consistent (each
        // insert is whole), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates `config` and swaps it in atomically. Requests in flight keep
    /// the snapshot they started with; pools and pickers are reused by name.
    /// Every applied or rejected config is written to the audit log, with
    /// the canary changes it makes.
    pub fn apply_config(&self, config: Config) -> Result<(), ConfigError> {
        let before = self.config();
        let summary = serde_json::json!({
            "routes": config.routes.iter().map(|r| r.model.as_str()).collect::<Vec<_>>(),
            "pools": config.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        });
        let r = self.apply_config_inner(config);
        let audit = &self.governance.audit;
        match &r {
            Ok(()) => {
                let after = self.config();
                let mut fields = summary;
                fields["result"] = "applied".into();
                audit.admin("config_reload", fields);
                for change in canary_changes(&before, &after) {
                    audit.admin("canary_change", change);
                }
            }
            Err(e) => audit.admin(
                "config_reload",
                serde_json::json!({"result": "rejected", "error": e.to_string()}),
            ),
        }
        r
    }

    fn apply_config_inner(&self, config: Config) -> Result<(), ConfigError> {
        config.validate()?;
        let invalid = |message| ConfigError::Invalid {
            file: "<config>".into(),
            line: None,
            message,
        };
        let auth = self.identity.prepare(&config.auth).map_err(invalid)?;
        self.governance.prepare(&config).map_err(invalid)?;
        let mut state = self.lock_state();
        let mut pools = HashMap::new();
        for pc in &config.pools {
            let pool = match state.pools.get(&pc.name) {
                Some(p) if p.engine == pc.engine => p.clone(),
                _ => Arc::new(Pool::new(pc.name.as_str(), pc.engine)),
            };
            if let PoolSource::Static(urls) = pc.source() {
                let eps = urls.iter().filter_map(|u| Endpoint::from_url(u)).collect();
                pool.apply(Update::Reset(eps));
            }
            pool.set_engine_priority(pc.engine_priority.is_some());
            pools.insert(pc.name.clone(), pool);
        }
        let engine_priority = |pool: &str| {
            config
                .pools
                .iter()
                .find(|p| p.name == pool)
                .and_then(|p| p.engine_priority)
        };
        let mut pickers = HashMap::new();
        // Per pool: the scrape config (of its first inference-aware route) and
        // the pickers that use replica signals.
        let mut per_pool: HashMap<
            String,
            (infergate_core::routing::ScrapeConfig, Vec<Arc<dyn Picker>>),
        > = HashMap::new();
        let mut by_model = HashMap::default();
        self.admissions.begin_load();
        let mut routes = Vec::new();
        for rc in &config.routes {
            let Some(pool) = pools.get(&rc.pool).cloned() else {
                continue; // validate() guarantees the pool exists
            };
            let picker = match state.pickers.get(&rc.model) {
                Some((cfg, p)) if *cfg == rc.routing => p.clone(),
                _ => build_picker(&rc.routing),
            };
            pickers.insert(rc.model.clone(), (rc.routing.clone(), picker.clone()));
            if rc.routing.policy == PolicyName::InferenceAware {
                per_pool
                    .entry(rc.pool.clone())
                    .or_insert_with(|| (rc.routing.scrape.clone(), Vec::new()))
                    .1
                    .push(picker.clone());
            }
            let client = state
                .clients
                .entry(rc.timeouts.connect)
                .or_insert_with(|| UpstreamClient::new(rc.timeouts.connect))
                .clone();
            let admission = self.admissions.pool(&pool, &rc.admission);
            let canary = self
                .admissions
                .canary(&rc.model, rc.admission.canary.clone());
            // The canary side is built from the canary in effect.
            let canary_side = canary.config().and_then(|cc| {
                let cpool = pools.get(&cc.pool)?.clone();
                let mut cfg = rc.clone();
                if cc.model.is_some() {
                    cfg.target_model = cc.model.clone();
                }
                let key = format!("{}\u{0}canary", rc.model);
                let picker = match state.pickers.get(&key) {
                    Some((c, p)) if *c == rc.routing => p.clone(),
                    _ => build_picker(&rc.routing),
                };
                pickers.insert(key, (rc.routing.clone(), picker.clone()));
                if rc.routing.policy == PolicyName::InferenceAware {
                    per_pool
                        .entry(cc.pool.clone())
                        .or_insert_with(|| (rc.routing.scrape.clone(), Vec::new()))
                        .1
                        .push(picker.clone());
                }
                Some(Arc::new(Route {
                    name: rc.model.as_str().into(),
                    admission: self.admissions.pool(&cpool, &rc.admission),
                    pool: cpool,
                    picker,
                    client: client.clone(),
                    canary: Arc::new(CanarySplit::new(rc.model.as_str(), None)),
                    canary_side: None,
                    engine_priority: engine_priority(&cc.pool),
                    model_label: served_model(&cfg),
                    model_header: served_model_header(&cfg),
                    price: price_of(&config.pricing, &cfg),
                    config: cfg,
                }))
            });
            let route = Arc::new(Route {
                name: rc.model.as_str().into(),
                pool,
                picker,
                client,
                config: rc.clone(),
                admission,
                canary,
                canary_side,
                engine_priority: engine_priority(&rc.pool),
                model_label: served_model(rc),
                model_header: served_model_header(rc),
                price: price_of(&config.pricing, rc),
            });
            for name in std::iter::once(&rc.model).chain(&rc.aliases) {
                by_model.insert(name.clone(), route.clone());
            }
            routes.push(route);
        }
        let models_body = models_list(config.routes.iter());
        self.table.store(Arc::new(RouteTable {
            by_model,
            routes,
            max_body_bytes: config.max_body_bytes,
            max_read_body_bytes: config.max_read_body_bytes(),
            limits: config.limits.clone(),
            expose_replica_header: config.expose_replica_header,
            models_body,
        }));
        self.identity.commit(auth);
        self.governance.apply(&config);
        self.quotas
            .apply(&config.quotas, &config.governance, &config.pricing);
        let pool_names: Vec<&str> = pools.keys().map(String::as_str).collect();
        let route_names: Vec<&str> = config.routes.iter().map(|r| r.model.as_str()).collect();
        self.admissions.retain(&pool_names, &route_names);
        let scraped = per_pool
            .into_iter()
            .filter_map(|(name, (cfg, p))| Some((pools.get(&name)?.clone(), cfg, p)))
            .collect();
        state.scrapers.sync(scraped);
        state.pools = pools;
        state.pickers = pickers;
        state
            .clients
            .retain(|d, _| config.routes.iter().any(|r| r.timeouts.connect == *d));
        drop(state);
        self.config.send_replace(Arc::new(config));
        Ok(())
    }
}

/// The model a route side serves: its `target_model`, else its name.
fn served_model(rc: &RouteConfig) -> Arc<str> {
    Arc::from(rc.target_model.as_deref().unwrap_or(&rc.model))
}

/// [`served_model`] as a header value (built at config load, not per request).
fn served_model_header(rc: &RouteConfig) -> Option<HeaderValue> {
    HeaderValue::from_str(&served_model(rc)).ok()
}

/// A route side's token prices: of its served model, else of its names.
fn price_of(pricing: &PricingConfig, rc: &RouteConfig) -> Option<TokenPrice> {
    pricing.model_price(rc.target_model.as_deref().into_iter().chain(rc.names()))
}

/// The canary changes between two configs: one audit record per route
/// whose canary (pool, model, weight) was added, changed or removed.
fn canary_changes(before: &Config, after: &Config) -> Vec<serde_json::Value> {
    let canary = |c: &Config, model: &str| {
        c.routes
            .iter()
            .find(|r| r.model == model)
            .and_then(|r| r.admission.canary.clone())
            .map(|c| serde_json::json!({"pool": c.pool, "model": c.model, "weight": c.weight}))
    };
    let mut models: Vec<&str> = before
        .routes
        .iter()
        .chain(&after.routes)
        .map(|r| r.model.as_str())
        .collect();
    models.sort_unstable();
    models.dedup();
    models
        .into_iter()
        .filter_map(|m| {
            let (b, a) = (canary(before, m), canary(after, m));
            (b != a).then(|| serde_json::json!({"route": m, "before": b, "after": a}))
        })
        .collect()
}

impl RouteTable {
    /// The `GET /v1/models` answer for a caller: the shared one when it may
    /// use every model, else only the routes its policy allows.
    pub fn models_for(&self, policy: &Policy) -> Bytes {
        if policy.allows_all() {
            return self.models_body.clone();
        }
        let allowed = self
            .routes
            .iter()
            .map(|r| &r.config)
            .filter(|rc| policy.allows(rc.names()));
        models_list(allowed)
    }
}

/// The OpenAI `GET /v1/models` body: every model name and alias of `routes`.
fn models_list<'a>(routes: impl Iterator<Item = &'a RouteConfig>) -> Bytes {
    let data: Vec<serde_json::Value> = routes
        .flat_map(|r| r.names())
        .map(|m| {
            serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "infergate"})
        })
        .collect();
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
            .unwrap_or_default(),
    )
}

impl infergate_core::dataplane::Dataplane for Gateway {
    fn apply_config(&self, config: Config) -> Result<(), ConfigError> {
        Gateway::apply_config(self, config)
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Config>> {
        Gateway::subscribe(self)
    }
    fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        Gateway::pool(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoints: &[&str], pool: &str) -> Config {
        let yaml = format!(
            "pools:\n  - name: {pool}\n    endpoints: [{}]\nroutes:\n  - model: m\n    aliases: [a]\n    pool: {pool}\n",
            endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ")
        );
        Config::parse(&yaml, "t").unwrap()
    }

    #[tokio::test]
    async fn reload_keeps_pools_and_accounting() {
        let gw = Gateway::new(cfg(&["http://127.0.0.1:1", "http://127.0.0.1:2"], "p")).unwrap();
        let before = gw.routes();
        let route = before.resolve("a").unwrap().clone();
        assert_eq!(route.pool.replicas().len(), 2);
        let guard = route.pool.replicas()[0].begin(10, 0);

        gw.apply_config(cfg(&["http://127.0.0.1:1", "http://127.0.0.1:3"], "p"))
            .unwrap();
        let after = gw.routes();
        let pool = gw.pool("p").unwrap();
        assert!(Arc::ptr_eq(&pool, &after.resolve("m").unwrap().pool));
        assert!(Arc::ptr_eq(&pool, &route.pool), "pool reused by name");
        assert_eq!(pool.replicas()[0].load.requests(), 1, "accounting survives");
        assert_eq!(pool.replicas()[1].key(), "127.0.0.1:3");
        // The old snapshot is still whole for requests that started on it.
        assert!(before.resolve("m").is_some());
        drop(guard);

        gw.apply_config(cfg(&["http://127.0.0.1:1"], "q")).unwrap();
        assert!(gw.pool("p").is_none());
        assert!(gw.routes().resolve("z").is_none());
        let models: serde_json::Value = serde_json::from_slice(&gw.routes().models_body).unwrap();
        assert_eq!(models["data"][1]["id"], "a");
    }
}
