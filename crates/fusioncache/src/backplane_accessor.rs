//! The backplane accessor: this cache's side of the backplane (as FusionCache's `BackplaneAccessor`).
//!
//! **Sending**: one FusionCache v0 message per change, through a circuit breaker; a failed publish is
//! handed to auto-recovery by the caller. Publishing does not wait for this node's own subscription.
//!
//! **Receiving** (one task per cache), for messages from other nodes:
//! - **set**: nothing if the key is not in L1, or if the L1 entry is as new as the message or newer;
//!   otherwise the entry is marked stale at once and, with an L2, refreshed from it in the background;
//! - **remove**: evict from L1;
//! - **expire**: mark stale (still usable as a fail-safe fallback).
//!
//! Each is applied through the [`KeyGuard`](crate::guard::KeyGuard), so a read of the key in flight does
//! not install an older value afterwards, and only if auto-recovery holds no newer change of the key.
//!
//! **Connection state** lives here, in one place: `Connected` (first time or again), `Disconnected`, and
//! gaps (events this cache could not keep up with). A reconnection or a gap marks every L1 entry stale
//! (the node cannot know what it missed) and wakes auto-recovery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::backplane::{
    settled, Action, Backplane, BackplaneError, BackplaneEvent, BackplaneMessage, Confirmation,
    Subscription,
};
use crate::cache::{BackplaneState, Inner};
use crate::circuit_breaker::CircuitBreaker;
use crate::events::CacheEvent;
use crate::tags::{INTERNAL_KEY_PREFIX, TAG_KEY_PREFIX};
use crate::telemetry::{Counters, Telemetry};

/// The backplane of one cache: its channel, its publish path and its connection state.
pub(crate) struct BackplaneAccessor {
    backplane: Arc<dyn Backplane>,
    channel: String,
    instance_id: Arc<str>,
    breaker: CircuitBreaker,
    state: watch::Sender<BackplaneState>,
    /// `state == Disconnected`, for the L1 hit path (one load).
    down: AtomicBool,
    telemetry: Arc<Telemetry>,
}

impl BackplaneAccessor {
    pub fn new(
        backplane: Arc<dyn Backplane>,
        channel: String,
        instance_id: Arc<str>,
        breaker_duration: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            backplane,
            channel,
            instance_id,
            breaker: CircuitBreaker::new(breaker_duration),
            state: watch::Sender::new(BackplaneState::Connecting),
            down: AtomicBool::new(false),
            telemetry,
        }
    }

    /// Whether the subscription is known to be down (L1 is then not trusted).
    #[inline]
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    pub fn state(&self) -> BackplaneState {
        *self.state.borrow()
    }

    pub fn watch_state(&self) -> watch::Receiver<BackplaneState> {
        self.state.subscribe()
    }

    fn set_state(&self, state: BackplaneState) {
        self.down
            .store(state == BackplaneState::Disconnected, Ordering::Release);
        self.state.send_replace(state);
    }

    fn breaker_changed(&self, open: bool) {
        let counters = &self.telemetry.counters;
        Counters::incr(if open {
            &counters.backplane_breaker_opened
        } else {
            &counters.backplane_breaker_closed
        });
        self.telemetry.emit(|| CacheEvent::CircuitBreaker {
            layer: crate::events::Layer::Backplane,
            open,
        });
    }

    /// Publishes one notification. An error means it was not sent (the caller queues it). A `probe`
    /// (auto-recovery's paced retries) goes through an open breaker.
    pub async fn publish(
        &self,
        key: &str,
        action: Action,
        timestamp: i64,
        probe: bool,
    ) -> Result<(), BackplaneError> {
        if !probe && self.breaker.is_open() {
            return Err(BackplaneError::CircuitOpen);
        }
        let payload = BackplaneMessage::new(&self.instance_id, timestamp, action, key).encode();
        let result = self.backplane.publish(&self.channel, payload).await;
        self.published(key, action, result)
    }

    /// Sends a batch of notifications in order, as one pipeline or flush where the transport can; the
    /// returned future gives their results once the transport knows them (record them with
    /// [`published_all`](Self::published_all)).
    pub async fn send_all(&self, batch: &[Outgoing]) -> Confirmation {
        if self.breaker.is_open() {
            let open = batch
                .iter()
                .map(|_| Err(BackplaneError::CircuitOpen))
                .collect();
            return settled(open);
        }
        let payloads = batch
            .iter()
            .map(|o| {
                BackplaneMessage::new(&self.instance_id, o.timestamp, o.action, &o.key).encode()
            })
            .collect();
        self.backplane.send_batch(&self.channel, payloads).await
    }

    /// Records the results of a batch sent with [`send_all`](Self::send_all).
    pub fn published_all(
        &self,
        batch: &[Outgoing],
        results: Vec<Result<(), BackplaneError>>,
    ) -> Vec<Result<(), BackplaneError>> {
        batch
            .iter()
            .zip(results)
            .map(|(o, result)| self.published(&o.key, o.action, result))
            .collect()
    }

    /// Whether the breaker lets publishes through now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn is_usable(&self) -> bool {
        !self.breaker.is_open()
    }

    /// The transport.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn backplane(&self) -> &dyn Backplane {
        self.backplane.as_ref()
    }

    /// The channel.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The payload of one notification from this node.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn encode(&self, key: &str, action: Action, timestamp: i64) -> bytes::Bytes {
        BackplaneMessage::new(&self.instance_id, timestamp, action, key).encode()
    }

    /// Records the outcome of one publish.
    pub fn published(
        &self,
        key: &str,
        action: Action,
        result: Result<(), BackplaneError>,
    ) -> Result<(), BackplaneError> {
        match result {
            Ok(()) => {
                if self.breaker.reset() {
                    self.breaker_changed(false);
                }
                Counters::incr(&self.telemetry.counters.backplane_sent);
                self.telemetry
                    .emit(|| CacheEvent::BackplaneSent { key, action });
                Ok(())
            }
            Err(error) => {
                if self.breaker.trip() {
                    self.breaker_changed(true);
                    tracing::warn!(channel = %self.channel, key, %error, "backplane publish failed; queued for auto-recovery");
                }
                Err(error)
            }
        }
    }
}

/// A notification handed to the background publisher.
pub(crate) struct Outgoing {
    pub key: String,
    pub action: Action,
    pub timestamp: i64,
    pub expires_at_ms: i64,
}

/// Starts the receive loop of a cache; it ends when the cache is dropped or the transport goes away.
pub(crate) fn spawn_receiver<V>(
    inner: &Arc<Inner<V>>,
    subscription: Subscription,
) -> tokio::task::AbortHandle
where
    V: Clone + Send + Sync + 'static,
{
    tokio::spawn(receive(Arc::downgrade(inner), subscription)).abort_handle()
}

async fn receive<V>(weak: Weak<Inner<V>>, mut subscription: Subscription)
where
    V: Clone + Send + Sync + 'static,
{
    let mut ever_connected = false;
    let mut connected = false;
    // What arrived since the last look, handled as one batch (the cache is looked up once per batch).
    let mut events = Vec::with_capacity(RECEIVE_BATCH);
    while subscription.next_many(&mut events, RECEIVE_BATCH).await > 0 {
        let Some(inner) = weak.upgrade() else { break };
        let Some(bp) = &inner.backplane else { break };
        if subscription.take_missed() {
            Counters::incr(&inner.telemetry.counters.backplane_overflows);
            tracing::warn!(cache = %inner.options.name, "this cache fell behind its backplane and missed notifications; marking L1 stale");
            inner.telemetry.emit(|| CacheEvent::BackplaneOverflow);
            inner.mark_all_stale();
        }
        for event in events.drain(..) {
            match event {
                BackplaneEvent::Message(_) if inner.options.ignore_incoming_notifications => {}
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
                    if bp.breaker.reset() {
                        bp.breaker_changed(false);
                    }
                    if let Some(l2) = &inner.l2 {
                        // The connection is back: try L2 again at once rather than serve fail-safe values.
                        l2.reset_breaker();
                    }
                    bp.set_state(BackplaneState::Connected);
                    tracing::info!(cache = %inner.options.name, channel = %bp.channel, reconnected, "backplane connected");
                    inner
                        .telemetry
                        .emit(|| CacheEvent::BackplaneConnected { reconnected });
                    inner.recovery.kick();
                }
                BackplaneEvent::Disconnected { reason } => {
                    connected = false;
                    bp.set_state(BackplaneState::Disconnected);
                    tracing::warn!(cache = %inner.options.name, channel = %bp.channel, %reason, "backplane disconnected");
                    inner
                        .telemetry
                        .emit(|| CacheEvent::BackplaneDisconnected { reason });
                }
            }
        }
    }
}

/// The most events the receive loop takes at once.
const RECEIVE_BATCH: usize = 64;

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
    let (key, ts) = (msg.cache_key, msg.timestamp);
    let _span = tracing::trace_span!("notification received", cache = %inner.options.name, key, action = ?msg.action).entered();
    // A newer change of the key still queued here wins: it will reach the others.
    if !inner.recovery.admit_incoming(key, ts) {
        return;
    }
    let guard = &inner.guard;
    match msg.action {
        // A tag removal or a clear (`*`, `!`): entries with the tag written until then are gone.
        Action::Set if key.starts_with(TAG_KEY_PREFIX) => {
            if let Some(state) = inner.l1.tags().existing(&key[TAG_KEY_PREFIX.len()..]) {
                state.removed(ts);
            }
        }
        // Other internal keys (liveness probes): nothing to apply, not counted as notifications.
        _ if key.starts_with(INTERNAL_KEY_PREFIX) => {
            Counters::incr(&counters.backplane_probes);
            return;
        }
        Action::Set => {
            let older = guard.observe(key, ts, || inner.l1.mark_stale(key, |e| e.timestamp < ts));
            if older && inner.l2.is_some() {
                inner.refresh_in_background(key, ts);
            }
        }
        Action::Remove => guard.observe(key, ts, || inner.l1.remove(key)),
        Action::Expire => {
            guard.observe(key, ts, || inner.l1.mark_stale(key, |e| e.timestamp <= ts));
        }
    }
    Counters::incr(&counters.backplane_received);
    counters.record_lag(ts);
    inner.telemetry.emit(|| CacheEvent::BackplaneReceived {
        key,
        action: msg.action,
    });
}
