//! Options of a cache and of its entries.

use std::sync::Arc;
use std::time::Duration;

use crate::tags::RemoveByTagBehavior;

/// How one entry is cached: durations, fail-safe, timeouts, and which layers an operation touches.
///
/// Built by chaining, starting from [`EntryOptions::new`] (or the cache's defaults, which every operation
/// uses unless given its own):
///
/// ```
/// use std::time::Duration;
/// use fusioncache::EntryOptions;
///
/// let options = EntryOptions::new()
///     .duration(Duration::from_secs(60))
///     .fail_safe(true)
///     .fail_safe_max_duration(Duration::from_secs(3600))
///     .factory_soft_timeout(Duration::from_millis(100))
///     .jitter_max(Duration::from_secs(5));
/// assert!(options.is_fail_safe_enabled());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EntryOptions {
    pub(crate) duration: Duration,
    pub(crate) l1_duration: Option<Duration>,
    pub(crate) fail_safe: bool,
    pub(crate) fail_safe_max_duration: Duration,
    pub(crate) fail_safe_throttle_duration: Duration,
    pub(crate) jitter_max: Duration,
    pub(crate) skip_l2_reads: bool,
    pub(crate) skip_l2_writes: bool,
    pub(crate) skip_backplane_notifications: bool,
    pub(crate) factory_soft_timeout: Option<Duration>,
    pub(crate) factory_hard_timeout: Option<Duration>,
    pub(crate) background_factory_completion: bool,
    pub(crate) background_l2_operations: bool,
    pub(crate) background_backplane_operations: bool,
    pub(crate) surface_l2_errors: bool,
    /// Also return a failed publish as an error (the publish-only handle's default).
    pub(crate) surface_backplane_errors: bool,
    pub(crate) tags: Arc<[String]>,
    pub(crate) l2_soft_timeout: Option<Duration>,
    pub(crate) l2_hard_timeout: Option<Duration>,
    pub(crate) eager_refresh_threshold: Option<f32>,
}

impl Default for EntryOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(30),
            l1_duration: None,
            fail_safe: false,
            fail_safe_max_duration: Duration::from_secs(24 * 3600),
            fail_safe_throttle_duration: Duration::from_secs(30),
            jitter_max: Duration::ZERO,
            skip_l2_reads: false,
            skip_l2_writes: false,
            skip_backplane_notifications: false,
            factory_soft_timeout: None,
            factory_hard_timeout: None,
            background_factory_completion: true,
            background_l2_operations: false,
            background_backplane_operations: true,
            surface_l2_errors: false,
            surface_backplane_errors: false,
            tags: Arc::from([]),
            l2_soft_timeout: None,
            l2_hard_timeout: None,
            eager_refresh_threshold: None,
        }
    }
}

impl EntryOptions {
    /// The defaults: 30 s duration, fail-safe off, no timeouts, L2 writes awaited, backplane notifications
    /// sent in the background.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long the entry is fresh (logical expiration), in L1 and L2. L1 checks it on the kernel's coarse
    /// clock on Linux: exact to within one tick (1–10 ms, typically 4 ms).
    #[must_use]
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// A different (usually shorter) freshness for L1 only; L2 keeps [`duration`](Self::duration).
    #[must_use]
    pub fn l1_duration(mut self, duration: Duration) -> Self {
        self.l1_duration = Some(duration);
        self
    }

    /// Fail-safe: keep expired entries up to [`fail_safe_max_duration`](Self::fail_safe_max_duration) and
    /// serve them when the factory or the distributed cache fails.
    #[must_use]
    pub fn fail_safe(mut self, enabled: bool) -> Self {
        self.fail_safe = enabled;
        self
    }

    /// How long an entry stays usable as a fail-safe fallback after it was written.
    #[must_use]
    pub fn fail_safe_max_duration(mut self, duration: Duration) -> Self {
        self.fail_safe_max_duration = duration;
        self
    }

    /// After a fallback was served because the factory failed, how long it is served as fresh before the
    /// factory is tried again (so a failing source is not hammered).
    #[must_use]
    pub fn fail_safe_throttle_duration(mut self, duration: Duration) -> Self {
        self.fail_safe_throttle_duration = duration;
        self
    }

    /// Adds a random extra of up to `max` to the L1 duration, so entries set together on many nodes do not
    /// all expire at once.
    #[must_use]
    pub fn jitter_max(mut self, max: Duration) -> Self {
        self.jitter_max = max;
        self
    }

    /// Skips the distributed cache (L1 only) for this operation: both its reads and its writes.
    #[must_use]
    pub fn skip_l2(mut self, skip: bool) -> Self {
        self.skip_l2_reads = skip;
        self.skip_l2_writes = skip;
        self
    }

    /// Skips reading the distributed cache: a miss in L1 goes straight to the factory (or is a miss).
    #[must_use]
    pub fn skip_l2_reads(mut self, skip: bool) -> Self {
        self.skip_l2_reads = skip;
        self
    }

    /// Skips writing the distributed cache: changes stay in this node's L1 (and are still notified).
    #[must_use]
    pub fn skip_l2_writes(mut self, skip: bool) -> Self {
        self.skip_l2_writes = skip;
        self
    }

    /// Tags the entry (FusionCache's tags): [`FusionCache::remove_by_tag`](crate::FusionCache::remove_by_tag)
    /// later removes every entry carrying one of them, on every node. Tags are stored with the entry in L2.
    #[must_use]
    pub fn tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// With a fail-safe fallback at hand, an L2 read slower than this returns the fallback (the read
    /// goes on in the background and updates L1 when it completes), and a change waits for its L2 write
    /// at most this long (the write completes in the background).
    #[must_use]
    pub fn l2_soft_timeout(mut self, timeout: Duration) -> Self {
        self.l2_soft_timeout = Some(timeout);
        self
    }

    /// The longest an L2 call may take: a read past it counts as an L2 error (the fallback, if any, is
    /// served), a write past it as a failed write (queued for auto-recovery).
    #[must_use]
    pub fn l2_hard_timeout(mut self, timeout: Duration) -> Self {
        self.l2_hard_timeout = Some(timeout);
        self
    }

    /// Eager refresh: once an entry is older than `threshold` (0 to 1) of its duration, a hit of
    /// [`get_or_set_detached`](crate::FusionCache::get_or_set_detached) serves it and runs the factory in
    /// the background, so hot entries are renewed before they expire. Values outside `(0, 1)` disable it.
    #[must_use]
    pub fn eager_refresh(mut self, threshold: f32) -> Self {
        self.eager_refresh_threshold = (threshold > 0.0 && threshold < 1.0).then_some(threshold);
        self
    }

    /// Skips the backplane notification of this operation (the other nodes are not told).
    #[must_use]
    pub fn skip_backplane_notifications(mut self, skip: bool) -> Self {
        self.skip_backplane_notifications = skip;
        self
    }

    /// When a fail-safe fallback exists and the factory takes longer than this, the fallback is returned and
    /// the factory goes on in the background.
    #[must_use]
    pub fn factory_soft_timeout(mut self, timeout: Duration) -> Self {
        self.factory_soft_timeout = Some(timeout);
        self
    }

    /// The longest a caller waits for the factory; past it the fallback (if any) is returned, else
    /// [`Error::FactoryTimeout`](crate::Error::FactoryTimeout).
    #[must_use]
    pub fn factory_hard_timeout(mut self, timeout: Duration) -> Self {
        self.factory_hard_timeout = Some(timeout);
        self
    }

    /// Whether a timed-out factory keeps running in the background and updates the cache when it completes
    /// (default `true`).
    #[must_use]
    pub fn background_factory_completion(mut self, enabled: bool) -> Self {
        self.background_factory_completion = enabled;
        self
    }

    /// Writes to the distributed cache in the background instead of awaiting them (default `false`).
    #[must_use]
    pub fn background_l2_operations(mut self, enabled: bool) -> Self {
        self.background_l2_operations = enabled;
        self
    }

    /// Sends backplane notifications in the background instead of awaiting them (default `true`, as
    /// FusionCache): a change returns once L1 and L2 are updated. With `false`, it returns once the
    /// backplane's server has taken the notification (Redis answered the PUBLISH; NATS sent its receipt):
    /// the other nodes have it, or are about to. With a Redis L2 and a Redis backplane on one connection,
    /// the L2 write and the PUBLISH go as one pipeline (one round trip for both, and the other nodes have
    /// the notification when the call returns); Redis answers it only after it has written the message to
    /// every subscriber, so with `true` the pipeline is used only while the channel has at most 8
    /// subscribers, and with `false` always (the wait then grows with the fleet).
    #[must_use]
    pub fn background_backplane_operations(mut self, enabled: bool) -> Self {
        self.background_backplane_operations = enabled;
        self
    }

    /// Makes `set`, `remove` and `expire` return the error of a failed L2 step (default `false`: they
    /// return `Ok` once L1 is updated, as FusionCache does). Either way the failed step is queued for
    /// auto-recovery and nothing is published until it goes through.
    #[must_use]
    pub fn surface_l2_errors(mut self, enabled: bool) -> Self {
        self.surface_l2_errors = enabled;
        self
    }

    /// The freshness of the entry in the distributed cache.
    pub fn get_duration(&self) -> Duration {
        self.duration
    }

    /// Whether fail-safe is enabled.
    pub fn is_fail_safe_enabled(&self) -> bool {
        self.fail_safe
    }

    /// Whether L2 is skipped (reads and writes).
    pub fn is_l2_skipped(&self) -> bool {
        self.skip_l2_reads && self.skip_l2_writes
    }

    /// The tags of the entry.
    pub fn get_tags(&self) -> &[String] {
        &self.tags
    }

    /// Whether backplane notifications are skipped.
    pub fn are_backplane_notifications_skipped(&self) -> bool {
        self.skip_backplane_notifications
    }

    /// The L1 freshness before jitter and caps.
    pub(crate) fn base_l1_duration(&self) -> Duration {
        self.l1_duration.unwrap_or(self.duration)
    }

    /// A random jitter in `0..=jitter_max`.
    pub(crate) fn jitter(&self) -> Duration {
        if self.jitter_max.is_zero() {
            Duration::ZERO
        } else {
            let max = self.jitter_max.as_micros().min(u64::MAX as u128) as u64;
            Duration::from_micros(fastrand::u64(0..=max))
        }
    }
}

/// Options of a whole cache, set through [`FusionCacheBuilder`](crate::FusionCacheBuilder).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CacheOptions {
    /// The cache name: the default channel prefix, and a label in logs and events.
    pub name: String,
    /// Overrides the cache name as the prefix of the backplane channel.
    pub channel_prefix: Option<String>,
    /// The most entries L1 holds (S3-FIFO eviction past it, per shard: approximate).
    pub l1_max_capacity: u64,
    /// A hard cap on every L1 freshness, whatever the entry options say: bounds how long a node can serve a
    /// value after a notification was silently lost.
    pub l1_max_duration: Option<Duration>,
    /// The longest any entry stays in L1 memory, fail-safe window included: expired entries that are not
    /// read again leave memory at this bound at the latest (or earlier, under capacity pressure).
    pub l1_max_retention: Duration,
    /// On backplane reconnection, mark every L1 entry stale (the node cannot know what it missed).
    pub mark_stale_on_reconnect: bool,
    /// While the backplane is disconnected, L1 entries older than this are revalidated against L2 (or the
    /// factory) before they are served; when L2 fails too, they serve only as fail-safe fallbacks.
    pub disconnected_l1_max_age: Duration,
    /// The most distributed operations queued for auto-recovery (one per key, newest wins). When full,
    /// the items that expire soonest are dropped (and counted).
    pub auto_recovery_max_items: usize,
    /// How long auto-recovery waits before retrying what failed (at most: the wait is jittered
    /// between half of it and all of it, and grows while retries keep failing, up to
    /// [`auto_recovery_max_delay`](Self::auto_recovery_max_delay)). It retries at once when the
    /// backplane reconnects or L2 answers again.
    pub auto_recovery_delay: Duration,
    /// The longest wait between two auto-recovery retries.
    pub auto_recovery_max_delay: Duration,
    /// How long the backplane circuit breaker stays open after a failed publish: publishes are queued
    /// for auto-recovery without trying the transport meanwhile.
    pub backplane_circuit_breaker_duration: Duration,
    /// How long the distributed-cache circuit breaker stays open after an L2 error: L2 is skipped meanwhile
    /// (reads fall back to L1 and fail-safe values), so a dead server is not hammered. Zero disables it. A
    /// backplane reconnection closes it.
    pub l2_circuit_breaker_duration: Duration,
    /// The most L1 reloads from L2 (after remote `set` notifications) waiting at once; they are read in
    /// batches. Past it, an entry just stays stale until its next read.
    pub max_concurrent_refreshes: usize,
    /// What a tag removal does to the entries carrying the tag (default: expire them).
    pub remove_by_tag_behavior: RemoveByTagBehavior,
    /// How long tag removal and clear timestamps are kept in L2: longer than any entry can live there
    /// (its duration, or its fail-safe maximum), or an older entry would come back (default 7 days).
    pub tag_retention: Duration,
    /// A node that tells the others of its changes but never acts on theirs (FusionCache's
    /// `IgnoreIncomingBackplaneNotifications`).
    pub ignore_incoming_notifications: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            name: crate::DEFAULT_CACHE_NAME.to_string(),
            channel_prefix: None,
            l1_max_capacity: 100_000,
            l1_max_duration: None,
            l1_max_retention: Duration::from_secs(24 * 3600),
            mark_stale_on_reconnect: true,
            disconnected_l1_max_age: Duration::ZERO,
            auto_recovery_max_items: 10_000,
            auto_recovery_delay: Duration::from_secs(2),
            auto_recovery_max_delay: Duration::from_secs(10),
            backplane_circuit_breaker_duration: Duration::from_secs(1),
            l2_circuit_breaker_duration: Duration::from_secs(1),
            max_concurrent_refreshes: 4096,
            remove_by_tag_behavior: RemoveByTagBehavior::Expire,
            tag_retention: Duration::from_secs(7 * 24 * 3600),
            ignore_incoming_notifications: false,
        }
    }
}
