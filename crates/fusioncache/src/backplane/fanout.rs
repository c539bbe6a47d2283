//! The subscriptions of one transport, by channel: every transport fans events out the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::{BackplaneEvent, Subscription};

/// Capacity of the event queue of one subscription.
const SUBSCRIPTION_BUFFER: usize = 8192;

type Senders = Arc<[mpsc::Sender<BackplaneEvent>]>;

/// The live subscriptions of a transport, by channel. Cheap to clone (shared).
///
/// Each channel keeps an immutable snapshot of its senders, replaced on subscribe and when a closed one is
/// found, so delivering a message takes the lock only to clone one `Arc`.
#[derive(Clone, Default)]
pub(crate) struct Fanout {
    channels: Arc<Mutex<HashMap<String, Senders>>>,
}

impl Fanout {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Senders>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscription to `channel`; returns it with its sender (to greet it alone).
    pub fn add(&self, channel: &str) -> (Subscription, mpsc::Sender<BackplaneEvent>) {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let mut map = self.lock();
        let senders = map
            .entry(channel.to_string())
            .or_insert_with(|| Arc::from([]));
        *senders = senders
            .iter()
            .filter(|s| !s.is_closed())
            .cloned()
            .chain([tx.clone()])
            .collect();
        (Subscription::new(rx), tx)
    }

    /// Drops the closed senders, and the channels left without any.
    fn prune(&self) {
        self.lock().retain(|_, senders| {
            if senders.iter().any(|s| s.is_closed()) {
                *senders = senders.iter().filter(|s| !s.is_closed()).cloned().collect();
            }
            !senders.is_empty()
        });
    }

    /// The live senders of `channel` (of every channel when `None`).
    pub fn senders(&self, channel: Option<&str>) -> Vec<mpsc::Sender<BackplaneEvent>> {
        self.prune();
        let map = self.lock();
        map.iter()
            .filter(|(name, _)| channel.is_none_or(|c| c == name.as_str()))
            .flat_map(|(_, senders)| senders.iter().cloned())
            .collect()
    }

    /// The channels with at least one live subscription.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn channels(&self) -> Vec<String> {
        self.prune();
        self.lock().keys().cloned().collect()
    }

    /// Delivers `event` to the subscriptions of `channel`, waiting for room when one is full: a slow cache
    /// slows its transport down rather than losing notifications.
    pub async fn send_to(&self, channel: &str, event: BackplaneEvent) {
        let Some(senders) = self.lock().get(channel).cloned() else {
            return;
        };
        let mut closed = false;
        for tx in senders.iter() {
            match tx.try_send(event.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => closed |= tx.send(event).await.is_err(),
                Err(TrySendError::Closed(_)) => closed = true,
            }
        }
        if closed {
            self.prune();
        }
    }

    /// Delivers `event` to every subscription.
    pub async fn send_all(&self, event: BackplaneEvent) {
        for tx in self.senders(None) {
            // A closed receiver is a cache that was dropped; nothing to deliver.
            let _ = tx.send(event.clone()).await;
        }
    }

    /// Delivers a state change to every subscription without waiting (one that is that far behind sees the
    /// next one).
    pub fn try_send_all(&self, event: BackplaneEvent) {
        for tx in self.senders(None) {
            let _ = tx.try_send(event.clone());
        }
    }
}
