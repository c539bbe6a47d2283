//! The connection to a cache's backplane: the library's transports, and what each can tell about its
//! channel.

use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::nats::{NatsBackplane, NatsOptions};
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::backplane::{Backplane, BackplaneEvent, Subscription};
use fusioncache::config::{BackplaneKind, FusionCacheConfig};
use fusioncache::redis::{RedisConnection, RedisOptions};

use crate::Failure;

/// A connected backplane transport.
pub enum Transport {
    /// Redis pub/sub, with the command connection for `PUBSUB NUMSUB`.
    Redis {
        /// The shared command connection.
        connection: RedisConnection,
        /// The backplane over it.
        backplane: Arc<RedisBackplane>,
    },
    /// NATS core subjects.
    Nats {
        /// The backplane.
        backplane: Arc<NatsBackplane>,
        /// The server URLs, credentials redacted.
        servers: String,
    },
}

impl Transport {
    /// Opens the transport `config` selects (a Redis or NATS backplane, see [`crate::settings::resolve`]).
    pub async fn connect(config: &FusionCacheConfig) -> Result<Self, Failure> {
        match config.backplane {
            Some(BackplaneKind::Redis) => {
                let r = config.redis.clone().unwrap_or_default();
                let url = r.url.as_deref().unwrap_or_default();
                let connection = RedisConnection::open_parts(
                    url,
                    r.database,
                    r.username.as_deref(),
                    r.password.as_deref(),
                    RedisOptions::default(),
                )
                .map_err(|e| Failure::Config(format!("invalid redis.url: {e}")))?;
                let backplane = Arc::new(RedisBackplane::new(connection.clone()));
                Ok(Transport::Redis {
                    connection,
                    backplane,
                })
            }
            Some(BackplaneKind::Nats) => {
                let n = config.nats.clone().unwrap_or_default();
                let url = n.url.unwrap_or_default();
                // Checked here so that no error can quote a URL with its credentials.
                for (i, server) in url.split(',').map(str::trim).enumerate() {
                    if let Err(e) = server.parse::<async_nats::ServerAddr>() {
                        return Err(Failure::Config(format!(
                            "invalid NATS URL (number {} in nats.url): {e}",
                            i + 1
                        )));
                    }
                }
                let mut options = NatsOptions::new(url).name("fusioncache-cli");
                if let Some(creds) = n.credentials {
                    options = options.credentials_file(creds);
                }
                let backplane = NatsBackplane::connect_with(options)
                    .await
                    .map_err(|e| Failure::Config(e.to_string()))?;
                let servers = config
                    .redacted()
                    .nats
                    .and_then(|n| n.url)
                    .unwrap_or_default();
                Ok(Transport::Nats {
                    backplane: Arc::new(backplane),
                    servers,
                })
            }
            other => Err(Failure::Config(format!(
                "backplane {other:?} cannot be reached from the command line"
            ))),
        }
    }

    /// The library backplane.
    pub fn backplane(&self) -> &dyn Backplane {
        match self {
            Transport::Redis { backplane, .. } => backplane.as_ref(),
            Transport::Nats { backplane, .. } => backplane.as_ref(),
        }
    }

    /// The library backplane, to share with a [`fusioncache::CacheNotifier`].
    pub fn shared(&self) -> Arc<dyn Backplane> {
        match self {
            Transport::Redis { backplane, .. } => backplane.clone(),
            Transport::Nats { backplane, .. } => backplane.clone(),
        }
    }

    /// Waits, up to `timeout`, until what is published on `channel` reaches the server: a `PING` on the
    /// command connection Redis publishes on; for NATS, a subscription confirmed by the server.
    pub async fn ready(&self, channel: &str, timeout: Duration) -> Result<(), Failure> {
        match self {
            Transport::Redis { connection, .. } => {
                let ping = async {
                    let mut conn = connection.manager().await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await
                };
                match tokio::time::timeout(timeout, ping).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(Failure::Transport(format!(
                        "could not reach the backplane ({}): {e}",
                        self.describe()
                    ))),
                    Err(_) => Err(Failure::Transport(format!(
                        "could not reach the backplane ({}) within {timeout:?}",
                        self.describe()
                    ))),
                }
            }
            Transport::Nats { .. } => self.subscribe(channel, timeout).await.map(drop),
        }
    }

    /// The transport and its endpoint, for people (never credentials).
    pub fn describe(&self) -> String {
        match self {
            Transport::Redis { connection, .. } => format!("redis {}", connection.endpoint()),
            Transport::Nats { servers, .. } => format!("nats {servers}"),
        }
    }

    /// Subscribes to `channel` and waits, up to `timeout`, until the subscription is live.
    pub async fn subscribe(
        &self,
        channel: &str,
        timeout: Duration,
    ) -> Result<Subscription, Failure> {
        let mut subscription = self
            .backplane()
            .subscribe(channel)
            .map_err(|e| Failure::Config(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_reason = None;
        loop {
            match tokio::time::timeout_at(deadline, subscription.next()).await {
                Ok(Some(BackplaneEvent::Connected)) => return Ok(subscription),
                Ok(Some(BackplaneEvent::Disconnected { reason })) => last_reason = Some(reason),
                Ok(Some(_)) => {} // messages before the subscription counts as live
                Ok(None) => {
                    return Err(Failure::Transport(format!(
                        "the {} transport stopped",
                        self.describe()
                    )))
                }
                Err(_) => {
                    return Err(Failure::Transport(format!(
                        "could not subscribe to {channel} on {} within {timeout:?}{}",
                        self.describe(),
                        last_reason.map(|r| format!(": {r}")).unwrap_or_default()
                    )))
                }
            }
        }
    }

    /// How many subscriptions the server has for `channel`, when the transport tells: `Ok(None)` for NATS
    /// (core NATS tells clients nothing of the others), `Err` with the reason when Redis refuses.
    pub async fn subscribers(&self, channel: &str) -> Result<Option<u64>, String> {
        match self {
            Transport::Redis { connection, .. } => {
                let mut conn = connection.manager().await.map_err(|e| e.to_string())?;
                let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(channel)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("PUBSUB NUMSUB failed: {e}"))?;
                Ok(counts
                    .into_iter()
                    .find(|(c, _)| c == channel)
                    .map(|(_, n)| n))
            }
            Transport::Nats { .. } => Ok(None),
        }
    }

    /// Waits until what was published has left for the server (NATS buffers; Redis answers each publish).
    pub async fn flush(&self) -> Result<(), Failure> {
        match self {
            Transport::Redis { .. } => Ok(()),
            Transport::Nats { backplane, .. } => backplane
                .client()
                .flush()
                .await
                .map_err(|e| Failure::Transport(format!("NATS flush failed: {e}"))),
        }
    }
}
