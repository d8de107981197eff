//! The resize against torchvision itself: FNV-1a hashes of
//! `torchvision.transforms.v2.functional.resize(uint8 CHW tensor, [h, w], antialias=True)`
//! (bilinear; torch 2.15.0, torchvision 0.29.2, x86-64 AVX512 CPU) on a deterministic noise image,
//! recorded once with the script below. Up- and downscaling, odd sizes, one-pixel sides, and
//! downscales steep enough for the int16 weights to take more than 14 fraction bits. Pillow's own
//! `Image.resize(BILINEAR)` gives different hashes for most of these cases: it quantises the weights
//! with 22 bits.
//!
//! ```python
//! y, x = np.mgrid[0:h, 0:w].astype(np.int64)
//! img = np.stack([((x * 7919 + y * 104729 + c * 31337) ^ (x * y)) & 255 for c in range(3)], -1).astype(np.uint8)
//! out = F.resize(torch.from_numpy(img).permute(2, 0, 1).contiguous(), [oh, ow], antialias=True)
//! fnv1a64(out.permute(1, 2, 0).contiguous().numpy().tobytes())
//! ```

use epserve_imaging::resample::resize_bilinear_antialias;
use image::{Rgb, RgbImage};

fn noise(height: u32, width: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let (x, y) = (u64::from(x), u64::from(y));
        Rgb([0, 1, 2].map(|c| (((x * 7919 + y * 104_729 + c * 31_337) ^ (x * y)) & 255) as u8))
    })
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[test]
fn resize_matches_torchvision() {
    // (input H, W, output H, W, hash of torchvision's output)
    let cases: [(u32, u32, u32, u32, u64); 10] = [
        (37, 53, 336, 336, 0x8983_0bf3_8b80_303a),
        (53, 37, 23, 91, 0xaf27_fc3c_cdcc_2851),
        (400, 300, 7, 5, 0xb60a_f24d_500d_2a9e),
        (1000, 3, 13, 3, 0xe2b5_674f_db23_05c7),
        (5, 1000, 5, 17, 0xc5bf_f571_fc9c_a078),
        (1, 1, 3, 4, 0x5c65_2060_ce12_1639),
        (123, 457, 122, 456, 0x91cf_10b3_e209_a6bb),
        (300, 200, 299, 201, 0x37ee_5ff0_ed2b_cdbb),
        (2000, 1500, 21, 16, 0xd3ab_a451_2fd3_31ec),
        (97, 61, 336, 56, 0xd7f5_5f19_8dc9_378a),
    ];
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|&(ih, iw, oh, ow, expected)| {
            let out = resize_bilinear_antialias(&noise(ih, iw), ow, oh);
            let hash = fnv1a64(out.as_raw());
            (hash != expected).then(|| format!("{ih}x{iw} -> {oh}x{ow}: {hash:#018x}, torchvision {expected:#018x}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "differs from torchvision:\n{}", mismatches.join("\n"));
}
