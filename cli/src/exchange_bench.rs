//! `epserve exchange-bench`: round-trip latency of expert exchanges with one running worker, at
//! given row counts. Sequential round trips on one stream (one exchange in flight), so the figure is
//! the latency a decode step pays per MoE layer, not the throughput of a loaded worker.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use epserve_proto::exchange::{Exchange, RowGroup};
use epserve_proto::v1::StatusRequest;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::wire::WireDtype;
use serde_json::json;

use crate::load::WireArg;
use crate::stats::percentile;

#[derive(Debug, clap::Args)]
pub struct ExchangeBenchArgs {
    /// The worker (`host:port`).
    #[arg(long)]
    pub worker: String,
    /// Row counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,1024")]
    pub rows: Vec<u32>,
    /// Measured round trips per row count (after 20 warm-up ones).
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
    #[arg(long, value_enum, default_value = "bf16")]
    pub wire_dtype: WireArg,
    /// The identity the gRPC link is made with (mutual TLS).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

pub fn run(args: ExchangeBenchArgs) -> Result<()> {
    if args.iterations == 0 || args.rows.contains(&0) {
        bail!("--iterations and --rows must be positive");
    }
    let tls = args.tls.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let results = runtime.block_on(async {
        let uri = epserve_proto::server_uri(&args.worker);
        let endpoint = tonic::transport::Endpoint::from_shared(uri)?.tcp_nodelay(true);
        let channel = epserve_tls::connect(endpoint, tls.as_ref())
            .await
            .with_context(|| format!("connecting to {}", args.worker))?;
        let mut client = ExpertServiceClient::new(channel)
            .max_decoding_message_size(epserve_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(epserve_proto::MAX_MESSAGE_BYTES);
        let status = client.status(StatusRequest {}).await?.into_inner();
        let first = status.layers.first().context("the worker hosts no MoE layer")?;
        let (layer, expert) = (first.layer, *first.experts.first().context("the worker hosts no expert")?);
        let hidden = status.hidden as usize;
        let wire: WireDtype = args.wire_dtype.into();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut answers = client.exchange(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let mut results = Vec::new();
        let mut id = 0u64;
        for &rows in &args.rows {
            let values: Vec<f32> = (0..rows as usize * hidden).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
            let payload = wire.encode(&values, hidden);
            let mut samples = Vec::with_capacity(args.iterations);
            let mut compute = Duration::ZERO;
            for i in 0..args.iterations + 20 {
                id += 1;
                let request = Exchange {
                    id,
                    step: i as u64,
                    layer,
                    micro_batch: 0,
                    groups: vec![RowGroup { expert, rows }],
                    dtype: wire,
                    hidden,
                    payload: payload.clone(),
                };
                let started = Instant::now();
                tx.send(request.into_proto()).await.context("stream closed")?;
                let answer = answers.message().await?.context("the worker closed the stream")?;
                let elapsed = started.elapsed();
                if answer.code != 0 {
                    bail!("the worker rejected the exchange: {}", answer.message);
                }
                if i >= 20 {
                    samples.push(elapsed);
                    compute += Duration::from_micros(answer.compute_micros);
                }
            }
            samples.sort();
            let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
            let micros = |d: Duration| d.as_secs_f64() * 1e6;
            // `--iterations` is positive: there are samples.
            let percentile = |p| percentile(&samples, p).unwrap_or_default();
            tracing::info!(rows, "p50 {:.0} µs, p99 {:.0} µs", micros(percentile(50.0)), micros(percentile(99.0)));
            results.push(json!({
                "rows": rows,
                "hidden": hidden,
                "wire": wire.to_string(),
                "request_bytes": payload.len(),
                "iterations": samples.len(),
                "p50_us": micros(percentile(50.0)),
                "p90_us": micros(percentile(90.0)),
                "p99_us": micros(percentile(99.0)),
                "mean_us": micros(mean),
                "worker_compute_mean_us": micros(compute / samples.len() as u32),
            }));
        }
        anyhow::Ok(results)
    })?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}
