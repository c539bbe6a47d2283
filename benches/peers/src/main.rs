//! fusioncache against its two closest Rust peers, `sisa-caching-hybrid` and `multi-tier-cache`, in one
//! run, one harness, against one private `redis-server`, each figure next to a raw redis-rs floor
//! measured in the same run. `make bench-peers`, or `peers-bench [--wait-quiet SECONDS]` on a release
//! build (`--wait-quiet`: first wait, up to that long, for the 1-minute load average to fall to
//! `QUIET_LOAD`).
//!
//! Method (as `transport-bench`'s):
//! - the server is started by the testkit on a free loopback port (never the machine's 6379), and
//!   pinned to core 1 (all its threads); this process pins itself to core 0 first thing in `main`;
//! - everything runs on one tokio `current_thread` runtime;
//! - each library gets two nodes, A and B, built as its README builds them with a Redis L2 and
//!   pub/sub invalidation, each node with its own connections (as two replicas have), both on the same
//!   channel / key prefix; a node pair is used only once a write on each reached the other (`wait_live`);
//! - "applied on B" means that B's L1 no longer serves the old value, observed the same way for every
//!   library: B's L1 is read directly (fusioncache `peek`; sisa `local_store().get`, its inspection
//!   handle on the local layer; multi-tier-cache the moka `L1Cache` handed to its `CacheManager`);
//! - the sides run in alternating blocks (latency) or rounds (throughput), the order rotating, so all
//!   see the same machine;
//! - every wait is bounded; a lost message (B stops changing) or a timed-out wait is an error, never a
//!   row, and so is a node that cleared its whole L1 during a measure (a control key nobody writes is
//!   checked): its count would not be notifications.

use std::cell::Cell;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::{EntryOptions, FusionCache};
use fusioncache_testkit::bench::{
    cpus_allowed, load_average, median, percentiles, pin, pin_server, wait_for_quiet, within,
    QUIET_LOAD,
};
use fusioncache_testkit::RedisServer;
use futures_util::StreamExt;
use multi_tier_cache::{
    CacheBackend, CacheManager, CacheStrategy, InvalidationConfig, L1Cache, L2Cache,
    MokaCacheConfig,
};
use sisa_caching_core::CacheStore;
use sisa_caching_hybrid::{HybridCacheSettings, RedisHybridCacheStore};

type BoxError = Box<dyn std::error::Error>;
type Res<T> = Result<T, BoxError>;

/// Latency iterations run (and discarded) before measuring, per side.
const WARMUP: usize = 200;
/// Latency iterations measured, per side.
const ITERATIONS: usize = 2_000;
/// Latency iterations per block; the sides take turns by blocks.
const BLOCK: usize = 200;
/// Writes per throughput round, on distinct keys.
const MESSAGES: usize = 50_000;
/// Writers in flight on node A, and on the raw publisher.
const IN_FLIGHT: usize = 256;
/// The most writes issued and not yet seen applied on B: a writer waits above it (as transport-bench).
const WINDOW: usize = 20_000;
/// Throughput rounds per side; the median is reported (after one discarded warm-up round per side).
const ROUNDS: usize = 3;
/// The longest one latency iteration (or setup step) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// After each latency iteration (untimed): how long the sides yield for the write's echoes to settle.
const SETTLE: Duration = Duration::from_micros(200);
/// ... and at most how long B may take to hold the new value by itself (else the bench puts it there).
const REFILL_WAIT: Duration = Duration::from_millis(200);
/// The longest one throughput round may take.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// A throughput round fails when B applied nothing new for this long (messages were lost).
const STALL: Duration = Duration::from_secs(2);
/// The longest a connection, or a node pair's first exchange, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long entries live (L2 and L1), far beyond a run.
const TTL: Duration = Duration::from_secs(600);
/// L1 capacity of every node (fusioncache's default; multi-tier-cache's default of 5 000 would not hold
/// the round's keys; sisa's local layer has no limit by default).
const L1_CAPACITY: u64 = 100_000;
/// The channel of the raw baselines (no node listens on it).
const RAW_CHANNEL: &str = "rawpeers.bench";
/// The key of the raw latency baseline.
const RAW_KEY: &str = "rawpeers:latency";
/// The raw baselines' message size (fusioncache's Set message for a short key is 61 bytes).
const RAW_PAYLOAD_BYTES: usize = 64;

fn main() -> ExitCode {
    // First thing: pin this process to core 0; every thread created later inherits the mask.
    let self_pin = pin(std::process::id(), 0);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wait_quiet = match args.as_slice() {
        [] => None,
        [flag, secs] if flag == "--wait-quiet" => match secs.parse() {
            Ok(secs) => Some(Duration::from_secs(secs)),
            Err(_) => return usage(),
        },
        _ => return usage(),
    };
    if let Some(limit) = wait_quiet {
        wait_for_quiet("peers-bench", limit);
    }
    match run(self_pin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peers-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: peers-bench [--wait-quiet SECONDS]");
    ExitCode::from(2)
}

fn run(self_pin: Result<(), String>) -> Res<()> {
    let started = Instant::now();
    let load_before = load_average()?;
    let quiet = load_before <= QUIET_LOAD;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the tokio runtime: {e}"))?;
    let server = RedisServer::start().map_err(|e| format!("cannot start redis-server: {e}"))?;
    let pid = server
        .pid()
        .ok_or("redis-server exited right after it started")?;
    let server_pin = pin_server("redis-server", pid);
    let report = rt.block_on(bench(&server.url()))?;
    let load_after = load_average()?;

    println!();
    println!("## peers-bench");
    println!();
    println!(
        "server: private redis-server at {} (testkit, persistence off)",
        server.url()
    );
    println!(
        "1-minute load average: {load_before:.2} before, {load_after:.2} after{}",
        if quiet {
            ""
        } else {
            " (NOT QUIET: figures may be noisy)"
        }
    );
    println!(
        "runtime: tokio current_thread; {}",
        match self_pin {
            Ok(()) => format!(
                "bench process pinned to core 0 (taskset -a -cp 0; cpus allowed: {})",
                cpus_allowed(std::process::id())
            ),
            Err(e) => format!("WARNING: the bench process is not pinned to core 0: {e}"),
        }
    );
    println!("{server_pin}");
    println!();
    println!(
        "| measure | raw floor | fusioncache | sisa-caching-hybrid 0.3.2 | multi-tier-cache 0.6.9 |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in &report.rows {
        let cell = |v: f64| {
            let ratio = v / row.raw;
            if row.decimals == 0 {
                format!("{v:.0} ({ratio:.2}x)")
            } else {
                format!("{v:.1} ({ratio:.2}x)")
            }
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            row.measure,
            if row.decimals == 0 {
                format!("{:.0}", row.raw)
            } else {
                format!("{:.1}", row.raw)
            },
            cell(row.libs[0]),
            cell(row.libs[1]),
            cell(row.libs[2]),
        );
    }
    println!();
    for detail in &report.details {
        println!("{detail}");
    }
    println!("total: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Report

struct Report {
    rows: Vec<Row>,
    details: Vec<String>,
}

struct Row {
    measure: String,
    raw: f64,
    /// fusioncache, sisa-caching-hybrid, multi-tier-cache.
    libs: [f64; 3],
    decimals: usize,
}

fn list(values: &[f64]) -> String {
    values
        .iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------------------
// Machine

// ---------------------------------------------------------------------------------------------------------
// The libraries

/// A value of ~48 bytes (as transport-bench's).
fn value(seq: u64) -> String {
    format!("value {seq:012} of a benchmark entry, 48 bytes")
}

/// One node of a library, as the benchmark drives it.
trait Node {
    /// The library's name, in errors.
    const NAME: &'static str;
    /// Whether B's L1 gets the new value by itself after a notification (fusioncache refreshes from L2;
    /// multi-tier's message carries the value); sisa only evicts.
    const REFILLS: bool;
    /// A's write: the library's API call that writes L1 + L2 and tells the other nodes.
    async fn write(&self, key: &str, value: &str) -> Res<()>;
    /// What this node's L1 holds for `key` (never L2).
    async fn l1(&self, key: &str) -> Res<Option<String>>;
    /// Puts `value` in this node's L1 only: no L2 write, no notification (B's state before a write).
    async fn hold(&self, key: &str, value: &str) -> Res<()>;
}

/// fusioncache as its README builds it: Redis L2 and the Redis backplane on one connection.
struct Fc(FusionCache<String>);

impl Fc {
    fn build(url: &str, name: &str) -> Res<Self> {
        let conn =
            RedisConnection::open(url).map_err(|e| format!("invalid redis url {url}: {e}"))?;
        let cache = FusionCache::builder()
            .name(name)
            .default_entry_options(EntryOptions::new().duration(TTL))
            .distributed_cache(RedisDistributedCache::new(conn.clone()))
            .backplane(RedisBackplane::new(conn))
            .build()
            .map_err(|e| format!("cannot build fusioncache {name}: {e}"))?;
        Ok(Self(cache))
    }
}

impl Node for Fc {
    const NAME: &'static str = "fusioncache";
    const REFILLS: bool = true;

    async fn write(&self, key: &str, value: &str) -> Res<()> {
        self.0
            .set(key, value.to_string())
            .await
            .map_err(|e| format!("fusioncache set: {e}").into())
    }

    async fn l1(&self, key: &str) -> Res<Option<String>> {
        Ok(self.0.peek(key))
    }

    async fn hold(&self, key: &str, value: &str) -> Res<()> {
        let local = EntryOptions::new()
            .duration(TTL)
            .skip_l2_writes(true)
            .skip_backplane_notifications(true);
        self.0
            .set_with(key, value.to_string(), &local)
            .await
            .map_err(|e| format!("fusioncache local set: {e}").into())
    }
}

/// sisa-caching-hybrid as its README builds it: `HybridCacheStore::connect` (its own Redis store and
/// backplane connections), default settings but a 10-minute TTL.
struct Sisa(RedisHybridCacheStore);

impl Sisa {
    async fn build(url: &str, name: &str) -> Res<Self> {
        let mut settings = HybridCacheSettings::default();
        settings.common.default_ttl_secs = Some(TTL.as_secs());
        let store = within(
            CONNECT_TIMEOUT,
            "sisa HybridCacheStore::connect",
            RedisHybridCacheStore::connect(name, url, &settings),
        )
        .await?
        .map_err(|e| format!("cannot connect sisa store {name}: {e}"))?;
        Ok(Self(store))
    }
}

impl Node for Sisa {
    const NAME: &'static str = "sisa-caching-hybrid";
    const REFILLS: bool = false;

    async fn write(&self, key: &str, value: &str) -> Res<()> {
        self.0
            .set(key, value.to_string(), None)
            .await
            .map_err(|e| format!("sisa set: {e}").into())
    }

    async fn l1(&self, key: &str) -> Res<Option<String>> {
        self.0
            .local_store()
            .get::<String>(key)
            .await
            .map_err(|e| format!("sisa local layer get: {e}").into())
    }

    async fn hold(&self, key: &str, value: &str) -> Res<()> {
        // The local layer's own `set`: it "skips the distributed store and the backplane".
        self.0
            .local_store()
            .set(key, value.to_string(), None)
            .await
            .map_err(|e| format!("sisa local layer set: {e}").into())
    }
}

/// multi-tier-cache as its README's "Cross-Instance Invalidation" builds it:
/// `CacheManager::new_with_invalidation` over a moka `L1Cache` and a Redis `L2Cache`, default
/// `InvalidationConfig` but the channel; A writes with `set_with_broadcast` (its "write-through: cache
/// locally and broadcast in one call"; with the default config, `set_with_strategy` tells no one).
struct Mtc {
    manager: CacheManager,
    /// The L1 the manager was built with (the same `Arc`), read directly.
    l1: Arc<L1Cache>,
}

impl Mtc {
    async fn build(url: &str, channel: &str) -> Res<Self> {
        let l1 = Arc::new(
            L1Cache::new(MokaCacheConfig {
                max_capacity: L1_CAPACITY,
                time_to_live: TTL,
                ..MokaCacheConfig::default()
            })
            .map_err(|e| format!("multi-tier L1Cache: {e}"))?,
        );
        let l2 = Arc::new(
            within(
                CONNECT_TIMEOUT,
                "multi-tier L2Cache",
                L2Cache::with_url(url),
            )
            .await?
            .map_err(|e| format!("multi-tier L2Cache::with_url({url}): {e}"))?,
        );
        let config = InvalidationConfig {
            channel: channel.to_string(),
            ..InvalidationConfig::default()
        };
        let manager = within(
            CONNECT_TIMEOUT,
            "multi-tier CacheManager::new_with_invalidation",
            CacheManager::new_with_invalidation(l1.clone(), l2, url, config),
        )
        .await?
        .map_err(|e| format!("multi-tier CacheManager::new_with_invalidation: {e}"))?;
        Ok(Self { manager, l1 })
    }
}

impl Node for Mtc {
    const NAME: &'static str = "multi-tier-cache";
    const REFILLS: bool = true;

    async fn write(&self, key: &str, value: &str) -> Res<()> {
        self.manager
            .set_with_broadcast(
                key,
                Bytes::copy_from_slice(value.as_bytes()),
                CacheStrategy::Custom(TTL),
            )
            .await
            .map_err(|e| format!("multi-tier set_with_broadcast: {e}").into())
    }

    async fn l1(&self, key: &str) -> Res<Option<String>> {
        match CacheBackend::get(&*self.l1, key).await {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| format!("multi-tier L1 holds a non-UTF-8 value under {key}").into()),
        }
    }

    async fn hold(&self, key: &str, value: &str) -> Res<()> {
        CacheBackend::set_with_ttl(
            &*self.l1,
            key,
            Bytes::copy_from_slice(value.as_bytes()),
            TTL,
        )
        .await
        .map_err(|e| format!("multi-tier L1 set: {e}").into())
    }
}

/// Two nodes of one library, same channel and key prefix, each with its own connections.
struct Pair<N> {
    a: N,
    b: N,
    /// Keys of this pair start with it.
    prefix: &'static str,
}

/// The control key: held in B's L1, never written; a node that loses it cleared its L1.
fn control_key(prefix: &str) -> String {
    format!("{prefix}control")
}

const CONTROL_VALUE: &str = "control value, never written";

/// Fails when `node` no longer holds its control key: it cleared its L1 (on a reconnect, or, for
/// sisa, a sequence gap a heartbeat showed), so what changed in it is not notifications.
async fn check_control<N: Node>(node: &N, prefix: &str, when: &str) -> Res<()> {
    match node.l1(&control_key(prefix)).await? {
        Some(v) if v == CONTROL_VALUE => Ok(()),
        other => Err(format!(
            "{}: a node's L1 lost its control key ({when}; it holds {other:?}): the library cleared its \
             L1, so the changes counted are not notifications",
            N::NAME
        )
        .into()),
    }
}

/// Until a write on `from` changes what `to` holds (probes 10 ms apart): `to`'s subscription is live.
async fn wait_live<N: Node>(from: &N, to: &N, prefix: &str) -> Res<()> {
    let probe = format!("{prefix}probe");
    let t0 = Instant::now();
    for n in 0u64.. {
        to.hold(&control_key(prefix), CONTROL_VALUE).await?;
        to.hold(&probe, "probe: old").await?;
        from.write(&probe, &format!("probe: new {n}")).await?;
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_millis(10) {
            if to.l1(&probe).await?.as_deref() != Some("probe: old") {
                return check_control(to, prefix, "while waiting for its subscription").await;
            }
            tokio::task::yield_now().await;
        }
        if t0.elapsed() > CONNECT_TIMEOUT {
            break;
        }
    }
    Err(format!(
        "{}: no write reached the other node within {CONNECT_TIMEOUT:?}",
        N::NAME
    )
    .into())
}

impl<N: Node> Pair<N> {
    /// Both directions live, then a settling wait longer than sisa's heartbeat interval (1 s): a node's
    /// first heartbeat may clear the others' L1 once, which must happen before measuring.
    async fn ready(&self) -> Res<()> {
        wait_live(&self.a, &self.b, self.prefix).await?;
        wait_live(&self.b, &self.a, self.prefix).await?;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        check_control(&self.a, self.prefix, "after the nodes' first exchange").await?;
        check_control(&self.b, self.prefix, "after the nodes' first exchange").await
    }
}

// ---------------------------------------------------------------------------------------------------------
// Helpers

/// Yields for `d` (other tasks run; the core does not go idle).
async fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        tokio::task::yield_now().await;
    }
}

/// The raw clients: one multiplexed connection (SET, PUBLISH) and a subscriber on its own connection.
struct Raw {
    client: redis::Client,
    conn: redis::aio::MultiplexedConnection,
    payload: Bytes,
}

type RawSub = std::pin::Pin<Box<dyn futures_util::Stream<Item = ()>>>;

impl Raw {
    async fn connect(url: &str) -> Res<Self> {
        let client =
            redis::Client::open(url).map_err(|e| format!("invalid redis url {url}: {e}"))?;
        let conn = within(
            CONNECT_TIMEOUT,
            "a redis connection",
            client.get_multiplexed_async_connection(),
        )
        .await?
        .map_err(|e| format!("cannot connect to redis at {url}: {e}"))?;
        Ok(Self {
            client,
            conn,
            payload: Bytes::from(vec![b'x'; RAW_PAYLOAD_BYTES]),
        })
    }

    /// A subscription on `RAW_CHANNEL`, live on the server when this returns (SUBSCRIBE answered).
    async fn subscribe(&self) -> Res<RawSub> {
        let mut pubsub = within(
            CONNECT_TIMEOUT,
            "a redis pub/sub connection",
            self.client.get_async_pubsub(),
        )
        .await?
        .map_err(|e| format!("redis pub/sub connection: {e}"))?;
        pubsub
            .subscribe(RAW_CHANNEL)
            .await
            .map_err(|e| format!("SUBSCRIBE: {e}"))?;
        Ok(Box::pin(pubsub.into_on_message().map(|_| ())))
    }

    async fn publish(mut conn: redis::aio::MultiplexedConnection, payload: Bytes) -> Res<()> {
        redis::cmd("PUBLISH")
            .arg(RAW_CHANNEL)
            .arg(payload.as_ref())
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| format!("raw PUBLISH: {e}"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Latency

/// One sequential write seen end to end.
#[derive(Clone, Copy)]
struct Sample {
    /// From the call to its return (raw: SET and PUBLISH both answered).
    call_to_return: Duration,
    /// From the return to B no longer holding the old value (raw: PUBLISH sent → received).
    lag: Duration,
    /// From the call to B no longer holding the old value (raw: SET sent → PUBLISH received).
    call_to_b: Duration,
}

/// A library's latency probe: A writes the key, B's L1 is polled until the old value is gone.
struct Probe<'p, N> {
    pair: &'p Pair<N>,
    key: String,
    current: String,
    seq: u64,
}

impl<'p, N: Node> Probe<'p, N> {
    async fn new(pair: &'p Pair<N>) -> Res<Self> {
        let key = format!("{}latency", pair.prefix);
        let current = value(0);
        pair.b.hold(&key, &current).await?;
        Ok(Self {
            pair,
            key,
            current,
            seq: 0,
        })
    }

    async fn once(&mut self) -> Res<Sample> {
        self.seq += 1;
        let new = value(self.seq);
        let Pair { a, b, .. } = self.pair;
        let t0 = Instant::now();
        a.write(&self.key, &new).await?;
        let returned = Instant::now();
        while b.l1(&self.key).await?.as_ref() == Some(&self.current) {
            if returned.elapsed() > STEP_TIMEOUT {
                return Err(format!(
                    "{}: node B still holds the old value {STEP_TIMEOUT:?} after node A's write",
                    N::NAME
                )
                .into());
            }
            tokio::task::yield_now().await;
        }
        let seen = Instant::now();
        // Untimed: what the write set off settles (B's refresh or update, A's own message coming back),
        // then B holds the new value in L1 (as after a read) for the next iteration. Yielding, not
        // sleeping: an idle core would make the next iteration start cold.
        if N::REFILLS {
            let t = Instant::now();
            while b.l1(&self.key).await?.as_ref() != Some(&new) && t.elapsed() < REFILL_WAIT {
                tokio::task::yield_now().await;
            }
        }
        spin(SETTLE).await;
        if b.l1(&self.key).await?.as_ref() != Some(&new) {
            b.hold(&self.key, &new).await?;
        }
        self.current = new;
        Ok(Sample {
            call_to_return: returned - t0,
            lag: seen - returned,
            call_to_b: seen - t0,
        })
    }
}

/// The raw latency baseline: SET awaited, then PUBLISH awaited, received by the raw subscriber.
struct RawProbe {
    conn: redis::aio::MultiplexedConnection,
    sub: RawSub,
    payload: Bytes,
    seq: u64,
}

impl RawProbe {
    async fn once(&mut self) -> Res<Sample> {
        self.seq += 1;
        let v = value(self.seq);
        let Self {
            conn, sub, payload, ..
        } = self;
        let mut set = redis::cmd("SET");
        set.arg(RAW_KEY).arg(v.as_bytes());
        let t0 = Instant::now();
        let (written, (received, at)) =
            within(STEP_TIMEOUT, "a raw SET + PUBLISH to arrive", async {
                tokio::join!(
                    async {
                        set.query_async::<()>(&mut *conn)
                            .await
                            .map_err(|e| format!("raw SET: {e}"))?;
                        let sent = Instant::now();
                        Raw::publish(conn.clone(), payload.clone()).await?;
                        Ok::<_, BoxError>((sent, Instant::now()))
                    },
                    async { (sub.next().await.is_some(), Instant::now()) }
                )
            })
            .await?;
        let (sent, returned) = written?;
        if !received {
            return Err("the raw subscription ended".into());
        }
        spin(SETTLE).await;
        Ok(Sample {
            call_to_return: returned - t0,
            lag: at.saturating_duration_since(sent),
            call_to_b: at - t0,
        })
    }
}

/// The four latency sides: raw, fusioncache, sisa, multi-tier.
enum Side<'p> {
    Raw(RawProbe),
    Fc(Probe<'p, Fc>),
    Sisa(Probe<'p, Sisa>),
    Mtc(Probe<'p, Mtc>),
}

impl Side<'_> {
    async fn once(&mut self) -> Res<Sample> {
        match self {
            Side::Raw(p) => p.once().await,
            Side::Fc(p) => p.once().await,
            Side::Sisa(p) => p.once().await,
            Side::Mtc(p) => p.once().await,
        }
    }
}

/// Warms every side up, then measures `ITERATIONS` of each in blocks, the order rotating every block.
async fn interleaved(sides: &mut [Side<'_>]) -> Res<Vec<Vec<Sample>>> {
    for side in sides.iter_mut() {
        for _ in 0..WARMUP {
            side.once().await?;
        }
    }
    let n = sides.len();
    let mut samples = vec![Vec::with_capacity(ITERATIONS); n];
    for block in 0..ITERATIONS.div_ceil(BLOCK) {
        for turn in 0..n {
            let s = (block + turn) % n;
            for _ in 0..BLOCK {
                let sample = sides[s].once().await?;
                samples[s].push(sample);
            }
        }
    }
    Ok(samples)
}

// ---------------------------------------------------------------------------------------------------------
// Throughput

/// Runs `write(i)` for every `i` in `0..n`, `IN_FLIGHT` at a time; a writer waits before it starts while
/// more than `WINDOW` writes are not yet `consumed` (or fails when that stays so for `STALL`).
async fn in_flight<Fut>(
    n: usize,
    consumed: impl Fn() -> u64,
    write: impl Fn(usize) -> Fut,
) -> Res<Instant>
where
    Fut: std::future::Future<Output = Res<()>>,
{
    use futures_util::TryStreamExt;
    let issued = Cell::new(0u64);
    let (consumed, write, issued) = (&consumed, &write, &issued);
    futures_util::stream::iter((0..n).map(Ok::<usize, BoxError>))
        .try_for_each_concurrent(IN_FLIGHT, |i| async move {
            let sent = issued.get();
            issued.set(sent + 1);
            let (mut seen, mut at) = (consumed(), Instant::now());
            while sent.saturating_sub(seen) > WINDOW as u64 {
                if at.elapsed() > STALL {
                    return Err(format!(
                        "B made no progress for {STALL:?} with {sent} of {n} writes issued and {seen} \
                         applied: messages were lost"
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                let now = consumed();
                if now != seen {
                    (seen, at) = (now, Instant::now());
                }
            }
            write(i).await
        })
        .await?;
    Ok(Instant::now())
}

/// Polls B's L1 every ~1 ms, walking the keys in write order: a key counts once B no longer holds its
/// old value there. Returns when the last key was seen changed; fails when nothing changed for `STALL`.
async fn count_changed<N: Node>(
    b: &N,
    keys: &[String],
    old: impl Fn(usize) -> String,
    counted: &Cell<u64>,
) -> Res<Instant> {
    let mut at = Instant::now();
    let mut next = 0;
    loop {
        let before = next;
        while next < keys.len() && b.l1(&keys[next]).await?.as_deref() != Some(old(next).as_str()) {
            next += 1;
        }
        if next != before {
            at = Instant::now();
            counted.set(next as u64);
        }
        if next == keys.len() {
            return Ok(at);
        }
        if at.elapsed() > STALL {
            return Err(format!(
                "{}: {next} of {} keys changed on node B, then none for {STALL:?}: notifications were lost",
                N::NAME,
                keys.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One library round: B holds every key (untimed local writes), then A writes a new value of each,
/// `IN_FLIGHT` at a time; returns B's changes per second (first write called → last change seen).
async fn lib_round<N: Node>(pair: &Pair<N>, round: usize) -> Res<f64> {
    let Pair { a, b, prefix } = pair;
    let n = MESSAGES;
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}t:{i:06}")).collect();
    let first = (round * 2 * n) as u64;
    let old = |i: usize| value(first + i as u64);
    let new = |i: usize| value(first + (n + i) as u64);
    for (i, key) in keys.iter().enumerate() {
        b.hold(key, &old(i)).await?;
    }
    b.hold(&control_key(prefix), CONTROL_VALUE).await?;
    for (i, key) in keys.iter().enumerate() {
        if b.l1(key).await? != Some(old(i)) {
            return Err(format!(
                "{}: node B does not hold {key} in L1 before the round (evicted?)",
                N::NAME
            )
            .into());
        }
    }
    let counted = Cell::new(0u64);
    let t0 = Instant::now();
    let (written, changed) = within(ROUND_TIMEOUT, "a library throughput round", async {
        tokio::join!(
            in_flight(
                n,
                || counted.get(),
                |i| {
                    let (key, v) = (&keys[i], new(i));
                    async move { a.write(key, &v).await }
                }
            ),
            count_changed(b, &keys, old, &counted)
        )
    })
    .await?;
    written?;
    let done = changed?;
    check_control(b, prefix, "during a throughput round").await?;
    for (i, key) in keys.iter().enumerate() {
        match b.l1(key).await? {
            None => {}
            Some(v) if v == new(i) => {}
            Some(v) => {
                return Err(format!(
                    "{}: node B holds {v:?} under {key} after the round",
                    N::NAME
                )
                .into())
            }
        }
    }
    // Untimed: background work of the round (refreshes, A's own messages coming back) ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(n as f64 / (done - t0).as_secs_f64())
}

/// One raw round: `IN_FLIGHT` writers PUBLISH `MESSAGES` messages on one multiplexed connection; the raw
/// subscriber counts them. Returns messages received per second.
async fn raw_round(raw: &Raw) -> Res<f64> {
    let mut sub = raw.subscribe().await?;
    let n = MESSAGES;
    let counted = Cell::new(0u64);
    let t0 = Instant::now();
    let (written, received) = within(ROUND_TIMEOUT, "a raw PUBLISH round", async {
        tokio::join!(
            in_flight(n, || counted.get(), |_| Raw::publish(
                raw.conn.clone(),
                raw.payload.clone()
            )),
            async {
                let mut got = 0u64;
                while got < n as u64 {
                    match tokio::time::timeout(STALL, sub.next()).await {
                        Ok(Some(())) => {
                            got += 1;
                            counted.set(got);
                        }
                        Ok(None) => {
                            return Err::<Instant, BoxError>(
                                format!("raw subscription ended after {got} of {n}").into(),
                            )
                        }
                        Err(_) => {
                            return Err(format!(
                                "raw subscriber: {got} of {n} received, then nothing for {STALL:?}: the \
                                 baseline lost messages"
                            )
                            .into())
                        }
                    }
                }
                Ok(Instant::now())
            }
        )
    })
    .await?;
    written?;
    let done = received?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(n as f64 / (done - t0).as_secs_f64())
}

// ---------------------------------------------------------------------------------------------------------
// The run

async fn bench(url: &str) -> Res<Report> {
    let raw = Raw::connect(url).await?;
    let fc = Pair {
        a: Fc::build(url, "peersfc")?,
        b: Fc::build(url, "peersfc")?,
        prefix: "peersfc:",
    };
    let sisa = Pair {
        a: Sisa::build(url, "peerssisa").await?,
        b: Sisa::build(url, "peerssisa").await?,
        prefix: "peerssisa:",
    };
    let mtc = Pair {
        a: Mtc::build(url, "peersmtc:invalidate").await?,
        b: Mtc::build(url, "peersmtc:invalidate").await?,
        prefix: "peersmtc:",
    };
    fc.ready().await?;
    sisa.ready().await?;
    mtc.ready().await?;

    let mut rows = Vec::new();
    let mut details = Vec::new();

    // Throughput: round 0 warms every side up and is discarded; the order rotates every round.
    let mut rates: [Vec<f64>; 4] = Default::default();
    for round in 0..=ROUNDS {
        for turn in 0..4 {
            let side = (round + turn) % 4;
            let r = match side {
                0 => raw_round(&raw).await?,
                1 => lib_round(&fc, round).await?,
                2 => lib_round(&sisa, round).await?,
                _ => lib_round(&mtc, round).await?,
            };
            if round > 0 {
                rates[side].push(r);
            }
        }
    }
    rows.push(Row {
        measure: format!(
            "notifications applied on B /s: A's write on {MESSAGES} distinct keys, {IN_FLIGHT} in flight, \
             B holding every key (applied = B's L1 no longer serves the old value, B's L1 polled: \
             fusioncache `peek`, sisa `local_store().get`, multi-tier its `L1Cache::get`) (median of \
             {ROUNDS}); raw: single-connection redis-rs PUBLISH, {IN_FLIGHT} in flight, counted by a raw \
             subscriber"
        ),
        raw: median(&rates[0]),
        libs: [median(&rates[1]), median(&rates[2]), median(&rates[3])],
        decimals: 0,
    });
    details.push(format!(
        "throughput rounds ({MESSAGES} writes each, after one discarded warm-up round, order rotating; at \
         most {WINDOW} written and not yet seen applied): raw [{}] msgs/s; fusioncache [{}]; sisa [{}]; \
         multi-tier [{}] applied/s",
        list(&rates[0]),
        list(&rates[1]),
        list(&rates[2]),
        list(&rates[3]),
    ));

    // Latency.
    let raw_sub = raw.subscribe().await?;
    let mut sides = [
        Side::Raw(RawProbe {
            conn: raw.conn.clone(),
            sub: raw_sub,
            payload: raw.payload.clone(),
            seq: 0,
        }),
        Side::Fc(Probe::new(&fc).await?),
        Side::Sisa(Probe::new(&sisa).await?),
        Side::Mtc(Probe::new(&mtc).await?),
    ];
    let samples = interleaved(&mut sides).await?;
    drop(sides);
    let pick = |part: fn(&Sample) -> Duration| -> Vec<(f64, f64)> {
        samples
            .iter()
            .map(|s| percentiles(&mut s.iter().map(part).collect::<Vec<_>>()))
            .collect()
    };
    for (what, vs, part) in [
        (
            "from A's write returning to B no longer holding the old value",
            "; raw: PUBLISH sent → received (one hop)",
            (|s: &Sample| s.lag) as fn(&Sample) -> Duration,
        ),
        (
            "from A's write call to B no longer holding the old value",
            "; raw: SET awaited, then PUBLISH awaited → received",
            |s: &Sample| s.call_to_b,
        ),
    ] {
        let p = pick(part);
        for (name, get) in [
            ("p50", (|x: &(f64, f64)| x.0) as fn(&(f64, f64)) -> f64),
            ("p99", |x: &(f64, f64)| x.1),
        ] {
            rows.push(Row {
                measure: format!("{what}, sequential writes, {name} (µs){vs}"),
                raw: get(&p[0]),
                libs: [get(&p[1]), get(&p[2]), get(&p[3])],
                decimals: 1,
            });
        }
    }
    let ret = pick(|s| s.call_to_return);
    details.push(format!(
        "latency: {ITERATIONS} iterations per side after {WARMUP} of warm-up, blocks of {BLOCK}, order \
         rotating; B holds the key in L1; A writes a new 48-byte value, B's L1 is polled (yielding) until \
         it no longer holds the old one; untimed after each: B's own refill (fusioncache's refresh, \
         multi-tier's update; up to {REFILL_WAIT:?}), then {SETTLE:?} of yielding for A's own message to \
         come back, then B holds the new value in L1. A's write call → return p50/p99 (µs): raw SET+PUBLISH {:.1}/{:.1}; fusioncache {:.1}/{:.1}; \
         sisa {:.1}/{:.1}; multi-tier {:.1}/{:.1}. raw = redis-rs on one multiplexed connection, \
         {RAW_PAYLOAD_BYTES}-byte messages, subscriber on its own connection",
        ret[0].0, ret[0].1, ret[1].0, ret[1].1, ret[2].0, ret[2].1, ret[3].0, ret[3].1,
    ));
    details.push(
        "A's write: fusioncache `set` (L1, then one batch script call on one connection: the conditional \
         L2 write, then the PUBLISH); sisa `set` (evicts its own L1 copy, awaits the L2 SET, publishes the \
         invalidation in a spawned task; B evicts); multi-tier `set_with_broadcast` (L1, L2 PSETEX awaited, then PUBLISH awaited of an \
         Update carrying the value; B writes it into its L1, then into L2 again, one message at a time)"
            .to_string(),
    );
    Ok(Report { rows, details })
}
