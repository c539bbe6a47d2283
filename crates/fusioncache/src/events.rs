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

use std::sync::atomic::{AtomicU64, Ordering};
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

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),+ $(,)?) => {
        /// A snapshot of a cache's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct CacheStats {
            $($(#[$doc])* pub $name: u64,)+
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)+
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> CacheStats {
                CacheStats { $($name: self.$name.load(Ordering::Relaxed),)+ }
            }
        }
    };
}

counters! {
    /// Fresh values served from L1.
    l1_hits,
    /// Fresh values served from L2.
    l2_hits,
    /// Reads that found nothing usable.
    misses,
    /// Expired values served as fail-safe fallbacks.
    stale_served,
    /// Values written.
    sets,
    /// Entries removed.
    removes,
    /// Entries marked expired.
    expires,
    /// Tag removals (`remove_by_tag`).
    removes_by_tag,
    /// Factory runs.
    factory_runs,
    /// Factory runs that failed or timed out.
    factory_errors,
    /// Distributed-cache errors.
    l2_errors,
    /// Notifications published.
    backplane_sent,
    /// Notifications from other nodes applied.
    backplane_received,
    /// Own notifications that came back and were ignored.
    backplane_self_ignored,
    /// Messages on internal keys other than tags (liveness probes, `__fc:probe`), ignored.
    backplane_probes,
    /// Malformed payloads dropped.
    backplane_malformed,
    /// Well-formed payloads of an unknown version or action, ignored.
    backplane_unsupported,
    /// Notifications dropped because this cache fell behind its transport (each marks L1 stale).
    backplane_overflows,
    /// Distributed operations queued for auto-recovery (an L2 step or a publish failed).
    auto_recovery_queued,
    /// Queued operations that went through on a retry.
    auto_recovery_replayed,
    /// Queued operations dropped: expired, superseded by a newer write, or evicted from a full queue.
    auto_recovery_dropped,
    /// Auto-recovery passes that could not complete (L2 or the backplane still down).
    auto_recovery_retries,
    /// Backplane reconnections.
    backplane_reconnects,
    /// Times every L1 entry was marked stale.
    l1_mark_all_stale,
    /// Event listeners that panicked (caught; the cache went on).
    listener_panics,
}

impl Counters {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters and listeners of one cache, shared by its parts.
#[derive(Default)]
pub(crate) struct Telemetry {
    pub(crate) counters: Counters,
    listeners: Vec<EventListener>,
}

impl Telemetry {
    pub(crate) fn new(listeners: Vec<EventListener>) -> Self {
        Self {
            counters: Counters::default(),
            listeners,
        }
    }

    /// Calls the listeners with the event `make` builds; builds nothing when there is no listener. A
    /// listener that panics is caught, counted and logged: it never takes the cache (or its receive loop)
    /// down with it.
    #[inline]
    pub(crate) fn emit<'a>(&self, make: impl FnOnce() -> CacheEvent<'a>) {
        if !self.listeners.is_empty() {
            self.dispatch(&make());
        }
    }

    #[cold]
    fn dispatch(&self, event: &CacheEvent<'_>) {
        for listener in &self.listeners {
            let call = std::panic::AssertUnwindSafe(|| listener(event));
            if std::panic::catch_unwind(call).is_err() {
                let n = self
                    .counters
                    .listener_panics
                    .fetch_add(1, Ordering::Relaxed);
                if n == 0 || (n + 1).is_multiple_of(1000) {
                    tracing::error!(
                        panics = n + 1,
                        "a cache event listener panicked; the cache goes on"
                    );
                }
            }
        }
    }
}
