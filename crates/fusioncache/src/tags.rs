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
//! Each tag this node knows is a shared [`TagState`]. An L1 entry carries its tags as a [`TagSetId`], a
//! slot of the cache's table of tag sets, which a hit copies with the entry at no cost (a reference-counted
//! set would cost every tagged hit two atomic read-modify-writes). A hit of an entry written after the
//! newest removal of any tag needs nothing more (one atomic load); an older one looks its set up and checks
//! each tag. The table's unused sets are dropped by the L1's sweep. A state's timestamp is resolved from L2
//! before an entry read from L2 is trusted, once per stale epoch (again after every reconnection or gap,
//! when the node may have missed a removal), or on every L2 read when the cache has no backplane.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

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
    /// The cache's newest removal of any tag (clear markers included), kept up to date with this one.
    any: Arc<AtomicI64>,
    /// For the clear markers: the cache's newest clear timestamp, kept up to date with this one.
    also: Option<Arc<AtomicI64>>,
}

const UNRESOLVED: u64 = u64::MAX;

impl TagState {
    fn new(name: &str, any: &Arc<AtomicI64>) -> Self {
        Self {
            name: name.into(),
            removed_at: AtomicI64::new(i64::MIN),
            resolved_in: AtomicU64::new(UNRESOLVED),
            any: any.clone(),
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
        self.any.fetch_max(timestamp, Ordering::AcqRel);
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

/// How an entry stands against the clears and the removals of its tags (in order of severity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Visibility {
    Visible,
    /// Expired by a clear or a tag removal: usable only as a fail-safe fallback.
    Expired,
    /// Removed by a clear or a tag removal.
    Removed,
}

/// The tags of one cache: the two clear markers, a registry of the tags its entries carry, and the table of
/// the tag sets L1 entries point to.
pub(crate) struct Tags {
    pub clear_expire: Arc<TagState>,
    pub clear_remove: Arc<TagState>,
    /// The newest timestamp of either clear (one load on the L1 hit path of an untagged entry).
    last_clear: Arc<AtomicI64>,
    /// The newest removal of any tag, clears included (one load on the L1 hit path of a tagged entry).
    any_removal: Arc<AtomicI64>,
    pub behavior: RemoveByTagBehavior,
    registry: Mutex<Registry>,
    sets: RwLock<TagSets>,
}

#[derive(Default)]
struct Registry {
    states: HashMap<Box<str>, Weak<TagState>>,
    /// Size after the last sweep of dead states: sweep again when it doubles.
    swept_at: usize,
}

/// The tags of an L1 entry: a slot of its cache's [`TagSets`], valid while the slot's generation is this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TagSetId {
    slot: u32,
    generation: u32,
}

/// The tag sets L1 entries point to, one per distinct list of tags, kept until the L1's sweeps find no
/// entry pointing to them [`SET_GRACE_SWEEPS`] times in a row.
#[derive(Default)]
struct TagSets {
    slots: Vec<SetSlot>,
    by_names: HashMap<Box<[Box<str>]>, u32>,
    free: Vec<u32>,
}

#[derive(Default)]
struct SetSlot {
    generation: u32,
    states: Option<Arc<[Arc<TagState>]>>,
    /// Sweeps in a row that found no entry with this set.
    unseen: u8,
}

/// A set no entry points to is dropped at this many sweeps in a row: one sweep of grace covers an operation
/// that holds a set's id across the sweep before its entry is in L1 (a factory run keeping a fail-safe
/// fallback). An entry that still points to a dropped set counts as expired, never as fresh.
const SET_GRACE_SWEEPS: u8 = 2;

impl Tags {
    pub fn new(behavior: RemoveByTagBehavior) -> Self {
        let last_clear = Arc::new(AtomicI64::new(i64::MIN));
        let any_removal = Arc::new(AtomicI64::new(i64::MIN));
        Self {
            clear_expire: Arc::new(TagState {
                also: Some(last_clear.clone()),
                ..TagState::new(CLEAR_EXPIRE_TAG, &any_removal)
            }),
            clear_remove: Arc::new(TagState {
                also: Some(last_clear.clone()),
                ..TagState::new(CLEAR_REMOVE_TAG, &any_removal)
            }),
            last_clear,
            any_removal,
            behavior,
            registry: Mutex::default(),
            sets: RwLock::default(),
        }
    }

    /// The id of the set of `states` (`None` for none), added to the table if it is new.
    pub fn set_id(&self, states: Option<&[Arc<TagState>]>) -> Option<TagSetId> {
        let states = states.filter(|s| !s.is_empty())?;
        let names: Box<[Box<str>]> = states.iter().map(|t| t.name.clone()).collect();
        Some(
            self.find_set(&names)
                .unwrap_or_else(|| self.add_set(names, states)),
        )
    }

    /// The id of the set of the tags named `tags` (`None` for none), added to the table if it is new.
    pub fn set_of<S: AsRef<str>>(&self, tags: &[S]) -> Option<TagSetId> {
        if tags.is_empty() {
            return None;
        }
        let names: Box<[Box<str>]> = tags.iter().map(|t| t.as_ref().into()).collect();
        Some(self.find_set(&names).unwrap_or_else(|| {
            let states: Vec<_> = tags.iter().map(|t| self.state(t.as_ref())).collect();
            self.add_set(names, &states)
        }))
    }

    /// Adds the set of `states`, named `names`, unless another caller just did.
    fn add_set(&self, names: Box<[Box<str>]>, states: &[Arc<TagState>]) -> TagSetId {
        let mut sets = self.sets.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&slot) = sets.by_names.get(&names) {
            let generation = sets.slots[slot as usize].generation;
            return TagSetId { slot, generation };
        }
        let slot = match sets.free.pop() {
            Some(slot) => slot,
            None => {
                sets.slots.push(SetSlot::default());
                u32::try_from(sets.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let entry = &mut sets.slots[slot as usize];
        entry.states = Some(states.into());
        entry.unseen = 0;
        let generation = entry.generation;
        sets.by_names.insert(names, slot);
        TagSetId { slot, generation }
    }

    fn find_set(&self, names: &[Box<str>]) -> Option<TagSetId> {
        let sets = self.sets.read().unwrap_or_else(|e| e.into_inner());
        let slot = *sets.by_names.get(names)?;
        let generation = sets.slots[slot as usize].generation;
        Some(TagSetId { slot, generation })
    }

    /// How an L1 entry written at `timestamp` with the tag set `tags` stands now: an entry written after the
    /// newest removal of any tag at the cost of one load; otherwise against each of its tags (an entry whose
    /// set was dropped counts as expired).
    #[inline(always)]
    pub fn visibility_of(&self, timestamp: i64, tags: Option<TagSetId>) -> Visibility {
        match tags {
            None => self.visibility(timestamp, None),
            Some(_) if timestamp > self.any_removal.load(Ordering::Relaxed) => Visibility::Visible,
            Some(id) => self.visibility_slow(timestamp, id),
        }
    }

    #[cold]
    fn visibility_slow(&self, timestamp: i64, id: TagSetId) -> Visibility {
        let sets = self.sets.read().unwrap_or_else(|e| e.into_inner());
        let states = sets
            .slots
            .get(id.slot as usize)
            .filter(|slot| slot.generation == id.generation)
            .and_then(|slot| slot.states.as_deref());
        match states {
            Some(states) => self.visibility(timestamp, Some(states)),
            None => self.visibility(timestamp, None).max(Visibility::Expired),
        }
    }

    /// After an L1 sweep that found the sets `seen`: the sets no entry pointed to for
    /// [`SET_GRACE_SWEEPS`] sweeps in a row are dropped (their ids turn invalid).
    pub fn sweep_sets(&self, seen: &HashSet<TagSetId>) {
        let mut sets = self.sets.write().unwrap_or_else(|e| e.into_inner());
        let sets = &mut *sets;
        let mut dropped = Vec::new();
        for (slot, entry) in sets.slots.iter_mut().enumerate() {
            if entry.states.is_none() {
                continue;
            }
            let id = TagSetId {
                slot: slot as u32,
                generation: entry.generation,
            };
            if seen.contains(&id) {
                entry.unseen = 0;
                continue;
            }
            entry.unseen += 1;
            if entry.unseen >= SET_GRACE_SWEEPS {
                entry.states = None;
                entry.generation = entry.generation.wrapping_add(1);
                dropped.push(slot as u32);
            }
        }
        if !dropped.is_empty() {
            sets.by_names.retain(|_, slot| !dropped.contains(slot));
            sets.free.extend(dropped);
        }
    }

    /// The number of sets in the table (tests).
    #[cfg(test)]
    pub fn set_count(&self) -> usize {
        let sets = self.sets.read().unwrap_or_else(|e| e.into_inner());
        sets.slots.iter().filter(|s| s.states.is_some()).count()
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
        let state = Arc::new(TagState::new(tag, &self.any_removal));
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

    /// Entries with the same tags share one set; a set is kept while the sweeps find an entry with it,
    /// dropped after two sweeps without, and an entry still pointing to a dropped set counts as expired.
    #[test]
    fn tag_sets_are_shared_and_dropped_two_sweeps_after_their_last_entry() {
        let tags = Tags::new(RemoveByTagBehavior::Expire);
        let xy = tags.set_of(&["x", "y"]).unwrap();
        assert_eq!(tags.set_of(&["x", "y"]), Some(xy), "shared");
        assert_eq!(tags.set_id(tags.states(&["x", "y"]).as_deref()), Some(xy));
        let x = tags.set_of(&["x"]).unwrap();
        assert_ne!(x, xy);
        assert_eq!(tags.set_of::<&str>(&[]), None);
        assert_eq!(tags.set_count(), 2);

        let seen: HashSet<TagSetId> = [xy].into_iter().collect();
        tags.sweep_sets(&seen);
        assert_eq!(tags.set_count(), 2, "x: one sweep unseen, kept");
        tags.sweep_sets(&seen);
        assert_eq!(tags.set_count(), 1, "x dropped after two sweeps unseen");
        assert_eq!(tags.visibility_of(10, Some(xy)), Visibility::Visible);
        tags.existing("x").unwrap().removed(20);
        assert_eq!(
            tags.visibility_of(10, Some(x)),
            Visibility::Expired,
            "a dropped set: expired, not fresh"
        );
        assert_eq!(
            tags.visibility_of(10, Some(xy)),
            Visibility::Expired,
            "x removed"
        );
        assert_eq!(
            tags.visibility_of(21, Some(xy)),
            Visibility::Visible,
            "written after"
        );
        let again = tags.set_of(&["x"]).unwrap();
        assert_ne!(again, x, "a new set in the freed slot has a new generation");
        assert_eq!(tags.visibility_of(21, Some(again)), Visibility::Visible);
        assert_eq!(
            tags.visibility_of(21, Some(x)),
            Visibility::Visible,
            "written after every removal: no tag of it can be gone, whatever its set"
        );
    }

    /// A tagged entry written after the newest removal of any tag is visible at the cost of one load; one
    /// written before it is checked against its own tags only.
    #[test]
    fn only_entries_older_than_a_removal_are_checked_tag_by_tag() {
        let tags = Tags::new(RemoveByTagBehavior::Remove);
        let a = tags.set_of(&["a"]).unwrap();
        let b = tags.set_of(&["b"]).unwrap();
        tags.existing("a").unwrap().removed(50);
        assert_eq!(tags.visibility_of(40, Some(a)), Visibility::Removed);
        assert_eq!(
            tags.visibility_of(40, Some(b)),
            Visibility::Visible,
            "b not removed"
        );
        assert_eq!(tags.visibility_of(60, Some(a)), Visibility::Visible);
        tags.clear_expire.removed(70);
        assert_eq!(
            tags.visibility_of(65, Some(b)),
            Visibility::Expired,
            "cleared"
        );
        assert_eq!(tags.visibility_of(65, None), Visibility::Expired);
        assert_eq!(tags.visibility_of(71, Some(b)), Visibility::Visible);
    }
}
