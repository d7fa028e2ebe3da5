//! A fleet of `handover serve` processes on one Redis, behind a [`Balancer`], with
//! SDK-like desktops and a paced event stream, through a disruption: a rolling
//! restart (each replica in turn: a new one comes up, then the old one gets SIGTERM
//! and drains), or one replica killed (SIGKILL) mid-stream. The desktops' logs are
//! judged as the soak judges them; the fake counts the OAuth client's channels.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ProxyProcess;
use super::balancer::Balancer;
use super::desktop::Desktop;
use super::judge::{self, Fault, Seen, Verdict};
use crate::mock::{ClientSpec, MockConfig, MockGenesys, Settings};

/// What happens to the fleet mid-stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disruption {
    /// Every replica in turn: a new one starts, and once it is ready the old one gets
    /// SIGTERM and drains.
    Rollout,
    /// One replica gets SIGKILL.
    Kill,
}

#[derive(Clone, Debug)]
pub struct RolloutConfig {
    /// The `handover` binary.
    pub proxy: PathBuf,
    /// The fleet's Redis (`[cluster] redis_url`).
    pub redis_url: String,
    pub replicas: usize,
    pub desktops: usize,
    pub topics: usize,
    pub topics_per_desktop: usize,
    /// Events published per second, over all topics.
    pub rate: f64,
    /// `upstream.max_channels`, and the fake's limit for the OAuth client.
    pub budget: usize,
    pub disruption: Disruption,
    pub seed: u64,
}

impl RolloutConfig {
    pub fn new(proxy: PathBuf, redis_url: String, disruption: Disruption) -> Self {
        Self {
            proxy,
            redis_url,
            replicas: 3,
            desktops: 200,
            topics: 40,
            topics_per_desktop: 2,
            rate: 100.0,
            budget: 10,
            disruption,
            seed: 7,
        }
    }
}

/// A moment the plot marks.
#[derive(Clone, Debug)]
pub struct Mark {
    pub at: Duration,
    pub what: String,
}

/// What a run found.
pub struct RolloutReport {
    pub verdict: Verdict,
    /// The most upstream channels the OAuth client had at once, at the fake.
    pub peak_channels: u64,
    pub budget: usize,
    pub evictions: u64,
    /// The widest gap notice a desktop received.
    pub largest_gap: Option<Duration>,
    /// Desktops that had to make a new channel (a 404 for theirs).
    pub new_channels: u32,
    /// Replicas stopped with SIGTERM that exited 0 within their grace.
    pub clean_exits: usize,
    pub stopped: usize,
    /// Deliveries to all desktops per [`BIN`], from the start of the stream.
    pub delivered: Vec<u64>,
    pub marks: Vec<Mark>,
    pub published: usize,
    /// The replicas' logs.
    pub logs: Logs,
}

/// The directory of a run's config, secret and replica logs: removed when the report
/// is dropped, unless that happens while a failed test unwinds (then it is kept, and
/// named on stderr: the replicas' logs are what explains the failure). A run that
/// ends in an error keeps it too.
pub struct Logs(PathBuf);

impl Logs {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the replicas' logs are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The width of one bar of the delivery plot.
pub const BIN: Duration = Duration::from_millis(250);

impl RolloutReport {
    /// The figures, and the delivery rate over time with the disruptions marked.
    pub fn table(&self) -> String {
        let v = &self.verdict;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "published {}  expected deliveries {}  delivered {}  lost {}  duplicated {}  covered by gap notices {}  gap notices {}  largest gap {}",
            self.published,
            v.expected,
            v.delivered,
            v.lost,
            v.duplicated,
            v.covered_by_gaps,
            v.gaps,
            self.largest_gap
                .map_or("none".into(), |g| format!("{} ms", g.as_millis()))
        );
        let _ = writeln!(
            out,
            "peak upstream channels {} (budget {})  evictions {}  new channels after a 404: {}  clean exits {}/{}",
            self.peak_channels,
            self.budget,
            self.evictions,
            self.new_channels,
            self.clean_exits,
            self.stopped
        );
        out.push_str(&self.plot());
        for example in &v.examples {
            let _ = writeln!(out, "  e.g. {example}");
        }
        out
    }

    /// Deliveries per second over time, one row per [`BIN`], with the marks beside.
    pub fn plot(&self) -> String {
        let mut out = String::new();
        let per_second = |n: u64| n as f64 / BIN.as_secs_f64();
        let top = self.delivered.iter().copied().max().unwrap_or(1).max(1);
        let _ = writeln!(out, "   t(s)  deliveries/s");
        for (i, &n) in self.delivered.iter().enumerate() {
            let start = BIN * i as u32;
            let marks: Vec<&str> = self
                .marks
                .iter()
                .filter(|m| m.at >= start && m.at < start + BIN)
                .map(|m| m.what.as_str())
                .collect();
            let bar = "#".repeat((n * 50 / top) as usize);
            let _ = writeln!(
                out,
                "{:>7.2} {:>8.0} {bar:<50} {}",
                start.as_secs_f64(),
                per_second(n),
                if marks.is_empty() {
                    String::new()
                } else {
                    format!("<- {}", marks.join(", "))
                }
            );
        }
        out
    }
}

/// Deliveries to all desktops per [`BIN`] from `started` to `ended`.
fn delivered_per_bin(seen: &[Seen<'_>], started: SystemTime, ended: SystemTime) -> Vec<u64> {
    let bins = ended
        .duration_since(started)
        .unwrap_or_default()
        .as_millis()
        / BIN.as_millis();
    let mut delivered = vec![0u64; bins as usize + 1];
    for receipt in seen.iter().flat_map(|d| d.log.events.values()) {
        if let Ok(at) = receipt.received.duration_since(started) {
            let bin = (at.as_millis() / BIN.as_millis()) as usize;
            if let Some(slot) = delivered.get_mut(bin) {
                *slot += u64::from(receipt.count);
            }
        }
    }
    delivered
}

/// How long events flow before the disruption, and after it.
const LEAD_IN: Duration = Duration::from_secs(2);
const TAIL: Duration = Duration::from_secs(3);
/// How long the replicas take to start and become ready, at most.
const READY_WITHIN: Duration = Duration::from_secs(30);

pub async fn run(config: RolloutConfig) -> anyhow::Result<RolloutReport> {
    crate::install_crypto_provider();
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("HTTP client")?;
    let fake = MockGenesys::start(MockConfig {
        clients: vec![ClientSpec::new(
            "client-a",
            "a-0",
            Duration::from_secs(3600),
        )],
        settings: Settings {
            max_channels_per_client: config.budget,
            ..Settings::default()
        },
        socket_base: None,
    })
    .await?;
    let balancer = Balancer::start(http.clone(), &tasks, shutdown.clone()).await?;
    // Kept if the run fails (see [`Logs`]).
    let dir = std::env::temp_dir().join(format!(
        "handover-rollout-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    super::chaos::write_secret(&dir, "a", "a-0");
    let config_path = dir.join("handover.toml");
    std::fs::write(
        &config_path,
        replica_config(&config, &fake, &balancer, &dir),
    )?;

    let mut fleet = Fleet {
        binary: config.proxy.clone(),
        config: config_path,
        dir: dir.clone(),
        balancer: balancer.clone(),
        started: 0,
        replicas: Vec::new(),
    };
    for _ in 0..config.replicas {
        fleet.start_replica().await?;
    }

    let topics: Vec<String> = (0..config.topics)
        .map(|i| format!("v2.users.rollout{i}.presence"))
        .collect();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let base = format!("http://{}", balancer.addr);
    let desktops: Vec<Desktop> = (0..config.desktops)
        .map(|_| {
            let mine: Vec<String> = (0..config.topics_per_desktop)
                .map(|_| topics[rng.random_range(0..topics.len())].clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            Desktop::start(http.clone(), base.clone(), mine)
        })
        .collect();
    let all_subscribed = tokio::time::Instant::now() + READY_WITHIN;
    while desktops.iter().any(|d| d.log().subscribed_at.is_none()) {
        anyhow::ensure!(
            tokio::time::Instant::now() < all_subscribed,
            "the desktops did not all subscribe within {READY_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = SystemTime::now();
    let super::Traffic {
        published,
        samples,
        publishing,
    } = super::Traffic::start(
        &tasks,
        &http,
        fake.base_url(),
        &topics,
        config.rate,
        config.seed,
    );
    tokio::time::sleep(LEAD_IN).await;

    let mut marks = Vec::new();
    let mut faults = Vec::new();
    let mut mark = |what: String| {
        let at = SystemTime::now()
            .duration_since(started)
            .unwrap_or_default();
        marks.push(Mark { at, what });
    };
    let (mut clean_exits, mut stopped) = (0, 0);
    match config.disruption {
        Disruption::Rollout => {
            for _ in 0..config.replicas {
                let n = fleet.start_replica().await?;
                mark(format!("replica {n} ready"));
                let old = fleet.replicas.remove(0);
                mark(format!("SIGTERM replica {}", old.0));
                stopped += 1;
                let address = old.1.client_addr()?;
                if old.1.stop().await {
                    clean_exits += 1;
                }
                balancer.remove(address);
                mark(format!("replica {} exited", old.0));
            }
        }
        Disruption::Kill => {
            let victim = fleet.replicas.remove(config.replicas / 2);
            mark(format!("SIGKILL replica {}", victim.0));
            faults.push(Fault {
                kind: "replica killed",
                at: SystemTime::now(),
                unplanned: true,
            });
            let address = victim.1.client_addr()?;
            victim.1.kill().await;
            balancer.remove(address);
        }
    }
    tokio::time::sleep(TAIL).await;
    publishing.cancel();
    // What was published last is on its way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ended = SystemTime::now();

    let mut logs = Vec::new();
    for desktop in desktops {
        let topics = desktop.topics.clone();
        logs.push((topics, desktop.leave().await));
    }
    let published = std::mem::take(&mut *published.lock().unwrap_or_else(|p| p.into_inner()));
    let (verdict, largest_gap, new_channels, delivered) = super::with_logs(&logs, |seen| {
        let verdict = judge::judge(&published, seen, &faults, ended);
        let largest_gap = seen
            .iter()
            .flat_map(|d| &d.log.gaps)
            .filter_map(|gap| gap.to.duration_since(gap.from).ok())
            .max();
        let new_channels = seen.iter().map(|d| d.log.new_channels).sum();
        (
            verdict,
            largest_gap,
            new_channels,
            delivered_per_bin(seen, started, ended),
        )
    });

    let stats = super::fake_stats(&http, &fake.base_url()).await;
    let evictions = stats
        .as_ref()
        .and_then(|s| s["counters"]["evictions"].as_u64())
        .unwrap_or(0);
    let peak_channels = stats
        .as_ref()
        .and_then(|s| s["clients"]["client-a"]["peak_channels"].as_u64())
        .unwrap_or(0)
        .max(
            samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .peak_channels,
        );
    for (_, replica) in fleet.replicas.drain(..) {
        stopped += 1;
        if replica.stop().await {
            clean_exits += 1;
        }
    }
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(RolloutReport {
        verdict,
        peak_channels,
        budget: config.budget,
        evictions,
        largest_gap,
        new_channels,
        clean_exits,
        stopped,
        delivered,
        marks,
        published: published.len(),
        logs: Logs(dir),
    })
}

fn replica_config(
    config: &RolloutConfig,
    fake: &MockGenesys,
    balancer: &Balancer,
    dir: &Path,
) -> String {
    let fake = fake.base_url();
    // The desktops reach every replica through the balancer: their connectUri
    // names it. The drain waits half a second for the balancer (which polls every
    // 100 ms) to see the 503, closes the sockets over a second, and waits up to the
    // grace for the desktops to be served elsewhere.
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"ws://{balancer}\"\n\
         drain_delay = \"500ms\"\ndrain_spread = \"1s\"\nshutdown_grace = \"30s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [genesys]\nlogin_url = \"{fake}\"\napi_url = \"{fake}\"\n\
         [[credentials]]\nname = \"a\"\nclient_id = \"client-a\"\nclient_secret_file = \"{secret}\"\n\
         [upstream]\nmax_channels = {budget}\n\
         [cluster]\nredis_url = \"{redis}\"\n",
        balancer = balancer.addr,
        secret = dir.join("a").display(),
        budget = config.budget,
        redis = config.redis_url,
    )
}

/// The replicas running, numbered in the order they started.
struct Fleet {
    binary: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    balancer: Arc<Balancer>,
    started: usize,
    replicas: Vec<(usize, ProxyProcess)>,
}

impl Fleet {
    /// Starts one more replica and waits until the balancer sends it connections.
    async fn start_replica(&mut self) -> anyhow::Result<usize> {
        let n = self.started;
        self.started += 1;
        let log = self.dir.join(format!("replica-{n}.log"));
        let replica = ProxyProcess::start(&self.binary, &self.config, log).await?;
        let address = replica.client_addr()?;
        self.balancer.add(address, &replica.admin);
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        while !self.balancer.is_ready(address) {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "replica {n} was not ready within {READY_WITHIN:?}"
            );
            tokio::time::sleep(super::balancer::POLL).await;
        }
        self.replicas.push((n, replica));
        Ok(n)
    }
}

/// The client listener's address of a replica.
fn client_addr(url: &str) -> anyhow::Result<SocketAddr> {
    url.trim_start_matches("http://")
        .parse()
        .with_context(|| format!("client address {url}"))
}

impl ProxyProcess {
    fn client_addr(&self) -> anyhow::Result<SocketAddr> {
        client_addr(&self.client)
    }

    /// Kills it as a crash would (SIGKILL), and waits for it to be gone.
    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
