//! Sending notifications, and recovering from connection loss (auto-recovery).
//!
//! A [`Notifier`] publishes one backplane message per change. When the backplane is down, the circuit
//! breaker is open, or a publish fails, the notification is queued instead: one per key (the newest wins),
//! bounded (the oldest is dropped and counted when full), and replayed in order on reconnection.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quanta::Instant;

use crate::backplane::{Action, Backplane, BackplaneMessage};
use crate::events::{CacheEvent, Counters, Telemetry};

/// Opens for a while after a failure, so a dead server is not hammered.
#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    open_for: Duration,
    origin: Instant,
    /// Nanoseconds since `origin` until which the breaker is open; 0 when closed.
    open_until: AtomicU64,
}

impl CircuitBreaker {
    pub fn new(open_for: Duration) -> Self {
        Self {
            open_for,
            origin: Instant::now(),
            open_until: AtomicU64::new(0),
        }
    }

    fn now_nanos(&self) -> u64 {
        Instant::now().duration_since(self.origin).as_nanos() as u64
    }

    /// Whether calls should be skipped now.
    pub fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && self.now_nanos() < until
    }

    /// Records a failure: opens the breaker (when it has a duration).
    pub fn trip(&self) {
        if !self.open_for.is_zero() {
            let until = self.now_nanos() + self.open_for.as_nanos() as u64;
            self.open_until.store(until.max(1), Ordering::Release);
        }
    }

    /// Records a success: closes the breaker.
    pub fn reset(&self) {
        self.open_until.store(0, Ordering::Release);
    }
}

/// A notification waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    pub action: Action,
    pub timestamp: i64,
}

/// Pending notifications: one per key, newest wins, in the order of their last change, bounded.
#[derive(Debug, Default)]
pub(crate) struct PendingQueue {
    by_key: HashMap<String, (u64, Pending)>,
    order: BTreeMap<u64, String>,
    next_seq: u64,
}

impl PendingQueue {
    /// Queues a notification; returns the key dropped to make room, if any.
    pub fn push(&mut self, key: &str, pending: Pending, capacity: usize) -> Option<String> {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some((old_seq, _)) = self.by_key.remove(key) {
            self.order.remove(&old_seq);
        }
        let mut dropped = None;
        if self.by_key.len() >= capacity.max(1) {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.by_key.remove(&oldest);
                dropped = Some(oldest);
            }
        }
        self.by_key.insert(key.to_string(), (seq, pending));
        self.order.insert(seq, key.to_string());
        dropped
    }

    /// Takes every pending notification, oldest first.
    pub fn drain(&mut self) -> Vec<(String, Pending)> {
        let order = std::mem::take(&mut self.order);
        let mut by_key = std::mem::take(&mut self.by_key);
        order
            .into_values()
            .filter_map(|key| by_key.remove(&key).map(|(_, p)| (key, p)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// Publishes the notifications of one cache.
pub(crate) struct Notifier {
    backplane: Arc<dyn Backplane>,
    channel: String,
    instance_id: Arc<str>,
    connected: AtomicBool,
    breaker: CircuitBreaker,
    queue: Mutex<PendingQueue>,
    capacity: usize,
    /// Serializes replays, so a replay and a newer publish of the same key keep their order.
    replaying: tokio::sync::Mutex<()>,
    telemetry: Arc<Telemetry>,
}

impl Notifier {
    pub fn new(
        backplane: Arc<dyn Backplane>,
        channel: String,
        instance_id: Arc<str>,
        breaker_duration: Duration,
        capacity: usize,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            backplane,
            channel,
            instance_id,
            connected: AtomicBool::new(false),
            breaker: CircuitBreaker::new(breaker_duration),
            queue: Mutex::new(PendingQueue::default()),
            capacity,
            replaying: tokio::sync::Mutex::new(()),
            telemetry,
        }
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    pub fn pending_len(&self) -> usize {
        self.queue.lock().expect("pending queue lock").len()
    }

    /// Sends a notification now, or queues it when the backplane cannot take it.
    pub async fn publish(&self, key: &str, action: Action, timestamp: i64) {
        if !self.connected.load(Ordering::Acquire) || self.breaker.is_open() {
            self.enqueue(key, Pending { action, timestamp });
            return;
        }
        if let Err(error) = self.send(key, action, timestamp).await {
            tracing::warn!(channel = %self.channel, key, %error, "backplane publish failed; queued for replay");
            self.breaker.trip();
            self.enqueue(key, Pending { action, timestamp });
        }
    }

    async fn send(
        &self,
        key: &str,
        action: Action,
        timestamp: i64,
    ) -> Result<(), crate::backplane::BackplaneError> {
        let payload = BackplaneMessage::new(&self.instance_id, timestamp, action, key).encode();
        self.backplane.publish(&self.channel, payload).await?;
        self.breaker.reset();
        Counters::incr(&self.telemetry.counters.backplane_sent);
        self.telemetry
            .emit(|| CacheEvent::BackplaneSent { key, action });
        Ok(())
    }

    fn enqueue(&self, key: &str, pending: Pending) {
        let dropped =
            self.queue
                .lock()
                .expect("pending queue lock")
                .push(key, pending, self.capacity);
        Counters::incr(&self.telemetry.counters.backplane_queued);
        self.telemetry.emit(|| CacheEvent::BackplaneQueued { key });
        if let Some(dropped) = dropped {
            Counters::incr(&self.telemetry.counters.backplane_queue_overflow);
            tracing::warn!(channel = %self.channel, key = %dropped, capacity = self.capacity,
                "backplane auto-recovery queue full: dropped the oldest pending notification");
            self.telemetry
                .emit(|| CacheEvent::BackplaneQueueOverflow { key: &dropped });
        }
    }

    /// Sends the queued notifications, oldest first; stops and re-queues the rest at the first failure.
    pub async fn replay(&self) {
        let _replay = self.replaying.lock().await;
        let pending = self.queue.lock().expect("pending queue lock").drain();
        if pending.is_empty() {
            return;
        }
        tracing::info!(channel = %self.channel, count = pending.len(), "replaying queued backplane notifications");
        let mut iter = pending.into_iter();
        while let Some((key, p)) = iter.next() {
            match self.send(&key, p.action, p.timestamp).await {
                Ok(()) => Counters::incr(&self.telemetry.counters.backplane_replayed),
                Err(error) => {
                    tracing::warn!(channel = %self.channel, %error, "backplane replay failed; will retry on reconnection");
                    self.breaker.trip();
                    let mut queue = self.queue.lock().expect("pending queue lock");
                    // Keep what was queued meanwhile (newer) over what is put back.
                    let newer = queue.drain();
                    for (k, p) in std::iter::once((key, p)).chain(iter).chain(newer) {
                        queue.push(&k, p, self.capacity);
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ts: i64) -> Pending {
        Pending {
            action: Action::Set,
            timestamp: ts,
        }
    }

    #[test]
    fn pending_queue_keeps_newest_per_key_in_change_order() {
        let mut q = PendingQueue::default();
        q.push("a", p(1), 10);
        q.push("b", p(2), 10);
        q.push("a", p(3), 10);
        let drained = q.drain();
        assert_eq!(
            drained,
            vec![("b".to_string(), p(2)), ("a".to_string(), p(3))]
        );
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn pending_queue_drops_oldest_when_full() {
        let mut q = PendingQueue::default();
        assert_eq!(q.push("a", p(1), 2), None);
        assert_eq!(q.push("b", p(2), 2), None);
        assert_eq!(
            q.push("b", p(3), 2),
            None,
            "an update of a queued key takes no room"
        );
        assert_eq!(q.push("c", p(4), 2), Some("a".to_string()));
        let keys: Vec<_> = q.drain().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["b", "c"]);
    }

    #[test]
    fn circuit_breaker_opens_for_its_duration_and_resets() {
        let b = CircuitBreaker::new(Duration::from_secs(60));
        assert!(!b.is_open());
        b.trip();
        assert!(b.is_open());
        b.reset();
        assert!(!b.is_open());
        let disabled = CircuitBreaker::new(Duration::ZERO);
        disabled.trip();
        assert!(!disabled.is_open());
    }
}
