//! The client listener's front door, before any route: who the peer is, whether the
//! `Host` is one of the proxy's names, whether a browser's `Origin` is listed, the
//! CORS preflight; and after the route, the CORS headers and the access-log line.
//! The decisions are `front::origin` and `front::peer`.

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderValue, StatusCode, header};

use super::error::ClientError;
use crate::config::ServerConfig;
use crate::front::origin::{self, OriginVerdict};
use crate::front::peer;
use crate::http_server::{ConnInfo, Request, Response};
use crate::metrics::ByReason;

/// What the door says before routing.
pub enum Admission {
    /// Refused (and logged): this is the answer.
    Refused(Response),
    /// A listed origin's preflight, answered here.
    Preflight(Response),
    /// Route it; a listed origin's answer gets CORS headers.
    Admitted(Option<HeaderValue>),
}

/// The peer a request is from: the connection's client, or behind trusted proxies
/// the address they report (see `front::peer`).
pub fn peer(req: &Request, trusted: &[ipnet::IpNet]) -> IpAddr {
    let remote = req
        .extensions()
        .get::<ConnInfo>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |conn| conn.client().ip());
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|line| line.to_str().unwrap_or("(not text)"));
    peer::client_address(remote, forwarded, trusted)
}

/// Judges `Host` and `Origin` (see `front::origin`).
pub fn admit(
    req: &Request,
    server: &ServerConfig,
    peer: IpAddr,
    route: &str,
    refusals: &ByReason,
) -> Admission {
    let headers = req.headers();
    if !origin::host_allowed(headers, &server.host_names) {
        let host = shown(headers.get(header::HOST));
        refusals.count("host");
        tracing::warn!(%peer, host, route, "request refused: its Host is not a name of this proxy (DNS-rebinding guard; see server.allowed_hosts)");
        let refusal = if headers.contains_key(header::HOST) {
            ClientError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "This proxy does not answer to that Host name",
            )
        } else {
            ClientError::bad_request("The request has no Host header")
        };
        return Admission::Refused(vary(refusal.into_response()));
    }
    match origin::judge_origin(headers, &server.allowed_origins) {
        OriginVerdict::Absent => Admission::Admitted(None),
        OriginVerdict::Foreign => {
            let origin = shown(headers.get(header::ORIGIN));
            refusals.count("origin");
            tracing::warn!(%peer, origin, route, "request refused: its Origin is not in server.allowed_origins");
            Admission::Refused(vary(
                ClientError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "This origin may not use the proxy (server.allowed_origins)",
                )
                .into_response(),
            ))
        }
        OriginVerdict::Allowed(origin) if origin::is_preflight(req.method(), headers) => {
            let (status, cors) = origin::preflight(headers, &origin);
            let mut response = crate::http_server::empty(status);
            response.headers_mut().extend(cors);
            Admission::Preflight(response)
        }
        OriginVerdict::Allowed(origin) => Admission::Admitted(Some(origin)),
    }
}

/// Adds the CORS headers for a listed origin (and `Vary: Origin` to every answer
/// but an upgrade's).
pub fn decorate(response: &mut Response, origin: Option<&HeaderValue>) {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    if let Some(origin) = origin {
        origin::add_cors(response.headers_mut(), origin);
    }
    origin::add_vary(response.headers_mut());
}

fn vary(mut response: Response) -> Response {
    origin::add_vary(response.headers_mut());
    response
}

/// A client-sent header value as a log may show it: at most 100 characters of
/// text, escaped by the log's formatting.
fn shown(value: Option<&HeaderValue>) -> String {
    match value.map(HeaderValue::to_str) {
        None => "(none)".into(),
        Some(Ok(text)) => text.chars().take(100).collect(),
        Some(Err(_)) => "(not text)".into(),
    }
}
