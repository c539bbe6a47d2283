//! Liveness of a transport's links: how a lost link is found within a bound, and the probe message.
//!
//! Two checks, shared by the transports:
//!
//! - **the connection**: every frame from the server proves it alive; after `interval` of quiet the
//!   transport provokes one (a PING), and after `timeout` without any it declares the connection lost;
//! - **each subscribed channel**, end to end: any message on the channel proves the subscription delivers;
//!   after `interval` of quiet (jittered by up to half, so that of N idle nodes one probes and the others
//!   hear it: about one probe per interval for the whole fleet, not N²) the node publishes a [probe] on
//!   the channel, and a channel that heard nothing for `timeout` despite it is declared lost.
//!
//! [probe]: probe_message

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{now_ticks, Action, BackplaneMessage, PROBE_KEY};

/// The detection bound and the check interval of one transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Liveness {
    /// A link that has proved nothing for this long is lost.
    pub timeout: Duration,
    /// A link quiet for this long is checked (a channel: jittered up to 1.5×).
    pub interval: Duration,
}

impl Liveness {
    /// The bound and interval, with the interval brought under a third of the bound when it is not (a
    /// check must have time to be answered before the bound). A zero bound is raised to 100 ms.
    pub fn new(timeout: Duration, interval: Duration) -> Self {
        let timeout = timeout.max(Duration::from_millis(100));
        let interval = if interval.is_zero() || interval > timeout / 3 {
            timeout / 3
        } else {
            interval
        };
        Self { timeout, interval }
    }

    /// How long a quiet channel waits before it is probed: `interval` plus up to half of it, at random.
    fn probe_delay(&self) -> Duration {
        self.interval + self.interval.mul_f64(fastrand::f64() / 2.0)
    }
}

/// A probe from `source_id`: a valid FusionCache v0 *set* message on [`PROBE_KEY`], a key no node holds,
/// so every receiver leaves it alone (a .NET FusionCache node logs it at trace level and does nothing).
pub(crate) fn probe_message(source_id: &str) -> Bytes {
    BackplaneMessage::new(source_id, now_ticks(), Action::Set, PROBE_KEY).encode()
}

/// What a [`QuietChannel`] wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing until [`QuietChannel::deadline`].
    Wait,
    /// Publish a probe on the channel.
    Probe,
    /// Nothing heard for the whole bound, probe included: the subscription is lost.
    Lost,
}

/// The end-to-end watch of one subscribed channel.
///
/// Hearing a message costs a store (the receive loops call [`heard_at`](Self::heard_at) for every
/// message): the probe's jitter is drawn once per quiet spell, when a probe goes out.
#[derive(Debug, Clone)]
pub(crate) struct QuietChannel {
    liveness: Liveness,
    heard: Instant,
    /// No probe sent since the channel was last heard.
    probe_due: bool,
    /// When, after `heard`, a quiet channel is probed.
    probe_after: Duration,
}

impl QuietChannel {
    /// A channel that was just confirmed.
    pub fn new(liveness: Liveness) -> Self {
        Self {
            liveness,
            heard: Instant::now(),
            probe_due: true,
            probe_after: liveness.probe_delay(),
        }
    }

    /// Something arrived on the channel (or it cannot be judged now, e.g. a probe could not be sent): start
    /// over. Returns whether the [`deadline`](Self::deadline) may have moved earlier (the first message
    /// after a probe: a timer set for the old one must be set again).
    pub fn heard(&mut self) -> bool {
        self.heard_at(Instant::now())
    }

    /// [`heard`](Self::heard), at `now` (read once for a frame).
    pub fn heard_at(&mut self, now: Instant) -> bool {
        self.heard = now;
        !std::mem::replace(&mut self.probe_due, true)
    }

    /// When [`poll`](Self::poll) has something to say (it may say nothing yet: the channel was heard
    /// since the deadline was taken).
    pub fn deadline(&self) -> Instant {
        if self.probe_due {
            self.heard + self.probe_after
        } else {
            self.heard + self.liveness.timeout
        }
    }

    /// What to do now.
    pub fn poll(&mut self) -> Verdict {
        let now = Instant::now();
        if now >= self.heard + self.liveness.timeout {
            Verdict::Lost
        } else if self.probe_due && now >= self.heard + self.probe_after {
            self.probe_due = false;
            self.probe_after = self.liveness.probe_delay();
            Verdict::Probe
        } else {
            Verdict::Wait
        }
    }

    /// How long the channel has been quiet.
    pub fn quiet_for(&self) -> Duration {
        self.heard.elapsed()
    }
}

/// The pauses between reconnection attempts: exponential from 50 ms, with jitter (so that a fleet does not
/// reconnect in lockstep after a restart), never longer than `max`.
pub(crate) fn reconnect_backoff(max: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    let max = max.max(Duration::from_millis(100));
    // backon's jitter adds up to 100% of the delay: cap the base at half the maximum.
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50).min(max / 2))
        .with_max_delay(max / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_leaves_room_for_an_answer() {
        let l = Liveness::new(Duration::from_secs(3), Duration::from_secs(1));
        assert_eq!(l.interval, Duration::from_secs(1));
        let l = Liveness::new(Duration::from_secs(3), Duration::from_secs(5));
        assert_eq!(l.interval, Duration::from_secs(1));
        let l = Liveness::new(Duration::ZERO, Duration::ZERO);
        assert!(l.timeout > Duration::ZERO && l.interval > Duration::ZERO);
    }

    #[test]
    fn probe_delays_are_jittered_within_half_an_interval() {
        let l = Liveness::new(Duration::from_secs(3), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..200).map(|_| l.probe_delay()).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= l.interval && *d < l.interval.mul_f64(1.5)));
        assert!(delays.iter().any(|d| *d != delays[0]), "not all equal");
    }

    #[test]
    fn a_probe_is_a_valid_set_on_the_reserved_key() {
        let probe = probe_message("node-a");
        let msg = BackplaneMessage::decode(&probe).unwrap();
        assert_eq!(msg.action, Action::Set);
        assert_eq!(msg.cache_key, PROBE_KEY);
        assert_eq!(msg.source_id, "node-a");
        assert!(msg.timestamp > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_channel_is_probed_then_lost_and_a_message_starts_over() {
        let l = Liveness::new(Duration::from_secs(3), Duration::from_secs(1));
        let mut ch = QuietChannel::new(l);
        assert_eq!(ch.poll(), Verdict::Wait);
        tokio::time::sleep_until(ch.deadline()).await;
        assert_eq!(ch.poll(), Verdict::Probe);
        assert!(ch.quiet_for() >= Duration::from_secs(1));
        assert_eq!(ch.poll(), Verdict::Wait, "one probe per quiet spell");
        tokio::time::sleep_until(ch.deadline()).await;
        assert_eq!(ch.poll(), Verdict::Lost);
        assert_eq!(ch.quiet_for(), Duration::from_secs(3), "exactly the bound");
        ch.heard();
        assert_eq!(ch.poll(), Verdict::Wait);
        assert!(ch.deadline() > Instant::now() + Duration::from_millis(999));
        // Heard again and again: still one probe per quiet spell, after the interval (jittered); only the
        // first message after a probe brings the deadline closer.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!ch.heard(), "no probe out: the deadline only moves later");
        assert_eq!(ch.poll(), Verdict::Wait);
        tokio::time::sleep_until(ch.deadline()).await;
        assert_eq!(ch.poll(), Verdict::Probe);
        assert!(
            ch.quiet_for() >= Duration::from_secs(1)
                && ch.quiet_for() < Duration::from_millis(1500)
        );
        let waiting_for_the_bound = ch.deadline();
        assert!(ch.heard(), "the probe came back: the deadline moves closer");
        assert!(ch.deadline() < waiting_for_the_bound);
    }

    #[test]
    fn reconnect_pauses_grow_with_jitter_up_to_the_cap() {
        let max = Duration::from_secs(2);
        let delays: Vec<Duration> = reconnect_backoff(max).take(20).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] < Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= max));
        assert!(delays[19] >= max / 2, "reaches the cap: {:?}", delays[19]);
        let again: Vec<Duration> = reconnect_backoff(max).take(20).collect();
        assert_ne!(delays, again, "jittered");
    }
}
