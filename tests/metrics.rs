//! `/metrics` as Prometheus reads it: parsed by the Prometheus project's own strict
//! OpenMetrics parser, with every metric the operator's dashboard and alerts use, and
//! the counters moving as the proxy works (events, a handover, a 429, a client's
//! close).

mod common;

use std::time::Duration;

use common::clients::parse_metrics;
use common::proxy::*;
use common::*;
use handover::mock::Settings;
use serde_json::{Value, json};

async fn scrape(admin: &Api) -> Value {
    let reply = admin
        .send(admin.http.get(format!("{}/metrics", admin.base)))
        .await;
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        reply.headers
    );
    parse_metrics(reply.body.as_str().unwrap()).await
}

/// The value of `sample` in `family` whose labels include `labels`, summed (0 for a
/// family with no samples yet).
fn value(metrics: &Value, family: &str, sample: &str, labels: &[(&str, &str)]) -> f64 {
    metrics[family]["samples"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s[0] == sample && labels.iter().all(|(k, v)| s[1][k] == *v))
        .map(|s| s[2].as_f64().unwrap())
        .sum()
}

#[tokio::test]
async fn metrics_parse_and_move() {
    let extra = "[handover]\nlead = \"2s\"\noverlap = \"300ms\"\n";
    let w = World::start(&[A], Duration::from_secs(6), Settings::default(), extra).await;
    let watched = topics("v2.metrics", 2);
    let desktops = vec![desktop(&w.client, &watched).await];
    let before = scrape(&w.admin).await;

    // Work: events, at least one handover, a throttled subscription call, and a
    // desktop that logs out.
    let stream = start_stream(&w.fake_api, &watched, 100.0, 300).await;
    wait_for("a handover", || {
        let pool = w.proxy.pool.clone();
        async move { (pool.handovers() >= 1).then_some(()) }
    })
    .await;
    w.fake_api
        .patch_settings(json!({"rate_limit_per_min": 1, "rate_window": "1s"}))
        .await;
    let late = desktop(&w.client, &["v2.metrics.late".to_owned()]).await;
    // A second change right after the first: the channel's token made a call within
    // the second, whatever the machine's speed.
    let second = w
        .client
        .send(
            w.client
                .http
                .post(format!(
                    "{}/api/v2/notifications/channels/{}/subscriptions",
                    w.client.base, late.channel
                ))
                .json(&json!([{ "id": "v2.metrics.late2" }])),
        )
        .await;
    assert_eq!(second.status, 200, "{}", second.body);
    w.fake_api
        .patch_settings(json!({"rate_limit_per_min": 300, "rate_window": "60s"}))
        .await;
    drop(late);
    let created = w.client.post("/api/v2/notifications/channels").await;
    let mut leaving = connect(created.body["connectUri"].as_str().unwrap()).await;
    let logout = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "logout".into(),
    };
    leaving.close(Some(logout)).await.unwrap();
    // The front door refuses a foreign page, a rebinding Host, and a browser at the
    // admin listener.
    let foreign_page = w.client.send(
        w.client
            .http
            .get(format!("{}/api/v2/notifications/channels", w.client.base))
            .header("Origin", "https://elsewhere.example"),
    );
    let rebound = w.client.send(
        w.client
            .http
            .get(format!("{}/api/v2/notifications/channels", w.client.base))
            .header("Host", "attacker.example"),
    );
    let browser_at_admin = w.admin.send(
        w.admin
            .http
            .get(format!("{}/admin/credentials", w.admin.base))
            .header("Origin", "https://elsewhere.example"),
    );
    for refused in [foreign_page.await, rebound.await, browser_at_admin.await] {
        assert_eq!(refused.status, 403, "{:?}", refused.body);
    }
    stream_done(&w.fake_api, stream, tokio::time::Instant::now() + DEADLINE).await;
    settle(&desktops, &|d| d.expected(stream, &watched, 300)).await;

    let after = wait_for("the counters to settle", || {
        let admin = w.admin.clone();
        async move {
            let m = scrape(&admin).await;
            (value(
                &m,
                "handover_client_closes",
                "handover_client_closes_total",
                &[("by", "client"), ("code", "1000")],
            ) == 1.0)
                .then_some(m)
        }
    })
    .await;

    // Every family, with its type.
    for (family, kind) in [
        ("handover_build", "info"),
        ("handover_token_mints", "counter"),
        ("handover_upstream_requests", "counter"),
        ("handover_handovers", "counter"),
        ("handover_handover_duration_seconds", "histogram"),
        ("handover_rebuilds", "counter"),
        ("handover_gap_notices", "counter"),
        ("handover_client_closes", "counter"),
        ("handover_events_received", "counter"),
        ("handover_events_delivered", "counter"),
        ("handover_events_deduplicated", "counter"),
        ("handover_client_queue_drops", "counter"),
        ("handover_token_expires_in_seconds", "gauge"),
        ("handover_budget_slots_used", "gauge"),
        ("handover_budget_slots_free", "gauge"),
        ("handover_budget_slots_allowed", "gauge"),
        ("handover_upstream_foreign_channels", "gauge"),
        ("handover_upstream_evictions_avoided", "counter"),
        ("handover_upstream_channels", "gauge"),
        ("handover_upstream_sockets", "gauge"),
        ("handover_client_channels", "gauge"),
        ("handover_client_sockets", "gauge"),
        ("handover_topics", "gauge"),
        ("handover_tasks", "gauge"),
        ("handover_requests_refused", "counter"),
        ("handover_admin_requests_refused", "counter"),
        ("handover_peers", "gauge"),
        ("handover_connections_open", "gauge"),
        ("handover_connections_refused", "counter"),
        ("handover_accept_errors", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
    ] {
        assert_eq!(after[family]["type"], kind, "{family} in {after}");
    }
    assert_eq!(
        value(
            &after,
            "handover_build",
            "handover_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // The counters moved.
    let moved = |family: &str, sample: &str, labels: &[(&str, &str)]| {
        value(&after, family, sample, labels) - value(&before, family, sample, labels)
    };
    assert!(
        moved(
            "handover_events_received",
            "handover_events_received_total",
            &[]
        ) >= 300.0
    );
    assert!(
        moved(
            "handover_events_delivered",
            "handover_events_delivered_total",
            &[]
        ) >= 300.0
    );
    assert!(
        moved(
            "handover_handovers",
            "handover_handovers_total",
            &[("reason", "expiry")]
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "handover_handover_duration_seconds",
            "handover_handover_duration_seconds_count",
            &[("reason", "expiry")]
        ) >= 1.0
    );
    assert!(
        moved(
            "handover_token_mints",
            "handover_token_mints_total",
            &[("credential", "a"), ("outcome", "minted")]
        ) >= 1.0
    );
    assert!(
        moved(
            "handover_upstream_requests",
            "handover_upstream_requests_total",
            &[("route", "subscriptions"), ("status", "429")]
        ) >= 1.0,
        "the 429 shows"
    );
    assert!(
        moved(
            "handover_upstream_requests",
            "handover_upstream_requests_total",
            &[("route", "create_channel"), ("status", "200")]
        ) >= 1.0
    );
    for reason in ["origin", "host"] {
        assert_eq!(
            moved(
                "handover_requests_refused",
                "handover_requests_refused_total",
                &[("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        moved(
            "handover_admin_requests_refused",
            "handover_admin_requests_refused_total",
            &[("reason", "forbidden")]
        ),
        1.0
    );
    // Gauges say where things stand.
    assert!(
        value(
            &after,
            "handover_connections_open",
            "handover_connections_open",
            &[("listener", "client")]
        ) >= 1.0,
        "the desktop's socket is a connection"
    );
    let slots = value(
        &after,
        "handover_budget_slots_used",
        "handover_budget_slots_used",
        &[],
    ) + value(
        &after,
        "handover_budget_slots_free",
        "handover_budget_slots_free",
        &[],
    );
    assert_eq!(slots, 4.0, "used and free make the budget");
    let gauge = |family: &str| value(&after, family, family, &[]);
    assert_eq!(
        gauge("handover_budget_slots_allowed"),
        4.0,
        "nobody else holds a channel"
    );
    assert_eq!(gauge("handover_upstream_foreign_channels"), 0.0);
    assert_eq!(
        value(
            &after,
            "handover_upstream_evictions_avoided",
            "handover_upstream_evictions_avoided_total",
            &[]
        ),
        0.0
    );
    let expiring = after["handover_token_expires_in_seconds"]["samples"]
        .as_array()
        .unwrap();
    assert!(!expiring.is_empty());
    for sample in expiring {
        assert!(
            sample[1]["channel"].as_str().unwrap().starts_with("ch-"),
            "{sample}"
        );
        let left = sample[2].as_f64().unwrap();
        assert!(left > 0.0 && left <= 6.0, "{sample}");
    }
    assert!(
        value(
            &after,
            "process_resident_memory_bytes",
            "process_resident_memory_bytes",
            &[]
        ) > 1e6
    );
    assert!(value(&after, "process_open_fds", "process_open_fds", &[]) > 3.0);
    assert_eq!(
        value(
            &after,
            "handover_client_sockets",
            "handover_client_sockets",
            &[]
        ),
        1.0
    );
    // Nothing secret in it.
    let text = w.admin.get("/metrics").await.body;
    let text = text.as_str().unwrap();
    assert!(
        !text.contains("secret-a") && !text.contains("streaming-0-"),
        "{text}"
    );
}
