//! Connecting to the API server: an explicit kubeconfig (`--kubeconfig`),
//! else `KUBECONFIG` / `~/.kube/config`, else the in-cluster service account;
//! and the namespace to watch: the flag, else `POD_NAMESPACE`, else the
//! kubeconfig context's or the service account's namespace.

use std::path::PathBuf;

use ::kube::config::{KubeConfigOptions, Kubeconfig};

/// Where to find the cluster (the `serve --kubeconfig/--namespace/--context` flags).
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: ::kube::config::KubeconfigError,
    },
    #[error("no kubeconfig and not running in a cluster: {0}")]
    Infer(#[from] ::kube::config::InferConfigError),
    #[error("kubeconfig: {0}")]
    Config(#[from] ::kube::config::KubeconfigError),
    #[error("building the kubernetes client: {0}")]
    Client(#[from] ::kube::Error),
}

/// A connected client and the namespace it watches by default.
#[derive(Clone)]
pub struct Cluster {
    pub client: ::kube::Client,
    pub namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Builds the client as described in the module docs.
pub async fn connect(opts: &KubeOptions) -> Result<Cluster, ConnectError> {
    let kc_opts = KubeConfigOptions {
        context: opts.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| ConnectError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            ::kube::Config::from_custom_kubeconfig(kubeconfig, &kc_opts).await?
        }
        None if opts.context.is_some() => ::kube::Config::from_kubeconfig(&kc_opts).await?,
        None => ::kube::Config::infer().await?,
    };
    let namespace = pick_namespace(
        opts.namespace.as_deref(),
        std::env::var("POD_NAMESPACE").ok().as_deref(),
        &config.default_namespace,
    );
    let client = ::kube::Client::try_from(config)?;
    Ok(Cluster { client, namespace })
}

/// Flag first, then the pod's namespace (downward API), then the config's.
fn pick_namespace(flag: Option<&str>, pod: Option<&str>, config_default: &str) -> String {
    flag.or(pod)
        .filter(|ns| !ns.is_empty())
        .unwrap_or(config_default)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_precedence() {
        assert_eq!(pick_namespace(Some("a"), Some("b"), "c"), "a");
        assert_eq!(pick_namespace(None, Some("b"), "c"), "b");
        assert_eq!(pick_namespace(None, None, "c"), "c");
        assert_eq!(pick_namespace(None, Some(""), "c"), "c");
    }
}
