//! Discovery from EndpointSlices: the routable replicas of one Service, as a
//! stream of [`Update`]s (the same updates the static config produces).
//!
//! All slices labelled `kubernetes.io/service-name=<svc>` are watched with
//! kube-runtime's watcher and kept in a small store (like its reflector). After
//! every change the ready endpoints across all slices are recomputed,
//! deduplicated by `host:port`, and the difference to what was published last
//! goes out as `Add` / `Remove`; the first complete list and every relist (after
//! a 410) go out as one `Reset`. Rules, per the EndpointSlice API:
//! - `ready: null` counts as ready (the API says "unknown should be interpreted as ready");
//! - `terminating: true` is never routable: it is removed from new routing, and
//!   the requests already running on it finish (the pool keeps the replica
//!   alive through their load guards);
//! - only an endpoint's first address is used (the API's rule);
//! - the port is matched by the Service port's name; a numeric port is mapped to
//!   that name through the Service object (watched alongside), falling back to the
//!   endpoint port number when the Service has no such port.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ::kube::api::Api;
use ::kube::runtime::watcher::{self, Event};
use ::kube::runtime::WatchStreamExt;
use ::kube::Client;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};

use super::backoff::WatchBackoff;
use infergate_core::config::PortRef;
use infergate_core::discovery::{Endpoint, Update};

/// The label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One Service whose endpoints make up a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    pub namespace: String,
    pub name: String,
    pub port: PortRef,
}

impl std::fmt::Display for ServiceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.port {
            PortRef::Number(n) => write!(f, "{}/{}:{n}", self.namespace, self.name),
            PortRef::Name(n) => write!(f, "{}/{}:{n}", self.namespace, self.name),
        }
    }
}

/// Knobs of the watch (tests shorten the backoff).
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl WatchOptions {
    pub(crate) fn backoff(&self) -> WatchBackoff {
        WatchBackoff::new(self.backoff_min, self.backoff_max)
    }
}

/// The endpoint port wanted in each slice, once the Service port is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SlicePort {
    /// The slice port carrying this Service port name ("" for an unnamed port).
    Name(String),
    /// The slice port with this number (no Service mapping known).
    Number(u16),
}

/// Maps a route's port to the slice port: names pass through, numbers go
/// through the Service's port list to that port's name.
fn resolve_port(port: &PortRef, service: Option<&Service>) -> SlicePort {
    match port {
        PortRef::Name(n) => SlicePort::Name(n.clone()),
        PortRef::Number(n) => service
            .and_then(|s| s.spec.as_ref())
            .and_then(|spec| spec.ports.as_ref())
            .and_then(|ports| ports.iter().find(|p| p.port == i32::from(*n)))
            .map(|p| SlicePort::Name(p.name.clone().unwrap_or_default()))
            .unwrap_or(SlicePort::Number(*n)),
    }
}

fn find_port(ports: &[EndpointPort], want: &SlicePort) -> Option<u16> {
    ports
        .iter()
        .find(|p| match want {
            SlicePort::Name(n) => p.name.as_deref().unwrap_or("") == n,
            SlicePort::Number(n) => p.port == Some(i32::from(*n)),
        })
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
}

/// The routable endpoints of these slices, deduplicated and sorted by key.
fn routable<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    want: &SlicePort,
) -> Vec<Endpoint> {
    let mut out: BTreeMap<std::sync::Arc<str>, Endpoint> = BTreeMap::new();
    for slice in slices {
        let Some(port) = find_port(slice.ports.as_deref().unwrap_or(&[]), want) else {
            continue;
        };
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let host = if slice.address_type == "IPv6" && !addr.starts_with('[') {
                format!("[{addr}]")
            } else {
                addr.clone()
            };
            if let Some(e) = Endpoint::from_url(&format!("http://{host}:{port}")) {
                out.insert(e.key.clone(), e);
            }
        }
    }
    out.into_values().collect()
}

/// What the discovery state machine consumes.
#[derive(Debug)]
// One value at a time flows through the stream; boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
enum Input {
    Service(Option<Service>),
    Slices(Event<EndpointSlice>),
}

/// The reflector-like store for one Service plus what was published last.
#[derive(Debug, Default)]
struct SliceStore {
    port: Option<PortRef>,
    service: Option<Service>,
    slices: HashMap<String, EndpointSlice>,
    /// Slices of a list in progress (swapped in at `InitDone`).
    relisting: Option<HashMap<String, EndpointSlice>>,
    /// Set when the next publication must be a `Reset` (first list, relist).
    reset_pending: bool,
    synced: bool,
    published: Vec<Endpoint>,
}

impl SliceStore {
    fn new(port: PortRef) -> Self {
        SliceStore {
            port: Some(port),
            reset_pending: true,
            ..SliceStore::default()
        }
    }

    /// Applies one input; returns the updates to publish (possibly none).
    fn step(&mut self, input: Input) -> Vec<Update> {
        match input {
            Input::Service(svc) => self.service = svc,
            Input::Slices(Event::Init) => self.relisting = Some(HashMap::new()),
            Input::Slices(Event::InitApply(s)) => {
                let target = self.relisting.get_or_insert_with(HashMap::new);
                target.insert(slice_name(&s), s);
            }
            Input::Slices(Event::InitDone) => {
                self.slices = self.relisting.take().unwrap_or_default();
                self.synced = true;
                self.reset_pending = true;
            }
            Input::Slices(Event::Apply(s)) => {
                self.slices.insert(slice_name(&s), s);
            }
            Input::Slices(Event::Delete(s)) => {
                self.slices.remove(&slice_name(&s));
            }
        }
        if !self.synced {
            return Vec::new();
        }
        let Some(port) = &self.port else {
            return Vec::new();
        };
        let want = resolve_port(port, self.service.as_ref());
        let now = routable(self.slices.values(), &want);
        if std::mem::take(&mut self.reset_pending) {
            self.published = now.clone();
            return vec![Update::Reset(now)];
        }
        let (added, removed) = diff(&self.published, &now);
        self.published = now;
        let mut out = Vec::new();
        if !removed.is_empty() {
            out.push(Update::Remove(removed));
        }
        if !added.is_empty() {
            out.push(Update::Add(added));
        }
        out
    }
}

fn slice_name(s: &EndpointSlice) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

/// Both lists are sorted by key: a merge walk finds what changed. An endpoint
/// whose URL changed under the same key counts as added (the pool replaces it).
fn diff(old: &[Endpoint], new: &[Endpoint]) -> (Vec<Endpoint>, Vec<std::sync::Arc<str>>) {
    let old_by_key: HashMap<&str, &Endpoint> = old.iter().map(|e| (&*e.key, e)).collect();
    let new_keys: std::collections::HashSet<&str> = new.iter().map(|e| &*e.key).collect();
    let added = new
        .iter()
        .filter(|e| old_by_key.get(&*e.key) != Some(e))
        .cloned()
        .collect();
    let removed = old
        .iter()
        .filter(|e| !new_keys.contains(&*e.key))
        .map(|e| e.key.clone())
        .collect();
    (added, removed)
}

/// Watches the EndpointSlices (and, for a numeric port, the Service) of
/// `target` forever: failed calls are logged, counted and retried with
/// backoff; the stream never ends while polled.
pub fn watch_endpoints(
    client: Client,
    target: ServiceTarget,
    opts: &WatchOptions,
) -> impl Stream<Item = Update> + Send + 'static {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &target.namespace);
    let selector = format!("{SERVICE_NAME_LABEL}={}", target.name);
    let slice_events = watcher::watcher(slices, watcher::Config::default().labels(&selector))
        .backoff(opts.backoff())
        .filter_map(|r| async move {
            match r {
                Ok(ev) => Some(Input::Slices(ev)),
                Err(e) => {
                    super::record_watch_error("endpointslices", &e);
                    None
                }
            }
        });
    let service_events = match &target.port {
        PortRef::Number(_) => {
            let services: Api<Service> = Api::namespaced(client, &target.namespace);
            watcher::watch_object(services, &target.name)
                .backoff(opts.backoff())
                .filter_map(|r| async move {
                    match r {
                        Ok(svc) => Some(Input::Service(svc)),
                        Err(e) => {
                            super::record_watch_error("services", &e);
                            None
                        }
                    }
                })
                .boxed()
        }
        PortRef::Name(_) => futures::stream::pending().boxed(),
    };
    let mut store = SliceStore::new(target.port.clone());
    let name = target.to_string();
    futures::stream::select(slice_events, service_events).flat_map(move |input| {
        let updates = store.step(input);
        for u in &updates {
            log_update(&name, u);
        }
        futures::stream::iter(updates)
    })
}

fn log_update(target: &str, u: &Update) {
    match u {
        Update::Reset(eps) => {
            tracing::info!(service = target, endpoints = eps.len(), "endpoints listed")
        }
        Update::Add(eps) => {
            for e in eps {
                tracing::info!(service = target, endpoint = %e.key, "endpoint ready");
            }
        }
        Update::Remove(keys) => {
            for k in keys {
                tracing::info!(service = target, endpoint = %k, "endpoint gone (not ready, terminating or deleted)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ep(addr: &str, ready: Option<bool>, terminating: Option<bool>) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![addr.to_string()],
            conditions: Some(EndpointConditions {
                ready,
                serving: None,
                terminating,
            }),
            ..SliceEndpoint::default()
        }
    }

    fn slice(name: &str, port_name: &str, port: i32, eps: Vec<SliceEndpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: eps,
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ports: Some(vec![EndpointPort {
                name: Some(port_name.into()),
                port: Some(port),
                ..EndpointPort::default()
            }]),
        }
    }

    fn keys(eps: &[Endpoint]) -> Vec<&str> {
        eps.iter().map(|e| &*e.key).collect()
    }

    #[test]
    fn readiness_rules_and_dedup() {
        let a = slice(
            "a",
            "http",
            8000,
            vec![
                ep("10.0.0.1", Some(true), None),
                ep("10.0.0.2", None, None),
                ep("10.0.0.3", Some(false), None),
                ep("10.0.0.4", Some(true), Some(true)),
            ],
        );
        let b = slice(
            "b",
            "http",
            8000,
            vec![
                ep("10.0.0.1", Some(true), None),
                ep("10.0.0.5", None, Some(false)),
            ],
        );
        let got = routable([&a, &b], &SlicePort::Name("http".into()));
        assert_eq!(
            keys(&got),
            ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.5:8000"]
        );
        assert_eq!(&*got[0].base_url, "http://10.0.0.1:8000");
        // Wrong port name: nothing.
        assert!(routable([&a], &SlicePort::Name("grpc".into())).is_empty());
        let mut v6 = slice("c", "", 9000, vec![ep("fd00::1", None, None)]);
        v6.address_type = "IPv6".into();
        assert_eq!(
            keys(&routable([&v6], &SlicePort::Name(String::new()))),
            ["[fd00::1]:9000"]
        );
    }

    #[test]
    fn numeric_port_maps_through_the_service() {
        let svc = Service {
            spec: Some(ServiceSpec {
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        assert_eq!(
            resolve_port(&PortRef::Number(80), Some(&svc)),
            SlicePort::Name("http".into())
        );
        assert_eq!(
            resolve_port(&PortRef::Number(8000), Some(&svc)),
            SlicePort::Number(8000)
        );
        assert_eq!(
            resolve_port(&PortRef::Number(80), None),
            SlicePort::Number(80)
        );
        let s = slice("a", "http", 8000, vec![ep("10.0.0.1", None, None)]);
        assert_eq!(
            keys(&routable([&s], &SlicePort::Number(8000))),
            ["10.0.0.1:8000"]
        );
    }

    #[test]
    fn store_publishes_reset_then_diffs() {
        let mut st = SliceStore::new(PortRef::Name("http".into()));
        assert!(st.step(Input::Slices(Event::Init)).is_empty());
        let s1 = slice("a", "http", 8000, vec![ep("10.0.0.1", None, None)]);
        assert!(st.step(Input::Slices(Event::InitApply(s1))).is_empty());
        let out = st.step(Input::Slices(Event::InitDone));
        assert!(matches!(&out[..], [Update::Reset(e)] if keys(e) == ["10.0.0.1:8000"]));
        // A second slice adds one endpoint and duplicates the first.
        let s2 = slice(
            "b",
            "http",
            8000,
            vec![ep("10.0.0.1", None, None), ep("10.0.0.2", None, None)],
        );
        let out = st.step(Input::Slices(Event::Apply(s2.clone())));
        assert!(matches!(&out[..], [Update::Add(e)] if keys(e) == ["10.0.0.2:8000"]));
        // Deleting slice a removes nothing (10.0.0.1 is also in b).
        let s1 = slice("a", "http", 8000, vec![]);
        assert!(st.step(Input::Slices(Event::Delete(s1))).is_empty());
        // 10.0.0.2 starts terminating: removed.
        let s2b = slice(
            "b",
            "http",
            8000,
            vec![
                ep("10.0.0.1", None, None),
                ep("10.0.0.2", Some(false), Some(true)),
            ],
        );
        let out = st.step(Input::Slices(Event::Apply(s2b)));
        assert!(
            matches!(&out[..], [Update::Remove(k)] if k.len() == 1 && &*k[0] == "10.0.0.2:8000")
        );
        // A relist publishes a Reset with whatever the list holds.
        st.step(Input::Slices(Event::Init));
        st.step(Input::Slices(Event::InitApply(s2)));
        let out = st.step(Input::Slices(Event::InitDone));
        assert!(
            matches!(&out[..], [Update::Reset(e)] if keys(e) == ["10.0.0.1:8000", "10.0.0.2:8000"])
        );
    }
}
