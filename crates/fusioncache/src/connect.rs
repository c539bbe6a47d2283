//! Turning injected configuration into transports, sharing one connection per endpoint in the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::backplane::{Backplane, MemoryBackplane};
use crate::config::{BackplaneKind, ConfigError, DistributedCacheKind, FusionCacheConfig};
use crate::error::Error;
use crate::l2::{DistributedCache, MemoryDistributedCache};

/// Process-wide registries: every cache configured with the same endpoint shares it.
#[derive(Default)]
struct Registry {
    memory_backplane: Option<MemoryBackplane>,
    memory_l2: HashMap<String, MemoryDistributedCache>,
    #[cfg(feature = "redis")]
    redis: HashMap<String, crate::redis::RedisConnection>,
    #[cfg(feature = "redis")]
    redis_backplanes: HashMap<String, Arc<crate::backplane::redis::RedisBackplane>>,
    #[cfg(feature = "nats")]
    nats: HashMap<String, Arc<tokio::sync::OnceCell<Arc<crate::backplane::nats::NatsBackplane>>>>,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

#[cfg(feature = "redis")]
fn redis_connection(config: &FusionCacheConfig) -> Result<crate::redis::RedisConnection, Error> {
    let r = config.redis.clone().unwrap_or_default();
    let url = r.url.clone().ok_or_else(|| {
        ConfigError::Missing(format!("redis.url ({})", crate::config::env::REDIS_URL))
    })?;
    let key = format!(
        "{url}|{:?}|{:?}|{}|{:?}|{:?}",
        r.database,
        r.username,
        r.password.as_deref().map_or(0, str::len),
        r.liveness_timeout,
        r.health_check_interval,
    );
    let mut options = crate::redis::RedisOptions::default();
    if let Some(timeout) = r.liveness_timeout {
        options.liveness_timeout = timeout;
    }
    if let Some(interval) = r.health_check_interval {
        options.health_check_interval = interval;
    }
    let mut reg = registry();
    if let Some(conn) = reg.redis.get(&key) {
        return Ok(conn.clone());
    }
    let conn = crate::redis::RedisConnection::open_parts(
        &url,
        r.database,
        r.username.as_deref(),
        r.password.as_deref(),
        options,
    )
    .map_err(|e| ConfigError::invalid("redis.url", e.to_string()))?;
    reg.redis.insert(key, conn.clone());
    Ok(conn)
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
            let conn = redis_connection(config)?;
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
            let conn = redis_connection(config)?;
            let mut reg = registry();
            let bp = reg
                .redis_backplanes
                .entry(conn.endpoint().to_string())
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
            let key = format!(
                "{url}|{:?}|{:?}|{:?}|{:?}",
                n.credentials, n.liveness_timeout, n.health_check_interval, n.retain_servers_order
            );
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
