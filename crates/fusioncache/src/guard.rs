//! The per-key guard against older values.
//!
//! A read from L2 (or a factory run) takes time; while it is in flight this node may write the key itself
//! or hear that another node changed it. Without care the read completes afterwards and installs what it
//! fetched, older than what the node has since seen, in L1 — fresh for the whole duration.
//!
//! So every operation that may install a value it did not just produce holds the key here first:
//!
//! - a **read** (L2 read, refresh after a remote *set*, factory run) takes a [`Hold`] before it fetches
//!   anything; it installs only through [`Hold::install`], which refuses a value whose timestamp is older
//!   than the newest write or invalidation observed for the key (and, for factories, any change at all);
//! - a **local write** (`set`, `remove`, `expire`) takes a hold with its timestamp, kept until its L2 step
//!   is done or queued for auto-recovery (which then retains the key until the item leaves the queue);
//! - a **remote notification** is applied through [`KeyGuard::observe`], which records its timestamp for
//!   the holders of the key and applies it under the same lock as their installs.
//!
//! State exists only for keys with a hold, so memory is bounded by the operations in flight plus the
//! auto-recovery queue, and the L1 hit path never comes here. A notification for a key nobody holds skips
//! the lock: whatever a later read fetches from L2 is at least as new as that notification, because a
//! node writes L2 before it publishes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What the guard knows of one held key.
#[derive(Debug, Default)]
struct Watch {
    /// Holds and retains on the key.
    holds: usize,
    /// The newest timestamp of a write or invalidation observed while the key was held.
    newest: i64,
    /// How many writes or invalidations were observed while the key was held.
    changes: u64,
}

/// The keys with an operation in flight, and what was observed for them.
#[derive(Debug, Default)]
pub(crate) struct KeyGuard {
    /// The number of held keys: zero lets notifications skip the lock.
    held: AtomicUsize,
    watches: Mutex<HashMap<String, Watch>>,
}

/// A key held by one operation; released on drop (also when the operation's future is cancelled).
#[derive(Debug)]
pub(crate) struct Hold {
    guard: Arc<KeyGuard>,
    key: String,
    changes_at_start: u64,
}

impl KeyGuard {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Watch>> {
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(&self, key: &str, write: Option<i64>) -> u64 {
        let mut watches = self.lock();
        let watch = match watches.get_mut(key) {
            Some(w) => w,
            None => {
                self.held.fetch_add(1, Ordering::AcqRel);
                watches.entry(key.to_string()).or_insert(Watch {
                    newest: i64::MIN,
                    ..Watch::default()
                })
            }
        };
        watch.holds += 1;
        let start = watch.changes;
        if let Some(ts) = write {
            watch.newest = watch.newest.max(ts);
            watch.changes += 1;
        }
        start
    }

    /// Holds `key` for a read (`write == None`) or for a local write with its timestamp.
    pub fn hold(self: &Arc<Self>, key: &str, write: Option<i64>) -> Hold {
        let changes_at_start = self.acquire(key, write);
        Hold {
            guard: Arc::clone(self),
            key: key.to_string(),
            changes_at_start,
        }
    }

    /// Keeps `key` held for a write queued for auto-recovery, until [`release`](Self::release).
    pub fn retain(&self, key: &str, timestamp: i64) {
        self.acquire(key, Some(timestamp));
    }

    /// Ends one hold or retain of `key`.
    pub fn release(&self, key: &str) {
        let mut watches = self.lock();
        if let Some(watch) = watches.get_mut(key) {
            watch.holds -= 1;
            if watch.holds == 0 {
                watches.remove(key);
                self.held.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Applies a remote change of `key` with `timestamp`: recorded for the key's holders (their older
    /// reads will not be installed) and applied under the lock their installs take.
    pub fn observe<R>(&self, key: &str, timestamp: i64, apply: impl FnOnce() -> R) -> R {
        if self.held.load(Ordering::Acquire) == 0 {
            return apply();
        }
        let mut watches = self.lock();
        if let Some(watch) = watches.get_mut(key) {
            watch.newest = watch.newest.max(timestamp);
            watch.changes += 1;
        }
        let result = apply();
        drop(watches);
        result
    }

    /// The number of held keys (tests and bounds).
    #[cfg(test)]
    pub fn held_keys(&self) -> usize {
        self.lock().len()
    }
}

impl Hold {
    /// Runs `install` (an L1 write of a value with `timestamp` that this operation fetched) only if no
    /// newer write or invalidation of the key was observed; returns what `install` returned, or `false`.
    pub fn install(&self, timestamp: i64, install: impl FnOnce() -> bool) -> bool {
        let watches = self.guard.lock();
        let newest = watches.get(&self.key).map_or(i64::MIN, |w| w.newest);
        if timestamp < newest {
            return false;
        }
        install()
    }

    /// For a value produced by this operation (a factory run): turns the hold into a local write with
    /// `timestamp` if nothing at all changed the key since the hold began, and returns the write's hold;
    /// `None` when the key was written or invalidated meanwhile (the value must not be cached as fresh).
    pub fn into_write_if_unchanged(self, timestamp: i64) -> Option<Hold> {
        let mut watches = self.guard.lock();
        let watch = watches.get_mut(&self.key)?;
        if watch.changes != self.changes_at_start {
            return None;
        }
        watch.newest = watch.newest.max(timestamp);
        watch.changes += 1;
        watch.holds += 1;
        let start = watch.changes;
        drop(watches);
        Some(Hold {
            guard: Arc::clone(&self.guard),
            key: self.key.clone(),
            changes_at_start: start,
        })
    }

    /// The held key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.guard.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_does_not_install_a_value_older_than_what_was_observed() {
        let guard = Arc::new(KeyGuard::default());
        let read = guard.hold("k", None);
        assert!(read.install(10, || true), "nothing observed yet");
        guard.observe("k", 20, || ());
        assert!(!read.install(15, || true), "older than the observed change");
        assert!(read.install(20, || true), "the observed write itself");
        assert!(read.install(25, || true), "newer");
        drop(read);
        assert_eq!(guard.held_keys(), 0, "no state without holds");
    }

    #[test]
    fn a_local_write_protects_the_key_from_older_reads() {
        let guard = Arc::new(KeyGuard::default());
        let read = guard.hold("k", None);
        let write = guard.hold("k", Some(30));
        assert!(!read.install(29, || true));
        drop(write);
        drop(read);
        // A write queued for auto-recovery keeps protecting the key.
        guard.retain("k", 40);
        let later = guard.hold("k", None);
        assert!(!later.install(35, || true));
        drop(later);
        guard.release("k");
        assert_eq!(guard.held_keys(), 0);
    }

    #[test]
    fn a_factory_value_is_cached_only_when_nothing_changed_during_the_run() {
        let guard = Arc::new(KeyGuard::default());
        let run = guard.hold("k", None);
        let write = run.into_write_if_unchanged(5).expect("unchanged");
        drop(write);
        let run = guard.hold("k", None);
        guard.observe("k", 1, || ()); // even an "older" remote change: the run raced it
        assert!(run.into_write_if_unchanged(5).is_none());
        assert_eq!(guard.held_keys(), 0);
    }

    #[test]
    fn notifications_for_unheld_keys_skip_the_state() {
        let guard = Arc::new(KeyGuard::default());
        let _other = guard.hold("other", None);
        assert_eq!(guard.observe("k", 7, || 42), 42);
        assert_eq!(guard.held_keys(), 1, "no state created for k");
    }
}
