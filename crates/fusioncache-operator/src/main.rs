//! `fusioncache-operator`: `run` the controller and its web server, or print the `crd`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use fusioncache_operator::acl::RedisAclProvisioner;
use fusioncache_operator::crd::crd_yaml;
use fusioncache_operator::server::{self, State};
use fusioncache_operator::settings::{ProcessEnvironment, Settings, CONFIG_ENV};
use fusioncache_operator::{controller, telemetry};

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
    Run {
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
    },
    /// Prints the CustomResourceDefinition YAML (what manifests/crd.yaml holds).
    Crd,
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
        Command::Run { config, port, bind } => {
            telemetry::init();
            let settings = match Settings::load(config.as_deref(), &ProcessEnvironment) {
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
            let state = State::default();
            let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
            let mut server = tokio::spawn(server::serve(
                SocketAddr::new(bind, port),
                state.clone(),
                async {
                    let _ = server_stopped.await;
                },
            ));
            let controller = controller::run(
                client,
                settings,
                Arc::new(RedisAclProvisioner::default()),
                state,
            );
            tokio::select! {
                () = controller => {
                    let _ = stop_server.send(());
                    match server.await {
                        Ok(Ok(())) => ExitCode::SUCCESS,
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
                        Ok(Err(e)) => tracing::error!("web server on {bind}:{port}: {e}"),
                        Err(e) => tracing::error!("web server task: {e}"),
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}
