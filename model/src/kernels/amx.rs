//! AMX tiles for the bf16 mode's products of many rows (`--activations bf16` on Intel Xeon 4th
//! generation and later): `tdpbf16ps` multiplies a tile of 16 weight rows × 32 bf16 of `k` by a tile
//! of 16 pairs of `k` × 16 activation rows into a tile of 16 × 16 f32 sums, 8192 multiply-adds an
//! instruction (f32 FMAs: 16, `vdpbf16ps`: 32).
//!
//! Neither operand is copied. The weights are read where they lie: 16 rows of a row-major `[n, k]`
//! matrix, 64 bytes of each, are one tile load whose stride is the row's length. The rows come in
//! the layout the bf16 outer form stages them in ([`super::bf16dot`]: `[k/2, padded]` pairs of two
//! bf16, rows padded with zeros to a multiple of 16), which is the instruction's second operand as it
//! stands: the 16 pairs of one 32-wide slice of `k`, each 16 rows wide, 64 bytes apart by `padded`.
//! A block of 32 features × 32 rows keeps four sum tiles and loads two tiles of each operand per
//! slice of `k`; a last block of 16 rows keeps two. Features past the last whole 32 are left to the
//! caller (the `vdpbf16ps` outer form).
//!
//! Rounding: the rows are rounded to bf16 as in the other bf16 forms; products of two bf16 are exact
//! in f32 and summed in f32 (round to nearest even; the instruction treats subnormal inputs and
//! results as zero). The sums differ from the other forms' only in order.
//!
//! Linux gives a process the tile registers only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`):
//! asked once, with [`available`]; a refusal (an old kernel, a hypervisor that hides the state)
//! leaves the tiles unused and says why in the log. `EPSERVE_AMX=off` leaves them unused too.

use std::arch::asm;

use half::bf16;

/// Rows from which the bf16 mode's products take the tiles (fewer rows are bound by reading the
/// weights, which the `vdpbf16ps` and f32 forms already do at the memory's pace).
pub const MIN_ROWS: usize = 16;
/// Features per parallel task: whole blocks of 32.
pub const TASK_FEATURES: usize = 128;
/// Features of a block (two tiles of 16).
const BLOCK_FEATURES: usize = 32;
/// `k` a tile covers.
const SLICE: usize = 32;
const TILE_ROWS: usize = 16;

/// Whether this CPU and OS let the bf16 mode use AMX tiles: AMX-TILE and AMX-BF16 present, the tile
/// state granted to this process, and `EPSERVE_AMX` not `off`. Decided once (logged).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("EPSERVE_AMX").is_ok_and(|v| v == "off") {
            tracing::info!("bf16 mode: AMX tiles not used (EPSERVE_AMX=off)");
            return false;
        }
        if !super::bf16dot::available() || !cpu_has_amx_bf16() {
            return false;
        }
        match request_tile_state() {
            Ok(()) => {
                tracing::info!("bf16 mode: products of {MIN_ROWS} rows and more on AMX tiles (tdpbf16ps)");
                true
            }
            Err(e) => {
                tracing::warn!("bf16 mode: this CPU has AMX, but the OS did not grant the tile state ({e}): not used");
                false
            }
        }
    })
}

/// Whether the tiles take a product of `m` rows over `k`: `k` a whole number of 32-wide slices.
pub fn takes(m: usize, k: usize) -> bool {
    m >= MIN_ROWS && k.is_multiple_of(SLICE) && k > 0 && available()
}

/// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22).
fn cpu_has_amx_bf16() -> bool {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 22) != 0
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> std::io::Result<()> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes which register state the kernel lets this
    // process use; it reads and writes no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> std::io::Result<()> {
    Err(std::io::Error::other("tile state is requested on Linux only"))
}

/// The tile configuration every block uses: palette 1, tiles 0-7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = TILE_ROWS as u8;
        }
        TileConfig(c)
    }
}

/// `yt[o][r]` for the features of `w` (`[n, k]` bf16) in whole blocks of 32 and every row `r < m`
/// of `xt` (`[k/2, padded]` pairs, see the module); returns how many features it computed (the
/// rest, fewer than 32, are the caller's).
pub fn features_of(xt: &[u32], padded: usize, w: &[bf16], k: usize, m: usize, yt: &mut [f32]) -> usize {
    let n = w.len().checked_div(k).unwrap_or(0);
    assert!(
        available()
            && k.is_multiple_of(SLICE)
            && padded.is_multiple_of(TILE_ROWS)
            && m <= padded
            && xt.len() == k / 2 * padded
            && w.len() == n * k
            && yt.len() == n * m,
        "AMX product: needs the tile state, k a multiple of 32 and lengths that agree with the shapes"
    );
    let blocks = n / BLOCK_FEATURES;
    if blocks == 0 || m == 0 {
        return 0;
    }
    let operands = Operands { xt, padded, w, k };
    let config = TileConfig::all_full();
    let mut sums = [0f32; 4 * TILE_ROWS * TILE_ROWS];
    // SAFETY: the tile state was granted (`available`); the configuration is 64 aligned bytes.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
    for b in 0..blocks {
        let f0 = b * BLOCK_FEATURES;
        let mut r0 = 0;
        while r0 < m {
            let two = r0 + TILE_ROWS < m;
            // SAFETY: features f0..f0 + 32 are rows of `w`; rows r0..r0 + 16 (and + 32 with `two`)
            // are inside `padded`, whose pairs `xt` holds for all of `k`; tiles are configured.
            unsafe { block(&operands, f0, r0, two, &mut sums) };
            // Tile (a, v): features f0 + 16a.., rows r0 + 16v..
            for a in 0..2 {
                for v in 0..if two { 2 } else { 1 } {
                    let tile = &sums[(2 * a + v) * TILE_ROWS * TILE_ROWS..][..TILE_ROWS * TILE_ROWS];
                    let (rows, first) = ((m - r0 - v * TILE_ROWS).min(TILE_ROWS), r0 + v * TILE_ROWS);
                    for (i, sums) in tile.chunks_exact(TILE_ROWS).enumerate() {
                        let o = f0 + a * TILE_ROWS + i;
                        yt[o * m + first..o * m + first + rows].copy_from_slice(&sums[..rows]);
                    }
                }
            }
            r0 += if two { 2 * TILE_ROWS } else { TILE_ROWS };
        }
    }
    // SAFETY: returns the tiles to their initial state (no operands).
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    BLOCK_FEATURES * blocks
}

/// A product's operands: the rows' pairs `[k/2, padded]` and the weights `[n, k]`.
struct Operands<'a> {
    xt: &'a [u32],
    padded: usize,
    w: &'a [bf16],
    k: usize,
}

/// The sums of features `f0..f0 + 32` against rows `r0..r0 + 16` (and `r0 + 16..r0 + 32` when
/// `two`), into `sums` as tiles (features 0-15 × first rows, × second rows, features 16-31 × ...).
///
/// # Safety
/// The tiles must be configured ([`TileConfig::all_full`]); `w` must hold rows `f0..f0 + 32` of `k`
/// elements, `k` a multiple of 32; `xt` must hold `k / 2` rows of `padded` pairs with
/// `r0 + 16` (`r0 + 32` when `two`) `≤ padded`.
#[inline(always)]
unsafe fn block(ops: &Operands<'_>, f0: usize, r0: usize, two: bool, sums: &mut [f32]) {
    let Operands { xt, padded, w, k } = *ops;
    let w_stride = k * std::mem::size_of::<bf16>();
    let x_stride = padded * std::mem::size_of::<u32>();
    let x_slice = TILE_ROWS * padded;
    let (a0, a1) = (w[f0 * k..].as_ptr(), w[(f0 + TILE_ROWS) * k..].as_ptr());
    let b0 = xt[r0..].as_ptr();
    let out = sums.as_mut_ptr();
    let out_stride = TILE_ROWS * std::mem::size_of::<f32>();
    // SAFETY (every block below): the caller guarantees the tiles are configured and that each
    // 16-row load stays inside `w` (rows f0..f0 + 32, bytes s·64..s·64 + 64 of each) or `xt` (pair
    // rows 16s..16s + 16, 16 or 32 words from r0); the stores go to `sums`' 4 tiles of 1 KiB.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for s in 0..k / SLICE {
            let (a0, a1, b0) = (a0.add(s * SLICE), a1.add(s * SLICE), b0.add(s * x_slice));
            if two {
                asm!(
                    "tileloadd tmm4, [{a0} + {ws}*1]",
                    "tileloadd tmm5, [{a1} + {ws}*1]",
                    "tileloadd tmm6, [{b0} + {xs}*1]",
                    "tileloadd tmm7, [{b1} + {xs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.add(TILE_ROWS),
                    ws = in(reg) w_stride,
                    xs = in(reg) x_stride,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "tileloadd tmm4, [{a0} + {ws}*1]",
                    "tileloadd tmm5, [{a1} + {ws}*1]",
                    "tileloadd tmm6, [{b0} + {xs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    ws = in(reg) w_stride,
                    xs = in(reg) x_stride,
                    options(nostack, readonly),
                );
            }
        }
        let tile = TILE_ROWS * TILE_ROWS;
        asm!(
            "tilestored [{o0} + {os}*1], tmm0",
            "tilestored [{o1} + {os}*1], tmm1",
            "tilestored [{o2} + {os}*1], tmm2",
            "tilestored [{o3} + {os}*1], tmm3",
            o0 = in(reg) out,
            o1 = in(reg) out.add(tile),
            o2 = in(reg) out.add(2 * tile),
            o3 = in(reg) out.add(3 * tile),
            os = in(reg) out_stride,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::bf16dot::Bf16Rows;
    use super::*;

    /// Every row count from 16 to 64 (one or two tiles of rows, padded rows), features in whole
    /// blocks and not, against the f64 product of the bf16-rounded rows and the bf16 weights.
    #[test]
    fn tiles_match_the_product_of_rounded_rows() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 here (or the OS did not grant the tile state, or EPSERVE_AMX=off)");
            return;
        }
        for (n, k) in [(32, 32), (70, 64), (96, 320)] {
            let w: Vec<bf16> = crate::kernels::test_values(n * k, 11).into_iter().map(bf16::from_f32).collect();
            for m in [16, 17, 31, 32, 33, 47, 48, 63, 64] {
                let x = crate::kernels::test_values(m * k, m as u64 + 5);
                let rows = Bf16Rows::stage(&x, m, k);
                let (xt, padded) = rows.pairs().expect("rows of 16 and more are staged as pairs");
                let mut yt = vec![f32::NAN; n * m];
                let done = features_of(xt, padded, &w, k, m, &mut yt);
                assert_eq!(done, n / 32 * 32);
                crate::kernels::assert_rounded_product(&w, &x, k, m, &yt[..done * m], &format!("n {n} k {k} m {m}"));
                assert!(yt[done * m..].iter().all(|v| v.is_nan()), "features past the blocks are the caller's");
            }
        }
    }

    /// Through [`crate::kernels::products`] (tasks of whole blocks, features past them on the
    /// `vdpbf16ps` outer form) at the test checkpoints' shapes, every row count from 16 to 64.
    #[test]
    fn products_of_many_rows_take_the_tiles() {
        if !available() || !super::super::bf16dot::takes(16) {
            eprintln!("skipped: no AMX-BF16 here, or EPSERVE_BF16_ROWS keeps products of 16 rows exact");
            return;
        }
        for (n, k) in [(64, 64), (16, 64), (256, 64), (64, 128), (512, 64), (200, 96)] {
            let w: Vec<bf16> = crate::kernels::test_values(n * k, 13).into_iter().map(bf16::from_f32).collect();
            for m in 16..=64 {
                let x = crate::kernels::test_values(m * k, m as u64 + 9);
                let mut yt = vec![f32::NAN; n * m];
                crate::kernels::rows_times_weight_t(&x, m, crate::kernels::Weights::Bf16Products(&w), n, k, &mut yt);
                crate::kernels::assert_rounded_product(&w, &x, k, m, &yt, &format!("n {n} k {k} m {m}"));
            }
        }
    }
}
