//! The shared deterministic tokenizer and prefix-block hashing.
//!
//! Every part of infergate that reasons about tokens uses this one module: the
//! simulator (to count prompt tokens and to key its prefix cache), the gateway
//! (admission estimates, the approximate prefix index) and the load tools. Real
//! engines use BPE vocabularies; what matters for routing is that the count is
//! close (about 4 characters per token for English) and that two prompts sharing
//! a prefix share the same leading block hashes. Being identical on both sides
//! means the gateway's approximate prefix index predicts the simulator's cache
//! exactly, which makes routing tests precise.
//!
//! Rules:
//! - A token is a run of up to [`CHARS_PER_TOKEN`] Unicode scalar values; the text
//!   is cut from its start, so `count_tokens(s) == ceil(chars(s) / 4)`.
//! - A token id is the xxh3 of the token's UTF-8 bytes modulo [`VOCAB_SIZE`].
//! - A block is `block_size` consecutive tokens; only full blocks are hashed.
//!   Block `i`'s hash is `xxh3_64_with_seed(bytes of block i, seed = hash of block i-1)`,
//!   with `seed` of block 0 = the caller's salt (for example a hash of the model
//!   name), so equal hashes mean an equal whole prefix, not just an equal block.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Characters per token of the shared tokenizer.
pub const CHARS_PER_TOKEN: usize = 4;
/// Size of the (virtual) vocabulary token ids are drawn from.
pub const VOCAB_SIZE: u64 = 100_000;

/// Number of tokens in `text`: `ceil(chars / 4)`.
pub fn count_tokens(text: &str) -> u32 {
    let chars = if text.is_ascii() {
        text.len()
    } else {
        text.chars().count()
    };
    chars.div_ceil(CHARS_PER_TOKEN) as u32
}

/// Iterates over the tokens of `text` as string slices.
pub fn tokens(text: &str) -> impl Iterator<Item = &str> {
    TokenIter { rest: text }
}

struct TokenIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for TokenIter<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let end = byte_offset_after_chars(self.rest, CHARS_PER_TOKEN);
        let (tok, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(tok)
    }
}

/// Byte offset just past the first `n` chars of `s` (or `s.len()`).
fn byte_offset_after_chars(s: &str, n: usize) -> usize {
    if s.is_ascii() {
        return n.min(s.len());
    }
    s.char_indices().nth(n).map(|(i, _)| i).unwrap_or(s.len())
}

/// Token id of one token string.
pub fn token_id(token: &str) -> u32 {
    (xxh3_64(token.as_bytes()) % VOCAB_SIZE) as u32
}

/// Token ids of `text` (used by `/tokenize`).
pub fn token_ids(text: &str) -> Vec<u32> {
    tokens(text).map(token_id).collect()
}

/// A seed for block hashing derived from a model name (and optional salt), so the
/// same prompt to two different models never shares cache entries.
pub fn model_seed(model: &str) -> u64 {
    xxh3_64(model.as_bytes())
}

/// Chained hashes of the full `block_size`-token blocks of `text`, at most
/// `max_blocks` of them. See the module docs for the chaining rule.
pub fn block_hashes(text: &str, block_size: usize, seed: u64, max_blocks: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity((text.len() / (block_size * CHARS_PER_TOKEN)).min(max_blocks));
    for_each_block_hash(text, block_size, seed, |h| {
        if out.len() >= max_blocks {
            return false;
        }
        out.push(h);
        true
    });
    out
}

/// Calls `f` with each full block's chained hash, in order, until `f` returns false.
/// Allocates nothing.
pub fn for_each_block_hash(
    text: &str,
    block_size: usize,
    seed: u64,
    mut f: impl FnMut(u64) -> bool,
) {
    if block_size == 0 {
        return;
    }
    let block_chars = block_size * CHARS_PER_TOKEN;
    let mut parent = seed;
    let mut rest = text;
    let ascii = text.is_ascii();
    loop {
        let end = if ascii {
            if rest.len() < block_chars {
                return;
            }
            block_chars
        } else {
            match rest.char_indices().nth(block_chars) {
                Some((i, _)) => i,
                None if rest.chars().count() == block_chars => rest.len(),
                None => return,
            }
        };
        let (block, tail) = rest.split_at(end);
        parent = xxh3_64_with_seed(block.as_bytes(), parent);
        if !f(parent) {
            return;
        }
        rest = tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_four_chars_per_token() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("abc"), 1);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
        assert_eq!(count_tokens("ééééé"), 2);
        assert_eq!(
            tokens("abcdefghij").collect::<Vec<_>>(),
            vec!["abcd", "efgh", "ij"]
        );
        assert_eq!(token_ids("abcdefgh").len(), 2);
    }

    #[test]
    fn only_full_blocks_are_hashed_and_chain_on_prefix() {
        let a = "x".repeat(64 * 3 + 10);
        let b = format!("{}{}", "x".repeat(64), "y".repeat(64 * 2));
        let ha = block_hashes(&a, 16, 7, usize::MAX);
        let hb = block_hashes(&b, 16, 7, usize::MAX);
        assert_eq!(ha.len(), 3);
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        // Same block content at a different position hashes differently (chained).
        assert_ne!(ha[0], ha[1]);
        // Another seed (model) shares nothing.
        assert_ne!(block_hashes(&a, 16, 8, 1)[0], ha[0]);
        assert_eq!(block_hashes(&a, 16, 7, 2).len(), 2);
    }

    #[test]
    fn non_ascii_blocks_follow_char_boundaries() {
        let s = "é".repeat(8);
        assert_eq!(block_hashes(&s, 2, 0, usize::MAX).len(), 1);
        let s9 = "é".repeat(9);
        assert_eq!(
            block_hashes(&s9, 2, 0, usize::MAX),
            block_hashes(&s, 2, 0, usize::MAX)
        );
    }
}
