//! Harness for the end-to-end tests: starts real `epserve` processes, reads the address they print,
//! and stops them when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

pub mod coordinator;

pub fn epserve() -> PathBuf {
    epserve_testkit::epserve_binary()
}

/// A data directory of its own for each process a test starts (passed as `EPSERVE_DATA_DIR`): a
/// gateway keeps the Batch API's files and jobs there, and tests must neither share one (a job left by
/// one test would be resumed by another's gateway) nor write into the user's. Under the build's
/// temporary directory (`cargo clean` removes it).
pub fn private_data_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("data").join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a private data directory");
    dir
}

pub fn tiny_fixture() -> PathBuf {
    epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4)
}

/// The prompts (token ids) of every case of the tiny fixture's `golden/text.json`.
pub fn golden_prompts() -> Vec<Vec<u32>> {
    #[derive(serde::Deserialize)]
    struct Golden {
        cases: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    struct Case {
        input_ids: Vec<u32>,
    }
    let text = std::fs::read_to_string(tiny_fixture().join("golden/text.json")).expect("golden/text.json");
    serde_json::from_str::<Golden>(&text)
        .expect("golden/text.json parses")
        .cases
        .into_iter()
        .map(|c| c.input_ids)
        .collect()
}

/// A running process that printed `listening on ADDR` on stdout.
pub struct Process {
    pub child: Child,
    pub addr: String,
}

impl Process {
    /// Starts `epserve ARGS` and waits (up to 60 s) for its `listening on` line.
    pub fn start(args: &[&str]) -> Process {
        Self::spawn(args, Stdio::inherit())
    }

    /// Like [`Process::start`], with the log (stderr: `warn` and above, and the coordinator's
    /// links and failovers at `info`) written to `log`.
    pub fn start_logged(args: &[&str], log: &std::path::Path) -> Process {
        let stderr = Stdio::from(std::fs::File::create(log).expect("create log"));
        Self::spawn_with_log(args, stderr, "warn,epserve_coordinator::transport=info")
    }

    fn spawn(args: &[&str], stderr: Stdio) -> Process {
        Self::spawn_with_log(args, stderr, "warn")
    }

    fn spawn_with_log(args: &[&str], stderr: Stdio, filter: &str) -> Process {
        let mut child = Command::new(epserve())
            .args(args)
            .env("EPSERVE_LOG", filter)
            .env("EPSERVE_DATA_DIR", private_data_dir())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn epserve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Process { child, addr },
            Err(_) => {
                let _ = child.kill();
                panic!("epserve {args:?} did not print its address within 60 s");
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: Signal) {
        kill(pid(&self.child), sig).unwrap_or_else(|e| panic!("kill -{sig}: {e}"));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A test may have stopped it (SIGSTOP): a stopped process does not die of SIGKILL until resumed.
        let _ = kill(pid(&self.child), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pid(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"))
}

/// Starts `epserve coordinator` on a free port (extra flags appended).
pub fn coordinator(model: &str, extra: &[&str]) -> Process {
    let mut args = vec!["coordinator", "--model", model, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Process::start(&args)
}

/// Starts `epserve gateway` on a free port in front of `coordinators` (comma-separated).
pub fn gateway(model: &str, coordinators: &str, extra: &[&str]) -> Process {
    let mut args = vec!["gateway", "--model", model, "--listen", "127.0.0.1:0", "--coordinators", coordinators];
    args.extend_from_slice(extra);
    Process::start(&args)
}

/// Starts one worker per argument list (`--shard 0/4`, `--experts 0-3,9`...) on free ports.
pub fn workers(model: &std::path::Path, selections: &[&[&str]]) -> Vec<Process> {
    let model = model.to_str().expect("utf-8 path");
    selections
        .iter()
        .map(|sel| {
            let mut args = vec!["worker", "--model", model, "--listen", "127.0.0.1:0"];
            args.extend_from_slice(sel);
            Process::start(&args)
        })
        .collect()
}

/// Runs `epserve ARGS` to completion and parses its stdout as JSON.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(epserve()).args(args).env("EPSERVE_LOG", "warn").output().expect("run epserve");
    assert!(out.status.success(), "epserve {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("epserve {args:?}: stdout is not JSON: {e}"))
}

/// Runs `epserve ARGS` to completion and returns its stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(epserve()).args(args).env("EPSERVE_LOG", "warn").output().expect("run epserve");
    assert!(out.status.success(), "epserve {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// POSTs `body` (JSON) to `path` over HTTP/1.1; returns the status and the raw response (headers and
/// body; for SSE the whole event stream). GET when `body` is empty.
pub fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let method = if body.is_empty() { "GET" } else { "POST" };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// The body of a plain (not chunked) HTTP response.
pub fn body_json(response: &str) -> serde_json::Value {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response}"))
}

/// `epserve up`, stopped (and its cluster with it) when dropped, also when a test fails.
pub struct Up(Option<std::process::Child>);

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = kill(pid(&child), Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

/// Starts `epserve up` on the tiny fixture and waits for its URL.
pub fn up(extra: &[&str]) -> (Up, String) {
    up_model(&tiny_fixture(), extra)
}

/// Starts `epserve up` on the checkpoint in `model` and waits for its URL.
pub fn up_model(model: &std::path::Path, extra: &[&str]) -> (Up, String) {
    up_model_env(model, extra, &[])
}

/// [`up_model`] with environment variables for `up` and the processes it starts (settings `up` has
/// no flag for, such as `EPSERVE_WIRE_DTYPE` of its coordinators).
pub fn up_model_env(model: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> (Up, String) {
    let port = free_port();
    // Two workers unless the test says how many.
    let workers: &[&str] = if extra.contains(&"--workers") { &[] } else { &["--workers", "2"] };
    let mut args = vec!["up", "--model", model.to_str().expect("utf-8")];
    args.extend_from_slice(workers);
    args.push("--port");
    let port_s = port.to_string();
    args.push(&port_s);
    args.extend_from_slice(extra);
    let mut child = Command::new(epserve())
        .args(&args)
        .env("EPSERVE_LOG", "warn")
        .env("EPSERVE_DATA_DIR", private_data_dir())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("epserve up");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "epserve up did not come up");
        match lines.next() {
            Some(Ok(line)) if line.contains("OpenAI API:") => break,
            Some(Ok(_)) => continue,
            _ => panic!("epserve up exited before it was ready"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (Up(Some(child)), format!("127.0.0.1:{port}"))
}

/// A free port below the kernel's ephemeral range: a port the kernel handed out for `:0` is free
/// again once this returns, and a process the test starts (a worker listening on `:0`, an outgoing
/// connection) may be given it before the bind it was chosen for ("Address already in use", seen
/// in CI). Ports below the range are never handed out that way. Tests of one binary take distinct
/// ports (a counter), binaries start at different places (their pid); where the range leaves no
/// room below it, `:0` as before.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000u32, ephemeral_start.min(65_536));
    if high > low + 1_000 {
        let span = high - low;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let port = low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let port = u16::try_from(port).expect("below 65536");
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub fn stop(mut up: Up) {
    let Some(mut child) = up.0.take() else { return };
    let _ = kill(pid(&child), Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "epserve up exited with {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("epserve up did not stop on Ctrl-C");
}

/// What `epserve generate` prints for a golden greedy continuation: the tokens before the first
/// end-of-sequence id of the checkpoint's `generation_config.json` (generation stops there, and the
/// EOS token itself is not output). The goldens hold the raw continuation, EOS ids included.
pub fn until_eos(model: &std::path::Path, tokens: &[u64]) -> Vec<u64> {
    let text = std::fs::read_to_string(model.join("generation_config.json")).expect("generation_config.json");
    let config: serde_json::Value = serde_json::from_str(&text).expect("generation_config.json is JSON");
    let eos: Vec<u64> = match &config["eos_token_id"] {
        serde_json::Value::Array(ids) => ids.iter().filter_map(serde_json::Value::as_u64).collect(),
        id => id.as_u64().into_iter().collect(),
    };
    tokens.iter().copied().take_while(|t| !eos.contains(t)).collect()
}

/// Streams `request` from the coordinator at `addr` to its end, which must be `length` (the tests
/// ask for `ignore_eos`): the tokens, after checking that the usage counts the prompt and them.
pub async fn generate_to_length(addr: &str, request: epserve_proto::v1::GenerateRequest) -> Vec<u32> {
    use epserve_proto::v1::FinishReason;
    use epserve_proto::v1::coordinator_service_client::CoordinatorServiceClient;
    let prompt_len = request.prompt_tokens.len() as u32;
    let mut client = CoordinatorServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let mut stream = client.generate(request).await.expect("generate").into_inner();
    let mut tokens = Vec::new();
    while let Some(event) = stream.message().await.expect("stream") {
        tokens.extend(event.tokens.iter().map(|t| t.id));
        if event.finish_reason != 0 {
            assert_eq!(event.finish_reason, FinishReason::Length as i32, "{}", event.error);
            let usage = event.usage.expect("usage");
            assert_eq!(usage.completion_tokens as usize, tokens.len());
            assert_eq!(usage.prompt_tokens, prompt_len, "every prompt token counts, image placeholders too");
            return tokens;
        }
    }
    panic!("the stream ended without a finish reason");
}

impl Up {
    /// Owns an `epserve up` started by the caller.
    pub fn from_child(child: std::process::Child) -> Up {
        Up(Some(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }
}

/// The processes whose parent is `parent`, with their command lines (arguments joined by spaces).
pub fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after the last `)`.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(parent) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            out.push((pid, cmdline.trim().to_owned()));
        }
    }
    out.sort();
    out
}

/// Resident memory of `pid` in MiB (`VmRSS`), if it is alive.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// SIGKILLs `pid` (a crash).
pub fn kill_pid(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}
