//! The connections behind injected configuration are shared only by caches with the same credentials, and a
//! password rotated in the Service Binding is used by the caches built after the rotation and by the live
//! ones when they reconnect; against a real redis-server with ACL users.

use std::collections::BTreeMap;

use fusioncache::config::{env, FusionCacheConfig};
use fusioncache::FusionCache;
use fusioncache_integration_tests::{acl_user, eventually, eventually_async, s, write_binding};
use fusioncache_testkit::RedisServer;

async fn l2_node(config: &FusionCacheConfig) -> FusionCache<String> {
    FusionCache::builder()
        .with_config(config)
        .await
        .unwrap()
        .build()
        .unwrap()
}

fn l2_config(url: &str, username: &str, password: &str) -> FusionCacheConfig {
    FusionCacheConfig::from_yaml(&format!(
        "cacheName: creds\ndistributedCache: redis\nredis:\n  url: {url}\n  username: {username}\n  password: \"{password}\"\n"
    ))
    .unwrap()
}

/// The clients the server has for `user`.
fn clients_of(server: &RedisServer, user: &str) -> usize {
    let list = server.command(&["CLIENT", "LIST"]).unwrap();
    list.lines()
        .filter(|l| l.contains(&format!(" user={user} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_length_passwords_do_not_share_a_connection() {
    let server = RedisServer::start().unwrap();
    acl_user(&server, "app", "first-secret");
    acl_user(&server, "other", "other-secret");
    let good = l2_config(&server.url(), "app", "first-secret");
    let (a, b) = (l2_node(&good).await, l2_node(&good).await);
    a.set("k", s("v")).await.unwrap();
    b.set("k2", s("v2")).await.unwrap();
    assert_eq!(
        clients_of(&server, "app"),
        1,
        "identical credentials share one connection"
    );

    // Same user, a wrong password of the same length: its own connection, which the server refuses.
    let wrong = l2_node(&l2_config(&server.url(), "app", "wrong-secret")).await;
    let err = wrong.try_get("k").await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(!err.to_string().contains("wrong-secret"), "{err}");

    // Another user with a password of the same length: its own, working connection.
    let other = l2_node(&l2_config(&server.url(), "other", "other-secret")).await;
    assert_eq!(other.try_get("k").await.unwrap(), Some(s("v")));
    assert_eq!(clients_of(&server, "other"), 1);
    assert_eq!(clients_of(&server, "app"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_binding_password_is_used_by_caches_built_after_the_rotation() {
    let server = RedisServer::start().unwrap();
    acl_user(&server, "app", "old-password");
    let root = server.dir().join("bindings");
    let binding = root.join("cache");
    let url = server.url();
    let binding_values = [
        ("distributed-cache", "redis"),
        ("url", url.as_str()),
        ("username", "app"),
        ("password", "old-password"),
    ];
    write_binding(&binding, &binding_values);
    let env: BTreeMap<String, String> = [
        (
            env::SERVICE_BINDING_ROOT.to_string(),
            root.display().to_string(),
        ),
        (env::CACHE_NAME.to_string(), "rotated".to_string()),
    ]
    .into();
    let before = l2_node(&FusionCacheConfig::load_from(&env).unwrap()).await;
    before.set("k", s("v1")).await.unwrap();

    // The rotation: the server takes only the new password (same length), the Secret is updated, and
    // the connections opened with the old one go away.
    acl_user(&server, "app", "new-password");
    std::fs::write(binding.join("password"), "new-password").unwrap();
    server.command(&["CLIENT", "KILL", "USER", "app"]).unwrap();
    assert!(eventually(|| clients_of(&server, "app") == 0).await);

    let after = l2_node(&FusionCacheConfig::load_from(&env).unwrap()).await;
    assert_eq!(
        after.try_get("k").await.unwrap(),
        Some(s("v1")),
        "a cache built after the rotation connects with the new password"
    );
}

/// Writes `contents` to `path` the way the kubelet updates a mounted Secret: a new file renamed over.
fn replace_file(path: &std::path::Path, contents: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, contents).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_binding_password_reaches_the_live_caches_when_they_reconnect() {
    let server = RedisServer::start().unwrap();
    acl_user(&server, "app", "old-password");
    let root = server.dir().join("live-bindings");
    let url = server.url();
    // Two pods: each its own binding mount (and so its own connections), the same Secret.
    let mut nodes = Vec::new();
    for pod in ["a", "b"] {
        let binding = root.join(pod).join("cache");
        write_binding(
            &binding,
            &[
                ("distributed-cache", "redis"),
                ("backplane", "redis"),
                ("url", url.as_str()),
                ("username", "app"),
                ("password", "old-password\n"),
                ("cache-name", "live-rotation"),
            ],
        );
        let config = FusionCacheConfig::from_binding_dir(&binding).unwrap();
        assert_eq!(
            config.redis.as_ref().unwrap().password_file.as_deref(),
            Some(binding.join("password").as_path())
        );
        let node = l2_node(&config).await;
        nodes.push((binding, node));
    }
    let (a, b) = (&nodes[0].1, &nodes[1].1);
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.try_get("k").await.unwrap(), Some(s("v1")));

    // The rotation, all the way: the Secret changes, the server drops the old password, and every
    // connection of the user goes (as after a Redis restart or a network cut).
    acl_user(&server, "app", "new-password");
    for (binding, _) in &nodes {
        replace_file(&binding.join("password"), "new-password\n");
    }
    server.command(&["CLIENT", "KILL", "USER", "app"]).unwrap();

    // The live caches reconnect with the new password: A's write reaches L2 and B's backplane.
    let surfaced = a.default_entry_options().clone().surface_l2_errors(true);
    assert!(
        eventually_async(|| async { a.set_with("k", s("v2"), &surfaced).await.is_ok() }).await,
        "A's command connection reconnects with the new password"
    );
    assert!(
        eventually_async(|| async { b.get("k").await == Some(s("v2")) }).await,
        "B serves A's write (its L2 read and its subscription work again)"
    );
    let a_before = a.stats().backplane_received;
    b.set("k2", s("from-b")).await.unwrap();
    assert!(
        eventually(|| a.stats().backplane_received > a_before).await,
        "A's subscription delivers B's notification"
    );
    assert_eq!(a.get("k2").await, Some(s("from-b")));
    assert!(clients_of(&server, "app") >= 4, "both pods reconnected");
}
