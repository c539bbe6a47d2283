//! No secret (password, token, seed, URL userinfo) in the `Debug` output of any configuration or connection
//! type of the library, nor in the errors it returns for bad configuration.
#![cfg(all(feature = "config", feature = "redis", feature = "nats"))]

use fusioncache::backplane::nats::{NatsBackplane, NatsOptions};
use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::config::{FusionCacheConfig, NatsConfig, RedisConfig};
use fusioncache::redis::{RedisConnection, RedisOptions};
use fusioncache::FusionCache;

const PASSWORD: &str = "pw-hunter2";
const URL_USER: &str = "url-user-7";
const URL_PASSWORD: &str = "url-pass-7";
const TOKEN: &str = "tok-9f8e7d";
const SEED: &str = "SUAMSEEDSEEDSEED";

/// Fails when `text` shows any of the secrets above, and when it is not the kind of text it should be
/// (so that an empty `Debug` would not pass).
fn assert_hidden(what: &str, text: &str, must_show: &str) {
    for secret in [PASSWORD, URL_USER, URL_PASSWORD, TOKEN, SEED] {
        assert!(
            !text.contains(secret),
            "{what} shows the secret {secret:?}: {text}"
        );
    }
    assert!(
        text.contains(must_show),
        "{what} should show {must_show:?}: {text}"
    );
}

/// Both `Debug` forms, one line and pretty.
fn assert_debug_hidden(what: &str, value: &impl std::fmt::Debug, must_show: &str) {
    assert_hidden(what, &format!("{value:?}"), must_show);
    assert_hidden(what, &format!("{value:#?}"), must_show);
}

fn redis_url() -> String {
    format!("redis://{URL_USER}:{URL_PASSWORD}@127.0.0.1:1/0")
}

fn nats_urls() -> String {
    format!("nats://{URL_USER}:{URL_PASSWORD}@127.0.0.1:1,nats://{TOKEN}@127.0.0.1:2")
}

fn config() -> FusionCacheConfig {
    FusionCacheConfig {
        cache_name: Some("products".into()),
        redis: Some(RedisConfig {
            url: Some(redis_url()),
            database: Some(3),
            username: Some("app".into()),
            password: Some(PASSWORD.into()),
        }),
        nats: Some(NatsConfig {
            url: Some(nats_urls()),
            credentials: Some("/bindings/cache/nats.creds".into()),
        }),
        ..FusionCacheConfig::default()
    }
}

#[test]
fn configuration_types_hide_passwords_and_userinfo() {
    let config = config();
    assert_debug_hidden("RedisConfig", config.redis.as_ref().unwrap(), "<redacted>");
    assert_debug_hidden(
        "RedisConfig",
        config.redis.as_ref().unwrap(),
        "127.0.0.1:1/0",
    );
    assert_debug_hidden("NatsConfig", config.nats.as_ref().unwrap(), "127.0.0.1:2");
    assert_debug_hidden("FusionCacheConfig", &config, "<redacted>");
    assert_debug_hidden("FusionCacheConfig", &config, "nats.creds");
    let shown = config.redacted();
    assert_hidden(
        "FusionCacheConfig::redacted",
        &shown.to_yaml(),
        "127.0.0.1:1",
    );
    assert_debug_hidden("FusionCacheConfig::redacted", &shown, "<redacted>");
}

#[test]
fn nats_options_hide_token_seed_password_and_userinfo() {
    let options = NatsOptions::new(nats_urls())
        .token(TOKEN)
        .nkey(SEED)
        .user_and_password("app", PASSWORD)
        .credentials_file("/bindings/cache/nats.creds");
    assert_debug_hidden("NatsOptions", &options, "<redacted>");
    assert_debug_hidden("NatsOptions", &options, "127.0.0.1:2");
}

#[tokio::test(flavor = "current_thread")]
async fn connections_and_backplanes_hide_credentials() {
    let conn = RedisConnection::open(&redis_url()).unwrap();
    assert_debug_hidden("RedisConnection", &conn, "127.0.0.1");
    assert_hidden("RedisConnection::endpoint", conn.endpoint(), "127.0.0.1");
    let parts = RedisConnection::open_parts(
        "redis://127.0.0.1:1",
        Some(2),
        Some(URL_USER),
        Some(PASSWORD),
        RedisOptions::default(),
    )
    .unwrap();
    assert_debug_hidden("RedisConnection (parts)", &parts, "127.0.0.1");
    assert_debug_hidden("RedisBackplane", &RedisBackplane::new(conn), "127.0.0.1");
    let nats = NatsBackplane::connect_with(NatsOptions::new(nats_urls()).token(TOKEN))
        .await
        .unwrap();
    assert_debug_hidden("NatsBackplane", &nats, "NatsBackplane");
}

#[tokio::test(flavor = "current_thread")]
async fn configuration_errors_hide_secrets() {
    // A URL of the wrong scheme, quoted back by validation.
    let mut bad_scheme = config();
    bad_scheme.redis.as_mut().unwrap().url =
        Some(format!("http://{URL_USER}:{URL_PASSWORD}@r:6379"));
    let err = bad_scheme.validate().unwrap_err();
    assert_hidden("ConfigError (scheme)", &err.to_string(), "redis.url");
    assert_debug_hidden("ConfigError (scheme)", &err, "redis.url");

    // A secret written unquoted in YAML: the parser would echo a number back.
    let err = FusionCacheConfig::from_yaml("redis:\n  password: 918273645\n").unwrap_err();
    assert!(!err.to_string().contains("918273645"), "{err}");
    assert!(err.to_string().contains("quoted string"), "{err}");

    // URLs the transports reject, through the injected-configuration path.
    for (yaml, must_show) in [
        (
            format!(
                "backplane: redis\nredis:\n  url: redis://{URL_USER}:{URL_PASSWORD}@r:port\n  password: {PASSWORD}\n"
            ),
            "redis.url",
        ),
        (
            format!("backplane: nats\nnats:\n  url: nats://{URL_USER}:{URL_PASSWORD}@n:port\n"),
            "nats://<redacted>@n:port",
        ),
        (
            format!("backplane: nats\nnats:\n  url: nats://{TOKEN}@n:port\n"),
            "nats://<redacted>@n:port",
        ),
    ] {
        let config = FusionCacheConfig::from_yaml(&yaml).unwrap();
        let err = match FusionCache::<String>::builder().with_config(&config).await {
            Ok(_) => panic!("{yaml}: an invalid URL was accepted"),
            Err(e) => e,
        };
        assert_hidden("Error (transport URL)", &err.to_string(), must_show);
        assert_debug_hidden("Error (transport URL)", &err, must_show);
    }
}
