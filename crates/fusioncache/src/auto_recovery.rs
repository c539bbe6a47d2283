//! Auto-recovery of distributed operations (as FusionCache's `AutoRecoveryService`).
//!
//! A change is *distributed* in two steps: the L2 write, then the notification. When the L2 step fails,
//! nothing is published (the other nodes would re-read L2 and find the old value); the whole operation is
//! queued instead. When only the publish fails, the notification is queued. The queue keeps one item per
//! key (the newest timestamp wins) and is retried in the background:
//!
//! - periodically, after [`auto_recovery_delay`](crate::CacheOptions::auto_recovery_delay) (jittered,
//!   backing off exponentially while it keeps failing), and at once when L2 or the backplane comes back;
//! - before an item's L2 step is replayed, L2 is read again: if it already holds a newer write, the item
//!   is dropped and L1 refreshed from L2 instead (another node won);
//! - a notification received for a key with a queued item wins only if it is newer (then the item is
//!   dropped); otherwise the incoming one is ignored and ours will reach the other nodes;
//! - while queued, an item keeps its key held in the [`KeyGuard`](crate::guard::KeyGuard), so no older
//!   value read from L2 is installed over this node's own write, and reads of the key answer from the
//!   item (read-your-writes while L2 is down).
//!
//! The queue is bounded: when it is full, items whose entry has already expired go first, then the item
//! that expires soonest (the new one, if it expires before all the others). Every queued, dropped and
//! replayed item is counted and reported as an event.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use tokio::sync::Notify;

use crate::backplane::Action;
use crate::cache::Inner;
use crate::events::{CacheEvent, DropReason};
use crate::guard::KeyGuard;
use crate::l2::l2_envelope_now_ms;
use crate::l2_accessor::L2Write;
use crate::telemetry::{Counters, Telemetry};

/// One queued distributed operation.
#[derive(Debug, Clone)]
pub(crate) struct RecoveryItem {
    pub action: Action,
    pub timestamp: i64,
    /// The L2 step still to do (`None`: done, or the cache has no L2).
    pub l2: Option<L2Write>,
    /// Whether the notification is still to be sent.
    pub publish: bool,
    /// When the change stops mattering (Unix ms): its entry would have expired everywhere by then.
    pub expires_at_ms: i64,
    seq: u64,
}

impl RecoveryItem {
    pub fn new(
        action: Action,
        timestamp: i64,
        l2: Option<L2Write>,
        publish: bool,
        expires_at_ms: i64,
    ) -> Self {
        Self {
            action,
            timestamp,
            l2,
            publish,
            expires_at_ms,
            seq: 0,
        }
    }
}

/// What a queued item says a read of its key should see.
pub(crate) enum PendingRead {
    /// This node's own write, not yet in L2: the envelope to decode.
    Written(Bytes),
    /// This node removed or expired the key.
    Gone,
}

#[derive(Default)]
struct Queue {
    items: HashMap<String, RecoveryItem>,
    by_expiry: BTreeSet<(i64, u64, String)>,
    next_seq: u64,
}

impl Queue {
    fn take(&mut self, key: &str) -> Option<RecoveryItem> {
        let item = self.items.remove(key)?;
        self.by_expiry
            .remove(&(item.expires_at_ms, item.seq, key.to_string()));
        Some(item)
    }
}

/// The auto-recovery queue of one cache and the signals of its background task.
pub(crate) struct AutoRecovery {
    queue: Mutex<Queue>,
    len: AtomicUsize,
    capacity: usize,
    guard: Arc<KeyGuard>,
    telemetry: Arc<Telemetry>,
    /// An item was queued: start the retry timer.
    queued: Notify,
    /// L2 or the backplane came back: retry now.
    kick: Notify,
    delay: Duration,
    max_delay: Duration,
}

impl AutoRecovery {
    pub fn new(
        capacity: usize,
        delay: Duration,
        max_delay: Duration,
        guard: Arc<KeyGuard>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            queue: Mutex::default(),
            len: AtomicUsize::new(0),
            capacity: capacity.max(1),
            guard,
            telemetry,
            queued: Notify::new(),
            kick: Notify::new(),
            delay,
            max_delay: max_delay.max(delay),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of queued items.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn dropped(&self, key: &str, reason: DropReason) {
        self.guard.release(key);
        Counters::incr(&self.telemetry.counters.auto_recovery_dropped);
        tracing::debug!(key, ?reason, "auto-recovery item dropped");
        self.telemetry
            .emit(|| CacheEvent::AutoRecoveryDropped { key, reason });
    }

    /// Queues `item` for `key`. Returns whether it is in the queue.
    pub fn push(&self, key: &str, mut item: RecoveryItem) -> bool {
        let now_ms = l2_envelope_now_ms();
        let mut evicted = Vec::new();
        let queued = {
            let mut q = self.lock();
            if let Some(existing) = q.items.get(key) {
                if existing.timestamp > item.timestamp {
                    drop(q);
                    Counters::incr(&self.telemetry.counters.auto_recovery_dropped);
                    return false;
                }
                q.take(key);
                evicted.push((key.to_string(), DropReason::Superseded));
            }
            if q.items.len() >= self.capacity {
                let expired: Vec<String> = q
                    .by_expiry
                    .iter()
                    .take_while(|(exp, _, _)| *exp <= now_ms)
                    .map(|(_, _, k)| k.clone())
                    .collect();
                for k in expired {
                    q.take(&k);
                    evicted.push((k, DropReason::Expired));
                }
            }
            let mut fits = true;
            if q.items.len() >= self.capacity {
                let soonest = q.by_expiry.first().cloned();
                match soonest {
                    Some((exp, _, k)) if exp < item.expires_at_ms => {
                        q.take(&k);
                        evicted.push((k, DropReason::Overflow));
                    }
                    _ => fits = false,
                }
            }
            if fits {
                item.seq = q.next_seq;
                q.next_seq += 1;
                q.by_expiry
                    .insert((item.expires_at_ms, item.seq, key.to_string()));
                q.items.insert(key.to_string(), item.clone());
                // Held for as long as it is queued (released when it leaves the queue).
                self.guard.retain(key, item.timestamp);
            }
            self.len.store(q.items.len(), Ordering::Release);
            fits
        };
        for (k, reason) in evicted {
            if reason == DropReason::Superseded {
                // Replaced by the new item of the same key: its hold goes, the new one stays.
                self.guard.release(&k);
            } else {
                self.dropped(&k, reason);
            }
        }
        if !queued {
            Counters::incr(&self.telemetry.counters.auto_recovery_dropped);
            tracing::warn!(
                key,
                capacity = self.capacity,
                "auto-recovery queue full: the new item expires first and was dropped"
            );
            self.telemetry.emit(|| CacheEvent::AutoRecoveryDropped {
                key,
                reason: DropReason::Overflow,
            });
            return false;
        }
        Counters::incr(&self.telemetry.counters.auto_recovery_queued);
        self.telemetry.emit(|| CacheEvent::AutoRecoveryQueued {
            key,
            action: item.action,
        });
        self.queued.notify_one();
        true
    }

    /// What a read of `key` must see because of a queued item, if any.
    pub fn pending_read(&self, key: &str) -> Option<PendingRead> {
        if self.len() == 0 {
            return None;
        }
        let q = self.lock();
        let item = q.items.get(key)?;
        Some(match (&item.l2, item.action) {
            (Some(L2Write::Set { bytes, .. }), _) => PendingRead::Written(bytes.clone()),
            (_, Action::Set) => return None, // in L2 already: read it there
            _ => PendingRead::Gone,
        })
    }

    /// For a notification of `key` at `timestamp` from another node: whether to apply it. A newer one
    /// supersedes a queued item of the key (dropped); an older one is ignored, ours will be sent.
    pub fn admit_incoming(&self, key: &str, timestamp: i64) -> bool {
        self.len() == 0 || self.drop_older(key, timestamp).unwrap_or(true)
    }

    /// A change of `key` at `timestamp` from this node went through L2: a queued older change of the key
    /// is obsolete (replayed later, it would undo it: a removed key would come back).
    pub fn supersede(&self, key: &str, timestamp: i64) {
        if self.len() > 0 {
            self.drop_older(key, timestamp);
        }
    }

    /// Drops `key`'s queued item if it is older than `timestamp`: `None` when none is queued, else whether
    /// it was dropped.
    fn drop_older(&self, key: &str, timestamp: i64) -> Option<bool> {
        {
            let mut q = self.lock();
            if q.items.get(key)?.timestamp >= timestamp {
                return Some(false);
            }
            q.take(key);
            self.len.store(q.items.len(), Ordering::Release);
        }
        self.dropped(key, DropReason::Superseded);
        Some(true)
    }

    /// The queued items, oldest first.
    fn snapshot(&self) -> Vec<(String, RecoveryItem)> {
        let q = self.lock();
        let mut items: Vec<_> = q
            .items
            .iter()
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
        items.sort_by_key(|(_, i)| i.seq);
        items
    }

    /// Removes `key`'s item if it is still the one processed (`seq`).
    fn finish(&self, key: &str, seq: u64, outcome: Result<(), DropReason>) {
        {
            let mut q = self.lock();
            if q.items.get(key).is_none_or(|i| i.seq != seq) {
                return;
            }
            q.take(key);
            self.len.store(q.items.len(), Ordering::Release);
        }
        match outcome {
            Ok(()) => {
                self.guard.release(key);
                Counters::incr(&self.telemetry.counters.auto_recovery_replayed);
                self.telemetry
                    .emit(|| CacheEvent::AutoRecoveryReplayed { key });
            }
            Err(reason) => self.dropped(key, reason),
        }
    }

    /// Records that `key`'s item (`seq`) has done its L2 step.
    fn l2_done(&self, key: &str, seq: u64) {
        let mut q = self.lock();
        if let Some(item) = q.items.get_mut(key).filter(|i| i.seq == seq) {
            item.l2 = None;
        }
    }

    /// Asks the background task to retry now (L2 or the backplane is back).
    pub fn kick(&self) {
        if self.len() > 0 {
            self.kick.notify_one();
        }
    }
}

/// The background task of a cache's auto-recovery: waits for items, retries them, backs off while they
/// keep failing. Ends when the cache is dropped.
pub(crate) async fn run<V>(recovery: Arc<AutoRecovery>, cache: Weak<Inner<V>>)
where
    V: Clone + Send + Sync + 'static,
{
    let backoff = || {
        ExponentialBuilder::new()
            .with_min_delay(recovery.delay / 2)
            .with_max_delay(recovery.max_delay / 2)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    loop {
        if recovery.len() == 0 {
            tokio::select! {
                _ = recovery.queued.notified() => {}
                _ = recovery.kick.notified() => {}
            }
            continue;
        }
        let delay = delays.next().unwrap_or(recovery.max_delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = recovery.kick.notified() => {}
        }
        let Some(inner) = cache.upgrade() else { return };
        let done = process(&inner).await;
        drop(inner);
        if done {
            delays = backoff();
        } else {
            Counters::incr(&recovery.telemetry.counters.auto_recovery_retries);
        }
        if cache.strong_count() == 0 {
            return;
        }
    }
}

/// One pass over the queue, oldest first. Returns whether every item went through.
async fn process<V>(inner: &Arc<Inner<V>>) -> bool
where
    V: Clone + Send + Sync + 'static,
{
    let recovery = &inner.recovery;
    let items = recovery.snapshot();
    if items.is_empty() {
        return true;
    }
    tracing::debug!(cache = %inner.options.name, count = items.len(), "auto-recovery: retrying queued operations");
    let (mut l2_down, mut backplane_down) = (false, false);
    let now_ms = l2_envelope_now_ms();
    for (key, item) in items {
        if item.expires_at_ms <= now_ms {
            recovery.finish(&key, item.seq, Err(DropReason::Expired));
            continue;
        }
        if let Some(write) = &item.l2 {
            if l2_down {
                continue;
            }
            let Some(l2) = &inner.l2 else {
                recovery.l2_done(&key, item.seq);
                continue;
            };
            // Did another node write the key since? Then its write stands and this one is obsolete.
            let hold = inner.guard.hold(&key, None);
            match l2.read_envelope(&key, true).await {
                Ok((Some(env), _)) if env.timestamp > item.timestamp => {
                    recovery.finish(&key, item.seq, Err(DropReason::Superseded));
                    inner.refresh_from_envelope(&hold, env).await;
                    continue;
                }
                Ok(_) => {}
                Err(_) => {
                    l2_down = true;
                    continue;
                }
            }
            if l2.write(&key, write, true).await.is_err() {
                l2_down = true;
                continue;
            }
            recovery.l2_done(&key, item.seq);
        }
        if item.publish {
            if backplane_down {
                continue;
            }
            if let Some(bp) = &inner.backplane {
                if bp
                    .publish(&key, item.action, item.timestamp, true)
                    .await
                    .is_err()
                {
                    backplane_down = true;
                    continue;
                }
            }
        }
        recovery.finish(&key, item.seq, Ok(()));
    }
    !(l2_down || backplane_down)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(capacity: usize) -> AutoRecovery {
        AutoRecovery::new(
            capacity,
            Duration::from_secs(1),
            Duration::from_secs(8),
            Arc::new(KeyGuard::default()),
            Arc::new(Telemetry::default()),
        )
    }

    fn item(ts: i64, expires_at_ms: i64) -> RecoveryItem {
        RecoveryItem::new(
            Action::Remove,
            ts,
            Some(L2Write::Remove),
            true,
            expires_at_ms,
        )
    }

    fn far() -> i64 {
        l2_envelope_now_ms() + 3_600_000
    }

    #[test]
    fn one_item_per_key_newest_wins() {
        let r = service(10);
        assert!(r.push("a", item(1, far())));
        assert!(r.push("a", item(3, far())));
        assert!(!r.push("a", item(2, far())), "older than the queued one");
        assert_eq!(r.len(), 1);
        assert_eq!(r.snapshot()[0].1.timestamp, 3);
        assert_eq!(r.guard.held_keys(), 1, "the key stays held while queued");
    }

    #[test]
    fn a_full_queue_keeps_the_items_that_expire_latest() {
        let r = service(2);
        let now = l2_envelope_now_ms();
        assert!(r.push("soon", item(1, now + 1_000)));
        assert!(r.push("late", item(1, now + 9_000)));
        assert!(r.push("later", item(1, now + 5_000)), "evicts `soon`");
        assert!(
            !r.push("sooner", item(1, now + 500)),
            "expires before all: dropped"
        );
        let keys: Vec<_> = r.snapshot().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["late", "later"]);
        assert_eq!(r.telemetry.counters.snapshot().auto_recovery_dropped, 2);
        // Expired items go first.
        let r = service(1);
        assert!(r.push("dead", item(1, now - 1)));
        assert!(r.push("new", item(1, now + 10)));
        assert_eq!(r.snapshot()[0].0, "new");
        assert_eq!(r.guard.held_keys(), 1);
    }

    #[test]
    fn incoming_notifications_are_admitted_only_when_newer_than_the_queued_item() {
        let r = service(10);
        assert!(r.admit_incoming("k", 5), "nothing queued");
        r.push("k", item(10, far()));
        assert!(!r.admit_incoming("k", 9), "ours is newer: ignore theirs");
        assert_eq!(r.len(), 1);
        assert!(r.admit_incoming("k", 11), "theirs is newer");
        assert_eq!(r.len(), 0, "ours was dropped");
        assert_eq!(r.guard.held_keys(), 0);
    }

    #[test]
    fn reads_see_the_queued_write() {
        let r = service(10);
        let set = RecoveryItem::new(
            Action::Set,
            1,
            Some(L2Write::Set {
                bytes: Bytes::from_static(b"env"),
                ttl: Duration::from_secs(1),
            }),
            true,
            far(),
        );
        r.push("s", set);
        r.push("g", item(1, far()));
        assert!(matches!(r.pending_read("s"), Some(PendingRead::Written(b)) if &b[..] == b"env"));
        assert!(matches!(r.pending_read("g"), Some(PendingRead::Gone)));
        assert!(r.pending_read("other").is_none());
    }
}
