//! `epserve batch submit FILE.jsonl`: uploads a file of requests to the Batch API, creates a batch
//! from it and, with `--wait`, follows it with a progress bar until it ends. Also the gateway's
//! Batch API flags ([`BatchArgs`]), which `epserve up` passes on to its gateway.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use epserve_gateway::batch::{Batch, BatchConfig, FileObject, Status};
use serde::Deserialize;

/// The Batch API's data directory and limits (docs/gateway.md, "Batch"; docs/operations.md).
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Where files, batch jobs and their progress are kept; in a cluster, a volume every gateway
    /// mounts. Default: `$XDG_DATA_HOME/epserve`, else `~/.local/share/epserve`.
    #[arg(long, env = "EPSERVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Largest batch input file, in bytes (413 past it; OpenAI's limit).
    #[arg(long, default_value_t = epserve_gateway::batch::MAX_INPUT_BYTES, env = "EPSERVE_BATCH_MAX_FILE_BYTES")]
    pub batch_max_file_bytes: usize,
    /// Batch lines in flight per healthy coordinator, all batches together.
    #[arg(long, default_value_t = 64, env = "EPSERVE_BATCH_LINES_PER_COORDINATOR")]
    pub batch_lines_per_coordinator: usize,
}

impl BatchArgs {
    /// The data directory: `--data-dir`, else the user's data directory.
    pub fn data_dir(&self) -> Result<PathBuf> {
        self.data_dir
            .clone()
            .or_else(|| {
                std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()).map(|d| PathBuf::from(d).join("epserve"))
            })
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".local/share/epserve")))
            .context("no --data-dir, and neither XDG_DATA_HOME nor HOME is set to find the user's data directory")
    }

    pub fn config(&self) -> Result<BatchConfig> {
        if self.batch_max_file_bytes == 0 || self.batch_lines_per_coordinator == 0 {
            bail!("--batch-max-file-bytes and --batch-lines-per-coordinator must be positive");
        }
        Ok(BatchConfig {
            data_dir: self.data_dir()?,
            max_file_bytes: self.batch_max_file_bytes,
            lines_per_coordinator: self.batch_lines_per_coordinator,
        })
    }

    /// The same settings for a child `epserve gateway` (which resolves the default data directory
    /// itself, from the same environment, and treats it as the default).
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(dir) = &self.data_dir {
            flags.extend(["--data-dir".into(), dir.display().to_string()]);
        }
        flags.extend([
            "--batch-max-file-bytes".into(),
            self.batch_max_file_bytes.to_string(),
            "--batch-lines-per-coordinator".into(),
            self.batch_lines_per_coordinator.to_string(),
        ]);
        flags
    }

    /// Whether the gateway should serve the Batch API from `config`'s directory: always when the
    /// directory was given (`--data-dir`, `EPSERVE_DATA_DIR`: failing to use it is an error at
    /// start); with the default directory, only if it can be created and written, else the gateway
    /// serves without the Batch API (its endpoints answer 503 saying so) and warns, so that a
    /// read-only host without a volume still serves completions.
    pub fn usable(&self, config: &BatchConfig) -> bool {
        if self.data_dir.is_some() {
            return true;
        }
        let probe = std::fs::create_dir_all(&config.data_dir).and_then(|()| tempfile::tempfile_in(&config.data_dir));
        match probe {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    dir = %config.data_dir.display(),
                    error = %e,
                    "the default data directory cannot be written: serving without the Batch API (give --data-dir)"
                );
                false
            }
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BatchCommand {
    #[command(subcommand)]
    action: BatchAction,
}

#[derive(Debug, clap::Subcommand)]
enum BatchAction {
    /// Upload a JSONL file of requests and create a batch from it; prints the batch id.
    Submit(SubmitArgs),
}

#[derive(Debug, clap::Args)]
struct SubmitArgs {
    /// One request per line: `{"custom_id", "method": "POST", "url", "body"}`.
    file: PathBuf,
    /// The gateway.
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "EPSERVE_URL")]
    url: String,
    #[arg(long, env = "EPSERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The endpoint of every line; default: the first line's `url`.
    #[arg(long)]
    endpoint: Option<String>,
    /// Follow the batch with a progress bar until it ends; fail unless it completed.
    #[arg(long)]
    wait: bool,
    /// With `--wait`: write the output file here.
    #[arg(long, requires = "wait")]
    output: Option<PathBuf>,
    /// How often the batch is polled, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
}

/// How a status reads on the wire (`in_progress`, ...).
fn status_name(status: Status) -> String {
    serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// `POST /v1/batches`'s body.
#[derive(Debug, serde::Serialize)]
struct CreateBatch<'a> {
    input_file_id: &'a str,
    endpoint: &'a str,
    completion_window: &'a str,
}

/// OpenAI's error body, for the message of a refused call.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorMessage,
}

#[derive(Debug, Deserialize)]
struct ErrorMessage {
    message: String,
}

pub fn run(command: BatchCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match command.action {
        BatchAction::Submit(args) => runtime.block_on(submit(args)),
    }
}

/// The `url` of the first request in `contents`.
fn first_url(contents: &[u8]) -> Result<String> {
    #[derive(Deserialize)]
    struct Line {
        url: String,
    }
    let text = std::str::from_utf8(contents).context("the file is not UTF-8")?;
    let line = text.lines().find(|l| !l.trim().is_empty()).context("the file has no requests")?;
    let line: Line = serde_json::from_str(line).context("the first line has no `url`; give --endpoint")?;
    Ok(line.url)
}

/// A multipart/form-data body with `purpose=batch` and the file: its content type and bytes.
fn form(filename: &str, contents: &[u8]) -> Result<(String, Vec<u8>)> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let boundary = format!("epserve-batch-{nanos:x}-{:x}", std::process::id());
    // A boundary that occurs in the file would cut it short.
    if contents.windows(boundary.len()).any(|w| w == boundary.as_bytes()) {
        bail!("the file contains this upload's multipart boundary ({boundary}); try again");
    }
    let mut body = Vec::with_capacity(contents.len() + 512);
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n").as_bytes(),
    );
    let filename = filename.replace(['"', '\r', '\n'], "_");
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(contents);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Ok((format!("multipart/form-data; boundary={boundary}"), body))
}

async fn submit(args: SubmitArgs) -> Result<()> {
    let contents = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let endpoint = match &args.endpoint {
        Some(e) => e.clone(),
        None => first_url(&contents)?,
    };
    let base = args.url.trim_end_matches('/').trim_end_matches("/v1").to_owned();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let auth = |r: reqwest::RequestBuilder| match &args.api_key {
        Some(key) => r.bearer_auth(key),
        None => r,
    };
    let filename = args.file.file_name().map_or("batch.jsonl".into(), |n| n.to_string_lossy().into_owned());
    let (content_type, body) = form(&filename, &contents)?;
    let file: FileObject = answer(
        auth(client.post(format!("{base}/v1/files")))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .context("uploading the file")?,
    )
    .await?;
    let request = CreateBatch { input_file_id: &file.id, endpoint: &endpoint, completion_window: "24h" };
    let batch: Batch = answer(
        auth(client.post(format!("{base}/v1/batches"))).json(&request).send().await.context("creating the batch")?,
    )
    .await?;
    println!("{}", batch.id);
    if !args.wait {
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:12} [{bar:40}] {pos}/{len} lines ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let batch = loop {
        let batch: Batch = answer(
            auth(client.get(format!("{base}/v1/batches/{}", batch.id))).send().await.context("polling the batch")?,
        )
        .await?;
        let c = &batch.request_counts;
        bar.set_length(c.total);
        bar.set_position(c.completed + c.failed);
        bar.set_message(status_name(batch.status));
        if batch.status.is_terminal() {
            bar.finish();
            break batch;
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms.max(50))).await;
    };
    let c = &batch.request_counts;
    eprintln!(
        "batch {} {}: {} of {} lines completed, {} failed; output file {}, error file {}",
        batch.id,
        status_name(batch.status),
        c.completed,
        c.total,
        c.failed,
        batch.output_file_id.as_deref().unwrap_or("none"),
        batch.error_file_id.as_deref().unwrap_or("none")
    );
    if let (Some(path), Some(id)) = (&args.output, &batch.output_file_id) {
        let response = auth(client.get(format!("{base}/v1/files/{id}/content"))).send().await?;
        if !response.status().is_success() {
            bail!("downloading the output file: HTTP {}", response.status());
        }
        std::fs::write(path, response.bytes().await?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("output written to {}", path.display());
    }
    match batch.status {
        Status::Completed => Ok(()),
        Status::Failed => {
            let errors = batch.errors.map(|e| e.data).unwrap_or_default();
            for error in &errors {
                eprintln!("  {} ({})", error.message, error.code);
            }
            bail!("the batch failed validation: {} errors", errors.len())
        }
        other => bail!("the batch ended {}", status_name(other)),
    }
}

/// The body of a successful answer, or the server's error message.
async fn answer<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T> {
    let status = response.status();
    let text = response.text().await.context("reading the answer")?;
    if !status.is_success() {
        let message = serde_json::from_str::<ErrorBody>(&text).map(|e| e.error.message).unwrap_or(text);
        bail!("HTTP {status}: {message}");
    }
    serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))
}
