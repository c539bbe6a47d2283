//! The pure reconciler: a FusionCache, the other FusionCaches, the operator settings and the Secrets it
//! refers to → the ConfigMap, the Secret, the ACL user and the status it should have.
//!
//! No I/O here ([`crate::controller`] does it), so every decision is unit-tested. An invalid spec is not an
//! error: it becomes a [`Rejection`] (a `Ready=False` status with a reason and a message) and the objects
//! already written stay as they were, so the application keeps its last good configuration.
//!
//! What is rendered, for a resource named `{name}`:
//! - ConfigMap `{name}-fusioncache`: `fusioncache.yaml` (a [`FusionCacheConfig`]) and the same values as
//!   `FUSIONCACHE_*` keys, without credentials;
//! - Secret `{name}-fusioncache`, type `servicebinding.io/fusioncache`: `type` (`fusioncache`),
//!   `provider` (`fusioncache-operator`), every `FUSIONCACHE_*` value including `FUSIONCACHE_REDIS_USERNAME`
//!   and `FUSIONCACHE_REDIS_PASSWORD`, and `nats.creds` when a NATS credentials Secret is referenced.

use std::collections::BTreeMap;

use fusioncache::config::{
    env, BackplaneKind, DistributedCacheKind, FusionCacheConfig, NatsConfig, RedisConfig,
    BINDING_TYPE, CONFIG_FILE_NAME,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;

use crate::acl::{password_sha256, username_for, AclUser};
use crate::allocation::{default_channel_prefix, AllocationError, Allocator, DatabaseChoice};
use crate::crd::{
    Binding, Condition, DatabaseRequest, FusionCache, FusionCacheSpec, FusionCacheStatus,
    RetiringPassword, Transport, API_VERSION, KIND, READY,
};
use crate::settings::{
    canonical_redis_url, check_nats_url, check_redis_url, is_endpoint_name, RedisEndpoint,
    Settings, DEFAULT_DATABASES,
};
use crate::{Error, Result};

/// The field manager of every server-side apply, and the `provider` of the binding.
pub const MANAGER: &str = "fusioncache-operator";
/// The Secret type of the binding (Service Binding for Kubernetes).
pub const BINDING_SECRET_TYPE: &str = "servicebinding.io/fusioncache";
/// The binding Secret entry holding a NATS credentials file.
pub const NATS_CREDS_ENTRY: &str = "nats.creds";
/// Label set on every object the operator writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label naming the FusionCache an object belongs to.
pub const CACHE_LABEL: &str = "fusioncache.io/name";
/// The `Ready=True` reason.
pub const PROVISIONED: &str = "Provisioned";
/// The `Ready=False` reason when a ConfigMap or Secret of the name the operator writes exists and is not
/// the operator's (it is never taken over).
pub const OBJECT_CONFLICT: &str = "ObjectConflict";
/// How many previous ACL passwords a rotation keeps valid at once.
pub const MAX_RETIRING_PASSWORDS: usize = 3;
/// The suffix of the ConfigMap and Secret names.
pub const OBJECT_SUFFIX: &str = "-fusioncache";

/// The name of the ConfigMap and of the Secret of a FusionCache named `name`.
pub fn object_name(name: &str) -> String {
    format!("{name}{OBJECT_SUFFIX}")
}

/// Redis credentials read from the Secret named in `spec.redis.credentialsSecretRef`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisCredentials {
    /// The username, when the Secret has one.
    pub username: Option<String>,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for RedisCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The result of reading a referenced Secret.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Lookup<T> {
    /// The spec refers to no Secret.
    #[default]
    NotReferenced,
    /// The values.
    Found(T),
    /// The Secret does not exist.
    SecretMissing {
        /// Its name.
        name: String,
    },
    /// The Secret exists without the key (or with a value that is not UTF-8).
    KeyMissing {
        /// Its name.
        name: String,
        /// The key.
        key: String,
    },
}

/// Everything the reconciler decides from.
#[derive(Clone)]
pub struct Inputs<'a> {
    /// The resource.
    pub resource: &'a FusionCache,
    /// Every FusionCache in the cluster (the resource among them or not).
    pub all: &'a [FusionCache],
    /// The operator settings.
    pub settings: &'a Settings,
    /// The credentials of `spec.redis.credentialsSecretRef`.
    pub redis_credentials: Lookup<RedisCredentials>,
    /// The `.creds` file of `spec.nats.credentialsSecretRef`.
    pub nats_credentials: Lookup<String>,
    /// The ConfigMap of the name the operator writes, as it is now, if it exists.
    pub existing_config_map: Option<&'a ConfigMap>,
    /// The Secret of the name the operator writes, as it is now, if it exists (its ACL password is kept).
    pub existing_secret: Option<&'a Secret>,
    /// A new password, used when the resource gets an ACL user and has none yet.
    pub fresh_password: String,
    /// How long a previous ACL password stays valid after a rotation.
    pub password_grace: std::time::Duration,
    /// The time for a condition that changes now.
    pub now: Timestamp,
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |m: &ObjectMeta| m.name.clone();
        f.debug_struct("Inputs")
            .field("resource", &self.resource)
            .field("all", &self.all.len())
            .field("settings", &self.settings)
            .field("redis_credentials", &self.redis_credentials)
            .field(
                "nats_credentials",
                &self.nats_credentials.clone().map(|_| "<redacted>"),
            )
            .field(
                "existing_config_map",
                &self.existing_config_map.map(|c| name(&c.metadata)),
            )
            .field(
                "existing_secret",
                &self.existing_secret.map(|s| name(&s.metadata)),
            )
            .field("fresh_password", &"<redacted>")
            .field("password_grace", &self.password_grace)
            .field("now", &self.now)
            .finish()
    }
}

impl<T> Lookup<T> {
    /// The same lookup with the value mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Lookup<U> {
        match self {
            Lookup::NotReferenced => Lookup::NotReferenced,
            Lookup::Found(v) => Lookup::Found(f(v)),
            Lookup::SecretMissing { name } => Lookup::SecretMissing { name },
            Lookup::KeyMissing { name, key } => Lookup::KeyMissing { name, key },
        }
    }
}

/// The decision for one resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Write these objects and this status.
    Provision(Box<Provision>),
    /// Do not touch the objects; write this `Ready=False` status.
    Reject(Box<Rejection>),
}

/// What a valid FusionCache gets.
#[derive(Clone, PartialEq)]
pub struct Provision {
    /// The status recording the allocations, to write before anything that uses them, when they are new
    /// (so that no other resource can be handed them meanwhile).
    pub claim: Option<FusionCacheStatus>,
    /// The ConfigMap to apply.
    pub config_map: ConfigMap,
    /// The binding Secret to apply.
    pub secret: Secret,
    /// The status to apply.
    pub status: FusionCacheStatus,
    /// The ACL user to create or update, on the named endpoint.
    pub acl_user: Option<(String, AclUser)>,
    /// An ACL user the resource held and no longer needs (acl turned off, or endpoint changed):
    /// `(endpoint, username)`.
    pub stale_acl_user: Option<(String, String)>,
    /// The full configuration, credentials included (what the Secret holds).
    pub config: FusionCacheConfig,
    /// When the next retiring password expires (the resource must be reconciled then to drop it).
    pub next_retirement: Option<Timestamp>,
}

impl std::fmt::Debug for Provision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provision")
            .field("claim", &self.claim)
            .field("config_map", &self.config_map.metadata.name)
            .field(
                "secret",
                &(
                    &self.secret.metadata.name,
                    self.secret
                        .data
                        .as_ref()
                        .map(|d| d.keys().collect::<Vec<_>>()),
                ),
            )
            .field("status", &self.status)
            .field("acl_user", &self.acl_user)
            .field("stale_acl_user", &self.stale_acl_user)
            .field("config", &"<redacted: holds credentials>")
            .field("next_retirement", &self.next_retirement)
            .finish()
    }
}

/// Why a FusionCache is not provisioned.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The `Ready=False` reason.
    pub reason: &'static str,
    /// The message.
    pub message: String,
    /// Whether only a change of the resource's spec can fix it (then the controller waits for a change
    /// instead of retrying).
    pub spec_error: bool,
    /// The status to apply: the previous allocations (still used by the running application) and the
    /// `Ready=False` condition; without them when the resource lost them ([`Rejection::release`]).
    pub status: FusionCacheStatus,
    /// The resource lost an allocation it held to an older resource: its ConfigMap and Secret must be
    /// deleted and its ACL user (`(endpoint, username)`, if any) too, so that the two apps never share.
    pub release: Option<Release>,
}

/// What a resource that lost its allocations gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Its ACL user, `(endpoint, username)`.
    pub acl_user: Option<(String, String)>,
}

/// A rejection before the status is known.
struct Reject {
    reason: &'static str,
    message: String,
    spec_error: bool,
    /// The resource held what it lost.
    release: bool,
}

impl Reject {
    fn spec(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            spec_error: true,
            release: false,
        }
    }
    fn waiting(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            spec_error: false,
            release: false,
        }
    }
}

impl From<AllocationError> for Reject {
    fn from(e: AllocationError) -> Self {
        Reject {
            reason: e.reason(),
            spec_error: e.is_spec_error(),
            release: e.held(),
            message: e.to_string(),
        }
    }
}

/// Where the Redis of a cache is.
enum RedisTarget<'a> {
    /// An endpoint from the operator settings.
    Managed(&'a RedisEndpoint),
    /// A URL the operator does not manage, and its canonical form (what its allocations are keyed by).
    External(String, String),
}

impl RedisTarget<'_> {
    fn key(&self) -> String {
        match self {
            RedisTarget::Managed(e) => e.name.clone(),
            RedisTarget::External(_, canonical) => canonical.clone(),
        }
    }
    fn url(&self) -> &str {
        match self {
            RedisTarget::Managed(e) => &e.url,
            RedisTarget::External(url, _) => url,
        }
    }
    fn databases(&self) -> u32 {
        match self {
            RedisTarget::Managed(e) => e.databases,
            RedisTarget::External(..) => DEFAULT_DATABASES,
        }
    }
}

/// Decides what a FusionCache should have.
///
/// Errors only for objects the apiserver would never send (no namespace, name or uid); everything a user can
/// write is a [`Plan::Reject`] at worst.
pub fn plan(inputs: &Inputs<'_>) -> Result<Plan> {
    let fc = inputs.resource;
    let namespace = fc.namespace_required()?;
    let name = fc.name_required()?;
    let uid = fc
        .metadata
        .uid
        .clone()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let previous = fc.status.clone().unwrap_or_default();
    let generation = fc.metadata.generation;
    match provision(inputs, &namespace, &name, &uid) {
        Ok(mut p) => {
            p.status.observed_generation = generation;
            p.status.conditions = vec![ready_condition(
                &previous,
                true,
                PROVISIONED,
                provisioned_message(&p.status),
                generation,
                inputs.now,
            )];
            p.claim =
                (allocations(&previous) != allocations(&p.status)).then(|| FusionCacheStatus {
                    conditions: previous.conditions.clone(),
                    observed_generation: previous.observed_generation,
                    ..p.status.clone()
                });
            Ok(Plan::Provision(Box::new(p)))
        }
        Err(r) => {
            let mut status = previous.clone();
            let release = r.release.then(|| {
                let acl_user = previous
                    .acl_user
                    .clone()
                    .zip(previous.redis_endpoint.clone())
                    .map(|(user, endpoint)| (endpoint, user));
                status = FusionCacheStatus {
                    conditions: previous.conditions.clone(),
                    ..FusionCacheStatus::default()
                };
                Release { acl_user }
            });
            status.observed_generation = generation;
            status.conditions.retain(|c| c.type_ != READY);
            status.conditions.push(ready_condition(
                &previous,
                false,
                r.reason,
                r.message.clone(),
                generation,
                inputs.now,
            ));
            Ok(Plan::Reject(Box::new(Rejection {
                reason: r.reason,
                message: r.message,
                spec_error: r.spec_error,
                status,
                release,
            })))
        }
    }
}

/// What the controller does with the finalizer of a resource, and whether it applies or cleans up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalizerStep {
    /// Provision; add the finalizer first when the resource will need a cleanup (an ACL user), remove it
    /// afterwards when it no longer does.
    Apply {
        /// Add the finalizer before provisioning.
        add_finalizer: bool,
    },
    /// The resource is being deleted and has the finalizer: release, then remove the finalizer. With
    /// `skip`, the escape hatch annotation is set: remove the finalizer without touching Redis.
    Cleanup {
        /// [`crate::crd::SKIP_CLEANUP_ANNOTATION`] is `"true"`.
        skip: bool,
    },
    /// Being deleted without the finalizer: nothing to do (the apiserver deletes it).
    Nothing,
}

/// Whether a resource with this spec and status needs a cleanup on deletion: it asks for an ACL user or
/// still has one.
pub fn needs_cleanup(spec: &FusionCacheSpec, status: Option<&FusionCacheStatus>) -> bool {
    spec.redis.as_ref().is_some_and(|r| r.acl) || status.is_some_and(|s| s.acl_user.is_some())
}

/// Whether the resource carries `finalizer`.
pub fn has_finalizer(fc: &FusionCache, finalizer: &str) -> bool {
    fc.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == finalizer)
}

/// The finalizer step for `fc` (the finalizer is only added to resources that have something to release).
pub fn finalizer_step(fc: &FusionCache, finalizer: &str) -> FinalizerStep {
    let has = has_finalizer(fc, finalizer);
    if fc.metadata.deletion_timestamp.is_some() {
        return if has {
            FinalizerStep::Cleanup {
                skip: fc
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(crate::crd::SKIP_CLEANUP_ANNOTATION))
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
            }
        } else {
            FinalizerStep::Nothing
        };
    }
    FinalizerStep::Apply {
        add_finalizer: !has && needs_cleanup(&fc.spec, fc.status.as_ref()),
    }
}

/// What a status claims: everything but the conditions and the observed generation.
fn allocations(status: &FusionCacheStatus) -> FusionCacheStatus {
    FusionCacheStatus {
        conditions: Vec::new(),
        observed_generation: None,
        ..status.clone()
    }
}

/// The status after a failed reconcile: what was there, with `Ready=False`, `reason` and `message`, for the
/// current generation (so that an old `Ready=True` never stands for a spec that could not be provisioned).
pub fn failed_status(
    fc: &FusionCache,
    reason: &str,
    message: String,
    now: Timestamp,
) -> FusionCacheStatus {
    let previous = fc.status.clone().unwrap_or_default();
    let generation = fc.metadata.generation;
    let mut status = previous.clone();
    status.observed_generation = generation;
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.push(ready_condition(
        &previous, false, reason, message, generation, now,
    ));
    status
}

/// Whether `meta` (an existing ConfigMap or Secret) is owned by the FusionCache with this uid.
pub fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == uid && r.kind == KIND)
}

fn provisioned_message(status: &FusionCacheStatus) -> String {
    let mut msg = format!(
        "channel `{}` on `{}`",
        status.channel.as_deref().unwrap_or_default(),
        status.backplane_endpoint.as_deref().unwrap_or_default()
    );
    if let (Some(db), Some(ep)) = (status.redis_database, &status.redis_endpoint) {
        msg.push_str(&format!(", Redis database {db} on `{ep}`"));
    }
    if let Some(user) = &status.acl_user {
        msg.push_str(&format!(", ACL user `{user}`"));
    }
    msg
}

/// The Ready condition, keeping the previous transition time when the status did not flip.
fn ready_condition(
    previous: &FusionCacheStatus,
    ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .condition(READY)
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: Some(last_transition_time),
        observed_generation: generation,
    }
}

fn provision(
    inputs: &Inputs<'_>,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<Provision, Reject> {
    let fc = inputs.resource;
    let spec = &fc.spec;
    validate_spec(spec, name)?;
    let settings = inputs.settings;
    let allocator = Allocator::new(fc, inputs.all);

    // Where the backplane and the L2 live.
    let uses_redis = spec.transport == Transport::Redis || spec.distributed_cache;
    let redis_spec = match (&spec.redis, uses_redis) {
        (Some(r), true) => Some(r),
        (None, true) => {
            return Err(Reject::spec(
                "InvalidSpec",
                if spec.transport == Transport::Redis {
                    "transport `redis` needs a `redis` section (`redis: {}` uses the operator's default endpoint)"
                } else {
                    "`distributedCache: true` needs a `redis` section"
                },
            ))
        }
        (Some(_), false) => return Err(Reject::spec(
            "InvalidSpec",
            "with transport `nats`, a `redis` section is only used for the distributed cache: set \
                 `distributedCache: true` or remove it",
        )),
        (None, false) => None,
    };
    let redis_target = match redis_spec {
        None => None,
        Some(r) => Some(if let Some(endpoint) = &r.endpoint {
            RedisTarget::Managed(settings.endpoint(endpoint).ok_or_else(|| {
                Reject::spec(
                    "UnknownEndpoint",
                    format!(
                        "Redis endpoint `{endpoint}` is not in the operator settings (known: {})",
                        known_endpoints(settings)
                    ),
                )
            })?)
        } else if let Some(url) = &r.url {
            match settings.endpoint_by_url(url, namespace) {
                Some(e) => RedisTarget::Managed(e),
                None => {
                    RedisTarget::External(url.clone(), canonical_redis_url(url, Some(namespace)))
                }
            }
        } else {
            RedisTarget::Managed(settings.default_endpoint().ok_or_else(|| {
                Reject::spec(
                    "UnknownEndpoint",
                    format!(
                        "no `redis.endpoint` or `redis.url` given and the operator has no default Redis endpoint \
                         (known: {})",
                        known_endpoints(settings)
                    ),
                )
            })?)
        }),
    };
    let acl = redis_spec.is_some_and(|r| r.acl);
    if acl && redis_spec.is_some_and(|r| r.credentials_secret_ref.is_some()) {
        return Err(Reject::spec(
            "InvalidSpec",
            "`redis.acl: true` provisions its own credentials: remove `redis.credentialsSecretRef`",
        ));
    }
    let acl_endpoint = match (&redis_target, acl) {
        (Some(RedisTarget::Managed(e)), true) => Some(*e),
        (Some(RedisTarget::External(..)), true) => {
            return Err(Reject::spec(
                "InvalidSpec",
                "`redis.acl: true` needs an endpoint from the operator settings (`redis.endpoint`), not a `url`",
            ))
        }
        _ => None,
    };
    let nats_url = match spec.transport {
        Transport::Nats => Some(
            spec.nats
                .as_ref()
                .and_then(|n| n.url.clone())
                .or_else(|| settings.default_nats_url.clone())
                .ok_or_else(|| {
                    Reject::spec(
                        "InvalidSpec",
                        "transport `nats` needs `nats.url` (the operator has no default NATS URL)",
                    )
                })?,
        ),
        Transport::Redis => None,
    };

    // Allocations.
    let channel_prefix = spec.channel_prefix.clone().unwrap_or_else(|| {
        default_channel_prefix(namespace, &spec.cache_name, spec.environment.as_deref())
    });
    check_channel_prefix(&channel_prefix)?;
    let backplane_endpoint = match (&nats_url, &redis_target) {
        (Some(url), _) => url.clone(),
        (None, Some(target)) => target.key(),
        (None, None) => return Err(Reject::spec("InvalidSpec", "no backplane endpoint")),
    };
    allocator.channel_prefix(&backplane_endpoint, &channel_prefix)?;
    let redis_database = match (&redis_target, spec.distributed_cache) {
        (Some(target), true) => {
            let choice = match redis_spec
                .and_then(|r| r.database.clone())
                .unwrap_or_default()
            {
                DatabaseRequest::Auto => DatabaseChoice::Auto,
                DatabaseRequest::Index(i) => DatabaseChoice::Index(i),
                DatabaseRequest::Invalid(v) => {
                    return Err(Reject::spec(
                        "InvalidSpec",
                        format!(
                            "`redis.database` is `{v}`: use `auto` or a database index (0 or more)"
                        ),
                    ))
                }
            };
            Some(allocator.database(&target.key(), choice, target.databases())?)
        }
        _ => None,
    };
    // Every app on a Redis endpoint gets a key prefix, and no two overlap there (ACL or not).
    let key_prefix = redis_target.as_ref().map(|_| {
        spec.key_prefix
            .clone()
            .unwrap_or_else(|| format!("{channel_prefix}:"))
    });
    if let (Some(target), Some(kp)) = (&redis_target, &key_prefix) {
        allocator.key_prefix(&target.key(), kp)?;
    }

    // Never take over an object the operator did not create for this resource.
    let object = object_name(name);
    for (kind, meta) in [
        ("ConfigMap", inputs.existing_config_map.map(|c| &c.metadata)),
        ("Secret", inputs.existing_secret.map(|s| &s.metadata)),
    ] {
        if let Some(meta) = meta.filter(|m| !owned_by(m, uid)) {
            return Err(Reject::waiting(
                OBJECT_CONFLICT,
                format!(
                    "{kind} `{object}` already exists and was not created by the operator for this FusionCache: \
                     the operator does not take it over; delete or rename it{}",
                    meta.owner_references
                        .iter()
                        .flatten()
                        .next()
                        .map(|r| format!(" (it belongs to {} `{}`)", r.kind, r.name))
                        .unwrap_or_default()
                ),
            ));
        }
    }

    // Credentials.
    let credentials = match redis_spec.map(|_| &inputs.redis_credentials) {
        None | Some(Lookup::NotReferenced) => None,
        Some(Lookup::Found(c)) => Some(c.clone()),
        Some(missing) => return Err(missing_secret(missing, "redis.credentialsSecretRef")),
    };
    let nats_creds = match (&nats_url, &inputs.nats_credentials) {
        (None, _) | (_, Lookup::NotReferenced) => None,
        (Some(_), Lookup::Found(c)) => Some(c.clone()),
        (Some(_), missing) => return Err(missing_secret(missing, "nats.credentialsSecretRef")),
    };
    let previous = fc.status.clone().unwrap_or_default();
    let mut retiring = Vec::new();
    let acl_user = acl_endpoint.map(|endpoint| {
        let username = username_for(namespace, name);
        let password = existing_acl_password(inputs.existing_secret, &username)
            .unwrap_or_else(|| inputs.fresh_password.clone());
        retiring = retiring_passwords(&previous, &username, &password, inputs);
        (
            endpoint.name.clone(),
            AclUser {
                username,
                password,
                retiring_password_hashes: retiring.iter().map(|r| r.sha256.clone()).collect(),
                key_prefix: key_prefix.clone().unwrap_or_default(),
                channel: fusioncache::backplane::channel_name(
                    Some(&channel_prefix),
                    Some(&spec.cache_name),
                ),
                database: redis_database.unwrap_or(0),
            },
        )
    });
    let (username, password) = match (&acl_user, &credentials) {
        (Some((_, user)), _) => (Some(user.username.clone()), Some(user.password.clone())),
        (None, Some(c)) => (c.username.clone(), Some(c.password.clone())),
        (None, None) => (None, None),
    };

    // The configuration.
    let config = FusionCacheConfig {
        cache_name: Some(spec.cache_name.clone()),
        channel_prefix: Some(channel_prefix.clone()),
        backplane: Some(match spec.transport {
            Transport::Redis => BackplaneKind::Redis,
            Transport::Nats => BackplaneKind::Nats,
        }),
        distributed_cache: Some(if spec.distributed_cache {
            DistributedCacheKind::Redis
        } else {
            DistributedCacheKind::None
        }),
        key_prefix: key_prefix.clone(),
        redis: redis_target.as_ref().map(|t| RedisConfig {
            url: Some(t.url().to_string()),
            database: redis_database,
            username,
            password,
            ..RedisConfig::default()
        }),
        nats: nats_url.as_ref().map(|url| NatsConfig {
            url: Some(url.clone()),
            ..NatsConfig::default()
        }),
    };
    config
        .validate()
        .map_err(|e| Reject::spec("InvalidSpec", e.to_string()))?;
    let channel = config
        .channel()
        .map_err(|e| Reject::spec("InvalidSpec", e.to_string()))?;

    // The objects.
    let meta = ObjectMeta {
        name: Some(object.clone()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
            (CACHE_LABEL.to_string(), name.to_string()),
        ])),
        owner_references: Some(vec![OwnerReference {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            name: name.to_string(),
            uid: uid.to_string(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..ObjectMeta::default()
    };
    let config_map = render_config_map(meta.clone(), &config);
    let mut secret = render_secret(meta, &config, nats_creds.as_deref());
    // The password was carried over from the Secret as it was read: apply only onto that version, so that
    // a Secret deleted meanwhile (a rotation) is not brought back with the old password.
    secret.metadata.resource_version = inputs
        .existing_secret
        .and_then(|s| s.metadata.resource_version.clone());

    let redis_endpoint = redis_target.as_ref().map(RedisTarget::key);
    let stale_acl_user = match (&previous.acl_user, &previous.redis_endpoint) {
        (Some(user), Some(endpoint)) => {
            let still = acl_user
                .as_ref()
                .is_some_and(|(e, u)| e == endpoint && &u.username == user);
            (!still).then(|| (endpoint.clone(), user.clone()))
        }
        _ => None,
    };
    let status = FusionCacheStatus {
        channel_prefix: Some(channel_prefix),
        channel: Some(channel),
        backplane_endpoint: Some(backplane_endpoint),
        redis_endpoint,
        redis_database,
        key_prefix,
        acl_user: acl_user.as_ref().map(|(_, u)| u.username.clone()),
        acl_password_sha256: acl_user.as_ref().map(|(_, u)| password_sha256(&u.password)),
        retiring_passwords: retiring.clone(),
        config_map_name: Some(object.clone()),
        secret_name: Some(object.clone()),
        binding: Some(Binding { name: object }),
        observed_generation: None,
        conditions: Vec::new(),
    };
    let next_retirement = retiring
        .iter()
        .filter_map(|r| r.retire_after.parse::<Timestamp>().ok())
        .min();
    Ok(Provision {
        claim: None,
        config_map,
        secret,
        status,
        acl_user,
        stale_acl_user,
        config,
        next_retirement,
    })
}

/// The previous passwords of `username` still accepted: the ones in the status whose grace period has not
/// ended, plus the password in use until now when it changes (the binding Secret was deleted or edited);
/// at most [`MAX_RETIRING_PASSWORDS`], the newest kept.
fn retiring_passwords(
    previous: &FusionCacheStatus,
    username: &str,
    password: &str,
    inputs: &Inputs<'_>,
) -> Vec<RetiringPassword> {
    if previous.acl_user.as_deref() != Some(username) {
        return Vec::new();
    }
    let current = password_sha256(password);
    let mut kept: Vec<RetiringPassword> = previous
        .retiring_passwords
        .iter()
        .filter(|r| {
            r.sha256 != current
                && r.retire_after
                    .parse::<Timestamp>()
                    .is_ok_and(|t| t > inputs.now)
        })
        .cloned()
        .collect();
    if let Some(old) = previous
        .acl_password_sha256
        .as_ref()
        .filter(|old| **old != current)
    {
        let grace = k8s_openapi::jiff::SignedDuration::try_from(inputs.password_grace)
            .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
        let until = inputs.now.checked_add(grace).unwrap_or(Timestamp::MAX);
        kept.retain(|r| &r.sha256 != old);
        kept.push(RetiringPassword {
            sha256: old.clone(),
            retire_after: until.to_string(),
        });
    }
    let excess = kept.len().saturating_sub(MAX_RETIRING_PASSWORDS);
    kept.drain(..excess);
    kept
}

fn known_endpoints(settings: &Settings) -> String {
    if settings.redis_endpoints.is_empty() {
        "none".into()
    } else {
        settings
            .redis_endpoints
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn missing_secret<T>(lookup: &Lookup<T>, field: &str) -> Reject {
    let message = match lookup {
        Lookup::SecretMissing { name } => {
            format!("Secret `{name}` named in `{field}` does not exist")
        }
        Lookup::KeyMissing { name, key } => {
            format!(
                "Secret `{name}` named in `{field}` has no key `{key}` (or its value is not UTF-8)"
            )
        }
        Lookup::NotReferenced | Lookup::Found(_) => format!("`{field}` cannot be read"),
    };
    Reject::waiting("CredentialsNotFound", message)
}

/// The ACL password of `username` in the current binding Secret, if it holds that user's credentials.
pub fn existing_acl_password(secret: Option<&Secret>, username: &str) -> Option<String> {
    let data = secret?.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|v| !v.is_empty())
    };
    (text(env::REDIS_USERNAME)? == username)
        .then(|| text(env::REDIS_PASSWORD))
        .flatten()
}

/// The ConfigMap: `fusioncache.yaml` and the `FUSIONCACHE_*` keys, without credentials.
fn render_config_map(meta: ObjectMeta, config: &FusionCacheConfig) -> ConfigMap {
    let mut public = config.clone();
    if let Some(r) = public.redis.as_mut() {
        r.username = None;
        r.password = None;
    }
    let mut data = public.to_env();
    data.insert(CONFIG_FILE_NAME.to_string(), public.to_yaml());
    ConfigMap {
        metadata: meta,
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// The binding Secret: `type`, `provider`, every value (credentials included) and the NATS creds file.
fn render_secret(meta: ObjectMeta, config: &FusionCacheConfig, nats_creds: Option<&str>) -> Secret {
    let mut data: BTreeMap<String, ByteString> = config
        .to_env()
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect();
    data.insert("type".into(), ByteString(BINDING_TYPE.as_bytes().to_vec()));
    data.insert("provider".into(), ByteString(MANAGER.as_bytes().to_vec()));
    if let Some(creds) = nats_creds {
        data.insert(
            NATS_CREDS_ENTRY.into(),
            ByteString(creds.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: meta,
        type_: Some(BINDING_SECRET_TYPE.into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Checks what the schema should have checked, for apiservers that did not (and to never trust input).
fn validate_spec(spec: &FusionCacheSpec, name: &str) -> Result<(), Reject> {
    let invalid =
        |field: &str, why: String| Reject::spec("InvalidSpec", format!("`{field}` {why}"));
    if !is_token(&spec.cache_name) {
        return Err(invalid(
            "cacheName",
            format!(
                "is `{}`: use 1 to 63 letters, digits, `_` or `-`, starting with a letter or digit",
                spec.cache_name
            ),
        ));
    }
    if let Some(env) = &spec.environment {
        if !is_token(env) {
            return Err(invalid(
                "environment",
                format!("is `{env}`: use 1 to 63 letters, digits, `_` or `-`, starting with a letter or digit"),
            ));
        }
    }
    if let Some(prefix) = &spec.channel_prefix {
        check_channel_prefix(prefix)?;
    }
    if let Some(kp) = &spec.key_prefix {
        if kp.is_empty()
            || kp.len() > 200
            || kp
                .chars()
                .any(|c| c.is_whitespace() || "*?[]\\".contains(c))
        {
            return Err(invalid(
                "keyPrefix",
                format!("is `{kp}`: use 1 to 200 characters without whitespace or `* ? [ ] \\`"),
            ));
        }
    }
    if let Some(r) = &spec.redis {
        if r.endpoint.is_some() && r.url.is_some() {
            return Err(Reject::spec(
                "InvalidSpec",
                "set either `redis.endpoint` or `redis.url`, not both",
            ));
        }
        if let Some(e) = &r.endpoint {
            if !is_endpoint_name(e) {
                return Err(invalid(
                    "redis.endpoint",
                    format!("is `{e}`: not an endpoint name"),
                ));
            }
        }
        if let Some(url) = &r.url {
            check_redis_url(url).map_err(|why| invalid("redis.url", why))?;
        }
        if let Some(c) = &r.credentials_secret_ref {
            check_secret_ref(
                &c.name,
                [c.username_key.as_deref(), c.password_key.as_deref()],
                "redis.credentialsSecretRef",
            )?;
        }
    }
    if let Some(n) = &spec.nats {
        if let Some(url) = &n.url {
            check_nats_url(url).map_err(|why| invalid("nats.url", why))?;
        }
        if let Some(c) = &n.credentials_secret_ref {
            check_secret_ref(
                &c.name,
                [c.key.as_deref(), None],
                "nats.credentialsSecretRef",
            )?;
        }
    }
    if object_name(name).len() > 253 {
        return Err(Reject::spec(
            "InvalidSpec",
            format!(
                "the resource name is too long: `{}` must be at most 253 characters",
                object_name(name)
            ),
        ));
    }
    Ok(())
}

fn check_secret_ref(name: &str, keys: [Option<&str>; 2], field: &str) -> Result<(), Reject> {
    let dns = !name.is_empty() && name.len() <= 253 && name.split('.').all(is_endpoint_name);
    if !dns {
        return Err(Reject::spec(
            "InvalidSpec",
            format!("`{field}.name` is `{name}`: not a Secret name"),
        ));
    }
    for key in keys.into_iter().flatten() {
        let ok = !key.is_empty()
            && key.len() <= 253
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !ok {
            return Err(Reject::spec(
                "InvalidSpec",
                format!("`{field}` names the key `{key}`: not a Secret key"),
            ));
        }
    }
    Ok(())
}

/// Whether `s` matches `^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`.
fn is_token(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
}

/// A channel prefix: dot-separated non-empty tokens, no whitespace or `* > ? [ ] \`, at most 200 characters
/// (a valid NATS subject, and an exact Redis ACL channel pattern).
fn check_channel_prefix(prefix: &str) -> Result<(), Reject> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 200
        && prefix.split('.').all(|t| !t.is_empty())
        && !prefix
            .chars()
            .any(|c| c.is_whitespace() || "*>?[]\\".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Reject::spec(
            "InvalidSpec",
            format!(
                "channel prefix `{prefix}` is not valid: use dot-separated non-empty tokens without whitespace or \
                 `* > ? [ ] \\`, at most 200 characters"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{NatsCredentialsRef, NatsSpec, RedisCredentialsRef, RedisSpec};
    use crate::settings::tests::FakeEnv;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn settings() -> Settings {
        Settings::from_yaml(
            "redisEndpoints:\n  - name: main\n    url: redis://redis.cache:6379\n    databases: 4\n\
             defaultRedisEndpoint: main\ndefaultNatsUrl: nats://nats.nats:4222\n",
            &FakeEnv::default(),
        )
        .unwrap()
    }

    fn spec(transport: Transport) -> FusionCacheSpec {
        FusionCacheSpec {
            cache_name: "products".into(),
            transport,
            redis: (transport == Transport::Redis).then(RedisSpec::default),
            nats: None,
            channel_prefix: None,
            environment: None,
            key_prefix: None,
            distributed_cache: false,
        }
    }

    fn resource(ns: &str, name: &str, spec: FusionCacheSpec) -> FusionCache {
        let mut fc = FusionCache::new(name, spec);
        fc.metadata.namespace = Some(ns.into());
        fc.metadata.uid = Some(format!("uid-{ns}-{name}"));
        fc.metadata.generation = Some(1);
        fc.metadata.creation_timestamp = Some(Time("2024-01-02T00:00:00Z".parse().unwrap()));
        fc
    }

    fn inputs<'a>(
        fc: &'a FusionCache,
        all: &'a [FusionCache],
        settings: &'a Settings,
    ) -> Inputs<'a> {
        Inputs {
            resource: fc,
            all,
            settings,
            redis_credentials: Lookup::NotReferenced,
            nats_credentials: Lookup::NotReferenced,
            existing_config_map: None,
            existing_secret: None,
            fresh_password: "0123456789abcdef0123456789abcdef".into(),
            password_grace: std::time::Duration::from_secs(600),
            now: "2024-02-01T00:00:00Z".parse().unwrap(),
        }
    }

    fn provisioned(plan: Plan) -> Provision {
        match plan {
            Plan::Provision(p) => *p,
            Plan::Reject(r) => panic!("rejected: {} {}", r.reason, r.message),
        }
    }

    fn rejected(plan: Plan) -> Rejection {
        match plan {
            Plan::Reject(r) => *r,
            Plan::Provision(p) => panic!("provisioned: {:?}", p.status),
        }
    }

    fn secret_text(secret: &Secret, key: &str) -> Option<String> {
        secret
            .data
            .as_ref()?
            .get(key)
            .map(|v| String::from_utf8(v.0.clone()).unwrap())
    }

    #[test]
    fn redis_cache_gets_the_default_prefix_a_config_map_and_a_binding() {
        let settings = settings();
        let mut s = spec(Transport::Redis);
        s.distributed_cache = true;
        let fc = resource("shop", "products", s);
        let p = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        assert_eq!(p.status.channel_prefix.as_deref(), Some("shop.products"));
        assert_eq!(
            p.status.channel.as_deref(),
            Some("shop.products.Backplane:v2")
        );
        assert_eq!(p.status.redis_database, Some(0));
        assert_eq!(p.status.backplane_endpoint.as_deref(), Some("main"));
        assert_eq!(
            p.status.config_map_name.as_deref(),
            Some("products-fusioncache")
        );
        assert_eq!(
            p.status.binding.as_ref().unwrap().name,
            "products-fusioncache"
        );
        assert_eq!(p.status.observed_generation, Some(1));
        let ready = p.status.condition(READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("True", Some(PROVISIONED))
        );
        assert_eq!(
            ready.last_transition_time.as_deref(),
            Some("2024-02-01T00:00:00Z")
        );

        let data = p.config_map.data.as_ref().unwrap();
        assert_eq!(data[env::CACHE_NAME], "products");
        assert_eq!(data[env::CHANNEL_PREFIX], "shop.products");
        assert_eq!(data[env::BACKPLANE], "redis");
        assert_eq!(data[env::DISTRIBUTED_CACHE], "redis");
        assert_eq!(data[env::REDIS_URL], "redis://redis.cache:6379");
        assert_eq!(data[env::REDIS_DATABASE], "0");
        let owner = &p.config_map.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("FusionCache", "uid-shop-products")
        );
        assert_eq!(owner.controller, Some(true));

        let secret = &p.secret;
        assert_eq!(secret.type_.as_deref(), Some(BINDING_SECRET_TYPE));
        assert_eq!(secret_text(secret, "type").as_deref(), Some("fusioncache"));
        assert_eq!(
            secret_text(secret, "provider").as_deref(),
            Some("fusioncache-operator")
        );
        assert_eq!(
            secret_text(secret, env::REDIS_URL).as_deref(),
            Some("redis://redis.cache:6379")
        );
        assert!(
            secret_text(secret, env::REDIS_PASSWORD).is_none(),
            "no credentials configured"
        );
    }

    #[test]
    fn rendered_yaml_and_env_round_trip_through_the_library() {
        let settings = settings();
        let mut s = spec(Transport::Redis);
        s.distributed_cache = true;
        s.environment = Some("prod".into());
        s.redis.as_mut().unwrap().acl = true;
        let fc = resource("shop", "products", s);
        let p = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        let data = p.config_map.data.clone().unwrap();

        let from_yaml = FusionCacheConfig::from_yaml(&data[CONFIG_FILE_NAME]).unwrap();
        let mut env_only = data.clone();
        env_only.remove(CONFIG_FILE_NAME);
        let from_env = FusionCacheConfig::from_values(&env_only).unwrap();
        assert_eq!(
            from_yaml, from_env,
            "the ConfigMap's YAML and env keys say the same"
        );
        assert_eq!(
            from_yaml.channel().unwrap(),
            "shop.products.prod.Backplane:v2"
        );
        assert_eq!(from_yaml.key_prefix.as_deref(), Some("shop.products.prod:"));
        assert_eq!(
            from_yaml.redis.as_ref().unwrap().password,
            None,
            "no password in the ConfigMap"
        );
        assert!(!data[CONFIG_FILE_NAME].contains("0123456789abcdef"));
        assert!(!data.contains_key(env::REDIS_PASSWORD));

        // The Secret is a complete binding: the library reads it as a binding directory.
        let dir = std::env::temp_dir().join(format!("fc-binding-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (k, v) in p.secret.data.as_ref().unwrap() {
            std::fs::write(dir.join(k), &v.0).unwrap();
        }
        let mut from_binding = FusionCacheConfig::from_binding_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Read from a binding, the password also names its file (read again at every reconnection).
        let password_file = from_binding.redis.as_mut().unwrap().password_file.take();
        assert_eq!(password_file, Some(dir.join(env::REDIS_PASSWORD)));
        assert_eq!(from_binding, p.config);
        let redis = from_binding.redis.unwrap();
        assert_eq!(redis.username.as_deref(), Some("fc.shop.products"));
        assert_eq!(
            redis.password.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn nats_cache_uses_the_default_nats_url_and_no_database() {
        let settings = settings();
        let mut s = spec(Transport::Nats);
        s.channel_prefix = Some("team.products".into());
        s.nats = Some(NatsSpec {
            url: None,
            credentials_secret_ref: Some(NatsCredentialsRef {
                name: "nats-creds".into(),
                key: None,
            }),
        });
        let fc = resource("shop", "products", s);
        let mut i = inputs(&fc, &[], &settings);
        i.nats_credentials = Lookup::Found("-----BEGIN NATS USER JWT-----".into());
        let p = provisioned(plan(&i).unwrap());
        assert_eq!(
            p.status.backplane_endpoint.as_deref(),
            Some("nats://nats.nats:4222")
        );
        assert_eq!(
            p.status.channel.as_deref(),
            Some("team.products.Backplane:v2")
        );
        assert_eq!(p.status.redis_database, None);
        let data = p.config_map.data.unwrap();
        assert_eq!(data[env::BACKPLANE], "nats");
        assert_eq!(data[env::NATS_URL], "nats://nats.nats:4222");
        assert_eq!(data[env::DISTRIBUTED_CACHE], "none");
        assert!(!data.contains_key(env::REDIS_URL));
        assert_eq!(
            secret_text(&p.secret, NATS_CREDS_ENTRY).as_deref(),
            Some("-----BEGIN NATS USER JWT-----")
        );
    }

    #[test]
    fn credentials_from_a_referenced_secret_go_to_the_binding_only() {
        let settings = settings();
        let mut s = spec(Transport::Redis);
        s.redis = Some(RedisSpec {
            url: Some("redis://external:6379".into()),
            credentials_secret_ref: Some(RedisCredentialsRef {
                name: "redis-creds".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let fc = resource("shop", "products", s);
        let mut i = inputs(&fc, &[], &settings);
        i.redis_credentials = Lookup::Found(RedisCredentials {
            username: Some("app".into()),
            password: "pw".into(),
        });
        let p = provisioned(plan(&i).unwrap());
        assert_eq!(
            p.status.backplane_endpoint.as_deref(),
            Some("redis://external.shop:6379"),
            "allocations of an inline URL are keyed by its canonical form"
        );
        assert_eq!(
            secret_text(&p.secret, env::REDIS_USERNAME).as_deref(),
            Some("app")
        );
        assert_eq!(
            secret_text(&p.secret, env::REDIS_PASSWORD).as_deref(),
            Some("pw")
        );
        let data = p.config_map.data.unwrap();
        assert!(!data.contains_key(env::REDIS_USERNAME) && !data.contains_key(env::REDIS_PASSWORD));

        i.redis_credentials = Lookup::SecretMissing {
            name: "redis-creds".into(),
        };
        let r = rejected(plan(&i).unwrap());
        assert_eq!(r.reason, "CredentialsNotFound");
        assert!(!r.spec_error, "creating the Secret fixes it: retry");
    }

    #[test]
    fn acl_password_is_kept_from_the_existing_secret() {
        let settings = settings();
        let mut s = spec(Transport::Redis);
        s.redis.as_mut().unwrap().acl = true;
        let fc = resource("shop", "products", s);
        let first = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        let (endpoint, user) = first.acl_user.clone().unwrap();
        assert_eq!(endpoint, "main");
        assert_eq!(user.key_prefix, "shop.products:");
        assert_eq!(user.channel, "shop.products.Backplane:v2");

        assert_eq!(first.secret.metadata.resource_version, None, "a new Secret");
        let mut read = first.secret.clone();
        read.metadata.resource_version = Some("7".into());
        let mut i = inputs(&fc, &[], &settings);
        i.existing_secret = Some(&read);
        i.fresh_password = "ffffffffffffffffffffffffffffffff".into();
        let second = provisioned(plan(&i).unwrap());
        assert_eq!(second.acl_user.unwrap().1.password, user.password);
        assert_eq!(
            second.secret.metadata.resource_version.as_deref(),
            Some("7"),
            "applied only onto the version the password was read from"
        );
    }

    #[test]
    fn turning_acl_off_deletes_the_user() {
        let settings = settings();
        let mut fc = resource("shop", "products", spec(Transport::Redis));
        fc.status = Some(FusionCacheStatus {
            redis_endpoint: Some("main".into()),
            acl_user: Some("fc.shop.products".into()),
            ..Default::default()
        });
        let p = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        assert_eq!(p.acl_user, None);
        assert_eq!(
            p.stale_acl_user,
            Some(("main".into(), "fc.shop.products".into()))
        );
    }

    #[test]
    fn invalid_specs_are_rejected_with_a_reason_and_keep_the_previous_allocation() {
        let settings = settings();
        type Edit = Box<dyn Fn(&mut FusionCacheSpec)>;
        let cases: Vec<(Edit, &str, &str)> = vec![
            (
                Box::new(|s| s.redis = None),
                "InvalidSpec",
                "needs a `redis` section",
            ),
            (
                Box::new(|s| s.redis.as_mut().unwrap().endpoint = Some("nope".into())),
                "UnknownEndpoint",
                "known: main",
            ),
            (
                Box::new(|s| {
                    s.distributed_cache = true;
                    s.redis.as_mut().unwrap().database = Some(DatabaseRequest::Index(4));
                }),
                "DatabaseOutOfRange",
                "0 to 3",
            ),
            (
                Box::new(|s| {
                    s.distributed_cache = true;
                    s.redis.as_mut().unwrap().database =
                        Some(DatabaseRequest::Invalid("lots".into()));
                }),
                "InvalidSpec",
                "lots",
            ),
            (
                Box::new(|s| s.channel_prefix = Some("a..b".into())),
                "InvalidSpec",
                "a..b",
            ),
            (
                Box::new(|s| s.channel_prefix = Some("a.>".into())),
                "InvalidSpec",
                "a.>",
            ),
            (
                Box::new(|s| s.cache_name = "has space".into()),
                "InvalidSpec",
                "cacheName",
            ),
            (
                Box::new(|s| s.key_prefix = Some("k*".into())),
                "InvalidSpec",
                "keyPrefix",
            ),
            (
                Box::new(|s| s.redis.as_mut().unwrap().url = Some("redis://h:1".into())),
                "InvalidSpec",
                "both",
            ),
            (
                Box::new(|s| {
                    let r = s.redis.as_mut().unwrap();
                    r.endpoint = None;
                    r.url = Some("redis://u:p@h:1".into());
                }),
                "InvalidSpec",
                "credentials",
            ),
            (
                Box::new(|s| {
                    let r = s.redis.as_mut().unwrap();
                    r.endpoint = None;
                    r.url = Some("redis://elsewhere:1".into());
                    r.acl = true;
                }),
                "InvalidSpec",
                "needs an endpoint",
            ),
        ];
        for (edit, reason, needle) in cases {
            let mut s = spec(Transport::Redis);
            s.redis.as_mut().unwrap().endpoint = Some("main".into());
            edit(&mut s);
            let mut fc = resource("shop", "products", s);
            fc.status = Some(FusionCacheStatus {
                channel_prefix: Some("shop.products".into()),
                redis_database: Some(2),
                ..Default::default()
            });
            let r = rejected(plan(&inputs(&fc, &[], &settings)).unwrap());
            assert_eq!(r.reason, reason, "{}", r.message);
            assert!(r.message.contains(needle), "{needle} in {}", r.message);
            let ready = r.status.condition(READY).unwrap();
            assert_eq!(ready.status, "False");
            assert_eq!(r.status.redis_database, Some(2), "previous allocation kept");
            assert_eq!(r.status.observed_generation, Some(1));
        }
    }

    #[test]
    fn a_prefix_clash_names_the_other_resource() {
        let settings = settings();
        let mut other = resource("other", "orders", spec(Transport::Redis));
        other.spec.channel_prefix = Some("shop.products".into());
        other.status = Some(FusionCacheStatus {
            backplane_endpoint: Some("main".into()),
            channel_prefix: Some("shop.products".into()),
            ..Default::default()
        });
        let fc = resource("shop", "products", spec(Transport::Redis));
        let all = vec![other, fc.clone()];
        let r = rejected(plan(&inputs(&fc, &all, &settings)).unwrap());
        assert_eq!(r.reason, "ChannelPrefixClash");
        assert!(r.message.contains("other/orders"), "{}", r.message);
        assert!(!r.spec_error);
    }

    #[test]
    fn transition_time_only_moves_when_readiness_flips() {
        let settings = settings();
        let mut fc = resource("shop", "products", spec(Transport::Redis));
        fc.status = Some(FusionCacheStatus {
            conditions: vec![Condition {
                type_: READY.into(),
                status: "True".into(),
                reason: Some(PROVISIONED.into()),
                message: Some("old".into()),
                last_transition_time: Some("2023-01-01T00:00:00Z".into()),
                observed_generation: Some(1),
            }],
            ..Default::default()
        });
        let p = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        assert_eq!(
            p.status
                .condition(READY)
                .unwrap()
                .last_transition_time
                .as_deref(),
            Some("2023-01-01T00:00:00Z")
        );
        fc.spec.redis = None;
        let r = rejected(plan(&inputs(&fc, &[], &settings)).unwrap());
        assert_eq!(
            r.status
                .condition(READY)
                .unwrap()
                .last_transition_time
                .as_deref(),
            Some("2024-02-01T00:00:00Z")
        );
    }

    #[test]
    fn no_type_holding_a_password_shows_it_in_debug() {
        let settings = Settings::from_yaml(
            "redisEndpoints:\n  - name: main\n    url: redis://redis.cache:6379\n    adminPassword: hunter2-admin\n",
            &FakeEnv::default(),
        )
        .unwrap();
        let mut s = spec(Transport::Redis);
        s.distributed_cache = true;
        s.redis.as_mut().unwrap().acl = true;
        let fc = resource("shop", "products", s);
        let first = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        let mut secret = first.secret.clone();
        secret.data.as_mut().unwrap().insert(
            env::REDIS_PASSWORD.into(),
            ByteString(b"hunter2-secret".to_vec()),
        );
        let mut i = inputs(&fc, &[], &settings);
        i.existing_secret = Some(&secret);
        i.fresh_password = "hunter2-fresh".into();
        i.redis_credentials = Lookup::Found(RedisCredentials {
            username: Some("app".into()),
            password: "hunter2-ref".into(),
        });
        i.nats_credentials = Lookup::Found("hunter2-nats".into());
        let plan = plan(&i).unwrap();
        let Plan::Provision(p) = &plan else {
            panic!("provisioned")
        };
        assert!(secret_text(&p.secret, env::REDIS_PASSWORD)
            .unwrap()
            .contains("hunter2"));
        let mut bad = resource("shop", "products", spec(Transport::Redis));
        bad.spec.redis = None;
        let rejected = super::plan(&inputs(&bad, &[], &settings)).unwrap();
        let formatted = [
            format!("{settings:?}"),
            format!("{:?}", settings.redis_endpoints[0]),
            format!("{i:?}"),
            format!("{plan:?}"),
            format!("{p:?}"),
            format!("{:?}", p.acl_user),
            format!("{:?}", i.redis_credentials),
            format!("{rejected:?}"),
            format!("{:?}", crate::acl::RedisAclProvisioner::default()),
        ];
        for text in formatted {
            assert!(!text.contains("hunter2"), "a password in {text}");
            assert!(
                !text.contains(&first.acl_user.as_ref().unwrap().1.password),
                "{text}"
            );
        }
    }

    #[test]
    fn new_allocations_are_claimed_before_anything_uses_them_and_kept_ones_are_not_claimed_again() {
        let settings = settings();
        let mut s = spec(Transport::Redis);
        s.distributed_cache = true;
        let fc = resource("shop", "products", s);
        let first = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        let claim = first.claim.clone().expect("a claim for new allocations");
        assert_eq!(claim.redis_database, Some(0));
        assert_eq!(claim.key_prefix.as_deref(), Some("shop.products:"));
        assert!(
            claim.conditions.is_empty(),
            "the claim does not say Ready yet"
        );
        let fc = FusionCache {
            status: Some(first.status.clone()),
            ..fc
        };
        let again = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        assert_eq!(again.claim, None);
    }

    #[test]
    fn every_redis_app_gets_a_key_prefix_acl_or_not() {
        let settings = settings();
        let mut s = spec(Transport::Redis);
        s.distributed_cache = true;
        let p =
            provisioned(plan(&inputs(&resource("shop", "products", s), &[], &settings)).unwrap());
        assert_eq!(p.status.key_prefix.as_deref(), Some("shop.products:"));
        assert_eq!(p.config.key_prefix.as_deref(), Some("shop.products:"));
        let nats = provisioned(
            plan(&inputs(
                &resource("shop", "n", spec(Transport::Nats)),
                &[],
                &settings,
            ))
            .unwrap(),
        );
        assert_eq!(nats.status.key_prefix, None, "no Redis, no key prefix");
    }

    #[test]
    fn a_resource_that_lost_what_it_held_releases_its_objects_and_acl_user() {
        let settings = settings();
        let held = |fc: &mut FusionCache| {
            fc.status = Some(FusionCacheStatus {
                backplane_endpoint: Some("main".into()),
                channel_prefix: Some("shop.products".into()),
                redis_endpoint: Some("main".into()),
                acl_user: Some("fc.x.products".into()),
                key_prefix: Some("shop.products:".into()),
                ..Default::default()
            })
        };
        let mut older = resource("shop", "products", spec(Transport::Redis));
        older.metadata.creation_timestamp = Some(Time("2023-01-01T00:00:00Z".parse().unwrap()));
        held(&mut older);
        let mut s = spec(Transport::Redis);
        s.channel_prefix = Some("shop.products".into());
        let mut newer = resource("x", "products", s);
        held(&mut newer);
        let all = vec![older, newer.clone()];
        let r = rejected(plan(&inputs(&newer, &all, &settings)).unwrap());
        assert_eq!(r.reason, "ChannelPrefixClash");
        assert_eq!(
            r.release,
            Some(Release {
                acl_user: Some(("main".into(), "fc.x.products".into()))
            })
        );
        assert_eq!(r.status.channel_prefix, None, "the loser keeps nothing");
        assert_eq!(r.status.acl_user, None);

        // A resource that never held it only waits.
        let mut s = spec(Transport::Redis);
        s.channel_prefix = Some("shop.products".into());
        let fresh = resource("y", "products", s);
        let r = rejected(plan(&inputs(&fresh, &all, &settings)).unwrap());
        assert_eq!(r.release, None);
    }

    #[test]
    fn objects_the_operator_did_not_create_are_never_taken_over() {
        let settings = settings();
        let fc = resource("shop", "products", spec(Transport::Redis));
        let theirs = ConfigMap {
            metadata: ObjectMeta {
                name: Some("products-fusioncache".into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        let mut i = inputs(&fc, &[], &settings);
        i.existing_config_map = Some(&theirs);
        let r = rejected(plan(&i).unwrap());
        assert_eq!(r.reason, OBJECT_CONFLICT);
        assert!(
            r.message.contains("ConfigMap `products-fusioncache`"),
            "{}",
            r.message
        );
        assert!(!r.spec_error, "deleting the object fixes it: retry");
        // Its own objects (owned by its uid) are fine.
        let own = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        i.existing_config_map = Some(&own.config_map);
        i.existing_secret = Some(&own.secret);
        provisioned(plan(&i).unwrap());
    }

    #[test]
    fn a_changed_password_keeps_the_previous_one_valid_for_the_grace_period() {
        let settings = settings();
        let mut s = spec(Transport::Redis);
        s.redis.as_mut().unwrap().acl = true;
        let fc = resource("shop", "products", s);
        let first = provisioned(plan(&inputs(&fc, &[], &settings)).unwrap());
        let old = first.acl_user.clone().unwrap().1.password;
        let fc = FusionCache {
            status: Some(first.status.clone()),
            ..fc
        };
        // The binding Secret is gone: a new password, the old one retiring in 10 minutes.
        let mut i = inputs(&fc, &[], &settings);
        i.fresh_password = "ffffffffffffffffffffffffffffffff".into();
        let rotated = provisioned(plan(&i).unwrap());
        let user = rotated.acl_user.clone().unwrap().1;
        assert_eq!(user.password, "ffffffffffffffffffffffffffffffff");
        assert_eq!(
            user.retiring_password_hashes,
            vec![crate::acl::password_sha256(&old)]
        );
        assert_eq!(
            rotated.status.retiring_passwords[0].retire_after,
            "2024-02-01T00:10:00Z"
        );
        assert_eq!(
            rotated.next_retirement,
            Some("2024-02-01T00:10:00Z".parse().unwrap())
        );
        assert!(
            rotated.claim.is_some(),
            "the rotation is recorded before the user changes"
        );
        // After the grace period it is dropped.
        let fc = FusionCache {
            status: Some(rotated.status.clone()),
            ..fc
        };
        let mut later = inputs(&fc, &[], &settings);
        later.existing_secret = Some(&rotated.secret);
        later.now = "2024-02-01T00:10:01Z".parse().unwrap();
        let settled = provisioned(plan(&later).unwrap());
        assert!(settled
            .acl_user
            .unwrap()
            .1
            .retiring_password_hashes
            .is_empty());
        assert!(settled.status.retiring_passwords.is_empty());
    }

    #[test]
    fn the_finalizer_is_only_for_resources_with_something_to_release() {
        const F: &str = "fusioncache.io/cleanup";
        let plain = resource("shop", "products", spec(Transport::Redis));
        assert_eq!(
            finalizer_step(&plain, F),
            FinalizerStep::Apply {
                add_finalizer: false
            }
        );
        let mut acl = plain.clone();
        acl.spec.redis.as_mut().unwrap().acl = true;
        assert_eq!(
            finalizer_step(&acl, F),
            FinalizerStep::Apply {
                add_finalizer: true
            }
        );
        acl.metadata.finalizers = Some(vec![F.into()]);
        assert_eq!(
            finalizer_step(&acl, F),
            FinalizerStep::Apply {
                add_finalizer: false
            }
        );
        acl.metadata.deletion_timestamp = Some(Time("2024-03-01T00:00:00Z".parse().unwrap()));
        assert_eq!(
            finalizer_step(&acl, F),
            FinalizerStep::Cleanup { skip: false }
        );
        acl.metadata.annotations = Some(BTreeMap::from([(
            crate::crd::SKIP_CLEANUP_ANNOTATION.to_string(),
            "True".to_string(),
        )]));
        assert_eq!(
            finalizer_step(&acl, F),
            FinalizerStep::Cleanup { skip: true }
        );
        acl.metadata.finalizers = None;
        assert_eq!(finalizer_step(&acl, F), FinalizerStep::Nothing);
    }

    #[test]
    fn objects_the_apiserver_never_sends_are_errors_not_panics() {
        let settings = settings();
        let mut fc = resource("shop", "products", spec(Transport::Redis));
        fc.metadata.uid = None;
        assert!(matches!(
            plan(&inputs(&fc, &[], &settings)),
            Err(Error::MissingObjectKey("metadata.uid"))
        ));
    }
}
