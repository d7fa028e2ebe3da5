//! What `serve` does to its own process at start: no core dumps (a core file would
//! hold client secrets and tokens in the clear), and the open-file limit raised
//! from its soft value to its hard one (each desktop is a file descriptor; the
//! default soft limit of 1024 ran out at about 1,000 idle connections).
//!
//! The connection cap is then kept below the limit, so that the proxy answers 503
//! at the cap instead of failing `accept` with EMFILE.

/// File descriptors kept for everything but client connections: the admin
/// listener's connections, upstream sockets and REST calls, config and secret
/// files, logs.
pub const RESERVED_FDS: u64 = 256;

/// Open-file limits before and after [`harden`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Disables core dumps and raises the open-file soft limit to the hard limit,
/// logging what it found and did. Failures are logged, not fatal: the proxy runs,
/// with the limits it has.
pub fn harden() -> Option<FileLimits> {
    match rlimit::Resource::CORE.set(0, 0) {
        Ok(()) => tracing::info!("core dumps disabled (RLIMIT_CORE 0)"),
        Err(error) => tracing::warn!(%error, "could not disable core dumps"),
    }
    let (soft_before, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "could not read the open-file limit");
            return None;
        }
    };
    let soft = if soft_before < hard {
        match rlimit::Resource::NOFILE.set(hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(%error, soft_before, hard, "could not raise the open-file limit");
                soft_before
            }
        }
    } else {
        soft_before
    };
    tracing::info!(
        soft_before,
        soft,
        hard,
        "open-file limit (RLIMIT_NOFILE): soft {soft_before} → {soft}, hard {hard}"
    );
    Some(FileLimits {
        soft_before,
        soft,
        hard,
    })
}

/// The connection cap to use: `configured`, or less if the open-file limit leaves
/// no room for it beside [`RESERVED_FDS`] (the current soft limit is read).
pub fn connection_cap(configured: usize) -> usize {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, _)) => {
            let cap = cap_within(configured, soft);
            if cap < configured {
                tracing::warn!(
                    configured,
                    cap,
                    soft_limit = soft,
                    "server.max_connections is more than the open-file limit allows: capped \
                     (raise the hard limit, e.g. ulimit -n or the container's nofile)"
                );
            }
            cap
        }
        Err(_) => configured,
    }
}

/// `configured`, at most `soft_limit − RESERVED_FDS` (and at least 1).
pub fn cap_within(configured: usize, soft_limit: u64) -> usize {
    let room = soft_limit.saturating_sub(RESERVED_FDS).max(1);
    configured.min(usize::try_from(room).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_below_the_file_limit() {
        assert_eq!(cap_within(10_000, 1024), 768);
        assert_eq!(cap_within(10_000, 1_048_576), 10_000);
        assert_eq!(cap_within(500, 1024), 500);
        assert_eq!(cap_within(10, 100), 1, "a tiny limit still serves one");
        assert_eq!(cap_within(10, u64::MAX), 10);
    }
}
