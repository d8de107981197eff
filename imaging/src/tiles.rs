//! `Llama4ImageProcessor._preprocess`: an RGB image to uint8 tiles, and tiles to `pixel_values`.
//!
//! The split keeps the wire compact: tiles travel as uint8 (a byte per value, as the resize
//! produced them) and only the process that runs the vision encoder expands them to floats.

use half::bf16;
use image::RgbImage;

use crate::canvas::{best_fit, candidate_grids, resize_target};
use crate::config::ProcessorConfig;
use crate::error::ImageError;
use crate::resample::resize_bilinear_antialias;

/// An image cut into square uint8 RGB tiles, channels-first: the `rows`×`cols` grid in row-major
/// order, then, when there is more than one tile, the global tile (the whole image squeezed into
/// one tile). `pixels` is `[count, 3, tile_size, tile_size]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiles {
    pub rows: usize,
    pub cols: usize,
    pub tile_size: usize,
    pub pixels: Vec<u8>,
}

impl Tiles {
    /// Tiles in `pixels`: `rows · cols`, plus the global tile when that is more than one.
    pub fn count(&self) -> usize {
        tile_count(self.rows, self.cols)
    }

    /// Tiles received from elsewhere (a `GenerateRequest`), checked: a non-empty grid, a positive
    /// tile size, and exactly `count · 3 · tile_size²` bytes.
    ///
    /// # Errors
    /// [`ImageError::BadTiles`] saying what does not fit.
    pub fn from_parts(rows: usize, cols: usize, tile_size: usize, pixels: Vec<u8>) -> Result<Self, ImageError> {
        if rows == 0 || cols == 0 || tile_size == 0 {
            return Err(ImageError::BadTiles(format!("a {rows}x{cols} grid of {tile_size}-pixel tiles is empty")));
        }
        let expected = rows
            .checked_mul(cols)
            .and_then(|local| local.checked_add(usize::from(local > 1)))
            .and_then(|count| count.checked_mul(3))
            .and_then(|n| n.checked_mul(tile_size))
            .and_then(|n| n.checked_mul(tile_size));
        match expected {
            Some(expected) if expected == pixels.len() => Ok(Self { rows, cols, tile_size, pixels }),
            Some(expected) => Err(ImageError::BadTiles(format!(
                "a {rows}x{cols} grid of {tile_size}-pixel tiles needs {expected} bytes, got {}",
                pixels.len()
            ))),
            None => Err(ImageError::BadTiles(format!("a {rows}x{cols} grid of {tile_size}-pixel tiles is too large"))),
        }
    }

    /// The encoder's input `[count, 3, tile_size, tile_size]`, as `Llama4ImageProcessor`'s
    /// `rescale_and_normalize` computes it on a bf16 tensor: `x = bf16(u8) * rescale_factor`, then
    /// torchvision's `normalize` (`x.sub_(mean).div_(std)` with mean and std as bf16 tensors). Each
    /// op runs in float32 and rounds to bf16 (nearest, ties to even), as torch's CPU kernels do;
    /// the scalar `rescale_factor` enters as float32 (torch's `opmath` for a Python scalar), not
    /// bf16. The values returned are bf16 values held in f32.
    pub fn pixel_values(&self, cfg: &ProcessorConfig) -> Vec<f32> {
        let round = |x: f32| bf16::from_f32(x).to_f32();
        let plane = self.tile_size * self.tile_size;
        // 256 possible inputs per channel: a lookup table.
        let table: Vec<[f32; 256]> = (0..3)
            .map(|c| {
                let mean = round(cfg.mean[c]);
                let std = round(cfg.std[c]);
                std::array::from_fn(|v| {
                    let scaled = round(v as f32 * cfg.rescale_factor);
                    round(round(scaled - mean) / std)
                })
            })
            .collect();
        self.pixels.iter().enumerate().map(|(i, &v)| table[(i / plane) % 3][usize::from(v)]).collect()
    }
}

fn tile_count(rows: usize, cols: usize) -> usize {
    let local = rows * cols;
    local + usize::from(local > 1)
}

/// Resizes, pads and tiles `image` as `Llama4ImageProcessor` does for `cfg`.
///
/// # Panics
/// If `cfg` fails [`ProcessorConfig::validate`] (a zero tile size or `max_patches`; configs from
/// [`ProcessorConfig::from_checkpoint`] never do), or if the image is empty ([`crate::decode`]
/// never returns one).
pub fn preprocess(image: &RgbImage, cfg: &ProcessorConfig) -> Tiles {
    if let Err(e) = cfg.validate() {
        panic!("invalid image processor config: {e}");
    }
    assert!(image.width() > 0 && image.height() > 0, "cannot preprocess an empty image");
    let tile = cfg.tile_size;
    let (height, width) = (image.height() as usize, image.width() as usize);
    let grid = best_fit(height, width, &candidate_grids(cfg.max_patches), tile, cfg.resize_to_max_canvas);
    let (new_h, new_w) = resize_target(height, width, grid, tile, cfg.resize_to_max_canvas);
    let resized = resize_bilinear_antialias(image, new_w as u32, new_h as u32);

    let plane = tile * tile;
    let mut pixels = vec![0u8; tile_count(grid.rows, grid.cols) * 3 * plane];
    // Tile (r, c) covers canvas rows r·S.. and columns c·S..; canvas pixels beyond the resized
    // image are the zero padding (`pad_to_best_fit` pads bottom and right with black).
    for r in 0..grid.rows {
        for c in 0..grid.cols {
            let base = (r * grid.cols + c) * 3 * plane;
            copy_into_tile(&resized, r * tile, c * tile, tile, &mut pixels[base..base + 3 * plane]);
        }
    }
    if grid.rows * grid.cols > 1 {
        let global = resize_bilinear_antialias(image, tile as u32, tile as u32);
        let base = grid.rows * grid.cols * 3 * plane;
        copy_into_tile(&global, 0, 0, tile, &mut pixels[base..]);
    }
    Tiles { rows: grid.rows, cols: grid.cols, tile_size: tile, pixels }
}

/// Writes the `tile`×`tile` window of `image` at (`top`, `left`), channels-first, into `dst`
/// (which is zero where the window leaves the image).
fn copy_into_tile(image: &RgbImage, top: usize, left: usize, tile: usize, dst: &mut [u8]) {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let raw = image.as_raw();
    let rows = height.saturating_sub(top).min(tile);
    let cols = width.saturating_sub(left).min(tile);
    for y in 0..rows {
        let src = &raw[((top + y) * width + left) * 3..][..cols * 3];
        for (x, rgb) in src.chunks_exact(3).enumerate() {
            for (c, &v) in rgb.iter().enumerate() {
                dst[c * tile * tile + y * tile + x] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parts_checks_the_length() {
        let ok = Tiles::from_parts(1, 3, 2, vec![0; 4 * 3 * 4]);
        assert_eq!(ok.map(|t| t.count()).ok(), Some(4));
        assert_eq!(Tiles::from_parts(1, 1, 2, vec![0; 12]).map(|t| t.count()).ok(), Some(1));
        for (rows, cols, size, len) in [(1, 3, 2, 3 * 3 * 4), (1, 1, 2, 13), (0, 1, 2, 0), (1, 1, 0, 0)] {
            assert!(matches!(Tiles::from_parts(rows, cols, size, vec![0; len]), Err(ImageError::BadTiles(_))));
        }
        assert!(matches!(Tiles::from_parts(usize::MAX, 2, 336, Vec::new()), Err(ImageError::BadTiles(_))));
    }

    #[test]
    fn normalisation_is_bf16_arithmetic() {
        let tiles = Tiles { rows: 1, cols: 1, tile_size: 1, pixels: vec![0, 255, 128] };
        let values = tiles.pixel_values(&ProcessorConfig::scout());
        // 0 → -1; 255 · f32(1/255) rounds to 1.0 → 1; 128/255 = 0.50196 → bf16 0.50390625 → 0.0078125.
        assert_eq!(values, [-1.0, 1.0, 0.0078125]);
        assert!(values.iter().all(|&v| bf16::from_f32(v).to_f32() == v));
    }

    #[test]
    fn padding_and_tile_order() {
        // 2 rows × 5 columns of distinct values; tiles of 2 → canvas 1×3 tiles (2×6), padded right.
        let image = RgbImage::from_fn(5, 2, |x, y| image::Rgb([(10 * y + x) as u8, 100, 200]));
        let cfg = ProcessorConfig { tile_size: 2, max_patches: 4, ..ProcessorConfig::scout() };
        let tiles = preprocess(&image, &cfg);
        assert_eq!((tiles.rows, tiles.cols, tiles.count()), (1, 3, 4));
        let red = |t: usize| tiles.pixels[t * 12..t * 12 + 4].to_vec();
        assert_eq!(red(0), [0, 1, 10, 11]);
        assert_eq!(red(1), [2, 3, 12, 13]);
        assert_eq!(red(2), [4, 0, 14, 0], "the padding is black");
        assert_eq!(tiles.pixels[2 * 12 + 4..2 * 12 + 8], [100, 0, 100, 0], "green plane of tile 2");
    }
}
