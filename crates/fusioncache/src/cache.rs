//! The hybrid cache: its public operations and how each one moves through L1, L2 and the backplane.
//!
//! The layers each have one accessor: [`L1`](crate::l1::L1), the
//! [`L2Accessor`](crate::l2_accessor::L2Accessor), the
//! [`BackplaneAccessor`](crate::backplane_accessor::BackplaneAccessor), with the
//! [`KeyGuard`](crate::guard::KeyGuard) keeping older values out of L1 and
//! [`AutoRecovery`](crate::auto_recovery::AutoRecovery) retrying what failed. This file only sequences them.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::Instrument;

use crate::auto_recovery::AutoRecovery;
use crate::backplane::{now_ticks, Action};
use crate::backplane_accessor::BackplaneAccessor;
use crate::error::{BoxError, Error};
use crate::events::{CacheEvent, CacheStats};
use crate::factory::{FactoryContext, KeyLocks};
use crate::guard::KeyGuard;
use crate::l1::{L1Lookup, L1};
use crate::l2_accessor::{L2Accessor, L2Write};
use crate::options::{CacheOptions, EntryOptions};
use crate::telemetry::{Counters, Telemetry};
use crate::FusionCacheBuilder;

/// The state of a cache's backplane subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackplaneState {
    /// The cache has no backplane.
    Disabled,
    /// Subscribing, not yet active.
    Connecting,
    /// Active: notifications flow both ways.
    Connected,
    /// The connection was lost; the transport is reconnecting.
    Disconnected,
}

/// A hybrid cache: L1 in memory, an optional distributed L2, an optional backplane.
///
/// Cloning is cheap and gives another handle to the same cache (one node). Values are cloned out of L1 on
/// every read, so wrap large values in an `Arc`.
///
/// # Guarantees
///
/// - **Read your writes**: after `set`, `remove` or `expire` returns, this node serves the new state (or
///   nothing newer than it), even if L2 failed: an L1 entry is never replaced by an older value read from
///   L2, and no read in flight installs a value older than a write or invalidation this node has seen for
///   the key (its own, or another node's notification).
/// - **No lost writes**: when the L2 step of a change fails, nothing is published (the others would re-read
///   the old value); the change is queued for auto-recovery (see [`CacheOptions::auto_recovery_delay`])
///   and retried until it goes through, unless a newer write of the key supersedes it. A failed publish is
///   retried the same way. Until then this node's reads answer from the queued change.
/// - By default `set`/`remove`/`expire` return `Ok` once L1 is updated and a failed L2 step is queued
///   (as FusionCache does); [`EntryOptions::surface_l2_errors`] returns the L2 error instead (the change
///   is queued all the same).
///
/// ```
/// use fusioncache::{FusionCache, backplane::MemoryBackplane, l2::MemoryDistributedCache};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), fusioncache::Error> {
/// // Two nodes of one cache, sharing an L2 and a backplane.
/// let (l2, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
/// let node = |_| FusionCache::<u64>::builder()
///     .name("stock")
///     .distributed_cache(l2.clone())
///     .backplane(bus.clone())
///     .build();
/// let (a, b) = (node(1)?, node(2)?);
/// a.wait_for_backplane(std::time::Duration::from_secs(1)).await;
/// b.wait_for_backplane(std::time::Duration::from_secs(1)).await;
///
/// a.set("sku:1", 10).await?;
/// assert_eq!(b.get("sku:1").await, Some(10)); // from L2, now in b's L1
/// a.set("sku:1", 9).await?;                    // b is told, and refreshes from L2
/// # for _ in 0..100 { if b.peek("sku:1") == Some(9) { break } tokio::time::sleep(std::time::Duration::from_millis(5)).await }
/// assert_eq!(b.get("sku:1").await, Some(9));
/// # Ok(()) }
/// ```
pub struct FusionCache<V> {
    pub(crate) inner: Arc<Inner<V>>,
}

impl<V> Clone for FusionCache<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<V> std::fmt::Debug for FusionCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusionCache")
            .field("name", &self.inner.options.name)
            .field("instance_id", &self.inner.instance_id)
            .field("l2", &self.inner.l2.is_some())
            .field(
                "backplane",
                &self
                    .inner
                    .backplane
                    .as_ref()
                    .map_or(BackplaneState::Disabled, |b| b.state()),
            )
            .finish()
    }
}

pub(crate) struct Inner<V> {
    pub options: CacheOptions,
    pub default_entry_options: EntryOptions,
    pub instance_id: Arc<str>,
    pub channel: String,
    pub l1: L1<V>,
    pub l2: Option<L2Accessor<V>>,
    pub backplane: Option<BackplaneAccessor>,
    pub recovery: Arc<AutoRecovery>,
    pub guard: Arc<KeyGuard>,
    pub telemetry: Arc<Telemetry>,
    pub key_locks: KeyLocks,
    /// The background tasks (receiver, auto-recovery), aborted when the cache goes.
    pub tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    pub recovery_started: std::sync::Once,
    /// The queue of the background publisher, started with the first background publish.
    pub publisher:
        std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::backplane_accessor::Outgoing>>,
    /// The queue of the refresher (reloads after remote *set* notifications), started on first use.
    pub refresher: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::reads::Refresh>>,
}

impl<V> Drop for Inner<V> {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

impl<V> FusionCache<V>
where
    V: Clone + Send + Sync + 'static,
{
    /// A builder for a cache of `V`.
    pub fn builder() -> FusionCacheBuilder<V> {
        FusionCacheBuilder::new()
    }

    /// The cache name.
    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// This node's unique instance id (sent with every notification; messages carrying it are ignored).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The backplane channel (and NATS subject) of this cache.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The cache options.
    pub fn options(&self) -> &CacheOptions {
        &self.inner.options
    }

    /// The entry options used when an operation is given none.
    pub fn default_entry_options(&self) -> &EntryOptions {
        &self.inner.default_entry_options
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.inner.telemetry.counters.snapshot()
    }

    /// The number of entries in L1, usable or waiting for the next sweep.
    pub fn l1_entry_count(&self) -> u64 {
        self.inner.l1.entry_count()
    }

    /// Distributed operations (L2 writes and notifications) waiting in the auto-recovery queue.
    pub fn pending_recovery(&self) -> usize {
        self.inner.recovery.len()
    }

    /// The backplane state now.
    pub fn backplane_state(&self) -> BackplaneState {
        self.inner
            .backplane
            .as_ref()
            .map_or(BackplaneState::Disabled, |b| b.state())
    }

    /// Waits until the backplane subscription is active, at most `timeout`; returns whether it is.
    /// A cache without backplane returns `true` at once.
    pub async fn wait_for_backplane(&self, timeout: Duration) -> bool {
        let Some(bp) = &self.inner.backplane else {
            return true;
        };
        let mut rx = bp.watch_state();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s == BackplaneState::Connected))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The fresh value of `key` in this node's L1, without touching L2, counters or events.
    pub fn peek(&self, key: &str) -> Option<V> {
        self.inner.fresh_l1(key)
    }

    /// The value of `key`: from L1, else from L2. L2 errors count as misses (after trying the fail-safe
    /// fallback); see [`try_get`](Self::try_get) to see them.
    pub async fn get(&self, key: &str) -> Option<V> {
        if let Some(v) = self.inner.fresh_l1(key) {
            self.inner.record_l1_hit(key);
            return Some(v);
        }
        self.inner.get_miss("get", key).await.unwrap_or(None)
    }

    /// Like [`get`](Self::get), but an L2 error with no fallback to serve is returned.
    pub async fn try_get(&self, key: &str) -> Result<Option<V>, Error> {
        if let Some(v) = self.inner.fresh_l1(key) {
            self.inner.record_l1_hit(key);
            return Ok(Some(v));
        }
        self.inner.get_miss("try_get", key).await
    }

    /// Sets `key` with the default entry options. See [`set_with`](Self::set_with).
    pub async fn set(&self, key: &str, value: V) -> Result<(), Error> {
        self.set_with(key, value, &self.inner.default_entry_options)
            .await
    }

    /// Sets `key`: L1, then L2, then one notification to the other nodes (unless `options` skip them).
    ///
    /// `Err` when the value cannot be serialized (nothing changed), or when the L2 write failed and
    /// `options` [surface L2 errors](EntryOptions::surface_l2_errors) (L1 is updated and the write queued
    /// for auto-recovery all the same).
    pub async fn set_with(&self, key: &str, value: V, options: &EntryOptions) -> Result<(), Error> {
        let timestamp = now_ticks();
        let hold = self.inner.guard.hold(key, Some(timestamp));
        Inner::set_held(&self.inner, hold, value, timestamp, options)
            .instrument(self.inner.span("set", key))
            .await
    }

    /// Removes `key` from L1 and L2 and tells the other nodes to evict it, whether or not this node held it.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        self.remove_with(key, &self.inner.default_entry_options)
            .await
    }

    /// [`remove`](Self::remove) with explicit entry options.
    pub async fn remove_with(&self, key: &str, options: &EntryOptions) -> Result<(), Error> {
        self.invalidate(key, Action::Remove, options).await
    }

    /// Expires `key`, as FusionCache does: this node keeps its copy only as a fail-safe fallback (no
    /// longer served as fresh), the L2 entry is removed, and the other nodes are told to mark theirs stale
    /// too. A node that never held the key gets nothing, not even with fail-safe. With fail-safe off in
    /// the entry options, this is a [`remove`](Self::remove).
    pub async fn expire(&self, key: &str) -> Result<(), Error> {
        self.expire_with(key, &self.inner.default_entry_options)
            .await
    }

    /// [`expire`](Self::expire) with explicit entry options.
    pub async fn expire_with(&self, key: &str, options: &EntryOptions) -> Result<(), Error> {
        if !options.fail_safe {
            return self.remove_with(key, options).await;
        }
        self.invalidate(key, Action::Expire, options).await
    }

    /// A remove or an expire: the local step (evict, or mark stale), then the L2 entry removed and the
    /// others told.
    async fn invalidate(
        &self,
        key: &str,
        action: Action,
        options: &EntryOptions,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let timestamp = now_ticks();
        let hold = inner.guard.hold(key, Some(timestamp));
        let counters = &inner.telemetry.counters;
        let operation = if action == Action::Expire {
            inner.l1.mark_stale(key, |_| true);
            Counters::incr(&counters.expires);
            inner.telemetry.emit(|| CacheEvent::Expire { key });
            "expire"
        } else {
            inner.l1.remove(key);
            Counters::incr(&counters.removes);
            inner.telemetry.emit(|| CacheEvent::Remove { key });
            "remove"
        };
        Inner::distribute(
            inner,
            hold,
            action,
            timestamp,
            Some(L2Write::Remove),
            options,
        )
        .instrument(inner.span(operation, key))
        .await
    }

    /// Removes every entry carrying `tag`, on every node (FusionCache's `RemoveByTag`): the removal is a
    /// timestamp stored in L2 under `__fc:t:{tag}` and announced as a *set* notification on that key, so
    /// it is O(1) whatever the number of entries; entries written later survive. What "removed" means is
    /// the cache's [`RemoveByTagBehavior`](crate::RemoveByTagBehavior) (default: expired, still usable as
    /// fail-safe fallbacks). An empty tag is a no-op; so, in effect, is a tag no entry carries.
    pub async fn remove_by_tag(&self, tag: &str) -> Result<(), Error> {
        self.remove_by_tags([tag]).await
    }

    /// [`remove_by_tag`](Self::remove_by_tag) for several tags.
    pub async fn remove_by_tags<T: AsRef<str>>(
        &self,
        tags: impl IntoIterator<Item = T>,
    ) -> Result<(), Error> {
        for tag in tags {
            let tag = tag.as_ref();
            if tag.is_empty() {
                continue;
            }
            Counters::incr(&self.inner.telemetry.counters.removes_by_tag);
            self.inner
                .telemetry
                .emit(|| CacheEvent::RemoveByTag { tag });
            Inner::remove_tag(&self.inner, tag)
                .instrument(tracing::debug_span!(
                    "fusioncache",
                    operation = "remove_by_tag",
                    cache = %self.inner.options.name,
                    tag
                ))
                .await?;
        }
        Ok(())
    }

    /// Expires every entry, on every node: `clear_with(true)`, FusionCache's default `Clear()`. Entries
    /// stay usable as fail-safe fallbacks; nothing is deleted from L2. See [`clear_with`](Self::clear_with).
    pub async fn clear(&self) -> Result<(), Error> {
        self.clear_with(true).await
    }

    /// Clears the cache on every node, as FusionCache does: with `allow_fail_safe`, every entry written
    /// before now counts as expired (still a fail-safe fallback; the tag `*`), without it as removed (the
    /// tag `!`). Like a tag removal it is one timestamp in L2 (`__fc:t:*` or `__fc:t:!`) plus one *set*
    /// notification, O(1) whatever the cache size, honoured by nodes started later; entries written
    /// afterwards survive. It never deletes a key from L2 (see
    /// [`RedisDistributedCache::purge`](crate::l2::redis::RedisDistributedCache::purge) to reclaim memory).
    pub async fn clear_with(&self, allow_fail_safe: bool) -> Result<(), Error> {
        let inner = &self.inner;
        let tag = if allow_fail_safe {
            crate::tags::CLEAR_EXPIRE_TAG
        } else {
            // Nothing in L1 can serve any more: free it now.
            inner.l1.clear();
            crate::tags::CLEAR_REMOVE_TAG
        };
        inner
            .telemetry
            .emit(|| CacheEvent::Clear { allow_fail_safe });
        Inner::remove_tag(inner, tag)
            .instrument(tracing::debug_span!(
                "fusioncache",
                operation = "clear",
                cache = %inner.options.name,
                allow_fail_safe
            ))
            .await
    }

    /// The value of `key`, or the factory's, which is then cached. See
    /// [`get_or_set_with`](Self::get_or_set_with).
    ///
    /// The factory may borrow (it is awaited in place):
    ///
    /// ```
    /// # use fusioncache::FusionCache;
    /// # struct Db; impl Db { async fn load_product(&self, id: u32) -> Result<String, std::io::Error> { Ok(format!("product {id}")) } }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), fusioncache::Error> {
    /// let db = Db;
    /// let products: FusionCache<String> = FusionCache::builder().build()?;
    /// let p = products.get_or_set("product:42", || async { db.load_product(42).await }).await?;
    /// assert_eq!(p, "product 42");
    /// # Ok(()) }
    /// ```
    pub async fn get_or_set<F, Fut, E>(&self, key: &str, factory: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        self.get_or_set_with(key, &self.inner.default_entry_options, factory)
            .await
    }

    /// The value of `key` from L1 or L2; on a miss, runs `factory` and caches its value (L1, L2, notification).
    ///
    /// Concurrent callers of one key on one node share a single factory run: the others wait for its
    /// result. With fail-safe on, a failing or timed-out factory is answered with the last known value. A
    /// factory run that raced a change of its key (a `set`, `remove` or `expire` here, or a notification
    /// from another node) returns its value to the caller but does not cache it.
    ///
    /// The factory is awaited in place, so it may borrow; past a factory timeout it is cancelled. For a
    /// factory that goes on in the background after a timeout, or for eager refresh, use
    /// [`get_or_set_detached`](Self::get_or_set_detached).
    pub async fn get_or_set_with<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        self.get_or_set_adaptive(key, options, |_| factory()).await
    }

    /// [`get_or_set_with`](Self::get_or_set_with) with adaptive caching: the factory gets a
    /// [`FactoryContext`] to decide the entry's tags (and duration) from what it loaded.
    ///
    /// ```
    /// # use fusioncache::{EntryOptions, FusionCache};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), fusioncache::Error> {
    /// let cache: FusionCache<String> = FusionCache::builder().build()?;
    /// let options = EntryOptions::new();
    /// let p = cache
    ///     .get_or_set_adaptive("product:42", &options, |ctx| async move {
    ///         ctx.set_tags(["category:books"]); // known only once loaded
    ///         Ok::<_, std::io::Error>("Rust in Action".to_string())
    ///     })
    ///     .await?;
    /// cache.remove_by_tag("category:books").await?;
    /// assert_eq!(cache.get("product:42").await, None);
    /// # let _ = p; Ok(()) }
    /// ```
    pub async fn get_or_set_adaptive<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce(FactoryContext) -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        let inner = &self.inner;
        if let Some(v) = inner.fresh_l1(key) {
            inner.record_l1_hit(key);
            return Ok(v);
        }
        // The slow path is boxed so that the future of a hit stays small (it is moved on every call).
        Box::pin(Inner::get_or_set_inline(inner, key, options, factory))
            .instrument(inner.span("get_or_set", key))
            .await
    }

    /// [`get_or_set_adaptive`](Self::get_or_set_adaptive) for a factory that owns what it uses
    /// (`'static`): it can run detached from the caller, so that a factory slower than its soft or hard
    /// timeout completes in the background and updates the cache
    /// ([`background_factory_completion`](EntryOptions::background_factory_completion)), and
    /// [eager refresh](EntryOptions::eager_refresh) renews hot entries before they expire.
    pub async fn get_or_set_detached<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce(FactoryContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let inner = &self.inner;
        match inner.lookup_l1_for_refresh(key) {
            L1Lookup::Fresh(v) => {
                inner.record_l1_hit(key);
                return Ok(v);
            }
            L1Lookup::FreshDue(v) => {
                inner.record_l1_hit(key);
                Inner::refresh_eagerly(inner, key, options, factory);
                return Ok(v);
            }
            _ => {}
        }
        Box::pin(Inner::get_or_set_spawned(inner, key, options, factory))
            .instrument(inner.span("get_or_set", key))
            .await
    }
}

impl<V> Inner<V>
where
    V: Clone + Send + Sync + 'static,
{
    #[inline]
    pub(crate) fn lookup_l1(&self, key: &str) -> L1Lookup<V> {
        self.l1
            .lookup(key, crate::clock::Instant::now(), self.untrusted_after())
    }

    /// The value of `key` if L1 holds it fresh (the hit path of every read; see [`L1::fresh`]).
    #[inline(always)]
    pub(crate) fn fresh_l1(&self, key: &str) -> Option<V> {
        self.l1
            .fresh(key, crate::clock::Instant::now(), self.untrusted_after())
    }

    #[inline(always)]
    fn untrusted_after(&self) -> Option<Duration> {
        self.backplane
            .as_ref()
            .filter(|b| b.is_down())
            .map(|_| self.options.disconnected_l1_max_age)
    }

    /// [`lookup_l1`](Self::lookup_l1), telling entries due for an eager refresh apart.
    pub(crate) fn lookup_l1_for_refresh(&self, key: &str) -> L1Lookup<V> {
        self.l1
            .lookup_for_refresh(key, crate::clock::Instant::now(), self.untrusted_after())
    }

    /// A `get` that L1 could not answer, boxed and in its span, so that the future of a hit stays small.
    #[inline(never)]
    fn get_miss<'a>(
        self: &'a Arc<Self>,
        operation: &'static str,
        key: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<V>, Error>> + Send + 'a>> {
        Box::pin(
            self.get_slow(key, &self.default_entry_options)
                .instrument(self.span(operation, key)),
        )
    }

    /// The span of an operation that goes past L1 (debug level: free when disabled).
    pub(crate) fn span(&self, operation: &'static str, key: &str) -> tracing::Span {
        tracing::debug_span!("fusioncache", operation, cache = %self.options.name, key)
    }

    #[inline]
    pub(crate) fn record_l1_hit(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.l1_hits);
        self.telemetry.emit(|| CacheEvent::Hit {
            key,
            from_l2: false,
        });
    }

    pub(crate) fn record_l2_hit(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.l2_hits);
        self.telemetry
            .emit(|| CacheEvent::Hit { key, from_l2: true });
    }

    pub(crate) fn record_miss(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.misses);
        self.telemetry.emit(|| CacheEvent::Miss { key });
    }

    pub(crate) fn record_stale(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.stale_served);
        self.telemetry.emit(|| CacheEvent::StaleServed { key });
    }

    /// Spawns a background task of this cache (aborted when the cache goes).
    pub(crate) fn spawn_task(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// Marks every L1 entry stale (O(1)).
    pub(crate) fn mark_all_stale(&self) {
        self.l1.mark_all_stale();
        Counters::incr(&self.telemetry.counters.l1_mark_all_stale);
        self.telemetry.emit(|| CacheEvent::L1MarkedStale);
    }
}
