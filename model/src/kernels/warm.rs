//! Keeping rayon's threads awake between the parallel regions of a step.
//!
//! A decode step on a small batch is a few hundred short parallel regions (products, attention)
//! with a little serial work between them (norms, residual adds, the router). A rayon thread that
//! finds no work yields 32 times and then sleeps on a futex; the next region wakes it again, and on
//! a virtual machine a wake-up costs tens of microseconds, as much as a small product. Profiles of
//! batch-1 decode put ~15 % of the step in the scheduler (docs/benchmarks.md).
//!
//! Inside [`warm_step`] (the coordinator's model steps), each product first calls [`keep_warm`],
//! which leaves a *keeper* job on every other thread of the pool. A keeper runs rayon's pending
//! jobs as they appear ([`rayon::yield_now`]) and spins with `pause` in between, so its thread
//! takes the next region's tasks at once; after [`spin_budget`] without work, or when the step
//! waits for something outside the pool ([`idle`]: answers from expert workers), it returns and
//! the thread sleeps as before. It is the trade llama.cpp's thread pool makes (threads poll between
//! graph nodes): a spinning thread holds its core, which costs nothing while the step has the
//! machine to itself, and would slow an expert worker on the same host if it went on during the
//! exchange, hence [`idle`]. Expert workers' products never start keepers. `EPSERVE_POOL_SPIN_US`
//! sets the budget (0 turns keepers off).

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Idle time a keeper spins through before it lets its thread sleep, unless
/// `EPSERVE_POOL_SPIN_US` says otherwise.
const DEFAULT_SPIN: Duration = Duration::from_micros(300);

thread_local! {
    /// On a pool thread: whether a keeper runs on it (a keeper's own pending jobs run inside it).
    static KEEPING: Cell<bool> = const { Cell::new(false) };
    /// On a thread that starts regions: when it last made sure of keepers.
    static WARMED: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Whether this thread runs a step whose products keep the pool warm ([`warm_step`]).
    static IN_WARM_STEP: Cell<bool> = const { Cell::new(false) };
}

/// Steps waiting outside the pool ([`idle`]); keepers return while it is not zero.
static IDLING: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` (a model step, on a thread of the pool) with keepers on the pool's other threads
/// between its products ([`keep_warm`]).
pub fn warm_step<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_WARM_STEP.set(self.0);
        }
    }
    let _restore = Restore(IN_WARM_STEP.replace(true));
    keep_warm();
    f()
}

/// Runs `f`, a wait for something outside the pool, with every keeper told to return, so that the
/// cores are free for whoever computes the answer; the next product starts keepers again.
pub fn idle<R>(f: impl FnOnce() -> R) -> R {
    struct Resume;
    impl Drop for Resume {
        fn drop(&mut self) {
            IDLING.fetch_sub(1, Ordering::AcqRel);
        }
    }
    IDLING.fetch_add(1, Ordering::AcqRel);
    let _resume = Resume;
    WARMED.set(None);
    f()
}

/// [`keep_warm`] where this thread runs a [`warm_step`]; else nothing.
pub(crate) fn keep_warm_in_step() {
    if IN_WARM_STEP.get() {
        keep_warm();
    }
}

/// How long a keeper spins without work: `EPSERVE_POOL_SPIN_US` (microseconds) or 300 µs.
pub fn spin_budget() -> Duration {
    static BUDGET: OnceLock<Duration> = OnceLock::new();
    *BUDGET.get_or_init(|| match std::env::var("EPSERVE_POOL_SPIN_US") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(us) => Duration::from_micros(us),
            Err(_) => {
                tracing::warn!(value = %v, "EPSERVE_POOL_SPIN_US is not a whole number of microseconds; using 300");
                DEFAULT_SPIN
            }
        },
        Err(_) => DEFAULT_SPIN,
    })
}

/// Makes sure every other thread of rayon's pool has a keeper that spins for [`spin_budget`].
/// Does nothing outside the pool, on a pool of one thread, or with a zero budget.
pub(crate) fn keep_warm() {
    warm_for(spin_budget());
}

/// [`keep_warm`] with keepers that spin for `budget`. Keepers started by this thread less than
/// half a budget ago are taken to be running (each region since then kept them busy), so a step's
/// hundreds of calls send a few broadcasts; a thread whose keeper has returned meanwhile only
/// sleeps as it would without one.
fn warm_for(budget: Duration) {
    if rayon::current_thread_index().is_none()
        || rayon::current_num_threads() < 2
        || budget.is_zero()
        || IDLING.load(Ordering::Acquire) > 0
    {
        return;
    }
    let now = Instant::now();
    let recent = WARMED.get().is_some_and(|at| now.saturating_duration_since(at) < budget / 2);
    WARMED.set(Some(now));
    if recent {
        return;
    }
    // One job per thread; on this thread, and on one whose keeper runs, it returns at once.
    rayon::spawn_broadcast(move |_| {
        if !KEEPING.get() && WARMED.get().is_none_or(|at| at.elapsed() >= budget / 2) {
            KEEPING.set(true);
            keep(budget);
            KEEPING.set(false);
        }
    });
}

/// Runs pending jobs until none has come for `budget`, or a step waits outside the pool.
fn keep(budget: Duration) {
    let mut idle_since: Option<Instant> = None;
    loop {
        if IDLING.load(Ordering::Relaxed) > 0 {
            return;
        }
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            Some(rayon::Yield::Idle) => {
                if idle_since.get_or_insert_with(Instant::now).elapsed() >= budget {
                    return;
                }
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rayon::prelude::*;

    #[test]
    fn keepers_take_the_regions_and_let_their_threads_sleep_after_the_budget() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a pool of 3 threads");
        let budget = Duration::from_millis(400);
        let (sums, keeping) = pool.install(|| {
            let sums: Vec<u64> = (0..200u64)
                .map(|round| {
                    super::warm_for(budget);
                    (0..1000u64).into_par_iter().map(|v| v * round).sum()
                })
                .collect();
            // This thread has no keeper; the others' broadcast jobs run inside theirs.
            let me = rayon::current_thread_index().expect("installed on the pool");
            let keeping = rayon::broadcast(|ctx| (ctx.index(), super::KEEPING.get()));
            (sums, keeping.into_iter().map(|(i, k)| k == (i != me)).collect::<Vec<_>>())
        });
        for (round, sum) in sums.iter().enumerate() {
            assert_eq!(*sum, 999 * 1000 / 2 * round as u64);
        }
        assert_eq!(keeping, vec![true; 3], "keepers on every thread but the caller");
        std::thread::sleep(budget * 3);
        let keeping = pool.broadcast(|_| super::KEEPING.get());
        assert_eq!(keeping, vec![false; 3], "keepers return after the budget");
    }
}
