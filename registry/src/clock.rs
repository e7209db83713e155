//! The registry's clock. Record timestamps (a tag's push, a blob's ownership, an upload's
//! last touch) and the cut-offs of GC and retention come from it, so a test decides what
//! time it is instead of sleeping until enough of it has passed. Token expiry stays on
//! the wall clock: it is checked against other parties' clocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        wall_clock_millis()
    }
}

pub(crate) fn wall_clock_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A clock that moves only when told to (tests).
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Starts at the wall clock's now.
    pub fn new() -> Self {
        ManualClock(AtomicU64::new(wall_clock_millis()))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
