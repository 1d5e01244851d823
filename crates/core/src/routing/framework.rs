//! The plugin interface of the inference-aware policy: a [`Filter`] narrows
//! the set of candidate replicas, a [`Scorer`] rates each remaining one. Both
//! see one [`Candidate`] per replica (built by `aware.rs`) and the request's
//! [`Ctx`]. Plugins live one per file under `filters/` and `scorers/` and are
//! registered by name in `registry.rs`; `pipeline.rs` runs them.

use std::fmt;

use super::policy_config::{RendezvousConfig, SaturationConfig, StickyConfig};
use super::RouteRequest;

/// One replica as the policy sees it for one request.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    /// Index into the replica slice.
    pub idx: usize,
    pub matched_blocks: u32,
    /// `matched_blocks` came from the replica's own KV events (else from
    /// the approximate index).
    pub precise: bool,
    pub uncached_tokens: u32,
    /// Signals fresh (or scraping disabled).
    pub fresh: bool,
    pub saturated: bool,
    pub waiting: f64,
    pub running: f64,
    pub kv_usage: f64,
    /// max(own requests in flight, engine running + waiting).
    pub load_requests: f64,
    /// The load that places prefix groups (`rendezvous`): own requests in
    /// flight; once another gateway feeds the replica, the larger of those and
    /// the engine's count averaged over scrapes (`Signals::smoothed_requests`).
    pub placement_load: f64,
    /// Own estimated tokens in flight.
    pub token_load: f64,
    /// The fraction of its KV cache the replica's engine evicts per second
    /// (from the precise index); `None` unknown.
    pub cache_turnover: Option<f64>,
    /// Tokens the replica's KV cache has free (its blocks less those its
    /// engine reported holding, from the precise index); `None` unknown.
    pub free_tokens: Option<u64>,
    pub queued_prefill: f64,
    pub est_ttft_ms: f64,
    /// LoRA: 3 adapter in use on the engine (running or waiting requests), 2
    /// this gateway sent it there recently (vLLM reports idle resident adapters
    /// nowhere), 1 room to load it, 0 none.
    pub lora_tier: u8,
    /// Rendezvous weight of this replica for the request's prefix group.
    pub rendezvous: u64,
    /// Prefix groups this gateway has placed on the replica and still indexes
    /// (filled only for a request opening a new group).
    pub groups: u32,
    /// The replica's weight in placing new groups (1 for every replica unless
    /// caches evict: then the inverse of its cache's turnover); its share of
    /// the group bound is this over the alive candidates' sum.
    pub group_weight: f64,
    /// Another gateway fed this replica recently (`Signals::foreign_load_at`).
    pub foreign_load: bool,
    pub alive: bool,
    /// The config name of the filter that dropped it.
    pub dropped_by: Option<&'static str>,
    pub score: f64,
}

/// Per-request context shared by filters and scorers.
#[derive(Debug)]
pub(super) struct Ctx<'a> {
    pub req: &'a RouteRequest<'a>,
    pub saturation: &'a SaturationConfig,
    pub sticky: &'a StickyConfig,
    pub rendezvous: &'a RendezvousConfig,
    pub block_size: u32,
    pub prefill_rate: f64,
    pub prompt_blocks: u32,
    /// Hash naming the prompt's prefix group (its first `rendezvous.blocks` blocks).
    pub group_key: Option<u64>,
    /// The adapter asked for: `req.lora`, or the model name when a replica
    /// reports it as a resident or loading adapter.
    pub lora: Option<&'a str>,
    pub explain: bool,
}

/// What one filter did to the candidate set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Narrowing {
    pub dropped: u32,
    /// It would have dropped every candidate, so it dropped none.
    pub fail_open: bool,
}

/// Narrows the candidates: drops the alive ones it rules out by clearing
/// their `alive` (the pipeline records which filter did). It must fail open:
/// keep them all rather than drop every one, so no filter can make a request
/// unroutable.
pub(super) trait Filter: Send + Sync + fmt::Debug {
    /// `detail` takes what the filter weighed, as numbers (see [`Detail`]).
    fn filter(&self, cands: &mut [Candidate], ctx: &Ctx<'_>, detail: &mut Detail) -> Narrowing;
}

/// What a filter weighed, kept as numbers: its one-line explanation is
/// printed only when something reads the decision (`/routing/explain`, the
/// status page), not on every request. Formatting it on every decision was
/// about 4% of a small request's instructions and two heap allocations.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(super) enum Detail {
    #[default]
    None,
    /// `prefix_affinity`: the best prefix, the two TTFTs and the margin
    /// between them that decided whether the request stays with the prefix.
    Sticky {
        best_blocks: u32,
        sticky_ttft_ms: f64,
        cold_ttft_ms: f64,
        margin_ms: f64,
        evicts: bool,
        stick: bool,
    },
    /// `rendezvous`: every replica was above the load bound (failed open).
    AboveBound { bound: f64 },
    /// `rendezvous`: a new prefix group placed within both bounds.
    NewGroup {
        bound: f64,
        group_cap: f64,
        shared: bool,
    },
    /// `rendezvous`: the group's holders were dropped; the next by weight.
    NextHome { bound: f64 },
}

impl Detail {
    pub(super) fn is_none(&self) -> bool {
        matches!(self, Detail::None)
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Detail::None => Ok(()),
            Detail::Sticky {
                best_blocks,
                sticky_ttft_ms,
                cold_ttft_ms,
                margin_ms,
                evicts,
                stick,
            } => write!(
                f,
                "best prefix {best_blocks} blocks; sticky est TTFT {} ms vs colder {} ms, margin {} ms{}{}",
                Fixed(sticky_ttft_ms, 1),
                Fixed(cold_ttft_ms, 1),
                Fixed(margin_ms, 1),
                if evicts { " (the copy would evict)" } else { "" },
                if stick { ": stay" } else { ": leave (spill)" },
            ),
            Detail::AboveBound { bound } => {
                write!(f, "every replica above load bound {}", Fixed(bound, 2))
            }
            Detail::NewGroup {
                bound,
                group_cap,
                shared,
            } => write!(
                f,
                "new prefix group: placed by rendezvous hash within load bound {} and {group_cap} groups ({})",
                Fixed(bound, 2),
                if shared { "other gateways seen: slack" } else { "alone: exact balance" }
            ),
            Detail::NextHome { bound } => write!(
                f,
                "prefix holders unavailable: next by rendezvous hash within load bound {}",
                Fixed(bound, 2)
            ),
        }
    }
}

/// Serialised as its text (`/routing/explain`'s `detail` string).
impl serde::Serialize for Detail {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Rates the candidates the filters kept, each in [0, 1] (1 = best); the
/// policy adds the scores with their configured weights.
pub(super) trait Scorer: Send + Sync + fmt::Debug {
    /// A value taken over the alive candidates once, before any is scored,
    /// for scores relative to the field (such as the lowest cost among them).
    fn reference(&self, _cands: &[Candidate]) -> f64 {
        0.0
    }

    /// Candidate `c`'s score, given [`reference`](Self::reference)'s value.
    fn score(&self, c: &Candidate, reference: f64, ctx: &Ctx<'_>) -> f64;

    /// Adds `weight` times each alive candidate's score to its total. The
    /// pipeline makes this one call per scorer and decision, so the calls per
    /// candidate inside it are static (inlined), not virtual.
    fn add_weighted(&self, cands: &mut [Candidate], weight: f64, ctx: &Ctx<'_>) {
        let reference = self.reference(cands);
        for c in cands.iter_mut().filter(|c| c.alive) {
            c.score += weight * self.score(c, reference, ctx);
        }
    }
}

/// `value` with `decimals` (at most 6) digits after the point, as `{:.N}`
/// prints it, by integer arithmetic. The explanation of every routing
/// decision prints a few such numbers, and std's exact float formatting
/// (a bignum fallback) was half of the decision's cost. Values out of
/// range and non-finite ones are printed by std; a tie rounds away from
/// zero (std: to even), which an explanation does not mind.
pub(crate) struct Fixed(pub f64, pub u8);

impl Fixed {
    /// The text into `buf`, or `None` when std must print it (out of range).
    /// Non-finite values print as std does (`inf`, `-inf`, `NaN`) without its
    /// float machinery: a colder replica that does not exist has an infinite
    /// TTFT in every single-replica decision.
    fn render(&self, buf: &mut [u8; 32]) -> Option<usize> {
        let (v, d) = (self.0, u32::from(self.1.min(6)));
        if v.is_nan() {
            buf[..3].copy_from_slice(b"NaN");
            return Some(3);
        }
        if v.is_infinite() {
            let t: &[u8] = if v > 0.0 { b"inf" } else { b"-inf" };
            buf[..t.len()].copy_from_slice(t);
            return Some(t.len());
        }
        if v.abs() >= 1e12 {
            return None;
        }
        let scale = 10u64.pow(d);
        let mut scaled = (v.abs() * scale as f64).round() as u64;
        // Digits from the right: the fraction's `d`, the point, the integer's.
        let mut tmp = [0u8; 32];
        let mut at = tmp.len();
        let mut put = |b: u8, at: &mut usize| {
            *at -= 1;
            tmp[*at] = b;
        };
        let negative = v.is_sign_negative();
        for _ in 0..d {
            put(b'0' + (scaled % 10) as u8, &mut at);
            scaled /= 10;
        }
        if d > 0 {
            put(b'.', &mut at);
        }
        loop {
            put(b'0' + (scaled % 10) as u8, &mut at);
            scaled /= 10;
            if scaled == 0 {
                break;
            }
        }
        if negative {
            put(b'-', &mut at);
        }
        let n = tmp.len() - at;
        buf[..n].copy_from_slice(&tmp[at..]);
        Some(n)
    }
}

impl std::fmt::Display for Fixed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 32];
        match self.render(&mut buf) {
            Some(n) => f.write_str(std::str::from_utf8(&buf[..n]).unwrap_or("?")),
            None => write!(f, "{:.*}", usize::from(self.1.min(6)), self.0),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::routing::RoutingConfig;

    /// A neutral candidate for filter/scorer unit tests.
    pub(crate) fn cand(idx: usize) -> Candidate {
        Candidate {
            idx,
            matched_blocks: 0,
            precise: false,
            uncached_tokens: 0,
            fresh: true,
            saturated: false,
            waiting: 0.0,
            running: 0.0,
            kv_usage: 0.0,
            load_requests: 0.0,
            placement_load: 0.0,
            token_load: 0.0,
            cache_turnover: None,
            free_tokens: None,
            queued_prefill: 0.0,
            est_ttft_ms: 0.0,
            lora_tier: 0,
            rendezvous: 0,
            groups: 0,
            group_weight: 1.0,
            foreign_load: false,
            alive: true,
            dropped_by: None,
            score: 0.0,
        }
    }

    pub(crate) fn ctx_for<'a>(
        cfg: &'a RoutingConfig,
        lora: Option<&'a str>,
        prompt_tokens: u32,
    ) -> Ctx<'a> {
        let req = Box::leak(Box::new(RouteRequest {
            request_id: "t",
            model: "m",
            prompt_text: "",
            prompt_tokens,
            max_tokens: 10,
            lora,
            hashes: Default::default(),
        }));
        Ctx {
            req,
            saturation: &cfg.saturation,
            sticky: &cfg.sticky,
            rendezvous: &cfg.rendezvous,
            block_size: 16,
            prefill_rate: 16_000.0,
            prompt_blocks: prompt_tokens / 16,
            group_key: Some(1),
            lora,
            explain: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Detail, Fixed};

    /// The details print as the filters wrote them when they were strings
    /// built on every decision (the texts `/routing/explain` showed).
    #[test]
    fn details_print_the_explanations_of_before() {
        let sticky = Detail::Sticky {
            best_blocks: 50,
            sticky_ttft_ms: 113.5,
            cold_ttft_ms: 62.5,
            margin_ms: 50.0,
            evicts: true,
            stick: false,
        };
        assert_eq!(
            sticky.to_string(),
            "best prefix 50 blocks; sticky est TTFT 113.5 ms vs colder 62.5 ms, \
             margin 50.0 ms (the copy would evict): leave (spill)"
        );
        let stay = Detail::Sticky {
            best_blocks: 3,
            sticky_ttft_ms: 1.25,
            cold_ttft_ms: f64::INFINITY,
            margin_ms: 0.0,
            evicts: false,
            stick: true,
        };
        assert_eq!(
            stay.to_string(),
            "best prefix 3 blocks; sticky est TTFT 1.3 ms vs colder inf ms, margin 0.0 ms: stay"
        );
        assert_eq!(
            Detail::AboveBound { bound: 2.5 }.to_string(),
            "every replica above load bound 2.50"
        );
        assert_eq!(
            Detail::NewGroup {
                bound: 1.0,
                group_cap: 3.0,
                shared: false
            }
            .to_string(),
            "new prefix group: placed by rendezvous hash within load bound 1.00 and 3 groups \
             (alone: exact balance)"
        );
        assert_eq!(
            Detail::NewGroup {
                bound: 4.125,
                group_cap: 2.0,
                shared: true
            }
            .to_string(),
            "new prefix group: placed by rendezvous hash within load bound 4.13 and 2 groups \
             (other gateways seen: slack)"
        );
        assert_eq!(
            Detail::NextHome { bound: 7.0 }.to_string(),
            "prefix holders unavailable: next by rendezvous hash within load bound 7.00"
        );
        assert_eq!(Detail::None.to_string(), "");
        assert_eq!(
            serde_json::to_value(Detail::NextHome { bound: 7.0 }).unwrap(),
            serde_json::json!(
                "prefix holders unavailable: next by rendezvous hash within load bound 7.00"
            )
        );
    }

    #[test]
    fn fixed_prints_as_std_does() {
        for v in [
            0.0,
            1.0,
            12.3456,
            62.5001,
            0.04,
            1234.5678,
            -3.21,
            99.96,
            1e13,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.04,
            999_999_999_999.0,
        ] {
            for d in [0u8, 1, 2, 3] {
                assert_eq!(
                    Fixed(v, d).to_string(),
                    format!("{:.*}", d as usize, v),
                    "{v} with {d} decimals"
                );
            }
        }
        assert_eq!(Fixed(f64::NAN, 1).to_string(), "NaN");
    }
}
