//! Child-process bookkeeping shared by the Redis and NATS harnesses.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A possibly-running child process, killable by PID through `&self`.
#[derive(Debug, Default)]
pub(crate) struct Proc {
    child: Mutex<Option<Child>>,
}

impl Proc {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `program args` with stdin closed and stdout/stderr appended to
    /// `output`. Any previously tracked process is killed first.
    pub(crate) fn spawn(&self, program: &Path, args: &[String], output: &Path) -> io::Result<()> {
        self.kill();
        let out = File::options().create(true).append(true).open(output)?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot spawn {}: {e}", program.display()))
            })?;
        *self.lock() = Some(child);
        Ok(())
    }

    /// PID of the process if it is still running (an exited process is
    /// reaped and forgotten).
    pub(crate) fn pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        let exited = match guard.as_mut() {
            None => return None,
            Some(child) => !matches!(child.try_wait(), Ok(None)),
        };
        if exited {
            *guard = None;
            None
        } else {
            guard.as_ref().map(Child::id)
        }
    }

    /// If the process has exited on its own, reaps it and returns its status
    /// as text.
    pub(crate) fn exit_status(&self) -> Option<String> {
        let mut guard = self.lock();
        let status = match guard.as_mut()?.try_wait() {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => return None,
            Err(e) => format!("unknown ({e})"),
        };
        *guard = None;
        Some(status)
    }

    /// Sends `signal` to the process by PID; a no-op when it is not running.
    pub(crate) fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let guard = self.lock();
        let Some(child) = guard.as_ref() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
        // SAFETY: kill(2) takes plain integers; the PID is our own unreaped child, so it cannot have been
        // reused by another process.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Stops the process (SIGSTOP) and returns once every one of its threads is stopped: the signal is
    /// delivered asynchronously, and a thread still running could answer one more request. Waits at most
    /// 2 s. A no-op without a running process.
    pub(crate) fn stall(&self) -> io::Result<()> {
        self.signal(libc::SIGSTOP)?;
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !all_threads_stopped(pid) {
            if std::time::Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "process {pid} not stopped 2 s after SIGSTOP"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Asks the process to exit (SIGTERM, after a SIGCONT in case it is
    /// stalled), waits up to `grace` for it, then kills it. Never panics.
    pub(crate) fn terminate(&self, grace: Duration) {
        let _ = self.signal(libc::SIGCONT);
        if self.signal(libc::SIGTERM).is_ok() {
            let deadline = Instant::now() + grace;
            while self.exit_status().is_none() && self.pid().is_some() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }

    /// Kills the process by PID (SIGKILL) and waits for it. Idempotent, never
    /// panics.
    pub(crate) fn kill(&self) {
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Why a server did not become ready.
#[derive(Debug)]
pub(crate) enum NotReady {
    /// The process exited (status text), e.g. because its port was taken.
    Exited(String),
    /// It kept running but never passed the readiness check.
    TimedOut,
}

/// Polls `ready` until it returns true, the process exits, or `timeout`.
pub(crate) fn wait_ready(
    proc_: &Proc,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc_.exit_status() {
            return Err(NotReady::Exited(status));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns a server again on its same port until it passes `ready` (a bind failure while the old socket
/// lingers makes it exit: it is retried until `timeout`). On failure the process is killed and the reason
/// returned.
pub(crate) fn respawn_until_ready(
    proc_: &Proc,
    timeout: Duration,
    mut spawn: impl FnMut() -> io::Result<()>,
    mut ready: impl FnMut() -> bool,
) -> io::Result<Result<(), NotReady>> {
    let deadline = Instant::now() + timeout;
    loop {
        spawn()?;
        let left = deadline.saturating_duration_since(Instant::now());
        match wait_ready(proc_, left, &mut ready) {
            Ok(()) => return Ok(Ok(())),
            Err(NotReady::Exited(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(why) => {
                proc_.kill();
                return Ok(Err(why));
            }
        }
    }
}

/// Resolves a server binary: environment override, then the usual absolute
/// locations, then the bare name (looked up on `PATH` by `Command`).
pub(crate) fn find_binary(env_var: &str, candidates: &[&str], name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The last few KiB of each given file, labelled, for error messages.
pub(crate) fn log_tail(files: &[&Path]) -> String {
    const MAX: usize = 3000;
    let mut out = String::new();
    for path in files {
        let text = match std::fs::read(path) {
            Ok(bytes) => {
                let start = bytes.len().saturating_sub(MAX);
                String::from_utf8_lossy(&bytes[start..]).into_owned()
            }
            Err(e) => format!("<unreadable: {e}>"),
        };
        let text = text.trim_end();
        if !text.is_empty() {
            out.push_str(&format!("\n--- {} ---\n{text}", path.display()));
        }
    }
    if out.is_empty() {
        out.push_str(" (logs are empty)");
    }
    out
}

/// Creates a fresh temporary directory with a recognisable prefix.
pub(crate) fn temp_dir(prefix: &str) -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir()
}

/// Whether every thread of `pid` is in the stopped state (`T` in `/proc/{pid}/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) state …`: the command name may hold spaces and parentheses.
            stat.rfind(')')
                .and_then(|end| stat[end + 1..].split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}
