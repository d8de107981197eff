//! `epserve gateway`: the OpenAI-compatible HTTP API in front of the coordinators.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use epserve_gateway::GatewayConfig;
use epserve_gateway::ImageConfig;
use epserve_gateway::edge::{ConnectionLimits, EdgeConfig, KeyLimits, RequestLimits};
use epserve_gateway::images::fetch::FetchConfig;

use crate::control::JoinArgs;

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Checkpoint directory: its tokenizer.json and chat template are used (no weights are read).
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// HTTP address; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8000", env = "EPSERVE_LISTEN")]
    pub listen: String,
    /// Coordinators (`host:port`, comma-separated); with `--registry`, found there instead.
    #[arg(long, value_delimiter = ',', env = "EPSERVE_COORDINATORS")]
    pub coordinators: Vec<String>,
    /// Accepted API keys (repeat the flag or separate with commas); none = no authentication.
    #[arg(long = "api-key", value_delimiter = ',', env = "EPSERVE_API_KEYS", hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// The model name clients use; default: the checkpoint directory's name.
    #[arg(long, env = "EPSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 8 << 20, env = "EPSERVE_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// Requests in flight at most; more are answered 429.
    #[arg(long, default_value_t = 1024, env = "EPSERVE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: usize,
    /// How often coordinators' health and load are polled, in milliseconds.
    #[arg(long, default_value_t = 500, env = "EPSERVE_HEALTH_INTERVAL_MS")]
    pub health_interval_ms: u64,
    #[command(flatten)]
    pub images: ImageArgs,
    #[command(flatten)]
    pub edge: EdgeArgs,
    #[command(flatten)]
    pub control: JoinArgs,
    /// The identity coordinator links are made with.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// The Files and Batches API's data directory and limits.
    #[command(flatten)]
    pub batch: crate::batch::BatchArgs,
    /// On SIGTERM/SIGINT: stop accepting, answer new requests 503, and let the requests in flight
    /// (streams included) finish for at most this long.
    #[arg(long, default_value_t = 30, env = "EPSERVE_SHUTDOWN_GRACE_SECONDS")]
    pub shutdown_grace_seconds: u64,
}

/// The HTTP edge's timeouts and limits (docs/security.md); `epserve up` passes them on to its gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeArgs {
    /// A connection must send a whole request head within this many milliseconds (also how long an
    /// idle keep-alive connection stays open); it is closed otherwise.
    #[arg(long, default_value_t = 10_000, env = "EPSERVE_HEADER_TIMEOUT_MS")]
    pub header_timeout_ms: u64,
    /// A request body must arrive whole within this many milliseconds (408 otherwise).
    #[arg(long, default_value_t = 30_000, env = "EPSERVE_BODY_TIMEOUT_MS")]
    pub body_timeout_ms: u64,
    /// HTTP connections open at once; more are closed as they are accepted.
    #[arg(long, default_value_t = 4096, env = "EPSERVE_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Completion requests per minute per API key (per client address without keys); 0 = no limit.
    #[arg(long, default_value_t = 0, env = "EPSERVE_RATE_LIMIT_PER_MINUTE")]
    pub rate_limit_per_minute: u32,
    /// Completion requests in flight per API key (per client address without keys); 0 = no limit.
    #[arg(long, default_value_t = 0, env = "EPSERVE_MAX_CONCURRENT_PER_KEY")]
    pub max_concurrent_per_key: u32,
    /// Characters of prompt text in one request (all chat messages together); checked before tokenizing.
    #[arg(long, default_value_t = 1 << 20, env = "EPSERVE_MAX_PROMPT_CHARS")]
    pub max_prompt_chars: usize,
    /// Messages in one chat request.
    #[arg(long, default_value_t = 2048, env = "EPSERVE_MAX_MESSAGES")]
    pub max_messages: usize,
    /// Characters in one stop string.
    #[arg(long, default_value_t = 1024, env = "EPSERVE_MAX_STOP_CHARS")]
    pub max_stop_chars: usize,
    /// A streaming response whose client reads nothing for this many milliseconds is cancelled.
    #[arg(long, default_value_t = 30_000, env = "EPSERVE_STREAM_STALL_TIMEOUT_MS")]
    pub stream_stall_timeout_ms: u64,
    /// Origins allowed to call the API from browsers (comma-separated, `*` for any); none = no CORS.
    #[arg(long = "cors-origin", value_delimiter = ',', env = "EPSERVE_CORS_ORIGINS")]
    pub cors_origins: Vec<String>,
    /// `GET /metrics` requires `Authorization: Bearer KEY` with this key; unset = open.
    #[arg(long, env = "EPSERVE_METRICS_KEY", hide_env_values = true)]
    pub metrics_key: Option<String>,
}

impl EdgeArgs {
    pub fn config(&self) -> Result<EdgeConfig> {
        let positive = [
            self.header_timeout_ms,
            self.body_timeout_ms,
            self.stream_stall_timeout_ms,
            self.max_connections as u64,
            self.max_prompt_chars as u64,
            self.max_messages as u64,
            self.max_stop_chars as u64,
        ];
        if positive.contains(&0) {
            bail!(
                "--header-timeout-ms, --body-timeout-ms, --stream-stall-timeout-ms, --max-connections, \
                 --max-prompt-chars, --max-messages and --max-stop-chars must be positive"
            );
        }
        Ok(EdgeConfig {
            connections: ConnectionLimits {
                header_timeout: Duration::from_millis(self.header_timeout_ms),
                max_connections: self.max_connections,
            },
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            keys: KeyLimits {
                requests_per_minute: self.rate_limit_per_minute,
                max_concurrent: self.max_concurrent_per_key,
            },
            requests: RequestLimits {
                max_prompt_chars: self.max_prompt_chars,
                max_messages: self.max_messages,
                max_stop_chars: self.max_stop_chars,
            },
            stream_stall_timeout: Duration::from_millis(self.stream_stall_timeout_ms),
            cors_origins: self.cors_origins.iter().map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect(),
            metrics_key: self.metrics_key.as_deref().map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned),
        })
    }

    /// The same flags for a child `epserve gateway`.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags: Vec<String> = [
            ("--header-timeout-ms", self.header_timeout_ms.to_string()),
            ("--body-timeout-ms", self.body_timeout_ms.to_string()),
            ("--max-connections", self.max_connections.to_string()),
            ("--rate-limit-per-minute", self.rate_limit_per_minute.to_string()),
            ("--max-concurrent-per-key", self.max_concurrent_per_key.to_string()),
            ("--max-prompt-chars", self.max_prompt_chars.to_string()),
            ("--max-messages", self.max_messages.to_string()),
            ("--max-stop-chars", self.max_stop_chars.to_string()),
            ("--stream-stall-timeout-ms", self.stream_stall_timeout_ms.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect();
        if !self.cors_origins.is_empty() {
            flags.extend(["--cors-origin".into(), self.cors_origins.join(",")]);
        }
        if let Some(key) = &self.metrics_key {
            flags.extend(["--metrics-key".into(), key.clone()]);
        }
        flags
    }
}

/// Image input limits and URL fetching; `epserve up` passes them on to its gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// Images in one chat request, all messages together.
    #[arg(long, default_value_t = 8, env = "EPSERVE_MAX_IMAGES_PER_REQUEST")]
    pub max_images_per_request: usize,
    /// Largest image, in bytes as sent (the decoded data URI, or the fetched body).
    #[arg(long, default_value_t = 20 << 20, env = "EPSERVE_MAX_IMAGE_BYTES")]
    pub max_image_bytes: usize,
    /// Largest image, in pixels (width × height), read from its header before it is decoded.
    #[arg(long, default_value_t = 50_000_000, env = "EPSERVE_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: u64,
    /// Fetch `http(s)://` image URLs (off: only `data:` URIs). Only public addresses are fetched.
    #[arg(long, env = "EPSERVE_IMAGE_FETCH")]
    pub image_fetch: bool,
    /// Seconds one image fetch may take in all (connection, redirects, body).
    #[arg(long, default_value_t = 10.0, env = "EPSERVE_IMAGE_FETCH_TIMEOUT")]
    pub image_fetch_timeout: f64,
    /// Also fetch from loopback, private, link-local and unique-local addresses (trusted networks only:
    /// this lets clients make the gateway reach internal services).
    #[arg(long, env = "EPSERVE_IMAGE_FETCH_ALLOW_PRIVATE")]
    pub image_fetch_allow_private: bool,
}

impl ImageArgs {
    pub fn config(&self) -> Result<ImageConfig> {
        if self.max_images_per_request == 0 || self.max_image_bytes == 0 || self.max_image_pixels == 0 {
            bail!("--max-images-per-request, --max-image-bytes and --max-image-pixels must be positive");
        }
        if !(self.image_fetch_timeout.is_finite() && self.image_fetch_timeout > 0.0) {
            bail!("--image-fetch-timeout must be a positive number of seconds");
        }
        if self.image_fetch_allow_private && !self.image_fetch {
            bail!("--image-fetch-allow-private only applies with --image-fetch");
        }
        let fetch = self.image_fetch.then(|| FetchConfig {
            timeout: Duration::from_secs_f64(self.image_fetch_timeout),
            allow_private: self.image_fetch_allow_private,
        });
        Ok(ImageConfig {
            max_images_per_request: self.max_images_per_request,
            max_image_bytes: self.max_image_bytes,
            max_image_pixels: self.max_image_pixels,
            fetch,
        })
    }

    /// The same flags for a child `epserve gateway`.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--max-images-per-request".into(),
            self.max_images_per_request.to_string(),
            "--max-image-bytes".into(),
            self.max_image_bytes.to_string(),
            "--max-image-pixels".into(),
            self.max_image_pixels.to_string(),
            "--image-fetch-timeout".into(),
            self.image_fetch_timeout.to_string(),
        ];
        if self.image_fetch {
            flags.push("--image-fetch".into());
        }
        if self.image_fetch_allow_private {
            flags.push("--image-fetch-allow-private".into());
        }
        flags
    }
}

pub fn run(args: GatewayArgs) -> Result<()> {
    if args.max_concurrent_requests == 0 {
        bail!("--max-concurrent-requests must be positive");
    }
    if args.coordinators.is_empty() && args.control.registry().is_none() {
        bail!("give --coordinators ADDR[,ADDR] or --registry etcd://HOST:PORT to find them");
    }
    let images = args.images.config()?;
    let edge = args.edge.config()?;
    let batch = args.batch.config()?;
    let batch = args.batch.usable(&batch).then_some(batch);
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let tls = args.tls.load()?;
    let control = args.control.connect()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let config = GatewayConfig {
        model: args.model,
        listen: args.listen,
        coordinators: args.coordinators,
        api_keys: args.api_keys.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect(),
        served_model_name: args.served_model_name,
        max_body_bytes: args.max_body_bytes,
        max_concurrent_requests: args.max_concurrent_requests,
        health_interval: Duration::from_millis(args.health_interval_ms),
        metrics: Some(metrics),
        control,
        images,
        edge,
        tls,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    runtime.block_on(async move {
        let mut gateway = epserve_gateway::start(config).await?.with_shutdown_grace(grace);
        if let Some(batch) = batch {
            gateway = gateway.with_batches(batch)?;
        }
        // The harnesses and `epserve up` read this line to learn the port.
        println!("listening on {}", gateway.local_addr());
        Ok(gateway.serve(crate::shutdown_signal()).await?)
    })
}
