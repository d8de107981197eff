//! `/v1/files`: upload (multipart), list, retrieve, content, delete, in OpenAI's shapes.
//!
//! Uploads are for batches (`purpose: "batch"`): at most `--batch-max-file-bytes` (413 past it) and
//! [`MAX_INPUT_LINES`] lines (400); `batch_output` files are written by the runner only. A file is
//! kept until it is deleted; one that an unfinished batch reads cannot be deleted (409).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::files::{FileObject, PURPOSE_BATCH};
use super::{Batches, MAX_INPUT_LINES, batches_of, conflict, file_too_large, store_error};
use crate::errors::ApiError;
use crate::server::AppState;

/// An upload must arrive whole within this time (the body timeout of other requests is far
/// shorter: 200 MB take a while on a slow link).
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A page of a list (`GET /v1/files`, `GET /v1/batches`).
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T> Page<T> {
    pub fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> &str) -> Self {
        let first_id = data.first().map(|i| id(i).to_owned());
        let last_id = data.last().map(|i| id(i).to_owned());
        Page { object: "list", data, first_id, last_id, has_more }
    }
}

/// `DELETE /v1/files/{id}`'s answer.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// `POST /v1/files`.
pub async fn upload(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let batches = batches_of(&state)?.clone();
        tokio::time::timeout(UPLOAD_TIMEOUT, receive(batches, &headers, body))
            .await
            .map_err(|_| ApiError::body_timeout(UPLOAD_TIMEOUT))?
    };
    match result.await {
        Ok(file) => Json(file).into_response(),
        Err(e) => e.into_response(),
    }
}

fn malformed(e: multer::Error) -> ApiError {
    ApiError::invalid(None, format!("The multipart body is malformed: {e}"))
}

async fn receive(batches: Arc<Batches>, headers: &HeaderMap, body: Body) -> Result<FileObject, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::invalid(None, format!("Upload files as multipart/form-data (got content type '{content_type}')."))
    })?;
    let limit = batches.config.max_file_bytes;
    let mut form = multer::Multipart::new(body.into_data_stream(), boundary);
    let (mut purpose, mut file) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(malformed)? {
        match field.name() {
            Some("purpose") => purpose = Some(small_text(&mut field).await?),
            Some("file") => {
                if file.is_some() {
                    return Err(ApiError::invalid_param("file", "Send one file per upload."));
                }
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let mut content = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    if content.len() + chunk.len() > limit {
                        return Err(file_too_large(limit));
                    }
                    content.extend_from_slice(&chunk);
                }
                file = Some((filename, content));
            }
            _ => {} // Other parts are ignored, as OpenAI does.
        }
    }
    match purpose.as_deref() {
        Some(PURPOSE_BATCH) => {}
        Some(other) => {
            return Err(ApiError::invalid_param(
                "purpose",
                format!(
                    "purpose '{other}' is not supported here: upload with purpose 'batch' (batch_output files are \
                     written by the server)."
                ),
            ));
        }
        None => return Err(ApiError::invalid_param("purpose", "The form has no 'purpose' field (use 'batch').")),
    }
    let Some((filename, content)) = file else {
        return Err(ApiError::invalid_param("file", "The form has no 'file' part."));
    };
    let lines = content.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).count();
    if lines > MAX_INPUT_LINES {
        return Err(ApiError::invalid_param(
            "file",
            format!("The file has {lines} requests; a batch may have at most {MAX_INPUT_LINES}."),
        ));
    }
    let object = batches
        .blocking(move |b| b.files.create(&filename, PURPOSE_BATCH, &content))
        .await?
        .map_err(|e| store_error("file", e))?;
    tracing::info!(file = %object.id, bytes = object.bytes, "file uploaded");
    Ok(object)
}

/// A text part of the form, of at most 1 KiB.
async fn small_text(field: &mut multer::Field<'_>) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(malformed)? {
        text.extend_from_slice(&chunk);
        if text.len() > 1024 {
            return Err(ApiError::invalid(None, "A text field of the form is longer than 1 KiB."));
        }
    }
    String::from_utf8(text)
        .map(|t| t.trim().to_owned())
        .map_err(|_| ApiError::invalid(None, "A text field of the form is not UTF-8."))
}

#[derive(Debug, Deserialize)]
pub struct ListFiles {
    purpose: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    order: Option<String>,
}

/// `GET /v1/files`: newest first (or `order=asc`), `limit` 1–10,000 (default 10,000), `after` an id.
pub async fn list(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ListFiles>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let Query(q) = query.map_err(|e| ApiError::invalid(None, e.body_text()))?;
        let limit = q.limit.unwrap_or(10_000);
        if !(1..=10_000).contains(&limit) {
            return Err(ApiError::invalid_param("limit", "limit must be between 1 and 10000."));
        }
        let ascending = match q.order.as_deref() {
            None | Some("desc") => false,
            Some("asc") => true,
            Some(_) => return Err(ApiError::invalid_param("order", "order must be 'asc' or 'desc'.")),
        };
        let purpose = q.purpose.clone();
        let mut files = batches_of(&state)?
            .blocking(move |b| b.files.list(purpose.as_deref()))
            .await?
            .map_err(|e| store_error("file", e))?;
        if ascending {
            files.reverse();
        }
        let start = match &q.after {
            Some(after) => {
                files.iter().position(|f| &f.id == after).ok_or_else(|| {
                    ApiError::invalid_param("after", format!("No file with id '{after}' is in this list."))
                })? + 1
            }
            None => 0,
        };
        let has_more = files.len() > start + limit;
        let data = files.into_iter().skip(start).take(limit).collect();
        Ok(Page::new(data, has_more, |f: &FileObject| f.id.as_str()))
    };
    match result.await {
        Ok(page) => Json(page).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let result =
        async { batches_of(&state)?.blocking(move |b| b.files.get(&id)).await?.map_err(|e| store_error("file", e)) };
    match result.await {
        Ok(file) => Json(file).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/files/{id}/content`: the bytes.
pub async fn content(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let result = async {
        batches_of(&state)?.blocking(move |b| b.files.content(&id)).await?.map_err(|e| store_error("file", e))
    };
    match result.await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /v1/files/{id}`: refused (409) while an unfinished batch reads the file.
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let result = async {
        let batches = batches_of(&state)?;
        let lookup = id.clone();
        let reader = batches
            .blocking(move |b| {
                b.files.get(&lookup).map_err(|e| store_error("file", e))?;
                let jobs = b.jobs.all().map_err(|e| store_error("batch", e))?;
                Ok::<_, ApiError>(jobs.into_iter().find(|j| j.input_file_id == lookup && !j.status.is_terminal()))
            })
            .await??;
        if let Some(batch) = reader {
            return Err(conflict(format!(
                "File {id} is the input of batch {}, which has not finished; cancel it first.",
                batch.id
            )));
        }
        let lookup = id.clone();
        batches.blocking(move |b| b.files.delete(&lookup)).await?.map_err(|e| store_error("file", e))?;
        Ok(Deleted { id, object: "file", deleted: true })
    };
    match result.await {
        Ok(deleted) => Json(deleted).into_response(),
        Err(e) => e.into_response(),
    }
}
