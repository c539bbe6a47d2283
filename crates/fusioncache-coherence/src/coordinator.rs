//! The coordinator: per scenario, start the servers, write the keys' first values, spawn the nodes as
//! separate processes, inject the fault, merge the logs and print a table row.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::analysis::{analyze, Report};
use crate::clock::now_ns;
use crate::node::{cache, keys};
use crate::record::{Kind, Op, Phase};
use crate::scenario::{Scenario, Servers, Setup};
use crate::Transport;

/// The coordinator's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Node processes per scenario.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Hot keys.
    #[arg(long, default_value_t = 4)]
    pub keys: usize,
    /// Operations per second per node (each awaited before the next).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// The share of writes.
    #[arg(long, default_value_t = 0.2)]
    pub write_ratio: f64,
    /// Backplanes to run, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Transport::Redis, Transport::Nats])]
    pub transport: Vec<Transport>,
    /// Scenarios to run, comma separated (default: every one that applies).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenario: Vec<Scenario>,
    /// Your Redis (L2, and the Redis backplane) instead of a redis-server started here. Only the faults that
    /// need no control of the server run against it (no fault, black hole, and with
    /// `--allow-client-kill` the pub/sub kill).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Your NATS server(s) instead of a nats-server started here.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Allows `CLIENT KILL TYPE pubsub` on your Redis: it disconnects every pub/sub client of that server,
    /// not only the checker's.
    #[arg(long)]
    pub allow_client_kill: bool,
    /// When the fault comes, after the load starts (s).
    #[arg(long, default_value_t = 4)]
    pub fault_at_secs: u64,
    /// How long the nodes keep reading once the load stops (s).
    #[arg(long, default_value_t = 5)]
    pub converge_secs: u64,
}

/// One row of the table.
struct Row {
    transport: Transport,
    scenario: Scenario,
    report: Report,
    converge_window: u64,
}

/// Runs every scenario and prints the table.
pub fn run(args: RunArgs) -> Result<(), String> {
    let servers = Servers {
        redis_url: args.redis_url.clone(),
        nats_url: args.nats_url.clone(),
    };
    let own = args.redis_url.is_some();
    let scenarios = if args.scenario.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenario.clone()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let dir = tempfile::Builder::new()
        .prefix("fusioncache-coherence-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    println!("{}", conditions(&args));
    println!("{}", header());
    for transport in &args.transport {
        let own_nats = *transport == Transport::Nats && args.nats_url.is_some();
        for scenario in &scenarios {
            if !scenario.applies(*transport, own || own_nats, args.allow_client_kill) {
                continue;
            }
            let row = run_one(&runtime, &args, &servers, *transport, *scenario, dir.path())
                .map_err(|e| format!("{transport:?} / {}: {e}", scenario.name()))?;
            println!("{}", line(&row));
            rows.push(row);
        }
    }
    println!();
    println!("{}", conditions(&args));
    println!("{}", header());
    for row in &rows {
        println!("{}", line(row));
    }
    Ok(())
}

fn run_one(
    runtime: &tokio::runtime::Runtime,
    args: &RunArgs,
    servers: &Servers,
    transport: Transport,
    scenario: Scenario,
    dir: &Path,
) -> Result<Row, String> {
    let mut setup =
        Setup::start(servers, transport, scenario, args.nodes).map_err(|e| e.to_string())?;
    let run_id = format!("{}-{}", std::process::id(), now_ns() % 1_000_000_000);
    let name = format!("coherence-{run_id}");
    let key_prefix = format!("fc-coherence:{run_id}:");
    let keys = keys(args.keys);

    // The first value of every key, acknowledged before the nodes start.
    let mut ops = runtime.block_on(async {
        let writer = cache(transport, &setup.redis_url, None, &name, &key_prefix, false).await?;
        let mut ops = Vec::new();
        for key in &keys {
            let start = now_ns();
            let value = format!("init-{key}");
            writer
                .set(key, value.clone())
                .await
                .map_err(|e| e.to_string())?;
            ops.push(Op {
                kind: Kind::Write,
                phase: Phase::Load,
                node: usize::MAX,
                key: key.clone(),
                start,
                end: now_ns(),
                ok: true,
                value: Some(value),
            });
        }
        Ok::<_, String>(ops)
    })?;

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut nodes: Vec<(Child, ChildStdin, BufReader<std::process::ChildStdout>)> = Vec::new();
    for id in 0..args.nodes {
        let out = dir.join(format!("{run_id}-node{id}.log"));
        let stderr = std::fs::File::create(dir.join(format!("{run_id}-node{id}.stderr")))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&exe);
        cmd.arg("node")
            .args(["--id", &id.to_string()])
            .args(["--redis-url", &setup.node_redis[id]])
            .args(["--transport", transport.as_arg()])
            .args(["--name", &name, "--key-prefix", &key_prefix])
            .args([
                "--keys",
                &args.keys.to_string(),
                "--rate",
                &args.rate.to_string(),
            ])
            .args(["--write-ratio", &args.write_ratio.to_string()])
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        if let Some(url) = &setup.node_nats[id] {
            cmd.args(["--nats-url", url]);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn a node: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        nodes.push((child, stdin, stdout));
    }
    for (id, (_, _, stdout)) in nodes.iter_mut().enumerate() {
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            let err = std::fs::read_to_string(dir.join(format!("{run_id}-node{id}.stderr")))
                .unwrap_or_default();
            return Err(format!("node {id} did not start: {line:?} {err}"));
        }
    }

    let fault_at = Duration::from_secs(args.fault_at_secs);
    let load = scenario.load(fault_at);
    let converge = Duration::from_secs(args.converge_secs);
    let start = now_ns() + 300_000_000;
    let load_end = start + load.as_nanos() as u64;
    for (_, stdin, _) in &mut nodes {
        writeln!(
            stdin,
            "go {start} {} {}",
            load.as_nanos(),
            converge.as_nanos()
        )
        .map_err(|e| e.to_string())?;
    }
    let fault_end = std::thread::scope(|s| {
        let injector =
            s.spawn(|| setup.inject(transport, scenario, start + fault_at.as_nanos() as u64));
        let deadline = Instant::now() + load + converge + Duration::from_secs(60);
        for (child, _, _) in &mut nodes {
            wait_or_kill(child, deadline);
        }
        injector
            .join()
            .map_err(|_| "the fault injector panicked".to_string())?
    })?;

    for id in 0..args.nodes {
        let path = dir.join(format!("{run_id}-node{id}.log"));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            let err = std::fs::read_to_string(dir.join(format!("{run_id}-node{id}.stderr")))
                .unwrap_or_default();
            format!("node {id} left no log ({e}): {err}")
        })?;
        for line in text.lines() {
            ops.push(Op::parse(line, id)?);
        }
    }
    // The final values, as a node that starts now reads them (from L2).
    let finals = runtime.block_on(async {
        let reader = cache(transport, &setup.redis_url, None, &name, &key_prefix, false).await?;
        let mut finals = HashMap::new();
        for key in &keys {
            let value = reader.try_get(key).await.map_err(|e| e.to_string())?;
            finals.insert(key.clone(), value);
        }
        Ok::<_, String>(finals)
    })?;
    let report = analyze(&ops, &finals, load_end, fault_end);
    Ok(Row {
        transport,
        scenario,
        report,
        converge_window: converge.as_nanos() as u64,
    })
}

fn wait_or_kill(child: &mut Child, deadline: Instant) {
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn conditions(args: &RunArgs) -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "coherence: {} node processes, {} hot keys, {} ops/s per node ({:.0}% awaited writes), fault at {} s, \
         convergence window {} s; servers: {}; library defaults (liveness bound 3 s); load average {load}\n\
         staleness percentiles are over the stale reads (all-reads p99: over every served read, fresh ones counting 0); `late` = reads stale by > 50 ms that began > 1 s after the fault ended",
        args.nodes,
        args.keys,
        args.rate,
        args.write_ratio * 100.0,
        args.fault_at_secs,
        args.converge_secs,
        match (&args.redis_url, &args.nats_url) {
            (None, None) => "redis-server / nats-server started here on loopback".to_string(),
            _ => "yours".to_string(),
        }
    )
}

fn header() -> String {
    "| backplane | scenario | reads | read errors | stale | stale % | p50 ms | p99 ms | p99.9 ms | max ms | all-reads p99 ms | >100 ms | >1 s | late | writes acked | writes failed | lost | converged |\n\
     |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
        .to_string()
}

fn line(row: &Row) -> String {
    let r = &row.report;
    let ms = |ns: u64| format!("{:.1}", ns as f64 / 1e6);
    let converged = match r.converged_after {
        Some(ns) => format!("{} ms", ms(ns)),
        None => format!("no (> {} s)", row.converge_window / 1_000_000_000),
    };
    let mut lost = r.lost.to_string();
    if r.unknown_values > 0 {
        lost.push_str(&format!(" ({} unknown values!)", r.unknown_values));
    }
    format!(
        "| {} | {} | {} | {} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        row.transport.as_arg(),
        row.scenario.name(),
        r.reads,
        r.read_errors,
        r.stale(),
        r.stale_share() * 100.0,
        ms(r.staleness_quantile(0.5)),
        ms(r.staleness_quantile(0.99)),
        ms(r.staleness_quantile(0.999)),
        ms(r.staleness_quantile(1.0)),
        ms(r.served_quantile(0.99)),
        r.stale_over(100_000_000),
        r.stale_over(1_000_000_000),
        r.stale_after_recovery,
        r.writes_acked,
        r.writes_failed,
        lost,
        converged
    )
}
