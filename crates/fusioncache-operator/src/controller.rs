//! The controller: the I/O around [`reconcile::plan`].
//!
//! For each FusionCache (and whenever a ConfigMap or Secret it owns changes), inside
//! [`kube::runtime::finalizer()`]:
//! - **Apply**: list every FusionCache (fresh from the apiserver: allocations are read from their status),
//!   read the Secrets the spec refers to, [`plan`](reconcile::plan); then either provision (ACL user, then
//!   server-side apply of the ConfigMap, the Secret and the status, field manager `fusioncache-operator`) or
//!   reject (a `Ready=False` status; the objects are left as they were). An event is published when the
//!   Ready condition changes.
//! - **Cleanup**: delete the ACL user; the allocations go with the status, the ConfigMap and Secret with
//!   their owner.
//!
//! Invalid specs are not errors: they wait for a change of the spec (or retry slowly when another resource
//! or a missing Secret is the cause). Errors (apiserver or Redis unreachable) are retried with an exponential
//! backoff per resource, 5 s doubling up to 5 min. Reconciles run one at a time so that two resources
//! cannot be given the same allocation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::acl::{generate_password, AclProvisioner};
use crate::crd::{FusionCache, FusionCacheStatus, API_VERSION, KIND, READY};
use crate::metrics::Metrics;
use crate::reconcile::{self, Inputs, Lookup, Plan, RedisCredentials, MANAGED_BY_LABEL, MANAGER};
use crate::server::State;
use crate::settings::Settings;
use crate::{Error, Result};

/// The finalizer that keeps a FusionCache until its ACL user is deleted.
pub const FINALIZER: &str = "fusioncache.io/cleanup";
/// How often a provisioned resource is checked again without any change (re-applies the ACL user and the
/// objects, healing drift).
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a resource rejected for a reason outside its spec (a clash, a missing Secret) is retried.
pub const RETRY_REJECTED: Duration = Duration::from_secs(60);
/// The first error backoff; it doubles per consecutive error up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(5);
/// The longest error backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

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
    /// Consecutive failures per resource (namespace/name), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context; `reporter` names the controller (and pod) in events.
    pub fn new(
        client: Client,
        reporter: Reporter,
        settings: Arc<Settings>,
        acl: Arc<dyn AclProvisioner>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            acl,
            metrics,
            failures: Mutex::new(HashMap::new()),
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
}

fn object_key(fc: &FusionCache) -> String {
    format!("{}/{}", fc.namespace().unwrap_or_default(), fc.name_any())
}

/// The backoff after `failures` consecutive errors: 5 s, 10 s, 20 s, … up to 5 min.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    MIN_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

/// Reconciles one FusionCache.
pub async fn reconcile(fc: Arc<FusionCache>, ctx: Arc<Context>) -> Result<Action> {
    let _measure = ctx.metrics.reconcile.count_and_measure();
    let key = object_key(&fc);
    let namespace = fc.namespace_required()?;
    let api: Api<FusionCache> = Api::namespaced(ctx.client.clone(), &namespace);
    debug!(resource = %key, "reconciling");
    let action = finalizer(&api, FINALIZER, fc, |event| async {
        match event {
            Finalizer::Apply(fc) => apply(&fc, &ctx).await,
            Finalizer::Cleanup(fc) => cleanup(&fc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failure_count(&key, false);
    Ok(action)
}

/// What the controller does after a failed reconcile: count it and retry with backoff.
pub fn error_policy(fc: Arc<FusionCache>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = object_key(&fc);
    let failures = ctx.failure_count(&key, true);
    let delay = backoff(failures);
    warn!(resource = %key, %error, failures, retry_in = ?delay, "reconcile failed");
    ctx.metrics.reconcile.set_failure(error);
    Action::requeue(delay)
}

async fn lookup_secret(api: &Api<Secret>, name: &str) -> Result<Option<Secret>> {
    api.get_opt(name).await.map_err(Error::Kube)
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

async fn apply(fc: &FusionCache, ctx: &Context) -> Result<Action> {
    let namespace = fc.namespace_required()?;
    let name = fc.name_required()?;
    let all = Api::<FusionCache>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?
        .items;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    let redis_spec = fc.spec.redis.as_ref();
    let redis_credentials = match redis_spec.and_then(|r| r.credentials_secret_ref.as_ref()) {
        None => Lookup::NotReferenced,
        Some(r) => match lookup_secret(&secrets, &r.name).await? {
            None => Lookup::SecretMissing {
                name: r.name.clone(),
            },
            Some(s) => {
                let password_key = r.password_key.as_deref().unwrap_or("password");
                match secret_value(&s, password_key) {
                    None => Lookup::KeyMissing {
                        name: r.name.clone(),
                        key: password_key.to_string(),
                    },
                    Some(password) => Lookup::Found(RedisCredentials {
                        username: secret_value(&s, r.username_key.as_deref().unwrap_or("username"))
                            .filter(|u| !u.is_empty()),
                        password,
                    }),
                }
            }
        },
    };
    let nats_credentials = match fc
        .spec
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret_ref.as_ref())
    {
        None => Lookup::NotReferenced,
        Some(r) => match lookup_secret(&secrets, &r.name).await? {
            None => Lookup::SecretMissing {
                name: r.name.clone(),
            },
            Some(s) => {
                let key = r.key.as_deref().unwrap_or(reconcile::NATS_CREDS_ENTRY);
                match secret_value(&s, key) {
                    None => Lookup::KeyMissing {
                        name: r.name.clone(),
                        key: key.to_string(),
                    },
                    Some(creds) => Lookup::Found(creds),
                }
            }
        },
    };
    let acl = redis_spec.is_some_and(|r| r.acl);
    let existing_secret = if acl {
        lookup_secret(&secrets, &reconcile::object_name(&name)).await?
    } else {
        None
    };
    let fresh_password = if acl {
        generate_password()?
    } else {
        String::new()
    };

    let plan = reconcile::plan(&Inputs {
        resource: fc,
        all: &all,
        settings: &ctx.settings,
        redis_credentials,
        nats_credentials,
        existing_secret: existing_secret.as_ref(),
        fresh_password,
        now: Timestamp::now(),
    })?;

    match plan {
        Plan::Provision(p) => {
            if let Some((endpoint_name, user)) = &p.acl_user {
                let endpoint = ctx
                    .settings
                    .endpoint(endpoint_name)
                    .ok_or(Error::MissingObjectKey("settings endpoint"))?;
                ctx.acl.ensure_user(endpoint, user).await?;
            }
            if let Some((endpoint_name, username)) = &p.stale_acl_user {
                match ctx.settings.endpoint(endpoint_name) {
                    Some(endpoint) => ctx.acl.delete_user(endpoint, username).await?,
                    None => warn!(
                        resource = %object_key(fc), endpoint = %endpoint_name, user = %username,
                        "the endpoint of a stale ACL user is no longer in the settings; not deleting it"
                    ),
                }
            }
            let params = PatchParams::apply(MANAGER).force();
            let config_map_name = reconcile::object_name(&name);
            Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace)
                .patch(&config_map_name, &params, &Patch::Apply(&p.config_map))
                .await
                .map_err(Error::Kube)?;
            secrets
                .patch(&config_map_name, &params, &Patch::Apply(&p.secret))
                .await
                .map_err(Error::Kube)?;
            write_status(fc, ctx, &p.status).await?;
            ctx.metrics
                .reconcile
                .set_outcome(true, reconcile::PROVISIONED);
            Ok(Action::requeue(RESYNC))
        }
        Plan::Reject(r) => {
            info!(resource = %object_key(fc), reason = r.reason, message = %r.message, "not provisioned");
            write_status(fc, ctx, &r.status).await?;
            ctx.metrics.reconcile.set_outcome(false, r.reason);
            Ok(if r.spec_error {
                Action::await_change()
            } else {
                Action::requeue(RETRY_REJECTED)
            })
        }
    }
}

/// Applies the status when it changed, and publishes an event when the Ready condition changed.
async fn write_status(fc: &FusionCache, ctx: &Context, status: &FusionCacheStatus) -> Result<()> {
    let previous = fc.status.clone().unwrap_or_default();
    if &previous == status {
        return Ok(());
    }
    let namespace = fc.namespace_required()?;
    let api: Api<FusionCache> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": status,
    });
    api.patch_status(
        &fc.name_any(),
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

async fn cleanup(fc: &FusionCache, ctx: &Context) -> Result<Action> {
    let status = fc.status.clone().unwrap_or_default();
    let mut released = Vec::new();
    if let (Some(user), Some(endpoint_name)) = (&status.acl_user, &status.redis_endpoint) {
        match ctx.settings.endpoint(endpoint_name) {
            Some(endpoint) => {
                ctx.acl.delete_user(endpoint, user).await?;
                released.push(format!("deleted ACL user `{user}` on `{endpoint_name}`"));
            }
            None => warn!(
                resource = %object_key(fc), endpoint = %endpoint_name, user = %user,
                "the endpoint of the ACL user is no longer in the settings; not deleting it"
            ),
        }
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
    Ok(Action::await_change())
}

/// Runs the controller until a termination signal; marks `state` ready once the first list of
/// FusionCaches succeeded.
pub async fn run(client: Client, settings: Settings, acl: Arc<dyn AclProvisioner>, state: State) {
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
    ));
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let controller = Controller::new(
        Api::<FusionCache>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
    .owns(Api::<Secret>::all(client), owned)
    .with_config(controller::Config::default().concurrency(1))
    .shutdown_on_signal();
    let store = controller.store();
    let ready = state.clone();
    tokio::spawn(async move {
        if store.wait_until_ready().await.is_ok() {
            info!("first list of FusionCaches done: ready");
            ready.set_ready();
        }
    });
    controller
        .run(reconcile, error_policy, ctx)
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
        })
        .await;
    info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{RedisSpec, Transport};
    use crate::fixtures::{test_settings, Expect, Reply};
    use crate::reconcile::{BINDING_SECRET_TYPE, PROVISIONED};
    use fusioncache::config::{env, FusionCacheConfig, CONFIG_FILE_NAME};
    use http::Method;
    use serde_json::Value;

    fn redis_spec() -> crate::crd::FusionCacheSpec {
        crate::crd::FusionCacheSpec {
            cache_name: "products".into(),
            transport: Transport::Redis,
            redis: Some(RedisSpec::default()),
            nats: None,
            channel_prefix: None,
            environment: None,
            key_prefix: None,
            distributed_cache: true,
        }
    }

    async fn run(fc: &FusionCache, ctx: &Arc<Context>) -> Result<Action> {
        tokio::time::timeout(
            Duration::from_secs(5),
            reconcile(Arc::new(fc.clone()), ctx.clone()),
        )
        .await
        .expect("reconcile finished")
    }

    fn data(body: &Value) -> &serde_json::Map<String, Value> {
        body["data"].as_object().expect("data")
    }

    fn decoded(body: &Value, key: &str) -> String {
        let b64 = data(body)[key].as_str().unwrap();
        let bytes: k8s_openapi::ByteString =
            serde_json::from_value(Value::String(b64.into())).unwrap();
        String::from_utf8(bytes.0).unwrap()
    }

    /// The status a resource has after a successful provisioning (what the apiserver would hold).
    fn provisioned_status(fc: &FusionCache) -> FusionCacheStatus {
        let settings = test_settings();
        let plan = reconcile::plan(&Inputs {
            resource: fc,
            all: &[],
            settings: &settings,
            redis_credentials: Lookup::NotReferenced,
            nats_credentials: Lookup::NotReferenced,
            existing_secret: None,
            fresh_password: String::new(),
            now: "2024-01-01T00:00:00Z".parse().unwrap(),
        })
        .unwrap();
        match plan {
            Plan::Provision(p) => p.status,
            Plan::Reject(r) => panic!("{}", r.message),
        }
    }

    #[tokio::test]
    async fn create_adds_the_finalizer_then_applies_config_map_secret_and_ready_status() {
        let (ctx, server, acl) = Context::test();
        let fc = FusionCache::test("products", redis_spec());
        let finalized = fc.clone().finalized();
        let script = server.run(vec![
            Expect::add_finalizer(&fc),
            Expect::list(std::slice::from_ref(&finalized)),
            Expect::apply_config_map("products-fusioncache", |body| {
                assert_eq!(body["kind"], "ConfigMap");
                assert_eq!(
                    body["metadata"]["ownerReferences"][0]["kind"],
                    "FusionCache"
                );
                assert_eq!(
                    body["metadata"]["ownerReferences"][0]["uid"],
                    "uid-products"
                );
                assert_eq!(
                    body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                    "fusioncache-operator"
                );
                let data = data(body);
                assert_eq!(data[env::CHANNEL_PREFIX], "default.products");
                assert_eq!(data[env::REDIS_DATABASE], "0");
                let yaml = data[CONFIG_FILE_NAME].as_str().unwrap();
                let config = FusionCacheConfig::from_yaml(yaml).unwrap();
                assert_eq!(config.channel().unwrap(), "default.products.Backplane:v2");
            }),
            Expect::apply_secret("products-fusioncache", |body| {
                assert_eq!(body["type"], BINDING_SECRET_TYPE);
                assert_eq!(decoded(body, "type"), "fusioncache");
                assert_eq!(decoded(body, "provider"), "fusioncache-operator");
                assert_eq!(decoded(body, env::REDIS_URL), "redis://redis.cache:6379");
            }),
            Expect::apply_status(&finalized, |status| {
                let ready = status.condition(READY).unwrap();
                assert_eq!(ready.status, "True");
                assert_eq!(ready.reason.as_deref(), Some(PROVISIONED));
                assert_eq!(
                    status.channel.as_deref(),
                    Some("default.products.Backplane:v2")
                );
                assert_eq!(status.redis_database, Some(0));
                assert_eq!(
                    status.binding.as_ref().unwrap().name,
                    "products-fusioncache"
                );
                assert_eq!(status.observed_generation, Some(1));
            }),
            Expect::event("Normal", "Provisioned", |note| {
                assert!(note.contains("default.products.Backplane:v2"), "{note}")
            }),
        ]);
        assert_eq!(run(&fc, &ctx).await.unwrap(), Action::await_change());
        assert_eq!(
            run(&finalized, &ctx).await.unwrap(),
            Action::requeue(RESYNC)
        );
        script.await.unwrap();
        assert!(acl.calls().is_empty());
    }

    #[tokio::test]
    async fn spec_change_renders_a_new_config_map_and_keeps_the_database() {
        let (ctx, server, _) = Context::test();
        let before = FusionCache::test("products", redis_spec()).finalized();
        let status = provisioned_status(&before);
        let mut after = before.clone().with_status(status);
        after.spec.environment = Some("staging".into());
        after.metadata.generation = Some(2);
        let script = server.run(vec![
            Expect::list(std::slice::from_ref(&after)),
            Expect::apply_config_map("products-fusioncache", |body| {
                assert_eq!(data(body)[env::CHANNEL_PREFIX], "default.products.staging");
            }),
            Expect::apply_secret("products-fusioncache", |body| {
                assert_eq!(
                    decoded(body, env::CHANNEL_PREFIX),
                    "default.products.staging"
                );
            }),
            Expect::apply_status(&after, |status| {
                assert_eq!(
                    status.channel_prefix.as_deref(),
                    Some("default.products.staging")
                );
                assert_eq!(status.redis_database, Some(0));
                assert_eq!(status.observed_generation, Some(2));
                let ready = status.condition(READY).unwrap();
                assert_eq!(
                    ready.last_transition_time.as_deref(),
                    Some("2024-01-01T00:00:00Z")
                );
            }),
            Expect::event("Normal", "Provisioned", |note| {
                assert!(note.contains("staging"), "{note}")
            }),
        ]);
        run(&after, &ctx).await.unwrap();
        script.await.unwrap();
    }

    #[tokio::test]
    async fn delete_runs_cleanup_then_removes_the_finalizer() {
        let (ctx, server, acl) = Context::test();
        let mut spec = redis_spec();
        spec.redis.as_mut().unwrap().acl = true;
        let fc = FusionCache::test("products", spec).finalized();
        let status = provisioned_status(&fc);
        assert_eq!(status.acl_user.as_deref(), Some("fc.default.products"));
        let deleting = fc.with_status(status).needs_delete();
        let script = server.run(vec![
            Expect::event("Normal", "Released", |note| {
                assert!(
                    note.contains("deleted ACL user `fc.default.products`"),
                    "{note}"
                );
                assert!(note.contains("released Redis database 0"), "{note}");
            }),
            Expect::remove_finalizer(&deleting),
        ]);
        assert_eq!(run(&deleting, &ctx).await.unwrap(), Action::await_change());
        script.await.unwrap();
        assert_eq!(acl.calls(), ["DELUSER main fc.default.products"]);
    }

    #[tokio::test]
    async fn prefix_clash_sets_ready_false_naming_the_other_resource() {
        let (ctx, server, _) = Context::test();
        let mut other_spec = redis_spec();
        other_spec.cache_name = "orders".into();
        other_spec.channel_prefix = Some("default.products".into());
        other_spec.distributed_cache = false;
        let other = FusionCache::test("orders", other_spec).finalized();
        let other = other.clone().with_status(provisioned_status(&other));
        let fc = FusionCache::test("products", redis_spec()).finalized();
        let script = server.run(vec![
            Expect::list(&[other, fc.clone()]),
            Expect::apply_status(&fc, |status| {
                let ready = status.condition(READY).unwrap();
                assert_eq!(ready.status, "False");
                assert_eq!(ready.reason.as_deref(), Some("ChannelPrefixClash"));
                assert!(ready.message.as_deref().unwrap().contains("default/orders"));
                assert_eq!(status.channel_prefix, None, "nothing allocated");
            }),
            Expect::event("Warning", "ChannelPrefixClash", |note| {
                assert!(note.contains("default/orders"), "{note}")
            }),
        ]);
        assert_eq!(
            run(&fc, &ctx).await.unwrap(),
            Action::requeue(RETRY_REJECTED)
        );
        script.await.unwrap();
    }

    #[tokio::test]
    async fn invalid_spec_sets_ready_false_with_an_event_and_waits_without_looping() {
        let (ctx, server, _) = Context::test();
        let mut spec = redis_spec();
        spec.redis = None;
        let fc = FusionCache::test("products", spec).finalized();
        let rejected = Arc::new(Mutex::new(None));
        let seen = rejected.clone();
        let script = server.run(vec![
            Expect::list(std::slice::from_ref(&fc)),
            Expect::apply_status(&fc, move |status| {
                let ready = status.condition(READY).unwrap();
                assert_eq!(ready.status, "False");
                assert_eq!(ready.reason.as_deref(), Some("InvalidSpec"));
                assert!(ready
                    .message
                    .as_deref()
                    .unwrap()
                    .contains("`redis` section"));
                *seen.lock().unwrap() = Some(status.clone());
            }),
            Expect::event("Warning", "InvalidSpec", |_| {}),
        ]);
        assert_eq!(run(&fc, &ctx).await.unwrap(), Action::await_change());
        script.await.unwrap();

        // The same resource with that status: nothing to write, no event, still waiting for a change.
        let (ctx, server, _) = Context::test();
        let fc = fc.with_status(rejected.lock().unwrap().clone().unwrap());
        let script = server.run(vec![Expect::list(std::slice::from_ref(&fc))]);
        assert_eq!(run(&fc, &ctx).await.unwrap(), Action::await_change());
        script.await.unwrap();
    }

    #[tokio::test]
    async fn acl_resource_gets_a_user_and_its_credentials_in_the_binding() {
        let (ctx, server, acl) = Context::test();
        let mut spec = redis_spec();
        spec.redis.as_mut().unwrap().acl = true;
        let fc = FusionCache::test("products", spec).finalized();
        let script = server.run(vec![
            Expect::list(std::slice::from_ref(&fc)),
            Expect::secret_not_found("products-fusioncache"),
            Expect::apply_config_map("products-fusioncache", |body| {
                let data = data(body);
                assert!(!data.contains_key(env::REDIS_PASSWORD));
                assert_eq!(data[env::KEY_PREFIX], "default.products:");
            }),
            Expect::apply_secret("products-fusioncache", |body| {
                assert_eq!(decoded(body, env::REDIS_USERNAME), "fc.default.products");
                let password = decoded(body, env::REDIS_PASSWORD);
                assert_eq!(password.len(), 32);
            }),
            Expect::apply_status(&fc, |status| {
                assert_eq!(status.acl_user.as_deref(), Some("fc.default.products"));
            }),
            Expect::event("Normal", "Provisioned", |note| {
                assert!(note.contains("ACL user"), "{note}")
            }),
        ]);
        run(&fc, &ctx).await.unwrap();
        script.await.unwrap();
        assert_eq!(acl.calls(), ["SETUSER main fc.default.products"]);
    }

    #[tokio::test]
    async fn api_errors_fail_the_reconcile_and_error_policy_backs_off_and_counts() {
        let (ctx, server, _) = Context::test();
        let fc = FusionCache::test("products", redis_spec()).finalized();
        let script = server.run(vec![Expect::new(
            Method::GET,
            "/apis/fusioncache.io/v1alpha1/fusioncaches?",
            |_| {},
            Reply::NotFound,
        )]);
        let err = run(&fc, &ctx).await.unwrap_err();
        script.await.unwrap();
        assert_eq!(err.metric_label(), "kube");
        let fc = Arc::new(fc);
        assert_eq!(
            error_policy(fc.clone(), &err, ctx.clone()),
            Action::requeue(Duration::from_secs(5))
        );
        assert_eq!(
            error_policy(fc, &err, ctx.clone()),
            Action::requeue(Duration::from_secs(10))
        );
        assert!(ctx
            .metrics
            .encode()
            .contains("fusioncache_operator_reconcile_failures_total{error=\"kube\"} 2"));
    }

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
