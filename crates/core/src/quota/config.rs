//! The `quotas:` section (limits per team and per key) and
//! `governance.redis:` (where replicas share their counters). Checked with
//! the rest of the config by [`QuotasConfig::check`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admission::Priority;
use crate::config::units;

/// `quotas:` of the config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasConfig {
    /// Limits by team name (the caller's team from `auth`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub teams: BTreeMap<String, QuotaSpec>,
    /// Limits by key id (the key file's `id`, or the trusted proxy's key
    /// header); they apply on top of the key's team's limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, QuotaSpec>,
    /// Limits of each team not listed in `teams` (each such team has its own
    /// counters). Absent: unlisted teams are not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_team: Option<QuotaSpec>,
}

/// The limits of one team or key. Every field is optional; a request must
/// fit every limit set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Input plus output tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_minute: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_requests: Option<u64>,
    /// Input plus output tokens per UTC day / calendar month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
    /// Money per UTC day / calendar month, in the price table's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_day: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_month: Option<f64>,
    /// The share (0..=1) of every limit above that requests of a band may
    /// fill; a band not listed may fill all of it. `{sheddable: 0.5,
    /// standard: 0.8}` keeps the last 20% for critical traffic, so a team's
    /// batch jobs cannot refuse its own critical requests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bands: BTreeMap<Priority, f64>,
    /// What these limits do while Redis is unreachable (default: the
    /// `governance.redis.when_down` setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_redis_down: Option<DownPolicy>,
    /// With `fail_open`: the share of each limit this replica admits alone
    /// while Redis is down (default: `governance.redis.local_share`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_share: Option<f64>,
}

/// `when_redis_down` / `when_down`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownPolicy {
    /// Keep admitting, against counters of this replica alone with each
    /// limit scaled by `local_share` (e.g. 1/replicas).
    #[default]
    FailOpen,
    /// Refuse the requests these limits apply to (503 `quota_unavailable`).
    FailClosed,
}

/// What a limit does while the shared counters cannot be reached (resolved).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WhenDown {
    FailOpen { local_share: f64 },
    FailClosed,
}

impl Default for WhenDown {
    fn default() -> Self {
        WhenDown::FailOpen { local_share: 1.0 }
    }
}

impl WhenDown {
    /// `policy` and `share` of a quota over `below` (the global default).
    pub fn resolve(policy: Option<DownPolicy>, share: Option<f64>, below: WhenDown) -> WhenDown {
        let below_share = match below {
            WhenDown::FailOpen { local_share } => local_share,
            WhenDown::FailClosed => 1.0,
        };
        let policy = policy.unwrap_or(match below {
            WhenDown::FailOpen { .. } => DownPolicy::FailOpen,
            WhenDown::FailClosed => DownPolicy::FailClosed,
        });
        match policy {
            DownPolicy::FailClosed => WhenDown::FailClosed,
            DownPolicy::FailOpen => WhenDown::FailOpen {
                local_share: share.unwrap_or(below_share),
            },
        }
    }
}

/// `governance:` of the config (this part: the shared counters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Share quota counters between gateway replicas; absent: each replica
    /// counts alone (local mode, right for one replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
}

/// `governance.redis:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key the gateway writes.
    #[serde(default = "RedisConfig::default_prefix")]
    pub key_prefix: String,
    /// The longest a request waits for Redis; past it the request is decided
    /// as if Redis were down, and Redis is marked down until a probe answers.
    #[serde(default = "RedisConfig::default_timeout", with = "units::duration")]
    pub timeout: Duration,
    /// How often a down Redis is probed (reconnect and `PING`).
    #[serde(default = "RedisConfig::default_probe", with = "units::duration")]
    pub probe_interval: Duration,
    /// Settlements not carried by a reservation within this long are sent
    /// on their own.
    #[serde(default = "RedisConfig::default_flush", with = "units::duration")]
    pub flush_interval: Duration,
    /// How often a slice of allowance leased from Redis is renewed (off the
    /// request path, at half of it; requests keep taking from it while the
    /// renewal is in flight); `0s` turns leases off (one Redis call per
    /// request).
    #[serde(
        default = "RedisConfig::default_lease_max_age",
        with = "units::duration"
    )]
    pub lease_max_age: Duration,
    /// A lease not used for this long gives its slice back to Redis (free
    /// for the other replicas) but a small reserve, kept far from the limit
    /// so the first requests after a pause do not wait.
    #[serde(default = "RedisConfig::default_lease_idle", with = "units::duration")]
    pub lease_idle: Duration,
    /// A lease not used for this long (and `lease_idle`) gives its reserve
    /// back too; the next request opens it again with a Redis round trip.
    #[serde(default = "RedisConfig::default_lease_keep", with = "units::duration")]
    pub lease_keep: Duration,
    /// A replica's requests-in-flight slots in Redis expire this long
    /// after it last renewed them (it renews every third of it while it
    /// runs), so a crashed replica's slots come back within it.
    #[serde(default = "RedisConfig::default_slot_ttl", with = "units::duration")]
    pub slot_ttl: Duration,
    /// The default of every quota's `when_redis_down`.
    #[serde(default)]
    pub when_down: DownPolicy,
    /// The default of every quota's `local_share`.
    #[serde(default = "RedisConfig::default_share")]
    pub local_share: f64,
    /// Report not ready on `/readyz` while Redis is down (off by default:
    /// every replica would go unready at once).
    #[serde(default)]
    pub required_for_ready: bool,
}

impl GovernanceConfig {
    pub fn is_empty(&self) -> bool {
        self.redis.is_none()
    }
}

impl RedisConfig {
    fn default_prefix() -> String {
        "infergate".into()
    }
    fn default_timeout() -> Duration {
        Duration::from_millis(50)
    }
    fn default_probe() -> Duration {
        Duration::from_millis(500)
    }
    fn default_flush() -> Duration {
        Duration::from_millis(20)
    }
    fn default_lease_max_age() -> Duration {
        Duration::from_secs(1)
    }
    fn default_lease_idle() -> Duration {
        Duration::from_secs(1)
    }
    fn default_lease_keep() -> Duration {
        Duration::from_secs(30)
    }
    fn default_share() -> f64 {
        1.0
    }
    fn default_slot_ttl() -> Duration {
        Duration::from_secs(30)
    }

    /// The resolved default of every quota.
    pub fn when_down(&self) -> WhenDown {
        WhenDown::resolve(
            Some(self.when_down),
            Some(self.local_share),
            WhenDown::default(),
        )
    }
}

impl QuotaSpec {
    /// Whether the spec limits anything.
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none()
            && self.tokens_per_minute.is_none()
            && self.input_tokens_per_minute.is_none()
            && self.output_tokens_per_minute.is_none()
            && self.concurrent_requests.is_none()
            && self.tokens_per_day.is_none()
            && self.tokens_per_month.is_none()
            && self.cost_per_day.is_none()
            && self.cost_per_month.is_none()
    }

    fn check(&self, who: &str) -> Result<(), (String, String)> {
        for (band, share) in &self.bands {
            if !(0.0..=1.0).contains(share) {
                return Err((
                    band.as_str().into(),
                    format!(
                        "quotas: `{who}` band `{}` share must be in 0..=1",
                        band.as_str()
                    ),
                ));
            }
        }
        for money in [self.cost_per_day, self.cost_per_month]
            .into_iter()
            .flatten()
        {
            if !money.is_finite() || !(0.0..=1e12).contains(&money) {
                return Err((
                    "cost_per_".into(),
                    format!("quotas: `{who}` money budgets must be in 0..=1e12"),
                ));
            }
        }
        if let Some(share) = self.local_share {
            check_share(share, who)?;
        }
        Ok(())
    }
}

fn check_share(s: f64, who: &str) -> Result<(), (String, String)> {
    if (0.0..=1.0).contains(&s) {
        Ok(())
    } else {
        Err((
            "local_share".into(),
            format!("quotas: `{who}` local_share must be in 0..=1"),
        ))
    }
}

impl QuotasConfig {
    /// Whether any limit is configured.
    pub fn is_empty(&self) -> bool {
        self.teams.is_empty() && self.keys.is_empty() && self.default_team.is_none()
    }

    /// Checks the section; `Err((needle, message))` where `needle` locates
    /// the line.
    pub fn check(&self, governance: &GovernanceConfig) -> Result<(), (String, String)> {
        let specs = self
            .teams
            .iter()
            .chain(&self.keys)
            .map(|(n, s)| (n.as_str(), s))
            .chain(self.default_team.iter().map(|s| ("default_team", s)));
        for (who, spec) in specs {
            spec.check(who)?;
        }
        if let Some(r) = &governance.redis {
            if !(r.url.starts_with("redis://") || r.url.starts_with("unix://")) {
                return Err((
                    "url".into(),
                    "governance.redis.url must look like `redis://host:port`".into(),
                ));
            }
            if r.timeout.is_zero() || r.timeout > Duration::from_secs(5) {
                return Err((
                    "timeout".into(),
                    "governance.redis.timeout must be in (0, 5s]: it bounds what a Redis stall adds to a request".into(),
                ));
            }
            if r.key_prefix.is_empty() || r.key_prefix.contains(char::is_whitespace) {
                return Err((
                    "key_prefix".into(),
                    "governance.redis.key_prefix must be a non-empty word".into(),
                ));
            }
            if r.lease_max_age > Duration::from_secs(60) {
                return Err((
                    "lease_max_age".into(),
                    "governance.redis.lease_max_age must be at most 60s: it is how often a slice is renewed (0s: no leases)".into(),
                ));
            }
            if r.lease_idle.is_zero() || r.lease_idle > Duration::from_secs(60) {
                return Err((
                    "lease_idle".into(),
                    "governance.redis.lease_idle must be in (0, 60s]".into(),
                ));
            }
            if r.lease_keep > Duration::from_secs(600) {
                return Err((
                    "lease_keep".into(),
                    "governance.redis.lease_keep must be at most 600s".into(),
                ));
            }
            if r.slot_ttl < Duration::from_millis(100) || r.slot_ttl > Duration::from_secs(3600) {
                return Err((
                    "slot_ttl".into(),
                    "governance.redis.slot_ttl must be in [100ms, 1h]".into(),
                ));
            }
            check_share(r.local_share, "governance.redis")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let q: QuotasConfig = serde_yaml_ng::from_str(
            "teams:\n  search:\n    tokens_per_minute: 1000\n    bands: {sheddable: 0.5}\n    when_redis_down: fail_closed\nkeys:\n  k1: {requests_per_minute: 10, when_redis_down: fail_open, local_share: 0.34}\n",
        )
        .unwrap();
        let g: GovernanceConfig =
            serde_yaml_ng::from_str("redis: {url: 'redis://127.0.0.1:6379', timeout: 20ms}")
                .unwrap();
        q.check(&g).unwrap();
        let r = g.redis.unwrap();
        let k1 = &q.keys["k1"];
        assert_eq!(
            WhenDown::resolve(k1.when_redis_down, k1.local_share, r.when_down()),
            WhenDown::FailOpen { local_share: 0.34 }
        );
        let s = &q.teams["search"];
        assert_eq!(
            WhenDown::resolve(s.when_redis_down, s.local_share, r.when_down()),
            WhenDown::FailClosed
        );
        assert_eq!(r.timeout, Duration::from_millis(20));
        assert_eq!(r.key_prefix, "infergate");

        let bad: QuotasConfig =
            serde_yaml_ng::from_str("teams: {a: {bands: {standard: 1.5}}}").unwrap();
        assert!(bad
            .check(&GovernanceConfig::default())
            .unwrap_err()
            .1
            .contains("0..=1"));
        let g: GovernanceConfig = serde_yaml_ng::from_str("redis: {url: 'http://x'}").unwrap();
        assert!(QuotasConfig::default().check(&g).is_err());
        assert!(serde_yaml_ng::from_str::<QuotaSpec>("tokens_per_hour: 3").is_err());
    }

    #[test]
    fn slot_ttl_defaults_to_30s_and_is_bounded() {
        let g: GovernanceConfig =
            serde_yaml_ng::from_str("redis: {url: 'redis://127.0.0.1:6379'}").unwrap();
        assert_eq!(g.redis.as_ref().unwrap().slot_ttl, Duration::from_secs(30));
        assert_eq!(
            g.redis.as_ref().unwrap().lease_keep,
            Duration::from_secs(30)
        );
        let g: GovernanceConfig =
            serde_yaml_ng::from_str("redis: {url: 'redis://127.0.0.1:6379', lease_keep: 601s}")
                .unwrap();
        let e = QuotasConfig::default().check(&g).unwrap_err();
        assert_eq!(e.0, "lease_keep", "{e:?}");
        let g: GovernanceConfig =
            serde_yaml_ng::from_str("redis: {url: 'redis://127.0.0.1:6379', slot_ttl: 600ms}")
                .unwrap();
        QuotasConfig::default().check(&g).unwrap();
        for bad in ["50ms", "7200s"] {
            let g: GovernanceConfig = serde_yaml_ng::from_str(&format!(
                "redis: {{url: 'redis://127.0.0.1:6379', slot_ttl: {bad}}}"
            ))
            .unwrap();
            let e = QuotasConfig::default().check(&g).unwrap_err();
            assert_eq!(e.0, "slot_ttl", "{bad}: {e:?}");
        }
    }
}
