//! Building a cache.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::auto_recovery::AutoRecovery;
use crate::backplane::{channel_name, Backplane};
use crate::backplane_accessor::BackplaneAccessor;
use crate::cache::{FusionCache, Inner};
use crate::error::Error;
use crate::events::{CacheEvent, EventListener};
use crate::factory::KeyLocks;
use crate::guard::KeyGuard;
use crate::l1::L1;
use crate::l2::DistributedCache;
use crate::l2_accessor::L2Accessor;
use crate::options::{CacheOptions, EntryOptions};
use crate::serializer::{JsonSerializer, Serializer};
use crate::tags::Tags;
use crate::telemetry::Telemetry;

/// A distributed cache and the serializer of its values.
type L2Parts<V> = (Arc<dyn DistributedCache>, Arc<dyn Serializer<V>>);

/// Builds a [`FusionCache`]: name, L1 capacity, default entry options, L2, backplane, listeners.
///
/// ```
/// use std::time::Duration;
/// use fusioncache::{EntryOptions, FusionCache, backplane::MemoryBackplane, l2::MemoryDistributedCache};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), fusioncache::Error> {
/// let cache: FusionCache<String> = FusionCache::builder()
///     .name("products")
///     .channel_prefix("shop.prod.products")
///     .max_capacity(10_000)
///     .l1_max_duration(Duration::from_secs(300))
///     .default_entry_options(EntryOptions::new().duration(Duration::from_secs(60)).fail_safe(true))
///     .distributed_cache(MemoryDistributedCache::new())
///     .backplane(MemoryBackplane::new())
///     .build()?;
/// assert_eq!(cache.channel(), "shop.prod.products.Backplane:v2");
/// # Ok(()) }
/// ```
#[must_use]
pub struct FusionCacheBuilder<V> {
    options: CacheOptions,
    entry_options: EntryOptions,
    l2: Option<L2Parts<V>>,
    backplane: Option<Arc<dyn Backplane>>,
    listeners: Vec<EventListener>,
    /// Which of name / channel prefix were set explicitly (they win over injected configuration).
    explicit_name: bool,
    explicit_channel_prefix: bool,
    /// No subscription at all (the publish-only handle).
    pub(crate) publish_only: bool,
}

impl<V> Default for FusionCacheBuilder<V>
where
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<V> FusionCacheBuilder<V>
where
    V: Clone + Send + Sync + 'static,
{
    /// A builder with the defaults: name `FusionCache`, 100 000 L1 entries, no L2, no backplane.
    pub fn new() -> Self {
        Self {
            options: CacheOptions::default(),
            entry_options: EntryOptions::default(),
            l2: None,
            backplane: None,
            listeners: Vec::new(),
            explicit_name: false,
            explicit_channel_prefix: false,
            publish_only: false,
        }
    }

    /// The cache name (the default channel prefix).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.options.name = name.into();
        self.explicit_name = true;
        self
    }

    /// Overrides the cache name as the prefix of the backplane channel (e.g. to separate environments
    /// sharing one Redis).
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.options.channel_prefix = Some(prefix.into()).filter(|p: &String| !p.is_empty());
        self.explicit_channel_prefix = true;
        self
    }

    /// The most entries L1 holds.
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.options.l1_max_capacity = entries;
        self
    }

    /// A hard cap on every L1 freshness: bounds what a silently lost notification can cost.
    pub fn l1_max_duration(mut self, cap: Duration) -> Self {
        self.options.l1_max_duration = Some(cap);
        self
    }

    /// The entry options of operations given none.
    pub fn default_entry_options(mut self, options: EntryOptions) -> Self {
        self.entry_options = options;
        self
    }

    /// Whether a reconnection marks every L1 entry stale (default `true`).
    pub fn mark_stale_on_reconnect(mut self, enabled: bool) -> Self {
        self.options.mark_stale_on_reconnect = enabled;
        self
    }

    /// While the backplane is down, L1 entries older than this are revalidated before being served
    /// (default zero: every read while disconnected checks L2 first).
    pub fn disconnected_l1_max_age(mut self, age: Duration) -> Self {
        self.options.disconnected_l1_max_age = age;
        self
    }

    /// The most distributed operations queued for auto-recovery (default 10 000).
    pub fn auto_recovery_max_items(mut self, items: usize) -> Self {
        self.options.auto_recovery_max_items = items.max(1);
        self
    }

    /// How long auto-recovery waits before retrying a failed L2 write or publish (default 2 s; see
    /// [`CacheOptions::auto_recovery_delay`]).
    pub fn auto_recovery_delay(mut self, delay: Duration) -> Self {
        self.options.auto_recovery_delay = delay;
        self
    }

    /// How long publishes skip the transport after a failed one (default 1 s).
    pub fn backplane_circuit_breaker_duration(mut self, duration: Duration) -> Self {
        self.options.backplane_circuit_breaker_duration = duration;
        self
    }

    /// How long L2 is skipped after an error (default 1 s; zero: never skipped).
    pub fn l2_circuit_breaker_duration(mut self, duration: Duration) -> Self {
        self.options.l2_circuit_breaker_duration = duration;
        self
    }

    /// The longest any entry stays in L1 memory, fail-safe window included (default 24 h).
    pub fn l1_max_retention(mut self, retention: Duration) -> Self {
        self.options.l1_max_retention = retention;
        self
    }

    /// What a tag removal does to the entries carrying the tag (default: expire them, so they remain
    /// fail-safe fallbacks).
    pub fn remove_by_tag_behavior(mut self, behavior: crate::tags::RemoveByTagBehavior) -> Self {
        self.options.remove_by_tag_behavior = behavior;
        self
    }

    /// How long tag removal and clear timestamps are kept in L2 (default 7 days; see
    /// [`CacheOptions::tag_retention`]).
    pub fn tag_retention(mut self, retention: Duration) -> Self {
        self.options.tag_retention = retention;
        self
    }

    /// Publish-only: this node's changes are still sent to the others, but their notifications are not
    /// applied here (FusionCache's `IgnoreIncomingBackplaneNotifications`).
    pub fn ignore_incoming_notifications(mut self, ignore: bool) -> Self {
        self.options.ignore_incoming_notifications = ignore;
        self
    }

    /// The whole set of cache options at once.
    pub fn options(mut self, options: CacheOptions) -> Self {
        self.options = options;
        self
    }

    /// A distributed cache (L2), with values serialized as JSON.
    pub fn distributed_cache(self, l2: impl DistributedCache) -> Self
    where
        V: Serialize + DeserializeOwned,
    {
        self.distributed_cache_with_serializer(Arc::new(l2), Arc::new(JsonSerializer::<V>::new()))
    }

    /// A distributed cache (L2) shared with other caches, with an explicit serializer.
    pub fn distributed_cache_with_serializer(
        mut self,
        l2: Arc<dyn DistributedCache>,
        serializer: Arc<dyn Serializer<V>>,
    ) -> Self {
        self.l2 = Some((l2, serializer));
        self
    }

    /// A backplane.
    pub fn backplane(self, backplane: impl Backplane) -> Self {
        self.shared_backplane(Arc::new(backplane))
    }

    /// A backplane shared with other caches of the process (one connection for all).
    pub fn shared_backplane(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// Calls `listener` with every event of the cache. Keep it fast: it runs inline.
    pub fn on_event(mut self, listener: impl Fn(&CacheEvent<'_>) + Send + Sync + 'static) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Fills in what was not set explicitly from injected configuration (see [`crate::config`]): the name,
    /// the channel prefix, the distributed cache and the backplane. Connections are shared by every cache
    /// of the process configured with the same endpoint.
    ///
    /// ```
    /// use fusioncache::{FusionCache, config::FusionCacheConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), fusioncache::Error> {
    /// let config = FusionCacheConfig::from_yaml("cacheName: products\nbackplane: memory\ndistributedCache: memory\n")?;
    /// let cache: FusionCache<String> = FusionCache::builder().with_config(&config).await?.build()?;
    /// assert_eq!(cache.channel(), "products.Backplane:v2");
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub async fn with_config(
        mut self,
        config: &crate::config::FusionCacheConfig,
    ) -> Result<Self, Error>
    where
        V: Serialize + DeserializeOwned,
    {
        config.validate()?;
        if !self.explicit_name {
            if let Some(name) = &config.cache_name {
                self.options.name = name.clone();
            }
        }
        if !self.explicit_channel_prefix {
            if let Some(prefix) = config.channel_prefix.as_ref().filter(|p| !p.is_empty()) {
                self.options.channel_prefix = Some(prefix.clone());
            }
        }
        if self.l2.is_none() {
            if let Some(store) = crate::connect::distributed_cache(config)? {
                self.l2 = Some((store, Arc::new(JsonSerializer::<V>::new())));
            }
        }
        if self.backplane.is_none() {
            self.backplane = crate::connect::backplane(config).await?;
        }
        Ok(self)
    }

    /// [`with_config`](Self::with_config) with the configuration of this process:
    /// [`FusionCacheConfig::load`](crate::config::FusionCacheConfig::load) (environment variables, Service
    /// Binding, `FUSIONCACHE_CONFIG` file).
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub async fn with_injected_config(self) -> Result<Self, Error>
    where
        V: Serialize + DeserializeOwned,
    {
        let config = crate::config::FusionCacheConfig::load()?;
        self.with_config(&config).await
    }

    /// Builds the cache. With a backplane, this must run inside a Tokio runtime (it starts the receive
    /// task) and fails when the transport rejects the channel name.
    pub fn build(self) -> Result<FusionCache<V>, Error> {
        let options = self.options;
        let channel = channel_name(options.channel_prefix.as_deref(), Some(&options.name));
        let instance_id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
        let cache_name: Arc<str> = options.name.as_str().into();
        let telemetry = Arc::new(Telemetry::new(self.listeners, &options.name));
        let l2 = self.l2.map(|(store, serializer)| {
            L2Accessor::new(
                store,
                serializer,
                options.l2_circuit_breaker_duration,
                telemetry.clone(),
                cache_name.clone(),
            )
        });
        let subscription = match &self.backplane {
            Some(backplane) if self.publish_only => {
                backplane.validate_channel(&channel)?;
                None
            }
            Some(backplane) => {
                tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
                backplane.validate_channel(&channel)?;
                Some(backplane.subscribe(&channel)?)
            }
            None => None,
        };
        let backplane = self.backplane.map(|backplane| {
            BackplaneAccessor::new(
                backplane,
                channel.clone(),
                instance_id.clone(),
                options.backplane_circuit_breaker_duration,
                telemetry.clone(),
            )
        });
        let guard = Arc::new(KeyGuard::default());
        let recovery = Arc::new(AutoRecovery::new(
            options.auto_recovery_max_items,
            options.auto_recovery_delay,
            options.auto_recovery_max_delay,
            guard.clone(),
            telemetry.clone(),
        ));
        let inner = Arc::new(Inner {
            l1: L1::new(
                options.l1_max_capacity,
                options.l1_max_retention,
                options.l1_max_duration,
                Tags::new(options.remove_by_tag_behavior),
            ),
            options,
            default_entry_options: self.entry_options,
            instance_id,
            channel,
            l2,
            backplane,
            recovery,
            guard,
            telemetry,
            key_locks: KeyLocks::default(),
            tasks: Mutex::new(Vec::new()),
            recovery_started: std::sync::Once::new(),
            publisher: std::sync::OnceLock::new(),
            refresher: std::sync::OnceLock::new(),
        });
        if let Some(subscription) = subscription {
            let task = crate::backplane_accessor::spawn_receiver(&inner, subscription);
            inner
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
        Ok(FusionCache { inner })
    }
}
