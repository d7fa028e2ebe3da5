//! The faults the soak injects, at seeded random times: everything a real edge sees,
//! from planned rotations to black holes. Each fault says whether it may lose events
//! upstream (clients must then be told of the gap) or must be invisible.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;

use super::desktop::Desktop;
use super::judge::Fault;
use super::relay::{Condition, Kind, Relay};

/// Every kind of fault, with its weight in the draw.
const KINDS: [(&str, u32); 15] = [
    ("soft rotation", 3),
    ("hard rotation", 2),
    ("socket_closing", 3),
    ("token throttling", 2),
    ("token endpoint outage", 2),
    ("API 429s", 2),
    ("wholesale 400", 2),
    ("revocation", 2),
    ("socket cut", 2),
    ("black hole", 2),
    ("slow socket", 2),
    ("throttled REST", 2),
    ("client churn", 4),
    ("abandoned subscribe", 2),
    ("stalled client", 3),
];

/// Whether a kind may lose events upstream.
fn unplanned(kind: &str) -> bool {
    matches!(kind, "revocation" | "socket cut" | "black hole")
}

/// A desktop that left: its topics and what it saw.
pub type Departed = (Vec<String>, Arc<std::sync::Mutex<super::desktop::Log>>);

/// What the scheduler acts on.
pub struct Stage {
    pub http: reqwest::Client,
    /// The fake's base URL (control API).
    pub fake: String,
    /// The proxy's client and admin base URLs.
    pub client: String,
    pub admin: String,
    pub relay: Arc<Relay>,
    pub secrets: std::path::PathBuf,
    pub desktops: Arc<Mutex<Vec<Desktop>>>,
    /// Desktops that left, with their logs (for the judge).
    pub departed: Arc<Mutex<Vec<Departed>>>,
    pub topics: Vec<String>,
    pub topics_per_desktop: usize,
    /// The fake's heartbeat: a black hole lasts long enough to be noticed.
    pub heartbeat: Duration,
    pub tasks: TaskTracker,
}

/// Injects faults until `until`, at intervals drawn around `mean`; returns what it did.
pub async fn run(
    stage: Arc<Stage>,
    seed: u64,
    mean: Duration,
    until: tokio::time::Instant,
) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let total: u32 = KINDS.iter().map(|(_, w)| w).sum();
    let hard_rotation = Arc::new(tokio::sync::Mutex::new(0u64));
    let mut faults = Vec::new();
    loop {
        let wait = mean.mul_f64(rng.random_range(0.3..1.7));
        if tokio::time::Instant::now() + wait >= until {
            return faults;
        }
        tokio::time::sleep(wait).await;
        let mut draw = rng.random_range(0..total);
        let kind = KINDS
            .iter()
            .find(|(_, w)| {
                if draw < *w {
                    true
                } else {
                    draw -= w;
                    false
                }
            })
            .map(|(k, _)| *k)
            .unwrap_or("soft rotation");
        let fault_seed: u64 = rng.random();
        if inject(&stage, kind, fault_seed, &hard_rotation).await {
            tracing::info!(target: "soak", kind, unplanned = unplanned(kind), "fault injected");
            faults.push(Fault {
                kind,
                at: SystemTime::now(),
                unplanned: unplanned(kind),
            });
        }
    }
}

/// Injects one fault; `false` if it could not be (nothing to act on).
async fn inject(
    stage: &Arc<Stage>,
    kind: &'static str,
    seed: u64,
    hard_rotation: &Arc<tokio::sync::Mutex<u64>>,
) -> bool {
    let mut rng = StdRng::seed_from_u64(seed);
    let later =
        |after: Duration, work: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            stage.tasks.spawn(async move {
                tokio::time::sleep(after).await;
                work.await;
            });
        };
    match kind {
        "soft rotation" => {
            let (name, client) = if rng.random_bool(0.5) {
                ("a", "client-a")
            } else {
                ("b", "client-b")
            };
            let secret = format!("{name}-{:x}", rng.random::<u64>());
            control(
                stage,
                "POST",
                &format!("clients/{client}/rotate"),
                json!({"mode": "keep_tokens", "secret": secret}),
            )
            .await;
            // The file catches up later, as in real life.
            let (stage, delay) = (
                stage.clone(),
                Duration::from_millis(rng.random_range(300..2000)),
            );
            later(
                delay,
                Box::pin(async move { write_secret(&stage.secrets, name, &secret) }),
            );
            true
        }
        "hard rotation" => {
            let Ok(guard) = hard_rotation.clone().try_lock_owned() else {
                return false;
            };
            let (name, client) = if rng.random_bool(0.5) {
                ("a", "client-a")
            } else {
                ("b", "client-b")
            };
            let secret = format!("{name}-{:x}", rng.random::<u64>());
            let stage = stage.clone();
            stage.tasks.clone().spawn(async move {
                let _one_at_a_time = guard;
                hard_rotate(&stage, name, client, &secret).await;
            });
            true
        }
        "socket_closing" => {
            let Some(channel) = some_fake_channel(stage, &mut rng).await else {
                return false;
            };
            control(
                stage,
                "POST",
                "socket-closing",
                json!({"channels": [channel], "close_after": "2s"}),
            )
            .await;
            true
        }
        "token throttling" => {
            control(
                stage,
                "POST",
                "faults/token",
                json!({"mode": "throttle", "count": 3}),
            )
            .await;
            true
        }
        "token endpoint outage" => {
            control(
                stage,
                "POST",
                "faults/token",
                json!({"mode": "outage", "status": 503}),
            )
            .await;
            let stage = stage.clone();
            later(
                Duration::from_millis(rng.random_range(1500..3000)),
                Box::pin(async move {
                    control(&stage, "POST", "faults/token", json!({"mode": "none"})).await;
                }),
            );
            true
        }
        "API 429s" => {
            control(
                stage,
                "PATCH",
                "settings",
                json!({"rate_limit_per_min": 4, "rate_window": "2s"}),
            )
            .await;
            let stage = stage.clone();
            later(
                Duration::from_secs(3),
                Box::pin(async move {
                    control(
                        &stage,
                        "PATCH",
                        "settings",
                        json!({"rate_limit_per_min": 300, "rate_window": "60s"}),
                    )
                    .await;
                }),
            );
            true
        }
        "wholesale 400" => {
            control(
                stage,
                "POST",
                "faults/subscriptions",
                json!({"count": rng.random_range(1..3)}),
            )
            .await;
            true
        }
        "revocation" => {
            let Some(channel) = some_fake_channel(stage, &mut rng).await else {
                return false;
            };
            control(stage, "POST", "revoke", json!({"channel": channel})).await;
            true
        }
        "socket cut" => one_link(stage, Kind::Socket, Condition::Cut, &mut rng, None),
        "black hole" => {
            let lasting = stage.heartbeat * 3 + Duration::from_secs(1);
            one_link(
                stage,
                Kind::Socket,
                Condition::Stalled,
                &mut rng,
                Some((lasting, Condition::Cut)),
            )
        }
        "slow socket" => one_link(
            stage,
            Kind::Socket,
            Condition::Delayed(Duration::from_millis(rng.random_range(50..300))),
            &mut rng,
            Some((Duration::from_secs(2), Condition::Normal)),
        ),
        "throttled REST" => {
            let throttled =
                stage
                    .relay
                    .apply(Kind::Rest, Condition::Throttled(20_000), &mut |_| true);
            later(
                Duration::from_secs(3),
                Box::pin(async move {
                    for link in throttled {
                        link.set(Condition::Normal);
                    }
                }),
            );
            true
        }
        "client churn" | "abandoned subscribe" => {
            let mut desktops = stage.desktops.lock().await;
            if desktops.is_empty() {
                return false;
            }
            let leaving = if kind == "abandoned subscribe" {
                // A newcomer that leaves while it is still subscribing.
                Desktop::start(
                    stage.http.clone(),
                    stage.client.clone(),
                    pick_topics(stage, &mut rng),
                )
            } else {
                // One leaves, another joins.
                let at = rng.random_range(0..desktops.len());
                let topics = pick_topics(stage, &mut rng);
                desktops.push(Desktop::start(
                    stage.http.clone(),
                    stage.client.clone(),
                    topics,
                ));
                desktops.swap_remove(at)
            };
            drop(desktops);
            if kind == "abandoned subscribe" {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
            }
            let topics = leaving.topics.clone();
            let log = leaving.leave().await;
            stage.departed.lock().await.push((topics, log));
            true
        }
        "stalled client" => {
            let desktops = stage.desktops.lock().await;
            if desktops.is_empty() {
                return false;
            }
            let at = rng.random_range(0..desktops.len());
            desktops[at].stall(Duration::from_millis(rng.random_range(500..12_000)));
            true
        }
        _ => false,
    }
}

/// The operator's hard rotation: drain, wait until the credential holds no channel,
/// regenerate its secret (old tokens die at once), write it, undrain.
async fn hard_rotate(stage: &Stage, name: &str, client: &str, secret: &str) {
    let drained = stage
        .http
        .post(format!("{}/admin/credentials/{name}/drain", stage.admin))
        .send()
        .await;
    if !drained.is_ok_and(|r| r.status() == reqwest::StatusCode::ACCEPTED) {
        return; // the other credential is not usable right now (409)
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut quiet_since = None;
    while tokio::time::Instant::now() < until {
        let open = channels_of(stage, name).await;
        match (open, quiet_since) {
            (Some(0), None) => quiet_since = Some(tokio::time::Instant::now()),
            (Some(0), Some(since)) if since.elapsed() >= Duration::from_secs(1) => {
                control(
                    stage,
                    "POST",
                    &format!("clients/{client}/rotate"),
                    json!({"mode": "revoke_tokens", "secret": secret}),
                )
                .await;
                write_secret(&stage.secrets, name, secret);
                break;
            }
            (Some(0), Some(_)) => {}
            _ => quiet_since = None,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stage
        .http
        .post(format!("{}/admin/credentials/{name}/undrain", stage.admin))
        .send()
        .await;
}

async fn channels_of(stage: &Stage, name: &str) -> Option<u64> {
    let list: Value = stage
        .http
        .get(format!("{}/admin/credentials", stage.admin))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    list.as_array()?.iter().find(|c| c["name"] == name)?["channels"].as_u64()
}

fn pick_topics(stage: &Stage, rng: &mut StdRng) -> Vec<String> {
    let mut topics: Vec<String> = (0..stage.topics_per_desktop)
        .map(|_| stage.topics[rng.random_range(0..stage.topics.len())].clone())
        .collect();
    topics.sort();
    topics.dedup();
    topics
}

/// A random channel the fake holds that has a socket.
async fn some_fake_channel(stage: &Stage, rng: &mut StdRng) -> Option<String> {
    let stats: Value = stage
        .http
        .get(format!("{}/__mock/stats", stage.fake))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let with_socket: Vec<String> = stats["channels"]
        .as_array()?
        .iter()
        .filter(|c| c["socket"] == true)
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect();
    (!with_socket.is_empty()).then(|| with_socket[rng.random_range(0..with_socket.len())].clone())
}

/// Sets `condition` on one random live link of `kind`, and `then` after a while.
fn one_link(
    stage: &Arc<Stage>,
    kind: Kind,
    condition: Condition,
    rng: &mut StdRng,
    then: Option<(Duration, Condition)>,
) -> bool {
    let count = stage.relay.count(kind);
    if count == 0 {
        return false;
    }
    let chosen = rng.random_range(0..count);
    let hit = stage.relay.apply(kind, condition, &mut |i| i == chosen);
    let any = !hit.is_empty();
    if let Some((after, next)) = then {
        stage.tasks.spawn(async move {
            tokio::time::sleep(after).await;
            for link in hit {
                link.set(next);
            }
        });
    }
    any
}

async fn control(stage: &Stage, method: &str, path: &str, body: Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let _ = stage
        .http
        .request(method, format!("{}/__mock/{path}", stage.fake))
        .json(&body)
        .send()
        .await;
}

/// Writes a secret the way a mounted Kubernetes secret changes: a new file renamed
/// over the old one.
pub fn write_secret(dir: &std::path::Path, name: &str, secret: &str) {
    let staging = dir.join(format!(".{name}.new"));
    if std::fs::write(&staging, format!("{secret}\n")).is_ok() {
        let _ = std::fs::rename(&staging, dir.join(name));
    }
}
