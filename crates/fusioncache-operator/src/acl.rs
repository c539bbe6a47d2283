//! Redis ACL users, one per FusionCache with `spec.redis.acl: true`.
//!
//! The user may only touch keys under the cache's key prefix (`~{keyPrefix}*`) and only its own backplane
//! channel (`&{channel}`: the exact channel, so a prefix that extends another one, `shop.a` and `shop.a.b`,
//! grants nothing of the other), with every command but the `@dangerous` ones (`FLUSHALL`, `KEYS`, `CONFIG`,
//! `ACL`, `DEBUG`, …). A Redis database index is no isolation (ACLs cannot restrict `SELECT`): this is.
//!
//! The user is written with one `ACL SETUSER <name> reset on >password …` (idempotent: `reset` replaces
//! whatever the user had), using the endpoint's admin credentials from the operator settings, and removed
//! with `ACL DELUSER` when the resource is deleted or no longer asks for it.

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::settings::RedisEndpoint;

/// The ACL user of one cache.
#[derive(Clone, PartialEq, Eq)]
pub struct AclUser {
    /// The user name, see [`username_for`].
    pub username: String,
    /// The password (stored in the binding Secret).
    pub password: String,
    /// Every key of the cache starts with it.
    pub key_prefix: String,
    /// The cache's backplane channel.
    pub channel: String,
}

impl std::fmt::Debug for AclUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclUser")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("key_prefix", &self.key_prefix)
            .field("channel", &self.channel)
            .finish()
    }
}

impl AclUser {
    /// The arguments of `ACL` that create or replace the user (the first is `SETUSER`).
    pub fn setuser_args(&self) -> Vec<String> {
        vec![
            "SETUSER".into(),
            self.username.clone(),
            "reset".into(),
            "on".into(),
            format!(">{}", self.password),
            format!("~{}*", self.key_prefix),
            "resetchannels".into(),
            format!("&{}", self.channel),
            "+@all".into(),
            "-@dangerous".into(),
        ]
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
    #[error("`ACL {command}` failed on Redis endpoint `{endpoint}`: {source}")]
    Command {
        /// The endpoint name.
        endpoint: String,
        /// The ACL subcommand.
        command: &'static str,
        /// The server's error.
        source: redis::RedisError,
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

    async fn acl(
        &self,
        endpoint: &RedisEndpoint,
        command: &'static str,
        args: &[String],
    ) -> Result<(), AclError> {
        let mut con = self.connect(endpoint).await?;
        let mut cmd = redis::cmd("ACL");
        for arg in args {
            cmd.arg(arg);
        }
        let result: Result<redis::Value, _> =
            tokio::time::timeout(self.timeout, cmd.query_async(&mut con))
                .await
                .map_err(|_| AclError::Timeout {
                    endpoint: endpoint.name.clone(),
                    timeout: self.timeout,
                })?;
        result.map(|_| ()).map_err(|source| AclError::Command {
            endpoint: endpoint.name.clone(),
            command,
            source,
        })
    }
}

impl AclProvisioner for RedisAclProvisioner {
    fn ensure_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        user: &'a AclUser,
    ) -> BoxFuture<'a, Result<(), AclError>> {
        Box::pin(async move { self.acl(endpoint, "SETUSER", &user.setuser_args()).await })
    }

    fn delete_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        username: &'a str,
    ) -> BoxFuture<'a, Result<(), AclError>> {
        Box::pin(async move {
            self.acl(
                endpoint,
                "DELUSER",
                &["DELUSER".to_string(), username.to_string()],
            )
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setuser_limits_the_user_to_its_keys_and_its_channel() {
        let user = AclUser {
            username: "fc.shop.products".into(),
            password: "secret".into(),
            key_prefix: "shop.products:".into(),
            channel: "shop.products.Backplane:v2".into(),
        };
        assert_eq!(
            user.setuser_args().join(" "),
            "SETUSER fc.shop.products reset on >secret ~shop.products:* resetchannels \
             &shop.products.Backplane:v2 +@all -@dangerous"
        );
        assert!(!format!("{user:?}").contains("secret"));
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
