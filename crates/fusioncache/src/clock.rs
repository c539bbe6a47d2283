//! The clock of L1 freshness.
//!
//! Every L1 hit compares its entry's expiry with now, so reading the clock is on the hottest path of the
//! cache. On Linux the clock is the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`): a read of a
//! value the kernel updates on every tick, with no TSC read (which costs some virtual machines 20 ns, a
//! tenth of a hit), at the resolution of a tick (1–10 ms; 4 ms on most distributions), the order of the
//! system clock .NET's `MemoryCache` expires FusionCache's entries by. Elsewhere, or should the coarse clock
//! be refused, it is std's monotonic clock. Either way an entry's freshness is exact to within a tick.

use std::ops::Add;
use std::sync::LazyLock;
use std::time::Duration;

/// A point in time on the L1 clock: nanoseconds since an arbitrary origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Instant(u64);

impl Instant {
    /// Now.
    #[inline(always)]
    pub fn now() -> Self {
        Self(coarse_nanos().unwrap_or_else(precise_nanos))
    }

    /// Nanoseconds since the clock's origin (for atomics).
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn duration_since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Self;

    /// Saturating: an entry that lives "for ever" ends at the end of this clock.
    fn add(self, d: Duration) -> Self {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(nanos))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline(always)]
fn coarse_nanos() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` that outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (rc == 0).then(|| (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[inline(always)]
fn coarse_nanos() -> Option<u64> {
    None
}

/// std's monotonic clock, from its first read here.
#[cold]
fn precise_nanos() -> u64 {
    static ORIGIN: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    u64::try_from(ORIGIN.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_moves_forward_at_the_rate_of_time() {
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let elapsed = Instant::now().duration_since(start);
        // One tick of resolution either side (10 ms at most on Linux).
        assert!(elapsed >= Duration::from_millis(40), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert_eq!(start.duration_since(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn adding_saturates() {
        let now = Instant::now();
        assert!(now + Duration::MAX > now + Duration::from_secs(86_400 * 365 * 100));
        assert_eq!(now + Duration::MAX, Instant(u64::MAX));
        assert_eq!(
            (now + Duration::from_secs(1)).duration_since(now),
            Duration::from_secs(1)
        );
    }
}
