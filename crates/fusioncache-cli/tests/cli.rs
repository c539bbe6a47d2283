//! The `fusioncache` binary end to end, against real redis-server and nats-server processes and library
//! nodes.

use std::process::{Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use fusioncache::backplane::nats::NatsBackplane;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::backplane::{Backplane, BackplaneEvent};
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::{EntryOptions, FusionCache};
use fusioncache_integration_tests::{acl_user, eventually, fast_redis_options, write_binding};
use fusioncache_testkit::{NatsServer, RedisServer};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long a test waits for an output line or a process.
const WAIT: Duration = Duration::from_secs(15);

/// The binary, with an environment holding only what a test gives it.
fn cli(envs: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fusioncache"));
    command
        .env_clear()
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run(envs: &[(&str, String)], args: &[&str]) -> Output {
    let output = tokio::time::timeout(WAIT, cli(envs).args(args).output())
        .await
        .expect("the command ends")
        .unwrap();
    eprintln!(
        "fusioncache {args:?}: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A running `fusioncache tail`, subscribed.
struct Tail {
    _child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Tail {
    async fn start(envs: &[(&str, String)], args: &[&str]) -> Tail {
        let mut child = cli(envs)
            .arg("tail")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = tokio::time::timeout(WAIT, async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                eprintln!("tail: {line}");
                if line.starts_with("subscribed to") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "tail subscribes");
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("tail: {line}");
            }
        });
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Tail {
            _child: child,
            stdout,
        }
    }

    async fn line(&mut self) -> String {
        let line = tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .expect("tail prints a line")
            .unwrap()
            .expect("tail is still running");
        eprintln!("tail> {line}");
        line
    }

    async fn json(&mut self) -> serde_json::Value {
        serde_json::from_str(&self.line().await).unwrap()
    }
}

fn redis_env(server: &RedisServer, cache: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FUSIONCACHE_CACHE_NAME", cache.to_string()),
        ("FUSIONCACHE_BACKPLANE", "redis".to_string()),
        ("FUSIONCACHE_REDIS_URL", server.url()),
    ]
}

fn nats_env(server: &NatsServer, cache: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FUSIONCACHE_CACHE_NAME", cache.to_string()),
        ("FUSIONCACHE_NATS_URL", server.url()),
    ]
}

async fn redis_node(url: &str, cache: &str) -> FusionCache<String> {
    let redis = RedisConnection::open(url).unwrap();
    let node = FusionCache::builder()
        .name(cache)
        .distributed_cache(RedisDistributedCache::new(redis.clone()))
        .backplane(RedisBackplane::new(redis))
        .build()
        .unwrap();
    assert!(node.wait_for_backplane(WAIT).await);
    node
}

async fn nats_node(url: &str, cache: &str) -> FusionCache<String> {
    let node = FusionCache::builder()
        .name(cache)
        .backplane(NatsBackplane::connect(url).await.unwrap())
        .build()
        .unwrap();
    assert!(node.wait_for_backplane(WAIT).await);
    node
}

/// A message as a .NET FusionCache node writes it, byte by byte (its instance id is a 32-digit GUID).
fn dotnet_message(source: &str, ticks: i64, action: u8, key: &str) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(source.len() as i32).to_le_bytes());
    b.extend_from_slice(source.as_bytes());
    b.extend_from_slice(&ticks.to_le_bytes());
    b.push(action);
    b.extend_from_slice(&(key.len() as i32).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.into()
}

const DOTNET_ID: &str = "0f8fad5bd9cb469fa16570867728950e";
/// 2026-12-01T10:00:00Z in ticks.
const DOTNET_TICKS: i64 = 639_317_160_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tail_prints_library_dotnet_and_malformed_messages_as_json() {
    let server = RedisServer::start().unwrap();
    let node = redis_node(&server.url(), "products").await;
    let mut tail = Tail::start(&redis_env(&server, "products"), &["--json"]).await;

    node.set("product:42", "Rust in Action".into())
        .await
        .unwrap();
    let line = tail.json().await;
    assert_eq!(line["status"], "ok", "{line}");
    assert_eq!(line["action"], "set");
    assert_eq!(line["key"], "product:42");
    assert_eq!(line["source"], node.instance_id());

    let raw = RedisBackplane::open(&server.url()).unwrap();
    let channel = node.channel().to_string();
    raw.publish(
        &channel,
        dotnet_message(DOTNET_ID, DOTNET_TICKS, 2, "product:7"),
    )
    .await
    .unwrap();
    let line = tail.json().await;
    assert_eq!(line["status"], "ok", "{line}");
    assert_eq!(line["source"], DOTNET_ID);
    assert_eq!(line["action"], "remove");
    assert_eq!(line["key"], "product:7");
    assert_eq!(line["timestamp"], "2026-12-01T10:00:00.000000Z");

    // Published raw, as a broken sender would.
    let reply = server
        .command(&["PUBLISH", &channel, "\u{0}\u{5}\u{0}"])
        .unwrap();
    assert_eq!(reply, ":2\r\n", "node and tail subscribed");
    let line = tail.json().await;
    assert_eq!(line["status"], "malformed", "{line}");
    assert!(
        line["error"].as_str().unwrap().contains("truncated"),
        "{line}"
    );
    assert_eq!(line["payload"], "000500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tail_prints_a_library_nodes_set_and_flags_a_malformed_payload() {
    let server = NatsServer::start().unwrap();
    let node = nats_node(&server.url(), "orders").await;
    let mut tail = Tail::start(&nats_env(&server, "orders"), &[]).await;

    node.set("order:1", "paid".into()).await.unwrap();
    let line = tail.line().await;
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields[1..],
        [node.instance_id(), "set", "order:1"],
        "{line}"
    );
    assert!(
        fields[0].ends_with('Z') && fields[0].contains('T'),
        "{line}"
    );

    let raw = NatsBackplane::connect(&server.url()).await.unwrap();
    let mut live = raw.subscribe("raw.sender").unwrap();
    let connected = tokio::time::timeout(WAIT, live.next()).await.unwrap();
    assert_eq!(connected, Some(BackplaneEvent::Connected));
    raw.publish(node.channel(), Bytes::from_static(b"\x00\xff\xff\xff\xff"))
        .await
        .unwrap();
    let line = tail.line().await;
    assert!(line.contains("  MALFORMED  "), "{line}");
    assert!(line.contains("negative length"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_remove_evicts_on_library_nodes_over_redis_and_nats() {
    let redis = RedisServer::start().unwrap();
    let nats = NatsServer::start().unwrap();
    let on_redis = redis_node(&redis.url(), "products").await;
    let on_nats = nats_node(&nats.url(), "products").await;
    for node in [&on_redis, &on_nats] {
        node.set("product:42", "v".into()).await.unwrap();
        node.set("product:43", "w".into()).await.unwrap();
    }
    for env in [redis_env(&redis, "products"), nats_env(&nats, "products")] {
        let out = run(&env, &["publish", "remove", "product:42"]).await;
        assert!(out.status.success());
    }
    for node in [&on_redis, &on_nats] {
        assert!(eventually(|| node.peek("product:42").is_none()).await);
        assert_eq!(node.peek("product:43").as_deref(), Some("w"));
    }
    // `clear`: the Rust nodes empty their L1.
    let out = run(&nats_env(&nats, "products"), &["clear"]).await;
    assert!(out.status.success());
    assert!(eventually(|| on_nats.peek("product:43").is_none()).await);
    assert_eq!(on_redis.peek("product:43").as_deref(), Some("w"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_through_a_service_binding_reports_round_trip_subscribers_and_redacted_config() {
    let server = RedisServer::start().unwrap();
    let password = "probe-s3cret-pw";
    acl_user(&server, "app", password);
    let node = redis_node(
        &format!("redis://app:{password}@127.0.0.1:{}", server.port()),
        "products",
    )
    .await;
    node.set("product:42", "v".into()).await.unwrap();
    let root = server.dir().join("bindings");
    let url = server.url();
    let binding_values = [
        ("cache-name", "products"),
        ("backplane", "redis"),
        ("url", url.as_str()),
        ("username", "app"),
        ("password", password),
    ];
    write_binding(&root.join("products-cache"), &binding_values);
    let env = [("SERVICE_BINDING_ROOT", root.display().to_string())];

    let out = run(&env, &["probe", "--count", "2"]).await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("round trip:  2 probes: min "), "{text}");
    assert!(
        text.contains("subscribers: 2 (this probe included)"),
        "{text}"
    );
    assert!(
        text.contains("channel:     products.Backplane:v2"),
        "{text}"
    );
    assert!(text.contains("password: <redacted>"), "{text}");
    assert!(!text.contains(password), "{text}");

    let out = run(&env, &["probe", "--json", "--count", "1"]).await;
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["subscribers"], 2, "{report}");
    assert_eq!(report["round_trip_ms"].as_array().unwrap().len(), 1);
    assert!(report["round_trip_median_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["configuration"]["redis"]["password"], "<redacted>");

    // The probes reached the node, which took them as valid probes and changed nothing.
    assert!(eventually(|| node.stats().backplane_probes >= 3).await);
    assert_eq!(node.stats().backplane_received, 0, "not notifications");
    let stats = node.stats();
    assert_eq!(
        (stats.backplane_malformed, stats.backplane_unsupported),
        (0, 0)
    );
    assert_eq!(node.peek("product:42").as_deref(), Some("v"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_over_nats_reports_a_round_trip_and_unknown_subscribers() {
    let server = NatsServer::start().unwrap();
    // A fusioncache.yaml named by --config, and a flag over it.
    let file = server.dir().join("fusioncache.yaml");
    let yaml = format!("cacheName: orders\nnats:\n  url: {}\n", server.url());
    std::fs::write(&file, yaml).unwrap();
    let config = file.display().to_string();
    let out = run(
        &[],
        &["probe", "--config", &config, "--cache-name", "invoices"],
    )
    .await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("channel:     invoices.Backplane:v2"),
        "{text}"
    );
    assert!(text.contains("round trip:  3 probes"), "{text}");
    assert!(text.contains("subscribers: unknown"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_a_clear_message() {
    // Nothing listens there.
    let port = fusioncache_testkit::free_port();
    let unreachable = [("FUSIONCACHE_REDIS_URL", format!("redis://127.0.0.1:{port}"))];
    let out = run(
        &unreachable,
        &["publish", "remove", "k", "--timeout", "500ms"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "could not reach the backplane (redis 127.0.0.1:{port} db 0)"
        )),
        "nothing is written before the transport answers: {err}"
    );

    let out = run(&[("FUSIONCACHE_BACKPLANE", "kafka".into())], &["tail"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FUSIONCACHE_BACKPLANE"));

    let out = run(&[], &["probe"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backplane configured"));

    let secret_url = [(
        "FUSIONCACHE_NATS_URL",
        "nats://app:hunter2-pw@host:port".to_string(),
    )];
    let out = run(&secret_url, &["publish", "expire", "k"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid NATS URL") && !err.contains("hunter2"),
        "{err}"
    );

    let out = run(&[], &["publish", "remove"]).await;
    assert_eq!(out.status.code(), Some(2), "a key is required");
}

/// A node with fail-safe on, its Redis L2 under `key_prefix` in database `db`, and a Redis backplane.
async fn l2_node(server: &RedisServer, db: u32, key_prefix: &str) -> FusionCache<String> {
    let redis = RedisConnection::open_with(&format!("{}/{db}", server.url()), fast_redis_options())
        .unwrap();
    let node = FusionCache::builder()
        .name("products")
        .default_entry_options(fail_safe())
        .distributed_cache(RedisDistributedCache::new(redis.clone()).key_prefix(key_prefix))
        .backplane(RedisBackplane::new(redis))
        .build()
        .unwrap();
    assert!(node.wait_for_backplane(WAIT).await);
    node
}

fn fail_safe() -> EntryOptions {
    EntryOptions::new()
        .duration(Duration::from_secs(600))
        .fail_safe(true)
}

/// A factory that fails: what `get_or_set` returns with it is the fail-safe fallback, if any.
async fn failing() -> Result<String, std::io::Error> {
    Err(std::io::Error::other("the database is down"))
}

/// A raw command on database `db`, with a connection of its own (not the library's).
async fn raw(server: &RedisServer, db: u32, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(format!("{}/{db}", server.url())).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

async fn exists(server: &RedisServer, db: u32, key: &str) -> bool {
    raw(server, db, &["EXISTS", key]).await == redis::Value::Int(1)
}

/// `redis_env` for a cache whose L2 lives in database `db` under `key_prefix`.
fn l2_env(server: &RedisServer, db: u32, key_prefix: &str) -> Vec<(&'static str, String)> {
    let mut env = redis_env(server, "products");
    env.push(("FUSIONCACHE_REDIS_DATABASE", db.to_string()));
    env.push(("FUSIONCACHE_KEY_PREFIX", key_prefix.to_string()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_remove_deletes_the_l2_entry_first_and_no_l2_sends_the_notification_only() {
    let server = RedisServer::start().unwrap();
    let node = l2_node(&server, 2, "shop:").await;
    node.set("product:42", "v".into()).await.unwrap();
    node.set("product:43", "w".into()).await.unwrap();
    raw(&server, 2, &["SET", "billing:invoice:1", "paid"]).await;
    assert!(exists(&server, 2, "shop:product:42").await);
    let env = l2_env(&server, 2, "shop:");

    let out = run(&env, &["publish", "remove", "product:42"]).await;
    assert!(out.status.success());
    assert!(
        !exists(&server, 2, "shop:product:42").await,
        "the L2 entry is deleted, under the key prefix, in the configured database"
    );
    assert!(eventually(|| node.peek("product:42").is_none()).await);
    assert_eq!(node.get("product:42").await, None, "nothing left to reload");

    let out = run(&env, &["publish", "--no-l2", "remove", "product:43"]).await;
    assert!(out.status.success());
    assert!(eventually(|| node.peek("product:43").is_none()).await);
    assert!(exists(&server, 2, "shop:product:43").await, "L2 untouched");
    assert_eq!(node.get("product:43").await.as_deref(), Some("w"));

    assert!(exists(&server, 2, "billing:invoice:1").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_set_makes_nodes_reload_what_a_writer_put_in_l2() {
    let server = RedisServer::start().unwrap();
    let node = l2_node(&server, 0, "shop:").await;
    node.set("product:42", "old".into()).await.unwrap();
    // A writer that updates L2 and tells no one (a batch job, say).
    let redis = RedisConnection::open(&server.url()).unwrap();
    let writer: FusionCache<String> = FusionCache::builder()
        .name("products")
        .distributed_cache(RedisDistributedCache::new(redis).key_prefix("shop:"))
        .build()
        .unwrap();
    writer.set("product:42", "new".into()).await.unwrap();
    assert_eq!(node.peek("product:42").as_deref(), Some("old"));

    let out = run(
        &l2_env(&server, 0, "shop:"),
        &["publish", "set", "product:42"],
    )
    .await;
    assert!(out.status.success());
    assert!(eventually(|| node.peek("product:42").is_none()).await);
    assert_eq!(node.get("product:42").await.as_deref(), Some("new"));
    assert!(
        exists(&server, 0, "shop:product:42").await,
        "set has no L2 step"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_expires_everything_and_clear_remove_leaves_nothing_and_unrelated_keys_survive() {
    let server = RedisServer::start().unwrap();
    let node = l2_node(&server, 0, "shop:").await;
    node.set("k", "v".into()).await.unwrap();
    server
        .command(&["SET", "billing:invoice:1", "paid"])
        .unwrap();
    // The key prefix from the flag this time.
    let env = redis_env(&server, "products");
    let clear = ["--key-prefix", "shop:", "clear"];

    let out = run(&env, &clear).await;
    assert!(out.status.success());
    assert!(eventually(|| node.peek("k").is_none()).await);
    assert_eq!(node.get("k").await, None, "plain reads see nothing");
    assert_eq!(
        node.get_or_set("k", failing).await.unwrap(),
        "v",
        "fail-safe still has it"
    );
    assert!(
        exists(&server, 0, "shop:__fc:t:*").await,
        "the expire-all timestamp"
    );
    let late = l2_node(&server, 0, "shop:").await;
    assert_eq!(late.get("k").await, None, "a node started later honours it");
    node.set("after", "x".into()).await.unwrap();
    assert_eq!(
        late.get("after").await.as_deref(),
        Some("x"),
        "written after"
    );

    let out = run(&env, &[&clear[..], &["--remove"]].concat()).await;
    assert!(out.status.success());
    for n in [&node, &late] {
        assert!(eventually(|| n.peek("after").is_none()).await);
        for key in ["k", "after"] {
            assert!(
                n.get_or_set(key, failing).await.is_err(),
                "{key}: nothing, even with fail-safe"
            );
        }
    }
    assert!(
        exists(&server, 0, "shop:__fc:t:!").await,
        "the remove-all timestamp"
    );
    assert_eq!(
        server.command(&["GET", "billing:invoice:1"]).unwrap(),
        "$4\r\npaid\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_by_tag_removes_tagged_entries_on_nodes_and_for_nodes_started_later() {
    let server = RedisServer::start().unwrap();
    let node = l2_node(&server, 0, "").await;
    let tagged = |tags: &[&str]| fail_safe().tags(tags.iter().copied());
    node.set_with("a", "1".into(), &tagged(&["category:7", "top"]))
        .await
        .unwrap();
    node.set_with("c", "3".into(), &tagged(&["category:8"]))
        .await
        .unwrap();
    node.set("untagged", "2".into()).await.unwrap();
    let env = redis_env(&server, "products");

    let out = run(&env, &["remove-by-tag", "category:7"]).await;
    assert!(out.status.success());
    assert!(eventually(|| node.peek("a").is_none()).await);
    assert_eq!(node.get("a").await, None);
    assert!(exists(&server, 0, "__fc:t:category:7").await);
    let late = l2_node(&server, 0, "").await;
    assert_eq!(late.get("a").await, None, "a node started later honours it");
    for n in [&node, &late] {
        assert_eq!(n.get("untagged").await.as_deref(), Some("2"));
        assert_eq!(n.get("c").await.as_deref(), Some("3"));
    }

    let out = run(&env, &["remove-by-tag", "nothing-has-this", "category:8"]).await;
    assert!(out.status.success());
    for n in [&node, &late] {
        assert!(eventually(|| n.peek("c").is_none()).await);
        assert_eq!(n.get("untagged").await.as_deref(), Some("2"));
    }

    let out = run(&env, &["remove-by-tag", ""]).await;
    assert_eq!(out.status.code(), Some(2), "an empty tag is refused");
}

/// A listening socket nobody serves: connections are accepted by the kernel and never answered (a
/// stalled or black-holed server).
fn black_hole() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_silent_l2_fails_publish_with_exit_1_and_no_secret() {
    let nats = NatsServer::start().unwrap();
    let node = nats_node(&nats.url(), "products").await;
    node.set("k", "v".into()).await.unwrap();
    let password = "l2-s3cret-pw";
    let env_with_l2 = |port: u16| {
        let mut env = nats_env(&nats, "products");
        env.push(("FUSIONCACHE_BACKPLANE", "nats".into()));
        env.push((
            "FUSIONCACHE_REDIS_URL",
            format!("redis://app:{password}@127.0.0.1:{port}"),
        ));
        env.push(("FUSIONCACHE_REDIS_PASSWORD", password.into()));
        env
    };

    let refused = fusioncache_testkit::free_port();
    let silent_server = black_hole();
    let silent = silent_server.local_addr().unwrap().port();
    let cases = [
        (
            refused,
            &["publish", "remove", "k"][..],
            format!("the L2 step on redis 127.0.0.1:{refused} db 0 failed, so no notification"),
        ),
        (
            silent,
            &["publish", "expire", "k", "--timeout", "500ms"][..],
            format!("did not complete within 500ms: L2 step on redis 127.0.0.1:{silent} db 0"),
        ),
    ];
    for (port, args, says) in cases {
        let out = run(&env_with_l2(port), args).await;
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&says), "{err}");
        assert!(!err.contains(password), "{err}");
    }

    // An in-process L2 cannot be reached from outside: a configuration error, nothing sent.
    let mut in_process = nats_env(&nats, "products");
    in_process.push(("FUSIONCACHE_DISTRIBUTED_CACHE", "memory".into()));
    let out = run(&in_process, &["clear"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-l2"));

    // The notification alone still goes through.
    let out = run(
        &env_with_l2(refused),
        &["publish", "--no-l2", "remove", "k"],
    )
    .await;
    assert!(out.status.success());
    assert!(eventually(|| node.peek("k").is_none()).await);
}
