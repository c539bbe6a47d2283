//! Events and counters: what the cache did, for logs, metrics and tests.
//!
//! Every cache keeps lock-free counters ([`CacheStats`], read with
//! [`FusionCache::stats`](crate::FusionCache::stats)) and calls the listeners registered on its builder with
//! each [`CacheEvent`] as it happens.
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//! use fusioncache::{FusionCache, events::CacheEvent};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let misses = Arc::new(AtomicUsize::new(0));
//! let seen = misses.clone();
//! let cache: FusionCache<u32> = FusionCache::builder()
//!     .on_event(move |e: &CacheEvent<'_>| {
//!         if matches!(e, CacheEvent::Miss { .. }) {
//!             seen.fetch_add(1, Ordering::Relaxed);
//!         }
//!     })
//!     .build()
//!     .unwrap();
//! assert_eq!(cache.get("nope").await, None);
//! assert_eq!(misses.load(Ordering::Relaxed), 1);
//! assert_eq!(cache.stats().misses, 1);
//! # }
//! ```

use std::sync::Arc;

use crate::backplane::Action;

/// Something that happened in a cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheEvent<'a> {
    /// A fresh value was served from L1 (or L2 when `from_l2`).
    Hit {
        /// The key.
        key: &'a str,
        /// Whether it came from the distributed cache.
        from_l2: bool,
    },
    /// No usable value was found.
    Miss {
        /// The key.
        key: &'a str,
    },
    /// An expired value was served as a fail-safe fallback.
    StaleServed {
        /// The key.
        key: &'a str,
    },
    /// A value was written (by `set` or a factory).
    Set {
        /// The key.
        key: &'a str,
    },
    /// An entry was removed.
    Remove {
        /// The key.
        key: &'a str,
    },
    /// An entry was marked expired.
    Expire {
        /// The key.
        key: &'a str,
    },
    /// The cache was cleared (expire-all with `allow_fail_safe`, else remove-all).
    Clear {
        /// Whether the cleared entries stay usable as fail-safe fallbacks.
        allow_fail_safe: bool,
    },
    /// The entries of a tag were removed.
    RemoveByTag {
        /// The tag.
        tag: &'a str,
    },
    /// A factory ran.
    FactoryRun {
        /// The key.
        key: &'a str,
        /// Whether it succeeded.
        success: bool,
    },
    /// The distributed cache failed.
    L2Error {
        /// The key, when the operation had one.
        key: Option<&'a str>,
        /// What failed.
        error: String,
    },
    /// A notification was published to the other nodes.
    BackplaneSent {
        /// The key.
        key: &'a str,
        /// The action.
        action: Action,
    },
    /// A notification from another node was applied.
    BackplaneReceived {
        /// The key.
        key: &'a str,
        /// The action.
        action: Action,
    },
    /// A payload was dropped: malformed, or of a version or action this node does not know.
    BackplaneDropped {
        /// Why.
        reason: String,
    },
    /// A distributed operation (its L2 step and notification, or only the notification) failed and was
    /// queued for auto-recovery.
    AutoRecoveryQueued {
        /// The key.
        key: &'a str,
        /// The operation.
        action: Action,
    },
    /// A queued operation went through on a retry.
    AutoRecoveryReplayed {
        /// The key.
        key: &'a str,
    },
    /// A queued operation was dropped.
    AutoRecoveryDropped {
        /// The key.
        key: &'a str,
        /// Why.
        reason: DropReason,
    },
    /// This cache fell behind its transport (its buffer was full) and missed notifications: its whole L1
    /// was marked stale, as after a reconnection.
    BackplaneOverflow,
    /// The backplane subscription became active (first connection, or a reconnection).
    BackplaneConnected {
        /// `true` for a reconnection.
        reconnected: bool,
    },
    /// The backplane connection was lost.
    BackplaneDisconnected {
        /// What the transport said.
        reason: String,
    },
    /// Every L1 entry was marked stale (after a reconnection or a missed notification).
    L1MarkedStale,
    /// A circuit breaker opened (calls to that layer are skipped for a while) or closed again.
    CircuitBreaker {
        /// Which layer.
        layer: Layer,
        /// `true` when it opened.
        open: bool,
    },
}

/// A distributed layer of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Layer {
    /// The distributed cache (L2).
    Distributed,
    /// The backplane.
    Backplane,
}

/// Why an auto-recovery item left the queue without going through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Its entry would have expired everywhere by now: nothing left to recover.
    Expired,
    /// A newer write of the key (from this node or another) made it obsolete.
    Superseded,
    /// The queue was full and this item expired soonest.
    Overflow,
}

/// A listener of cache events.
pub type EventListener = Arc<dyn Fn(&CacheEvent<'_>) + Send + Sync>;

pub use crate::telemetry::CacheStats;
