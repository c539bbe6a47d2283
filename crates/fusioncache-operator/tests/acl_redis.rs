//! Least-privilege ACL users against a real `redis-server`: the operator renders two apps with `acl: true`
//! (A, `products`, in database 0; B, `orders`, in database 1) and provisions their users with the endpoint's
//! admin credentials. As A, with the credentials of its binding Secret:
//! - the library does everything it does (a `FusionCache` with the Redis L2 and backplane: get, set, remove,
//!   expire, subscribe, publish, reconnect after a Redis restart) without one permission error;
//! - every command outside `fusioncache::redis::ACL_COMMANDS` is refused (`ACL DRYRUN` of every command the
//!   server has, and the attacks of issue 12 run for real), and so is every access to B's keys and channel.

mod common;

use std::time::Duration;

use common::{
    acl_cache, binding, default_user_settings, provision, redis_with_admin, redis_with_password,
    settings, ADMIN_PASSWORD,
};
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::config::{env, FusionCacheConfig};
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::{RedisConnection, RedisOptions, ACL_COMMANDS};
use fusioncache::FusionCache;
use fusioncache_operator::acl::{AclProvisioner, RedisAclProvisioner};
use fusioncache_operator::crd::{FusionCache as FusionCacheResource, FusionCacheStatus};
use fusioncache_operator::reconcile::Provision;
use fusioncache_operator::settings::{RedisEndpoint, Settings};
use fusioncache_testkit::RedisServer;

const WAIT: Duration = Duration::from_secs(15);

fn with_status(mut fc: FusionCacheResource, status: FusionCacheStatus) -> FusionCacheResource {
    fc.status = Some(status);
    fc
}

/// Apps A (`products`) and B (`orders`), provisioned on `redis` as the operator does.
async fn two_apps(settings: &Settings) -> (Provision, Provision) {
    let products = acl_cache("products");
    let a = provision(&products, &[], settings, None);
    let products = with_status(products, a.status.clone());
    let b = provision(
        &acl_cache("orders"),
        std::slice::from_ref(&products),
        settings,
        None,
    );
    assert_eq!(
        (a.status.redis_database, b.status.redis_database),
        (Some(0), Some(1))
    );
    let acl = RedisAclProvisioner::default();
    for p in [&a, &b] {
        let (endpoint, user) = p.acl_user.as_ref().unwrap();
        acl.ensure_user(settings.endpoint(endpoint).unwrap(), user)
            .await
            .expect("ACL SETUSER");
    }
    (a, b)
}

/// A node of the app, built from its binding as a service would, on its own connection.
fn node(config: &FusionCacheConfig) -> FusionCache<String> {
    let r = config.redis.as_ref().unwrap();
    let options = RedisOptions {
        max_reconnect_delay: Duration::from_millis(200),
        health_check_interval: Duration::from_millis(500),
        ..RedisOptions::default()
    };
    let conn = RedisConnection::open_parts(
        r.url.as_deref().unwrap(),
        r.database,
        r.username.as_deref(),
        r.password.as_deref(),
        options,
    )
    .unwrap();
    FusionCache::builder()
        .name(config.cache_name.clone().unwrap())
        .channel_prefix(config.channel_prefix.clone().unwrap())
        .distributed_cache(
            RedisDistributedCache::new(conn.clone()).key_prefix(config.key_prefix.clone().unwrap()),
        )
        .backplane(RedisBackplane::new(conn))
        .build()
        .unwrap()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn admin(redis: &RedisServer, args: &[&str]) -> String {
    redis.command_as("default", ADMIN_PASSWORD, args).unwrap()
}

fn no_permission_errors(n: &FusionCache<String>) {
    let stats = n.stats();
    assert_eq!(stats.l2_errors, 0, "L2 errors: {stats:?}");
    assert_eq!(
        stats.auto_recovery_queued, 0,
        "distributed operations that failed (L2 step or publish): {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_a_runs_every_library_operation_under_its_acl_user_even_across_a_redis_restart() {
    let mut redis = redis_with_password();
    let settings = default_user_settings(&redis);
    let (a, _b) = two_apps(&settings).await;
    let config = binding(&a);
    let (n1, n2) = (node(&config), node(&config));
    for n in [&n1, &n2] {
        assert!(
            n.wait_for_backplane(WAIT).await,
            "A may subscribe to its channel"
        );
    }

    // set → L2 (under the key prefix, in A's database) → the other node reads it.
    n1.set("k", "v1".into()).await.unwrap();
    assert_eq!(n2.get("k").await.as_deref(), Some("v1"));
    assert!(admin(&redis, &["EXISTS", "shop.products:k"]).starts_with(":1"));
    // A change reaches the other node's L1 over the backplane (publish, subscribe).
    n1.set("k", "v2".into()).await.unwrap();
    eventually("n2's L1 refreshed or evicted", || {
        n2.peek("k").as_deref() != Some("v1")
    })
    .await;
    assert_eq!(n2.get("k").await.as_deref(), Some("v2"));
    // expire: stale everywhere (the library decides what L2 keeps).
    n1.expire("k").await.unwrap();
    // remove: gone from L2 and from the other node.
    n1.remove("k").await.unwrap();
    eventually("n2's L1 evicted", || n2.peek("k").is_none()).await;
    assert_eq!(n2.get("k").await, None);
    assert!(admin(&redis, &["EXISTS", "shop.products:k"]).starts_with(":0"));
    for n in [&n1, &n2] {
        no_permission_errors(n);
    }
    assert!(n2.stats().backplane_received >= 2, "{:?}", n2.stats());

    // Redis restarts without persistence: the users are gone until provisioned again (the operator's
    // watchdog does it within its check interval); the nodes reconnect with the same credentials.
    redis.restart().unwrap();
    let (endpoint, user) = a.acl_user.as_ref().unwrap();
    RedisAclProvisioner::default()
        .ensure_user(settings.endpoint(endpoint).unwrap(), user)
        .await
        .unwrap();
    let reconnects = n1.stats().backplane_reconnects;
    for n in [&n1, &n2] {
        assert!(
            n.wait_for_backplane(WAIT).await,
            "resubscribed after the restart"
        );
    }
    eventually("a backplane reconnection", || {
        n1.stats().backplane_reconnects > reconnects
    })
    .await;
    // The L2 connection finds out about the restart on its next command (a broken pipe) and reconnects;
    // the write goes through then (retried by the caller or by the library's auto-recovery).
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = n1.set("k", "v3".into()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "L2 never came back: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("v3 in L2", || {
        admin(&redis, &["EXISTS", "shop.products:k"]).starts_with(":1")
    })
    .await;
    // n2's L2 connection too (its first read after the restart is a miss).
    let deadline = tokio::time::Instant::now() + WAIT;
    while n2.get("k").await.as_deref() != Some("v3") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2 never read v3 from L2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n1.set("k", "v4".into()).await.unwrap();
    eventually("n2 notified after the restart", || {
        n2.peek("k").as_deref() != Some("v3")
    })
    .await;
    assert_eq!(n2.get("k").await.as_deref(), Some("v4"));
}

/// Commands Redis lets every connection run, whatever its ACL (they change nothing and read nothing).
/// (`HELLO` and `AUTH` authenticate, `QUIT` closes the connection, `RESET` resets its state: deselects,
/// unsubscribes, deauthenticates.)
const ALLOWED_TO_EVERYONE: &[&str] = &["auth", "hello", "quit", "reset"];

/// `ACL DRYRUN` of `args` for `user`, padded with `filler` arguments until the arity fits.
async fn dryrun(
    con: &mut redis::aio::MultiplexedConnection,
    user: &str,
    args: &[&str],
    filler: &str,
) -> String {
    for extra in 0..8 {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("DRYRUN").arg(user).arg(args);
        for _ in 0..extra {
            cmd.arg(filler);
        }
        let reply: Result<String, redis::RedisError> = cmd.query_async(con).await;
        match reply {
            Err(e) if e.to_string().contains("wrong number of arguments") => continue,
            Err(e) => return format!("ERR {e}"),
            Ok(text) => return text,
        }
    }
    panic!("no arity fits {args:?}")
}

#[tokio::test]
async fn every_command_outside_the_allowlist_and_every_access_to_app_b_is_denied() {
    let redis = redis_with_password();
    let settings = default_user_settings(&redis);
    let (a, b) = two_apps(&settings).await;
    let app_a = binding(&a);
    let ra = app_a.redis.clone().unwrap();
    let (user, pass) = (ra.username.clone().unwrap(), ra.password.clone().unwrap());
    let own_key = format!("{}k", app_a.key_prefix.clone().unwrap());
    let own_channel = app_a.channel().unwrap();
    let app_b = binding(&b);
    let other_key = format!("{}k", app_b.key_prefix.clone().unwrap());
    let other_channel = app_b.channel().unwrap();
    assert_eq!(
        (own_key.as_str(), own_channel.as_str()),
        ("shop.products:k", "shop.products.Backplane:v2")
    );

    // Every command the server has, checked without running it: exactly the allowlist passes.
    let admin_url = format!(
        "redis://default:{ADMIN_PASSWORD}@127.0.0.1:{}",
        redis.port()
    );
    let mut con = redis::Client::open(admin_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut names: Vec<String> = redis::cmd("COMMAND")
        .arg("LIST")
        .query_async(&mut con)
        .await
        .unwrap();
    names.sort();
    let containers: Vec<String> = names
        .iter()
        .filter_map(|n| n.split_once('|').map(|(c, _)| c.to_string()))
        .collect();
    let (mut allowed, mut denied, mut wrong) = (Vec::new(), 0, Vec::new());
    for name in names.iter().filter(|n| !containers.contains(n)) {
        let args: Vec<&str> = name.split('|').collect();
        let reply = dryrun(&mut con, &user, &args, &own_key).await;
        let refused = reply.contains(&format!("no permissions to run the '{name}' command"));
        if ACL_COMMANDS.contains(&name.as_str()) {
            if refused {
                wrong.push(format!("`{name}` is in the allowlist but refused: {reply}"));
            }
            allowed.push(name.clone());
        } else if refused {
            denied += 1;
        } else if !ALLOWED_TO_EVERYONE.contains(&name.as_str()) {
            wrong.push(format!("`{name}` is not in the allowlist, yet: {reply}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let mut known: Vec<&str> = ACL_COMMANDS
        .iter()
        .copied()
        .filter(|c| names.iter().any(|n| n == c))
        .collect();
    known.sort();
    assert_eq!(
        allowed, known,
        "every allowlisted command the server has was checked"
    );
    assert!(denied > 200, "only {denied} commands checked");

    // The attacks of issue 12, run for real as A, and every access to B's keys and channel.
    let lib = "#!lua name=evil\nredis.register_function('f', function() return 1 end)";
    let refused: &[&[&str]] = &[
        &["FUNCTION", "LOAD", "REPLACE", lib],
        &["FUNCTION", "FLUSH"],
        &["FUNCTION", "LIST"],
        &["FUNCTION", "DELETE", "evil"],
        &["FUNCTION", "DUMP"],
        &["FUNCTION", "KILL"],
        &["FCALL", "f", "1", &own_key],
        &["FCALL_RO", "f", "0"],
        &["EVAL", "return 1", "0"],
        &["SCRIPT", "FLUSH"],
        &["SCRIPT", "KILL"],
        &["CLIENT", "TRACKING", "ON", "BCAST"],
        &["CLIENT", "LIST"],
        &["CLIENT", "KILL", "ID", "1"],
        &["SCAN", "0"],
        &["KEYS", "*"],
        &["RANDOMKEY"],
        &["DBSIZE"],
        &["PUBSUB", "CHANNELS"],
        &["PUBSUB", "NUMSUB", &other_channel],
        &["PUBSUB", "NUMPAT"],
        &["FLUSHDB"],
        &["FLUSHALL"],
        &["SWAPDB", "0", "1"],
        &["SELECT", "1"],
        &["MOVE", &own_key, "1"],
        &["CONFIG", "GET", "*"],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["ACL", "SETUSER", &user, "+@all"],
        &["ACL", "LIST"],
        &["MONITOR"],
        &["MIGRATE", "127.0.0.1", "1", &own_key, "0", "100"],
        &["SHUTDOWN"],
        &["DEL", &own_key],
        &["EXPIRE", &own_key, "10"],
        &["KEYS", "shop.*"],
        &["PSUBSCRIBE", "*"],
        &["GET", &other_key],
        &["SET", &other_key, "v"],
        &["MGET", &own_key, &other_key],
        &["UNLINK", &other_key],
        &["PUBLISH", &other_channel, "x"],
        &["SUBSCRIBE", &other_channel],
        &["SUBSCRIBE", &format!("{own_channel}x")],
    ];
    for args in refused {
        let reply = redis.command_as(&user, &pass, args).unwrap();
        assert!(
            reply.starts_with("-NOPERM"),
            "as A, {args:?} answered {reply:?}"
        );
    }
    // What the library does is allowed.
    let as_a = |args: &[&str]| redis.command_as(&user, &pass, args).unwrap();
    assert!(as_a(&["SET", &own_key, "v"]).starts_with("+OK"));
    assert!(as_a(&["MGET", &own_key]).starts_with('*'));
    assert!(as_a(&["PUBLISH", &own_channel, "x"]).starts_with(':'));
    assert!(as_a(&["SUBSCRIBE", &own_channel]).starts_with('*'));
    assert!(as_a(&["UNLINK", &own_key]).starts_with(':'));
    // The library's one script (EVALSHA, SCRIPT LOAD) runs with A's rules: a script loaded by A reaches
    // A's keys only, declared or not.
    let sha = as_a(&["SCRIPT", "LOAD", "return redis.call('GET', KEYS[1])"]);
    let sha = sha.lines().nth(1).expect("a bulk reply").to_string();
    assert!(!as_a(&["EVALSHA", &sha, "1", &own_key]).starts_with('-'));
    assert!(as_a(&["EVALSHA", &sha, "1", &other_key]).starts_with("-NOPERM"));
    let sneaky = as_a(&[
        "SCRIPT",
        "LOAD",
        &format!("return redis.call('GET', '{other_key}')"),
    ]);
    let sneaky = sneaky.lines().nth(1).expect("a bulk reply").to_string();
    let reply = as_a(&["EVALSHA", &sneaky, "0"]);
    assert!(
        reply.starts_with("-ERR The user executing the script can't access"),
        "{reply}"
    );
    // B, in database 1, may SELECT, but not reach A's keys in database 0 through it.
    let rb = app_b.redis.unwrap();
    let (user_b, pass_b) = (rb.username.unwrap(), rb.password.unwrap());
    let as_b = |args: &[&str]| redis.command_as(&user_b, &pass_b, args).unwrap();
    assert!(as_b(&["SELECT", "1"]).starts_with("+OK"));
    assert!(as_b(&["GET", &own_key]).starts_with("-NOPERM"));
}

#[tokio::test]
async fn the_library_in_database_zero_never_needs_select_and_elsewhere_may() {
    let redis = redis_with_admin();
    let settings = settings(&redis, ADMIN_PASSWORD);
    let (a, b) = two_apps(&settings).await;
    for (p, select) in [(&a, false), (&b, true)] {
        let (_, user) = p.acl_user.as_ref().unwrap();
        assert_eq!(user.setuser_args().contains(&"+select".to_string()), select);
        // The library connects to its database (SELECT only outside 0) and works.
        let n = node(&binding(p));
        n.set("k", "v".into()).await.unwrap();
        assert_eq!(n.get("k").await.as_deref(), Some("v"));
        no_permission_errors(&n);
    }
}

#[tokio::test]
async fn wrong_admin_credentials_and_unreachable_endpoints_are_errors() {
    let mut redis = redis_with_admin();
    let products = acl_cache("products");
    let good = settings(&redis, ADMIN_PASSWORD);
    let p = provision(&products, &[], &good, None);
    let (_, user) = p.acl_user.as_ref().unwrap();
    let acl = RedisAclProvisioner::new(Duration::from_secs(3));

    let bad = settings(&redis, "wrong");
    let err = acl
        .ensure_user(bad.endpoint("main").unwrap(), user)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("main"), "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "no password in the error: {err}"
    );

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
