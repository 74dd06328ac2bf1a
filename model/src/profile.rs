//! Per-op wall time of the training step, for `swarm bench model`'s breakdown.
//!
//! Off by default: [`timed`] then costs one relaxed atomic load. The benchmark switches it on,
//! runs its micro-batches and reads the totals. Timing never changes what an op computes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

/// Runs `f`, adding its wall time to `op`'s total when profiling is on.
pub(crate) fn timed<R>(op: &'static str, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let dt = t.elapsed().as_secs_f64();
    let mut tot = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match tot.iter_mut().find(|(n, _, _)| *n == op) {
        Some(e) => {
            e.1 += dt;
            e.2 += 1;
        }
        None => tot.push((op, dt, 1)),
    }
    r
}

/// Starts (or stops) collecting, clearing earlier totals.
pub fn enable(on: bool) {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(on, Ordering::Relaxed);
}

/// The totals so far: `(op, seconds, calls)` in first-seen order.
pub fn totals() -> Vec<(&'static str, f64, u64)> {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
