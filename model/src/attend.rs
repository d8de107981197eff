//! The CPU attention kernel: `softmax(q·kᵀ·scale)·v` for a tile of query rows over one KV head's
//! keys and values, read where the KV cache keeps them (the paged pool's slots, or packed rows),
//! with an online softmax (running maximum and sum, rescaled block by block) so that no row's
//! scores are ever held whole.
//!
//! Tiling: the query rows of a tile (up to [`TILE_ROWS`] rows of one sequence, each with the
//! `group` query heads that share the KV head) visit the keys block by block, [`BLOCK`] keys at a
//! time, so that each block of keys and values is read from memory once per tile and then from L1
//! for every row and head of the tile, instead of once per row.
//!
//! Blocks sit at fixed absolute key positions (multiples of [`BLOCK`]) and each row only visits
//! the keys of its own window, in order, so a row's result does not depend on which rows share its
//! tile: a prompt chunked differently, or a decode row batched with others, gives the same values.
//! The code fixes the order of every sum and uses fused multiply-adds throughout, so the AVX-512,
//! AVX2 and portable compilations agree too (the portable one is for CPUs without AVX2: where
//! such a CPU has no FMA instruction either, each multiply-add is a library call, correct but slow).
//!
//! Inside a tile the (query, head) rows sit in the lanes of 16-wide vectors: a block's scores are
//! an outer product of the keys (read where the cache keeps them) and the transposed queries, the
//! online softmax updates 16 rows per vector operation, and the values are accumulated into the
//! output kept transposed. Per key and row that is `2d` multiply-adds and no horizontal sums.

/// Keys per block of the online softmax.
pub(crate) const BLOCK: usize = 32;
/// Query rows per tile.
pub(crate) const TILE_ROWS: usize = 16;

use crate::kernels::lanes::{self, Lanes16};

/// One KV head's keys (or values): row `j` (`d` floats) for key index `j`.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    /// Row `j` at `data[j·d..]`.
    Packed(&'a [f32]),
    /// Row `j` at `data[(slots[j]·heads + head)·d..]`.
    Slots { data: &'a [f32], slots: &'a [u32], heads: usize, head: usize },
}

impl<'a> Rows<'a> {
    /// Whether rows `0..n` all lie inside the data (so that `row` cannot panic for them).
    pub fn fits(&self, n: usize, d: usize) -> bool {
        match self {
            Rows::Packed(data) => data.len() >= n * d,
            Rows::Slots { data, slots, heads, head } => {
                head < heads
                    && slots.len() >= n
                    && slots[..n].iter().all(|&s| (s as usize * heads + head + 1) * d <= data.len())
            }
        }
    }

    #[inline(always)]
    fn row(&self, j: usize, d: usize) -> &'a [f32] {
        match *self {
            Rows::Packed(data) => &data[j * d..(j + 1) * d],
            Rows::Slots { data, slots, heads, head } => {
                let at = (slots[j] as usize * heads + head) * d;
                &data[at..at + d]
            }
        }
    }
}

/// One query row of a tile: its `group` query heads (`group · d` values) and the key indices it
/// sees, `lo..=hi` (its chunk's start, or the first key, up to its own position).
pub(crate) struct Query<'a> {
    pub q: &'a [f32],
    pub lo: usize,
    pub hi: usize,
}

/// Attention of every query of a tile over `keys`/`values`, whose index 0 is the key at absolute
/// position `base`; writes `[queries, group, d]` into `out`. The caller checks that the rows up to
/// the largest `hi` fit ([`Rows::fits`]) and that `lo ≤ hi` for every query.
pub(crate) fn attend_tile(
    queries: &[Query<'_>],
    keys: Rows<'_>,
    values: Rows<'_>,
    base: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match crate::kernels::isa() {
        // SAFETY: the CPU has AVX-512F (`isa` picks only what it has).
        crate::kernels::Isa::Avx512 => return unsafe { tile_avx512(queries, keys, values, base, d, scale, out) },
        // SAFETY: the CPU has AVX2 and FMA (as above).
        crate::kernels::Isa::Avx2 => return unsafe { tile_avx2(queries, keys, values, base, d, scale, out) },
        crate::kernels::Isa::Portable => {}
    }
    tile_portable(queries, keys, values, base, d, scale, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(
    queries: &[Query<'_>],
    keys: Rows<'_>,
    values: Rows<'_>,
    base: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY: compiled with AVX-512F, which the lanes use.
    unsafe { tile::<lanes::Avx512>(queries, keys, values, base, d, scale, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(
    queries: &[Query<'_>],
    keys: Rows<'_>,
    values: Rows<'_>,
    base: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY: compiled with AVX2 and FMA, which the lanes use.
    unsafe { tile::<lanes::Avx2>(queries, keys, values, base, d, scale, out) }
}

fn tile_portable(
    queries: &[Query<'_>],
    keys: Rows<'_>,
    values: Rows<'_>,
    base: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY: the portable lanes use no special instructions.
    unsafe { tile::<lanes::Portable>(queries, keys, values, base, d, scale, out) }
}

/// The tile's (query, head) rows sit in the lanes of 16-wide vectors, 16 to a chunk: row `r` is
/// query `r / group`, head `r % group`.
const LANES: usize = 16;
type Lanes = [f32; LANES];
/// Chunks of rows one pass over a block's keys handles: 64 rows.
const PASS_CHUNKS: usize = 4;
/// Keys (scores) or value columns per register block.
const PER_STEP: usize = 4;

/// Scores are `[key][chunk]` vectors (an outer product of the keys, read as stored, and the
/// transposed queries), and the running output is kept transposed, `[column][chunk]`, so that a
/// value's elements are broadcast against a vector of rows' weights. Each lane's sums run in the
/// same order whatever else is in the tile.
///
/// # Safety
/// `V`'s instructions must be available (the caller is compiled with them).
#[inline(always)]
unsafe fn tile<V: Lanes16>(
    queries: &[Query<'_>],
    keys: Rows<'_>,
    values: Rows<'_>,
    base: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (Some(lo), Some(hi)) = (queries.iter().map(|q| q.lo).min(), queries.iter().map(|q| q.hi).max()) else {
        return;
    };
    let group = queries[0].q.len() / d.max(1);
    let chunks = (queries.len() * group).div_ceil(LANES);
    // qt[i · chunks + c][x]: element i of row 16c + x (zero in padding lanes).
    let mut qt = vec![[0f32; LANES]; d * chunks];
    // Each lane's window. A padding lane sees every key: its (discarded) values are finite, and
    // it never makes a block need masking.
    let mut windows = vec![[(0usize, usize::MAX); LANES]; chunks];
    for (r, (query, qh)) in queries.iter().flat_map(|q| q.q.chunks_exact(d).map(move |h| (q, h))).enumerate() {
        let (c, x) = (r / LANES, r % LANES);
        for (i, v) in qh.iter().enumerate() {
            qt[i * chunks + c][x] = *v;
        }
        windows[c][x] = (query.lo, query.hi);
    }
    // Per lane: the running maximum and sum of exp(score − maximum), and the running weighted sum
    // of values, `ot[column · chunks + c]`.
    let mut max = vec![[f32::NEG_INFINITY; LANES]; chunks];
    let mut sum = vec![[0f32; LANES]; chunks];
    let mut ot = vec![[0f32; LANES]; d * chunks];
    let mut scores = vec![[0f32; LANES]; BLOCK * chunks];
    let mut rescale = vec![[1f32; LANES]; chunks];
    let mut key_rows: Vec<&[f32]> = Vec::with_capacity(BLOCK);
    let mut value_rows: Vec<&[f32]> = Vec::with_capacity(BLOCK);
    for block in (base + lo) / BLOCK..=(base + hi) / BLOCK {
        // This block's key indices, `first..=last`.
        let first = (block * BLOCK).max(base + lo) - base;
        let last = (block * BLOCK + BLOCK - 1).min(base + hi) - base;
        let n = last - first + 1;
        key_rows.clear();
        key_rows.extend((first..=last).map(|j| keys.row(j, d)));
        value_rows.clear();
        value_rows.extend((first..=last).map(|j| values.row(j, d)));
        for c0 in (0..chunks).step_by(PASS_CHUNKS) {
            // SAFETY: as the caller guarantees.
            unsafe {
                match (chunks - c0).min(PASS_CHUNKS) {
                    1 => block_scores::<V, 1>(&qt, chunks, c0, &key_rows, scale, &mut scores),
                    2 => block_scores::<V, 2>(&qt, chunks, c0, &key_rows, scale, &mut scores),
                    3 => block_scores::<V, 3>(&qt, chunks, c0, &key_rows, scale, &mut scores),
                    _ => block_scores::<V, 4>(&qt, chunks, c0, &key_rows, scale, &mut scores),
                }
            }
        }
        for c in 0..chunks {
            // Keys outside a lane's window score −∞ and weigh 0, exactly; blocks inside every
            // lane's window (all but those at a window's edge) skip the masking.
            let masked = windows[c].iter().any(|&(lo, hi)| lo > first || hi < last);
            let mask = |scores: &mut [Lanes], value: f32| {
                for (l, j) in (first..=last).enumerate() {
                    let s = &mut scores[l * chunks + c];
                    for (x, &(lo, hi)) in windows[c].iter().enumerate() {
                        if j < lo || j > hi {
                            s[x] = value;
                        }
                    }
                }
            };
            if masked {
                mask(&mut scores, f32::NEG_INFINITY);
            }
            let mut new_max = [0f32; LANES];
            // SAFETY: as the caller guarantees.
            unsafe {
                let old = V::load(&max[c]);
                let mut new = old;
                for l in 0..n {
                    new = new.max(V::load(&scores[l * chunks + c]));
                }
                new.store(&mut new_max);
                // The weights, exp(score − new maximum); −87 is the exponential's clamp.
                let floor = V::splat(-87.0);
                let negated = new.mul(V::splat(-1.0));
                for l in 0..n {
                    let s = &mut scores[l * chunks + c];
                    V::load(s).add(negated).max(floor).exp_clamped().store(s);
                }
                old.add(negated).max(floor).exp_clamped().store(&mut rescale[c]);
            }
            // An unchanged maximum (a lane that saw no larger score, or no key yet) rescales by
            // exactly 1.
            for x in 0..LANES {
                if max[c][x] == new_max[x] {
                    rescale[c][x] = 1.0;
                }
            }
            max[c] = new_max;
            if masked {
                mask(&mut scores, 0.0);
            }
            // SAFETY: as the caller guarantees.
            unsafe {
                let mut block_sum = V::splat(0.0);
                for l in 0..n {
                    block_sum = block_sum.add(V::load(&scores[l * chunks + c]));
                }
                V::load(&sum[c]).mul(V::load(&rescale[c])).add(block_sum).store(&mut sum[c]);
            }
        }
        for c0 in (0..chunks).step_by(PASS_CHUNKS) {
            // SAFETY: as the caller guarantees.
            unsafe {
                match (chunks - c0).min(PASS_CHUNKS) {
                    1 => block_values::<V, 1>(&scores, chunks, c0, &value_rows, &rescale, &mut ot),
                    2 => block_values::<V, 2>(&scores, chunks, c0, &value_rows, &rescale, &mut ot),
                    3 => block_values::<V, 3>(&scores, chunks, c0, &value_rows, &rescale, &mut ot),
                    _ => block_values::<V, 4>(&scores, chunks, c0, &value_rows, &rescale, &mut ot),
                }
            }
        }
    }
    for (r, row) in out.chunks_exact_mut(d).enumerate() {
        let (c, x) = (r / LANES, r % LANES);
        let inverse = 1.0 / sum[c][x];
        for (i, o) in row.iter_mut().enumerate() {
            *o = ot[i * chunks + c][x] * inverse;
        }
    }
}

/// `scores[l · chunks + c] = scale · Σᵢ key_l[i] · qt[i · chunks + c]` for chunks `c0..c0 + CH`
/// and every key of the block, [`PER_STEP`] keys at a time.
///
/// # Safety
/// `V`'s instructions must be available.
#[inline(always)]
unsafe fn block_scores<V: Lanes16, const CH: usize>(
    qt: &[Lanes],
    chunks: usize,
    c0: usize,
    key_rows: &[&[f32]],
    scale: f32,
    scores: &mut [Lanes],
) {
    let mut l = 0;
    while l < key_rows.len() {
        // SAFETY: as the caller guarantees.
        unsafe {
            if l + PER_STEP <= key_rows.len() {
                let rows: [&[f32]; PER_STEP] = std::array::from_fn(|a| key_rows[l + a]);
                scores_step::<V, CH, PER_STEP>(qt, chunks, c0, rows, scale, l, scores);
                l += PER_STEP;
            } else {
                scores_step::<V, CH, 1>(qt, chunks, c0, [key_rows[l]], scale, l, scores);
                l += 1;
            }
        }
    }
}

#[inline(always)]
unsafe fn scores_step<V: Lanes16, const CH: usize, const K: usize>(
    qt: &[Lanes],
    chunks: usize,
    c0: usize,
    rows: [&[f32]; K],
    scale: f32,
    l: usize,
    scores: &mut [Lanes],
) {
    let d = rows[0].len();
    assert!(rows.iter().all(|r| r.len() == d) && qt.len() >= d * chunks && c0 + CH <= chunks);
    // SAFETY: as the caller guarantees; every index is inside the slices (asserted above).
    unsafe {
        let mut acc = [[V::splat(0.0); CH]; K];
        for i in 0..d {
            // Loops, not `array::from_fn`: a closure is not compiled with the caller's instructions.
            let mut q = [V::splat(0.0); CH];
            for (c, qv) in q.iter_mut().enumerate() {
                *qv = V::load(qt.get_unchecked(i * chunks + c0 + c));
            }
            for (sums, row) in acc.iter_mut().zip(&rows) {
                let k = V::splat(*row.get_unchecked(i));
                for (s, qv) in sums.iter_mut().zip(&q) {
                    *s = k.mul_add(*qv, *s);
                }
            }
        }
        let scale = V::splat(scale);
        for (a, sums) in acc.iter().enumerate() {
            for (c, s) in sums.iter().enumerate() {
                s.mul(scale).store(&mut scores[(l + a) * chunks + c0 + c]);
            }
        }
    }
}

/// `ot[i · chunks + c] = rescale[c] · ot[…] + Σ_l weights[l · chunks + c] · value_l[i]` (keys in
/// order) for chunks `c0..c0 + CH`, [`PER_STEP`] columns at a time.
///
/// # Safety
/// `V`'s instructions must be available.
#[inline(always)]
unsafe fn block_values<V: Lanes16, const CH: usize>(
    weights: &[Lanes],
    chunks: usize,
    c0: usize,
    value_rows: &[&[f32]],
    rescale: &[Lanes],
    ot: &mut [Lanes],
) {
    let d = value_rows.first().map_or(0, |v| v.len());
    let mut i = 0;
    while i < d {
        // SAFETY: as the caller guarantees.
        unsafe {
            if i + PER_STEP <= d {
                values_step::<V, CH, PER_STEP>(weights, chunks, c0, value_rows, rescale, i, ot);
                i += PER_STEP;
            } else {
                values_step::<V, CH, 1>(weights, chunks, c0, value_rows, rescale, i, ot);
                i += 1;
            }
        }
    }
}

#[inline(always)]
unsafe fn values_step<V: Lanes16, const CH: usize, const I: usize>(
    weights: &[Lanes],
    chunks: usize,
    c0: usize,
    value_rows: &[&[f32]],
    rescale: &[Lanes],
    i: usize,
    ot: &mut [Lanes],
) {
    let n = value_rows.len();
    assert!(
        weights.len() >= n * chunks
            && c0 + CH <= chunks
            && (i + I) * chunks <= ot.len()
            && value_rows.iter().all(|v| v.len() >= i + I)
    );
    // SAFETY: as the caller guarantees; every index is inside the slices (asserted above).
    unsafe {
        // Loops, not `array::from_fn`: a closure is not compiled with the caller's instructions.
        let mut acc = [[V::splat(0.0); CH]; I];
        for (a, sums) in acc.iter_mut().enumerate() {
            for (c, s) in sums.iter_mut().enumerate() {
                *s = V::load(&ot[(i + a) * chunks + c0 + c]).mul(V::load(&rescale[c0 + c]));
            }
        }
        let mut w = [V::splat(0.0); CH];
        for (l, row) in value_rows.iter().enumerate() {
            for (c, wv) in w.iter_mut().enumerate() {
                *wv = V::load(weights.get_unchecked(l * chunks + c0 + c));
            }
            for (a, sums) in acc.iter_mut().enumerate() {
                let v = V::splat(*row.get_unchecked(i + a));
                for (s, wv) in sums.iter_mut().zip(&w) {
                    *s = wv.mul_add(v, *s);
                }
            }
        }
        for (a, sums) in acc.iter().enumerate() {
            for (c, s) in sums.iter().enumerate() {
                s.store(&mut ot[(i + a) * chunks + c0 + c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, two passes, for one query head over keys `lo..=hi`.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], lo: usize, hi: usize, d: usize, scale: f32) -> Vec<f64> {
        let scores: Vec<f64> = (lo..=hi)
            .map(|j| {
                q.iter().zip(&keys[j * d..(j + 1) * d]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
                    * f64::from(scale)
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..d)
            .map(|c| (lo..=hi).zip(&weights).map(|(j, w)| w * f64::from(values[j * d + c])).sum::<f64>() / total)
            .collect()
    }

    /// Tiles of rows with causal and chunked windows, over packed and slotted keys, against the
    /// f64 reference; and a row gives the same bits whichever rows share its tile.
    #[test]
    fn tiles_match_the_reference_and_do_not_depend_on_their_neighbours() {
        // 3 heads per KV head (48 rows a tile: 3 chunks of lanes), and 5 (80 rows: two passes).
        for (d, group) in [(48, 3), (64, 5)] {
            check_tiles(d, group);
        }
    }

    fn check_tiles(d: usize, group: usize) {
        let (n, base) = (150, 37);
        let keys = crate::kernels::test_values(n * d, 1);
        let values = crate::kernels::test_values(n * d, 2);
        let q = crate::kernels::test_values(n * group * d, 3);
        let scale = 0.4;
        // Window of row r: chunks of 40 absolute positions (key index j is at base + j).
        let window = |r: usize| ((base + r) / 40 * 40).saturating_sub(base).min(r)..=r;
        let queries = |rows: std::ops::Range<usize>| -> Vec<Query<'_>> {
            rows.map(|r| Query { q: &q[r * group * d..(r + 1) * group * d], lo: *window(r).start(), hi: r }).collect()
        };
        // Slots: key j at slot (n − 1 − j) of a pool with 2 heads, this head second.
        let mut pool = vec![0f32; n * 2 * d];
        for j in 0..n {
            pool[((n - 1 - j) * 2 + 1) * d..((n - 1 - j) * 2 + 2) * d].copy_from_slice(&keys[j * d..(j + 1) * d]);
        }
        let mut vpool = vec![0f32; n * 2 * d];
        for j in 0..n {
            vpool[((n - 1 - j) * 2 + 1) * d..((n - 1 - j) * 2 + 2) * d].copy_from_slice(&values[j * d..(j + 1) * d]);
        }
        let slots: Vec<u32> = (0..n as u32).map(|j| n as u32 - 1 - j).collect();
        let slotted = |data| Rows::Slots { data, slots: &slots, heads: 2, head: 1 };
        for (k, v) in [(Rows::Packed(&keys), Rows::Packed(&values)), (slotted(&pool), slotted(&vpool))] {
            assert!(k.fits(n, d) && v.fits(n, d));
            let mut whole = vec![0f32; n * group * d];
            for (t, out) in whole.chunks_mut(TILE_ROWS * group * d).enumerate() {
                let rows = t * TILE_ROWS..(t * TILE_ROWS + TILE_ROWS).min(n);
                attend_tile(&queries(rows), k, v, base, d, scale, out);
            }
            for r in 0..n {
                let w = window(r);
                for g in 0..group {
                    let qh = &q[(r * group + g) * d..(r * group + g + 1) * d];
                    let want = reference(qh, &keys, &values, *w.start(), *w.end(), d, scale);
                    let got = &whole[(r * group + g) * d..(r * group + g + 1) * d];
                    for (a, b) in got.iter().zip(&want) {
                        assert!((f64::from(*a) - b).abs() < 1e-5, "row {r} head {g}: {a} vs {b}");
                    }
                }
                // Alone in its tile: the same bits.
                let mut alone = vec![0f32; group * d];
                attend_tile(&queries(r..r + 1), k, v, base, d, scale, &mut alone);
                assert_eq!(alone, whole[r * group * d..(r + 1) * group * d], "row {r}");
            }
        }
    }
}
