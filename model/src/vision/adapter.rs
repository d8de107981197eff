//! From encoder outputs to text embeddings (transformers 5.24 `Llama4VisionPixelShuffleMLP` and
//! `Llama4MultiModalProjector`): the pixel shuffle folds each `s × s` block of patches into one
//! token (`s = 1 / pixel_shuffle_ratio`), the adapter MLP maps it with an exact GELU after **both**
//! of its bias-free layers, and the bias-free projector maps the result to the text width.

use candle_core::{DType, Device, Tensor};

use super::Geometry;
use super::ops::{Linear, Scratch};
use crate::checkpoint::WeightSource;
use crate::error::Result;
use crate::layers::WeightStorage;

/// `pixel_shuffle` (reference §4.3), in closed form: patches `[tiles · grid², hidden]` (row-major
/// per tile) → `[tiles · (grid/s)², s²·hidden]`. Output token `(R, C)` of a tile is the
/// concatenation, in block order `a·s + b`, of patch `(s·R + a, s·C + b)` for `a, b` in `0..s`
/// (row offset first). transformers reaches the same through view/permute/view/permute.
pub(super) fn pixel_shuffle(patches: &Tensor, g: &Geometry) -> Result<Tensor> {
    let tiles = patches.dim(0)? / g.patches;
    let (s, side) = (g.shuffle, g.grid / g.shuffle);
    Ok(patches
        .reshape(vec![tiles, side, s, side, s, g.hidden])?
        .permute(vec![0, 1, 3, 2, 4, 5])?
        .contiguous()?
        .reshape((tiles * side * side, s * s * g.hidden))?)
}

/// `vision_model.vision_adapter.mlp` (`fc1`, `fc2`, no biases) and `multi_modal_projector.linear_1`.
#[derive(Debug)]
pub(super) struct Adapter {
    fc1: Linear,
    fc2: Linear,
    projector: Linear,
    /// Leave out the GELU after `fc2` (a negative control only).
    #[cfg(any(test, feature = "testing"))]
    pub(super) skip_second_gelu: bool,
}

impl Adapter {
    pub fn load(
        g: &Geometry,
        src: &dyn WeightSource,
        (dtype, storage): (DType, WeightStorage),
        dev: &Device,
    ) -> Result<Self> {
        let linear = |key: &str, shape| Linear::load(src, key, shape, false, (dtype, storage), dev);
        Ok(Adapter {
            fc1: linear("vision_model.vision_adapter.mlp.fc1", (g.adapter_dim, g.shuffled_dim))?,
            fc2: linear("vision_model.vision_adapter.mlp.fc2", (g.adapter_dim, g.adapter_dim))?,
            projector: linear("multi_modal_projector.linear_1", (g.text_hidden, g.adapter_dim))?,
            #[cfg(any(test, feature = "testing"))]
            skip_second_gelu: false,
        })
    }

    pub fn linears(&self) -> [&Linear; 3] {
        [&self.fc1, &self.fc2, &self.projector]
    }

    /// Shuffled tokens `[rows, s²·hidden]` → text embeddings `[rows, text hidden]`.
    pub fn forward(&self, shuffled: &Tensor, scratch: &Scratch) -> Result<Tensor> {
        let h = self.fc1.forward_gelu(shuffled, scratch)?;
        #[cfg(any(test, feature = "testing"))]
        let h =
            if self.skip_second_gelu { self.fc2.forward(&h, scratch)? } else { self.fc2.forward_gelu(&h, scratch)? };
        #[cfg(not(any(test, feature = "testing")))]
        let h = self.fc2.forward_gelu(&h, scratch)?;
        self.projector.forward(&h, scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed form against transformers' view/permute/view/permute, written out with candle.
    #[test]
    fn pixel_shuffle_is_transformers_view_permute_sequence() {
        let dev = Device::Cpu;
        for (grid, hidden, ratio) in [(4usize, 3usize, 0.5f64), (6, 2, 0.5), (6, 2, 1.0 / 3.0), (24, 5, 0.5)] {
            let s = (1.0 / ratio).round() as usize;
            let g = Geometry { grid, patches: grid * grid, hidden, shuffle: s, ..Geometry::for_tests() };
            let tiles = 2;
            let values: Vec<f32> = (0..tiles * grid * grid * hidden).map(|i| i as f32).collect();
            let x = Tensor::from_vec(values, (tiles * grid * grid, hidden), &dev).expect("x");
            let got = pixel_shuffle(&x, &g).expect("shuffle");
            // transformers' `pixel_shuffle(input, shuffle_ratio)`:
            let (h, w, c) = (grid, grid, hidden);
            let r = x.reshape((tiles, h, w, c)).expect("view");
            let r = r.reshape((tiles, h, w / s, c * s)).expect("view");
            let r = r.permute((0, 2, 1, 3)).and_then(|t| t.contiguous()).expect("permute");
            let r = r.reshape((tiles, w / s, h / s, c * s * s)).expect("view");
            let r = r.permute((0, 2, 1, 3)).and_then(|t| t.contiguous()).expect("permute");
            let want = r.reshape((tiles * (h / s) * (w / s), c * s * s)).expect("view");
            assert_eq!(
                got.to_vec2::<f32>().expect("got"),
                want.to_vec2::<f32>().expect("want"),
                "grid {grid}, hidden {hidden}, s {s}"
            );
        }
    }
}
