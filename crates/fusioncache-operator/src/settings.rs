//! The operator's own settings: the Redis endpoints it manages and the default NATS URL.
//!
//! They come from a YAML file (path from `--config` or `FUSIONCACHE_OPERATOR_CONFIG`), overridden by a few
//! environment variables, so a Helm chart can render the file from its values and mount the admin
//! passwords from Secrets:
//!
//! ```yaml
//! redisEndpoints:
//!   - name: shared                      # what FusionCache resources name in spec.redis.endpoint
//!     url: redis://redis.cache-system:6379
//!     adminUsername: default            # optional; the user that runs ACL SETUSER / DELUSER
//!     adminPasswordFile: /etc/fusioncache-operator/redis-shared/password   # or adminPasswordEnv / adminPassword
//!     databases: 16                     # optional, default 16 (the server's `databases` setting)
//! defaultRedisEndpoint: shared          # optional; when there is exactly one endpoint it is the default
//! defaultNatsUrl: nats://nats.nats-system:4222   # optional
//! ```
//!
//! Unknown keys are errors that name the key. Environment overrides (each optional):
//! `FUSIONCACHE_OPERATOR_DEFAULT_REDIS_ENDPOINT`, `FUSIONCACHE_OPERATOR_DEFAULT_NATS_URL`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable naming the settings file.
pub const CONFIG_ENV: &str = "FUSIONCACHE_OPERATOR_CONFIG";
/// Environment variable overriding `defaultRedisEndpoint`.
pub const DEFAULT_REDIS_ENDPOINT_ENV: &str = "FUSIONCACHE_OPERATOR_DEFAULT_REDIS_ENDPOINT";
/// Environment variable overriding `defaultNatsUrl`.
pub const DEFAULT_NATS_URL_ENV: &str = "FUSIONCACHE_OPERATOR_DEFAULT_NATS_URL";
/// The number of databases of an endpoint when the settings do not say (Redis' default).
pub const DEFAULT_DATABASES: u32 = 16;

/// An error in the operator settings; it names the key or file.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read operator settings {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the schema (unknown key, wrong type); the message names the key.
    #[error("invalid operator settings in {source_name}: {message}")]
    Yaml {
        /// Where the document came from.
        source_name: String,
        /// The parser's message.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid operator setting `{key}`: {reason}")]
    Invalid {
        /// The key, e.g. `redisEndpoints[0].url`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl SettingsError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        SettingsError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The settings file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SettingsFile {
    #[serde(default)]
    redis_endpoints: Vec<RedisEndpointFile>,
    #[serde(default)]
    default_redis_endpoint: Option<String>,
    #[serde(default)]
    default_nats_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RedisEndpointFile {
    name: String,
    url: String,
    #[serde(default)]
    admin_username: Option<String>,
    #[serde(default)]
    admin_password: Option<String>,
    #[serde(default)]
    admin_password_env: Option<String>,
    #[serde(default)]
    admin_password_file: Option<PathBuf>,
    #[serde(default)]
    databases: Option<u32>,
}

/// A Redis endpoint the operator manages.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisEndpoint {
    /// The name FusionCache resources use in `spec.redis.endpoint`.
    pub name: String,
    /// `redis://host:port` or `rediss://host:port`, without credentials.
    pub url: String,
    /// The admin user (ACL provisioning); `None` means the `default` user.
    pub admin_username: Option<String>,
    /// The admin password, resolved from the file, an environment variable or inline.
    pub admin_password: Option<String>,
    /// The number of databases (valid indexes are `0..databases`).
    pub databases: u32,
}

impl fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEndpoint")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("admin_username", &self.admin_username)
            .field(
                "admin_password",
                &self.admin_password.as_ref().map(|_| "<redacted>"),
            )
            .field("databases", &self.databases)
            .finish()
    }
}

/// The operator settings, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// The Redis endpoints, by unique name.
    pub redis_endpoints: Vec<RedisEndpoint>,
    /// The endpoint used when a FusionCache names neither an endpoint nor a URL.
    pub default_redis_endpoint: Option<String>,
    /// The NATS URL used when a FusionCache does not set one.
    pub default_nats_url: Option<String>,
}

/// Where the settings read environment variables and files from (the process, or fakes in tests).
pub trait Environment {
    /// The value of an environment variable, when set and not empty.
    fn var(&self, key: &str) -> Option<String>;
    /// The contents of a file.
    fn read_file(&self, path: &Path) -> std::io::Result<String>;
}

/// The process environment and file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

impl Settings {
    /// Loads the settings file at `path` (none: empty settings) and applies the environment overrides.
    pub fn load(path: Option<&Path>, env: &dyn Environment) -> Result<Self, SettingsError> {
        let file = match path {
            Some(path) => {
                let text = env.read_file(path).map_err(|source| SettingsError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                parse_file(&text, &path.display().to_string())?
            }
            None => SettingsFile::default(),
        };
        Self::from_file(file, env)
    }

    /// Parses settings from YAML text and applies the environment overrides.
    pub fn from_yaml(text: &str, env: &dyn Environment) -> Result<Self, SettingsError> {
        Self::from_file(parse_file(text, "YAML")?, env)
    }

    fn from_file(mut file: SettingsFile, env: &dyn Environment) -> Result<Self, SettingsError> {
        if let Some(v) = env.var(DEFAULT_REDIS_ENDPOINT_ENV) {
            file.default_redis_endpoint = Some(v);
        }
        if let Some(v) = env.var(DEFAULT_NATS_URL_ENV) {
            file.default_nats_url = Some(v);
        }
        let mut names = BTreeSet::new();
        let mut endpoints = Vec::with_capacity(file.redis_endpoints.len());
        for (i, e) in file.redis_endpoints.into_iter().enumerate() {
            let key = |field: &str| format!("redisEndpoints[{i}].{field}");
            if !is_endpoint_name(&e.name) {
                return Err(SettingsError::invalid(
                    key("name"),
                    format!(
                        "`{}` is not a valid endpoint name (lowercase letters, digits and `-`, at most 63, \
                         starting and ending with a letter or digit)",
                        e.name
                    ),
                ));
            }
            if !names.insert(e.name.clone()) {
                return Err(SettingsError::invalid(
                    key("name"),
                    format!("endpoint `{}` is declared twice", e.name),
                ));
            }
            if let Err(reason) = check_redis_url(&e.url) {
                return Err(SettingsError::invalid(key("url"), reason));
            }
            let databases = e.databases.unwrap_or(DEFAULT_DATABASES);
            if databases == 0 {
                return Err(SettingsError::invalid(
                    key("databases"),
                    "must be at least 1",
                ));
            }
            let sources = [
                e.admin_password.is_some(),
                e.admin_password_env.is_some(),
                e.admin_password_file.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() > 1 {
                return Err(SettingsError::invalid(
                    key("adminPassword"),
                    "set only one of adminPassword, adminPasswordEnv and adminPasswordFile",
                ));
            }
            let admin_password = if let Some(var) = &e.admin_password_env {
                Some(env.var(var).ok_or_else(|| {
                    SettingsError::invalid(
                        key("adminPasswordEnv"),
                        format!("environment variable `{var}` is not set"),
                    )
                })?)
            } else if let Some(path) = &e.admin_password_file {
                let text = env.read_file(path).map_err(|source| SettingsError::Io {
                    path: path.clone(),
                    source,
                })?;
                Some(text.trim_end_matches(['\n', '\r']).to_string())
            } else {
                e.admin_password
            };
            if let Some(user) = &e.admin_username {
                if user.is_empty() || user.chars().any(char::is_whitespace) {
                    return Err(SettingsError::invalid(
                        key("adminUsername"),
                        "must be a non-empty name without whitespace",
                    ));
                }
            }
            endpoints.push(RedisEndpoint {
                name: e.name,
                url: e.url,
                admin_username: e.admin_username,
                admin_password: admin_password.filter(|p| !p.is_empty()),
                databases,
            });
        }
        if let Some(default) = &file.default_redis_endpoint {
            if !names.contains(default) {
                return Err(SettingsError::invalid(
                    "defaultRedisEndpoint",
                    format!(
                        "`{default}` is not one of the declared endpoints ({})",
                        if names.is_empty() {
                            "none declared".to_string()
                        } else {
                            names.into_iter().collect::<Vec<_>>().join(", ")
                        }
                    ),
                ));
            }
        }
        if let Some(url) = &file.default_nats_url {
            if let Err(reason) = check_nats_url(url) {
                return Err(SettingsError::invalid("defaultNatsUrl", reason));
            }
        }
        Ok(Settings {
            redis_endpoints: endpoints,
            default_redis_endpoint: file.default_redis_endpoint,
            default_nats_url: file.default_nats_url,
        })
    }

    /// The endpoint of this name.
    pub fn endpoint(&self, name: &str) -> Option<&RedisEndpoint> {
        self.redis_endpoints.iter().find(|e| e.name == name)
    }

    /// The default endpoint: the configured one, else the only one.
    pub fn default_endpoint(&self) -> Option<&RedisEndpoint> {
        match &self.default_redis_endpoint {
            Some(name) => self.endpoint(name),
            None => match self.redis_endpoints.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        }
    }

    /// The endpoint whose URL is `url`, if one is declared (an explicit URL that points at a managed
    /// endpoint shares its allocations).
    pub fn endpoint_by_url(&self, url: &str) -> Option<&RedisEndpoint> {
        let wanted = normalize_url(url);
        self.redis_endpoints
            .iter()
            .find(|e| normalize_url(&e.url) == wanted)
    }
}

fn parse_file(text: &str, source_name: &str) -> Result<SettingsFile, SettingsError> {
    if text.trim().is_empty() {
        return Ok(SettingsFile::default());
    }
    serde_yaml::from_str(text).map_err(|e| SettingsError::Yaml {
        source_name: source_name.to_string(),
        message: e.to_string(),
    })
}

fn normalize_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Whether `name` is a valid endpoint name (a DNS label).
pub fn is_endpoint_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// The authority part (`host:port`, maybe `user:pass@host:port`) of a `scheme://authority/...` URL.
fn authority(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    Some(rest.split(['/', '?', '#']).next().unwrap_or(""))
}

/// Checks a Redis URL: `redis://` or `rediss://`, a host, and no credentials in it.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!("`{url}` must start with redis:// or rediss://"));
    }
    check_authority(url)
}

/// Checks NATS URLs (comma separated): a known scheme, a host, and no credentials in them.
pub fn check_nats_url(urls: &str) -> Result<(), String> {
    for url in urls.split(',').map(str::trim) {
        if url.is_empty() {
            return Err("contains an empty server URL".into());
        }
        if !["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .any(|s| url.starts_with(s))
        {
            return Err(format!(
                "`{url}` must start with nats://, tls://, ws:// or wss://"
            ));
        }
        check_authority(url)?;
    }
    Ok(())
}

fn check_authority(url: &str) -> Result<(), String> {
    let Some(auth) = authority(url) else {
        return Err(format!("`{url}` is not a URL"));
    };
    if auth.contains('@') {
        return Err(
            "must not contain credentials (user:password@): they would be written into a ConfigMap"
                .into(),
        );
    }
    if auth.is_empty() || auth.starts_with(':') || auth.chars().any(char::is_whitespace) {
        return Err(format!("`{url}` has no valid host"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A fake environment: variables and files from maps.
    #[derive(Default)]
    pub(crate) struct FakeEnv {
        pub vars: BTreeMap<String, String>,
        pub files: BTreeMap<PathBuf, String>,
    }

    impl Environment for FakeEnv {
        fn var(&self, key: &str) -> Option<String> {
            self.vars.get(key).cloned()
        }
        fn read_file(&self, path: &Path) -> std::io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        }
    }

    const FULL: &str = "
redisEndpoints:
  - name: shared
    url: redis://redis.cache-system:6379
    adminUsername: admin
    adminPasswordFile: /etc/pw
    databases: 4
  - name: other
    url: redis://other:6379
    adminPasswordEnv: OTHER_PW
defaultRedisEndpoint: shared
defaultNatsUrl: nats://nats:4222
";

    fn env() -> FakeEnv {
        let mut env = FakeEnv::default();
        env.vars.insert("OTHER_PW".into(), "from-env".into());
        env.files.insert("/etc/pw".into(), "from-file\n".into());
        env
    }

    #[test]
    fn parses_endpoints_and_resolves_passwords_from_files_and_env() {
        let s = Settings::from_yaml(FULL, &env()).unwrap();
        let shared = s.endpoint("shared").unwrap();
        assert_eq!(shared.admin_password.as_deref(), Some("from-file"));
        assert_eq!(shared.admin_username.as_deref(), Some("admin"));
        assert_eq!(shared.databases, 4);
        let other = s.endpoint("other").unwrap();
        assert_eq!(other.admin_password.as_deref(), Some("from-env"));
        assert_eq!(other.databases, DEFAULT_DATABASES);
        assert_eq!(s.default_endpoint().unwrap().name, "shared");
        assert_eq!(s.default_nats_url.as_deref(), Some("nats://nats:4222"));
        assert!(
            !format!("{shared:?}").contains("from-file"),
            "Debug redacts the password"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = Settings::from_yaml("redisEndpoint: []\n", &env()).unwrap_err();
        assert!(err.to_string().contains("redisEndpoint"), "{err}");
        let err = Settings::from_yaml(
            "redisEndpoints:\n  - name: a\n    url: redis://a:1\n    database: 3\n",
            &env(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("database"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("redisEndpoints:\n  - name: A\n    url: redis://a:1\n", "redisEndpoints[0].name"),
            ("redisEndpoints:\n  - name: a\n    url: http://a:1\n", "redisEndpoints[0].url"),
            ("redisEndpoints:\n  - name: a\n    url: redis://u:p@a:1\n", "redisEndpoints[0].url"),
            ("redisEndpoints:\n  - name: a\n    url: redis://a:1\n    databases: 0\n", "databases"),
            (
                "redisEndpoints:\n  - name: a\n    url: redis://a:1\n  - name: a\n    url: redis://b:1\n",
                "redisEndpoints[1].name",
            ),
            ("redisEndpoints:\n  - name: a\n    url: redis://a:1\n    adminPasswordEnv: NOPE\n", "NOPE"),
            ("defaultRedisEndpoint: missing\n", "defaultRedisEndpoint"),
            ("defaultNatsUrl: http://x\n", "defaultNatsUrl"),
        ];
        for (yaml, expected) in cases {
            let err = Settings::from_yaml(yaml, &env()).unwrap_err();
            assert!(err.to_string().contains(expected), "{yaml}: {err}");
        }
    }

    #[test]
    fn environment_overrides_the_defaults() {
        let mut env = env();
        env.vars
            .insert(DEFAULT_REDIS_ENDPOINT_ENV.into(), "other".into());
        env.vars
            .insert(DEFAULT_NATS_URL_ENV.into(), "nats://elsewhere:4222".into());
        let s = Settings::from_yaml(FULL, &env).unwrap();
        assert_eq!(s.default_endpoint().unwrap().name, "other");
        assert_eq!(s.default_nats_url.as_deref(), Some("nats://elsewhere:4222"));
    }

    #[test]
    fn a_single_endpoint_is_the_default_and_no_file_is_empty_settings() {
        let s = Settings::from_yaml(
            "redisEndpoints:\n  - name: only\n    url: redis://o:1\n",
            &env(),
        )
        .unwrap();
        assert_eq!(s.default_endpoint().unwrap().name, "only");
        assert_eq!(s.endpoint_by_url("REDIS://o:1/").unwrap().name, "only");
        let empty = Settings::load(None, &env()).unwrap();
        assert!(empty.redis_endpoints.is_empty() && empty.default_endpoint().is_none());
        let err = Settings::load(Some(Path::new("/nope.yaml")), &env()).unwrap_err();
        assert!(err.to_string().contains("/nope.yaml"), "{err}");
    }
}
