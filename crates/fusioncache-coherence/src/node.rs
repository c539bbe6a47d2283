//! One node of the checker: a separate OS process running a `FusionCache` like an application would
//! (defaults everywhere: Redis L2, a Redis or NATS backplane), doing paced random reads and awaited writes
//! on a few hot keys, and logging every operation with the monotonic clock.
//!
//! Protocol with the coordinator: the node prints `ready` once its backplane is connected, reads
//! `go START_NS LOAD_NS CONVERGE_NS` on stdin, runs the load from `START_NS` for `LOAD_NS`, then reads every
//! key every 10 ms for `CONVERGE_NS`, writes its log and prints `done`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use fusioncache::backplane::nats::NatsBackplane;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::{EntryOptions, FusionCache};

use crate::clock::{now_ns, until};
use crate::record::{Kind, Op, Phase};
use crate::Transport;

/// What a node is told on its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// The node's index.
    #[arg(long)]
    pub id: usize,
    /// The Redis URL (L2; also the backplane with `--transport redis`).
    #[arg(long)]
    pub redis_url: String,
    /// The backplane.
    #[arg(long, value_enum)]
    pub transport: Transport,
    /// The NATS URL(s), with `--transport nats`.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// The cache name (the channel).
    #[arg(long)]
    pub name: String,
    /// The prefix of the L2 keys.
    #[arg(long)]
    pub key_prefix: String,
    /// How many hot keys.
    #[arg(long)]
    pub keys: usize,
    /// Operations per second.
    #[arg(long)]
    pub rate: u32,
    /// The share of writes.
    #[arg(long)]
    pub write_ratio: f64,
    /// Where to write the log.
    #[arg(long)]
    pub out: PathBuf,
}

/// The cache of a node: production defaults, entries fresh for 60 s (so that a missed notification shows).
pub async fn cache(
    transport: Transport,
    redis_url: &str,
    nats_url: Option<&str>,
    name: &str,
    key_prefix: &str,
    with_backplane: bool,
) -> Result<FusionCache<String>, String> {
    let redis = RedisConnection::open(redis_url).map_err(|e| e.to_string())?;
    let mut builder = FusionCache::<String>::builder()
        .name(name)
        .default_entry_options(EntryOptions::new().duration(Duration::from_secs(60)))
        .distributed_cache(RedisDistributedCache::new(redis.clone()).key_prefix(key_prefix));
    if with_backplane {
        builder = match transport {
            Transport::Redis => builder.backplane(RedisBackplane::new(redis)),
            Transport::Nats => {
                let url = nats_url.ok_or("--nats-url is required with NATS")?;
                let backplane = NatsBackplane::connect(url)
                    .await
                    .map_err(|e| e.to_string())?;
                builder.backplane(backplane)
            }
        };
    }
    builder.build().map_err(|e| e.to_string())
}

/// The hot keys.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i}")).collect()
}

/// Runs a node to the end.
pub async fn run(args: NodeArgs) -> Result<(), String> {
    let cache = cache(
        args.transport,
        &args.redis_url,
        args.nats_url.as_deref(),
        &args.name,
        &args.key_prefix,
        true,
    )
    .await?;
    if !cache.wait_for_backplane(Duration::from_secs(30)).await {
        return Err("the backplane did not connect within 30 s".into());
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let numbers: Vec<u64> = line
        .strip_prefix("go ")
        .ok_or_else(|| format!("expected `go …`, got {line:?}"))?
        .split_whitespace()
        .map(|n| n.parse().map_err(|_| format!("bad number in {line:?}")))
        .collect::<Result<_, _>>()?;
    let [start, load, converge] = numbers[..] else {
        return Err(format!("expected three numbers in {line:?}"));
    };

    let keys = keys(args.keys);
    let mut rng = fastrand::Rng::with_seed(args.id as u64 * 7919 + start);
    let mut ops =
        Vec::with_capacity((u64::from(args.rate) * (load + converge) / 1_000_000_000) as usize * 2);
    let interval = 1_000_000_000 / u64::from(args.rate.max(1));
    let load_end = start + load;
    let mut next = start;
    let mut seq = 0u64;
    tokio::time::sleep(until(start)).await;
    while now_ns() < load_end {
        tokio::time::sleep(until(next)).await;
        let key = &keys[rng.usize(..keys.len())];
        if rng.f64() < args.write_ratio {
            seq += 1;
            let value = format!("n{}-{seq}", args.id);
            let t0 = now_ns();
            let ok = cache.set(key, value.clone()).await.is_ok();
            ops.push(op(
                Kind::Write,
                Phase::Load,
                args.id,
                key,
                t0,
                ok,
                Some(value),
            ));
        } else {
            ops.push(read(&cache, args.id, key, Phase::Load).await);
        }
        // Paced, never bursting to catch up after a slow operation.
        next = (next + interval).max(now_ns());
    }
    let converge_end = load_end + converge;
    while now_ns() < converge_end {
        for key in &keys {
            ops.push(read(&cache, args.id, key, Phase::Converge).await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut text = String::with_capacity(ops.len() * 48);
    for op in &ops {
        text.push_str(&op.to_string());
        text.push('\n');
    }
    std::fs::write(&args.out, text).map_err(|e| format!("{}: {e}", args.out.display()))?;
    println!("done");
    Ok(())
}

/// One timed `try_get`.
async fn read(cache: &FusionCache<String>, node: usize, key: &str, phase: Phase) -> Op {
    let t0 = now_ns();
    let read = cache.try_get(key).await;
    let ok = read.is_ok();
    op(Kind::Read, phase, node, key, t0, ok, read.ok().flatten())
}

fn op(
    kind: Kind,
    phase: Phase,
    node: usize,
    key: &str,
    start: u64,
    ok: bool,
    value: Option<String>,
) -> Op {
    Op {
        kind,
        phase,
        node,
        key: key.to_string(),
        start,
        end: now_ns(),
        ok,
        value,
    }
}
