//! Discovery from a cluster: [`spawn_discovery`] follows the applied config: for every pool with a
//!   `service:` it runs one EndpointSlice watch (through the first-scrape gate)
//!   feeding `pool.apply`, restarts it when the pool's Service changes and stops
//!   it when the pool goes away.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ::kube::Client;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::endpoints::{watch_endpoints, ServiceTarget, WatchOptions};
use infergate_core::config::{PoolSource, ServiceRef};
use infergate_core::dataplane::Dataplane;
use infergate_core::discovery::{run_gated, GateOptions};

/// Knobs of the discovery side.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryOptions {
    pub watch: WatchOptions,
    pub gate: GateOptions,
}

/// The running discovery reconciler; dropping it stops every watch.
#[derive(Debug)]
pub struct Discovery {
    task: JoinHandle<()>,
    synced: watch::Receiver<bool>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discovery {
    /// Waits until every Service pool of the current config has been listed
    /// once (or `timeout` passed); returns whether they all were.
    pub async fn wait_synced(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.synced.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The Service a pool names, with the default namespace filled in.
fn service_target(sref: &ServiceRef, namespace: &str) -> ServiceTarget {
    ServiceTarget {
        namespace: sref
            .namespace
            .clone()
            .unwrap_or_else(|| namespace.to_string()),
        name: sref.name.clone(),
        port: sref.port.clone(),
    }
}

/// A running watch feeding one pool: which Service, into which pool object.
struct PoolWatch {
    target: ServiceTarget,
    pool: usize,
    task: JoinHandle<()>,
}

impl Drop for PoolWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the reconciler (see the module docs).
pub fn spawn_discovery(
    gateway: Arc<dyn Dataplane>,
    client: Client,
    namespace: String,
    opts: DiscoveryOptions,
) -> Discovery {
    let (synced_tx, synced) = watch::channel(false);
    let task = tokio::spawn(reconcile(gateway, client, namespace, opts, synced_tx));
    Discovery { task, synced }
}

async fn reconcile(
    gateway: Arc<dyn Dataplane>,
    client: Client,
    namespace: String,
    opts: DiscoveryOptions,
    synced_tx: watch::Sender<bool>,
) {
    let mut configs = gateway.subscribe();
    let (listed_tx, mut listed) = mpsc::unbounded_channel::<(String, usize)>();
    let mut running: HashMap<String, PoolWatch> = HashMap::new();
    let mut unsynced: HashSet<String> = HashSet::new();
    loop {
        let config = configs.borrow_and_update().clone();
        let mut wanted = HashSet::new();
        for pc in &config.pools {
            let PoolSource::Service(sref) = pc.source() else {
                continue;
            };
            let Some(pool) = gateway.pool(&pc.name) else {
                continue;
            };
            wanted.insert(pc.name.clone());
            let target = service_target(sref, &namespace);
            let pool_id = Arc::as_ptr(&pool) as usize;
            if running
                .get(&pc.name)
                .is_some_and(|w| w.target == target && w.pool == pool_id)
            {
                continue;
            }
            tracing::info!(pool = %pc.name, service = %target, "watching endpoints");
            let updates = watch_endpoints(client.clone(), target.clone(), &opts.watch);
            let listed_tx = listed_tx.clone();
            let name = pc.name.clone();
            let gate = opts.gate.clone();
            let (engine, probes) = (pool.engine, pool.client().clone());
            let task = tokio::spawn(async move {
                let mut first = true;
                run_gated(updates, engine, probes, gate, move |u| {
                    pool.apply(u);
                    if std::mem::take(&mut first) {
                        let _ = listed_tx.send((name.clone(), pool_id));
                    }
                })
                .await;
            });
            unsynced.insert(pc.name.clone());
            running.insert(
                pc.name.clone(),
                PoolWatch {
                    target,
                    pool: pool_id,
                    task,
                },
            );
        }
        running.retain(|name, _| wanted.contains(name));
        unsynced.retain(|name| wanted.contains(name));
        synced_tx.send_replace(unsynced.is_empty());
        loop {
            tokio::select! {
                changed = configs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                Some((name, pool_id)) = listed.recv() => {
                    if running.get(&name).is_some_and(|w| w.pool == pool_id) {
                        unsynced.remove(&name);
                        synced_tx.send_replace(unsynced.is_empty());
                    }
                }
            }
        }
    }
}
