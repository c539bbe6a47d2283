//! FusionCache 2 parity over the in-memory transports: tags, clear, publish-only nodes and handles, the L2
//! timeouts, eager refresh and adaptive caching.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::{Backplane, BackplaneEvent, MemoryBackplane};
use fusioncache::l2::MemoryDistributedCache;
use fusioncache::testing::FaultyL2;
use fusioncache::{CacheNotifier, EntryOptions, FusionCache};

mod common;
use common::{eventually, WAIT};

fn fail_safe() -> EntryOptions {
    EntryOptions::new()
        .duration(Duration::from_secs(600))
        .fail_safe(true)
}

async fn node(store: &MemoryDistributedCache, bus: &MemoryBackplane) -> FusionCache<u32> {
    let n = FusionCache::builder()
        .name("shop")
        .default_entry_options(fail_safe())
        .distributed_cache(store.clone())
        .backplane(bus.clone())
        .build()
        .unwrap();
    assert!(n.wait_for_backplane(WAIT).await);
    n
}

async fn cluster(
    n: usize,
) -> (
    Vec<FusionCache<u32>>,
    MemoryDistributedCache,
    MemoryBackplane,
) {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(node(&store, &bus).await);
    }
    (nodes, store, bus)
}

fn tagged(tags: &[&str]) -> EntryOptions {
    fail_safe().tags(tags.iter().copied())
}

async fn failing() -> Result<u32, std::io::Error> {
    Err(std::io::Error::other("database down"))
}

#[tokio::test]
async fn remove_by_tag_across_three_nodes_as_fusioncache_does() {
    let (nodes, _, _) = cluster(3).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    n1.set_with("foo", 1, &tagged(&["x", "y"])).await.unwrap();
    n2.set_with("bar", 2, &tagged(&["y", "z"])).await.unwrap();
    n3.set_with("baz", 3, &tagged(&["x", "z"])).await.unwrap();
    for n in [n1, n2] {
        for (k, v) in [("foo", 1), ("bar", 2), ("baz", 3)] {
            assert_eq!(n.get(k).await, Some(v));
        }
    }

    n2.remove_by_tag("x").await.unwrap();
    for (i, n) in [n1, n2].into_iter().enumerate() {
        assert!(
            eventually(|| n.peek("foo").is_none() && n.peek("baz").is_none()).await,
            "node {i}"
        );
        assert_eq!(n.get("foo").await, None);
        assert_eq!(n.get("baz").await, None);
        assert_eq!(n.get("bar").await, Some(2), "bar has no x");
    }
    // n3 never held foo: it reads nothing either (it reads L2, then the x timestamp).
    assert_eq!(n3.get("foo").await, None);
    assert_eq!(n3.get("bar").await, Some(2));
    // Expired, not removed (the default behaviour): still a fail-safe fallback where it was held.
    assert_eq!(n1.get_or_set("foo", failing).await.unwrap(), 1);

    // baz re-created after the removal of x survives it; then y goes.
    n3.set_with("baz", 33, &tagged(&["x", "z"])).await.unwrap();
    n1.remove_by_tag("y").await.unwrap();
    for n in [n1, n2, n3] {
        assert!(eventually(|| n.peek("bar").is_none()).await);
        assert_eq!(n.get("bar").await, None);
        assert_eq!(n.get("foo").await, None);
        assert_eq!(n.get("baz").await, Some(33), "written after the x removal");
    }

    // Several tags at once; unknown and empty tags are no-ops.
    n1.set_with("a", 1, &tagged(&["p"])).await.unwrap();
    n1.set_with("b", 2, &tagged(&["q"])).await.unwrap();
    n1.set_with("c", 3, &tagged(&["r"])).await.unwrap();
    n2.remove_by_tags(["p", "q", "never-used", ""])
        .await
        .unwrap();
    n2.remove_by_tag("").await.unwrap();
    for n in [n1, n2, n3] {
        assert!(eventually(|| n.peek("a").is_none() && n.peek("b").is_none()).await);
        assert_eq!(n.get("c").await, Some(3));
        assert_eq!(n.get("baz").await, Some(33));
    }
}

#[tokio::test]
async fn a_node_started_after_a_tag_removal_honours_it() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let a = node(&store, &bus).await;
    a.set_with("old", 1, &tagged(&["t"])).await.unwrap();
    a.remove_by_tag("t").await.unwrap();
    a.set_with("new", 2, &tagged(&["t"])).await.unwrap();
    let late = node(&store, &bus).await;
    assert_eq!(late.get("old").await, None, "written before the removal");
    assert_eq!(late.get("new").await, Some(2), "written after it");
}

#[tokio::test]
async fn remove_behaviour_removes_instead_of_expiring() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let a: FusionCache<u32> = FusionCache::builder()
        .default_entry_options(fail_safe())
        .remove_by_tag_behavior(fusioncache::RemoveByTagBehavior::Remove)
        .distributed_cache(store)
        .backplane(bus)
        .build()
        .unwrap();
    a.set_with("k", 1, &tagged(&["t"])).await.unwrap();
    a.remove_by_tag("t").await.unwrap();
    assert!(
        a.get_or_set("k", failing).await.is_err(),
        "no fallback left"
    );
}

#[tokio::test]
async fn tags_decided_by_the_factory_are_honoured() {
    let (nodes, _, _) = cluster(2).await;
    let loaded = nodes[0]
        .get_or_set_adaptive("p", &fail_safe(), |ctx| async move {
            ctx.set_tags(["category:7"]);
            Ok::<_, std::io::Error>(42)
        })
        .await
        .unwrap();
    assert_eq!(loaded, 42);
    assert_eq!(nodes[1].get("p").await, Some(42));
    nodes[1].remove_by_tag("category:7").await.unwrap();
    for n in &nodes {
        assert!(eventually(|| n.peek("p").is_none()).await);
        assert_eq!(n.get("p").await, None);
    }
}

#[tokio::test]
async fn clear_expires_or_removes_everything_and_later_writes_survive() {
    let (nodes, store, bus) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    a.set("k", 1).await.unwrap();
    assert_eq!(b.get("k").await, Some(1));

    a.clear().await.unwrap(); // = clear_with(true): expire all
    for n in [a, b] {
        assert!(eventually(|| n.peek("k").is_none()).await);
        assert_eq!(n.get("k").await, None, "plain reads see nothing");
        assert_eq!(
            n.get_or_set("k", failing).await.unwrap(),
            1,
            "fail-safe still has it"
        );
    }
    a.set("after", 2).await.unwrap();
    assert_eq!(b.get("after").await, Some(2), "written after the clear");

    b.clear_with(false).await.unwrap(); // remove all
    for n in [a, b] {
        assert!(eventually(|| n.peek("after").is_none()).await);
        assert!(
            n.get_or_set("after", failing).await.is_err(),
            "nothing, even with fail-safe"
        );
    }
    // A node created after the clears reads nothing older than them.
    let late = node(&store, &bus).await;
    assert_eq!(late.get("k").await, None);
    assert_eq!(late.get("after").await, None);
    a.set("fresh", 3).await.unwrap();
    assert_eq!(late.get("fresh").await, Some(3));
}

#[tokio::test]
async fn the_bytes_of_tag_removals_and_clears_are_fusioncache_v0_set_messages() {
    let (nodes, _, bus) = cluster(1).await;
    let mut raw = bus.subscribe(nodes[0].channel()).unwrap();
    assert_eq!(raw.next().await, Some(BackplaneEvent::Connected));
    nodes[0].remove_by_tag("category:7").await.unwrap();
    nodes[0].clear_with(true).await.unwrap();
    nodes[0].clear_with(false).await.unwrap();
    let mut keys = Vec::new();
    while keys.len() < 3 {
        match tokio::time::timeout(WAIT, raw.next()).await.unwrap() {
            Some(BackplaneEvent::Message(bytes)) => {
                let (source, action, key) = independent_decode(&bytes);
                assert_eq!(source, nodes[0].instance_id());
                assert_eq!(action, 1, "a set");
                keys.push(key);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(keys, ["__fc:t:category:7", "__fc:t:*", "__fc:t:!"]);
}

/// Decodes a v0 message by the wire-format table alone (not with the crate's decoder).
fn independent_decode(b: &[u8]) -> (String, u8, String) {
    assert_eq!(b[0], 0, "version 0");
    let len = |at: usize| i32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let source_len = len(1);
    let source = String::from_utf8(b[5..5 + source_len].to_vec()).unwrap();
    let at = 5 + source_len;
    let ticks = i64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    assert!(ticks > 621_355_968_000_000_000, "after 1970 in .NET ticks");
    let action = b[at + 8];
    let key_len = len(at + 9);
    let key = String::from_utf8(b[at + 13..at + 13 + key_len].to_vec()).unwrap();
    assert_eq!(b.len(), at + 13 + key_len, "no trailing bytes");
    (source, action, key)
}

#[tokio::test]
async fn a_publish_only_node_tells_the_others_and_ignores_what_they_say() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let listener = node(&store, &bus).await;
    let quiet: FusionCache<u32> = FusionCache::builder()
        .name("shop")
        .ignore_incoming_notifications(true)
        .default_entry_options(fail_safe())
        .distributed_cache(store.clone())
        .backplane(bus.clone())
        .build()
        .unwrap();
    assert!(quiet.wait_for_backplane(WAIT).await);
    listener.set("k", 1).await.unwrap();
    assert_eq!(quiet.get("k").await, Some(1));
    quiet.remove("k").await.unwrap();
    assert!(
        eventually(|| listener.peek("k").is_none()).await,
        "its notifications evict on the others"
    );

    quiet
        .set_with("mine", 1, &fail_safe().skip_l2(true))
        .await
        .unwrap();
    listener.remove("mine").await.unwrap();
    listener.set("other", 2).await.unwrap();
    assert!(eventually(|| listener.stats().backplane_sent >= 2).await);
    tokio::task::yield_now().await;
    assert_eq!(
        quiet.peek("mine"),
        Some(1),
        "nothing published to it changes its L1"
    );
    assert_eq!(quiet.stats().backplane_received, 0);
}

#[tokio::test]
async fn the_publish_only_handle_invalidates_another_apps_cache() {
    let (store, bus) = (MemoryDistributedCache::new(), MemoryBackplane::new());
    let app_b = node(&store, &bus).await;
    app_b.set_with("k", 1, &tagged(&["t"])).await.unwrap();
    app_b.set("e", 2).await.unwrap();
    app_b.set("r", 3).await.unwrap();
    let app_a = CacheNotifier::builder()
        .name("shop")
        .distributed_cache(store.clone())
        .backplane(bus.clone())
        .build()
        .unwrap();
    app_a.remove("r").await.unwrap();
    app_a.expire("e").await.unwrap();
    app_a.remove_by_tag("t").await.unwrap();
    assert!(
        eventually(|| app_b.peek("r").is_none()
            && app_b.peek("e").is_none()
            && app_b.peek("k").is_none())
        .await
    );
    assert_eq!(app_b.get("r").await, None, "removed from L2 too");
    assert_eq!(app_b.get("e").await, None);
    assert_eq!(
        app_b.get_or_set("e", failing).await.unwrap(),
        2,
        "expired: still a fallback"
    );
    assert_eq!(app_b.get("k").await, None);
    app_b.set("fresh", 4).await.unwrap();
    app_a.clear(false).await.unwrap();
    assert!(eventually(|| app_b.peek("fresh").is_none()).await);
    assert_eq!(app_b.get("fresh").await, None);
}

#[tokio::test]
async fn an_l2_read_slower_than_the_soft_timeout_returns_the_fail_safe_value() {
    let store = MemoryDistributedCache::new();
    let (l2, faults) = FaultyL2::new(Arc::new(store.clone()));
    let options = EntryOptions::new()
        .duration(Duration::from_secs(60))
        .fail_safe(true)
        .l2_soft_timeout(Duration::from_millis(100));
    let cache: FusionCache<u32> = FusionCache::builder()
        .default_entry_options(options.clone())
        .distributed_cache(l2)
        .build()
        .unwrap();
    let short = options.clone().duration(Duration::from_millis(50));
    cache.set_with("k", 1, &short).await.unwrap();
    assert!(
        eventually(|| cache.peek("k").is_none()).await,
        "logically expired"
    );
    let mut paused = faults.pause_next_read("k");
    let v = cache.get("k").await;
    // Returned while the read is still parked in L2: the soft timeout cut it short.
    assert!(
        paused.parked(Duration::ZERO).await,
        "the read is still in flight"
    );
    assert_eq!(v, Some(1), "the fail-safe value");
    assert_eq!(cache.stats().stale_served, 1);
    // Without a fallback to serve, the soft timeout does not apply: the read is awaited.
    let mut paused = faults.pause_next_read("other");
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get("other").await })
    };
    assert!(paused.parked(WAIT).await);
    tokio::time::sleep(Duration::from_millis(200)).await; // past the soft timeout
    assert!(!reader.is_finished(), "still waiting for L2");
    paused.release();
    assert_eq!(reader.await.unwrap(), None);
}

#[tokio::test]
async fn eager_refresh_renews_a_hot_entry_before_it_expires() {
    let cache: FusionCache<u32> = FusionCache::builder().build().unwrap();
    let options = EntryOptions::new()
        .duration(Duration::from_millis(400))
        .eager_refresh(0.25);
    let runs = Arc::new(AtomicUsize::new(0));
    let load = |runs: Arc<AtomicUsize>| {
        move |_| async move { Ok::<_, std::io::Error>(runs.fetch_add(1, Ordering::SeqCst) as u32) }
    };
    assert_eq!(
        cache
            .get_or_set_detached("k", &options, load(runs.clone()))
            .await
            .unwrap(),
        0
    );
    // Hits go on serving the cached value; once past a quarter of its duration one of them starts a
    // background refresh.
    let mut served_old = true;
    assert!(
        eventually(|| {
            let v = futures_util::FutureExt::now_or_never(cache.get_or_set_detached(
                "k",
                &options,
                load(runs.clone()),
            ));
            served_old &= matches!(v, Some(Ok(0)) | Some(Ok(1)));
            cache.peek("k") == Some(1)
        })
        .await,
        "renewed before the 400 ms expiry"
    );
    assert!(served_old, "every hit was served at once");
    assert_eq!(cache.stats().misses, 0);
}

#[tokio::test]
async fn l2_reads_and_writes_can_be_skipped_separately() {
    let (nodes, store, _) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    a.set_with("local", 1, &fail_safe().skip_l2_writes(true))
        .await
        .unwrap();
    assert!(store.is_empty(), "not written to L2");
    assert_eq!(b.get("local").await, None);
    a.set("shared", 2).await.unwrap();
    let no_reads = fail_safe().skip_l2_reads(true);
    let v = b
        .get_or_set_with("shared", &no_reads, || async { Ok::<_, std::io::Error>(3) })
        .await
        .unwrap();
    assert_eq!(v, 3, "L2 not read: the factory ran");
    assert_eq!(b.stats().l2_hits, 0);
}
