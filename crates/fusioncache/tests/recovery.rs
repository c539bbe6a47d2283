//! Auto-recovery of distributed operations: a change whose L2 step or publish failed is neither published
//! half-done nor lost; it is retried until it goes through.

use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::MemoryBackplane;
use fusioncache::l2::MemoryDistributedCache;
use fusioncache::testing::{BackplaneFaults, FaultyBackplane, FaultyL2, L2Faults};
use fusioncache::{EntryOptions, FusionCache};

mod common;
use common::within;

const RETRY: Duration = Duration::from_millis(300);

struct Node {
    cache: FusionCache<u64>,
    l2: L2Faults,
    bus: BackplaneFaults,
}

async fn cluster(n: usize) -> (Vec<Node>, MemoryDistributedCache, MemoryBackplane) {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let mut nodes = Vec::new();
    for _ in 0..n {
        let (l2, l2_faults) = FaultyL2::new(Arc::new(store.clone()));
        let (bp, bus_faults) = FaultyBackplane::new(Arc::new(bus.clone()));
        let cache = FusionCache::builder()
            .name("stock")
            .auto_recovery_delay(RETRY)
            .default_entry_options(EntryOptions::new().duration(Duration::from_secs(600)))
            .distributed_cache(l2)
            .backplane(bp)
            .build()
            .unwrap();
        assert!(cache.wait_for_backplane(Duration::from_secs(5)).await);
        nodes.push(Node {
            cache,
            l2: l2_faults,
            bus: bus_faults,
        });
    }
    (nodes, store, bus)
}

#[tokio::test]
async fn a_write_that_failed_in_l2_is_not_published_and_is_replayed_when_l2_is_back() {
    let (nodes, _, _) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    b.cache.set("k", 20).await.unwrap();
    assert_eq!(a.cache.get("k").await, Some(20));

    for n in &nodes {
        n.l2.fail_all(true);
    }
    let sent = b.cache.stats().backplane_sent;
    b.cache.set("k", 30).await.unwrap();
    assert_eq!(b.cache.pending_recovery(), 1, "queued");
    assert_eq!(b.cache.get("k").await, Some(30), "b reads its own write");
    assert_eq!(b.cache.stats().backplane_sent, sent, "nothing published");
    assert_eq!(
        a.cache.get("k").await,
        Some(20),
        "a keeps serving the old value"
    );

    for n in &nodes {
        n.l2.fail_all(false);
    }
    let bound = RETRY + Duration::from_secs(1);
    assert!(
        within(bound, || a.cache.peek("k") == Some(30)
            && b.cache.pending_recovery() == 0)
        .await,
        "a serves 30 within the retry delay + 1 s (a: {:?})",
        a.cache.peek("k")
    );
    assert_eq!(b.cache.get("k").await, Some(30));
    for n in &nodes {
        assert_eq!(
            n.cache.stats().backplane_reconnects,
            0,
            "no reconnection involved"
        );
    }
    assert_eq!(b.cache.stats().auto_recovery_replayed, 1);
}

#[tokio::test]
async fn the_backplane_back_while_l2_is_still_down_publishes_nothing() {
    let (nodes, _, bus) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    b.cache.set("k", 1).await.unwrap();
    assert_eq!(a.cache.get("k").await, Some(1));
    assert!(
        within(Duration::from_secs(2), || a
            .cache
            .stats()
            .backplane_received
            == 1)
        .await
    );
    for n in &nodes {
        n.l2.fail_all(true);
    }
    bus.disconnect();
    b.cache.set("k", 2).await.unwrap();
    bus.reconnect();
    assert!(
        within(Duration::from_secs(5), || b.cache.backplane_state()
            == fusioncache::BackplaneState::Connected)
        .await
    );
    let retries = b.cache.stats().auto_recovery_retries;
    assert!(
        within(Duration::from_secs(5), || b
            .cache
            .stats()
            .auto_recovery_retries
            > retries + 1)
        .await,
        "retried (at once, then periodically) while L2 is down"
    );
    assert_eq!(b.cache.pending_recovery(), 1, "still queued");
    assert_eq!(
        a.cache.stats().backplane_received,
        1,
        "nothing more published"
    );
    for n in &nodes {
        n.l2.fail_all(false);
    }
    assert!(within(Duration::from_secs(5), || b.cache.pending_recovery() == 0).await);
    assert_eq!(a.cache.get("k").await, Some(2));
}

#[tokio::test]
async fn a_joint_outage_with_writes_on_three_nodes_converges_to_the_last_write() {
    let (nodes, store, bus) = cluster(3).await;
    nodes[0].cache.set("k", 0).await.unwrap();
    for n in &nodes {
        assert_eq!(n.cache.get("k").await, Some(0));
    }
    for n in &nodes {
        n.l2.fail_all(true);
    }
    bus.disconnect();
    for (i, n) in nodes.iter().enumerate() {
        n.cache.set("k", i as u64 + 1).await.unwrap();
    }
    for n in &nodes {
        n.l2.fail_all(false);
    }
    bus.reconnect();
    assert!(
        within(Duration::from_secs(10), || nodes
            .iter()
            .all(|n| n.cache.pending_recovery() == 0))
        .await,
        "every queue drained"
    );
    for (i, n) in nodes.iter().enumerate() {
        let mut last = None;
        assert!(
            within(Duration::from_secs(5), || {
                last = n.cache.peek("k");
                last.is_none_or(|v| v == 3)
            })
            .await,
            "node {i} serves {last:?}"
        );
        assert_eq!(n.cache.get("k").await, Some(3), "node {i}");
    }
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn a_publish_that_failed_without_a_disconnection_is_delivered_by_the_periodic_retry() {
    let (nodes, _, _) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    a.cache.set("k", 1).await.unwrap();
    assert_eq!(b.cache.get("k").await, Some(1));
    a.bus.fail_publishes(true);
    a.cache.set("k", 2).await.unwrap();
    assert!(within(Duration::from_secs(2), || a.cache.pending_recovery() == 1).await);
    assert_eq!(b.cache.peek("k"), Some(1), "not told yet");
    a.bus.fail_publishes(false);
    assert!(
        within(RETRY * 3 + Duration::from_secs(1), || b.cache.peek("k")
            == Some(2))
        .await,
        "delivered by a periodic retry, with no reconnection"
    );
    assert_eq!(
        a.cache.backplane_state(),
        fusioncache::BackplaneState::Connected
    );
    assert_eq!(a.cache.stats().backplane_reconnects, 0);
}

#[tokio::test]
async fn a_newer_write_from_another_node_supersedes_a_queued_one() {
    let (nodes, _, _) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    a.l2.fail_all(true);
    a.cache.set("k", 1).await.unwrap();
    assert_eq!(a.cache.pending_recovery(), 1);
    b.cache.set("k", 2).await.unwrap();
    assert!(
        within(Duration::from_secs(2), || a.cache.pending_recovery() == 0).await,
        "b's newer notification dropped a's queued write"
    );
    a.l2.fail_all(false);
    // a's refresh failed while its L2 was down, so its copy is stale and its breaker open for a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while a.cache.get("k").await != Some(2) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.cache.get("k").await, Some(2));
    assert_eq!(
        b.cache.get("k").await,
        Some(2),
        "a's older write never reached L2"
    );
    assert_eq!(a.cache.stats().auto_recovery_dropped, 1);
}

#[tokio::test]
async fn l2_errors_are_surfaced_only_when_asked() {
    let (nodes, _, _) = cluster(1).await;
    let a = &nodes[0];
    a.l2.fail_all(true);
    assert!(a.cache.set("k", 1).await.is_ok(), "default: Ok, queued");
    let surfaced = EntryOptions::new().surface_l2_errors(true);
    assert!(matches!(
        a.cache.set_with("k", 2, &surfaced).await,
        Err(fusioncache::Error::L2(_))
    ));
    assert!(a.cache.remove_with("r", &surfaced).await.is_err());
    assert_eq!(a.cache.pending_recovery(), 2, "k (newest wins) and r");
    assert_eq!(a.cache.get("k").await, Some(2));
}

#[tokio::test]
async fn a_full_queue_drops_what_expires_first_and_counts_it() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let (l2, faults) = FaultyL2::new(Arc::new(store));
    let cache: FusionCache<u64> = FusionCache::builder()
        .auto_recovery_max_items(2)
        .distributed_cache(l2)
        .backplane(bus)
        .build()
        .unwrap();
    faults.fail_all(true);
    let short = EntryOptions::new().duration(Duration::from_secs(10));
    let long = EntryOptions::new().duration(Duration::from_secs(1000));
    cache.set_with("short", 1, &short).await.unwrap();
    cache.set_with("long1", 1, &long).await.unwrap();
    cache.set_with("long2", 1, &long).await.unwrap();
    assert_eq!(cache.pending_recovery(), 2);
    assert_eq!(cache.stats().auto_recovery_dropped, 1);
    cache.set_with("shorter", 1, &short).await.unwrap();
    assert_eq!(
        cache.pending_recovery(),
        2,
        "the new item expires first: dropped"
    );
    assert_eq!(cache.stats().auto_recovery_dropped, 2);
}

/// A change queued for auto-recovery is obsolete once a newer change of the same key from this node went
/// through: replayed later, a queued write would bring back a key removed since (L2 read back before the
/// replay finds nothing to tell it is older).
#[tokio::test]
async fn a_newer_local_change_that_went_through_supersedes_a_queued_one() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let node = || {
        let (l2, faults) = FaultyL2::new(Arc::new(store.clone()));
        let cache: FusionCache<u64> = FusionCache::builder()
            .name("stock")
            // Retries only when kicked (below), and no breaker: the next change goes straight to L2.
            .auto_recovery_delay(Duration::from_secs(600))
            .l2_circuit_breaker_duration(Duration::ZERO)
            .default_entry_options(EntryOptions::new().duration(Duration::from_secs(600)))
            .distributed_cache(l2)
            .backplane(bus.clone())
            .build()
            .unwrap();
        (cache, faults)
    };
    let ((a, a_l2), (b, _)) = (node(), node());
    for n in [&a, &b] {
        assert!(n.wait_for_backplane(Duration::from_secs(5)).await);
    }
    a.set("k", 1).await.unwrap();
    assert_eq!(b.get("k").await, Some(1));

    a_l2.fail_all(true);
    a.set("k", 2).await.unwrap();
    assert_eq!(a.pending_recovery(), 1, "queued");
    a_l2.fail_all(false);
    a.remove("k").await.unwrap();
    assert_eq!(a.pending_recovery(), 0, "the queued write is obsolete");
    assert!(within(Duration::from_secs(2), || b.peek("k").is_none()).await);

    // A reconnection kicks auto-recovery: nothing is left to replay, the key stays removed.
    let replayed = a.stats().auto_recovery_replayed;
    bus.disconnect();
    bus.reconnect();
    assert!(a.wait_for_backplane(Duration::from_secs(5)).await);
    assert_eq!(a.get("k").await, None);
    assert_eq!(b.get("k").await, None);
    assert_eq!(a.stats().auto_recovery_replayed, replayed);
}
