//! Hot reload of the configuration: the contract between a config source (a
//! watched file here, the routes ConfigMap in `kube::configmap`) and whatever
//! applies a config, plus the file watcher itself.
//!
//! A valid change is swapped in atomically by the target; an invalid one is
//! rejected with the error logged and counted, and the last good config stays.
//! The file is polled (mtime, size, then a content hash), which works the same on
//! every filesystem and with the symlink swaps of a mounted ConfigMap volume.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Why a new configuration was not applied (the previous one stays in force).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Applies a complete configuration given as YAML text, atomically, or rejects it.
/// `origin` names the source in error messages (a path, `configmap ns/name`).
pub trait ConfigTarget: Send + Sync + 'static {
    fn apply_text(&self, yaml: &str, origin: &str) -> Result<(), Rejected>;
}

impl<F> ConfigTarget for F
where
    F: Fn(&str, &str) -> Result<(), Rejected> + Send + Sync + 'static,
{
    fn apply_text(&self, yaml: &str, origin: &str) -> Result<(), Rejected> {
        self(yaml, origin)
    }
}

impl<T: ConfigTarget> ConfigTarget for std::sync::Arc<T> {
    fn apply_text(&self, yaml: &str, origin: &str) -> Result<(), Rejected> {
        (**self).apply_text(yaml, origin)
    }
}

/// Where a configuration came from (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    File,
    ConfigMap,
    /// `auth.key_file`.
    KeyFile,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::ConfigMap => "configmap",
            Source::KeyFile => "key_file",
        }
    }
}

/// Applies `yaml` to `target` and records the outcome: a log line, the
/// `infergate_config_reloads_total{source,result}` counter and the
/// `infergate_config_last_reload_success` gauge (1 = the last attempt applied).
pub fn apply_and_record(
    target: &dyn ConfigTarget,
    source: Source,
    origin: &str,
    yaml: &str,
) -> Result<(), Rejected> {
    let result = target.apply_text(yaml, origin);
    record_outcome(source, origin, &result);
    result
}

/// Logs and counts the outcome of one reload attempt (see [`apply_and_record`]).
pub fn record_outcome(source: Source, origin: &str, result: &Result<(), Rejected>) {
    let outcome = match result {
        Ok(()) => {
            tracing::info!(source = source.as_str(), origin, "configuration reloaded");
            "applied"
        }
        Err(e) => {
            tracing::error!(source = source.as_str(), origin, error = %e,
                "configuration rejected; keeping the last good one");
            "rejected"
        }
    };
    metrics::counter!("infergate_config_reloads_total",
        "source" => source.as_str(), "result" => outcome)
    .increment(1);
    metrics::gauge!("infergate_config_last_reload_success", "source" => source.as_str())
        .set(if result.is_ok() { 1.0 } else { 0.0 });
}

/// A content fingerprint, to skip re-applying identical text.
pub fn fingerprint(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// Watches a config file and applies every change to it.
#[derive(Debug, Clone)]
pub struct FileWatch {
    pub path: PathBuf,
    /// How often the file's metadata is checked.
    pub interval: Duration,
}

impl FileWatch {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileWatch {
            path: path.into(),
            interval: Duration::from_millis(500),
        }
    }

    /// Runs forever. `applied` is the text already in force (not re-applied).
    /// A file that disappears or cannot be read is logged once and keeps the
    /// current config; the watch picks it up again when it comes back.
    pub async fn run(self, target: impl ConfigTarget, applied: Option<String>) {
        self.run_as(target, applied, Source::File).await
    }

    /// [`FileWatch::run`] for a file other than the config (`source` labels
    /// its log lines and metrics).
    pub async fn run_as(self, target: impl ConfigTarget, applied: Option<String>, source: Source) {
        let origin = self.path.display().to_string();
        let mut last_hash = applied.as_deref().map(fingerprint);
        let mut last_meta: Option<(SystemTime, u64)> = None;
        let mut read_error_logged = false;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let meta = match tokio::fs::metadata(&self.path).await {
                Ok(m) => (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()),
                Err(e) => {
                    if !std::mem::replace(&mut read_error_logged, true) {
                        tracing::warn!(path = %origin, error = %e, "config file unreadable; keeping the current config");
                    }
                    last_meta = None;
                    continue;
                }
            };
            if last_meta == Some(meta) {
                continue;
            }
            let text = match tokio::fs::read_to_string(&self.path).await {
                Ok(t) => t,
                Err(e) => {
                    if !std::mem::replace(&mut read_error_logged, true) {
                        tracing::warn!(path = %origin, error = %e, "config file unreadable; keeping the current config");
                    }
                    continue;
                }
            };
            read_error_logged = false;
            last_meta = Some(meta);
            let hash = fingerprint(&text);
            if last_hash == Some(hash) {
                continue;
            }
            last_hash = Some(hash);
            let _ = apply_and_record(&target, source, &origin, &text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A target accepting any YAML mapping with a `version` key.
    fn recording_target() -> (impl ConfigTarget, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let target = move |yaml: &str, _origin: &str| -> Result<(), Rejected> {
            let v: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(yaml).map_err(|e| Rejected(e.to_string()))?;
            let version = v
                .get("version")
                .and_then(|v| v.as_str())
                .ok_or_else(|| Rejected("missing version".into()))?;
            s.lock().unwrap().push(version.to_string());
            Ok(())
        };
        (target, seen)
    }

    async fn wait_for(seen: &Arc<Mutex<Vec<String>>>, want: &[&str]) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline {
            if *seen.lock().unwrap() == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn file_changes_apply_within_a_second_and_bad_ones_keep_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, "version: a\n").unwrap();
        let (target, seen) = recording_target();
        let watch = FileWatch {
            path: path.clone(),
            interval: Duration::from_millis(50),
        };
        let task = tokio::spawn(watch.run(target, Some("version: a\n".into())));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "the initial text is not re-applied"
        );

        std::fs::write(&path, "version: b\n").unwrap();
        assert!(wait_for(&seen, &["b"]).await, "{:?}", seen.lock().unwrap());
        // Invalid: rejected, nothing applied, the last good (b) stays in force.
        std::fs::write(&path, "version: [unclosed\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*seen.lock().unwrap(), ["b"]);
        // Deleted: keeps going; recreated with a change: applied.
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        std::fs::write(&path, "version: c\n").unwrap();
        assert!(
            wait_for(&seen, &["b", "c"]).await,
            "{:?}",
            seen.lock().unwrap()
        );
        task.abort();
    }
}
