//! The `FusionCache` custom resource (`fusioncache.io/v1alpha1`).
//!
//! The YAML of the CustomResourceDefinition is generated from these types (`fusioncache-operator crd`),
//! never written by hand; `manifests/crd.yaml` must equal it (a test checks).
//!
//! Every field carries a description (so `kubectl explain fusioncache.spec.redis` helps) and what the
//! apiserver can check is in the schema (enums, patterns, ranges, CEL rules). The operator checks everything
//! again before using it ([`crate::reconcile`]): a value the schema let through, on an apiserver that does not
//! enforce some rule, becomes a `Ready=False` condition, never a panic or a failed list.

use std::borrow::Cow;
use std::fmt;

use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The API group of the resource.
pub const GROUP: &str = "fusioncache.io";
/// The API version of the resource.
pub const VERSION: &str = "v1alpha1";
/// The `apiVersion` field value (`fusioncache.io/v1alpha1`).
pub const API_VERSION: &str = "fusioncache.io/v1alpha1";
/// The kind of the resource.
pub const KIND: &str = "FusionCache";

/// The CustomResourceDefinition as YAML: what `fusioncache-operator crd` prints and `manifests/crd.yaml`
/// holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&FusionCache::crd())
}

/// The desired state of a FusionCache: which cache an application runs and over which backplane its nodes
/// stay coherent. The operator answers with a ConfigMap (`fusioncache.yaml` and `FUSIONCACHE_*` values) and a
/// Service Binding Secret (the same values plus credentials), both named in the status.
// kube's `printcolumn(...)` repeats keys across columns, which the lint takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "fusioncache.io",
    version = "v1alpha1",
    kind = "FusionCache",
    namespaced,
    shortname = "fc",
    status = "FusionCacheStatus",
    derive = "PartialEq",
    doc = "A FusionCache: a hybrid cache of an application whose nodes stay coherent through a backplane \
           (Redis pub/sub or NATS). The operator allocates its channel prefix and Redis database, optionally \
           provisions a Redis ACL user, and writes a ConfigMap and a Service Binding Secret the application \
           loads its configuration from.",
    printcolumn(
        name = "Transport",
        type_ = "string",
        json_path = ".spec.transport",
        description = "The backplane transport"
    ),
    printcolumn(
        name = "Channel",
        type_ = "string",
        json_path = ".status.channel",
        description = "The backplane channel"
    ),
    printcolumn(
        name = "DB",
        type_ = "integer",
        json_path = ".status.redisDatabase",
        description = "The Redis database index of the L2 cache"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the configuration is provisioned"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.transport != 'redis' || has(self.redis)",
        "message": "transport `redis` needs a `redis` section (it may be empty: `redis: {}` uses the operator's default endpoint)"
    },
    {
        "rule": "!has(self.distributedCache) || !self.distributedCache || has(self.redis)",
        "message": "`distributedCache: true` needs a `redis` section"
    },
    {
        "rule": "self.transport != 'nats' || !has(self.redis) || (has(self.distributedCache) && self.distributedCache)",
        "message": "with transport `nats`, a `redis` section is only used for the distributed cache: set `distributedCache: true` or remove it"
    }
]))]
pub struct FusionCacheSpec {
    /// The cache name the application uses (FusionCache's `CacheName`). Part of the default channel prefix
    /// `{namespace}.{cacheName}`. 1 to 63 letters, digits, `_` or `-`, starting with a letter or digit.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"))]
    pub cache_name: String,

    /// The backplane transport that tells the other nodes that an entry changed: `redis` (Redis pub/sub,
    /// needs the `redis` section) or `nats` (NATS core subjects, uses the `nats` section or the operator's
    /// default NATS URL).
    pub transport: Transport,

    /// Redis settings: the backplane when `transport` is `redis`, and the distributed (L2) cache when
    /// `distributedCache` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,

    /// NATS settings, used when `transport` is `nats`. Optional: the operator's default NATS URL is used when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSpec>,

    /// Overrides the channel prefix (default `{namespace}.{cacheName}`, plus `.{environment}` when set). The
    /// backplane channel is `{channelPrefix}.Backplane:v2`. It must be unique on its Redis endpoint or NATS
    /// server across the cluster. Dot-separated non-empty tokens without whitespace or any of `* > ? [ ] \`,
    /// at most 200 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 200),
        regex(pattern = r"^[^.\s*>?\[\]\\]+(\.[^.\s*>?\[\]\\]+)*$")
    )]
    pub channel_prefix: Option<String>,

    /// An environment name (e.g. `prod`, `staging`) appended to the default channel prefix, so the same app
    /// in two environments sharing one Redis does not cross-talk. 1 to 63 letters, digits, `_` or `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"))]
    pub environment: Option<String>,

    /// Prefix of every key the cache writes to Redis (L2). Defaults to `{channelPrefix}:` when `redis.acl`
    /// is true (the ACL user may only touch keys under it), else no prefix. No whitespace or glob characters
    /// (`* ? [ ] \`), at most 200 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[^\s*?\[\]\\]+$"))]
    pub key_prefix: Option<String>,

    /// Use Redis as the distributed (L2) cache, in a database the operator allocates (see
    /// `redis.database`). Needs the `redis` section. Default false: L1 only, the backplane keeps the nodes
    /// coherent.
    #[serde(default)]
    pub distributed_cache: bool,
}

/// The backplane transport.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Redis pub/sub.
    Redis,
    /// NATS core subjects.
    Nats,
}

impl Transport {
    /// The lowercase name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Redis => "redis",
            Transport::Nats => "nats",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Redis settings of a FusionCache.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.endpoint) && has(self.url))",
        "message": "set either `endpoint` or `url`, not both"
    },
    {
        "rule": "!(has(self.acl) && self.acl && has(self.credentialsSecretRef))",
        "message": "`acl: true` provisions its own credentials: remove `credentialsSecretRef`"
    }
]))]
pub struct RedisSpec {
    /// Name of a Redis endpoint declared in the operator's settings (which hold its URL, admin credentials
    /// and number of databases). When neither `endpoint` nor `url` is set, the operator's default endpoint
    /// is used. Mutually exclusive with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub endpoint: Option<String>,

    /// A Redis URL (`redis://host:port` or `rediss://host:port` for TLS) not managed by the operator, without
    /// credentials in it (use `credentialsSecretRef`). Mutually exclusive with `endpoint`; `acl` needs an
    /// `endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^rediss?://[^\s@/]+(/[0-9]*)?$"))]
    pub url: Option<String>,

    /// The database index of the distributed (L2) cache: `auto` (default: the lowest index no other
    /// FusionCache on the same endpoint uses, kept once given) or an explicit index, 0 to the endpoint's
    /// database count minus one (16 databases by default). Only allocated when `distributedCache` is true.
    /// Note that a database index is not isolation; `acl` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseRequest>,

    /// A Secret in the same namespace holding the Redis username and password the application should use
    /// (copied into the binding Secret). Not allowed with `acl: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<RedisCredentialsRef>,

    /// Provision a Redis ACL user for this cache on the endpoint (needs `endpoint`, or the default
    /// endpoint): it may only use keys under the key prefix and the cache's backplane channel. The password
    /// is generated and stored in the binding Secret; the user is deleted with the resource.
    #[serde(default)]
    pub acl: bool,
}

/// A reference to a Secret holding Redis credentials.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisCredentialsRef {
    /// Name of the Secret, in the namespace of the FusionCache.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    /// The key of the username in the Secret (default `username`). A missing key means no username (the
    /// `default` user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(min = 1, max = 253))]
    pub username_key: Option<String>,
    /// The key of the password in the Secret (default `password`). It must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(min = 1, max = 253))]
    pub password_key: Option<String>,
}

/// NATS settings of a FusionCache.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// NATS server URL(s) (`nats://host:port` or `tls://host:port`, several separated by commas), without
    /// credentials in them. Defaults to the operator's default NATS URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 2048),
        regex(pattern = r"^(nats|tls|ws|wss)://[^\s@,]+(,\s*(nats|tls|ws|wss)://[^\s@,]+)*$")
    )]
    pub url: Option<String>,

    /// A Secret in the same namespace holding a NATS `.creds` file (JWT and NKey seed), copied into the
    /// binding Secret as the entry `nats.creds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<NatsCredentialsRef>,
}

/// A reference to a Secret holding a NATS credentials file.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsCredentialsRef {
    /// Name of the Secret, in the namespace of the FusionCache.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    /// The key of the `.creds` file in the Secret (default `nats.creds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// The requested Redis database: `auto`, or an index.
///
/// Deserializing never fails: a value that is neither (which the schema rejects, but an apiserver without
/// CEL may let through) becomes [`DatabaseRequest::Invalid`], reported as `Ready=False` by the reconciler
/// instead of breaking the watch of every FusionCache.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum DatabaseRequest {
    /// The lowest free index on the endpoint, kept once allocated.
    #[default]
    Auto,
    /// This index.
    Index(u32),
    /// A value that is neither `auto` nor an index, as written.
    Invalid(String),
}

impl fmt::Display for DatabaseRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseRequest::Auto => f.write_str("auto"),
            DatabaseRequest::Index(i) => write!(f, "{i}"),
            DatabaseRequest::Invalid(s) => f.write_str(s),
        }
    }
}

impl Serialize for DatabaseRequest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DatabaseRequest::Auto => serializer.serialize_str("auto"),
            DatabaseRequest::Index(i) => serializer.serialize_u32(*i),
            DatabaseRequest::Invalid(s) => serializer.serialize_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for DatabaseRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DatabaseRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto` or a database index")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(u32::try_from(v)
                    .map(DatabaseRequest::Index)
                    .unwrap_or_else(|_| DatabaseRequest::Invalid(v.to_string())))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u32::try_from(v)
                    .map(DatabaseRequest::Index)
                    .unwrap_or_else(|_| DatabaseRequest::Invalid(v.to_string())))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(DatabaseRequest::Invalid(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(DatabaseRequest::Invalid(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let t = v.trim();
                if t.eq_ignore_ascii_case("auto") {
                    Ok(DatabaseRequest::Auto)
                } else if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(t.parse()
                        .map(DatabaseRequest::Index)
                        .unwrap_or_else(|_| DatabaseRequest::Invalid(v.to_string())))
                } else {
                    Ok(DatabaseRequest::Invalid(v.to_string()))
                }
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(DatabaseRequest::Auto)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for DatabaseRequest {
    fn schema_name() -> Cow<'static, str> {
        "DatabaseRequest".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "x-kubernetes-validations": [{
                "rule": "type(self) == int ? self >= 0 : self == 'auto'",
                "message": "must be `auto` or a database index (an integer, 0 or more)"
            }]
        })
    }
}

/// The observed state of a FusionCache: what the operator allocated and wrote.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FusionCacheStatus {
    /// The channel prefix allocated to this cache (unique on its backplane endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_prefix: Option<String>,
    /// The backplane channel (Redis pub/sub channel or NATS subject): `{channelPrefix}.Backplane:v2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The backplane endpoint the channel prefix is allocated on: a Redis endpoint name from the operator
    /// settings, a Redis URL, or a NATS URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backplane_endpoint: Option<String>,
    /// The Redis endpoint the database (and ACL user) is allocated on: an endpoint name from the operator
    /// settings, or a Redis URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_endpoint: Option<String>,
    /// The Redis database index allocated to the distributed cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_database: Option<u32>,
    /// The prefix of the cache's Redis keys, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// The Redis ACL user provisioned for this cache (on `redisEndpoint`), when `redis.acl` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl_user: Option<String>,
    /// The SHA-256 (hex) of the ACL user's current password, never the password: how the operator notices
    /// that the binding Secret's password changed (or the Secret was deleted) and starts a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl_password_sha256: Option<String>,
    /// Previous ACL passwords that Redis still accepts during a rotation, by SHA-256, each until its
    /// `retireAfter` (the operator's password grace period after the rotation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring_passwords: Vec<RetiringPassword>,
    /// The ConfigMap holding `fusioncache.yaml` and the `FUSIONCACHE_*` values (no credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_name: Option<String>,
    /// The Secret holding every value and the credentials (a Service Binding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The Service Binding (servicebinding.io) the application can project: the Secret's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<Binding>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The conditions; `Ready` says whether the configuration is provisioned and, if not, why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl FusionCache {
    /// The namespace; an error only for an object the apiserver would never send.
    pub fn namespace_required(&self) -> crate::Result<String> {
        kube::ResourceExt::namespace(self)
            .ok_or(crate::Error::MissingObjectKey("metadata.namespace"))
    }

    /// The name; an error only for an object the apiserver would never send.
    pub fn name_required(&self) -> crate::Result<String> {
        self.metadata
            .name
            .clone()
            .ok_or(crate::Error::MissingObjectKey("metadata.name"))
    }
}

impl FusionCacheStatus {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// A previous ACL password still accepted until `retireAfter`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringPassword {
    /// The SHA-256 (hex) of the password.
    pub sha256: String,
    /// When the operator stops accepting it (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub retire_after: String,
}

/// Set to `"true"` on a FusionCache being deleted whose cleanup cannot finish (its Redis endpoint is gone or
/// unreachable): the operator then removes its finalizer without deleting the ACL user, and says so in an
/// event.
pub const SKIP_CLEANUP_ANNOTATION: &str = "fusioncache.io/skip-cleanup";

/// A Service Binding reference (`.status.binding` of a provisioned service).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Binding {
    /// The name of the Secret holding the binding.
    pub name: String,
}

/// The type of the condition that says whether the configuration is provisioned.
pub const READY: &str = "Ready";

/// A status condition (the shape of `metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A PascalCase reason for the last transition, e.g. `Provisioned` or `ChannelPrefixClash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable message about the last transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn database_request_accepts_auto_integers_and_keeps_anything_else() {
        let parse = |s: &str| serde_json::from_str::<DatabaseRequest>(s).unwrap();
        assert_eq!(parse("\"auto\""), DatabaseRequest::Auto);
        assert_eq!(parse("\"AUTO\""), DatabaseRequest::Auto);
        assert_eq!(parse("3"), DatabaseRequest::Index(3));
        assert_eq!(parse("\"7\""), DatabaseRequest::Index(7));
        assert_eq!(parse("-1"), DatabaseRequest::Invalid("-1".into()));
        assert_eq!(parse("1.5"), DatabaseRequest::Invalid("1.5".into()));
        assert_eq!(parse("\"five\""), DatabaseRequest::Invalid("five".into()));
        assert_eq!(
            parse("99999999999"),
            DatabaseRequest::Invalid("99999999999".into())
        );
        assert_eq!(
            serde_json::to_string(&DatabaseRequest::Index(2)).unwrap(),
            "2"
        );
        assert_eq!(
            serde_json::to_string(&DatabaseRequest::Auto).unwrap(),
            "\"auto\""
        );
    }

    #[test]
    fn a_spec_with_a_bad_database_still_deserializes() {
        let fc: FusionCache = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"cacheName": "a", "transport": "redis", "redis": {"database": "lots"}}
        }))
        .unwrap();
        assert_eq!(
            fc.spec.redis.unwrap().database,
            Some(DatabaseRequest::Invalid("lots".into()))
        );
    }

    #[test]
    fn crd_has_names_columns_and_status_subresource() {
        let crd = FusionCache::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.kind, KIND);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["fc".to_string()][..])
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Transport", "Channel", "DB", "Ready", "Age"]);
    }

    #[test]
    fn every_schema_property_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, prop) in props {
                    let here = format!("{path}.{name}");
                    let skip = path.is_empty()
                        && (name == "apiVersion" || name == "kind" || name == "metadata");
                    if !skip && prop.get("description").is_none() {
                        missing.push(here.clone());
                    }
                    walk(&here, prop, missing);
                }
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        let crd = serde_json::to_value(FusionCache::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        walk("", schema, &mut missing);
        assert!(
            missing.is_empty(),
            "properties without a description: {missing:?}"
        );
    }
}
