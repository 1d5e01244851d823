//! Human-friendly units in the YAML: durations (`250ms`, `30s`, `5m`, `1h`) and
//! byte sizes (`4096`, `512KiB`, `8MiB`, `1GB`), with serde helpers.
//!
//! Every duration is capped at [`MAX_DURATION`] here, at parse time: a value
//! such as `1e20` would panic in `Duration::from_secs_f64`, and one near
//! `u64::MAX` seconds would overflow `Instant + d` on every request.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serializer};

/// The longest duration a config may set (one year): longer than any timeout
/// makes sense for, and far from where `Instant + d` overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `secs` as a [`Duration`] when it is a number in `0..=MAX_DURATION`; the
/// error says what was wrong (NaN, infinite, negative, too long).
pub fn duration_from_secs(secs: f64, shown: &dyn std::fmt::Display) -> Result<Duration, String> {
    if secs.is_nan() || secs.is_infinite() || secs < 0.0 {
        return Err(format!(
            "duration `{shown}` is out of range (expected a non-negative finite duration)"
        ));
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "duration `{shown}` is out of range (at most {}s, one year)",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Checks a duration given as a whole number of milliseconds (the `*_ms` keys).
pub fn check_millis(ms: u64) -> Result<Duration, String> {
    let d = Duration::from_millis(ms);
    if d > MAX_DURATION {
        return Err(format!(
            "{ms}ms is out of range (at most {}ms, one year)",
            MAX_DURATION.as_millis()
        ));
    }
    Ok(d)
}

/// Parses `250ms`, `30s`, `5m`, `1h`, `1.5s` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    // Whole numbers are converted exactly (`18969036196ms` is not a round
    // trip through f64 seconds); fractions go through f64.
    if let Ok(whole) = num.parse::<u64>() {
        let d = match unit.trim() {
            "" | "s" | "sec" | "secs" => Some(Duration::from_secs(whole)),
            "ms" => Some(Duration::from_millis(whole)),
            "us" | "µs" => Some(Duration::from_micros(whole)),
            _ => None,
        };
        if let Some(d) = d {
            return if d <= MAX_DURATION {
                Ok(d)
            } else {
                duration_from_secs(d.as_secs_f64(), &s)
            };
        }
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration such as `30s` or `250ms`, found `{s}`"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1_000.0,
        "us" | "µs" => value / 1_000_000.0,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3_600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{s}` (expected ms, s, m or h)"
            ))
        }
    };
    duration_from_secs(secs, &s)
}

/// Formats a duration the way the config would write it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses `4096`, `512KiB`, `8MiB`, `1GiB`, `64KB`, `1MB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num
        .parse()
        .map_err(|_| format!("expected a size such as `8MiB` or `65536`, found `{s}`"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "KB" | "kB" | "K" | "k" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (expected KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is out of range"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Num(f64),
    Str(String),
}

/// `#[serde(with = "duration")]` for `Duration` fields.
pub mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match NumOrString::deserialize(d)? {
            NumOrString::Num(n) => duration_from_secs(n, &n).map_err(de::Error::custom),
            NumOrString::Str(s) => parse_duration(&s).map_err(de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }
}

/// `#[serde(with = "opt_duration")]` for `Option<Duration>` fields: `off`,
/// `none` or null turn the timeout off.
pub mod opt_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<NumOrString>::deserialize(d)? {
            None => Ok(None),
            Some(NumOrString::Str(s)) if matches!(s.trim(), "off" | "none" | "") => Ok(None),
            Some(NumOrString::Str(s)) => parse_duration(&s).map(Some).map_err(de::Error::custom),
            Some(NumOrString::Num(n)) => duration_from_secs(n, &n)
                .map(Some)
                .map_err(de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("off"),
        }
    }
}

/// `#[serde(with = "size")]` for byte-size `u64` fields.
pub mod size {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match NumOrString::deserialize(d)? {
            NumOrString::Num(n) if n >= 0.0 && n.fract() == 0.0 && n < u64::MAX as f64 => {
                Ok(n as u64)
            }
            NumOrString::Num(n) => Err(de::Error::custom(format!(
                "size {n} must be a whole number of bytes"
            ))),
            NumOrString::Str(s) => parse_size(&s).map_err(de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_duration("18969036196ms").unwrap(),
            Duration::from_millis(18_969_036_196)
        );
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn durations_out_of_range_are_errors_not_panics() {
        for n in [
            1e20,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e300,
        ] {
            let e = duration_from_secs(n, &n).unwrap_err();
            assert!(e.contains("out of range"), "{n}: {e}");
        }
        for s in [
            "99999999999999999999999h",
            "1e20",
            "-5s",
            "inf",
            "NaN",
            ".inf",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        assert_eq!(
            duration_from_secs(MAX_DURATION.as_secs_f64(), &0).unwrap(),
            MAX_DURATION
        );
        assert!(check_millis(u64::MAX).is_err());
        assert_eq!(check_millis(1500).unwrap(), Duration::from_millis(1500));
        // The cap keeps `Instant + d` from overflowing.
        assert!(std::time::Instant::now()
            .checked_add(MAX_DURATION)
            .is_some());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert!(parse_size("8 furlongs").is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any text: a duration within the cap or an error, never a panic.
            #[test]
            fn any_duration_text_parses_within_the_cap_or_fails(s in "\\PC{0,24}") {
                if let Ok(d) = parse_duration(&s) {
                    prop_assert!(d <= MAX_DURATION);
                }
            }

            #[test]
            fn numbers_with_units_parse_within_the_cap_or_fail(
                n in prop_oneof![any::<f64>(), 0.0..1e6],
                unit in prop_oneof![Just(""), Just("ms"), Just("s"), Just("m"), Just("h"), Just("us")],
            ) {
                if let Ok(d) = parse_duration(&format!("{n}{unit}")) {
                    prop_assert!(d <= MAX_DURATION);
                }
                let _ = duration_from_secs(n, &n);
            }

            /// What `format_duration` writes parses back to the same value.
            #[test]
            fn formatted_durations_round_trip(ms in 0u64..MAX_DURATION.as_millis() as u64) {
                let d = Duration::from_millis(ms);
                prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
            }

            #[test]
            fn any_size_text_parses_or_fails(s in "\\PC{0,24}") {
                let _ = parse_size(&s);
            }

            #[test]
            fn sizes_round_trip(n in 0u64..1 << 40, unit in prop_oneof![Just(("", 1u64)), Just(("KiB", 1 << 10)), Just(("MiB", 1 << 20)), Just(("GB", 1_000_000_000))]) {
                let (suffix, mult) = unit;
                let text = format!("{n}{suffix}");
                match n.checked_mul(mult) {
                    Some(v) => prop_assert_eq!(parse_size(&text).unwrap(), v),
                    None => prop_assert!(parse_size(&text).is_err()),
                }
            }
        }
    }
}
