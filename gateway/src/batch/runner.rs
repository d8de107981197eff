//! The batch runner: finds every unfinished batch in the data directory and drives it to the end —
//! validation, its lines on the coordinators at [`BATCH_PRIORITY`], the output files — resuming from
//! the journal after a crash. It runs in one gateway of a cluster, while that gateway leads the
//! `batch-runner` election (always, without a control plane).
//!
//! Lines in flight: `--batch-lines-per-coordinator` × the healthy coordinators, shared by every
//! batch, each line routed like a direct request (least-loaded coordinator), so the coordinators
//! share a batch's lines. That fills the engines' running batches; their priority queues keep
//! interactive requests first. A line the cluster cannot take now (429, 503) is tried again with
//! back-off until the batch ends; a 500 three more times; any other answer is the line's result.
//!
//! Cancel and expiry stop the lines in flight at once (dropping their streams frees their KV at the
//! engines' next step); what finished is kept and written out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use epserve_proto::metric_names as m;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::files::{PURPOSE_BATCH_OUTPUT, StoreError, new_id, unix_now};
use super::input::parse_input_with;
use super::job::{BadTransition, Errors, JobStoreError};
use super::journal::{Journal, LineResponse, OutputError, OutputLine};
use super::{BATCH_PRIORITY, Batch, BatchLine, Batches, LineError, LineRequest, Status};
use crate::server::AppState;

/// How often the data directory is scanned for batches created elsewhere (a gateway that is not
/// the runner), and the lines in flight matched to the healthy coordinators.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How often a running batch checks for a cancel and its expiry.
const TICK: Duration = Duration::from_millis(200);
/// A running batch's object (its counts) is written at most this often.
const SAVE_INTERVAL: Duration = Duration::from_millis(250);
/// A job stopped by a store error is tried again after this.
const JOB_RETRY: Duration = Duration::from_secs(5);
/// 500 answers a line is given before its answer counts.
const SERVER_ERROR_RETRIES: u32 = 3;

/// Why a job stopped before its end (it is tried again at the next scan).
#[derive(Debug, thiserror::Error)]
enum RunnerError {
    #[error(transparent)]
    Jobs(#[from] JobStoreError),
    #[error(transparent)]
    Files(#[from] StoreError),
    #[error("journal {path}: {source}")]
    Journal { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Transition(#[from] BadTransition),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the input file of a running batch is no longer valid: {0}")]
    Input(String),
}

/// Runs batches whenever `leading` is true, until the task is dropped.
pub async fn run(state: Arc<AppState>, batches: Arc<Batches>, mut leading: watch::Receiver<bool>) {
    let capacity = Capacity::new(batches.config.lines_per_coordinator);
    let mut waiting_logged = false;
    'leading: loop {
        while !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                return;
            }
        }
        // Held while running, released with the process (also on SIGKILL): one runner per data
        // directory, also between gateways that share it without a control plane.
        let _lock = loop {
            match try_lock(&batches.config.data_dir) {
                Ok(Some(lock)) => break lock,
                Ok(None) if !waiting_logged => {
                    tracing::warn!("another process runs the batches of this data directory: waiting for its lock");
                    waiting_logged = true;
                }
                Ok(None) => {}
                Err(e) => tracing::error!("locking the batch runner's data directory: {e}"),
            }
            tokio::select! {
                () = tokio::time::sleep(SCAN_INTERVAL) => {}
                () = lost(&mut leading) => continue 'leading,
            }
        };
        tracing::info!(data_dir = %batches.config.data_dir.display(), "this gateway runs the batches");
        let mut jobs = JoinSet::new();
        let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
        loop {
            capacity.resize(state.pool.healthy_count());
            running.retain(|_, job| !job.is_finished());
            while jobs.try_join_next().is_some() {}
            match batches.blocking(|b| b.jobs.all()).await {
                Ok(Ok(all)) => {
                    for batch in all.into_iter().filter(|b| !b.status.is_terminal()) {
                        if running.contains_key(&batch.id) {
                            continue;
                        }
                        let job = run_job(state.clone(), batches.clone(), capacity.slots.clone(), batch.id.clone());
                        let span = tracing::info_span!("batch", batch = %batch.id);
                        running.insert(batch.id, jobs.spawn(job.instrument(span)));
                    }
                }
                Ok(Err(e)) => tracing::error!("scanning the batches: {e}"),
                Err(e) => tracing::error!("scanning the batches: {}", e.message),
            }
            metrics::gauge!(m::BATCH_JOBS_ACTIVE).set(running.len() as f64);
            tokio::select! {
                () = batches.changed.notified() => {}
                () = tokio::time::sleep(SCAN_INTERVAL) => {}
                () = lost(&mut leading) => {
                    tracing::warn!("no longer the batch runner: stopping the batches' lines in flight");
                    jobs.abort_all();
                    metrics::gauge!(m::BATCH_JOBS_ACTIVE).set(0.0);
                    break;
                }
            }
        }
    }
}

/// Resolves when `leading` turns false. A sender that is gone leaves the last value for good
/// (without a control plane this gateway always leads).
async fn lost(leading: &mut watch::Receiver<bool>) {
    loop {
        if leading.changed().await.is_err() {
            if *leading.borrow() {
                std::future::pending::<()>().await;
            }
            return;
        }
        if !*leading.borrow() {
            return;
        }
    }
}

/// `<data-dir>/runner.lock`, locked exclusively; `None` while another process holds it.
fn try_lock(data_dir: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(data_dir.join("runner.lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The lines in flight allowed, all batches together: a semaphore whose size follows the healthy
/// coordinators.
struct Capacity {
    slots: Arc<Semaphore>,
    size: AtomicUsize,
    per_coordinator: usize,
}

impl Capacity {
    fn new(per_coordinator: usize) -> Self {
        let per_coordinator = per_coordinator.max(1);
        Capacity {
            slots: Arc::new(Semaphore::new(per_coordinator)),
            size: AtomicUsize::new(per_coordinator),
            per_coordinator,
        }
    }

    /// With no healthy coordinator the size stays: lines wait for one in back-off.
    fn resize(&self, healthy: usize) {
        if healthy == 0 {
            return;
        }
        let target = self.per_coordinator * healthy;
        let size = self.size.load(Ordering::Relaxed);
        if target > size {
            self.slots.add_permits(target - size);
            self.size.store(target, Ordering::Relaxed);
        } else if target < size {
            // Only free permits can be taken back; the rest at a later resize.
            let taken = self.slots.forget_permits(size - target);
            self.size.store(size - taken, Ordering::Relaxed);
        }
    }
}

/// How a batch's lines ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Cancelled,
    Expired,
}

async fn run_job(state: Arc<AppState>, batches: Arc<Batches>, slots: Arc<Semaphore>, id: String) {
    if let Err(e) = drive(&state, &batches, slots, &id).await {
        tracing::error!("batch {id} stopped (tried again in {} s): {e}", JOB_RETRY.as_secs());
        tokio::time::sleep(JOB_RETRY).await;
    }
}

/// Runs `f` on the stores off the async runtime.
async fn blocking<T: Send + 'static>(
    batches: &Arc<Batches>,
    f: impl FnOnce(&Batches) -> Result<T, RunnerError> + Send + 'static,
) -> Result<T, RunnerError> {
    let this = batches.clone();
    tokio::task::spawn_blocking(move || f(&this)).await?
}

async fn save(batches: &Arc<Batches>, batch: &Batch) -> Result<(), RunnerError> {
    let batch = batch.clone();
    blocking(batches, move |b| Ok(b.jobs.save(&batch)?)).await
}

/// One batch, from wherever it stands to a terminal status.
async fn drive(
    state: &Arc<AppState>,
    batches: &Arc<Batches>,
    slots: Arc<Semaphore>,
    id: &str,
) -> Result<(), RunnerError> {
    let lookup = id.to_owned();
    let (mut batch, cancel) =
        blocking(batches, move |b| Ok((b.jobs.get(&lookup)?, b.jobs.cancel_requested(&lookup)))).await?;
    let mut checked = None;
    if batch.status == Status::Validating {
        if cancel.is_some() {
            return finalize(batches, batch, Outcome::Cancelled, cancel).await;
        }
        match validate(state, batches, &batch).await? {
            Err(errors) => {
                tracing::info!(errors = errors.len(), "batch failed validation");
                batch.errors = Some(Errors { object: "list".into(), data: errors });
                batch.advance(Status::Failed)?;
                return save(batches, &batch).await;
            }
            Ok(lines) => {
                batch.request_counts.total = lines.len() as u64;
                batch.advance(Status::InProgress)?;
                save(batches, &batch).await?;
                tracing::info!(lines = lines.len(), "batch validated, running");
                checked = Some(lines);
            }
        }
    }
    let outcome = match batch.status {
        Status::InProgress => {
            let lines = match checked {
                Some(lines) => lines,
                // A restart: the input is read and checked again (it cannot have changed: a file
                // an unfinished batch reads cannot be deleted).
                None => validate(state, batches, &batch).await?.map_err(|errors| {
                    RunnerError::Input(errors.first().map(|e| e.message.clone()).unwrap_or_default())
                })?,
            };
            execute(state, batches, slots, &mut batch, lines).await?
        }
        Status::Cancelling => Outcome::Cancelled,
        Status::Finalizing => Outcome::Done,
        _ => return Ok(()),
    };
    let cancel = match outcome {
        Outcome::Cancelled => {
            let lookup = id.to_owned();
            blocking(batches, move |b| Ok(b.jobs.cancel_requested(&lookup))).await?
        }
        _ => None,
    };
    finalize(batches, batch, outcome, cancel).await
}

/// The batch's input file, checked line by line as the endpoint checks a request: the body's own
/// validation ([`parse_input_with`]), then the served model and this gateway's request limits.
async fn validate(
    state: &Arc<AppState>,
    batches: &Arc<Batches>,
    batch: &Batch,
) -> Result<Result<Vec<BatchLine>, Vec<LineError>>, RunnerError> {
    let (file_id, endpoint, state) = (batch.input_file_id.clone(), batch.endpoint, state.clone());
    blocking(batches, move |b| {
        let content = match b.files.content(&file_id) {
            Ok(content) => content,
            Err(StoreError::NotFound(_)) => {
                return Ok(Err(vec![LineError {
                    code: "invalid_file".into(),
                    message: format!("The input file {file_id} no longer exists."),
                    param: Some("input_file_id".into()),
                    line: None,
                }]));
            }
            Err(e) => return Err(e.into()),
        };
        let check = |request: &LineRequest| match request {
            LineRequest::Chat(r) => {
                state.require_served_model(&r.model).and_then(|()| state.edge.requests.check_chat(r))
            }
            LineRequest::Completion(r) => {
                state.require_served_model(&r.model).and_then(|()| state.edge.requests.check_completion(r))
            }
        };
        Ok(parse_input_with(&content, endpoint, &check))
    })
    .await
}

/// Runs the lines that the journal does not hold yet, until all have finished, or the batch is
/// cancelled or expires.
async fn execute(
    state: &Arc<AppState>,
    batches: &Arc<Batches>,
    slots: Arc<Semaphore>,
    batch: &mut Batch,
    lines: Vec<BatchLine>,
) -> Result<Outcome, RunnerError> {
    let path = batches.jobs.journal_path(&batch.id);
    let opened = path.clone();
    let (journal, done) = tokio::task::spawn_blocking(move || Journal::open(&opened))
        .await?
        .map_err(|source| RunnerError::Journal { path: path.clone(), source })?;
    let finished: HashSet<&str> = done.iter().map(|l| l.custom_id.as_str()).collect();
    let total = lines.len() as u64;
    let mut pending: VecDeque<BatchLine> =
        lines.into_iter().filter(|l| !finished.contains(l.custom_id.as_str())).collect();
    let completed = done.iter().filter(|l| l.succeeded()).count() as u64;
    batch.request_counts.total = total;
    batch.request_counts.completed = completed;
    batch.request_counts.failed = done.len() as u64 - completed;
    if !done.is_empty() {
        tracing::info!(finished = done.len(), left = pending.len(), "resuming the batch from its journal");
    }
    drop(finished);
    drop(done);
    let mut journal = Some(journal);
    let mut in_flight: JoinSet<OutputLine> = JoinSet::new();
    let mut flying: HashMap<tokio::task::Id, BatchLine> = HashMap::new();
    let (mut saved, mut checked, mut dirty) = (Instant::now(), Instant::now(), true);
    let outcome = loop {
        while !pending.is_empty() {
            let Ok(permit) = slots.clone().try_acquire_owned() else { break };
            spawn_line(state, batch, &mut in_flight, &mut flying, pending.pop_front(), permit);
        }
        metrics::gauge!(m::BATCH_LINES_IN_FLIGHT).set(flying.len() as f64);
        if pending.is_empty() && in_flight.is_empty() {
            break Outcome::Done;
        }
        let mut results = Vec::new();
        tokio::select! {
            Some(joined) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                collect(joined, &mut flying, &mut pending, &mut results);
                while let Some(joined) = in_flight.try_join_next_with_id() {
                    collect(joined, &mut flying, &mut pending, &mut results);
                }
            }
            permit = slots.clone().acquire_owned(), if !pending.is_empty() => {
                if let Ok(permit) = permit {
                    spawn_line(state, batch, &mut in_flight, &mut flying, pending.pop_front(), permit);
                }
            }
            () = tokio::time::sleep(TICK) => {}
        }
        if !results.is_empty() {
            record(&mut journal, &path, batch, results).await?;
            dirty = true;
        }
        if checked.elapsed() < TICK {
            continue;
        }
        checked = Instant::now();
        if dirty && saved.elapsed() >= SAVE_INTERVAL {
            save(batches, batch).await?;
            (saved, dirty) = (Instant::now(), false);
        }
        let id = batch.id.clone();
        let cancelled = blocking(batches, move |b| Ok(b.jobs.cancel_requested(&id))).await?.is_some();
        let expired = unix_now() >= batch.expires_at;
        if cancelled || expired {
            let outcome = if cancelled { Outcome::Cancelled } else { Outcome::Expired };
            tracing::info!(?outcome, in_flight = in_flight.len(), "stopping the batch's lines in flight");
            in_flight.abort_all();
            // Lines that finished before the abort reached them are kept.
            let mut results = Vec::new();
            while let Some(joined) = in_flight.join_next_with_id().await {
                collect(joined, &mut flying, &mut pending, &mut results);
            }
            if outcome == Outcome::Expired {
                results.extend(pending.drain(..).map(|line| OutputLine {
                    id: new_id("batch_req"),
                    custom_id: line.custom_id,
                    response: None,
                    error: Some(OutputError {
                        code: "batch_expired".into(),
                        message: "This request could not be executed before the completion window expired.".into(),
                    }),
                }));
            }
            record(&mut journal, &path, batch, results).await?;
            break outcome;
        }
    };
    metrics::gauge!(m::BATCH_LINES_IN_FLIGHT).set(0.0);
    Ok(outcome)
}

fn spawn_line(
    state: &Arc<AppState>,
    batch: &Batch,
    in_flight: &mut JoinSet<OutputLine>,
    flying: &mut HashMap<tokio::task::Id, BatchLine>,
    line: Option<BatchLine>,
    permit: OwnedSemaphorePermit,
) {
    let Some(line) = line else { return };
    let request_id = format!("{}-line-{}", batch.id, line.line);
    let span = tracing::info_span!("batch_line", line = line.line, request_id = %request_id);
    let task = run_line(state.clone(), line.clone(), request_id, permit);
    let handle = in_flight.spawn(task.instrument(span));
    flying.insert(handle.id(), line);
}

/// A finished line task: its output, or (it was aborted or panicked) its line back in the queue.
fn collect(
    joined: Result<(tokio::task::Id, OutputLine), tokio::task::JoinError>,
    flying: &mut HashMap<tokio::task::Id, BatchLine>,
    pending: &mut VecDeque<BatchLine>,
    results: &mut Vec<OutputLine>,
) {
    match joined {
        Ok((id, output)) => {
            flying.remove(&id);
            results.push(output);
        }
        Err(e) => {
            if let Some(line) = flying.remove(&e.id()) {
                if e.is_panic() {
                    tracing::error!(line = line.line, "a batch line's task panicked: it runs again");
                }
                pending.push_back(line);
            }
        }
    }
}

/// Journals `results` (flushed to disk) and counts them.
async fn record(
    journal: &mut Option<Journal>,
    path: &std::path::Path,
    batch: &mut Batch,
    results: Vec<OutputLine>,
) -> Result<(), RunnerError> {
    if results.is_empty() {
        return Ok(());
    }
    let io = |source| RunnerError::Journal { path: path.to_owned(), source };
    let Some(mut open) = journal.take() else { return Err(io(std::io::Error::other("the journal is closed"))) };
    let (open, results, written) = tokio::task::spawn_blocking(move || {
        let written = open.append(&results);
        (open, results, written)
    })
    .await?;
    *journal = Some(open);
    written.map_err(io)?;
    for line in &results {
        let outcome = if line.succeeded() { "completed" } else { "failed" };
        metrics::counter!(m::BATCH_LINES_TOTAL, "outcome" => outcome).increment(1);
        if line.succeeded() {
            batch.request_counts.completed += 1;
        } else {
            batch.request_counts.failed += 1;
        }
    }
    Ok(())
}

/// A permit of a semaphore of its own: [`crate::completions::run`] holds one of the direct
/// requests' in-flight limit; a batch line is bounded by its runner slot instead.
fn own_permit() -> Option<OwnedSemaphorePermit> {
    Arc::new(Semaphore::new(1)).try_acquire_owned().ok()
}

/// One line through the endpoint's own preparation and answer, at batch priority: the response a
/// direct request would get. Tried again while the cluster is busy or unavailable.
async fn run_line(
    state: Arc<AppState>,
    line: BatchLine,
    request_id: String,
    _slot: OwnedSemaphorePermit,
) -> OutputLine {
    let mut attempt = 0u32;
    let mut server_errors = 0u32;
    loop {
        let prepared = match &line.request {
            LineRequest::Chat(r) => crate::server::prepare_chat(&state, request_id.clone(), (**r).clone()).await,
            LineRequest::Completion(r) => {
                crate::server::prepare_completion(&state, request_id.clone(), (**r).clone()).await
            }
        };
        let response = match (prepared, own_permit()) {
            (Ok(mut prepared), Some(permit)) => {
                prepared.priority = BATCH_PRIORITY;
                crate::completions::run(state.clone(), prepared, permit).await
            }
            (Ok(_), None) => crate::errors::ApiError::internal("no permit for a batch line").into_response(),
            (Err(e), _) => e.into_response(),
        };
        let status = response.status().as_u16();
        let retry = match status {
            429 | 503 => true,
            500..=599 => {
                server_errors += 1;
                server_errors <= SERVER_ERROR_RETRIES
            }
            _ => false,
        };
        if retry {
            attempt += 1;
            metrics::counter!(m::BATCH_LINE_RETRIES_TOTAL).increment(1);
            let backoff = Duration::from_millis(100u64 << attempt.min(6)).min(Duration::from_secs(5));
            tracing::debug!(status, attempt, "the cluster could not take the line now; trying again");
            tokio::time::sleep(backoff).await;
            continue;
        }
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        let body = body.ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_else(|| {
            serde_json::json!({"error": {"message": "the response body could not be read", "type": "server_error",
                "param": null, "code": null}})
        });
        return OutputLine {
            id: new_id("batch_req"),
            custom_id: line.custom_id,
            response: Some(LineResponse { status_code: status, request_id, body }),
            error: None,
        };
    }
}

/// Writes the output and error files from the journal, and the batch's terminal status. The files'
/// ids are chosen and saved with the job first, so that doing this again after a crash rewrites the
/// same files.
async fn finalize(
    batches: &Arc<Batches>,
    mut batch: Batch,
    outcome: Outcome,
    cancel_requested: Option<u64>,
) -> Result<(), RunnerError> {
    match outcome {
        Outcome::Done if batch.status == Status::InProgress => batch.advance(Status::Finalizing)?,
        Outcome::Cancelled if batch.status != Status::Cancelling => {
            batch.advance(Status::Cancelling)?;
            batch.cancelling_at = cancel_requested.or(batch.cancelling_at);
        }
        _ => {}
    }
    let batch = blocking(batches, move |b| {
        let path = b.jobs.journal_path(&batch.id);
        let lines = if path.exists() {
            Journal::open(&path).map_err(|source| RunnerError::Journal { path: path.clone(), source })?.1
        } else {
            Vec::new()
        };
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        for line in &lines {
            let target = if line.succeeded() { &mut output } else { &mut errors };
            serde_json::to_writer(&mut *target, line)
                .map_err(|e| RunnerError::Journal { path: path.clone(), source: e.into() })?;
            target.push(b'\n');
        }
        let completed = lines.iter().filter(|l| l.succeeded()).count() as u64;
        batch.request_counts.completed = completed;
        batch.request_counts.failed = lines.len() as u64 - completed;
        let output_id = batch.output_file_id.get_or_insert_with(|| new_id("file")).clone();
        let error_id = (!errors.is_empty()).then(|| batch.error_file_id.get_or_insert_with(|| new_id("file")).clone());
        b.jobs.save(&batch)?;
        b.files.write(&output_id, &format!("{}_output.jsonl", batch.id), PURPOSE_BATCH_OUTPUT, &output)?;
        if let Some(error_id) = error_id {
            b.files.write(&error_id, &format!("{}_error.jsonl", batch.id), PURPOSE_BATCH_OUTPUT, &errors)?;
        }
        batch.advance(match outcome {
            Outcome::Done => Status::Completed,
            Outcome::Cancelled => Status::Cancelled,
            Outcome::Expired => Status::Expired,
        })?;
        b.jobs.save(&batch)?;
        Ok(batch)
    })
    .await?;
    tracing::info!(
        status = ?batch.status,
        completed = batch.request_counts.completed,
        failed = batch.request_counts.failed,
        "batch finished"
    );
    Ok(())
}
