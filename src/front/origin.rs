//! Browser origins, `Host` names and CORS.
//!
//! A browser sends `Origin` on a WebSocket upgrade and on every cross-origin request,
//! but CORS protects neither an upgrade nor a "simple" POST: the browser makes them
//! and only hides the answer. So a request whose `Origin` is not listed in
//! `[server] allowed_origins` is refused (403) before it does anything, and one
//! without `Origin` (a native desktop, an SDK outside a browser) is admitted.
//!
//! `Host` is the DNS-rebinding guard: a page on `evil.example` whose name is made to
//! resolve to the proxy reaches it same-origin, without `Origin`, but with
//! `Host: evil.example`. A rebinding attack cannot produce an IP-literal `Host` or
//! `localhost`, so those pass, as do the public URL's host and `allowed_hosts`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// Methods a listed origin may use (what Genesys' SDKs call).
pub const ALLOW_METHODS: &str = "GET, POST, PUT, DELETE, HEAD";
/// Request headers a listed origin may send: the SDKs send all three, the proxy
/// reads only `Content-Type` (and forwards none of them).
pub const ALLOW_HEADERS: &str = "content-type, authorization, purecloud-sdk";
/// How long a browser may cache a preflight answer, in seconds.
pub const PREFLIGHT_MAX_AGE: &str = "600";

/// Canonical form of an origin, as the browser serialises it: `scheme://host[:port]`,
/// lower case, without the scheme's default port, path, query or credentials.
/// Extension origins (`chrome-extension://<id>`, `moz-extension://<uuid>`) are
/// origins too.
pub fn canonical_origin(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text.trim()).map_err(|e| format!("not an origin ({e})"))?;
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("an origin has a host (scheme://host[:port])")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("an origin carries no user name or password".into());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("an origin has no path, query or fragment (scheme://host[:port])".into());
    }
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    Ok(format!("{}://{host}{port}", url.scheme()).to_ascii_lowercase())
}

/// What a request's `Origin` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginVerdict {
    /// No `Origin`: not a browser's cross-origin request.
    Absent,
    /// A listed origin: admitted, with CORS headers echoing this value.
    Allowed(HeaderValue),
    /// Anything else, `null` and several `Origin` headers included: refused.
    Foreign,
}

/// Judges a request's `Origin` against the canonical `allowed` origins.
pub fn judge_origin(headers: &HeaderMap, allowed: &[String]) -> OriginVerdict {
    let mut values = headers.get_all(header::ORIGIN).iter();
    let Some(value) = values.next() else {
        return OriginVerdict::Absent;
    };
    if values.next().is_some() {
        return OriginVerdict::Foreign;
    }
    let listed = value
        .to_str()
        .ok()
        .and_then(|text| canonical_origin(text).ok())
        .is_some_and(|origin| allowed.contains(&origin));
    if listed {
        OriginVerdict::Allowed(value.clone())
    } else {
        OriginVerdict::Foreign
    }
}

/// A host name from the config, as [`host_allowed`] compares it: lower case,
/// without a trailing dot or a port.
pub fn canonical_host(name: &str) -> Result<String, String> {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid) {
        return Err(
            "expected a DNS name such as \"handover.example.com\", without scheme or port".into(),
        );
    }
    Ok(name)
}

/// Whether a request's `Host` is one the proxy answers to: an IP literal,
/// `localhost`, or one of `names` (canonical, see [`canonical_host`]). A request
/// without a `Host` is refused (HTTP/1.1 requires one).
pub fn host_allowed(headers: &HeaderMap, names: &[String]) -> bool {
    let mut values = headers.get_all(header::HOST).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(authority) = value.to_str() else {
        return false;
    };
    let Ok(authority) = authority.trim().parse::<http::uri::Authority>() else {
        return false;
    };
    let host = authority.host();
    if host.starts_with('[') {
        return host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok();
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || names.contains(&host)
}

/// Whether the request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Adds the CORS headers of an answer to a listed origin.
pub fn add_cors(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    // A 429's Retry-After is for the page's code to read.
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after"),
    );
}

/// Every answer depends on `Origin` (CORS headers, or a 403): caches must know.
pub fn add_vary(headers: &mut HeaderMap) {
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

/// The status and headers of the answer to a listed origin's preflight.
pub fn preflight(request: &HeaderMap, origin: &HeaderValue) -> (StatusCode, HeaderMap) {
    let mut headers = HeaderMap::new();
    add_cors(&mut headers, origin);
    add_vary(&mut headers);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(PREFLIGHT_MAX_AGE),
    );
    // Chrome's Private Network Access: a public page (an app served by Genesys)
    // calling a proxy on a private address asks first.
    let private_network = HeaderName::from_static("access-control-request-private-network");
    if request
        .get(&private_network)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    {
        headers.insert(
            HeaderName::from_static("access-control-allow-private-network"),
            HeaderValue::from_static("true"),
        );
    }
    (StatusCode::NO_CONTENT, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn origins_are_canonical() {
        let ok = |text: &str| canonical_origin(text).unwrap();
        assert_eq!(
            ok("https://Apps.MyPureCloud.com"),
            "https://apps.mypurecloud.com"
        );
        assert_eq!(
            ok("https://apps.example.com:443/"),
            "https://apps.example.com"
        );
        assert_eq!(ok("http://127.0.0.1:8000"), "http://127.0.0.1:8000");
        assert_eq!(
            ok("chrome-extension://abcdefghijklmnopabcdefghijklmnop"),
            "chrome-extension://abcdefghijklmnopabcdefghijklmnop"
        );
        for bad in [
            "apps.example.com",
            "https://apps.example.com/app",
            "https://user:pw@apps.example.com",
            "https://apps.example.com?x=1",
            "null",
            "*",
        ] {
            assert!(canonical_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_listed_origins_are_admitted() {
        let allowed = vec!["https://apps.example.com".to_owned()];
        assert_eq!(judge_origin(&headers(&[]), &allowed), OriginVerdict::Absent);
        assert_eq!(
            judge_origin(
                &headers(&[("origin", "https://apps.example.com")]),
                &allowed
            ),
            OriginVerdict::Allowed(HeaderValue::from_static("https://apps.example.com"))
        );
        for foreign in [
            "https://evil.example",
            "null",
            "https://apps.example.com.evil.example",
            "http://apps.example.com",
            "https://apps.example.com:8443",
        ] {
            assert_eq!(
                judge_origin(&headers(&[("origin", foreign)]), &allowed),
                OriginVerdict::Foreign,
                "{foreign}"
            );
        }
        let twice = headers(&[
            ("origin", "https://apps.example.com"),
            ("origin", "https://evil.example"),
        ]);
        assert_eq!(judge_origin(&twice, &allowed), OriginVerdict::Foreign);
        assert_eq!(
            judge_origin(&headers(&[("origin", "https://apps.example.com")]), &[]),
            OriginVerdict::Foreign,
            "no list: every browser origin is foreign"
        );
    }

    #[test]
    fn hosts_guard_against_dns_rebinding() {
        let names = vec!["handover.example.com".to_owned()];
        for ok in [
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "handover.example.com",
            "Handover.Example.com.:443",
        ] {
            assert!(host_allowed(&headers(&[("host", ok)]), &names), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "handover.example.com.evil.example",
            "localhost.evil.example",
            "",
        ] {
            assert!(
                !host_allowed(&headers(&[("host", refused)]), &names),
                "{refused}"
            );
        }
        assert!(!host_allowed(&headers(&[]), &names), "no Host");
        assert!(!host_allowed(
            &headers(&[("host", "127.0.0.1"), ("host", "evil.example")]),
            &names
        ));
        assert_eq!(
            canonical_host("Handover.Example.com.").unwrap(),
            "handover.example.com"
        );
        assert!(canonical_host("https://x").is_err());
        assert!(canonical_host("x:80").is_err());
    }

    #[test]
    fn preflights_answer_what_the_sdks_send() {
        let origin = HeaderValue::from_static("https://apps.example.com");
        let request = headers(&[
            ("origin", "https://apps.example.com"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "content-type"),
        ]);
        assert!(is_preflight(&Method::OPTIONS, &request));
        assert!(!is_preflight(&Method::PUT, &request));
        assert!(!is_preflight(&Method::OPTIONS, &headers(&[])));
        let (status, answer) = preflight(&request, &origin);
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(answer["access-control-allow-origin"], origin);
        assert_eq!(answer["access-control-allow-methods"], ALLOW_METHODS);
        assert_eq!(answer["access-control-allow-headers"], ALLOW_HEADERS);
        assert_eq!(answer["vary"], "origin");
        assert!(!answer.contains_key("access-control-allow-private-network"));
        assert!(!answer.contains_key("access-control-allow-credentials"));
        let private = headers(&[("access-control-request-private-network", "true")]);
        let (_, answer) = preflight(&private, &origin);
        assert_eq!(answer["access-control-allow-private-network"], "true");
    }
}
