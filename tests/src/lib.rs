//! Shared helpers of the integration tests: bounded waits and nodes wired to real servers.

use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::nats::NatsBackplane;
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::{RedisConnection, RedisOptions};
use fusioncache::{EntryOptions, FusionCache};

/// How long a test waits for a condition before failing.
pub const WAIT: Duration = Duration::from_secs(15);

/// Polls `cond` every few milliseconds until it holds or `WAIT` passes; returns whether it held.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Like [`eventually`], for a condition that needs to await.
pub async fn eventually_async<F, Fut>(mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Redis options that notice an outage quickly (tests kill servers).
pub fn fast_redis_options() -> RedisOptions {
    RedisOptions {
        connection_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_millis(1000),
        reconnect_retries: 1,
        max_reconnect_delay: Duration::from_millis(200),
        health_check_interval: Duration::from_millis(500),
        ..RedisOptions::default()
    }
}

/// A node with its own Redis connections (L2 on `url`, pub/sub backplane on the same server).
pub fn redis_node(url: &str, name: &str, options: EntryOptions) -> FusionCache<String> {
    let redis = RedisConnection::open_with(url, fast_redis_options()).unwrap();
    FusionCache::builder()
        .name(name)
        .default_entry_options(options)
        .distributed_cache(RedisDistributedCache::new(redis.clone()))
        .backplane(RedisBackplane::new(redis))
        .build()
        .unwrap()
}

/// A node on a NATS backplane, optionally with a Redis L2.
pub async fn nats_node(
    nats_url: &str,
    redis_url: Option<&str>,
    name: &str,
    options: EntryOptions,
) -> FusionCache<String> {
    let backplane = NatsBackplane::connect(nats_url).await.unwrap();
    let mut builder = FusionCache::builder()
        .name(name)
        .default_entry_options(options)
        .shared_backplane(Arc::new(backplane));
    if let Some(url) = redis_url {
        let redis = RedisConnection::open_with(url, fast_redis_options()).unwrap();
        builder = builder.distributed_cache(RedisDistributedCache::new(redis));
    }
    builder.build().unwrap()
}

/// Shorthand for an owned string.
pub fn s(v: &str) -> String {
    v.to_string()
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with the openssl CLI.
pub fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=fusioncache-test-ca",
        "-days",
        "1",
    ]);
    // Each certificate is X.509 v3 (an extension file): rustls refuses v1 client certificates.
    let issue = |name: &str, subject: &str, extension: &str| {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&ext), format!("{extension}\n")).unwrap();
        run(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    };
    issue("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1");
    issue(
        "client",
        "/CN=fusioncache-test-client",
        "extendedKeyUsage=clientAuth",
    );
}

/// Writes a Service Binding directory as the operator's Secret is mounted: `type` and `provider`, then one
/// file per `(name, value)`.
pub fn write_binding(dir: &std::path::Path, values: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    let identity = [
        ("type", "fusioncache"),
        ("provider", "fusioncache-operator"),
    ];
    for (file, value) in identity.iter().chain(values) {
        std::fs::write(dir.join(file), value).unwrap();
    }
}

/// Creates, or resets, the ACL user `user` with the one password `password`, allowed every key, channel
/// and command.
pub fn acl_user(server: &fusioncache_testkit::RedisServer, user: &str, password: &str) {
    let pass = format!(">{password}");
    let args = [
        "ACL", "SETUSER", user, "reset", "on", &pass, "~*", "&*", "+@all",
    ];
    let reply = server.command(&args).unwrap();
    assert_eq!(reply, "+OK\r\n", "ACL SETUSER {user}");
}
