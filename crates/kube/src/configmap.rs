//! The routes ConfigMap, watched: every change to its config key is applied
//! through [`infergate_core::reload::apply_and_record`] (atomic swap, or rejected with a
//! log line and a metric while the last good config stays), and a rejection is
//! also published as a Warning Event on the ConfigMap where RBAC allows it.

use ::kube::api::Api;
use ::kube::runtime::watcher;
use ::kube::runtime::WatchStreamExt;
use ::kube::{Client, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;

use super::endpoints::WatchOptions;
use super::events::{object_ref, EventPublisher};
use infergate_core::reload::{
    apply_and_record, fingerprint, record_outcome, ConfigTarget, Rejected, Source,
};

/// The default key of the config YAML inside the ConfigMap.
pub const DEFAULT_CONFIGMAP_KEY: &str = "config.yaml";

/// Which ConfigMap (and key) holds the gateway config.
#[derive(Debug, Clone)]
pub struct ConfigMapWatch {
    pub namespace: String,
    pub name: String,
    pub key: String,
    pub options: WatchOptions,
}

/// Why the initial config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InitialConfigError {
    #[error("reading ConfigMap {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: ::kube::Error,
    },
    #[error("ConfigMap {0}/{1} does not exist")]
    Missing(String, String),
    #[error(transparent)]
    NoKey(Rejected),
}

impl ConfigMapWatch {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ConfigMapWatch {
            namespace: namespace.into(),
            name: name.into(),
            key: DEFAULT_CONFIGMAP_KEY.to_string(),
            options: WatchOptions::default(),
        }
    }

    /// How errors name this source.
    pub fn origin(&self) -> String {
        format!(
            "configmap {}/{} key {}",
            self.namespace, self.name, self.key
        )
    }

    fn text_of<'a>(&self, cm: &'a ConfigMap) -> Result<&'a str, Rejected> {
        cm.data
            .as_ref()
            .and_then(|d| d.get(&self.key))
            .map(String::as_str)
            .ok_or_else(|| {
                Rejected(format!(
                    "ConfigMap {}/{} has no data key {:?}",
                    self.namespace, self.name, self.key
                ))
            })
    }

    /// Reads the config text once (at startup, before serving).
    pub async fn initial(&self, client: Client) -> Result<String, InitialConfigError> {
        let api: Api<ConfigMap> = Api::namespaced(client, &self.namespace);
        let cm = api
            .get_opt(&self.name)
            .await
            .map_err(|source| InitialConfigError::Api {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            })?
            .ok_or_else(|| {
                InitialConfigError::Missing(self.namespace.clone(), self.name.clone())
            })?;
        self.text_of(&cm)
            .map(str::to_string)
            .map_err(InitialConfigError::NoKey)
    }

    /// Watches the ConfigMap forever, applying each new content to `target`.
    /// `applied` is the text already in force (not re-applied). A deleted
    /// ConfigMap keeps the current config (logged).
    pub async fn run(
        self,
        client: Client,
        target: impl ConfigTarget,
        events: Option<EventPublisher>,
        applied: Option<String>,
    ) {
        let api: Api<ConfigMap> = Api::namespaced(client, &self.namespace);
        let mut stream = watcher::watch_object(api, &self.name)
            .backoff(self.options.backoff())
            .boxed();
        let origin = self.origin();
        let mut last_hash = applied.as_deref().map(fingerprint);
        while let Some(item) = stream.next().await {
            let cm = match item {
                Ok(Some(cm)) => cm,
                Ok(None) => {
                    tracing::warn!(
                        origin,
                        "routes ConfigMap is absent; keeping the current config"
                    );
                    continue;
                }
                Err(e) => {
                    super::record_watch_error("configmaps", &e);
                    continue;
                }
            };
            let result = match self.text_of(&cm) {
                Ok(text) => {
                    let hash = fingerprint(text);
                    if last_hash == Some(hash) {
                        continue;
                    }
                    last_hash = Some(hash);
                    apply_and_record(&target, Source::ConfigMap, &origin, text)
                }
                Err(e) => {
                    last_hash = None;
                    let result = Err(e);
                    record_outcome(Source::ConfigMap, &origin, &result);
                    result
                }
            };
            if let (Err(e), Some(events)) = (result, &events) {
                let regarding = object_ref::<ConfigMap>(&self.namespace, &self.name, cm.uid());
                events.warn(
                    regarding,
                    "ConfigRejected",
                    "Reload",
                    format!("infergate kept its last good config: {e}"),
                );
            }
        }
    }
}
