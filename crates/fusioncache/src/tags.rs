//! Tags and clear, the way FusionCache 2 does them: a removal is a timestamp, not a scan.
//!
//! `remove_by_tag("t")` stores the current timestamp as an ordinary entry under `__fc:t:t` in L2 and
//! announces it as a *set* notification on that key (what a .NET node sends too). An entry carrying tag
//! `t` whose write timestamp is not newer than that timestamp is treated as gone, on every node: as
//! expired (still a fail-safe fallback) or removed, per [`RemoveByTagBehavior`]. `clear()` is the same
//! with the reserved tags `*` (expire all) and `!` (remove all), checked for every entry. So both are
//! O(1) whatever the cache size, honoured by nodes started later (they read the timestamps from L2), and
//! entries written afterwards survive.
//!
//! Each tag this node knows is a shared [`TagState`] that L1 entries point to, so checking the tags of an
//! L1 hit is one atomic load per tag, with no lookup and no lock. A state's timestamp is resolved from L2
//! before an entry read from L2 is trusted, once per stale epoch (again after every reconnection or gap,
//! when the node may have missed a removal), or on every L2 read when the cache has no backplane.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The prefix of FusionCache's internal keys (tags, clear, probes): never a user entry.
pub(crate) const INTERNAL_KEY_PREFIX: &str = "__fc:";
/// The prefix of the keys holding tag removal timestamps (FusionCache's `TagCacheKeyPrefix`).
pub(crate) const TAG_KEY_PREFIX: &str = "__fc:t:";
/// The tag of `clear(allow_fail_safe: true)`: expire everything (FusionCache's `ClearExpireTag`).
pub(crate) const CLEAR_EXPIRE_TAG: &str = "*";
/// The tag of `clear(allow_fail_safe: false)`: remove everything (FusionCache's `ClearRemoveTag`).
pub(crate) const CLEAR_REMOVE_TAG: &str = "!";

/// What happens to the entries of a removed tag (FusionCache's `RemoveByTagBehavior`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoveByTagBehavior {
    /// They count as expired: no longer served as fresh, still usable as fail-safe fallbacks.
    #[default]
    Expire,
    /// They count as removed.
    Remove,
}

/// The key under which the removal timestamp of `tag` is stored and announced.
pub(crate) fn tag_key(tag: &str) -> String {
    format!("{TAG_KEY_PREFIX}{tag}")
}

/// What this node knows of one tag: the newest removal timestamp seen (from L2, a notification or a
/// local removal), and in which stale epoch it was last read from L2.
#[derive(Debug)]
pub(crate) struct TagState {
    name: Box<str>,
    removed_at: AtomicI64,
    resolved_in: AtomicU64,
    /// For the clear markers: the cache's newest clear timestamp, kept up to date with this one.
    also: Option<Arc<AtomicI64>>,
}

const UNRESOLVED: u64 = u64::MAX;

impl TagState {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            removed_at: AtomicI64::new(i64::MIN),
            resolved_in: AtomicU64::new(UNRESOLVED),
            also: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The newest removal timestamp known (`i64::MIN`: never removed).
    #[inline]
    pub fn removed_at(&self) -> i64 {
        self.removed_at.load(Ordering::Acquire)
    }

    /// Records a removal at `timestamp` (the newest wins).
    pub fn removed(&self, timestamp: i64) {
        self.removed_at.fetch_max(timestamp, Ordering::AcqRel);
        if let Some(also) = &self.also {
            also.fetch_max(timestamp, Ordering::AcqRel);
        }
    }

    /// Whether the timestamp was read from L2 in `epoch`.
    pub fn is_resolved(&self, epoch: u64) -> bool {
        self.resolved_in.load(Ordering::Acquire) == epoch
    }

    /// Records the timestamp read from L2 (`None`: the tag was never removed) in `epoch`.
    pub fn resolve(&self, timestamp: Option<i64>, epoch: u64) {
        if let Some(ts) = timestamp {
            self.removed(ts);
        }
        self.resolved_in.store(epoch, Ordering::Release);
    }
}

/// How an entry stands against the clears and the removals of its tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visibility {
    Visible,
    /// Expired by a clear or a tag removal: usable only as a fail-safe fallback.
    Expired,
    /// Removed by a clear or a tag removal.
    Removed,
}

/// The tags of one cache: the two clear markers and a registry of the tags its entries carry.
pub(crate) struct Tags {
    pub clear_expire: Arc<TagState>,
    pub clear_remove: Arc<TagState>,
    /// The newest timestamp of either clear (one load on the L1 hit path of an untagged entry).
    last_clear: Arc<AtomicI64>,
    pub behavior: RemoveByTagBehavior,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    states: HashMap<Box<str>, Weak<TagState>>,
    /// Size after the last sweep of dead states: sweep again when it doubles.
    swept_at: usize,
}

impl Tags {
    pub fn new(behavior: RemoveByTagBehavior) -> Self {
        let last_clear = Arc::new(AtomicI64::new(i64::MIN));
        Self {
            clear_expire: Arc::new(TagState {
                also: Some(last_clear.clone()),
                ..TagState::new(CLEAR_EXPIRE_TAG)
            }),
            clear_remove: Arc::new(TagState {
                also: Some(last_clear.clone()),
                ..TagState::new(CLEAR_REMOVE_TAG)
            }),
            last_clear,
            behavior,
            registry: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of `tag`, created if no entry holds it yet. Entries keep their tags' states alive; the
    /// registry only points to them.
    pub fn state(&self, tag: &str) -> Arc<TagState> {
        match tag {
            CLEAR_EXPIRE_TAG => return self.clear_expire.clone(),
            CLEAR_REMOVE_TAG => return self.clear_remove.clone(),
            _ => {}
        }
        let mut reg = self.lock();
        if let Some(state) = reg.states.get(tag).and_then(Weak::upgrade) {
            return state;
        }
        let state = Arc::new(TagState::new(tag));
        reg.states.insert(tag.into(), Arc::downgrade(&state));
        if reg.states.len() > 2 * reg.swept_at.max(512) {
            reg.states.retain(|_, w| w.strong_count() > 0);
            reg.swept_at = reg.states.len();
        }
        state
    }

    /// The states of `tags` (`None` for none).
    pub fn states<S: AsRef<str>>(&self, tags: &[S]) -> Option<Arc<[Arc<TagState>]>> {
        if tags.is_empty() {
            return None;
        }
        Some(tags.iter().map(|t| self.state(t.as_ref())).collect())
    }

    /// The state of `tag` if some entry (or a clear marker) holds it: a notification about a tag nobody
    /// here holds needs nothing (L2 has the timestamp for later reads).
    pub fn existing(&self, tag: &str) -> Option<Arc<TagState>> {
        match tag {
            CLEAR_EXPIRE_TAG => Some(self.clear_expire.clone()),
            CLEAR_REMOVE_TAG => Some(self.clear_remove.clone()),
            _ => self.lock().states.get(tag).and_then(Weak::upgrade),
        }
    }

    /// How an entry written at `timestamp` with `tags` stands now.
    #[inline(always)]
    pub fn visibility(&self, timestamp: i64, tags: Option<&[Arc<TagState>]>) -> Visibility {
        // The common case first: untagged, and written after the last clear of either kind.
        if tags.is_none() && timestamp > self.last_clear.load(Ordering::Relaxed) {
            return Visibility::Visible;
        }
        if timestamp <= self.clear_remove.removed_at() {
            return Visibility::Removed;
        }
        if let Some(tags) = tags {
            if tags.iter().any(|t| timestamp <= t.removed_at()) {
                return match self.behavior {
                    RemoveByTagBehavior::Expire => Visibility::Expired,
                    RemoveByTagBehavior::Remove => Visibility::Removed,
                };
            }
        }
        if timestamp <= self.clear_expire.removed_at() {
            return Visibility::Expired;
        }
        Visibility::Visible
    }

    /// The tag states to read from L2 before trusting an entry with `tags`: those not resolved in
    /// `epoch` (every one, clear markers included, when `always`).
    pub fn unresolved(
        &self,
        tags: Option<&[Arc<TagState>]>,
        epoch: u64,
        always: bool,
    ) -> Vec<Arc<TagState>> {
        [&self.clear_expire, &self.clear_remove]
            .into_iter()
            .chain(tags.into_iter().flatten())
            .filter(|t| always || !t.is_resolved(epoch))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_written_before_a_removal_are_gone_and_later_ones_survive() {
        let tags = Tags::new(RemoveByTagBehavior::Expire);
        let x = tags.states(&["x"]).unwrap();
        assert_eq!(tags.visibility(10, Some(&x)), Visibility::Visible);
        tags.existing("x").unwrap().removed(20);
        assert_eq!(tags.visibility(10, Some(&x)), Visibility::Expired);
        assert_eq!(
            tags.visibility(20, Some(&x)),
            Visibility::Expired,
            "same tick: gone"
        );
        assert_eq!(tags.visibility(21, Some(&x)), Visibility::Visible);
        assert_eq!(tags.visibility(10, None), Visibility::Visible, "untagged");
        tags.clear_expire.removed(30);
        assert_eq!(tags.visibility(25, None), Visibility::Expired);
        tags.clear_remove.removed(40);
        assert_eq!(tags.visibility(35, None), Visibility::Removed);
        assert_eq!(tags.visibility(41, Some(&x)), Visibility::Visible);
    }

    #[test]
    fn remove_behavior_and_unknown_tags() {
        let tags = Tags::new(RemoveByTagBehavior::Remove);
        let x = tags.states(&["x"]).unwrap();
        x[0].removed(5);
        assert_eq!(tags.visibility(5, Some(&x)), Visibility::Removed);
        assert!(tags.existing("never-seen").is_none());
        drop(x);
        assert!(tags.existing("x").is_none(), "no entry holds it any more");
    }

    #[test]
    fn resolution_is_per_epoch() {
        let tags = Tags::new(RemoveByTagBehavior::Expire);
        let x = tags.states(&["x"]).unwrap();
        assert_eq!(
            tags.unresolved(Some(&x), 0, false).len(),
            3,
            "both clears and x"
        );
        for t in tags.unresolved(Some(&x), 0, false) {
            t.resolve(None, 0);
        }
        assert!(tags.unresolved(Some(&x), 0, false).is_empty());
        assert_eq!(tags.unresolved(Some(&x), 1, false).len(), 3, "a new epoch");
        assert_eq!(
            tags.unresolved(Some(&x), 0, true).len(),
            3,
            "always without a backplane"
        );
        x[0].resolve(Some(7), 1);
        assert_eq!(x[0].removed_at(), 7);
        x[0].resolve(Some(3), 1);
        assert_eq!(x[0].removed_at(), 7, "the newest wins");
    }
}
