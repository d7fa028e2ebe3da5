//! `handover soak`: the promise under chaos. The fake Genesys Cloud and the proxy run
//! on loopback with a chaos relay between them; simulated desktops subscribe, churn
//! and stall; events are published all along; and at seeded random times every fault
//! a real edge sees is injected (see `chaos.rs`). At the end the invariants are
//! judged and printed as a table:
//!
//! - every event reaches every subscribed desktop exactly once, except inside gaps
//!   that desktop was told of; no gap opens without an unplanned cause;
//! - never more upstream channels than the budget;
//! - no topic, client channel, upstream channel, slot, socket, task or token left
//!   behind once the desktops are gone;
//! - resident memory flat after warm-up;
//! - no panic;
//! - recovery time from fault to delivery (reported).

pub mod balancer;
mod chaos;
mod desktop;
mod judge;
pub mod relay;
pub mod rollout;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mock::{ClientSpec, MockConfig, MockGenesys, Settings};
use desktop::Desktop;
use judge::{Published, Seen, Verdict};
use relay::Relay;

/// How a soak runs.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// The `handover` binary: the proxy runs as its own process, so that its memory
    /// and its panics are its own.
    pub proxy: PathBuf,
    pub duration: Duration,
    pub seed: u64,
    pub desktops: usize,
    pub topics: usize,
    /// Events published per second, over all topics.
    pub rate: f64,
    /// Print a progress line every few seconds.
    pub progress: bool,
}

impl SoakConfig {
    pub fn new(proxy: PathBuf, duration: Duration, seed: u64) -> Self {
        Self {
            proxy,
            duration,
            seed,
            desktops: 30,
            topics: 50,
            rate: 150.0,
            progress: false,
        }
    }
}

/// The fake's heartbeat and the proxy's upstream heartbeat: short, so that black
/// holes are noticed within seconds.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Token lifetime at the fake: every channel hands over every ten-odd seconds.
const TOKEN_TTL: Duration = Duration::from_secs(20);
/// The budget of upstream channels.
const BUDGET: usize = 4;
const TOPICS_PER_DESKTOP: usize = 3;

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts panics anywhere in the process (and still prints them).
fn count_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            previous(info);
        }));
    });
}

/// One line of the invariant table.
pub struct Row {
    pub invariant: &'static str,
    pub measured: String,
    pub holds: bool,
}

/// What a soak found.
pub struct Report {
    pub rows: Vec<Row>,
    pub verdict: Verdict,
    pub faults: Vec<(&'static str, usize)>,
    /// The proxy's log (kept when an invariant was violated).
    pub log: PathBuf,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.holds)
    }

    /// The invariant table, and the faults injected.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<52} {:<70}", "invariant", "measured");
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:<52} {:<70} {}",
                row.invariant,
                row.measured,
                if row.holds { "ok" } else { "VIOLATED" }
            );
        }
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        let _ = writeln!(out, "faults injected: {}", faults.join(", "));
        for example in &self.verdict.examples {
            let _ = writeln!(out, "  e.g. {example}");
        }
        if !self.passed() {
            let _ = writeln!(out, "the proxy's log: {}", self.log.display());
        }
        out
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The proxy, running as `handover serve`.
struct ProxyProcess {
    child: Child,
    pid: u32,
    client: String,
    admin: String,
    log: PathBuf,
}

impl ProxyProcess {
    async fn start(
        binary: &std::path::Path,
        config: &std::path::Path,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().context("the proxy has no pid")?;
        let stdout = child.stdout.take().context("the proxy's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the proxy did not start in time")??
            .context("the proxy exited before listening")?;
        // "listening on ADDR, admin on ADDR"
        let addresses: Vec<&str> = line.split([' ', ',']).filter(|w| w.contains(':')).collect();
        let [client, admin] = addresses[..] else {
            anyhow::bail!("unexpected first line from the proxy: {line}");
        };
        Ok(Self {
            child,
            pid,
            client: format!("http://{client}"),
            admin: format!("http://{admin}"),
            log,
        })
    }

    /// Its `/metrics`, name → value.
    async fn metrics(&self, http: &reqwest::Client) -> HashMap<String, f64> {
        let text = match http.get(format!("{}/metrics", self.admin)).send().await {
            Ok(reply) => reply.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// Stops it as Kubernetes does (SIGTERM); whether it exited 0 in time.
    async fn stop(mut self) -> bool {
        let signalled = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .is_ok_and(|s| s.success());
        signalled
            && matches!(
                tokio::time::timeout(Duration::from_secs(40), self.child.wait()).await,
                Ok(Ok(status)) if status.success()
            )
    }

    /// Panics the proxy logged.
    fn panics(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|log| log.matches("panicked at").count())
            .unwrap_or(0)
    }
}

/// Runs a soak; the report says whether every invariant held.
pub async fn run(config: SoakConfig) -> anyhow::Result<Report> {
    crate::install_crypto_provider();
    count_panics();
    let panics_before = PANICS.load(Ordering::Relaxed);
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("HTTP client")?;

    // The relay's address is the fake's socket address as the proxy sees it.
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    let fake = MockGenesys::start(MockConfig {
        clients: vec![
            ClientSpec::new("client-a", "a-0", TOKEN_TTL),
            ClientSpec::new("client-b", "b-0", TOKEN_TTL),
        ],
        settings: Settings {
            heartbeat: HEARTBEAT,
            ..Settings::default()
        },
        socket_base: Some(format!("ws://{relay_addr}")),
    })
    .await?;
    let relay = Arc::new(Relay::start(
        relay_listener,
        fake.addr(),
        &tasks,
        shutdown.clone(),
    )?);

    let secrets = std::env::temp_dir().join(format!(
        "handover-soak-{}-{}",
        std::process::id(),
        config.seed
    ));
    std::fs::create_dir_all(&secrets)?;
    chaos::write_secret(&secrets, "a", "a-0");
    chaos::write_secret(&secrets, "b", "b-0");
    let relay_url = format!("http://{relay_addr}");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nclient_idle = \"3s\"\ndrain_delay = \"0s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [genesys]\nlogin_url = \"{relay_url}\"\napi_url = \"{relay_url}\"\n\
         [[credentials]]\nname = \"a\"\nclient_id = \"client-a\"\nclient_secret_file = \"{a}\"\n\
         [[credentials]]\nname = \"b\"\nclient_id = \"client-b\"\nclient_secret_file = \"{b}\"\n\
         [handover]\nlead = \"8s\"\noverlap = \"500ms\"\n\
         [upstream]\nmax_channels = {BUDGET}\nmax_topics_per_channel = 40\nheartbeat = \"1s\"\nidle_channel_timeout = \"2s\"\n",
        a = secrets.join("a").display(),
        b = secrets.join("b").display(),
    );
    let config_path = secrets.join("handover.toml");
    std::fs::write(&config_path, toml)?;
    let proxy = ProxyProcess::start(&config.proxy, &config_path, secrets.join("proxy.log")).await?;
    let client = proxy.client.clone();
    let admin = proxy.admin.clone();
    let baseline_tasks = proxy
        .metrics(&http)
        .await
        .get("handover_tasks")
        .copied()
        .unwrap_or(0.0);

    let topics: Vec<String> = (0..config.topics)
        .map(|i| format!("v2.users.soak{i}.presence"))
        .collect();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let desktops = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..config.desktops {
        let mine: Vec<String> = (0..TOPICS_PER_DESKTOP)
            .map(|_| topics[rng.random_range(0..topics.len())].clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        desktops
            .lock()
            .await
            .push(Desktop::start(http.clone(), client.clone(), mine));
    }
    let stage = Arc::new(chaos::Stage {
        http: http.clone(),
        fake: fake.base_url(),
        client: client.clone(),
        admin: admin.clone(),
        relay: relay.clone(),
        secrets: secrets.clone(),
        desktops: desktops.clone(),
        departed: Arc::default(),
        topics: topics.clone(),
        topics_per_desktop: TOPICS_PER_DESKTOP,
        heartbeat: HEARTBEAT,
        tasks: tasks.clone(),
    });

    let started = Instant::now();
    let warm_up = (config.duration * 15 / 100).min(Duration::from_secs(20));
    let quiet = (config.duration * 15 / 100).min(Duration::from_secs(30));
    let chaos_until = started + config.duration - quiet;
    let end_at = started + config.duration;

    // Events, published all along; the budget, sampled all along.
    let Traffic {
        published,
        samples,
        publishing,
    } = Traffic::start(
        &tasks,
        &http,
        fake.base_url(),
        &topics,
        config.rate,
        config.seed,
    );
    if config.progress {
        tasks.spawn(progress(
            started,
            config.duration,
            proxy.pid,
            published.clone(),
            stage.clone(),
            publishing.clone(),
        ));
    }

    tokio::time::sleep(warm_up).await;
    let rss_after_warm_up = rss(proxy.pid);
    let faults = chaos::run(
        stage.clone(),
        config.seed ^ 0x5eed,
        Duration::from_secs(2),
        chaos_until,
    )
    .await;
    tokio::time::sleep_until(end_at).await;
    publishing.cancel();
    let ended = SystemTime::now();
    let rss_at_end = rss(proxy.pid);

    // Every desktop leaves; judge what they saw.
    let mut logs = Vec::new();
    for desktop in std::mem::take(&mut *desktops.lock().await) {
        let topics = desktop.topics.clone();
        logs.push((topics, desktop.leave().await));
    }
    logs.extend(std::mem::take(&mut *stage.departed.lock().await));
    let published = std::mem::take(&mut *published.lock().unwrap_or_else(|p| p.into_inner()));
    let verdict = with_logs(&logs, |seen| judge::judge(&published, seen, &faults, ended));

    // Nothing left behind once the desktops are gone.
    let leftovers = wait_for_leftovers(&proxy, &http, &fake.base_url()).await;
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));

    let proxy_panics = proxy.panics();
    let log = proxy.log.clone();
    let exited_cleanly = proxy.stop().await;
    shutdown.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    fake.stop().await;
    let panics = PANICS.load(Ordering::Relaxed) - panics_before + proxy_panics as u64;

    let mut kinds: Vec<(&'static str, usize)> = Vec::new();
    for fault in &faults {
        match kinds.iter_mut().find(|(k, _)| *k == fault.kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((fault.kind, 1)),
        }
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    // Flat: the end no higher than after warm-up plus a quarter (allocator
    // fragmentation, dedup windows and queues at their working size) and 16 MiB.
    let rss_flat = rss_at_end <= rss_after_warm_up + rss_after_warm_up / 4 + (16 << 20);
    let p = |q: f64| {
        verdict
            .recovery_percentile(q)
            .map_or("n/a".to_owned(), |d| format!("{} ms", d.as_millis()))
    };
    let rows = vec![
        Row {
            invariant: "every event exactly once, outside announced gaps",
            measured: format!(
                "{} expected, {} delivered, {} in gaps, {} left before told, {} lost",
                verdict.expected,
                verdict.delivered,
                verdict.covered_by_gaps,
                verdict.left_before_told,
                verdict.lost
            ),
            holds: verdict.lost == 0 && verdict.expected > 0,
        },
        Row {
            invariant: "no event twice",
            measured: format!("{} duplicated", verdict.duplicated),
            holds: verdict.duplicated == 0,
        },
        Row {
            invariant: "no gap without an unplanned cause",
            measured: format!(
                "{} gaps, {} unexplained",
                verdict.gaps, verdict.gaps_without_cause
            ),
            holds: verdict.gaps_without_cause == 0,
        },
        Row {
            invariant: "never more upstream channels than the budget",
            measured: format!("peak {} of {BUDGET}", samples.peak_channels),
            holds: samples.peak_channels <= BUDGET as u64,
        },
        Row {
            invariant: "nothing left behind when the desktops are gone",
            measured: leftovers.summary(),
            holds: leftovers.clean(),
        },
        Row {
            invariant: "proxy tasks back to their baseline",
            measured: format!("{} → {}", baseline_tasks, leftovers.tasks),
            holds: leftovers.tasks <= baseline_tasks,
        },
        Row {
            invariant: "the proxy exits 0 on SIGTERM",
            measured: if exited_cleanly {
                "exit 0".to_owned()
            } else {
                "no".to_owned()
            },
            holds: exited_cleanly,
        },
        Row {
            invariant: "proxy resident memory flat after warm-up",
            measured: format!("{:.1} → {:.1} MiB", mib(rss_after_warm_up), mib(rss_at_end)),
            holds: rss_flat,
        },
        Row {
            invariant: "no panic",
            measured: format!("{panics} panics"),
            holds: panics == 0,
        },
        Row {
            invariant: "recovery from fault to delivery (p50 / p99 / max)",
            measured: format!("{} / {} / {}", p(0.5), p(0.99), p(1.0)),
            holds: verdict
                .recovery_percentile(0.99)
                .is_none_or(|d| d <= Duration::from_secs(15)),
        },
    ];
    let report = Report {
        rows,
        verdict,
        faults: kinds,
        log,
    };
    if report.passed() {
        let _ = std::fs::remove_dir_all(&secrets);
    }
    Ok(report)
}

/// Publishes events at `rate` a second on random topics, recording each one's send
/// time, until `stop`.
/// Paced events at the fake, and its budget sampled, until `publishing` is cancelled.
struct Traffic {
    published: Arc<std::sync::Mutex<Vec<Published>>>,
    samples: Arc<std::sync::Mutex<Samples>>,
    publishing: CancellationToken,
}

impl Traffic {
    fn start(
        tasks: &TaskTracker,
        http: &reqwest::Client,
        fake: String,
        topics: &[String],
        rate: f64,
        seed: u64,
    ) -> Self {
        let traffic = Self {
            published: Arc::default(),
            samples: Arc::default(),
            publishing: CancellationToken::new(),
        };
        tasks.spawn(publish(
            http.clone(),
            fake.clone(),
            topics.to_vec(),
            rate,
            seed,
            traffic.published.clone(),
            traffic.publishing.clone(),
        ));
        tasks.spawn(sample(
            http.clone(),
            fake,
            traffic.samples.clone(),
            traffic.publishing.clone(),
        ));
        traffic
    }
}

async fn publish(
    http: reqwest::Client,
    fake: String,
    topics: Vec<String>,
    rate: f64,
    seed: u64,
    published: Arc<std::sync::Mutex<Vec<Published>>>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xe7e7);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let topic = topics[rng.random_range(0..topics.len())].clone();
        let before = SystemTime::now();
        let reply = http
            .post(format!("{fake}/__mock/publish"))
            .json(&json!({"topic": topic}))
            .send()
            .await;
        // The event left the fake at some time after `before`: counting from there, a
        // desktop subscribed by then must get it.
        if let Ok(reply) = reply
            && let Ok(body) = reply.json::<Value>().await
            && let Some(seq) = body["seq"].as_u64()
        {
            published
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Published {
                    seq,
                    topic,
                    sent: before,
                });
        }
    }
}

/// Desktops' topics and logs, as their owners left them.
type Logs = Vec<(Vec<String>, Arc<std::sync::Mutex<desktop::Log>>)>;

/// Runs `read` over the desktops' records, their logs locked meanwhile.
fn with_logs<R>(logs: &Logs, read: impl FnOnce(&[Seen<'_>]) -> R) -> R {
    let guards: Vec<_> = logs
        .iter()
        .map(|(t, l)| (t, l.lock().unwrap_or_else(|p| p.into_inner())))
        .collect();
    let seen: Vec<Seen<'_>> = guards
        .iter()
        .map(|(topics, log)| Seen {
            topics: topics.as_slice(),
            log,
        })
        .collect();
    read(&seen)
}

#[derive(Default)]
struct Samples {
    peak_channels: u64,
}

async fn sample(
    http: reqwest::Client,
    fake: String,
    samples: Arc<std::sync::Mutex<Samples>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => return,
        }
        if let Some(stats) = fake_stats(&http, &fake).await {
            let live = stats["clients"].as_object().map_or(0, |c| {
                c.values().filter_map(|v| v["live_channels"].as_u64()).sum()
            });
            let peak = stats["counters"]["peak_live_channels"]
                .as_u64()
                .unwrap_or(0);
            let mut samples = samples.lock().unwrap_or_else(|p| p.into_inner());
            samples.peak_channels = samples.peak_channels.max(live).max(peak);
        }
    }
}

async fn fake_stats(http: &reqwest::Client, fake: &str) -> Option<Value> {
    http.get(format!("{fake}/__mock/stats"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn progress(
    started: Instant,
    duration: Duration,
    pid: u32,
    published: Arc<std::sync::Mutex<Vec<Published>>>,
    stage: Arc<chaos::Stage>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => return,
        }
        let events = published.lock().unwrap_or_else(|p| p.into_inner()).len();
        let desktops = stage.desktops.lock().await.len();
        eprintln!(
            "t={:>4}s of {}s  published {events}  desktops {desktops}  proxy rss {:.1} MiB",
            started.elapsed().as_secs(),
            duration.as_secs(),
            rss(pid) as f64 / (1024.0 * 1024.0)
        );
    }
}

/// What is still held once every desktop left.
struct Leftovers {
    topics: f64,
    client_channels: f64,
    channels: f64,
    fake_channels: u64,
    fake_tokens: u64,
    fake_sockets: u64,
    tasks: f64,
}

impl Leftovers {
    fn clean(&self) -> bool {
        self.topics == 0.0
            && self.client_channels == 0.0
            && self.channels == 0.0
            && self.fake_channels == 0
            && self.fake_tokens == 0
            && self.fake_sockets == 0
    }

    fn summary(&self) -> String {
        format!(
            "{} topics, {} client ch., {} slots; upstream {}/{}/{} ch./tok./sock.",
            self.topics,
            self.client_channels,
            self.channels,
            self.fake_channels,
            self.fake_tokens,
            self.fake_sockets
        )
    }
}

/// Waits (up to 30 s) until nothing is held any more, and says what is.
async fn wait_for_leftovers(proxy: &ProxyProcess, http: &reqwest::Client, fake: &str) -> Leftovers {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = proxy.metrics(http).await;
        let metric = |name: &str| metrics.get(name).copied().unwrap_or(f64::NAN);
        let stats = fake_stats(http, fake).await.unwrap_or_default();
        let sum = |key: &str| {
            stats["clients"]
                .as_object()
                .map_or(0, |c| c.values().filter_map(|v| v[key].as_u64()).sum())
        };
        let left = Leftovers {
            topics: metric("handover_topics"),
            client_channels: metric("handover_client_channels"),
            channels: metric("handover_upstream_channels"),
            fake_channels: sum("live_channels"),
            fake_tokens: sum("live_tokens"),
            fake_sockets: stats["sockets"].as_u64().unwrap_or(u64::MAX),
            tasks: metric("handover_tasks"),
        };
        if left.clean() || Instant::now() >= until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
