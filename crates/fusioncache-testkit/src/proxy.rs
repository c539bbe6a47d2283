//! A loopback TCP proxy that injects network faults between a client and a server.
//!
//! A test points a node at [`FaultProxy::port`] instead of the server's port and switches the link at
//! runtime: [`pass`](FaultProxy::pass), [`black_hole`](FaultProxy::black_hole) (nothing is forwarded either
//! way and no socket is closed: a partition, a dead NAT entry, a half-open connection),
//! [`latency`](FaultProxy::latency), and [`reset`](FaultProxy::reset) / [`close`](FaultProxy::close) (RST or
//! FIN to both sides). [`strand`](FaultProxy::strand) black-holes the connections open now for good while
//! new ones pass (a failover that leaves the old flows dead).
//!
//! Bytes held by a black hole are delivered, in order, when it lifts, as TCP delivers them once a partition
//! heals; a connection accepted while black-holed reaches the server only then. The proxy runs on a thread of
//! its own, so its calls are synchronous and work from any test.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to the bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes.
    Pass,
    /// Forward nothing either way, close nothing.
    BlackHole,
    /// Forward every chunk this long after it was read (each direction).
    Latency(Duration),
}

/// How [`FaultProxy`] ends the connections it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// `SO_LINGER 0`: the client and the server see a connection reset.
    Reset,
    /// `shutdown`: the client and the server see end of stream.
    Fin,
}

/// What one connection is told by the control side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Control {
    /// Black-holed for good, whatever the proxy's mode.
    stranded: bool,
    close: Option<Close>,
}

#[derive(Default)]
struct Connections {
    open: Mutex<Vec<watch::Sender<Control>>>,
    count: AtomicUsize,
}

/// A fault-injecting TCP proxy on `127.0.0.1`, forwarding to one upstream address.
///
/// Dropping it resets every connection it holds and stops its thread.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    upstream: SocketAddr,
    mode: watch::Sender<Fault>,
    connections: Arc<ConnectionsHandle>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// `Connections` behind a `Debug` that shows only the count.
struct ConnectionsHandle(Connections);

impl std::fmt::Debug for ConnectionsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("open", &self.0.count.load(Ordering::Relaxed))
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (e.g. `("127.0.0.1", server.port())` or `"redis.example:6379"`) on a
    /// free loopback port, in [`Fault::Pass`] mode.
    pub fn start(upstream: impl ToSocketAddrs) -> io::Result<Self> {
        let upstream = upstream
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no upstream address"))?;
        let listener = bind_free()?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let (mode, mode_rx) = watch::channel(Fault::Pass);
        let connections = Arc::new(ConnectionsHandle(Connections::default()));
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = connections.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        () = accept_loop(listener, upstream, mode_rx, shared.clone()) => {}
                        _ = shutdown_rx => {}
                    }
                    for conn in shared
                        .0
                        .open
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .drain(..)
                    {
                        conn.send_modify(|c| c.close = Some(Close::Reset));
                    }
                    // Let the connection tasks act on the reset before the runtime goes away.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                });
            })?;
        Ok(Self {
            port,
            upstream,
            mode,
            connections,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The upstream address.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> Fault {
        *self.mode.borrow()
    }

    /// Sets the mode of every connection, open and future (stranded ones stay black-holed).
    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// Forwards everything again; bytes held by a black hole are delivered first.
    pub fn pass(&self) {
        self.set(Fault::Pass);
    }

    /// Stops forwarding both ways without closing anything.
    pub fn black_hole(&self) {
        self.set(Fault::BlackHole);
    }

    /// Delays every chunk by `delay` in each direction.
    pub fn latency(&self, delay: Duration) {
        self.set(Fault::Latency(delay));
    }

    /// Resets (RST) both sides of every open connection; new connections are accepted as before.
    pub fn reset(&self) {
        self.close_all(Close::Reset);
    }

    /// Closes (FIN) both sides of every open connection; new connections are accepted as before.
    pub fn close(&self) {
        self.close_all(Close::Fin);
    }

    /// Black-holes the connections open now, for good (until they are reset or closed); connections opened
    /// later follow the mode.
    pub fn strand(&self) {
        for conn in self.lock_open().iter() {
            conn.send_modify(|c| c.stranded = true);
        }
    }

    /// The number of client connections the proxy holds now.
    pub fn connections(&self) -> usize {
        self.connections.0.count.load(Ordering::Acquire)
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, Vec<watch::Sender<Control>>> {
        let mut open = self
            .connections
            .0
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.retain(|c| !c.is_closed());
        open
    }

    fn close_all(&self, how: Close) {
        for conn in self.lock_open().drain(..) {
            conn.send_modify(|c| c.close = Some(how));
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds a loopback port that is not one of the machine-wide servers'.
fn bind_free() -> io::Result<StdListener> {
    for _ in 0..100 {
        let listener = StdListener::bind(("127.0.0.1", 0))?;
        if !crate::RESERVED_PORTS.contains(&listener.local_addr()?.port()) {
            return Ok(listener);
        }
    }
    Err(io::Error::other("no free loopback port"))
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Fault>,
    connections: Arc<ConnectionsHandle>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (control, control_rx) = watch::channel(Control::default());
        connections
            .0
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(control);
        connections.0.count.fetch_add(1, Ordering::AcqRel);
        let connections = connections.clone();
        let mode = mode.clone();
        tokio::spawn(async move {
            serve(client, upstream, mode, control_rx).await;
            connections.0.count.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The view of one connection: the proxy's mode and its own control.
#[derive(Clone)]
struct Link {
    mode: watch::Receiver<Fault>,
    control: watch::Receiver<Control>,
}

impl Link {
    fn fault(&self) -> Fault {
        if self.control.borrow().stranded {
            Fault::BlackHole
        } else {
            *self.mode.borrow()
        }
    }

    fn close(&self) -> Option<Close> {
        self.control.borrow().close
    }

    /// Waits until the link is not black-holed; `false` when the connection is to be closed.
    async fn wait_open(&mut self) -> bool {
        loop {
            if self.close().is_some() {
                return false;
            }
            if self.fault() != Fault::BlackHole {
                return true;
            }
            if !self.changed().await {
                return false;
            }
        }
    }

    /// Waits for any change; `false` when the proxy is gone.
    async fn changed(&mut self) -> bool {
        tokio::select! {
            r = self.mode.changed() => r.is_ok(),
            r = self.control.changed() => r.is_ok(),
        }
    }

    /// Waits until the connection is to be closed.
    async fn closing(&mut self) -> Close {
        loop {
            if let Some(how) = self.close() {
                return how;
            }
            if !self.changed().await {
                return Close::Reset;
            }
        }
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Fault>,
    control: watch::Receiver<Control>,
) {
    let mut link = Link { mode, control };
    let _ = client.set_nodelay(true);
    // A black hole also swallows the handshake: the server sees the connection only once it lifts.
    if !link.wait_open().await {
        end(&client, link.close().unwrap_or(Close::Reset));
        return;
    }
    let server = tokio::select! {
        s = TcpStream::connect(upstream) => s,
        how = link.closing() => {
            end(&client, how);
            return;
        }
    };
    let Ok(server) = server else {
        // The server is down: the client sees what it would see without the proxy.
        end(&client, Close::Reset);
        return;
    };
    let _ = server.set_nodelay(true);
    let (client, server) = (Arc::new(client), Arc::new(server));
    let (to_server, to_server_rx) = mpsc::unbounded_channel();
    let (to_client, to_client_rx) = mpsc::unbounded_channel();
    let mut pumps = tokio::task::JoinSet::new();
    pumps.spawn(read_side(client.clone(), to_server, link.clone()));
    pumps.spawn(write_side(server.clone(), to_server_rx, link.clone()));
    pumps.spawn(read_side(server.clone(), to_client, link.clone()));
    pumps.spawn(write_side(client.clone(), to_client_rx, link.clone()));
    let ending = loop {
        tokio::select! {
            done = pumps.join_next() => match done {
                // Both directions passed their end of stream on.
                None => break None,
                Some(Ok(true)) => {}
                // An I/O error on one side (a reset): reset the other.
                Some(Ok(false)) | Some(Err(_)) => break Some(Close::Reset),
            },
            how = link.closing() => break Some(how),
        }
    };
    pumps.abort_all();
    while pumps.join_next().await.is_some() {}
    if let Some(how) = ending {
        end(&client, how);
        end(&server, how);
    }
}

/// Ends one side of a connection (the socket closes when its last handle drops).
fn end(stream: &TcpStream, how: Close) {
    match how {
        Close::Reset => {
            let _ = stream.set_zero_linger();
        }
        Close::Fin => {
            let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Reads chunks from one side and queues them, with their due time, for the other, holding them during a
/// black hole. Ends at end of stream (queuing an empty chunk: the FIN), `true`, or on an error, `false`.
async fn read_side(
    from: Arc<TcpStream>,
    to: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    mut link: Link,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !link.wait_open().await {
            return true;
        }
        if from.readable().await.is_err() {
            return false;
        }
        let read = match from.try_read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => other,
        };
        // What arrives during a black hole (bytes, the end of stream, a reset) is held until it lifts.
        if !link.wait_open().await {
            return true;
        }
        let Ok(n) = read else { return false };
        let due = match link.fault() {
            Fault::Latency(d) => Instant::now() + d,
            _ => Instant::now(),
        };
        if to.send((due, buf[..n].to_vec())).is_err() {
            return true;
        }
        if n == 0 {
            return true;
        }
    }
}

/// Writes the queued chunks to one side at their due time, holding them during a black hole; passes the
/// end of stream on as a FIN. `false` when writing failed.
async fn write_side(
    to: Arc<TcpStream>,
    mut chunks: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    mut link: Link,
) -> bool {
    while let Some((due, chunk)) = chunks.recv().await {
        tokio::time::sleep_until(due).await;
        if !link.wait_open().await {
            return true;
        }
        if chunk.is_empty() {
            let _ = socket2::SockRef::from(&*to).shutdown(std::net::Shutdown::Write);
            return true;
        }
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if to.writable().await.is_err() {
                return false;
            }
            match to.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
    }
    true
}
