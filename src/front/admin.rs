//! What the admin listener accepts. Its actions drain credentials and its answers
//! describe the proxy, so:
//!
//! - no browser may use it: a request carrying `Origin` is refused (a cross-site
//!   `text/plain` POST once drained a credential; CORS would not have stopped it);
//! - a state-changing call must not carry a body type other than JSON (`415`);
//! - with `[admin] token_file`, every route but `/healthz` and `/readyz` needs
//!   `Authorization: Bearer <token>` (`401`);
//! - without a token, `Host` must be an IP address or `localhost` (DNS rebinding
//!   cannot produce those); with one, the token is the guard.

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use subtle::ConstantTimeEq;

use super::origin;
use crate::secret::Secret;

/// Why an admin request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// 401: a token is configured and this request does not carry it.
    Unauthorized,
    /// 403: `Origin` present (a browser), or a `Host` a rebinding attack could forge.
    Forbidden(&'static str),
    /// 415: a state-changing call with a body type other than JSON.
    UnsupportedMediaType,
}

impl AdminRefusal {
    /// Its code in Genesys' error shape (and the metric's `reason`).
    pub fn code(self) -> &'static str {
        match self {
            AdminRefusal::Unauthorized => "unauthorized",
            AdminRefusal::Forbidden(_) => "forbidden",
            AdminRefusal::UnsupportedMediaType => "unsupported.media.type",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::Unauthorized => {
                "this admin route needs Authorization: Bearer <the token in [admin] token_file>"
            }
            Self::Forbidden(why) => why,
            Self::UnsupportedMediaType => {
                "admin actions take no body, or JSON (Content-Type: application/json)"
            }
        }
    }
}

/// Routes any prober may call: they change nothing and reveal nothing.
pub fn is_open_route(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(path, "/healthz" | "/readyz")
}

/// Judges an admin request. `token` is the configured token, if any.
pub fn judge(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    token: Option<&Secret>,
) -> Result<(), AdminRefusal> {
    if headers.contains_key(header::ORIGIN) {
        return Err(AdminRefusal::Forbidden(
            "the admin listener does not serve browsers (the request carries Origin)",
        ));
    }
    let changes_state = !matches!(*method, Method::GET | Method::HEAD);
    if changes_state && !is_json_or_absent(headers) {
        return Err(AdminRefusal::UnsupportedMediaType);
    }
    let authenticated = match token {
        Some(token) if !is_open_route(method, path) => {
            if !bearer_matches(headers, token) {
                return Err(AdminRefusal::Unauthorized);
            }
            true
        }
        _ => false,
    };
    if !authenticated && !origin::host_allowed(headers, &[]) {
        return Err(AdminRefusal::Forbidden(
            "without [admin] token_file the admin listener answers only to an IP address or localhost as Host",
        ));
    }
    Ok(())
}

fn is_json_or_absent(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(value), None) => value
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json")),
        _ => false,
    }
}

/// Compares in constant time, so that the answer's timing does not reveal how much
/// of a guess was right.
fn bearer_matches(headers: &HeaderMap, token: &Secret) -> bool {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Some((scheme, presented)) = value.to_str().ok().and_then(|v| v.split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && bool::from(presented.trim().as_bytes().ct_eq(token.expose().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    const LOCAL: (&str, &str) = ("host", "127.0.0.1:9090");

    #[test]
    fn browsers_and_forged_bodies_are_refused() {
        let post = Method::POST;
        let drain = "/admin/credentials/a/drain";
        assert_eq!(judge(&post, drain, &headers(&[LOCAL]), None), Ok(()));
        assert_eq!(
            judge(
                &post,
                drain,
                &headers(&[LOCAL, ("content-type", "application/json; charset=utf-8")]),
                None
            ),
            Ok(())
        );
        for (name, value, refusal) in [
            (
                "origin",
                "https://evil.example",
                AdminRefusal::Forbidden(
                    "the admin listener does not serve browsers (the request carries Origin)",
                ),
            ),
            (
                "content-type",
                "text/plain",
                AdminRefusal::UnsupportedMediaType,
            ),
            (
                "content-type",
                "application/x-www-form-urlencoded",
                AdminRefusal::UnsupportedMediaType,
            ),
            (
                "content-type",
                "multipart/form-data; boundary=x",
                AdminRefusal::UnsupportedMediaType,
            ),
        ] {
            assert_eq!(
                judge(&post, drain, &headers(&[LOCAL, (name, value)]), None),
                Err(refusal),
                "{name}: {value}"
            );
        }
        // A GET may carry any content type, but no Origin either.
        assert_eq!(
            judge(
                &Method::GET,
                "/metrics",
                &headers(&[LOCAL, ("content-type", "text/plain")]),
                None
            ),
            Ok(())
        );
        assert!(
            judge(
                &Method::GET,
                "/metrics",
                &headers(&[LOCAL, ("origin", "null")]),
                None
            )
            .is_err()
        );
    }

    #[test]
    fn without_a_token_only_address_hosts_are_answered() {
        assert_eq!(
            judge(
                &Method::GET,
                "/metrics",
                &headers(&[("host", "localhost:9090")]),
                None
            ),
            Ok(())
        );
        assert!(matches!(
            judge(
                &Method::GET,
                "/metrics",
                &headers(&[("host", "rebound.evil.example:9090")]),
                None
            ),
            Err(AdminRefusal::Forbidden(_))
        ));
    }

    #[test]
    fn a_token_guards_everything_but_the_probes() {
        let token = Secret::from("s3cret-token");
        let get = Method::GET;
        assert_eq!(
            judge(&get, "/metrics", &headers(&[LOCAL]), Some(&token)),
            Err(AdminRefusal::Unauthorized)
        );
        for wrong in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "Basic s3cret-token",
            "s3cret-token",
        ] {
            let mut h = headers(&[LOCAL]);
            h.insert("authorization", HeaderValue::from_static(wrong));
            assert_eq!(
                judge(&get, "/metrics", &h, Some(&token)),
                Err(AdminRefusal::Unauthorized),
                "{wrong}"
            );
        }
        let mut h = headers(&[("host", "handover-admin.monitoring.svc:9090")]);
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer s3cret-token"),
        );
        assert_eq!(
            judge(&get, "/metrics", &h, Some(&token)),
            Ok(()),
            "the token is the guard"
        );
        assert_eq!(
            judge(&get, "/readyz", &headers(&[LOCAL]), Some(&token)),
            Ok(())
        );
        assert_eq!(
            judge(&get, "/healthz", &headers(&[LOCAL]), Some(&token)),
            Ok(())
        );
        assert_eq!(
            judge(&Method::POST, "/readyz", &headers(&[LOCAL]), Some(&token)),
            Err(AdminRefusal::Unauthorized)
        );
    }
}
