//! API keys: SHA-256 digests only (the key itself is never written down or
//! logged; only `authenticate`'s in-memory cache of verified keys holds it),
//! the key file format, and hashing for `infergate hash-key`.
//!
//! The key file is a YAML list; each entry names its key id, the SHA-256 of
//! the key (64 hex digits), its team and optionally its own policy:
//!
//! ```yaml
//! - id: search-prod
//!   sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
//!   team: search
//!   policy: { models: [llama-3-8b], max_priority: critical }
//! ```

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::policy::PolicySpec;

/// A key's SHA-256.
pub type KeyDigest = [u8; 32];

/// The SHA-256 of a presented key.
pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// Constant-time equality of two digests.
pub fn digests_equal(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.ct_eq(b).into()
}

/// The lowercase hex SHA-256 of `key`, as the key file wants it.
pub fn hash_key(key: &str) -> String {
    to_hex(&digest(key.as_bytes()))
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

fn from_hex(s: &str) -> Option<KeyDigest> {
    let s = s.trim().as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| char::from(c).to_digit(16);
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = u8::try_from(nibble(pair[0])? * 16 + nibble(pair[1])?).ok()?;
    }
    Some(out)
}

/// One entry of the key file, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntryYaml {
    id: String,
    sha256: String,
    team: String,
    #[serde(default)]
    policy: PolicySpec,
}

/// One key: its id, digest, team and own policy layer.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEntry {
    pub id: String,
    pub digest: KeyDigest,
    pub team: String,
    pub policy: PolicySpec,
}

/// A parsed key file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyFile {
    pub keys: Vec<KeyEntry>,
}

impl KeyFile {
    /// Parses and checks key-file YAML; errors name `origin`, the line and
    /// the entry (never the digest).
    pub fn parse(text: &str, origin: &str) -> Result<KeyFile, String> {
        let entries: Option<Vec<KeyEntryYaml>> = serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map_or(1, |l| l.line());
            let mut m = e.to_string();
            if let Some(i) = m.rfind(" at line ") {
                m.truncate(i);
            }
            format!("{origin}:{line}: {m} (expected a list of {{id, sha256, team, policy}})")
        })?;
        let mut keys = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut digests = std::collections::HashSet::new();
        for e in entries.unwrap_or_default() {
            if e.id.is_empty() || e.team.is_empty() {
                return Err(format!(
                    "{origin}: every key needs a non-empty `id` and `team`"
                ));
            }
            let Some(digest) = from_hex(&e.sha256) else {
                return Err(format!(
                    "{origin}: key `{}`: `sha256` must be 64 hex digits (make one with `infergate hash-key`)",
                    e.id
                ));
            };
            if !ids.insert(e.id.clone()) {
                return Err(format!("{origin}: key id `{}` is listed twice", e.id));
            }
            if !digests.insert(digest) {
                return Err(format!(
                    "{origin}: key `{}` has the same sha256 as an earlier key",
                    e.id
                ));
            }
            keys.push(KeyEntry {
                id: e.id,
                digest,
                team: e.team,
                policy: e.policy,
            });
        }
        Ok(KeyFile { keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_sha256_and_round_trips_hex() {
        // sha256("password"), a well-known vector.
        let h = hash_key("password");
        assert_eq!(
            h,
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
        assert_eq!(from_hex(&h), Some(digest(b"password")));
        assert_eq!(from_hex(&h.to_uppercase()), Some(digest(b"password")));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"g".repeat(64)), None);
        assert!(digests_equal(&digest(b"a"), &digest(b"a")));
        assert!(!digests_equal(&digest(b"a"), &digest(b"b")));
    }

    #[test]
    fn key_file_parses_and_rejects_with_clear_errors() {
        let good = format!(
            "- id: a\n  sha256: {}\n  team: search\n  policy: {{ models: [m] }}\n- id: b\n  sha256: {}\n  team: ads\n",
            hash_key("ka"),
            hash_key("kb")
        );
        let f = KeyFile::parse(&good, "keys.yaml").unwrap();
        assert_eq!(f.keys.len(), 2);
        assert_eq!(f.keys[0].policy.models, Some(vec!["m".to_string()]));
        assert_eq!(f.keys[1].digest, digest(b"kb"));
        assert_eq!(KeyFile::parse("", "k").unwrap().keys.len(), 0);

        let dup = good.replace("id: b", "id: a");
        assert!(KeyFile::parse(&dup, "k")
            .unwrap_err()
            .contains("listed twice"));
        let short = good.replace(&hash_key("kb"), "abc");
        let e = KeyFile::parse(&short, "k").unwrap_err();
        assert!(e.contains("key `b`") && e.contains("64 hex digits"), "{e}");
        assert!(!e.contains(&hash_key("ka")), "errors never echo digests");
        let typo = good.replace("team: ads", "teem: ads");
        let e = KeyFile::parse(&typo, "keys.yaml").unwrap_err();
        assert!(e.starts_with("keys.yaml:7:") && e.contains("teem"), "{e}");
        let same = good.replace(&hash_key("kb"), &hash_key("ka"));
        assert!(KeyFile::parse(&same, "k")
            .unwrap_err()
            .contains("same sha256"));
    }
}
