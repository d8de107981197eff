//! Plain-Rust f32 kernels for the products candle's CPU gemm handles poorly: a weight streamed once
//! against up to 64 rows, as in every decode-time product (a batch of 32 tokens gives each of 16
//! experts about two rows, and the attention projections, shared expert and lm_head 32 rows).
//! candle packs both operands and pays a fixed cost per op, which at that shape halves the
//! bandwidth the weight streams at (docs/benchmarks.md); here each weight row is read once from
//! memory and multiplied against every input row while it is in cache.
//!
//! Two forms, each for the instruction sets [`isa`] picks from: the dot-product form (vectors along
//! `k`, up to 8 rows: [`dot512`] on AVX-512, [`dot256`] on AVX2, else the portable [`dot`]) and the
//! outer-product form (vectors along the rows, 9 to 64 rows: [`outer`] on AVX-512, [`outer256`] on
//! AVX2). Several products can run as one parallel region
//! ([`products`]): a decode step makes hundreds of them, and waking the thread pool for each costs
//! more than a small product.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod bf16dot;
mod dot;
#[cfg(target_arch = "x86_64")]
mod dot256;
#[cfg(target_arch = "x86_64")]
mod dot512;
#[cfg(target_arch = "x86_64")]
mod int8_avx2;
mod isa;
pub(crate) mod lanes;
#[cfg(target_arch = "x86_64")]
mod outer;
#[cfg(target_arch = "x86_64")]
mod outer256;
mod peak;
pub mod source;
#[cfg(target_arch = "x86_64")]
mod vnni;
mod warm;

use rayon::prelude::*;

pub use isa::{Isa, isa};
pub use peak::{bf16_dot_speedup, peak_multiply_adds_per_s};
pub use source::{CodeKind, QuantView, ScalesRef};
use source::{Dense, Fp8Source, Int4Source, Int8Source};
pub use warm::{idle, spin_budget, warm_step};

/// A stored weight element, widened to f32 where it is multiplied. bf16 weights are the
/// checkpoint's own values: widening is exact, so a product over bf16 weights equals the product
/// over the same weights converted to f32 at load, bit for bit, at half the bytes read.
pub trait Weight: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// 16 consecutive weights from `p`, widened.
    ///
    /// # Safety
    /// 16 elements must be readable from `p`, and the CPU must have AVX-512F (callers are compiled
    /// with it; this is inlined into them).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// 16 consecutive weights from `p`, widened, as two 8-wide vectors.
    ///
    /// # Safety
    /// 16 elements must be readable from `p`, and the CPU must have AVX2 (callers are compiled with
    /// it; this is inlined into them).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx2(p: *const Self) -> [std::arch::x86_64::__m256; 2];
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable elements and AVX-512F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const f32) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable elements and AVX2.
        unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
    }
}

impl Weight for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable elements (32 bytes) and AVX-512F.
        unsafe {
            let halves = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const half::bf16) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable elements (32 bytes) and AVX2.
        unsafe {
            let halves = _mm256_loadu_si256(p.cast());
            let widen = |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            [widen(_mm256_castsi256_si128(halves)), widen(_mm256_extracti128_si256::<1>(halves))]
        }
    }
}

/// A weight matrix `[n, k]`, row-major, in one of the stored element types or quantized.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    /// bf16 weights multiplied with the rows rounded to bf16 (`--activations bf16`): `vdpbf16ps`
    /// where the CPU has AVX512-BF16 (see [`bf16_products`]), else exactly as [`Weights::Bf16`].
    Bf16Products(&'a [half::bf16]),
    Quant(QuantView<'a>),
}

impl<'a> Weights<'a> {
    /// Elements (`n · k`).
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) | Weights::Bf16Products(w) => w.len(),
            Weights::Quant(q) => q.n() * q.k(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `first..first + count` of a matrix with rows of `k` elements.
    fn rows(&self, first: usize, count: usize, k: usize) -> Weights<'a> {
        let range = first * k..(first + count) * k;
        match *self {
            Weights::F32(w) => Weights::F32(&w[range]),
            Weights::Bf16(w) => Weights::Bf16(&w[range]),
            Weights::Bf16Products(w) => Weights::Bf16Products(&w[range]),
            Weights::Quant(q) => Weights::Quant(q.rows(first, count)),
        }
    }
}

/// Output features per parallel task for the outer form: a multiple of its every block height.
const OUTER_TASK_FEATURES: usize = 120;
/// Tasks per thread of the pool the dot form aims at, and the multiple of its block heights a task
/// is rounded to.
const DOT_TASKS_PER_THREAD: usize = 4;
/// Rows up to which the AVX-512 dot forms read a matrix one row at a time (see `dot512`).
#[cfg(target_arch = "x86_64")]
const SHORT_ROWS: usize = 2048;
const DOT_TASK_MULTIPLE: usize = 24;

/// Output features per task for a product with `n` of them in the dot form (decode, memory-bound):
/// a few tasks per thread, so that no thread idles while another streams the last rows of a small
/// matrix (a `[128, 512]` projection in fixed tasks of 120 features left one thread 8 of them). The
/// compute-bound forms keep large tasks ([`Staged::task_features`]).
fn dot_task_features(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    n.div_ceil(threads * DOT_TASKS_PER_THREAD).next_multiple_of(DOT_TASK_MULTIPLE).max(DOT_TASK_MULTIPLE)
}

/// One product `yᵀ = (x · wᵀ)ᵀ` for `x` `[m, k]` and `w` `[n, k]`, both row-major, into `yt`
/// `[n, m]` (transposed: each parallel task owns a contiguous range of output features).
#[derive(Debug)]
pub struct Product<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: Weights<'a>,
    pub k: usize,
    pub yt: &'a mut [f32],
}

/// Every product of `batch` as one parallel region of rayon's pool, split by output features.
pub fn products(batch: Vec<Product<'_>>) {
    // The outer form reads `x` transposed, the int8-activation mode quantized: done once per
    // product, before the region.
    warm::keep_warm_in_step();
    let staged: Vec<Staged> = if batch.len() > 1 {
        batch.par_iter().map(Staged::new).collect()
    } else {
        batch.iter().map(Staged::new).collect()
    };
    let mut tasks = Vec::new();
    for (p, staged) in batch.into_iter().zip(&staged) {
        debug_assert_eq!(p.x.len(), p.m * p.k);
        debug_assert_eq!(p.w.len() * p.m, p.yt.len() * p.k);
        if p.m == 0 {
            continue;
        }
        let (m, k) = (p.m, p.k);
        let per_task = staged.task_features(p.yt.len() / m);
        for (i, yt) in p.yt.chunks_mut(per_task * m).enumerate() {
            let first = i * per_task;
            let w = p.w.rows(first, yt.len() / m, k);
            let x = match staged {
                Staged::Rows => Input::Rows(p.x),
                Staged::Transposed(xt) => Input::Transposed(xt),
                #[cfg(target_arch = "x86_64")]
                Staged::Int8(xq) => Input::Int8(xq),
                #[cfg(target_arch = "x86_64")]
                Staged::Int8Avx2(xq) => Input::Int8Avx2(xq),
                #[cfg(target_arch = "x86_64")]
                Staged::Bf16(xb) => Input::Bf16(xb),
            };
            tasks.push((x, m, w, k, yt));
        }
    }
    tasks.into_par_iter().for_each(|(x, m, w, k, yt)| match (x, w) {
        #[cfg(target_arch = "x86_64")]
        (Input::Int8(xq), Weights::Quant(q)) => vnni::features_of(xq, q, yt),
        #[cfg(target_arch = "x86_64")]
        (Input::Int8Avx2(xq), Weights::Quant(q)) => int8_avx2::features_of(xq, q, yt),
        #[cfg(target_arch = "x86_64")]
        (Input::Bf16(xb), Weights::Bf16Products(w)) => bf16dot::features_of(xb, w, yt),
        (x, Weights::F32(w)) => task(x, m, Dense { w, k }, yt),
        (x, Weights::Bf16(w) | Weights::Bf16Products(w)) => task(x, m, Dense { w, k }, yt),
        (x, Weights::Quant(q)) => match q.kind() {
            CodeKind::Int8 => task(x, m, Int8Source(q), yt),
            CodeKind::Int4 => task(x, m, Int4Source(q), yt),
            CodeKind::Fp8E4m3 => task(x, m, Fp8Source(q), yt),
        },
    });
}

fn task<S: source::MatrixSource>(x: Input<'_>, m: usize, w: S, yt: &mut [f32]) {
    match (x, isa()) {
        #[cfg(target_arch = "x86_64")]
        (Input::Rows(x), Isa::Avx512) => dot512::features_of(x, m, w, yt),
        #[cfg(target_arch = "x86_64")]
        (Input::Rows(x), Isa::Avx2) => dot256::features_of(x, m, w, yt),
        (Input::Rows(x), _) => dot::features(x, m, w, yt),
        #[cfg(target_arch = "x86_64")]
        (Input::Transposed(xt), Isa::Avx512) => outer::features_of(xt, m, w, yt),
        #[cfg(target_arch = "x86_64")]
        (Input::Transposed(xt), _) => outer256::features_of(xt, m, w, yt),
        #[cfg(not(target_arch = "x86_64"))]
        (Input::Transposed(_), _) => unreachable!("no outer form on this architecture"),
        #[cfg(target_arch = "x86_64")]
        (Input::Int8(_) | Input::Int8Avx2(_), _) => unreachable!("int8 rows are staged for quantized weights only"),
        #[cfg(target_arch = "x86_64")]
        (Input::Bf16(_), _) => unreachable!("bf16 rows are staged for bf16-product weights only"),
    }
}

/// A product's rows as prepared before its parallel region.
enum Staged {
    /// As given, for the dot form.
    Rows,
    /// For the outer form ([`transposed_for_outer`]).
    Transposed(Vec<f32>),
    /// Quantized, for the int8-activation mode (AVX512-VNNI).
    #[cfg(target_arch = "x86_64")]
    Int8(vnni::Int8Rows),
    /// Quantized, for the int8-activation mode (AVX2).
    #[cfg(target_arch = "x86_64")]
    Int8Avx2(int8_avx2::Int8Rows),
    /// Rounded to bf16, for the bf16 mode (AVX512-BF16).
    #[cfg(target_arch = "x86_64")]
    Bf16(bf16dot::Bf16Rows),
}

impl Staged {
    /// Output features per parallel task for a product with `n` of them: large tasks for the
    /// compute-bound outer forms (whole blocks of 32 for AMX tiles), a few per thread for the dot form.
    fn task_features(&self, n: usize) -> usize {
        match self {
            Staged::Transposed(_) => OUTER_TASK_FEATURES,
            #[cfg(target_arch = "x86_64")]
            Staged::Bf16(xb) if xb.tiles() => amx::TASK_FEATURES,
            #[cfg(target_arch = "x86_64")]
            Staged::Bf16(xb) if xb.outer() => OUTER_TASK_FEATURES,
            _ => dot_task_features(n),
        }
    }

    fn new(p: &Product<'_>) -> Staged {
        #[cfg(target_arch = "x86_64")]
        if let Weights::Bf16Products(_) = &p.w
            && bf16dot::takes(p.m)
        {
            return Staged::Bf16(bf16dot::Bf16Rows::stage(p.x, p.m, p.k));
        }
        #[cfg(target_arch = "x86_64")]
        if let Weights::Quant(q) = &p.w
            && vnni::takes(q, p.m)
        {
            return Staged::Int8(vnni::Int8Rows::quantize(p.x, p.m, p.k, q.kind()));
        }
        #[cfg(target_arch = "x86_64")]
        if let Weights::Quant(q) = &p.w
            && int8_avx2::takes(q, p.m)
        {
            return Staged::Int8Avx2(int8_avx2::Int8Rows::quantize(p.x, p.m, p.k));
        }
        match transposed_for_outer(p.x, p.m, p.k) {
            Some(xt) => Staged::Transposed(xt),
            None => Staged::Rows,
        }
    }
}

/// The rows of a product as a task reads them.
enum Input<'a> {
    /// `[m, k]`, for the dot form.
    Rows(&'a [f32]),
    /// `[k, padded m]`, for the outer form.
    Transposed(&'a [f32]),
    /// Quantized to int8, for the int8-activation mode (AVX512-VNNI).
    #[cfg(target_arch = "x86_64")]
    Int8(&'a vnni::Int8Rows),
    /// Quantized to int8, for the int8-activation mode (AVX2).
    #[cfg(target_arch = "x86_64")]
    Int8Avx2(&'a int8_avx2::Int8Rows),
    /// Rounded to bf16, for the bf16 mode (AVX512-BF16).
    #[cfg(target_arch = "x86_64")]
    Bf16(&'a bf16dot::Bf16Rows),
}

/// `x` laid out for the outer form when that form takes `m` rows on this CPU, else `None`.
fn transposed_for_outer(x: &[f32], m: usize, k: usize) -> Option<Vec<f32>> {
    let lanes = isa().outer_lanes()?;
    (m > dot::MAX_ROWS && m <= max_rows()).then(|| transpose_padded(x, m, k, lanes))
}

/// `x` (`[m, k]`) transposed to `[k, padded]`, rows padded with zeros to a whole number of
/// `lanes`-wide vectors: the outer forms' layout.
fn transpose_padded(x: &[f32], m: usize, k: usize, lanes: usize) -> Vec<f32> {
    let padded = m.div_ceil(lanes) * lanes;
    let mut xt = vec![0f32; k * padded];
    transpose_strided(x, m, k, &mut xt, padded);
    xt
}

/// One product (see [`Product`]); `n` is the number of output features.
pub fn rows_times_weight_t(x: &[f32], m: usize, w: Weights<'_>, n: usize, k: usize, yt: &mut [f32]) {
    debug_assert_eq!(w.len(), n * k);
    products(vec![Product { x, m, w, k, yt }]);
}

/// The most rows [`products`] should be given on this CPU: 64 with AVX-512 or AVX2 (the outer
/// forms), else 8. Beyond that a product is compute-bound and candle's packed gemm does better.
pub fn max_rows() -> usize {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => outer::MAX_ROWS,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => outer256::MAX_ROWS,
        _ => dot::MAX_ROWS,
    }
}

/// Whether `--activations bf16` multiplies with `vdpbf16ps` on this CPU (AVX-512 kernels chosen and
/// AVX512-BF16 present): one-row products (unless `EPSERVE_BF16_ROWS=batched`), products of up to
/// 64 rows where the instruction is fast enough ([`bf16_products_of_many_rows`]); other products
/// are the exact f32 ones.
pub fn bf16_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    return bf16dot::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the bf16 mode multiplies products of several rows (up to 64) in bf16 too: on CPUs where
/// `vdpbf16ps` does at least 1.25× the multiply-adds per second of f32 FMAs (measured once) or that
/// have AMX-BF16 tiles (products of 16 rows and more on them, unless `EPSERVE_AMX=off`), or as
/// `EPSERVE_BF16_ROWS=many|one|batched` says.
pub fn bf16_products_of_many_rows() -> bool {
    #[cfg(target_arch = "x86_64")]
    return bf16dot::available() && bf16dot::full_rate();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs `f` on a thread of rayon's global pool (at once when already on one). A decode step starts
/// a few hundred parallel regions; started from outside the pool, each one wakes the pool's
/// threads and puts the caller to sleep, which on a small machine costs more than the product. A
/// step run inside the pool hands its products to the other threads through the work queues (and
/// inside [`warm_step`], keeps them spinning between its regions rather than asleep).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() { f() } else { rayon::scope(|_| f()) }
}

/// The values of a contiguous CPU tensor (f32 or bf16), borrowed for as long as the view lives.
pub(crate) struct CpuView<'t> {
    storage: Box<dyn std::ops::Deref<Target = candle_core::Storage> + 't>,
    range: std::ops::Range<usize>,
}

impl<'t> CpuView<'t> {
    /// `None` for a tensor that is not contiguous, on the CPU, and f32 or bf16.
    pub fn new(t: &'t candle_core::Tensor) -> Option<Self> {
        if !t.is_contiguous() {
            return None;
        }
        let (storage, layout) = t.storage_and_layout();
        let range = layout.start_offset()..layout.start_offset() + t.elem_count();
        let view = CpuView { storage: Box::new(storage), range };
        view.values()?;
        Some(view)
    }

    fn values(&self) -> Option<Weights<'_>> {
        // Matched, not asked with `as_slice`: a refusal there builds an error with a backtrace.
        match &**self.storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                Some(Weights::F32(v.get(self.range.clone())?))
            }
            candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                Some(Weights::Bf16(v.get(self.range.clone())?))
            }
            _ => None,
        }
    }

    /// The values; checked when the view was made (the storage cannot change while borrowed).
    pub fn weights(&self) -> Weights<'_> {
        self.values().unwrap_or(Weights::F32(&[]))
    }

    /// The values when they are f32.
    pub fn f32(&self) -> Option<&[f32]> {
        match self.weights() {
            Weights::F32(v) => Some(v),
            Weights::Bf16(_) | Weights::Bf16Products(_) | Weights::Quant(_) => None,
        }
    }
}

/// `x · Wᵀ` for f32 `x` `[m, k]` and an f32 or bf16 `w` `[n, k]` on the CPU, in blocks of
/// [`max_rows`] rows (one parallel region for all); `None` when the tensors are not that (the
/// caller uses candle).
pub(crate) fn matmul_t(x: &candle_core::Tensor, w: &candle_core::Tensor) -> Option<candle_core::Tensor> {
    let (&[_, k], &[n, k2]) = (x.dims(), w.dims()) else { return None };
    if k != k2 || x.dtype() != candle_core::DType::F32 || !x.device().is_cpu() {
        return None;
    }
    let ws = CpuView::new(w)?;
    matmul_t_weights(x, ws.weights(), n)
}

/// `x · Wᵀ` for f32 `x` `[m, k]` on the CPU and any stored weight matrix `w` `[n, k]`, in blocks of
/// [`max_rows`] rows (one parallel region for all); `None` when `x` is not that.
pub(crate) fn matmul_t_weights(x: &candle_core::Tensor, ws: Weights<'_>, n: usize) -> Option<candle_core::Tensor> {
    let &[m, k] = x.dims() else { return None };
    if x.dtype() != candle_core::DType::F32 || !x.device().is_cpu() || ws.len() != n * k {
        return None;
    }
    let xs = CpuView::new(x)?;
    let xs = xs.f32()?;
    let block = max_rows();
    let mut yt = vec![0f32; n * m];
    products(
        xs.chunks(block * k)
            .zip(yt.chunks_mut(block * n))
            .map(|(x, yt)| Product { x, m: x.len() / k.max(1), w: ws, k, yt })
            .collect(),
    );
    let mut y = vec![0f32; m * n];
    let unblock = |(yt, y): (&[f32], &mut [f32])| transpose(yt, n, yt.len() / n.max(1), y);
    if m > block {
        yt.par_chunks(block * n).zip(y.par_chunks_mut(block * n)).for_each(unblock);
    } else {
        unblock((&yt, &mut y));
    }
    candle_core::Tensor::from_vec(y, (m, n), x.device()).ok()
}

/// `eˣ` without branches or calls, so that loops over it vectorize (libm's `expf` is a call per
/// element: most of a long-context decode step's attention went into it). Range reduction by
/// `ln 2`, then Cephes' degree-6 polynomial: within 2 ulp of the exact value over `[-87, 88]`.
/// Arguments are clamped to that range: above, the result stays at `e⁸⁸` (≈ 1.7e38) instead of
/// overflowing; below, at ~1e-38 instead of a subnormal. NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and removing 1.5 · 2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ built in the exponent bits: n is within [-126, 127] after the clamp.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `b[c][r] = a[r][c]` for `a` `[rows, cols]`, in tiles so that both sides are read and written a
/// cache line at a time; whole 8 × 8 blocks with AVX shuffles where the CPU has AVX.
pub fn transpose(a: &[f32], rows: usize, cols: usize, b: &mut [f32]) {
    assert!(a.len() == rows * cols && b.len() == rows * cols, "transpose: lengths disagree with the shape");
    transpose_strided(a, rows, cols, b, rows);
}

/// [`transpose`] into rows of `stride ≥ rows` values: `b[c · stride + r] = a[r][c]`, the rest of
/// each row of `b` left as it is. Values are moved as bits (never computed with).
pub(crate) fn transpose_strided(a: &[f32], rows: usize, cols: usize, b: &mut [f32], stride: usize) {
    const TILE: usize = 16;
    assert!(
        a.len() == rows * cols && stride >= rows && b.len() >= cols.saturating_sub(1) * stride + rows,
        "transpose: lengths disagree with the shape"
    );
    #[cfg(target_arch = "x86_64")]
    let avx = std::is_x86_feature_detected!("avx");
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            let (r_end, c_end) = ((r0 + TILE).min(rows), (c0 + TILE).min(cols));
            #[cfg(target_arch = "x86_64")]
            if avx && r_end - r0 == TILE && c_end - c0 == TILE {
                for (dr, dc) in [(0, 0), (0, 8), (8, 0), (8, 8)] {
                    let (r, c) = (r0 + dr, c0 + dc);
                    // SAFETY: the CPU has AVX; rows r..r+8 and columns c..c+8 are inside `a`
                    // (`[rows, cols]`) and columns r..r+8 of rows c..c+8 of `b` (rows `stride`
                    // apart, checked above).
                    unsafe {
                        transpose8x8(a.as_ptr().add(r * cols + c), cols, b.as_mut_ptr().add(c * stride + r), stride)
                    };
                }
                continue;
            }
            for r in r0..r_end {
                for c in c0..c_end {
                    b[c * stride + r] = a[r * cols + c];
                }
            }
        }
    }
}

/// One 8 × 8 block: `dst[j][i] = src[i][j]`, rows `src_stride` and `dst_stride` floats apart.
///
/// # Safety
/// The CPU has AVX; 8 rows of 8 floats are readable at `src` and writable at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller guarantees.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        // Interleave pairs of rows, then pairs of pairs, then the 128-bit halves.
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        let out = [
            _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
        ];
        for (i, row) in out.iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * dst_stride), *row);
        }
    }
}

/// The rows one SwiGLU expert computes: `x` `[m, k]`, `gate_up` `[2·inter, k]` (gate rows first),
/// `down` `[k_out, inter]`.
#[derive(Debug)]
pub struct ExpertRows<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub gate_up: Weights<'a>,
    pub down: Weights<'a>,
}

/// `down(silu(gate(x)) ⊙ up(x))` for every expert of `experts`, each on its own rows, in two
/// parallel regions (all gate/up products, then all down products); `out` holds every expert's
/// `[m, k_out]` result, in order.
pub fn swiglu_experts(experts: &[ExpertRows<'_>], inter: usize, out: &mut [f32]) {
    let rows: usize = experts.iter().map(|e| e.m).sum();
    let k_out = out.len() / rows.max(1);
    let mut gu_t: Vec<Vec<f32>> = experts.iter().map(|e| vec![0f32; 2 * inter * e.m]).collect();
    products(
        experts
            .iter()
            .zip(&mut gu_t)
            .map(|(e, yt)| Product { x: e.x, m: e.m, w: e.gate_up, k: e.x.len() / e.m.max(1), yt })
            .collect(),
    );
    // h[r][j] = silu(gate[j][r]) · up[j][r]: computed in the products' transposed layout, where gate
    // and up are contiguous, then transposed to row-major for the next product.
    let silu = |(e, gu_t): (&ExpertRows<'_>, &Vec<f32>)| {
        let (gate, up) = gu_t.split_at(inter * e.m);
        let h_t: Vec<f32> = gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + exp(-g)) * u).collect();
        let mut h = vec![0f32; e.m * inter];
        transpose(&h_t, inter, e.m, &mut h);
        h
    };
    // In parallel when there is enough of it (prefill); a decode step's share is too small to split.
    let parallel = rows > max_rows();
    let h: Vec<Vec<f32>> = if parallel {
        experts.par_iter().zip(&gu_t).map(silu).collect()
    } else {
        experts.iter().zip(&gu_t).map(silu).collect()
    };
    let mut y_t: Vec<Vec<f32>> = experts.iter().map(|e| vec![0f32; k_out * e.m]).collect();
    products(
        experts
            .iter()
            .zip(&h)
            .zip(&mut y_t)
            .map(|((e, h), yt)| Product { x: h, m: e.m, w: e.down, k: inter, yt })
            .collect(),
    );
    let mut outs = Vec::with_capacity(experts.len());
    let mut rest = out;
    for e in experts {
        let (mine, others) = rest.split_at_mut(e.m * k_out);
        outs.push(mine);
        rest = others;
    }
    let finish = |((e, y_t), out): ((&ExpertRows<'_>, &Vec<f32>), &mut [f32])| transpose(y_t, k_out, e.m, out);
    if parallel {
        experts.par_iter().zip(&y_t).zip(outs).for_each(finish);
    } else {
        experts.iter().zip(&y_t).zip(outs).for_each(finish);
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod forms_tests;

/// Asserts that `yt` (`[features, m]`) holds the products of the first features of `w` (`[_, k]`,
/// bf16) with the rows of `x` (`[m, k]`) rounded to bf16: within a few f32 roundings of the f64
/// sum's magnitude (f32 sums of `k` terms in another order).
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn assert_rounded_product(w: &[half::bf16], x: &[f32], k: usize, m: usize, yt: &[f32], what: &str) {
    for o in 0..yt.len() / m.max(1) {
        for r in 0..m {
            let terms = (0..k)
                .map(|i| f64::from(w[o * k + i].to_f32()) * f64::from(half::bf16::from_f32(x[r * k + i]).to_f32()));
            let (want, magnitude) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            let got = f64::from(yt[o * m + r]);
            let tolerance = 1e-4f64.max(4e-6 * magnitude);
            assert!((got - want).abs() < tolerance, "{what} o {o} r {r}: {got} vs {want}");
        }
    }
}

/// `n` values in [-1, 1) from `seed`, the kernels' tests' inputs.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    use rand_xoshiro::rand_core::{Rng, SeedableRng};
    let mut rng = rand_xoshiro::SplitMix64::seed_from_u64(seed);
    (0..n).map(|_| (rng.next_u64() % 2000) as f32 / 1000.0 - 1.0).collect()
}
