//! What the benchmark binaries share about the machine they measure on: pinning a process to a core,
//! waiting for a quiet machine, and the summary statistics of their tables.

use std::process::Command;
use std::time::{Duration, Instant};

/// The 1-minute load average above which the machine is not quiet (the figures are flagged).
pub const QUIET_LOAD: f64 = 0.8;

/// The 1-minute load average, from `/proc/loadavg`.
pub fn load_average() -> Result<f64, String> {
    let text = std::fs::read_to_string("/proc/loadavg")
        .map_err(|e| format!("cannot read /proc/loadavg: {e}"))?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected /proc/loadavg: {text:?}"))
}

/// Waits (polling every 5 s) until the 1-minute load average is at most [`QUIET_LOAD`], at most `limit`;
/// then goes on either way (the caller's output says whether the machine was quiet). `tool` prefixes the
/// progress lines on stderr.
pub fn wait_for_quiet(tool: &str, limit: Duration) {
    let t0 = Instant::now();
    loop {
        match load_average() {
            Ok(load) if load <= QUIET_LOAD => return,
            Ok(load) if t0.elapsed() < limit => {
                eprintln!("{tool}: 1-minute load average {load:.2} > {QUIET_LOAD}, waiting");
            }
            Ok(load) => {
                eprintln!(
                    "{tool}: 1-minute load average still {load:.2} after {limit:?}, measuring anyway"
                );
                return;
            }
            Err(_) => return, // the run itself reports it
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// Pins every thread of `pid` to `core` with `taskset -a -cp`.
pub fn pin(pid: u32, core: u32) -> Result<(), String> {
    let out = Command::new("taskset")
        .args(["-a", "-cp", &core.to_string(), &pid.to_string()])
        .output()
        .map_err(|e| format!("cannot run taskset: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`taskset -a -cp {core} {pid}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Pins the server `what` (process `pid`) to core 1, and says how that went, for the report.
pub fn pin_server(what: &str, pid: u32) -> String {
    match pin(pid, 1) {
        Ok(()) => format!(
            "{what} (pid {pid}) pinned to core 1, all threads (taskset -a -cp 1; cpus allowed: {})",
            cpus_allowed(pid)
        ),
        Err(e) => format!("WARNING: {what} (pid {pid}) is not pinned to core 1: {e}"),
    }
}

/// The CPUs every thread of `pid` may run on, from /proc (distinct lists joined by ` / `).
pub fn cpus_allowed(pid: u32) -> String {
    let mut lists: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .collect();
    lists.sort();
    lists.dedup();
    if lists.is_empty() {
        "unknown".to_string()
    } else {
        lists.join(" / ")
    }
}

/// p50 / p99 (nearest rank) in microseconds.
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99))
}

/// The median (the upper one of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `fut`, or an error naming `what` once `limit` has passed.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("timed out after {limit:?} waiting for {what}"))
}

#[cfg(test)]
mod tests {
    use super::{median, percentiles};
    use std::time::Duration;

    #[test]
    fn percentiles_are_nearest_rank_and_median_is_the_middle() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(percentiles(&mut samples), (50.0, 99.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
