//! `probe`: is the channel working, how fast, and who listens.

use std::time::{Duration, Instant};

use fusioncache::backplane::{now_ticks, Action, BackplaneEvent, BackplaneMessage};
use fusioncache::config::FusionCacheConfig;

use crate::transport::Transport;
use crate::Failure;

/// The reserved key of probes: a valid `set` for a key that no node holds, which every node ignores.
pub const PROBE_KEY: &str = fusioncache::backplane::PROBE_KEY;

/// The source instance id of the probes: unique, so that no node takes them for its own.
fn source_id() -> String {
    format!("fusioncache-cli-{}", uuid::Uuid::new_v4())
}

/// Subscribes, sends `count` probes one after the other and times each one's return, then reports.
pub async fn run(
    transport: &Transport,
    config: &FusionCacheConfig,
    channel: &str,
    timeout: Duration,
    count: u32,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let mut subscription = transport.subscribe(channel, timeout).await?;
    let subscribed = started.elapsed();
    let source = source_id();
    let mut round_trips = Vec::new();
    let mut last_ticks = 0;
    for n in 1..=count.max(1) {
        // Distinct timestamps tell the probes apart.
        let ticks = now_ticks().max(last_ticks + 1);
        last_ticks = ticks;
        let payload = BackplaneMessage::new(&source, ticks, Action::Set, PROBE_KEY).encode();
        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        transport
            .backplane()
            .publish(channel, payload)
            .await
            .map_err(|e| Failure::Transport(format!("probe {n}: publish failed: {e}")))?;
        transport.flush().await?;
        loop {
            match tokio::time::timeout_at(deadline, subscription.next()).await {
                Ok(Some(BackplaneEvent::Message(bytes))) => {
                    let ours = BackplaneMessage::decode(&bytes)
                        .is_ok_and(|m| m.source_id == source && m.timestamp == ticks);
                    if ours {
                        round_trips.push(sent.elapsed());
                        break;
                    }
                }
                Ok(Some(BackplaneEvent::Disconnected { reason })) => {
                    return Err(Failure::Transport(format!(
                        "probe {n}: the subscription dropped: {reason}"
                    )))
                }
                Ok(Some(_)) => {} // connected again, or events of newer library versions
                Ok(None) => {
                    return Err(Failure::Transport(format!(
                        "probe {n}: the transport stopped"
                    )))
                }
                Err(_) => {
                    return Err(Failure::Transport(format!(
                    "probe {n} did not come back within {timeout:?}: the server took it but did \
                         not deliver it to this subscription"
                )))
                }
            }
        }
    }
    let subscribers = transport.subscribers(channel).await;
    let report = Report {
        config: config.redacted(),
        channel,
        transport: transport.describe(),
        subscribed,
        round_trips,
        subscribers,
    };
    println!("{}", if json { report.json() } else { report.text() });
    Ok(())
}

struct Report<'a> {
    config: FusionCacheConfig,
    channel: &'a str,
    transport: String,
    subscribed: Duration,
    round_trips: Vec<Duration>,
    subscribers: Result<Option<u64>, String>,
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl Report<'_> {
    fn sorted(&self) -> Vec<Duration> {
        let mut sorted = self.round_trips.clone();
        sorted.sort();
        sorted
    }

    fn subscribers_text(&self) -> String {
        match &self.subscribers {
            Ok(Some(n)) => format!("{n} (this probe included)"),
            Ok(None) => "unknown (core NATS does not tell clients)".into(),
            Err(why) => format!("unknown ({why})"),
        }
    }

    fn text(&self) -> String {
        let sorted = self.sorted();
        let config: String = self
            .config
            .to_yaml()
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect();
        format!(
            "configuration (secrets redacted):\n{config}channel:     {}\ntransport:   {}\nsubscribed:  in {:.3} ms\n\
             round trip:  {} probes: min {:.3} ms, median {:.3} ms, max {:.3} ms\nsubscribers: {}",
            self.channel,
            self.transport,
            ms(self.subscribed),
            sorted.len(),
            ms(sorted[0]),
            ms(sorted[sorted.len() / 2]),
            ms(sorted[sorted.len() - 1]),
            self.subscribers_text()
        )
    }

    fn json(&self) -> String {
        let sorted = self.sorted();
        serde_json::json!({
            "configuration": serde_json::to_value(&self.config).unwrap_or_default(),
            "channel": self.channel,
            "transport": self.transport,
            "subscribed_ms": ms(self.subscribed),
            "round_trip_ms": self.round_trips.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "round_trip_median_ms": ms(sorted[sorted.len() / 2]),
            "subscribers": self.subscribers.as_ref().ok().copied().flatten(),
            "subscribers_note": self.subscribers_text(),
        })
        .to_string()
    }
}
