//! Overlapping operations, forced with wrappers that park an operation at a chosen point (no sleeps): a
//! node must never cache a value older than a write or invalidation it has seen for the key. (The paused
//! L2 reads racing a local or remote change run in `tests/tests/races.rs`, in process and on real
//! servers.)

use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::MemoryBackplane;
use fusioncache::events::CacheEvent;
use fusioncache::l2::MemoryDistributedCache;
use fusioncache::testing::{FaultyL2, L2Faults};
use fusioncache::{EntryOptions, FusionCache};

mod common;
use common::{eventually, s, WAIT};

/// A node whose L2 (the shared `store`) goes through fault switches of its own.
async fn node(
    store: &MemoryDistributedCache,
    bus: &MemoryBackplane,
) -> (FusionCache<String>, L2Faults) {
    let (l2, faults) = FaultyL2::new(Arc::new(store.clone()));
    let cache = FusionCache::builder()
        .name("products")
        .default_entry_options(EntryOptions::new().duration(Duration::from_secs(60)))
        .distributed_cache(l2)
        .backplane(bus.clone())
        .build()
        .unwrap();
    assert!(cache.wait_for_backplane(WAIT).await);
    (cache, faults)
}

#[tokio::test]
async fn a_factory_that_raced_a_change_of_its_key_is_served_but_not_cached() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let (a, _) = node(&store, &bus).await;
    let (b, _) = node(&store, &bus).await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let loader = {
        let a = a.clone();
        tokio::spawn(async move {
            a.get_or_set("k", move || async move {
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Ok::<_, std::io::Error>(s("loaded from the database before the change"))
            })
            .await
        })
    };
    started_rx.await.unwrap();
    let received = a.stats().backplane_received;
    b.set("k", s("written meanwhile")).await.unwrap();
    assert!(eventually(|| a.stats().backplane_received > received).await);
    finish_tx.send(()).unwrap();
    assert_eq!(
        loader.await.unwrap().unwrap(),
        "loaded from the database before the change",
        "the caller gets the factory's value"
    );
    assert_eq!(
        a.get("k").await,
        Some(s("written meanwhile")),
        "but it was not cached"
    );
    assert_eq!(
        b.get("k").await,
        Some(s("written meanwhile")),
        "nor written to L2"
    );
}

#[tokio::test]
async fn expire_keeps_fail_safe_copies_only_where_the_value_was_held() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let fail_safe = EntryOptions::new()
        .duration(Duration::from_secs(60))
        .fail_safe(true);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let n: FusionCache<String> = FusionCache::builder()
            .default_entry_options(fail_safe.clone())
            .distributed_cache(store.clone())
            .backplane(bus.clone())
            .build()
            .unwrap();
        assert!(n.wait_for_backplane(WAIT).await);
        nodes.push(n);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    a.set("k", s("v")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v")));
    a.expire("k").await.unwrap();
    assert!(eventually(|| b.peek("k").is_none()).await);
    assert!(
        store.is_empty(),
        "the L2 entry is removed, not rewritten as expired"
    );
    let failing = || async { Err::<String, _>(std::io::Error::other("database down")) };
    assert_eq!(c.get("k").await, None, "c never held it");
    assert!(
        c.get_or_set("k", failing).await.is_err(),
        "c has no fallback, even with fail-safe"
    );
    assert_eq!(a.peek("k"), None, "expired on a");
    assert_eq!(
        a.get_or_set("k", failing).await.unwrap(),
        "v",
        "a keeps it as a fallback"
    );
    assert_eq!(b.get_or_set("k", failing).await.unwrap(), "v", "so does b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_listener_does_not_stop_the_receiver() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let (a, _) = node(&store, &bus).await;
    let b: FusionCache<String> = FusionCache::builder()
        .name("products")
        .distributed_cache(store.clone())
        .backplane(bus.clone())
        .on_event(|e| {
            if matches!(e, CacheEvent::BackplaneReceived { .. }) {
                panic!("a listener bug");
            }
        })
        .build()
        .unwrap();
    assert!(b.wait_for_backplane(WAIT).await);
    for round in 0..3 {
        a.set("k", format!("v{round}")).await.unwrap();
        assert_eq!(b.get("k").await, Some(format!("v{round}")));
        a.remove("k").await.unwrap();
        assert!(
            eventually(|| b.peek("k").is_none()).await,
            "round {round}: still applied"
        );
    }
    assert!(b.stats().listener_panics >= 3);
    assert_eq!(b.backplane_state(), fusioncache::BackplaneState::Connected);
}
