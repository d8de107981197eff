//! The journal of a batch's finished lines: `<data-dir>/batches/<id>.lines.jsonl`, one output line
//! per finished request, appended and flushed to disk (`fdatasync`) before the line counts as
//! finished. After a crash the journal is read back: its lines are not run again, and a last line
//! cut short by the crash (no newline, or not JSON) is cut off, so that its request runs again. The
//! output and error files are built from the journal, the first line of each `custom_id` only: that
//! is what makes a restart produce every line exactly once.
//!
//! An append-only file rather than an embedded database (redb): the one write pattern is "append
//! a few lines, make them durable", which `write` + `fdatasync` is; a torn tail is the only damage a
//! crash can do, and it is recognisable; and the journal is the output file's text already.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line of an output or error file (OpenAI's shape). `custom_id` is the key: output order is
/// not input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputLine {
    /// `batch_req_` and 24 hex digits.
    pub id: String,
    pub custom_id: String,
    pub response: Option<LineResponse>,
    pub error: Option<OutputError>,
}

impl OutputLine {
    /// Goes to the output file (else to the error file): the endpoint answered 2xx.
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.response.as_ref().is_some_and(|r| (200..300).contains(&r.status_code))
    }
}

/// What the endpoint answered the line's request: the status and body a direct request gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineResponse {
    pub status_code: u16,
    pub request_id: String,
    pub body: serde_json::Value,
}

/// Why a line has no response (it was never run: the batch expired).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputError {
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub struct Journal {
    file: File,
}

impl Journal {
    /// Opens (creating) the journal at `path`: it, and the lines it holds (the first of each
    /// `custom_id` only), after cutting off a torn last line.
    pub fn open(path: &Path) -> io::Result<(Journal, Vec<OutputLine>)> {
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut lines = Vec::new();
        let mut seen = HashSet::new();
        let mut valid = 0;
        while let Some(end) = bytes[valid..].iter().position(|&b| b == b'\n') {
            let Ok(line) = serde_json::from_slice::<OutputLine>(&bytes[valid..valid + end]) else { break };
            if seen.insert(line.custom_id.clone()) {
                lines.push(line);
            }
            valid += end + 1;
        }
        if valid < bytes.len() {
            tracing::warn!(
                journal = %path.display(),
                bytes = bytes.len() - valid,
                "cutting off the end of the journal that a crash left incomplete; its lines run again"
            );
            file.set_len(valid as u64)?;
            file.sync_data()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok((Journal { file }, lines))
    }

    /// Appends `lines` in one write and flushes them to disk: once this returns they survive a crash.
    pub fn append(&mut self, lines: &[OutputLine]) -> io::Result<()> {
        let mut buffer = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut buffer, line)?;
            buffer.push(b'\n');
        }
        self.file.write_all(&buffer)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str, n: u64) -> OutputLine {
        OutputLine {
            id: format!("batch_req_{custom_id}"),
            custom_id: custom_id.into(),
            response: Some(LineResponse {
                status_code: 200,
                request_id: "r".into(),
                body: serde_json::json!({ "n": n }),
            }),
            error: None,
        }
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_duplicates_are_dropped() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("b.lines.jsonl");
        let (mut journal, lines) = Journal::open(&path)?;
        assert!(lines.is_empty());
        journal.append(&[line("a", 1), line("b", 2)])?;
        journal.append(&[line("a", 3)])?;
        drop(journal);
        // A crash in the middle of a write.
        OpenOptions::new().append(true).open(&path)?.write_all(b"{\"id\": \"batch_req_c\", \"custom")?;
        let (mut journal, lines) = Journal::open(&path)?;
        assert_eq!(lines, vec![line("a", 1), line("b", 2)]);
        journal.append(&[line("c", 4)])?;
        drop(journal);
        let (_, lines) = Journal::open(&path)?;
        assert_eq!(lines.iter().map(|l| l.custom_id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(lines.iter().all(OutputLine::succeeded));
        Ok(())
    }
}
