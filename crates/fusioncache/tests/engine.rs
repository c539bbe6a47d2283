//! Behaviour of the engine over the in-memory backplane and L2: several caches in one process act as the
//! nodes of one cluster.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::{now_ticks, Action, Backplane, BackplaneMessage, MemoryBackplane};
use fusioncache::l2::MemoryDistributedCache;
use fusioncache::{EntryOptions, Error, FusionCache};

mod common;
use common::{eventually, s, WAIT};

struct Cluster {
    nodes: Vec<FusionCache<String>>,
    bus: MemoryBackplane,
    l2: Option<MemoryDistributedCache>,
}

async fn cluster(n: usize, with_l2: bool, options: EntryOptions) -> Cluster {
    let bus = MemoryBackplane::new();
    let l2 = with_l2.then(MemoryDistributedCache::new);
    let mut nodes = Vec::new();
    for _ in 0..n {
        let mut b = FusionCache::<String>::builder()
            .name("products")
            .default_entry_options(options.clone())
            .backplane(bus.clone());
        if let Some(l2) = &l2 {
            b = b.distributed_cache(l2.clone());
        }
        let node = b.build().unwrap();
        assert!(node.wait_for_backplane(WAIT).await);
        nodes.push(node);
    }
    Cluster { nodes, bus, l2 }
}

#[tokio::test]
async fn three_nodes_converge_after_set() {
    let c = cluster(3, true, EntryOptions::new()).await;
    let [a, b, d] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    assert_eq!(d.get("k").await, Some(s("v1")));
    a.set("k", s("v2")).await.unwrap();
    assert!(eventually(|| b.peek("k") != Some(s("v1")) && d.peek("k") != Some(s("v1"))).await);
    assert_eq!(b.get("k").await, Some(s("v2")));
    assert_eq!(d.get("k").await, Some(s("v2")));
}

#[tokio::test]
async fn three_nodes_converge_after_remove() {
    let c = cluster(3, true, EntryOptions::new()).await;
    let [a, b, d] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    assert_eq!(d.get("k").await, Some(s("v1")));
    b.remove("k").await.unwrap();
    assert!(eventually(|| a.peek("k").is_none() && d.peek("k").is_none()).await);
    assert_eq!(a.get("k").await, None);
    assert_eq!(d.get("k").await, None);
}

#[tokio::test]
async fn three_nodes_converge_after_expire() {
    let c = cluster(3, true, EntryOptions::new().fail_safe(true)).await;
    let [a, b, d] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    assert_eq!(d.get("k").await, Some(s("v1")));
    d.expire("k").await.unwrap();
    assert!(eventually(|| a.peek("k").is_none() && b.peek("k").is_none()).await);
    // Expired everywhere (L2 included), but kept as a fail-safe fallback for a failing factory.
    let v = b
        .get_or_set("k", || async {
            Err::<String, _>(std::io::Error::other("db down"))
        })
        .await
        .unwrap();
    assert_eq!(v, "v1");
    assert_eq!(b.stats().stale_served, 1);
}

#[tokio::test]
async fn expire_without_fail_safe_sends_remove() {
    let c = cluster(2, false, EntryOptions::new()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.set_with(
        "k",
        s("v"),
        &EntryOptions::new().skip_backplane_notifications(true),
    )
    .await
    .unwrap();
    b.set_with(
        "k",
        s("v"),
        &EntryOptions::new().skip_backplane_notifications(true),
    )
    .await
    .unwrap();
    a.expire("k").await.unwrap();
    assert_eq!(
        a.l1_entry_count(),
        0,
        "without fail-safe, expire evicts locally too"
    );
    assert!(eventually(|| b.l1_entry_count() == 0).await);
}

#[tokio::test]
async fn set_notification_refreshes_l1_from_l2() {
    let c = cluster(2, true, EntryOptions::new()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    let l2_hits = b.stats().l2_hits;
    a.set("k", s("v2")).await.unwrap();
    // The refresh puts the new value in b's L1 by itself, without a read.
    assert!(eventually(|| b.peek("k") == Some(s("v2"))).await);
    assert_eq!(b.get("k").await, Some(s("v2")));
    assert_eq!(
        b.stats().l2_hits,
        l2_hits,
        "served from the refreshed L1, not from L2"
    );
}

#[tokio::test]
async fn set_notification_without_l2_marks_stale() {
    let c = cluster(2, false, EntryOptions::new()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    b.set_with(
        "k",
        s("old"),
        &EntryOptions::new().skip_backplane_notifications(true),
    )
    .await
    .unwrap();
    a.set("k", s("new")).await.unwrap();
    assert!(eventually(|| b.peek("k").is_none()).await);
    assert_eq!(
        b.get("k").await,
        None,
        "no L2 to refresh from: a miss, so the app reloads"
    );
}

#[tokio::test]
async fn no_l2_mode_notifies_only_when_an_operation_opts_in() {
    // The seed's "memory cache + backplane, no distributed cache": automatic notifications are off by default.
    let quiet = EntryOptions::new().skip_backplane_notifications(true);
    let c = cluster(2, false, quiet.clone()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    b.set("k", s("b's copy")).await.unwrap();
    a.set("k", s("a1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // nothing should arrive; give it a chance to
    assert_eq!(
        b.peek("k"),
        Some(s("b's copy")),
        "default options skip notifications"
    );
    assert_eq!(a.stats().backplane_sent, 0);

    let loud = quiet.clone().skip_backplane_notifications(false);
    a.set_with("k", s("a2"), &loud).await.unwrap();
    assert!(
        eventually(|| b.peek("k").is_none()).await,
        "an explicit opt-in notifies"
    );

    b.set("k2", s("x")).await.unwrap();
    a.remove_with("k2", &loud).await.unwrap();
    assert!(eventually(|| b.peek("k2").is_none()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_set_runs_the_factory_once_for_1000_concurrent_callers() {
    let cache: FusionCache<u64> = FusionCache::builder().build().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (cache, runs, barrier) = (cache.clone(), runs.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            cache
                .get_or_set("hot", move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::io::Error>(42)
                })
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().factory_runs, 1);
}

#[tokio::test]
async fn fail_safe_serves_stale_when_the_factory_fails() {
    let options = EntryOptions::new()
        .duration(Duration::from_millis(20))
        .fail_safe(true)
        .fail_safe_throttle_duration(Duration::from_millis(200));
    let cache: FusionCache<String> = FusionCache::builder()
        .default_entry_options(options)
        .build()
        .unwrap();
    cache.set("k", s("good")).await.unwrap();
    assert!(
        eventually(|| cache.peek("k").is_none()).await,
        "logically expired"
    );
    let v = cache
        .get_or_set("k", || async {
            Err::<String, _>(std::io::Error::other("db down"))
        })
        .await
        .unwrap();
    assert_eq!(v, "good");
    assert_eq!(cache.stats().stale_served, 1);
    // Throttled: served as fresh for a while, without calling the factory again.
    assert_eq!(cache.peek("k"), Some(s("good")));

    // Without fail-safe, the error comes through.
    let plain: FusionCache<String> = FusionCache::builder()
        .default_entry_options(EntryOptions::new().duration(Duration::from_millis(20)))
        .build()
        .unwrap();
    plain.set("k", s("good")).await.unwrap();
    assert!(eventually(|| plain.peek("k").is_none()).await);
    let err = plain
        .get_or_set("k", || async {
            Err::<String, _>(std::io::Error::other("db down"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Factory { .. }), "{err}");
}

#[tokio::test]
async fn soft_timeout_returns_the_fallback_and_the_factory_completes_in_background() {
    let options = EntryOptions::new()
        .duration(Duration::from_millis(20))
        .fail_safe(true)
        .factory_soft_timeout(Duration::from_millis(20));
    let cache: FusionCache<String> = FusionCache::builder()
        .default_entry_options(options.clone())
        .build()
        .unwrap();
    cache.set("k", s("old")).await.unwrap();
    assert!(eventually(|| cache.peek("k").is_none()).await);
    let v = cache
        .get_or_set_detached("k", &options, |_| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, std::io::Error>(s("new"))
        })
        .await
        .unwrap();
    assert_eq!(v, "old", "the slow factory is not waited for");
    assert!(
        eventually(|| cache.peek("k") == Some(s("new"))).await,
        "it completed in the background"
    );
}

#[tokio::test]
async fn hard_timeout_without_fallback_is_an_error() {
    let cache: FusionCache<String> = FusionCache::builder().build().unwrap();
    let options = EntryOptions::new().factory_hard_timeout(Duration::from_millis(20));
    let err = cache
        .get_or_set_with("k", &options, || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::io::Error>(s("late"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FactoryTimeout { .. }), "{err}");
}

#[tokio::test]
async fn messages_with_unknown_version_or_action_are_ignored() {
    let c = cluster(1, false, EntryOptions::new()).await;
    let node = &c.nodes[0];
    node.set("k", s("v")).await.unwrap();
    let valid = BackplaneMessage::new("other-node", now_ticks(), Action::Remove, "k")
        .encode()
        .to_vec();
    let mut newer_version = valid.clone();
    newer_version[0] = 1;
    let mut unknown_action = valid.clone();
    unknown_action[1 + 4 + "other-node".len() + 8] = 9;
    for payload in [newer_version, unknown_action] {
        c.bus.publish(node.channel(), payload.into()).await.unwrap();
    }
    assert!(eventually(|| node.stats().backplane_unsupported == 2).await);
    assert_eq!(node.peek("k"), Some(s("v")), "nothing applied");
    assert_eq!(node.stats().backplane_malformed, 0);
}

#[tokio::test]
async fn garbage_is_dropped_and_counted_while_valid_messages_still_apply() {
    let c = cluster(1, false, EntryOptions::new()).await;
    let node = &c.nodes[0];
    node.set("k", s("v")).await.unwrap();
    for garbage in [
        &b""[..],
        b"\x00",
        b"\x00\xff\xff\xff\xff",
        b"\x00hello world",
    ] {
        c.bus
            .publish(node.channel(), garbage.to_vec().into())
            .await
            .unwrap();
    }
    let valid = BackplaneMessage::new("other-node", now_ticks(), Action::Remove, "k").encode();
    c.bus.publish(node.channel(), valid).await.unwrap();
    assert!(eventually(|| node.peek("k").is_none()).await);
    assert_eq!(node.stats().backplane_malformed, 4);
}

#[tokio::test]
async fn a_node_ignores_its_own_messages() {
    let c = cluster(1, false, EntryOptions::new()).await;
    let node = &c.nodes[0];
    node.set("k", s("v")).await.unwrap();
    let own = BackplaneMessage::new(node.instance_id(), now_ticks(), Action::Remove, "k").encode();
    c.bus.publish(node.channel(), own).await.unwrap();
    assert!(
        eventually(|| node.stats().backplane_self_ignored >= 2).await,
        "its set and the forged remove"
    );
    assert_eq!(node.peek("k"), Some(s("v")));
}

#[tokio::test]
async fn remove_and_expire_notify_even_when_the_key_is_not_held_locally() {
    let c = cluster(3, true, EntryOptions::new().fail_safe(true)).await;
    let [a, b, d] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    a.set("r", s("v")).await.unwrap();
    a.set("e", s("v")).await.unwrap();
    assert_eq!(b.get("r").await, Some(s("v")));
    assert_eq!(b.get("e").await, Some(s("v")));
    assert_eq!(d.peek("r"), None, "d never read them");
    d.remove("r").await.unwrap();
    d.expire("e").await.unwrap();
    assert!(eventually(|| a.peek("r").is_none() && b.peek("r").is_none()).await);
    assert!(eventually(|| a.peek("e").is_none() && b.peek("e").is_none()).await);
}

#[tokio::test]
async fn hard_cap_on_l1_duration_holds_with_a_backplane() {
    let bus = MemoryBackplane::new();
    let l2 = MemoryDistributedCache::new();
    let capped: FusionCache<String> = FusionCache::builder()
        .l1_max_duration(Duration::from_millis(50))
        .default_entry_options(EntryOptions::new().duration(Duration::from_secs(3600)))
        .distributed_cache(l2.clone())
        .backplane(bus.clone())
        .build()
        .unwrap();
    assert!(capped.wait_for_backplane(WAIT).await);
    capped.set("k", s("v1")).await.unwrap();
    assert_eq!(capped.peek("k"), Some(s("v1")));
    // A write that the backplane never delivered (a lost message): L2 changes behind the node's back.
    let other: FusionCache<String> = FusionCache::builder()
        .distributed_cache(l2.clone())
        .build()
        .unwrap();
    other.set("k", s("v2")).await.unwrap();
    assert!(
        eventually(|| capped.peek("k").is_none()).await,
        "the cap expires L1 despite the 1 h duration"
    );
    assert_eq!(
        capped.get("k").await,
        Some(s("v2")),
        "and the next read revalidates from L2"
    );
}

#[tokio::test]
async fn reconnection_marks_l1_stale_and_replays_queued_notifications() {
    let c = cluster(2, true, EntryOptions::new()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    c.bus.disconnect();
    assert!(eventually(|| a.backplane_state() == fusioncache::BackplaneState::Disconnected).await);
    // While disconnected, b revalidates its L1 against L2 on every read.
    a.set("k", s("v2")).await.unwrap();
    assert!(
        eventually(|| a.pending_recovery() == 1).await,
        "queued, not lost"
    );
    assert_eq!(b.get("k").await, Some(s("v2")));
    a.remove("gone").await.unwrap();
    a.set("k", s("v3")).await.unwrap();
    assert!(
        eventually(|| a.pending_recovery() == 2).await,
        "one per key, newest wins"
    );

    b.set_with("local", s("x"), &EntryOptions::new().skip_l2(true))
        .await
        .unwrap();
    c.bus.reconnect();
    assert!(eventually(|| a.pending_recovery() == 0).await);
    assert!(eventually(|| b.stats().l1_mark_all_stale == 1).await);
    assert_eq!(
        b.peek("local"),
        None,
        "every L1 entry is stale after a reconnection"
    );
    assert_eq!(b.get("k").await, Some(s("v3")));
    assert_eq!(a.stats().auto_recovery_replayed, 2);
}

#[tokio::test]
async fn l2_down_keeps_serving_from_l1() {
    let c = cluster(2, true, EntryOptions::new().fail_safe(true)).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    let l2 = c.l2.as_ref().unwrap();
    l2.set_unavailable(true);
    c.bus.disconnect();
    assert!(eventually(|| b.backplane_state() == fusioncache::BackplaneState::Disconnected).await);
    assert_eq!(
        b.get("k").await,
        Some(s("v1")),
        "unverifiable, but the best there is"
    );
    assert!(
        b.try_get("missing").await.is_err(),
        "try_get surfaces the L2 error"
    );
    assert!(b.stats().l2_errors >= 1);
}

#[tokio::test]
async fn clear_empties_every_node() {
    let c = cluster(2, true, EntryOptions::new()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.set("x", s("1")).await.unwrap();
    a.set("y", s("2")).await.unwrap();
    assert_eq!(b.get("x").await, Some(s("1")));
    a.clear().await.unwrap();
    assert_eq!(a.peek("x"), None);
    assert!(eventually(|| b.peek("x").is_none()).await);
    assert_eq!(b.get("y").await, None, "L2 was cleared too");
}

#[tokio::test]
async fn skip_l2_keeps_a_value_local() {
    let c = cluster(2, true, EntryOptions::new()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.set_with("k", s("local"), &EntryOptions::new().skip_l2(true))
        .await
        .unwrap();
    assert_eq!(a.get("k").await, Some(s("local")));
    assert_eq!(b.get("k").await, None);
    assert!(c.l2.as_ref().unwrap().is_empty());
}

#[tokio::test]
async fn background_l2_writes_still_reach_l2_before_the_notification() {
    let c = cluster(2, true, EntryOptions::new().background_l2_operations(true)).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.set("k", s("v1")).await.unwrap();
    assert!(eventually(|| c.l2.as_ref().unwrap().len() == 1).await);
    assert_eq!(b.get("k").await, Some(s("v1")));
    a.set("k", s("v2")).await.unwrap();
    assert!(eventually(|| b.peek("k") == Some(s("v2"))).await);
}

#[tokio::test]
async fn jitter_and_l1_duration_shape_freshness() {
    let options = EntryOptions::new()
        .duration(Duration::from_secs(3600))
        .l1_duration(Duration::from_millis(30))
        .jitter_max(Duration::from_millis(10));
    let l2 = MemoryDistributedCache::new();
    let cache: FusionCache<String> = FusionCache::builder()
        .default_entry_options(options)
        .distributed_cache(l2.clone())
        .build()
        .unwrap();
    cache.set("k", s("v")).await.unwrap();
    assert_eq!(cache.peek("k"), Some(s("v")));
    assert!(
        eventually(|| cache.peek("k").is_none()).await,
        "L1 freshness is the short one"
    );
    assert_eq!(cache.get("k").await, Some(s("v")), "L2 keeps the long one");
    assert_eq!(cache.stats().l2_hits, 1);
}

#[tokio::test]
async fn building_with_a_backplane_outside_a_runtime_is_a_clear_error() {
    let result = std::thread::spawn(|| {
        FusionCache::<String>::builder()
            .backplane(MemoryBackplane::new())
            .build()
            .map(|_| ())
    })
    .join()
    .unwrap();
    assert!(matches!(result, Err(Error::NoRuntime)));
}

#[tokio::test]
async fn dropping_a_cache_stops_its_receiver() {
    let bus = MemoryBackplane::new();
    let channel;
    {
        let node: FusionCache<String> = FusionCache::builder()
            .backplane(bus.clone())
            .build()
            .unwrap();
        assert!(node.wait_for_backplane(WAIT).await);
        channel = node.channel().to_string();
        assert_eq!(bus.subscriber_count(&channel), 1);
    }
    assert!(eventually(|| bus.subscriber_count(&channel) == 0).await);
}

#[tokio::test]
async fn a_failing_l2_is_not_hammered_and_a_reconnection_retries_it() {
    let c = cluster(1, true, EntryOptions::new()).await;
    let node = &c.nodes[0];
    let l2 = c.l2.as_ref().unwrap();
    l2.set_unavailable(true);
    for _ in 0..3 {
        assert_eq!(node.get("k").await, None);
    }
    assert_eq!(
        node.stats().l2_errors,
        1,
        "the circuit breaker skipped L2 after the first error"
    );
    l2.set_unavailable(false);
    c.bus.disconnect();
    c.bus.reconnect();
    assert!(eventually(|| node.stats().backplane_reconnects == 1).await);
    node.set("k", s("v")).await.unwrap();
    assert_eq!(
        node.stats().l2_errors,
        1,
        "the reconnection closed the breaker: L2 written at once"
    );
    assert_eq!(l2.len(), 1);
}
