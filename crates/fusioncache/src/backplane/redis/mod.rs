//! The Redis pub/sub backplane (feature `redis`).
//!
//! One [`RedisBackplane`] keeps one pub/sub connection for every channel subscribed through it (share it
//! between the caches of a process with
//! [`shared_backplane`](crate::FusionCacheBuilder::shared_backplane)) and publishes through the shared
//! multiplexed connection of its [`RedisConnection`]. The pub/sub connection is the library's own (RESP2,
//! the same addresses, TLS settings and credentials as the command connection): it reads each message in
//! place, its payload a slice of the socket's buffer, and hands it to the caches. It is watched (the
//! stream ending; a PING when it has been quiet; a probe message on each quiet channel, see
//! [`PROBE_KEY`](super::PROBE_KEY)) so that a lost link is reported within
//! [`RedisOptions::liveness_timeout`](crate::redis::RedisOptions::liveness_timeout), half-open connections
//! and stalled servers included, and re-established with jittered exponential backoff; every subscription
//! hears `Disconnected` when it drops and `Connected` once its channel is subscribed again.
//!
//! ```no_run
//! use std::sync::Arc;
//! use fusioncache::{FusionCache, backplane::redis::RedisBackplane, l2::redis::RedisDistributedCache, redis::RedisConnection};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisConnection::open("redis://127.0.0.1:6379/0")?;
//! let backplane = Arc::new(RedisBackplane::new(redis.clone()));
//! let products: FusionCache<String> = FusionCache::builder()
//!     .name("products")
//!     .distributed_cache(RedisDistributedCache::new(redis.clone()))
//!     .shared_backplane(backplane.clone())
//!     .build()?;
//! let prices: FusionCache<f64> = FusionCache::builder()
//!     .name("prices")
//!     .distributed_cache(RedisDistributedCache::new(redis.clone()))
//!     .shared_backplane(backplane) // the same pub/sub connection
//!     .build()?;
//! # let _ = (products, prices); Ok(()) }
//! ```

mod connection;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub(crate) use self::connection::{Addr, Target};
use self::connection::{Frame, PubSubConnection};

use super::fanout::{ChannelSender, Fanout};
use super::liveness::{probe_message, reconnect_backoff, Liveness, QuietChannel, Verdict};
use super::{Backplane, BackplaneError, BackplaneEvent, Subscription};
use crate::redis::RedisConnection;

/// A backplane over Redis pub/sub.
pub struct RedisBackplane {
    connection: RedisConnection,
    subscriptions: Fanout,
    /// Tells the pub/sub task about new channels; dropping it stops the task.
    commands: Mutex<Option<mpsc::UnboundedSender<String>>>,
    /// How many subscribers the last PUBLISH on each channel reached (Redis says so in its reply).
    receivers: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("endpoint", &self.connection.endpoint())
            .finish()
    }
}

impl RedisBackplane {
    /// A backplane on `connection`'s endpoint. The pub/sub connection opens on the first subscription.
    pub fn new(connection: RedisConnection) -> Self {
        Self {
            connection,
            subscriptions: Fanout::default(),
            commands: Mutex::new(None),
            receivers: Mutex::default(),
        }
    }

    /// How many subscribers the last PUBLISH on `channel` reached (0 before the first).
    pub(crate) fn receivers(&self, channel: &str) -> i64 {
        let receivers = self.receivers.lock().unwrap_or_else(|e| e.into_inner());
        receivers.get(channel).copied().unwrap_or(0)
    }

    /// Records what a PUBLISH on `channel` answered.
    pub(crate) fn record_receivers(&self, channel: &str, count: i64) {
        let mut receivers = self.receivers.lock().unwrap_or_else(|e| e.into_inner());
        match receivers.get_mut(channel) {
            Some(known) => *known = count,
            None => {
                receivers.insert(channel.to_string(), count);
            }
        }
    }

    /// Opens the endpoint at `url` (see [`RedisConnection::open`]).
    pub fn open(url: &str) -> Result<Self, BackplaneError> {
        RedisConnection::open(url)
            .map(Self::new)
            .map_err(|e| BackplaneError::Config(e.to_string()))
    }

    /// The shared connection.
    pub fn connection(&self) -> &RedisConnection {
        &self.connection
    }

    fn commands(&self) -> mpsc::UnboundedSender<String> {
        let mut commands = self.commands.lock().expect("redis backplane lock");
        commands
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run_pubsub(
                    self.connection.clone(),
                    self.subscriptions.clone(),
                    rx,
                ));
                tx
            })
            .clone()
    }
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        // Closing the command channel ends the pub/sub task.
        self.commands.get_mut().ok().and_then(|c| c.take());
    }
}

impl Backplane for RedisBackplane {
    fn subscribe(&self, channel: &str) -> Result<Subscription, BackplaneError> {
        let (subscription, _) = self.subscriptions.add(channel);
        self.commands()
            .send(channel.to_string())
            .map_err(|_| BackplaneError::Transport("redis pub/sub task has stopped".into()))?;
        Ok(subscription)
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            let mut conn = self
                .connection
                .manager()
                .await
                .map_err(|e| BackplaneError::Transport(e.to_string()))?;
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload.as_ref())
                .query_async::<i64>(&mut conn)
                .await
                .map(|count| self.record_receivers(channel, count))
                .map_err(|e| BackplaneError::Transport(e.to_string()))
        })
    }

    /// One pipeline of `PUBLISH`es on the shared connection: one write, one round trip for the batch.
    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        payloads: Vec<Bytes>,
    ) -> BoxFuture<'a, Vec<Result<(), BackplaneError>>> {
        Box::pin(async move {
            let failed = |e: &redis::RedisError, n: usize| -> Vec<Result<(), BackplaneError>> {
                (0..n)
                    .map(|_| Err(BackplaneError::Transport(e.to_string())))
                    .collect()
            };
            let mut conn = match self.connection.manager().await {
                Ok(conn) => conn,
                Err(e) => return failed(&e, payloads.len()),
            };
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for payload in &payloads {
                pipe.cmd("PUBLISH").arg(channel).arg(payload.as_ref());
            }
            match pipe
                .query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn)
                .await
            {
                Ok(replies) if replies.len() == payloads.len() => {
                    if let Some(Ok(redis::Value::Int(count))) = replies.last() {
                        self.record_receivers(channel, *count);
                    }
                    replies
                        .into_iter()
                        .map(|r| {
                            r.map(|_| ())
                                .map_err(|e| BackplaneError::Transport(e.to_string()))
                        })
                        .collect()
                }
                Ok(_) => (0..payloads.len())
                    .map(|_| Err(BackplaneError::Transport("short pipeline reply".into())))
                    .collect(),
                Err(e) => failed(&e, payloads.len()),
            }
        })
    }

    fn as_redis(&self) -> Option<&RedisBackplane> {
        Some(self)
    }

    fn transport_name(&self) -> &'static str {
        "redis"
    }
}

/// The pub/sub task: connect, subscribe every channel, forward messages, watch the link; on loss, tell
/// everyone and reconnect after a jittered, growing pause. Ends when the backplane is dropped.
async fn run_pubsub(
    connection: RedisConnection,
    subscriptions: Fanout,
    mut commands: mpsc::UnboundedReceiver<String>,
) {
    let options = connection.options().clone();
    let probe = probe_message(&uuid::Uuid::new_v4().to_string());
    let mut backoff = reconnect_backoff(options.max_reconnect_delay);
    let mut was_connected = false;
    let mut failures = 0u32;
    loop {
        let conn = match connect(&connection).await {
            Ok(conn) => conn,
            Err(error) => {
                log_failure(&connection, &mut failures, &error);
                // Drain channel registrations while waiting; they are subscribed on the next connection.
                let pause =
                    tokio::time::sleep(backoff.next().unwrap_or(options.max_reconnect_delay));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        cmd = commands.recv() => if cmd.is_none() { return },
                    }
                }
                continue;
            }
        };
        failures = 0;
        backoff = reconnect_backoff(options.max_reconnect_delay);
        let session = Session::new(conn, options.liveness());
        tracing::info!(
            endpoint = connection.endpoint(),
            reconnected = was_connected,
            "redis pub/sub connected"
        );
        was_connected = true;
        let Some(reason) = session
            .run(&connection, &subscriptions, &mut commands, &probe)
            .await
        else {
            return;
        };
        tracing::warn!(endpoint = connection.endpoint(), %reason, "redis pub/sub disconnected; reconnecting");
        subscriptions.send_all(BackplaneEvent::Disconnected { reason });
        // Even the first attempt waits a little, at random: a fleet that lost its server together does not
        // come back in lockstep.
        tokio::time::sleep(backoff.next().unwrap_or(options.max_reconnect_delay)).await;
    }
}

/// Opens the pub/sub connection (socket, TLS, `AUTH`) within the connection timeout.
async fn connect(connection: &RedisConnection) -> Result<PubSubConnection, String> {
    let timeout = connection.options().connection_timeout;
    let target = connection.pubsub_target()?;
    tokio::time::timeout(timeout, PubSubConnection::open(&target))
        .await
        .map_err(|_| "connection timed out".to_string())?
}

/// What woke the session.
enum Event {
    Frame(Result<Frame, String>),
    Subscribe(Option<String>),
    Probe(Option<Result<(String, bool), tokio::task::JoinError>>),
    Timer,
}

/// A subscribed channel: its end-to-end watch, and where its messages go.
struct Channel {
    watch: QuietChannel,
    sender: ChannelSender,
}

/// One pub/sub connection, its channels (subscribed, and asked for but not confirmed yet) and their
/// watches.
struct Session {
    conn: PubSubConnection,
    liveness: Liveness,
    channels: HashMap<String, Channel>,
    /// Channels whose `SUBSCRIBE` was sent, with the time by which the server must confirm it.
    pending: HashMap<String, Instant>,
}

impl Session {
    fn new(conn: PubSubConnection, liveness: Liveness) -> Self {
        Self {
            conn,
            liveness,
            channels: HashMap::new(),
            pending: HashMap::new(),
        }
    }

    /// Sends `SUBSCRIBE` for `channels`; each is connected once the server confirms it.
    async fn subscribe(
        &mut self,
        connection: &RedisConnection,
        channels: Vec<String>,
    ) -> Result<(), String> {
        if channels.is_empty() {
            return Ok(());
        }
        let mut command: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        command.extend(channels.iter().map(|c| c.as_bytes()));
        let timeout = connection.options().response_timeout;
        self.send(&command, timeout)
            .await
            .map_err(|e| format!("SUBSCRIBE {} failed: {e}", channels.join(" ")))?;
        let deadline = Instant::now() + timeout;
        self.pending
            .extend(channels.into_iter().map(|c| (c, deadline)));
        Ok(())
    }

    /// Sends a command within `timeout` (a server that stopped reading fills the socket's buffer).
    async fn send(&mut self, command: &[&[u8]], timeout: Duration) -> Result<(), String> {
        tokio::time::timeout(timeout, self.conn.send(command))
            .await
            .map_err(|_| "write timed out".to_string())?
    }

    /// Forwards messages and subscribes new channels until the link is lost (the reason) or the backplane
    /// is dropped (`None`).
    ///
    /// The connection is alive while frames come: after `interval` of quiet it gets a PING, and without any
    /// frame for `timeout` it is lost. Each channel is watched end to end: after `interval` (jittered) of
    /// quiet a probe is published on it through the command connection, and a channel that heard nothing
    /// for `timeout` is lost. A `SUBSCRIBE` not confirmed within the response timeout loses the connection.
    async fn run(
        mut self,
        connection: &RedisConnection,
        subscriptions: &Fanout,
        commands: &mut mpsc::UnboundedReceiver<String>,
        probe: &Bytes,
    ) -> Option<String> {
        let liveness = self.liveness;
        let response_timeout = connection.options().response_timeout;
        if let Err(e) = self.subscribe(connection, subscriptions.channels()).await {
            return Some(e);
        }
        let mut alive_at = Instant::now();
        let mut pinged = false;
        let mut probes = tokio::task::JoinSet::new();
        // One timer, set again after anything that may bring a deadline closer: not after a message, which
        // pushes them later (a timer that fires early finds nothing to do), unless it is the first on its
        // channel since a probe went out.
        let timer = tokio::time::sleep_until(alive_at);
        tokio::pin!(timer);
        let mut rearm = true;
        loop {
            if rearm {
                let mut wake = alive_at + liveness.timeout;
                if !pinged {
                    wake = wake.min(alive_at + liveness.interval);
                }
                if let Some(channel) = self.channels.values().map(|c| c.watch.deadline()).min() {
                    wake = wake.min(channel);
                }
                if let Some(pending) = self.pending.values().min() {
                    wake = wake.min(*pending);
                }
                timer.as_mut().reset(wake);
            }
            let event = tokio::select! {
                // Frames first: a timer that fires while frames wait (the cache was slow to take them) must
                // not call a busy connection dead.
                biased;
                frame = self.conn.next() => Event::Frame(frame),
                cmd = commands.recv() => Event::Subscribe(cmd),
                sent = probes.join_next(), if !probes.is_empty() => Event::Probe(sent),
                () = &mut timer => Event::Timer,
            };
            // A message moves deadlines later, but for the first one after a probe on its channel (below).
            rearm = !matches!(event, Event::Frame(Ok(Frame::Message { .. })));
            match event {
                Event::Frame(Err(e)) => return Some(e),
                Event::Frame(Ok(frame)) => {
                    let now = Instant::now();
                    alive_at = now;
                    match frame {
                        Frame::Message { channel, payload } => {
                            let Ok(channel) = std::str::from_utf8(&channel) else {
                                continue;
                            };
                            // Probes too: subscribers (the cache, the CLI's probe) tell them apart by key.
                            if let Some(subscribed) = self.channels.get_mut(channel) {
                                rearm |= subscribed.watch.heard_at(now);
                                subscribed.sender.send(BackplaneEvent::Message(payload));
                            }
                        }
                        Frame::Subscribed(channel) => {
                            let channel = String::from_utf8_lossy(&channel).into_owned();
                            if self.pending.remove(&channel).is_some() {
                                subscriptions.send_to(&channel, BackplaneEvent::Connected);
                                let subscribed = Channel {
                                    watch: QuietChannel::new(liveness),
                                    sender: subscriptions.sender(&channel),
                                };
                                self.channels.insert(channel, subscribed);
                            }
                        }
                        Frame::Pong { subscribed } => {
                            pinged = false;
                            if !subscribed && !self.channels.is_empty() {
                                return Some(
                                    "health check failed: the server no longer counts the \
                                     connection as subscribed"
                                        .into(),
                                );
                            }
                        }
                        Frame::Error(e) if !self.pending.is_empty() => {
                            let pending: Vec<&str> =
                                self.pending.keys().map(String::as_str).collect();
                            return Some(format!("SUBSCRIBE {} failed: {e}", pending.join(" ")));
                        }
                        Frame::Error(e) => return Some(format!("server error: {e}")),
                        Frame::Status(_) | Frame::Other => {}
                    }
                }
                Event::Subscribe(None) => return None,
                Event::Subscribe(Some(channel)) => {
                    if self.channels.contains_key(&channel) {
                        subscriptions.send_to(&channel, BackplaneEvent::Connected);
                    } else if !self.pending.contains_key(&channel) {
                        if let Err(e) = self.subscribe(connection, vec![channel]).await {
                            return Some(e);
                        }
                    }
                }
                Event::Probe(sent) => {
                    if let Some(Ok((channel, false))) = sent {
                        // The probe could not be published: the channel cannot be judged now (the
                        // connection's own check still runs).
                        if let Some(subscribed) = self.channels.get_mut(&channel) {
                            subscribed.watch.heard();
                        }
                    }
                }
                Event::Timer => {
                    let now = Instant::now();
                    if now >= alive_at + liveness.timeout {
                        return Some(format!(
                            "no reply from the server for {} ms",
                            liveness.timeout.as_millis()
                        ));
                    }
                    if let Some((channel, _)) = self.pending.iter().find(|(_, at)| now >= **at) {
                        return Some(format!("SUBSCRIBE {channel} timed out"));
                    }
                    if !pinged && now >= alive_at + liveness.interval {
                        if let Err(e) = self.send(&[b"PING"], response_timeout).await {
                            return Some(format!("health check failed: {e}"));
                        }
                        pinged = true;
                    }
                    for (channel, Channel { watch, .. }) in &mut self.channels {
                        match watch.poll() {
                            Verdict::Wait => {}
                            Verdict::Probe => {
                                probes.spawn(publish_probe(
                                    connection.clone(),
                                    channel.clone(),
                                    probe.clone(),
                                ));
                            }
                            Verdict::Lost => {
                                return Some(format!(
                                    "channel {channel} delivered nothing for {} ms, probe included",
                                    watch.quiet_for().as_millis()
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Publishes a probe on `channel` through the command connection; `(channel, sent)`.
async fn publish_probe(
    connection: RedisConnection,
    channel: String,
    probe: Bytes,
) -> (String, bool) {
    let sent = match connection.manager().await {
        Ok(mut conn) => redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(probe.as_ref())
            .query_async::<i64>(&mut conn)
            .await
            .is_ok(),
        Err(_) => false,
    };
    (channel, sent)
}

fn log_failure(connection: &RedisConnection, failures: &mut u32, error: &str) {
    *failures += 1;
    // Log the first failure and then every 20th, so an outage does not flood the logs.
    if *failures == 1 || *failures % 20 == 0 {
        tracing::warn!(
            endpoint = connection.endpoint(),
            attempts = *failures,
            error,
            "redis pub/sub connection failed"
        );
    }
}
