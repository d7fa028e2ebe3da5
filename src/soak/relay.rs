//! A chaos TCP relay: the proxy reaches the fake Genesys Cloud only through it, and
//! the soak's scheduler tells it to cut, stall (black-hole), delay or throttle the
//! connections it carries. It speaks no protocol; it only tells a notification
//! socket (`GET /channels/…`) from a REST connection by the first bytes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the relay does to one connection's bytes right now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Condition {
    Normal,
    /// Forward nothing, close nothing: a black hole.
    Stalled,
    /// Hold each chunk this long before forwarding it.
    Delayed(Duration),
    /// At most this many bytes a second.
    Throttled(u64),
    /// Close both ends now.
    Cut,
}

/// Which kind of connection: a notification socket, or REST calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Socket,
    Rest,
}

struct Link {
    kind: Kind,
    condition: watch::Sender<Condition>,
}

/// One connection the relay carries.
pub struct LinkHandle(Arc<Link>);

impl LinkHandle {
    pub fn set(&self, condition: Condition) {
        let _ = self.0.condition.send(condition);
    }
}

/// A running relay.
pub struct Relay {
    links: Arc<Mutex<Vec<Arc<Link>>>>,
}

impl Relay {
    /// Forwards every connection `listener` accepts to `upstream`.
    pub fn start(
        listener: TcpListener,
        upstream: SocketAddr,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> std::io::Result<Relay> {
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let relay = Relay {
            links: links.clone(),
        };
        let spawner = tasks.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = shutdown.cancelled() => return,
                };
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (links, shutdown) = (links.clone(), shutdown.clone());
                spawner.spawn(async move {
                    let _ = carry(client, upstream, links, shutdown).await;
                });
            }
        });
        Ok(relay)
    }

    /// Sets `condition` on every live connection of `kind` for which `pick` says so
    /// (given its index among them); returns them, to change them again later.
    pub fn apply(
        &self,
        kind: Kind,
        condition: Condition,
        pick: &mut dyn FnMut(usize) -> bool,
    ) -> Vec<LinkHandle> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|link| !link.condition.is_closed());
        let mut hit = Vec::new();
        for (i, link) in links.iter().filter(|l| l.kind == kind).enumerate() {
            if pick(i) {
                let _ = link.condition.send(condition);
                hit.push(LinkHandle(link.clone()));
            }
        }
        hit
    }

    /// Live connections of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|link| !link.condition.is_closed());
        links.iter().filter(|l| l.kind == kind).count()
    }
}

async fn carry(
    mut client: TcpStream,
    upstream: SocketAddr,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // The first bytes say what the connection is for.
    let mut first = vec![0u8; 4096];
    let n = client.read(&mut first).await?;
    first.truncate(n);
    let kind = if first.starts_with(b"GET /channels/") {
        Kind::Socket
    } else {
        Kind::Rest
    };
    server.write_all(&first).await?;
    let (condition, watching) = watch::channel(Condition::Normal);
    links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::new(Link { kind, condition }));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pump(client_read, server_write, watching.clone()) => {}
        _ = pump(server_read, client_write, watching.clone()) => {}
        _ = shutdown.cancelled() => {}
    }
    // Dropping `watching` (and the other receivers) marks the link closed.
    Ok(())
}

/// Copies one direction under the connection's current condition; ends on EOF, an
/// error, or a cut. Reading and writing are apart so that a delay is latency (each
/// chunk leaves its delay after it came in) and a throttle is bandwidth.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    condition: watch::Receiver<Condition>,
) {
    let (chunks, mut queued) = tokio::sync::mpsc::channel::<(Vec<u8>, Instant)>(256);
    let mut reading = condition.clone();
    let reader = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            if !passable(&mut reading).await {
                return;
            }
            let n = tokio::select! {
                read = from.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                changed = reading.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let delay = match *reading.borrow() {
                Condition::Delayed(delay) => delay,
                _ => Duration::ZERO,
            };
            if chunks
                .send((buffer[..n].to_vec(), Instant::now() + delay))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let mut writing = condition;
    let writer = async move {
        while let Some((chunk, due)) = queued.recv().await {
            if !passable(&mut writing).await {
                return;
            }
            let hold = match *writing.borrow() {
                Condition::Throttled(rate) => {
                    Duration::from_secs_f64(chunk.len() as f64 / rate.max(1) as f64)
                }
                _ => Duration::ZERO,
            };
            let until = due.max(Instant::now() + hold);
            // A cut during the hold applies at once.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    changed = writing.changed() => {
                        if changed.is_err() || *writing.borrow() == Condition::Cut {
                            return;
                        }
                    }
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

/// Waits while the connection is stalled (a black hole: nothing passes, nothing
/// closes); `false` once it is cut or gone.
async fn passable(condition: &mut watch::Receiver<Condition>) -> bool {
    loop {
        match *condition.borrow_and_update() {
            Condition::Cut => return false,
            Condition::Stalled => {}
            _ => return true,
        }
        if condition.changed().await.is_err() {
            return false;
        }
    }
}
