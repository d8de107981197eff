//! `/v1/batches`: create, retrieve, list, cancel, in OpenAI's shapes. Any gateway with the data
//! directory serves these; the runner ([`super::runner`]) does the work. A cancel is a marker next
//! to the job ([`super::JobStore::request_cancel`]), so that only the runner writes the job.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::files::PURPOSE_BATCH;
use super::files_api::Page;
use super::job::{COMPLETION_WINDOW, JobStoreError};
use super::{Batch, Endpoint, Status, batches_of, conflict, store_error};
use crate::errors::ApiError;
use crate::server::AppState;

/// OpenAI's limits on `metadata`: 16 pairs, keys of 64 characters, string values of 512.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

fn check_metadata(metadata: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    if metadata.len() > METADATA_PAIRS {
        return Err(ApiError::invalid_param("metadata", format!("At most {METADATA_PAIRS} metadata pairs.")));
    }
    for (key, value) in metadata {
        let fits = key.chars().count() <= METADATA_KEY_CHARS
            && value.as_str().is_some_and(|v| v.chars().count() <= METADATA_VALUE_CHARS);
        if !fits {
            return Err(ApiError::invalid_param(
                &format!("metadata.{key}"),
                format!(
                    "Metadata keys are strings of at most {METADATA_KEY_CHARS} characters, values strings of at most \
                     {METADATA_VALUE_CHARS}."
                ),
            ));
        }
    }
    Ok(())
}

/// `POST /v1/batches`.
pub async fn create(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let batches = batches_of(&state)?.clone();
        let r: CreateBatch = crate::server::read_request(&state, &headers, body).await?;
        let endpoint = Endpoint::from_url(&r.endpoint).ok_or_else(|| {
            ApiError::invalid_param(
                "endpoint",
                format!("endpoint '{}' is not supported: use /v1/chat/completions or /v1/completions.", r.endpoint),
            )
        })?;
        if r.completion_window != COMPLETION_WINDOW {
            return Err(ApiError::invalid_param(
                "completion_window",
                format!("completion_window must be '{COMPLETION_WINDOW}' (got '{}').", r.completion_window),
            ));
        }
        if let Some(metadata) = &r.metadata {
            check_metadata(metadata)?;
        }
        let file_id = r.input_file_id.clone();
        let file = batches.blocking(move |b| b.files.get(&file_id)).await?.map_err(|e| match e {
            super::StoreError::NotFound(id) => {
                ApiError::invalid_param("input_file_id", format!("No file found with id '{id}'."))
            }
            e => store_error("file", e),
        })?;
        if file.purpose != PURPOSE_BATCH {
            return Err(ApiError::invalid_param(
                "input_file_id",
                format!(
                    "File {} has purpose '{}'; a batch reads a file uploaded with purpose 'batch'.",
                    file.id, file.purpose
                ),
            ));
        }
        let batch = Batch::new(&r.input_file_id, endpoint, r.metadata);
        let stored = batch.clone();
        batches.blocking(move |b| b.jobs.save(&stored)).await?.map_err(|e| store_error("batch", e))?;
        batches.changed.notify_one();
        tracing::info!(batch = %batch.id, file = %batch.input_file_id, endpoint = endpoint.as_str(), "batch created");
        Ok(batch)
    };
    match result.await {
        Ok(batch) => Json(batch).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The batch as clients see it: one whose cancel was asked and that the runner has not reached yet
/// is `cancelling` already.
pub(crate) fn with_cancel(mut batch: Batch, cancel_requested: Option<u64>) -> Batch {
    if let Some(at) = cancel_requested
        && !batch.status.is_terminal()
        && batch.status != Status::Cancelling
    {
        batch.status = Status::Cancelling;
        batch.cancelling_at = Some(at);
    }
    batch
}

/// `GET /v1/batches/{id}`.
pub async fn retrieve(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let result = async {
        batches_of(&state)?
            .blocking(move |b| Ok::<_, JobStoreError>(with_cancel(b.jobs.get(&id)?, b.jobs.cancel_requested(&id))))
            .await?
            .map_err(|e| store_error("batch", e))
    };
    match result.await {
        Ok(batch) => Json(batch).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListBatches {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/batches`: newest first, `limit` 1–100 (default 20), `after` a batch id.
pub async fn list(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ListBatches>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::invalid(None, e.body_text()))?;
        let limit = q.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::invalid_param("limit", "limit must be between 1 and 100."));
        }
        let after = q.after.clone();
        let (jobs, has_more) = batches_of(&state)?
            .blocking(move |b| {
                let (jobs, more) = b.jobs.page(after.as_deref(), limit)?;
                let jobs = jobs.into_iter().map(|j| {
                    let cancel = b.jobs.cancel_requested(&j.id);
                    with_cancel(j, cancel)
                });
                Ok::<_, JobStoreError>((jobs.collect::<Vec<_>>(), more))
            })
            .await?
            .map_err(|e| match e {
                JobStoreError::NotFound(id) => {
                    ApiError::invalid_param("after", format!("No batch with id '{id}' is in this list."))
                }
                e => store_error("batch", e),
            })?;
        Ok(Page::new(jobs, has_more, |b: &Batch| b.id.as_str()))
    };
    match result.await {
        Ok(page) => Json(page).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/batches/{id}/cancel`: the batch goes `cancelling`, then `cancelled` once the runner
/// has stopped its lines in flight and written the output of the finished ones. 409 for a batch
/// that has ended.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let result = async {
        let batches = batches_of(&state)?.clone();
        let lookup = id.clone();
        let batch = batches
            .blocking(move |b| {
                let batch = b.jobs.get(&lookup)?;
                if batch.status.is_terminal() {
                    return Ok(Err(batch));
                }
                let at = b.jobs.request_cancel(&lookup)?;
                Ok::<_, JobStoreError>(Ok(with_cancel(batch, Some(at))))
            })
            .await?
            .map_err(|e| store_error("batch", e))?;
        match batch {
            Err(batch) => Err(conflict(format!(
                "Batch {id} has status '{}' and cannot be cancelled.",
                serde_json::to_value(batch.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
            ))),
            Ok(batch) => {
                batches.changed.notify_one();
                tracing::info!(batch = %id, "batch cancel requested");
                Ok(batch)
            }
        }
    };
    match result.await {
        Ok(batch) => Json(batch).into_response(),
        Err(e) => e.into_response(),
    }
}
