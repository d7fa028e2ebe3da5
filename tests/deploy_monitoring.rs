//! The Grafana dashboard and the Prometheus alerts an operator imports cannot rot:
//! every metric they query is one the proxy exposes (with `[cluster]`, against a real
//! `redis-server`). (`.ci/run` also checks the
//! rules with `promtool check rules` and their unit tests with `promtool test rules`.)

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::proxy::*;
use common::redis_server::RedisServer;
use handover::mock::Settings;

const DASHBOARD: &str = include_str!("../deploy/grafana/handover.json");
const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yaml");

/// The metric families an expression queries (`handover_…`, `process_…`), by family
/// name: counters without `_total`, histograms without `_bucket`/`_count`/`_sum`.
fn families(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in expr.match_indices(['h', 'p']) {
        let rest = &expr[at..];
        if !(rest.starts_with("handover_") || rest.starts_with("process_")) {
            continue;
        }
        if at > 0 && expr[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_owned();
        found.insert(family);
    }
    found
}

#[tokio::test]
async fn the_dashboard_and_alerts_query_only_metrics_the_proxy_exposes() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(families(target["expr"].as_str().expect("an expr")));
        }
    }
    let alert_exprs: Vec<&str> = ALERTS
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert!(alert_exprs.len() >= 6, "the alerts: {alert_exprs:?}");
    for expr in alert_exprs {
        queried.extend(families(expr));
    }

    // With [cluster], so that the fleet's metrics are there too.
    let redis = RedisServer::start().await;
    let cluster = format!("[cluster]\nredis_url = \"{}\"\n", redis.url());
    let w = World::start(
        &[A],
        Duration::from_secs(3600),
        Settings::default(),
        &cluster,
    )
    .await;
    let _desktop = desktop(&w.client, &["v2.monitored".to_owned()]).await;
    let exposed = w.admin.get("/metrics").await.body;
    let declared: BTreeSet<&str> = exposed
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|family| !declared.contains(family.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exposed: {missing:?}\nexposed: {declared:?}"
    );
}

#[test]
fn the_scan_finds_families() {
    let names: Vec<String> = families(
        "histogram_quantile(0.99, sum by (le) (rate(handover_handover_duration_seconds_bucket[5m]))) + process_open_fds",
    )
    .into_iter()
    .collect();
    assert_eq!(
        names,
        ["handover_handover_duration_seconds", "process_open_fds"]
    );
}
