//! Calls from one replica to another, through Redis: a desktop's REST call that
//! reaches a replica other than the one serving its socket is carried out by that
//! one, since the subscriptions of a socket live with it (a balancer spreads a
//! desktop's connections over the replicas: its REST calls and its socket often land
//! apart). A replica that takes a channel's socket over also notifies the one that
//! served it, which lets go of its copy.
//!
//! A call is a JSON document pushed onto the serving replica's list `calls:<replica>`,
//! naming a reply key; that replica pops its calls one connection at a time, carries
//! each out in a task of its own, and pushes the answer onto the reply key, which the
//! caller waits on (a notice names none). Both keys expire, so that a replica that dies leaves nothing
//! behind for long.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus_client::metrics::counter::Counter;

use super::store::{Store, StoreError};
use crate::backoff::Backoff;
use crate::metrics::Registry;

/// How long a caller waits for the answer (a subscription may wait for an upstream
/// channel).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// How long an unanswered call or an unread answer stays in Redis.
const KEEP: Duration = Duration::from_secs(60);
/// How long one wait for the next call blocks.
const POP_BLOCK: Duration = Duration::from_secs(1);

/// Carries out a call on the serving replica.
pub type Handler = Arc<dyn Fn(Value) -> Pin<Box<dyn Future<Output = Value> + Send>> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("replica {0} did not answer in time")]
    Unanswered(String),
}

pub struct Calls {
    store: Arc<Store>,
    forwarded: Counter,
}

impl Calls {
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            forwarded: Counter::default(),
        })
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "cluster_calls_forwarded",
            "Subscription calls this replica forwarded to the replica serving the channel's socket.",
            self.forwarded.clone(),
        );
    }

    /// Has `replica` carry out `call`; its answer.
    pub async fn forward(&self, replica: &str, call: Value) -> Result<Value, CallError> {
        self.forwarded.inc();
        let reply = self
            .store
            .keys
            .reply(&format!("{:016x}", rand::random::<u64>()));
        self.push(
            &self.store.keys.calls(replica),
            serde_json::json!({ "reply": reply, "call": call }),
        )
        .await?;
        let mut connection = self.store.reader(ANSWER_WITHIN).await?;
        let popped: Result<Option<(String, String)>, redis::RedisError> = redis::cmd("BLPOP")
            .arg(&reply)
            .arg(ANSWER_WITHIN.as_secs_f64())
            .query_async(&mut connection)
            .await;
        match self.store.observed(popped.map_err(Into::into))? {
            Some((_, answer)) => Ok(serde_json::from_str(&answer).unwrap_or(Value::Null)),
            None => Err(CallError::Unanswered(replica.to_owned())),
        }
    }

    /// Has `replica` carry out `call`, without waiting for (or asking for) an answer.
    pub async fn notify(&self, replica: &str, call: Value) -> Result<(), StoreError> {
        self.push(
            &self.store.keys.calls(replica),
            serde_json::json!({ "call": call }),
        )
        .await
    }

    /// Appends `value` to list `key`, which lapses [`KEEP`] after.
    async fn push(&self, key: &str, value: Value) -> Result<(), StoreError> {
        push(&self.store, key, value).await
    }

    /// Carries out the calls sent to this replica with `handler`, until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        handler: Handler,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let queue = self.store.keys.calls(&self.store.replica);
        let mut backoff = Backoff::new();
        loop {
            let connected = tokio::select! {
                connected = self.store.reader(POP_BLOCK) => connected,
                _ = shutdown.cancelled() => return,
            };
            let Ok(mut connection) = connected else {
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_wait()) => continue,
                    _ = shutdown.cancelled() => return,
                }
            };
            let mut pop = redis::cmd("BLPOP");
            pop.arg(&queue).arg(POP_BLOCK.as_secs_f64());
            loop {
                let popped = tokio::select! {
                    popped = pop.query_async::<Option<(String, String)>>(&mut connection) => popped,
                    _ = shutdown.cancelled() => return,
                };
                let Ok(popped) = self.store.observed(popped.map_err(Into::into)) else {
                    break;
                };
                backoff = Backoff::new();
                let Some((_, envelope)) = popped else {
                    continue;
                };
                let Ok(envelope) = serde_json::from_str::<Value>(&envelope) else {
                    continue;
                };
                let reply = envelope["reply"].as_str().map(str::to_owned);
                let call = envelope["call"].clone();
                let (store, handler) = (self.store.clone(), handler.clone());
                tasks.spawn(async move {
                    let answer = handler(call).await;
                    // A notice wants no answer.
                    if let Some(reply) = reply {
                        let _ = push(&store, &reply, answer).await;
                    }
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_wait()) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Appends `value` to list `key` (one round trip), which lapses [`KEEP`] after.
async fn push(store: &Store, key: &str, value: Value) -> Result<(), StoreError> {
    let mut push = redis::pipe();
    push.rpush(key, value.to_string())
        .ignore()
        .pexpire(key, KEEP.as_millis() as i64)
        .ignore();
    store.pipe::<()>(&push).await
}
