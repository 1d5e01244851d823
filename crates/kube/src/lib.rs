//! Kubernetes integration: everything that talks to the API server.
//!
//! - [`connect`]: a client in or out of cluster, and the namespace to watch ([`Cluster`]);
//! - [`watch_endpoints`]: the EndpointSlices of a Service as a stream of
//!   [`infergate_core::discovery::Update`]s; [`spawn_discovery`] keeps one such watch
//!   per `service:` pool of the applied config;
//! - [`ConfigMapWatch`]: the routes ConfigMap, watched and hot-reloaded;
//! - [`CanaryWatch`]: canary rollouts declared by annotations on a Service, laid
//!   over the config by [`canary_overlay`] (the binary's composer applies it);
//! - [`EventPublisher`]: Kubernetes Events for rejected configuration.
//!
//! Every watch is kube-runtime's `watcher` (list, then watch from the list's
//! resource version, bookmarks, relist on 410) behind our own backoff, so a
//! failing API server is retried without spinning and recovery is fast.

mod backoff;
mod canary;
mod client;
mod configmap;
mod discovery;
mod endpoints;
mod events;

pub use canary::overlay as canary_overlay;
pub use canary::report_rollbacks as report_canary_rollbacks;
pub use canary::{
    Canary, CanaryError, CanarySet, CanaryWatch, CANARY_MODEL, CANARY_OF, CANARY_WEIGHT,
};
pub use client::{connect, Cluster, ConnectError, KubeOptions};
pub use configmap::{ConfigMapWatch, InitialConfigError, DEFAULT_CONFIGMAP_KEY};
pub use discovery::{spawn_discovery, Discovery, DiscoveryOptions};
pub use endpoints::{watch_endpoints, ServiceTarget, WatchOptions};
pub use events::EventPublisher;

/// Counts a failed list/watch call (each is retried after a backoff).
fn record_watch_error(resource: &'static str, error: &dyn std::fmt::Display) {
    tracing::warn!(resource, %error, "kubernetes watch error (retrying with backoff)");
    metrics::counter!("infergate_k8s_watch_errors_total", "resource" => resource).increment(1);
}
