//! Fault injection for tests (feature `testing`): wrappers around any distributed cache or backplane that
//! fail or pause their operations on command, so a test can force an interleaving (a read parked after
//! it fetched its bytes, an L2 write that fails, a publish that fails without a disconnect) instead of
//! hoping a sleep produces it.
//!
//! ```
//! use std::sync::Arc;
//! use fusioncache::FusionCache;
//! use fusioncache::l2::MemoryDistributedCache;
//! use fusioncache::testing::FaultyL2;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (l2, faults) = FaultyL2::new(Arc::new(MemoryDistributedCache::new()));
//! let cache: FusionCache<String> = FusionCache::builder().distributed_cache(l2).build().unwrap();
//! faults.fail_writes(true);
//! cache.set("k", "v".to_string()).await.unwrap(); // L1 updated, the L2 write queued for recovery
//! assert_eq!(cache.pending_recovery(), 1);
//! # }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, Notify};

use crate::backplane::{Backplane, BackplaneError, Subscription};
use crate::l2::{DistributedCache, L2Error};

/// A [`DistributedCache`] that forwards to another one, with faults switched on by its [`L2Faults`].
pub struct FaultyL2 {
    inner: Arc<dyn DistributedCache>,
    faults: L2Faults,
}

/// The switches of a [`FaultyL2`]. Cheap to clone.
#[derive(Clone, Default)]
pub struct L2Faults {
    state: Arc<L2FaultState>,
}

#[derive(Default)]
struct L2FaultState {
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    pauses: Mutex<HashMap<String, Pause>>,
}

struct Pause {
    parked: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// A read of one key that will be parked after fetching its bytes (see [`L2Faults::pause_next_read`]).
pub struct PausedRead {
    parked: Option<oneshot::Receiver<()>>,
    release: Option<oneshot::Sender<()>>,
}

impl PausedRead {
    /// Waits until the read has fetched its bytes and is parked, at most `timeout`; returns whether it is.
    pub async fn parked(&mut self, timeout: Duration) -> bool {
        match self.parked.take() {
            Some(rx) => matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(()))),
            None => true,
        }
    }

    /// Lets the read complete with the bytes it fetched.
    pub fn release(mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

impl FaultyL2 {
    /// Wraps `inner`; the returned switches control it.
    pub fn new(inner: Arc<dyn DistributedCache>) -> (Self, L2Faults) {
        let faults = L2Faults::default();
        (
            Self {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }
}

impl L2Faults {
    /// Makes every read fail (`true`) or work again.
    pub fn fail_reads(&self, fail: bool) {
        self.state.fail_reads.store(fail, Ordering::SeqCst);
    }

    /// Makes every write (set, remove) fail (`true`) or work again.
    pub fn fail_writes(&self, fail: bool) {
        self.state.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Makes every operation fail (`true`) or work again.
    pub fn fail_all(&self, fail: bool) {
        self.fail_reads(fail);
        self.fail_writes(fail);
    }

    /// The next read of `key` fetches its bytes, then waits until the returned handle is released.
    pub fn pause_next_read(&self, key: &str) -> PausedRead {
        let (parked_tx, parked_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.state.pauses.lock().unwrap().insert(
            key.to_string(),
            Pause {
                parked: parked_tx,
                release: release_rx,
            },
        );
        PausedRead {
            parked: Some(parked_rx),
            release: Some(release_tx),
        }
    }

    /// Reads that reached the wrapped store.
    pub fn reads(&self) -> u64 {
        self.state.reads.load(Ordering::SeqCst)
    }

    /// Writes that reached the wrapped store.
    pub fn writes(&self) -> u64 {
        self.state.writes.load(Ordering::SeqCst)
    }

    fn check(&self, flag: &AtomicBool) -> Result<(), L2Error> {
        if flag.load(Ordering::SeqCst) {
            Err(L2Error::Unavailable("injected fault".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl DistributedCache for FaultyL2 {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, L2Error> {
        let s = &self.faults.state;
        self.faults.check(&s.fail_reads)?;
        let bytes = self.inner.get(key).await?;
        s.reads.fetch_add(1, Ordering::SeqCst);
        let pause = s.pauses.lock().unwrap().remove(key);
        if let Some(pause) = pause {
            let _ = pause.parked.send(());
            let _ = pause.release.await;
        }
        Ok(bytes)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), L2Error> {
        self.faults.check(&self.faults.state.fail_writes)?;
        self.faults.state.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set(key, value, ttl).await
    }

    async fn remove(&self, key: &str) -> Result<(), L2Error> {
        self.faults.check(&self.faults.state.fail_writes)?;
        self.faults.state.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.remove(key).await
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, L2Error> {
        let s = &self.faults.state;
        self.faults.check(&s.fail_reads)?;
        let values = self.inner.get_many(keys).await?;
        s.reads.fetch_add(1, Ordering::SeqCst);
        Ok(values)
    }
}

/// A [`Backplane`] that forwards to another one, whose publishes can be made to fail (without any
/// disconnection: the subscriptions stay up) or be held until released.
pub struct FaultyBackplane {
    inner: Arc<dyn Backplane>,
    faults: BackplaneFaults,
}

/// The switches of a [`FaultyBackplane`]. Cheap to clone.
#[derive(Clone, Default)]
pub struct BackplaneFaults {
    state: Arc<BackplaneFaultState>,
}

#[derive(Default)]
struct BackplaneFaultState {
    fail_publishes: AtomicBool,
    hold_publishes: AtomicBool,
    released: Notify,
    published: AtomicU64,
}

impl FaultyBackplane {
    /// Wraps `inner`; the returned switches control it.
    pub fn new(inner: Arc<dyn Backplane>) -> (Self, BackplaneFaults) {
        let faults = BackplaneFaults::default();
        (
            Self {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }
}

impl BackplaneFaults {
    /// Makes every publish fail (`true`) or work again; subscriptions are not affected.
    pub fn fail_publishes(&self, fail: bool) {
        self.state.fail_publishes.store(fail, Ordering::SeqCst);
    }

    /// Holds every publish until `hold_publishes(false)`.
    pub fn hold_publishes(&self, hold: bool) {
        self.state.hold_publishes.store(hold, Ordering::SeqCst);
        if !hold {
            self.state.released.notify_waiters();
        }
    }

    /// Publishes that reached the wrapped backplane.
    pub fn published(&self) -> u64 {
        self.state.published.load(Ordering::SeqCst)
    }
}

impl Backplane for FaultyBackplane {
    fn subscribe(&self, channel: &str) -> Result<Subscription, BackplaneError> {
        self.inner.subscribe(channel)
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            let s = &self.faults.state;
            while s.hold_publishes.load(Ordering::SeqCst) {
                let released = s.released.notified();
                if !s.hold_publishes.load(Ordering::SeqCst) {
                    break;
                }
                released.await;
            }
            if s.fail_publishes.load(Ordering::SeqCst) {
                return Err(BackplaneError::Transport("injected publish failure".into()));
            }
            self.inner.publish(channel, payload).await?;
            s.published.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    // `publish_batch` stays the default (one `publish` after the other), so the faults apply to each.

    fn validate_channel(&self, channel: &str) -> Result<(), BackplaneError> {
        self.inner.validate_channel(channel)
    }

    fn transport_name(&self) -> &'static str {
        self.inner.transport_name()
    }
}
