//! The Genesys Cloud endpoints the fake implements: the OAuth token endpoint and the
//! notifications API.

use base64::Engine;
use bytes::Bytes;
use http::{Method, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::Fake;
use super::errors::Rejection;
use super::settings::OtherChannels;
use super::state::{SubscriptionChange, iso8601};
use crate::http_server::{self, Request, Response, json, query_param};

pub(super) async fn handle(
    fake: &Fake,
    req: Request,
    segments: &[&str],
) -> Result<Response, Rejection> {
    let method = req.method().clone();
    match segments {
        ["oauth", "token"] => {
            only(&method, &[Method::POST])?;
            token(fake, req).await
        }
        ["api", "v2", "notifications", "channels"] => {
            only(&method, &[Method::POST, Method::GET])?;
            let bearer = authorize(fake, &req).await?;
            if method == Method::GET {
                return list_channels(fake, &req, &bearer);
            }
            create_channel(fake, &bearer)
        }
        ["api", "v2", "notifications", "channels", channel_id] => {
            only(&method, &[Method::HEAD])?;
            let bearer = authorize(fake, &req).await?;
            fake.state()
                .channel_exists(&bearer, channel_id, Instant::now())?;
            Ok(http_server::empty(StatusCode::OK))
        }
        [
            "api",
            "v2",
            "notifications",
            "channels",
            channel_id,
            "subscriptions",
        ] => {
            only(
                &method,
                &[Method::GET, Method::POST, Method::PUT, Method::DELETE],
            )?;
            let bearer = authorize(fake, &req).await?;
            subscriptions(fake, req, &bearer, channel_id).await
        }
        ["api", "v2", "notifications", "availabletopics"] => {
            only(&method, &[Method::GET])?;
            authorize(fake, &req).await?;
            let settings = fake.state().settings.clone();
            Ok(json(
                StatusCode::OK,
                &super::topics::listing(req.uri().query(), |id| settings.is_denied(id)),
            ))
        }
        ["api", "v2", "tokens", "me"] => {
            only(&method, &[Method::GET, Method::DELETE])?;
            let bearer = authorize(fake, &req).await?;
            if method == Method::GET {
                return token_info(fake, &bearer);
            }
            fake.state().revoke_token(&bearer);
            Ok(http_server::empty(StatusCode::NO_CONTENT))
        }
        _ => Err(Rejection::not_found(format!(
            "No resource at {}",
            req.uri().path()
        ))),
    }
}

fn only(method: &Method, allowed: &[Method]) -> Result<(), Rejection> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(Rejection::api(
            StatusCode::METHOD_NOT_ALLOWED,
            "method.not.allowed",
            format!("Method {method} is not allowed here"),
        ))
    }
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// `POST /oauth/token` with the client-credentials grant. Credentials come in a
/// Basic header (as every Genesys SDK sends them) or in the form body (RFC 6749 §2.3.1).
async fn token(fake: &Fake, req: Request) -> Result<Response, Rejection> {
    fake.service_time(|t| t.token).await;
    let basic = basic_credentials(req.headers());
    let body = http_server::read_body(req.into_body())
        .await
        .map_err(|e| Rejection::oauth("invalid_request", e.to_string()))?;
    let form = parse_token_form(&body);
    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(_) => {
            return Err(Rejection::oauth(
                "unsupported_grant_type",
                "Unsupported grant type",
            ));
        }
        None => return Err(Rejection::oauth("invalid_request", "Missing grant type")),
    }
    let (client_id, secret) = match (basic, form.client_id, form.client_secret) {
        (Some(pair), _, _) => pair,
        (None, Some(id), Some(secret)) => (id, secret),
        _ => return Err(Rejection::oauth("invalid_client", "client not found")),
    };
    let (access_token, ttl) = fake.state().mint(&client_id, &secret, Instant::now())?;
    fake.expiry_changed.notify_one();
    Ok(json(
        StatusCode::OK,
        &json!({"access_token": access_token, "token_type": "bearer", "expires_in": ttl.as_secs()}),
    ))
}

fn parse_token_form(body: &Bytes) -> TokenForm {
    let mut form = TokenForm {
        grant_type: None,
        client_id: None,
        client_secret: None,
    };
    for (key, value) in form_urlencoded::parse(body) {
        let slot = match key.as_ref() {
            "grant_type" => &mut form.grant_type,
            "client_id" => &mut form.client_id,
            "client_secret" => &mut form.client_secret,
            _ => continue,
        };
        *slot = Some(value.into_owned());
    }
    form
}

fn basic_credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// `GET /api/v2/tokens/me`: Genesys' `TokenInfo`, with `dateTokenIdles` when the
/// org's idle timeout applies to the token.
fn token_info(fake: &Fake, bearer: &str) -> Result<Response, Rejection> {
    let (client_id, idles) = fake
        .state()
        .token_info(bearer, Instant::now())
        .ok_or_else(|| {
            Rejection::unauthenticated("bad.credentials", "Invalid login credentials.")
        })?;
    let mut info = json!({"OAuthClient": {"id": client_id}, "authorizedScope": []});
    if let Some(idles) = idles {
        info["dateTokenIdles"] = json!(iso8601(idles));
    }
    Ok(json(StatusCode::OK, &info))
}

/// Waits the API service time, then checks the bearer token and the rate limit. The
/// call counts as the token's activity unless it asks `preserveIdleTTL=true`.
async fn authorize(fake: &Fake, req: &Request) -> Result<String, Rejection> {
    fake.service_time(|t| t.api).await;
    let preserve_idle =
        query_param(req.uri(), "preserveIdleTTL").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    fake.state()
        .authorize(bearer.as_deref(), preserve_idle, Instant::now())?;
    Ok(bearer.expect("authorize refuses a missing token"))
}

fn create_channel(fake: &Fake, bearer: &str) -> Result<Response, Rejection> {
    let channel = fake.state().create_channel(bearer, Instant::now())?;
    fake.expiry_changed.notify_one();
    Ok(json(
        StatusCode::OK,
        &json!({
            "connectUri": format!("{}/channels/{}", fake.ws_base, channel.id),
            "id": channel.id,
            "expires": iso8601(channel.expires),
        }),
    ))
}

/// `GET /api/v2/notifications/channels[?includechannels=token|oauthclient]`: the
/// token's own channels in full; with `oauthclient` also those of the OAuth client's
/// other tokens, without their id, in the shape the settings choose.
fn list_channels(fake: &Fake, req: &Request, bearer: &str) -> Result<Response, Rejection> {
    let across_client = match query_param(req.uri(), "includechannels").as_deref() {
        None => false,
        Some(value) if value.eq_ignore_ascii_case("token") => false,
        Some(value) if value.eq_ignore_ascii_case("oauthclient") => true,
        Some(_) => {
            return Err(Rejection::bad_request(
                "includechannels must be one of: token, oauthclient",
            ));
        }
    };
    let state = fake.state();
    let shape = state.settings.other_channels;
    let channels = state
        .list_channels(bearer, across_client, Instant::now())
        .ok_or_else(|| {
            Rejection::unauthenticated("bad.credentials", "Invalid login credentials.")
        })?;
    drop(state);
    let entities: Vec<_> = channels
        .into_iter()
        .map(|c| {
            let expires = iso8601(c.expires);
            match (c.id, shape) {
                (Some(id), _) => json!({
                    "connectUri": format!("{}/channels/{id}", fake.ws_base),
                    "id": id,
                    "expires": expires,
                }),
                (None, OtherChannels::Omitted) => json!({ "expires": expires }),
                (None, OtherChannels::Null) => {
                    json!({ "connectUri": null, "id": null, "expires": expires })
                }
                (None, OtherChannels::Redacted) => json!({ "id": "********", "expires": expires }),
            }
        })
        .collect();
    Ok(json(StatusCode::OK, &json!({ "entities": entities })))
}

#[derive(Deserialize)]
struct TopicRef {
    id: String,
}

async fn subscriptions(
    fake: &Fake,
    req: Request,
    bearer: &str,
    channel_id: &str,
) -> Result<Response, Rejection> {
    let now = Instant::now();
    let method = req.method().clone();
    let change = match method {
        Method::GET => {
            let entities = fake.state().subscriptions(bearer, channel_id, now)?;
            return Ok(json(StatusCode::OK, &json!({ "entities": entities })));
        }
        Method::DELETE => {
            fake.state().unsubscribe_all(bearer, channel_id, now)?;
            return Ok(http_server::empty(StatusCode::NO_CONTENT));
        }
        Method::PUT => SubscriptionChange::Replace,
        _ => SubscriptionChange::Add,
    };
    let ignore_errors =
        query_param(req.uri(), "ignoreErrors").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let body = http_server::read_body(req.into_body())
        .await
        .map_err(|e| Rejection::bad_request(e.to_string()))?;
    let topics: Vec<TopicRef> = serde_json::from_slice(&body).map_err(|e| {
        Rejection::bad_request(format!(
            "The request body must be a JSON array of {{\"id\": topic}}: {e}"
        ))
    })?;
    let topics = topics.into_iter().map(|t| t.id).collect();
    let entities = fake.state().subscribe(
        bearer,
        channel_id,
        topics,
        change,
        ignore_errors,
        Instant::now(),
    )?;
    Ok(json(StatusCode::OK, &json!({ "entities": entities })))
}
