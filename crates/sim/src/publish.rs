//! One replica's KV-event publisher, as vLLM's `ZmqEventPublisher`: a PUB
//! socket sending `[topic, seq as 8 bytes big-endian, msgpack batch]` and a
//! ROUTER socket answering a replay request `[start seq]` with every buffered
//! `[seq, batch]` from there on, then `[-1 as 8 bytes, empty]`.
//!
//! Events arrive from the replica's block pool over a channel; everything
//! queued when the task wakes becomes one batch (vLLM batches per step). The
//! last `buffer_steps` batches are kept for replay. Test hooks on the replica
//! model a lossy link (`kv_drop_next`: batches numbered and buffered but not
//! sent, so the subscriber sees a gap) and a dead publisher (`kv_silent`:
//! nothing sent, replays unanswered); a crashed replica publishes nothing; a
//! restarted one starts again at sequence 0 with an empty buffer.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedReceiver;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::events::{encode_batch, split_endpoint, CacheEvent, KvEventsConfig};
use super::replica::Replica;

/// End-of-replay marker: sequence -1.
const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();
/// Most events in one batch (bounds a message's size under a burst).
const MAX_BATCH: usize = 4096;

/// A replica's bound event sockets.
pub(crate) struct Sockets {
    publ: PubSocket,
    replay: Option<RouterSocket>,
    pub(crate) port: u16,
    pub(crate) replay_port: Option<u16>,
}

/// Binds replica `index`'s sockets: the configured port + `index` (0 stays
/// ephemeral); `*` binds the fleet's own address.
pub(crate) async fn bind(
    cfg: &KvEventsConfig,
    host: std::net::IpAddr,
    index: usize,
) -> Result<Sockets, String> {
    async fn one<S: Socket>(
        s: &mut S,
        ep: &str,
        host: std::net::IpAddr,
        index: usize,
    ) -> Result<u16, String> {
        let (h, port) = split_endpoint(ep)?;
        let h = if h == "*" { host.to_string() } else { h };
        let port = if port == 0 { 0 } else { port as usize + index };
        let want = format!("tcp://{h}:{port}");
        match s.bind(&want).await {
            Ok(zeromq::Endpoint::Tcp(_, p)) => Ok(p),
            Ok(other) => Err(format!("{want}: bound {other}")),
            Err(e) => Err(format!("{want}: {e}")),
        }
    }
    let mut publ = PubSocket::new();
    let port = one(&mut publ, &cfg.endpoint, host, index).await?;
    let (replay, replay_port) = match &cfg.replay_endpoint {
        Some(ep) => {
            let mut r = RouterSocket::new();
            let p = one(&mut r, ep, host, index).await?;
            (Some(r), Some(p))
        }
        None => (None, None),
    };
    Ok(Sockets {
        publ,
        replay,
        port,
        replay_port,
    })
}

/// Publishes `rx`'s events until the fleet shuts down.
pub(crate) async fn run(
    rep: Arc<Replica>,
    cfg: KvEventsConfig,
    sockets: Sockets,
    mut rx: UnboundedReceiver<CacheEvent>,
) {
    let Sockets {
        mut publ,
        mut replay,
        ..
    } = sockets;
    let topic = Bytes::from(cfg.topic.clone().into_bytes());
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
    let mut next_seq = 0u64;
    let mut events = Vec::new();
    let mut control = rep.control.subscribe();
    loop {
        if control.borrow_and_update().shutdown {
            return;
        }
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            got = rx.recv() => {
                let Some(first) = got else { return };
                events.clear();
                events.push(first);
                while events.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(e) => events.push(e),
                        Err(_) => break,
                    }
                }
                // A restart starts the sequence over; what came before it
                // belonged to the process that died.
                if let Some(at) = events.iter().rposition(|e| *e == CacheEvent::Restarted) {
                    events.drain(..=at);
                    buffer.clear();
                    next_seq = 0;
                }
                if events.is_empty() || rep.is_crashed() {
                    continue;
                }
                let mut payload = Vec::with_capacity(64 + events.len() * 48);
                encode_batch(unix_secs(), &events, cfg.encoding, cfg.int_block_hashes, &mut payload);
                let payload = Bytes::from(payload);
                let seq = next_seq;
                next_seq += 1;
                if buffer.len() >= cfg.buffer_steps.max(1) {
                    buffer.pop_front();
                }
                buffer.push_back((seq, payload.clone()));
                let dropped = rep
                    .kv_drop_next
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok();
                if dropped || rep.kv_silent.load(Ordering::Acquire) {
                    continue;
                }
                let mut msg = ZmqMessage::from(topic.clone());
                msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
                msg.push_back(payload);
                if let Err(e) = publ.send(msg).await {
                    tracing::debug!(replica = rep.index, error = %e, "kv event send failed");
                }
            }
            Some(req) = async {
                match replay.as_mut() {
                    Some(r) => r.recv().await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                if rep.kv_silent.load(Ordering::Acquire) || rep.is_crashed() {
                    continue;
                }
                let frames = req.into_vec();
                let [id, _, start] = frames.as_slice() else { continue };
                let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else { continue };
                let start = u64::from_be_bytes(start);
                let Some(r) = replay.as_mut() else { continue };
                for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
                    let msg = frames_of(id, &seq.to_be_bytes(), payload.clone());
                    if r.send(msg).await.is_err() {
                        break;
                    }
                }
                let _ = r.send(frames_of(id, &END_SEQ, Bytes::new())).await;
            }
        }
    }
}

fn frames_of(id: &Bytes, seq: &[u8; 8], payload: Bytes) -> ZmqMessage {
    let mut msg = ZmqMessage::from(id.clone());
    msg.push_back(Bytes::new());
    msg.push_back(Bytes::copy_from_slice(seq));
    msg.push_back(payload);
    msg
}

fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
