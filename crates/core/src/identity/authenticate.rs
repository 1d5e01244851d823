//! Who is calling: turns a request's headers and peer address into a
//! [`Caller`] (its resolved policy), or an [`AuthError`]. Built once per
//! config or key-file change; per request it looks the presented key up in
//! its worker thread's cache of keys already verified by this snapshot
//! (compared in constant time), else hashes it once, looks the digest up in
//! a map and compares it in constant time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use infergate_protocol::error::ApiError;

use super::cidr::Cidr;
use super::config::{AuthConfig, AuthMode};
use super::keys::{digest, digests_equal, KeyDigest, KeyFile};
use super::policy::{Policy, PolicySpec, API_KEY_HEADER};

/// An identified caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub policy: Arc<Policy>,
    /// The key id (keys mode, or the trusted proxy's key header), for audit.
    pub key_id: Option<HeaderValue>,
}

/// Why a request was not authenticated (all answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    MissingKey,
    InvalidKey,
    /// Identity headers from a peer outside `trusted_headers.sources`.
    UntrustedSource,
    /// A trusted peer sent no (usable) team header.
    MissingTeam,
}

impl AuthError {
    /// The OpenAI-style 401 body (the key itself is never echoed).
    pub fn to_api_error(self) -> ApiError {
        let (message, code) = match self {
            AuthError::MissingKey => ("You didn't provide an API key. Provide it as `Authorization: Bearer KEY` or `x-api-key: KEY`.", "invalid_api_key"),
            AuthError::InvalidKey => ("Incorrect API key provided.", "invalid_api_key"),
            AuthError::UntrustedSource => ("This gateway accepts requests only through its authenticating proxy.", "untrusted_source"),
            AuthError::MissingTeam => ("The authenticating proxy sent no team for this request.", "missing_identity"),
        };
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message).with_code(code)
    }
}

#[derive(Debug)]
struct KeyRecord {
    digest: KeyDigest,
    id: HeaderValue,
    policy: Arc<Policy>,
}

#[derive(Debug)]
struct Trusted {
    team: HeaderName,
    key: Option<HeaderName>,
    sources: Vec<Cidr>,
}

/// The authentication snapshot of one config and key file.
#[derive(Debug)]
pub struct Authenticator {
    mode: AuthMode,
    keys: HashMap<KeyDigest, KeyRecord, DigestHash>,
    /// Tells this snapshot's entries in the threads' [`VERIFIED`] caches from
    /// an earlier snapshot's (a reloaded key file drops a revoked key).
    generation: u64,
    /// Resolved policies of the configured teams (trusted-headers mode).
    teams: HashMap<Box<str>, Arc<Policy>>,
    /// `auth.defaults` over the base: the policy of a team not configured.
    unlisted: PolicySpec,
    anonymous: Arc<Policy>,
    trusted: Option<Trusted>,
    admin_token: Option<KeyDigest>,
    public_metrics: bool,
}

impl Default for Authenticator {
    fn default() -> Self {
        Authenticator::new(&AuthConfig::default(), &KeyFile::default(), None)
    }
}

impl Authenticator {
    /// Resolves every key's and team's policy. `admin_token`: the digest of
    /// the admin bearer token, when one is configured.
    pub fn new(cfg: &AuthConfig, keys: &KeyFile, admin_token: Option<KeyDigest>) -> Authenticator {
        let base = match cfg.mode {
            AuthMode::None => PolicySpec::unrestricted(),
            AuthMode::Keys | AuthMode::TrustedHeaders => PolicySpec::standard(),
        };
        let unlisted = cfg.defaults.over(&base);
        let credentials = cfg.mode == AuthMode::Keys;
        let team_spec = |team: &str| match cfg.teams.get(team) {
            Some(t) => t.over(&unlisted),
            None => unlisted.clone(),
        };
        let team_names: HashMap<&str, Arc<str>> = cfg
            .teams
            .keys()
            .chain(keys.keys.iter().map(|k| &k.team))
            .map(|t| (t.as_str(), Arc::from(t.as_str())))
            .collect();
        let keys = if cfg.mode == AuthMode::Keys {
            keys.keys
                .iter()
                .map(|k| {
                    let spec = k.policy.over(&team_spec(&k.team));
                    let team = team_names[k.team.as_str()].clone();
                    let record = KeyRecord {
                        digest: k.digest,
                        id: HeaderValue::from_str(&k.id).unwrap_or(HeaderValue::from_static("-")),
                        policy: Arc::new(Policy::resolve(&spec, team, credentials)),
                    };
                    (k.digest, record)
                })
                .collect()
        } else {
            HashMap::default()
        };
        let teams = cfg
            .teams
            .keys()
            .map(|t| {
                let team = team_names[t.as_str()].clone();
                let p = Policy::resolve(&team_spec(t), team, credentials);
                (Box::from(t.as_str()), Arc::new(p))
            })
            .collect();
        let trusted = match (cfg.mode, &cfg.trusted_headers) {
            (AuthMode::TrustedHeaders, Some(t)) => Some(Trusted {
                team: HeaderName::from_bytes(t.team_header.as_bytes())
                    .unwrap_or(HeaderName::from_static("x-infergate-team")),
                key: t
                    .key_header
                    .as_ref()
                    .and_then(|k| HeaderName::from_bytes(k.as_bytes()).ok()),
                sources: t.sources.clone(),
            }),
            _ => None,
        };
        static GENERATION: AtomicU64 = AtomicU64::new(1);
        Authenticator {
            mode: cfg.mode,
            keys,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            teams,
            anonymous: Arc::new(Policy::resolve(&unlisted, "".into(), false)),
            unlisted,
            trusted,
            admin_token,
            public_metrics: cfg.admin.public_metrics,
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Whether `team` comes from the config or the key file (not only from
    /// a trusted proxy's header): only such names become metric labels.
    pub fn is_listed_team(&self, team: &str) -> bool {
        match self.mode {
            AuthMode::TrustedHeaders => self.teams.contains_key(team),
            AuthMode::None | AuthMode::Keys => true,
        }
    }

    /// Keys loaded (keys mode).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Identifies the caller of a request from `peer`.
    pub fn authenticate(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Caller, AuthError> {
        match self.mode {
            AuthMode::None => Ok(Caller {
                policy: self.anonymous.clone(),
                key_id: None,
            }),
            AuthMode::Keys => {
                let key = presented_key(headers).ok_or(AuthError::MissingKey)?;
                let cached = VERIFIED.with_borrow(|c| c.get(self.generation, key));
                let d = cached.unwrap_or_else(|| digest(key));
                match self.keys.get(&d) {
                    Some(r) if digests_equal(&r.digest, &d) => {
                        // Only a key hashed just now is new to the cache (a
                        // hit would hash its slot a second time for nothing).
                        if cached.is_none() {
                            VERIFIED.with_borrow_mut(|c| c.remember(self.generation, key, d));
                        }
                        Ok(Caller {
                            policy: r.policy.clone(),
                            key_id: Some(r.id.clone()),
                        })
                    }
                    _ => Err(AuthError::InvalidKey),
                }
            }
            AuthMode::TrustedHeaders => {
                let Some(t) = &self.trusted else {
                    return Err(AuthError::UntrustedSource);
                };
                if !t.sources.iter().any(|c| c.contains(peer)) {
                    return Err(AuthError::UntrustedSource);
                }
                let team = headers
                    .get(&t.team)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.len() <= 128)
                    .ok_or(AuthError::MissingTeam)?;
                let policy = match self.teams.get(team) {
                    Some(p) => p.clone(),
                    // A team the config does not list: the defaults.
                    None => Arc::new(Policy::resolve(&self.unlisted, team.into(), false)),
                };
                let key_id = t.key.as_ref().and_then(|k| headers.get(k)).cloned();
                Ok(Caller { policy, key_id })
            }
        }
    }

    /// Whether admin requests need a bearer token.
    pub fn admin_protected(&self) -> bool {
        self.admin_token.is_some()
    }

    /// Whether an admin request for `path` may be served: probes always;
    /// `/metrics` when public; otherwise the bearer token when one is set.
    pub fn admin_allows(&self, headers: &HeaderMap, path: &str) -> bool {
        if matches!(path, "/healthz" | "/readyz") || (self.public_metrics && path == "/metrics") {
            return true;
        }
        match &self.admin_token {
            None => true,
            Some(want) => bearer(headers).is_some_and(|t| digests_equal(&digest(t), want)),
        }
    }
}

/// Valid keys this thread verified, with their digests, so that a known key
/// skips SHA-256 (2.7k of about 77k instructions per request). Only keys
/// found in the key file enter (presenting wrong keys cannot fill it), at
/// most [`VerifiedKeys::MAX`] per thread; the keys stay in this process's
/// memory only, like the request that carried them.
struct VerifiedKeys {
    /// The [`Authenticator::generation`] the entries belong to.
    generation: u64,
    /// By a seeded 64-bit hash of the key; the key itself is compared in
    /// constant time, so a hash collision only costs a SHA-256.
    entries: HashMap<u64, (Box<[u8]>, KeyDigest), BuildHasherDefault<U64Hash>>,
}

thread_local! {
    static VERIFIED: RefCell<VerifiedKeys> = RefCell::new(VerifiedKeys {
        generation: 0,
        entries: HashMap::default(),
    });
}

/// A per-process random seed: which keys share a slot is not predictable
/// from outside.
static KEY_SEED: LazyLock<u64> = LazyLock::new(|| {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8)
});

impl VerifiedKeys {
    const MAX: usize = 4096;

    fn slot(key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, *KEY_SEED)
    }

    /// The digest of `key` when this thread verified it under `generation`.
    fn get(&self, generation: u64, key: &[u8]) -> Option<KeyDigest> {
        if self.generation != generation {
            return None;
        }
        let (k, d) = self.entries.get(&Self::slot(key))?;
        bool::from(subtle::ConstantTimeEq::ct_eq(&k[..], key)).then_some(*d)
    }

    fn remember(&mut self, generation: u64, key: &[u8], d: KeyDigest) {
        if self.generation != generation || self.entries.len() >= Self::MAX {
            self.entries.clear();
            self.generation = generation;
        }
        self.entries
            .entry(Self::slot(key))
            .or_insert_with(|| (key.into(), d));
    }
}

/// Hashes a `u64` that is already a seeded hash: itself.
#[derive(Default)]
struct U64Hash(u64);

impl Hasher for U64Hash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A digest (and its length): folded eight bytes at a time.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The key map's hasher: a SHA-256 digest is uniform already, so folding its
/// words is hash enough (SipHash of 32 bytes cost a few hundred instructions
/// per request). Digests come from the key file; a presented key's digest
/// is only looked up, so nobody outside can lengthen a probe.
type DigestHash = BuildHasherDefault<U64Hash>;

/// The key of `Authorization: Bearer KEY`, else of `x-api-key: KEY`.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    bearer(headers).or_else(|| {
        headers
            .get(API_KEY_HEADER)
            .map(|v| v.as_bytes().trim_ascii())
            .filter(|k| !k.is_empty())
    })
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Priority;
    use crate::identity::keys::hash_key;

    fn keys_auth() -> Authenticator {
        let cfg: AuthConfig = serde_yaml_ng::from_str(
            "mode: keys\nkey_file: /k\nteams:\n  search: {max_priority: critical, models: [big]}\nadmin: {public_metrics: true}\n",
        )
        .unwrap();
        let keys = KeyFile::parse(
            &format!(
                "- {{id: s1, sha256: {}, team: search}}\n- {{id: a1, sha256: {}, team: ads, policy: {{models: [small]}}}}\n",
                hash_key("sk-search"),
                hash_key("sk-ads")
            ),
            "k",
        )
        .unwrap();
        Authenticator::new(&cfg, &keys, Some(digest(b"admin-token")))
    }

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn keys_identify_their_team_and_policy() {
        let a = keys_auth();
        let c = a
            .authenticate(&h(&[("authorization", "Bearer sk-search")]), PEER)
            .unwrap();
        assert_eq!(&*c.policy.team, "search");
        assert_eq!(c.key_id.unwrap(), "s1");
        assert_eq!(c.policy.entitlements.max_priority, Priority::Critical);
        assert!(c.policy.allows(["big"].into_iter()) && !c.policy.allows(["small"].into_iter()));
        let c = a
            .authenticate(&h(&[("x-api-key", "sk-ads")]), PEER)
            .unwrap();
        assert_eq!(&*c.policy.team, "ads");
        assert_eq!(
            c.policy.entitlements.max_priority,
            Priority::Standard,
            "base"
        );
        assert!(c.policy.allows(["small"].into_iter()));
        assert_eq!(c.policy.stripped_headers().next(), Some("authorization"));
        let lower = a.authenticate(&h(&[("authorization", "bearer   sk-ads ")]), PEER);
        assert!(lower.is_ok(), "scheme is case-insensitive, key trimmed");

        let err = |hs: &[(&'static str, &str)]| a.authenticate(&h(hs), PEER).unwrap_err();
        assert_eq!(err(&[]), AuthError::MissingKey);
        assert_eq!(
            err(&[("authorization", "Basic sk-ads")]),
            AuthError::MissingKey
        );
        assert_eq!(err(&[("authorization", "Bearer ")]), AuthError::MissingKey);
        assert_eq!(
            err(&[("authorization", "Bearer sk-wrong")]),
            AuthError::InvalidKey
        );
        let e = AuthError::InvalidKey.to_api_error();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn a_verified_key_is_cached_per_snapshot_and_a_reload_drops_it() {
        let cached = || VERIFIED.with_borrow(|c| c.entries.len());
        let a = keys_auth();
        let bearer = |k: &str| h(&[("authorization", &format!("Bearer {k}"))]);
        for _ in 0..3 {
            let c = a.authenticate(&bearer("sk-search"), PEER).unwrap();
            assert_eq!(c.key_id.unwrap(), "s1");
        }
        assert_eq!(
            cached(),
            1,
            "the key is hashed once, then served from the cache"
        );
        assert_eq!(
            a.authenticate(&bearer("sk-searcH"), PEER).unwrap_err(),
            AuthError::InvalidKey
        );
        assert_eq!(cached(), 1, "a wrong key does not enter");
        let c = a
            .authenticate(&h(&[("x-api-key", "sk-ads")]), PEER)
            .unwrap();
        assert_eq!(c.key_id.unwrap(), "a1");
        assert_eq!(cached(), 2);

        // The key file is reloaded without sk-search: the cached entry must
        // not let it in.
        let cfg: AuthConfig = serde_yaml_ng::from_str("mode: keys\nkey_file: /k\n").unwrap();
        let keys = KeyFile::parse(
            &format!("- {{id: a1, sha256: {}, team: ads}}\n", hash_key("sk-ads")),
            "k",
        )
        .unwrap();
        let reloaded = Authenticator::new(&cfg, &keys, None);
        assert_eq!(
            reloaded
                .authenticate(&bearer("sk-search"), PEER)
                .unwrap_err(),
            AuthError::InvalidKey
        );
        assert!(reloaded.authenticate(&bearer("sk-ads"), PEER).is_ok());
        assert_eq!(cached(), 1, "the old snapshot's entries are gone");
        // The old snapshot, still held by a request in flight, re-verifies.
        assert!(a.authenticate(&bearer("sk-search"), PEER).is_ok());
    }

    #[test]
    fn trusted_headers_count_only_from_their_sources() {
        let cfg: AuthConfig = serde_yaml_ng::from_str(
            "mode: trusted_headers\ntrusted_headers: {team_header: x-team, key_header: x-key, sources: [10.0.0.0/8]}\nteams: {search: {may_force_canary: true}}\n",
        )
        .unwrap();
        let a = Authenticator::new(&cfg, &KeyFile::default(), None);
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let c = a
            .authenticate(&h(&[("x-team", "search"), ("x-key", "k9")]), proxy)
            .unwrap();
        assert_eq!(&*c.policy.team, "search");
        assert!(c.policy.entitlements.may_force_canary);
        assert_eq!(c.key_id.unwrap(), "k9");
        let c = a.authenticate(&h(&[("x-team", "other")]), proxy).unwrap();
        assert_eq!(&*c.policy.team, "other");
        assert!(
            !c.policy.entitlements.may_force_canary,
            "unlisted: defaults"
        );
        assert_eq!(
            a.authenticate(&h(&[("x-team", "search")]), PEER)
                .unwrap_err(),
            AuthError::UntrustedSource
        );
        assert_eq!(
            a.authenticate(&h(&[]), proxy).unwrap_err(),
            AuthError::MissingTeam
        );
    }

    #[test]
    fn none_trusts_everyone_and_admin_needs_the_token() {
        let a = Authenticator::default();
        let c = a.authenticate(&HeaderMap::new(), PEER).unwrap();
        assert_eq!(
            c.policy.entitlements,
            crate::admission::Entitlements::unrestricted()
        );
        assert!(
            a.admin_allows(&HeaderMap::new(), "/routes"),
            "no token configured"
        );

        let k = keys_auth();
        assert!(k.admin_allows(&HeaderMap::new(), "/healthz"));
        assert!(
            k.admin_allows(&HeaderMap::new(), "/metrics"),
            "public_metrics"
        );
        assert!(!k.admin_allows(&HeaderMap::new(), "/routes"));
        assert!(!k.admin_allows(&h(&[("authorization", "Bearer nope")]), "/routes"));
        assert!(k.admin_allows(&h(&[("authorization", "Bearer admin-token")]), "/routes"));
    }
}
