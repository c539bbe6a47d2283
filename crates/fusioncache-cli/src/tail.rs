//! `tail`: every message on the channel, decoded.

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use fusioncache::backplane::{now_ticks, Action, BackplaneEvent, BackplaneMessage};

use crate::time::rfc3339;
use crate::transport::Transport;
use crate::Failure;

/// Bytes of a payload shown when it does not decode.
const SHOWN_BYTES: usize = 64;

/// Prints the messages of `channel` until interrupted, or until `count` were printed.
pub async fn run(
    transport: &Transport,
    channel: &str,
    timeout: Duration,
    json: bool,
    count: Option<u64>,
) -> Result<(), Failure> {
    let mut subscription = transport.subscribe(channel, timeout).await?;
    eprintln!("subscribed to {channel} on {}", transport.describe());
    let mut stdout = std::io::stdout();
    let mut printed = 0u64;
    // Transports may confirm a live subscription more than once; only a return after a loss is news.
    let mut lost = false;
    while count.is_none_or(|n| printed < n) {
        let event = tokio::select! {
            event = subscription.next() => event,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match event {
            Some(BackplaneEvent::Message(payload)) => {
                let line = render(&payload, now_ticks(), json);
                if writeln!(stdout, "{line}").is_err() {
                    return Ok(()); // the reader went away (`| head`)
                }
                printed += 1;
            }
            Some(BackplaneEvent::Disconnected { reason }) => {
                lost = true;
                eprintln!(
                    "disconnected from {channel}: {reason}; messages sent until the reconnection \
                     are missed"
                )
            }
            Some(BackplaneEvent::Connected) if lost => {
                lost = false;
                eprintln!("subscribed to {channel} again")
            }
            Some(_) => {} // still connected, or events of newer library versions
            None => {
                return Err(Failure::Transport(format!(
                    "the {} transport stopped",
                    transport.describe()
                )))
            }
        }
    }
    Ok(())
}

/// One output line for a payload received at `received` (ticks).
pub fn render(payload: &[u8], received: i64, json: bool) -> String {
    match BackplaneMessage::decode(payload) {
        Ok(m) if json => serde_json::json!({
            "received": rfc3339(received),
            "status": "ok",
            "timestamp": rfc3339(m.timestamp),
            "ticks": m.timestamp,
            "source": m.source_id,
            "action": action_name(m.action),
            "key": m.cache_key,
        })
        .to_string(),
        Ok(m) => format!(
            "{}  {}  {:<6}  {}",
            rfc3339(m.timestamp),
            printable(m.source_id),
            action_name(m.action),
            printable(m.cache_key)
        ),
        Err(e) => {
            let status = if e.is_unsupported() {
                "unsupported"
            } else {
                "malformed"
            };
            let shown = &payload[..payload.len().min(SHOWN_BYTES)];
            let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
            if json {
                serde_json::json!({
                    "received": rfc3339(received),
                    "status": status,
                    "error": e.to_string(),
                    "length": payload.len(),
                    "payload": hex,
                })
                .to_string()
            } else {
                format!(
                    "{}  {}  {e} ({} bytes: {hex}{})",
                    rfc3339(received),
                    status.to_ascii_uppercase(),
                    payload.len(),
                    if shown.len() < payload.len() {
                        "…"
                    } else {
                        ""
                    }
                )
            }
        }
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Set => "set",
        Action::Remove => "remove",
        Action::Expire => "expire",
    }
}

/// `s` with control characters escaped, so that a key from the network cannot drive the terminal.
fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusioncache::backplane::UNIX_EPOCH_TICKS;

    const RECEIVED: i64 = UNIX_EPOCH_TICKS + 10_000_000;

    #[test]
    fn messages_render_as_text_and_json() {
        let m = BackplaneMessage::new("node-1", UNIX_EPOCH_TICKS, Action::Expire, "k\x1b[2J");
        let text = render(&m.encode(), RECEIVED, false);
        assert_eq!(
            text,
            "1970-01-01T00:00:00.000000Z  node-1  expire  k\\u{1b}[2J"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&m.encode(), RECEIVED, true)).unwrap();
        assert_eq!(json["status"], "ok");
        assert_eq!(json["action"], "expire");
        assert_eq!(json["key"], "k\x1b[2J");
        assert_eq!(json["source"], "node-1");
        assert_eq!(json["ticks"], UNIX_EPOCH_TICKS);
        assert_eq!(json["received"], "1970-01-01T00:00:01.000000Z");
    }

    #[test]
    fn bad_payloads_are_flagged_with_the_reason() {
        let text = render(&[0, 5, 0], RECEIVED, false);
        assert!(
            text.starts_with("1970-01-01T00:00:01.000000Z  MALFORMED  message truncated"),
            "{text}"
        );
        assert!(text.ends_with("(3 bytes: 000500)"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&render(&[9, 1, 2], RECEIVED, true)).unwrap();
        assert_eq!(json["status"], "unsupported");
        assert_eq!(json["error"], "unsupported wire-format version 9");
        assert_eq!(json["payload"], "090102");
        let long = render(&[7u8; 100], RECEIVED, false);
        assert!(long.ends_with("…)") && long.contains("100 bytes"), "{long}");
    }
}
