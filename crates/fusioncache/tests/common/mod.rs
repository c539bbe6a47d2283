//! What the library's integration tests share: bounded waits that poll for a condition.

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::time::Duration;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(5);

/// Polls `cond` every 2 ms until it holds or `limit` passes; returns whether it held.
pub async fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cond()
}

/// [`within`] [`WAIT`].
pub async fn eventually(cond: impl FnMut() -> bool) -> bool {
    within(WAIT, cond).await
}

/// A `String` value.
pub fn s(v: &str) -> String {
    v.to_string()
}
