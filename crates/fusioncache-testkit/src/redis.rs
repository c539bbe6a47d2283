//! A real `redis-server` child process.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::net::resp_roundtrip;
use crate::process::{
    find_binary, log_tail, respawn_until_ready, temp_dir, wait_ready, NotReady, Proc,
};

/// How long `start` / `restart` wait for the server to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket timeouts for readiness probes.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Socket timeouts for [`RedisServer::command`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Start attempts (each on a fresh port) before giving up.
const START_ATTEMPTS: usize = 3;

/// A `redis-server` process listening on `127.0.0.1:<free port>`, with its
/// own temporary `--dir`, persistence disabled and logs in that directory.
///
/// The process is killed (SIGKILL) when the value is dropped.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    extra_args: Vec<String>,
    proc_: Proc,
    // Declared last so it is removed after the process is gone.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` on `127.0.0.1:<free port>` with its own temp dir
    /// (`--dir`), `--save ""`, `--appendonly no`, `--protected-mode no` and a
    /// log file in the temp dir, then waits (up to ~10 s) until it answers
    /// `PING`.
    ///
    /// If the process exits early or never becomes ready (e.g. another
    /// process took the port first), it is retried on a new port, up to 3
    /// attempts; the error then contains the log tail.
    pub fn start() -> io::Result<Self> {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with `args` appended to the command line,
    /// e.g. `["--requirepass", "secret"]` or `["--databases", "32"]`.
    ///
    /// Readiness still works with authentication enabled: a `-NOAUTH` reply
    /// to `PING` counts as "up".
    pub fn start_with_args(args: &[&str]) -> io::Result<Self> {
        let mut server = RedisServer {
            binary: find_binary(
                "FUSIONCACHE_REDIS_SERVER",
                &["/usr/bin/redis-server", "/usr/local/bin/redis-server"],
                "redis-server",
            ),
            port: 0,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            proc_: Proc::default(),
            dir: temp_dir("fctest-redis-")?,
        };
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            server.port = crate::free_port();
            server.spawn()?;
            match wait_ready(&server.proc_, READY_TIMEOUT, || server.is_ready()) {
                Ok(()) => return Ok(server),
                Err(why) => {
                    server.proc_.kill();
                    failures.push(format!(
                        "attempt {attempt} on port {}: {}",
                        server.port,
                        describe(&why)
                    ));
                }
            }
        }
        Err(server.error(&format!(
            "redis-server did not become ready ({})",
            failures.join("; ")
        )))
    }

    /// The TCP port the server listens on (stable across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// PID of the running process; `None` while stopped (or if it died).
    pub fn pid(&self) -> Option<u32> {
        self.proc_.pid()
    }

    /// The server's temporary working directory (`--dir`, log file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
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

    /// Stops the server if running, then starts it again on the **same**
    /// port and directory with the same arguments and waits (up to ~10 s)
    /// until it answers `PING`. A bind failure (port still in use) is
    /// retried until that deadline.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let outcome = respawn_until_ready(
            &self.proc_,
            READY_TIMEOUT,
            || self.spawn(),
            || self.is_ready(),
        )?;
        outcome.map_err(|why| {
            self.error(&format!(
                "redis-server did not come back on port {}: {}",
                self.port,
                describe(&why)
            ))
        })
    }

    /// Sends one command (e.g. `&["SET", "k", "v"]`) over a fresh raw TCP
    /// connection using RESP and returns the complete raw reply, CRLFs
    /// included: `"+PONG\r\n"`, `"$1\r\nv\r\n"`, `"$-1\r\n"`, `":1\r\n"`,
    /// `"*2\r\n..."`.
    ///
    /// A Redis error reply (`"-ERR ..."`, `"-NOAUTH ..."`) is returned as
    /// `Ok`; `Err` means an I/O failure, e.g. `ConnectionRefused` while the
    /// server is stopped.
    pub fn command(&self, args: &[&str]) -> io::Result<String> {
        let mut replies = resp_roundtrip(self.port, &[args], COMMAND_TIMEOUT)?;
        Ok(replies.remove(0))
    }

    /// Like [`command`](Self::command), but first authenticates on the same
    /// connection with `AUTH user pass` (use user `"default"` with
    /// `--requirepass`). Returns `Err` with kind `PermissionDenied` if `AUTH`
    /// is rejected.
    pub fn command_as(&self, user: &str, pass: &str, args: &[&str]) -> io::Result<String> {
        let mut replies =
            resp_roundtrip(self.port, &[&["AUTH", user, pass], args], COMMAND_TIMEOUT)?;
        if replies[0].starts_with('-') {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("AUTH as {user:?} failed: {}", replies[0].trim_end()),
            ));
        }
        Ok(replies.remove(1))
    }

    fn spawn(&self) -> io::Result<()> {
        let dir = self.dir.path();
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.to_string_lossy(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            &self.log_path().to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra_args.iter().cloned());
        self.proc_
            .spawn(&self.binary, &args, &dir.join("redis.stdout.log"))
    }

    /// Up means: any reply to PING other than `-LOADING` (so `-NOAUTH`
    /// counts when a password is required).
    fn is_ready(&self) -> bool {
        match resp_roundtrip(self.port, &[&["PING"]], PROBE_TIMEOUT) {
            Ok(replies) => !replies[0].starts_with("-LOADING"),
            Err(_) => false,
        }
    }

    fn error(&self, msg: &str) -> io::Error {
        let dir = self.dir.path();
        io::Error::other(format!(
            "{msg}{}",
            log_tail(&[&self.log_path(), &dir.join("redis.stdout.log")])
        ))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn describe(why: &NotReady) -> String {
    match why {
        NotReady::Exited(status) => format!("process exited early ({status})"),
        NotReady::TimedOut => "timed out waiting for readiness".to_string(),
    }
}
