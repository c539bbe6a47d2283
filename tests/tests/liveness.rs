//! Liveness: every lost link is reported `Disconnected` within the bound (3 s by default), then recovered,
//! and the nodes converge. Real servers, faults injected with the testkit's proxy and signals:
//!
//! - one node's link black-holed (no RST, nothing forwarded either way), on Redis and on NATS;
//! - the server stalled (SIGSTOP), on Redis and on NATS;
//! - the Redis pub/sub connections killed by the server (`CLIENT KILL TYPE pubsub`);
//! - the old flows of a node stranded while new ones pass (the command connection must be replaced);
//! - a NATS subscription dropped by the server while its connection lives (permissions reloaded).
//!
//! The bound is the feature's contract, so it is asserted: each wait for `Disconnected` is bounded by the
//! bound plus one second. Probes are checked on the wire with a decoder written here, independent of the
//! library's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::nats::{NatsBackplane, NatsOptions};
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::backplane::PROBE_KEY;
use fusioncache::events::CacheEvent;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::{RedisConnection, RedisOptions};
use fusioncache::{BackplaneState, EntryOptions, FusionCache};
use fusioncache_integration_tests::{eventually, eventually_async, nats_node, s, WAIT};
use fusioncache_testkit::{FaultProxy, NatsCluster, NatsServer, RedisServer};
use futures_util::StreamExt;
use tokio::time::Instant;

/// The default liveness bound of both transports.
const BOUND: Duration = Duration::from_secs(3);
/// What the bound may be exceeded by: scheduling on a loaded machine.
const MARGIN: Duration = Duration::from_secs(1);

/// A node with production defaults on a Redis URL (L2 and pub/sub).
fn redis_node(url: &str) -> FusionCache<String> {
    redis_node_with(url, RedisOptions::default(), None)
}

fn redis_node_with(
    url: &str,
    options: RedisOptions,
    received: Option<Arc<AtomicU64>>,
) -> FusionCache<String> {
    let redis = RedisConnection::open_with(url, options).unwrap();
    let mut builder = FusionCache::builder()
        .name("products")
        .default_entry_options(EntryOptions::new().duration(Duration::from_secs(600)))
        .distributed_cache(RedisDistributedCache::new(redis.clone()))
        .backplane(RedisBackplane::new(redis));
    if let Some(received) = received {
        builder = builder.on_event(move |e| {
            if matches!(e, CacheEvent::BackplaneReceived { .. }) {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    builder.build().unwrap()
}

fn via(proxy: &FaultProxy, scheme: &str) -> String {
    format!("{scheme}://127.0.0.1:{}", proxy.port())
}

async fn connected(nodes: &[&FusionCache<String>]) {
    for n in nodes {
        assert!(
            n.wait_for_backplane(WAIT).await,
            "{} did not connect",
            n.instance_id()
        );
    }
}

/// Polls `cond` until `deadline`; whether it held.
async fn by(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts that every node reports `Disconnected` within the bound (plus margin) of `since`.
async fn disconnected_within_the_bound(since: Instant, nodes: &[&FusionCache<String>], what: &str) {
    let deadline = since + BOUND + MARGIN;
    for n in nodes {
        let seen = by(deadline, || {
            n.backplane_state() == BackplaneState::Disconnected
        })
        .await;
        assert!(
            seen,
            "{what}: {} still {:?} {:?} after the fault (bound {BOUND:?} + {MARGIN:?})",
            n.instance_id(),
            n.backplane_state(),
            since.elapsed()
        );
    }
}

/// Waits until every node reads `value` for `key`.
async fn converged(nodes: &[&FusionCache<String>], key: &str, value: &str) {
    for n in nodes {
        let ok = eventually_async(|| async { n.get(key).await.as_deref() == Some(value) }).await;
        assert!(ok, "{} does not read {key} = {value}", n.instance_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_redis_node_is_disconnected_within_the_bound_then_reconnects_and_converges() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(("127.0.0.1", server.port())).unwrap();
    let a = redis_node(&via(&proxy, "redis"));
    let (b, c) = (redis_node(&server.url()), redis_node(&server.url()));
    connected(&[&a, &b, &c]).await;
    b.set("k", s("v1")).await.unwrap();
    assert_eq!(a.get("k").await, Some(s("v1")));

    proxy.black_hole();
    disconnected_within_the_bound(Instant::now(), &[&a], "black hole").await;
    assert_eq!(b.backplane_state(), BackplaneState::Connected);
    b.set("k", s("v2")).await.unwrap(); // a cannot hear this one

    proxy.pass();
    connected(&[&a]).await;
    assert!(a.stats().backplane_reconnects >= 1);
    converged(&[&a, &b, &c], "k", "v2").await;
    c.set("k", s("v3")).await.unwrap();
    converged(&[&a, &b], "k", "v3").await;
}

/// Entries that stay fresh through a test: only notifications change them.
fn long_lived() -> EntryOptions {
    EntryOptions::new().duration(Duration::from_secs(600))
}

/// A NATS server and a Redis L2 (kept alive by the first element), a proxy in front of the NATS server,
/// node `a` through the proxy and `direct` nodes straight to the server.
async fn nats_nodes_one_behind_a_proxy(
    direct: usize,
) -> (
    (NatsServer, RedisServer),
    FaultProxy,
    FusionCache<String>,
    Vec<FusionCache<String>>,
) {
    let nats = NatsServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(("127.0.0.1", nats.port())).unwrap();
    let a = nats_node(
        &via(&proxy, "nats"),
        Some(&redis.url()),
        "products",
        long_lived(),
    )
    .await;
    let mut others = Vec::new();
    for _ in 0..direct {
        others.push(nats_node(&nats.url(), Some(&redis.url()), "products", long_lived()).await);
    }
    ((nats, redis), proxy, a, others)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_nats_node_is_disconnected_within_the_bound_then_reconnects_and_converges() {
    let (_servers, proxy, a, direct) = nats_nodes_one_behind_a_proxy(2).await;
    let [b, c] = &direct[..] else { unreachable!() };
    connected(&[&a, b, c]).await;
    b.set("k", s("v1")).await.unwrap();
    assert_eq!(a.get("k").await, Some(s("v1")));

    proxy.black_hole();
    disconnected_within_the_bound(Instant::now(), &[&a], "black hole").await;
    b.set("k", s("v2")).await.unwrap();
    // While its backplane is down, a does not trust its L1 (its L2 link is fine).
    assert_eq!(a.get("k").await, Some(s("v2")));

    proxy.pass();
    connected(&[&a]).await;
    converged(&[&a, b, c], "k", "v2").await;
    a.set("k", s("v3")).await.unwrap();
    assert!(
        eventually(
            || b.peek("k").is_none_or(|v| v == "v3") && c.peek("k").is_none_or(|v| v == "v3")
        )
        .await
    );
    converged(&[b, c], "k", "v3").await;
}

/// A notification sent into a link that died without a word (the flow stranded: its bytes go nowhere)
/// gets no receipt from the NATS server, so it is queued and sent again once the node has reconnected:
/// the other nodes do not keep the old value. (Sent and forgotten, it was lost: B kept `v1`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_notification_lost_in_a_dead_link_is_sent_again_after_the_reconnection() {
    let (_servers, proxy, a, direct) = nats_nodes_one_behind_a_proxy(1).await;
    let b = &direct[0];
    connected(&[&a, b]).await;
    for (key, value) in [("background", "v1"), ("awaited", "v1")] {
        a.set(key, s(value)).await.unwrap();
        assert_eq!(b.get(key).await.as_deref(), Some(value));
    }

    proxy.strand();
    // L2 takes both writes; both notifications go into the dead flow, one from the publisher task, one
    // awaited by `set` (which returns once it is queued for auto-recovery).
    a.set("background", s("v2")).await.unwrap();
    let awaited = long_lived().background_backplane_operations(false);
    a.set_with("awaited", s("v2"), &awaited).await.unwrap();
    for key in ["background", "awaited"] {
        assert!(
            eventually(|| b.peek(key).as_deref() != Some("v1")).await,
            "b still serves the old value of {key}: its notification was lost"
        );
    }
    assert!(a.stats().backplane_reconnects >= 1);
    converged(&[&a, b], "background", "v2").await;
    converged(&[&a, b], "awaited", "v2").await;
}

/// Stalls the backplane server of `nodes`: every node reports `Disconnected` within the bound; once the
/// server is resumed they reconnect and converge.
async fn a_stall_is_detected_and_recovered(
    nodes: &[FusionCache<String>],
    stall: impl FnOnce() -> std::io::Result<()>,
    resume: impl FnOnce() -> std::io::Result<()>,
) {
    let refs: Vec<&FusionCache<String>> = nodes.iter().collect();
    connected(&refs).await;
    nodes[0].set("k", s("v1")).await.unwrap();
    converged(&refs, "k", "v1").await;

    let stalled = Instant::now();
    stall().unwrap();
    disconnected_within_the_bound(stalled, &refs, "SIGSTOP").await;
    resume().unwrap();
    connected(&refs).await;
    nodes[1].set("k", s("v2")).await.unwrap();
    converged(&refs, "k", "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_server_is_detected_within_the_bound_and_recovered() {
    let server = RedisServer::start().unwrap();
    let nodes: Vec<_> = (0..3).map(|_| redis_node(&server.url())).collect();
    a_stall_is_detected_and_recovered(&nodes, || server.stall(), || server.resume()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nats_server_is_detected_within_the_bound_and_recovered() {
    let nats = NatsServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let opts = EntryOptions::new().duration(Duration::from_secs(600));
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(nats_node(&nats.url(), Some(&redis.url()), "products", opts.clone()).await);
    }
    a_stall_is_detected_and_recovered(&nodes, || nats.stall(), || nats.resume()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_pubsub_connections_are_reconnected_within_the_bound() {
    let server = RedisServer::start().unwrap();
    let nodes: Vec<_> = (0..3).map(|_| redis_node(&server.url())).collect();
    let refs: Vec<&FusionCache<String>> = nodes.iter().collect();
    connected(&refs).await;
    nodes[0].set("k", s("v1")).await.unwrap();
    converged(&refs, "k", "v1").await;

    let killed = Instant::now();
    let reply = server
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .unwrap();
    assert_eq!(reply, ":3\r\n", "one pub/sub connection per node");
    for n in &refs {
        let back = by(killed + BOUND + MARGIN, || {
            n.stats().backplane_reconnects == 1 && n.backplane_state() == BackplaneState::Connected
        })
        .await;
        assert!(back, "{} not reconnected within the bound", n.instance_id());
    }
    nodes[1].set("k", s("v2")).await.unwrap();
    converged(&refs, "k", "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranded_redis_node_reconnects_and_replaces_its_command_connection() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(("127.0.0.1", server.port())).unwrap();
    let a = redis_node(&via(&proxy, "redis"));
    let b = redis_node(&server.url());
    connected(&[&a, &b]).await;
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));

    // The flows open now are dead for good, new ones pass: a failover, a NAT entry lost.
    proxy.strand();
    disconnected_within_the_bound(Instant::now(), &[&a], "stranded").await;
    connected(&[&a]).await;
    // The command connection too: writes go through again once it is replaced.
    assert!(
        eventually_async(|| async { a.set("k", s("v2")).await.is_ok() }).await,
        "the command connection was never replaced"
    );
    converged(&[&a, &b], "k", "v2").await;
}

const NATS_USERS: &str = r#"
authorization {
  users = [
    { user: a, password: pw, permissions: { subscribe: { allow: [">"] DENY } } }
    { user: b, password: pw }
  ]
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_subscription_dropped_by_the_server_is_detected_and_restored() {
    let conf = |deny: &str| NATS_USERS.replace("DENY", deny);
    let nats = NatsServer::start_with_config(&conf("")).unwrap();
    let redis = RedisServer::start().unwrap();
    let url = |user: &str| format!("nats://{user}:pw@127.0.0.1:{}", nats.port());
    let opts = EntryOptions::new().duration(Duration::from_secs(600));
    let a = nats_node(&url("a"), Some(&redis.url()), "products", opts.clone()).await;
    let b = nats_node(&url("b"), Some(&redis.url()), "products", opts).await;
    connected(&[&a, &b]).await;

    // The server removes a's subscription; a's connection stays up.
    let path = nats.config_path().unwrap().to_path_buf();
    std::fs::write(&path, conf(r#", deny: ["products.>"]"#)).unwrap();
    let dropped = Instant::now();
    nats.reload().unwrap();
    disconnected_within_the_bound(dropped, &[&a], "subscription dropped").await;
    assert_eq!(b.backplane_state(), BackplaneState::Connected);

    std::fs::write(&path, conf("")).unwrap();
    nats.reload().unwrap();
    connected(&[&a]).await;
    b.set("k", s("v1")).await.unwrap();
    converged(&[&a], "k", "v1").await;
    a.set_with(
        "k",
        s("mine"),
        &EntryOptions::new()
            .skip_backplane_notifications(true)
            .skip_l2(true),
    )
    .await
    .unwrap();
    b.set("k", s("v2")).await.unwrap();
    assert!(
        eventually(|| a.peek("k").as_deref() != Some("mine")).await,
        "a hears b again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_keeps_the_configured_server_order_when_asked() {
    let mut cluster = NatsCluster::start(3).unwrap();
    let urls = cluster.urls();
    let mut nodes = Vec::new();
    for i in 0..6 {
        // Node i lists server i % 3 first, then the others in order.
        let first = i % 3;
        let order: Vec<String> = (0..3).map(|j| urls[(first + j) % 3].clone()).collect();
        let options = NatsOptions::new(order.join(",")).retain_servers_order(true);
        nodes.push((first, NatsBackplane::connect_with(options).await.unwrap()));
    }
    for (first, node) in &nodes {
        let port = cluster.server(*first).port();
        assert!(
            eventually(|| node.client().server_info().port == port).await,
            "a node listing server {first} first is on port {}",
            node.client().server_info().port
        );
    }
    // When its first server dies, a node moves to its second one.
    cluster.server_mut(0).stop();
    let second = cluster.server(1).port();
    for (first, node) in nodes.iter().filter(|(f, _)| *f == 0) {
        assert!(
            eventually(|| node.client().server_info().port == second).await,
            "a node listing server {first} first, then 1, is on port {}",
            node.client().server_info().port
        );
    }
}

/// A FusionCache v0 message, decoded here (independently of the library).
#[derive(Debug)]
struct Wire {
    version: u8,
    source: String,
    ticks: i64,
    action: u8,
    key: String,
}

fn decode(bytes: &[u8]) -> Option<Wire> {
    let mut at = 0usize;
    let mut take = |n: usize| {
        let slice = bytes.get(at..at + n)?;
        at += n;
        Some(slice)
    };
    let version = take(1)?[0];
    let len = i32::from_le_bytes(take(4)?.try_into().ok()?);
    let source = String::from_utf8(take(usize::try_from(len).ok()?)?.to_vec()).ok()?;
    let ticks = i64::from_le_bytes(take(8)?.try_into().ok()?);
    let action = take(1)?[0];
    let len = i32::from_le_bytes(take(4)?.try_into().ok()?);
    let key = String::from_utf8(take(usize::try_from(len).ok()?)?.to_vec()).ok()?;
    (at == bytes.len()).then_some(Wire {
        version,
        source,
        ticks,
        action,
        key,
    })
}

/// .NET ticks now.
fn ticks_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    621_355_968_000_000_000 + (unix.as_nanos() / 100) as i64
}

/// The probes reached every cache and changed nothing there: no event, no count but the probes'.
fn probes_changed_nothing(nodes: &[FusionCache<String>], received: &AtomicU64) {
    assert_eq!(received.load(Ordering::Relaxed), 0, "no BackplaneReceived");
    for n in nodes {
        let stats = n.stats();
        assert!(stats.backplane_probes > 0, "the probes reached the cache");
        assert_eq!(
            (
                stats.backplane_received,
                stats.backplane_malformed,
                stats.backplane_unsupported,
                stats.backplane_reconnects
            ),
            (0, 0, 0, 0),
            "and changed nothing"
        );
    }
}

/// Checks probes seen on the wire: valid v0 *set* messages on the reserved key, fresh, and about one per
/// interval for the whole idle fleet (not one per node).
fn check_probes(payloads: &[(Instant, Vec<u8>)], interval: Duration, nodes: usize) {
    for (_, payload) in payloads {
        let msg = decode(payload).unwrap_or_else(|| panic!("not a v0 message: {payload:?}"));
        assert_eq!(msg.version, 0);
        assert_eq!(
            msg.action, 1,
            "a set: .NET nodes do nothing for a key they do not hold"
        );
        assert_eq!(msg.key, PROBE_KEY);
        assert!(!msg.source.is_empty());
        let age = (ticks_now() - msg.ticks).abs();
        assert!(age < 600_000_000, "timestamp within a minute of now");
    }
    let span = payloads.last().unwrap().0 - payloads[0].0;
    let per_interval = (payloads.len() - 1) as f64 / (span.as_secs_f64() / interval.as_secs_f64());
    assert!(
        per_interval < 1.5,
        "{} idle nodes sent {per_interval:.2} probes per interval ({} in {span:?})",
        nodes,
        payloads.len()
    );
}

const PROBES: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_probes_are_valid_set_messages_on_the_reserved_key_and_caches_ignore_them() {
    let server = RedisServer::start().unwrap();
    let interval = Duration::from_millis(200);
    let received = Arc::new(AtomicU64::new(0));
    let options = RedisOptions::default().health_check_interval(interval);
    let nodes: Vec<_> = (0..3)
        .map(|_| redis_node_with(&server.url(), options.clone(), Some(received.clone())))
        .collect();
    let refs: Vec<&FusionCache<String>> = nodes.iter().collect();
    connected(&refs).await;

    let raw = redis::Client::open(server.url()).unwrap();
    let mut pubsub = raw.get_async_pubsub().await.unwrap();
    pubsub.subscribe(nodes[0].channel()).await.unwrap();
    let mut stream = pubsub.into_on_message();
    let mut payloads = Vec::new();
    while payloads.len() < PROBES {
        let msg = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap();
        payloads.push((Instant::now(), msg.get_payload_bytes().to_vec()));
    }
    check_probes(&payloads, interval, nodes.len());
    probes_changed_nothing(&nodes, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_probes_are_valid_set_messages_on_the_reserved_key_and_caches_ignore_them() {
    let nats = NatsServer::start().unwrap();
    let interval = Duration::from_millis(200);
    let received = Arc::new(AtomicU64::new(0));
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let options = NatsOptions::new(nats.url()).health_check_interval(interval);
        let backplane = NatsBackplane::connect_with(options).await.unwrap();
        let seen = received.clone();
        let node: FusionCache<String> = FusionCache::builder()
            .name("products")
            .backplane(backplane)
            .on_event(move |e| {
                if matches!(e, CacheEvent::BackplaneReceived { .. }) {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build()
            .unwrap();
        nodes.push(node);
    }
    let refs: Vec<&FusionCache<String>> = nodes.iter().collect();
    connected(&refs).await;

    let raw = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = raw.subscribe(nodes[0].channel().to_string()).await.unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < PROBES {
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
        payloads.push((Instant::now(), msg.payload.to_vec()));
    }
    check_probes(&payloads, interval, nodes.len());
    probes_changed_nothing(&nodes, &received);
}
