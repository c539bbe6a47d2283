//! The Redis L2 and pub/sub backplane against real `redis-server` processes.

use fusioncache::backplane::{now_ticks, Action, BackplaneMessage};
use fusioncache::{BackplaneState, EntryOptions};
use fusioncache_integration_tests::{eventually, eventually_async, redis_node, s, WAIT};
use fusioncache_testkit::RedisServer;

async fn connected(nodes: &[&fusioncache::FusionCache<String>]) {
    for n in nodes {
        assert!(
            n.wait_for_backplane(WAIT).await,
            "backplane of {} did not connect",
            n.instance_id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_separate_connections_converge() {
    let server = RedisServer::start().unwrap();
    let opts = EntryOptions::new().fail_safe(true);
    let [a, b, c] = ["a", "b", "c"].map(|_| redis_node(&server.url(), "products", opts.clone()));
    connected(&[&a, &b, &c]).await;

    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    assert_eq!(c.get("k").await, Some(s("v1")));

    // set
    a.set("k", s("v2")).await.unwrap();
    assert!(eventually(|| b.peek("k") == Some(s("v2")) && c.peek("k") == Some(s("v2"))).await);

    // expire
    b.expire("k").await.unwrap();
    assert!(eventually(|| a.peek("k").is_none() && c.peek("k").is_none()).await);
    assert_eq!(c.get("k").await, None, "expired in L2 as well");

    // remove
    a.set("k", s("v3")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v3")));
    assert_eq!(c.get("k").await, Some(s("v3")));
    c.remove("k").await.unwrap();
    assert!(eventually(|| a.peek("k").is_none() && b.peek("k").is_none()).await);
    assert_eq!(a.get("k").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_with_different_names_do_not_see_each_others_messages() {
    let server = RedisServer::start().unwrap();
    let opts = EntryOptions::new();
    let (p1, p2) = (
        redis_node(&server.url(), "products", opts.clone()),
        redis_node(&server.url(), "products", opts.clone()),
    );
    let (u1, u2) = (
        redis_node(&server.url(), "users", opts.clone()),
        redis_node(&server.url(), "users", opts.clone()),
    );
    connected(&[&p1, &p2, &u1, &u2]).await;
    // Skip L2 so that each node's L1 copy is its own.
    let local = EntryOptions::new()
        .skip_l2(true)
        .skip_backplane_notifications(true);
    for n in [&p2, &u2] {
        n.set_with("k", s("mine"), &local).await.unwrap();
    }
    p1.remove("k").await.unwrap();
    assert!(
        eventually(|| p2.peek("k").is_none()).await,
        "same name: notified"
    );
    assert!(
        eventually(|| u2.stats().backplane_received == 0 && p2.stats().backplane_received == 1)
            .await
    );
    assert_eq!(u2.peek("k"), Some(s("mine")), "other name: untouched");
    assert_eq!(u2.stats().backplane_received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_on_different_databases_do_not_see_each_others_keys() {
    let server = RedisServer::start().unwrap();
    let db1 = format!("{}/1", server.url());
    let db2 = format!("{}/2", server.url());
    let opts = EntryOptions::new();
    let (a, b) = (
        redis_node(&db1, "one", opts.clone()),
        redis_node(&db2, "two", opts.clone()),
    );
    a.set("shared-key", s("in db 1")).await.unwrap();
    assert_eq!(b.get("shared-key").await, None);
    b.set("shared-key", s("in db 2")).await.unwrap();
    let a2 = redis_node(&db1, "one", opts);
    assert_eq!(a2.get("shared-key").await, Some(s("in db 1")));
    assert!(server.command(&["SELECT", "2"]).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_reconnects_replays_and_serves_no_stale_value() {
    let mut server = RedisServer::start().unwrap();
    let opts = EntryOptions::new().fail_safe(true);
    let (a, b) = (
        redis_node(&server.url(), "products", opts.clone()),
        redis_node(&server.url(), "products", opts),
    );
    connected(&[&a, &b]).await;
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));

    server.stop();
    assert!(
        eventually(|| a.backplane_state() == BackplaneState::Disconnected
            && b.backplane_state() == BackplaneState::Disconnected)
        .await
    );
    // Reads keep working from L1 while Redis is down.
    assert_eq!(b.get("k").await, Some(s("v1")));
    // A write while down: L1 updated, L2 fails, the whole operation is queued (nothing published).
    let surfaced = EntryOptions::new().fail_safe(true).surface_l2_errors(true);
    assert!(
        a.set_with("k", s("v2"), &surfaced).await.is_err(),
        "the L2 write fails and, when asked, says so"
    );
    assert_eq!(a.pending_recovery(), 1);
    assert_eq!(a.get("k").await, Some(s("v2")), "a reads its own write");

    server.restart().unwrap();
    connected(&[&a, &b]).await;
    assert!(
        eventually(|| a.pending_recovery() == 0).await,
        "the queued write and its notification replayed"
    );
    assert!(
        b.stats().l1_mark_all_stale >= 1,
        "b marked its L1 stale on reconnection"
    );
    // Redis lost its data (no persistence), but a's write was replayed into it: b reads v2.
    assert!(eventually_async(|| async { b.get("k").await == Some(s("v2")) }).await);
    a.set("k", s("v3")).await.unwrap();
    assert!(eventually_async(|| async { b.get("k").await == Some(s("v3")) }).await);
    assert!(a.stats().auto_recovery_replayed >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_channel_is_dropped_and_counted_while_valid_messages_apply() {
    let server = RedisServer::start().unwrap();
    let node = redis_node(&server.url(), "products", EntryOptions::new());
    connected(&[&node]).await;
    node.set_with("k", s("v"), &EntryOptions::new().skip_l2(true))
        .await
        .unwrap();
    for garbage in ["", "\u{0}", "\u{0}garbage-bytes", "\u{0}\u{1}\u{0}\u{0}"] {
        server
            .command(&["PUBLISH", node.channel(), garbage])
            .unwrap();
    }
    let valid = BackplaneMessage::new("other-node", now_ticks(), Action::Remove, "k").encode();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(node.channel())
        .arg(valid.as_ref())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        eventually(|| node.peek("k").is_none()).await,
        "the valid message applied"
    );
    assert_eq!(node.stats().backplane_malformed, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_built_byte_by_byte_as_dotnet_sends_it_is_applied() {
    let server = RedisServer::start().unwrap();
    let node = redis_node(
        &server.url(),
        "products",
        EntryOptions::new().fail_safe(true),
    );
    connected(&[&node]).await;
    node.set_with(
        "product:42",
        s("v"),
        &EntryOptions::new().skip_l2(true).fail_safe(true),
    )
    .await
    .unwrap();
    // version 0 | i32 len + source id | i64 ticks | action 3 (expire) | i32 len + key — all little-endian.
    let source = "3f2b1c9e-dotnet";
    let key = "product:42";
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(&(source.len() as i32).to_le_bytes());
    bytes.extend_from_slice(source.as_bytes());
    bytes.extend_from_slice(&now_ticks().to_le_bytes());
    bytes.push(3);
    bytes.extend_from_slice(&(key.len() as i32).to_le_bytes());
    bytes.extend_from_slice(key.as_bytes());
    // Published raw, through a plain redis-rs connection (not the library).
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(node.channel())
        .arg(&bytes)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    assert!(eventually(|| node.peek("product:42").is_none()).await);
    assert_eq!(node.stats().backplane_received, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_from_the_url_works_and_a_wrong_password_is_a_clear_error() {
    let server = RedisServer::start_with_args(&[
        "--user", "app", "on", ">s3cret", "~app:*", "&app.*", "+@all",
    ])
    .unwrap();
    let port = server.port();
    let url = format!("redis://app:s3cret@127.0.0.1:{port}");
    let redis = fusioncache::redis::RedisConnection::open_with(
        &url,
        fusioncache_integration_tests::fast_redis_options(),
    )
    .unwrap();
    let cache: fusioncache::FusionCache<String> = fusioncache::FusionCache::builder()
        .name("app")
        .distributed_cache(
            fusioncache::l2::redis::RedisDistributedCache::new(redis.clone()).key_prefix("app:"),
        )
        .backplane(fusioncache::backplane::redis::RedisBackplane::new(redis))
        .build()
        .unwrap();
    assert!(
        cache.wait_for_backplane(WAIT).await,
        "subscribed to app.Backplane:v2 as the ACL user"
    );
    cache.set("k", s("v")).await.unwrap();
    // EXISTS, not GET: the stored envelope is binary and may hold a newline byte.
    assert_eq!(
        server
            .command_as("app", "s3cret", &["EXISTS", "app:k"])
            .unwrap(),
        ":1\r\n",
        "written under the ACL user's prefix"
    );

    let bad = fusioncache::redis::RedisConnection::open_with(
        &format!("redis://app:wrong@127.0.0.1:{port}"),
        fusioncache_integration_tests::fast_redis_options(),
    )
    .unwrap();
    let denied: fusioncache::FusionCache<String> = fusioncache::FusionCache::builder()
        .distributed_cache(fusioncache::l2::redis::RedisDistributedCache::new(bad))
        .build()
        .unwrap();
    let surfaced = EntryOptions::new().surface_l2_errors(true);
    let err = denied
        .set_with("k", s("v"), &surfaced)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("distributed cache"), "{err}");
    assert!(!err.contains("wrong"), "no password in the error: {err}");
    let err = denied.try_get("other").await.unwrap_err().to_string();
    assert!(err.contains("distributed cache"), "{err}");
}

/// A node of cache `name` with its own connection to `url` (Redis L2 and backplane), opened with `options`.
fn node_with(
    url: &str,
    options: &fusioncache::redis::RedisOptions,
    name: &str,
) -> fusioncache::FusionCache<String> {
    let redis = fusioncache::redis::RedisConnection::open_with(url, options.clone()).unwrap();
    fusioncache::FusionCache::<String>::builder()
        .name(name)
        .distributed_cache(fusioncache::l2::redis::RedisDistributedCache::new(
            redis.clone(),
        ))
        .backplane(fusioncache::backplane::redis::RedisBackplane::new(redis))
        .build()
        .unwrap()
}

/// A redis-server listening with TLS only, its certificates (see `make_certificates`) in a new directory
/// named after `name`; with `auth_clients`, every client must present a certificate of the CA. Returns the
/// server, its `rediss://` URL and the directory.
fn tls_server(name: &str, auth_clients: bool) -> (RedisServer, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("fusioncache-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    fusioncache_integration_tests::make_certificates(&dir);
    let tls_port = fusioncache_testkit::free_port();
    let path = |f: &str| dir.join(f).display().to_string();
    let server = RedisServer::start_with_args(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &path("server.crt"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.crt"),
        "--tls-auth-clients",
        if auth_clients { "yes" } else { "no" },
    ])
    .unwrap();
    (server, format!("rediss://127.0.0.1:{tls_port}"), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_connect_over_tls_with_a_custom_ca() {
    let (server, url, dir) = tls_server("tls", false);
    let options = fusioncache::redis::RedisOptions {
        tls_ca_certificate: Some(dir.join("ca.crt")),
        ..fusioncache_integration_tests::fast_redis_options()
    };
    let (a, b) = (
        node_with(&url, &options, "tls"),
        node_with(&url, &options, "tls"),
    );
    connected(&[&a, &b]).await;
    a.set("k", s("secret")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("secret")));
    a.set("k", s("v2")).await.unwrap();
    assert!(eventually(|| b.peek("k") == Some(s("v2"))).await);

    // Without the CA, the server's certificate is not trusted: an error, not a panic.
    let untrusted = fusioncache::redis::RedisConnection::open_with(
        &url,
        fusioncache_integration_tests::fast_redis_options(),
    )
    .unwrap();
    let c: fusioncache::FusionCache<String> = fusioncache::FusionCache::builder()
        .distributed_cache(fusioncache::l2::redis::RedisDistributedCache::new(
            untrusted,
        ))
        .build()
        .unwrap();
    let surfaced = EntryOptions::new().surface_l2_errors(true);
    assert!(c.set_with("k", s("v"), &surfaced).await.is_err());
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Mutual TLS: the server asks every client for a certificate. Nodes that present one (the options'
/// client certificate) write L2 and hear each other's notifications; a node without one gets an error,
/// not a panic, and its backplane never connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_carries_l2_and_the_backplane_and_refuses_a_node_without_a_certificate() {
    let (server, url, dir) = tls_server("mtls", true);
    let options = fusioncache::redis::RedisOptions {
        tls_ca_certificate: Some(dir.join("ca.crt")),
        tls_client_certificate: Some((dir.join("client.crt"), dir.join("client.key"))),
        ..fusioncache_integration_tests::fast_redis_options()
    };
    let node = |options: &fusioncache::redis::RedisOptions| node_with(&url, options, "mtls");
    let (a, b) = (node(&options), node(&options));
    connected(&[&a, &b]).await;
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    a.set("k", s("v2")).await.unwrap();
    assert!(eventually(|| b.peek("k") == Some(s("v2"))).await);

    let without = fusioncache::redis::RedisOptions {
        tls_client_certificate: None,
        ..options.clone()
    };
    let c = node(&without);
    let surfaced = EntryOptions::new().surface_l2_errors(true);
    assert!(c.set_with("k", s("v3"), &surfaced).await.is_err());
    assert!(
        !c.wait_for_backplane(std::time::Duration::from_secs(2))
            .await,
        "no pub/sub connection without a client certificate"
    );
    assert_eq!(b.peek("k"), Some(s("v2")), "nothing from the refused node");
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A `unix://` URL: the command and pub/sub connections both go over the server's Unix socket.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_urls_carry_l2_and_the_backplane() {
    let dir = std::env::temp_dir().join(format!("fusioncache-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("redis.sock");
    let server =
        RedisServer::start_with_args(&["--unixsocket", &socket.display().to_string()]).unwrap();
    let url = format!("unix://{}", socket.display());
    let node = || redis_node(&url, "unix", EntryOptions::new());
    let (a, b) = (node(), node());
    connected(&[&a, &b]).await;
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    a.set("k", s("v2")).await.unwrap();
    assert!(eventually(|| b.peek("k") == Some(s("v2"))).await);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Writes started together go as one batch (one script call), and one that Redis refuses (the key holds a
/// list) fails alone: the other is written and announced, the refused one is surfaced, queued for
/// auto-recovery and announced nowhere.
#[tokio::test]
async fn writes_started_together_go_as_one_batch_and_fail_one_by_one() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (
        redis_node(&server.url(), "batch", EntryOptions::new()),
        redis_node(&server.url(), "batch", EntryOptions::new()),
    );
    connected(&[&a, &b]).await;
    a.set("warm", s("up")).await.unwrap();
    b.set("good", s("old")).await.unwrap();
    server.command(&["RPUSH", "bad", "a list"]).unwrap();
    let calls = || {
        let info = server.command(&["INFO", "commandstats"]).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0u64, |n| n.parse().unwrap())
    };
    let before = calls();
    let received = b.stats().backplane_received;
    let surfaced = EntryOptions::new().surface_l2_errors(true);
    let (bad, good) = tokio::join!(
        a.set_with("bad", s("v"), &surfaced),
        a.set_with("good", s("new"), &surfaced)
    );
    assert_eq!(calls(), before + 1, "one script call for both writes");
    let err = bad.unwrap_err().to_string();
    assert!(err.contains("WRONGTYPE"), "{err}");
    good.unwrap();
    assert!(eventually(|| b.peek("good") != Some(s("old"))).await);
    assert_eq!(b.get("good").await, Some(s("new")));
    assert_eq!(a.pending_recovery(), 1, "the refused write is queued");
    assert_eq!(
        b.stats().backplane_received - received,
        1,
        "only the written key was announced"
    );
}
