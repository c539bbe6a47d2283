//! Reads that L1 could not answer: L2 (or this node's own change still queued for auto-recovery), judged
//! against clears and tag removals, installed in L1 only through the key's guard, within the entry
//! options' L2 timeouts.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::auto_recovery::PendingRead;
use crate::cache::Inner;
use crate::error::Error;
use crate::guard::Hold;
use crate::l1::{L1Lookup, Lifetime};
use crate::l2::{L2Envelope, L2Error};
use crate::l2_accessor::{L2Entry, L2Read};
use crate::options::EntryOptions;
use crate::tags::{tag_key, TagState, Visibility};

/// What a read of L2 came to, for the caller: the fresh value (now in L1), a stale one (a fail-safe
/// candidate, with its timestamp and tags), nothing, or an error.
pub(crate) enum L2Outcome<V> {
    Fresh(V),
    Stale(L2Entry<V>),
    Missing,
    Failed(L2Error),
}

impl<V> Inner<V>
where
    V: Clone + Send + Sync + 'static,
{
    /// A read that L1 could not answer as fresh.
    pub(crate) async fn get_slow(
        self: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
    ) -> Result<Option<V>, Error> {
        let l1 = self.lookup_l1(key);
        if self.l2.is_none() || options.skip_l2_reads {
            self.record_miss(key);
            return Ok(None);
        }
        let fallback = matches!(&l1, L1Lookup::Stale { entry, .. } if options.fail_safe && entry.is_usable(crate::clock::Instant::now()));
        match self.load_from_l2(key, options, fallback).await {
            L2Outcome::Fresh(v) => {
                self.record_l2_hit(key);
                Ok(Some(v))
            }
            L2Outcome::Stale(_) | L2Outcome::Missing => {
                if let L1Lookup::Stale { expired: false, .. } = l1 {
                    // Untrusted only because the backplane is down, and L2 no longer has it.
                    self.l1.remove(key);
                }
                self.record_miss(key);
                Ok(None)
            }
            L2Outcome::Failed(error) => match l1 {
                // Unverifiable (the backplane is down, L2 fails): it may have changed anywhere since, so
                // it is served only as a fail-safe fallback, like an expired one. Staleness then stays
                // bounded by the time to notice the lost link, not by the length of the partition.
                L1Lookup::Stale { entry, .. }
                    if options.fail_safe && entry.is_usable(crate::clock::Instant::now()) =>
                {
                    self.record_stale(key);
                    Ok(Some(entry.value))
                }
                _ => {
                    self.record_miss(key);
                    Err(Error::L2(error))
                }
            },
        }
    }

    /// Reads `key` from L2 and installs a fresh value in L1 (through the key's guard), within the L2
    /// timeouts of `options`: the soft one when a fail-safe `fallback` exists (the read then completes,
    /// and installs, in the background), else the hard one.
    pub(crate) async fn load_from_l2(
        self: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        fallback: bool,
    ) -> L2Outcome<V> {
        let hold = self.guard.hold(key, None);
        let soft = options.l2_soft_timeout.filter(|_| fallback);
        let (limit, background) = match (soft, options.l2_hard_timeout) {
            (Some(s), Some(h)) if s < h => (s, true),
            (Some(s), None) => (s, true),
            (_, Some(h)) => (h, false),
            (None, None) => return self.load_and_install(&hold, options).await,
        };
        let this = Arc::clone(self);
        let owned_options = options.clone();
        let mut read =
            tokio::spawn(async move { this.load_and_install(&hold, &owned_options).await });
        match tokio::time::timeout(limit, &mut read).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => L2Outcome::Failed(L2Error::Unavailable(join.to_string())),
            Err(_) => {
                if !background {
                    read.abort();
                }
                let error = L2Error::Timeout(limit);
                if let Some(l2) = &self.l2 {
                    l2.record_error(Some(key), &error);
                }
                L2Outcome::Failed(error)
            }
        }
    }

    async fn load_and_install(&self, hold: &Hold, options: &EntryOptions) -> L2Outcome<V> {
        let key = hold.key();
        match self.read_l2(key).await {
            L2Read::Found(entry) if !entry.fresh_for.is_zero() => {
                L2Outcome::Fresh(self.install_from_l2(hold, key, entry, options))
            }
            L2Read::Found(entry) => L2Outcome::Stale(entry),
            L2Read::Missing => L2Outcome::Missing,
            L2Read::Failed(error) => L2Outcome::Failed(error),
        }
    }

    /// What L2 holds for `key`, as this node must see it: a change of its own still queued for
    /// auto-recovery comes first (read your writes while L2 is down or behind), and an entry that a clear
    /// or a removal of one of its tags made obsolete is expired or missing.
    pub(crate) async fn read_l2(&self, key: &str) -> L2Read<V> {
        let Some(l2) = &self.l2 else {
            return L2Read::Missing;
        };
        let entry = match self.recovery.pending_read(key) {
            Some(PendingRead::Gone) => return L2Read::Missing,
            Some(PendingRead::Written(bytes)) => {
                let entry = L2Envelope::decode(key, bytes.to_vec())
                    .ok()
                    .and_then(|env| l2.decode(key, env));
                match entry {
                    Some(entry) => return self.judge(entry, false).await,
                    None => return L2Read::Missing,
                }
            }
            None => {
                let (read, recovered) = l2.read(key).await;
                if recovered {
                    self.recovery.kick();
                }
                match read {
                    L2Read::Found(entry) => entry,
                    other => return other,
                }
            }
        };
        self.judge(entry, true).await
    }

    /// Judges an entry read from L2 against the clears and the removals of its tags (read from L2 first
    /// when this node does not know them yet, if `resolve`).
    async fn judge(&self, mut entry: L2Entry<V>, resolve: bool) -> L2Read<V> {
        let tags = self.l1.tags();
        entry.states = tags.states(&entry.tags);
        if resolve {
            if let Err(error) = self.resolve_tags(entry.states.as_deref()).await {
                return L2Read::Failed(error);
            }
        }
        match tags.visibility(entry.timestamp, entry.states.as_deref()) {
            Visibility::Visible => L2Read::Found(entry),
            Visibility::Expired => {
                entry.fresh_for = Duration::ZERO;
                L2Read::Found(entry)
            }
            Visibility::Removed => L2Read::Missing,
        }
    }

    /// Reads from L2 the removal timestamps of the clears and of `states` that this node has not read in
    /// the current stale epoch (all of them on every read when there is no backplane to announce them).
    async fn resolve_tags(&self, states: Option<&[Arc<TagState>]>) -> Result<(), L2Error> {
        let Some(l2) = &self.l2 else { return Ok(()) };
        let epoch = self.l1.epoch();
        let pending = self
            .l1
            .tags()
            .unresolved(states, epoch, self.backplane.is_none());
        if pending.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = pending.iter().map(|t| tag_key(t.name())).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let envelopes = l2.read_envelopes(&keys, false).await?;
        for (state, env) in pending.iter().zip(envelopes) {
            state.resolve(env.map(|e| e.timestamp), epoch);
        }
        Ok(())
    }

    /// Puts a fresh value read from L2 in L1, unless the guard or a newer L1 entry says it is outdated;
    /// returns the value either way (the caller asked while it was current).
    pub(crate) fn install_from_l2(
        &self,
        hold: &Hold,
        key: &str,
        entry: L2Entry<V>,
        options: &EntryOptions,
    ) -> V {
        let lifetime = self.lifetime_from_l2(options, entry.fresh_for, entry.usable_for);
        let tags = self.l1.tags().set_id(entry.states.as_deref());
        let l1_entry = self
            .l1
            .entry(entry.value.clone(), entry.timestamp, lifetime, tags);
        hold.install(entry.timestamp, || self.l1.install(key, l1_entry));
        entry.value
    }

    /// After a remote *set* (or auto-recovery finding a newer write): replace this node's older copy of
    /// the key with the entry read from L2.
    pub(crate) async fn refresh_from_envelope(&self, hold: &Hold, env: L2Envelope) {
        let Some(l2) = &self.l2 else { return };
        let key = hold.key();
        let Some(entry) = l2.decode(key, env) else {
            return;
        };
        let L2Read::Found(entry) = self.judge(entry, true).await else {
            return self.l1.remove(key);
        };
        let lifetime = self.lifetime_from_l2(
            &self.default_entry_options,
            entry.fresh_for,
            entry.usable_for,
        );
        if lifetime.fresh_for.is_zero() {
            return self.l1.remove(key);
        }
        let tags = self.l1.tags().set_id(entry.states.as_deref());
        let l1_entry = self.l1.entry(entry.value, entry.timestamp, lifetime, tags);
        hold.install(entry.timestamp, || self.l1.refresh(key, l1_entry));
    }

    /// After a remote *set* of `key` at `notified_at`: reloads the (now stale) L1 entry from L2 in the
    /// background, if L2 holds that write or a newer one. The refresher task reads what accumulates as one
    /// `get_many` (`MGET`), so a burst of notifications costs a few round trips, not one each.
    pub(crate) fn refresh_in_background(self: &Arc<Self>, key: &str, notified_at: i64) {
        let sender = self.refresher.get_or_init(|| {
            let capacity = self.options.max_concurrent_refreshes.max(1);
            let (tx, rx) = tokio::sync::mpsc::channel(capacity);
            self.spawn_task(run_refresher(Arc::downgrade(self), rx));
            tx
        });
        // When too many refreshes wait, the entry just stays stale: the next read goes to L2.
        let _ = sender.try_send(Refresh {
            hold: self.guard.hold(key, None),
            notified_at,
        });
    }

    pub(crate) fn lifetime_from_l2(
        &self,
        options: &EntryOptions,
        remaining: Duration,
        fail_safe_remaining: Duration,
    ) -> Lifetime {
        let mut fresh_for = remaining;
        if let Some(l1) = options.l1_duration {
            fresh_for = fresh_for.min(l1);
        }
        let fresh_for = self.l1.cap(fresh_for);
        Lifetime {
            fresh_for,
            usable_for: fail_safe_remaining.max(fresh_for),
            refresh_after: options
                .eager_refresh_threshold
                .map(|t| fresh_for.mul_f32(t)),
        }
    }
}

/// A reload of one key after a remote *set* notification, held from when it was received.
pub(crate) struct Refresh {
    hold: Hold,
    notified_at: i64,
}

/// The most keys reloaded with one `get_many`.
const REFRESH_BATCH: usize = 128;

/// The refresher task of a cache. Ends when the cache is dropped.
async fn run_refresher<V>(cache: Weak<Inner<V>>, mut rx: tokio::sync::mpsc::Receiver<Refresh>)
where
    V: Clone + Send + Sync + 'static,
{
    let mut batch = Vec::with_capacity(REFRESH_BATCH);
    while rx.recv_many(&mut batch, REFRESH_BATCH).await > 0 {
        let Some(inner) = cache.upgrade() else { return };
        let Some(l2) = &inner.l2 else { return };
        let keys: Vec<&str> = batch.iter().map(|r| r.hold.key()).collect();
        if let Ok(envelopes) = l2.read_envelopes(&keys, false).await {
            for (refresh, env) in batch.iter().zip(envelopes) {
                match env {
                    Some(env) if env.timestamp >= refresh.notified_at => {
                        inner.refresh_from_envelope(&refresh.hold, env).await;
                    }
                    // L2 does not hold the notified write (yet): the entry stays stale.
                    _ => {}
                }
            }
        }
        batch.clear();
    }
}
