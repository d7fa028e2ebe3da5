//! The config contract: every key, default, bound and error message.

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
fn the_foreign_check_interval_defaults_parses_and_is_bounded() {
    assert_eq!(
        parse(MINIMAL).unwrap().upstream.foreign_check_interval,
        Duration::from_secs(60)
    );
    let config = parse(&format!(
        "{MINIMAL}\n[upstream]\nforeign_check_interval = \"90s\"\n"
    ))
    .unwrap();
    assert_eq!(
        config.upstream.foreign_check_interval,
        Duration::from_secs(90)
    );
    for refused in ["500ms", "0s", "2h"] {
        let message = error(&format!(
            "{MINIMAL}\n[upstream]\nforeign_check_interval = \"{refused}\"\n"
        ));
        assert!(
            message.contains("upstream.foreign_check_interval") && message.contains("line"),
            "{message}"
        );
    }
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

/// MINIMAL with `lines` added to its `[server]` table.
fn with_server(lines: &str) -> String {
    MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        &format!("listen = \"127.0.0.1:8080\"\n{lines}"),
    )
}

#[test]
fn front_door_defaults() {
    let config = parse(MINIMAL).unwrap();
    let server = &config.server;
    assert!(server.allowed_origins.is_empty());
    assert!(
        server.host_names.is_empty(),
        "an IP public URL adds no name"
    );
    assert!(server.trusted_proxies.is_empty());
    assert!(!server.proxy_protocol);
    assert_eq!(server.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(server.body_read_timeout, Duration::from_secs(10));
    assert_eq!(server.keep_alive_idle, Duration::from_secs(60));
    assert_eq!(server.tls, None);
    assert_eq!(config.admin.token_file, None);
    assert_eq!(config.genesys.ca_file, None);
    assert!(!config.topics.restricts(), "no allow list: every topic");
    assert_eq!(config.limits, crate::front::limits::PeerLimits::default());
}

#[test]
fn front_door_keys_parse() {
    let text = format!(
        "{}\n[topics]\nallow = [\"v2.users.*.presence\"]\ndeny = [\"v2.users.7.presence\"]\n\
         [limits]\nchannels_per_peer = 3\nsockets_per_peer = 2\ntopics_per_peer = 10\n\
         subscription_calls_per_minute = 30\nupstream_share_percent = 50\nexempt = []\n",
        with_server(
            "public_url = \"wss://Handover.Example.com\"\n\
             allowed_origins = [\"https://Apps.MyPureCloud.com/\", \"chrome-extension://abcdef\"]\n\
             allowed_hosts = [\"handover.internal.\"]\n\
             trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\nproxy_protocol = true\n\
             max_connections = 500\nheader_read_timeout = \"4s\"\nbody_read_timeout = \"3s\"\n\
             keep_alive_idle = \"2s\"\n[server.tls]\ncert_file = \"/tls/tls.crt\"\nkey_file = \"/tls/tls.key\""
        )
        .replace(
            "[genesys]\nregion = \"mypurecloud.com\"",
            "[genesys]\nregion = \"mypurecloud.com\"\nca_file = \"/etc/corp-ca.pem\"",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:9090\"",
            "[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_file = \"/run/secrets/admin\"",
        )
    );
    let config = parse(&text).unwrap();
    let server = &config.server;
    assert_eq!(
        server.allowed_origins,
        ["https://apps.mypurecloud.com", "chrome-extension://abcdef"]
    );
    assert_eq!(
        server.host_names,
        ["handover.example.com", "handover.internal"]
    );
    assert_eq!(server.trusted_proxies.len(), 2);
    assert!(server.proxy_protocol);
    assert_eq!(server.max_connections, 500);
    assert_eq!(server.header_read_timeout, Duration::from_secs(4));
    assert_eq!(server.body_read_timeout, Duration::from_secs(3));
    assert_eq!(server.keep_alive_idle, Duration::from_secs(2));
    assert_eq!(
        server.tls,
        Some(TlsFiles {
            cert_file: "/tls/tls.crt".into(),
            key_file: "/tls/tls.key".into()
        })
    );
    assert_eq!(
        config.admin.token_file.as_deref(),
        Some(Path::new("/run/secrets/admin"))
    );
    assert_eq!(
        config.genesys.ca_file.as_deref(),
        Some(Path::new("/etc/corp-ca.pem"))
    );
    assert!(config.topics.admits("v2.users.42.presence"));
    assert!(!config.topics.admits("v2.users.7.presence"));
    assert!(!config.topics.admits("v2.users.42.conversations"));
    assert_eq!(config.limits.channels, 3);
    assert_eq!(config.limits.sockets, 2);
    assert_eq!(config.limits.topics, 10);
    assert_eq!(config.limits.calls_per_minute, 30);
    assert_eq!(config.limits.upstream_share_percent, 50);
    assert!(config.limits.exempt.is_empty());
}

#[test]
fn tls_makes_the_default_public_url_wss_and_refuses_ws() {
    let tls = "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"";
    let config = parse(&with_server(tls)).unwrap();
    assert_eq!(config.server.public_url, "wss://127.0.0.1:8080");
    let message = error(&with_server(&format!(
        "public_url = \"ws://proxy.example.com\"\n{tls}"
    )));
    assert!(
        message.starts_with("test.toml: server.public_url: must be a wss:// URL"),
        "{message}"
    );
    let message = error(&with_server("[server.tls]\ncert_file = \"c.pem\""));
    assert!(message.contains("key_file"), "{message}");
}

#[test]
fn bad_front_door_values_name_key_and_line() {
    for (lines, key) in [
        (
            "allowed_origins = [\"https://ok.example\", \"https://x.example/app\"]",
            "server.allowed_origins[1]",
        ),
        ("allowed_origins = [\"*\"]", "server.allowed_origins[0]"),
        (
            "allowed_hosts = [\"https://x.example\"]",
            "server.allowed_hosts[0]",
        ),
        (
            "trusted_proxies = [\"10.0.0.0/33\"]",
            "server.trusted_proxies[0]",
        ),
        ("proxy_protocol = true", "server.proxy_protocol"),
        ("max_connections = 0", "server.max_connections"),
        ("header_read_timeout = \"0s\"", "server.header_read_timeout"),
        ("body_read_timeout = \"0s\"", "server.body_read_timeout"),
        ("keep_alive_idle = \"0s\"", "server.keep_alive_idle"),
    ] {
        let message = error(&with_server(lines));
        assert!(
            message.starts_with(&format!("test.toml: {key}: ")) && message.contains("(line 4)"),
            "{lines}: {message}"
        );
    }
    for (table, key) in [
        ("[topics]\nallow = []", "topics.allow"),
        (
            "[topics]\nallow = [\"v2.users.**.presence\"]",
            "topics.allow[0]",
        ),
        ("[topics]\ndeny = [\"users.*\"]", "topics.deny[0]"),
        ("[topics]\nallowed = []", "topics.allowed"),
        (
            "[limits]\nchannels_per_peer = 0",
            "limits.channels_per_peer",
        ),
        (
            "[limits]\nsubscription_calls_per_minute = 0",
            "limits.subscription_calls_per_minute",
        ),
        (
            "[limits]\nupstream_share_percent = 101",
            "limits.upstream_share_percent",
        ),
        ("[limits]\nexempt = [\"loopback\"]", "limits.exempt[0]"),
    ] {
        let message = error(&format!("{MINIMAL}{table}\n"));
        assert!(
            message.starts_with(&format!("test.toml: {key}")),
            "{table}: {message}"
        );
    }
    let message = error(&MINIMAL.replace(
        "[admin]\nlisten = \"127.0.0.1:9090\"",
        "[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_file = \"\"",
    ));
    assert!(
        message.starts_with("test.toml: admin.token_file: must not be empty"),
        "{message}"
    );
}

#[test]
fn warnings_name_what_is_open() {
    let quiet = parse(MINIMAL).unwrap();
    assert!(warnings(&quiet).is_empty(), "{:?}", warnings(&quiet));
    let open = parse(
        &MINIMAL
            .replace("127.0.0.1:8080", "0.0.0.0:8080")
            .replace("127.0.0.1:9090", "0.0.0.0:9090"),
    )
    .unwrap();
    let said = warnings(&open).join("\n");
    assert!(said.contains("[topics] has no allow list"), "{said}");
    assert!(
        said.contains("admin.listen 0.0.0.0:9090") && said.contains("token_file"),
        "{said}"
    );
    assert!(said.contains("without TLS"), "{said}");
    let guarded = parse(&format!(
        "{}[topics]\nallow = [\"v2.users.*.presence\"]\n",
        open_guarded()
    ))
    .unwrap();
    assert!(warnings(&guarded).is_empty(), "{:?}", warnings(&guarded));
}

fn open_guarded() -> String {
    MINIMAL
        .replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"0.0.0.0:8080\"\npublic_url = \"wss://handover.example.com\"",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:9090\"",
            "[admin]\nlisten = \"0.0.0.0:9090\"\ntoken_file = \"/run/secrets/admin-token\"",
        )
}

#[cfg(unix)]
#[test]
fn a_secret_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let path = temp_path("exposed");
    std::fs::write(&path, "secret").unwrap();
    let text = MINIMAL.replace(
        "client_secret = \"inline-secret-value\"",
        &format!("client_secret_file = \"{}\"", path.display()),
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let said = warnings(&parse(&text).unwrap()).join("\n");
    assert!(
        said.contains("client secret file") && said.contains("every user on this host"),
        "{said}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(warnings(&parse(&text).unwrap()).is_empty());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn cluster_is_optional_and_parses_every_scheme() {
    assert_eq!(parse(MINIMAL).unwrap().cluster, None);
    for (url, endpoint) in [
        (
            "redis://:hunter2@redis.internal:6380/0",
            "redis://redis.internal:6380/0",
        ),
        (
            "rediss://user:pw@redis.example.com",
            "rediss://redis.example.com:6379",
        ),
        (
            "redis+unix:///run/redis/redis.sock",
            "redis+unix:///run/redis/redis.sock",
        ),
    ] {
        let config = parse(&format!("{MINIMAL}\n[cluster]\nredis_url = \"{url}\"\n")).unwrap();
        let cluster = config.cluster.expect("cluster");
        assert_eq!(cluster.endpoint, endpoint);
        assert_eq!(cluster.redis_url.expose(), url);
        assert_eq!(cluster.key_prefix, "handover");
        assert_eq!(cluster.local_share, 2);
        assert_eq!(cluster.history_max_len, 100_000);
        // The URL's password shows nowhere.
        let debug = format!("{cluster:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains(":pw@"),
            "{debug}"
        );
    }
    let config = parse(&format!(
        "{MINIMAL}\n[upstream]\nmax_channels = 6\n[cluster]\nredis_url = \"redis://r\"\n\
         key_prefix = \"fleet-2.eu\"\nlocal_share = 3\n"
    ))
    .unwrap();
    let cluster = config.cluster.unwrap();
    assert_eq!(
        (cluster.key_prefix.as_str(), cluster.local_share),
        ("fleet-2.eu", 3)
    );
}

#[test]
fn cluster_refuses_what_it_cannot_use_without_echoing_the_url() {
    for (cluster, key, hint) in [
        (
            "redis_url = \"http://:hunter2@r\"",
            "cluster.redis_url",
            "scheme",
        ),
        (
            "redis_url = \"not a url hunter2\"",
            "cluster.redis_url",
            "redis://",
        ),
        (
            "redis_url = \"redis+unix://\"",
            "cluster.redis_url",
            "socket",
        ),
        (
            "redis_url = \"redis://r\"\nkey_prefix = \"a b\"",
            "cluster.key_prefix",
            "[A-Za-z0-9._-]",
        ),
        (
            "redis_url = \"redis://r\"\nlocal_share = 1",
            "cluster.local_share",
            "between 2",
        ),
        (
            "redis_url = \"redis://r\"\nlocal_share = 5",
            "cluster.local_share",
            "max_channels (4)",
        ),
        ("key_prefix = \"x\"", "redis_url", "missing"),
        (
            "redis_url = \"redis://r\"\nhistory = 1",
            "history",
            "unknown",
        ),
    ] {
        let message = error(&format!("{MINIMAL}\n[cluster]\n{cluster}\n"));
        assert!(
            message.contains(key) && message.contains(hint),
            "{cluster}: {message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
}
