//! The OpenAI Files and Batches API (issue 18): upload a JSONL file of requests, create a batch from
//! it, collect an output file later. The pieces: the Files store ([`files`]) and its routes
//! ([`files_api`]); the checking of a batch's input file through the direct endpoints' own
//! validation ([`input`]); the batch object, its life cycle and store ([`job`]) and its routes
//! ([`batches_api`]); the journal of finished lines ([`journal`]); and the runner ([`runner`]) that
//! sends the lines through the same preparation and answer code as direct requests, on the
//! coordinators, at [`BATCH_PRIORITY`] — the engines admit interactive requests first, preempt
//! batch sequences first under KV pressure, and fill idle capacity with batch work.
//!
//! Everything lives under the data directory, so that the runner resumes every unfinished job after
//! a crash (even SIGKILL) without losing or repeating a line. In a cluster one gateway runs the
//! batches (elected through the control plane); any gateway mounting the same directory serves the
//! API. Boundaries: no sampling, no scheduling of its own beyond how many lines are in flight.

pub mod batches_api;
pub mod files;
pub mod files_api;
pub mod input;
pub mod job;
pub mod journal;
pub mod runner;

use std::path::PathBuf;
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::Notify;

use crate::errors::ApiError;
pub use files::{FileObject, FileStore, StoreError};
pub use input::{BatchLine, Endpoint, LineError, LineRequest, MAX_INPUT_BYTES, MAX_INPUT_LINES, parse_input};
pub use job::{Batch, JobStore, JobStoreError, RequestCounts, Status};

/// The engines' scheduling class of batch lines. Interactive requests are 0, the most urgent
/// (coordinator/src/engine.rs); values between are left for classes that may come between the two.
pub const BATCH_PRIORITY: i32 = 10;

/// The Batch API's settings (`--data-dir` and friends, docs/gateway.md "Batch").
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Files, jobs and their progress.
    pub data_dir: PathBuf,
    /// Largest uploaded file, in bytes (413 past it; OpenAI's limit is 200 MB).
    pub max_file_bytes: usize,
    /// Batch lines in flight per healthy coordinator, all batches together: enough to fill an
    /// engine's running batch (the engine's priority queue keeps interactive requests first).
    pub lines_per_coordinator: usize,
}

impl BatchConfig {
    /// OpenAI's file limit and 64 lines in flight per coordinator.
    pub fn new(data_dir: PathBuf) -> Self {
        BatchConfig { data_dir, max_file_bytes: MAX_INPUT_BYTES, lines_per_coordinator: 64 }
    }
}

/// Why the data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Files(#[from] StoreError),
    #[error(transparent)]
    Jobs(#[from] JobStoreError),
}

/// The Batch API's state in a gateway: the stores, the limits, and a wake-up for the runner.
#[derive(Debug)]
pub struct Batches {
    pub files: FileStore,
    pub jobs: JobStore,
    pub config: BatchConfig,
    /// Notified when a batch is created or cancelled here, so that the runner (if it is this
    /// gateway) does not wait for its next scan.
    pub changed: Notify,
}

impl Batches {
    pub fn open(config: BatchConfig) -> Result<Arc<Batches>, OpenError> {
        let files = FileStore::open(&config.data_dir)?;
        let jobs = JobStore::open(&config.data_dir)?;
        Ok(Arc::new(Batches { files, jobs, config, changed: Notify::new() }))
    }

    /// Runs `job` on the stores off the async runtime (file I/O blocks); a store failure is a 500.
    pub async fn blocking<T: Send + 'static, E: Send + 'static>(
        self: &Arc<Self>,
        job: impl FnOnce(&Batches) -> Result<T, E> + Send + 'static,
    ) -> Result<Result<T, E>, ApiError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || job(&this))
            .await
            .map_err(|e| ApiError::internal(format!("the batch store failed: {e}")))
    }
}

/// The store error as the API answers it: 404 for an unknown id, 500 (logged) for the rest.
pub(crate) fn store_error(what: &str, e: impl Into<AnyStoreError>) -> ApiError {
    match e.into() {
        AnyStoreError::NotFound(id) => not_found(what, &id),
        AnyStoreError::Other(message) => {
            tracing::error!("batch store: {message}");
            ApiError::internal(format!("the batch store failed: {message}"))
        }
    }
}

/// Either store's error, as [`store_error`] tells them apart.
pub(crate) enum AnyStoreError {
    NotFound(String),
    Other(String),
}

impl From<StoreError> for AnyStoreError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => AnyStoreError::NotFound(id),
            e => AnyStoreError::Other(e.to_string()),
        }
    }
}

impl From<JobStoreError> for AnyStoreError {
    fn from(e: JobStoreError) -> Self {
        match e {
            JobStoreError::NotFound(id) => AnyStoreError::NotFound(id),
            e => AnyStoreError::Other(e.to_string()),
        }
    }
}

/// 404 for a file or batch id that does not exist.
pub(crate) fn not_found(what: &str, id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        error_type: "invalid_request_error",
        message: format!("No {what} found with id '{id}'."),
        param: Some("id".into()),
        code: Some("not_found"),
        retry_after: None,
    }
}

/// 409: the request contradicts the object's state (cancelling a finished batch, deleting a file
/// an unfinished batch reads).
pub(crate) fn conflict(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::CONFLICT,
        error_type: "invalid_request_error",
        message: message.into(),
        param: None,
        code: Some("conflict"),
        retry_after: None,
    }
}

/// 413 with the limit that was passed.
pub(crate) fn file_too_large(limit: usize) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        error_type: "invalid_request_error",
        message: format!(
            "The file is larger than {limit} bytes, the largest this server accepts (--batch-max-file-bytes)."
        ),
        param: Some("file".into()),
        code: Some("file_too_large"),
        retry_after: None,
    }
}

/// The Batch API's state of `state`, or 404-like 503 when the gateway runs without a data directory.
pub(crate) fn batches_of(state: &crate::server::AppState) -> Result<&Arc<Batches>, ApiError> {
    state
        .batches
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("This gateway serves no Batch API (it has no --data-dir)."))
}
