//! Antialiased bilinear resizing of 8-bit RGB, bit-exact with torchvision's
//! `resize(..., BILINEAR, antialias=True)` on a uint8 tensor on CPU.
//!
//! That path (`aten/src/ATen/native/cpu/UpSampleKernel.cpp` and `UpSampleKernelAVXAntialias.h`,
//! derived from Pillow-SIMD) is a separable convolution: a horizontal pass, rounded to uint8, then a
//! vertical pass; a pass is skipped when its size does not change. Each output sample takes the
//! triangle filter over a support of `max(1, in/out)` input samples around its centre, normalises
//! the weights to sum 1, and quantises them to int16 with as many fraction bits as the largest
//! weight of the pass allows (at most 22; Pillow proper always uses 22 bits in int32, which is why
//! Pillow's own resize differs from torch's by a level here and there). Accumulation starts at half
//! a unit, the sum is shifted right and clamped to 0..=255.

use image::RgbImage;

/// Resizes `image` to `width`×`height`.
///
/// # Panics
/// If a target side is 0.
pub fn resize_bilinear_antialias(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    assert!(width > 0 && height > 0, "cannot resize to {width}x{height}");
    let (in_w, in_h) = image.dimensions();
    let mut pixels = image.as_raw().clone();
    let mut current_w = in_w as usize;
    if width != in_w {
        let weights = PassWeights::new(in_w as usize, width as usize);
        pixels = horizontal(&pixels, in_h as usize, current_w, &weights);
        current_w = width as usize;
    }
    if height != in_h {
        let weights = PassWeights::new(in_h as usize, height as usize);
        pixels = vertical(&pixels, current_w, &weights);
    }
    RgbImage::from_raw(width, height, pixels).unwrap_or_else(|| unreachable!("sized by the passes"))
}

const CHANNELS: usize = 3;

/// The int16 weights of one pass: for output sample `i`, input samples `start[i]..start[i] +
/// len[i]` weighted by `weights[i * taps..][..len[i]]`.
#[derive(Debug)]
struct PassWeights {
    start: Vec<usize>,
    len: Vec<usize>,
    taps: usize,
    weights: Vec<i16>,
    precision: u32,
}

impl PassWeights {
    /// `_compute_index_ranges_int16_weights` with the bilinear `aa_filter`, align_corners = false
    /// and no explicit scale factor (torchvision passes a size).
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        // Bilinear's interp_size is 2: the support is 1 sample each side, widened by the scale
        // when downscaling (that is the antialiasing).
        let support = if scale >= 1.0 { scale } else { 1.0 };
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let taps = support.ceil() as usize * 2 + 1;
        let filter = |x: f64| {
            let x = x.abs();
            if x < 1.0 { 1.0 - x } else { 0.0 }
        };

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut float_weights = vec![0.0f64; out_size * taps];
        let mut max_weight = 0.0f64;
        for i in 0..out_size {
            let center = scale * (i as f64 + 0.5);
            // C++ casts to int64, truncating toward zero, before clamping at 0.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let xsize = (xmax - xmin).clamp(0, taps as i64) as usize;
            let row = &mut float_weights[i * taps..][..xsize];
            let mut total = 0.0;
            for (j, w) in row.iter_mut().enumerate() {
                *w = filter((j as f64 + xmin as f64 - center + 0.5) * invscale);
                total += *w;
            }
            if total != 0.0 {
                for w in row.iter_mut() {
                    *w /= total;
                    max_weight = max_weight.max(*w);
                }
            }
            start.push(xmin as usize);
            len.push(xsize);
        }

        // The most fraction bits (up to 22) for which the largest weight still fits in an int16.
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + max_weight * f64::from(1u32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let unit = f64::from(1u32 << precision);
        let weights = float_weights
            .iter()
            .map(|&w| {
                let v = w * unit;
                (if v < 0.0 { -0.5 + v } else { 0.5 + v }) as i32 as i16
            })
            .collect();
        Self { start, len, taps, weights, precision }
    }

    /// `Σ sample(k) · weight` for output `i`, rounded, shifted and clamped as torch does.
    #[inline]
    fn apply(&self, i: usize, sample: impl Fn(usize) -> u8) -> u8 {
        let weights = &self.weights[i * self.taps..][..self.len[i]];
        let mut acc: i32 = if self.precision > 0 { 1 << (self.precision - 1) } else { 0 };
        for (k, &w) in weights.iter().enumerate() {
            acc += i32::from(sample(self.start[i] + k)) * i32::from(w);
        }
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

fn horizontal(pixels: &[u8], rows: usize, in_w: usize, weights: &PassWeights) -> Vec<u8> {
    let out_w = weights.start.len();
    let mut out = vec![0u8; rows * out_w * CHANNELS];
    for (src, dst) in pixels.chunks_exact(in_w * CHANNELS).zip(out.chunks_exact_mut(out_w * CHANNELS)) {
        for x in 0..out_w {
            for c in 0..CHANNELS {
                dst[x * CHANNELS + c] = weights.apply(x, |k| src[k * CHANNELS + c]);
            }
        }
    }
    out
}

fn vertical(pixels: &[u8], width: usize, weights: &PassWeights) -> Vec<u8> {
    let out_h = weights.start.len();
    let stride = width * CHANNELS;
    let mut out = vec![0u8; out_h * stride];
    for (y, dst) in out.chunks_exact_mut(stride).enumerate() {
        for (offset, value) in dst.iter_mut().enumerate() {
            *value = weights.apply(y, |k| pixels[k * stride + offset]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let image = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 40) as u8, 9]));
        assert_eq!(resize_bilinear_antialias(&image, 7, 5), image);
    }

    #[test]
    fn constant_images_stay_constant() {
        let image = RgbImage::from_pixel(37, 23, image::Rgb([255, 128, 0]));
        for (w, h) in [(5, 3), (100, 71), (37, 1), (1, 23), (336, 336)] {
            let resized = resize_bilinear_antialias(&image, w, h);
            assert!(resized.pixels().all(|p| p.0 == [255, 128, 0]), "{w}x{h}");
        }
    }

    #[test]
    fn weights_use_the_int16_precision_rule() {
        // Upscaling: the largest weight is close to 1, which leaves 14 fraction bits in an int16.
        assert_eq!(PassWeights::new(10, 20).precision, 14);
        // Downscaling 1000 → 10 spreads each output over ~200 inputs: small weights, more bits.
        let down = PassWeights::new(1000, 10);
        assert!(down.precision > 14 && down.precision <= 22, "{}", down.precision);
        for i in 0..10 {
            let sum: i32 = down.weights[i * down.taps..][..down.len[i]].iter().map(|&w| i32::from(w)).sum();
            assert!((sum - (1 << down.precision)).abs() <= down.len[i] as i32, "weights of output {i} sum to {sum}");
        }
    }
}
