//! `handover demo`: the fake Genesys Cloud, the proxy and simulated desktops in one
//! process on loopback, with short token lifetimes and the secret rotated on a
//! schedule in every way it happens (soft rotation in the real order, hard rotation
//! with two OAuth clients and a drain, a maintenance close). It shows live progress
//! and exits 0 only if nothing was lost, duplicated or disconnected.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::app::Proxy;
use crate::config::Config;
use crate::mock::{ClientSpec, MockConfig, MockGenesys, Settings};
use crate::sim::{Desktop, tally};

const TOKEN_TTL: Duration = Duration::from_secs(8);
const DESKTOPS: usize = 12;
const TOPICS: usize = 8;
const RATE: f64 = 100.0;
const EVENTS: u64 = 4000;

/// Every scheduled step, at its second of the run.
const SCHEDULE: &[(u64, Step)] = &[
    (6, Step::SoftRotationAtGenesys),
    (8, Step::SoftRotationFileCatchesUp),
    (16, Step::DrainA),
    (22, Step::HardRotationOfA),
    (26, Step::MaintenanceClose),
];

#[derive(Clone, Copy, Debug)]
enum Step {
    SoftRotationAtGenesys,
    SoftRotationFileCatchesUp,
    DrainA,
    HardRotationOfA,
    MaintenanceClose,
}

pub async fn run() -> anyhow::Result<()> {
    let fake = MockGenesys::start(MockConfig {
        clients: vec![
            ClientSpec::new("demo-a", "a-secret-1", TOKEN_TTL),
            ClientSpec::new("demo-b", "b-secret-1", TOKEN_TTL),
        ],
        settings: Settings::default(),
        socket_base: None,
    })
    .await
    .context("cannot start the fake Genesys Cloud")?;
    let secrets = SecretDir::new()?;
    secrets.write("a", "a-secret-1")?;
    secrets.write("b", "b-secret-1")?;
    let config = Config::from_toml(&demo_config(&fake.base_url(), &secrets), "demo")?;
    let proxy = Proxy::start(config).await?;
    let http = reqwest::Client::new();
    let fake_url = fake.base_url();
    let proxy_url = format!("http://{}", proxy.client_addr);
    println!("fake Genesys Cloud on {fake_url}, proxy on {proxy_url}");
    println!(
        "{DESKTOPS} desktops, {TOPICS} topics, {RATE} events/s, tokens live {}s; rotations on a schedule\n",
        TOKEN_TTL.as_secs()
    );

    let topics: Vec<String> = (0..TOPICS)
        .map(|i| format!("v2.users.agent{i}.presence"))
        .collect();
    let mut desktops = Vec::new();
    for d in 0..DESKTOPS {
        let mine = [
            topics[d % TOPICS].clone(),
            topics[(d + 1) % TOPICS].clone(),
            topics[(d + 3) % TOPICS].clone(),
        ];
        desktops.push(Desktop::connect(&http, &proxy_url, &mine).await?);
    }
    let stream = control(
        &http,
        &fake_url,
        "POST",
        "streams",
        json!({"topics": topics, "rate": RATE, "count": EVENTS}),
    )
    .await?["stream"]
        .as_u64()
        .context("the fake started no stream")?;
    let expected = |d: &Desktop| d.expected(stream, &topics, EVENTS);

    let started = Instant::now();
    let mut schedule = SCHEDULE.iter().peekable();
    let mut rotations = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let second = started.elapsed().as_secs();
        while let Some((_, step)) = schedule.next_if(|(at, _)| *at <= second) {
            rotations += perform(*step, &http, &fake_url, &proxy, &secrets).await?;
        }
        let status = control(
            &http,
            &fake_url,
            "GET",
            &format!("streams/{stream}"),
            Value::Null,
        )
        .await?;
        let sent = status["sent"].as_u64().unwrap_or(0);
        // Events sent more than two seconds ago should have arrived by now.
        let settled = sent.saturating_sub((2.0 * RATE) as u64);
        progress(
            second, sent, &desktops, &expected, settled, &proxy, rotations,
        );
        if status["done"] == true {
            break;
        }
    }
    // Let the last events arrive, then count for good.
    let until = Instant::now() + Duration::from_secs(5);
    let mut last = tally(&desktops, &expected, u64::MAX);
    while last.lost > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = tally(&desktops, &expected, u64::MAX);
    }
    let disconnects = desktops.iter().filter(|d| d.disconnected()).count();
    let stats = control(&http, &fake_url, "GET", "stats", Value::Null).await?;
    let peak = stats["counters"]["peak_live_channels"]
        .as_u64()
        .unwrap_or(0);
    println!("\n\nsummary");
    println!("  events published      {EVENTS}");
    println!("  deliveries            {}", last.delivered);
    println!("  handovers             {}", proxy.pool.handovers());
    println!("  rebuilds after loss   {}", proxy.pool.rebuilds());
    println!("  rotations             {rotations}");
    let budget = proxy.config().upstream.max_channels as u64;
    println!("  upstream channels     at most {peak} at once (budget {budget})");
    println!("  lost                  {}", last.lost);
    println!("  duplicated            {}", last.duplicated);
    println!("  unexpected            {}", last.unexpected);
    println!("  disconnects           {disconnects}");
    drop(desktops);
    proxy.stop().await;
    fake.stop().await;
    if last.lost + last.duplicated + last.unexpected + disconnects > 0 {
        bail!("the rotations were visible to the desktops");
    }
    if peak > budget {
        bail!("the channel budget was exceeded");
    }
    println!("\nnothing lost, duplicated or disconnected");
    Ok(())
}

/// Performs one step; returns how many rotations it completed.
async fn perform(
    step: Step,
    http: &reqwest::Client,
    fake: &str,
    proxy: &Proxy,
    secrets: &SecretDir,
) -> anyhow::Result<u32> {
    let admin = format!("http://{}", proxy.admin_addr);
    match step {
        Step::SoftRotationAtGenesys => {
            say("soft rotation: secret of demo-a regenerated at Genesys (old tokens stay valid)");
            control(
                http,
                fake,
                "POST",
                "clients/demo-a/rotate",
                json!({"mode": "keep_tokens", "secret": "a-secret-2"}),
            )
            .await?;
            Ok(0)
        }
        Step::SoftRotationFileCatchesUp => {
            say("soft rotation: the secret file of demo-a catches up");
            secrets.write("a", "a-secret-2")?;
            Ok(1)
        }
        Step::DrainA => {
            say("hard rotation: draining credential a (channels move to b, make-before-break)");
            http.post(format!("{admin}/admin/credentials/a/drain"))
                .send()
                .await?
                .error_for_status()?;
            Ok(0)
        }
        Step::HardRotationOfA => {
            let until = Instant::now() + Duration::from_secs(10);
            while proxy.pool.open_channels_of("a") > 0 {
                if Instant::now() > until {
                    bail!("credential a still has open channels 10 s after the drain");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            say(
                "hard rotation: a drained; secret of demo-a regenerated, old tokens revoked; undrain a",
            );
            control(
                http,
                fake,
                "POST",
                "clients/demo-a/rotate",
                json!({"mode": "revoke_tokens", "secret": "a-secret-3"}),
            )
            .await?;
            secrets.write("a", "a-secret-3")?;
            http.post(format!("{admin}/admin/credentials/a/undrain"))
                .send()
                .await?
                .error_for_status()?;
            Ok(1)
        }
        Step::MaintenanceClose => {
            // Genesys warns about a minute ahead; 6 s is enough here for both channels
            // to hand over one after the other through the one spare slot, even on a
            // busy machine (3 s was not, once, in CI).
            say(
                "maintenance: Genesys warns every socket (socket_closing) and closes them 6 s later",
            );
            control(
                http,
                fake,
                "POST",
                "socket-closing",
                json!({"close_after": "6s"}),
            )
            .await?;
            Ok(0)
        }
    }
}

fn say(what: &str) {
    println!("\r\x1b[2K  -> {what}");
}

fn progress(
    second: u64,
    sent: u64,
    desktops: &[Desktop],
    expected: &dyn Fn(&Desktop) -> std::collections::BTreeSet<(u64, u64)>,
    settled: u64,
    proxy: &Proxy,
    rotations: u32,
) {
    let t = tally(desktops, expected, settled);
    let disconnects = desktops.iter().filter(|d| d.disconnected()).count();
    print!(
        "\r\x1b[2Kt={second:>2}s  published {sent:>5}  delivered {:>6}  handovers {:>2}  rotations {rotations}  lost {}  duplicated {}  disconnects {disconnects}",
        t.delivered,
        proxy.pool.handovers(),
        t.lost,
        t.duplicated,
    );
    let _ = std::io::stdout().flush();
}

async fn control(
    http: &reqwest::Client,
    fake: &str,
    method: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let url = format!("{fake}/__mock/{path}");
    let request = match method {
        "GET" => http.get(url),
        _ => http.post(url).json(&body),
    };
    let response = request.send().await?.error_for_status()?;
    let bytes = response.bytes().await?;
    Ok(if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    })
}

fn demo_config(fake: &str, secrets: &SecretDir) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
# The demo's desktops are gone before it stops: nothing to drain.
drain_delay = "0s"
[admin]
listen = "127.0.0.1:0"
[genesys]
login_url = "{fake}"
api_url = "{fake}"
[[credentials]]
name = "a"
client_id = "demo-a"
client_secret_file = "{a}"
[[credentials]]
name = "b"
client_id = "demo-b"
client_secret_file = "{b}"
[handover]
lead = "3s"
overlap = "500ms"
[upstream]
max_channels = 3
"#,
        a = secrets.path("a").display(),
        b = secrets.path("b").display(),
    )
}

/// A private directory for the demo's secret files, removed at the end.
struct SecretDir(std::path::PathBuf);

impl SecretDir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("handover-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }

    /// As a mounted Kubernetes secret changes: a new file renamed over the old one.
    fn write(&self, name: &str, secret: &str) -> anyhow::Result<()> {
        let staging = self.0.join(format!(".{name}.new"));
        std::fs::write(&staging, secret).context("cannot write a secret file")?;
        std::fs::rename(&staging, self.path(name)).context("cannot replace a secret file")?;
        Ok(())
    }
}

impl Drop for SecretDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
