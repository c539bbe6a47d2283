//! Test fixtures: a scripted mock apiserver (after kube-rs controller-rs' `fixtures.rs`), a fake ACL
//! provisioner, and builders for FusionCache resources.
//!
//! A test lists the requests it expects, in order, each with its method and path, a check of its body and
//! the answer; the verifier asserts each one and fails on any request past the script.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::Client;
use serde_json::{json, Value};

use crate::acl::{AclError, AclProvisioner, AclUser};
use crate::controller::{Context, FINALIZER};
use crate::crd::{FusionCache, FusionCacheSpec, FusionCacheStatus};
use crate::metrics::Metrics;
use crate::settings::{RedisEndpoint, Settings};

/// The namespace of test resources.
pub const NS: &str = "default";

impl FusionCache {
    /// A resource in [`NS`] as the apiserver would send it (uid, generation, creation time), without a
    /// finalizer.
    pub fn test(name: &str, spec: FusionCacheSpec) -> Self {
        let mut fc = FusionCache::new(name, spec);
        fc.metadata.namespace = Some(NS.into());
        fc.metadata.uid = Some(format!("uid-{name}"));
        fc.metadata.generation = Some(1);
        fc.metadata.creation_timestamp = Some(Time("2024-01-01T00:00:00Z".parse().unwrap()));
        fc
    }

    /// With the operator's finalizer.
    pub fn finalized(mut self) -> Self {
        self.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        self
    }

    /// Being deleted.
    pub fn needs_delete(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(Time("2024-03-01T00:00:00Z".parse().unwrap()));
        self
    }

    /// With this status.
    pub fn with_status(mut self, status: FusionCacheStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// A fake ACL provisioner that records calls (`SETUSER endpoint user` / `DELUSER endpoint user`).
#[derive(Default)]
pub struct FakeAcl {
    /// The calls so far.
    pub calls: Mutex<Vec<String>>,
}

impl FakeAcl {
    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl AclProvisioner for FakeAcl {
    fn ensure_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        user: &'a AclUser,
    ) -> BoxFuture<'a, Result<(), AclError>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("SETUSER {} {}", endpoint.name, user.username));
        Box::pin(async { Ok(()) })
    }

    fn delete_user<'a>(
        &'a self,
        endpoint: &'a RedisEndpoint,
        username: &'a str,
    ) -> BoxFuture<'a, Result<(), AclError>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("DELUSER {} {username}", endpoint.name));
        Box::pin(async { Ok(()) })
    }
}

/// What the mock apiserver answers.
pub enum Reply {
    /// 200 with this JSON.
    Json(Value),
    /// 200 with the request body.
    Echo,
    /// 200 with what the body's `status` does to this object (a status apply).
    StatusOf(Box<FusionCache>),
    /// 404 Not Found.
    NotFound,
}

/// One expected request.
pub struct Expect {
    method: Method,
    path: String,
    check: Box<dyn FnOnce(&Value) + Send>,
    reply: Reply,
}

const FC_PATH: &str = "/apis/fusioncache.io/v1alpha1";

impl Expect {
    /// A request with this method and path (query included), whose JSON body passes `check`.
    pub fn new(
        method: Method,
        path: impl Into<String>,
        check: impl FnOnce(&Value) + Send + 'static,
        reply: Reply,
    ) -> Self {
        Self {
            method,
            path: path.into(),
            check: Box::new(check),
            reply,
        }
    }

    /// The JSON patch that adds the finalizer; answered with the resource, finalized.
    pub fn add_finalizer(fc: &FusionCache) -> Self {
        let name = fc.metadata.name.clone().unwrap();
        let answer = serde_json::to_value(fc.clone().finalized()).unwrap();
        Self::new(
            Method::PATCH,
            format!("{FC_PATH}/namespaces/{NS}/fusioncaches/{name}?"),
            |body| {
                assert_eq!(
                    body,
                    &json!([
                        { "op": "test", "path": "/metadata/finalizers", "value": null },
                        { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }
                    ])
                )
            },
            Reply::Json(answer),
        )
    }

    /// The JSON patch that removes the finalizer; answered with the resource.
    pub fn remove_finalizer(fc: &FusionCache) -> Self {
        let name = fc.metadata.name.clone().unwrap();
        let answer = serde_json::to_value(fc).unwrap();
        Self::new(
            Method::PATCH,
            format!("{FC_PATH}/namespaces/{NS}/fusioncaches/{name}?"),
            |body| {
                assert_eq!(
                    body,
                    &json!([
                        { "op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER },
                        { "op": "remove", "path": "/metadata/finalizers/0" }
                    ])
                )
            },
            Reply::Json(answer),
        )
    }

    /// The cluster-wide list of FusionCaches; answered with `items`.
    pub fn list(items: &[FusionCache]) -> Self {
        Self::new(
            Method::GET,
            format!("{FC_PATH}/fusioncaches?"),
            |_| {},
            Reply::Json(json!({
                "apiVersion": "fusioncache.io/v1alpha1",
                "kind": "FusionCacheList",
                "metadata": { "resourceVersion": "1" },
                "items": items,
            })),
        )
    }

    /// A GET of a Secret in [`NS`] that does not exist.
    pub fn secret_not_found(name: &str) -> Self {
        Self::new(
            Method::GET,
            format!("/api/v1/namespaces/{NS}/secrets/{name}"),
            |_| {},
            Reply::NotFound,
        )
    }

    /// The server-side apply of the ConfigMap `name`; its body passes `check`.
    pub fn apply_config_map(name: &str, check: impl FnOnce(&Value) + Send + 'static) -> Self {
        Self::new(
            Method::PATCH,
            format!("/api/v1/namespaces/{NS}/configmaps/{name}?&force=true&fieldManager=fusioncache-operator"),
            check,
            Reply::Echo,
        )
    }

    /// The server-side apply of the Secret `name`; its body passes `check`.
    pub fn apply_secret(name: &str, check: impl FnOnce(&Value) + Send + 'static) -> Self {
        Self::new(
            Method::PATCH,
            format!("/api/v1/namespaces/{NS}/secrets/{name}?&force=true&fieldManager=fusioncache-operator"),
            check,
            Reply::Echo,
        )
    }

    /// The server-side apply of the status of `fc`; the status passes `check`.
    pub fn apply_status(
        fc: &FusionCache,
        check: impl FnOnce(&FusionCacheStatus) + Send + 'static,
    ) -> Self {
        let name = fc.metadata.name.clone().unwrap();
        Self::new(
            Method::PATCH,
            format!("{FC_PATH}/namespaces/{NS}/fusioncaches/{name}/status?&force=true&fieldManager=fusioncache-operator"),
            |body| {
                assert_eq!(body["apiVersion"], "fusioncache.io/v1alpha1");
                assert_eq!(body["kind"], "FusionCache");
                let status: FusionCacheStatus =
                    serde_json::from_value(body["status"].clone()).expect("the patch holds a valid status");
                check(&status);
            },
            Reply::StatusOf(Box::new(fc.clone())),
        )
    }

    /// An event with this type and reason, whose note passes `check`.
    pub fn event(
        type_: &'static str,
        reason: &'static str,
        check: impl FnOnce(&str) + Send + 'static,
    ) -> Self {
        Self::new(
            Method::POST,
            format!("/apis/events.k8s.io/v1/namespaces/{NS}/events?"),
            move |body| {
                assert_eq!(body["type"], type_, "event type in {body}");
                assert_eq!(body["reason"], reason, "event reason in {body}");
                assert_eq!(body["reportingController"], "fusioncache-operator-test");
                check(body["note"].as_str().unwrap_or_default());
            },
            Reply::Echo,
        )
    }
}

/// The mock apiserver's side of the client.
pub struct ApiServerVerifier(tower_test::mock::Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    /// Answers the script in order, then fails on any further request. Await the handle (it panics on a
    /// mismatch).
    pub fn run(mut self, script: Vec<Expect>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let total = script.len();
            for (i, expect) in script.into_iter().enumerate() {
                let (request, send) =
                    tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
                        .await
                        .unwrap_or_else(|_| {
                            panic!(
                                "request {}/{total} ({} {}) never came",
                                i + 1,
                                expect.method,
                                expect.path
                            )
                        })
                        .expect("the client is gone");
                assert_eq!(
                    request.method(),
                    expect.method,
                    "method of request {}/{total}",
                    i + 1
                );
                assert_eq!(
                    request.uri().to_string(),
                    expect.path,
                    "path of request {}/{total}",
                    i + 1
                );
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("a JSON body")
                };
                (expect.check)(&body);
                let response = match expect.reply {
                    Reply::Json(v) => ok(serde_json::to_vec(&v).unwrap()),
                    Reply::Echo => ok(bytes.to_vec()),
                    Reply::StatusOf(fc) => {
                        let mut fc = *fc;
                        fc.status = serde_json::from_value(body["status"].clone()).unwrap();
                        ok(serde_json::to_vec(&fc).unwrap())
                    }
                    Reply::NotFound => Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Body::from(
                            serde_json::to_vec(&json!({
                                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": "not found", "reason": "NotFound", "code": 404
                            }))
                            .unwrap(),
                        ))
                        .unwrap(),
                };
                send.send_response(response);
            }
            if let Ok(Some((request, _))) =
                tokio::time::timeout(Duration::from_millis(200), self.0.next_request()).await
            {
                panic!(
                    "unexpected request past the script: {} {}",
                    request.method(),
                    request.uri()
                );
            }
        })
    }
}

fn ok(body: Vec<u8>) -> Response<Body> {
    Response::builder().body(Body::from(body)).unwrap()
}

/// Settings with one endpoint `main` (4 databases) as the default, and a default NATS URL.
pub fn test_settings() -> Settings {
    Settings {
        redis_endpoints: vec![RedisEndpoint {
            name: "main".into(),
            url: "redis://redis.cache:6379".into(),
            admin_username: None,
            admin_password: Some("admin".into()),
            databases: 4,
        }],
        default_redis_endpoint: Some("main".into()),
        default_nats_url: Some("nats://nats.nats:4222".into()),
    }
}

impl Context {
    /// A context on a mock apiserver, with [`test_settings`] and a [`FakeAcl`].
    pub fn test() -> (Arc<Self>, ApiServerVerifier, Arc<FakeAcl>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NS);
        let acl = Arc::new(FakeAcl::default());
        let ctx = Context::new(
            client,
            Reporter {
                controller: "fusioncache-operator-test".into(),
                instance: None,
            },
            Arc::new(test_settings()),
            acl.clone(),
            Arc::new(Metrics::default()),
        );
        (Arc::new(ctx), ApiServerVerifier(handle), acl)
    }
}
