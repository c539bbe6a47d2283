//! `get_or_set`: one factory run per key and node, adaptive tags, timeouts, fail-safe fallbacks, background
//! completion and eager refresh.
//!
//! A factory runs either *inline* (awaited in place, so it may borrow; past a timeout it is cancelled) or
//! *detached* (`'static`, spawned: past a timeout it completes in the background, and eager refresh can
//! run it ahead of expiry). Both share the same slow path and the same way of caching the result.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backplane::now_ticks;
use crate::cache::Inner;
use crate::error::{BoxError, Error};
use crate::events::CacheEvent;
use crate::guard::Hold;
use crate::l1::{L1Lookup, Lifetime};
use crate::options::EntryOptions;
use crate::reads::L2Outcome;
use crate::tags::TagSetId;
use crate::telemetry::Counters;

/// What a factory can decide about the entry it produces, once it knows the data (FusionCache's
/// adaptive caching). Cheap to clone; changes made through any clone count.
#[derive(Clone, Default, Debug)]
pub struct FactoryContext {
    adapt: Arc<Mutex<Adapt>>,
}

#[derive(Default, Debug)]
struct Adapt {
    tags: Option<Vec<String>>,
    duration: Option<Duration>,
}

impl FactoryContext {
    fn lock(&self) -> std::sync::MutexGuard<'_, Adapt> {
        self.adapt.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tags the entry (replacing the tags of the entry options).
    pub fn set_tags<T: Into<String>>(&self, tags: impl IntoIterator<Item = T>) {
        self.lock().tags = Some(tags.into_iter().map(Into::into).collect());
    }

    /// Caches the entry for `duration` instead of the entry options' duration.
    pub fn set_duration(&self, duration: Duration) {
        self.lock().duration = Some(duration);
    }

    /// The entry options with what the factory decided.
    fn apply(&self, options: &EntryOptions) -> EntryOptions {
        let adapt = self.lock();
        let mut options = options.clone();
        if let Some(tags) = &adapt.tags {
            options.tags = tags.iter().cloned().collect();
        }
        if let Some(duration) = adapt.duration {
            options.duration = duration;
        }
        options
    }
}

/// A last known value that can stand in for a failing factory: the value, its write, its tags.
type Fallback<V> = Option<(V, i64, Option<TagSetId>)>;

impl<V> Inner<V>
where
    V: Clone + Send + Sync + 'static,
{
    /// The slow path shared by both factory modes: the per-key lock, L1 again, L2, then `run` with the
    /// key held (from before the L2 read) and the fail-safe fallback found on the way.
    async fn get_or_set_slow<R, Fut>(
        this: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        run: R,
    ) -> Result<V, Error>
    where
        R: FnOnce(Hold, Fallback<V>) -> Fut,
        Fut: Future<Output = Result<V, Error>>,
    {
        let _lock = this.key_locks.lock(key).await;

        // Someone else may have filled it while we waited.
        let mut fallback: Fallback<V> = None;
        match this.lookup_l1(key) {
            L1Lookup::Fresh(v) | L1Lookup::FreshDue(v) => {
                this.record_l1_hit(key);
                return Ok(v);
            }
            L1Lookup::Stale { entry, .. } if entry.is_usable(crate::clock::Instant::now()) => {
                fallback = Some((entry.value, entry.timestamp, entry.tags));
            }
            _ => {}
        }
        // Held from before the L2 read until the factory's value is cached: a change of the key meanwhile
        // (here or on another node) keeps the factory's value out of the cache.
        let hold = this.guard.hold(key, None);
        if this.l2.is_some() && !options.skip_l2_reads {
            let has_fallback = options.fail_safe && fallback.is_some();
            match this.load_from_l2(key, options, has_fallback).await {
                L2Outcome::Fresh(v) => {
                    this.record_l2_hit(key);
                    return Ok(v);
                }
                L2Outcome::Stale(e)
                    if fallback.as_ref().is_none_or(|(_, t, _)| *t < e.timestamp) =>
                {
                    let tags = this.l1.tags().set_id(e.states.as_deref());
                    fallback = Some((e.value, e.timestamp, tags));
                }
                _ => {}
            }
        }
        let fallback = fallback.filter(|_| options.fail_safe);
        Counters::incr(&this.telemetry.counters.factory_runs);
        run(hold, fallback).await
    }

    /// `get_or_set` with a factory awaited in place.
    pub(crate) async fn get_or_set_inline<F, Fut, E>(
        this: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce(FactoryContext) -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        Self::get_or_set_slow(this, key, options, |hold, fallback| async move {
            let ctx = FactoryContext::default();
            let fut = factory(ctx.clone());
            let outcome = match factory_timeout(options, fallback.is_some()) {
                None => fut.await.map_err(|e| factory_error(key, e)),
                Some(timeout) => match tokio::time::timeout(timeout, fut).await {
                    Ok(result) => result.map_err(|e| factory_error(key, e)),
                    Err(_) => Err(Error::FactoryTimeout {
                        key: key.to_string(),
                        timeout,
                    }),
                },
            };
            Self::factory_done(this, Some(hold), options, &ctx, outcome, fallback).await
        })
        .await
    }

    /// `get_or_set` with a `'static` factory, spawned when it has a timeout so that it can complete in the
    /// background.
    pub(crate) async fn get_or_set_spawned<F, Fut, E>(
        this: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce(FactoryContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        Self::get_or_set_slow(this, key, options, |hold, fallback| async move {
            let ctx = FactoryContext::default();
            let fut = factory(ctx.clone());
            let Some(timeout) = factory_timeout(options, fallback.is_some()) else {
                let outcome = fut.await.map_err(|e| factory_error(key, e));
                return Self::factory_done(this, Some(hold), options, &ctx, outcome, fallback)
                    .await;
            };
            let mut task = tokio::spawn(fut);
            let (outcome, hold) = match tokio::time::timeout(timeout, &mut task).await {
                Ok(Ok(result)) => (result.map_err(|e| factory_error(key, e)), Some(hold)),
                Ok(Err(join)) => {
                    let aborted = Error::FactoryAborted {
                        key: key.to_string(),
                        reason: join.to_string(),
                    };
                    (Err(aborted), Some(hold))
                }
                Err(_) => {
                    if options.background_factory_completion {
                        Self::complete_in_background(this, hold, options, ctx.clone(), task);
                    } else {
                        task.abort();
                    }
                    let timed_out = Error::FactoryTimeout {
                        key: key.to_string(),
                        timeout,
                    };
                    (Err(timed_out), None)
                }
            };
            Self::factory_done(this, hold, options, &ctx, outcome, fallback).await
        })
        .await
    }

    /// After a hit of an entry due for eager refresh: runs the factory in the background (unless a run
    /// for the key is already going on) and caches its value.
    pub(crate) fn refresh_eagerly<F, Fut, E>(
        this: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) where
        F: FnOnce(FactoryContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let Some(lock) = this.key_locks.try_lock_owned(key) else {
            return; // a run for this key is going on: it will renew the entry
        };
        let hold = this.guard.hold(key, None);
        let (inner, options) = (Arc::clone(this), options.clone());
        tokio::spawn(async move {
            let _lock = lock;
            Counters::incr(&inner.telemetry.counters.factory_runs);
            let ctx = FactoryContext::default();
            match factory(ctx.clone()).await {
                Ok(value) => {
                    let options = ctx.apply(&options);
                    Self::cache_factory_value(&inner, hold, value, &options).await;
                }
                Err(e) => {
                    Counters::incr(&inner.telemetry.counters.factory_errors);
                    let error = factory_error(hold.key(), e);
                    tracing::warn!(cache = %inner.options.name, key = hold.key(), %error, "eager refresh failed; the entry stays until it expires");
                }
            }
        });
    }

    /// What a factory run comes to: its value (cached unless the key changed meanwhile), or the fail-safe
    /// fallback, or the error. `hold` is `None` when the run went on in the background.
    async fn factory_done(
        this: &Arc<Self>,
        hold: Option<Hold>,
        options: &EntryOptions,
        ctx: &FactoryContext,
        outcome: Result<V, Error>,
        fallback: Fallback<V>,
    ) -> Result<V, Error> {
        let key_of = |hold: &Option<Hold>, error: &Error| match (hold, error) {
            (Some(h), _) => h.key().to_string(),
            (None, Error::FactoryTimeout { key, .. }) => key.clone(),
            _ => String::new(),
        };
        match outcome {
            Ok(value) => {
                if let Some(hold) = hold {
                    this.telemetry.emit(|| CacheEvent::FactoryRun {
                        key: hold.key(),
                        success: true,
                    });
                    let options = ctx.apply(options);
                    Self::cache_factory_value(this, hold, value.clone(), &options).await;
                }
                Ok(value)
            }
            Err(error) => {
                let key = key_of(&hold, &error);
                Counters::incr(&this.telemetry.counters.factory_errors);
                this.telemetry.emit(|| CacheEvent::FactoryRun {
                    key: &key,
                    success: false,
                });
                let Some((value, timestamp, tags)) = fallback else {
                    return Err(error);
                };
                tracing::warn!(cache = %this.options.name, key, %error, "factory failed; serving the fail-safe value");
                // Serve the fallback as fresh for the throttle duration, locally only (unless a newer
                // change of the key arrived meanwhile).
                let throttle = this.l1.cap(options.fail_safe_throttle_duration);
                let lifetime = Lifetime {
                    fresh_for: throttle,
                    usable_for: options.fail_safe_max_duration.max(throttle),
                    refresh_after: None,
                };
                let entry = this.l1.entry(value.clone(), timestamp, lifetime, tags);
                let hold = hold.unwrap_or_else(|| this.guard.hold(&key, None));
                hold.install(timestamp, || this.l1.install(&key, entry));
                this.record_stale(&key);
                Ok(value)
            }
        }
    }

    /// Caches a factory's value (L1, L2, notification) unless its key changed while the factory ran.
    async fn cache_factory_value(this: &Arc<Self>, hold: Hold, value: V, options: &EntryOptions) {
        let timestamp = now_ticks();
        let key = hold.key().to_string();
        match hold.into_write_if_unchanged(timestamp) {
            // The value is good even when L2 fails: serve it, the L2 step is queued for recovery.
            Some(write) => {
                let _ = Self::set_held(this, write, value, timestamp, options).await;
            }
            None => {
                tracing::debug!(cache = %this.options.name, key, "the key changed while its factory ran: value served, not cached");
            }
        }
    }

    fn complete_in_background<E: Into<BoxError> + Send + 'static>(
        this: &Arc<Self>,
        hold: Hold,
        options: &EntryOptions,
        ctx: FactoryContext,
        task: tokio::task::JoinHandle<Result<V, E>>,
    ) {
        let inner = Arc::downgrade(this);
        let options = options.clone();
        tokio::spawn(async move {
            if let Ok(Ok(value)) = task.await {
                if let Some(inner) = inner.upgrade() {
                    let options = ctx.apply(&options);
                    Self::cache_factory_value(&inner, hold, value, &options).await;
                }
            }
        });
    }
}

/// The timeout of a factory run: the soft one applies only with a fallback to serve.
fn factory_timeout(options: &EntryOptions, has_fallback: bool) -> Option<Duration> {
    let soft = options.factory_soft_timeout.filter(|_| has_fallback);
    match (soft, options.factory_hard_timeout) {
        (Some(s), Some(h)) => Some(s.min(h)),
        (s, h) => s.or(h),
    }
}

fn factory_error<E: Into<BoxError>>(key: &str, error: E) -> Error {
    Error::Factory {
        key: key.to_string(),
        source: error.into(),
    }
}

type LockMap = HashMap<String, Arc<tokio::sync::Mutex<()>>>;

/// One async lock per key being loaded, removed when its last user is done.
#[derive(Default)]
pub(crate) struct KeyLocks {
    map: Arc<Mutex<LockMap>>,
}

/// A held key lock; dropping it releases the lock and, if nobody else waits, its map entry.
pub(crate) struct KeyLockGuard {
    map: Arc<Mutex<LockMap>>,
    key: String,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

fn lock_map(map: &Mutex<LockMap>) -> std::sync::MutexGuard<'_, LockMap> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

impl KeyLocks {
    fn entry(&self, key: &str) -> KeyLockGuard {
        let lock = lock_map(&self.map)
            .entry(key.to_string())
            .or_default()
            .clone();
        KeyLockGuard {
            map: Arc::clone(&self.map),
            key: key.to_string(),
            lock: Some(lock),
            guard: None,
        }
    }

    pub async fn lock(&self, key: &str) -> KeyLockGuard {
        let mut guard = self.entry(key);
        // If this future is dropped while waiting, the guard's drop still cleans the map up.
        let lock = guard.lock.clone().expect("set by entry");
        guard.guard = Some(lock.lock_owned().await);
        guard
    }

    /// The lock of `key` if nobody holds it now.
    pub fn try_lock_owned(&self, key: &str) -> Option<KeyLockGuard> {
        let mut guard = self.entry(key);
        let lock = guard.lock.clone().expect("set by entry");
        guard.guard = Some(lock.try_lock_owned().ok()?);
        Some(guard)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock_map(&self.map).len()
    }
}

impl Drop for KeyLockGuard {
    fn drop(&mut self) {
        self.guard.take();
        if let Some(lock) = self.lock.take() {
            let mut map = lock_map(&self.map);
            // The map's reference and ours: nobody else is waiting.
            if Arc::strong_count(&lock) == 2 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::FusionCache;

    #[tokio::test]
    async fn key_locks_are_released_after_a_factory_run() {
        let cache: FusionCache<u32> = FusionCache::builder().build().unwrap();
        let v = cache
            .get_or_set("k", || async { Ok::<_, std::io::Error>(7) })
            .await
            .unwrap();
        assert_eq!(v, 7);
        assert_eq!(cache.inner.key_locks.len(), 0);
        assert_eq!(cache.inner.guard.held_keys(), 0);
    }
}
