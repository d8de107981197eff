//! The bf16 mode (`--activations bf16`: rows rounded to bf16 and multiplied with `vdpbf16ps` on
//! CPUs with AVX512-BF16) against the transformers goldens of both fixtures: logits within
//! [`BF16_TOLERANCE`] at every position, for the prompt fed one token at a time (every product one
//! row: all of them in the mode) and whole (prefill: products of many rows, in the mode where the
//! CPU multiplies them with the instruction too, `kernels::bf16_products_of_many_rows`); and the
//! golden's greedy tokens decoded with the KV cache for as long as each step's top-1 margin exceeds
//! twice the tolerance (below that a flip is within the mode's error, and the continuation may part
//! from the golden's).

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::layers::WeightStorage;
use crate::parity_tests::{argmax, fixture_dir, golden_in, load_policy, max_abs_diff, rows, top2_fixture_dir};
use crate::quant::{Activations, LoadPolicy};
use crate::text_model::{LogitsFor, SequenceStep};

/// The bf16 mode's |Δlogit| bound against the goldens (logits of ~±3 on these fixtures): the
/// largest seen on Intel Xeon with AVX512-BF16 was 0.088 (top-2 fixture, T=33), 0.079 on the
/// other (docs/model.md, "bf16 mode").
const BF16_TOLERANCE: f32 = 0.15;

fn assert_bf16_mode_close(dir: &Path) {
    if !crate::kernels::bf16_products() {
        eprintln!(
            "note: no AVX512-BF16 here (or EPSERVE_KERNEL_ISA chose less): the bf16 mode runs the exact f32 forms"
        );
    } else if !crate::kernels::bf16_products_of_many_rows() {
        eprintln!("note: vdpbf16ps is slow here: the bf16 mode multiplies one-row products only");
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    let policy = LoadPolicy { activations: Activations::Bf16, ..WeightStorage::AsStored.into() };
    let m = load_policy(&cfg, &ckpt, policy);
    for case in golden_in(dir).cases {
        let t = case.input_ids.len();
        for (how, (logits, _)) in
            [("one at a time", m.incremental(&case.input_ids, &[1])), ("whole", m.full(&case.input_ids))]
        {
            let diff = max_abs_diff(&logits, &case.logits);
            eprintln!("{}: bf16 mode T={t}, prompt {how}: max |Δlogit| {diff}", dir.display());
            assert!(diff < BF16_TOLERANCE, "T={t}, prompt {how}: max |Δlogit| = {diff}");
        }

        let mut cache = m.model.new_cache();
        let mut next = case.input_ids.clone();
        for (step, &want) in case.greedy_tokens.iter().enumerate() {
            let out = m
                .model
                .forward(&mut [SequenceStep::new(&next, &mut cache)], &m.experts, LogitsFor::Last, None)
                .expect("forward");
            let row = rows(&out).remove(0);
            let got = argmax(&row);
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let margin = sorted[0] - sorted[1];
            if margin <= 2.0 * BF16_TOLERANCE {
                eprintln!("T={t}: greedy step {step}: margin {margin} within twice the tolerance; compared up to here");
                break;
            }
            assert_eq!(got, want, "T={t}: greedy token {step} (margin {margin})");
            next = vec![got];
        }
    }
}

#[test]
fn bf16_mode_stays_within_its_tolerance_of_the_golden() {
    assert_bf16_mode_close(&fixture_dir());
}

#[test]
fn bf16_mode_stays_within_its_tolerance_of_the_top2_dense_interleaved_golden() {
    assert_bf16_mode_close(&top2_fixture_dir());
}
