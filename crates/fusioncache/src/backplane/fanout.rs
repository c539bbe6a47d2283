//! The subscriptions of one transport, by channel: every transport fans events out the same way.
//!
//! Delivery never waits: each subscription (one cache) has its own bounded buffer, and when it is full the
//! event is dropped for that subscription only and recorded as a gap it will see (its L1 is then marked
//! stale, as after a reconnection). A slow or blocked cache never holds up the others on the same transport,
//! nor the transport's own loop and health checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::{BackplaneEvent, Lag, Subscription};

/// Capacity of the event buffer of one subscription.
pub(crate) const SUBSCRIPTION_BUFFER: usize = 8192;

/// One subscription's sending side.
#[derive(Clone)]
pub(crate) struct Subscriber {
    tx: mpsc::Sender<BackplaneEvent>,
    lag: Arc<Lag>,
}

impl Subscriber {
    /// Delivers `event` without waiting; returns `false` when the subscription is gone.
    pub fn deliver(&self, event: BackplaneEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(event)) => {
                self.lag.record(event);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

type Subscribers = Arc<[Subscriber]>;

/// The live subscriptions of a transport, by channel. Cheap to clone (shared).
///
/// Each channel keeps an immutable snapshot of its subscribers, replaced on subscribe and when a closed one
/// is found, so delivering a message takes the lock only to clone one `Arc`.
#[derive(Clone, Default)]
pub(crate) struct Fanout {
    channels: Arc<Mutex<HashMap<String, Subscribers>>>,
    /// Bumped whenever a channel's subscribers change: a [`ChannelSender`] then takes a new snapshot.
    generation: Arc<AtomicU64>,
}

/// The sending side of one channel for a transport's receive loop: delivers each message to the channel's
/// subscriptions from a snapshot it takes again only when they changed (one atomic load per message, no
/// lock, no lookup).
pub(crate) struct ChannelSender {
    fanout: Fanout,
    channel: String,
    seen: u64,
    subscribers: Option<Subscribers>,
}

impl ChannelSender {
    /// Delivers `event` to the subscriptions of the channel, without waiting.
    pub fn send(&mut self, event: BackplaneEvent) {
        let generation = self.fanout.generation.load(Ordering::Acquire);
        if generation != self.seen || self.subscribers.is_none() {
            self.seen = generation;
            self.subscribers = self.fanout.lock().get(&self.channel).cloned();
        }
        let Some(subscribers) = &self.subscribers else {
            return;
        };
        if !deliver_all(subscribers, event) {
            self.fanout.prune();
        }
    }
}

/// Delivers `event` to each of `subscribers` (the last one gets it without a clone); `false` when one of
/// them is gone.
fn deliver_all(subscribers: &[Subscriber], event: BackplaneEvent) -> bool {
    let Some((last, others)) = subscribers.split_last() else {
        return true;
    };
    let mut open = true;
    for s in others {
        open &= s.deliver(event.clone());
    }
    open & last.deliver(event)
}

impl Fanout {
    /// A sender for `channel` (see [`ChannelSender`]).
    pub fn sender(&self, channel: &str) -> ChannelSender {
        ChannelSender {
            fanout: self.clone(),
            channel: channel.to_string(),
            seen: 0,
            subscribers: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscribers>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a subscription to `channel`; returns it with its sending side (to greet it alone).
    pub fn add(&self, channel: &str) -> (Subscription, Subscriber) {
        self.add_with_capacity(channel, SUBSCRIPTION_BUFFER)
    }

    pub fn add_with_capacity(&self, channel: &str, capacity: usize) -> (Subscription, Subscriber) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let lag = Arc::new(Lag::default());
        let subscriber = Subscriber {
            tx,
            lag: lag.clone(),
        };
        let mut map = self.lock();
        let subscribers = map
            .entry(channel.to_string())
            .or_insert_with(|| Arc::from([]));
        *subscribers = subscribers
            .iter()
            .filter(|s| !s.is_closed())
            .cloned()
            .chain([subscriber.clone()])
            .collect();
        self.generation.fetch_add(1, Ordering::AcqRel);
        (Subscription::with_lag(rx, lag), subscriber)
    }

    /// Drops the closed subscribers, and the channels left without any.
    fn prune(&self) {
        let mut changed = false;
        self.lock().retain(|_, subscribers| {
            if subscribers.iter().any(|s| s.is_closed()) {
                changed = true;
                *subscribers = subscribers
                    .iter()
                    .filter(|s| !s.is_closed())
                    .cloned()
                    .collect();
            }
            !subscribers.is_empty()
        });
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The live subscribers of `channel` (of every channel when `None`).
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "testing")),
        allow(dead_code)
    )]
    pub fn subscribers(&self, channel: Option<&str>) -> Vec<Subscriber> {
        self.prune();
        let map = self.lock();
        map.iter()
            .filter(|(name, _)| channel.is_none_or(|c| c == name.as_str()))
            .flat_map(|(_, subscribers)| subscribers.iter().cloned())
            .collect()
    }

    /// The channels with at least one live subscription.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn channels(&self) -> Vec<String> {
        self.prune();
        self.lock().keys().cloned().collect()
    }

    /// Delivers `event` to the subscriptions of `channel`, without waiting.
    pub fn send_to(&self, channel: &str, event: BackplaneEvent) {
        let Some(subscribers) = self.lock().get(channel).cloned() else {
            return;
        };
        if !deliver_all(&subscribers, event) {
            self.prune();
        }
    }

    /// Delivers `event` (a connection change) to every subscription, without waiting.
    #[cfg_attr(
        not(any(feature = "redis", feature = "nats", feature = "testing")),
        allow(dead_code)
    )]
    pub fn send_all(&self, event: BackplaneEvent) {
        for s in self.subscribers(None) {
            s.deliver(event.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn a_full_subscription_loses_events_alone_and_knows_it() {
        let fanout = Fanout::default();
        let (mut slow, _) = fanout.add_with_capacity("c", 2);
        let (mut fast, _) = fanout.add_with_capacity("c", 1024);
        for i in 0..10u8 {
            fanout.send_to("c", BackplaneEvent::Message(Bytes::from(vec![i])));
        }
        fanout.send_all(BackplaneEvent::Disconnected {
            reason: "test".into(),
        });
        for i in 0..10u8 {
            assert_eq!(
                fast.next().await,
                Some(BackplaneEvent::Message(Bytes::from(vec![i])))
            );
        }
        assert!(!fast.take_missed());
        assert!(matches!(
            fast.next().await,
            Some(BackplaneEvent::Disconnected { .. })
        ));

        assert!(slow.take_missed(), "the slow one knows it missed some");
        assert!(!slow.take_missed(), "once");
        // The missed connection change comes first, then what fitted.
        assert!(matches!(
            slow.next().await,
            Some(BackplaneEvent::Disconnected { .. })
        ));
        assert_eq!(
            slow.next().await,
            Some(BackplaneEvent::Message(Bytes::from(vec![0])))
        );
    }

    /// A channel's sender follows its subscriptions: one added after the sender was made gets the next
    /// message, one dropped is pruned.
    #[tokio::test]
    async fn a_channel_sender_follows_subscriptions_as_they_come_and_go() {
        let fanout = Fanout::default();
        let mut sender = fanout.sender("c");
        sender.send(BackplaneEvent::Message(Bytes::from_static(b"nobody")));
        let (mut first, _) = fanout.add("c");
        sender.send(BackplaneEvent::Message(Bytes::from_static(b"1")));
        let (mut second, _) = fanout.add("c");
        let (mut other, _) = fanout.add("other");
        sender.send(BackplaneEvent::Message(Bytes::from_static(b"2")));
        let message = |b: &'static [u8]| Some(BackplaneEvent::Message(Bytes::from_static(b)));
        assert_eq!(first.next().await, message(b"1"));
        assert_eq!(first.next().await, message(b"2"));
        assert_eq!(second.next().await, message(b"2"));
        drop(first);
        sender.send(BackplaneEvent::Message(Bytes::from_static(b"3")));
        assert_eq!(second.next().await, message(b"3"));
        assert_eq!(
            fanout.subscribers(Some("c")).len(),
            1,
            "the dropped one is pruned"
        );
        assert!(
            other.events.try_recv().is_err(),
            "nothing for another channel"
        );
    }
}
