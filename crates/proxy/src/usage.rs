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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
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
        // The `"usage"` key is searched once in the whole frame (usually in
        // vain), not once per line: only a line that holds it is parsed;
        // every other line is only counted. The key holds no line end, so a
        // match lies within one line. (Per line, the search and its call
        // were ~300 instructions of each relayed token.)
        let finder = finder();
        let mut next_key = finder.find(rest);
        let mut start = 0;
        while let Some(len) = memchr::memchr(b'\n', &rest[start..]) {
            let lf = start + len;
            let line = &rest[start..lf];
            match next_key {
                Some(k) if k < lf => {
                    self.line(line);
                    next_key = finder.find(&rest[lf..]).map(|k| k + lf);
                }
                _ if is_token_event(line) => self.events += 1,
                _ => {}
            }
            start = lf + 1;
            // The empty line that ends an event: nothing to count, no search.
            while rest.get(start) == Some(&b'\n') {
                start += 1;
            }
        }
        self.carry.extend_from_slice(&rest[start..]);
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = event_data(line) else {
            return;
        };
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

/// The payload of an SSE `data:` line, unless it is `[DONE]`.
fn event_data(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    let data = data.strip_prefix(b" ").unwrap_or(data);
    (data != b"[DONE]").then_some(data)
}

/// Whether a line without a usage object is a token's event.
fn is_token_event(line: &[u8]) -> bool {
    event_data(line).is_some()
}

/// The search for [`KEY`], built once.
fn finder() -> &'static memchr::memmem::Finder<'static> {
    static FINDER: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(KEY));
    &FINDER
}

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
    finder().find_iter(text).last()
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
    let value = &value[start..];
    usage_fast(value).or_else(|| usage_serde(value))
}

/// The usage object at the start of `value`, by serde.
fn usage_serde(value: &[u8]) -> Option<RawUsage> {
    let mut de = serde_json::Deserializer::from_slice(value).into_iter::<RawUsage>();
    de.next()?.ok()
}

/// The usage object at the start of `value` read without serde when it has
/// the common shape: keys without escapes whose values are unsigned
/// integers or `null`, and for the `*_details` keys an object of those (or
/// `null`). `None` for any other shape, which serde then reads: the same
/// result either way (a property test compares them). serde's derived
/// parse of the object was ~2.8k instructions, 4% of a small request.
fn usage_fast(value: &[u8]) -> Option<RawUsage> {
    let mut c = Cursor { s: value, i: 0 };
    let mut u = RawUsage::default();
    // Fields set so far: serde refuses an object that names one twice
    // (an alias and its field count as one).
    let mut seen = 0u8;
    c.object(|c, key| {
        let field = match key {
            b"prompt_tokens" | b"input_tokens" => 0,
            b"completion_tokens" | b"output_tokens" => 1,
            b"total_tokens" => 2,
            b"prompt_tokens_details" | b"input_tokens_details" => 3,
            b"cache_read_input_tokens" => 4,
            _ => return c.int_or_null().map(drop),
        };
        if seen & (1 << field) != 0 {
            return None;
        }
        seen |= 1 << field;
        match field {
            0 => u.prompt_tokens = c.int_or_null()?,
            1 => u.completion_tokens = c.int_or_null()?,
            2 => u.total_tokens = c.int_or_null()?,
            3 => u.prompt_tokens_details = c.details()?,
            _ => u.cache_read_input_tokens = c.int_or_null()?,
        }
        Some(())
    })?;
    Some(u)
}

/// A position in JSON text, for [`usage_fast`].
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    /// The next byte that is not JSON whitespace, consumed.
    fn next(&mut self) -> Option<u8> {
        while let Some(&b) = self.s.get(self.i) {
            self.i += 1;
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
        }
        None
    }

    /// `{ "key": value, ... }`, each value read by `field` (given the key).
    fn object(&mut self, mut field: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        if self.next()? != b'{' {
            return None;
        }
        let mut first = true;
        loop {
            match self.next()? {
                b'}' if first => return Some(()),
                b'"' => {}
                _ => return None,
            }
            first = false;
            let start = self.i;
            let len = memchr::memchr2(b'"', b'\\', &self.s[start..])?;
            if self.s[start + len] != b'"' {
                return None; // an escape
            }
            self.i = start + len + 1;
            if self.next()? != b':' {
                return None;
            }
            let key = &self.s[start..start + len];
            field(self, key)?;
            match self.next()? {
                b',' => continue,
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// An unsigned integer that fits a u64, or `null` (`Some(None)`).
    fn int_or_null(&mut self) -> Option<Option<u64>> {
        let first = self.next()?;
        if first == b'n' {
            let rest = self.s.get(self.i..self.i + 3)?;
            self.i += 3;
            return (rest == b"ull").then_some(None);
        }
        let mut v = u64::from(first.checked_sub(b'0').filter(|d| *d <= 9)?);
        if first == b'0' && self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            return None; // a leading zero: not JSON
        }
        while let Some(&b) = self.s.get(self.i) {
            match b {
                b'0'..=b'9' => {
                    v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                    self.i += 1;
                }
                b'.' | b'e' | b'E' => return None, // a float
                _ => break,
            }
        }
        Some(Some(v))
    }

    /// `null` or an object of integers holding `cached_tokens`.
    fn details(&mut self) -> Option<Option<TokenDetails>> {
        let at = self.i;
        if self.next()? == b'n' {
            self.i = at;
            return self.int_or_null().and_then(|n| n.is_none().then_some(None));
        }
        self.i = at;
        let mut d = TokenDetails::default();
        let mut seen = false;
        self.object(|c, key| {
            let v = c.int_or_null()?;
            if key == b"cached_tokens" {
                if seen {
                    return None;
                }
                seen = true;
                d.cached_tokens = v;
            }
            Some(())
        })?;
        Some(Some(d))
    }
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

    /// The SSE scan of before: every complete line parsed on its own.
    fn observe_by_line(frames: &[&[u8]]) -> (u64, Option<Usage>) {
        let mut c = UsageCounter::new(true);
        let mut pending = Vec::new();
        for f in frames {
            pending.extend_from_slice(f);
            while let Some(i) = memchr::memchr(b'\n', &pending) {
                let line: Vec<u8> = pending.drain(..=i).collect();
                c.line(&line[..i]);
            }
        }
        (c.events, c.usage)
    }

    /// Lines an event stream may hold: events, usage (alone, with a token,
    /// null, in a string), `[DONE]`, comments, other fields, CRLF ends.
    const SSE_LINES: [&str; 16] = [
        "g",
        "data: gg{\"usage\":{\"completion_tokens\":2}}",
        "\"usage\":{\"prompt_tokens\":1}",
        "data: {\"usage\": {\"prompt_tokens\": 2, \"completion_tokens\": 9}, \"g\": \"g\"}",
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}",
        "data: {\"choices\":[{\"text\":\"b\"}],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\r",
        "data:{\"usage\":null}",
        "data: [DONE]",
        "data: [DONE]\r",
        "",
        "\r",
        ": keep-alive",
        "event: message_delta",
        "data: {\"text\":\"say \\\"usage\\\" \\\"usage\\\"usage\\\"\"}",
        "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}",
    ];

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

        /// Whenever the fast reader answers, serde answers the same, on
        /// objects made of the usage keys (aliases, repeats, unknown and
        /// escaped ones) and values of every JSON kind, well formed or not.
        /// The scan of whole frames counts and reads what a line-by-line
        /// scan does, however the stream is cut into frames.
        #[test]
        fn the_frame_scan_agrees_with_the_line_scan(
            lines in proptest::collection::vec(0usize..SSE_LINES.len(), 0..40),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let mut text = Vec::new();
            for &l in &lines {
                text.extend_from_slice(SSE_LINES[l].as_bytes());
                text.push(b'\n');
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut frames = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                frames.push(&text[at..c]);
                at = c;
            }
            let mut c = UsageCounter::new(true);
            for f in &frames {
                c.observe(f);
            }
            proptest::prop_assert_eq!((c.events, c.usage), observe_by_line(&frames));
        }

        #[test]
        fn the_fast_reader_agrees_with_serde(
            fields in proptest::collection::vec((0usize..11, 0usize..17, 0usize..4), 0..7),
            close in proptest::bool::ANY,
        ) {
            const K: [&str; 11] = [
                "prompt_tokens", "input_tokens", "completion_tokens", "output_tokens",
                "total_tokens", "prompt_tokens_details", "input_tokens_details",
                "cache_read_input_tokens", "cached_tokens", "x", "prompt\\u005ftokens",
            ];
            const V: [&str; 17] = [
                "0", "7", "01", "-1", "1.5", "2e3", "null", "nul", "18446744073709551615",
                "18446744073709551616", "\"s\"", "{}", "{\"cached_tokens\":3}",
                "{\"cached_tokens\":3,\"cached_tokens\":4}", "{\"a\":1, \"cached_tokens\" : null}",
                "[1]", "true",
            ];
            const WS: [&str; 4] = ["", " ", "\n\t", "\u{c}"];
            let mut text = String::from("{");
            for (i, (k, v, w)) in fields.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                text.push_str(WS[*w]);
                text.push_str(&format!("\"{}\"{}:{}{}", K[*k], WS[*w], WS[*w], V[*v]));
            }
            if close {
                text.push('}');
            }
            if let Some(fast) = usage_fast(text.as_bytes()) {
                proptest::prop_assert_eq!(Some(fast), usage_serde(text.as_bytes()), "{}", text);
            }
        }
    }

    /// The shapes engines send are read by the fast reader.
    #[test]
    fn common_usage_objects_take_the_fast_path() {
        for (text, want) in [
            (
                r#"{"prompt_tokens":12,"total_tokens":13,"completion_tokens":1,"prompt_tokens_details":null}"#,
                (Some(12), Some(1), Some(13), None, None),
            ),
            (
                r#"{ "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4} }"#,
                (Some(5), Some(2), Some(7), Some(4), None),
            ),
            (
                r#"{"input_tokens":9,"output_tokens":3,"cache_read_input_tokens":6}"#,
                (Some(9), Some(3), None, None, Some(6)),
            ),
            (r#"{"total_tokens":0}"#, (None, None, Some(0), None, None)),
            ("{}", (None, None, None, None, None)),
        ] {
            let u = usage_fast(text.as_bytes()).unwrap_or_else(|| panic!("{text}"));
            let got = (
                u.prompt_tokens,
                u.completion_tokens,
                u.total_tokens,
                u.prompt_tokens_details.and_then(|d| d.cached_tokens),
                u.cache_read_input_tokens,
            );
            assert_eq!(got, want, "{text}");
            assert_eq!(Some(u), usage_serde(text.as_bytes()), "{text}");
        }
        // Other shapes are left to serde.
        for text in [
            r#"{"prompt_tokens":1.0}"#,
            r#"{"x":"y","prompt_tokens":1}"#,
            r#"{"prompt_tokens":1,"input_tokens":2}"#,
        ] {
            assert!(usage_fast(text.as_bytes()).is_none(), "{text}");
        }
    }
}
