//! Sending changes to a cache's nodes from outside, through the library's publish-only
//! [`CacheNotifier`].
//!
//! The notifier is built from the configuration the command resolved, so with a distributed cache (L2)
//! configured each change does its L2 step first, exactly as a node of the cache would (remove and
//! expire delete the L2 entry; clear and remove-by-tag write their timestamp entry), then publishes.
//! `--no-l2` drops the L2 from the configuration: notifications only.

use std::fmt;
use std::time::Duration;

use clap::Args;
use fusioncache::backplane::BackplaneError;
use fusioncache::config::{DistributedCacheKind, FusionCacheConfig};
use fusioncache::redis::{RedisConnection, RedisOptions};
use fusioncache::{CacheNotifier, Error};

use crate::transport::Transport;
use crate::Failure;

/// The flags of the commands that send changes.
#[derive(Debug, Args)]
pub struct Steps {
    /// Send the notifications only: do not write the distributed cache (L2) even when one is
    /// configured.
    #[arg(long)]
    pub no_l2: bool,
}

/// One change, as a node of the cache would make it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Delete the L2 entry, then tell the nodes to evict the key.
    Remove(String),
    /// Delete the L2 entry, then tell the nodes to mark their copy stale.
    Expire(String),
    /// Tell the nodes the key was written (L2 is the sender's business).
    Set(String),
    /// Write the clear timestamp (`__fc:t:*` to expire all, `__fc:t:!` to remove all), then announce it.
    Clear {
        /// Expire all (entries stay usable as fail-safe fallbacks) rather than remove all.
        allow_fail_safe: bool,
    },
    /// Write the tag's removal timestamp (`__fc:t:{tag}`), then announce it.
    RemoveByTag(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Remove(key) => write!(f, "remove `{key}`"),
            Change::Expire(key) => write!(f, "expire `{key}`"),
            Change::Set(key) => write!(f, "set `{key}`"),
            Change::Clear {
                allow_fail_safe: true,
            } => f.write_str("clear (expire all)"),
            Change::Clear {
                allow_fail_safe: false,
            } => f.write_str("clear (remove all)"),
            Change::RemoveByTag(tag) => write!(f, "remove-by-tag `{tag}`"),
        }
    }
}

impl Change {
    /// Whether the change has an L2 step (all but `set`: whoever wrote the value wrote L2).
    fn writes_l2(&self) -> bool {
        !matches!(self, Change::Set(_))
    }

    async fn send(&self, notifier: &CacheNotifier) -> Result<(), Error> {
        match self {
            Change::Remove(key) => notifier.remove(key).await,
            Change::Expire(key) => notifier.expire(key).await,
            Change::Set(key) => notifier.notify_set(key).await,
            Change::Clear { allow_fail_safe } => notifier.clear(*allow_fail_safe).await,
            Change::RemoveByTag(tag) => notifier.remove_by_tag(tag).await,
        }
    }
}

/// Sends `changes` one after the other, each bounded by `timeout`; stops at the first failure. What
/// was published before is flushed to the server either way.
pub async fn send(
    transport: &Transport,
    config: &FusionCacheConfig,
    steps: &Steps,
    timeout: Duration,
    changes: &[Change],
) -> Result<(), Failure> {
    let mut config = config.clone();
    if steps.no_l2 {
        config.distributed_cache = Some(DistributedCacheKind::None);
    }
    let l2 = describe_l2(&config)?;
    // Before any L2 step: a change must not stop halfway for want of a transport.
    transport.ready(&config.channel()?, timeout).await?;
    let notifier = CacheNotifier::builder()
        .shared_backplane(transport.shared())
        .with_config(&config)
        .await
        .and_then(|builder| builder.build())
        .map_err(setup_failure)?;
    let mut result = Ok(());
    for (done, change) in changes.iter().enumerate() {
        let l2 = l2.as_deref().filter(|_| change.writes_l2());
        let failure = match tokio::time::timeout(timeout, change.send(&notifier)).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => step_failure(e, l2, &notifier, transport),
            Err(_) => format!(
                "did not complete within {timeout:?}: {}notification on {} via {}",
                l2.map(|l2| format!("L2 step on {l2}, then "))
                    .unwrap_or_default(),
                notifier.channel(),
                transport.describe()
            ),
        };
        let before = match done {
            0 => String::new(),
            n => format!(" (the {n} change(s) before it were sent)"),
        };
        result = Err(Failure::Transport(format!("{change}: {failure}{before}")));
        break;
    }
    let flushed = tokio::time::timeout(timeout, transport.flush())
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Transport(format!(
                "flushing to {} did not complete within {timeout:?}",
                transport.describe()
            )))
        });
    result.and(flushed)
}

/// The L2 the changes go through, for messages (endpoint and key prefix, never credentials).
fn describe_l2(config: &FusionCacheConfig) -> Result<Option<String>, Failure> {
    match config.effective_distributed_cache() {
        DistributedCacheKind::Redis => {
            let r = config.redis.clone().unwrap_or_default();
            // Parsed again only for its `host:port db N`; `with_config` reports a bad URL (redacted).
            let endpoint = r
                .url
                .as_deref()
                .and_then(|url| {
                    RedisConnection::open_parts(
                        url,
                        r.database,
                        None,
                        None,
                        RedisOptions::default(),
                    )
                    .ok()
                })
                .map(|c| c.endpoint().to_string())
                .unwrap_or_else(|| "(invalid URL)".into());
            let prefix = match config.key_prefix.as_deref() {
                None | Some("") => String::new(),
                Some(prefix) => format!(" (key prefix `{prefix}`)"),
            };
            Ok(Some(format!("redis {endpoint}{prefix}")))
        }
        DistributedCacheKind::Memory => Err(Failure::Config(
            "the distributed cache is `memory`, which lives inside one process and cannot be \
             reached from outside: configure the cache's Redis, or pass --no-l2"
                .into(),
        )),
        _ => Ok(None),
    }
}

/// A failure of building the notifier: the configuration (exit 2) unless a transport answered.
fn setup_failure(e: Error) -> Failure {
    match e {
        Error::Config(_)
        | Error::Backplane(BackplaneError::InvalidChannel { .. } | BackplaneError::Config(_)) => {
            Failure::Config(e.to_string())
        }
        other => Failure::Transport(other.to_string()),
    }
}

/// What failed in a change: its L2 step (then nothing was published) or its notification.
fn step_failure(
    e: Error,
    l2: Option<&str>,
    notifier: &CacheNotifier,
    transport: &Transport,
) -> String {
    match e {
        Error::L2(e) => format!(
            "the L2 step on {} failed, so no notification was sent: {e}",
            l2.unwrap_or("the distributed cache")
        ),
        Error::Backplane(e) => format!(
            "{}publishing on {} ({}) failed: {e}",
            if l2.is_some() {
                "the L2 step was done, but "
            } else {
                ""
            },
            notifier.channel(),
            transport.describe()
        ),
        other => other.to_string(),
    }
}
