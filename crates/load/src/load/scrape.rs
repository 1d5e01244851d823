//! Replica-side counters around a run: `--scrape URL` reads each replica's Prometheus
//! `/metrics` before and after, and reports how much every `*_total` counter grew (summed over
//! label sets), per URL and over all of them, plus the fleet's prefix-cache hit rate from the
//! engines' own counters (vLLM `prefix_cache_hits/queries`, SGLang `cached/prompt_tokens`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::client::{get, Target};

/// Sum of every `*_total` series per metric name.
pub type Counters = BTreeMap<String, f64>;

pub fn parse(text: &str) -> Counters {
    let mut out = Counters::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !name.ends_with("_total") {
            continue;
        }
        let rest = match line.rfind('}') {
            Some(i) if i > name_end => &line[i + 1..],
            _ => &line[name_end..],
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *out.entry(name.to_string()).or_default() += v;
        }
    }
    out
}

/// The replicas to read.
pub struct Scraper {
    targets: Vec<(String, Target)>,
}

impl Scraper {
    pub async fn new(urls: &[String]) -> Result<Self, String> {
        let mut targets = Vec::new();
        for u in urls {
            targets.push((u.clone(), Target::new(u, "", false, vec![]).await?));
        }
        Ok(Self { targets })
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// One reading per URL (empty when a replica did not answer within 5 s).
    pub async fn read(&self) -> Vec<Counters> {
        let mut out = Vec::with_capacity(self.targets.len());
        for (_, t) in &self.targets {
            let text = get(t, Duration::from_secs(5)).await.unwrap_or_default();
            out.push(parse(&String::from_utf8_lossy(&text)));
        }
        out
    }

    /// Growth of every counter between `before` and `after`.
    pub fn report(&self, before: &[Counters], after: &[Counters]) -> Value {
        let mut total = Counters::new();
        let mut per_url = serde_json::Map::new();
        for (((url, _), b), a) in self.targets.iter().zip(before).zip(after) {
            let mut d = Counters::new();
            for (k, v) in a {
                let grew = v - b.get(k).copied().unwrap_or(0.0);
                if grew != 0.0 {
                    d.insert(k.clone(), grew);
                    *total.entry(k.clone()).or_default() += grew;
                }
            }
            per_url.insert(url.clone(), json!(d));
        }
        let ratio = |hits: &str, all: &str| match (total.get(hits), total.get(all)) {
            (Some(h), Some(q)) if *q > 0.0 => Some(h / q),
            _ => None,
        };
        let hit_rate = ratio(
            "vllm:prefix_cache_hits_total",
            "vllm:prefix_cache_queries_total",
        )
        .or_else(|| ratio("sglang:cached_tokens_total", "sglang:prompt_tokens_total"));
        json!({ "prefix_cache_hit_rate": hit_rate, "total": total, "per_url": per_url })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_total_counters_over_label_sets() {
        let text = "# HELP vllm:prefix_cache_hits_total x\n\
                    vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"a b}\"} 10\n\
                    vllm:prefix_cache_hits_total{engine=\"1\"} 5.5 1700000000\n\
                    vllm:num_requests_running{engine=\"0\"} 3\n\
                    plain_total 2\n";
        let c = parse(text);
        assert_eq!(c.get("vllm:prefix_cache_hits_total"), Some(&15.5));
        assert_eq!(c.get("plain_total"), Some(&2.0));
        assert!(!c.contains_key("vllm:num_requests_running"));
    }
}
