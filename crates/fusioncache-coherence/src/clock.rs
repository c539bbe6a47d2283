//! The system-wide monotonic clock (`CLOCK_MONOTONIC`: one clock for every process of the machine, so the
//! logs of separate node processes can be merged).

use std::time::Duration;

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long until `at` (zero if past).
pub fn until(at: u64) -> Duration {
    Duration::from_nanos(at.saturating_sub(now_ns()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_agrees_with_instant_and_never_goes_back() {
        let (a, i) = (super::now_ns(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (b, took) = (super::now_ns(), i.elapsed());
        assert!(b > a);
        let diff = (b - a) as i128 - took.as_nanos() as i128;
        assert!(diff.abs() < 5_000_000, "{diff} ns apart");
    }
}
