//! What `infergate serve` runs around the data plane: where the config comes
//! from (a file, or the routes ConfigMap), the Kubernetes connection when one
//! is needed, and the control-plane tasks (config hot reload, EndpointSlice
//! discovery, canary annotations).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::composer::Composer;
use infergate_core::config::{Config, ConfigError};
use infergate_core::reload::{FileWatch, Source};
use infergate_kube::{
    connect, spawn_discovery, CanarySet, CanaryWatch, Cluster, ConfigMapWatch, ConnectError,
    Discovery, DiscoveryOptions, EventPublisher, InitialConfigError, KubeOptions, WatchOptions,
    DEFAULT_CONFIGMAP_KEY,
};
use infergate_proxy::Gateway;

/// The Kubernetes flags of `infergate serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeArgs {
    /// Read the config from this ConfigMap (in --namespace) and hot-reload it,
    /// instead of --config.
    #[arg(long, env = "INFERGATE_CONFIGMAP")]
    pub configmap: Option<String>,
    /// The ConfigMap key holding the config YAML.
    #[arg(long, default_value = DEFAULT_CONFIGMAP_KEY)]
    pub configmap_key: String,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, then the
    /// in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace of the ConfigMap and of Services named without one (default:
    /// POD_NAMESPACE, else the kubeconfig's or the service account's).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Ignore infergate.io/canary-* annotations on Services.
    #[arg(long)]
    pub no_canary_annotations: bool,
}

impl KubeArgs {
    fn options(&self) -> KubeOptions {
        KubeOptions {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    ConfigMap(#[from] InitialConfigError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("give --config FILE or --configmap NAME")]
    NoSource,
}

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    ConfigMap(ConfigMapWatch),
}

/// The initial config and what is needed to keep it current.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The text `config` was parsed from (not re-applied by the watches).
    pub text: String,
    pub source: ConfigSource,
    /// Connected when the config is a ConfigMap or a pool names a Service.
    pub cluster: Option<Cluster>,
    pub canary_annotations: bool,
}

/// Reads the initial config from the file or the ConfigMap, connecting to the
/// cluster when the ConfigMap or a `service:` pool needs it.
pub async fn load(config: Option<&Path>, args: &KubeArgs) -> Result<Loaded, LoadError> {
    let mut cluster = None;
    let (text, source, origin) = match (config, &args.configmap) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                file: path.display().to_string(),
                source,
            })?;
            let origin = path.display().to_string();
            (text, ConfigSource::File(path.to_path_buf()), origin)
        }
        (None, Some(name)) => {
            let c = connect(&args.options()).await?;
            let watch = ConfigMapWatch {
                key: args.configmap_key.clone(),
                ..ConfigMapWatch::new(&c.namespace, name)
            };
            let text = watch.initial(c.client.clone()).await?;
            cluster = Some(c);
            let origin = watch.origin();
            (text, ConfigSource::ConfigMap(watch), origin)
        }
        (None, None) => return Err(LoadError::NoSource),
    };
    let config = Config::parse(&text, &origin)?;
    if cluster.is_none() && config.pools.iter().any(|p| p.service.is_some()) {
        cluster = Some(connect(&args.options()).await?);
    }
    Ok(Loaded {
        config,
        text,
        source,
        cluster,
        canary_annotations: !args.no_canary_annotations,
    })
}

/// Knobs of the control plane (tests shorten them).
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub discovery: DiscoveryOptions,
    /// How long startup waits for every Service pool's first listing.
    pub initial_sync: Duration,
    pub file_poll: Duration,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            discovery: DiscoveryOptions::default(),
            initial_sync: Duration::from_secs(10),
            file_poll: Duration::from_millis(500),
        }
    }
}

/// Watches `auth.key_file` (a mounted Secret is such a file) and applies
/// every change to the gateway's keys, like the config file; a config whose
/// key file moved restarts the watch on the new path.
async fn follow_key_file(gateway: Arc<Gateway>, interval: Duration) {
    let mut configs = gateway.subscribe();
    loop {
        let path = gateway.identity().key_path();
        let watch = path.clone().map(|path| {
            let gw = gateway.clone();
            let target = move |text: &str, origin: &str| gw.apply_keys_text(text, origin);
            // Applies the file once at start (the keys just read again), then
            // every change.
            tokio::spawn(FileWatch { path, interval }.run_as(target, None, Source::KeyFile))
        });
        let alive = loop {
            if configs.changed().await.is_err() {
                break false;
            }
            if gateway.identity().key_path() != path {
                break true;
            }
        };
        if let Some(w) = watch {
            w.abort();
        }
        if !alive {
            return;
        }
    }
}

/// The running control-plane tasks; dropping it stops them all.
#[derive(Debug)]
pub struct ControlPlane {
    pub composer: Arc<Composer>,
    tasks: Vec<JoinHandle<()>>,
    _discovery: Option<Discovery>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ControlPlane {
    /// Starts the watches for `gateway` (built from `loaded.config`) and waits
    /// (at most `initial_sync`) until every Service pool has been listed once,
    /// so the gateway does not start with empty pools.
    pub async fn start(
        gateway: Arc<Gateway>,
        loaded: Loaded,
        opts: ControlOptions,
    ) -> ControlPlane {
        let namespace = loaded
            .cluster
            .as_ref()
            .map_or_else(|| "default".to_string(), |c| c.namespace.clone());
        let composer = Composer::new(gateway.clone(), loaded.config, namespace);
        let mut tasks = Vec::new();
        let mut discovery = None;
        let watch_opts: WatchOptions = opts.discovery.watch.clone();
        if let Some(cluster) = &loaded.cluster {
            let events = EventPublisher::new(cluster.client.clone());
            let mut d = spawn_discovery(
                gateway.clone(),
                cluster.client.clone(),
                cluster.namespace.clone(),
                opts.discovery.clone(),
            );
            if loaded.canary_annotations {
                let (tx, rx) = tokio::sync::watch::channel(CanarySet::default());
                let canaries = CanaryWatch {
                    options: watch_opts.clone(),
                    ..CanaryWatch::new(&cluster.namespace)
                };
                tasks.push(tokio::spawn(canaries.run(
                    cluster.client.clone(),
                    tx,
                    Some(events.clone()),
                )));
                tasks.push(tokio::spawn(infergate_kube::report_canary_rollbacks(
                    gateway.canary_rollbacks(),
                    rx.clone(),
                    cluster.namespace.clone(),
                    events.clone(),
                )));
                tasks.push(tokio::spawn(composer.clone().follow_canaries(rx)));
            }
            if let ConfigSource::ConfigMap(watch) = &loaded.source {
                let watch = ConfigMapWatch {
                    options: watch_opts,
                    ..watch.clone()
                };
                tasks.push(tokio::spawn(watch.run(
                    cluster.client.clone(),
                    composer.clone(),
                    Some(events),
                    Some(loaded.text.clone()),
                )));
            }
            if !d.wait_synced(opts.initial_sync).await {
                tracing::warn!(after = ?opts.initial_sync, "not every Service pool is listed yet; serving anyway");
            }
            discovery = Some(d);
        }
        if let ConfigSource::File(path) = &loaded.source {
            let watch = FileWatch {
                path: path.clone(),
                interval: opts.file_poll,
            };
            tasks.push(tokio::spawn(watch.run(composer.clone(), Some(loaded.text))));
        }
        tasks.push(tokio::spawn(follow_key_file(
            gateway.clone(),
            opts.file_poll,
        )));
        ControlPlane {
            composer,
            tasks,
            _discovery: discovery,
        }
    }
}
