//! `/__mock/…`: the fake's control API, for tests, the demo and the benches.
//!
//! | call | body | effect |
//! |---|---|---|
//! | `GET /__mock/stats` | | per OAuth client tokens and channels (live, peak, evicted), sockets, subscriptions, events, rejected calls |
//! | `POST /__mock/clients` | `{"id","secret","token_ttl":"30s"}` | add an OAuth client |
//! | `POST /__mock/clients/{id}/rotate` | `{"mode":"keep_tokens"\|"revoke_tokens","secret"?}` | regenerate the secret → `{"secret"}` |
//! | `POST /__mock/revoke` | `{"token"}` \| `{"client_id"}` \| `{"channel"}` | revoke tokens → `{"revoked":n}` |
//! | `POST /__mock/publish` | `{"topic","body"?}` | one event → `{"seq","delivered"}` |
//! | `POST /__mock/streams` | `{"topics","rate","count","body"?}` | paced events → `{"stream"}` |
//! | `GET`/`DELETE /__mock/streams/{id}` | | progress / stop |
//! | `POST /__mock/socket-closing` | `{"channels"?,"close_after":"60s"}` | maintenance warning, then close |
//! | `POST /__mock/stall` | `{"channels"?}` | sockets go silent without closing (no events, heartbeats, pongs) |
//! | `POST /__mock/faults/token` | `{"mode":"throttle"\|"outage"\|"none","status"?,"count"?}` | token-endpoint faults |
//! | `POST /__mock/faults/subscriptions` | `{"count"}` | refuse the next `count` subscription changes wholesale (400) |
//! | `PATCH /__mock/settings` | any `Settings` fields | change behaviour at run time (e.g. `{"other_channels":"null"}`: how the client-wide channel listing shows other tokens' channels) |

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::Fake;
use super::errors::Rejection;
use super::events::{StreamProgress, StreamRequest, event_frame, run_stream};
use super::settings::{ClientSpec, Settings};
use super::state::{RotationMode, TokenFault};
use crate::http_server::{self, Request, Response, json};

pub(super) async fn handle(
    fake: &Arc<Fake>,
    req: Request,
    rest: &[&str],
) -> Result<Response, Rejection> {
    let method = req.method().clone();
    let body = http_server::read_body(req.into_body())
        .await
        .map_err(|e| Rejection::bad_request(e.to_string()))?;
    match (&method, rest) {
        (&Method::GET, ["stats"]) => Ok(json(StatusCode::OK, &fake.state().stats(Instant::now()))),
        (&Method::POST, ["clients"]) => {
            let spec: ClientSpec = parse(&body)?;
            fake.state().add_client(spec);
            Ok(http_server::empty(StatusCode::CREATED))
        }
        (&Method::POST, ["clients", id, "rotate"]) => rotate(fake, id, &body),
        (&Method::POST, ["revoke"]) => revoke(fake, &body),
        (&Method::POST, ["publish"]) => publish(fake, &body),
        (&Method::POST, ["streams"]) => start_stream(fake, &body),
        (&Method::GET, ["streams", id]) => {
            let progress = stream(fake, id)?;
            Ok(json(StatusCode::OK, &progress.status()))
        }
        (&Method::DELETE, ["streams", id]) => {
            stream(fake, id)?.cancel.cancel();
            Ok(http_server::empty(StatusCode::NO_CONTENT))
        }
        (&Method::POST, ["socket-closing"]) => socket_closing(fake, &body),
        (&Method::POST, ["stall"]) => {
            let request: Channels = parse(&body)?;
            let stalled = fake.state().stall_sockets(request.channels.as_deref());
            Ok(json(StatusCode::OK, &json!({ "channels": stalled })))
        }
        (&Method::POST, ["faults", "token"]) => token_fault(fake, &body),
        (&Method::POST, ["faults", "subscriptions"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Refuse {
                count: u32,
            }
            let request: Refuse = parse(&body)?;
            fake.state().refuse_subscriptions(request.count);
            Ok(http_server::empty(StatusCode::NO_CONTENT))
        }
        (&Method::PATCH, ["settings"]) => patch_settings(fake, &body),
        (&Method::GET, ["settings"]) => Ok(json(StatusCode::OK, &fake.state().settings)),
        _ => Err(Rejection::not_found(format!(
            "no control call {method} /__mock/{}",
            rest.join("/")
        ))),
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Rejection> {
    serde_json::from_slice(body)
        .map_err(|e| Rejection::bad_request(format!("invalid control request: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    mode: RotationMode,
    secret: Option<String>,
}

fn rotate(fake: &Fake, client_id: &str, body: &Bytes) -> Result<Response, Rejection> {
    let request: Rotate = parse(body)?;
    let secret = request.secret.unwrap_or_else(|| {
        let bytes: [u8; 24] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    });
    let revoked = fake
        .state()
        .rotate_secret(client_id, secret.clone(), request.mode)?;
    Ok(json(
        StatusCode::OK,
        &json!({"secret": secret, "revoked": revoked}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoke {
    token: Option<String>,
    client_id: Option<String>,
    channel: Option<String>,
}

fn revoke(fake: &Fake, body: &Bytes) -> Result<Response, Rejection> {
    let request: Revoke = parse(body)?;
    let mut state = fake.state();
    let revoked = match (request.token, request.client_id, request.channel) {
        (Some(token), None, None) => state.revoke_token(&token),
        (None, Some(client), None) => state.revoke_client_tokens(&client),
        (None, None, Some(channel)) => state.revoke_channel_token(&channel),
        _ => {
            return Err(Rejection::bad_request(
                "name exactly one of token, client_id, channel",
            ));
        }
    };
    Ok(json(StatusCode::OK, &json!({ "revoked": revoked })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    topic: String,
    #[serde(default)]
    body: Map<String, Value>,
}

fn publish(fake: &Fake, body: &Bytes) -> Result<Response, Rejection> {
    let request: Publish = parse(body)?;
    let mut state = fake.state();
    let seq = state.next_seq();
    let frame = event_frame(&request.topic, request.body, seq, None);
    let delivered = state.publish(&request.topic, &frame);
    Ok(json(
        StatusCode::OK,
        &json!({"seq": seq, "delivered": delivered}),
    ))
}

fn start_stream(fake: &Arc<Fake>, body: &Bytes) -> Result<Response, Rejection> {
    let request: StreamRequest = parse(body)?;
    if request.topics.is_empty() || !(request.rate > 0.0 && request.rate.is_finite()) {
        return Err(Rejection::bad_request(
            "a stream needs at least one topic and a positive rate",
        ));
    }
    let id = fake.next_id();
    let progress = Arc::new(StreamProgress::new(request.count));
    fake.streams.insert(id, progress.clone());
    fake.tasks
        .spawn(run_stream(fake.clone(), id, request, progress));
    Ok(json(StatusCode::ACCEPTED, &json!({ "stream": id })))
}

fn stream(fake: &Fake, id: &str) -> Result<Arc<StreamProgress>, Rejection> {
    id.parse::<u64>()
        .ok()
        .and_then(|id| fake.streams.get(&id).map(|p| p.clone()))
        .ok_or_else(|| Rejection::not_found(format!("no stream {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Channels {
    channels: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketClosing {
    channels: Option<Vec<String>>,
    #[serde(with = "humantime_serde", default = "one_minute")]
    close_after: Duration,
}

fn one_minute() -> Duration {
    Duration::from_secs(60)
}

/// Genesys sends `v2.system.socket_closing` about a minute before a maintenance
/// close of the socket; the channel itself lives on.
fn socket_closing(fake: &Arc<Fake>, body: &Bytes) -> Result<Response, Rejection> {
    let request: SocketClosing = parse(body)?;
    let warned = fake
        .state()
        .warn_socket_closing(request.channels.as_deref());
    let task_fake = fake.clone();
    let closing = warned.clone();
    fake.tasks.spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(request.close_after) => {}
            _ = task_fake.shutdown.cancelled() => return,
        }
        let mut state = task_fake.state();
        for id in &closing {
            state.close_socket(id);
        }
    });
    Ok(json(StatusCode::OK, &json!({ "channels": warned })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFaultRequest {
    mode: String,
    status: Option<u16>,
    count: Option<u32>,
}

fn token_fault(fake: &Fake, body: &Bytes) -> Result<Response, Rejection> {
    let request: TokenFaultRequest = parse(body)?;
    let fault = match request.mode.as_str() {
        "none" => None,
        "throttle" => Some(TokenFault::Throttle),
        "outage" => {
            let status = StatusCode::from_u16(request.status.unwrap_or(503))
                .ok()
                .filter(|s| s.is_server_error())
                .ok_or_else(|| Rejection::bad_request("an outage status must be 5xx"))?;
            Some(TokenFault::Outage(status))
        }
        other => {
            return Err(Rejection::bad_request(format!(
                "unknown fault mode {other:?}"
            )));
        }
    };
    fake.state()
        .set_token_fault(fault.map(|f| (f, request.count)));
    Ok(http_server::empty(StatusCode::NO_CONTENT))
}

/// Merges the given fields into the current settings; unknown fields are refused.
fn patch_settings(fake: &Fake, body: &Bytes) -> Result<Response, Rejection> {
    let patch: Map<String, Value> = parse(body)?;
    let mut state = fake.state();
    let mut current = serde_json::to_value(&state.settings).expect("settings serialise");
    let fields = current.as_object_mut().expect("settings are an object");
    for (key, value) in patch {
        fields.insert(key, value);
    }
    let settings: Settings = serde_json::from_value(current)
        .map_err(|e| Rejection::bad_request(format!("invalid settings: {e}")))?;
    state.settings = settings;
    Ok(json(StatusCode::OK, &state.settings))
}
