//! Keeping secrets out of `Debug` output, logs and error messages.
//!
//! URLs may carry credentials (`redis://user:password@host`, `nats://token@host`, `unix:///s?pass=…`);
//! [`url`] replaces them with [`REDACTED`] and keeps what helps a reader: scheme, host, port, path.

/// What a secret is printed as.
pub(crate) const REDACTED: &str = "<redacted>";

/// Query parameters whose value is a secret (redis-rs reads `pass` / `password` on `unix://` URLs).
const SECRET_PARAMS: &[&str] = &["pass", "password", "token"];

/// `text` (one URL, or several separated by commas as NATS takes them) with every userinfo and secret
/// query value replaced by [`REDACTED`].
///
/// Errs on the side of hiding: everything between a `://` and the last `@` before the next `://` counts as
/// userinfo, so a password holding `/`, `,` or `#` is hidden whole.
pub(crate) fn url(text: &str) -> String {
    // Each piece after a `://` starts with an authority; the first piece is a scheme, or a URL without one.
    let mut out = String::with_capacity(text.len());
    for (i, piece) in text.split("://").enumerate() {
        if i > 0 {
            out.push_str("://");
        }
        push_redacted_segment(&mut out, piece);
    }
    redact_params(&out)
}

/// Appends `segment` (an authority and whatever follows, up to the next `://`), its userinfo hidden.
fn push_redacted_segment(out: &mut String, segment: &str) {
    match segment.rfind('@') {
        Some(at) => {
            out.push_str(REDACTED);
            out.push_str(&segment[at..]);
        }
        None => out.push_str(segment),
    }
}

/// `text` with the value of every secret query parameter hidden.
fn redact_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(['?', '&']) {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        let name_end = rest.find('=').unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name_end < rest.len() && SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name)) {
            let value_end = rest[name_end..]
                .find(['&', '#', ','])
                .map_or(rest.len(), |j| name_end + j);
            out.push_str(name);
            out.push('=');
            out.push_str(REDACTED);
            rest = &rest[value_end..];
        }
    }
    out.push_str(rest);
    out
}

/// The userinfo parts (`user:password`, `token`) of the URL(s) in `text`, to [`scrub`] them from messages.
#[cfg(all(feature = "config", any(feature = "redis", feature = "nats")))]
pub(crate) fn userinfo(text: &str) -> impl Iterator<Item = &str> {
    // As one URL, and as a list split on commas (as NATS does), so that both readings are covered.
    std::iter::once(text)
        .chain(text.split(','))
        .flat_map(|url| url.split("://"))
        .filter_map(|piece| piece.rfind('@').map(|at| &piece[..at]))
}

/// `message` with every occurrence of each non-empty secret replaced by [`REDACTED`]: for messages built
/// by code that does not know what is secret (a transport's error naming the URL it was given).
#[cfg(all(feature = "config", any(feature = "redis", feature = "nats")))]
pub(crate) fn scrub<'a>(message: String, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut message = message;
    for secret in secrets {
        if !secret.is_empty() && message.contains(secret) {
            message = message.replace(secret, REDACTED);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_hidden_and_the_endpoint_kept() {
        let cases = [
            ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379/2"),
            ("redis://app:s3cret@r:6379/0", "redis://<redacted>@r:6379/0"),
            ("rediss://:s3cret@r:6380", "rediss://<redacted>@r:6380"),
            ("nats://tok3n@n:4222", "nats://<redacted>@n:4222"),
            (
                "nats://u:p1@n1:4222,nats://n2:4222,nats://u:p2@n3:4222",
                "nats://<redacted>@n1:4222,nats://n2:4222,nats://<redacted>@n3:4222",
            ),
            ("u:p@n1:4222", "<redacted>@n1:4222"),
            (
                "u:p@n1:4222,nats://u:p@n2:4222",
                "<redacted>@n1:4222,nats://<redacted>@n2:4222",
            ),
            ("redis://:pa/ss,w#rd@r:6379", "redis://<redacted>@r:6379"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret&user=app",
                "redis+unix:///run/redis.sock?db=1&pass=<redacted>&user=app",
            ),
            ("unix:///s?password=s3cret", "unix:///s?password=<redacted>"),
            ("not a url", "not a url"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(url(input), expected, "{input}");
        }
    }

    #[cfg(all(feature = "config", any(feature = "redis", feature = "nats")))]
    #[test]
    fn scrub_replaces_every_occurrence() {
        let msg = "bad `redis://u:hunter2@h` (hunter2)".to_string();
        assert_eq!(
            scrub(msg, ["hunter2", ""]),
            "bad `redis://u:<redacted>@h` (<redacted>)"
        );
        let url = "nats://u:p1@n1:4222,nats://n2,tok@n3";
        assert_eq!(
            userinfo(url).collect::<Vec<_>>(),
            ["u:p1", "n2,tok", "u:p1", "tok"]
        );
        let msg = "invalid NATS URL `nats://u:p1@n1:4222`".to_string();
        assert_eq!(
            scrub(msg, userinfo(url)),
            "invalid NATS URL `nats://<redacted>@n1:4222`"
        );
    }
}
