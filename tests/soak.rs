//! The chaos soak, one minute of it: the promise holds while every kind of fault a
//! real edge sees is injected (`handover soak --duration 10m` runs the long one).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_chaos_keeps_every_invariant() {
    let config = handover::soak::SoakConfig::new(
        env!("CARGO_BIN_EXE_handover").into(),
        std::time::Duration::from_secs(60),
        1,
    );
    let report = handover::soak::run(config).await.expect("the soak runs");
    println!("{}", report.table());
    assert!(
        report.passed(),
        "an invariant was violated:\n{}",
        report.table()
    );
}
