//! The controller: the I/O around [`reconcile::plan`].
//!
//! For each FusionCache (and whenever a ConfigMap or Secret it owns changes, or its ACL user went missing):
//! - the finalizer ([`reconcile::finalizer_step`]) is added only to resources that will have something to
//!   release (an ACL user), and removed when they no longer do;
//! - **Apply**: list every FusionCache in scope (fresh from the apiserver: allocations are read from their
//!   status), read the Secrets the spec refers to and the ConfigMap/Secret of the name the operator writes,
//!   [`plan`](reconcile::plan); then either provision — first the status that records new allocations (the
//!   claim), then the ACL user, then server-side apply of the ConfigMap and the Secret (field manager
//!   `fusioncache-operator`), then the `Ready=True` status — or reject (a `Ready=False` status; a resource
//!   that lost an allocation to an older one also loses its ConfigMap, Secret and ACL user). An event is
//!   published when the Ready condition changes. A failure (apiserver or Redis) writes `Ready=False` with
//!   the reason and the current generation, then is retried with backoff;
//! - **Cleanup**: delete the ACL user; when Redis cannot be reached, a `Ready=False` `CleanupFailed`
//!   condition and an event say why and name the escape hatch ([`SKIP_CLEANUP_ANNOTATION`]). The
//!   allocations go with the status, the ConfigMap and Secret with their owner.
//!
//! Reconciles run one at a time (one lock across the controllers of every watched namespace), so two
//! resources are never handed the same allocation; leader election ([`crate::leader`]) keeps a second
//! replica from reconciling at the same time.
//!
//! A watchdog checks every [`Options::acl_check_interval`] that the ACL users of every endpoint exist
//! (`ACL USERS`) and reconciles the resources whose user is gone (a Redis restart without persistence).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::acl::{generate_password, AclProvisioner};
use crate::crd::{
    FusionCache, FusionCacheStatus, API_VERSION, KIND, READY, SKIP_CLEANUP_ANNOTATION,
};
use crate::metrics::Metrics;
use crate::reconcile::{
    self, FinalizerStep, Inputs, Lookup, Plan, RedisCredentials, MANAGED_BY_LABEL, MANAGER,
};
use crate::server::State;
use crate::settings::Settings;
use crate::{Error, Result};

/// The finalizer that keeps a FusionCache until its ACL user is deleted.
pub const FINALIZER: &str = "fusioncache.io/cleanup";
/// The reason of the `Ready=False` condition of a resource whose cleanup failed.
pub const CLEANUP_FAILED: &str = "CleanupFailed";

/// The controller's timings and scope (`run` flags; short values make the end-to-end tests fast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// How often a provisioned resource is reconciled without any change (heals drift; default 5 min).
    pub resync: Duration,
    /// How often a resource rejected for a reason outside its spec (a clash, a missing Secret) is retried
    /// (default 1 min).
    pub retry_rejected: Duration,
    /// The first error backoff; it doubles per consecutive error up to `max_backoff` (default 5 s).
    pub min_backoff: Duration,
    /// The longest error backoff (default 5 min).
    pub max_backoff: Duration,
    /// How often the ACL users of every endpoint are checked (default 10 s).
    pub acl_check_interval: Duration,
    /// How long a previous ACL password stays valid after a rotation (default 10 min).
    pub password_grace: Duration,
    /// The namespaces to watch; empty: every namespace.
    pub namespaces: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(300),
            retry_rejected: Duration::from_secs(60),
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
            acl_check_interval: Duration::from_secs(10),
            password_grace: Duration::from_secs(600),
            namespaces: Vec::new(),
        }
    }
}

impl Options {
    /// The backoff after `failures` consecutive errors: `min_backoff`, doubled per failure, up to
    /// `max_backoff`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        self.min_backoff
            .saturating_mul(1 << exp)
            .min(self.max_backoff)
    }
}

/// What the reconciler needs.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// The operator settings.
    pub settings: Arc<Settings>,
    /// Creates and deletes Redis ACL users.
    pub acl: Arc<dyn AclProvisioner>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Timings and scope.
    pub options: Options,
    /// Consecutive failures per resource (namespace/name), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Held by every reconcile: one at a time across every watched namespace.
    serial: tokio::sync::Mutex<()>,
}

impl Context {
    /// A context; `reporter` names the controller (and pod) in events.
    pub fn new(
        client: Client,
        reporter: Reporter,
        settings: Arc<Settings>,
        acl: Arc<dyn AclProvisioner>,
        metrics: Arc<Metrics>,
        options: Options,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            acl,
            metrics,
            options,
            failures: Mutex::new(HashMap::new()),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    fn failure_count(&self, key: &str, increment: bool) -> u32 {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if increment {
            let n = failures.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        } else {
            failures.remove(key);
            0
        }
    }

    fn api<K>(&self, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        scoped(self.client.clone(), namespace)
    }
}

fn scoped<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

fn object_key(fc: &FusionCache) -> String {
    format!("{}/{}", fc.namespace().unwrap_or_default(), fc.name_any())
}

/// Reconciles one FusionCache, in a `reconcile` span (the resource and its generation) that every log line
/// of the reconcile carries.
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(resource = %object_key(&fc), generation = fc.metadata.generation)
)]
pub async fn reconcile(fc: Arc<FusionCache>, ctx: Arc<Context>) -> Result<Action> {
    let _serial = ctx.serial.lock().await;
    let _measure = ctx.metrics.reconcile.count_and_measure();
    let key = object_key(&fc);
    debug!("reconciling");
    let result = match reconcile::finalizer_step(&fc, FINALIZER) {
        FinalizerStep::Nothing => Ok(Action::await_change()),
        FinalizerStep::Cleanup { skip } => cleanup(&fc, &ctx, skip).await,
        FinalizerStep::Apply { add_finalizer } => {
            let fc = if add_finalizer {
                Arc::new(self::add_finalizer(&fc, &ctx).await?)
            } else {
                fc.clone()
            };
            let mut latest = None;
            match apply(&fc, &ctx, &mut latest).await {
                Ok(action) => Ok(action),
                Err(error) => {
                    // Say it in the status (on top of what the apiserver has, a claim included), for this
                    // generation; the error is retried with backoff.
                    let base = latest.unwrap_or_else(|| (*fc).clone());
                    let status = reconcile::failed_status(
                        &base,
                        error.reason(),
                        error.to_string(),
                        Timestamp::now(),
                    );
                    if let Err(e) = write_status(&base, &ctx, &status).await {
                        debug!(resource = %key, error = %e, "cannot record the failure in the status");
                    }
                    Err(error)
                }
            }
        }
    };
    if result.is_ok() {
        ctx.failure_count(&key, false);
    }
    result
}

/// What the controller does after a failed reconcile: count it and retry with backoff.
pub fn error_policy(fc: Arc<FusionCache>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = object_key(&fc);
    let failures = ctx.failure_count(&key, true);
    let delay = ctx.options.backoff(failures);
    warn!(resource = %key, %error, failures, retry_in = ?delay, "reconcile failed");
    ctx.metrics.reconcile.set_failure(error);
    Action::requeue(delay)
}

fn fc_api(fc: &FusionCache, ctx: &Context) -> Result<Api<FusionCache>> {
    Ok(Api::namespaced(
        ctx.client.clone(),
        &fc.namespace_required()?,
    ))
}

async fn add_finalizer(fc: &FusionCache, ctx: &Context) -> Result<FusionCache> {
    let current = fc.metadata.finalizers.clone();
    let patch = match &current {
        None => serde_json::json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ]),
        Some(list) => serde_json::json!([
            { "op": "test", "path": "/metadata/finalizers", "value": list },
            { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER },
        ]),
    };
    json_patch(fc, ctx, patch).await
}

async fn remove_finalizer(fc: &FusionCache, ctx: &Context) -> Result<()> {
    let Some(i) = fc
        .metadata
        .finalizers
        .iter()
        .flatten()
        .position(|f| f == FINALIZER)
    else {
        return Ok(());
    };
    let patch = serde_json::json!([
        { "op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER },
        { "op": "remove", "path": format!("/metadata/finalizers/{i}") },
    ]);
    json_patch(fc, ctx, patch).await.map(drop)
}

async fn json_patch(
    fc: &FusionCache,
    ctx: &Context,
    patch: serde_json::Value,
) -> Result<FusionCache> {
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(Error::Serialization)?;
    fc_api(fc, ctx)?
        .patch(
            &fc.name_required()?,
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .map_err(Error::Kube)
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

async fn lookup<T>(
    secrets: &Api<Secret>,
    name: Option<(&str, String)>,
    read: impl FnOnce(&Secret, &str) -> Option<T>,
) -> Result<Lookup<T>> {
    let Some((name, key)) = name else {
        return Ok(Lookup::NotReferenced);
    };
    Ok(match secrets.get_opt(name).await.map_err(Error::Kube)? {
        None => Lookup::SecretMissing { name: name.into() },
        Some(s) => match read(&s, &key) {
            None => Lookup::KeyMissing {
                name: name.into(),
                key,
            },
            Some(v) => Lookup::Found(v),
        },
    })
}

/// Every FusionCache in the operator's scope, fresh from the apiserver.
async fn list_all(ctx: &Context) -> Result<Vec<FusionCache>> {
    let scopes: Vec<Option<&str>> = if ctx.options.namespaces.is_empty() {
        vec![None]
    } else {
        ctx.options
            .namespaces
            .iter()
            .map(|n| Some(n.as_str()))
            .collect()
    };
    let mut all = Vec::new();
    for ns in scopes {
        all.extend(
            ctx.api::<FusionCache>(ns)
                .list(&ListParams::default())
                .await
                .map_err(Error::Kube)?
                .items,
        );
    }
    Ok(all)
}

/// Provisions or rejects `fc`; `latest` is set to the resource as last known (listed, then with the claim
/// written on the way), so that a failure is recorded on top of it.
async fn apply(
    fc: &FusionCache,
    ctx: &Context,
    latest: &mut Option<FusionCache>,
) -> Result<Action> {
    let namespace = fc.namespace_required()?;
    let name = fc.name_required()?;
    let all = list_all(ctx).await?;
    // Decide from the resource as the apiserver has it now: the watch may not have delivered our own last
    // status write yet, and a stale status would forget a claim or a retiring password.
    let fresh = all
        .iter()
        .find(|o| o.uid().is_some() && o.uid() == fc.uid());
    let fc = fresh.unwrap_or(fc);
    *latest = Some(fc.clone());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);

    let redis_ref = fc
        .spec
        .redis
        .as_ref()
        .and_then(|r| r.credentials_secret_ref.as_ref());
    let redis_credentials = lookup(
        &secrets,
        redis_ref.map(|r| {
            (
                r.name.as_str(),
                r.password_key.clone().unwrap_or_else(|| "password".into()),
            )
        }),
        |s, password_key| {
            Some(RedisCredentials {
                username: secret_value(
                    s,
                    redis_ref
                        .and_then(|r| r.username_key.as_deref())
                        .unwrap_or("username"),
                )
                .filter(|u| !u.is_empty()),
                password: secret_value(s, password_key)?,
            })
        },
    )
    .await?;
    let nats_ref = fc
        .spec
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret_ref.as_ref());
    let nats_credentials = lookup(
        &secrets,
        nats_ref.map(|r| {
            (
                r.name.as_str(),
                r.key
                    .clone()
                    .unwrap_or_else(|| reconcile::NATS_CREDS_ENTRY.into()),
            )
        }),
        secret_value,
    )
    .await?;
    let object = reconcile::object_name(&name);
    let existing_config_map = config_maps.get_opt(&object).await.map_err(Error::Kube)?;
    let existing_secret = secrets.get_opt(&object).await.map_err(Error::Kube)?;
    let acl = fc.spec.redis.as_ref().is_some_and(|r| r.acl);
    let fresh_password = if acl {
        generate_password()?
    } else {
        String::new()
    };
    let now = Timestamp::now();
    let plan = reconcile::plan(&Inputs {
        resource: fc,
        all: &all,
        settings: &ctx.settings,
        redis_credentials,
        nats_credentials,
        existing_config_map: existing_config_map.as_ref(),
        existing_secret: existing_secret.as_ref(),
        fresh_password,
        password_grace: ctx.options.password_grace,
        now,
    })?;

    match plan {
        Plan::Provision(p) => {
            // The claim first: once it is in the status, no other resource can be handed it.
            let mut fc = fc.clone();
            if let Some(claim) = &p.claim {
                write_status(&fc, ctx, claim).await?;
                fc.status = Some(claim.clone());
                *latest = Some(fc.clone());
            }
            let fc = &fc;
            if let Some((endpoint_name, user)) = &p.acl_user {
                let endpoint = ctx
                    .settings
                    .endpoint(endpoint_name)
                    .ok_or(Error::MissingObjectKey("settings endpoint"))?;
                ctx.acl.ensure_user(endpoint, user).await?;
            }
            if let Some((endpoint_name, username)) = &p.stale_acl_user {
                delete_acl_user(fc, ctx, endpoint_name, username).await?;
            }
            // Force: the operator owns these objects (plan refused any it did not create), so whatever
            // another manager changed in them is put back.
            let params = PatchParams::apply(MANAGER).force();
            config_maps
                .patch(&object, &params, &Patch::Apply(&p.config_map))
                .await
                .map_err(Error::Kube)?;
            match secrets
                .patch(&object, &params, &Patch::Apply(&p.secret))
                .await
            {
                Ok(_) => {}
                // It changed since it was read (deleted for a rotation, say): decide again from it.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    debug!(resource = %object_key(fc), "the binding Secret changed meanwhile: again");
                    return Ok(Action::requeue(Duration::from_millis(50)));
                }
                Err(e) => return Err(Error::Kube(e)),
            }
            write_status(fc, ctx, &p.status).await?;
            if reconcile::has_finalizer(fc, FINALIZER)
                && !reconcile::needs_cleanup(&fc.spec, Some(&p.status))
            {
                remove_finalizer(fc, ctx).await?;
            }
            ctx.metrics
                .reconcile
                .set_outcome(true, reconcile::PROVISIONED);
            let mut requeue = ctx.options.resync;
            if let Some(at) = p.next_retirement {
                let until = at.duration_since(now).unsigned_abs();
                requeue = requeue.min(until + Duration::from_millis(100));
            }
            Ok(Action::requeue(requeue))
        }
        Plan::Reject(r) => {
            info!(resource = %object_key(fc), reason = r.reason, message = %r.message, "not provisioned");
            if let Some(release) = &r.release {
                let uid = fc.uid().unwrap_or_default();
                let mut released = Vec::new();
                if let Some(cm) =
                    existing_config_map.filter(|c| reconcile::owned_by(&c.metadata, &uid))
                {
                    delete_owned(&config_maps, &cm.name_any()).await?;
                    released.push(format!("ConfigMap {}", cm.name_any()));
                }
                if let Some(s) = existing_secret.filter(|s| reconcile::owned_by(&s.metadata, &uid))
                {
                    delete_owned(&secrets, &s.name_any()).await?;
                    released.push(format!("Secret {}", s.name_any()));
                }
                if let Some((endpoint_name, username)) = &release.acl_user {
                    delete_acl_user(fc, ctx, endpoint_name, username).await?;
                    released.push(format!("ACL user {username}"));
                }
                if !released.is_empty() {
                    warn!(resource = %object_key(fc), released = %released.join(", "),
                        "lost an allocation to an older resource: gave up what used it");
                }
            }
            write_status(fc, ctx, &r.status).await?;
            if r.release.is_some() {
                forget_allocations(fc, ctx).await?;
            }
            ctx.metrics.reconcile.set_outcome(false, r.reason);
            Ok(if r.spec_error {
                Action::await_change()
            } else {
                Action::requeue(ctx.options.retry_rejected)
            })
        }
    }
}

/// Removes the allocation fields from the status even where another field manager set them (a restored
/// backup, a hand edit): server-side apply only removes what the operator's own manager owns.
async fn forget_allocations(fc: &FusionCache, ctx: &Context) -> Result<()> {
    let fields = [
        "channelPrefix",
        "channel",
        "backplaneEndpoint",
        "redisEndpoint",
        "redisDatabase",
        "keyPrefix",
        "aclUser",
        "aclPasswordSha256",
        "retiringPasswords",
        "configMapName",
        "secretName",
        "binding",
    ];
    let nulls: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|f| (f.to_string(), serde_json::Value::Null))
        .collect();
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    fc_api(fc, ctx)?
        .patch_status(
            &fc.name_required()?,
            &params,
            &Patch::Merge(serde_json::json!({ "status": nulls })),
        )
        .await
        .map(drop)
        .map_err(Error::Kube)
}

async fn delete_owned<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

async fn delete_acl_user(
    fc: &FusionCache,
    ctx: &Context,
    endpoint_name: &str,
    username: &str,
) -> Result<()> {
    match ctx.settings.endpoint(endpoint_name) {
        Some(endpoint) => Ok(ctx.acl.delete_user(endpoint, username).await?),
        None => {
            warn!(
                resource = %object_key(fc), endpoint = %endpoint_name, user = %username,
                "the endpoint of an ACL user is no longer in the settings; not deleting it"
            );
            Ok(())
        }
    }
}

/// Applies the status when it changed, and publishes an event when the Ready condition changed.
async fn write_status(fc: &FusionCache, ctx: &Context, status: &FusionCacheStatus) -> Result<()> {
    let previous = fc.status.clone().unwrap_or_default();
    if &previous == status {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": status,
    });
    fc_api(fc, ctx)?
        .patch_status(
            &fc.name_required()?,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Kube)?;

    let summary = |s: &FusionCacheStatus| {
        s.condition(READY)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    if summary(&previous) != summary(status) {
        if let Some(ready) = status.condition(READY) {
            let ok = ready.status == "True";
            publish(
                fc,
                ctx,
                Event {
                    type_: if ok {
                        EventType::Normal
                    } else {
                        EventType::Warning
                    },
                    reason: ready.reason.clone().unwrap_or_else(|| READY.to_string()),
                    note: ready.message.clone(),
                    action: if ok { "Provision" } else { "Validate" }.into(),
                    secondary: None,
                },
            )
            .await;
        }
    }
    Ok(())
}

/// Publishes an event; a failure is logged, never fatal (events are best effort).
async fn publish(fc: &FusionCache, ctx: &Context, event: Event) {
    if let Err(error) = ctx.recorder.publish(&event, &fc.object_ref(&())).await {
        warn!(resource = %object_key(fc), %error, reason = %event.reason, "cannot publish event");
    }
}

async fn cleanup(fc: &FusionCache, ctx: &Context, skip: bool) -> Result<Action> {
    let status = fc.status.clone().unwrap_or_default();
    let mut released = Vec::new();
    let acl_user = status.acl_user.clone().zip(status.redis_endpoint.clone());
    if skip {
        let note = match &acl_user {
            Some((user, endpoint)) => format!(
                "{SKIP_CLEANUP_ANNOTATION} is set: ACL user `{user}` on endpoint `{endpoint}` is left in place; \
                 delete it by hand (ACL DELUSER {user})"
            ),
            None => format!("{SKIP_CLEANUP_ANNOTATION} is set: nothing was released"),
        };
        publish(
            fc,
            ctx,
            Event {
                type_: EventType::Warning,
                reason: "CleanupSkipped".into(),
                note: Some(note),
                action: "Cleanup".into(),
                secondary: None,
            },
        )
        .await;
        remove_finalizer(fc, ctx).await?;
        return Ok(Action::await_change());
    }
    if let Some((user, endpoint_name)) = &acl_user {
        if let Err(error) = delete_acl_user(fc, ctx, endpoint_name, user).await {
            let message = format!(
                "cannot delete ACL user `{user}` on Redis endpoint `{endpoint_name}`: {error}; the deletion \
                 waits until it can. To finish it without deleting the user: kubectl annotate fusioncache -n {} \
                 {} {SKIP_CLEANUP_ANNOTATION}=true",
                fc.namespace().unwrap_or_default(),
                fc.name_any(),
            );
            let failed = reconcile::failed_status(fc, CLEANUP_FAILED, message, Timestamp::now());
            if let Err(e) = write_status(fc, ctx, &failed).await {
                debug!(error = %e, "cannot record the cleanup failure in the status");
            }
            return Err(error);
        }
        released.push(format!("deleted ACL user `{user}` on `{endpoint_name}`"));
    }
    if let Some(prefix) = &status.channel_prefix {
        released.push(format!("released channel prefix `{prefix}`"));
    }
    if let Some(db) = status.redis_database {
        released.push(format!("released Redis database {db}"));
    }
    publish(
        fc,
        ctx,
        Event {
            type_: EventType::Normal,
            reason: "Released".into(),
            note: Some(if released.is_empty() {
                "nothing to release".into()
            } else {
                released.join("; ")
            }),
            action: "Cleanup".into(),
            secondary: None,
        },
    )
    .await;
    remove_finalizer(fc, ctx).await?;
    Ok(Action::await_change())
}

/// Marks the process ready once every watched scope's first list of FusionCaches is done.
///
/// It is fed by the watch streams themselves (their `InitDone`), not by waiting on a store: kube-runtime
/// wakes only one waiter of a store, and the controller is one already.
pub struct Readiness {
    pending: AtomicUsize,
    listed: Vec<AtomicBool>,
    state: State,
}

impl Readiness {
    /// Readiness over `scopes` watch streams.
    pub fn new(scopes: usize, state: State) -> Arc<Self> {
        Arc::new(Self {
            pending: AtomicUsize::new(scopes),
            listed: (0..scopes).map(|_| AtomicBool::new(false)).collect(),
            state,
        })
    }

    /// The first list of scope `i` is done.
    pub fn listed(&self, i: usize) {
        if !self.listed[i].swap(true, Ordering::AcqRel)
            && self.pending.fetch_sub(1, Ordering::AcqRel) == 1
        {
            info!("first list of FusionCaches done: ready");
            self.state.set_ready();
        }
    }
}

fn scopes(options: &Options) -> Vec<Option<String>> {
    if options.namespaces.is_empty() {
        vec![None]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    }
}

/// The FusionCaches of one scope: a store and the stream that fills it, which marks `readiness` at its
/// first complete list. After every complete list (the first, and each relist after a `410 Gone`), every
/// object in the store is sent to `relisted`: objects the relist brought in are announced before they are
/// in the store, and kube-runtime drops a reconcile of an object it cannot find.
fn fusioncaches(
    client: Client,
    scope: Option<&str>,
    readiness: Arc<Readiness>,
    index: usize,
    relisted: Option<mpsc::UnboundedSender<ObjectRef<FusionCache>>>,
) -> (
    Store<FusionCache>,
    impl Stream<Item = Result<FusionCache, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let store = reader.clone();
    let stream = watcher(
        scoped::<FusionCache>(client, scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .inspect(move |event| {
        if let Ok(watcher::Event::InitDone) = event {
            readiness.listed(index);
            if let Some(tx) = &relisted {
                for fc in store.state() {
                    let _ = tx.send(ObjectRef::from_obj(fc.as_ref()));
                }
            }
        }
    })
    .applied_objects();
    (reader, stream)
}

/// Watches FusionCaches without reconciling (a replica that is not the leader): ready once listed.
pub async fn standby(client: Client, options: Options, state: State) {
    let scopes = scopes(&options);
    let readiness = Readiness::new(scopes.len(), state);
    let streams = scopes.iter().enumerate().map(|(i, scope)| {
        let (_store, stream) =
            fusioncaches(client.clone(), scope.as_deref(), readiness.clone(), i, None);
        stream.boxed()
    });
    futures_util::stream::select_all(streams)
        .for_each(|event| async move {
            if let Err(error) = event {
                warn!(%error, "watching FusionCaches");
            }
        })
        .await;
}

async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs the controller until `shutdown` turns true; marks `state` ready once the first list of FusionCaches
/// of every watched scope is done.
pub async fn run(
    client: Client,
    settings: Settings,
    acl: Arc<dyn AclProvisioner>,
    state: State,
    options: Options,
    shutdown: watch::Receiver<bool>,
) {
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        reporter,
        Arc::new(settings),
        acl,
        state.metrics.clone(),
        options.clone(),
    ));
    let scopes = scopes(&options);
    let readiness = Readiness::new(scopes.len(), state);
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let mut stores = Vec::new();
    let mut triggers = Vec::new();
    let mut runs = Vec::new();
    for (i, scope) in scopes.iter().enumerate() {
        let (trigger, triggered) = mpsc::unbounded_channel::<ObjectRef<FusionCache>>();
        let (store, stream) = fusioncaches(
            client.clone(),
            scope.as_deref(),
            readiness.clone(),
            i,
            Some(trigger.clone()),
        );
        let triggered = futures_util::stream::unfold(triggered, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        });
        let controller = Controller::for_stream(stream, store.clone())
            .owns(
                scoped::<ConfigMap>(client.clone(), scope.as_deref()),
                owned.clone(),
            )
            .owns(
                scoped::<Secret>(client.clone(), scope.as_deref()),
                owned.clone(),
            )
            .reconcile_on(triggered)
            .with_config(controller::Config::default().concurrency(1))
            .graceful_shutdown_on(stopped(shutdown.clone()));
        stores.push(store);
        triggers.push(trigger);
        runs.push(
            controller
                .run(reconcile, error_policy, ctx.clone())
                .for_each(|result| async move {
                    match result {
                        Ok((object, _)) => debug!(resource = %object, "reconciled"),
                        // Already logged and counted by error_policy.
                        Err(controller::Error::ReconcilerFailed(error, object)) => {
                            debug!(resource = %object, %error, "reconcile failed")
                        }
                        // Watch errors (CRD not installed, RBAC, apiserver unreachable): the watcher retries.
                        Err(error) => warn!(%error, "controller error"),
                    }
                }),
        );
    }
    let watchdog = tokio::spawn(watch_acl_users(ctx.clone(), stores, triggers, shutdown));
    futures_util::future::join_all(runs).await;
    watchdog.abort();
    info!("controller stopped");
}

/// Every `acl_check_interval`, checks that the ACL user of every provisioned resource exists on its endpoint
/// and has the resource reconciled when it does not.
async fn watch_acl_users(
    ctx: Arc<Context>,
    stores: Vec<Store<FusionCache>>,
    triggers: Vec<mpsc::UnboundedSender<ObjectRef<FusionCache>>>,
    shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(ctx.options.acl_check_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = stopped(shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut stop => return,
        }
        let mut expected: BTreeMap<String, Vec<(String, ObjectRef<FusionCache>, usize)>> =
            BTreeMap::new();
        for (i, store) in stores.iter().enumerate() {
            for fc in store.state() {
                if fc.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let Some(status) = &fc.status else { continue };
                if let (Some(user), Some(endpoint)) = (&status.acl_user, &status.redis_endpoint) {
                    expected.entry(endpoint.clone()).or_default().push((
                        user.clone(),
                        ObjectRef::from_obj(fc.as_ref()),
                        i,
                    ));
                }
            }
        }
        for (endpoint_name, users) in expected {
            let Some(endpoint) = ctx.settings.endpoint(&endpoint_name) else {
                continue;
            };
            match ctx.acl.list_users(endpoint).await {
                Ok(existing) => {
                    for (user, object, i) in users {
                        if !existing.contains(&user) {
                            info!(resource = %object, endpoint = %endpoint_name, %user,
                                "ACL user missing (Redis restarted?): provisioning it again");
                            ctx.metrics.acl_users_restored.inc();
                            let _ = triggers[i].send(object);
                        }
                    }
                }
                Err(error) => debug!(endpoint = %endpoint_name, %error, "cannot list ACL users"),
            }
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn termination() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_minimum_up_to_the_maximum() {
        let o = Options::default();
        assert_eq!(o.backoff(1), Duration::from_secs(5));
        assert_eq!(o.backoff(2), Duration::from_secs(10));
        assert_eq!(o.backoff(4), Duration::from_secs(40));
        assert_eq!(o.backoff(7), Duration::from_secs(300));
        assert_eq!(o.backoff(u32::MAX), Duration::from_secs(300));
        let fast = Options {
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            ..Options::default()
        };
        assert_eq!(fast.backoff(1), Duration::from_millis(200));
        assert_eq!(fast.backoff(5), Duration::from_secs(1));
    }

    #[test]
    fn readiness_waits_for_every_scope_once() {
        let state = State::default();
        let r = Readiness::new(2, state.clone());
        r.listed(0);
        r.listed(0);
        assert!(!state.is_ready(), "one scope listed twice is not two");
        r.listed(1);
        assert!(state.is_ready());
    }
}
