//! Turning injected configuration into transports, sharing one connection per endpoint and credentials in
//! the process.
//!
//! Connections are shared by the caches whose configurations name the same endpoint with the same
//! credentials, compared in full through a [`Credentials`] fingerprint (never the password itself). Every
//! [`FusionCacheConfig::load`] re-reads the Service Binding directory, so after a rotation the caches built
//! from then on open new connections with the new secret; the connections of the caches already running
//! read the binding's password file again whenever they reconnect.

use std::collections::HashMap;
#[cfg(any(feature = "redis", feature = "nats"))]
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(feature = "nats")]
use crate::backplane::BackplaneError;
use crate::backplane::{Backplane, MemoryBackplane};
use crate::config::{BackplaneKind, ConfigError, DistributedCacheKind, FusionCacheConfig};
use crate::error::Error;
use crate::l2::{DistributedCache, MemoryDistributedCache};
#[cfg(any(feature = "redis", feature = "nats"))]
use crate::redact;

/// A fingerprint of everything that selects and authenticates a connection (URL, database, user,
/// password, credentials file contents): equal exactly for equal values, barring a 128-bit collision. It is
/// keyed with random per-process keys, so it tells nothing about the password to whoever reads it.
#[cfg(any(feature = "redis", feature = "nats"))]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Credentials([u64; 2]);

#[cfg(any(feature = "redis", feature = "nats"))]
impl Credentials {
    fn of(parts: &[Option<&[u8]>]) -> Self {
        static KEYS: OnceLock<[RandomState; 2]> = OnceLock::new();
        let keys = KEYS.get_or_init(|| [RandomState::new(), RandomState::new()]);
        // `Option` and slices hash their discriminant and length: ("ab", "c") != ("a", "bc").
        Self([keys[0].hash_one(parts), keys[1].hash_one(parts)])
    }
}

#[cfg(any(feature = "redis", feature = "nats"))]
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

/// Process-wide registries: every cache configured with the same endpoint and credentials shares it.
#[derive(Default)]
struct Registry {
    memory_backplane: Option<MemoryBackplane>,
    memory_l2: HashMap<String, MemoryDistributedCache>,
    #[cfg(feature = "redis")]
    redis: HashMap<Credentials, crate::redis::RedisConnection>,
    #[cfg(feature = "redis")]
    redis_backplanes: HashMap<Credentials, Arc<crate::backplane::redis::RedisBackplane>>,
    #[cfg(feature = "nats")]
    nats: HashMap<
        Credentials,
        Arc<tokio::sync::OnceCell<Arc<crate::backplane::nats::NatsBackplane>>>,
    >,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

#[cfg(feature = "redis")]
fn redis_connection(
    config: &FusionCacheConfig,
) -> Result<(Credentials, crate::redis::RedisConnection), Error> {
    let r = config.redis.clone().unwrap_or_default();
    let url = r.url.clone().ok_or_else(|| {
        ConfigError::Missing(format!("redis.url ({})", crate::config::env::REDIS_URL))
    })?;
    let database = r.database.map(|d| d.to_string());
    // Connections with other liveness settings are other connections.
    let liveness = format!("{:?}|{:?}", r.liveness_timeout, r.health_check_interval);
    let key = Credentials::of(&[
        Some(url.as_bytes()),
        database.as_deref().map(str::as_bytes),
        r.username.as_deref().map(str::as_bytes),
        r.password.as_deref().map(str::as_bytes),
        r.password_file
            .as_deref()
            .map(|p| p.as_os_str().as_encoded_bytes()),
        Some(liveness.as_bytes()),
    ]);
    let mut options = crate::redis::RedisOptions::default();
    if let Some(timeout) = r.liveness_timeout {
        options.liveness_timeout = timeout;
    }
    if let Some(interval) = r.health_check_interval {
        options.health_check_interval = interval;
    }
    options.password_file = r.password_file.clone();
    let mut reg = registry();
    if let Some(conn) = reg.redis.get(&key) {
        return Ok((key, conn.clone()));
    }
    let conn = crate::redis::RedisConnection::open_parts(
        &url,
        r.database,
        r.username.as_deref(),
        r.password.as_deref(),
        options,
    )
    .map_err(|e| {
        let secrets = redact::userinfo(&url).chain(r.password.as_deref());
        ConfigError::invalid("redis.url", redact::scrub(e.to_string(), secrets))
    })?;
    reg.redis.insert(key, conn.clone());
    Ok((key, conn))
}

/// A transport's error with the secrets of its configuration hidden (it may quote the URL it was given).
#[cfg(feature = "nats")]
fn scrub_backplane_error(e: BackplaneError, secrets: &[&str]) -> BackplaneError {
    let scrub = |m| redact::scrub(m, secrets.iter().copied());
    match e {
        BackplaneError::Transport(m) => BackplaneError::Transport(scrub(m)),
        BackplaneError::Config(m) => BackplaneError::Config(scrub(m)),
        BackplaneError::InvalidChannel { channel, reason } => BackplaneError::InvalidChannel {
            channel,
            reason: scrub(reason),
        },
        other => other,
    }
}

/// The distributed cache a configuration selects, if any.
pub(crate) fn distributed_cache(
    config: &FusionCacheConfig,
) -> Result<Option<Arc<dyn DistributedCache>>, Error> {
    match config.effective_distributed_cache() {
        DistributedCacheKind::None => Ok(None),
        DistributedCacheKind::Memory => {
            let mut reg = registry();
            let l2 = reg
                .memory_l2
                .entry(config.cache_name_or_default().to_string())
                .or_default()
                .clone();
            Ok(Some(Arc::new(l2)))
        }
        #[cfg(feature = "redis")]
        DistributedCacheKind::Redis => {
            let (_, conn) = redis_connection(config)?;
            let store = crate::l2::redis::RedisDistributedCache::new(conn)
                .key_prefix(config.key_prefix.clone().unwrap_or_default());
            Ok(Some(Arc::new(store)))
        }
        #[cfg(not(feature = "redis"))]
        DistributedCacheKind::Redis => Err(missing_feature("distributedCache", "redis")),
    }
}

/// The backplane a configuration selects, if any.
pub(crate) async fn backplane(
    config: &FusionCacheConfig,
) -> Result<Option<Arc<dyn Backplane>>, Error> {
    match config.backplane {
        None | Some(BackplaneKind::None) => Ok(None),
        Some(BackplaneKind::Memory) => {
            let bus = registry()
                .memory_backplane
                .get_or_insert_with(MemoryBackplane::new)
                .clone();
            Ok(Some(Arc::new(bus)))
        }
        #[cfg(feature = "redis")]
        Some(BackplaneKind::Redis) => {
            let (key, conn) = redis_connection(config)?;
            let mut reg = registry();
            let bp = reg
                .redis_backplanes
                .entry(key)
                .or_insert_with(|| Arc::new(crate::backplane::redis::RedisBackplane::new(conn)))
                .clone();
            Ok(Some(bp))
        }
        #[cfg(feature = "nats")]
        Some(BackplaneKind::Nats) => {
            let n = config.nats.clone().unwrap_or_default();
            let url = n.url.clone().ok_or_else(|| {
                ConfigError::Missing(format!("nats.url ({})", crate::config::env::NATS_URL))
            })?;
            // The file's contents count: a rotated `.creds` file at the same path is another identity.
            let creds = n.credentials.as_deref().map(std::fs::read);
            let liveness = format!(
                "{:?}|{:?}|{:?}",
                n.liveness_timeout, n.health_check_interval, n.retain_servers_order
            );
            let key = Credentials::of(&[
                Some(url.as_bytes()),
                n.credentials.as_deref().map(str::as_bytes),
                creds.as_ref().and_then(|c| c.as_deref().ok()),
                Some(liveness.as_bytes()),
            ]);
            let cell = registry().nats.entry(key).or_default().clone();
            let bp = cell
                .get_or_try_init(|| async {
                    let mut options = crate::backplane::nats::NatsOptions::new(url.clone());
                    if let Some(creds) = &n.credentials {
                        options = options.credentials_file(creds);
                    }
                    if let Some(timeout) = n.liveness_timeout {
                        options = options.liveness_timeout(timeout);
                    }
                    if let Some(interval) = n.health_check_interval {
                        options = options.health_check_interval(interval);
                    }
                    options = options.retain_servers_order(n.retain_servers_order.unwrap_or(false));
                    crate::backplane::nats::NatsBackplane::connect_with(options)
                        .await
                        .map(Arc::new)
                        .map_err(|e| {
                            let secrets: Vec<&str> = redact::userinfo(&url).collect();
                            scrub_backplane_error(e, &secrets)
                        })
                })
                .await?
                .clone();
            Ok(Some(bp))
        }
        #[cfg(not(feature = "redis"))]
        Some(BackplaneKind::Redis) => Err(missing_feature("backplane", "redis")),
        #[cfg(not(feature = "nats"))]
        Some(BackplaneKind::Nats) => Err(missing_feature("backplane", "nats")),
    }
}

#[allow(dead_code)]
fn missing_feature(key: &str, feature: &str) -> Error {
    ConfigError::invalid(
        key,
        format!("`{feature}` needs the crate feature `{feature}`, which this build lacks"),
    )
    .into()
}
