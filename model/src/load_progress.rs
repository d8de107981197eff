//! [`LoadProgress`]: loading a checkpoint with progress on the log, for the processes that load one
//! at start-up (the coordinator, the expert workers, the offline commands).

use std::time::Instant;

use crate::checkpoint::WeightSource;

/// Logs every 10 % of the bytes read, and the rate at the end.
pub struct LoadProgress<'a> {
    src: &'a dyn WeightSource,
    what: &'static str,
    total: u64,
    last_decile: u64,
    started: Instant,
}

impl std::fmt::Debug for LoadProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadProgress").field("what", &self.what).field("total", &self.total).finish_non_exhaustive()
    }
}

impl<'a> LoadProgress<'a> {
    pub fn new(src: &'a dyn WeightSource, what: &'static str) -> Self {
        LoadProgress { src, what, total: src.total_bytes().unwrap_or(0), last_decile: 0, started: Instant::now() }
    }

    /// Called after every tensor read.
    pub fn tick(&mut self) {
        // Small checkpoints load in milliseconds: only the final line is worth printing.
        if self.total < 256 << 20 {
            return;
        }
        let read = self.src.bytes_read();
        let decile = read * 10 / self.total;
        if decile > self.last_decile {
            self.last_decile = decile;
            tracing::info!(
                "loading {}: {:.1} of {:.1} MiB read ({}%)",
                self.what,
                read as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                read * 100 / self.total
            );
        }
    }

    pub fn finish(&self) {
        let secs = self.started.elapsed().as_secs_f64();
        let read = self.src.bytes_read() as f64 / 1048576.0;
        tracing::info!("loaded {}: {read:.1} MiB in {secs:.2} s ({:.0} MiB/s)", self.what, read / secs.max(1e-9));
    }
}
