//! The Redis pub/sub backplane (feature `redis`).
//!
//! One [`RedisBackplane`] keeps one pub/sub connection for every channel subscribed through it (share it
//! between the caches of a process with
//! [`shared_backplane`](crate::FusionCacheBuilder::shared_backplane)) and publishes through the shared
//! multiplexed connection of its [`RedisConnection`]. The pub/sub connection is watched (the stream ending,
//! and a periodic PING) and re-established with capped exponential backoff; every subscription hears
//! `Disconnected` when it drops and `Connected` once its channel is subscribed again.
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

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::fanout::Fanout;
use super::{Backplane, BackplaneError, BackplaneEvent, Subscription};
use crate::redis::RedisConnection;

/// A backplane over Redis pub/sub.
pub struct RedisBackplane {
    connection: RedisConnection,
    subscriptions: Fanout,
    /// Tells the pub/sub task about new channels; dropping it stops the task.
    commands: Mutex<Option<mpsc::UnboundedSender<String>>>,
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
                .map(|_| ())
                .map_err(|e| BackplaneError::Transport(e.to_string()))
        })
    }

    fn transport_name(&self) -> &'static str {
        "redis"
    }
}

/// The pub/sub task: connect, subscribe every channel, forward messages; on loss, tell everyone and retry
/// with capped exponential backoff. Ends when the backplane is dropped.
async fn run_pubsub(
    connection: RedisConnection,
    subscriptions: Fanout,
    mut commands: mpsc::UnboundedReceiver<String>,
) {
    let options = connection.options().clone();
    let mut delay = Duration::from_millis(50);
    let mut was_connected = false;
    let mut failures = 0u32;
    loop {
        let attempt = tokio::time::timeout(
            options.connection_timeout,
            connection.client().get_async_pubsub(),
        )
        .await;
        let pubsub = match attempt {
            Ok(Ok(p)) => Some(p),
            Ok(Err(e)) => {
                log_failure(&connection, &mut failures, &e.to_string());
                None
            }
            Err(_) => {
                log_failure(&connection, &mut failures, "connection timed out");
                None
            }
        };
        let Some(pubsub) = pubsub else {
            // Drain channel registrations while waiting; they are subscribed on the next connection.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                cmd = commands.recv() => if cmd.is_none() { return },
            }
            delay = (delay * 2).min(options.max_reconnect_delay);
            continue;
        };
        let (mut sink, mut stream) = pubsub.split();
        let channels = subscriptions.channels();
        if !channels.is_empty() {
            if let Err(e) = sink.subscribe(&channels).await {
                log_failure(&connection, &mut failures, &e.to_string());
                continue;
            }
        }
        failures = 0;
        delay = Duration::from_millis(50);
        tracing::info!(
            endpoint = connection.endpoint(),
            channels = channels.len(),
            reconnected = was_connected,
            "redis pub/sub connected"
        );
        was_connected = true;
        for channel in &channels {
            subscriptions.send_to(channel, BackplaneEvent::Connected);
        }
        let mut subscribed = channels;

        let mut health = tokio::time::interval(options.health_check_interval);
        health.tick().await;
        let reason = loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => {
                        let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                        subscriptions.send_to(msg.get_channel_name(), BackplaneEvent::Message(payload));
                    }
                    None => break "connection closed".to_string(),
                },
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(channel) => {
                        if subscribed.contains(&channel) {
                            subscriptions.send_to(&channel, BackplaneEvent::Connected);
                            continue;
                        }
                        match sink.subscribe(&channel).await {
                            Ok(()) => {
                                subscriptions.send_to(&channel, BackplaneEvent::Connected);
                                subscribed.push(channel);
                            }
                            Err(e) => break e.to_string(),
                        }
                    }
                },
                _ = health.tick() => {
                    let ping = tokio::time::timeout(options.response_timeout, sink.ping::<redis::Value>()).await;
                    match ping {
                        Ok(Ok(reply)) => if let Err(e) = check_pong(&reply, !subscribed.is_empty()) {
                            break format!("health check failed: {e}");
                        },
                        Ok(Err(e)) => break format!("health check failed: {e}"),
                        Err(_) => break "health check timed out".to_string(),
                    }
                }
            }
        };
        tracing::warn!(endpoint = connection.endpoint(), %reason, "redis pub/sub disconnected; reconnecting");
        subscriptions.send_all(BackplaneEvent::Disconnected { reason });
    }
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
