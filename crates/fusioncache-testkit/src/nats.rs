//! Real `nats-server` child processes: single servers and routed clusters.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::net::http_get;
use crate::process::{
    find_binary, log_tail, respawn_until_ready, temp_dir, wait_ready, NotReady, Proc,
};
use crate::redis::describe;

/// How long `start` / `restart` wait for `GET /healthz` to return 200.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NatsCluster::start`] waits for the full route mesh.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(15);
/// Socket timeouts for readiness probes.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Socket timeouts for [`NatsServer::monitor`].
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Start attempts (each on fresh ports) before giving up.
const START_ATTEMPTS: usize = 3;
/// Cluster name used by [`NatsCluster`].
const CLUSTER_NAME: &str = "fctest";

/// A `nats-server` process listening on `127.0.0.1` with a free client port
/// and a free HTTP monitoring port, its own temporary directory and a log
/// file in it.
///
/// The process is killed (SIGKILL) when the value is dropped.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    monitor_port: u16,
    extra_args: Vec<String>,
    config: Option<PathBuf>,
    proc_: Proc,
    // Declared last so it is removed after the process is gone.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server` (`/usr/sbin/nats-server` or from `PATH`) with
    /// `-a 127.0.0.1`, a free client port (`-p`), a free monitoring port
    /// (`-m`) and a log file (`-l`) in its own temp dir, then waits (up to
    /// ~10 s) until `GET /healthz` on the monitoring port returns 200.
    ///
    /// If the process exits early or never becomes ready, it is retried on
    /// new ports, up to 3 attempts; the error then contains the log tail.
    pub fn start() -> io::Result<Self> {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with `args` appended to the command line,
    /// e.g. `["--user", "a", "--pass", "b"]` or `["--auth", "token"]`.
    pub fn start_with_args(args: &[&str]) -> io::Result<Self> {
        Self::start_inner(args.iter().map(|s| s.to_string()).collect(), None)
    }

    /// Like [`start`](Self::start), with `conf` written to `nats.conf` in the
    /// temp dir and passed with `-c`. The text must not set `port`, `http`
    /// or `listen`: the harness passes those on the command line (which
    /// takes precedence over the file).
    pub fn start_with_config(conf: &str) -> io::Result<Self> {
        Self::start_inner(Vec::new(), Some(conf))
    }

    fn start_inner(extra_args: Vec<String>, conf: Option<&str>) -> io::Result<Self> {
        let mut server = Self::unstarted(extra_args, conf, 0, 0)?;
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            server.port = crate::free_port();
            server.monitor_port = crate::free_port();
            server.spawn()?;
            match server.wait_healthy(READY_TIMEOUT) {
                Ok(()) => return Ok(server),
                Err(why) => {
                    server.proc_.kill();
                    failures.push(format!(
                        "attempt {attempt} on ports {}/{}: {}",
                        server.port,
                        server.monitor_port,
                        describe(&why)
                    ));
                }
            }
        }
        Err(server.error(&format!(
            "nats-server did not become healthy ({})",
            failures.join("; ")
        )))
    }

    /// Creates the temp dir (and config file), but does not spawn anything.
    fn unstarted(
        extra_args: Vec<String>,
        conf: Option<&str>,
        port: u16,
        monitor_port: u16,
    ) -> io::Result<Self> {
        let dir = temp_dir("fctest-nats-")?;
        let config = match conf {
            Some(text) => {
                let path = dir.path().join("nats.conf");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        Ok(NatsServer {
            binary: find_binary(
                "FUSIONCACHE_NATS_SERVER",
                &["/usr/sbin/nats-server", "/usr/local/bin/nats-server"],
                "nats-server",
            ),
            port,
            monitor_port,
            extra_args,
            config,
            proc_: Proc::default(),
            dir,
        })
    }

    /// The client port (stable across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/healthz`, `/varz`, `/routez`, `/connz`...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// Client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// PID of the running process; `None` while stopped (or if it died).
    pub fn pid(&self) -> Option<u32> {
        self.proc_.pid()
    }

    /// The server's temporary directory (log file, `nats.conf`; tests may
    /// write creds / nkey files here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the server's log file (`-l`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// `GET path` (e.g. `"/connz"`) on the monitoring port; returns the HTTP
    /// status code and the body (JSON for the monitoring endpoints).
    pub fn monitor(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(self.monitor_port, path, HTTP_TIMEOUT)
    }

    /// `GET path` on the monitoring port, parsed as JSON (e.g. `/connz`,
    /// `/varz`, `/subsz`). A status other than 200 or a body that is not JSON
    /// is an `InvalidData` error.
    pub fn monitor_json(&self, path: &str) -> io::Result<serde_json::Value> {
        monitor_json(self.monitor_port, path, HTTP_TIMEOUT)
    }

    /// Kills the process by PID (SIGKILL, as `kill -9`) and waits for it to
    /// exit. Idempotent; never panics.
    pub fn stop(&mut self) {
        self.proc_.kill();
    }

    /// Stops the server gracefully (SIGTERM, as a service manager does) and
    /// waits up to 10 s for it to exit, then kills it. Idempotent.
    pub fn shutdown(&mut self) {
        self.proc_.terminate(Duration::from_secs(10));
    }

    /// Stalls the server (SIGSTOP): its sockets stay open and the kernel
    /// still accepts bytes, but nothing is answered until
    /// [`resume`](Self::resume). Returns once every thread of the server is stopped. A no-op while
    /// stopped.
    pub fn stall(&self) -> io::Result<()> {
        self.proc_.stall()
    }

    /// Resumes a stalled server (SIGCONT). A no-op while stopped.
    pub fn resume(&self) -> io::Result<()> {
        self.proc_.signal(libc::SIGCONT)
    }

    /// The `nats.conf` of a server started with
    /// [`start_with_config`](Self::start_with_config); rewrite it, then
    /// [`reload`](Self::reload).
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// Makes the server reload its configuration file (SIGHUP), e.g. after
    /// changing the permissions of its users. A no-op while stopped.
    pub fn reload(&self) -> io::Result<()> {
        self.proc_.signal(libc::SIGHUP)
    }

    /// Stops the server if running, then starts it again with the **same**
    /// client, monitoring (and cluster) ports, directory and arguments, and
    /// waits (up to ~10 s) until `/healthz` returns 200. A bind failure
    /// (port still in use) is retried until that deadline.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let outcome = respawn_until_ready(
            &self.proc_,
            READY_TIMEOUT,
            || self.spawn(),
            || self.is_healthy(),
        )?;
        outcome.map_err(|why| {
            self.error(&format!(
                "nats-server did not come back on port {}: {}",
                self.port,
                describe(&why)
            ))
        })
    }

    fn spawn(&self) -> io::Result<()> {
        let mut args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-m".into(),
            self.monitor_port.to_string(),
            "-l".into(),
            self.log_path().to_string_lossy().into_owned(),
        ];
        if let Some(config) = &self.config {
            args.push("-c".into());
            args.push(config.to_string_lossy().into_owned());
        }
        args.extend(self.extra_args.iter().cloned());
        self.proc_.spawn(
            &self.binary,
            &args,
            &self.dir.path().join("nats.stdout.log"),
        )
    }

    fn is_healthy(&self) -> bool {
        matches!(
            http_get(self.monitor_port, "/healthz", PROBE_TIMEOUT),
            Ok((200, _))
        )
    }

    fn wait_healthy(&self, timeout: Duration) -> Result<(), NotReady> {
        wait_ready(&self.proc_, timeout, || self.is_healthy())
    }

    fn logs(&self) -> String {
        log_tail(&[&self.log_path(), &self.dir.path().join("nats.stdout.log")])
    }

    fn error(&self, msg: &str) -> io::Error {
        io::Error::other(format!("{msg}{}", self.logs()))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A full-mesh cluster of `nats-server` processes (cluster name `fctest`),
/// each with its own client, monitoring and route port on `127.0.0.1`.
///
/// Dropping the cluster kills every server.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` (≥ 2) servers, each with a free route port
    /// (`--cluster nats://127.0.0.1:RPORT`), explicit routes to all the
    /// others (`--routes ...`) and `--cluster_name fctest`, then waits (up to
    /// ~15 s) until every server's `/routez` shows routes to all the others.
    ///
    /// On failure the whole cluster is retried on new ports, up to 3
    /// attempts; the error then details the route state and log tails.
    pub fn start(n: usize) -> io::Result<Self> {
        if n < 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NatsCluster needs at least 2 servers, got {n}"),
            ));
        }
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(n) {
                Ok(cluster) => return Ok(cluster),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => failures.push(format!("attempt {attempt}: {e}")),
            }
        }
        Err(io::Error::other(format!(
            "NATS cluster of {n} did not form:\n{}",
            failures.join("\n")
        )))
    }

    fn try_start(n: usize) -> io::Result<Self> {
        let route_ports: Vec<u16> = (0..n).map(|_| crate::free_port()).collect();
        let route_url = |p: &u16| format!("nats://127.0.0.1:{p}");
        let mut servers = Vec::with_capacity(n);
        for (i, rport) in route_ports.iter().enumerate() {
            let routes: Vec<String> = route_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| route_url(p))
                .collect();
            let args = vec![
                "--server_name".to_string(),
                format!("{CLUSTER_NAME}-{i}"),
                "--cluster".to_string(),
                route_url(rport),
                "--routes".to_string(),
                routes.join(","),
                "--cluster_name".to_string(),
                CLUSTER_NAME.to_string(),
            ];
            let server = NatsServer::unstarted(args, None, crate::free_port(), crate::free_port())?;
            server.spawn()?;
            servers.push(server);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for (i, server) in servers.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(why) = server.wait_healthy(left) {
                return Err(server.error(&format!(
                    "cluster server {i} (port {}) not healthy: {}",
                    server.port,
                    describe(&why)
                )));
            }
        }
        let cluster = NatsCluster { servers };
        cluster.wait_for_routes(CLUSTER_TIMEOUT)?;
        Ok(cluster)
    }

    /// The `i`-th server. Panics if `i >= len()`.
    pub fn server(&self, i: usize) -> &NatsServer {
        &self.servers[i]
    }

    /// The `i`-th server, mutably (to [`stop`](NatsServer::stop) /
    /// [`restart`](NatsServer::restart) it). Panics if `i >= len()`.
    pub fn server_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// Client URLs of all servers (running or not), in index order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Number of servers in the cluster (running or not).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Always `false`: a cluster has at least 2 servers.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Waits (bounded by `timeout`) until every **running** server has a
    /// route to every other running server, checked through `/routez`
    /// (`num_routes` and the peers' server IDs). Servers that are stopped are
    /// ignored. Returns `Err(TimedOut)` with the last observed state.
    pub fn wait_for_routes(&self, timeout: Duration) -> io::Result<()> {
        let mut last = String::new();
        let ok = crate::wait_until(timeout, || match self.route_state() {
            Ok(()) => true,
            Err(details) => {
                last = details;
                false
            }
        });
        if ok {
            return Ok(());
        }
        let mut msg = format!("NATS routes not complete after {timeout:?}: {last}");
        for (i, server) in self.servers.iter().enumerate() {
            msg.push_str(&format!("\n=== server {i} (port {}) ===", server.port));
            msg.push_str(&server.logs());
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, msg))
    }

    /// `Ok` if the running servers form a full mesh, else a description.
    fn route_state(&self) -> Result<(), String> {
        let running: Vec<(usize, &NatsServer)> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pid().is_some())
            .collect();
        let mut views = Vec::with_capacity(running.len());
        for (i, server) in &running {
            let routez: Routez = monitor_json(server.monitor_port, "/routez", PROBE_TIMEOUT)
                .and_then(|v| serde_json::from_value(v).map_err(io::Error::other))
                .map_err(|e| format!("server {i}: /routez: {e}"))?;
            views.push((*i, routez));
        }
        let want = running.len().saturating_sub(1) as u64;
        let mut problems = Vec::new();
        for (i, routez) in &views {
            let missing: Vec<usize> = views
                .iter()
                .filter(|(j, other)| {
                    j != i
                        && !routez
                            .routes()
                            .iter()
                            .any(|r| r.remote_id == other.server_id)
                })
                .map(|(j, _)| *j)
                .collect();
            if routez.num_routes < want || !missing.is_empty() {
                problems.push(format!(
                    "server {i}: num_routes={} (want >= {want}), no route to {missing:?}",
                    routez.num_routes
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// The part of `/routez` the cluster checks read.
#[derive(Debug, Deserialize)]
struct Routez {
    server_id: String,
    #[serde(default)]
    num_routes: u64,
    /// `null` (a Go nil slice) when the server has no route.
    #[serde(default)]
    routes: Option<Vec<Route>>,
}

impl Routez {
    fn routes(&self) -> &[Route] {
        self.routes.as_deref().unwrap_or_default()
    }
}

#[derive(Debug, Deserialize)]
struct Route {
    #[serde(default)]
    remote_id: String,
}

fn monitor_json(port: u16, path: &str, timeout: Duration) -> io::Result<serde_json::Value> {
    let (status, body) = http_get(port, path, timeout)?;
    if status != 200 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("GET {path} returned {status}: {body}"),
        ));
    }
    serde_json::from_str(&body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("GET {path}: not JSON ({e})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::Routez;

    #[test]
    fn routez_is_read_by_field_not_by_first_match() {
        // `server_id` appears inside a route first: a first-match scan would take the peer's id.
        let json = r#"{
  "routes": [ {"rid": 5, "remote_id": "NDEF", "server_id": "NDEF"} ],
  "server_id": "NABC",
  "num_routes": 1
}"#;
        let routez: Routez = serde_json::from_str(json).unwrap();
        assert_eq!(routez.server_id, "NABC");
        assert_eq!(routez.num_routes, 1);
        assert_eq!(routez.routes()[0].remote_id, "NDEF");
        let lone: Routez = serde_json::from_str(r#"{"server_id": "X", "routes": null}"#).unwrap();
        assert_eq!((lone.num_routes, lone.routes().len()), (0, 0));
    }
}
