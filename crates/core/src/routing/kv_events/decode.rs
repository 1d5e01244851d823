//! Decoding a vLLM/SGLang KV-event batch (msgpack) in either encoding.
//!
//! A batch is `[ts, [event, ...], data_parallel_rank?]`. An event is a tagged
//! array in field order (`["BlockStored", block_hashes, parent_block_hash,
//! token_ids, block_size, lora_id, medium, lora_name, ...]`, vLLM before
//! 2026-06 and SGLang) or a map keyed by field name with the tag under `type`
//! (vLLM since PR #42892); unknown fields and trailing fields are ignored,
//! missing optional ones are `None`. A block hash is an integer (u64, or i64
//! taken as its bits) or a byte string whose last 8 bytes, big-endian, are
//! used (llm-d's rule for sha256 hashes). Unknown event types are skipped.
//! Any other malformed input is an error, never a panic; nesting is bounded.

use rmpv::Value;

/// One cache change as the engine reported it.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    Stored {
        /// The engine's hashes of the stored blocks, in chain order.
        hashes: Vec<u64>,
        /// The engine's hash of the block before the first, if any.
        parent: Option<u64>,
        /// The blocks' token ids (`block_size` per block).
        token_ids: Vec<u32>,
        block_size: u32,
        lora_name: Option<String>,
        /// "GPU", "CPU", ...; `None` when not given.
        medium: Option<String>,
    },
    Removed {
        hashes: Vec<u64>,
        medium: Option<String>,
    },
    Cleared,
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad KV event batch: {}", self.0)
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(m.into()))
}

/// Deepest nesting accepted (rmpv counts a string or byte string as a level:
/// a batch needs 6).
const MAX_DEPTH: usize = 16;

/// Decodes one payload.
pub fn decode_batch(payload: &[u8]) -> Result<KvEventBatch, DecodeError> {
    let mut rd = payload;
    let v = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| DecodeError(e.to_string()))?;
    let Value::Array(items) = v else {
        return err("batch is not an array");
    };
    let (ts, events, rank) = match items.as_slice() {
        [ts, events] => (ts, events, None),
        [ts, events, rank, ..] => (ts, events, Some(rank)),
        _ => return err("batch has fewer than 2 fields"),
    };
    let ts = match ts {
        Value::F64(f) => *f,
        Value::F32(f) => f64::from(*f),
        v => v.as_i64().map_or(0.0, |i| i as f64),
    };
    let Value::Array(raw) = events else {
        return err("events is not an array");
    };
    let mut out = Vec::with_capacity(raw.len());
    for e in raw {
        if let Some(ev) = decode_event(e)? {
            out.push(ev);
        }
    }
    Ok(KvEventBatch {
        ts,
        events: out,
        data_parallel_rank: rank.and_then(Value::as_i64),
    })
}

/// The fields of one event, by name, from either encoding.
struct Fields<'a> {
    tag: &'a str,
    positional: &'a [Value],
    named: &'a [(Value, Value)],
}

impl<'a> Fields<'a> {
    fn get(&self, pos: usize, name: &str) -> Option<&'a Value> {
        if self.named.is_empty() {
            self.positional.get(pos).filter(|v| !v.is_nil())
        } else {
            self.named
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v)
                .filter(|v| !v.is_nil())
        }
    }
}

fn decode_event(v: &Value) -> Result<Option<KvEvent>, DecodeError> {
    let f = match v {
        Value::Array(a) => match a.split_first() {
            Some((tag, rest)) => Fields {
                tag: tag.as_str().unwrap_or(""),
                positional: rest,
                named: &[],
            },
            None => return err("empty event array"),
        },
        Value::Map(m) => Fields {
            tag: m
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .and_then(|(_, v)| v.as_str())
                .unwrap_or(""),
            positional: &[],
            named: m,
        },
        _ => return err("event is neither an array nor a map"),
    };
    let medium = |pos| {
        f.get(pos, "medium")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(Some(match f.tag {
        "BlockStored" => {
            let hashes = hashes(f.get(0, "block_hashes"))?;
            let parent = f.get(1, "parent_block_hash").map(hash).transpose()?;
            let token_ids = match f.get(2, "token_ids") {
                Some(Value::Array(ts)) => ts
                    .iter()
                    .map(|t| {
                        t.as_u64()
                            .and_then(|t| u32::try_from(t).ok())
                            .ok_or_else(|| DecodeError("token id is not a u32".into()))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => Vec::new(),
                Some(_) => return err("token_ids is not an array"),
            };
            let block_size = f
                .get(3, "block_size")
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .unwrap_or(0);
            KvEvent::Stored {
                hashes,
                parent,
                token_ids,
                block_size,
                medium: medium(5),
                lora_name: f
                    .get(6, "lora_name")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            }
        }
        "BlockRemoved" => KvEvent::Removed {
            hashes: hashes(f.get(0, "block_hashes"))?,
            medium: medium(1),
        },
        "AllBlocksCleared" => KvEvent::Cleared,
        _ => return Ok(None),
    }))
}

fn hashes(v: Option<&Value>) -> Result<Vec<u64>, DecodeError> {
    match v {
        Some(Value::Array(a)) => a.iter().map(hash).collect(),
        None => Ok(Vec::new()),
        Some(_) => err("block_hashes is not an array"),
    }
}

/// An integer hash, or a byte string's last 8 bytes big-endian (shorter
/// strings are zero-padded on the left).
fn hash(v: &Value) -> Result<u64, DecodeError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or_else(|| DecodeError("bad integer hash".into())),
        Value::Binary(b) => {
            let tail = &b[b.len().saturating_sub(8)..];
            Ok(tail.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
        }
        _ => err("block hash is neither an integer nor bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[0.5, [["BlockStored", [1, 2^64-1], nil, [7, 8], 1, nil, "GPU"]], 0]`
    /// written byte by byte from the msgpack spec (array encoding).
    fn golden_array() -> Vec<u8> {
        let mut b = vec![0x93, 0xcb];
        b.extend_from_slice(&0.5f64.to_be_bytes());
        b.extend_from_slice(&[0x91, 0x97, 0xab]);
        b.extend_from_slice(b"BlockStored");
        b.extend_from_slice(&[0x92, 0x01, 0xcf]);
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        b.extend_from_slice(&[0xc0, 0x92, 0x07, 0x08, 0x01, 0xc0, 0xa3]);
        b.extend_from_slice(b"GPU");
        b.push(0x00);
        b
    }

    fn fixstr(b: &mut Vec<u8>, s: &str) {
        b.push(0xa0 | s.len() as u8);
        b.extend_from_slice(s.as_bytes());
    }

    /// `[1.0, [{"type": "BlockStored", "block_hashes": [bin32], "parent_block_hash":
    /// -5, "token_ids": [3], "block_size": 1, "lora_name": "ad", "extra": 1},
    /// {"type": "BlockRemoved", "block_hashes": [9]}, {"type": "AllBlocksCleared"},
    /// ["FutureEvent"]]]` (map encoding, two-field batch).
    fn golden_map() -> Vec<u8> {
        let mut b = vec![0x92, 0xcb];
        b.extend_from_slice(&1.0f64.to_be_bytes());
        b.push(0x94);
        b.push(0x87);
        fixstr(&mut b, "type");
        fixstr(&mut b, "BlockStored");
        fixstr(&mut b, "block_hashes");
        b.extend_from_slice(&[0x91, 0xc4, 32]);
        b.extend_from_slice(&[0xee; 24]);
        b.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        fixstr(&mut b, "parent_block_hash");
        b.push(0xfb); // -5 as a negative fixint
        fixstr(&mut b, "token_ids");
        b.extend_from_slice(&[0x91, 0x03]);
        fixstr(&mut b, "block_size");
        b.push(0x01);
        fixstr(&mut b, "lora_name");
        fixstr(&mut b, "ad");
        fixstr(&mut b, "extra");
        b.push(0x01);
        b.push(0x82);
        fixstr(&mut b, "type");
        fixstr(&mut b, "BlockRemoved");
        fixstr(&mut b, "block_hashes");
        b.extend_from_slice(&[0x91, 0x09]);
        b.push(0x81);
        fixstr(&mut b, "type");
        fixstr(&mut b, "AllBlocksCleared");
        b.push(0x91);
        fixstr(&mut b, "FutureEvent");
        b
    }

    #[test]
    fn decodes_the_array_encoding() {
        let batch = decode_batch(&golden_array()).unwrap();
        assert_eq!(batch.ts, 0.5);
        assert_eq!(batch.data_parallel_rank, Some(0));
        assert_eq!(
            batch.events,
            vec![KvEvent::Stored {
                hashes: vec![1, u64::MAX],
                parent: None,
                token_ids: vec![7, 8],
                block_size: 1,
                lora_name: None,
                medium: Some("GPU".into()),
            }]
        );
    }

    #[test]
    fn decodes_the_map_encoding_with_byte_and_negative_hashes() {
        let batch = decode_batch(&golden_map()).unwrap();
        assert_eq!(batch.data_parallel_rank, None);
        assert_eq!(
            batch.events,
            vec![
                KvEvent::Stored {
                    hashes: vec![0x0102_0304_0506_0708],
                    parent: Some(-5i64 as u64),
                    token_ids: vec![3],
                    block_size: 1,
                    lora_name: Some("ad".into()),
                    medium: None,
                },
                KvEvent::Removed {
                    hashes: vec![9],
                    medium: None
                },
                KvEvent::Cleared,
            ],
            "unknown fields and event types are skipped"
        );
    }

    #[test]
    fn malformed_batches_are_errors() {
        for bad in [
            &[][..],
            &[0xc1],             // never-used marker
            &[0x91, 0x00],       // one field
            &[0x92, 0x00, 0x01], // events not an array
            &[0x92, 0x00, 0x91, 0x05],
            &[0x92, 0x00, 0x91, 0x92, 0xa1, b'x'], // truncated
        ] {
            assert!(decode_batch(bad).is_err(), "{bad:?}");
        }
        // Truncating a good payload anywhere never panics.
        let good = golden_map();
        for n in 0..good.len() {
            let _ = decode_batch(&good[..n]);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_batch(&bytes);
        }

        #[test]
        fn mutated_payloads_never_panic(i in 0usize..200, x in proptest::num::u8::ANY) {
            let mut b = golden_map();
            let n = b.len();
            b[i % n] = x;
            let _ = decode_batch(&b);
        }
    }
}
