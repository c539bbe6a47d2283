//! The NATS subject backplane (feature `nats`).
//!
//! The channel name is the subject (`products.Backplane:v2`); names that are not valid NATS subjects are
//! rejected when the cache is built ([`validate_subject`]). One [`NatsBackplane`] holds one NATS connection
//! for all the caches that share it. async-nats owns reconnection (and re-subscription); its connection
//! events become the `Connected` / `Disconnected` events of every subscription.
//!
//! A lost link is reported within [`NatsOptions::liveness_timeout`] (3 s by default): the client PINGs a
//! quiet connection every third of it, and each quiet subject gets a probe message (see
//! [`PROBE_KEY`](super::PROBE_KEY)) that must come back through its subscription, so a half-open
//! connection, a stalled server and a subscription the server dropped are all noticed.
//!
//! A publish succeeds once the server has routed it: each batch is followed by a receipt request to an
//! inbox of the connection's own, which comes back only after the server has handled everything sent
//! before it. A batch left unconfirmed for the liveness bound fails (the cache queues it and sends it again).
//!
//! Authentication and TLS are configured as async-nats users expect: in the URL
//! (`nats://user:password@host:4222`, `nats://token@host:4222`, `tls://host:4222`) or in [`NatsOptions`]
//! (credentials file, NKey seed, token, user/password, root CA and client certificate).
//!
//! ```no_run
//! use std::sync::Arc;
//! use fusioncache::{FusionCache, backplane::nats::{NatsBackplane, NatsOptions}};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let options = NatsOptions::new("nats://n1:4222,nats://n2:4222").credentials_file("/etc/nats/app.creds");
//! let backplane = Arc::new(NatsBackplane::connect_with(options).await?);
//! let cache: FusionCache<String> = FusionCache::builder()
//!     .name("products")
//!     .shared_backplane(backplane)
//!     .build()?;
//! # let _ = cache; Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::fanout::Fanout;
use super::liveness::{probe_message, reconnect_backoff, Liveness, QuietChannel, Verdict};
use super::{settled, Backplane, BackplaneError, BackplaneEvent, Confirmation, Subscription};

/// Checks that `subject` is a valid NATS subject to publish on: non-empty tokens separated by `.`, no
/// whitespace, no wildcard (`*`, `>`).
pub fn validate_subject(subject: &str) -> Result<(), BackplaneError> {
    let invalid = |reason: &str| {
        Err(BackplaneError::InvalidChannel {
            channel: subject.to_string(),
            reason: format!("not a valid NATS subject: {reason}"),
        })
    };
    if subject.is_empty() {
        return invalid("empty");
    }
    if let Some(c) = subject
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return invalid(&format!(
            "contains whitespace or a control character ({c:?})"
        ));
    }
    if subject.contains(['*', '>']) {
        return invalid(
            "contains a wildcard (`*` or `>`); use another cache name or channel prefix",
        );
    }
    if subject.split('.').any(str::is_empty) {
        return invalid("has an empty token (a leading, trailing or doubled `.`)");
    }
    Ok(())
}

/// How to connect to NATS. `Debug` hides the seed, the token, the password and the URLs' userinfo.
#[derive(Clone)]
pub struct NatsOptions {
    /// Server URLs, comma separated (`nats://`, `tls://`; credentials may be inline).
    pub url: String,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// An NKey seed.
    pub nkey_seed: Option<String>,
    /// A token.
    pub token: Option<String>,
    /// User and password.
    pub user_password: Option<(String, String)>,
    /// Require TLS.
    pub tls_required: bool,
    /// A PEM file of root certificates to trust.
    pub root_certificates: Option<PathBuf>,
    /// A client certificate and its key (PEM files), for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    /// The connection name the server shows.
    pub name: Option<String>,
    /// The longest a connection attempt may take (default 2 s).
    pub connection_timeout: Duration,
    /// The liveness bound (default 3 s): a connection from which nothing has come for this long (a
    /// half-open TCP connection, a stalled server) is reported `Disconnected` and reconnected, and so is a
    /// subject whose subscription heard nothing for this long despite its probe. The client PINGs a quiet
    /// connection every third of it (async-nats gives up at the third unanswered PING).
    pub liveness_timeout: Duration,
    /// How long a subscribed subject may stay quiet before it is probed end to end (default 1 s; each node
    /// waits up to 1.5× this, at random, so that one node of an idle fleet probes and the others hear it).
    /// Brought under a third of `liveness_timeout` when larger.
    pub health_check_interval: Duration,
    /// Try the servers in the order given, rather than shuffled (default `false`, async-nats' shuffle).
    pub retain_servers_order: bool,
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::redact::{url, REDACTED};
        let secret = |s: &Option<String>| s.as_ref().map(|_| REDACTED);
        f.debug_struct("NatsOptions")
            .field("url", &url(&self.url))
            .field("credentials_file", &self.credentials_file)
            .field("nkey_seed", &secret(&self.nkey_seed))
            .field("token", &secret(&self.token))
            .field(
                "user_password",
                &self.user_password.as_ref().map(|(u, _)| (u, REDACTED)),
            )
            .field("tls_required", &self.tls_required)
            .field("root_certificates", &self.root_certificates)
            .field("client_certificate", &self.client_certificate)
            .field("name", &self.name)
            .field("connection_timeout", &self.connection_timeout)
            .field("liveness_timeout", &self.liveness_timeout)
            .field("health_check_interval", &self.health_check_interval)
            .field("retain_servers_order", &self.retain_servers_order)
            .finish()
    }
}

impl NatsOptions {
    /// Options for `url` (one or more comma-separated server URLs).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials_file: None,
            nkey_seed: None,
            token: None,
            user_password: None,
            tls_required: false,
            root_certificates: None,
            client_certificate: None,
            name: None,
            connection_timeout: Duration::from_secs(2),
            liveness_timeout: Duration::from_secs(3),
            health_check_interval: Duration::from_secs(1),
            retain_servers_order: false,
        }
    }

    /// Sets the liveness bound (see [`liveness_timeout`](Self::liveness_timeout)).
    #[must_use]
    pub fn liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// Sets the health-check interval (see [`health_check_interval`](Self::health_check_interval)).
    #[must_use]
    pub fn health_check_interval(mut self, interval: Duration) -> Self {
        self.health_check_interval = interval;
        self
    }

    /// Tries the servers in the order given (the first one first), rather than shuffled: e.g. each zone's
    /// nodes list their zone's server first.
    #[must_use]
    pub fn retain_servers_order(mut self, retain: bool) -> Self {
        self.retain_servers_order = retain;
        self
    }

    fn liveness(&self) -> Liveness {
        Liveness::new(self.liveness_timeout, self.health_check_interval)
    }

    /// Authenticates with a `.creds` file.
    #[must_use]
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials_file = Some(path.into());
        self
    }

    /// Authenticates with an NKey seed.
    #[must_use]
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.nkey_seed = Some(seed.into());
        self
    }

    /// Authenticates with a token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Authenticates with a user and password.
    #[must_use]
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user_password = Some((user.into(), password.into()));
        self
    }

    /// Requires TLS, trusting `root_certificates` (a PEM file) when given.
    #[must_use]
    pub fn tls(mut self, root_certificates: Option<PathBuf>) -> Self {
        self.tls_required = true;
        self.root_certificates = root_certificates;
        self
    }

    /// A client certificate for mutual TLS.
    #[must_use]
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// The connection name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    fn servers(&self) -> Result<Vec<ServerAddr>, BackplaneError> {
        let servers = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ServerAddr>()
                    .map_err(|e| BackplaneError::Config(format!("invalid NATS URL `{s}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(BackplaneError::Config("no NATS server URL".into()));
        }
        Ok(servers)
    }

    async fn connect_options(&self) -> Result<ConnectOptions, BackplaneError> {
        let mut o = match &self.credentials_file {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    BackplaneError::Config(format!(
                        "cannot read NATS credentials file {}: {e}",
                        path.display()
                    ))
                })?,
            None => ConnectOptions::new(),
        };
        if let Some(seed) = &self.nkey_seed {
            o = o.nkey(seed.clone());
        }
        if let Some(token) = &self.token {
            o = o.token(token.clone());
        }
        if let Some((user, password)) = &self.user_password {
            o = o.user_and_password(user.clone(), password.clone());
        }
        let explicit_auth = self.credentials_file.is_some()
            || self.nkey_seed.is_some()
            || self.token.is_some()
            || self.user_password.is_some();
        if !explicit_auth {
            // Credentials in the URL: `nats://user:password@host` or `nats://token@host`.
            if let Some(server) = self.servers()?.into_iter().find(|s| s.has_user_pass()) {
                let user = server.username().unwrap_or_default().to_string();
                o = match server.password() {
                    Some(password) => o.user_and_password(user, password.to_string()),
                    None => o.token(user),
                };
            }
        }
        if self.tls_required {
            o = o.require_tls(true);
        }
        if let Some(ca) = &self.root_certificates {
            o = o.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client_certificate {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(name) = &self.name {
            o = o.name(name);
        }
        if self.retain_servers_order {
            o = o.retain_servers_order();
        }
        Ok(o.connection_timeout(self.connection_timeout)
            // async-nats closes a connection at the third PING left unanswered.
            .ping_interval(self.liveness().timeout / 3)
            .reconnect_delay_callback(|attempts| {
                reconnect_backoff(MAX_RECONNECT_DELAY)
                    .nth(attempts.saturating_sub(1))
                    .unwrap_or(MAX_RECONNECT_DELAY)
            })
            .retry_on_initial_connect())
    }
}

/// The longest pause between reconnection attempts, jitter included. Short: nodes that come back at
/// different times miss each other's notifications in between (each one's queue is replayed only when it
/// is back), so the spread of the fleet's reconnections bounds the staleness after an outage.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A backplane over NATS core subjects.
pub struct NatsBackplane {
    client: Client,
    subscriptions: Fanout,
    /// The task forwarding the messages of each subscribed subject.
    forwarders: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// The subjects whose subscription has reached the server: only they hear `Connected`.
    ready: Ready,
    liveness: Liveness,
    /// This backplane's probe message.
    probe: Bytes,
    /// The server's receipts for what this connection sent.
    receipts: Arc<Receipts>,
    events_task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for NatsBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackplane")
            .field("state", &self.client.connection_state())
            .finish_non_exhaustive()
    }
}

impl NatsBackplane {
    /// Connects to `url` (returns at once; the connection is retried in the background until it succeeds).
    pub async fn connect(url: &str) -> Result<Self, BackplaneError> {
        Self::connect_with(NatsOptions::new(url)).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(options: NatsOptions) -> Result<Self, BackplaneError> {
        let servers = options.servers()?;
        let liveness = options.liveness();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let connect = options
            .connect_options()
            .await?
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            });
        let client = connect
            .connect(servers)
            .await
            .map_err(|e| BackplaneError::Transport(e.to_string()))?;
        let subscriptions = Fanout::default();
        let ready = Ready::default();
        let receipts = Arc::new(Receipts::start(&client).await?);
        let events_task = tokio::spawn(forward_connection_events(
            client.clone(),
            Arc::clone(&receipts),
            subscriptions.clone(),
            ready.clone(),
            events_rx,
        ))
        .abort_handle();
        Ok(Self {
            client,
            subscriptions,
            forwarders: Mutex::default(),
            ready,
            liveness,
            probe: probe_message(&uuid::Uuid::new_v4().to_string()),
            receipts,
            events_task,
        })
    }

    /// The async-nats client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Drop for NatsBackplane {
    fn drop(&mut self) {
        self.events_task.abort();
        self.receipts.task.abort();
        let forwarders = self.forwarders.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, task) in forwarders.drain() {
            task.abort();
        }
    }
}

type Ready = Arc<Mutex<HashSet<String>>>;

/// The server's receipts for what this connection sent. NATS core has no publish acknowledgement, but the
/// server handles a connection's messages in order, and routes each one to its subscribers before it reads
/// the next: a message to an inbox of ours, published after a batch, comes back only once the server has
/// taken every message and subscription sent before it (`flush` only proves the bytes left the client).
struct Receipts {
    inbox: async_nats::Subject,
    /// The number of the last receipt requested.
    requested: AtomicU64,
    /// The highest receipt number heard back.
    heard: watch::Receiver<u64>,
    task: tokio::task::AbortHandle,
}

impl Receipts {
    /// Subscribes to a fresh inbox of `client`'s (async-nats subscribes again after every reconnection).
    async fn start(client: &Client) -> Result<Self, BackplaneError> {
        let inbox = client.new_inbox();
        let mut subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BackplaneError::Transport(e.to_string()))?;
        let (tx, heard) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let Ok(number) = <[u8; 8]>::try_from(message.payload.as_ref()) else {
                    continue;
                };
                let number = u64::from_le_bytes(number);
                tx.send_if_modified(|highest| {
                    let newer = number > *highest;
                    if newer {
                        *highest = number;
                    }
                    newer
                });
            }
        })
        .abort_handle();
        Ok(Self {
            inbox: inbox.into(),
            requested: AtomicU64::new(0),
            heard,
            task,
        })
    }

    /// Waits up to `timeout` until the server has taken everything `client` sent before this call.
    async fn confirm(&self, client: &Client, timeout: Duration) -> bool {
        match self.request(client).await {
            Some(number) => self.wait(number, timeout).await,
            None => false,
        }
    }

    /// Asks for a receipt of everything `client` sent so far; its number, `None` if it could not be sent.
    /// Receipts are numbered after what they follow is sent, so any receipt numbered from ours on answers
    /// for it (they may come back out of order).
    async fn request(&self, client: &Client) -> Option<u64> {
        let number = self.requested.fetch_add(1, Ordering::Relaxed) + 1;
        let request = Bytes::copy_from_slice(&number.to_le_bytes());
        client.publish(self.inbox.clone(), request).await.ok()?;
        Some(number)
    }

    /// Waits up to `timeout` for receipt `number` (or a later one).
    async fn wait(&self, number: u64, timeout: Duration) -> bool {
        let mut heard = self.heard.clone();
        tokio::time::timeout(timeout, heard.wait_for(|&highest| highest >= number))
            .await
            .is_ok_and(|heard| heard.is_ok())
    }
}

/// One error per message of a batch of `n` that failed as a whole.
fn batch_failed(n: usize, error: BackplaneError) -> Vec<Result<(), BackplaneError>> {
    let text = error.to_string();
    let mut results = Vec::with_capacity(n);
    if n > 0 {
        results.push(Err(error));
    }
    results.extend((1..n).map(|_| Err(BackplaneError::Transport(text.clone()))));
    results
}

/// Tells the subscriptions of every subject that reached the server that they are live.
async fn greet_ready(subscriptions: &Fanout, ready: &Ready) {
    let subjects: Vec<String> = ready
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    for subject in subjects {
        subscriptions.send_to(&subject, BackplaneEvent::Connected);
    }
}

async fn forward_connection_events(
    client: Client,
    receipts: Arc<Receipts>,
    subscriptions: Fanout,
    ready: Ready,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Connected => {
                // async-nats re-sends the subscriptions: make sure they are in place before saying so.
                let mut confirmed = false;
                for attempt in 0..5u32 {
                    if receipts.confirm(&client, Duration::from_secs(2)).await {
                        confirmed = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                if !confirmed {
                    tracing::warn!(
                        "nats subscriptions not confirmed after a reconnection; resuming anyway"
                    );
                }
                tracing::info!("nats backplane connected");
                greet_ready(&subscriptions, &ready).await;
            }
            Event::Disconnected | Event::Closed => {
                tracing::warn!(%event, "nats backplane disconnected");
                subscriptions.send_all(BackplaneEvent::Disconnected {
                    reason: event.to_string(),
                });
            }
            Event::SlowConsumer(sid) => {
                // Messages were dropped by the client: this node may have missed notifications.
                tracing::warn!(
                    sid,
                    "nats slow consumer: notifications dropped; marking L1 stale"
                );
                subscriptions.send_all(BackplaneEvent::Disconnected {
                    reason: event.to_string(),
                });
                greet_ready(&subscriptions, &ready).await;
            }
            other => tracing::info!(event = %other, "nats connection event"),
        }
    }
}

/// What a subject's forwarder needs.
struct Forwarder {
    client: Client,
    receipts: Arc<Receipts>,
    subscriptions: Fanout,
    ready: Ready,
    subject: String,
    liveness: Liveness,
    probe: Bytes,
}

impl Forwarder {
    /// Subscribes (retrying until the connection allows it), says `Connected` once the subscription is in
    /// place, and forwards every message to the subject's subscriptions while watching that it still
    /// delivers. A subject that stops delivering (see [`watch`](Self::watch)) hears `Disconnected` and is
    /// subscribed again, `Connected` only once a probe comes back through the new subscription.
    async fn run(self) {
        let mut backoff = reconnect_backoff(MAX_RECONNECT_DELAY);
        let mut subscriber = self.subscribe(&mut backoff).await;
        // Once the server has the SUB, the subject is live; from then on every (re)connection greets it.
        // async-nats re-sends the subscription by itself after a reconnection.
        while !self
            .receipts
            .confirm(&self.client, Duration::from_secs(2))
            .await
        {
            tokio::time::sleep(backoff.next().unwrap_or(MAX_RECONNECT_DELAY)).await;
        }
        loop {
            backoff = reconnect_backoff(MAX_RECONNECT_DELAY);
            self.set_ready(true);
            if self.client.connection_state() == State::Connected {
                self.subscriptions
                    .send_to(&self.subject, BackplaneEvent::Connected);
            }
            let reason = self.watch(&mut subscriber).await;
            self.set_ready(false);
            tracing::warn!(subject = %self.subject, %reason, "nats subscription lost; subscribing again");
            self.subscriptions
                .send_to(&self.subject, BackplaneEvent::Disconnected { reason });
            // Subscribe anew (dropping the old subscription unsubscribes it) until a probe comes back.
            loop {
                tokio::time::sleep(backoff.next().unwrap_or(MAX_RECONNECT_DELAY)).await;
                subscriber = self.subscribe(&mut backoff).await;
                if self.probe_round_trip(&mut subscriber).await {
                    break;
                }
            }
        }
    }

    async fn subscribe(
        &self,
        backoff: &mut impl Iterator<Item = Duration>,
    ) -> async_nats::Subscriber {
        loop {
            match self.client.subscribe(self.subject.clone()).await {
                Ok(s) => return s,
                Err(e) => {
                    tracing::warn!(subject = %self.subject, error = %e, "nats subscribe failed; retrying");
                    tokio::time::sleep(backoff.next().unwrap_or(MAX_RECONNECT_DELAY)).await;
                }
            }
        }
    }

    fn set_ready(&self, ready: bool) {
        let mut set = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        if ready {
            set.insert(self.subject.clone());
        } else {
            set.remove(&self.subject);
        }
    }

    /// Forwards messages until the subscription ends or stops delivering: a subject quiet for the
    /// health-check interval (jittered) gets a probe, and one that heard nothing, probe included, for the
    /// liveness bound is lost. While the connection itself is down the subject is not judged (the
    /// connection's events say `Disconnected` and async-nats subscribes again on reconnection).
    async fn watch(&self, subscriber: &mut async_nats::Subscriber) -> String {
        let mut quiet = QuietChannel::new(self.liveness);
        let mut sender = self.subscriptions.sender(&self.subject);
        // One timer, moved only when it fires: a message only pushes the watch's deadline later, and the
        // watch says `Wait` when it fires early.
        let timer = tokio::time::sleep_until(quiet.deadline());
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                message = subscriber.next() => {
                    let Some(message) = message else {
                        return "subscription closed".into();
                    };
                    if quiet.heard() {
                        timer.as_mut().reset(quiet.deadline());
                    }
                    sender.send(BackplaneEvent::Message(message.payload));
                }
                () = &mut timer => {
                    if self.client.connection_state() != State::Connected {
                        quiet.heard();
                    } else {
                        match quiet.poll() {
                            Verdict::Wait => {}
                            Verdict::Probe => {
                                if self.client.publish(self.subject.clone(), self.probe.clone()).await.is_err() {
                                    quiet.heard();
                                }
                            }
                            Verdict::Lost => {
                                return format!(
                                    "subject {} delivered nothing for {} ms, probe included",
                                    self.subject,
                                    quiet.quiet_for().as_millis()
                                );
                            }
                        }
                    }
                    timer.as_mut().reset(quiet.deadline());
                }
            }
        }
    }

    /// Publishes a probe and waits, up to the liveness bound, for anything to arrive through `subscriber`
    /// (messages that arrive meanwhile are forwarded).
    async fn probe_round_trip(&self, subscriber: &mut async_nats::Subscriber) -> bool {
        if self
            .client
            .publish(self.subject.clone(), self.probe.clone())
            .await
            .is_err()
        {
            return false;
        }
        match tokio::time::timeout(self.liveness.timeout, subscriber.next()).await {
            Ok(Some(message)) => {
                self.subscriptions
                    .send_to(&self.subject, BackplaneEvent::Message(message.payload));
                true
            }
            Ok(None) | Err(_) => false,
        }
    }
}

impl Backplane for NatsBackplane {
    fn validate_channel(&self, channel: &str) -> Result<(), BackplaneError> {
        validate_subject(channel)
    }

    fn subscribe(&self, channel: &str) -> Result<Subscription, BackplaneError> {
        validate_subject(channel)?;
        let (subscription, tx) = self.subscriptions.add(channel);
        let mut forwarders = self.forwarders.lock().unwrap_or_else(|e| e.into_inner());
        if forwarders.contains_key(channel) {
            // Already subscribed: the new subscription is live now if the subject is and the connection is
            // (otherwise the forwarder or the next connection greets it).
            let ready = self
                .ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(channel);
            if ready && self.client.connection_state() == State::Connected {
                tx.deliver(BackplaneEvent::Connected);
            }
        } else {
            let forwarder = Forwarder {
                client: self.client.clone(),
                receipts: Arc::clone(&self.receipts),
                subscriptions: self.subscriptions.clone(),
                ready: self.ready.clone(),
                subject: channel.to_string(),
                liveness: self.liveness,
                probe: self.probe.clone(),
            };
            let task = tokio::spawn(forwarder.run());
            forwarders.insert(channel.to_string(), task.abort_handle());
        }
        Ok(subscription)
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            let mut results = self.publish_batch(channel, vec![payload]).await;
            results.pop().unwrap_or(Err(BackplaneError::NotConnected))
        })
    }

    /// Publishes the batch, then waits (up to the liveness bound) for the server's receipt: `Ok` means
    /// the server has routed every message to the subscribers of `channel`. Unconfirmed messages are
    /// errors (the cache queues and sends them again: a duplicate notification is harmless).
    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        payloads: Vec<Bytes>,
    ) -> BoxFuture<'a, Vec<Result<(), BackplaneError>>> {
        Box::pin(async move { self.send_batch(channel, payloads).await.await })
    }

    // The confirmation is returned to be awaited later, on purpose.
    #[allow(clippy::async_yields_async)]
    fn send_batch<'a>(
        &'a self,
        channel: &'a str,
        payloads: Vec<Bytes>,
    ) -> BoxFuture<'a, Confirmation> {
        Box::pin(async move {
            let n = payloads.len();
            // async-nats would buffer while disconnected; the cache's own queue (one per key) is better.
            if self.client.connection_state() != State::Connected {
                return settled(batch_failed(n, BackplaneError::NotConnected));
            }
            let subject = async_nats::Subject::from(channel.to_string());
            for payload in payloads {
                if let Err(e) = self.client.publish(subject.clone(), payload).await {
                    return settled(batch_failed(n, BackplaneError::Transport(e.to_string())));
                }
            }
            let Some(number) = self.receipts.request(&self.client).await else {
                return settled(batch_failed(n, BackplaneError::NotConnected));
            };
            let (receipts, timeout) = (Arc::clone(&self.receipts), self.liveness.timeout);
            Box::pin(async move {
                if receipts.wait(number, timeout).await {
                    (0..n).map(|_| Ok(())).collect()
                } else {
                    batch_failed(
                        n,
                        BackplaneError::Transport(format!(
                            "the nats server did not confirm the publish within {} ms",
                            timeout.as_millis()
                        )),
                    )
                }
            }) as Confirmation
        })
    }

    fn transport_name(&self) -> &'static str {
        "nats"
    }
}

#[cfg(test)]
mod tests {
    use super::validate_subject;

    #[test]
    fn debug_output_shows_no_secret() {
        let options = super::NatsOptions::new("nats://app:s3cret@n1:4222,nats://tok3n@n2:4222")
            .token("t0ken")
            .user_and_password("u", "pa55")
            .nkey("SUAseed");
        let text = format!("{options:?}");
        for secret in ["s3cret", "tok3n", "t0ken", "pa55", "SUAseed"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            text.contains("n1:4222") && text.contains("n2:4222"),
            "{text}"
        );
    }

    #[test]
    fn channel_names_are_checked_as_nats_subjects() {
        assert!(validate_subject("products.Backplane:v2").is_ok());
        assert!(validate_subject("shop.prod.products.Backplane:v2").is_ok());
        for bad in [
            "",
            "my cache.Backplane:v2",
            "a*.Backplane:v2",
            "a>.Backplane:v2",
            ".a.Backplane:v2",
            "a..b",
            "tab\t.x",
        ] {
            let err = validate_subject(bad).unwrap_err().to_string();
            assert!(err.contains("not a valid NATS subject"), "{bad:?}: {err}");
        }
    }
}
