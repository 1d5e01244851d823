//! Counters: the one check-and-add that admits a request against all its
//! limits at once. [`SharedCounters`] is what a shared backend implements
//! (the `infergate-quota` crate, Redis); [`LocalCounters`] is the
//! in-process one used alone (local mode) and as the fallback while the
//! shared backend is down.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::rules::Dim;
use super::window::Window;

/// One counter touched by a reservation.
#[derive(Debug, Clone)]
pub struct CounterOp {
    /// The scope (`t:TEAM`, `k:KEY`) the counter belongs to.
    pub scope: Arc<str>,
    pub dim: Dim,
    pub window: Window,
    pub window_id: u64,
    /// When the window ends (Unix ms): the counter may be dropped then.
    pub expires_at_ms: u64,
    /// The limit as seen by this request's band.
    pub limit: u64,
    /// What the request adds.
    pub add: u64,
}

impl CounterOp {
    /// The counter's key in a shared store: `PREFIX:SCOPE:DIM:WINDOW`.
    pub fn key(&self, prefix: &str) -> String {
        format!(
            "{prefix}:{}:{}:{}{}",
            self.scope,
            self.dim.tag(),
            self.window.tag(),
            self.window_id
        )
    }
}

/// The answer of an atomic check-and-add over a request's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every counter had room; the values after adding, in op order.
    Admitted(Vec<i64>),
    /// Op `index` had no room; nothing was added. The values seen, in op
    /// order.
    Refused { index: usize, values: Vec<i64> },
}

/// Why the shared counters did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// The reservation future of a shared backend.
pub type ReserveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Verdict, Unavailable>> + Send + 'a>>;

/// Counters shared by every gateway replica.
pub trait SharedCounters: Send + Sync + std::fmt::Debug {
    /// Atomically: if every op's counter plus its `add` stays within its
    /// `limit`, adds them all; else adds nothing. One round trip, which also
    /// carries the settlements queued since the last one.
    fn reserve<'a>(&'a self, ops: &'a [CounterOp]) -> ReserveFuture<'a>;
    /// Admits `ops` from allowance this replica already leased from the
    /// shared store, with no round trip: the counters' estimated values
    /// after adding, or `None` when some counter has no lease with room
    /// (then [`SharedCounters::reserve`] decides).
    fn try_local(&self, _ops: &[CounterOp], _now_ms: u64) -> Option<Vec<i64>> {
        None
    }
    /// Queues `delta` for the op's counter (sent with the next reservation or
    /// within the flush interval); never waits.
    fn settle(&self, op: &CounterOp, delta: i64);
    /// Whether the backend answers (false after an error until a probe
    /// succeeds).
    fn is_up(&self) -> bool;
    /// A reservation timed out: stop asking until a probe answers.
    fn mark_down(&self);
}

type Slot = (Arc<str>, Dim, Window, u64);

/// In-process counters (one replica's view).
#[derive(Debug, Default)]
pub struct LocalCounters {
    map: Mutex<HashMap<Slot, (i64, u64)>>,
    inserts: AtomicU64,
}

impl LocalCounters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Slot, (i64, u64)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The same check-and-add as [`SharedCounters::reserve`], with op `i`'s
    /// limit scaled by `share(i)`.
    pub fn reserve(&self, ops: &[CounterOp], share: impl Fn(usize) -> f64, now_ms: u64) -> Verdict {
        let mut map = self.lock();
        let mut values = Vec::with_capacity(ops.len());
        let mut refused = None;
        for (i, op) in ops.iter().enumerate() {
            let cur = map.get(&slot(op)).map_or(0, |v| v.0);
            values.push(cur);
            let limit = (op.limit as f64 * share(i)).floor() as i64;
            if refused.is_none() && op.add > 0 && cur.saturating_add(op.add as i64) > limit {
                refused = Some(i);
            }
        }
        if let Some(index) = refused {
            return Verdict::Refused { index, values };
        }
        let mut new = false;
        for (op, v) in ops.iter().zip(values.iter_mut()) {
            let e = map.entry(slot(op)).or_insert_with(|| {
                new = true;
                (0, op.expires_at_ms)
            });
            e.0 = e.0.saturating_add(op.add as i64);
            *v = e.0;
        }
        if new && self.inserts.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            // Windows that ended are dropped now and then, not per request.
            map.retain(|_, (_, expires)| *expires > now_ms);
        }
        Verdict::Admitted(values)
    }

    /// Adds `delta` to the op's counter if its window still exists.
    pub fn settle(&self, op: &CounterOp, delta: i64) {
        if let Some(v) = self.lock().get_mut(&slot(op)) {
            v.0 = v.0.saturating_add(delta);
        }
    }

    /// The counter's value (tests, status).
    pub fn value(&self, op: &CounterOp) -> i64 {
        self.lock().get(&slot(op)).map_or(0, |v| v.0)
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}

fn slot(op: &CounterOp) -> Slot {
    (op.scope.clone(), op.dim, op.window, op.window_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(limit: u64, add: u64) -> CounterOp {
        CounterOp {
            scope: "t:a".into(),
            dim: Dim::Tokens,
            window: Window::Minute,
            window_id: 7,
            expires_at_ms: 1000,
            limit,
            add,
        }
    }

    #[test]
    fn check_and_add_is_all_or_nothing() {
        let c = LocalCounters::default();
        let req = CounterOp {
            dim: Dim::Requests,
            ..op(2, 1)
        };
        assert_eq!(
            c.reserve(&[req.clone(), op(100, 60)], |_| 1.0, 0),
            Verdict::Admitted(vec![1, 60])
        );
        assert_eq!(
            c.reserve(&[req.clone(), op(100, 60)], |_| 1.0, 0),
            Verdict::Refused {
                index: 1,
                values: vec![1, 60]
            },
            "tokens full: the request counter is not taken either"
        );
        assert_eq!(c.value(&req), 1);
        c.settle(&op(100, 0), -30);
        assert_eq!(
            c.reserve(&[req.clone(), op(100, 60)], |_| 1.0, 0),
            Verdict::Admitted(vec![2, 90])
        );
        assert!(matches!(
            c.reserve(&[req, op(100, 1)], |_| 1.0, 0),
            Verdict::Refused { index: 0, .. }
        ));
        // A share scales the limit (the fallback while Redis is down).
        let c = LocalCounters::default();
        assert!(matches!(
            c.reserve(&[op(100, 60)], |_| 0.5, 0),
            Verdict::Refused { .. }
        ));
        assert_eq!(
            op(1, 1).key("ig"),
            "ig:t:a:tok:m7",
            "one key per scope, dimension and window"
        );
    }
}
