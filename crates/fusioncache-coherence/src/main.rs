//! `fusioncache-coherence`: measures how coherent a fleet of FusionCache nodes stays under faults.
//!
//! `make coherence` runs every scenario on loopback servers started here; `--redis-url` / `--nats-url`
//! point it at yours. See the README for the table and how to read it.

mod analysis;
mod clock;
mod coordinator;
mod node;
mod record;
mod scenario;

use clap::Parser;

/// The backplane of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Redis pub/sub (same server as the L2).
    Redis,
    /// NATS (the L2 on Redis).
    Nats,
}

impl Transport {
    /// The command-line name.
    pub fn as_arg(self) -> &'static str {
        match self {
            Transport::Redis => "redis",
            Transport::Nats => "nats",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "fusioncache-coherence",
    about = "N FusionCache node processes under load and faults: stale reads, lost writes, convergence",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    node: Option<Sub>,
    #[command(flatten)]
    run: coordinator::RunArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// One node (started by the coordinator).
    #[command(hide = true)]
    Node(node::NodeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.node {
        Some(Sub::Node(args)) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(node::run(args))),
        None => coordinator::run(cli.run),
    };
    if let Err(e) = result {
        eprintln!("fusioncache-coherence: {e}");
        std::process::exit(1);
    }
}
