//! The usage ledger: what every request consumed and cost, summed per minute
//! and per (team, key id, model, route, pool), kept for `accounting.retention`
//! (a ring of minutes, oldest dropped first) and bounded to
//! `accounting.max_rows` rows (beyond it a minute's new rows are summed into
//! one `(overflow)` row, so totals stay whole). `/usage` answers from it
//! (JSON or CSV, any grouping, any minute range); the per-team Prometheus
//! counters are its lifetime totals by (team label, route, model, pool),
//! whose labels all come from config.
//!
//! One short lock per request (no await inside, no allocation once the
//! minute's row exists: keys are `Arc`s and the key id's `HeaderValue`).
//! The two per-request maps hash with foldhash, seeded at random per map:
//! about a third of SipHash's cost on these short keys, and still no fixed
//! key to collide on, since in `trusted_headers` mode the team and key id of
//! a row are whatever the trusted proxy sent (not only names from config).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use http::HeaderValue;
use infergate_core::cost::{Money, TokenUsage};
use serde::Serialize;

/// What a row sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Totals {
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    #[serde(skip)]
    pub cost: Money,
}

impl Totals {
    pub(crate) fn of(usage: TokenUsage, cost: Money) -> Totals {
        Totals {
            requests: 1,
            input_tokens: usage.input,
            cached_input_tokens: usage.cached_input,
            output_tokens: usage.output,
            cost,
        }
    }

    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.input_tokens += o.input_tokens;
        self.cached_input_tokens += o.cached_input_tokens;
        self.output_tokens += o.output_tokens;
        self.cost = self.cost + o.cost;
    }
}

/// Who and what a row is about. `team` and `key` are the caller's as
/// authenticated (a trusted proxy's team header included); model, route and
/// pool come from config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RowKey {
    pub team: Arc<str>,
    pub key: Option<HeaderValue>,
    pub model: Arc<str>,
    pub route: Arc<str>,
    pub pool: Arc<str>,
}

/// A Prometheus series: only labels from config (the team label is
/// `unlisted` for a team only a trusted proxy named).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeriesKey {
    pub team: Arc<str>,
    pub route: Arc<str>,
    pub model: Arc<str>,
    pub pool: Arc<str>,
}

/// A map of the request path: foldhash with a random seed (see above).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct Minute {
    /// Minutes since the Unix epoch.
    at: u64,
    rows: FastMap<RowKey, Totals>,
}

struct State {
    minutes: VecDeque<Minute>,
    rows: usize,
    retention_minutes: u64,
    max_rows: usize,
    /// Rows that went to `(overflow)` because `max_rows` was reached.
    overflowed: u64,
    series: FastMap<SeriesKey, Totals>,
    overflow: RowKey,
}

impl State {
    /// Drops the minutes older than the retention before `minute`.
    fn expire(&mut self, minute: u64) {
        let keep_from = minute.saturating_sub(self.retention_minutes - 1);
        while self.minutes.front().is_some_and(|m| m.at < keep_from) {
            if let Some(m) = self.minutes.pop_front() {
                self.rows -= m.rows.len();
            }
        }
    }
}

/// The ledger of one gateway.
pub(crate) struct Ledger {
    state: Mutex<State>,
}

pub(crate) const OVERFLOW: &str = "(overflow)";

impl Ledger {
    pub(crate) fn new(retention_minutes: u64, max_rows: usize) -> Ledger {
        let o: Arc<str> = Arc::from(OVERFLOW);
        Ledger {
            state: Mutex::new(State {
                minutes: VecDeque::new(),
                rows: 0,
                retention_minutes: retention_minutes.max(1),
                max_rows: max_rows.max(1),
                overflowed: 0,
                series: FastMap::default(),
                overflow: RowKey {
                    team: o.clone(),
                    key: None,
                    model: o.clone(),
                    route: o.clone(),
                    pool: o,
                },
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn configure(&self, retention_minutes: u64, max_rows: usize) {
        let mut s = self.lock();
        s.retention_minutes = retention_minutes.max(1);
        s.max_rows = max_rows.max(1);
    }

    /// Drops what is older than the retention (called as time passes, so a
    /// quiet gateway forgets too).
    pub(crate) fn expire(&self, minute: u64) {
        self.lock().expire(minute);
    }

    /// Adds one request at `minute` (minutes since the epoch).
    pub(crate) fn add(&self, minute: u64, key: RowKey, series: SeriesKey, t: Totals) {
        let mut s = self.lock();
        let s = &mut *s;
        match s.series.get_mut(&series) {
            Some(v) => v.add(&t),
            None => {
                s.series.insert(series, t);
            }
        }
        if s.minutes.back().is_none_or(|m| m.at < minute) {
            s.minutes.push_back(Minute {
                at: minute,
                rows: FastMap::default(),
            });
            s.expire(minute);
        }
        // A request finishing just after a minute turned may carry the
        // previous minute: it lands in the newest minute (never before it).
        let Some(m) = s.minutes.back_mut() else {
            return;
        };
        if let Some(v) = m.rows.get_mut(&key) {
            v.add(&t);
            return;
        }
        let key = if s.rows >= s.max_rows {
            s.overflowed += 1;
            s.overflow.clone()
        } else {
            key
        };
        match m.rows.get_mut(&key) {
            Some(v) => v.add(&t),
            None => {
                m.rows.insert(key, t);
                s.rows += 1;
            }
        }
    }

    /// Sums rows in `[from, to)` (minutes since the epoch), grouped by `by`,
    /// keeping rows `filter` accepts.
    pub(crate) fn query(&self, q: &Query) -> Vec<(GroupKey, Totals)> {
        let s = self.lock();
        let mut out: BTreeMap<GroupKey, Totals> = BTreeMap::new();
        for m in s.minutes.iter().filter(|m| m.at >= q.from && m.at < q.to) {
            for (k, t) in &m.rows {
                if !q.filter.accepts(k) {
                    continue;
                }
                out.entry(GroupKey::of(k, &q.group_by)).or_default().add(t);
            }
        }
        out.into_iter().collect()
    }

    /// Output and input tokens per pool in `[from, to)` (minutes).
    pub(crate) fn pool_tokens(&self, from: u64, to: u64) -> HashMap<Arc<str>, Totals> {
        let s = self.lock();
        let mut out: HashMap<Arc<str>, Totals> = HashMap::new();
        for m in s.minutes.iter().filter(|m| m.at >= from && m.at < to) {
            for (k, t) in &m.rows {
                out.entry(k.pool.clone()).or_default().add(t);
            }
        }
        out
    }

    /// Per-minute output tokens of each pool in `[from, to)`.
    pub(crate) fn pool_minutes(&self, from: u64, to: u64) -> HashMap<(Arc<str>, u64), u64> {
        let s = self.lock();
        let mut out = HashMap::new();
        for m in s.minutes.iter().filter(|m| m.at >= from && m.at < to) {
            for (k, t) in &m.rows {
                *out.entry((k.pool.clone(), m.at)).or_default() += t.output_tokens;
            }
        }
        out
    }

    /// The oldest minute kept, and the overflow count.
    pub(crate) fn extent(&self) -> (Option<u64>, u64, usize) {
        let s = self.lock();
        (s.minutes.front().map(|m| m.at), s.overflowed, s.rows)
    }

    /// Appends the lifetime counters in Prometheus text.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        let s = self.lock();
        let mut series: Vec<_> = s.series.iter().collect();
        series.sort_by(|a, b| a.0.cmp(b.0));
        out.push_str("# HELP infergate_usage_requests_total Requests by caller team, route, serving model and pool.\n# TYPE infergate_usage_requests_total counter\n");
        for (k, t) in &series {
            let _ = writeln!(
                out,
                "infergate_usage_requests_total{{{}}} {}",
                labels(k),
                t.requests
            );
        }
        out.push_str("# HELP infergate_usage_tokens_total Tokens billed (the engine's usage, else counted) by team, route, model, pool and type (input includes cached_input).\n# TYPE infergate_usage_tokens_total counter\n");
        for (k, t) in &series {
            for (ty, v) in [
                ("input", t.input_tokens),
                ("cached_input", t.cached_input_tokens),
                ("output", t.output_tokens),
            ] {
                let _ = writeln!(
                    out,
                    "infergate_usage_tokens_total{{{},type=\"{ty}\"}} {v}",
                    labels(k)
                );
            }
        }
        out.push_str("# HELP infergate_usage_cost_dollars_total Cost of requests at the configured token prices.\n# TYPE infergate_usage_cost_dollars_total counter\n");
        for (k, t) in &series {
            let _ = writeln!(
                out,
                "infergate_usage_cost_dollars_total{{{}}} {}",
                labels(k),
                t.cost.to_decimal()
            );
        }
        let _ = writeln!(out, "# HELP infergate_usage_overflow_rows_total Usage rows summed into (overflow) because accounting.max_rows was reached.\n# TYPE infergate_usage_overflow_rows_total counter\ninfergate_usage_overflow_rows_total {}", s.overflowed);
    }
}

fn labels(k: &SeriesKey) -> String {
    let mut s = String::new();
    for (name, v) in [
        ("team", &k.team),
        ("route", &k.route),
        ("model", &k.model),
        ("pool", &k.pool),
    ] {
        if !s.is_empty() {
            s.push(',');
        }
        let _ = write!(s, "{name}=\"");
        push_label_value(&mut s, v);
        s.push('"');
    }
    s
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
pub(crate) fn push_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Dimensions a query groups by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GroupBy {
    pub team: bool,
    pub key: bool,
    pub model: bool,
    pub route: bool,
    pub pool: bool,
}

impl GroupBy {
    pub(crate) const ALL: GroupBy = GroupBy {
        team: true,
        key: true,
        model: true,
        route: true,
        pool: true,
    };

    /// `team,key,model` (names from `team`, `key`, `model`, `route`, `pool`).
    pub(crate) fn parse(s: &str) -> Result<GroupBy, String> {
        let mut g = GroupBy::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "team" => g.team = true,
                "key" | "key_id" => g.key = true,
                "model" => g.model = true,
                "route" => g.route = true,
                "pool" => g.pool = true,
                other => {
                    return Err(format!(
                        "group_by: unknown dimension `{other}` (expected team, key, model, route, pool)"
                    ))
                }
            }
        }
        Ok(g)
    }
}

/// A row of a query's answer: the grouped dimensions (`None`: not grouped).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct GroupKey {
    pub team: Option<Arc<str>>,
    /// `Some(None)`: grouped, the request had no key id.
    pub key: Option<Option<String>>,
    pub model: Option<Arc<str>>,
    pub route: Option<Arc<str>>,
    pub pool: Option<Arc<str>>,
}

impl GroupKey {
    fn of(k: &RowKey, g: &GroupBy) -> GroupKey {
        GroupKey {
            team: g.team.then(|| k.team.clone()),
            key: g.key.then(|| key_text(&k.key)),
            model: g.model.then(|| k.model.clone()),
            route: g.route.then(|| k.route.clone()),
            pool: g.pool.then(|| k.pool.clone()),
        }
    }
}

fn key_text(k: &Option<HeaderValue>) -> Option<String> {
    k.as_ref()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Rows a query keeps (`None`: any).
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub team: Option<String>,
    pub key: Option<String>,
    pub model: Option<String>,
    pub route: Option<String>,
    pub pool: Option<String>,
}

impl Filter {
    fn accepts(&self, k: &RowKey) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.team, &k.team)
            && eq(&self.model, &k.model)
            && eq(&self.route, &k.route)
            && eq(&self.pool, &k.pool)
            && self
                .key
                .as_deref()
                .is_none_or(|w| k.key.as_ref().is_some_and(|v| v.as_bytes() == w.as_bytes()))
    }
}

/// A `/usage` query: minutes `[from, to)`, grouping and filters.
#[derive(Debug, Clone)]
pub(crate) struct Query {
    pub from: u64,
    pub to: u64,
    pub group_by: GroupBy,
    pub filter: Filter,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(team: &str, k: Option<&str>, route: &str) -> RowKey {
        RowKey {
            team: team.into(),
            key: k.map(|k| HeaderValue::from_str(k).unwrap()),
            model: route.into(),
            route: route.into(),
            pool: "p".into(),
        }
    }

    fn series(team: &str) -> SeriesKey {
        SeriesKey {
            team: team.into(),
            route: "r".into(),
            model: "r".into(),
            pool: "p".into(),
        }
    }

    fn t(input: u64, output: u64, cost: u64) -> Totals {
        Totals::of(TokenUsage::new(input, 0, output), Money(cost))
    }

    #[test]
    fn sums_group_filter_and_expire_by_minute() {
        let l = Ledger::new(3, 100);
        l.add(10, key("a", Some("k1"), "r"), series("a"), t(1, 2, 3));
        l.add(10, key("a", Some("k2"), "r"), series("a"), t(10, 20, 30));
        l.add(11, key("b", None, "r"), series("b"), t(100, 200, 300));
        l.add(11, key("a", Some("k1"), "r"), series("a"), t(1, 1, 1));
        let all = Query {
            from: 0,
            to: u64::MAX,
            group_by: GroupBy::parse("team").unwrap(),
            filter: Filter::default(),
        };
        let rows = l.query(&all);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0.team.as_deref(), Some("a"));
        assert_eq!(rows[0].1.requests, 3);
        assert_eq!(rows[0].1.output_tokens, 23);
        assert_eq!(rows[0].1.cost, Money(34));
        let by_key = Query {
            group_by: GroupBy::ALL,
            filter: Filter {
                key: Some("k1".into()),
                ..Default::default()
            },
            ..all.clone()
        };
        let rows = l.query(&by_key);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.requests, 2);
        let one_minute = Query {
            from: 11,
            to: 12,
            ..all.clone()
        };
        assert_eq!(
            l.query(&one_minute)
                .iter()
                .map(|r| r.1.requests)
                .sum::<u64>(),
            2
        );
        // Minute 13 pushes out minute 10 (retention 3 minutes: 11, 12, 13).
        l.add(13, key("a", None, "r"), series("a"), t(0, 0, 0));
        assert_eq!(l.extent().0, Some(11));
        // Time passing alone expires too.
        l.expire(13);
        assert_eq!(l.extent().0, Some(11));
        assert_eq!(l.query(&all).iter().map(|r| r.1.requests).sum::<u64>(), 3);
        let mut m = String::new();
        l.render_metrics(&mut m);
        // Lifetime counters keep what the ring dropped.
        assert!(
            m.contains(
                "infergate_usage_requests_total{team=\"a\",route=\"r\",model=\"r\",pool=\"p\"} 4"
            ),
            "{m}"
        );
        assert!(m.contains("infergate_usage_cost_dollars_total{team=\"b\",route=\"r\",model=\"r\",pool=\"p\"} 0.0000000003"), "{m}");
        assert!(GroupBy::parse("team,nope").is_err());
    }

    #[test]
    fn rows_beyond_the_bound_sum_into_overflow() {
        let l = Ledger::new(10, 2);
        for i in 0..5 {
            l.add(1, key(&format!("t{i}"), None, "r"), series("x"), t(1, 1, 1));
        }
        let rows = l.query(&Query {
            from: 0,
            to: 10,
            group_by: GroupBy::parse("team").unwrap(),
            filter: Filter::default(),
        });
        assert_eq!(rows.len(), 3);
        let overflow = rows
            .iter()
            .find(|r| r.0.team.as_deref() == Some(OVERFLOW))
            .unwrap();
        assert_eq!(overflow.1.requests, 3);
        assert_eq!(rows.iter().map(|r| r.1.requests).sum::<u64>(), 5);
        assert_eq!(l.extent().1, 3);
    }
}
