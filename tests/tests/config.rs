//! A service starting from injected configuration (environment variables, a YAML file, a Service Binding)
//! with one call, against real servers.

use std::collections::BTreeMap;

use fusioncache::config::{env, FusionCacheConfig};
use fusioncache::FusionCache;
use fusioncache_integration_tests::{eventually, s, WAIT};
use fusioncache_testkit::{NatsServer, RedisServer};

fn values(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

async fn node(config: &FusionCacheConfig) -> FusionCache<String> {
    let cache = FusionCache::builder()
        .with_config(config)
        .await
        .unwrap()
        .build()
        .unwrap();
    assert!(cache.wait_for_backplane(WAIT).await);
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_configured_from_environment_variables_use_redis_database_and_prefixes() {
    let server = RedisServer::start().unwrap();
    let env = values(&[
        (env::CACHE_NAME, "products".into()),
        (env::CHANNEL_PREFIX, "shop.prod.products".into()),
        (env::BACKPLANE, "redis".into()),
        (env::REDIS_URL, server.url()),
        (env::REDIS_DATABASE, "2".into()),
        (env::KEY_PREFIX, "shop:".into()),
    ]);
    let config = FusionCacheConfig::load_from(&env).unwrap();
    let (a, b) = (node(&config).await, node(&config).await);
    assert_eq!(a.channel(), "shop.prod.products.Backplane:v2");
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));
    a.set("k", s("v2")).await.unwrap();
    assert!(eventually(|| b.peek("k") == Some(s("v2"))).await);

    // The entry is in database 2, under the key prefix.
    let client = redis::Client::open(format!("{}/2", server.url())).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg("shop:k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 1);
    let in_db0 = server.command(&["EXISTS", "shop:k"]).unwrap();
    assert_eq!(in_db0.trim(), ":0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_file_and_a_binding_configure_nats_with_a_redis_l2() {
    let nats = NatsServer::start().unwrap();
    let redis = RedisServer::start_with_args(&["--requirepass", "s3cret"]).unwrap();
    let dir = nats.dir().join("config");
    let binding = dir.join("bindings").join("orders-cache");
    std::fs::create_dir_all(&binding).unwrap();
    let yaml = format!(
        "cacheName: orders\nbackplane: nats\ndistributedCache: redis\nnats:\n  url: {}\nredis:\n  url: {}\n",
        nats.url(),
        redis.url()
    );
    std::fs::write(dir.join("fusioncache.yaml"), yaml).unwrap();
    // The Secret, as the operator shapes it: a Service Binding with the password.
    std::fs::write(binding.join("type"), "fusioncache").unwrap();
    std::fs::write(binding.join("provider"), "fusioncache-operator").unwrap();
    std::fs::write(binding.join(env::REDIS_PASSWORD), "s3cret").unwrap();
    let env = values(&[
        (
            env::CONFIG,
            dir.join("fusioncache.yaml").display().to_string(),
        ),
        (
            env::SERVICE_BINDING_ROOT,
            dir.join("bindings").display().to_string(),
        ),
    ]);
    let config = FusionCacheConfig::load_from(&env).unwrap();
    let (a, b) = (node(&config).await, node(&config).await);
    assert_eq!(a.channel(), "orders.Backplane:v2");
    a.set("o:1", s("new")).await.unwrap();
    assert_eq!(
        b.get("o:1").await,
        Some(s("new")),
        "from the password-protected Redis"
    );
    a.set("o:1", s("paid")).await.unwrap();
    assert!(
        eventually(|| b.peek("o:1") == Some(s("paid"))).await,
        "told over NATS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_builder_values_win_over_injected_configuration() {
    let config = FusionCacheConfig::from_yaml(
        "cacheName: injected\nchannelPrefix: injected.prefix\nbackplane: memory\n",
    )
    .unwrap();
    let cache: FusionCache<String> = FusionCache::builder()
        .name("explicit")
        .channel_prefix("explicit.prefix")
        .with_config(&config)
        .await
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(cache.name(), "explicit");
    assert_eq!(cache.channel(), "explicit.prefix.Backplane:v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_an_error_on_use_not_a_crash() {
    let config = FusionCacheConfig::from_yaml(
        "cacheName: c\nbackplane: redis\nredis:\n  url: redis://127.0.0.1:1\n",
    )
    .unwrap();
    let cache: FusionCache<String> = FusionCache::builder()
        .with_config(&config)
        .await
        .unwrap()
        .build()
        .unwrap();
    let surfaced = fusioncache::EntryOptions::new().surface_l2_errors(true);
    assert!(
        cache.set_with("k", s("v"), &surfaced).await.is_err(),
        "L2 write fails and, when asked, says so"
    );
    assert!(cache.set("k", s("v")).await.is_ok(), "by default: queued");
    assert_eq!(cache.pending_recovery(), 1);
    assert_eq!(cache.get("k").await, Some(s("v")), "L1 still serves");
    assert!(
        !cache
            .wait_for_backplane(std::time::Duration::from_millis(300))
            .await
    );
}
