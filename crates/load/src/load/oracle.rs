//! The oracle hit rate of a run: what the fleet's prefix caches would have
//! served had every request been placed ideally.
//!
//! Definition: the fleet's KV blocks (`--oracle-blocks`, replicas x blocks
//! each) pooled into one LRU prefix cache, fed the run's requests in the
//! order they were numbered (sent). A request hits its longest run of cached
//! leading blocks (at most `(prompt tokens - 1) / block size`, as vLLM and the
//! simulator count: the last token is always computed); hits and queries are
//! counted in tokens like `vllm:prefix_cache_hits/queries`. Then its prompt
//! blocks are touched last to first (so the shared leading blocks are evicted
//! last, as vLLM frees them). So no prefix is ever held twice and none is
//! ever missed where it is held: an upper bound for LRU caches under any
//! placement, ignoring load (a hot prefix that needs several replicas costs
//! real fleets copies), pinned blocks of running requests and output blocks.
//! Block hashes are the simulator's (`tokenizer::block_hashes` of the prompt
//! rendered by `prompt::render_chat`, seeded by the model name).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use infergate_protocol::prompt::{render_chat, render_completion_prompt, ChatMessage};
use infergate_protocol::tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

/// A pooled LRU of block hashes.
pub struct Oracle {
    cache: Lru,
    block_size: usize,
    hits: u64,
    queries: u64,
    requests: u64,
}

/// One LRU cache of block hashes, touched in the order vLLM frees blocks.
pub(super) struct Lru {
    capacity: usize,
    /// Hash -> tick of its last use.
    last_use: HashMap<u64, u64>,
    /// Tick -> hash, oldest first.
    by_age: BTreeMap<u64, u64>,
    tick: u64,
    /// Blocks evicted so far.
    pub(super) evicted: u64,
}

impl Lru {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            last_use: HashMap::new(),
            by_age: BTreeMap::new(),
            tick: 0,
            evicted: 0,
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Leading blocks of `p` held (at most the ones the engine may hit).
    pub(super) fn matched(&self, p: &Prompt) -> usize {
        p.hashes
            .iter()
            .take(p.max_hit)
            .take_while(|h| self.last_use.contains_key(h))
            .count()
    }

    /// Uses `p`'s blocks last to first, so its shared leading blocks are evicted last.
    pub(super) fn store(&mut self, p: &Prompt) {
        for h in p.hashes.iter().rev() {
            self.touch(*h);
        }
    }

    fn touch(&mut self, h: u64) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(h, self.tick) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.tick, h);
        while self.last_use.len() > self.capacity {
            match self.by_age.pop_first() {
                Some((_, gone)) => {
                    self.last_use.remove(&gone);
                    self.evicted += 1;
                }
                None => break,
            }
        }
    }
}

/// A request's prompt as the simulator's cache sees it.
pub(super) struct Prompt {
    pub(super) tokens: u64,
    pub(super) hashes: Vec<u64>,
    /// `(tokens - 1) / block size`: the last token is always computed.
    pub(super) max_hit: usize,
}

impl Prompt {
    /// The prompt of a chat or completions body; `None` for anything else.
    pub(super) fn of(body: &Bytes, block_size: usize) -> Option<Self> {
        let b = serde_json::from_slice::<Body>(body).ok()?;
        let text = match (&b.messages, &b.prompt) {
            (Some(m), _) => render_chat(m),
            (None, Some(p)) => render_completion_prompt(p),
            _ => return None,
        };
        let tokens = u64::from(tokenizer::count_tokens(&text));
        let hashes = tokenizer::block_hashes(
            &text,
            block_size,
            tokenizer::model_seed(&b.model),
            usize::MAX,
        );
        let max_hit = (tokens.saturating_sub(1) / block_size as u64) as usize;
        Some(Self {
            tokens,
            hashes,
            max_hit,
        })
    }
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    prompt: Option<Value>,
}

impl Oracle {
    pub fn new(capacity_blocks: usize, block_size: usize) -> Self {
        Self {
            cache: Lru::new(capacity_blocks),
            block_size: block_size.max(1),
            hits: 0,
            queries: 0,
            requests: 0,
        }
    }

    /// Feeds one prompt (a request body's, [`Prompt::of`]), parsed at this
    /// oracle's block size.
    pub(super) fn add(&mut self, p: &Prompt) {
        self.hits += (self.cache.matched(p) * self.block_size) as u64;
        self.queries += p.tokens;
        self.requests += 1;
        self.cache.store(p);
    }

    pub(super) fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn hit_rate(&self) -> Option<f64> {
        (self.queries > 0).then(|| self.hits as f64 / self.queries as f64)
    }

    /// The report's `oracle` object.
    pub fn report(&self) -> Value {
        json!({
            "hit_rate": self.hit_rate(),
            "requests": self.requests,
            "capacity_blocks": self.cache.capacity(),
            "block_size": self.block_size,
            "definition": "fleet KV blocks pooled into one LRU prefix cache, requests in send order",
        })
    }
}

/// The prompt of a chat body with a system and a user message, in blocks
/// of 16 tokens, for tests.
#[cfg(test)]
pub(super) fn chat(system: &str, user: &str) -> Prompt {
    let body = Bytes::from(
        json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ]})
        .to_string(),
    );
    Prompt::of(&body, 16).expect("a chat body has a prompt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_leading_cached_blocks_like_the_engine_and_evicts_lru() {
        let sys = "s".repeat(64 * 10);
        // 10 system blocks + rendering and question: the second request with
        // the same system prompt hits its leading blocks.
        let mut o = Oracle::new(1_000, 16);
        o.add(&chat(&sys, "first question"));
        assert_eq!(o.hit_rate(), Some(0.0));
        o.add(&chat(&sys, "second question"));
        let text = render_chat(
            &serde_json::from_value::<Vec<ChatMessage>>(json!([
                {"role": "system", "content": sys},
                {"role": "user", "content": "second question"}
            ]))
            .unwrap(),
        );
        let tokens = u64::from(tokenizer::count_tokens(&text));
        // "<|system|>\n" + 640 s: the 10 leading 64-char blocks are shared.
        assert_eq!(o.hits, 10 * 16);
        assert_eq!(o.queries, 2 * tokens);
        // A cache of 12 blocks: a prompt of other text evicts the first
        // one's blocks tail first, so its 2 leading blocks are left.
        let other = "t".repeat(64 * 10);
        let mut small = Oracle::new(12, 16);
        small.add(&chat(&sys, "q"));
        small.add(&chat(&other, "q"));
        small.add(&chat(&sys, "q"));
        assert_eq!(small.hits, 2 * 16, "leading blocks evicted last");
        let mut tiny = Oracle::new(10, 16);
        tiny.add(&chat(&sys, "q"));
        tiny.add(&chat(&other, "q"));
        tiny.add(&chat(&sys, "q"));
        assert_eq!(tiny.hits, 0, "all evicted");
        assert_eq!(small.requests, 3);
        // Bodies that are not requests have no prompt (and are skipped).
        assert!(Prompt::of(&Bytes::from_static(b"not json"), 16).is_none());
        assert!(Prompt::of(&Bytes::from_static(b"{\"model\": \"m\"}"), 16).is_none());
    }
}
