//! The NATS backplane against real `nats-server` processes (single servers and a routed cluster).

use std::sync::Arc;

use fusioncache::backplane::nats::{NatsBackplane, NatsOptions};
use fusioncache::{BackplaneState, EntryOptions, Error, FusionCache};
use fusioncache_integration_tests::{eventually, eventually_async, nats_node, s, WAIT};
use fusioncache_testkit::{NatsCluster, NatsServer, RedisServer};

async fn connected(nodes: &[&FusionCache<String>]) {
    for n in nodes {
        assert!(
            n.wait_for_backplane(WAIT).await,
            "backplane of {} did not connect",
            n.instance_id()
        );
    }
}

fn local() -> EntryOptions {
    EntryOptions::new().skip_backplane_notifications(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_on_set_remove_expire() {
    let server = NatsServer::start().unwrap();
    let opts = EntryOptions::new().fail_safe(true);
    let a = nats_node(&server.url(), None, "products", opts.clone()).await;
    let b = nats_node(&server.url(), None, "products", opts.clone()).await;
    let c = nats_node(&server.url(), None, "products", opts.clone()).await;
    connected(&[&a, &b, &c]).await;

    for n in [&b, &c] {
        n.set_with("k", s("old"), &local()).await.unwrap();
    }
    a.set("k", s("new")).await.unwrap();
    assert!(
        eventually(|| b.peek("k").is_none() && c.peek("k").is_none()).await,
        "set: no L2, so marked stale"
    );

    for n in [&a, &c] {
        n.set_with("e", s("v"), &local()).await.unwrap();
    }
    b.expire("e").await.unwrap();
    assert!(
        eventually(|| a.peek("e").is_none() && c.peek("e").is_none()).await,
        "expire"
    );

    for n in [&a, &b] {
        n.set_with("r", s("v"), &local()).await.unwrap();
    }
    c.remove("r").await.unwrap();
    assert!(
        eventually(|| a.l1_entry_count() <= 2 && a.peek("r").is_none() && b.peek("r").is_none())
            .await,
        "remove"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_prefixes_isolate_caches_on_one_server() {
    let server = NatsServer::start().unwrap();
    let node = |prefix: &'static str| {
        let url = server.url();
        async move {
            let bp = NatsBackplane::connect(&url).await.unwrap();
            FusionCache::<String>::builder()
                .name("products")
                .channel_prefix(prefix)
                .backplane(bp)
                .build()
                .unwrap()
        }
    };
    let (dev1, dev2, prod) = (
        node("dev.products").await,
        node("dev.products").await,
        node("prod.products").await,
    );
    connected(&[&dev1, &dev2, &prod]).await;
    assert_eq!(prod.channel(), "prod.products.Backplane:v2");
    for n in [&dev2, &prod] {
        n.set_with("k", s("v"), &local()).await.unwrap();
    }
    dev1.remove("k").await.unwrap();
    assert!(eventually(|| dev2.peek("k").is_none()).await);
    assert_eq!(prod.peek("k"), Some(s("v")));
    assert_eq!(prod.stats().backplane_received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run_leaves_no_stale_read_after_reconnect() {
    let mut server = NatsServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let opts = EntryOptions::new();
    let a = nats_node(&server.url(), Some(&redis.url()), "products", opts.clone()).await;
    let b = nats_node(&server.url(), Some(&redis.url()), "products", opts.clone()).await;
    connected(&[&a, &b]).await;
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")));

    server.stop();
    assert!(
        eventually(|| a.backplane_state() == BackplaneState::Disconnected
            && b.backplane_state() == BackplaneState::Disconnected)
        .await
    );
    a.set("k", s("v2")).await.unwrap();
    assert!(
        eventually(|| a.pending_recovery() == 1).await,
        "queued while NATS is down"
    );
    // While the backplane is down, b does not trust its L1: it reads through to L2.
    assert_eq!(b.get("k").await, Some(s("v2")));

    server.restart().unwrap();
    connected(&[&a, &b]).await;
    assert!(eventually(|| a.pending_recovery() == 0).await);
    assert_eq!(b.get("k").await, Some(s("v2")));
    a.set("k", s("v3")).await.unwrap();
    assert!(
        eventually(|| b.peek("k") == Some(s("v3"))).await,
        "notifications flow again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_stays_coherent_when_one_server_is_killed() {
    let mut cluster = NatsCluster::start(3).unwrap();
    let urls = cluster.urls();
    let redis = RedisServer::start().unwrap();
    // Each node prefers a different server but knows them all.
    let mut nodes = Vec::new();
    for i in 0..3 {
        let order: Vec<String> = (0..3).map(|j| urls[(i + j) % 3].clone()).collect();
        let bp = NatsBackplane::connect_with(NatsOptions::new(order.join(",")))
            .await
            .unwrap();
        let redis = fusioncache::redis::RedisConnection::open(&redis.url()).unwrap();
        nodes.push(
            FusionCache::<String>::builder()
                .name("products")
                .distributed_cache(fusioncache::l2::redis::RedisDistributedCache::new(redis))
                .shared_backplane(Arc::new(bp))
                .build()
                .unwrap(),
        );
    }
    let refs: Vec<_> = nodes.iter().collect();
    connected(&refs).await;
    nodes[0].set("k", s("v1")).await.unwrap();
    for n in &nodes[1..] {
        assert_eq!(n.get("k").await, Some(s("v1")));
    }
    nodes[0].set("k", s("v2")).await.unwrap();
    assert!(eventually(|| nodes.iter().all(|n| n.peek("k") == Some(s("v2")))).await);

    cluster.server_mut(1).stop();
    connected(&refs).await;
    // Writes from every node keep reaching every other node.
    for (i, writer) in nodes.iter().enumerate() {
        let value = format!("from-{i}");
        writer.set("k", value.clone()).await.unwrap();
        assert!(
            eventually_async(|| async {
                nodes.iter().all(|n| n.peek("k").is_none_or(|v| v == value))
            })
            .await,
            "a node kept an older value after node {i}'s write"
        );
        for n in &nodes {
            assert_eq!(n.get("k").await, Some(value.clone()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_l2_and_nats_backplane_work_together() {
    let server = NatsServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let a = nats_node(
        &server.url(),
        Some(&redis.url()),
        "products",
        EntryOptions::new(),
    )
    .await;
    let b = nats_node(
        &server.url(),
        Some(&redis.url()),
        "products",
        EntryOptions::new(),
    )
    .await;
    connected(&[&a, &b]).await;
    a.set("k", s("v1")).await.unwrap();
    assert_eq!(b.get("k").await, Some(s("v1")), "from Redis");
    a.set("k", s("v2")).await.unwrap();
    assert!(
        eventually(|| b.peek("k") == Some(s("v2"))).await,
        "told by NATS, refreshed from Redis"
    );
    a.remove("k").await.unwrap();
    assert!(eventually(|| b.peek("k").is_none()).await);
    assert_eq!(b.get("k").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_subject_names_are_rejected_at_build_time() {
    let server = NatsServer::start().unwrap();
    let bp = Arc::new(NatsBackplane::connect(&server.url()).await.unwrap());
    for name in ["my cache", "orders.*", "a>b", "trailing."] {
        let err = FusionCache::<String>::builder()
            .name(name)
            .shared_backplane(bp.clone())
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Backplane(_)), "{name}: {err}");
        assert!(
            err.to_string().contains("not a valid NATS subject"),
            "{name}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_user_password_token_and_nkey() {
    let with_user = NatsServer::start_with_args(&["--user", "app", "--pass", "s3cret"]).unwrap();
    let url = format!("nats://app:s3cret@127.0.0.1:{}", with_user.port());
    let a = nats_node(&url, None, "auth", EntryOptions::new()).await;
    connected(&[&a]).await;
    let opts = NatsOptions::new(with_user.url()).user_and_password("app", "s3cret");
    let b = FusionCache::<String>::builder()
        .name("auth")
        .backplane(NatsBackplane::connect_with(opts).await.unwrap())
        .build()
        .unwrap();
    connected(&[&b]).await;
    b.set_with("k", s("v"), &local()).await.unwrap();
    a.remove("k").await.unwrap();
    assert!(eventually(|| b.peek("k").is_none()).await);

    let with_token = NatsServer::start_with_args(&["--auth", "t0ken"]).unwrap();
    let t = FusionCache::<String>::builder()
        .backplane(
            NatsBackplane::connect_with(NatsOptions::new(with_token.url()).token("t0ken"))
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    connected(&[&t]).await;

    let user_key = nkeys::KeyPair::new_user();
    let conf = format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
        user_key.public_key()
    );
    let with_nkey = NatsServer::start_with_config(&conf).unwrap();
    let seed = user_key.seed().unwrap();
    let n = FusionCache::<String>::builder()
        .backplane(
            NatsBackplane::connect_with(NatsOptions::new(with_nkey.url()).nkey(seed))
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    connected(&[&n]).await;

    // A wrong password never connects (and says so through its state, never a panic).
    let wrong = FusionCache::<String>::builder()
        .backplane(
            NatsBackplane::connect_with(
                NatsOptions::new(with_user.url()).user_and_password("app", "nope"),
            )
            .await
            .unwrap(),
        )
        .build()
        .unwrap();
    assert!(
        !wrong
            .wait_for_backplane(std::time::Duration::from_millis(500))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_tls_with_a_custom_ca() {
    let dir = std::env::temp_dir().join(format!("fusioncache-nats-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    fusioncache_integration_tests::make_certificates(&dir);
    let path = |f: &str| dir.join(f).display().to_string();
    let server = NatsServer::start_with_args(&[
        "--tls",
        "--tlscert",
        &path("server.crt"),
        "--tlskey",
        &path("server.key"),
    ])
    .unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port());
    let node = || async {
        let options = NatsOptions::new(&url).tls(Some(dir.join("ca.crt")));
        FusionCache::<String>::builder()
            .name("tls")
            .backplane(NatsBackplane::connect_with(options).await.unwrap())
            .build()
            .unwrap()
    };
    let (a, b) = (node().await, node().await);
    connected(&[&a, &b]).await;
    b.set_with("k", s("old"), &local()).await.unwrap();
    a.set("k", s("new")).await.unwrap();
    assert!(
        eventually(|| b.peek("k").is_none()).await,
        "notified over TLS"
    );

    // Without the CA the server is not trusted: never connected, never a panic.
    let untrusted = FusionCache::<String>::builder()
        .backplane(
            NatsBackplane::connect_with(NatsOptions::new(&url))
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    assert!(
        !untrusted
            .wait_for_backplane(std::time::Duration::from_millis(500))
            .await
    );
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_means_the_subscription_already_receives() {
    let server = NatsServer::start().unwrap();
    let publisher = NatsBackplane::connect(&server.url()).await.unwrap();
    for round in 0..10 {
        let node = FusionCache::<String>::builder()
            .name("ready")
            .backplane(NatsBackplane::connect(&server.url()).await.unwrap())
            .build()
            .unwrap();
        connected(&[&node]).await;
        node.set_with("k", s("v"), &local()).await.unwrap();
        // Published the moment the node says it is connected: it must arrive.
        let msg = fusioncache::backplane::BackplaneMessage::new(
            "other-node",
            fusioncache::backplane::now_ticks(),
            fusioncache::backplane::Action::Remove,
            "k",
        );
        publisher
            .client()
            .publish(node.channel().to_string(), msg.encode())
            .await
            .unwrap();
        assert!(
            eventually(|| node.peek("k").is_none()).await,
            "round {round}: the notification was lost"
        );
    }
}
