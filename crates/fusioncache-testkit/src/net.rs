//! Minimal blocking network helpers: RESP for Redis, HTTP/1.0 GET for the
//! NATS monitoring port.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Opens a loopback TCP connection with connect, read and write timeouts.
pub(crate) fn connect(port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Encodes a command as a RESP array of bulk strings.
pub(crate) fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn parse_len(header: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(header)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            invalid(format!(
                "bad RESP length {:?}",
                String::from_utf8_lossy(header)
            ))
        })
}

/// Reads exactly one complete RESP (2 or 3) value and appends its raw bytes
/// to `out`.
pub(crate) fn read_resp(r: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<()> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 || !line.ends_with(b"\r\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a RESP reply",
        ));
    }
    out.extend_from_slice(&line);
    let body = &line[1..line.len() - 2];
    match line[0] {
        // Simple string, error, integer, null, double, boolean, big number.
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(()),
        // Bulk string, bulk error, verbatim string.
        b'$' | b'!' | b'=' => {
            let len = parse_len(body)?;
            if len >= 0 {
                let start = out.len();
                out.resize(start + len as usize + 2, 0);
                r.read_exact(&mut out[start..])?;
            }
            Ok(())
        }
        // Array, set, push.
        b'*' | b'~' | b'>' => {
            for _ in 0..parse_len(body)?.max(0) {
                read_resp(r, out)?;
            }
            Ok(())
        }
        // Map.
        b'%' => {
            for _ in 0..parse_len(body)?.max(0) * 2 {
                read_resp(r, out)?;
            }
            Ok(())
        }
        // Attribute map, followed by the actual value.
        b'|' => {
            for _ in 0..parse_len(body)?.max(0) * 2 + 1 {
                read_resp(r, out)?;
            }
            Ok(())
        }
        other => Err(invalid(format!(
            "unexpected RESP type byte {:?}",
            other as char
        ))),
    }
}

/// Connects, sends each command in order (pipelined) and returns the raw
/// reply of each.
pub(crate) fn resp_roundtrip(
    port: u16,
    commands: &[&[&str]],
    timeout: Duration,
) -> io::Result<Vec<String>> {
    let mut stream = connect(port, timeout)?;
    let mut request = Vec::new();
    for cmd in commands {
        request.extend_from_slice(&encode_command(cmd));
    }
    stream.write_all(&request)?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    let mut replies = Vec::with_capacity(commands.len());
    for _ in commands {
        let mut raw = Vec::new();
        read_resp(&mut reader, &mut raw)?;
        replies.push(String::from_utf8_lossy(&raw).into_owned());
    }
    Ok(replies)
}

/// Performs `GET path HTTP/1.0` against `127.0.0.1:port`; returns the status
/// code and the body.
pub(crate) fn http_get(port: u16, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = connect(port, timeout)?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid(format!("malformed HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| head.starts_with("HTTP/"))
        .ok_or_else(|| invalid(format!("malformed HTTP status line: {head:?}")))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read_one(input: &str) -> io::Result<(String, usize)> {
        let mut cur = Cursor::new(input.as_bytes().to_vec());
        let mut out = Vec::new();
        read_resp(&mut cur, &mut out)?;
        Ok((String::from_utf8(out).unwrap(), cur.position() as usize))
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode_command(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn reads_resp_values() {
        assert_eq!(read_one("+PONG\r\nrest").unwrap().0, "+PONG\r\n");
        assert_eq!(read_one("-ERR x\r\n").unwrap().0, "-ERR x\r\n");
        assert_eq!(read_one(":42\r\n").unwrap().0, ":42\r\n");
        assert_eq!(read_one("$-1\r\n").unwrap().0, "$-1\r\n");
        assert_eq!(
            read_one("$4\r\na\r\nb\r\n+X\r\n").unwrap(),
            ("$4\r\na\r\nb\r\n".into(), 10)
        );
        let arr = "*3\r\n$1\r\na\r\n*1\r\n:1\r\n$-1\r\n";
        assert_eq!(read_one(&format!("{arr}+NEXT\r\n")).unwrap().0, arr);
        let map = "%1\r\n+k\r\n+v\r\n";
        assert_eq!(read_one(map).unwrap().0, map);
        assert!(read_one("$5\r\nab").is_err());
        assert!(read_one("+PONG").is_err());
        assert!(read_one("").is_err());
        assert!(read_one("?\r\n").is_err());
    }
}
