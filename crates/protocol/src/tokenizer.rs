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
//! - A token id is a hash of the token's UTF-8 bytes scaled into `0..`[`VOCAB_SIZE`]:
//!   a token of up to 4 bytes (every ASCII token) is its bytes as a
//!   little-endian `u32` (zero-padded, the length mixed into the top bits)
//!   through Fibonacci hashing; a longer one folds its xxh3 there.
//!   A few instructions per token, so keying an 8,000-token prompt for the
//!   precise index costs far less than one routing decision.
//! - A block is `block_size` consecutive tokens; only full blocks are hashed.
//!   Block `i`'s hash is `xxh3_64_with_seed(bytes of block i, seed = hash of block i-1)`,
//!   with `seed` of block 0 = the caller's salt (for example a hash of the model
//!   name), so equal hashes mean an equal whole prefix, not just an equal block.
//! - A *token-block key* ([`token_block_key`]) is the same chain over a block's
//!   token ids instead of its text: the gateway computes it both from the token
//!   ids an engine's KV events carry and from its own tokenization of a prompt,
//!   so it needs neither the engine's block hash nor its hash seed.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

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
    TokenIter {
        rest: text,
        // Checked once: per token it would rescan the rest (quadratic).
        ascii: text.is_ascii(),
    }
}

struct TokenIter<'a> {
    rest: &'a str,
    ascii: bool,
}

impl<'a> Iterator for TokenIter<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let end = if self.ascii {
            CHARS_PER_TOKEN.min(self.rest.len())
        } else {
            byte_offset_after_chars(self.rest, CHARS_PER_TOKEN)
        };
        let (tok, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(tok)
    }
}

/// Byte offset just past the first `n` chars of `s` (or `s.len()`).
fn byte_offset_after_chars(s: &str, n: usize) -> usize {
    s.char_indices().nth(n).map(|(i, _)| i).unwrap_or(s.len())
}

/// Token id of one token string (see the module docs).
pub fn token_id(token: &str) -> u32 {
    let b = token.as_bytes();
    let word = if b.len() <= CHARS_PER_TOKEN {
        let mut w = [0u8; 4];
        w[..b.len()].copy_from_slice(b);
        // A short token differs from its zero-padded 4-byte twin.
        u32::from_le_bytes(w) ^ ((4 - b.len() as u32) << 30)
    } else {
        let h = xxh3_64(b);
        (h ^ (h >> 32)) as u32
    };
    word_id(word)
}

/// The id of a token packed into `word`: Fibonacci hashing (one multiply by
/// 2^64 / phi; the top half depends on every input bit), scaled into the
/// vocabulary by a multiply, no division.
#[inline]
fn word_id(word: u32) -> u32 {
    let h = (u64::from(word) ^ 0x5555_5555).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    ((h * VOCAB_SIZE) >> 32) as u32
}

/// The key of one ASCII block `block` (a multiple of 4 bytes, at most 128
/// tokens, so it fits `buf`): ids straight from each 4-byte word, no `&str`
/// walk; equal to [`token_block_key`] over the block's [`token_ids`]. `buf`
/// is the caller's, reused across blocks (zeroing it per block would cost
/// as much as the ids).
#[inline]
fn ascii_block_key(parent: u64, block: &[u8], buf: &mut [u8; STACK_TOKENS * 4]) -> u64 {
    let out = &mut buf[..block.len()];
    for (o, w) in out.chunks_exact_mut(4).zip(block.chunks_exact(4)) {
        o.copy_from_slice(&word_id(u32::from_le_bytes([w[0], w[1], w[2], w[3]])).to_le_bytes());
    }
    xxh3_64_with_seed(out, parent)
}

/// Most tokens of a block keyed without allocating.
const STACK_TOKENS: usize = 128;

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
    let mut out =
        Vec::with_capacity((text.len() / (block_size.max(1) * CHARS_PER_TOKEN)).min(max_blocks));
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

/// The key of one block of `tokens` whose preceding block's key is `parent`
/// (the chain's seed for a prompt's first block): xxh3 of the ids as
/// little-endian u32s, seeded with `parent`. Allocates nothing.
pub fn token_block_key(parent: u64, tokens: &[u32]) -> u64 {
    if tokens.len() <= STACK_TOKENS {
        let mut buf = [0u8; STACK_TOKENS * 4];
        for (chunk, t) in buf.chunks_exact_mut(4).zip(tokens) {
            chunk.copy_from_slice(&t.to_le_bytes());
        }
        xxh3_64_with_seed(&buf[..tokens.len() * 4], parent)
    } else {
        let mut h = Xxh3::with_seed(parent);
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        h.digest()
    }
}

/// Calls `f` with the token-block key of each full `block_size`-token block of
/// `text` (tokenized by [`tokens`]), chained from `seed`, until `f` returns
/// false. Allocates nothing for blocks of up to 128 tokens.
pub fn for_each_token_block_key(
    text: &str,
    block_size: usize,
    seed: u64,
    mut f: impl FnMut(u64) -> bool,
) {
    if block_size == 0 {
        return;
    }
    let mut parent = seed;
    if text.is_ascii() && block_size <= STACK_TOKENS {
        // The common case: every token of a full block is 4 bytes.
        let mut buf = [0u8; STACK_TOKENS * 4];
        for block in text.as_bytes().chunks_exact(block_size * CHARS_PER_TOKEN) {
            parent = ascii_block_key(parent, block, &mut buf);
            if !f(parent) {
                return;
            }
        }
        return;
    }
    // Non-ASCII text or rare block sizes: one allocation for the ids.
    let ids = token_ids(text);
    for block in ids.chunks_exact(block_size) {
        parent = token_block_key(parent, block);
        if !f(parent) {
            return;
        }
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

    #[test]
    fn token_block_keys_chain_over_ids_and_match_from_text_or_ids() {
        let text = "abcd".repeat(40) + "tail";
        let ids = token_ids(&text);
        let mut from_text = Vec::new();
        for_each_token_block_key(&text, 16, 5, |k| {
            from_text.push(k);
            true
        });
        assert_eq!(from_text.len(), 2, "only full blocks");
        let k0 = token_block_key(5, &ids[..16]);
        assert_eq!(from_text, vec![k0, token_block_key(k0, &ids[16..32])]);
        // Same block content, another position: another key (chained).
        assert_ne!(from_text[0], from_text[1]);
        // A large block size takes the allocating path and agrees.
        let long = "wxyz".repeat(300);
        let mut big = Vec::new();
        for_each_token_block_key(&long, 200, 1, |k| {
            big.push(k);
            true
        });
        assert_eq!(big, vec![token_block_key(1, &token_ids(&long)[..200])]);
    }

    #[test]
    fn token_ids_are_in_the_vocabulary_and_tell_short_tokens_apart() {
        for t in ["a", "ab", "abc", "abcd", "é", "éé", "ééé", "\0", "a\0\0\0"] {
            assert!(u64::from(token_id(t)) < VOCAB_SIZE, "{t:?}");
        }
        assert_ne!(token_id("ab"), token_id("ab\0\0"));
        assert_ne!(token_id("abcd"), token_id("abce"));
        // Ids spread over the vocabulary: 4,096 distinct tokens, few collisions.
        let ids: std::collections::HashSet<u32> =
            (0..4096u32).map(|i| token_id(&format!("{i:04}"))).collect();
        assert!(ids.len() > 3_900, "{}", ids.len());
    }
}
