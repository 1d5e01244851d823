//! The interface a control plane drives: a running data plane whose config is
//! replaced as a whole and whose pools discovery feeds. The proxy crate
//! implements it; the Kubernetes and file control planes use only this, so
//! neither depends on the proxy.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::pool::Pool;

pub trait Dataplane: Send + Sync + 'static {
    /// Validates `config` and swaps it in atomically (in-flight requests keep
    /// the snapshot they started with); on error the current config stays.
    fn apply_config(&self, config: Config) -> Result<(), ConfigError>;
    /// Notifies on every applied config (for discovery to start or stop watches).
    fn subscribe(&self) -> watch::Receiver<Arc<Config>>;
    /// The pool named `name`, as currently configured.
    fn pool(&self, name: &str) -> Option<Arc<Pool>>;
}
