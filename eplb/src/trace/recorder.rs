//! Recording from a serving process: a [`Recorder`] gathers each step's routed rows as the model
//! hands them to its experts (a layer may come in several batches, as micro-batch overlap sends
//! it) and passes the finished step to a [`TraceWriter`]. The step thread only encodes a byte or two
//! per routed row into a reused buffer and offers the step to the writer's bounded channel: it never
//! waits on the disk.

use std::path::Path;

use parking_lot::Mutex;

use super::{StepBuilder, TraceHeader, TraceWriter, WriterOptions, WriterStats};
use crate::error::TraceError;

/// A trace being recorded: the step being gathered and the writer it goes to.
#[derive(Debug)]
pub struct Recorder {
    writer: TraceWriter,
    state: Mutex<StepState>,
}

#[derive(Debug)]
struct StepState {
    step: StepBuilder,
    /// Single-id rows of one batch, reused.
    rows: Vec<Vec<u32>>,
    /// The layer of the last batch: a batch of an earlier layer starts a new step, so that what a
    /// failed step (never ended) gathered is dropped rather than added to the next.
    last_layer: Option<usize>,
}

impl StepState {
    fn enter(&mut self, layer: usize) {
        if self.last_layer.is_some_and(|last| layer < last) && !self.step.is_empty() {
            self.step.finish();
        }
        self.last_layer = Some(layer);
    }
}

impl Recorder {
    /// Starts a trace at `path` (replacing an earlier one and its parts).
    pub fn create(path: &Path, header: TraceHeader, options: WriterOptions) -> Result<Self, TraceError> {
        let writer = TraceWriter::create(path, header, options)?;
        let state = StepState { step: StepBuilder::new(writer.header()), rows: Vec::new(), last_layer: None };
        Ok(Recorder { writer, state: Mutex::new(state) })
    }

    pub fn header(&self) -> &TraceHeader {
        self.writer.header()
    }

    /// Notes one batch of `layer` whose rows are grouped by expert: `(expert, rows)` in batch
    /// order. Each row becomes one id (top-1: a row is a token; the token order inside a step is
    /// not kept, the loads are exact).
    pub fn record_groups(&self, layer: usize, groups: impl Iterator<Item = (u32, u32)> + Clone) {
        let mut state = self.state.lock();
        state.enter(layer);
        let StepState { step, rows, .. } = &mut *state;
        let total: usize = groups.clone().map(|(_, n)| n as usize).sum();
        if rows.len() < total {
            rows.resize_with(total, || Vec::with_capacity(1));
        }
        let mut i = 0;
        for (expert, n) in groups {
            for _ in 0..n {
                rows[i].clear();
                rows[i].push(expert);
                i += 1;
            }
        }
        step.record(layer, &rows[..total]);
    }

    /// Notes the top-k choices of each token of one batch of `layer`, in token order.
    pub fn record_rows(&self, layer: usize, per_row: &[Vec<u32>]) {
        let mut state = self.state.lock();
        state.enter(layer);
        state.step.record(layer, per_row);
    }

    /// Hands the step gathered so far to the writer (nothing when no MoE layer ran); `false` when
    /// the writer had no room and the step was dropped (counted).
    pub fn end_step(&self) -> bool {
        let body = {
            let mut state = self.state.lock();
            state.last_layer = None;
            if state.step.is_empty() {
                return true;
            }
            state.step.finish()
        };
        self.writer.submit(body)
    }

    /// Writes what is buffered, closes the trace and reports.
    pub fn finish(self) -> Result<WriterStats, TraceError> {
        self.writer.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::trace::{Record, TraceReader, config_hash};

    fn header(layers: Vec<u32>) -> TraceHeader {
        TraceHeader {
            model: "mini".into(),
            config_hash: config_hash(b"{}"),
            layers,
            num_experts: 16,
            top_k: 1,
            expert_bytes: 1,
            start_unix_ms: 0,
            part: 0,
        }
    }

    #[test]
    fn steps_are_recorded_with_their_rows_and_a_failed_step_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.trace");
        let r = Recorder::create(&path, header(vec![0, 1, 2]), WriterOptions::default()).expect("recorder");
        // Step 1: every layer, the second in two batches (as micro-batch overlap sends them).
        for l in 0..3 {
            r.record_groups(l, [(1, 2), (3, 1)].into_iter());
            if l == 1 {
                r.record_groups(l, [(0, 1)].into_iter());
            }
        }
        assert!(r.end_step());
        // A step that fails after two layers is never ended ...
        r.record_groups(0, [(2, 5)].into_iter());
        r.record_groups(1, [(2, 5)].into_iter());
        // ... and is dropped when the next one starts.
        for l in 0..3 {
            r.record_groups(l, [(4, 1)].into_iter());
        }
        assert!(r.end_step());
        // Token order kept when the caller has it.
        r.record_rows(0, &[vec![7], vec![5]]);
        assert!(r.end_step());
        assert!(r.end_step(), "an empty step writes nothing");
        let stats = r.finish().expect("finish");
        assert_eq!((stats.steps, stats.dropped_steps), (3, 0));

        let mut reader = TraceReader::open(&path).expect("open");
        let mut steps = Vec::new();
        while let Some(record) = reader.next_record().expect("record") {
            if let Record::Step(s) = record {
                steps.push((s.tokens, s.layers));
            }
        }
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[0].1, vec![vec![1, 1, 3], vec![1, 1, 3, 0], vec![1, 1, 3]]);
        assert_eq!(steps[1].1, vec![vec![4], vec![4], vec![4]]);
        assert_eq!(steps[2], (2, vec![vec![7, 5], vec![], vec![]]));
    }

    /// What recording costs the step thread: a 512-token step over 8 MoE layers (the `mini`
    /// shape, 16 experts) is noted and handed over in microseconds, against the tens of
    /// milliseconds (decode) to a second (prefill) such a step computes on the 2-core CI host.
    #[test]
    fn recording_a_step_costs_the_step_thread_microseconds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Recorder::create(&dir.path().join("t"), header((0..8).collect()), WriterOptions::default())
            .expect("recorder");
        let groups: Vec<(u32, u32)> = (0..16).map(|e| (e, 32)).collect();
        let steps = 2000u32;
        let started = Instant::now();
        for _ in 0..steps {
            for l in 0..8 {
                r.record_groups(l, groups.iter().copied());
            }
            r.end_step();
        }
        let per_step = started.elapsed() / steps;
        let stats = r.finish().expect("finish");
        eprintln!(
            "recording: {per_step:?} per 512-token step; {} written, {} dropped",
            stats.steps, stats.dropped_steps
        );
        assert_eq!(stats.steps + stats.dropped_steps, u64::from(steps));
        assert!(per_step.as_micros() < 500, "{per_step:?} per step");
    }
}
