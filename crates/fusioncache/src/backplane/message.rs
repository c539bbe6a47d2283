//! The backplane message and its binary codec: the FusionCache wire format, version 0.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, `0` |
//! | 4 + n | source instance id: i32 little-endian byte length, then UTF-8 bytes |
//! | 8 | timestamp: i64 little-endian, UTC ticks (100 ns units since 0001-01-01T00:00:00Z) |
//! | 1 | action: 0 unknown, 1 entry set, 2 entry remove, 3 entry expire |
//! | 4 + n | cache key: i32 little-endian byte length, then UTF-8 bytes |
//!
//! A .NET FusionCache node sends and reads exactly these bytes, so Rust and .NET nodes can share a channel.
//! Decoding never panics: every malformed input is a [`DecodeError`].
//!
//! ```
//! use fusioncache::backplane::{Action, BackplaneMessage};
//!
//! let msg = BackplaneMessage::new("node-1", 638_000_000_000_000_000, Action::Set, "product:42");
//! let bytes = msg.encode();
//! assert_eq!(BackplaneMessage::decode(&bytes).unwrap(), msg);
//! assert!(BackplaneMessage::decode(&bytes[..5]).is_err());
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

/// The only wire-format version this code writes and reads.
pub const WIRE_FORMAT_VERSION: u8 = 0;

/// Ticks (100 ns) between 0001-01-01T00:00:00Z and the Unix epoch.
pub const UNIX_EPOCH_TICKS: i64 = 621_355_968_000_000_000;

/// The current UTC time as .NET ticks.
pub fn now_ticks() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH_TICKS + (d.as_nanos() / 100) as i64,
        Err(e) => UNIX_EPOCH_TICKS - (e.duration().as_nanos() / 100) as i64,
    }
}

/// What happened to the entry a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Action {
    /// The entry was set (written) on the sending node.
    Set = 1,
    /// The entry was removed.
    Remove = 2,
    /// The entry was marked expired (still usable as a fail-safe fallback).
    Expire = 3,
}

impl Action {
    /// The action for a wire byte, `None` for `0` (unknown) and for bytes this code does not know.
    pub fn from_byte(b: u8) -> Option<Action> {
        match b {
            1 => Some(Action::Set),
            2 => Some(Action::Remove),
            3 => Some(Action::Expire),
            _ => None,
        }
    }
}

/// Why a payload is not a message this node applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload ends before the field does.
    #[error(
        "message truncated: {field} needs {needed} bytes at offset {offset}, payload has {len}"
    )]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Where the field starts.
        offset: usize,
        /// The payload length.
        len: usize,
    },
    /// A length prefix below zero.
    #[error("message has a negative length ({length}) for {field}")]
    NegativeLength {
        /// The field.
        field: &'static str,
        /// The length read.
        length: i32,
    },
    /// A string field that is not UTF-8.
    #[error("message field {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A field that is empty or out of range (empty source id or key, timestamp not positive).
    #[error("message field {field} is invalid: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// Bytes after the last field.
    #[error("message has {0} trailing bytes")]
    TrailingBytes(usize),
    /// A wire-format version this code does not know (a newer sender): ignored, not malformed.
    #[error("unsupported wire-format version {0}")]
    UnsupportedVersion(u8),
    /// An action this code does not know (0, or a newer sender's): ignored, not malformed.
    #[error("unknown action {0}")]
    UnknownAction(u8),
}

impl DecodeError {
    /// `true` for messages from newer (or older) senders that are well-formed but not understood; they
    /// are ignored quietly, while the other errors are malformed input, dropped with a warning.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            DecodeError::UnsupportedVersion(_) | DecodeError::UnknownAction(_)
        )
    }
}

/// A backplane message, borrowing its strings from the payload it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackplaneMessage<'a> {
    /// The instance id of the node that sent it.
    pub source_id: &'a str,
    /// When the change happened, in UTC ticks.
    pub timestamp: i64,
    /// What happened.
    pub action: Action,
    /// The cache key.
    pub cache_key: &'a str,
}

impl<'a> BackplaneMessage<'a> {
    /// A message about `cache_key`.
    pub fn new(source_id: &'a str, timestamp: i64, action: Action, cache_key: &'a str) -> Self {
        Self {
            source_id,
            timestamp,
            action,
            cache_key,
        }
    }

    /// The encoded length of this message.
    pub fn encoded_len(&self) -> usize {
        1 + 4 + self.source_id.len() + 8 + 1 + 4 + self.cache_key.len()
    }

    /// Encodes the message in wire format version 0.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.freeze()
    }

    /// Appends the encoded message to `buf`.
    pub fn encode_into(&self, buf: &mut impl BufMut) {
        buf.put_u8(WIRE_FORMAT_VERSION);
        put_string(buf, self.source_id);
        buf.put_i64_le(self.timestamp);
        buf.put_u8(self.action as u8);
        put_string(buf, self.cache_key);
    }

    /// Decodes and validates a payload. Never panics.
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader {
            buf: payload,
            pos: 0,
        };
        let version = reader.take(1, "version")?[0];
        if version != WIRE_FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let source_id = reader.string("source id")?;
        let timestamp = i64::from_le_bytes(
            reader
                .take(8, "timestamp")?
                .try_into()
                .expect("take returns exactly 8 bytes"),
        );
        let action_byte = reader.take(1, "action")?[0];
        let cache_key = reader.string("cache key")?;
        if reader.pos != payload.len() {
            return Err(DecodeError::TrailingBytes(payload.len() - reader.pos));
        }
        if source_id.is_empty() {
            return Err(DecodeError::InvalidField {
                field: "source id",
                reason: "empty",
            });
        }
        if cache_key.is_empty() {
            return Err(DecodeError::InvalidField {
                field: "cache key",
                reason: "empty",
            });
        }
        if timestamp <= 0 {
            return Err(DecodeError::InvalidField {
                field: "timestamp",
                reason: "not positive",
            });
        }
        let action =
            Action::from_byte(action_byte).ok_or(DecodeError::UnknownAction(action_byte))?;
        Ok(Self {
            source_id,
            timestamp,
            action,
            cache_key,
        })
    }
}

fn put_string(buf: &mut impl BufMut, s: &str) {
    let len = i32::try_from(s.len()).expect("strings on the wire are shorter than 2 GiB");
    buf.put_i32_le(len);
    buf.put_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        match end {
            Some(end) => {
                let out = &self.buf[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(DecodeError::Truncated {
                field,
                needed: n,
                offset: self.pos,
                len: self.buf.len(),
            }),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let len = i32::from_le_bytes(
            self.take(4, field)?
                .try_into()
                .expect("take returns exactly 4 bytes"),
        );
        let len =
            usize::try_from(len).map_err(|_| DecodeError::NegativeLength { field, length: len })?;
        let bytes = self.take(len, field)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The bytes of DESIGN §3, written out field by field for a known message.
    fn reference_bytes() -> Vec<u8> {
        let mut v = vec![0u8]; // version
        v.extend_from_slice(&[3, 0, 0, 0]); // source id length 3
        v.extend_from_slice(b"abc");
        v.extend_from_slice(&[0x00, 0x80, 0x16, 0x5F, 0xAA, 0x61, 0xDD, 0x08]); // ticks, little-endian
        v.push(2); // remove
        v.extend_from_slice(&[4, 0, 0, 0]);
        v.extend_from_slice(b"k:42");
        v
    }

    #[test]
    fn encodes_byte_for_byte_as_the_wire_format_table() {
        let ticks = i64::from_le_bytes([0x00, 0x80, 0x16, 0x5F, 0xAA, 0x61, 0xDD, 0x08]);
        let msg = BackplaneMessage::new("abc", ticks, Action::Remove, "k:42");
        assert_eq!(msg.encode().as_ref(), reference_bytes().as_slice());
        assert_eq!(msg.encoded_len(), reference_bytes().len());
    }

    #[test]
    fn decodes_the_reference_bytes() {
        let bytes = reference_bytes();
        let msg = BackplaneMessage::decode(&bytes).unwrap();
        assert_eq!(msg.source_id, "abc");
        assert_eq!(msg.action, Action::Remove);
        assert_eq!(msg.cache_key, "k:42");
        assert_eq!(msg.timestamp, 0x08DD_61AA_5F16_8000);
    }

    #[test]
    fn every_action_round_trips_with_unicode() {
        for action in [Action::Set, Action::Remove, Action::Expire] {
            let msg = BackplaneMessage::new("nodé-🦀", now_ticks(), action, "clé/ü/✓");
            assert_eq!(BackplaneMessage::decode(&msg.encode()).unwrap(), msg);
        }
    }

    #[test]
    fn unknown_version_and_action_are_unsupported_not_malformed() {
        let mut v = reference_bytes();
        v[0] = 1;
        let err = BackplaneMessage::decode(&v).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion(1));
        assert!(err.is_unsupported());
        for action in [0u8, 4, 200] {
            let mut v = reference_bytes();
            v[1 + 4 + 3 + 8] = action;
            let err = BackplaneMessage::decode(&v).unwrap_err();
            assert_eq!(err, DecodeError::UnknownAction(action));
            assert!(err.is_unsupported());
        }
    }

    #[test]
    fn invalid_fields_are_rejected() {
        let empty_key = BackplaneMessage::new("a", 1, Action::Set, "").encode();
        assert!(matches!(
            BackplaneMessage::decode(&empty_key),
            Err(DecodeError::InvalidField {
                field: "cache key",
                ..
            })
        ));
        let empty_src = BackplaneMessage::new("", 1, Action::Set, "k").encode();
        assert!(matches!(
            BackplaneMessage::decode(&empty_src),
            Err(DecodeError::InvalidField {
                field: "source id",
                ..
            })
        ));
        let zero_ts = BackplaneMessage::new("a", 0, Action::Set, "k").encode();
        assert!(matches!(
            BackplaneMessage::decode(&zero_ts),
            Err(DecodeError::InvalidField {
                field: "timestamp",
                ..
            })
        ));
        let mut negative = reference_bytes();
        negative[1..5].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(matches!(
            BackplaneMessage::decode(&negative),
            Err(DecodeError::NegativeLength { .. })
        ));
        let mut bad_utf8 = reference_bytes();
        bad_utf8[5] = 0xFF;
        assert_eq!(
            BackplaneMessage::decode(&bad_utf8),
            Err(DecodeError::InvalidUtf8 { field: "source id" })
        );
        let mut trailing = reference_bytes();
        trailing.push(0);
        assert_eq!(
            BackplaneMessage::decode(&trailing),
            Err(DecodeError::TrailingBytes(1))
        );
        let mut huge = reference_bytes();
        huge[1..5].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(matches!(
            BackplaneMessage::decode(&huge),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn every_prefix_of_a_valid_message_is_truncated() {
        let bytes = reference_bytes();
        for n in 0..bytes.len() {
            assert!(
                matches!(
                    BackplaneMessage::decode(&bytes[..n]),
                    Err(DecodeError::Truncated { .. })
                ),
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn ticks_match_the_dotnet_epoch() {
        let now = now_ticks();
        // 2020-01-01T00:00:00Z is 637134336000000000 ticks.
        assert!(now > 637_134_336_000_000_000);
        assert_eq!(UNIX_EPOCH_TICKS, 621_355_968_000_000_000);
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = BackplaneMessage::decode(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_mutated_messages(
            idx in 0usize..64, byte in any::<u8>(), cut in 0usize..64,
        ) {
            let mut bytes = reference_bytes();
            let i = idx % bytes.len();
            bytes[i] = byte;
            bytes.truncate(bytes.len().saturating_sub(cut % 4));
            let _ = BackplaneMessage::decode(&bytes);
        }

        #[test]
        fn valid_messages_round_trip(
            src in "[a-zA-Z0-9-]{1,40}", key in "\\PC{1,64}", ts in 1i64..i64::MAX, action in 1u8..=3,
        ) {
            let msg = BackplaneMessage::new(&src, ts, Action::from_byte(action).unwrap(), &key);
            let bytes = msg.encode();
            prop_assert_eq!(BackplaneMessage::decode(&bytes).unwrap(), msg);
        }
    }
}
