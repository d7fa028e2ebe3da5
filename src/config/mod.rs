//! The proxy's TOML configuration: loading, validation with clear errors, and the
//! secret sources of the OAuth credential sets.
//!
//! [`Config::load`] reads a file, [`Config::from_toml`] parses text. Both return a
//! validated, resolved [`Config`] (defaults filled in, Genesys URLs derived from the
//! region) or a [`ConfigError`] that names the file, the key (`upstream.max_channels`,
//! `credentials[1].client_secret_file`), the line where the key is when it is known,
//! and what is wrong. Unknown keys at any level are errors: a typo must not pass
//! silently. The key names are a public contract (see `shared/design.md`, "Config").
//!
//! Secrets are never read at load time: a [`SecretSource`] says where the secret is,
//! and [`SecretSource::read`] reads it when a token is minted, so that rotating a
//! secret is writing a new file. A [`Secret`] prints as `<redacted>` in `Debug` and
//! `Display`, and no error of this module carries a secret's value.

//!
//! The module's parts: `raw` is the document as written (every value with its place
//! in the text, through `toml::Spanned`), `locate` finds the key a deserialization
//! error is about, `validate` turns the raw document into a [`Config`] with errors
//! that name the key and its line, and `tests` holds their tests.

mod locate;
mod raw;
#[cfg(test)]
mod tests;
mod validate;
mod warnings;

pub use warnings::warnings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;
use zeroize::Zeroizing;

use crate::front::limits::PeerLimits;
use crate::front::topics::Policy;
use crate::secret::Secret;

/// Default of `server.heartbeat`.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Upper bound of `server.heartbeat`: clients give up after 30 s without one.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(30);
/// Default of `server.client_idle`.
pub const DEFAULT_CLIENT_IDLE: Duration = Duration::from_secs(60);
/// Default of `handover.lead`.
pub const DEFAULT_LEAD: Duration = Duration::from_secs(5 * 60);
/// Default of `handover.overlap`.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(2);
/// Default of `upstream.max_channels`.
pub const DEFAULT_MAX_CHANNELS: usize = 4;
/// Lower bound of `upstream.max_channels`: one slot is always kept free for a handover.
pub const MIN_MAX_CHANNELS: usize = 2;
/// Upper bound of `upstream.max_channels`: Genesys keeps 20 channels per OAuth client
/// and silently evicts the oldest when a 21st is created. The budget is shared by all
/// credential sets, and all of its channels may be pinned to the same one.
pub const GENESYS_CHANNELS_PER_CLIENT: usize = 20;
/// Default of `cluster.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "handover";
/// Default of `cluster.local_share`: one serving channel and the slot for its handover.
pub const DEFAULT_LOCAL_SHARE: usize = 2;
/// Default of `cluster.history_max_len`.
pub const DEFAULT_HISTORY_MAX_LEN: usize = 100_000;
/// Lower bound of `cluster.history_max_len`.
pub const MIN_HISTORY_MAX_LEN: usize = 1000;
/// Default of `upstream.foreign_check_interval`: each count is a mint, a listing and a
/// token retirement, so one a minute; others' channels opened in between are seen at
/// the next.
pub const DEFAULT_FOREIGN_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Bounds of `upstream.foreign_check_interval`: at most one count a second (tests),
/// at least one an hour.
pub const MIN_FOREIGN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_FOREIGN_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Default of `upstream.idle_channel_timeout`.
pub const DEFAULT_IDLE_CHANNEL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default and upper bound of `upstream.max_topics_per_channel` (Genesys' limit).
pub const MAX_TOPICS_PER_CHANNEL: usize = 1000;
/// Default of `server.drain_delay`: long enough for a load balancer or Kubernetes to
/// stop sending new desktops after readiness turns 503.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Default of `server.drain_spread`.
pub const DEFAULT_DRAIN_SPREAD: Duration = Duration::from_secs(10);
/// Default of `server.shutdown_grace` (Kubernetes' default termination grace period).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default of `server.max_connections`. The proxy raises its open-file limit at start
/// and lowers this (with a warning) if the limit leaves no room for it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Upper bound of `server.max_connections`.
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
/// Default of `server.header_read_timeout` (nginx's `client_header_timeout` is 60 s;
/// a desktop sends its few hundred bytes at once).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `server.body_read_timeout`.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `server.keep_alive_idle` (nginx's `keepalive_timeout` is 75 s). Longer
/// than a client's pause between calls, so that a pooled connection is rarely
/// closed just as the client reuses it.
pub const DEFAULT_KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------------

/// The validated, resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub genesys: GenesysConfig,
    /// In configuration order (the first usable, not draining, set mints); never empty,
    /// names unique.
    pub credentials: Vec<CredentialConfig>,
    pub handover: HandoverConfig,
    pub upstream: UpstreamConfig,
    /// `[cluster]`: several replicas as one proxy, on Redis. `None`: one process.
    pub cluster: Option<ClusterConfig>,
    pub log: LogConfig,
    /// `[topics]`: which topics desktops may subscribe to.
    pub topics: Policy,
    /// `[limits]`: fair use per peer.
    pub limits: PeerLimits,
}

/// `[server]`: the client-facing listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Base of the `connectUri` handed to clients (`<public_url>/channels/<id>`): a
    /// `ws://` or `wss://` URL without a trailing `/`. Defaults to `ws://<listen>`.
    pub public_url: String,
    /// Interval of the proxy's heartbeats to clients; in `(0, 30s]`.
    pub heartbeat: Duration,
    /// How long a client channel outlives its last socket; `> 0`.
    pub client_idle: Duration,
    /// After SIGTERM: readiness answers 503 and the proxy keeps serving this long.
    pub drain_delay: Duration,
    /// Then client sockets are closed one after the other, spread over this window.
    pub drain_spread: Duration,
    /// Upper bound of the whole stop; longer than `drain_delay + drain_spread`.
    pub shutdown_grace: Duration,
    /// Browser origins admitted (canonical `scheme://host[:port]`); a request with
    /// any other `Origin` is refused. Requests without `Origin` are admitted.
    pub allowed_origins: Vec<String>,
    /// The names the listener answers to (`Host`), besides IP addresses and
    /// `localhost`: `public_url`'s host (when a name) and `allowed_hosts`.
    pub host_names: Vec<String>,
    /// Load balancers whose `X-Forwarded-For` (and PROXY header) name the peer.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Connections from a trusted proxy start with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
    /// Connections open at once (sockets included); more are answered 503 at once.
    pub max_connections: usize,
    /// From a request's first byte (from the accept for a connection's first
    /// request, TLS handshake included) until its headers are complete.
    pub header_read_timeout: Duration,
    /// Until a request's body is complete.
    pub body_read_timeout: Duration,
    /// How long a connection may wait for its next request.
    pub keep_alive_idle: Duration,
    /// `[server.tls]`: serve `https://` and `wss://`.
    pub tls: Option<TlsFiles>,
}

/// `[server.tls]`: a PEM certificate chain and private key, reloaded when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[admin]`: health, readiness, metrics and admin actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A bearer token every admin route but `/healthz` and `/readyz` needs; read at
    /// every request, so that rotating it is writing the file.
    pub token_file: Option<PathBuf>,
}

/// `[genesys]`, resolved: the two base URLs, `http(s)`, without a trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenesysConfig {
    /// Base of the OAuth endpoint (`<login_url>/oauth/token`); from a region,
    /// `https://login.<region>`.
    pub login_url: String,
    /// Base of the platform API (`<api_url>/api/v2/...`); from a region,
    /// `https://api.<region>`.
    pub api_url: String,
    /// Extra trusted roots (PEM), besides Mozilla's: a TLS-inspecting proxy's CA.
    pub ca_file: Option<PathBuf>,
}

/// One `[[credentials]]` entry: an OAuth client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialConfig {
    /// Unique, URL-safe (`[A-Za-z0-9._-]+`): it appears in admin URLs.
    pub name: String,
    pub client_id: String,
    pub secret: SecretSource,
}

/// `[handover]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverConfig {
    /// Start a handover this long before the pinned token or the channel expires;
    /// `> 0`. (Clamping to half a token's lifetime happens at run time.)
    pub lead: Duration,
    /// Keep the old socket this long after the switch; `> 0` and shorter than `lead`.
    pub overlap: Duration,
}

impl Default for HandoverConfig {
    fn default() -> Self {
        HandoverConfig {
            lead: DEFAULT_LEAD,
            overlap: DEFAULT_OVERLAP,
        }
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The channel budget across all credential sets, handovers included; in
    /// `2..=20`.
    pub max_channels: usize,
    /// In `1..=1000`.
    pub max_topics_per_channel: usize,
    /// How often the channels of the OAuth client that the proxy did not create are
    /// counted (`GET …/channels?includechannels=oauthclient`); in `1s..=1h`.
    pub foreign_check_interval: Duration,
    /// Genesys' heartbeat interval: an upstream socket silent this long is pinged,
    /// and rebuilt if it stays silent as long again.
    pub heartbeat: Duration,
    /// How long a serving channel may carry no topic before it is retired (its token
    /// too, freeing its slot); `> 0`.
    pub idle_channel_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            max_channels: DEFAULT_MAX_CHANNELS,
            max_topics_per_channel: MAX_TOPICS_PER_CHANNEL,
            foreign_check_interval: DEFAULT_FOREIGN_CHECK_INTERVAL,
            heartbeat: DEFAULT_HEARTBEAT,
            idle_channel_timeout: DEFAULT_IDLE_CHANNEL_TIMEOUT,
        }
    }
}

/// `[cluster]`: the replicas of one fleet share one Redis (or Valkey), and through it
/// the OAuth client's channel budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://`, `rediss://` or `redis+unix://`; it may carry a password, so it is a
    /// [`Secret`]: logs show [`ClusterConfig::endpoint`].
    pub redis_url: Secret,
    /// The URL without user name and password, for logs.
    pub endpoint: String,
    /// A file holding the Redis password (trimmed); it wins over one in the URL.
    pub password_file: Option<PathBuf>,
    /// PEM roots for `rediss://` with a private CA (instead of Mozilla's).
    pub ca_file: Option<PathBuf>,
    /// Every key of the fleet starts with `<key_prefix>:`, so that fleets can share
    /// one Redis.
    pub key_prefix: String,
    /// The upstream channels this replica may create while Redis is unreachable (it
    /// cannot take leases then); in `2..=upstream.max_channels`.
    pub local_share: usize,
    /// The fleet's event stream keeps about this many of the latest events (the
    /// older are trimmed as new ones come); at least 1000.
    pub history_max_len: usize,
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// Overridden by `serve --log-format`.
    pub format: LogFormat,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("expected json or text, got {value:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------

/// Where a credential set's client secret is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `client_secret_file`: re-read at every [`SecretSource::read`]. A relative path
    /// is relative to the process' working directory.
    File(PathBuf),
    /// `client_secret_env`: the name of an environment variable.
    Env(String),
    /// `client_secret`: inline in the config (allowed, discouraged). Stored trimmed.
    Inline(Secret),
}

impl SecretSource {
    /// Reads the secret now (files are re-read at every call: rotation is writing a
    /// new file), trimmed of surrounding whitespace; an empty secret is an error.
    ///
    /// This is a small blocking read; errors name the file or the variable, never the
    /// value.
    pub fn read(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSource::File(path) => {
                // The whole file, untrimmed, is wiped when it goes, as the secret is.
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
                    SecretError::ReadFile {
                        path: path.clone(),
                        error,
                    }
                })?);
                let value = text.trim();
                if value.is_empty() {
                    return Err(SecretError::EmptyFile { path: path.clone() });
                }
                Ok(Secret::from(value))
            }
            SecretSource::Env(name) => {
                let text = Zeroizing::new(std::env::var(name).map_err(|error| match error {
                    std::env::VarError::NotPresent => SecretError::EnvNotSet { name: name.clone() },
                    std::env::VarError::NotUnicode(_) => {
                        SecretError::EnvNotUnicode { name: name.clone() }
                    }
                })?);
                let value = text.trim();
                if value.is_empty() {
                    return Err(SecretError::EmptyEnv { name: name.clone() });
                }
                Ok(Secret::from(value))
            }
            SecretSource::Inline(secret) => {
                let value = secret.expose().trim();
                if value.is_empty() {
                    return Err(SecretError::EmptyInline);
                }
                Ok(Secret::from(value))
            }
        }
    }

    /// Where the secret is, for logs and admin output: the path, `$NAME`, or
    /// `inline`. Never the value.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::File(path) => format!("file {}", path.display()),
            SecretSource::Env(name) => format!("environment variable {name}"),
            SecretSource::Inline(_) => "inline client_secret".to_owned(),
        }
    }
}

/// Reading a secret failed. Names the file or the variable, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {}: {error}", path.display())]
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("secret file {} is empty", path.display())]
    EmptyFile { path: PathBuf },
    #[error("environment variable {name} (client secret) is not set")]
    EnvNotSet { name: String },
    #[error("environment variable {name} (client secret) is not valid UTF-8")]
    EnvNotUnicode { name: String },
    #[error("environment variable {name} (client secret) is empty")]
    EmptyEnv { name: String },
    #[error("inline client_secret is empty")]
    EmptyInline,
}

// ---------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------

/// Loading the configuration failed. Every message starts with the file, then the key
/// (when there is one), then what is wrong, e.g. `handover.toml: upstream.max_channels:
/// must be at least 2 (one slot is kept free for handovers), got 1 (line 14)`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("{origin}: line {line}, column {column}: invalid TOML: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// Valid TOML, but a key is unknown, missing, of the wrong type or out of range.
    /// `key` is the dotted path (`credentials[1].name`), empty for the document
    /// itself; `line` is where the key (or its table) is, when known.
    #[error("{}", render_invalid(origin, key, *line, message))]
    Invalid {
        origin: String,
        key: String,
        line: Option<usize>,
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } if !key.is_empty() => Some(key),
            _ => None,
        }
    }
}

fn render_invalid(origin: &str, key: &str, line: Option<usize>, message: &str) -> String {
    let mut out = format!("{origin}: ");
    if !key.is_empty() {
        out.push_str(key);
        out.push_str(": ");
    }
    out.push_str(message);
    if let Some(line) = line {
        out.push_str(&format!(" (line {line})"));
    }
    out
}

// ---------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------

impl Config {
    /// Reads, parses and validates the config file at `path`. Messages name the file
    /// as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` (a file name) starts every error message.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let doc = DeTable::parse(text).map_err(|error| {
            let (line, column) = error
                .span()
                .map(|span| locate::line_column(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Syntax {
                origin: origin.to_owned(),
                line,
                column,
                message: error.message().trim_end().to_owned(),
            }
        })?;
        let raw = raw::RawConfig::deserialize(toml::de::Deserializer::from(doc.clone()))
            .map_err(|error| locate::serde_error(origin, text, doc.get_ref(), &error))?;
        validate::Ctx { origin, text }.config(raw)
    }
}
