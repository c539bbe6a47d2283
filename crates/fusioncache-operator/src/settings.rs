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
            let canonical = canonical_redis_url(&e.url, None);
            if let Some(other) = endpoints
                .iter()
                .find(|o: &&RedisEndpoint| canonical_redis_url(&o.url, None) == canonical)
            {
                return Err(SettingsError::invalid(
                    key("url"),
                    format!(
                        "`{}` is the server of endpoint `{}` too: one server under two names would be allocated \
                         twice",
                        e.url, other.name
                    ),
                ));
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

    /// The endpoint whose URL is `url` once both are canonical ([`canonical_redis_url`]), if one is declared:
    /// an explicit URL that points at a managed endpoint shares its allocations, so one server is never
    /// allocated twice under two spellings. `namespace` is the FusionCache's (a one-label host is a Service
    /// of that namespace).
    pub fn endpoint_by_url(&self, url: &str, namespace: &str) -> Option<&RedisEndpoint> {
        let qualified = canonical_redis_url(url, Some(namespace));
        let as_written = canonical_redis_url(url, None);
        self.redis_endpoints.iter().find(|e| {
            let endpoint = canonical_redis_url(&e.url, None);
            endpoint == qualified || endpoint == as_written
        })
    }
}

fn parse_file(text: &str, source_name: &str) -> Result<SettingsFile, SettingsError> {
    if text.trim().is_empty() {
        return Ok(SettingsFile::default());
    }
    serde_yaml::from_str(text).map_err(|e| SettingsError::Yaml {
        source_name: source_name.to_string(),
        message: redact_parse_values(&e.to_string()),
    })
}

/// A Redis URL reduced to what identifies the server: `scheme://host:port`, the host lowercased without a
/// trailing dot, the Kubernetes Service suffixes `.svc.cluster.local` and `.svc` removed, a one-label host
/// qualified with `namespace` when given (`redis` from namespace `cache` is `redis.cache`), the port 6379 when
/// none is given; credentials, database path and query are dropped.
///
/// Two spellings of one Service (`redis.cache`, `redis.cache.svc`, `redis.cache.svc.cluster.local`) are one
/// endpoint; an IP address and a DNS name of the same server cannot be recognized as one (name the endpoint
/// instead).
pub fn canonical_redis_url(url: &str, namespace: Option<&str>) -> String {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
        (format!("[{h}]"), after.strip_prefix(':').unwrap_or(""))
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (host_port.to_string(), ""),
        }
    };
    let mut host = host.to_ascii_lowercase().trim_end_matches('.').to_string();
    for suffix in [".svc.cluster.local", ".svc"] {
        if let Some(h) = host.strip_suffix(suffix) {
            host = h.to_string();
            break;
        }
    }
    let is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
    if let Some(ns) = namespace {
        if !host.contains('.') && !is_ip && host != "localhost" && !host.is_empty() {
            host = format!("{host}.{ns}");
        }
    }
    let port = if port.is_empty() { "6379" } else { port };
    format!("{}://{host}:{port}", scheme.to_ascii_lowercase())
}

/// A YAML parse error without the value it quotes (`invalid type: string "hunter2", expected …`: the value
/// may be a password); the kind of value and the field names (`unknown field `x``) stay.
fn redact_parse_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = ["invalid type: ", "invalid value: "]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| i + p.len()))
        .min()
    {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest.find(", expected").unwrap_or(rest.len());
        let kind = rest[..end].split_whitespace().next().unwrap_or_default();
        out.push_str(kind);
        out.push_str(" <redacted>");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `url` with its credentials (`user:password@`) replaced by `***@`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Parses a duration: `250ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 500ms, 10s, 5m, 1h)"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use ms, s, m or h)"
            ))
        }
    };
    ms.map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
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
        return Err(format!(
            "`{}` must start with redis:// or rediss://",
            redact_url(url)
        ));
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
                "`{}` must start with nats://, tls://, ws:// or wss://",
                redact_url(url)
            ));
        }
        check_authority(url)?;
    }
    Ok(())
}

fn check_authority(url: &str) -> Result<(), String> {
    let Some(auth) = authority(url) else {
        return Err(format!("`{}` is not a URL", redact_url(url)));
    };
    if auth.contains('@') {
        return Err(
            "must not contain credentials (user:password@): they would be written into a ConfigMap"
                .into(),
        );
    }
    if auth.is_empty() || auth.starts_with(':') || auth.chars().any(char::is_whitespace) {
        return Err(format!("`{}` has no valid host", redact_url(url)));
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
    fn one_server_under_two_spellings_is_one_endpoint() {
        let c = |u: &str, ns: Option<&str>| canonical_redis_url(u, ns);
        assert_eq!(
            c("redis://Redis.Cache:6379", None),
            "redis://redis.cache:6379"
        );
        assert_eq!(
            c("redis://redis.cache.svc.cluster.local.", None),
            "redis://redis.cache:6379"
        );
        assert_eq!(
            c("redis://redis.cache.svc:6379/3", None),
            "redis://redis.cache:6379"
        );
        assert_eq!(
            c("redis://redis:6379", Some("cache")),
            "redis://redis.cache:6379"
        );
        assert_eq!(
            c("rediss://u:p@10.0.0.1", Some("cache")),
            "rediss://10.0.0.1:6379"
        );
        assert_ne!(
            c("redis://redis.cache:6380", None),
            c("redis://redis.cache:6379", None)
        );
        let s = Settings::from_yaml(
            "redisEndpoints:\n  - name: main\n    url: redis://redis.cache.svc.cluster.local:6379\n",
            &env(),
        )
        .unwrap();
        assert_eq!(
            s.endpoint_by_url("redis://redis:6379", "cache")
                .unwrap()
                .name,
            "main"
        );
        assert!(s.endpoint_by_url("redis://redis:6379", "other").is_none());
        let err = Settings::from_yaml(
            "redisEndpoints:\n  - name: a\n    url: redis://redis.cache:6379\n  - name: b\n    url: redis://REDIS.cache.svc\n",
            &env(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("endpoint `a` too"), "{err}");
    }

    #[test]
    fn parse_errors_do_not_quote_values() {
        let err = Settings::from_yaml(
            "redisEndpoints:\n  - name: a\n    url: redis://a:1\n    adminPassword: [hunter2]\n",
            &env(),
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = Settings::from_yaml(
            "redisEndpoints:\n  - name: a\n    url: redis://a:1\n    databases: hunter2\n",
            &env(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            !err.contains("hunter2") && err.contains("databases"),
            "{err}"
        );
        assert_eq!(
            redact_parse_values("x: invalid type: string \"hunter2\", expected u32 at line 2"),
            "x: invalid type: string <redacted>, expected u32 at line 2"
        );
        let unknown = "unknown field `redisEndpoint`, expected one of `redisEndpoints`";
        assert_eq!(redact_parse_values(unknown), unknown);
    }

    #[test]
    fn durations_have_a_unit_or_are_seconds() {
        use std::time::Duration;
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn urls_in_errors_never_show_credentials() {
        for url in ["http://user:hunter2@h:1", "redis://user:hunter2@ h"] {
            let err = check_redis_url(url).unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = check_nats_url("nats://a:1,http://u:hunter2@b:2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(redact_url("redis://u:p@h:1/2"), "redis://***@h:1/2");
        assert_eq!(redact_url("redis://h:1/a@b"), "redis://h:1/a@b");
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
        assert_eq!(
            s.endpoint_by_url("REDIS://o:1/", "ns").unwrap().name,
            "only"
        );
        let empty = Settings::load(None, &env()).unwrap();
        assert!(empty.redis_endpoints.is_empty() && empty.default_endpoint().is_none());
        let err = Settings::load(Some(Path::new("/nope.yaml")), &env()).unwrap_err();
        assert!(err.to_string().contains("/nope.yaml"), "{err}");
    }
}
