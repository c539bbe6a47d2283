//! The hybrid cache.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quanta::Instant;
use tokio::sync::{watch, Semaphore};

use crate::backplane::{now_ticks, Action};
use crate::entry::{L1Entry, Lifetime};
use crate::error::{BoxError, Error};
use crate::events::{CacheEvent, CacheStats, Counters, Telemetry};
use crate::l2::{l2_envelope_now_ms, DistributedCache, L2Envelope, L2Error};
use crate::options::{CacheOptions, EntryOptions};
use crate::recovery::{CircuitBreaker, Notifier};
use crate::serializer::Serializer;
use crate::FusionCacheBuilder;

/// The reserved key on which `clear` travels as a *set* message, so it stays inside the wire format.
pub(crate) const CLEAR_KEY: &str = "__fc:t:*";

/// The state of a cache's backplane subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            .field("backplane", &*self.inner.state.borrow())
            .finish()
    }
}

pub(crate) struct L2Layer<V> {
    pub store: Arc<dyn DistributedCache>,
    pub serializer: Arc<dyn Serializer<V>>,
    pub breaker: CircuitBreaker,
}

pub(crate) struct Inner<V> {
    pub options: CacheOptions,
    pub default_entry_options: EntryOptions,
    pub instance_id: Arc<str>,
    pub channel: String,
    pub l1: moka::sync::Cache<String, L1Entry<V>>,
    pub l2: Option<L2Layer<V>>,
    pub notifier: Option<Arc<Notifier>>,
    /// Entries created before the current epoch are stale.
    pub stale_epoch: AtomicU64,
    pub backplane_down: AtomicBool,
    pub telemetry: Arc<Telemetry>,
    pub key_locks: KeyLocks,
    pub state: watch::Sender<BackplaneState>,
    pub refreshes: Arc<Semaphore>,
    pub receiver: Mutex<Option<tokio::task::AbortHandle>>,
}

impl<V> Drop for Inner<V> {
    fn drop(&mut self) {
        if let Some(task) = self.receiver.get_mut().ok().and_then(|r| r.take()) {
            task.abort();
        }
    }
}

/// What a read found in L1.
enum L1Lookup<V> {
    Fresh(V),
    /// Present but not to be served as fresh: logically expired, marked stale, or untrusted while the
    /// backplane is down (`expired == false`).
    Stale {
        entry: L1Entry<V>,
        expired: bool,
    },
    Missing,
}

/// What a read found in L2.
enum L2Lookup<V> {
    Fresh(V),
    /// Logically expired but inside its fail-safe window.
    Stale(V, i64),
    Missing,
    Failed(L2Error),
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
        self.inner.l1.run_pending_tasks();
        self.inner.l1.entry_count()
    }

    /// Notifications waiting for the backplane to come back.
    pub fn pending_notifications(&self) -> usize {
        self.inner.notifier.as_ref().map_or(0, |n| n.pending_len())
    }

    /// The backplane state now.
    pub fn backplane_state(&self) -> BackplaneState {
        *self.inner.state.borrow()
    }

    /// Waits until the backplane subscription is active, at most `timeout`; returns whether it is.
    /// A cache without backplane returns `true` at once.
    pub async fn wait_for_backplane(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.state.subscribe();
        let ready =
            |s: &BackplaneState| matches!(s, BackplaneState::Connected | BackplaneState::Disabled);
        tokio::time::timeout(timeout, rx.wait_for(ready))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// The fresh value of `key` in this node's L1, without touching L2, counters or events.
    pub fn peek(&self, key: &str) -> Option<V> {
        match self.inner.lookup_l1(key, Instant::now()) {
            L1Lookup::Fresh(v) => Some(v),
            _ => None,
        }
    }

    /// The value of `key`: from L1, else from L2. L2 errors count as misses (after trying the fail-safe
    /// fallback); see [`try_get`](Self::try_get) to see them.
    pub async fn get(&self, key: &str) -> Option<V> {
        if let L1Lookup::Fresh(v) = self.inner.lookup_l1(key, Instant::now()) {
            self.inner.record_l1_hit(key);
            return Some(v);
        }
        Box::pin(self.inner.get_slow(key, &self.inner.default_entry_options))
            .await
            .unwrap_or(None)
    }

    /// Like [`get`](Self::get), but an L2 error with no fallback to serve is returned.
    pub async fn try_get(&self, key: &str) -> Result<Option<V>, Error> {
        if let L1Lookup::Fresh(v) = self.inner.lookup_l1(key, Instant::now()) {
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
    /// An `Err` means the L2 write failed; L1 was updated and the other nodes notified all the same.
    pub async fn set_with(&self, key: &str, value: V, options: &EntryOptions) -> Result<(), Error> {
        Inner::set_internal(&self.inner, key, value, now_ticks(), options).await
    }

    /// Removes `key` from L1 and L2 and tells the other nodes to evict it, whether or not this node held it.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        self.remove_with(key, &self.inner.default_entry_options)
            .await
    }

    /// [`remove`](Self::remove) with explicit entry options.
    pub async fn remove_with(&self, key: &str, options: &EntryOptions) -> Result<(), Error> {
        let inner = &self.inner;
        inner.l1.invalidate(key);
        Counters::incr(&inner.telemetry.counters.removes);
        inner.telemetry.emit(|| CacheEvent::Remove { key });
        let timestamp = now_ticks();
        let l2 = Arc::clone(inner);
        let owned = key.to_string();
        let l2_step = async move {
            match &l2.l2 {
                Some(layer) => l2.l2_call(Some(&owned), layer.store.remove(&owned)).await,
                None => Ok(()),
            }
        };
        Inner::write_through(inner, key, Action::Remove, timestamp, options, l2_step).await
    }

    /// Marks `key` expired: it is no longer served as fresh, but stays usable as a fail-safe fallback.
    /// The other nodes are told to do the same (to evict it, when fail-safe is off).
    pub async fn expire(&self, key: &str) -> Result<(), Error> {
        self.expire_with(key, &self.inner.default_entry_options)
            .await
    }

    /// [`expire`](Self::expire) with explicit entry options.
    pub async fn expire_with(&self, key: &str, options: &EntryOptions) -> Result<(), Error> {
        let inner = &self.inner;
        if !options.fail_safe {
            return self.remove_with(key, options).await;
        }
        inner.mark_stale(key, |_| true);
        Counters::incr(&inner.telemetry.counters.expires);
        inner.telemetry.emit(|| CacheEvent::Expire { key });
        let timestamp = now_ticks();
        let l2 = Arc::clone(inner);
        let owned = key.to_string();
        let l2_step = async move {
            let Some(layer) = &l2.l2 else { return Ok(()) };
            let store = &layer.store;
            let Some(bytes) = l2.l2_call(Some(&owned), store.get(&owned)).await? else {
                return Ok(());
            };
            let mut env = L2Envelope::decode(&owned, bytes)?;
            let now_ms = l2_envelope_now_ms();
            let ttl = env.fail_safe_remaining(now_ms);
            if ttl.is_zero() {
                return l2.l2_call(Some(&owned), store.remove(&owned)).await;
            }
            env.logical_expiry_ms = now_ms;
            let bytes = L2Envelope::encode(
                env.logical_expiry_ms,
                env.fail_safe_expiry_ms,
                timestamp,
                &env.payload,
            );
            l2.l2_call(Some(&owned), store.set(&owned, bytes, ttl))
                .await
        };
        Inner::write_through(inner, key, Action::Expire, timestamp, options, l2_step).await
    }

    /// Empties L1 and L2 and tells the other nodes to empty their L1.
    pub async fn clear(&self) -> Result<(), Error> {
        let inner = &self.inner;
        inner.l1.invalidate_all();
        inner.telemetry.emit(|| CacheEvent::Clear);
        let l2 = Arc::clone(inner);
        let l2_step = async move {
            match &l2.l2 {
                Some(layer) => l2.l2_call(None, layer.store.clear()).await,
                None => Ok(()),
            }
        };
        Inner::write_through(
            inner,
            CLEAR_KEY,
            Action::Set,
            now_ticks(),
            &inner.default_entry_options,
            l2_step,
        )
        .await
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
    /// result. With fail-safe on, a failing or timed-out factory is answered with the last known value.
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
        if let L1Lookup::Fresh(v) = inner.lookup_l1(key, Instant::now()) {
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
    fn lookup_l1(&self, key: &str, now: Instant) -> L1Lookup<V> {
        let Some(entry) = self.l1.get(key) else {
            return L1Lookup::Missing;
        };
        if !entry.is_usable(now) {
            return L1Lookup::Missing;
        }
        if entry.is_fresh(now, self.stale_epoch.load(Ordering::Acquire)) {
            if !self.backplane_down.load(Ordering::Acquire)
                || now.duration_since(entry.created_at) <= self.options.disconnected_l1_max_age
            {
                return L1Lookup::Fresh(entry.value);
            }
            return L1Lookup::Stale {
                entry,
                expired: false,
            };
        }
        L1Lookup::Stale {
            entry,
            expired: true,
        }
    }

    #[inline]
    fn record_l1_hit(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.l1_hits);
        self.telemetry.emit(|| CacheEvent::Hit {
            key,
            from_l2: false,
        });
    }

    fn record_l2_hit(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.l2_hits);
        self.telemetry
            .emit(|| CacheEvent::Hit { key, from_l2: true });
    }

    fn record_miss(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.misses);
        self.telemetry.emit(|| CacheEvent::Miss { key });
    }

    fn record_stale(&self, key: &str) {
        Counters::incr(&self.telemetry.counters.stale_served);
        self.telemetry.emit(|| CacheEvent::StaleServed { key });
    }

    async fn get_or_set_slow<F, Fut, E>(
        inner: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let _guard = inner.key_locks.lock(key).await;

        // Someone else may have filled it while we waited.
        let mut fallback: Option<(V, i64)> = None;
        match inner.lookup_l1(key, Instant::now()) {
            L1Lookup::Fresh(v) => {
                inner.record_l1_hit(key);
                return Ok(v);
            }
            L1Lookup::Stale { entry, .. } if entry.is_usable(Instant::now()) => {
                fallback = Some((entry.value, entry.timestamp));
            }
            _ => {}
        }
        if inner.l2.is_some() && !options.skip_l2 {
            match inner.lookup_l2(key, options).await {
                L2Lookup::Fresh(v) => {
                    inner.record_l2_hit(key);
                    return Ok(v);
                }
                L2Lookup::Stale(v, ts) if fallback.as_ref().is_none_or(|(_, t)| *t < ts) => {
                    fallback = Some((v, ts))
                }
                _ => {}
            }
        }
        let fallback = fallback.filter(|_| options.fail_safe);
        Self::run_factory(inner, key, options, factory(), fallback).await
    }

    /// A read that L1 could not answer as fresh.
    async fn get_slow(&self, key: &str, options: &EntryOptions) -> Result<Option<V>, Error> {
        let l1 = self.lookup_l1(key, Instant::now());
        if self.l2.is_none() || options.skip_l2 {
            self.record_miss(key);
            return Ok(None);
        }
        match self.lookup_l2(key, options).await {
            L2Lookup::Fresh(v) => {
                self.record_l2_hit(key);
                Ok(Some(v))
            }
            L2Lookup::Stale(..) | L2Lookup::Missing => {
                if let L1Lookup::Stale { expired: false, .. } = l1 {
                    // Untrusted only because the backplane is down, and L2 no longer has it.
                    self.l1.invalidate(key);
                }
                self.record_miss(key);
                Ok(None)
            }
            L2Lookup::Failed(error) => match l1 {
                // Not expired, only unverifiable: serve it.
                L1Lookup::Stale {
                    entry,
                    expired: false,
                } => {
                    self.record_l1_hit(key);
                    Ok(Some(entry.value.clone()))
                }
                L1Lookup::Stale {
                    entry,
                    expired: true,
                } if options.fail_safe && entry.is_usable(Instant::now()) => {
                    self.record_stale(key);
                    Ok(Some(entry.value.clone()))
                }
                _ => {
                    self.record_miss(key);
                    Err(Error::L2(error))
                }
            },
        }
    }

    /// Reads `key` from L2 and, when fresh, puts it in L1.
    async fn lookup_l2(&self, key: &str, options: &EntryOptions) -> L2Lookup<V> {
        let Some(layer) = &self.l2 else {
            return L2Lookup::Missing;
        };
        let bytes = match self.l2_call(Some(key), layer.store.get(key)).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return L2Lookup::Missing,
            Err(e) => return L2Lookup::Failed(e),
        };
        let decoded = L2Envelope::decode(key, bytes).and_then(|env| {
            layer
                .serializer
                .deserialize(&env.payload)
                .map(|v| (env, v))
                .map_err(|e| L2Error::Corrupt {
                    key: key.to_string(),
                    reason: e.to_string(),
                })
        });
        let (env, value) = match decoded {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(cache = %self.options.name, key, error = %e, "unreadable L2 entry ignored");
                self.record_l2_error(Some(key), &e);
                return L2Lookup::Missing;
            }
        };
        let now_ms = l2_envelope_now_ms();
        let fresh_for = env.remaining(now_ms);
        if fresh_for.is_zero() {
            return if env.fail_safe_remaining(now_ms).is_zero() {
                L2Lookup::Missing
            } else {
                L2Lookup::Stale(value, env.timestamp)
            };
        }
        let lifetime = self.lifetime_from_l2(options, fresh_for, env.fail_safe_remaining(now_ms));
        self.insert_l1(key, value.clone(), env.timestamp, lifetime);
        L2Lookup::Fresh(value)
    }

    /// Awaits an L2 operation through the circuit breaker, recording failures.
    pub(crate) async fn l2_call<T>(
        &self,
        key: Option<&str>,
        op: impl Future<Output = Result<T, L2Error>>,
    ) -> Result<T, L2Error> {
        let Some(layer) = &self.l2 else {
            return Err(L2Error::Unavailable("no distributed cache".into()));
        };
        if layer.breaker.is_open() {
            return Err(L2Error::CircuitOpen);
        }
        match op.await {
            Ok(v) => {
                layer.breaker.reset();
                Ok(v)
            }
            Err(e) => {
                layer.breaker.trip();
                self.record_l2_error(key, &e);
                Err(e)
            }
        }
    }

    fn record_l2_error(&self, key: Option<&str>, error: &L2Error) {
        Counters::incr(&self.telemetry.counters.l2_errors);
        tracing::warn!(cache = %self.options.name, key, %error, "distributed cache error");
        self.telemetry.emit(|| CacheEvent::L2Error {
            key,
            error: error.to_string(),
        });
    }

    fn cap(&self, d: Duration) -> Duration {
        match self.options.l1_max_duration {
            Some(cap) => d.min(cap),
            None => d,
        }
    }

    pub(crate) fn lifetime_from_options(&self, options: &EntryOptions) -> Lifetime {
        let fresh_for = self.cap(options.base_l1_duration().saturating_add(options.jitter()));
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
        let fresh_for = self.cap(fresh_for);
        Lifetime {
            fresh_for,
            usable_for: fail_safe_remaining.max(fresh_for),
        }
    }

    pub(crate) fn insert_l1(&self, key: &str, value: V, timestamp: i64, lifetime: Lifetime) {
        if lifetime.usable_for.is_zero() {
            self.l1.invalidate(key);
            return;
        }
        let epoch = self.stale_epoch.load(Ordering::Acquire);
        let entry = L1Entry::new(value, timestamp, Instant::now(), lifetime, epoch);
        self.l1.insert(key.to_string(), entry);
    }

    /// Marks the L1 entry of `key` stale when `condition` holds for it, atomically with other writers (a
    /// newer entry written meanwhile is left alone by a condition on its timestamp). Returns whether the
    /// entry exists and meets the condition (stale now, whether or not it was before).
    pub(crate) fn mark_stale(
        &self,
        key: &str,
        condition: impl FnOnce(&L1Entry<V>) -> bool,
    ) -> bool {
        let mut matched = false;
        self.l1
            .entry_by_ref(key)
            .and_compute_with(|current| match current {
                Some(e) if condition(e.value()) => {
                    matched = true;
                    if e.value().stale {
                        return moka::ops::compute::Op::Nop;
                    }
                    let mut stale = e.into_value();
                    stale.stale = true;
                    moka::ops::compute::Op::Put(stale)
                }
                _ => moka::ops::compute::Op::Nop,
            });
        matched
    }

    /// Marks every L1 entry stale (O(1): bumps the epoch).
    pub(crate) fn mark_all_stale(&self) {
        self.stale_epoch.fetch_add(1, Ordering::AcqRel);
        Counters::incr(&self.telemetry.counters.l1_mark_all_stale);
        self.telemetry.emit(|| CacheEvent::L1MarkedStale);
    }

    pub(crate) async fn set_internal(
        this: &Arc<Self>,
        key: &str,
        value: V,
        timestamp: i64,
        options: &EntryOptions,
    ) -> Result<(), Error> {
        let lifetime = this.lifetime_from_options(options);
        let l2_payload = match &this.l2 {
            Some(layer) if !options.skip_l2 => Some(layer.serializer.serialize(&value)?),
            _ => None,
        };
        this.insert_l1(key, value, timestamp, lifetime);
        Counters::incr(&this.telemetry.counters.sets);
        this.telemetry.emit(|| CacheEvent::Set { key });

        let inner = Arc::clone(this);
        let owned = key.to_string();
        let duration = options.duration;
        let fail_safe = options.fail_safe.then_some(options.fail_safe_max_duration);
        let l2_step = async move {
            let (Some(layer), Some(payload)) = (&inner.l2, l2_payload) else {
                return Ok(());
            };
            let now_ms = l2_envelope_now_ms();
            let logical = now_ms.saturating_add(duration.as_millis() as i64);
            let ttl = fail_safe.map_or(duration, |fs| fs.max(duration));
            let usable = now_ms.saturating_add(ttl.as_millis() as i64);
            let bytes = L2Envelope::encode(logical, usable, timestamp, &payload);
            inner
                .l2_call(Some(&owned), layer.store.set(&owned, bytes, ttl))
                .await
        };
        Self::write_through(this, key, Action::Set, timestamp, options, l2_step).await
    }

    /// After an L1 change: the L2 step, then the notification, each awaited or in the background as the
    /// options say, always in that order.
    async fn write_through(
        this: &Arc<Self>,
        key: &str,
        action: Action,
        timestamp: i64,
        options: &EntryOptions,
        l2_step: impl Future<Output = Result<(), L2Error>> + Send + 'static,
    ) -> Result<(), Error> {
        let uses_l2 = this.l2.is_some() && !options.skip_l2;
        let notifier = this
            .notifier
            .clone()
            .filter(|_| !options.skip_backplane_notifications);
        let owned = key.to_string();
        let notify = async move {
            if let Some(n) = notifier {
                n.publish(&owned, action, timestamp).await;
            }
        };
        if uses_l2 && options.background_l2_operations {
            tokio::spawn(async move {
                let _ = l2_step.await;
                notify.await;
            });
            return Ok(());
        }
        let l2_result = if uses_l2 { l2_step.await } else { Ok(()) };
        if options.background_backplane_operations {
            tokio::spawn(notify);
        } else {
            notify.await;
        }
        l2_result.map_err(Error::L2)
    }

    async fn run_factory<Fut, E>(
        this: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        fut: Fut,
        fallback: Option<(V, i64)>,
    ) -> Result<V, Error>
    where
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        Counters::incr(&this.telemetry.counters.factory_runs);
        let soft = options.factory_soft_timeout.filter(|_| fallback.is_some());
        let timeout = match (soft, options.factory_hard_timeout) {
            (Some(s), Some(h)) => Some(s.min(h)),
            (s, h) => s.or(h),
        };
        let outcome: Result<V, Error> = match timeout {
            None => fut.await.map_err(|e| Error::Factory {
                key: key.to_string(),
                source: e.into(),
            }),
            Some(timeout) => {
                let mut task = tokio::spawn(fut);
                match tokio::time::timeout(timeout, &mut task).await {
                    Ok(Ok(result)) => result.map_err(|e| Error::Factory {
                        key: key.to_string(),
                        source: e.into(),
                    }),
                    Ok(Err(join)) => Err(Error::FactoryAborted {
                        key: key.to_string(),
                        reason: join.to_string(),
                    }),
                    Err(_) => {
                        if options.background_factory_completion {
                            Self::complete_in_background(this, key, options, task);
                        } else {
                            task.abort();
                        }
                        Err(Error::FactoryTimeout {
                            key: key.to_string(),
                            timeout,
                        })
                    }
                }
            }
        };
        match outcome {
            Ok(value) => {
                this.telemetry
                    .emit(|| CacheEvent::FactoryRun { key, success: true });
                // The value is good even when L2 fails: serve it, the L2 error is already recorded.
                let _ = Self::set_internal(this, key, value.clone(), now_ticks(), options).await;
                Ok(value)
            }
            Err(error) => {
                Counters::incr(&this.telemetry.counters.factory_errors);
                this.telemetry.emit(|| CacheEvent::FactoryRun {
                    key,
                    success: false,
                });
                match fallback {
                    Some((value, timestamp)) => {
                        tracing::warn!(cache = %this.options.name, key, %error, "factory failed; serving the fail-safe value");
                        // Serve the fallback as fresh for the throttle duration, locally only.
                        let throttle = this.cap(options.fail_safe_throttle_duration);
                        let lifetime = Lifetime {
                            fresh_for: throttle,
                            usable_for: options.fail_safe_max_duration.max(throttle),
                        };
                        this.insert_l1(key, value.clone(), timestamp, lifetime);
                        this.record_stale(key);
                        Ok(value)
                    }
                    None => Err(error),
                }
            }
        }
    }

    fn complete_in_background<E: Into<BoxError> + Send + 'static>(
        this: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        task: tokio::task::JoinHandle<Result<V, E>>,
    ) {
        let inner = Arc::downgrade(this);
        let key = key.to_string();
        let options = options.clone();
        tokio::spawn(async move {
            if let Ok(Ok(value)) = task.await {
                if let Some(inner) = inner.upgrade() {
                    let _ = Self::set_internal(&inner, &key, value, now_ticks(), &options).await;
                }
            }
        });
    }
}

/// One async lock per key being loaded, removed when its last user is done.
#[derive(Default)]
pub(crate) struct KeyLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub(crate) struct KeyLockGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyLocks {
    pub async fn lock(&self, key: &str) -> KeyLockGuard<'_> {
        let lock = self
            .map
            .lock()
            .expect("key locks")
            .entry(key.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        KeyLockGuard {
            locks: self,
            key: key.to_string(),
            lock: Some(lock),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().expect("key locks").len()
    }
}

impl Drop for KeyLockGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        if let Some(lock) = self.lock.take() {
            let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
            // The map's reference and ours: nobody else is waiting.
            if Arc::strong_count(&lock) == 2 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn key_locks_are_released_after_a_factory_run() {
        let cache: FusionCache<u32> = FusionCache::builder().build().unwrap();
        let v = cache
            .get_or_set("k", || async { Ok::<_, std::io::Error>(7) })
            .await
            .unwrap();
        assert_eq!(v, 7);
        assert_eq!(cache.inner.key_locks.len(), 0);
    }
}
