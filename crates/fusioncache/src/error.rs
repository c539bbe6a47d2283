//! The error type of cache operations.

use std::time::Duration;

use crate::backplane::BackplaneError;
#[cfg(feature = "config")]
use crate::config::ConfigError;
use crate::l2::L2Error;
use crate::serializer::SerializerError;

/// The boxed error a factory returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of a cache operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The factory of `get_or_set` failed and no fail-safe value could stand in.
    #[error("factory for key `{key}` failed: {source}")]
    Factory {
        /// The key.
        key: String,
        /// The factory's error.
        #[source]
        source: BoxError,
    },
    /// The factory ran past its hard timeout and no fail-safe value could stand in.
    #[error("factory for key `{key}` timed out after {timeout:?}")]
    FactoryTimeout {
        /// The key.
        key: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The factory task panicked or was cancelled.
    #[error("factory for key `{key}` did not complete: {reason}")]
    FactoryAborted {
        /// The key.
        key: String,
        /// What happened.
        reason: String,
    },
    /// The distributed cache failed. The L1 was still updated and the other nodes still notified.
    #[error("distributed cache error: {0}")]
    L2(#[from] L2Error),
    /// A value could not be serialized for, or deserialized from, the distributed cache.
    #[error("serialization error: {0}")]
    Serialization(#[from] SerializerError),
    /// The backplane could not be set up (e.g. an invalid channel name).
    #[error(transparent)]
    Backplane(#[from] BackplaneError),
    /// The cache could not be configured.
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Building the cache needs a Tokio runtime (for the backplane task) and none is running.
    #[error("a backplane needs a Tokio runtime: build the cache from within one")]
    NoRuntime,
}
