//! The config the gateway runs: the base config (from the file or the routes
//! ConfigMap) with the canary annotations laid over it. [`Composer`] is the
//! [`ConfigTarget`] the file watch and the ConfigMap watch feed: it parses a
//! new config, overlays the canaries and swaps the result in with
//! `Dataplane::apply_config` (atomic; in-flight requests keep their
//! snapshot), keeping the last good config on error. It runs with or without
//! a cluster (without one, no canary annotation ever arrives).

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use infergate_core::config::Config;
use infergate_core::dataplane::Dataplane;
use infergate_core::reload::{ConfigTarget, Rejected};
use infergate_kube::CanarySet;

/// Composes the applied config from the base config (file or ConfigMap) and
/// the canary annotations.
pub struct Composer {
    gateway: Arc<dyn Dataplane>,
    /// Held while a config is applied (sync, never across an await), so a
    /// config change and a canary change never interleave.
    state: Mutex<ComposerState>,
}

struct ComposerState {
    base: Config,
    canaries: CanarySet,
    namespace: String,
}

impl std::fmt::Debug for Composer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Composer").finish_non_exhaustive()
    }
}

impl Composer {
    /// `base` is the config the gateway was built from; `namespace` is where
    /// Services without a namespace live.
    pub fn new(
        gateway: Arc<dyn Dataplane>,
        base: Config,
        namespace: impl Into<String>,
    ) -> Arc<Composer> {
        Arc::new(Composer {
            gateway,
            state: Mutex::new(ComposerState {
                base,
                canaries: CanarySet::default(),
                namespace: namespace.into(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ComposerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a new canary set over the current base config.
    fn set_canaries(&self, canaries: CanarySet) -> Result<(), Rejected> {
        let mut st = self.lock();
        let effective = infergate_kube::canary_overlay(&st.base, &canaries, &st.namespace);
        self.gateway
            .apply_config(effective)
            .map_err(|e| Rejected(format!("canary annotations: {e}")))?;
        st.canaries = canaries;
        Ok(())
    }

    /// Follows a canary watch until its sender goes away.
    pub async fn follow_canaries(self: Arc<Self>, mut rx: watch::Receiver<CanarySet>) {
        loop {
            let set = rx.borrow_and_update().clone();
            if let Err(e) = self.set_canaries(set) {
                tracing::error!(error = %e, "canary change not applied");
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl ConfigTarget for Composer {
    fn apply_text(&self, yaml: &str, origin: &str) -> Result<(), Rejected> {
        let base = Config::parse(yaml, origin).map_err(|e| Rejected(e.to_string()))?;
        let mut st = self.lock();
        let effective = infergate_kube::canary_overlay(&base, &st.canaries, &st.namespace);
        self.gateway
            .apply_config(effective)
            .map_err(|e| Rejected(e.to_string()))?;
        st.base = base;
        Ok(())
    }
}
