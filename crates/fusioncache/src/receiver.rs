//! The receiving side of the backplane: applies the other nodes' notifications to this node's L1.
//!
//! - **set**: nothing if the key is not in L1, or if the L1 entry is as new as the message or newer;
//!   otherwise the entry is marked stale at once and, with an L2, refreshed from it in the background.
//! - **remove**: evict from L1.
//! - **expire**: mark stale (still usable as a fail-safe fallback).
//!
//! Connection events drive recovery: on a reconnection every L1 entry is marked stale (the node cannot know
//! what it missed) and the queued notifications are replayed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use moka::ops::compute::Op;

use crate::backplane::{Action, BackplaneEvent, BackplaneMessage, Subscription};
use crate::cache::{BackplaneState, Inner, CLEAR_KEY};
use crate::entry::L1Entry;
use crate::events::{CacheEvent, Counters};
use crate::l2::{l2_envelope_now_ms, L2Envelope};

/// Starts the receive loop of a cache; it ends when the cache is dropped or the transport goes away.
pub(crate) fn spawn<V>(
    inner: &Arc<Inner<V>>,
    subscription: Subscription,
) -> tokio::task::AbortHandle
where
    V: Clone + Send + Sync + 'static,
{
    let weak = Arc::downgrade(inner);
    tokio::spawn(run(weak, subscription)).abort_handle()
}

async fn run<V>(weak: Weak<Inner<V>>, mut subscription: Subscription)
where
    V: Clone + Send + Sync + 'static,
{
    let mut ever_connected = false;
    let mut connected = false;
    while let Some(event) = subscription.next().await {
        let Some(inner) = weak.upgrade() else { break };
        match event {
            BackplaneEvent::Message(payload) => apply(&inner, &payload),
            // Transports may repeat `Connected`; only a transition counts.
            BackplaneEvent::Connected if connected => {}
            BackplaneEvent::Connected => {
                connected = true;
                let reconnected = ever_connected;
                ever_connected = true;
                if reconnected {
                    Counters::incr(&inner.telemetry.counters.backplane_reconnects);
                    if inner.options.mark_stale_on_reconnect {
                        inner.mark_all_stale();
                    }
                }
                inner.backplane_down.store(false, Ordering::Release);
                if let Some(l2) = &inner.l2 {
                    // The connection is back: try L2 again at once rather than serve fail-safe values.
                    l2.breaker.reset();
                }
                tracing::info!(cache = %inner.options.name, channel = %inner.channel, reconnected, "backplane connected");
                inner
                    .telemetry
                    .emit(|| CacheEvent::BackplaneConnected { reconnected });
                if let Some(notifier) = &inner.notifier {
                    notifier.set_connected(true);
                    let notifier = Arc::clone(notifier);
                    tokio::spawn(async move { notifier.replay().await });
                }
                inner.state.send_replace(BackplaneState::Connected);
            }
            BackplaneEvent::Disconnected { reason } => {
                connected = false;
                inner.backplane_down.store(true, Ordering::Release);
                if let Some(notifier) = &inner.notifier {
                    notifier.set_connected(false);
                }
                tracing::warn!(cache = %inner.options.name, channel = %inner.channel, %reason, "backplane disconnected");
                inner
                    .telemetry
                    .emit(|| CacheEvent::BackplaneDisconnected { reason });
                inner.state.send_replace(BackplaneState::Disconnected);
            }
        }
    }
}

/// Decodes and applies one payload. Malformed payloads are dropped and counted, never a panic.
pub(crate) fn apply<V>(inner: &Arc<Inner<V>>, payload: &[u8])
where
    V: Clone + Send + Sync + 'static,
{
    let counters = &inner.telemetry.counters;
    let msg = match BackplaneMessage::decode(payload) {
        Ok(msg) => msg,
        Err(error) => {
            if error.is_unsupported() {
                Counters::incr(&counters.backplane_unsupported);
                tracing::debug!(cache = %inner.options.name, %error, "backplane message ignored");
            } else {
                Counters::incr(&counters.backplane_malformed);
                tracing::warn!(cache = %inner.options.name, %error, len = payload.len(), "malformed backplane message dropped");
            }
            inner.telemetry.emit(|| CacheEvent::BackplaneDropped {
                reason: error.to_string(),
            });
            return;
        }
    };
    if msg.source_id == &*inner.instance_id {
        Counters::incr(&counters.backplane_self_ignored);
        return;
    }
    let key = msg.cache_key;
    match msg.action {
        Action::Set if key == CLEAR_KEY => inner.l1.invalidate_all(),
        Action::Set => {
            let older = |e: &L1Entry<V>| e.timestamp < msg.timestamp;
            if inner.mark_stale(key, older) && inner.l2.is_some() {
                refresh_from_l2(inner, key, msg.timestamp);
            }
        }
        Action::Remove => inner.l1.invalidate(key),
        Action::Expire => {
            inner.mark_stale(key, |e| e.timestamp <= msg.timestamp);
        }
    }
    Counters::incr(&counters.backplane_received);
    inner.telemetry.emit(|| CacheEvent::BackplaneReceived {
        key,
        action: msg.action,
    });
}

/// Reloads a stale L1 entry from L2 in the background, if L2 has a newer one than L1.
fn refresh_from_l2<V>(inner: &Arc<Inner<V>>, key: &str, notified_at: i64)
where
    V: Clone + Send + Sync + 'static,
{
    // When too many refreshes are running, the entry just stays stale: the next read goes to L2.
    let Ok(permit) = Arc::clone(&inner.refreshes).try_acquire_owned() else {
        return;
    };
    let inner = Arc::clone(inner);
    let key = key.to_string();
    tokio::spawn(async move {
        let _permit = permit;
        let Some(layer) = &inner.l2 else { return };
        let Ok(Some(bytes)) = inner.l2_call(Some(&key), layer.store.get(&key)).await else {
            return;
        };
        let Ok(env) = L2Envelope::decode(&key, bytes) else {
            return;
        };
        if env.timestamp < notified_at {
            return; // L2 does not hold the notified write (yet): stay stale.
        }
        let Ok(value) = layer.serializer.deserialize(&env.payload) else {
            return;
        };
        let now_ms = l2_envelope_now_ms();
        let lifetime = inner.lifetime_from_l2(
            &inner.default_entry_options,
            env.remaining(now_ms),
            env.fail_safe_remaining(now_ms),
        );
        if lifetime.fresh_for.is_zero() {
            return;
        }
        let epoch = inner.stale_epoch.load(Ordering::Acquire);
        let fresh = L1Entry::new(
            value,
            env.timestamp,
            quanta::Instant::now(),
            lifetime,
            epoch,
        );
        // Only replace an entry that is still there and older: a remove or a newer write meanwhile wins.
        inner
            .l1
            .entry(key)
            .and_compute_with(|current| match current {
                Some(current) if current.value().timestamp < fresh.timestamp => Op::Put(fresh),
                _ => Op::Nop,
            });
    });
}
