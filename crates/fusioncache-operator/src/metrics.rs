//! Prometheus metrics of the controller: reconcile runs, failures by error, outcomes by reason, durations.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::Error;

/// The metrics registry and the controller's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Arc<Registry>,
    /// Reconcile metrics.
    pub reconcile: ReconcileMetrics,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    /// ACL users found missing on their endpoint (a Redis restart) and provisioned again.
    pub acl_users_restored: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fusioncache_operator");
        let reconcile = ReconcileMetrics::default().register(&mut registry);
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica holds the leader Lease and reconciles (else it stands by)",
            leader.clone(),
        );
        let acl_users_restored = Counter::default();
        registry.register(
            "acl_users_restored",
            "ACL users found missing on their endpoint and provisioned again",
            acl_users_restored.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconcile,
            leader,
            acl_users_restored,
        }
    }
}

impl Metrics {
    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut buffer = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut buffer, &self.registry);
        buffer
    }
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`Error::metric_label`].
    pub error: String,
}

/// Labels of a completed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `True` or `False`.
    pub ready: String,
    /// The Ready condition's reason.
    pub reason: String,
}

/// Reconcile metrics.
#[derive(Clone, Debug)]
pub struct ReconcileMetrics {
    /// Reconciles started.
    pub runs: Counter,
    /// Reconciles that failed, by error.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconciles that completed, by readiness and reason.
    pub outcomes: Family<OutcomeLabels, Counter>,
    /// Reconcile durations in seconds.
    pub duration: Histogram,
    /// Reconciles running now.
    pub in_flight: Gauge,
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        Self {
            runs: Counter::default(),
            failures: Family::default(),
            outcomes: Family::default(),
            duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            in_flight: Gauge::default(),
        }
    }
}

impl ReconcileMetrics {
    /// Registers the metrics.
    pub fn register(self, registry: &mut Registry) -> Self {
        registry.register("reconcile_runs", "Reconciles started", self.runs.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error",
            self.failures.clone(),
        );
        registry.register(
            "reconcile_outcomes",
            "Reconciles that completed, by Ready status and reason",
            self.outcomes.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Reconcile duration",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "reconcile_in_flight",
            "Reconciles running now",
            self.in_flight.clone(),
        );
        self
    }

    /// Counts a failure.
    pub fn set_failure(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label().to_string(),
            })
            .inc();
    }

    /// Counts an outcome.
    pub fn set_outcome(&self, ready: bool, reason: &str) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                ready: if ready { "True" } else { "False" }.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a run and measures it until the returned guard is dropped.
    pub fn count_and_measure(&self) -> ReconcileMeasurer {
        self.runs.inc();
        self.in_flight.inc();
        ReconcileMeasurer {
            start: Instant::now(),
            duration: self.duration.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// Observes the duration of a reconcile when dropped.
#[derive(Debug)]
pub struct ReconcileMeasurer {
    start: Instant,
    duration: Histogram,
    in_flight: Gauge,
}

impl Drop for ReconcileMeasurer {
    fn drop(&mut self) {
        self.duration.observe(self.start.elapsed().as_secs_f64());
        self.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_runs_failures_outcomes_and_durations() {
        let metrics = Metrics::default();
        drop(metrics.reconcile.count_and_measure());
        metrics
            .reconcile
            .set_failure(&Error::MissingObjectKey("metadata.uid"));
        metrics.reconcile.set_outcome(false, "ChannelPrefixClash");
        let text = metrics.encode();
        assert!(
            text.contains("fusioncache_operator_reconcile_runs_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "fusioncache_operator_reconcile_failures_total{error=\"missing_object_key\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("fusioncache_operator_reconcile_outcomes_total{ready=\"False\",reason=\"ChannelPrefixClash\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fusioncache_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("fusioncache_operator_reconcile_in_flight 0"),
            "{text}"
        );
    }
}
