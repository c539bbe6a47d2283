//! Tests against real `redis-server` processes.

use std::io::ErrorKind;
use std::path::Path;

use std::time::Duration;

use fusioncache_testkit::{wait_until, RedisServer};

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn start_command_stop_restart() {
    let mut redis = RedisServer::start().expect("start redis");
    let port = redis.port();
    assert_ne!(port, 6379);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    let pid = redis.pid().expect("running");
    assert!(proc_exists(pid));

    assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG\r\n");
    assert_eq!(
        redis.command(&["SET", "greeting", "hello world"]).unwrap(),
        "+OK\r\n"
    );
    assert_eq!(
        redis.command(&["GET", "greeting"]).unwrap(),
        "$11\r\nhello world\r\n"
    );
    assert_eq!(redis.command(&["GET", "missing"]).unwrap(), "$-1\r\n");
    assert_eq!(redis.command(&["INCR", "n"]).unwrap(), ":1\r\n");
    let reply = redis.command(&["NOSUCHCOMMAND"]).unwrap();
    assert!(reply.starts_with("-ERR"), "{reply}");
    // Persistence is off and the dir is the temp dir.
    let save = redis.command(&["CONFIG", "GET", "save"]).unwrap();
    assert_eq!(save, "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
    let dir = redis.command(&["CONFIG", "GET", "dir"]).unwrap();
    let canonical = redis.dir().canonicalize().unwrap();
    assert!(dir.contains(canonical.to_str().unwrap()), "{dir}");
    assert!(redis.log_path().exists());

    redis.stop();
    assert_eq!(redis.pid(), None);
    assert!(!proc_exists(pid), "pid {pid} still exists after stop");
    let err = redis.command(&["PING"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    redis.stop(); // idempotent

    redis.restart().expect("restart");
    assert_eq!(redis.port(), port);
    let new_pid = redis.pid().expect("running again");
    assert_ne!(new_pid, pid);
    assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG\r\n");
    // No persistence: the data is gone after the restart.
    assert_eq!(redis.command(&["GET", "greeting"]).unwrap(), "$-1\r\n");

    // Restart while running works too.
    redis.restart().expect("restart while running");
    assert_eq!(redis.port(), port);
    assert!(!proc_exists(new_pid));
    assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG\r\n");
}

#[test]
fn drop_kills_the_process() {
    let redis = RedisServer::start().expect("start redis");
    let pid = redis.pid().unwrap();
    let port = redis.port();
    let dir = redis.dir().to_path_buf();
    assert!(proc_exists(pid));
    drop(redis);
    assert!(!proc_exists(pid), "pid {pid} survived drop");
    assert!(!dir.exists(), "temp dir not removed");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn drop_after_stop_and_after_external_kill() {
    let mut redis = RedisServer::start().unwrap();
    redis.stop();
    drop(redis);

    let redis = RedisServer::start().unwrap();
    let pid = redis.pid().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(fusioncache_testkit::wait_until(
        std::time::Duration::from_secs(5),
        || redis.pid().is_none()
    ));
    drop(redis); // must not panic
}

#[test]
fn extra_args_and_auth() {
    let redis = RedisServer::start_with_args(&["--requirepass", "s3cret", "--databases", "32"])
        .expect("start redis with password");
    let reply = redis.command(&["PING"]).unwrap();
    assert!(reply.starts_with("-NOAUTH"), "{reply}");
    assert_eq!(
        redis.command_as("default", "s3cret", &["PING"]).unwrap(),
        "+PONG\r\n"
    );
    assert_eq!(
        redis
            .command_as("default", "s3cret", &["ACL", "WHOAMI"])
            .unwrap(),
        "$7\r\ndefault\r\n"
    );
    assert_eq!(
        redis
            .command_as("default", "s3cret", &["CONFIG", "GET", "databases"])
            .unwrap(),
        "*2\r\n$9\r\ndatabases\r\n$2\r\n32\r\n"
    );
    let err = redis.command_as("default", "wrong", &["PING"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("WRONGPASS"), "{err}");
}

#[test]
fn acl_user_via_args() {
    let redis = RedisServer::start_with_args(&["--user", "app", "on", ">pw", "~*", "&*", "+@all"])
        .expect("start redis with ACL user");
    assert_eq!(
        redis.command_as("app", "pw", &["ACL", "WHOAMI"]).unwrap(),
        "$3\r\napp\r\n"
    );
}

#[test]
fn bad_args_fail_with_log_tail() {
    let err = RedisServer::start_with_args(&["--no-such-option", "1"]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("attempt 3"), "{msg}");
    assert!(msg.to_lowercase().contains("no-such-option"), "{msg}");
}

#[test]
fn many_servers_in_parallel_get_distinct_ports() {
    let servers: Vec<RedisServer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| RedisServer::start().expect("start redis")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), servers.len());
    for s in &servers {
        assert_eq!(s.command(&["PING"]).unwrap(), "+PONG\r\n");
    }
}

/// The state letter of a process in `/proc/PID/stat` (`T` when stopped).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn stall_stops_answering_and_resume_answers_what_was_sent() {
    let redis = RedisServer::start().expect("start redis");
    let pid = redis.pid().unwrap();
    redis.stall().unwrap();
    assert!(wait_until(Duration::from_secs(5), || proc_state(pid) == Some('T')));
    let err = redis.command(&["PING"]).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "a stalled server accepts the connection but does not answer: {err}"
    );
    redis.resume().unwrap();
    assert!(wait_until(Duration::from_secs(5), || proc_state(pid) != Some('T')));
    assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG\r\n");
    // A stalled server is still killed on drop.
    redis.stall().unwrap();
    drop(redis);
    assert!(!proc_exists(pid));
}

#[test]
fn shutdown_stops_gracefully_even_when_stalled_and_restart_brings_it_back() {
    let mut redis = RedisServer::start().expect("start redis");
    let pid = redis.pid().unwrap();
    redis.stall().unwrap();
    redis.shutdown();
    assert_eq!(redis.pid(), None);
    assert!(!proc_exists(pid));
    let log = std::fs::read_to_string(redis.log_path()).unwrap();
    assert!(log.contains("SIGTERM"), "a graceful stop: {log}");
    redis.restart().unwrap();
    assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG\r\n");
}
