//! Every Prometheus metric epserve exports, in one place: `epserve_{what}_{unit}`, `_total` only on
//! counters, label values from closed sets (never user input).

/// Histogram, seconds, label `worker`: round trip of one exchange as the coordinator sees it.
pub const EXCHANGE_LATENCY_SECONDS: &str = "epserve_exchange_latency_seconds";
/// Counter, label `worker`: payload bytes the coordinator sent to a worker.
pub const EXCHANGE_SENT_BYTES_TOTAL: &str = "epserve_exchange_sent_bytes_total";
/// Counter, label `worker`: payload bytes the coordinator received from a worker.
pub const EXCHANGE_RECEIVED_BYTES_TOTAL: &str = "epserve_exchange_received_bytes_total";
/// Counter, labels `worker`, `kind` (`deadline`, `unavailable`, `rejected`, `no_host`): failed exchanges.
pub const EXCHANGE_ERRORS_TOTAL: &str = "epserve_exchange_errors_total";
/// Gauge, labels `worker`, `transport` (`shm` | `grpc`): 1 for the medium the coordinator's current
/// link to the worker carries exchanges over, 0 for the other.
pub const WORKER_LINK_TRANSPORT: &str = "epserve_worker_link_transport";
/// Counter, label `direction` (`request` on coordinators, `response` on workers): exchange messages
/// larger than the shared-memory ring, sent over the link's gRPC stream instead.
pub const SHM_OVERSIZE_MESSAGES_TOTAL: &str = "epserve_shm_oversize_messages_total";
/// Counter, labels `layer`, `expert`: routed token rows per expert (the load-balancing signal).
pub const EXPERT_ROWS_TOTAL: &str = "epserve_expert_rows_total";

/// Counter: exchanges a worker answered (`result` = `ok` | `invalid`).
pub const WORKER_EXCHANGES_TOTAL: &str = "epserve_worker_exchanges_total";
/// Counter: rows a worker computed.
pub const WORKER_ROWS_TOTAL: &str = "epserve_worker_rows_total";
/// Histogram, seconds: a worker's compute time per exchange.
pub const WORKER_COMPUTE_SECONDS: &str = "epserve_worker_compute_seconds";
/// Gauge, bytes: expert weights resident in a worker.
pub const WORKER_RESIDENT_EXPERT_BYTES: &str = "epserve_worker_resident_expert_bytes";

/// Histogram, seconds: one engine step (forward pass of the batch, sampling excluded).
pub const ENGINE_STEP_SECONDS: &str = "epserve_engine_step_seconds";
/// Histogram, tokens: tokens computed per step (decodes plus prefill chunks).
pub const ENGINE_BATCH_TOKENS: &str = "epserve_engine_batch_tokens";
/// Counter: prompt (and recomputed) tokens computed.
pub const ENGINE_PREFILL_TOKENS_TOTAL: &str = "epserve_engine_prefill_tokens_total";
/// Counter: tokens decoded one at a time.
pub const ENGINE_DECODE_TOKENS_TOTAL: &str = "epserve_engine_decode_tokens_total";
/// Counter: engine steps that failed (and were retried, or failed their requests).
pub const ENGINE_STEP_FAILURES_TOTAL: &str = "epserve_engine_step_failures_total";
/// Counter: sequences preempted because the KV cache was full (they are recomputed later).
pub const ENGINE_PREEMPTIONS_TOTAL: &str = "epserve_engine_preemptions_total";
/// Gauge: requests queued, not yet running.
pub const ENGINE_WAITING_REQUESTS: &str = "epserve_engine_waiting_requests";
/// Gauge: sequences in the running batch.
pub const ENGINE_RUNNING_REQUESTS: &str = "epserve_engine_running_requests";
/// Gauge: KV cache blocks in use.
pub const KV_BLOCKS_USED: &str = "epserve_kv_blocks_used";
/// Gauge: KV cache blocks in all.
pub const KV_BLOCKS_TOTAL: &str = "epserve_kv_blocks_total";
/// Histogram, seconds: from submission to the first token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "epserve_time_to_first_token_seconds";
/// Histogram, seconds: between consecutive tokens of a request.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "epserve_inter_token_latency_seconds";
/// Histogram: seconds the vision encoder took for one step's batch of tiles (coordinator).
pub const VISION_ENCODE_SECONDS: &str = "epserve_vision_encode_seconds";
/// Counter: image tiles encoded by the vision tower (coordinator; recomputed tiles count again).
pub const VISION_TILES_TOTAL: &str = "epserve_vision_tiles_total";

// Constrained decoding (coordinator; docs/structured-outputs.md).
/// Counter, label `grammar` (`json_schema` | `lark`): requests whose output a grammar constrains.
pub const CONSTRAINED_REQUESTS_TOTAL: &str = "epserve_constrained_requests_total";
/// Histogram, seconds: computing one constrained token's mask (beside the forward pass).
pub const GRAMMAR_MASK_SECONDS: &str = "epserve_grammar_mask_seconds";
/// Histogram, seconds: compiling a grammar that was not in the cache (coordinator and gateway).
pub const GRAMMAR_COMPILE_SECONDS: &str = "epserve_grammar_compile_seconds";

/// Counter, labels `route` (closed set), `status`: HTTP requests the gateway answered.
pub const HTTP_REQUESTS_TOTAL: &str = "epserve_http_requests_total";
/// Histogram, seconds, label `route`: time to the response head (whole body when not streaming).
pub const HTTP_REQUEST_SECONDS: &str = "epserve_http_request_seconds";
/// Gauge: HTTP connections the gateway holds open (at most `--max-connections`).
pub const HTTP_OPEN_CONNECTIONS: &str = "epserve_http_open_connections";
/// Counter: connections closed as accepted because `--max-connections` were open.
pub const HTTP_REFUSED_CONNECTIONS_TOTAL: &str = "epserve_http_refused_connections_total";
/// Counter, label `limit` (`rate`, `concurrency`): completion requests answered 429 by a per-key limit.
pub const HTTP_RATE_LIMITED_TOTAL: &str = "epserve_http_rate_limited_total";
/// Counter, label `reason` (`disconnected`, `stalled`): streams cancelled because the client went away
/// or stopped reading for `--stream-stall-timeout-ms`.
pub const HTTP_STREAMS_CANCELLED_TOTAL: &str = "epserve_http_streams_cancelled_total";

// Image input (gateway).
/// Counter, label `source` (`data` | `url`): images decoded and cut into tiles.
pub const IMAGES_TOTAL: &str = "epserve_images_total";
/// Counter, label `source` (`data` | `url`): encoded image bytes read (decoded base64, fetched bodies).
pub const IMAGE_BYTES_TOTAL: &str = "epserve_image_bytes_total";
/// Counter: tiles the gateway's image preprocessing produced (global tiles included).
pub const IMAGE_TILES_TOTAL: &str = "epserve_image_tiles_total";
/// Histogram, seconds: decoding and preprocessing of one image (on the blocking pool).
pub const IMAGE_PREPROCESS_SECONDS: &str = "epserve_image_preprocess_seconds";
/// Histogram, seconds: fetching one image URL (`--image-fetch`), refused and failed fetches included.
pub const IMAGE_FETCH_SECONDS: &str = "epserve_image_fetch_seconds";
/// Counter, label `reason` (a closed set: `too_many`, `bad_base64`, `fetch_refused`, ...): image parts
/// answered with a 400.
pub const IMAGE_REJECTIONS_TOTAL: &str = "epserve_image_rejections_total";

// Control plane and failover.
/// Gauge: version of the expert placement map this process last saw (or wrote).
pub const CONTROL_PLACEMENT_VERSION: &str = "epserve_placement_version";
/// Gauge: expert workers registered and alive, as seen by the placement leader.
pub const CONTROL_LIVE_WORKERS: &str = "epserve_live_workers";
/// Counter: times this instance found its lease lost and registered again.
pub const CONTROL_REREGISTRATIONS_TOTAL: &str = "epserve_reregistrations_total";
/// Counter, by `worker`: workers the coordinator stopped sending to (stream lost or lease gone).
pub const FAILOVERS_TOTAL: &str = "epserve_failovers_total";
/// Counter, by `worker`: workers left unconnected for a while because their answers showed them at
/// fault (refusing experts their record lists, malformed answers).
pub const WORKERS_QUARANTINED_TOTAL: &str = "epserve_workers_quarantined_total";
/// Counter, by `worker`: registry records that listed experts the worker's own `Status` did not
/// report (those experts are not routed to it).
pub const REGISTRY_RECORD_MISMATCHES_TOTAL: &str = "epserve_registry_record_mismatches_total";
/// Counter: engine threads that panicked (the coordinator then stops serving and exits).
pub const ENGINE_DEATHS_TOTAL: &str = "epserve_engine_deaths_total";
/// Counter: requests cancelled because their reader left a full event channel unread.
pub const ENGINE_STALLED_READERS_TOTAL: &str = "epserve_engine_stalled_readers_total";
/// Counter: requests refused because the engine's waiting queue was full.
pub const ENGINE_QUEUE_FULL_TOTAL: &str = "epserve_engine_queue_full_total";
/// Counter, by `reason`: exchanges sent again to another host of their experts.
pub const EXCHANGE_RETRIES_TOTAL: &str = "epserve_exchange_retries_total";
/// Histogram: from losing a worker to the first step that finished without it.
pub const FAILOVER_RECOVERY_SECONDS: &str = "epserve_failover_recovery_seconds";
/// Counter: experts a worker loaded because the placement leader assigned them to it.
pub const WORKER_EXPERTS_LOADED_TOTAL: &str = "epserve_worker_experts_loaded_total";
/// Counter: steps written to a routing trace (`epserve_eplb::trace::TraceWriter`).
pub const ROUTING_TRACE_STEPS_TOTAL: &str = "epserve_routing_trace_steps_total";
/// Counter: steps left out of the routing trace because the writer's buffer was full (each gap is
/// also a `dropped` record in the trace).
pub const ROUTING_TRACE_DROPPED_STEPS_TOTAL: &str = "epserve_routing_trace_dropped_steps_total";
/// Counter, bytes: routing-trace records written.
pub const ROUTING_TRACE_BYTES_TOTAL: &str = "epserve_routing_trace_bytes_total";
/// Counter: expert replicas (one expert of one layer) a worker dropped because it was asked to
/// (`ExpertPlacementService.Place`).
pub const WORKER_EXPERTS_RELEASED_TOTAL: &str = "epserve_worker_experts_released_total";
/// Histogram, seconds, label `component` (`gateway`, `coordinator`, `worker`): how long a process
/// drained on shutdown (SIGTERM), from the signal to the end of its drain.
pub const DRAIN_SECONDS: &str = "epserve_drain_seconds";
/// Gauge: batch jobs the gateway's batch runner is driving (issue 18).
pub const BATCH_JOBS_ACTIVE: &str = "epserve_batch_jobs_active";
/// Gauge: batch lines in flight on the coordinators, all jobs together.
pub const BATCH_LINES_IN_FLIGHT: &str = "epserve_batch_lines_in_flight";
/// Counter, label `outcome` (`completed`, `failed`): batch lines finished and journaled.
pub const BATCH_LINES_TOTAL: &str = "epserve_batch_lines_total";
/// Counter: batch lines sent again because the cluster could not take them then (429, 503, 500).
pub const BATCH_LINE_RETRIES_TOTAL: &str = "epserve_batch_line_retries_total";
/// Gauge, labels `layer`, `expert`, `window` (`10s`, `60s`, `600s`): tokens a coordinator routed to
/// the expert in the last window.
pub const EXPERT_LOAD: &str = "epserve_expert_load";
/// Gauge, labels `layer` (an MoE layer, or `all`: Σ max / Σ mean over the layers), `window` (`10s`,
/// `60s`, `600s`): max over mean of the tokens a coordinator sent to each worker for the layer in the
/// window, counted since the placement it routes by last changed (1 is perfect balance).
pub const WORKER_LOAD_IMBALANCE: &str = "epserve_worker_load_imbalance";
/// Counter, labels `trigger` (`apply`, `auto`), `result` (`applied`, `failed`): live placement
/// changes the placement leader carried out.
pub const EPLB_REBALANCES_TOTAL: &str = "epserve_eplb_rebalances_total";
/// Histogram, seconds: one live placement change, from the first load to the last release.
pub const EPLB_REBALANCE_SECONDS: &str = "epserve_eplb_rebalance_seconds";
