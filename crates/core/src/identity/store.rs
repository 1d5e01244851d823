//! The live authentication state: the [`Authenticator`] snapshot (arc-swap,
//! read lock-free per request) rebuilt whenever the config or the key file
//! changes. The config's `auth:` section arrives with each config; the key
//! file has its own watch (`reload::FileWatch` on `auth.key_file`, see
//! [`IdentityStore::apply_keys_text`]), so rotating keys needs no config
//! change, and a mounted Kubernetes Secret is just such a file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::authenticate::Authenticator;
use super::config::{AuthConfig, ADMIN_TOKEN_ENV};
use super::keys::{digest, KeyDigest, KeyFile};
use crate::reload::{ConfigTarget, Rejected};

#[derive(Debug, Default)]
struct State {
    auth: AuthConfig,
    /// The key file in force and the path it was read from.
    keys: Arc<KeyFile>,
    key_path: Option<PathBuf>,
    admin_token: Option<KeyDigest>,
}

/// Authentication for a gateway: the current snapshot and what it is built from.
#[derive(Debug, Default)]
pub struct IdentityStore {
    current: ArcSwap<Authenticator>,
    state: Mutex<State>,
}

/// An `auth:` section checked and with its files read, ready to be swapped
/// in with the rest of its config.
#[derive(Debug)]
pub struct PreparedAuth {
    auth: AuthConfig,
    keys: Option<(PathBuf, Arc<KeyFile>)>,
    admin_token: Option<KeyDigest>,
}

impl IdentityStore {
    /// The snapshot for one request.
    pub fn authenticator(&self) -> arc_swap::Guard<Arc<Authenticator>> {
        self.current.load()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what `auth` needs: the key file when its path is new (an
    /// unchanged path keeps the keys its watch last loaded) and the admin
    /// token. Nothing changes until [`IdentityStore::commit`].
    pub fn prepare(&self, auth: &AuthConfig) -> Result<PreparedAuth, String> {
        let keys = match &auth.key_file {
            Some(path) if self.lock().key_path.as_deref() != Some(path.as_path()) => {
                Some((path.clone(), Arc::new(read_key_file(path)?)))
            }
            _ => None,
        };
        let admin_token = match &auth.admin.token_file {
            Some(path) => {
                let t = std::fs::read_to_string(path).map_err(|e| {
                    format!("auth.admin.token_file {}: cannot read: {e}", path.display())
                })?;
                Some(token_digest(&t).ok_or_else(|| {
                    format!(
                        "auth.admin.token_file {}: the file is empty",
                        path.display()
                    )
                })?)
            }
            None => std::env::var(ADMIN_TOKEN_ENV)
                .ok()
                .and_then(|t| token_digest(&t)),
        };
        Ok(PreparedAuth {
            auth: auth.clone(),
            keys,
            admin_token,
        })
    }

    /// Swaps in a prepared `auth:` section.
    pub fn commit(&self, p: PreparedAuth) {
        let mut st = self.lock();
        st.auth = p.auth;
        st.admin_token = p.admin_token;
        match p.keys {
            Some((path, keys)) => {
                st.key_path = Some(path);
                st.keys = keys;
            }
            None if st.auth.key_file.is_none() => {
                st.key_path = None;
                st.keys = Arc::default();
            }
            None => {}
        }
        self.rebuild(&st);
    }

    /// Applies a new text of the key file (its watch calls this); an invalid
    /// file is rejected and the keys in force stay.
    pub fn apply_keys_text(&self, text: &str, origin: &str) -> Result<(), Rejected> {
        let keys = KeyFile::parse(text, origin).map_err(Rejected)?;
        let mut st = self.lock();
        st.keys = Arc::new(keys);
        self.rebuild(&st);
        tracing::info!(origin, keys = st.keys.keys.len(), "key file applied");
        Ok(())
    }

    /// The ids of the keys in force, sorted (for the audit log).
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys.keys.iter().map(|k| k.id.clone()).collect();
        ids.sort_unstable();
        ids
    }

    /// The key file path in force (what its watch should follow).
    pub fn key_path(&self) -> Option<PathBuf> {
        self.lock().key_path.clone()
    }

    fn rebuild(&self, st: &State) {
        self.current.store(Arc::new(Authenticator::new(
            &st.auth,
            &st.keys,
            st.admin_token,
        )));
    }
}

/// The key file's watch target.
impl ConfigTarget for IdentityStore {
    fn apply_text(&self, yaml: &str, origin: &str) -> Result<(), Rejected> {
        self.apply_keys_text(yaml, origin)
    }
}

fn read_key_file(path: &Path) -> Result<KeyFile, String> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth.key_file {origin}: cannot read: {e}"))?;
    KeyFile::parse(&text, &origin)
}

fn token_digest(t: &str) -> Option<KeyDigest> {
    let t = t.trim();
    (!t.is_empty()).then(|| digest(t.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::config::AuthMode;
    use crate::identity::keys::hash_key;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn key_file_is_read_on_a_new_path_and_replaced_by_its_watch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let entry = |k: &str| format!("- {{id: {k}, sha256: {}, team: t}}\n", hash_key(k));
        std::fs::write(&path, entry("one")).unwrap();
        let auth = AuthConfig {
            mode: AuthMode::Keys,
            key_file: Some(path.clone()),
            ..Default::default()
        };
        let store = IdentityStore::default();
        let h = |k: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("x-api-key", k.parse().unwrap());
            m
        };
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert!(
            store.authenticator().authenticate(&h("one"), peer).is_ok(),
            "mode none"
        );
        store.commit(store.prepare(&auth).unwrap());
        assert!(store.authenticator().authenticate(&h("one"), peer).is_ok());
        assert!(store.authenticator().authenticate(&h("two"), peer).is_err());

        // The watch delivers a new text: "two" replaces "one".
        store.apply_keys_text(&entry("two"), "keys.yaml").unwrap();
        assert!(store.authenticator().authenticate(&h("two"), peer).is_ok());
        assert!(store.authenticator().authenticate(&h("one"), peer).is_err());
        // A broken text is rejected and the keys stay.
        assert!(store.apply_keys_text("- id: x", "keys.yaml").is_err());
        assert!(store.authenticator().authenticate(&h("two"), peer).is_ok());
        // A config reload with the same path keeps the watched keys.
        store.commit(store.prepare(&auth).unwrap());
        assert!(store.authenticator().authenticate(&h("two"), peer).is_ok());
        assert_eq!(store.key_path(), Some(path.clone()));

        let missing = AuthConfig {
            key_file: Some(dir.path().join("nope.yaml")),
            ..auth.clone()
        };
        let e = store.prepare(&missing).unwrap_err();
        assert!(e.contains("nope.yaml: cannot read"), "{e}");
    }
}
