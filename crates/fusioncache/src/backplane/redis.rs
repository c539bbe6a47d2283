//! The Redis pub/sub backplane (feature `redis`).
//!
//! One [`RedisBackplane`] keeps one pub/sub connection for every channel subscribed through it (share it
//! between the caches of a process with
//! [`shared_backplane`](crate::FusionCacheBuilder::shared_backplane)) and publishes through the shared
//! multiplexed connection of its [`RedisConnection`]. The pub/sub connection is watched (the stream ending;
//! a PING when it has been quiet; a probe message on each quiet channel, see
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

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::fanout::Fanout;
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
        let session = match connect(&connection, &subscriptions).await {
            Ok(session) => session,
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
        tracing::info!(
            endpoint = connection.endpoint(),
            channels = session.channels.len(),
            reconnected = was_connected,
            "redis pub/sub connected"
        );
        was_connected = true;
        for channel in session.channels.keys() {
            subscriptions.send_to(channel, BackplaneEvent::Connected);
        }
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

/// Opens the pub/sub connection and subscribes every channel, within the connection and response timeouts.
async fn connect(connection: &RedisConnection, subscriptions: &Fanout) -> Result<Session, String> {
    let options = connection.options();
    let pubsub = tokio::time::timeout(options.connection_timeout, connection.pubsub())
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut sink, stream) = pubsub.split();
    let channels = subscriptions.channels();
    if !channels.is_empty() {
        tokio::time::timeout(options.response_timeout, sink.subscribe(&channels))
            .await
            .map_err(|_| "SUBSCRIBE timed out".to_string())?
            .map_err(|e| e.to_string())?;
    }
    let liveness = options.liveness();
    Ok(Session {
        sink,
        stream,
        liveness,
        channels: channels
            .into_iter()
            .map(|c| (c, QuietChannel::new(liveness)))
            .collect(),
    })
}

type PingReply = Result<redis::Value, redis::RedisError>;

/// One pub/sub connection, its subscribed channels and their watches.
struct Session {
    sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
    liveness: Liveness,
    channels: HashMap<String, QuietChannel>,
}

impl Session {
    /// Forwards messages and subscribes new channels until the link is lost (the reason) or the backplane
    /// is dropped (`None`).
    ///
    /// The connection is alive while frames come: after `interval` of quiet it gets a PING, and without any
    /// frame for `timeout` it is lost. Each channel is watched end to end: after `interval` (jittered) of
    /// quiet a probe is published on it through the command connection, and a channel that heard nothing
    /// for `timeout` is lost.
    async fn run(
        mut self,
        connection: &RedisConnection,
        subscriptions: &Fanout,
        commands: &mut mpsc::UnboundedReceiver<String>,
        probe: &Bytes,
    ) -> Option<String> {
        let liveness = self.liveness;
        let expects_pong_array = !connection.is_resp3();
        let mut alive_at = Instant::now();
        let mut ping: Option<BoxFuture<'static, PingReply>> = None;
        let mut probes = tokio::task::JoinSet::new();
        loop {
            let mut wake = alive_at + liveness.timeout;
            if ping.is_none() {
                wake = wake.min(alive_at + liveness.interval);
            }
            if let Some(channel) = self.channels.values().map(QuietChannel::deadline).min() {
                wake = wake.min(channel);
            }
            let pinging = async {
                match ping.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Messages first: a timer that fires while messages wait (the cache was slow to take them)
                // must not call a busy connection dead.
                biased;
                msg = self.stream.next() => {
                    let Some(msg) = msg else { return Some("connection closed".into()) };
                    alive_at = Instant::now();
                    let channel = msg.get_channel_name();
                    if let Some(watch) = self.channels.get_mut(channel) {
                        watch.heard();
                    }
                    // Probes too: subscribers (the cache, the CLI's probe) tell them apart by key.
                    let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                    subscriptions.send_to(channel, BackplaneEvent::Message(payload));
                }
                cmd = commands.recv() => {
                    let channel = cmd?;
                    if self.channels.contains_key(&channel) {
                        subscriptions.send_to(&channel, BackplaneEvent::Connected);
                        continue;
                    }
                    let subscribed = tokio::time::timeout(
                        connection.options().response_timeout,
                        self.sink.subscribe(&channel),
                    )
                    .await;
                    match subscribed {
                        Ok(Ok(())) => {
                            alive_at = Instant::now();
                            subscriptions.send_to(&channel, BackplaneEvent::Connected);
                            self.channels.insert(channel, QuietChannel::new(liveness));
                        }
                        Ok(Err(e)) => return Some(format!("SUBSCRIBE {channel} failed: {e}")),
                        Err(_) => return Some(format!("SUBSCRIBE {channel} timed out")),
                    }
                }
                reply = pinging => {
                    ping = None;
                    match reply {
                        Ok(reply) => {
                            let subscribed = expects_pong_array && !self.channels.is_empty();
                            if let Err(e) = check_pong(&reply, subscribed) {
                                return Some(format!("health check failed: {e}"));
                            }
                            alive_at = Instant::now();
                        }
                        Err(e) => return Some(format!("health check failed: {e}")),
                    }
                }
                sent = probes.join_next(), if !probes.is_empty() => {
                    if let Some(Ok((channel, false))) = sent {
                        // The probe could not be published: the channel cannot be judged now (the
                        // connection's own check still runs).
                        if let Some(watch) = self.channels.get_mut(&channel) {
                            watch.heard();
                        }
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= alive_at + liveness.timeout {
                        return Some(format!(
                            "no reply from the server for {} ms",
                            liveness.timeout.as_millis()
                        ));
                    }
                    if ping.is_none() && now >= alive_at + liveness.interval {
                        let mut sink = self.sink.clone();
                        ping = Some(Box::pin(async move { sink.ping::<redis::Value>().await }));
                    }
                    for (channel, watch) in &mut self.channels {
                        match watch.poll() {
                            Verdict::Wait => {}
                            Verdict::Probe => {
                                probes.spawn(publish_probe(connection.clone(), channel.clone(), probe.clone()));
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

/// Checks the reply to a PING sent on the pub/sub connection. A connection in subscribed mode answers
/// `["pong", ""]` (RESP2: a PING there is itself a pub/sub reply); a plain `PONG` means the server no longer
/// counts the connection as subscribed, so its subscriptions are gone even though it is alive.
fn check_pong(reply: &redis::Value, subscribed: bool) -> Result<(), String> {
    use redis::Value;
    let is = |v: &Value, text: &str| match v {
        Value::BulkString(b) => b.eq_ignore_ascii_case(text.as_bytes()),
        Value::SimpleString(s) => s.eq_ignore_ascii_case(text),
        _ => false,
    };
    match reply {
        Value::Array(items) | Value::Push { data: items, .. }
            if items.first().is_some_and(|v| is(v, "pong")) =>
        {
            Ok(())
        }
        v if !subscribed && is(v, "pong") => Ok(()),
        v if is(v, "pong") => {
            Err("the server no longer counts the connection as subscribed".into())
        }
        other => Err(format!("unexpected reply {other:?}")),
    }
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

#[cfg(test)]
mod tests {
    use super::check_pong;
    use redis::Value;

    #[test]
    fn a_subscribed_connection_answers_ping_with_a_pong_array() {
        let subscribed = Value::Array(vec![
            Value::BulkString(b"pong".to_vec()),
            Value::BulkString(Vec::new()),
        ]);
        assert_eq!(check_pong(&subscribed, true), Ok(()));
        assert_eq!(check_pong(&subscribed, false), Ok(()));
    }

    #[test]
    fn a_plain_pong_means_the_subscriptions_are_gone() {
        let plain = Value::SimpleString("PONG".into());
        assert_eq!(check_pong(&plain, false), Ok(()));
        assert!(check_pong(&plain, true).unwrap_err().contains("no longer"));
        assert!(check_pong(&Value::Int(1), true).is_err());
        assert!(check_pong(&Value::Array(vec![]), true).is_err());
    }
}
