//! The Kubernetes example cannot rot: the ConfigMap's handover.toml loads through the
//! real config loader, and the Deployment agrees with it (ports, mount paths, a grace
//! period longer than the stop, the channel budget). The manifests themselves are
//! validated against the Kubernetes schemas by `.ci/run`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use handover::config::{Config, GENESYS_CHANNELS_PER_CLIENT, LogFormat, SecretSource};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The first `key: N` in a manifest, at any indentation (each key used here occurs
/// once in deployment.yaml).
fn number(manifest: &str, key: &str) -> u64 {
    manifest
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in the manifest"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

#[test]
fn the_configmap_config_loads_and_the_deployment_agrees_with_it() {
    let config = Config::from_toml(&read("handover.toml"), "deploy/kubernetes/handover.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    let deployment = read("deployment.yaml");

    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.admin.listen.to_string(), "0.0.0.0:9090");
    assert!(deployment.contains("containerPort: 8080"));
    assert!(deployment.contains("containerPort: 9090"));
    assert_eq!(config.log.format, LogFormat::Json);
    assert!(deployment.contains("mountPath: /etc/handover\n"));
    assert!(deployment.contains("\"--config\", \"/etc/handover/handover.toml\""));

    // The secret is a mounted directory, never a subPath (which never sees a rotation).
    assert!(deployment.contains("mountPath: /run/secrets/genesys\n"));
    assert!(
        !deployment
            .lines()
            .any(|line| line.trim_start().starts_with("subPath:"))
    );
    for credential in &config.credentials {
        match &credential.secret {
            SecretSource::File(path) => assert!(
                path.starts_with("/run/secrets/genesys"),
                "{}: {}",
                credential.name,
                path.display()
            ),
            other => panic!("{}: {other:?}", credential.name),
        }
    }

    // The pod is given longer than its whole stop: the preStop sleep, then the drain
    // bounded by shutdown_grace; and the next replica stops only once it is gone.
    let grace = Duration::from_secs(number(&deployment, "terminationGracePeriodSeconds"));
    let pre_stop = Duration::from_secs(number(&deployment, "seconds"));
    assert!(
        grace > pre_stop + config.server.shutdown_grace,
        "terminationGracePeriodSeconds {grace:?} <= preStop {pre_stop:?} + shutdown_grace {:?}",
        config.server.shutdown_grace
    );
    assert!(Duration::from_secs(number(&deployment, "minReadySeconds")) >= grace);
    assert_eq!(number(&deployment, "maxSurge"), 0);

    // The budget rule: every replica's channels plus the one being replaced.
    let replicas = number(&deployment, "replicas") as usize;
    assert!(
        (replicas + 1) * config.upstream.max_channels <= GENESYS_CHANNELS_PER_CLIENT,
        "{replicas} replicas + 1 × {} channels",
        config.upstream.max_channels
    );
}
