//! The `accounting:` and `audit:` sections: how long the usage ledger keeps
//! its per-minute rows and how often pool capacity is sampled, and where the
//! audit log goes. Prices are `pricing:` (`crate::cost`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units;

/// `accounting:` usage totals for chargeback and pool utilisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountingConfig {
    /// How long per-minute usage rows (and pool samples) are kept in memory.
    #[serde(
        default = "AccountingConfig::default_retention",
        with = "units::duration"
    )]
    pub retention: Duration,
    /// The most usage rows (one per minute and team, key, model, route and
    /// pool) held at once; beyond it a minute's new rows are summed into one
    /// `(overflow)` row, so totals stay whole.
    #[serde(default = "AccountingConfig::default_max_rows")]
    pub max_rows: usize,
    /// How often each replica's scraped load is sampled for pool utilisation.
    #[serde(
        default = "AccountingConfig::default_sample_interval",
        with = "units::duration"
    )]
    pub pool_sample_interval: Duration,
}

impl AccountingConfig {
    fn default_retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    fn default_max_rows() -> usize {
        200_000
    }
    fn default_sample_interval() -> Duration {
        Duration::from_secs(1)
    }

    /// Bounds the YAML shape cannot express.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.retention < Duration::from_secs(60)
            || self.retention > Duration::from_secs(90 * 86_400)
        {
            return Err((
                "retention",
                "accounting.retention: must be between 1m and 90 days".into(),
            ));
        }
        if self.max_rows == 0 {
            return Err(("max_rows", "accounting.max_rows: must be at least 1".into()));
        }
        if self.pool_sample_interval < Duration::from_millis(10)
            || self.pool_sample_interval > Duration::from_secs(60)
        {
            return Err((
                "pool_sample_interval",
                "accounting.pool_sample_interval: must be between 10ms and 60s".into(),
            ));
        }
        Ok(())
    }
}

impl Default for AccountingConfig {
    fn default() -> Self {
        AccountingConfig {
            retention: Self::default_retention(),
            max_rows: Self::default_max_rows(),
            pool_sample_interval: Self::default_sample_interval(),
        }
    }
}

/// `audit:` one JSON line per request and per administrative change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `stdout`, `stderr`, or a file path (appended to); unset: no audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<AuditOutput>,
    /// Bytes of lines waiting to be written; beyond it lines are dropped and
    /// counted (`infergate_audit_dropped_total`), a request never waits.
    #[serde(default = "AuditConfig::default_buffer", with = "units::size")]
    pub buffer: u64,
}

impl AuditConfig {
    fn default_buffer() -> u64 {
        8 << 20
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            output: None,
            buffer: Self::default_buffer(),
        }
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AuditOutput {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl<'de> Deserialize<'de> for AuditOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "stdout" => AuditOutput::Stdout,
            "stderr" => AuditOutput::Stderr,
            "" => {
                return Err(serde::de::Error::custom(
                    "expected `stdout`, `stderr` or a file path",
                ))
            }
            _ => AuditOutput::File(PathBuf::from(s)),
        })
    }
}

impl Serialize for AuditOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AuditOutput::Stdout => s.serialize_str("stdout"),
            AuditOutput::Stderr => s.serialize_str("stderr"),
            AuditOutput::File(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_parse_and_check() {
        let a: AccountingConfig =
            serde_yaml_ng::from_str("retention: 2h\npool_sample_interval: 250ms").unwrap();
        assert_eq!(a.retention, Duration::from_secs(7200));
        assert_eq!(a.max_rows, 200_000);
        a.check().unwrap();
        let short: AccountingConfig = serde_yaml_ng::from_str("retention: 10s").unwrap();
        assert!(short.check().unwrap_err().1.contains("retention"));
        let au: AuditConfig =
            serde_yaml_ng::from_str("output: /var/log/audit.jsonl\nbuffer: 1MiB").unwrap();
        assert_eq!(
            au.output,
            Some(AuditOutput::File("/var/log/audit.jsonl".into()))
        );
        assert_eq!(au.buffer, 1 << 20);
        let out: AuditConfig = serde_yaml_ng::from_str("output: stdout").unwrap();
        assert_eq!(out.output, Some(AuditOutput::Stdout));
        assert!(serde_yaml_ng::from_str::<AuditConfig>("output: ''").is_err());
        assert_eq!(AuditConfig::default().output, None);
    }
}
