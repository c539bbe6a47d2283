//! The L1: this node's in-memory entries, their freshness, and the writes that keep it coherent.
//!
//! The store is a [`quick_cache`] sync cache (S3-FIFO eviction, sharded read-write locks, SipHash keys):
//! a hit takes a shard's read lock and clones the entry out; every write of a key is one closure run under
//! its shard's write lock, so a local write, a guarded install of a value read from L2 and a notification
//! never interleave on one key, and a notification marks an entry stale in place, without moving it.
//! Entries past their fail-safe window count as missing at once and leave memory at the next sweep (see
//! [`L1::write`]), or earlier under capacity pressure.

use std::collections::hash_map::RandomState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quick_cache::sync::{EntryAction, EntryResult};
use quick_cache::UnitWeighter;

use crate::clock::Instant;

use crate::tags::{TagSetId, TagState, Tags, Visibility};

/// How long an entry is fresh and how long it stays usable (as a fail-safe fallback) in L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub fresh_for: Duration,
    pub usable_for: Duration,
    /// With eager refresh: when a hit starts refreshing the entry in the background.
    pub refresh_after: Option<Duration>,
}

/// The states of an entry's tags, as a read from L2 judges them (`None`: untagged). In L1 an entry carries
/// them as a [`TagSetId`].
pub(crate) type EntryTags = Option<Arc<[Arc<TagState>]>>;

/// A value in L1. Stored by value (a hit clones it out, which clones `V` once, as a raw cache get would);
/// staleness is set in place, under the key's shard write lock. Expiry is checked here, per entry.
#[derive(Debug, Clone)]
pub(crate) struct L1Entry<V> {
    pub value: V,
    /// The write this value came from (UTC ticks), compared with backplane messages.
    pub timestamp: i64,
    /// When the entry was put in L1.
    pub created_at: Instant,
    /// Logical expiry (set back to `created_at` when `expire` or a notification marks the entry stale).
    pub fresh_until: Instant,
    /// How long it may serve, as fresh or as a fail-safe fallback (at most the cache's retention); past
    /// it, it counts as missing and leaves memory at the next sweep.
    pub usable_until: Instant,
    /// With eager refresh, when a hit starts a background refresh (else `fresh_until`).
    pub refresh_at: Instant,
    /// The stale epoch when it was created: older than the current one means stale.
    pub epoch: u64,
    /// Its tags (a set of the cache's table: copied with the entry at no cost), checked against their
    /// removal timestamps on every read.
    pub tags: Option<TagSetId>,
}

impl<V> L1Entry<V> {
    /// Logically fresh: not marked stale, not from before the last mark-all-stale, not past its expiry.
    #[inline]
    pub fn is_fresh(&self, now: Instant, current_epoch: u64) -> bool {
        now < self.fresh_until && self.epoch >= current_epoch
    }

    /// Still inside its fail-safe window (past it, the entry waits for the next sweep).
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

/// What a read found in L1.
pub(crate) enum L1Lookup<V> {
    Fresh(V),
    /// Fresh, and past its eager-refresh point (only from [`L1::lookup_for_refresh`]).
    FreshDue(V),
    /// Present but not to be served as fresh: logically expired or marked stale (`expired`), or only
    /// untrusted while the backplane is down (`!expired`).
    Stale {
        entry: L1Entry<V>,
        expired: bool,
    },
    Missing,
}

/// How an entry stands for a read (see [`L1::standing`]).
enum Standing {
    /// Past its fail-safe window, or removed by a clear or a tag removal.
    Missing,
    /// Logically expired or marked stale: a fail-safe fallback at most.
    Expired,
    /// Fresh, but older than a read trusts while the backplane is down.
    Untrusted,
    Fresh,
}

/// The store under L1: keys hashed with SipHash (std's `RandomState`, keyed per process), as cache keys
/// often come from requests.
type Store<V> = quick_cache::sync::Cache<String, L1Entry<V>, UnitWeighter, RandomState>;

/// The L1 of one cache.
pub(crate) struct L1<V> {
    cache: Store<V>,
    /// Entries created before the current epoch are stale.
    epoch: AtomicU64,
    /// A hard cap on every freshness.
    max_duration: Option<Duration>,
    /// The longest an entry stays usable (and in memory, give or take a sweep).
    retention: Duration,
    /// When the next write sweeps entries past their fail-safe window out of memory (L1 clock nanos).
    next_sweep: AtomicU64,
    /// Clears and tag removals, checked on every read.
    tags: Tags,
}

/// The longest between two sweeps of unusable entries (as .NET `MemoryCache`'s expiration scan).
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

impl<V> L1<V>
where
    V: Clone + Send + Sync + 'static,
{
    pub fn new(
        capacity: u64,
        retention: Duration,
        max_duration: Option<Duration>,
        tags: Tags,
    ) -> Self {
        let items = usize::try_from(capacity).unwrap_or(usize::MAX);
        Self {
            cache: Store::with(
                items,
                capacity,
                UnitWeighter,
                RandomState::new(),
                Default::default(),
            ),
            epoch: AtomicU64::new(0),
            max_duration,
            retention,
            next_sweep: AtomicU64::new((Instant::now() + sweep_interval(retention)).as_nanos()),
            tags,
        }
    }

    /// The clears and tags of this cache.
    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    /// The current stale epoch (tag timestamps are resolved again in each).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Applies the cache's hard cap to a freshness.
    pub fn cap(&self, fresh_for: Duration) -> Duration {
        self.max_duration
            .map_or(fresh_for, |cap| fresh_for.min(cap))
    }

    /// An entry for `value`, written at `timestamp`, created now in the current epoch.
    pub fn entry(
        &self,
        value: V,
        timestamp: i64,
        lifetime: Lifetime,
        tags: Option<TagSetId>,
    ) -> L1Entry<V> {
        let now = Instant::now();
        let usable_until = now + lifetime.usable_for.min(self.retention);
        let fresh_until = (now + lifetime.fresh_for).min(usable_until);
        L1Entry {
            value,
            timestamp,
            created_at: now,
            fresh_until,
            usable_until,
            refresh_at: lifetime.refresh_after.map_or(fresh_until, |d| now + d),
            epoch: self.epoch.load(Ordering::Acquire),
            tags,
        }
    }

    /// The entry of `key` as a read sees it. `untrusted_after`: while the backplane is down, entries at
    /// least this old are not served as fresh (`None` when the backplane is up; zero: none is, even one
    /// written in this clock tick).
    #[inline(always)]
    pub fn lookup(
        &self,
        key: &str,
        now: Instant,
        untrusted_after: Option<Duration>,
    ) -> L1Lookup<V> {
        let Some(entry) = self.cache.get(key) else {
            return L1Lookup::Missing;
        };
        self.judge(entry, now, untrusted_after)
    }

    /// The value of `key` if [`lookup`](Self::lookup) would find it fresh, else `None` (the hit path:
    /// the entry is judged in place and only its value moves out).
    #[inline(always)]
    pub fn fresh(&self, key: &str, now: Instant, untrusted_after: Option<Duration>) -> Option<V> {
        let entry = self.cache.get(key)?;
        let fresh = matches!(self.standing(&entry, now, untrusted_after), Standing::Fresh);
        fresh.then_some(entry.value)
    }

    /// [`lookup`](Self::lookup), telling a fresh entry past its eager-refresh point apart.
    pub fn lookup_for_refresh(
        &self,
        key: &str,
        now: Instant,
        untrusted_after: Option<Duration>,
    ) -> L1Lookup<V> {
        let Some(entry) = self.cache.get(key) else {
            return L1Lookup::Missing;
        };
        let due = now >= entry.refresh_at;
        match self.judge(entry, now, untrusted_after) {
            L1Lookup::Fresh(v) if due => L1Lookup::FreshDue(v),
            other => other,
        }
    }

    #[inline(always)]
    fn judge(
        &self,
        entry: L1Entry<V>,
        now: Instant,
        untrusted_after: Option<Duration>,
    ) -> L1Lookup<V> {
        match self.standing(&entry, now, untrusted_after) {
            Standing::Missing => L1Lookup::Missing,
            Standing::Expired => L1Lookup::Stale {
                entry,
                expired: true,
            },
            Standing::Untrusted => L1Lookup::Stale {
                entry,
                expired: false,
            },
            Standing::Fresh => L1Lookup::Fresh(entry.value),
        }
    }

    /// How `entry` stands for a read now: the one place the rules of freshness are applied, by reference,
    /// for [`judge`](Self::judge) and for the hit path ([`fresh`](Self::fresh)).
    #[inline(always)]
    fn standing(
        &self,
        entry: &L1Entry<V>,
        now: Instant,
        untrusted_after: Option<Duration>,
    ) -> Standing {
        if !entry.is_usable(now) {
            return Standing::Missing;
        }
        match self.tags.visibility_of(entry.timestamp, entry.tags) {
            Visibility::Removed => return Standing::Missing,
            Visibility::Expired => return Standing::Expired,
            Visibility::Visible if !entry.is_fresh(now, self.epoch.load(Ordering::Acquire)) => {
                return Standing::Expired
            }
            Visibility::Visible => {}
        }
        match untrusted_after {
            Some(age) if now.duration_since(entry.created_at) >= age => Standing::Untrusted,
            _ => Standing::Fresh,
        }
    }

    /// A local write: replaces whatever is there.
    ///
    /// Writes also sweep: at most every [`SWEEP_INTERVAL`] (or the retention, if shorter), the write that
    /// finds the sweep due drops every entry past its fail-safe window from memory, so that entries never
    /// read again do not wait for capacity pressure.
    pub fn write(&self, key: &str, entry: L1Entry<V>) {
        if entry.usable_until <= entry.created_at {
            return self.remove(key);
        }
        let now = entry.created_at;
        self.cache.insert(key.to_string(), entry);
        self.sweep_if_due(now);
    }

    /// Installs a value read from L2 unless L1 holds a newer write of the key. Returns whether it did.
    pub fn install(&self, key: &str, entry: L1Entry<V>) -> bool {
        self.put_if_not_newer(key, entry, false)
    }

    /// Replaces the entry of `key` with a newer one read from L2, only if an older entry is still there
    /// (a refresh after a remote *set*: a key removed meanwhile stays removed).
    pub fn refresh(&self, key: &str, entry: L1Entry<V>) -> bool {
        self.put_if_not_newer(key, entry, true)
    }

    fn put_if_not_newer(&self, key: &str, entry: L1Entry<V>, only_existing: bool) -> bool {
        if entry.usable_until <= entry.created_at {
            return false;
        }
        let now = entry.created_at;
        let mut new = Some(entry);
        let put = match self.cache.entry(key, None, |_, current| {
            let newer = new
                .as_ref()
                .is_some_and(|e| current.timestamp <= e.timestamp);
            if newer {
                if let Some(e) = new.take() {
                    *current = e;
                }
            }
            EntryAction::Retain(newer)
        }) {
            EntryResult::Retained(put) => put,
            // Absent: the placeholder keeps the key for this insert, which fails if a write came first.
            EntryResult::Vacant(slot) if !only_existing => {
                new.take().is_some_and(|e| slot.insert(e).is_ok())
            }
            _ => false,
        };
        if put {
            self.sweep_if_due(now);
        }
        put
    }

    /// Marks the entry of `key` stale when `condition` holds for it. Returns whether the entry exists and
    /// meets the condition (stale now, whether or not it was before).
    pub fn mark_stale(&self, key: &str, condition: impl FnOnce(&L1Entry<V>) -> bool) -> bool {
        // Most notifications are for keys this node does not hold: a read lock tells, with no placeholder.
        if !self.cache.contains_key(key) {
            return false;
        }
        let marked = self.cache.entry(key, None, |_, entry| {
            if !condition(entry) {
                return EntryAction::Retain(false);
            }
            entry.fresh_until = entry.fresh_until.min(entry.created_at);
            EntryAction::Retain(true)
        });
        matches!(marked, EntryResult::Retained(true))
    }

    /// Evicts `key`.
    pub fn remove(&self, key: &str) {
        self.cache.remove(key);
    }

    /// Evicts every entry.
    pub fn clear(&self) {
        self.cache.clear();
    }

    /// Marks every entry stale (O(1): bumps the epoch).
    pub fn mark_all_stale(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The number of entries held, usable or waiting for the next sweep.
    pub fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }

    /// Drops the entries past their fail-safe window if the sweep is due; one writer runs it.
    #[inline]
    fn sweep_if_due(&self, now: Instant) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now.as_nanos() < due {
            return;
        }
        let next = (now + sweep_interval(self.retention)).as_nanos();
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.sweep(now);
        }
    }

    /// Drops the unusable entries, then the tag sets no entry points to any more.
    #[cold]
    fn sweep(&self, now: Instant) {
        // `retain` takes a `Fn` and runs it on this thread: a `RefCell` collects what it sees.
        let seen = std::cell::RefCell::new(std::collections::HashSet::new());
        self.cache.retain(|_, entry| {
            let usable = entry.is_usable(now);
            if let (true, Some(id)) = (usable, entry.tags) {
                seen.borrow_mut().insert(id);
            }
            usable
        });
        self.tags.sweep_sets(&seen.into_inner());
    }
}

/// How often writes sweep unusable entries out of memory.
fn sweep_interval(retention: Duration) -> Duration {
    retention.clamp(Duration::from_secs(1), SWEEP_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tags::RemoveByTagBehavior;

    fn lifetime(fresh: u64, usable: u64) -> Lifetime {
        Lifetime {
            fresh_for: Duration::from_secs(fresh),
            usable_for: Duration::from_secs(usable),
            refresh_after: None,
        }
    }

    /// The hit path (`fresh`) serves exactly what the full lookup judges fresh, in every state an entry
    /// can be in.
    #[test]
    fn the_hit_path_agrees_with_the_full_lookup() {
        let l1: L1<String> = L1::new(
            100,
            Duration::from_secs(3600),
            None,
            Tags::new(RemoveByTagBehavior::Expire),
        );
        let tagged = l1.tags().set_id(l1.tags().states(&["t"]).as_deref());
        let put = |key: &str, ts: i64, lt: Lifetime, tags: Option<TagSetId>| {
            l1.write(key, l1.entry(key.to_string(), ts, lt, tags));
        };
        put("fresh", 10, lifetime(60, 120), None);
        put("expired", 10, lifetime(0, 120), None);
        put("marked", 10, lifetime(60, 120), None);
        assert!(l1.mark_stale("marked", |_| true));
        put("tag-removed", 10, lifetime(60, 120), tagged);
        l1.tags().state("t").removed(20);
        put("tagged-after", 30, lifetime(60, 120), tagged);
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let keys = [
            "fresh",
            "expired",
            "marked",
            "tag-removed",
            "tagged-after",
            "missing",
        ];
        let check = |now: Instant, untrusted: Option<Duration>| {
            keys.iter()
                .map(|k| {
                    let full = matches!(l1.lookup(k, now, untrusted), L1Lookup::Fresh(_));
                    assert_eq!(l1.fresh(k, now, untrusted).is_some(), full, "{k}");
                    full
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            check(now, None),
            [true, false, false, false, true, false],
            "backplane up"
        );
        assert_eq!(
            check(later, Some(Duration::ZERO)),
            [false; 6],
            "backplane down, zero max age: nothing is served from L1 as fresh"
        );
        assert_eq!(
            check(later, Some(Duration::from_secs(60))),
            [true, false, false, false, true, false],
            "backplane down, entries younger than the max age"
        );
        l1.mark_all_stale();
        assert_eq!(check(now, None), [false; 6], "after mark-all-stale");
    }

    fn l1(capacity: u64, retention: Duration) -> L1<String> {
        L1::new(
            capacity,
            retention,
            None,
            Tags::new(RemoveByTagBehavior::Expire),
        )
    }

    /// The conditional writes: an install or refresh never replaces a newer write, a refresh never
    /// brings back a key that is gone, a stale mark never creates an entry.
    #[test]
    fn conditional_writes_keep_the_newer_entry() {
        let l1 = l1(100, Duration::from_secs(3600));
        let entry = |ts: i64| l1.entry(format!("v{ts}"), ts, lifetime(60, 120), None);
        let value = |key: &str| l1.fresh(key, Instant::now(), None);

        assert!(
            !l1.refresh("k", entry(5)),
            "a refresh does not create the key"
        );
        assert_eq!(value("k"), None);
        assert!(!l1.mark_stale("k", |_| true), "nothing to mark");
        assert_eq!(l1.entry_count(), 0, "no placeholder left behind");

        assert!(l1.install("k", entry(10)), "absent: installed");
        assert!(!l1.install("k", entry(9)), "older than L1's: refused");
        assert_eq!(value("k").as_deref(), Some("v10"));
        assert!(l1.refresh("k", entry(12)), "newer: refreshed in place");
        assert_eq!(value("k").as_deref(), Some("v12"));

        assert!(!l1.mark_stale("k", |e| e.timestamp < 12), "condition unmet");
        assert_eq!(value("k").as_deref(), Some("v12"));
        assert!(l1.mark_stale("k", |e| e.timestamp < 13));
        assert_eq!(value("k"), None, "marked stale in place");
        assert!(
            matches!(
                l1.lookup("k", Instant::now(), None),
                L1Lookup::Stale { expired: true, ref entry } if entry.value == "v12"
            ),
            "still there as a fail-safe fallback"
        );
        l1.write("k", entry(1));
        assert_eq!(
            value("k").as_deref(),
            Some("v1"),
            "a local write replaces whatever is there"
        );
        assert_eq!(l1.entry_count(), 1);
    }

    /// A capacity of `u64::MAX` (unbounded) sizes nothing up front: building and writing do not abort.
    #[test]
    fn an_unbounded_capacity_builds_and_holds_entries() {
        let l1 = l1(u64::MAX, Duration::from_secs(3600));
        l1.write("k", l1.entry("v".into(), 1, lifetime(60, 120), None));
        assert_eq!(l1.fresh("k", Instant::now(), None).as_deref(), Some("v"));
    }

    #[test]
    fn a_zero_capacity_holds_nothing() {
        let l1 = l1(0, Duration::from_secs(3600));
        l1.write("k", l1.entry("v".into(), 1, lifetime(60, 120), None));
        l1.install("i", l1.entry("v".into(), 1, lifetime(60, 120), None));
        assert_eq!(l1.fresh("k", Instant::now(), None), None);
        assert_eq!(l1.fresh("i", Instant::now(), None), None);
        assert_eq!(l1.entry_count(), 0);
    }

    /// Entries live at most the retention, and the sweep a write runs when it is due drops those past
    /// their fail-safe window from memory.
    #[test]
    fn retention_bounds_entries_and_sweeps_free_them() {
        let capped = l1(100, Duration::from_secs(10)).entry("v".into(), 1, lifetime(60, 120), None);
        assert_eq!(
            capped.usable_until.duration_since(capped.created_at),
            Duration::from_secs(10)
        );
        assert_eq!(
            capped.fresh_until, capped.usable_until,
            "freshness within the retention too"
        );

        // Retention 120 s: a sweep at most every 60 s.
        let l1 = l1(100, Duration::from_secs(120));
        l1.write("long", l1.entry("v".into(), 1, lifetime(100, 100), None));
        l1.write("short", l1.entry("v".into(), 1, lifetime(1, 2), None));
        assert_eq!(l1.entry_count(), 2);
        let now = Instant::now();
        l1.sweep_if_due(now + Duration::from_secs(5));
        assert_eq!(l1.entry_count(), 2, "not due yet");
        l1.sweep_if_due(now + Duration::from_secs(61));
        assert_eq!(
            l1.entry_count(),
            1,
            "the expired entry is gone, the usable one stays"
        );
        assert!(l1
            .fresh("long", now + Duration::from_secs(61), None)
            .is_some());
        l1.sweep_if_due(now + Duration::from_secs(110));
        assert_eq!(l1.entry_count(), 1, "one sweep per interval");
        l1.sweep_if_due(now + Duration::from_secs(125));
        assert_eq!(l1.entry_count(), 0, "past its fail-safe window");
    }
}
