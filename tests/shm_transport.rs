//! The shared-memory transport end to end: real `epserve worker` processes on this host, the
//! coordinator's worker links over shared-memory rings (handshake on the gRPC stream), the same
//! logits as the in-process run, and the faults: a worker that refuses, a worker killed mid-load,
//! a coordinator that exits.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epserve_coordinator::{ExpertTransport, GrpcExperts, LinkMedium, ShmConfig, WorkerTransport};
use epserve_proto::wire::WireDtype;
use support::coordinator::{Coordinator, max_abs_diff};
use support::{Process, tiny_fixture};

/// A directory of its own under /dev/shm for each test, so that the segments it sees are its own.
fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("epserve-test-").tempdir_in("/dev/shm").expect("a directory in /dev/shm")
}

/// Workers of the tiny checkpoint looking for segments in `dir`, each with its own extra flags.
fn workers(dir: &Path, selections: &[&[&str]]) -> Vec<Process> {
    let model = tiny_fixture();
    let (model, dir) = (model.to_str().expect("utf-8"), dir.to_str().expect("utf-8"));
    selections
        .iter()
        .map(|sel| {
            let mut args = vec!["worker", "--model", model, "--listen", "127.0.0.1:0", "--shm-dir", dir];
            args.extend_from_slice(sel);
            Process::start(&args)
        })
        .collect()
}

fn shm(dir: &Path, transport: WorkerTransport) -> ShmConfig {
    ShmConfig { transport, dir: dir.to_path_buf(), ..ShmConfig::default() }
}

fn assert_all_shm(experts: &GrpcExperts, workers: &[Process]) {
    let links = experts.link_transports();
    assert_eq!(links.len(), workers.len(), "{links:?}");
    for w in workers {
        assert!(links.contains(&(w.addr.clone(), LinkMedium::Shm)), "{} is not over shared memory: {links:?}", w.addr);
    }
}

/// Segment files left in `dir` (they are unlinked once the worker answered the handshake).
fn segment_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the shm directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The shared-memory segments process `pid` has mapped.
fn mapped_segments(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut segments: Vec<String> = maps.lines().filter(|l| l.contains("epserve-shm-")).map(str::to_owned).collect();
    segments.dedup();
    segments
}

/// Over shared memory with the f32 wire, the logits are the in-process ones at every position of
/// every golden case (and bit for bit the gRPC transport's), with every link really on shared
/// memory and no segment file left behind.
fn check_parity(selections: &[&[&str]]) {
    let dir = shm_dir();
    let coordinator = Coordinator::new();
    let workers = workers(dir.path(), selections);
    let timeout = Duration::from_secs(10);
    let over_shm =
        coordinator.connect(&workers, WireDtype::F32, timeout, shm(dir.path(), WorkerTransport::Shm)).expect("connect");
    assert_all_shm(&over_shm, &workers);
    assert_eq!(segment_files(dir.path()), Vec::<String>::new(), "segment files are unlinked after the handshake");
    for w in &workers {
        assert_eq!(mapped_segments(w.pid()).len(), 1, "worker {} maps its segment", w.addr);
    }
    let over_grpc = ExpertTransport::Grpc(coordinator.grpc(&workers, WireDtype::F32, timeout).expect("connect"));
    let over_shm = ExpertTransport::Grpc(over_shm);
    for tokens in support::golden_prompts() {
        let local = coordinator.logits(&coordinator.local, &tokens).expect("local");
        let shared = coordinator.logits(&over_shm, &tokens).expect("shm");
        let diff = max_abs_diff(&local, &shared);
        assert!(diff <= 1e-5, "{selections:?}, T={}: shm differs from in-process by {diff}", tokens.len());
        let grpc = coordinator.logits(&over_grpc, &tokens).expect("grpc");
        assert_eq!(shared, grpc, "{selections:?}, T={}: shm and gRPC carry the same bytes", tokens.len());
    }
}

#[test]
fn four_workers_over_shared_memory_match_in_process() {
    check_parity(&[&["--shard", "0/4"], &["--shard", "1/4"], &["--shard", "2/4"], &["--shard", "3/4"]]);
}

#[test]
fn two_workers_over_shared_memory_match_in_process() {
    check_parity(&[&["--shard", "0/2"], &["--shard", "1/2"]]);
}

/// `auto` uses shared memory where the worker accepts it and gRPC where it refuses; `shm` refuses
/// to start, naming the worker that cannot use it; `grpc` never offers it.
#[test]
fn auto_falls_back_per_worker_and_shm_names_the_worker_that_refused() {
    let dir = shm_dir();
    let coordinator = Coordinator::new();
    let workers = workers(dir.path(), &[&["--shard", "0/2"], &["--shard", "1/2", "--transport", "grpc"]]);
    let timeout = Duration::from_secs(10);
    let auto =
        coordinator.connect(&workers, WireDtype::F32, timeout, shm(dir.path(), WorkerTransport::Auto)).expect("auto");
    let links = auto.link_transports();
    assert!(links.contains(&(workers[0].addr.clone(), LinkMedium::Shm)), "{links:?}");
    assert!(links.contains(&(workers[1].addr.clone(), LinkMedium::Grpc)), "{links:?}");
    let auto = ExpertTransport::Grpc(auto);
    let tokens = &support::golden_prompts()[3];
    let local = coordinator.logits(&coordinator.local, tokens).expect("local");
    let mixed = coordinator.logits(&auto, tokens).expect("mixed links");
    assert!(max_abs_diff(&local, &mixed) <= 1e-5);

    let err = coordinator
        .connect(&workers, WireDtype::F32, timeout, shm(dir.path(), WorkerTransport::Shm))
        .expect_err("a worker refuses shared memory");
    assert!(err.contains(&workers[1].addr) && err.contains("does not use shared memory"), "{err}");

    let grpc =
        coordinator.connect(&workers, WireDtype::F32, timeout, shm(dir.path(), WorkerTransport::Grpc)).expect("grpc");
    assert!(grpc.link_transports().iter().all(|(_, m)| *m == LinkMedium::Grpc));
    // A worker looking in another directory cannot find the segment: refused too.
    let elsewhere = shm_dir();
    let err = coordinator
        .connect(&workers[..1], WireDtype::F32, timeout, shm(elsewhere.path(), WorkerTransport::Shm))
        .expect_err("segment in another directory");
    assert!(err.contains(&workers[0].addr) && err.contains("refused"), "{err}");
}

/// Runs steps over `experts` on another thread until told to stop, recording each step's result
/// and when it ended.
type Steps = Arc<Mutex<Vec<(Instant, Result<Vec<Vec<f32>>, String>)>>>;

fn load(
    coordinator: &Arc<Coordinator>,
    experts: &Arc<ExpertTransport>,
    stop: &Arc<AtomicBool>,
) -> (Steps, std::thread::JoinHandle<()>) {
    let steps: Steps = Arc::default();
    let (c, x, s, out) = (coordinator.clone(), experts.clone(), stop.clone(), steps.clone());
    let tokens = support::golden_prompts()[3].clone(); // 41 tokens, routed to experts on every worker
    let handle = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let result = c.logits(x.as_ref(), &tokens).map_err(|e| e.to_string());
            out.lock().expect("steps").push((Instant::now(), result));
        }
    });
    (steps, handle)
}

/// A worker SIGKILLed while steps run over shared memory: with a replica of every expert on the
/// survivor, the steps go on with the same logits (the exchanges in flight fail over); without
/// one, the step fails with an error naming the dead worker, at once (not at the exchange deadline)
/// and without hanging.
#[test]
fn a_worker_killed_mid_load_fails_over_or_fails_the_step_at_once() {
    let dir = shm_dir();
    let coordinator = Arc::new(Coordinator::new());
    let deadline = Duration::from_secs(20);
    let local = coordinator.logits(&coordinator.local, &support::golden_prompts()[3]).expect("local");

    // Replicated: both workers host every expert.
    let mut replicated = workers(dir.path(), &[&["--experts", "0-15"], &["--experts", "0-15"]]);
    let experts = coordinator
        .connect(&replicated, WireDtype::F32, deadline, shm(dir.path(), WorkerTransport::Shm))
        .expect("connect");
    assert_all_shm(&experts, &replicated);
    let experts = Arc::new(ExpertTransport::Grpc(experts));
    let stop = Arc::new(AtomicBool::new(false));
    let (steps, running) = load(&coordinator, &experts, &stop);
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    replicated[0].kill();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    running.join().expect("load thread");
    let steps = std::mem::take(&mut *steps.lock().expect("steps"));
    let after = steps.iter().filter(|(at, _)| *at > killed_at).count();
    assert!(steps.len() > after && after >= 2, "steps ran before and after the kill: {} and {after}", steps.len());
    for (_, result) in &steps {
        let logits = result.as_ref().unwrap_or_else(|e| panic!("a step failed despite the replica: {e}"));
        assert!(max_abs_diff(&local, logits) <= 1e-5);
    }
    let ExpertTransport::Grpc(grpc) = experts.as_ref() else { unreachable!() };
    assert!(grpc.link_transports().contains(&(replicated[1].addr.clone(), LinkMedium::Shm)));

    // Not replicated: each worker hosts half of the experts.
    let mut halves = workers(dir.path(), &[&["--shard", "0/2"], &["--shard", "1/2"]]);
    let experts =
        coordinator.connect(&halves, WireDtype::F32, deadline, shm(dir.path(), WorkerTransport::Shm)).expect("connect");
    assert_all_shm(&experts, &halves);
    let experts = Arc::new(ExpertTransport::Grpc(experts));
    let stop = Arc::new(AtomicBool::new(false));
    let (steps, running) = load(&coordinator, &experts, &stop);
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    halves[0].kill();
    // Wait for the first failed step (it must come long before the 20 s exchange deadline).
    let failed = loop {
        if let Some((at, Err(e))) = steps.lock().expect("steps").iter().find(|(_, r)| r.is_err()) {
            break (*at, e.clone());
        }
        assert!(killed_at.elapsed() < Duration::from_secs(10), "no step failed within 10 s of the kill");
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::Relaxed);
    running.join().expect("load thread");
    let (at, err) = failed;
    assert!(err.contains(&halves[0].addr) && err.contains("unavailable"), "{err}");
    assert!(
        at.duration_since(killed_at) < Duration::from_secs(3),
        "failed {:?} after the kill",
        at.duration_since(killed_at)
    );
    let ok_before = steps.lock().expect("steps").iter().filter(|(at, r)| *at < killed_at && r.is_ok()).count();
    assert!(ok_before >= 1, "steps succeeded before the kill");
}

/// When the coordinator process exits, the worker stops serving its rings and unmaps the segment.
#[test]
fn a_coordinator_that_exits_leaves_no_segment_mapped_in_the_worker() {
    let dir = shm_dir();
    let workers = workers(dir.path(), &[&["--experts", "0-15"]]);
    let pid = workers[0].pid();
    let model = tiny_fixture();
    let tokens = support::golden_prompts()[1].iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = support::run_ok(&[
        "logits",
        "--model",
        model.to_str().expect("utf-8"),
        "--tokens",
        &tokens,
        "--workers",
        &workers[0].addr,
        "--transport",
        "shm",
        "--shm-dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(out.contains("logits"), "{out}");
    let exited = Instant::now();
    while !mapped_segments(pid).is_empty() {
        assert!(exited.elapsed() < Duration::from_secs(10), "still mapped: {:?}", mapped_segments(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(segment_files(dir.path()), Vec::<String>::new());
    // The check above can fail: a live link's segment shows in the worker's mappings.
    let coordinator = Coordinator::new();
    let live = coordinator
        .connect(&workers, WireDtype::F32, Duration::from_secs(10), shm(dir.path(), WorkerTransport::Shm))
        .expect("connect");
    assert_eq!(mapped_segments(pid).len(), 1, "a live link's segment is mapped");
    drop(live);
}
