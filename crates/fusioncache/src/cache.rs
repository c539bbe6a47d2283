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

use quanta::Instant;
use tokio::sync::Semaphore;

use crate::auto_recovery::{AutoRecovery, PendingRead, RecoveryItem};
use crate::backplane::{now_ticks, Action};
use crate::backplane_accessor::BackplaneAccessor;
use crate::error::{BoxError, Error};
use crate::events::{CacheEvent, CacheStats, Counters, Telemetry};
use crate::factory::KeyLocks;
use crate::guard::{Hold, KeyGuard};
use crate::l1::{L1Lookup, Lifetime, L1};
use crate::l2::{l2_envelope_now_ms, L2Envelope};
use crate::l2_accessor::{L2Accessor, L2Entry, L2Read, L2Write};
use crate::options::{CacheOptions, EntryOptions};
use crate::FusionCacheBuilder;

/// The reserved key on which `clear` travels as a *set* message, so it stays inside the wire format.
pub(crate) const CLEAR_KEY: &str = "__fc:t:*";

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
    pub refreshes: Arc<Semaphore>,
    /// The background tasks (receiver, auto-recovery), aborted when the cache goes.
    pub tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    pub recovery_started: std::sync::Once,
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

    /// The number of entries in L1 (approximate, as moka's).
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
        match self.inner.lookup_l1(key) {
            L1Lookup::Fresh(v) => Some(v),
            _ => None,
        }
    }

    /// The value of `key`: from L1, else from L2. L2 errors count as misses (after trying the fail-safe
    /// fallback); see [`try_get`](Self::try_get) to see them.
    pub async fn get(&self, key: &str) -> Option<V> {
        if let L1Lookup::Fresh(v) = self.inner.lookup_l1(key) {
            self.inner.record_l1_hit(key);
            return Some(v);
        }
        Box::pin(self.inner.get_slow(key, &self.inner.default_entry_options))
            .await
            .unwrap_or(None)
    }

    /// Like [`get`](Self::get), but an L2 error with no fallback to serve is returned.
    pub async fn try_get(&self, key: &str) -> Result<Option<V>, Error> {
        if let L1Lookup::Fresh(v) = self.inner.lookup_l1(key) {
            self.inner.record_l1_hit(key);
            return Ok(Some(v));
        }
        Box::pin(self.inner.get_slow(key, &self.inner.default_entry_options)).await
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
        Inner::set_held(&self.inner, hold, value, timestamp, options).await
    }

    /// Removes `key` from L1 and L2 and tells the other nodes to evict it, whether or not this node held it.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        self.remove_with(key, &self.inner.default_entry_options)
            .await
    }

    /// [`remove`](Self::remove) with explicit entry options.
    pub async fn remove_with(&self, key: &str, options: &EntryOptions) -> Result<(), Error> {
        let inner = &self.inner;
        let timestamp = now_ticks();
        let hold = inner.guard.hold(key, Some(timestamp));
        inner.l1.remove(key);
        Counters::incr(&inner.telemetry.counters.removes);
        inner.telemetry.emit(|| CacheEvent::Remove { key });
        Inner::distribute(
            inner,
            hold,
            Action::Remove,
            timestamp,
            Some(L2Write::Remove),
            options,
        )
        .await
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
        let inner = &self.inner;
        let timestamp = now_ticks();
        let hold = inner.guard.hold(key, Some(timestamp));
        inner.l1.mark_stale(key, |_| true);
        Counters::incr(&inner.telemetry.counters.expires);
        inner.telemetry.emit(|| CacheEvent::Expire { key });
        Inner::distribute(
            inner,
            hold,
            Action::Expire,
            timestamp,
            Some(L2Write::Remove),
            options,
        )
        .await
    }

    /// Empties L1 and L2 and tells the other nodes to empty their L1.
    pub async fn clear(&self) -> Result<(), Error> {
        let inner = &self.inner;
        inner.l1.clear();
        inner.telemetry.emit(|| CacheEvent::Clear);
        let options = &inner.default_entry_options;
        let l2_result = match &inner.l2 {
            Some(l2) if !options.skip_l2 => l2.clear().await,
            _ => Ok(()),
        };
        if let Err(error) = l2_result {
            return Err(Error::L2(error));
        }
        let hold = inner.guard.hold(CLEAR_KEY, Some(now_ticks()));
        let publish_only = options.clone().skip_l2(true);
        Inner::distribute(inner, hold, Action::Set, now_ticks(), None, &publish_only).await
    }

    /// The value of `key`, or the factory's, which is then cached. See
    /// [`get_or_set_with`](Self::get_or_set_with).
    pub async fn get_or_set<F, Fut, E>(&self, key: &str, factory: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
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
    pub async fn get_or_set_with<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let inner = &self.inner;
        if let L1Lookup::Fresh(v) = inner.lookup_l1(key) {
            inner.record_l1_hit(key);
            return Ok(v);
        }
        // The slow path is boxed so that the future of a hit stays small (it is moved on every call).
        Box::pin(Inner::get_or_set_slow(inner, key, options, factory)).await
    }
}

impl<V> Inner<V>
where
    V: Clone + Send + Sync + 'static,
{
    #[inline]
    pub(crate) fn lookup_l1(&self, key: &str) -> L1Lookup<V> {
        let untrusted_after = self
            .backplane
            .as_ref()
            .filter(|b| b.is_down())
            .map(|_| self.options.disconnected_l1_max_age);
        self.l1.lookup(key, Instant::now(), untrusted_after)
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

    /// Marks every L1 entry stale (O(1)).
    pub(crate) fn mark_all_stale(&self) {
        self.l1.mark_all_stale();
        Counters::incr(&self.telemetry.counters.l1_mark_all_stale);
        self.telemetry.emit(|| CacheEvent::L1MarkedStale);
    }

    /// A read that L1 could not answer as fresh.
    async fn get_slow(&self, key: &str, options: &EntryOptions) -> Result<Option<V>, Error> {
        let l1 = self.lookup_l1(key);
        if self.l2.is_none() || options.skip_l2 {
            self.record_miss(key);
            return Ok(None);
        }
        let hold = self.guard.hold(key, None);
        match self.read_l2(key).await {
            L2Read::Found(entry) if !entry.fresh_for.is_zero() => {
                self.record_l2_hit(key);
                Ok(Some(self.install_from_l2(&hold, key, entry, options)))
            }
            L2Read::Found(_) | L2Read::Missing => {
                if let L1Lookup::Stale { expired: false, .. } = l1 {
                    // Untrusted only because the backplane is down, and L2 no longer has it.
                    self.l1.remove(key);
                }
                self.record_miss(key);
                Ok(None)
            }
            L2Read::Failed(error) => match l1 {
                // Not expired, only unverifiable: serve it.
                L1Lookup::Stale {
                    entry,
                    expired: false,
                } => {
                    self.record_l1_hit(key);
                    Ok(Some(entry.value))
                }
                L1Lookup::Stale {
                    entry,
                    expired: true,
                } if options.fail_safe && entry.is_usable(Instant::now()) => {
                    self.record_stale(key);
                    Ok(Some(entry.value))
                }
                _ => {
                    self.record_miss(key);
                    Err(Error::L2(error))
                }
            },
        }
    }

    /// What L2 holds for `key`, as this node must see it: a change of its own still queued for
    /// auto-recovery comes first (read your writes while L2 is down or behind).
    pub(crate) async fn read_l2(&self, key: &str) -> L2Read<V> {
        let Some(l2) = &self.l2 else {
            return L2Read::Missing;
        };
        match self.recovery.pending_read(key) {
            Some(PendingRead::Gone) => return L2Read::Missing,
            Some(PendingRead::Written(bytes)) => {
                return L2Envelope::decode(key, bytes.to_vec())
                    .ok()
                    .and_then(|env| l2.decode(key, &env))
                    .map_or(L2Read::Missing, L2Read::Found);
            }
            None => {}
        }
        let (read, recovered) = l2.read(key).await;
        if recovered {
            self.recovery.kick();
        }
        read
    }

    /// Puts a fresh value read from L2 in L1, unless the guard or a newer L1 entry says it is outdated;
    /// returns the value either way (the caller asked while it was current).
    pub(crate) fn install_from_l2(
        &self,
        hold: &Hold,
        key: &str,
        entry: L2Entry<V>,
        options: &EntryOptions,
    ) -> V {
        let lifetime = self.lifetime_from_l2(options, entry.fresh_for, entry.usable_for);
        let l1_entry = self
            .l1
            .entry(entry.value.clone(), entry.timestamp, lifetime);
        hold.install(entry.timestamp, || self.l1.install(key, l1_entry));
        entry.value
    }

    /// After auto-recovery found a newer write of `key` in L2: replace this node's older copy with it.
    pub(crate) fn refresh_from_envelope(&self, hold: &Hold, key: &str, env: L2Envelope) {
        let Some(l2) = &self.l2 else { return };
        let Some(entry) = l2.decode(key, &env) else {
            return;
        };
        let lifetime = self.lifetime_from_l2(
            &self.default_entry_options,
            entry.fresh_for,
            entry.usable_for,
        );
        if lifetime.fresh_for.is_zero() {
            return self.l1.remove(key);
        }
        let l1_entry = self.l1.entry(entry.value, entry.timestamp, lifetime);
        hold.install(entry.timestamp, || self.l1.refresh(key, l1_entry));
    }

    /// After a remote *set* of `key` at `notified_at`: reloads the (now stale) L1 entry from L2 in the
    /// background, if L2 holds that write or a newer one.
    pub(crate) fn refresh_in_background(self: &Arc<Self>, key: &str, notified_at: i64) {
        // When too many refreshes are running, the entry just stays stale: the next read goes to L2.
        let Ok(permit) = Arc::clone(&self.refreshes).try_acquire_owned() else {
            return;
        };
        let inner = Arc::clone(self);
        let hold = self.guard.hold(key, None);
        tokio::spawn(async move {
            let _permit = permit;
            let Some(l2) = &inner.l2 else { return };
            let key = hold.key();
            let Ok((Some(env), _)) = l2.read_envelope(key, false).await else {
                return;
            };
            if env.timestamp < notified_at {
                return; // L2 does not hold the notified write (yet): stay stale.
            }
            inner.refresh_from_envelope(&hold, key, env);
        });
    }

    pub(crate) fn lifetime_from_options(&self, options: &EntryOptions) -> Lifetime {
        let fresh_for = self
            .l1
            .cap(options.base_l1_duration().saturating_add(options.jitter()));
        let usable_for = if options.fail_safe {
            options.fail_safe_max_duration.max(fresh_for)
        } else {
            fresh_for
        };
        Lifetime {
            fresh_for,
            usable_for,
        }
    }

    pub(crate) fn lifetime_from_l2(
        &self,
        options: &EntryOptions,
        remaining: Duration,
        fail_safe_remaining: Duration,
    ) -> Lifetime {
        let mut fresh_for = remaining;
        if let Some(l1) = options.l1_duration {
            fresh_for = fresh_for.min(l1);
        }
        let fresh_for = self.l1.cap(fresh_for);
        Lifetime {
            fresh_for,
            usable_for: fail_safe_remaining.max(fresh_for),
        }
    }

    /// `set` of a key already held for the write at `timestamp`.
    pub(crate) async fn set_held(
        this: &Arc<Self>,
        hold: Hold,
        value: V,
        timestamp: i64,
        options: &EntryOptions,
    ) -> Result<(), Error> {
        let key = hold.key().to_string();
        let l2_write = match &this.l2 {
            Some(l2) if !options.skip_l2 => Some(l2.encode(&value, timestamp, options)?),
            _ => None,
        };
        let lifetime = this.lifetime_from_options(options);
        this.l1
            .write(&key, this.l1.entry(value, timestamp, lifetime));
        Counters::incr(&this.telemetry.counters.sets);
        this.telemetry.emit(|| CacheEvent::Set { key: &key });
        Self::distribute(this, hold, Action::Set, timestamp, l2_write, options).await
    }

    /// The distributed part of a change already applied to L1: the L2 step, then the notification, each
    /// awaited or in the background as `options` say, always in that order. What fails is queued for
    /// auto-recovery; the hold protects the key until the L2 step is done or queued.
    async fn distribute(
        this: &Arc<Self>,
        hold: Hold,
        action: Action,
        timestamp: i64,
        l2_write: Option<L2Write>,
        options: &EntryOptions,
    ) -> Result<(), Error> {
        let l2_write = l2_write.filter(|_| this.l2.is_some() && !options.skip_l2);
        let publish = this.backplane.is_some() && !options.skip_backplane_notifications;
        if l2_write.is_none() && !publish {
            return Ok(());
        }
        let op = DistributedOp {
            action,
            timestamp,
            l2_write,
            publish,
            background_publish: options.background_backplane_operations,
            expires_at_ms: l2_envelope_now_ms()
                .saturating_add(relevance(options).as_millis() as i64),
        };
        if op.l2_write.is_some() && options.background_l2_operations {
            let this = Arc::clone(this);
            tokio::spawn(async move {
                let _ = this.run_distributed(hold, op).await;
            });
            return Ok(());
        }
        match this.run_distributed(hold, op).await {
            Err(error) if options.surface_l2_errors => Err(Error::L2(error)),
            _ => Ok(()),
        }
    }

    async fn run_distributed(
        self: &Arc<Self>,
        hold: Hold,
        op: DistributedOp,
    ) -> Result<(), crate::l2::L2Error> {
        let key = hold.key();
        if let (Some(write), Some(l2)) = (&op.l2_write, &self.l2) {
            match l2.write(key, write, false).await {
                Ok(recovered) => {
                    if recovered {
                        self.recovery.kick();
                    }
                }
                Err(error) => {
                    let item = RecoveryItem::new(
                        op.action,
                        op.timestamp,
                        op.l2_write,
                        op.publish,
                        op.expires_at_ms,
                    );
                    self.queue_for_recovery(key, item);
                    return Err(error);
                }
            }
        }
        if op.publish {
            let key = key.to_string();
            drop(hold);
            if op.background_publish {
                let this = Arc::clone(self);
                tokio::spawn(async move { this.publish_or_queue(&key, &op).await });
            } else {
                self.publish_or_queue(&key, &op).await;
            }
        }
        Ok(())
    }

    async fn publish_or_queue(self: &Arc<Self>, key: &str, op: &DistributedOp) {
        let Some(bp) = &self.backplane else { return };
        if bp
            .publish(key, op.action, op.timestamp, false)
            .await
            .is_err()
        {
            let item = RecoveryItem::new(op.action, op.timestamp, None, true, op.expires_at_ms);
            self.queue_for_recovery(key, item);
        }
    }

    /// Queues `item` and makes sure the auto-recovery task runs.
    fn queue_for_recovery(self: &Arc<Self>, key: &str, item: RecoveryItem) {
        self.recovery_started.call_once(|| {
            let task = tokio::spawn(crate::auto_recovery::run(
                Arc::clone(&self.recovery),
                Arc::downgrade(self),
            ));
            self.tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task.abort_handle());
        });
        self.recovery.push(key, item);
    }
}

/// A change's distributed part, as it is run (and queued, if it fails).
struct DistributedOp {
    action: Action,
    timestamp: i64,
    l2_write: Option<L2Write>,
    publish: bool,
    background_publish: bool,
    expires_at_ms: i64,
}

/// How long a change matters: until any copy of the entry it replaces would have expired anyway.
fn relevance(options: &EntryOptions) -> Duration {
    if options.fail_safe {
        options.fail_safe_max_duration.max(options.duration)
    } else {
        options.duration
    }
}
