//! The L1 entry: a value with its freshness, fail-safe window and write timestamp.

use std::time::Duration;

use quanta::Instant;

/// How long an entry is fresh and how long it stays usable (as a fail-safe fallback) in L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub fresh_for: Duration,
    pub usable_for: Duration,
}

/// A value in L1. Stored by value (moka clones it out on a hit, which clones `V` once, as a raw moka get
/// would); staleness is set by replacing the entry atomically. Expiry is checked here, per entry, rather
/// than by a moka `Expiry` (which costs every read a second clock check).
#[derive(Debug, Clone)]
pub(crate) struct L1Entry<V> {
    pub value: V,
    /// The write this value came from (UTC ticks), compared with backplane messages.
    pub timestamp: i64,
    /// When the entry was put in L1.
    pub created_at: Instant,
    /// Logical expiry.
    pub fresh_until: Instant,
    /// How long it may serve, as fresh or as a fail-safe fallback; past it, it counts as missing (moka
    /// drops it on capacity pressure or at the cache's retention bound).
    pub usable_until: Instant,
    /// The cache's stale epoch when it was created: older than the current one means stale.
    pub epoch: u64,
    /// Marked expired by `expire` or a notification.
    pub stale: bool,
}

impl<V> L1Entry<V> {
    pub fn new(value: V, timestamp: i64, now: Instant, lifetime: Lifetime, epoch: u64) -> Self {
        Self {
            value,
            timestamp,
            created_at: now,
            fresh_until: now + lifetime.fresh_for,
            usable_until: now + lifetime.usable_for,
            epoch,
            stale: false,
        }
    }

    /// Logically fresh: not marked stale, not from before the last mark-all-stale, not past its expiry.
    #[inline]
    pub fn is_fresh(&self, now: Instant, current_epoch: u64) -> bool {
        now < self.fresh_until && self.epoch >= current_epoch && !self.stale
    }

    /// Still inside its fail-safe window (moka may not have evicted it yet).
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}
