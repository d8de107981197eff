//! Writing a trace without slowing a step: the engine thread encodes a step into a buffer
//! ([`StepBuilder`]) and hands it to a bounded channel without waiting ([`TraceWriter::submit`]); a
//! background thread writes, flushes and rotates. When the channel is full the step is dropped,
//! counted (`epserve_routing_trace_dropped_steps_total`) and recorded as a `dropped` record.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use epserve_proto::metric_names as m;

use super::{KIND_DROPPED, KIND_STEP, MAGIC, TraceHeader, VERSION, part_path};
use crate::error::TraceError;

/// How a [`TraceWriter`] buffers and rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Steps the channel to the writer thread holds; a step that finds it full is dropped.
    pub buffer_steps: usize,
    /// A part that would grow past this many bytes is closed and the trace continues in the next.
    pub part_bytes: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions { buffer_steps: 1024, part_bytes: 256 << 20 }
    }
}

/// What the writer thread did, when it is finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub steps: u64,
    pub dropped_steps: u64,
    pub bytes: u64,
    pub parts: u32,
}

/// Streams step records to `PATH` (then `PATH.1`, …) from a background thread.
#[derive(Debug)]
pub struct TraceWriter {
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<WriterStats, TraceError>>>,
    header: TraceHeader,
}

impl TraceWriter {
    /// Creates `path` (replacing it and any `PATH.n` parts of an earlier trace) and starts the
    /// writer thread.
    pub fn create(path: &Path, mut header: TraceHeader, options: WriterOptions) -> Result<Self, TraceError> {
        header.validate()?;
        header.part = 0;
        if header.start_unix_ms == 0 {
            header.start_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        }
        for n in 1.. {
            let p = part_path(path, n);
            if !p.exists() {
                break;
            }
            std::fs::remove_file(&p).map_err(|source| TraceError::Io { path: p.clone(), source })?;
        }
        let first = Part::open(path, &header)?;
        let (tx, rx) = sync_channel(options.buffer_steps.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let state = Thread { path: path.to_path_buf(), header: header.clone(), options, dropped: dropped.clone() };
        let thread = std::thread::Builder::new()
            .name("epserve-routing-trace".into())
            .spawn(move || state.run(first, &rx))
            .map_err(|source| TraceError::Io { path: path.to_path_buf(), source })?;
        Ok(TraceWriter { tx: Some(tx), dropped, thread: Some(thread), header })
    }

    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Hands an encoded step to the writer thread without waiting; `false` when the buffer was full
    /// (the step is counted as dropped) or the writer thread has stopped.
    pub fn submit(&self, step: Vec<u8>) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(step) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::ROUTING_TRACE_DROPPED_STEPS_TOTAL).increment(1);
                false
            }
        }
    }

    /// Writes what is buffered, closes the file and reports.
    pub fn finish(mut self) -> Result<WriterStats, TraceError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<WriterStats, TraceError> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(TraceError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other("trace writer thread panicked"),
                })
            }),
            None => Ok(WriterStats::default()),
        }
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("routing trace: {e}");
        }
    }
}

struct Part {
    path: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
}

impl Part {
    fn open(path: &Path, header: &TraceHeader) -> Result<Self, TraceError> {
        let io = |source| TraceError::Io { path: path.to_path_buf(), source };
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let json = serde_json::to_vec(header).map_err(|e| TraceError::Header(e.to_string()))?;
        out.write_all(MAGIC).map_err(io)?;
        out.write_all(&VERSION.to_le_bytes()).map_err(io)?;
        out.write_all(&(json.len() as u32).to_le_bytes()).map_err(io)?;
        out.write_all(&json).map_err(io)?;
        Ok(Part { path: path.to_path_buf(), out, bytes: (MAGIC.len() + 6 + json.len()) as u64 })
    }

    fn write(&mut self, kind: u8, body: &[u8]) -> Result<u64, TraceError> {
        let io = |source| TraceError::Io { path: self.path.clone(), source };
        self.out.write_all(&[kind]).map_err(io)?;
        self.out.write_all(&(body.len() as u32).to_le_bytes()).map_err(io)?;
        self.out.write_all(body).map_err(io)?;
        let n = 5 + body.len() as u64;
        self.bytes += n;
        Ok(n)
    }

    fn flush(&mut self) -> Result<(), TraceError> {
        self.out.flush().map_err(|source| TraceError::Io { path: self.path.clone(), source })
    }
}

struct Thread {
    path: PathBuf,
    header: TraceHeader,
    options: WriterOptions,
    dropped: Arc<AtomicU64>,
}

impl Thread {
    fn run(self, mut part: Part, rx: &Receiver<Vec<u8>>) -> Result<WriterStats, TraceError> {
        let mut stats = WriterStats { parts: 1, ..WriterStats::default() };
        let header_bytes = part.bytes;
        loop {
            let body = match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(body) => Some(body),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if let Some(body) = body {
                if part.bytes > header_bytes && part.bytes + 5 + body.len() as u64 > self.options.part_bytes {
                    part.flush()?;
                    let mut header = self.header.clone();
                    header.part = stats.parts;
                    part = Part::open(&part_path(&self.path, stats.parts), &header)?;
                    stats.parts += 1;
                }
                let n = part.write(KIND_STEP, &body)?;
                stats.steps += 1;
                stats.bytes += n;
                metrics::counter!(m::ROUTING_TRACE_STEPS_TOTAL).increment(1);
                metrics::counter!(m::ROUTING_TRACE_BYTES_TOTAL).increment(n);
            } else {
                part.flush()?;
            }
            stats.dropped_steps += self.write_dropped(&mut part)?;
        }
        stats.dropped_steps += self.write_dropped(&mut part)?;
        part.flush()?;
        Ok(stats)
    }

    /// A `dropped` record for the steps dropped since the last one, if any.
    fn write_dropped(&self, part: &mut Part) -> Result<u64, TraceError> {
        let n = self.dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            let mut body = now_us().to_le_bytes().to_vec();
            body.extend_from_slice(&n.to_le_bytes());
            part.write(KIND_DROPPED, &body)?;
            tracing::warn!("routing trace: {n} steps dropped (the writer fell behind)");
        }
        Ok(n)
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Gathers one step's routing, layer by layer (a layer may come in several batches, as micro-batch
/// overlap sends it), and encodes it as a step record body. Its buffers are reused from step to
/// step; encoding allocates only the body handed to the writer.
#[derive(Debug, Clone)]
pub struct StepBuilder {
    /// Index of each layer id in the header's layer list.
    index: Vec<Option<usize>>,
    top_k: usize,
    id_bytes: usize,
    tokens: Vec<u32>,
    ids: Vec<Vec<u16>>,
}

impl StepBuilder {
    pub fn new(header: &TraceHeader) -> Self {
        let max = header.layers.iter().copied().max().unwrap_or(0) as usize;
        let mut index = vec![None; max + 1];
        for (i, &l) in header.layers.iter().enumerate() {
            index[l as usize] = Some(i);
        }
        StepBuilder {
            index,
            top_k: header.top_k as usize,
            id_bytes: header.id_bytes(),
            tokens: vec![0; header.layers.len()],
            ids: vec![Vec::new(); header.layers.len()],
        }
    }

    /// Adds the top-k choices of `per_row` tokens at `layer` (ignored for a layer the header does
    /// not list; a row with other than top-k choices is cut or padded with its last choice).
    pub fn record(&mut self, layer: usize, per_row: &[Vec<u32>]) {
        let Some(Some(i)) = self.index.get(layer) else { return };
        self.tokens[*i] += per_row.len() as u32;
        for row in per_row {
            for j in 0..self.top_k {
                let e = row.get(j).or(row.last()).copied().unwrap_or(0);
                self.ids[*i].push(e as u16);
            }
        }
    }

    /// Whether nothing was recorded since the last [`StepBuilder::finish`].
    pub fn is_empty(&self) -> bool {
        self.tokens.iter().all(|&t| t == 0)
    }

    /// The step record body, stamped now; the builder is empty again.
    pub fn finish(&mut self) -> Vec<u8> {
        let ids: usize = self.ids.iter().map(Vec::len).sum();
        let mut body = Vec::with_capacity(12 + 4 * self.tokens.len() + ids * self.id_bytes);
        body.extend_from_slice(&now_us().to_le_bytes());
        body.extend_from_slice(&self.tokens.first().copied().unwrap_or(0).to_le_bytes());
        for (t, ids) in self.tokens.iter_mut().zip(&mut self.ids) {
            body.extend_from_slice(&t.to_le_bytes());
            if self.id_bytes == 1 {
                body.extend(ids.iter().map(|&e| e as u8));
            } else {
                ids.iter().for_each(|e| body.extend_from_slice(&e.to_le_bytes()));
            }
            *t = 0;
            ids.clear();
        }
        body
    }
}
