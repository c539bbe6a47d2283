//! Transport benchmarks: fusioncache over a real `redis-server` / `nats-server`, printed as a markdown table
//! next to raw client baselines measured in the same run.
//!
//! `make bench-redis` / `make bench-nats`, or `transport-bench <redis|nats> [--wait-quiet SECONDS]
//! [--only-e2e]` on a release build (`--wait-quiet`: first wait, up to that long, for the 1-minute load
//! average to fall to `QUIET_LOAD`; `--only-e2e`: only the end-to-end rows, e.g. under a profiler).
//!
//! Method (see issues 3 and 4):
//! - the server is started by the testkit on a free loopback port (never the machine's 6379 / 4222);
//! - this process pins itself to core 0 first thing in `main` (every thread created later inherits the
//!   mask), and the server, all its threads, to core 1;
//! - everything runs on one tokio `current_thread` runtime (the process has one core anyway);
//! - fusioncache and its raw baseline run in alternating blocks (latency) or rounds (throughput), so both
//!   see the same machine;
//! - a node is used only once a probe message published on its channel has reached it (see `wait_live`);
//! - every wait is bounded: a stuck server is an error, never a hang;
//! - rows whose label starts with `part:` time part of the path only (what they leave out is in the
//!   label); `end to end:` rows go from node A's API to node B's L1, both nodes built as the README
//!   builds them (Redis L2 + the backplane).

use std::cell::Cell;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use fusioncache::backplane::nats::NatsBackplane;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::backplane::{channel_name, now_ticks, Action, BackplaneMessage};
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::{EntryOptions, FusionCache};
use fusioncache_testkit::bench::{
    cpus_allowed, load_average, median, percentiles, pin, pin_server, wait_for_quiet, within,
    QUIET_LOAD,
};
use fusioncache_testkit::{NatsServer, RedisServer};
use futures_util::StreamExt;

type BoxError = Box<dyn std::error::Error>;
type Res<T> = Result<T, BoxError>;

/// Latency iterations run (and discarded) before measuring, per side.
const WARMUP: usize = 200;
/// Latency iterations measured, per side.
const ITERATIONS: usize = 2_000;
/// Latency iterations per block; the two sides alternate blocks.
const BLOCK: usize = 200;
/// Messages per throughput round.
const THROUGHPUT_MESSAGES: usize = 200_000;
/// Messages per pipeline (Redis) or per flush (NATS).
const PIPELINE: usize = 500;
/// The most messages published and not yet consumed: the publisher waits above it. Bursts larger than
/// async-nats' subscription buffer (65 536 messages) would otherwise be dropped by the client (slow
/// consumer), on the raw side as on fusioncache's, and Redis would buffer megabytes per subscriber.
const WINDOW: usize = 20_000;
/// Throughput rounds per side; the median is reported (after one discarded warm-up round per side).
const ROUNDS: usize = 3;
/// The longest one latency iteration (or settling step) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one throughput round may take.
const ROUND_TIMEOUT: Duration = Duration::from_secs(20);
/// A throughput round ends early when its consumer got nothing for this long (messages were lost).
const STALL: Duration = Duration::from_secs(1);
/// The longest a connection or subscription may take to come up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The propagated key; with a 36-byte instance id its backplane message is 61 bytes.
const KEY: &str = "bench:k";
/// A foreign instance id (no cache of this process has it, so its messages are applied, not ignored).
const FOREIGN_SOURCE: &str = "0b5f8a3e-9c1d-4e7f-8a2b-3c4d5e6f7a8b";
/// The channel of the raw latency baseline (no cache listens on it).
const RAW_LATENCY_CHANNEL: &str = "rawbench.Backplane:v2";

fn main() -> ExitCode {
    // First thing: pin this process to core 0. Only the main thread exists yet; every thread created later
    // (the runtime's, its blocking pool's) inherits the mask.
    let self_pin = pin(std::process::id(), 0);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let transport = match args.first().map(String::as_str) {
        Some("redis") => Transport::Redis,
        Some("nats") => Transport::Nats,
        _ => return usage(),
    };
    let (mut wait_quiet, mut only_e2e) = (None, false);
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--wait-quiet" => match rest.next().and_then(|s| s.parse().ok()) {
                Some(secs) => wait_quiet = Some(Duration::from_secs(secs)),
                None => return usage(),
            },
            "--only-e2e" => only_e2e = true,
            _ => return usage(),
        }
    }
    if let Some(limit) = wait_quiet {
        wait_for_quiet("transport-bench", limit);
    }
    match run(transport, self_pin, only_e2e) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("transport-bench {}: error: {e}", transport.name());
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: transport-bench <redis|nats> [--wait-quiet SECONDS] [--only-e2e]");
    ExitCode::from(2)
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Redis,
    Nats,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Redis => "redis",
            Transport::Nats => "nats",
        }
    }
}

fn run(transport: Transport, self_pin: Result<(), String>, only_e2e: bool) -> Res<()> {
    let started = Instant::now();
    let mut notes = Vec::new();
    let load_before = load_average()?;
    let quiet = load_before <= QUIET_LOAD;
    if !quiet {
        notes.push(format!(
            "WARNING: 1-minute load average is {load_before:.2} (> {QUIET_LOAD}) before measuring: the \
             machine is not quiet (another build?), figures may be noisy"
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the tokio runtime: {e}"))?;

    let report = match transport {
        Transport::Redis => {
            let server =
                RedisServer::start().map_err(|e| format!("cannot start redis-server: {e}"))?;
            let pid = server
                .pid()
                .ok_or("redis-server exited right after it started")?;
            notes.push(pin_server("redis-server", pid));
            rt.block_on(redis_bench(&server, only_e2e))?
        }
        Transport::Nats => {
            let server =
                NatsServer::start().map_err(|e| format!("cannot start nats-server: {e}"))?;
            let pid = server
                .pid()
                .ok_or("nats-server exited right after it started")?;
            notes.push(pin_server("nats-server", pid));
            // The end-to-end rows' L2, on the servers' core too.
            let redis =
                RedisServer::start().map_err(|e| format!("cannot start redis-server: {e}"))?;
            let redis_pid = redis
                .pid()
                .ok_or("redis-server exited right after it started")?;
            notes.push(pin_server("redis-server", redis_pid));
            rt.block_on(nats_bench(&server, &redis, only_e2e))?
        }
    };
    let load_after = load_average()?;
    // Read now that every thread of this process exists.
    notes.insert(
        0,
        match self_pin {
            Ok(()) => format!(
                "bench process pinned to core 0 (taskset -a -cp 0; cpus allowed: {})",
                cpus_allowed(std::process::id())
            ),
            Err(e) => format!("WARNING: the bench process is not pinned to core 0: {e}"),
        },
    );

    println!();
    println!("## transport-bench {}", transport.name());
    println!();
    println!("server: {}", report.server);
    println!(
        "1-minute load average: {load_before:.2} before, {load_after:.2} after{}",
        if quiet { "" } else { " (NOT QUIET)" }
    );
    println!(
        "runtime: tokio current_thread for every measure (the process is pinned to one core, so a \
         multi-thread runtime would only add cross-thread wake-ups)"
    );
    for note in notes.iter().chain(&report.notes) {
        println!("{note}");
    }
    println!();
    println!("| measure | fusioncache | raw baseline | ratio | goal |");
    println!("|---|---:|---:|---:|---|");
    for row in &report.rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.measure,
            row.fusioncache,
            row.baseline,
            row.ratio.map_or("-".to_string(), |r| format!("{r:.2}x")),
            row.goal
                .map_or(String::new(), |g| g.verdict(row.ratio, row.value)),
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
    server: String,
    rows: Vec<Row>,
    notes: Vec<String>,
    details: Vec<String>,
}

struct Row {
    measure: String,
    fusioncache: String,
    baseline: String,
    /// fusioncache's figure; `None` when it has none (it failed).
    value: Option<f64>,
    /// fusioncache / baseline; `None` when fusioncache has no figure (it failed).
    ratio: Option<f64>,
    goal: Option<Goal>,
}

#[derive(Debug, Clone, Copy)]
enum Goal {
    /// The ratio at most this.
    AtMost(f64),
    /// The ratio at least this.
    AtLeast(f64),
    /// fusioncache's own figure (a latency) at most this many microseconds, whatever the baseline.
    MicrosAtMost(f64),
}

impl Goal {
    fn verdict(self, ratio: Option<f64>, value: Option<f64>) -> String {
        let (text, met) = match self {
            Goal::AtMost(g) => (format!("<= {g:.2}x"), ratio.is_some_and(|r| r <= g)),
            Goal::AtLeast(g) => (format!(">= {g:.2}x"), ratio.is_some_and(|r| r >= g)),
            Goal::MicrosAtMost(g) => (format!("<= {g:.0} µs"), value.is_some_and(|v| v <= g)),
        };
        format!("{text}: {}", if met { "met" } else { "MISSED" })
    }
}

/// The p50 and p99 rows of a latency pair (fusioncache, baseline), labelled `{what} p50 (µs){vs}`.
fn latency_rows(
    what: &str,
    vs: &str,
    fc: &mut [Duration],
    base: &mut [Duration],
    p50_goal: Option<Goal>,
    p99_goal: Option<Goal>,
) -> Vec<Row> {
    let (fc50, fc99) = percentiles(fc);
    let (b50, b99) = percentiles(base);
    [("p50", fc50, b50, p50_goal), ("p99", fc99, b99, p99_goal)]
        .into_iter()
        .map(|(p, f, b, goal)| Row {
            measure: format!("{what} {p} (µs){vs}"),
            fusioncache: format!("{f:.1}"),
            baseline: format!("{b:.1}"),
            value: Some(f),
            ratio: Some(f / b),
            goal,
        })
        .collect()
}

/// A fusioncache throughput round: msgs/s, or what went wrong.
type FcRound = Result<f64, String>;

fn throughput_row(what: &str, fc: &[FcRound], raw: &[f64]) -> (Row, Vec<String>) {
    let list = |v: &mut dyn Iterator<Item = f64>| {
        v.map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
    };
    let r = median(raw);
    let rates: Vec<f64> = fc.iter().filter_map(|x| x.as_ref().ok().copied()).collect();
    let failures: Vec<&String> = fc.iter().filter_map(|x| x.as_ref().err()).collect();
    let (fusioncache, value) = if failures.is_empty() {
        let f = median(&rates);
        (format!("{f:.0}"), Some(f))
    } else {
        (
            format!("LOST MESSAGES in {} of {ROUNDS} rounds", failures.len()),
            None,
        )
    };
    let row = Row {
        measure: format!("{what} (msgs/s, median of {ROUNDS})"),
        fusioncache,
        baseline: format!("{r:.0}"),
        value,
        ratio: value.map(|f| f / r),
        goal: Some(Goal::AtLeast(0.8)),
    };
    let mut details = vec![format!(
        "throughput rounds ({THROUGHPUT_MESSAGES} messages each, alternating raw then fusioncache, after one \
         discarded warm-up round each): raw [{}] msgs/s; fusioncache [{}] msgs/s",
        list(&mut raw.iter().copied()),
        list(&mut rates.iter().copied()),
    )];
    for f in failures {
        details.push(format!("fusioncache throughput round: {f}"));
    }
    (row, details)
}

// ---------------------------------------------------------------------------------------------------------
// Machine

// ---------------------------------------------------------------------------------------------------------
// Helpers

/// Yields until `cond` holds, at most `limit`.
async fn settle(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Res<()> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}").into());
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}

async fn ready(cache: &FusionCache<String>, what: &str) -> Res<()> {
    if cache.wait_for_backplane(CONNECT_TIMEOUT).await {
        Ok(())
    } else {
        Err(format!(
            "{what}: backplane not connected after {CONNECT_TIMEOUT:?} (state {:?})",
            cache.backplane_state()
        )
        .into())
    }
}

fn entry_options() -> EntryOptions {
    EntryOptions::new().duration(Duration::from_secs(600))
}

/// A value of ~48 bytes.
fn value(seq: u64) -> String {
    format!("value {seq:012} of a benchmark entry, 48 bytes")
}

/// A valid backplane message from a foreign node, as in the latency baselines (61 bytes).
fn sample_payload() -> Bytes {
    BackplaneMessage::new(FOREIGN_SOURCE, now_ticks(), Action::Set, KEY).encode()
}

/// `n` valid `Remove` messages on distinct keys, from a foreign node.
fn removal_payloads(n: usize) -> Vec<Bytes> {
    let ts = now_ticks();
    (0..n)
        .map(|i| {
            let key = format!("bench:t:{i:06}");
            BackplaneMessage::new(FOREIGN_SOURCE, ts, Action::Remove, &key).encode()
        })
        .collect()
}

/// A raw client publishing probe messages.
enum RawPublisher<'a> {
    Redis(&'a mut redis::aio::MultiplexedConnection),
    Nats(&'a async_nats::Client),
}

impl RawPublisher<'_> {
    async fn publish(&mut self, channel: &str, payload: Bytes) -> Res<()> {
        match self {
            RawPublisher::Redis(conn) => {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload.as_ref())
                    .query_async::<i64>(&mut **conn)
                    .await
                    .map_err(|e| format!("PUBLISH: {e}"))?;
            }
            RawPublisher::Nats(client) => {
                client
                    .publish(channel.to_string(), payload)
                    .await
                    .map_err(|e| format!("NATS publish: {e}"))?;
                client
                    .flush()
                    .await
                    .map_err(|e| format!("NATS flush: {e}"))?;
            }
        }
        Ok(())
    }
}

/// How often `wait_for_backplane` said "connected" before the node could actually receive.
#[derive(Default)]
struct Liveness {
    setups: usize,
    early: usize,
    most_probes: usize,
}

impl Liveness {
    fn note(&self) -> Option<String> {
        (self.early > 0).then(|| {
            format!(
                "NOTE: in {} of {} node setups, wait_for_backplane() returned true before the node \
                 received anything published on its channel (up to {} probes 10 ms apart were needed): \
                 notifications sent in that window are lost",
                self.early, self.setups, self.most_probes
            )
        })
    }
}

/// Publishes probe messages (a foreign `Remove` of an unused key) on the nodes' channel, 10 ms apart,
/// until every node applied one, then lets stragglers arrive. `wait_for_backplane` alone is not enough:
/// it may report the subscription live before the server has it.
async fn wait_live(
    mut publisher: RawPublisher<'_>,
    nodes: &[&FusionCache<String>],
    liveness: &mut Liveness,
) -> Res<()> {
    let Some(first) = nodes.first() else {
        return Ok(());
    };
    let probe =
        BackplaneMessage::new(FOREIGN_SOURCE, now_ticks(), Action::Remove, "bench:probe").encode();
    let before: Vec<u64> = nodes.iter().map(|n| n.stats().backplane_received).collect();
    let t0 = Instant::now();
    let mut probes = 0;
    loop {
        publisher.publish(first.channel(), probe.clone()).await?;
        probes += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let live = nodes
            .iter()
            .zip(&before)
            .all(|(n, b)| n.stats().backplane_received > *b);
        if live {
            break;
        }
        if t0.elapsed() > CONNECT_TIMEOUT {
            return Err(format!(
                "nodes on {} received no probe message within {CONNECT_TIMEOUT:?}",
                first.channel()
            )
            .into());
        }
    }
    liveness.setups += 1;
    if probes > 1 {
        liveness.early += 1;
        liveness.most_probes = liveness.most_probes.max(probes);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

/// CPU time (user + system, all threads) of a process, from /proc, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU time of all the servers (their sum), in seconds.
fn servers_cpu_seconds(servers: &[u32]) -> Option<f64> {
    servers.iter().map(|pid| cpu_seconds(*pid)).sum()
}

/// CPU use of the bench and of the server(s) over the timed throughput rounds of one side.
#[derive(Default)]
struct CpuUse {
    wall: f64,
    bench: f64,
    server: f64,
}

impl CpuUse {
    /// Starts measuring one round.
    fn start(servers: &[u32]) -> (Instant, Option<f64>, Option<f64>) {
        (
            Instant::now(),
            cpu_seconds(std::process::id()),
            servers_cpu_seconds(servers),
        )
    }

    fn add(&mut self, servers: &[u32], start: (Instant, Option<f64>, Option<f64>)) {
        let (t0, bench0, server0) = start;
        let bench1 = cpu_seconds(std::process::id());
        let server1 = servers_cpu_seconds(servers);
        self.wall += t0.elapsed().as_secs_f64();
        self.bench += bench1.zip(bench0).map_or(f64::NAN, |(b, a)| b - a);
        self.server += server1.zip(server0).map_or(f64::NAN, |(b, a)| b - a);
    }

    fn describe(&self) -> String {
        format!(
            "bench process {:.0}% of its core, server(s) {:.0}% of core 1",
            100.0 * self.bench / self.wall,
            100.0 * self.server / self.wall
        )
    }
}

fn cpu_detail(raw: &CpuUse, fc: &CpuUse) -> String {
    format!(
        "CPU use over the timed throughput rounds: raw: {}; fusioncache: {}",
        raw.describe(),
        fc.describe()
    )
}

/// One timed operation of a latency measure.
trait Probe {
    /// What one iteration measures.
    type Sample;
    /// Runs one iteration and returns its timed part(s).
    async fn once(&mut self) -> Res<Self::Sample>;
    /// Called after every block, outside the timed sections: lets background work finish.
    async fn quiesce(&mut self) -> Res<()> {
        Ok(())
    }
}

/// Warms both up, then measures `ITERATIONS` of each in alternating blocks (the order flips every block).
async fn interleaved<F: Probe, B: Probe>(
    fc: &mut F,
    base: &mut B,
) -> Res<(Vec<F::Sample>, Vec<B::Sample>)> {
    for _ in 0..WARMUP {
        fc.once().await?;
    }
    fc.quiesce().await?;
    for _ in 0..WARMUP {
        base.once().await?;
    }
    base.quiesce().await?;
    let (mut a, mut b) = (
        Vec::with_capacity(ITERATIONS),
        Vec::with_capacity(ITERATIONS),
    );
    for block in 0..ITERATIONS.div_ceil(BLOCK) {
        for side in 0..2 {
            if (block + side) % 2 == 0 {
                for _ in 0..BLOCK {
                    a.push(fc.once().await?);
                }
                fc.quiesce().await?;
            } else {
                for _ in 0..BLOCK {
                    b.push(base.once().await?);
                }
                base.quiesce().await?;
            }
        }
    }
    Ok((a, b))
}

/// Propagation: A sets, B's L1 stops holding the old value.
struct Propagation {
    a: FusionCache<String>,
    b: FusionCache<String>,
    /// Without L2, B's entry is only marked stale: B sets the new value locally after each iteration.
    refill_locally: bool,
    local_only: EntryOptions,
    /// The options of A's timed `set`s.
    set_options: EntryOptions,
    seq: u64,
    current: String,
    /// Sets done on A, each of which comes back to A as a self message.
    a_sets: u64,
}

impl Propagation {
    async fn new(
        a: FusionCache<String>,
        b: FusionCache<String>,
        refill_locally: bool,
    ) -> Res<Self> {
        ready(&a, "node A").await?;
        ready(&b, "node B").await?;
        let mut p = Self {
            a,
            b,
            refill_locally,
            local_only: entry_options().skip_backplane_notifications(true),
            set_options: entry_options(),
            seq: 0,
            current: value(0),
            a_sets: 0,
        };
        if refill_locally {
            p.b.set_with(KEY, p.current.clone(), &p.local_only)
                .await
                .map_err(|e| format!("node B set: {e}"))?;
        } else {
            p.a.set(KEY, p.current.clone())
                .await
                .map_err(|e| format!("node A set: {e}"))?;
            p.a_sets += 1;
            p.b.get(KEY).await;
        }
        if p.b.peek(KEY).as_ref() != Some(&p.current) {
            return Err("node B does not hold the key in L1 after the initial write".into());
        }
        p.wait_for_echo().await?;
        Ok(p)
    }

    async fn wait_for_echo(&self) -> Res<()> {
        let a = &self.a;
        let want = self.a_sets;
        settle(
            STEP_TIMEOUT,
            "node A's own notifications to come back",
            || a.stats().backplane_self_ignored >= want,
        )
        .await
    }
}

/// One write seen end to end (fusioncache: A's `set` → B's L1; raw: SET, PUBLISH → subscriber).
#[derive(Debug, Clone, Copy)]
struct E2eSample {
    /// From the call to its return (raw: the SET and the PUBLISH both answered).
    call_to_return: Duration,
    /// From the call's return to B no longer holding the old value (raw: from the PUBLISH sent to its
    /// receipt).
    lag: Duration,
    /// From the call to B no longer holding the old value (raw: to the subscriber's receipt).
    call_to_b: Duration,
}

/// The samples' `part`, as its own vector.
fn part(samples: &[E2eSample], part: fn(&E2eSample) -> Duration) -> Vec<Duration> {
    samples.iter().map(part).collect()
}

impl Probe for Propagation {
    type Sample = E2eSample;

    async fn once(&mut self) -> Res<E2eSample> {
        self.seq += 1;
        let new = value(self.seq);
        let t0 = Instant::now();
        self.a
            .set_with(KEY, new.clone(), &self.set_options)
            .await
            .map_err(|e| format!("node A set: {e}"))?;
        let returned = Instant::now();
        while self.b.peek(KEY).as_ref() == Some(&self.current) {
            if returned.elapsed() > STEP_TIMEOUT {
                return Err(format!(
                    "node B still holds the old value {STEP_TIMEOUT:?} after node A's set"
                )
                .into());
            }
            tokio::task::yield_now().await;
        }
        let seen = Instant::now();
        let sample = E2eSample {
            call_to_return: returned - t0,
            lag: seen - returned,
            call_to_b: seen - t0,
        };
        self.a_sets += 1;

        // Untimed: B holds the new value again, and A's own notification has come back.
        if self.refill_locally {
            self.b
                .set_with(KEY, new.clone(), &self.local_only)
                .await
                .map_err(|e| format!("node B local set: {e}"))?;
        } else {
            // B refreshes from L2 in the background; fall back to a read if that does not happen.
            let b = &self.b;
            let refreshed = settle(Duration::from_millis(200), "B's refresh", || {
                b.peek(KEY).as_ref() == Some(&new)
            })
            .await;
            if refreshed.is_err() && b.get(KEY).await.as_ref() != Some(&new) {
                return Err("node B cannot read the new value from L2".into());
            }
        }
        self.wait_for_echo().await?;
        self.current = new;
        Ok(sample)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Redis

fn redis_node(url: &str, name: &str, backplane: bool) -> Res<FusionCache<String>> {
    let conn = RedisConnection::open(url).map_err(|e| format!("invalid redis url {url}: {e}"))?;
    let mut builder = FusionCache::builder()
        .name(name)
        .default_entry_options(entry_options())
        .distributed_cache(RedisDistributedCache::new(conn.clone()));
    if backplane {
        builder = builder.backplane(RedisBackplane::new(conn));
    }
    builder
        .build()
        .map_err(|e| format!("cannot build cache {name}: {e}").into())
}

/// How many more subscribers the fleet rows put on the channel: the other nodes of a fleet.
const FLEET: usize = 50;
/// The cache name (and so the channel) of the fleet rows.
const FLEET_NODE: &str = "benchfleet";

/// `set` on one node of a fleet, each call once the previous one's notification was sent and the server
/// has finished its fan-out (an untimed PING answered after it).
struct FleetSet {
    node: FusionCache<String>,
    options: EntryOptions,
    idle: redis::aio::MultiplexedConnection,
    seq: u64,
}

impl Probe for FleetSet {
    type Sample = Duration;

    async fn once(&mut self) -> Res<Duration> {
        self.seq += 1;
        let sent = self.node.stats().backplane_sent;
        let t0 = Instant::now();
        self.node
            .set_with(KEY, value(self.seq), &self.options)
            .await
            .map_err(|e| format!("fleet node set: {e}"))?;
        let took = t0.elapsed();
        let node = &self.node;
        settle(STEP_TIMEOUT, "the fleet node's notification", || {
            node.stats().backplane_sent > sent
        })
        .await?;
        redis::cmd("PING")
            .query_async::<()>(&mut self.idle)
            .await
            .map_err(|e| format!("PING: {e}"))?;
        Ok(took)
    }
}

/// Raw redis-rs: one awaited SET.
struct RawSet {
    conn: redis::aio::MultiplexedConnection,
    seq: u64,
}

impl Probe for RawSet {
    type Sample = Duration;

    async fn once(&mut self) -> Res<Duration> {
        self.seq += 1;
        let mut set = redis::cmd("SET");
        set.arg("bench:fleet:raw").arg(value(self.seq).as_bytes());
        let t0 = Instant::now();
        set.query_async::<()>(&mut self.conn)
            .await
            .map_err(|e| format!("raw SET: {e}"))?;
        Ok(t0.elapsed())
    }
}

/// The fleet rows: A's `set`, call → return, with `FLEET` more subscribers on A's channel, notification in
/// the background (the default) and awaited, against a raw SET. The subscribers are raw connections that
/// never read (the kernel buffers what they are sent): the bench process does none of their work, so the
/// rows show what the server's fan-out to a fleet costs the writer.
async fn fleet_rows(
    server: &RedisServer,
    client: &redis::Client,
    rows: &mut Vec<Row>,
    details: &mut Vec<String>,
) -> Res<()> {
    let channel = channel_name(None, Some(FLEET_NODE));
    let mut fleet = Vec::with_capacity(FLEET);
    for _ in 0..FLEET {
        use tokio::io::AsyncWriteExt;
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .map_err(|e| format!("fleet subscriber: {e}"))?;
        let subscribe = format!(
            "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
            channel.len()
        );
        conn.write_all(subscribe.as_bytes())
            .await
            .map_err(|e| format!("fleet subscriber: {e}"))?;
        fleet.push(conn);
    }
    let node = redis_node(&server.url(), FLEET_NODE, true)?;
    ready(&node, "fleet node").await?;
    let mut raw = RawSet {
        conn: client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("raw connection: {e}"))?,
        seq: 0,
    };
    let mut numsub = raw.conn.clone();
    within(STEP_TIMEOUT, "the fleet subscribers to subscribe", async {
        while redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async::<(String, usize)>(&mut numsub)
            .await
            .map_or(0, |(_, n)| n)
            < FLEET + 1
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    for (label, options) in [
        ("notification in the background (default)", entry_options()),
        (
            "notification awaited (`background_backplane_operations(false)`)",
            entry_options().background_backplane_operations(false),
        ),
    ] {
        let mut probe = FleetSet {
            node: node.clone(),
            options,
            idle: raw.conn.clone(),
            seq: 0,
        };
        let (mut fc, mut base) = interleaved(&mut probe, &mut raw).await?;
        rows.extend(latency_rows(
            &format!("fleet of {FLEET} more subscribers: A's `set`, {label}, call → return"),
            "; raw: SET awaited",
            &mut fc,
            &mut base,
            None,
            None,
        ));
    }
    details.push(format!(
        "fleet: node A (Redis L2 + backplane on one connection) with {FLEET} more subscribers on its channel \
         (raw connections that never read, so the bench process does none of their work), {ITERATIONS} sets \
         per side in alternating blocks of {BLOCK}, each once the previous one's notification was sent and \
         an untimed PING came back (the server is done with its fan-out); raw = one awaited SET of a 48-byte \
         value"
    ));
    drop(fleet);
    Ok(())
}

/// Raw redis-rs: PUBLISH on a multiplexed connection, receipt on a pub/sub connection.
struct RawRedisLatency {
    conn: redis::aio::MultiplexedConnection,
    stream: redis::aio::PubSubStream,
    payload: Bytes,
}

impl Probe for RawRedisLatency {
    type Sample = Duration;

    async fn once(&mut self) -> Res<Duration> {
        let Self {
            conn,
            stream,
            payload,
        } = self;
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(RAW_LATENCY_CHANNEL).arg(payload.as_ref());
        let t0 = Instant::now();
        let (published, (received, at)) = within(STEP_TIMEOUT, "a raw PUBLISH to arrive", async {
            tokio::join!(cmd.query_async::<i64>(conn), async {
                (stream.next().await.is_some(), Instant::now())
            })
        })
        .await?;
        let receivers = published.map_err(|e| format!("raw PUBLISH: {e}"))?;
        if !received || receivers != 1 {
            return Err(
                format!("raw pub/sub: stream ended or wrong receiver count ({receivers})").into(),
            );
        }
        Ok(at - t0)
    }
}

/// `set` on one node (with or without backplane).
struct SetProbe {
    node: FusionCache<String>,
    backplane: bool,
    /// Waits, untimed, after every set until its notification has come back, so that no background
    /// work of one set overlaps the next (otherwise only after every block).
    spaced: bool,
    seq: u64,
    keys: Vec<String>,
}

impl SetProbe {
    fn new(node: FusionCache<String>, backplane: bool, spaced: bool) -> Self {
        Self {
            node,
            backplane,
            spaced,
            seq: 0,
            keys: (0..100).map(|i| format!("bench:s:{i:03}")).collect(),
        }
    }
}

impl Probe for SetProbe {
    type Sample = Duration;

    async fn once(&mut self) -> Res<Duration> {
        self.seq += 1;
        let key = &self.keys[(self.seq % self.keys.len() as u64) as usize];
        let v = value(self.seq);
        let t0 = Instant::now();
        self.node
            .set(key, v)
            .await
            .map_err(|e| format!("set: {e}"))?;
        let elapsed = t0.elapsed();
        if self.spaced {
            self.quiesce().await?;
        }
        Ok(elapsed)
    }

    async fn quiesce(&mut self) -> Res<()> {
        if !self.backplane {
            return Ok(());
        }
        let (node, want) = (&self.node, self.seq);
        settle(STEP_TIMEOUT, "the node's own notifications", || {
            node.stats().backplane_self_ignored >= want
        })
        .await
    }
}

/// `set` latency on a node with L2 + backplane against one with L2 only.
async fn set_rows(url: &str, spaced: bool) -> Res<Vec<Row>> {
    let on = redis_node(url, "benchset", true)?;
    ready(&on, "set node (backplane on)").await?;
    let off = redis_node(url, "benchset", false)?;
    let (mut with_bp, mut without_bp) = interleaved(
        &mut SetProbe::new(on, true, spaced),
        &mut SetProbe::new(off, false, spaced),
    )
    .await?;
    let what = if spaced {
        "part: A's `set` alone, spaced (backplane on vs off)"
    } else {
        "part: A's `set` alone, back-to-back (backplane on vs off)"
    };
    let mut rows = latency_rows(
        what,
        "",
        &mut with_bp,
        &mut without_bp,
        Some(Goal::AtMost(1.1)),
        None,
    );
    for r in &mut rows {
        r.baseline = format!("{} (off)", r.baseline);
    }
    Ok(rows)
}

async fn redis_publish_all(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    payloads: &[Bytes],
    consumed: impl Fn() -> u64,
) -> Res<()> {
    for (i, chunk) in payloads.chunks(PIPELINE).enumerate() {
        if !wait_for_window((i * PIPELINE) as u64, &consumed).await {
            return Ok(()); // the consumer lost messages: the counting side reports it
        }
        let mut pipe = redis::pipe();
        for p in chunk {
            pipe.cmd("PUBLISH").arg(channel).arg(p.as_ref()).ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| format!("pipelined PUBLISH: {e}"))?;
    }
    Ok(())
}

/// Before publishing more: waits (1 ms sleeps) while more than `WINDOW` of the `sent` messages are not yet
/// consumed. Returns `false` when the consumer made no progress for `STALL` (messages were lost).
async fn wait_for_window(sent: u64, consumed: &impl Fn() -> u64) -> bool {
    let (mut seen, mut at) = (consumed(), Instant::now());
    while sent.saturating_sub(seen) > WINDOW as u64 {
        if at.elapsed() > STALL {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = consumed();
        if now != seen {
            (seen, at) = (now, Instant::now());
        }
    }
    true
}

/// Messages per second from the first PUBLISH until the last message counted.
fn rate(t0: Instant, done: Instant) -> f64 {
    THROUGHPUT_MESSAGES as f64 / (done - t0).as_secs_f64()
}

/// The cache name of the throughput nodes (it names their channel).
const THROUGHPUT_NODE: &str = "benchtp";

/// What the throughput rounds need of a transport.
trait Bus {
    /// Names the raw side in errors.
    const RAW: &'static str;
    /// What ends the raw side's message stream, in errors.
    const RAW_ENDED: &'static str;
    /// What the server counts when no side of a round is connected (subscribers or connections).
    const IDLE: u64;
    /// What it counts once one side subscribed; `None`: not waited for.
    const SUBSCRIBED: Option<u64>;
    /// Propagation without L2: B's entry only goes stale, and B sets the new value locally.
    const REFILL_LOCALLY: bool;
    /// The raw side's subscription.
    type Sub: futures_util::Stream + Unpin;
    /// The raw propagation baseline.
    type RawLatency: Probe<Sample = Duration>;

    /// What the server counts now (see `IDLE`).
    async fn count(&mut self) -> Res<u64>;
    /// The error when the count is still not `want` after `CONNECT_TIMEOUT`.
    fn count_mismatch(&self, n: u64, want: u64) -> String;
    /// Subscribes a raw client on the throughput channel.
    async fn raw_subscribe(&mut self) -> Res<Self::Sub>;
    /// A fusioncache node named `name`.
    async fn node(&self, name: &str) -> Res<FusionCache<String>>;
    /// The raw propagation baseline, subscribed on `RAW_LATENCY_CHANNEL`.
    async fn raw_latency(&mut self) -> Res<Self::RawLatency>;
    /// The detail line of the propagation measure, from fusioncache's setup on.
    fn propagation_detail(raw: &Self::RawLatency) -> String;
    fn publisher(&mut self) -> RawPublisher<'_>;
    /// Publishes `payloads` on the throughput channel, in batches of `PIPELINE`, at most `WINDOW` ahead of
    /// `consumed`.
    async fn publish_all(&mut self, payloads: &[Bytes], consumed: impl Fn() -> u64) -> Res<()>;
}

/// Waits until the server counts `want` (a dropped subscriber is really gone).
async fn wait_count(bus: &mut impl Bus, want: u64) -> Res<()> {
    let t0 = Instant::now();
    loop {
        let n = bus.count().await?;
        if n == want {
            return Ok(());
        }
        if t0.elapsed() > CONNECT_TIMEOUT {
            return Err(bus.count_mismatch(n, want).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Propagation latency: fusioncache (node A sets, node B sees) against the raw baseline; pushes the rows
/// and the detail.
async fn propagation<B: Bus>(
    bus: &mut B,
    liveness: &mut Liveness,
    rows: &mut Vec<Row>,
    details: &mut Vec<String>,
) -> Res<()> {
    let (fc, mut raw) = {
        let a = bus.node("bench").await?;
        let b = bus.node("bench").await?;
        ready(&a, "node A").await?;
        ready(&b, "node B").await?;
        wait_live(bus.publisher(), &[&a, &b], liveness).await?;
        let mut prop = Propagation::new(a, b, B::REFILL_LOCALLY).await?;
        let mut base = bus.raw_latency().await?;
        details.push(format!(
            "propagation: {ITERATIONS} iterations per side after {WARMUP} of warm-up, blocks of {BLOCK} \
             alternating; fusioncache = A.set returned -> B.peek no longer the old value ({}",
            B::propagation_detail(&base)
        ));
        interleaved(&mut prop, &mut base).await?
    };
    rows.extend(latency_rows(
        if B::REFILL_LOCALLY {
            "part: propagation from A's `set` returned to B's L1 (no L2)"
        } else {
            "part: propagation from A's `set` returned to B's L1"
        },
        "",
        &mut part(&fc, |s| s.lag),
        &mut raw,
        None,
        Some(Goal::AtMost(2.0)),
    ));
    Ok(())
}

/// Notifications applied per second: `ROUNDS` rounds (after a discarded warm-up round), each timing the
/// raw side then fusioncache; pushes the row and its details.
async fn throughput_rounds<B: Bus>(
    bus: &mut B,
    server_pid: u32,
    payloads: &[Bytes],
    liveness: &mut Liveness,
    rows: &mut Vec<Row>,
    details: &mut Vec<String>,
) -> Res<()> {
    let (mut fc_rates, mut raw_rates) = (Vec::new(), Vec::new());
    let (mut fc_cpu, mut raw_cpu) = (CpuUse::default(), CpuUse::default());
    for round in 0..=ROUNDS {
        // Round 0 warms both sides up and is discarded.
        let keep = round > 0;
        // (a) raw: a subscriber on its own connection counts the messages.
        wait_count(bus, B::IDLE).await?;
        let mut sub = bus.raw_subscribe().await?;
        if let Some(want) = B::SUBSCRIBED {
            wait_count(bus, want).await?;
        }
        let what = format!("{} throughput", B::RAW);
        let counted = Cell::new(0u64);
        let cpu = CpuUse::start(&[server_pid]);
        let t0 = Instant::now();
        let (published, (count, done)) = within(ROUND_TIMEOUT, &what, async {
            tokio::join!(bus.publish_all(payloads, || counted.get()), async {
                let mut n = 0;
                while n < THROUGHPUT_MESSAGES
                    && matches!(tokio::time::timeout(STALL, sub.next()).await, Ok(Some(_)))
                {
                    n += 1;
                    counted.set(n as u64);
                }
                (n, Instant::now())
            })
        })
        .await?;
        published?;
        if count != THROUGHPUT_MESSAGES {
            return Err(format!(
                "{}: {count} of {THROUGHPUT_MESSAGES} messages received ({} ended or nothing for \
                 {STALL:?}): the baseline lost messages",
                B::RAW,
                B::RAW_ENDED
            )
            .into());
        }
        if keep {
            raw_rates.push(rate(t0, done));
            raw_cpu.add(&[server_pid], cpu);
        }
        drop(sub);

        // (b) fusioncache: a node on its own connection counts what it applied.
        wait_count(bus, B::IDLE).await?;
        let node = bus.node(THROUGHPUT_NODE).await?;
        ready(&node, "throughput node").await?;
        if let Some(want) = B::SUBSCRIBED {
            wait_count(bus, want).await?;
        }
        wait_live(bus.publisher(), &[&node], liveness).await?;
        let base = node.stats().backplane_received;
        let cpu = CpuUse::start(&[server_pid]);
        let t0 = Instant::now();
        let (published, (applied, done)) = within(ROUND_TIMEOUT, "fusioncache throughput", async {
            tokio::join!(
                bus.publish_all(payloads, || node.stats().backplane_received - base),
                count_applied(&node, base, THROUGHPUT_MESSAGES as u64)
            )
        })
        .await?;
        published?;
        check_applied(&node)?;
        if keep {
            fc_rates.push(fc_outcome(&node, applied, t0, done));
            fc_cpu.add(&[server_pid], cpu);
        }
        drop(node);
    }
    let (row, more) = throughput_row(
        "part: B applies raw-published Remove messages (no L2 work, A not in it)",
        &fc_rates,
        &raw_rates,
    );
    rows.push(row);
    details.extend(more);
    details.push(cpu_detail(&raw_cpu, &fc_cpu));
    Ok(())
}

/// Redis: subscribers are counted with PUBSUB NUMSUB on the throughput channel.
struct RedisBus<'a> {
    publisher: &'a mut redis::aio::MultiplexedConnection,
    client: &'a redis::Client,
    url: &'a str,
    channel: String,
}

impl Bus for RedisBus<'_> {
    const RAW: &'static str = "raw pub/sub";
    const RAW_ENDED: &'static str = "stream";
    const IDLE: u64 = 0;
    const SUBSCRIBED: Option<u64> = Some(1);
    const REFILL_LOCALLY: bool = false;
    type Sub = redis::aio::PubSubStream;
    type RawLatency = RawRedisLatency;

    async fn count(&mut self) -> Res<u64> {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&self.channel)
            .query_async(&mut *self.publisher)
            .await
            .map_err(|e| format!("PUBSUB NUMSUB: {e}"))?;
        Ok(n)
    }

    fn count_mismatch(&self, n: u64, want: u64) -> String {
        format!("{} has {n} subscribers, expected {want}", self.channel)
    }

    async fn raw_subscribe(&mut self) -> Res<Self::Sub> {
        let client = self.client;
        let mut pubsub = within(CONNECT_TIMEOUT, "a redis pub/sub connection", async {
            client.get_async_pubsub().await
        })
        .await?
        .map_err(|e| format!("redis pub/sub connection: {e}"))?;
        pubsub
            .subscribe(&self.channel)
            .await
            .map_err(|e| format!("SUBSCRIBE: {e}"))?;
        Ok(pubsub.into_on_message())
    }

    async fn node(&self, name: &str) -> Res<FusionCache<String>> {
        redis_node(self.url, name, true)
    }

    async fn raw_latency(&mut self) -> Res<Self::RawLatency> {
        let client = self.client;
        let mut pubsub = within(CONNECT_TIMEOUT, "a redis pub/sub connection", async {
            client.get_async_pubsub().await
        })
        .await?
        .map_err(|e| format!("redis pub/sub connection: {e}"))?;
        pubsub
            .subscribe(RAW_LATENCY_CHANNEL)
            .await
            .map_err(|e| format!("SUBSCRIBE: {e}"))?;
        Ok(RawRedisLatency {
            conn: self.publisher.clone(),
            stream: pubsub.into_on_message(),
            payload: sample_payload(),
        })
    }

    fn propagation_detail(raw: &Self::RawLatency) -> String {
        format!(
            "L2 + RedisBackplane, separate connections); raw = redis-rs PUBLISH ({} bytes) on a \
             MultiplexedConnection -> receipt on a PubSub stream",
            raw.payload.len()
        )
    }

    fn publisher(&mut self) -> RawPublisher<'_> {
        RawPublisher::Redis(self.publisher)
    }

    async fn publish_all(&mut self, payloads: &[Bytes], consumed: impl Fn() -> u64) -> Res<()> {
        redis_publish_all(self.publisher, &self.channel, payloads, consumed).await
    }
}

/// Every Redis row (only the end-to-end ones when `only_e2e`).
async fn redis_bench(server: &RedisServer, only_e2e: bool) -> Res<Report> {
    let url = server.url();
    let client =
        redis::Client::open(url.as_str()).map_err(|e| format!("invalid redis url {url}: {e}"))?;
    let mut publisher = within(
        CONNECT_TIMEOUT,
        "a redis connection",
        client.get_multiplexed_async_connection(),
    )
    .await?
    .map_err(|e| format!("cannot connect to redis at {url}: {e}"))?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut publisher)
        .await
        .map_err(|e| format!("INFO server: {e}"))?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let server_pid = server.pid().ok_or("redis-server is not running")?;
    let mut rows = Vec::new();
    let mut details = Vec::new();
    let mut liveness = Liveness::default();

    let mut bus = RedisBus {
        publisher: &mut publisher,
        client: &client,
        url: &url,
        channel: channel_name(None, Some(THROUGHPUT_NODE)),
    };

    if !only_e2e {
        // 1. Propagation latency.
        propagation(&mut bus, &mut liveness, &mut rows, &mut details).await?;

        // 2. Notifications applied per second.
        let payloads = removal_payloads(THROUGHPUT_MESSAGES);
        throughput_rounds(
            &mut bus,
            server_pid,
            &payloads,
            &mut liveness,
            &mut rows,
            &mut details,
        )
        .await?;
        details.push(format!(
        "throughput: valid Remove messages on distinct keys from a foreign source id, PUBLISHed from a raw \
         MultiplexedConnection in pipelines of {PIPELINE}, at most {WINDOW} published and not yet counted; \
         fusioncache counts via stats().backplane_received (polled every ~1 ms), raw counts on a PubSub stream"
    ));

        // 3. set latency with the backplane on and off.
        rows.extend(set_rows(&url, false).await?);
        rows.extend(set_rows(&url, true).await?);
        details.push(format!(
        "set: L2 (Redis) + RedisBackplane vs L2 only (one connection per node), default entry options \
         (the notification is sent in the background), {ITERATIONS} sets per side in alternating blocks of \
         {BLOCK}, 100 keys, 48-byte values; back-to-back = each set starts as soon as the previous one \
         returned, spaced = each set starts once the previous set's notification came back to the node \
         (untimed wait; the L2-only node has nothing to wait for)"
    ));
    }

    // 4. End to end: A's API -> B's L1.
    let mut env = EndToEnd::new(&url, Wire::Redis, vec![server_pid]).await?;
    end_to_end(&mut env, &mut liveness, &mut rows, &mut details).await?;

    // 5. A's `set` in a fleet.
    fleet_rows(server, &client, &mut rows, &mut details).await?;

    Ok(Report {
        server: format!(
            "redis-server {version} at {url} (pid {})",
            server.pid().unwrap_or(0)
        ),
        rows,
        notes: liveness.note().into_iter().collect(),
        details,
    })
}

/// Polls the node's counters (every ~1 ms) until it applied `want` more messages, or until it made no
/// progress for `STALL`; returns how many it applied and when the last one was seen.
async fn count_applied(node: &FusionCache<String>, base: u64, want: u64) -> (u64, Instant) {
    let (mut seen, mut at) = (0, Instant::now());
    loop {
        let applied = node.stats().backplane_received - base;
        if applied != seen {
            (seen, at) = (applied, Instant::now());
        }
        if seen >= want || at.elapsed() > STALL {
            return (seen, at);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The rate of a fusioncache round, or why there is none: messages never applied (dropped on the way).
fn fc_outcome(node: &FusionCache<String>, applied: u64, t0: Instant, done: Instant) -> FcRound {
    if applied >= THROUGHPUT_MESSAGES as u64 {
        return Ok(rate(t0, done));
    }
    let s = node.stats();
    Err(format!(
        "{applied} of {THROUGHPUT_MESSAGES} applied, {} lost (connection events while receiving: {} \
         reconnects / L1 marked stale {} times)",
        THROUGHPUT_MESSAGES as u64 - applied,
        s.backplane_reconnects,
        s.l1_mark_all_stale
    ))
}

fn check_applied(node: &FusionCache<String>) -> Res<()> {
    let s = node.stats();
    if s.backplane_malformed != 0 || s.backplane_self_ignored != 0 {
        return Err(format!(
            "throughput node: {} malformed and {} self messages (expected none)",
            s.backplane_malformed, s.backplane_self_ignored
        )
        .into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// NATS

async fn nats_connect(url: &str) -> Res<async_nats::Client> {
    let options = async_nats::ConnectOptions::new().event_callback(|event| async move {
        // Slow consumers, disconnections: anything but connecting and closing is worth seeing.
        if !matches!(
            event,
            async_nats::Event::Connected | async_nats::Event::Closed
        ) {
            eprintln!("raw NATS client event: {event}");
        }
    });
    within(CONNECT_TIMEOUT, "a NATS connection", options.connect(url))
        .await?
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}").into())
}

/// A node on the NATS backplane at `url`, with a Redis L2 at `l2` if given.
async fn nats_node(url: &str, name: &str, l2: Option<&str>) -> Res<FusionCache<String>> {
    let backplane = within(
        CONNECT_TIMEOUT,
        "a NATS backplane",
        NatsBackplane::connect(url),
    )
    .await?
    .map_err(|e| format!("NATS backplane at {url}: {e}"))?;
    let mut builder = FusionCache::builder()
        .name(name)
        .default_entry_options(entry_options())
        .backplane(backplane);
    if let Some(l2) = l2 {
        let conn = RedisConnection::open(l2).map_err(|e| format!("invalid redis url {l2}: {e}"))?;
        builder = builder.distributed_cache(RedisDistributedCache::new(conn));
    }
    builder
        .build()
        .map_err(|e| format!("cannot build cache {name}: {e}").into())
}

/// Raw async-nats: publish on one client, receipt on another client's subscriber.
struct RawNatsLatency {
    publisher: async_nats::Client,
    subscriber: async_nats::Subscriber,
    subject: Subject,
    payload: Bytes,
    /// The subscriber's own connection.
    _client: async_nats::Client,
}

impl Probe for RawNatsLatency {
    type Sample = Duration;

    async fn once(&mut self) -> Res<Duration> {
        let Self {
            publisher,
            subscriber,
            subject,
            payload,
            ..
        } = self;
        let (subject, payload) = (subject.clone(), payload.clone());
        let t0 = Instant::now();
        let (published, (received, at)) = within(STEP_TIMEOUT, "a raw NATS message", async {
            tokio::join!(publisher.publish(subject, payload), async {
                (subscriber.next().await.is_some(), Instant::now())
            })
        })
        .await?;
        published.map_err(|e| format!("raw NATS publish: {e}"))?;
        if !received {
            return Err("raw NATS subscription ended".into());
        }
        Ok(at - t0)
    }
}

async fn nats_publish_all(
    client: &async_nats::Client,
    subject: &Subject,
    payloads: &[Bytes],
    consumed: impl Fn() -> u64,
) -> Res<()> {
    for (i, chunk) in payloads.chunks(PIPELINE).enumerate() {
        if !wait_for_window((i * PIPELINE) as u64, &consumed).await {
            return Ok(()); // the consumer lost messages: the counting side reports it
        }
        for p in chunk {
            client
                .publish(subject.clone(), p.clone())
                .await
                .map_err(|e| format!("NATS publish: {e}"))?;
        }
        client
            .flush()
            .await
            .map_err(|e| format!("NATS flush: {e}"))?;
    }
    Ok(())
}

/// A raw NATS subscription on its own connection (closed after the subscription is dropped).
struct NatsSub {
    subscriber: async_nats::Subscriber,
    _client: async_nats::Client,
}

impl futures_util::Stream for NatsSub {
    type Item = async_nats::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.subscriber.poll_next_unpin(cx)
    }
}

/// NATS: client connections are counted from the monitoring endpoint (/connz).
struct NatsBus<'a> {
    server: &'a NatsServer,
    publisher: &'a async_nats::Client,
    url: &'a str,
    subject: Subject,
}

impl Bus for NatsBus<'_> {
    const RAW: &'static str = "raw NATS";
    const RAW_ENDED: &'static str = "subscription";
    /// The publisher's connection.
    const IDLE: u64 = 1;
    const SUBSCRIBED: Option<u64> = None;
    const REFILL_LOCALLY: bool = true;
    type Sub = NatsSub;
    type RawLatency = RawNatsLatency;

    async fn count(&mut self) -> Res<u64> {
        let server = self.server;

        let (status, body) = server
            .monitor("/connz")
            .map_err(|e| format!("GET /connz: {e}"))?;
        let n = body
            .split("\"num_connections\":")
            .nth(1)
            .and_then(|rest| {
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
            })
            .and_then(|d| d.parse().ok());
        match (status, n) {
            (200, Some(n)) => Ok(n),
            _ => Err(format!("unexpected /connz answer (HTTP {status})").into()),
        }
    }

    fn count_mismatch(&self, n: u64, want: u64) -> String {
        format!("nats-server has {n} connections, expected {want}")
    }

    async fn raw_subscribe(&mut self) -> Res<Self::Sub> {
        let client = nats_connect(self.url).await?;
        let subscriber = client
            .subscribe(self.subject.clone())
            .await
            .map_err(|e| format!("NATS subscribe: {e}"))?;
        client
            .flush()
            .await
            .map_err(|e| format!("NATS flush: {e}"))?;
        Ok(NatsSub {
            subscriber,
            _client: client,
        })
    }

    async fn node(&self, name: &str) -> Res<FusionCache<String>> {
        nats_node(self.url, name, None).await
    }

    async fn raw_latency(&mut self) -> Res<Self::RawLatency> {
        let sub_client = nats_connect(self.url).await?;
        let subscriber = sub_client
            .subscribe(RAW_LATENCY_CHANNEL)
            .await
            .map_err(|e| format!("NATS subscribe: {e}"))?;
        sub_client
            .flush()
            .await
            .map_err(|e| format!("NATS flush: {e}"))?;
        Ok(RawNatsLatency {
            publisher: self.publisher.clone(),
            subscriber,
            subject: Subject::from(RAW_LATENCY_CHANNEL),
            payload: sample_payload(),
            _client: sub_client,
        })
    }

    fn propagation_detail(raw: &Self::RawLatency) -> String {
        format!(
            "no L2: B's entry goes stale, and B sets the new value locally, without notification, between \
             iterations; separate NATS connections); raw = async-nats publish ({} bytes) -> \
             subscriber.next() on another connection",
            raw.payload.len()
        )
    }

    fn publisher(&mut self) -> RawPublisher<'_> {
        RawPublisher::Nats(self.publisher)
    }

    async fn publish_all(&mut self, payloads: &[Bytes], consumed: impl Fn() -> u64) -> Res<()> {
        nats_publish_all(self.publisher, &self.subject, payloads, consumed).await
    }
}

/// Every NATS row (only the end-to-end ones when `only_e2e`).
async fn nats_bench(server: &NatsServer, redis: &RedisServer, only_e2e: bool) -> Res<Report> {
    let url = server.url();
    let server_pid = server.pid().ok_or("nats-server is not running")?;
    let mut rows = Vec::new();
    let mut details = Vec::new();
    let mut liveness = Liveness::default();
    let publisher = nats_connect(&url).await?;
    let version = publisher.server_info().version;

    let mut bus = NatsBus {
        server,
        publisher: &publisher,
        url: &url,
        subject: Subject::from(channel_name(None, Some(THROUGHPUT_NODE))),
    };

    if !only_e2e {
        // 1. Propagation latency.
        propagation(&mut bus, &mut liveness, &mut rows, &mut details).await?;

        // 2. Notifications applied per second.
        let payloads = removal_payloads(THROUGHPUT_MESSAGES);
        // The propagation nodes and the raw subscriber are gone: only the publisher stays connected.
        wait_count(&mut bus, 1).await?;
        throughput_rounds(
            &mut bus,
            server_pid,
            &payloads,
            &mut liveness,
            &mut rows,
            &mut details,
        )
        .await?;
        details.push(format!(
        "throughput: valid Remove messages on distinct keys from a foreign source id, published from a raw \
         async-nats client with a flush every {PIPELINE}, at most {WINDOW} published and not yet counted; \
         fusioncache counts via stats().backplane_received (polled every ~1 ms), raw counts \
         subscriber.next() on its own connection"
    ));
    }

    // 3. End to end: A's API -> B's L1, with a Redis L2.
    let redis_pid = redis.pid().ok_or("redis-server is not running")?;
    let wire = Wire::Nats { url: url.clone() };
    let mut env = EndToEnd::new(&redis.url(), wire, vec![server_pid, redis_pid]).await?;
    end_to_end(&mut env, &mut liveness, &mut rows, &mut details).await?;

    Ok(Report {
        server: format!(
            "nats-server {version} at {url} (pid {server_pid}); the end-to-end rows' L2: redis-server at \
             {} (pid {redis_pid})",
            redis.url()
        ),
        rows,
        notes: liveness.note().into_iter().collect(),
        details,
    })
}

// ---------------------------------------------------------------------------------------------------------
// End to end: node A's API -> node B's L1, both nodes built as the README builds them (Redis L2 + the
// backplane under test), against raw clients doing the same work by hand.

/// Writes per end-to-end throughput round, on distinct keys (well below the L1's default capacity of
/// 100 000 entries, so that B holds every key).
const E2E_MESSAGES: usize = 50_000;
/// Writers in flight on node A, and on the raw publishers.
const IN_FLIGHT: usize = 256;
/// The cache name of the end-to-end nodes (it names their channel).
const E2E_NODE: &str = "benche2e";
/// The raw end-to-end channel (no cache listens on it).
const RAW_E2E_CHANNEL: &str = "rawbench.e2e";
/// The key of the raw end-to-end latency baseline.
const RAW_E2E_KEY: &str = "rawbench:e2e:latency";

/// A raw publishing handle; each writer clones it.
#[derive(Clone)]
enum RawPub {
    /// redis-rs PUBLISH on a multiplexed connection, awaited (one round trip; concurrent callers share
    /// the connection, so their commands pipeline).
    Redis(redis::aio::MultiplexedConnection),
    /// async-nats publish, awaited: queued to the client's connection task, which writes it out (no
    /// flush per message).
    Nats(async_nats::Client),
}

impl RawPub {
    async fn publish(&mut self, channel: &'static str, payload: Bytes) -> Res<()> {
        match self {
            RawPub::Redis(conn) => {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload.as_ref())
                    .query_async::<i64>(conn)
                    .await
                    .map_err(|e| format!("raw PUBLISH: {e}"))?;
            }
            RawPub::Nats(client) => client
                .publish(channel, payload)
                .await
                .map_err(|e| format!("raw NATS publish: {e}"))?,
        }
        Ok(())
    }
}

/// A raw subscription, one item per message received.
type RawSub = std::pin::Pin<Box<dyn futures_util::Stream<Item = ()>>>;

/// The backplane of the end-to-end nodes (their L2 is always Redis).
enum Wire {
    Redis,
    Nats { url: String },
}

/// What the end-to-end measures use: the servers, and the raw clients (one Redis connection for the raw
/// SETs and, on Redis, PUBLISHes; one NATS client on NATS).
struct EndToEnd {
    redis_url: String,
    redis_client: redis::Client,
    /// The raw side's Redis connection (SET; PUBLISH on Redis).
    l2: redis::aio::MultiplexedConnection,
    /// The raw side's publisher (a clone of `l2` on Redis).
    publisher: RawPub,
    wire: Wire,
    /// Every server process (their CPU time is reported).
    servers: Vec<u32>,
}

impl EndToEnd {
    async fn new(redis_url: &str, wire: Wire, servers: Vec<u32>) -> Res<Self> {
        let redis_client = redis::Client::open(redis_url)
            .map_err(|e| format!("invalid redis url {redis_url}: {e}"))?;
        let l2 = within(
            CONNECT_TIMEOUT,
            "a redis connection",
            redis_client.get_multiplexed_async_connection(),
        )
        .await?
        .map_err(|e| format!("cannot connect to redis at {redis_url}: {e}"))?;
        let publisher = match &wire {
            Wire::Redis => RawPub::Redis(l2.clone()),
            Wire::Nats { url } => RawPub::Nats(nats_connect(url).await?),
        };
        Ok(Self {
            redis_url: redis_url.to_string(),
            redis_client,
            l2,
            publisher,
            wire,
            servers,
        })
    }

    /// A node as the README builds one: Redis L2 plus the backplane, one Redis connection for both.
    async fn node(&self) -> Res<FusionCache<String>> {
        match &self.wire {
            Wire::Redis => redis_node(&self.redis_url, E2E_NODE, true),
            Wire::Nats { url } => nats_node(url, E2E_NODE, Some(&self.redis_url)).await,
        }
    }

    /// A raw subscription on `channel`, on its own connection, live on the server when this returns.
    async fn raw_subscribe(&self, channel: &str) -> Res<RawSub> {
        match &self.wire {
            Wire::Redis => {
                let client = &self.redis_client;
                let mut pubsub = within(CONNECT_TIMEOUT, "a redis pub/sub connection", async {
                    client.get_async_pubsub().await
                })
                .await?
                .map_err(|e| format!("redis pub/sub connection: {e}"))?;
                pubsub
                    .subscribe(channel)
                    .await
                    .map_err(|e| format!("SUBSCRIBE: {e}"))?;
                Ok(Box::pin(pubsub.into_on_message().map(|_| ())))
            }
            Wire::Nats { url } => {
                let client = nats_connect(url).await?;
                let subscriber = client
                    .subscribe(channel.to_string())
                    .await
                    .map_err(|e| format!("NATS subscribe: {e}"))?;
                client
                    .flush()
                    .await
                    .map_err(|e| format!("NATS flush: {e}"))?;
                let sub = NatsSub {
                    subscriber,
                    _client: client,
                };
                Ok(Box::pin(sub.map(|_| ())))
            }
        }
    }

    /// The probe publisher of `wait_live`.
    fn probe_publisher(&mut self) -> RawPublisher<'_> {
        match &self.publisher {
            RawPub::Redis(_) => RawPublisher::Redis(&mut self.l2),
            RawPub::Nats(client) => RawPublisher::Nats(client),
        }
    }

    /// What the raw side's PUBLISH is, for labels.
    fn raw_publish(&self) -> &'static str {
        match self.wire {
            Wire::Redis => "PUBLISH",
            Wire::Nats { .. } => "NATS publish",
        }
    }
}

/// The raw end-to-end latency baseline: one awaited SET, then one awaited publish, received by a
/// subscriber on its own connection.
struct RawEndToEnd {
    l2: redis::aio::MultiplexedConnection,
    publisher: RawPub,
    sub: RawSub,
    payload: Bytes,
    seq: u64,
}

impl Probe for RawEndToEnd {
    type Sample = E2eSample;

    async fn once(&mut self) -> Res<E2eSample> {
        self.seq += 1;
        let v = value(self.seq);
        let Self {
            l2,
            publisher,
            sub,
            payload,
            ..
        } = self;
        let mut set = redis::cmd("SET");
        set.arg(RAW_E2E_KEY).arg(v.as_bytes());
        let t0 = Instant::now();
        let (written, (received, at)) =
            within(STEP_TIMEOUT, "a raw SET + publish to arrive", async {
                tokio::join!(
                    async {
                        set.query_async::<()>(&mut *l2)
                            .await
                            .map_err(|e| format!("raw SET: {e}"))?;
                        let sent = Instant::now();
                        publisher.publish(RAW_E2E_CHANNEL, payload.clone()).await?;
                        Ok::<_, BoxError>((sent, Instant::now()))
                    },
                    async { (sub.next().await.is_some(), Instant::now()) }
                )
            })
            .await?;
        let (sent, returned) = written?;
        if !received {
            return Err("raw end-to-end subscription ended".into());
        }
        Ok(E2eSample {
            call_to_return: returned - t0,
            lag: at.saturating_duration_since(sent),
            call_to_b: at - t0,
        })
    }
}

/// The end-to-end rows: latency (A's `set` seen from B) then throughput (A's `set` with `IN_FLIGHT` callers,
/// applied on B), each against raw clients doing the same by hand in the same run.
async fn end_to_end(
    env: &mut EndToEnd,
    liveness: &mut Liveness,
    rows: &mut Vec<Row>,
    details: &mut Vec<String>,
) -> Res<()> {
    let a = env.node().await?;
    let b = env.node().await?;
    ready(&a, "end-to-end node A").await?;
    ready(&b, "end-to-end node B").await?;
    wait_live(env.probe_publisher(), &[&a, &b], liveness).await?;

    // Latency.
    let mut prop = Propagation::new(a, b, false).await?;
    let mut raw = RawEndToEnd {
        l2: env.l2.clone(),
        publisher: env.publisher.clone(),
        sub: env.raw_subscribe(RAW_E2E_CHANNEL).await?,
        payload: sample_payload(),
        seq: 0,
    };
    let publish = env.raw_publish();
    for (label, set_options) in [
        ("end to end", entry_options()),
        (
            "end to end, notification awaited (`background_backplane_operations(false)`)",
            entry_options().background_backplane_operations(false),
        ),
    ] {
        prop.set_options = set_options;
        let (fc, base) = interleaved(&mut prop, &mut raw).await?;
        rows.extend(latency_rows(
            &format!("{label}: from A's `set` returning to B no longer holding the old value"),
            &format!("; raw: {publish} sent → received"),
            &mut part(&fc, |s| s.lag),
            &mut part(&base, |s| s.lag),
            Some(Goal::MicrosAtMost(30.0)),
            None,
        ));
        rows.extend(latency_rows(
            &format!("{label}: A's `set` (L2 write + notification), call → return"),
            &format!("; raw: SET awaited, then {publish} awaited"),
            &mut part(&fc, |s| s.call_to_return),
            &mut part(&base, |s| s.call_to_return),
            Some(Goal::AtMost(1.2)),
            Some(Goal::AtMost(1.2)),
        ));
        rows.extend(latency_rows(
            &format!("{label}: from A's `set` call to B no longer holding the old value"),
            &format!("; raw: SET → {publish} → subscriber receives"),
            &mut part(&fc, |s| s.call_to_b),
            &mut part(&base, |s| s.call_to_b),
            Some(Goal::AtMost(1.2)),
            Some(Goal::AtMost(1.2)),
        ));
    }
    details.push(format!(
        "end-to-end latency: {ITERATIONS} iterations per side after {WARMUP} of warm-up, blocks of {BLOCK} \
         alternating; nodes A and B built as the README does (Redis L2 + backplane, one Redis connection \
         per node, default entry options but a 10-minute duration); B holds the key; each iteration A.set \
         a new 48-byte value, then polls B.peek (yielding) until it no longer returns the old value (B \
         marks it stale on the notification); untimed between iterations: B refreshed from L2 and A's own \
         notification came back. raw = redis-rs SET of a 48-byte value awaited, then {publish} of a \
         {}-byte FusionCache message awaited, received by a subscriber on its own connection",
        raw.payload.len()
    ));
    drop(raw);
    let Propagation { a, b, .. } = prop;

    // Throughput.
    e2e_throughput(env, &a, &b, rows, details).await
}

/// Runs `write(i)` for every `i` in `0..n`, `IN_FLIGHT` at a time; a writer waits before it starts while
/// more than `WINDOW` writes are not yet `consumed`. Fails on the first error, or when the consumer made
/// no progress for `STALL` (messages were lost). Returns when the last write returned.
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
            if !wait_for_window(sent, consumed).await {
                return Err(format!(
                    "the consumer made no progress for {STALL:?} with {sent} of {n} writes issued and \
                     {} consumed: messages were lost",
                    consumed()
                )
                .into());
            }
            write(i).await
        })
        .await?;
    Ok(Instant::now())
}

/// Counts `want` messages on `sub`; fails when it ends or is silent for `STALL`. Returns when the last
/// one arrived, and publishes the count in `counted` as it goes.
async fn count_received(sub: &mut RawSub, want: usize, counted: &Cell<u64>) -> Res<Instant> {
    let mut n = 0;
    while n < want {
        match tokio::time::timeout(STALL, sub.next()).await {
            Ok(Some(())) => {
                n += 1;
                counted.set(n as u64);
            }
            Ok(None) => return Err(format!("raw subscription ended after {n} of {want}").into()),
            Err(_) => {
                return Err(format!(
                    "raw subscriber: {n} of {want} messages received, then nothing for {STALL:?}: \
                     the baseline lost messages"
                )
                .into())
            }
        }
    }
    Ok(Instant::now())
}

/// One raw end-to-end throughput round: `IN_FLIGHT` writers publish `payloads` (each after an awaited SET of
/// its own key when `set_keys` is given); a raw subscriber counts them. Returns the rate received.
async fn raw_e2e_round(
    env: &EndToEnd,
    payloads: &[Bytes],
    set_keys: Option<&[String]>,
    cpu: Option<&mut CpuUse>,
) -> Res<f64> {
    let mut sub = env.raw_subscribe(RAW_E2E_CHANNEL).await?;
    let counted = Cell::new(0u64);
    let v = value(0);
    let n = payloads.len();
    let start = CpuUse::start(&env.servers);
    let t0 = Instant::now();
    let what = if set_keys.is_some() {
        "raw SET + publish throughput"
    } else {
        "raw publish throughput"
    };
    let (written, received) = within(ROUND_TIMEOUT, what, async {
        tokio::join!(
            in_flight(
                n,
                || counted.get(),
                |i| {
                    let (mut l2, mut publisher) = (env.l2.clone(), env.publisher.clone());
                    let v = &v;
                    async move {
                        if let Some(keys) = set_keys {
                            redis::cmd("SET")
                                .arg(&keys[i])
                                .arg(v.as_bytes())
                                .query_async::<()>(&mut l2)
                                .await
                                .map_err(|e| format!("raw SET: {e}"))?;
                        }
                        publisher
                            .publish(RAW_E2E_CHANNEL, payloads[i].clone())
                            .await
                    }
                }
            ),
            count_received(&mut sub, n, &counted)
        )
    })
    .await?;
    written?;
    let done = received?;
    if let Some(cpu) = cpu {
        cpu.add(&env.servers, start);
    }
    Ok(n as f64 / (done - t0).as_secs_f64())
}

/// What one fusioncache end-to-end throughput round measured.
struct FcE2eRound {
    /// Notifications applied on B per second (first `set` called → last notification applied).
    applied_rate: f64,
    /// A's `set`s returned per second (first called → last returned).
    write_rate: f64,
    /// Keys B held the new value of (refreshed from L2) when the last notification was applied...
    refreshed_at_end: usize,
    /// ... and once B's background refreshes were done.
    refreshed_settled: usize,
}

/// How many of `keys` B's L1 holds with the value `new(i)`; fails when one still holds its old value.
fn refreshed(
    b: &FusionCache<String>,
    keys: &[String],
    old: impl Fn(usize) -> String,
    new: impl Fn(usize) -> String,
) -> Res<usize> {
    let mut n = 0;
    for (i, key) in keys.iter().enumerate() {
        match b.peek(key) {
            Some(v) if v == old(i) => {
                return Err(format!(
                    "node B still holds the old value of {key} after every notification was applied"
                )
                .into())
            }
            Some(v) if v == new(i) => n += 1,
            Some(v) => {
                return Err(format!("node B holds an unexpected value of {key}: {v:?}").into())
            }
            None => {}
        }
    }
    Ok(n)
}

/// One fusioncache end-to-end throughput round: B first holds every key (untimed local writes, no L2 and no
/// notification), then A `set`s a new value of each, `IN_FLIGHT` at a time; B counts what it applied.
async fn fc_e2e_round(
    env: &EndToEnd,
    a: &FusionCache<String>,
    b: &FusionCache<String>,
    keys: &[String],
    round: usize,
    cpu: Option<&mut CpuUse>,
) -> Res<FcE2eRound> {
    let n = keys.len();
    let first = (round * 2 * n) as u64;
    let old = |i: usize| value(first + i as u64);
    let new = |i: usize| value(first + (n + i) as u64);
    let local = entry_options()
        .skip_l2_writes(true)
        .skip_backplane_notifications(true);
    for (i, key) in keys.iter().enumerate() {
        b.set_with(key, old(i), &local)
            .await
            .map_err(|e| format!("node B local set: {e}"))?;
    }
    if let Some(key) = keys
        .iter()
        .zip(0..)
        .find_map(|(k, i)| (b.peek(k) != Some(old(i))).then_some(k))
    {
        return Err(
            format!("node B does not hold {key} in L1 before the round (L1 evicted it?)").into(),
        );
    }
    let (a0, b0) = (a.stats(), b.stats());
    perf_control("enable");
    let start = CpuUse::start(&env.servers);
    let t0 = Instant::now();
    let applied = || b.stats().backplane_received - b0.backplane_received;
    let outcome = within(ROUND_TIMEOUT, "fusioncache end-to-end throughput", async {
        tokio::join!(
            in_flight(n, applied, |i| async move {
                a.set(&keys[i], new(i))
                    .await
                    .map_err(|e| format!("node A set: {e}").into())
            }),
            count_applied(b, b0.backplane_received, n as u64)
        )
    })
    .await;
    perf_control("disable");
    let (written, (count, done)) = outcome?;
    let written = written?;
    if let Some(cpu) = cpu {
        cpu.add(&env.servers, start);
    }
    let (a1, b1) = (a.stats(), b.stats());
    let lost = n as u64 - count.min(n as u64);
    let trouble = [
        ("messages not applied on B", lost),
        ("A's L2 errors", a1.l2_errors - a0.l2_errors),
        (
            "A's operations queued for auto-recovery",
            a1.auto_recovery_queued - a0.auto_recovery_queued,
        ),
        (
            "B's overflows",
            b1.backplane_overflows - b0.backplane_overflows,
        ),
        (
            "B's malformed messages",
            b1.backplane_malformed - b0.backplane_malformed,
        ),
        (
            "reconnects",
            a1.backplane_reconnects + b1.backplane_reconnects
                - a0.backplane_reconnects
                - b0.backplane_reconnects,
        ),
    ];
    let trouble: Vec<String> = trouble
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
    if !trouble.is_empty() {
        return Err(format!(
            "fusioncache end-to-end round {round}: {}",
            trouble.join(", ")
        )
        .into());
    }
    let refreshed_at_end = refreshed(b, keys, old, new)?;

    // Untimed: A's own notifications came back, and B's background refreshes are done (the count of
    // refreshed keys stops moving), so that nothing of this round runs in the next one.
    let want_echo = a0.backplane_self_ignored + n as u64;
    settle(
        ROUND_TIMEOUT,
        "node A's own notifications to come back",
        || a.stats().backplane_self_ignored >= want_echo,
    )
    .await?;
    let t_settle = Instant::now();
    let mut refreshed_settled = refreshed_at_end;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = refreshed(b, keys, old, new)?;
        if now == refreshed_settled || now == n {
            refreshed_settled = now;
            break;
        }
        refreshed_settled = now;
        if t_settle.elapsed() > STEP_TIMEOUT {
            return Err(format!("node B still refreshing {STEP_TIMEOUT:?} after the round").into());
        }
    }
    Ok(FcE2eRound {
        applied_rate: n as f64 / (done - t0).as_secs_f64(),
        write_rate: n as f64 / (written - t0).as_secs_f64(),
        refreshed_at_end,
        refreshed_settled,
    })
}

/// The environment variable naming perf's control fifo: with it (`perf record -D -1 --control
/// fifo:PATH`, see `make profile-e2e`), the profile covers the timed fusioncache end-to-end throughput
/// rounds only.
const PERF_CTL: &str = "TRANSPORT_BENCH_PERF_CTL";

/// Sends `command` (`enable`, `disable`) to perf's control fifo, if `PERF_CTL` names one.
fn perf_control(command: &str) {
    let Ok(path) = std::env::var(PERF_CTL) else {
        return;
    };
    let sent = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut fifo| {
            std::io::Write::write_all(&mut fifo, format!("{command}\n").as_bytes())
        });
    if let Err(e) = sent {
        eprintln!("transport-bench: cannot send {command:?} to perf's control fifo {path}: {e}");
    }
}

/// End-to-end throughput: `ROUNDS` rounds (after a discarded warm-up round), each timing raw publish, raw
/// SET + publish, then fusioncache; pushes two rows (one per floor) and the details.
async fn e2e_throughput(
    env: &EndToEnd,
    a: &FusionCache<String>,
    b: &FusionCache<String>,
    rows: &mut Vec<Row>,
    details: &mut Vec<String>,
) -> Res<()> {
    let keys: Vec<String> = (0..E2E_MESSAGES)
        .map(|i| format!("bench:e2e:{i:06}"))
        .collect();
    let raw_keys: Vec<String> = (0..E2E_MESSAGES)
        .map(|i| format!("rawbench:e2e:{i:06}"))
        .collect();
    let ts = now_ticks();
    let payloads: Vec<Bytes> = keys
        .iter()
        .map(|k| BackplaneMessage::new(FOREIGN_SOURCE, ts, Action::Set, k).encode())
        .collect();
    let (mut publish, mut set_publish, mut fc) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu: [CpuUse; 3] = Default::default();
    for round in 0..=ROUNDS {
        // Round 0 warms every side up and is discarded.
        let keep = round > 0;
        let [c0, c1, c2] = &mut cpu;
        let r = raw_e2e_round(env, &payloads, None, keep.then_some(c0)).await?;
        let rs = raw_e2e_round(env, &payloads, Some(&raw_keys), keep.then_some(c1)).await?;
        let f = fc_e2e_round(env, a, b, &keys, round, keep.then_some(c2)).await?;
        if keep {
            publish.push(r);
            set_publish.push(rs);
            fc.push(f);
        }
    }
    let list = |v: &mut dyn Iterator<Item = f64>| {
        v.map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
    };
    let applied: Vec<f64> = fc.iter().map(|r| r.applied_rate).collect();
    let f = median(&applied);
    let publish_name = env.raw_publish();
    let refreshes = b.options().max_concurrent_refreshes;
    for (floor, rates, goal) in [
        (
            format!("single-connection {publish_name}, {IN_FLIGHT} in flight"),
            &publish,
            Some(Goal::AtLeast(1.0)),
        ),
        (
            format!("SET then {publish_name} per write, {IN_FLIGHT} in flight (2nd floor)"),
            &set_publish,
            None,
        ),
    ] {
        let r = median(rates);
        rows.push(Row {
            measure: format!(
                "end to end: notifications applied on B /s, A's `set` on distinct keys, {IN_FLIGHT} in \
                 flight (B per notification: mark stale, then an L2 re-read unless {refreshes} run) \
                 (median of {ROUNDS}); raw: {floor}"
            ),
            fusioncache: format!("{f:.0}"),
            baseline: format!("{r:.0}"),
            value: Some(f),
            ratio: Some(f / r),
            goal,
        });
    }
    details.push(format!(
        "end-to-end throughput rounds ({E2E_MESSAGES} writes each on distinct keys, after one discarded \
         warm-up round; at most {WINDOW} written and not yet received): raw {publish_name} [{}] msgs/s; \
         raw SET + {publish_name} [{}] msgs/s; fusioncache applied on B [{}] msgs/s, A's `set`s returned \
         [{}] /s",
        list(&mut publish.iter().copied()),
        list(&mut set_publish.iter().copied()),
        list(&mut applied.iter().copied()),
        list(&mut fc.iter().map(|r| r.write_rate)),
    ));
    details.push(format!(
        "end-to-end throughput: B held every key (written locally before the round, no L2, no \
         notification) and counts stats().backplane_received (polled every ~1 ms); after each round, no \
         key of B still holds its old value (checked), and B held the new value (refreshed from L2) of \
         [{}] of {E2E_MESSAGES} keys when the last notification was applied, [{}] once its background \
         refreshes were done; the others stay stale until read (a notification that comes while \
         max_concurrent_refreshes = {refreshes} refreshes run starts none); raw = {publish_name} of {}-byte FusionCache messages, \
         counted by a subscriber on its own connection",
        fc.iter()
            .map(|r| r.refreshed_at_end.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        fc.iter()
            .map(|r| r.refreshed_settled.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        payloads.first().map_or(0, |p| p.len()),
    ));
    let [c0, c1, c2] = &cpu;
    details.push(format!(
        "CPU use over the timed end-to-end throughput rounds: raw publish: {}; raw SET + publish: {}; \
         fusioncache: {}",
        c0.describe(),
        c1.describe(),
        c2.describe()
    ));
    Ok(())
}
