//! The L2 entry envelope: the value's bytes behind its metadata.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | envelope version, `1` |
//! | 8 | logical expiry: i64 LE, Unix milliseconds |
//! | 8 | fail-safe expiry (how long the entry may serve as a fallback): i64 LE, Unix milliseconds |
//! | 8 | write timestamp: i64 LE, UTC ticks (the timestamp backplane messages carry) |
//! | n | the serialized value |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::L2Error;

const ENVELOPE_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 8 + 8;

/// An L2 entry decoded from its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct L2Envelope {
    pub logical_expiry_ms: i64,
    pub fail_safe_expiry_ms: i64,
    pub timestamp: i64,
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
        payload: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&logical_expiry_ms.to_le_bytes());
        out.extend_from_slice(&fail_safe_expiry_ms.to_le_bytes());
        out.extend_from_slice(&timestamp.to_le_bytes());
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
        if bytes[0] != ENVELOPE_VERSION {
            return Err(corrupt("unknown envelope version"));
        }
        let field =
            |i: usize| i64::from_le_bytes(bytes[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"));
        let (logical_expiry_ms, fail_safe_expiry_ms, timestamp) = (field(0), field(1), field(2));
        let mut payload = bytes;
        payload.drain(..HEADER_LEN);
        Ok(Self {
            logical_expiry_ms,
            fail_safe_expiry_ms,
            timestamp,
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
        let bytes = L2Envelope::encode(10, 20, 30, b"{\"a\":1}");
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
        assert!(L2Envelope::decode("k", vec![1, 2, 3]).is_err());
        assert!(L2Envelope::decode("k", vec![9; HEADER_LEN]).is_err());
        assert_eq!(env.remaining(5), Duration::from_millis(5));
        assert_eq!(env.remaining(50), Duration::ZERO);
    }
}
