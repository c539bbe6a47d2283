//! Redis ACL users, one per FusionCache with `spec.redis.acl: true`.
//!
//! Least privilege: the user may run exactly the commands the library sends
//! ([`fusioncache::redis::ACL_COMMANDS`], plus [`fusioncache::redis::ACL_SELECT`] only when its database is not
//! 0), only on keys under the cache's key prefix (`~{keyPrefix}*`) and only on its own backplane channel
//! (`&{channel}`: the exact channel, so a prefix that extends another one, `shop.a` and `shop.a.b`, grants
//! nothing of the other). Everything else is denied: `FUNCTION`, `FCALL`, `EVAL`, `SCRIPT FLUSH`, `CLIENT TRACKING`,
//! `SCAN`, `KEYS`, `RANDOMKEY`, `PUBSUB CHANNELS`, `FLUSHALL`, `CONFIG`, `ACL`, `MONITOR`, … A Redis database
//! index is no isolation (ACLs cannot restrict `SELECT` to one index): this is.
//!
//! The user is written with one `ACL SETUSER <name> reset resetchannels -@all on >password …` (idempotent:
//! `reset` replaces whatever the user had), using the endpoint's admin credentials from the operator
//! settings, and removed with `ACL DELUSER` when the resource is deleted or no longer asks for it. During a
//! password rotation the previous passwords stay valid by their SHA-256 (`#hash`) until their grace period
//! ends.

use std::time::Duration;

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::settings::RedisEndpoint;

/// The ACL user of one cache.
#[derive(Clone, PartialEq, Eq)]
pub struct AclUser {
    /// The user name, see [`username_for`].
    pub username: String,
    /// The password (stored in the binding Secret).
    pub password: String,
    /// SHA-256 (hex) of previous passwords still accepted during a rotation.
    pub retiring_password_hashes: Vec<String>,
    /// Every key of the cache starts with it.
    pub key_prefix: String,
    /// The cache's backplane channel.
    pub channel: String,
    /// The database the cache uses (`SELECT` is allowed only when it is not 0).
    pub database: u32,
}

impl std::fmt::Debug for AclUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclUser")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field(
                "retiring_password_hashes",
                &self.retiring_password_hashes.len(),
            )
            .field("key_prefix", &self.key_prefix)
            .field("channel", &self.channel)
            .field("database", &self.database)
            .finish()
    }
}

/// The commands an ACL user of a cache in `database` may run, as ACL rules (`+get`, `+client|setinfo`, …).
pub fn allowed_commands(database: u32) -> Vec<String> {
    let mut rules: Vec<String> = fusioncache::redis::ACL_COMMANDS
        .iter()
        .map(|c| format!("+{c}"))
        .collect();
    if database != 0 {
        rules.push(format!("+{}", fusioncache::redis::ACL_SELECT));
    }
    rules
}

/// The SHA-256 of a password, in hex (how Redis' `#<hash>` rules and the status name a password).
pub fn password_sha256(password: &str) -> String {
    Sha256::digest(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl AclUser {
    /// The arguments of `ACL` that create or replace the user (the first is `SETUSER`).
    pub fn setuser_args(&self) -> Vec<String> {
        self.setuser_args_for(&|_| true)
    }

    /// [`setuser_args`](Self::setuser_args) without the commands the server does not have
    /// (`server_has("client|setinfo")` is false before Redis 7.2, which refuses a rule naming an unknown
    /// command; a command that does not exist needs no denying either).
    pub fn setuser_args_for(&self, server_has: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut args = vec![
            "SETUSER".into(),
            self.username.clone(),
            "reset".into(),
            "resetchannels".into(),
            "-@all".into(),
            "on".into(),
            format!(">{}", self.password),
        ];
        args.extend(
            self.retiring_password_hashes
                .iter()
                .map(|h| format!("#{h}")),
        );
        args.push(format!("~{}*", self.key_prefix));
        args.push(format!("&{}", self.channel));
        args.extend(
            allowed_commands(self.database)
                .into_iter()
                .filter(|rule| server_has(rule.trim_start_matches('+'))),
        );
        args
    }
}

/// The ACL user name of a FusionCache: `fc.{namespace}.{name}` (URL-safe, unique per resource).
pub fn username_for(namespace: &str, name: &str) -> String {
    format!("fc.{namespace}.{name}")
}

/// A new random password: 32 hex characters (128 bits) from the OS.
pub fn generate_password() -> Result<String, AclError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| AclError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// An error while provisioning an ACL user.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The endpoint could not be reached or refused the admin credentials.
    #[error("cannot connect to Redis endpoint `{endpoint}`: {source}")]
    Connect {
        /// The endpoint name.
        endpoint: String,
        /// The client's error.
        source: redis::RedisError,
    },
    /// The server refused a command.
    #[error("`{command}` failed on Redis endpoint `{endpoint}`: {message}")]
    Command {
        /// The endpoint name.
        endpoint: String,
        /// The command, e.g. `ACL SETUSER`.
        command: String,
        /// The server's error, with any password in it replaced by `<redacted>`.
        message: String,
    },
    /// The endpoint did not answer in time.
    #[error("Redis endpoint `{endpoint}` did not answer within {timeout:?}")]
    Timeout {
        /// The endpoint name.
        endpoint: String,
        /// The time limit.
        timeout: Duration,
    },
    /// The OS random source failed.
    #[error("cannot generate a password: {0}")]
    Random(String),
}

/// Creates and deletes ACL users (on Redis, or a fake in tests).
pub trait AclProvisioner: Send + Sync + 'static {
    /// Creates or replaces `user` on `endpoint`.
    fn ensure_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        user: &'a AclUser,
    ) -> BoxFuture<'a, Result<(), AclError>>;
    /// Deletes `username` from `endpoint` (no error when it does not exist).
    fn delete_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        username: &'a str,
    ) -> BoxFuture<'a, Result<(), AclError>>;
    /// The users that exist on `endpoint` (`ACL USERS`).
    fn list_users<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
    ) -> BoxFuture<'a, Result<Vec<String>, AclError>>;
}

/// Provisions ACL users on real Redis servers, connecting with the endpoint's admin credentials.
///
/// TLS endpoints (`rediss://`) are verified against the system's and webpki's root certificates.
#[derive(Debug, Clone)]
pub struct RedisAclProvisioner {
    timeout: Duration,
}

impl Default for RedisAclProvisioner {
    fn default() -> Self {
        Self::new(Duration::from_secs(10))
    }
}

impl RedisAclProvisioner {
    /// A provisioner whose connections and commands give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    async fn connect(
        &self,
        endpoint: &RedisEndpoint,
    ) -> Result<redis::aio::MultiplexedConnection, AclError> {
        let connect_err = |source| AclError::Connect {
            endpoint: endpoint.name.clone(),
            source,
        };
        let client = redis::Client::open(endpoint.url.as_str()).map_err(connect_err)?;
        let info = client.get_connection_info().clone();
        let mut redis_info = info.redis_settings().clone();
        if let Some(user) = &endpoint.admin_username {
            redis_info = redis_info.set_username(user);
        }
        if let Some(password) = &endpoint.admin_password {
            redis_info = redis_info.set_password(password);
        }
        let client =
            redis::Client::open(info.set_redis_settings(redis_info)).map_err(connect_err)?;
        tokio::time::timeout(self.timeout, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| AclError::Timeout {
                endpoint: endpoint.name.clone(),
                timeout: self.timeout,
            })?
            .map_err(connect_err)
    }

    async fn acl<T: redis::FromRedisValue>(
        &self,
        endpoint: &RedisEndpoint,
        subcommand: &'static str,
        args: &[String],
    ) -> Result<T, AclError> {
        self.command(endpoint, "ACL", subcommand, args, None).await
    }

    async fn command<T: redis::FromRedisValue>(
        &self,
        endpoint: &RedisEndpoint,
        name: &'static str,
        command: &'static str,
        args: &[String],
        secret: Option<&str>,
    ) -> Result<T, AclError> {
        let mut con = self.connect(endpoint).await?;
        let mut cmd = redis::cmd(name);
        for arg in args {
            cmd.arg(arg);
        }
        let result: Result<T, _> = tokio::time::timeout(self.timeout, cmd.query_async(&mut con))
            .await
            .map_err(|_| AclError::Timeout {
                endpoint: endpoint.name.clone(),
                timeout: self.timeout,
            })?;
        result.map_err(|source| {
            let mut message = source.to_string();
            if let Some(secret) = secret.filter(|s| !s.is_empty()) {
                message = message.replace(secret, "<redacted>");
            }
            AclError::Command {
                endpoint: endpoint.name.clone(),
                command: format!("{name} {command}"),
                message,
            }
        })
    }
}

impl AclProvisioner for RedisAclProvisioner {
    fn ensure_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        user: &'a AclUser,
    ) -> BoxFuture<'a, Result<(), AclError>> {
        Box::pin(async move {
            let mut info = vec!["INFO".to_string()];
            info.extend(
                allowed_commands(user.database)
                    .iter()
                    .map(|r| r[1..].to_string()),
            );
            let known: Vec<redis::Value> = self
                .command(endpoint, "COMMAND", "INFO", &info, None)
                .await?;
            let names = &info[1..];
            let has = |command: &str| {
                names
                    .iter()
                    .position(|n| n == command)
                    .and_then(|i| known.get(i))
                    .is_some_and(|v| !matches!(v, redis::Value::Nil))
            };
            let args = user.setuser_args_for(&has);
            self.command::<redis::Value>(endpoint, "ACL", "SETUSER", &args, Some(&user.password))
                .await
                .map(drop)
        })
    }

    fn delete_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        username: &'a str,
    ) -> BoxFuture<'a, Result<(), AclError>> {
        Box::pin(async move {
            self.acl::<redis::Value>(
                endpoint,
                "DELUSER",
                &["DELUSER".to_string(), username.to_string()],
            )
            .await
            .map(drop)
        })
    }

    fn list_users<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
    ) -> BoxFuture<'a, Result<Vec<String>, AclError>> {
        Box::pin(async move { self.acl(endpoint, "USERS", &["USERS".to_string()]).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(database: u32) -> AclUser {
        AclUser {
            username: "fc.shop.products".into(),
            password: "secret".into(),
            retiring_password_hashes: vec![],
            key_prefix: "shop.products:".into(),
            channel: "shop.products.Backplane:v2".into(),
            database,
        }
    }

    #[test]
    fn setuser_denies_everything_then_allows_the_library_commands_on_its_keys_and_channel() {
        let args = user(0).setuser_args();
        assert_eq!(
            args[..9].join(" "),
            "SETUSER fc.shop.products reset resetchannels -@all on >secret ~shop.products:* \
             &shop.products.Backplane:v2"
        );
        let commands: Vec<&str> = args[9..]
            .iter()
            .map(|a| a.strip_prefix('+').unwrap())
            .collect();
        assert_eq!(commands, fusioncache::redis::ACL_COMMANDS);
        assert!(
            !args.iter().any(|a| a.starts_with("+@")),
            "no category is granted"
        );
        assert!(!format!("{:?}", user(0)).contains("secret"));
    }

    #[test]
    fn the_chart_readme_shows_the_allowlist_of_the_library() {
        let readme = include_str!("../../../charts/fusioncache-operator/README.md");
        let shown = readme
            .lines()
            .find(|l| l.trim_start().starts_with("+auth"))
            .expect("the allowlist line in the chart README");
        let shown: Vec<&str> = shown
            .split_whitespace()
            .filter(|w| !w.starts_with('['))
            .collect();
        assert_eq!(
            shown,
            allowed_commands(0),
            "update charts/fusioncache-operator/README.md"
        );
    }

    #[test]
    fn select_is_allowed_only_outside_database_zero() {
        assert!(!user(0).setuser_args().contains(&"+select".to_string()));
        assert!(user(3).setuser_args().contains(&"+select".to_string()));
    }

    #[test]
    fn retiring_passwords_stay_valid_by_hash() {
        let mut u = user(0);
        u.retiring_password_hashes = vec![password_sha256("old")];
        let args = u.setuser_args();
        assert!(args.contains(&format!("#{}", password_sha256("old"))));
        assert!(!args.iter().any(|a| a.contains(">old")));
        assert_eq!(
            password_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn passwords_are_32_hex_characters_and_differ() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn usernames_are_per_resource() {
        assert_eq!(username_for("shop", "products"), "fc.shop.products");
    }
}
