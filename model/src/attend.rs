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
//! The code fixes the order of every sum, so the AVX-512, AVX2 and portable compilations agree too.

/// Keys per block of the online softmax.
pub(crate) const BLOCK: usize = 32;
/// Query rows per tile.
pub(crate) const TILE_ROWS: usize = 16;

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
    tile(queries, keys, values, base, d, scale, out);
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
    // The same code, compiled with 16-wide vectors.
    tile(queries, keys, values, base, d, scale, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(
    queries: &[Query<'_>],
    keys: Rows<'_>,
    values: Rows<'_>,
    base: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    // The same code, compiled with 8-wide vectors.
    tile(queries, keys, values, base, d, scale, out);
}

#[inline(always)]
fn tile(queries: &[Query<'_>], keys: Rows<'_>, values: Rows<'_>, base: usize, d: usize, scale: f32, out: &mut [f32]) {
    let (Some(lo), Some(hi)) = (queries.iter().map(|q| q.lo).min(), queries.iter().map(|q| q.hi).max()) else {
        return;
    };
    let group = queries[0].q.len() / d.max(1);
    // Per (query, head): the running maximum and sum of exp(score − maximum); `out` holds the
    // running weighted sum of values.
    let mut max = vec![f32::NEG_INFINITY; queries.len() * group];
    let mut sum = vec![0f32; queries.len() * group];
    out.fill(0.0);
    let mut scores = [0f32; BLOCK];
    for block in (base + lo) / BLOCK..=(base + hi) / BLOCK {
        // This block's key indices, `first..=last`.
        let first = (block * BLOCK).max(base + lo) - base;
        let last = (block * BLOCK + BLOCK - 1).min(base + hi) - base;
        for (i, query) in queries.iter().enumerate() {
            let (j0, j1) = (first.max(query.lo), last.min(query.hi));
            if j0 > j1 {
                continue;
            }
            let scores = &mut scores[..=j1 - j0];
            for (g, qh) in query.q.chunks_exact(d).enumerate() {
                let mut block_max = f32::NEG_INFINITY;
                for (k, s) in scores.iter_mut().enumerate() {
                    *s = dot(qh, keys.row(j0 + k, d)) * scale;
                    block_max = block_max.max(*s);
                }
                let at = i * group + g;
                let new_max = max[at].max(block_max);
                let acc = &mut out[at * d..(at + 1) * d];
                // The first block has nothing to rescale (and exp(−∞ − m) would be 0 anyway).
                let rescale = if max[at] == f32::NEG_INFINITY { 1.0 } else { crate::kernels::exp(max[at] - new_max) };
                if rescale != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= rescale);
                }
                let mut block_sum = 0f32;
                for (k, s) in scores.iter().enumerate() {
                    let p = crate::kernels::exp(s - new_max);
                    block_sum += p;
                    for (a, v) in acc.iter_mut().zip(values.row(j0 + k, d)) {
                        *a += p * v;
                    }
                }
                sum[at] = sum[at] * rescale + block_sum;
                max[at] = new_max;
            }
        }
    }
    for (acc, &total) in out.chunks_exact_mut(d).zip(&sum) {
        let inverse = 1.0 / total;
        acc.iter_mut().for_each(|a| *a *= inverse);
    }
}

/// `a · b` with 16 independent partial sums, so that it vectorizes (a single running sum is one
/// long dependency chain of additions).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() - a.len() % LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (x, y) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum::<f32>()
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
        let (d, group, n, base) = (48, 3, 150, 37);
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
