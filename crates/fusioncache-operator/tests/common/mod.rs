//! Helpers shared by the integration tests: a real redis-server with an admin user, FusionCaches with
//! `acl: true`, and the pure reconciler run on them.

#![allow(dead_code)]

pub mod apiserver;
pub mod operator;

use std::collections::BTreeMap;

use fusioncache::config::FusionCacheConfig;
use fusioncache_operator::crd::{FusionCache, FusionCacheSpec, RedisSpec, Transport};
use fusioncache_operator::reconcile::{plan, Inputs, Lookup, Plan, Provision};
use fusioncache_operator::settings::{RedisEndpoint, Settings};
use fusioncache_testkit::RedisServer;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The admin user the operator provisions with.
pub const ADMIN: &str = "operator-admin";
/// Its password.
pub const ADMIN_PASSWORD: &str = "admin-secret";

/// A redis-server whose `default` user is off, with an admin user for the operator.
pub fn redis_with_admin() -> RedisServer {
    let redis = RedisServer::start().expect("redis-server starts");
    let ok = redis
        .command(&[
            "ACL",
            "SETUSER",
            ADMIN,
            "on",
            &format!(">{ADMIN_PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ])
        .unwrap();
    assert!(ok.starts_with("+OK"), "{ok}");
    let ok = redis
        .command_as(ADMIN, ADMIN_PASSWORD, &["ACL", "SETUSER", "default", "off"])
        .unwrap();
    assert!(ok.starts_with("+OK"), "{ok}");
    redis
}

/// A redis-server whose `default` user has [`ADMIN_PASSWORD`] on its command line, so that the operator's
/// admin survives a restart (ACL users created at run time do not: that is what the operator repairs).
pub fn redis_with_password() -> RedisServer {
    RedisServer::start_with_args(&["--requirepass", ADMIN_PASSWORD]).expect("redis-server starts")
}

/// Settings with the endpoint `main` on `redis`, administered as its `default` user.
pub fn default_user_settings(redis: &RedisServer) -> Settings {
    let mut s = settings(redis, ADMIN_PASSWORD);
    s.redis_endpoints[0].admin_username = Some("default".into());
    s
}

/// Settings with the endpoint `main` on `redis`, as the default.
pub fn settings(redis: &RedisServer, admin_password: &str) -> Settings {
    Settings {
        redis_endpoints: vec![RedisEndpoint {
            name: "main".into(),
            url: redis.url(),
            admin_username: Some(ADMIN.into()),
            admin_password: Some(admin_password.into()),
            databases: 16,
        }],
        default_redis_endpoint: Some("main".into()),
        default_nats_url: None,
    }
}

/// A FusionCache `shop/{name}` on the default endpoint, with Redis L2 and an ACL user.
pub fn acl_cache(name: &str) -> FusionCache {
    let mut fc = FusionCache::new(
        name,
        FusionCacheSpec {
            cache_name: name.into(),
            transport: Transport::Redis,
            redis: Some(RedisSpec {
                acl: true,
                ..RedisSpec::default()
            }),
            nats: None,
            channel_prefix: None,
            environment: None,
            key_prefix: None,
            distributed_cache: true,
        },
    );
    fc.metadata.namespace = Some("shop".into());
    fc.metadata.uid = Some(format!("uid-{name}"));
    fc.metadata.generation = Some(1);
    fc.metadata.creation_timestamp = Some(Time("2024-01-01T00:00:00Z".parse().unwrap()));
    fc
}

/// Runs the reconciler on `fc`; panics on a rejection.
pub fn provision(
    fc: &FusionCache,
    all: &[FusionCache],
    settings: &Settings,
    existing: Option<&Secret>,
) -> Provision {
    let inputs = Inputs {
        resource: fc,
        all,
        settings,
        redis_credentials: Lookup::NotReferenced,
        nats_credentials: Lookup::NotReferenced,
        existing_config_map: None,
        existing_secret: existing,
        fresh_password: fusioncache_operator::acl::generate_password().unwrap(),
        password_grace: std::time::Duration::from_secs(600),
        now: "2024-01-01T00:00:00Z".parse().unwrap(),
    };
    match plan(&inputs).unwrap() {
        Plan::Provision(p) => *p,
        Plan::Reject(r) => panic!("{}: {}", r.reason, r.message),
    }
}

/// What an app finds in its binding Secret, loaded by the library.
pub fn binding(p: &Provision) -> FusionCacheConfig {
    let values: BTreeMap<String, String> = p
        .secret
        .data
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
        .collect();
    FusionCacheConfig::from_values(&values).unwrap()
}
