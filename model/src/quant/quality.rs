//! How far a quantized model's next-token distributions are from the unquantized model's, over the
//! same positions: the measures llama.cpp's `--kl-divergence` reports. `KL(P_ref ‖ P_quant)` of the
//! softmaxes, per position (mean and 99th percentile), how often both pick the same top-1 token,
//! and the largest absolute difference of one logit.

use serde::Serialize;

/// The comparison of two runs over the same positions.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Quality {
    pub positions: usize,
    pub mean_kl: f64,
    pub p99_kl: f64,
    pub max_kl: f64,
    /// Fraction of positions where both runs' highest logit is the same token.
    pub top1_agreement: f64,
    pub max_abs_logit_diff: f64,
}

/// Accumulates positions, then [`Comparison::finish`]es.
#[derive(Debug, Default)]
pub struct Comparison {
    kl: Vec<f64>,
    agree: usize,
    max_abs: f64,
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&l| l as f64 - log_z).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
}

impl Comparison {
    /// One position: the reference run's logits and the quantized run's.
    ///
    /// # Panics
    /// If the two have different lengths (a caller's bug: the same vocabulary is compared).
    pub fn add(&mut self, reference: &[f32], candidate: &[f32]) {
        assert_eq!(reference.len(), candidate.len(), "logits of different vocabularies");
        let (p, q) = (log_softmax(reference), log_softmax(candidate));
        let kl: f64 = p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
        self.kl.push(kl.max(0.0));
        self.agree += usize::from(argmax(reference) == argmax(candidate));
        let diff = reference.iter().zip(candidate).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        self.max_abs = self.max_abs.max(diff);
    }

    pub fn finish(mut self) -> Quality {
        let n = self.kl.len();
        if n == 0 {
            return Quality::default();
        }
        self.kl.sort_by(f64::total_cmp);
        let p99 = self.kl[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
        Quality {
            positions: n,
            mean_kl: self.kl.iter().sum::<f64>() / n as f64,
            p99_kl: p99,
            max_kl: self.kl[n - 1],
            top1_agreement: self.agree as f64 / n as f64,
            max_abs_logit_diff: self.max_abs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_runs_agree_and_different_ones_do_not() {
        let mut same = Comparison::default();
        same.add(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        let q = same.finish();
        assert_eq!((q.positions, q.top1_agreement, q.max_abs_logit_diff), (1, 1.0, 0.0));
        assert!(q.mean_kl.abs() < 1e-12);

        let mut other = Comparison::default();
        other.add(&[0.0, 0.0], &[0.0, 0.0]);
        other.add(&[3.0, 0.0], &[0.0, 3.0]);
        let q = other.finish();
        assert_eq!(q.top1_agreement, 0.5);
        assert_eq!(q.max_abs_logit_diff, 3.0);
        // KL(p‖q) for p = softmax(3, 0), q = softmax(0, 3), over two positions.
        let (a, b) = (1.0 / (1.0 + (-3f64).exp()), 1.0 / (1.0 + 3f64.exp()));
        let kl = a * (a / b).ln() + b * (b / a).ln();
        assert!((q.mean_kl - kl / 2.0).abs() < 1e-9 && (q.p99_kl - kl).abs() < 1e-9, "{q:?}");
    }
}
