//! Overlapping operations and connection faults on real servers: a node never installs a value older than
//! a write or invalidation it has seen, and never loses an acknowledged write. Interleavings are forced
//! with fault wrappers that park an L2 read after it fetched its bytes, not with sleeps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::nats::NatsBackplane;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::backplane::Backplane;
use fusioncache::backplane::MemoryBackplane;
use fusioncache::events::CacheEvent;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::l2::MemoryDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::testing::{FaultyL2, L2Faults};
use fusioncache::{EntryOptions, FusionCache};
use fusioncache_integration_tests::{eventually, eventually_async, fast_redis_options, s, WAIT};
use fusioncache_testkit::{NatsServer, RedisServer};

#[derive(Clone, Copy, Debug)]
enum Bus {
    Memory,
    Redis,
    Nats,
}

/// What the nodes of one test share: in-process L2 and backplane (`Bus::Memory`), or real servers —
/// Redis (L2, and the backplane for `Bus::Redis`) and NATS when asked.
enum Servers {
    Memory(MemoryDistributedCache, MemoryBackplane),
    Real {
        redis: Box<RedisServer>,
        nats: Option<Box<NatsServer>>,
    },
}

impl Servers {
    fn start(bus: Bus) -> Self {
        match bus {
            Bus::Memory => Servers::Memory(MemoryDistributedCache::new(), MemoryBackplane::new()),
            _ => Servers::Real {
                redis: Box::new(RedisServer::start().unwrap()),
                nats: matches!(bus, Bus::Nats).then(|| Box::new(NatsServer::start().unwrap())),
            },
        }
    }

    fn redis(&self) -> &RedisServer {
        match self {
            Servers::Real { redis, .. } => redis,
            Servers::Memory(..) => panic!("an in-process test has no redis-server"),
        }
    }

    /// A node with its own connections, whose L2 goes through fault switches.
    async fn node(&self) -> (FusionCache<String>, L2Faults) {
        let (l2, backplane): (
            Arc<dyn fusioncache::l2::DistributedCache>,
            Arc<dyn Backplane>,
        ) = match self {
            Servers::Memory(store, bus) => (Arc::new(store.clone()), Arc::new(bus.clone())),
            Servers::Real { redis, nats } => {
                let redis = RedisConnection::open_with(&redis.url(), fast_redis_options()).unwrap();
                let backplane: Arc<dyn Backplane> = match nats {
                    Some(nats) => Arc::new(NatsBackplane::connect(&nats.url()).await.unwrap()),
                    None => Arc::new(RedisBackplane::new(redis.clone())),
                };
                (Arc::new(RedisDistributedCache::new(redis)), backplane)
            }
        };
        let (l2, faults) = FaultyL2::new(l2);
        let cache = FusionCache::builder()
            .name("products")
            .default_entry_options(EntryOptions::new().duration(Duration::from_secs(120)))
            .distributed_cache(l2)
            .shared_backplane(backplane)
            .build()
            .unwrap();
        assert!(cache.wait_for_backplane(WAIT).await);
        (cache, faults)
    }
}

async fn own_get_and_set_at_once(bus: Bus, trials: usize) {
    let servers = Servers::start(bus);
    let (a, faults) = servers.node().await;
    let (writer, _) = servers.node().await;
    for trial in 0..trials {
        let key = format!("k{trial}");
        writer.set(&key, s("old")).await.unwrap();
        let mut paused = faults.pause_next_read(&key);
        let reader = {
            let (a, key) = (a.clone(), key.clone());
            tokio::spawn(async move { a.get(&key).await })
        };
        assert!(paused.parked(WAIT).await);
        a.set(&key, s("new")).await.unwrap();
        paused.release();
        reader.await.unwrap();
        assert_eq!(a.get(&key).await, Some(s("new")), "{bus:?} trial {trial}");
        assert!(
            eventually_async(|| async { writer.get(&key).await == Some(s("new")) }).await,
            "{bus:?} trial {trial}: the other node too"
        );
    }
}

async fn remote_change_racing_a_read(bus: Bus, remove: bool) {
    let servers = Servers::start(bus);
    let (a, _) = servers.node().await;
    let (b, b_faults) = servers.node().await;
    a.set("k", s("v1")).await.unwrap();
    // b has heard of that set before its read starts: the only notification it hears next is the race.
    assert!(eventually(|| b.stats().backplane_received >= 1).await);
    let mut paused = b_faults.pause_next_read("k");
    let reader = {
        let b = b.clone();
        tokio::spawn(async move { b.get("k").await })
    };
    assert!(paused.parked(WAIT).await);
    let received = b.stats().backplane_received;
    if remove {
        a.remove("k").await.unwrap();
    } else {
        a.set("k", s("v2")).await.unwrap();
    }
    assert!(eventually(|| b.stats().backplane_received > received).await);
    paused.release();
    reader.await.unwrap();
    assert_ne!(
        b.peek("k"),
        Some(s("v1")),
        "{bus:?}: the old value was not installed"
    );
    let expected = if remove { None } else { Some(s("v2")) };
    assert_eq!(b.get("k").await, expected, "{bus:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_get_and_set_at_once_on_redis() {
    own_get_and_set_at_once(Bus::Redis, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_get_and_set_at_once_in_process_100_of_100() {
    own_get_and_set_at_once(Bus::Memory, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_remove_and_set_racing_a_read_in_process() {
    remote_change_racing_a_read(Bus::Memory, true).await;
    remote_change_racing_a_read(Bus::Memory, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_get_and_set_at_once_on_nats() {
    own_get_and_set_at_once(Bus::Nats, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_remove_and_set_racing_a_read_on_redis() {
    remote_change_racing_a_read(Bus::Redis, true).await;
    remote_change_racing_a_read(Bus::Redis, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_remove_and_set_racing_a_read_on_nats() {
    remote_change_racing_a_read(Bus::Nats, true).await;
    remote_change_racing_a_read(Bus::Nats, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_whose_command_connection_is_killed_still_reaches_l2_and_the_peers() {
    let servers = Servers::start(Bus::Redis);
    let (a, _) = servers.node().await;
    let (b, _) = servers.node().await;
    let mut failed_writes = 0;
    for trial in 0..10u32 {
        let key = format!("k{trial}");
        a.set(&key, s("before")).await.unwrap();
        assert_eq!(b.get(&key).await, Some(s("before")));
        let queued = a.stats().auto_recovery_queued;
        // Every command connection (not the subscribers) dies under the next set.
        let killed = servers
            .redis()
            .command(&["CLIENT", "KILL", "TYPE", "normal"])
            .unwrap();
        assert!(killed.starts_with(':'), "{killed}");
        a.set(&key, format!("after {trial}")).await.unwrap();
        failed_writes += a.stats().auto_recovery_queued - queued;
        assert!(
            eventually_async(|| async { b.get(&key).await == Some(format!("after {trial}")) })
                .await,
            "trial {trial}: the write reached L2 and b was told"
        );
        assert_eq!(
            servers.redis().command(&["EXISTS", &key]).unwrap().trim(),
            ":1",
            "trial {trial}"
        );
    }
    assert!(
        eventually(|| a.pending_recovery() == 0).await,
        "every queued write went through"
    );
    println!("{failed_writes} of 10 sets hit the killed connection and were recovered");
}

/// Sets the flag to `false` when dropped.
struct Release(Arc<AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Two caches share one transport and a third node writes through another: the first cache's receive
/// loop is blocked by its listener. The other cache must get every notification, the transport must stay
/// connected (its health checks go on), and the blocked cache must learn that it missed some.
async fn a_blocked_cache_does_not_stall_the_others(
    shared: Arc<dyn Backplane>,
    writer_backplane: Arc<dyn Backplane>,
    count: u64,
) {
    let blocked = Arc::new(AtomicBool::new(true));
    let gate = blocked.clone();
    // Unblocks the listener however the test ends: a failed assertion must fail the test, not hang the
    // runtime's shutdown on a worker stuck in the listener.
    let _release = Release(blocked.clone());
    let slow: FusionCache<String> = FusionCache::builder()
        .name("products")
        .shared_backplane(shared.clone())
        .on_event(move |e| {
            if matches!(e, CacheEvent::BackplaneReceived { .. }) {
                // A listener stuck in blocking I/O or a deadlock.
                while gate.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
        .build()
        .unwrap();
    let fast: FusionCache<String> = FusionCache::builder()
        .name("products")
        .shared_backplane(shared)
        .build()
        .unwrap();
    let writer: FusionCache<String> = FusionCache::builder()
        .name("products")
        .shared_backplane(writer_backplane)
        .default_entry_options(EntryOptions::new().background_backplane_operations(false))
        .build()
        .unwrap();
    for n in [&slow, &fast, &writer] {
        assert!(n.wait_for_backplane(WAIT).await);
    }
    // Far more notifications than one subscription buffers, in chunks that the fast cache, stalled by
    // nothing, keeps up with (however busy the machine is) while the slow one's buffer overflows.
    // (A subscription buffers 8192 notifications.)
    const CHUNK: u64 = 2_000;
    for i in 0..count {
        writer.remove(&format!("k{i}")).await.unwrap();
        if (i + 1) % CHUNK == 0 || i + 1 == count {
            assert!(
                eventually(|| fast.stats().backplane_received == i + 1).await,
                "the other cache on the transport keeps receiving: {} of {}",
                fast.stats().backplane_received,
                i + 1
            );
        }
    }
    // Health checks (every 500 ms on Redis here) went on meanwhile: no disconnection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fast.stats().backplane_reconnects, 0);
    assert_eq!(
        fast.backplane_state(),
        fusioncache::BackplaneState::Connected
    );
    assert!(
        slow.stats().backplane_received <= 1,
        "the slow one is still stuck"
    );
    blocked.store(false, Ordering::SeqCst);
    assert!(
        eventually(|| slow.stats().backplane_overflows >= 1 && slow.stats().l1_mark_all_stale >= 1)
            .await,
        "the slow one knows it missed notifications and distrusts its L1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_cache_on_a_shared_memory_transport_does_not_stall_the_others() {
    let bus = fusioncache::backplane::MemoryBackplane::new();
    a_blocked_cache_does_not_stall_the_others(Arc::new(bus.clone()), Arc::new(bus), 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_cache_on_a_shared_redis_transport_does_not_stall_the_others() {
    let server = RedisServer::start().unwrap();
    let connect = || RedisConnection::open_with(&server.url(), fast_redis_options()).unwrap();
    let shared = Arc::new(RedisBackplane::new(connect()));
    let writer = Arc::new(RedisBackplane::new(connect()));
    a_blocked_cache_does_not_stall_the_others(shared, writer, 12_000).await;
}

/// 3 nodes, concurrent reads and writes on 4 hot keys for `FUSIONCACHE_STRESS_SECS` (default 10 s): no
/// read that starts after a node's acknowledged write returns anything older, and all nodes converge
/// once the load stops. Writes of one key are serialized across the nodes (so that their order is the
/// order of their timestamps and "older" is well defined); reads overlap everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_concurrent_reads_and_writes_never_go_back_and_converge() {
    const KEYS: usize = 4;
    let secs = std::env::var("FUSIONCACHE_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let server = RedisServer::start().unwrap();
    let nodes: Vec<FusionCache<u64>> = (0..3)
        .map(|_| {
            let redis = RedisConnection::open_with(&server.url(), fast_redis_options()).unwrap();
            FusionCache::builder()
                .name("stress")
                .default_entry_options(EntryOptions::new().duration(Duration::from_secs(600)))
                .distributed_cache(RedisDistributedCache::new(redis.clone()))
                .backplane(RedisBackplane::new(redis))
                .build()
                .unwrap()
        })
        .collect();
    for n in &nodes {
        assert!(n.wait_for_backplane(WAIT).await);
    }
    let seq = Arc::new(AtomicU64::new(0));
    let key_locks: Arc<Vec<tokio::sync::Mutex<()>>> =
        Arc::new((0..KEYS).map(|_| tokio::sync::Mutex::new(())).collect());
    let acked: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        (0..nodes.len())
            .map(|_| (0..KEYS).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reads = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        {
            let (node, seq, key_locks, acked, stop) = (
                node.clone(),
                seq.clone(),
                key_locks.clone(),
                acked.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = n;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % KEYS;
                    i += 1;
                    let _write = key_locks[k].lock().await;
                    let v = seq.fetch_add(1, Ordering::SeqCst) + 1;
                    node.set(&format!("key{k}"), v).await.unwrap();
                    acked[n][k].store(v, Ordering::SeqCst);
                    drop(_write);
                    tokio::task::yield_now().await;
                }
            }));
        }
        for r in 0..2 {
            let (node, acked, stop, violations, reads) = (
                node.clone(),
                acked.clone(),
                stop.clone(),
                violations.clone(),
                reads.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % KEYS;
                    i += 1;
                    let floor = acked[n][k].load(Ordering::SeqCst);
                    let got = node.get(&format!("key{k}")).await;
                    reads.fetch_add(1, Ordering::Relaxed);
                    if floor > 0 && got.is_none_or(|v| v < floor) {
                        violations.lock().unwrap().push(format!(
                            "node {n} key{k}: read {got:?} after acking {floor}"
                        ));
                    }
                    // An L1 hit never yields: let the writers and the receivers run.
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let violations = violations.lock().unwrap().clone();
    assert!(
        violations.is_empty(),
        "{} reads went back in time, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    let writes = seq.load(Ordering::SeqCst);
    assert!(
        writes > 100 && reads.load(Ordering::Relaxed) > 100,
        "the load ran"
    );
    for k in 0..KEYS {
        let key = format!("key{k}");
        let last = (0..nodes.len())
            .map(|n| acked[n][k].load(Ordering::SeqCst))
            .max()
            .unwrap();
        for (n, node) in nodes.iter().enumerate() {
            assert!(
                eventually_async(|| async { node.get(&key).await == Some(last) }).await,
                "node {n} converges to {last} on {key}: {:?}",
                node.get(&key).await
            );
        }
    }
    for node in &nodes {
        assert_eq!(node.pending_recovery(), 0);
        assert_eq!(node.stats().backplane_reconnects, 0);
    }
    println!(
        "{writes} writes, {} reads, 0 went back",
        reads.load(Ordering::Relaxed)
    );
}

/// L2 and the backplane on one Redis connection, few nodes: the write and its notification go in one
/// batch, the PUBLISH after the write in the same script. When Redis refuses the write (out of memory),
/// the script publishes nothing: the others keep what L2 holds, the writer keeps its own value, and once
/// Redis accepts writes again the queued write is replayed and announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_in_a_batch_with_its_notification_publishes_nothing_until_replayed() {
    a_refused_write_is_replayed(true, 0).await;
}

/// A fleet (more subscribers on the channel than the batch takes notifications for): the write goes alone
/// and the notification would follow from the publisher; refused, it publishes nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_a_refused_write_publishes_nothing_until_replayed() {
    a_refused_write_is_replayed(true, 10).await;
}

/// A fleet, but the notification awaited: it goes in the batch of its write whatever the fleet (`set`
/// waits for the fan-out); refused, it publishes nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_a_refused_write_with_an_awaited_notification_publishes_nothing_until_replayed()
{
    a_refused_write_is_replayed(false, 10).await;
}

/// `background`: the nodes' notifications in the background (the default) or awaited; `fleet`: how many
/// more subscribers the channel has.
async fn a_refused_write_is_replayed(background: bool, fleet: usize) {
    let server = RedisServer::start().unwrap();
    let node = || {
        let redis = RedisConnection::open_with(&server.url(), fast_redis_options()).unwrap();
        FusionCache::<String>::builder()
            .name("products")
            .auto_recovery_delay(Duration::from_millis(300))
            .default_entry_options(
                EntryOptions::new()
                    .duration(Duration::from_secs(120))
                    .background_backplane_operations(background),
            )
            .distributed_cache(RedisDistributedCache::new(redis.clone()))
            .backplane(RedisBackplane::new(redis))
            .build()
            .unwrap()
    };
    let client = redis::Client::open(server.url()).unwrap();
    let mut others = Vec::new();
    for _ in 0..fleet {
        let mut subscriber = client.get_async_pubsub().await.unwrap();
        subscriber.subscribe("products.Backplane:v2").await.unwrap();
        others.push(subscriber);
    }
    let (a, b) = (node(), node());
    for n in [&a, &b] {
        assert!(n.wait_for_backplane(WAIT).await);
    }
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    let used = server.command(&["INFO", "memory"]).unwrap();
    let used: u64 = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Below what Redis uses now: every write is refused with OOM (a PUBLISH would still run).
    let limit = (used / 2).to_string();
    server
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .unwrap();
    server
        .command(&["CONFIG", "SET", "maxmemory", &limit])
        .unwrap();
    // What reaches the channel for `k` from now on (liveness probes, on their own key, are left out).
    let heard = Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let mut watcher = client.get_async_pubsub().await.unwrap();
    watcher.subscribe("products.Backplane:v2").await.unwrap();
    let listener = tokio::spawn({
        let heard = heard.clone();
        async move {
            let mut messages = watcher.into_on_message();
            while let Some(msg) = futures_util::StreamExt::next(&mut messages).await {
                let payload = msg.get_payload_bytes();
                if let Ok(m) = fusioncache::backplane::BackplaneMessage::decode(payload) {
                    if m.cache_key == "k" {
                        heard.lock().unwrap().push(m.timestamp);
                    }
                }
            }
        }
    });
    a.set("k", s("v2")).await.unwrap();
    assert_eq!(a.pending_recovery(), 1, "queued");
    // Not even once auto-recovery has retried the write (still refused).
    assert!(eventually(|| a.stats().auto_recovery_retries >= 1).await);
    assert!(
        heard.lock().unwrap().is_empty(),
        "a refused write publishes nothing"
    );
    assert_eq!(a.get("k").await, Some(s("v2")), "a reads its own write");
    assert!(
        eventually_async(|| async { b.get("k").await == Some(s("v1")) }).await,
        "b serves what L2 holds"
    );
    server
        .command(&["CONFIG", "SET", "maxmemory", "0"])
        .unwrap();
    assert!(
        eventually_async(|| async { b.get("k").await == Some(s("v2")) }).await,
        "replayed and announced"
    );
    assert_eq!(a.pending_recovery(), 0);
    assert!(
        eventually(|| !heard.lock().unwrap().is_empty()).await,
        "announced after the replay"
    );
    listener.abort();
}
