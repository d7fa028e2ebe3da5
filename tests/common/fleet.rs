//! Replicas of one fleet (`[cluster]`) against the fake, and what tests read of them.

use serde_json::Value;

use super::Api;
use super::proxy::{A, Secrets, proxy_config};

/// A replica's config: `max_channels = budget`, two topics per channel (so a desktop
/// with two topics wants a channel of its own), quick drains and handovers (a drain
/// waits 3 s at most for its desktops to be served elsewhere), and `[cluster]` with
/// `cluster` (its `redis_url` and more).
pub fn replica_config(
    fake: &str,
    secrets: &Secrets,
    budget: usize,
    cluster: &str,
) -> handover::config::Config {
    let extra = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\ndrain_spread = \"0s\"\nshutdown_grace = \"3s\"\n\
         [upstream]\nmax_channels = {budget}\nmax_topics_per_channel = 2\n\
         [handover]\nlead = \"3s\"\noverlap = \"300ms\"\n\
         [cluster]\n{cluster}\n"
    );
    proxy_config(fake, secrets, &[A], &extra)
}

/// What the fake counts of OAuth client `client-a`.
pub struct ClientCount {
    pub peak: u64,
    pub live: u64,
    pub evictions: u64,
}

pub async fn client_count(fake: &Api) -> ClientCount {
    let stats: Value = fake.get("/__mock/stats").await.body;
    let client = &stats["clients"]["client-a"];
    ClientCount {
        peak: client["peak_channels"].as_u64().expect("peak"),
        live: client["live_channels"].as_u64().expect("live"),
        evictions: stats["counters"]["evictions"].as_u64().expect("evictions"),
    }
}

/// Starts a replica and waits until its `/readyz` says 200, as a balancer would
/// before it sends it a desktop.
pub async fn start_replica(config: handover::config::Config) -> (handover::app::Proxy, Api, Api) {
    let (proxy, client, admin) = super::proxy::start_proxy(config).await;
    super::wait_for("the replica to be ready", || {
        let admin = admin.clone();
        async move {
            let status = admin
                .http
                .get(format!("{}/readyz", admin.base))
                .send()
                .await;
            status
                .is_ok_and(|response| response.status().is_success())
                .then_some(())
        }
    })
    .await;
    (proxy, client, admin)
}
