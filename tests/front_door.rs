//! The front door, end to end on real sockets: browser origins and CORS, the
//! DNS-rebinding guard, the topic policy, `availabletopics`, fair use per peer (the
//! peer as `X-Forwarded-For` and PROXY protocol v2 from a trusted proxy report it),
//! and the admin listener's gate. Each rule refuses what it must and admits what it
//! must.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::mock::{ServiceTimes, Settings};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const APP: &str = "https://apps.example.com";

fn fast() -> Settings {
    Settings {
        service_times: ServiceTimes::NONE,
        ..Settings::default()
    }
}

async fn world(server: &str, extra: &str) -> World {
    World::start(
        &[A],
        Duration::from_secs(3600),
        fast(),
        &format!("[server]\nlisten = \"127.0.0.1:0\"\n{server}\n{extra}"),
    )
    .await
}

/// A request to the client listener with extra headers.
async fn call(api: &Api, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = api.http.request(method, format!("{}{path}", api.base));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    api.send(request).await
}

/// Opens a WebSocket with extra handshake headers: the socket, or the refusal's status.
async fn socket(url: &str, headers: &[(&str, &str)]) -> Result<Socket, u16> {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("unexpected failure: {other}"),
    }
}

fn ws_base(api: &Api) -> String {
    api.base.replacen("http://", "ws://", 1)
}

#[tokio::test]
async fn only_listed_origins_get_in_and_they_get_cors() {
    let w = world(&format!("allowed_origins = [\"{APP}\"]"), "").await;
    let client = &w.client;
    let channels = "/api/v2/notifications/channels";

    // A native desktop sends no Origin.
    let native = call(client, Method::POST, channels, &[]).await;
    assert_eq!(native.status, 200);
    assert_eq!(native.headers["vary"], "origin");
    assert!(native.headers.get("access-control-allow-origin").is_none());

    let listed = call(client, Method::POST, channels, &[("origin", APP)]).await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.headers["access-control-allow-origin"], APP);
    let id = listed.body["id"].as_str().unwrap().to_owned();

    for foreign in ["https://evil.example", "null", "http://apps.example.com"] {
        let refused = call(client, Method::POST, channels, &[("origin", foreign)]).await;
        assert_eq!(refused.status, 403, "{foreign}");
        assert_eq!(
            refused.body,
            json!({"message": "This origin may not use the proxy (server.allowed_origins)", "code": "forbidden", "status": 403})
        );
        assert!(refused.headers.get("access-control-allow-origin").is_none());
    }

    // The preflight of a PUT with a JSON body, as a browser sends it.
    let subscriptions = format!("{channels}/{id}/subscriptions");
    let preflight = [
        ("access-control-request-method", "PUT"),
        (
            "access-control-request-headers",
            "content-type,purecloud-sdk",
        ),
    ];
    let answer = call(
        client,
        Method::OPTIONS,
        &subscriptions,
        &[preflight[0], preflight[1], ("origin", APP)],
    )
    .await;
    assert_eq!(answer.status, 204);
    assert_eq!(answer.headers["access-control-allow-origin"], APP);
    assert_eq!(
        answer.headers["access-control-allow-methods"],
        "GET, POST, PUT, DELETE, HEAD"
    );
    assert_eq!(
        answer.headers["access-control-allow-headers"],
        "content-type, authorization, purecloud-sdk"
    );
    let refused = call(
        client,
        Method::OPTIONS,
        &subscriptions,
        &[
            preflight[0],
            preflight[1],
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(refused.status, 403);

    // A WebSocket upgrade is not protected by CORS: the proxy refuses it itself.
    let base = ws_base(client);
    assert_eq!(
        socket(
            &format!("{base}/channels/{id}"),
            &[("origin", "https://evil.example")]
        )
        .await
        .err(),
        Some(403)
    );
    assert_eq!(
        socket(
            &format!("{base}/stream?topics=v2.users.1.presence"),
            &[("origin", "https://evil.example")]
        )
        .await
        .err(),
        Some(403)
    );
    assert_eq!(w.proxy.router.topic_count(), 0, "nothing was subscribed");
    let mut admitted = socket(&format!("{base}/channels/{id}"), &[("origin", APP)])
        .await
        .expect("a listed origin's socket opens");
    send_text(&mut admitted, r#"{"message":"ping"}"#).await;
    let Next::Text(pong) = next_non_heartbeat(&mut admitted).await else {
        panic!("no pong")
    };
    assert_eq!(pong["eventBody"]["message"], "pong");
}

#[tokio::test]
async fn a_host_that_is_not_the_proxys_is_refused() {
    let w = world("allowed_hosts = [\"handover.test\"]", "").await;
    let port = w.proxy.client_addr.port();
    let channels = "/api/v2/notifications/channels";
    for host in ["evil.example", "handover.test.evil.example"] {
        let refused = call(
            &w.client,
            Method::POST,
            channels,
            &[("host", &format!("{host}:{port}"))],
        )
        .await;
        assert_eq!(refused.status, 403, "{host}");
        assert_eq!(refused.body["code"], "forbidden");
    }
    for host in ["localhost", "handover.test", "127.0.0.1"] {
        let admitted = call(
            &w.client,
            Method::POST,
            channels,
            &[("host", &format!("{host}:{port}"))],
        )
        .await;
        assert_eq!(admitted.status, 200, "{host}");
    }
    let base = ws_base(&w.client);
    assert_eq!(
        socket(
            &format!("{base}/stream?topics=v2.users.1.presence"),
            &[("host", "rebound.evil.example")]
        )
        .await
        .err(),
        Some(403)
    );
}

#[tokio::test]
async fn denied_topics_are_refused_in_genesys_shape_and_never_go_upstream() {
    let w = world(
        "",
        "[topics]\nallow = [\"v2.users.*.presence\", \"v2.users.*.conversations\"]\ndeny = [\"v2.users.7.conversations\"]\n",
    )
    .await;
    let client = &w.client;
    let created = client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v2/notifications/channels/{id}/subscriptions");
    let put = |path: String, topics: Value| {
        let client = client.clone();
        async move {
            client
                .send(
                    client
                        .http
                        .put(format!("{}{path}", client.base))
                        .json(&topics),
                )
                .await
        }
    };

    let refused = put(
        path.clone(),
        json!([{"id": "v2.users.1.presence"}, {"id": "v2.users.1.routingStatus"}]),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        refused.body,
        json!({"message": "Topic v2.users.1.routingStatus is not allowed by this proxy's topic policy", "code": "missing.permissions", "status": 403})
    );
    assert_eq!(
        w.proxy.router.topic_count(),
        0,
        "the whole request was refused"
    );

    let partial = put(
        format!("{path}?ignoreErrors=true"),
        json!([{"id": "v2.users.1.presence"}, {"id": "v2.users.7.conversations"}, {"id": "v2.users.7.presence"}]),
    )
    .await;
    assert_eq!(partial.status, 200, "{}", partial.body);
    assert_eq!(
        partial.body["entities"],
        json!([
            {"id": "v2.users.1.presence", "state": "Permitted"},
            {"id": "v2.users.7.presence", "state": "Permitted"},
            {"id": "v2.users.7.conversations", "state": "Rejected", "rejectionReason": "MissingPermissions"},
        ])
    );
    // Upstream holds the two admitted topics, not the denied one.
    assert_eq!(w.fake_api.stats().await["subscriptions"], 2);
    assert_eq!(w.proxy.router.topic_count(), 2);

    // In-band, and on /stream: the same policy.
    let base = ws_base(client);
    let mut desktop = connect(&format!("{base}/channels/{id}")).await;
    send_text(
        &mut desktop,
        r#"{"message":"subscribe","topics":["v2.users.2.routingStatus"],"correlationId":"c1"}"#,
    )
    .await;
    let Next::Text(answer) = next_non_heartbeat(&mut desktop).await else {
        panic!("no answer")
    };
    assert_eq!(answer["correlationId"], "c1");
    assert_eq!(answer["result"], "403");
    assert_eq!(answer["status"], "error");
    assert_eq!(
        socket(
            &format!("{base}/stream?topics=v2.analytics.queues.q.observations"),
            &[]
        )
        .await
        .err(),
        Some(403)
    );
}

#[tokio::test]
async fn availabletopics_is_what_genesys_answers_filtered_and_cached() {
    let w = world(
        "",
        "[topics]\nallow = [\"v2.users.*.presence\", \"v2.routing.queues.*.conversations\"]\n",
    )
    .await;
    let fake = &w.fake_api;
    let issued = || async {
        fake.stats().await["clients"]["client-a"]["tokens_issued"]
            .as_u64()
            .unwrap()
    };
    wait_for("the first mint", || async {
        (issued().await >= 1).then_some(())
    })
    .await;
    let before = issued().await;

    let path = "/api/v2/notifications/availabletopics?expand=description&includePreview=false";
    let answer = w.client.get(path).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body,
        json!({"entities": [
            {"id": "v2.users.{id}.presence", "description": "A user's presence",
             "requiresCurrentUser": false, "requiresCurrentUserOrPermission": true},
            {"id": "v2.routing.queues.{id}.conversations", "description": "A queue's conversations",
             "requiresCurrentUser": false, "requiresCurrentUserOrPermission": false},
        ]})
    );
    assert_eq!(issued().await, before + 1, "one token minted for it");
    let again = w.client.get(path).await;
    assert_eq!(again.body, answer.body);
    assert_eq!(issued().await, before + 1, "served from the cache");
    wait_for("the token to be retired", || async {
        (fake.stats().await["clients"]["client-a"]["live_tokens"] == 0).then_some(())
    })
    .await;
    let bad = w
        .client
        .get("/api/v2/notifications/availabletopics?includePreview=maybe")
        .await;
    assert_eq!(bad.status, 400);
}

/// A proxy behind a trusted proxy on loopback, which reports its clients in
/// `X-Forwarded-For`.
const BEHIND_PROXY: &str = "trusted_proxies = [\"127.0.0.1\"]";

#[tokio::test]
async fn each_peer_has_its_limits_and_is_told_in_genesys_shape() {
    let w = world(
        BEHIND_PROXY,
        "[limits]\nchannels_per_peer = 2\nsockets_per_peer = 1\ntopics_per_peer = 5\n\
         subscription_calls_per_minute = 4\nupstream_share_percent = 30\n\
         [upstream]\nmax_channels = 2\nmax_topics_per_channel = 10\n",
    )
    .await;
    let client = &w.client;
    let as_peer = |peer: &'static str| [("x-forwarded-for", peer)];
    let create = |peer: &'static str| {
        let client = client.clone();
        async move {
            call(
                &client,
                Method::POST,
                "/api/v2/notifications/channels",
                &as_peer(peer),
            )
            .await
        }
    };
    let put = |peer: &'static str, id: String, topics: &[&str]| {
        let client = client.clone();
        let body: Vec<Value> = topics.iter().map(|t| json!({"id": t})).collect();
        async move {
            client
                .send(
                    client
                        .http
                        .put(format!(
                            "{}/api/v2/notifications/channels/{id}/subscriptions",
                            client.base
                        ))
                        .header("x-forwarded-for", peer)
                        .json(&body),
                )
                .await
        }
    };

    // Channels: two each; the third is refused with 429 and Retry-After.
    let a1 = create("198.51.100.7").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let a2 = create("198.51.100.7").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = create("198.51.100.7").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["code"], "too.many.channels");
    assert_eq!(refused.body["status"], 429);
    assert!(
        refused.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Another peer, and this host itself (exempt by default), are not affected.
    assert_eq!(create("198.51.100.8").await.status, 200);
    assert_eq!(
        client.post("/api/v2/notifications/channels").await.status,
        200
    );

    // The upstream share: 30 % of 1 channel × 10 topics is 3 distinct topics.
    let over = put(
        "198.51.100.7",
        a1.clone(),
        &["v2.t.1", "v2.t.2", "v2.t.3", "v2.t.4"],
    )
    .await;
    assert_eq!(over.status, 400);
    assert_eq!(over.body["code"], "upstream.share.exceeded");
    assert_eq!(
        put("198.51.100.7", a1.clone(), &["v2.t.1", "v2.t.2", "v2.t.3"])
            .await
            .status,
        200
    );
    // Subscriptions summed over the peer's channels: 3 + 3 > 5, though only 3 distinct.
    let summed = put("198.51.100.7", a2.clone(), &["v2.t.1", "v2.t.2", "v2.t.3"]).await;
    assert_eq!(summed.status, 400);
    assert_eq!(summed.body["code"], "too.many.topics");
    // Calls: that was the 3rd of 4 a minute; the 5th is refused with Retry-After.
    assert_eq!(
        put("198.51.100.7", a2.clone(), &["v2.t.1"]).await.status,
        200
    );
    let flood = put("198.51.100.7", a2.clone(), &["v2.t.1"]).await;
    assert_eq!(flood.status, 429);
    assert_eq!(flood.body["code"], "too.many.requests");
    assert!(flood.headers.contains_key("retry-after"));

    // Sockets: one each.
    let base = ws_base(client);
    let first = socket(&format!("{base}/channels/{a1}"), &as_peer("198.51.100.7"))
        .await
        .expect("the first socket opens");
    assert_eq!(
        socket(&format!("{base}/channels/{a2}"), &as_peer("198.51.100.7"))
            .await
            .err(),
        Some(429)
    );
    drop(first);
    wait_for("the socket slot to come back", || {
        let url = format!("{base}/channels/{a2}");
        async move { socket(&url, &as_peer("198.51.100.7")).await.ok() }
    })
    .await;
}

#[tokio::test]
async fn forwarded_for_from_anyone_but_a_trusted_proxy_is_ignored() {
    let w = world("", "[limits]\nchannels_per_peer = 1\nexempt = []\n").await;
    let channels = "/api/v2/notifications/channels";
    let first = call(
        &w.client,
        Method::POST,
        channels,
        &[("x-forwarded-for", "192.0.2.1")],
    )
    .await;
    assert_eq!(first.status, 200);
    // A claimed other address does not make another peer: this is still 127.0.0.1.
    let second = call(
        &w.client,
        Method::POST,
        channels,
        &[("x-forwarded-for", "192.0.2.2")],
    )
    .await;
    assert_eq!(second.status, 429);
}

#[tokio::test]
async fn a_proxy_protocol_header_names_the_peer() {
    let w = world(
        &format!("{BEHIND_PROXY}\nproxy_protocol = true"),
        "[limits]\nchannels_per_peer = 1\n",
    )
    .await;
    let addr = w.proxy.client_addr;
    let create_as = |source: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        if !source.is_empty() {
            let header = ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                (
                    format!("{source}:40000")
                        .parse::<std::net::SocketAddr>()
                        .unwrap(),
                    addr,
                ),
            )
            .build()
            .unwrap();
            stream.write_all(&header).await.unwrap();
        }
        stream
            .write_all(
                b"POST /api/v2/notifications/channels HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_string(&mut answer)).await;
        answer.lines().next().unwrap_or("(closed)").to_owned()
    };
    assert_eq!(create_as("203.0.113.5").await, "HTTP/1.1 200 OK");
    assert_eq!(
        create_as("203.0.113.5").await,
        "HTTP/1.1 429 Too Many Requests"
    );
    assert_eq!(create_as("203.0.113.6").await, "HTTP/1.1 200 OK");
    // A trusted proxy's connection without the header is not served.
    assert_eq!(create_as("").await, "(closed)");
}

#[tokio::test]
async fn the_admin_listener_refuses_browsers_forged_bodies_and_missing_tokens() {
    let secrets = Secrets::new();
    secrets.write("admin-token", "t0ken-for-tests");
    let token_file = secrets.path("admin-token");
    let w = world(
        "",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    )
    .await;
    let admin = &w.admin;
    let bearer = ("authorization", "Bearer t0ken-for-tests");

    assert_eq!(call(admin, Method::GET, "/healthz", &[]).await.status, 200);
    assert_ne!(
        call(admin, Method::GET, "/readyz", &[]).await.status,
        401,
        "probes need no token"
    );
    let unauthorized = call(admin, Method::GET, "/metrics", &[]).await;
    assert_eq!(unauthorized.status, 401);
    assert_eq!(unauthorized.headers["www-authenticate"], "Bearer");
    assert_eq!(unauthorized.body["code"], "unauthorized");
    assert_eq!(
        call(
            admin,
            Method::GET,
            "/metrics",
            &[("authorization", "Bearer wrong")]
        )
        .await
        .status,
        401
    );
    assert_eq!(
        call(admin, Method::GET, "/metrics", &[bearer]).await.status,
        200
    );

    // The cross-site text/plain POST that once drained a credential.
    let drain = "/admin/credentials/a/drain";
    let forged = call(
        admin,
        Method::POST,
        drain,
        &[bearer, ("content-type", "text/plain")],
    )
    .await;
    assert_eq!(forged.status, 415);
    let from_page = call(
        admin,
        Method::POST,
        drain,
        &[bearer, ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(from_page.status, 403);
    let listed = call(admin, Method::GET, "/admin/credentials", &[bearer]).await;
    assert_eq!(listed.body[0]["state"], "active", "nothing was drained");

    // A rotated token is read at the next request.
    secrets.write("admin-token", "t0ken-rotated");
    assert_eq!(
        call(admin, Method::GET, "/metrics", &[bearer]).await.status,
        401
    );
    assert_eq!(
        call(
            admin,
            Method::GET,
            "/metrics",
            &[("authorization", "Bearer t0ken-rotated")]
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn without_a_token_the_admin_listener_answers_only_address_hosts() {
    let w = world("", "").await;
    let port = w.proxy.admin_addr.port();
    let rebound = call(
        &w.admin,
        Method::GET,
        "/admin/credentials",
        &[("host", &format!("rebound.evil.example:{port}"))],
    )
    .await;
    assert_eq!(rebound.status, 403);
    assert_eq!(
        call(
            &w.admin,
            Method::GET,
            "/admin/credentials",
            &[("host", &format!("localhost:{port}"))]
        )
        .await
        .status,
        200
    );
    let drained = call(
        &w.admin,
        Method::POST,
        "/admin/credentials/a/drain",
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(
        drained.status, 409,
        "the last usable credential: refused, but let through the gate"
    );
}
