//! The first-scrape gate between discovery and a pool: an endpoint reported
//! ready by Kubernetes becomes a member of the pool (and so routable, see
//! `pool::Routability`) only once its metrics endpoint answered 200 once
//! (`/metrics`; `/health` for llama.cpp, whose `/metrics` is optional), so a
//! model still loading, or a pod whose readiness probe is too lenient, gets no
//! request. Probes go through the pool's replica client (shared with the
//! scraper, which keeps watching the replica after that).
//!
//! Updates pass through in order: removals are immediate (no new requests for
//! a terminating endpoint), a relist (`Reset`) keeps every endpoint already
//! admitted without probing it again, and probes of endpoints that went away
//! are cancelled. The first listing waits for its endpoints' first probes (at
//! most one probe timeout), so a pool starts populated.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::probe::ReplicaClient;
use super::{Endpoint, Update};
use infergate_protocol::EngineKind;

/// How endpoints are probed before they are admitted.
#[derive(Debug, Clone)]
pub struct GateOptions {
    /// Off: every discovered endpoint is routable at once.
    pub enabled: bool,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// First retry delay after a failed probe (doubles up to `max_interval`).
    pub interval: Duration,
    pub max_interval: Duration,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            enabled: true,
            timeout: Duration::from_secs(2),
            interval: Duration::from_millis(250),
            max_interval: Duration::from_secs(5),
        }
    }
}

/// The path whose first 200 admits an endpoint of this engine.
pub(crate) fn probe_path(engine: EngineKind) -> &'static str {
    match engine {
        EngineKind::LlamaCpp => "/health",
        EngineKind::Vllm | EngineKind::Sglang => "/metrics",
    }
}

/// Probes until the endpoint answers 200 (the response body is drained).
async fn probe_until_ok(
    client: ReplicaClient,
    ep: Endpoint,
    path: &'static str,
    opts: GateOptions,
) -> Endpoint {
    let mut delay = opts.interval;
    let uri = ReplicaClient::uri(&ep, path);
    loop {
        let ok = match &uri {
            Some(u) => client.status(u.clone(), opts.timeout).await == Some(http::StatusCode::OK),
            None => false,
        };
        if ok {
            return ep;
        }
        tracing::debug!(endpoint = %ep.key, path, "not serving yet (first scrape failed)");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(opts.max_interval);
    }
}

/// The gate's bookkeeping for one pool.
struct Gate {
    client: ReplicaClient,
    path: &'static str,
    opts: GateOptions,
    admitted: HashMap<Arc<str>, Endpoint>,
    probing: HashMap<Arc<str>, (Endpoint, JoinHandle<()>)>,
    done: mpsc::UnboundedSender<Endpoint>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        for (_, (_, h)) in self.probing.drain() {
            h.abort();
        }
    }
}

impl Gate {
    fn start_probe(&mut self, ep: Endpoint) {
        if let Some((old, _)) = self.probing.get(&ep.key) {
            if *old == ep {
                return;
            }
        }
        self.cancel_probe(&ep.key);
        let done = self.done.clone();
        let fut = probe_until_ok(
            self.client.clone(),
            ep.clone(),
            self.path,
            self.opts.clone(),
        );
        let h = tokio::spawn(async move {
            let _ = done.send(fut.await);
        });
        self.probing.insert(ep.key.clone(), (ep, h));
    }

    fn cancel_probe(&mut self, key: &str) {
        if let Some((_, h)) = self.probing.remove(key) {
            h.abort();
        }
    }

    /// Handles one discovery update; returns what the pool must apply.
    fn on_update(&mut self, u: Update) -> Option<Update> {
        match u {
            Update::Reset(eps) => {
                let wanted: HashSet<Arc<str>> = eps.iter().map(|e| e.key.clone()).collect();
                let stale: Vec<Arc<str>> = self
                    .probing
                    .keys()
                    .filter(|k| !wanted.contains(*k))
                    .cloned()
                    .collect();
                for k in stale {
                    self.cancel_probe(&k);
                }
                self.admitted.retain(|k, _| wanted.contains(k));
                let mut keep = Vec::new();
                for e in eps {
                    if self.admitted.get(&e.key) == Some(&e) {
                        keep.push(e);
                    } else {
                        self.admitted.remove(&e.key);
                        self.start_probe(e);
                    }
                }
                Some(Update::Reset(keep))
            }
            Update::Add(eps) => {
                for e in eps {
                    if self.admitted.get(&e.key) != Some(&e) {
                        self.start_probe(e);
                    }
                }
                None
            }
            Update::Remove(keys) => {
                let mut gone = Vec::new();
                for k in keys {
                    self.cancel_probe(&k);
                    if self.admitted.remove(&k).is_some() {
                        gone.push(k);
                    }
                }
                (!gone.is_empty()).then_some(Update::Remove(gone))
            }
        }
    }

    /// Everything admitted, as one `Reset`.
    fn snapshot(&self) -> Update {
        let mut eps: Vec<Endpoint> = self.admitted.values().cloned().collect();
        eps.sort_by(|a, b| a.key.cmp(&b.key));
        Update::Reset(eps)
    }

    fn on_probe_ok(&mut self, ep: Endpoint) -> Option<Update> {
        // Only if it is still wanted (not removed while the probe finished).
        match self.probing.get(&ep.key) {
            Some((wanted, _)) if *wanted == ep => {
                self.probing.remove(&ep.key);
                tracing::info!(endpoint = %ep.key, "endpoint admitted: first scrape succeeded");
                self.admitted.insert(ep.key.clone(), ep.clone());
                Some(Update::Add(vec![ep]))
            }
            _ => None,
        }
    }
}

/// Feeds `updates` through the gate into `apply` until the stream ends,
/// probing with `client` (the pool's, `Pool::client`).
pub async fn run_gated(
    updates: impl Stream<Item = Update> + Send,
    engine: EngineKind,
    client: ReplicaClient,
    opts: GateOptions,
    mut apply: impl FnMut(Update) + Send,
) {
    let mut updates = std::pin::pin!(updates);
    if !opts.enabled {
        while let Some(u) = updates.next().await {
            apply(u);
        }
        return;
    }
    let (done, mut probed) = mpsc::unbounded_channel();
    let mut gate = Gate {
        client,
        path: probe_path(engine),
        opts,
        admitted: HashMap::new(),
        probing: HashMap::new(),
        done,
    };
    // The first listing is published once its endpoints' first probes are
    // done (or one probe timeout passed), as one `Reset`: the pool then
    // starts populated instead of filling one `Add` at a time, and whoever
    // waits for the first update (startup) sees the replicas that serve.
    let mut first_listing: Option<tokio::time::Instant> = None;
    let mut listed = false;
    loop {
        let initial_deadline = first_listing.unwrap_or_else(tokio::time::Instant::now);
        let out = tokio::select! {
            u = updates.next() => match u {
                Some(u) => {
                    let is_reset = matches!(u, Update::Reset(_));
                    let out = gate.on_update(u);
                    if is_reset && !listed {
                        listed = true;
                        first_listing = Some(tokio::time::Instant::now() + gate.opts.timeout);
                    }
                    out
                }
                None => return,
            },
            Some(ep) = probed.recv() => gate.on_probe_ok(ep),
            _ = tokio::time::sleep_until(initial_deadline), if first_listing.is_some() => {
                first_listing = None;
                Some(gate.snapshot())
            }
        };
        if first_listing.is_some() {
            if gate.probing.is_empty() {
                first_listing = None;
                apply(gate.snapshot());
            }
            continue;
        }
        if let Some(u) = out {
            apply(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ep(port: u16) -> Endpoint {
        Endpoint::from_url(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    fn gate() -> (Gate, mpsc::UnboundedReceiver<Endpoint>) {
        let (done, rx) = mpsc::unbounded_channel();
        let g = Gate {
            client: ReplicaClient::default(),
            path: "/metrics",
            opts: GateOptions::default(),
            admitted: HashMap::new(),
            probing: HashMap::new(),
            done,
        };
        (g, rx)
    }

    #[tokio::test]
    async fn admits_only_after_the_probe_and_keeps_admitted_on_relist() {
        let (mut g, _rx) = gate();
        assert_eq!(g.on_update(Update::Add(vec![ep(1), ep(2)])), None);
        assert_eq!(g.probing.len(), 2);
        assert_eq!(g.on_probe_ok(ep(1)), Some(Update::Add(vec![ep(1)])));
        // A relist keeps 1 without probing, drops 2's probe, probes 3.
        assert_eq!(
            g.on_update(Update::Reset(vec![ep(1), ep(3)])),
            Some(Update::Reset(vec![ep(1)]))
        );
        assert!(g.probing.contains_key("127.0.0.1:3") && !g.probing.contains_key("127.0.0.1:2"));
        // A late probe result for 2 is ignored.
        assert_eq!(g.on_probe_ok(ep(2)), None);
        // Removing a probing endpoint emits nothing; removing an admitted one does.
        assert_eq!(g.on_update(Update::Remove(vec![ep(3).key])), None);
        assert_eq!(
            g.on_update(Update::Remove(vec![ep(1).key])),
            Some(Update::Remove(vec![ep(1).key]))
        );
        assert!(g.probing.is_empty() && g.admitted.is_empty());
    }

    /// A replica answering `GET /metrics` with 200.
    async fn metrics_server() -> (std::net::SocketAddr, JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from("ok\n")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn the_first_listing_waits_for_its_probes_and_then_resets_once() {
        let (up, server) = metrics_server().await;
        let up = Endpoint::from_url(&format!("http://{up}")).unwrap();
        // Port 9 on loopback: nothing listens, the probe keeps failing.
        let down = ep(9);
        let (tx, rx) = mpsc::unbounded_channel();
        let updates =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|u| (u, rx)) });
        let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = applied.clone();
        let opts = GateOptions {
            timeout: Duration::from_millis(300),
            interval: Duration::from_millis(20),
            ..GateOptions::default()
        };
        let task = tokio::spawn(run_gated(
            updates,
            EngineKind::Vllm,
            ReplicaClient::default(),
            opts,
            move |u| a.lock().unwrap().push(u),
        ));
        tx.send(Update::Reset(vec![up.clone(), down.clone()]))
            .unwrap();
        // The reachable one alone, in one Reset, once the probe timeout passed.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            applied.lock().unwrap().is_empty(),
            "waits for the first probes"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(*applied.lock().unwrap(), [Update::Reset(vec![up.clone()])]);
        // Later changes flow as usual.
        tx.send(Update::Remove(vec![up.key.clone()])).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            applied.lock().unwrap().last(),
            Some(&Update::Remove(vec![up.key.clone()]))
        );
        task.abort();
        server.abort();
    }

    #[test]
    fn probe_paths() {
        assert_eq!(probe_path(EngineKind::Vllm), "/metrics");
        assert_eq!(probe_path(EngineKind::LlamaCpp), "/health");
    }
}
