//! Counters: the one check-and-add that admits a request against all its
//! limits at once. [`SharedCounters`] is what a shared backend implements
//! (the `infergate-quota` crate, Redis); [`LocalCounters`] is the
//! in-process one used alone (local mode) and as the fallback while the
//! shared backend is down. In local mode the counters of configured teams
//! and keys are [`LocalSlot`]s built with the config (one atomic word per
//! limit, no lock, no allocation); only scopes made up per request (the
//! `default_team` of an unlisted team) and the fallback use the map.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::rules::Dim;
pub use super::slot::LocalSlot;
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
    /// The counter's atomic in local mode, when the scope is configured.
    pub local: Option<LocalSlot>,
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

/// The future of [`SharedCounters::release`].
pub type ReleaseFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

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
    /// At shutdown, once requests drained: gives back what this replica
    /// holds (unused leased allowance, settlements not yet sent), bounded by
    /// the backend's timeout. Default: nothing held.
    fn release(&self) -> ReleaseFuture<'_> {
        Box::pin(async {})
    }
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

    /// Local mode: the check-and-add over the ops' [`LocalSlot`]s (the map
    /// only for ops without one), all or nothing.
    pub fn reserve_local(&self, ops: &[CounterOp], now_ms: u64) -> Verdict {
        let mut values = Vec::with_capacity(ops.len());
        let mut refused = None;
        // Slots before this one were taken (to undo on a refusal).
        let mut taken = ops.len();
        for (i, op) in ops.iter().enumerate() {
            match &op.local {
                Some(s) => match s.take(op.window_id, op.add, op.limit) {
                    Ok(v) => values.push(v),
                    Err(v) => {
                        values.push(v);
                        refused = Some(i);
                        taken = i;
                        break;
                    }
                },
                None => values.push(0),
            }
        }
        if refused.is_none() && ops.iter().any(|o| o.local.is_none()) {
            let rest: Vec<CounterOp> = ops.iter().filter(|o| o.local.is_none()).cloned().collect();
            match self.reserve(&rest, |_| 1.0, now_ms) {
                Verdict::Admitted(got) => {
                    let mut got = got.into_iter();
                    for (op, v) in ops.iter().zip(values.iter_mut()) {
                        if op.local.is_none() {
                            *v = got.next().unwrap_or(0);
                        }
                    }
                }
                Verdict::Refused { index, .. } => {
                    let op = &rest[index];
                    refused = ops.iter().position(|o| {
                        o.local.is_none()
                            && o.dim == op.dim
                            && o.scope == op.scope
                            && o.window == op.window
                    });
                }
            }
        }
        let Some(index) = refused else {
            return Verdict::Admitted(values);
        };
        // Undo what was taken; the values seen are before this request.
        for (i, op) in ops.iter().enumerate() {
            if let Some(s) = &op.local {
                if i < taken {
                    s.settle(op.window_id, -(op.add as i64));
                }
                let v = s.value(op.window_id);
                match values.get_mut(i) {
                    Some(x) => *x = v,
                    None => values.push(v),
                }
            } else {
                let v = self.value(op);
                match values.get_mut(i) {
                    Some(x) => *x = v,
                    None => values.push(v),
                }
            }
        }
        Verdict::Refused { index, values }
    }

    /// Local mode's settlement: the op's slot, else the map.
    pub fn settle_local(&self, op: &CounterOp, delta: i64) {
        match &op.local {
            Some(s) => s.settle(op.window_id, delta),
            None => self.settle(op, delta),
        }
    }

    /// Local mode's value of the op's counter.
    pub fn value_local(&self, op: &CounterOp) -> i64 {
        match &op.local {
            Some(s) => s.value(op.window_id),
            None => self.value(op),
        }
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
            local: None,
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

    #[test]
    fn slots_roll_with_the_window_and_never_admit_past_the_limit_under_threads() {
        let set = LocalSlot::new_set(2);
        let slot = |i| Some(LocalSlot::of(&set, i));
        let req = |w, add| CounterOp {
            dim: Dim::Requests,
            window_id: w,
            local: slot(0),
            ..op(1000, add)
        };
        let tok = |w, add| CounterOp {
            window_id: w,
            local: slot(1),
            ..op(100_000, add)
        };
        let c = Arc::new(LocalCounters::default());
        // 4 threads x 500 requests of 1 request and 150 tokens: the token
        // limit (100,000) admits 666; the request limit is never the bound.
        let admitted: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let c = c.clone();
                    s.spawn(move || {
                        (0..500)
                            .filter(|_| {
                                matches!(
                                    c.reserve_local(&[req(7, 1), tok(7, 150)], 0),
                                    Verdict::Admitted(_)
                                )
                            })
                            .count() as u64
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 666);
        assert_eq!(c.value_local(&tok(7, 0)), 99_900);
        assert_eq!(
            c.value_local(&req(7, 0)),
            666,
            "a refusal by tokens gave the request counter back"
        );
        // Settled down in the window; a settlement of an ended window is dropped.
        c.settle_local(&tok(7, 0), -900);
        assert_eq!(c.value_local(&tok(7, 0)), 99_000);
        // The next window starts at zero; the old one's late settlement is lost.
        assert_eq!(
            c.reserve_local(&[req(8, 1), tok(8, 10)], 0),
            Verdict::Admitted(vec![1, 10])
        );
        c.settle_local(&tok(7, 0), 5);
        assert_eq!(c.value_local(&tok(8, 0)), 10);
        assert_eq!(c.value_local(&tok(7, 0)), 0, "window 7 is gone");
        // A scope without a slot (default_team) counts in the map, same verdicts.
        let map_op = CounterOp {
            scope: "t:other".into(),
            ..op(100, 60)
        };
        assert!(matches!(
            c.reserve_local(&[req(8, 1), map_op.clone()], 0),
            Verdict::Admitted(_)
        ));
        assert!(matches!(
            c.reserve_local(&[req(8, 1), map_op], 0),
            Verdict::Refused { index: 1, .. }
        ));
        assert_eq!(
            c.value_local(&req(8, 0)),
            2,
            "the refused one gave its request back"
        );
    }
}
