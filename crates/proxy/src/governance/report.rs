//! The admin listener's governance reports: `GET /usage` (usage totals for
//! chargeback, JSON or CSV, grouped and filtered, over a minute range) and
//! `GET /capacity` (per-pool utilisation and idle cost over a range).
//!
//! Query parameters: `from`, `to` (Unix seconds or `YYYY-MM-DDTHH:MM:SSZ`;
//! `from` rounds down and `to` up to whole minutes; default: everything
//! kept), `group_by` (`team,key,model,route,pool`; default
//! `team,key,model,route`), `format` (`json`, `csv`), and filters `team`,
//! `key`, `model`, `route`, `pool`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use infergate_core::civil::days_from_civil;
use infergate_core::pool::Pool;
use serde_json::json;

use super::capacity;
use super::ledger::{Filter, GroupBy, GroupKey, Query, Totals};
use super::{minute_now, Governance};
use crate::telemetry::log::write_timestamp;

/// An answer: status, content type, body.
pub(crate) type Answer = (http::StatusCode, &'static str, Vec<u8>);

fn bad(msg: String) -> Answer {
    (
        http::StatusCode::BAD_REQUEST,
        "application/json",
        serde_json::to_vec(&json!({"error": msg})).unwrap_or_default(),
    )
}

/// Decodes `%XX` and `+` of a query value.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| char::from(c).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn params(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Unix seconds from `1700000000` or `2026-12-06T17:00:00Z`.
fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let err = || format!("expected Unix seconds or YYYY-MM-DDTHH:MM:SSZ, found `{s}`");
    let t = s.strip_suffix('Z').ok_or_else(err)?;
    let (date, time) = t.split_once('T').ok_or_else(err)?;
    let n = |x: &str| x.parse::<u32>().map_err(|_| err());
    let mut d = date.splitn(3, '-');
    let (y, mo, da) = (
        d.next().ok_or_else(err)?,
        d.next().ok_or_else(err)?,
        d.next().ok_or_else(err)?,
    );
    let time = time.split('.').next().unwrap_or(time);
    let mut tp = time.splitn(3, ':');
    let (h, mi, se) = (
        tp.next().ok_or_else(err)?,
        tp.next().ok_or_else(err)?,
        tp.next().ok_or_else(err)?,
    );
    let (y, mo, da, h, mi, se) = (n(y)?, n(mo)?, n(da)?, n(h)?, n(mi)?, n(se)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return Err(err());
    }
    let days = days_from_civil(i64::from(y), mo, da);
    u64::try_from(days * 86_400 + i64::from(h * 3600 + mi * 60 + se)).map_err(|_| err())
}

/// The minute range `[from, to)` of a query.
fn range(p: &HashMap<String, String>, oldest: Option<u64>) -> Result<(u64, u64), String> {
    let from = match p.get("from") {
        Some(s) => parse_time(s).map_err(|e| format!("from: {e}"))? / 60,
        None => oldest.unwrap_or(0),
    };
    let to = match p.get("to") {
        Some(s) => parse_time(s).map_err(|e| format!("to: {e}"))?.div_ceil(60),
        None => minute_now() + 1,
    };
    if to < from {
        if p.contains_key("from") {
            return Err("`to` is before `from`".into());
        }
        // Only `to` given, before anything kept: an empty range.
        return Ok((to, to));
    }
    Ok((from, to))
}

fn timestamp(minute: u64) -> String {
    let mut s = String::new();
    write_timestamp(&mut s, UNIX_EPOCH + Duration::from_secs(minute * 60));
    s
}

/// `GET /usage`.
pub(crate) fn usage(g: &Governance, query: Option<&str>) -> Answer {
    let p = params(query);
    let (oldest, overflowed, rows_kept) = g.ledger.extent();
    let (from, to) = match range(&p, oldest) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let group_by = match p.get("group_by") {
        Some(s) => match GroupBy::parse(s) {
            Ok(g) => g,
            Err(e) => return bad(e),
        },
        None => GroupBy {
            pool: false,
            ..GroupBy::ALL
        },
    };
    let filter = Filter {
        team: p.get("team").cloned(),
        key: p.get("key").or_else(|| p.get("key_id")).cloned(),
        model: p.get("model").cloned(),
        route: p.get("route").cloned(),
        pool: p.get("pool").cloned(),
    };
    let rows = g.ledger.query(&Query {
        from,
        to,
        group_by,
        filter,
    });
    let mut total = Totals::default();
    for (_, t) in &rows {
        total.requests += t.requests;
        total.input_tokens += t.input_tokens;
        total.cached_input_tokens += t.cached_input_tokens;
        total.output_tokens += t.output_tokens;
        total.cost = total.cost + t.cost;
    }
    let currency = g.currency();
    match p.get("format").map(String::as_str) {
        None | Some("json") => {
            let row = |k: Option<&GroupKey>, t: &Totals| {
                let mut v = serde_json::Map::new();
                if let Some(k) = k {
                    let dims = [
                        ("team", group_by.team, k.team.as_deref()),
                        ("model", group_by.model, k.model.as_deref()),
                        ("route", group_by.route, k.route.as_deref()),
                        ("pool", group_by.pool, k.pool.as_deref()),
                    ];
                    for (name, on, val) in dims {
                        if on {
                            v.insert(name.into(), json!(val));
                        }
                    }
                    if group_by.key {
                        v.insert("key_id".into(), json!(k.key.clone().flatten()));
                    }
                }
                v.insert("requests".into(), json!(t.requests));
                v.insert("input_tokens".into(), json!(t.input_tokens));
                v.insert("cached_input_tokens".into(), json!(t.cached_input_tokens));
                v.insert("output_tokens".into(), json!(t.output_tokens));
                v.insert("cost".into(), json!(t.cost.to_decimal()));
                serde_json::Value::Object(v)
            };
            let body = json!({
                "from": timestamp(from),
                "to": timestamp(to),
                "currency": currency,
                "retention_seconds": g.retention().as_secs(),
                "rows_kept": rows_kept,
                "overflow_rows": overflowed,
                "rows": rows.iter().map(|(k, t)| row(Some(k), t)).collect::<Vec<_>>(),
                "total": row(None, &total),
            });
            (
                http::StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        Some("csv") => {
            let mut out = String::new();
            let dims = [
                ("team", group_by.team),
                ("key_id", group_by.key),
                ("model", group_by.model),
                ("route", group_by.route),
                ("pool", group_by.pool),
            ];
            for (name, on) in dims {
                if on {
                    out.push_str(name);
                    out.push(',');
                }
            }
            out.push_str("requests,input_tokens,cached_input_tokens,output_tokens,cost,currency\n");
            for (k, t) in &rows {
                let key = k.key.clone().flatten();
                let vals = [
                    k.team.as_deref(),
                    if group_by.key {
                        Some(key.as_deref().unwrap_or(""))
                    } else {
                        None
                    },
                    k.model.as_deref(),
                    k.route.as_deref(),
                    k.pool.as_deref(),
                ];
                for v in vals.into_iter().flatten() {
                    push_csv(&mut out, v);
                    out.push(',');
                }
                let _ = write!(
                    out,
                    "{},{},{},{},{},",
                    t.requests,
                    t.input_tokens,
                    t.cached_input_tokens,
                    t.output_tokens,
                    t.cost.to_decimal()
                );
                push_csv(&mut out, &currency);
                out.push('\n');
            }
            (
                http::StatusCode::OK,
                "text/csv; charset=utf-8",
                out.into_bytes(),
            )
        }
        Some(other) => bad(format!("format: expected json or csv, found `{other}`")),
    }
}

/// A CSV field: quoted when it holds a comma, quote or line break; a
/// leading `=`, `+`, `-` or `@` is prefixed with `'` so a spreadsheet does
/// not run it as a formula.
fn push_csv(out: &mut String, v: &str) {
    let formula = v.starts_with(['=', '+', '-', '@']) && v != "-";
    let v = if formula {
        format!("'{v}")
    } else {
        v.to_string()
    };
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(&v);
    }
}

/// `GET /capacity`.
pub(crate) fn capacity(g: &Governance, pools: &[Arc<Pool>], query: Option<&str>) -> Answer {
    let p = params(query);
    let ints = g.capacity.integrals(0, u64::MAX);
    let oldest = ints.iter().map(|i| i.0).min();
    let (from, to) = match range(&p, oldest) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let ints: Vec<_> = ints
        .into_iter()
        .filter(|i| i.0 >= from && i.0 < to)
        .collect();
    let tokens = g
        .ledger
        .pool_tokens(from, to)
        .into_iter()
        .map(|(p, t)| (p, (t.requests, t.input_tokens, t.output_tokens)))
        .collect();
    let minute_tokens = g.ledger.pool_minutes(from, to);
    let names: Vec<Arc<str>> = pools.iter().map(|p| p.name.clone()).collect();
    let reports = capacity::report(&names, &ints, &tokens, &minute_tokens, |p| g.pool_price(p));
    let body = json!({
        "from": timestamp(from),
        "to": timestamp(to),
        "currency": g.currency(),
        "sample_interval_ms": g.sample_interval().as_millis() as u64,
        "pools": reports,
    });
    (
        http::StatusCode::OK,
        "application/json",
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_query_values_parse() {
        assert_eq!(parse_time("1700000000").unwrap(), 1_700_000_000);
        assert_eq!(parse_time("1970-01-01T00:01:00Z").unwrap(), 60);
        assert_eq!(parse_time("2024-02-29T12:00:00Z").unwrap(), 1_709_208_000);
        assert_eq!(parse_time("2026-12-06T17:00:00.5Z").unwrap(), 1_796_576_400);
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
        let p = params(Some("team=a%20b&model=meta-llama%2FLlama&format=csv&x"));
        assert_eq!(p["team"], "a b");
        assert_eq!(p["model"], "meta-llama/Llama");
        assert_eq!(p["x"], "");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        let mut s = String::new();
        push_csv(&mut s, "a,b");
        s.push('|');
        push_csv(&mut s, "=cmd()");
        s.push('|');
        push_csv(&mut s, "say \"hi\"");
        s.push('|');
        push_csv(&mut s, "-");
        assert_eq!(s, "\"a,b\"|'=cmd()|\"say \"\"hi\"\"\"|-");
    }
}
