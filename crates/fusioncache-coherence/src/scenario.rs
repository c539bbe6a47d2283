//! The faults the checker injects, and where: its own servers (started per scenario through the testkit)
//! or the user's (only the faults that need no control of the server process).

use std::io;
use std::time::Duration;

use fusioncache_testkit::{FaultProxy, NatsCluster, NatsServer, RedisServer};

use crate::clock::{now_ns, until};
use crate::Transport;

/// A fault, injected once under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// No fault.
    None,
    /// The backplane server restarted gracefully (SIGTERM, then started again on its port).
    Restart,
    /// The backplane server killed (SIGKILL), started again 1 s later.
    Kill9,
    /// The backplane server stalled (SIGSTOP) for 3 s.
    Sigstop,
    /// Redis: every pub/sub connection killed by the server (`CLIENT KILL TYPE pubsub`).
    PubsubKill,
    /// One node's link to the backplane server black-holed for 10 s (Redis: its L2 too, same server).
    BlackHole,
    /// NATS: one server of a 3-server cluster killed for good.
    ClusterKill,
}

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: [Scenario; 7] = [
        Scenario::None,
        Scenario::Restart,
        Scenario::Kill9,
        Scenario::Sigstop,
        Scenario::PubsubKill,
        Scenario::BlackHole,
        Scenario::ClusterKill,
    ];

    /// The name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::None => "none",
            Scenario::Restart => "server restart",
            Scenario::Kill9 => "kill -9 (1 s down)",
            Scenario::Sigstop => "SIGSTOP 3 s",
            Scenario::PubsubKill => "CLIENT KILL TYPE pubsub",
            Scenario::BlackHole => "1 node black-holed 10 s",
            Scenario::ClusterKill => "cluster server killed",
        }
    }

    /// Whether the scenario applies to a transport, and to the user's own servers.
    pub fn applies(self, transport: Transport, own_servers: bool, allow_client_kill: bool) -> bool {
        match self {
            Scenario::PubsubKill => {
                transport == Transport::Redis && (!own_servers || allow_client_kill)
            }
            Scenario::ClusterKill => transport == Transport::Nats && !own_servers,
            Scenario::Restart | Scenario::Kill9 | Scenario::Sigstop => !own_servers,
            Scenario::None | Scenario::BlackHole => true,
        }
    }

    /// How long the load runs: the fault comes at `fault_at`, and the load goes on for as long again after
    /// it ends, at least 6 s.
    pub fn load(self, fault_at: Duration) -> Duration {
        let fault = match self {
            Scenario::None => Duration::ZERO,
            Scenario::Kill9 => Duration::from_secs(2),
            Scenario::Sigstop => Duration::from_secs(3),
            Scenario::BlackHole => Duration::from_secs(10),
            _ => Duration::from_secs(1),
        };
        fault_at + fault + Duration::from_secs(6)
    }
}

/// The servers of one run, and where each node connects.
pub struct Setup {
    /// Our Redis, when we run it.
    pub redis: Option<RedisServer>,
    /// Our NATS server, when we run one.
    pub nats: Option<NatsServer>,
    /// Our NATS cluster, for [`Scenario::ClusterKill`].
    pub cluster: Option<NatsCluster>,
    /// The proxy in front of node 0, for [`Scenario::BlackHole`].
    pub proxy: Option<FaultProxy>,
    /// The Redis URL the coordinator uses.
    pub redis_url: String,
    /// The Redis URL of each node.
    pub node_redis: Vec<String>,
    /// The NATS URL(s) of each node.
    pub node_nats: Vec<Option<String>>,
}

/// The user's servers, if any.
#[derive(Debug, Clone, Default)]
pub struct Servers {
    /// Redis URL.
    pub redis_url: Option<String>,
    /// NATS URL(s).
    pub nats_url: Option<String>,
}

impl Setup {
    /// Starts (or points at) the servers of `scenario` for `nodes` nodes.
    pub fn start(
        servers: &Servers,
        transport: Transport,
        scenario: Scenario,
        nodes: usize,
    ) -> io::Result<Self> {
        let redis = match &servers.redis_url {
            Some(_) => None,
            // Acknowledged writes survive a restart or a kill only if the server persisted them first.
            None => Some(RedisServer::start_with_args(&[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])?),
        };
        let redis_url = servers
            .redis_url
            .clone()
            .unwrap_or_else(|| redis.as_ref().map(RedisServer::url).unwrap_or_default());
        let (mut nats, mut cluster, mut nats_urls) = (None, None, Vec::new());
        if transport == Transport::Nats {
            if scenario == Scenario::ClusterKill {
                let c = NatsCluster::start(3)?;
                let urls = c.urls();
                // Node i lists server i % 3 first: server 0 (the one killed) has nodes on it.
                nats_urls = (0..nodes)
                    .map(|i| {
                        (0..urls.len())
                            .map(|j| urls[(i + j) % urls.len()].clone())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect();
                cluster = Some(c);
            } else {
                let url = match &servers.nats_url {
                    Some(url) => url.clone(),
                    None => {
                        let server = NatsServer::start()?;
                        let url = server.url();
                        nats = Some(server);
                        url
                    }
                };
                nats_urls = vec![url; nodes];
            }
        }
        let mut node_redis = vec![redis_url.clone(); nodes];
        let mut node_nats: Vec<Option<String>> = if nats_urls.is_empty() {
            vec![None; nodes]
        } else {
            nats_urls.into_iter().map(Some).collect()
        };
        let mut proxy = None;
        if scenario == Scenario::BlackHole {
            let target = match transport {
                Transport::Redis => redis_url.clone(),
                Transport::Nats => node_nats[0].clone().unwrap_or_default(),
            };
            let (prefix, host_port, rest) = split_url(&target).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot proxy {target}"),
                )
            })?;
            let p = FaultProxy::start(host_port)?;
            let through = format!("{prefix}127.0.0.1:{}{rest}", p.port());
            match transport {
                Transport::Redis => node_redis[0] = through,
                Transport::Nats => node_nats[0] = Some(through),
            }
            proxy = Some(p);
        }
        Ok(Self {
            redis,
            nats,
            cluster,
            proxy,
            redis_url,
            node_redis,
            node_nats,
        })
    }

    /// Injects `scenario`'s fault at `at` (monotonic ns); returns when it ended.
    pub fn inject(
        &mut self,
        transport: Transport,
        scenario: Scenario,
        at: u64,
    ) -> Result<Option<u64>, String> {
        std::thread::sleep(until(at));
        let fail = |e: io::Error| e.to_string();
        match scenario {
            Scenario::None => return Ok(None),
            Scenario::Restart => {
                let mut server = self.server(transport)?;
                server.shutdown();
                server.restart().map_err(fail)?;
            }
            Scenario::Kill9 => {
                let mut server = self.server(transport)?;
                server.kill();
                std::thread::sleep(Duration::from_secs(1));
                server.restart().map_err(fail)?;
            }
            Scenario::Sigstop => {
                let server = self.server(transport)?;
                server.stall().map_err(fail)?;
                std::thread::sleep(Duration::from_secs(3));
                server.resume().map_err(fail)?;
            }
            Scenario::PubsubKill => {
                let client =
                    redis::Client::open(self.redis_url.as_str()).map_err(|e| e.to_string())?;
                let mut conn = client.get_connection().map_err(|e| e.to_string())?;
                redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query::<i64>(&mut conn)
                    .map_err(|e| e.to_string())?;
            }
            Scenario::BlackHole => {
                let proxy = self.proxy.as_ref().ok_or("no proxy")?;
                proxy.black_hole();
                std::thread::sleep(Duration::from_secs(10));
                proxy.pass();
            }
            Scenario::ClusterKill => {
                self.cluster
                    .as_mut()
                    .ok_or("no own cluster")?
                    .server_mut(0)
                    .stop();
            }
        }
        Ok(Some(now_ns()))
    }
}

impl Setup {
    /// The backplane server we run.
    fn server(&mut self, transport: Transport) -> Result<Own<'_>, String> {
        match transport {
            Transport::Redis => self.redis.as_mut().map(Own::Redis),
            Transport::Nats => self.nats.as_mut().map(Own::Nats),
        }
        .ok_or_else(|| "this fault needs a server started here".to_string())
    }
}

/// A server process we control.
enum Own<'a> {
    Redis(&'a mut RedisServer),
    Nats(&'a mut NatsServer),
}

impl Own<'_> {
    fn shutdown(&mut self) {
        match self {
            Own::Redis(s) => s.shutdown(),
            Own::Nats(s) => s.shutdown(),
        }
    }

    fn kill(&mut self) {
        match self {
            Own::Redis(s) => s.stop(),
            Own::Nats(s) => s.stop(),
        }
    }

    fn restart(&mut self) -> io::Result<()> {
        match self {
            Own::Redis(s) => s.restart(),
            Own::Nats(s) => s.restart(),
        }
    }

    fn stall(&self) -> io::Result<()> {
        match self {
            Own::Redis(s) => s.stall(),
            Own::Nats(s) => s.stall(),
        }
    }

    fn resume(&self) -> io::Result<()> {
        match self {
            Own::Redis(s) => s.resume(),
            Own::Nats(s) => s.resume(),
        }
    }
}

/// Splits `scheme://[userinfo@]host:port[/rest]` into (`scheme://[userinfo@]`, `host:port`, `/rest`).
pub fn split_url(url: &str) -> Option<(String, String, String)> {
    let (scheme, after) = url.split_once("://")?;
    let (authority, rest) = match after.find(['/', '?']) {
        Some(i) => after.split_at(i),
        None => (after, ""),
    };
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    host_port.contains(':').then(|| {
        (
            format!("{scheme}://{userinfo}"),
            host_port.to_string(),
            rest.to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_around_host_and_port() {
        assert_eq!(
            split_url("redis://u:p@db.example:6380/2").unwrap(),
            ("redis://u:p@".into(), "db.example:6380".into(), "/2".into())
        );
        assert_eq!(
            split_url("nats://127.0.0.1:4222").unwrap(),
            ("nats://".into(), "127.0.0.1:4222".into(), String::new())
        );
        assert!(split_url("redis://hostonly").is_none());
        assert!(split_url("nonsense").is_none());
    }

    #[test]
    fn scenarios_apply_where_they_can_be_injected() {
        use Scenario::*;
        assert!(PubsubKill.applies(Transport::Redis, false, false));
        assert!(!PubsubKill.applies(Transport::Nats, false, false));
        assert!(!PubsubKill.applies(Transport::Redis, true, false));
        assert!(PubsubKill.applies(Transport::Redis, true, true));
        assert!(!ClusterKill.applies(Transport::Redis, false, false));
        assert!(!Restart.applies(Transport::Nats, true, false));
        assert!(BlackHole.applies(Transport::Nats, true, false));
        assert!(BlackHole.load(Duration::from_secs(4)) >= Duration::from_secs(20));
    }
}
