//! The shared-memory medium of a worker link (docs/architecture.md, "Shared-memory transport"):
//! the rung of the ladder between in-process experts and gRPC, for workers on the coordinator's
//! host.
//!
//! When a link opens, the coordinator creates a segment (`epserve_shm`: a 0600 file with a random
//! name and nonce under the shm directory) and names it, with its nonce, in the metadata of the
//! worker's `Exchange` stream. A worker that maps it and finds the nonce answers `accepted` in the
//! response headers; then the link's requests go through the segment's request ring and its
//! answers come back through the response ring, read by the engine thread waiting for them. The
//! file is unlinked as soon as the worker has answered (both sides hold the mapping; nothing is
//! left behind if either crashes). The gRPC stream stays open: its end is what tells the
//! coordinator the worker died, and the link is then lost exactly as a gRPC link is — every
//! exchange waiting on the rings fails at once with the reason — and the segment is closed, which
//! stops both sides' threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epserve_proto::shm_handshake as hs;
use epserve_proto::v1::{ExchangeRequest, ExchangeResponse};
use epserve_shm::{Consumer, Producer, Segment, ShmError};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::oneshot;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::links::{Pending, Reply};

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

/// Longest single sleep of a thread waiting on the response ring: it looks at its own answer
/// channel at least this often (an answer too large for the ring comes back over gRPC).
const RING_CHECK: Duration = Duration::from_millis(2);

/// How a wait for an exchange's answer ended.
pub(crate) enum Waited {
    Answer(Reply),
    /// The answer channel closed without an answer.
    Closed,
    TimedOut,
    /// The response ring failed (corrupt, or an undecodable answer): the link is lost for this
    /// reason.
    Lost(String),
}

/// The response ring of a link, read by the thread that waits for an answer: the waiting engine
/// thread is woken by the worker itself, with no reader thread between them (each hand-off to
/// another thread is a wake-up per exchange). Whoever holds the ring hands the answers it reads
/// to their exchanges' channels, its own included; another thread waiting on the same link
/// meanwhile waits for the ring (or finds its answer already delivered).
#[derive(Debug)]
pub(crate) struct ShmAnswers {
    ring: Mutex<(Consumer, Vec<u8>)>,
}

impl ShmAnswers {
    pub fn new(consumer: Consumer) -> Self {
        ShmAnswers { ring: Mutex::new((consumer, Vec::new())) }
    }

    /// Waits until `deadline` for the answer `reply` receives, reading the ring meanwhile.
    pub fn wait_for(
        &self,
        reply: &mut oneshot::Receiver<Reply>,
        pending: &Mutex<Pending>,
        deadline: Instant,
    ) -> Waited {
        let delivered = |reply: &mut oneshot::Receiver<Reply>| match reply.try_recv() {
            Ok(answer) => Some(Waited::Answer(answer)),
            Err(oneshot::error::TryRecvError::Closed) => Some(Waited::Closed),
            Err(oneshot::error::TryRecvError::Empty) => None,
        };
        if let Some(done) = delivered(reply) {
            return done;
        }
        // Whoever holds the ring meanwhile hands this answer over as soon as it reads it.
        let Some(mut guard) = self.ring.try_lock_until(deadline.max(Instant::now() + RING_CHECK)) else {
            return delivered(reply).unwrap_or(Waited::TimedOut);
        };
        let (consumer, buf) = &mut *guard;
        loop {
            if let Some(done) = delivered(reply) {
                return done;
            }
            // Past the deadline this still takes what the ring holds: the engine may come to this
            // exchange late (it waited for others first), and an answer that arrived in time is
            // not a worker missing its deadline.
            match consumer.recv(buf, Some((Instant::now() + RING_CHECK).min(deadline))) {
                Ok(true) => match ExchangeResponse::decode(buf.as_slice()) {
                    Ok(answer) => {
                        if let Some(tx) = pending.lock().waiting.remove(&answer.id) {
                            let _ = tx.send(Ok(answer));
                        }
                    }
                    Err(e) => return Waited::Lost(format!("undecodable answer on the shared-memory ring: {e}")),
                },
                Ok(false) if Instant::now() >= deadline => return delivered(reply).unwrap_or(Waited::TimedOut),
                Ok(false) => {}
                // The link was killed (its exchanges were failed first) or the worker closed it.
                Err(ShmError::Closed) => {
                    return delivered(reply)
                        .unwrap_or_else(|| Waited::Lost("the shared-memory ring was closed".into()));
                }
                Err(e) => return Waited::Lost(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link's response ring as the coordinator reads it, and the worker's end that answers.
    fn ring() -> (ShmAnswers, Producer) {
        let dir = epserve_shm::default_dir();
        let created = Segment::create(&dir, 1 << 16).expect("create a segment");
        let attached = Segment::attach(&dir, created.name(), created.nonce()).expect("attach");
        created.unlink().expect("unlink");
        let (_, answers) = created.ends(epserve_shm::Role::Creator);
        let (worker, _) = attached.ends(epserve_shm::Role::Attacher);
        (ShmAnswers::new(answers), worker)
    }

    fn answer(id: u64) -> Vec<u8> {
        ExchangeResponse { id, ..Default::default() }.encode_to_vec()
    }

    fn awaited(pending: &Mutex<Pending>, id: u64) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        pending.lock().waiting.insert(id, tx);
        rx
    }

    #[test]
    fn answers_on_the_ring_are_taken_even_when_the_engine_comes_after_the_deadline() {
        // The engine waited for other exchanges first; both answers came in time and sit on the
        // ring: neither is a missed deadline.
        let (answers, mut worker) = ring();
        let pending = Mutex::new(Pending::default());
        let (mut first, mut second) = (awaited(&pending, 7), awaited(&pending, 8));
        let far = Instant::now() + Duration::from_secs(5);
        worker.send(&answer(7), far).expect("send");
        worker.send(&answer(8), far).expect("send");
        let passed = Instant::now() - Duration::from_millis(10);
        let Waited::Answer(Ok(got)) = answers.wait_for(&mut second, &pending, passed) else {
            panic!("the answer on the ring was not taken")
        };
        assert_eq!(got.id, 8);
        let Waited::Answer(Ok(got)) = answers.wait_for(&mut first, &pending, passed) else {
            panic!("the answer handed over while reading the ring was lost")
        };
        assert_eq!(got.id, 7);
        // Nothing on the ring: past the deadline it is a timeout, at once.
        let mut third = awaited(&pending, 9);
        let started = Instant::now();
        assert!(matches!(answers.wait_for(&mut third, &pending, passed), Waited::TimedOut));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
