//! Idle soak: healthy links must stay up. Three nodes sit idle for `FUSIONCACHE_SOAK_SECS` (default 60 s,
//! longer than every health-check and ping interval) on real redis-server and nats-server; none may lose
//! its subscription, mark its L1 stale, or re-read L2 for an entry it already holds.
//!
//! Both soaks are in this one test binary so that they run at the same time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::nats::NatsBackplane;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::events::CacheEvent;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::{BackplaneState, EntryOptions, FusionCache, FusionCacheBuilder};
use fusioncache_integration_tests::{s, WAIT};
use fusioncache_testkit::{NatsServer, RedisServer};

fn soak_duration() -> Duration {
    let secs = std::env::var("FUSIONCACHE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// The number of GET commands the server has executed (from `INFO commandstats`).
fn server_gets(server: &RedisServer) -> u64 {
    let info = server.command(&["INFO", "commandstats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A node that counts the `Disconnected` events it sees.
fn counting(
    builder: FusionCacheBuilder<String>,
    disconnects: &Arc<AtomicU64>,
) -> FusionCache<String> {
    let seen = disconnects.clone();
    builder
        .name("products")
        .default_entry_options(EntryOptions::new().duration(Duration::from_secs(600)))
        .on_event(move |e| {
            if matches!(e, CacheEvent::BackplaneDisconnected { .. }) {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build()
        .unwrap()
}

async fn soak(nodes: Vec<FusionCache<String>>, disconnects: Arc<AtomicU64>, redis: &RedisServer) {
    for n in &nodes {
        assert!(
            n.wait_for_backplane(WAIT).await,
            "backplane did not connect"
        );
    }
    nodes[0].set("k", s("v")).await.unwrap();
    for n in &nodes[1..] {
        assert_eq!(n.get("k").await, Some(s("v")), "read from L2 into L1");
    }
    let gets_before = server_gets(redis);
    let stats_before: Vec<_> = nodes.iter().map(|n| n.stats()).collect();

    tokio::time::sleep(soak_duration()).await;

    for (n, before) in nodes.iter().zip(&stats_before) {
        assert_eq!(n.backplane_state(), BackplaneState::Connected);
        assert_eq!(n.get("k").await, Some(s("v")));
        let after = n.stats();
        assert_eq!(after.backplane_reconnects, 0, "no reconnection while idle");
        assert_eq!(
            after.l1_mark_all_stale, 0,
            "L1 never marked stale while idle"
        );
        assert_eq!(after.l1_hits, before.l1_hits + 1, "served from L1");
        assert_eq!(after.l2_hits, before.l2_hits, "no L2 read");
    }
    assert_eq!(
        disconnects.load(Ordering::Relaxed),
        0,
        "no Disconnected event"
    );
    assert_eq!(
        server_gets(redis),
        gets_before,
        "the server saw no GET during the soak"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_idle_nodes_on_redis_stay_connected_and_keep_their_l1() {
    let server = RedisServer::start().unwrap();
    let disconnects = Arc::new(AtomicU64::new(0));
    let nodes = (0..3)
        .map(|_| {
            // Default options: what a production node runs with.
            let redis = RedisConnection::open(&server.url()).unwrap();
            let builder = FusionCache::builder()
                .distributed_cache(RedisDistributedCache::new(redis.clone()))
                .backplane(RedisBackplane::new(redis));
            counting(builder, &disconnects)
        })
        .collect();
    soak(nodes, disconnects, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_idle_nodes_on_nats_stay_connected_and_keep_their_l1() {
    let nats = NatsServer::start().unwrap();
    let redis_server = RedisServer::start().unwrap();
    let disconnects = Arc::new(AtomicU64::new(0));
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let backplane = NatsBackplane::connect(&nats.url()).await.unwrap();
        let redis = RedisConnection::open(&redis_server.url()).unwrap();
        let builder = FusionCache::builder()
            .distributed_cache(RedisDistributedCache::new(redis))
            .shared_backplane(Arc::new(backplane));
        nodes.push(counting(builder, &disconnects));
    }
    soak(nodes, disconnects, &redis_server).await;
}
