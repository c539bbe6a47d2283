//! The in-process backplane.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::fanout::Fanout;
use super::{Backplane, BackplaneError, BackplaneEvent, Subscription};

/// An in-process backplane: every cache built with a clone of the same `MemoryBackplane` acts as a
/// separate node of one cluster. It is the embedded default, and the transport of tests and demos.
///
/// With the `testing` feature, `disconnect` and `reconnect` simulate an outage of the bus, so that the
/// connection-loss behaviour of the cache can be exercised without a server.
///
/// ```
/// use fusioncache::{FusionCache, backplane::MemoryBackplane};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let bus = MemoryBackplane::new();
/// let node1: FusionCache<String> = FusionCache::builder().name("products").backplane(bus.clone()).build().unwrap();
/// let node2: FusionCache<String> = FusionCache::builder().name("products").backplane(bus.clone()).build().unwrap();
/// # let _ = (node1, node2);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryBackplane {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    subscriptions: Fanout,
    down: AtomicBool,
}

impl std::fmt::Debug for MemoryBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackplane")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl MemoryBackplane {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the bus is up.
    pub fn is_connected(&self) -> bool {
        !self.inner.down.load(Ordering::SeqCst)
    }

    /// Simulates an outage: every subscription gets `Disconnected`, publishes fail until `reconnect`.
    #[cfg(feature = "testing")]
    pub fn disconnect(&self) {
        if !self.inner.down.swap(true, Ordering::SeqCst) {
            self.broadcast_state(BackplaneEvent::Disconnected {
                reason: "memory backplane disconnected".into(),
            });
        }
    }

    /// Ends a simulated outage: every subscription gets `Connected`.
    #[cfg(feature = "testing")]
    pub fn reconnect(&self) {
        if self.inner.down.swap(false, Ordering::SeqCst) {
            self.broadcast_state(BackplaneEvent::Connected);
        }
    }

    /// The number of live subscriptions on `channel`.
    #[cfg(feature = "testing")]
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.inner.subscriptions.subscribers(Some(channel)).len()
    }

    #[cfg(feature = "testing")]
    fn broadcast_state(&self, event: BackplaneEvent) {
        self.inner.subscriptions.send_all(event);
    }
}

impl Backplane for MemoryBackplane {
    fn subscribe(&self, channel: &str) -> Result<Subscription, BackplaneError> {
        let (subscription, tx) = self.inner.subscriptions.add(channel);
        if self.is_connected() {
            tx.deliver(BackplaneEvent::Connected);
        }
        Ok(subscription)
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            if !self.is_connected() {
                return Err(BackplaneError::NotConnected);
            }
            self.inner
                .subscriptions
                .send_to(channel, BackplaneEvent::Message(payload));
            Ok(())
        })
    }

    fn transport_name(&self) -> &'static str {
        "memory"
    }
}
