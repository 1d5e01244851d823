//! Cold start: how a replica that joins a pool while requests wait for one
//! (scale from zero, or every replica was gone) takes the held requests
//! without a thundering herd.
//!
//! Such a replica is marked cold when it joins ([`mark_joined`]). While it is
//! cold it takes nothing before its first `/metrics` scrape when the pool is
//! scraped (its KV size, hence its token budget, is unknown until then), and
//! then at most [`window`] requests in flight: two to start with, then twice
//! the requests it has answered (a first byte), like TCP's slow start, so the
//! held requests go in priority order over a few of the replica's first
//! answers instead of all at once into a cold engine (cold caches, lazy
//! compilation, a first scrape that may still show it loading). The
//! replica's budget applies on top. After [`WARM_AFTER`] answers the ramp
//! ends. Every first byte on a cold replica wakes the queue
//! (`Reservation::waking_queue_on_prefill`), so the ramp is event-driven.

use std::sync::Arc;

use crate::pool::Replica;

/// Requests a cold replica takes before its first answer.
pub(crate) const INITIAL_WINDOW: u64 = 2;
/// Answers after which a cold replica is warm.
pub(crate) const WARM_AFTER: u64 = 64;

/// Requests a cold replica may hold after `answered` first bytes.
pub(crate) fn window(answered: u64) -> u64 {
    answered.saturating_mul(2).max(INITIAL_WINDOW)
}

/// Marks the members that never answered as cold: called when a pool's
/// members change while requests wait for a replica.
pub(crate) fn mark_joined(members: &[Arc<Replica>]) {
    for r in members.iter().filter(|r| r.load.answered() == 0) {
        r.load.set_cold(true);
    }
}

/// Whether `replica` may take one more request now (always, unless cold).
/// `scraped`: the pool's replicas are scraped, so a first scrape is awaited.
pub(crate) fn admits(replica: &Replica, scraped: bool) -> bool {
    let load = &replica.load;
    if !load.is_cold() {
        return true;
    }
    if scraped && replica.signals.load().is_none() {
        return false;
    }
    let answered = load.answered();
    if answered >= WARM_AFTER {
        load.set_cold(false);
        return true;
    }
    load.requests() < window(answered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Endpoint;
    use crate::routing::signals::Signals;
    use std::time::Instant;

    fn replica() -> Arc<Replica> {
        Arc::new(Replica::new(
            Endpoint::from_url("http://127.0.0.1:9").unwrap(),
        ))
    }

    #[test]
    fn a_cold_replica_waits_for_its_first_scrape_then_ramps_up() {
        let r = replica();
        assert!(admits(&r, true), "not cold: no ramp");
        mark_joined(std::slice::from_ref(&r));
        assert!(r.load.is_cold());
        assert!(!admits(&r, true), "no scrape yet");
        assert!(admits(&r, false), "an unscraped pool waits for no scrape");
        r.signals.store(Some(Arc::new(Signals::failed(
            Instant::now(),
            "x".to_string(),
        ))));
        let mut held = Vec::new();
        while admits(&r, true) {
            held.push(r.begin(10, 10));
        }
        assert_eq!(held.len() as u64, INITIAL_WINDOW);
        // Each answer lets two more in: 2, then 4, 8, ... in flight.
        for g in held.iter_mut() {
            assert!(g.prefill_done());
        }
        while admits(&r, true) {
            held.push(r.begin(10, 10));
        }
        assert_eq!(held.len(), 4);
        assert_eq!(window(3), 6);
        // Warm after enough answers: no limit.
        for _ in 0..WARM_AFTER {
            let mut g = r.begin(1, 1);
            g.prefill_done();
        }
        assert!(admits(&r, true));
        assert!(!r.load.is_cold());
        // A replica that has answered is never marked cold again.
        mark_joined(std::slice::from_ref(&r));
        assert!(!r.load.is_cold());
    }
}
