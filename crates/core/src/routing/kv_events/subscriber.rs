//! Following each replica's KV-event stream into the pool's precise index.
//!
//! A supervisor follows the pool's membership channel (as the scrape loops
//! do): a task per replica, stopped and its entries dropped when the replica
//! leaves. A replica's task connects a SUB socket to `host:port` of the
//! replica, first replays the publisher's buffer from sequence 0 (what the
//! engine cached before we listened), then applies each batch in sequence:
//! - a gap (sequence ahead of the next expected) is filled by a replay from
//!   the ROUTER socket; a gap that cannot be filled clears the replica (its
//!   entries could hold blocks long evicted);
//! - a sequence behind the expected one, outside a just-replayed range, means
//!   the engine restarted (its sequence starts again at 0): the replica is
//!   cleared and followed anew; so is an `AllBlocksCleared`;
//! - with no message for `heartbeat_ms`, a replay from the last sequence
//!   applied is a heartbeat (a probe): the publisher answers (possibly with
//!   missed batches) or not. The same publisher still buffers that batch; one
//!   whose answer lacks it started its sequence over, so the engine restarted
//!   with an empty cache even if it has stored nothing since (it sends no
//!   event until it does): the replica is cleared then, within a heartbeat,
//!   not at its first new event. A reconnect after the stream broke probes the
//!   same way before trusting the old entries.
//!
//! A replica is *live* (its entries route) while its stream is confirmed
//! within `stale_after_ms`; without a replay socket, also while it has been
//! sent no request since the last event. Otherwise routing uses the
//! approximate index for it (`infergate_prefix_index_replicas{pool,index}`
//! counts each, and `/routing` names the index per replica).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio::time::{timeout, MissedTickBehavior};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::decode::{decode_batch, KvEvent};
use super::index::PreciseIndex;
use super::KvEventsConfig;
use crate::pool::{Pool, Replica};

/// The end-of-replay marker's sequence (-1).
const END_SEQ: u64 = u64::MAX;
/// Wait between connection attempts.
const RECONNECT: Duration = Duration::from_millis(500);

/// Stops the supervisor (and with it every replica task) when dropped.
#[derive(Debug)]
pub struct KvEventsHandle {
    supervisor: JoinHandle<()>,
}

impl Drop for KvEventsHandle {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

/// Starts following `pool`'s replicas into `index` (inside a tokio runtime);
/// the gateway does this for every pool whose routing sets `kv_events`.
pub fn follow_pool(
    pool: Arc<Pool>,
    index: Arc<PreciseIndex>,
    cfg: KvEventsConfig,
) -> KvEventsHandle {
    KvEventsHandle {
        supervisor: tokio::spawn(supervise(pool, index, cfg)),
    }
}

/// Aborts a task when dropped.
struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Aborts the replica tasks when the supervisor is aborted.
struct Tasks(HashMap<Arc<str>, (Arc<Replica>, JoinHandle<()>)>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, (_, h)) in self.0.drain() {
            h.abort();
        }
    }
}

async fn supervise(pool: Arc<Pool>, index: Arc<PreciseIndex>, cfg: KvEventsConfig) {
    let mut tasks = Tasks(HashMap::new());
    // The engine-token fetcher lives as long as the subscribers.
    let _tokens = index
        .engine_tokens()
        .map(|t| TaskGuard(tokio::spawn(t.clone().run(pool.clone()))));
    let mut membership = pool.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let current = membership.borrow_and_update().clone();
        tasks.0.retain(|key, (r, h)| {
            let kept = current
                .iter()
                .any(|c| Arc::ptr_eq(c, r) && c.key() == &**key);
            if !kept {
                h.abort();
                index.remove_replica(key);
            }
            kept
        });
        for r in current.iter() {
            if !tasks.0.contains_key(r.key()) {
                let h = tokio::spawn(follow(
                    r.clone(),
                    index.clone(),
                    cfg.clone(),
                    pool.name.clone(),
                ));
                tasks.0.insert(r.endpoint.key.clone(), (r.clone(), h));
            }
        }
        loop {
            tokio::select! {
                changed = membership.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = tick.tick() => {
                    let live = current.iter().filter(|r| index.is_live(r.key())).count();
                    let pool_name = pool.name.to_string();
                    metrics::gauge!("infergate_prefix_index_replicas", "pool" => pool_name.clone(), "index" => "precise").set(live as f64);
                    metrics::gauge!("infergate_prefix_index_replicas", "pool" => pool_name, "index" => "approximate").set((current.len() - live) as f64);
                }
            }
        }
    }
}

/// `tcp://host:port` of the replica's publisher and replay socket.
fn endpoints(replica: &Replica, cfg: &KvEventsConfig) -> Option<(String, Option<String>)> {
    if let Some(ev) = cfg.endpoints.get(replica.key()) {
        return Some((ev.endpoint.clone(), ev.replay_endpoint.clone()));
    }
    let uri: http::Uri = replica.endpoint.base_url.parse().ok()?;
    let host = uri.host()?;
    let http_port = i64::from(uri.port_u16().unwrap_or(80));
    let port = |fixed: Option<u16>, offset: Option<i32>| -> Option<Option<u16>> {
        match (offset, fixed) {
            (Some(d), _) => u16::try_from(http_port + i64::from(d)).ok().map(Some),
            (None, Some(p)) => Some(Some(p)),
            (None, None) => Some(None),
        }
    };
    let publ = port(Some(cfg.port), cfg.port_offset)??;
    let replay = port(cfg.replay_port, cfg.replay_port_offset)?;
    let ep = |p: u16| format!("tcp://{host}:{p}");
    Some((ep(publ), replay.map(ep)))
}

/// One replica's stream state.
struct Stream {
    key: Arc<str>,
    index: Arc<PreciseIndex>,
    pool: String,
    replica: Arc<Replica>,
    expected: Option<u64>,
    /// Sequences just delivered by a replay (the SUB socket may repeat them).
    replayed: Option<(u64, u64)>,
    /// The first sequence of the last replay's answer.
    reply_first: Option<u64>,
    last_confirm: Instant,
    started_at_confirm: u64,
    /// When a request was first sent since the last confirmation.
    unconfirmed_since: Option<Instant>,
    dealer: Option<DealerSocket>,
    replay_ep: Option<String>,
    replay_timeout: Duration,
}

async fn follow(
    replica: Arc<Replica>,
    index: Arc<PreciseIndex>,
    cfg: KvEventsConfig,
    pool: Arc<str>,
) {
    let key = replica.endpoint.key.clone();
    let Some((pub_ep, replay_ep)) = endpoints(&replica, &cfg) else {
        tracing::warn!(replica = %key, "kv events: cannot derive the event endpoint from the replica URL");
        return;
    };
    let stale_after = Duration::from_millis(cfg.stale_after_ms.max(1));
    let heartbeat = Duration::from_millis(cfg.heartbeat_ms.max(1));
    // Carried over reconnects: the entries applied so far are checked by a
    // probe, not trusted blindly nor dropped.
    let mut expected = None;
    loop {
        index.set_live(&key, false);
        let mut sub = SubSocket::new();
        let connected = timeout(RECONNECT * 4, sub.connect(&pub_ep)).await;
        if !matches!(connected, Ok(Ok(()))) || sub.subscribe(&cfg.topic).await.is_err() {
            tracing::debug!(replica = %key, endpoint = %pub_ep, "kv events: cannot connect");
            tokio::time::sleep(RECONNECT).await;
            continue;
        }
        let mut st = Stream {
            key: key.clone(),
            index: index.clone(),
            pool: pool.to_string(),
            replica: replica.clone(),
            expected,
            replayed: None,
            reply_first: None,
            last_confirm: Instant::now(),
            started_at_confirm: replica.load.started(),
            unconfirmed_since: None,
            dealer: None,
            replay_ep: replay_ep.clone(),
            replay_timeout: Duration::from_millis(cfg.replay_timeout_ms.max(1)),
        };
        // What the engine cached before we listened, as far as its buffer
        // goes; after a reconnect, whether it is still the same publisher.
        if st.replay_ep.is_some() && !st.probe().await {
            expected = st.expected;
            tokio::time::sleep(RECONNECT).await;
            continue;
        }
        let mut tick = tokio::time::interval(
            heartbeat
                .min(stale_after / 2)
                .max(Duration::from_millis(10)),
        );
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = sub.recv() => match msg {
                    Ok(msg) => st.on_message(msg).await,
                    Err(e) => {
                        tracing::debug!(replica = %key, error = %e, "kv events: stream broke");
                        break;
                    }
                },
                _ = tick.tick() => {
                    let quiet = st.last_confirm.elapsed();
                    if quiet >= heartbeat && st.replay_ep.is_some() {
                        st.probe().await;
                    }
                    st.judge(stale_after);
                }
            }
        }
        expected = st.expected;
    }
}

impl Stream {
    fn confirm(&mut self) {
        self.last_confirm = Instant::now();
        self.started_at_confirm = self.replica.load.started();
        self.unconfirmed_since = None;
    }

    /// Decides whether routing may trust this replica's entries now.
    fn judge(&mut self, stale_after: Duration) {
        if self.replica.load.started() > self.started_at_confirm {
            self.unconfirmed_since.get_or_insert_with(Instant::now);
        }
        let recent = self.last_confirm.elapsed() < stale_after;
        let idle_ok = self.replay_ep.is_none()
            && self
                .unconfirmed_since
                .is_none_or(|t| t.elapsed() < stale_after);
        let live = recent || idle_ok;
        if live != self.index.is_live(&self.key) {
            tracing::info!(replica = %self.key, live, "kv events: replica's precise index {}", if live { "in use" } else { "stale: approximate index in use" });
        }
        self.index.set_live(&self.key, live);
    }

    async fn on_message(&mut self, msg: ZmqMessage) {
        let frames = msg.into_vec();
        let [_topic, seq, payload, ..] = frames.as_slice() else {
            return;
        };
        let Ok(seq) = <[u8; 8]>::try_from(seq.as_ref()).map(u64::from_be_bytes) else {
            return;
        };
        match self.expected {
            Some(e) if seq < e => {
                if self
                    .replayed
                    .is_some_and(|(lo, hi)| (lo..=hi).contains(&seq))
                {
                    return; // already applied from a replay
                }
                tracing::info!(replica = %self.key, seq, expected = e, "kv events: sequence went back (engine restarted): replica cleared");
                self.index.clear_replica(&self.key);
                self.expected = None;
                if seq > 0 && self.replay_ep.is_some() && self.replay(0).await {
                    return;
                }
            }
            Some(e) if seq > e => {
                metrics::counter!("infergate_kv_events_gaps_total", "pool" => self.pool.clone())
                    .increment(1);
                if self.replay_ep.is_none()
                    || !self.replay(e).await
                    || self.expected.is_some_and(|x| x <= e)
                {
                    tracing::info!(replica = %self.key, from = e, to = seq, "kv events: lost events could not be replayed: replica cleared");
                    self.index.clear_replica(&self.key);
                }
                if self.expected.is_some_and(|x| x > seq) {
                    return; // the replay covered this one
                }
            }
            _ => {}
        }
        // Past what the last replay delivered: the SUB socket has caught up,
        // so a lower sequence from now on is a restart, not a repeat.
        if self.replayed.is_some_and(|(_, hi)| seq > hi) {
            self.replayed = None;
        }
        self.apply(seq, payload);
    }

    fn apply(&mut self, seq: u64, payload: &Bytes) {
        match decode_batch(payload) {
            Ok(batch) => {
                self.index.apply(&self.key, &batch.events);
                let n = batch.events.len() as u64;
                metrics::counter!("infergate_kv_events_applied_total", "pool" => self.pool.clone())
                    .increment(n);
                if batch.events.iter().any(|e| matches!(e, KvEvent::Cleared)) {
                    tracing::debug!(replica = %self.key, "kv events: all blocks cleared");
                }
            }
            Err(e) => {
                // Its changes are lost: entries may now be wrong.
                tracing::warn!(replica = %self.key, seq, error = %e, "kv events: undecodable batch: replica cleared");
                metrics::counter!("infergate_kv_events_decode_errors_total", "pool" => self.pool.clone()).increment(1);
                self.index.clear_replica(&self.key);
            }
        }
        self.expected = Some(seq + 1);
        self.confirm();
    }

    /// The heartbeat: replays from the last batch applied (from 0 before
    /// any). A publisher that answers without that batch has started its
    /// sequence over (vLLM's keeps its last `buffer_steps` batches, so the
    /// same process still has it): the engine restarted and its cache is
    /// empty, whatever it has published since. The replica is cleared and
    /// followed anew from the new publisher's buffer. True when the publisher
    /// answered.
    async fn probe(&mut self) -> bool {
        let Some(last) = self.expected.and_then(|e| e.checked_sub(1)) else {
            return self.replay(0).await;
        };
        let answered = self.replay(last).await;
        match self.reply_first {
            Some(f) if f == last => return answered,
            None if !answered => return false,
            // An empty answer, or one starting later (the batch fell out of
            // the buffer: what it and those before it stored is unknown).
            _ => {}
        }
        tracing::info!(replica = %self.key, last, "kv events: the publisher no longer has the last batch applied (engine restarted): replica cleared");
        metrics::counter!("infergate_kv_events_restarts_total", "pool" => self.pool.clone())
            .increment(1);
        self.index.clear_replica(&self.key);
        self.expected = None;
        self.replayed = None;
        self.replay(0).await
    }

    /// Asks the replay socket for every batch from `from` on and applies
    /// those not yet applied. True when the publisher answered to the end.
    async fn replay(&mut self, from: u64) -> bool {
        let Some(ep) = self.replay_ep.clone() else {
            return false;
        };
        let ok = self.replay_inner(&ep, from).await;
        let outcome = if ok { "ok" } else { "failed" };
        metrics::counter!("infergate_kv_events_replays_total", "pool" => self.pool.clone(), "outcome" => outcome).increment(1);
        if !ok {
            // A late answer must not be read as the next replay's.
            self.dealer = None;
        }
        ok
    }

    async fn replay_inner(&mut self, ep: &str, from: u64) -> bool {
        self.reply_first = None;
        if self.dealer.is_none() {
            let mut d = DealerSocket::new();
            if !matches!(
                timeout(self.replay_timeout, d.connect(ep)).await,
                Ok(Ok(()))
            ) {
                return false;
            }
            self.dealer = Some(d);
        }
        let Some(d) = self.dealer.as_mut() else {
            return false;
        };
        let mut req = ZmqMessage::from(Bytes::new());
        req.push_back(Bytes::copy_from_slice(&from.to_be_bytes()));
        if !matches!(timeout(self.replay_timeout, d.send(req)).await, Ok(Ok(()))) {
            return false;
        }
        let mut got: Vec<(u64, Bytes)> = Vec::new();
        loop {
            let Ok(Ok(msg)) = timeout(self.replay_timeout, d.recv()).await else {
                return false;
            };
            let frames = msg.into_vec();
            let n = frames.len();
            if n < 2 {
                continue;
            }
            let Ok(seq) = <[u8; 8]>::try_from(frames[n - 2].as_ref()).map(u64::from_be_bytes)
            else {
                continue;
            };
            if seq == END_SEQ {
                break;
            }
            got.push((seq, frames[n - 1].clone()));
        }
        let first = got.first().map(|(s, _)| *s);
        let last = got.last().map(|(s, _)| *s);
        self.reply_first = first;
        // From 0 (catching up at start or after a restart): whatever the
        // buffer still has. Otherwise it must start where we asked.
        if from > 0 && first.is_some_and(|f| f > from) {
            return false;
        }
        for (seq, payload) in &got {
            if self.expected.is_none_or(|e| *seq >= e) {
                self.apply(*seq, payload);
            }
        }
        if let (Some(lo), Some(hi)) = (first, last) {
            self.replayed = Some((lo, hi));
        }
        self.confirm();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Endpoint;
    use crate::routing::kv_events::ReplicaEvents;

    #[test]
    fn endpoints_follow_the_port_rules() {
        let r = Replica::new(Endpoint::from_url("http://10.0.0.7:8000").unwrap());
        let mut cfg = KvEventsConfig::default();
        assert_eq!(
            endpoints(&r, &cfg),
            Some(("tcp://10.0.0.7:5557".into(), None))
        );
        cfg.replay_port = Some(5558);
        cfg.port_offset = Some(1000);
        assert_eq!(
            endpoints(&r, &cfg),
            Some((
                "tcp://10.0.0.7:9000".into(),
                Some("tcp://10.0.0.7:5558".into())
            ))
        );
        cfg.port_offset = Some(-9000);
        assert_eq!(endpoints(&r, &cfg), None, "no port below 0");
        cfg.endpoints.insert(
            "10.0.0.7:8000".into(),
            ReplicaEvents {
                endpoint: "tcp://h:1".into(),
                replay_endpoint: None,
            },
        );
        assert_eq!(endpoints(&r, &cfg), Some(("tcp://h:1".into(), None)));
    }
}
