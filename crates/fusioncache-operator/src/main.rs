//! `fusioncache-operator`: `run` the controller and its web server, or print the `crd`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use fusioncache_operator::acl::RedisAclProvisioner;
use fusioncache_operator::controller::{self, Options};
use fusioncache_operator::crd::crd_yaml;
use fusioncache_operator::leader::{LeaderElector, LeaseConfig};
use fusioncache_operator::server::{self, State};
use fusioncache_operator::settings::{parse_duration, ProcessEnvironment, Settings, CONFIG_ENV};
use fusioncache_operator::telemetry;
use tokio::sync::watch;

/// Kubernetes operator for FusionCache: provisions backplane channels, Redis databases and ACL users, and
/// the configuration apps load.
#[derive(Debug, Parser)]
#[command(name = "fusioncache-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the controller, with /healthz, /readyz and /metrics on the web port.
    Run(Box<RunArgs>),
    /// Prints the CustomResourceDefinition YAML (what manifests/crd.yaml holds).
    Crd,
}

/// Durations are `500ms`, `10s`, `5m`, `1h` (a bare number is seconds).
#[derive(Debug, Args)]
struct RunArgs {
    /// The operator settings file (Redis endpoints, default NATS URL). Without it: no managed Redis
    /// endpoints.
    #[arg(long, env = CONFIG_ENV)]
    config: Option<PathBuf>,
    /// The port of /healthz, /readyz and /metrics.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_PORT", default_value_t = 8080)]
    port: u16,
    /// The address to listen on.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Watch only these namespaces (comma separated; the chart's namespace-scoped mode). Empty: every
    /// namespace.
    #[arg(
        long,
        env = "FUSIONCACHE_OPERATOR_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    watch_namespaces: Vec<String>,
    /// How often a provisioned resource is reconciled without a change.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_RESYNC", value_parser = parse_duration, default_value = "5m")]
    resync: Duration,
    /// How often a resource rejected for a reason outside its spec is retried.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_RETRY_REJECTED", value_parser = parse_duration, default_value = "1m")]
    retry_rejected: Duration,
    /// The first backoff after a failed reconcile (doubling per failure).
    #[arg(long, env = "FUSIONCACHE_OPERATOR_MIN_BACKOFF", value_parser = parse_duration, default_value = "5s")]
    min_backoff: Duration,
    /// The longest backoff after failed reconciles.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_MAX_BACKOFF", value_parser = parse_duration, default_value = "5m")]
    max_backoff: Duration,
    /// How often the ACL users of every endpoint are checked (they are re-created after a Redis restart).
    #[arg(long, env = "FUSIONCACHE_OPERATOR_ACL_CHECK_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    acl_check_interval: Duration,
    /// How long a previous ACL password stays valid after a rotation.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_PASSWORD_GRACE", value_parser = parse_duration, default_value = "10m")]
    password_grace: Duration,
    /// Elect a leader with a Lease, so that several replicas can run (only the leader reconciles).
    #[arg(long, env = "FUSIONCACHE_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// The Lease's name.
    #[arg(
        long,
        env = "FUSIONCACHE_OPERATOR_LEASE_NAME",
        default_value = "fusioncache-operator"
    )]
    lease_name: String,
    /// The Lease's namespace (default: the pod's namespace, else the client's default namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: the pod name, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a Lease that is not renewed stays held.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_LEASE_DURATION", value_parser = parse_duration, default_value = "15s")]
    lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down (less than the lease duration).
    #[arg(long, env = "FUSIONCACHE_OPERATOR_RENEW_DEADLINE", value_parser = parse_duration, default_value = "10s")]
    renew_deadline: Duration,
    /// How often candidates try to acquire the Lease and the leader renews it.
    #[arg(long, env = "FUSIONCACHE_OPERATOR_LEASE_RETRY_PERIOD", value_parser = parse_duration, default_value = "2s")]
    lease_retry_period: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot serialize the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    telemetry::init();
    if args.leader_election && args.renew_deadline >= args.lease_duration {
        tracing::error!("--renew-deadline must be shorter than --lease-duration");
        return ExitCode::FAILURE;
    }
    let settings = match Settings::load(args.config.as_deref(), &ProcessEnvironment) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        endpoints = ?settings.redis_endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        default_endpoint = ?settings.default_endpoint().map(|e| e.name.as_str()),
        default_nats_url = ?settings.default_nats_url,
        "settings loaded"
    );
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot create a Kubernetes client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        resync: args.resync,
        retry_rejected: args.retry_rejected,
        min_backoff: args.min_backoff,
        max_backoff: args.max_backoff,
        acl_check_interval: args.acl_check_interval,
        password_grace: args.password_grace,
        namespaces: args
            .watch_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
    };
    let state = State::default();
    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        controller::termination().await;
        tracing::info!("termination signal: stopping");
        let _ = stop.send(true);
    });
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = SocketAddr::new(args.bind, args.port);
    let mut server = tokio::spawn(server::serve(addr, state.clone(), async {
        let _ = server_stopped.await;
    }));
    let acl = Arc::new(RedisAclProvisioner::default());

    let operate = async {
        if !args.leader_election {
            state.metrics.leader.set(1);
            controller::run(client, settings, acl, state.clone(), options, stopping).await;
            return ExitCode::SUCCESS;
        }
        let identity = args.identity.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "fusioncache-operator".into()),
                std::process::id()
            )
        });
        let namespace = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let mut elector = LeaderElector::new(
            client.clone(),
            LeaseConfig {
                lease_duration: args.lease_duration,
                renew_deadline: args.renew_deadline,
                retry_period: args.lease_retry_period,
                ..LeaseConfig::new(namespace, args.lease_name.clone(), identity)
            },
        );
        // Not the leader yet: watch (so /readyz says whether the apiserver and RBAC work) without
        // reconciling.
        let standby = tokio::spawn(controller::standby(
            client.clone(),
            options.clone(),
            state.clone(),
        ));
        let mut stop = stopping.clone();
        tokio::select! {
            () = elector.acquire() => {}
            _ = stop.wait_for(|s| *s) => {
                standby.abort();
                return ExitCode::SUCCESS;
            }
        }
        standby.abort();
        state.metrics.leader.set(1);
        tracing::info!(identity = %elector.identity(), "leading: reconciling");
        let controller = controller::run(client, settings, acl, state.clone(), options, stopping);
        tokio::pin!(controller);
        tokio::select! {
            () = &mut controller => {
                elector.release().await;
                ExitCode::SUCCESS
            }
            () = elector.hold() => {
                state.metrics.leader.set(0);
                tracing::error!("lost the leader Lease: exiting, to restart as a candidate");
                ExitCode::FAILURE
            }
        }
    };
    tokio::select! {
        code = operate => {
            let _ = stop_server.send(());
            match server.await {
                Ok(Ok(())) => code,
                Ok(Err(e)) => {
                    tracing::error!("web server: {e}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!("web server task: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        result = &mut server => {
            match result {
                Ok(Ok(())) => tracing::error!("web server stopped"),
                Ok(Err(e)) => tracing::error!("web server on {addr}: {e}"),
                Err(e) => tracing::error!("web server task: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}
