//! What an operator must hear about a valid config: a listener open beyond this host
//! without the guard it needs, and secret files others can read. `check` prints
//! these, `serve` logs them at start and at every reload.
//!
//! Secret files that others can read are warned about, not refused (as OpenSSH
//! does): Docker mounts secrets world-readable, and a Kubernetes secret volume is
//! group-readable by the pod's `fsGroup`, so refusing would break those. A file
//! readable by its group only is fine when that group is one the proxy runs in.

use std::path::Path;

use super::{Config, SecretSource};

/// The warnings for `config`, most serious first. Reads the secret files' metadata.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let server = &config.server;
    if !server.listen.ip().is_loopback() && !config.topics.restricts() {
        out.push(format!(
            "server.listen {} is reachable beyond this host and [topics] has no allow list: \
             anyone who reaches the port can read every topic the OAuth client can, \
             every user's conversations included. Set [topics] allow (config/handover.toml has one for agent desktops).",
            server.listen
        ));
    }
    if !config.admin.listen.ip().is_loopback() && config.admin.token_file.is_none() {
        out.push(format!(
            "admin.listen {} is reachable beyond this host and [admin] token_file is not set: \
             anyone who reaches the port can drain credentials and read the metrics. \
             Set token_file, or keep the port private (a firewall, a NetworkPolicy).",
            config.admin.listen
        ));
    }
    if !server.listen.ip().is_loopback() && server.public_url.starts_with("ws://") {
        out.push(format!(
            "server.listen {} is reachable beyond this host without TLS (public_url {}): \
             set [server.tls], or terminate TLS in front and set public_url to its wss:// URL.",
            server.listen, server.public_url
        ));
    }
    let groups = own_groups();
    let mut secret_files: Vec<(&str, &Path)> = config
        .credentials
        .iter()
        .filter_map(|c| match &c.secret {
            SecretSource::File(path) => Some(("client secret", path.as_path())),
            _ => None,
        })
        .collect();
    if let Some(path) = &config.admin.token_file {
        secret_files.push(("admin token", path));
    }
    if let Some(tls) = &server.tls {
        secret_files.push(("TLS private key", &tls.key_file));
    }
    for (what, path) in secret_files {
        if let Some(who) = readable_by_others(path, &groups) {
            out.push(format!(
                "{what} file {} is readable by {who}: make it readable by the proxy's user (and group) only, \
                 e.g. chmod 0400 (or 0440 with the proxy's group)",
                path.display()
            ));
        }
    }
    out
}

/// Who besides its owner (and the proxy's groups) can read the file at `path`, if
/// anyone. A file that cannot be read now is not judged: using it will say why.
fn readable_by_others(path: &Path, own_groups: &[u32]) -> Option<&'static str> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        exposure(meta.mode(), meta.gid(), own_groups)
    }
    #[cfg(not(unix))]
    {
        let _ = (path, own_groups);
        None
    }
}

/// The decision of [`readable_by_others`], from a file's mode and group.
fn exposure(mode: u32, file_group: u32, own_groups: &[u32]) -> Option<&'static str> {
    if mode & 0o004 != 0 {
        Some("every user on this host")
    } else if mode & 0o040 != 0 && !own_groups.contains(&file_group) {
        Some("a group the proxy is not in")
    } else {
        None
    }
}

/// The process' real, effective and supplementary groups (Linux), read from
/// `/proc/self/status`; empty elsewhere, which judges every group-readable file.
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    status
        .lines()
        .filter_map(|line| {
            line.strip_prefix("Gid:")
                .or_else(|| line.strip_prefix("Groups:"))
        })
        .flat_map(str::split_whitespace)
        .filter_map(|gid| gid.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_read_a_secret_file() {
        assert_eq!(exposure(0o100400, 5, &[]), None);
        assert_eq!(exposure(0o100600, 5, &[]), None);
        assert_eq!(exposure(0o100644, 5, &[5]), Some("every user on this host"));
        assert_eq!(exposure(0o100444, 5, &[5]), Some("every user on this host"));
        assert_eq!(
            exposure(0o100440, 5, &[5, 7]),
            None,
            "the proxy's own group"
        );
        assert_eq!(
            exposure(0o100640, 9, &[5, 7]),
            Some("a group the proxy is not in")
        );
    }

    #[test]
    fn the_process_knows_its_groups() {
        if cfg!(target_os = "linux") {
            assert!(!own_groups().is_empty());
        }
    }
}
