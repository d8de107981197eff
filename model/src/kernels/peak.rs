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

/// How many times the f32 multiply-adds per second of FMAs `vdpbf16ps` does on this core (each
/// instruction counted as 32 multiply-adds): runs of the two alternate, 7 of each (~1 ms a run),
/// and the best of each counts, so that a run slowed by another thread on the same core (a
/// hyperthread sibling) does not decide. `None` without AVX-512 kernels and AVX512-BF16.
pub fn bf16_dot_speedup() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512 && std::is_x86_feature_detected!("avx512bf16") {
        const ITERATIONS: usize = 1 << 17;
        let rate = |f: &dyn Fn() -> f32, per_iteration: usize| {
            let started = Instant::now();
            std::hint::black_box(f());
            (ITERATIONS * per_iteration) as f64 / started.elapsed().as_secs_f64()
        };
        let (mut f32_rate, mut bf16_rate) = (0f64, 0f64);
        for _ in 0..7 {
            // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked above).
            f32_rate = f32_rate.max(rate(&|| unsafe { chains_avx512(ITERATIONS, 1.0) }, CHAINS * 16));
            // SAFETY: as above.
            bf16_rate = bf16_rate.max(rate(&|| unsafe { chains_bf16(ITERATIONS) }, CHAINS * 32));
        }
        return Some(bf16_rate / f32_rate);
    }
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn chains_bf16(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    // Pairs of bf16 1.0 (0x3f80).
    // SAFETY: both types are 64 bytes of bits.
    let ones = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3f80)) };
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for x in acc.iter_mut() {
            *x = _mm512_dpbf16_ps(*x, ones, ones);
        }
    }
    acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
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
    fn the_bf16_rate_is_positive_where_measured() {
        if let Some(ratio) = super::bf16_dot_speedup() {
            eprintln!("vdpbf16ps: {ratio:.2}x the f32 FMA rate");
            assert!(ratio.is_finite() && ratio > 0.0, "{ratio}");
        }
    }

    #[test]
    fn the_peak_is_positive_and_finite() {
        let peak = super::peak_multiply_adds_per_s();
        assert!(peak.is_finite() && peak > 1e6, "{peak}");
    }
}
