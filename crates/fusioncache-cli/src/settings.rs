//! Which cache and transport a command works on: the injected configuration, overridden by flags.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use fusioncache::config::{
    env, BackplaneKind, FusionCacheConfig, NatsConfig, ProcessEnv, RedisConfig, ValueSource,
};

use crate::Failure;

/// The flags that select the cache and its transport.
#[derive(Debug, Args)]
#[command(next_help_heading = "Cache and transport (override the injected configuration)")]
pub struct Target {
    /// The cache name; the channel is NAME.Backplane:v2 unless a channel prefix is set.
    #[arg(long, global = true, value_name = "NAME")]
    pub cache_name: Option<String>,
    /// The channel prefix: the channel is PREFIX.Backplane:v2.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub channel_prefix: Option<String>,
    /// The transport [default: the one whose URL is configured].
    #[arg(long, global = true, value_enum)]
    pub backplane: Option<Transport>,
    /// Redis URL: redis://host:port, rediss:// for TLS.
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis database index of the L2 (the channel is the same in every database).
    #[arg(long, global = true, value_name = "N")]
    pub redis_database: Option<u32>,
    /// Redis ACL user name.
    #[arg(long, global = true, value_name = "USER")]
    pub redis_username: Option<String>,
    /// The L2 key prefix: the cache's entries are at PREFIX{key} (publish, clear, remove-by-tag).
    #[arg(long, global = true, value_name = "PREFIX")]
    pub key_prefix: Option<String>,
    /// NATS server URL(s), comma separated.
    #[arg(long, global = true, value_name = "URL")]
    pub nats_url: Option<String>,
    /// NATS credentials (.creds) file.
    #[arg(long, global = true, value_name = "FILE")]
    pub nats_credentials: Option<PathBuf>,
    /// A fusioncache.yaml to read instead of $FUSIONCACHE_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How long to wait for the connection, each probe, and each change sent (e.g. 500ms, 5s, 1m).
    #[arg(long, global = true, value_name = "DURATION", default_value = "5s")]
    pub timeout: Timeout,
}

/// A backplane transport the command line can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// Redis pub/sub.
    Redis,
    /// NATS core subjects.
    Nats,
}

/// A duration written `500ms`, `5s`, `2m` or a number of seconds.
#[derive(Debug, Clone, Copy)]
pub struct Timeout(Duration);

impl From<Timeout> for Duration {
    fn from(t: Timeout) -> Duration {
        t.0
    }
}

impl FromStr for Timeout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
            Some(i) => s.split_at(i),
            None => (s, "s"),
        };
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            _ => return Err(format!("`{s}`: the unit must be ms, s or m")),
        };
        match number.trim().parse::<f64>() {
            Ok(n) if n > 0.0 && n.is_finite() => Ok(Timeout(Duration::from_secs_f64(n * scale))),
            _ => Err(format!("`{s}` is not a positive duration (e.g. 500ms, 5s)")),
        }
    }
}

/// The process environment, with `FUSIONCACHE_CONFIG` replaced by `--config` when given.
struct Environment<'a> {
    config_file: Option<&'a str>,
}

impl ValueSource for Environment<'_> {
    fn value(&self, key: &str) -> Option<String> {
        match (key, self.config_file) {
            (env::CONFIG, Some(path)) => Some(path.to_string()),
            _ => ProcessEnv.value(key),
        }
    }
}

/// The configuration a command runs with: the flags over the injected configuration, with a Redis or
/// NATS backplane.
pub fn resolve(target: &Target) -> Result<FusionCacheConfig, Failure> {
    let config_file = target.config.as_ref().map(|p| p.display().to_string());
    let injected = FusionCacheConfig::load_from(&Environment {
        config_file: config_file.as_deref(),
    })?;
    let redis = RedisConfig {
        url: target.redis_url.clone(),
        database: target.redis_database,
        username: target.redis_username.clone(),
        password: None,
    };
    let nats = NatsConfig {
        url: target.nats_url.clone(),
        credentials: target
            .nats_credentials
            .as_ref()
            .map(|p| p.display().to_string()),
    };
    let flags = FusionCacheConfig {
        cache_name: target.cache_name.clone(),
        channel_prefix: target.channel_prefix.clone(),
        key_prefix: target.key_prefix.clone(),
        backplane: target.backplane.map(|t| match t {
            Transport::Redis => BackplaneKind::Redis,
            Transport::Nats => BackplaneKind::Nats,
        }),
        redis: (redis != RedisConfig::default()).then_some(redis),
        nats: (nats != NatsConfig::default()).then_some(nats),
        ..FusionCacheConfig::default()
    };
    let mut config = flags.merge(injected);
    if config.backplane.is_none() {
        let redis_url = config.redis.as_ref().is_some_and(|r| r.url.is_some());
        let nats_url = config.nats.as_ref().is_some_and(|n| n.url.is_some());
        config.backplane = match (redis_url, nats_url) {
            (true, false) => Some(BackplaneKind::Redis),
            (false, true) => Some(BackplaneKind::Nats),
            (true, true) => {
                return Err(Failure::Config(
                    "both a Redis and a NATS URL are configured: choose one with --backplane"
                        .into(),
                ))
            }
            (false, false) => None,
        };
    }
    match config.backplane {
        Some(BackplaneKind::Redis | BackplaneKind::Nats) => {}
        None => {
            return Err(Failure::Config(format!(
                "no backplane configured: set {} and {} (or {}), or pass --redis-url or --nats-url",
                env::BACKPLANE,
                env::REDIS_URL,
                env::NATS_URL
            )))
        }
        Some(other) => {
            return Err(Failure::Config(format!(
                "the backplane is `{other}`: only a redis or nats backplane can be reached from outside \
                 the process (--backplane)"
            )))
        }
    }
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::Timeout;
    use std::time::Duration;

    #[test]
    fn timeouts_parse_with_units() {
        let d = |s: &str| Duration::from(s.parse::<Timeout>().unwrap());
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("5s"), Duration::from_secs(5));
        assert_eq!(d("2"), Duration::from_secs(2));
        assert_eq!(d("1m"), Duration::from_secs(60));
        assert_eq!(d("0.5s"), Duration::from_millis(500));
        for bad in ["", "0", "-1s", "5h", "fast"] {
            assert!(bad.parse::<Timeout>().is_err(), "{bad}");
        }
    }
}
