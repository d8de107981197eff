//! A batch job as OpenAI's Batch API describes it ([`Batch`]), its status life cycle, and the store
//! that keeps every job under `<data-dir>/batches/<id>.json`, each write atomic ([`write_atomic`]).
//!
//! The life cycle is `validating` → `in_progress` → `finalizing` → `completed`, with `failed` (from
//! `validating`), `cancelling` → `cancelled` and `expired`; [`Batch::advance`] refuses any other move
//! and stamps the transition's timestamp, so a job read back after a restart says where it stood.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::{new_id, unix_now, valid_id, write_atomic};
use super::input::{Endpoint, LineError};

/// How long a batch may run: the only window OpenAI offers.
pub const COMPLETION_WINDOW: &str = "24h";
/// [`COMPLETION_WINDOW`] in seconds.
pub const COMPLETION_WINDOW_SECS: u64 = 24 * 60 * 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    /// Whether the job is over (nothing will change it again).
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Failed | Status::Completed | Status::Expired | Status::Cancelled)
    }

    fn may_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Validating, Failed | InProgress | Cancelling)
                | (InProgress, Finalizing | Cancelling | Expired)
                | (Finalizing, Completed)
                | (Cancelling, Cancelled)
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// `errors` of a batch: `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    pub object: String,
    pub data: Vec<LineError>,
}

/// The batch object of OpenAI's API, as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: Endpoint,
    pub errors: Option<Errors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: Status,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: u64,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a batch cannot go from {from:?} to {to:?}")]
pub struct BadTransition {
    pub from: Status,
    pub to: Status,
}

impl Batch {
    /// A new job, `validating`, created now.
    pub fn new(
        input_file_id: &str,
        endpoint: Endpoint,
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Self {
        let now = unix_now();
        Batch {
            id: new_id("batch"),
            object: "batch".into(),
            endpoint,
            errors: None,
            input_file_id: input_file_id.into(),
            completion_window: COMPLETION_WINDOW.into(),
            status: Status::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at: now,
            in_progress_at: None,
            expires_at: now + COMPLETION_WINDOW_SECS,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata,
        }
    }

    /// Moves the job to `next` and stamps the time, or refuses a move the life cycle does not have.
    pub fn advance(&mut self, next: Status) -> Result<(), BadTransition> {
        if !self.status.may_become(next) {
            return Err(BadTransition { from: self.status, to: next });
        }
        let now = Some(unix_now());
        match next {
            Status::Validating => {}
            Status::Failed => self.failed_at = now,
            Status::InProgress => self.in_progress_at = now,
            Status::Finalizing => self.finalizing_at = now,
            Status::Completed => self.completed_at = now,
            Status::Expired => self.expired_at = now,
            Status::Cancelling => self.cancelling_at = now,
            Status::Cancelled => self.cancelled_at = now,
        }
        self.status = next;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error("no such batch: {0}")]
    NotFound(String),
    #[error("batch store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("batch record {path} is unreadable: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

/// The jobs of one data directory. Blocking calls, as [`super::FileStore`]'s.
#[derive(Debug, Clone)]
pub struct JobStore {
    dir: PathBuf,
}

impl JobStore {
    pub fn open(data_dir: &Path) -> Result<Self, JobStoreError> {
        let dir = data_dir.join("batches");
        fs::create_dir_all(&dir).map_err(|source| JobStoreError::Io { path: dir.clone(), source })?;
        Ok(JobStore { dir })
    }

    /// Writes the job whole (a new one, or its next state).
    pub fn save(&self, batch: &Batch) -> Result<(), JobStoreError> {
        let path = self.path(&batch.id);
        let json = serde_json::to_vec(batch).expect("a Batch serialises");
        write_atomic(&path, &json).map_err(|source| JobStoreError::Io { path, source })
    }

    pub fn get(&self, id: &str) -> Result<Batch, JobStoreError> {
        if !valid_id(id) {
            return Err(JobStoreError::NotFound(id.into()));
        }
        let path = self.path(id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(JobStoreError::NotFound(id.into())),
            Err(source) => return Err(JobStoreError::Io { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| JobStoreError::Corrupt { path, source })
    }

    /// Every job, newest first (OpenAI's order for `GET /v1/batches`).
    pub fn all(&self) -> Result<Vec<Batch>, JobStoreError> {
        let io_err = |source| JobStoreError::Io { path: self.dir.clone(), source };
        let mut jobs = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err)? {
            let name = entry.map_err(io_err)?.file_name().to_string_lossy().into_owned();
            // `.tmp-*` names are writes in progress (or left by a crash): not jobs.
            if let Some(id) = name.strip_suffix(".json").filter(|_| !name.starts_with('.')) {
                jobs.push(self.get(id)?);
            }
        }
        jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        Ok(jobs)
    }

    /// A page of [`all`](Self::all): up to `limit` jobs after the one named `after`, and whether more
    /// follow (`has_more`).
    pub fn page(&self, after: Option<&str>, limit: usize) -> Result<(Vec<Batch>, bool), JobStoreError> {
        let jobs = self.all()?;
        let start = match after {
            Some(after) => {
                jobs.iter().position(|b| b.id == after).ok_or_else(|| JobStoreError::NotFound(after.into()))? + 1
            }
            None => 0,
        };
        let rest = &jobs[start..];
        let page = rest.iter().take(limit).cloned().collect();
        Ok((page, rest.len() > limit))
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Marks the job for cancellation: a file `<id>.cancel` holding the time it was asked, written
    /// by whichever gateway got the request, so that only the runner ever writes the job itself.
    /// Returns when the cancel was first asked (asking again changes nothing).
    pub fn request_cancel(&self, id: &str) -> Result<u64, JobStoreError> {
        if let Some(at) = self.cancel_requested(id) {
            return Ok(at);
        }
        let at = unix_now();
        let path = self.cancel_path(id);
        write_atomic(&path, at.to_string().as_bytes()).map_err(|source| JobStoreError::Io { path, source })?;
        Ok(at)
    }

    /// When a cancel of the job was asked, if it was.
    pub fn cancel_requested(&self, id: &str) -> Option<u64> {
        if !valid_id(id) {
            return None;
        }
        let text = fs::read_to_string(self.cancel_path(id)).ok()?;
        Some(text.trim().parse().unwrap_or_else(|_| unix_now()))
    }

    /// The journal of the job's finished lines ([`super::journal`]).
    pub fn journal_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.lines.jsonl"))
    }

    fn cancel_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.cancel"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn life_cycle_moves_and_stamps() {
        let mut batch = Batch::new("file-0123456789abcdef01234567", Endpoint::Completions, None);
        assert_eq!(batch.expires_at, batch.created_at + COMPLETION_WINDOW_SECS);
        assert_eq!(
            batch.advance(Status::Completed),
            Err(BadTransition { from: Status::Validating, to: Status::Completed })
        );
        for next in [Status::InProgress, Status::Finalizing, Status::Completed] {
            batch.advance(next).expect("a move of the life cycle");
        }
        assert!(batch.status.is_terminal());
        assert!(batch.in_progress_at.is_some() && batch.finalizing_at.is_some() && batch.completed_at.is_some());
        assert!(batch.advance(Status::Cancelling).is_err());
        let mut cancelled = Batch::new("file-0123456789abcdef01234567", Endpoint::Completions, None);
        cancelled.advance(Status::InProgress).expect("start");
        cancelled.advance(Status::Cancelling).expect("cancel");
        cancelled.advance(Status::Cancelled).expect("cancelled");
        assert!(cancelled.cancelling_at.is_some() && cancelled.cancelled_at.is_some());
        let json = serde_json::to_value(&cancelled).expect("serialises");
        assert_eq!((json["status"].as_str(), json["endpoint"].as_str()), (Some("cancelled"), Some("/v1/completions")));
    }

    #[test]
    fn jobs_survive_a_reopen_and_page() {
        let dir = std::env::temp_dir().join(format!("epserve-jobs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = JobStore::open(&dir).expect("open");
        let mut ids = Vec::new();
        for i in 0..5u64 {
            let mut batch = Batch::new("file-0123456789abcdef01234567", Endpoint::ChatCompletions, None);
            batch.created_at += i; // distinct creation times: a defined order
            store.save(&batch).expect("save");
            ids.push(batch.id);
        }
        ids.reverse(); // newest first
        let store = JobStore::open(&dir).expect("reopen");
        let (first, more) = store.page(None, 2).expect("page");
        assert_eq!((first.iter().map(|b| &b.id).collect::<Vec<_>>(), more), (vec![&ids[0], &ids[1]], true));
        let (last, more) = store.page(Some(&ids[3]), 2).expect("page");
        assert_eq!((last.iter().map(|b| &b.id).collect::<Vec<_>>(), more), (vec![&ids[4]], false));
        assert!(matches!(store.page(Some("batch-0123456789abcdef01234567"), 2), Err(JobStoreError::NotFound(_))));
        assert!(matches!(store.get("../x"), Err(JobStoreError::NotFound(_))));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
