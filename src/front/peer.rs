//! Who the peer is: the address fair-use limits and the logs are keyed by.
//!
//! It is the connection's address, or — only when that address is a configured
//! trusted proxy — the address the proxy reports: in a PROXY protocol v2 header
//! (read by `http_server`) or in `X-Forwarded-For`. Anyone else's `X-Forwarded-For`
//! is ignored, or a client could pick its own identity and slip every limit.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

/// Whether `addr` is one of the `trusted` proxies.
pub fn is_trusted(addr: IpAddr, trusted: &[IpNet]) -> bool {
    let addr = canonical(addr);
    trusted.iter().any(|net| net.contains(&addr))
}

/// The client's address for a connection from `remote` carrying the
/// `X-Forwarded-For` values `forwarded` (all of its header lines, in order).
///
/// Walks the list from the right, as nginx's `real_ip_recursive` does: each hop
/// appended by a trusted proxy is believed, and the first address that is not a
/// trusted proxy is the client. An unreadable entry stops the walk at the last
/// trusted hop, so garbage cannot be used to skip past a proxy.
pub fn client_address<'a>(
    remote: IpAddr,
    forwarded: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let mut client = canonical(remote);
    if !is_trusted(client, trusted) {
        return client;
    }
    for entry in forwarded.flat_map(|line| line.split(',')).rev() {
        let Some(hop) = parse_hop(entry) else {
            return client;
        };
        client = hop;
        if !is_trusted(hop, trusted) {
            return hop;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`,
/// `[::1]:5`).
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(socket) = entry.parse::<std::net::SocketAddr>() {
        return Some(canonical(socket.ip()));
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
        .map(|ip| canonical(IpAddr::V6(ip)))
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, from a dual-stack listener) as IPv4.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The key a peer's limits are counted under: an IPv4 address, or the /64 network
/// of an IPv6 address (one host commonly holds a whole /64, and would otherwise
/// have 2^64 identities).
pub fn limit_key(addr: IpAddr) -> IpAddr {
    match canonical(addr) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8"]);
        // Not from a proxy: the header is the client's own claim, ignored.
        assert_eq!(
            client_address(ip("203.0.113.9"), ["1.2.3.4"].into_iter(), &trusted),
            ip("203.0.113.9")
        );
        // From the proxy: the hop it appended.
        assert_eq!(
            client_address(ip("10.0.0.5"), ["1.2.3.4"].into_iter(), &trusted),
            ip("1.2.3.4")
        );
        // A client that prepends its own fake entry does not get past the proxy's.
        assert_eq!(
            client_address(
                ip("10.0.0.5"),
                ["6.6.6.6, 198.51.100.7"].into_iter(),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Chained trusted proxies are walked through, over several header lines.
        assert_eq!(
            client_address(
                ip("10.0.0.5"),
                ["198.51.100.7", "10.0.0.9"].into_iter(),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            client_address(ip("10.0.0.5"), ["1.2.3.4, nonsense"].into_iter(), &trusted),
            ip("10.0.0.5")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_address(ip("10.0.0.5"), std::iter::empty(), &trusted),
            ip("10.0.0.5")
        );
        // Ports and brackets, and a mapped address from a dual-stack socket.
        assert_eq!(
            client_address(
                ip("::ffff:10.0.0.5"),
                ["[2001:db8::1]:443"].into_iter(),
                &trusted
            ),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_address(ip("10.0.0.5"), ["192.0.2.1:5000"].into_iter(), &trusted),
            ip("192.0.2.1")
        );
        // Nothing trusted: nothing believed.
        assert_eq!(
            client_address(ip("10.0.0.5"), ["1.2.3.4"].into_iter(), &[]),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn ipv6_peers_are_counted_per_64() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1")),
            limit_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}
