//! Sending notifications, as a node does after a change.
//!
//! For now this encodes [`BackplaneMessage`]s and sends them with [`Backplane::publish`]: notifications
//! only, no L2 step. This module is the one place to switch to the library's publish-only handle once it
//! exists (it will write L2 first when one is configured, and carry clear's timestamp entry).

use fusioncache::backplane::{now_ticks, Action, BackplaneMessage};

use crate::transport::Transport;
use crate::Failure;

/// The reserved key of FusionCache's `Clear()` (the "expire all" tag `*`).
pub const CLEAR_KEY: &str = "__fc:t:*";

/// The source instance id of what this process sends: unique, so that no node takes it for its own.
pub fn source_id() -> String {
    format!("fusioncache-cli-{}", uuid::Uuid::new_v4())
}

/// Tells every node of the channel that `keys` had `action`; stops at the first refused publish.
pub async fn notify(
    transport: &Transport,
    channel: &str,
    action: Action,
    keys: &[String],
) -> Result<(), Failure> {
    let source = source_id();
    for key in keys {
        if key.is_empty() {
            return Err(Failure::Config("a cache key cannot be empty".into()));
        }
        let payload = BackplaneMessage::new(&source, now_ticks(), action, key).encode();
        transport
            .backplane()
            .publish(channel, payload)
            .await
            .map_err(|e| {
                Failure::Transport(format!(
                    "publishing {action:?} for `{key}` on {channel} ({}) failed: {e}",
                    transport.describe()
                ))
            })?;
    }
    transport.flush().await
}

/// Tells every node of the channel to clear its cache: the notification `Clear()` sends.
pub async fn clear(transport: &Transport, channel: &str) -> Result<(), Failure> {
    notify(transport, channel, Action::Set, &[CLEAR_KEY.to_string()]).await
}
