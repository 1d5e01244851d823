//! The fleet's step clock: one OS thread paces the steps of every replica.
//!
//! Tokio's timer wheel has a 1 ms resolution, which is 10-20% of a decode step;
//! a thread parked with a timeout wakes within tens of microseconds, so the
//! observed step time follows the modelled one closely. One thread serves the
//! whole fleet: per step it applies the finished step of each due replica
//! (waking each stream once) and plans the next, and it parks in between.
//! Deadlines are chained from the previous step's deadline, so wake-up lateness
//! does not accumulate into a slower engine. A request arriving at an idle
//! replica unparks the thread ([`Clock::poke`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use super::replica::{lock, Replica};

/// How far behind schedule a step chain may fall before it restarts from now
/// (so a stalled machine does not make the engine sprint for long). On a
/// shared 2-core machine the clock thread is now and then descheduled for
/// 20 to 50 ms; a chain that restarted then lost that time for good (the
/// engine ran 2 to 4% slow overall), so late steps catch up within 100 ms.
const MAX_CATCH_UP: Duration = Duration::from_millis(100);
/// A replica whose step ends this soon after another's is finished in the
/// same wake-up: one park and one round of stream wake-ups instead of two.
/// Its tokens leave up to this much early; the next step still starts at
/// the modelled deadline, so the engine's pace is unchanged.
const COALESCE: Duration = Duration::from_micros(500);

/// Handle to the clock thread.
pub(crate) struct Clock {
    thread: Thread,
    join: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

struct Slot {
    rep: Arc<Replica>,
    /// Deadline and modelled wall duration (us) of the step in flight.
    busy: Option<(Instant, f64)>,
    /// Deadline of the previous step while steps run back to back.
    chain: Option<Instant>,
    prev_end: Instant,
}

impl Clock {
    /// Starts the clock thread for `replicas`.
    pub(crate) fn start(replicas: Vec<Arc<Replica>>) -> std::io::Result<Clock> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let join = thread::Builder::new()
            .name("sim-clock".into())
            .spawn(move || run(replicas, &stop2))?;
        Ok(Clock {
            thread: join.thread().clone(),
            join: Mutex::new(Some(join)),
            stop,
        })
    }

    /// The thread to unpark when work arrives.
    pub(crate) fn thread(&self) -> Thread {
        self.thread.clone()
    }

    /// Stops the thread (does not wait).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop_and_join(&self) {
        self.stop();
        if let Some(j) = lock(&self.join).take() {
            let _ = j.join();
        }
    }
}

fn run(replicas: Vec<Arc<Replica>>, stop: &AtomicBool) {
    let now = Instant::now();
    let mut slots: Vec<Slot> = replicas
        .into_iter()
        .map(|rep| Slot {
            rep,
            busy: None,
            chain: None,
            prev_end: now,
        })
        .collect();
    while !stop.load(Ordering::Acquire) {
        let mut next: Option<Instant> = None;
        for s in &mut slots {
            let now = Instant::now();
            if let Some((deadline, wall_us)) = s.busy {
                if deadline <= now + COALESCE {
                    let observed_us = now.saturating_duration_since(s.prev_end).as_secs_f64() * 1e6;
                    s.prev_end = now;
                    lock(&s.rep.engine).finish_step(now, wall_us, observed_us);
                    s.busy = None;
                    s.chain = Some(deadline);
                }
            }
            if s.busy.is_none() {
                let planned = lock(&s.rep.engine).schedule();
                match planned {
                    Some(us) => {
                        let wall = s.rep.cfg.wall(us);
                        // Chained from the previous deadline, even one
                        // still ahead of now (finished early by `COALESCE`).
                        let start = match s.chain {
                            Some(d) if now.saturating_duration_since(d) < MAX_CATCH_UP => d,
                            _ => {
                                s.prev_end = now;
                                now
                            }
                        };
                        s.busy = Some((start + wall, wall.as_secs_f64() * 1e6));
                    }
                    None => s.chain = None,
                }
            }
            if let Some((d, _)) = s.busy {
                next = Some(next.map_or(d, |n: Instant| n.min(d)));
            }
        }
        match next {
            Some(d) => {
                let now = Instant::now();
                if d > now + COALESCE {
                    thread::park_timeout(d - now);
                }
            }
            None => thread::park(),
        }
    }
}
