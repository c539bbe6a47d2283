//! The L2 entry envelope: the value's bytes behind its metadata.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | envelope version: `1` without tags, `2` with tags |
//! | 8 | logical expiry: i64 LE, Unix milliseconds |
//! | 8 | fail-safe expiry (how long the entry may serve as a fallback): i64 LE, Unix milliseconds |
//! | 8 | write timestamp: i64 LE, UTC ticks (the timestamp backplane messages carry) |
//! | 2 + … | version 2 only: tag count (u16 LE), then per tag its byte length (u16 LE) and UTF-8 bytes |
//! | n | the serialized value |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::L2Error;

const UNTAGGED: u8 = 1;
const TAGGED: u8 = 2;
const HEADER_LEN: usize = 1 + 8 + 8 + 8;

/// An L2 entry decoded from its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct L2Envelope {
    pub logical_expiry_ms: i64,
    pub fail_safe_expiry_ms: i64,
    pub timestamp: i64,
    pub tags: Vec<String>,
    pub payload: Vec<u8>,
}

pub(crate) fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl L2Envelope {
    pub fn encode(
        logical_expiry_ms: i64,
        fail_safe_expiry_ms: i64,
        timestamp: i64,
        tags: &[impl AsRef<str>],
        payload: &[u8],
    ) -> Vec<u8> {
        let tags_len: usize = tags.iter().map(|t| 2 + t.as_ref().len()).sum();
        let mut out = Vec::with_capacity(HEADER_LEN + 2 + tags_len + payload.len());
        out.push(if tags.is_empty() { UNTAGGED } else { TAGGED });
        out.extend_from_slice(&logical_expiry_ms.to_le_bytes());
        out.extend_from_slice(&fail_safe_expiry_ms.to_le_bytes());
        out.extend_from_slice(&timestamp.to_le_bytes());
        if !tags.is_empty() {
            // Tag names are short; the builder rejects longer ones (u16 lengths).
            out.extend_from_slice(&(tags.len().min(u16::MAX as usize) as u16).to_le_bytes());
            for tag in tags.iter().take(u16::MAX as usize) {
                let bytes = &tag.as_ref().as_bytes()[..tag.as_ref().len().min(u16::MAX as usize)];
                out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
        out.extend_from_slice(payload);
        out
    }

    pub fn decode(key: &str, bytes: Vec<u8>) -> Result<Self, L2Error> {
        let corrupt = |reason: &str| L2Error::Corrupt {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        if bytes.len() < HEADER_LEN {
            return Err(corrupt("shorter than the envelope header"));
        }
        let version = bytes[0];
        if version != UNTAGGED && version != TAGGED {
            return Err(corrupt("unknown envelope version"));
        }
        let field =
            |i: usize| i64::from_le_bytes(bytes[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"));
        let (logical_expiry_ms, fail_safe_expiry_ms, timestamp) = (field(0), field(1), field(2));
        let mut at = HEADER_LEN;
        let mut tags = Vec::new();
        if version == TAGGED {
            let u16_at = |at: usize| -> Result<usize, L2Error> {
                bytes
                    .get(at..at + 2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
                    .ok_or_else(|| corrupt("truncated tags"))
            };
            let count = u16_at(at)?;
            at += 2;
            for _ in 0..count {
                let len = u16_at(at)?;
                at += 2;
                let tag = bytes
                    .get(at..at + len)
                    .ok_or_else(|| corrupt("truncated tags"))?;
                let tag = std::str::from_utf8(tag).map_err(|_| corrupt("a tag is not UTF-8"))?;
                tags.push(tag.to_string());
                at += len;
            }
        }
        let mut payload = bytes;
        payload.drain(..at);
        Ok(Self {
            logical_expiry_ms,
            fail_safe_expiry_ms,
            timestamp,
            tags,
            payload,
        })
    }

    /// Time left until the logical expiry (zero when past).
    pub fn remaining(&self, now_ms: i64) -> Duration {
        Duration::from_millis(self.logical_expiry_ms.saturating_sub(now_ms).max(0) as u64)
    }

    /// Time left until the fail-safe expiry (zero when past).
    pub fn fail_safe_remaining(&self, now_ms: i64) -> Duration {
        Duration::from_millis(self.fail_safe_expiry_ms.saturating_sub(now_ms).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_rejects_garbage() {
        let bytes = L2Envelope::encode(10, 20, 30, &[] as &[&str], b"{\"a\":1}");
        assert_eq!(bytes[0], UNTAGGED);
        let env = L2Envelope::decode("k", bytes).unwrap();
        assert_eq!(
            (
                env.logical_expiry_ms,
                env.fail_safe_expiry_ms,
                env.timestamp
            ),
            (10, 20, 30)
        );
        assert_eq!(env.payload, b"{\"a\":1}");
        assert!(env.tags.is_empty());
        assert!(L2Envelope::decode("k", vec![1, 2, 3]).is_err());
        assert!(L2Envelope::decode("k", vec![9; HEADER_LEN]).is_err());
        assert_eq!(env.remaining(5), Duration::from_millis(5));
        assert_eq!(env.remaining(50), Duration::ZERO);
    }

    #[test]
    fn tags_round_trip_and_truncated_tags_are_corrupt() {
        let bytes = L2Envelope::encode(1, 2, 3, &["x", "größe"], b"v");
        assert_eq!(bytes[0], TAGGED);
        let env = L2Envelope::decode("k", bytes.clone()).unwrap();
        assert_eq!(env.tags, ["x", "größe"]);
        assert_eq!(env.payload, b"v");
        for cut in HEADER_LEN..bytes.len() - 1 {
            let decoded = L2Envelope::decode("k", bytes[..cut].to_vec());
            assert!(
                decoded.is_err() || decoded.unwrap().payload.is_empty(),
                "cut at {cut}"
            );
        }
    }
}
