//! `handover demo` as a user runs it: it ends on its own, in under a minute, and
//! exits 0 only if no desktop saw a loss, a duplicate or a disconnect.

use std::time::Duration;

use tokio::process::Command;

#[tokio::test]
async fn the_demo_hides_every_rotation_and_exits_0_within_a_minute() {
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(env!("CARGO_BIN_EXE_handover"))
            .arg("demo")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo ends within a minute")
    .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("nothing lost, duplicated or disconnected"),
        "{stdout}"
    );
    assert!(stdout.contains("lost                  0"));
    assert!(started.elapsed() < Duration::from_secs(60));
}
