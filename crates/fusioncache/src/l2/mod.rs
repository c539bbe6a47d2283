//! The distributed (L2) cache: a byte store with TTL shared by every node.
//!
//! [`DistributedCache`] is the trait; [`MemoryDistributedCache`] is an in-process implementation (tests,
//! demos) and `RedisDistributedCache` (feature `redis`) the production one. The cache stores each value in
//! an envelope that carries its metadata (logical expiry, fail-safe window, write timestamp), so that a node
//! reading it from L2 knows how fresh it is.

mod envelope;
mod memory;
#[cfg(feature = "redis")]
pub mod redis;

use std::time::Duration;

use bytes::Bytes;

pub(crate) use envelope::{unix_ms_now as l2_envelope_now_ms, L2Envelope};
pub use memory::MemoryDistributedCache;

/// An error of a distributed cache.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum L2Error {
    /// The store could not be reached or answered with an error.
    #[error("distributed cache unavailable: {0}")]
    Unavailable(String),
    /// A stored entry is not in the expected format.
    #[error("distributed cache entry for `{key}` is corrupt: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The circuit breaker is open after recent errors; L2 is skipped for now.
    #[error("distributed cache circuit breaker is open")]
    CircuitOpen,
    /// The operation took longer than the hard timeout of the entry options.
    #[error("distributed cache did not answer within {0:?}")]
    Timeout(Duration),
}

/// A byte store with per-entry TTL, shared by every node of a cache.
///
/// Keys are the cache keys; an implementation may add its own prefix.
#[async_trait::async_trait]
pub trait DistributedCache: Send + Sync + 'static {
    /// The bytes stored at `key`, if any and not expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, L2Error>;
    /// Stores `value` at `key` for `ttl`.
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), L2Error>;
    /// Removes `key`.
    async fn remove(&self, key: &str) -> Result<(), L2Error>;
    /// This store as the crate's Redis L2, when it is one: the cache then sends an awaited notification in
    /// the same pipeline as its L2 write when its backplane uses the same connection.
    #[cfg(feature = "redis")]
    #[doc(hidden)]
    fn as_redis(&self) -> Option<&redis::RedisDistributedCache> {
        None
    }

    /// The bytes stored at each of `keys`, in order (one round trip where the store allows it; the
    /// default reads them one by one).
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, L2Error> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            values.push(self.get(key).await?);
        }
        Ok(values)
    }
}
