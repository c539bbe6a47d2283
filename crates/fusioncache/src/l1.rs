//! The L1: this node's in-memory entries (moka), their freshness, and the writes that keep it coherent.
//!
//! Reads take the lock-free moka path. Every write of a key holds the key's write-lock stripe, so a local
//! write, a guarded install of a value read from L2 and a notification never interleave on one key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::Instant;

use crate::tags::{TagState, Tags, Visibility};

/// How long an entry is fresh and how long it stays usable (as a fail-safe fallback) in L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub fresh_for: Duration,
    pub usable_for: Duration,
    /// With eager refresh: when a hit starts refreshing the entry in the background.
    pub refresh_after: Option<Duration>,
}

/// The tag states an entry points to (`None`: untagged, the common case, at no cost).
pub(crate) type EntryTags = Option<Arc<[Arc<TagState>]>>;

/// A value in L1. Stored by value (moka clones it out on a hit, which clones `V` once, as a raw moka get
/// would); staleness is set by replacing the entry atomically. Expiry is checked here, per entry, rather
/// than by a moka `Expiry` (which costs every read a second clock check).
#[derive(Debug, Clone)]
pub(crate) struct L1Entry<V> {
    pub value: V,
    /// The write this value came from (UTC ticks), compared with backplane messages.
    pub timestamp: i64,
    /// When the entry was put in L1.
    pub created_at: Instant,
    /// Logical expiry (set back to `created_at` when `expire` or a notification marks the entry stale).
    pub fresh_until: Instant,
    /// How long it may serve, as fresh or as a fail-safe fallback; past it, it counts as missing (moka
    /// drops it on capacity pressure or at the cache's retention bound).
    pub usable_until: Instant,
    /// With eager refresh, when a hit starts a background refresh (else `fresh_until`).
    pub refresh_at: Instant,
    /// The stale epoch when it was created: older than the current one means stale.
    pub epoch: u64,
    /// Its tags, checked against their removal timestamps on every read.
    pub tags: EntryTags,
}

impl<V> L1Entry<V> {
    /// Logically fresh: not marked stale, not from before the last mark-all-stale, not past its expiry.
    #[inline]
    pub fn is_fresh(&self, now: Instant, current_epoch: u64) -> bool {
        now < self.fresh_until && self.epoch >= current_epoch
    }

    /// Still inside its fail-safe window (moka may not have evicted it yet).
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

/// The L1 of one cache.
pub(crate) struct L1<V> {
    cache: moka::sync::Cache<String, L1Entry<V>>,
    /// Entries created before the current epoch are stale.
    epoch: AtomicU64,
    /// A hard cap on every freshness.
    max_duration: Option<Duration>,
    /// Clears and tag removals, checked on every read.
    tags: Tags,
    /// Striped write locks (see `write_lock`).
    write_locks: Box<[Mutex<()>]>,
}

/// Write-lock stripes of one L1.
const WRITE_STRIPES: usize = 64;

/// A cheap hash of a key, to pick its write-lock stripe (FNV-1a).
fn stripe_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

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
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(retention)
                .build(),
            epoch: AtomicU64::new(0),
            max_duration,
            tags,
            write_locks: (0..WRITE_STRIPES).map(|_| Mutex::new(())).collect(),
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
        tags: EntryTags,
    ) -> L1Entry<V> {
        let now = Instant::now();
        let fresh_until = now + lifetime.fresh_for;
        L1Entry {
            value,
            timestamp,
            created_at: now,
            fresh_until,
            usable_until: now + lifetime.usable_for,
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
        match self.tags.visibility(entry.timestamp, entry.tags.as_deref()) {
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

    /// The write lock of `key`'s stripe: every L1 write of a key (local write, install of a value read
    /// from L2, refresh, stale mark, eviction) holds it, so they never interleave on one key; reads take
    /// none. Cheaper than moka's per-key compute (which allocates a waiter per call).
    fn write_lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let stripe = (stripe_hash(key) as usize) % self.write_locks.len();
        self.write_locks[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A local write: replaces whatever is there.
    pub fn write(&self, key: &str, entry: L1Entry<V>) {
        if entry.usable_until <= entry.created_at {
            return self.remove(key);
        }
        let _write = self.write_lock(key);
        self.cache.insert(key.to_string(), entry);
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
        let _write = self.write_lock(key);
        let put = match self.cache.get(key) {
            Some(current) => current.timestamp <= entry.timestamp,
            None => !only_existing,
        };
        if put {
            self.cache.insert(key.to_string(), entry);
        }
        put
    }

    /// Marks the entry of `key` stale when `condition` holds for it. Returns whether the entry exists and
    /// meets the condition (stale now, whether or not it was before).
    pub fn mark_stale(&self, key: &str, condition: impl FnOnce(&L1Entry<V>) -> bool) -> bool {
        let _write = self.write_lock(key);
        let Some(mut entry) = self.cache.get(key) else {
            return false;
        };
        if !condition(&entry) {
            return false;
        }
        if entry.fresh_until > entry.created_at {
            entry.fresh_until = entry.created_at;
            self.cache.insert(key.to_string(), entry);
        }
        true
    }

    /// Evicts `key`.
    pub fn remove(&self, key: &str) {
        let _write = self.write_lock(key);
        self.cache.invalidate(key);
    }

    /// Evicts every entry.
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Marks every entry stale (O(1): bumps the epoch).
    pub fn mark_all_stale(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The number of entries (approximate, as moka's).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
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
        let tagged = l1.tags().states(&["t"]);
        let put = |key: &str, ts: i64, lt: Lifetime, tags: EntryTags| {
            l1.write(key, l1.entry(key.to_string(), ts, lt, tags));
        };
        put("fresh", 10, lifetime(60, 120), None);
        put("expired", 10, lifetime(0, 120), None);
        put("marked", 10, lifetime(60, 120), None);
        assert!(l1.mark_stale("marked", |_| true));
        put("tag-removed", 10, lifetime(60, 120), tagged.clone());
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
}
