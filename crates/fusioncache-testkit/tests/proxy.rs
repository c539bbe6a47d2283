//! The fault proxy against a real echo server on loopback.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fusioncache_testkit::{wait_until, Fault, FaultProxy};

/// How the echo server saw each of its connections end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Open,
    Eof,
    Reset,
}

/// An echo server counting its connections and how they ended.
struct Echo {
    port: u16,
    connections: Arc<Mutex<Vec<Ending>>>,
}

impl Echo {
    fn start() -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let seen = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let index = {
                    let mut c = seen.lock().unwrap();
                    c.push(Ending::Open);
                    c.len() - 1
                };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let ending = loop {
                        match stream.read(&mut buf) {
                            Ok(0) => break Ending::Eof,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    break Ending::Reset;
                                }
                            }
                            Err(_) => break Ending::Reset,
                        }
                    };
                    seen.lock().unwrap()[index] = ending;
                });
            }
        });
        Self { port, connections }
    }

    fn endings(&self) -> Vec<Ending> {
        self.connections.lock().unwrap().clone()
    }
}

fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(text)?;
    let mut got = vec![0u8; text.len()];
    stream.read_exact(&mut got)?;
    Ok(got)
}

/// Reads for `within`: `None` if nothing came (the connection still open), else what the read said.
fn read_within(stream: &mut TcpStream, within: Duration) -> Option<std::io::Result<usize>> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    let result = stream.read(&mut buf);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    match result {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        other => Some(other),
    }
}

#[test]
fn pass_forwards_both_ways() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(("127.0.0.1", echo.port)).unwrap();
    assert_eq!(proxy.mode(), Fault::Pass);
    let mut a = connect(&proxy);
    let mut b = connect(&proxy);
    assert_eq!(round_trip(&mut a, b"hello").unwrap(), b"hello");
    assert_eq!(round_trip(&mut b, b"world").unwrap(), b"world");
    assert!(wait_until(Duration::from_secs(5), || proxy.connections() == 2));
    let big = vec![7u8; 1 << 20];
    assert_eq!(round_trip(&mut a, &big).unwrap(), big, "1 MiB in order");
    drop(a);
    assert!(wait_until(Duration::from_secs(5), || echo.endings()[0] == Ending::Eof));
    assert!(wait_until(Duration::from_secs(5), || proxy.connections() == 1));
}

#[test]
fn a_black_hole_holds_bytes_without_closing_and_delivers_them_when_it_lifts() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(("127.0.0.1", echo.port)).unwrap();
    let mut a = connect(&proxy);
    assert_eq!(round_trip(&mut a, b"1").unwrap(), b"1");

    proxy.black_hole();
    a.write_all(b"held").unwrap();
    assert!(
        read_within(&mut a, Duration::from_millis(300)).is_none(),
        "nothing comes back and the connection stays open"
    );
    // A connection opened during the hole is accepted but does not reach the server.
    let mut late = connect(&proxy);
    late.write_all(b"late").unwrap();
    assert!(read_within(&mut late, Duration::from_millis(100)).is_none());
    assert_eq!(echo.endings(), vec![Ending::Open], "one server connection");

    proxy.pass();
    let mut got = [0u8; 4];
    a.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"held", "held bytes delivered once the hole lifts");
    late.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"late");
    assert_eq!(echo.endings().len(), 2);
}

#[test]
fn latency_delays_each_direction() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(("127.0.0.1", echo.port)).unwrap();
    let mut a = connect(&proxy);
    assert_eq!(round_trip(&mut a, b"warm").unwrap(), b"warm");
    proxy.latency(Duration::from_millis(150));
    let start = Instant::now();
    assert_eq!(round_trip(&mut a, b"slow").unwrap(), b"slow");
    // A lower bound: the proxy cannot deliver before the delay, in either direction.
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    proxy.pass();
    assert_eq!(round_trip(&mut a, b"fast").unwrap(), b"fast");
}

#[test]
fn reset_resets_both_sides_and_close_closes_them() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(("127.0.0.1", echo.port)).unwrap();
    let mut a = connect(&proxy);
    assert_eq!(round_trip(&mut a, b"x").unwrap(), b"x");
    proxy.reset();
    let err = a.read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(wait_until(Duration::from_secs(5), || echo.endings()[0]
        == Ending::Reset));

    // New connections are still accepted after a reset.
    let mut b = connect(&proxy);
    assert_eq!(round_trip(&mut b, b"y").unwrap(), b"y");
    proxy.close();
    assert_eq!(b.read(&mut [0u8; 8]).unwrap(), 0, "end of stream");
    assert!(wait_until(Duration::from_secs(5), || echo.endings()[1] == Ending::Eof));

    // Closing also works during a black hole (the test, not the network, ends the connection).
    let mut c = connect(&proxy);
    assert_eq!(round_trip(&mut c, b"z").unwrap(), b"z");
    proxy.black_hole();
    proxy.reset();
    assert_eq!(
        c.read(&mut [0u8; 8]).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
}

#[test]
fn strand_black_holes_the_open_connections_only() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(("127.0.0.1", echo.port)).unwrap();
    let mut old = connect(&proxy);
    assert_eq!(round_trip(&mut old, b"a").unwrap(), b"a");
    proxy.strand();
    old.write_all(b"b").unwrap();
    let mut new = connect(&proxy);
    assert_eq!(round_trip(&mut new, b"c").unwrap(), b"c", "new flows pass");
    assert!(
        read_within(&mut old, Duration::from_millis(200)).is_none(),
        "the stranded flow stays dead"
    );
    proxy.pass();
    assert!(
        read_within(&mut old, Duration::from_millis(200)).is_none(),
        "even once the mode is set again"
    );
}

#[test]
fn a_dead_upstream_resets_the_client() {
    let port = {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = FaultProxy::start(("127.0.0.1", port)).unwrap();
    let mut a = connect(&proxy);
    let result = read_within(&mut a, Duration::from_secs(5));
    assert!(
        matches!(&result, Some(Err(e)) if e.kind() == ErrorKind::ConnectionReset),
        "{result:?}"
    );
}

#[test]
fn dropping_the_proxy_resets_its_connections() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(("127.0.0.1", echo.port)).unwrap();
    let mut a = connect(&proxy);
    assert_eq!(round_trip(&mut a, b"x").unwrap(), b"x");
    let port = proxy.port();
    drop(proxy);
    assert_eq!(
        a.read(&mut [0u8; 8]).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer listening"
    );
}
