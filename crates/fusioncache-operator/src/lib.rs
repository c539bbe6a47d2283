//! # fusioncache-operator
//!
//! A Kubernetes operator that provisions [`FusionCache`](crd::FusionCache) resources: for each one it
//! allocates a backplane channel prefix (unique per endpoint across the cluster) and a Redis database
//! (lowest free per endpoint, stable once given), optionally creates a Redis ACL user limited to the cache's
//! keys and channel, and writes a ConfigMap (`fusioncache.yaml` and `FUSIONCACHE_*` values) and a Service
//! Binding Secret that the `fusioncache` library loads with one call
//! (`fusioncache::config::FusionCacheConfig::load`).
//!
//! One file per concern, after kube-rs' controller-rs:
//! - [`crd`]: the resource types (the CRD YAML is generated from them);
//! - [`settings`]: the operator's settings (Redis endpoints with admin credentials, default NATS URL);
//! - [`allocation`] and [`reconcile`]: the pure decisions (spec + observed state → desired objects and status);
//! - [`acl`]: Redis ACL users;
//! - [`controller`]: the I/O around the pure parts (watch, finalizer, server-side apply, events, backoff);
//! - [`leader`]: leader election with a Lease, so that several replicas can run;
//! - [`metrics`], [`telemetry`] and [`server`]: Prometheus metrics, logs, and `/healthz` `/readyz` `/metrics`.

#![warn(missing_docs)]

pub mod acl;
pub mod allocation;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod server;
pub mod settings;
pub mod telemetry;

/// An error of the operator. Invalid specs are not errors (they become a `Ready=False` status); these are
/// failures to talk to the apiserver or to Redis, which the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),

    /// Creating or deleting a Redis ACL user failed.
    #[error("Redis ACL: {0}")]
    Acl(#[from] acl::AclError),

    /// The operator settings are invalid.
    #[error("{0}")]
    Settings(#[from] settings::SettingsError),

    /// An object from the apiserver lacks a field the apiserver always sets.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),

    /// A value could not be (de)serialized.
    #[error("serialization: {0}")]
    Serialization(#[source] serde_json::Error),
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short stable name of the error, for the `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Acl(_) => "acl",
            Error::Settings(_) => "settings",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::Serialization(_) => "serialization",
        }
    }

    /// The reason of the `Ready=False` condition a failed reconcile writes.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Acl(_) => "AclProvisioningFailed",
            Error::Kube(_) => "KubernetesApiError",
            Error::Settings(_) => "InvalidSettings",
            Error::MissingObjectKey(_) | Error::Serialization(_) => "ReconcileFailed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_and_reasons_name_the_failure() {
        let acl = Error::Acl(acl::AclError::Random("x".into()));
        assert_eq!(acl.metric_label(), "acl");
        assert_eq!(acl.reason(), "AclProvisioningFailed");
        let missing = Error::MissingObjectKey("metadata.uid");
        assert_eq!(missing.metric_label(), "missing_object_key");
        assert_eq!(missing.reason(), "ReconcileFailed");
    }
}
