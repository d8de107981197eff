//! Reading a trace back, part after part, with every malformed byte reported at its offset.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use super::{KIND_DROPPED, KIND_STEP, MAGIC, MAX_BODY, MAX_HEADER, TraceHeader, VERSION};
use crate::error::TraceError;

/// The path of part `n` of the trace at `path` (`path` itself for 0).
pub fn part_path(path: &Path, n: u32) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// One step: the expert ids of every token at every MoE layer, `top_k` per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub timestamp_us: u64,
    pub tokens: u32,
    /// Per header layer: `tokens · top_k` expert ids.
    pub layers: Vec<Vec<u16>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Step(StepRecord),
    /// `steps` steps were not recorded: the writer's buffer was full.
    Dropped {
        timestamp_us: u64,
        steps: u64,
    },
}

/// Reads `PATH`, then `PATH.1`, `PATH.2`, … while they exist.
#[derive(Debug)]
pub struct TraceReader {
    base: PathBuf,
    header: TraceHeader,
    part: u32,
    path: PathBuf,
    input: BufReader<File>,
    offset: u64,
}

impl TraceReader {
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let (input, header, offset) = open_part(path)?;
        Ok(TraceReader { base: path.to_path_buf(), header, part: 0, path: path.to_path_buf(), input, offset })
    }

    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// The next record, moving on to the next part at the end of one; `None` at the end of the last.
    pub fn next_record(&mut self) -> Result<Option<Record>, TraceError> {
        loop {
            if let Some(r) = self.read_record()? {
                return Ok(Some(r));
            }
            let next = part_path(&self.base, self.part + 1);
            if !next.exists() {
                return Ok(None);
            }
            let (input, header, offset) = open_part(&next)?;
            if !header.same_recording(&self.header) || header.part != self.part + 1 {
                return Err(TraceError::Mismatch(format!(
                    "{}: part {} does not continue the recording of {}",
                    next.display(),
                    header.part,
                    self.base.display()
                )));
            }
            (self.input, self.offset, self.path) = (input, offset, next);
            self.part += 1;
        }
    }

    fn read_record(&mut self) -> Result<Option<Record>, TraceError> {
        let start = self.offset;
        let mut head = [0u8; 5];
        match read_full(&mut self.input, &mut head) {
            Ok(0) => return Ok(None),
            Ok(5) => {}
            Ok(_) => return Err(self.truncated(start, "record header")),
            Err(source) => return Err(TraceError::Io { path: self.path.clone(), source }),
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_BODY {
            return Err(self.corrupt(start, format!("record length {len} is implausible")));
        }
        let mut body = vec![0u8; len as usize];
        match read_full(&mut self.input, &mut body) {
            Ok(n) if n == body.len() => {}
            Ok(_) => return Err(self.truncated(start, &format!("record of {len} bytes"))),
            Err(source) => return Err(TraceError::Io { path: self.path.clone(), source }),
        }
        self.offset += 5 + u64::from(len);
        let record = match kind {
            KIND_STEP => Record::Step(self.decode_step(start, &body)?),
            KIND_DROPPED if body.len() == 16 => {
                Record::Dropped { timestamp_us: le_u64(&body[0..8]), steps: le_u64(&body[8..16]) }
            }
            KIND_DROPPED => return Err(self.corrupt(start, format!("dropped record of {len} bytes, not 16"))),
            other => return Err(self.corrupt(start, format!("unknown record kind {other}"))),
        };
        Ok(Some(record))
    }

    fn decode_step(&self, start: u64, body: &[u8]) -> Result<StepRecord, TraceError> {
        let h = &self.header;
        let (k, idb) = (h.top_k as usize, h.id_bytes());
        let short = || self.corrupt(start, "step record shorter than its layers say".to_owned());
        if body.len() < 12 {
            return Err(short());
        }
        let timestamp_us = le_u64(&body[0..8]);
        let tokens = le_u32(&body[8..12]);
        let mut at = 12;
        let mut layers = Vec::with_capacity(h.layers.len());
        for _ in &h.layers {
            let n = le_u32(body.get(at..at + 4).ok_or_else(short)?) as usize;
            at += 4;
            let len = n * k * idb;
            let raw = body.get(at..at + len).ok_or_else(short)?;
            at += len;
            let ids: Vec<u16> = if idb == 1 {
                raw.iter().map(|&b| u16::from(b)).collect()
            } else {
                raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
            };
            if let Some(&bad) = ids.iter().find(|&&e| u32::from(e) >= h.num_experts) {
                return Err(self.corrupt(start, format!("expert id {bad} ≥ {} experts", h.num_experts)));
            }
            layers.push(ids);
        }
        if at != body.len() {
            return Err(self.corrupt(start, format!("{} bytes after the last layer", body.len() - at)));
        }
        Ok(StepRecord { timestamp_us, tokens, layers })
    }

    fn truncated(&self, offset: u64, what: &str) -> TraceError {
        TraceError::Truncated { path: self.path.clone(), offset, what: what.to_owned() }
    }

    fn corrupt(&self, offset: u64, reason: String) -> TraceError {
        TraceError::Corrupt { path: self.path.clone(), offset, reason }
    }
}

fn open_part(path: &Path) -> Result<(BufReader<File>, TraceHeader, u64), TraceError> {
    let io = |source| TraceError::Io { path: path.to_path_buf(), source };
    let truncated = |offset, what: &str| TraceError::Truncated { path: path.to_path_buf(), offset, what: what.into() };
    let mut input = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
    let mut fixed = [0u8; 14];
    let n = read_full(&mut input, &mut fixed).map_err(io)?;
    if n < MAGIC.len() || &fixed[..8] != MAGIC {
        return Err(if n < MAGIC.len() && fixed[..n] == MAGIC[..n] {
            truncated(0, "magic")
        } else {
            TraceError::NotATrace { path: path.to_path_buf() }
        });
    }
    if n < fixed.len() {
        return Err(truncated(8, "version and header length"));
    }
    let version = u16::from_le_bytes([fixed[8], fixed[9]]);
    if version != VERSION {
        return Err(TraceError::Version { path: path.to_path_buf(), found: version, supported: VERSION });
    }
    let len = le_u32(&fixed[10..14]);
    if len > MAX_HEADER {
        return Err(TraceError::Corrupt {
            path: path.to_path_buf(),
            offset: 10,
            reason: format!("header length {len}"),
        });
    }
    let mut json = vec![0u8; len as usize];
    if read_full(&mut input, &mut json).map_err(io)? < json.len() {
        return Err(truncated(14, &format!("header of {len} bytes")));
    }
    let header: TraceHeader = serde_json::from_slice(&json).map_err(|e| TraceError::Corrupt {
        path: path.to_path_buf(),
        offset: 14,
        reason: format!("header: {e}"),
    })?;
    header.validate().map_err(|e| TraceError::Corrupt {
        path: path.to_path_buf(),
        offset: 14,
        reason: e.to_string(),
    })?;
    Ok((input, header, 14 + u64::from(len)))
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}
