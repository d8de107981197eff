//! The shared-memory medium of a worker link (docs/architecture.md, "Shared-memory transport"):
//! the rung of the ladder between in-process experts and gRPC, for workers on the coordinator's
//! host.
//!
//! When a link opens, the coordinator creates a segment (`epserve_shm`: a 0600 file with a random
//! name and nonce under the shm directory) and names it, with its nonce, in the metadata of the
//! worker's `Exchange` stream. A worker that maps it and finds the nonce answers `accepted` in the
//! response headers; then the link's requests go through the segment's request ring and its
//! answers come back through the response ring, read here by a thread of the link's own. The
//! file is unlinked as soon as the worker has answered (both sides hold the mapping; nothing is
//! left behind if either crashes). The gRPC stream stays open: its end is what tells the
//! coordinator the worker died, and the link is then lost exactly as a gRPC link is — every
//! exchange waiting on the rings fails at once with the reason — and the segment is closed, which
//! stops both sides' threads.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use epserve_proto::shm_handshake as hs;
use epserve_proto::v1::{ExchangeRequest, ExchangeResponse};
use epserve_shm::{Consumer, Producer, Segment, ShmError};
use parking_lot::Mutex;
use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::links::{Pending, WorkerLink, WorkerSet};

/// Which media a coordinator may use to reach its workers (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerTransport {
    /// Shared memory with every worker that accepts the handshake, gRPC with the others.
    #[default]
    Auto,
    /// Shared memory with every worker: a link that cannot have it is not made.
    Shm,
    /// gRPC only; shared memory is never offered.
    Grpc,
}

impl WorkerTransport {
    pub fn as_str(&self) -> &'static str {
        match self {
            WorkerTransport::Auto => "auto",
            WorkerTransport::Shm => "shm",
            WorkerTransport::Grpc => "grpc",
        }
    }
}

/// The shared-memory settings of the worker links.
#[derive(Debug, Clone)]
pub struct ShmConfig {
    pub transport: WorkerTransport,
    /// Where segments are created (a tmpfs); workers look for them in theirs.
    pub dir: PathBuf,
    /// Bytes of each of a link's two rings; a message larger than a ring goes over gRPC.
    pub ring_bytes: usize,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            transport: WorkerTransport::Auto,
            dir: epserve_shm::default_dir(),
            ring_bytes: epserve_shm::DEFAULT_RING_BYTES,
        }
    }
}

/// What a link carries its exchanges over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMedium {
    Shm,
    Grpc,
}

impl LinkMedium {
    /// Label value of `epserve_worker_link_transport`, and what logs and status say.
    pub fn as_str(&self) -> &'static str {
        match self {
            LinkMedium::Shm => "shm",
            LinkMedium::Grpc => "grpc",
        }
    }
}

impl std::fmt::Display for LinkMedium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A segment offered to a worker: created, named in the stream's metadata.
pub(super) fn offer<T>(config: &ShmConfig, request: &mut tonic::Request<T>) -> Result<Option<Arc<Segment>>, ShmError> {
    if config.transport == WorkerTransport::Grpc {
        return Ok(None);
    }
    let segment = Segment::create(&config.dir, config.ring_bytes)?;
    let invalid =
        |what: &str| ShmError::Refused { path: segment.path().to_owned(), reason: format!("{what} is not ASCII") };
    let name = MetadataValue::try_from(segment.name()).map_err(|_| invalid("the name"))?;
    let nonce = MetadataValue::try_from(segment.nonce().to_hex()).map_err(|_| invalid("the nonce"))?;
    request.metadata_mut().insert(hs::SEGMENT, name);
    request.metadata_mut().insert(hs::NONCE, nonce);
    Ok(Some(segment))
}

/// The worker's answer to an offer, from the stream's response headers: `Ok` if it mapped the
/// segment, else why not.
pub(super) fn accepted(metadata: &MetadataMap) -> Result<(), String> {
    match metadata.get(hs::ANSWER).and_then(|v| v.to_str().ok()) {
        Some(hs::ACCEPTED) => Ok(()),
        Some(hs::REFUSED) => Err(metadata
            .get(hs::REASON)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "refused".to_owned(), |r| format!("refused: {r}"))),
        Some(other) => Err(format!("unknown answer {other:?}")),
        None => Err("the worker does not know the shared-memory handshake".to_owned()),
    }
}

/// The request ring of a link, written by whichever engine thread sends (one at a time), and the
/// buffer requests are encoded into.
#[derive(Debug)]
pub(crate) struct ShmRequests {
    ring: Mutex<(Producer, Vec<u8>)>,
    segment: Arc<Segment>,
}

impl ShmRequests {
    pub fn new(producer: Producer) -> Self {
        let segment = producer.segment().clone();
        ShmRequests { ring: Mutex::new((producer, Vec::new())), segment }
    }

    /// Puts `request` on the ring, waiting until `deadline` for room. [`ShmError::TooLarge`]: it
    /// can never fit; the caller sends it over gRPC.
    pub fn send(&self, request: &ExchangeRequest, deadline: Instant) -> Result<(), ShmError> {
        let mut guard = self.ring.lock();
        let (producer, buf) = &mut *guard;
        buf.clear();
        // Encoding into a Vec cannot run out of room.
        let _ = request.encode(buf);
        producer.send(buf, deadline)
    }

    /// Ends the segment for both sides (wakes and stops every thread waiting on it).
    pub fn close(&self) {
        self.segment.close();
    }
}

impl Drop for ShmRequests {
    fn drop(&mut self) {
        self.segment.close();
    }
}

/// How long the reader sleeps at most before checking that its link still exists.
const READER_CHECK: Duration = Duration::from_secs(1);

/// Reads the link's answers from the response ring and hands each to the exchange waiting for it,
/// as the gRPC stream's reader does; a corrupt ring or undecodable answer loses the link.
pub(super) fn spawn_reader(
    mut responses: Consumer,
    pending: Arc<Mutex<Pending>>,
    link: Weak<WorkerLink>,
    workers: Weak<WorkerSet>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("epserve-shm-answers".into()).spawn(move || {
        let mut buf = Vec::new();
        let reason = loop {
            match responses.recv(&mut buf, Some(Instant::now() + READER_CHECK)) {
                Ok(true) => match ExchangeResponse::decode(buf.as_slice()) {
                    Ok(answer) => {
                        if let Some(tx) = pending.lock().waiting.remove(&answer.id) {
                            let _ = tx.send(Ok(answer));
                        }
                    }
                    Err(e) => break format!("undecodable answer on the shared-memory ring: {e}"),
                },
                Ok(false) if link.strong_count() == 0 => break "the link was dropped".to_owned(),
                Ok(false) => {}
                Err(ShmError::Closed) => break "the shared-memory ring was closed".to_owned(),
                Err(e) => break e.to_string(),
            }
        };
        responses.segment().close();
        // A no-op when the link is already lost (that is usually why the ring was closed).
        if let (Some(link), Some(workers)) = (link.upgrade(), workers.upgrade()) {
            workers.lose(&link, &reason);
        }
    })?;
    Ok(())
}
