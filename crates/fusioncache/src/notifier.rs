//! A publish-only handle: tells the nodes of a cache — this app's or another app's — that keys changed,
//! without an L1 of its own and without listening to the channel (FusionCache #188, #452).
//!
//! With a distributed cache configured (the one the target cache uses, same key prefix), each operation
//! does the L2 step first, exactly as a node of that cache would: `remove` and `expire` delete the L2
//! entry, `clear` and `remove_by_tag` write their timestamp entry. Then it publishes one FusionCache v0
//! message. Every call waits for both steps and returns the first error; what failed is also queued for
//! auto-recovery while the handle lives.
//!
//! ```
//! use fusioncache::{CacheNotifier, FusionCache, backplane::MemoryBackplane};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), fusioncache::Error> {
//! let bus = MemoryBackplane::new();
//! let products: FusionCache<String> = FusionCache::builder().name("products").backplane(bus.clone()).build()?;
//! products.wait_for_backplane(std::time::Duration::from_secs(1)).await;
//! products.set("product:42", "old".to_string()).await?;
//!
//! // Another app, with no cache of its own, invalidates a key of `products`.
//! let notifier = CacheNotifier::builder().name("products").backplane(bus).build()?;
//! notifier.remove("product:42").await?;
//! # for _ in 0..100 { if products.peek("product:42").is_none() { break } tokio::time::sleep(std::time::Duration::from_millis(5)).await }
//! assert_eq!(products.peek("product:42"), None);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::backplane::{now_ticks, Action, Backplane};
use crate::cache::{FusionCache, Inner};
use crate::error::Error;
use crate::l2::DistributedCache;
use crate::options::EntryOptions;
use crate::FusionCacheBuilder;

/// A publish-only handle: sends notifications on a cache's channel, with the L2 step first when an L2 is
/// configured, without an L1 of its own and without listening to the channel.
#[derive(Clone, Debug)]
pub struct CacheNotifier {
    cache: FusionCache<()>,
    options: EntryOptions,
}

/// Builds a [`CacheNotifier`]: the target cache's name or channel prefix, a transport, optionally its L2.
#[must_use]
pub struct CacheNotifierBuilder {
    inner: FusionCacheBuilder<()>,
}

impl CacheNotifier {
    /// A builder.
    pub fn builder() -> CacheNotifierBuilder {
        let mut inner = FusionCacheBuilder::new().max_capacity(0);
        inner.publish_only = true;
        CacheNotifierBuilder { inner }
    }

    /// The channel the notifications go to.
    pub fn channel(&self) -> &str {
        self.cache.channel()
    }

    /// The instance id the notifications carry.
    pub fn instance_id(&self) -> &str {
        self.cache.instance_id()
    }

    /// Removes `key` from L2 (if configured) and tells every node to evict it.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        self.cache.remove_with(key, &self.options).await
    }

    /// Removes `key` from L2 (if configured) and tells every node to mark its copy expired (kept as a
    /// fail-safe fallback where fail-safe is on).
    pub async fn expire(&self, key: &str) -> Result<(), Error> {
        self.cache.expire_with(key, &self.options).await
    }

    /// Tells every node that `key` was set (by someone who wrote L2 itself): nodes holding an older copy
    /// mark it stale and reload it from L2.
    pub async fn notify_set(&self, key: &str) -> Result<(), Error> {
        let inner = &self.cache.inner;
        let timestamp = now_ticks();
        let hold = inner.guard.hold(key, Some(timestamp));
        Inner::distribute(inner, hold, Action::Set, timestamp, None, &self.options).await
    }

    /// Clears the cache on every node (see [`FusionCache::clear_with`]).
    pub async fn clear(&self, allow_fail_safe: bool) -> Result<(), Error> {
        self.cache.clear_with(allow_fail_safe).await
    }

    /// Removes the entries carrying `tag` on every node (see [`FusionCache::remove_by_tag`]).
    pub async fn remove_by_tag(&self, tag: &str) -> Result<(), Error> {
        self.cache.remove_by_tag(tag).await
    }

    /// [`remove_by_tag`](Self::remove_by_tag) for several tags.
    pub async fn remove_by_tags<T: AsRef<str>>(
        &self,
        tags: impl IntoIterator<Item = T>,
    ) -> Result<(), Error> {
        self.cache.remove_by_tags(tags).await
    }
}

impl CacheNotifierBuilder {
    /// The target cache's name (its channel, unless a channel prefix is given).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.inner = self.inner.name(name);
        self
    }

    /// The target cache's channel prefix.
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.inner = self.inner.channel_prefix(prefix);
        self
    }

    /// The transport to send on.
    pub fn backplane(mut self, backplane: impl Backplane) -> Self {
        self.inner = self.inner.backplane(backplane);
        self
    }

    /// A transport shared with other caches of the process.
    pub fn shared_backplane(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.inner = self.inner.shared_backplane(backplane);
        self
    }

    /// The target cache's L2, so that each operation does its L2 step first.
    pub fn distributed_cache(mut self, l2: impl DistributedCache) -> Self {
        self.inner = self.inner.distributed_cache(l2);
        self
    }

    /// How long tag removal and clear timestamps are kept in L2 (as the target cache's
    /// [`tag_retention`](crate::CacheOptions::tag_retention)).
    pub fn tag_retention(mut self, retention: Duration) -> Self {
        self.inner = self.inner.tag_retention(retention);
        self
    }

    /// Fills in what was not set explicitly from injected configuration, as
    /// [`FusionCacheBuilder::with_config`] does.
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub async fn with_config(
        mut self,
        config: &crate::config::FusionCacheConfig,
    ) -> Result<Self, Error> {
        self.inner = self.inner.with_config(config).await?;
        Ok(self)
    }

    /// Builds the handle (inside a Tokio runtime).
    pub fn build(self) -> Result<CacheNotifier, Error> {
        let options = EntryOptions::new()
            .fail_safe(true)
            .background_backplane_operations(false)
            .surface_l2_errors(true);
        let options = EntryOptions {
            surface_backplane_errors: true,
            ..options
        };
        Ok(CacheNotifier {
            cache: self.inner.default_entry_options(options.clone()).build()?,
            options,
        })
    }
}
