//! Collected measurements and the final report (text for people, `--json` for scripts).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::Outcome;
use super::hist::Histogram;

/// Everything measured for one priority class.
#[derive(Clone, Debug, Default)]
pub struct ClassStats {
    pub name: String,
    pub share: f64,
    pub count: u64,
    pub ok: u64,
    pub tokens: u64,
    /// Prompt tokens and cached prompt tokens of the answers whose usage reported a cache count.
    pub usage_prompt: u64,
    pub usage_cached: u64,
    pub errors: BTreeMap<String, u64>,
    /// The start of the first answer body seen for each error status.
    pub error_samples: BTreeMap<String, String>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// End-to-end time of answers that were errors (how fast a refusal comes).
    pub error_e2e: Histogram,
}

impl ClassStats {
    fn merge(&mut self, o: &ClassStats) {
        self.count += o.count;
        self.ok += o.ok;
        self.tokens += o.tokens;
        self.usage_prompt += o.usage_prompt;
        self.usage_cached += o.usage_cached;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.error_samples {
            self.error_samples
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        self.ttft.merge(&o.ttft);
        self.itl.merge(&o.itl);
        self.e2e.merge(&o.e2e);
        self.error_e2e.merge(&o.error_e2e);
    }
}

/// The run's measurements; requests that started before `measure_from` (the end of warm-up)
/// are only counted in `seen`.
pub struct Stats {
    pub classes: Vec<ClassStats>,
    /// Open loop: how late each request was sent after its scheduled arrival.
    pub lag: Histogram,
    /// Open loop: arrivals never sent because `--max-in-flight` was still full at the end.
    pub not_sent: u64,
    /// Requests re-sent on a fresh connection after a kept-alive one failed before answering.
    pub retries: u64,
    /// Requests finished, warm-up included.
    pub seen: u64,
    pub measure_from: Option<Instant>,
    /// Start of the first and end of the last measured request: the throughput window.
    pub first_start: Option<Instant>,
    pub last_end: Option<Instant>,
}

impl Stats {
    pub fn new(classes: Vec<ClassStats>, measure_from: Option<Instant>) -> Self {
        Self {
            classes,
            lag: Histogram::default(),
            not_sent: 0,
            retries: 0,
            seen: 0,
            measure_from,
            first_start: None,
            last_end: None,
        }
    }

    pub fn record(
        &mut self,
        class: usize,
        o: &Outcome,
        itls: &[u64],
        error_body: &[u8],
        lag: Option<Duration>,
    ) {
        self.seen += 1;
        self.retries += u64::from(o.retried);
        let start = o.end - o.e2e;
        if self.measure_from.is_some_and(|m| start < m) {
            return;
        }
        self.first_start = Some(self.first_start.map_or(start, |s| s.min(start)));
        self.last_end = Some(self.last_end.map_or(o.end, |e| e.max(o.end)));
        if let Some(l) = lag {
            self.lag.record(l.as_nanos() as u64);
        }
        let c = &mut self.classes[class];
        c.count += 1;
        if o.status.ok() {
            c.ok += 1;
            c.tokens += o.tokens as u64;
            if let Some(u) = o.usage {
                if let Some(cached) = u.cached {
                    c.usage_prompt += u.prompt as u64;
                    c.usage_cached += cached as u64;
                }
            }
            c.e2e.record(o.e2e.as_nanos() as u64);
            if let Some(t) = o.ttft {
                c.ttft.record(t.as_nanos() as u64);
            }
            for &gap in itls {
                c.itl.record(gap);
            }
        } else {
            c.error_e2e.record(o.e2e.as_nanos() as u64);
            let label = o.status.label();
            if !c.error_samples.contains_key(&label) && !error_body.is_empty() {
                c.error_samples.insert(
                    label.clone(),
                    String::from_utf8_lossy(error_body).into_owned(),
                );
            }
            *c.errors.entry(label).or_default() += 1;
        }
    }

    /// All classes together.
    pub fn total(&self) -> ClassStats {
        let mut t = ClassStats {
            name: "all".into(),
            share: 1.0,
            ..Default::default()
        };
        for c in &self.classes {
            t.merge(c);
        }
        t
    }

    /// Seconds from the first measured request's start to the last answer.
    pub fn elapsed(&self) -> f64 {
        match (self.first_start, self.last_end) {
            (Some(s), Some(e)) => e.saturating_duration_since(s).as_secs_f64(),
            _ => 0.0,
        }
    }
}

fn ms(ns: Option<u64>) -> Value {
    ns.map_or(Value::Null, |v| json!(v as f64 / 1e6))
}

fn dist(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "p50": ms(h.quantile(0.5)),
        "p90": ms(h.quantile(0.9)),
        "p99": ms(h.quantile(0.99)),
        "mean": ms(h.mean()),
        "max": ms(h.max()),
    })
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Cached over prompt tokens, from the answers' own usage (None when no answer reported it).
fn hit_rate(c: &ClassStats) -> Option<f64> {
    (c.usage_prompt > 0).then(|| c.usage_cached as f64 / c.usage_prompt as f64)
}

fn class_json(c: &ClassStats, secs: f64) -> Value {
    json!({
        "share": c.share,
        "requests": c.count,
        "ok": c.ok,
        "errors": c.errors,
        "error_samples": c.error_samples,
        "req_per_s": rate(c.count, secs),
        "ok_per_s": rate(c.ok, secs),
        "output_tokens": c.tokens,
        "output_tok_per_s": rate(c.tokens, secs),
        "usage_prompt_tokens": c.usage_prompt,
        "usage_cached_tokens": c.usage_cached,
        "usage_cache_hit_rate": hit_rate(c),
        "ttft_ms": dist(&c.ttft),
        "itl_ms": dist(&c.itl),
        "e2e_ms": dist(&c.e2e),
        "error_e2e_ms": dist(&c.error_e2e),
    })
}

/// The machine-readable report: `run` describes the run (mode, workload, url...).
pub fn to_json(s: &Stats, run: Value, unfinished: u64) -> Value {
    let secs = s.elapsed();
    let mut v = class_json(&s.total(), secs);
    v["run"] = run;
    v["elapsed_s"] = json!(secs);
    v["unfinished"] = json!(unfinished);
    v["not_sent"] = json!(s.not_sent);
    v["keepalive_retries"] = json!(s.retries);
    v["schedule_lag_ms"] = dist(&s.lag);
    v["classes"] = s
        .classes
        .iter()
        .map(|c| (c.name.clone(), class_json(c, secs)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    v
}

fn fmt_ms(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".into(), |v| format!("{:.3}", v as f64 / 1e6))
}

fn text_class(out: &mut String, c: &ClassStats, secs: f64) {
    use std::fmt::Write;
    let errors = if c.errors.is_empty() {
        "none".to_string()
    } else {
        c.errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        out,
        "  requests {}  ok {}  errors: {}\n  {:.1} req/s  {:.1} ok/s  {} output tokens  {:.1} output tok/s",
        c.count,
        c.ok,
        errors,
        rate(c.count, secs),
        rate(c.ok, secs),
        c.tokens,
        rate(c.tokens, secs)
    );
    if let Some(h) = hit_rate(c) {
        let _ = writeln!(
            out,
            "  prompt tokens {} of which cached {} (hit rate {h:.3}, from usage)",
            c.usage_prompt, c.usage_cached
        );
    }
    let _ = writeln!(
        out,
        "  {:<6}{:>10}{:>10}{:>10}{:>10}{:>10}  (ms)",
        "", "p50", "p90", "p99", "mean", "max"
    );
    for (name, h) in [("ttft", &c.ttft), ("itl", &c.itl), ("e2e", &c.e2e)] {
        let _ = writeln!(
            out,
            "  {:<6}{:>10}{:>10}{:>10}{:>10}{:>10}",
            name,
            fmt_ms(h.quantile(0.5)),
            fmt_ms(h.quantile(0.9)),
            fmt_ms(h.quantile(0.99)),
            fmt_ms(h.mean()),
            fmt_ms(h.max())
        );
    }
    for (k, v) in &c.error_samples {
        let _ = writeln!(out, "  first {k} body: {}", v.trim());
    }
}

/// The report for people.
pub fn to_text(s: &Stats, header: &str, unfinished: u64) -> String {
    use std::fmt::Write;
    let secs = s.elapsed();
    let mut out = format!("{header}\nmeasured {secs:.3} s\n");
    text_class(&mut out, &s.total(), secs);
    if s.lag.count() > 0 {
        let _ = writeln!(
            out,
            "  schedule lag p50 {} p99 {} max {} ms",
            fmt_ms(s.lag.quantile(0.5)),
            fmt_ms(s.lag.quantile(0.99)),
            fmt_ms(s.lag.max())
        );
    }
    if s.retries > 0 {
        let _ = writeln!(
            out,
            "  keep-alive retries {} (re-sent on a fresh connection: the reused one closed before answering)",
            s.retries
        );
    }
    if s.not_sent > 0 || unfinished > 0 {
        let _ = writeln!(
            out,
            "  not sent (client backlog) {}  unfinished (cut at the end) {unfinished}",
            s.not_sent
        );
    }
    if s.classes.len() > 1 {
        for c in &s.classes {
            let _ = writeln!(out, "class {} (share {:.3})", c.name, c.share);
            text_class(&mut out, c, secs);
        }
    }
    out
}
