//! FusionCache 2 parity on a real redis-server: tags and clears through Redis, clears that never touch a
//! key the cache does not own, and the exact command set the library sends (`ACL_COMMANDS`).

use std::time::Duration;

use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::{RedisConnection, ACL_COMMANDS, ACL_SELECT};
use fusioncache::{CacheNotifier, EntryOptions, FusionCache};
use fusioncache_integration_tests::{eventually, eventually_async, fast_redis_options, s, WAIT};
use fusioncache_testkit::RedisServer;

fn node(url: &str, key_prefix: &str) -> FusionCache<String> {
    let redis = RedisConnection::open_with(url, fast_redis_options()).unwrap();
    FusionCache::builder()
        .name("shop")
        .default_entry_options(
            EntryOptions::new()
                .duration(Duration::from_secs(600))
                .fail_safe(true),
        )
        .distributed_cache(RedisDistributedCache::new(redis.clone()).key_prefix(key_prefix))
        .backplane(RedisBackplane::new(redis))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_removals_travel_through_redis_and_bind_nodes_started_later() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (node(&server.url(), "shop:"), node(&server.url(), "shop:"));
    for n in [&a, &b] {
        assert!(n.wait_for_backplane(WAIT).await);
    }
    let tagged = |t: &[&str]| a.default_entry_options().clone().tags(t.iter().copied());
    a.set_with("foo", s("1"), &tagged(&["x", "y"]))
        .await
        .unwrap();
    a.set_with("bar", s("2"), &tagged(&["y", "z"]))
        .await
        .unwrap();
    assert_eq!(b.get("foo").await, Some(s("1")));
    b.remove_by_tag("x").await.unwrap();
    assert!(eventually(|| a.peek("foo").is_none()).await);
    assert_eq!(a.get("foo").await, None);
    assert_eq!(a.get("bar").await, Some(s("2")));
    assert!(
        server
            .command(&["EXISTS", "shop:__fc:t:x"])
            .unwrap()
            .starts_with(":1"),
        "the removal is an entry under the key prefix"
    );
    let late = node(&server.url(), "shop:");
    assert_eq!(late.get("foo").await, None);
    assert_eq!(late.get("bar").await, Some(s("2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelated_key_survives_every_kind_of_clear() {
    let server = RedisServer::start().unwrap();
    for prefix in ["", "shop:"] {
        server.command(&["FLUSHALL"]).unwrap();
        server
            .command(&["SET", "billing:invoice:1", "paid"])
            .unwrap();
        let (a, b) = (node(&server.url(), prefix), node(&server.url(), prefix));
        for n in [&a, &b] {
            assert!(n.wait_for_backplane(WAIT).await);
        }
        a.set("k", s("v")).await.unwrap();
        assert_eq!(b.get("k").await, Some(s("v")));
        for allow_fail_safe in [true, false] {
            a.clear_with(allow_fail_safe).await.unwrap();
            assert!(eventually(|| b.peek("k").is_none()).await);
            assert_eq!(b.get("k").await, None, "prefix {prefix:?}");
            assert_eq!(
                server.command(&["GET", "billing:invoice:1"]).unwrap(),
                "$4\r\npaid\r\n",
                "prefix {prefix:?}, allow_fail_safe {allow_fail_safe}"
            );
        }
        let after = s("after");
        a.set("k2", after.clone()).await.unwrap();
        assert!(eventually_async(|| async { b.get("k2").await == Some(after.clone()) }).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_refuses_an_empty_prefix_and_deletes_only_its_own_keys() {
    let server = RedisServer::start().unwrap();
    let redis = RedisConnection::open(&server.url()).unwrap();
    server
        .command(&["SET", "billing:invoice:1", "paid"])
        .unwrap();
    server.command(&["SET", "shop:a", "1"]).unwrap();
    server.command(&["SET", "shop:b", "2"]).unwrap();
    let unprefixed = RedisDistributedCache::new(redis.clone());
    assert!(unprefixed.purge().await.is_err());
    let shop = RedisDistributedCache::new(redis).key_prefix("shop:");
    assert_eq!(shop.purge().await.unwrap(), 2);
    assert_eq!(server.command(&["DBSIZE"]).unwrap(), ":1\r\n");
}

/// An ACL user allowed exactly [`ACL_COMMANDS`] (plus `SELECT`), its key prefix and its channel runs every
/// operation of the library, the publish-only handle included, and Redis logs no denied command (redis-rs
/// ignores some errors, e.g. of `CLIENT SETINFO`: the ACL log sees them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_sends_only_the_commands_of_its_acl_allowlist() {
    let mut server = RedisServer::start().unwrap();
    let mut rule = vec![
        "ACL",
        "SETUSER",
        "app",
        "reset",
        "on",
        ">app-secret",
        "~app:*",
        "&shop.Backplane:v2",
        "-@all",
    ];
    let allowed: Vec<String> = ACL_COMMANDS
        .iter()
        .chain([&ACL_SELECT])
        .map(|c| format!("+{c}"))
        .collect();
    rule.extend(allowed.iter().map(String::as_str));
    assert_eq!(server.command(&rule).unwrap(), "+OK\r\n");
    server.command(&["ACL", "LOG", "RESET"]).unwrap();

    let url = format!("redis://app:app-secret@127.0.0.1:{}/3", server.port());
    let (a, b) = (node(&url, "app:"), node(&url, "app:"));
    for n in [&a, &b] {
        assert!(n.wait_for_backplane(WAIT).await);
    }
    let tagged = a.default_entry_options().clone().tags(["t"]);
    a.set_with("k", s("v"), &tagged).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v")));
    a.set("k", s("v2")).await.unwrap();
    assert!(
        eventually(|| b.peek("k") == Some(s("v2"))).await,
        "refreshed from L2"
    );
    b.expire("k").await.unwrap();
    b.remove("other").await.unwrap();
    a.remove_by_tag("t").await.unwrap();
    a.clear().await.unwrap();
    a.clear_with(false).await.unwrap();
    let _ = a
        .get_or_set("g", || async { Ok::<_, std::io::Error>(s("loaded")) })
        .await
        .unwrap();
    let notifier = CacheNotifier::builder()
        .name("shop")
        .distributed_cache(
            RedisDistributedCache::new(RedisConnection::open(&url).unwrap()).key_prefix("app:"),
        )
        .backplane(RedisBackplane::new(RedisConnection::open(&url).unwrap()))
        .build()
        .unwrap();
    notifier.remove("k").await.unwrap();
    notifier.notify_set("k").await.unwrap();
    // Reconnection: the pub/sub and command connections are set up again.
    server.restart().unwrap();
    assert_eq!(
        server.command(&rule).unwrap(),
        "+OK\r\n",
        "ACL users do not survive a restart here"
    );
    assert!(eventually(|| a.stats().backplane_reconnects >= 1).await);
    assert!(
        eventually_async(|| async {
            a.set("after", s("x")).await.is_ok() && b.get("after").await == Some(s("x"))
        })
        .await
    );

    let log = server.command(&["ACL", "LOG"]).unwrap();
    assert_eq!(log, "*0\r\n", "denied commands: {log}");
}

/// An entry write that reaches Redis after a newer one (held by a stalled server or a healed partition)
/// does not replace it; a write of the same entry or a newer one does. Bytes that are not an entry
/// envelope are written as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_entry_write_does_not_replace_a_newer_one() {
    use fusioncache::l2::DistributedCache;
    let server = RedisServer::start().unwrap();
    let l2 =
        RedisDistributedCache::new(RedisConnection::open(&server.url()).unwrap()).key_prefix("p:");
    // An envelope: version 1, logical and fail-safe expiries, the write timestamp (LE), then the value.
    let envelope = |ts: i64, value: &str| {
        let mut b = vec![1u8];
        b.extend_from_slice(&i64::MAX.to_le_bytes());
        b.extend_from_slice(&i64::MAX.to_le_bytes());
        b.extend_from_slice(&ts.to_le_bytes());
        b.extend_from_slice(value.as_bytes());
        bytes::Bytes::from(b)
    };
    let ttl = Duration::from_secs(60);
    let newer = 638_700_000_000_000_200i64;
    l2.set("k", envelope(newer, "newer"), ttl).await.unwrap();
    l2.set("k", envelope(newer - 100, "late"), ttl)
        .await
        .unwrap();
    let stored = l2.get("k").await.unwrap().unwrap();
    assert!(stored.ends_with(b"newer"), "the late write was refused");
    l2.set("k", envelope(newer, "same write again"), ttl)
        .await
        .unwrap();
    l2.set("k", envelope(newer + 1, "newest"), ttl)
        .await
        .unwrap();
    assert!(l2.get("k").await.unwrap().unwrap().ends_with(b"newest"));
    // After a restart the script is gone from the server's cache: it is loaded again.
    let mut server = server;
    server.restart().unwrap();
    // (The first command on the dead connection may fail: the engine would queue it; here, retry.)
    assert!(
        eventually_async(|| async {
            l2.set("k2", envelope(newer, "after restart"), ttl)
                .await
                .is_ok()
        })
        .await
    );
    assert!(l2
        .get("k2")
        .await
        .unwrap()
        .unwrap()
        .ends_with(b"after restart"));
    l2.set("raw", bytes::Bytes::from_static(b"not an envelope"), ttl)
        .await
        .unwrap();
    assert_eq!(l2.get("raw").await.unwrap().unwrap(), b"not an envelope");
}
