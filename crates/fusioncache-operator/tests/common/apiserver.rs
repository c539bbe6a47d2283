//! A Kubernetes API-server double for end-to-end tests: a loopback HTTP server that serves exactly what the
//! operator uses, with the semantics it relies on.
//!
//! - list (label and field selectors, a `resourceVersion` in the list metadata) and watch from a
//!   `resourceVersion`, replaying what happened since; [`ApiServer::expire_watches`] compacts the history and
//!   closes every watch, so a client that resumes gets a `410 Gone` ERROR event and must relist;
//! - get, create (409 when it exists), replace (409 on a stale `resourceVersion`), delete;
//! - merge patch, JSON patch (`test`, `add`, `remove`, `replace`) and server-side apply with field managers:
//!   each manager owns the leaf fields it applied, a conflict with another manager's field is a 409 unless
//!   `force=true`, fields a manager stops applying are removed; other writes take ownership of what they
//!   change;
//! - the `status` subresource of FusionCaches (writes there change only `.status`, writes to the resource
//!   never do; `metadata.generation` moves when the spec changes);
//! - finalizers: a delete sets `deletionTimestamp` and waits until the finalizers are gone;
//! - owner-reference garbage collection (background), events, Leases;
//! - RBAC: rules read from the rendered manifests; a request they do not grant gets a 403, as in a cluster
//!   (including `update` on `{owner}/finalizers` to set `blockOwnerDeletion`, and `create` when an apply
//!   creates the object);
//! - a request log (verb, resource, namespace, name, status code) and fault injection.
//!
//! The test side reads and writes the same store directly ([`ApiServer::get`], [`ApiServer::create`],
//! [`ApiServer::edit`], [`ApiServer::delete`]), as `kubectl` would, bypassing RBAC.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A kind the double serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kind {
    /// The API group (`""` for core).
    pub group: &'static str,
    /// The version.
    pub version: &'static str,
    /// The plural resource name.
    pub resource: &'static str,
    /// The kind.
    pub kind: &'static str,
    /// Whether it has a `status` subresource.
    pub status_subresource: bool,
}

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// FusionCaches.
pub const FUSIONCACHES: Kind = Kind {
    group: "fusioncache.io",
    version: "v1alpha1",
    resource: "fusioncaches",
    kind: "FusionCache",
    status_subresource: true,
};
/// ConfigMaps.
pub const CONFIGMAPS: Kind = Kind {
    group: "",
    version: "v1",
    resource: "configmaps",
    kind: "ConfigMap",
    status_subresource: false,
};
/// Secrets.
pub const SECRETS: Kind = Kind {
    group: "",
    version: "v1",
    resource: "secrets",
    kind: "Secret",
    status_subresource: false,
};
/// Events (events.k8s.io/v1).
pub const EVENTS: Kind = Kind {
    group: "events.k8s.io",
    version: "v1",
    resource: "events",
    kind: "Event",
    status_subresource: false,
};
/// Leases.
pub const LEASES: Kind = Kind {
    group: "coordination.k8s.io",
    version: "v1",
    resource: "leases",
    kind: "Lease",
    status_subresource: false,
};

const KINDS: [Kind; 5] = [FUSIONCACHES, CONFIGMAPS, SECRETS, EVENTS, LEASES];

/// One request the operator made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`).
    pub verb: String,
    /// The API group.
    pub group: String,
    /// The resource, with `/status` for the subresource.
    pub resource: String,
    /// The namespace, if any.
    pub namespace: Option<String>,
    /// The object name, if any.
    pub name: Option<String>,
    /// The HTTP method.
    pub method: String,
    /// The content type of a PATCH.
    pub patch_type: Option<String>,
    /// The field manager, if given.
    pub field_manager: Option<String>,
    /// The answer's status code.
    pub code: u16,
    /// The bearer token the client sent (each operator process gets its own kubeconfig).
    pub user: String,
}

/// One RBAC rule, in a namespace (a Role) or everywhere (a ClusterRole bound cluster-wide).
#[derive(Debug, Clone)]
pub struct Rule {
    /// `None`: every namespace and cluster-scoped requests.
    pub namespace: Option<String>,
    /// API groups.
    pub groups: Vec<String>,
    /// Resources (`fusioncaches/status`).
    pub resources: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
    /// `resourceNames`: empty means every name.
    pub names: Vec<String>,
}

/// What a service account may do.
#[derive(Debug, Clone, Default)]
pub struct Rbac {
    /// The rules.
    pub rules: Vec<Rule>,
}

impl Rbac {
    /// The rules the rendered manifests (`manifests/install.yaml` or `helm template` output) grant the
    /// service account `namespace/name`.
    pub fn from_manifests(path: &Path, namespace: &str, name: &str) -> Self {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|d| serde::Deserialize::deserialize(d).ok())
            .filter(|d: &Value| d.is_object())
            .collect();
        let roles = |kind: &str| -> HashMap<(Option<String>, String), Value> {
            docs.iter()
                .filter(|d| d["kind"] == kind)
                .map(|d| {
                    (
                        (
                            d["metadata"]["namespace"].as_str().map(String::from),
                            d["metadata"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        ),
                        d.clone(),
                    )
                })
                .collect()
        };
        let cluster_roles = roles("ClusterRole");
        let ns_roles = roles("Role");
        let mut rules = Vec::new();
        for binding in docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
        {
            let ours = binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == name
                        && s["namespace"] == namespace
                });
            if !ours {
                continue;
            }
            let scope = (binding["kind"] == "RoleBinding")
                .then(|| binding["metadata"]["namespace"].as_str().map(String::from))
                .flatten();
            let role_name = binding["roleRef"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let role = if binding["roleRef"]["kind"] == "ClusterRole" {
                cluster_roles.get(&(None, role_name.clone()))
            } else {
                ns_roles.get(&(scope.clone(), role_name.clone()))
            };
            let role = role
                .unwrap_or_else(|| panic!("{} binds a missing role {role_name}", path.display()));
            for r in role["rules"].as_array().into_iter().flatten() {
                let strings = |key: &str| -> Vec<String> {
                    r[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                };
                rules.push(Rule {
                    namespace: scope.clone(),
                    groups: strings("apiGroups"),
                    resources: strings("resources"),
                    verbs: strings("verbs"),
                    names: strings("resourceNames"),
                });
            }
        }
        assert!(
            !rules.is_empty(),
            "{} grants {namespace}/{name} nothing",
            path.display()
        );
        Rbac { rules }
    }

    /// Whether the rules allow `verb` on `group`/`resource` (the object `name`, if the request names one) in
    /// `namespace`.
    pub fn allows(
        &self,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> bool {
        self.rules.iter().any(|r| {
            (r.namespace.is_none() || r.namespace.as_deref() == namespace)
                && r.groups.iter().any(|g| g == group || g == "*")
                && r.resources.iter().any(|x| x == resource || x == "*")
                && r.verbs.iter().any(|v| v == verb || v == "*")
                && (r.names.is_empty() || name.is_some_and(|n| r.names.iter().any(|x| x == n)))
        })
    }

    /// Every `(group, resource, verb)` the rules grant.
    pub fn grants(&self) -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for r in &self.rules {
            for g in &r.groups {
                for res in &r.resources {
                    for v in &r.verbs {
                        out.insert((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
        }
        out
    }
}

type Key = (Kind, Option<String>, String);
type Path_ = Vec<String>;

struct Watcher {
    kind: Kind,
    namespace: Option<String>,
    labels: Vec<Selector>,
    fields: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Value>,
}

/// A fault: the next `times` requests matching are answered with `code`.
struct Fault {
    verb: String,
    resource: String,
    name: Option<String>,
    times: usize,
    code: u16,
}

#[derive(Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    /// Who owns which leaf field of each object.
    managers: HashMap<Key, BTreeMap<String, BTreeSet<Path_>>>,
    /// `(resourceVersion, kind, type, object)` of every change since the last compaction.
    history: Vec<(u64, Kind, &'static str, Value)>,
    compacted: u64,
    watchers: Vec<Watcher>,
    requests: Vec<Request>,
    faults: Vec<Fault>,
    rbac: Option<Rbac>,
    /// Every `(group, resource, verb)` an RBAC check allowed (requests, and the checks a request implies:
    /// `create` for an apply that creates, `update` on `{owner}/finalizers` for `blockOwnerDeletion`).
    authorized: BTreeSet<(String, String, String)>,
    /// Watches answered `410 Gone`.
    gone: usize,
}

/// An error answer.
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }
    fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.resource),
        )
    }
    fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

type Answer = Result<Value, ApiError>;

/// The running double.
pub struct ApiServer {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.expire_watches();
    }
}

#[derive(Debug, Clone)]
enum Selector {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

fn parse_label_selector(s: &str) -> Vec<Selector> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if let Some((k, v)) = t.split_once("!=") {
                Selector::NotEq(k.into(), v.into())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Selector::Eq(k.into(), v.into())
            } else if let Some(k) = t.strip_prefix('!') {
                Selector::NotExists(k.into())
            } else {
                Selector::Exists(t.into())
            }
        })
        .collect()
}

fn matches(obj: &Value, labels: &[Selector], fields: &[(String, String)]) -> bool {
    let l = &obj["metadata"]["labels"];
    let label = |k: &str| l.get(k).and_then(Value::as_str);
    labels.iter().all(|s| match s {
        Selector::Eq(k, v) => label(k) == Some(v),
        Selector::NotEq(k, v) => label(k) != Some(v),
        Selector::Exists(k) => label(k).is_some(),
        Selector::NotExists(k) => label(k).is_none(),
    }) && fields.iter().all(|(k, v)| {
        let mut cur = obj;
        for part in k.split('.') {
            cur = &cur[part];
        }
        cur.as_str() == Some(v)
    })
}

/// The leaf paths of `v` (objects are descended, anything else is a leaf).
fn leaves(v: &Value, prefix: &mut Path_, out: &mut BTreeSet<Path_>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

fn set_path(v: &mut Value, path: &[String], value: Value) {
    let mut cur = v;
    for p in &path[..path.len() - 1] {
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(p.clone())
            .or_insert_with(|| json!({}));
    }
    if !cur.is_object() {
        *cur = json!({});
    }
    cur.as_object_mut()
        .unwrap()
        .insert(path[path.len() - 1].clone(), value);
}

/// Removes the leaf at `path`, and the maps it leaves empty (a field set's parents go with it, as in SSA).
fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(m) = v.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        m.remove(first);
        return;
    }
    if let Some(child) = m.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(|c| c.is_empty()) {
            m.remove(first);
        }
    }
}

/// Which part of an object a write may change: the status subresource, or everything but the status.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Main,
    Status,
}

/// Fields no manager owns: identity and server-set metadata.
fn managed(path: &[String], part: Part, kind: Kind) -> bool {
    let first = path.first().map(String::as_str);
    if matches!(first, Some("apiVersion" | "kind")) {
        return false;
    }
    if first == Some("metadata") {
        let second = path.get(1).map(String::as_str);
        if matches!(
            second,
            Some(
                "name"
                    | "namespace"
                    | "uid"
                    | "resourceVersion"
                    | "generation"
                    | "creationTimestamp"
                    | "deletionTimestamp"
                    | "deletionGracePeriodSeconds"
                    | "managedFields"
            )
        ) {
            return false;
        }
    }
    let in_status = first == Some("status");
    match part {
        Part::Status => in_status,
        Part::Main => !(kind.status_subresource && in_status),
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn pointer_parts(p: &str) -> Vec<String> {
    p.split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn json_patch(target: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::new(422, "Invalid", m);
    for op in ops
        .as_array()
        .ok_or_else(|| bad("a JSON patch is an array".into()))?
    {
        let path = op["path"]
            .as_str()
            .ok_or_else(|| bad("op without path".into()))?;
        let parts = pointer_parts(path);
        let (parent_parts, last) = parts.split_at(parts.len().saturating_sub(1));
        let last = last.first().cloned().unwrap_or_default();
        match op["op"].as_str() {
            Some("test") => {
                let cur = target.pointer(path).cloned().unwrap_or(Value::Null);
                if cur != op["value"] {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("the server rejected our request due to an error in our request: test of {path} failed"),
                    ));
                }
            }
            Some(kind @ ("add" | "replace")) => {
                let parent = pointer_mut_create(target, parent_parts);
                match parent {
                    Value::Object(m) => {
                        m.insert(last, op["value"].clone());
                    }
                    Value::Array(a) => {
                        if last == "-" {
                            a.push(op["value"].clone());
                        } else {
                            let i: usize = last
                                .parse()
                                .map_err(|_| bad(format!("bad index in {path}")))?;
                            if kind == "replace" && i < a.len() {
                                a[i] = op["value"].clone();
                            } else if i <= a.len() {
                                a.insert(i, op["value"].clone());
                            } else {
                                return Err(bad(format!("index out of range in {path}")));
                            }
                        }
                    }
                    _ => return Err(bad(format!("cannot add at {path}"))),
                }
            }
            Some("remove") => {
                let parent_ptr: String = parent_parts.iter().map(|p| format!("/{p}")).collect();
                match target.pointer_mut(&parent_ptr) {
                    Some(Value::Object(m)) => {
                        m.remove(&last)
                            .ok_or_else(|| bad(format!("nothing at {path}")))?;
                    }
                    Some(Value::Array(a)) => {
                        let i: usize = last
                            .parse()
                            .map_err(|_| bad(format!("bad index in {path}")))?;
                        if i >= a.len() {
                            return Err(bad(format!("nothing at {path}")));
                        }
                        a.remove(i);
                    }
                    _ => return Err(bad(format!("nothing at {path}"))),
                }
            }
            other => return Err(bad(format!("unsupported op {other:?}"))),
        }
    }
    Ok(())
}

fn pointer_mut_create<'a>(v: &'a mut Value, parts: &[String]) -> &'a mut Value {
    let mut cur = v;
    for p in parts {
        if cur.is_null() {
            *cur = json!({});
        }
        let index = match &*cur {
            Value::Object(_) => None,
            Value::Array(a) => match p.parse::<usize>() {
                Ok(i) if i < a.len() => Some(i),
                _ => break,
            },
            _ => break,
        };
        cur = match (cur, index) {
            (Value::Array(a), Some(i)) => &mut a[i],
            (Value::Object(m), _) => m.entry(p.clone()).or_insert(Value::Null),
            (other, _) => other,
        };
    }
    if cur.is_null() {
        *cur = json!({});
    }
    cur
}

fn now() -> String {
    let t = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(t.as_second())
        .unwrap()
        .to_string()
}

fn spec_of(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: Kind, type_: &'static str, obj: &Value) {
        let rv = self.rv;
        self.history.push((rv, kind, type_, obj.clone()));
        let event = json!({ "type": type_, "object": obj });
        let ns = obj["metadata"]["namespace"].as_str().map(String::from);
        self.watchers.retain(|w| {
            if w.kind != kind
                || (w.namespace.is_some() && w.namespace != ns)
                || !matches(obj, &w.labels, &w.fields)
            {
                return !w.tx.is_closed();
            }
            w.tx.send(event.clone()).is_ok()
        });
    }

    /// Stores `obj` (new or changed) with a new resourceVersion; `generation` moves when the spec changed. A
    /// write that changes nothing is a no-op, as in Kubernetes: same resourceVersion, no watch event.
    fn put(&mut self, key: &Key, mut obj: Value, created: bool) -> Value {
        let kind = key.0;
        let old = self.objects.get(key).cloned();
        if let Some(old) = &old {
            let mut same = obj.clone();
            same["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            same["metadata"]["generation"] = old["metadata"]["generation"].clone();
            same["apiVersion"] = old["apiVersion"].clone();
            same["kind"] = old["kind"].clone();
            if let Some(m) = same["metadata"].as_object_mut() {
                m.retain(|_, v| !v.is_null());
            }
            if &same == old {
                return old.clone();
            }
        }
        let rv = self.next_rv();
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        if kind.status_subresource {
            let generation = match &old {
                None => 1,
                Some(o) => {
                    let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                    if spec_of(o) != spec_of(&obj) {
                        g + 1
                    } else {
                        g
                    }
                }
            };
            obj["metadata"]["generation"] = json!(generation);
        }
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind);
        // A deleting object whose last finalizer is gone is deleted.
        let finalizers_gone = obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if obj["metadata"].get("deletionTimestamp").is_some() && finalizers_gone {
            self.objects.remove(key);
            self.managers.remove(key);
            self.record(kind, "DELETED", &obj);
            self.collect_garbage();
            return obj;
        }
        self.objects.insert(key.clone(), obj.clone());
        self.record(kind, if created { "ADDED" } else { "MODIFIED" }, &obj);
        obj
    }

    fn create(&mut self, kind: Kind, ns: Option<&str>, mut obj: Value, manager: &str) -> Answer {
        let name = match obj["metadata"]["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match obj["metadata"]["generateName"].as_str() {
                Some(g) => {
                    self.uid += 1;
                    format!("{g}{:05x}", self.uid)
                }
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value",
                    ))
                }
            },
        };
        let key = (kind, ns.map(String::from), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.resource),
            ));
        }
        self.uid += 1;
        let meta = obj["metadata"]
            .as_object_mut()
            .ok_or_else(|| ApiError::new(422, "Invalid", "no metadata"))?;
        meta.insert("name".into(), json!(name));
        if let Some(ns) = ns {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert("uid".into(), json!(format!("uid-{:04}", self.uid)));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.remove("deletionTimestamp");
        if kind.status_subresource {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        self.take_ownership(&key, &Value::Null, &obj, manager, Part::Main);
        Ok(self.put(&key, obj, true))
    }

    /// `manager` now owns every managed leaf that differs between `old` and `new`.
    fn take_ownership(&mut self, key: &Key, old: &Value, new: &Value, manager: &str, part: Part) {
        let mut changed = BTreeSet::new();
        leaves(new, &mut Vec::new(), &mut changed);
        let kind = key.0;
        changed.retain(|p| managed(p, part, kind) && get_path(old, p) != get_path(new, p));
        let mut removed = BTreeSet::new();
        leaves(old, &mut Vec::new(), &mut removed);
        removed.retain(|p| managed(p, part, kind) && get_path(new, p).is_none());
        let owners = self.managers.entry(key.clone()).or_default();
        for set in owners.values_mut() {
            for p in changed.iter().chain(removed.iter()) {
                set.remove(p);
            }
        }
        owners
            .entry(manager.to_string())
            .or_default()
            .extend(changed);
    }

    /// Writes `new` over the stored object (a replace or a patch), keeping what `part` may not change.
    fn update(&mut self, key: &Key, mut new: Value, manager: &str, part: Part) -> Answer {
        let old = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(key.0, &key.2))?;
        let kind = key.0;
        // What this endpoint may not change comes from the stored object.
        let keep = |new: &mut Value| {
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "name",
                "namespace",
            ] {
                match old["metadata"].get(field) {
                    Some(v) => {
                        new["metadata"][field] = v.clone();
                    }
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove(field);
                        }
                    }
                }
            }
        };
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        keep(&mut new);
        match part {
            Part::Status => {
                let status = new.get("status").cloned();
                let mut merged = old.clone();
                match status {
                    Some(s) => merged["status"] = s,
                    None => {
                        merged.as_object_mut().unwrap().remove("status");
                    }
                }
                new = merged;
            }
            Part::Main if kind.status_subresource => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().unwrap().remove("status");
                }
            },
            Part::Main => {}
        }
        if old["metadata"].get("deletionTimestamp").is_some() {
            let before: BTreeSet<String> = strings(&old["metadata"]["finalizers"]);
            let after: BTreeSet<String> = strings(&new["metadata"]["finalizers"]);
            if !after.is_subset(&before) {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                ));
            }
        }
        self.take_ownership(key, &old, &new, manager, part);
        Ok(self.put(key, new, false))
    }

    fn apply(
        &mut self,
        key: &Key,
        applied: Value,
        manager: &str,
        force: bool,
        part: Part,
    ) -> Answer {
        let kind = key.0;
        let existing = self.objects.get(key).cloned();
        // An applied resourceVersion is a precondition, as in Kubernetes.
        if let Some(want) = applied["metadata"]["resourceVersion"]
            .as_str()
            .filter(|v| !v.is_empty())
        {
            let have = existing
                .as_ref()
                .and_then(|o| o["metadata"]["resourceVersion"].as_str());
            if have != Some(want) {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{}\": the object has been modified",
                        kind.resource, key.2
                    ),
                ));
            }
        }
        let mut obj = existing.clone().unwrap_or_else(|| {
            json!({ "apiVersion": kind.api_version(), "kind": kind.kind, "metadata": {
                "name": key.2, "namespace": key.1 } })
        });
        if key.1.is_none() {
            obj["metadata"].as_object_mut().unwrap().remove("namespace");
        }
        let mut new_paths = BTreeSet::new();
        leaves(&applied, &mut Vec::new(), &mut new_paths);
        new_paths.retain(|p| managed(p, part, kind));
        let owners = self.managers.entry(key.clone()).or_default().clone();
        let mut conflicts = Vec::new();
        for p in &new_paths {
            for (m, set) in &owners {
                if m != manager && set.contains(p) && get_path(&obj, p) != get_path(&applied, p) {
                    conflicts.push(format!("conflict with \"{m}\": .{}", p.join(".")));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflicts: {}",
                    conflicts.len(),
                    conflicts.join(", ")
                ),
            ));
        }
        let previously: BTreeSet<Path_> = owners.get(manager).cloned().unwrap_or_default();
        for p in previously.difference(&new_paths) {
            let owned_by_other = owners.iter().any(|(m, s)| m != manager && s.contains(p));
            if !owned_by_other {
                remove_path(&mut obj, p);
            }
        }
        for p in &new_paths {
            set_path(
                &mut obj,
                p,
                get_path(&applied, p).cloned().unwrap_or(Value::Null),
            );
        }
        let owners = self.managers.entry(key.clone()).or_default();
        for (m, set) in owners.iter_mut() {
            if m != manager {
                for p in &new_paths {
                    set.remove(p);
                }
            }
        }
        owners.insert(manager.to_string(), new_paths);
        match existing {
            None => {
                if part == Part::Status {
                    return Err(ApiError::not_found(kind, &key.2));
                }
                self.uid += 1;
                let meta = obj["metadata"].as_object_mut().unwrap();
                meta.insert("uid".into(), json!(format!("uid-{:04}", self.uid)));
                meta.insert("creationTimestamp".into(), json!(now()));
                Ok(self.put(key, obj, true))
            }
            Some(old) => {
                if old["metadata"].get("deletionTimestamp").is_some() {
                    let before = strings(&old["metadata"]["finalizers"]);
                    if !strings(&obj["metadata"]["finalizers"]).is_subset(&before) {
                        return Err(ApiError::new(
                            422,
                            "Invalid",
                            "no new finalizers on a deleting object",
                        ));
                    }
                }
                Ok(self.put(key, obj, false))
            }
        }
    }

    fn delete(&mut self, key: &Key) -> Answer {
        let mut obj = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(key.0, &key.2))?;
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                return Ok(self.put(key, obj, false));
            }
            return Ok(obj);
        }
        self.objects.remove(key);
        self.managers.remove(key);
        self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(key.0, "DELETED", &obj);
        self.collect_garbage();
        Ok(obj)
    }

    /// Deletes (in the background) every object whose owners are all gone.
    fn collect_garbage(&mut self) {
        loop {
            let uids: BTreeSet<String> = self
                .objects
                .values()
                .filter_map(|o| o["metadata"]["uid"].as_str().map(String::from))
                .collect();
            let orphan = self.objects.iter().find(|(_, o)| {
                let owners = o["metadata"]["ownerReferences"].as_array();
                owners.is_some_and(|refs| {
                    !refs.is_empty()
                        && refs
                            .iter()
                            .all(|r| !uids.contains(r["uid"].as_str().unwrap_or_default()))
                }) && o["metadata"].get("deletionTimestamp").is_none()
            });
            let Some((key, _)) = orphan.map(|(k, o)| (k.clone(), o.clone())) else {
                return;
            };
            let _ = self.delete(&key);
            // An orphan with finalizers now has a deletionTimestamp; the loop skips it.
        }
    }

    fn list(
        &self,
        kind: Kind,
        ns: Option<&str>,
        labels: &[Selector],
        fields: &[(String, String)],
    ) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, n, _), o)| {
                *k == kind && (ns.is_none() || n.as_deref() == ns) && matches(o, labels, fields)
            })
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// RBAC check for one verb.
    fn authorize(
        &mut self,
        verb: &str,
        group: &str,
        resource: &str,
        ns: Option<&str>,
        name: Option<&str>,
    ) -> Result<(), ApiError> {
        self.authorized
            .insert((group.to_string(), resource.to_string(), verb.to_string()));
        match &self.rbac {
            Some(rbac) if !rbac.allows(verb, group, resource, ns, name) => Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{resource}.{group} is forbidden: User \"system:serviceaccount:fusioncache-system:fusioncache-operator\" \
                     cannot {verb} resource \"{resource}\" in API group \"{group}\"{}",
                    ns.map(|n| format!(" in the namespace \"{n}\"")).unwrap_or_default()
                ),
            )),
            _ => Ok(()),
        }
        .inspect_err(|_| {
            self.authorized
                .remove(&(group.to_string(), resource.to_string(), verb.to_string()));
        })
    }

    /// Setting `blockOwnerDeletion` needs `update` on the owner's finalizers (OwnerReferencesPermissionEnforcement).
    fn authorize_owner_refs(
        &mut self,
        old: Option<&Value>,
        new: &Value,
        ns: Option<&str>,
    ) -> Result<(), ApiError> {
        let blocking = |o: Option<&Value>| -> BTreeSet<(String, String)> {
            o.and_then(|o| o["metadata"]["ownerReferences"].as_array())
                .into_iter()
                .flatten()
                .filter(|r| r["blockOwnerDeletion"] == true)
                .map(|r| {
                    (
                        r["apiVersion"].as_str().unwrap_or_default().to_string(),
                        r["kind"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        };
        for (api_version, kind) in blocking(Some(new)).difference(&blocking(old)) {
            let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            let resource = KINDS
                .iter()
                .find(|k| k.group == group && k.kind == kind)
                .map(|k| k.resource)
                .unwrap_or("unknown");
            self.authorize("update", group, &format!("{resource}/finalizers"), ns, None)?;
        }
        Ok(())
    }
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// A parsed request path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(n.to_string()), None),
        [r, n, s] => (*r, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    let kind = *KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.resource == resource)?;
    Some(Target {
        kind,
        namespace,
        name,
        subresource,
    })
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(code: u16, v: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        serde_json::to_vec(v).unwrap(),
    )
        .into_response()
}

impl ApiServer {
    /// Starts the double on a free loopback port; with `rbac`, requests it does not grant get a 403.
    pub async fn start(rbac: Option<Rbac>) -> Self {
        let store = Arc::new(Mutex::new(Store {
            rbac,
            ..Store::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = store.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let store = shared.clone();
                async move { handle(store, method, uri, headers, body) }
            },
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        ApiServer {
            addr,
            store,
            stop: Some(stop),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at the double for the client `user` (its bearer token) and returns its
    /// path.
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        let path = self._dir.path().join(format!("kubeconfig-{user}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: operator\n    namespace: fusioncache-system\n\
             current-context: double\nusers:\n- name: operator\n  user:\n    token: {user}\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The object, if it exists.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(kind, Some(ns.to_string()), name.to_string()))
            .cloned()
    }

    /// The objects of a kind in a namespace (every namespace with `None`).
    pub fn list(&self, kind: Kind, ns: Option<&str>) -> Vec<Value> {
        self.lock().list(kind, ns, &[], &[])
    }

    /// Creates an object as `kubectl create` would (field manager `kubectl-create`).
    pub fn create(&self, kind: Kind, ns: &str, obj: Value) -> Value {
        self.lock()
            .create(kind, Some(ns), obj, "kubectl-create")
            .unwrap_or_else(|e| panic!("create: {}", e.message))
    }

    /// Changes an object as `kubectl edit` would (field manager `kubectl-edit`).
    pub fn edit(&self, kind: Kind, ns: &str, name: &str, change: impl FnOnce(&mut Value)) -> Value {
        self.edit_part(kind, ns, name, Part::Main, change)
    }

    /// Changes an object's status as `kubectl edit --subresource status` would.
    pub fn edit_status(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Value {
        self.edit_part(kind, ns, name, Part::Status, |obj| {
            if !obj["status"].is_object() {
                obj["status"] = json!({});
            }
            change(&mut obj["status"]);
        })
    }

    fn edit_part(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        part: Part,
        change: impl FnOnce(&mut Value),
    ) -> Value {
        let mut s = self.lock();
        let key = (kind, Some(ns.to_string()), name.to_string());
        let mut obj = s
            .objects
            .get(&key)
            .cloned()
            .expect("the object to edit exists");
        change(&mut obj);
        s.update(&key, obj, "kubectl-edit", part)
            .unwrap_or_else(|e| panic!("edit: {}", e.message))
    }

    /// Deletes an object as `kubectl delete --wait=false` would.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        let key = (kind, Some(ns.to_string()), name.to_string());
        self.lock()
            .delete(&key)
            .unwrap_or_else(|e| panic!("delete: {}", e.message));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Every `(group, resource, verb)` RBAC allowed so far (requests and the checks they imply).
    pub fn authorized(&self) -> BTreeSet<(String, String, String)> {
        self.lock().authorized.clone()
    }

    /// The history of an object kind since the last compaction: `(type, object)`.
    pub fn history(&self, kind: Kind) -> Vec<(String, Value)> {
        self.lock()
            .history
            .iter()
            .filter(|(_, k, _, _)| *k == kind)
            .map(|(_, _, t, o)| (t.to_string(), o.clone()))
            .collect()
    }

    /// The next `times` requests with this verb on this resource (and name, if given) get `code`.
    pub fn fail_next(
        &self,
        verb: &str,
        resource: &str,
        name: Option<&str>,
        times: usize,
        code: u16,
    ) {
        self.lock().faults.push(Fault {
            verb: verb.into(),
            resource: resource.into(),
            name: name.map(String::from),
            times,
            code,
        });
    }

    /// Compacts the history and closes every watch: clients resuming from an older resourceVersion get a
    /// `410 Gone` and must relist.
    pub fn expire_watches(&self) {
        let mut s = self.lock();
        // Other writes moved the revision on, and the compaction passed every client's last one.
        s.next_rv();
        s.compacted = s.rv;
        s.history.clear();
        s.watchers.clear();
    }

    /// How many watches were answered `410 Gone` (the client must relist).
    pub fn gone(&self) -> usize {
        self.lock().gone
    }
}

fn handle(
    store: Arc<Mutex<Store>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = query(&uri);
    let Some(t) = parse_path(uri.path()) else {
        return json_response(
            404,
            &ApiError::new(404, "NotFound", format!("no route {}", uri.path())).status(),
        );
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    let watch = q.get("watch").is_some_and(|v| v == "true" || v == "1");
    let verb = match (&method, &t.name, watch) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, Some(_), _) => "get",
        (&Method::GET, None, _) => "list",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, Some(_), _) => "delete",
        (&Method::DELETE, None, _) => "deletecollection",
        _ => "unknown",
    };
    let resource = match &t.subresource {
        Some(s) => format!("{}/{s}", t.kind.resource),
        None => t.kind.resource.to_string(),
    };
    let manager = q.get("fieldManager").cloned().unwrap_or_else(|| {
        headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.split('/').next())
            .unwrap_or("unknown")
            .to_string()
    });
    let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
    let mut log = Request {
        verb: verb.to_string(),
        group: t.kind.group.to_string(),
        resource: resource.clone(),
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        method: method.to_string(),
        patch_type: (method == Method::PATCH).then(|| content_type.clone()),
        field_manager: q.get("fieldManager").cloned(),
        code: 200,
        user: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string(),
    };
    let result = (|| -> Result<Either, ApiError> {
        s.authorize(
            verb,
            t.kind.group,
            &resource,
            t.namespace.as_deref(),
            t.name.as_deref(),
        )?;
        if let Some(f) = s.faults.iter_mut().find(|f| {
            f.times > 0
                && f.verb == verb
                && f.resource == resource
                && (f.name.is_none() || f.name == t.name)
        }) {
            f.times -= 1;
            return Err(ApiError::new(f.code, "InternalError", "injected fault"));
        }
        s.faults.retain(|f| f.times > 0);
        let ns = t.namespace.as_deref();
        let key = |name: &str| (t.kind, t.namespace.clone(), name.to_string());
        let part = match t.subresource.as_deref() {
            None => Part::Main,
            Some("status") if t.kind.status_subresource => Part::Status,
            Some(other) => {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("no subresource {other}"),
                ))
            }
        };
        let parse_body = || -> Result<Value, ApiError> {
            serde_json::from_slice(&body)
                .or_else(|_| serde_yaml::from_slice(&body))
                .map_err(|e| ApiError::new(400, "BadRequest", format!("body: {e}")))
        };
        let labels = parse_label_selector(q.get("labelSelector").map(String::as_str).unwrap_or(""));
        let fields: Vec<(String, String)> = q
            .get("fieldSelector")
            .map(|f| {
                f.split(',')
                    .filter_map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        match verb {
            "list" => {
                let items = s.list(t.kind, ns, &labels, &fields);
                Ok(Either::Json(json!({
                    "apiVersion": t.kind.api_version(),
                    "kind": format!("{}List", t.kind.kind),
                    "metadata": { "resourceVersion": s.rv.to_string() },
                    "items": items,
                })))
            }
            "watch" => {
                let from: u64 = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(s.rv);
                let (tx, rx) = mpsc::unbounded_channel();
                if from < s.compacted {
                    s.gone += 1;
                    let _ = tx.send(json!({ "type": "ERROR", "object": ApiError::new(
                        410, "Expired", format!("too old resource version: {from} ({})", s.compacted)).status() }));
                    return Ok(Either::Watch(rx));
                }
                let replay: Vec<Value> = s
                    .history
                    .iter()
                    .filter(|(rv, k, _, o)| {
                        *rv > from
                            && *k == t.kind
                            && (ns.is_none() || o["metadata"]["namespace"].as_str() == ns)
                            && matches(o, &labels, &fields)
                    })
                    .map(|(_, _, ty, o)| json!({ "type": ty, "object": o }))
                    .collect();
                for e in replay {
                    let _ = tx.send(e);
                }
                s.watchers.push(Watcher {
                    kind: t.kind,
                    namespace: t.namespace.clone(),
                    labels,
                    fields,
                    tx,
                });
                Ok(Either::Watch(rx))
            }
            "get" => {
                let name = t.name.as_deref().unwrap();
                s.objects
                    .get(&key(name))
                    .cloned()
                    .map(Either::Json)
                    .ok_or_else(|| ApiError::not_found(t.kind, name))
            }
            "create" => {
                let obj = parse_body()?;
                s.authorize_owner_refs(None, &obj, ns)?;
                let created = s.create(t.kind, ns, obj, &manager)?;
                Ok(Either::Created(created))
            }
            "update" => {
                let name = t.name.as_deref().unwrap();
                let obj = parse_body()?;
                let old = s
                    .objects
                    .get(&key(name))
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(t.kind, name))?;
                let want_rv = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if !want_rv.is_empty()
                    && want_rv
                        != old["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default()
                {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified", t.kind.resource),
                    ));
                }
                s.authorize_owner_refs(Some(&old), &obj, ns)?;
                s.update(&key(name), obj, &manager, part).map(Either::Json)
            }
            "patch" => {
                let name = t.name.as_deref().unwrap();
                let patch = parse_body()?;
                let old = s.objects.get(&key(name)).cloned();
                if content_type == "application/apply-patch+yaml" {
                    let force = q.get("force").is_some_and(|v| v == "true");
                    let Some(manager) = q.get("fieldManager") else {
                        return Err(ApiError::new(
                            400,
                            "BadRequest",
                            "fieldManager is required for apply",
                        ));
                    };
                    if old.is_none() {
                        s.authorize("create", t.kind.group, &resource, ns, None)?;
                    }
                    s.authorize_owner_refs(old.as_ref(), &patch, ns)?;
                    let applied = s.apply(&key(name), patch, manager, force, part)?;
                    return Ok(Either::Json(applied));
                }
                let mut new = old
                    .clone()
                    .ok_or_else(|| ApiError::not_found(t.kind, name))?;
                match content_type.as_str() {
                    "application/json-patch+json" => json_patch(&mut new, &patch)?,
                    "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                        merge_patch(&mut new, &patch)
                    }
                    other => {
                        return Err(ApiError::new(
                            415,
                            "UnsupportedMediaType",
                            format!("patch type {other}"),
                        ))
                    }
                }
                s.authorize_owner_refs(old.as_ref(), &new, ns)?;
                s.update(&key(name), new, &manager, part).map(Either::Json)
            }
            "delete" => s.delete(&key(t.name.as_deref().unwrap())).map(Either::Json),
            other => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("verb {other}"),
            )),
        }
    })();
    let response = match result {
        Ok(Either::Json(v)) => json_response(200, &v),
        Ok(Either::Created(v)) => {
            log.code = 201;
            json_response(201, &v)
        }
        Ok(Either::Watch(rx)) => {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let event = rx.recv().await?;
                let mut line = serde_json::to_vec(&event).unwrap();
                line.push(b'\n');
                Some((Ok::<_, Infallible>(Bytes::from(line)), rx))
            });
            (
                [("content-type", "application/json")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Err(e) => {
            log.code = e.code;
            json_response(e.code, &e.status())
        }
    };
    s.requests.push(log);
    response
}

enum Either {
    Json(Value),
    Created(Value),
    Watch(mpsc::UnboundedReceiver<Value>),
}

/// Polls `cond` every 20 ms until it returns `Some`, for at most `timeout`; panics with `what` otherwise.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
