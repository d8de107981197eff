//! `epserve gateway`: the OpenAI-compatible HTTP API in front of the coordinators.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use epserve_gateway::GatewayConfig;
use epserve_gateway::ImageConfig;
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
    pub control: JoinArgs,
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
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().thread_name("epserve-io").enable_all().build()?;
    runtime.block_on(async move {
        let gateway = epserve_gateway::start(config).await?;
        // The harnesses and `epserve up` read this line to learn the port.
        println!("listening on {}", gateway.local_addr());
        Ok(gateway.serve(crate::shutdown_signal()).await?)
    })
}
