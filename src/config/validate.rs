//! From the document as written to a [`Config`]: defaults filled in, bounds checked,
//! Genesys URLs derived from the region. Every error names the key and, from the
//! value's span, its line.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::locate::line_column;
use super::raw::{
    Dur, List, RawCluster, RawConfig, RawCredential, RawGenesys, RawHandover, RawLimits, RawServer,
    RawTls, RawTopics, RawUpstream, Value,
};
use super::*;
use crate::front::origin::{canonical_host, canonical_origin};
use crate::front::topics::Pattern;

/// Where the text is, for errors.
pub(super) struct Ctx<'a> {
    pub origin: &'a str,
    pub text: &'a str,
}

fn span<T>(value: &Value<T>) -> Option<Range<usize>> {
    value.as_ref().map(Spanned::span)
}

/// An address (`10.0.0.5`) or a network (`10.0.0.0/8`).
fn network(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!("expected an address or a network such as \"10.0.0.0/8\", got {text:?}")
        })
}

/// A duration as given, or its default.
fn duration(value: &Value<Dur>, default: Duration) -> Duration {
    value.as_ref().map_or(default, |d| d.get_ref().0)
}

fn show(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(duration)
}

impl Ctx<'_> {
    fn error(
        &self,
        key: impl Into<String>,
        at: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.into(),
            line: at.map(|span| line_column(self.text, span.start).0),
            message: message.into(),
        }
    }

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let missing = |section: &str| {
            self.error(
                section,
                None,
                format!("missing: the [{section}] table is required"),
            )
        };
        let server = raw.server.ok_or_else(|| missing("server"))?;
        let admin = raw.admin.ok_or_else(|| missing("admin"))?;
        let genesys = raw.genesys.ok_or_else(|| missing("genesys"))?;

        let server_at = server.span();
        let server = self.server(server.into_inner(), server_at)?;
        let admin_listen = &admin.get_ref().listen;
        let admin = AdminConfig {
            listen: self.socket_addr("admin.listen", admin_listen)?,
            token_file: self.path("admin.token_file", &admin.get_ref().token_file)?,
        };
        // Port 0 (tests) binds a fresh port each time, so equal addresses do not clash.
        if admin.listen == server.listen && admin.listen.port() != 0 {
            return Err(self.error(
                "admin.listen",
                Some(admin_listen.span()),
                format!(
                    "must differ from server.listen ({}): the admin listener is never on the client port",
                    server.listen
                ),
            ));
        }
        let genesys_span = genesys.span();
        let genesys = self.genesys(genesys.into_inner(), genesys_span)?;
        let credentials = self.credentials(raw.credentials)?;
        let handover = self.handover(raw.handover)?;
        let upstream = self.upstream(raw.upstream)?;
        let cluster = match raw.cluster {
            Some(cluster) => Some(self.cluster(cluster.into_inner(), &upstream)?),
            None => None,
        };
        let log = LogConfig {
            format: raw
                .log
                .and_then(|log| log.into_inner().format)
                .unwrap_or_default(),
        };
        let topics = self.topics(raw.topics)?;
        let limits = self.limits(raw.limits)?;
        Ok(Config {
            server,
            admin,
            genesys,
            credentials,
            handover,
            upstream,
            cluster,
            log,
            topics,
            limits,
        })
    }

    fn server(&self, raw: RawServer, at: Range<usize>) -> Result<ServerConfig, ConfigError> {
        let listen = self.socket_addr("server.listen", &raw.listen)?;
        let tls = self.tls(&raw.tls)?;
        let public_url = match &raw.public_url {
            Some(url) => {
                let checked = self.url("server.public_url", url, &["ws", "wss"])?;
                if tls.is_some() && checked.starts_with("ws://") {
                    return Err(self.error(
                        "server.public_url",
                        Some(url.span()),
                        "must be a wss:// URL when [server.tls] is set (desktops connect with TLS)",
                    ));
                }
                checked
            }
            None if tls.is_some() => format!("wss://{listen}"),
            None => format!("ws://{listen}"),
        };
        let heartbeat = duration(&raw.heartbeat, DEFAULT_HEARTBEAT);
        if heartbeat.is_zero() {
            return Err(self.error(
                "server.heartbeat",
                span(&raw.heartbeat),
                "must be longer than 0s",
            ));
        }
        if heartbeat > MAX_HEARTBEAT {
            return Err(self.error(
                "server.heartbeat",
                span(&raw.heartbeat),
                format!(
                    "must be at most {} (clients expect a heartbeat every 30s at the latest), got {}",
                    show(MAX_HEARTBEAT),
                    show(heartbeat)
                ),
            ));
        }
        let client_idle = duration(&raw.client_idle, DEFAULT_CLIENT_IDLE);
        if client_idle.is_zero() {
            return Err(self.error(
                "server.client_idle",
                span(&raw.client_idle),
                "must be longer than 0s",
            ));
        }
        let (drain_delay, drain_spread, shutdown_grace) = self.stop_timings(&raw, at)?;
        let allowed_origins =
            self.list("server.allowed_origins", &raw.allowed_origins, |text| {
                canonical_origin(text).map_err(|why| {
                    format!(
                        "expected a browser origin such as \"https://apps.mypurecloud.com\": {why}"
                    )
                })
            })?;
        let mut host_names = Vec::new();
        if let Some(host) = url::Url::parse(&public_url)
            .ok()
            .and_then(|url| url.domain().map(str::to_ascii_lowercase))
        {
            host_names.push(host);
        }
        for name in self.list("server.allowed_hosts", &raw.allowed_hosts, canonical_host)? {
            if !host_names.contains(&name) {
                host_names.push(name);
            }
        }
        let trusted_proxies = self.list("server.trusted_proxies", &raw.trusted_proxies, network)?;
        let proxy_protocol = raw.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref());
        if proxy_protocol && trusted_proxies.is_empty() {
            return Err(self.error(
                "server.proxy_protocol",
                span(&raw.proxy_protocol),
                "needs server.trusted_proxies: only the load balancers listed there may send a PROXY header",
            ));
        }
        let max_connections = raw
            .max_connections
            .as_ref()
            .map_or(DEFAULT_MAX_CONNECTIONS, |m| *m.get_ref());
        if !(1..=MAX_MAX_CONNECTIONS).contains(&max_connections) {
            return Err(self.error(
                "server.max_connections",
                span(&raw.max_connections),
                format!("must be between 1 and {MAX_MAX_CONNECTIONS}, got {max_connections}"),
            ));
        }
        let positive = |key: &str, value: &Value<Dur>, default: Duration| {
            let duration = duration(value, default);
            if duration.is_zero() {
                return Err(self.error(key, span(value), "must be longer than 0s"));
            }
            Ok(duration)
        };
        let header_read_timeout = positive(
            "server.header_read_timeout",
            &raw.header_read_timeout,
            DEFAULT_HEADER_READ_TIMEOUT,
        )?;
        let body_read_timeout = positive(
            "server.body_read_timeout",
            &raw.body_read_timeout,
            DEFAULT_BODY_READ_TIMEOUT,
        )?;
        let keep_alive_idle = positive(
            "server.keep_alive_idle",
            &raw.keep_alive_idle,
            DEFAULT_KEEP_ALIVE_IDLE,
        )?;
        Ok(ServerConfig {
            listen,
            public_url,
            heartbeat,
            client_idle,
            drain_delay,
            drain_spread,
            shutdown_grace,
            allowed_origins,
            host_names,
            trusted_proxies,
            proxy_protocol,
            max_connections,
            header_read_timeout,
            body_read_timeout,
            keep_alive_idle,
            tls,
        })
    }

    fn tls(&self, raw: &Value<RawTls>) -> Result<Option<TlsFiles>, ConfigError> {
        let Some(raw) = raw.as_ref().map(Spanned::get_ref) else {
            return Ok(None);
        };
        let file = |key: &str, path: &Spanned<PathBuf>| {
            if path.get_ref().as_os_str().is_empty() {
                return Err(self.error(key, Some(path.span()), "must not be empty"));
            }
            Ok(path.get_ref().clone())
        };
        Ok(Some(TlsFiles {
            cert_file: file("server.tls.cert_file", &raw.cert_file)?,
            key_file: file("server.tls.key_file", &raw.key_file)?,
        }))
    }

    /// An optional, non-empty path.
    fn path(&self, key: &str, value: &Value<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
        match value {
            Some(path) if path.get_ref().as_os_str().is_empty() => {
                Err(self.error(key, Some(path.span()), "must not be empty"))
            }
            Some(path) => Ok(Some(path.get_ref().clone())),
            None => Ok(None),
        }
    }

    /// A list of strings, each checked by `check`; errors name the entry and its line.
    fn list<T>(
        &self,
        key: &str,
        raw: &List,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, ConfigError> {
        let Some(entries) = raw.as_ref() else {
            return Ok(Vec::new());
        };
        entries
            .get_ref()
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                check(entry.get_ref())
                    .map_err(|why| self.error(format!("{key}[{index}]"), Some(entry.span()), why))
            })
            .collect()
    }

    fn topics(&self, raw: Value<RawTopics>) -> Result<Policy, ConfigError> {
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return Ok(Policy::default());
        };
        let allow = match &raw.allow {
            Some(list) if list.get_ref().is_empty() => {
                return Err(self.error(
                    "topics.allow",
                    Some(list.span()),
                    "is empty, which would refuse every topic: list the topics desktops may read, or leave allow out to admit all",
                ));
            }
            Some(_) => Some(self.list("topics.allow", &raw.allow, Pattern::parse)?),
            None => None,
        };
        let deny = self.list("topics.deny", &raw.deny, Pattern::parse)?;
        Ok(Policy { allow, deny })
    }

    fn limits(&self, raw: Value<RawLimits>) -> Result<PeerLimits, ConfigError> {
        let defaults = PeerLimits::default();
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return Ok(defaults);
        };
        let at_least_one = |key: &str, value: &Value<usize>, default: usize| {
            let n = value.as_ref().map_or(default, |v| *v.get_ref());
            if n == 0 {
                return Err(self.error(key, span(value), "must be at least 1"));
            }
            Ok(n)
        };
        let calls = raw
            .subscription_calls_per_minute
            .as_ref()
            .map_or(defaults.calls_per_minute, |v| *v.get_ref());
        if calls == 0 {
            return Err(self.error(
                "limits.subscription_calls_per_minute",
                span(&raw.subscription_calls_per_minute),
                "must be at least 1",
            ));
        }
        let share = raw
            .upstream_share_percent
            .as_ref()
            .map_or(defaults.upstream_share_percent, |v| *v.get_ref());
        if !(1..=100).contains(&share) {
            return Err(self.error(
                "limits.upstream_share_percent",
                span(&raw.upstream_share_percent),
                format!("must be between 1 and 100 (percent), got {share}"),
            ));
        }
        let exempt = match raw.exempt {
            Some(_) => self.list("limits.exempt", &raw.exempt, network)?,
            None => defaults.exempt,
        };
        Ok(PeerLimits {
            exempt,
            channels: at_least_one(
                "limits.channels_per_peer",
                &raw.channels_per_peer,
                defaults.channels,
            )?,
            sockets: at_least_one(
                "limits.sockets_per_peer",
                &raw.sockets_per_peer,
                defaults.sockets,
            )?,
            topics: at_least_one(
                "limits.topics_per_peer",
                &raw.topics_per_peer,
                defaults.topics,
            )?,
            calls_per_minute: calls,
            upstream_share_percent: share,
        })
    }

    /// `drain_delay`, `drain_spread` (both may be 0s) and `shutdown_grace`, which must
    /// leave room after them to close the upstream channels and retire their tokens.
    fn stop_timings(
        &self,
        raw: &RawServer,
        table: Range<usize>,
    ) -> Result<(Duration, Duration, Duration), ConfigError> {
        let delay = duration(&raw.drain_delay, DEFAULT_DRAIN_DELAY);
        let spread = duration(&raw.drain_spread, DEFAULT_DRAIN_SPREAD);
        let grace = duration(&raw.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        if grace <= delay + spread {
            return Err(self.error(
                "server.shutdown_grace",
                span(&raw.shutdown_grace).or(Some(table)),
                format!(
                    "must be longer than server.drain_delay + server.drain_spread ({}): the drain must fit in it, got {}",
                    show(delay + spread),
                    show(grace)
                ),
            ));
        }
        Ok((delay, spread, grace))
    }

    fn genesys(&self, raw: RawGenesys, at: Range<usize>) -> Result<GenesysConfig, ConfigError> {
        let region = match &raw.region {
            Some(region) => Some(self.region(region)?),
            None => None,
        };
        let resolve = |key: &str, given: &Value<String>, host: &str| match (given, &region) {
            (Some(url), _) => self.url(&format!("genesys.{key}"), url, &["http", "https"]),
            (None, Some(region)) => Ok(format!("https://{host}.{region}")),
            (None, None) => Err(self.error(
                format!("genesys.{key}"),
                Some(at.clone()),
                "missing: set genesys.region, or both genesys.login_url and genesys.api_url",
            )),
        };
        let login_url = resolve("login_url", &raw.login_url, "login")?;
        let api_url = resolve("api_url", &raw.api_url, "api")?;
        let ca_file = self.path("genesys.ca_file", &raw.ca_file)?;
        Ok(GenesysConfig {
            login_url,
            api_url,
            ca_file,
        })
    }

    fn region(&self, region: &Spanned<String>) -> Result<String, ConfigError> {
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        let trimmed = region.get_ref().trim();
        if trimmed.is_empty() || !trimmed.split('.').all(valid_label) {
            return Err(self.error(
                "genesys.region",
                Some(region.span()),
                format!(
                    "expected a Genesys Cloud domain such as \"mypurecloud.com\" or \"mypurecloud.de\", without scheme or path, got {:?}",
                    region.get_ref()
                ),
            ));
        }
        Ok(trimmed.to_ascii_lowercase())
    }

    fn credentials(
        &self,
        raw: Value<Vec<Spanned<RawCredential>>>,
    ) -> Result<Vec<CredentialConfig>, ConfigError> {
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        if raw.is_empty() {
            return Err(self.error(
                "credentials",
                None,
                "missing: at least one [[credentials]] entry is required",
            ));
        }
        let mut out: Vec<CredentialConfig> = Vec::with_capacity(raw.len());
        for (index, entry) in raw.into_iter().enumerate() {
            let at = entry.span();
            let entry = entry.into_inner();
            let key = |name: &str| format!("credentials[{index}].{name}");
            let name = entry.name.get_ref().clone();
            let url_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if name.is_empty() || !name.chars().all(url_safe) {
                return Err(self.error(
                    key("name"),
                    Some(entry.name.span()),
                    format!(
                        "must be non-empty and URL-safe (letters, digits, '.', '_', '-'), got {name:?}"
                    ),
                ));
            }
            if let Some(first) = out.iter().position(|other| other.name == name) {
                return Err(self.error(
                    key("name"),
                    Some(entry.name.span()),
                    format!("duplicate name {name:?} (also credentials[{first}].name)"),
                ));
            }
            let client_id = entry.client_id.get_ref().trim();
            if client_id.is_empty() {
                return Err(self.error(
                    key("client_id"),
                    Some(entry.client_id.span()),
                    "must not be empty",
                ));
            }
            let secret = self.secret_source(index, at, &entry)?;
            out.push(CredentialConfig {
                name,
                client_id: client_id.to_owned(),
                secret,
            });
        }
        Ok(out)
    }

    fn secret_source(
        &self,
        index: usize,
        at: Range<usize>,
        entry: &RawCredential,
    ) -> Result<SecretSource, ConfigError> {
        let key = |name: &str| format!("credentials[{index}].{name}");
        let given: Vec<(&str, Option<Range<usize>>)> = [
            ("client_secret_file", span(&entry.client_secret_file)),
            ("client_secret_env", span(&entry.client_secret_env)),
            ("client_secret", span(&entry.client_secret)),
        ]
        .into_iter()
        .filter(|(_, at)| at.is_some())
        .collect();
        match given.as_slice() {
            [] => {
                return Err(self.error(
                    format!("credentials[{index}]"),
                    Some(at),
                    "missing secret: set exactly one of client_secret_file, client_secret_env, client_secret",
                ));
            }
            [_] => {}
            [_, (second, second_at), ..] => {
                let names: Vec<&str> = given.iter().map(|(name, _)| *name).collect();
                return Err(self.error(
                    key(second),
                    second_at.clone(),
                    format!(
                        "only one secret source may be set, got {}",
                        names.join(" and ")
                    ),
                ));
            }
        }
        if let Some(path) = &entry.client_secret_file {
            if path.get_ref().as_os_str().is_empty() {
                return Err(self.error(
                    key("client_secret_file"),
                    Some(path.span()),
                    "must not be empty",
                ));
            }
            return Ok(SecretSource::File(PathBuf::from(path.get_ref())));
        }
        if let Some(name) = &entry.client_secret_env {
            let value = name.get_ref();
            if value.is_empty() || value.contains(['=', '\0']) {
                return Err(self.error(
                    key("client_secret_env"),
                    Some(name.span()),
                    format!("expected an environment variable name, got {value:?}"),
                ));
            }
            return Ok(SecretSource::Env(value.clone()));
        }
        let secret = entry
            .client_secret
            .as_ref()
            .map_or("", |s| s.get_ref().trim());
        if secret.is_empty() {
            return Err(self.error(
                key("client_secret"),
                span(&entry.client_secret),
                "must not be empty",
            ));
        }
        Ok(SecretSource::Inline(Secret::from(secret)))
    }

    fn handover(&self, raw: Value<RawHandover>) -> Result<HandoverConfig, ConfigError> {
        let raw = raw.map(Spanned::into_inner);
        let (lead_at, overlap_at) = raw
            .as_ref()
            .map_or((None, None), |raw| (span(&raw.lead), span(&raw.overlap)));
        let lead = raw
            .as_ref()
            .map_or(DEFAULT_LEAD, |raw| duration(&raw.lead, DEFAULT_LEAD));
        let overlap = raw.as_ref().map_or(DEFAULT_OVERLAP, |raw| {
            duration(&raw.overlap, DEFAULT_OVERLAP)
        });
        if lead.is_zero() {
            return Err(self.error("handover.lead", lead_at, "must be longer than 0s"));
        }
        if overlap.is_zero() {
            return Err(self.error(
                "handover.overlap",
                overlap_at,
                "must be longer than 0s (the old socket must outlive the switch: overlap, never gap)",
            ));
        }
        if overlap >= lead {
            return Err(self.error(
                "handover.overlap",
                overlap_at,
                format!(
                    "must be shorter than handover.lead ({}), got {}",
                    show(lead),
                    show(overlap)
                ),
            ));
        }
        Ok(HandoverConfig { lead, overlap })
    }

    fn cluster(
        &self,
        raw: RawCluster,
        upstream: &UpstreamConfig,
    ) -> Result<ClusterConfig, ConfigError> {
        let (url_at, text) = (Some(raw.redis_url.span()), raw.redis_url.get_ref().trim());
        // The URL may hold a password: no message echoes it.
        let parsed = url::Url::parse(text).map_err(|error| {
            self.error(
                "cluster.redis_url",
                url_at.clone(),
                format!("expected a redis://, rediss:// or redis+unix:// URL ({error})"),
            )
        })?;
        let endpoint = match parsed.scheme() {
            "redis" | "rediss" => {
                let Some(host) = parsed.host_str() else {
                    return Err(self.error(
                        "cluster.redis_url",
                        url_at,
                        "expected a URL with a host, such as redis://redis:6379/0",
                    ));
                };
                let port = parsed.port().unwrap_or(6379);
                format!("{}://{host}:{port}{}", parsed.scheme(), parsed.path())
            }
            "redis+unix" | "unix" => {
                if parsed.path().is_empty() || parsed.path() == "/" {
                    return Err(self.error(
                        "cluster.redis_url",
                        url_at,
                        "expected the socket's path, such as redis+unix:///run/redis.sock",
                    ));
                }
                format!("redis+unix://{}", parsed.path())
            }
            scheme => {
                return Err(self.error(
                    "cluster.redis_url",
                    url_at,
                    format!(
                        "expected a redis://, rediss:// or redis+unix:// URL, got scheme {scheme:?}"
                    ),
                ));
            }
        };
        let key_prefix = raw
            .key_prefix
            .as_ref()
            .map_or(DEFAULT_KEY_PREFIX, |p| p.get_ref().as_str())
            .to_owned();
        if key_prefix.is_empty()
            || !key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(self.error(
                "cluster.key_prefix",
                span(&raw.key_prefix),
                format!("expected [A-Za-z0-9._-]+, got {key_prefix:?}"),
            ));
        }
        let local_share = raw
            .local_share
            .as_ref()
            .map_or(DEFAULT_LOCAL_SHARE, |s| *s.get_ref());
        if !(MIN_MAX_CHANNELS..=upstream.max_channels).contains(&local_share) {
            return Err(self.error(
                "cluster.local_share",
                span(&raw.local_share),
                format!(
                    "must be between {MIN_MAX_CHANNELS} (a channel and the slot for its handover) and upstream.max_channels ({}), got {local_share}",
                    upstream.max_channels
                ),
            ));
        }
        let history_max_len = raw
            .history_max_len
            .as_ref()
            .map_or(DEFAULT_HISTORY_MAX_LEN, |l| *l.get_ref());
        if history_max_len < MIN_HISTORY_MAX_LEN {
            return Err(self.error(
                "cluster.history_max_len",
                span(&raw.history_max_len),
                format!("must be at least {MIN_HISTORY_MAX_LEN}, got {history_max_len}"),
            ));
        }
        Ok(ClusterConfig {
            redis_url: Secret::from(text),
            endpoint,
            password_file: raw.password_file.map(Spanned::into_inner),
            ca_file: raw.ca_file.map(Spanned::into_inner),
            key_prefix,
            local_share,
            history_max_len,
        })
    }

    fn upstream(&self, raw: Value<RawUpstream>) -> Result<UpstreamConfig, ConfigError> {
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return Ok(UpstreamConfig::default());
        };
        let heartbeat = duration(&raw.heartbeat, DEFAULT_HEARTBEAT);
        if heartbeat.is_zero() {
            return Err(self.error(
                "upstream.heartbeat",
                span(&raw.heartbeat),
                "must be longer than 0s",
            ));
        }
        let idle_channel_timeout =
            duration(&raw.idle_channel_timeout, DEFAULT_IDLE_CHANNEL_TIMEOUT);
        if idle_channel_timeout.is_zero() {
            return Err(self.error(
                "upstream.idle_channel_timeout",
                span(&raw.idle_channel_timeout),
                "must be longer than 0s",
            ));
        }
        let max_channels = raw
            .max_channels
            .as_ref()
            .map_or(DEFAULT_MAX_CHANNELS, |m| *m.get_ref());
        let channels_at = span(&raw.max_channels);
        if max_channels < MIN_MAX_CHANNELS {
            return Err(self.error(
                "upstream.max_channels",
                channels_at,
                format!(
                    "must be at least {MIN_MAX_CHANNELS} (one slot is kept free for handovers), got {max_channels}"
                ),
            ));
        }
        if max_channels > GENESYS_CHANNELS_PER_CLIENT {
            return Err(self.error(
                "upstream.max_channels",
                channels_at,
                format!(
                    "must be at most {GENESYS_CHANNELS_PER_CLIENT} (Genesys evicts an OAuth client's oldest channel beyond 20), got {max_channels}"
                ),
            ));
        }
        let max_topics_per_channel = raw
            .max_topics_per_channel
            .as_ref()
            .map_or(MAX_TOPICS_PER_CHANNEL, |m| *m.get_ref());
        if !(1..=MAX_TOPICS_PER_CHANNEL).contains(&max_topics_per_channel) {
            return Err(self.error(
                "upstream.max_topics_per_channel",
                span(&raw.max_topics_per_channel),
                format!(
                    "must be between 1 and {MAX_TOPICS_PER_CHANNEL} (Genesys' limit per channel), got {max_topics_per_channel}"
                ),
            ));
        }
        let foreign_check_interval =
            duration(&raw.foreign_check_interval, DEFAULT_FOREIGN_CHECK_INTERVAL);
        if !(MIN_FOREIGN_CHECK_INTERVAL..=MAX_FOREIGN_CHECK_INTERVAL)
            .contains(&foreign_check_interval)
        {
            return Err(self.error(
                "upstream.foreign_check_interval",
                span(&raw.foreign_check_interval),
                format!(
                    "must be between {} and {}, got {}",
                    show(MIN_FOREIGN_CHECK_INTERVAL),
                    show(MAX_FOREIGN_CHECK_INTERVAL),
                    show(foreign_check_interval)
                ),
            ));
        }
        Ok(UpstreamConfig {
            max_channels,
            max_topics_per_channel,
            foreign_check_interval,
            heartbeat,
            idle_channel_timeout,
        })
    }

    fn socket_addr(&self, key: &str, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        value.get_ref().trim().parse().map_err(|_| {
            self.error(
                key,
                Some(value.span()),
                format!(
                    "expected an IP address and port such as \"127.0.0.1:8080\" or \"[::1]:8080\", got {:?}",
                    value.get_ref()
                ),
            )
        })
    }

    /// Checks an absolute URL with one of `schemes`, a host, no credentials, query or
    /// fragment; returns it normalised, without a trailing `/`.
    fn url(
        &self,
        key: &str,
        value: &Spanned<String>,
        schemes: &[&str],
    ) -> Result<String, ConfigError> {
        let (at, text) = (Some(value.span()), value.get_ref());
        let expected = schemes
            .iter()
            .map(|scheme| format!("{scheme}://"))
            .collect::<Vec<_>>()
            .join(" or ");
        let expected = format!("URL starting with {expected}");
        let parsed = url::Url::parse(text.trim()).map_err(|error| {
            self.error(
                key,
                at.clone(),
                format!("expected an absolute {expected}, got {text:?} ({error})"),
            )
        })?;
        if !schemes.contains(&parsed.scheme()) {
            return Err(self.error(key, at, format!("expected a {expected}, got {text:?}")));
        }
        if parsed.host().is_none() {
            return Err(self.error(key, at, format!("expected a URL with a host, got {text:?}")));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Not echoed: the value holds credentials.
            return Err(self.error(key, at, "must not carry a user name or password"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(self.error(
                key,
                at,
                format!("must not have a query or fragment, got {text:?}"),
            ));
        }
        Ok(parsed.as_str().trim_end_matches('/').to_owned())
    }
}
