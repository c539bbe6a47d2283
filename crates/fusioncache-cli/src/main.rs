//! `fusioncache`: watch and drive the backplane of a FusionCache deployment.
//!
//! See `fusioncache --help`, and the README's section on the command-line tool.

mod notify;
mod probe;
mod settings;
mod tail;
mod time;
mod transport;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use fusioncache::backplane::Action;

use crate::settings::Target;

const ABOUT: &str =
    "Watch and drive the backplane of a FusionCache deployment (Redis pub/sub or NATS).";

const LONG_ABOUT: &str = "\
Watch and drive the backplane of a FusionCache deployment (Redis pub/sub or NATS).

It reads the configuration the operator injects, as the library does: the FUSIONCACHE_* environment
variables, then the Service Binding under $SERVICE_BINDING_ROOT, then the YAML file named by
FUSIONCACHE_CONFIG. The flags below override them. The Redis password is read from
FUSIONCACHE_REDIS_PASSWORD or the binding, never from a flag (flags show in `ps`).";

const AFTER_HELP: &str = "\
Examples:
  fusioncache tail                                   # in a pod the operator configured
  fusioncache --redis-url redis://cache:6379 --cache-name products tail --json
  fusioncache probe                                  # round trip, subscribers, resolved configuration
  fusioncache publish remove product:42 product:43   # from a deploy script
  fusioncache --nats-url nats://nats:4222 --channel-prefix shop.prod.products clear

Exit status: 0 on success, 1 when the transport fails (unreachable, timeout, publish refused),
2 for bad usage or configuration.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "fusioncache",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every message on the cache's channel, decoded (malformed ones flagged with the reason).
    ///
    /// One line per message: time of the change, source instance id, action, key. .NET FusionCache
    /// nodes speak the same wire format and show up like the others. Connection changes go to stderr.
    Tail {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Exit after this many messages (default: run until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Check a deployment: connect, subscribe, time probes through the channel, count subscribers.
    ///
    /// A probe is a valid `set` notification for the reserved key `__fc:probe`, which no node holds:
    /// .NET and Rust nodes receive it and do nothing. Prints the configuration it resolved, secrets
    /// redacted.
    Probe {
        /// Probes to send, one after the other.
        #[arg(long, value_name = "N", default_value_t = 3)]
        count: u32,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Tell every node that keys changed (as a node does after a write)
    ///
    /// What the nodes do, by action:
    ///   remove   evict the keys from L1
    ///   expire   mark them stale (still usable as fail-safe fallbacks)
    ///   set      refresh from L2 a copy older than the notification
    ///
    /// Only the notifications are sent: the distributed cache (L2) is not touched.
    #[command(verbatim_doc_comment)]
    Publish {
        /// What happened to the keys.
        #[arg(value_enum)]
        action: PublishAction,
        /// The cache keys.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Tell every node to clear its cache (the notification FusionCache's `Clear()` sends)
    ///
    /// A `set` on the reserved key `__fc:t:*`. Only the notification is sent: nodes that check the
    /// clear timestamp in L2 (.NET FusionCache) keep their entries until a cache writes that timestamp.
    #[command(verbatim_doc_comment)]
    Clear,
}

/// The action of `publish`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PublishAction {
    /// The keys were removed.
    Remove,
    /// The keys were marked expired.
    Expire,
    /// The keys were written.
    Set,
}

impl From<PublishAction> for Action {
    fn from(a: PublishAction) -> Action {
        match a {
            PublishAction::Remove => Action::Remove,
            PublishAction::Expire => Action::Expire,
            PublishAction::Set => Action::Set,
        }
    }
}

/// Why a command failed; each kind has its exit status.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad configuration or flags (exit 2).
    #[error("{0}")]
    Config(String),
    /// The transport failed: unreachable, timed out, refused (exit 1).
    #[error("{0}")]
    Transport(String),
}

impl From<fusioncache::config::ConfigError> for Failure {
    fn from(e: fusioncache::config::ConfigError) -> Self {
        Failure::Config(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fusioncache: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fusioncache: {e}");
            ExitCode::from(match e {
                Failure::Config(_) => 2,
                Failure::Transport(_) => 1,
            })
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let config = settings::resolve(&cli.target)?;
    let timeout: Duration = cli.target.timeout.into();
    let transport = transport::Transport::connect(&config).await?;
    let channel = config.channel()?;
    match cli.command {
        Command::Tail { json, count } => {
            tail::run(&transport, &channel, timeout, json, count).await
        }
        Command::Probe { count, json } => {
            probe::run(&transport, &config, &channel, timeout, count, json).await
        }
        Command::Publish { action, keys } => {
            let live = transport.subscribe(&channel, timeout).await?;
            notify::notify(&transport, &channel, action.into(), &keys).await?;
            drop(live);
            Ok(())
        }
        Command::Clear => {
            let live = transport.subscribe(&channel, timeout).await?;
            notify::clear(&transport, &channel).await?;
            drop(live);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
