//! Policies: what a team or a key may do. A policy is written in layers
//! ([`PolicySpec`], every field optional): a key's own fields override its
//! team's, which override `auth.defaults`, which override the mode's built-in
//! base (everything allowed for `auth: none`, a standard caller otherwise).
//! Resolved once per key or team into a [`Policy`], so a request only reads it.

use std::collections::HashSet;
use std::sync::Arc;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use crate::admission::{
    Entitlements, Priority, FAIRNESS_HEADER, OBJECTIVE_HEADER, PRIORITY_HEADER,
};

/// Header carrying an API key as an alternative to `Authorization: Bearer`.
pub const API_KEY_HEADER: &str = "x-api-key";

/// One layer of a policy (a team's, a key's or the defaults); unset fields
/// come from the layer below.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Model names (routes or aliases) the caller may use; `["*"]`: every one.
    /// Another model is answered 404 `model_not_found`, as an unknown one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// The highest priority band; a request asking for more is lowered to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<Priority>,
    /// May force the canary or stable side (`x-infergate-canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_force_canary: Option<bool>,
    /// May forbid fallback models (`x-infergate-no-fallback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_forbid_fallback: Option<bool>,
    /// Objective (a band name or a route's `objectives` entry) of requests
    /// that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_objective: Option<String>,
    /// Fairness tenant from `x-gateway-inference-fairness-id` (else the
    /// body's `user`) instead of the team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_from_header: Option<bool>,
}

impl PolicySpec {
    /// The fields of `self`, with unset ones taken from `below`.
    pub fn over(&self, below: &PolicySpec) -> PolicySpec {
        PolicySpec {
            models: self.models.clone().or_else(|| below.models.clone()),
            max_priority: self.max_priority.or(below.max_priority),
            may_force_canary: self.may_force_canary.or(below.may_force_canary),
            may_forbid_fallback: self.may_forbid_fallback.or(below.may_forbid_fallback),
            default_objective: self
                .default_objective
                .clone()
                .or_else(|| below.default_objective.clone()),
            tenant_from_header: self.tenant_from_header.or(below.tenant_from_header),
        }
    }

    /// The built-in base of `auth: none`: every caller is trusted with
    /// everything, as before authentication existed.
    pub fn unrestricted() -> PolicySpec {
        PolicySpec {
            models: None,
            max_priority: Some(Priority::Critical),
            may_force_canary: Some(true),
            may_forbid_fallback: Some(true),
            default_objective: None,
            tenant_from_header: Some(true),
        }
    }

    /// The built-in base of an authenticated caller: every model, at most
    /// `standard`, no control over canary or fallback, its team as tenant.
    pub fn standard() -> PolicySpec {
        PolicySpec {
            models: None,
            max_priority: Some(Priority::Standard),
            may_force_canary: Some(false),
            may_forbid_fallback: Some(false),
            default_objective: None,
            tenant_from_header: Some(false),
        }
    }
}

/// A caller's resolved policy: who it is and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The team ("" for an anonymous caller of `auth: none`).
    pub team: Arc<str>,
    /// `None`: every model.
    models: Option<HashSet<Box<str>>>,
    pub entitlements: Entitlements,
    /// The request headers removed before forwarding (see
    /// [`Policy::stripped_header_names`]), resolved with the policy.
    stripped: Box<[HeaderName]>,
}

impl Policy {
    /// Resolves `spec` (already layered down to a base, so every field but
    /// `models` and `default_objective` is set) for `team`. `credentials`:
    /// the request's API key headers are removed before forwarding.
    pub fn resolve(spec: &PolicySpec, team: Arc<str>, credentials: bool) -> Policy {
        let models = spec
            .models
            .as_ref()
            .filter(|m| !m.iter().any(|m| m == "*"))
            .map(|m| m.iter().map(|m| m.as_str().into()).collect());
        let tenant_from_header = spec.tenant_from_header.unwrap_or(false);
        let entitlements = Entitlements {
            max_priority: spec.max_priority.unwrap_or(Priority::Standard),
            default_objective: spec.default_objective.as_deref().map(Arc::from),
            may_force_canary: spec.may_force_canary.unwrap_or(false),
            may_forbid_fallback: spec.may_forbid_fallback.unwrap_or(false),
            tenant: (!tenant_from_header).then(|| team.clone()),
        };
        let strip = Strip {
            credentials,
            priority: entitlements.max_priority < Priority::Critical,
            canary: !entitlements.may_force_canary,
            fallback: !entitlements.may_forbid_fallback,
            tenant: !tenant_from_header,
        };
        Policy {
            team,
            models,
            entitlements,
            stripped: strip.names().map(HeaderName::from_static).collect(),
        }
    }

    /// Whether the caller may use the route known by `names` (its model
    /// name and aliases).
    pub fn allows<'a>(&self, mut names: impl Iterator<Item = &'a str>) -> bool {
        match &self.models {
            None => true,
            Some(m) => names.any(|n| m.contains(n)),
        }
    }

    /// Whether the caller may use every model.
    pub fn allows_all(&self) -> bool {
        self.models.is_none()
    }

    /// Request headers to remove before forwarding: the caller's key, and
    /// the control headers it is not entitled to (ignored by the gateway, so
    /// the engine must not see them either). Typed names, resolved once: a
    /// request compares them with its headers without parsing a name.
    pub fn stripped_header_names(&self) -> &[HeaderName] {
        &self.stripped
    }

    /// [`Policy::stripped_header_names`] as text.
    pub fn stripped_headers(&self) -> impl Iterator<Item = &str> {
        self.stripped.iter().map(HeaderName::as_str)
    }
}

/// Which header groups a policy strips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Strip {
    credentials: bool,
    priority: bool,
    canary: bool,
    fallback: bool,
    tenant: bool,
}

impl Strip {
    /// The names of the groups stripped (lowercase, valid header names).
    fn names(self) -> impl Iterator<Item = &'static str> {
        let pairs: [(bool, &[&'static str]); 5] = [
            (self.credentials, &["authorization", API_KEY_HEADER]),
            (self.priority, &[PRIORITY_HEADER, OBJECTIVE_HEADER]),
            (self.canary, &[crate::admission::canary::FORCE_HEADER]),
            (
                self.fallback,
                &[crate::admission::fallback::NO_FALLBACK_HEADER],
            ),
            (self.tenant, &[FAIRNESS_HEADER]),
        ];
        pairs
            .into_iter()
            .filter(|(on, _)| *on)
            .flat_map(|(_, names)| names.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_resolve_key_over_team_over_defaults_over_base() {
        let defaults = PolicySpec {
            models: Some(vec!["small".into()]),
            ..Default::default()
        };
        let team = PolicySpec {
            max_priority: Some(Priority::Critical),
            may_force_canary: Some(true),
            ..Default::default()
        };
        let key = PolicySpec {
            max_priority: Some(Priority::Sheddable),
            models: Some(vec!["big".into(), "small".into()]),
            ..Default::default()
        };
        let spec = key.over(&team.over(&defaults.over(&PolicySpec::standard())));
        let p = Policy::resolve(&spec, "search".into(), true);
        assert_eq!(p.entitlements.max_priority, Priority::Sheddable);
        assert!(p.entitlements.may_force_canary);
        assert!(!p.entitlements.may_forbid_fallback);
        assert_eq!(p.entitlements.tenant.as_deref(), Some("search"));
        assert!(p.allows(["big"].into_iter()));
        assert!(!p.allows(["other", "alias"].into_iter()));
        let stripped: Vec<_> = p.stripped_headers().collect();
        assert_eq!(
            stripped,
            [
                "authorization",
                API_KEY_HEADER,
                PRIORITY_HEADER,
                OBJECTIVE_HEADER,
                "x-infergate-no-fallback",
                FAIRNESS_HEADER
            ]
        );
    }

    #[test]
    fn unrestricted_strips_nothing_and_star_means_every_model() {
        let spec = PolicySpec {
            models: Some(vec!["*".into()]),
            ..Default::default()
        }
        .over(&PolicySpec::unrestricted());
        let p = Policy::resolve(&spec, "".into(), false);
        assert_eq!(p.entitlements, Entitlements::unrestricted());
        assert!(p.allows(["anything"].into_iter()));
        assert_eq!(p.stripped_headers().count(), 0);
    }
}
