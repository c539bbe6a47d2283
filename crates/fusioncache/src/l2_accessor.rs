//! The distributed-cache accessor: every L2 call of a cache goes through here, behind its circuit breaker,
//! with the envelope and the serializer applied in one place.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::circuit_breaker::CircuitBreaker;
use crate::error::Error;
use crate::events::CacheEvent;
use crate::l2::{l2_envelope_now_ms, DistributedCache, L2Envelope, L2Error};
use crate::options::EntryOptions;
use crate::serializer::Serializer;
use crate::telemetry::{Counters, Telemetry};

/// A value decoded from L2, with what its envelope says of its freshness.
pub(crate) struct L2Entry<V> {
    pub value: V,
    /// The write it came from (UTC ticks).
    pub timestamp: i64,
    /// Time left until its logical expiry (zero: expired, only usable as a fail-safe fallback).
    pub fresh_for: Duration,
    /// Time left until its fail-safe expiry.
    pub usable_for: Duration,
    /// Its tags.
    pub tags: Vec<String>,
    /// The states of its tags, once the cache has judged it against them.
    pub states: crate::l1::EntryTags,
}

/// What an L2 read found.
pub(crate) enum L2Read<V> {
    Found(L2Entry<V>),
    Missing,
    Failed(L2Error),
}

/// The L2 step of a change, kept as is for auto-recovery.
#[derive(Debug, Clone)]
pub(crate) enum L2Write {
    /// Store the envelope for `ttl`.
    Set { bytes: Bytes, ttl: Duration },
    /// Remove the entry.
    Remove,
}

/// The L2 of one cache: the store, the serializer of its values and the circuit breaker.
pub(crate) struct L2Accessor<V> {
    store: Arc<dyn DistributedCache>,
    serializer: Arc<dyn Serializer<V>>,
    breaker: CircuitBreaker,
    telemetry: Arc<Telemetry>,
    cache_name: Arc<str>,
}

impl<V> L2Accessor<V>
where
    V: Send + Sync + 'static,
{
    pub fn new(
        store: Arc<dyn DistributedCache>,
        serializer: Arc<dyn Serializer<V>>,
        breaker_duration: Duration,
        telemetry: Arc<Telemetry>,
        cache_name: Arc<str>,
    ) -> Self {
        Self {
            store,
            serializer,
            breaker: CircuitBreaker::new(breaker_duration),
            telemetry,
            cache_name,
        }
    }

    /// Closes the breaker (the backplane came back: L2 is likely back too).
    pub fn reset_breaker(&self) {
        if self.breaker.reset() {
            self.breaker_changed(false);
        }
    }

    /// Awaits an L2 call through the circuit breaker, recording failures. `Ok(true)` in the second slot
    /// says the breaker had been tripped and this call closed it (L2 is back). A `probe` (auto-recovery's
    /// paced retries) goes through an open breaker: it is how the cache learns that L2 is back.
    async fn call<T>(
        &self,
        key: Option<&str>,
        probe: bool,
        op: impl Future<Output = Result<T, L2Error>>,
    ) -> Result<(T, bool), L2Error> {
        if !probe && self.breaker.is_open() {
            return Err(L2Error::CircuitOpen);
        }
        self.outcome(key, op.await)
    }

    /// Records the outcome of an L2 call made elsewhere (in a pipeline with a notification): the breaker
    /// and the error counters. The flag says L2 just came back.
    pub fn outcome<T>(
        &self,
        key: Option<&str>,
        result: Result<T, L2Error>,
    ) -> Result<(T, bool), L2Error> {
        match result {
            Ok(v) => {
                let recovered = self.breaker.reset();
                if recovered {
                    self.breaker_changed(false);
                }
                Ok((v, recovered))
            }
            Err(e) => {
                if self.breaker.trip() {
                    self.breaker_changed(true);
                }
                self.record_error(key, &e);
                Err(e)
            }
        }
    }

    /// Whether the breaker lets calls through now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn is_usable(&self) -> bool {
        !self.breaker.is_open()
    }

    /// The store.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn store(&self) -> &dyn DistributedCache {
        self.store.as_ref()
    }

    fn breaker_changed(&self, open: bool) {
        let counters = &self.telemetry.counters;
        Counters::incr(if open {
            &counters.l2_breaker_opened
        } else {
            &counters.l2_breaker_closed
        });
        self.telemetry.emit(|| CacheEvent::CircuitBreaker {
            layer: crate::events::Layer::Distributed,
            open,
        });
    }

    pub fn record_error(&self, key: Option<&str>, error: &L2Error) {
        Counters::incr(&self.telemetry.counters.l2_errors);
        tracing::warn!(cache = %self.cache_name, key, %error, "distributed cache error");
        self.telemetry.emit(|| CacheEvent::L2Error {
            key,
            error: error.to_string(),
        });
    }

    /// The envelope stored at `key`, without deserializing the value. The flag says L2 just came back.
    pub async fn read_envelope(
        &self,
        key: &str,
        probe: bool,
    ) -> Result<(Option<L2Envelope>, bool), L2Error> {
        let (bytes, recovered) = self.call(Some(key), probe, self.store.get(key)).await?;
        let Some(bytes) = bytes else {
            return Ok((None, recovered));
        };
        match L2Envelope::decode(key, bytes) {
            Ok(env) => Ok((Some(env), recovered)),
            Err(e) => {
                tracing::warn!(cache = %self.cache_name, key, error = %e, "unreadable L2 entry ignored");
                self.record_error(Some(key), &e);
                Ok((None, recovered))
            }
        }
    }

    /// The envelopes stored at `keys`, in one round trip where the store allows it (auto-recovery's probe
    /// when `probe`). Unreadable envelopes count as missing.
    pub async fn read_envelopes(
        &self,
        keys: &[&str],
        probe: bool,
    ) -> Result<Vec<Option<L2Envelope>>, L2Error> {
        let (values, _) = self.call(None, probe, self.store.get_many(keys)).await?;
        Ok(keys
            .iter()
            .zip(values)
            .map(|(key, bytes)| bytes.and_then(|b| L2Envelope::decode(key, b).ok()))
            .collect())
    }

    /// Decodes the value of an envelope; a value that does not deserialize counts as missing.
    pub fn decode(&self, key: &str, env: L2Envelope) -> Option<L2Entry<V>> {
        match self.serializer.deserialize(&env.payload) {
            Ok(value) => {
                let now_ms = l2_envelope_now_ms();
                Some(L2Entry {
                    value,
                    timestamp: env.timestamp,
                    fresh_for: env.remaining(now_ms),
                    usable_for: env.fail_safe_remaining(now_ms),
                    tags: env.tags,
                    states: None,
                })
            }
            Err(e) => {
                let error = L2Error::Corrupt {
                    key: key.to_string(),
                    reason: e.to_string(),
                };
                tracing::warn!(cache = %self.cache_name, key, %error, "unreadable L2 entry ignored");
                self.record_error(Some(key), &error);
                None
            }
        }
    }

    /// Reads and decodes `key`. The flag says L2 just came back after failures.
    pub async fn read(&self, key: &str) -> (L2Read<V>, bool) {
        match self.read_envelope(key, false).await {
            Ok((Some(env), recovered)) => match self.decode(key, env) {
                Some(entry) if !entry.usable_for.is_zero() => (L2Read::Found(entry), recovered),
                _ => (L2Read::Missing, recovered),
            },
            Ok((None, recovered)) => (L2Read::Missing, recovered),
            Err(e) => (L2Read::Failed(e), false),
        }
    }

    /// The L2 step of writing `value` at `timestamp` with `options`: the envelope and its TTL.
    pub fn encode(
        &self,
        value: &V,
        timestamp: i64,
        options: &EntryOptions,
    ) -> Result<L2Write, Error> {
        let payload = self.serializer.serialize(value)?;
        let now_ms = l2_envelope_now_ms();
        let duration = options.duration;
        let ttl = if options.fail_safe {
            options.fail_safe_max_duration.max(duration)
        } else {
            duration
        };
        let logical = now_ms.saturating_add(duration.as_millis() as i64);
        let usable = now_ms.saturating_add(ttl.as_millis() as i64);
        let bytes = L2Envelope::encode(logical, usable, timestamp, &options.tags, &payload);
        Ok(L2Write::Set {
            bytes: Bytes::from(bytes),
            ttl,
        })
    }

    /// Applies an L2 step (a `probe` ignores the breaker). The flag says L2 just came back after failures.
    pub async fn write(&self, key: &str, write: &L2Write, probe: bool) -> Result<bool, L2Error> {
        let (_, recovered) = match write {
            L2Write::Set { bytes, ttl } => {
                self.call(Some(key), probe, self.store.set(key, bytes.clone(), *ttl))
                    .await?
            }
            L2Write::Remove => self.call(Some(key), probe, self.store.remove(key)).await?,
        };
        Ok(recovered)
    }
}

/// The L2 step of a tag removal or clear at `timestamp`: an entry holding the timestamp, kept for
/// `retention`.
pub(crate) fn timestamp_entry(timestamp: i64, retention: Duration) -> L2Write {
    let until = l2_envelope_now_ms().saturating_add(retention.as_millis() as i64);
    let bytes = L2Envelope::encode(
        until,
        until,
        timestamp,
        &[] as &[&str],
        &timestamp.to_le_bytes(),
    );
    L2Write::Set {
        bytes: Bytes::from(bytes),
        ttl: retention,
    }
}
