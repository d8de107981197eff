//! Faults the cluster notices and survives, with real processes: an instance bound to `0.0.0.0`
//! advertises an address others can reach; `epserve up` restarts a component that dies; and a soak
//! of mixed load while workers are SIGKILLed every 20 s loses no request and grows no process's
//! memory (`EPSERVE_SOAK_SECS`, default 60, runs it longer).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use epserve_control::Kind;
use epserve_proto::v1::StatusRequest;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_testkit::etcd_server::EtcdServer;
use support::{Process, children_of, kill_pid, post, rss_mib, tiny_fixture};

#[test]
fn an_instance_listening_on_every_address_advertises_a_routable_one() {
    let logs = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdServer::start(logs.path()).expect("start etcd (Debian package etcd-server)");
    let url = etcd.url();
    let model = tiny_fixture();
    let worker = Process::start(&[
        "worker",
        "--model",
        model.to_str().expect("utf-8"),
        "--listen",
        "0.0.0.0:0",
        "--experts",
        "0-15",
        "--registry",
        &url,
        "--cluster",
        "advertise",
    ]);
    let port = worker.addr.rsplit_once(':').map(|(_, p)| p.to_owned()).expect("a port");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let plane = runtime.block_on(epserve_control::connect(&url, "advertise")).expect("connect");
    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        if let Some(r) = runtime.block_on(plane.list(Kind::Worker)).expect("list").into_iter().next() {
            break r;
        }
        assert!(Instant::now() < deadline, "the worker registered within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let advertised: std::net::SocketAddr = record.addr.parse().expect("an IP address and port");
    assert!(!advertised.ip().is_unspecified(), "advertised {advertised}");
    assert_eq!(advertised.port().to_string(), port, "the bound port");
    assert!(record.id.contains(&record.addr), "named after what it advertises: {}", record.id);
    // And it is reachable there.
    runtime.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{advertised}")).await.expect("connect");
        let status = client.status(StatusRequest {}).await.expect("status").into_inner();
        assert_eq!(status.num_experts, 16);
    });
}

/// The `epserve worker` children of `up`.
fn workers_of(up: u32) -> Vec<u32> {
    children_of(up).into_iter().filter(|(_, cmd)| cmd.contains(" worker ")).map(|(pid, _)| pid).collect()
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    format!(
        r#"{{"model": "tiny-llama4", "prompt": "{prompt}", "max_tokens": {max_tokens}, "temperature": 0, "ignore_eos": true, "stream": {stream}}}"#
    )
}

#[test]
fn up_restarts_a_component_that_dies() {
    let (up, gateway) = support::up(&["--replicas", "2"]);
    let before = workers_of(up.pid());
    assert_eq!(before.len(), 2, "{:?}", children_of(up.pid()));
    kill_pid(before[0]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = workers_of(up.pid());
        if now.len() == 2 && !now.contains(&before[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "the killed worker was not restarted within 60 s: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Served throughout, and by the whole cluster again.
    for i in 0..4 {
        let (status, response) =
            post(&gateway, "/v1/completions", &completion(&format!("after restart {i}"), 8, false));
        assert_eq!(status, 200, "{response}");
    }
    support::stop(up);
}

/// One request of the soak's mix: streamed or not, completions or chat, 4 to 64 tokens. `Ok` when
/// it finished normally.
fn soak_request(gateway: &str, i: u64) -> Result<(), String> {
    let stream = i.is_multiple_of(2);
    let max_tokens = 4 + (i * 7) % 61;
    let (path, body) = if i.is_multiple_of(3) {
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model": "tiny-llama4", "messages": [{{"role": "user", "content": "soak {i}"}}], "max_tokens": {max_tokens}, "stream": {stream}}}"#
            ),
        )
    } else {
        (
            "/v1/completions",
            completion(&format!("soak request {i} {}", "word ".repeat((i % 9) as usize)), max_tokens as u32, stream),
        )
    };
    let mut s = std::net::TcpStream::connect(gateway).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {gateway}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    if stream {
        for line in BufReader::new(&mut s).lines() {
            let line = line.map_err(|e| format!("read: {e}"))?;
            response.push_str(&line);
            response.push('\n');
        }
    } else {
        s.read_to_string(&mut response).map_err(|e| format!("read: {e}"))?;
    }
    let ok = response.starts_with("HTTP/1.1 200")
        && !response.contains("\"error\"")
        && if stream { response.contains("data: [DONE]") } else { response.contains("\"finish_reason\"") };
    if ok { Ok(()) } else { Err(response.chars().take(600).collect()) }
}

#[test]
fn soak_with_workers_killed_every_20_s_loses_nothing_and_keeps_memory_flat() {
    let secs: u64 = std::env::var("EPSERVE_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let (up, gateway) = support::up(&["--workers", "3", "--replicas", "2"]);
    let up_pid = up.pid();
    let (done, sent, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..32u64)
        .map(|c| {
            let (gateway, done, sent, failed, failures) =
                (gateway.clone(), done.clone(), sent.clone(), failed.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while !done.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = soak_request(&gateway, i) {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().expect("lock").push(e);
                    }
                    i += 32;
                }
            })
        })
        .collect();
    // Warm-up, then the memory every process starts from.
    std::thread::sleep(Duration::from_secs(5));
    let rss = |pid| rss_mib(pid).unwrap_or(f64::NAN);
    let survivors: Vec<(u32, String)> =
        children_of(up_pid).into_iter().filter(|(_, cmd)| !cmd.contains(" worker ")).collect();
    let start_rss: Vec<f64> = survivors.iter().map(|(pid, _)| rss(*pid)).collect();

    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(20).min(Duration::from_secs(secs).saturating_sub(started.elapsed())));
        if started.elapsed() >= Duration::from_secs(secs) {
            break;
        }
        // The longest-lived worker (the lowest pid): every worker gets its turn.
        if let Some(&victim) = workers_of(up_pid).first() {
            kill_pid(victim);
            kills += 1;
            eprintln!("soak: killed worker {victim} at {:?}", started.elapsed());
        }
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let end_rss: Vec<f64> = survivors.iter().map(|(pid, _)| rss(*pid)).collect();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("soak: {secs} s, {kills} workers killed, {sent} requests, {failed} failed");
    for ((pid, cmd), (a, b)) in survivors.iter().zip(start_rss.iter().zip(&end_rss)) {
        let name = cmd.split_whitespace().nth(1).unwrap_or("?");
        eprintln!("soak: {name} (pid {pid}) RSS {a:.1} MiB at start, {b:.1} MiB at the end");
    }
    assert!(kills >= 1 || secs < 20, "no worker was killed");
    assert_eq!(failed, 0, "failed requests: {:?}", failures.lock().expect("lock").iter().take(3).collect::<Vec<_>>());
    assert!(sent > 32, "the load ran: {sent} requests");
    for ((_, cmd), (a, b)) in survivors.iter().zip(start_rss.iter().zip(&end_rss)) {
        assert!(*b <= a * 1.3 + 64.0, "{cmd}: RSS grew from {a:.1} to {b:.1} MiB");
    }
    assert_eq!(workers_of(up_pid).len(), 3, "every killed worker was restarted");
    support::stop(up);
}
