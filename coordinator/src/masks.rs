//! Grammar masks computed beside the forward pass. A constrained request's next-token mask depends
//! only on the tokens it has already emitted, not on this step's logits, so it is computed on other
//! threads while the step's forward pass runs and is ready when sampling starts: the grammar costs
//! the step nothing as long as the masks take less time than the forward pass (on every machine we
//! measured, by far; docs/benchmarks.md).

use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use epserve_grammar::{GrammarError, TokenConstraint, TokenMask};
use epserve_proto::metric_names as m;

/// Threads that compute one step's masks at most (each takes a share of the requests).
const MASK_THREADS: usize = 4;

/// One request's grammar, taken out of its sequence for the step, and its mask once computed.
#[derive(Debug)]
pub struct MaskJob {
    /// The sequence's arrival id.
    pub sequence: u64,
    pub constraint: TokenConstraint,
    pub mask: Option<Result<TokenMask, GrammarError>>,
}

/// Masks being computed on scoped threads.
pub struct MasksInFlight<'scope> {
    handles: Vec<ScopedJoinHandle<'scope, Vec<MaskJob>>>,
    /// Which sequences each thread took, to fail them if a thread panics.
    sequences: Vec<Vec<u64>>,
}

impl<'scope> MasksInFlight<'scope> {
    /// Starts computing `jobs`' masks on up to [`MASK_THREADS`] threads of `scope`.
    pub fn start<'env>(scope: &'scope Scope<'scope, 'env>, jobs: Vec<MaskJob>) -> Self {
        let threads =
            MASK_THREADS.min(std::thread::available_parallelism().map_or(1, |n| n.get())).min(jobs.len()).max(1);
        let per_thread = jobs.len().div_ceil(threads).max(1);
        let mut handles = Vec::with_capacity(threads);
        let mut sequences = Vec::with_capacity(threads);
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let share: Vec<MaskJob> = jobs.by_ref().take(per_thread).collect();
            sequences.push(share.iter().map(|j| j.sequence).collect());
            handles.push(scope.spawn(move || compute(share)));
        }
        MasksInFlight { handles, sequences }
    }

    /// Waits for every mask. A thread that panicked (a bug in the grammar engine) loses its
    /// requests' grammars: they are returned as the sequences to fail.
    pub fn finish(self) -> (Vec<MaskJob>, Vec<u64>) {
        let mut done = Vec::new();
        let mut lost = Vec::new();
        for (handle, sequences) in self.handles.into_iter().zip(self.sequences) {
            match handle.join() {
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
        job.mask = Some(job.constraint.mask());
        record(started.elapsed());
    }
    jobs
}

fn record(elapsed: Duration) {
    metrics::histogram!(m::GRAMMAR_MASK_SECONDS).record(elapsed.as_secs_f64());
}
