//! Scans OpenAI-style response bodies without parsing JSON: SSE token events, the `[DONE]`
//! marker, error events and `usage.completion_tokens`.
//!
//! The load generator shares the CPU with what it measures, so it looks at raw bytes:
//! a `data:` event is a token event when a `"content"` or `"text"` field in it holds a
//! non-empty string (the role-only first chat chunk and the usage-only last chunk are not).
//! Generated text sits inside JSON strings, where quotes are escaped, so it can never be
//! mistaken for one of the field names searched for.

/// Longest SSE line kept; a longer one is a broken stream, not worth unbounded memory.
const MAX_LINE: usize = 1 << 20;

/// Per-request SSE state; reused across requests (see [`SseScanner::reset`]).
#[derive(Debug, Default)]
pub struct SseScanner {
    partial: Vec<u8>,
    /// Token events seen.
    pub tokens: u32,
    /// The usage chunk, when one came.
    pub usage: Option<Usage>,
    /// `data: [DONE]` seen.
    pub done: bool,
    /// An error event (`event: error` or a `data: {"error": ...}` payload) or an oversized line.
    pub error: bool,
}

impl SseScanner {
    pub fn reset(&mut self) {
        self.partial.clear();
        self.tokens = 0;
        self.usage = None;
        self.done = false;
        self.error = false;
    }

    /// Feeds one body frame; returns how many token events it completed.
    pub fn feed(&mut self, mut chunk: &[u8]) -> u32 {
        let before = self.tokens;
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            let (line, rest) = (&chunk[..pos], &chunk[pos + 1..]);
            if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole);
                whole.clear();
                self.partial = whole;
            }
            chunk = rest;
        }
        if self.partial.len() + chunk.len() > MAX_LINE {
            self.error = true;
            self.partial.clear();
        } else {
            self.partial.extend_from_slice(chunk);
        }
        self.tokens - before
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(event) = line.strip_prefix(b"event:") {
            if trim_start(event).starts_with(b"error") {
                self.error = true;
            }
            return;
        }
        let Some(payload) = line.strip_prefix(b"data:") else {
            return;
        };
        let payload = trim_start(payload);
        if payload == b"[DONE]" {
            self.done = true;
            return;
        }
        if trim_start(payload.strip_prefix(b"{").unwrap_or(b"")).starts_with(b"\"error\"") {
            self.error = true;
            return;
        }
        if let Some(u) = usage(payload) {
            self.usage = Some(u);
        }
        if has_text(payload, b"\"content\":") || has_text(payload, b"\"text\":") {
            self.tokens += 1;
        }
    }
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether some `key` in `json` is followed by a non-empty string value.
fn has_text(mut json: &[u8], key: &[u8]) -> bool {
    while let Some(at) = find(json, key) {
        let value = trim_start(&json[at + key.len()..]);
        if value.len() >= 2 && value[0] == b'"' && value[1] != b'"' {
            return true;
        }
        json = value;
    }
    false
}

/// Token counts of a `usage` object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub completion: u32,
    pub prompt: u32,
    /// `prompt_tokens_details.cached_tokens` (vLLM, the simulator) or llama.cpp's
    /// `timings.cache_n`, when the engine reports it.
    pub cached: Option<u32>,
}

/// The `usage` of a JSON body or chunk, when `usage` is an object with `completion_tokens`.
pub fn usage(json: &[u8]) -> Option<Usage> {
    let at = find(json, b"\"usage\":")?;
    let obj = trim_start(&json[at + 8..]);
    if !obj.starts_with(b"{") {
        return None;
    }
    Some(Usage {
        completion: number_after(obj, b"\"completion_tokens\":")?,
        prompt: number_after(obj, b"\"prompt_tokens\":").unwrap_or(0),
        cached: number_after(obj, b"\"cached_tokens\":")
            .or_else(|| number_after(json, b"\"cache_n\":")),
    })
}

/// The unsigned integer following the first `key` in `json`.
fn number_after(json: &[u8], key: &[u8]) -> Option<u32> {
    let at = find(json, key)?;
    let digits = trim_start(&json[at + key.len()..]);
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &[u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    const TOKEN: &[u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi \"}}]}\n\n";
    const FINISH: &[u8] =
        b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n";
    const USAGE: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";
    const DONE: &[u8] = b"data: [DONE]\n\n";

    #[test]
    fn counts_tokens_usage_and_done_across_split_frames() {
        let stream = [ROLE, TOKEN, TOKEN, FINISH, USAGE, DONE].concat();
        for split in 1..stream.len() {
            let mut s = SseScanner::default();
            let n = s.feed(&stream[..split]) + s.feed(&stream[split..]);
            assert_eq!(n, 2, "split at {split}");
            assert_eq!(s.usage.map(|u| (u.completion, u.prompt)), Some((2, 5)));
            assert!(s.done && !s.error);
        }
    }

    #[test]
    fn completion_text_with_spaces_after_colons_counts() {
        let mut s = SseScanner::default();
        assert_eq!(
            s.feed(b"data: {\"choices\": [{\"text\": \"x\", \"finish_reason\": null}]}\r\n\r\n"),
            1
        );
        assert_eq!(
            s.feed(b"data: {\"choices\": [{\"text\": \"\"}], \"usage\": null}\n\n"),
            0
        );
        assert_eq!(s.usage, None);
    }

    #[test]
    fn error_events_are_flagged() {
        let mut s = SseScanner::default();
        s.feed(b"event: error\ndata: {\"error\":{\"message\":\"idle timeout\"}}\n\n");
        assert!(s.error && !s.done);
        s.reset();
        s.feed(b"data: {\"error\": {\"message\": \"x\"}}\n\n");
        assert!(s.error);
    }

    #[test]
    fn usage_of_a_non_streaming_body() {
        let body = br#"{"id":"x","choices":[{"text":"\"usage\": {\"completion_tokens\": 9}"}],"usage":{"prompt_tokens":3,"completion_tokens":16}}"#;
        let want = Usage {
            completion: 16,
            prompt: 3,
            cached: None,
        };
        assert_eq!(usage(body), Some(want));
        assert_eq!(usage(b"{\"usage\":null}"), None);
        let vllm = br#"{"usage":{"prompt_tokens":300,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":256}}}"#;
        assert_eq!(usage(vllm).and_then(|u| u.cached), Some(256));
        let llama = br#"{"choices":[],"usage":{"completion_tokens":2,"prompt_tokens":30},"timings":{"cache_n":24}}"#;
        assert_eq!(usage(llama).and_then(|u| u.cached), Some(24));
    }
}
