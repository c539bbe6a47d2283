//! Tests against real `nats-server` processes.

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use fusioncache_testkit::{wait_until, NatsCluster, NatsServer};

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Reads the `INFO {...}` line a NATS server sends on connect.
fn client_info(port: u16) -> std::io::Result<String> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

fn num_routes(server: &NatsServer) -> Option<u64> {
    server.monitor_json("/routez").ok()?["num_routes"].as_u64()
}

#[test]
fn start_healthz_stop_restart_same_ports() {
    let mut nats = NatsServer::start().expect("start nats");
    let (port, mport) = (nats.port(), nats.monitor_port());
    assert!(port != 4222 && mport != 8222 && port != mport);
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(nats.dir().is_dir());

    let (status, body) = nats.monitor("/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ok"), "{body}");
    let info = client_info(port).unwrap();
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(nats.log_path().exists());

    let pid = nats.pid().unwrap();
    nats.stop();
    assert_eq!(nats.pid(), None);
    assert!(!proc_exists(pid));
    let err = client_info(port).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(nats.monitor("/healthz").is_err());
    nats.stop(); // idempotent

    nats.restart().expect("restart nats");
    assert_eq!((nats.port(), nats.monitor_port()), (port, mport));
    assert_ne!(nats.pid().unwrap(), pid);
    assert_eq!(nats.monitor("/healthz").unwrap().0, 200);
    assert!(client_info(port).unwrap().starts_with("INFO {"));

    // Restart while running, too.
    nats.restart().expect("restart running nats");
    assert_eq!(nats.port(), port);
    assert!(client_info(port).unwrap().starts_with("INFO {"));
}

#[test]
fn drop_kills_the_process() {
    let nats = NatsServer::start().unwrap();
    let pid = nats.pid().unwrap();
    let dir = nats.dir().to_path_buf();
    assert!(proc_exists(pid));
    drop(nats);
    assert!(!proc_exists(pid), "pid {pid} survived drop");
    assert!(!dir.exists());
}

#[test]
fn user_pass_args() {
    let nats = NatsServer::start_with_args(&["--user", "a", "--pass", "b"]).unwrap();
    let info = client_info(nats.port()).unwrap();
    assert!(info.contains("\"auth_required\":true"), "{info}");
}

#[test]
fn token_config_file() {
    let nats = NatsServer::start_with_config("authorization {\n  token: \"s3cr3t\"\n}\n").unwrap();
    assert!(nats.dir().join("nats.conf").is_file());
    let info = client_info(nats.port()).unwrap();
    assert!(info.contains("\"auth_required\":true"), "{info}");
    let (_, varz) = nats.monitor("/varz").unwrap();
    assert!(
        varz.contains(&format!("\"port\": {}", nats.port())),
        "{varz}"
    );
}

#[test]
fn invalid_config_fails_with_logs() {
    let err = NatsServer::start_with_config("this is { not valid").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("attempt 3"), "{msg}");
    assert!(msg.contains("nats.stdout.log"), "{msg}");
}

#[test]
fn cluster_of_one_is_rejected() {
    let err = NatsCluster::start(1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn cluster_forms_survives_a_kill_and_heals() {
    let mut cluster = NatsCluster::start(3).expect("start cluster");
    assert_eq!(cluster.len(), 3);
    assert!(!cluster.is_empty());
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for (i, url) in urls.iter().enumerate() {
        assert_eq!(*url, cluster.server(i).url());
        assert_eq!(num_routes(cluster.server(i)), Some(2));
        let (_, varz) = cluster.server(i).monitor("/varz").unwrap();
        assert!(varz.contains("\"fctest\""), "{varz}");
    }

    let killed_pid = cluster.server(2).pid().unwrap();
    cluster.server_mut(2).stop();
    assert!(!proc_exists(killed_pid));
    assert_eq!(cluster.server(2).pid(), None);
    cluster
        .wait_for_routes(Duration::from_secs(10))
        .expect("remaining servers still routed");
    for i in 0..2 {
        let s = cluster.server(i);
        assert!(
            wait_until(Duration::from_secs(10), || num_routes(s) == Some(1)),
            "server {i} still sees {:?} routes",
            num_routes(s)
        );
    }

    cluster.server_mut(2).restart().expect("restart member");
    cluster
        .wait_for_routes(Duration::from_secs(15))
        .expect("cluster healed");
    for i in 0..3 {
        assert_eq!(num_routes(cluster.server(i)), Some(2));
    }

    let pids: Vec<u32> = (0..3).map(|i| cluster.server(i).pid().unwrap()).collect();
    drop(cluster);
    for pid in pids {
        assert!(!proc_exists(pid), "pid {pid} survived cluster drop");
    }
}

#[test]
fn two_node_cluster() {
    let cluster = NatsCluster::start(2).expect("start 2-node cluster");
    assert_eq!(num_routes(cluster.server(0)), Some(1));
    assert_eq!(num_routes(cluster.server(1)), Some(1));
}

#[test]
fn stall_and_resume_a_nats_server() {
    let nats = NatsServer::start().expect("start nats");
    nats.stall().unwrap();
    assert!(
        nats.monitor("/healthz").is_err(),
        "a stalled server does not answer"
    );
    nats.resume().unwrap();
    assert!(wait_until(Duration::from_secs(5), || nats
        .monitor("/healthz")
        .is_ok_and(|(s, _)| s == 200)));
    let varz = nats.monitor_json("/varz").unwrap();
    assert_eq!(varz["port"].as_u64(), Some(u64::from(nats.port())));
}
