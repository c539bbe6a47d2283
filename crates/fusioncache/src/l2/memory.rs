//! An in-process distributed cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{DistributedCache, L2Error};

/// An in-process [`DistributedCache`]: caches built with clones of one `MemoryDistributedCache` share it,
/// as nodes share a Redis. With the `testing` feature, `set_unavailable` simulates an outage.
#[derive(Clone, Default)]
pub struct MemoryDistributedCache {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: Mutex<HashMap<String, (Bytes, Instant)>>,
    unavailable: AtomicBool,
}

impl std::fmt::Debug for MemoryDistributedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDistributedCache")
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryDistributedCache {
    /// A new, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every operation fail (`true`) or work again (`false`).
    #[cfg(feature = "testing")]
    pub fn set_unavailable(&self, unavailable: bool) {
        self.inner.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// The number of live entries.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|(_, exp)| *exp > now).count()
    }

    /// Whether the store holds no live entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Bytes, Instant)>> {
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self) -> Result<(), L2Error> {
        if self.inner.unavailable.load(Ordering::SeqCst) {
            Err(L2Error::Unavailable(
                "memory distributed cache is unavailable".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl DistributedCache for MemoryDistributedCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, L2Error> {
        self.check()?;
        let mut entries = self.lock();
        match entries.get(key) {
            Some((v, exp)) if *exp > Instant::now() => Ok(Some(v.to_vec())),
            Some(_) => {
                entries.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), L2Error> {
        self.check()?;
        let expiry = Instant::now()
            .checked_add(ttl)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
        self.lock().insert(key.to_string(), (value, expiry));
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<(), L2Error> {
        self.check()?;
        self.lock().remove(key);
        Ok(())
    }
}
