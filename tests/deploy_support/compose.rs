//! deploy/compose driven from a test: `docker-compose` (or `docker compose`) under a project name of
//! its own, the containers' ids and networks, the registry's view through `etcdctl` in etcd-1, and
//! `down -v` when dropped (with the logs printed when the test failed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Why Docker tests cannot run here, or `None` when a daemon answers and Compose is installed.
pub fn unavailable() -> Option<String> {
    match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Some(format!("no Docker daemon answers: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => return Some(format!("no docker command: {e}")),
    }
    if compose_command().is_none() {
        return Some("neither docker-compose nor `docker compose` is installed".into());
    }
    None
}

fn compose_command() -> Option<Vec<String>> {
    let works =
        |cmd: &[&str]| Command::new(cmd[0]).args(&cmd[1..]).arg("version").output().is_ok_and(|o| o.status.success());
    if works(&["docker-compose"]) {
        Some(vec!["docker-compose".into()])
    } else if works(&["docker", "compose"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else {
        None
    }
}

/// Runs `docker ARGS`; panics with its output when it fails.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("run docker");
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A compose project, taken down with its volumes when dropped.
pub struct Compose {
    command: Vec<String>,
    file: PathBuf,
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    pub fn new(file: &Path, project: &str, env: &[(&str, String)]) -> Compose {
        Compose {
            command: compose_command().expect("compose is installed"),
            file: file.to_owned(),
            project: project.to_owned(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.command[0])
            .args(&self.command[1..])
            .args(["-p", &self.project, "-f"])
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run compose")
    }

    /// Runs `compose ARGS`; panics with its output when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "compose {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> String {
        let id = self.ok(&["ps", "-q", service]);
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// The name of the project's network `name` (compose prefixes it with the project).
    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project.replace(['.', ' '], ""))
    }

    /// The worker ids registered in etcd (read with etcdctl in etcd-1, which the tests never stop).
    pub fn registered_workers(&self) -> Vec<String> {
        let etcd = self.container("etcd-1");
        let keys = docker(&[
            "exec",
            &etcd,
            "etcdctl",
            "--endpoints=http://127.0.0.1:2379",
            "get",
            "--prefix",
            "/epserve/",
            "--keys-only",
        ]);
        let mut ids: Vec<String> =
            keys.lines().filter_map(|k| k.split_once("/instances/worker/").map(|(_, id)| id.to_owned())).collect();
        ids.sort();
        ids
    }

    /// Waits up to `limit` for `worker` to be registered (`present`) or gone; how long that took.
    pub fn wait_registered(&self, worker: &str, present: bool, limit: Duration) -> Duration {
        let started = Instant::now();
        while self.registered_workers().iter().any(|w| w == worker) != present {
            assert!(
                started.elapsed() < limit,
                "{worker} {} within {limit:?}",
                if present { "registered" } else { "left the registry" }
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    }

    /// Waits up to `limit` for `service`'s container to report `healthy` (its compose
    /// `healthcheck`: `epserve probe`, i.e. gRPC health or the gateway's `/ready`); how long it took.
    pub fn wait_healthy(&self, service: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        let id = self.container(service);
        loop {
            let health = docker(&["inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", &id]);
            if health == "healthy" {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "{service} not healthy within {limit:?} (health: {health:?})");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn logs(&self, tail: usize) -> String {
        let out = self.run(&["logs", "--no-color", "--tail", &tail.to_string()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- compose logs ---\n{}", self.logs(40));
        }
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}
