//! vLLM's KV-cache events as the simulator emits them: the settings (vLLM's
//! `--kv-events-config` JSON), the events the block pool raises as its cache
//! changes, and their msgpack encoding in both of vLLM's forms.
//!
//! Wire form (vLLM `vllm/distributed/kv_events.py`): a batch is the array
//! `[ts, [event, ...], data_parallel_rank]`. An event is either a tagged array
//! in field order (msgspec `array_like=True, tag=True`, vLLM before mid-2026):
//! `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
//! lora_id, medium, lora_name]`, `["BlockRemoved", block_hashes, medium]`,
//! `["AllBlocksCleared"]`; or a map keyed by field name with the tag under
//! `"type"` (vLLM since PR #42892). Block hashes are integers (vLLM's default,
//! `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, the low 64 bits, so possibly above
//! i64) or 32-byte strings whose last 8 bytes carry the hash big-endian.
//! This encoder is written from that description on its own: the gateway's
//! decoder (`core::routing::kv_events`) shares no code with it, so the two
//! check each other.

use serde::{Deserialize, Serialize};

/// vLLM's `--kv-events-config`, plus the simulator's choice of encodings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    /// Only "zmq" is simulated.
    pub publisher: String,
    /// PUB socket, `tcp://HOST:PORT` (`*` = every address); replica i binds
    /// PORT + i, like vLLM's data-parallel ranks. Port 0 = ephemeral.
    pub endpoint: String,
    /// ROUTER socket answering replay requests; same port rule.
    pub replay_endpoint: Option<String>,
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// `array` (vLLM before 2026-06) or `map`.
    pub encoding: EventEncoding,
    /// Integer block hashes (vLLM's default) or 32-byte strings.
    pub int_block_hashes: bool,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            enable_kv_cache_events: false,
            publisher: "zmq".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: 10_000,
            encoding: EventEncoding::Map,
            int_block_hashes: true,
        }
    }
}

/// How events are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventEncoding {
    /// Tagged positional arrays (msgspec `array_like=True, tag=True`).
    Array,
    /// Maps keyed by field name, tag under `"type"`.
    #[default]
    Map,
}

impl KvEventsConfig {
    /// Parses the JSON of `--kv-events-config`.
    pub fn parse(json: &str) -> Result<Self, String> {
        let c: KvEventsConfig =
            serde_json::from_str(json).map_err(|e| format!("--kv-events-config: {e}"))?;
        if c.publisher != "zmq" {
            return Err(format!(
                "--kv-events-config: publisher `{}` is not simulated (only zmq)",
                c.publisher
            ));
        }
        for ep in std::iter::once(&c.endpoint).chain(c.replay_endpoint.as_ref()) {
            split_endpoint(ep)?;
        }
        Ok(c)
    }
}

/// `tcp://HOST:PORT` -> (host, port); `*` stays `*`.
pub(crate) fn split_endpoint(ep: &str) -> Result<(String, u16), String> {
    let rest = ep
        .strip_prefix("tcp://")
        .ok_or_else(|| format!("endpoint `{ep}`: only tcp:// is simulated"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("endpoint `{ep}`: no port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("endpoint `{ep}`: bad port"))?;
    Ok((host.to_owned(), port))
}

/// A change of one replica's prefix cache.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CacheEvent {
    /// Full blocks newly cached, in chain order; `parent` is the hash of the
    /// block before the first (none for a prompt's first block).
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        lora_name: Option<String>,
    },
    /// Blocks evicted (their hash dropped from the cache).
    Removed { hashes: Vec<u64> },
    /// Every cached block dropped (`/reset_prefix_cache`).
    Cleared,
    /// Not published: the replica restarted, so its publisher starts over
    /// (sequence 0, empty replay buffer), as a restarted vLLM does.
    Restarted,
}

/// Where the block pool sends its events (`None` when events are off).
pub(crate) type EventSink = Option<tokio::sync::mpsc::UnboundedSender<CacheEvent>>;

const MEDIUM: &str = "GPU";

/// Encodes one batch: `[ts, [events...], data_parallel_rank]`.
pub(crate) fn encode_batch(
    ts: f64,
    events: &[CacheEvent],
    enc: EventEncoding,
    int_hashes: bool,
    out: &mut Vec<u8>,
) {
    use rmp::encode::*;
    let published = events
        .iter()
        .filter(|e| !matches!(e, CacheEvent::Restarted));
    // Writing into a Vec cannot fail: the results below are infallible.
    let _ = write_array_len(out, 3);
    let _ = write_f64(out, ts);
    let _ = write_array_len(out, published.clone().count() as u32);
    for e in published {
        encode_event(e, enc, int_hashes, out);
    }
    let _ = write_uint(out, 0);
}

fn encode_event(e: &CacheEvent, enc: EventEncoding, int_hashes: bool, out: &mut Vec<u8>) {
    use rmp::encode::*;
    let map = enc == EventEncoding::Map;
    // Field name (map form only), then the value.
    let field = |out: &mut Vec<u8>, name: &str| {
        if map {
            let _ = write_str(out, name);
        }
    };
    let head = |out: &mut Vec<u8>, tag: &str, fields: u32| {
        if map {
            let _ = write_map_len(out, fields + 1);
            let _ = write_str(out, "type");
        } else {
            let _ = write_array_len(out, fields + 1);
        }
        let _ = write_str(out, tag);
    };
    match e {
        CacheEvent::Stored {
            hashes,
            parent,
            token_ids,
            block_size,
            lora_name,
        } => {
            head(out, "BlockStored", 6 + u32::from(lora_name.is_some()));
            field(out, "block_hashes");
            write_hashes(hashes, int_hashes, out);
            field(out, "parent_block_hash");
            match parent {
                Some(p) => write_hash(*p, int_hashes, out),
                None => {
                    let _ = write_nil(out);
                }
            }
            field(out, "token_ids");
            let _ = write_array_len(out, token_ids.len() as u32);
            for t in token_ids {
                let _ = write_uint(out, u64::from(*t));
            }
            field(out, "block_size");
            let _ = write_uint(out, u64::from(*block_size));
            field(out, "lora_id");
            let _ = write_nil(out);
            field(out, "medium");
            let _ = write_str(out, MEDIUM);
            if let Some(name) = lora_name {
                field(out, "lora_name");
                let _ = write_str(out, name);
            }
        }
        CacheEvent::Removed { hashes } => {
            head(out, "BlockRemoved", 2);
            field(out, "block_hashes");
            write_hashes(hashes, int_hashes, out);
            field(out, "medium");
            let _ = write_str(out, MEDIUM);
        }
        CacheEvent::Cleared | CacheEvent::Restarted => head(out, "AllBlocksCleared", 0),
    }
}

fn write_hashes(hashes: &[u64], int_hashes: bool, out: &mut Vec<u8>) {
    let _ = rmp::encode::write_array_len(out, hashes.len() as u32);
    for h in hashes {
        write_hash(*h, int_hashes, out);
    }
}

/// An integer, or 32 bytes (a sha256's size) ending in the hash big-endian.
fn write_hash(h: u64, int_hashes: bool, out: &mut Vec<u8>) {
    if int_hashes {
        let _ = rmp::encode::write_uint(out, h);
    } else {
        let _ = rmp::encode::write_bin_len(out, 32);
        let filler = h.rotate_left(17) ^ 0x5bd1_e995_5bd1_e995;
        for _ in 0..3 {
            out.extend_from_slice(&filler.to_le_bytes());
        }
        out.extend_from_slice(&h.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> CacheEvent {
        CacheEvent::Stored {
            hashes: vec![1, u64::MAX],
            parent: None,
            token_ids: vec![7, 8],
            block_size: 1,
            lora_name: None,
        }
    }

    /// The bytes per the spec, written out by hand.
    #[test]
    fn array_encoding_matches_the_spec_bytes() {
        let mut out = Vec::new();
        encode_batch(0.5, &[stored()], EventEncoding::Array, true, &mut out);
        let mut want = vec![0x93, 0xcb];
        want.extend_from_slice(&0.5f64.to_be_bytes());
        want.push(0x91); // one event
        want.push(0x97); // tag + 6 fields
        want.push(0xab);
        want.extend_from_slice(b"BlockStored");
        want.extend_from_slice(&[0x92, 0x01, 0xcf]);
        want.extend_from_slice(&u64::MAX.to_be_bytes());
        want.extend_from_slice(&[0xc0, 0x92, 0x07, 0x08, 0x01, 0xc0, 0xa3]);
        want.extend_from_slice(b"GPU");
        want.push(0x00); // data_parallel_rank
        assert_eq!(out, want);
    }

    #[test]
    fn map_encoding_names_fields_and_bytes_hashes_end_in_the_hash() {
        let mut out = Vec::new();
        encode_batch(
            1.0,
            &[CacheEvent::Removed {
                hashes: vec![0x0102],
            }],
            EventEncoding::Map,
            false,
            &mut out,
        );
        // map of 3: type, block_hashes, medium
        assert_eq!(out[11], 0x83);
        let bin = out
            .windows(2)
            .position(|w| w == [0xc4, 32])
            .expect("bin 32");
        assert_eq!(&out[bin + 2 + 24..bin + 2 + 32], &0x0102u64.to_be_bytes());
        assert!(out.windows(12).any(|w| w == b"BlockRemoved"));
        assert!(out.windows(12).any(|w| w == b"block_hashes"));
    }

    #[test]
    fn config_parses_vllm_json() {
        let c = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv@x@m"}"#,
        )
        .unwrap();
        assert!(c.enable_kv_cache_events);
        assert_eq!(split_endpoint(&c.endpoint).unwrap(), ("*".into(), 5557));
        assert_eq!(c.topic, "kv@x@m");
        assert!(KvEventsConfig::parse(r#"{"publisher":"lmcache"}"#).is_err());
        assert!(KvEventsConfig::parse(r#"{"endpoint":"ipc:///x"}"#).is_err());
    }
}
