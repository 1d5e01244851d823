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

/// The key of one block of `tokens` whose preceding block's key is `parent`
/// (the chain's seed for a prompt's first block): xxh3 of the ids as
/// little-endian u32s, seeded with `parent`. Allocates nothing.
pub fn token_block_key(parent: u64, tokens: &[u32]) -> u64 {
    const STACK: usize = 128;
    if tokens.len() <= STACK {
        let mut buf = [0u8; STACK * 4];
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
/// false. Allocates nothing.
pub fn for_each_token_block_key(
    text: &str,
    block_size: usize,
    seed: u64,
    mut f: impl FnMut(u64) -> bool,
) {
    const STACK: usize = 128;
    if block_size == 0 || block_size > STACK {
        if block_size > STACK {
            // Rare block sizes: one allocation for the block's ids.
            let ids = token_ids(text);
            let mut parent = seed;
            for block in ids.chunks_exact(block_size) {
                parent = token_block_key(parent, block);
                if !f(parent) {
                    return;
                }
            }
        }
        return;
    }
    // ASCII (the common case): a token is 4 bytes, no char walking; each
    // path is its own monomorphic loop.
    if text.is_ascii() {
        key_blocks(
            text.as_bytes()
                .chunks(CHARS_PER_TOKEN)
                .map(|t| (xxh3_64(t) % VOCAB_SIZE) as u32),
            block_size,
            seed,
            f,
        );
    } else {
        key_blocks(tokens(text).map(token_id), block_size, seed, f);
    }
}

/// Chains the keys of full `block_size` blocks of `ids` (at most 128 per block).
fn key_blocks(
    ids: impl Iterator<Item = u32>,
    block_size: usize,
    seed: u64,
    mut f: impl FnMut(u64) -> bool,
) {
    let mut block = [0u32; 128];
    let mut n = 0;
    let mut parent = seed;
    for id in ids {
        block[n] = id;
        n += 1;
        if n == block_size {
            n = 0;
            parent = token_block_key(parent, &block[..block_size]);
            if !f(parent) {
                return;
            }
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
}
