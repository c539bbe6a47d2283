//! The Redis distributed cache (feature `redis`).

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{DistributedCache, L2Error};
use crate::redis::RedisConnection;

/// A [`DistributedCache`] on Redis: `GET`, `MGET`, a conditional `SET … PX` (see below), `UNLINK`, in the
/// connection's database, every key under an optional prefix (`{key_prefix}{key}`).
///
/// A write of one of the cache's entries replaces what is stored only if that is not a newer write (by
/// the write timestamps the entries carry), in a server-side script: a write that reaches Redis late —
/// held in a stalled server's buffer, or by a network that delivers it after a partition, long after the
/// client gave up on it — cannot undo a newer one. (Other bytes are written with a plain `SET`.)
///
/// Writes and removals are batched: those that callers start together go as one script call that runs
/// them in order (with the notifications that go with them, when the backplane shares the connection). A
/// lone write goes at once; under load each write costs the client and the server a fraction of a
/// command. Batches are pipelined and never sent twice, so writes reach Redis in the order they were made.
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
    batcher: Arc<Batcher>,
}

impl RedisDistributedCache {
    /// A distributed cache on `connection` (its database index), without key prefix.
    pub fn new(connection: RedisConnection) -> Self {
        Self {
            connection,
            key_prefix: String::new(),
            batcher: Arc::default(),
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

/// The batch script. For each key `KEYS[i]`, six arguments from `ARGV[6 * (i - 1) + 1]`: the operation
/// (`c`: store the value unless the stored entry carries a newer write timestamp; `s`: store it; `u`:
/// unlink the key), the value, its TTL in ms, its write timestamp (8 bytes, big-endian, so that bytes
/// compare as the numbers do: Lua's numbers are doubles, too coarse for .NET ticks), a channel (empty: no
/// notification) and the payload to publish there once the write is done. An entry's envelope keeps its
/// write timestamp little-endian at bytes 18-25.
///
/// Returns two values per key: the write's status (1 written, 0 a newer entry stays, or the server's error
/// as a string) and the notification's (the number of subscribers it reached, -1 when none was asked for or
/// the write failed, or the server's error as a string). One failed write does not stop the others.
const BATCH: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 6
  local op, ts, channel = ARGV[a + 1], ARGV[a + 4], ARGV[a + 5]
  local status = 1
  if op == 'c' then
    local current = redis.pcall('GET', key)
    if type(current) == 'table' then
      status = current.err
    elseif current and #current >= 25 and string.reverse(string.sub(current, 18, 25)) > ts then
      status = 0
    end
  end
  if status == 1 then
    local done
    if op == 'u' then
      done = redis.pcall('UNLINK', key)
    else
      done = redis.pcall('SET', key, ARGV[a + 2], 'PX', ARGV[a + 3])
    end
    if type(done) == 'table' and done.err then
      status = done.err
    end
  end
  local published = -1
  if channel ~= '' and type(status) == 'number' then
    local n = redis.pcall('PUBLISH', channel, ARGV[a + 6])
    if type(n) == 'table' then
      published = n.err
    else
      published = n
    end
  end
  out[2 * i - 1] = status
  out[2 * i] = published
end
return out
";

static BATCH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(BATCH));

/// The most writes in one batch: a script blocks the server while it runs (about a millisecond for this
/// many), so a batch stays short for the server's other clients.
const MAX_BATCH: usize = 128;

/// The most batches sent and awaiting their replies: Redis runs the next while the client reads the last.
const BATCHES_IN_FLIGHT: usize = 8;

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

/// The writes of one store waiting for the next batch; the batch task starts with the first.
#[derive(Debug, Default)]
struct Batcher {
    jobs: OnceLock<mpsc::UnboundedSender<Job>>,
}

/// One write (or removal), its optional notification, and where its outcome goes.
struct Job {
    key: String,
    op: Op,
    /// The channel and the payload to publish once the write is done.
    publish: Option<(String, Bytes)>,
    done: oneshot::Sender<Result<Outcome, L2Error>>,
}

enum Op {
    /// Store unless a newer write is stored (`timestamp`: the envelope's, big-endian).
    IfNotNewer {
        value: Bytes,
        ttl: Duration,
        timestamp: [u8; 8],
    },
    Set {
        value: Bytes,
        ttl: Duration,
    },
    Unlink,
}

impl Op {
    /// The write of `value` for `ttl` (conditional for an entry envelope), or a removal.
    fn write(value: Option<(&Bytes, Duration)>) -> Self {
        match value {
            Some((value, ttl)) => match envelope_timestamp(value) {
                Some(timestamp) => Op::IfNotNewer {
                    value: value.clone(),
                    ttl,
                    timestamp,
                },
                None => Op::Set {
                    value: value.clone(),
                    ttl,
                },
            },
            None => Op::Unlink,
        }
    }
}

/// What one job came to: its write, and its notification when one was asked for (the number of subscribers
/// it reached, or the server's error).
struct Outcome {
    write: Result<(), L2Error>,
    publish: Option<Result<i64, String>>,
}

impl RedisDistributedCache {
    /// The connection this store writes on.
    pub(crate) fn connection(&self) -> &RedisConnection {
        &self.connection
    }

    /// Hands a write to the batcher and waits for its outcome. An `Err` means the batch failed as a whole
    /// (the connection): the write may or may not have run.
    async fn submit(
        &self,
        key: &str,
        op: Op,
        publish: Option<(&str, Bytes)>,
    ) -> Result<Outcome, L2Error> {
        let jobs = self.batcher.jobs.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run_batches(self.connection.clone(), rx));
            tx
        });
        let (done, outcome) = oneshot::channel();
        let job = Job {
            key: self.key(key),
            op,
            publish: publish.map(|(channel, payload)| (channel.to_string(), payload)),
            done,
        };
        jobs.send(job)
            .map_err(|_| L2Error::Unavailable("the redis batch task has stopped".into()))?;
        outcome
            .await
            .map_err(|_| L2Error::Unavailable("the redis batch task has stopped".into()))?
    }

    /// An L2 write (`None`: a removal) and a `PUBLISH` of `payload` on `channel`, in one batch on this
    /// store's connection: Redis runs them in that order, so a node that receives the notification finds
    /// the write in place, and the notification costs no extra round trip. The notification is published
    /// only if the write went through (or a newer entry stays). Returns the outcome of each (the PUBLISH's:
    /// how many subscribers it reached); an `Err` in the outer result means the connection failed (the write
    /// may or may not have run).
    pub(crate) async fn write_and_publish(
        &self,
        key: &str,
        value: Option<(&Bytes, Duration)>,
        channel: &str,
        payload: Bytes,
    ) -> Result<(Result<(), L2Error>, Result<i64, String>), L2Error> {
        let outcome = self
            .submit(key, Op::write(value), Some((channel, payload)))
            .await?;
        let publish = match (&outcome.write, outcome.publish) {
            (Ok(()), Some(published)) => published,
            (Ok(()), None) => Err("no PUBLISH reply".into()),
            (Err(_), _) => Err("not published: the write failed".into()),
        };
        Ok((outcome.write, publish))
    }
}

/// The batch task of a store: sends what callers queued since the last batch as the next one, with up to
/// [`BATCHES_IN_FLIGHT`] batches awaiting their replies. Ends when the store (every clone of it) is dropped.
///
/// Writes must reach Redis in the order they were made, so a batch is never sent twice: the first batch,
/// and the first after a failure (a lost connection, a restarted or flushed server), loads the script in
/// the same pipeline, so that no batch meets a server that does not know it; a batch that fails anyway
/// fails for its callers, whose changes go to auto-recovery.
async fn run_batches(connection: RedisConnection, mut jobs: mpsc::UnboundedReceiver<Job>) {
    use futures_util::StreamExt;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut load = true;
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            biased;
            Some(sent) = in_flight.next(), if !in_flight.is_empty() => load = still_to_load(load, sent),
            received = jobs.recv_many(&mut batch, MAX_BATCH), if in_flight.len() < BATCHES_IN_FLIGHT => {
                if received == 0 {
                    break;
                }
                in_flight.push(run_batch(connection.clone(), batch, load));
            }
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Whether the next batch loads the script, after a batch that went through or not, having loaded it or not:
/// from a failure until a batch that loaded it went through.
fn still_to_load(load: bool, (ok, loaded): (bool, bool)) -> bool {
    !ok || (load && !loaded)
}

/// Sends one batch (loading the script first if `load`) and hands each job its outcome. Returns whether
/// the batch went through, and whether it loaded the script.
async fn run_batch(connection: RedisConnection, batch: Vec<Job>, load: bool) -> (bool, bool) {
    match write_batch(&connection, &batch, load).await {
        Ok(outcomes) => {
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.done.send(Ok(outcome));
            }
            (true, load)
        }
        Err(error) => {
            for job in batch {
                let _ = job.done.send(Err(error.clone()));
            }
            (false, load)
        }
    }
}

/// Runs `batch` as one call of the batch script, preceded by `SCRIPT LOAD` in the same pipeline if `load`.
async fn write_batch(
    connection: &RedisConnection,
    batch: &[Job],
    load: bool,
) -> Result<Vec<Outcome>, L2Error> {
    let mut conn = connection.manager().await.map_err(unavailable)?;
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(BATCH_SCRIPT.get_hash()).arg(batch.len());
    for job in batch {
        cmd.arg(&job.key);
    }
    for job in batch {
        match &job.op {
            Op::IfNotNewer {
                value,
                ttl,
                timestamp,
            } => cmd
                .arg("c")
                .arg(value.as_ref())
                .arg(ttl_ms(*ttl))
                .arg(&timestamp[..]),
            Op::Set { value, ttl } => cmd.arg("s").arg(value.as_ref()).arg(ttl_ms(*ttl)).arg(""),
            Op::Unlink => cmd.arg("u").arg("").arg(0).arg(""),
        };
        match &job.publish {
            Some((channel, payload)) => cmd.arg(channel).arg(payload.as_ref()),
            None => cmd.arg("").arg(""),
        };
    }
    let reply: Vec<redis::Value> = if load {
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(BATCH).ignore();
        pipe.add_command(cmd);
        let (reply,): (Vec<redis::Value>,) =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        reply
    } else {
        cmd.query_async(&mut conn).await.map_err(unavailable)?
    };
    if reply.len() != 2 * batch.len() {
        return Err(L2Error::Unavailable(format!(
            "unexpected reply to a batch of {} writes: {} values",
            batch.len(),
            reply.len()
        )));
    }
    let mut reply = reply.into_iter();
    Ok(batch
        .iter()
        .map(|job| {
            let (status, published) = (reply.next(), reply.next());
            let write = match status {
                Some(redis::Value::Int(_)) => Ok(()),
                other => Err(L2Error::Unavailable(server_error(other))),
            };
            let publish = job.publish.as_ref().map(|_| match published {
                Some(redis::Value::Int(n)) if n >= 0 => Ok(n),
                other => Err(server_error(other)),
            });
            Outcome { write, publish }
        })
        .collect())
}

/// The error a batch reported for one of its writes or notifications.
fn server_error(value: Option<redis::Value>) -> String {
    match value {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Some(redis::Value::SimpleString(s)) => s,
        Some(redis::Value::Int(-1)) => "not run".into(),
        other => format!("unexpected reply {other:?}"),
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
        // A newer entry staying in place is not an error: it is the newest write, as asked.
        self.submit(key, Op::write(Some((&value, ttl))), None)
            .await?
            .write
    }

    async fn remove(&self, key: &str) -> Result<(), L2Error> {
        self.submit(key, Op::Unlink, None).await?.write
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
