//! Replica signals: what a replica's own `/metrics` says about its load, parsed
//! from the Prometheus text format for the pool's engine type.
//!
//! Only the series routing needs are read (queue, running, KV usage, cache
//! geometry, resident LoRA adapters); every other line is skipped after a prefix
//! check, so a scrape every 50 ms stays cheap. A scrape that failed, or one that
//! lacks a required series, is stored as [`Signals::failed`]: routing treats an
//! unknown replica as saturated, never as idle (a failed load poll that reads as
//! zero load is a known peer bug).

use std::time::{Duration, Instant};

use serde::Serialize;

use infergate_protocol::EngineKind;

/// Metric names of one engine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetricNames {
    pub waiting: &'static str,
    pub running: &'static str,
    /// KV usage gauges in 0..1, first present wins (newer name first).
    pub kv_usage: &'static [&'static str],
    /// Whether a scrape without a KV gauge is incomplete (it is for engines that
    /// always serve one: reading "no KV gauge" as "KV empty" would attract traffic).
    pub kv_required: bool,
    pub cache_config: Option<&'static str>,
    pub block_size_label: &'static str,
    pub num_blocks_label: &'static str,
    pub lora: Option<&'static str>,
    /// Prefix-cache hit rate: a gauge in 0..1, or (hits, queries) counters
    /// whose ratio since the engine started is the rate.
    pub prefix_hit_rate: Option<&'static str>,
    pub prefix_counters: Option<(&'static str, &'static str)>,
    /// The engine's preemptions since it started (a counter): a sequence
    /// preempted for KV room goes back to the queue.
    pub preemptions: Option<&'static str>,
    /// The counter of output tokens: it moves at every engine step that
    /// decodes (a prompt counter may move at a request's arrival).
    pub tokens_generated: Option<&'static str>,
}

impl MetricNames {
    pub(crate) fn for_engine(engine: EngineKind) -> MetricNames {
        match engine {
            EngineKind::Vllm => MetricNames {
                waiting: "vllm:num_requests_waiting",
                running: "vllm:num_requests_running",
                kv_usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
                kv_required: true,
                cache_config: Some("vllm:cache_config_info"),
                block_size_label: "block_size",
                num_blocks_label: "num_gpu_blocks",
                lora: Some("vllm:lora_requests_info"),
                prefix_hit_rate: None,
                prefix_counters: Some((
                    "vllm:prefix_cache_hits_total",
                    "vllm:prefix_cache_queries_total",
                )),
                preemptions: Some("vllm:num_preemptions_total"),
                tokens_generated: Some("vllm:generation_tokens_total"),
            },
            EngineKind::Sglang => MetricNames {
                waiting: "sglang:num_queue_reqs",
                running: "sglang:num_running_reqs",
                kv_usage: &["sglang:token_usage"],
                kv_required: true,
                cache_config: Some("sglang:cache_config_info"),
                block_size_label: "page_size",
                num_blocks_label: "num_pages",
                lora: None,
                prefix_hit_rate: Some("sglang:cache_hit_rate"),
                prefix_counters: None,
                preemptions: None,
                tokens_generated: Some("sglang:generation_tokens_total"),
            },
            EngineKind::LlamaCpp => MetricNames {
                waiting: "llamacpp:requests_deferred",
                running: "llamacpp:requests_processing",
                // Served by older llama-server builds only.
                kv_usage: &["llamacpp:kv_cache_usage_ratio"],
                kv_required: false,
                cache_config: None,
                block_size_label: "",
                num_blocks_label: "",
                lora: None,
                prefix_hit_rate: None,
                prefix_counters: None,
                preemptions: None,
                tokens_generated: Some("llamacpp:tokens_predicted_total"),
            },
        }
    }
}

/// Adapters resident on a replica (vLLM `lora_requests_info`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoraInfo {
    pub max_lora: u32,
    pub running: Vec<String>,
    pub waiting: Vec<String>,
}

impl LoraInfo {
    pub fn is_resident(&self, adapter: &str) -> bool {
        self.running.iter().any(|a| a == adapter)
    }
    pub fn is_loading(&self, adapter: &str) -> bool {
        self.waiting.iter().any(|a| a == adapter)
    }
    /// Room to load another adapter without evicting one.
    pub fn has_room(&self) -> bool {
        self.max_lora == 0 || (self.running.len() + self.waiting.len()) < self.max_lora as usize
    }
}

/// How long the engine's request count is averaged over for placing prefix
/// groups ([`Signals::smoothed_requests`]): several scrape intervals (50 ms by
/// default), yet short against the life of a group, so sustained load still
/// moves new groups off a replica within about a second.
pub(crate) const LOAD_SMOOTHING: Duration = Duration::from_millis(500);

/// KV cache usage at or above which an engine's queue is put down to its
/// cache, not its batch: it admits the head of its queue only when the
/// head's uncached prompt gets its blocks, so a queue held by the cache
/// shows a usage of at least 1 − (the head's blocks ÷ the cache's). At
/// 0.85 that covers heads up to 15% of the cache (a cold 3,700-token
/// prompt on a 32k-token cache is 11%). A running count seen there is what
/// the cache held of that moment's streams (fewer long ones, more that
/// share a cached prefix), not a batch limit: admission's KV projection
/// bounds such a replica instead (`admission::budget`).
pub(crate) const KV_FULL_USAGE: f64 = 0.85;

/// One scrape's result.
#[derive(Debug, Clone, Serialize)]
pub struct Signals {
    #[serde(skip)]
    pub at: Instant,
    /// Why the scrape failed (`Some`); the other fields are then meaningless.
    pub error: Option<String>,
    pub waiting: f64,
    pub running: f64,
    pub kv_usage: Option<f64>,
    pub block_size: Option<u32>,
    pub num_blocks: Option<u64>,
    pub lora: Option<LoraInfo>,
    /// The engine's prefix-cache hit rate (0..1) since it started, when it
    /// reports one (shown on the status page; routing does not use it).
    pub prefix_hit_rate: Option<f64>,
    /// The engine's preemptions since it started, when it reports them.
    #[serde(skip)]
    pub preemptions: Option<f64>,
    /// Output tokens the engine generated since it started, when it reports
    /// them: unchanged between two scrapes, no step ended (or none decoded).
    #[serde(skip)]
    pub tokens_generated: Option<f64>,
    /// The gateway's own requests in flight on the replica when it was scraped:
    /// requests sent since then are not in `running`/`waiting` yet.
    pub own_requests_at_scrape: u64,
    /// The replica's batch limit as observed: `running` at a scrape that showed
    /// a queue (the engine runs no more than that at once). Carried over scrapes.
    pub batch_limit: Option<f64>,
    /// The batch limit admission caps a replica at (`admission::tuning`):
    /// `running` once three consecutive scrapes, each after an engine step
    /// ended, showed a queue of 2 or more at the same `running` with the KV
    /// cache below [`KV_FULL_USAGE`], no preemption since the scrape before
    /// and no larger `running` ever seen, so a request caught between its
    /// arrival and the engine's next step is not read as a full batch, nor a
    /// queue the cache holds back; then the largest `running` seen. Carried
    /// over scrapes.
    pub saturated_batch: Option<f64>,
    /// Admission's request cap while `saturated_batch` is unknown
    /// (`admission::tuning::slow_start_cap`). Carried over scrapes.
    pub slow_start_cap: u64,
    /// Consecutive scrapes (up to 3) with a queue of 2 or more at this
    /// `running` (a scrape inside the same engine step as the one before
    /// counts once).
    #[serde(skip)]
    pub queue_plateau: u8,
    /// The largest `running` any scrape read. Carried over scrapes.
    #[serde(skip)]
    pub most_running: f64,
    /// The last scrape at which the engine counted more requests (running +
    /// waiting) than this gateway had in flight there: another gateway (or a
    /// client going around the gateway) feeds the replica. Carried over scrapes.
    #[serde(skip)]
    pub foreign_load_at: Option<Instant>,
    /// The engine's requests (running + waiting) averaged over about
    /// [`LOAD_SMOOTHING`], time-weighted over scrapes (carried over them).
    /// Prefix groups are placed on this rather than on the last scrape, whose
    /// count may still include requests that have finished (it is up to an
    /// interval old, more while the gateway is short of CPU): gateways that
    /// scrape at different instants saw a brief burst on one replica
    /// differently and so gave the same new group different homes.
    pub smoothed_requests: f64,
}

impl Signals {
    pub fn failed(at: Instant, error: impl Into<String>) -> Signals {
        Signals {
            at,
            error: Some(error.into()),
            waiting: 0.0,
            running: 0.0,
            kv_usage: None,
            block_size: None,
            num_blocks: None,
            lora: None,
            prefix_hit_rate: None,
            preemptions: None,
            tokens_generated: None,
            own_requests_at_scrape: 0,
            batch_limit: None,
            saturated_batch: None,
            slow_start_cap: 0,
            queue_plateau: 0,
            most_running: 0.0,
            foreign_load_at: None,
            smoothed_requests: 0.0,
        }
    }

    /// Sets the scrape-time context: own requests then, and the batch limit
    /// learned from this and the previous scrape.
    /// Adds what the scrape alone cannot tell: `own_requests` in flight when it
    /// was read, `ours_at_most` the most of ours the engine can have counted
    /// in it, and what earlier scrapes learned.
    pub fn with_context(
        mut self,
        own_requests: u64,
        ours_at_most: u64,
        previous: Option<&Signals>,
    ) -> Signals {
        self.own_requests_at_scrape = own_requests;
        let seen_now = (self.error.is_none() && self.waiting > 0.0 && self.running > 0.0)
            .then_some(self.running);
        let before = previous.and_then(|p| p.batch_limit);
        self.batch_limit = match (seen_now, before) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        // Admission's limit: a queue of at least 2 at the same running count
        // on three consecutive scrapes (`queue_plateau` counts them). A
        // request caught between its arrival and the engine's next step
        // makes a queue of 1 at any load, now and then two scrapes in a row.
        let queued = self.error.is_none() && self.waiting >= 2.0 && self.running > 0.0;
        // A queue behind a full KV cache says how many streams the cache
        // held, which depends on their prompts and on the prefixes they
        // share, not how many the engine runs: on a KV-bound fleet with
        // shared prefixes a cap learned there (26 to 41 of 256 slots) held
        // requests in the gateway's queue that the engines could start at
        // once, and moved them off their prefix holders.
        // So is a queue on an engine that preempted since the previous
        // scrape (it preempts only for KV room, and the preempted sequences
        // wait again), whatever its cache reads at this instant.
        let preempted = matches!(
            (self.preemptions, previous.and_then(|p| p.preemptions)),
            (Some(now), Some(then)) if now > then
        );
        // And a batch limit is the most the engine ever runs: a queue at a
        // running count below one already seen is held by something else,
        // and a cap learned there would keep the engine from ever showing
        // it more.
        let most_before = previous.map_or(0.0, |p| p.most_running);
        self.most_running = if self.error.is_some() {
            most_before
        } else {
            most_before.max(self.running)
        };
        let batch_bound = self.kv_usage.is_none_or(|u| u < KV_FULL_USAGE)
            && !preempted
            && self.running >= most_before;
        // A scrape inside the same engine step as the one before (no token
        // generated since) reads the same state again: it neither extends
        // nor breaks a plateau. A step longer than three scrape intervals (a
        // long prefill at a slow time scale) otherwise showed the arrivals it
        // held up as a queue at a steady running count.
        let stepped = match (
            self.tokens_generated,
            previous.and_then(|p| p.tokens_generated),
        ) {
            (Some(now), Some(then)) => now > then,
            _ => true,
        };
        self.queue_plateau = match previous {
            Some(p) if !stepped && self.error.is_none() => p.queue_plateau,
            Some(p) if queued && batch_bound && p.running == self.running => p.queue_plateau + 1,
            _ => u8::from(queued && batch_bound),
        }
        .min(3);
        let cap_before = previous.map(|p| p.slow_start_cap).filter(|&c| c > 0);
        self.slow_start_cap = if self.error.is_some() {
            cap_before.unwrap_or(0)
        } else {
            crate::admission::tuning::slow_start_cap(cap_before, self.running, ours_at_most, queued)
        };
        let before = previous.and_then(|p| p.saturated_batch);
        // Once confirmed, a larger running count seen later raises it (the
        // first saturation may have been bound by something else).
        self.saturated_batch = if self.error.is_some() {
            before
        } else if self.queue_plateau >= 3 || before.is_some() {
            Some(before.unwrap_or(0.0).max(self.running))
        } else {
            None
        };
        // The engine drops a request from its counts before the gateway sees
        // the end of its answer, so alone it never counts more than ours.
        let foreign_now =
            self.error.is_none() && self.running + self.waiting >= ours_at_most as f64 + 1.0;
        self.foreign_load_at = if foreign_now {
            Some(self.at)
        } else {
            previous.and_then(|p| p.foreign_load_at)
        };
        let count = self.running + self.waiting;
        self.smoothed_requests = match previous {
            // A failed scrape's counts mean nothing (the replica is unknown).
            _ if self.error.is_some() => 0.0,
            Some(p) if p.error.is_none() => {
                // Weighted by the time since the previous scrape, so a late or
                // missed scrape does not change how long a burst counts.
                let dt = self.at.saturating_duration_since(p.at).as_secs_f64();
                let keep = (-dt / LOAD_SMOOTHING.as_secs_f64()).exp();
                keep * p.smoothed_requests + (1.0 - keep) * count
            }
            _ => count,
        };
        self
    }

    /// Whether another source fed the replica within `window` before `now`.
    pub fn foreign_load_within(&self, now: Instant, window: Duration) -> bool {
        self.foreign_load_at
            .is_some_and(|at| now.saturating_duration_since(at) <= window)
    }

    /// Queued requests now: the scraped queue, plus the requests this gateway
    /// sent since the scrape that exceed the batch limit (when one was observed).
    pub fn projected_waiting(&self, own_requests_now: u64) -> f64 {
        let sent_since = own_requests_now.saturating_sub(self.own_requests_at_scrape) as f64;
        match self.batch_limit {
            Some(limit) => self
                .waiting
                .max(self.running + self.waiting + sent_since - limit),
            None => self.waiting,
        }
    }

    /// Usable: the scrape succeeded and is younger than `stale_after`.
    pub fn is_fresh(&self, now: Instant, stale_after: Duration) -> bool {
        self.error.is_none() && now.saturating_duration_since(self.at) <= stale_after
    }

    /// Cache capacity in tokens, when the engine reports its geometry.
    pub fn cache_tokens(&self) -> Option<u64> {
        Some(self.block_size? as u64 * self.num_blocks?)
    }
}

/// Parses a `/metrics` body for `engine`. Gauges with several label sets (one
/// per model name or data-parallel engine) are summed; KV usage takes the max.
pub(crate) fn parse(engine: EngineKind, body: &str, at: Instant) -> Signals {
    let names = MetricNames::for_engine(engine);
    let mut waiting = None::<f64>;
    let mut running = None::<f64>;
    let mut kv: Vec<Option<f64>> = vec![None; names.kv_usage.len()];
    let mut block_size = None;
    let mut num_blocks = None;
    let mut lora: Option<(f64, LoraInfo)> = None;
    let mut hit_rate = None::<f64>;
    let (mut hits, mut queries) = (None::<f64>, None::<f64>);
    let mut preemptions = None::<f64>;
    let mut tokens_generated = None::<f64>;
    for line in lines(body) {
        let Some(first) = line.as_bytes().first() else {
            continue;
        };
        if *first == b'#' {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else {
            continue;
        };
        if name == names.waiting {
            *waiting.get_or_insert(0.0) += value;
        } else if name == names.running {
            *running.get_or_insert(0.0) += value;
        } else if let Some(i) = names.kv_usage.iter().position(|n| *n == name) {
            kv[i] = Some(kv[i].map_or(value, |v: f64| v.max(value)));
        } else if Some(name) == names.cache_config {
            block_size = label(labels, names.block_size_label).and_then(|v| v.parse().ok());
            num_blocks = label(labels, names.num_blocks_label).and_then(|v| v.parse().ok());
        } else if Some(name) == names.lora {
            // One series per adapter-set change; the value is its timestamp: keep the newest.
            if lora.as_ref().is_none_or(|(ts, _)| value >= *ts) {
                lora = Some((value, parse_lora(labels)));
            }
        } else if Some(name) == names.preemptions {
            *preemptions.get_or_insert(0.0) += value;
        } else if Some(name) == names.tokens_generated {
            *tokens_generated.get_or_insert(0.0) += value;
        } else if Some(name) == names.prefix_hit_rate {
            hit_rate = Some(value);
        } else if let Some((h, q)) = names.prefix_counters {
            if name == h {
                *hits.get_or_insert(0.0) += value;
            } else if name == q {
                *queries.get_or_insert(0.0) += value;
            }
        }
    }
    let prefix_hit_rate = hit_rate.or(match (hits, queries) {
        (Some(h), Some(q)) if q > 0.0 => Some((h / q).clamp(0.0, 1.0)),
        _ => None,
    });
    let kv_usage = kv.into_iter().flatten().next();
    match (waiting, running) {
        (Some(waiting), Some(running)) if kv_usage.is_some() || !names.kv_required => Signals {
            at,
            error: None,
            waiting,
            running,
            kv_usage,
            block_size,
            num_blocks,
            lora: lora.map(|(_, l)| l),
            prefix_hit_rate,
            preemptions,
            tokens_generated,
            own_requests_at_scrape: 0,
            batch_limit: None,
            saturated_batch: None,
            slow_start_cap: 0,
            queue_plateau: 0,
            most_running: 0.0,
            foreign_load_at: None,
            smoothed_requests: 0.0,
        },
        _ => Signals::failed(
            at,
            format!(
                "metrics lack {} / {} / {}",
                names.waiting, names.running, names.kv_usage[0]
            ),
        ),
    }
}

fn parse_lora(labels: &str) -> LoraInfo {
    let list = |name| {
        label(labels, name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    LoraInfo {
        max_lora: label(labels, "max_lora")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        running: list("running_lora_adapters"),
        waiting: list("waiting_lora_adapters"),
    }
}

/// Splits `name{labels} value [timestamp]` into its parts (labels without braces).
/// `body.lines()`, with memchr's vectorised search for the line ends:
/// `str::lines` searched them with the scalar `CharSearcher`, 40% of a
/// scrape's parse (a scrape every 50 ms).
fn lines(body: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', body.as_bytes())
        .map(|end| (end, true))
        .chain(std::iter::once((body.len(), false)))
        .filter_map(move |(end, newline)| {
            // `start` is 0 or just past a '\n' (a char boundary).
            let line = body.get(start..end)?;
            start = end + 1;
            if newline {
                Some(line.strip_suffix('\r').unwrap_or(line))
            } else {
                // The text after the last '\n': a line unless empty.
                (!line.is_empty()).then_some(line)
            }
        })
}

fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line[open..].rfind('}')? + open;
            (&line[..open], &line[open + 1..close], &line[close + 1..])
        }
        None => {
            let sp = line.find(' ')?;
            (&line[..sp], "", &line[sp..])
        }
    };
    let value = rest.split_ascii_whitespace().next()?.parse().ok()?;
    Some((name.trim(), labels, value))
}

/// The value of label `name` in `a="x",b="y"` (no escapes expected in the series we read).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    if name.is_empty() {
        return None;
    }
    let mut rest = labels;
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().trim_start_matches(',').trim();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let end = after.find('"')?;
        if key == name {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_those_of_str_lines() {
        for body in [
            "",
            "\n",
            "a",
            "a\n",
            "a\nb",
            "a\r\nb\r\n",
            "\n\na\n\n",
            "# HELP x\nx{a=\"1\"} 2.0\r\n\ny 3",
            "ü\nß\r\n€",
            "a\r",
        ] {
            let want: Vec<&str> = body.lines().collect();
            let got: Vec<&str> = lines(body).collect();
            assert_eq!(got, want, "{body:?}");
        }
    }

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{reason="x"} 99
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.1
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="2048"} 1.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a1,a2",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters="old"} 1.6e9
"#;

    #[test]
    fn parses_vllm_series_only() {
        let s = parse(EngineKind::Vllm, VLLM, Instant::now());
        assert_eq!(s.error, None);
        assert_eq!((s.running, s.waiting), (4.0, 2.0));
        assert_eq!(s.kv_usage, Some(0.42));
        assert_eq!((s.block_size, s.num_blocks), (Some(16), Some(2048)));
        assert_eq!(s.cache_tokens(), Some(32768));
        let l = s.lora.unwrap();
        assert_eq!(l.running, vec!["a1", "a2"]);
        assert!(l.is_resident("a2") && !l.is_resident("old") && !l.has_room());
        assert_eq!(s.prefix_hit_rate, None, "no prefix counters in this body");
        let with_cache = format!(
            "{VLLM}vllm:prefix_cache_queries_total{{model_name=\"m\"}} 400\nvllm:prefix_cache_hits_total{{model_name=\"m\"}} 100\n"
        );
        let s = parse(EngineKind::Vllm, &with_cache, Instant::now());
        assert_eq!(s.prefix_hit_rate, Some(0.25));
    }

    #[test]
    fn missing_series_is_a_failed_scrape_not_zero_load() {
        let s = parse(
            EngineKind::Vllm,
            "vllm:num_requests_running 0\n",
            Instant::now(),
        );
        assert!(s.error.is_some());
        assert!(!s.is_fresh(Instant::now(), Duration::from_secs(5)));
        // A vLLM body read as SGLang finds nothing either.
        assert!(parse(EngineKind::Sglang, VLLM, Instant::now())
            .error
            .is_some());
    }

    #[test]
    fn parses_sglang_and_llamacpp() {
        let sg = "sglang:num_queue_reqs{model_name=\"m\"} 5\nsglang:num_running_reqs{model_name=\"m\"} 7\nsglang:token_usage{model_name=\"m\"} 0.5\nsglang:cache_config_info{page_size=\"1\",num_pages=\"9000\"} 1\nsglang:cache_hit_rate{model_name=\"m\"} 0.75\n";
        let s = parse(EngineKind::Sglang, sg, Instant::now());
        assert_eq!((s.waiting, s.running, s.kv_usage), (5.0, 7.0, Some(0.5)));
        assert_eq!(s.prefix_hit_rate, Some(0.75));
        assert_eq!(s.cache_tokens(), Some(9000));
        let ll = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n";
        let s = parse(EngineKind::LlamaCpp, ll, Instant::now());
        assert_eq!((s.waiting, s.running, s.kv_usage), (1.0, 2.0, None));
        assert!(s.error.is_none());
    }

    #[test]
    fn batch_limit_is_learned_and_projects_the_queue() {
        let t = Instant::now();
        let body = |run: u32, wait: u32| {
            format!("llamacpp:requests_processing {run}\nllamacpp:requests_deferred {wait}\n")
        };
        let s1 = parse(EngineKind::LlamaCpp, &body(3, 0), t).with_context(3, 3, None);
        assert_eq!(s1.batch_limit, None);
        assert_eq!(
            s1.projected_waiting(10),
            0.0,
            "no limit known: no projection"
        );
        let s2 = parse(EngineKind::LlamaCpp, &body(4, 2), t).with_context(6, 6, Some(&s1));
        assert_eq!(s2.batch_limit, Some(4.0));
        assert_eq!(s2.saturated_batch, None, "one scrape with a queue");
        assert_eq!(s2.projected_waiting(6), 2.0);
        // Five more sent since the scrape: all of them queue.
        assert_eq!(s2.projected_waiting(11), 7.0);
        // The limit is kept by later scrapes without a queue.
        let s3 = parse(EngineKind::LlamaCpp, &body(1, 0), t).with_context(1, 1, Some(&s2));
        assert_eq!(s3.batch_limit, Some(4.0));
        // Admission's limit needs a queue of 2 on three scrapes at the same running.
        let s4 = parse(EngineKind::LlamaCpp, &body(4, 1), t).with_context(5, 5, Some(&s3));
        let s5 = parse(EngineKind::LlamaCpp, &body(4, 3), t).with_context(7, 7, Some(&s4));
        let s6 = parse(EngineKind::LlamaCpp, &body(4, 2), t).with_context(6, 6, Some(&s5));
        assert_eq!((s4.saturated_batch, s6.saturated_batch), (None, None));
        let s7 = parse(EngineKind::LlamaCpp, &body(4, 2), t).with_context(6, 6, Some(&s6));
        assert_eq!(s7.saturated_batch, Some(4.0));
        let s8 = parse(EngineKind::LlamaCpp, &body(2, 0), t).with_context(2, 2, Some(&s7));
        assert_eq!(s8.saturated_batch, Some(4.0), "kept");
        let s9 = parse(EngineKind::LlamaCpp, &body(6, 0), t).with_context(6, 6, Some(&s8));
        assert_eq!(
            s9.saturated_batch,
            Some(6.0),
            "raised by a larger batch seen later"
        );
        assert_eq!(s3.projected_waiting(2), 0.0);
        assert_eq!(s3.projected_waiting(6), 2.0);
    }

    #[test]
    fn a_queue_behind_a_full_kv_cache_is_not_learned_as_the_batch() {
        let t = Instant::now();
        let body = |run: u32, wait: u32, usage: f64| {
            format!("vllm:num_requests_running {run}\nvllm:num_requests_waiting {wait}\nvllm:kv_cache_usage_perc {usage}\n")
        };
        let plateau = |usage: f64| {
            let mut s = parse(EngineKind::Vllm, &body(30, 2, usage), t).with_context(32, 32, None);
            for _ in 0..4 {
                s = parse(EngineKind::Vllm, &body(30, 2, usage), t).with_context(32, 32, Some(&s));
            }
            s
        };
        assert_eq!(plateau(0.97).saturated_batch, None, "the cache held it");
        assert_eq!(plateau(KV_FULL_USAGE).saturated_batch, None);
        assert_eq!(
            plateau(0.5).saturated_batch,
            Some(30.0),
            "the batch held it"
        );
        // One full-cache scrape breaks a plateau: three in a row are needed.
        let s = parse(EngineKind::Vllm, &body(30, 2, 0.5), t).with_context(32, 32, None);
        let s = parse(EngineKind::Vllm, &body(30, 2, 0.5), t).with_context(32, 32, Some(&s));
        let s = parse(EngineKind::Vllm, &body(30, 2, 0.95), t).with_context(32, 32, Some(&s));
        let s = parse(EngineKind::Vllm, &body(30, 2, 0.5), t).with_context(32, 32, Some(&s));
        assert_eq!(s.saturated_batch, None);
        // A batch learned below a full cache is kept, and raised, at one.
        let s = plateau(0.5);
        let s = parse(EngineKind::Vllm, &body(34, 2, 0.97), t).with_context(36, 36, Some(&s));
        assert_eq!(s.saturated_batch, Some(34.0));
    }

    /// A vLLM `/metrics` body: `run` running, `wait` waiting, the cache half
    /// full, then `more` lines.
    fn vllm_body(run: u32, wait: u32, more: &str) -> String {
        format!("vllm:num_requests_running {run}\nvllm:num_requests_waiting {wait}\nvllm:kv_cache_usage_perc 0.5\n{more}")
    }

    /// The signals after scraping each of `bodies` in turn (64 of ours in flight).
    fn after_scrapes(bodies: impl IntoIterator<Item = String>) -> Signals {
        let t = Instant::now();
        let mut s: Option<Signals> = None;
        for b in bodies {
            s = Some(parse(EngineKind::Vllm, &b, t).with_context(64, 64, s.as_ref()));
        }
        s.expect("scraped")
    }

    #[test]
    fn a_queue_while_the_engine_preempts_is_not_learned_as_the_batch() {
        // The cache reads half full at each scrape, but the engine preempted
        // between some of them: it ran out of KV room in between.
        let body = |preempted: u32| {
            let more = format!("vllm:num_preemptions_total{{model_name=\"m\"}} {preempted}\n");
            vllm_body(30, 2, &more)
        };
        let scrapes = |counts: &[u32]| after_scrapes(counts.iter().map(|&c| body(c)));
        assert_eq!(scrapes(&[5, 5, 5, 5]).preemptions, Some(5.0));
        assert_eq!(
            scrapes(&[5, 5, 5, 5]).saturated_batch,
            Some(30.0),
            "none since"
        );
        assert_eq!(
            scrapes(&[5, 6, 7, 8, 9]).saturated_batch,
            None,
            "one each interval"
        );
        // One preempting interval breaks a plateau: three quiet ones are needed.
        assert_eq!(scrapes(&[5, 5, 6, 6, 6]).saturated_batch, None);
        assert_eq!(scrapes(&[5, 5, 6, 6, 6, 6]).saturated_batch, Some(30.0));
        // A batch already learned is kept.
        assert_eq!(scrapes(&[5, 5, 5, 6, 7]).saturated_batch, Some(30.0));
    }

    #[test]
    fn a_queue_below_a_running_count_already_seen_is_not_the_batch() {
        let t = Instant::now();
        let scrapes = |counts: &[(u32, u32)]| {
            after_scrapes(counts.iter().map(|&(run, wait)| vllm_body(run, wait, "")))
        };
        // The engine ran 40 at once, so a queue while it runs 20 is held by
        // something other than its batch.
        let s = scrapes(&[(40, 0), (20, 3), (20, 3), (20, 3), (20, 3)]);
        assert_eq!((s.saturated_batch, s.most_running), (None, 40.0));
        // At the most it ever ran, the queue is the batch's.
        let s = scrapes(&[(40, 0), (20, 3), (40, 3), (40, 3), (40, 3)]);
        assert_eq!(s.saturated_batch, Some(40.0));
        // A failed scrape neither raises nor forgets it.
        let s = scrapes(&[(40, 0), (20, 3)]);
        let failed = Signals::failed(t, "down").with_context(64, 64, Some(&s));
        assert_eq!(failed.most_running, 40.0);
    }

    #[test]
    fn scrapes_inside_one_engine_step_count_once() {
        let body = |tokens: u32| {
            let more = format!(
                "vllm:prompt_tokens_total{{model_name=\"m\"}} 7\nvllm:generation_tokens_total{{model_name=\"m\"}} {tokens}\n"
            );
            vllm_body(20, 3, &more)
        };
        let scrapes = |counts: &[u32]| after_scrapes(counts.iter().map(|&c| body(c)));
        assert_eq!(scrapes(&[100]).tokens_generated, Some(100.0));
        // One long step read four times: the arrivals it holds up are not a
        // batch limit.
        let s = scrapes(&[100, 100, 100, 100, 100]);
        assert_eq!((s.queue_plateau, s.saturated_batch), (1, None));
        // Steps ending between scrapes: the queue persists across them.
        assert_eq!(scrapes(&[100, 200, 300]).saturated_batch, Some(20.0));
        // A repeated read neither extends nor breaks the count.
        assert_eq!(scrapes(&[100, 200, 200, 300]).saturated_batch, Some(20.0));
        assert_eq!(scrapes(&[100, 100, 200]).saturated_batch, None);
    }

    #[test]
    fn engine_counting_more_than_we_sent_means_another_gateway() {
        let t = Instant::now();
        let body = |run: u32, wait: u32| {
            format!("llamacpp:requests_processing {run}\nllamacpp:requests_deferred {wait}\n")
        };
        let window = Duration::from_secs(30);
        // Alone: the engine counts what we sent, or less (answers finishing).
        let s1 = parse(EngineKind::LlamaCpp, &body(3, 1), t).with_context(4, 4, None);
        let s1 = parse(EngineKind::LlamaCpp, &body(2, 0), t).with_context(3, 3, Some(&s1));
        assert!(!s1.foreign_load_within(t, window));
        // One of ours started and finished while the scrape was on its way.
        let s1 = parse(EngineKind::LlamaCpp, &body(4, 0), t).with_context(3, 4, Some(&s1));
        assert!(!s1.foreign_load_within(t, window));
        // One more than ours: someone else's.
        let s2 = parse(EngineKind::LlamaCpp, &body(3, 1), t).with_context(3, 3, Some(&s1));
        assert!(s2.foreign_load_within(t, window));
        // Remembered over later scrapes for the window.
        let later = t + Duration::from_secs(10);
        let s3 = parse(EngineKind::LlamaCpp, &body(0, 0), later).with_context(0, 0, Some(&s2));
        assert!(s3.foreign_load_within(later, window));
        assert!(!s3.foreign_load_within(t + Duration::from_secs(31), window));
        // A failed scrape is not a sign.
        let f = Signals::failed(t, "down").with_context(0, 0, None);
        assert!(!f.foreign_load_within(t, window));
    }

    #[test]
    fn smoothed_requests_follow_sustained_load_not_one_scrape() {
        let t = Instant::now();
        let body = |run: u32| {
            format!("llamacpp:requests_processing {run}\nllamacpp:requests_deferred 0\n")
        };
        let ms = |n: u64| t + Duration::from_millis(n);
        // Idle for a second of 20 ms scrapes, then one scrape catches a pair of
        // requests (which may have finished by the time routing reads it).
        let mut s = parse(EngineKind::LlamaCpp, &body(0), t).with_context(0, 0, None);
        for i in 1..=50 {
            s = parse(EngineKind::LlamaCpp, &body(0), ms(20 * i)).with_context(0, 0, Some(&s));
        }
        let spike = parse(EngineKind::LlamaCpp, &body(2), ms(1020)).with_context(0, 0, Some(&s));
        assert_eq!(spike.running, 2.0);
        assert!(spike.smoothed_requests < 0.1, "{}", spike.smoothed_requests);
        // Load that lasts: the average follows it within about a second.
        let mut s = spike;
        for i in 1..=75 {
            s = parse(EngineKind::LlamaCpp, &body(8), ms(1020 + 20 * i)).with_context(
                0,
                0,
                Some(&s),
            );
        }
        assert!(s.smoothed_requests > 7.5, "{}", s.smoothed_requests);
        // One late scrape weighs by the time it covers, not as one sample.
        let late = parse(EngineKind::LlamaCpp, &body(0), ms(5020)).with_context(0, 0, Some(&s));
        assert!(late.smoothed_requests < 0.1, "{}", late.smoothed_requests);
        // After a failed scrape (replica unknown) the average starts over.
        let f = Signals::failed(ms(5040), "down").with_context(0, 0, Some(&s));
        assert_eq!(f.smoothed_requests, 0.0);
        let back = parse(EngineKind::LlamaCpp, &body(3), ms(5060)).with_context(0, 0, Some(&f));
        assert_eq!(back.smoothed_requests, 3.0);
    }

    #[test]
    fn staleness() {
        let t0 = Instant::now();
        let s = parse(
            EngineKind::LlamaCpp,
            "llamacpp:requests_processing 0\nllamacpp:requests_deferred 0\n",
            t0,
        );
        assert!(s.is_fresh(t0, Duration::from_millis(100)));
        assert!(!s.is_fresh(t0 + Duration::from_millis(101), Duration::from_millis(100)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Lines that look like exposition lines of any engine, mixed with junk.
        fn line() -> impl Strategy<Value = String> {
            let name = prop_oneof![
                Just("vllm:num_requests_running"),
                Just("vllm:num_requests_waiting"),
                Just("vllm:kv_cache_usage_perc"),
                Just("vllm:cache_config_info"),
                Just("vllm:lora_requests_info"),
                Just("sglang:num_running_reqs"),
                Just("sglang:num_queue_reqs"),
                Just("sglang:token_usage"),
                Just("llamacpp:requests_processing"),
                Just("llamacpp:kv_cache_usage_ratio"),
            ];
            prop_oneof![
                (name.clone(), "\\PC{0,40}", "\\PC{0,12}")
                    .prop_map(|(n, labels, v)| format!("{n}{{{labels}}} {v}")),
                (name, any::<f64>()).prop_map(|(n, v)| format!("{n} {v}")),
                "\\PC{0,60}",
                Just("# HELP x y".to_string()),
            ]
        }

        proptest! {
            /// Any body: signals (maybe empty), never a panic, for every engine.
            #[test]
            fn any_metrics_body_parses(lines in prop::collection::vec(line(), 0..20)) {
                let body = lines.join("\n");
                for engine in [EngineKind::Vllm, EngineKind::Sglang, EngineKind::LlamaCpp] {
                    let _ = parse(engine, &body, Instant::now());
                }
            }

            #[test]
            fn any_bytes_as_text_parse(raw in prop::collection::vec(any::<u8>(), 0..400)) {
                let body = String::from_utf8_lossy(&raw);
                for engine in [EngineKind::Vllm, EngineKind::Sglang, EngineKind::LlamaCpp] {
                    let _ = parse(engine, &body, Instant::now());
                }
            }
        }
    }
}
