//! Test harness that runs **real** `redis-server` and `nats-server` processes
//! on free loopback ports, for integration tests of `fusioncache`.
//!
//! Nothing here is mocked: every [`RedisServer`], [`NatsServer`] and
//! [`NatsCluster`] is backed by an actual child process with its own temporary
//! directory and log file. Processes are killed by PID (SIGKILL) on
//! [`RedisServer::stop`] / [`NatsServer::stop`] and on `Drop`, so a test that
//! panics does not leak servers. [`RedisServer::stall`] / [`NatsServer::stall`]
//! freeze a server (SIGSTOP) until `resume` (SIGCONT).
//!
//! Network faults go through a [`FaultProxy`] placed between a client and a
//! server: pass, black hole, added latency, reset or close, switched at
//! runtime.
//!
//! All calls are synchronous and built on `std::process` / `std::net`. Each
//! one blocks only briefly (readiness waits are bounded, ~10–15 s at most), so
//! they can be called from inside `#[tokio::test]` functions.
//!
//! Binaries are looked up at `/usr/bin/redis-server` and
//! `/usr/sbin/nats-server`, falling back to `PATH`; the environment variables
//! `FUSIONCACHE_REDIS_SERVER` and `FUSIONCACHE_NATS_SERVER` override them.
//!
//! # Example
//!
//! ```no_run
//! use fusioncache_testkit::{NatsCluster, NatsServer, RedisServer};
//! use std::time::Duration;
//!
//! # fn main() -> std::io::Result<()> {
//! let mut redis = RedisServer::start()?;
//! assert!(redis.command(&["PING"])?.starts_with("+PONG"));
//! let url = redis.url(); // "redis://127.0.0.1:PORT"
//! # let _ = url;
//!
//! // Simulate an outage and recovery on the same port.
//! redis.stop();
//! assert!(redis.command(&["PING"]).is_err());
//! redis.restart()?;
//!
//! let nats = NatsServer::start_with_args(&["--user", "a", "--pass", "b"])?;
//! println!("nats at {} (monitor port {})", nats.url(), nats.monitor_port());
//!
//! let mut cluster = NatsCluster::start(3)?;
//! cluster.server_mut(2).stop();
//! cluster.wait_for_routes(Duration::from_secs(10))?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bench;
mod nats;
mod net;
mod process;
mod proxy;
mod redis;

pub use nats::{NatsCluster, NatsServer};
pub use proxy::{Fault, FaultProxy};
pub use redis::RedisServer;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Ports that must never be handed out: the machine-wide Redis and NATS
/// instances (and NATS' default cluster / monitoring ports).
const RESERVED_PORTS: &[u16] = &[6379, 4222, 6222, 8222];

/// Ports already handed out by [`free_port`] in this process, so that two
/// concurrently starting servers never get the same port from the kernel.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Returns a currently free TCP port on `127.0.0.1`.
///
/// Binds `127.0.0.1:0`, reads the port the kernel chose and drops the
/// listener. Never returns a port reserved for the machine's own Redis/NATS
/// (6379, 4222, 6222, 8222) and never returns the same port twice within one
/// process. Another process may still grab the port before the server binds
/// it; the `start` functions retry with new ports in that case.
///
/// # Panics
///
/// Panics only if no loopback port can be bound at all.
pub fn free_port() -> u16 {
    let mut used = handed_out().lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("cannot bind any port on 127.0.0.1");
        if !RESERVED_PORTS.contains(&port) && used.insert(port) {
            return port;
        }
    }
    panic!("could not find a free, unused loopback port");
}

/// Polls `cond` every ~15 ms until it returns `true` or `timeout` elapses.
///
/// Returns `true` as soon as `cond` does; returns `false` if it never did
/// within `timeout` (`cond` is always evaluated at least once, and once more
/// after the deadline).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(15).min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_unique_and_not_reserved() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let set: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(set.len(), ports.len());
        assert!(ports.iter().all(|p| !RESERVED_PORTS.contains(p) && *p != 0));
        // The port is actually bindable right after.
        let p = free_port();
        TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn wait_until_true_and_timeout() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(2), || {
            n += 1;
            n >= 3
        }));
        assert_eq!(n, 3);
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(100), || false));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(2));
    }
}
