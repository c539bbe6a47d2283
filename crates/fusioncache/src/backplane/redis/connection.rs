//! The pub/sub connection of the Redis backplane: a socket (TCP, TLS or Unix), `AUTH`, and RESP2 frames
//! read in place.
//!
//! A subscribed connection carries one stream of small frames of a few known shapes (`message`,
//! `subscribe`, `pong`, errors). Reading them straight from the socket's buffer, each message's channel and
//! payload a slice of that buffer (no copy, no allocation per frame), costs a fraction of what a general RESP
//! decoder does, and the receive path is most of what a notification costs the node that receives it.
//! Commands go out as RESP arrays of bulk strings. The connection speaks RESP2 whatever protocol the command
//! connection uses: it needs no `HELLO`, which an ACL user limited to [`ACL_COMMANDS`] may not send.
//!
//! [`ACL_COMMANDS`]: crate::redis::ACL_COMMANDS

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A byte stream to the server.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the connection goes and how it authenticates.
pub(crate) struct Target {
    /// The server.
    pub addr: Addr,
    /// `AUTH` with these (a user without a password sends no `AUTH`).
    pub username: Option<String>,
    /// The password of the moment (a password file is read when the target is made).
    pub password: Option<String>,
}

/// A server address.
pub(crate) enum Addr {
    Tcp {
        host: String,
        port: u16,
    },
    Tls {
        host: String,
        port: u16,
        config: Arc<rustls::ClientConfig>,
    },
    #[cfg_attr(not(unix), allow(dead_code))]
    Unix(PathBuf),
}

/// What the server sent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A message published on a subscribed channel.
    Message { channel: Bytes, payload: Bytes },
    /// A `SUBSCRIBE` confirmed for `channel`.
    Subscribed(Bytes),
    /// The answer to a `PING`: in subscribed mode (`["pong", ""]`) or not (`+PONG`).
    Pong { subscribed: bool },
    /// A status reply (`+OK` to `AUTH`).
    Status(Bytes),
    /// An error reply.
    Error(String),
    /// Anything else (an `unsubscribe` confirmation, a pattern message): nothing to do.
    Other,
}

/// The most bytes read per call; the buffer grows by this much when it runs low.
const READ_CHUNK: usize = 64 * 1024;
/// The longest bulk string accepted (Redis's own limit): anything longer is a protocol error.
const MAX_BULK: usize = 512 * 1024 * 1024;
/// The deepest nesting of arrays accepted (pub/sub frames have none).
const MAX_DEPTH: usize = 8;

/// One pub/sub connection. [`next`](Self::next) is cancel-safe: a `select!` may drop it and call it again
/// without losing a frame.
pub(crate) struct PubSubConnection {
    io: Box<dyn Io>,
    buf: BytesMut,
    out: Vec<u8>,
}

impl PubSubConnection {
    /// Connects to `target` and authenticates. Errors never carry the password.
    pub async fn open(target: &Target) -> Result<Self, String> {
        let io: Box<dyn Io> = match &target.addr {
            Addr::Tcp { host, port } => Box::new(tcp(host, *port).await?),
            Addr::Tls { host, port, config } => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("invalid TLS server name {host}: {e}"))?;
                let tcp = tcp(host, *port).await?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))?;
                Box::new(tls)
            }
            #[cfg(unix)]
            Addr::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?,
            ),
            #[cfg(not(unix))]
            Addr::Unix(path) => {
                return Err(format!(
                    "unix sockets are not supported here: {}",
                    path.display()
                ))
            }
        };
        let mut conn = Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(256),
        };
        if let Some(password) = &target.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &target.username {
                auth.push(user.as_bytes());
            }
            auth.push(password.as_bytes());
            conn.send(&auth).await?;
            match conn.next().await? {
                Frame::Status(_) => {}
                Frame::Error(e) => return Err(format!("AUTH failed: {e}")),
                other => return Err(format!("unexpected reply to AUTH: {other:?}")),
            }
        }
        Ok(conn)
    }

    /// Sends one command (a RESP array of bulk strings) and flushes it.
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        self.out.clear();
        encode(&mut self.out, args);
        self.io
            .write_all(&self.out)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        self.io
            .flush()
            .await
            .map_err(|e| format!("write failed: {e}"))
    }

    /// The next frame; an error when the connection is closed or the server sent something that is not
    /// RESP2.
    pub async fn next(&mut self) -> Result<Frame, String> {
        loop {
            if let Some((raw, len)) = parse(&self.buf)? {
                let bytes = self.buf.split_to(len).freeze();
                return Ok(raw.resolve(&bytes));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => return Err("connection closed by the server".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }
}

async fn tcp(host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    // Small frames both ways: no Nagle delay on PINGs and SUBSCRIBEs.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Appends `args` as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// An element of a top-level array, by its place in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Elem {
    Bulk(Range<usize>),
    /// Anything else (an integer, a null, a nested value): pub/sub frames need none of them.
    Other,
}

/// A frame found in the buffer, before it is cut out of it.
#[derive(Debug, PartialEq, Eq)]
enum Raw {
    Status(Range<usize>),
    Error(Range<usize>),
    /// The first elements of an array (pub/sub frames have at most four).
    Array {
        elems: [Elem; 4],
        len: usize,
    },
    Other,
}

impl Raw {
    /// The frame, its parts sliced out of `bytes` (the frame's own bytes, from offset 0).
    fn resolve(self, bytes: &Bytes) -> Frame {
        match self {
            Raw::Status(r) if bytes[r.clone()].eq_ignore_ascii_case(b"pong") => {
                Frame::Pong { subscribed: false }
            }
            Raw::Status(r) => Frame::Status(bytes.slice(r)),
            Raw::Error(r) => Frame::Error(String::from_utf8_lossy(&bytes[r]).into_owned()),
            Raw::Array { elems, len } => {
                let bulk = |i: usize| match elems.get(i) {
                    Some(Elem::Bulk(r)) if i < len => Some(r.clone()),
                    _ => None,
                };
                let Some(kind) = bulk(0) else {
                    return Frame::Other;
                };
                match (&bytes[kind], len) {
                    (b"message", 3) => match (bulk(1), bulk(2)) {
                        (Some(c), Some(p)) => Frame::Message {
                            channel: bytes.slice(c),
                            payload: bytes.slice(p),
                        },
                        _ => Frame::Other,
                    },
                    (b"subscribe", 3) => {
                        bulk(1).map_or(Frame::Other, |c| Frame::Subscribed(bytes.slice(c)))
                    }
                    (b"pong", _) => Frame::Pong { subscribed: true },
                    _ => Frame::Other,
                }
            }
            Raw::Other => Frame::Other,
        }
    }
}

/// The first frame of `buf` and its length, `None` if `buf` does not hold all of it yet, or an error if it
/// is not RESP2.
fn parse(buf: &[u8]) -> Result<Option<(Raw, usize)>, String> {
    let Some((head, mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let raw = match buf[0] {
        b'+' => Raw::Status(head),
        b'-' => Raw::Error(head),
        b':' => Raw::Other,
        b'$' => match skip_bulk(buf, head, at)? {
            Some((_, end)) => {
                at = end;
                Raw::Other
            }
            None => return Ok(None),
        },
        b'*' => {
            let n = number(&buf[head])?;
            let mut elems = [Elem::Other, Elem::Other, Elem::Other, Elem::Other];
            let len = usize::try_from(n).unwrap_or(0);
            for i in 0..len {
                let Some((elem, end)) = element(buf, at, 1)? else {
                    return Ok(None);
                };
                if let Some(slot) = elems.get_mut(i) {
                    *slot = elem;
                }
                at = end;
            }
            Raw::Array { elems, len }
        }
        other => {
            return Err(format!(
                "protocol error: unexpected frame type {:?}",
                char::from(other)
            ))
        }
    };
    Ok(Some((raw, at)))
}

/// One element of an array at `at`: `(element, end)`.
fn element(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Elem, usize)>, String> {
    let Some((head, next)) = line(buf, at)? else {
        return Ok(None);
    };
    match buf[at] {
        b'$' => Ok(skip_bulk(buf, head, next)?
            .map(|(body, end)| (body.map_or(Elem::Other, Elem::Bulk), end))),
        b'+' | b'-' | b':' => Ok(Some((Elem::Other, next))),
        b'*' if depth < MAX_DEPTH => {
            let n = number(&buf[head])?;
            let mut end = next;
            for _ in 0..n.max(0) {
                match element(buf, end, depth + 1)? {
                    Some((_, e)) => end = e,
                    None => return Ok(None),
                }
            }
            Ok(Some((Elem::Other, end)))
        }
        b'*' => Err("protocol error: arrays nested too deep".into()),
        other => Err(format!(
            "protocol error: unexpected element type {:?}",
            char::from(other)
        )),
    }
}

/// A bulk string read: its body (`None` for a null bulk string) and where the next value starts.
type BulkEnd = (Option<Range<usize>>, usize);

/// The bulk string whose header (`$n`) is at `head` and whose body starts at `at`, or `None` if `buf` does
/// not hold all of it yet.
fn skip_bulk(buf: &[u8], head: Range<usize>, at: usize) -> Result<Option<BulkEnd>, String> {
    let n = number(&buf[head])?;
    if n < 0 {
        return Ok(Some((None, at)));
    }
    let n = usize::try_from(n).map_err(|_| "protocol error: bulk length".to_string())?;
    if n > MAX_BULK {
        return Err(format!("protocol error: bulk string of {n} bytes"));
    }
    let end = at + n;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err("protocol error: bulk string not followed by CRLF".into());
    }
    Ok(Some((Some(at..end), end + 2)))
}

/// The line that starts at `at` (after its type byte): `(content, start of the next line)`.
fn line(buf: &[u8], at: usize) -> Result<Option<(Range<usize>, usize)>, String> {
    let start = at + 1;
    let Some(rest) = buf.get(start..) else {
        return Ok(None);
    };
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && rest[i - 1] == b'\r' => Ok(Some((start..start + i - 1, start + i + 1))),
        Some(_) => Err("protocol error: line not ended by CRLF".into()),
        None => Ok(None),
    }
}

/// A decimal length or count.
fn number(digits: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "protocol error: invalid number".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(wire: &[u8]) -> Option<(Frame, usize)> {
        parse(wire)
            .unwrap()
            .map(|(raw, len)| (raw.resolve(&Bytes::copy_from_slice(&wire[..len])), len))
    }

    #[test]
    fn messages_confirmations_and_pongs_are_read() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$5\r\nhe\r\no\r\n";
        assert_eq!(
            frame(msg),
            Some((
                Frame::Message {
                    channel: Bytes::from_static(b"chan"),
                    payload: Bytes::from_static(b"he\r\no"),
                },
                msg.len()
            )),
            "a payload may hold CRLF"
        );
        let sub = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nchan\r\n:1\r\n";
        assert_eq!(
            frame(sub).unwrap().0,
            Frame::Subscribed(Bytes::from_static(b"chan"))
        );
        assert_eq!(
            frame(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n").unwrap().0,
            Frame::Pong { subscribed: true }
        );
        assert_eq!(
            frame(b"+PONG\r\n").unwrap().0,
            Frame::Pong { subscribed: false }
        );
        assert_eq!(
            frame(b"+OK\r\n").unwrap().0,
            Frame::Status(Bytes::from_static(b"OK"))
        );
        assert_eq!(
            frame(b"-NOPERM no permission\r\n").unwrap().0,
            Frame::Error("NOPERM no permission".into())
        );
        let pmessage = b"*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npq\r\n$1\r\nx\r\n";
        assert_eq!(frame(pmessage), Some((Frame::Other, pmessage.len())));
        let nested = b"*2\r\n*2\r\n:1\r\n$-1\r\n$1\r\nx\r\n";
        assert_eq!(frame(nested), Some((Frame::Other, nested.len())));
    }

    #[test]
    fn a_frame_cut_anywhere_waits_for_the_rest() {
        let wire = b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$5\r\nhello\r\n+PONG\r\n";
        let first = wire.len() - 7;
        for cut in 0..first {
            assert_eq!(parse(&wire[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (raw, len) = parse(wire).unwrap().unwrap();
        assert_eq!(len, first, "one frame at a time");
        assert!(matches!(raw, Raw::Array { len: 3, .. }));
    }

    #[test]
    fn what_is_not_resp2_is_an_error_never_a_panic() {
        for bad in [
            &b"?what\r\n"[..],
            b"*1\r\n%2\r\n",
            b"*x\r\n",
            b"$3\r\nabcd\r\n",
            b"+OK\n",
            b"$99999999999\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut deep = Vec::new();
        for _ in 0..20 {
            deep.extend_from_slice(b"*1\r\n");
        }
        deep.extend_from_slice(b":1\r\n");
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SUBSCRIBE", b"a.Backplane:v2"]);
        assert_eq!(out, b"*2\r\n$9\r\nSUBSCRIBE\r\n$14\r\na.Backplane:v2\r\n");
    }

    /// Reads every whole frame of `wire` as the connection does, the bytes arriving in chunks of the
    /// given sizes (cycled).
    fn read_in_chunks(wire: &[u8], chunks: &[usize]) -> Result<Vec<Frame>, String> {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut at = 0;
        for size in chunks.iter().cycle() {
            while let Some((raw, len)) = parse(&buf)? {
                let bytes = buf.split_to(len).freeze();
                frames.push(raw.resolve(&bytes));
            }
            if at == wire.len() {
                break;
            }
            let end = (at + size.max(&1)).min(wire.len());
            buf.extend_from_slice(&wire[at..end]);
            at = end;
        }
        Ok(frames)
    }

    fn message(channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, &[b"message", channel, payload]);
        out
    }

    proptest::proptest! {
        #[test]
        fn the_reader_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            chunks in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let _ = read_in_chunks(&bytes, &chunks);
        }

        #[test]
        fn messages_read_in_any_chunks_come_out_whole_and_in_order(
            messages in proptest::collection::vec(
                (
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 1..24),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                ),
                1..20,
            ),
            chunks in proptest::collection::vec(1usize..300, 1..8),
        ) {
            let mut wire = Vec::new();
            for (channel, payload) in &messages {
                wire.extend(message(channel, payload));
                wire.extend_from_slice(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
            }
            let frames = read_in_chunks(&wire, &chunks).unwrap();
            let want: Vec<Frame> = messages
                .iter()
                .flat_map(|(channel, payload)| {
                    [
                        Frame::Message {
                            channel: Bytes::copy_from_slice(channel),
                            payload: Bytes::copy_from_slice(payload),
                        },
                        Frame::Pong { subscribed: true },
                    ]
                })
                .collect();
            proptest::prop_assert_eq!(frames, want);
        }
    }
}
