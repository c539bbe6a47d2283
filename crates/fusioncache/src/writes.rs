//! Changes: the local step (L1) and the distributed step (L2, then one notification), with what fails
//! handed to auto-recovery. `set`, `remove`, `expire`, tag removals and clears all end here.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::auto_recovery::RecoveryItem;
use crate::backplane::{now_ticks, Action, BackplaneError};
use crate::backplane_accessor::Outgoing;
use crate::cache::Inner;
use crate::error::Error;
use crate::events::CacheEvent;
use crate::guard::Hold;
use crate::l1::Lifetime;
use crate::l2::{l2_envelope_now_ms, L2Error};
use crate::l2_accessor::{timestamp_entry, L2Write};
use crate::options::EntryOptions;
use crate::tags::tag_key;
use crate::telemetry::Counters;

/// A change's distributed part, as it is run (and queued, if it fails).
struct DistributedOp {
    action: Action,
    timestamp: i64,
    l2_write: Option<L2Write>,
    publish: bool,
    background_publish: bool,
    expires_at_ms: i64,
    l2_hard_timeout: Option<Duration>,
}

/// Why a distributed step did not go through (it is queued for auto-recovery either way).
enum StepError {
    L2(L2Error),
    Backplane(crate::backplane::BackplaneError),
}

impl<V> Inner<V>
where
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn lifetime_from_options(&self, options: &EntryOptions) -> Lifetime {
        let fresh_for = self
            .l1
            .cap(options.base_l1_duration().saturating_add(options.jitter()));
        let usable_for = if options.fail_safe {
            options.fail_safe_max_duration.max(fresh_for)
        } else {
            fresh_for
        };
        Lifetime {
            fresh_for,
            usable_for,
            refresh_after: options
                .eager_refresh_threshold
                .map(|t| fresh_for.mul_f32(t)),
        }
    }

    /// `set` of a key already held for the write at `timestamp`.
    pub(crate) async fn set_held(
        this: &Arc<Self>,
        hold: Hold,
        value: V,
        timestamp: i64,
        options: &EntryOptions,
    ) -> Result<(), Error> {
        let key = hold.key().to_string();
        let l2_write = match &this.l2 {
            Some(l2) if !options.skip_l2_writes => Some(l2.encode(&value, timestamp, options)?),
            _ => None,
        };
        let lifetime = this.lifetime_from_options(options);
        let tags = this.l1.tags().set_of(&options.tags);
        this.l1
            .write(&key, this.l1.entry(value, timestamp, lifetime, tags));
        Counters::incr(&this.telemetry.counters.sets);
        this.telemetry.emit(|| CacheEvent::Set { key: &key });
        Self::distribute(this, hold, Action::Set, timestamp, l2_write, options).await
    }

    /// Records a removal of `tag` now, here and (as the timestamp entry `__fc:t:{tag}` in L2 plus a *set*
    /// notification on that key) everywhere. The clear markers are tags too.
    pub(crate) async fn remove_tag(this: &Arc<Self>, tag: &str) -> Result<(), Error> {
        let timestamp = now_ticks();
        this.l1.tags().state(tag).removed(timestamp);
        let key = tag_key(tag);
        let hold = this.guard.hold(&key, Some(timestamp));
        let retention = this.options.tag_retention;
        let options = EntryOptions {
            duration: retention,
            fail_safe: false,
            l1_duration: None,
            tags: Arc::from([]),
            skip_l2_reads: false,
            skip_l2_writes: false,
            skip_backplane_notifications: false,
            ..this.default_entry_options.clone()
        };
        let write = timestamp_entry(timestamp, retention);
        Self::distribute(this, hold, Action::Set, timestamp, Some(write), &options).await
    }

    /// The distributed part of a change already applied to L1: the L2 step, then the notification, each
    /// awaited or in the background as `options` say, always in that order. What fails is queued for
    /// auto-recovery; the hold protects the key until the L2 step is done or queued.
    pub(crate) async fn distribute(
        this: &Arc<Self>,
        hold: Hold,
        action: Action,
        timestamp: i64,
        l2_write: Option<L2Write>,
        options: &EntryOptions,
    ) -> Result<(), Error> {
        let l2_write = l2_write.filter(|_| this.l2.is_some() && !options.skip_l2_writes);
        let publish = this.backplane.is_some() && !options.skip_backplane_notifications;
        if l2_write.is_none() && !publish {
            return Ok(());
        }
        let op = DistributedOp {
            action,
            timestamp,
            background_publish: options.background_backplane_operations
                && !options.surface_backplane_errors,
            l2_write,
            publish,
            expires_at_ms: l2_envelope_now_ms()
                .saturating_add(relevance(options).as_millis() as i64),
            l2_hard_timeout: options.l2_hard_timeout,
        };
        let background = op.l2_write.is_some() && options.background_l2_operations;
        let soft_timeout = options.l2_soft_timeout.filter(|_| op.l2_write.is_some());
        let result = if background || soft_timeout.is_some() {
            let this = Arc::clone(this);
            let mut task = tokio::spawn(async move { this.run_distributed(hold, op).await });
            if background {
                return Ok(());
            }
            let soft = soft_timeout.unwrap_or_default();
            match tokio::time::timeout(soft, &mut task).await {
                Ok(Ok(result)) => result,
                // Slower than the soft timeout: it completes (or is queued) in the background.
                Err(_) => return Ok(()),
                Ok(Err(_)) => return Ok(()),
            }
        } else {
            this.run_distributed(hold, op).await
        };
        match result {
            Err(StepError::L2(e))
                if options.surface_l2_errors || options.surface_backplane_errors =>
            {
                Err(Error::L2(e))
            }
            Err(StepError::Backplane(e)) if options.surface_backplane_errors => {
                Err(Error::Backplane(e))
            }
            _ => Ok(()),
        }
    }

    async fn run_distributed(
        self: &Arc<Self>,
        hold: Hold,
        op: DistributedOp,
    ) -> Result<(), StepError> {
        let key = hold.key();
        #[cfg(feature = "redis")]
        if let Some(done) = self.pipelined(key, &op).await {
            return done;
        }
        if let (Some(write), Some(l2)) = (&op.l2_write, &self.l2) {
            let written = match op.l2_hard_timeout {
                Some(limit) => tokio::time::timeout(limit, l2.write(key, write, false))
                    .await
                    .unwrap_or(Err(L2Error::Timeout(limit))),
                None => l2.write(key, write, false).await,
            };
            match written {
                Ok(recovered) => {
                    self.recovery.supersede(key, op.timestamp);
                    if recovered {
                        self.recovery.kick();
                    }
                }
                Err(error) => {
                    if matches!(error, L2Error::Timeout(_)) {
                        l2.record_error(Some(key), &error);
                    }
                    let item = RecoveryItem::new(
                        op.action,
                        op.timestamp,
                        op.l2_write,
                        op.publish,
                        op.expires_at_ms,
                    );
                    self.queue_for_recovery(key, item);
                    return Err(StepError::L2(error));
                }
            }
        }
        if op.publish {
            let key = key.to_string();
            drop(hold);
            if op.background_publish {
                self.publish_in_background(key, &op);
            } else {
                return self.publish_or_queue(&key, &op).await;
            }
        }
        Ok(())
    }

    /// Hands a notification to the cache's publisher task, which sends what accumulates as one batch (in
    /// order: the notifications of one key are never reordered). A full queue goes to auto-recovery.
    fn publish_in_background(self: &Arc<Self>, key: String, op: &DistributedOp) {
        let sender = self.publisher.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
            self.spawn_task(run_publisher(Arc::downgrade(self), rx));
            tx
        });
        let outgoing = Outgoing {
            key,
            action: op.action,
            timestamp: op.timestamp,
            expires_at_ms: op.expires_at_ms,
        };
        if let Err(e) = sender.try_send(outgoing) {
            let o = match e {
                tokio::sync::mpsc::error::TrySendError::Full(o)
                | tokio::sync::mpsc::error::TrySendError::Closed(o) => o,
            };
            let item = RecoveryItem::new(o.action, o.timestamp, None, true, o.expires_at_ms);
            self.queue_for_recovery(&o.key, item);
        }
    }

    /// The L2 write and the notification of `op` in one Redis batch, when L2 and the backplane are this
    /// crate's Redis transports on one connection (the batch script publishes right after the write, so
    /// the L2-then-notify order holds, and the notification costs no round trip of its own). Redis answers
    /// only once it has written the PUBLISH to every subscriber, so a notification in the background goes
    /// with its write only while the channel's last PUBLISH reached at most [`PIPELINED_FLEET`]
    /// subscribers; past that the caller would wait for a fan-out that grows with the fleet. `None` when
    /// that does not apply (or a breaker is open): the two-step path runs instead. A write that fails
    /// publishes nothing; the change is queued and announced once it is written.
    #[cfg(feature = "redis")]
    async fn pipelined(
        self: &Arc<Self>,
        key: &str,
        op: &DistributedOp,
    ) -> Option<Result<(), StepError>> {
        let (Some(write), Some(l2), Some(bp)) = (&op.l2_write, &self.l2, &self.backplane) else {
            return None;
        };
        if !op.publish || !l2.is_usable() || !bp.is_usable() {
            return None;
        }
        let store = l2.store().as_redis()?;
        let redis_bp = bp.backplane().as_redis()?;
        if !store.connection().is_same(redis_bp.connection()) {
            return None;
        }
        if op.background_publish && redis_bp.receivers(bp.channel()) > PIPELINED_FLEET {
            return None;
        }
        let payload = bp.encode(key, op.action, op.timestamp);
        let value = match write {
            L2Write::Set { bytes, ttl } => Some((bytes, *ttl)),
            L2Write::Remove => None,
        };
        let call = store.write_and_publish(key, value, bp.channel(), payload);
        let replies = match op.l2_hard_timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .unwrap_or(Err(L2Error::Timeout(limit))),
            None => call.await,
        };
        let (written, published) = match replies {
            Ok((written, published)) => (written, Some(published)),
            Err(e) => (Err(e), None),
        };
        if let Some(Ok(count)) = &published {
            redis_bp.record_receivers(bp.channel(), *count);
        }
        match l2.outcome(Some(key), written) {
            Ok(((), recovered)) => {
                self.recovery.supersede(key, op.timestamp);
                if recovered {
                    self.recovery.kick();
                }
            }
            Err(error) => {
                let item = RecoveryItem::new(
                    op.action,
                    op.timestamp,
                    op.l2_write.clone(),
                    true,
                    op.expires_at_ms,
                );
                self.queue_for_recovery(key, item);
                return Some(Err(StepError::L2(error)));
            }
        }
        let published = published
            .unwrap_or_else(|| Err("no reply".into()))
            .map(|_| ())
            .map_err(BackplaneError::Transport);
        match bp.published(key, op.action, published) {
            Ok(()) => Some(Ok(())),
            Err(error) => {
                let item = RecoveryItem::new(op.action, op.timestamp, None, true, op.expires_at_ms);
                self.queue_for_recovery(key, item);
                Some(Err(StepError::Backplane(error)))
            }
        }
    }

    async fn publish_or_queue(
        self: &Arc<Self>,
        key: &str,
        op: &DistributedOp,
    ) -> Result<(), StepError> {
        let Some(bp) = &self.backplane else {
            return Ok(());
        };
        match bp.publish(key, op.action, op.timestamp, false).await {
            Ok(()) => Ok(()),
            Err(error) => {
                let item = RecoveryItem::new(op.action, op.timestamp, None, true, op.expires_at_ms);
                self.queue_for_recovery(key, item);
                Err(StepError::Backplane(error))
            }
        }
    }

    /// Queues `item` and makes sure the auto-recovery task runs.
    pub(crate) fn queue_for_recovery(self: &Arc<Self>, key: &str, item: RecoveryItem) {
        self.recovery_started.call_once(|| {
            self.spawn_task(crate::auto_recovery::run(
                Arc::clone(&self.recovery),
                Arc::downgrade(self),
            ));
        });
        self.recovery.push(key, item);
    }
}

/// The most subscribers (this node's own included) a channel may have for a background notification to go
/// in the pipeline of its L2 write: the fan-out Redis does before answering stays a few microseconds.
#[cfg(feature = "redis")]
const PIPELINED_FLEET: i64 = 8;

/// The most notifications waiting for the publisher task; past it they go to auto-recovery.
const PUBLISH_QUEUE: usize = 65_536;
/// The most notifications sent as one batch.
const PUBLISH_BATCH: usize = 512;

/// The most batches the publisher has sent and waits to be confirmed (NATS receipts) at a time.
const PUBLISHES_IN_FLIGHT: usize = 16;

/// The publisher task of a cache: sends the notifications queued since the last batch as one batch (in
/// order), without waiting for the previous batches to be confirmed, and queues the failed ones for
/// auto-recovery. Ends when the cache is dropped.
async fn run_publisher<V>(cache: Weak<Inner<V>>, mut rx: tokio::sync::mpsc::Receiver<Outgoing>)
where
    V: Clone + Send + Sync + 'static,
{
    use futures_util::StreamExt;
    let mut confirming = futures_util::stream::FuturesOrdered::new();
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            biased;
            Some((sent, results)) = confirming.next(), if !confirming.is_empty() => {
                let Some(inner) = cache.upgrade() else { return };
                settle(&inner, sent, results);
            }
            received = rx.recv_many(&mut batch, PUBLISH_BATCH), if confirming.len() < PUBLISHES_IN_FLIGHT => {
                if received == 0 {
                    break;
                }
                let Some(inner) = cache.upgrade() else { return };
                let Some(bp) = &inner.backplane else { return };
                let confirmation = bp.send_all(&batch).await;
                confirming.push_back(async move { (batch, confirmation.await) });
            }
        }
    }
    while let Some((sent, results)) = confirming.next().await {
        let Some(inner) = cache.upgrade() else { return };
        settle(&inner, sent, results);
    }
}

/// Records the results of a batch of the publisher and queues its failed notifications for auto-recovery.
fn settle<V>(inner: &Arc<Inner<V>>, batch: Vec<Outgoing>, results: Vec<Result<(), BackplaneError>>)
where
    V: Clone + Send + Sync + 'static,
{
    let Some(bp) = &inner.backplane else { return };
    let results = bp.published_all(&batch, results);
    for (o, result) in batch.into_iter().zip(results) {
        if result.is_err() {
            let item = RecoveryItem::new(o.action, o.timestamp, None, true, o.expires_at_ms);
            inner.queue_for_recovery(&o.key, item);
        }
    }
}

/// How long a change matters: until any copy of the entry it replaces would have expired anyway.
fn relevance(options: &EntryOptions) -> Duration {
    if options.fail_safe {
        options.fail_safe_max_duration.max(options.duration)
    } else {
        options.duration
    }
}
