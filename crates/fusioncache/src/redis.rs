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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;

use crate::backplane::redis::{Addr, Target};

/// Every Redis command this library sends, in the form of an ACL rule (`+{command}`): the connection
/// handshake (`AUTH`; connections skip `CLIENT SETINFO`, which Redis 7.0 does not know), the L2 (`GET`,
/// `MGET`, `SET`, `UNLINK`, and `EVALSHA` / `SCRIPT LOAD` of the one script that writes an entry only if
/// no newer one is stored — a script runs with the caller's ACL rules, so it reaches only the caller's keys)
/// and the backplane (`PUBLISH`, `SUBSCRIBE`, `UNSUBSCRIBE`, `PING`). An ACL user allowed exactly these (plus [`ACL_SELECT`]
/// when it uses a database other than 0), its key prefix and its channel can run every operation of the
/// library; the operator provisions such users, and the library's tests check that nothing else is sent.
pub const ACL_COMMANDS: &[&str] = &[
    "auth",
    "ping",
    "get",
    "mget",
    "set",
    "unlink",
    "evalsha",
    "script|load",
    "publish",
    "subscribe",
    "unsubscribe",
];

/// The command a connection to a database other than 0 sends on connect, in ACL form.
pub const ACL_SELECT: &str = "select";

/// Timeouts, liveness and reconnection settings of a Redis endpoint.
///
/// Every lost link is reported within [`liveness_timeout`](Self::liveness_timeout): a pub/sub connection
/// that answers nothing (a half-open TCP connection, a stalled server), a subscription that no longer
/// delivers, and a command connection that stops answering (it is replaced).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The longest a connection attempt may take (default 1 s).
    pub connection_timeout: Duration,
    /// The longest a command may wait for its reply (default 2 s).
    pub response_timeout: Duration,
    /// Reconnection attempts per failed command before it fails (default 1: fail fast, the cache has
    /// fail-safe and auto-recovery).
    pub reconnect_retries: usize,
    /// The longest pause between reconnection attempts of the pub/sub connection, jitter included
    /// (default 1 s). Pauses grow exponentially from 50 ms, with random jitter so that a fleet does not
    /// reconnect in lockstep.
    pub max_reconnect_delay: Duration,
    /// How long a link may stay quiet before it is checked (default 1 s): the pub/sub connection gets a
    /// PING, each subscribed channel a probe message (after up to 1.5× this, at random, so that one node of
    /// an idle fleet probes and the others hear it), and a busy command connection a PING. Brought under a
    /// third of `liveness_timeout` when larger.
    pub health_check_interval: Duration,
    /// The liveness bound (default 3 s): a pub/sub connection with no sign of life (a message or a PONG),
    /// or a channel that heard nothing despite its probe, for this long is reported `Disconnected` and
    /// reconnected; a command connection whose PING is not answered within this is replaced.
    pub liveness_timeout: Duration,
    /// For `rediss://`: a PEM file of the CA certificates to trust instead of the system's and webpki's.
    pub tls_ca_certificate: Option<PathBuf>,
    /// For `rediss://` with mutual TLS: the client certificate and its key (PEM files).
    pub tls_client_certificate: Option<(PathBuf, PathBuf)>,
    /// A file that holds the password (a mounted Secret, such as the operator's binding), in place of the
    /// URL's: read again at every connection and reconnection, so that after a rotation the live
    /// connections authenticate with the new password the next time they connect. A trailing newline is
    /// not part of the password. Without a user in the URL it authenticates as `default` (Redis 6 or later).
    pub password_file: Option<PathBuf>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            reconnect_retries: 1,
            max_reconnect_delay: Duration::from_secs(1),
            health_check_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(3),
            tls_ca_certificate: None,
            tls_client_certificate: None,
            password_file: None,
        }
    }
}

impl RedisOptions {
    /// Sets the liveness bound (see [`liveness_timeout`](Self::liveness_timeout)).
    #[must_use]
    pub fn liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// Sets the health-check interval (see [`health_check_interval`](Self::health_check_interval)).
    #[must_use]
    pub fn health_check_interval(mut self, interval: Duration) -> Self {
        self.health_check_interval = interval;
        self
    }

    /// The bound and interval the transport runs with.
    pub(crate) fn liveness(&self) -> crate::backplane::liveness::Liveness {
        crate::backplane::liveness::Liveness::new(self.liveness_timeout, self.health_check_interval)
    }
}

/// A Redis endpoint: a client and one lazily opened, shared, self-reconnecting connection.
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// What the client was built from (the password file's password replaces its password).
    info: redis::ConnectionInfo,
    options: RedisOptions,
    /// The command connection and its generation (bumped when the watchdog replaces it).
    manager: Mutex<Option<(u64, ConnectionManager)>>,
    /// Whether the command connection was handed out since the watchdog last looked.
    used: AtomicBool,
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
        let client = match &options.password_file {
            // Fails now, not at the first command, when the file cannot be read.
            Some(file) => build_client(with_password(&info, &read_password(file)?), &options)?,
            None => build_client(info.clone(), &options)?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                info,
                options,
                manager: Mutex::new(None),
                used: AtomicBool::new(false),
                display,
            }),
        })
    }

    /// Whether `other` is this connection (a clone of it): commands sent on both arrive in order.
    pub(crate) fn is_same(&self, other: &RedisConnection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The endpoint, for logs (`host:port db N`, never credentials).
    pub fn endpoint(&self) -> &str {
        &self.inner.display
    }

    /// The options.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// The redis-rs client (for a dedicated connection). Built with the password of the moment it was
    /// opened; the backplane's pub/sub connection follows a [password file](RedisOptions::password_file).
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// Where a new pub/sub connection goes and how it authenticates: the password file's current contents
    /// if there is one, the TLS settings of the options. Errors name files, never secrets.
    pub(crate) fn pubsub_target(&self) -> Result<Target, String> {
        let settings = self.inner.info.redis_settings();
        let password = match &self.inner.options.password_file {
            Some(file) => Some(read_password(file).map_err(|e| e.to_string())?),
            None => settings.password().map(str::to_string),
        };
        let addr = match self.inner.info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Addr::Tcp {
                host: host.clone(),
                port: *port,
            },
            redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    return Err("insecure TLS (`#insecure`) is not supported".into());
                }
                Addr::Tls {
                    host: host.clone(),
                    port: *port,
                    config: tls_config(&self.inner.options)?,
                }
            }
            redis::ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            other => return Err(format!("unsupported Redis address {other}")),
        };
        Ok(Target {
            addr,
            username: settings.username().map(str::to_string),
            password,
        })
    }

    /// The shared multiplexed connection (cheap to clone).
    ///
    /// redis-rs reconnects it when the socket fails, but not when the server merely stops answering (a
    /// half-open connection): a watchdog then PINGs it every health-check interval while it is in use, and
    /// replaces it when a PING is not answered within the liveness bound.
    pub async fn manager(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.inner.used.store(true, Ordering::Relaxed);
        let mut slot = self.inner.lock_manager();
        if let Some((_, manager)) = slot.as_ref() {
            return Ok(manager.clone());
        }
        let manager = self.inner.new_manager()?;
        *slot = Some((0, manager.clone()));
        drop(slot);
        tokio::spawn(watch_commands(Arc::downgrade(&self.inner)));
        Ok(manager)
    }
}

impl Inner {
    fn lock_manager(&self) -> std::sync::MutexGuard<'_, Option<(u64, ConnectionManager)>> {
        self.manager.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_manager(&self) -> Result<ConnectionManager, redis::RedisError> {
        let o = &self.options;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(o.connection_timeout))
            .set_response_timeout(Some(o.response_timeout))
            .set_number_of_retries(o.reconnect_retries)
            .set_max_delay(o.max_reconnect_delay);
        let config = match &o.password_file {
            Some(file) => config.set_credentials_provider(PasswordFile {
                path: file.clone(),
                username: self.info.redis_settings().username().map(str::to_string),
            }),
            None => config,
        };
        ConnectionManager::new_lazy_with_config(self.client.clone(), config)
    }
}

/// A redis-rs client for `info`, with the TLS files of `options`.
fn build_client(
    info: redis::ConnectionInfo,
    options: &RedisOptions,
) -> Result<redis::Client, redis::RedisError> {
    if options.tls_ca_certificate.is_none() && options.tls_client_certificate.is_none() {
        return redis::Client::open(info);
    }
    let read = |path: &PathBuf| read_tls_file(path).map_err(redis::RedisError::from);
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
    )
}

/// The TLS settings of the pub/sub connection, as redis-rs makes them for the command connection: the
/// options' CA certificates if given, else webpki's roots; the options' client certificate and key if given.
fn tls_config(options: &RedisOptions) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &PathBuf| read_tls_file(path).map_err(|e| e.to_string());
    let certificates = |path: &PathBuf| -> Result<Vec<CertificateDer<'static>>, String> {
        CertificateDer::pem_slice_iter(&read(path)?)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("invalid certificate in {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    match &options.tls_ca_certificate {
        Some(ca) => {
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("invalid CA certificate in {}: {e}", ca.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots);
    let config = match &options.tls_client_certificate {
        Some((cert, key)) => {
            let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| format!("invalid private key in {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certificates(cert)?, key)
                .map_err(|e| format!("TLS client certificate {}: {e}", cert.display()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The contents of a TLS file of the options (the error names the file).
fn read_tls_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot read TLS file {}: {e}", path.display()),
        )
    })
}

/// `info` with `password`.
fn with_password(info: &redis::ConnectionInfo, password: &str) -> redis::ConnectionInfo {
    let settings = info.redis_settings().clone().set_password(password);
    info.clone().set_redis_settings(settings)
}

/// The password in `file` (without its trailing newline). The error names the file, never its contents.
fn read_password(file: &std::path::Path) -> Result<String, redis::RedisError> {
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(text.trim_end_matches(['\n', '\r']).to_string()),
        Err(e) => Err(redis::RedisError::from(std::io::Error::new(
            e.kind(),
            format!(
                "cannot read the Redis password file {}: {e}",
                file.display()
            ),
        ))),
    }
}

/// The credentials of a connection with a [password file](RedisOptions::password_file): redis-rs asks for
/// them at every (re)connection of the command connection, and the file is read then.
struct PasswordFile {
    path: PathBuf,
    username: Option<String>,
}

impl redis::StreamingCredentialsProvider for PasswordFile {
    fn subscribe(
        &self,
    ) -> std::pin::Pin<
        Box<dyn futures_util::Stream<Item = redis::RedisResult<redis::BasicAuth>> + Send + 'static>,
    > {
        use futures_util::StreamExt;
        // `AUTH default <password>` is what `AUTH <password>` means on Redis 6 and later.
        let username = self.username.clone().unwrap_or_else(|| "default".into());
        let auth =
            read_password(&self.path).map(|password| redis::BasicAuth::new(username, password));
        // One item: the connection authenticates with it. A live connection stays authenticated when the
        // password changes on the server; only new connections need the new one.
        Box::pin(
            futures_util::stream::once(std::future::ready(auth))
                .chain(futures_util::stream::pending()),
        )
    }
}

/// The command connection's watchdog: while the connection is in use, PING it every health-check interval;
/// one that does not answer within the liveness bound is replaced (the old one closes when its last
/// in-flight command is done). Ends with the connection.
async fn watch_commands(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let liveness = strong.options.liveness();
        drop(strong);
        tokio::time::sleep(liveness.interval).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if !strong.used.swap(false, Ordering::Relaxed) {
            continue; // idle: nothing waits on it, nothing to check
        }
        let Some((generation, mut manager)) = strong.lock_manager().clone() else {
            continue;
        };
        let endpoint = strong.display.clone();
        drop(strong);
        let ping = tokio::time::timeout(
            liveness.timeout,
            redis::cmd("PING").query_async::<redis::Value>(&mut manager),
        )
        .await;
        let stuck = match ping {
            Err(_) => true,
            Ok(Err(e)) => e.is_timeout(),
            Ok(Ok(_)) => false,
        };
        if !stuck {
            continue;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut slot = strong.lock_manager();
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            match strong.new_manager() {
                Ok(fresh) => {
                    tracing::warn!(
                        endpoint = %endpoint,
                        "redis command connection stopped answering; replacing it"
                    );
                    *slot = Some((generation + 1, fresh));
                }
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint, error = %e, "redis command connection cannot be replaced")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{RedisConnection, RedisOptions};

    #[test]
    fn an_unreadable_password_file_is_an_error_that_names_the_file() {
        let options = RedisOptions {
            password_file: Some("/nonexistent/binding/password".into()),
            ..RedisOptions::default()
        };
        let err = RedisConnection::open_with("redis://app@127.0.0.1:1", options).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cannot read the Redis password file /nonexistent/binding/password"),
            "{text}"
        );
    }
}
