//! The control plane end to end, on a real etcd: components find each other through it, a killed
//! worker is failed over to its replicas without losing a request, experts without a live host are
//! reassigned by the elected coordinator, and the cluster survives etcd itself restarting.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use epserve_control::{ControlPlane, Kind};
use epserve_proto::v1::StatusRequest;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_testkit::etcd_server::EtcdServer;
use support::{Process, body_json, post, tiny_fixture};

const TTL_MS: &str = "2000";

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis()
}

/// A cluster registered in etcd: workers, coordinators (logs kept), a gateway.
/// Fields drop in order: the processes stop before etcd does.
struct EtcdBackedCluster {
    gateway: Process,
    coordinators: Vec<Process>,
    workers: Vec<Process>,
    etcd: EtcdServer,
    logs: tempfile::TempDir,
}

impl EtcdBackedCluster {
    /// `selections[i]`: worker i's `--experts` list.
    fn start(selections: &[&str], coordinators: usize, coordinator_flags: &[&str]) -> EtcdBackedCluster {
        let logs = tempfile::tempdir().expect("tempdir");
        let etcd = EtcdServer::start(logs.path()).expect("start etcd (Debian package etcd-server)");
        let url = etcd.url();
        let model = tiny_fixture();
        let model = model.to_str().expect("utf-8");
        let registry = ["--registry", url.as_str(), "--cluster", "test", "--lease-ttl-ms", TTL_MS];
        let workers = selections
            .iter()
            .map(|experts| {
                let mut a = vec!["worker", "--model", model, "--listen", "127.0.0.1:0", "--experts", experts];
                a.extend_from_slice(&registry);
                Process::start(&a)
            })
            .collect();
        let coordinators = (0..coordinators)
            .map(|i| {
                let mut a = vec!["coordinator", "--model", model, "--listen", "127.0.0.1:0"];
                a.extend_from_slice(&registry);
                a.extend_from_slice(coordinator_flags);
                Process::start_logged(&a, &logs.path().join(format!("coordinator-{i}.log")))
            })
            .collect();
        let mut a = vec!["gateway", "--model", model, "--listen", "127.0.0.1:0", "--health-interval-ms", "200"];
        a.extend_from_slice(&registry);
        let gateway = Process::start(&a);
        let cluster = EtcdBackedCluster { etcd, workers, coordinators, gateway, logs };
        let deadline = Instant::now() + Duration::from_secs(60);
        while post(&cluster.gateway.addr, "/ready", "").0 != 200 {
            assert!(Instant::now() < deadline, "the gateway found no coordinator through etcd within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn plane(&self, runtime: &tokio::runtime::Runtime) -> ControlPlane {
        runtime.block_on(epserve_control::connect(&self.etcd.url(), "test")).expect("connect to etcd")
    }

    fn coordinator_log(&self) -> String {
        (0..self.coordinators.len())
            .map(|i| std::fs::read_to_string(self.logs.path().join(format!("coordinator-{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    format!(
        r#"{{"model": "tiny-llama4", "prompt": "{prompt}", "max_tokens": {max_tokens}, "temperature": 0, "ignore_eos": true, "stream": {stream}}}"#
    )
}

/// Streams a completion; signals `started` at the first event; returns the status and the text.
fn stream(addr: &str, body: &str, started: mpsc::Sender<()>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut all = String::new();
    let mut signalled = false;
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        if !signalled && line.starts_with("data: ") {
            let _ = started.send(());
            signalled = true;
        }
        all.push_str(&line);
        all.push('\n');
    }
    let status = all.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, all)
}

/// The generated text of an SSE completion stream, and its finish reason.
fn sse_text(response: &str) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for data in response.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else { continue };
        assert!(v.get("error").is_none(), "error event: {data}");
        if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    (text, finish)
}

/// Runs `n` concurrent streamed completions; `during` runs once the first has produced an event.
fn run_streams(addr: &str, n: usize, max_tokens: u32, during: impl FnOnce()) -> Vec<String> {
    let (started_tx, started) = mpsc::channel();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (addr, tx) = (addr.to_owned(), started_tx.clone());
            let body = completion(&format!("Request {i} asks about {}", "expert ".repeat(i % 5 + 1)), max_tokens, true);
            std::thread::spawn(move || stream(&addr, &body, tx))
        })
        .collect();
    started.recv_timeout(Duration::from_secs(60)).expect("a stream started");
    during();
    handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let (status, response) = h.join().expect("thread");
            assert_eq!(status, 200, "request {i}: {response}");
            let (text, finish) = sse_text(&response);
            assert_eq!(finish.as_deref(), Some("length"), "request {i} did not complete: {response}");
            assert!(response.contains("data: [DONE]"), "request {i}: {response}");
            text
        })
        .collect()
}

/// Each expert on 2 of 4 workers; 32 streams running; one worker SIGKILLed mid-stream: every
/// stream completes with exactly the tokens of a run without the failure.
#[test]
fn killed_worker_fails_over_to_replicas_without_losing_a_request() {
    // Worker i serves shards i and i+1 (mod 4) of 16 experts.
    let selections = ["0-7", "4-11", "8-15", "0-3,12-15"];
    let mut cluster = EtcdBackedCluster::start(&selections, 2, &[]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let plane = cluster.plane(&runtime);
    // The gateway answers /ready once it sees a coordinator; its own registration is written by a
    // background task, so it may land a moment later.
    let registered = |kind| runtime.block_on(plane.list(kind)).expect("list").len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (registered(Kind::Worker), registered(Kind::Coordinator), registered(Kind::Gateway)) != (4, 2, 1) {
        assert!(Instant::now() < deadline, "not every instance registered within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    let started = Instant::now();
    let reference = run_streams(&cluster.gateway.addr, 32, 128, || {});
    eprintln!("32 streams of 128 tokens took {:?}", started.elapsed());
    let mut killed_at = 0;
    let victim = &mut cluster.workers[1];
    let with_failure = run_streams(&cluster.gateway.addr, 32, 128, || {
        // Mid-stream: the streams have started and have most of their tokens still to come.
        std::thread::sleep(Duration::from_millis(100));
        killed_at = unix_ms();
        victim.kill();
    });
    for (i, (a, b)) in reference.iter().zip(&with_failure).enumerate() {
        assert_eq!(a, b, "request {i} produced other tokens after the failover");
    }
    // How long after the kill each coordinator finished its first step without the worker.
    let log = cluster.coordinator_log();
    let recoveries: Vec<i128> = log
        .lines()
        .filter(|l| l.contains("failover: first step without worker"))
        .filter_map(|l| l.split("recovered_at_unix_ms=").nth(1)?.split_whitespace().next()?.parse::<i128>().ok())
        .map(|at| at - killed_at as i128)
        .collect();
    assert!(!recoveries.is_empty(), "no coordinator reported the failover:\n{log}");
    eprintln!("kill → first step without the dead worker: {recoveries:?} ms (per coordinator)");
    assert!(recoveries.iter().all(|&ms| ms < 5_000), "{recoveries:?}");
    assert!(log.contains("expert worker lost"), "{log}");
}

/// Without replicas, the elected coordinator reassigns a dead worker's experts to the survivors,
/// which load them; requests meanwhile wait and then complete (or get a clear 503).
#[test]
fn dead_workers_experts_are_reassigned_without_replicas() {
    let selections = ["0-3", "4-7", "8-11", "12-15"];
    let mut cluster = EtcdBackedCluster::start(&selections, 1, &["--host-wait-ms", "20000"]);
    let body = completion("The cluster heals", 16, false);
    let (status, response) = post(&cluster.gateway.addr, "/v1/completions", &body);
    assert_eq!(status, 200, "{response}");
    let reference = body_json(&response)["choices"][0]["text"].clone();

    cluster.workers[2].kill();
    let killed = Instant::now();
    let served_after = loop {
        let (status, response) = post(&cluster.gateway.addr, "/v1/completions", &body);
        match status {
            200 => {
                assert_eq!(body_json(&response)["choices"][0]["text"], reference, "other tokens after reassignment");
                break killed.elapsed();
            }
            503 => assert!(response.contains("service_unavailable") || response.contains("unavailable"), "{response}"),
            other => panic!("only 200 or 503 are acceptable during the gap, got {other}: {response}"),
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "not serving 30 s after the kill");
    };
    eprintln!("served again {served_after:?} after the kill (lease TTL {TTL_MS} ms)");
    // TTL (2 s) + noticing it + loading 4 tiny experts: a few hundred ms past the TTL here; 5 s of
    // slack for a loaded CI machine.
    assert!(served_after < Duration::from_secs(2 + 5), "TTL + load time exceeded: {served_after:?}");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let plane = cluster.plane(&runtime);
    let map = runtime.block_on(plane.placement()).expect("read").expect("a placement map");
    let dead = format!("worker-{}", cluster.workers[2].addr);
    for e in 8..12 {
        let hosts = map.hosts(0, e);
        assert!(!hosts.is_empty() && !hosts.contains(&dead), "expert {e}: {hosts:?}");
    }
    assert!(map.version >= 2, "the leader wrote a new version: {}", map.version);
    let workers = runtime.block_on(plane.list(Kind::Worker)).expect("list");
    let hosted: usize = workers.iter().map(|w| w.experts.len()).sum();
    assert_eq!((workers.len(), hosted), (3, 16), "{workers:?}");

    // The worker comes back (a new process): it registers, and the coordinator uses it again.
    let model = tiny_fixture();
    let url = cluster.etcd.url();
    let back = Process::start(&[
        "worker",
        "--model",
        model.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--experts",
        "8-11",
        "--registry",
        &url,
        "--cluster",
        "test",
        "--lease-ttl-ms",
        TTL_MS,
    ]);
    let rows_served = || {
        runtime.block_on(async {
            let mut client = ExpertServiceClient::connect(format!("http://{}", back.addr)).await.expect("connect");
            client.status(StatusRequest {}).await.expect("status").into_inner().rows_served
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows_served() == 0 {
        assert!(Instant::now() < deadline, "the returning worker was not used within 20 s");
        let (status, response) = post(&cluster.gateway.addr, "/v1/completions", &body);
        assert_eq!(status, 200, "{response}");
        assert_eq!(body_json(&response)["choices"][0]["text"], reference);
    }
    let map = runtime.block_on(plane.placement()).expect("read").expect("map");
    assert!(map.hosts(0, 9).contains(&format!("worker-{}", back.addr)), "{map:?}");
}

/// etcd stopped (serving goes on: the data plane does not pass through it), then started again
/// with its data wiped: every instance registers again and the placement map is rebuilt.
#[test]
fn etcd_restart_does_not_stop_serving() {
    let selections = ["0-7", "8-15"];
    let mut cluster = EtcdBackedCluster::start(&selections, 1, &[]);
    let body = completion("etcd goes away", 8, false);
    let check = |cluster: &EtcdBackedCluster, when: &str| {
        let (status, response) = post(&cluster.gateway.addr, "/v1/completions", &body);
        assert_eq!(status, 200, "{when}: {response}");
    };
    check(&cluster, "before");
    cluster.etcd.stop();
    for _ in 0..5 {
        check(&cluster, "while etcd is down");
        std::thread::sleep(Duration::from_millis(600));
    }
    cluster.etcd.restart_empty().expect("restart etcd");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let plane = cluster.plane(&runtime);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let count = |kind| runtime.block_on(plane.list(kind)).map(|v| v.len()).unwrap_or(0);
        let placement = runtime.block_on(plane.placement()).ok().flatten();
        if (count(Kind::Worker), count(Kind::Coordinator), count(Kind::Gateway)) == (2, 1, 1) && placement.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "instances did not register again within 20 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    check(&cluster, "after etcd came back");
}

/// `epserve up --registry` starts the same cluster registered in etcd (with replicas).
#[test]
fn epserve_up_registers_everything_in_etcd() {
    let logs = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdServer::start(logs.path()).expect("start etcd");
    let url = etcd.url();
    let (up, gateway) = support::up(&["--registry", &url, "--cluster", "up", "--replicas", "2", "--coordinators", "2"]);
    let (status, response) = post(&gateway, "/v1/completions", &completion("registered", 4, false));
    assert_eq!(status, 200, "{response}");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let plane = runtime.block_on(epserve_control::connect(&url, "up")).expect("connect");
    let workers = runtime.block_on(plane.list(Kind::Worker)).expect("list");
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|w| w.experts.len() == 16), "2 workers × 2 replicas: every worker has all: {workers:?}");
    assert_eq!(runtime.block_on(plane.list(Kind::Coordinator)).expect("list").len(), 2);
    support::stop(up);
    // Stopping revokes the leases: the records go at once, not a TTL later.
    assert!(runtime.block_on(plane.list(Kind::Worker)).expect("list").is_empty());
}

/// A worker that hangs (SIGSTOP) instead of dying: its exchanges miss the deadline and go to the
/// replicas; every stream still completes with the same tokens.
#[test]
fn hung_worker_is_failed_over_after_the_exchange_deadline() {
    let selections = ["0-7", "4-11", "8-15", "0-3,12-15"];
    let cluster = EtcdBackedCluster::start(&selections, 1, &["--exchange-timeout-ms", "1000"]);
    let reference = run_streams(&cluster.gateway.addr, 16, 64, || {});
    let started = Instant::now();
    let with_hang = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_streams(&cluster.gateway.addr, 16, 64, || {
            std::thread::sleep(Duration::from_millis(50));
            cluster.workers[2].signal(support::Signal::SIGSTOP);
        })
    }));
    let took = started.elapsed();
    cluster.workers[2].signal(support::Signal::SIGCONT);
    // What the coordinator saw is what explains a failure here (a slow CI host, a failover bug).
    let with_hang = with_hang.unwrap_or_else(|panic| {
        eprintln!("coordinator log:\n{}", cluster.coordinator_log());
        std::panic::resume_unwind(panic)
    });
    assert_eq!(reference, with_hang, "other tokens after failing over a hung worker");
    eprintln!("16 streams with a hung worker took {took:?} (exchange deadline 1 s)");
    let log = cluster.coordinator_log();
    assert!(log.contains("did not answer"), "the deadline should have been hit:\n{log}");
}
