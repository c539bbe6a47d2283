//! The injected configuration: the contract between the operator and the library.
//!
//! The operator writes, for every `FusionCache` resource, a ConfigMap holding a `fusioncache.yaml` (this
//! module's [`FusionCacheConfig`], serialized) and the same values as `FUSIONCACHE_*` environment variables,
//! plus a Secret with the credentials shaped as a [Service Binding](https://servicebinding.io) (`type`,
//! `provider` and one file per value).
//!
//! A service loads it with one call, [`FusionCacheConfig::load`], which merges, from highest to lowest
//! precedence:
//!
//! 1. environment variables (`FUSIONCACHE_CACHE_NAME`, …, see [`mod@env`]),
//! 2. the Service Binding directory `$SERVICE_BINDING_ROOT/<name>` whose `type` file says `fusioncache`,
//! 3. the YAML file named by `FUSIONCACHE_CONFIG`.
//!
//! Values set explicitly on the cache builder win over all of them.
//!
//! ```
//! use fusioncache::config::{BackplaneKind, FusionCacheConfig};
//!
//! let yaml = "cacheName: products\nchannelPrefix: shop.prod.products\nbackplane: memory\n";
//! let config = FusionCacheConfig::from_yaml(yaml).unwrap();
//! assert_eq!(config.cache_name.as_deref(), Some("products"));
//! assert_eq!(config.backplane, Some(BackplaneKind::Memory));
//! assert_eq!(config.channel().unwrap(), "shop.prod.products.Backplane:v2");
//!
//! // Unknown keys are an error that names the key.
//! let err = FusionCacheConfig::from_yaml("cacheName: a\nchanelPrefix: typo\n").unwrap_err();
//! assert!(err.to_string().contains("chanelPrefix"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backplane::channel_name;
use crate::redact;

/// Names of the environment variables the library reads (and the operator writes).
pub mod env {
    /// Path of a `fusioncache.yaml` file.
    pub const CONFIG: &str = "FUSIONCACHE_CONFIG";
    /// The cache name.
    pub const CACHE_NAME: &str = "FUSIONCACHE_CACHE_NAME";
    /// The channel prefix that overrides the cache name in the backplane channel.
    pub const CHANNEL_PREFIX: &str = "FUSIONCACHE_CHANNEL_PREFIX";
    /// `redis`, `nats`, `memory` or `none`.
    pub const BACKPLANE: &str = "FUSIONCACHE_BACKPLANE";
    /// `redis`, `memory` or `none`: the distributed (L2) cache.
    pub const DISTRIBUTED_CACHE: &str = "FUSIONCACHE_DISTRIBUTED_CACHE";
    /// Redis URL (`redis://host:port` or `rediss://` for TLS).
    pub const REDIS_URL: &str = "FUSIONCACHE_REDIS_URL";
    /// Redis database index.
    pub const REDIS_DATABASE: &str = "FUSIONCACHE_REDIS_DATABASE";
    /// Redis ACL user name.
    pub const REDIS_USERNAME: &str = "FUSIONCACHE_REDIS_USERNAME";
    /// Redis password.
    pub const REDIS_PASSWORD: &str = "FUSIONCACHE_REDIS_PASSWORD";
    /// Prefix of every L2 key.
    pub const KEY_PREFIX: &str = "FUSIONCACHE_KEY_PREFIX";
    /// NATS server URL(s), comma separated.
    pub const NATS_URL: &str = "FUSIONCACHE_NATS_URL";
    /// Path of a NATS `.creds` file.
    pub const NATS_CREDENTIALS: &str = "FUSIONCACHE_NATS_CREDENTIALS";
    /// The Redis liveness bound (`3s`, `1500ms`): a lost link is reported within it.
    pub const REDIS_LIVENESS_TIMEOUT: &str = "FUSIONCACHE_REDIS_LIVENESS_TIMEOUT";
    /// How long a Redis link may stay quiet before it is checked (`1s`).
    pub const REDIS_HEALTH_CHECK_INTERVAL: &str = "FUSIONCACHE_REDIS_HEALTH_CHECK_INTERVAL";
    /// The NATS liveness bound (`3s`).
    pub const NATS_LIVENESS_TIMEOUT: &str = "FUSIONCACHE_NATS_LIVENESS_TIMEOUT";
    /// How long a NATS subject may stay quiet before it is probed (`1s`).
    pub const NATS_HEALTH_CHECK_INTERVAL: &str = "FUSIONCACHE_NATS_HEALTH_CHECK_INTERVAL";
    /// `true` to try the NATS servers in the order given rather than shuffled.
    pub const NATS_RETAIN_SERVERS_ORDER: &str = "FUSIONCACHE_NATS_RETAIN_SERVERS_ORDER";
    /// Root of the Service Binding directories.
    pub const SERVICE_BINDING_ROOT: &str = "SERVICE_BINDING_ROOT";

    /// Every `FUSIONCACHE_*` key that carries a value (all but [`CONFIG`]).
    pub const VALUE_KEYS: [&str; 16] = [
        CACHE_NAME,
        CHANNEL_PREFIX,
        BACKPLANE,
        DISTRIBUTED_CACHE,
        REDIS_URL,
        REDIS_DATABASE,
        REDIS_USERNAME,
        REDIS_PASSWORD,
        KEY_PREFIX,
        NATS_URL,
        NATS_CREDENTIALS,
        REDIS_LIVENESS_TIMEOUT,
        REDIS_HEALTH_CHECK_INTERVAL,
        NATS_LIVENESS_TIMEOUT,
        NATS_HEALTH_CHECK_INTERVAL,
        NATS_RETAIN_SERVERS_ORDER,
    ];
}

/// The Service Binding `type` of a FusionCache binding.
pub const BINDING_TYPE: &str = "fusioncache";
/// The file name of the YAML configuration in the operator's ConfigMap.
pub const CONFIG_FILE_NAME: &str = "fusioncache.yaml";
/// The entry of a binding Secret that holds a NATS `.creds` file; mounted, its path becomes the NATS
/// credentials.
pub const BINDING_NATS_CREDS_FILE: &str = "nats.creds";

/// Which backplane transport a cache uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackplaneKind {
    /// Redis pub/sub.
    Redis,
    /// NATS core subjects.
    Nats,
    /// The in-process backplane (single process, tests and demos).
    Memory,
    /// No backplane: a single node, or nodes that accept staleness until expiry.
    None,
}

/// Which distributed (L2) cache a cache uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistributedCacheKind {
    /// Redis, on the configured URL and database.
    Redis,
    /// An in-process L2 (tests and demos).
    Memory,
    /// L1 only.
    None,
}

macro_rules! kind_from_str {
    ($ty:ty, $key:expr, [$($text:literal => $variant:expr),+]) => {
        impl FromStr for $ty {
            type Err = ConfigError;
            fn from_str(s: &str) -> Result<Self, ConfigError> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($text => Ok($variant),)+
                    other => Err(ConfigError::invalid(
                        $key,
                        format!("`{other}` is not one of {}", [$($text),+].join(", ")),
                    )),
                }
            }
        }
    };
}
kind_from_str!(BackplaneKind, env::BACKPLANE, ["redis" => BackplaneKind::Redis, "nats" => BackplaneKind::Nats, "memory" => BackplaneKind::Memory, "none" => BackplaneKind::None]);
kind_from_str!(DistributedCacheKind, env::DISTRIBUTED_CACHE, ["redis" => DistributedCacheKind::Redis, "memory" => DistributedCacheKind::Memory, "none" => DistributedCacheKind::None]);

/// Redis connection settings. `Debug` hides the password and the URL's userinfo.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port` or `rediss://host:port` (TLS). Credentials may be inline or below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Database index (`SELECT`), 0 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<u32>,
    /// ACL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password (kept in a Secret by the operator, never in the ConfigMap).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "secret_string"
    )]
    pub password: Option<String>,
    /// A file holding the password, read at every connection and reconnection (a rotated mounted Secret
    /// reaches the live caches when they reconnect). Set by a Service Binding directory to its password
    /// file; takes the place of `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<std::path::PathBuf>,
    /// The liveness bound (`3s` by default): a lost link is reported within it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_text"
    )]
    pub liveness_timeout: Option<Duration>,
    /// How long a link may stay quiet before it is checked (`1s` by default).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_text"
    )]
    pub health_check_interval: Option<Duration>,
}

/// NATS connection settings. `Debug` hides the URLs' userinfo (user, password or token).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port` (or `tls://`), several separated by commas. User/password or token may be inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Path of a `.creds` file (JWT + NKey seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// The liveness bound (`3s` by default): a lost link is reported within it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_text"
    )]
    pub liveness_timeout: Option<Duration>,
    /// How long a subject may stay quiet before it is probed (`1s` by default).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_text"
    )]
    pub health_check_interval: Option<Duration>,
    /// Try the servers in the order given rather than shuffled (`false` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_servers_order: Option<bool>,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact::url))
            .field("database", &self.database)
            .field("username", &self.username)
            .field(
                "password",
                &self.password.as_ref().map(|_| redact::REDACTED),
            )
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url.as_deref().map(redact::url))
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Deserializes a secret that must be a string; the error for any other value does not repeat it (an
/// unquoted `password: 123456` would otherwise be echoed by the parser).
fn secret_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Secret;
    impl serde::de::Visitor<'_> for Secret {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a quoted string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(E::custom("a secret must be a quoted string"))
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(E::custom("a secret must be a quoted string"))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(E::custom("a secret must be a quoted string"))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom("a secret must be a quoted string"))
        }
    }
    d.deserialize_any(Secret)
}

/// The injected configuration of one cache: what `fusioncache.yaml` holds.
///
/// Every field is optional so that sources can be layered; [`FusionCacheConfig::merge`] fills the gaps of
/// one source from another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FusionCacheConfig {
    /// The cache name (default `FusionCache`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_name: Option<String>,
    /// Overrides the cache name as the prefix of the backplane channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_prefix: Option<String>,
    /// The backplane transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backplane: Option<BackplaneKind>,
    /// The distributed cache; defaults to Redis when a Redis URL is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed_cache: Option<DistributedCacheKind>,
    /// Prefix of every L2 key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// Redis settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// NATS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsConfig>,
}

/// An error in the injected configuration. It names the key (or file) and what was wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid configuration value for `{key}`: {reason}")]
    Invalid {
        /// The key (environment form or YAML path).
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// A YAML document that does not match the schema (unknown key, wrong type).
    #[error("invalid configuration in {source_name}: {message}")]
    Yaml {
        /// Where the document came from.
        source_name: String,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A file that could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A required value is missing for the chosen transport.
    #[error("missing configuration: {0}")]
    Missing(String),
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// A source of string values by environment-variable name (the process environment, or a map in tests).
pub trait ValueSource {
    /// The value of `key`, if set and not empty.
    fn value(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl ValueSource for ProcessEnv {
    fn value(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl ValueSource for BTreeMap<String, String> {
    fn value(&self, key: &str) -> Option<String> {
        self.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

impl FusionCacheConfig {
    /// Parses a `fusioncache.yaml` document; unknown keys and wrong types are errors naming the key.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_named(text, "YAML")
    }

    fn from_yaml_named(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: Self = serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a YAML file.
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_named(&text, &path.display().to_string())
    }

    /// Serializes to the YAML the operator writes into its ConfigMap.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("the config type always serializes")
    }

    /// Reads the `FUSIONCACHE_*` keys from a value source (environment variables or a binding directory).
    pub fn from_values(source: &dyn ValueSource) -> Result<Self, ConfigError> {
        let get = |key: &str| source.value(key);
        let duration = |key: &str| -> Result<Option<Duration>, ConfigError> {
            get(key)
                .map(|v| {
                    duration_text::parse(&v).map_err(|reason| ConfigError::invalid(key, reason))
                })
                .transpose()
        };
        let mut redis = RedisConfig {
            url: get(env::REDIS_URL),
            database: None,
            username: get(env::REDIS_USERNAME),
            password: get(env::REDIS_PASSWORD),
            password_file: None,
            liveness_timeout: duration(env::REDIS_LIVENESS_TIMEOUT)?,
            health_check_interval: duration(env::REDIS_HEALTH_CHECK_INTERVAL)?,
        };
        if let Some(db) = get(env::REDIS_DATABASE) {
            redis.database = Some(db.trim().parse().map_err(|_| {
                ConfigError::invalid(
                    env::REDIS_DATABASE,
                    format!("`{db}` is not a database index (0 or a positive integer)"),
                )
            })?);
        }
        let retain_servers_order = get(env::NATS_RETAIN_SERVERS_ORDER)
            .map(|v| match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                other => Err(ConfigError::invalid(
                    env::NATS_RETAIN_SERVERS_ORDER,
                    format!("`{other}` is not true or false"),
                )),
            })
            .transpose()?;
        let nats = NatsConfig {
            url: get(env::NATS_URL),
            credentials: get(env::NATS_CREDENTIALS),
            liveness_timeout: duration(env::NATS_LIVENESS_TIMEOUT)?,
            health_check_interval: duration(env::NATS_HEALTH_CHECK_INTERVAL)?,
            retain_servers_order,
        };
        let config = Self {
            cache_name: get(env::CACHE_NAME),
            channel_prefix: get(env::CHANNEL_PREFIX),
            backplane: get(env::BACKPLANE).map(|v| v.parse()).transpose()?,
            distributed_cache: get(env::DISTRIBUTED_CACHE).map(|v| v.parse()).transpose()?,
            key_prefix: get(env::KEY_PREFIX),
            redis: (redis != RedisConfig::default()).then_some(redis),
            nats: (nats != NatsConfig::default()).then_some(nats),
        };
        config.validate()?;
        Ok(config)
    }

    /// The `FUSIONCACHE_*` environment variables equivalent to this config (what the operator writes into
    /// its ConfigMap, less the password, which goes into the Secret).
    pub fn to_env(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                out.insert(k.to_string(), v);
            }
        };
        put(env::CACHE_NAME, self.cache_name.clone());
        put(env::CHANNEL_PREFIX, self.channel_prefix.clone());
        put(
            env::BACKPLANE,
            self.backplane.map(|k| k.as_str().to_string()),
        );
        put(
            env::DISTRIBUTED_CACHE,
            self.distributed_cache.map(|k| k.as_str().to_string()),
        );
        put(env::KEY_PREFIX, self.key_prefix.clone());
        if let Some(r) = &self.redis {
            put(env::REDIS_URL, r.url.clone());
            put(env::REDIS_DATABASE, r.database.map(|d| d.to_string()));
            put(env::REDIS_USERNAME, r.username.clone());
            put(env::REDIS_PASSWORD, r.password.clone());
            put(
                env::REDIS_LIVENESS_TIMEOUT,
                r.liveness_timeout.map(duration_text::format),
            );
            put(
                env::REDIS_HEALTH_CHECK_INTERVAL,
                r.health_check_interval.map(duration_text::format),
            );
        }
        if let Some(n) = &self.nats {
            put(env::NATS_URL, n.url.clone());
            put(env::NATS_CREDENTIALS, n.credentials.clone());
            put(
                env::NATS_LIVENESS_TIMEOUT,
                n.liveness_timeout.map(duration_text::format),
            );
            put(
                env::NATS_HEALTH_CHECK_INTERVAL,
                n.health_check_interval.map(duration_text::format),
            );
            put(
                env::NATS_RETAIN_SERVERS_ORDER,
                n.retain_servers_order.map(|b| b.to_string()),
            );
        }
        out
    }

    /// Reads a Service Binding directory: a `type` file that must say `fusioncache`, and one file per
    /// value, named by its key in either form (`FUSIONCACHE_REDIS_PASSWORD`, or the binding-spec style
    /// `password`, `username`, `host`+`port`, `database`, `url`, `nats-url`, `channel-prefix`, …).
    pub fn from_binding_dir(dir: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let dir = dir.as_ref();
        let read = |name: &str| -> Result<Option<String>, ConfigError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(v) => Ok(Some(v.trim_end_matches(['\n', '\r']).to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(ConfigError::Io { path, source }),
            }
        };
        match read("type")? {
            Some(t) if t.trim() == BINDING_TYPE => {}
            Some(t) => {
                return Err(ConfigError::invalid(
                    dir.join("type").display().to_string(),
                    format!("binding type is `{t}`, expected `{BINDING_TYPE}`"),
                ))
            }
            None => {
                return Err(ConfigError::Missing(format!(
                    "{} has no `type` file",
                    dir.display()
                )))
            }
        }
        let mut values = BTreeMap::new();
        for key in env::VALUE_KEYS {
            if let Some(v) = read(key)? {
                values.insert(key.to_string(), v);
            }
        }
        // The binding-spec style names, for the values that have one.
        for (file, key) in BINDING_FILE_ALIASES {
            if !values.contains_key(*key) {
                if let Some(v) = read(file)? {
                    values.insert(key.to_string(), v);
                }
            }
        }
        if !values.contains_key(env::NATS_CREDENTIALS)
            && dir.join(BINDING_NATS_CREDS_FILE).is_file()
        {
            let path = dir.join(BINDING_NATS_CREDS_FILE).display().to_string();
            values.insert(env::NATS_CREDENTIALS.to_string(), path);
        }
        let mut config = Self::from_values(&values)?;
        // The password is read again from its file at every reconnection: a rotated Secret reaches the
        // live caches.
        if let Some(redis) = config.redis.as_mut().filter(|r| r.password.is_some()) {
            redis.password_file = [env::REDIS_PASSWORD, "password"]
                .into_iter()
                .map(|name| dir.join(name))
                .find(|path| path.is_file());
        }
        Ok(config)
    }

    /// Finds the FusionCache binding under `$SERVICE_BINDING_ROOT`: the only directory whose `type` is
    /// `fusioncache`, or the one named `name` when given.
    pub fn find_binding(
        root: impl AsRef<Path>,
        name: Option<&str>,
    ) -> Result<Option<Self>, ConfigError> {
        let root = root.as_ref();
        if let Some(name) = name {
            return Self::from_binding_dir(root.join(name)).map(Some);
        }
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ConfigError::Io {
                    path: root.to_path_buf(),
                    source,
                })
            }
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let is_ours = std::fs::read_to_string(dir.join("type"))
                .map(|t| t.trim() == BINDING_TYPE)
                .unwrap_or(false);
            if is_ours {
                found.push(dir);
            }
        }
        found.sort();
        match found.as_slice() {
            [] => Ok(None),
            [one] => Self::from_binding_dir(one).map(Some),
            many => Err(ConfigError::invalid(
                env::SERVICE_BINDING_ROOT,
                format!(
                    "{} bindings of type `{BINDING_TYPE}` found ({}); name one explicitly",
                    many.len(),
                    many.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Loads the configuration of this process, merging environment variables over the Service Binding
    /// over the `FUSIONCACHE_CONFIG` file.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(&ProcessEnv)
    }

    /// [`load`](Self::load) with an explicit source of environment variables.
    pub fn load_from(source: &dyn ValueSource) -> Result<Self, ConfigError> {
        let mut config = Self::from_values(source)?;
        if let Some(root) = source.value(env::SERVICE_BINDING_ROOT) {
            if let Some(binding) = Self::find_binding(root, None)? {
                config = config.merge(binding);
            }
        }
        if let Some(path) = source.value(env::CONFIG) {
            config = config.merge(Self::from_yaml_file(path)?);
        }
        Ok(config)
    }

    /// Fills every value missing in `self` from `lower` (which has the lower precedence).
    #[must_use]
    pub fn merge(self, lower: Self) -> Self {
        fn merge_redis(a: Option<RedisConfig>, b: Option<RedisConfig>) -> Option<RedisConfig> {
            match (a, b) {
                (Some(a), Some(b)) => Some(RedisConfig {
                    url: a.url.or(b.url),
                    database: a.database.or(b.database),
                    username: a.username.or(b.username),
                    // A password and the file it was read from come from the same source.
                    password_file: if a.password.is_some() {
                        a.password_file
                    } else {
                        b.password_file
                    },
                    password: a.password.or(b.password),
                    liveness_timeout: a.liveness_timeout.or(b.liveness_timeout),
                    health_check_interval: a.health_check_interval.or(b.health_check_interval),
                }),
                (a, b) => a.or(b),
            }
        }
        fn merge_nats(a: Option<NatsConfig>, b: Option<NatsConfig>) -> Option<NatsConfig> {
            match (a, b) {
                (Some(a), Some(b)) => Some(NatsConfig {
                    url: a.url.or(b.url),
                    credentials: a.credentials.or(b.credentials),
                    liveness_timeout: a.liveness_timeout.or(b.liveness_timeout),
                    health_check_interval: a.health_check_interval.or(b.health_check_interval),
                    retain_servers_order: a.retain_servers_order.or(b.retain_servers_order),
                }),
                (a, b) => a.or(b),
            }
        }
        Self {
            cache_name: self.cache_name.or(lower.cache_name),
            channel_prefix: self.channel_prefix.or(lower.channel_prefix),
            backplane: self.backplane.or(lower.backplane),
            distributed_cache: self.distributed_cache.or(lower.distributed_cache),
            key_prefix: self.key_prefix.or(lower.key_prefix),
            redis: merge_redis(self.redis, lower.redis),
            nats: merge_nats(self.nats, lower.nats),
        }
    }

    /// Checks the values that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.cache_name {
            if name.trim().is_empty() {
                return Err(ConfigError::invalid("cacheName", "must not be blank"));
            }
        }
        if let Some(r) = &self.redis {
            if let Some(url) = &r.url {
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("redis+unix://")
                    || url.starts_with("unix://"))
                {
                    return Err(ConfigError::invalid(
                        "redis.url",
                        format!(
                            "`{}` must start with redis://, rediss:// or unix://",
                            redact::url(url)
                        ),
                    ));
                }
            }
        }
        if let Some(n) = &self.nats {
            if let Some(url) = &n.url {
                if url.split(',').any(|u| u.trim().is_empty()) {
                    return Err(ConfigError::invalid(
                        "nats.url",
                        "contains an empty server URL",
                    ));
                }
            }
        }
        let positive = |key: &str, value: Option<Duration>| match value {
            Some(d) if d.is_zero() => Err(ConfigError::invalid(key, "must be more than zero")),
            _ => Ok(()),
        };
        if let Some(r) = &self.redis {
            positive("redis.livenessTimeout", r.liveness_timeout)?;
            positive("redis.healthCheckInterval", r.health_check_interval)?;
        }
        if let Some(n) = &self.nats {
            positive("nats.livenessTimeout", n.liveness_timeout)?;
            positive("nats.healthCheckInterval", n.health_check_interval)?;
        }
        let needs = |kind: &str, present: bool| {
            if present {
                Ok(())
            } else {
                Err(ConfigError::Missing(format!(
                    "backplane `{kind}` needs `{kind}.url` ({})",
                    if kind == "redis" {
                        env::REDIS_URL
                    } else {
                        env::NATS_URL
                    }
                )))
            }
        };
        let redis_url = self.redis.as_ref().and_then(|r| r.url.as_ref()).is_some();
        let nats_url = self.nats.as_ref().and_then(|n| n.url.as_ref()).is_some();
        match self.backplane {
            Some(BackplaneKind::Redis) => needs("redis", redis_url)?,
            Some(BackplaneKind::Nats) => needs("nats", nats_url)?,
            _ => {}
        }
        if self.distributed_cache == Some(DistributedCacheKind::Redis) {
            needs("redis", redis_url)?;
        }
        Ok(())
    }

    /// A copy fit for printing: the Redis password and every URL's userinfo replaced by `<redacted>`.
    ///
    /// ```
    /// use fusioncache::config::FusionCacheConfig;
    ///
    /// let config = FusionCacheConfig::from_yaml("redis:\n  url: redis://app:s3cret@r:6379\n  password: s3cret\n").unwrap();
    /// let shown = config.redacted().to_yaml();
    /// assert!(shown.contains("redis://<redacted>@r:6379") && !shown.contains("s3cret"));
    /// ```
    #[must_use]
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        if let Some(r) = &mut copy.redis {
            r.url = r.url.as_deref().map(redact::url);
            if r.password.is_some() {
                r.password = Some(redact::REDACTED.to_string());
            }
        }
        if let Some(n) = &mut copy.nats {
            n.url = n.url.as_deref().map(redact::url);
        }
        copy
    }

    /// The cache name, `FusionCache` when not configured.
    pub fn cache_name_or_default(&self) -> &str {
        self.cache_name
            .as_deref()
            .unwrap_or(crate::DEFAULT_CACHE_NAME)
    }

    /// The backplane channel (and NATS subject) this configuration produces, per the channel naming rules.
    pub fn channel(&self) -> Result<String, ConfigError> {
        Ok(channel_name(
            self.channel_prefix.as_deref(),
            Some(self.cache_name_or_default()),
        ))
    }

    /// The distributed cache this configuration selects: explicit, else Redis when a Redis URL is set.
    pub fn effective_distributed_cache(&self) -> DistributedCacheKind {
        self.distributed_cache.unwrap_or_else(|| {
            if self.redis.as_ref().and_then(|r| r.url.as_ref()).is_some() {
                DistributedCacheKind::Redis
            } else {
                DistributedCacheKind::None
            }
        })
    }
}

/// Durations as text in YAML and environment variables: `1500ms`, `3s`, `1.5s`, `2m`.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses `<number><unit>`, unit `ms`, `s` or `m`.
    pub(super) fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "" => return Err(format!("`{text}` has no unit (write e.g. `3s` or `500ms`)")),
            other => return Err(format!("`{other}` is not a unit (ms, s, m)")),
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a duration (e.g. `3s` or `500ms`)"))?;
        Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{text}`: {e}"))
    }

    /// `3s` for whole seconds, else milliseconds (`1500ms`).
    pub(super) fn format(d: Duration) -> String {
        if d.subsec_nanos() == 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{}ms", d.as_millis())
        }
    }

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format(*d)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| parse(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Service Binding file names (binding-spec style) and the key each one stands for.
const BINDING_FILE_ALIASES: &[(&str, &str)] = &[
    ("cache-name", env::CACHE_NAME),
    ("channel-prefix", env::CHANNEL_PREFIX),
    ("backplane", env::BACKPLANE),
    ("distributed-cache", env::DISTRIBUTED_CACHE),
    ("key-prefix", env::KEY_PREFIX),
    ("url", env::REDIS_URL),
    ("database", env::REDIS_DATABASE),
    ("username", env::REDIS_USERNAME),
    ("password", env::REDIS_PASSWORD),
    ("nats-url", env::NATS_URL),
    ("nats-credentials", env::NATS_CREDENTIALS),
];

impl BackplaneKind {
    /// The lowercase name used in YAML and environment variables.
    pub fn as_str(self) -> &'static str {
        match self {
            BackplaneKind::Redis => "redis",
            BackplaneKind::Nats => "nats",
            BackplaneKind::Memory => "memory",
            BackplaneKind::None => "none",
        }
    }
}

impl DistributedCacheKind {
    /// The lowercase name used in YAML and environment variables.
    pub fn as_str(self) -> &'static str {
        match self {
            DistributedCacheKind::Redis => "redis",
            DistributedCacheKind::Memory => "memory",
            DistributedCacheKind::None => "none",
        }
    }
}

impl fmt::Display for BackplaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for DistributedCacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "fusioncache-config-{name}-{}",
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn environment_variables_parse_and_round_trip() {
        let env = values(&[
            (env::CACHE_NAME, "products"),
            (env::CHANNEL_PREFIX, "shop.prod.products"),
            (env::BACKPLANE, "Redis"),
            (env::REDIS_URL, "redis://r:6379"),
            (env::REDIS_DATABASE, "3"),
            (env::REDIS_PASSWORD, "pw"),
            (env::KEY_PREFIX, "shop:"),
        ]);
        let config = FusionCacheConfig::from_values(&env).unwrap();
        assert_eq!(config.backplane, Some(BackplaneKind::Redis));
        assert_eq!(config.redis.as_ref().unwrap().database, Some(3));
        assert_eq!(
            config.effective_distributed_cache(),
            DistributedCacheKind::Redis
        );
        assert_eq!(config.channel().unwrap(), "shop.prod.products.Backplane:v2");
        let back = FusionCacheConfig::from_values(&config.to_env()).unwrap();
        assert_eq!(back, config);
        let yaml = FusionCacheConfig::from_yaml(&config.to_yaml()).unwrap();
        assert_eq!(yaml, config);
    }

    #[test]
    fn errors_name_the_key_and_the_problem() {
        let err =
            FusionCacheConfig::from_values(&values(&[(env::REDIS_DATABASE, "three")])).unwrap_err();
        assert!(
            err.to_string().contains(env::REDIS_DATABASE) && err.to_string().contains("three"),
            "{err}"
        );
        let err =
            FusionCacheConfig::from_values(&values(&[(env::BACKPLANE, "kafka")])).unwrap_err();
        assert!(
            err.to_string().contains(env::BACKPLANE) && err.to_string().contains("kafka"),
            "{err}"
        );
        let err = FusionCacheConfig::from_values(&values(&[(env::BACKPLANE, "nats")])).unwrap_err();
        assert!(err.to_string().contains(env::NATS_URL), "{err}");
        let err = FusionCacheConfig::from_yaml("redis:\n  url: http://x\n").unwrap_err();
        assert!(err.to_string().contains("redis.url"), "{err}");
        let err = FusionCacheConfig::from_yaml("redis:\n  databse: 1\n").unwrap_err();
        assert!(err.to_string().contains("databse"), "{err}");
        let err = FusionCacheConfig::from_yaml("cacheName: [1, 2]\n").unwrap_err();
        assert!(err.to_string().contains("cacheName"), "{err}");
    }

    #[test]
    fn precedence_is_env_then_binding_then_file() {
        let dir = temp_dir("precedence");
        let file = dir.join(CONFIG_FILE_NAME);
        std::fs::write(
            &file,
            "cacheName: from-file\nchannelPrefix: file.prefix\nkeyPrefix: \"file:\"\n",
        )
        .unwrap();
        let root = dir.join("bindings");
        let binding = root.join("cache");
        std::fs::create_dir_all(&binding).unwrap();
        std::fs::write(binding.join("type"), "fusioncache\n").unwrap();
        std::fs::write(binding.join("provider"), "fusioncache-operator\n").unwrap();
        std::fs::write(binding.join(env::CHANNEL_PREFIX), "binding.prefix").unwrap();
        std::fs::write(binding.join("password"), "s3cret\n").unwrap();
        std::fs::write(binding.join(BINDING_NATS_CREDS_FILE), "creds").unwrap();
        let env = values(&[
            (env::CONFIG, file.to_str().unwrap()),
            (env::SERVICE_BINDING_ROOT, root.to_str().unwrap()),
            (env::CACHE_NAME, "from-env"),
        ]);
        let config = FusionCacheConfig::load_from(&env).unwrap();
        assert_eq!(config.cache_name.as_deref(), Some("from-env"));
        assert_eq!(config.channel_prefix.as_deref(), Some("binding.prefix"));
        assert_eq!(config.key_prefix.as_deref(), Some("file:"));
        let redis = config.redis.unwrap();
        assert_eq!(redis.password.as_deref(), Some("s3cret"));
        assert_eq!(
            redis.password_file.as_deref(),
            Some(binding.join("password").as_path()),
            "the password is read again from the binding at every reconnection"
        );
        let creds = config.nats.unwrap().credentials.unwrap();
        assert!(creds.ends_with(BINDING_NATS_CREDS_FILE), "{creds}");

        // A password from the environment wins, and so does not come with the binding's file.
        let env = values(&[
            (env::SERVICE_BINDING_ROOT, root.to_str().unwrap()),
            (env::REDIS_PASSWORD, "from-env"),
        ]);
        let redis = FusionCacheConfig::load_from(&env).unwrap().redis.unwrap();
        assert_eq!(redis.password.as_deref(), Some("from-env"));
        assert_eq!(redis.password_file, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_binding_of_another_type_is_not_read() {
        let root = temp_dir("types");
        std::fs::create_dir_all(root.join("db")).unwrap();
        std::fs::write(root.join("db").join("type"), "postgresql").unwrap();
        assert_eq!(FusionCacheConfig::find_binding(&root, None).unwrap(), None);
        let err = FusionCacheConfig::from_binding_dir(root.join("db")).unwrap_err();
        assert!(err.to_string().contains("postgresql"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn liveness_keys_parse_round_trip_and_are_checked() {
        let env = values(&[
            (env::BACKPLANE, "nats"),
            (env::NATS_URL, "nats://a:4222,nats://b:4222"),
            (env::NATS_LIVENESS_TIMEOUT, "1500ms"),
            (env::NATS_HEALTH_CHECK_INTERVAL, "0.5s"),
            (env::NATS_RETAIN_SERVERS_ORDER, "true"),
            (env::REDIS_URL, "redis://r:6379"),
            (env::REDIS_LIVENESS_TIMEOUT, "2s"),
        ]);
        let config = FusionCacheConfig::from_values(&env).unwrap();
        let nats = config.nats.as_ref().unwrap();
        assert_eq!(nats.liveness_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(nats.health_check_interval, Some(Duration::from_millis(500)));
        assert_eq!(nats.retain_servers_order, Some(true));
        let redis = config.redis.as_ref().unwrap();
        assert_eq!(redis.liveness_timeout, Some(Duration::from_secs(2)));
        assert_eq!(redis.health_check_interval, None);
        assert_eq!(
            FusionCacheConfig::from_values(&config.to_env()).unwrap(),
            config
        );
        let yaml = config.to_yaml();
        assert!(yaml.contains("livenessTimeout: 1500ms"), "{yaml}");
        assert!(yaml.contains("retainServersOrder: true"), "{yaml}");
        assert_eq!(FusionCacheConfig::from_yaml(&yaml).unwrap(), config);

        let yaml = "redis:\n  url: redis://r\n  livenessTimeout: 3\n";
        let err = FusionCacheConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(err.contains("no unit"), "{err}");
        let err =
            FusionCacheConfig::from_values(&values(&[(env::REDIS_HEALTH_CHECK_INTERVAL, "1h")]))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains(env::REDIS_HEALTH_CHECK_INTERVAL) && err.contains("not a unit"),
            "{err}"
        );
        let err = FusionCacheConfig::from_values(&values(&[(env::NATS_LIVENESS_TIMEOUT, "0s")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nats.livenessTimeout"), "{err}");
        let err =
            FusionCacheConfig::from_values(&values(&[(env::NATS_RETAIN_SERVERS_ORDER, "maybe")]))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains(env::NATS_RETAIN_SERVERS_ORDER) && err.contains("maybe"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let env = values(&[(env::CONFIG, "/nonexistent/fusioncache.yaml")]);
        let err = FusionCacheConfig::load_from(&env).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/fusioncache.yaml"),
            "{err}"
        );
    }
}
