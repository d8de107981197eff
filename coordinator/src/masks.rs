//! Grammar masks computed beside the forward pass. A constrained request's next-token mask depends
//! only on the tokens it has already emitted, not on this step's logits, so it is computed on other
//! threads while the step's forward pass runs and is ready when sampling starts: the grammar costs
//! the step nothing as long as the masks take less time than the forward pass (docs/benchmarks.md).
//!
//! The threads live as long as the engine and wait on a channel between steps: spawning them per
//! step would cost a thread (and its stack) every token.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

use epserve_grammar::{GrammarError, TokenConstraint, TokenMask};
use epserve_proto::metric_names as m;

/// Threads that compute masks at most (each step's requests are shared among them).
const MASK_THREADS: usize = 4;

/// One request's grammar, taken out of its sequence for the step, and its mask once computed.
#[derive(Debug)]
pub struct MaskJob {
    /// The sequence's arrival id.
    pub sequence: u64,
    pub constraint: TokenConstraint,
    /// Tokens the sequence may still write, the one sampled this step included: a JSON document
    /// that would not fit is closed (`TokenConstraint::mask_within`).
    pub budget: usize,
    pub mask: Option<Result<TokenMask, GrammarError>>,
}

/// The engine's mask threads.
#[derive(Debug)]
pub struct MaskThreads {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    jobs: Sender<Vec<MaskJob>>,
    done: Receiver<Vec<MaskJob>>,
}

/// Masks being computed: which worker took which sequences, and any computed on the engine thread
/// because a worker was gone.
#[derive(Debug)]
pub struct MasksInFlight {
    sent: Vec<(usize, Vec<u64>)>,
    inline: Vec<MaskJob>,
}

impl MaskThreads {
    /// Starts up to [`MASK_THREADS`] threads (no more than the machine has cores).
    pub fn new() -> Self {
        let n = MASK_THREADS.min(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let workers = (0..n)
            .filter_map(|i| {
                let (jobs, incoming) = channel::<Vec<MaskJob>>();
                let (finished, done) = channel();
                let spawned = std::thread::Builder::new().name(format!("epserve-mask-{i}")).spawn(move || {
                    while let Ok(jobs) = incoming.recv() {
                        if finished.send(compute(jobs)).is_err() {
                            return;
                        }
                    }
                });
                match spawned {
                    Ok(_) => Some(Worker { jobs, done }),
                    Err(e) => {
                        tracing::warn!("cannot start a mask thread, masks will be computed on fewer: {e}");
                        None
                    }
                }
            })
            .collect();
        MaskThreads { workers }
    }

    /// Hands `jobs` to the threads, shared evenly; they compute while the caller runs the forward pass.
    pub fn start(&self, jobs: Vec<MaskJob>) -> MasksInFlight {
        let mut flight = MasksInFlight { sent: Vec::new(), inline: Vec::new() };
        if self.workers.is_empty() {
            flight.inline = compute(jobs);
            return flight;
        }
        let threads = self.workers.len().min(jobs.len()).max(1);
        let per_thread = jobs.len().div_ceil(threads).max(1);
        let mut jobs = jobs.into_iter().peekable();
        let mut worker = 0;
        while jobs.peek().is_some() {
            let share: Vec<MaskJob> = jobs.by_ref().take(per_thread).collect();
            let sequences = share.iter().map(|j| j.sequence).collect();
            match self.workers[worker].jobs.send(share) {
                Ok(()) => flight.sent.push((worker, sequences)),
                // The thread is gone (it panicked): this step's share is computed here.
                Err(returned) => flight.inline.extend(compute(returned.0)),
            }
            worker += 1;
        }
        flight
    }

    /// Waits for every mask. A thread that panicked loses its share's grammars: those sequences are
    /// returned to be failed.
    pub fn finish(&self, flight: MasksInFlight) -> (Vec<MaskJob>, Vec<u64>) {
        let mut done = flight.inline;
        let mut lost = Vec::new();
        for (worker, sequences) in flight.sent {
            match self.workers[worker].done.recv() {
                Ok(jobs) => done.extend(jobs),
                Err(_) => lost.extend(sequences),
            }
        }
        (done, lost)
    }
}

fn compute(mut jobs: Vec<MaskJob>) -> Vec<MaskJob> {
    for job in &mut jobs {
        let started = Instant::now();
        job.mask = Some(job.constraint.mask_within(job.budget));
        metrics::histogram!(m::GRAMMAR_MASK_SECONDS).record(started.elapsed().as_secs_f64());
    }
    jobs
}
