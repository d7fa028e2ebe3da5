//! The image, run as production runs it, on a real Docker daemon: a read-only root
//! filesystem, no capabilities, the config and the OAuth secret mounted read-only the
//! way Kubernetes mounts a ConfigMap and a Secret volume (files that are symlinks into
//! a `..data` directory, which the kubelet swaps atomically), against the fake Genesys
//! Cloud on the host (`--network host`). A desktop gets every event across handovers
//! and a secret rotation; `docker stop` drains and the container exits 0.
//!
//! Needs Docker and the image, so it is `#[ignore]`d; `.ci/run` builds the image and
//! runs it: `HANDOVER_IMAGE=handover:ci cargo test --test container -- --ignored`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::proxy::{desktop, settle, start_stream, stream_done};
use common::*;
use handover::mock::{ClientSpec, MockConfig, Settings};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

const TOPIC: &str = "v2.users.container.presence";
const EVENTS: u64 = 320;
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A directory as the kubelet's atomic writer lays out a Secret or ConfigMap volume:
/// the files in `..<version>/`, `..data -> ..<version>`, and each file a symlink
/// `name -> ..data/name`. An update writes a new version directory, points a new
/// symlink at it and renames that over `..data` (one atomic step), then removes the
/// old version.
struct KubeVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl KubeVolume {
    fn new(files: &[(&str, &str)]) -> KubeVolume {
        let dir = tempfile::tempdir().expect("temp dir");
        // Readable by the container's user (65532), as the kubelet's 0644/0755.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut volume = KubeVolume { dir, version: 0 };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.path().join(name)).unwrap();
        }
        volume
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..2026_12_02_00_00_00.{}", self.version);
        let version_dir = self.path().join(&version);
        std::fs::create_dir(&version_dir).unwrap();
        std::fs::set_permissions(&version_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (name, content) in files {
            let file = version_dir.join(name);
            std::fs::write(&file, content).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let data_tmp = self.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &data_tmp).unwrap();
        std::fs::rename(&data_tmp, self.path().join("..data")).unwrap();
        if self.version > 1 {
            let old = self
                .path()
                .join(format!("..2026_12_02_00_00_00.{}", self.version - 1));
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.0])
            .output();
    }
}

async fn docker(args: &[&str]) -> (bool, String) {
    let output = Command::new("docker")
        .args(args)
        .output()
        .await
        .expect("docker runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

fn config(fake_url: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndrain_delay = \"1s\"\ndrain_spread = \"2s\"\nshutdown_grace = \"{}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [genesys]\nlogin_url = \"{fake_url}\"\napi_url = \"{fake_url}\"\n\
         [[credentials]]\nname = \"primary\"\nclient_id = \"client-a\"\nclient_secret_file = \"/run/secrets/genesys/primary\"\n\
         [handover]\nlead = \"2s\"\noverlap = \"500ms\"\n[upstream]\nmax_channels = 3\n[log]\nformat = \"json\"\n",
        humantime::format_duration(SHUTDOWN_GRACE)
    )
}

async fn handovers(admin: &Api) -> u64 {
    metric(admin, "handover_handovers_total", &[])
        .await
        .unwrap_or(0.0) as u64
}

#[tokio::test]
#[ignore = "needs a Docker daemon and the image (HANDOVER_IMAGE): .ci/run runs it"]
async fn the_image_hands_over_rides_a_mounted_secret_rotation_and_drains_on_docker_stop() {
    let image = std::env::var("HANDOVER_IMAGE").unwrap_or_else(|_| "handover:ci".to_owned());
    let (user_ok, user) =
        docker(&["image", "inspect", "--format", "{{.Config.User}}", &image]).await;
    assert!(user_ok, "no image {image}: {user}");
    assert_eq!(user.trim(), "65532:65532", "runs as non-root");

    let (fake, fake_api) = start(MockConfig {
        clients: vec![ClientSpec::new(
            "client-a",
            "secret-one",
            Duration::from_secs(6),
        )],
        settings: Settings::default(),
        socket_base: None,
    })
    .await;
    let config_volume = KubeVolume::new(&[("handover.toml", &config(&fake.base_url()))]);
    let mut secret_volume = KubeVolume::new(&[("primary", "secret-one\n")]);

    let name = format!("handover-test-{}", std::process::id());
    let container = Container(name.clone());
    let mount = |volume: &KubeVolume, at: &str| -> String {
        format!("{}:{at}:ro", volume.path().display())
    };
    let mut run = Command::new("docker")
        .args(["run", "--name", &name, "--network", "host", "--read-only"])
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .args(["-v", &mount(&config_volume, "/etc/handover")])
        .args(["-v", &mount(&secret_volume, "/run/secrets/genesys")])
        .arg(&image)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("docker run");
    let mut stderr = run.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    let mut stdout = BufReader::new(run.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("the container starts")
        .unwrap()
        .expect("it prints its addresses");
    let (client_addr, admin_addr) = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_once(", admin on "))
        .expect("listening line");
    let client = Api::new(format!("http://{client_addr}"));
    let admin = Api::new(format!("http://{admin_addr}"));

    // Ready without a desktop, as its health check sees it from inside the container.
    let probe_url = format!("http://{admin_addr}");
    let (name_ref, probe_ref) = (&name, &probe_url);
    wait_for("the probe inside the container to pass", || async move {
        let (ok, _) = docker(&["exec", name_ref, "/handover", "probe", "--url", probe_ref]).await;
        ok.then_some(())
    })
    .await;

    let desktop = desktop(&client, &[TOPIC.to_owned()]).await;
    let stream = start_stream(&fake_api, &[TOPIC.to_owned()], 20.0, EVENTS).await;
    let admin_ref = &admin;
    wait_for("a first handover", || async move {
        (handovers(admin_ref).await >= 1).then_some(())
    })
    .await;

    // Rotation as in real life: the secret is regenerated in Genesys, then the kubelet
    // swaps the mounted Secret's ..data.
    let minted_before = fake_api.stats().await["clients"]["client-a"]["tokens_issued"]
        .as_u64()
        .unwrap();
    let handovers_before = handovers(&admin).await;
    let rotated = fake_api
        .control(
            Method::POST,
            "clients/client-a/rotate",
            json!({"mode": "keep_tokens", "secret": "secret-two"}),
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    secret_volume.update(&[("primary", "secret-two\n")]);
    let fake_ref = &fake_api;
    wait_for("a token minted with the rotated secret", || async move {
        let issued = fake_ref.stats().await["clients"]["client-a"]["tokens_issued"].as_u64()?;
        (issued > minted_before).then_some(())
    })
    .await;
    wait_for("a handover after the rotation", || async move {
        (handovers(admin_ref).await > handovers_before + 1).then_some(())
    })
    .await;

    stream_done(&fake_api, stream, Instant::now() + Duration::from_secs(30)).await;
    let all = [TOPIC.to_owned()];
    let desktops = [desktop];
    let (lost, duplicated, unexpected) =
        settle(&desktops, &|d| d.expected(stream, &all, EVENTS)).await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
    assert!(!desktops[0].disconnected(), "no disconnect before the stop");

    let handed_over = handovers(&admin).await;
    // docker stop: SIGTERM, then SIGKILL after the timeout unless it exits first.
    let stop = Instant::now();
    let timeout = (SHUTDOWN_GRACE + Duration::from_secs(5))
        .as_secs()
        .to_string();
    let (stopped, text) = docker(&["stop", "-t", &timeout, &name]).await;
    assert!(stopped, "{text}");
    let took = stop.elapsed();
    let status = tokio::time::timeout(DEADLINE, run.wait())
        .await
        .expect("docker run returns")
        .unwrap();
    assert_eq!(status.code(), Some(0), "the container exits 0");
    assert!(took < SHUTDOWN_GRACE, "stopped in {took:?}");
    assert_eq!(
        desktops[0].log.lock().unwrap().closed,
        Some(Some(1012)),
        "the desktop was told to reconnect"
    );
    let stats = fake_api.stats().await;
    assert_eq!(
        stats["clients"]["client-a"]["live_tokens"], 0,
        "tokens retired"
    );
    println!("{handed_over} handovers, 1 secret rotation; docker stop took {took:?}");

    let logs = logs.await.unwrap();
    for line in logs.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON object: {line}"
        );
    }
    assert!(logs.contains("a token was minted: ready"), "{logs}");
    for secret in ["secret-one", "secret-two"] {
        assert!(!logs.contains(secret), "a client secret in the logs");
    }
    drop(container);
}
