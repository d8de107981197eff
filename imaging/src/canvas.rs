//! Where an image goes: the tile grid (canvas) chosen for it and the size it is resized to before
//! padding. A port of `find_supported_resolutions`, `get_best_fit` and
//! `get_max_res_without_distortion` in transformers' `image_processing_llama4.py` (5.x), including
//! the float32/float64 mix of its torch and Python arithmetic, which decides ties and floors.

/// A canvas as a grid of tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
}

/// The grids with at most `max_patches` tiles in transformers' order: tile counts from
/// `max_patches` down to 1, each count's factor pairs (rows ascending) appended to the group of
/// their aspect ratio rows/cols, groups in the order their ratio was first seen.
pub fn candidate_grids(max_patches: usize) -> Vec<Grid> {
    let mut groups: Vec<Vec<Grid>> = Vec::new();
    for count in (1..=max_patches).rev() {
        for rows in (1..=count).filter(|r| count % r == 0) {
            let grid = Grid { rows, cols: count / rows };
            // Same ratio as exact rationals: rows/cols == r/c  <=>  rows·c == r·cols.
            match groups.iter_mut().find(|g| g[0].rows * grid.cols == grid.rows * g[0].cols) {
                Some(group) => group.push(grid),
                None => groups.push(vec![grid]),
            }
        }
    }
    groups.into_iter().flatten().collect()
}

/// The canvas for an image of `height`×`width` (`get_best_fit`): the per-canvas scale is
/// `min(H/height, W/width)` in float32 (torch divides an int64 tensor by a Python int); the
/// smallest scale ≥ 1 is chosen if there is one (the largest with `resize_to_max_canvas`), else the
/// largest scale < 1; among canvases with exactly that scale the first of minimal area.
///
/// # Panics
/// If `grids` is empty or `tile_size` is 0.
pub fn best_fit(height: usize, width: usize, grids: &[Grid], tile_size: usize, resize_to_max_canvas: bool) -> Grid {
    assert!(!grids.is_empty() && tile_size > 0, "no candidate canvases");
    let scale = |g: &Grid| {
        let scale_h = (g.rows * tile_size) as f32 / height as f32;
        let scale_w = (g.cols * tile_size) as f32 / width as f32;
        // torch.where(scale_h > scale_w, scale_w, scale_h)
        if scale_h > scale_w { scale_w } else { scale_h }
    };
    let scales: Vec<f32> = grids.iter().map(scale).collect();
    let upscaling = scales.iter().copied().filter(|&s| s >= 1.0);
    let selected = if scales.iter().any(|&s| s >= 1.0) {
        if resize_to_max_canvas { upscaling.fold(f32::MIN, f32::max) } else { upscaling.fold(f32::MAX, f32::min) }
    } else {
        scales.iter().copied().filter(|&s| s < 1.0).fold(f32::MIN, f32::max)
    };
    let mut best: Option<Grid> = None;
    for (grid, _) in grids.iter().zip(&scales).filter(|&(_, &s)| s == selected) {
        // torch.argmin returns the first minimum.
        if best.is_none_or(|b| grid.rows * grid.cols < b.rows * b.cols) {
            best = Some(*grid);
        }
    }
    best.unwrap_or_else(|| unreachable!("the selected scale is one of the scales"))
}

/// The size (height, width) the image is resized to before it is padded to `grid`'s canvas.
///
/// Without `resize_to_max_canvas` the target box is limited to `max(side, tile_size)` per side,
/// so an image is upscaled only when both sides are below a tile, and only until one side reaches
/// it. The image is then fitted into the box without distortion, flooring the other side.
pub fn resize_target(
    height: usize,
    width: usize,
    grid: Grid,
    tile_size: usize,
    resize_to_max_canvas: bool,
) -> (usize, usize) {
    let (canvas_h, canvas_w) = (grid.rows * tile_size, grid.cols * tile_size);
    // `target_size` is a row of a torch tensor; `min(int, tensor)` keeps the int unless the tensor
    // is strictly smaller. Which one survives decides whether the divisions below are float32
    // (tensor) or float64 (Python), and that decides floors when the quotient is near an integer.
    let (box_h, box_w) = if resize_to_max_canvas {
        (Side::tensor(canvas_h), Side::tensor(canvas_w))
    } else {
        let limit = |side: usize, canvas: usize| {
            let limited = side.max(tile_size);
            if canvas < limited { Side::tensor(canvas) } else { Side::int(limited) }
        };
        (limit(height, canvas_h), limit(width, canvas_w))
    };
    let scale_w = box_w.ratio(width);
    let scale_h = box_h.ratio(height);
    let (new_h, new_w) = if scale_w.lt(scale_h) {
        (scale_w.times_floor(height).min(box_h.value), box_w.value)
    } else {
        (box_h.value, scale_h.times_floor(width).min(box_w.value))
    };
    (new_h.max(1), new_w.max(1))
}

/// A side of the target box: a Python int, or a 0-dim int64 tensor.
#[derive(Clone, Copy)]
struct Side {
    value: usize,
    is_tensor: bool,
}

impl Side {
    fn int(value: usize) -> Self {
        Self { value, is_tensor: false }
    }

    fn tensor(value: usize) -> Self {
        Self { value, is_tensor: true }
    }

    /// `side / original`: a float32 tensor for a tensor side, a Python float otherwise.
    fn ratio(self, original: usize) -> Scale {
        if self.is_tensor {
            Scale::F32(self.value as f32 / original as f32)
        } else {
            Scale::F64(self.value as f64 / original as f64)
        }
    }
}

#[derive(Clone, Copy)]
enum Scale {
    F32(f32),
    F64(f64),
}

impl Scale {
    /// `self < other`; with a tensor on either side torch compares in float32.
    fn lt(self, other: Scale) -> bool {
        match (self, other) {
            (Scale::F64(a), Scale::F64(b)) => a < b,
            (a, b) => a.as_f32() < b.as_f32(),
        }
    }

    fn as_f32(self) -> f32 {
        match self {
            Scale::F32(v) => v,
            Scale::F64(v) => v as f32,
        }
    }

    /// `math.floor(original * scale)`.
    fn times_floor(self, original: usize) -> usize {
        match self {
            Scale::F32(s) => (original as f32 * s).floor() as usize,
            Scale::F64(s) => (original as f64 * s).floor() as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scout_has_fifty_canvases_in_transformers_order() {
        let grids = candidate_grids(16);
        assert_eq!(grids.len(), 50);
        let first: Vec<(usize, usize)> = grids.iter().take(4).map(|g| (g.rows, g.cols)).collect();
        assert_eq!(first, [(1, 16), (2, 8), (1, 4), (4, 4)]);
        // The docstring's example for max_num_chunks = 4.
        let four: Vec<(usize, usize)> = candidate_grids(4).iter().map(|g| (g.rows, g.cols)).collect();
        assert_eq!(four, [(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)]);
    }

    #[test]
    fn docstring_example_picks_the_smaller_area() {
        // get_best_fit((200, 300), [[224, 672], [672, 224], [224, 448], [448, 224], [224, 224]]) = [224, 448]
        let grids = [(1, 3), (3, 1), (1, 2), (2, 1), (1, 1)].map(|(rows, cols)| Grid { rows, cols });
        assert_eq!(best_fit(200, 300, &grids, 224, false), Grid { rows: 1, cols: 2 });
    }

    /// §5 of the reference: (input H×W) → canvas, resized size, tiles including the global one.
    #[test]
    fn scout_table() {
        let grids = candidate_grids(16);
        let cases = [
            ((200, 300), (336, 336), (224, 336), 1),
            ((336, 336), (336, 336), (336, 336), 1),
            ((480, 640), (672, 672), (480, 640), 5),
            ((600, 800), (672, 1008), (600, 800), 7),
            ((768, 1024), (1008, 1344), (768, 1024), 13),
            ((1080, 1920), (1008, 1680), (945, 1680), 16),
            ((3000, 4000), (1008, 1344), (1008, 1344), 13),
        ];
        for ((h, w), canvas, resized, tiles) in cases {
            let grid = best_fit(h, w, &grids, 336, false);
            assert_eq!((grid.rows * 336, grid.cols * 336), canvas, "{h}x{w} canvas");
            assert_eq!(resize_target(h, w, grid, 336, false), resized, "{h}x{w} resized");
            let local = grid.rows * grid.cols;
            assert_eq!(local + usize::from(local > 1), tiles, "{h}x{w} tiles");
        }
    }

    #[test]
    fn extreme_shapes() {
        let grids = candidate_grids(16);
        // A 1-pixel-high strip: widest canvas, downscaled to fit its width, height floored to ≥ 1.
        let grid = best_fit(1, 100_000, &grids, 336, false);
        assert_eq!(grid, Grid { rows: 1, cols: 16 });
        assert_eq!(resize_target(1, 100_000, grid, 336, false), (1, 5376));
        // A tiny image is upscaled until its longer side reaches a tile.
        let grid = best_fit(10, 20, &grids, 336, false);
        assert_eq!(grid, Grid { rows: 1, cols: 1 });
        assert_eq!(resize_target(10, 20, grid, 336, false), (168, 336));
        // resize_to_max_canvas upscales to the canvas allowing the largest scale (84 for 3×5).
        let grid = best_fit(10, 20, &grids, 336, true);
        assert_eq!(grid, Grid { rows: 3, cols: 5 });
        assert_eq!(resize_target(10, 20, grid, 336, true), (840, 1680));
    }
}
