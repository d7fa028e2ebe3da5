//! Crowds at the front door: a slowloris crowd that drips its headers, and a crowd
//! of idle connections past the connection cap, both cut off (the first by the
//! header read timeout, the second by the cap and the keep-alive idle timeout),
//! while a well-behaved desktop keeps receiving every event. The binary under a low
//! open-file limit is `tests/serve_front.rs`.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::mock::{ServiceTimes, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);
const CAP: usize = 60;

/// Drips a header line every 200 ms until the proxy closes the connection; how long
/// the connection lived.
async fn slowloris(addr: std::net::SocketAddr) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream
        .write_all(b"GET /api/v2/notifications/channels HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await;
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { break },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if stream.write_all(b"x-drip: 1\r\n").await.is_err() { break }
            }
        }
        assert!(
            started.elapsed() < DEADLINE,
            "a slowloris connection was never cut off"
        );
    }
    started.elapsed()
}

/// Connects and sends nothing; what the proxy answered (a 503 or nothing) and how
/// long until it closed the connection.
async fn idle(addr: std::net::SocketAddr) -> (bool, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("an idle connection was never closed");
    (answer.starts_with(b"HTTP/1.1 503"), started.elapsed())
}

#[tokio::test]
async fn slowloris_and_idle_crowds_are_cut_off_while_a_desktop_keeps_every_event() {
    let w = World::start(
        &[A],
        Duration::from_secs(3600),
        Settings {
            service_times: ServiceTimes::NONE,
            ..Settings::default()
        },
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\n\
             keep_alive_idle = \"500ms\"\nmax_connections = {CAP}\n"
        ),
    )
    .await;
    let addr = w.proxy.client_addr;
    let topic = "v2.users.42.presence";
    let mut desktop = connect(&format!("ws://{addr}/stream?topics={topic}")).await;
    let events = 150;
    let stream = start_stream(&w.fake_api, &[topic.to_owned()], 50.0, events).await;
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < events as usize {
            match next_non_heartbeat(&mut desktop).await {
                Next::Text(frame) => seqs.push(frame["eventBody"]["seq"].as_u64().unwrap()),
                Next::Closed(code) => panic!("the desktop was disconnected ({code:?})"),
            }
        }
        seqs
    });

    // Both crowds at once, more connections than the cap allows.
    let drippers: Vec<_> = (0..30).map(|_| tokio::spawn(slowloris(addr))).collect();
    let idlers: Vec<_> = (0..80).map(|_| tokio::spawn(idle(addr))).collect();
    let mut cut_after = Vec::new();
    for dripper in drippers {
        cut_after.push(dripper.await.unwrap());
    }
    let slowest = cut_after.iter().max().unwrap();
    assert!(
        *slowest < HEADER_READ_TIMEOUT + Duration::from_millis(1500),
        "slowloris connections lived up to {slowest:?}"
    );
    let mut refused = 0;
    let mut longest = Duration::ZERO;
    for idler in idlers {
        let (got_503, lived) = idler.await.unwrap();
        refused += usize::from(got_503);
        longest = longest.max(lived);
    }
    // The desktop holds one slot, the drippers up to 30: at least 80 − 29 idlers
    // found the cap and were answered 503 at once; the others were closed idle.
    assert!(
        refused >= 80 - (CAP - 31),
        "only {refused} idle connections got a 503"
    );
    assert!(
        longest < HEADER_READ_TIMEOUT + Duration::from_millis(1500),
        "idle connections lived up to {longest:?}"
    );

    // The crowds are gone: a new desktop gets in, and the first one missed nothing.
    assert_eq!(
        w.client.post("/api/v2/notifications/channels").await.status,
        200
    );
    let seqs = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the desktop got its events in time")
        .unwrap();
    assert_eq!(
        seqs,
        (0..events).collect::<Vec<_>>(),
        "every event, once, in order"
    );
    stream_done(&w.fake_api, stream, Instant::now() + DEADLINE).await;
}
