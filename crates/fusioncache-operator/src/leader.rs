//! Leader election with a `coordination.k8s.io/v1` Lease, so that several replicas can run and exactly one
//! reconciles.
//!
//! The algorithm is client-go's: a candidate takes the Lease when it is free (no holder) or when its record
//! (holder, renew time, transitions) has not changed for a whole lease duration *as observed by this
//! candidate's own clock* (no trust in the other's clock); the holder renews it every retry period, and
//! steps down (the process exits: Kubernetes restarts it as a candidate) when it could not renew for the
//! renew deadline, which is shorter than the lease duration, so two leaders never overlap. Every write is a
//! replace with the read `resourceVersion`: of two candidates writing at once, one gets a 409 and stays a
//! candidate. On shutdown the holder releases the Lease (no holder) so that a standby takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tracing::{debug, info, warn};

/// How the Lease is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's namespace (the operator's).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This candidate (the pod name).
    pub identity: String,
    /// How long a Lease that is not renewed stays held (default 15 s).
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it steps down (default 10 s).
    pub renew_deadline: Duration,
    /// How often candidates try to acquire and the holder renews (default 2 s).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The defaults of client-go (15 s, 10 s, 2 s).
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate observed of the Lease: its record and when it last changed (on this candidate's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    record: (Option<String>, Option<String>, Option<i32>),
    since: Instant,
}

/// What to do with the Lease as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It does not exist: create it.
    Create,
    /// This candidate holds it: renew.
    Renew,
    /// It is free or expired: take it.
    Take,
    /// Another candidate holds it.
    Wait,
}

/// The decision for a Lease held by `holder` (none: free), unchanged for `unchanged_for`, with the Lease's
/// own duration (else `default_duration`).
pub fn decide(
    exists: bool,
    holder: Option<&str>,
    me: &str,
    unchanged_for: Duration,
    duration: Option<Duration>,
    default_duration: Duration,
) -> Decision {
    if !exists {
        return Decision::Create;
    }
    match holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => Decision::Renew,
        None => Decision::Take,
        Some(_) if unchanged_for >= duration.unwrap_or(default_duration) => Decision::Take,
        Some(_) => Decision::Wait,
    }
}

/// A candidate for the Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn record(spec: &LeaseSpec) -> (Option<String>, Option<String>, Option<i32>) {
    (
        spec.holder_identity.clone(),
        spec.renew_time.as_ref().map(|t| t.0.to_string()),
        spec.lease_transitions,
    )
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl LeaderElector {
    /// A candidate.
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// One attempt: whether this candidate holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let me = self.config.identity.clone();
        let lease = self.api.get_opt(&self.config.name).await?;
        let spec = lease
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let rec = record(&spec);
        let changed = self.observed.as_ref().is_none_or(|o| o.record != rec);
        if changed {
            self.observed = Some(Observed {
                record: rec,
                since: Instant::now(),
            });
        }
        let unchanged_for = self
            .observed
            .as_ref()
            .map_or(Duration::ZERO, |o| o.since.elapsed());
        let decision = decide(
            lease.is_some(),
            spec.holder_identity.as_deref(),
            &me,
            unchanged_for,
            spec.lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            self.config.lease_duration,
        );
        let renewed = |mut spec: LeaseSpec, take: bool| {
            let t = now();
            if take {
                spec.acquire_time = Some(t.clone());
                spec.lease_transitions = Some(spec.lease_transitions.map_or(0, |n| n + 1));
            }
            spec.holder_identity = Some(me.clone());
            spec.renew_time = Some(t);
            spec.lease_duration_seconds = Some(seconds(self.config.lease_duration));
            spec
        };
        let result = match (decision, lease) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(renewed(LeaseSpec::default(), true)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (decision, Some(mut lease)) => {
                lease.spec = Some(renewed(spec, decision == Decision::Take));
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(lease) => {
                if decision != Decision::Renew {
                    info!(identity = %me, lease = %self.config.name, "acquired the leader Lease");
                }
                self.observed = Some(Observed {
                    record: record(&lease.spec.unwrap_or_default()),
                    since: Instant::now(),
                });
                Ok(true)
            }
            // Someone else wrote first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&mut self) {
        info!(identity = %self.config.identity, lease = %self.config.name, "waiting for the leader Lease");
        let mut ticker = tokio::time::interval(self.config.retry_period);
        loop {
            ticker.tick().await;
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => debug!("the Lease is held by another replica"),
                Err(error) => warn!(%error, "cannot read or write the leader Lease"),
            }
        }
    }

    /// Renews the Lease every retry period; returns when it could not be renewed for the renew deadline
    /// (leadership is lost: stop reconciling).
    pub async fn hold(&mut self) {
        let mut ticker = tokio::time::interval(self.config.retry_period);
        ticker.tick().await;
        let mut last_renewal = Instant::now();
        loop {
            ticker.tick().await;
            let attempt =
                tokio::time::timeout(self.config.retry_period, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => last_renewal = Instant::now(),
                Ok(Ok(false)) => {
                    warn!(identity = %self.config.identity, "another replica took the leader Lease");
                    return;
                }
                Ok(Err(error)) => warn!(%error, "cannot renew the leader Lease"),
                Err(_) => warn!("renewing the leader Lease timed out"),
            }
            if last_renewal.elapsed() >= self.config.renew_deadline {
                warn!(identity = %self.config.identity, "could not renew the leader Lease in time");
                return;
            }
        }
    }

    /// Gives the Lease up (no holder), so that a standby takes over without waiting for it to expire.
    pub async fn release(&mut self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
                return Ok(());
            };
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.renew_time = Some(now());
            spec.lease_duration_seconds = Some(1);
            lease.spec = Some(spec);
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
                .map(drop)
        }
        .await;
        match result {
            Ok(()) => info!(identity = %self.config.identity, "released the leader Lease"),
            Err(error) => warn!(%error, "cannot release the leader Lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_missing_lease_is_created_a_free_one_taken_an_own_one_renewed() {
        assert_eq!(
            decide(false, None, "a", Duration::ZERO, None, D),
            Decision::Create
        );
        assert_eq!(
            decide(true, None, "a", Duration::ZERO, None, D),
            Decision::Take
        );
        assert_eq!(
            decide(true, Some(""), "a", Duration::ZERO, None, D),
            Decision::Take
        );
        assert_eq!(
            decide(true, Some("a"), "a", Duration::ZERO, None, D),
            Decision::Renew
        );
    }

    #[test]
    fn another_holder_is_waited_for_until_its_record_is_unchanged_for_a_lease_duration() {
        let d = |s| Duration::from_secs(s);
        assert_eq!(decide(true, Some("b"), "a", d(14), None, D), Decision::Wait);
        assert_eq!(decide(true, Some("b"), "a", d(15), None, D), Decision::Take);
        // The Lease's own duration wins over the default.
        assert_eq!(
            decide(true, Some("b"), "a", d(3), Some(d(2)), D),
            Decision::Take
        );
        assert_eq!(
            decide(true, Some("b"), "a", d(1), Some(d(2)), D),
            Decision::Wait
        );
    }
}
