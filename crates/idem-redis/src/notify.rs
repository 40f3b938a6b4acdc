//! Completion notification over Redis pub/sub.
//!
//! The scripts publish a record's id when it settles (complete, release, remove). Waiters
//! register in the process's [`CompletionNotifier`] before they read the record, and the
//! messages wake them:
//!
//! - standalone: one channel per key prefix and one subscriber connection per store, kept
//!   by [`Listener`]; after it reconnects it wakes every waiter, since settlements while it
//!   was away were not heard;
//! - Redis Cluster: sharded pub/sub, one channel per record in the record's own slot, so a
//!   message travels only to the shard's nodes. [`Subscriptions`] subscribes a channel while
//!   the record has waiters in this process. The driver sends every push here: a message
//!   wakes its record's waiters, a (re)subscription confirmation wakes them too (the driver
//!   resubscribes after it reconnects or the slots move), and a lost node connection wakes
//!   every waiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use idem_core::notify::CompletionNotifier;
use idem_core::{Error, RecordId};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::redis_error;
use crate::keys::Keys;

/// How often the standalone subscriber checks its connection with a `PING`.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// The standalone subscriber connection.
pub(crate) struct Listener;

impl Listener {
    /// Starts the subscriber and waits until its first `SUBSCRIBE` is in place.
    pub(crate) async fn start(
        client: redis::Client,
        channel: String,
        notifier: Arc<CompletionNotifier>,
        timeout: Duration,
    ) -> Result<JoinHandle<()>, Error> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(run(client, channel, notifier, timeout, Some(ready_tx)));
        match ready_rx.await {
            Ok(Ok(())) => Ok(task),
            Ok(Err(e)) => {
                task.abort();
                Err(e)
            }
            Err(_) => Err(Error::Unavailable {
                message: "redis: the notification subscriber stopped".into(),
                source: None,
            }),
        }
    }
}

async fn run(
    client: redis::Client,
    channel: String,
    notifier: Arc<CompletionNotifier>,
    timeout: Duration,
    mut ready: Option<oneshot::Sender<Result<(), Error>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&client, &channel, &notifier, timeout, &mut ready).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, "redis notification subscriber disconnected; reconnecting");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn timed_out(what: &str) -> Error {
    Error::Unavailable {
        message: format!("redis: notification subscriber: {what} timed out"),
        source: None,
    }
}

/// One connection's life: subscribe, dispatch messages until the connection ends or stops
/// answering pings.
async fn listen_once(
    client: &redis::Client,
    channel: &str,
    notifier: &CompletionNotifier,
    timeout: Duration,
    ready: &mut Option<oneshot::Sender<Result<(), Error>>>,
) -> Result<(), Error> {
    let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out("connect"))?
        .map_err(|e| redis_error("notification subscriber: connect", e))?;
    let (mut sink, mut stream) = pubsub.split();
    tokio::time::timeout(timeout, sink.subscribe(channel))
        .await
        .map_err(|_| timed_out("SUBSCRIBE"))?
        .map_err(|e| redis_error("notification subscriber: SUBSCRIBE", e))?;
    // Settlements while no subscriber was connected were not heard: wake every waiter so it
    // reads its record again.
    notifier.notify_all();
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { break };
                let id = std::str::from_utf8(message.get_payload_bytes())
                    .ok()
                    .and_then(RecordId::from_hex);
                if let Some(id) = id {
                    notifier.notify(&id);
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(timeout, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "redis notification subscriber: PING failed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("redis notification subscriber: PING timed out");
                        break;
                    }
                }
            }
        }
    }
    notifier.notify_all();
    Ok(())
}

/// The push handler of the cluster connection: wakes waiters on sharded messages,
/// (re)subscriptions and lost connections.
pub(crate) fn push_handler(
    keys: Keys,
    notifier: Arc<CompletionNotifier>,
) -> impl Fn(PushInfo) -> Result<(), std::convert::Infallible> + Send + Sync + 'static {
    move |push: PushInfo| {
        match push.kind {
            PushKind::SMessage | PushKind::SSubscribe => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    if let Some(id) = keys.id_of_channel(channel) {
                        notifier.notify(&id);
                    }
                }
            }
            PushKind::Disconnection => notifier.notify_all(),
            _ => {}
        }
        Ok(())
    }
}

/// The sharded channels this process is subscribed to, one per record with waiters.
pub(crate) struct Subscriptions {
    conn: ClusterConnection,
    keys: Keys,
    entries: Mutex<HashMap<RecordId, Entry>>,
}

struct Entry {
    /// Waiters in this process.
    waiters: usize,
    /// Whether the channel is subscribed; its lock orders the subscribe and unsubscribe
    /// commands of one channel.
    subscribed: Arc<tokio::sync::Mutex<bool>>,
}

/// Holds a record's channel subscribed; dropping it unsubscribes once no waiter is left.
pub(crate) struct Subscription {
    subscriptions: Arc<Subscriptions>,
    id: RecordId,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscriptions.release(self.id);
    }
}

impl Subscriptions {
    pub(crate) fn new(conn: ClusterConnection, keys: Keys) -> Arc<Self> {
        Arc::new(Self {
            conn,
            keys,
            entries: Mutex::default(),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<RecordId, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes the record's channel (if this process does not already) and returns once
    /// the server confirmed it.
    pub(crate) async fn subscribe(self: &Arc<Self>, id: RecordId) -> Result<Subscription, Error> {
        let subscribed = {
            let mut entries = self.entries();
            let entry = entries.entry(id).or_insert_with(|| Entry {
                waiters: 0,
                subscribed: Arc::default(),
            });
            entry.waiters += 1;
            entry.subscribed.clone()
        };
        // From here on, dropping the guard (an error, a cancelled wait) counts the waiter out.
        let guard = Subscription {
            subscriptions: self.clone(),
            id,
        };
        let mut subscribed = subscribed.lock().await;
        if !*subscribed {
            let mut conn = self.conn.clone();
            conn.ssubscribe(self.keys.channel(&id))
                .await
                .map_err(|e| redis_error("SSUBSCRIBE", e))?;
            *subscribed = true;
        }
        Ok(guard)
    }

    fn release(self: &Arc<Self>, id: RecordId) {
        let subscribed = {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(&id) else {
                return;
            };
            entry.waiters = entry.waiters.saturating_sub(1);
            if entry.waiters > 0 {
                return;
            }
            entry.subscribed.clone()
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            let mut state = subscribed.lock().await;
            let idle = |entries: &HashMap<RecordId, Entry>| {
                entries
                    .get(&id)
                    .is_some_and(|e| e.waiters == 0 && Arc::ptr_eq(&e.subscribed, &subscribed))
            };
            if !idle(&this.entries()) {
                // A new waiter came meanwhile and keeps the channel.
                return;
            }
            if *state {
                let mut conn = this.conn.clone();
                if let Err(e) = conn.sunsubscribe(this.keys.channel(&id)).await {
                    tracing::debug!(error = %e, "redis: SUNSUBSCRIBE failed");
                }
                *state = false;
            }
            let mut entries = this.entries();
            if idle(&entries) {
                entries.remove(&id);
            }
        });
    }

    /// How many records have a subscribed channel or waiters (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }
}
