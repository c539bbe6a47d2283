//! A Redis endpoint shared by the Redis L2 and the Redis backplane of a process (feature `redis`).
//!
//! A [`RedisConnection`] holds one multiplexed, self-reconnecting connection (redis-rs `ConnectionManager`),
//! opened on first use. Clone it to share it: every [`RedisDistributedCache`](crate::l2::redis::RedisDistributedCache)
//! and [`RedisBackplane`](crate::backplane::redis::RedisBackplane) built from clones of one connection use
//! the same socket for commands.
//!
//! The URL carries everything: `redis://[user:password@]host:port[/db]`, `rediss://` for TLS (verified
//! against the system's and webpki's roots, or the CA of [`RedisOptions::tls_ca_certificate`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use tokio::sync::OnceCell;

/// Every Redis command this library sends, in the form of an ACL rule (`+{command}`): the connection
/// handshake (`AUTH`; connections skip `CLIENT SETINFO`, which Redis 7.0 does not know), the L2 (`GET`,
/// `MGET`, `SET`, `UNLINK`) and the backplane (`PUBLISH`, `SUBSCRIBE`, `UNSUBSCRIBE`, `PING`). An ACL user allowed exactly these (plus [`ACL_SELECT`]
/// when it uses a database other than 0), its key prefix and its channel can run every operation of the
/// library; the operator provisions such users, and the library's tests check that nothing else is sent.
pub const ACL_COMMANDS: &[&str] = &[
    "auth",
    "ping",
    "get",
    "mget",
    "set",
    "unlink",
    "publish",
    "subscribe",
    "unsubscribe",
];

/// The command a connection to a database other than 0 sends on connect, in ACL form.
pub const ACL_SELECT: &str = "select";

/// Timeouts and reconnection settings of a Redis endpoint.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The longest a connection attempt may take (default 1 s).
    pub connection_timeout: Duration,
    /// The longest a command may wait for its reply (default 2 s).
    pub response_timeout: Duration,
    /// Reconnection attempts per failed command before it fails (default 1: fail fast, the cache has
    /// fail-safe and auto-recovery).
    pub reconnect_retries: usize,
    /// The longest pause between reconnection attempts of the pub/sub connection (default 2 s).
    pub max_reconnect_delay: Duration,
    /// How often the pub/sub connection is pinged to detect a dead peer (default 5 s).
    pub health_check_interval: Duration,
    /// For `rediss://`: a PEM file of the CA certificates to trust instead of the system's and webpki's.
    pub tls_ca_certificate: Option<PathBuf>,
    /// For `rediss://` with mutual TLS: the client certificate and its key (PEM files).
    pub tls_client_certificate: Option<(PathBuf, PathBuf)>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            reconnect_retries: 1,
            max_reconnect_delay: Duration::from_secs(2),
            health_check_interval: Duration::from_secs(5),
            tls_ca_certificate: None,
            tls_client_certificate: None,
        }
    }
}

/// A Redis endpoint: a client and one lazily opened, shared, self-reconnecting connection.
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    options: RedisOptions,
    manager: OnceCell<ConnectionManager>,
    display: String,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("endpoint", &self.inner.display)
            .finish()
    }
}

impl RedisConnection {
    /// Parses `url` (`redis://`, `rediss://`, `unix://`); connects on first use.
    pub fn open(url: &str) -> Result<Self, redis::RedisError> {
        Self::open_with(url, RedisOptions::default())
    }

    /// [`open`](Self::open) with explicit options.
    pub fn open_with(url: &str, options: RedisOptions) -> Result<Self, redis::RedisError> {
        let info = url.into_connection_info()?;
        Self::from_info(info, options)
    }

    /// Builds the URL from parts: credentials and database override what the URL says.
    pub fn open_parts(
        url: &str,
        database: Option<u32>,
        username: Option<&str>,
        password: Option<&str>,
        options: RedisOptions,
    ) -> Result<Self, redis::RedisError> {
        let info = url.into_connection_info()?;
        let mut redis_info = info.redis_settings().clone();
        if let Some(db) = database {
            redis_info = redis_info.set_db(i64::from(db));
        }
        if let Some(user) = username {
            redis_info = redis_info.set_username(user);
        }
        if let Some(password) = password {
            redis_info = redis_info.set_password(password);
        }
        Self::from_info(info.set_redis_settings(redis_info), options)
    }

    fn from_info(
        info: redis::ConnectionInfo,
        options: RedisOptions,
    ) -> Result<Self, redis::RedisError> {
        // No `CLIENT SETINFO` on connect: one command fewer for ACL users to allow (see ACL_COMMANDS).
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        let info = info.set_redis_settings(settings);
        let display = format!("{} db {}", info.addr(), info.redis_settings().db());
        let client =
            if options.tls_ca_certificate.is_some() || options.tls_client_certificate.is_some() {
                let read = |path: &PathBuf| {
                    std::fs::read(path).map_err(|e| {
                        redis::RedisError::from(std::io::Error::new(
                            e.kind(),
                            format!("cannot read TLS file {}: {e}", path.display()),
                        ))
                    })
                };
                let client_tls = match &options.tls_client_certificate {
                    Some((cert, key)) => Some(redis::ClientTlsConfig {
                        client_cert: read(cert)?,
                        client_key: read(key)?,
                    }),
                    None => None,
                };
                let root_cert = options.tls_ca_certificate.as_ref().map(read).transpose()?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls,
                        root_cert,
                    },
                )?
            } else {
                redis::Client::open(info)?
            };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                options,
                manager: OnceCell::new(),
                display,
            }),
        })
    }

    /// The endpoint, for logs (`host:port db N`, never credentials).
    pub fn endpoint(&self) -> &str {
        &self.inner.display
    }

    /// The options.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// The redis-rs client (for a dedicated connection, e.g. pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// The shared multiplexed connection (cheap to clone).
    pub async fn manager(&self) -> Result<ConnectionManager, redis::RedisError> {
        let o = &self.inner.options;
        self.inner
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(o.connection_timeout))
                    .set_response_timeout(Some(o.response_timeout))
                    .set_number_of_retries(o.reconnect_retries)
                    .set_max_delay(o.max_reconnect_delay);
                ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)
            })
            .await
            .cloned()
    }
}
