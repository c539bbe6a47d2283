//! End to end: the real `fusioncache-operator run` binary against the API-server double (with the RBAC of
//! `manifests/install.yaml`, so a request the chart does not grant fails as in a cluster) and a real
//! redis-server.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::apiserver::{
    eventually, ApiServer, Rbac, CONFIGMAPS, EVENTS, FUSIONCACHES, LEASES, SECRETS,
};
use common::operator::{Operator, OPERATOR_NAMESPACE};
use common::{redis_with_admin, redis_with_password, ADMIN, ADMIN_PASSWORD};
use fusioncache::config::env;
use fusioncache_testkit::RedisServer;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const NS: &str = "shop";

fn manifests() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/install.yaml")
}

/// The RBAC the chart's default install grants the operator's service account.
fn chart_rbac() -> Rbac {
    Rbac::from_manifests(&manifests(), OPERATOR_NAMESPACE, "fusioncache-operator")
}

fn settings(redis: &RedisServer) -> String {
    format!(
        "redisEndpoints:\n  - name: main\n    url: {}\n    adminUsername: {ADMIN}\n    adminPassword: {ADMIN_PASSWORD}\n    databases: 16\n",
        redis.url()
    )
}

fn default_user_settings(redis: &RedisServer) -> String {
    format!(
        "redisEndpoints:\n  - name: main\n    url: {}\n    adminUsername: default\n    adminPassword: {ADMIN_PASSWORD}\n",
        redis.url()
    )
}

fn fusioncache(name: &str, acl: bool) -> Value {
    json!({
        "apiVersion": "fusioncache.io/v1alpha1",
        "kind": "FusionCache",
        "metadata": { "name": name },
        "spec": {
            "cacheName": name,
            "transport": "redis",
            "distributedCache": true,
            "redis": { "endpoint": "main", "acl": acl },
        },
    })
}

fn ready(fc: &Value) -> Option<(&str, &str)> {
    fc["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
            )
        })
}

/// Waits until the FusionCache's Ready condition has `status` and `reason` for its current generation.
async fn wait_condition(api: &ApiServer, name: &str, status: &str, reason: &str) -> Value {
    eventually(
        WAIT,
        &format!("{name}: Ready={status} {reason} for its generation"),
        || {
            let fc = api.get(FUSIONCACHES, NS, name)?;
            let current = fc["metadata"]["generation"] == fc["status"]["observedGeneration"];
            (current && ready(&fc) == Some((status, reason))).then_some(fc)
        },
    )
    .await
}

fn data(obj: &Value, key: &str) -> Option<String> {
    obj["data"][key].as_str().map(String::from)
}

fn secret_text(secret: &Value, key: &str) -> Option<String> {
    let b64 = secret["data"][key].as_str()?;
    let bytes: k8s_openapi::ByteString = serde_json::from_value(json!(b64)).ok()?;
    String::from_utf8(bytes.0).ok()
}

fn acl_users(redis: &RedisServer) -> String {
    redis
        .command_as(ADMIN, ADMIN_PASSWORD, &["ACL", "USERS"])
        .unwrap_or_default()
}

fn events(api: &ApiServer, name: &str) -> Vec<(String, String, String)> {
    api.list(EVENTS, Some(NS))
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name)
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["reason"].as_str().unwrap_or("").to_string(),
                e["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn no_request_was_forbidden(api: &ApiServer) {
    let forbidden: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.code == 403)
        .collect();
    assert!(
        forbidden.is_empty(),
        "requests the chart's RBAC does not grant: {forbidden:#?}"
    );
}

/// A redis-server, the double with the chart's RBAC, and one operator that is ready.
struct Scenario {
    redis: RedisServer,
    api: ApiServer,
    op: Operator,
}

impl Scenario {
    /// With a redis-server whose admin is its `default` user (it survives a restart).
    async fn start(env: &[(&str, &str)]) -> Self {
        let redis = redis_with_password();
        let settings = default_user_settings(&redis);
        Self::with(redis, &settings, env).await
    }

    /// With a redis-server administered by an ACL user created at run time.
    async fn with_admin_user(env: &[(&str, &str)]) -> Self {
        let redis = redis_with_admin();
        let settings = settings(&redis);
        Self::with(redis, &settings, env).await
    }

    async fn with(redis: RedisServer, settings: &str, env: &[(&str, &str)]) -> Self {
        let api = ApiServer::start(Some(chart_rbac())).await;
        let mut op = Operator::start(&api, "op", settings, env);
        op.wait_ready(WAIT).await;
        Self { redis, api, op }
    }
}

/// Creates the FusionCache `name` in [`NS`] and waits until it is provisioned.
async fn provisioned(api: &ApiServer, name: &str, acl: bool) -> Value {
    api.create(FUSIONCACHES, NS, fusioncache(name, acl));
    wait_condition(api, name, "True", "Provisioned").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_create_update_repair_restart_relist_lose_and_delete() {
    let redis = redis_with_admin();
    let api = ApiServer::start(Some(chart_rbac())).await;
    let mut op = Operator::start(&api, "op-1", &settings(&redis), &[]);
    let t0 = Instant::now();
    let stage = |name: &str| eprintln!("[{:>6.2?}] {name}", t0.elapsed());

    // Ready once the first (empty) list is done.
    let time_to_ready = op.wait_ready(WAIT).await;
    eprintln!("time to /readyz 200: {time_to_ready:?}");

    // Create → Ready=True for generation 1, ConfigMap and Secret owned by it, the ACL user on Redis.
    let created = Instant::now();
    api.create(FUSIONCACHES, NS, fusioncache("products", true));
    let fc = wait_condition(&api, "products", "True", "Provisioned").await;
    eprintln!("time to Ready=True: {:?}", created.elapsed());
    assert_eq!(fc["status"]["observedGeneration"], 1);
    assert_eq!(
        fc["metadata"]["finalizers"],
        json!(["fusioncache.io/cleanup"])
    );
    let uid = fc["metadata"]["uid"].as_str().unwrap().to_string();
    let cm = api
        .get(CONFIGMAPS, NS, "products-fusioncache")
        .expect("ConfigMap");
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], uid.as_str());
    assert_eq!(data(&cm, env::REDIS_DATABASE).as_deref(), Some("0"));
    assert_eq!(
        data(&cm, env::KEY_PREFIX).as_deref(),
        Some("shop.products:")
    );
    let secret = api
        .get(SECRETS, NS, "products-fusioncache")
        .expect("Secret");
    let user = secret_text(&secret, env::REDIS_USERNAME).unwrap();
    let password = secret_text(&secret, env::REDIS_PASSWORD).unwrap();
    assert_eq!(user, "fc.shop.products");
    assert!(acl_users(&redis).contains(&user));
    let set = redis
        .command_as(&user, &password, &["SET", "shop.products:k", "v"])
        .unwrap();
    assert!(set.starts_with("+OK"), "{set}");
    assert!(
        !op.log().contains(&password),
        "the password is never logged"
    );
    assert!(
        op.log()
            .contains("reconcile{resource=shop/products generation=1}"),
        "the reconcile's log lines carry its span:\n{}",
        op.log()
    );

    stage("Spec update");
    // Spec update → a new observedGeneration and a re-rendered ConfigMap; the database is kept.
    api.edit(FUSIONCACHES, NS, "products", |fc| {
        fc["spec"]["environment"] = json!("staging")
    });
    let fc = wait_condition(&api, "products", "True", "Provisioned").await;
    assert_eq!(fc["status"]["observedGeneration"], 2);
    assert_eq!(fc["status"]["redisDatabase"], 0);
    let cm = api.get(CONFIGMAPS, NS, "products-fusioncache").unwrap();
    assert_eq!(
        data(&cm, env::CHANNEL_PREFIX).as_deref(),
        Some("shop.products.staging")
    );

    stage("A hand-edited ConfigMap");
    // A hand-edited ConfigMap is repaired; a key someone else added is left alone.
    api.edit(CONFIGMAPS, NS, "products-fusioncache", |cm| {
        cm["data"][env::REDIS_DATABASE] = json!("9");
        cm["data"]["EXTRA"] = json!("mine");
    });
    let cm = eventually(WAIT, "the ConfigMap repaired", || {
        let cm = api.get(CONFIGMAPS, NS, "products-fusioncache")?;
        (data(&cm, env::REDIS_DATABASE).as_deref() == Some("0")).then_some(cm)
    })
    .await;
    assert_eq!(data(&cm, "EXTRA").as_deref(), Some("mine"));

    stage("Restart:");
    // Restart: the new process gets the Lease at once (released on SIGTERM) and keeps the allocations.
    assert!(op.terminate().await, "clean exit on SIGTERM:\n{}", op.log());
    let lease = api
        .get(LEASES, OPERATOR_NAMESPACE, "fusioncache-operator")
        .expect("Lease");
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "released: {lease}"
    );
    let before = api.get(FUSIONCACHES, NS, "products").unwrap()["status"].clone();
    let mut op = Operator::start(&api, "op-2", &settings(&redis), &[]);
    op.wait_ready(WAIT).await;
    eventually(WAIT, "op-2 reconciles", || {
        api.requests()
            .iter()
            .any(|r| r.user == "op-2" && r.resource == "configmaps" && r.verb == "patch")
            .then_some(())
    })
    .await;
    let after = api.get(FUSIONCACHES, NS, "products").unwrap()["status"].clone();
    assert_eq!(after["redisDatabase"], before["redisDatabase"]);
    assert_eq!(after["channelPrefix"], before["channelPrefix"]);
    assert_eq!(after["keyPrefix"], before["keyPrefix"]);

    stage("The history is compacted");
    // The history is compacted and every watch closed: the operator relists (410 Gone) and still sees
    // new resources.
    api.expire_watches();
    api.create(FUSIONCACHES, NS, fusioncache("reviews", false));
    let reviews = wait_condition(&api, "reviews", "True", "Provisioned").await;
    assert_eq!(reviews["status"]["redisDatabase"], 1);
    assert_eq!(
        reviews["status"]["keyPrefix"], "shop.reviews:",
        "apps without ACL get a key prefix"
    );
    assert!(
        reviews["metadata"].get("finalizers").is_none(),
        "no finalizer without an ACL user"
    );
    // FusionCaches, ConfigMaps and Secrets: each watch resumed, got 410 Gone and relisted.
    eventually(WAIT, "every watch resumed into a 410 Gone", || {
        (api.gone() >= 3).then_some(())
    })
    .await;

    stage("`reviews` is made");
    // `reviews` is made to claim `products`' database (say, restored from a backup): the newer one loses
    // it, and with it its ConfigMap and Secret, so the two apps never share. (Creation times have a
    // one-second resolution; on a tie the namespace/name decides, and `products` sorts first too.)
    api.edit_status(FUSIONCACHES, NS, "reviews", |s| {
        s["redisDatabase"] = json!(0)
    });
    eventually(WAIT, "auto moves the loser to a free database", || {
        let cm = api.get(CONFIGMAPS, NS, "reviews-fusioncache")?;
        let fc = api.get(FUSIONCACHES, NS, "reviews")?;
        (fc["status"]["redisDatabase"] == 1
            && data(&cm, env::REDIS_DATABASE).as_deref() == Some("1"))
        .then_some(())
    })
    .await;
    api.edit(FUSIONCACHES, NS, "reviews", |fc| {
        fc["spec"]["redis"]["database"] = json!(0)
    });
    wait_condition(&api, "reviews", "False", "DatabaseConflict").await;
    // The event comes after the status write: that reconcile is over, its status cannot overwrite ours.
    eventually(WAIT, "the DatabaseConflict event", || {
        events(&api, "reviews")
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "DatabaseConflict")
            .then_some(())
    })
    .await;
    api.edit_status(FUSIONCACHES, NS, "reviews", |s| {
        s["redisDatabase"] = json!(0)
    });
    eprintln!(
        "DEBUG after edit: {}",
        api.get(FUSIONCACHES, NS, "reviews").unwrap()["status"]
    );
    eventually(WAIT, "the loser's objects deleted", || {
        (api.get(CONFIGMAPS, NS, "reviews-fusioncache").is_none()
            && api.get(SECRETS, NS, "reviews-fusioncache").is_none())
        .then_some(())
    })
    .await;
    // Even the field the "restore" wrote (another field manager's) is gone from the status.
    let reviews = eventually(WAIT, "the loser's status without allocations", || {
        let fc = api.get(FUSIONCACHES, NS, "reviews")?;
        fc["status"].get("redisDatabase").is_none().then_some(fc)
    })
    .await;
    assert_eq!(ready(&reviews), Some(("False", "DatabaseConflict")));
    assert!(
        reviews["status"].get("configMapName").is_none(),
        "{}",
        reviews["status"]
    );
    let cm = api.get(CONFIGMAPS, NS, "products-fusioncache").unwrap();
    assert_eq!(
        data(&cm, env::REDIS_DATABASE).as_deref(),
        Some("0"),
        "the winner keeps it"
    );

    stage("Delete →");
    // Delete → the ACL user is removed, the finalizer lifted, the owned objects collected.
    api.delete(FUSIONCACHES, NS, "products");
    eventually(WAIT, "products deleted", || {
        (api.get(FUSIONCACHES, NS, "products").is_none()
            && api.get(CONFIGMAPS, NS, "products-fusioncache").is_none()
            && api.get(SECRETS, NS, "products-fusioncache").is_none())
        .then_some(())
    })
    .await;
    assert!(!acl_users(&redis).contains(&user), "ACL user deleted");
    let released = events(&api, "products");
    assert!(
        released
            .iter()
            .any(|(t, r, n)| t == "Normal" && r == "Released" && n.contains(&user)),
        "{released:?}"
    );

    stage("RBAC: nothing");
    // No password in any log line, event, condition or status.
    let everything = format!(
        "{}{:?}{}",
        op.log(),
        api.list(EVENTS, None),
        serde_json::to_string(&api.list(FUSIONCACHES, None)).unwrap()
    );
    assert!(!everything.contains(&password), "a password leaked");

    // RBAC: nothing was refused, and every verb the chart grants was used.
    no_request_was_forbidden(&api);
    let granted = chart_rbac().grants();
    let used = api.authorized();
    let unused: BTreeSet<_> = granted.difference(&used).collect();
    let ungranted: BTreeSet<_> = used.difference(&granted).collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
    assert!(ungranted.is_empty(), "used but not granted: {ungranted:?}");
}

/// The user's credentials from the binding Secret of `name`.
fn credentials(api: &ApiServer, name: &str) -> Option<(String, String)> {
    let secret = api.get(SECRETS, NS, &format!("{name}-fusioncache"))?;
    Some((
        secret_text(&secret, env::REDIS_USERNAME)?,
        secret_text(&secret, env::REDIS_PASSWORD)?,
    ))
}

fn authenticates(redis: &RedisServer, user: &str, password: &str) -> bool {
    redis
        .command_as(user, password, &["PING"])
        .is_ok_and(|r| r.starts_with("+PONG"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_while_redis_is_down_says_why_and_the_annotation_lets_it_finish() {
    let Scenario {
        mut redis,
        api,
        op: _op,
    } = Scenario::start(&[]).await;
    provisioned(&api, "products", true).await;

    redis.stop();
    api.delete(FUSIONCACHES, NS, "products");
    let fc = wait_condition(&api, "products", "False", "CleanupFailed").await;
    let message = fc["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("fc.shop.products")
            && message.contains("fusioncache.io/skip-cleanup=true"),
        "{message}"
    );
    assert!(
        fc["metadata"]["deletionTimestamp"].is_string(),
        "the deletion waits"
    );
    eventually(WAIT, "a CleanupFailed event", || {
        events(&api, "products")
            .iter()
            .any(|(t, r, n)| t == "Warning" && r == "CleanupFailed" && n.contains("skip-cleanup"))
            .then_some(())
    })
    .await;

    // The escape hatch: the deletion finishes without Redis, and an event names what was left behind.
    api.edit(FUSIONCACHES, NS, "products", |fc| {
        fc["metadata"]["annotations"] = json!({ "fusioncache.io/skip-cleanup": "true" })
    });
    eventually(WAIT, "products deleted", || {
        api.get(FUSIONCACHES, NS, "products")
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        api.get(CONFIGMAPS, NS, "products-fusioncache").is_none(),
        "owned objects collected"
    );
    let skipped = events(&api, "products");
    assert!(
        skipped.iter().any(|(t, r, n)| t == "Warning"
            && r == "CleanupSkipped"
            && n.contains("ACL DELUSER fc.shop.products")),
        "{skipped:?}"
    );
    no_request_was_forbidden(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reconcile_is_ready_false_for_the_current_generation_until_it_recovers() {
    let Scenario {
        mut redis,
        api,
        op: _op,
    } = Scenario::start(&[]).await;
    redis.stop();
    api.create(FUSIONCACHES, NS, fusioncache("products", true));
    let fc = wait_condition(&api, "products", "False", "AclProvisioningFailed").await;
    assert_eq!(fc["status"]["observedGeneration"], 1);
    let message = fc["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("main"), "names the endpoint: {message}");
    assert_eq!(
        fc["status"]["redisDatabase"], 0,
        "the claim is recorded before anything uses it"
    );
    assert!(
        api.get(CONFIGMAPS, NS, "products-fusioncache").is_none(),
        "no object before the ACL user"
    );

    // A spec change while it still fails: the failure is reported for the new generation.
    api.edit(FUSIONCACHES, NS, "products", |fc| {
        fc["spec"]["environment"] = json!("staging")
    });
    let fc = wait_condition(&api, "products", "False", "AclProvisioningFailed").await;
    assert_eq!(fc["status"]["observedGeneration"], 2);

    redis.restart().unwrap();
    let fc = wait_condition(&api, "products", "True", "Provisioned").await;
    assert_eq!(fc["status"]["channelPrefix"], "shop.products.staging");
    let (user, password) = credentials(&api, "products").unwrap();
    assert!(authenticates(&redis, &user, &password));
    no_request_was_forbidden(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_users_are_provisioned_again_soon_after_a_redis_restart() {
    let Scenario { mut redis, api, op } = Scenario::start(&[]).await;
    provisioned(&api, "products", true).await;
    let (user, password) = credentials(&api, "products").unwrap();
    assert!(authenticates(&redis, &user, &password));
    // Idle: the reconcile its own status write triggers is done too (the next resync is 30 s away), so
    // only the watchdog can bring the user back.
    let mut runs = 0.0;
    for _ in 0..500 {
        let now = op
            .metric("fusioncache_operator_reconcile_runs_total")
            .await
            .unwrap_or(0.0);
        let idle = op.metric("fusioncache_operator_reconcile_in_flight").await == Some(0.0);
        if idle && now >= 2.0 && now == runs {
            break;
        }
        runs = now;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    redis.restart().unwrap();
    let restarted = Instant::now();
    eventually(WAIT, "the ACL user back", || {
        authenticates(&redis, &user, &password).then_some(())
    })
    .await;
    let took = restarted.elapsed();
    eprintln!("ACL user back {took:?} after the Redis restart");
    assert!(took < Duration::from_secs(30));
    let set = redis
        .command_as(&user, &password, &["SET", "shop.products:k", "v"])
        .unwrap();
    assert!(set.starts_with("+OK"), "{set}");
    assert_eq!(
        op.metric("fusioncache_operator_acl_users_restored_total")
            .await,
        Some(1.0),
        "the watchdog found it missing (the restart lost it)"
    );
    no_request_was_forbidden(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_binding_secret_rotates_the_password_and_the_old_one_works_for_the_grace_period(
) {
    let Scenario { redis, api, op } =
        Scenario::start(&[("FUSIONCACHE_OPERATOR_PASSWORD_GRACE", "4s")]).await;
    provisioned(&api, "products", true).await;
    let (user, old) = credentials(&api, "products").unwrap();

    api.delete(SECRETS, NS, "products-fusioncache");
    let new = eventually(WAIT, "a new password in a new Secret", || {
        credentials(&api, "products")
            .map(|(_, p)| p)
            .filter(|p| *p != old)
    })
    .await;
    let rotated = Instant::now();
    // Both work during the grace period: pods that still have the old Secret keep running.
    assert!(authenticates(&redis, &user, &new));
    assert!(
        authenticates(&redis, &user, &old),
        "the old password is still accepted"
    );
    assert!(
        rotated.elapsed() < Duration::from_secs(4),
        "checked within the grace period"
    );
    let fc = api.get(FUSIONCACHES, NS, "products").unwrap();
    assert_eq!(
        fc["status"]["retiringPasswords"].as_array().map(Vec::len),
        Some(1),
        "{}",
        fc["status"]
    );

    // Then the old one is dropped.
    eventually(WAIT, "the old password retired", || {
        (!authenticates(&redis, &user, &old)).then_some(())
    })
    .await;
    assert!(
        rotated.elapsed() >= Duration::from_secs(3),
        "not before the grace period ended"
    );
    assert!(authenticates(&redis, &user, &new));
    let fc = eventually(WAIT, "no retiring password left in the status", || {
        let fc = api.get(FUSIONCACHES, NS, "products")?;
        fc["status"]
            .get("retiringPasswords")
            .is_none()
            .then_some(fc)
    })
    .await;
    let status = fc["status"].to_string();
    assert!(
        !status.contains(&old) && !status.contains(&new),
        "no password in the status"
    );
    assert!(
        !op.log().contains(&old) && !op.log().contains(&new),
        "no password in the log"
    );
    no_request_was_forbidden(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_of_the_same_name_is_never_taken_over() {
    let scenario = Scenario::with_admin_user(&[]).await;
    let api = &scenario.api;
    let theirs = api.create(
        CONFIGMAPS,
        NS,
        json!({ "metadata": { "name": "products-fusioncache" }, "data": { "mine": "1" } }),
    );
    api.create(FUSIONCACHES, NS, fusioncache("products", false));
    let fc = wait_condition(api, "products", "False", "ObjectConflict").await;
    let message = fc["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("ConfigMap `products-fusioncache`"),
        "{message}"
    );
    let cm = api.get(CONFIGMAPS, NS, "products-fusioncache").unwrap();
    assert_eq!(cm, theirs, "left exactly as it was");
    assert!(api.get(SECRETS, NS, "products-fusioncache").is_none());

    // Deleting the FusionCache does not collect it; once the user removes theirs, the operator provisions.
    api.create(FUSIONCACHES, NS, fusioncache("other", false));
    wait_condition(api, "other", "True", "Provisioned").await;
    api.delete(FUSIONCACHES, NS, "products");
    assert_eq!(
        api.get(CONFIGMAPS, NS, "products-fusioncache").unwrap(),
        theirs
    );
    api.create(FUSIONCACHES, NS, fusioncache("products", false));
    wait_condition(api, "products", "False", "ObjectConflict").await;
    api.delete(CONFIGMAPS, NS, "products-fusioncache");
    wait_condition(api, "products", "True", "Provisioned").await;
    no_request_was_forbidden(api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_claim_never_hands_one_database_to_two_apps() {
    let scenario = Scenario::with_admin_user(&[]).await;
    let api = &scenario.api;
    // The first status writes of `alpha` fail, as a flaky apiserver would make them.
    api.fail_next("patch", "fusioncaches/status", Some("alpha"), 3, 500);
    api.create(FUSIONCACHES, NS, fusioncache("alpha", false));
    // `beta` comes while `alpha` is between its failed status write and the retry.
    eventually(WAIT, "alpha's status write failed", || {
        api.requests()
            .iter()
            .any(|r| r.resource == "fusioncaches/status" && r.code == 500)
            .then_some(())
    })
    .await;
    api.create(FUSIONCACHES, NS, fusioncache("beta", false));
    let alpha = wait_condition(api, "alpha", "True", "Provisioned").await;
    let beta = wait_condition(api, "beta", "True", "Provisioned").await;
    assert_ne!(
        alpha["status"]["redisDatabase"],
        beta["status"]["redisDatabase"]
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.resource == "fusioncaches/status" && r.code == 500),
        "the fault was hit"
    );

    // At no moment did two ConfigMaps point at one database (replaying every ConfigMap write).
    let mut databases: std::collections::BTreeMap<String, String> = Default::default();
    for (type_, cm) in api.history(CONFIGMAPS) {
        let name = cm["metadata"]["name"].as_str().unwrap().to_string();
        if type_ == "DELETED" {
            databases.remove(&name);
            continue;
        }
        if let Some(db) = data(&cm, env::REDIS_DATABASE) {
            databases.insert(name.clone(), db.clone());
            let sharing: Vec<_> = databases
                .iter()
                .filter(|(_, d)| **d == db)
                .map(|(n, _)| n)
                .collect();
            assert_eq!(sharing.len(), 1, "database {db} handed to {sharing:?}");
        }
    }
    no_request_was_forbidden(api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_the_standby_takes_over() {
    let redis = redis_with_admin();
    let api = ApiServer::start(Some(chart_rbac())).await;
    let mut a = Operator::start(&api, "replica-a", &settings(&redis), &[]);
    let mut b = Operator::start(&api, "replica-b", &settings(&redis), &[]);
    a.wait_ready(WAIT).await;
    b.wait_ready(WAIT).await;
    // Both are Ready (the standby watches), one leads.
    let leader = eventually(WAIT, "a leader", || {
        let lease = api.get(LEASES, OPERATOR_NAMESPACE, "fusioncache-operator")?;
        lease["spec"]["holderIdentity"].as_str().map(String::from)
    })
    .await;
    // Let the leader renew a few times: the standby must not take over meanwhile.
    let renewals = |api: &ApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.resource == "leases" && r.verb == "update" && r.user == leader)
            .count()
    };
    let start = renewals(&api);
    eventually(WAIT, "three renewals", || {
        (renewals(&api) >= start + 3).then_some(())
    })
    .await;
    let (leading, standing_by) = if leader == a.name {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(leading.is_leader().await);
    assert!(
        !standing_by.is_leader().await,
        "{}",
        standing_by.metrics().await
    );
    provisioned(&api, "products", true).await;
    let writers = |api: &ApiServer| -> BTreeSet<String> {
        api.requests()
            .iter()
            .filter(|r| {
                r.resource != "leases"
                    && matches!(r.verb.as_str(), "create" | "patch" | "update" | "delete")
            })
            .map(|r| r.user.clone())
            .collect()
    };
    assert_eq!(
        writers(&api),
        BTreeSet::from([leader.clone()]),
        "only the leader reconciles"
    );

    // The leader dies without releasing the Lease: the standby takes over once it expires.
    leading.kill();
    let killed = Instant::now();
    let new_leader = standing_by.name.clone();
    eventually(WAIT, "the standby leads", || {
        let lease = api.get(LEASES, OPERATOR_NAMESPACE, "fusioncache-operator")?;
        (lease["spec"]["holderIdentity"] == new_leader.as_str()).then_some(())
    })
    .await;
    eprintln!("failover took {:?} (lease duration 2 s)", killed.elapsed());
    api.create(FUSIONCACHES, NS, fusioncache("orders", true));
    wait_condition(&api, "orders", "True", "Provisioned").await;
    assert!(standing_by.is_leader().await);
    assert_eq!(writers(&api), BTreeSet::from([leader, new_leader]));
    no_request_was_forbidden(&api);
}

/// The chart rendered by helm (installed into .tools/ by `make deps`) with `args`.
fn render_chart(args: &[&str]) -> tempfile::NamedTempFile {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let helm = root.join(".tools/bin/helm");
    assert!(
        helm.exists(),
        "{} is missing: run `make deps` (scripts/install-chart-tools.sh)",
        helm.display()
    );
    let tools = root.join(".tools/helm");
    let out = std::process::Command::new(&helm)
        .args(["template", "fusioncache-operator"])
        .arg(root.join("charts/fusioncache-operator"))
        .args(["--namespace", OPERATOR_NAMESPACE])
        .args(args)
        .env("HELM_CACHE_HOME", tools.join("cache"))
        .env("HELM_CONFIG_HOME", tools.join("config"))
        .env("HELM_DATA_HOME", tools.join("data"))
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &out.stdout).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_scoped_mode_watches_only_its_namespaces_with_roles_only() {
    let rendered = render_chart(&["--set", "watchNamespaces={shop}"]);
    let rbac = Rbac::from_manifests(rendered.path(), OPERATOR_NAMESPACE, "fusioncache-operator");
    assert!(
        rbac.rules.iter().all(|r| r.namespace.is_some()),
        "Roles only: {rbac:?}"
    );
    let redis = redis_with_admin();
    let api = ApiServer::start(Some(rbac)).await;
    let mut op = Operator::start(
        &api,
        "op",
        &settings(&redis),
        &[("FUSIONCACHE_OPERATOR_WATCH_NAMESPACES", "shop")],
    );
    op.wait_ready(WAIT).await;
    provisioned(&api, "products", true).await;
    api.create(FUSIONCACHES, "elsewhere", fusioncache("intruder", false));
    api.create(FUSIONCACHES, NS, fusioncache("orders", false));
    wait_condition(&api, "orders", "True", "Provisioned").await;
    let intruder = api.get(FUSIONCACHES, "elsewhere", "intruder").unwrap();
    assert!(intruder.get("status").is_none(), "not watched: {intruder}");
    api.delete(FUSIONCACHES, NS, "products");
    eventually(WAIT, "products deleted", || {
        api.get(FUSIONCACHES, NS, "products")
            .is_none()
            .then_some(())
    })
    .await;
    no_request_was_forbidden(&api);
    let outside: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| !matches!(r.namespace.as_deref(), Some(NS) | Some(OPERATOR_NAMESPACE)))
        .collect();
    assert!(
        outside.is_empty(),
        "requests outside the watched namespaces: {outside:#?}"
    );
}
