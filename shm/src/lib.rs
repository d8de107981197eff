//! Shared-memory rings for the expert exchange between a coordinator and an expert worker on the
//! same host (the `shm` rung of the transport ladder: in-process → shared memory → gRPC).
//!
//! A [`Segment`] is one file under `/dev/shm` (or another tmpfs directory) that the coordinator
//! creates with a random name, mode 0600 and a random [`Nonce`] in its header; the worker attaches
//! to it by name and must present the same nonce, which proves it runs on the same host, as the
//! same user, and could read the header. The segment holds two single-producer single-consumer
//! rings of length-prefixed messages: requests (coordinator → worker) and responses (worker →
//! coordinator). A side that has nothing to read spins briefly, then sleeps on a futex word in the
//! mapping, so an idle link costs no CPU.
//!
//! Boundaries: this crate moves opaque byte messages and nothing else: no protobuf, no tokio, no
//! knowledge of exchanges. The handshake (who creates, who attaches, what is sent where) and
//! liveness (noticing that the peer died) belong to the link that uses it, which keeps a gRPC
//! stream open beside the rings for that. Everything read from the mapping is untrusted: a length
//! or position that does not add up is [`ShmError::Corrupt`], never a panic or an out-of-bounds
//! access. The `unsafe` code (the mapping's raw memory and the futex system call) is confined to
//! `segment.rs` and `futex.rs`.

mod errors;
mod futex;
mod ring;
mod segment;

pub use errors::ShmError;
pub use ring::{Consumer, Producer};
pub use segment::{Nonce, Role, Segment, default_dir};

/// Bytes of each ring when the caller does not choose: 8 MiB, about 800 Scout rows in bf16 or 400
/// in f32 per message (a larger message is refused with [`ShmError::TooLarge`]). Every page of a
/// ring is eventually touched (the positions wrap), so this is what each link adds to both
/// processes' resident memory: 32 MiB rings added ~150 MiB to a coordinator with 3 workers, which
/// the soak test in tests/cluster_faults.rs counts as growth.
pub const DEFAULT_RING_BYTES: usize = 8 << 20;

#[cfg(test)]
mod tests;
