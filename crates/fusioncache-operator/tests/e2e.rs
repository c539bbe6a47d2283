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
use common::{redis_with_admin, ADMIN, ADMIN_PASSWORD};
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
    let reviews = api.get(FUSIONCACHES, NS, "reviews").unwrap();
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
    // RBAC: nothing was refused, and every verb the chart grants was used.
    no_request_was_forbidden(&api);
    let granted = chart_rbac().grants();
    let used = api.authorized();
    let unused: BTreeSet<_> = granted.difference(&used).collect();
    let ungranted: BTreeSet<_> = used.difference(&granted).collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
    assert!(ungranted.is_empty(), "used but not granted: {ungranted:?}");
}
