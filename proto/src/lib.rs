//! The `epserve.v1` contract shared by every process: the generated gRPC code (built from
//! `proto/epserve/v1/*.proto` into OUT_DIR), the codec of exchange payloads (rows of bf16 or f32
//! values carried as bytes, never as repeated floats), validated domain types built once on
//! receipt, and the names of every Prometheus metric.
//!
//! Boundaries: no model code, no networking policy (deadlines, retries); just what both ends of a
//! wire must agree on.

pub mod exchange;
pub mod metric_names;
pub mod wire;

/// Generated code of package `epserve.v1`.
#[allow(clippy::all, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("epserve.v1");
}

/// Larger than any exchange we send: 1,024 Scout rows in f32 are 20 MiB. gRPC's default 4 MiB
/// breaks above ~400 bf16 Scout rows.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The URI a client connects to for a server address: addresses on the command line and in the
/// registry are bare `host:port`, the gRPC clients want a scheme (`http://host:port`); an address
/// that has one is kept as it is.
pub fn server_uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") }
}

/// The shared-memory handshake, carried in the metadata of the `ExpertService.Exchange` stream
/// (docs/architecture.md, "Shared-memory transport"): the coordinator names a segment it created
/// and its nonce; the worker answers in the response headers whether it mapped it.
pub mod shm_handshake {
    /// Request: the segment's file name (no directory: the worker looks in its own shm directory).
    pub const SEGMENT: &str = "epserve-shm-segment";
    /// Request: the segment's nonce, 32 hex digits.
    pub const NONCE: &str = "epserve-shm-nonce";
    /// Response: [`ACCEPTED`] or [`REFUSED`]; absent from workers that do not know the handshake.
    pub const ANSWER: &str = "epserve-shm";
    /// Response, with [`REFUSED`]: why, in printable ASCII.
    pub const REASON: &str = "epserve-shm-reason";
    pub const ACCEPTED: &str = "accepted";
    pub const REFUSED: &str = "refused";
}
