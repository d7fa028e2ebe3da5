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

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

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
    pub log: LogConfig,
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
}

/// `[admin]`: health, readiness, metrics and admin actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
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
            heartbeat: DEFAULT_HEARTBEAT,
            idle_channel_timeout: DEFAULT_IDLE_CHANNEL_TIMEOUT,
        }
    }
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

/// A client secret. `Debug` and `Display` print `<redacted>`; [`Secret::expose`] is
/// the only way to the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's value, for the one place that sends it (the token request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

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
                let text =
                    std::fs::read_to_string(path).map_err(|error| SecretError::ReadFile {
                        path: path.clone(),
                        error,
                    })?;
                let value = text.trim();
                if value.is_empty() {
                    return Err(SecretError::EmptyFile { path: path.clone() });
                }
                Ok(Secret(value.to_owned()))
            }
            SecretSource::Env(name) => {
                let text = std::env::var(name).map_err(|error| match error {
                    std::env::VarError::NotPresent => SecretError::EnvNotSet { name: name.clone() },
                    std::env::VarError::NotUnicode(_) => {
                        SecretError::EnvNotUnicode { name: name.clone() }
                    }
                })?;
                let value = text.trim();
                if value.is_empty() {
                    return Err(SecretError::EmptyEnv { name: name.clone() });
                }
                Ok(Secret(value.to_owned()))
            }
            SecretSource::Inline(secret) => {
                let value = secret.expose().trim();
                if value.is_empty() {
                    return Err(SecretError::EmptyInline);
                }
                Ok(Secret(value.to_owned()))
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
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Syntax {
                origin: origin.to_owned(),
                line,
                column,
                message: error.message().trim_end().to_owned(),
            }
        })?;
        let ctx = Ctx {
            origin,
            text,
            doc: doc.get_ref(),
        };
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(doc.clone()))
            .map_err(|error| ctx.serde_error(&error))?;
        ctx.validate(raw)
    }
}

// The document as written. Durations go through humantime_serde; addresses and URLs
// stay strings here and are checked in `validate`, for better messages.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a TOML document of tables")]
struct RawConfig {
    server: Option<RawServer>,
    admin: Option<RawAdmin>,
    genesys: Option<RawGenesys>,
    credentials: Option<Vec<RawCredential>>,
    handover: Option<RawHandover>,
    upstream: Option<RawUpstream>,
    log: Option<RawLog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [server] table")]
struct RawServer {
    listen: String,
    public_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    heartbeat: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    client_idle: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    drain_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    drain_spread: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [admin] table")]
struct RawAdmin {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [genesys] table")]
struct RawGenesys {
    region: Option<String>,
    login_url: Option<String>,
    api_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[credentials]] table")]
struct RawCredential {
    name: String,
    client_id: String,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    client_secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [handover] table")]
struct RawHandover {
    #[serde(default, with = "humantime_serde")]
    lead: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    overlap: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [log] table")]
struct RawLog {
    format: Option<LogFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [upstream] table")]
struct RawUpstream {
    max_channels: Option<usize>,
    max_topics_per_channel: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    heartbeat: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_channel_timeout: Option<Duration>,
}

/// A step of a key path: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// `["upstream", "max_channels"]` as a path.
fn keys(parts: &[&str]) -> Vec<Seg> {
    parts
        .iter()
        .map(|part| Seg::Key((*part).to_owned()))
        .collect()
}

/// `credentials[index].key` as a path.
fn credential_key(index: usize, key: &str) -> Vec<Seg> {
    vec![
        Seg::Key("credentials".to_owned()),
        Seg::Index(index),
        Seg::Key(key.to_owned()),
    ]
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn contains(span: &std::ops::Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

/// The deepest key path whose key or value span contains `offset`.
fn path_at(table: &DeTable<'_>, offset: usize) -> Vec<Seg> {
    let mut best = Vec::new();
    let mut current = Vec::new();
    search_table(table, offset, &mut current, &mut best);
    best
}

fn search_table(table: &DeTable<'_>, offset: usize, current: &mut Vec<Seg>, best: &mut Vec<Seg>) {
    for (key, value) in table.iter() {
        current.push(Seg::Key(key.get_ref().to_string()));
        if (contains(&key.span(), offset) || contains(&value.span(), offset))
            && current.len() > best.len()
        {
            *best = current.clone();
        }
        search_value(value, offset, current, best);
        current.pop();
    }
}

fn search_value(
    value: &Spanned<DeValue<'_>>,
    offset: usize,
    current: &mut Vec<Seg>,
    best: &mut Vec<Seg>,
) {
    match value.get_ref() {
        DeValue::Table(table) => search_table(table, offset, current, best),
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                current.push(Seg::Index(index));
                if contains(&item.span(), offset) && current.len() > best.len() {
                    *best = current.clone();
                }
                search_value(item, offset, current, best);
                current.pop();
            }
        }
        _ => {}
    }
}

/// The span of the deepest existing prefix of `path` (the key's span for a table
/// entry, the item's for an array element).
fn span_of(table: &DeTable<'_>, path: &[Seg]) -> Option<std::ops::Range<usize>> {
    let (Seg::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let (key, value) = table.iter().find(|(key, _)| key.get_ref() == first)?;
    let mut span = key.span();
    let mut value = value;
    let mut rest = rest;
    while let Some((seg, tail)) = rest.split_first() {
        let next = match (seg, value.get_ref()) {
            (Seg::Key(name), DeValue::Table(table)) => table
                .iter()
                .find(|(key, _)| key.get_ref() == name)
                .map(|(key, value)| (key.span(), value)),
            (Seg::Index(index), DeValue::Array(items)) => {
                items.get(*index).map(|item| (item.span(), item))
            }
            _ => None,
        };
        let Some((next_span, next_value)) = next else {
            break;
        };
        span = next_span;
        value = next_value;
        rest = tail;
    }
    Some(span)
}

struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
    doc: &'a DeTable<'a>,
}

impl Ctx<'_> {
    fn error(&self, path: &[Seg], message: impl Into<String>) -> ConfigError {
        let line = span_of(self.doc, path).map(|span| line_column(self.text, span.start).0);
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: render_path(path),
            line,
            message: message.into(),
        }
    }

    /// A deserialization error (unknown key, missing key, wrong type), located by its
    /// span.
    fn serde_error(&self, error: &toml::de::Error) -> ConfigError {
        let (path, line) = match error.span() {
            Some(span) => (
                path_at(self.doc, span.start),
                Some(line_column(self.text, span.start).0),
            ),
            None => (Vec::new(), None),
        };
        let mut message = error.message().trim_end().to_owned();
        // serde's messages quote the offending value; an inline secret must not leak.
        if matches!(path.last(), Some(Seg::Key(key)) if key == "client_secret")
            && !message.starts_with("unknown field")
        {
            message = "must be a non-empty string (value not shown)".to_owned();
        }
        if message.ends_with("expected a duration") {
            message.push_str(" such as \"90s\", \"5m\" or \"1h 30m\"");
        }
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: render_path(&path),
            line,
            message,
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let missing = |section: &str| {
            self.error(
                &keys(&[section]),
                format!("missing: the [{section}] table is required"),
            )
        };
        let server = raw.server.ok_or_else(|| missing("server"))?;
        let admin = raw.admin.ok_or_else(|| missing("admin"))?;
        let genesys = raw.genesys.ok_or_else(|| missing("genesys"))?;

        let server = self.server(server)?;
        let admin = AdminConfig {
            listen: self.socket_addr(&keys(&["admin", "listen"]), &admin.listen)?,
        };
        // Port 0 (tests) binds a fresh port each time, so equal addresses do not clash.
        if admin.listen == server.listen && admin.listen.port() != 0 {
            return Err(self.error(
                &keys(&["admin", "listen"]),
                format!(
                    "must differ from server.listen ({}): the admin listener is never on the client port",
                    server.listen
                ),
            ));
        }
        let genesys = self.genesys(genesys)?;
        let credentials = self.credentials(raw.credentials.unwrap_or_default())?;
        let handover = self.handover(raw.handover)?;
        let upstream = self.upstream(raw.upstream)?;
        let log = LogConfig {
            format: raw.log.and_then(|log| log.format).unwrap_or_default(),
        };
        Ok(Config {
            server,
            admin,
            genesys,
            credentials,
            handover,
            upstream,
            log,
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = self.socket_addr(&keys(&["server", "listen"]), &raw.listen)?;
        let public_url = match &raw.public_url {
            Some(url) => self.url(&keys(&["server", "public_url"]), url, &["ws", "wss"])?,
            None => format!("ws://{listen}"),
        };
        let heartbeat = raw.heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
        let heartbeat_key = keys(&["server", "heartbeat"]);
        if heartbeat.is_zero() {
            return Err(self.error(&heartbeat_key, "must be longer than 0s"));
        }
        if heartbeat > MAX_HEARTBEAT {
            return Err(self.error(
                &heartbeat_key,
                format!(
                    "must be at most {} (clients expect a heartbeat every 30s at the latest), got {}",
                    show(MAX_HEARTBEAT),
                    show(heartbeat)
                ),
            ));
        }
        let client_idle = raw.client_idle.unwrap_or(DEFAULT_CLIENT_IDLE);
        if client_idle.is_zero() {
            return Err(self.error(&keys(&["server", "client_idle"]), "must be longer than 0s"));
        }
        let (drain_delay, drain_spread, shutdown_grace) = self.stop_timings(&raw)?;
        Ok(ServerConfig {
            listen,
            public_url,
            heartbeat,
            client_idle,
            drain_delay,
            drain_spread,
            shutdown_grace,
        })
    }

    /// `drain_delay`, `drain_spread` (both may be 0s) and `shutdown_grace`, which must
    /// leave room after them to close the upstream channels and retire their tokens.
    fn stop_timings(&self, raw: &RawServer) -> Result<(Duration, Duration, Duration), ConfigError> {
        let delay = raw.drain_delay.unwrap_or(DEFAULT_DRAIN_DELAY);
        let spread = raw.drain_spread.unwrap_or(DEFAULT_DRAIN_SPREAD);
        let grace = raw.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        if grace <= delay + spread {
            return Err(self.error(
                &keys(&["server", "shutdown_grace"]),
                format!(
                    "must be longer than server.drain_delay + server.drain_spread ({}): the drain must fit in it, got {}",
                    show(delay + spread),
                    show(grace)
                ),
            ));
        }
        Ok((delay, spread, grace))
    }

    fn genesys(&self, raw: RawGenesys) -> Result<GenesysConfig, ConfigError> {
        let region = match raw.region {
            Some(region) => Some(self.region(&region)?),
            None => None,
        };
        let resolve = |key: &str, given: Option<String>, host: &str| match (given, &region) {
            (Some(url), _) => self.url(&keys(&["genesys", key]), &url, &["http", "https"]),
            (None, Some(region)) => Ok(format!("https://{host}.{region}")),
            (None, None) => Err(self.error(
                &keys(&["genesys", key]),
                "missing: set genesys.region, or both genesys.login_url and genesys.api_url",
            )),
        };
        let login_url = resolve("login_url", raw.login_url, "login")?;
        let api_url = resolve("api_url", raw.api_url, "api")?;
        Ok(GenesysConfig { login_url, api_url })
    }

    fn region(&self, region: &str) -> Result<String, ConfigError> {
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        let trimmed = region.trim();
        if trimmed.is_empty() || !trimmed.split('.').all(valid_label) {
            return Err(self.error(
                &keys(&["genesys", "region"]),
                format!(
                    "expected a Genesys Cloud domain such as \"mypurecloud.com\" or \"mypurecloud.de\", without scheme or path, got {region:?}"
                ),
            ));
        }
        Ok(trimmed.to_ascii_lowercase())
    }

    fn credentials(&self, raw: Vec<RawCredential>) -> Result<Vec<CredentialConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.error(
                &keys(&["credentials"]),
                "missing: at least one [[credentials]] entry is required",
            ));
        }
        let mut out: Vec<CredentialConfig> = Vec::with_capacity(raw.len());
        for (index, entry) in raw.into_iter().enumerate() {
            let name = entry.name;
            let name_key = credential_key(index, "name");
            let url_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if name.is_empty() || !name.chars().all(url_safe) {
                return Err(self.error(
                    &name_key,
                    format!(
                        "must be non-empty and URL-safe (letters, digits, '.', '_', '-'), got {name:?}"
                    ),
                ));
            }
            if let Some(first) = out.iter().position(|other| other.name == name) {
                return Err(self.error(
                    &name_key,
                    format!("duplicate name {name:?} (also credentials[{first}].name)"),
                ));
            }
            if entry.client_id.trim().is_empty() {
                return Err(self.error(&credential_key(index, "client_id"), "must not be empty"));
            }
            let secret = self.secret_source(
                index,
                entry.client_secret_file,
                entry.client_secret_env,
                entry.client_secret,
            )?;
            out.push(CredentialConfig {
                name,
                client_id: entry.client_id.trim().to_owned(),
                secret,
            });
        }
        Ok(out)
    }

    fn secret_source(
        &self,
        index: usize,
        file: Option<PathBuf>,
        env: Option<String>,
        inline: Option<String>,
    ) -> Result<SecretSource, ConfigError> {
        let given: Vec<&str> = [
            file.as_ref().map(|_| "client_secret_file"),
            env.as_ref().map(|_| "client_secret_env"),
            inline.as_ref().map(|_| "client_secret"),
        ]
        .into_iter()
        .flatten()
        .collect();
        match given.as_slice() {
            [] => {
                return Err(self.error(
                    &[Seg::Key("credentials".to_owned()), Seg::Index(index)],
                    "missing secret: set exactly one of client_secret_file, client_secret_env, client_secret",
                ));
            }
            [_] => {}
            [_, second, ..] => {
                return Err(self.error(
                    &credential_key(index, second),
                    format!(
                        "only one secret source may be set, got {}",
                        given.join(" and ")
                    ),
                ));
            }
        }
        if let Some(path) = file {
            if path.as_os_str().is_empty() {
                return Err(self.error(
                    &credential_key(index, "client_secret_file"),
                    "must not be empty",
                ));
            }
            return Ok(SecretSource::File(path));
        }
        if let Some(name) = env {
            let valid = !name.is_empty() && !name.contains(['=', '\0']);
            if !valid {
                return Err(self.error(
                    &credential_key(index, "client_secret_env"),
                    format!("expected an environment variable name, got {name:?}"),
                ));
            }
            return Ok(SecretSource::Env(name));
        }
        let secret = inline.unwrap_or_default();
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(self.error(&credential_key(index, "client_secret"), "must not be empty"));
        }
        Ok(SecretSource::Inline(Secret(secret.to_owned())))
    }

    fn handover(&self, raw: Option<RawHandover>) -> Result<HandoverConfig, ConfigError> {
        let (lead, overlap) = raw.map_or((None, None), |raw| (raw.lead, raw.overlap));
        let lead = lead.unwrap_or(DEFAULT_LEAD);
        let overlap = overlap.unwrap_or(DEFAULT_OVERLAP);
        if lead.is_zero() {
            return Err(self.error(&keys(&["handover", "lead"]), "must be longer than 0s"));
        }
        let overlap_key = keys(&["handover", "overlap"]);
        if overlap.is_zero() {
            return Err(self.error(
                &overlap_key,
                "must be longer than 0s (the old socket must outlive the switch: overlap, never gap)",
            ));
        }
        if overlap >= lead {
            return Err(self.error(
                &overlap_key,
                format!(
                    "must be shorter than handover.lead ({}), got {}",
                    show(lead),
                    show(overlap)
                ),
            ));
        }
        Ok(HandoverConfig { lead, overlap })
    }

    fn upstream(&self, raw: Option<RawUpstream>) -> Result<UpstreamConfig, ConfigError> {
        let (max_channels, max_topics, heartbeat, idle) =
            raw.map_or((None, None, None, None), |raw| {
                (
                    raw.max_channels,
                    raw.max_topics_per_channel,
                    raw.heartbeat,
                    raw.idle_channel_timeout,
                )
            });
        let heartbeat = heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
        if heartbeat.is_zero() {
            return Err(self.error(&keys(&["upstream", "heartbeat"]), "must be longer than 0s"));
        }
        let idle_channel_timeout = idle.unwrap_or(DEFAULT_IDLE_CHANNEL_TIMEOUT);
        if idle_channel_timeout.is_zero() {
            return Err(self.error(
                &keys(&["upstream", "idle_channel_timeout"]),
                "must be longer than 0s",
            ));
        }
        let max_channels = max_channels.unwrap_or(DEFAULT_MAX_CHANNELS);
        let channels_key = keys(&["upstream", "max_channels"]);
        if max_channels < MIN_MAX_CHANNELS {
            return Err(self.error(
                &channels_key,
                format!(
                    "must be at least {MIN_MAX_CHANNELS} (one slot is kept free for handovers), got {max_channels}"
                ),
            ));
        }
        if max_channels > GENESYS_CHANNELS_PER_CLIENT {
            return Err(self.error(
                &channels_key,
                format!(
                    "must be at most {GENESYS_CHANNELS_PER_CLIENT} (Genesys evicts an OAuth client's oldest channel beyond 20), got {max_channels}"
                ),
            ));
        }
        let max_topics_per_channel = max_topics.unwrap_or(MAX_TOPICS_PER_CHANNEL);
        if !(1..=MAX_TOPICS_PER_CHANNEL).contains(&max_topics_per_channel) {
            return Err(self.error(
                &keys(&["upstream", "max_topics_per_channel"]),
                format!(
                    "must be between 1 and {MAX_TOPICS_PER_CHANNEL} (Genesys' limit per channel), got {max_topics_per_channel}"
                ),
            ));
        }
        Ok(UpstreamConfig {
            max_channels,
            max_topics_per_channel,
            heartbeat,
            idle_channel_timeout,
        })
    }

    fn socket_addr(&self, path: &[Seg], value: &str) -> Result<SocketAddr, ConfigError> {
        value.trim().parse().map_err(|_| {
            self.error(
                path,
                format!(
                    "expected an IP address and port such as \"127.0.0.1:8080\" or \"[::1]:8080\", got {value:?}"
                ),
            )
        })
    }

    /// Checks an absolute URL with one of `schemes`, a host, no credentials, query or
    /// fragment; returns it normalised, without a trailing `/`.
    fn url(&self, path: &[Seg], value: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let expected = schemes
            .iter()
            .map(|scheme| format!("{scheme}://"))
            .collect::<Vec<_>>()
            .join(" or ");
        let expected = format!("URL starting with {expected}");
        let parsed = url::Url::parse(value.trim()).map_err(|error| {
            self.error(
                path,
                format!("expected an absolute {expected}, got {value:?} ({error})"),
            )
        })?;
        if !schemes.contains(&parsed.scheme()) {
            return Err(self.error(path, format!("expected a {expected}, got {value:?}")));
        }
        if parsed.host().is_none() {
            return Err(self.error(path, format!("expected a URL with a host, got {value:?}")));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Not echoed: the value holds credentials.
            return Err(self.error(path, "must not carry a user name or password"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(self.error(
                path,
                format!("must not have a query or fragment, got {value:?}"),
            ));
        }
        Ok(parsed.as_str().trim_end_matches('/').to_owned())
    }
}

fn show(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const FULL: &str = r#"
[server]
listen = "127.0.0.1:8080"
public_url = "wss://proxy.example.com/"
heartbeat = "20s"
client_idle = "90s"

[admin]
listen = "127.0.0.1:9090"

[genesys]
region = "mypurecloud.de"

[[credentials]]
name = "primary"
client_id = "id-a"
client_secret_file = "/run/secrets/genesys/primary"

[[credentials]]
name = "secondary"
client_id = "id-b"
client_secret_env = "GENESYS_SECRET_B"

[handover]
lead = "4m"
overlap = "3s"

[upstream]
max_channels = 6
max_topics_per_channel = 500
"#;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
[genesys]
region = "mypurecloud.com"
[[credentials]]
name = "primary"
client_id = "id"
client_secret = "inline-secret-value"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "test.toml")
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn temp_path(tag: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!(
            "handover-config-test-{tag}-{}-{nanos}-{n}",
            std::process::id()
        ))
    }

    #[test]
    fn full_config_parses() {
        let config = parse(FULL).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.server.public_url, "wss://proxy.example.com");
        assert_eq!(config.server.heartbeat, Duration::from_secs(20));
        assert_eq!(config.server.client_idle, Duration::from_secs(90));
        assert_eq!(config.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.genesys.login_url, "https://login.mypurecloud.de");
        assert_eq!(config.genesys.api_url, "https://api.mypurecloud.de");
        assert_eq!(config.credentials.len(), 2);
        assert_eq!(config.credentials[0].name, "primary");
        assert_eq!(config.credentials[0].client_id, "id-a");
        assert_eq!(
            config.credentials[0].secret,
            SecretSource::File(PathBuf::from("/run/secrets/genesys/primary"))
        );
        assert_eq!(config.credentials[1].name, "secondary");
        assert_eq!(
            config.credentials[1].secret,
            SecretSource::Env("GENESYS_SECRET_B".to_owned())
        );
        assert_eq!(config.handover.lead, Duration::from_secs(240));
        assert_eq!(config.handover.overlap, Duration::from_secs(3));
        assert_eq!(config.upstream.max_channels, 6);
        assert_eq!(config.upstream.max_topics_per_channel, 500);
    }

    #[test]
    fn defaults_fill_in() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.public_url, "ws://127.0.0.1:8080");
        assert_eq!(config.server.heartbeat, Duration::from_secs(30));
        assert_eq!(config.server.client_idle, Duration::from_secs(60));
        assert_eq!(config.handover, HandoverConfig::default());
        assert_eq!(config.handover.lead, Duration::from_secs(300));
        assert_eq!(config.handover.overlap, Duration::from_secs(2));
        assert_eq!(config.upstream, UpstreamConfig::default());
        assert_eq!(config.upstream.max_channels, 4);
        assert_eq!(config.upstream.max_topics_per_channel, 1000);
        assert_eq!(
            config.credentials[0].secret,
            SecretSource::Inline(Secret::from("inline-secret-value"))
        );
        // Parsing is deterministic, so reload diffs compare equal.
        assert_eq!(config, parse(MINIMAL).unwrap());
    }

    #[test]
    fn ipv6_listen_gives_bracketed_default_public_url() {
        let text = MINIMAL.replace("listen = \"127.0.0.1:8080\"", "listen = \"[::1]:8080\"");
        assert_eq!(parse(&text).unwrap().server.public_url, "ws://[::1]:8080");
    }

    #[test]
    fn listeners_must_differ_unless_port_zero() {
        let text = MINIMAL.replace("\"127.0.0.1:9090\"", "\"127.0.0.1:8080\"");
        assert!(error(&text).starts_with("test.toml: admin.listen: must differ"));
        let text = MINIMAL
            .replace("127.0.0.1:9090", "127.0.0.1:0")
            .replace("127.0.0.1:8080", "127.0.0.1:0");
        assert_eq!(parse(&text).unwrap().admin.listen.port(), 0);
    }

    #[test]
    fn region_resolves_to_both_urls() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.genesys.login_url, "https://login.mypurecloud.com");
        assert_eq!(config.genesys.api_url, "https://api.mypurecloud.com");
    }

    #[test]
    fn login_url_override_wins_over_region() {
        let text = MINIMAL.replace(
            "region = \"mypurecloud.com\"",
            "region = \"mypurecloud.com\"\nlogin_url = \"http://127.0.0.1:9000/\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.genesys.login_url, "http://127.0.0.1:9000");
        assert_eq!(config.genesys.api_url, "https://api.mypurecloud.com");
    }

    #[test]
    fn api_url_override_wins_over_region() {
        let text = MINIMAL.replace(
            "region = \"mypurecloud.com\"",
            "region = \"mypurecloud.com\"\napi_url = \"http://127.0.0.1:9001/gateway/\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.genesys.login_url, "https://login.mypurecloud.com");
        assert_eq!(config.genesys.api_url, "http://127.0.0.1:9001/gateway");
    }

    #[test]
    fn both_overrides_without_region() {
        let text = MINIMAL.replace(
            "region = \"mypurecloud.com\"",
            "login_url = \"http://127.0.0.1:9000\"\napi_url = \"http://127.0.0.1:9000\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.genesys.login_url, "http://127.0.0.1:9000");
        assert_eq!(config.genesys.api_url, "http://127.0.0.1:9000");
    }

    #[test]
    fn one_override_without_region_is_refused() {
        let text = MINIMAL.replace(
            "region = \"mypurecloud.com\"",
            "login_url = \"http://127.0.0.1:9000\"",
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: genesys.api_url: missing"),
            "{message}"
        );
    }

    #[test]
    fn bad_region_and_urls_are_refused() {
        let text = MINIMAL.replace("\"mypurecloud.com\"", "\"https://mypurecloud.com\"");
        let message = error(&text);
        assert!(message.contains("genesys.region"), "{message}");
        let text = MINIMAL.replace(
            "region = \"mypurecloud.com\"",
            "region = \"mypurecloud.com\"\napi_url = \"ftp://example.com\"",
        );
        let message = error(&text);
        assert!(message.contains("genesys.api_url"), "{message}");
        let text = MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\npublic_url = \"http://example.com\"",
        );
        let message = error(&text);
        assert!(message.contains("server.public_url"), "{message}");
        let text = MINIMAL.replace(
            "region = \"mypurecloud.com\"",
            "region = \"mypurecloud.com\"\nlogin_url = \"https://user:hunter2@example.com\"",
        );
        let message = error(&text);
        assert!(message.contains("genesys.login_url"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn unknown_key_is_refused_and_named() {
        let text = format!("{MINIMAL}\n[upstream]\nmax_channel = 3\n");
        let message = error(&text);
        assert!(message.contains("max_channel"), "{message}");
        assert!(
            message.starts_with("test.toml: upstream.max_channel: "),
            "{message}"
        );
        assert!(message.contains("(line 14)"), "{message}");
    }

    #[test]
    fn unknown_keys_at_every_level_are_named() {
        let message = error(&format!("{MINIMAL}\n[upstreams]\nmax_channels = 3\n"));
        assert!(message.starts_with("test.toml: upstreams: "), "{message}");
        let text = MINIMAL.replace(
            "client_id = \"id\"",
            "client_id = \"id\"\nclient_secert = \"x\"",
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: credentials[0].client_secert: unknown field"),
            "{message}"
        );
        let text = MINIMAL.replace("[admin]", "[admin]\nport = 9090");
        let message = error(&text);
        assert!(message.starts_with("test.toml: admin.port: "), "{message}");
    }

    #[test]
    fn wrong_types_and_missing_keys_name_the_key() {
        let message = error(&format!("{MINIMAL}\n[upstream]\nmax_channels = \"four\"\n"));
        assert!(
            message.starts_with("test.toml: upstream.max_channels: "),
            "{message}"
        );
        let message = error(&format!("{MINIMAL}\n[handover]\nlead = \"5 parsecs\"\n"));
        assert!(message.contains("\"90s\""), "{message}");
        let message = error(&format!("upstream = 3\n{MINIMAL}"));
        assert!(message.starts_with("test.toml: upstream: "), "{message}");
        assert!(
            message.contains("expected an [upstream] table"),
            "{message}"
        );
        let message = error(&format!("{MINIMAL}\n[handover]\nlead = \"5 parsecs\"\n"));
        assert!(
            message.starts_with("test.toml: handover.lead: "),
            "{message}"
        );
        let text = MINIMAL.replace("client_id = \"id\"\n", "");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: credentials[0]: "),
            "{message}"
        );
        assert!(message.contains("client_id"), "{message}");
        let text = MINIMAL.replace("[server]\nlisten = \"127.0.0.1:8080\"\n", "");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: server: missing"),
            "{message}"
        );
        let text = MINIMAL.replace("\"127.0.0.1:9090\"", "\"localhost:9090\"");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: admin.listen: "),
            "{message}"
        );
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let message = error("[server]\nlisten = \n");
        assert!(
            message.starts_with("test.toml: line 2, column"),
            "{message}"
        );
    }

    #[test]
    fn max_channels_one_is_refused() {
        let message = error(&format!("{MINIMAL}\n[upstream]\nmax_channels = 1\n"));
        assert_eq!(
            message,
            "test.toml: upstream.max_channels: must be at least 2 (one slot is kept free for handovers), got 1 (line 14)"
        );
        let message = error(&format!("{MINIMAL}\n[upstream]\nmax_channels = 21\n"));
        assert!(message.contains("upstream.max_channels"), "{message}");
        let message = error(&format!(
            "{MINIMAL}\n[upstream]\nmax_topics_per_channel = 0\n"
        ));
        assert!(
            message.contains("upstream.max_topics_per_channel"),
            "{message}"
        );
        let message = error(&format!(
            "{MINIMAL}\n[upstream]\nmax_topics_per_channel = 1001\n"
        ));
        assert!(
            message.contains("upstream.max_topics_per_channel"),
            "{message}"
        );
    }

    #[test]
    fn durations_are_bounded() {
        let message = error(&MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nheartbeat = \"31s\"",
        ));
        assert!(message.contains("server.heartbeat"), "{message}");
        let message = error(&MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nheartbeat = \"0s\"",
        ));
        assert!(message.contains("server.heartbeat"), "{message}");
        let message = error(&format!(
            "{MINIMAL}\n[handover]\nlead = \"1s\"\noverlap = \"2s\"\n"
        ));
        assert!(message.contains("handover.overlap"), "{message}");
    }

    #[test]
    fn zero_secret_sources_are_refused() {
        let text = MINIMAL.replace("client_secret = \"inline-secret-value\"\n", "");
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: credentials[0]: missing secret"),
            "{message}"
        );
    }

    #[test]
    fn two_secret_sources_are_refused() {
        let text = MINIMAL.replace(
            "client_secret = \"inline-secret-value\"",
            "client_secret = \"inline-secret-value\"\nclient_secret_file = \"/tmp/x\"",
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: credentials[0].client_secret: only one secret source"),
            "{message}"
        );
        assert!(message.contains("client_secret_file"), "{message}");
        assert!(!message.contains("inline-secret-value"), "{message}");
    }

    #[test]
    fn non_string_inline_secret_is_not_echoed() {
        let text = MINIMAL.replace("\"inline-secret-value\"", "987654321");
        let message = error(&text);
        assert!(
            message.contains("credentials[0].client_secret"),
            "{message}"
        );
        assert!(!message.contains("987654321"), "{message}");
    }

    #[test]
    fn duplicate_credential_names_are_refused() {
        let text = format!(
            "{MINIMAL}\n[[credentials]]\nname = \"primary\"\nclient_id = \"other\"\nclient_secret_env = \"X\"\n"
        );
        let message = error(&text);
        assert!(
            message.starts_with("test.toml: credentials[1].name: duplicate"),
            "{message}"
        );
        assert!(message.contains("primary"), "{message}");
    }

    #[test]
    fn credential_names_must_be_url_safe() {
        let text = MINIMAL.replace("name = \"primary\"", "name = \"a/b\"");
        let message = error(&text);
        assert!(message.contains("credentials[0].name"), "{message}");
        let text = MINIMAL.replace("name = \"primary\"", "name = \"\"");
        assert!(error(&text).contains("credentials[0].name"));
    }

    #[test]
    fn no_credentials_are_refused() {
        let end = MINIMAL.find("[[credentials]]").unwrap();
        let message = error(&MINIMAL[..end]);
        assert!(
            message.starts_with("test.toml: credentials: missing"),
            "{message}"
        );
    }

    #[test]
    fn secret_file_is_trimmed_and_reread() {
        let path = temp_path("reread");
        std::fs::write(&path, "  first-secret\n").unwrap();
        let source = SecretSource::File(path.clone());
        assert_eq!(source.read().unwrap().expose(), "first-secret");
        std::fs::write(&path, "\tsecond-secret \r\n").unwrap();
        assert_eq!(source.read().unwrap().expose(), "second-secret");
        std::fs::write(&path, " \n").unwrap();
        let message = source.read().unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn missing_secret_file_error_names_the_path() {
        let path = temp_path("missing");
        let error = SecretSource::File(path.clone()).read().unwrap_err();
        assert!(matches!(error, SecretError::ReadFile { .. }));
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn env_secret_errors_name_the_variable() {
        // A name no one sets; reading the environment is safe alongside other tests.
        let name = format!("HANDOVER_CONFIG_TEST_UNSET_{}", std::process::id());
        let message = SecretSource::Env(name.clone())
            .read()
            .unwrap_err()
            .to_string();
        assert!(message.contains(&name), "{message}");
    }

    #[test]
    fn inline_secret_reads_and_is_redacted() {
        let config = parse(MINIMAL).unwrap();
        let secret = config.credentials[0].secret.read().unwrap();
        assert_eq!(secret.expose(), "inline-secret-value");
        assert_eq!(format!("{secret}"), "<redacted>");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        let debug = format!("{config:?} {config:#?}");
        assert!(!debug.contains("inline-secret-value"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn load_reads_a_file_and_names_it_in_errors() {
        let path = temp_path("load");
        std::fs::write(&path, MINIMAL).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.credentials[0].name, "primary");
        std::fs::write(&path, format!("{MINIMAL}\n[upstream]\nmax_channels = 1\n")).unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.starts_with(&format!("{}: upstream.max_channels", path.display())));
        std::fs::remove_file(&path).unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn stop_timings_and_log_format_default_and_parse() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.drain_delay, Duration::from_secs(5));
        assert_eq!(config.server.drain_spread, Duration::from_secs(10));
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.log.format, LogFormat::Text);
        let text = MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\ndrain_delay = \"0s\"\ndrain_spread = \"1m\"\nshutdown_grace = \"90s\"",
        ) + "[log]\nformat = \"json\"\n";
        let config = parse(&text).unwrap();
        assert_eq!(config.server.drain_delay, Duration::ZERO);
        assert_eq!(config.server.drain_spread, Duration::from_secs(60));
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(90));
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn the_drain_must_fit_in_the_shutdown_grace() {
        let text = MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\ndrain_spread = \"30s\"",
        );
        assert_eq!(
            error(&text),
            "test.toml: server.shutdown_grace: must be longer than server.drain_delay + server.drain_spread (35s): the drain must fit in it, got 30s (line 2)"
        );
        let message = error(&format!("{MINIMAL}[log]\nformat = \"yaml\"\n"));
        assert!(message.starts_with("test.toml: log.format: "), "{message}");
        assert!(message.contains("json"), "{message}");
        let message = error(&format!("{MINIMAL}[log]\nlevel = \"debug\"\n"));
        assert!(
            message.starts_with("test.toml: log.level: unknown field"),
            "{message}"
        );
        let message = error(&MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\ndrain_delay = \"soon\"",
        ));
        assert!(
            message.starts_with("test.toml: server.drain_delay: "),
            "{message}"
        );
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/handover.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.credentials[0].name, "primary");
    }
}
