//! Which serving worker the current thread is. The server marks each of its
//! worker threads; the upstream client keeps one connection pool per worker
//! and reads the mark, so a request and its upstream connection stay on one
//! thread. Neither module knows the other.

use std::cell::Cell;

thread_local! {
    /// This thread's serving worker number (1-based; 0 outside the workers).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as serving worker `i` (1-based).
pub(crate) fn enter(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The serving worker the current thread is (1-based), 0 on any other thread.
pub(crate) fn current() -> usize {
    WORKER.with(Cell::get)
}
