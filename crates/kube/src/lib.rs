//! Kubernetes integration: everything that talks to the API server.
//!
//! - [`client`]: building a client in or out of cluster and picking the namespace;
//! - [`endpoints`]: EndpointSlices of a Service -> [`infergate_core::discovery::Update`]s;
//! - [`configmap`]: the routes ConfigMap, watched and hot-reloaded;
//! - [`canary`]: canary rollouts declared by annotations on a Service;
//! - [`events`]: Kubernetes Events for rejected configuration.
//!
//! Every watch is kube-runtime's `watcher` (list, then watch from the list's
//! resource version, bookmarks, relist on 410) behind our own backoff, so a
//! failing API server is retried without spinning and recovery is fast.

pub mod backoff;
pub mod canary;
pub mod client;
pub mod configmap;
pub mod control;
pub mod endpoints;
pub mod events;

/// Counts a failed list/watch call (each is retried after a backoff).
pub(crate) fn record_watch_error(resource: &'static str, error: &dyn std::fmt::Display) {
    tracing::warn!(resource, %error, "kubernetes watch error (retrying with backoff)");
    metrics::counter!("infergate_k8s_watch_errors_total", "resource" => resource).increment(1);
}
