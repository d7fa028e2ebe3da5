//! The document as written, every value with its place in the text
//! (`toml::Spanned`), so that validation can say which line a bad value is on.
//! Addresses and URLs stay strings here, checked in `validate` for better messages;
//! durations are humantime strings (`"90s"`, `"5m"`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::LogFormat;

/// A humantime duration.
#[derive(Deserialize, Clone, Copy)]
#[serde(transparent)]
pub(super) struct Dur(#[serde(with = "humantime_serde")] pub Duration);

pub(super) type Value<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a TOML document of tables")]
pub(super) struct RawConfig {
    pub server: Value<RawServer>,
    pub admin: Value<RawAdmin>,
    pub genesys: Value<RawGenesys>,
    pub credentials: Value<Vec<Spanned<RawCredential>>>,
    pub handover: Value<RawHandover>,
    pub upstream: Value<RawUpstream>,
    pub cluster: Value<RawCluster>,
    pub log: Value<RawLog>,
    pub topics: Value<RawTopics>,
    pub limits: Value<RawLimits>,
}

/// A list whose every entry keeps its place, so that an error names the entry's line.
pub(super) type List = Value<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [server] table")]
pub(super) struct RawServer {
    pub listen: Spanned<String>,
    pub public_url: Value<String>,
    pub heartbeat: Value<Dur>,
    pub client_idle: Value<Dur>,
    pub drain_delay: Value<Dur>,
    pub drain_spread: Value<Dur>,
    pub shutdown_grace: Value<Dur>,
    pub allowed_origins: List,
    pub allowed_hosts: List,
    pub trusted_proxies: List,
    pub proxy_protocol: Value<bool>,
    pub max_connections: Value<usize>,
    pub header_read_timeout: Value<Dur>,
    pub body_read_timeout: Value<Dur>,
    pub keep_alive_idle: Value<Dur>,
    pub tls: Value<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [server.tls] table")]
pub(super) struct RawTls {
    pub cert_file: Spanned<PathBuf>,
    pub key_file: Spanned<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [admin] table")]
pub(super) struct RawAdmin {
    pub listen: Spanned<String>,
    pub token_file: Value<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [genesys] table")]
pub(super) struct RawGenesys {
    pub region: Value<String>,
    pub login_url: Value<String>,
    pub api_url: Value<String>,
    pub ca_file: Value<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[credentials]] table")]
pub(super) struct RawCredential {
    pub name: Spanned<String>,
    pub client_id: Spanned<String>,
    pub client_secret_file: Value<PathBuf>,
    pub client_secret_env: Value<String>,
    pub client_secret: Value<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [handover] table")]
pub(super) struct RawHandover {
    pub lead: Value<Dur>,
    pub overlap: Value<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [log] table")]
pub(super) struct RawLog {
    pub format: Option<LogFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [cluster] table")]
pub(super) struct RawCluster {
    pub redis_url: Spanned<String>,
    pub password_file: Value<PathBuf>,
    pub ca_file: Value<PathBuf>,
    pub key_prefix: Value<String>,
    pub local_share: Value<usize>,
    pub history_max_len: Value<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [upstream] table")]
pub(super) struct RawUpstream {
    pub max_channels: Value<usize>,
    pub max_topics_per_channel: Value<usize>,
    pub foreign_check_interval: Value<Dur>,
    pub heartbeat: Value<Dur>,
    pub idle_channel_timeout: Value<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [topics] table")]
pub(super) struct RawTopics {
    pub allow: List,
    pub deny: List,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [limits] table")]
pub(super) struct RawLimits {
    pub exempt: List,
    pub channels_per_peer: Value<usize>,
    pub sockets_per_peer: Value<usize>,
    pub topics_per_peer: Value<usize>,
    pub subscription_calls_per_minute: Value<u32>,
    pub upstream_share_percent: Value<u8>,
}
