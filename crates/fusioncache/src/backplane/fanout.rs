//! The subscriptions of one transport, by channel: every transport fans events out the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{BackplaneEvent, Subscription};

/// Capacity of the event queue of one subscription.
const SUBSCRIPTION_BUFFER: usize = 8192;

/// The live subscriptions of a transport, by channel. Cheap to clone (shared).
#[derive(Clone, Default)]
pub(crate) struct Fanout {
    channels: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<BackplaneEvent>>>>>,
}

impl Fanout {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Vec<mpsc::Sender<BackplaneEvent>>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscription to `channel`; returns it with its sender (to greet it alone).
    pub fn add(&self, channel: &str) -> (Subscription, mpsc::Sender<BackplaneEvent>) {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.lock()
            .entry(channel.to_string())
            .or_default()
            .push(tx.clone());
        (Subscription::new(rx), tx)
    }

    /// The live senders of `channel` (of every channel when `None`), dropping the closed ones.
    pub fn senders(&self, channel: Option<&str>) -> Vec<mpsc::Sender<BackplaneEvent>> {
        let mut map = self.lock();
        map.retain(|_, subs| {
            subs.retain(|s| !s.is_closed());
            !subs.is_empty()
        });
        map.iter()
            .filter(|(name, _)| channel.is_none_or(|c| c == name.as_str()))
            .flat_map(|(_, subs)| subs.iter().cloned())
            .collect()
    }

    /// The channels with at least one live subscription.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn channels(&self) -> Vec<String> {
        let mut map = self.lock();
        map.retain(|_, subs| {
            subs.retain(|s| !s.is_closed());
            !subs.is_empty()
        });
        map.keys().cloned().collect()
    }

    /// Delivers `event` to the subscriptions of `channel` (all when `None`), waiting for room: a slow cache
    /// slows its transport down rather than losing notifications.
    pub async fn send(&self, channel: Option<&str>, event: BackplaneEvent) {
        for tx in self.senders(channel) {
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
