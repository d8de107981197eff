//! The worker's end of a shared-memory link (docs/architecture.md, "Shared-memory transport").
//!
//! A coordinator on this host opens its `Exchange` stream with metadata naming a segment it
//! created under the shm directory and the segment's nonce. If this worker is allowed to use
//! shared memory, finds the file in its own shm directory, owned by its user with mode 0600, and
//! the nonce matches, it maps it and answers `epserve-shm: accepted` in the response headers;
//! otherwise `refused` with the reason, and the link stays plain gRPC. An accepted link reads its
//! requests from the request ring on a thread of its own, which also computes each and writes its
//! answer to the response ring (no hand-off to another thread): that thread is the first of a
//! kernels' pool serving this link alone. The gRPC stream stays open for liveness. When that
//! stream ends (the coordinator went away) the segment is closed, the thread and its pool stop and
//! the mapping goes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use epserve_proto::metric_names as m;
use epserve_proto::shm_handshake as hs;
use epserve_proto::v1::{ExchangeRequest, ExchangeResponse};
use epserve_shm::{Nonce, Role, Segment, ShmError};
use prost::Message;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc};
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::service::{Counted, ExpertWorker};

/// How long the writer waits for room in the response ring before it gives the segment up: the
/// coordinator's reader drains it continuously, so a ring full this long means it stopped.
const WRITE_WAIT: Duration = Duration::from_secs(30);

/// The segment a stream's metadata offers: `None` without an offer, `Err` for a malformed one.
pub(crate) fn offered(metadata: &MetadataMap) -> Option<Result<(String, Nonce), String>> {
    let name = metadata.get(hs::SEGMENT)?;
    let parsed = (|| {
        let name = name.to_str().map_err(|_| "the segment name is not ASCII".to_owned())?;
        let nonce = metadata
            .get(hs::NONCE)
            .and_then(|v| v.to_str().ok())
            .and_then(Nonce::from_hex)
            .ok_or_else(|| "no nonce of 32 hex digits".to_owned())?;
        Ok((name.to_owned(), nonce))
    })();
    Some(parsed)
}

/// Maps the offered segment from `dir` (`None`: this worker does not use shared memory).
pub(crate) fn attach(dir: Option<&Path>, offer: Result<(String, Nonce), String>) -> Result<Arc<Segment>, String> {
    let dir = dir.ok_or_else(|| "this worker does not use shared memory".to_owned())?;
    let (name, nonce) = offer?;
    Segment::attach(dir, &name, &nonce).map_err(|e| e.to_string())
}

/// The handshake's answer, in the response headers.
pub(crate) fn answer(metadata: &mut MetadataMap, result: &Result<Arc<Segment>, String>) {
    match result {
        Ok(_) => {
            metadata.insert(hs::ANSWER, MetadataValue::from_static(hs::ACCEPTED));
        }
        Err(reason) => {
            metadata.insert(hs::ANSWER, MetadataValue::from_static(hs::REFUSED));
            let printable: String =
                reason.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
            if let Ok(v) = MetadataValue::try_from(printable.as_str()) {
                metadata.insert(hs::REASON, v);
            }
        }
    }
}

/// Serves the rings of `segment`: requests in, answers out (an answer too large for the ring goes
/// over the stream's gRPC responses, `grpc`). `slots` is the stream's limit on exchanges in flight,
/// shared with its gRPC side. Returns once its thread is started; it stops when the segment is
/// closed.
pub(crate) fn serve(
    worker: Arc<ExpertWorker>,
    segment: Arc<Segment>,
    slots: Arc<Semaphore>,
    grpc: mpsc::Sender<Result<ExchangeResponse, Status>>,
) -> std::io::Result<()> {
    let runtime = Handle::current();
    // One thread reads a request, computes it and writes its answer: each hand-off to another
    // thread (the runtime, a blocking thread, an answer writer, the kernels' pool) was a thread
    // wake-up an exchange, on the critical path of every MoE layer (docs/benchmarks.md, "Prefill
    // on AMD Zen 4" and "The worker's link on a pool of its own"). That thread is a thread of a
    // pool that serves this link alone, as large as the kernels' pool: a product starts on it at
    // once and its other threads take the rest. The pool has no other long-running job, so a
    // thread waiting inside a product can never pick up another link's loop.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("epserve-shm-{i}"))
        .build()
        .map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("epserve-shm-link".into())
        .spawn(move || pool.install(|| serve_rings(&worker, &segment, &slots, &grpc, &runtime)))?;
    Ok(())
}

/// Reads requests from `segment` until it closes, computing each on this thread's pool.
fn serve_rings(
    worker: &Arc<ExpertWorker>,
    segment: &Arc<Segment>,
    slots: &Arc<Semaphore>,
    grpc: &mpsc::Sender<Result<ExchangeResponse, Status>>,
    runtime: &Handle,
) {
    let (mut producer, mut consumer) = segment.ends(Role::Attacher);
    let mut buf = Vec::new();
    loop {
        let Ok(slot) = runtime.block_on(slots.clone().acquire_owned()) else { break };
        match consumer.recv(&mut buf, None) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(ShmError::Closed) => break,
            Err(e) => {
                tracing::warn!(segment = %segment.name(), "shared-memory requests stopped: {e}");
                segment.close();
                break;
            }
        }
        let request = match ExchangeRequest::decode(buf.as_slice()) {
            Ok(request) => request,
            Err(e) => {
                // Without an id there is no one to answer: the link ends, the coordinator
                // sees the ring closed and fails (or re-sends) what it was waiting for.
                tracing::warn!(segment = %segment.name(), "undecodable request on the ring: {e}");
                segment.close();
                break;
            }
        };
        worker.stats().exchanges_received.fetch_add(1, Ordering::Relaxed);
        let in_flight = Counted::new(worker.clone(), |s| &s.exchanges_in_flight);
        let permits = worker.permits(request.payload.len());
        let Ok(budget) = runtime.block_on(worker.budget().acquire_many_owned(permits)) else { break };
        let response = worker.handle_here(request);
        drop(budget);
        buf.clear();
        // Encoding into a Vec cannot run out of room.
        let _ = response.encode(&mut buf);
        match producer.send(&buf, Instant::now() + WRITE_WAIT) {
            Ok(()) => {}
            Err(ShmError::TooLarge { .. }) => {
                metrics::counter!(m::SHM_OVERSIZE_MESSAGES_TOTAL, "direction" => "response").increment(1);
                if grpc.blocking_send(Ok(response)).is_err() {
                    break;
                }
            }
            Err(ShmError::Closed) => break,
            Err(e) => {
                tracing::warn!(segment = %segment.name(), "shared-memory answers stopped: {e}");
                segment.close();
                break;
            }
        }
        drop((slot, in_flight));
    }
}
