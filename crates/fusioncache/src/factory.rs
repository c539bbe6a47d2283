//! `get_or_set`: one factory run per key and node, its timeouts, fail-safe fallbacks and background
//! completion.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::backplane::now_ticks;
use crate::cache::Inner;
use crate::error::{BoxError, Error};
use crate::events::{CacheEvent, Counters};
use crate::guard::Hold;
use crate::l1::{L1Lookup, Lifetime};
use crate::l2_accessor::L2Read;
use crate::options::EntryOptions;

/// A last known value that can stand in for a failing factory, with the write it came from.
type Fallback<V> = Option<(V, i64)>;

impl<V> Inner<V>
where
    V: Clone + Send + Sync + 'static,
{
    pub(crate) async fn get_or_set_slow<F, Fut, E>(
        this: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        factory: F,
    ) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let _lock = this.key_locks.lock(key).await;

        // Someone else may have filled it while we waited.
        let mut fallback: Fallback<V> = None;
        match this.lookup_l1(key) {
            L1Lookup::Fresh(v) => {
                this.record_l1_hit(key);
                return Ok(v);
            }
            L1Lookup::Stale { entry, .. } if entry.is_usable(quanta::Instant::now()) => {
                fallback = Some((entry.value, entry.timestamp));
            }
            _ => {}
        }
        // Held from before the L2 read until the factory's value is cached: a change of the key meanwhile
        // (here or on another node) keeps the factory's value out of the cache.
        let hold = this.guard.hold(key, None);
        if this.l2.is_some() && !options.skip_l2 {
            match this.read_l2(key).await {
                L2Read::Found(entry) if !entry.fresh_for.is_zero() => {
                    this.record_l2_hit(key);
                    return Ok(this.install_from_l2(&hold, key, entry, options));
                }
                L2Read::Found(entry)
                    if fallback.as_ref().is_none_or(|(_, t)| *t < entry.timestamp) =>
                {
                    fallback = Some((entry.value, entry.timestamp));
                }
                _ => {}
            }
        }
        let fallback = fallback.filter(|_| options.fail_safe);
        Self::run_factory(this, hold, options, factory(), fallback).await
    }

    async fn run_factory<Fut, E>(
        this: &Arc<Self>,
        hold: Hold,
        options: &EntryOptions,
        fut: Fut,
        fallback: Fallback<V>,
    ) -> Result<V, Error>
    where
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let key = hold.key().to_string();
        let key = key.as_str();
        Counters::incr(&this.telemetry.counters.factory_runs);
        let soft = options.factory_soft_timeout.filter(|_| fallback.is_some());
        let timeout = match (soft, options.factory_hard_timeout) {
            (Some(s), Some(h)) => Some(s.min(h)),
            (s, h) => s.or(h),
        };
        let factory_error = |e: E| Error::Factory {
            key: key.to_string(),
            source: e.into(),
        };
        let (outcome, hold) = match timeout {
            None => (fut.await.map_err(factory_error), Some(hold)),
            Some(timeout) => {
                let mut task = tokio::spawn(fut);
                match tokio::time::timeout(timeout, &mut task).await {
                    Ok(Ok(result)) => (result.map_err(factory_error), Some(hold)),
                    Ok(Err(join)) => (
                        Err(Error::FactoryAborted {
                            key: key.to_string(),
                            reason: join.to_string(),
                        }),
                        Some(hold),
                    ),
                    Err(_) => {
                        if options.background_factory_completion {
                            Self::complete_in_background(this, hold, options, task);
                        } else {
                            task.abort();
                        }
                        let timed_out = Error::FactoryTimeout {
                            key: key.to_string(),
                            timeout,
                        };
                        (Err(timed_out), None)
                    }
                }
            }
        };
        match outcome {
            Ok(value) => {
                this.telemetry
                    .emit(|| CacheEvent::FactoryRun { key, success: true });
                if let Some(hold) = hold {
                    Self::cache_factory_value(this, hold, value.clone(), options).await;
                }
                Ok(value)
            }
            Err(error) => {
                Counters::incr(&this.telemetry.counters.factory_errors);
                this.telemetry.emit(|| CacheEvent::FactoryRun {
                    key,
                    success: false,
                });
                let Some((value, timestamp)) = fallback else {
                    return Err(error);
                };
                tracing::warn!(cache = %this.options.name, key, %error, "factory failed; serving the fail-safe value");
                // Serve the fallback as fresh for the throttle duration, locally only (unless a newer
                // change of the key arrived meanwhile).
                if let Some(hold) = &hold {
                    let throttle = this.l1.cap(options.fail_safe_throttle_duration);
                    let lifetime = Lifetime {
                        fresh_for: throttle,
                        usable_for: options.fail_safe_max_duration.max(throttle),
                    };
                    let entry = this.l1.entry(value.clone(), timestamp, lifetime);
                    hold.install(timestamp, || this.l1.install(key, entry));
                }
                this.record_stale(key);
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
        task: tokio::task::JoinHandle<Result<V, E>>,
    ) {
        let inner = Arc::downgrade(this);
        let options = options.clone();
        tokio::spawn(async move {
            if let Ok(Ok(value)) = task.await {
                if let Some(inner) = inner.upgrade() {
                    Self::cache_factory_value(&inner, hold, value, &options).await;
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
    fn lock_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn lock(&self, key: &str) -> KeyLockGuard<'_> {
        let lock = self.lock_map().entry(key.to_string()).or_default().clone();
        let mut guard = KeyLockGuard {
            locks: self,
            key: key.to_string(),
            lock: Some(lock.clone()),
            guard: None,
        };
        // If this future is dropped while waiting, the guard's drop still cleans the map up.
        guard.guard = Some(lock.lock_owned().await);
        guard
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock_map().len()
    }
}

impl Drop for KeyLockGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        if let Some(lock) = self.lock.take() {
            let mut map = self.locks.lock_map();
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
