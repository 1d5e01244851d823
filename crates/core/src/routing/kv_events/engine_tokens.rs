//! The engine's own token ids for a prompt, so the precise index's keys come
//! from the ids the engine itself hashed (`routing.kv_events.tokenize`).
//!
//! A real engine tokenizes with its model's tokenizer and chat template, not
//! with the gateway's token rule, so keys recomputed from the gateway's text
//! would never meet the keys of the engine's `BlockStored` token ids. The ids
//! are fetched from the engine (vLLM: `POST /tokenize` with `messages` or
//! `prompt`; llama.cpp: `POST /apply-template`, then `POST /tokenize`) by a
//! background task, never on the request path, and cached per message
//! prefix: a chat template ends every message with a special token, which a
//! tokenizer never merges across, so the ids of `messages[..k]` (without the
//! generation prompt) are a prefix of the ids of every longer conversation
//! starting with them. A request takes the longest cached prefix of its
//! messages; with none, it is routed by the approximate index and its
//! prefixes are queued for fetching (its first message, usually the shared
//! system prompt, and the whole conversation so far, which the next turn
//! extends). A completion prompt has no message boundaries: it is cached
//! whole.
//!
//! The messages are read back from the gateway's rendered prompt
//! (`protocol::prompt::render_chat`: `<|role|>\ncontent\n` per message, then
//! `<|assistant|>\n`), so the request path passes nothing new; a message whose
//! content itself contains a rendered role line is split there, which only
//! costs precision (a key that never matches), never a wrong route.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use xxhash_rust::xxh3::Xxh3;

use infergate_protocol::tokenizer::token_block_key;

use crate::pool::Pool;

/// Largest tokenize answer read (ids of a very long prompt as JSON).
const MAX_REPLY: usize = 16 << 20;
/// Roles `render_chat` writes that start a message.
const ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "tool",
    "developer",
    "function",
];
use infergate_protocol::prompt::GENERATION_PROMPT as GEN_PROMPT;

/// Which engine API answers token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizeApi {
    /// `POST /tokenize` with `messages` (chat template applied) or `prompt`
    /// (vLLM; `infergate sim` serves the same).
    Vllm,
    /// `POST /apply-template`, then `POST /tokenize` (llama.cpp's server).
    LlamaCpp,
}

/// `routing.kv_events.tokenize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    pub api: TokenizeApi,
    /// Message prefixes whose ids are kept (least recently used go first).
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Prefixes waiting to be fetched at most; more are dropped (and asked
    /// for again by a later request).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Tokenize calls in flight at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_cache_entries() -> usize {
    2048
}
fn default_queue() -> usize {
    256
}
fn default_in_flight() -> usize {
    4
}
fn default_timeout_ms() -> u64 {
    2000
}

/// One prefix to fetch.
#[derive(Debug, Clone)]
struct Job {
    key: u64,
    model: String,
    what: Prompt,
}

/// What to tokenize: messages (role, text) without the generation prompt, or
/// a completion prompt.
#[derive(Debug, Clone)]
enum Prompt {
    Messages(Vec<(String, String)>),
    Text(String),
}

/// A fetched prefix: the engine's ids and, once asked, their block keys.
#[derive(Debug)]
pub struct Entry {
    ids: Vec<u32>,
    /// (block size, seed, keys of every full block).
    keys: OnceLock<(usize, u64, Vec<u64>)>,
}

impl Entry {
    /// Keys of the entry's full `block_size`-token blocks chained from
    /// `seed` (`tokenizer::token_block_key`, as the precise index computes
    /// them from a `BlockStored`'s ids), at most `max`.
    pub fn keys(&self, block_size: usize, seed: u64, max: usize) -> Cow<'_, [u64]> {
        let compute = || {
            let mut parent = seed;
            self.ids
                .chunks_exact(block_size.max(1))
                .map(|c| {
                    parent = token_block_key(parent, c);
                    parent
                })
                .collect::<Vec<u64>>()
        };
        let (bs, sd, keys) = self.keys.get_or_init(|| (block_size, seed, compute()));
        if (*bs, *sd) == (block_size, seed) {
            Cow::Borrowed(&keys[..keys.len().min(max)])
        } else {
            let mut k = compute();
            k.truncate(max);
            Cow::Owned(k)
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<u64, (Arc<Entry>, u64)>,
    /// Queued or in flight.
    pending: HashSet<u64>,
    tick: u64,
}

/// Counters shown on `/routing` and as metrics.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fetched: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
}

/// What [`EngineTokens::stats`] reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EngineTokensStats {
    pub api: TokenizeApi,
    pub entries: usize,
    /// Token ids held over all entries (4 bytes each).
    pub tokens: usize,
    /// Requests that found a cached prefix of theirs / found none.
    pub hits: u64,
    pub misses: u64,
    pub fetched: u64,
    pub errors: u64,
    /// Prefixes not queued (the queue was full).
    pub dropped: u64,
}

/// The per-pool cache of engine token ids, and its fetch queue.
#[derive(Debug)]
pub struct EngineTokens {
    cfg: TokenizeConfig,
    cache: Mutex<Cache>,
    counters: Counters,
    tx: mpsc::Sender<Job>,
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
}

/// A prompt's message prefixes: (end offset in the rendered text, hash of
/// the text up to there), shortest first; the last is the whole prompt.
struct Prefixes {
    chat: bool,
    ends: Vec<(usize, u64)>,
}

impl EngineTokens {
    pub fn new(cfg: TokenizeConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        EngineTokens {
            cfg,
            cache: Mutex::new(Cache::default()),
            counters: Counters::default(),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest cached prefix of `prompt` (the rendered prompt of a
    /// request for `model`); queues the prefixes worth fetching that are
    /// neither cached nor queued. Never waits for an engine.
    pub fn lookup(&self, model: &str, prompt: &str) -> Option<Arc<Entry>> {
        let p = prefixes(model, prompt);
        let (found, wanted) = {
            let mut c = self.lock();
            c.tick += 1;
            let tick = c.tick;
            let mut found = None;
            for &(_, h) in p.ends.iter().rev() {
                if let Some((e, used)) = c.entries.get_mut(&h) {
                    *used = tick;
                    found = Some(e.clone());
                    break;
                }
            }
            // The first message (the prefix others share) and the whole
            // conversation (which the next turn extends).
            let mut wanted: Vec<usize> = Vec::with_capacity(2);
            for i in [0, p.ends.len().saturating_sub(1)] {
                let h = p.ends.get(i).map(|e| e.1);
                if let Some(h) = h {
                    if !wanted.contains(&i) && !c.entries.contains_key(&h) && c.pending.insert(h) {
                        wanted.push(i);
                    }
                }
            }
            (found, wanted)
        };
        let counter = if found.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        for i in wanted {
            let (end, key) = p.ends[i];
            let what = if p.chat {
                Prompt::Messages(parse_messages(&prompt[..end]))
            } else {
                Prompt::Text(prompt.to_string())
            };
            let job = Job {
                key,
                model: model.to_string(),
                what,
            };
            if self.tx.try_send(job).is_err() {
                self.lock().pending.remove(&key);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        found
    }

    fn insert(&self, key: u64, ids: Vec<u32>) {
        let mut c = self.lock();
        c.pending.remove(&key);
        c.tick += 1;
        let tick = c.tick;
        if c.entries.len() >= self.cfg.cache_entries.max(1) && !c.entries.contains_key(&key) {
            // Evict the least recently used (a scan: this runs per fetch, off
            // the request path).
            if let Some(old) = c
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            {
                c.entries.remove(&old);
            }
        }
        c.entries.insert(
            key,
            (
                Arc::new(Entry {
                    ids,
                    keys: OnceLock::new(),
                }),
                tick,
            ),
        );
    }

    pub fn stats(&self) -> EngineTokensStats {
        let (entries, tokens) = {
            let c = self.lock();
            let tokens = c.entries.values().map(|(e, _)| e.ids.len()).sum();
            (c.entries.len(), tokens)
        };
        let c = &self.counters;
        EngineTokensStats {
            api: self.cfg.api,
            entries,
            tokens,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            fetched: c.fetched.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Fetches queued prefixes from `pool`'s replicas (one after another,
    /// round robin) until the pool's membership channel closes; exports the
    /// counters as metrics every second. Runs once per cache (a second call
    /// returns at once).
    pub async fn run(self: Arc<Self>, pool: Arc<Pool>) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let limit = Arc::new(Semaphore::new(self.cfg.max_in_flight.max(1)));
        let mut next = 0usize;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let pool_name = pool.name.to_string();
        loop {
            let job = tokio::select! {
                job = rx.recv() => match job {
                    Some(j) => j,
                    None => return,
                },
                _ = tick.tick() => {
                    self.export(&pool_name);
                    continue;
                }
            };
            let members = pool.replicas();
            let Some(replica) = members.get(next % members.len().max(1)).cloned() else {
                self.lock().pending.remove(&job.key);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            next = next.wrapping_add(1);
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (me, client) = (self.clone(), client.clone());
            let base = replica.endpoint.base_url.to_string();
            tokio::spawn(async move {
                let timeout = Duration::from_millis(me.cfg.timeout_ms.max(1));
                let got = tokio::time::timeout(timeout, fetch(&client, &base, me.cfg.api, &job))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                match got {
                    Ok(ids) => {
                        me.counters.fetched.fetch_add(1, Ordering::Relaxed);
                        me.insert(job.key, ids);
                    }
                    Err(e) => {
                        tracing::debug!(replica = %base, error = %e, "tokenize failed");
                        me.counters.errors.fetch_add(1, Ordering::Relaxed);
                        me.lock().pending.remove(&job.key);
                    }
                }
                drop(permit);
            });
        }
    }

    fn export(&self, pool: &str) {
        let s = self.stats();
        let p = pool.to_string();
        metrics::gauge!("infergate_engine_tokens_entries", "pool" => p.clone())
            .set(s.entries as f64);
        for (outcome, v) in [("hit", s.hits), ("miss", s.misses)] {
            metrics::counter!("infergate_engine_tokens_lookups_total", "pool" => p.clone(), "outcome" => outcome).absolute(v);
        }
        for (outcome, v) in [
            ("ok", s.fetched),
            ("error", s.errors),
            ("dropped", s.dropped),
        ] {
            metrics::counter!("infergate_engine_tokens_fetches_total", "pool" => p.clone(), "outcome" => outcome).absolute(v);
        }
    }
}

/// The message prefixes of a rendered prompt (see the module doc).
fn prefixes(model: &str, prompt: &str) -> Prefixes {
    let seed = infergate_protocol::tokenizer::model_seed(model);
    let mut h = Xxh3::with_seed(seed);
    let chat = prompt.ends_with(GEN_PROMPT) && role_at(prompt, 0).is_some();
    if !chat {
        // Salted apart from any chat prefix.
        h.update(b"\0prompt\0");
        h.update(prompt.as_bytes());
        return Prefixes {
            chat,
            ends: vec![(prompt.len(), h.digest())],
        };
    }
    let body = &prompt[..prompt.len() - GEN_PROMPT.len()];
    let mut ends = Vec::new();
    let mut from = 0;
    for end in message_ends(body) {
        h.update(&body.as_bytes()[from..end]);
        from = end;
        ends.push((end, h.digest()));
    }
    Prefixes { chat, ends }
}

/// The role of a rendered role line `<|role|>\n` starting at `at`, and where
/// its content starts.
fn role_at(text: &str, at: usize) -> Option<(&str, usize)> {
    let rest = text.get(at..)?.strip_prefix("<|")?;
    ROLES.iter().find_map(|r| {
        rest.strip_prefix(r)
            .and_then(|x| x.strip_prefix("|>\n"))
            .map(|_| (*r, at + 2 + r.len() + 3))
    })
}

/// End offsets of each rendered message (`<|role|>\ncontent\n`) of `body`.
fn message_ends(body: &str) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    while let Some((_, content)) = role_at(body, at) {
        // The message ends at the newline before the next role line, or at the end.
        let mut search = content;
        let end = loop {
            match body[search..].find("\n<|") {
                Some(i) if role_at(body, search + i + 1).is_some() => break search + i + 1,
                Some(i) => search += i + 1,
                None => break body.len(),
            }
        };
        ends.push(end);
        at = end;
    }
    ends
}

/// The (role, content) messages of a rendered body.
fn parse_messages(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut at = 0;
    for end in message_ends(body) {
        if let Some((role, content)) = role_at(body, at) {
            let text = body[content..end]
                .strip_suffix('\n')
                .unwrap_or(&body[content..end]);
            out.push((role.to_string(), text.to_string()));
        }
        at = end;
    }
    out
}

/// One tokenize exchange for `job` with the replica at `base`.
async fn fetch(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    api: TokenizeApi,
    job: &Job,
) -> Result<Vec<u32>, String> {
    let messages = |m: &[(String, String)]| -> Value {
        m.iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect()
    };
    match (api, &job.what) {
        (TokenizeApi::Vllm, Prompt::Messages(m)) => {
            let body = json!({"model": job.model, "messages": messages(m), "add_generation_prompt": false});
            ids_of(&post(client, base, "/tokenize", &body).await?)
        }
        (TokenizeApi::Vllm, Prompt::Text(t)) => {
            let body = json!({"model": job.model, "prompt": t});
            ids_of(&post(client, base, "/tokenize", &body).await?)
        }
        (TokenizeApi::LlamaCpp, what) => {
            let (content, special) = match what {
                Prompt::Messages(m) => {
                    let body = json!({"messages": messages(m), "add_generation_prompt": false});
                    let v = post(client, base, "/apply-template", &body).await?;
                    let p = v
                        .get("prompt")
                        .and_then(Value::as_str)
                        .ok_or("apply-template answered no prompt")?
                        .to_string();
                    // The template wrote the special tokens as text.
                    (p, false)
                }
                Prompt::Text(t) => (t.clone(), true),
            };
            let body = json!({"content": content, "add_special": special, "parse_special": true});
            ids_of(&post(client, base, "/tokenize", &body).await?)
        }
    }
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    path: &str,
    body: &Value,
) -> Result<Value, String> {
    let uri: http::Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("{base}{path}: {e}"))?;
    let req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{path}: {status}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{path}: {e}"))
}

/// `tokens` of a tokenize answer: ids (vLLM, llama.cpp) or `{id, piece}`
/// objects (llama.cpp with pieces).
fn ids_of(v: &Value) -> Result<Vec<u32>, String> {
    let arr = v
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or("no tokens in the answer")?;
    arr.iter()
        .map(|t| {
            t.as_u64()
                .or_else(|| t.get("id").and_then(Value::as_u64))
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("not a token id: {t}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_protocol::prompt::{render_chat, ChatMessage};

    fn chat(msgs: &[(&str, &str)]) -> String {
        let m: Vec<ChatMessage> = msgs
            .iter()
            .map(|(r, c)| ChatMessage {
                role: r.to_string(),
                content: Value::String(c.to_string()),
            })
            .collect();
        render_chat(&m)
    }

    #[test]
    fn messages_are_read_back_from_the_rendered_prompt() {
        let msgs = [
            ("system", "You are terse.\nTwo lines."),
            ("user", "hi <|user|> not a role line"),
            ("assistant", "hello"),
            ("user", "again"),
        ];
        let p = chat(&msgs);
        let body = &p[..p.len() - GEN_PROMPT.len()];
        let back = parse_messages(body);
        let want: Vec<(String, String)> = msgs
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect();
        assert_eq!(back, want);
        // Each prefix's hash is the hash of the rendered shorter conversation.
        let full = prefixes("m", &p);
        assert!(full.chat);
        assert_eq!(full.ends.len(), 4);
        for k in 1..=4 {
            let shorter = prefixes("m", &chat(&msgs[..k]));
            assert_eq!(shorter.ends.last(), full.ends.get(k - 1), "k={k}");
        }
        // Another model: other keys. A completion prompt: one entry.
        assert_ne!(prefixes("n", &p).ends[0].1, full.ends[0].1);
        let c = prefixes("m", "plain completion text");
        assert!(!c.chat);
        assert_eq!(c.ends.len(), 1);
    }

    #[test]
    fn lookup_takes_the_longest_cached_prefix_and_queues_the_rest() {
        let t = EngineTokens::new(TokenizeConfig {
            api: TokenizeApi::Vllm,
            cache_entries: 2,
            queue: 8,
            max_in_flight: 1,
            timeout_ms: 100,
        });
        let conv = [("system", "shared"), ("user", "q1")];
        let p = chat(&conv);
        assert!(t.lookup("m", &p).is_none());
        // Queued: the system prompt and the whole conversation, once.
        assert!(t.lookup("m", &p).is_none());
        let mut rx = t.rx.lock().unwrap().take().unwrap();
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert!(rx.try_recv().is_err());
        let Prompt::Messages(m) = &a.what else {
            panic!()
        };
        assert_eq!(m.len(), 1);
        let Prompt::Messages(m) = &b.what else {
            panic!()
        };
        assert_eq!(m.len(), 2);
        // The system prompt arrives: another user's question finds it.
        t.insert(a.key, (0..40).collect());
        let other = chat(&[("system", "shared"), ("user", "q2")]);
        let e = t.lookup("m", &other).expect("system prompt cached");
        assert_eq!(e.ids().len(), 40);
        assert_eq!(e.keys(16, 0, usize::MAX).len(), 2);
        assert_eq!(e.keys(16, 0, 1).len(), 1);
        assert_eq!(
            e.keys(16, 0, 9)[1],
            token_block_key(e.keys(16, 0, 9)[0], &(16..32).collect::<Vec<u32>>())
        );
        // The whole conversation arrives: it wins over the system prompt.
        t.insert(b.key, (0..50).collect());
        assert_eq!(t.lookup("m", &p).unwrap().ids().len(), 50);
        // Bounded: a third entry evicts the least recently used (the system prompt).
        t.insert(7, vec![1]);
        assert_eq!(t.stats().entries, 2);
        assert!(t.lookup("m", &other).is_none());
        let s = t.stats();
        assert_eq!((s.hits, s.misses), (2, 3));
    }

    #[test]
    fn token_ids_are_read_from_either_answer_form() {
        assert_eq!(
            ids_of(&json!({"tokens": [1, 2, 3], "count": 3})).unwrap(),
            [1, 2, 3]
        );
        assert_eq!(
            ids_of(&json!({"tokens": [{"id": 5, "piece": "a"}]})).unwrap(),
            [5]
        );
        assert!(ids_of(&json!({"tokens": [-1]})).is_err());
        assert!(ids_of(&json!({})).is_err());
    }
}
