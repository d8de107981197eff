//! deploy/ (issue 20), with real containers on real networks: the image from deploy/Dockerfile
//! (its `host` stage, around the `epserve` binary this workspace built), the compose cluster of
//! deploy/compose (3 etcd members, 4 workers holding two replicas of every expert, 2 coordinators,
//! the gateway, each container with its own address), and the Kubernetes manifests, rendered,
//! validated against the Kubernetes schemas and checked container by container.
//!
//! The Docker test skips, saying why, where no Docker daemon answers. Under 32 concurrent streams it
//! checks that no request fails while (a) a worker is killed, (b) a worker is cut off from the
//! network (its lease expires; it rejoins when reconnected), (c) one etcd member of three is stopped
//! and (d) every worker is restarted in turn by SIGTERM (`docker stop`, through tini): each drains —
//! leaves the registry, waits until no coordinator routes to it — and exits 0 before it comes back.

#[path = "deploy_support/compose.rs"]
mod compose;
#[path = "deploy_support/load.rs"]
mod load;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use compose::{Compose, docker};
use load::Load;
use support::{body_json, free_port, post, tiny_fixture};

const MODEL: &str = "tiny-llama4";
const STREAMS: usize = 32;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn kubernetes_manifests_validate_and_every_container_has_probes_resources_and_a_security_context() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(repo().join("tests/deploy_manifests.py"))
        .arg(repo())
        .output()
        .expect("run python3 (scripts/ensure-tools installs kubernetes-validate)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy/kubernetes checks failed:\n{}\n{}",
        stdout.lines().filter(|l| !l.starts_with("ok ")).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let checks = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(checks > 100, "only {checks} checks ran");
    eprintln!("deploy/kubernetes: {checks} checks passed; {}", stdout.lines().last().unwrap_or_default());
}

#[test]
fn compose_cluster_serves_like_generate_and_loses_no_request_to_faults() {
    if let Some(why) = compose::unavailable() {
        eprintln!("skipping the Docker test: {why}");
        return;
    }
    let image = format!("epserve:e2e-{}", std::process::id());
    let built = Command::new(repo().join("scripts/docker-image"))
        .args(["--from-host", support::epserve().to_str().expect("utf-8"), "--tag", &image])
        .output()
        .expect("run scripts/docker-image");
    assert!(built.status.success(), "scripts/docker-image failed:\n{}", String::from_utf8_lossy(&built.stderr));
    eprintln!("image (deploy/Dockerfile, target host): {}", String::from_utf8_lossy(&built.stdout).trim());
    let _image = RemoveImage(image.clone());
    check_image(&image);

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cluster = Compose::new(
        &repo().join("deploy/compose/docker-compose.yml"),
        &format!("epserve-e2e-{}", std::process::id()),
        &[
            ("EPSERVE_IMAGE", image.clone()),
            ("EPSERVE_MODEL_DIR", tiny_fixture().canonicalize().expect("fixture").display().to_string()),
            ("EPSERVE_HTTP_PORT", port.to_string()),
            ("EPSERVE_SERVED_MODEL_NAME", MODEL.into()),
            ("EPSERVE_LEASE_TTL_MS", "3000".into()),
            ("EPSERVE_EXCHANGE_TIMEOUT_MS", "2000".into()),
            ("EPSERVE_KV_CAPACITY_TOKENS", "8192".into()),
            ("EPSERVE_LOG", "info".into()),
            ("EPSERVE_HEALTHCHECK_INTERVAL", "1s".into()),
        ],
    );
    let started = Instant::now();
    cluster.ok(&["up", "-d"]);
    wait_serving(&addr, Duration::from_secs(180));
    eprintln!("compose cluster serving {:.1} s after `up -d`", started.elapsed().as_secs_f64());
    for w in ["worker-1", "worker-2", "worker-3", "worker-4"] {
        cluster.wait_registered(w, true, Duration::from_secs(30));
    }
    // Every epserve container's health check (gRPC health; the gateway's /ready) passes.
    for service in ["worker-1", "worker-2", "worker-3", "worker-4", "coordinator-1", "coordinator-2", "gateway"] {
        cluster.wait_healthy(service, Duration::from_secs(60));
    }

    // Same greedy text through three containers' network hops as in one process.
    let offline = support::run_json(&[
        "generate",
        "--model",
        tiny_fixture().to_str().expect("utf-8"),
        "--prompt",
        "Tell me about containers",
        "--chat",
        "--max-tokens",
        "16",
        "--json",
    ]);
    let body = serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me about containers"}],
        "max_tokens": 16, "temperature": 0,
    });
    let (status, response) = post(&addr, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{response}");
    let served = body_json(&response)["choices"][0]["message"]["content"].as_str().expect("content").to_owned();
    assert_eq!(served, offline["text"].as_str().expect("text"), "the cluster's greedy text is generate's");

    let steady = Load::start(&addr, MODEL, STREAMS, 24);
    std::thread::sleep(Duration::from_secs(8));
    let steady = steady.finish();
    steady.assert_no_failure("steady load");
    eprintln!(
        "steady: {} requests, {:.1} output tokens/s at concurrency {STREAMS}",
        steady.ok,
        steady.tokens_per_second()
    );

    // (a) A worker killed (SIGKILL, as a crashed host): its replica takes over.
    let load = Load::start(&addr, MODEL, STREAMS, 24);
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    docker(&["kill", &cluster.container("worker-1")]);
    std::thread::sleep(Duration::from_secs(8));
    let report = load.finish();
    report.assert_no_failure("(a) docker kill worker-1");
    eprintln!(
        "(a) kill: {} requests, 0 failed; longest pause in the token flow {:.2} s",
        report.ok,
        report.longest_pause_after(killed_at).as_secs_f64()
    );
    docker(&["start", &cluster.container("worker-1")]);
    cluster.wait_registered("worker-1", true, Duration::from_secs(60));

    // (b) A worker cut off from the network, not killed: its lease expires, traffic moves to the
    // replicas; reconnected (under its DNS name again), it registers anew.
    let (network, worker2) = (cluster.network("cluster"), cluster.container("worker-2"));
    let load = Load::start(&addr, MODEL, STREAMS, 24);
    std::thread::sleep(Duration::from_secs(2));
    let cut_at = Instant::now();
    docker(&["network", "disconnect", &network, &worker2]);
    let expired = cluster.wait_registered("worker-2", false, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(5));
    let report = load.finish();
    report.assert_no_failure("(b) worker-2 cut off");
    let pause = report.longest_pause_after(cut_at);
    docker(&["network", "connect", "--alias", "worker-2", &network, &worker2]);
    let rejoined = cluster.wait_registered("worker-2", true, Duration::from_secs(60));
    eprintln!(
        "(b) cut off: {} requests, 0 failed; lease expired {:.2} s after the cut; longest pause in the \
         token flow (recovery) {:.2} s; re-registered {:.2} s after reconnecting",
        report.ok,
        expired.as_secs_f64(),
        pause.as_secs_f64(),
        rejoined.as_secs_f64()
    );
    assert!(pause < Duration::from_secs(15), "traffic moved to the replicas: longest pause {pause:?}");

    // (c) One etcd member of three stopped: the registry keeps its quorum, serving goes on.
    let load = Load::start(&addr, MODEL, STREAMS, 24);
    std::thread::sleep(Duration::from_secs(2));
    docker(&["stop", "-t", "5", &cluster.container("etcd-2")]);
    std::thread::sleep(Duration::from_secs(8));
    let report = load.finish();
    report.assert_no_failure("(c) etcd-2 stopped");
    eprintln!("(c) etcd member stopped: {} requests, 0 failed", report.ok);
    docker(&["start", &cluster.container("etcd-2")]);

    // (d) Rolling restart: each worker in turn gets SIGTERM (through tini), drains, exits 0 and comes
    // back (healthy: its experts loaded, registered) before the next one goes.
    let load = Load::start(&addr, MODEL, STREAMS, 24);
    std::thread::sleep(Duration::from_secs(2));
    let mut drains = Vec::new();
    for w in ["worker-1", "worker-2", "worker-3", "worker-4"] {
        let id = cluster.container(w);
        let stopping = Instant::now();
        docker(&["stop", "-t", "40", &id]);
        let drained = stopping.elapsed();
        drains.push(drained.as_secs_f64());
        assert_eq!(docker(&["inspect", "-f", "{{.State.ExitCode}}", &id]), "0", "{w} exited cleanly after draining");
        assert!(drained < Duration::from_secs(30), "{w} drained within its grace period: {drained:?}");
        docker(&["start", &id]);
        cluster.wait_registered(w, true, Duration::from_secs(60));
        cluster.wait_healthy(w, Duration::from_secs(60));
        // The coordinators connected to it before the next worker goes.
        std::thread::sleep(Duration::from_secs(2));
    }
    let report = load.finish();
    report.assert_no_failure("(d) rolling restart");
    eprintln!(
        "(d) rolling restart of 4 workers: {} requests, 0 failed; SIGTERM to exit {:?} s",
        report.ok,
        drains.iter().map(|d| (d * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
}

/// The image runs as a non-root user under tini, with OCI labels, and works on a read-only root.
fn check_image(image: &str) {
    let config = docker(&["image", "inspect", "-f", "{{.Config.User}} {{json .Config.Entrypoint}}", image]);
    assert_eq!(config, r#"10001:10001 ["/usr/bin/tini","--","/usr/local/bin/epserve"]"#);
    let title =
        docker(&["image", "inspect", "-f", r#"{{index .Config.Labels "org.opencontainers.image.title"}}"#, image]);
    assert_eq!(title, "epserve");
    let version = docker(&["run", "--rm", "--read-only", image, "--version"]);
    assert!(version.starts_with("epserve "), "{version}");
}

/// Waits until the gateway is ready and a chat completion succeeds.
fn wait_serving(addr: &str, limit: Duration) {
    let started = Instant::now();
    let chat = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    loop {
        let ready = status_of(addr, "GET", "/ready", "") == Some(200)
            && status_of(addr, "POST", "/v1/chat/completions", &chat.to_string()) == Some(200);
        if ready {
            return;
        }
        assert!(started.elapsed() < limit, "the compose cluster served within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The status of one HTTP/1.1 request, `None` while nothing answers (the published port accepts
/// connections before the gateway listens behind it).
fn status_of(addr: &str, method: &str, path: &str, body: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Removes the test's image tag when dropped.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}
