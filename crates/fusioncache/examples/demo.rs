//! Three nodes of one cache, kept coherent by a backplane: the main job of fusioncache, as a timeline.
//!
//! ```text
//! cargo run --example demo                                   # in-memory backplane + L2, one process
//! cargo run --example demo -- redis://127.0.0.1:6379         # Redis L2 + pub/sub, one OS process per node
//! cargo run --example demo -- nats://127.0.0.1:4222          # NATS backplane, one OS process per node
//! cargo run --example demo -- nats://127.0.0.1:4222 redis://127.0.0.1:6379   # NATS + Redis L2
//! ```
//!
//! With a server, the demo starts itself three more times (`--node N`), one process per node, and drives
//! them over their standard input; each node answers on its standard output.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fusioncache::backplane::nats::NatsBackplane;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::backplane::MemoryBackplane;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::l2::MemoryDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::{EntryOptions, FusionCache};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;

const CACHE: &str = "products";
const KEY: &str = "product:42";
const WATCH_LIMIT: Duration = Duration::from_secs(10);

type AnyError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--node") {
        return run_node(&args[1..]).await;
    }
    let backplane = args.first().cloned().filter(|a| !a.is_empty());
    let l2 = args.get(1).cloned().filter(|a| !a.is_empty());
    let mut nodes = match &backplane {
        None => {
            println!("fusioncache demo: 3 nodes of cache \"{CACHE}\" in one process, in-memory backplane and L2");
            let (bus, l2) = (MemoryBackplane::new(), MemoryDistributedCache::new());
            let mut nodes = Vec::new();
            for _ in 0..3 {
                let cache = FusionCache::<String>::builder()
                    .name(CACHE)
                    .distributed_cache(l2.clone())
                    .backplane(bus.clone())
                    .build()?;
                nodes.push(Node::local(cache));
            }
            nodes
        }
        Some(url) => {
            let l2_text = match (url.starts_with("redis"), &l2) {
                (true, _) => "Redis L2".to_string(),
                (false, Some(l2)) => format!("Redis L2 at {l2}"),
                (false, None) => "no L2".to_string(),
            };
            println!("fusioncache demo: 3 nodes of cache \"{CACHE}\" as 3 OS processes, backplane {url}, {l2_text}");
            let exe = std::env::current_exe()?;
            let mut nodes = Vec::new();
            for n in 1..=3 {
                let mut cmd = Command::new(&exe);
                cmd.arg("--node").arg(n.to_string()).arg(url);
                if let Some(l2) = &l2 {
                    cmd.arg(l2);
                }
                let mut child = cmd
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()?;
                let stdin = child.stdin.take().ok_or("no stdin")?;
                let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
                nodes.push(Node::Process {
                    _child: Box::new(child),
                    stdin,
                    stdout: Box::new(stdout),
                });
            }
            nodes
        }
    };
    for node in &mut nodes {
        let answer = node.call("ready").await?;
        if answer != "ok" {
            return Err(format!("a node could not connect: {answer}").into());
        }
    }
    let start = Instant::now();
    let has_l2 = backplane.as_deref().is_none_or(|u| u.starts_with("redis")) || l2.is_some();
    let t = |start: Instant| format!("[{:>8.3} ms]", start.elapsed().as_secs_f64() * 1000.0);

    // 1. A value set on node 1 is read on nodes 2 and 3.
    nodes[0].call(&format!("set {KEY} Widget v1")).await?;
    println!("{} node 1  set     {KEY} = \"Widget v1\"", t(start));
    for (i, node) in nodes.iter_mut().enumerate().skip(1) {
        if has_l2 {
            let v = node.call(&format!("get {KEY}")).await?;
            println!("{} node {}  get     {KEY} -> {v}", t(start), i + 1);
        } else {
            // No shared L2: each node loads the value from the source of truth itself.
            node.call(&format!("setlocal {KEY} Widget v1")).await?;
            println!(
                "{} node {}  load    {KEY} = \"Widget v1\" (from its source; no L2 to share)",
                t(start),
                i + 1
            );
        }
    }

    // 2. An update on node 1 propagates.
    let expect = if has_l2 { "Widget v2" } else { "<stale>" };
    propagate(
        &mut nodes,
        start,
        &format!("set {KEY} Widget v2"),
        &format!("{KEY} = \"Widget v2\""),
        expect,
    )
    .await?;
    if has_l2 {
        for (i, node) in nodes.iter_mut().enumerate().skip(1) {
            let v = node.call(&format!("get {KEY}")).await?;
            println!("{} node {}  get     {KEY} -> {v}", t(start), i + 1);
        }
    } else {
        for node in nodes.iter_mut().skip(1) {
            node.call(&format!("setlocal {KEY} Widget v2")).await?;
        }
    }

    // 3. A remove on node 1 propagates.
    propagate(&mut nodes, start, &format!("remove {KEY}"), KEY, "<none>").await?;
    for (i, node) in nodes.iter_mut().enumerate().skip(1) {
        let v = node.call(&format!("get {KEY}")).await?;
        println!("{} node {}  get     {KEY} -> {v}", t(start), i + 1);
    }
    for node in &mut nodes {
        let _ = node.call("quit").await;
    }
    println!("done: every node saw every change.");
    Ok(())
}

/// Runs `command` on node 1, and measures how long nodes 2 and 3 take to stop holding the old value.
async fn propagate(
    nodes: &mut [Node],
    start: Instant,
    command: &str,
    what: &str,
    expect: &str,
) -> Result<(), AnyError> {
    for node in nodes.iter_mut().skip(1) {
        node.send(&format!("watch {KEY} {expect}")).await?;
    }
    for node in nodes.iter_mut().skip(1) {
        node.recv().await?; // "watching"
    }
    let verb = command.split(' ').next().unwrap_or_default();
    let returned_at: u128 = nodes[0].call(command).await?.parse()?;
    println!(
        "[{:>8.3} ms] node 1  {verb:<7} {what}",
        start.elapsed().as_secs_f64() * 1000.0
    );
    for (i, node) in nodes.iter_mut().enumerate().skip(1) {
        let reply = node.recv().await?;
        let (seen_at, seen) = reply.split_once(' ').ok_or("bad watch reply")?;
        let us = seen_at.parse::<u128>()?.saturating_sub(returned_at);
        let shown = if seen == "<none>" && expect == "<stale>" {
            "stale (no L2 to refresh from)"
        } else {
            seen
        };
        println!(
            "[{:>8.3} ms] node {}  sees    {KEY} -> {shown}, {:.3} ms after node 1's {verb} returned",
            start.elapsed().as_secs_f64() * 1000.0,
            i + 1,
            us as f64 / 1000.0
        );
    }
    Ok(())
}

enum Node {
    Local {
        cache: FusionCache<String>,
        replies: Replies,
        rx: mpsc::UnboundedReceiver<String>,
    },
    Process {
        _child: Box<Child>,
        stdin: ChildStdin,
        stdout: Box<BufReader<ChildStdout>>,
    },
}

type Replies = mpsc::UnboundedSender<String>;

impl Node {
    fn local(cache: FusionCache<String>) -> Self {
        let (replies, rx) = mpsc::unbounded_channel();
        Node::Local { cache, replies, rx }
    }

    async fn call(&mut self, line: &str) -> Result<String, AnyError> {
        self.send(line).await?;
        self.recv().await
    }

    async fn send(&mut self, line: &str) -> Result<(), AnyError> {
        match self {
            Node::Local { cache, replies, .. } => execute(cache, line, replies).await,
            Node::Process { stdin, .. } => {
                stdin.write_all(format!("{line}\n").as_bytes()).await?;
                stdin.flush().await?;
            }
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<String, AnyError> {
        match self {
            Node::Local { rx, .. } => rx.recv().await.ok_or_else(|| "node stopped".into()),
            Node::Process { stdout, .. } => {
                let mut line = String::new();
                if stdout.read_line(&mut line).await? == 0 {
                    return Err("a node process exited".into());
                }
                Ok(line.trim_end().to_string())
            }
        }
    }
}

fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// Executes one command on a node. Replies go to `replies`; a `watch` replies twice: at once, and when the
/// node no longer holds the old value (with the time it saw that).
async fn execute(cache: &FusionCache<String>, line: &str, replies: &Replies) {
    let mut parts = line.splitn(3, ' ');
    let (cmd, key, rest) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let done = |r: Result<(), fusioncache::Error>| match r {
        Ok(()) => unix_micros().to_string(),
        Err(e) => format!("error: {e}"),
    };
    let reply = match cmd {
        "ready" => match cache.wait_for_backplane(Duration::from_secs(10)).await {
            true => "ok".to_string(),
            false => "backplane not connected".to_string(),
        },
        "set" => done(cache.set(key, rest.to_string()).await),
        "remove" => done(cache.remove(key).await),
        "setlocal" => {
            let local = EntryOptions::new()
                .skip_backplane_notifications(true)
                .skip_l2(true);
            done(cache.set_with(key, rest.to_string(), &local).await)
        }
        "get" => match cache.get(key).await {
            Some(v) => format!("\"{v}\""),
            None => "<none>".to_string(),
        },
        "watch" => {
            let (cache, key, expect, replies) = (
                cache.clone(),
                key.to_string(),
                rest.to_string(),
                replies.clone(),
            );
            tokio::spawn(async move {
                let deadline = Instant::now() + WATCH_LIMIT;
                loop {
                    let now = cache.peek(&key);
                    let seen = match expect.as_str() {
                        "<none>" | "<stale>" => now.is_none(),
                        v => now.as_deref() == Some(v) || now.is_none(),
                    };
                    if seen || Instant::now() > deadline {
                        let shown =
                            now.map_or_else(|| "<none>".to_string(), |v| format!("\"{v}\""));
                        let _ = replies.send(format!("{} {shown}", unix_micros()));
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            });
            "watching".to_string()
        }
        "quit" => "bye".to_string(),
        other => format!("error: unknown command {other}"),
    };
    let _ = replies.send(reply);
}

/// One node as its own OS process: builds its cache from the URLs and answers commands on stdin.
async fn run_node(args: &[String]) -> Result<(), AnyError> {
    let (backplane_url, l2_url) = (
        args.get(1).cloned().unwrap_or_default(),
        args.get(2).cloned(),
    );
    let mut builder = FusionCache::<String>::builder().name(CACHE);
    if backplane_url.starts_with("redis") {
        let redis = RedisConnection::open(&backplane_url)?;
        builder = builder
            .distributed_cache(RedisDistributedCache::new(redis.clone()))
            .backplane(RedisBackplane::new(redis));
    } else {
        builder = builder.backplane(NatsBackplane::connect(&backplane_url).await?);
        if let Some(url) = l2_url {
            builder =
                builder.distributed_cache(RedisDistributedCache::new(RedisConnection::open(&url)?));
        }
    }
    let cache = builder.build()?;
    let (replies, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(reply) = rx.recv().await {
            if out
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .is_err()
                || out.flush().await.is_err()
            {
                return;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        execute(&cache, &line, &replies).await;
        if line == "quit" {
            break;
        }
    }
    drop(replies);
    let _ = writer.await;
    Ok(())
}
