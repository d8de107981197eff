//! The machine's peak rate of f32 multiply-adds, measured in the instruction set the kernels use
//! ([`super::isa`]): the arithmetic bound `decode-bench --probe-bandwidth` puts each batch size
//! against, next to its memory bound.

use std::time::Instant;

/// Independent accumulators per thread: enough to cover the FMA latency on both FMA ports of
/// current x86 cores (4–5 cycles × 2), so that only the FMA units bound the loop.
const CHAINS: usize = 12;

/// f32 multiply-adds per second on every thread of rayon's pool (best of 3 runs of ~0.1 s).
pub fn peak_multiply_adds_per_s() -> f64 {
    use rayon::prelude::*;
    const ITERATIONS: usize = 1 << 23;
    let threads = rayon::current_num_threads();
    let mut best = 0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let (done, sink): (usize, f32) = (0..threads)
            .into_par_iter()
            .map(|t| one_thread(ITERATIONS, 1.0 + t as f32 * 1e-3))
            .reduce(|| (0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let rate = done as f64 / started.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        best = best.max(rate);
    }
    best
}

/// Runs `iterations` rounds of [`CHAINS`] vector multiply-adds; returns the scalar multiply-adds
/// done and a value that depends on every one (so that none is optimized away).
fn one_thread(iterations: usize, seed: f32) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    match super::isa() {
        // SAFETY: the CPU has AVX-512F (`isa` picks only what it has).
        super::Isa::Avx512 => return (iterations * CHAINS * 16, unsafe { chains_avx512(iterations, seed) }),
        // SAFETY: the CPU has AVX2 and FMA (as above).
        super::Isa::Avx2 => return (iterations * CHAINS * 8, unsafe { chains_avx2(iterations, seed) }),
        super::Isa::Portable => {}
    }
    (iterations * CHAINS, chains_portable(iterations, seed))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_avx512(iterations: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(seed); CHAINS];
    for _ in 0..iterations {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2(iterations: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(seed); CHAINS];
    for _ in 0..iterations {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    acc.iter()
        .map(|&x| {
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
            lanes.iter().sum::<f32>()
        })
        .sum()
}

/// Scalar multiply-adds (what the portable kernels get: the compiler may vectorize them with the
/// target's baseline vectors, which is then counted as one lane).
fn chains_portable(iterations: usize, seed: f32) -> f32 {
    let mut acc = [seed; CHAINS];
    for _ in 0..iterations {
        for x in acc.iter_mut() {
            *x = *x * 0.999_999 + 1e-7;
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_is_positive_and_finite() {
        let peak = super::peak_multiply_adds_per_s();
        assert!(peak.is_finite() && peak > 1e6, "{peak}");
    }
}
