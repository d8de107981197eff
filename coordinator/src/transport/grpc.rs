//! The `grpc` transport: one `ExpertService.Exchange` stream per worker, many exchanges in flight on
//! each, matched by id. An MoE layer's rows are split by the worker hosting their expert, all
//! workers' requests leave before any answer is awaited, and the combine waits for every answer or
//! the deadline, whichever comes first. A worker whose stream ends fails its exchanges in flight and
//! every later one at once, with the reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use epserve_model::{ExpertBatch, ExpertsInFlight, TextConfig};
use epserve_proto::exchange::{Exchange, RowGroup};
use epserve_proto::metric_names as m;
use epserve_proto::v1::expert_service_client::ExpertServiceClient;
use epserve_proto::v1::{ExchangeRequest, ExchangeResponse, StatusRequest};
use epserve_proto::wire::WireDtype;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::errors::TransportError;
use crate::placement::Placement;

#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// `host:port` (or `http://host:port`) of every worker.
    pub workers: Vec<String>,
    pub wire: WireDtype,
    /// Deadline of every exchange, from send to answer.
    pub exchange_timeout: Duration,
    pub connect_timeout: Duration,
}

impl GrpcConfig {
    pub fn new(workers: Vec<String>) -> Self {
        GrpcConfig {
            workers,
            wire: WireDtype::Bf16,
            exchange_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

type Reply = Result<ExchangeResponse, TransportError>;

/// One worker's stream: the sender side of its requests and the exchanges awaiting an answer.
#[derive(Debug)]
struct WorkerLink {
    addr: String,
    requests: mpsc::Sender<ExchangeRequest>,
    pending: Arc<Mutex<Pending>>,
}

#[derive(Debug, Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set when the stream ended: why, so that later exchanges fail at once with the reason.
    dead: Option<String>,
}

#[derive(Debug)]
pub struct GrpcExperts {
    links: Vec<WorkerLink>,
    placement: Placement,
    hidden: usize,
    dtype: DType,
    wire: WireDtype,
    timeout: Duration,
    next_id: AtomicU64,
    runtime: Handle,
}

fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, TransportError> {
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let unavailable = |reason: String| TransportError::Unavailable { worker: addr.to_owned(), reason };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| unavailable(format!("bad address: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

impl GrpcExperts {
    /// Connects to every worker, builds the placement from what they host, refuses to start if an
    /// expert has no host or a worker serves another model, and opens the exchange streams.
    /// Must run inside the tokio runtime that will carry the streams.
    pub async fn connect(cfg: &GrpcConfig, model: &TextConfig, dtype: DType) -> Result<Self, TransportError> {
        if cfg.workers.is_empty() {
            return Err(TransportError::Placement("no expert worker address given".into()));
        }
        let mut clients = Vec::with_capacity(cfg.workers.len());
        let mut hosted = Vec::with_capacity(cfg.workers.len());
        for addr in &cfg.workers {
            let unavailable = |reason: String| TransportError::Unavailable { worker: addr.clone(), reason };
            let channel: Channel =
                endpoint(addr, cfg.connect_timeout)?.connect().await.map_err(|e| unavailable(format!("{e:?}")))?;
            let mut client = ExpertServiceClient::new(channel)
                .max_decoding_message_size(epserve_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(epserve_proto::MAX_MESSAGE_BYTES);
            let status = client.status(StatusRequest {}).await.map_err(|e| unavailable(e.to_string()))?.into_inner();
            if (status.hidden as usize, status.num_layers as usize, status.num_experts as usize)
                != (model.hidden_size, model.num_hidden_layers, model.num_local_experts)
            {
                return Err(TransportError::Placement(format!(
                    "worker {addr} serves a model with hidden {}, {} layers, {} experts; this one has {}, {}, {}",
                    status.hidden,
                    status.num_layers,
                    status.num_experts,
                    model.hidden_size,
                    model.num_hidden_layers,
                    model.num_local_experts
                )));
            }
            tracing::info!(
                worker = %addr,
                resident_mib = status.resident_bytes as f64 / 1048576.0,
                "worker hosts experts {:?}",
                status.layers.first().map(|l| &l.experts)
            );
            hosted.push(status.layers.iter().map(|l| (l.layer as usize, l.experts.clone())).collect::<Vec<_>>());
            clients.push(client);
        }
        let placement = Placement::from_hosted(model, &hosted);
        placement.check_complete(model)?;

        let mut links = Vec::with_capacity(clients.len());
        for (client, addr) in clients.into_iter().zip(&cfg.workers) {
            links.push(open_stream(client, addr.clone()).await?);
        }
        Ok(GrpcExperts {
            links,
            placement,
            hidden: model.hidden_size,
            dtype,
            wire: cfg.wire,
            timeout: cfg.exchange_timeout,
            next_id: AtomicU64::new(1),
            runtime: Handle::current(),
        })
    }

    pub fn workers(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|l| l.addr.as_str())
    }

    /// Splits the batch by worker and sends every part. Called from a compute thread, never from
    /// inside the runtime.
    pub fn submit(&self, batch: ExpertBatch) -> epserve_model::Result<Box<dyn ExpertsInFlight + '_>> {
        let hidden = self.hidden;
        let rows = batch.rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if rows.len() != batch.total_rows() * hidden {
            return Err(epserve_model::Error::Experts {
                layer: batch.layer,
                reason: format!("{} values for {} rows of {hidden}", rows.len(), batch.total_rows()),
            });
        }
        // Per worker: its groups in batch order, and where each group's rows sit in the batch.
        let mut parts: Vec<(usize, Vec<RowGroup>, Vec<std::ops::Range<usize>>)> = Vec::new();
        let mut offset = 0;
        for g in &batch.groups {
            let n = g.rows as usize;
            let worker =
                self.placement.worker_for(batch.layer, g.expert).ok_or_else(|| epserve_model::Error::Experts {
                    layer: batch.layer,
                    reason: format!("no worker hosts expert {}", g.expert),
                })?;
            let part = match parts.iter().position(|p| p.0 == worker) {
                Some(i) => &mut parts[i],
                None => {
                    parts.push((worker, Vec::new(), Vec::new()));
                    parts.last_mut().ok_or_else(|| epserve_model::Error::Input("empty parts".into()))?
                }
            };
            part.1.push(RowGroup { expert: g.expert, rows: g.rows });
            part.2.push(offset..offset + n);
            offset += n;
        }

        let deadline = Instant::now() + self.timeout;
        let mut in_flight = Vec::with_capacity(parts.len());
        for (worker, groups, ranges) in parts {
            let link = &self.links[worker];
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut values = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum::<usize>() * hidden);
            for r in &ranges {
                values.extend_from_slice(&rows[r.start * hidden..r.end * hidden]);
            }
            let payload = self.wire.encode(&values);
            metrics::counter!(m::EXCHANGE_SENT_BYTES_TOTAL, "worker" => link.addr.clone())
                .increment(payload.len() as u64);
            let request = Exchange {
                id,
                step: 0,
                layer: batch.layer as u32,
                micro_batch: 0,
                groups,
                dtype: self.wire,
                hidden,
                payload,
            }
            .into_proto();
            let (tx, rx) = oneshot::channel();
            {
                let mut pending = lock(&link.pending);
                if let Some(reason) = &pending.dead {
                    return Err(self.fail(
                        link,
                        TransportError::Unavailable { worker: link.addr.clone(), reason: reason.clone() },
                    ));
                }
                pending.waiting.insert(id, tx);
            }
            if link.requests.blocking_send(request).is_err() {
                lock(&link.pending).waiting.remove(&id);
                let reason = "its exchange stream is closed".to_owned();
                return Err(self.fail(link, TransportError::Unavailable { worker: link.addr.clone(), reason }));
            }
            in_flight.push(Part { worker, id, ranges, reply: rx, sent: Instant::now() });
        }
        Ok(Box::new(GrpcInFlight { experts: self, parts: in_flight, layer: batch.layer, total_rows: offset, deadline }))
    }

    fn fail(&self, link: &WorkerLink, e: TransportError) -> epserve_model::Error {
        metrics::counter!(m::EXCHANGE_ERRORS_TOTAL, "worker" => link.addr.clone(), "kind" => e.kind()).increment(1);
        e.into()
    }
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // A panic while holding this lock leaves the map consistent (single inserts/removes).
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens the worker's exchange stream and spawns the task that matches answers to exchanges.
async fn open_stream(mut client: ExpertServiceClient<Channel>, addr: String) -> Result<WorkerLink, TransportError> {
    let (tx, rx) = mpsc::channel::<ExchangeRequest>(1024);
    let response = client
        .exchange(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| TransportError::Unavailable { worker: addr.clone(), reason: e.to_string() })?;
    let mut inbound = response.into_inner();
    let pending = Arc::new(Mutex::new(Pending::default()));
    let reader_pending = pending.clone();
    let reader_addr = addr.clone();
    tokio::spawn(async move {
        let reason = loop {
            match inbound.message().await {
                Ok(Some(answer)) => {
                    if let Some(tx) = lock(&reader_pending).waiting.remove(&answer.id) {
                        let _ = tx.send(Ok(answer));
                    }
                }
                Ok(None) => break "the worker closed its exchange stream".to_owned(),
                Err(status) => break format!("exchange stream failed: {}", status.message()),
            }
        };
        tracing::error!(worker = %reader_addr, "expert worker lost: {reason}");
        let mut p = lock(&reader_pending);
        p.dead = Some(reason.clone());
        for (_, tx) in p.waiting.drain() {
            let _ = tx.send(Err(TransportError::Unavailable { worker: reader_addr.clone(), reason: reason.clone() }));
        }
    });
    Ok(WorkerLink { addr, requests: tx, pending })
}

struct Part {
    worker: usize,
    id: u64,
    ranges: Vec<std::ops::Range<usize>>,
    reply: oneshot::Receiver<Reply>,
    sent: Instant,
}

struct GrpcInFlight<'a> {
    experts: &'a GrpcExperts,
    parts: Vec<Part>,
    layer: usize,
    total_rows: usize,
    deadline: Instant,
}

impl ExpertsInFlight for GrpcInFlight<'_> {
    fn wait(self: Box<Self>) -> epserve_model::Result<Tensor> {
        let GrpcInFlight { experts, parts, layer, total_rows, deadline } = *self;
        let hidden = experts.hidden;
        let mut out = vec![0f32; total_rows * hidden];
        let mut decoded = Vec::new();
        for part in parts {
            let link = &experts.links[part.worker];
            let waited = experts.runtime.block_on(async { tokio::time::timeout_at(deadline.into(), part.reply).await });
            let answer = match waited {
                Err(_) => {
                    lock(&link.pending).waiting.remove(&part.id);
                    return Err(experts.fail(
                        link,
                        TransportError::Deadline {
                            worker: link.addr.clone(),
                            exchange: part.id,
                            layer,
                            deadline: experts.timeout,
                        },
                    ));
                }
                Ok(Err(_)) => {
                    let reason = "the answer channel closed".to_owned();
                    return Err(experts.fail(link, TransportError::Unavailable { worker: link.addr.clone(), reason }));
                }
                Ok(Ok(Err(e))) => return Err(experts.fail(link, e)),
                Ok(Ok(Ok(answer))) => answer,
            };
            metrics::histogram!(m::EXCHANGE_LATENCY_SECONDS, "worker" => link.addr.clone())
                .record(part.sent.elapsed().as_secs_f64());
            metrics::counter!(m::EXCHANGE_RECEIVED_BYTES_TOTAL, "worker" => link.addr.clone())
                .increment(answer.payload.len() as u64);
            if answer.code != tonic::Code::Ok as i32 {
                return Err(experts.fail(
                    link,
                    TransportError::Rejected {
                        worker: link.addr.clone(),
                        exchange: part.id,
                        code: tonic::Code::from_i32(answer.code),
                        message: answer.message,
                    },
                ));
            }
            let rows: usize = part.ranges.iter().map(|r| r.len()).sum();
            let wire = WireDtype::from_proto(answer.dtype).unwrap_or(experts.wire);
            if answer.payload.len() != rows * hidden * wire.size() {
                return Err(experts.fail(
                    link,
                    TransportError::Rejected {
                        worker: link.addr.clone(),
                        exchange: part.id,
                        code: tonic::Code::DataLoss,
                        message: format!("answered {} bytes for {rows} rows", answer.payload.len()),
                    },
                ));
            }
            wire.decode_into(&answer.payload, &mut decoded);
            let mut at = 0;
            for r in &part.ranges {
                let n = r.len() * hidden;
                out[r.start * hidden..r.end * hidden].copy_from_slice(&decoded[at..at + n]);
                at += n;
            }
        }
        Ok(Tensor::from_vec(out, (total_rows, hidden), &Device::Cpu)?.to_dtype(experts.dtype)?)
    }
}
