//! The fleet as operators run it: three `handover serve` processes on a real
//! `redis-server`, behind a TCP balancer that follows their readiness, 200 desktops
//! that behave as the SDK clients do (on a close they reconnect to the same
//! `connectUri`, on a 404 they make a new channel) and a paced event stream.
//!
//! - A rolling restart (each replica in turn: a new one comes up, the old one gets
//!   SIGTERM and drains) is invisible: no event lost or duplicated, no gap notice,
//!   never more channels than the budget.
//! - A replica killed (SIGKILL) mid-stream loses nothing silently: every event
//!   reaches every desktop or falls inside a gap notice it received.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::redis_server::RedisServer;
use handover::soak::rollout::{Disruption, RolloutConfig, RolloutReport, run};

fn config(redis: &RedisServer, disruption: Disruption) -> RolloutConfig {
    RolloutConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_handover")),
        redis.url(),
        disruption,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_replicas_is_invisible_to_200_desktops() {
    let redis = RedisServer::start().await;
    let report = run(config(&redis, Disruption::Rollout))
        .await
        .expect("the rollout runs");
    let table = report.table();
    println!("{table}");
    let v = &report.verdict;
    assert!(v.expected > 0, "events were expected: {table}");
    assert_eq!(v.lost, 0, "lost: {table}");
    assert_eq!(v.duplicated, 0, "duplicated: {table}");
    assert_eq!(v.gaps, 0, "gap notices: {table}");
    kept_channels_within_budget(&report, &table);
    assert_eq!(report.clean_exits, report.stopped, "exits: {table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_loses_nothing_silently() {
    let redis = RedisServer::start().await;
    // As many topics as desktops: many topics are wanted on one replica only, so
    // what the killed one alone carried is really missing until another takes over.
    let report = run(RolloutConfig {
        topics: 200,
        ..config(&redis, Disruption::Kill)
    })
    .await
    .expect("the run completes");
    let table = report.table();
    println!("{table}");
    let v = &report.verdict;
    assert!(v.expected > 0, "events were expected: {table}");
    assert_eq!(
        v.lost, 0,
        "every event reached its desktops or fell in a gap they were told of: {table}"
    );
    assert_eq!(v.gaps_without_cause, 0, "{table}");
    // Duplicates only of events sent shortly before the kill (the README's bound).
    assert_eq!(v.duplicated_without_cause, 0, "{table}");
    assert!(
        v.duplicated_before_fault <= Some(Duration::from_secs(2)),
        "duplicates of events sent long before the kill: {:?}\n{table}",
        v.duplicated_before_fault
    );
    println!(
        "duplicated {} events, sent at most {:?} before the kill",
        v.duplicated, v.duplicated_before_fault
    );
    kept_channels_within_budget(&report, &table);
}

/// No desktop lost its channel (a 404), and the fake never saw more of the OAuth
/// client's channels than the budget, nor evicted one.
fn kept_channels_within_budget(report: &RolloutReport, table: &str) {
    assert_eq!(
        report.new_channels, 0,
        "a desktop lost its channel: {table}"
    );
    assert!(
        report.peak_channels <= report.budget as u64 && report.evictions == 0,
        "budget: {table}"
    );
}
