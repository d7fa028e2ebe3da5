//! The fleet's Redis: one reconnecting connection, the key layout, and whether Redis
//! answers (with its metrics and one log line per change).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, FromRedisValue, IntoConnectionInfo, RedisError};

use crate::config::ClusterConfig;
use crate::metrics::{Readings, Registry};

/// How long a command may take before Redis counts as unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached, or failed the command. (Redis' errors name no
    /// password: the URL is never part of them.)
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// The file named by `cluster.password_file` or `cluster.ca_file` cannot be read.
    #[error("cannot read {what} {path}: {error}")]
    File {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
}

/// The names of the fleet's keys, all under `<key_prefix>:`.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: format!("{prefix}:"),
        }
    }

    /// What every key begins with (scripts that name keys per topic build them).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Channel slots: `<replica>/<channel>` → when the lease lapses (ms).
    pub fn leases(&self) -> String {
        format!("{}leases", self.prefix)
    }

    /// The event stream: `t` topic, `c` CorrelationId (or empty), `f` the frame.
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// Dedup keys, `<prefix>seen:<topic>|<CorrelationId>`, expiring after the dedup
    /// window.
    pub fn seen_prefix(&self) -> String {
        format!("{}seen:", self.prefix)
    }

    /// A client channel's listing (see `directory`).
    pub fn channel(&self, id: &str) -> String {
        format!("{}c:{id}", self.prefix)
    }

    /// A replica's heartbeat: its clock (ms) at its last beat, lapsing soon after.
    pub fn alive(&self, replica: &str) -> String {
        format!("{}r:{replica}", self.prefix)
    }

    /// Calls waiting for `replica` to carry them out (see `calls`).
    pub fn calls(&self, replica: &str) -> String {
        format!("{}calls:{replica}", self.prefix)
    }

    /// Where the answer to call `id` goes.
    pub fn reply(&self, id: &str) -> String {
        format!("{}reply:{id}", self.prefix)
    }

    /// The replicas that take desktops → their last beat (ms).
    pub fn replicas(&self) -> String {
        format!("{}replicas", self.prefix)
    }

    /// When this Redis started keeping the ledger (ms): absent after Redis lost it.
    pub fn ledger(&self) -> String {
        format!("{}ledger", self.prefix)
    }
}

/// The connection to the fleet's Redis.
pub struct Store {
    connection: ConnectionManager,
    /// For the connections of blocking reads (they would hold up every command
    /// behind them on the shared one).
    client: redis::Client,
    pub keys: Keys,
    /// This process' name in the fleet (random at each start: a restarted replica is
    /// a new one).
    pub replica: String,
    up: AtomicBool,
    /// Wakes whoever waits on Redis starting or ceasing to answer.
    health: tokio::sync::Notify,
    errors: Counter,
    calls: Counter,
}

impl Store {
    /// Connects lazily: the first command connects, so a replica starts (and serves
    /// within its local share) while Redis is down.
    pub fn connect(config: &ClusterConfig) -> Result<Arc<Self>, StoreError> {
        let mut info = config.redis_url.expose().into_connection_info()?;
        if let Some(path) = &config.password_file {
            let password =
                zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
                    StoreError::File {
                        what: "cluster.password_file",
                        path: path.display().to_string(),
                        error,
                    }
                })?);
            let settings = info.redis_settings().clone().set_password(password.trim());
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_file {
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|error| StoreError::File {
                    what: "cluster.ca_file",
                    path: path.display().to_string(),
                    error,
                })?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )?
            }
            None => redis::Client::open(info)?,
        };
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), manager)?;
        Ok(Arc::new(Self {
            connection,
            client,
            keys: Keys::new(&config.key_prefix),
            replica: format!("{:016x}", rand::random::<u64>()),
            up: AtomicBool::new(true),
            health: tokio::sync::Notify::new(),
            errors: Counter::default(),
            calls: Counter::default(),
        }))
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "cluster_redis_errors",
            "Redis commands that failed (Redis unreachable, or an error answer).",
            self.errors.clone(),
        );
        registry.register(
            "cluster_redis_calls",
            "Round trips to Redis (a script or a pipeline is one).",
            self.calls.clone(),
        );
        let store = self.clone();
        Readings::new()
            .gauge(
                "cluster_redis_up",
                "1 while Redis answers; 0 while it does not (channels are then created only within cluster.local_share).",
                move || i64::from(store.is_up()),
            )
            .register(registry);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Resolves when Redis next starts or ceases to answer.
    pub fn health_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.health.notified()
    }

    /// Runs a script (`EVALSHA`, loading it when Redis lost it).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        let result = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::from);
        self.observe(&result);
        result
    }

    /// A connection of its own for blocking reads of up to `block`.
    pub async fn reader(&self, block: Duration) -> Result<MultiplexedConnection, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT));
        let connected = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(StoreError::from);
        self.observed(connected)
    }

    /// Notes the outcome of a command run on a connection of its own.
    pub fn observed<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.observe(&result);
        result
    }

    /// Runs one command.
    pub async fn command<T: FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        let result = command
            .query_async(&mut connection)
            .await
            .map_err(StoreError::from);
        self.observe(&result);
        result
    }

    /// Runs a pipeline (one round trip).
    pub async fn pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        let result = pipe
            .query_async(&mut connection)
            .await
            .map_err(StoreError::from);
        self.observe(&result);
        result
    }

    /// Notes a command's outcome: Redis failing (unreachable, or refusing the fleet's
    /// commands), and answering again, are logged once each.
    fn observe<T>(&self, result: &Result<T, StoreError>) {
        self.calls.inc();
        match result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::AcqRel) {
                    self.health.notify_waiters();
                    tracing::info!("Redis answers again: channels take fleet leases again");
                }
            }
            Err(error) => {
                self.errors.inc();
                if self.up.swap(false, Ordering::AcqRel) {
                    self.health.notify_waiters();
                    tracing::warn!(%error, "Redis fails: new upstream channels only within cluster.local_share until it answers");
                }
            }
        }
    }
}
