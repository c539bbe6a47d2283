//! The round trip of DESIGN §6: a FusionCache rendered by the operator (with an ACL user provisioned on a
//! real redis-server) is loaded by the library from its binding, and two nodes built from it share L2 and
//! stay coherent over the backplane, with nothing but the permissions the operator granted.

mod common;

use std::time::Duration;

use common::{acl_cache, binding, provision, redis_with_admin, settings, ADMIN, ADMIN_PASSWORD};
use fusioncache::config::{BackplaneKind, DistributedCacheKind, FusionCacheConfig};
use fusioncache::FusionCache;
use fusioncache_operator::acl::{AclProvisioner, RedisAclProvisioner};

const WAIT: Duration = Duration::from_secs(15);

/// A node built from the injected configuration with the library's one call, as a service would be.
async fn node(config: &FusionCacheConfig) -> FusionCache<String> {
    assert_eq!(config.backplane, Some(BackplaneKind::Redis));
    assert_eq!(
        config.effective_distributed_cache(),
        DistributedCacheKind::Redis
    );
    FusionCache::builder()
        .with_config(config)
        .await
        .unwrap()
        .build()
        .unwrap()
}

async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_built_from_the_rendered_binding_share_l2_and_stay_coherent_under_their_acl_user() {
    let redis = redis_with_admin();
    let settings = settings(&redis, ADMIN_PASSWORD);
    let products = acl_cache("products");
    let p = provision(&products, &[], &settings, None);
    let (endpoint, user) = p.acl_user.as_ref().unwrap();
    RedisAclProvisioner::default()
        .ensure_user(settings.endpoint(endpoint).unwrap(), user)
        .await
        .unwrap();

    // The binding Secret and the ConfigMap's YAML describe the same cache (the YAML without credentials).
    let config = binding(&p);
    let yaml = p.config_map.data.as_ref().unwrap()[fusioncache::config::CONFIG_FILE_NAME].clone();
    let from_file = FusionCacheConfig::from_yaml(&yaml).unwrap();
    assert_eq!(
        from_file.merge(config.clone()),
        config,
        "binding fills in only the credentials"
    );

    let (a, b) = (node(&config).await, node(&config).await);
    for n in [&a, &b] {
        assert!(
            n.wait_for_backplane(WAIT).await,
            "the ACL user may subscribe to its channel"
        );
    }

    // L2: written by one node, read by the other, under the key prefix in the allocated database.
    a.set("k", "v1".to_string()).await.unwrap();
    assert_eq!(b.get("k").await.as_deref(), Some("v1"));
    let exists = redis
        .command_as(ADMIN, ADMIN_PASSWORD, &["EXISTS", "shop.products:k"])
        .unwrap();
    assert!(
        exists.starts_with(":1"),
        "key shop.products:k in database 0: {exists}"
    );

    // Backplane: a change on one node reaches the other's L1.
    a.set("k", "v2".to_string()).await.unwrap();
    assert!(
        eventually(|| b.peek("k").as_deref() == Some("v2") || b.peek("k").is_none()).await,
        "b's L1 was refreshed or evicted"
    );
    assert_eq!(b.get("k").await.as_deref(), Some("v2"));
    a.remove("k").await.unwrap();
    assert!(eventually(|| b.peek("k").is_none()).await);
    assert_eq!(b.get("k").await, None);
}
