//! # fusioncache
//!
//! A hybrid cache for services that run many replicas: every node keeps an in-memory **L1** (quick_cache)
//! in front of an optional shared **L2** (Redis), and a **backplane** (Redis pub/sub, NATS, or in-process)
//! tells the other nodes *that* a key changed, so nobody keeps serving an old value until it expires.
//!
//! It speaks the wire format of .NET [FusionCache](https://github.com/ZiggyCreatures/FusionCache)'s
//! backplane, so Rust and .NET services can share one channel.
//!
//! ```
//! use std::time::Duration;
//! use fusioncache::{EntryOptions, FusionCache};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), fusioncache::Error> {
//! let cache: FusionCache<String> = FusionCache::builder()
//!     .name("products")
//!     .default_entry_options(EntryOptions::new().duration(Duration::from_secs(60)))
//!     .build()?;
//!
//! cache.set("product:42", "Rust in Action".to_string()).await?;
//! assert_eq!(cache.get("product:42").await.as_deref(), Some("Rust in Action"));
//!
//! // One factory run per key and node, however many callers ask at once.
//! let v = cache
//!     .get_or_set("product:7", || async { Ok::<_, std::io::Error>("Programming Rust".to_string()) })
//!     .await?;
//! assert_eq!(v, "Programming Rust");
//! # Ok(()) }
//! ```
//!
//! Features: `config` (the injected configuration: [`config`], `FusionCacheBuilder::with_config` and
//! `with_injected_config`), `redis` (Redis L2 and pub/sub backplane) and `nats` (NATS backplane), all on by
//! default; the core builds with none of them.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// rust-version 1.89 turns this lint on; `events.rs` and `backplane/redis.rs` still write `n % k == 0`.
// Remove once they use `is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

mod auto_recovery;
pub mod backplane;
mod backplane_accessor;
mod builder;
mod cache;
mod circuit_breaker;
mod clock;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;
#[cfg(feature = "config")]
mod connect;
mod error;
pub mod events;
mod factory;
mod guard;
mod l1;
pub mod l2;
mod l2_accessor;
mod notifier;
mod options;
mod reads;
#[cfg(any(feature = "config", feature = "nats"))]
mod redact;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod serializer;
mod tags;
mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
mod writes;

pub use builder::FusionCacheBuilder;
pub use cache::{BackplaneState, FusionCache};
pub use error::{BoxError, Error};
pub use factory::FactoryContext;
pub use notifier::{CacheNotifier, CacheNotifierBuilder};
pub use options::{CacheOptions, EntryOptions};
pub use tags::RemoveByTagBehavior;

/// The README's examples, compiled as doctests so that they cannot rot.
#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

/// The cache name used when none is configured (as in FusionCache).
pub const DEFAULT_CACHE_NAME: &str = "FusionCache";
