//! A circuit breaker: after a failure, a dead server is left alone for a while instead of being hammered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::time::Instant;

/// Opens for a while after a failure, so a dead server is not hammered.
#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    open_for: Duration,
    origin: Instant,
    /// Nanoseconds since `origin` until which the breaker is open; 0 when closed (never tripped, or reset).
    open_until: AtomicU64,
}

impl CircuitBreaker {
    pub fn new(open_for: Duration) -> Self {
        Self {
            open_for,
            origin: Instant::now(),
            open_until: AtomicU64::new(0),
        }
    }

    fn now_nanos(&self) -> u64 {
        Instant::now().duration_since(self.origin).as_nanos() as u64
    }

    /// Whether calls should be skipped now.
    pub fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && self.now_nanos() < until
    }

    /// Records a failure: opens the breaker (when it has a duration). Returns whether it was closed
    /// before (a transition worth reporting).
    pub fn trip(&self) -> bool {
        if self.open_for.is_zero() {
            return false;
        }
        let until = (self.now_nanos() + self.open_for.as_nanos() as u64).max(1);
        self.open_until.swap(until, Ordering::AcqRel) == 0
    }

    /// Records a success: closes the breaker. Returns whether it had been tripped since the last success
    /// (the other side is back).
    pub fn reset(&self) -> bool {
        // The fast path of a healthy server: no write.
        self.open_until.load(Ordering::Acquire) != 0
            && self.open_until.swap(0, Ordering::AcqRel) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_for_its_duration_and_reports_transitions() {
        let b = CircuitBreaker::new(Duration::from_secs(60));
        assert!(!b.is_open());
        assert!(b.trip(), "closed -> open");
        assert!(!b.trip(), "already open");
        assert!(b.is_open());
        assert!(b.reset(), "open -> closed");
        assert!(!b.reset(), "already closed");
        assert!(!b.is_open());
        let disabled = CircuitBreaker::new(Duration::ZERO);
        assert!(!disabled.trip());
        assert!(!disabled.is_open());
    }
}
