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
    pub log: Value<RawLog>,
}

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [admin] table")]
pub(super) struct RawAdmin {
    pub listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [genesys] table")]
pub(super) struct RawGenesys {
    pub region: Value<String>,
    pub login_url: Value<String>,
    pub api_url: Value<String>,
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
#[serde(deny_unknown_fields, expecting = "an [upstream] table")]
pub(super) struct RawUpstream {
    pub max_channels: Value<usize>,
    pub max_topics_per_channel: Value<usize>,
    pub heartbeat: Value<Dur>,
    pub idle_channel_timeout: Value<Dur>,
}
