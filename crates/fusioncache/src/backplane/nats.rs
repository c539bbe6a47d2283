//! The NATS subject backplane (feature `nats`).
//!
//! The channel name is the subject (`products.Backplane:v2`); names that are not valid NATS subjects are
//! rejected when the cache is built ([`validate_subject`]). One [`NatsBackplane`] holds one NATS connection
//! for all the caches that share it. async-nats owns reconnection (and re-subscription); its connection
//! events become the `Connected` / `Disconnected` events of every subscription.
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::fanout::Fanout;
use super::{Backplane, BackplaneError, BackplaneEvent, Subscription};

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
        }
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
        Ok(o.connection_timeout(self.connection_timeout)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50u64 << attempts.min(6)).min(2_000))
            })
            .retry_on_initial_connect())
    }
}

/// A backplane over NATS core subjects.
pub struct NatsBackplane {
    client: Client,
    subscriptions: Fanout,
    /// The task forwarding the messages of each subscribed subject.
    forwarders: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// The subjects whose subscription has reached the server: only they hear `Connected`.
    ready: Ready,
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
        let events_task = tokio::spawn(forward_connection_events(
            client.clone(),
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
        let forwarders = self.forwarders.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, task) in forwarders.drain() {
            task.abort();
        }
    }
}

type Ready = Arc<Mutex<HashSet<String>>>;

/// Proves that the server has processed every subscription this connection sent before: the server
/// handles a connection's commands in order, so a message published to a fresh inbox of ours, after them,
/// comes back only once they are all in place (`flush` only proves the bytes left the client).
async fn confirm_subscriptions(client: &Client, timeout: Duration) -> bool {
    let inbox = client.new_inbox();
    let Ok(mut probe) = client.subscribe(inbox.clone()).await else {
        return false;
    };
    if client.publish(inbox, Bytes::new()).await.is_err() || client.flush().await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(timeout, probe.next()).await,
        Ok(Some(_))
    )
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
                    if confirm_subscriptions(&client, Duration::from_secs(2)).await {
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

/// Subscribes (retrying until the connection allows it) and forwards every message to the channel's senders.
async fn forward_messages(client: Client, subscriptions: Fanout, ready: Ready, subject: String) {
    let mut delay = Duration::from_millis(50);
    let mut subscriber = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(%subject, error = %e, "nats subscribe failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    // Once the server has the SUB, the subject is live; from then on every (re)connection greets it.
    // async-nats re-sends the subscription by itself after a reconnection.
    while !confirm_subscriptions(&client, Duration::from_secs(2)).await {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    ready
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(subject.clone());
    if client.connection_state() == State::Connected {
        subscriptions.send_to(&subject, BackplaneEvent::Connected);
    }
    while let Some(message) = subscriber.next().await {
        subscriptions.send_to(&subject, BackplaneEvent::Message(message.payload));
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
            let task = tokio::spawn(forward_messages(
                self.client.clone(),
                self.subscriptions.clone(),
                self.ready.clone(),
                channel.to_string(),
            ));
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
            // async-nats would buffer while disconnected; the cache's own queue (one per key) is better.
            if self.client.connection_state() != State::Connected {
                return Err(BackplaneError::NotConnected);
            }
            self.client
                .publish(channel.to_string(), payload)
                .await
                .map_err(|e| BackplaneError::Transport(e.to_string()))
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
