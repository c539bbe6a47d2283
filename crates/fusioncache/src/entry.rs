//! The L1 entry: a value with its freshness, fail-safe window and write timestamp.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quanta::Instant;

/// How long an entry is fresh and how long it stays usable (as a fail-safe fallback) in L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub fresh_for: Duration,
    pub usable_for: Duration,
}

/// A value in L1.
#[derive(Debug)]
pub(crate) struct L1Entry<V> {
    pub value: V,
    /// The write this value came from (UTC ticks), compared with backplane messages.
    pub timestamp: i64,
    /// When the entry was put in L1.
    pub created_at: Instant,
    /// Logical expiry.
    pub fresh_until: Instant,
    /// How long moka keeps it (fail-safe window included).
    pub usable_for: Duration,
    /// The cache's stale epoch when it was created: older than the current one means stale.
    pub epoch: u64,
    /// Marked expired by `expire` or a notification.
    stale: AtomicBool,
}

impl<V> L1Entry<V> {
    pub fn new(value: V, timestamp: i64, now: Instant, lifetime: Lifetime, epoch: u64) -> Self {
        Self {
            value,
            timestamp,
            created_at: now,
            fresh_until: now + lifetime.fresh_for,
            usable_for: lifetime.usable_for,
            epoch,
            stale: AtomicBool::new(false),
        }
    }

    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    /// Logically fresh: not marked stale, not from before the last mark-all-stale, not past its expiry.
    #[inline]
    pub fn is_fresh(&self, now: Instant, current_epoch: u64) -> bool {
        now < self.fresh_until && self.epoch >= current_epoch && !self.stale.load(Ordering::Acquire)
    }

    /// Still inside its fail-safe window (moka may not have evicted it yet).
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.created_at + self.usable_for
    }
}

/// moka's per-entry expiration: an entry lives for its fail-safe window.
pub(crate) struct UsableFor;

impl<V> moka::Expiry<String, std::sync::Arc<L1Entry<V>>> for UsableFor {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &std::sync::Arc<L1Entry<V>>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.usable_for)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &std::sync::Arc<L1Entry<V>>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.usable_for)
    }
}
