//! The backplane: a slim message bus that tells every other node *that* a key changed.
//!
//! A [`Backplane`] moves opaque payloads on named channels and reports its connection state; it knows
//! nothing of caches. The cache encodes [`BackplaneMessage`]s (the FusionCache wire format), ignores its own,
//! and applies the others to its L1. Transports:
//!
//! - [`MemoryBackplane`]: in-process, for tests, demos and single-process setups (always available);
//! - `RedisBackplane` (feature `redis`): Redis pub/sub;
//! - `NatsBackplane` (feature `nats`): NATS core subjects.
//!
//! Transports own reconnection: a [`Subscription`] lives across connection losses and yields
//! [`BackplaneEvent::Connected`] / [`BackplaneEvent::Disconnected`] as they happen, so the cache can mark
//! its L1 stale and replay queued notifications.

mod fanout;
#[cfg(any(feature = "redis", feature = "nats"))]
pub(crate) mod liveness;
mod memory;
mod message;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

pub use memory::MemoryBackplane;
pub use message::{
    now_ticks, Action, BackplaneMessage, DecodeError, UNIX_EPOCH_TICKS, WIRE_FORMAT_VERSION,
};

/// The reserved key of the transports' liveness probes.
///
/// When a subscribed channel has been quiet for its health-check interval, the Redis and NATS transports
/// publish a probe on it: a valid FusionCache v0 *set* message for this key, which no node holds (so a .NET
/// FusionCache node on the channel logs it at trace level and does nothing). Hearing it back proves that
/// the subscription still delivers. Probes reach subscribers like any message; the cache ignores the key
/// (it counts probes in `backplane_probes`). Do not use it as a cache key.
pub const PROBE_KEY: &str = "__fc:probe";

/// The suffix of every channel name; it carries the wire-format family (`v2` as in FusionCache v2).
pub const CHANNEL_SUFFIX: &str = ".Backplane:v2";

/// The backplane channel of a cache: `{prefix}.Backplane:v2`, where prefix is the channel prefix, else the
/// cache name, else `FusionCache`.
///
/// ```
/// use fusioncache::backplane::channel_name;
/// assert_eq!(channel_name(None, Some("products")), "products.Backplane:v2");
/// assert_eq!(channel_name(Some("shop.prod.products"), Some("products")), "shop.prod.products.Backplane:v2");
/// assert_eq!(channel_name(None, None), "FusionCache.Backplane:v2");
/// ```
pub fn channel_name(channel_prefix: Option<&str>, cache_name: Option<&str>) -> String {
    let prefix = channel_prefix
        .filter(|p| !p.is_empty())
        .or(cache_name.filter(|n| !n.is_empty()))
        .unwrap_or(crate::DEFAULT_CACHE_NAME);
    format!("{prefix}{CHANNEL_SUFFIX}")
}

/// An error of a backplane transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackplaneError {
    /// The channel name cannot be used on this transport (e.g. not a valid NATS subject).
    #[error("invalid backplane channel `{channel}`: {reason}")]
    InvalidChannel {
        /// The channel.
        channel: String,
        /// Why.
        reason: String,
    },
    /// The transport is not connected; the publish was not sent.
    #[error("backplane not connected")]
    NotConnected,
    /// A recent publish failed and the circuit breaker is open: the publish was not tried.
    #[error("backplane circuit breaker is open")]
    CircuitOpen,
    /// The transport failed (network, protocol, server error).
    #[error("backplane transport error: {0}")]
    Transport(String),
    /// The transport configuration is invalid (URL, credentials, TLS).
    #[error("backplane configuration error: {0}")]
    Config(String),
}

/// Something a subscription reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackplaneEvent {
    /// The subscription is (again) active: messages published from now on will arrive.
    Connected,
    /// The connection was lost: messages published until the next `Connected` may be missed.
    Disconnected {
        /// What the transport said.
        reason: String,
    },
    /// A payload published by some node (possibly this one).
    Message(Bytes),
}

/// The receiving end of a subscription to one channel. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    events: mpsc::Receiver<BackplaneEvent>,
    lag: Arc<Lag>,
}

/// What a transport could not deliver to a subscription whose buffer was full.
#[derive(Debug, Default)]
pub(crate) struct Lag {
    /// Something was dropped: the subscriber must treat it as a gap.
    missed: AtomicBool,
    /// The last connection event that did not fit, delivered before the next buffered event.
    state: Mutex<Option<BackplaneEvent>>,
    /// `state` holds an event: spares the receiver the lock on every other event.
    has_state: AtomicBool,
}

impl Lag {
    /// Records a dropped event.
    pub(crate) fn record(&self, event: BackplaneEvent) {
        if !matches!(event, BackplaneEvent::Message(_)) {
            *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(event);
            self.has_state.store(true, Ordering::Release);
        }
        self.missed.store(true, Ordering::Release);
    }
}

impl Subscription {
    /// A subscription fed by `events`; transports keep the sender.
    pub fn new(events: mpsc::Receiver<BackplaneEvent>) -> Self {
        Self::with_lag(events, Arc::default())
    }

    pub(crate) fn with_lag(events: mpsc::Receiver<BackplaneEvent>, lag: Arc<Lag>) -> Self {
        Self { events, lag }
    }

    /// The next event, or `None` when the transport is gone.
    pub async fn next(&mut self) -> Option<BackplaneEvent> {
        match self.missed_state() {
            Some(state) => Some(state),
            None => self.events.recv().await,
        }
    }

    /// Up to `limit` events into `events` (appended), waiting for the first; 0 when the transport is gone.
    pub(crate) async fn next_many(
        &mut self,
        events: &mut Vec<BackplaneEvent>,
        limit: usize,
    ) -> usize {
        if let Some(state) = self.missed_state() {
            events.push(state);
            return 1;
        }
        self.events.recv_many(events, limit).await
    }

    /// A connection event that did not fit in the buffer, delivered before the buffered ones.
    fn missed_state(&self) -> Option<BackplaneEvent> {
        if !self.lag.has_state.load(Ordering::Acquire) {
            return None;
        }
        let mut state = self.lag.state.lock().unwrap_or_else(|e| e.into_inner());
        self.lag.has_state.store(false, Ordering::Release);
        state.take()
    }

    /// Whether events were dropped since the last call because this subscription fell behind (its buffer
    /// was full): the subscriber may have missed notifications.
    pub fn take_missed(&self) -> bool {
        self.lag.missed.load(Ordering::Acquire) && self.lag.missed.swap(false, Ordering::AcqRel)
    }
}

/// The results of a batch handed to [`Backplane::send_batch`], once the transport knows them.
#[doc(hidden)]
pub type Confirmation = BoxFuture<'static, Vec<Result<(), BackplaneError>>>;

/// A confirmation whose results are already known.
pub(crate) fn settled(results: Vec<Result<(), BackplaneError>>) -> Confirmation {
    Box::pin(std::future::ready(results))
}

/// A message bus carrying opaque payloads on named channels.
///
/// Implementations are cheap to share (`Arc`), let several caches of a process share one connection, and
/// own reconnection. A `subscribe` call registers the channel and returns at once; the subscription's first
/// event says when it is active.
pub trait Backplane: Send + Sync + 'static {
    /// Subscribes to `channel`. Fails only for a channel name the transport cannot use.
    fn subscribe(&self, channel: &str) -> Result<Subscription, BackplaneError>;

    /// Publishes `payload` on `channel`. An error means the payload was not sent (the cache queues it).
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>>;

    /// Publishes `payloads` on `channel`, in order, as one batch where the transport can (one pipeline,
    /// one flush); returns one result per payload. The default publishes them one after the other.
    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        payloads: Vec<Bytes>,
    ) -> BoxFuture<'a, Vec<Result<(), BackplaneError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(payloads.len());
            for payload in payloads {
                results.push(self.publish(channel, payload).await);
            }
            results
        })
    }

    /// Sends `payloads` on `channel`, in order, and returns the future of their results: a transport that
    /// learns later that the server took them (NATS receipts) returns once they are sent, so that the next
    /// batch can go out while this one is confirmed. The default awaits
    /// [`publish_batch`](Self::publish_batch) and returns its results.
    #[doc(hidden)]
    // The confirmation is returned to be awaited later, on purpose.
    #[allow(clippy::async_yields_async)]
    fn send_batch<'a>(
        &'a self,
        channel: &'a str,
        payloads: Vec<Bytes>,
    ) -> BoxFuture<'a, Confirmation> {
        Box::pin(async move { settled(self.publish_batch(channel, payloads).await) })
    }

    /// This transport as the crate's Redis backplane, when it is one (see `DistributedCache::as_redis`).
    #[cfg(feature = "redis")]
    #[doc(hidden)]
    fn as_redis(&self) -> Option<&redis::RedisBackplane> {
        None
    }

    /// Checks a channel name before use; the default accepts any.
    fn validate_channel(&self, channel: &str) -> Result<(), BackplaneError> {
        let _ = channel;
        Ok(())
    }

    /// A short name of the transport for logs and events (`memory`, `redis`, `nats`).
    fn transport_name(&self) -> &'static str;
}
