//! The real `fusioncache-operator run` binary, started against the API-server double with short intervals.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::apiserver::ApiServer;

/// The operator's namespace in the tests (where its Lease lives).
pub const OPERATOR_NAMESPACE: &str = "fusioncache-system";

/// A running operator process; killed when dropped.
pub struct Operator {
    /// Its name: the pod name, the Lease identity and the bearer token the double sees.
    pub name: String,
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Short intervals so that every scenario runs in seconds.
pub const FAST: &[(&str, &str)] = &[
    ("FUSIONCACHE_OPERATOR_RESYNC", "30s"),
    ("FUSIONCACHE_OPERATOR_RETRY_REJECTED", "1s"),
    ("FUSIONCACHE_OPERATOR_MIN_BACKOFF", "200ms"),
    ("FUSIONCACHE_OPERATOR_MAX_BACKOFF", "1s"),
    ("FUSIONCACHE_OPERATOR_ACL_CHECK_INTERVAL", "300ms"),
    ("FUSIONCACHE_OPERATOR_LEASE_DURATION", "2s"),
    ("FUSIONCACHE_OPERATOR_RENEW_DEADLINE", "1500ms"),
    ("FUSIONCACHE_OPERATOR_LEASE_RETRY_PERIOD", "200ms"),
];

impl Operator {
    /// Starts `fusioncache-operator run` named `name` with these settings (YAML) and [`FAST`] intervals,
    /// overridden by `env`.
    pub fn start(api: &ApiServer, name: &str, settings: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let settings_path = dir.path().join("settings.yaml");
        std::fs::write(&settings_path, settings).unwrap();
        let log = dir.path().join("operator.log");
        let port = fusioncache_testkit::free_port();
        // FUSIONCACHE_OPERATOR_BIN runs another build (say, an older one, to see a test fail without a fix).
        let binary = std::env::var("FUSIONCACHE_OPERATOR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fusioncache-operator").to_string());
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", api.kubeconfig(name))
            .env("RUST_LOG", "info,kube=warn,fusioncache_operator=debug")
            .env("FUSIONCACHE_OPERATOR_CONFIG", &settings_path)
            .env("FUSIONCACHE_OPERATOR_PORT", port.to_string())
            .env("FUSIONCACHE_OPERATOR_BIND", "127.0.0.1")
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", OPERATOR_NAMESPACE);
        for (k, v) in FAST.iter().chain(env) {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the operator binary starts");
        Operator {
            name: name.into(),
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    }

    /// Whether `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        self.get("/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// Waits until `/readyz` answers 200 and returns how long it took; panics (with the log) after
    /// `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.is_ready().await {
                return start.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "operator {} exited ({status}) before ready:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "operator {} not ready after {timeout:?}:\n{}",
            self.name,
            self.log()
        );
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.unwrap_or_default()
    }

    /// The value of a metric line (`name` with its labels, e.g. `fusioncache_operator_reconcile_in_flight`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().await.lines().find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
    }

    /// Whether this replica says it leads.
    pub async fn is_leader(&self) -> bool {
        self.metric("fusioncache_operator_leader").await == Some(1.0)
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns whether it exited cleanly.
    pub async fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "operator {} did not stop on SIGTERM:\n{}",
            self.name,
            self.log()
        );
    }

    /// Kills the process (SIGKILL), as a crash or a node loss would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of operator {} ----\n{}", self.name, self.log());
        }
    }
}
