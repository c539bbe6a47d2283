//! Counters, metrics and listeners of one cache.
//!
//! Every counter is striped per thread (no cache line bounces between cores on the L1 hit path) and, with
//! the `metrics` feature, mirrored to the [`metrics`](https://docs.rs/metrics) facade under FusionCache's
//! metric names, labelled `fusioncache.cache.name`. The facade is a no-op until the application installs
//! a recorder (Prometheus, OpenTelemetry, …): install it before building the caches, whose metric handles
//! are registered when they are built.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::events::{CacheEvent, EventListener};

/// Stripes of a counter: enough for the cores of a typical node.
const STRIPES: usize = 8;

#[repr(align(64))]
#[derive(Debug, Default)]
struct Stripe(AtomicU64);

/// This thread's stripe, assigned round-robin on first use (a `const` thread-local: one load after that).
#[inline(always)]
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let stripe = s.get();
        if stripe != usize::MAX {
            return stripe;
        }
        let stripe = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        s.set(stripe);
        stripe
    })
}

/// A monotonic counter, striped per thread.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    stripes: [Stripe; STRIPES],
    #[cfg(feature = "metrics")]
    metric: Option<metrics::Counter>,
}

impl Counter {
    #[inline(always)]
    pub fn incr(&self) {
        self.stripes[stripe()].0.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metric {
            m.increment(1);
        }
    }

    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident => $metric:literal $(, $lk:literal => $lv:literal)*;)+) => {
        /// A snapshot of a cache's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct CacheStats {
            $($(#[$doc])* pub $name: u64,)+
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: Counter,)+
            #[cfg(feature = "metrics")]
            pub(crate) lag: Option<metrics::Histogram>,
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> CacheStats {
                CacheStats { $($name: self.$name.get(),)+ }
            }

            /// Counters whose increments also go to the `metrics` facade, labelled with `cache_name`.
            #[cfg(feature = "metrics")]
            fn with_metrics(cache_name: &str) -> Self {
                let mut counters = Self::default();
                $(counters.$name.metric = Some(metrics::counter!(
                    $metric,
                    "fusioncache.cache.name" => cache_name.to_string()
                    $(, $lk => $lv)*
                ));)+
                counters.lag = Some(metrics::histogram!(
                    "fusioncache.backplane.lag",
                    "fusioncache.cache.name" => cache_name.to_string()
                ));
                counters
            }
        }

    };
}

counters! {
    /// Fresh values served from L1.
    l1_hits => "fusioncache.cache.hit", "fusioncache.operation.level" => "memory";
    /// Fresh values served from L2.
    l2_hits => "fusioncache.cache.hit", "fusioncache.operation.level" => "distributed";
    /// Reads that found nothing usable.
    misses => "fusioncache.cache.miss";
    /// Expired values served as fail-safe fallbacks.
    stale_served => "fusioncache.failsafe_activate";
    /// Values written.
    sets => "fusioncache.cache.set";
    /// Entries removed.
    removes => "fusioncache.cache.remove";
    /// Entries marked expired.
    expires => "fusioncache.cache.expire";
    /// Tag removals (`remove_by_tag`).
    removes_by_tag => "fusioncache.cache.remove_by_tag";
    /// Clears.
    clears => "fusioncache.cache.clear";
    /// Factory runs.
    factory_runs => "fusioncache.factory.run";
    /// Factory runs that failed or timed out.
    factory_errors => "fusioncache.factory.error";
    /// Distributed-cache errors.
    l2_errors => "fusioncache.distributed.error";
    /// The L2 circuit breaker opened (after an error).
    l2_breaker_opened => "fusioncache.distributed.circuit_breaker_change", "fusioncache.distributed.circuit_breaker.closed" => "false";
    /// The L2 circuit breaker closed (L2 answered again).
    l2_breaker_closed => "fusioncache.distributed.circuit_breaker_change", "fusioncache.distributed.circuit_breaker.closed" => "true";
    /// Notifications published.
    backplane_sent => "fusioncache.backplane.publish";
    /// Notifications from other nodes applied.
    backplane_received => "fusioncache.backplane.receive";
    /// Own notifications that came back and were ignored.
    backplane_self_ignored => "fusioncache.backplane.self_ignored";
    /// Messages on internal keys other than tags (liveness probes, `__fc:probe`), ignored.
    backplane_probes => "fusioncache.backplane.probe";
    /// Malformed payloads dropped.
    backplane_malformed => "fusioncache.backplane.dropped", "fusioncache.backplane.reason" => "malformed";
    /// Well-formed payloads of an unknown version or action, ignored.
    backplane_unsupported => "fusioncache.backplane.dropped", "fusioncache.backplane.reason" => "unsupported";
    /// Notifications dropped because this cache fell behind its transport (each marks L1 stale).
    backplane_overflows => "fusioncache.backplane.dropped", "fusioncache.backplane.reason" => "overflow";
    /// The backplane circuit breaker opened (after a failed publish).
    backplane_breaker_opened => "fusioncache.backplane.circuit_breaker_change", "fusioncache.backplane.circuit_breaker.closed" => "false";
    /// The backplane circuit breaker closed.
    backplane_breaker_closed => "fusioncache.backplane.circuit_breaker_change", "fusioncache.backplane.circuit_breaker.closed" => "true";
    /// Distributed operations queued for auto-recovery (an L2 step or a publish failed).
    auto_recovery_queued => "fusioncache.auto_recovery.queued";
    /// Queued operations that went through on a retry.
    auto_recovery_replayed => "fusioncache.auto_recovery.replayed";
    /// Queued operations dropped: expired, superseded by a newer write, or evicted from a full queue.
    auto_recovery_dropped => "fusioncache.auto_recovery.dropped";
    /// Auto-recovery passes that could not complete (L2 or the backplane still down).
    auto_recovery_retries => "fusioncache.auto_recovery.retry";
    /// Backplane reconnections.
    backplane_reconnects => "fusioncache.backplane.reconnect";
    /// Times every L1 entry was marked stale.
    l1_mark_all_stale => "fusioncache.memory.mark_all_stale";
    /// Event listeners that panicked (caught; the cache went on).
    listener_panics => "fusioncache.listener.panic";
}

impl Counters {
    #[inline]
    pub(crate) fn incr(counter: &Counter) {
        counter.incr();
    }

    /// Records how long after its change a notification was applied here (clocks of different nodes).
    #[inline]
    pub(crate) fn record_lag(&self, change_ticks: i64) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.lag {
            let ticks = crate::backplane::now_ticks()
                .saturating_sub(change_ticks)
                .max(0);
            h.record(ticks as f64 / 10_000_000.0);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = change_ticks;
    }
}

/// Counters and listeners of one cache, shared by its parts.
#[derive(Default)]
pub(crate) struct Telemetry {
    pub(crate) counters: Counters,
    listeners: Vec<EventListener>,
}

impl Telemetry {
    pub(crate) fn new(listeners: Vec<EventListener>, cache_name: &str) -> Self {
        #[cfg(feature = "metrics")]
        let counters = Counters::with_metrics(cache_name);
        #[cfg(not(feature = "metrics"))]
        let counters = {
            let _ = cache_name;
            Counters::default()
        };
        Self {
            counters,
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
                self.counters.listener_panics.incr();
                let n = self.counters.listener_panics.get();
                if n == 1 || n.is_multiple_of(1000) {
                    tracing::error!(
                        panics = n,
                        "a cache event listener panicked; the cache goes on"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counters_add_up_across_threads() {
        let counters = std::sync::Arc::new(Counters::default());
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let c = counters.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.l1_hits.incr()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counters.snapshot().l1_hits, 12_000);
    }
}
