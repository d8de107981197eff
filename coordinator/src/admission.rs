//! What stands between a caller and the engine's queue: why a request is refused
//! ([`SubmitError`]), the place it holds in the bounded waiting queue ([`QueueSlot`]), and the
//! bounded channel its events come back on ([`EventSender`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engine::Event;

/// Where a request's events go: bounded. An engine never waits for a reader; a request whose
/// reader lets [`EVENT_BUFFER`] (or the channel's capacity) events pile up is cancelled.
pub type EventSender = tokio::sync::mpsc::Sender<Event>;

/// The event channel capacity the gRPC server gives every request: about ten seconds of tokens at
/// 100 tokens/s, far more than a reader that keeps up ever has queued.
pub const EVENT_BUFFER: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("prompt is {prompt} tokens; the context limit is {limit}")]
    TooLong { prompt: usize, limit: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("the engine died: {0}")]
    Died(String),
    #[error("{waiting} requests are waiting already (the limit): try again later or elsewhere")]
    Busy { waiting: usize },
}

/// A place in the waiting queue, held from `submit` until the request starts running (or leaves
/// the queue any other way: its drop frees the place).
#[derive(Debug)]
pub(crate) struct QueueSlot(pub(crate) Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
