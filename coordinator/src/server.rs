//! `CoordinatorService` over the engine: `Generate` streams a request's tokens, `Load` reports the
//! queue and the KV cache for the gateway's routing. A client that goes away cancels its request
//! (its blocks are freed at the next step). A request's grammar is compiled here, on the blocking
//! pool, before the engine sees it: one that does not compile is an `invalid_argument` with the reason.
//!
//! On shutdown the coordinator drains ([`serve_draining`]): not ready, new requests refused with
//! `UNAVAILABLE` (a gateway sends them to another coordinator), the running ones finish within the
//! grace period.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use epserve_grammar::{GrammarCompiler, GrammarSpec, TokenConstraint};

use epserve_imaging::Tiles;
use epserve_proto::metric_names as m;
use epserve_proto::v1::coordinator_service_server::{CoordinatorService, CoordinatorServiceServer};
use epserve_proto::v1::{
    self as pb, GenerateRequest, HealthRequest, HealthResponse, LoadRequest, LoadResponse, TokenEvent,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::{EVENT_BUFFER, EngineHandle, Event, FinishReason, SubmitError};
use crate::sampling::SamplingParams;

#[derive(Debug, Clone)]
pub struct Coordinator {
    engine: EngineHandle,
    /// Compiles request grammars against the checkpoint's vocabulary; why not, when the
    /// checkpoint has no readable `tokenizer.json`.
    grammars: Result<Arc<GrammarCompiler>, String>,
    /// Set when the coordinator drains: new requests and load polls are refused.
    draining: Arc<AtomicBool>,
    /// Served as `LoadBalancingService` on the same port, when the experts are on workers.
    balancing: Option<Arc<crate::rebalance::LoadBalancer>>,
}

impl Coordinator {
    /// `grammars`: as [`crate::run::grammar_compiler`] made it.
    pub fn new(engine: EngineHandle, grammars: Result<Arc<GrammarCompiler>, String>) -> Self {
        Coordinator { engine, grammars, draining: Arc::new(AtomicBool::new(false)), balancing: None }
    }

    /// Serves `balancer`'s `LoadBalancingService` beside this one.
    pub fn with_balancing(mut self, balancer: Option<Arc<crate::rebalance::LoadBalancer>>) -> Self {
        self.balancing = balancer;
        self
    }

    /// `UNAVAILABLE` once draining: the gateway then takes this coordinator out and sends the
    /// request to another one (nothing was streamed yet).
    fn admitting(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this coordinator is shutting down (draining)"));
        }
        Ok(())
    }

    /// The request's grammar compiled (or taken from the cache), on the blocking pool.
    async fn constraint(&self, constraint: Option<pb::Constraint>) -> Result<Option<TokenConstraint>, Status> {
        let Some(spec) = constraint.map(spec_from_proto).transpose()? else { return Ok(None) };
        let compiler = self.grammars.clone().map_err(|why| {
            Status::invalid_argument(format!("constraint: this coordinator cannot follow grammars: {why}"))
        })?;
        let compiled = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let cached = compiler.cached();
            let compiled = compiler.compile(&spec);
            if compiler.cached() != cached {
                metrics::histogram!(m::GRAMMAR_COMPILE_SECONDS).record(started.elapsed().as_secs_f64());
            }
            compiled
        })
        .await
        .map_err(|e| Status::internal(format!("compiling the grammar: {e}")))?;
        compiled.map(Some).map_err(|e| Status::invalid_argument(format!("constraint: {e}")))
    }

    pub fn into_service(self) -> CoordinatorServiceServer<Self> {
        CoordinatorServiceServer::new(self)
    }
}

fn sampling_from_proto(p: Option<pb::SamplingParams>) -> Result<SamplingParams, Status> {
    let p = p.ok_or_else(|| Status::invalid_argument("sampling parameters are required"))?;
    Ok(SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p.unwrap_or(1.0),
        top_k: p.top_k,
        min_p: p.min_p,
        seed: p.seed,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        max_tokens: p.max_tokens,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
    })
}

fn spec_from_proto(c: pb::Constraint) -> Result<GrammarSpec, Status> {
    match c.grammar {
        Some(pb::constraint::Grammar::JsonSchema(text)) => Ok(GrammarSpec::json_schema(text)),
        Some(pb::constraint::Grammar::Lark(text)) => Ok(GrammarSpec::lark(text)),
        None => Err(Status::invalid_argument("constraint: neither json_schema nor lark is set")),
    }
}

/// The request's images as tiles, each checked for a length that matches its grid.
fn images_from_proto(images: Vec<pb::ImageTiles>) -> Result<Vec<Tiles>, Status> {
    images
        .into_iter()
        .enumerate()
        .map(|(i, im)| {
            Tiles::from_parts(im.rows as usize, im.cols as usize, im.tile_size as usize, im.pixels.into())
                .map_err(|e| Status::invalid_argument(format!("images[{i}]: {e}")))
        })
        .collect()
}

fn to_event(event: Event) -> TokenEvent {
    match event {
        Event::Token(s) => TokenEvent {
            tokens: vec![pb::Token {
                id: s.token,
                logprob: s.logprob,
                top_logprobs: s.top.into_iter().map(|(token, logprob)| pb::TopLogprob { token, logprob }).collect(),
            }],
            ..Default::default()
        },
        Event::Finished { reason, usage, message } => TokenEvent {
            tokens: Vec::new(),
            finish_reason: match reason {
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Length => pb::FinishReason::Length,
                FinishReason::Error | FinishReason::Unavailable => pb::FinishReason::Error,
            } as i32,
            usage: Some(pb::Usage { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens }),
            error: message.unwrap_or_default(),
            unavailable: reason == FinishReason::Unavailable,
        },
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TokenEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorService for Coordinator {
    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<EventStream>, Status> {
        self.admitting()?;
        let r = request.into_inner();
        let span = tracing::info_span!(
            "generate",
            request_id = %r.request_id,
            prompt_tokens = r.prompt_tokens.len(),
            constrained = r.constraint.is_some()
        );
        let sampling = sampling_from_proto(r.sampling)?;
        let constraint = self.constraint(r.constraint).instrument(span.clone()).await?;
        let _entered = span.enter();
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        let images = images_from_proto(r.images)?;
        let request = crate::engine::Request {
            id: r.request_id,
            prompt: r.prompt_tokens,
            sampling,
            priority: r.priority,
            images,
            constraint,
        };
        self.engine.submit(request, tx).map_err(|e| match e {
            SubmitError::Invalid(m) => Status::invalid_argument(m),
            e @ SubmitError::TooLong { .. } => Status::invalid_argument(e.to_string()),
            e @ (SubmitError::Stopped | SubmitError::Died(_)) => Status::unavailable(e.to_string()),
            e @ SubmitError::Busy { .. } => {
                metrics::counter!(m::ENGINE_QUEUE_FULL_TOTAL).increment(1);
                Status::resource_exhausted(e.to_string())
            }
        })?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|e| Ok(to_event(e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let draining = self.draining.load(Ordering::Relaxed);
        Ok(Response::new(HealthResponse { serving: self.engine.died().is_none() && !draining }))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        // Routers poll this: a coordinator whose engine died must not look like an idle one.
        if let Some(why) = self.engine.died() {
            return Err(Status::unavailable(why));
        }
        self.admitting()?;
        let l = self.engine.load();
        Ok(Response::new(LoadResponse {
            waiting: l.waiting as u32,
            running: l.running as u32,
            kv_blocks_used: l.kv_blocks_used as u64,
            kv_blocks_free: (l.kv_blocks_total - l.kv_blocks_used) as u64,
            kv_blocks_total: l.kv_blocks_total as u64,
            max_model_len: self.engine.max_model_len() as u32,
            preemptions: l.preemptions,
        }))
    }
}

/// Serves the coordinator on `listener` until `shutdown` resolves or the engine dies (then
/// [`EngineHandle::died`] says why), in plaintext.
pub async fn serve(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with_tls(coordinator, listener, None, None, shutdown).await
}

/// How a coordinator drains on shutdown.
#[derive(Debug)]
pub struct Drain<'a> {
    pub health: &'a crate::health::Health,
    /// The registry record, set not ready at once (gateways following it stop choosing this one).
    pub membership: Option<&'a epserve_control::Membership>,
    /// How long the running requests may take to finish.
    pub grace: Duration,
}

/// [`serve_with_tls`] with `grpc.health.v1` from `drain.health`; when `shutdown` resolves, drains:
/// not ready (health, registry record, `Load`), new `Generate` calls refused with `UNAVAILABLE`,
/// the running requests finish (up to `drain.grace`; those still running then are cut off).
pub async fn serve_draining(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    tls: Option<epserve_tls::ClusterTls>,
    drain: Drain<'_>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (engine, draining) = (coordinator.engine.clone(), coordinator.draining.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let health = Some(drain.health.service());
    let mut server = tokio::spawn(serve_with_tls(coordinator, listener, tls, health, async {
        let _ = stopped.await;
    }));
    tokio::select! {
        () = shutdown => {}
        // Stopped by itself: the engine died, or a transport error.
        result = &mut server => return joined(result),
    }
    let started = Instant::now();
    draining.store(true, Ordering::Relaxed);
    drain.health.drain().await;
    if let Some(membership) = drain.membership {
        membership.update(|i| i.ready = false);
    }
    let running = engine.load();
    tracing::info!(running = running.running, waiting = running.waiting, "draining: the running requests finish");
    // tonic's graceful shutdown: GOAWAY (no new stream), the open `Generate` streams run to their end.
    let _ = stop.send(());
    let served = match tokio::time::timeout(drain.grace, &mut server).await {
        Ok(result) => {
            tracing::info!("drained in {:.2} s", started.elapsed().as_secs_f64());
            joined(result)
        }
        Err(_) => {
            let left = engine.load();
            tracing::warn!(
                running = left.running,
                waiting = left.waiting,
                "shutdown grace ({:?}) over: cutting off the requests still running",
                drain.grace
            );
            server.abort();
            Ok(())
        }
    };
    metrics::histogram!(m::DRAIN_SECONDS, "component" => "coordinator").record(started.elapsed().as_secs_f64());
    served
}

/// The server task's result; a panic in it is logged (the process then stops as after a drain).
fn joined(
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), tonic::transport::Error> {
    result.unwrap_or_else(|e| {
        tracing::error!("the gRPC server task failed: {e}");
        Ok(())
    })
}

/// [`serve`] over mutual TLS with `tls` (clients must present a certificate from the cluster CA),
/// in plaintext without; with `health`, `grpc.health.v1.Health` on the same port.
pub async fn serve_with_tls(
    coordinator: Coordinator,
    listener: tokio::net::TcpListener,
    tls: Option<epserve_tls::ClusterTls>,
    health: Option<tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let engine = coordinator.engine.clone();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            why = engine.wait_died() => tracing::error!("stopping: {why}"),
        }
    };
    let balancing = coordinator.balancing.clone().map(|b| crate::balancing_service::Balancing(b).into_service());
    let router = tonic::transport::Server::builder()
        .add_service(coordinator.into_service())
        .add_optional_service(health)
        .add_optional_service(balancing);
    match tls {
        Some(tls) => router.serve_with_incoming_shutdown(epserve_tls::incoming(listener, tls), shutdown).await,
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
    }
}
