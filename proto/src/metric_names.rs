//! Every Prometheus metric epserve exports, in one place: `epserve_{what}_{unit}`, `_total` only on
//! counters, label values from closed sets (never user input).

/// Histogram, seconds, label `worker`: round trip of one exchange as the coordinator sees it.
pub const EXCHANGE_LATENCY_SECONDS: &str = "epserve_exchange_latency_seconds";
/// Counter, label `worker`: payload bytes the coordinator sent to a worker.
pub const EXCHANGE_SENT_BYTES_TOTAL: &str = "epserve_exchange_sent_bytes_total";
/// Counter, label `worker`: payload bytes the coordinator received from a worker.
pub const EXCHANGE_RECEIVED_BYTES_TOTAL: &str = "epserve_exchange_received_bytes_total";
/// Counter, labels `worker`, `kind` (`deadline`, `unavailable`, `rejected`): failed exchanges.
pub const EXCHANGE_ERRORS_TOTAL: &str = "epserve_exchange_errors_total";
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
