//! # fusioncache
//!
//! A hybrid cache for services that run many replicas: every node keeps an in-memory **L1** (moka) in front
//! of an optional shared **L2** (Redis), and a **backplane** (Redis pub/sub, NATS, or in-process) tells the
//! other nodes *that* a key changed, so nobody keeps serving an old value until it expires.
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
//! Features: `redis` (Redis L2 and pub/sub backplane) and `nats` (NATS backplane), both on by default; the
//! core builds with neither.
#![warn(missing_docs)]

mod auto_recovery;
pub mod backplane;
mod backplane_accessor;
mod builder;
mod cache;
mod circuit_breaker;
pub mod config;
mod connect;
mod error;
pub mod events;
mod factory;
mod guard;
mod l1;
pub mod l2;
mod l2_accessor;
mod options;
mod reads;
#[cfg(feature = "redis")]
pub mod redis;
pub mod serializer;
mod tags;
#[cfg(feature = "testing")]
pub mod testing;
mod writes;

pub use builder::FusionCacheBuilder;
pub use cache::{BackplaneState, FusionCache};
pub use error::Error;
pub use factory::FactoryContext;
pub use options::{CacheOptions, EntryOptions};
pub use tags::RemoveByTagBehavior;

/// The cache name used when none is configured (as in FusionCache).
pub const DEFAULT_CACHE_NAME: &str = "FusionCache";
