//! Micro-batch overlap: a step's sequences split into two micro-batches that take turns, so that
//! one's attention (and shared expert) runs while the other's routed rows are with the experts.
//!
//! Per layer `l`, with micro-batches A and B:
//! `finish(A, l) → start(A, l+1) → finish(B, l) → start(B, l+1)`, where `start` is attention +
//! router + dispatch and `finish` is shared expert + wait + combine. While A waits for its experts,
//! B's attention has already run, and vice versa.

use candle_core::Tensor;
use epserve_model::{ExpertBackend, LogitsFor, Result, RoutingTrace, SequenceStep, TextModel};

/// Runs one step, split into overlapped micro-batches when `overlap` is set (the engine's
/// `--overlap`). Only the plain forward records the routing in `trace`: overlap does not trace.
pub fn forward_step(
    model: &TextModel,
    seqs: &mut [SequenceStep<'_>],
    experts: &dyn ExpertBackend,
    which: LogitsFor,
    overlap: bool,
    trace: Option<&mut RoutingTrace>,
) -> Result<Tensor> {
    if overlap { forward_overlapped(model, seqs, experts, which) } else { model.forward(seqs, experts, which, trace) }
}

/// Runs one step, overlapped across two micro-batches when there are at least two sequences.
/// Gives exactly the logits of [`TextModel::forward`] (each row sees only its own sequence).
pub fn forward_overlapped(
    model: &TextModel,
    seqs: &mut [SequenceStep<'_>],
    experts: &dyn ExpertBackend,
    which: LogitsFor,
) -> Result<Tensor> {
    if seqs.len() < 2 {
        return model.forward(seqs, experts, which, None);
    }
    let layers = model.config().num_hidden_layers;
    // Halve by rows, not by sequences: a prefill and many decodes should still split evenly.
    let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut rows = 0;
    let mut mid = 1;
    for (i, s) in seqs.iter().enumerate() {
        rows += s.tokens.len();
        if rows * 2 >= total {
            mid = (i + 1).clamp(1, seqs.len() - 1);
            break;
        }
    }
    let (a, b) = seqs.split_at_mut(mid);
    // On rayon's pool, as the plain forward runs: started from outside it, each of the step's
    // parallel regions would wake the pool and put this thread to sleep (`kernels::on_pool`).
    epserve_model::kernels::on_pool(|| {
        epserve_model::kernels::warm_step(|| {
            let mut step_a = model.begin_step(a)?;
            let mut step_b = model.begin_step(b)?;
            let mut flight_a = Some(model.start_layer(&mut step_a, 0, experts, None)?);
            let mut flight_b = Some(model.start_layer(&mut step_b, 0, experts, None)?);
            for layer in 0..layers {
                if let Some(f) = flight_a.take() {
                    model.finish_layer(&mut step_a, f)?;
                }
                if layer + 1 < layers {
                    flight_a = Some(model.start_layer(&mut step_a, layer + 1, experts, None)?);
                }
                if let Some(f) = flight_b.take() {
                    model.finish_layer(&mut step_b, f)?;
                }
                if layer + 1 < layers {
                    flight_b = Some(model.start_layer(&mut step_b, layer + 1, experts, None)?);
                }
            }
            let logits_a = model.finish_step(step_a, which)?;
            let logits_b = model.finish_step(step_b, which)?;
            Ok(Tensor::cat(&[logits_a, logits_b], 0)?)
        })
    })
}
