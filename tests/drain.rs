//! Health for orchestrators and graceful shutdown, with real processes on loopback (no Docker): the
//! standard gRPC health service of coordinators and workers (`grpc.health.v1`, asked with the
//! tonic-health client) goes `NOT_SERVING` → `SERVING` as the cluster comes up, the gateway's
//! `/ready` follows, and a rolling restart of every worker with SIGTERM under 32 concurrent streams
//! fails no request, each worker exiting 0 well within its grace period.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epserve_control::Kind;
use epserve_testkit::etcd_server::EtcdServer;
use support::{Process, Signal, free_port, tiny_fixture};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};

/// `grpc.health.v1.Health/Check` of `service` at `addr`; `None` when nothing answers.
async fn check(addr: &str, service: &str) -> Option<ServingStatus> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
    let channel = tokio::time::timeout(Duration::from_secs(2), endpoint.connect()).await.ok()?.ok()?;
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest { service: service.to_owned() };
    let answer = tokio::time::timeout(Duration::from_secs(2), client.check(request)).await.ok()?.ok()?;
    health_check_response::ServingStatus::try_from(answer.into_inner().status).ok()
}

/// Polls until `service` at `addr` reports `want` (up to 60 s).
async fn until(addr: &str, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = check(addr, service).await;
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} {service:?}: {got:?}, not {want:?} within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` at `addr`: the status code and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read");
    let status = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

/// `epserve ARGS` started without waiting for its address line (a coordinator prints it only once
/// it is ready); its log goes to stderr.
fn spawn(args: &[&str]) -> Child {
    Command::new(support::epserve())
        .args(args)
        .env("EPSERVE_LOG", "warn")
        .env("EPSERVE_DATA_DIR", support::private_data_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn epserve")
}

/// Waits up to `limit` for `child` to exit: its exit code and how long it took.
fn wait_exit(child: &mut Child, limit: Duration) -> (Option<i32>, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (status.code(), started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not exit within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("kill -TERM");
}

fn worker_args<'a>(model: &'a str, shard: &'a str, url: &'a str, cluster: &'a str) -> Vec<&'a str> {
    vec![
        "worker",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--shard",
        shard,
        "--registry",
        url,
        "--cluster",
        cluster,
        "--shutdown-grace-seconds",
        "20",
    ]
}

#[test]
fn grpc_health_and_gateway_readiness_follow_the_cluster_coming_up_and_draining() {
    let logs = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdServer::start(logs.path()).expect("start etcd (Debian package etcd-server)");
    let url = etcd.url();
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let cluster = "health";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    // A coordinator with no worker yet: live, not ready (it waits for every expert to get a host).
    let coordinator_addr = format!("127.0.0.1:{}", free_port());
    let mut coordinator = spawn(&[
        "coordinator",
        "--model",
        model,
        "--listen",
        &coordinator_addr,
        "--registry",
        &url,
        "--cluster",
        cluster,
        "--shutdown-grace-seconds",
        "10",
    ]);
    runtime.block_on(async {
        until(&coordinator_addr, "liveness", ServingStatus::Serving).await;
        assert_eq!(check(&coordinator_addr, "").await, Some(ServingStatus::NotServing));
        assert_eq!(check(&coordinator_addr, "epserve.v1.CoordinatorService").await, Some(ServingStatus::NotServing));
    });
    let gateway = Process::start(&[
        "gateway",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--registry",
        &url,
        "--cluster",
        cluster,
    ]);
    assert_eq!(get(&gateway.addr, "/health").0, 200, "the gateway is live");
    let (status, body) = get(&gateway.addr, "/ready");
    assert_eq!(status, 503, "no ready coordinator yet: {body}");

    // Half of the experts: still not ready.
    let first = Process::start(&worker_args(model, "0/2", &url, cluster));
    runtime.block_on(async {
        until(&first.addr, "", ServingStatus::Serving).await;
        assert_eq!(check(&first.addr, "epserve.v1.ExpertService").await, Some(ServingStatus::Serving));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(check(&coordinator_addr, "").await, Some(ServingStatus::NotServing), "half the experts");
    });
    // Every expert has a host: ready, and so is the gateway.
    let second = Process::start(&worker_args(model, "1/2", &url, cluster));
    runtime.block_on(until(&coordinator_addr, "", ServingStatus::Serving));
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&gateway.addr, "/ready").0 != 200 {
        assert!(Instant::now() < deadline, "the gateway did not become ready within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = support::post(
        &gateway.addr,
        "/v1/completions",
        r#"{"model": "tiny-llama4", "prompt": "ready", "max_tokens": 4, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{body}");

    // A worker leaving: the elected controller gives its experts, orphaned, to the worker left (which
    // loads them from the checkpoint), so the coordinator is ready again (it may have reported not
    // ready for the moment between; too short to assert on) and serves from the one worker.
    sigterm(&second.child);
    let mut second = second;
    let (code, took) = wait_exit(&mut second.child, Duration::from_secs(20));
    assert_eq!(code, Some(0), "the worker exits 0 after its drain");
    eprintln!("worker drained and exited in {:.2} s", took.as_secs_f64());
    drop(second);
    runtime.block_on(until(&coordinator_addr, "", ServingStatus::Serving));
    let (status, body) = support::post(
        &gateway.addr,
        "/v1/completions",
        r#"{"model": "tiny-llama4", "prompt": "one worker left", "max_tokens": 4, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "served by the worker left, hosting every expert: {body}");

    // The coordinator drains and exits 0; the gateway has no ready coordinator left.
    sigterm(&coordinator);
    let (code, took) = wait_exit(&mut coordinator, Duration::from_secs(20));
    assert_eq!(code, Some(0), "the coordinator exits 0 after its drain");
    eprintln!("coordinator drained and exited in {:.2} s", took.as_secs_f64());
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&gateway.addr, "/ready").0 != 503 {
        assert!(Instant::now() < deadline, "the gateway still ready 30 s after its only coordinator left");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(first);
}

/// One streamed completion through the gateway; `Ok` when it ended with `[DONE]` and no error.
fn stream_once(gateway: &str, i: u64) -> Result<(), String> {
    let body = format!(
        r#"{{"model": "tiny-llama4", "prompt": "drain {i}", "max_tokens": {}, "temperature": 0, "ignore_eos": true, "stream": true}}"#,
        8 + i % 40
    );
    let mut s = std::net::TcpStream::connect(gateway).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {gateway}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    for line in BufReader::new(&mut s).lines() {
        let line = line.map_err(|e| format!("read: {e}"))?;
        response.push_str(&line);
        response.push('\n');
    }
    let ok =
        response.starts_with("HTTP/1.1 200") && !response.contains("\"error\"") && response.contains("data: [DONE]");
    if ok { Ok(()) } else { Err(response.chars().take(600).collect()) }
}

/// Waits until the registry lists `n` workers.
fn until_workers(plane: &epserve_control::ControlPlane, runtime: &tokio::runtime::Runtime, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = runtime.block_on(plane.list(Kind::Worker)).expect("list").len();
        if listed == n {
            return;
        }
        assert!(Instant::now() < deadline, "{listed} workers registered, not {n}, after 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rolling_restart_of_every_worker_with_sigterm_under_32_streams_fails_no_request() {
    let logs = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdServer::start(logs.path()).expect("start etcd (Debian package etcd-server)");
    let url = etcd.url();
    let model = tiny_fixture();
    let model = model.to_str().expect("utf-8");
    let cluster = "rolling";
    let shards = ["0/2", "0/2", "1/2", "1/2"];
    let mut workers: Vec<Process> =
        shards.iter().map(|s| Process::start(&worker_args(model, s, &url, cluster))).collect();
    let coordinators: Vec<Process> = (0..2)
        .map(|_| {
            Process::start(&[
                "coordinator",
                "--model",
                model,
                "--listen",
                "127.0.0.1:0",
                "--registry",
                &url,
                "--cluster",
                cluster,
            ])
        })
        .collect();
    let gateway = Process::start(&[
        "gateway",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--registry",
        &url,
        "--cluster",
        cluster,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&gateway.addr, "/ready").0 != 200 {
        assert!(Instant::now() < deadline, "the gateway did not become ready within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let plane = runtime.block_on(epserve_control::connect(&url, cluster)).expect("connect");

    let done = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..32u64)
        .map(|c| {
            let (gateway, done, sent, failed, failures) =
                (gateway.addr.clone(), done.clone(), sent.clone(), failed.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while !done.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = stream_once(&gateway, i) {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().expect("lock").push(e);
                    }
                    i += 32;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    for (i, shard) in shards.iter().enumerate() {
        let before = sent.load(Ordering::Relaxed);
        sigterm(&workers[i].child);
        let (code, took) = wait_exit(&mut workers[i].child, Duration::from_secs(25));
        assert_eq!(code, Some(0), "worker {i} exits 0 after its drain");
        assert!(took < Duration::from_secs(20), "worker {i} drained within its grace: {took:?}");
        eprintln!("rolling restart: worker {i} ({shard}) drained and exited 0 in {:.2} s", took.as_secs_f64());
        until_workers(&plane, &runtime, shards.len() - 1);
        workers[i] = Process::start(&worker_args(model, shard, &url, cluster));
        until_workers(&plane, &runtime, shards.len());
        // Serving on the new worker before the next one goes.
        std::thread::sleep(Duration::from_secs(2));
        assert!(sent.load(Ordering::Relaxed) > before, "requests kept flowing during worker {i}'s restart");
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rolling restart: 4 workers in {:.1} s, {sent} requests, {failed} failed", elapsed.as_secs_f64());
    assert_eq!(failed, 0, "failed requests: {:?}", failures.lock().expect("lock").iter().take(3).collect::<Vec<_>>());
    assert!(sent > 64, "the load ran: {sent} requests");
    drop((coordinators, gateway));
}
