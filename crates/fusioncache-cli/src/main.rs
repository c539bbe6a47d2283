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

use clap::builder::NonEmptyStringValueParser;
use clap::{Parser, Subcommand, ValueEnum};

use crate::notify::Change;
use crate::settings::Target;

const ABOUT: &str =
    "Watch and drive the backplane of a FusionCache deployment (Redis pub/sub or NATS).";

const LONG_ABOUT: &str = "\
Watch and drive the backplane of a FusionCache deployment (Redis pub/sub or NATS).

It reads the configuration the operator injects, as the library does: the FUSIONCACHE_* environment
variables, then the Service Binding under $SERVICE_BINDING_ROOT, then the YAML file named by
FUSIONCACHE_CONFIG. The flags below override them. The Redis password is read from
FUSIONCACHE_REDIS_PASSWORD or the binding, never from a flag (flags show in `ps`).

publish, clear and remove-by-tag act as a node of the cache would: when the configuration has a
distributed cache (L2) — FUSIONCACHE_DISTRIBUTED_CACHE=redis, or any Redis URL unless it says
none — they write it first (delete the entry, or store the clear or tag timestamp under the key
prefix), then send the notification. --no-l2 sends the notifications only.";

const AFTER_HELP: &str = "\
Examples:
  fusioncache tail                                   # in a pod the operator configured
  fusioncache --redis-url redis://cache:6379 --cache-name products tail --json
  fusioncache probe                                  # round trip, subscribers, resolved configuration
  fusioncache publish remove product:42 product:43   # L2 entries deleted, then nodes evict
  fusioncache publish --no-l2 expire product:42      # the notification only
  fusioncache remove-by-tag category:7               # FusionCache's RemoveByTag
  fusioncache clear                                  # expire all (fail-safe values stay usable)
  fusioncache --nats-url nats://nats:4222 --channel-prefix shop.prod.products clear --remove

Exit status: 0 on success, 1 when the L2 or the backplane fails (unreachable, timeout, refused),
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
    /// Tell every node that keys changed, as a node of the cache does after a change
    ///
    /// With a distributed cache (L2) configured, each key's L2 step comes first, then the
    /// notification:
    ///   remove   delete the L2 entry; the nodes evict the key
    ///   expire   delete the L2 entry; the nodes mark their copy stale (still usable as a
    ///            fail-safe fallback)
    ///   set      no L2 step (whoever wrote the value wrote L2); nodes holding an older copy
    ///            reload it from L2
    ///
    /// A Redis URL configures the L2 (entries at KEY_PREFIX{key} in the Redis database) unless
    /// FUSIONCACHE_DISTRIBUTED_CACHE=none; --no-l2 sends the notifications only. The keys go one
    /// after the other; the first failure stops the command with exit status 1, and a key whose L2
    /// step failed was not announced.
    #[command(verbatim_doc_comment)]
    Publish {
        /// What happened to the keys.
        #[arg(value_enum)]
        action: PublishAction,
        /// The cache keys.
        #[arg(required = true, value_name = "KEY", value_parser = NonEmptyStringValueParser::new())]
        keys: Vec<String>,
        #[command(flatten)]
        steps: notify::Steps,
    },
    /// Clear the cache on every node, as FusionCache's `Clear()` does
    ///
    /// Default: expire all. Every entry written before now counts as expired: plain reads miss, a
    /// fail-safe read still gets the old value. --remove: remove all, nothing is served even with
    /// fail-safe (`Clear(allowFailSafe: false)`).
    ///
    /// A clear is one timestamp, not a scan: with an L2 configured it is written there first, as the
    /// entry __fc:t:* (expire all) or __fc:t:! (remove all) under the key prefix, so that nodes
    /// started later honour it too; then a `set` notification on that key tells the running nodes.
    /// No key is deleted: other data in the same database is untouched, and entries written after the
    /// clear survive. With --no-l2 only the running nodes hear of it.
    #[command(verbatim_doc_comment)]
    Clear {
        /// Remove all, rather than expire all (no fail-safe fallback survives).
        #[arg(long)]
        remove: bool,
        #[command(flatten)]
        steps: notify::Steps,
    },
    /// Remove the entries carrying any of the tags, on every node (FusionCache's `RemoveByTag`)
    ///
    /// Like clear, one timestamp per tag: written to L2 first when one is configured (the entry
    /// __fc:t:TAG under the key prefix), then announced as a `set` notification on that key. Entries
    /// with the tag written before it count as gone (expired, or removed per the cache's
    /// remove-by-tag behaviour) on the running nodes and on nodes started later; entries written
    /// afterwards survive, untagged ones are untouched.
    #[command(verbatim_doc_comment)]
    RemoveByTag {
        /// The tags.
        #[arg(required = true, value_name = "TAG", value_parser = NonEmptyStringValueParser::new())]
        tags: Vec<String>,
        #[command(flatten)]
        steps: notify::Steps,
    },
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

impl PublishAction {
    fn change(self, key: String) -> Change {
        match self {
            PublishAction::Remove => Change::Remove(key),
            PublishAction::Expire => Change::Expire(key),
            PublishAction::Set => Change::Set(key),
        }
    }
}

/// Why a command failed; each kind has its exit status.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad configuration or flags (exit 2).
    #[error("{0}")]
    Config(String),
    /// The L2 or the backplane failed: unreachable, timed out, refused (exit 1).
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
        Command::Publish {
            action,
            keys,
            steps,
        } => {
            let changes: Vec<Change> = keys.into_iter().map(|k| action.change(k)).collect();
            notify::send(&transport, &config, &steps, timeout, &changes).await
        }
        Command::Clear { remove, steps } => {
            let clear = Change::Clear {
                allow_fail_safe: !remove,
            };
            notify::send(&transport, &config, &steps, timeout, &[clear]).await
        }
        Command::RemoveByTag { tags, steps } => {
            let changes: Vec<Change> = tags.into_iter().map(Change::RemoveByTag).collect();
            notify::send(&transport, &config, &steps, timeout, &changes).await
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
