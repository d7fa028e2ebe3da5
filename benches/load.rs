//! The load bench: `cargo bench --bench load [-- --quick] [options]`.
//!
//! Starts the fake Genesys Cloud (in-process, or `--genesys URL`), the proxy (the
//! release binary as its own process, or `--proxy URL`) and Debian's nginx as a plain
//! WebSocket proxy, then measures, in one run and side by side:
//!
//! 1. the relay workload on each path — `direct` (clients on the fake: the floor),
//!    `handover`, `nginx` — connect rate, deliveries/s, latency percentiles, losses,
//!    duplicates, CPU of the process under test per million deliveries, RSS;
//! 2. idle memory of the proxy per client at 1k and 10k clients;
//! 3. fan-out: one topic, many clients, deliveries/s;
//! 4. rotation under load: short-lived tokens, handovers all the time, losses and
//!    duplicates (must be 0/0) and handover durations.
//!
//! Options: `--quick` (under 2 minutes on 2 cores), `--clients N`, `--topics N`,
//! `--rate EVENTS_PER_S`, `--seconds N`, `--fanout-rate EVENTS_PER_S` (default 500,
//! to 1000 clients), `--proxy URL`, `--genesys URL`, `--proxy-pid PID` (the external
//! proxy's process, for its CPU and memory: a container's from `docker inspect`).
//! Output: a table on the terminal and `target/bench-report/` (load.json, SVG plots,
//! index.html). Traffic goes to 127.0.0.1 only, and every phase ends by itself.

#[path = "load/clients.rs"]
mod clients;
#[path = "load/paths.rs"]
mod paths;
#[path = "load/report.rs"]
mod report;
#[path = "load/system.rs"]
mod system;

use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use anyhow::Context;
use clients::{ClientSet, Plan, Recording, Route};
use handover::mock::ServiceTimes;
use paths::{Fake, Nginx, ProxyProcess};
use report::{PathResult, Report, RotationResult};
use serde_json::{Value, json};
use tokio::time::Instant;

struct Args {
    quick: bool,
    clients: usize,
    topics: usize,
    rate: f64,
    seconds: u64,
    rotation_seconds: u64,
    /// Events per second on the one fan-out topic.
    fanout_rate: f64,
    proxy: Option<String>,
    genesys: Option<String>,
    proxy_pid: Option<u32>,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let raw: Vec<String> = std::env::args().skip(1).collect();
        let quick = raw.iter().any(|a| a == "--quick");
        let value = |name: &str| {
            raw.iter()
                .position(|a| a == name)
                .and_then(|i| raw.get(i + 1))
                .cloned()
        };
        let number = |name: &str, default: f64| -> anyhow::Result<f64> {
            value(name).map_or(Ok(default), |v| {
                v.parse().with_context(|| format!("{name} takes a number"))
            })
        };
        // Both modes offer 20k deliveries/s: rate × clients / topics.
        let (clients, topics, rate, seconds, rotation_seconds) = if quick {
            (200.0, 20.0, 2000.0, 8.0, 20)
        } else {
            (1000.0, 50.0, 1000.0, 30.0, 60)
        };
        Ok(Args {
            quick,
            clients: number("--clients", clients)? as usize,
            topics: number("--topics", topics)? as usize,
            rate: number("--rate", rate)?,
            seconds: number("--seconds", seconds)? as u64,
            rotation_seconds,
            fanout_rate: number("--fanout-rate", 500.0)?,
            proxy: value("--proxy"),
            genesys: value("--genesys"),
            proxy_pid: value("--proxy-pid")
                .map(|v| v.parse().context("--proxy-pid takes a process id"))
                .transpose()?,
        })
    }

    fn topics(&self, prefix: &str) -> Vec<String> {
        (0..self.topics)
            .map(|i| format!("v2.users.{prefix}{i}.presence"))
            .collect()
    }

    fn events(&self) -> u64 {
        (self.rate * self.seconds as f64) as u64
    }
}

/// A progress line, redrawn in place on a terminal (and not written at all to a
/// file, where it would only be noise).
fn status(line: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{line}");
        let _ = std::io::stderr().flush();
    }
}

fn main() -> anyhow::Result<()> {
    handover::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let started = Instant::now();
    let open_files = system::raise_open_files(65_536);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let mut notes = Vec::new();
    eprintln!(
        "load bench ({} mode): {} clients, {} topics, {} events/s for {} s per path (≈{:.0} deliveries/s)",
        if args.quick { "quick" } else { "full" },
        args.clients,
        args.topics,
        args.rate,
        args.seconds,
        args.rate * args.clients as f64 / args.topics as f64
    );

    let fake = Fake::start(
        args.genesys.as_deref(),
        Duration::from_secs(86_400),
        ServiceTimes::NONE,
    )
    .await?;
    let nginx = Nginx::spawn(&fake.addr()).await?;
    if nginx.is_none() {
        notes.push(
            "nginx is not installed (apt-get install nginx): the nginx path was skipped".into(),
        );
        eprintln!("nginx not installed: skipping the nginx path (apt-get install nginx)");
    }
    let proxy = match &args.proxy {
        Some(_) => None,
        None => Some(ProxyProcess::spawn(&fake, "").await?),
    };
    let proxy_url = args
        .proxy
        .clone()
        .or_else(|| proxy.as_ref().map(|p| p.client_url.clone()))
        .context("no proxy")?;

    // 1. The relay workload, path by path.
    let mut paths = Vec::new();
    let token = fake.token(&http).await?;
    let direct = Route {
        api: fake.url.clone(),
        token: Some(token.clone()),
        socket_host: Some(fake.addr()),
    };
    paths.push(relay("direct", &args, &fake, &http, vec![direct], Vec::new()).await?);
    let pids = proxy
        .as_ref()
        .map(|p| p.process.pid)
        .or(args.proxy_pid)
        .into_iter()
        .collect();
    paths.push(
        relay(
            "handover",
            &args,
            &fake,
            &http,
            vec![Route::proxy(&proxy_url)],
            pids,
        )
        .await?,
    );
    if let Some(proxy) = proxy {
        proxy.process.stop().await;
    }
    if args.proxy.is_none() {
        match cluster(&args, &fake, &http).await? {
            Some((path, note)) => {
                paths.push(path);
                notes.push(note);
            }
            None => notes.push(
                "redis-server is not installed (apt-get install redis-server): the cluster path was skipped"
                    .into(),
            ),
        }
    }
    if let Some(nginx) = &nginx {
        let route = Route {
            api: fake.url.clone(),
            token: Some(token),
            socket_host: Some(nginx.addr.to_string()),
        };
        let pids = system::with_children(nginx.process.pid);
        paths.push(relay("nginx", &args, &fake, &http, vec![route], pids).await?);
    }

    // 2. Idle memory per client.
    let mut idle = Vec::new();
    let mut open_files_note = None;
    if args.proxy.is_some() {
        notes.push("idle memory needs the proxy's process: skipped with --proxy".into());
    } else {
        for clients in [1_000usize, 10_000] {
            // Each idle client holds a socket here and one in the proxy (two processes).
            if (open_files as usize) < clients + 1_000 {
                open_files_note = Some(format!(
                    "open-files limit is {open_files}: {clients} idle clients need about {} per process; raise `ulimit -Hn`",
                    clients + 1_000
                ));
                idle.push((clients, None));
                continue;
            }
            idle.push((clients, idle_memory(&fake, &http, clients).await?));
        }
    }

    // 3. Fan-out.
    let fanout_clients = 1_000;
    let fanout = fan_out(&args, &fake, &http, fanout_clients).await?;
    if fanout.disconnects > 0 {
        notes.push(format!(
            "fan-out: {} clients fell behind and were disconnected (offered load above capacity)",
            fanout.disconnects
        ));
    }

    // 4. Rotation under load.
    let rotation = if args.proxy.is_some() {
        notes.push(
            "rotation under load needs a proxy the bench configures: skipped with --proxy".into(),
        );
        None
    } else {
        Some(rotation(&args, &http).await?)
    };
    // 5. A rolling restart of a fleet under load.
    let rollout = if args.proxy.is_some() {
        None
    } else {
        rollout(&args).await?
    };
    if let Some(r) = &rollout {
        eprintln!("{}", r.plot());
    }
    status("");

    let report = Report {
        mode: if args.quick { "quick" } else { "full" },
        workload: json!({
            "clients": args.clients, "topics": args.topics, "events_per_s": args.rate, "seconds": args.seconds,
            "offered_deliveries_per_s": args.rate * args.clients as f64 / args.topics as f64,
            "rotation_seconds": args.rotation_seconds, "fanout_clients": fanout_clients, "fanout_events_per_s": args.fanout_rate,
        }),
        machine: system::machine(nginx.as_ref().map(|n| n.version.as_str())),
        paths,
        idle,
        open_files_note,
        fanout_deliveries_per_s: Some(fanout.deliveries_per_s),
        fanout_delivered: Some((fanout.delivered, fanout.offered)),
        fanout_clients,
        rotation,
        rollout,
        notes,
    };
    println!("\n{}", report.table());
    let dir = report.write()?;
    println!(
        "report: {}/index.html (load.json, SVG plots) — {:.0} s in all",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the fan-out phase measured.
struct Fanout {
    deliveries_per_s: f64,
    delivered: u64,
    offered: u64,
    disconnects: usize,
}

async fn stream(
    http: &reqwest::Client,
    fake: &Fake,
    topics: &[String],
    rate: f64,
    count: u64,
) -> anyhow::Result<u64> {
    let reply: Value = http
        .post(format!("{}/__mock/streams", fake.url))
        .json(&json!({"topics": topics, "rate": rate, "count": count}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    reply["stream"].as_u64().context("no stream id")
}

async fn stream_status(http: &reqwest::Client, fake: &Fake, id: u64) -> anyhow::Result<Value> {
    Ok(http
        .get(format!("{}/__mock/streams/{id}", fake.url))
        .send()
        .await?
        .json()
        .await?)
}

fn cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| system::cpu_seconds(p)).sum()
}

fn rss(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| system::rss_bytes(p)).sum()
}

/// Runs one stream through `clients` and waits until it is delivered (or 3 s past
/// its end); returns the stream's nominal duration, the denominator of deliveries/s.
/// A paced stream the fake publishes: `count` events at `rate` per second.
struct Load<'a> {
    topics: &'a [String],
    rate: f64,
    count: u64,
}

async fn drive(
    label: &str,
    http: &reqwest::Client,
    fake: &Fake,
    load: Load<'_>,
    clients: &ClientSet,
    expected_frames: u64,
) -> anyhow::Result<f64> {
    let Load {
        topics,
        rate,
        count,
    } = load;
    let id = stream(http, fake, topics, rate, count).await?;
    let mut done_at = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let st = stream_status(http, fake, id).await?;
        let frames = clients.frames.frames();
        status(&format!(
            "[{label}] published {}/{count}  received {frames}/{expected_frames}",
            st["sent"]
        ));
        if st["done"] == true && done_at.is_none() {
            done_at = Some(Instant::now());
        }
        if let Some(at) = done_at
            && (frames >= expected_frames || at.elapsed() > Duration::from_secs(3))
        {
            break;
        }
    }
    Ok(count as f64 / rate)
}

/// Losses, duplicates and latencies of a finished client set: client `i` listens to
/// `topics[i % topics.len()]`, and event `seq` went to `topics[seq % topics.len()]`.
fn account(seen: &[(usize, clients::Seen)], topics: usize) -> (u64, u64, u64, Vec<u32>) {
    let (mut lost, mut duplicated, mut disconnects) = (0, 0, 0);
    let mut latencies = Vec::new();
    for (i, s) in seen {
        for (seq, &count) in s.seq_counts.iter().enumerate() {
            if seq % topics == i % topics {
                if count == 0 {
                    lost += 1;
                }
                duplicated += count.saturating_sub(1) as u64;
            }
        }
        disconnects += u64::from(s.disconnected);
        latencies.extend(s.samples.iter().map(|&(_, l)| l));
    }
    latencies.sort_unstable();
    (lost, duplicated, disconnects, latencies)
}

async fn relay(
    name: &'static str,
    args: &Args,
    fake: &Fake,
    http: &reqwest::Client,
    routes: Vec<Route>,
    pids: Vec<u32>,
) -> anyhow::Result<PathResult> {
    let topics = args.topics(name);
    let count = args.events();
    let start = Instant::now();
    let progress = |n: usize| status(&format!("[{name}] connecting {n}/{}", args.clients));
    let plan = Plan {
        clients: args.clients,
        topics: &topics,
        stream_len: count,
        start,
        recording: Recording::Full,
    };
    let clients = ClientSet::open(http, &routes, plan, &progress)
        .await
        .with_context(|| format!("[{name}] opening {} clients", args.clients))?;
    let cpu_before = cpu(&pids);
    let expected = count * args.clients as u64 / args.topics as u64;
    let seconds = drive(
        name,
        http,
        fake,
        Load {
            topics: &topics,
            rate: args.rate,
            count,
        },
        &clients,
        expected,
    )
    .await?;
    let cpu_after = cpu(&pids);
    let rss_bytes = rss(&pids);
    let connect_per_s = args.clients as f64 / clients.connect_seconds;
    let seen = clients.finish().await;
    let (lost, duplicated, disconnects, latencies_us) = account(&seen, args.topics);
    let deliveries = latencies_us.len() as u64;
    Ok(PathResult {
        name,
        connect_per_s,
        deliveries,
        deliveries_per_s: deliveries as f64 / seconds,
        lost,
        duplicated,
        disconnects,
        latencies_us,
        cpu_s: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        rss_bytes,
    })
}

/// The relay workload on two replicas of one fleet sharing a `redis-server`, each
/// topic's clients on both (so both carry every topic, and every event enters Redis
/// once): CPU counts both replicas and Redis. `None` without `redis-server`.
async fn cluster(
    args: &Args,
    fake: &Fake,
    http: &reqwest::Client,
) -> anyhow::Result<Option<(PathResult, String)>> {
    let Some(redis) = paths::Redis::spawn().await? else {
        return Ok(None);
    };
    let extra = format!("[cluster]\nredis_url = \"{}\"\n", redis.url);
    let replicas = [
        ProxyProcess::spawn(fake, &extra).await?,
        ProxyProcess::spawn(fake, &extra).await?,
    ];
    let routes = replicas
        .iter()
        .map(|r| Route::proxy(&r.client_url))
        .collect();
    let mut pids: Vec<u32> = replicas.iter().map(|r| r.process.pid).collect();
    pids.push(redis.process.pid);
    let commands_before = redis.commands_processed().await?;
    let path = relay("cluster", args, fake, http, routes, pids).await?;
    let commands = redis.commands_processed().await? - commands_before;
    for replica in replicas {
        replica.process.stop().await;
    }
    let events = args.events();
    let note = format!(
        "cluster: 2 replicas and redis-server; Redis ran {commands} commands for {events} events ({:.3} per event, leases and reads included)",
        commands as f64 / events as f64
    );
    Ok(Some((path, note)))
}

/// Three replicas of a fleet (the release binary, each its own process) on
/// `redis-server`, behind a balancer that follows their readiness, 200 SDK-like
/// desktops at about 20k deliveries/s (10k in quick mode), and every replica restarted
/// in turn (see `handover::soak::rollout`). `None` without `redis-server`.
async fn rollout(args: &Args) -> anyhow::Result<Option<handover::soak::rollout::RolloutReport>> {
    let Some(redis) = paths::Redis::spawn().await? else {
        return Ok(None);
    };
    status("rollout under load");
    let mut config = handover::soak::rollout::RolloutConfig::new(
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_handover")),
        redis.url.clone(),
        handover::soak::rollout::Disruption::Rollout,
    );
    // 200 desktops on 2 of 10 topics each: about 40 deliveries per event.
    config.topics = 10;
    config.rate = if args.quick { 250.0 } else { 500.0 };
    Ok(Some(handover::soak::rollout::run(config).await?))
}

async fn idle_memory(
    fake: &Fake,
    http: &reqwest::Client,
    clients: usize,
) -> anyhow::Result<Option<u64>> {
    let proxy = ProxyProcess::spawn(fake, "").await?;
    let route = Route::proxy(&proxy.client_url);
    let topics: Vec<String> = (0..100).map(|i| format!("v2.idle.{i}")).collect();
    // One client first, so the upstream channel and its buffers are in the baseline.
    let idle = |clients| Plan {
        clients,
        topics: &topics,
        stream_len: 0,
        start: Instant::now(),
        recording: Recording::CountOnly,
    };
    let first = ClientSet::open(http, std::slice::from_ref(&route), idle(1), &|_| {}).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = system::rss_bytes(proxy.process.pid);
    let label = format!("[idle {clients}]");
    let progress = |n: usize| status(&format!("{label} connecting {n}/{clients}"));
    let set = ClientSet::open(http, std::slice::from_ref(&route), idle(clients), &progress)
        .await
        .with_context(|| format!("[idle] opening {clients} clients"))?;
    // Let allocations settle (heartbeats are 30 s apart: nothing else happens).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = system::rss_bytes(proxy.process.pid);
    set.finish().await;
    first.finish().await;
    proxy.process.stop().await;
    Ok(before
        .zip(after)
        .map(|(b, a)| a.saturating_sub(b) / clients as u64))
}

async fn fan_out(
    args: &Args,
    fake: &Fake,
    http: &reqwest::Client,
    clients: usize,
) -> anyhow::Result<Fanout> {
    let spawned = match &args.proxy {
        Some(_) => None,
        None => Some(ProxyProcess::spawn(fake, "").await?),
    };
    let api = args
        .proxy
        .clone()
        .or_else(|| spawned.as_ref().map(|p| p.client_url.clone()))
        .context("no proxy")?;
    let topic = vec!["v2.fanout.hot".to_owned()];
    let progress = |n: usize| status(&format!("[fan-out] connecting {n}/{clients}"));
    let plan = Plan {
        clients,
        topics: &topic,
        stream_len: 0,
        start: Instant::now(),
        recording: Recording::CountOnly,
    };
    let set = ClientSet::open(http, &[Route::proxy(&api)], plan, &progress).await?;
    // Offer more than the target (200k deliveries/s) so that the figure is what the
    // proxy achieves, not what was offered.
    let (rate, seconds) = (args.fanout_rate, if args.quick { 4.0 } else { 10.0 });
    let count = (rate * seconds) as u64;
    drive(
        "fan-out",
        http,
        fake,
        Load {
            topics: &topic,
            rate,
            count,
        },
        &set,
        count * clients as u64,
    )
    .await?;
    let seen = set.finish().await;
    if let Some(proxy) = spawned {
        proxy.process.stop().await;
    }
    let disconnects = seen.iter().filter(|(_, s)| s.disconnected).count();
    let delivered: u64 = seen.iter().map(|(_, s)| s.frames).sum();
    Ok(Fanout {
        deliveries_per_s: clients::frame_rate(&seen),
        delivered,
        offered: count * clients as u64,
        disconnects,
    })
}

async fn rotation(args: &Args, http: &reqwest::Client) -> anyhow::Result<RotationResult> {
    // Six-second tokens, realistic Genesys service times, and topics spread over three
    // channels: a handover somewhere every second or two.
    let fake = Fake::start(
        args.genesys.as_deref(),
        Duration::from_secs(6),
        ServiceTimes::REALISTIC,
    )
    .await?;
    let per_channel = args.topics.div_ceil(3);
    let extra = format!(
        "[handover]\nlead = \"2s\"\noverlap = \"500ms\"\n[upstream]\nmax_channels = 4\nmax_topics_per_channel = {per_channel}\n"
    );
    let proxy = ProxyProcess::spawn(&fake, &extra).await?;
    let topics = args.topics("rot");
    let count = (args.rate * args.rotation_seconds as f64) as u64;
    let start = Instant::now();
    let wall_start_ms = handover::mock::unix_micros() / 1000;
    let progress = |n: usize| status(&format!("[rotation] connecting {n}/{}", args.clients));
    let plan = Plan {
        clients: args.clients,
        topics: &topics,
        stream_len: count,
        start,
        recording: Recording::Full,
    };
    let set = ClientSet::open(http, &[Route::proxy(&proxy.client_url)], plan, &progress).await?;
    let expected = count * args.clients as u64 / args.topics as u64;
    drive(
        "rotation",
        http,
        &fake,
        Load {
            topics: &topics,
            rate: args.rate,
            count,
        },
        &set,
        expected,
    )
    .await?;
    let seen = set.finish().await;
    let (lost, duplicated, disconnects, _) = account(&seen, args.topics);
    let recent: Vec<(u64, f64)> = proxy
        .handovers
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|(at, _)| *at >= wall_start_ms)
        .collect();
    // Per-second timeline from every sample.
    let mut per_second: std::collections::BTreeMap<u32, Vec<u32>> =
        std::collections::BTreeMap::new();
    for (_, s) in &seen {
        for &(at_ms, latency) in &s.samples {
            per_second.entry(at_ms / 1000).or_default().push(latency);
        }
    }
    let first_second = per_second.keys().next().copied().unwrap_or(0);
    let timeline = per_second
        .into_iter()
        .map(|(second, mut l)| {
            l.sort_unstable();
            (
                second - first_second,
                l.len() as u64,
                report::percentile(&l, 0.5),
                report::percentile(&l, 0.99),
            )
        })
        .collect();
    let offset_s = first_second as f64;
    Ok(RotationResult {
        handovers: recent.len() as u64,
        durations_ms: recent.iter().map(|(_, d)| *d).collect(),
        lost,
        duplicated,
        disconnects,
        deliveries: seen.iter().map(|(_, s)| s.samples.len() as u64).sum(),
        timeline,
        handover_marks: recent
            .iter()
            .map(|(at, _)| (*at as f64 - wall_start_ms as f64) / 1000.0 - offset_s)
            .collect(),
    })
}
