//! ACL provisioning against a real `redis-server`: the operator renders two caches with `acl: true`,
//! provisions their users with the endpoint's admin credentials, and each app — authenticating with what its
//! binding Secret holds — can use its own keys and channel and is denied the other's.

mod common;

use common::{acl_cache, binding, provision, redis_with_admin, settings, ADMIN_PASSWORD};
use fusioncache::config::env;
use fusioncache_operator::acl::{AclProvisioner, RedisAclProvisioner};
use fusioncache_operator::crd::{FusionCache, FusionCacheStatus};
use fusioncache_operator::settings::{RedisEndpoint, Settings};

fn with_status(mut fc: FusionCache, status: FusionCacheStatus) -> FusionCache {
    fc.status = Some(status);
    fc
}

#[tokio::test]
async fn app_users_reach_their_own_keys_and_channel_and_are_denied_the_others() {
    let redis = redis_with_admin();
    let settings = settings(&redis, ADMIN_PASSWORD);
    let acl = RedisAclProvisioner::default();
    let endpoint = settings.endpoint("main").unwrap();

    // Two apps; the second is reconciled seeing the first's status, as in the cluster.
    let products = acl_cache("products");
    let p1 = provision(&products, &[], &settings, None);
    let products = with_status(products, p1.status.clone());
    let orders = acl_cache("orders");
    let p2 = provision(&orders, std::slice::from_ref(&products), &settings, None);
    assert_eq!(p1.status.redis_database, Some(0));
    assert_eq!(p2.status.redis_database, Some(1));
    for p in [&p1, &p2] {
        let (endpoint_name, user) = p.acl_user.as_ref().unwrap();
        assert_eq!(endpoint_name, "main");
        acl.ensure_user(endpoint, user).await.expect("ACL SETUSER");
    }

    let app1 = binding(&p1);
    let r1 = app1.redis.clone().unwrap();
    let (user1, pass1) = (r1.username.clone().unwrap(), r1.password.clone().unwrap());
    let own_key = format!("{}k", app1.key_prefix.clone().unwrap());
    let own_channel = app1.channel().unwrap();
    let app2 = binding(&p2);
    let other_key = format!("{}k", app2.key_prefix.clone().unwrap());
    let other_channel = app2.channel().unwrap();
    assert_eq!(own_key, "shop.products:k");
    assert_eq!(own_channel, "shop.products.Backplane:v2");

    // With the raw protocol, as the app user.
    let as_app1 = |args: &[&str]| redis.command_as(&user1, &pass1, args).unwrap();
    assert!(as_app1(&["SET", &own_key, "v"]).starts_with("+OK"));
    assert!(as_app1(&["GET", &own_key]).contains("v"));
    assert!(as_app1(&["PUBLISH", &own_channel, "x"]).starts_with(':'));
    assert!(as_app1(&["SUBSCRIBE", &own_channel]).starts_with('*'));
    assert!(as_app1(&["GET", &other_key]).starts_with("-NOPERM"));
    assert!(as_app1(&["SET", &other_key, "v"]).starts_with("-NOPERM"));
    assert!(as_app1(&["PUBLISH", &other_channel, "x"]).starts_with("-NOPERM"));
    assert!(as_app1(&["SUBSCRIBE", &other_channel]).starts_with("-NOPERM"));
    assert!(
        as_app1(&["FLUSHALL"]).starts_with("-NOPERM"),
        "dangerous commands are denied"
    );

    // With redis-rs, as the library would connect: URL, database, username and password from the binding.
    let info = redis::Client::open(r1.url.clone().unwrap())
        .unwrap()
        .get_connection_info()
        .clone();
    let redis_info = info
        .redis_settings()
        .clone()
        .set_username(&user1)
        .set_password(&pass1)
        .set_db(i64::from(r1.database.unwrap()));
    let client = redis::Client::open(info.set_redis_settings(redis_info)).unwrap();
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("the app user authenticates");
    let () = redis::cmd("SET")
        .arg(&own_key)
        .arg("from-rust")
        .query_async(&mut con)
        .await
        .unwrap();
    let got: String = redis::cmd("GET")
        .arg(&own_key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, "from-rust");
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(&own_channel)
        .arg("x")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(receivers, 0);
    let denied: Result<Option<String>, _> = redis::cmd("GET")
        .arg(&other_key)
        .query_async(&mut con)
        .await;
    let denied = denied.unwrap_err().to_string();
    assert!(denied.to_ascii_lowercase().contains("noperm"), "{denied}");

    // Reconciling again (same password, from the Secret) keeps the user working.
    let again = provision(&products, &[], &settings, Some(&p1.secret));
    let (_, user) = again.acl_user.as_ref().unwrap();
    assert_eq!(user.password, pass1);
    acl.ensure_user(endpoint, user).await.unwrap();
    assert!(as_app1(&["GET", &own_key]).contains("from-rust"));

    // Finalize: the user is gone.
    acl.delete_user(endpoint, &user1)
        .await
        .expect("ACL DELUSER");
    let err = redis.command_as(&user1, &pass1, &["PING"]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    // Deleting again is not an error.
    acl.delete_user(endpoint, &user1).await.unwrap();
}

#[tokio::test]
async fn wrong_admin_credentials_and_unreachable_endpoints_are_errors() {
    let mut redis = redis_with_admin();
    let products = acl_cache("products");
    let good = settings(&redis, ADMIN_PASSWORD);
    let p = provision(&products, &[], &good, None);
    let (_, user) = p.acl_user.as_ref().unwrap();
    let acl = RedisAclProvisioner::new(std::time::Duration::from_secs(3));

    let bad = settings(&redis, "wrong");
    let err = acl
        .ensure_user(bad.endpoint("main").unwrap(), user)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("main"), "{err}");

    redis.stop();
    let err = acl
        .ensure_user(good.endpoint("main").unwrap(), user)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("main"), "{err}");
}

#[test]
fn the_binding_is_what_the_library_loads() {
    let settings = Settings {
        redis_endpoints: vec![RedisEndpoint {
            name: "main".into(),
            url: "redis://127.0.0.1:6390".into(),
            admin_username: None,
            admin_password: None,
            databases: 16,
        }],
        default_redis_endpoint: None,
        default_nats_url: None,
    };
    let p = provision(&acl_cache("products"), &[], &settings, None);
    let config = binding(&p);
    assert_eq!(config, p.config);
    assert_eq!(
        config.to_env().get(env::REDIS_USERNAME).map(String::as_str),
        Some("fc.shop.products")
    );
}
