//! The Redis distributed cache (feature `redis`).

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;

use super::{DistributedCache, L2Error};
use crate::redis::RedisConnection;

/// A [`DistributedCache`] on Redis: `GET`, `MGET`, a conditional `SET … PX` (see below), `UNLINK`, in the
/// connection's database, every key under an optional prefix (`{key_prefix}{key}`).
///
/// A write of one of the cache's entries replaces what is stored only if that is not a newer write (by
/// the write timestamps the entries carry), in one server-side script: a write that reaches Redis late —
/// held in a stalled server's buffer, or by a network that delivers it after a partition, long after the
/// client gave up on it — cannot undo a newer one. (Other bytes are written with a plain `SET`.)
///
/// ```no_run
/// use fusioncache::{FusionCache, l2::redis::RedisDistributedCache, redis::RedisConnection};
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisConnection::open("redis://127.0.0.1:6379/3")?; // database 3
/// let cache: FusionCache<String> = FusionCache::builder()
///     .distributed_cache(RedisDistributedCache::new(redis).key_prefix("shop:"))
///     .build()?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisDistributedCache {
    connection: RedisConnection,
    key_prefix: String,
}

impl RedisDistributedCache {
    /// A distributed cache on `connection` (its database index), without key prefix.
    pub fn new(connection: RedisConnection) -> Self {
        Self {
            connection,
            key_prefix: String::new(),
        }
    }

    /// Puts every key under `prefix` (several caches or apps can then share one database; see also
    /// [`purge`](Self::purge)).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.key_prefix.len() + key.len());
        k.push_str(&self.key_prefix);
        k.push_str(key);
        k
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, L2Error> {
        self.connection.manager().await.map_err(unavailable)
    }

    /// Physically deletes every key under this cache's key prefix (`SCAN MATCH {prefix}*` + `UNLINK`), and
    /// returns how many. Refuses an empty prefix: without one, the keys of the cache cannot be told from
    /// anyone else's in the database.
    ///
    /// `clear` does not need this (it is a timestamp, O(1)); use it to reclaim memory, e.g. after a
    /// `clear`. It costs O(keys in the database), and an ACL user provisioned by the operator is not
    /// allowed `SCAN` (it would reveal other apps' key names).
    pub async fn purge(&self) -> Result<u64, L2Error> {
        if self.key_prefix.is_empty() {
            return Err(L2Error::Unavailable(
                "refusing to purge without a key prefix: every key of the database would match"
                    .into(),
            ));
        }
        let mut conn = self.conn().await?;
        let pattern = format!("{}*", glob_escape(&self.key_prefix));
        let (mut cursor, mut removed) = (0u64, 0u64);
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                removed += redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async::<u64>(&mut conn)
                    .await
                    .map_err(unavailable)?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

fn unavailable(e: redis::RedisError) -> L2Error {
    L2Error::Unavailable(e.to_string())
}

/// Escapes the glob characters of a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Stores `ARGV[1]` at `KEYS[1]` for `ARGV[2]` ms unless the entry there carries a newer write timestamp
/// than `ARGV[3]` (8 bytes, big-endian, so that bytes compare as the numbers do: Lua's numbers are doubles,
/// too coarse for .NET ticks). An entry's envelope keeps its write timestamp little-endian at bytes 18-25.
/// Returns 1 when written, 0 when a newer entry stays.
const SET_IF_NOT_NEWER: &str = r"
local current = redis.call('GET', KEYS[1])
if current and #current >= 25 then
  local stored = string.reverse(string.sub(current, 18, 25))
  if stored > ARGV[3] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

static SET_IF_NOT_NEWER_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(SET_IF_NOT_NEWER));

/// The write timestamp of an entry envelope, big-endian, if `value` is one.
fn envelope_timestamp(value: &[u8]) -> Option<[u8; 8]> {
    if value.len() < 25 || !matches!(value[0], 1 | 2) {
        return None;
    }
    let mut ts: [u8; 8] = value[17..25].try_into().ok()?;
    ts.reverse();
    Some(ts)
}

fn ttl_ms(ttl: Duration) -> i64 {
    ttl.as_millis().clamp(1, i64::MAX as u128) as i64
}

impl RedisDistributedCache {
    /// The connection this store writes on.
    pub(crate) fn connection(&self) -> &RedisConnection {
        &self.connection
    }

    /// An L2 write (`SET … PX`, or `UNLINK` when `value` is `None`) and a `PUBLISH` of `payload` on
    /// `channel`, as one pipeline on this store's connection: Redis runs them in that order, so a node
    /// that receives the notification finds the write in place, and the notification costs no extra round
    /// trip. Returns the outcome of each command (the PUBLISH's: how many subscribers it reached); an
    /// `Err` in the outer result means the connection failed (either may or may not have run).
    pub(crate) async fn write_and_publish(
        &self,
        key: &str,
        value: Option<(&Bytes, Duration)>,
        channel: &str,
        payload: &[u8],
    ) -> Result<(Result<(), L2Error>, Result<i64, String>), L2Error> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let conditional = match value {
            Some((bytes, ttl)) => match envelope_timestamp(bytes) {
                Some(ts) => {
                    pipe.cmd("EVALSHA")
                        .arg(SET_IF_NOT_NEWER_SCRIPT.get_hash())
                        .arg(1)
                        .arg(self.key(key))
                        .arg(bytes.as_ref())
                        .arg(ttl_ms(ttl))
                        .arg(&ts[..]);
                    Some((bytes, ttl))
                }
                None => {
                    pipe.cmd("SET")
                        .arg(self.key(key))
                        .arg(bytes.as_ref())
                        .arg("PX")
                        .arg(ttl_ms(ttl));
                    None
                }
            },
            None => {
                pipe.cmd("UNLINK").arg(self.key(key));
                None
            }
        };
        pipe.cmd("PUBLISH").arg(channel).arg(payload);
        let mut replies: Vec<redis::RedisResult<redis::Value>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let publish = replies.pop();
        let write = replies.pop();
        let (Some(write), Some(publish)) = (write, publish) else {
            return Err(L2Error::Unavailable("short pipeline reply".into()));
        };
        let write = match (write, conditional) {
            // The script is not loaded yet (first use, or Redis restarted): load it and write again. The
            // PUBLISH already ran: the other nodes re-read L2, find the older entry, and read it again
            // when they next need it.
            (Err(e), Some((bytes, ttl)))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.set(key, bytes.clone(), ttl).await
            }
            (write, _) => write.map(|_| ()).map_err(unavailable),
        };
        let publish = publish
            .map_err(|e| e.to_string())
            .and_then(|reply| match reply {
                redis::Value::Int(count) => Ok(count),
                other => Err(format!("unexpected PUBLISH reply {other:?}")),
            });
        Ok((write, publish))
    }
}

#[async_trait::async_trait]
impl DistributedCache for RedisDistributedCache {
    fn as_redis(&self) -> Option<&RedisDistributedCache> {
        Some(self)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, L2Error> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), L2Error> {
        let mut conn = self.conn().await?;
        let Some(ts) = envelope_timestamp(&value) else {
            return redis::cmd("SET")
                .arg(self.key(key))
                .arg(value.as_ref())
                .arg("PX")
                .arg(ttl_ms(ttl))
                .query_async::<()>(&mut conn)
                .await
                .map_err(unavailable);
        };
        // A newer entry staying in place is not an error: it is the newest write, as asked.
        SET_IF_NOT_NEWER_SCRIPT
            .key(self.key(key))
            .arg(value.as_ref())
            .arg(ttl_ms(ttl))
            .arg(&ts[..])
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn remove(&self, key: &str) -> Result<(), L2Error> {
        let mut conn = self.conn().await?;
        redis::cmd("UNLINK")
            .arg(self.key(key))
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, L2Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(self.key(key));
        }
        cmd.query_async(&mut conn).await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(super::glob_escape("a*b?c[d]e\\f"), "a\\*b\\?c\\[d\\]e\\\\f");
        assert_eq!(super::glob_escape("shop:"), "shop:");
    }
}
