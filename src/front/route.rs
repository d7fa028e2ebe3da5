//! How a request's path is named in the access log: its route, with ids replaced
//! by `{id}`. A client channel id is the key to that channel's events (whoever holds
//! it can open its socket), so it never reaches a log; paths the proxy does not
//! serve are logged as `(unknown)`, never verbatim (they may carry anything).

/// The route of a client-listener path.
pub fn client_route(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v2", "notifications", "channels"] => "/api/v2/notifications/channels",
        ["api", "v2", "notifications", "channels", _] => "/api/v2/notifications/channels/{id}",
        ["api", "v2", "notifications", "channels", _, "subscriptions"] => {
            "/api/v2/notifications/channels/{id}/subscriptions"
        }
        ["api", "v2", "notifications", "availabletopics"] => {
            "/api/v2/notifications/availabletopics"
        }
        ["channels", _] => "/channels/{id}",
        ["stream"] => "/stream",
        _ => "(unknown)",
    }
}

/// The route of an admin-listener path (credential names are not secret, but are
/// the operator's to choose: they are replaced too).
pub fn admin_route(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["metrics"] => "/metrics",
        ["admin", "credentials"] => "/admin/credentials",
        ["admin", "credentials", _, "drain"] => "/admin/credentials/{name}/drain",
        ["admin", "credentials", _, "undrain"] => "/admin/credentials/{name}/undrain",
        ["admin", "channels"] => "/admin/channels",
        _ => "(unknown)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_reach_the_route() {
        assert_eq!(
            client_route("/api/v2/notifications/channels/handover-abc/subscriptions"),
            "/api/v2/notifications/channels/{id}/subscriptions"
        );
        assert_eq!(client_route("/channels/handover-abc"), "/channels/{id}");
        assert_eq!(client_route("/stream"), "/stream");
        assert_eq!(client_route("/channels/handover-abc/../x"), "(unknown)");
        assert_eq!(client_route("/%0aforged log line"), "(unknown)");
        assert_eq!(
            admin_route("/admin/credentials/primary/drain"),
            "/admin/credentials/{name}/drain"
        );
        assert_eq!(admin_route("/nope"), "(unknown)");
    }
}
