//! A closed-loop load of streamed chat completions against a gateway: N threads, each sending one
//! streamed request after another, every request's outcome counted and every token's arrival time
//! kept (the longest pause in the token flow is how long a fault stalled the cluster).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Requests and tokens seen by a [`Load`].
#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    tokens: AtomicU64,
    errors: Mutex<Vec<String>>,
    arrivals: Mutex<Vec<Instant>>,
}

/// What a load saw, from its start to its end.
#[derive(Debug)]
pub struct Report {
    pub ok: u64,
    pub failed: u64,
    pub tokens: u64,
    pub errors: Vec<String>,
    pub started: Instant,
    pub elapsed: Duration,
    arrivals: Vec<Instant>,
}

impl Report {
    /// Output tokens per second over the whole run.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.elapsed.as_secs_f64()
    }

    /// The longest time without any token arriving on any stream, from `from` to the end.
    pub fn longest_pause_after(&self, from: Instant) -> Duration {
        let mut last = from;
        let mut longest = Duration::ZERO;
        for &t in self.arrivals.iter().filter(|&&t| t >= from) {
            longest = longest.max(t - last);
            last = t;
        }
        longest.max(self.started + self.elapsed - last)
    }

    pub fn assert_no_failure(&self, what: &str) {
        assert!(self.ok > 0, "{what}: no request completed");
        assert_eq!(
            self.failed,
            0,
            "{what}: {} of {} requests failed: {:?}",
            self.failed,
            self.ok + self.failed,
            self.errors
        );
    }
}

/// `streams` clients sending streamed chat completions until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    started: Instant,
}

impl Load {
    pub fn start(addr: &str, model: &str, streams: usize, max_tokens: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let threads = (0..streams)
            .map(|i| {
                let (stop, counters, addr) = (stop.clone(), counters.clone(), addr.to_owned());
                let body = serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": format!("Stream number {i} says hello")}],
                    "max_tokens": max_tokens,
                    "ignore_eos": true,
                    "temperature": 0,
                    "stream": true,
                })
                .to_string();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match stream_chat(&addr, &body, &counters) {
                            Ok(tokens) => {
                                counters.ok.fetch_add(1, Ordering::Relaxed);
                                counters.tokens.fetch_add(tokens, Ordering::Relaxed);
                            }
                            Err(e) => {
                                counters.failed.fetch_add(1, Ordering::Relaxed);
                                counters.errors.lock().expect("errors").push(e);
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, threads, counters, started: Instant::now() }
    }

    /// Stops after the requests in flight have finished; what they all saw.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load thread panicked");
        }
        let elapsed = self.started.elapsed();
        let c = Arc::try_unwrap(self.counters).expect("threads joined");
        let mut arrivals = c.arrivals.into_inner().expect("arrivals");
        arrivals.sort();
        Report {
            ok: c.ok.into_inner(),
            failed: c.failed.into_inner(),
            tokens: c.tokens.into_inner(),
            errors: c.errors.into_inner().expect("errors"),
            started: self.started,
            elapsed,
            arrivals,
        }
    }
}

/// One streamed chat completion over HTTP/1.1: the number of content chunks, or why it failed (a
/// status other than 200, an error event, or a stream that ended before `[DONE]`).
fn stream_chat(addr: &str, body: &str, counters: &Counters) -> Result<u64, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut lines = BufReader::new(s).lines();
    let status = lines.next().ok_or("no status line")?.map_err(|e| format!("read: {e}"))?;
    if !status.starts_with("HTTP/1.1 200") {
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        return Err(format!("{status}: {}", rest.join(" ")));
    }
    let mut tokens = 0;
    for line in lines {
        let line = line.map_err(|e| format!("read after {tokens} tokens: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data.trim() == "[DONE]" {
            return Ok(tokens);
        }
        if data.contains("\"error\"") {
            return Err(format!("error event after {tokens} tokens: {data}"));
        }
        if data.contains("\"content\"") {
            tokens += 1;
            counters.arrivals.lock().expect("arrivals").push(Instant::now());
        }
    }
    Err(format!("the stream ended after {tokens} tokens without [DONE]"))
}
