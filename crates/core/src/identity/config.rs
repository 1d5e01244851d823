//! The `auth:` section: how callers prove who they are (`mode`), the
//! policies of teams and the defaults, and how the admin listener is
//! protected. Checked by [`AuthConfig::check`] with the rest of the config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cidr::Cidr;
use super::policy::PolicySpec;

/// Env variable holding the admin bearer token (when no `token_file`).
pub const ADMIN_TOKEN_ENV: &str = "INFERGATE_ADMIN_TOKEN";

/// `auth:` of the config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub mode: AuthMode,
    /// `keys`: the key file (YAML list of `{id, sha256, team, policy}`),
    /// watched and hot-reloaded; a mounted Kubernetes Secret works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// `trusted_headers`: where identity comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_headers: Option<TrustedHeaders>,
    /// Policies by team name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub teams: BTreeMap<String, PolicySpec>,
    /// The policy of teams not listed (and of every caller with `mode: none`).
    #[serde(default)]
    pub defaults: PolicySpec,
    #[serde(default)]
    pub admin: AdminAuth,
}

/// How callers are identified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Nobody is identified and every caller may do everything (local use,
    /// the quickstart).
    #[default]
    None,
    /// An API key (`Authorization: Bearer KEY` or `x-api-key: KEY`) from
    /// the key file.
    Keys,
    /// Team (and key id) from headers set by an authenticating proxy, only
    /// from its source addresses.
    TrustedHeaders,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Keys => "keys",
            AuthMode::TrustedHeaders => "trusted_headers",
        }
    }
}

/// `auth.trusted_headers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedHeaders {
    /// Header naming the caller's team (required on every request).
    pub team_header: String,
    /// Header naming the caller's key id (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_header: Option<String>,
    /// Peers whose identity headers are believed (the proxy's addresses).
    pub sources: Vec<Cidr>,
}

/// `auth.admin`: the admin listener's protection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminAuth {
    /// File holding the bearer token admin requests must present (else the
    /// `INFERGATE_ADMIN_TOKEN` env variable). Required when the admin
    /// listener binds beyond loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Serve `/metrics` without the token (for scrapers; restrict them by
    /// network policy).
    #[serde(default)]
    pub public_metrics: bool,
}

impl AuthConfig {
    /// Checks the section against the routes' model names; `Err((needle,
    /// message))` where `needle` locates the line.
    pub fn check(
        &self,
        is_model: impl Fn(&str) -> bool,
        admin: Option<SocketAddr>,
        admin_token_set: bool,
    ) -> Result<(), (String, String)> {
        match self.mode {
            AuthMode::Keys if self.key_file.is_none() => {
                return Err((
                    "mode:".into(),
                    "auth: `mode: keys` needs `key_file: PATH` (a YAML list of {id, sha256, team})"
                        .into(),
                ))
            }
            AuthMode::TrustedHeaders => match &self.trusted_headers {
                None => return Err((
                    "mode:".into(),
                    "auth: `mode: trusted_headers` needs `trusted_headers: {team_header, sources}`"
                        .into(),
                )),
                Some(t) => {
                    if http::HeaderName::from_bytes(t.team_header.as_bytes()).is_err()
                        || t.key_header
                            .as_ref()
                            .is_some_and(|k| http::HeaderName::from_bytes(k.as_bytes()).is_err())
                    {
                        return Err((
                            "team_header".into(),
                            "auth.trusted_headers: header names must be valid lowercase HTTP header names".into(),
                        ));
                    }
                    if t.sources.is_empty() {
                        return Err((
                            "sources".into(),
                            "auth.trusted_headers: `sources` must list the proxy's address ranges"
                                .into(),
                        ));
                    }
                }
            },
            _ => {}
        }
        if self.mode != AuthMode::Keys && self.key_file.is_some() {
            return Err((
                "key_file".into(),
                format!(
                    "auth: `key_file` is only used with `mode: keys` (mode is `{}`)",
                    self.mode.as_str()
                ),
            ));
        }
        let specs = std::iter::once(("defaults", &self.defaults))
            .chain(self.teams.iter().map(|(t, p)| (t.as_str(), p)));
        for (who, spec) in specs {
            for m in spec.models.iter().flatten() {
                if m != "*" && !is_model(m) {
                    return Err((
                        m.clone(),
                        format!("auth: `{who}` allows model `{m}`, which no route serves"),
                    ));
                }
            }
        }
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() && !admin_token_set {
                return Err((
                    "admin".into(),
                    format!(
                        "the admin listener binds {addr}, beyond loopback: set `auth.admin.token_file` (or {ADMIN_TOKEN_ENV}) so it requires a bearer token, or bind it to 127.0.0.1"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> AuthConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn modes_need_their_settings() {
        let yes = |_: &str| true;
        let e = parse("mode: keys").check(yes, None, false).unwrap_err();
        assert!(e.1.contains("needs `key_file"), "{e:?}");
        let e = parse("mode: trusted_headers")
            .check(yes, None, false)
            .unwrap_err();
        assert!(e.1.contains("trusted_headers: {team_header"), "{e:?}");
        let e = parse("mode: trusted_headers\ntrusted_headers: {team_header: x-team, sources: []}")
            .check(yes, None, false)
            .unwrap_err();
        assert!(e.1.contains("sources"), "{e:?}");
        parse(
            "mode: trusted_headers\ntrusted_headers: {team_header: x-team, sources: [10.0.0.0/8]}",
        )
        .check(yes, None, false)
        .unwrap();
        let e = parse("key_file: /k").check(yes, None, false).unwrap_err();
        assert!(e.1.contains("only used with `mode: keys`"), "{e:?}");
        let e = parse("mode: keys\nkey_file: /k\nteams: {search: {models: [nope]}}")
            .check(|m| m == "m", None, false)
            .unwrap_err();
        assert_eq!(
            e.1,
            "auth: `search` allows model `nope`, which no route serves"
        );
        assert!(serde_yaml_ng::from_str::<AuthConfig>("mode: jwt").is_err());
        assert!(serde_yaml_ng::from_str::<AuthConfig>(
            "trusted_headers: {team_header: t, sources: [nope]}"
        )
        .is_err());
    }

    #[test]
    fn admin_beyond_loopback_needs_a_token() {
        let none = AuthConfig::default();
        let lo: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let all: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        none.check(|_| true, Some(lo), false).unwrap();
        let e = none.check(|_| true, Some(all), false).unwrap_err();
        assert!(
            e.1.contains("beyond loopback") && e.1.contains("token_file"),
            "{e:?}"
        );
        none.check(|_| true, Some(all), true).unwrap();
    }
}
