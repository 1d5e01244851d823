//! Reads token usage from a response as it streams by, without buffering it:
//! SSE streams are scanned line by line (`data:` events counted, a `usage`
//! object parsed when present); a JSON body is searched for its `usage` object.
//!
//! Every API's usage shape is read: OpenAI's `prompt_tokens` /
//! `completion_tokens`, the Responses API's and Anthropic's `input_tokens` /
//! `output_tokens` (the Responses stream reports it in `response.completed`;
//! Anthropic's in `message_start`, input, then `message_delta`, output so
//! far: the counts are merged), and rerank's `total_tokens` alone. Prompt
//! tokens served from the engine's prefix cache come from OpenAI's
//! `prompt_tokens_details.cached_tokens` (`input_tokens_details` in the
//! Responses API) or Anthropic's `cache_read_input_tokens`.

use std::sync::LazyLock;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of the prompt tokens, those read from the prefix cache.
    pub cached_tokens: u64,
}

/// A `usage` object as sent: any of the fields may be missing.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<TokenDetails>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct TokenDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl RawUsage {
    /// This report over `previous` (a later report of a field wins).
    fn over(self, previous: Option<Usage>) -> Usage {
        let prev = previous.unwrap_or_default();
        let completion = self.completion_tokens.unwrap_or(prev.completion_tokens);
        let prompt = self
            .prompt_tokens
            .or_else(|| self.total_tokens.map(|t| t.saturating_sub(completion)))
            .unwrap_or(prev.prompt_tokens);
        let cached = self
            .cache_read_input_tokens
            .or_else(|| self.prompt_tokens_details.and_then(|d| d.cached_tokens))
            .unwrap_or(prev.cached_tokens);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
        }
    }
}

/// Bytes kept from the end of a JSON frame in case `usage` straddles two frames.
const JSON_TAIL: usize = 512;

/// Counts what a response carried.
#[derive(Debug, Default)]
pub(crate) struct UsageCounter {
    sse: bool,
    /// An SSE line (or a JSON tail) cut by a frame boundary.
    carry: Vec<u8>,
    /// SSE `data:` events other than `[DONE]` (about one per token).
    pub events: u64,
    /// The last `usage` object seen.
    pub usage: Option<Usage>,
}

impl UsageCounter {
    pub(crate) fn new(sse: bool) -> Self {
        UsageCounter {
            sse,
            ..Default::default()
        }
    }

    /// Completion tokens: from `usage` when reported, else counted events.
    pub(crate) fn completion_tokens(&self) -> u64 {
        self.usage.map_or(self.events, |u| u.completion_tokens)
    }

    /// Whether the stream stopped in the middle of an SSE line.
    pub(crate) fn mid_line(&self) -> bool {
        self.sse && !self.carry.is_empty()
    }

    pub(crate) fn observe(&mut self, chunk: &[u8]) {
        if self.sse {
            self.observe_sse(chunk)
        } else {
            self.observe_json(chunk)
        }
    }

    fn observe_sse(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if !self.carry.is_empty() {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    let mut line = std::mem::take(&mut self.carry);
                    line.extend_from_slice(&rest[..i]);
                    self.line(&line);
                    rest = &rest[i + 1..];
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return;
                }
            }
        }
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.line(&rest[..i]);
            rest = &rest[i + 1..];
        }
        self.carry.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        match usage_in(data) {
            Some(u) => self.usage = Some(u.over(self.usage)),
            // A usage-only chunk (empty choices) is not a token.
            None => self.events += 1,
        }
    }

    fn observe_json(&mut self, chunk: &[u8]) {
        if self.carry.is_empty() {
            if let Some(u) = usage_in(chunk) {
                self.usage = Some(u.over(self.usage));
                return;
            }
        } else {
            self.carry.extend_from_slice(chunk);
            if let Some(u) = usage_in(&self.carry) {
                self.usage = Some(u.over(self.usage));
                self.carry.clear();
                return;
            }
            self.carry.clear();
        }
        let tail = &chunk[chunk.len().saturating_sub(JSON_TAIL)..];
        self.carry.extend_from_slice(tail);
    }
}

const KEY: &[u8] = b"\"usage\"";

/// Finds `"usage": {...}` in JSON text and parses the object.
fn usage_in(text: &[u8]) -> Option<RawUsage> {
    usage_at(text, last_key(text)?)
}

/// Where the last `"usage"` in `text` starts.
fn last_key(text: &[u8]) -> Option<usize> {
    // Every SSE event is searched, so the search is built once and runs
    // forwards: memchr's forward search has a SIMD prefilter, its reverse one
    // (`FinderRev`) is a plain two-way scan that cost ~700 instructions per
    // token event, half of the gateway's CPU relaying streams. The last
    // match is the one read, as the reverse search found it.
    static FINDER: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(KEY));
    FINDER.find_iter(text).last()
}

/// The usage object after the key at `at`, if a `:` and an object follow.
fn usage_at(text: &[u8], at: usize) -> Option<RawUsage> {
    let after = &text[at + KEY.len()..];
    let colon = after.iter().position(|&b| !b.is_ascii_whitespace())?;
    if after[colon] != b':' {
        return None;
    }
    let value = &after[colon + 1..];
    let start = value.iter().position(|&b| !b.is_ascii_whitespace())?;
    if value[start] != b'{' {
        return None; // `"usage": null`
    }
    let mut de = serde_json::Deserializer::from_slice(&value[start..]).into_iter::<RawUsage>();
    de.next()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sse_events_and_reads_usage_across_frames() {
        let mut c = UsageCounter::new(true);
        c.observe(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choi");
        c.observe(b"ces\":[{\"text\":\"b\"}],\"usage\":null}\n\n");
        assert_eq!(c.events, 2);
        assert_eq!(c.completion_tokens(), 2);
        c.observe(b": keep-alive\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,");
        c.observe(b"\"completion_tokens\":9,\"total_tokens\":14}}\r\n\r\ndata: [DONE]\n\n");
        assert_eq!(c.events, 2);
        assert_eq!(
            c.usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 9,
                cached_tokens: 0
            })
        );
        assert_eq!(c.completion_tokens(), 9);
    }

    #[test]
    fn reads_responses_and_anthropic_streams_and_rerank_bodies() {
        // Responses API: usage arrives in `response.completed` only.
        let mut r = UsageCounter::new(true);
        r.observe(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n");
        r.observe(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"a\"}\n\n");
        r.observe(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":12,\"input_tokens_details\":{\"cached_tokens\":8},\"output_tokens\":3,\"total_tokens\":15}}}\n\n");
        assert_eq!(
            r.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 3,
                cached_tokens: 8
            })
        );
        // Anthropic: input in message_start, output in message_delta.
        let mut a = UsageCounter::new(true);
        a.observe(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":16,\"output_tokens\":1}}}\n\n");
        a.observe(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}\n\n");
        a.observe(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert_eq!(
            a.usage,
            Some(Usage {
                prompt_tokens: 25,
                completion_tokens: 7,
                cached_tokens: 16
            })
        );
        assert_eq!(a.completion_tokens(), 7);
        // Rerank reports only a total: all of it is prompt.
        let mut k = UsageCounter::new(false);
        k.observe(b"{\"results\":[],\"usage\":{\"total_tokens\":40}}");
        assert_eq!(
            k.usage,
            Some(Usage {
                prompt_tokens: 40,
                completion_tokens: 0,
                cached_tokens: 0
            })
        );
    }

    #[test]
    fn reads_json_usage_even_when_split() {
        let mut c = UsageCounter::new(false);
        c.observe(b"{\"id\":\"x\",\"choices\":[],\"usage\": {\"prompt_tokens\":3,\"compl");
        c.observe(b"etion_tokens\":4}}");
        assert_eq!(c.completion_tokens(), 4);
        let mut whole = UsageCounter::new(false);
        whole.observe(b"{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":1}}}");
        assert_eq!(whole.usage.unwrap().prompt_tokens, 1);
        // Cached prompt tokens, as vLLM reports them with prefix caching on.
        let mut cached = UsageCounter::new(false);
        cached.observe(b"{\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":16}}}");
        assert_eq!(cached.usage.unwrap().cached_tokens, 16);
        assert_eq!(whole.usage.unwrap().cached_tokens, 1);
    }

    #[test]
    fn the_last_usage_key_is_read() {
        // A key that ends in `usage` comes first; the real `usage` last.
        let text = br#"{"a\"usage": {"prompt_tokens": 99}, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}"#;
        let u = usage_in(text).unwrap().over(None);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (1, 2));
        assert!(usage_in(br#"{"choices":[{"text":"no usage here"}]}"#).is_none());
    }

    /// The last `"usage"` by a plain byte-window scan from the end.
    fn last_key_naive(text: &[u8]) -> Option<usize> {
        text.windows(KEY.len()).rposition(|w| w == KEY)
    }

    proptest::proptest! {
        /// The forward search finds the key a reverse scan finds, on text
        /// made of pieces of usage objects, partial keys, escapes and token
        /// events.
        #[test]
        fn finds_the_last_key_like_a_reverse_scan(pieces in proptest::collection::vec(0usize..7, 0..24)) {
            const P: [&[u8]; 7] = [
                b"\"usage\"", b": ", b"{\"prompt_tokens\": 3}", b"\"usag", b"e\"", b"data: {\"x\":1}\n", b"\\\"",
            ];
            let text: Vec<u8> = pieces.iter().flat_map(|&i| P[i].iter().copied()).collect();
            proptest::prop_assert_eq!(last_key(&text), last_key_naive(&text));
        }
    }
}
