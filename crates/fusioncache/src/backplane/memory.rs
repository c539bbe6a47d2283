//! The in-process backplane.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Backplane, BackplaneError, BackplaneEvent, Subscription, SUBSCRIPTION_BUFFER};

/// An in-process backplane: every cache built with a clone of the same `MemoryBackplane` acts as a
/// separate node of one cluster. It is the embedded default, and the transport of tests and demos.
///
/// [`disconnect`](Self::disconnect) and [`reconnect`](Self::reconnect) simulate an outage of the bus, so
/// that the connection-loss behaviour of the cache can be exercised without a server.
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
    channels: Mutex<HashMap<String, Vec<mpsc::Sender<BackplaneEvent>>>>,
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
    pub fn disconnect(&self) {
        if !self.inner.down.swap(true, Ordering::SeqCst) {
            self.broadcast_state(BackplaneEvent::Disconnected {
                reason: "memory backplane disconnected".into(),
            });
        }
    }

    /// Ends a simulated outage: every subscription gets `Connected`.
    pub fn reconnect(&self) {
        if self.inner.down.swap(false, Ordering::SeqCst) {
            self.broadcast_state(BackplaneEvent::Connected);
        }
    }

    /// The number of live subscriptions on `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        let mut channels = self.inner.channels.lock().expect("memory backplane lock");
        channels.get_mut(channel).map_or(0, |subs| {
            subs.retain(|s| !s.is_closed());
            subs.len()
        })
    }

    fn broadcast_state(&self, event: BackplaneEvent) {
        let channels = self.inner.channels.lock().expect("memory backplane lock");
        for sub in channels.values().flatten() {
            // State changes must not be lost behind a full buffer of messages; a subscriber that is that
            // far behind will see the next state change.
            let _ = sub.try_send(event.clone());
        }
    }

    fn senders(&self, channel: &str) -> Vec<mpsc::Sender<BackplaneEvent>> {
        let mut channels = self.inner.channels.lock().expect("memory backplane lock");
        match channels.get_mut(channel) {
            Some(subs) => {
                subs.retain(|s| !s.is_closed());
                subs.clone()
            }
            None => Vec::new(),
        }
    }
}

impl Backplane for MemoryBackplane {
    fn subscribe(&self, channel: &str) -> Result<Subscription, BackplaneError> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        if self.is_connected() {
            tx.try_send(BackplaneEvent::Connected)
                .expect("a new channel has room");
        }
        self.inner
            .channels
            .lock()
            .expect("memory backplane lock")
            .entry(channel.to_string())
            .or_default()
            .push(tx);
        Ok(Subscription::new(rx))
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
            for sub in self.senders(channel) {
                // A closed receiver is a cache that was dropped; nothing to deliver.
                let _ = sub.send(BackplaneEvent::Message(payload.clone())).await;
            }
            Ok(())
        })
    }

    fn transport_name(&self) -> &'static str {
        "memory"
    }
}
