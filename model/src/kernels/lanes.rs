//! 16 f32 lanes as each instruction set holds them — one AVX-512 register, two AVX2 registers, or
//! an array — with the few operations the attention kernel needs, so that one generic kernel is
//! compiled per instruction set (the compiler does not vectorize it reliably on its own). Every
//! operation is the same IEEE operation in every implementation (multiply-adds fused everywhere),
//! so the three compilations of a kernel give the same bits.

/// 16 lanes of f32.
///
/// # Safety
/// The methods of the AVX-512 and AVX2 implementations use those instructions: they may only run
/// inside functions compiled with them (they are inlined there).
pub(crate) trait Lanes16: Copy {
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(a: &[f32; 16]) -> Self;
    unsafe fn store(self, a: &mut [f32; 16]);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    /// `self · b + c`, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    /// `2ⁿ` for lanes holding whole numbers `n` in `[-126, 127]`, built in the exponent bits.
    unsafe fn pow2i(self) -> Self;

    /// `eˣ` as [`super::exp`] computes it (range reduction by `ln 2`, Cephes' degree-6
    /// polynomial), for arguments already clamped to `[-87, 88]`.
    #[inline(always)]
    unsafe fn exp_clamped(self) -> Self {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const ROUND: f32 = 12_582_912.0;
        // SAFETY: as the caller guarantees.
        unsafe {
            let n = self.mul(Self::splat(LOG2E)).add(Self::splat(ROUND)).add(Self::splat(-ROUND));
            let r = self.add(n.mul(Self::splat(-LN2_HI))).add(n.mul(Self::splat(-LN2_LO)));
            let mut p = Self::splat(1.987_569_2e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
                p = p.mul(r).add(Self::splat(c));
            }
            let y = p.mul(r).mul(r).add(r).add(Self::splat(1.0));
            y.mul(n.pow2i())
        }
    }
}

/// The portable lanes: an array, lane by lane.
pub(crate) type Portable = [f32; 16];

impl Lanes16 for Portable {
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        [v; 16]
    }
    #[inline(always)]
    unsafe fn load(a: &[f32; 16]) -> Self {
        *a
    }
    #[inline(always)]
    unsafe fn store(self, a: &mut [f32; 16]) {
        *a = self;
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        std::array::from_fn(|x| self[x] + b[x])
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        std::array::from_fn(|x| self[x] * b[x])
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        std::array::from_fn(|x| self[x].mul_add(b[x], c[x]))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // As the vector instructions: `b` unless `self` is larger.
        std::array::from_fn(|x| if self[x] > b[x] { self[x] } else { b[x] })
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        self.map(|n| f32::from_bits(((n as i32 + 127) as u32) << 23))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes16;

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    // SAFETY (every method): the caller runs it inside a function compiled with AVX-512F.
    impl Lanes16 for Avx512 {
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn load(a: &[f32; 16]) -> Self {
            unsafe { Avx512(_mm512_loadu_ps(a.as_ptr())) }
        }
        #[inline(always)]
        unsafe fn store(self, a: &mut [f32; 16]) {
            unsafe { _mm512_storeu_ps(a.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            unsafe { Avx512(_mm512_max_ps(self.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn pow2i(self) -> Self {
            unsafe {
                let n = _mm512_cvttps_epi32(self.0);
                Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127)))))
            }
        }
    }

    /// Two AVX2 registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2([__m256; 2]);

    // SAFETY (every method): the caller runs it inside a function compiled with AVX2 and FMA.
    impl Lanes16 for Avx2 {
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { Avx2([_mm256_set1_ps(v); 2]) }
        }
        #[inline(always)]
        unsafe fn load(a: &[f32; 16]) -> Self {
            unsafe { Avx2([_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(a.as_ptr().add(8))]) }
        }
        #[inline(always)]
        unsafe fn store(self, a: &mut [f32; 16]) {
            unsafe {
                _mm256_storeu_ps(a.as_mut_ptr(), self.0[0]);
                _mm256_storeu_ps(a.as_mut_ptr().add(8), self.0[1]);
            }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            unsafe { Avx2([_mm256_add_ps(self.0[0], b.0[0]), _mm256_add_ps(self.0[1], b.0[1])]) }
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            unsafe { Avx2([_mm256_mul_ps(self.0[0], b.0[0]), _mm256_mul_ps(self.0[1], b.0[1])]) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Avx2([_mm256_fmadd_ps(self.0[0], b.0[0], c.0[0]), _mm256_fmadd_ps(self.0[1], b.0[1], c.0[1])]) }
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            unsafe { Avx2([_mm256_max_ps(self.0[0], b.0[0]), _mm256_max_ps(self.0[1], b.0[1])]) }
        }
        #[inline(always)]
        unsafe fn pow2i(self) -> Self {
            unsafe {
                let bias = _mm256_set1_epi32(127);
                let lo = _mm256_add_epi32(_mm256_cvttps_epi32(self.0[0]), bias);
                let hi = _mm256_add_epi32(_mm256_cvttps_epi32(self.0[1]), bias);
                Avx2([
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(lo)),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(hi)),
                ])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector exponential against [`super::super::exp`], bit for bit, in every implementation
    /// this CPU runs.
    #[test]
    fn lanes_give_the_same_bits_in_every_instruction_set() {
        let xs: Vec<[f32; 16]> = (0..64)
            .map(|b| std::array::from_fn(|x| (b as f32 * 16.0 + x as f32) * 0.17 - 87.0))
            .map(|a: [f32; 16]| a.map(|v| v.clamp(-87.0, 88.0)))
            .collect();
        let want: Vec<[f32; 16]> = xs.iter().map(|a| a.map(crate::kernels::exp)).collect();
        // SAFETY: the portable lanes use no special instructions.
        let portable: Vec<[f32; 16]> = xs.iter().map(|a| unsafe { Portable::load(a).exp_clamped() }).collect();
        assert_eq!(portable, want);
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(a: &[f32; 16]) -> [f32; 16] {
                let mut out = [0f32; 16];
                unsafe { Avx512::load(a).exp_clamped().store(&mut out) };
                out
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(a: &[f32; 16]) -> [f32; 16] {
                let mut out = [0f32; 16];
                unsafe { Avx2::load(a).exp_clamped().store(&mut out) };
                out
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                assert_eq!(xs.iter().map(|a| unsafe { avx512(a) }).collect::<Vec<_>>(), want);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                assert_eq!(xs.iter().map(|a| unsafe { avx2(a) }).collect::<Vec<_>>(), want);
            }
        }
    }
}
