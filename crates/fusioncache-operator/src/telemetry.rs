//! Logging: `tracing` to stderr as text, filtered by `RUST_LOG` (default `info,kube=warn`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` sets the filter (default `info,kube=warn`); calling it twice is
/// harmless (the second call does nothing).
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .try_init();
}
