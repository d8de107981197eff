//! Where a kernel reads its weights from: a row-major matrix `[n, k]` whose elements are widened to
//! f32 as they are loaded, 16 at a time. Dense f32 and bf16 slices are one kind; the quantized
//! matrices (8-bit and 4-bit integers with group scales, FP8 with row scales) are the others, each
//! dequantised in registers: a quantized weight costs its stored bytes from memory and a few vector
//! instructions, and never exists in memory as f32.
//!
//! Widening is exact for every kind: an integer code times its scale is computed as the reference
//! dequantisation computes it (`(code − zero) · scale`, rounded once to f32), so a product over a
//! quantized matrix equals the product over its dequantised f32 copy, bit for bit.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::{bf16, f16};

use super::Weight;

/// A weight matrix as the kernels read it.
pub trait MatrixSource: Copy + Send + Sync {
    /// Elements per row.
    fn k(&self) -> usize;
    /// Rows.
    fn n(&self) -> usize;
    /// Element `i` of row `row`, widened.
    fn widen(&self, row: usize, i: usize) -> f32;
    /// Elements `i..i + 16` of row `row`, widened.
    ///
    /// # Safety
    /// `i` is a multiple of 16 with `i + 16 ≤ k`, `row < n`, and the CPU has AVX-512F (callers are
    /// compiled with it; this is inlined into them).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(&self, row: usize, i: usize) -> __m512;

    /// Before a kernel reads rows `first..first + count` many times: whatever per-row state its
    /// loads need, into `prepared` (quantized sources: the rows' scales widened to f32, so that a
    /// load reads its scale with one broadcast instead of widening it each time). Nothing for
    /// dense sources.
    #[inline(always)]
    fn prepare(&self, first: usize, count: usize, prepared: &mut Vec<f32>) {
        let _ = (first, count, prepared);
    }

    /// Floats [`MatrixSource::prepare`] leaves per row (0 where it leaves nothing): after
    /// `prepare(first, count, prepared)`, row `first + r`'s start at `r · prepared_stride()`, so
    /// `&prepared[r · stride..]` is what `prepare(first + r, …)` would have left.
    #[inline(always)]
    fn prepared_stride(&self) -> usize {
        0
    }

    /// [`MatrixSource::load16`] of row `first + rel` after [`MatrixSource::prepare`]`(first, …)`
    /// left `prepared`.
    ///
    /// # Safety
    /// As for `load16`, and `prepared` is what `prepare` left for a range holding the row.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_prepared(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> __m512 {
        let _ = prepared;
        // SAFETY: as the caller guarantees.
        unsafe { self.load16(first + rel, i) }
    }

    /// Elements `i..i + 16` of row `first + rel`, as two 8-wide vectors, after
    /// [`MatrixSource::prepare`]: the AVX2 forms' load.
    ///
    /// # Safety
    /// As for [`MatrixSource::load16_prepared`], except that the CPU needs AVX2 and FMA (not
    /// AVX-512).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx2(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> [__m256; 2];

    /// Asks the CPU to start loading the cache line holding element `i` of row `row`, where `i`
    /// may run past the row into the next ones (no effect past the matrix's end; sources that do
    /// not say where their rows lie do nothing). The dot forms call it [`prefetch_ahead`] weights ahead
    /// of each row they stream: on a small matrix split into many tasks, every task's stream
    /// otherwise starts cold and the hardware prefetcher ramps up again at each page.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch(&self, row: usize, i: usize) {
        let _ = (row, i);
    }

    /// Elements `i..i + 32` of row `first + rel`, as four 8-wide vectors, after
    /// [`MatrixSource::prepare`]. Sources whose codes are cheaper to unpack 32 at a time (int4)
    /// override it.
    ///
    /// # Safety
    /// As for [`MatrixSource::load16_avx2`], with `i + 32 ≤ k`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_avx2(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> [__m256; 4] {
        // SAFETY: as the caller guarantees.
        let ([a, b], [c, d]) =
            unsafe { (self.load16_avx2(first, rel, i, prepared), self.load16_avx2(first, rel, i + 16, prepared)) };
        [a, b, c, d]
    }

    /// Elements `i..i + 32` of row `first + rel`, as two vectors, after [`MatrixSource::prepare`].
    /// Sources whose codes are cheaper to unpack 32 at a time (int4) override it.
    ///
    /// # Safety
    /// As for [`MatrixSource::load16_prepared`], with `i + 32 ≤ k`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_prepared(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> (__m512, __m512) {
        // SAFETY: as the caller guarantees.
        unsafe { (self.load16_prepared(first, rel, i, prepared), self.load16_prepared(first, rel, i + 16, prepared)) }
    }
}

/// How far ahead of its current position a dot form prefetches each row it streams, in weights,
/// for blocks of `outputs` rows of length `k`: two blocks (the same row of the block after next, for
/// a dense matrix), at most 4,096 weights.
#[cfg(target_arch = "x86_64")]
pub fn prefetch_ahead(outputs: usize, k: usize) -> usize {
    (2 * outputs * k).min(4096)
}

/// A dense row-major matrix of f32 or bf16.
#[derive(Debug, Clone, Copy)]
pub struct Dense<'a, W> {
    pub w: &'a [W],
    pub k: usize,
}

impl<W: Weight> MatrixSource for Dense<'_, W> {
    #[inline(always)]
    fn k(&self) -> usize {
        self.k
    }

    #[inline(always)]
    fn n(&self) -> usize {
        self.w.len() / self.k.max(1)
    }

    #[inline(always)]
    fn widen(&self, row: usize, i: usize) -> f32 {
        self.w[row * self.k + i].widen()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(&self, row: usize, i: usize) -> __m512 {
        debug_assert!((row * self.k + i + 16) <= self.w.len());
        // SAFETY: as the caller guarantees, the 16 elements are inside row `row`.
        unsafe { W::load16(self.w.as_ptr().add(row * self.k + i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(&self, first: usize, rel: usize, i: usize, _: &[f32]) -> [__m256; 2] {
        debug_assert!(((first + rel) * self.k + i + 16) <= self.w.len());
        // SAFETY: as the caller guarantees, the 16 elements are inside the row.
        unsafe { W::load16_avx2(self.w.as_ptr().add((first + rel) * self.k + i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch(&self, row: usize, i: usize) {
        let at = row * self.k + i;
        if at < self.w.len() {
            // SAFETY: a prefetch never faults, and the address is inside the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.w.as_ptr().add(at).cast()) };
        }
    }
}

/// How the codes of a quantized matrix are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    /// One signed byte per weight: `w = code · scale`.
    Int8,
    /// Two weights per byte, stored as value + 8: `w = (code − 8) · scale`. A row's whole chunks
    /// of 32 weights are 16 bytes each, byte `j` holding weight `j` of the chunk in its low nibble
    /// and weight `j + 16` in its high one (GGUF's Q4_0 order: 16 bytes widened to 16 lanes give
    /// the chunk's first 16 codes by masking and the last 16 by a shift, in element order); the
    /// last `k mod 32` weights of a row follow two per byte in order, the lower-indexed one in the
    /// low nibble. [`int4_position`] says where any weight lies.
    Int4,
    /// One FP8 E4M3 (`float8_e4m3fn`) byte per weight: `w = fp8(code) · scale`.
    Fp8E4m3,
}

/// Weights per chunk of an int4 row (see [`CodeKind::Int4`]).
pub const INT4_CHUNK: usize = 32;

/// Where weight `i` of a row of `k` int4 codes is stored: its byte in the row, and the shift (0 or
/// 4) of its nibble.
#[inline(always)]
pub fn int4_position(k: usize, i: usize) -> (usize, u32) {
    if i < k - k % INT4_CHUNK {
        (i / INT4_CHUNK * 16 + i % 16, if i % INT4_CHUNK >= 16 { 4 } else { 0 })
    } else {
        (i / 2, if i % 2 == 1 { 4 } else { 0 })
    }
}

/// A row of `k` int4 codes stored two per byte in order (lower-indexed in the low nibble, as
/// compressed-tensors packs them) rewritten in [`CodeKind::Int4`]'s order into `out`
/// (`k.div_ceil(2)` bytes each).
pub fn int4_from_sequential(sequential: &[u8], k: usize, out: &mut [u8]) {
    let (full, bytes) = ((k - k % INT4_CHUNK) / 2, k.div_ceil(2));
    for (src, dst) in sequential[..full].chunks_exact(16).zip(out[..full].chunks_exact_mut(16)) {
        for (j, byte) in dst.iter_mut().enumerate() {
            // Weight j is nibble j % 2 of byte j / 2; weight j + 16 the same nibble of byte 8 + j / 2.
            let shift = 4 * (j % 2);
            *byte = ((src[j / 2] >> shift) & 0x0F) | (((src[8 + j / 2] >> shift) & 0x0F) << 4);
        }
    }
    out[full..bytes].copy_from_slice(&sequential[full..bytes]);
}

impl CodeKind {
    /// Bytes a row of `k` codes takes.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            CodeKind::Int8 | CodeKind::Fp8E4m3 => k,
            CodeKind::Int4 => k.div_ceil(2),
        }
    }
}

/// The scales of a quantized matrix, one per group of a row, in the dtype they are stored in.
#[derive(Debug, Clone, Copy)]
pub enum ScalesRef<'a> {
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    F32(&'a [f32]),
}

impl ScalesRef<'_> {
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            ScalesRef::F16(s) => f16_to_f32(s[i]),
            ScalesRef::Bf16(s) => s[i].to_f32(),
            ScalesRef::F32(s) => s[i],
        }
    }

    /// Scales `range`, widened, into `out` (cleared first): one dtype match, then a loop that
    /// vectorizes.
    fn widen_into(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        out.clear();
        match self {
            ScalesRef::F16(s) => out.extend(s[range].iter().map(|&v| f16_to_f32(v))),
            ScalesRef::Bf16(s) => out.extend(s[range].iter().map(|v| f32::from_bits(u32::from(v.to_bits()) << 16))),
            ScalesRef::F32(s) => out.extend_from_slice(&s[range]),
        }
    }

    fn slice(&self, range: std::ops::Range<usize>) -> Self {
        match self {
            ScalesRef::F16(s) => ScalesRef::F16(&s[range]),
            ScalesRef::Bf16(s) => ScalesRef::Bf16(&s[range]),
            ScalesRef::F32(s) => ScalesRef::F32(&s[range]),
        }
    }
}

/// A quantized matrix `[n, k]` as the kernels read it: each row's codes, then one scale for every
/// `2^group_shift` consecutive elements of a row (a group never straddles two rows; the last group
/// of a row may be partial).
#[derive(Debug, Clone, Copy)]
pub struct QuantView<'a> {
    kind: CodeKind,
    codes: &'a [u8],
    scales: ScalesRef<'a>,
    k: usize,
    /// `log2` of the group size (at least 4: a load of 16 elements never straddles two groups);
    /// `usize::BITS - 1` for one group per row (`i >> shift` is then 0 for every element).
    group_shift: u32,
    /// Derived, kept so that no load divides: groups per row, bytes per row.
    groups: usize,
    row_bytes: usize,
    /// Products with few rows quantize the rows to int8 where the CPU can multiply them so
    /// (`Activations::Int8`, [`super::vnni`]); else every product is exact.
    int8_activations: bool,
}

impl<'a> QuantView<'a> {
    /// `codes` (rows of `kind.row_bytes(k)` bytes) with `scales` (`groups` a row) for groups of
    /// `2^group_shift` elements, or one a row when `group_shift` is `usize::BITS - 1`.
    pub fn new(kind: CodeKind, codes: &'a [u8], scales: ScalesRef<'a>, k: usize, group_shift: u32) -> Self {
        let group_shift = group_shift.min(usize::BITS - 1);
        let groups = if group_shift == usize::BITS - 1 { 1 } else { k.div_ceil(1 << group_shift) };
        QuantView { kind, codes, scales, k, group_shift, groups, row_bytes: kind.row_bytes(k), int8_activations: false }
    }

    /// The same matrix, multiplied with int8 activations where that mode applies, or exactly.
    pub fn with_int8_activations(self, on: bool) -> Self {
        QuantView { int8_activations: on, ..self }
    }

    pub fn int8_activations(&self) -> bool {
        self.int8_activations
    }

    /// `log2` of the group size (`usize::BITS - 1` for one group per row).
    pub fn group_shift(&self) -> u32 {
        self.group_shift
    }

    /// Bytes of codes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Every row's codes, rows of [`QuantView::row_bytes`].
    pub fn codes(&self) -> &'a [u8] {
        self.codes
    }

    /// The scales of rows `first..first + count`, widened to f32, into `out` (cleared first).
    #[inline]
    pub fn widen_scales(&self, first: usize, count: usize, out: &mut Vec<f32>) {
        self.scales.widen_into(first * self.groups..(first + count) * self.groups, out);
    }

    /// The scale element `i` of row `row` is multiplied by.
    pub fn scale_at(&self, row: usize, i: usize) -> f32 {
        self.scale(row, i)
    }

    pub fn kind(&self) -> CodeKind {
        self.kind
    }

    /// Elements per row.
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.codes.len() / self.row_bytes.max(1)
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Rows `first..first + count`.
    pub fn rows(&self, first: usize, count: usize) -> Self {
        let (rb, g) = (self.row_bytes, self.groups);
        QuantView {
            codes: &self.codes[first * rb..(first + count) * rb],
            scales: self.scales.slice(first * g..(first + count) * g),
            ..*self
        }
    }

    #[inline(always)]
    fn scale(&self, row: usize, i: usize) -> f32 {
        self.scales.get(row * self.groups + (i >> self.group_shift))
    }

    /// Element `i` of row `row`, dequantised.
    #[inline(always)]
    pub fn dequantize(&self, row: usize, i: usize) -> f32 {
        let rb = self.row_bytes;
        let s = self.scale(row, i);
        match self.kind {
            CodeKind::Int8 => f32::from(self.codes[row * rb + i] as i8) * s,
            CodeKind::Int4 => {
                let (byte, shift) = int4_position(self.k, i);
                let code = (self.codes[row * rb + byte] >> shift) & 0x0F;
                (f32::from(code) - 8.0) * s
            }
            CodeKind::Fp8E4m3 => fp8_e4m3(self.codes[row * rb + i]) * s,
        }
    }
}

/// The value of an FP8 E4M3 (`float8_e4m3fn`: bias 7, no infinities) byte. The exponent and
/// mantissa bits are moved to f32's positions and rebiased by one exact multiplication by `2¹²⁰`,
/// which also gives subnormals their value; the vector form does the same.
#[inline(always)]
pub fn fp8_e4m3(code: u8) -> f32 {
    let magnitude = f32::from_bits(u32::from(code & 0x7F) << 20) * FP8_REBIAS;
    if code & 0x80 != 0 { -magnitude } else { magnitude }
}

/// An f16 value widened without a call or a branch (the `half` crate dispatches at run time): the
/// exponent and mantissa bits moved to f32's positions and rebiased by one exact multiplication by
/// `2¹¹²`, which also gives subnormals their value. Scales are finite: infinities and NaN are not
/// kept (they would come out as large finite values).
#[inline(always)]
pub fn f16_to_f32(v: f16) -> f32 {
    const REBIAS: f32 = f32::from_bits((127 + 112) << 23);
    let bits = u32::from(v.to_bits());
    let magnitude = f32::from_bits((bits & 0x7FFF) << 13) * REBIAS;
    f32::from_bits(magnitude.to_bits() | ((bits & 0x8000) << 16))
}

/// `2¹²⁰`: from E4M3's exponent bias (7) to f32's (127).
const FP8_REBIAS: f32 = f32::from_bits((127 + 120) << 23);

macro_rules! quant_source {
    ($name:ident, $kind:expr, $load:ident, $load_avx2:ident, { $($extra:item)* }) => {
        /// A [`QuantView`] of one code kind, so that the kernels are compiled for it.
        #[derive(Debug, Clone, Copy)]
        pub struct $name<'a>(pub QuantView<'a>);

        impl MatrixSource for $name<'_> {
            #[inline(always)]
            fn k(&self) -> usize {
                self.0.k()
            }

            #[inline(always)]
            fn n(&self) -> usize {
                self.0.n()
            }

            #[inline(always)]
            fn widen(&self, row: usize, i: usize) -> f32 {
                self.0.dequantize(row, i)
            }

            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load16(&self, row: usize, i: usize) -> __m512 {
                debug_assert_eq!(self.0.kind, $kind);
                let v = &self.0;
                debug_assert!((row + 1) * v.row_bytes <= v.codes.len() && i + 16 <= v.k);
                // SAFETY: as the caller guarantees, the 16 elements are inside row `row`.
                unsafe { $load(v.codes.as_ptr().add(row * v.row_bytes), i, v.k, _mm512_set1_ps(v.scale(row, i))) }
            }

            #[inline(always)]
            fn prepare(&self, first: usize, count: usize, prepared: &mut Vec<f32>) {
                self.0.widen_scales(first, count, prepared);
            }

            #[inline(always)]
            fn prepared_stride(&self) -> usize {
                self.0.groups
            }

            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load16_prepared(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> __m512 {
                let v = &self.0;
                let row = first + rel;
                let s = rel * v.groups + (i >> v.group_shift);
                debug_assert!(s < prepared.len() && (row + 1) * v.row_bytes <= v.codes.len() && i + 16 <= v.k);
                // SAFETY: as the caller guarantees; `s` indexes the prepared scales of row `row`.
                unsafe {
                    $load(v.codes.as_ptr().add(row * v.row_bytes), i, v.k, _mm512_set1_ps(*prepared.get_unchecked(s)))
                }
            }

            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load16_avx2(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> [__m256; 2] {
                let v = &self.0;
                let row = first + rel;
                let s = rel * v.groups + (i >> v.group_shift);
                debug_assert!(s < prepared.len() && (row + 1) * v.row_bytes <= v.codes.len() && i + 16 <= v.k);
                // SAFETY: as the caller guarantees; `s` indexes the prepared scales of row `row`.
                unsafe {
                    $load_avx2(v.codes.as_ptr().add(row * v.row_bytes), i, v.k, _mm256_set1_ps(*prepared.get_unchecked(s)))
                }
            }

            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            fn prefetch(&self, row: usize, i: usize) {
                let v = &self.0;
                // Where the codes of weight `i` (which may run past the row) lie, near enough.
                let at = row * v.row_bytes + if $kind == CodeKind::Int4 { i / 2 } else { i };
                if at < v.codes.len() {
                    // SAFETY: a prefetch never faults, and the address is inside the codes.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(v.codes.as_ptr().add(at).cast()) };
                }
            }

            $($extra)*
        }
    };
}

quant_source!(Int8Source, CodeKind::Int8, load_int8, load_int8_avx2, {});
quant_source!(Int4Source, CodeKind::Int4, load_int4, load_int4_avx2, {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_avx2(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> [__m256; 4] {
        let v = &self.0;
        let row = first + rel;
        let (s0, s1) = (rel * v.groups + (i >> v.group_shift), rel * v.groups + ((i + 16) >> v.group_shift));
        debug_assert!(s1 < prepared.len() && row * v.row_bytes + i / 2 + 16 <= v.codes.len());
        debug_assert!(i.is_multiple_of(INT4_CHUNK));
        // SAFETY: as the caller guarantees (i a multiple of 32, i + 32 ≤ k: a whole chunk, 16
        // bytes of the row at i / 2); the indices are the prepared scales of row `row`.
        unsafe {
            let p = v.codes.as_ptr().add(row * v.row_bytes + i / 2);
            load_int4_32_avx2(
                p,
                _mm256_set1_ps(*prepared.get_unchecked(s0)),
                _mm256_set1_ps(*prepared.get_unchecked(s1)),
            )
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load32_prepared(&self, first: usize, rel: usize, i: usize, prepared: &[f32]) -> (__m512, __m512) {
        let v = &self.0;
        let row = first + rel;
        let (s0, s1) = (rel * v.groups + (i >> v.group_shift), rel * v.groups + ((i + 16) >> v.group_shift));
        debug_assert!(s1 < prepared.len() && row * v.row_bytes + i / 2 + 16 <= v.codes.len());
        debug_assert!(i.is_multiple_of(INT4_CHUNK));
        // SAFETY: as the caller guarantees (i a multiple of 32, i + 32 ≤ k: a whole chunk, 16
        // bytes of the row at i / 2); the indices are the prepared scales of row `row`.
        unsafe {
            let p = v.codes.as_ptr().add(row * v.row_bytes + i / 2);
            let t0 = int4_table(_mm512_set1_ps(*prepared.get_unchecked(s0)));
            // Groups of 16 give the chunk's halves two scales; larger groups one.
            let t1 = if s1 == s0 { t0 } else { int4_table(_mm512_set1_ps(*prepared.get_unchecked(s1))) };
            load_int4_32(p, t0, t1)
        }
    }
});
quant_source!(Fp8Source, CodeKind::Fp8E4m3, load_fp8, load_fp8_avx2, {});

/// Weights `i..i + 16` of a row of signed bytes at `row`, times `scale` (16 copies).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_int8(row: *const u8, i: usize, _k: usize, scale: __m512) -> __m512 {
    // SAFETY: 16 bytes are readable at `row + i`; AVX-512F (the caller).
    unsafe {
        let codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(row.add(i).cast()));
        _mm512_mul_ps(_mm512_cvtepi32_ps(codes), scale)
    }
}

/// The 16 values an int4 code of a group with `scale` (16 copies) stands for, indexed by the code
/// as stored: `(code − 8) · scale`, each rounded once as the reference dequantisation rounds it.
///
/// The table passes through an empty `asm!` block the compiler cannot see into: without it LLVM
/// moves each lookup before the multiplication (`vpermps` of the values and of the broadcast
/// scale, then a multiply), three instructions a lookup instead of one.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn int4_table(scale: __m512) -> __m512 {
    let values = _mm512_setr_ps(-8., -7., -6., -5., -4., -3., -2., -1., 0., 1., 2., 3., 4., 5., 6., 7.);
    let mut table = _mm512_mul_ps(values, scale);
    // SAFETY: the block is empty: it only names the register holding the table.
    unsafe { std::arch::asm!("/* {t} */", t = inout(zmm_reg) table, options(pure, nomem, nostack, preserves_flags)) };
    table
}

/// Weights `i..i + 16` (`i` a multiple of 16) of a row of `k` int4 codes at `row`
/// ([`CodeKind::Int4`]'s order), each `(code − 8) · scale`. In a whole chunk, a lookup: the
/// chunk's 16 bytes widened to lanes, shifted for its last 16 weights, index the group's
/// [`int4_table`] (`vpermps` reads each lane's low 4 bits).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_int4(row: *const u8, i: usize, k: usize, scale: __m512) -> __m512 {
    // SAFETY: the 16 weights lie in the row (the caller): in a whole chunk, its 16 bytes; past the
    // last one, 8 bytes at i / 2. AVX-512F (the caller).
    unsafe {
        if i < k - k % INT4_CHUNK {
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(i / INT4_CHUNK * 16).cast()));
            let codes = if i % INT4_CHUNK >= 16 { _mm512_srli_epi32::<4>(bytes) } else { bytes };
            return _mm512_permutexvar_ps(codes, int4_table(scale));
        }
        // Each byte b widened to a 16-bit lane; (b | b << 4) & 0x0F0F puts its low nibble in the
        // lane's low byte and its high nibble in the high byte: the 16 codes in order, one a byte.
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(row.add(i / 2).cast()));
        let nibbles = _mm_and_si128(_mm_or_si128(b, _mm_slli_epi16::<4>(b)), _mm_set1_epi16(0x0F0F));
        // code − 8 in integers (exact), then one rounded product, as the reference computes it.
        let values = _mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles), _mm512_set1_epi32(8));
        _mm512_mul_ps(_mm512_cvtepi32_ps(values), scale)
    }
}

/// The 32 weights of the whole chunk at `p` (16 bytes), the first 16 looked up in `t0`, the last
/// 16 in `t1` ([`int4_table`]s): one load and one widening for both halves.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_int4_32(p: *const u8, t0: __m512, t1: __m512) -> (__m512, __m512) {
    // SAFETY: 16 bytes are readable at `p`; AVX-512F (the caller).
    unsafe {
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
        (_mm512_permutexvar_ps(bytes, t0), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), t1))
    }
}

/// Weights `i..i + 16` of a row of FP8 E4M3 bytes at `row`, times `scale` (see [`fp8_e4m3`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_fp8(row: *const u8, i: usize, _k: usize, scale: __m512) -> __m512 {
    // SAFETY: 16 bytes are readable at `row + i`; AVX-512F (the caller).
    unsafe {
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(i).cast()));
        let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(bytes, _mm512_set1_epi32(0x80)));
        let magnitude = _mm512_slli_epi32::<20>(_mm512_and_si512(bytes, _mm512_set1_epi32(0x7F)));
        let value = _mm512_mul_ps(_mm512_castsi512_ps(magnitude), _mm512_set1_ps(FP8_REBIAS));
        let signed = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
        _mm512_mul_ps(signed, scale)
    }
}

/// Weights `i..i + 16` of a row of signed bytes at `row`, times `scale` (8 copies), as two 8-wide
/// vectors.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_int8_avx2(row: *const u8, i: usize, _k: usize, scale: __m256) -> [__m256; 2] {
    // SAFETY: 16 bytes are readable at `row + i`; AVX2 (the caller).
    unsafe {
        let bytes = _mm_loadu_si128(row.add(i).cast());
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(bytes)));
        [_mm256_mul_ps(lo, scale), _mm256_mul_ps(hi, scale)]
    }
}

/// The 16 codes of a whole int4 chunk's 16 bytes `b` held in its low nibbles (`HIGH` false: the
/// chunk's first 16 weights) or high ones, each as its value (`code − 8`), one a byte.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn int4_half_values<const HIGH: bool>(b: __m128i) -> __m128i {
    // SAFETY: SSE2 (every x86-64).
    unsafe {
        let b = if HIGH { _mm_srli_epi16::<4>(b) } else { b };
        _mm_sub_epi8(_mm_and_si128(b, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8))
    }
}

/// Weights `i..i + 16` (`i` a multiple of 16) of a row of `k` int4 codes at `row`, each
/// `(code − 8) · scale`, as two 8-wide vectors (see [`load_int4`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_int4_avx2(row: *const u8, i: usize, k: usize, scale: __m256) -> [__m256; 2] {
    // SAFETY: the 16 weights lie in the row (the caller), as in `load_int4`; AVX2 (the caller).
    unsafe {
        let values = if i < k - k % INT4_CHUNK {
            let b = _mm_loadu_si128(row.add(i / INT4_CHUNK * 16).cast());
            if i % INT4_CHUNK >= 16 { int4_half_values::<true>(b) } else { int4_half_values::<false>(b) }
        } else {
            let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(row.add(i / 2).cast()));
            let nibbles = _mm_and_si128(_mm_or_si128(b, _mm_slli_epi16::<4>(b)), _mm_set1_epi16(0x0F0F));
            _mm_sub_epi8(nibbles, _mm_set1_epi8(8))
        };
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(values));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(values)));
        [_mm256_mul_ps(lo, scale), _mm256_mul_ps(hi, scale)]
    }
}

/// The 32 weights of the whole chunk at `p` (16 bytes), each `(code − 8)` times `s0` (the first
/// 16) or `s1` (the last 16), as four 8-wide vectors: one load for all.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_int4_32_avx2(p: *const u8, s0: __m256, s1: __m256) -> [__m256; 4] {
    // SAFETY: 16 bytes are readable at `p`; AVX2 (the caller).
    unsafe {
        let b = _mm_loadu_si128(p.cast());
        let (first, second) = (int4_half_values::<false>(b), int4_half_values::<true>(b));
        let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        [
            _mm256_mul_ps(widen(first), s0),
            _mm256_mul_ps(widen(_mm_srli_si128::<8>(first)), s0),
            _mm256_mul_ps(widen(second), s1),
            _mm256_mul_ps(widen(_mm_srli_si128::<8>(second)), s1),
        ]
    }
}

/// Weights `i..i + 16` of a row of FP8 E4M3 bytes at `row`, times `scale` (see [`fp8_e4m3`]), as
/// two 8-wide vectors.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_fp8_avx2(row: *const u8, i: usize, _k: usize, scale: __m256) -> [__m256; 2] {
    // SAFETY: 16 bytes are readable at `row + i`; AVX2 (the caller).
    unsafe {
        let bytes = _mm_loadu_si128(row.add(i).cast());
        let widen = |b: __m128i| {
            let b = _mm256_cvtepu8_epi32(b);
            let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(b, _mm256_set1_epi32(0x80)));
            let magnitude = _mm256_slli_epi32::<20>(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)));
            let value = _mm256_mul_ps(_mm256_castsi256_ps(magnitude), _mm256_set1_ps(FP8_REBIAS));
            let signed = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(value), sign));
            _mm256_mul_ps(signed, scale)
        };
        [widen(bytes), widen(_mm_srli_si128::<8>(bytes))]
    }
}
