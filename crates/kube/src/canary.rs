//! Canary rollouts declared by annotations on the canary's own Service, so a
//! model team ships a new version without editing the gateway config:
//!
//! ```yaml
//! metadata:
//!   name: llama-v2-canary
//!   annotations:
//!     infergate.io/canary-of: llama-v1         # the stable Service (same namespace)
//!     infergate.io/canary-weight: "10"         # percent of users, 0-100
//!     infergate.io/canary-model: llama-3-8b-v2 # optional: the model name it serves
//! ```
//!
//! Every route whose pool is the stable Service then sends that share of its
//! users to a pool made of the canary Service's endpoints (same port as the
//! stable pool), rewriting the model name to `canary-model` when given; the
//! admission layer's split keeps users sticky and rolls a bad canary back.
//! Raising the weight promotes the canary, removing `canary-of` (or deleting the
//! Service) ends it. The Services of the namespace are watched; every change
//! publishes the complete, sorted set of valid canaries. An invalid annotation is
//! logged, counted and reported as a Warning Event on the Service, and that
//! Service is not a canary until fixed. A canary the admission layer rolls
//! back is reported as a Warning Event `CanaryRolledBack` on its Service, with
//! the verdict's figures ([`report_rollbacks`]).

use std::collections::BTreeMap;

use ::kube::api::Api;
use ::kube::runtime::watcher::{self, Event};
use ::kube::runtime::WatchStreamExt;
use ::kube::{Client, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;

use super::endpoints::WatchOptions;
use super::events::{object_ref, EventPublisher};
use infergate_core::admission::{CanaryConfig, RolledBack};
use infergate_core::config::{Config, PoolConfig, PoolSource, RouteConfig, ServiceRef};

/// The stable Service this Service is a canary of.
pub const CANARY_OF: &str = "infergate.io/canary-of";
/// Percent (0-100) of the stable route's new requests sent to the canary.
pub const CANARY_WEIGHT: &str = "infergate.io/canary-weight";
/// Optional: the model name the canary serves (sent upstream on the canary side).
pub const CANARY_MODEL: &str = "infergate.io/canary-model";

/// One canary as declared on its Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Canary {
    pub namespace: String,
    /// The canary Service (its endpoints receive the canary share).
    pub service: String,
    /// The stable Service it shadows.
    pub stable: String,
    /// Percent of users, 0-100.
    pub weight: u32,
    /// Model name sent upstream on the canary side (default: the route's).
    pub model: Option<String>,
}

/// A canary annotation that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanaryError {
    #[error("{CANARY_WEIGHT} must be a whole percent 0-100, got {0:?}")]
    Weight(String),
    #[error("{CANARY_WEIGHT} is required next to {CANARY_OF}")]
    MissingWeight,
    #[error("{CANARY_OF} is empty")]
    EmptyStable,
    #[error("a Service cannot be a canary of itself")]
    OfItself,
}

impl Canary {
    /// Reads the canary annotations of a Service: `Ok(None)` when it is not a canary.
    pub fn parse(svc: &Service) -> Result<Option<Canary>, CanaryError> {
        let ann = svc.annotations();
        let Some(stable) = ann.get(CANARY_OF) else {
            return Ok(None);
        };
        let stable = stable.trim();
        if stable.is_empty() {
            return Err(CanaryError::EmptyStable);
        }
        let name = svc.name_any();
        if stable == name {
            return Err(CanaryError::OfItself);
        }
        let weight = ann.get(CANARY_WEIGHT).ok_or(CanaryError::MissingWeight)?;
        let weight = weight
            .trim()
            .trim_end_matches('%')
            .parse::<u32>()
            .ok()
            .filter(|w| *w <= 100)
            .ok_or_else(|| CanaryError::Weight(weight.clone()))?;
        let model = ann
            .get(CANARY_MODEL)
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty());
        Ok(Some(Canary {
            namespace: svc.namespace().unwrap_or_default(),
            service: name,
            stable: stable.to_string(),
            weight,
            model,
        }))
    }
}

/// The valid canaries of a namespace, sorted (so equal sets compare equal).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanarySet(pub Vec<Canary>);

impl CanarySet {
    /// The canary of the stable Service `namespace/stable`. Two canaries of
    /// one Service are a mistake: the first by name wins (and is logged).
    pub fn for_stable(&self, namespace: &str, stable: &str) -> Option<&Canary> {
        let mut matching = self
            .0
            .iter()
            .filter(|c| c.namespace == namespace && c.stable == stable);
        let first = matching.next()?;
        if let Some(other) = matching.next() {
            tracing::warn!(stable, used = %first.service, ignored = %other.service,
                "two canaries of one Service; using the first by name");
        }
        Some(first)
    }
}

/// The name of the pool made of a canary Service's endpoints.
fn canary_pool_name(c: &Canary) -> String {
    format!("canary:{}/{}", c.namespace, c.service)
}

/// What a canary changes for one route.
#[derive(Debug, Clone, PartialEq)]
struct RouteCanary {
    /// The route (its model name).
    route: String,
    /// The pool of the canary Service's endpoints (same port and engine as the
    /// stable pool).
    pool: PoolConfig,
    weight: u32,
    /// Model name sent upstream on the canary side.
    model: Option<String>,
}

/// The canary of every route whose pool is a stable Service with a canary.
/// Services without a namespace live in `namespace`.
fn plan(base: &Config, set: &CanarySet, namespace: &str) -> Vec<RouteCanary> {
    let mut out = Vec::new();
    for route in &base.routes {
        let Some(pool) = base.pools.iter().find(|p| p.name == route.pool) else {
            continue;
        };
        let PoolSource::Service(sref) = pool.source() else {
            continue;
        };
        let ns = sref.namespace.as_deref().unwrap_or(namespace);
        let Some(c) = set.for_stable(ns, &sref.name) else {
            continue;
        };
        out.push(RouteCanary {
            route: route.model.clone(),
            pool: PoolConfig {
                name: canary_pool_name(c),
                engine: pool.engine,
                endpoints: Vec::new(),
                service: Some(ServiceRef {
                    name: c.service.clone(),
                    namespace: Some(c.namespace.clone()),
                    port: sref.port.clone(),
                }),
                // The canary runs the same engine, configured the same way.
                engine_priority: pool.engine_priority,
            },
            weight: c.weight,
            model: c.model.clone(),
        });
    }
    out
}

/// Lays the canaries over a config: each planned canary pool is added and
/// the route's canary split points at it with the annotated weight.
pub fn overlay(base: &Config, set: &CanarySet, namespace: &str) -> Config {
    let mut cfg = base.clone();
    for rc in plan(base, set, namespace) {
        if !cfg.pools.iter().any(|p| p.name == rc.pool.name) {
            cfg.pools.push(rc.pool.clone());
        }
        if let Some(route) = cfg.routes.iter_mut().find(|r| r.model == rc.route) {
            route_split(route, &rc);
        }
    }
    cfg
}

/// Points the route's canary split at the canary pool with the annotated
/// weight. A `canary:` the route already has keeps its stickiness and rollback
/// rules (the annotation only moves pool, weight and model); otherwise the
/// defaults apply. The admission layer re-arms the split, and with it the
/// automatic rollback, whenever this changes.
fn route_split(route: &mut RouteConfig, rc: &RouteCanary) {
    let weight = f64::from(rc.weight);
    let split = route
        .admission
        .canary
        .get_or_insert_with(|| CanaryConfig::new(rc.pool.name.clone(), weight));
    split.pool = rc.pool.name.clone();
    split.weight = weight;
    if rc.model.is_some() {
        split.model = rc.model.clone();
    }
}

/// Watches the Services of a namespace and publishes the canary set.
#[derive(Debug, Clone)]
pub struct CanaryWatch {
    pub namespace: String,
    pub options: WatchOptions,
}

impl CanaryWatch {
    pub fn new(namespace: impl Into<String>) -> Self {
        CanaryWatch {
            namespace: namespace.into(),
            options: WatchOptions::default(),
        }
    }

    /// Runs forever, sending the set to `tx` whenever it changes (the first
    /// complete list is always sent).
    pub async fn run(
        self,
        client: Client,
        tx: tokio::sync::watch::Sender<CanarySet>,
        events: Option<EventPublisher>,
    ) {
        let api: Api<Service> = Api::namespaced(client, &self.namespace);
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .backoff(self.options.backoff())
            .boxed();
        let mut store = CanaryStore::default();
        while let Some(item) = stream.next().await {
            let ev = match item {
                Ok(ev) => ev,
                Err(e) => {
                    super::record_watch_error("services", &e);
                    continue;
                }
            };
            for (svc, err) in store.step(ev) {
                tracing::warn!(service = %svc.name_any(), error = %err, "ignoring invalid canary annotations");
                metrics::counter!("infergate_canary_annotation_errors_total").increment(1);
                if let Some(events) = &events {
                    let regarding =
                        object_ref::<Service>(&self.namespace, &svc.name_any(), svc.uid());
                    events.warn(regarding, "InvalidCanary", "Canary", err.to_string());
                }
            }
            if let Some(set) = store.changed() {
                tracing::info!(canaries = ?set.0, "canary set changed");
                tx.send_replace(set);
            }
        }
    }
}

/// Reports each canary rollback (`rollbacks`) as a Warning Event
/// `CanaryRolledBack` on the canary's Service (found in the current canary
/// set by its pool), with the reason: both sides' figures and sample sizes.
/// Runs until the gateway goes away.
pub async fn report_rollbacks(
    mut rollbacks: tokio::sync::broadcast::Receiver<RolledBack>,
    canaries: tokio::sync::watch::Receiver<CanarySet>,
    namespace: String,
    events: EventPublisher,
) {
    loop {
        let rb = match rollbacks.recv().await {
            Ok(rb) => rb,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "canary rollback events lagged");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let service = canaries
            .borrow()
            .0
            .iter()
            .find(|c| canary_pool_name(c) == rb.pool)
            .map(|c| c.service.clone());
        // A canary from the routes config (no annotation) has no Service of its own.
        let Some(service) = service else { continue };
        let regarding = object_ref::<Service>(&namespace, &service, None);
        let note = format!(
            "route {}: canary rolled back, weight 0: {}",
            rb.route, rb.reason
        );
        events.warn(regarding, "CanaryRolledBack", "Rollback", note);
    }
}

/// Canaries by Service name, with the relist buffer of the watcher protocol.
#[derive(Debug, Default)]
struct CanaryStore {
    by_name: BTreeMap<String, Canary>,
    relisting: Option<BTreeMap<String, Canary>>,
    /// The last set sent; None before the first complete list.
    sent: Option<CanarySet>,
    synced: bool,
}

impl CanaryStore {
    /// Applies one watch event; returns the Services with invalid annotations.
    fn step(&mut self, ev: Event<Service>) -> Vec<(Service, CanaryError)> {
        let mut invalid = Vec::new();
        let mut parse_into = |map: &mut BTreeMap<String, Canary>, svc: Service| {
            let name = svc.name_any();
            match Canary::parse(&svc) {
                Ok(Some(c)) => {
                    map.insert(name, c);
                }
                Ok(None) => {
                    map.remove(&name);
                }
                Err(e) => {
                    map.remove(&name);
                    invalid.push((svc, e));
                }
            }
        };
        match ev {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(svc) => {
                parse_into(self.relisting.get_or_insert_with(BTreeMap::new), svc)
            }
            Event::InitDone => {
                self.by_name = self.relisting.take().unwrap_or_default();
                self.synced = true;
            }
            Event::Apply(svc) => parse_into(&mut self.by_name, svc),
            Event::Delete(svc) => {
                self.by_name.remove(&svc.name_any());
            }
        }
        invalid
    }

    /// The current set if it differs from the last one sent.
    fn changed(&mut self) -> Option<CanarySet> {
        if !self.synced {
            return None;
        }
        let mut set: Vec<Canary> = self.by_name.values().cloned().collect();
        set.sort();
        let set = CanarySet(set);
        if self.sent.as_ref() == Some(&set) {
            return None;
        }
        self.sent = Some(set.clone());
        Some(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_protocol::EngineKind;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, ann: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("llm".into()),
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    #[test]
    fn parses_annotations() {
        assert_eq!(Canary::parse(&svc("a", &[])), Ok(None));
        let c = Canary::parse(&svc(
            "v2",
            &[
                (CANARY_OF, "v1"),
                (CANARY_WEIGHT, "10"),
                (CANARY_MODEL, "llama"),
            ],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.stable.as_str(), c.weight, c.model.as_deref()),
            ("v1", 10, Some("llama"))
        );
        assert_eq!(
            Canary::parse(&svc("v2", &[(CANARY_OF, "v1"), (CANARY_WEIGHT, "25%")]))
                .unwrap()
                .unwrap()
                .weight,
            25
        );
        assert_eq!(
            Canary::parse(&svc("v2", &[(CANARY_OF, "v1")])),
            Err(CanaryError::MissingWeight)
        );
        assert!(matches!(
            Canary::parse(&svc("v2", &[(CANARY_OF, "v1"), (CANARY_WEIGHT, "101")])),
            Err(CanaryError::Weight(_))
        ));
        assert!(matches!(
            Canary::parse(&svc("v2", &[(CANARY_OF, "v1"), (CANARY_WEIGHT, "ten")])),
            Err(CanaryError::Weight(_))
        ));
        assert_eq!(
            Canary::parse(&svc("v2", &[(CANARY_OF, "v2"), (CANARY_WEIGHT, "1")])),
            Err(CanaryError::OfItself)
        );
        assert_eq!(
            Canary::parse(&svc("v2", &[(CANARY_OF, " "), (CANARY_WEIGHT, "1")])),
            Err(CanaryError::EmptyStable)
        );
    }

    #[test]
    fn finds_the_canary_of_a_stable_service() {
        let c = |name: &str, stable: &str| Canary {
            namespace: "llm".into(),
            service: name.into(),
            stable: stable.into(),
            weight: 5,
            model: None,
        };
        let set = CanarySet(vec![c("a", "v1"), c("b", "v1"), c("c", "v9")]);
        assert_eq!(
            set.for_stable("llm", "v1").map(|c| c.service.as_str()),
            Some("a")
        );
        assert_eq!(
            set.for_stable("llm", "v9").map(|c| c.service.as_str()),
            Some("c")
        );
        assert_eq!(set.for_stable("other", "v1"), None);
    }

    #[test]
    fn plan_adds_a_canary_pool_for_routes_on_the_stable_service() {
        let base = Config::parse(
            "listeners:\n  main: { address: \"127.0.0.1:0\" }\n\
             pools:\n  - name: llama\n    engine: sglang\n    service: { name: v1, port: http }\n\
             \x20 - name: other\n    service: { name: v9, namespace: elsewhere, port: 80 }\n\
             \x20 - name: static\n    endpoints: [\"http://127.0.0.1:1\"]\n\
             routes:\n  - model: a\n    pool: llama\n  - model: b\n    pool: llama\n\
             \x20 - model: c\n    pool: other\n  - model: d\n    pool: static\n",
            "test.yaml",
        )
        .unwrap();
        let canary = Canary {
            namespace: "llm".into(),
            service: "v2".into(),
            stable: "v1".into(),
            weight: 10,
            model: Some("a-v2".into()),
        };
        let set = CanarySet(vec![canary.clone()]);
        let planned = plan(&base, &set, "llm");
        assert_eq!(
            planned.iter().map(|p| p.route.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let p = &planned[0];
        assert_eq!((p.weight, p.model.as_deref()), (10, Some("a-v2")));
        assert_eq!(p.pool.name, "canary:llm/v2");
        assert_eq!(p.pool.engine, EngineKind::Sglang);
        let sref = p.pool.service.as_ref().unwrap();
        assert_eq!(
            (sref.name.as_str(), sref.namespace.as_deref()),
            ("v2", Some("llm"))
        );
        assert_eq!(
            sref.port,
            infergate_core::config::PortRef::Name("http".into())
        );
        // Gateway namespace `prod`: the stable Service is prod/v1, not llm/v1.
        assert!(plan(&base, &set, "prod").is_empty());
        let cfg = overlay(&base, &set, "llm");
        assert_eq!(
            cfg.pools
                .iter()
                .filter(|p| p.name == "canary:llm/v2")
                .count(),
            1
        );
        assert!(cfg.validate().is_ok());
        // No canaries: the config is unchanged.
        assert_eq!(overlay(&base, &CanarySet::default(), "llm"), base);
    }

    #[test]
    fn store_sends_only_changes() {
        let mut st = CanaryStore::default();
        st.step(Event::Init);
        st.step(Event::InitApply(svc("v1", &[])));
        assert_eq!(st.changed(), None, "nothing before the list completes");
        st.step(Event::InitDone);
        assert_eq!(st.changed(), Some(CanarySet::default()));
        let bad = st.step(Event::Apply(svc(
            "v2",
            &[(CANARY_OF, "v1"), (CANARY_WEIGHT, "x")],
        )));
        assert_eq!(bad.len(), 1);
        assert_eq!(st.changed(), None);
        st.step(Event::Apply(svc(
            "v2",
            &[(CANARY_OF, "v1"), (CANARY_WEIGHT, "10")],
        )));
        assert_eq!(st.changed().unwrap().0[0].weight, 10);
        st.step(Event::Apply(svc("v2", &[])));
        assert_eq!(st.changed(), Some(CanarySet::default()));
    }
}
